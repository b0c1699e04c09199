//! File-system operations relative to directory file descriptors. Nothing here resolves a
//! path string from the top: directories below a root are opened with `openat2` and
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`, files are created with
//! `O_CREAT | O_EXCL | O_NOFOLLOW`, times and modes are set through the opened descriptor
//! (or with `AT_SYMLINK_NOFOLLOW` for symlinks), and trees are removed by descriptor without
//! ever following a symlink. A concurrent writer can make an operation fail; it cannot make
//! one land outside the root.

use crate::path::PathKey;
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, StatxFlags, Timespec, Timestamps};
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::path::Path;

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS).union(ResolveFlags::NO_MAGICLINKS);

/// A timestamp in seconds and nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

impl Time {
    pub fn now() -> Time {
        let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Time { sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX), nsec: d.subsec_nanos() }
    }
    fn spec(self) -> Timespec {
        Timespec { tv_sec: self.sec, tv_nsec: i64::from(self.nsec) }
    }
    /// The mtime a changed file gets: `now`, or the second after `old` if that is later, so
    /// that the whole second always goes up (rsync's quick check compares seconds).
    pub fn bumped(now: Time, old: Option<Time>) -> Time {
        match old {
            Some(o) if now.sec <= o.sec => Time { sec: o.sec + 1, nsec: 0 },
            _ => now,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    Dir,
    File,
    Symlink,
    Other,
}

/// What `statx` says about an entry (never following a symlink).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub kind: FsKind,
    /// `st_mode & 0o7777`.
    pub mode: u32,
    pub size: u64,
    pub dev: (u32, u32),
    pub ino: u64,
    pub nlink: u32,
    pub mtime: Time,
    pub ctime: Time,
}

fn ts(t: rustix::fs::StatxTimestamp) -> Time {
    Time { sec: t.tv_sec, nsec: t.tv_nsec }
}

fn from_statx(s: &rustix::fs::Statx) -> Stat {
    let fmt = u32::from(s.stx_mode) & 0o170000;
    let kind = match fmt {
        0o040000 => FsKind::Dir,
        0o100000 => FsKind::File,
        0o120000 => FsKind::Symlink,
        _ => FsKind::Other,
    };
    Stat {
        kind,
        mode: u32::from(s.stx_mode) & 0o7777,
        size: s.stx_size,
        dev: (s.stx_dev_major, s.stx_dev_minor),
        ino: s.stx_ino,
        nlink: s.stx_nlink,
        mtime: ts(s.stx_mtime),
        ctime: ts(s.stx_ctime),
    }
}

const STATX_MASK: StatxFlags = StatxFlags::TYPE
    .union(StatxFlags::MODE)
    .union(StatxFlags::NLINK)
    .union(StatxFlags::INO)
    .union(StatxFlags::SIZE)
    .union(StatxFlags::MTIME)
    .union(StatxFlags::CTIME);

/// `statx(dirfd, name, AT_SYMLINK_NOFOLLOW)`; `None` if it does not exist.
pub fn stat_at(dir: impl AsFd, name: &str) -> io::Result<Option<Stat>> {
    match rustix::fs::statx(dir, name, AtFlags::SYMLINK_NOFOLLOW, STATX_MASK) {
        Ok(s) => Ok(Some(from_statx(&s))),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `fstat` of an open descriptor.
pub fn stat_fd(fd: impl AsFd) -> io::Result<Stat> {
    Ok(from_statx(&rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, STATX_MASK)?))
}

/// Open a directory given by the administrator (following symlinks in that path is their
/// choice); everything below it is then reached through descriptors.
pub fn open_dir_path(p: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(p, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?)
}

/// Open the directory `rel` below `root` (`""` is the root itself), never through a symlink
/// and never above `root`.
pub fn open_dir_beneath(root: impl AsFd, rel: &str) -> io::Result<OwnedFd> {
    let rel = if rel.is_empty() { "." } else { rel };
    Ok(rustix::fs::openat2(
        root,
        rel,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        RESOLVE,
    )?)
}

/// Like [`open_dir_beneath`], as an `O_PATH` descriptor: good for `statx` of the names in
/// it (cheaper to open), not for reading it.
pub fn open_dir_for_stat(root: impl AsFd, rel: &str) -> io::Result<OwnedFd> {
    let rel = if rel.is_empty() { "." } else { rel };
    Ok(rustix::fs::openat2(
        root,
        rel,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        RESOLVE,
    )?)
}

/// Open the regular file `name` in `dir` for reading, not following a symlink.
pub fn open_file_at(dir: impl AsFd, name: &str) -> io::Result<File> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )?;
    Ok(File::from(fd))
}

/// Create the new file `name` in `dir` (which must not exist) with `mode` (less the umask).
pub fn create_file_at(dir: impl AsFd, name: &str, mode: u32) -> io::Result<File> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode & 0o777),
    )?;
    Ok(File::from(fd))
}

pub fn mkdir_at(dir: impl AsFd, name: &str) -> io::Result<()> {
    Ok(rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700))?)
}

pub fn symlink_at(target: &str, dir: impl AsFd, name: &str) -> io::Result<()> {
    Ok(rustix::fs::symlinkat(target, dir, name)?)
}

/// Hardlink `from_dir/from` (a file or symlink; never followed) as `to_dir/to`.
pub fn link_at(from_dir: impl AsFd, from: &str, to_dir: impl AsFd, to: &str) -> io::Result<()> {
    Ok(rustix::fs::linkat(from_dir, from, to_dir, to, AtFlags::empty())?)
}

pub fn read_link_at(dir: impl AsFd, name: &str) -> io::Result<String> {
    let t = rustix::fs::readlinkat(dir, name, Vec::new())?;
    t.into_string().map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "symlink target is not UTF-8"))
}

/// Set the permission bits of an open file or directory.
pub fn chmod_fd(fd: impl AsFd, mode: u32) -> io::Result<()> {
    Ok(rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))?)
}

fn stamps(mtime: Time) -> Timestamps {
    Timestamps { last_access: Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_OMIT }, last_modification: mtime.spec() }
}

/// Set the mtime of an open file or directory (atime untouched).
pub fn set_mtime_fd(fd: impl AsFd, mtime: Time) -> io::Result<()> {
    Ok(rustix::fs::futimens(fd, &stamps(mtime))?)
}

/// Set the mtime of the symlink `name` in `dir` itself.
pub fn set_symlink_mtime_at(dir: impl AsFd, name: &str, mtime: Time) -> io::Result<()> {
    Ok(rustix::fs::utimensat(dir, name, &stamps(mtime), AtFlags::SYMLINK_NOFOLLOW)?)
}

pub fn unlink_at(dir: impl AsFd, name: &str) -> io::Result<()> {
    Ok(rustix::fs::unlinkat(dir, name, AtFlags::empty())?)
}

/// Remove `name` in `dir` and, if it is a directory, everything below it, without ever
/// following a symlink. Missing is not an error.
pub fn remove_tree_at(dir: impl AsFd, name: &str) -> io::Result<()> {
    let dir = dir.as_fd();
    let Some(st) = stat_at(dir, name)? else { return Ok(()) };
    if st.kind == FsKind::Dir {
        remove_dir_at(dir, name)
    } else {
        remove_entry(dir, name, false)
    }
}

/// Unlink a non-directory; with `may_be_dir` (the type hint was unknown), a directory.
fn remove_entry(dir: BorrowedFd<'_>, name: &str, may_be_dir: bool) -> io::Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(rustix::io::Errno::ISDIR | rustix::io::Errno::PERM) if may_be_dir => remove_dir_at(dir, name),
        Err(e) => Err(e.into()),
    }
}

fn remove_dir_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let errno = |e: &io::Error, n: rustix::io::Errno| e.raw_os_error() == Some(n.raw_os_error());
    let sub = match open_dir_beneath(dir, name) {
        Ok(fd) => fd,
        Err(e) if errno(&e, rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) if errno(&e, rustix::io::Errno::ACCESS) => {
            // Mode 0 and the like: make it ours again (never through a symlink).
            rustix::fs::chmodat(dir, name, Mode::from_raw_mode(0o700), AtFlags::SYMLINK_NOFOLLOW)?;
            open_dir_beneath(dir, name)?
        }
        Err(e) => return Err(e),
    };
    // Read-only directories (0555 in many images) cannot be emptied until they are ours.
    chmod_fd(&sub, 0o700)?;
    let entries = list_dir(&sub)?;
    for (child, ft) in entries {
        if ft == rustix::fs::FileType::Directory {
            remove_dir_at(sub.as_fd(), &child)?;
        } else {
            remove_entry(sub.as_fd(), &child, ft == rustix::fs::FileType::Unknown)?;
        }
    }
    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Names in a directory (without `.` and `..`), sorted by [`crate::path::cmp`], with the
/// `d_type` hint.
pub fn list_dir(dir: impl AsFd) -> io::Result<Vec<(String, rustix::fs::FileType)>> {
    read_names(&mut rustix::fs::Dir::read_from(dir)?)
}

fn read_names(d: &mut rustix::fs::Dir) -> io::Result<Vec<(String, rustix::fs::FileType)>> {
    let mut out = Vec::new();
    for e in d {
        let e = e?;
        let name = e.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        let name = String::from_utf8(name.to_vec())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a file name is not UTF-8"))?;
        out.push((name, e.file_type()));
    }
    out.sort_by(|a, b| crate::path::cmp(&a.0, &b.0));
    Ok(out)
}

/// One entry of a tree on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskEntry {
    pub stat: Stat,
    /// For symlinks.
    pub target: Option<String>,
}

/// Every entry below `root` (the root itself as `""`), never following symlinks.
/// Directories for which `skip` holds are recorded but not descended into. Subdirectories
/// are scanned in parallel (the scan is bound by `statx` and `getdents` calls).
pub fn scan_tree(root: &OwnedFd, skip: &(dyn Fn(&str) -> bool + Sync)) -> io::Result<BTreeMap<PathKey, DiskEntry>> {
    let mut out: BTreeMap<PathKey, DiskEntry> =
        scan_dir(root, String::new(), skip)?.into_iter().map(|(k, e)| (PathKey(k.into()), e)).collect();
    out.insert(PathKey::new(""), DiskEntry { stat: stat_fd(root)?, target: None });
    Ok(out)
}

fn scan_dir(root: &OwnedFd, rel: String, skip: &(dyn Fn(&str) -> bool + Sync)) -> io::Result<Vec<(String, DiskEntry)>> {
    use rayon::prelude::*;
    // Paths, not descriptors, are handed down: a directory with thousands of
    // subdirectories must not hold thousands of descriptors open.
    let mut dir = rustix::fs::Dir::new(open_dir_beneath(root, &rel)?)?;
    let names = read_names(&mut dir)?;
    let fd = dir.fd()?;
    let mut out = Vec::with_capacity(names.len());
    let mut subdirs = Vec::new();
    for (name, _) in names {
        let Some(stat) = stat_at(fd, &name)? else { continue };
        let p = crate::path::join(&rel, &name);
        let target = if stat.kind == FsKind::Symlink { Some(read_link_at(fd, &name)?) } else { None };
        if stat.kind == FsKind::Dir && !skip(&p) {
            subdirs.push(p.clone());
        }
        out.push((p, DiskEntry { stat, target }));
    }
    drop(dir);
    let below: Vec<Vec<(String, DiskEntry)>> =
        subdirs.into_par_iter().map(|d| scan_dir(root, d, skip)).collect::<io::Result<_>>()?;
    out.extend(below.into_iter().flatten());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bumped_always_raises_the_second() {
        let now = Time { sec: 100, nsec: 5 };
        assert_eq!(Time::bumped(now, None), now);
        assert_eq!(Time::bumped(now, Some(Time { sec: 99, nsec: 999 })), now);
        assert_eq!(Time::bumped(now, Some(Time { sec: 100, nsec: 1 })), Time { sec: 101, nsec: 0 });
        assert_eq!(Time::bumped(now, Some(Time { sec: 500, nsec: 0 })), Time { sec: 501, nsec: 0 });
    }

    #[test]
    fn beneath_refuses_symlinks_and_escapes() -> io::Result<()> {
        let t = tempfile::tempdir()?;
        std::fs::create_dir(t.path().join("d"))?;
        std::os::unix::fs::symlink("/", t.path().join("d/up"))?;
        std::os::unix::fs::symlink("..", t.path().join("d/dotdot"))?;
        let root = open_dir_path(t.path())?;
        assert!(open_dir_beneath(&root, "d").is_ok());
        assert!(open_dir_beneath(&root, "d/up").is_err());
        assert!(open_dir_beneath(&root, "d/dotdot").is_err());
        assert!(open_dir_beneath(&root, "..").is_err());
        let d = open_dir_beneath(&root, "d")?;
        assert!(create_file_at(&d, "up", 0o600).is_err(), "O_EXCL|O_NOFOLLOW must not open through a symlink");
        remove_tree_at(&root, "d")?;
        assert!(!t.path().join("d").exists());
        Ok(())
    }
}
