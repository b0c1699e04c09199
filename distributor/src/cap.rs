//! A cap on the requests a port handles at once (`--max-requests`). One more is refused
//! at once with `503` and `Retry-After: 1`, before any other work (even the secret
//! check), so that the requester asks another peer (or the origin) instead of queueing.
//! A request counts until its response body is fully sent or dropped.
//!
//! The same option caps the port's open connections at [`CONNECTIONS_PER_REQUEST`]
//! times as many, and at least [`MIN_CONNECTIONS`] ([`CappedListener`]): an idle keep-alive connection costs no request
//! slot, but a socket and a task, so a client (or a swarm of them) opening connections
//! without end would otherwise exhaust the process's descriptors. A connection over the
//! cap is closed as soon as it is accepted, before anything is read from it (the client
//! sees the connection closed and asks elsewhere), and counted in
//! `mwdist_connections_refused_total`. A connection on which nothing was read or written
//! for [`IDLE_TIMEOUT`] is closed, so that connections opened and left silent (by a
//! client that crashed, or on purpose) do not keep the cap filled. Well-behaved clients
//! hold few idle connections (reqwest closes pooled connections idle for 90 s).

use crate::metrics::{Metrics, M};
use axum::body::{Body, HttpBody};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Default cap of an agent's peer port.
pub const AGENT_MAX_REQUESTS: usize = 256;
/// Default cap of the origin's (and a tracker's) port.
pub const ORIGIN_MAX_REQUESTS: usize = 1024;

