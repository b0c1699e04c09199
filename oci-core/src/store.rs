//! One interface over the two places images live: an OCI layout directory and a registry
//! repository. Callers name an [`ImageRef`] and get a [`Store`]; every byte read through it
//! is verified against its digest.

use crate::digest::Digest;
use crate::layout::{Layout, LayoutError};
use crate::media;
use crate::reference::{ImageRef, Reference};
use crate::registry::{BlobPush, ClientOptions, FetchedManifest, RegistryClient, RegistryError};
use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};
use std::path::Path;

/// Manifests and configs larger than this are refused (a hostile registry could otherwise
/// make us allocate without bound).
pub const MAX_METADATA_BYTES: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{image}: {what}")]
    Image { image: String, what: String },
    #[error("{image}: blob {digest}: {what}")]
    Blob { image: String, digest: Digest, what: String },
}

#[derive(Clone)]
pub enum Store {
    Layout { layout: Layout, name: String },
    Registry { client: RegistryClient, repo: String, name: String },
}

/// An image manifest with its config, both verified.
#[derive(Debug, Clone)]
pub struct Image {
    pub manifest: ImageManifest,
    pub manifest_bytes: Vec<u8>,
    pub manifest_digest: Digest,
    pub manifest_media_type: String,
    pub config: ImageConfiguration,
    pub config_bytes: Vec<u8>,
}

impl Store {
    /// Open the store an image reference names. With `create`, a missing layout is created.
    pub fn open(r: &ImageRef, opts: &ClientOptions, create: bool) -> Result<Store, StoreError> {
        let name = r.with_reference(None).to_string();
        match r {
            ImageRef::Layout { dir, .. } => {
                let layout = if create { Layout::create(dir.clone())? } else { Layout::open(dir.clone())? };
                Ok(Store::Layout { layout, name })
            }
            ImageRef::Registry { host, repo, .. } => {
                let mut opts = opts.clone();
                if r.is_loopback_registry() {
                    opts.insecure = true;
                }
                Ok(Store::Registry { client: RegistryClient::new(host, &opts)?, repo: repo.clone(), name })
            }
        }
    }

    /// `oci:<dir>` or `docker://host/repo`, without tag.
    pub fn name(&self) -> &str {
        match self {
            Store::Layout { name, .. } | Store::Registry { name, .. } => name,
        }
    }

    /// For registries: `(host, repo)`.
    pub fn registry_repo(&self) -> Option<(&str, &str)> {
        match self {
            Store::Registry { client, repo, .. } => Some((client.host(), repo)),
            Store::Layout { .. } => None,
        }
    }

    pub async fn blob_size(&self, d: &Digest) -> Result<Option<u64>, StoreError> {
        match self {
            Store::Layout { layout, .. } => Ok(layout.blob_size(d)),
            Store::Registry { client, repo, .. } => Ok(client.blob_size(repo, d).await?),
        }
    }

    /// Read a small blob (manifest, config, table of contents), verified.
    pub async fn get_blob(&self, d: &Digest, size: Option<u64>) -> Result<Vec<u8>, StoreError> {
        if let Some(s) = size {
            if s > MAX_METADATA_BYTES {
                return Err(StoreError::Blob {
                    image: self.name().to_string(),
                    digest: d.clone(),
                    what: format!("{s} bytes is more than the {MAX_METADATA_BYTES} allowed for metadata"),
                });
            }
        }
        match self {
            Store::Layout { layout, .. } => Ok(layout.read_blob(d, size)?),
            Store::Registry { client, repo, .. } => {
                let v = client.get_blob_bytes(repo, d, size.unwrap_or(MAX_METADATA_BYTES)).await?;
                if size.is_some_and(|s| s != v.len() as u64) {
                    return Err(StoreError::Blob {
                        image: self.name().to_string(),
                        digest: d.clone(),
                        what: format!("size {} differs from the descriptor's {}", v.len(), size.unwrap_or(0)),
                    });
                }
                Ok(v)
            }
        }
    }

