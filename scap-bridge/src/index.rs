//! The index of one layer: its entries in stream order, classified (directory, file with
//! size and sha256, symlink, hardlink, whiteout, opaque marker, refused special file).
//!
//! An index comes from one of three places:
//! * reading and verifying the layer ([`classify`] + the content hash, in `layer`);
//! * the builder's table of contents ([`from_toc`]): trusted for planning only, and checked
//!   entry by entry against the stream whenever the layer is read;
//! * our cache in the state directory ([`LayerIndex::to_text`]/[`LayerIndex::from_text`]),
//!   written after we verified the layer ourselves, keyed by the layer digest.

use crate::error::Refusal;
use crate::path;
use crate::tar::{Header, Kind};
use oci_core::Digest;
use sha2::{Digest as _, Sha256};

pub type Sha = [u8; 32];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File {
        size: u64,
        sha256: Sha,
    },
    Symlink {
        target: String,
    },
    /// A hardlink to an earlier path (normalised).
    Hardlink {
        target: String,
    },
    /// A device node, FIFO or socket: refused wherever it would be extracted.
    Special(&'static str),
    /// A whiteout marker; the entry's path is the path it hides.
    Whiteout,
    /// An opaque marker; the entry's path is the directory it applies to.
    Opaque,
}

/// One entry of a layer. For whiteouts `path` is what is hidden, for opaque markers the
/// directory; `raw` is the name as the layer spells it (for messages and duplicates).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub path: String,
    pub kind: EntryKind,
    pub mode: u32,
}

impl IndexEntry {
    /// The name as it appears in the layer (whiteout markers included).
    pub fn raw_name(&self) -> String {
        match self.kind {
            EntryKind::Whiteout => {
                path::join(path::parent(&self.path), &format!(".wh.{}", path::file_name(&self.path)))
            }
            EntryKind::Opaque => path::join(&self.path, ".wh..wh..opq"),
            _ => self.path.clone(),
        }
    }

    /// A short description for mismatch messages.
    pub fn describe(&self) -> String {
        match &self.kind {
            EntryKind::Dir => format!("directory {:?} mode {:o}", self.path, self.mode),
            EntryKind::File { size, sha256 } => {
                format!("file {:?} mode {:o} size {size} sha256 {}", self.path, self.mode, hex::encode(sha256))
            }
            EntryKind::Symlink { target } => format!("symlink {:?} -> {target:?}", self.path),
            EntryKind::Hardlink { target } => format!("hardlink {:?} -> {target:?}", self.path),
            EntryKind::Special(k) => format!("{k} {:?}", self.path),
            EntryKind::Whiteout => format!("whiteout of {:?}", self.path),
            EntryKind::Opaque => format!("opaque marker in {:?}", self.path),
        }
    }
}

/// Classify a header. File entries get a zero sha256, filled in once the content is read.
/// The error carries the entry's name as the layer spells it.
pub fn classify(h: &Header) -> Result<IndexEntry, (String, Refusal)> {
    let name = || String::from_utf8_lossy(&h.path).into_owned();
    let p = path::normalize(&h.path).map_err(|r| (name(), r))?;
    let mode = h.mode & 0o7777;
    let base = path::file_name(&p);
    if let Some(hidden) = base.strip_prefix(".wh.") {
        if h.kind != Kind::File {
            return Err((name(), Refusal::WhiteoutNotFile));
        }
        let dir = path::parent(&p).to_string();
        if hidden == ".wh..opq" {
            return Ok(IndexEntry { path: dir, kind: EntryKind::Opaque, mode });
        }
        if hidden.starts_with(".wh.") {
            return Err((name(), Refusal::BadWhiteout(base.to_string())));
        }
        if hidden.is_empty() {
            return Err((name(), Refusal::EmptyWhiteout));
        }
        if hidden == "." || hidden == ".." {
            return Err((name(), Refusal::DotDot));
        }
        return Ok(IndexEntry { path: path::join(&dir, hidden), kind: EntryKind::Whiteout, mode });
    }
    if p.is_empty() && h.kind != Kind::Dir {
        return Err((name(), Refusal::RootNotDir));
    }
    let kind = match h.kind {
        Kind::Dir => EntryKind::Dir,
        Kind::File => EntryKind::File { size: h.size, sha256: [0; 32] },
        Kind::Symlink => EntryKind::Symlink { target: path::link_target(&h.link).map_err(|r| (name(), r))? },
        Kind::Hardlink => {
            let t = path::normalize(&h.link).map_err(|r| (name(), r))?;
            if t.is_empty() {
                return Err((name(), Refusal::HardlinkNotFile(t)));
            }
            EntryKind::Hardlink { target: t }
        }
        k @ (Kind::CharDev | Kind::BlockDev | Kind::Fifo) => EntryKind::Special(k.name()),
    };
    Ok(IndexEntry { path: p, kind, mode })
}

