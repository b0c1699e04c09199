//! Building one layer: the entry sequence (with ancestor directories), its table of
//! contents, the cache decision, and the tar + compression pass.
//!
//! Decision per layer (see `cache.rs`):
//! 1. files whose lstat matches the slot record get their sha256 from it, unread;
//! 2. if the slot was built before, the remaining files are hashed (read once), the table of
//!    contents is formed and the content key looked up: a hit reuses the compressed blob;
//! 3. otherwise (first build of the slot, or a miss) the layer is written: tar, hash and
//!    compress in one pass.

use crate::cache::{Cache, CacheError, LayerRecord, SlotFile, SlotRecord, RACY_NS};
use crate::compress::{decompress_frame, BlockSink, Engine, Resume, Reuse};
use crate::plan::LayerPlan;
use crate::spec::{Algorithm, Compression, Ownership};
use crate::tarball::{Fixed, TarError, TarWriter};
use crate::walk::{Entry, Kind};
use oci_core::digest::{Digest, Hasher};
use oci_core::media;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer {slot}")]
    Tar {
        slot: String,
        #[source]
        source: TarError,
    },
    #[error("layer {slot}: cannot read {path}; check its permissions")]
    Read {
        slot: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("layer {slot}: {path} changed during the build; run it again once the tree is stable")]
    Changed { slot: String, path: PathBuf },
    #[error("layer {slot}: compression failed")]
    Compress {
        slot: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {slot}")]
    Cache {
        slot: String,
        #[source]
        source: CacheError,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TocKind {
    Dir,
    File,
    Symlink,
}

/// One entry of a layer's table of contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TocEntry {
    /// Path in the image, without leading '/' or trailing '/'.
    pub path: String,
    #[serde(rename = "type")]
    pub kind: TocKind,
    pub mode: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// The table of contents of a layer, stored as a blob of media type
/// [`media::TOC_MEDIA_TYPE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Toc {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub entries: Vec<TocEntry>,
}

impl Toc {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

pub fn layer_media_type(c: &Compression) -> &'static str {
    match c.algorithm {
        Algorithm::Zstd => media::OCI_LAYER_ZSTD,
        Algorithm::Gzip => media::OCI_LAYER_GZIP,
    }
}

/// Digest of everything besides the entries that determines a layer's bytes.
pub fn params_digest(c: &Compression, o: &Ownership) -> Digest {
    let v = serde_json::json!({ "format": 1, "compression": c, "ownership": o });
    Digest::of(v.to_string().as_bytes())
}

enum Item<'a> {
    Dir(String),
    File { path: String, mode: u32, entry: &'a Entry },
    Symlink { path: String, target: &'a str },
}

/// The layer's entries in tar order, each preceded by any ancestor directory not yet
/// emitted (so every layer carries its parents with the normalised mode).
fn items<'a>(plan: &'a LayerPlan, own: &Ownership) -> Vec<Item<'a>> {
    let mut out = Vec::with_capacity(plan.entries.len() + 8);
    let mut emitted: HashSet<String> = HashSet::new();
    let mut ensure_dir = |path: &str, out: &mut Vec<Item<'a>>| {
        let mut acc = String::new();
        for c in path.split('/') {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(c);
            if emitted.insert(acc.clone()) {
                out.push(Item::Dir(acc.clone()));
            }
        }
    };
    ensure_dir(&plan.dest, &mut out);
    for e in &plan.entries {
        let path = format!("{}/{}", plan.dest, e.rel);
        if let Some((parent, _)) = path.rsplit_once('/') {
            ensure_dir(parent, &mut out);
        }
        match &e.kind {
            Kind::Dir => ensure_dir(&path, &mut out),
            Kind::File { exec, .. } => {
                out.push(Item::File { path, mode: if *exec { own.exec_mode } else { own.file_mode }, entry: e })
            }
            Kind::Symlink { target } => out.push(Item::Symlink { path, target }),
        }
    }
    out
}

