//! The final view of a subtree of an image: layer indexes applied in order, with OCI layer
//! semantics, in memory only.
//!
//! Per layer: its whiteouts and opaque markers are applied first, to what the lower layers
//! left (so they hide lower layers only, wherever they sit in the layer); then its entries
//! in stream order. A directory over a directory keeps the children; anything else over an
//! existing path replaces it and everything below. Missing parents are created (0755).
//! Refused: writing below a symlink or a file, hardlinks to what does not exist (yet), is
//! hidden, is not a regular file or lies outside the subtree, device nodes and FIFOs, and
//! (unless allowed) symlinks that leave the subtree once resolved through the final view,
//! loops and chains longer than 40 links.
//!
//! Only paths that matter are kept: the subtree's root, what is below it, and its
//! ancestors (which whiteouts or non-directories can remove).

use crate::error::{Error, Refusal, Result};
use crate::index::{EntryKind, LayerIndex, Sha};
use crate::path::{self, PathKey};
use oci_core::Digest;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::ops::Bound;

/// Where a file's content is: entry `seq` of layer `layer`, or (layer [`ContentRef::INLINE`])
/// content the engine supplies itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentRef {
    pub layer: u32,
    pub seq: u32,
}

impl ContentRef {
    pub const INLINE: u32 = u32::MAX;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    Dir,
    File { size: u64, sha256: Sha, src: ContentRef },
    Symlink { target: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: NodeKind,
    /// Permission bits as the image has them (`& 0o7777`).
    pub mode: u32,
    /// The layer that last wrote this node (for messages).
    pub layer: u32,
}

/// What to do with symlinks whose target leaves the subtree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SymlinkPolicy {
    /// Refuse targets that leave the subtree once resolved (and absolute targets).
    Inside,
    /// Keep every symlink as data (it is never followed while writing).
    Any,
}

const MAX_HOPS: usize = 40;
const IMPLICIT_DIR_MODE: u32 = 0o755;

pub struct ViewBuilder {
    scope: String,
    nodes: BTreeMap<PathKey, Node>,
    digests: Vec<Digest>,
}

/// The final tree, paths relative to the subtree root (`""` is the root).
#[derive(Debug, Clone, Default)]
pub struct View {
    pub nodes: BTreeMap<PathKey, Node>,
}

impl ViewBuilder {
    /// `scope`: the subtree's path in the image, normalised (`""` for the whole image).
    pub fn new(scope: &str) -> Self {
        let mut nodes = BTreeMap::new();
        nodes.insert(PathKey::new(""), Node { kind: NodeKind::Dir, mode: IMPLICIT_DIR_MODE, layer: 0 });
        ViewBuilder { scope: scope.to_string(), nodes, digests: Vec::new() }
    }

    fn relevant(&self, p: &str) -> bool {
        path::within(p, &self.scope) || path::within(&self.scope, p)
    }

    fn remove_below(&mut self, p: &str) {
        let lo = Bound::Excluded(PathKey::new(p));
        let hi = if p.is_empty() { Bound::Unbounded } else { Bound::Excluded(PathKey::descendants_end(p)) };
        let keys: Vec<PathKey> = self.nodes.range((lo, hi)).map(|(k, _)| k.clone()).collect();
        for k in keys {
            self.nodes.remove(&k);
        }
    }

    fn remove(&mut self, p: &str) {
        self.remove_below(p);
        if !p.is_empty() {
            self.nodes.remove(&PathKey::new(p));
        }
    }

