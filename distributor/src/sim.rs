//! `mwdist simulate`: a discrete-event fluid simulation of a swarm of 1,000–10,000 nodes
//! that drives the same piece and peer selection code as the agent ([`crate::engine`],
//! with the origin's [`crate::engine::origin_choose`]) and prints the same ratios as
//! `mwdist bench`.
//!
//! Model: every node and the origin have equal caps B up and down; the origin sends one
//! piece at a time at B and its recipient reads it first (as the agent does); a peer
//! transfer gets `min(up/uploads at the source, what the origin leaves of down /
//! peer downloads at the destination)`: the source sends at its share of its cap and is
//! free for its next request once the piece is out (socket buffers hold what the
//! destination has not read yet), the destination reads at its share, never ahead of
//! what was sent; a source with [`crate::limit::UPLOAD_SLOTS`] uploads refuses (the
//! agent's "busy"); nodes keep as many requests in flight as the agent does; each node
//! knows a random sample of [`SAMPLE`] peers (the tracker's answer) with their current
//! bitfields. Announce latency and request round trips are not modelled.
//!
//! Events: between two events every rate is constant, so each transfer's next event (its
//! piece is out at the source, or read at the destination) is computed exactly and kept
//! in a priority queue. When a node's number of uploads or downloads changes, only that
//! node's transfers are brought up to date and rescheduled. A node plans (asks
//! [`engine::next_with`] until it returns `None`) only when its answer may have changed:
//! * one of its own transfers ended;
//! * a peer in its sample completed a piece it neither has nor has requested, and that
//!   peer is not busy and has room for our requests, and the node has room for more;
//! * a busy peer in its sample got a free upload slot and has a piece the node wants;
//! * a peer it has requests to became busy (busy peers leave the view, and their
//!   requests with them, as in the agent);
//! * the origin became free: nodes in a random order plan until one takes it.
//!
//! A freed origin is offered first (nodes in a random rotation, as the loop did), then the
//! nodes woken at the same instant plan in a random order (the origin and the peers serve
//! whoever asks first, and real requests arrive in no fixed order). A woken node first
//! passes a cheap test of what [`engine::next_with`] needs for a pick (see
//! `Sim::may_pick`); in tests, every event is followed by a check that no node is left
//! with a request. Each node keeps its own copies of its peers' bitfields, updated when
//! a peer completes a piece, so a plan clones none. Availability is counted once per
//! plan, as the agent does. One change from the time-stepped loop this
//! replaces: when the origin has nothing for a node (it sends each piece once, so this
//! happens once every piece is out), the node leaves it alone for the rest of its plan
//! and goes on with its peer requests (the agent's quiet period) instead of ending its
//! plan; the loop used to retry at its next step, which an event-driven planner does not
//! have.

use crate::bench::report;
use crate::engine::{self, Limits, PeerView, Pick};
use crate::limit::UPLOAD_SLOTS;
use crate::pieces::{Bitfield, Geometry};
use rand::seq::SliceRandom as _;
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Peers a node knows.
pub const SAMPLE: usize = 32;
const ORIGIN_SLOTS: usize = 1;
/// [`Xfer::src`] of the origin's transfers.
const ORIGIN: usize = usize::MAX;

