//! A strict, streaming tar reader: ustar and GNU headers, PAX extended headers (`path`,
//! `linkpath`, `size`), GNU long names. Written by hand so that every ambiguity other
//! readers resolve differently is refused instead of guessed:
//!
//! * a PAX `size` that disagrees with the header's size field (TARmageddon), unless the
//!   field is saturated because the size does not fit it;
//! * GNU sparse files (unbounded maps), multi-volume and other GNU special types;
//! * directories, links and device entries with a non-zero size (readers disagree about
//!   whether such entries carry data);
//! * bad header checksums, malformed numbers, duplicated PAX keys, PAX global headers that
//!   set a path or size, metadata records larger than [`MAX_META`];
//! * truncation anywhere, including a missing end-of-archive marker.
//!
//! The reader stops at the end-of-archive marker; the caller drains the rest of the stream
//! so that digests cover every byte.

use std::io::{self, Read};

pub const BLOCK: usize = 512;
/// Largest PAX header or GNU long name accepted.
pub const MAX_META: u64 = 1 << 20;
/// An 11-digit octal size field at its maximum: the real size is in a PAX record.
const SATURATED_SIZE: u64 = 0o77777777777;

#[derive(Debug, thiserror::Error)]
pub enum TarError {
    #[error("reading the stream failed")]
    Io(#[source] io::Error),
    #[error("truncated archive: {0}")]
    Truncated(&'static str),
    #[error("header at byte {offset}: checksum mismatch")]
    Checksum { offset: u64 },
    #[error("header at byte {offset}: {what}")]
    Header { offset: u64, what: String },
    #[error("entry {path:?}: PAX size {pax} disagrees with the header's size {ustar}")]
    SizeMismatch { path: String, pax: u64, ustar: u64 },
    #[error("entry {path:?}: GNU sparse files are not supported")]
    Sparse { path: String },
    #[error("entry {path:?}: tar type {flag:?} is not supported")]
    UnsupportedType { path: String, flag: char },
    #[error("entry {path:?}: a {kind} entry must have size 0, not {size}")]
    NonZeroSize { path: String, kind: &'static str, size: u64 },
}

/// What an entry is, by its type flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Hardlink,
    CharDev,
    BlockDev,
    Fifo,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::File => "regular file",
            Kind::Dir => "directory",
            Kind::Symlink => "symlink",
            Kind::Hardlink => "hardlink",
            Kind::CharDev => "character device",
            Kind::BlockDev => "block device",
            Kind::Fifo => "FIFO",
        }
    }
}

/// One entry's header, with PAX and GNU long names applied. Names are raw bytes; the
/// caller validates them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub path: Vec<u8>,
    pub link: Vec<u8>,
    pub kind: Kind,
    pub mode: u32,
    pub size: u64,
}

#[derive(Debug, Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
    sparse: bool,
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Bytes of a NUL-terminated field.
fn cstr(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// A numeric field: octal (space/NUL padded) or GNU base-256.
fn number(field: &[u8]) -> Result<u64, String> {
    if let Some(&first) = field.first() {
        if first & 0x80 != 0 {
            if first == 0xff {
                return Err("negative base-256 number".into());
            }
            let mut v: u64 = u64::from(first & 0x7f);
            for &b in &field[1..] {
                v = v.checked_mul(256).and_then(|v| v.checked_add(u64::from(b))).ok_or("base-256 number overflows")?;
            }
            return Ok(v);
        }
    }
    let s = cstr(field);
    let s: Vec<u8> = s.iter().copied().skip_while(|&b| b == b' ').collect();
    let end = s.iter().position(|&b| b == b' ').unwrap_or(s.len());
    if s[end..].iter().any(|&b| b != b' ') {
        return Err(format!("malformed number {:?}", lossy(field)));
    }
    let digits = &s[..end];
    let mut v: u64 = 0;
    for &d in digits {
        if !(b'0'..=b'7').contains(&d) {
            return Err(format!("malformed octal number {:?}", lossy(field)));
        }
        v = v.checked_mul(8).and_then(|v| v.checked_add(u64::from(d - b'0'))).ok_or("octal number overflows")?;
    }
    Ok(v)
}

/// Parse PAX records (`"<len> <key>=<value>\n"`, where `<len>` counts the whole record).
fn parse_pax(data: &[u8], global: bool) -> Result<Pax, String> {
    let mut pax = Pax::default();
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest.iter().position(|&b| b == b' ').ok_or("PAX record without a length")?;
        let len_s = std::str::from_utf8(&rest[..sp]).map_err(|_| "PAX record length is not a number")?;
        if len_s.is_empty() || !len_s.bytes().all(|b| b.is_ascii_digit()) || len_s.starts_with('0') {
            return Err(format!("PAX record length {len_s:?} is not a number"));
        }
        let len: usize = len_s.parse().map_err(|_| "PAX record length overflows")?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err("PAX record length does not match its content".into());
        }
        let record = &rest[sp + 1..len - 1];
        rest = &rest[len..];
        let eq = record.iter().position(|&b| b == b'=').ok_or("PAX record without '='")?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        let dup = |seen: bool, k: &str| if seen { Err(format!("PAX key {k:?} appears twice")) } else { Ok(()) };
        match key {
            b"path" => {
                dup(pax.path.is_some(), "path")?;
                pax.path = Some(value.to_vec());
            }
            b"linkpath" => {
                dup(pax.linkpath.is_some(), "linkpath")?;
                pax.linkpath = Some(value.to_vec());
            }
            b"size" => {
                dup(pax.size.is_some(), "size")?;
                let s = std::str::from_utf8(value).map_err(|_| "PAX size is not a number")?;
                if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!("PAX size {s:?} is not a number"));
                }
                pax.size = Some(s.parse().map_err(|_| "PAX size overflows")?);
            }
            k if k.starts_with(b"GNU.sparse.") => pax.sparse = true,
            _ => {}
        }
    }
    if global && (pax.path.is_some() || pax.linkpath.is_some() || pax.size.is_some() || pax.sparse) {
        return Err("a PAX global header sets path, linkpath or size".into());
    }
    Ok(pax)
}

