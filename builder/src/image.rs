//! Image configs and manifests as JSON, written deterministically (sorted keys, no
//! timestamps other than the spec's fixed mtime), so the same inputs give the same
//! digests.

use crate::spec::Spec;
use oci_core::digest::Digest;
use oci_core::media;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// Label on every config: how many of its layers came from the base image (for rebase).
pub const LABEL_BASE_LAYERS: &str = "org.wikimedia.mwbuild.base-layers";
/// Label on every config: the base image reference and manifest digest.
pub const LABEL_BASE: &str = "org.wikimedia.mwbuild.base";
/// Label on every config: the MediaWiki versions the image carries, comma-separated.
pub const LABEL_VERSIONS: &str = "org.wikimedia.mwbuild.versions";

/// The well-known empty JSON blob (`{}`) used as an artifact's config.
pub const EMPTY_JSON: &[u8] = b"{}";
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDesc {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    pub diff_id: Digest,
    pub annotations: BTreeMap<String, String>,
}

impl LayerDesc {
    pub fn descriptor(&self) -> Value {
        let mut d = json!({ "mediaType": self.media_type, "digest": self.digest.to_string(), "size": self.size });
        if !self.annotations.is_empty() {
            d["annotations"] = json!(self.annotations);
        }
        d
    }
}

/// Map Docker layer media types to their OCI equivalents (same bytes); refuse others.
pub fn oci_layer_media_type(mt: &str) -> Option<&'static str> {
    match mt {
        media::OCI_LAYER_TAR | media::DOCKER_LAYER_TAR => Some(media::OCI_LAYER_TAR),
        media::OCI_LAYER_GZIP | media::DOCKER_LAYER_GZIP => Some(media::OCI_LAYER_GZIP),
        media::OCI_LAYER_ZSTD => Some(media::OCI_LAYER_ZSTD),
        _ => None,
    }
}

/// An empty config for `base.image = "scratch"`.
pub fn scratch_config(platform: &(String, String)) -> Value {
    json!({
        "architecture": platform.1,
        "os": platform.0,
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [] },
    })
}

/// Derive an image config from the base config: the base's settings, its layers' DiffIDs
/// followed by ours, our labels, a fixed `created`.
pub fn derive_config(
    base: &Value,
    spec_labels: &BTreeMap<String, String>,
    extra_labels: &BTreeMap<String, String>,
    base_layers: usize,
    layers: &[LayerDesc],
    created: &str,
) -> Value {
    let mut cfg = base.clone();
    let Some(obj) = cfg.as_object_mut() else { return cfg };
    let diff_ids: Vec<Value> = layers.iter().map(|l| Value::String(l.diff_id.to_string())).collect();
    obj.insert("rootfs".into(), json!({ "type": "layers", "diff_ids": diff_ids }));
    obj.insert("created".into(), Value::String(created.to_string()));
    // History must have one non-empty entry per layer; extend it only if the base had one.
    if let Some(Value::Array(h)) = obj.get_mut("history") {
        for l in &layers[base_layers..] {
            let comp = l.annotations.get(media::ANNOTATION_COMPONENT).cloned().unwrap_or_default();
            h.push(json!({ "created": created, "created_by": format!("mwbuild: {comp}") }));
        }
    }
    let inner = obj.entry("config").or_insert_with(|| Value::Object(Map::new()));
    if let Some(inner) = inner.as_object_mut() {
        let labels = inner.entry("Labels").or_insert_with(|| Value::Object(Map::new()));
        if !labels.is_object() {
            *labels = Value::Object(Map::new());
        }
        if let Some(labels) = labels.as_object_mut() {
            for (k, v) in spec_labels.iter().chain(extra_labels) {
                labels.insert(k.clone(), Value::String(v.clone()));
            }
            labels.insert(LABEL_BASE_LAYERS.into(), Value::String(base_layers.to_string()));
        }
    }
    cfg
}

pub fn manifest(
    config_digest: &Digest,
    config_size: u64,
    layers: &[LayerDesc],
    annotations: &BTreeMap<String, String>,
) -> Value {
    let mut m = json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": { "mediaType": media::OCI_CONFIG, "digest": config_digest.to_string(), "size": config_size },
        "layers": layers.iter().map(LayerDesc::descriptor).collect::<Vec<_>>(),
    });
    if !annotations.is_empty() {
        m["annotations"] = json!(annotations);
    }
    m
}

/// An artifact manifest holding the tables of contents of an image's layers, with the
/// image as its subject (OCI 1.1 referrers).
pub fn toc_artifact(subject_digest: &Digest, subject_size: u64, tocs: &[(Digest, u64)]) -> Value {
    json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "artifactType": media::TOC_MEDIA_TYPE,
        "config": { "mediaType": EMPTY_MEDIA_TYPE, "digest": Digest::of(EMPTY_JSON).to_string(), "size": EMPTY_JSON.len() },
        "layers": tocs.iter().map(|(d, s)| json!({ "mediaType": media::TOC_MEDIA_TYPE, "digest": d.to_string(), "size": s })).collect::<Vec<_>>(),
        "subject": { "mediaType": media::OCI_MANIFEST, "digest": subject_digest.to_string(), "size": subject_size },
    })
}

/// The referrers tag-schema index pointing at an artifact (for registries without the
/// referrers API): tagged `sha256-<hex of the subject>`.
pub fn referrers_index(artifact_digest: &Digest, artifact_size: u64) -> Value {
    json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": [{
            "mediaType": media::OCI_MANIFEST,
            "digest": artifact_digest.to_string(),
            "size": artifact_size,
            "artifactType": media::TOC_MEDIA_TYPE,
        }],
    })
}

pub fn referrers_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

/// RFC 3339 form of the spec's fixed mtime.
pub fn created(spec: &Spec) -> String {
    time::OffsetDateTime::from_unix_timestamp(spec.ownership.mtime as i64)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string())
}

pub fn to_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}
