//! `scap-bridge` lays a MediaWiki version taken from an OCI image into scap's staging tree
//! (`/srv/mediawiki-staging/php-<version>`), so that bare-metal servers (synced by scap
//! with rsync) and Kubernetes run the very same bytes. The same engine unpacks any image
//! subtree into a directory (`unpack`) and compares a tree with an image (`verify`).
//!
//! The pipeline, one module each:
//!
//! ```text
//! image ──► source ──► blob ──► tar ──► index ──► view ──► plan ──► apply ──► swap
//! (resolve)  (fetch)  (verify,  (strict  (classify (OCI     (link /  (new sibling tree,
//!                      inflate)  parse)   entries)  layer    write /   RENAME_EXCHANGE)
//!                                                   semantics) keep)
//! ```
//!
//! * [`image`]: manifest/index/config resolution with digest, size and media-type checks.
//! * [`blob`]: a layer as a verified, decompressed, bounded stream (digest, size, DiffID
//!   checked after reading to EOF).
//! * [`tar`]: a strict tar reader (PAX/GNU; refuses ambiguities).
//! * [`path`]: entry names as data; the walk order.
//! * [`index`]: one layer's classified entries (from the stream, a builder TOC, or our cache).
//! * [`layer`]: reading one layer, extracting what is wanted, checking it against a TOC.
//! * [`view`]: the final tree of a subtree with whiteouts, opaque dirs, hardlinks; symlink
//!   checks.
//! * [`plan`]: per path: hardlink unchanged, write changed, mtimes, scap regions.
//! * [`apply`]: building the new tree by descriptor and swapping it in atomically.
//! * [`fsutil`]: the descriptor-relative file-system calls (openat2 `RESOLVE_BENEATH`).
//! * [`state`]: our own records outside staging; [`recheck`]: whether a tree is still what
//!   we recorded (a re-run's early stop); [`lock`]: scap's lock;
//!   [`provenance`]: the file scap can read instead of `.git`.
//! * [`engine`] runs `prep`/`unpack`; [`verify`] runs `verify`; [`cli`] parses arguments.
//!
//! See `README.md` in this crate for the invariants and the on-disk formats.

pub mod apply;
pub mod blob;
pub mod cli;
pub mod engine;
pub mod error;
pub mod fsutil;
pub mod image;
pub mod index;
pub mod layer;
pub mod lock;
pub mod path;
pub mod plan;
pub mod provenance;
pub mod recheck;
pub mod source;
pub mod state;
pub mod tar;
pub mod testing;
pub mod verify;
pub mod view;
pub mod writer;

pub use error::{Error, Refusal, Result};