#[derive(Debug, clap::Args)]
pub struct SimArgs {
    #[arg(long, default_value_t = 1000)]
    pub nodes: usize,
    #[arg(long, default_value = "64MiB", value_parser = crate::cli::parse_size)]
    pub blob_size: u64,
    #[arg(long, default_value = "4MiB", value_parser = crate::cli::parse_size)]
    pub rate: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// A simulation's results.
#[derive(Debug)]
pub struct Outcome {
    /// Completion times (seconds) of the nodes that completed.
    pub times: Vec<f64>,
    pub lb: report::LowerBound,
    /// Origin egress in multiples of S.
    pub egress: f64,
    /// Transfers started, and plans made.
    pub transfers: u64,
    pub plans: u64,
}

struct Xfer {
    piece: usize,
    /// The source node, or [`ORIGIN`].
    src: usize,
    /// The source's position in the destination's sample (peer transfers).
    pos: usize,
    dst: usize,
    len: f64,
    /// Bytes sent by the source, and read by the destination, at time `at`.
    sent: f64,
    got: f64,
    at: f64,
    /// Rates since `at`.
    up: f64,
    down: f64,
    /// Whether the piece is out at the source (which is then free of it).
    out: bool,
    /// When the piece is out at the source, and read at the destination, at these rates.
    out_at: f64,
    read_at: f64,
    /// Bumped at every rescheduling: queued events of older versions are stale.
    ver: u32,
    live: bool,
    /// Queued for [`Sim::rerate`].
    dirty: bool,
}

/// `(time as bits, transfer, version)`, earliest first (times are non-negative, so their
/// bits order like them).
type Event = Reverse<(u64, usize, u32)>;

struct Sim {
    b: f64,
    np: usize,
    g: Geometry,
    limits: Limits,
    now: f64,
    rng: ChaCha8Rng,
    salts: Vec<u64>,
    samples: Vec<Vec<usize>>,
    /// `(k, pos)` for every node `k` with this node at `samples[k][pos]`.
    rev: Vec<Vec<(usize, usize)>>,
    /// `views[k][pos]`: the bitfield of `samples[k][pos]`, and `k`'s requests to it.
    views: Vec<Vec<PeerView>>,
    have: Vec<Bitfield>,
    /// Per node, `words` 64-bit words: the pieces it has, and those it neither has nor
    /// has requested.
    words: usize,
    have_w: Vec<u64>,
    want_w: Vec<u64>,
    pending: Vec<Vec<u8>>,
    /// Pieces a node neither has nor has requested.
    unreq: Vec<usize>,
    peer_down: Vec<usize>,
    to_origin: Vec<usize>,
    uploads: Vec<usize>,
    origin_up: usize,
    served: Vec<u32>,
    /// Pieces the origin has not sent yet.
    unserved: usize,
    zeros: Vec<u32>,
    egress: u64,
    xfers: Vec<Xfer>,
    free: Vec<usize>,
    live: usize,
    /// Transfers still sending, by source; every transfer until it is read, by
    /// destination.
    up_of: Vec<Vec<usize>>,
    down_of: Vec<Vec<usize>>,
    origin_of: Vec<usize>,
    heap: BinaryHeap<Event>,
    dirty: Vec<usize>,
    woken: Vec<bool>,
    wake: Vec<usize>,
    /// Sources that became busy, with the node whose request made them so.
    busy: Vec<(usize, usize)>,
    done: Vec<f64>,
    left: usize,
    transfers: u64,
    plans: u64,
    scratch: (Vec<usize>, Vec<(usize, usize)>),
}

impl Sim {
    fn new(a: &SimArgs) -> Self {
        let n = a.nodes;
        let g = Geometry::for_size(a.blob_size);
        let np = g.count();
        let words = np.div_ceil(64);
        let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
        let samples: Vec<Vec<usize>> = (0..n)
            .map(|i| {
                let k = SAMPLE.min(n.saturating_sub(1));
                rand::seq::index::sample(&mut rng, n.saturating_sub(1), k)
                    .into_iter()
                    .map(|j| if j >= i { j + 1 } else { j })
                    .collect()
            })
            .collect();
        let mut rev = vec![Vec::new(); n];
        for (k, s) in samples.iter().enumerate() {
            for (pos, &j) in s.iter().enumerate() {
                rev[j].push((k, pos));
            }
        }
        let salts: Vec<u64> = (0..n).map(|_| rng.gen()).collect();
        let mut want_w = vec![0u64; n * words];
        for w in want_w.chunks_mut(words.max(1)) {
            for p in 0..np {
                w[p / 64] |= 1 << (p % 64);
            }
        }
        Sim {
            b: a.rate as f64,
            np,
            g,
            limits: Limits {
                max_inflight: crate::agent::transfer::MAX_INFLIGHT,
                per_peer: crate::agent::transfer::PER_PEER,
                ..Limits::default()
            },
            now: 0.0,
            rng,
            salts,
            views: samples
                .iter()
                .map(|s| s.iter().map(|_| PeerView { have: Bitfield::new(np), inflight: 0 }).collect())
                .collect(),
            samples,
            rev,
            have: vec![Bitfield::new(np); n],
            words,
            have_w: vec![0; n * words],
            want_w,
            pending: vec![vec![0; np]; n],
            unreq: vec![np; n],
            peer_down: vec![0; n],
            to_origin: vec![0; n],
            uploads: vec![0; n],
            origin_up: 0,
            served: vec![0; np],
            unserved: np,
            zeros: vec![0; np],
            egress: 0,
            xfers: Vec::new(),
            free: Vec::new(),
            live: 0,
            up_of: vec![Vec::new(); n],
            down_of: vec![Vec::new(); n],
            origin_of: Vec::new(),
            heap: BinaryHeap::new(),
            dirty: Vec::new(),
            woken: vec![false; n],
            wake: Vec::new(),
            busy: Vec::new(),
            done: vec![f64::NAN; n],
            left: n,
            transfers: 0,
            plans: 0,
            scratch: (Vec::new(), Vec::new()),
        }
    }

