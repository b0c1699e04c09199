//! Publishing to the output (an OCI layout or a registry): blobs in parallel (skipped when
//! present, mounted from the base image's repository when it lives on the same registry),
//! then manifests by digest, then the tables-of-contents artifacts, then tags.

use crate::cache::Cache;
use crate::image;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use oci_core::digest::Digest;
use oci_core::media;
use oci_core::registry::BlobPush;
use oci_core::store::{Store, StoreError};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

/// Concurrent blob uploads.
const PARALLEL_UPLOADS: usize = 4;

#[derive(Debug, Clone)]
pub enum BlobSource {
    /// A blob of one of the publisher's source images (index into its sources).
    Image { digest: Digest, size: u64, source: usize },
    /// A blob in the build cache.
    Cache { digest: Digest, size: u64 },
}

impl BlobSource {
    fn digest(&self) -> &Digest {
        match self {
            BlobSource::Image { digest, .. } | BlobSource::Cache { digest, .. } => digest,
        }
    }
    fn size(&self) -> u64 {
        match self {
            BlobSource::Image { size, .. } | BlobSource::Cache { size, .. } => *size,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PushStats {
    pub pushed: u64,
    pub skipped: u64,
    pub mounted: u64,
}

impl PushStats {
    pub fn sum<'a>(it: impl Iterator<Item = &'a PushStats>) -> PushStats {
        it.fold(PushStats::default(), |a, b| PushStats {
            pushed: a.pushed + b.pushed,
            skipped: a.skipped + b.skipped,
            mounted: a.mounted + b.mounted,
        })
    }
}

pub struct Publisher<'a> {
    out: &'a Store,
    cache: &'a Cache,
    sources: Vec<&'a Store>,
    progress: bool,
}

/// One image ready to publish: flavour, manifest bytes, its layers, its tags.
pub type PendingImage = (String, Vec<u8>, Vec<image::LayerDesc>, Vec<String>);

impl<'a> Publisher<'a> {
    pub fn new(out: &'a Store, cache: &'a Cache, sources: Vec<&'a Store>, progress: bool) -> Self {
        Publisher { out, cache, sources, progress }
    }

    async fn local_path(&self, src: &BlobSource) -> Result<(PathBuf, Option<String>), StoreError> {
        match src {
            BlobSource::Cache { digest, .. } => Ok((self.cache.blob_path(digest), None)),
            BlobSource::Image { digest, size, source } => match self.sources.get(*source).copied() {
                Some(Store::Layout { layout, .. }) => Ok((layout.blob_path(digest), None)),
                Some(base @ Store::Registry { .. }) => {
                    let (base_host, base_repo) = base.registry_repo().unwrap_or_default();
                    let same_host = self.out.registry_repo().is_some_and(|(h, _)| h == base_host);
                    let path = self.cache.blob_path(digest);
                    if same_host {
                        return Ok((path, Some(base_repo.to_string())));
                    }
                    if self.cache.blobs().blob_size(digest) != Some(*size) {
                        base.fetch_blob_to(digest, Some(*size), &path).await?;
                    }
                    Ok((path, None))
                }
                None => Err(StoreError::Image {
                    image: self.out.name().to_string(),
                    what: format!("blob {digest} has no source image"),
                }),
            },
        }
    }

