//! The piece model: how a blob is cut into pieces, the per-piece SHA-256 list (the
//! "piece manifest") the origin computes while the blob streams in, and a compact
//! bitfield. Pure code, no I/O.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Smallest and largest piece sizes. Small pieces shorten the pipeline (a piece must be
/// whole and verified before it is re-served); large ones keep the per-piece overhead
/// (requests, hash list, tracker bitfields) small. A blob gets about
/// [`TARGET_PIECES`] pieces between these bounds.
pub const MIN_PIECE: u64 = 64 << 10;
pub const MAX_PIECE: u64 = 4 << 20;
pub const TARGET_PIECES: u64 = 512;

/// The piece size for a blob of `size` bytes: a power of two, a pure function of the
/// size so that every node agrees without asking.
pub fn piece_size_for(size: u64) -> u64 {
    let want = size.div_ceil(TARGET_PIECES).max(1);
    want.next_power_of_two().clamp(MIN_PIECE, MAX_PIECE)
}

/// Geometry of one blob's pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    pub size: u64,
    pub piece_size: u64,
}

impl Geometry {
    pub fn for_size(size: u64) -> Self {
        Geometry { size, piece_size: piece_size_for(size) }
    }

    /// Number of pieces (0 for an empty blob).
    pub fn count(&self) -> usize {
        usize::try_from(self.size.div_ceil(self.piece_size)).unwrap_or(usize::MAX)
    }

    /// Byte range `[start, end)` of piece `i`.
    pub fn range(&self, i: usize) -> (u64, u64) {
        let start = (i as u64).saturating_mul(self.piece_size).min(self.size);
        (start, start.saturating_add(self.piece_size).min(self.size))
    }

    pub fn len_of(&self, i: usize) -> u64 {
        let (s, e) = self.range(i);
        e - s
    }

    /// The piece holding byte `offset`.
    pub fn piece_at(&self, offset: u64) -> usize {
        usize::try_from(offset / self.piece_size).unwrap_or(usize::MAX)
    }
}

/// SHA-256 of a piece, lowercase hex.
pub fn piece_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// What the origin knows about a blob's pieces: the geometry, the hashes computed so
/// far (in order: piece `i` is known once `hashes.len() > i`), and whether the whole
/// blob has been verified against its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceManifest {
    pub size: u64,
    pub piece_size: u64,
    pub hashes: Vec<String>,
    pub complete: bool,
    /// Set when the upstream blob did not match its digest (or could not be read): the
    /// blob must not be spread.
    pub failed: Option<String>,
}

impl PieceManifest {
    pub fn geometry(&self) -> Geometry {
        Geometry { size: self.size, piece_size: self.piece_size }
    }

    /// Whether the manifest is well formed for its geometry (so that indexing is safe).
    pub fn check(&self) -> Result<(), String> {
        let g = Geometry::for_size(self.size);
        if g.piece_size != self.piece_size {
            return Err(format!(
                "piece size {} is not {} for a blob of {} bytes",
                self.piece_size, g.piece_size, self.size
            ));
        }
        if self.hashes.len() > g.count() || (self.complete && self.hashes.len() != g.count()) {
            return Err(format!("{} piece hashes for {} pieces", self.hashes.len(), g.count()));
        }
        if !self.hashes.iter().all(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())) {
            return Err("a piece hash is not 64 hex digits".into());
        }
        Ok(())
    }
}

/// A fixed-length set of piece indexes, serialised as hex of a big-endian bit string
/// (piece 0 is the high bit of the first byte).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bitfield {
    bits: Vec<u8>,
    len: usize,
    ones: usize,
}

impl Bitfield {
    pub fn new(len: usize) -> Self {
        Bitfield { bits: vec![0; len.div_ceil(8)], len, ones: 0 }
    }

