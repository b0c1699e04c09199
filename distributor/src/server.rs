//! Running an axum router on a bound listener, and stopping it: [`Running`] aborts the
//! server (like a crash: open connections are dropped) when stopped or dropped.

use crate::cap::CappedListener;
use axum::Router;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// A server running on a task of the current runtime.
pub struct Running {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Listen on `addr` with the connection cap that goes with `max_requests` (see
    /// [`crate::cap`]).
    pub async fn bind(
        addr: SocketAddr,
        router: Router,
        name: &'static str,
        max_requests: usize,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> anyhow::Result<Self> {
        let listener =
            TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("{name}: cannot listen on {addr}: {e}"))?;
        Ok(Self::start(CappedListener::for_requests(listener, max_requests, metrics), router, name))
    }

    /// Serve on `listener`: a [`CappedListener`], or a bare [`TcpListener`] for a port
    /// with no connection cap (the loopback mirror).
    pub fn start<L>(listener: L, router: Router, name: &'static str) -> Self
    where
        L: axum::serve::Listener<Addr = SocketAddr>,
    {
        let addr = listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(shutdown).await {
                tracing::error!("{name} server on {addr}: {e}");
            }
        });
        tracing::info!("{name} listening on {addr}");
        Running { addr, stop, task: Some(task) }
    }

    /// A receiver that turns `true` when the server is stopped (for background tasks).
    pub fn stopped(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Wait until the server ends (it runs until stopped).
    pub async fn wait(mut self) {
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    pub fn stop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}