fn toc_of(items: &[Item], own: &Ownership, hashes: &HashMap<&str, Digest>) -> Toc {
    let entries = items
        .iter()
        .map(|i| match i {
            Item::Dir(p) => TocEntry {
                path: p.clone(),
                kind: TocKind::Dir,
                mode: own.dir_mode,
                size: None,
                sha256: None,
                target: None,
            },
            Item::File { path, mode, entry } => TocEntry {
                path: path.clone(),
                kind: TocKind::File,
                mode: *mode,
                size: Some(entry.stat.size),
                sha256: hashes.get(entry.rel.as_str()).cloned(),
                target: None,
            },
            Item::Symlink { path, target } => TocEntry {
                path: path.clone(),
                kind: TocKind::Symlink,
                mode: 0o777,
                size: None,
                sha256: None,
                target: Some(target.to_string()),
            },
        })
        .collect();
    Toc { media_type: media::TOC_MEDIA_TYPE.to_string(), entries }
}

/// Modified too recently for its lstat to vouch for its content (racy-clean rule).
fn racy(e: &Entry, now_ns: i64) -> bool {
    e.stat.mtime_ns >= now_ns - RACY_NS || e.stat.ctime_ns >= now_ns - RACY_NS
}

/// Digest of what the layer lists and every entry's lstat facts (not file contents).
fn state_digest(plan: &LayerPlan) -> Digest {
    let mut h = Hasher::new();
    h.update(plan.dest.as_bytes());
    for e in &plan.entries {
        h.update(b"\0");
        h.update(e.rel.as_bytes());
        let st = &e.stat;
        let mut b = [0u8; 44];
        b[..8].copy_from_slice(&st.dev.to_le_bytes());
        b[8..16].copy_from_slice(&st.ino.to_le_bytes());
        b[16..24].copy_from_slice(&st.size.to_le_bytes());
        b[24..32].copy_from_slice(&st.mtime_ns.to_le_bytes());
        b[32..40].copy_from_slice(&st.ctime_ns.to_le_bytes());
        b[40..44].copy_from_slice(&st.mode.to_le_bytes());
        h.update(&b);
        if let Kind::Symlink { target } = &e.kind {
            h.update(target.as_bytes());
        }
    }
    h.finish().0
}

fn content_key(params: &Digest, toc_bytes: &[u8]) -> Digest {
    let mut h = Hasher::new();
    h.update(params.to_string().as_bytes());
    h.update(b"\n");
    h.update(toc_bytes);
    h.finish().0
}

/// Open a source file without following a symlink swapped in since the walk, and check
/// it is still the file the walk saw.
fn open_checked(slot: &str, path: &Path, e: &Entry) -> Result<File, LayerError> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| LayerError::Read { slot: slot.to_string(), path: path.to_path_buf(), source })?;
    let m =
        f.metadata().map_err(|source| LayerError::Read { slot: slot.to_string(), path: path.to_path_buf(), source })?;
    if !m.is_file() || m.ino() != e.stat.ino || m.size() != e.stat.size {
        return Err(LayerError::Changed { slot: slot.to_string(), path: path.to_path_buf() });
    }
    Ok(f)
}

fn hash_file(slot: &str, path: &Path, e: &Entry) -> Result<Digest, LayerError> {
    let f = open_checked(slot, path, e)?;
    let (d, n) = oci_core::digest::digest_reader(io::BufReader::with_capacity(256 * 1024, f))
        .map_err(|source| LayerError::Read { slot: slot.to_string(), path: path.to_path_buf(), source })?;
    if n != e.stat.size {
        return Err(LayerError::Changed { slot: slot.to_string(), path: path.to_path_buf() });
    }
    Ok(d)
}

#[derive(Debug, Clone)]
pub struct LayerOutcome {
    pub slot: String,
    pub record: LayerRecord,
    pub rebuilt: bool,
    /// Bytes of source files read (for hashing or writing).
    pub bytes_read: u64,
    /// Uncompressed bytes that went through the compressor.
    pub bytes_compressed: u64,
    pub duration: Duration,
}

pub struct LayerBuilder<'a> {
    pub cache: &'a Cache,
    pub engine: Arc<Engine>,
    pub ownership: &'a Ownership,
    pub params: Digest,
}

fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

