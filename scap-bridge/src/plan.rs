//! Deciding, per path, how the new tree gets each entry, by comparing the final view with
//! the live tree (and our record of what we wrote there):
//!
//! * a file whose content (sha256), size and final mode equal the live file's is
//!   hardlinked from the live tree: same inode, same mtime, same mode;
//! * a symlink with the same target is hardlinked too;
//! * anything else is written anew, with an mtime whose whole second is greater than the
//!   old entry's ([`Time::bumped`]);
//! * a directory keeps its old mtime unless an entry directly inside it was added, removed
//!   or replaced;
//! * scap's regions (`LocalSettings.php`, `cache/gitinfo/`, `cache/l10n/*.cdb`) are carried
//!   over from the live tree untouched and the image's version of them is ignored, unless
//!   the caller manages them.
//!
//! A live file's sha256 comes from the state record when its stat is unchanged, otherwise
//! it is read (in parallel), and only when size and mode already match.

use crate::error::{Error, Result};
use crate::fsutil::{self, DiskEntry, FsKind, Time};
use crate::index::Sha;
use crate::path::{self, PathKey};
use crate::state::TreeState;
use crate::view::{ContentRef, NodeKind, View};
use rayon::prelude::*;
use rustix::fd::OwnedFd;
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::Path;

/// How permission bits are derived from the image's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModePolicy {
    /// The image's bits (setuid, setgid and sticky stripped), less the umask.
    Image,
    /// Like a git checkout: 0666 plus the image's execute bits, less the umask;
    /// directories 0777 less the umask.
    Umask,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Modes {
    pub policy: ModePolicy,
    pub umask: u32,
}

impl Modes {
    pub fn file(&self, image: u32) -> u32 {
        let p = image & 0o777;
        match self.policy {
            ModePolicy::Image => p & !self.umask,
            ModePolicy::Umask => (0o666 | (p & 0o111)) & !self.umask,
        }
    }
    pub fn dir(&self, image: u32) -> u32 {
        match self.policy {
            ModePolicy::Image => image & 0o777 & !self.umask,
            ModePolicy::Umask => 0o777 & !self.umask,
        }
    }
}

/// Whether `p` (relative to the version root) belongs to scap.
pub fn in_scap_region(p: &str) -> bool {
    p == "LocalSettings.php"
        || path::within(p, "cache/gitinfo")
        || (path::parent(p) == "cache/l10n" && path::file_name(p).ends_with(".cdb"))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A directory; `mtime` is final.
    Dir {
        mode: u32,
        mtime: Time,
    },
    /// Hardlink the live entry (a file or symlink) with this inode.
    Link {
        ino: u64,
    },
    /// Write a file from `src`.
    Write {
        src: ContentRef,
        mode: u32,
        mtime: Time,
        size: u64,
        sha256: Sha,
    },
    Symlink {
        target: String,
        mtime: Time,
    },
    /// A scap region entry, carried over from the live tree as it is.
    Carry(DiskEntry),
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub added: u64,
    pub changed: u64,
    pub removed: u64,
    pub unchanged: u64,
    pub dirs_added: u64,
    pub dirs_removed: u64,
    pub bytes_to_write: u64,
    pub hashed_live_files: u64,
}

#[derive(Debug, Default)]
pub struct Plan {
    pub actions: BTreeMap<PathKey, Action>,
    /// Added, changed and removed paths, sorted.
    pub changed_paths: Vec<String>,
    pub counts: Counts,
}

pub struct Inputs<'a> {
    pub view: &'a View,
    pub live: Option<(&'a OwnedFd, &'a BTreeMap<PathKey, DiskEntry>)>,
    pub state: Option<&'a TreeState>,
    pub modes: Modes,
    pub regions: bool,
    pub now: Time,
    /// For messages.
    pub target: &'a Path,
}

enum Pending {
    Decided(Action),
    /// Needs the live file's hash.
    Hash {
        live_ino: u64,
        write: Action,
        sha: Sha,
    },
}

