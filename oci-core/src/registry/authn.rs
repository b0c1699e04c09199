//! Registry authentication: which `Authorization` header a request carries, answering
//! `401` challenges (Basic credentials, or Bearer tokens fetched from the challenge's realm
//! with the scopes the request needs, cached per scope until they expire), and explaining
//! a final refusal (which credentials from which file, or none, and how to log in).

use super::error::RegistryError;
use super::transport::{is_loopback_host, lock, read_capped, Inner, Req, Sent};
use crate::auth::{parse_www_authenticate, Challenge};
use reqwest::header::{HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Method, Response, Url};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum AuthState {
    /// No challenge seen yet: send requests anonymously.
    Unknown,
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

pub(super) struct Token {
    value: String,
    valid_until: Instant,
}

impl Inner {
    /// The `Authorization` header to send, if the registry wants one and the URL is ours.
    pub(super) async fn authorization(
        &self,
        req: &Req<'_>,
        extra_scopes: &[String],
        refresh: bool,
    ) -> Result<Option<HeaderValue>, RegistryError> {
        if !self.same_origin(&req.url) {
            return Ok(None);
        }
        let state = lock(&self.state).clone();
        let value = match state {
            AuthState::Unknown => return Ok(None),
            AuthState::Basic => match self.auth.lookup(&self.host, req.repo) {
                Some((c, _)) => c.basic_header(),
                None => return Ok(None),
            },
            AuthState::Bearer { realm, service } => {
                let token = self.bearer_token(req, &realm, service.as_deref(), extra_scopes, refresh).await?;
                format!("Bearer {token}")
            }
        };
        let mut v = HeaderValue::from_str(&value).map_err(|_| RegistryError::Token {
            host: self.host.clone(),
            realm: String::new(),
            scope: req.access.scopes(req.repo).join(" "),
            why: "the credentials or token contain characters not allowed in an HTTP header".into(),
        })?;
        v.set_sensitive(true);
        Ok(Some(v))
    }

    /// React to a 401; `Ok(true)` when the request should be sent again with new credentials.
    pub(super) async fn answer_challenge(
        &self,
        req: &Req<'_>,
        resp: &Response,
        sent_auth: bool,
    ) -> Result<bool, RegistryError> {
        let mut challenges: Vec<Challenge> = Vec::new();
        let mut raw = String::new();
        for h in resp.headers().get_all(WWW_AUTHENTICATE) {
            let text = String::from_utf8_lossy(h.as_bytes()).to_string();
            let parsed = parse_www_authenticate(&text).map_err(|e| RegistryError::Challenge {
                host: self.host.clone(),
                repo: req.repo.to_string(),
                header: text.clone(),
                source: Some(e),
            })?;
            raw = text;
            challenges.extend(parsed);
        }
        if let Some(b) = challenges.iter().find(|c| c.scheme == "bearer") {
            let Some(realm) = b.param("realm").filter(|r| !r.is_empty()) else {
                return Err(RegistryError::Challenge {
                    host: self.host.clone(),
                    repo: req.repo.to_string(),
                    header: raw,
                    source: None,
                });
            };
            *lock(&self.state) =
                AuthState::Bearer { realm: realm.to_string(), service: b.param("service").map(str::to_string) };
            let extra: Vec<String> =
                b.param("scope").map(|s| s.split_whitespace().map(str::to_string).collect()).unwrap_or_default();
            // Fetch a fresh token now so that errors from the token service surface as such.
            self.authorization(req, &extra, true).await?;
            return Ok(true);
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            let was = std::mem::replace(&mut *lock(&self.state), AuthState::Basic);
            let have = self.auth.lookup(&self.host, req.repo).is_some();
            return Ok(have && !(sent_auth && was == AuthState::Basic));
        }
        Ok(false)
    }

    async fn bearer_token(
        &self,
        req: &Req<'_>,
        realm: &str,
        service: Option<&str>,
        extra_scopes: &[String],
        refresh: bool,
    ) -> Result<String, RegistryError> {
        let mut scopes = req.access.scopes(req.repo);
        let key = scopes.join(" ");
        if !refresh {
            if let Some(t) = lock(&self.tokens).get(&key).filter(|t| t.valid_until > Instant::now()) {
                return Ok(t.value.clone());
            }
        }
        for s in extra_scopes {
            if !scopes.contains(s) {
                scopes.push(s.clone());
            }
        }
        let (value, lifetime) = self.fetch_token(req.repo, realm, service, &scopes).await?;
        let valid_until = Instant::now() + lifetime.saturating_sub(Duration::from_secs(10)).max(Duration::from_secs(5));
        lock(&self.tokens).insert(key, Token { value: value.clone(), valid_until });
        Ok(value)
    }

    async fn fetch_token(
        &self,
        repo: &str,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<(String, Duration), RegistryError> {
        let scope = scopes.join(" ");
        let fail = |why: String| RegistryError::Token {
            host: self.host.clone(),
            realm: realm.to_string(),
            scope: scope.clone(),
            why,
        };
        let mut url = Url::parse(realm)
            .map_err(|e| fail(format!("the realm is not a valid URL ({e}); the registry is misconfigured")))?;
        let creds = self.auth.lookup(&self.host, repo);
        let plain = url.scheme() != "https" && !self.opts.insecure && !url.host_str().is_some_and(is_loopback_host);
        if plain && creds.is_some() {
            return Err(fail(
                "the realm is plain HTTP; refusing to send credentials over it (use an https realm, or the insecure option)"
                    .into(),
            ));
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            for s in scopes {
                q.append_pair("scope", s);
            }
            if let Some((c, _)) = creds {
                q.append_pair("account", &c.username);
            }
        }
        let auth = creds.map(|(c, _)| c.basic_header());
        tracing::debug!(host = %self.host, realm, scope, "fetching registry token");
        let sent = self
            .with_retries(self.opts.max_attempts.max(1), &Method::GET, &url, || {
                let mut rb = self.http.get(url.clone());
                if let Some(a) = &auth {
                    let mut v =
                        HeaderValue::from_str(a).map_err(|_| fail("credentials unusable in a header".into()))?;
                    v.set_sensitive(true);
                    rb = rb.header(AUTHORIZATION, v);
                }
                Ok(rb)
            })
            .await?;
        let mut resp = match sent {
            Sent::Answer(r, _) => r,
            Sent::Failed(source, attempts) => {
                return Err(RegistryError::TokenUnreachable {
                    host: self.host.clone(),
                    realm: realm.to_string(),
                    attempts,
                    source,
                })
            }
        };
        let status = resp.status();
        if !status.is_success() {
            let detail = self.detail(&mut resp).await;
            let who = match creds {
                Some((c, p)) => format!("user {} (from {})", c.username, p.display()),
                None => {
                    format!("anonymous access (no credentials for {} in {})", self.host, self.auth.describe_sources())
                }
            };
            let advice = if matches!(status.as_u16(), 401 | 403) {
                format!("it refused {who}; log in with `skopeo login {}`", self.host)
            } else {
                format!("{who}; check the token service's logs")
            };
            return Err(fail(format!("it answered {status}{detail}; {advice}")));
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let body = read_capped(&mut resp, 1 << 20)
            .await
            .map_err(|e| fail(format!("reading its answer failed: {e}")))?
            .ok_or_else(|| fail("its answer is larger than 1 MiB".into()))?;
        let t: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| fail(format!("its answer is not a token JSON object: {e}")))?;
        let value = t
            .token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| fail("its answer has no \"token\"".into()))?;
        Ok((value, Duration::from_secs(t.expires_in.unwrap_or(60).max(60))))
    }

    /// The error for a final 401/403, explaining which credentials were (not) used.
    pub(super) fn refused(&self, req: &Req<'_>, status: u16) -> RegistryError {
        let scopes = req.access.scopes(req.repo).join(" ");
        let creds = self.auth.lookup(&self.host, req.repo);
        let state = lock(&self.state).clone();
        let why = match (creds, status) {
            (None, _) => format!(
                "no credentials for {host} in {files}; log in with `skopeo login {host}` or pass an auth file that has them",
                host = self.host,
                files = self.auth.describe_sources()
            ),
            (Some((c, p)), 403) => format!(
                "user {} (credentials from {}) is not allowed to do this; ask for {scopes} access",
                c.username,
                p.display()
            ),
            (Some((c, p)), _) => match state {
                AuthState::Bearer { realm, .. } => format!(
                    "the token from {realm} for user {} (credentials from {}) does not grant {scopes}; check that user's permissions",
                    c.username,
                    p.display()
                ),
                _ => format!(
                    "the credentials for user {} from {} were rejected; log in again with `skopeo login {}`",
                    c.username,
                    p.display(),
                    self.host
                ),
            },
        };
        RegistryError::Unauthorized {
            host: self.host.clone(),
            repo: req.repo.to_string(),
            action: req.access.action(),
            status,
            why,
        }
    }
}