/// All entries of one layer, in stream order (an entry's position is its sequence number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerIndex {
    pub diff_id: Digest,
    pub entries: Vec<IndexEntry>,
}

const MAGIC: &str = "scap-bridge layer index v1";

impl LayerIndex {
    /// A line-based text form for the state directory, sealed by a trailing checksum.
    pub fn to_text(&self) -> String {
        let mut s = String::with_capacity(64 + self.entries.len() * 96);
        s.push_str(MAGIC);
        s.push('\n');
        s.push_str(&format!("diff_id {}\n", self.diff_id));
        for e in &self.entries {
            let (k, size, sha, target) = match &e.kind {
                EntryKind::Dir => ("d", String::new(), String::new(), ""),
                EntryKind::File { size, sha256 } => ("f", size.to_string(), hex::encode(sha256), ""),
                EntryKind::Symlink { target } => ("l", String::new(), String::new(), target.as_str()),
                EntryKind::Hardlink { target } => ("h", String::new(), String::new(), target.as_str()),
                EntryKind::Special(name) => ("s", String::new(), String::new(), *name),
                EntryKind::Whiteout => ("w", String::new(), String::new(), ""),
                EntryKind::Opaque => ("o", String::new(), String::new(), ""),
            };
            s.push_str(&format!("{k}\t{:o}\t{size}\t{sha}\t{}\t{target}\n", e.mode, e.path));
        }
        let sum = hex::encode(Sha256::digest(s.as_bytes()));
        s.push_str(&format!("checksum {sum}\n"));
        s
    }

    /// Parse [`LayerIndex::to_text`]; `None` if the text is damaged in any way.
    pub fn from_text(text: &str) -> Option<LayerIndex> {
        let body_end = text.trim_end_matches('\n').rfind('\n')? + 1;
        let (body, trailer) = text.split_at(body_end);
        let sum = trailer.trim_end().strip_prefix("checksum ")?;
        if hex::encode(Sha256::digest(body.as_bytes())) != sum {
            return None;
        }
        let mut lines = body.lines();
        if lines.next()? != MAGIC {
            return None;
        }
        let diff_id: Digest = lines.next()?.strip_prefix("diff_id ")?.parse().ok()?;
        let mut entries = Vec::new();
        for line in lines {
            let f: Vec<&str> = line.split('\t').collect();
            let [k, mode, size, sha, p, target] = f.as_slice() else { return None };
            let mode = u32::from_str_radix(mode, 8).ok()?;
            let kind = match *k {
                "d" => EntryKind::Dir,
                "f" => {
                    let mut sha256 = [0u8; 32];
                    hex::decode_to_slice(sha, &mut sha256).ok()?;
                    EntryKind::File { size: size.parse().ok()?, sha256 }
                }
                "l" => EntryKind::Symlink { target: target.to_string() },
                "h" => EntryKind::Hardlink { target: target.to_string() },
                "s" => EntryKind::Special(match *target {
                    "character device" => "character device",
                    "block device" => "block device",
                    _ => "FIFO",
                }),
                "w" => EntryKind::Whiteout,
                "o" => EntryKind::Opaque,
                _ => return None,
            };
            entries.push(IndexEntry { path: p.to_string(), kind, mode });
        }
        Some(LayerIndex { diff_id, entries })
    }
}

#[derive(serde::Deserialize)]
struct TocFile {
    #[serde(rename = "mediaType")]
    media_type: String,
    entries: Vec<TocEntry>,
}

#[derive(serde::Deserialize)]
struct TocEntry {
    path: String,
    #[serde(rename = "type")]
    kind: String,
    mode: u32,
    size: Option<u64>,
    sha256: Option<Digest>,
    target: Option<String>,
}

