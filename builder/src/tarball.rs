//! A minimal, reproducible tar writer: ustar headers, PAX records for long names, long
//! link targets and sizes past 8 GiB. Written by hand because the `tar` crate's builder
//! cannot emit PAX records and does not check that a file yields exactly the number of
//! bytes its header announced; both matter for byte-identical, trustworthy layers.

use oci_core::digest::{Digest, Hasher};
use std::io::{self, Read, Write};

const BLOCK: usize = 512;
/// Largest size an 11-digit octal field holds.
const USTAR_MAX_SIZE: u64 = 0o77777777777;

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("writing the layer failed")]
    Write(#[source] io::Error),
    #[error("reading {path} failed")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} changed while it was being read (expected {expected} bytes); run the build again once the tree is stable")]
    Changed { path: String, expected: u64 },
}

/// Metadata shared by every entry of a layer.
#[derive(Debug, Clone, Copy)]
pub struct Fixed {
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
}

pub struct TarWriter<W: Write> {
    out: W,
    fixed: Fixed,
}

fn octal(field: &mut [u8], value: u64) {
    // width-1 digits, zero padded, NUL terminated
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(&s.as_bytes()[s.len() - digits..]);
    field[digits] = 0;
}

fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    // "<len> <key>=<value>\n", where <len> counts the whole record including itself.
    let rest = key.len() + value.len() + 3;
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    out.extend_from_slice(format!("{len} {key}=").as_bytes());
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// Longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Where a [`TarWriter`] writes. File content goes through [`Sink::copy_content`], so a
/// sink that hashes its whole stream can hash the content for both hashes in one pass.
pub trait Sink: Write {
    /// Copy up to `max` (> 0) bytes of a file's content from `r` into the stream, hashing
    /// them into `content` too when given; returns how many (0: end of file).
    fn copy_content(&mut self, r: &mut dyn Read, max: usize, content: Option<&mut Hasher>) -> io::Result<usize> {
        let mut buf = vec![0u8; max.min(64 * 1024)];
        let n = r.read(&mut buf)?;
        if let Some(h) = content {
            h.update(&buf[..n]);
        }
        self.write_all(&buf[..n])?;
        Ok(n)
    }
}

impl Sink for Vec<u8> {}

impl<W: Sink> TarWriter<W> {
    pub fn new(out: W, fixed: Fixed) -> Self {
        TarWriter { out, fixed }
    }

    fn header(&mut self, path: &str, typeflag: u8, mode: u32, size: u64, link: &str) -> Result<(), TarError> {
        let mut pax = Vec::new();
        if path.len() > 100 {
            pax_record(&mut pax, "path", path.as_bytes());
        }
        if link.len() > 100 {
            pax_record(&mut pax, "linkpath", link.as_bytes());
        }
        if size > USTAR_MAX_SIZE {
            pax_record(&mut pax, "size", size.to_string().as_bytes());
        }
        if !pax.is_empty() {
            let name = format!("PaxHeaders/{}", truncate(path.rsplit('/').next().unwrap_or(path), 88));
            self.raw_header(&name, b'x', 0o644, pax.len() as u64, "")?;
            self.out.write_all(&pax).map_err(TarError::Write)?;
            self.pad(pax.len() as u64)?;
        }
        self.raw_header(truncate(path, 100), typeflag, mode, size.min(USTAR_MAX_SIZE), truncate(link, 100))
    }

