//! Manifests and tags: fetch (bounded, verified), resolve to a digest, store, delete, and
//! list tags following `Link` pagination.

use super::error::RegistryError;
use super::transport::{header_str, header_u64, read_capped, Access, Req};
use super::{FetchedManifest, RegistryClient};
use crate::digest::Digest;
use crate::media;
use reqwest::header::{HeaderValue, ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, LINK};
use reqwest::{Method, StatusCode, Url};

/// Manifests larger than this are refused.
pub const MAX_MANIFEST_BYTES: u64 = 8 << 20;
/// Tag list pages larger than this are refused; at most this many pages are followed.
const MAX_TAGS_PAGE_BYTES: u64 = 8 << 20;
const MAX_TAGS_PAGES: usize = 10_000;

const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";

fn accept() -> HeaderValue {
    HeaderValue::from_static(ACCEPT_MANIFESTS)
}

/// The `rel="next"` target of a `Link` header.
pub(super) fn next_link(header: &str) -> Option<&str> {
    header.split(',').find_map(|part| {
        let (target, params) = part.trim().split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        params
            .split(';')
            .any(|p| {
                let p = p.trim().replace(' ', "");
                p.eq_ignore_ascii_case("rel=\"next\"") || p.eq_ignore_ascii_case("rel=next")
            })
            .then_some(target)
    })
}

impl RegistryClient {
    fn manifest_url(&self, repo: &str, reference: &str) -> Url {
        self.inner.url(&format!("/v2/{repo}/manifests/{reference}"))
    }

    fn manifest_unknown(&self, repo: &str, reference: &str) -> RegistryError {
        RegistryError::ManifestUnknown {
            host: self.inner.host.clone(),
            repo: repo.to_string(),
            reference: reference.to_string(),
        }
    }

    fn manifest_mismatch(&self, repo: &str, reference: &str, expected: &Digest, actual: Digest) -> RegistryError {
        RegistryError::DigestMismatch {
            host: self.inner.host.clone(),
            repo: repo.to_string(),
            reference: reference.to_string(),
            expected: expected.clone(),
            actual,
        }
    }

