//! Sending one request to a registry: building the URL, retrying with exponential backoff
//! and jitter on connection errors, 429 and 5xx, and answering `401` challenges (see
//! [`super::authn`]).

use super::authn::{AuthState, Token};
use super::error::RegistryError;
use super::ClientOptions;
use crate::auth::AuthConfig;
use crate::digest::Digest;
use rand::Rng as _;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, RETRY_AFTER};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Error bodies are read up to this much for their message.
const ERROR_BODY_LIMIT: u64 = 16 << 10;
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(10);
const RETRY_AFTER_CAP: Duration = Duration::from_secs(30);

/// Produces a fresh request body for each attempt.
pub(super) type BodyFn<'a> = &'a (dyn Fn() -> Result<reqwest::Body, RegistryError> + Send + Sync);

/// What a request needs from the registry's access control.
#[derive(Debug, Clone, Copy)]
pub(super) enum Access<'a> {
    Pull,
    Push,
    /// Push to the request's repository, pull from this one.
    Mount(&'a str),
    Delete,
}

impl Access<'_> {
    pub(super) fn scopes(&self, repo: &str) -> Vec<String> {
        match self {
            Access::Pull => vec![format!("repository:{repo}:pull")],
            Access::Push => vec![format!("repository:{repo}:pull,push")],
            Access::Mount(from) => vec![format!("repository:{repo}:pull,push"), format!("repository:{from}:pull")],
            Access::Delete => vec![format!("repository:{repo}:delete")],
        }
    }
    pub(super) fn action(&self) -> &'static str {
        match self {
            Access::Pull => "pull",
            Access::Push | Access::Mount(_) => "push",
            Access::Delete => "delete",
        }
    }
}

pub(super) struct Req<'a> {
    pub method: Method,
    pub url: Url,
    pub repo: &'a str,
    pub access: Access<'a>,
    pub headers: HeaderMap,
    pub body: Option<BodyFn<'a>>,
    /// The blob the request is about, for messages.
    pub blob: Option<&'a Digest>,
    /// Retry on connection errors, 429 and 5xx. Off for uploads, which restart whole.
    pub retry: bool,
}

