//! `mwdist agent`: one per worker. Serves the distribution pull API on loopback (for
//! containerd's `hosts.toml` mirror, skopeo or docker, unchanged image names): manifests
//! are resolved through the origin, blobs come from the swarm ([`transfer`]) and are
//! streamed to the client in order while pieces arrive. A second, authenticated port
//! serves verified pieces to other agents.
//!
//! Storage: `<data>/partial/<hex>` while a blob is assembled (pieces written at their
//! offsets once verified), renamed to `<data>/blobs/<hex>` once the whole file matched
//! the digest.

pub mod cache;
mod mirror;
mod resume;
pub mod transfer;

use crate::auth::Secret;
use crate::limit::RateLimiter;
use crate::metrics::Metrics;
use crate::server::Running;
use oci_core::Digest;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
pub use transfer::Transfer;

/// How long a peer that served bad bytes stays dropped.
pub const BAN: Duration = Duration::from_secs(300);
/// How long a peer that refused the connection (it died, or is restarting) is left out,
/// even if the tracker still lists it: longer than the tracker keeps an entry that is not
/// announced again, so that a dead peer's pieces are not waited for, nor held back from
/// the origin's choice, until the tracker forgets it.
pub const UNREACHABLE: Duration = Duration::from_secs(8);

#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The mirror API (loopback by default).
    pub mirror_listen: SocketAddr,
    /// The peer API.
    pub peer_listen: SocketAddr,
    /// How other agents reach the peer API; default: the bound peer address.
    pub advertise: Option<String>,
    /// The origin (and tracker), `host:port`.
    pub origin: String,
    /// A tracker to announce to instead of the origin's, `host:port`.
    pub tracker: Option<String>,
    pub data_dir: PathBuf,
    pub secret: Secret,
    pub rate_up: Option<u64>,
    pub rate_down: Option<u64>,
    /// Disk bound for complete blobs (LRU eviction, see [`cache`]); `None`: unbounded.
    pub cache_max: Option<u64>,
    /// Requests the peer port handles at once; more get `503` (see [`crate::cap`]).
    pub max_requests: usize,
    /// Testing only: flip a byte of every piece served to peers.
    pub corrupt: bool,
}

pub struct Agent {
    pub opts: AgentOptions,
    pub peer_id: String,
    pub advertise: String,
    http: reqwest::Client,
    transfers: tokio::sync::Mutex<HashMap<Digest, Arc<Transfer>>>,
    /// Peers left out, until when: for bad bytes ([`BAN`]) or a refused connection
    /// ([`UNREACHABLE`]); whether for bad bytes (those are reported to the tracker).
    banned: Mutex<HashMap<String, (Instant, bool)>>,
    pub up: Arc<RateLimiter>,
    /// Concurrent piece uploads to peers.
    pub upload_slots: Arc<tokio::sync::Semaphore>,
    pub down: Arc<RateLimiter>,
    pub metrics: Arc<Metrics>,
    /// The peer port's request cap.
    peer_cap: crate::cap::RequestCap,
    stop: tokio::sync::watch::Receiver<bool>,
}

/// A running agent: its two servers and background tasks stop when this is dropped.
pub struct RunningAgent {
    pub agent: Arc<Agent>,
    pub mirror: Running,
    pub peer: Running,
}

impl RunningAgent {
    pub fn mirror_addr(&self) -> SocketAddr {
        self.mirror.addr
    }

    /// Wait until the agent is stopped.
    pub async fn wait(self) {
        let RunningAgent { mirror, peer, agent: _ } = self;
        mirror.wait().await;
        drop(peer);
    }
}