    /// Fetch a manifest or index by tag or digest; verified against the digest asked for
    /// and against `Docker-Content-Digest` when the registry sends one.
    pub async fn get_manifest(&self, repo: &str, reference: &str) -> Result<FetchedManifest, RegistryError> {
        self.check_repo(repo)?;
        let wanted = self.check_reference(reference)?;
        let req =
            Req::new(Method::GET, self.manifest_url(repo, reference), repo, Access::Pull).header(ACCEPT, accept());
        let mut resp = self.inner.send(&req).await?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Err(self.manifest_unknown(repo, reference)),
            _ => return Err(self.inner.unexpected(&req, resp).await),
        }
        let too_large = || RegistryError::TooLarge {
            host: self.inner.host.clone(),
            repo: repo.to_string(),
            what: "manifest",
            reference: reference.to_string(),
            limit: MAX_MANIFEST_BYTES,
        };
        if header_u64(&resp, CONTENT_LENGTH).is_some_and(|n| n > MAX_MANIFEST_BYTES) {
            return Err(too_large());
        }
        let content_type = header_str(&resp, CONTENT_TYPE.as_str());
        let header_digest = header_str(&resp, "docker-content-digest").and_then(|h| h.parse::<Digest>().ok());
        let bytes = read_capped(&mut resp, MAX_MANIFEST_BYTES)
            .await
            .map_err(|source| RegistryError::Transfer {
                host: self.inner.host.clone(),
                repo: repo.to_string(),
                what: format!("reading manifest {reference}"),
                source,
            })?
            .ok_or_else(too_large)?;
        let digest = Digest::of(&bytes);
        for expected in wanted.iter().chain(header_digest.iter()) {
            if expected != &digest {
                return Err(self.manifest_mismatch(repo, reference, expected, digest));
            }
        }
        let media_type = content_type
            .map(|c| c.split(';').next().unwrap_or("").trim().to_string())
            .filter(|c| {
                !c.is_empty() && !matches!(c.as_str(), "application/json" | "text/plain" | "application/octet-stream")
            })
            .or_else(|| crate::store::sniff_media_type(&bytes))
            .unwrap_or_else(|| media::OCI_MANIFEST.to_string());
        Ok(FetchedManifest { bytes, media_type, digest })
    }

    /// The digest a tag (or digest) resolves to, by `HEAD`; `None` if there is none.
    pub async fn manifest_digest(&self, repo: &str, reference: &str) -> Result<Option<Digest>, RegistryError> {
        self.check_repo(repo)?;
        let wanted = self.check_reference(reference)?;
        let req =
            Req::new(Method::HEAD, self.manifest_url(repo, reference), repo, Access::Pull).header(ACCEPT, accept());
        let resp = self.inner.send(&req).await?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            _ => return Err(self.inner.unexpected(&req, resp).await),
        }
        let header = header_str(&resp, "docker-content-digest").and_then(|h| h.parse::<Digest>().ok());
        match (wanted, header) {
            (Some(w), Some(h)) if w != h => Err(self.manifest_mismatch(repo, reference, &w, h)),
            (_, Some(h)) => Ok(Some(h)),
            (Some(w), None) => Ok(Some(w)),
            // Registries that do not say: fetch and hash.
            (None, None) => match self.get_manifest(repo, reference).await {
                Ok(m) => Ok(Some(m.digest)),
                Err(RegistryError::ManifestUnknown { .. }) => Ok(None),
                Err(e) => Err(e),
            },
        }
    }

    /// Store a manifest under `reference` (a tag, or its own digest). Returns its digest,
    /// computed here and checked against what the registry reports.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<Digest, RegistryError> {
        self.check_repo(repo)?;
        let digest = Digest::of(bytes);
        if let Some(w) = self.check_reference(reference)? {
            if w != digest {
                return Err(RegistryError::InvalidName {
                    host: self.inner.host.clone(),
                    kind: "digest for this manifest",
                    name: reference.to_string(),
                    hint: "a manifest pushed by digest must be pushed under its own digest",
                });
            }
        }
        let ct = HeaderValue::from_str(media_type).map_err(|_| RegistryError::InvalidName {
            host: self.inner.host.clone(),
            kind: "media type",
            name: media_type.to_string(),
            hint: "use a media type such as application/vnd.oci.image.manifest.v1+json",
        })?;
        let payload = bytes::Bytes::copy_from_slice(bytes);
        let body = || Ok(reqwest::Body::from(payload.clone()));
        let req = Req::new(Method::PUT, self.manifest_url(repo, reference), repo, Access::Push)
            .header(CONTENT_TYPE, ct)
            .header(CONTENT_LENGTH, HeaderValue::from(bytes.len()))
            .body(&body);
        let resp = self.inner.send(&req).await?;
        if !matches!(resp.status(), StatusCode::CREATED | StatusCode::OK | StatusCode::ACCEPTED) {
            return Err(self.inner.unexpected(&req, resp).await);
        }
        if let Some(h) = header_str(&resp, "docker-content-digest").and_then(|h| h.parse::<Digest>().ok()) {
            if h != digest {
                return Err(self.manifest_mismatch(repo, reference, &digest, h));
            }
        }
        Ok(digest)
    }

    /// Delete the manifest with digest `d` (and so every tag pointing at it). `false` if
    /// absent. The registry must allow deletes.
    pub async fn delete_manifest(&self, repo: &str, d: &Digest) -> Result<bool, RegistryError> {
        self.check_repo(repo)?;
        let req = Req::new(Method::DELETE, self.manifest_url(repo, &d.to_string()), repo, Access::Delete);
        let resp = self.inner.send(&req).await?;
        match resp.status() {
            StatusCode::ACCEPTED | StatusCode::OK | StatusCode::NO_CONTENT => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.inner.unexpected(&req, resp).await),
        }
    }

    /// All tags of `repo` (empty if the repository does not exist), following pagination.
    pub async fn list_tags(&self, repo: &str) -> Result<Vec<String>, RegistryError> {
        self.list_tags_paged(repo, None).await
    }

    /// [`Self::list_tags`] asking for pages of `page_size` tags (`?n=`).
    pub async fn list_tags_paged(&self, repo: &str, page_size: Option<u32>) -> Result<Vec<String>, RegistryError> {
        #[derive(serde::Deserialize)]
        struct Page {
            tags: Option<Vec<String>>,
        }
        self.check_repo(repo)?;
        let mut url = self.inner.url(&format!("/v2/{repo}/tags/list"));
        if let Some(n) = page_size {
            url.query_pairs_mut().append_pair("n", &n.to_string());
        }
        let mut tags = Vec::new();
        for _ in 0..MAX_TAGS_PAGES {
            let req = Req::new(Method::GET, url.clone(), repo, Access::Pull);
            let mut resp = self.inner.send(&req).await?;
            match resp.status() {
                StatusCode::OK => {}
                StatusCode::NOT_FOUND if tags.is_empty() => return Ok(tags),
                _ => return Err(self.inner.unexpected(&req, resp).await),
            }
            let next = header_str(&resp, LINK.as_str());
            let body = read_capped(&mut resp, MAX_TAGS_PAGE_BYTES)
                .await
                .map_err(|source| RegistryError::Transfer {
                    host: self.inner.host.clone(),
                    repo: repo.to_string(),
                    what: "reading the tag list".into(),
                    source,
                })?
                .ok_or_else(|| self.inner.protocol(&req, "a tag list page is larger than 8 MiB"))?;
            let page: Page = serde_json::from_slice(&body)
                .map_err(|e| self.inner.protocol(&req, format!("the tag list is not valid JSON: {e}")))?;
            tags.extend(page.tags.unwrap_or_default());
            let Some(next) = next.as_deref().and_then(next_link) else {
                return Ok(tags);
            };
            let next_url =
                self.inner.resolve(resp.url(), next).ok_or_else(|| self.inner.protocol(&req, "bad Link header"))?;
            if next_url == url {
                return Err(self.inner.protocol(&req, "the Link header points at the same page"));
            }
            url = next_url;
        }
        Err(self.inner.protocol(
            &Req::new(Method::GET, url, repo, Access::Pull),
            format!("more than {MAX_TAGS_PAGES} pages of tags"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_lists_every_manifest_type() {
        for t in [media::OCI_MANIFEST, media::OCI_INDEX, media::DOCKER_MANIFEST, media::DOCKER_MANIFEST_LIST] {
            assert!(ACCEPT_MANIFESTS.split(", ").any(|a| a.trim() == t), "{t}");
        }
    }

    #[test]
    fn link_headers() {
        assert_eq!(next_link(r#"</v2/r/tags/list?last=b&n=2>; rel="next""#), Some("/v2/r/tags/list?last=b&n=2"));
        assert_eq!(next_link(r#"<https://x/a>; rel="prev", <https://x/b?n=1>; rel=next"#), Some("https://x/b?n=1"));
        assert_eq!(next_link(r#"</a>; rel="prev""#), None);
        assert_eq!(next_link("garbage"), None);
    }
}
