//! Walking a source tree: every entry below a root, in a deterministic order (names sorted
//! bytewise, each directory followed by its contents), with the `lstat` facts the cache
//! keys on. Symlinks are never followed; they are checked against the spec's policy
//! using the listing itself, so the check cannot be fooled by the file system changing
//! under us between check and use.

use crate::spec::SymlinkPolicy;
use rayon::prelude::*;
use rustix::fd::OwnedFd;
use rustix::fs::{AtFlags, Mode, OFlags, StatxFlags};
use sha2::Digest as _;
use std::collections::{HashMap, VecDeque};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Most symlinks followed while resolving one link before it counts as a loop (Linux's
/// own limit).
const MAX_SYMLINK_HOPS: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("source directory {path} does not exist or is not a directory; check the spec's `source`")]
    MissingRoot { path: PathBuf },
    #[error("cannot read {path}; check its permissions")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: file name is not valid UTF-8; rename it")]
    NotUtf8 { path: PathBuf },
    #[error("{path} is a {kind}; only files, directories and symlinks can go into an image: remove it or exclude it in layers.exclude")]
    Special { path: PathBuf, kind: &'static str },
    #[error("symlink {path} -> {target}: {why}; fix the link, exclude it, or set ownership.symlinks = \"any\"")]
    Symlink { path: PathBuf, target: String, why: String },
}

/// The `lstat` facts a cache entry is keyed on. `ctime` and the inode make a stale
/// match very unlikely: nothing but the kernel sets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Stat {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File { size: u64, exec: bool },
    Symlink { target: String },
}

#[derive(Debug, Clone)]
pub struct Entry {
    /// Path relative to the walked root, '/'-separated, never empty.
    pub rel: String,
    pub kind: Kind,
    pub stat: Stat,
}

/// Exclusion patterns (see `mwbuild explain layers.exclude`).
#[derive(Debug, Clone, Default)]
pub struct Excludes {
    anywhere: Vec<String>,
    anchored: Vec<Vec<String>>,
}

impl Excludes {
    pub fn new(patterns: &[String]) -> Self {
        let mut e = Excludes::default();
        for p in patterns {
            if p.contains('/') {
                e.anchored.push(p.split('/').map(str::to_string).collect());
            } else {
                e.anywhere.push(p.clone());
            }
        }
        e
    }

    /// Whether `rel` (components so far) is excluded.
    pub fn matches(&self, rel: &str) -> bool {
        let comps: Vec<&str> = rel.split('/').collect();
        let Some(last) = comps.last() else { return false };
        if self.anywhere.iter().any(|p| glob(p, last)) {
            return true;
        }
        self.anchored.iter().any(|pat| pat.len() == comps.len() && pat.iter().zip(&comps).all(|(p, c)| glob(p, c)))
    }
}

/// `*` and `?` within one name.
fn glob(pat: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pat.as_bytes(), name.as_bytes())
}

/// List every entry under `root` (not the root itself) in build order.
pub fn walk(root: &Path, excludes: &Excludes, policy: SymlinkPolicy) -> Result<Vec<Entry>, WalkError> {
    walk_with(root, excludes, policy, None).map(|(entries, _)| entries)
}

/// Like [`walk`], reusing the directory listings of an earlier walk of the same tree
/// (`prev`) where a directory's own lstat proves its listing unchanged. Every entry is
/// still `lstat`ed; only `open`/`getdents`/`close` of unchanged directories are saved.
/// Returns the entries and, when it differs from `prev`, the snapshot to keep for the
/// next walk.
pub fn walk_with(
    root: &Path,
    excludes: &Excludes,
    policy: SymlinkPolicy,
    prev: Option<&Snapshot>,
) -> Result<(Vec<Entry>, Option<Snapshot>), WalkError> {
    walk_trusting(root, excludes, policy, prev, now_ns() - crate::cache::RACY_NS)
}