    /// Push blobs (deduplicated), returning what each cost.
    pub async fn push_blobs(&self, blobs: Vec<BlobSource>) -> Result<HashMap<Digest, PushStats>, StoreError> {
        let mut seen = std::collections::HashSet::new();
        let unique: Vec<BlobSource> = blobs.into_iter().filter(|b| seen.insert(b.digest().clone())).collect();
        let total: u64 = unique.iter().map(BlobSource::size).sum();
        let pb = if self.progress { indicatif::ProgressBar::new(total) } else { indicatif::ProgressBar::hidden() };
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} publish      [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
        ) {
            pb.set_style(style.progress_chars("=> "));
        }
        let results: Vec<(Digest, PushStats)> = stream::iter(unique.into_iter().map(|b| {
            let pb = pb.clone();
            async move {
                let (digest, size) = (b.digest().clone(), b.size());
                let (path, mut mount_from) = self.local_path(&b).await?;
                let target = self.out.registry_repo();
                if let (None, Some((host, repo))) = (&mount_from, target) {
                    // Pushed to another repository of this registry before: mount it from there.
                    mount_from = self.cache.pushed_repo(host, &digest).filter(|r| r != repo);
                }
                let r = match (&b, self.out) {
                    // Cache blobs were hashed when written and checked when looked up.
                    (BlobSource::Cache { .. }, Store::Layout { layout, .. }) => {
                        if layout.blob_size(&digest) == Some(size) {
                            Ok(BlobPush::Existed)
                        } else {
                            layout
                                .put_verified_blob_file(&path, &digest, size)
                                .map(|()| BlobPush::Uploaded(size))
                                .map_err(StoreError::from)
                        }
                    }
                    _ => self.out.put_blob_file(&path, &digest, size, mount_from.as_deref()).await,
                };
                let r = match (r, &b, mount_from.is_some()) {
                    // Mount refused and the blob is not local yet: fetch it and push.
                    (Err(_), BlobSource::Image { source, .. }, true)
                        if self.cache.blobs().blob_size(&digest) != Some(size) =>
                    {
                        if let Some(src) = self.sources.get(*source) {
                            src.fetch_blob_to(&digest, Some(size), &path).await?;
                        }
                        self.out.put_blob_file(&path, &digest, size, None).await?
                    }
                    (r, _, _) => r?,
                };
                if let Some((host, repo)) = target {
                    self.cache.note_pushed(host, repo, &digest);
                }
                pb.inc(size);
                let stats = match r {
                    BlobPush::Existed => PushStats { skipped: size, ..Default::default() },
                    BlobPush::Mounted => PushStats { mounted: size, ..Default::default() },
                    BlobPush::Uploaded(n) => PushStats { pushed: n, ..Default::default() },
                };
                Ok::<_, StoreError>((digest, stats))
            }
        }))
        .buffer_unordered(PARALLEL_UPLOADS)
        .try_collect()
        .await?;
        pb.finish_and_clear();
        Ok(results.into_iter().collect())
    }

    /// Store manifests (by digest), their tables-of-contents artifacts, then all tags.
    /// Returns `(flavour, manifest digest, tags)`.
    pub async fn publish_manifests(
        &self,
        images: &[PendingImage],
    ) -> Result<Vec<(String, Digest, Vec<String>)>, StoreError> {
        let mut digests = Vec::new();
        for (_, bytes, _, _) in images {
            digests.push(self.out.put_manifest(bytes, media::OCI_MANIFEST, None).await?);
        }
        self.out.put_blob_bytes(image::EMPTY_JSON).await?;
        let mut tags: Vec<(String, Vec<u8>, String)> = Vec::new();
        for ((_, bytes, layers, _), d) in images.iter().zip(&digests) {
            let mut tocs: BTreeMap<Digest, u64> = BTreeMap::new();
            for l in layers {
                let (Some(td), Some(ts)) =
                    (l.annotations.get(media::ANNOTATION_TOC_DIGEST), l.annotations.get(media::ANNOTATION_TOC_SIZE))
                else {
                    continue;
                };
                if let (Ok(td), Ok(ts)) = (td.parse::<Digest>(), ts.parse::<u64>()) {
                    tocs.insert(td, ts);
                }
            }
            let tocs: Vec<(Digest, u64)> = tocs.into_iter().collect();
            let art = image::to_bytes(&image::toc_artifact(d, bytes.len() as u64, &tocs));
            let art_d = self.out.put_manifest(&art, media::OCI_MANIFEST, None).await?;
            let idx = image::to_bytes(&image::referrers_index(&art_d, art.len() as u64));
            self.out.put_manifest(&idx, media::OCI_INDEX, None).await?;
            tags.push((image::referrers_tag(d), idx, media::OCI_INDEX.to_string()));
        }
        let mut out = Vec::new();
        for ((flavour, bytes, _, names), d) in images.iter().zip(digests) {
            for t in names {
                tags.push((t.clone(), bytes.clone(), media::OCI_MANIFEST.to_string()));
            }
            out.push((flavour.clone(), d, names.clone()));
        }
        self.out.set_tags(&tags).await?;
        Ok(out)
    }
}
