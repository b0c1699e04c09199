//! [`RegistryError`]: everything that can go wrong talking to a registry. Each message
//! names the registry host and the repository, digest or tag concerned, and says what to
//! do; underlying causes are attached as `source`, not repeated in the message.

use crate::auth::{ChallengeError, CredentialsError};
use crate::digest::Digest;
use std::path::PathBuf;

fn s(n: &u32) -> &'static str {
    if *n == 1 {
        ""
    } else {
        "s"
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry host {host:?} is not a valid host[:port] ({why}); write it as e.g. registry.example.org or 127.0.0.1:5000")]
    InvalidHost { host: String, why: String },

    #[error("registry {host}: {name:?} is not a valid {kind}; {hint}")]
    InvalidName { host: String, kind: &'static str, name: String, hint: &'static str },

    #[error("cannot set up an HTTP client for registry {host}; check the system's TLS setup")]
    Client {
        host: String,
        #[source]
        source: reqwest::Error,
    },

    #[error(transparent)]
    Credentials(#[from] CredentialsError),

    #[error("registry {host} unreachable after {attempts} attempt{} ({request}, repository {repo}); check that it is running and that {host} is the right address", s(.attempts))]
    Unreachable {
        host: String,
        repo: String,
        /// `METHOD /path`.
        request: String,
        attempts: u32,
        #[source]
        source: reqwest::Error,
    },

    #[error("request {request} to registry {host} (repository {repo}) could not be sent; this is a bug or an unsupported redirect")]
    Request {
        host: String,
        repo: String,
        request: String,
        #[source]
        source: reqwest::Error,
    },

    #[error("registry {host} kept answering {status} to {request} (repository {repo}) after {attempts} attempt{}{detail}; it is overloaded or failing: try again later or check its logs", s(.attempts))]
    Unavailable { host: String, repo: String, request: String, status: u16, attempts: u32, detail: String },

    #[error("registry {host} refused {action} access to {repo} ({status}): {why}")]
    Unauthorized { host: String, repo: String, action: &'static str, status: u16, why: String },

    #[error("registry {host} sent an unusable WWW-Authenticate header for {repo} ({header:?}); the registry's auth setup is broken")]
    Challenge {
        host: String,
        repo: String,
        header: String,
        #[source]
        source: Option<ChallengeError>,
    },

    #[error("cannot reach the token service {realm} of registry {host} after {attempts} attempt{}; check that it is running and reachable", s(.attempts))]
    TokenUnreachable {
        host: String,
        realm: String,
        attempts: u32,
        #[source]
        source: reqwest::Error,
    },

    #[error("token service {realm} of registry {host} failed for scope {scope:?}: {why}")]
    Token { host: String, realm: String, scope: String, why: String },

    #[error("registry {host} answered {status} to {request} (repository {repo}){detail}; {}", status_hint(*.status))]
    Status { host: String, repo: String, request: String, status: u16, detail: String },

    #[error("registry {host} has no blob {digest} in {repo}; push it first, or check the digest and repository")]
    BlobUnknown { host: String, repo: String, digest: Digest },

    #[error("registry {host} has no manifest {repo}:{reference}; check the tag or digest, or push the image first")]
    ManifestUnknown { host: String, repo: String, reference: String },

    #[error("registry {host} gave {repo}@{reference} with digest {actual}, expected {expected}; its copy is corrupt or something in between altered it: push it again")]
    DigestMismatch { host: String, repo: String, reference: String, expected: Digest, actual: Digest },

    #[error("registry {host}: blob {digest} in {repo} is {actual} bytes, expected {expected}; the descriptor or the registry's copy is wrong")]
    SizeMismatch { host: String, repo: String, digest: Digest, expected: u64, actual: u64 },

    #[error(
        "registry {host}: {what} {repo}@{reference} is larger than the {limit} bytes allowed; refusing to read it"
    )]
    TooLarge { host: String, repo: String, what: &'static str, reference: String, limit: u64 },

    #[error("registry {host} sent an invalid response to {request} (repository {repo}): {why}; it does not follow the OCI distribution API")]
    Protocol { host: String, repo: String, request: String, why: String },

    #[error("lost the connection to registry {host} while {what} (repository {repo}); try again")]
    Transfer {
        host: String,
        repo: String,
        what: String,
        #[source]
        source: reqwest::Error,
    },

    #[error("{what} {path} (registry {host}, repository {repo})")]
    File {
        host: String,
        repo: String,
        path: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },

    #[error("registry {host} did not store blob {digest} in {repo} as pushed: {why}; push it again")]
    Verify { host: String, repo: String, digest: Digest, why: String },

    #[error("pushing blob {digest} to {host}/{repo} failed {attempts} time{}; the last failure is attached", s(.attempts))]
    PushFailed {
        host: String,
        repo: String,
        digest: Digest,
        attempts: u32,
        #[source]
        source: Box<RegistryError>,
    },
}

impl RegistryError {
    /// Whether trying again later may succeed (connection trouble, overload).
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Unreachable { .. }
            | RegistryError::Unavailable { .. }
            | RegistryError::Transfer { .. }
            | RegistryError::TokenUnreachable { .. } => true,
            RegistryError::Status { status, .. } => *status == 408,
            RegistryError::PushFailed { source, .. } => source.is_transient(),
            _ => false,
        }
    }

    /// The HTTP status the registry answered, for errors that come from one.
    pub fn status(&self) -> Option<u16> {
        match self {
            RegistryError::Status { status, .. }
            | RegistryError::Unavailable { status, .. }
            | RegistryError::Unauthorized { status, .. } => Some(*status),
            RegistryError::BlobUnknown { .. } | RegistryError::ManifestUnknown { .. } => Some(404),
            RegistryError::PushFailed { source, .. } => source.status(),
            _ => None,
        }
    }
}

/// What to suggest for an unexpected status.
fn status_hint(status: u16) -> &'static str {
    match status {
        400 => {
            "the registry rejected the request as invalid (for uploads: the content does not match its digest or size)"
        }
        404 => "check the repository name and that the registry serves it",
        405 => "the registry does not allow this operation (it may be read-only, or deletes are disabled)",
        409 | 412 => "the registry refused a conflicting change; try again",
        413 => "the registry refuses content this large",
        416 => "the upload went out of step with the registry; push again",
        _ => "check the registry's logs",
    }
}