    /// Apply layer number `layer` (its digest for messages).
    pub fn apply(&mut self, layer: usize, digest: &Digest, idx: &LayerIndex) -> Result<()> {
        let refuse = |entry: String, reason: Refusal| Error::Entry { layer, digest: digest.clone(), entry, reason };
        self.digests.push(digest.clone());
        let l = u32::try_from(layer).unwrap_or(u32::MAX - 1);
        let mut seen: HashSet<String> = HashSet::with_capacity(idx.entries.len());
        for e in &idx.entries {
            if !seen.insert(e.raw_name()) {
                return Err(refuse(e.raw_name(), Refusal::Duplicate));
            }
        }
        // Whiteouts and opaque markers hide lower layers only, wherever they are in the layer.
        for e in &idx.entries {
            match e.kind {
                EntryKind::Whiteout if self.relevant(&e.path) => self.remove(&e.path),
                EntryKind::Opaque if self.relevant(&e.path) => self.remove_below(&e.path),
                _ => {}
            }
        }
        let mut parent_ok: Option<String> = None;
        for (seq, e) in idx.entries.iter().enumerate() {
            if matches!(e.kind, EntryKind::Whiteout | EntryKind::Opaque) || !self.relevant(&e.path) {
                continue;
            }
            let p = e.path.as_str();
            let parent = path::parent(p);
            if !p.is_empty() && parent_ok.as_deref() != Some(parent) {
                self.ensure_parents(p).map_err(|r| refuse(e.raw_name(), r))?;
                parent_ok = Some(parent.to_string());
            }
            let kind = match &e.kind {
                EntryKind::Dir => NodeKind::Dir,
                EntryKind::File { size, sha256 } => NodeKind::File {
                    size: *size,
                    sha256: *sha256,
                    src: ContentRef { layer: l, seq: u32::try_from(seq).unwrap_or(u32::MAX) },
                },
                EntryKind::Symlink { target } => NodeKind::Symlink { target: target.clone() },
                EntryKind::Hardlink { target } => {
                    if !self.relevant(target) {
                        return Err(refuse(e.raw_name(), Refusal::HardlinkOutside(target.clone())));
                    }
                    match self.nodes.get(&PathKey::new(target)) {
                        Some(n @ Node { kind: NodeKind::File { .. }, .. }) => {
                            let n = n.clone();
                            self.put(p, n.kind, n.mode, l);
                            if parent_ok.as_deref().is_some_and(|q| path::within(q, p)) {
                                parent_ok = None;
                            }
                            continue;
                        }
                        Some(_) => return Err(refuse(e.raw_name(), Refusal::HardlinkNotFile(target.clone()))),
                        None => return Err(refuse(e.raw_name(), Refusal::HardlinkMissing(target.clone()))),
                    }
                }
                EntryKind::Special(what) => return Err(refuse(e.raw_name(), Refusal::Special(what))),
                EntryKind::Whiteout | EntryKind::Opaque => continue,
            };
            if !matches!(kind, NodeKind::Dir) && parent_ok.as_deref().is_some_and(|q| path::within(q, p)) {
                parent_ok = None;
            }
            self.put(p, kind, e.mode & 0o7777, l);
        }
        Ok(())
    }

    /// Every ancestor of `p` must be a directory; missing ones are created.
    fn ensure_parents(&mut self, p: &str) -> std::result::Result<(), Refusal> {
        let mut end = 0;
        let bytes = p.as_bytes();
        while let Some(i) = bytes[end..].iter().position(|&b| b == b'/') {
            let a = &p[..end + i];
            match self.nodes.get(&PathKey::new(a)) {
                Some(Node { kind: NodeKind::Dir, .. }) => {}
                Some(Node { kind: NodeKind::Symlink { .. }, .. }) => {
                    return Err(Refusal::ThroughSymlink(a.to_string()))
                }
                Some(_) => return Err(Refusal::ParentNotDir(a.to_string())),
                None => {
                    self.nodes.insert(PathKey::new(a), Node { kind: NodeKind::Dir, mode: IMPLICIT_DIR_MODE, layer: 0 });
                }
            }
            end += i + 1;
        }
        Ok(())
    }

