//! Making the new tree and swapping it in.
//!
//! The new tree is built beside the target, as `<parent>/.scap-bridge.<name>.new`, mode
//! 0700 until it is complete. Everything in it is created by us, relative to directory
//! descriptors: directories, hardlinks to unchanged live entries (checked to be the inode
//! the plan chose), new symlinks, scap's regions, and — while the layers stream — the files
//! to write (`O_CREAT|O_EXCL|O_NOFOLLOW`, mode and mtime set through the descriptor). Then
//! directory modes and mtimes are set, and the new tree is exchanged with the live one in
//! one `renameat2(RENAME_EXCHANGE)` (or renamed into place when there is none). The old
//! tree, now under the temporary name, is removed. At no instant is the live tree anything
//! but the old tree or the new one, and no inode visible in the live tree is ever written.
//! A run killed at any point leaves at most the temporary tree, which the next run removes.

use crate::error::{Error, Result};
use crate::fsutil::{self, FsKind, Time};
use crate::index::{IndexEntry, Sha};
use crate::layer::Extract;
use crate::path;
use crate::plan::{Action, Plan};
use crate::view::ContentRef;
use crate::writer::{FileJob, Pool, CHUNK};
use rustix::fd::OwnedFd;
use rustix::fs::RenameFlags;
use sha2::Digest as _;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The temporary name of the tree being built for target `name`.
pub fn temp_name(name: &str) -> String {
    format!(".scap-bridge.{name}.new")
}

/// Files sharing one content source (hardlinks in the image) are written once and linked.
struct Group {
    paths: Vec<String>,
    mode: u32,
    mtime: Time,
    size: u64,
    sha256: Sha,
    done: bool,
}

pub struct Builder<'a> {
    parent: &'a OwnedFd,
    parent_path: &'a Path,
    name: &'a str,
    tmp: String,
    root: OwnedFd,
    live: Option<&'a OwnedFd>,
    groups: HashMap<ContentRef, Group>,
    /// Which layer [`Extract`] calls are for.
    layer: u32,
    /// The threads that write file contents.
    pool: Option<Pool>,
    pub bytes_written: u64,
    pub files_written: u64,
}

pub(crate) fn io_at(base: &Path, rel: &str, what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    Error::io(if rel.is_empty() { base.to_path_buf() } else { base.join(rel) }, what)
}

impl<'a> Builder<'a> {
    /// Remove what an interrupted run left and create the empty new tree.
    pub fn start(parent: &'a OwnedFd, parent_path: &'a Path, name: &'a str, live: Option<&'a OwnedFd>) -> Result<Self> {
        let tmp = temp_name(name);
        let tmp_path = parent_path.join(&tmp);
        fsutil::remove_tree_at(parent, &tmp)
            .map_err(Error::io(&tmp_path, "cannot remove the leftover of an interrupted run"))?;
        fsutil::mkdir_at(parent, &tmp).map_err(Error::io(&tmp_path, "cannot create the new tree"))?;
        let root = fsutil::open_dir_beneath(parent, &tmp).map_err(Error::io(&tmp_path, "cannot open the new tree"))?;
        Ok(Builder {
            parent,
            parent_path,
            name,
            tmp,
            root,
            live,
            groups: HashMap::new(),
            layer: 0,
            pool: None,
            bytes_written: 0,
            files_written: 0,
        })
    }

    fn tmp_path(&self) -> PathBuf {
        self.parent_path.join(&self.tmp)
    }

    /// Remove the unfinished new tree (after an error).
    pub fn abandon(mut self) {
        // No writer may still create files while the tree is removed.
        drop(self.pool.take());
        if let Err(e) = fsutil::remove_tree_at(self.parent, &self.tmp) {
            tracing::warn!("{}: cannot remove the unfinished tree: {e}; the next run will", self.tmp_path().display());
        }
    }

