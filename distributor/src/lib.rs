//! `mwdist`: peer-to-peer fan-out of large OCI blobs behind a transparent registry mirror.
//!
//! * [`pieces`] and [`engine`]: the piece model and piece/peer selection, pure code.
//! * [`origin`]: the seed (reads upstream once, hashes pieces as they stream, disk
//!   cache) with the [`tracker`].
//! * [`agent`]: one per worker; the distribution pull API on loopback for containerd,
//!   skopeo or docker, fed by the swarm with every piece verified.
//! * [`bench`]: `mwdist bench`, fan-out measured against the physical lower bound;
//!   [`sim`]: `mwdist simulate`, the same selection code for thousands of nodes.

pub mod agent;
pub mod api;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod disk;
pub mod engine;
pub mod limit;
pub mod metrics;
pub mod origin;
pub mod pieces;
pub mod pull;
pub mod server;
pub mod sim;
pub mod tracker;
pub mod upstream;
pub mod v2;