    fn raw_header(&mut self, name: &str, typeflag: u8, mode: u32, size: u64, link: &str) -> Result<(), TarError> {
        let mut h = [0u8; BLOCK];
        h[..name.len()].copy_from_slice(name.as_bytes());
        octal(&mut h[100..108], u64::from(mode));
        octal(&mut h[108..116], self.fixed.uid);
        octal(&mut h[116..124], self.fixed.gid);
        octal(&mut h[124..136], size);
        octal(&mut h[136..148], self.fixed.mtime);
        h[156] = typeflag;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        octal(&mut h[329..337], 0);
        octal(&mut h[337..345], 0);
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|b| u64::from(*b)).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        self.out.write_all(&h).map_err(TarError::Write)
    }

    fn pad(&mut self, len: u64) -> Result<(), TarError> {
        let rem = (len % BLOCK as u64) as usize;
        if rem != 0 {
            self.out.write_all(&[0u8; BLOCK][..BLOCK - rem]).map_err(TarError::Write)?;
        }
        Ok(())
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> Result<(), TarError> {
        let p = format!("{path}/");
        self.header(&p, b'5', mode, 0, "")
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), TarError> {
        self.header(path, b'2', 0o777, 0, target)
    }

    /// Write a regular file of exactly `size` bytes read from `r`, returning the content
    /// digest when asked to hash. A reader yielding fewer bytes is an error (the file
    /// changed); one that has more is not read past `size`.
    pub fn file(
        &mut self,
        path: &str,
        mode: u32,
        size: u64,
        mut r: impl Read,
        source: &str,
        hash: bool,
    ) -> Result<Option<Digest>, TarError> {
        self.header(path, b'0', mode, size, "")?;
        let mut h = hash.then(Hasher::new);
        let mut left = size;
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(usize::MAX);
            let n = match self.out.copy_content(&mut r, want, h.as_mut()) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source_err) => return Err(TarError::Read { path: source.to_string(), source: source_err }),
            };
            if n == 0 {
                return Err(TarError::Changed { path: source.to_string(), expected: size });
            }
            left -= n as u64;
        }
        // A file that grew is caught by the caller's `fstat` after the copy (its size and
        // times), which costs less than one more `read` per file to see the end.
        self.pad(size)?;
        Ok(h.map(|h| h.finish().0))
    }

    /// The sink, to tell it where entries begin and end.
    pub fn sink(&mut self) -> &mut W {
        &mut self.out
    }

    /// Write the end-of-archive marker and hand back the sink.
    pub fn finish(mut self) -> Result<W, TarError> {
        self.out.write_all(&[0u8; 2 * BLOCK]).map_err(TarError::Write)?;
        Ok(self.out)
    }

    /// Hand back the sink without an end-of-archive marker: for a stream whose end was
    /// given to the sink some other way (frames of an earlier blob that hold it).
    pub fn into_inner(self) -> W {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_record_length_counts_itself() {
        let mut v = Vec::new();
        pax_record(&mut v, "path", b"abc");
        assert_eq!(v, b"12 path=abc\n");
        let mut v = Vec::new();
        let long = "x".repeat(95);
        pax_record(&mut v, "path", long.as_bytes());
        let s = String::from_utf8(v).unwrap_or_default();
        let len: usize = s.split(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0);
        assert_eq!(len, s.len());
    }

    #[test]
    fn tar_crate_reads_what_we_write() -> Result<(), Box<dyn std::error::Error>> {
        let fixed = Fixed { uid: 0, gid: 0, mtime: 0 };
        let mut w = TarWriter::new(Vec::new(), fixed);
        let long = format!("srv/{}/ñandú-{}.php", "d".repeat(120), "n".repeat(80));
        let target = format!("../{}", "t".repeat(150));
        w.dir("srv", 0o755)?;
        w.file(&long, 0o644, 5, &b"hello"[..], "src", true)?;
        w.symlink("srv/link", &target)?;
        assert!(matches!(w.file("srv/short", 0o644, 5, &b"hell"[..], "src", true), Err(TarError::Changed { .. })));
        let mut w2 = TarWriter::new(Vec::new(), fixed);
        // A longer reader is not read past the announced size (the caller's fstat after the
        // copy sees that the file grew).
        let mut r = &b"hello"[..];
        w2.file("srv/long", 0o644, 3, &mut r, "src", false)?;
        assert_eq!(r, b"lo");
        let bytes = w.finish()?;
        let mut a = tar::Archive::new(&bytes[..]);
        let mut seen = Vec::new();
        for e in a.entries()? {
            let mut e = e?;
            let p = e.path()?.to_string_lossy().to_string();
            let l = e.link_name()?.map(|l| l.to_string_lossy().to_string());
            let mut s = String::new();
            e.read_to_string(&mut s)?;
            seen.push((p, l, s));
        }
        assert_eq!(seen[0].0, "srv/");
        assert_eq!(seen[1], (long, None, "hello".to_string()));
        assert_eq!(seen[2], ("srv/link".to_string(), Some(target), String::new()));
        Ok(())
    }
}
