//! `mwbuild`: builds one OCI image per MediaWiki version and an aggregate multi-version
//! image from reproducible, cached, per-component layers. See ARCHITECTURE.md.

pub mod build;
pub mod cache;
pub mod compress;
pub mod image;
pub mod inspect;
pub mod layer;
pub mod plan;
pub mod prune;
pub mod publish;
pub mod rebase;
pub mod report;
pub mod spec;
pub mod tarball;
pub mod walk;