    /// Copy a blob into a local file, verified before the file appears at `dst`.
    pub async fn fetch_blob_to(&self, d: &Digest, size: Option<u64>, dst: &Path) -> Result<u64, StoreError> {
        match self {
            Store::Layout { layout, .. } => {
                let src = layout.blob_path(d);
                let expected = match size {
                    Some(s) => s,
                    None => layout.blob_size(d).ok_or_else(|| LayoutError::MissingBlob {
                        dir: layout.dir().to_path_buf(),
                        digest: d.clone(),
                    })?,
                };
                let f = std::fs::File::open(&src).map_err(|source| LayoutError::Io {
                    path: src.clone(),
                    what: "cannot open blob",
                    source,
                })?;
                crate::layout::write_verified(std::io::BufReader::new(f), d, expected, dst)?;
                Ok(expected)
            }
            Store::Registry { client, repo, .. } => Ok(client.fetch_blob_to_file(repo, d, size, dst).await?),
        }
    }

    /// Store a local file holding `d` (already verified by the caller or verified here).
    pub async fn put_blob_file(
        &self,
        path: &Path,
        d: &Digest,
        size: u64,
        mount_from: Option<&str>,
    ) -> Result<BlobPush, StoreError> {
        match self {
            Store::Layout { layout, .. } => {
                if layout.blob_size(d) == Some(size) {
                    return Ok(BlobPush::Existed);
                }
                let (layout, path, d) = (layout.clone(), path.to_path_buf(), d.clone());
                tokio::task::spawn_blocking(move || layout.put_blob_file(&path, &d, size)).await.map_err(|e| {
                    StoreError::Image { image: self.name().to_string(), what: format!("blob copy task failed: {e}") }
                })??;
                Ok(BlobPush::Uploaded(size))
            }
            Store::Registry { client, repo, .. } => Ok(client.push_blob_file(repo, path, d, size, mount_from).await?),
        }
    }

    pub async fn put_blob_bytes(&self, bytes: &[u8]) -> Result<(Digest, u64, BlobPush), StoreError> {
        match self {
            Store::Layout { layout, .. } => {
                let d = Digest::of(bytes);
                if layout.blob_size(&d) == Some(bytes.len() as u64) {
                    return Ok((d, bytes.len() as u64, BlobPush::Existed));
                }
                let (d, n) = layout.put_blob_bytes(bytes)?;
                Ok((d, n, BlobPush::Uploaded(n)))
            }
            Store::Registry { client, repo, .. } => {
                let (d, p) = client.push_blob_bytes(repo, bytes::Bytes::copy_from_slice(bytes)).await?;
                Ok((d, bytes.len() as u64, p))
            }
        }
    }

    /// Fetch a manifest or index by tag or digest (the layout's only image when `None`).
    pub async fn get_manifest(&self, reference: Option<&Reference>) -> Result<FetchedManifest, StoreError> {
        match self {
            Store::Layout { layout, .. } => {
                let desc = match reference {
                    Some(Reference::Digest(d)) => {
                        let bytes = layout.read_blob(d, None)?;
                        let media_type = sniff_media_type(&bytes).unwrap_or_else(|| media::OCI_MANIFEST.to_string());
                        return Ok(FetchedManifest { bytes, media_type, digest: d.clone() });
                    }
                    Some(Reference::Tag(t)) => layout.resolve_tag(Some(t))?,
                    None => layout.resolve_tag(None)?,
                };
                let d = Digest::from_oci(desc.digest())
                    .map_err(|e| StoreError::Image { image: self.name().to_string(), what: e.to_string() })?;
                let bytes = layout.read_blob(&d, Some(desc.size()))?;
                Ok(FetchedManifest { bytes, media_type: desc.media_type().to_string(), digest: d })
            }
            Store::Registry { client, repo, .. } => {
                let r = reference.map_or_else(|| "latest".to_string(), |r| r.to_string());
                Ok(client.get_manifest(repo, &r).await?)
            }
        }
    }

    /// Store a manifest and, with `tag`, point the tag at it. Callers push every blob the
    /// manifest references first.
    pub async fn put_manifest(&self, bytes: &[u8], media_type: &str, tag: Option<&str>) -> Result<Digest, StoreError> {
        match self {
            Store::Layout { layout, .. } => {
                let (d, n) = layout.put_blob_bytes(bytes)?;
                if let Some(tag) = tag {
                    let mt: oci_spec::image::MediaType = media_type.into();
                    let desc = Descriptor::new(mt, n, d.to_oci());
                    layout.set_tag(tag, &desc)?;
                }
                Ok(d)
            }
            Store::Registry { client, repo, .. } => {
                let d = Digest::of(bytes);
                let r = tag.map_or_else(|| d.to_string(), str::to_string);
                let got = client.put_manifest(repo, &r, bytes, media_type).await?;
                if got != d {
                    return Err(StoreError::Image {
                        image: self.name().to_string(),
                        what: format!("registry stored the manifest as {got}, expected {d}"),
                    });
                }
                Ok(d)
            }
        }
    }

