//! Reading one layer: the verified stream ([`crate::blob`]) through the strict tar reader,
//! each entry classified ([`crate::index::classify`]) and, for files, hashed while its
//! content is optionally written out by an [`Extract`]. When an expected index is given
//! (a builder TOC), every entry must match it exactly, in order. Nothing read here counts
//! until [`read_layer`] returns `Ok`: the blob digest, size and DiffID are checked after the
//! whole stream, end marker and trailing bytes included, has been read.

use crate::blob::{Expect, LayerStream, Limits, StreamError, Verified};
use crate::error::{Error, Refusal, Result};
use crate::image::LayerRef;
use crate::index::{classify, EntryKind, IndexEntry, LayerIndex, Sha};
use crate::tar::{TarError, TarReader};
use std::fs::File;
use std::io::Read;
use std::path::Path;

/// Where wanted file contents go: for a wanted entry, [`Extract::wants`], then its content
/// in buffers handed out by [`Extract::buffer`] and given back filled through
/// [`Extract::chunk`], then [`Extract::done`] once the content is checked.
pub trait Extract {
    /// Whether the content of file entry `seq` is wanted (its delivery starts if so).
    fn wants(&mut self, seq: u32, entry: &IndexEntry) -> Result<bool>;
    /// An empty buffer for the next piece of content.
    fn buffer(&mut self) -> Result<Vec<u8>>;
    /// The first `n` bytes of `buf` are the next content of the wanted entry; `last` if
    /// nothing follows.
    fn chunk(&mut self, buf: Vec<u8>, n: usize, last: bool) -> Result<()>;
    /// The content of `seq` was delivered in full; `sha256` is what was read.
    fn done(&mut self, seq: u32, sha256: &Sha) -> Result<()>;
}

/// Wants nothing: reading only verifies and indexes.
pub struct NoExtract;

impl Extract for NoExtract {
    fn wants(&mut self, _: u32, _: &IndexEntry) -> Result<bool> {
        Ok(false)
    }
    fn buffer(&mut self) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }
    fn chunk(&mut self, _: Vec<u8>, _: usize, _: bool) -> Result<()> {
        Ok(())
    }
    fn done(&mut self, _: u32, _: &Sha) -> Result<()> {
        Ok(())
    }
}

/// Which layer, for messages and checks.
pub struct Job<'a> {
    pub number: usize,
    pub layer: &'a LayerRef,
    pub blob: &'a Path,
    pub expected: Option<&'a LayerIndex>,
}

const BUF: usize = 256 * 1024;

/// Start decompressing a layer, up to `depth` chunks ahead of its reader.
pub fn open_layer(job: &Job<'_>, limits: &Limits, depth: usize) -> Result<LayerStream> {
    let l = job.layer;
    let expect =
        Expect { digest: l.digest.clone(), size: l.size, diff_id: l.diff_id.clone(), compression: l.compression };
    LayerStream::open_ahead(job.blob, &expect, limits, depth).map_err(|source| Error::Read {
        layer: job.number,
        digest: l.digest.clone(),
        source,
    })
}

/// Read, verify and index a layer from the stream [`open_layer`] started, extracting what
/// `extract` wants.
pub fn read_opened(
    job: &Job<'_>,
    stream: LayerStream,
    limits: &Limits,
    extract: &mut dyn Extract,
) -> Result<(LayerIndex, Verified)> {
    let l = job.layer;
    let mut tar = TarReader::new(stream, limits.max_entries);
    match entries(job, &mut tar, extract) {
        Ok(entries) => {
            let verified = tar.into_inner().finish().map_err(|e| stream_err(job, &e))?;
            Ok((LayerIndex { diff_id: l.diff_id.clone(), entries }, verified))
        }
        Err(e) => {
            // A failure of the stream itself (digest, size, bomb) explains the tar error.
            let is_stream = matches!(&e, Error::Tar { source: TarError::Io(_), .. } | Error::Read { .. });
            match tar.into_inner().failure() {
                Some(se) if is_stream => Err(stream_err(job, &se)),
                _ => Err(e),
            }
        }
    }
}

fn stream_err(job: &Job<'_>, e: &StreamError) -> Error {
    let mut what = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        what.push_str(": ");
        what.push_str(&s.to_string());
        source = s.source();
    }
    Error::Layer { layer: job.number, digest: job.layer.digest.clone(), what }
}