/// The fields of one 512-byte header block.
struct Raw {
    name: Vec<u8>,
    link: Vec<u8>,
    flag: u8,
    mode: u32,
    size: u64,
}

fn parse_raw(b: &[u8; BLOCK], offset: u64) -> Result<Raw, TarError> {
    let bad = |what: String| TarError::Header { offset, what };
    let stored = number(&b[148..156]).map_err(bad)?;
    let unsigned: u64 =
        b.iter().enumerate().map(|(i, &x)| if (148..156).contains(&i) { 32 } else { u64::from(x) }).sum();
    let signed: i64 =
        b.iter().enumerate().map(|(i, &x)| if (148..156).contains(&i) { 32 } else { i64::from(x as i8) }).sum();
    if stored != unsigned && i64::try_from(stored).ok() != Some(signed) {
        return Err(TarError::Checksum { offset });
    }
    let mode = number(&b[100..108]).map_err(bad)?;
    let size = number(&b[124..136]).map_err(bad)?;
    let mut name = cstr(&b[0..100]).to_vec();
    // POSIX ustar keeps a prefix; GNU ("ustar  \0") uses that area for other fields.
    if &b[257..263] == b"ustar\0" {
        let prefix = cstr(&b[345..500]);
        if !prefix.is_empty() {
            let mut p = prefix.to_vec();
            p.push(b'/');
            p.extend_from_slice(&name);
            name = p;
        }
    }
    Ok(Raw {
        name,
        link: cstr(&b[157..257]).to_vec(),
        flag: b[156],
        mode: u32::try_from(mode & 0o7777_7777).unwrap_or(0),
        size,
    })
}

/// Reads entries from a tar stream. Call [`TarReader::next_entry`], then read the entry's
/// content with [`Read`] (unread content is skipped).
pub struct TarReader<R> {
    r: R,
    offset: u64,
    remaining: u64,
    padding: u64,
    ended: bool,
    entries: u64,
    max_entries: u64,
}

impl<R: Read> TarReader<R> {
    pub fn new(r: R, max_entries: u64) -> Self {
        TarReader { r, offset: 0, remaining: 0, padding: 0, ended: false, entries: 0, max_entries }
    }