    fn run(&mut self, horizon: f64) {
        let n = self.done.len();
        if self.np == 0 {
            self.done.fill(0.0);
            self.left = 0;
            return;
        }
        let mut all: Vec<usize> = (0..n).collect();
        all.shuffle(&mut self.rng);
        for k in all {
            self.plan(k);
        }
        self.settle();
        while self.left > 0 {
            let Some(Reverse((t, id, ver))) = self.heap.pop() else { break };
            let x = &self.xfers[id];
            if !x.live || x.ver != ver {
                continue;
            }
            let t = f64::from_bits(t);
            if t > horizon {
                break;
            }
            self.now = t;
            self.fire(id);
            self.settle();
            #[cfg(test)]
            if self.done.len() <= 64 {
                self.assert_idle();
            }
            if self.heap.len() > 4 * self.live + 4096 {
                let xfers = &self.xfers;
                self.heap.retain(|Reverse((_, id, ver))| xfers[*id].live && xfers[*id].ver == *ver);
            }
        }
    }

    /// Plan the woken nodes (and whoever they wake) and hand the origin out, then
    /// reschedule the transfers whose rates changed.
    fn settle(&mut self) {
        let mut rotated = false;
        loop {
            for (j, by) in std::mem::take(&mut self.busy) {
                for i in 0..self.rev[j].len() {
                    let (k, pos) = self.rev[j][i];
                    if k != by && self.views[k][pos].inflight > 0 {
                        self.wake(k);
                    }
                }
            }
            if self.origin_up < ORIGIN_SLOTS && self.unserved > 0 && !rotated {
                rotated = true;
                let n = self.done.len();
                let first = self.rng.gen_range(0..n);
                for k in (first..n).chain(0..first) {
                    self.plan(k);
                    if self.origin_up >= ORIGIN_SLOTS {
                        break;
                    }
                }
                continue;
            }
            if !self.wake.is_empty() {
                let mut batch = std::mem::take(&mut self.wake);
                batch.shuffle(&mut self.rng);
                for &k in &batch {
                    self.woken[k] = false;
                }
                for k in batch {
                    self.plan(k);
                }
                continue;
            }
            break;
        }
        self.rerate();
    }

    /// Every node that is not done has nothing to request (nobody was left unplanned).
    #[cfg(test)]
    fn assert_idle(&self) {
        for k in 0..self.done.len() {
            if !self.done[k].is_nan() {
                continue;
            }
            let views: Vec<PeerView> = self.samples[k]
                .iter()
                .zip(&self.views[k])
                .filter(|(&j, _)| self.uploads[j] < UPLOAD_SLOTS)
                .map(|(_, v)| v.clone())
                .collect();
            for (&j, v) in self.samples[k].iter().zip(&self.views[k]) {
                assert_eq!(v.have, self.have[j], "view of {j} at {k}");
            }
            let origin_inflight = if self.unserved == 0 || self.origin_up >= ORIGIN_SLOTS {
                self.limits.origin_slots
            } else {
                self.to_origin[k]
            };
            let v = engine::View { have: &self.have[k], pending: &self.pending[k], peers: &views, origin_inflight };
            let pick = engine::next(&v, &self.limits, self.salts[k]);
            assert_eq!(pick, None, "node {k} at {} left with a request", self.now);
        }
    }

