//! Our own state, kept outside the staging tree (which is an rsync source):
//!
//! ```text
//! <state-dir>/layers/<hex>.idx    index of a layer we read and verified ourselves
//! <state-dir>/trees/<key>.state   what we last wrote into one target tree
//! <state-dir>/locks/<key>.lock    held (fcntl) while a run works on that target
//! <state-dir>/spool/              layer blobs downloaded from a registry, while in use
//! ```
//!
//! `<key>` is derived from the target's absolute path. Every file is written to a
//! temporary name and renamed into place, and carries a checksum: a damaged or stale file
//! is ignored (costing time, never correctness), since every fact it holds is checked
//! against the file system (`dev`, `ino`, size, mode, mtime and ctime must all match before
//! a recorded sha256 is believed).

use crate::error::{Error, Result};
use crate::fsutil::{FsKind, Stat, Time};
use crate::index::{LayerIndex, Sha};
use crate::path::PathKey;
use oci_core::Digest;
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The default state directory: `$XDG_STATE_HOME/scap-bridge`, else
/// `~/.local/state/scap-bridge`.
pub fn default_dir() -> PathBuf {
    dirs::state_dir()
        .or_else(|| dirs::home_dir().map(|h| h.join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
        .join("scap-bridge")
}

#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

/// What we recorded about one entry we placed in a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub stat: Stat,
    pub sha256: Option<Sha>,
}

/// What we last wrote into one target tree.
#[derive(Debug, Clone, Default)]
pub struct TreeState {
    pub manifest: String,
    pub fingerprint: String,
    pub entries: BTreeMap<PathKey, Recorded>,
}

const TREE_MAGIC: &str = "scap-bridge tree state v1";

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(Error::io(dir, "cannot create state directory"))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(Error::io(dir, "cannot create a temporary file"))?;
    tmp.write_all(bytes).map_err(Error::io(path, "cannot write"))?;
    tmp.persist(path).map_err(|e| Error::Io { path: path.to_path_buf(), what: "cannot replace", source: e.error })?;
    Ok(())
}

fn sealed(body: String) -> String {
    let sum = hex::encode(Sha256::digest(body.as_bytes()));
    format!("{body}checksum {sum}\n")
}

/// The body of a sealed text, if its checksum holds.
fn unseal(text: &str) -> Option<&str> {
    let end = text.trim_end_matches('\n').rfind('\n')? + 1;
    let (body, trailer) = text.split_at(end);
    let sum = trailer.trim_end().strip_prefix("checksum ")?;
    (hex::encode(Sha256::digest(body.as_bytes())) == sum).then_some(body)
}

fn kind_char(k: FsKind) -> char {
    match k {
        FsKind::Dir => 'd',
        FsKind::File => 'f',
        FsKind::Symlink => 'l',
        FsKind::Other => 'o',
    }
}

impl TreeState {
    pub fn to_text(&self) -> String {
        let mut s = String::with_capacity(128 + self.entries.len() * 128);
        s.push_str(&format!("{TREE_MAGIC}\nmanifest {}\nfingerprint {}\n", self.manifest, self.fingerprint));
        for (k, r) in &self.entries {
            let st = &r.stat;
            let sha = r.sha256.map(hex::encode).unwrap_or_default();
            s.push_str(&format!(
                "{}\t{:o}\t{}\t{sha}\t{}:{}\t{}\t{}\t{}.{}\t{}.{}\t{}\n",
                kind_char(st.kind),
                st.mode,
                st.size,
                st.dev.0,
                st.dev.1,
                st.ino,
                st.nlink,
                st.mtime.sec,
                st.mtime.nsec,
                st.ctime.sec,
                st.ctime.nsec,
                k.as_str()
            ));
        }
        sealed(s)
    }

    pub fn from_text(text: &str) -> Option<TreeState> {
        let body = unseal(text)?;
        let mut lines = body.lines();
        if lines.next()? != TREE_MAGIC {
            return None;
        }
        let manifest = lines.next()?.strip_prefix("manifest ")?.to_string();
        let fingerprint = lines.next()?.strip_prefix("fingerprint ")?.to_string();
        let time = |s: &str| -> Option<Time> {
            let (a, b) = s.split_once('.')?;
            Some(Time { sec: a.parse().ok()?, nsec: b.parse().ok()? })
        };
        let mut entries = BTreeMap::new();
        for line in lines {
            let f: Vec<&str> = line.splitn(10, '\t').collect();
            let [k, mode, size, sha, dev, ino, nlink, mtime, ctime, p] = f.as_slice() else { return None };
            let kind = match *k {
                "d" => FsKind::Dir,
                "f" => FsKind::File,
                "l" => FsKind::Symlink,
                _ => FsKind::Other,
            };
            let (ma, mi) = dev.split_once(':')?;
            let sha256 = if sha.is_empty() {
                None
            } else {
                let mut b = [0u8; 32];
                hex::decode_to_slice(sha, &mut b).ok()?;
                Some(b)
            };
            let stat = Stat {
                kind,
                mode: u32::from_str_radix(mode, 8).ok()?,
                size: size.parse().ok()?,
                dev: (ma.parse().ok()?, mi.parse().ok()?),
                ino: ino.parse().ok()?,
                nlink: nlink.parse().ok()?,
                mtime: time(mtime)?,
                ctime: time(ctime)?,
            };
            entries.insert(PathKey::new(p), Recorded { stat, sha256 });
        }
        Some(TreeState { manifest, fingerprint, entries })
    }

