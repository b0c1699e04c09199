//! Blob operations: existence checks, cross-repository mounts, uploads (monolithic or
//! chunked, streamed from a file or from memory, restarted from a fresh session when
//! interrupted, verified afterwards) and verified downloads.

use super::error::RegistryError;
use super::transport::{backoff, header_str, header_u64, read_capped, Access, Req};
use super::{BlobPush, RegistryClient};
use crate::digest::{Digest, Hasher};
use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RANGE};
use reqwest::{Body, Method, Response, StatusCode, Url};
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OCTET_STREAM: HeaderValue = HeaderValue::from_static("application/octet-stream");
const READ_BUF: usize = 256 << 10;

/// Where the bytes of an upload come from; each attempt reads them anew.
enum Source<'a> {
    File(&'a Path),
    Bytes(&'a Bytes),
}

/// How an upload session started.
enum Started {
    Mounted,
    Session { url: Url, min_chunk: Option<u64> },
}

impl RegistryClient {
    fn blob_url(&self, repo: &str, d: &Digest) -> Url {
        self.inner.url(&format!("/v2/{repo}/blobs/{d}"))
    }

    fn file_err(&self, repo: &str, path: &Path, what: String) -> impl FnOnce(std::io::Error) -> RegistryError {
        let (host, repo, path) = (self.inner.host.clone(), repo.to_string(), path.to_path_buf());
        move |source| RegistryError::File { host, repo, path, what, source }
    }

    /// The size of blob `d` in `repo`, or `None` if the repository does not have it.
    pub async fn blob_size(&self, repo: &str, d: &Digest) -> Result<Option<u64>, RegistryError> {
        self.check_repo(repo)?;
        let req = Req::new(Method::HEAD, self.blob_url(repo, d), repo, Access::Pull);
        let resp = self.inner.send(&req).await?;
        match resp.status() {
            StatusCode::OK => header_u64(&resp, CONTENT_LENGTH)
                .map(Some)
                .ok_or_else(|| self.inner.protocol(&req, format!("HEAD of blob {d} has no Content-Length"))),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self.inner.unexpected(&req, resp).await),
        }
    }

    /// Ask the registry to mount `d` from `from_repo` into `repo`. `false` when it would
    /// not (the upload session it opened instead is cancelled).
    pub async fn mount_blob(&self, repo: &str, from_repo: &str, d: &Digest) -> Result<bool, RegistryError> {
        self.check_repo(repo)?;
        self.check_repo(from_repo)?;
        match self.start_upload(repo, d, Some(from_repo)).await? {
            Started::Mounted => Ok(true),
            Started::Session { url, .. } => {
                self.cancel_upload(repo, url).await;
                Ok(false)
            }
        }
    }

    /// Push the blob in file `path` (which must hold `size` bytes with digest `d`): nothing
    /// if `repo` has it, a mount from `mount_from` if the registry allows, else an upload
    /// streamed from the file. The registry verifies the digest; the result is checked.
    pub async fn push_blob_file(
        &self,
        repo: &str,
        path: &Path,
        d: &Digest,
        size: u64,
        mount_from: Option<&str>,
    ) -> Result<BlobPush, RegistryError> {
        self.check_repo(repo)?;
        self.push(repo, &Source::File(path), d, size, mount_from).await
    }

    async fn check_file(&self, repo: &str, path: &Path, d: &Digest, size: u64) -> Result<(), RegistryError> {
        let meta = tokio::fs::metadata(path).await.map_err(self.file_err(
            repo,
            path,
            format!("cannot read blob {d} to push from"),
        ))?;
        if meta.len() != size {
            return Err(RegistryError::File {
                host: self.inner.host.clone(),
                repo: repo.to_string(),
                path: path.to_path_buf(),
                what: format!("blob {d} should be {size} bytes but is {} bytes in", meta.len()),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, "size differs from the descriptor"),
            });
        }
        Ok(())
    }

    /// Push a blob held in memory; returns its digest.
    pub async fn push_blob_bytes(&self, repo: &str, bytes: Bytes) -> Result<(Digest, BlobPush), RegistryError> {
        self.check_repo(repo)?;
        let d = Digest::of(&bytes);
        let pushed = self.push(repo, &Source::Bytes(&bytes), &d, bytes.len() as u64, None).await?;
        Ok((d, pushed))
    }

    async fn push(
        &self,
        repo: &str,
        src: &Source<'_>,
        d: &Digest,
        size: u64,
        mount_from: Option<&str>,
    ) -> Result<BlobPush, RegistryError> {
        if let Some(have) = self.blob_size(repo, d).await? {
            if have == size {
                return Ok(BlobPush::Existed);
            }
            return Err(RegistryError::SizeMismatch {
                host: self.inner.host.clone(),
                repo: repo.to_string(),
                digest: d.clone(),
                expected: size,
                actual: have,
            });
        }
        let mut session = None;
        if let Some(from) = mount_from.filter(|f| *f != repo) {
            self.check_repo(from)?;
            match self.start_upload(repo, d, Some(from)).await? {
                Started::Mounted => return Ok(BlobPush::Mounted),
                Started::Session { url, min_chunk } => session = Some((url, min_chunk)),
            }
        }
        // Only an upload needs the bytes: a blob that exists or mounts may not be local.
        if let Source::File(path) = src {
            self.check_file(repo, path, d, size).await?;
        }
        let max = self.inner.opts.max_attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (url, min_chunk) = match session.take() {
                Some(s) => s,
                // Failing to start has its own retries: give up if that fails.
                None => match self.start_upload(repo, d, None).await? {
                    Started::Session { url, min_chunk } => (url, min_chunk),
                    // Only reported when a mount was asked for.
                    Started::Mounted => return Ok(BlobPush::Mounted),
                },
            };
            match self.upload(repo, src, d, size, url, min_chunk).await {
                Ok(()) => break,
                Err(e) if attempt < max && restartable(&e) => {
                    let delay = backoff(attempt, None);
                    tracing::warn!(
                        "pushing blob {d} to {}/{repo} failed: {e}; restarting the upload in {delay:.1?} (attempt {attempt}/{max})",
                        self.inner.host
                    );
                    tokio::time::sleep(delay).await;
                }
                Err(e) if attempt > 1 || restartable(&e) => {
                    return Err(RegistryError::PushFailed {
                        host: self.inner.host.clone(),
                        repo: repo.to_string(),
                        digest: d.clone(),
                        attempts: attempt,
                        source: Box::new(e),
                    })
                }
                Err(e) => return Err(e),
            }
        }
        let verify = |why: String| RegistryError::Verify {
            host: self.inner.host.clone(),
            repo: repo.to_string(),
            digest: d.clone(),
            why,
        };
        match self.blob_size(repo, d).await? {
            Some(s) if s == size => Ok(BlobPush::Uploaded(size)),
            Some(s) => Err(verify(format!("it reports {s} bytes, {size} were sent"))),
            None => Err(verify("it does not have the blob after the upload completed".into())),
        }
    }

    /// `POST /v2/<repo>/blobs/uploads/` to upload `d`, optionally asking for a mount.
    async fn start_upload(&self, repo: &str, d: &Digest, mount_from: Option<&str>) -> Result<Started, RegistryError> {
        let mut url = self.inner.url(&format!("/v2/{repo}/blobs/uploads/"));
        let access = match mount_from {
            Some(from) => {
                url.query_pairs_mut().append_pair("mount", &d.to_string()).append_pair("from", from);
                Access::Mount(from)
            }
            None => Access::Push,
        };
        let req =
            Req::new(Method::POST, url, repo, access).about(d).header(CONTENT_LENGTH, HeaderValue::from_static("0"));
        let resp = self.inner.send(&req).await?;
        match resp.status() {
            StatusCode::CREATED if mount_from.is_some() => Ok(Started::Mounted),
            StatusCode::ACCEPTED => {
                let url = self.location(&req, &resp)?;
                let min_chunk = header_u64(&resp, reqwest::header::HeaderName::from_static("oci-chunk-min-length"));
                Ok(Started::Session { url, min_chunk })
            }
            _ => Err(self.inner.unexpected(&req, resp).await),
        }
    }

    fn location(&self, req: &Req<'_>, resp: &Response) -> Result<Url, RegistryError> {
        let loc = header_str(resp, LOCATION.as_str())
            .ok_or_else(|| self.inner.protocol(req, format!("{} without a Location header", resp.status())))?;
        self.inner
            .resolve(resp.url(), &loc)
            .ok_or_else(|| self.inner.protocol(req, format!("Location {loc:?} is not an http(s) URL")))
    }

    /// Abandon an upload session; failures only cost the registry some garbage.
    async fn cancel_upload(&self, repo: &str, url: Url) {
        let req = Req::new(Method::DELETE, url, repo, Access::Push);
        match self.inner.send(&req).await {
            Ok(r) if r.status().is_success() || r.status() == StatusCode::NOT_FOUND => {}
            Ok(r) => {
                tracing::debug!("registry {}: cancelling an upload to {repo} answered {}", self.inner.host, r.status())
            }
            Err(e) => tracing::debug!("registry {}: cancelling an upload to {repo}: {e}", self.inner.host),
        }
    }

    /// Send the bytes into an open session and complete it with `PUT ?digest=`.
    async fn upload(
        &self,
        repo: &str,
        src: &Source<'_>,
        d: &Digest,
        size: u64,
        mut url: Url,
        min_chunk: Option<u64>,
    ) -> Result<(), RegistryError> {
        let opts = &self.inner.opts;
        let mut final_len = size;
        let mut final_body = None;
        if size <= opts.monolithic_limit {
            final_body = Some(0);
        } else {
            let chunk = opts.chunk_size.max(min_chunk.unwrap_or(0)).max(1);
            let mut off = 0;
            while off < size {
                let len = chunk.min(size - off);
                let body = || self.body(repo, src, off, len);
                let range = format!("{off}-{}", off + len - 1);
                let req = Req::new(Method::PATCH, url.clone(), repo, Access::Push)
                    .about(d)
                    .header(CONTENT_TYPE, OCTET_STREAM)
                    .header(CONTENT_LENGTH, HeaderValue::from(len))
                    .header(reqwest::header::CONTENT_RANGE, header_value(&range))
                    .body(&body)
                    .no_retry();
                let resp = self.inner.send(&req).await?;
                if resp.status() != StatusCode::ACCEPTED {
                    return Err(self.inner.unexpected(&req, resp).await);
                }
                if let Some(r) = header_str(&resp, RANGE.as_str()) {
                    let end = r.rsplit_once('-').and_then(|(_, e)| e.parse::<u64>().ok());
                    if end != Some(off + len - 1) {
                        return Err(RegistryError::Status {
                            host: self.inner.host.clone(),
                            repo: repo.to_string(),
                            request: req.describe(),
                            status: 416,
                            detail: format!(": it holds range {r:?} after receiving {range}"),
                        });
                    }
                }
                url = self.location(&req, &resp)?;
                off += len;
            }
            final_len = 0;
        }
        url.query_pairs_mut().append_pair("digest", &d.to_string());
        let body = || match final_body {
            Some(off) => self.body(repo, src, off, size),
            None => Ok(Body::from(Bytes::new())),
        };
        let req = Req::new(Method::PUT, url, repo, Access::Push)
            .about(d)
            .header(CONTENT_TYPE, OCTET_STREAM)
            .header(CONTENT_LENGTH, HeaderValue::from(final_len))
            .body(&body)
            .no_retry();
        let resp = self.inner.send(&req).await?;
        if resp.status() != StatusCode::CREATED {
            return Err(self.inner.unexpected(&req, resp).await);
        }
        if let Some(got) = header_str(&resp, "docker-content-digest").and_then(|h| h.parse::<Digest>().ok()) {
            if &got != d {
                return Err(RegistryError::Verify {
                    host: self.inner.host.clone(),
                    repo: repo.to_string(),
                    digest: d.clone(),
                    why: format!("it reports digest {got} for the upload"),
                });
            }
        }
        Ok(())
    }

    /// `len` bytes from `off` of the source, streamed for files.
    fn body(&self, repo: &str, src: &Source<'_>, off: u64, len: u64) -> Result<Body, RegistryError> {
        match src {
            Source::Bytes(b) => Ok(Body::from(b.slice(off as usize..(off + len) as usize))),
            Source::File(path) => {
                let err = |what: &str| self.file_err(repo, path, what.to_string());
                let mut f = std::fs::File::open(path).map_err(err("cannot open blob file"))?;
                f.seek(SeekFrom::Start(off)).map_err(err("cannot seek in blob file"))?;
                let reader = tokio::fs::File::from_std(f).take(len);
                let stream = futures_util::stream::try_unfold(reader, |mut r| async move {
                    let mut buf = BytesMut::with_capacity(READ_BUF);
                    let n = r.read_buf(&mut buf).await?;
                    Ok::<_, std::io::Error>(if n == 0 { None } else { Some((buf.freeze(), r)) })
                });
                Ok(Body::wrap_stream(stream))
            }
        }
    }

    /// `GET` a blob (following redirects), with an optional byte range `(start, end)`
    /// (end inclusive). The response's status is 200 or 206; the body is not verified.
    pub async fn blob_response(
        &self,
        repo: &str,
        d: &Digest,
        range: Option<(u64, Option<u64>)>,
    ) -> Result<reqwest::Response, RegistryError> {
        self.check_repo(repo)?;
        let mut req = Req::new(Method::GET, self.blob_url(repo, d), repo, Access::Pull);
        if let Some((start, end)) = range {
            let v = match end {
                Some(e) => format!("bytes={start}-{e}"),
                None => format!("bytes={start}-"),
            };
            req = req.header(RANGE, header_value(&v));
        }
        let resp = self.inner.send(&req).await?;
        match resp.status() {
            StatusCode::OK | StatusCode::PARTIAL_CONTENT => Ok(resp),
            StatusCode::NOT_FOUND => Err(self.blob_unknown(repo, d)),
            _ => Err(self.inner.unexpected(&req, resp).await),
        }
    }

    fn blob_unknown(&self, repo: &str, d: &Digest) -> RegistryError {
        RegistryError::BlobUnknown { host: self.inner.host.clone(), repo: repo.to_string(), digest: d.clone() }
    }

    fn too_large(&self, repo: &str, d: &Digest, limit: u64) -> RegistryError {
        RegistryError::TooLarge {
            host: self.inner.host.clone(),
            repo: repo.to_string(),
            what: "blob",
            reference: d.to_string(),
            limit,
        }
    }

    fn transfer(&self, repo: &str, d: &Digest, source: reqwest::Error) -> RegistryError {
        RegistryError::Transfer {
            host: self.inner.host.clone(),
            repo: repo.to_string(),
            what: format!("reading blob {d}"),
            source,
        }
    }

    /// Read a blob of at most `max_size` bytes into memory, verified.
    pub async fn get_blob_bytes(&self, repo: &str, d: &Digest, max_size: u64) -> Result<Vec<u8>, RegistryError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut resp = self.blob_response(repo, d, None).await?;
            if header_u64(&resp, CONTENT_LENGTH).is_some_and(|n| n > max_size) {
                return Err(self.too_large(repo, d, max_size));
            }
            let bytes = match read_capped(&mut resp, max_size).await {
                Ok(Some(b)) => b,
                Ok(None) => return Err(self.too_large(repo, d, max_size)),
                Err(e) if attempt < self.inner.opts.max_attempts => {
                    tracing::warn!("registry {}: reading blob {d} from {repo}: {e}; retrying", self.inner.host);
                    tokio::time::sleep(backoff(attempt, None)).await;
                    continue;
                }
                Err(e) => return Err(self.transfer(repo, d, e)),
            };
            let actual = Digest::of(&bytes);
            if &actual != d {
                return Err(self.mismatch(repo, d, actual));
            }
            return Ok(bytes);
        }
    }

    fn mismatch(&self, repo: &str, d: &Digest, actual: Digest) -> RegistryError {
        RegistryError::DigestMismatch {
            host: self.inner.host.clone(),
            repo: repo.to_string(),
            reference: d.to_string(),
            expected: d.clone(),
            actual,
        }
    }

    /// Download a blob into `dst`: streamed into a temporary file beside it, hashed, and
    /// renamed into place only when digest (and `size`, if given) match. Returns the size.
    pub async fn fetch_blob_to_file(
        &self,
        repo: &str,
        d: &Digest,
        size: Option<u64>,
        dst: &Path,
    ) -> Result<u64, RegistryError> {
        let dir = match dst.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(&dir).map_err(self.file_err(
                repo,
                &dir,
                format!("cannot create a temporary file for blob {d} in"),
            ))?;
            match self.fetch_into(repo, d, size, &tmp).await {
                Ok(n) => {
                    tmp.persist(dst).map_err(|e| {
                        self.file_err(repo, dst, format!("cannot move blob {d} into place at"))(e.error)
                    })?;
                    return Ok(n);
                }
                Err(e @ RegistryError::Transfer { .. }) if attempt < self.inner.opts.max_attempts => {
                    tracing::warn!("{e}; retrying");
                    tokio::time::sleep(backoff(attempt, None)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn fetch_into(
        &self,
        repo: &str,
        d: &Digest,
        size: Option<u64>,
        tmp: &tempfile::NamedTempFile,
    ) -> Result<u64, RegistryError> {
        let mut resp = self.blob_response(repo, d, None).await?;
        let size_err = |actual| RegistryError::SizeMismatch {
            host: self.inner.host.clone(),
            repo: repo.to_string(),
            digest: d.clone(),
            expected: size.unwrap_or(0),
            actual,
        };
        if let (Some(expected), Some(cl)) = (size, header_u64(&resp, CONTENT_LENGTH)) {
            if cl != expected {
                return Err(size_err(cl));
            }
        }
        let werr = |what: &str| self.file_err(repo, tmp.path(), what.to_string());
        let file = tmp.as_file().try_clone().map_err(werr("cannot reopen temporary file"))?;
        let mut file = tokio::io::BufWriter::with_capacity(READ_BUF, tokio::fs::File::from_std(file));
        let mut h = Hasher::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.transfer(repo, d, e))? {
            h.update(&chunk);
            if size.is_some_and(|s| h.len() > s) {
                return Err(size_err(h.len()));
            }
            file.write_all(&chunk).await.map_err(werr("cannot write blob to"))?;
        }
        file.flush().await.map_err(werr("cannot write blob to"))?;
        let (actual, n) = h.finish();
        if size.is_some_and(|s| s != n) {
            return Err(size_err(n));
        }
        if &actual != d {
            return Err(self.mismatch(repo, d, actual));
        }
        Ok(n)
    }

    /// Delete blob `d` from `repo` (the registry must allow deletes). `false` if absent.
    pub async fn delete_blob(&self, repo: &str, d: &Digest) -> Result<bool, RegistryError> {
        self.check_repo(repo)?;
        let req = Req::new(Method::DELETE, self.blob_url(repo, d), repo, Access::Delete);
        let resp = self.inner.send(&req).await?;
        match resp.status() {
            StatusCode::ACCEPTED | StatusCode::OK | StatusCode::NO_CONTENT => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.inner.unexpected(&req, resp).await),
        }
    }
}

/// Errors after which a fresh upload session may succeed: connection trouble, or the
/// session being lost or out of step (registry restarted).
fn restartable(e: &RegistryError) -> bool {
    e.is_transient() || matches!(e, RegistryError::Status { status: 404 | 416, .. })
}

fn header_value(s: &str) -> HeaderValue {
    // Only called with ASCII we formatted ourselves.
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}