impl<'a> Req<'a> {
    pub fn new(method: Method, url: Url, repo: &'a str, access: Access<'a>) -> Self {
        Req { method, url, repo, access, headers: HeaderMap::new(), body: None, blob: None, retry: true }
    }
    pub fn about(mut self, d: &'a Digest) -> Self {
        self.blob = Some(d);
        self
    }
    /// `METHOD /path?digest=…` for messages: the query parameters that matter (not the
    /// upload state), and the blob concerned when the URL does not name it.
    pub fn describe(&self) -> String {
        let mut s = format!("{} {}", self.method, self.url.path());
        let keep: Vec<String> = self
            .url
            .query_pairs()
            .filter(|(k, _)| matches!(k.as_ref(), "digest" | "mount" | "from" | "n" | "last"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !keep.is_empty() {
            s.push('?');
            s.push_str(&keep.join("&"));
        }
        if let Some(d) = self.blob {
            if !s.contains(&d.to_string()) {
                s.push_str(&format!(" for blob {d}"));
            }
        }
        s
    }
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }
    pub fn body(mut self, body: BodyFn<'a>) -> Self {
        self.body = Some(body);
        self
    }
    pub fn no_retry(mut self) -> Self {
        self.retry = false;
        self
    }
}

/// The shared state behind a [`super::RegistryClient`].
pub(super) struct Inner {
    pub host: String,
    pub base: Url,
    pub http: reqwest::Client,
    pub opts: ClientOptions,
    pub(super) auth: AuthConfig,
    pub(super) state: Mutex<AuthState>,
    pub(super) tokens: Mutex<HashMap<String, Token>>,
}

/// Either the registry answered (perhaps with a retryable status after the last attempt),
/// or it could not be reached.
pub(super) enum Sent {
    Answer(Response, u32),
    Failed(reqwest::Error, u32),
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(super) fn retryable_status(s: StatusCode) -> bool {
    s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error() && s != StatusCode::NOT_IMPLEMENTED
}

fn retryable_error(e: &reqwest::Error) -> bool {
    !(e.is_builder() || e.is_redirect())
}

/// Exponential backoff with jitter (50–100% of the step), or the server's `Retry-After`.
pub(super) fn backoff(attempt: u32, retry_after: Option<Duration>) -> Duration {
    if let Some(d) = retry_after {
        return d.min(RETRY_AFTER_CAP);
    }
    let step = BACKOFF_BASE.saturating_mul(1u32 << attempt.saturating_sub(1).min(16)).min(BACKOFF_CAP);
    let jitter = rand::thread_rng().gen_range(0.5..=1.0);
    step.mul_f64(jitter)
}

fn retry_after(resp: &Response) -> Option<Duration> {
    let v = resp.headers().get(RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Whether `host` (`name[:port]`) is a loopback address.
pub fn is_loopback_host(host: &str) -> bool {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return ip.is_loopback();
    }
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(h, _)| h)
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `{"errors":[{"code":..,"message":..}]}` → `": CODE: message"`; other bodies → a short excerpt.
fn error_detail(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<E>,
    }
    #[derive(serde::Deserialize)]
    struct E {
        code: Option<String>,
        message: Option<String>,
    }
    if let Ok(e) = serde_json::from_slice::<Errors>(body) {
        let parts: Vec<String> = e
            .errors
            .iter()
            .map(|e| match (&e.code, &e.message) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(x), None) | (None, Some(x)) => x.clone(),
                (None, None) => String::new(),
            })
            .filter(|s| !s.is_empty())
            .collect();
        if !parts.is_empty() {
            return format!(": {}", parts.join("; "));
        }
    }
    let text: String =
        String::from_utf8_lossy(body).chars().map(|c| if c.is_control() { ' ' } else { c }).take(200).collect();
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// Read a body up to `limit` bytes; `None` if it is longer.
pub(super) async fn read_capped(resp: &mut Response, limit: u64) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if out.len() as u64 + chunk.len() as u64 > limit {
            return Ok(None);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Some(out))
}

/// A header's value as a `u64` (e.g. `Content-Length`, which `Response::content_length`
/// does not report for `HEAD`).
pub(super) fn header_u64(resp: &Response, name: HeaderName) -> Option<u64> {
    resp.headers().get(name)?.to_str().ok()?.trim().parse().ok()
}

pub(super) fn header_str(resp: &Response, name: &str) -> Option<String> {
    Some(resp.headers().get(name)?.to_str().ok()?.trim().to_string())
}