    /// Create directories, links, symlinks and carried-over entries; remember the writes.
    /// The entries of the first two levels are made first; then the subtrees below them, on
    /// two threads (creating thousands of directories is kernel work that one thread would
    /// otherwise do alone).
    pub fn skeleton(&mut self, plan: &Plan) -> Result<()> {
        let mut top: Vec<(&str, &Action)> = Vec::new();
        let mut below: Vec<Vec<(&str, &Action)>> = Vec::new();
        let mut last_group: Option<&str> = None;
        for (k, action) in &plan.actions {
            let p = k.as_str();
            if p.is_empty() {
                continue;
            }
            if let Action::Write { src, mode, mtime, size, sha256 } = action {
                let g = self.groups.entry(*src).or_insert_with(|| Group {
                    paths: Vec::new(),
                    mode: *mode,
                    mtime: *mtime,
                    size: *size,
                    sha256: *sha256,
                    done: false,
                });
                g.paths.push(p.to_string());
                g.mtime = g.mtime.max(*mtime);
                continue;
            }
            // Entries two levels down or less are made first; the subtrees below them are
            // shared out (one top-level directory, `vendor`, often holds most of the tree).
            let second = p.match_indices('/').nth(1).map(|(i, _)| &p[..i]);
            match second {
                None => top.push((p, action)),
                Some(group) => {
                    if last_group != Some(group) {
                        below.push(Vec::new());
                        last_group = Some(group);
                    }
                    if let Some(v) = below.last_mut() {
                        v.push((p, action));
                    }
                }
            }
        }
        let tmp_path = self.tmp_path();
        let live_path = self.parent_path.join(self.name);
        let ctx = Skeleton { root: &self.root, live: self.live, tmp_path: &tmp_path, live_path: &live_path };
        let mut copied = ctx.make(&top)?;
        // Two shares of about the same number of entries, each a run of whole subtrees.
        let total: usize = below.iter().map(Vec::len).sum();
        let mut split = 0;
        let mut acc = 0;
        while split < below.len() && acc * 2 < total {
            acc += below[split].len();
            split += 1;
        }
        let (a, b) = below.split_at(split);
        let (ra, rb) = std::thread::scope(|s| {
            let other = s.spawn(|| b.iter().try_fold(0u64, |n, t| Ok::<_, Error>(n + ctx.make(t)?)));
            let here = a.iter().try_fold(0u64, |n, t| Ok::<_, Error>(n + ctx.make(t)?));
            let there =
                other.join().unwrap_or_else(|_| Err(Error::Usage("internal: a skeleton thread panicked".into())));
            (here, there)
        });
        copied += ra? + rb?;
        self.bytes_written += copied;
        Ok(())
    }

    /// Direct the next [`Extract`] calls at layer `layer`.
    pub fn for_layer(&mut self, layer: u32) -> &mut Self {
        self.layer = layer;
        self
    }

    /// The file writers, started on first use.
    fn pool(&mut self) -> Result<&mut Pool> {
        if self.pool.is_none() {
            let tmp_path = self.tmp_path();
            self.pool = Some(Pool::start(&self.root, &tmp_path)?);
        }
        match self.pool.as_mut() {
            Some(p) => Ok(p),
            None => Err(Error::Usage("internal: no file writers".into())),
        }
    }

    /// Start writing the content of `src`, if it is still wanted.
    fn begin(&mut self, src: ContentRef) -> Result<bool> {
        let Some(g) = self.groups.get(&src).filter(|g| !g.done) else {
            return Ok(false);
        };
        let job = FileJob { first: g.paths[0].clone(), others: g.paths[1..].to_vec(), mode: g.mode, mtime: g.mtime };
        self.pool()?.begin(job)?;
        Ok(true)
    }

    /// The content of `src` was delivered in full and hashed to `sha256`.
    fn complete(&mut self, src: ContentRef, sha256: &Sha) -> Result<()> {
        let Some(g) = self.groups.get_mut(&src) else { return Ok(()) };
        if &g.sha256 != sha256 {
            return Err(Error::Usage(format!("internal: {} read with another sha256 than planned", g.paths[0])));
        }
        g.done = true;
        self.bytes_written += g.size;
        self.files_written += 1;
        self.pool()?.end()
    }

    /// Write content the caller holds (layer [`ContentRef::INLINE`]).
    pub fn write_inline(&mut self, seq: u32, bytes: &[u8]) -> Result<()> {
        let src = ContentRef { layer: ContentRef::INLINE, seq };
        if !self.begin(src)? {
            return Ok(());
        }
        let parts = bytes.chunks(CHUNK).count();
        for (i, part) in bytes.chunks(CHUNK).enumerate() {
            let pool = self.pool()?;
            let mut buf = pool.buffer()?;
            buf[..part.len()].copy_from_slice(part);
            pool.chunk(buf, part.len(), i + 1 == parts)?;
        }
        let sha: Sha = sha2::Sha256::digest(bytes).into();
        self.complete(src, &sha)
    }

