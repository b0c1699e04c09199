//! Peer discovery: agents announce, per blob, the pieces they hold; the tracker answers
//! with the other live peers. Soft state only: every entry expires after [`TTL`] unless
//! re-announced, so a restarted tracker is whole again within one announce interval.

use crate::api::{Announce, AnnounceReply, PeerInfo};
use crate::pieces::Bitfield;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const TTL: Duration = Duration::from_secs(6);
/// Peers returned per announce at most (a random sample when there are more).
pub const MAX_PEERS: usize = 64;

struct Entry {
    info: PeerInfo,
    have: Bitfield,
    seen: Instant,
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
        let mut peers: Vec<PeerInfo> =
            swarm.iter().filter(|(id, _)| **id != a.peer_id).map(|(_, e)| e.info.clone()).collect();
        if peers.len() > MAX_PEERS {
            use rand::seq::SliceRandom as _;
            peers.shuffle(&mut rand::thread_rng());
            peers.truncate(MAX_PEERS);
        }
        let info = PeerInfo { peer_id: a.peer_id.clone(), addr: a.addr, have: a.have };
        swarm.insert(a.peer_id, Entry { info, have, seen: now });
        Ok(AnnounceReply { peers, ttl_secs: TTL.as_secs() })
    }

    /// Copies of each of a blob's `n` pieces held by live peers.
    pub fn availability(&self, digest: &str, n: usize) -> Vec<u32> {
        let mut a = vec![0u32; n];
        let swarms = self.swarms.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        for e in swarms.get(digest).into_iter().flat_map(|s| s.values()) {
            if now.duration_since(e.seen) < TTL && e.have.len() == n {
                for (i, slot) in a.iter_mut().enumerate() {
                    if e.have.get(i) {
                        *slot += 1;
                    }
                }
            }
        }
        a
    }
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
        assert_eq!(t.availability("d", 3), vec![0, 1, 0]);
        assert_eq!(t.announce(ann("a", &b)).expect("valid").peers.len(), 1, "re-announce replaces");
        assert_eq!(t.availability("d", 3), vec![0, 2, 0]);
        let bad = Announce { pieces: 30, ..ann("c", &b) };
        assert!(t.announce(bad).is_err());
    }
}
