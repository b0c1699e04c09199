//! Shared helpers of the integration tests.
#![allow(dead_code)]

use scap_bridge::blob::Limits;
use scap_bridge::engine::{ApplyOptions, ImageOptions};
use scap_bridge::plan::{ModePolicy, Modes};
use scap_bridge::view::SymlinkPolicy;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

pub fn image_options(image: &str, subpath: &str, state: &Path, symlinks: SymlinkPolicy) -> ImageOptions {
    ImageOptions {
        image: image.parse().expect("image reference"),
        platform: "linux/amd64".into(),
        registry: oci_core::registry::ClientOptions::default(),
        state_dir: state.to_path_buf(),
        limits: Limits::default(),
        max_total_bytes: 1 << 40,
        symlinks,
        subpath: subpath.into(),
    }
}

/// `unpack IMAGE DIR` as the CLI would set it up.
pub fn unpack_options(image: &str, dir: &Path, state: &Path) -> ApplyOptions {
    ApplyOptions {
        image: image_options(image, "", state, SymlinkPolicy::Any),
        target: dir.to_path_buf(),
        modes: Modes { policy: ModePolicy::Image, umask: 0 },
        scap_regions: false,
        provenance: None,
        scap_lock: None,
        lock_wait: Duration::ZERO,
        changed_list: None,
    }
}

/// `prep IMAGE --version V` with everything in temporary places.
pub fn prep_options(image: &str, version: &str, staging: &Path, state: &Path) -> ApplyOptions {
    ApplyOptions {
        image: image_options(image, &format!("srv/mediawiki/php-{version}"), state, SymlinkPolicy::Inside),
        target: staging.join(format!("php-{version}")),
        modes: Modes { policy: ModePolicy::Umask, umask: 0o002 },
        scap_regions: true,
        provenance: Some(version.to_string()),
        scap_lock: Some(staging.join("scap.lock")),
        lock_wait: Duration::ZERO,
        changed_list: None,
    }
}

/// What a tree looks like to rsync and to our contract: per path, kind, mode, size,
/// content hash, link target, inode and mtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fact {
    pub kind: char,
    pub mode: u32,
    pub size: u64,
    pub sha: String,
    pub target: String,
    pub ino: u64,
    pub mtime: (i64, i64),
}

pub fn facts(root: &Path) -> R<BTreeMap<String, Fact>> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out)?;
    Ok(out)
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Fact>) -> R {
    let mut names: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<Vec<_>, _>>()?;
    names.sort_by_key(|e| e.file_name());
    let m = std::fs::symlink_metadata(dir)?;
    let rel = dir.strip_prefix(root)?.to_string_lossy().into_owned();
    out.insert(rel, fact_of(dir, &m)?);
    for e in names {
        let p = e.path();
        let m = std::fs::symlink_metadata(&p)?;
        if m.is_dir() {
            walk(root, &p, out)?;
        } else {
            out.insert(p.strip_prefix(root)?.to_string_lossy().into_owned(), fact_of(&p, &m)?);
        }
    }
    Ok(())
}

fn fact_of(p: &Path, m: &std::fs::Metadata) -> R<Fact> {
    let ft = m.file_type();
    let (kind, sha, target) = if ft.is_dir() {
        ('d', String::new(), String::new())
    } else if ft.is_symlink() {
        ('l', String::new(), std::fs::read_link(p)?.to_string_lossy().into_owned())
    } else if ft.is_file() {
        ('f', oci_core::Digest::of(&std::fs::read(p)?).to_string(), String::new())
    } else {
        ('o', String::new(), String::new())
    };
    Ok(Fact {
        kind,
        mode: m.mode() & 0o7777,
        size: if ft.is_file() { m.len() } else { 0 },
        sha,
        target,
        ino: m.ino(),
        mtime: (m.mtime(), m.mtime_nsec()),
    })
}

/// The facts that define equality of content (no inode, no mtime).
pub fn content(f: &BTreeMap<String, Fact>) -> BTreeMap<String, (char, u32, String, String)> {
    f.iter().map(|(k, v)| (k.clone(), (v.kind, v.mode, v.sha.clone(), v.target.clone()))).collect()
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

pub fn oci(dir: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", dir.display())
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_scap-bridge"))
}