impl LayerBuilder<'_> {
    pub fn build(&self, plan: &LayerPlan) -> Result<LayerOutcome, LayerError> {
        let started = Instant::now();
        let started_ns = now_ns();
        let slot = plan.slot.as_str();
        let cache_err = |source| LayerError::Cache { slot: slot.to_string(), source };
        let previous = self.cache.load_slot(slot, &plan.source, &self.params);
        let state = state_digest(plan);
        // Fast path: same listing and every entry's lstat as when last recorded: the last
        // key still holds, and nothing is read.
        if let Some(prev) = &previous {
            if prev.state.as_ref() == Some(&state) {
                if let Some(record) = prev.last_key.as_ref().and_then(|k| self.cache.lookup_layer(k)) {
                    return Ok(LayerOutcome {
                        slot: slot.to_string(),
                        record,
                        rebuilt: false,
                        bytes_read: 0,
                        bytes_compressed: 0,
                        duration: started.elapsed(),
                    });
                }
            }
        }
        let mut hashes: HashMap<&str, Digest> = HashMap::new();
        if let Some(prev) = &previous {
            let recorded = self.cache.load_slot_files(prev);
            let known: HashMap<&str, &SlotFile> = recorded.iter().map(|f| (f.rel.as_str(), f)).collect();
            for e in &plan.entries {
                if let Some(f) = known.get(e.rel.as_str()) {
                    if f.stat == e.stat {
                        hashes.insert(e.rel.as_str(), f.sha256.clone());
                    }
                }
            }
        }
        let items = items(plan, self.ownership);
        let files: Vec<&Entry> = plan.entries.iter().filter(|e| matches!(e.kind, Kind::File { .. })).collect();
        let mut bytes_read = 0u64;
        let mut new_toc = None;
        if previous.is_some() || files.iter().all(|e| hashes.contains_key(e.rel.as_str())) {
            // Hash what the stat cache cannot vouch for, then try the content key.
            for e in &files {
                if !hashes.contains_key(e.rel.as_str()) {
                    let d = hash_file(slot, &plan.source.join(&e.rel), e)?;
                    bytes_read += e.stat.size;
                    hashes.insert(e.rel.as_str(), d);
                }
            }
            let toc = toc_of(&items, self.ownership, &hashes);
            let key = content_key(&self.params, &toc.to_bytes());
            if let Some(record) = self.cache.lookup_layer(&key) {
                self.save_slot(plan, &state, &hashes, &record.key, started_ns).map_err(cache_err)?;
                return Ok(LayerOutcome {
                    slot: slot.to_string(),
                    record,
                    rebuilt: false,
                    bytes_read,
                    bytes_compressed: 0,
                    duration: started.elapsed(),
                });
            }
            new_toc = Some(toc);
        }
        // Write the layer.
        let tmp = self.cache.tmp_blob().map_err(cache_err)?;
        let mut out = tmp.reopen().map_err(|source| LayerError::Compress { slot: slot.to_string(), source })?;
        // The slot's previous blob lends the frames of segments that did not change.
        let algorithm = self.engine.compression.algorithm;
        let prev_record = previous
            .as_ref()
            .and_then(|p| p.last_key.as_ref())
            .and_then(|k| self.cache.lookup_layer(k))
            .filter(|r| !r.frames.is_empty() && r.media_type == layer_media_type(&self.engine.compression));
        // Its first frames, when they hold exactly our first entries, are kept as they are.
        let old_toc = prev_record.as_ref().and_then(|r| {
            self.cache.blobs().read_blob(&r.toc_digest, Some(r.toc_size)).ok().and_then(|b| parse_toc(&b).ok())
        });
        let (resume, tail) = match (&prev_record, &new_toc, &old_toc) {
            (Some(r), Some(toc), Some(old)) => (
                self.resume_from(r, toc, old, &items, started_ns, &mut out)
                    .map_err(|source| LayerError::Compress { slot: slot.to_string(), source })?,
                tail_points(r, toc, old, &items, started_ns),
            ),
            _ => (None, None),
        };
        let skip = resume.as_ref().map_or(0, |r| r.item as usize);
        let reuse = prev_record.as_ref().and_then(|r| {
            File::open(self.cache.blob_path(&r.digest)).ok().map(|f| Reuse::new(f, algorithm, &r.frames))
        });
        let sink = BlockSink::with_reuse(self.engine.clone(), out, reuse, resume);
        let fixed = Fixed { uid: self.ownership.uid, gid: self.ownership.gid, mtime: self.ownership.mtime };
        let mut w = TarWriter::new(sink, fixed);
        let tar_err = |source| LayerError::Tar { slot: slot.to_string(), source };
        let seg_err = |source| LayerError::Compress { slot: slot.to_string(), source };
        let mut written: HashMap<&str, Digest> = HashMap::new();
        // Entries inside the kept frames are not read: their table-of-contents entries
        // (content digest included) are the ones the kept frames were made from.
        record_unread(&items[..skip], &hashes, &mut written);
        let mut tailed = false;
        // A rebuild reads few files, scattered through a tree that may have left the page
        // cache since the last build: a helper asks the kernel for the next ones ahead of
        // the reads, so that their disk reads overlap instead of queueing one by one.
        let at = AtomicUsize::new(skip);
        let stop = AtomicBool::new(false);
        let ahead = 2 * self.engine.compression.block_size as u64;
        let result = std::thread::scope(|sc| {
            if prev_record.is_some() {
                sc.spawn(|| prefetch(&items, &plan.source, &at, &stop, ahead));
            }
            let r = (|| -> Result<(), LayerError> {
                for (j, it) in items.iter().enumerate().skip(skip) {
                    at.store(j, Ordering::Relaxed);
                    // The rest of the entries are the previous blob's last entries, and the stream
                    // stands where one of its frames began: take those frames as they are.
                    if let (Some(t), Some(r)) = (&tail, &prev_record) {
                        if let Some(&g) = t.points.get(&(j as u64)) {
                            if w.sink().starts_segment_at(j as u64) {
                                self.append_tail(w.sink(), r, g, t.delta).map_err(seg_err)?;
                                record_unread(&items[j..], &hashes, &mut written);
                                tailed = true;
                                break;
                            }
                        }
                    }
                    w.sink().begin_entry(match it {
                        Item::Dir(p) => p,
                        Item::Symlink { path, .. } | Item::File { path, .. } => path,
                    });
                    match it {
                        Item::Dir(p) => w.dir(p, self.ownership.dir_mode).map_err(tar_err)?,
                        Item::Symlink { path, target } => w.symlink(path, target).map_err(tar_err)?,
                        Item::File { path, mode, entry } => {
                            let src = plan.source.join(&entry.rel);
                            // Checked once, after the copy (type, inode, size, times): one `fstat`
                            // per file instead of two. Non-blocking, so a FIFO swapped in for the file
                            // cannot stall the build before the check refuses it.
                            let f = OpenOptions::new()
                                .read(true)
                                .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK)
                                .open(&src)
                                .map_err(|source| LayerError::Read {
                                    slot: slot.to_string(),
                                    path: src.clone(),
                                    source,
                                })?;
                            // A file hashed moments ago (or vouched for by its lstat) is not hashed
                            // again unless it is racy; its lstat after the copy proves it unchanged.
                            let known = hashes.get(entry.rel.as_str()).filter(|_| !racy(entry, started_ns));
                            let got = w
                                .file(path, *mode, entry.stat.size, &f, &src.to_string_lossy(), known.is_none())
                                .map_err(tar_err)?;
                            bytes_read += entry.stat.size;
                            let after = f.metadata().map_err(|source| LayerError::Read {
                                slot: slot.to_string(),
                                path: src.clone(),
                                source,
                            })?;
                            let still = after.is_file()
                                && after.ino() == entry.stat.ino
                                && after.len() == entry.stat.size
                                && after.mtime() * 1_000_000_000 + after.mtime_nsec() == entry.stat.mtime_ns
                                && after.ctime() * 1_000_000_000 + after.ctime_nsec() == entry.stat.ctime_ns;
                            let d = match (got, known) {
                                (Some(d), Some(k)) if &d != k => {
                                    return Err(LayerError::Changed { slot: slot.to_string(), path: src })
                                }
                                (Some(d), _) => d,
                                (None, Some(k)) => k.clone(),
                                (None, None) => return Err(LayerError::Changed { slot: slot.to_string(), path: src }),
                            };
                            if !still {
                                return Err(LayerError::Changed { slot: slot.to_string(), path: src });
                            }
                            written.insert(entry.rel.as_str(), d);
                        }
                    }
                    w.sink().end_entry().map_err(seg_err)?;
                }
                Ok(())
            })();
            stop.store(true, Ordering::Relaxed);
            r
        });
        result?;
        let sink = if tailed {
            w.into_inner()
        } else {
            w.sink().begin_entry("\0end of archive");
            w.finish().map_err(tar_err)?
        };
        let sealed = sink.finish().map_err(|source| LayerError::Compress { slot: slot.to_string(), source })?;
        let toc = toc_of(&items, self.ownership, &written);
        let toc_bytes = toc.to_bytes();
        let key = content_key(&self.params, &toc_bytes);
        let (toc_digest, toc_size) = self.cache.blobs().put_blob_bytes(&toc_bytes).map_err(|e| cache_err(e.into()))?;
        let blob_stat = self.cache.persist_blob(tmp, &sealed.digest).map_err(cache_err)?;
        let record = LayerRecord {
            key: key.clone(),
            diff_id: sealed.diff_id,
            digest: sealed.digest,
            size: sealed.size,
            uncompressed_size: sealed.uncompressed_size,
            media_type: layer_media_type(&self.engine.compression).to_string(),
            toc_digest,
            toc_size,
            blob_stat,
            frames: sealed.frames,
        };
        self.cache.save_layer(&record).map_err(cache_err)?;
        self.save_slot(plan, &state, &written, &key, started_ns).map_err(cache_err)?;
        Ok(LayerOutcome {
            slot: slot.to_string(),
            record,
            rebuilt: true,
            bytes_read,
            bytes_compressed: sealed.uncompressed_size - sealed.reused,
            duration: started.elapsed(),
        })
    }

    /// Where a rebuild can start after the previous blob's first frames: the last frame
    /// that begins with an entry such that every entry before it is the same in the new
    /// table of contents (path, type, mode, size, content digest, link target) and no
    /// file before it is racy. The kept frames' bytes are copied into `out` and checked
    /// against the digest recorded where they end; on any doubt, `None` (and `out` left
    /// empty), and the layer is written from its first entry. An error only when `out`
    /// cannot be emptied again.
    fn resume_from(
        &self,
        prev: &LayerRecord,
        toc: &Toc,
        old: &Toc,
        items: &[Item],
        started_ns: i64,
        out: &mut File,
    ) -> io::Result<Option<Resume>> {
        let same = toc.entries.iter().zip(old.entries.iter()).take_while(|(a, b)| a == b).count();
        let settled = items
            .iter()
            .position(|it| matches!(it, Item::File { entry, .. } if racy(entry, started_ns)))
            .unwrap_or(items.len());
        let limit = same.min(settled) as u64;
        let Some((f, start)) = prev
            .frames
            .iter()
            .enumerate()
            .rev()
            .find_map(|(i, fr)| Some((i, fr.start.as_ref().filter(|s| s.item <= limit)?)))
        else {
            return Ok(None);
        };
        let kept = &prev.frames[..f];
        let Some(diff) = Hasher::resume(&start.diff) else { return Ok(None) };
        if f == 0 || start.diff.len != kept.iter().map(|fr| fr.raw).sum::<u64>() {
            return Ok(None);
        }
        let packed_len: u64 = kept.iter().map(|fr| fr.packed).sum();
        let mut packed = Hasher::new();
        let copied = (|| -> io::Result<()> {
            let mut blob = File::open(self.cache.blob_path(&prev.digest))?.take(packed_len);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = blob.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                packed.update(&buf[..n]);
                out.write_all(&buf[..n])?;
            }
        })();
        let ok = copied.is_ok() && packed.len() == packed_len && packed.clone().finish().0 == start.packed;
        if !ok {
            tracing::warn!(
                "layer {}: the previous blob's first frames do not match their record; writing the layer whole",
                prev.digest
            );
            out.set_len(0)?;
            io::Seek::seek(out, io::SeekFrom::Start(0))?;
            return Ok(None);
        }
        Ok(Some(Resume { frames: kept.to_vec(), packed, diff, item: start.item }))
    }

    /// Give the sink the previous blob's frames from `g` on, decompressed for the DiffID
    /// and as they are for the blob. They come from a blob the cache vouched for (its
    /// recorded lstat, as for a no-op build), and each must decode to its recorded size.
    fn append_tail(&self, sink: &mut BlockSink, prev: &LayerRecord, g: usize, delta: i64) -> io::Result<()> {
        let blob = File::open(self.cache.blob_path(&prev.digest))?;
        let algorithm = self.engine.compression.algorithm;
        let mut off: u64 = prev.frames[..g].iter().map(|f| f.packed).sum();
        for (k, f) in prev.frames.iter().enumerate().skip(g) {
            let mut packed = vec![0u8; usize::try_from(f.packed).map_err(io::Error::other)?];
            std::os::unix::fs::FileExt::read_exact_at(&blob, &mut packed, off)?;
            off += f.packed;
            let Some(raw) = decompress_frame(algorithm, &packed, f.raw) else {
                let path = self.cache.blob_path(&prev.digest);
                let _ = std::fs::remove_file(&path);
                return Err(io::Error::other(format!(
                    "frame {k} of the cached blob {} is damaged; it was removed from the cache: run the build again",
                    path.display()
                )));
            };
            let next = prev.frames.get(k + 1).and_then(|n| n.start.as_ref()).map(|s| (s.item as i64 - delta) as u64);
            sink.push_frame(&raw, packed, f.key.clone(), next)?;
        }
        Ok(())
    }

    fn save_slot(
        &self,
        plan: &LayerPlan,
        state: &Digest,
        hashes: &HashMap<&str, Digest>,
        key: &Digest,
        started_ns: i64,
    ) -> Result<(), CacheError> {
        let settled = |e: &Entry| !racy(e, started_ns);
        let files: Vec<SlotFile> = plan
            .entries
            .iter()
            .filter(|e| settled(e))
            .filter_map(|e| {
                Some(SlotFile { rel: e.rel.clone(), stat: e.stat, sha256: hashes.get(e.rel.as_str())?.clone() })
            })
            .collect();
        let record = SlotRecord {
            slot: plan.slot.clone(),
            source: plan.source.clone(),
            params: self.params.clone(),
            state: plan.entries.iter().all(settled).then(|| state.clone()),
            last_key: Some(key.clone()),
        };
        self.cache.save_slot(&record, &files)
    }
}