    fn wake(&mut self, k: usize) {
        if !self.woken[k] && self.done[k].is_nan() {
            self.woken[k] = true;
            self.wake.push(k);
        }
    }

    /// Whether `k`'s requests to peers that are not busy leave room for more.
    fn has_room(&self, k: usize) -> bool {
        if self.peer_down[k] < self.limits.max_inflight {
            return true;
        }
        let visible: usize = self.samples[k]
            .iter()
            .zip(&self.views[k])
            .filter(|(&j, _)| self.uploads[j] < UPLOAD_SLOTS)
            .map(|(_, v)| v.inflight)
            .sum();
        visible < self.limits.max_inflight
    }

    /// Whether [`engine::next_with`] may pick piece `p` for `k`.
    fn wants(&self, k: usize, p: usize) -> bool {
        if self.want_w[k * self.words + p / 64] & (1 << (p % 64)) != 0 {
            return true;
        }
        // Endgame: a second copy of a piece in flight.
        self.unreq[k] == 0 && !self.have[k].get(p) && self.pending[k][p] < self.limits.max_dup
    }

    /// `j` completed piece `p`: update the views of the nodes that know it.
    fn gained(&mut self, j: usize, p: usize) {
        let w = j * self.words + p / 64;
        self.have_w[w] |= 1 << (p % 64);
        let free = self.uploads[j] < UPLOAD_SLOTS;
        for i in 0..self.rev[j].len() {
            let (k, pos) = self.rev[j][i];
            let v = &mut self.views[k][pos];
            v.have.set(p);
            if free && v.inflight < self.limits.per_peer && self.wants(k, p) && self.has_room(k) {
                self.wake(k);
            }
        }
    }

    /// `j` had [`UPLOAD_SLOTS`] uploads and one ended: wake who wants something of it.
    fn unbusy(&mut self, j: usize) {
        for i in 0..self.rev[j].len() {
            let (k, pos) = self.rev[j][i];
            if !self.done[k].is_nan() || self.views[k][pos].inflight >= self.limits.per_peer {
                continue;
            }
            let (a, b) = (j * self.words, k * self.words);
            let useful = (0..self.words).any(|w| self.have_w[a + w] & self.want_w[b + w] != 0)
                || (self.unreq[k] == 0
                    && (0..self.np).any(|p| self.have_w[a + p / 64] & (1 << (p % 64)) != 0 && self.wants(k, p)));
            if useful && self.has_room(k) {
                self.wake(k);
            }
        }
    }

    /// Whether [`engine::next_with`] may have a request for `k`: the origin is free for
    /// it, or a peer it knows that is neither busy nor at [`Limits::per_peer`] requests
    /// from it has a piece it wants, and it has room for more (a cheap test that spares
    /// most plans that would find nothing).
    fn may_pick(&self, k: usize) -> bool {
        if self.unserved > 0 && self.origin_up < ORIGIN_SLOTS && self.to_origin[k] < self.limits.origin_slots {
            return true;
        }
        if !self.has_room(k) {
            return false;
        }
        if self.unreq[k] == 0 {
            return true;
        }
        let want = &self.want_w[k * self.words..(k + 1) * self.words];
        self.samples[k].iter().zip(&self.views[k]).any(|(&j, v)| {
            self.uploads[j] < UPLOAD_SLOTS
                && v.inflight < self.limits.per_peer
                && self.have_w[j * self.words..(j + 1) * self.words].iter().zip(want).any(|(h, w)| h & w != 0)
        })
    }