    /// The recorded sha256 of the file at `p`, if `now` (its current stat) matches what we
    /// recorded in every field that a change of content would touch.
    pub fn known_sha(&self, p: &str, now: &Stat) -> Option<Sha> {
        let r = self.entries.get(&PathKey::new(p))?;
        let s = &r.stat;
        let same = s.kind == FsKind::File
            && now.kind == FsKind::File
            && s.dev == now.dev
            && s.ino == now.ino
            && s.size == now.size
            && s.mode == now.mode
            && s.mtime == now.mtime
            && s.ctime == now.ctime;
        if same {
            r.sha256
        } else {
            None
        }
    }
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateDir { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A file-name-safe key for a target directory: its name and a hash of its path.
    pub fn key(target: &Path) -> String {
        let name: String = target
            .file_name()
            .map(|n| {
                n.to_string_lossy()
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() || ".-_".contains(c) { c } else { '_' })
                    .collect()
            })
            .unwrap_or_default();
        let h = hex::encode(Sha256::digest(target.as_os_str().as_encoded_bytes()));
        format!("{name}-{}", &h[..16])
    }

    fn tree_path(&self, target: &Path) -> PathBuf {
        self.dir.join("trees").join(format!("{}.state", Self::key(target)))
    }

    pub fn lock_path(&self, target: &Path) -> PathBuf {
        self.dir.join("locks").join(format!("{}.lock", Self::key(target)))
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.dir.join("spool")
    }

    /// The recorded state of a target, if there is a sound one.
    pub fn load_tree(&self, target: &Path) -> Option<TreeState> {
        let p = self.tree_path(target);
        let text = fs::read_to_string(&p).ok()?;
        let s = TreeState::from_text(&text);
        if s.is_none() {
            tracing::warn!("{}: damaged state file ignored", p.display());
        }
        s
    }

    pub fn save_tree(&self, target: &Path, s: &TreeState) -> Result<()> {
        write_atomic(&self.tree_path(target), s.to_text().as_bytes())
    }

    pub fn forget_tree(&self, target: &Path) -> Result<()> {
        let p = self.tree_path(target);
        match fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(p, "cannot remove")(e)),
            _ => Ok(()),
        }
    }

    fn layer_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("layers").join(format!("{}.idx", d.hex()))
    }

    /// Our own index of a layer, if we verified it before.
    pub fn load_layer(&self, d: &Digest) -> Option<LayerIndex> {
        let text = fs::read_to_string(self.layer_path(d)).ok()?;
        LayerIndex::from_text(&text)
    }

    pub fn save_layer(&self, d: &Digest, idx: &LayerIndex) -> Result<()> {
        write_atomic(&self.layer_path(d), idx.to_text().as_bytes())
    }

    /// Remove cached layer indexes not used for `days` days (by mtime; a use touches it).
    pub fn prune_layers(&self, keep: &[Digest], days: u64) {
        let Ok(rd) = fs::read_dir(self.dir.join("layers")) else { return };
        let cutoff = std::time::SystemTime::now() - std::time::Duration::from_secs(days * 86_400);
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if keep.iter().any(|d| name.starts_with(d.hex())) {
                let _ = fs::File::options()
                    .append(true)
                    .open(e.path())
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                continue;
            }
            let old = e.metadata().and_then(|m| m.modified()).is_ok_and(|m| m < cutoff);
            if old || name.starts_with(".tmp-") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_state_round_trip() {
        let stat = Stat {
            kind: FsKind::File,
            mode: 0o664,
            size: 5,
            dev: (8, 1),
            ino: 42,
            nlink: 1,
            mtime: Time { sec: 1_700_000_000, nsec: 5 },
            ctime: Time { sec: 1_700_000_001, nsec: 0 },
        };
        let mut s = TreeState { manifest: "sha256:x".into(), fingerprint: "f".into(), entries: BTreeMap::new() };
        s.entries.insert(PathKey::new("a b/c"), Recorded { stat: stat.clone(), sha256: Some([3; 32]) });
        s.entries.insert(PathKey::new(""), Recorded { stat: Stat { kind: FsKind::Dir, ..stat.clone() }, sha256: None });
        let t = s.to_text();
        let back = TreeState::from_text(&t).expect("round trip");
        assert_eq!(back.entries, s.entries);
        assert_eq!(back.known_sha("a b/c", &stat), Some([3; 32]));
        let touched = Stat { ctime: Time { sec: 1_700_000_002, nsec: 0 }, ..stat };
        assert_eq!(back.known_sha("a b/c", &touched), None);
        assert!(TreeState::from_text(&t.replace("a b/c", "a b/d")).is_none());
    }
}
