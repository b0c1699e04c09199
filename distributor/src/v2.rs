//! The distribution pull API's paths and response headers, shared by the origin and the
//! agent's mirror.

use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use oci_core::Digest;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum V2Path {
    Manifest { name: String, reference: String },
    Blob { name: String, digest: Digest },
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name.split('/').all(|c| {
            let b = c.as_bytes();
            !b.is_empty()
                && b.iter().all(|&x| x.is_ascii_lowercase() || x.is_ascii_digit() || matches!(x, b'.' | b'_' | b'-'))
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
        })
}

/// Parse what follows `/v2/`: `<name>/manifests/<ref>` or `<name>/blobs/<digest>`.
pub fn parse_path(rest: &str) -> Option<V2Path> {
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        let ok_ref = if reference.contains(':') {
            reference.parse::<Digest>().is_ok()
        } else {
            oci_core::reference::valid_tag(reference)
        };
        return (valid_name(name) && ok_ref)
            .then(|| V2Path::Manifest { name: name.to_string(), reference: reference.to_string() });
    }
    let (name, digest) = rest.rsplit_once("/blobs/")?;
    let digest = digest.parse().ok()?;
    valid_name(name).then(|| V2Path::Blob { name: name.to_string(), digest })
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"))
}

pub fn manifest_response(method: &Method, bytes: &[u8], media_type: &str, digest: &Digest) -> Response {
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, hv(media_type));
    h.insert("docker-content-digest", hv(&digest.to_string()));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    if method == Method::HEAD {
        (StatusCode::OK, h).into_response()
    } else {
        (StatusCode::OK, h, bytes.to_vec()).into_response()
    }
}

/// Headers of a blob response; with `range = [start, end)`, a `206` one.
pub fn blob_headers(digest: &Digest, size: u64, range: Option<(u64, u64)>) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert("docker-content-digest", hv(&digest.to_string()));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    match range {
        Some((s, e)) => {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(e - s));
            h.insert(header::CONTENT_RANGE, hv(&format!("bytes {s}-{}/{size}", e - 1)));
        }
        None => {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let d = Digest::of(b"x");
        assert_eq!(
            parse_path("library/app/manifests/v1"),
            Some(V2Path::Manifest { name: "library/app".into(), reference: "v1".into() })
        );
        assert_eq!(parse_path(&format!("/a/blobs/{d}")), Some(V2Path::Blob { name: "a".into(), digest: d.clone() }));
        assert!(parse_path(&format!("a/manifests/{d}")).is_some());
        for bad in
            ["a/manifests/../x", "A/manifests/v1", "a/blobs/sha256:00", "a/tags/list", "/manifests/v1", "a/blobs/"]
        {
            assert_eq!(parse_path(bad), None, "{bad}");
        }
    }
}