/// The content digests of files taken unread (inside frames kept from the previous
/// blob), as the stat cache or this build's hashing found them.
fn record_unread<'a>(items: &[Item<'a>], hashes: &HashMap<&'a str, Digest>, written: &mut HashMap<&'a str, Digest>) {
    for it in items {
        if let Item::File { entry, .. } = it {
            if let Some(d) = hashes.get(entry.rel.as_str()) {
                written.insert(entry.rel.as_str(), d.clone());
            }
        }
    }
}

/// Ask the kernel to read the files that come after entry `at` into the page cache,
/// keeping about `ahead` bytes of them requested, until `stop`.
fn prefetch(items: &[Item], source: &Path, at: &AtomicUsize, stop: &AtomicBool, ahead: u64) {
    let size = |it: &Item| match it {
        Item::File { entry, .. } => entry.stat.size,
        _ => 0,
    };
    let mut cum = Vec::with_capacity(items.len() + 1);
    cum.push(0u64);
    for it in items {
        cum.push(cum[cum.len() - 1] + size(it));
    }
    for (j, it) in items.iter().enumerate().skip(at.load(Ordering::Relaxed)) {
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let now = at.load(Ordering::Relaxed).min(j);
            if cum[j] - cum[now] <= ahead {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        if let Item::File { entry, .. } = it {
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK)
                .open(source.join(&entry.rel));
            if let Ok(f) = f {
                let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::WillNeed);
            }
        }
    }
}

