//! The provenance file: what a prepared tree was made from, for scap to read instead of
//! `.git` (which a tree taken from an image does not have).
//!
//! It is `php-<version>/.scap-bridge-provenance.json`, written inside the new tree before
//! the swap, so it always describes exactly the tree it sits in (also after a crash). It
//! holds no timestamp of the run: re-preparing the same image leaves it untouched. Fields:
//!
//! | field | meaning |
//! |---|---|
//! | `schemaVersion` | `1` |
//! | `image` | the image reference as given to `scap-bridge prep` |
//! | `manifestDigest` | digest of the image manifest the tree came from |
//! | `configDigest` | digest of its config |
//! | `platform` | `os/arch` chosen |
//! | `version` | the MediaWiki version (`php-<version>`) |
//! | `path` | the directory of the image that was taken, e.g. `/srv/mediawiki/php-1.43.0-wmf.5` |
//! | `created` | the image's `created` time, if any |
//! | `revision`, `source` | the `org.opencontainers.image.revision` / `.source` labels, if any |
//! | `labels` | every config label |
//! | `layers` | layer digests, in order |

use crate::image::ResolvedImage;
use oci_core::media;
use serde_json::json;

/// Name of the provenance file in the version's directory.
pub const PROVENANCE_FILE: &str = ".scap-bridge-provenance.json";

/// The provenance document for an image (deterministic bytes).
pub fn render(img: &ResolvedImage, version: &str, subpath: &str) -> Vec<u8> {
    let v = json!({
        "schemaVersion": 1,
        "image": img.reference,
        "manifestDigest": img.manifest_digest.to_string(),
        "configDigest": img.config_digest.to_string(),
        "platform": img.platform,
        "version": version,
        "path": format!("/{subpath}"),
        "created": img.created,
        "revision": img.labels.get(media::ANNOTATION_REVISION),
        "source": img.labels.get(media::ANNOTATION_SOURCE),
        "labels": img.labels,
        "layers": img.layers.iter().map(|l| l.digest.to_string()).collect::<Vec<_>>(),
    });
    let mut out = serde_json::to_vec_pretty(&v).unwrap_or_default();
    out.push(b'\n');
    out
}