    pub fn full(len: usize) -> Self {
        let mut b = Self::new(len);
        for i in 0..len {
            b.set(i);
        }
        b
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn count(&self) -> usize {
        self.ones
    }

    pub fn is_full(&self) -> bool {
        self.ones == self.len
    }

    pub fn get(&self, i: usize) -> bool {
        i < self.len && self.bits[i / 8] & (0x80 >> (i % 8)) != 0
    }

    pub fn set(&mut self, i: usize) {
        if i < self.len && !self.get(i) {
            self.bits[i / 8] |= 0x80 >> (i % 8);
            self.ones += 1;
        }
    }

    pub fn clear(&mut self, i: usize) {
        if self.get(i) {
            self.bits[i / 8] &= !(0x80 >> (i % 8));
            self.ones -= 1;
        }
    }

    /// Add 1 to `counts[i]` for every piece `i` in the set (a byte at a time).
    pub fn add_to(&self, counts: &mut [u32]) {
        for (byte, chunk) in self.bits.iter().zip(counts.chunks_mut(8)) {
            if *byte == 0 {
                continue;
            }
            for (j, c) in chunk.iter_mut().enumerate() {
                *c += u32::from((byte >> (7 - j)) & 1);
            }
        }
    }

    /// Take 1 from `counts[i]` for every piece `i` in the set (the inverse of
    /// [`Self::add_to`]; counts never go below 0).
    pub fn sub_from(&self, counts: &mut [u32]) {
        for (byte, chunk) in self.bits.iter().zip(counts.chunks_mut(8)) {
            if *byte == 0 {
                continue;
            }
            for (j, c) in chunk.iter_mut().enumerate() {
                *c = c.saturating_sub(u32::from((byte >> (7 - j)) & 1));
            }
        }
    }

    pub fn to_hex(&self) -> String {
        hex::encode(&self.bits)
    }

    /// Parse `len` bits from hex; bits beyond `len` must be zero.
    pub fn from_hex(s: &str, len: usize) -> Option<Self> {
        let bits = hex::decode(s).ok()?;
        if bits.len() != len.div_ceil(8) {
            return None;
        }
        let mut b = Bitfield { bits, len, ones: 0 };
        let total: usize = b.bits.iter().map(|x| x.count_ones() as usize).sum();
        b.ones = (0..len).filter(|&i| b.get(i)).count();
        (total == b.ones).then_some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piece_sizes_adapt_to_the_blob() {
        for (size, piece) in [
            (0, MIN_PIECE),
            (1, MIN_PIECE),
            (16 << 20, MIN_PIECE),
            (64 << 20, 128 << 10),
            (1 << 30, 2 << 20),
            (4 << 30, MAX_PIECE),
        ] {
            assert_eq!(piece_size_for(size), piece, "size {size}");
        }
    }

    #[test]
    fn ranges_cover_the_blob_exactly() {
        for size in [0u64, 1, 65535, 65536, 65537, 10 << 20, (16 << 20) + 3] {
            let g = Geometry::for_size(size);
            let mut next = 0;
            for i in 0..g.count() {
                let (s, e) = g.range(i);
                assert_eq!(s, next);
                assert!(e > s);
                assert_eq!(g.piece_at(s), i);
                next = e;
            }
            assert_eq!(next, size);
        }
    }

    #[test]
    fn bitfield_round_trips_and_rejects_stray_bits() {
        let mut b = Bitfield::new(11);
        for i in [0, 3, 10, 11, 99] {
            b.set(i);
        }
        assert_eq!(b.count(), 3);
        assert!(b.get(10) && !b.get(11));
        let h = b.to_hex();
        assert_eq!(Bitfield::from_hex(&h, 11).as_ref(), Some(&b));
        assert_eq!(Bitfield::from_hex("ffff", 11), None, "bits past the end");
        assert_eq!(Bitfield::from_hex("ff", 11), None, "wrong length");
        assert!(Bitfield::full(9).is_full());
        let mut counts = vec![0; 11];
        b.add_to(&mut counts);
        Bitfield::full(11).add_to(&mut counts);
        assert_eq!(counts, [2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2]);
    }

    #[test]
    fn manifest_check_refuses_bad_geometry() {
        let mut m = PieceManifest {
            size: 100,
            piece_size: MIN_PIECE,
            hashes: vec![piece_hash(b"x")],
            complete: true,
            failed: None,
        };
        m.check().expect("well formed");
        m.piece_size = 1;
        assert!(m.check().is_err());
        m.piece_size = MIN_PIECE;
        m.hashes.push(piece_hash(b"y"));
        assert!(m.check().is_err());
    }
}
