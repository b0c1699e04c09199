//! `mwdist origin`: the seed. Reads each blob once from upstream into a disk cache,
//! hashing every piece as it streams in and serving pieces as soon as they are hashed;
//! the whole blob is checked against its digest before it counts as complete (a wrong
//! blob is discarded and reported to everyone asking, never marked good). Also hosts the
//! tracker, resolves manifests for agents and serves whole blobs (the no-P2P baseline).
//!
//! Invariants: `BlobState::hashes[i]` exists only once piece `i` is on disk; `complete`
//! only after the digest matched and the file was renamed into `blobs/`.

use crate::api::{self, registry_error, PIECE_INDEX, PIECE_SHA256};
use crate::auth::{self, Secret};
use crate::cap::{self, RequestCap};
use crate::engine::origin_choose;
use crate::limit::{throttled_body, RateLimiter};
use crate::metrics::{Metrics, M};
use crate::pieces::{Bitfield, Geometry, PieceManifest};
use crate::server::Running;
use crate::tracker::{Tracker, TrackerLink};
use crate::upstream::{Upstream, UpstreamError};
use crate::v2::{self, V2Path};
use axum::extract::{Path as AxPath, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::StreamExt as _;
use oci_core::Digest;
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// How long a `seed` request waits for the upstream stream to produce a new piece.
const SEED_WAIT: Duration = Duration::from_secs(2);
/// Pieces the origin uploads at once: each new piece should reach the swarm as soon as
/// possible so that peers can pass it on. One at full rate; the token bucket's burst
/// covers the gap before the next queued request starts.
const SEED_SLOTS: usize = 1;
/// A piece already sent is sent again only if no peer announced it for this long (its
/// first recipient may have died): each piece leaves the origin about once.
const RESEND_AFTER: Duration = Duration::from_millis(1500);
/// Holders a piece may have (dead or dropped by the requester) and still go out again
/// after [`RESEND_AFTER`]; each further holder adds [`RESEND_AFTER`].
const RESEND_HOLDERS: u32 = 2;
/// How long a `seed` request waits for an upload slot (less than the agents' watchdog).
const SEED_QUEUE_WAIT: Duration = Duration::from_millis(1000);

#[derive(Debug, Clone)]
pub struct OriginOptions {
    pub listen: SocketAddr,
    pub upstream: Upstream,
    pub cache_dir: PathBuf,
    pub secret: Secret,
    /// Upload cap, bytes/s.
    pub rate_up: Option<u64>,
    /// Requests handled at once; more get `503` (see [`crate::cap`]).
    pub max_requests: usize,
    /// Disk bound for complete blobs in `cache_dir` (least recently used evicted first,
    /// never one being served); `None`: unbounded.
    pub cache_max: Option<u64>,
    /// A shared tracker (`host:port`: another origin, or `mwdist tracker`) instead of
    /// this origin's own.
    pub tracker: Option<String>,
}

pub struct Origin {
    upstream: Upstream,
    cache_dir: PathBuf,
    cache_max: Option<u64>,
    blobs: tokio::sync::Mutex<HashMap<Digest, Arc<Blob>>>,
    pub tracker: Arc<TrackerLink>,
    up: Arc<RateLimiter>,
    /// Concurrent piece uploads (see [`crate::limit::UPLOAD_SLOTS`]).
    slots: Arc<tokio::sync::Semaphore>,
    pub metrics: Arc<Metrics>,
    cap: RequestCap,
}

/// One blob, being fetched or complete.
pub struct Blob {
    pub digest: Digest,
    pub geo: Geometry,
    file: std::fs::File,
    state: Mutex<BlobState>,
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct BlobState {
    hashes: Vec<String>,
    complete: bool,
    failed: Option<String>,
    served: Vec<u32>,
    /// When each piece was last sent, and to whom (the requester's peer address).
    last_served: Vec<Option<(std::time::Instant, Option<String>)>>,
}

impl Blob {
    fn manifest(&self) -> PieceManifest {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        PieceManifest {
            size: self.geo.size,
            piece_size: self.geo.piece_size,
            hashes: s.hashes.clone(),
            complete: s.complete,
            failed: s.failed.clone(),
        }
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Wait until piece `i` is hashed; its hash, or why it never will be.
    pub async fn wait_piece(&self, i: usize) -> Result<String, String> {
        let mut rx = self.changed.subscribe();
        loop {
            {
                let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(h) = s.hashes.get(i) {
                    return Ok(h.clone());
                }
                if let Some(f) = &s.failed {
                    return Err(f.clone());
                }
            }
            if rx.changed().await.is_err() {
                return Err("the origin stopped fetching the blob".into());
            }
        }
    }

    /// Mark the blob as just used (for eviction).
    fn touch(&self) {
        let _ = self.file.set_modified(std::time::SystemTime::now());
    }

    pub fn read_piece(&self, i: usize) -> std::io::Result<Vec<u8>> {
        let (start, end) = self.geo.range(i);
        crate::disk::read_at(&self.file, start, end - start)
    }
}

impl Origin {
    pub fn new(opts: &OriginOptions) -> anyhow::Result<Arc<Self>> {
        for sub in ["blobs", "partial", "pieces"] {
            std::fs::create_dir_all(opts.cache_dir.join(sub))?;
        }
        let metrics = Arc::new(Metrics::default());
        Ok(Arc::new(Origin {
            cap: RequestCap::new(opts.max_requests, metrics.clone()),
            upstream: opts.upstream.clone(),
            cache_dir: opts.cache_dir.clone(),
            cache_max: opts.cache_max,
            blobs: Default::default(),
            tracker: Arc::new(match &opts.tracker {
                Some(addr) => TrackerLink::remote(addr, opts.secret.clone())?,
                None => TrackerLink::Local(Tracker::default()),
            }),
            up: Arc::new(RateLimiter::new(opts.rate_up)),
            slots: Arc::new(tokio::sync::Semaphore::new(SEED_SLOTS)),
            metrics,
        }))
    }

    /// The blob `d` (of repository `name`), from memory, the disk cache, or a new fetch.
    pub async fn blob(self: &Arc<Self>, name: &str, d: &Digest) -> Result<Arc<Blob>, UpstreamError> {
        let mut blobs = self.blobs.lock().await;
        if let Some(b) = blobs.get(d) {
            let failed = b.state.lock().unwrap_or_else(|p| p.into_inner()).failed.is_some();
            if !failed {
                b.touch();
                return Ok(b.clone());
            }
        }
        let b = match self.load_cached(d) {
            Some(b) => b,
            None => self.start_fetch(name, d).await?,
        };
        b.touch();
        blobs.insert(d.clone(), b.clone());
        Ok(b)
    }

    /// Evict least-recently-used complete blobs until `blobs/` holds at most
    /// `--cache-max` bytes. A blob someone holds (a response streaming it, a piece being
    /// sent, its fetch) is never evicted: the bound may be exceeded until it is released.
    /// Recency is the blob file's mtime, set on every use, so it survives restarts.
    pub async fn evict(&self) -> u64 {
        let Some(max) = self.cache_max else { return 0 };
        let dir = self.cache_dir.join("blobs");
        let mut blobs = self.blobs.lock().await;
        let mut files = crate::disk::list_blobs(&dir);
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        let mut freed = 0;
        for (_, size, d) in files {
            if total <= max {
                break;
            }
            // The map holds one reference; any other is a request or fetch using it.
            if blobs.get(&d).is_some_and(|b| Arc::strong_count(b) > 1) {
                continue;
            }
            match std::fs::remove_file(dir.join(d.hex())) {
                Ok(()) => {
                    let _ = std::fs::remove_file(self.pieces_path(&d));
                    blobs.remove(&d);
                    self.metrics.add(M::BlobsEvicted, 1);
                    tracing::info!("origin: evicted {d} ({size} bytes) to stay under {max} bytes");
                    total -= size;
                    freed += size;
                }
                Err(e) => tracing::warn!("origin: cannot evict {}: {e}", dir.join(d.hex()).display()),
            }
        }
        if total > max {
            tracing::info!("origin: cache holds {total} bytes, over {max}: the rest is in use");
        }
        freed
    }

    fn load_cached(&self, d: &Digest) -> Option<Arc<Blob>> {
        let path = self.cache_dir.join("blobs").join(d.hex());
        let m: PieceManifest = serde_json::from_slice(&std::fs::read(self.pieces_path(d)).ok()?).ok()?;
        m.check().ok()?;
        let (actual, size) = crate::disk::digest_file(&path).ok()?;
        if &actual != d || size != m.size || !m.complete {
            tracing::warn!("origin cache: {d} is corrupt; fetching it again");
            let _ = std::fs::remove_file(&path);
            return None;
        }
        let file = std::fs::File::open(&path).ok()?;
        let served = vec![0; m.hashes.len()];
        let geo = m.geometry();
        let last_served = vec![None; served.len()];
        let state = BlobState { hashes: m.hashes, complete: true, failed: None, served, last_served };
        Some(Arc::new(Blob { digest: d.clone(), geo, file, state: Mutex::new(state), changed: watch::channel(0).0 }))
    }

    fn pieces_path(&self, d: &Digest) -> PathBuf {
        self.cache_dir.join("pieces").join(format!("{}.json", d.hex()))
    }

    async fn start_fetch(self: &Arc<Self>, name: &str, d: &Digest) -> Result<Arc<Blob>, UpstreamError> {
        let (size, stream) = self.upstream.open_blob(name, d).await?;
        let partial = self.cache_dir.join("partial").join(d.hex());
        let io = |e: std::io::Error| UpstreamError::Layout(format!("origin cache {}: {e}", partial.display()));
        let writer = std::fs::File::create(&partial).map_err(io)?;
        let file = std::fs::File::open(&partial).map_err(io)?;
        let geo = Geometry::for_size(size);
        let state =
            BlobState { served: vec![0; geo.count()], last_served: vec![None; geo.count()], ..Default::default() };
        let blob =
            Arc::new(Blob { digest: d.clone(), geo, file, state: Mutex::new(state), changed: watch::channel(0).0 });
        let (me, b) = (self.clone(), blob.clone());
        tokio::spawn(async move {
            match me.fetch(&b, writer, stream, partial.clone()).await {
                Ok(()) => {
                    drop(b);
                    me.evict().await;
                }
                Err(why) => {
                    tracing::error!("origin: blob {}: {why}", b.digest);
                    let _ = std::fs::remove_file(&partial);
                    b.state.lock().unwrap_or_else(|p| p.into_inner()).failed = Some(why);
                    b.bump();
                }
            }
        });
        Ok(blob)
    }

    async fn fetch(
        &self,
        b: &Blob,
        mut w: std::fs::File,
        mut stream: crate::upstream::ChunkStream,
        partial: PathBuf,
    ) -> Result<(), String> {
        let (mut whole, mut piece) = (Sha256::new(), Sha256::new());
        let (mut total, mut in_piece, mut index) = (0u64, 0u64, 0usize);
        let io = |e: std::io::Error| format!("writing the origin cache: {e}");
        while let Some(chunk) = stream.next().await {
            let mut chunk = chunk?;
            self.metrics.add(M::BytesDownUpstream, chunk.len() as u64);
            if total + chunk.len() as u64 > b.geo.size {
                return Err(format!("upstream sent more than the announced {} bytes", b.geo.size));
            }
            w.write_all(&chunk).map_err(io)?;
            whole.update(&chunk);
            total += chunk.len() as u64;
            while !chunk.is_empty() {
                let take = (b.geo.len_of(index) - in_piece).min(chunk.len() as u64) as usize;
                piece.update(&chunk[..take]);
                in_piece += take as u64;
                let _ = chunk.split_to(take);
                if in_piece == b.geo.len_of(index) {
                    w.flush().map_err(io)?;
                    let h = hex::encode(std::mem::take(&mut piece).finalize());
                    b.state.lock().unwrap_or_else(|p| p.into_inner()).hashes.push(h);
                    b.bump();
                    (index, in_piece) = (index + 1, 0);
                }
            }
        }
        if total != b.geo.size {
            return Err(format!("upstream sent {total} of {} bytes", b.geo.size));
        }
        let actual = Digest::from_sha256(whole.finalize().into());
        if actual != b.digest {
            return Err(format!("upstream sent a wrong blob: its bytes hash to {actual}; not serving it"));
        }
        w.sync_all().map_err(io)?;
        std::fs::rename(&partial, self.cache_dir.join("blobs").join(b.digest.hex())).map_err(io)?;
        let manifest = PieceManifest { complete: true, ..b.manifest() };
        let json = serde_json::to_vec(&manifest).map_err(|e| e.to_string())?;
        std::fs::write(self.pieces_path(&b.digest), json).map_err(io)?;
        b.state.lock().unwrap_or_else(|p| p.into_inner()).complete = true;
        b.bump();
        tracing::info!("origin: blob {} complete and verified ({} bytes)", b.digest, total);
        Ok(())
    }

    pub fn router(self: &Arc<Self>, secret: Secret) -> Router {
        let authed = Router::new()
            .route("/v2/", get(|| async { Json(serde_json::json!({})) }))
            .route("/v2/{*rest}", get(v2_handler).head(v2_handler))
            .route("/dist/v1/pieces/{digest}", get(pieces_handler))
            .route("/dist/v1/seed/{digest}", get(seed_handler))
            .with_state(self.clone())
            .merge(crate::tracker::routes(self.tracker.clone()))
            .layer(axum::middleware::from_fn_with_state(secret, auth::require))
            .layer(axum::middleware::from_fn_with_state(self.cap.clone(), cap::limit));
        let me = self.clone();
        authed.route("/metrics", get(move || async move { me.metrics.render("origin") }))
    }

    pub async fn serve(opts: &OriginOptions) -> anyhow::Result<(Arc<Self>, Running)> {
        let o = Self::new(opts)?;
        o.evict().await;
        let r =
            Running::bind(opts.listen, o.router(opts.secret.clone()), "origin", opts.max_requests, o.metrics.clone())
                .await?;
        Ok((o, r))
    }
}

fn upstream_error(e: &UpstreamError, code: &str) -> Response {
    match e {
        UpstreamError::NotFound(_) | UpstreamError::OtherRepo { .. } => {
            registry_error(StatusCode::NOT_FOUND, code, &e.to_string())
        }
        _ => registry_error(StatusCode::BAD_GATEWAY, "UNAVAILABLE", &format!("{e:#}")),
    }
}

#[derive(serde::Deserialize)]
struct NameQuery {
    name: String,
    skip: Option<String>,
}

fn parse_digest(s: &str) -> Result<Digest, Box<Response>> {
    s.parse().map_err(|e| Box::new(registry_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", &format!("{e}"))))
}

async fn pieces_handler(
    State(o): State<Arc<Origin>>,
    AxPath(d): AxPath<String>,
    Query(q): Query<NameQuery>,
) -> Response {
    let d = match parse_digest(&d) {
        Ok(d) => d,
        Err(r) => return *r,
    };
    match o.blob(&q.name, &d).await {
        Ok(b) => Json(b.manifest()).into_response(),
        Err(e) => upstream_error(&e, "BLOB_UNKNOWN"),
    }
}

/// Super-seeding: send the requester a piece it lacks that the swarm has fewest of.
/// A requester the swarm reports for bad bytes gets only pieces sent before (presumed
/// lost): every new piece it received would be lost to the others, who drop it.
async fn seed_handler(
    State(o): State<Arc<Origin>>,
    AxPath(d): AxPath<String>,
    Query(q): Query<NameQuery>,
    headers: axum::http::HeaderMap,
) -> Response {
    let requester = headers.get(crate::api::PEER_ADDR).and_then(|v| v.to_str().ok()).map(str::to_string);
    let d = match parse_digest(&d) {
        Ok(d) => d,
        Err(r) => return *r,
    };
    let b = match o.blob(&q.name, &d).await {
        Ok(b) => b,
        Err(e) => return upstream_error(&e, "BLOB_UNKNOWN"),
    };
    let n = b.geo.count();
    let Some(skip) = Bitfield::from_hex(q.skip.as_deref().unwrap_or(""), n) else {
        return registry_error(StatusCode::BAD_REQUEST, "BLOB_UNKNOWN", "skip bitfield does not match the piece count");
    };
    // Choose the piece once an upload slot is free, with the freshest swarm view. A
    // requester that waited too long is sent away (it asks again soon, with a fresher view).
    let Ok(Ok(permit)) = tokio::time::timeout(SEED_QUEUE_WAIT, o.slots.clone().acquire_owned()).await else {
        return StatusCode::NO_CONTENT.into_response();
    };
    let mut rx = b.changed.subscribe();
    let deadline = tokio::time::Instant::now() + SEED_WAIT;
    let (i, hash) = loop {
        let crate::tracker::Availability { copies: avail, suspects } = o.tracker.availability(&d.to_string(), n).await;
        let suspect = requester.as_ref().is_some_and(|r| suspects.contains(r));
        {
            let mut s = b.state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(f) = &s.failed {
                return registry_error(StatusCode::BAD_GATEWAY, "BLOB_UNKNOWN", f);
            }
            // The requester skips what it has, is fetching, or can get from a peer it
            // trusts. A piece goes out again only once its last copy left long enough
            // ago to be presumed lost (or held only by peers the requester dropped);
            // the more live peers announced it, the longer: the requester knows only a
            // sample of the swarm, the tracker knows it all.
            let mut skip = skip.clone();
            // A piece last sent to a peer now reported for bad bytes is lost at once.
            for (i, last) in s.last_served.iter().enumerate() {
                let holders = avail.get(i).copied().unwrap_or(0).saturating_sub(RESEND_HOLDERS);
                let fresh = last.as_ref().is_some_and(|(t, to)| {
                    t.elapsed() < RESEND_AFTER * (1 + holders) && !to.as_ref().is_some_and(|a| suspects.contains(a))
                });
                if fresh || (suspect && last.is_none()) {
                    skip.set(i);
                }
            }
            if let Some(i) = origin_choose(s.hashes.len(), &skip, &avail, &s.served) {
                s.served[i] += 1;
                s.last_served[i] = Some((std::time::Instant::now(), requester.clone()));
                break (i, s.hashes[i].clone());
            }
            // A suspect does not hold the slot waiting for new pieces it would not get.
            if s.complete || suspect {
                return StatusCode::NO_CONTENT.into_response();
            }
        }
        if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
            return StatusCode::NO_CONTENT.into_response();
        }
    };
    match b.read_piece(i) {
        Ok(bytes) => (
            [(PIECE_INDEX, i.to_string()), (PIECE_SHA256, hash)],
            throttled_body(bytes.into(), o.up.clone(), o.metrics.clone(), M::BytesUpPeers, Some(permit)),
        )
            .into_response(),
        Err(e) => registry_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", &format!("reading piece {i}: {e}")),
    }
}

/// The distribution pull API on the origin: manifests from upstream, blobs from the
/// cache as they arrive (the no-P2P path, also used by `mwdist bench` as its baseline).
async fn v2_handler(
    State(o): State<Arc<Origin>>,
    method: Method,
    AxPath(rest): AxPath<String>,
    _h: HeaderMap,
) -> Response {
    match v2::parse_path(&rest) {
        Some(V2Path::Manifest { name, reference }) => match o.upstream.manifest(&name, &reference).await {
            Ok(m) => v2::manifest_response(&method, &m.bytes, &m.media_type, &m.digest),
            Err(e) => upstream_error(&e, "MANIFEST_UNKNOWN"),
        },
        Some(V2Path::Blob { name, digest }) => {
            let b = match o.blob(&name, &digest).await {
                Ok(b) => b,
                Err(e) => return upstream_error(&e, "BLOB_UNKNOWN"),
            };
            let headers = v2::blob_headers(&b.digest, b.geo.size, None);
            if method == Method::HEAD {
                return (StatusCode::OK, headers).into_response();
            }
            let s = futures_util::stream::iter(0..b.geo.count()).then(move |i| {
                let (b, o) = (b.clone(), o.clone());
                async move {
                    b.wait_piece(i).await.map_err(std::io::Error::other)?;
                    let bytes = b.read_piece(i)?;
                    for c in bytes.chunks(crate::limit::CHUNK) {
                        o.up.acquire(c.len()).await;
                    }
                    o.metrics.add(M::BytesUpClients, bytes.len() as u64);
                    Ok::<_, std::io::Error>(bytes::Bytes::from(bytes))
                }
            });
            (StatusCode::OK, headers, axum::body::Body::from_stream(s)).into_response()
        }
        None => registry_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", "not a distribution API path"),
    }
}

/// Used by agents: the piece manifest URL for a blob.
pub fn pieces_url(origin: &str, d: &Digest, name: &str) -> String {
    format!("http://{origin}/dist/v1/pieces/{d}?name={}", api::query_escape(name))
}