impl Agent {
    pub async fn start(opts: AgentOptions) -> anyhow::Result<RunningAgent> {
        for sub in ["blobs", "partial"] {
            std::fs::create_dir_all(opts.data_dir.join(sub))?;
        }
        let peer_listener = tokio::net::TcpListener::bind(opts.peer_listen).await?;
        let mirror_listener = tokio::net::TcpListener::bind(opts.mirror_listen).await?;
        let advertise = match &opts.advertise {
            Some(a) => a.clone(),
            None => peer_listener.local_addr()?.to_string(),
        };
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()?;
        let metrics = Arc::new(Metrics::default());
        let agent = Arc::new(Agent {
            peer_cap: crate::cap::RequestCap::new(opts.max_requests, metrics.clone()),
            peer_id: format!("{:016x}", rand::random::<u64>()),
            advertise,
            http,
            transfers: Default::default(),
            banned: Default::default(),
            up: Arc::new(RateLimiter::new(opts.rate_up)),
            upload_slots: Arc::new(tokio::sync::Semaphore::new(crate::limit::UPLOAD_SLOTS)),
            down: Arc::new(RateLimiter::new(opts.rate_down)),
            metrics,
            stop,
            opts,
        });
        let peer_listener =
            crate::cap::CappedListener::for_requests(peer_listener, agent.opts.max_requests, agent.metrics.clone());
        let peer = Running::start(peer_listener, mirror::peer_router(&agent), "agent peer API");
        let mirror = Running::start(mirror_listener, mirror::mirror_router(&agent), "agent mirror");
        // Stop background tasks when either server is stopped.
        let (mut a, mut b) = (peer.stopped(), mirror.stopped());
        tokio::spawn(async move {
            tokio::select! {
                _ = a.wait_for(|s| *s) => {}
                _ = b.wait_for(|s| *s) => {}
            }
            let _ = stop_tx.send(true);
        });
        tokio::spawn(transfer::announce_seeds(agent.clone()));
        let a = agent.clone();
        tokio::spawn(async move { cache::evict(&a).await });
        Ok(RunningAgent { agent, mirror, peer })
    }

    pub fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.opts.data_dir.join("blobs").join(d.hex())
    }

    fn partial_path(&self, d: &Digest) -> PathBuf {
        self.opts.data_dir.join("partial").join(d.hex())
    }

    pub fn is_banned(&self, addr: &str) -> bool {
        let b = self.banned.lock().unwrap_or_else(|p| p.into_inner());
        b.get(addr).is_some_and(|(until, _)| Instant::now() < *until)
    }

    /// The peers dropped for bad bytes and still banned.
    pub fn dropped_for_bad_bytes(&self) -> Vec<String> {
        let now = Instant::now();
        let b = self.banned.lock().unwrap_or_else(|p| p.into_inner());
        b.iter().filter(|(_, (until, bad))| *bad && now < *until).map(|(a, _)| a.clone()).collect()
    }

    pub fn ban(&self, addr: &str) {
        let mut b = self.banned.lock().unwrap_or_else(|p| p.into_inner());
        let until = Instant::now() + BAN;
        if b.get(addr).is_some_and(|(t, bad)| *bad && *t >= until - Duration::from_secs(1)) {
            return;
        }
        tracing::warn!("agent: dropping peer {addr}: it served bytes that do not match their hash");
        self.metrics.add(crate::metrics::M::PeersDropped, 1);
        b.insert(addr.to_string(), (until, true));
    }

    /// `addr` refused a connection: leave it out for [`UNREACHABLE`] (a ban stays).
    pub fn unreachable(&self, addr: &str) {
        let mut b = self.banned.lock().unwrap_or_else(|p| p.into_inner());
        let until = Instant::now() + UNREACHABLE;
        if b.get(addr).is_some_and(|(t, _)| *t >= until) {
            return;
        }
        tracing::info!("agent: peer {addr} refused the connection; leaving it out for {UNREACHABLE:?}");
        b.insert(addr.to_string(), (until, false));
    }

    fn auth(&self) -> String {
        self.opts.secret.header_value()
    }

    /// The transfer for `d`: running, complete on disk, or started now.
    pub async fn transfer(self: &Arc<Self>, name: &str, d: &Digest) -> Result<Arc<Transfer>, transfer::FetchError> {
        let mut map = self.transfers.lock().await;
        if let Some(t) = map.get(d) {
            if t.failure().is_none() {
                return Ok(t.clone());
            }
        }
        let t = match Transfer::load_complete(self, d) {
            Some(t) => Arc::new(t),
            None => {
                let t = Arc::new(Transfer::begin(self, name, d).await?);
                tokio::spawn(transfer::drive(self.clone(), t.clone()));
                t
            }
        };
        map.insert(d.clone(), t.clone());
        Ok(t)
    }

    /// A transfer already known (for serving peers).
    pub async fn known_transfer(&self, d: &Digest) -> Option<Arc<Transfer>> {
        self.transfers.lock().await.get(d).cloned()
    }

    async fn all_transfers(&self) -> Vec<Arc<Transfer>> {
        self.transfers.lock().await.values().cloned().collect()
    }
}
