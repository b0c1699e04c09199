//! Unit tests of the tar reader, on bytes written header by header.

use super::*;
use crate::testing::RawTar;

fn all(bytes: &[u8]) -> Result<Vec<(Header, Vec<u8>)>, TarError> {
    let mut r = TarReader::new(bytes, 1000);
    let mut out = Vec::new();
    while let Some(h) = r.next_entry()? {
        let mut v = Vec::new();
        r.read_to_end(&mut v).map_err(TarError::Io)?;
        out.push((h, v));
    }
    Ok(out)
}

#[test]
fn reads_what_was_written() -> Result<(), TarError> {
    let long = format!("d/{}", "n".repeat(150));
    let mut t = RawTar::new();
    t.dir("d/", 0o755).file("d/f", 0o644, b"hello").symlink("d/l", "f").hardlink("d/h", "d/f");
    t.pax(&[("path", long.as_bytes()), ("mtime", b"1.5")]).file("ignored-name", 0o600, b"x");
    let bytes = t.finish();
    let e = all(&bytes)?;
    assert_eq!(e.len(), 5);
    assert_eq!((e[0].0.kind, e[0].0.path.as_slice()), (Kind::Dir, &b"d/"[..]));
    assert_eq!((e[1].0.kind, e[1].1.as_slice()), (Kind::File, &b"hello"[..]));
    assert_eq!((e[2].0.kind, e[2].0.link.as_slice()), (Kind::Symlink, &b"f"[..]));
    assert_eq!(e[3].0.kind, Kind::Hardlink);
    assert_eq!((e[4].0.path.clone(), e[4].0.mode), (long.into_bytes(), 0o600));
    Ok(())
}

#[test]
fn refuses_pax_size_disagreeing_with_the_header() {
    let mut t = RawTar::new();
    t.pax(&[("size", b"0")]).file("a", 0o644, b"smuggled");
    assert!(matches!(all(&t.finish()), Err(TarError::SizeMismatch { pax: 0, ustar: 8, .. })));
    // A saturated header field with a larger PAX size is how big files are written.
    let mut t = RawTar::new();
    t.pax(&[("size", b"8589934592")]).header(b"big", b'0', 0o644, 0o77777777777, b"");
    let mut r = TarReader::new(&t.buf[..], 10);
    assert!(matches!(r.next_entry(), Ok(Some(Header { size: 8589934592, .. }))));
}

#[test]
fn refuses_sparse_special_and_sized_non_files() {
    let mut t = RawTar::new();
    t.header(b"s", b'S', 0o644, 0, b"");
    assert!(matches!(all(&t.finish()), Err(TarError::Sparse { .. })));
    let mut t = RawTar::new();
    t.pax(&[("GNU.sparse.major", b"1")]).file("s", 0o644, b"");
    assert!(matches!(all(&t.finish()), Err(TarError::Sparse { .. })));
    let mut t = RawTar::new();
    t.header(b"v", b'V', 0o644, 0, b"");
    assert!(matches!(all(&t.finish()), Err(TarError::UnsupportedType { flag: 'V', .. })));
    let mut t = RawTar::new();
    t.header(b"d/", b'5', 0o755, 512, b"").data(&[0u8; 512]);
    assert!(matches!(all(&t.finish()), Err(TarError::NonZeroSize { .. })));
    let mut t = RawTar::new();
    t.header(b"l", b'2', 0o777, 3, b"x").data(b"abc");
    assert!(matches!(all(&t.finish()), Err(TarError::NonZeroSize { .. })));
}

#[test]
fn refuses_bad_headers() {
    let mut t = RawTar::new();
    t.file("a", 0o644, b"x");
    let mut bytes = t.finish();
    bytes[0] = b'b'; // the checksum no longer matches
    assert!(matches!(all(&bytes), Err(TarError::Checksum { .. })));
    let mut t = RawTar::new();
    t.pax(&[("path", b"a"), ("path", b"b")]).file("c", 0o644, b"");
    assert!(matches!(all(&t.finish()), Err(TarError::Header { .. })));
    let mut t = RawTar::new();
    t.header(b"g", b'g', 0o644, 12, b"").data(b"12 path=xy\n\0").file("c", 0o644, b"");
    assert!(matches!(all(&t.finish()), Err(TarError::Header { .. })));
    let mut t = RawTar::new();
    t.header(b"x", b'x', 0o644, 9, b"").data(b"99 path=a").file("c", 0o644, b"");
    assert!(matches!(all(&t.finish()), Err(TarError::Header { .. })));
}

#[test]
fn refuses_truncation() {
    let mut t = RawTar::new();
    t.file("a", 0o644, b"hello");
    let no_end = t.buf.clone();
    assert!(matches!(all(&no_end), Err(TarError::Truncated(_))));
    let bytes = t.finish();
    let cut = &bytes[..512 + 3];
    assert!(all(cut).is_err());
    assert!(matches!(all(&bytes[..100]), Err(TarError::Truncated(_))));
}

#[test]
fn numbers() {
    assert_eq!(number(b"0000644\0"), Ok(0o644));
    assert_eq!(number(b"  644 \0"), Ok(0o644));
    assert_eq!(number(&[0x80, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]), Ok(1 << 32));
    assert!(number(b"12a4\0").is_err());
    assert!(number(&[0xff, 0xff]).is_err());
}

#[test]
fn too_many_entries() {
    let mut t = RawTar::new();
    for i in 0..3 {
        t.file(&format!("f{i}"), 0o644, b"");
    }
    let bytes = t.finish();
    let mut r = TarReader::new(&bytes[..], 2);
    assert!(r.next_entry().is_ok() && r.next_entry().is_ok());
    assert!(matches!(r.next_entry(), Err(TarError::Header { .. })));
}
