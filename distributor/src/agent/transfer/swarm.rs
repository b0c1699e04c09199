//! The peers one transfer knows, kept ready for planning.
//!
//! The driver plans after every event (a piece in, a busy answer, an announcement), and
//! at N=100 that is thousands of times a second on one machine. Rebuilding the planner's
//! inputs each time (every peer's address and bitfield cloned, the availability counted
//! again over every peer) took about a tenth of the CPU of `mwdist bench`. Here they
//! live across rounds and change only with what changed: [`Swarm::avail`] is kept up to
//! date as bitfields are replaced, peers come and go, and peers refuse (busy) or come
//! back.
//!
//! Invariant: `avail[i]` is the number of peers `j` with `views[j].have` holding `i`,
//! and `views[j].have` is the peer's bitfield while it is usable, empty while it is
//! busy (so that the planner neither asks it nor counts it), its real bitfield then
//! being kept in `held[j]`.

use crate::engine::PeerView;
use crate::pieces::Bitfield;
use std::collections::HashMap;
use std::time::Instant;

pub(super) struct Swarm {
    n: usize,
    addrs: Vec<String>,
    views: Vec<PeerView>,
    /// While a peer is busy: until when, and its bitfield (its view's is empty).
    busy: Vec<Option<(Instant, Bitfield)>>,
    index: HashMap<String, usize>,
    avail: Vec<u32>,
}

impl Swarm {
    pub fn new(n: usize) -> Self {
        Swarm { n, addrs: Vec::new(), views: Vec::new(), busy: Vec::new(), index: HashMap::new(), avail: vec![0; n] }
    }

    /// The planner's inputs: peers (by index), their addresses, and copies per piece
    /// among the usable ones.
    pub fn views(&self) -> &[PeerView] {
        &self.views
    }

    pub fn addr(&self, j: usize) -> Option<&str> {
        self.addrs.get(j).map(String::as_str)
    }

    pub fn avail(&self) -> &[u32] {
        &self.avail
    }

    fn slot(&mut self, addr: &str) -> usize {
        if let Some(&j) = self.index.get(addr) {
            return j;
        }
        let j = self.views.len();
        self.addrs.push(addr.to_string());
        self.views.push(PeerView { have: Bitfield::new(self.n), inflight: 0 });
        self.busy.push(None);
        self.index.insert(addr.to_string(), j);
        j
    }

    /// Record `addr`'s current bitfield (adding the peer if it is new).
    pub fn set_have(&mut self, addr: &str, have: Bitfield) {
        if have.len() != self.n {
            return;
        }
        let j = self.slot(addr);
        if let Some((_, held)) = &mut self.busy[j] {
            *held = have;
            return;
        }
        let v = &mut self.views[j];
        v.have.sub_from(&mut self.avail);
        have.add_to(&mut self.avail);
        v.have = have;
    }

    /// A request to peer `j` was made (`+1`) or ended (`-1`).
    pub fn inflight_add(&mut self, j: usize) {
        if let Some(v) = self.views.get_mut(j) {
            v.inflight += 1;
        }
    }

    pub fn inflight_done(&mut self, addr: &str) {
        if let Some(&j) = self.index.get(addr) {
            self.views[j].inflight = self.views[j].inflight.saturating_sub(1);
        }
    }

    pub fn clear_inflight(&mut self) {
        self.views.iter_mut().for_each(|v| v.inflight = 0);
    }

    /// `addr` does not hold piece `i` after all (it failed to serve it).
    pub fn lost_piece(&mut self, addr: &str, i: usize) {
        let Some(&j) = self.index.get(addr) else { return };
        if let Some((_, held)) = &mut self.busy[j] {
            held.clear(i);
        } else if self.views[j].have.get(i) {
            self.views[j].have.clear(i);
            if let Some(c) = self.avail.get_mut(i) {
                *c = c.saturating_sub(1);
            }
        }
    }

    /// `addr` refused (all its upload slots taken): leave it alone until `until`.
    pub fn set_busy(&mut self, addr: &str, until: Instant) {
        let Some(&j) = self.index.get(addr) else { return };
        match &mut self.busy[j] {
            Some((t, _)) => *t = until,
            None => {
                let have = std::mem::replace(&mut self.views[j].have, Bitfield::new(self.n));
                have.sub_from(&mut self.avail);
                self.busy[j] = Some((until, have));
            }
        }
    }

