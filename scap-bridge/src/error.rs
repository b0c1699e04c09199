//! Error types. [`Refusal`] names why one entry of a layer is refused (hostile or
//! unsupported content); [`Error`] is what every public function returns, with the image,
//! layer and entry it concerns. Messages say what was wrong and, where there is one, what to
//! do; sources are never repeated inside a message.

use crate::tar::TarError;
use oci_core::Digest;
use std::io;
use std::path::PathBuf;

/// Why an entry of a layer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("empty path")]
    EmptyPath,
    #[error("absolute path (leading '/')")]
    Absolute,
    #[error("path has a '..' component")]
    DotDot,
    #[error("path contains a NUL or control character")]
    ControlChar,
    #[error("path is not valid UTF-8")]
    NotUtf8,
    #[error("path component longer than 255 bytes")]
    NameTooLong,
    #[error("path longer than 4096 bytes")]
    PathTooLong,
    #[error("Windows drive letter or backslash in path")]
    WindowsPath,
    #[error("the entry for the root itself is not a directory")]
    RootNotDir,
    #[error("the same path appears twice in one layer")]
    Duplicate,
    #[error("a whiteout '.wh.' names nothing")]
    EmptyWhiteout,
    #[error("unsupported whiteout marker {0:?} (only '.wh.<name>' and '.wh..wh..opq' exist)")]
    BadWhiteout(String),
    #[error("a whiteout marker must be a regular file")]
    WhiteoutNotFile,
    #[error("{0} entries are not allowed in a staging tree")]
    Special(&'static str),
    #[error("written through the symlink {0:?}")]
    ThroughSymlink(String),
    #[error("its parent {0:?} is not a directory")]
    ParentNotDir(String),
    #[error("hardlink target {0:?} does not exist (or is hidden by a whiteout)")]
    HardlinkMissing(String),
    #[error("hardlink target {0:?} is not a regular file")]
    HardlinkNotFile(String),
    #[error("hardlink target {0:?} is outside the extracted subtree")]
    HardlinkOutside(String),
    #[error("empty symlink target")]
    EmptyTarget,
    #[error("symlink target {0:?} leaves the tree (use --symlinks any to allow it)")]
    SymlinkEscapes(String),
    #[error("symlink loop or chain of more than 40 links")]
    SymlinkLoop,
    #[error("the table of contents said {expected}, the layer has {actual}")]
    TocMismatch { expected: String, actual: String },
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("image {image}")]
    Store {
        image: String,
        #[source]
        source: Box<oci_core::store::StoreError>,
    },
    #[error("image {image}: {what}")]
    Image { image: String, what: String },
    #[error("layer {layer} ({digest}): entry {entry:?}: {reason}")]
    Entry { layer: usize, digest: Digest, entry: String, reason: Refusal },
    #[error("layer {layer} ({digest}): {what}")]
    Layer { layer: usize, digest: Digest, what: String },
    #[error("layer {layer} ({digest}): malformed tar stream")]
    Tar {
        layer: usize,
        digest: Digest,
        #[source]
        source: TarError,
    },
    #[error("layer {layer} ({digest}): cannot read the blob")]
    Read {
        layer: usize,
        digest: Digest,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the image has no directory /{path}; check --version and --image-root")]
    NoSubtree { path: String },
    #[error("lock {path} is held by another process (a deployment in progress?); try again later or pass --lock-wait")]
    Locked { path: PathBuf },
    #[error("{0}")]
    Usage(String),
    #[error("{path} changed while it was being read; run again once nothing else writes to it")]
    Raced { path: PathBuf },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, what: &'static str) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, what, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