pub fn plan(inp: &Inputs<'_>) -> Result<Plan> {
    let empty = BTreeMap::new();
    let live = inp.live.map_or(&empty, |l| l.1);
    let mut pending: Vec<(PathKey, Pending)> = Vec::with_capacity(inp.view.nodes.len());
    for (k, node) in &inp.view.nodes {
        let p = k.as_str();
        if inp.regions && in_scap_region(p) {
            continue;
        }
        let old = live.get(k);
        let old_mtime = old.map(|o| o.stat.mtime);
        let item = match &node.kind {
            NodeKind::Dir => Pending::Decided(Action::Dir { mode: inp.modes.dir(node.mode), mtime: Time::default() }),
            NodeKind::File { size, sha256, src } => {
                let mode = inp.modes.file(node.mode);
                let write = Action::Write {
                    src: *src,
                    mode,
                    mtime: Time::bumped(inp.now, old_mtime),
                    size: *size,
                    sha256: *sha256,
                };
                match old {
                    Some(o) if o.stat.kind == FsKind::File && o.stat.mode == mode && o.stat.size == *size => {
                        match inp.state.and_then(|s| s.known_sha(p, &o.stat)) {
                            Some(known) if known == *sha256 => Pending::Decided(Action::Link { ino: o.stat.ino }),
                            Some(_) => Pending::Decided(write),
                            None => Pending::Hash { live_ino: o.stat.ino, write, sha: *sha256 },
                        }
                    }
                    _ => Pending::Decided(write),
                }
            }
            NodeKind::Symlink { target } => match old {
                Some(o) if o.stat.kind == FsKind::Symlink && o.target.as_deref() == Some(target.as_str()) => {
                    Pending::Decided(Action::Link { ino: o.stat.ino })
                }
                _ => Pending::Decided(Action::Symlink {
                    target: target.clone(),
                    mtime: Time::bumped(inp.now, old_mtime),
                }),
            },
        };
        pending.push((k.clone(), item));
    }
    let hashed = hash_live(inp, &pending)?;
    let mut counts = Counts { hashed_live_files: hashed.len() as u64, ..Counts::default() };
    let mut actions = BTreeMap::new();
    let mut hashed = hashed.into_iter();
    for (k, item) in pending {
        let action = match item {
            Pending::Decided(a) => a,
            Pending::Hash { live_ino, write, sha } => match hashed.next() {
                Some(Some(h)) if h == sha => Action::Link { ino: live_ino },
                _ => write,
            },
        };
        actions.insert(k, action);
    }
    // Scap's regions come from the live tree; their parents must be directories.
    if inp.regions {
        for (k, e) in live.iter().filter(|(k, _)| in_scap_region(k.as_str())) {
            if e.stat.kind == FsKind::Other {
                tracing::warn!("{}: skipping {} (not a file, directory or symlink)", inp.target.display(), k.as_str());
                continue;
            }
            let mut a = path::parent(k.as_str());
            let mut chain = Vec::new();
            while !a.is_empty() {
                chain.push(a);
                a = path::parent(a);
            }
            for a in chain.into_iter().rev() {
                match actions.get(&PathKey::new(a)) {
                    Some(Action::Dir { .. }) | Some(Action::Carry(_)) => {}
                    Some(_) => {
                        return Err(Error::Usage(format!(
                            "the image replaces {a}, which holds scap's {}, with a non-directory; \
                             pass --manage-scap-regions to let the image win",
                            k.as_str()
                        )))
                    }
                    None => {
                        let mode = live.get(&PathKey::new(a)).map_or(inp.modes.dir(0o755), |d| d.stat.mode & 0o777);
                        actions.insert(PathKey::new(a), Action::Dir { mode, mtime: Time::default() });
                    }
                }
            }
            actions.insert(k.clone(), Action::Carry(e.clone()));
        }
    }
    // What changed, and which directories saw a direct child change.
    let mut touched: HashSet<String> = HashSet::new();
    let mut changed_paths = Vec::new();
    for (k, a) in &actions {
        let p = k.as_str();
        let old = live.get(k);
        let is_new_dir = matches!(a, Action::Dir { .. }) && old.is_none_or(|o| o.stat.kind != FsKind::Dir);
        match a {
            Action::Link { .. } => counts.unchanged += 1,
            Action::Carry(_) => {}
            Action::Dir { .. } if is_new_dir => {
                if !p.is_empty() {
                    counts.dirs_added += 1;
                    touched.insert(path::parent(p).to_string());
                    changed_paths.push(p.to_string());
                }
            }
            Action::Dir { .. } => {}
            Action::Write { size, .. } => {
                counts.bytes_to_write += size;
                if old.is_some() {
                    counts.changed += 1
                } else {
                    counts.added += 1
                }
                touched.insert(path::parent(p).to_string());
                changed_paths.push(p.to_string());
            }
            Action::Symlink { .. } => {
                if old.is_some() {
                    counts.changed += 1
                } else {
                    counts.added += 1
                }
                touched.insert(path::parent(p).to_string());
                changed_paths.push(p.to_string());
            }
        }
    }
    for (k, e) in live {
        let p = k.as_str();
        let kept = match actions.get(k) {
            Some(Action::Dir { .. }) | Some(Action::Carry(_)) => e.stat.kind == FsKind::Dir,
            Some(_) => e.stat.kind != FsKind::Dir,
            None => false,
        };
        if kept || (inp.regions && in_scap_region(p)) {
            continue;
        }
        if actions.contains_key(k) {
            continue; // replaced by another kind: counted as changed above
        }
        if e.stat.kind == FsKind::Dir {
            counts.dirs_removed += 1
        } else {
            counts.removed += 1
        }
        touched.insert(path::parent(p).to_string());
        changed_paths.push(p.to_string());
    }
    for (k, a) in actions.iter_mut() {
        if let Action::Dir { mtime, .. } = a {
            let old = live.get(k).map(|o| o.stat.mtime);
            let existed = live.get(k).is_some_and(|o| o.stat.kind == FsKind::Dir);
            *mtime = match old {
                Some(o) if existed && !touched.contains(k.as_str()) => o,
                _ => Time::bumped(inp.now, old),
            };
        }
    }
    changed_paths.sort_by(|a, b| path::cmp(a, b));
    Ok(Plan { actions, changed_paths, counts })
}