/// Turn a builder table of contents into an index (its DiffID taken from the config).
/// `Ok(None)` when the TOC lacks what planning needs (a file without size or sha256).
pub fn from_toc(bytes: &[u8], diff_id: &Digest) -> Result<Option<LayerIndex>, String> {
    let toc: TocFile = serde_json::from_slice(bytes).map_err(|e| format!("table of contents: {e}"))?;
    if toc.media_type != oci_core::media::TOC_MEDIA_TYPE {
        return Err(format!("table of contents has media type {:?}", toc.media_type));
    }
    let mut entries = Vec::with_capacity(toc.entries.len());
    for e in toc.entries {
        let p = path::normalize(e.path.as_bytes()).map_err(|r| format!("table of contents entry {:?}: {r}", e.path))?;
        let kind = match e.kind.as_str() {
            "dir" => EntryKind::Dir,
            "file" => match (e.size, e.sha256) {
                (Some(size), Some(d)) => {
                    let mut sha256 = [0u8; 32];
                    hex::decode_to_slice(d.hex(), &mut sha256).map_err(|e| e.to_string())?;
                    EntryKind::File { size, sha256 }
                }
                _ => return Ok(None),
            },
            "symlink" => match e.target {
                Some(t) => EntryKind::Symlink { target: t },
                None => return Ok(None),
            },
            other => return Err(format!("table of contents entry {:?} has unknown type {other:?}", e.path)),
        };
        entries.push(IndexEntry { path: p, kind, mode: e.mode & 0o7777 });
    }
    Ok(Some(LayerIndex { diff_id: diff_id.clone(), entries }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(path: &str, kind: Kind, link: &str) -> Header {
        Header { path: path.as_bytes().to_vec(), link: link.as_bytes().to_vec(), kind, mode: 0o644, size: 0 }
    }

    #[test]
    fn classify_whiteouts() {
        let e = classify(&h("a/.wh.b", Kind::File, "")).expect("whiteout");
        assert_eq!((e.path.as_str(), &e.kind), ("a/b", &EntryKind::Whiteout));
        assert_eq!(e.raw_name(), "a/.wh.b");
        let e = classify(&h("a/.wh..wh..opq", Kind::File, "")).expect("opaque");
        assert_eq!((e.path.as_str(), &e.kind), ("a", &EntryKind::Opaque));
        assert_eq!(e.raw_name(), "a/.wh..wh..opq");
        assert_eq!(classify(&h("a/.wh.", Kind::File, "")).map_err(|e| e.1), Err(Refusal::EmptyWhiteout));
        assert!(matches!(classify(&h("a/.wh..wh.plnk", Kind::File, "")), Err((_, Refusal::BadWhiteout(_)))));
        assert_eq!(classify(&h(".wh..", Kind::File, "")).map_err(|e| e.1), Err(Refusal::DotDot));
        assert_eq!(classify(&h("x/.wh.y", Kind::Dir, "")).map_err(|e| e.1), Err(Refusal::WhiteoutNotFile));
        assert_eq!(classify(&h(".", Kind::Symlink, "x")).map_err(|e| e.1), Err(Refusal::RootNotDir));
        assert_eq!(classify(&h("l", Kind::Hardlink, "../x")).map_err(|e| e.1), Err(Refusal::DotDot));
        assert_eq!(classify(&h("l", Kind::Symlink, "")).map_err(|e| e.1), Err(Refusal::EmptyTarget));
    }

    #[test]
    fn text_round_trip_and_damage() {
        let idx = LayerIndex {
            diff_id: Digest::of(b"x"),
            entries: vec![
                IndexEntry { path: String::new(), kind: EntryKind::Dir, mode: 0o755 },
                IndexEntry { path: "a b".into(), kind: EntryKind::File { size: 3, sha256: [7; 32] }, mode: 0o644 },
                IndexEntry { path: "l".into(), kind: EntryKind::Symlink { target: "../x y".into() }, mode: 0o777 },
                IndexEntry { path: "h".into(), kind: EntryKind::Hardlink { target: "a b".into() }, mode: 0o644 },
                IndexEntry { path: "dev".into(), kind: EntryKind::Special("FIFO"), mode: 0o644 },
                IndexEntry { path: "w".into(), kind: EntryKind::Whiteout, mode: 0 },
                IndexEntry { path: "o".into(), kind: EntryKind::Opaque, mode: 0 },
            ],
        };
        let t = idx.to_text();
        assert_eq!(LayerIndex::from_text(&t), Some(idx));
        let damaged = t.replacen("a b", "a c", 1);
        assert_eq!(LayerIndex::from_text(&damaged), None);
        assert_eq!(LayerIndex::from_text(&t[..t.len() - 3]), None);
    }
}
