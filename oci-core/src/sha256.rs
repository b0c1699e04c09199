//! SHA-256 that can hash the same bytes into two states in one pass.
//!
//! A layer's bytes are hashed twice while they stream: each file's content for the table
//! of contents, and the whole tar stream for the DiffID. A file's content starts at a
//! 512-byte boundary of the tar stream, so both hashes consume the very same 64-byte
//! blocks from two different states. The message schedule of a block depends only on the
//! block, so [`update_both`] computes it once and runs the rounds of both states
//! interleaved. With the x86 SHA extensions a single stream is bound by the latency of
//! `sha256rnds2`; two independent chains fill the idle issue slots, so two hashes cost
//! little more than one.
//!
//! Written by hand (in `core::arch` intrinsics) because no SHA-256 crate offers this: the
//! `sha2` crate compresses one state at a time. Without the SHA extensions (or off x86-64)
//! blocks go through `sha2::compress256`, so results never depend on the machine; tests
//! compare both paths with `sha2` on random inputs and split points.

// The only unsafe code of the workspace: SIMD loads and stores of 16 bytes within bounds
// checked by the slice types, and calls into functions compiled for CPU features that
// were detected at run time.
#![allow(unsafe_code)]

use sha2::digest::generic_array::GenericArray;

const IV: [u32; 8] = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];

/// A streaming SHA-256 state.
#[derive(Clone)]
pub struct Sha256 {
    state: [u32; 8],
    buf: [u8; 64],
    buffered: usize,
    len: u64,
}

impl Default for Sha256 {
    fn default() -> Self {
        Sha256 { state: IV, buf: [0; 64], buffered: 0, len: 0 }
    }
}

impl Sha256 {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The chaining state, when the bytes hashed so far are a whole number of 64-byte
    /// blocks (nothing buffered): with [`Sha256::resume`] it lets a later run go on from
    /// here without the bytes before.
    pub fn midstate(&self) -> Option<([u32; 8], u64)> {
        (self.buffered == 0).then_some((self.state, self.len))
    }

    /// Go on from a [`Sha256::midstate`]: `len` bytes (a multiple of 64) hashed to `state`.
    pub fn resume(state: [u32; 8], len: u64) -> Option<Self> {
        (len % 64 == 0).then_some(Sha256 { state, buf: [0; 64], buffered: 0, len })
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.buffered > 0 {
            let n = (64 - self.buffered).min(data.len());
            self.buf[self.buffered..self.buffered + n].copy_from_slice(&data[..n]);
            self.buffered += n;
            data = &data[n..];
            if self.buffered < 64 {
                return;
            }
            let block = self.buf;
            compress(&mut self.state, &block);
            self.buffered = 0;
        }
        let whole = data.len() & !63;
        compress(&mut self.state, &data[..whole]);
        let rest = &data[whole..];
        self.buf[..rest.len()].copy_from_slice(rest);
        self.buffered = rest.len();
    }

    pub fn finalize(mut self) -> [u8; 32] {
        let bits = self.len.wrapping_mul(8);
        let mut tail = [0u8; 128];
        tail[..self.buffered].copy_from_slice(&self.buf[..self.buffered]);
        tail[self.buffered] = 0x80;
        let total = if self.buffered < 56 { 64 } else { 128 };
        tail[total - 8..total].copy_from_slice(&bits.to_be_bytes());
        compress(&mut self.state, &tail[..total]);
        let mut out = [0u8; 32];
        for (o, w) in out.chunks_exact_mut(4).zip(self.state) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        out
    }
}

/// Feed the same bytes to two states. When both stand at the same point of a block (the
/// common case: see the module documentation) the whole blocks are hashed in one
/// interleaved pass; otherwise each state takes the bytes on its own.
pub fn update_both(a: &mut Sha256, b: &mut Sha256, mut data: &[u8]) {
    if a.buffered != b.buffered || a.buf[..a.buffered] != b.buf[..b.buffered] {
        a.update(data);
        b.update(data);
        return;
    }
    // Both hold the same partial block (e.g. a read that ended mid-block): complete it
    // for both, then go on in step.
    if a.buffered > 0 {
        let n = (64 - a.buffered).min(data.len());
        a.update(&data[..n]);
        b.update(&data[..n]);
        data = &data[n..];
        if a.buffered != 0 {
            return;
        }
    }
    let whole = data.len() & !63;
    compress2(&mut a.state, &mut b.state, &data[..whole]);
    a.len += whole as u64;
    b.len += whole as u64;
    a.update(&data[whole..]);
    b.update(&data[whole..]);
}