    /// Ask [`engine::next_with`] for requests until it has none.
    fn plan(&mut self, k: usize) {
        if !self.done[k].is_nan() {
            return;
        }
        if !self.may_pick(k) {
            return;
        }
        self.plans += 1;
        let mut vs = std::mem::take(&mut self.views[k]);
        let (mut slots, mut swaps) = std::mem::take(&mut self.scratch);
        slots.clear();
        slots.extend(0..vs.len());
        swaps.clear();
        // Busy peers go to the end, out of the view; the swaps are undone afterwards.
        let mut m = vs.len();
        let mut i = 0;
        while i < m {
            if self.uploads[self.samples[k][slots[i]]] >= UPLOAD_SLOTS {
                m -= 1;
                vs.swap(i, m);
                slots.swap(i, m);
                swaps.push((i, m));
            } else {
                i += 1;
            }
        }
        let avail = engine::availability(self.np, &vs[..m]);
        let mut origin_quiet = self.unserved == 0;
        loop {
            // A busy origin is not asked (the agent's request would wait, then come back
            // empty).
            let origin_inflight = if origin_quiet || self.origin_up >= ORIGIN_SLOTS {
                self.limits.origin_slots
            } else {
                self.to_origin[k]
            };
            let v = engine::View { have: &self.have[k], pending: &self.pending[k], peers: &vs[..m], origin_inflight };
            match engine::next_with(&v, &avail, &self.limits, self.salts[k]) {
                Some(Pick::Peer { piece, peer }) => {
                    let pos = slots[peer];
                    let src = self.samples[k][pos];
                    vs[peer].inflight += 1;
                    self.start(k, Some((src, pos)), piece);
                    if self.uploads[src] >= UPLOAD_SLOTS {
                        m -= 1;
                        vs.swap(peer, m);
                        slots.swap(peer, m);
                        swaps.push((peer, m));
                    }
                }
                Some(Pick::Origin) => {
                    let mut skip = self.have[k].clone();
                    for p in 0..self.np {
                        if self.pending[k][p] > 0 || self.served[p] > 0 || vs.iter().any(|v| v.have.get(p)) {
                            skip.set(p);
                        }
                    }
                    match engine::origin_choose(self.np, &skip, &self.zeros, &self.served) {
                        Some(piece) => self.start(k, None, piece),
                        None => origin_quiet = true,
                    }
                }
                None => break,
            }
        }
        for &(a, b) in swaps.iter().rev() {
            vs.swap(a, b);
        }
        self.views[k] = vs;
        self.scratch = (slots, swaps);
    }

    /// A request of `k` for `piece` from `src` (`(node, position in k's sample)`) or the
    /// origin.
    fn start(&mut self, k: usize, src: Option<(usize, usize)>, piece: usize) {
        if self.pending[k][piece] == 0 && !self.have[k].get(piece) {
            self.unreq[k] -= 1;
            self.want_w[k * self.words + piece / 64] &= !(1 << (piece % 64));
        }
        self.pending[k][piece] = self.pending[k][piece].saturating_add(1);
        let (s, pos) = src.unwrap_or((ORIGIN, 0));
        let x = Xfer {
            piece,
            src: s,
            pos,
            dst: k,
            len: self.g.len_of(piece) as f64,
            sent: 0.0,
            got: 0.0,
            at: self.now,
            up: 0.0,
            down: 0.0,
            out: false,
            out_at: f64::INFINITY,
            read_at: f64::INFINITY,
            ver: 0,
            live: true,
            dirty: false,
        };
        let id = match self.free.pop() {
            Some(id) => {
                let ver = self.xfers[id].ver;
                self.xfers[id] = Xfer { ver, ..x };
                id
            }
            None => {
                self.xfers.push(x);
                self.xfers.len() - 1
            }
        };
        self.live += 1;
        self.transfers += 1;
        if s == ORIGIN {
            if self.served[piece] == 0 {
                self.unserved -= 1;
            }
            self.served[piece] += 1;
            self.origin_up += 1;
            self.to_origin[k] += 1;
            self.origin_of.push(id);
            self.mark_origin();
        } else {
            self.uploads[s] += 1;
            self.peer_down[k] += 1;
            self.up_of[s].push(id);
            self.mark_up(s);
            if self.uploads[s] == UPLOAD_SLOTS {
                self.busy.push((s, k));
            }
        }
        self.down_of[k].push(id);
        self.mark_down(k);
    }