    /// Wait for the writers: every file sent is on disk.
    pub fn finish_writes(&mut self) -> Result<()> {
        match self.pool.take() {
            Some(mut p) => p.finish(),
            None => Ok(()),
        }
    }

    /// Every planned write happened (call [`Builder::finish_writes`] first).
    pub fn check_complete(&self) -> Result<()> {
        match self.groups.values().find(|g| !g.done) {
            None => Ok(()),
            Some(g) => Err(Error::Usage(format!("internal: {} was never delivered by its layer", g.paths[0]))),
        }
    }

    /// Set directory modes and mtimes (after everything inside them exists), deepest first.
    pub fn finish_dirs(&mut self, plan: &Plan) -> Result<()> {
        let tmp_path = self.tmp_path();
        for (k, a) in plan.actions.iter().rev() {
            let (mode, mtime) = match a {
                Action::Dir { mode, mtime } => (*mode, *mtime),
                Action::Carry(e) if e.stat.kind == FsKind::Dir => (e.stat.mode, e.stat.mtime),
                _ => continue,
            };
            let p = k.as_str();
            let fd = if p.is_empty() {
                None
            } else {
                Some(fsutil::open_dir_beneath(&self.root, p).map_err(io_at(&tmp_path, p, "cannot open"))?)
            };
            let fd = fd.as_ref().unwrap_or(&self.root);
            // Keep a setgid bit the directory inherited from its parent (group ownership).
            let inherited = fsutil::stat_fd(fd).map(|s| s.mode & 0o2000).unwrap_or(0);
            fsutil::chmod_fd(fd, (mode & 0o777) | inherited).map_err(io_at(&tmp_path, p, "cannot set mode"))?;
            fsutil::set_mtime_fd(fd, mtime).map_err(io_at(&tmp_path, p, "cannot set mtime"))?;
        }
        Ok(())
    }

    /// Put the new tree in place: exchange with the live one, then remove the old tree.
    pub fn swap(self, live_exists: bool) -> Result<()> {
        let target = self.parent_path.join(self.name);
        if live_exists {
            rustix::fs::renameat_with(self.parent, &self.tmp, self.parent, self.name, RenameFlags::EXCHANGE)
                .map_err(|e| Error::io(&target, "cannot exchange the new tree with the live one")(e.into()))?;
            // The old tree is now under the temporary name.
            if let Err(e) = fsutil::remove_tree_at(self.parent, &self.tmp) {
                tracing::warn!("{}: cannot remove the old tree: {e}; the next run will", self.tmp_path().display());
            }
        } else {
            rustix::fs::renameat_with(self.parent, &self.tmp, self.parent, self.name, RenameFlags::NOREPLACE)
                .map_err(|e| Error::io(&target, "cannot move the new tree into place")(e.into()))?;
        }
        Ok(())
    }
}

impl Extract for Builder<'_> {
    fn wants(&mut self, seq: u32, _entry: &IndexEntry) -> Result<bool> {
        self.begin(ContentRef { layer: self.layer, seq })
    }
    fn buffer(&mut self) -> Result<Vec<u8>> {
        self.pool()?.buffer()
    }
    fn chunk(&mut self, buf: Vec<u8>, n: usize, last: bool) -> Result<()> {
        self.pool()?.chunk(buf, n, last)
    }
    fn done(&mut self, seq: u32, sha256: &Sha) -> Result<()> {
        self.complete(ContentRef { layer: self.layer, seq }, sha256)
    }
}

/// What making entries of the new tree needs (shared by the skeleton's threads).
struct Skeleton<'a> {
    root: &'a OwnedFd,
    live: Option<&'a OwnedFd>,
    tmp_path: &'a Path,
    live_path: &'a Path,
}