/// [`walk_with`], keeping only listings of directories last changed before `trust_before_ns`.
fn walk_trusting(
    root: &Path,
    excludes: &Excludes,
    policy: SymlinkPolicy,
    prev: Option<&Snapshot>,
    trust_before_ns: i64,
) -> Result<(Vec<Entry>, Option<Snapshot>), WalkError> {
    let missing = || WalkError::MissingRoot { path: root.to_path_buf() };
    let fd = rustix::fs::open(root, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|_| missing())?;
    let root_stat = match stat_at(&fd, "") {
        Ok((st, FileKind::Dir)) => st,
        _ => return Err(missing()),
    };
    let cx = Walker { root, fd, excludes, prev, read_disk: AtomicBool::new(false) };
    let entries = cx.dir("", &root_stat)?;
    if policy == SymlinkPolicy::Inside {
        check_symlinks(root, &entries)?;
    }
    // Everything came from the old snapshot: it still describes the tree.
    let next = match prev {
        Some(_) if !cx.read_disk.load(Ordering::Relaxed) => None,
        _ => Some(Snapshot::of(&root_stat, &entries, trust_before_ns)),
    };
    Ok((entries, next))
}

fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Dir,
    File,
    Symlink,
    Special(&'static str),
}

fn stat_at(fd: &OwnedFd, rel: &str) -> std::io::Result<(Stat, FileKind)> {
    let flags = if rel.is_empty() { AtFlags::EMPTY_PATH } else { AtFlags::SYMLINK_NOFOLLOW };
    let x = rustix::fs::statx(fd, rel, flags, StatxFlags::BASIC_STATS)?;
    let ns = |t: rustix::fs::StatxTimestamp| (t.tv_sec).saturating_mul(1_000_000_000).saturating_add(t.tv_nsec as i64);
    let mode = u32::from(x.stx_mode);
    let st = Stat {
        dev: rustix::fs::makedev(x.stx_dev_major, x.stx_dev_minor),
        ino: x.stx_ino,
        size: x.stx_size,
        mtime_ns: ns(x.stx_mtime),
        ctime_ns: ns(x.stx_ctime),
        mode,
    };
    let kind = match mode & libc::S_IFMT {
        libc::S_IFDIR => FileKind::Dir,
        libc::S_IFREG => FileKind::File,
        libc::S_IFLNK => FileKind::Symlink,
        libc::S_IFIFO => FileKind::Special("FIFO"),
        libc::S_IFSOCK => FileKind::Special("socket"),
        libc::S_IFBLK => FileKind::Special("block device"),
        _ => FileKind::Special("character device"),
    };
    Ok((st, kind))
}

struct Walker<'a> {
    root: &'a Path,
    fd: OwnedFd,
    excludes: &'a Excludes,
    prev: Option<&'a Snapshot>,
    /// Whether a listing or a link target was read from the disk (the snapshot changes).
    read_disk: AtomicBool,
}

fn join(rel: &str, name: &str) -> String {
    if rel.is_empty() {
        name.to_string()
    } else {
        let mut s = String::with_capacity(rel.len() + 1 + name.len());
        s.push_str(rel);
        s.push('/');
        s.push_str(name);
        s
    }
}

