//! One blob being fetched by an agent: the piece bitfield, the known piece hashes, and
//! the driver task that plans requests with [`crate::engine`], fetches pieces from peers
//! and the origin, verifies each against its SHA-256 before writing it, drops peers that
//! send bad bytes, re-plans when nothing progressed for [`WATCHDOG`], and verifies the
//! whole blob before renaming it into place.
//!
//! Invariants: `have[i]` is set only after piece `i` matched its hash and was written;
//! `done` only after the whole file matched the digest and was renamed into `blobs/`.

use super::Agent;
use crate::engine::{self, Limits, Pick};
use crate::metrics::M;
use crate::pieces::{piece_hash, Bitfield, Geometry};
use bytes::Bytes;
use oci_core::Digest;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Re-plan when no piece arrived for this long.
pub const WATCHDOG: Duration = Duration::from_secs(2);
/// Give up (and tell the client) when nothing arrived for this long.
pub const GIVE_UP: Duration = Duration::from_secs(30);
const ANNOUNCE_EVERY: Duration = Duration::from_millis(250);
/// After a piece from the origin arrived (only we have it), announce after this long
/// rather than [`ANNOUNCE_EVERY`].
const ANNOUNCE_SOON: Duration = Duration::from_millis(50);
/// How long to leave the origin alone after it had no piece for us.
const ORIGIN_QUIET: Duration = Duration::from_millis(200);
const SEED_ANNOUNCE_EVERY: Duration = Duration::from_secs(2);
/// A peer that refused (all upload slots taken) is left alone this long.
/// Requests to peers in flight at most, and to one peer.
pub const MAX_INFLIGHT: usize = 12;
pub const PER_PEER: usize = 3;
const BUSY_BACKOFF: Duration = Duration::from_millis(60);
/// Pieces hashed into the whole-blob digest per round of the driver at most.
const PREFIX_STEP: usize = 8;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
}

pub struct Transfer {
    pub digest: Digest,
    pub name: String,
    pub geo: Geometry,
    file: std::fs::File,
    state: Mutex<TState>,
    changed: watch::Sender<u64>,
    started: Instant,
    /// Bytes received for this blob (including bytes of pieces later rejected): the
    /// watchdog's measure of progress, so that slow but moving pieces are not aborted.
    received: std::sync::atomic::AtomicU64,
    /// Bitfields heard from peers that asked us for pieces (address → hex), newest only;
    /// the driver takes them, so that it learns of new pieces without waiting for the
    /// tracker.
    heard: Mutex<HashMap<String, String>>,
}

struct TState {
    have: Bitfield,
    hashes: Vec<Option<String>>,
    done: bool,
    failed: Option<String>,
}

impl Transfer {
    /// A blob already complete on disk (verified again before it is trusted).
    pub fn load_complete(agent: &Agent, d: &Digest) -> Option<Transfer> {
        let path = agent.blob_path(d);
        let (actual, size) = crate::disk::digest_file(&path).ok()?;
        if &actual != d {
            let _ = std::fs::remove_file(&path);
            return None;
        }
        let geo = Geometry::for_size(size);
        let state =
            TState { have: Bitfield::full(geo.count()), hashes: vec![None; geo.count()], done: true, failed: None };
        Some(Transfer {
            digest: d.clone(),
            name: String::new(),
            geo,
            file: std::fs::File::open(&path).ok()?,
            state: Mutex::new(state),
            changed: watch::channel(0).0,
            started: Instant::now(),
            received: Default::default(),
            heard: Default::default(),
        })
    }