    /// Point each tag at its manifest (already stored): one atomic index update for a
    /// layout, one PUT per tag for a registry.
    pub async fn set_tags(&self, tags: &[(String, Vec<u8>, String)]) -> Result<(), StoreError> {
        match self {
            Store::Layout { layout, .. } => {
                let descs: Vec<(String, Descriptor)> = tags
                    .iter()
                    .map(|(t, bytes, mt)| {
                        let mt: oci_spec::image::MediaType = mt.as_str().into();
                        (t.clone(), Descriptor::new(mt, bytes.len() as u64, Digest::of(bytes).to_oci()))
                    })
                    .collect();
                Ok(layout.set_tags(&descs)?)
            }
            Store::Registry { .. } => {
                for (t, bytes, mt) in tags {
                    self.put_manifest(bytes, mt, Some(t)).await?;
                }
                Ok(())
            }
        }
    }

    pub async fn tags(&self) -> Result<Vec<String>, StoreError> {
        match self {
            Store::Layout { layout, .. } => Ok(layout.tags()?.into_iter().map(|(t, _)| t).collect()),
            Store::Registry { client, repo, .. } => Ok(client.list_tags(repo).await?),
        }
    }

    /// Load an image: resolve an index to the platform's manifest, then read the config.
    /// Everything is verified against its digest.
    pub async fn load_image(&self, reference: Option<&Reference>, platform: (&str, &str)) -> Result<Image, StoreError> {
        let mut fetched = self.get_manifest(reference).await?;
        let image = self.name().to_string();
        let bad = |what: String| StoreError::Image { image: image.clone(), what };
        if media::is_index(&fetched.media_type)
            || sniff_media_type(&fetched.bytes).as_deref() == Some(media::OCI_INDEX)
                && !media::is_manifest(&fetched.media_type)
        {
            let index: ImageIndex =
                serde_json::from_slice(&fetched.bytes).map_err(|e| bad(format!("index {}: {e}", fetched.digest)))?;
            let chosen = index
                .manifests()
                .iter()
                .find(|m| {
                    m.platform()
                        .as_ref()
                        .is_some_and(|p| p.os().to_string() == platform.0 && p.architecture().to_string() == platform.1)
                })
                .or_else(|| if index.manifests().len() == 1 { index.manifests().first() } else { None })
                .ok_or_else(|| {
                    bad(format!("index {} has no manifest for {}/{}", fetched.digest, platform.0, platform.1))
                })?;
            let d = Digest::from_oci(chosen.digest()).map_err(|e| bad(e.to_string()))?;
            fetched = self.get_manifest(Some(&Reference::Digest(d))).await?;
            fetched.media_type = chosen.media_type().to_string();
        }
        if !media::is_manifest(&fetched.media_type) {
            return Err(bad(format!(
                "{} has media type {:?}, not an image manifest",
                fetched.digest, fetched.media_type
            )));
        }
        let manifest: ImageManifest =
            serde_json::from_slice(&fetched.bytes).map_err(|e| bad(format!("manifest {}: {e}", fetched.digest)))?;
        let cd = Digest::from_oci(manifest.config().digest()).map_err(|e| bad(e.to_string()))?;
        let config_bytes = self.get_blob(&cd, Some(manifest.config().size())).await?;
        let config: ImageConfiguration =
            serde_json::from_slice(&config_bytes).map_err(|e| bad(format!("config {cd}: {e}")))?;
        if config.rootfs().diff_ids().len() != manifest.layers().len() {
            return Err(bad(format!(
                "config {cd} lists {} diff_ids but the manifest has {} layers",
                config.rootfs().diff_ids().len(),
                manifest.layers().len()
            )));
        }
        Ok(Image {
            manifest,
            manifest_bytes: fetched.bytes,
            manifest_digest: fetched.digest,
            manifest_media_type: fetched.media_type,
            config,
            config_bytes,
        })
    }
}

/// The `mediaType` field of a manifest or index, if it has one.
pub fn sniff_media_type(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct M {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    let m: M = serde_json::from_slice(bytes).ok()?;
    m.media_type.or_else(|| m.manifests.map(|_| media::OCI_INDEX.to_string()))
}
