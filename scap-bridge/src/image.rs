//! Resolving an image reference to a verified manifest, config and layer list.
//!
//! Stricter than `Store::load_image`: every manifest read through an index is checked
//! against the index descriptor's size and media type; a document whose `mediaType` field
//! disagrees with how it was served, or that carries both `manifests` and `layers`, is
//! refused (media type confusion, CVE-2021-41190); config and layer media types must be
//! known; the config's platform must be the one asked for.

use crate::error::{Error, Result};
use oci_core::media::{self, LayerCompression};
use oci_core::reference::{ImageRef, Reference};
use oci_core::registry::ClientOptions;
use oci_core::store::Store;
use oci_core::Digest;
use serde::Deserialize;
use std::collections::BTreeMap;

/// Most layers an image may have.
pub const MAX_LAYERS: usize = 1024;

#[derive(Debug, Clone)]
pub struct LayerRef {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    pub compression: LayerCompression,
    pub diff_id: Digest,
    /// The builder's table of contents: digest and size.
    pub toc: Option<(Digest, u64)>,
}

#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// The reference as given.
    pub reference: String,
    pub manifest_digest: Digest,
    pub manifest_media_type: String,
    pub config_digest: Digest,
    pub labels: BTreeMap<String, String>,
    pub created: Option<String>,
    pub layers: Vec<LayerRef>,
    pub platform: String,
}

#[derive(Deserialize)]
struct Desc {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(rename = "artifactType", default)]
    artifact_type: Option<String>,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize)]
struct Doc {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<u32>,
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    manifests: Option<Vec<Desc>>,
    config: Option<Desc>,
    layers: Option<Vec<Desc>>,
}

#[derive(Deserialize)]
struct Config {
    os: Option<String>,
    architecture: Option<String>,
    variant: Option<String>,
    created: Option<String>,
    config: Option<InnerConfig>,
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct InnerConfig {
    #[serde(rename = "Labels")]
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(rename = "type")]
    typ: String,
    diff_ids: Vec<String>,
}

/// `os/arch[/variant]`.
pub fn parse_platform(s: &str) -> Result<(String, String, Option<String>)> {
    let parts: Vec<&str> = s.split('/').collect();
    match parts.as_slice() {
        [os, arch] if !os.is_empty() && !arch.is_empty() => Ok((os.to_string(), arch.to_string(), None)),
        [os, arch, v] if !os.is_empty() && !arch.is_empty() && !v.is_empty() => {
            Ok((os.to_string(), arch.to_string(), Some(v.to_string())))
        }
        _ => Err(Error::Usage(format!("platform {s:?} is not of the form os/arch[/variant], e.g. linux/amd64"))),
    }
}

/// Open the store an image reference names (never creating anything).
pub fn open_store(r: &ImageRef, opts: &ClientOptions) -> Result<Store> {
    Store::open(r, opts, false).map_err(|source| Error::Store { image: r.to_string(), source: Box::new(source) })
}

