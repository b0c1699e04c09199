//! Where the origin reads from: a registry (with its credentials, which stay on the
//! origin) or an OCI layout directory. Blobs come as a stream of byte chunks, not
//! verified here (the origin hashes them as they pass).

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt as _;
use oci_core::layout::Layout;
use oci_core::reference::Reference;
use oci_core::registry::{ClientOptions, FetchedManifest, RegistryClient, RegistryError};
use oci_core::Digest;
use tokio::io::AsyncReadExt as _;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0} is not known upstream")]
    NotFound(String),
    #[error("upstream serves only repository {allowed:?}, not {asked:?}")]
    OtherRepo { allowed: String, asked: String },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("upstream layout: {0}")]
    Layout(String),
}

#[derive(Clone, Debug)]
pub enum Upstream {
    Registry { client: RegistryClient, repo: Option<String> },
    Layout(Layout),
}

pub type ChunkStream = BoxStream<'static, Result<Bytes, String>>;

impl Upstream {
    /// `docker://host[/repo]` (without `repo`, any repository the client names) or
    /// `oci:<dir>` (every name maps to the one layout).
    pub fn parse(s: &str, opts: &ClientOptions) -> anyhow::Result<Self> {
        if let Some(rest) = s.strip_prefix("docker://") {
            let (host, repo) = match rest.split_once('/') {
                Some((h, r)) => (h, Some(r.trim_end_matches('/').to_string()).filter(|r| !r.is_empty())),
                None => (rest, None),
            };
            let mut opts = opts.clone();
            if oci_core::registry::is_loopback_host(host) {
                opts.insecure = true;
            }
            Ok(Upstream::Registry { client: RegistryClient::new(host, &opts)?, repo })
        } else if let Some(dir) = s.strip_prefix("oci:") {
            Ok(Upstream::Layout(Layout::open(dir)?))
        } else {
            anyhow::bail!("upstream {s:?} must be docker://host[/repo] or oci:<dir>")
        }
    }

    fn repo<'a>(&'a self, name: &'a str) -> Result<&'a str, UpstreamError> {
        match self {
            Upstream::Registry { repo: Some(r), .. } if r != name => {
                Err(UpstreamError::OtherRepo { allowed: r.clone(), asked: name.to_string() })
            }
            _ => Ok(name),
        }
    }

    pub async fn manifest(&self, name: &str, reference: &str) -> Result<FetchedManifest, UpstreamError> {
        let repo = self.repo(name)?;
        match self {
            Upstream::Registry { client, .. } => Ok(client.get_manifest(repo, reference).await?),
            Upstream::Layout(l) => {
                let r: Reference = if reference.contains(':') {
                    Reference::Digest(reference.parse().map_err(|e| UpstreamError::Layout(format!("{e}")))?)
                } else {
                    Reference::Tag(reference.to_string())
                };
                let store =
                    oci_core::store::Store::Layout { layout: l.clone(), name: format!("oci:{}", l.dir().display()) };
                store.get_manifest(Some(&r)).await.map_err(|e| match e {
                    oci_core::store::StoreError::Layout(oci_core::layout::LayoutError::MissingBlob { .. }) => {
                        UpstreamError::NotFound(reference.to_string())
                    }
                    e => UpstreamError::Layout(e.to_string()),
                })
            }
        }
    }

    /// Open a blob: its size and its bytes.
    pub async fn open_blob(&self, name: &str, d: &Digest) -> Result<(u64, ChunkStream), UpstreamError> {
        let repo = self.repo(name)?;
        match self {
            Upstream::Registry { client, .. } => {
                let resp = client.blob_response(repo, d, None).await.map_err(|e| match e {
                    RegistryError::BlobUnknown { .. } => UpstreamError::NotFound(d.to_string()),
                    e => e.into(),
                })?;
                let size = match resp.content_length() {
                    Some(n) => n,
                    None => client.blob_size(repo, d).await?.ok_or_else(|| UpstreamError::NotFound(d.to_string()))?,
                };
                let s = resp.bytes_stream().map(|r| r.map_err(|e| format!("reading from upstream: {e}")));
                Ok((size, s.boxed()))
            }
            Upstream::Layout(l) => {
                let size = l.blob_size(d).ok_or_else(|| UpstreamError::NotFound(d.to_string()))?;
                let f =
                    tokio::fs::File::open(l.blob_path(d)).await.map_err(|e| UpstreamError::Layout(e.to_string()))?;
                let s = futures_util::stream::try_unfold(f, |mut f| async move {
                    let mut buf = bytes::BytesMut::with_capacity(crate::limit::CHUNK * 4);
                    let n = f.read_buf(&mut buf).await.map_err(|e| format!("reading the layout blob: {e}"))?;
                    Ok(if n == 0 { None } else { Some((buf.freeze(), f)) })
                });
                Ok((size, s.boxed()))
            }
        }
    }
}