/// The shared state of the middleware.
#[derive(Clone)]
pub struct RequestCap {
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl RequestCap {
    /// At most `max` requests at once (`0` is taken as 1).
    pub fn new(max: usize, metrics: Arc<Metrics>) -> Self {
        RequestCap { slots: Arc::new(Semaphore::new(max.max(1))), metrics }
    }
}

/// axum middleware: refuse a request when `max` are already being handled.
pub async fn limit(State(cap): State<RequestCap>, req: Request, next: Next) -> Response {
    let Ok(permit) = cap.slots.clone().try_acquire_owned() else {
        cap.metrics.add(M::RequestsRefused, 1);
        return (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")]).into_response();
    };
    let (parts, body) = next.run(req).await.into_parts();
    Response::from_parts(parts, Body::new(Held { body, _permit: permit }))
}

/// A response body that keeps its request's slot until it is sent or dropped.
struct Held {
    body: Body,
    _permit: OwnedSemaphorePermit,
}

impl HttpBody for Held {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Open connections a port keeps per request it may handle at once.
pub const CONNECTIONS_PER_REQUEST: usize = 4;
/// Open connections a port keeps at least, however small its request cap: a client's
/// idle pooled connections, `/metrics` scrapes and refused requests' connections must
/// not crowd out the requests the port does serve.
pub const MIN_CONNECTIONS: usize = 64;
/// A connection with nothing read or written for this long is closed. Longer than any
/// request of the cluster waits in silence (a piece request gives up after 20 s, a blob
/// waiting for its pieces after 30 s).
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// A listener that keeps at most `max` connections open at once; one more is closed as
/// soon as it is accepted.
pub struct CappedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    idle: std::time::Duration,
}

impl CappedListener {
    /// At most `max` connections (`0` is taken as 1), each closed after `idle` without
    /// traffic.
    pub fn new(inner: TcpListener, max: usize, idle: std::time::Duration, metrics: Arc<Metrics>) -> Self {
        CappedListener { inner, slots: Arc::new(Semaphore::new(max.max(1))), metrics, idle }
    }

    /// The cap that goes with `--max-requests max_requests`.
    pub fn for_requests(inner: TcpListener, max_requests: usize, metrics: Arc<Metrics>) -> Self {
        let max = max_requests.saturating_mul(CONNECTIONS_PER_REQUEST).max(MIN_CONNECTIONS);
        Self::new(inner, max, IDLE_TIMEOUT, metrics)
    }
}

impl axum::serve::Listener for CappedListener {
    type Io = CappedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // axum's own accept loop: it waits out errors such as EMFILE.
            let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            match self.slots.clone().try_acquire_owned() {
                Ok(permit) => {
                    let deadline = Box::pin(tokio::time::sleep(self.idle));
                    return (CappedStream { io, _permit: permit, idle: self.idle, deadline }, addr);
                }
                Err(_) => {
                    self.metrics.add(M::ConnectionsRefused, 1);
                    tracing::debug!("connection from {addr} closed: the port has its cap of open connections");
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection that holds its slot until it is closed, and fails (so that the server
/// closes it) once nothing was read or written for its idle time.
pub struct CappedStream {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
    idle: std::time::Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl CappedStream {
    fn active(&mut self) {
        let at = tokio::time::Instant::now() + self.idle;
        self.deadline.as_mut().reset(at);
    }

    /// What the inner stream's poll gave, with the idle deadline applied: traffic
    /// (`moved`) pushes it back; `Pending` past it turns into an error, so that the
    /// server closes the connection.
    fn settle<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
        moved: impl FnOnce(&std::io::Result<T>) -> bool,
    ) -> Poll<std::io::Result<T>> {
        match polled {
            Poll::Ready(r) => {
                if moved(&r) {
                    self.active();
                }
                Poll::Ready(r)
            }
            Poll::Pending if self.deadline.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connection idle for too long")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

fn wrote(r: &std::io::Result<usize>) -> bool {
    r.as_ref().is_ok_and(|n| *n > 0)
}

impl AsyncRead for CappedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let moved = buf.filled().len() > before;
        self.settle(cx, polled, |_| moved)
    }
}

impl AsyncWrite for CappedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.settle(cx, polled, wrote)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.settle(cx, polled, wrote)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn get(addr: SocketAddr) -> std::io::Result<(TcpStream, String)> {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await?;
        let mut buf = vec![0u8; 512];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::other("no answer within 5 s"))??;
        Ok((s, String::from_utf8_lossy(&buf[..n]).into_owned()))
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_and_a_freed_slot_is_reused() {
        let metrics = Arc::new(Metrics::default());
        let inner = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let listener = CappedListener::new(inner, 2, IDLE_TIMEOUT, metrics.clone());
        let addr = axum::serve::Listener::local_addr(&listener).expect("addr");
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let server = tokio::spawn(async move { axum::serve(listener, router).await });

        // Two keep-alive connections, answered and left open: the cap is reached.
        let (a, ra) = get(addr).await.expect("first connection");
        let (_b, rb) = get(addr).await.expect("second connection");
        assert!(ra.starts_with("HTTP/1.1 200") && rb.starts_with("HTTP/1.1 200"), "{ra} / {rb}");
        // A third is closed without an answer.
        let third = get(addr).await;
        assert!(third.as_ref().map_or(true, |(_, r)| r.is_empty()), "over the cap: {:?}", third.map(|t| t.1));
        assert_eq!(metrics.get(M::ConnectionsRefused), 1);
        // Closing one frees its slot.
        drop(a);
        let mut answered = None;
        for _ in 0..50 {
            if let Ok((_c, r)) = get(addr).await {
                if !r.is_empty() {
                    answered = Some(r);
                    break;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(answered.is_some_and(|r| r.starts_with("HTTP/1.1 200")), "a freed slot takes a new connection");
        server.abort();
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_and_its_slot_freed_but_a_busy_one_stays() {
        let metrics = Arc::new(Metrics::default());
        let inner = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let idle = std::time::Duration::from_millis(300);
        let listener = CappedListener::new(inner, 1, idle, metrics.clone());
        let addr = axum::serve::Listener::local_addr(&listener).expect("addr");
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let server = tokio::spawn(async move { axum::serve(listener, router).await });

        // A connection that keeps asking, more often than the idle time, is kept.
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let mut last = std::time::Instant::now();
        for _ in 0..6 {
            s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.expect("request");
            let mut buf = vec![0u8; 512];
            let n = s.read(&mut buf).await.expect("answer");
            assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "an active connection is served");
            last = std::time::Instant::now();
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        // Left silent, it is closed after the idle time, and its slot serves another.
        let mut buf = [0u8; 16];
        let closed = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "the server closed the silent connection: {closed:?}");
        assert!(last.elapsed() >= idle - std::time::Duration::from_millis(50), "not before the idle time");
        let mut answered = false;
        for _ in 0..50 {
            if let Ok((_c, r)) = get(addr).await {
                if r.starts_with("HTTP/1.1 200") {
                    answered = true;
                    break;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(answered, "the freed slot takes a new connection");
        server.abort();
    }
}