impl Skeleton<'_> {
    /// Make `actions` (in path order; every parent either among them, before its
    /// children, or already made). Returns the bytes copied from the live tree.
    fn make(&self, actions: &[(&str, &Action)]) -> Result<u64> {
        let tmp_path = self.tmp_path;
        let live_path = self.live_path;
        let mut stack: Vec<(String, OwnedFd)> = Vec::new();
        let mut opened: Option<(String, OwnedFd)> = None;
        let mut live_dir: Option<(String, OwnedFd)> = None;
        let mut copied = 0u64;
        for &(p, action) in actions {
            let (parent, name) = (path::parent(p), path::file_name(p));
            while stack.last().is_some_and(|(d, _)| d != parent) {
                stack.pop();
            }
            let here: &OwnedFd = match stack.last() {
                Some((_, fd)) => fd,
                None if parent.is_empty() => self.root,
                None => {
                    // A subtree's first entry: its parent was made before.
                    if opened.as_ref().is_none_or(|(d, _)| d != parent) {
                        let fd = fsutil::open_dir_beneath(self.root, parent).map_err(io_at(
                            tmp_path,
                            parent,
                            "cannot open",
                        ))?;
                        opened = Some((parent.to_string(), fd));
                    }
                    match &opened {
                        Some((_, fd)) => fd,
                        None => return Err(Error::Usage(format!("internal: {p} planned before its parent"))),
                    }
                }
            };
            let err = |what| io_at(tmp_path, p, what);
            let mut link_from_live = |ino: u64| -> Result<()> {
                let live =
                    self.live.ok_or_else(|| Error::Usage(format!("internal: {p} linked without a live tree")))?;
                if live_dir.as_ref().is_none_or(|(d, _)| d != parent) {
                    let fd = fsutil::open_dir_beneath(live, parent).map_err(io_at(live_path, parent, "cannot open"))?;
                    live_dir = Some((parent.to_string(), fd));
                }
                let Some((_, lfd)) = &live_dir else { return Ok(()) };
                match fsutil::link_at(lfd, name, here, name) {
                    Ok(()) => {
                        let st = fsutil::stat_at(here, name).map_err(err("cannot stat"))?;
                        if st.map(|s| s.ino) != Some(ino) {
                            return Err(Error::Raced { path: live_path.join(p) });
                        }
                        Ok(())
                    }
                    // fs.protected_hardlinks: another deployer's file we may not link.
                    Err(e) if e.raw_os_error() == Some(rustix::io::Errno::PERM.raw_os_error()) => {
                        let n = copy_entry(lfd, here, name, ino).map_err(err("cannot copy from the live tree"))?;
                        copied += n;
                        Ok(())
                    }
                    Err(e) => Err(err("cannot hardlink from the live tree")(e)),
                }
            };
            match action {
                Action::Dir { .. } => {
                    fsutil::mkdir_at(here, name).map_err(err("cannot create directory"))?;
                    let fd = fsutil::open_dir_beneath(here, name).map_err(err("cannot open directory"))?;
                    stack.push((p.to_string(), fd));
                }
                Action::Carry(e) if e.stat.kind == FsKind::Dir => {
                    fsutil::mkdir_at(here, name).map_err(err("cannot create directory"))?;
                    let fd = fsutil::open_dir_beneath(here, name).map_err(err("cannot open directory"))?;
                    stack.push((p.to_string(), fd));
                }
                Action::Link { ino } => link_from_live(*ino)?,
                Action::Carry(e) => link_from_live(e.stat.ino)?,
                Action::Symlink { target, mtime } => {
                    fsutil::symlink_at(target, here, name).map_err(err("cannot create symlink"))?;
                    fsutil::set_symlink_mtime_at(here, name, *mtime).map_err(err("cannot set mtime"))?;
                }
                Action::Write { .. } => {}
            }
        }
        Ok(copied)
    }
}

/// Copy the unchanged live entry `name` (inode `ino`) into `to` as a new inode with the same
/// content, mode and mtime — for when the kernel refuses to hardlink it. Returns the bytes.
fn copy_entry(from: &OwnedFd, to: &OwnedFd, name: &str, ino: u64) -> std::io::Result<u64> {
    let st = fsutil::stat_at(from, name)?.ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
    if st.ino != ino {
        return Err(std::io::Error::other("the live entry changed while being read"));
    }
    if st.kind == FsKind::Symlink {
        fsutil::symlink_at(&fsutil::read_link_at(from, name)?, to, name)?;
        fsutil::set_symlink_mtime_at(to, name, st.mtime)?;
        return Ok(0);
    }
    let mut src = fsutil::open_file_at(from, name)?;
    if fsutil::stat_fd(&src)?.ino != ino {
        return Err(std::io::Error::other("the live entry changed while being read"));
    }
    let mut dst = fsutil::create_file_at(to, name, 0o600)?;
    let n = std::io::copy(&mut src, &mut dst)?;
    fsutil::chmod_fd(&dst, st.mode & 0o777)?;
    fsutil::set_mtime_fd(&dst, st.mtime)?;
    Ok(n)
}
