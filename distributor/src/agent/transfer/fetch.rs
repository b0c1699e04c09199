//! The requests a transfer makes: the origin's piece manifest, a piece from a peer or
//! from the origin (read under the download cap), and tracker announcements.

use super::{FetchError, Transfer, REQUEST_TIMEOUT, SEED_ANNOUNCE_EVERY};
use crate::agent::Agent;
use crate::api::{Announce, AnnounceReply, PIECE_INDEX, PIECE_SHA256};
use crate::metrics::M;
use crate::pieces::{Bitfield, PieceManifest};
use bytes::{Bytes, BytesMut};
use oci_core::Digest;
use std::sync::Arc;
use std::time::Duration;

/// Attempts at the piece manifest while the origin answers `503` (it is at its cap).
const MANIFEST_TRIES: u64 = 5;

pub(super) async fn fetch_manifest(agent: &Agent, name: &str, d: &Digest) -> Result<PieceManifest, FetchError> {
    let url = crate::origin::pieces_url(&agent.opts.origin, d, name);
    // An origin at its request cap answers 503 at once: try again a few times.
    let mut tries = 0;
    let resp = loop {
        let resp = agent
            .http
            .get(&url)
            .header("authorization", agent.auth())
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| FetchError::Unavailable(format!("origin {}: {e}", agent.opts.origin)))?;
        tries += 1;
        if resp.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE || tries >= MANIFEST_TRIES {
            break resp;
        }
        tokio::time::sleep(Duration::from_millis(200 * tries)).await;
    };
    let status = resp.status();
    if status == reqwest::StatusCode::NOT_FOUND {
        return Err(FetchError::NotFound(format!("blob {d} is not known upstream")));
    }
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        return Err(FetchError::Unavailable(format!("origin answered {status} for {d}: {body}")));
    }
    let m: PieceManifest =
        resp.json().await.map_err(|e| FetchError::Unavailable(format!("origin's piece list for {d}: {e}")))?;
    m.check().map_err(|e| FetchError::Unavailable(format!("origin's piece list for {d}: {e}")))?;
    if let Some(f) = &m.failed {
        return Err(FetchError::Unavailable(format!("origin cannot serve {d}: {f}")));
    }
    Ok(m)
}

/// Where a request went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Source {
    Peer(String),
    Origin,
}

/// A finished request: the piece (index, bytes, hash claimed by the origin), nothing
/// (the origin had no piece for us), a busy peer (with its bitfield), or an error.
pub(super) type Outcome = (Source, Option<usize>, Result<Reply, String>);

pub(super) enum Reply {
    Piece(Got),
    /// The origin had no piece for us.
    Nothing,
    /// The peer's upload slots are taken; its current bitfield, if it sent one.
    Busy(Option<String>),
    /// The peer could not be connected to (it died, or is restarting).
    Unreachable(String),
}

/// A piece received: its index and bytes, the hash the origin claims for it, and the
/// sender's current bitfield (peers send it along, fresher than the tracker's).
pub(super) struct Got {
    pub i: usize,
    pub bytes: Bytes,
    pub claimed: Option<String>,
    pub have: Option<String>,
}