/// Hash the live files the plan could not decide on, in parallel; one result per
/// `Pending::Hash`, in order (`None` when the file could not be read as expected).
fn hash_live(inp: &Inputs<'_>, pending: &[(PathKey, Pending)]) -> Result<Vec<Option<Sha>>> {
    let jobs: Vec<(&str, u64)> = pending
        .iter()
        .filter_map(|(k, p)| match p {
            Pending::Hash { live_ino, .. } => Some((k.as_str(), *live_ino)),
            Pending::Decided(_) => None,
        })
        .collect();
    let Some((root, _)) = inp.live else { return Ok(vec![None; jobs.len()]) };
    jobs.par_iter()
        .map(|(p, ino)| {
            let dir = fsutil::open_dir_beneath(root, path::parent(p));
            let file = dir.and_then(|d| fsutil::open_file_at(&d, path::file_name(p)));
            let mut f = match file {
                Ok(f) => f,
                Err(_) => return Ok(None),
            };
            match fsutil::stat_fd(&f) {
                Ok(st) if st.kind == FsKind::File && st.ino == *ino => {}
                _ => return Ok(None),
            }
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 128 * 1024];
            loop {
                match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => h.update(&buf[..n]),
                    // Unreadable: the file is written anew.
                    Err(e) => {
                        tracing::warn!("{}: cannot read ({e}); writing it anew", inp.target.join(p).display());
                        return Ok(None);
                    }
                }
            }
            Ok(Some(h.finalize().into()))
        })
        .collect()
}