    /// The underlying reader (positioned after the end-of-archive marker once
    /// [`TarReader::next_entry`] returned `None`).
    pub fn into_inner(self) -> R {
        self.r
    }

    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<bool, TarError> {
        let mut got = 0;
        while got < buf.len() {
            match self.r.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(TarError::Truncated(what)),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(TarError::Io(e)),
            }
        }
        self.offset += buf.len() as u64;
        Ok(true)
    }

    fn skip(&mut self, mut n: u64) -> Result<(), TarError> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let k = n.min(buf.len() as u64) as usize;
            if !self.fill(&mut buf[..k], "entry content ends early")? {
                return Err(TarError::Truncated("entry content ends early"));
            }
            n -= k as u64;
        }
        Ok(())
    }

    fn read_meta(&mut self, size: u64, offset: u64) -> Result<Vec<u8>, TarError> {
        if size > MAX_META {
            return Err(TarError::Header { offset, what: format!("metadata record of {size} bytes is too large") });
        }
        let mut v = vec![0u8; size as usize];
        if !v.is_empty() && !self.fill(&mut v, "metadata record ends early")? {
            return Err(TarError::Truncated("metadata record ends early"));
        }
        self.skip(pad(size))?;
        Ok(v)
    }

    /// The next entry, or `None` at the end-of-archive marker.
    pub fn next_entry(&mut self) -> Result<Option<Header>, TarError> {
        if self.ended {
            return Ok(None);
        }
        self.skip(self.remaining + self.padding)?;
        self.remaining = 0;
        self.padding = 0;
        let mut pax: Option<Pax> = None;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        loop {
            let offset = self.offset;
            let mut block = [0u8; BLOCK];
            if !self.fill(&mut block, "header ends early")? {
                return Err(TarError::Truncated("no end-of-archive marker"));
            }
            if block.iter().all(|&b| b == 0) {
                if pax.is_some() || long_name.is_some() || long_link.is_some() {
                    return Err(TarError::Header { offset, what: "extended header without an entry".into() });
                }
                self.ended = true;
                return Ok(None);
            }
            let raw = parse_raw(&block, offset)?;
            let meta_path = || lossy(&raw.name);
            match raw.flag {
                b'x' => {
                    if pax.is_some() {
                        return Err(TarError::Header { offset, what: "two PAX headers for one entry".into() });
                    }
                    let data = self.read_meta(raw.size, offset)?;
                    pax = Some(parse_pax(&data, false).map_err(|what| TarError::Header { offset, what })?);
                    continue;
                }
                b'g' => {
                    let data = self.read_meta(raw.size, offset)?;
                    parse_pax(&data, true).map_err(|what| TarError::Header { offset, what })?;
                    continue;
                }
                b'L' | b'K' => {
                    let slot = if raw.flag == b'L' { &mut long_name } else { &mut long_link };
                    if slot.is_some() {
                        return Err(TarError::Header { offset, what: "two GNU long names for one entry".into() });
                    }
                    let data = self.read_meta(raw.size, offset)?;
                    let v = cstr(&data).to_vec();
                    if raw.flag == b'L' {
                        long_name = Some(v);
                    } else {
                        long_link = Some(v);
                    }
                    continue;
                }
                b'S' => return Err(TarError::Sparse { path: meta_path() }),
                _ => {}
            }
            let pax = pax.unwrap_or_default();
            let path = pax.path.or(long_name).unwrap_or(raw.name);
            if pax.sparse {
                return Err(TarError::Sparse { path: lossy(&path) });
            }
            let kind = match raw.flag {
                b'0' | b'7' => Kind::File,
                0 if path.ends_with(b"/") => Kind::Dir,
                0 => Kind::File,
                b'1' => Kind::Hardlink,
                b'2' => Kind::Symlink,
                b'3' => Kind::CharDev,
                b'4' => Kind::BlockDev,
                b'5' => Kind::Dir,
                b'6' => Kind::Fifo,
                f => return Err(TarError::UnsupportedType { path: lossy(&path), flag: char::from(f) }),
            };
            let size = match pax.size {
                Some(p) if p == raw.size || (raw.size == SATURATED_SIZE && p > raw.size) => p,
                Some(p) => return Err(TarError::SizeMismatch { path: lossy(&path), pax: p, ustar: raw.size }),
                None => raw.size,
            };
            if kind != Kind::File && size != 0 {
                return Err(TarError::NonZeroSize { path: lossy(&path), kind: kind.name(), size });
            }
            self.entries += 1;
            if self.entries > self.max_entries {
                return Err(TarError::Header {
                    offset,
                    what: format!("more than {} entries in one layer", self.max_entries),
                });
            }
            self.remaining = size;
            self.padding = pad(size);
            let link = pax.linkpath.or(long_link).unwrap_or(raw.link);
            return Ok(Some(Header { path, link, kind, mode: raw.mode, size }));
        }
    }
}

fn pad(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

impl<R: Read> TarReader<R> {
    /// Like `read`, with `f` reading from the underlying stream (e.g. to hash the content
    /// on its way).
    pub fn read_with(
        &mut self,
        buf: &mut [u8],
        f: impl FnOnce(&mut R, &mut [u8]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let k = buf.len().min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = f(&mut self.r, &mut buf[..k])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tar entry content ends early"));
        }
        self.remaining -= n as u64;
        self.offset += n as u64;
        Ok(n)
    }
}

impl<R: Read> Read for TarReader<R> {
    /// Reads the current entry's content; 0 at its end. A stream that ends inside the
    /// content is an error.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_with(buf, |r, b| r.read(b))
    }
}

#[cfg(test)]
#[path = "tar_tests.rs"]
mod tests;
