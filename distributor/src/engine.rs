//! Piece and peer selection, free of I/O so that the agent and a simulator can share it.
//!
//! An agent asks [`next`] what to request next, given which pieces it has, which are in
//! flight, and what each known peer has. Policy:
//! * the first [`HEAD_WINDOW`] missing pieces, if at least [`HEAD_MIN_COPIES`] peers
//!   hold them and one can serve them (the client reads in order), then
//! * a random piece (a per-node salt orders them) among those some live peer can serve.
//!   Not rarest first: with every node choosing the same few rarest (newest) pieces, their
//!   holders are swamped while the holders of everything else idle. The origin gives
//!   each piece to one node, and random choices spread the requests over every holder;
//! * from the least-loaded peer holding the piece, each peer taking at most
//!   [`Limits::per_peer`] requests from us;
//! * the origin only for pieces no peer has (it then chooses the piece itself, see
//!   [`origin_choose`], so that it sends each piece about once);
//! * endgame: once every missing piece is in flight, a slow piece may be requested a
//!   second time from another peer.

use crate::pieces::Bitfield;

/// Missing pieces at the head of the blob (the client's read position) asked for first.
pub const HEAD_WINDOW: usize = 2;
/// Copies the known peers must hold of a head piece for it to go first.
pub const HEAD_MIN_COPIES: u32 = 4;

/// What the agent knows about one peer.
#[derive(Debug, Clone)]
pub struct PeerView {
    pub have: Bitfield,
    /// Requests we have in flight to this peer.
    pub inflight: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests in flight to peers in total (the origin's come on top).
    pub max_inflight: usize,
    /// Requests in flight to one peer.
    pub per_peer: usize,
    /// Requests in flight to the origin.
    pub origin_slots: usize,
    /// Copies of one piece in flight at most (2 allows the endgame).
    pub max_dup: u8,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_inflight: 8, per_peer: 2, origin_slots: 1, max_dup: 2 }
    }
}

/// The agent's view when it plans.
#[derive(Debug)]
pub struct View<'a> {
    pub have: &'a Bitfield,
    /// Copies of each piece in flight.
    pub pending: &'a [u8],
    pub peers: &'a [PeerView],
    pub origin_inflight: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pick {
    /// Request `piece` from `peers[peer]`.
    Peer { piece: usize, peer: usize },
    /// Ask the origin for a piece of its choosing.
    Origin,
}