    fn mark(&mut self, id: usize) {
        let x = &mut self.xfers[id];
        if !x.dirty {
            x.dirty = true;
            self.dirty.push(id);
        }
    }

    fn mark_up(&mut self, s: usize) {
        for i in 0..self.up_of[s].len() {
            self.mark(self.up_of[s][i]);
        }
    }

    fn mark_down(&mut self, d: usize) {
        for i in 0..self.down_of[d].len() {
            self.mark(self.down_of[d][i]);
        }
    }

    fn mark_origin(&mut self) {
        for i in 0..self.origin_of.len() {
            self.mark(self.origin_of[i]);
        }
    }

    /// Bring a transfer's bytes up to now at its rates.
    fn advance(&mut self, id: usize) {
        let now = self.now;
        let x = &mut self.xfers[id];
        let dt = now - x.at;
        if dt > 0.0 {
            // The destination reads at its rate but never ahead of the source: with
            // constant rates this is exact even when the reader catches up within dt.
            x.sent = (x.sent + x.up * dt).min(x.len);
            x.got = (x.got + x.down * dt).min(x.sent);
        }
        x.at = now;
    }

    /// Recompute the rates of the transfers marked dirty, and reschedule them.
    fn rerate(&mut self) {
        let now = self.now;
        for id in std::mem::take(&mut self.dirty) {
            if !self.xfers[id].live || !self.xfers[id].dirty {
                continue;
            }
            let x = &self.xfers[id];
            let up = match x.src {
                _ if x.out => 0.0,
                ORIGIN => self.b / self.origin_up.max(1) as f64,
                s => self.b / self.uploads[s].max(1) as f64,
            };
            let down = match x.src {
                ORIGIN => self.b,
                _ if self.to_origin[x.dst] > 0 => 0.0,
                _ => self.b / self.peer_down[x.dst].max(1) as f64,
            };
            if up == x.up && down == x.down {
                // Same rates, same schedule: the queued event stands.
                self.xfers[id].dirty = false;
                continue;
            }
            self.advance(id);
            let x = &mut self.xfers[id];
            x.dirty = false;
            x.up = up;
            x.down = down;
            x.ver = x.ver.wrapping_add(1);
            let sending = !x.out;
            x.out_at = match sending {
                true if up > 0.0 => now + (x.len - x.sent) / up,
                true => f64::INFINITY,
                false => now,
            };
            x.read_at = if down > 0.0 { (now + (x.len - x.got) / down).max(x.out_at) } else { f64::INFINITY };
            let t = if sending { x.out_at } else { x.read_at };
            if t.is_finite() {
                self.heap.push(Reverse((t.to_bits(), id, x.ver)));
            }
        }
    }