impl Walker<'_> {
    fn io_err(&self, rel: &str) -> impl Fn(std::io::Error) -> WalkError + '_ {
        let path = self.root.join(rel);
        move |source| WalkError::Io { path: path.clone(), source }
    }

    /// The sorted, filtered names in directory `rel`, read from the disk.
    fn list(&self, rel: &str) -> Result<Vec<String>, WalkError> {
        let at = if rel.is_empty() { "." } else { rel };
        let io = |e: rustix::io::Errno| WalkError::Io { path: self.root.join(rel), source: e.into() };
        let dfd = rustix::fs::openat(
            &self.fd,
            at,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io)?;
        let mut names = Vec::new();
        for de in rustix::fs::Dir::new(dfd).map_err(io)? {
            let de = de.map_err(io)?;
            let name = de.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let Ok(name) = std::str::from_utf8(name) else {
                return Err(WalkError::NotUtf8 { path: self.root.join(rel).join(std::ffi::OsStr::from_bytes(name)) });
            };
            if self.excludes.matches(&join(rel, name)) {
                continue;
            }
            names.push(name.to_string());
        }
        names.sort_unstable();
        Ok(names)
    }

    fn dir(&self, rel: &str, st: &Stat) -> Result<Vec<Entry>, WalkError> {
        let cached = self.prev.and_then(|p| p.dirs.get(rel)).filter(|d| d.stat == *st);
        match cached {
            Some(d) => match self.children(rel, d.names(), true)? {
                Some(children) => self.descend(children),
                // The listing changed under an unchanged stat (a concurrent change): relist.
                None => self.dir_fresh(rel),
            },
            None => self.dir_fresh(rel),
        }
    }

    fn dir_fresh(&self, rel: &str) -> Result<Vec<Entry>, WalkError> {
        self.read_disk.store(true, Ordering::Relaxed);
        let names = self.list(rel)?;
        match self.children(rel, names.iter().map(String::as_str), false)? {
            Some(children) => self.descend(children),
            None => Err(WalkError::Io {
                path: self.root.join(rel),
                source: std::io::Error::other("the directory changed while it was read; run the build again"),
            }),
        }
    }

    /// lstat every name; `None` when a cached name no longer exists.
    #[allow(clippy::type_complexity)]
    fn children<'n>(
        &self,
        rel: &str,
        names: impl Iterator<Item = &'n str>,
        from_cache: bool,
    ) -> Result<Option<Vec<(String, Stat, FileKind)>>, WalkError> {
        let mut out = Vec::new();
        // One lookup per name through the directory's own descriptor, not a path walk from
        // the root for every entry.
        let dfd = if rel.is_empty() {
            None
        } else {
            match rustix::fs::openat(
                &self.fd,
                rel,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => Some(fd),
                Err(e) if from_cache && e == rustix::io::Errno::NOENT => return Ok(None),
                Err(e) => return Err(WalkError::Io { path: self.root.join(rel), source: e.into() }),
            }
        };
        let at = dfd.as_ref().unwrap_or(&self.fd);
        for name in names {
            let child = join(rel, name);
            match stat_at(at, name) {
                Ok((st, kind)) => out.push((child, st, kind)),
                Err(e) if from_cache && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(source) => return Err(WalkError::Io { path: self.root.join(&child), source }),
            }
        }
        Ok(Some(out))
    }

    fn descend(&self, children: Vec<(String, Stat, FileKind)>) -> Result<Vec<Entry>, WalkError> {
        // Subdirectories fan out over the pool.
        let subtrees: Vec<Result<Vec<Entry>, WalkError>> = children
            .par_iter()
            .map(|(child, cst, kind)| if *kind == FileKind::Dir { self.dir(child, cst) } else { Ok(Vec::new()) })
            .collect();
        let mut out = Vec::with_capacity(children.len());
        for ((child, cst, kind), sub) in children.into_iter().zip(subtrees) {
            match kind {
                FileKind::Dir => {
                    let v = sub?;
                    out.push(Entry { rel: child, kind: Kind::Dir, stat: cst });
                    out.extend(v);
                }
                FileKind::File => {
                    let exec = cst.mode & 0o111 != 0;
                    out.push(Entry { kind: Kind::File { size: cst.size, exec }, rel: child, stat: cst });
                }
                FileKind::Symlink => {
                    // A symlink's target cannot change without a new inode or ctime.
                    let known = self.prev.and_then(|p| p.links.get(&child)).filter(|l| l.stat == cst);
                    let target = match known {
                        Some(l) => l.target.clone(),
                        None => {
                            self.read_disk.store(true, Ordering::Relaxed);
                            let t = rustix::fs::readlinkat(&self.fd, child.as_str(), Vec::new())
                                .map_err(|e| (self.io_err(&child))(e.into()))?;
                            match t.into_string() {
                                Ok(t) => t,
                                Err(_) => return Err(WalkError::NotUtf8 { path: self.root.join(&child) }),
                            }
                        }
                    };
                    out.push(Entry { rel: child, kind: Kind::Symlink { target }, stat: cst });
                }
                FileKind::Special(kind) => return Err(WalkError::Special { path: self.root.join(&child), kind }),
            }
        }
        Ok(out)
    }
}

/// What a walk keeps for the next walk of the same tree: each directory's lstat and
/// sorted, filtered listing, and each symlink's target.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub dirs: HashMap<String, DirListing>,
    pub links: HashMap<String, LinkTarget>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirListing {
    pub stat: Stat,
    /// The names, sorted and filtered, joined with '/' (which no name contains).
    joined: String,
}

