//! Content digests (`sha256:<64 hex>`), and a writer that hashes what passes through it.

use sha2::{Digest as _, Sha256};
use std::fmt;
use std::io::{self, Write};
use std::str::FromStr;

/// A validated `sha256:<hex>` content digest. Other algorithms are refused: every image
/// this project makes or reads uses sha256, and accepting an algorithm we cannot verify
/// would let unverified content through.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    // Boxed rather than a String: digests are embedded in many error values.
    hex: Box<str>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("digest {0:?} is not of the form sha256:<64 lowercase hex digits>")]
    Malformed(String),
    #[error("digest {0:?} uses an unsupported algorithm; only sha256 is accepted")]
    UnsupportedAlgorithm(String),
}

impl Digest {
    /// Digest of a byte slice.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_sha256(Sha256::digest(bytes).into())
    }

    pub fn from_sha256(raw: [u8; 32]) -> Self {
        Digest { hex: hex::encode(raw).into() }
    }

    /// The 64 hex digits without the algorithm.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    pub fn algorithm(&self) -> &'static str {
        "sha256"
    }

    /// A short form for humans: the first 12 hex digits.
    pub fn short(&self) -> &str {
        &self.hex[..12]
    }

    pub fn to_oci(&self) -> oci_spec::image::Digest {
        // Our digests are always valid sha256 digests, which oci-spec accepts.
        oci_spec::image::Digest::from_str(&self.to_string())
            .unwrap_or_else(|_| unreachable!("validated sha256 digest rejected by oci-spec"))
    }

    pub fn from_oci(d: &oci_spec::image::Digest) -> Result<Self, DigestError> {
        d.to_string().parse()
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((alg, hex)) = s.split_once(':') else {
            return Err(DigestError::Malformed(s.to_string()));
        };
        if alg != "sha256" {
            return Err(DigestError::UnsupportedAlgorithm(s.to_string()));
        }
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(DigestError::Malformed(s.to_string()));
        }
        Ok(Digest { hex: hex.into() })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Incremental sha256 plus a byte count.
#[derive(Clone, Default)]
pub struct Hasher {
    inner: crate::sha256::Sha256,
}

impl Hasher {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, bytes: &[u8]) {
        self.inner.update(bytes);
    }
    /// Hash the same bytes into two hashers in one pass (see [`crate::sha256`]): e.g. a
    /// file's content hasher and the hasher of the tar stream that carries it.
    pub fn update_both(a: &mut Hasher, b: &mut Hasher, bytes: &[u8]) {
        crate::sha256::update_both(&mut a.inner, &mut b.inner, bytes);
    }
    pub fn len(&self) -> u64 {
        self.inner.len()
    }
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }
    pub fn finish(self) -> (Digest, u64) {
        let len = self.inner.len();
        (Digest::from_sha256(self.inner.finalize()), len)
    }
    /// Where this hash stands, when it stands at a 64-byte boundary (see [`Midstate`]).
    pub fn midstate(&self) -> Option<Midstate> {
        let (state, len) = self.inner.midstate()?;
        let mut raw = [0u8; 32];
        for (o, w) in raw.chunks_exact_mut(4).zip(state) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        Some(Midstate { len, state: hex::encode(raw) })
    }
    /// A hasher that goes on from `m`, as if the `m.len` bytes before had been hashed.
    /// `None` for a malformed midstate.
    pub fn resume(m: &Midstate) -> Option<Hasher> {
        let raw = hex::decode(&m.state).ok()?;
        if raw.len() != 32 {
            return None;
        }
        let mut state = [0u32; 8];
        for (w, c) in state.iter_mut().zip(raw.chunks_exact(4)) {
            *w = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        Some(Hasher { inner: crate::sha256::Sha256::resume(state, m.len)? })
    }
}

/// The SHA-256 chaining state after `len` bytes (a multiple of 64), as 64 hex digits:
/// kept so that a later hash of a stream with the same first `len` bytes can start here.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Midstate {
    pub len: u64,
    pub state: String,
}

/// A writer that hashes and counts every byte it forwards.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Hasher::new() }
    }
    pub fn finish(self) -> (W, Digest, u64) {
        let (d, n) = self.hasher.finish();
        (self.inner, d, n)
    }
    pub fn get_ref(&self) -> &W {
        &self.inner
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Hash a reader to its end.
pub fn digest_reader<R: io::Read>(mut r: R) -> io::Result<(Digest, u64)> {
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hasher_resumed_from_its_midstate_gives_the_same_digest() {
        let data = vec![7u8; 3000];
        let mut h = Hasher::new();
        h.update(&data[..1024]);
        let m = h.midstate().expect("1024 bytes are whole blocks");
        let mut r = Hasher::resume(&m).expect("valid");
        r.update(&data[1024..]);
        assert_eq!(r.finish(), (Digest::of(&data), 3000));
        assert!(Hasher::resume(&Midstate { len: 64, state: "00".into() }).is_none());
        h.update(&data[..1]);
        assert!(h.midstate().is_none());
    }

    #[test]
    fn empty_digest_is_well_known() {
        assert_eq!(
            Digest::of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn parse_rejects_bad_forms() {
        for bad in [
            "",
            "sha256",
            "sha256:abc",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:../../../../etc/passwd0000000000000000000000000000000000000000000",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad} accepted");
        }
        let d = Digest::of(b"x");
        assert_eq!(d.to_string().parse::<Digest>(), Ok(d));
    }

    #[test]
    fn hashing_writer_matches_of() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"hello ").and_then(|_| w.write_all(b"world")).expect("write to vec");
        let (v, d, n) = w.finish();
        assert_eq!(v, b"hello world");
        assert_eq!(n, 11);
        assert_eq!(d, Digest::of(b"hello world"));
    }
}
