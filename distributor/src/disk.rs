//! Positional file I/O for pieces. Storage is synchronous on purpose: pieces are at most
//! [`crate::pieces::MAX_PIECE`] bytes and go to and from the page cache, so a short
//! blocking call on a runtime worker costs less than a hop to the blocking pool.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;

/// Read `len` bytes at `offset`.
pub fn read_at(f: &File, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    let len = usize::try_from(len).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "piece too large"))?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

pub fn write_at(f: &File, offset: u64, bytes: &[u8]) -> io::Result<()> {
    f.write_all_at(bytes, offset)
}

/// SHA-256 of a whole file.
pub fn digest_file(path: &std::path::Path) -> io::Result<(oci_core::Digest, u64)> {
    oci_core::digest::digest_reader(io::BufReader::new(File::open(path)?))
}

/// The complete blobs in a `blobs/` directory (files named by their hex digest), with
/// their mtime (recency, for LRU eviction) and size. Unreadable or foreign names are left
/// out.
pub fn list_blobs(dir: &std::path::Path) -> Vec<(std::time::SystemTime, u64, oci_core::Digest)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let d: oci_core::Digest = format!("sha256:{}", e.file_name().to_string_lossy()).parse().ok()?;
            let m = e.metadata().ok()?;
            Some((m.modified().ok()?, m.len(), d))
        })
        .collect()
}