fn mix(a: u64, salt: u64) -> u64 {
    // splitmix64: a cheap, well-spread tie breaker.
    let mut z = a.wrapping_add(salt).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The next request to make, or `None` if nothing useful can be requested now.
pub fn next(v: &View<'_>, lim: &Limits, salt: u64) -> Option<Pick> {
    next_with(v, &availability(v.have.len(), v.peers), lim, salt)
}

/// [`next`] with the peers' [`availability`] already counted (it changes only when a
/// peer's bitfield does, not with the requests made).
pub fn next_with(v: &View<'_>, avail: &[u32], lim: &Limits, salt: u64) -> Option<Pick> {
    let n = v.have.len();
    if v.have.is_full() || avail.len() != n {
        return None;
    }
    // The origin first, whatever the requests to peers: its upload must never idle,
    // since every piece it sends is new to the swarm.
    let no_peer_has_one =
        (0..n).any(|i| !v.have.get(i) && v.pending.get(i).copied().unwrap_or(0) == 0 && avail[i] == 0);
    if no_peer_has_one && v.origin_inflight < lim.origin_slots {
        return Some(Pick::Origin);
    }
    let total: usize = v.peers.iter().map(|p| p.inflight).sum::<usize>();
    if total >= lim.max_inflight {
        return None;
    }
    let free_peer_for = |i: usize| -> Option<usize> {
        v.peers
            .iter()
            .enumerate()
            .filter(|(_, p)| p.have.get(i) && p.inflight < lim.per_peer)
            .min_by_key(|(j, p)| (p.inflight, mix(*j as u64, salt ^ i as u64)))
            .map(|(j, _)| j)
    };
    // The client reads the blob in order: the first missing pieces go first, so that its
    // stream moves while pieces arrive. Otherwise a node that joins late, when every
    // piece is plentiful, would get them in random order and its client nothing until
    // the end. Only the head, and only once it is plentiful: the newest pieces, which
    // every node lacks, stay random, so that their few holders are not swamped.
    for i in (0..n).filter(|&i| !v.have.get(i)).take(HEAD_WINDOW) {
        if v.pending.get(i).copied().unwrap_or(0) == 0 && avail[i] >= HEAD_MIN_COPIES {
            if let Some(peer) = free_peer_for(i) {
                return Some(Pick::Peer { piece: i, peer });
            }
        }
    }
    let mut best: Option<(u64, usize, usize)> = None;
    let mut unrequested_missing = 0usize;
    for (i, &a) in avail.iter().enumerate() {
        if v.have.get(i) || v.pending.get(i).copied().unwrap_or(0) > 0 {
            continue;
        }
        unrequested_missing += 1;
        if a == 0 {
            continue;
        }
        let key = mix(i as u64, salt);
        if best.is_some_and(|b| b.0 <= key) {
            continue;
        }
        if let Some(peer) = free_peer_for(i) {
            best = Some((key, i, peer));
        }
    }
    if let Some((_, piece, peer)) = best {
        return Some(Pick::Peer { piece, peer });
    }
    if unrequested_missing == 0 {
        // Endgame: duplicate the piece with the fewest copies in flight.
        let dup = (0..n)
            .filter(|&i| !v.have.get(i))
            .filter(|&i| v.pending.get(i).copied().unwrap_or(0) < lim.max_dup)
            .filter_map(|i| {
                free_peer_for(i).map(|p| (v.pending.get(i).copied().unwrap_or(0), mix(i as u64, salt), i, p))
            })
            .min();
        if let Some((_, _, piece, peer)) = dup {
            return Some(Pick::Peer { piece, peer });
        }
    }
    None
}

/// How many peers hold each piece.
pub fn availability(n: usize, peers: &[PeerView]) -> Vec<u32> {
    let mut a = vec![0u32; n];
    for p in peers {
        p.have.add_to(&mut a);
    }
    a
}

/// The origin's choice for a requester (super-seeding): among the first `known` pieces
/// (those the origin has hashed) that the requester neither has nor is fetching, first a
/// piece sent before and presumed lost (the caller skips those sent too recently: their
/// recipient may still pass them on), then the one with the fewest copies in the swarm
/// plus times the origin already sent it. A lost piece goes first because nothing else
/// can give it to the requester, which otherwise waits for it until the origin has sent
/// every new piece (its client, reading in order, stalls for as long); sending it later
/// would cost the same bytes.
pub fn origin_choose(known: usize, skip: &Bitfield, avail: &[u32], served: &[u32]) -> Option<usize> {
    (0..known).filter(|&i| !skip.get(i)).min_by_key(|&i| {
        let sent = served.get(i).copied().unwrap_or(0);
        (sent == 0, avail.get(i).copied().unwrap_or(0) + sent, i)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(n: usize, set: &[usize]) -> Bitfield {
        let mut b = Bitfield::new(n);
        for &i in set {
            b.set(i);
        }
        b
    }

    #[test]
    fn a_missing_piece_from_its_least_loaded_holder() {
        let have = bits(4, &[0]);
        let peers = vec![
            PeerView { have: bits(4, &[0, 1, 2, 3]), inflight: 1 },
            PeerView { have: bits(4, &[0, 2]), inflight: 0 },
            PeerView { have: bits(4, &[0, 3]), inflight: 2 },
        ];
        let mut seen = std::collections::HashSet::new();
        for salt in 0..32 {
            let v = View { have: &have, pending: &[0, 0, 0, 0], peers: &peers, origin_inflight: 0 };
            let pick = next(&v, &Limits::default(), salt);
            // Piece 2 from the idle peer 1, not the busier peer 0; piece 3 not from peer 2,
            // which has its two requests.
            let ok =
                [Pick::Peer { piece: 1, peer: 0 }, Pick::Peer { piece: 2, peer: 1 }, Pick::Peer { piece: 3, peer: 0 }];
            assert!(pick.is_some_and(|p| ok.contains(&p)), "salt {salt}: {pick:?}");
            seen.insert(pick);
            let v = View { pending: &[0, 1, 1, 1], ..v };
            assert_eq!(next(&v, &Limits { max_dup: 1, ..Limits::default() }, salt), None, "all pending");
        }
        assert_eq!(seen.len(), 3, "salts spread nodes over the pieces");
    }

    #[test]
    fn the_origin_comes_first_whatever_the_peer_requests() {
        let have = bits(3, &[]);
        let peers = vec![PeerView { have: bits(3, &[0, 1]), inflight: 2 }];
        let lim = Limits { max_inflight: 2, ..Limits::default() };
        let v = View { have: &have, pending: &[1, 1, 0], peers: &peers, origin_inflight: 0 };
        assert_eq!(next(&v, &lim, 1), Some(Pick::Origin), "peer budget spent, origin slot free");
        let v = View { pending: &[1, 1, 1], ..v };
        assert_eq!(next(&v, &lim, 1), None, "the piece no peer has is already on its way");
    }

    #[test]
    fn origin_only_for_pieces_no_peer_has() {
        let have = bits(3, &[]);
        let peers = vec![PeerView { have: bits(3, &[0, 1, 2]), inflight: 2 }];
        let v = View { have: &have, pending: &[0; 3], peers: &peers, origin_inflight: 0 };
        assert_eq!(next(&v, &Limits::default(), 1), None, "peer busy, but it has everything");
        let peers = vec![PeerView { have: bits(3, &[0, 1]), inflight: 2 }];
        let v = View { peers: &peers, ..v };
        assert_eq!(next(&v, &Limits::default(), 1), Some(Pick::Origin));
        let v = View { origin_inflight: 1, ..v };
        assert_eq!(next(&v, &Limits::default(), 1), None, "one origin slot");
    }

    #[test]
    fn endgame_duplicates_once() {
        let have = bits(2, &[0]);
        let peers = vec![PeerView { have: bits(2, &[1]), inflight: 1 }, PeerView { have: bits(2, &[1]), inflight: 0 }];
        let v = View { have: &have, pending: &[0, 1], peers: &peers, origin_inflight: 0 };
        assert_eq!(next(&v, &Limits::default(), 3), Some(Pick::Peer { piece: 1, peer: 1 }));
        let v = View { pending: &[0, 2], ..v };
        assert_eq!(next(&v, &Limits::default(), 3), None);
    }

    #[test]
    fn the_head_goes_first_once_plentiful() {
        let have = bits(64, &[0]);
        let full = || PeerView { have: Bitfield::full(64), inflight: 0 };
        let peers: Vec<PeerView> = (0..HEAD_MIN_COPIES).map(|_| full()).collect();
        let mut pending = [0u8; 64];
        for salt in 0..16 {
            let v = View { have: &have, pending: &pending, peers: &peers, origin_inflight: 1 };
            assert!(matches!(next(&v, &Limits::default(), salt), Some(Pick::Peer { piece: 1, .. })), "salt {salt}");
        }
        pending[1] = 1;
        let v = View { have: &have, pending: &pending, peers: &peers, origin_inflight: 1 };
        assert!(matches!(next(&v, &Limits::default(), 3), Some(Pick::Peer { piece: 2, .. })), "the next of the window");
        pending[2] = 1;
        let picks: std::collections::HashSet<_> = (0..16u64)
            .filter_map(|salt| {
                next(
                    &View { have: &have, pending: &pending, peers: &peers, origin_inflight: 1 },
                    &Limits::default(),
                    salt,
                )
            })
            .collect();
        assert!(picks.len() > 8, "beyond the window, random: {picks:?}");
        // Scarce head pieces (fewer holders) are not rushed.
        let few = &peers[..HEAD_MIN_COPIES as usize - 1];
        let picks: std::collections::HashSet<_> = (0..16u64)
            .filter_map(|salt| {
                next(&View { have: &have, pending: &[0; 64], peers: few, origin_inflight: 1 }, &Limits::default(), salt)
            })
            .collect();
        assert!(picks.len() > 8, "scarce head, random: {picks:?}");
    }

    #[test]
    fn salts_spread_nodes_over_pieces() {
        let have = bits(64, &[]);
        let peers = vec![PeerView { have: Bitfield::full(64), inflight: 0 }];
        let picks: std::collections::HashSet<_> = (0..16u64)
            .filter_map(|salt| {
                let v = View { have: &have, pending: &[0; 64], peers: &peers, origin_inflight: 0 };
                next(&v, &Limits::default(), salt)
            })
            .collect();
        assert!(picks.len() > 8, "{picks:?}");
    }

    #[test]
    fn origin_sends_each_piece_about_once() {
        let skip = bits(4, &[0]);
        // New pieces: the one with the fewest copies.
        assert_eq!(origin_choose(4, &skip, &[0, 1, 0, 0], &[0, 0, 0, 0]), Some(2));
        assert_eq!(origin_choose(2, &skip, &[0, 1, 0, 0], &[0, 0, 0, 0]), Some(1));
        assert_eq!(origin_choose(1, &skip, &[], &[]), None);
        // A piece sent before and not skipped is presumed lost: it goes before new ones.
        assert_eq!(origin_choose(4, &skip, &[0, 1, 0, 0], &[0, 1, 0, 0]), Some(1));
        assert_eq!(origin_choose(4, &bits(4, &[0, 1]), &[0, 1, 0, 0], &[0, 1, 0, 0]), Some(2), "unless skipped");
    }
}