    /// Start fetching: ask the origin for the piece manifest, open the partial file
    /// (keeping the pieces of an earlier run that still match their hashes).
    pub async fn begin(agent: &Agent, name: &str, d: &Digest) -> Result<Transfer, FetchError> {
        let m = fetch_manifest(agent, name, d).await?;
        let path = agent.partial_path(d);
        let storage = |e: std::io::Error| FetchError::Unavailable(format!("agent storage {}: {e}", path.display()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(storage)?;
        let earlier = file.metadata().map_err(storage)?.len() == m.size && m.size > 0;
        if !earlier {
            file.set_len(0).and_then(|()| file.set_len(m.size)).map_err(storage)?;
        }
        let geo = m.geometry();
        let mut hashes = vec![None; geo.count()];
        for (slot, h) in hashes.iter_mut().zip(m.hashes) {
            *slot = Some(h);
        }
        let have = if earlier {
            let (f, hs) = (file.try_clone().map_err(storage)?, hashes.clone());
            tokio::task::spawn_blocking(move || super::resume::verified_pieces(&f, &geo, &hs))
                .await
                .map_err(|e| FetchError::Unavailable(format!("checking {}: {e}", path.display())))?
        } else {
            Bitfield::new(geo.count())
        };
        if have.count() > 0 {
            agent.metrics.add(M::PiecesResumed, have.count() as u64);
            tracing::info!(
                "agent: {d}: {} of {} pieces already verified in {}",
                have.count(),
                have.len(),
                path.display()
            );
        }
        let state = TState { have, hashes, done: false, failed: None };
        Ok(Transfer {
            digest: d.clone(),
            name: name.to_string(),
            geo,
            file,
            state: Mutex::new(state),
            changed: watch::channel(0).0,
            started: Instant::now(),
            received: Default::default(),
            heard: Default::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    pub fn is_done(&self) -> bool {
        self.lock().done
    }

    /// Mark the blob as just used (for LRU eviction).
    pub fn touch(&self) {
        super::cache::touch(&self.file);
    }

    pub fn have_hex(&self) -> String {
        self.lock().have.to_hex()
    }

    pub fn has(&self, i: usize) -> bool {
        self.lock().have.get(i)
    }

    /// Record the bitfield a requesting peer sent along (see [`crate::api::PEER_ADDR`]).
    pub fn heard_from(&self, addr: &str, have_hex: &str) {
        if self.is_done() {
            return;
        }
        let mut h = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        h.insert(addr.to_string(), have_hex.to_string());
    }

    fn take_heard(&self) -> HashMap<String, String> {
        std::mem::take(&mut *self.heard.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    fn fail(&self, why: String) {
        self.lock().failed = Some(why);
        self.bump();
    }

    /// Wait for piece `i` to be verified, then read it.
    pub async fn read_piece_when_ready(&self, i: usize) -> Result<Vec<u8>, String> {
        let mut rx = self.changed.subscribe();
        loop {
            {
                let s = self.lock();
                if let Some(f) = &s.failed {
                    return Err(f.clone());
                }
                if s.have.get(i) {
                    break;
                }
            }
            if rx.changed().await.is_err() {
                return Err("the transfer stopped".into());
            }
        }
        self.read_piece(i).map_err(|e| format!("reading piece {i}: {e}"))
    }

    pub fn read_piece(&self, i: usize) -> std::io::Result<Vec<u8>> {
        let (s, e) = self.geo.range(i);
        crate::disk::read_at(&self.file, s, e - s)
    }

    /// Wait until the blob is complete and verified (or failed).
    pub async fn wait_done(&self) -> Result<(), String> {
        let mut rx = self.changed.subscribe();
        loop {
            {
                let s = self.lock();
                if let Some(f) = &s.failed {
                    return Err(f.clone());
                }
                if s.done {
                    return Ok(());
                }
            }
            if rx.changed().await.is_err() {
                return Err("the transfer stopped".into());
            }
        }
    }
}

mod fetch;
mod swarm;

use crate::api::AnnounceReply;
pub use fetch::announce_seeds;
use fetch::{announce, fetch_from_origin, fetch_from_peer, fetch_manifest, Got, Outcome, Reply, Source};

/// What woke the driver.
enum Event {
    Done(Option<Result<Outcome, tokio::task::JoinError>>),
    Announced(Result<Result<AnnounceReply, String>, tokio::task::JoinError>),
    Tick,
}

/// The announcement in flight, if any (never ready when there is none).
async fn join_opt<T>(h: &mut Option<tokio::task::JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match h {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

/// The expected hash of piece `i`: known, claimed by the origin itself, or fetched anew.
async fn expected_hash(agent: &Agent, t: &Transfer, i: usize, claimed: Option<String>, src: &Source) -> Option<String> {
    if let Some(h) = t.lock().hashes.get(i).cloned().flatten() {
        return Some(h);
    }
    if *src == Source::Origin {
        return claimed;
    }
    let m = fetch_manifest(agent, &t.name, &t.digest).await.ok()?;
    let mut s = t.lock();
    for (slot, h) in s.hashes.iter_mut().zip(m.hashes) {
        slot.get_or_insert(h);
    }
    s.hashes.get(i).cloned().flatten()
}

/// The driver: runs until the blob is complete and verified, failed, or the agent stops.
pub async fn drive(agent: Arc<Agent>, t: Arc<Transfer>) {
    agent.metrics.add(M::ActiveTransfers, 1);
    let r = drive_inner(&agent, &t).await;
    agent.metrics.sub(M::ActiveTransfers, 1);
    match r {
        Ok(()) => {
            agent.metrics.add(M::TransfersCompleted, 1);
            agent.metrics.add(M::CompletionMillisSum, t.started.elapsed().as_millis() as u64);
            tracing::info!("agent: {} complete and verified in {:?}", t.digest, t.started.elapsed());
            super::cache::evict(&agent).await;
        }
        Err(why) => {
            agent.metrics.add(M::TransfersFailed, 1);
            tracing::error!("agent: {}: {why}", t.digest);
            // A stopping agent keeps its verified pieces for the next start.
            if !agent.stopping() {
                let _ = std::fs::remove_file(agent.partial_path(&t.digest));
            }
            t.fail(why);
        }
    }
}

async fn drive_inner(agent: &Arc<Agent>, t: &Arc<Transfer>) -> Result<(), String> {
    let n = t.geo.count();
    let salt: u64 = rand::random();
    // Keep up to about a second of downloading requested: peers queue requests briefly,
    // so that several requests per peer keep its link busy between pieces, while each
    // peer serves only a couple at a time (a piece can be passed on once it is whole).
    let mut limits = Limits { max_inflight: MAX_INFLIGHT, per_peer: PER_PEER, ..Limits::default() };
    if let Some(rate) = agent.down.rate() {
        let fit = usize::try_from(rate / t.geo.piece_size.max(1)).unwrap_or(usize::MAX);
        limits.max_inflight = fit.clamp(2, MAX_INFLIGHT);
    }
    let mut last_received = 0u64;
    let mut last_piece = Instant::now();
    let mut peers = swarm::Swarm::new(n);
    let mut pending = vec![0u8; n];
    let mut origin_inflight = 0usize;
    let mut origin_quiet_until = Instant::now();
    let mut tasks: JoinSet<Outcome> = JoinSet::new();
    let mut last_announce: Option<Instant> = None;
    let mut announcing: Option<tokio::task::JoinHandle<Result<AnnounceReply, String>>> = None;
    // A piece from the origin is new to the swarm: tell the tracker soon.
    let mut announce_soon = false;
    let mut last_progress = Instant::now();
    let mut last_check = Instant::now() - WATCHDOG;
    let mut stop = agent.stop.clone();
    let mut outcomes: Vec<Outcome> = Vec::new();
    // The whole-blob digest, over the pieces on disk from the first up to the first
    // missing one, so that little is left to hash when the last piece arrives.
    let mut whole = Prefix::default();
    loop {
        if agent.stopping() {
            return Err("the agent is stopping".into());
        }
        let have = t.lock().have.clone();
        if have.is_full() {
            break;
        }
        // Announce in the background: the planning goes on while the tracker answers.
        let due = last_announce
            .is_none_or(|l| l.elapsed() >= ANNOUNCE_EVERY || (announce_soon && l.elapsed() >= ANNOUNCE_SOON));
        if announcing.is_none() && due {
            (last_announce, announce_soon) = (Some(Instant::now()), false);
            let (a, tr) = (agent.clone(), t.clone());
            announcing = Some(tokio::spawn(async move { announce(&a, &tr).await }));
        }
        for (a, hex) in t.take_heard() {
            if a == agent.advertise || agent.is_banned(&a) {
                continue;
            }
            if let Some(b) = Bitfield::from_hex(&hex, n) {
                peers.set_have(&a, b);
            }
        }
        // Plan as many requests as the limits allow.
        peers.expire_busy(Instant::now());
        loop {
            // After the origin had nothing for us, leave it alone for a moment.
            let origin_view = if Instant::now() < origin_quiet_until { limits.origin_slots } else { origin_inflight };
            let v = engine::View { have: &have, pending: &pending, peers: peers.views(), origin_inflight: origin_view };
            match engine::next_with(&v, peers.avail(), &limits, salt) {
                Some(Pick::Peer { piece, peer }) => {
                    let Some(addr) = peers.addr(peer).map(str::to_string) else { break };
                    peers.inflight_add(peer);
                    pending[piece] = pending[piece].saturating_add(1);
                    tasks.spawn(fetch_from_peer(agent.clone(), t.clone(), addr, piece));
                }
                Some(Pick::Origin) => {
                    // Tell the origin what not to send: what we have, are fetching, or
                    // can get from a peer we have not dropped and that is not refusing
                    // (busy, or at its request cap): the swarm's availability counts
                    // exactly those peers.
                    let mut skip = have.clone();
                    for (i, (&c, &from_peer)) in pending.iter().zip(peers.avail()).enumerate() {
                        if c > 0 || from_peer > 0 {
                            skip.set(i);
                        }
                    }
                    origin_inflight += 1;
                    tasks.spawn(fetch_from_origin(agent.clone(), t.clone(), skip));
                }
                None => break,
            }
        }
        let event = tokio::select! {
            r = tasks.join_next(), if !tasks.is_empty() => Event::Done(r),
            r = join_opt(&mut announcing), if announcing.is_some() => Event::Announced(r),
            _ = tokio::time::sleep(Duration::from_millis(100)) => Event::Tick,
            _ = stop.changed() => Event::Tick,
        };
        match event {
            Event::Done(Some(Ok(o))) => outcomes.push(o),
            Event::Announced(r) => {
                announcing = None;
                match r {
                    Ok(Ok(reply)) => {
                        let fresh: HashMap<String, Bitfield> = reply
                            .peers
                            .into_iter()
                            .filter(|p| p.addr != agent.advertise && !agent.is_banned(&p.addr))
                            .filter_map(|p| Bitfield::from_hex(&p.have, n).map(|b| (p.addr, b)))
                            .collect();
                        peers.retain(|a| fresh.contains_key(a) && !agent.is_banned(a));
                        for (a, b) in fresh {
                            peers.set_have(&a, b);
                        }
                    }
                    Ok(Err(e)) => tracing::debug!("agent: announce for {}: {e}", t.digest),
                    Err(e) => tracing::debug!("agent: announce task for {}: {e}", t.digest),
                }
            }
            _ => {}
        }
        // Take every request that ended meanwhile, then plan once for all of them.
        while let Some(r) = tasks.try_join_next() {
            if let Ok(o) = r {
                outcomes.push(o);
            }
        }
        for (src, asked, result) in outcomes.drain(..) {
            match &src {
                Source::Origin => origin_inflight = origin_inflight.saturating_sub(1),
                Source::Peer(a) => peers.inflight_done(a),
            }
            if let Some(i) = asked {
                pending[i] = pending[i].saturating_sub(1);
            }
            match result {
                Ok(Reply::Piece(Got { i, bytes, claimed, have })) => {
                    if let (Source::Peer(a), Some(h)) = (&src, have.and_then(|h| Bitfield::from_hex(&h, n))) {
                        peers.set_have(a, h);
                    }
                    if accept_piece(agent, t, i, &bytes, claimed, &src).await? {
                        (last_progress, last_piece) = (Instant::now(), Instant::now());
                        if src == Source::Origin {
                            announce_soon = true;
                        }
                    } else if let Source::Peer(a) = &src {
                        agent.ban(a);
                        peers.remove(a);
                    }
                }
                Ok(Reply::Nothing) => origin_quiet_until = Instant::now() + ORIGIN_QUIET,
                Ok(Reply::Unreachable(e)) => {
                    // Its pieces are neither waited for nor held back from the origin.
                    tracing::debug!("agent: {} from {src:?}: {e}", t.digest);
                    if let Source::Peer(a) = &src {
                        agent.unreachable(a);
                        peers.remove(a);
                    }
                }
                Ok(Reply::Busy(have)) => {
                    if let Source::Peer(a) = &src {
                        if let Some(h) = have.and_then(|h| Bitfield::from_hex(&h, n)) {
                            peers.set_have(a, h);
                        }
                        peers.set_busy(a, Instant::now() + BUSY_BACKOFF);
                    }
                }
                Err(e) => {
                    tracing::debug!("agent: {} from {src:?}: {e}", t.digest);
                    if let (Source::Peer(a), Some(i)) = (&src, asked) {
                        peers.lost_piece(a, i);
                    }
                }
            }
        }
        // A few at a time: this runs on the task that plans, and serving peers shares
        // the thread.
        whole.advance(t, PREFIX_STEP).map_err(|e| format!("hashing the blob: {e}"))?;
        let received = t.received.load(std::sync::atomic::Ordering::Relaxed);
        if received != last_received {
            (last_received, last_progress) = (received, Instant::now());
        }
        if last_progress.elapsed() > WATCHDOG && !tasks.is_empty() {
            tracing::info!("agent: {}: no progress for {WATCHDOG:?}; re-planning", t.digest);
            agent.metrics.add(M::WatchdogReplans, 1);
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            pending.iter_mut().for_each(|c| *c = 0);
            peers.clear_inflight();
            origin_inflight = 0;
            last_announce = None;
            last_progress = Instant::now() - WATCHDOG / 2;
        }
        if last_piece.elapsed() > GIVE_UP {
            return Err(format!("no peer and not the origin could serve {} for {GIVE_UP:?}", t.digest));
        }
        // Ask at most once per watchdog period: the piece list is large, and a whole
        // swarm waiting for its first pieces would otherwise keep the origin busy.
        if last_check.elapsed() >= WATCHDOG {
            if let Some(f) = check_origin_failed(agent, t, last_progress).await {
                return Err(f);
            }
            if last_progress.elapsed() >= WATCHDOG {
                last_check = Instant::now();
            }
        }
    }
    finish(agent, t, whole).await
}

/// SHA-256 of the first `pieces` pieces of the partial file, as written.
#[derive(Default)]
struct Prefix {
    hasher: sha2::Sha256,
    pieces: usize,
}

impl Prefix {
    /// Hash up to `max` pieces that follow the prefix and are verified on disk.
    fn advance(&mut self, t: &Transfer, max: usize) -> std::io::Result<()> {
        use sha2::Digest as _;
        let end = self.pieces.saturating_add(max).min(t.geo.count());
        while self.pieces < end && t.has(self.pieces) {
            self.hasher.update(t.read_piece(self.pieces)?);
            self.pieces += 1;
        }
        Ok(())
    }
}

/// When stuck, ask whether the origin found the upstream blob wrong.
async fn check_origin_failed(agent: &Agent, t: &Transfer, last_progress: Instant) -> Option<String> {
    if last_progress.elapsed() < WATCHDOG {
        return None;
    }
    match fetch_manifest(agent, &t.name, &t.digest).await {
        Err(FetchError::Unavailable(e)) if e.contains("cannot serve") => Some(e),
        Err(FetchError::NotFound(e)) => Some(e),
        _ => None,
    }
}

/// Verify a piece and store it. `Ok(false)`: the bytes were bad.
async fn accept_piece(
    agent: &Agent,
    t: &Transfer,
    i: usize,
    bytes: &Bytes,
    claimed: Option<String>,
    src: &Source,
) -> Result<bool, String> {
    if t.has(i) {
        return Ok(true);
    }
    let Some(expected) = expected_hash(agent, t, i, claimed, src).await else {
        return Ok(false);
    };
    if bytes.len() as u64 != t.geo.len_of(i) || piece_hash(bytes) != expected {
        agent.metrics.add(M::PiecesRejected, 1);
        tracing::warn!("agent: {} piece {i} from {src:?} does not match its hash", t.digest);
        return Ok(false);
    }
    let (start, _) = t.geo.range(i);
    crate::disk::write_at(&t.file, start, bytes).map_err(|e| format!("writing piece {i}: {e}"))?;
    agent.metrics.add(M::PiecesVerified, 1);
    {
        let mut s = t.lock();
        s.have.set(i);
        if let Some(slot) = s.hashes.get_mut(i) {
            slot.get_or_insert(expected);
        }
    }
    t.bump();
    Ok(true)
}

/// Verify the whole blob (hashing what the prefix has not covered yet, from the file)
/// and rename it into place.
async fn finish(agent: &Agent, t: &Arc<Transfer>, mut whole: Prefix) -> Result<(), String> {
    let partial = agent.partial_path(&t.digest);
    tracing::debug!(
        "agent: {}: {} of {} pieces hashed before the last one came",
        t.digest,
        whole.pieces,
        t.geo.count()
    );
    let tr = t.clone();
    let (actual, size) = tokio::task::spawn_blocking(move || {
        use sha2::Digest as _;
        whole.advance(&tr, usize::MAX)?;
        let size = tr.file.metadata()?.len();
        Ok::<_, std::io::Error>((oci_core::Digest::from_sha256(whole.hasher.finalize().into()), size))
    })
    .await
    .map_err(|e| format!("hashing task: {e}"))?
    .map_err(|e| format!("hashing {}: {e}", partial.display()))?;
    if actual != t.digest || size != t.geo.size {
        return Err(format!("the assembled blob hashes to {actual} ({size} bytes); discarded"));
    }
    std::fs::rename(&partial, agent.blob_path(&t.digest)).map_err(|e| format!("storing the blob: {e}"))?;
    t.lock().done = true;
    t.bump();
    Ok(())
}