    fn put(&mut self, p: &str, kind: NodeKind, mode: u32, layer: u32) {
        let key = PathKey::new(p);
        match self.nodes.get_mut(&key) {
            Some(existing) if existing.kind == NodeKind::Dir && kind == NodeKind::Dir => {
                existing.mode = mode;
                existing.layer = layer;
            }
            Some(_) => {
                self.remove_below(p);
                self.nodes.insert(key, Node { kind, mode, layer });
            }
            None => {
                self.nodes.insert(key, Node { kind, mode, layer });
            }
        }
    }

    /// The subtree, re-rooted, after checking symlinks per `policy`.
    pub fn finish(mut self, policy: SymlinkPolicy) -> Result<View> {
        let root = match self.nodes.get(&PathKey::new(&self.scope)) {
            Some(n) if n.kind == NodeKind::Dir => n.clone(),
            _ => return Err(Error::NoSubtree { path: self.scope.clone() }),
        };
        let mut nodes = BTreeMap::new();
        if self.scope.is_empty() {
            nodes = std::mem::take(&mut self.nodes);
        } else {
            let lo = Bound::Excluded(PathKey::new(&self.scope));
            let hi = Bound::Excluded(PathKey::descendants_end(&self.scope));
            let cut = self.scope.len() + 1;
            for (k, n) in std::mem::take(&mut self.nodes).range((lo, hi)) {
                nodes.insert(PathKey::new(&k.as_str()[cut..]), n.clone());
            }
            nodes.insert(PathKey::new(""), root);
        }
        let view = View { nodes };
        if policy == SymlinkPolicy::Inside {
            for (k, n) in &view.nodes {
                if let NodeKind::Symlink { target } = &n.kind {
                    if let Err(reason) = check_symlink(&view, k.as_str(), target) {
                        let layer = n.layer as usize;
                        return Err(Error::Entry {
                            layer,
                            digest: self.digests.get(layer).cloned().unwrap_or_else(|| Digest::of(b"")),
                            entry: path::join(&self.scope, k.as_str()),
                            reason,
                        });
                    }
                }
            }
        }
        Ok(view)
    }
}

/// Resolve `target` of the symlink at `link` through the view: refuse if it ever steps
/// above the root, is absolute, or takes more than [`MAX_HOPS`] links.
pub fn check_symlink(view: &View, link: &str, target: &str) -> std::result::Result<(), Refusal> {
    let escapes = || Refusal::SymlinkEscapes(target.to_string());
    if target.starts_with('/') {
        return Err(escapes());
    }
    let mut stack: Vec<String> = path::parent(link).split('/').filter(|c| !c.is_empty()).map(String::from).collect();
    let mut queue: VecDeque<String> = target.split('/').map(String::from).collect();
    let mut hops = 0;
    while let Some(c) = queue.pop_front() {
        match c.as_str() {
            "" | "." => {}
            ".." => {
                if stack.pop().is_none() {
                    return Err(escapes());
                }
            }
            _ => {
                stack.push(c);
                if let Some(Node { kind: NodeKind::Symlink { target: t }, .. }) =
                    view.nodes.get(&PathKey::new(&stack.join("/")))
                {
                    hops += 1;
                    if hops > MAX_HOPS {
                        return Err(Refusal::SymlinkLoop);
                    }
                    if t.starts_with('/') {
                        return Err(escapes());
                    }
                    stack.pop();
                    for part in t.split('/').rev() {
                        queue.push_front(part.to_string());
                    }
                }
            }
        }
    }
    Ok(())
}

impl View {
    pub fn get(&self, p: &str) -> Option<&Node> {
        self.nodes.get(&PathKey::new(p))
    }

    /// Count of (dirs, files, symlinks), the root not counted.
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for (k, n) in &self.nodes {
            match n.kind {
                NodeKind::Dir if !k.as_str().is_empty() => c.0 += 1,
                NodeKind::Dir => {}
                NodeKind::File { .. } => c.1 += 1,
                NodeKind::Symlink { .. } => c.2 += 1,
            }
        }
        c
    }
}

#[cfg(test)]
#[path = "view_tests.rs"]
mod tests;
