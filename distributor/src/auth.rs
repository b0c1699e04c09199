//! The cluster secret: every peer, tracker and origin request carries
//! `Authorization: Bearer <secret>`; anything else gets `401` and no content.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest as _, Sha256};
use std::sync::Arc;

/// The shared secret, compared in constant time (by comparing SHA-256 digests).
#[derive(Clone)]
pub struct Secret(Arc<str>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    pub fn new(s: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(s.len() >= 16, "the cluster secret must be at least 16 characters");
        Ok(Secret(s.into()))
    }

    pub fn header_value(&self) -> String {
        format!("Bearer {}", self.0)
    }

    pub fn matches(&self, authorization: Option<&str>) -> bool {
        let Some(token) = authorization.and_then(|a| a.strip_prefix("Bearer ")) else { return false };
        let a = Sha256::digest(token.as_bytes());
        let b = Sha256::digest(self.0.as_bytes());
        a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// axum middleware refusing requests without the secret.
pub async fn require(State(secret): State<Secret>, req: Request, next: Next) -> Response {
    let auth = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if secret.matches(auth) {
        next.run(req).await
    } else {
        crate::api::registry_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "the cluster secret is missing or wrong")
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_secret_matches() {
        let s = Secret::new("0123456789abcdef").expect("long enough");
        assert!(s.matches(Some("Bearer 0123456789abcdef")));
        for bad in [None, Some(""), Some("0123456789abcdef"), Some("Bearer 0123456789abcdeF"), Some("Basic x")] {
            assert!(!s.matches(bad), "{bad:?}");
        }
        assert!(Secret::new("short").is_err());
        assert!(!format!("{s:?}").contains("0123"));
    }
}
