//! The check behind a re-run's early stop: is the live tree still exactly what we recorded
//! after the last run?
//!
//! Every recorded entry is `statx`ed, never following a symlink, through a descriptor of
//! its directory (opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`), and
//! compared with the record: type, mode, `dev` and `ino` always; size, mtime and ctime for
//! everything but directories (so a content edit, a `chmod`, a replacement or a removal is
//! seen). Entries added behind our back are found through the directories: creating,
//! removing or renaming an entry inside a directory sets that directory's mtime and ctime
//! to the current time (and a restored mtime still moves the ctime), so a directory whose
//! times equal the record holds the names it held, and only directories whose times moved
//! (in a prepared tree, typically where scap writes its regions) are listed again and their
//! names compared with the record. Directories are checked in parallel; nothing is
//! allocated per entry.
//!
//! The answer is only ever used to skip work: any doubt (an error, a damaged record, an
//! entry the record has but the tree lacks) answers "changed", and the caller then plans
//! from a full scan.

use crate::fsutil::{self, FsKind, Stat};
use crate::path;
use crate::state::TreeState;
use rustix::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The direct children of each recorded directory, as indexes into the record.
struct Kids {
    start: Vec<u32>,
    children: Vec<u32>,
    name_at: Vec<u16>,
}

impl Kids {
    fn of(&self, d: usize) -> &[u32] {
        &self.children[self.start[d] as usize..self.start[d + 1] as usize]
    }
    /// The last component of entry `i`'s path.
    fn name<'t>(&self, ts: &'t TreeState, i: usize) -> &'t str {
        ts.entries[i].0.as_str().get(self.name_at[i] as usize..).unwrap_or_default()
    }
}

struct Walk<'a> {
    ts: &'a TreeState,
    kids: &'a Kids,
    /// Directories whose times moved: their names are compared afterwards.
    to_list: &'a Mutex<Vec<u32>>,
    /// Set at the first difference; everything still queued then stops.
    bad: &'a AtomicBool,
}

impl Walk<'_> {
    /// Check the children of directory `d` (open as `fd`), then its subdirectories as
    /// tasks of their own. A subdirectory is opened relative to its parent (one path
    /// component to resolve, not the whole path) when its task starts; its parent's
    /// descriptor is shared until then, so the open descriptors stay few.
    fn dir<'s>(&'s self, s: &rayon::Scope<'s>, d: usize, fd: Arc<std::io::Result<OwnedFd>>) {
        if self.bad.load(Ordering::Relaxed) {
            return;
        }
        let fail = || self.bad.store(true, Ordering::Relaxed);
        let Ok(dir) = &*fd else { return fail() };
        let e = &self.ts.entries;
        for &c in self.kids.of(d) {
            let r = &e[c as usize].1;
            let Ok(Some(now)) = fsutil::stat_at(dir, self.kids.name(self.ts, c as usize)) else { return fail() };
            if !same(&r.stat, &now) {
                return fail();
            }
            if r.stat.kind == FsKind::Dir && times_moved(&r.stat, &now) {
                match self.to_list.lock() {
                    Ok(mut v) => v.push(c),
                    Err(_) => return fail(),
                }
            }
        }
        for &c in self.kids.of(d) {
            let c = c as usize;
            if e[c].1.stat.kind != FsKind::Dir || self.kids.of(c).is_empty() {
                continue;
            }
            let parent = Arc::clone(&fd);
            s.spawn(move |s| {
                let sub = match &*parent {
                    Ok(p) => fsutil::open_dir_for_stat(p, self.kids.name(self.ts, c)),
                    Err(_) => return,
                };
                drop(parent);
                self.dir(s, c, Arc::new(sub));
            });
        }
    }
}

/// Whether the same entry, as far as a change of content, mode or identity goes.
fn same(was: &Stat, now: &Stat) -> bool {
    let times = was.kind == FsKind::Dir || (was.size == now.size && was.mtime == now.mtime && was.ctime == now.ctime);
    was.kind == now.kind && was.mode == now.mode && was.dev == now.dev && was.ino == now.ino && times
}

/// Whether a directory's own times moved (names may have been added or removed).
fn times_moved(was: &Stat, now: &Stat) -> bool {
    was.mtime != now.mtime || was.ctime != now.ctime
}

/// The tree below `root` holds exactly the entries of `ts` (entries for which `ignored`
/// holds aside, which the record must not contain), each with the recorded facts.
pub fn unchanged(root: &OwnedFd, ts: &TreeState, ignored: &(dyn Fn(&str) -> bool + Sync)) -> bool {
    let e = &ts.entries;
    let n = e.len();
    if n == 0 || !e[0].0.as_str().is_empty() || e[0].1.stat.kind != FsKind::Dir || u32::try_from(n).is_err() {
        return false;
    }
    // Each entry's parent: the record is in walk order, so the parent is on the stack of
    // directories still open.
    let mut parent = vec![0u32; n];
    // Where each entry's name starts in its path.
    let mut name_at = vec![0u16; n];
    let mut stack: Vec<u32> = vec![0];
    for (i, (k, r)) in e.iter().enumerate().skip(1) {
        let p = k.as_str();
        if ignored(p) {
            return false;
        }
        let cut = p.as_bytes().iter().rposition(|&b| b == b'/').map_or(0, |j| j + 1);
        let Ok(at) = u16::try_from(cut) else { return false };
        name_at[i] = at;
        let want = &p[..cut.saturating_sub(1)];
        while let Some(&top) = stack.last() {
            if e[top as usize].0.as_str() == want {
                break;
            }
            stack.pop();
        }
        let Some(&top) = stack.last() else { return false };
        parent[i] = top;
        if r.stat.kind == FsKind::Dir {
            stack.push(i as u32);
        }
    }
    // Children grouped by parent (in walk order within each group).
    let mut start = vec![0u32; n + 1];
    for &p in &parent[1..] {
        start[p as usize + 1] += 1;
    }
    for i in 0..n {
        start[i + 1] += start[i];
    }
    let mut fill = start.clone();
    let mut children = vec![0u32; n - 1];
    for (i, &p) in parent.iter().enumerate().skip(1) {
        children[fill[p as usize] as usize] = i as u32;
        fill[p as usize] += 1;
    }
    let kids = Kids { start, children, name_at };

    let Ok(now) = fsutil::stat_fd(root) else { return false };
    if !same(&e[0].1.stat, &now) {
        return false;
    }
    let to_list = Mutex::new(if times_moved(&e[0].1.stat, &now) { vec![0u32] } else { Vec::new() });
    let bad = AtomicBool::new(false);
    let cx = Walk { ts, kids: &kids, to_list: &to_list, bad: &bad };
    rayon::scope(|s| cx.dir(s, 0, Arc::new(root.try_clone())));
    if bad.load(Ordering::Relaxed) {
        return false;
    }
    let Ok(to_list) = to_list.into_inner() else { return false };
    to_list.into_iter().all(|d| {
        let d = d as usize;
        let dir = e[d].0.as_str();
        let Ok(listed) = fsutil::open_dir_beneath(root, dir).and_then(fsutil::list_dir) else { return false };
        // Both in the same order: names contain no '/'.
        let mut want = kids.of(d).iter().map(|&c| kids.name(ts, c as usize));
        listed.iter().filter(|(name, _)| !ignored(&path::join(dir, name))).all(|(name, _)| want.next() == Some(name))
            && want.next().is_none()
    })
}
