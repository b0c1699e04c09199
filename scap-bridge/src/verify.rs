//! `verify`: every difference between a directory tree and an image's subtree — missing
//! and extra entries, types, modes (as the mode policy derives them), symlink targets,
//! sizes and contents (every file is hashed; recorded state is not trusted here). Layers
//! are read and verified unless we verified them before; TOCs are not used.

use crate::engine::{build_view, index_layers, ImageOptions};
use crate::error::{Error, Result};
use crate::fsutil::{self, DiskEntry, FsKind};
use crate::path::{self, PathKey};
use crate::plan::{in_scap_region, Modes};
use crate::provenance::PROVENANCE_FILE;
use crate::source::Source;
use crate::state::StateDir;
use crate::view::{Node, NodeKind};
use rayon::prelude::*;
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::io::Read;
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub image: ImageOptions,
    pub dir: PathBuf,
    pub modes: Modes,
    /// Ignore scap's regions and the provenance file (a prepared staging tree).
    pub staging: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    Missing { path: String, what: &'static str },
    Extra { path: String, what: &'static str },
    Kind { path: String, image: &'static str, tree: &'static str },
    Mode { path: String, image: u32, tree: u32 },
    Content { path: String },
    Target { path: String, image: String, tree: String },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |p: &str| if p.is_empty() { ".".to_string() } else { p.to_string() };
        match self {
            Difference::Missing { path, what } => write!(f, "- {}: {what} missing from the tree", show(path)),
            Difference::Extra { path, what } => write!(f, "+ {}: {what} not in the image", show(path)),
            Difference::Kind { path, image, tree } => {
                write!(f, "T {}: {tree} in the tree, {image} in the image", show(path))
            }
            Difference::Mode { path, image, tree } => {
                write!(f, "M {}: mode {tree:04o} in the tree, {image:04o} expected", show(path))
            }
            Difference::Content { path } => write!(f, "C {}: content differs", show(path)),
            Difference::Target { path, image, tree } => {
                write!(f, "L {}: -> {tree:?} in the tree, -> {image:?} in the image", show(path))
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub differences: Vec<Difference>,
    pub checked: usize,
    pub layers_read: usize,
}

fn node_what(n: &Node) -> &'static str {
    match n.kind {
        NodeKind::Dir => "directory",
        NodeKind::File { .. } => "file",
        NodeKind::Symlink { .. } => "symlink",
    }
}

fn disk_what(e: &DiskEntry) -> &'static str {
    match e.stat.kind {
        FsKind::Dir => "directory",
        FsKind::File => "file",
        FsKind::Symlink => "symlink",
        FsKind::Other => "special file",
    }
}

pub fn verify(o: &VerifyOptions) -> Result<Report> {
    let state = StateDir::new(&o.image.state_dir);
    let src = Source::open(
        &o.image.image,
        &o.image.registry,
        &state.spool_dir().join(format!("verify-{}", std::process::id())),
    )?;
    let img = src.resolve(&o.image.platform)?;
    let indexed = index_layers(&src, &img, &o.image, &state, false)?;
    let view = build_view(&img, &indexed, &o.image)?;
    let root = fsutil::open_dir_path(&o.dir).map_err(Error::io(&o.dir, "cannot open"))?;
    let staging = o.staging;
    let ignored = move |p: &str| staging && (in_scap_region(p) || p == PROVENANCE_FILE);
    let tree = fsutil::scan_tree(&root, &ignored).map_err(Error::io(&o.dir, "cannot read"))?;
    let mut diffs = Vec::new();
    let mut to_hash: Vec<(&str, [u8; 32])> = Vec::new();
    let mut keys: Vec<&PathKey> = view.nodes.keys().chain(tree.keys()).collect();
    keys.sort();
    keys.dedup();
    for k in &keys {
        let p = k.as_str();
        if ignored(p) {
            continue;
        }
        match (view.nodes.get(*k), tree.get(*k)) {
            (Some(n), None) => diffs.push(Difference::Missing { path: p.to_string(), what: node_what(n) }),
            (None, Some(e)) => diffs.push(Difference::Extra { path: p.to_string(), what: disk_what(e) }),
            (Some(n), Some(e)) => {
                let (image, disk) = (node_what(n), disk_what(e));
                if image != disk {
                    diffs.push(Difference::Kind { path: p.to_string(), image, tree: disk });
                    continue;
                }
                match &n.kind {
                    NodeKind::Dir => {
                        // A setgid bit inherited from the parent (group ownership) is not a difference.
                        let (want, have) = (o.modes.dir(n.mode), e.stat.mode & !0o2000);
                        if want != have {
                            diffs.push(Difference::Mode { path: p.to_string(), image: want, tree: e.stat.mode });
                        }
                    }
                    NodeKind::File { size, sha256, .. } => {
                        let want = o.modes.file(n.mode);
                        if want != e.stat.mode {
                            diffs.push(Difference::Mode { path: p.to_string(), image: want, tree: e.stat.mode });
                        }
                        if *size != e.stat.size {
                            diffs.push(Difference::Content { path: p.to_string() });
                        } else {
                            to_hash.push((p, *sha256));
                        }
                    }
                    NodeKind::Symlink { target } => {
                        let have = e.target.clone().unwrap_or_default();
                        if &have != target {
                            diffs.push(Difference::Target { path: p.to_string(), image: target.clone(), tree: have });
                        }
                    }
                }
            }
            (None, None) => {}
        }
    }
    let differing: Vec<Difference> = to_hash
        .par_iter()
        .filter_map(|(p, want)| {
            let got = fsutil::open_dir_beneath(&root, path::parent(p))
                .and_then(|d| fsutil::open_file_at(&d, path::file_name(p)))
                .and_then(|mut f| {
                    let mut h = Sha256::new();
                    let mut buf = vec![0u8; 128 * 1024];
                    loop {
                        let n = f.read(&mut buf)?;
                        if n == 0 {
                            break;
                        }
                        h.update(&buf[..n]);
                    }
                    Ok(<[u8; 32]>::from(h.finalize()))
                });
            match got {
                Ok(h) if &h == want => None,
                _ => Some(Difference::Content { path: p.to_string() }),
            }
        })
        .collect();
    diffs.extend(differing);
    diffs.sort_by(|a, b| path::cmp(diff_path(a), diff_path(b)));
    Ok(Report { differences: diffs, checked: keys.len(), layers_read: indexed.layers_read })
}

fn diff_path(d: &Difference) -> &str {
    match d {
        Difference::Missing { path, .. }
        | Difference::Extra { path, .. }
        | Difference::Kind { path, .. }
        | Difference::Mode { path, .. }
        | Difference::Content { path }
        | Difference::Target { path, .. } => path,
    }
}

/// For callers that keep the tree listing (tests): the differences as text lines.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    for d in &r.differences {
        s.push_str(&d.to_string());
        s.push('\n');
    }
    s
}
