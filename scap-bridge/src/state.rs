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
//!
//! A tree state is a compact binary record (read on every run, so it must parse in a few
//! milliseconds for 200,000 entries); the text form of earlier versions is still read.

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
    /// Sorted by [`PathKey`] order (a directory immediately followed by its descendants),
    /// one entry per path.
    pub entries: Vec<(PathKey, Recorded)>,
}

/// The text form of earlier versions (read, never written).
const TREE_MAGIC_V1: &str = "scap-bridge tree state v1";
/// The binary form: this line, then the body, then the sha256 of everything before it.
const TREE_MAGIC_V2: &[u8] = b"scap-bridge tree state v2\n";

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

#[cfg(test)]
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

/// A little-endian reader over a byte slice; every read fails cleanly past the end.
struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.b.len() {
            return None;
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Some(a)
    }
    fn arr<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.arr::<1>()?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.arr()?))
    }
    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.arr()?))
    }
    fn time(&mut self) -> Option<Time> {
        Some(Time { sec: self.i64()?, nsec: self.u32()? })
    }
    fn str(&mut self, n: usize) -> Option<&'a str> {
        std::str::from_utf8(self.take(n)?).ok()
    }
}

fn kind_byte(k: FsKind) -> u8 {
    kind_char(k) as u8
}

fn byte_kind(b: u8) -> Option<FsKind> {
    Some(match b {
        b'd' => FsKind::Dir,
        b'f' => FsKind::File,
        b'l' => FsKind::Symlink,
        b'o' => FsKind::Other,
        _ => return None,
    })
}

