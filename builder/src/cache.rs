//! The content-addressed build cache (default `~/.cache/mwbuild`, `--cache-dir`).
//!
//! ```text
//! <cache>/oci-layout, index.json   the blob store is an OCI layout (handy for inspection)
//! <cache>/blobs/sha256/<hex>       compressed layers and tables of contents
//! <cache>/layers/<key>.json        content key -> layer record (digests, sizes, TOC)
//! <cache>/slots/<hash>.json        per layer slot: state digest and last content key
//! <cache>/slots/<hash>.files.json  per layer slot: each file's lstat facts and sha256
//! <cache>/pushed/<host>-<digest>    the registry repository a blob was last pushed to
//! <cache>/walks/<hash>.bin          per source tree: directory listings of the last walk
//! ```
//!
//! The content key of a layer is the sha256 of the build parameters and the layer's table
//! of contents, which determines the layer's bytes. Slot records let an unchanged file be
//! trusted without reading it (same dev, inode, size, mtime, ctime, mode); files modified
//! within [`RACY_NS`] of a build are never trusted that way. Every record carries a checksum
//! and every blob is checked (by its recorded stat, or by rehashing) before reuse; a
//! corrupt entry is deleted and rebuilt, never used.

use crate::walk::{Snapshot, Stat};
use oci_core::digest::{digest_reader, Digest};
use oci_core::layout::{Layout, LayoutError};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A file modified this close to the build start is re-read next time (racy-clean rule).
pub const RACY_NS: i64 = 2_000_000_000;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache {path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerRecord {
    pub key: Digest,
    pub diff_id: Digest,
    pub digest: Digest,
    pub size: u64,
    pub uncompressed_size: u64,
    pub media_type: String,
    pub toc_digest: Digest,
    pub toc_size: u64,
    /// lstat of the blob when it was verified, to skip rehashing it.
    pub blob_stat: BlobStat,
    /// The blob's frames in order, so a rebuild of the slot can reuse unchanged ones.
    #[serde(default)]
    pub frames: Vec<crate::compress::Frame>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlobStat {
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

impl BlobStat {
    pub fn of(path: &Path) -> io::Result<BlobStat> {
        let m = fs::metadata(path)?;
        Ok(BlobStat {
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SlotFile {
    pub rel: String,
    pub stat: Stat,
    pub sha256: Digest,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SlotRecord {
    pub slot: String,
    pub source: PathBuf,
    pub params: Digest,
    /// Digest of the slot's listing and every entry's lstat when recorded, if no entry
    /// was racy then: equal state means the last key still holds, unread.
    pub state: Option<Digest>,
    pub last_key: Option<Digest>,
}

/// Replace `path` with `bytes` through a temporary file in the same directory, so a
/// reader sees the old file or the new one, never a part.
fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let io = |what| {
        let path = path.to_path_buf();
        move |source| CacheError::Io { path, what, source }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir).map_err(io("cannot create file"))?;
    io::Write::write_all(&mut tmp, bytes).map_err(io("cannot write file"))?;
    tmp.persist(path).map_err(|e| CacheError::Io {
        path: path.to_path_buf(),
        what: "cannot replace file",
        source: e.error,
    })?;
    Ok(())
}

pub struct Cache {
    root: PathBuf,
    blobs: Layout,
}

/// A hold on the cache's lock file (`<cache>/lock`), released when dropped.
pub struct CacheLock {
    _file: fs::File,
}

impl Cache {
    pub fn default_dir() -> PathBuf {
        dirs::cache_dir().unwrap_or_else(std::env::temp_dir).join("mwbuild")
    }

    pub fn open(root: &Path) -> Result<Cache, CacheError> {
        for sub in ["layers", "slots", "pushed", "walks"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(|source| CacheError::Io {
                path: p,
                what: "cannot create directory",
                source,
            })?;
        }
        Ok(Cache { root: root.to_path_buf(), blobs: Layout::create(root)? })
    }

    pub fn blobs(&self) -> &Layout {
        &self.blobs
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.blobs.blob_path(d)
    }

    pub fn tmp_blob(&self) -> Result<tempfile::NamedTempFile, CacheError> {
        let dir = self.root.join("blobs/sha256");
        tempfile::Builder::new().prefix(".tmp-").tempfile_in(&dir).map_err(|source| CacheError::Io {
            path: dir,
            what: "cannot create temporary blob",
            source,
        })
    }

    /// Move a fully written and hashed temporary blob into place.
    pub fn persist_blob(&self, tmp: tempfile::NamedTempFile, d: &Digest) -> Result<BlobStat, CacheError> {
        let dst = self.blob_path(d);
        tmp.persist(&dst).map_err(|e| CacheError::Io {
            path: dst.clone(),
            what: "cannot move blob into place",
            source: e.error,
        })?;
        BlobStat::of(&dst).map_err(|source| CacheError::Io { path: dst, what: "cannot stat blob", source })
    }

    /// Hold the cache for a build (shared: builds may run side by side), until dropped.
    /// Waits while `mwbuild prune` runs.
    pub fn lock_shared(&self) -> Result<CacheLock, CacheError> {
        self.lock(rustix::fs::FlockOperation::LockShared)
    }

    /// Hold the cache alone (for prune); fails at once while a build holds it.
    pub fn lock_exclusive(&self) -> Result<CacheLock, CacheError> {
        self.lock(rustix::fs::FlockOperation::NonBlockingLockExclusive)
    }

    fn lock(&self, op: rustix::fs::FlockOperation) -> Result<CacheLock, CacheError> {
        let path = self.root.join("lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| CacheError::Io { path: path.clone(), what: "cannot open lock file", source })?;
        match rustix::fs::flock(&f, op) {
            Ok(()) => Ok(CacheLock { _file: f }),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(CacheError::Io {
                path,
                what: "cannot lock (a build is using the cache; run this again once it is done)",
                source: e.into(),
            }),
            Err(e) => Err(CacheError::Io { path, what: "cannot lock", source: e.into() }),
        }
    }

    /// Mark a record as used now (its mtime, which `prune` reads), at most once an hour.
    fn touch(path: &Path) {
        let now = std::time::SystemTime::now();
        let stale = fs::metadata(path)
            .and_then(|m| m.modified())
            .is_ok_and(|t| now.duration_since(t).is_ok_and(|d| d > std::time::Duration::from_secs(3600)));
        if stale {
            if let Ok(f) = fs::OpenOptions::new().write(true).open(path) {
                let _ = f.set_modified(now);
            }
        }
    }

    /// The layer a slot record (a `slots/<id>.json` file) was last built into.
    pub fn slot_last_key(&self, path: &Path) -> Option<Digest> {
        self.read_sealed_at::<SlotRecord>(path, false)?.last_key
    }

    /// A layer record file as it is, without checking its blobs or touching it.
    pub fn read_layer_record(&self, path: &Path) -> Option<LayerRecord> {
        self.read_sealed_at(path, false)
    }

    /// Records are `<sha256 of body>\n<body JSON>`; the checksum is over the raw bytes.
    fn read_sealed<T: DeserializeOwned>(&self, path: &Path) -> Option<T> {
        self.read_sealed_at(path, true)
    }

    /// `remove_corrupt`: delete a record that fails its checksum (builds do; prune's
    /// dry run must not).
    fn read_sealed_at<T: DeserializeOwned>(&self, path: &Path, remove_corrupt: bool) -> Option<T> {
        let bytes = fs::read(path).ok()?;
        let corrupt = |why: &str| {
            tracing::warn!("cache record {} is corrupt ({why}); ignoring it", path.display());
            if remove_corrupt {
                let _ = fs::remove_file(path);
            }
        };
        let Some(nl) = bytes.iter().position(|b| *b == b'\n') else {
            corrupt("no checksum line");
            return None;
        };
        let (sum, body) = (&bytes[..nl], &bytes[nl + 1..]);
        if Digest::of(body).to_string().as_bytes() != sum {
            corrupt("checksum mismatch");
            return None;
        }
        match serde_json::from_slice(body) {
            Ok(v) => Some(v),
            Err(e) => {
                corrupt(&e.to_string());
                None
            }
        }
    }

    fn write_sealed<T: Serialize>(&self, path: &Path, body: &T) -> Result<(), CacheError> {
        let bytes = serde_json::to_vec(body).map_err(|e| CacheError::Io {
            path: path.to_path_buf(),
            what: "cannot encode record",
            source: e.into(),
        })?;
        let mut out = Digest::of(&bytes).to_string().into_bytes();
        out.push(b'\n');
        out.extend_from_slice(&bytes);
        replace_file(path, &out)
    }

    fn slot_path(&self, slot: &str, source: &Path, ext: &str) -> PathBuf {
        let id = Digest::of(format!("{slot}\0{}", source.display()).as_bytes());
        self.root.join("slots").join(format!("{}.{ext}", id.hex()))
    }

    pub fn load_slot(&self, slot: &str, source: &Path, params: &Digest) -> Option<SlotRecord> {
        let path = self.slot_path(slot, source, "json");
        let r: SlotRecord = self.read_sealed(&path)?;
        let ok = r.slot == slot && r.source == source && &r.params == params;
        if ok {
            Self::touch(&path);
        }
        ok.then_some(r)
    }

    fn walk_path(&self, root: &Path, excludes: &[String]) -> PathBuf {
        let id = Digest::of(format!("{}\0{}", root.display(), excludes.join("\0")).as_bytes());
        self.root.join("walks").join(format!("{}.bin", id.hex()))
    }

    /// The directory listings kept by the last walk of `root` (none when missing or corrupt).
    pub fn load_walk(&self, root: &Path, excludes: &[String]) -> Option<Snapshot> {
        let path = self.walk_path(root, excludes);
        let bytes = fs::read(&path).ok()?;
        let s = Snapshot::decode(&bytes);
        if s.is_none() {
            tracing::warn!("walk snapshot {} is corrupt; ignoring it", path.display());
            let _ = fs::remove_file(&path);
        } else {
            Self::touch(&path);
        }
        s
    }

    /// Keep a walk's listings. They are only a hint checked against every directory's
    /// lstat, so a torn write costs a full walk, never a wrong one: no fsync.
    pub fn save_walk(&self, root: &Path, excludes: &[String], s: &Snapshot) -> Result<(), CacheError> {
        replace_file(&self.walk_path(root, excludes), &s.encode())
    }

    /// The per-file records of a slot (empty when missing or corrupt).
    pub fn load_slot_files(&self, r: &SlotRecord) -> Vec<SlotFile> {
        self.read_sealed(&self.slot_path(&r.slot, &r.source, "files.json")).unwrap_or_default()
    }

    pub fn save_slot(&self, r: &SlotRecord, files: &[SlotFile]) -> Result<(), CacheError> {
        self.write_sealed(&self.slot_path(&r.slot, &r.source, "files.json"), &files)?;
        self.write_sealed(&self.slot_path(&r.slot, &r.source, "json"), r)
    }

    /// A reusable layer for this key, with its blob and table of contents checked.
    pub fn lookup_layer(&self, key: &Digest) -> Option<LayerRecord> {
        let path = self.root.join("layers").join(format!("{}.json", key.hex()));
        let mut r: LayerRecord = self.read_sealed(&path)?;
        if &r.key != key {
            return None;
        }
        let blob = self.blob_path(&r.digest);
        let toc_ok = self.blobs.blob_size(&r.toc_digest) == Some(r.toc_size);
        let stat_ok = BlobStat::of(&blob).ok() == Some(r.blob_stat);
        if toc_ok && stat_ok {
            Self::touch(&path);
            return Some(r);
        }
        // Stat changed (copied cache, touched file, or corruption): rehash to decide.
        let verified = toc_ok
            && fs::File::open(&blob)
                .and_then(|f| digest_reader(io::BufReader::new(f)))
                .is_ok_and(|(d, n)| d == r.digest && n == r.size);
        if !verified {
            tracing::warn!("cached layer {} is missing or corrupt; rebuilding it", r.digest);
            let _ = fs::remove_file(&blob);
            let _ = fs::remove_file(&path);
            return None;
        }
        if let Ok(s) = BlobStat::of(&blob) {
            r.blob_stat = s;
            let _ = self.write_sealed(&path, &r);
        }
        Some(r)
    }

    fn pushed_path(&self, host: &str, d: &Digest) -> PathBuf {
        self.root.join("pushed").join(format!("{}-{}", Digest::of(host.as_bytes()).short(), d.hex()))
    }

    /// A repository of `host` this blob was last pushed to (a cross-repository mount source).
    pub fn pushed_repo(&self, host: &str, d: &Digest) -> Option<String> {
        let s = fs::read_to_string(self.pushed_path(host, d)).ok()?;
        let repo = s.trim();
        (!repo.is_empty() && repo.len() < 256 && repo.bytes().all(|b| b.is_ascii_graphic())).then(|| repo.to_string())
    }

    /// Remember that `host/repo` holds the blob. Best effort: a lost note costs an upload.
    pub fn note_pushed(&self, host: &str, repo: &str, d: &Digest) {
        let p = self.pushed_path(host, d);
        if fs::read_to_string(&p).is_ok_and(|s| s.trim() == repo) {
            return;
        }
        let _ = fs::write(p, repo);
    }

    pub fn save_layer(&self, r: &LayerRecord) -> Result<(), CacheError> {
        self.write_sealed(&self.root.join("layers").join(format!("{}.json", r.key.hex())), r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_records_and_blobs_are_not_used() -> Result<(), Box<dyn std::error::Error>> {
        let t = tempfile::tempdir()?;
        let c = Cache::open(t.path())?;
        let (toc, toc_size) = c.blobs().put_blob_bytes(b"toc")?;
        let (digest, size) = c.blobs().put_blob_bytes(b"layer bytes")?;
        let key = Digest::of(b"key");
        let rec = LayerRecord {
            key: key.clone(),
            diff_id: Digest::of(b"d"),
            digest: digest.clone(),
            size,
            uncompressed_size: 1,
            media_type: "m".into(),
            toc_digest: toc,
            toc_size,
            blob_stat: BlobStat::of(&c.blob_path(&digest))?,
            frames: Vec::new(),
        };
        c.save_layer(&rec)?;
        assert_eq!(c.lookup_layer(&key), Some(rec.clone()));
        // Tamper with the blob: detected, removed, not used.
        fs::write(c.blob_path(&digest), b"layer bytez")?;
        assert_eq!(c.lookup_layer(&key), None);
        assert!(!c.blob_path(&digest).exists());
        // Tamper with a record: checksum fails.
        c.save_layer(&rec)?;
        let p = t.path().join("layers").join(format!("{}.json", key.hex()));
        let text = fs::read_to_string(&p)?.replace("\"uncompressed_size\":1", "\"uncompressed_size\":2");
        fs::write(&p, text)?;
        assert_eq!(c.lookup_layer(&key), None);
        Ok(())
    }
}