/// Resolve `r` to one image manifest for `platform`, verified, with its layers.
pub async fn resolve(store: &Store, r: &ImageRef, platform: &str) -> Result<ResolvedImage> {
    let (os, arch, variant) = parse_platform(platform)?;
    let image = r.to_string();
    let bad = |what: String| Error::Image { image: image.clone(), what };
    let store_err = |source| Error::Store { image: image.clone(), source: Box::new(source) };
    let reference = match r {
        ImageRef::Layout { reference, .. } | ImageRef::Registry { reference, .. } => reference.clone(),
    };
    let mut fetched = store.get_manifest(reference.as_ref()).await.map_err(store_err)?;
    let mut doc =
        parse_doc(&fetched.bytes, &fetched.media_type).map_err(|w| bad(format!("{}: {w}", fetched.digest)))?;
    if let Some(manifests) = doc.manifests.take() {
        let matches = |d: &&Desc| {
            d.artifact_type.is_none()
                && media::is_manifest(&d.media_type)
                && d.platform.as_ref().is_some_and(|p| {
                    p.os == os && p.architecture == arch && (variant.is_none() || p.variant == variant)
                })
        };
        let chosen = manifests
            .iter()
            .find(matches)
            .or_else(|| match manifests.as_slice() {
                [one] if one.platform.is_none() && media::is_manifest(&one.media_type) => Some(one),
                _ => None,
            })
            .ok_or_else(|| {
                bad(format!("index {} has no image for {platform}; choose one with --platform", fetched.digest))
            })?;
        let d: Digest = chosen.digest.parse().map_err(|e| bad(format!("index {}: {e}", fetched.digest)))?;
        let child = store.get_manifest(Some(&Reference::Digest(d.clone()))).await.map_err(store_err)?;
        if child.bytes.len() as u64 != chosen.size {
            return Err(bad(format!("manifest {d} has {} bytes, the index says {}", child.bytes.len(), chosen.size)));
        }
        let chosen_media_type = chosen.media_type.clone();
        doc = parse_doc(&child.bytes, &chosen.media_type).map_err(|w| bad(format!("{d}: {w}")))?;
        if doc.manifests.is_some() {
            return Err(bad(format!("{d}: an index inside an index is not supported")));
        }
        fetched = child;
        fetched.media_type = chosen_media_type;
    }
    let kind = doc.media_type.clone().unwrap_or_else(|| fetched.media_type.clone());
    if !media::is_manifest(&kind) {
        return Err(bad(format!("{} has media type {kind:?}, not an image manifest", fetched.digest)));
    }
    let (Some(config), Some(layers)) = (doc.config, doc.layers) else {
        return Err(bad(format!("manifest {} lacks config or layers", fetched.digest)));
    };
    let docker = kind == media::DOCKER_MANIFEST;
    let config_ok =
        if docker { config.media_type == media::DOCKER_CONFIG } else { config.media_type == media::OCI_CONFIG };
    if !config_ok {
        return Err(bad(format!("config media type {:?} does not belong in a {kind} manifest", config.media_type)));
    }
    let cd: Digest = config.digest.parse().map_err(|e| bad(format!("config: {e}")))?;
    let config_bytes = store.get_blob(&cd, Some(config.size)).await.map_err(store_err)?;
    let cfg: Config = serde_json::from_slice(&config_bytes).map_err(|e| bad(format!("config {cd}: {e}")))?;
    if cfg.rootfs.typ != "layers" {
        return Err(bad(format!("config {cd}: rootfs type {:?} is not \"layers\"", cfg.rootfs.typ)));
    }
    let (cos, carch) = (cfg.os.clone().unwrap_or_default(), cfg.architecture.clone().unwrap_or_default());
    if cos != os || carch != arch || (variant.is_some() && cfg.variant != variant) {
        return Err(bad(format!("the image is for {cos}/{carch}, not {platform}; choose with --platform")));
    }
    if layers.len() != cfg.rootfs.diff_ids.len() {
        return Err(bad(format!(
            "the manifest has {} layers but the config lists {} DiffIDs",
            layers.len(),
            cfg.rootfs.diff_ids.len()
        )));
    }
    if layers.len() > MAX_LAYERS {
        return Err(bad(format!("{} layers is more than the {MAX_LAYERS} allowed", layers.len())));
    }
    let mut out = Vec::with_capacity(layers.len());
    for (i, (l, diff)) in layers.iter().zip(&cfg.rootfs.diff_ids).enumerate() {
        let compression = media::layer_compression(&l.media_type)
            .ok_or_else(|| bad(format!("layer {i} has unsupported media type {:?}", l.media_type)))?;
        let digest: Digest = l.digest.parse().map_err(|e| bad(format!("layer {i}: {e}")))?;
        let diff_id: Digest = diff.parse().map_err(|e| bad(format!("DiffID {i}: {e}")))?;
        let toc = match (l.annotations.get(media::ANNOTATION_TOC_DIGEST), l.annotations.get(media::ANNOTATION_TOC_SIZE))
        {
            (Some(d), Some(s)) => Some((
                d.parse::<Digest>().map_err(|e| bad(format!("layer {i} TOC: {e}")))?,
                s.parse::<u64>().map_err(|e| bad(format!("layer {i} TOC size: {e}")))?,
            )),
            (None, None) => None,
            _ => return Err(bad(format!("layer {i}: TOC digest and size annotations must come together"))),
        };
        out.push(LayerRef { digest, size: l.size, media_type: l.media_type.clone(), compression, diff_id, toc });
    }
    Ok(ResolvedImage {
        reference: image.clone(),
        manifest_digest: fetched.digest,
        manifest_media_type: kind,
        config_digest: cd,
        labels: cfg.config.and_then(|c| c.labels).unwrap_or_default(),
        created: cfg.created,
        layers: out,
        platform: platform.to_string(),
    })
}

/// Parse a manifest or index and check that what it says it is agrees with how it was
/// served and with its shape.
fn parse_doc(bytes: &[u8], served_as: &str) -> std::result::Result<Doc, String> {
    let doc: Doc = serde_json::from_slice(bytes).map_err(|e| format!("not a manifest or index: {e}"))?;
    if doc.schema_version != Some(2) {
        return Err("schemaVersion is not 2".into());
    }
    if doc.manifests.is_some() && (doc.layers.is_some() || doc.config.is_some()) {
        return Err("the document is both an index and a manifest".into());
    }
    let own = doc.media_type.as_deref();
    let served_known = media::is_index(served_as) || media::is_manifest(served_as);
    if let Some(own) = own {
        if served_known && own != served_as {
            return Err(format!("its mediaType {own:?} disagrees with {served_as:?}"));
        }
    }
    let kind = own.unwrap_or(served_as);
    let is_index_doc = doc.manifests.is_some();
    if (is_index_doc && media::is_manifest(kind)) || (!is_index_doc && media::is_index(kind)) {
        return Err(format!("its content does not match its media type {kind:?}"));
    }
    if !is_index_doc && own.is_none() && !served_known {
        return Err("no media type".into());
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confusion_is_refused() {
        let both =
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[],"layers":[]}"#;
        assert!(parse_doc(both, media::OCI_INDEX).is_err());
        let m = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"x","digest":"d","size":1},"layers":[]}"#;
        assert!(parse_doc(m, media::OCI_INDEX).is_err());
        assert!(parse_doc(m, media::OCI_MANIFEST).is_ok());
        let idx = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(parse_doc(idx, media::OCI_MANIFEST).is_err());
        assert!(parse_doc(br#"{"schemaVersion":1}"#, media::OCI_MANIFEST).is_err());
        assert!(parse_platform("linux/amd64").is_ok() && parse_platform("linux").is_err());
    }
}