impl DirListing {
    fn names(&self) -> impl Iterator<Item = &str> {
        self.joined.split('/').filter(|n| !n.is_empty())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkTarget {
    pub stat: Stat,
    pub target: String,
}

const SNAPSHOT_MAGIC: &[u8] = b"mwbuild-walk-snapshot-2\n";

impl Snapshot {
    /// The snapshot of a finished walk. Listings of directories changed after
    /// `trust_before_ns` are left out: a change within the file system's timestamp
    /// granularity would not show in their mtime.
    fn of(root: &Stat, entries: &[Entry], trust_before_ns: i64) -> Snapshot {
        let trusted = |st: &Stat| st.mtime_ns < trust_before_ns && st.ctime_ns < trust_before_ns;
        let mut s = Snapshot::default();
        let mut dirs: HashMap<&str, (Stat, String)> = HashMap::new();
        dirs.insert("", (*root, String::new()));
        for e in entries {
            match &e.kind {
                Kind::Dir => {
                    dirs.insert(e.rel.as_str(), (e.stat, String::new()));
                }
                Kind::Symlink { target } => {
                    s.links.insert(e.rel.clone(), LinkTarget { stat: e.stat, target: target.clone() });
                }
                Kind::File { .. } => {}
            }
            let (parent, name) = e.rel.rsplit_once('/').unwrap_or(("", e.rel.as_str()));
            if let Some((_, joined)) = dirs.get_mut(parent) {
                if !joined.is_empty() {
                    joined.push('/');
                }
                joined.push_str(name);
            }
        }
        for (rel, (stat, joined)) in dirs {
            if trusted(&stat) {
                s.dirs.insert(rel.to_string(), DirListing { stat, joined });
            }
        }
        s
    }

    /// A compact binary encoding, sealed with a sha256 (the file is read on every build,
    /// so JSON would cost more than the walk it saves).
    pub fn encode(&self) -> Vec<u8> {
        fn put_str(b: &mut Vec<u8>, s: &str) {
            b.extend_from_slice(&(s.len() as u32).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        }
        fn put_stat(b: &mut Vec<u8>, st: &Stat) {
            for v in [st.dev, st.ino, st.size, st.mtime_ns as u64, st.ctime_ns as u64, u64::from(st.mode)] {
                b.extend_from_slice(&v.to_le_bytes());
            }
        }
        let mut body = Vec::new();
        let mut dirs: Vec<_> = self.dirs.iter().collect();
        dirs.sort_unstable_by(|a, b| a.0.cmp(b.0));
        body.extend_from_slice(&(dirs.len() as u32).to_le_bytes());
        for (rel, d) in dirs {
            put_str(&mut body, rel);
            put_stat(&mut body, &d.stat);
            put_str(&mut body, &d.joined);
        }
        let mut links: Vec<_> = self.links.iter().collect();
        links.sort_unstable_by(|a, b| a.0.cmp(b.0));
        body.extend_from_slice(&(links.len() as u32).to_le_bytes());
        for (rel, l) in links {
            put_str(&mut body, rel);
            put_stat(&mut body, &l.stat);
            put_str(&mut body, &l.target);
        }
        let mut out = SNAPSHOT_MAGIC.to_vec();
        out.extend_from_slice(&sha2::Sha256::digest(&body));
        out.extend_from_slice(&body);
        out
    }

    /// `None` for anything but an intact snapshot.
    pub fn decode(bytes: &[u8]) -> Option<Snapshot> {
        struct R<'a>(&'a [u8]);
        impl<'a> R<'a> {
            fn take(&mut self, n: usize) -> Option<&'a [u8]> {
                if self.0.len() < n {
                    return None;
                }
                let (a, b) = self.0.split_at(n);
                self.0 = b;
                Some(a)
            }
            fn u32(&mut self) -> Option<u32> {
                Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
            }
            fn u64(&mut self) -> Option<u64> {
                Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
            }
            fn str(&mut self) -> Option<String> {
                let n = self.u32()? as usize;
                String::from_utf8(self.take(n)?.to_vec()).ok()
            }
            fn stat(&mut self) -> Option<Stat> {
                Some(Stat {
                    dev: self.u64()?,
                    ino: self.u64()?,
                    size: self.u64()?,
                    mtime_ns: self.u64()? as i64,
                    ctime_ns: self.u64()? as i64,
                    mode: u32::try_from(self.u64()?).ok()?,
                })
            }
        }
        let rest = bytes.strip_prefix(SNAPSHOT_MAGIC)?;
        if rest.len() < 32 || sha2::Sha256::digest(&rest[32..]).as_slice() != &rest[..32] {
            return None;
        }
        let mut r = R(&rest[32..]);
        let mut s = Snapshot::default();
        for _ in 0..r.u32()? {
            let rel = r.str()?;
            let stat = r.stat()?;
            let joined = r.str()?;
            s.dirs.insert(rel, DirListing { stat, joined });
        }
        for _ in 0..r.u32()? {
            let rel = r.str()?;
            let stat = r.stat()?;
            let target = r.str()?;
            s.links.insert(rel, LinkTarget { stat, target });
        }
        r.0.is_empty().then_some(s)
    }
}

/// Refuse symlinks that are absolute, leave the tree (also through other symlinks), or
/// loop. Dangling targets inside the tree are allowed.
fn check_symlinks(root: &Path, entries: &[Entry]) -> Result<(), WalkError> {
    let links: HashMap<&str, &str> = entries
        .iter()
        .filter_map(|e| match &e.kind {
            Kind::Symlink { target } => Some((e.rel.as_str(), target.as_str())),
            _ => None,
        })
        .collect();
    for (rel, target) in &links {
        if let Err(why) = resolve_inside(rel, &links) {
            return Err(WalkError::Symlink { path: root.join(rel), target: target.to_string(), why });
        }
    }
    Ok(())
}

fn resolve_inside(link: &str, links: &HashMap<&str, &str>) -> Result<(), String> {
    let mut at: Vec<String> = link.split('/').map(str::to_string).collect();
    at.pop();
    let mut todo: VecDeque<String> = VecDeque::new();
    let first = links.get(link).copied().unwrap_or_default();
    push_target(&mut todo, first, link)?;
    let mut hops = 1usize;
    while let Some(c) = todo.pop_front() {
        match c.as_str() {
            "" | "." => {}
            ".." => {
                if at.pop().is_none() {
                    return Err("its target leaves the tree".to_string());
                }
            }
            name => {
                at.push(name.to_string());
                let here = at.join("/");
                if let Some(t) = links.get(here.as_str()) {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(format!("more than {MAX_SYMLINK_HOPS} links followed (a loop)"));
                    }
                    at.pop();
                    push_target(&mut todo, t, &here)?;
                }
            }
        }
    }
    Ok(())
}

