//! Peer discovery: agents announce, per blob, the pieces they hold; the tracker answers
//! with the other live peers. Soft state only: every entry expires after [`TTL`] unless
//! re-announced, so a restarted tracker is whole again within one announce interval.
//!
//! A tracker runs inside every origin, or alone (`mwdist tracker`). An origin started
//! with `--tracker host:port` uses that one instead of its own ([`TrackerLink::Remote`]):
//! it forwards the announcements it receives and asks it how many copies of each piece
//! the swarm holds, so that several origins (and their agents) share one swarm view.

use crate::api::{registry_error, Announce, AnnounceReply, PeerInfo};
use crate::auth::{self, Secret};
use crate::cap::{self, RequestCap};
use crate::metrics::Metrics;
use crate::pieces::Bitfield;
use axum::extract::{Path as AxPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long an origin reuses a remote tracker's availability answer.
const AVAILABILITY_FRESH: Duration = Duration::from_millis(250);
/// How long an origin waits before asking an unreachable tracker again.
const AVAILABILITY_RETRY: Duration = Duration::from_secs(2);

pub const TTL: Duration = Duration::from_secs(6);
/// Live peers that must report a peer for bad bytes before the swarm leaves it out (one
/// report could be a mistake or a grudge; a single bad peer cannot exclude anyone).
pub const SUSPECT_REPORTS: usize = 2;
/// Peers returned per announce at most (a random sample when there are more).
pub const MAX_PEERS: usize = 64;

struct Entry {
    info: PeerInfo,
    have: Bitfield,
    seen: Instant,
    /// Addresses this peer reports for bad bytes.
    dropped: Vec<String>,
}

/// The addresses reported by at least [`SUSPECT_REPORTS`] of a swarm's live peers.
fn suspects<'a>(live: impl Iterator<Item = &'a Entry>) -> std::collections::HashSet<String> {
    let mut reports: HashMap<&str, usize> = HashMap::new();
    for e in live {
        for a in &e.dropped {
            *reports.entry(a.as_str()).or_default() += 1;
        }
    }
    reports.into_iter().filter(|(_, n)| *n >= SUSPECT_REPORTS).map(|(a, _)| a.to_string()).collect()
}

#[derive(Default)]
pub struct Tracker {
    swarms: Mutex<HashMap<String, HashMap<String, Entry>>>,
}

impl Tracker {
    /// Record `a` and return the other live peers of its blob.
    pub fn announce(&self, a: Announce) -> Result<AnnounceReply, String> {
        let have = Bitfield::from_hex(&a.have, a.pieces).ok_or("the have bitfield does not match the piece count")?;
        let now = Instant::now();
        let mut swarms = self.swarms.lock().unwrap_or_else(|p| p.into_inner());
        let swarm = swarms.entry(a.digest.clone()).or_default();
        swarm.retain(|_, e| now.duration_since(e.seen) < TTL);
        let id = a.peer_id.clone();
        let info = PeerInfo { peer_id: a.peer_id.clone(), addr: a.addr, have: a.have };
        let mut dropped = a.dropped;
        dropped.truncate(MAX_PEERS);
        swarm.insert(a.peer_id, Entry { info, have, seen: now, dropped });
        let suspect = suspects(swarm.values());
        let mut peers: Vec<PeerInfo> = swarm
            .iter()
            .filter(|(other, e)| **other != id && !suspect.contains(&e.info.addr))
            .map(|(_, e)| e.info.clone())
            .collect();
        if peers.len() > MAX_PEERS {
            use rand::seq::SliceRandom as _;
            peers.shuffle(&mut rand::thread_rng());
            peers.truncate(MAX_PEERS);
        }
        Ok(AnnounceReply { peers, ttl_secs: TTL.as_secs() })
    }