    /// Bring back the peers whose busy time has passed.
    pub fn expire_busy(&mut self, now: Instant) {
        for j in 0..self.views.len() {
            if self.busy[j].as_ref().is_some_and(|(t, _)| *t <= now) {
                if let Some((_, have)) = self.busy[j].take() {
                    have.add_to(&mut self.avail);
                    self.views[j].have = have;
                }
            }
        }
    }

    /// Forget `addr` (dropped for bad bytes, or gone from the tracker).
    pub fn remove(&mut self, addr: &str) {
        let Some(j) = self.index.remove(addr) else { return };
        self.views[j].have.sub_from(&mut self.avail);
        self.views.swap_remove(j);
        self.busy.swap_remove(j);
        self.addrs.swap_remove(j);
        if let Some(moved) = self.addrs.get(j) {
            self.index.insert(moved.clone(), j);
        }
    }

    /// Keep only the peers `keep` accepts or that still have requests of ours in flight.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        let gone: Vec<String> = self
            .addrs
            .iter()
            .zip(&self.views)
            .filter(|(a, v)| v.inflight == 0 && !keep(a))
            .map(|(a, _)| a.clone())
            .collect();
        for a in gone {
            self.remove(&a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::time::Duration;

    fn check(s: &Swarm) {
        assert_eq!(s.avail, crate::engine::availability(s.n, &s.views), "availability kept up to date");
        assert_eq!(s.index.len(), s.views.len());
        for (a, &j) in &s.index {
            assert_eq!(&s.addrs[j], a, "index points at its peer");
        }
        for (v, b) in s.views.iter().zip(&s.busy) {
            if b.is_some() {
                assert_eq!(v.have.count(), 0, "a busy peer offers nothing");
            }
        }
    }

    #[test]
    fn availability_follows_every_change() {
        let n = 40;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut s = Swarm::new(n);
        let t0 = Instant::now();
        let mut now = t0;
        let random_bits = |rng: &mut rand_chacha::ChaCha8Rng| {
            let mut b = Bitfield::new(n);
            for i in 0..n {
                if rng.gen_bool(0.4) {
                    b.set(i);
                }
            }
            b
        };
        for step in 0..3000 {
            let addr = format!("p{}", rng.gen_range(0..12));
            match rng.gen_range(0..8) {
                0 | 1 => s.set_have(&addr, random_bits(&mut rng)),
                2 => s.remove(&addr),
                3 => s.set_busy(&addr, now + Duration::from_millis(rng.gen_range(1..50))),
                4 => {
                    now += Duration::from_millis(rng.gen_range(0..30));
                    s.expire_busy(now);
                }
                5 => s.lost_piece(&addr, rng.gen_range(0..n)),
                6 => {
                    if !s.views().is_empty() {
                        s.inflight_add(rng.gen_range(0..s.views().len()));
                    }
                    s.inflight_done(&addr);
                }
                _ => {
                    let drop = format!("p{}", rng.gen_range(0..12));
                    s.retain(|a| a != drop);
                }
            }
            check(&s);
            assert!(step < 10 || s.views().len() <= 12);
        }
        // A busy peer's bitfield comes back, with what it gained meanwhile.
        let mut s = Swarm::new(4);
        let mut b = Bitfield::new(4);
        b.set(1);
        s.set_have("a", b.clone());
        s.set_busy("a", t0 + Duration::from_millis(10));
        assert_eq!(s.avail(), &[0, 0, 0, 0]);
        b.set(2);
        s.set_have("a", b);
        s.expire_busy(t0 + Duration::from_millis(5));
        assert_eq!(s.avail(), &[0, 0, 0, 0], "still busy");
        s.expire_busy(t0 + Duration::from_millis(10));
        assert_eq!(s.avail(), &[0, 1, 1, 0]);
        // Peers with requests in flight stay.
        s.inflight_add(0);
        s.retain(|_| false);
        assert_eq!(s.views().len(), 1);
        s.inflight_done("a");
        s.retain(|_| false);
        assert_eq!(s.views().len(), 0);
        assert_eq!(s.avail(), &[0, 0, 0, 0]);
    }
}
