//! Walking a source tree: every entry below a root, in a deterministic order (names sorted
//! bytewise, each directory followed by its contents), with the `lstat` facts the cache
//! keys on. Symlinks are never followed; they are checked against the spec's policy
//! using the listing itself, so the check cannot be fooled by the file system changing
//! under us between check and use.

use crate::spec::SymlinkPolicy;
use rayon::prelude::*;
use std::collections::{HashMap, VecDeque};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

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

impl Stat {
    fn of(m: &fs::Metadata) -> Stat {
        Stat {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec()),
            ctime_ns: m.ctime().saturating_mul(1_000_000_000).saturating_add(m.ctime_nsec()),
            mode: m.mode(),
        }
    }
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
    match fs::metadata(root) {
        Ok(m) if m.is_dir() => {}
        _ => return Err(WalkError::MissingRoot { path: root.to_path_buf() }),
    }
    let entries = walk_dir(root, "", excludes)?;
    if policy == SymlinkPolicy::Inside {
        check_symlinks(root, &entries)?;
    }
    Ok(entries)
}

fn walk_dir(abs: &Path, rel: &str, excludes: &Excludes) -> Result<Vec<Entry>, WalkError> {
    let io = |source| WalkError::Io { path: abs.to_path_buf(), source };
    // lstat through the directory (fstatat), sequentially; only subdirectories fan out.
    let mut children: Vec<(String, fs::Metadata)> = Vec::new();
    for de in fs::read_dir(abs).map_err(io)? {
        let de = de.map_err(io)?;
        let name = de.file_name();
        let Some(name) = name.to_str() else {
            return Err(WalkError::NotUtf8 { path: abs.join(de.file_name()) });
        };
        let child_rel = if rel.is_empty() { name.to_string() } else { format!("{rel}/{name}") };
        if excludes.matches(&child_rel) {
            continue;
        }
        let m = de.metadata().map_err(|source| WalkError::Io { path: de.path(), source })?;
        children.push((name.to_string(), m));
    }
    children.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let subtrees: Vec<Result<Vec<Entry>, WalkError>> = children
        .par_iter()
        .map(|(name, m)| {
            if !m.is_dir() {
                return Ok(Vec::new());
            }
            let child_rel = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
            walk_dir(&abs.join(name), &child_rel, excludes)
        })
        .collect();
    let mut out = Vec::with_capacity(children.len());
    for ((name, m), sub) in children.into_iter().zip(subtrees) {
        let child_rel = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
        let ft = m.file_type();
        let stat = Stat::of(&m);
        if ft.is_dir() {
            out.push(Entry { rel: child_rel, kind: Kind::Dir, stat });
            out.extend(sub?);
        } else if ft.is_file() {
            out.push(Entry { rel: child_rel, kind: Kind::File { size: m.len(), exec: m.mode() & 0o111 != 0 }, stat });
        } else if ft.is_symlink() {
            let path = abs.join(&name);
            let t = fs::read_link(&path).map_err(|source| WalkError::Io { path: path.clone(), source })?;
            let Some(target) = t.to_str() else { return Err(WalkError::NotUtf8 { path }) };
            out.push(Entry { rel: child_rel, kind: Kind::Symlink { target: target.to_string() }, stat });
        } else {
            let kind = if ft.is_fifo() {
                "FIFO"
            } else if ft.is_socket() {
                "socket"
            } else if ft.is_block_device() {
                "block device"
            } else {
                "character device"
            };
            return Err(WalkError::Special { path: abs.join(&name), kind });
        }
    }
    Ok(out)
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