    /// Copies of each of a blob's `n` pieces held by live peers that are not suspects,
    /// and the suspects.
    pub fn availability(&self, digest: &str, n: usize) -> Availability {
        let mut copies = vec![0u32; n];
        let swarms = self.swarms.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let live =
            || swarms.get(digest).into_iter().flat_map(|s| s.values()).filter(|e| now.duration_since(e.seen) < TTL);
        let suspect = suspects(live());
        for e in live() {
            if e.have.len() == n && !suspect.contains(&e.info.addr) {
                e.have.add_to(&mut copies);
            }
        }
        let mut suspects: Vec<String> = suspect.into_iter().collect();
        suspects.sort();
        Availability { copies, suspects }
    }
}

/// `GET /dist/v1/availability/<digest>?pieces=<n>`: copies of each piece held by live peers,
/// and the peers reported for bad bytes (whose pieces are not counted).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Availability {
    pub copies: Vec<u32>,
    #[serde(default)]
    pub suspects: Vec<String>,
}

#[derive(Deserialize)]
struct PiecesQuery {
    pieces: usize,
}

/// The tracker an origin uses: its own, or a shared one elsewhere.
pub enum TrackerLink {
    Local(Tracker),
    Remote(Remote),
}

/// A tracker reached over HTTP (another origin's, or a `mwdist tracker`).
pub struct Remote {
    addr: String,
    secret: Secret,
    http: reqwest::Client,
    /// Answers by digest, with when they go stale.
    cache: Mutex<HashMap<String, (Instant, Availability)>>,
}

impl TrackerLink {
    pub fn remote(addr: &str, secret: Secret) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| anyhow::anyhow!("HTTP client for the tracker {addr}: {e}"))?;
        Ok(TrackerLink::Remote(Remote { addr: addr.to_string(), secret, http, cache: Default::default() }))
    }

    /// Record an announcement (forwarding it to a remote tracker); the reply.
    pub async fn announce(&self, a: Announce) -> Result<AnnounceReply, (StatusCode, String)> {
        match self {
            TrackerLink::Local(t) => t.announce(a).map_err(|e| (StatusCode::BAD_REQUEST, e)),
            TrackerLink::Remote(r) => {
                let url = format!("http://{}/dist/v1/announce", r.addr);
                let unavailable = |e: String| (StatusCode::BAD_GATEWAY, format!("tracker {}: {e}", r.addr));
                let resp = r
                    .http
                    .post(url)
                    .header("authorization", r.secret.header_value())
                    .json(&a)
                    .send()
                    .await
                    .map_err(|e| unavailable(e.to_string()))?;
                let status = resp.status();
                if !status.is_success() {
                    let code = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
                    return Err((code, format!("tracker {} answered {status}", r.addr)));
                }
                resp.json().await.map_err(|e| unavailable(e.to_string()))
            }
        }
    }

    /// Copies of each of a blob's `n` pieces held by live peers, and the suspects (all
    /// zero and none when a remote tracker cannot be reached: the origin then just serves
    /// what is asked).
    pub async fn availability(&self, digest: &str, n: usize) -> Availability {
        let r = match self {
            TrackerLink::Local(t) => return t.availability(digest, n),
            TrackerLink::Remote(r) => r,
        };
        {
            let cache = r.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((until, v)) = cache.get(digest) {
                if Instant::now() < *until && v.copies.len() == n {
                    return v.clone();
                }
            }
        }
        let url = format!("http://{}/dist/v1/availability/{digest}?pieces={n}", r.addr);
        let got = async {
            let resp = r.http.get(url).header("authorization", r.secret.header_value()).send().await.ok()?;
            let a: Availability = resp.error_for_status().ok()?.json().await.ok()?;
            (a.copies.len() == n).then_some(a)
        }
        .await;
        // A failure is remembered longer, so that a tracker down does not slow every
        // piece the origin sends.
        let (v, fresh) = match got {
            Some(v) => (v, AVAILABILITY_FRESH),
            None => {
                tracing::warn!("origin: no piece availability for {digest} from the tracker {}", r.addr);
                (Availability { copies: vec![0; n], suspects: Vec::new() }, AVAILABILITY_RETRY)
            }
        };
        let now = Instant::now();
        let mut cache = r.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|_, (until, _)| *until > now);
        cache.insert(digest.to_string(), (now + fresh, v.clone()));
        v
    }
}