/// Where a rebuild may take the rest of the stream from the previous blob: the new
/// entries from `points`' keys on are the previous table of contents' last entries
/// (shifted by `delta` = old count - new count), none of them a racy file, and the
/// previous blob has a frame beginning there (the value, its index).
struct Tail {
    points: HashMap<u64, usize>,
    delta: i64,
}

fn tail_points(prev: &LayerRecord, toc: &Toc, old: &Toc, items: &[Item], started_ns: i64) -> Option<Tail> {
    let same = toc.entries.iter().rev().zip(old.entries.iter().rev()).take_while(|(a, b)| a == b).count();
    let settled_from = items
        .iter()
        .rposition(|it| matches!(it, Item::File { entry, .. } if racy(entry, started_ns)))
        .map_or(0, |i| i + 1);
    let from = (toc.entries.len() - same).max(settled_from) as i64;
    let delta = old.entries.len() as i64 - toc.entries.len() as i64;
    let points: HashMap<u64, usize> = prev
        .frames
        .iter()
        .enumerate()
        .filter_map(|(g, f)| {
            let j = f.start.as_ref()?.item as i64 - delta;
            (j >= from && j > 0).then_some((j as u64, g))
        })
        .collect();
    (!points.is_empty()).then_some(Tail { points, delta })
}

/// Read a table of contents blob.
pub fn parse_toc(bytes: &[u8]) -> Result<Toc, serde_json::Error> {
    serde_json::from_slice(bytes)
}
