//! `mwbuild prune`: bound the build cache.
//!
//! What a build uses is kept: every layer a slot was last built into (so the next build of
//! an unchanged tree stays a no-op), and every layer, slot and walk record used within the
//! last `keep` (so a revert or a rollback within that time reuses its layers instead of
//! compressing them again). Builds mark what they use by its file time (see
//! [`crate::cache::Cache::touch`]). Everything else goes: layer records, then the blobs (layer
//! and TOC) that no kept record names, slot and walk records, and the notes of where
//! deleted blobs were pushed.
//!
//! A build holds the cache's lock shared for its whole run and prune holds it exclusively,
//! so prune never deletes a blob a running build is about to publish; and a blob younger
//! than an hour is never deleted, whatever the records say.

use crate::cache::{Cache, CacheError};
use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// What a prune removed (or would remove, with `dry_run`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub layer_records: usize,
    pub blobs: usize,
    pub blob_bytes: u64,
    pub slot_records: usize,
    pub walk_records: usize,
    pub kept_layer_records: usize,
    pub kept_blobs: usize,
}

impl PruneReport {
    pub fn summary(&self, dry_run: bool) -> String {
        let verb = if dry_run { "would remove" } else { "removed" };
        format!(
            "{verb} {} layer records, {} blobs ({:.1} MiB), {} slot records, {} walk records; kept {} layer records and {} blobs\n",
            self.layer_records,
            self.blobs,
            self.blob_bytes as f64 / (1u64 << 20) as f64,
            self.slot_records,
            self.walk_records,
            self.kept_layer_records,
            self.kept_blobs
        )
    }
}

/// Young files are never removed: a build that started before the lock was taken (or
/// that ignores it, from an older mwbuild) may still be writing them.
const GRACE: Duration = Duration::from_secs(3600);

fn older_than(path: &Path, cutoff: SystemTime) -> bool {
    fs::symlink_metadata(path).and_then(|m| m.modified()).is_ok_and(|t| t < cutoff)
}

fn files_in(dir: &Path) -> Result<Vec<PathBuf>, CacheError> {
    let io = |source| CacheError::Io { path: dir.to_path_buf(), what: "cannot list", source };
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(e)),
    };
    for e in rd {
        let e = e.map_err(io)?;
        if e.file_type().map_err(io)?.is_file() {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

fn remove(path: &Path, dry_run: bool) -> Result<(), CacheError> {
    if dry_run {
        return Ok(());
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CacheError::Io { path: path.to_path_buf(), what: "cannot remove", source }),
    }
}

/// Prune the cache at `root`, keeping what was used within `keep`. Fails at once (naming
/// the lock) when a build holds the cache.
pub fn prune(root: &Path, keep: Duration, dry_run: bool) -> Result<PruneReport, CacheError> {
    let cache = Cache::open(root)?;
    let _lock = cache.lock_exclusive()?;
    let now = SystemTime::now();
    let cutoff = now.checked_sub(keep).unwrap_or(SystemTime::UNIX_EPOCH);
    let grace = now.checked_sub(GRACE).unwrap_or(SystemTime::UNIX_EPOCH);
    let mut report = PruneReport::default();

    // Slots: old ones go; the others protect the layer they were last built into.
    let mut live_keys = HashSet::new();
    for path in files_in(&root.join("slots"))? {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        if name.ends_with(".files.json") || !name.ends_with(".json") {
            continue;
        }
        if older_than(&path, cutoff) {
            remove(&path, dry_run)?;
            remove(&path.with_extension("files.json"), dry_run)?;
            report.slot_records += 1;
        } else if let Some(key) = cache.slot_last_key(&path) {
            live_keys.insert(key);
        }
    }
    // Orphaned per-file records (their slot record is gone).
    for path in files_in(&root.join("slots"))? {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if let Some(stem) = name.strip_suffix(".files.json") {
            if !root.join("slots").join(format!("{stem}.json")).exists() && older_than(&path, grace) {
                remove(&path, dry_run)?;
            }
        }
    }

    // Layer records: kept if a slot names them or they were used recently.
    let mut referenced = HashSet::new();
    for path in files_in(&root.join("layers"))? {
        let record = cache.read_layer_record(&path);
        let keep_it = match &record {
            Some(r) => live_keys.contains(&r.key) || !older_than(&path, cutoff),
            // Unreadable records are never used; they go once out of the grace period.
            None => !older_than(&path, grace),
        };
        if keep_it {
            if let Some(r) = record {
                referenced.insert(r.digest.hex().to_string());
                referenced.insert(r.toc_digest.hex().to_string());
            }
            report.kept_layer_records += 1;
        } else {
            remove(&path, dry_run)?;
            report.layer_records += 1;
        }
    }

    // Blobs no kept record names (the cache layout's own index lists none).
    let mut removed_blobs = HashSet::new();
    for path in files_in(&root.join("blobs").join("sha256"))? {
        let hex = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        if referenced.contains(&hex) || !older_than(&path, grace) {
            report.kept_blobs += 1;
            continue;
        }
        report.blob_bytes += fs::symlink_metadata(&path).map(|m| m.len()).unwrap_or(0);
        remove(&path, dry_run)?;
        report.blobs += 1;
        removed_blobs.insert(hex);
    }
    for path in files_in(&root.join("pushed"))? {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.split_once('-').is_some_and(|(_, hex)| removed_blobs.contains(hex)) {
            remove(&path, dry_run)?;
        }
    }

    // Walk snapshots are hints; an old one is of no use.
    for path in files_in(&root.join("walks"))? {
        if older_than(&path, cutoff) {
            remove(&path, dry_run)?;
            report.walk_records += 1;
        }
    }
    Ok(report)
}