/// The tracker's HTTP API (cluster secret required), under the request cap. Used by
/// `mwdist tracker` and, merged into its router, by an origin.
pub fn routes(link: Arc<TrackerLink>) -> Router {
    Router::new()
        .route("/dist/v1/announce", post(announce_handler))
        .route("/dist/v1/availability/{digest}", get(availability_handler))
        .with_state(link)
}

async fn announce_handler(State(t): State<Arc<TrackerLink>>, Json(a): Json<Announce>) -> Response {
    match t.announce(a).await {
        Ok(r) => Json(r).into_response(),
        Err((status, e)) => registry_error(status, "UNKNOWN", &e),
    }
}

async fn availability_handler(
    State(t): State<Arc<TrackerLink>>,
    AxPath(d): AxPath<String>,
    Query(q): Query<PiecesQuery>,
) -> Response {
    if q.pieces > 1 << 20 {
        return registry_error(StatusCode::BAD_REQUEST, "UNKNOWN", "too many pieces");
    }
    Json(t.availability(&d, q.pieces).await).into_response()
}

/// `mwdist tracker`: the tracker alone, for several origins.
pub fn standalone_router(secret: Secret, max_requests: usize, metrics: Arc<Metrics>) -> Router {
    let link = Arc::new(TrackerLink::Local(Tracker::default()));
    let cap = RequestCap::new(max_requests, metrics.clone());
    routes(link)
        .layer(axum::middleware::from_fn_with_state(secret, auth::require))
        .layer(axum::middleware::from_fn_with_state(cap, cap::limit))
        .route("/metrics", get(move || async move { metrics.render("tracker") }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(id: &str, have: &Bitfield) -> Announce {
        Announce {
            peer_id: id.into(),
            addr: format!("{id}:1"),
            digest: "d".into(),
            pieces: have.len(),
            have: have.to_hex(),
            dropped: Vec::new(),
        }
    }

    #[test]
    fn peers_see_each_other_but_not_themselves() {
        let t = Tracker::default();
        let mut b = Bitfield::new(3);
        assert!(t.announce(ann("a", &b)).expect("valid").peers.is_empty());
        b.set(1);
        let r = t.announce(ann("b", &b)).expect("valid");
        assert_eq!(r.peers.len(), 1);
        assert_eq!(r.peers[0].peer_id, "a");
        assert_eq!(t.availability("d", 3).copies, vec![0, 1, 0]);
        assert_eq!(t.announce(ann("a", &b)).expect("valid").peers.len(), 1, "re-announce replaces");
        assert_eq!(t.availability("d", 3).copies, vec![0, 2, 0]);
        let bad = Announce { pieces: 30, ..ann("c", &b) };
        assert!(t.announce(bad).is_err());
    }

    #[test]
    fn a_peer_two_others_report_is_left_out() {
        let t = Tracker::default();
        let mut b = Bitfield::new(2);
        b.set(0);
        let report = |id: &str| Announce { dropped: vec!["bad:1".into()], ..ann(id, &Bitfield::new(2)) };
        t.announce(ann("bad", &b)).expect("valid");
        t.announce(report("a")).expect("valid");
        assert_eq!(t.availability("d", 2), Availability { copies: vec![1, 0], suspects: vec![] }, "one report");
        let r = t.announce(report("b")).expect("valid");
        assert_eq!(t.availability("d", 2), Availability { copies: vec![0, 0], suspects: vec!["bad:1".into()] });
        assert!(r.peers.iter().all(|p| p.addr != "bad:1"), "not handed out: {:?}", r.peers);
        assert_eq!(r.peers.len(), 1, "the other reporter is");
        // Reports count only while their reporter is live and still reports.
        t.announce(ann("a", &Bitfield::new(2))).expect("valid");
        assert_eq!(t.availability("d", 2).copies, vec![1, 0]);
    }
}