fn compress(state: &mut [u32; 8], blocks: &[u8]) {
    compress_into(state, None, blocks);
}

fn compress2(a: &mut [u32; 8], b: &mut [u32; 8], blocks: &[u8]) {
    compress_into(a, Some(b), blocks);
}

/// Compress whole blocks into `a`, and into `b` too when given.
fn compress_into(a: &mut [u32; 8], mut b: Option<&mut [u32; 8]>, blocks: &[u8]) {
    if blocks.is_empty() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if ni::available() {
        // SAFETY: the CPU has the features `ni::compress` is compiled for (checked above).
        unsafe { ni::compress(a, b, blocks) };
        return;
    }
    for block in blocks.chunks_exact(64) {
        let block = std::slice::from_ref(GenericArray::from_slice(block));
        sha2::compress256(a, block);
        if let Some(b) = b.as_deref_mut() {
            sha2::compress256(b, block);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod ni {
    use core::arch::x86_64::*;

    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
        0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
        0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
        0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
        0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
        0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
        0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];

    pub fn available() -> bool {
        std::is_x86_feature_detected!("sha")
            && std::is_x86_feature_detected!("sse2")
            && std::is_x86_feature_detected!("ssse3")
            && std::is_x86_feature_detected!("sse4.1")
    }

    /// The state as the two vectors `sha256rnds2` works on: (ABEF, CDGH).
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    fn load(s: &[u32; 8]) -> (__m128i, __m128i) {
        let lo = _mm_set_epi32(s[3] as i32, s[2] as i32, s[1] as i32, s[0] as i32);
        let hi = _mm_set_epi32(s[7] as i32, s[6] as i32, s[5] as i32, s[4] as i32);
        let cdab = _mm_shuffle_epi32(lo, 0xB1);
        let efgh = _mm_shuffle_epi32(hi, 0x1B);
        (_mm_alignr_epi8(cdab, efgh, 8), _mm_blend_epi16(efgh, cdab, 0xF0))
    }

    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    fn store(s: &mut [u32; 8], abef: __m128i, cdgh: __m128i) {
        let feba = _mm_shuffle_epi32(abef, 0x1B);
        let dchg = _mm_shuffle_epi32(cdgh, 0xB1);
        let dcba = _mm_blend_epi16(feba, dchg, 0xF0);
        let hgfe = _mm_alignr_epi8(dchg, feba, 8);
        s[..4].copy_from_slice(&lanes(dcba));
        s[4..].copy_from_slice(&lanes(hgfe));
    }

    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    fn lanes(v: __m128i) -> [u32; 4] {
        [
            _mm_cvtsi128_si32(v) as u32,
            _mm_extract_epi32(v, 1) as u32,
            _mm_extract_epi32(v, 2) as u32,
            _mm_extract_epi32(v, 3) as u32,
        ]
    }

    /// Compress `blocks` (a multiple of 64 bytes) into `a`, and into `b` too when given.
    ///
    /// # Safety
    /// The CPU must support SHA, SSE2, SSSE3 and SSE4.1 ([`available`]).
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub unsafe fn compress(a: &mut [u32; 8], b: Option<&mut [u32; 8]>, blocks: &[u8]) {
        let swap = _mm_set_epi64x(0x0c0d0e0f08090a0b, 0x0405060700010203);
        let mut k = [_mm_setzero_si128(); 16];
        for (i, v) in k.iter_mut().enumerate() {
            *v = _mm_set_epi32(K[4 * i + 3] as i32, K[4 * i + 2] as i32, K[4 * i + 1] as i32, K[4 * i] as i32);
        }
        let (mut a0, mut a1) = load(a);
        let two = b.is_some();
        let (mut b0, mut b1) = match &b {
            Some(b) => load(b),
            None => (a0, a1),
        };
        for block in blocks.chunks_exact(64) {
            // The message schedule is computed four words ahead of the rounds that use it,
            // in four registers, and shared by both states.
            let mut m = [_mm_setzero_si128(); 4];
            for (i, v) in m.iter_mut().enumerate() {
                // SAFETY: `block` is 64 bytes long, so bytes 16·i..16·i+16 (i < 4) are in it;
                // the load is unaligned.
                let x = unsafe { _mm_loadu_si128(block.as_ptr().add(16 * i).cast()) };
                *v = _mm_shuffle_epi8(x, swap);
            }
            let (sa0, sa1, sb0, sb1) = (a0, a1, b0, b1);
            for i in 0..16 {
                let wk = _mm_add_epi32(m[i % 4], k[i]);
                let wk_hi = _mm_shuffle_epi32(wk, 0x0E);
                a1 = _mm_sha256rnds2_epu32(a1, a0, wk);
                if two {
                    b1 = _mm_sha256rnds2_epu32(b1, b0, wk);
                }
                if i < 12 {
                    let t = _mm_add_epi32(
                        _mm_sha256msg1_epu32(m[i % 4], m[(i + 1) % 4]),
                        _mm_alignr_epi8(m[(i + 3) % 4], m[(i + 2) % 4], 4),
                    );
                    m[i % 4] = _mm_sha256msg2_epu32(t, m[(i + 3) % 4]);
                }
                a0 = _mm_sha256rnds2_epu32(a0, a1, wk_hi);
                if two {
                    b0 = _mm_sha256rnds2_epu32(b0, b1, wk_hi);
                }
            }
            a0 = _mm_add_epi32(a0, sa0);
            a1 = _mm_add_epi32(a1, sa1);
            b0 = _mm_add_epi32(b0, sb0);
            b1 = _mm_add_epi32(b1, sb1);
        }
        store(a, a0, a1);
        if let Some(b) = b {
            store(b, b0, b1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng as _, SeedableRng as _};
    use sha2::Digest as _;

    #[test]
    fn resuming_a_midstate_equals_hashing_everything() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut whole = Sha256::new();
        whole.update(&data[..640]);
        assert!(Sha256::resume([0; 8], 65).is_none(), "a midstate is block-aligned");
        let mut part = whole.clone();
        part.update(&data[640..641]);
        assert!(part.midstate().is_none(), "bytes are buffered");
        let (state, len) = whole.midstate().expect("aligned");
        assert_eq!(len, 640);
        let mut resumed = Sha256::resume(state, len).expect("aligned");
        resumed.update(&data[640..]);
        assert_eq!(resumed.finalize(), reference(&data));
    }

    fn reference(data: &[u8]) -> [u8; 32] {
        sha2::Sha256::digest(data).into()
    }

    #[test]
    fn known_answers() {
        let empty = Sha256::new().finalize();
        assert_eq!(hex::encode(empty), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        let mut h = Sha256::new();
        h.update(b"abc");
        assert_eq!(hex::encode(h.finalize()), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn equals_sha2_for_every_length_and_split() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let data: Vec<u8> = (0..4096).map(|_| rng.gen()).collect();
        for len in (0..300).chain([511, 512, 513, 1000, 4095, 4096]) {
            let d = &data[..len];
            let mut one = Sha256::new();
            one.update(d);
            assert_eq!(one.finalize(), reference(d), "len {len}");
            for _ in 0..4 {
                let cut = rng.gen_range(0..=len);
                let mut h = Sha256::new();
                h.update(&d[..cut]);
                h.update(&d[cut..]);
                assert_eq!(h.finalize(), reference(d), "len {len} cut {cut}");
            }
        }
    }

    #[test]
    fn both_states_equal_separate_hashes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for round in 0..200 {
            // A prefix only one stream sees (block-aligned or not), then shared chunks.
            let prefix_len = if round % 2 == 0 { 64 * rng.gen_range(0..8) } else { rng.gen_range(0..700) };
            let prefix: Vec<u8> = (0..prefix_len).map(|_| rng.gen()).collect();
            let mut shared = Vec::new();
            let mut a = Sha256::new();
            let mut b = Sha256::new();
            b.update(&prefix);
            for _ in 0..rng.gen_range(1..6) {
                let n = rng.gen_range(0..3000);
                let chunk: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                update_both(&mut a, &mut b, &chunk);
                shared.extend_from_slice(&chunk);
            }
            assert_eq!(a.len(), shared.len() as u64);
            let mut whole = prefix.clone();
            whole.extend_from_slice(&shared);
            assert_eq!(a.finalize(), reference(&shared), "round {round}");
            assert_eq!(b.finalize(), reference(&whole), "round {round}");
        }
    }

    #[test]
    fn portable_path_equals_the_sha_extensions() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let data: Vec<u8> = (0..64 * 33).map(|_| rng.gen()).collect();
        let (mut a, mut b) = (IV, IV);
        for block in data.chunks_exact(64) {
            sha2::compress256(&mut a, std::slice::from_ref(GenericArray::from_slice(block)));
        }
        b[0] ^= 1;
        let mut b_ref = b;
        for block in data.chunks_exact(64) {
            sha2::compress256(&mut b_ref, std::slice::from_ref(GenericArray::from_slice(block)));
        }
        let (mut x, mut y) = (IV, b);
        compress2(&mut x, &mut y, &data);
        assert_eq!((x, y), (a, b_ref));
        let mut z = IV;
        compress(&mut z, &data);
        assert_eq!(z, a);
    }
}