fn entries(job: &Job<'_>, tar: &mut TarReader<LayerStream>, extract: &mut dyn Extract) -> Result<Vec<IndexEntry>> {
    let digest = &job.layer.digest;
    let tar_err = |source| Error::Tar { layer: job.number, digest: digest.clone(), source };
    let refuse = |entry: String, reason| Error::Entry { layer: job.number, digest: digest.clone(), entry, reason };
    let mut out: Vec<IndexEntry> = Vec::new();
    let mut buf = vec![0u8; BUF];
    while let Some(h) = tar.next_entry().map_err(tar_err)? {
        let mut e = classify(&h).map_err(|(name, r)| refuse(name, r))?;
        let seq = u32::try_from(out.len()).unwrap_or(u32::MAX);
        if matches!(e.kind, EntryKind::File { .. }) {
            let wanted = extract.wants(seq, &e)?;
            let mut hasher = oci_core::sha256::Sha256::new();
            if wanted {
                // Each buffer is filled before it goes, so a small file is one piece.
                let mut left = match e.kind {
                    EntryKind::File { size, .. } => size,
                    _ => 0,
                };
                while left > 0 {
                    let mut b = extract.buffer()?;
                    if b.is_empty() {
                        return Err(Error::Usage("internal: an empty content buffer".into()));
                    }
                    let want = b.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let mut n = 0;
                    while n < want {
                        let k = tar
                            .read_with(&mut b[n..want], |s, b| s.read_content(b, &mut hasher))
                            .map_err(|err| tar_err(TarError::Io(err)))?;
                        if k == 0 {
                            return Err(tar_err(TarError::Io(std::io::ErrorKind::UnexpectedEof.into())));
                        }
                        n += k;
                    }
                    left -= n as u64;
                    extract.chunk(b, n, left == 0)?;
                }
            } else {
                while tar
                    .read_with(&mut buf, |s, b| s.read_content(b, &mut hasher))
                    .map_err(|err| tar_err(TarError::Io(err)))?
                    > 0
                {}
            }
            let digest: Sha = hasher.finalize();
            if let EntryKind::File { sha256, .. } = &mut e.kind {
                *sha256 = digest;
            }
            if wanted {
                // Checked before the file is finished: a lying TOC fails the run, and
                // with it the hidden tree the file is in.
                check_expected(job, seq, &e)?;
                extract.done(seq, &digest)?;
            }
        }
        check_expected(job, seq, &e)?;
        out.push(e);
    }
    if let Some(exp) = job.expected {
        if exp.entries.len() != out.len() {
            return Err(refuse(
                format!("<entry {}>", out.len()),
                Refusal::TocMismatch {
                    expected: format!("{} entries", exp.entries.len()),
                    actual: format!("{} entries", out.len()),
                },
            ));
        }
    }
    Ok(out)
}

fn check_expected(job: &Job<'_>, seq: u32, e: &IndexEntry) -> Result<()> {
    let Some(exp) = job.expected else { return Ok(()) };
    let want = exp.entries.get(seq as usize);
    if want == Some(e) {
        return Ok(());
    }
    Err(Error::Entry {
        layer: job.number,
        digest: job.layer.digest.clone(),
        entry: e.raw_name(),
        reason: Refusal::TocMismatch {
            expected: want.map_or_else(|| "no more entries".to_string(), IndexEntry::describe),
            actual: e.describe(),
        },
    })
}

/// Read a small local file fully, verifying its digest (for TOCs, which may exceed the
/// store's metadata limit).
pub fn read_verified(path: &Path, digest: &oci_core::Digest, size: u64, max: u64) -> Result<Vec<u8>> {
    if size > max {
        return Err(Error::Image {
            image: path.display().to_string(),
            what: format!("blob {digest} of {size} bytes is larger than the {max} allowed"),
        });
    }
    let mut v = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    File::open(path).and_then(|f| f.take(max + 1).read_to_end(&mut v)).map_err(Error::io(path, "cannot read blob"))?;
    if v.len() as u64 != size || &oci_core::Digest::of(&v) != digest {
        return Err(Error::Image {
            image: path.display().to_string(),
            what: format!("blob {digest}: content does not match its digest and size"),
        });
    }
    Ok(v)
}