impl TreeState {
    /// The binary form:
    ///
    /// ```text
    /// "scap-bridge tree state v2\n"
    /// u32 length, manifest; u32 length, fingerprint; u64 number of entries
    /// per entry: u8 kind (d f l o), u8 1 if a sha256 follows, u16 path length, u32 mode,
    ///            u64 size, u32 dev major, u32 dev minor, u64 ino, u32 nlink,
    ///            i64 + u32 mtime, i64 + u32 ctime, [32 bytes sha256], path
    /// 32 bytes: sha256 of everything above
    /// ```
    ///
    /// Integers are little-endian; entries are in [`PathKey`] order.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(128 + self.entries.len() * 160);
        b.extend_from_slice(TREE_MAGIC_V2);
        for s in [&self.manifest, &self.fingerprint] {
            b.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        }
        b.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for (k, r) in &self.entries {
            let st = &r.stat;
            let p = k.as_str().as_bytes();
            b.push(kind_byte(st.kind));
            b.push(u8::from(r.sha256.is_some()));
            // Paths are at most PATH_MAX (4096) bytes.
            b.extend_from_slice(&u16::try_from(p.len()).unwrap_or(u16::MAX).to_le_bytes());
            b.extend_from_slice(&st.mode.to_le_bytes());
            b.extend_from_slice(&st.size.to_le_bytes());
            b.extend_from_slice(&st.dev.0.to_le_bytes());
            b.extend_from_slice(&st.dev.1.to_le_bytes());
            b.extend_from_slice(&st.ino.to_le_bytes());
            b.extend_from_slice(&st.nlink.to_le_bytes());
            for t in [st.mtime, st.ctime] {
                b.extend_from_slice(&t.sec.to_le_bytes());
                b.extend_from_slice(&t.nsec.to_le_bytes());
            }
            if let Some(sha) = &r.sha256 {
                b.extend_from_slice(sha);
            }
            b.extend_from_slice(p);
        }
        let sum: [u8; 32] = Sha256::digest(&b).into();
        b.extend_from_slice(&sum);
        b
    }

    /// Parse either form; `None` for anything damaged, truncated or out of order.
    pub fn from_bytes(bytes: &[u8]) -> Option<TreeState> {
        if !bytes.starts_with(TREE_MAGIC_V2) {
            return Self::from_text(std::str::from_utf8(bytes).ok()?);
        }
        let (body, sum) = bytes.split_at(bytes.len().checked_sub(32)?);
        if Sha256::digest(body).as_slice() != sum {
            return None;
        }
        let mut c = Cursor { b: &body[TREE_MAGIC_V2.len()..] };
        let n = c.u32()? as usize;
        let manifest = c.str(n)?.to_string();
        let n = c.u32()? as usize;
        let fingerprint = c.str(n)?.to_string();
        let count = usize::try_from(c.u64()?).ok()?;
        // Each entry takes at least 64 bytes: a count beyond that is damage.
        let mut entries: Vec<(PathKey, Recorded)> = Vec::with_capacity(count.min(c.b.len() / 64));
        for _ in 0..count {
            let kind = byte_kind(c.u8()?)?;
            let has_sha = c.u8()?;
            let plen = c.u16()? as usize;
            let mode = c.u32()?;
            let size = c.u64()?;
            let dev = (c.u32()?, c.u32()?);
            let ino = c.u64()?;
            let nlink = c.u32()?;
            let mtime = c.time()?;
            let ctime = c.time()?;
            let sha256 = match has_sha {
                0 => None,
                1 => Some(c.arr::<32>()?),
                _ => return None,
            };
            let key = PathKey::new(c.str(plen)?);
            if entries.last().is_some_and(|(prev, _)| *prev >= key) {
                return None;
            }
            let stat = Stat { kind, mode, size, dev, ino, nlink, mtime, ctime };
            entries.push((key, Recorded { stat, sha256 }));
        }
        if !c.b.is_empty() {
            return None;
        }
        Some(TreeState { manifest, fingerprint, entries })
    }

    /// The text form of earlier versions (kept for tests of the reader).
    #[cfg(test)]
    fn to_text(&self) -> String {
        let mut s = String::with_capacity(128 + self.entries.len() * 128);
        s.push_str(&format!("{TREE_MAGIC_V1}\nmanifest {}\nfingerprint {}\n", self.manifest, self.fingerprint));
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

    /// The text form of earlier versions.
    fn from_text(text: &str) -> Option<TreeState> {
        let body = unseal(text)?;
        let mut lines = body.lines();
        if lines.next()? != TREE_MAGIC_V1 {
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
        Some(TreeState { manifest, fingerprint, entries: entries.into_iter().collect() })
    }

    /// What we recorded at `p`.
    pub fn get(&self, p: &str) -> Option<&Recorded> {
        let key = PathKey::new(p);
        let i = self.entries.binary_search_by(|(k, _)| k.cmp(&key)).ok()?;
        Some(&self.entries[i].1)
    }

    /// The recorded sha256 of the file at `p`, if `now` (its current stat) matches what we
    /// recorded in every field that a change of content would touch.
    pub fn known_sha(&self, p: &str, now: &Stat) -> Option<Sha> {
        let r = self.get(p)?;
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
        let bytes = fs::read(&p).ok()?;
        let s = TreeState::from_bytes(&bytes);
        if s.is_none() {
            tracing::warn!("{}: damaged state file ignored", p.display());
        }
        s
    }

    pub fn save_tree(&self, target: &Path, s: &TreeState) -> Result<()> {
        write_atomic(&self.tree_path(target), &s.to_bytes())
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
        let dir = Recorded { stat: Stat { kind: FsKind::Dir, ..stat.clone() }, sha256: None };
        let link = Recorded { stat: Stat { kind: FsKind::Symlink, ino: 7, ..stat.clone() }, sha256: None };
        let s = TreeState {
            manifest: "sha256:x".into(),
            fingerprint: "f".into(),
            entries: vec![
                (PathKey::new(""), dir.clone()),
                (PathKey::new("a b"), dir.clone()),
                (PathKey::new("a b/c"), Recorded { stat: stat.clone(), sha256: Some([3; 32]) }),
                (PathKey::new("a b/ñ"), link),
                (PathKey::new("a-b"), dir),
            ],
        };
        let touched = Stat { ctime: Time { sec: 1_700_000_002, nsec: 0 }, ..stat.clone() };
        let b = s.to_bytes();
        let t = s.to_text();
        for back in [TreeState::from_bytes(&b), TreeState::from_bytes(t.as_bytes())] {
            let back = back.expect("round trip");
            assert_eq!((&back.manifest, &back.fingerprint, &back.entries), (&s.manifest, &s.fingerprint, &s.entries));
            assert_eq!(back.known_sha("a b/c", &stat), Some([3; 32]));
            assert_eq!(back.known_sha("a b/c", &touched), None);
            assert_eq!(back.known_sha("a b/d", &stat), None);
            assert_eq!(back.get("a-b").map(|r| r.stat.kind), Some(FsKind::Dir));
        }
        assert!(TreeState::from_bytes(t.replace("a b/c", "a b/d").as_bytes()).is_none());
        // Any flipped bit, any truncation, anything appended: ignored.
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x10;
            assert!(TreeState::from_bytes(&bad).is_none(), "bit flipped at {i}");
            assert!(TreeState::from_bytes(&b[..i]).is_none(), "truncated at {i}");
        }
        assert!(TreeState::from_bytes(&[b.as_slice(), b"x"].concat()).is_none());
        // Entries out of order are refused even when sealed.
        let mut swapped = s.clone();
        swapped.entries.swap(2, 3);
        assert!(TreeState::from_bytes(&swapped.to_bytes()).is_none());
    }
}