    /// The scheduled event of a transfer.
    fn fire(&mut self, id: usize) {
        self.advance(id);
        let now = self.now;
        let x = &mut self.xfers[id];
        if !x.out && now >= x.out_at {
            x.sent = x.len;
            x.out = true;
            let (src, piece) = (x.src, x.piece);
            if src == ORIGIN {
                self.origin_up -= 1;
                self.origin_of.retain(|&o| o != id);
                self.egress += self.g.len_of(piece);
                self.mark_origin();
            } else {
                self.uploads[src] -= 1;
                self.up_of[src].retain(|&o| o != id);
                self.mark_up(src);
                if self.uploads[src] + 1 == UPLOAD_SLOTS {
                    self.unbusy(src);
                }
            }
        }
        let x = &mut self.xfers[id];
        if !x.out || now < x.read_at {
            // Its event is spent: reschedule it whatever its rates.
            x.up = f64::NAN;
            self.mark(id);
            return;
        }
        x.got = x.len;
        x.live = false;
        let (src, pos, dst, piece) = (x.src, x.pos, x.dst, x.piece);
        self.live -= 1;
        self.free.push(id);
        self.down_of[dst].retain(|&o| o != id);
        if src == ORIGIN {
            self.to_origin[dst] -= 1;
        } else {
            self.peer_down[dst] -= 1;
            self.views[dst][pos].inflight -= 1;
        }
        self.mark_down(dst);
        self.pending[dst][piece] -= 1;
        if !self.have[dst].get(piece) {
            self.have[dst].set(piece);
            self.gained(dst, piece);
            if self.have[dst].is_full() {
                self.done[dst] = now;
                self.left -= 1;
            }
        }
        self.wake(dst);
    }
}

/// Simulate a swarm (see the module documentation).
pub fn simulate_outcome(a: &SimArgs) -> Outcome {
    let lb = report::lower_bound(a.blob_size, a.nodes, a.rate as f64, a.rate as f64, a.rate as f64);
    if a.nodes == 0 || a.rate == 0 {
        return Outcome { times: Vec::new(), lb, egress: 0.0, transfers: 0, plans: 0 };
    }
    let mut s = Sim::new(a);
    s.run(lb.t * 50.0);
    Outcome {
        times: s.done.iter().copied().filter(|t| !t.is_nan()).collect(),
        lb,
        egress: s.egress as f64 / a.blob_size.max(1) as f64,
        transfers: s.transfers,
        plans: s.plans,
    }
}

/// Completion times (seconds) of every node, the lower bound, and origin egress in
/// multiples of S.
pub fn simulate(a: &SimArgs) -> (Vec<f64>, report::LowerBound, f64) {
    let o = simulate_outcome(a);
    (o.times, o.lb, o.egress)
}

pub fn run(a: &SimArgs) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    let o = simulate_outcome(a);
    let lb = o.lb;
    println!(
        "mwdist simulate: N={} S={} B={}/s; T_LB = {:.2} s (S/U_seed {:.2}, S/min d {:.2}, N·S/(U_seed+Σu) {:.2})",
        a.nodes,
        report::human(a.blob_size),
        report::human(a.rate),
        lb.t,
        lb.seed,
        lb.download,
        lb.aggregate
    );
    report::print_row("simulated p2p", &o.times, lb.t);
    println!(
        "  {} of {} completed; origin egress {:.3}×S; {} transfers, {} plans, {:.1} s wall",
        o.times.len(),
        a.nodes,
        o.egress,
        o.transfers,
        o.plans,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_swarm_completes_near_the_bound() {
        let a = SimArgs { nodes: 50, blob_size: 8 << 20, rate: 4 << 20, seed: 7 };
        let (times, lb, egress) = simulate(&a);
        assert_eq!(times.len(), 50);
        let max = report::quantile(&times, 1.0);
        assert!(max < 2.0 * lb.t, "max {max} vs T_LB {}", lb.t);
        assert!((1.0..1.2).contains(&egress), "{egress}");
    }

    #[test]
    fn planning_leaves_no_node_with_a_request() {
        // `Sim::run` checks after every event that no node could request anything.
        for (nodes, size, seed) in
            [(64, 2 << 20, 1), (40, 4 << 20, 2), (12, 1 << 20, 3), (2, 1 << 20, 4), (1, 1 << 20, 5)]
        {
            let a = SimArgs { nodes, blob_size: size, rate: 4 << 20, seed };
            let (times, _, egress) = simulate(&a);
            assert_eq!(times.len(), nodes);
            assert!((1.0..1.2).contains(&egress), "{egress}");
        }
    }

    #[test]
    fn a_few_hundred_nodes_complete() {
        let a = SimArgs { nodes: 300, blob_size: 4 << 20, rate: 4 << 20, seed: 3 };
        let (times, lb, egress) = simulate(&a);
        assert_eq!(times.len(), 300, "every node completes");
        for q in [0.5, 0.99, 1.0] {
            let r = report::quantile(&times, q) / lb.t;
            assert!(r.is_finite() && r >= 1.0, "q{q}: {r}");
        }
        assert!((1.0..1.2).contains(&egress), "{egress}");
    }
}
