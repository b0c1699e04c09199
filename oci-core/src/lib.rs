//! OCI primitives shared by the builder (`mwbuild`), the distributor (`mwdist`) and
//! `scap-bridge`: content digests, media types, image references in skopeo's transport
//! syntax, the OCI image layout on disk, a registry client for the distribution API, and
//! [`store::Store`], which lets callers treat both the same way.
//!
//! Nothing here knows about MediaWiki.

pub mod auth;
pub mod digest;
pub mod layout;
pub mod media;
pub mod reference;
pub mod registry;
pub mod sha256;
pub mod store;
pub mod testing;

pub use digest::{Digest, DigestError, HashingWriter};
pub use reference::{ImageRef, RefError};
