//! `mwbuild rebase`: put an image's MediaWiki layers on a new base image. The MediaWiki
//! layer blobs are reused as they are (same digests); only the config and manifest change.

use crate::build::{load_base, BuildError};
use crate::cache::Cache;
use crate::image::{self, LayerDesc, LABEL_BASE, LABEL_BASE_LAYERS};
use crate::publish::{BlobSource, Publisher};
use crate::spec::BaseImage;
use oci_core::digest::Digest;
use oci_core::media;
use oci_core::reference::{ImageRef, Reference};
use oci_core::registry::ClientOptions;
use oci_core::store::{Store, StoreError};
use std::collections::BTreeMap;

pub async fn rebase(
    src: &ImageRef,
    onto: &ImageRef,
    out: &ImageRef,
    opts: &ClientOptions,
) -> Result<Digest, BuildError> {
    let Some(Reference::Tag(tag)) = out.reference().cloned().or_else(|| src.reference().cloned()) else {
        return Err(BuildError::Plan(format!("name the tag to write: {out} has none")));
    };
    let src_store = Store::open(src, opts, false)?;
    let img = src_store.load_image(src.reference(), ("linux", "amd64")).await?;
    let bad = |what: String| BuildError::Base { image: src.to_string(), what };
    let labels = img.config.config().as_ref().and_then(|c| c.labels().clone()).unwrap_or_default();
    let old_base: usize = labels.get(LABEL_BASE_LAYERS).and_then(|s| s.parse().ok()).ok_or_else(|| {
        bad(format!("config has no {LABEL_BASE_LAYERS} label; only images built by mwbuild can be rebased"))
    })?;
    let platform = (img.config.os().to_string(), img.config.architecture().to_string());
    let base = load_base(&BaseImage::Image(onto.clone()), &platform, opts).await?;
    let diff_ids = img.config.rootfs().diff_ids();
    let mut layers: Vec<LayerDesc> = base.layers.clone();
    let mut blobs: Vec<BlobSource> =
        base.layers.iter().map(|l| BlobSource::Image { digest: l.digest.clone(), size: l.size, source: 1 }).collect();
    for (i, l) in img.manifest.layers().iter().enumerate().skip(old_base) {
        let digest = Digest::from_oci(l.digest()).map_err(|e| bad(e.to_string()))?;
        let diff_id: Digest = diff_ids[i].parse().map_err(|e: oci_core::DigestError| bad(e.to_string()))?;
        let annotations: BTreeMap<String, String> = l.annotations().clone().unwrap_or_default().into_iter().collect();
        if let (Some(td), Some(ts)) =
            (annotations.get(media::ANNOTATION_TOC_DIGEST), annotations.get(media::ANNOTATION_TOC_SIZE))
        {
            if let (Ok(td), Ok(ts)) = (td.parse::<Digest>(), ts.parse::<u64>()) {
                blobs.push(BlobSource::Image { digest: td, size: ts, source: 0 });
            }
        }
        blobs.push(BlobSource::Image { digest: digest.clone(), size: l.size(), source: 0 });
        layers.push(LayerDesc { media_type: l.media_type().to_string(), digest, size: l.size(), diff_id, annotations });
    }
    let out_store = Store::open(out, opts, true)?;
    let cache = Cache::open(&Cache::default_dir())?;
    let mut sources = vec![&src_store];
    if let Some(b) = base.store.as_ref() {
        sources.push(b);
    }
    let publisher = Publisher::new(&out_store, &cache, sources, false);
    publisher.push_blobs(blobs).await?;
    let mut extra: BTreeMap<String, String> =
        labels.into_iter().filter(|(k, _)| k != LABEL_BASE && k != LABEL_BASE_LAYERS).collect();
    if !base.provenance.is_empty() {
        extra.insert(LABEL_BASE.to_string(), base.provenance.clone());
    }
    let created = img.config.created().clone().unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string());
    let cfg = image::derive_config(&base.config, &BTreeMap::new(), &extra, base.layers.len(), &layers, &created);
    let (cd, cs, _) = out_store.put_blob_bytes(&image::to_bytes(&cfg)).await.map_err(BuildError::from)?;
    let annotations: BTreeMap<String, String> =
        img.manifest.annotations().clone().unwrap_or_default().into_iter().collect();
    let m = image::to_bytes(&image::manifest(&cd, cs, &layers, &annotations));
    let published = publisher
        .publish_manifests(&[(tag.clone(), m, layers, vec![tag])])
        .await
        .map_err(|e: StoreError| BuildError::from(e))?;
    Ok(published.into_iter().next().map(|(_, d, _)| d).unwrap_or_else(|| Digest::of(b"")))
}