/// Read a response body under the download cap, refusing more than `max` bytes. Pieces
/// from the origin are read at once (up to a second of the cap ahead) and the peers'
/// pieces owe their bytes: the origin's upload is the scarcest link of the swarm, and
/// every piece it sends is new to the swarm.
pub(super) async fn read_body(
    agent: &Agent,
    t: &Transfer,
    mut resp: reqwest::Response,
    max: u64,
    m: M,
) -> Result<Bytes, String> {
    let from_origin = matches!(m, M::BytesDownOrigin);
    // The whole piece at once: growing the buffer chunk by chunk copies it again and again.
    let mut buf = BytesMut::with_capacity(usize::try_from(max.min(crate::pieces::MAX_PIECE)).unwrap_or(0));
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if (buf.len() + chunk.len()) as u64 > max {
            return Err(format!("more than the {max} bytes expected"));
        }
        if from_origin {
            // Ahead of the peers' bytes, but never more than a second of the cap ahead:
            // the cap holds when the origin is the only source.
            let debt = agent.down.take(chunk.len());
            if let Some(excess) = debt.checked_sub(std::time::Duration::from_secs(1)) {
                tokio::time::sleep(excess).await;
            }
        } else {
            agent.down.acquire(chunk.len()).await;
        }
        agent.metrics.add(m, chunk.len() as u64);
        t.received.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

pub(super) async fn fetch_from_peer(agent: Arc<Agent>, t: Arc<Transfer>, addr: String, i: usize) -> Outcome {
    let url = format!("http://{addr}/dist/v1/piece/{}/{i}", t.digest);
    let r = async {
        let resp = agent
            .http
            .get(&url)
            .header("authorization", agent.auth())
            .header(crate::api::PEER_ADDR, &agent.advertise)
            .header(crate::api::PEER_HAVE, t.have_hex())
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) if e.is_connect() => return Ok(Reply::Unreachable(e.to_string())),
            Err(e) => return Err(e.to_string()),
        };
        let have = resp.headers().get(crate::api::PEER_HAVE).and_then(|v| v.to_str().ok()).map(str::to_string);
        if resp.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            return Ok(Reply::Busy(have));
        }
        if !resp.status().is_success() {
            return Err(format!("peer answered {}", resp.status()));
        }
        let bytes = read_body(&agent, &t, resp, t.geo.len_of(i), M::BytesDownPeers).await?;
        Ok(Reply::Piece(Got { i, bytes, claimed: None, have }))
    }
    .await;
    (Source::Peer(addr), Some(i), r)
}

pub(super) async fn fetch_from_origin(agent: Arc<Agent>, t: Arc<Transfer>, skip: Bitfield) -> Outcome {
    let url = format!(
        "http://{}/dist/v1/seed/{}?name={}&skip={}",
        agent.opts.origin,
        t.digest,
        crate::api::query_escape(&t.name),
        skip.to_hex()
    );
    let r = async {
        let resp = agent
            .http
            .get(&url)
            .header("authorization", agent.auth())
            .header(crate::api::PEER_ADDR, &agent.advertise)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await;
        let resp = resp.map_err(|e| format!("origin: {e}"))?;
        if resp.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(Reply::Nothing);
        }
        if !resp.status().is_success() {
            let status = resp.status();
            return Err(format!("origin answered {status}: {}", resp.text().await.unwrap_or_default()));
        }
        let header = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
        let i: usize = header(PIECE_INDEX).and_then(|v| v.parse().ok()).ok_or("origin sent no piece index")?;
        let hash = header(PIECE_SHA256);
        if i >= t.geo.count() {
            return Err(format!("origin sent piece {i} of {}", t.geo.count()));
        }
        let bytes = read_body(&agent, &t, resp, t.geo.len_of(i), M::BytesDownOrigin).await?;
        Ok(Reply::Piece(Got { i, bytes, claimed: hash, have: None }))
    }
    .await;
    (Source::Origin, None, r)
}

pub(super) async fn announce(agent: &Agent, t: &Transfer) -> Result<AnnounceReply, String> {
    let a = Announce {
        peer_id: agent.peer_id.clone(),
        addr: agent.advertise.clone(),
        digest: t.digest.to_string(),
        pieces: t.geo.count(),
        have: t.lock().have.to_hex(),
        dropped: agent.dropped_for_bad_bytes(),
    };
    let tracker = agent.opts.tracker.as_deref().unwrap_or(&agent.opts.origin);
    let url = format!("http://{tracker}/dist/v1/announce");
    let resp = agent
        .http
        .post(url)
        .header("authorization", agent.auth())
        .json(&a)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("tracker answered {}", resp.status()));
    }
    resp.json().await.map_err(|e| e.to_string())
}

/// Announce every complete blob now and then, so that late joiners find the seeders.
pub async fn announce_seeds(agent: Arc<Agent>) {
    while !agent.stopping() {
        crate::agent::cache::evict(&agent).await;
        for t in agent.all_transfers().await {
            if t.is_done() && t.geo.count() > 0 {
                if let Err(e) = announce(&agent, &t).await {
                    tracing::debug!("agent: announcing {}: {e}", t.digest);
                }
            }
        }
        tokio::time::sleep(SEED_ANNOUNCE_EVERY).await;
    }
}