fn push_target(todo: &mut VecDeque<String>, target: &str, via: &str) -> Result<(), String> {
    if target.starts_with('/') {
        return Err(format!("absolute target (via {via})"));
    }
    if target.is_empty() {
        return Err("empty target".to_string());
    }
    for c in target.split('/').rev() {
        todo.push_front(c.to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    #[test]
    fn globs_and_excludes() {
        assert!(glob("*.cdb", "en.cdb"));
        assert!(!glob("*.cdb", "en.cdb.x"));
        assert!(glob("a?c", "abc"));
        let e = Excludes::new(&[".git".into(), "cache/l10n/upstream".into()]);
        assert!(e.matches(".git"));
        assert!(e.matches("extensions/Foo/.git"));
        assert!(e.matches("cache/l10n/upstream"));
        assert!(!e.matches("x/cache/l10n/upstream"));
        assert!(!e.matches("cache/l10n"));
    }

    fn links(pairs: &[(&'static str, &'static str)]) -> HashMap<&'static str, &'static str> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn symlink_resolution() {
        let l =
            links(&[("a/b/c/up", "../.."), ("a/b/escape", "c/up/../.."), ("ok", "a/b/c/up/x"), ("abs", "/etc/passwd")]);
        assert!(resolve_inside("ok", &l).is_ok());
        assert!(resolve_inside("a/b/c/up", &l).is_ok());
        assert!(resolve_inside("a/b/escape", &l).expect_err("refused").contains("leaves"));
        assert!(resolve_inside("abs", &l).expect_err("refused").contains("absolute"));
        let l = links(&[("x", "y"), ("y", "x")]);
        assert!(resolve_inside("x", &l).expect_err("refused").contains("loop"));
        let l = links(&[("skins/common", "../resources/common"), ("d", "skins/common/../../..")]);
        assert!(resolve_inside("skins/common", &l).is_ok());
        assert!(resolve_inside("d", &l).expect_err("refused").contains("leaves"));
    }

    fn facts(e: &[Entry]) -> Vec<(String, Kind, Stat)> {
        e.iter().map(|e| (e.rel.clone(), e.kind.clone(), e.stat)).collect()
    }

    /// A walk that reuses listings must see exactly what a fresh walk sees, whatever
    /// changed in between.
    #[test]
    fn snapshot_walk_equals_fresh_walk() -> Result<(), Box<dyn std::error::Error>> {
        let t = tempfile::tempdir()?;
        let r = t.path();
        fs::create_dir_all(r.join("a/b/c"))?;
        fs::create_dir_all(r.join("d/.git"))?;
        for f in ["a/1", "a/b/2", "a/b/c/3", "d/4", "d/.git/x", "top"] {
            fs::write(r.join(f), f)?;
        }
        symlink("b/2", r.join("a/l"))?;
        let ex = Excludes::new(&[".git".into()]);
        let trust_all = i64::MAX;
        let (first, snap) = walk_trusting(r, &ex, SymlinkPolicy::Inside, None, trust_all)?;
        let mut snap = snap.ok_or("a first walk makes a snapshot")?;
        assert_eq!(Snapshot::decode(&snap.encode()).as_ref(), Some(&snap));
        // Nothing changed: no listing is read and no new snapshot is made.
        let (again, next) = walk_trusting(r, &ex, SymlinkPolicy::Inside, Some(&snap), trust_all)?;
        assert_eq!(facts(&again), facts(&first));
        assert!(next.is_none());
        type Step = Box<dyn Fn(&Path) -> std::io::Result<()>>;
        let steps: Vec<Step> = vec![
            Box::new(|r| fs::write(r.join("a/b/new"), b"n")),
            Box::new(|r| fs::remove_file(r.join("a/b/c/3"))),
            Box::new(|r| fs::write(r.join("a/1"), b"changed content")),
            Box::new(|r| fs::remove_file(r.join("top")).and_then(|()| fs::create_dir(r.join("top")))),
            Box::new(|r| fs::write(r.join("top/inside"), b"i")),
            Box::new(|r| fs::remove_file(r.join("a/l")).and_then(|()| symlink("1", r.join("a/l")))),
            Box::new(|r| fs::rename(r.join("a/b/c"), r.join("d/c"))),
            Box::new(|r| fs::remove_dir_all(r.join("a/b"))),
        ];
        for (i, step) in steps.iter().enumerate() {
            step(r)?;
            let fresh = walk(r, &ex, SymlinkPolicy::Inside)?;
            let (cached, next) = walk_trusting(r, &ex, SymlinkPolicy::Inside, Some(&snap), trust_all)?;
            assert_eq!(facts(&cached), facts(&fresh), "after step {i}");
            snap = next.unwrap_or(snap);
        }
        // A stale listing under an unchanged stat (a change racing the walk) is noticed.
        let (_, s) = walk_trusting(r, &ex, SymlinkPolicy::Inside, None, trust_all)?;
        let mut stale = s.ok_or("snapshot")?;
        if let Some(d) = stale.dirs.get_mut("d") {
            d.joined.push_str("/gone");
        }
        let (cached, _) = walk_trusting(r, &ex, SymlinkPolicy::Inside, Some(&stale), trust_all)?;
        assert_eq!(facts(&cached), facts(&walk(r, &ex, SymlinkPolicy::Inside)?));
        // Listings changed within the racy window are not kept.
        let (_, s) = walk_with(r, &ex, SymlinkPolicy::Inside, None)?;
        assert!(!s.ok_or("snapshot")?.dirs.contains_key("d"), "d was just changed");
        // A damaged snapshot is refused.
        let mut bytes = snap.encode();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(Snapshot::decode(&bytes).is_none());
        Ok(())
    }

    #[test]
    fn walk_orders_and_refuses() -> Result<(), Box<dyn std::error::Error>> {
        let t = tempfile::tempdir()?;
        let r = t.path();
        fs::create_dir_all(r.join("a/b"))?;
        fs::create_dir_all(r.join(".git"))?;
        fs::write(r.join("a-b"), b"x")?;
        fs::write(r.join("a/b/f"), b"x")?;
        fs::write(r.join(".git/HEAD"), b"x")?;
        symlink("b/f", r.join("a/l"))?;
        let e = walk(r, &Excludes::new(&[".git".into()]), SymlinkPolicy::Inside)?;
        let rels: Vec<_> = e.iter().map(|e| e.rel.as_str()).collect();
        assert_eq!(rels, ["a", "a/b", "a/b/f", "a/l", "a-b"]);
        symlink("x", r.join("loop1"))?;
        symlink("loop1", r.join("x"))?;
        let err = walk(r, &Excludes::default(), SymlinkPolicy::Inside).expect_err("loop");
        assert!(err.to_string().contains("loop"), "{err}");
        assert!(walk(r, &Excludes::default(), SymlinkPolicy::Any).is_ok());
        let err = walk(&r.join("missing"), &Excludes::default(), SymlinkPolicy::Any).expect_err("missing");
        assert!(err.to_string().contains("does not exist"), "{err}");
        Ok(())
    }
}
