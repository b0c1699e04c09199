//! Client for the OCI distribution API (pull and push), over reqwest.
//!
//! * Plain HTTP for loopback hosts or with [`ClientOptions::insecure`]; HTTPS otherwise.
//! * Credentials from docker/podman auth files ([`crate::auth`]); `401` challenges are
//!   answered with Basic credentials or Bearer tokens (cached per scope).
//! * Every request is retried with exponential backoff and jitter on connection errors,
//!   429 and 5xx, up to [`ClientOptions::max_attempts`]; uploads restart from a fresh
//!   session instead.
//! * Everything read is verified against its digest; blobs reach their destination file
//!   only once verified.

mod authn;
mod blobs;
mod error;
mod manifests;
mod transport;

pub use error::RegistryError;
pub use transport::is_loopback_host;

use crate::digest::Digest;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Use plain HTTP for this registry even when it is not on a loopback address, and
    /// accept unverified TLS certificates (token realms, redirects).
    pub insecure: bool,
    /// docker `config.json` with `auths`; default `$REGISTRY_AUTH_FILE`, else
    /// `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`, then
    /// `$XDG_RUNTIME_DIR/containers/auth.json`.
    pub auth_file: Option<PathBuf>,
    /// Attempts per request before giving up (with exponential backoff).
    pub max_attempts: u32,
    /// Blobs up to this size are uploaded in one PUT; larger ones in chunks.
    pub monolithic_limit: u64,
    pub chunk_size: u64,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            insecure: false,
            auth_file: None,
            max_attempts: 5,
            monolithic_limit: 32 << 20,
            chunk_size: 16 << 20,
        }
    }
}

/// What pushing a blob took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobPush {
    /// The repository already had it (HEAD answered 200).
    Existed,
    /// Mounted from another repository of the same registry.
    Mounted,
    /// Uploaded; the bytes sent.
    Uploaded(u64),
}

/// A manifest (or index) as fetched, with its digest verified.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: Digest,
}

/// A client for one registry host. Cheap to clone; clones share connections and tokens.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<transport::Inner>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("host", &self.inner.host)
            .field("base", &self.inner.base.as_str())
            .finish()
    }
}

impl RegistryClient {
    /// A client for `host` (`name[:port]`). Reads the auth files now: a malformed one is
    /// an error here.
    pub fn new(host: &str, opts: &ClientOptions) -> Result<Self, RegistryError> {
        Ok(RegistryClient { inner: Arc::new(transport::Inner::new(host, opts)?) })
    }

    pub fn host(&self) -> &str {
        &self.inner.host
    }

    /// `http://host/` or `https://host/`.
    pub fn base_url(&self) -> &str {
        self.inner.base.as_str()
    }

    fn check_repo(&self, repo: &str) -> Result<(), RegistryError> {
        let ok = !repo.is_empty()
            && repo.len() <= 255
            && repo.split('/').all(|c| {
                let b = c.as_bytes();
                !b.is_empty()
                    && b.iter()
                        .all(|&x| x.is_ascii_lowercase() || x.is_ascii_digit() || matches!(x, b'.' | b'_' | b'-'))
                    && b[0].is_ascii_alphanumeric()
                    && b[b.len() - 1].is_ascii_alphanumeric()
            });
        if ok {
            Ok(())
        } else {
            Err(RegistryError::InvalidName {
                host: self.inner.host.clone(),
                kind: "repository name",
                name: repo.to_string(),
                hint: "use lowercase letters, digits, '.', '_' and '-' in components separated by '/'",
            })
        }
    }

    /// A tag or a digest, checked so that it cannot change the URL's meaning.
    fn check_reference(&self, reference: &str) -> Result<Option<Digest>, RegistryError> {
        if reference.contains(':') {
            return reference.parse::<Digest>().map(Some).map_err(|_| RegistryError::InvalidName {
                host: self.inner.host.clone(),
                kind: "digest",
                name: reference.to_string(),
                hint: "write sha256:<64 lowercase hex digits>",
            });
        }
        if crate::reference::valid_tag(reference) {
            Ok(None)
        } else {
            Err(RegistryError::InvalidName {
                host: self.inner.host.clone(),
                kind: "tag",
                name: reference.to_string(),
                hint: "tags are letters, digits, '.', '_' and '-', at most 128, not starting with '.' or '-'",
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> RegistryClient {
        let o = ClientOptions { auth_file: Some("/nonexistent/auth.json".into()), ..ClientOptions::default() };
        RegistryClient::new("127.0.0.1:5000", &o).expect("client")
    }

    #[test]
    fn names_are_checked_before_they_reach_a_url() {
        let c = client();
        for bad in ["", "A", "a//b", "a/../b", "a?x", "-a", "a b", "a/b/"] {
            assert!(c.check_repo(bad).is_err(), "{bad:?}");
        }
        c.check_repo("mediawiki/multiversion-base").expect("valid repo");
        for bad in ["", "../x", "a/b", ".hidden", "sha256:abc", "x?y"] {
            assert!(c.check_reference(bad).is_err(), "{bad:?}");
        }
        assert_eq!(c.check_reference("1.43.0-wmf.5").expect("tag"), None);
        let d = Digest::of(b"x");
        assert_eq!(c.check_reference(&d.to_string()).expect("digest"), Some(d));
    }

    fn assert_send<T: Send>(_: T) {}

    /// Callers spawn these on a multi-threaded runtime.
    #[test]
    fn futures_are_send() {
        let (c, d, p) = (client(), Digest::of(b""), std::path::Path::new("/x"));
        assert_send(c.blob_size("a", &d));
        assert_send(c.mount_blob("a", "b", &d));
        assert_send(c.push_blob_file("a", p, &d, 0, Some("b")));
        assert_send(c.push_blob_bytes("a", bytes::Bytes::new()));
        assert_send(c.get_blob_bytes("a", &d, 1));
        assert_send(c.fetch_blob_to_file("a", &d, None, p));
        assert_send(c.blob_response("a", &d, None));
        assert_send(c.get_manifest("a", "t"));
        assert_send(c.manifest_digest("a", "t"));
        assert_send(c.put_manifest("a", "t", b"{}", "x"));
        assert_send(c.list_tags("a"));
        assert_send(c.delete_manifest("a", &d));
        assert_send(c.delete_blob("a", &d));
        fn sync_client<T: Send + Sync + Clone>(_: &T) {}
        sync_client(&c);
    }

    #[test]
    fn debug_shows_no_secrets() {
        let s = format!("{:?}", client());
        assert!(s.contains("127.0.0.1:5000"), "{s}");
    }
}