impl Inner {
    pub fn new(host: &str, opts: &ClientOptions) -> Result<Self, RegistryError> {
        let invalid = |why: &str| RegistryError::InvalidHost { host: host.to_string(), why: why.to_string() };
        if host.is_empty() {
            return Err(invalid("it is empty"));
        }
        if host.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b"/@?#\\".contains(&b)) {
            return Err(invalid("it may not contain '/', '@', '?', '#', '\\' or spaces"));
        }
        let scheme = if opts.insecure || is_loopback_host(host) { "http" } else { "https" };
        let base = Url::parse(&format!("{scheme}://{host}/")).map_err(|e| invalid(&e.to_string()))?;
        if base.host_str().is_none() || base.path() != "/" {
            return Err(invalid("it does not parse as host[:port]"));
        }
        let http = reqwest::Client::builder()
            .user_agent(concat!("oci-core/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(Duration::from_secs(120))
            .pool_idle_timeout(Duration::from_secs(60))
            .danger_accept_invalid_certs(opts.insecure)
            .build()
            .map_err(|source| RegistryError::Client { host: host.to_string(), source })?;
        let auth = AuthConfig::load(opts.auth_file.as_deref())?;
        Ok(Inner {
            host: host.to_string(),
            base,
            http,
            opts: opts.clone(),
            auth,
            state: Mutex::new(AuthState::Unknown),
            tokens: Mutex::new(HashMap::new()),
        })
    }

    /// `base` + `path` (which starts with `/v2/`).
    pub fn url(&self, path: &str) -> Url {
        let mut u = self.base.clone();
        u.set_path(path);
        u
    }

    /// Resolve a `Location` (absolute, or relative to the request URL).
    pub fn resolve(&self, against: &Url, location: &str) -> Option<Url> {
        against.join(location).ok().filter(|u| matches!(u.scheme(), "http" | "https"))
    }

    pub(super) fn same_origin(&self, u: &Url) -> bool {
        u.scheme() == self.base.scheme()
            && u.host_str() == self.base.host_str()
            && u.port_or_known_default() == self.base.port_or_known_default()
    }

    pub async fn send(&self, req: &Req<'_>) -> Result<Response, RegistryError> {
        let mut challenged = false;
        loop {
            let auth = self.authorization(req, &[], false).await?;
            let resp = self.send_retrying(req, auth.as_ref()).await?;
            match resp.status() {
                StatusCode::UNAUTHORIZED if !challenged => {
                    challenged = true;
                    if self.answer_challenge(req, &resp, auth.is_some()).await? {
                        continue;
                    }
                    return Err(self.refused(req, 401));
                }
                StatusCode::UNAUTHORIZED => return Err(self.refused(req, 401)),
                StatusCode::FORBIDDEN => return Err(self.refused(req, 403)),
                _ => return Ok(resp),
            }
        }
    }

    /// Send with retries; an unreachable registry or a persistent 429/5xx is an error.
    async fn send_retrying(&self, req: &Req<'_>, auth: Option<&HeaderValue>) -> Result<Response, RegistryError> {
        let max = if req.retry { self.opts.max_attempts.max(1) } else { 1 };
        let sent = self
            .with_retries(max, &req.method, &req.url, || {
                let mut rb = self.http.request(req.method.clone(), req.url.clone()).headers(req.headers.clone());
                if let Some(a) = auth {
                    rb = rb.header(AUTHORIZATION, a.clone());
                }
                if let Some(body) = req.body {
                    rb = rb.body(body()?);
                }
                Ok(rb)
            })
            .await?;
        let request = req.describe();
        match sent {
            Sent::Answer(mut resp, attempts) if retryable_status(resp.status()) => {
                let detail = self.detail(&mut resp).await;
                Err(RegistryError::Unavailable {
                    host: self.host.clone(),
                    repo: req.repo.to_string(),
                    request,
                    status: resp.status().as_u16(),
                    attempts,
                    detail,
                })
            }
            Sent::Answer(resp, _) => Ok(resp),
            Sent::Failed(source, attempts) if retryable_error(&source) => Err(RegistryError::Unreachable {
                host: self.host.clone(),
                repo: req.repo.to_string(),
                request,
                attempts,
                source,
            }),
            Sent::Failed(source, _) => {
                Err(RegistryError::Request { host: self.host.clone(), repo: req.repo.to_string(), request, source })
            }
        }
    }

    pub(super) async fn with_retries(
        &self,
        max: u32,
        method: &Method,
        url: &Url,
        make: impl Fn() -> Result<RequestBuilder, RegistryError>,
    ) -> Result<Sent, RegistryError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match make()?.send().await {
                Ok(resp) => {
                    tracing::debug!(host = %self.host, %method, path = url.path(), status = resp.status().as_u16());
                    if !retryable_status(resp.status()) || attempt >= max {
                        return Ok(Sent::Answer(resp, attempt));
                    }
                    let delay = backoff(attempt, retry_after(&resp));
                    tracing::warn!(
                        "registry {}: {method} {} answered {}; retrying in {delay:.1?} (attempt {attempt}/{max})",
                        self.host,
                        url.path(),
                        resp.status()
                    );
                    tokio::time::sleep(delay).await;
                }
                Err(e) => {
                    if !retryable_error(&e) || attempt >= max {
                        return Ok(Sent::Failed(e, attempt));
                    }
                    let delay = backoff(attempt, None);
                    tracing::warn!(
                        "registry {}: {method} {}: {e}; retrying in {delay:.1?} (attempt {attempt}/{max})",
                        self.host,
                        url.path()
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// The registry's explanation of an error answer, as `": …"` (or empty).
    pub async fn detail(&self, resp: &mut Response) -> String {
        match read_capped(resp, ERROR_BODY_LIMIT).await {
            Ok(Some(body)) => error_detail(&body),
            _ => String::new(),
        }
    }

    /// An error for an answer the caller did not expect.
    pub async fn unexpected(&self, req: &Req<'_>, mut resp: Response) -> RegistryError {
        let detail = self.detail(&mut resp).await;
        let status = resp.status().as_u16();
        RegistryError::Status {
            host: self.host.clone(),
            repo: req.repo.to_string(),
            request: req.describe(),
            status,
            detail,
        }
    }

    pub fn protocol(&self, req: &Req<'_>, why: impl Into<String>) -> RegistryError {
        RegistryError::Protocol {
            host: self.host.clone(),
            repo: req.repo.to_string(),
            request: req.describe(),
            why: why.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for h in ["127.0.0.1:5000", "127.1.2.3", "localhost", "LOCALHOST:80", "[::1]:5000", "[::1]", "::1"] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in ["registry.example.org", "10.0.0.1:5000", "[::2]:5000", "localhost.example.org", "128.0.0.1"] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        for attempt in 1..6 {
            let d = backoff(attempt, None);
            let step = BACKOFF_BASE * (1 << (attempt - 1));
            assert!(d >= step / 2 && d <= step, "attempt {attempt}: {d:?}");
        }
        assert!(backoff(40, None) <= BACKOFF_CAP);
        assert_eq!(backoff(1, Some(Duration::from_secs(3))), Duration::from_secs(3));
        assert_eq!(backoff(1, Some(Duration::from_secs(3600))), RETRY_AFTER_CAP);
    }

    #[test]
    fn error_details() {
        let body = br#"{"errors":[{"code":"DIGEST_INVALID","message":"provided digest did not match uploaded content","detail":{}}]}"#;
        assert_eq!(error_detail(body), ": DIGEST_INVALID: provided digest did not match uploaded content");
        assert_eq!(error_detail(b""), "");
        assert_eq!(error_detail(b"<html>\n oops </html>"), ": <html>  oops </html>");
    }

    #[test]
    fn hosts_are_validated() {
        let o = ClientOptions { auth_file: Some("/nonexistent/auth.json".into()), ..ClientOptions::default() };
        for bad in ["", "a/b", "user@host", "host?x", "a b"] {
            assert!(Inner::new(bad, &o).is_err(), "{bad:?}");
        }
        let i = Inner::new("127.0.0.1:5000", &o).expect("loopback");
        assert_eq!(i.base.as_str(), "http://127.0.0.1:5000/");
        let i = Inner::new("registry.example.org", &o).expect("remote");
        assert_eq!(i.base.as_str(), "https://registry.example.org/");
        let i = Inner::new("registry.example.org:8080", &ClientOptions { insecure: true, ..o }).expect("insecure");
        assert_eq!(i.base.as_str(), "http://registry.example.org:8080/");
    }

    #[test]
    fn locations_resolve() {
        let o = ClientOptions { auth_file: Some("/nonexistent/auth.json".into()), ..ClientOptions::default() };
        let i = Inner::new("127.0.0.1:5000", &o).expect("client");
        let req = i.url("/v2/a/blobs/uploads/");
        let rel = i.resolve(&req, "/v2/a/blobs/uploads/u1?_state=xyz").expect("relative");
        assert_eq!(rel.as_str(), "http://127.0.0.1:5000/v2/a/blobs/uploads/u1?_state=xyz");
        let abs = i.resolve(&req, "https://cdn.example.org/up/u2").expect("absolute");
        assert_eq!(abs.as_str(), "https://cdn.example.org/up/u2");
        assert!(!i.same_origin(&abs));
        assert!(i.same_origin(&rel));
        assert!(i.resolve(&req, "ftp://x/y").is_none());
    }
}
