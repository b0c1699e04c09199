//! Where an image's bytes come from: its store (an OCI layout or a registry), driven from
//! synchronous code through one current-thread tokio runtime (the registry client is
//! async; everything else here is file I/O and CPU work on plain threads).
//!
//! A layout's blobs are read in place; a registry's are downloaded into the state
//! directory's spool (verified by the client before they appear there) and removed once
//! read. Either way the layer reader verifies digest and size again as it streams.

use crate::error::{Error, Result};
use crate::image::{self, LayerRef, ResolvedImage};
use crate::layer::read_verified;
use oci_core::reference::ImageRef;
use oci_core::registry::ClientOptions;
use oci_core::store::Store;
use oci_core::Digest;
use std::path::{Path, PathBuf};

/// Largest table of contents read.
pub const MAX_TOC_BYTES: u64 = 512 << 20;

pub struct Source {
    rt: tokio::runtime::Runtime,
    store: Store,
    image: ImageRef,
    spool: PathBuf,
}

/// A blob available as a local file; a spooled copy is removed on drop.
pub struct LocalBlob {
    pub path: PathBuf,
    spooled: bool,
}

impl Drop for LocalBlob {
    fn drop(&mut self) {
        if self.spooled {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Source {
    pub fn open(image: &ImageRef, registry: &ClientOptions, spool: &Path) -> Result<Source> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::io("tokio runtime", "cannot start"))?;
        let store = image::open_store(image, registry)?;
        Ok(Source { rt, store, image: image.clone(), spool: spool.to_path_buf() })
    }

    pub fn resolve(&self, platform: &str) -> Result<ResolvedImage> {
        self.rt.block_on(image::resolve(&self.store, &self.image, platform))
    }

    fn store_err(&self) -> impl FnOnce(oci_core::store::StoreError) -> Error {
        let image = self.image.to_string();
        move |source| Error::Store { image, source: Box::new(source) }
    }

    /// The blob as a local file (downloaded if the store is a registry).
    pub fn blob(&self, digest: &Digest, size: u64) -> Result<LocalBlob> {
        match &self.store {
            Store::Layout { layout, .. } => {
                let path = layout.blob_path(digest);
                if !path.is_file() {
                    return Err(Error::Image {
                        image: self.image.to_string(),
                        what: format!("blob {digest} is missing from the layout"),
                    });
                }
                Ok(LocalBlob { path, spooled: false })
            }
            Store::Registry { .. } => {
                std::fs::create_dir_all(&self.spool)
                    .map_err(Error::io(&self.spool, "cannot create spool directory"))?;
                let path = self.spool.join(format!("{}.{}", digest.hex(), std::process::id()));
                let blob = LocalBlob { path, spooled: true };
                self.rt.block_on(self.store.fetch_blob_to(digest, Some(size), &blob.path)).map_err(self.store_err())?;
                Ok(blob)
            }
        }
    }

    pub fn layer_blob(&self, l: &LayerRef) -> Result<LocalBlob> {
        self.blob(&l.digest, l.size)
    }

    /// A table of contents, verified against its digest and size.
    pub fn toc(&self, digest: &Digest, size: u64) -> Result<Vec<u8>> {
        let blob = self.blob(digest, size)?;
        read_verified(&blob.path, digest, size, MAX_TOC_BYTES)
    }

    /// Remove spool files left by runs that were killed.
    pub fn clean_spool(&self) {
        if let Ok(rd) = std::fs::read_dir(&self.spool) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}
