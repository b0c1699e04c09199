//! Image references in skopeo's transport syntax:
//!
//! * `oci:<dir>[:<tag>]` — an OCI image layout directory (also `oci:<dir>@sha256:…`);
//! * `docker://<host>[:<port>]/<repo>[:<tag>|@<digest>]` — a registry speaking the OCI
//!   distribution API.

use crate::digest::Digest;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => write!(f, "{d}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    Layout { dir: PathBuf, reference: Option<Reference> },
    Registry { host: String, repo: String, reference: Option<Reference> },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RefError {
    #[error(
        "image reference {0:?} has no transport; write oci:<dir>[:<tag>] or docker://<host>/<repo>[:<tag>|@<digest>]"
    )]
    NoTransport(String),
    #[error("image reference {0:?} uses an unknown transport; only oci: and docker:// are supported")]
    UnknownTransport(String),
    #[error("image reference {reference:?}: {why}")]
    Invalid { reference: String, why: String },
}

fn invalid(reference: &str, why: impl Into<String>) -> RefError {
    RefError::Invalid { reference: reference.to_string(), why: why.into() }
}

/// A tag as the distribution spec allows it: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// A repository path: lowercase components separated by `/`.
fn valid_repo(repo: &str) -> bool {
    !repo.is_empty()
        && repo.split('/').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
                && c.as_bytes()[0].is_ascii_alphanumeric()
                && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric()
        })
}

fn parse_reference(full: &str, r: &str) -> Result<Reference, RefError> {
    if r.starts_with("sha256:") || r.contains(':') {
        return r.parse::<Digest>().map(Reference::Digest).map_err(|e| invalid(full, e.to_string()));
    }
    if !valid_tag(r) {
        return Err(invalid(full, format!("{r:?} is not a valid tag (letters, digits, '.', '_', '-'; at most 128)")));
    }
    Ok(Reference::Tag(r.to_string()))
}

impl FromStr for ImageRef {
    type Err = RefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("oci:") {
            if rest.is_empty() {
                return Err(invalid(s, "the layout directory is missing"));
            }
            // oci:<dir>@sha256:<hex>
            if let Some((dir, d)) = rest.rsplit_once('@') {
                if d.starts_with("sha256:") {
                    let d = parse_reference(s, d)?;
                    return Ok(ImageRef::Layout { dir: PathBuf::from(dir), reference: Some(d) });
                }
            }
            // oci:<dir>:<tag>; a colon followed by a path separator belongs to the path.
            if let Some((dir, tag)) = rest.rsplit_once(':') {
                if !tag.contains('/') && !dir.is_empty() {
                    if tag.is_empty() {
                        return Ok(ImageRef::Layout { dir: PathBuf::from(dir), reference: None });
                    }
                    let r = parse_reference(s, tag)?;
                    return Ok(ImageRef::Layout { dir: PathBuf::from(dir), reference: Some(r) });
                }
            }
            return Ok(ImageRef::Layout { dir: PathBuf::from(rest), reference: None });
        }
        if let Some(rest) = s.strip_prefix("docker://") {
            let Some((host, path)) = rest.split_once('/') else {
                return Err(invalid(s, "expected docker://<host>[:<port>]/<repo>"));
            };
            let host_ok = host == "localhost" || host.contains('.') || host.contains(':');
            if !host_ok || host.is_empty() {
                return Err(invalid(s, format!("{host:?} is not a registry host; name it explicitly, e.g. docker://registry.example.org/{rest}")));
            }
            let (repo, reference) = if let Some((repo, d)) = path.split_once('@') {
                (repo, Some(parse_reference(s, d)?))
            } else if let Some((repo, tag)) = path.rsplit_once(':') {
                (repo, Some(parse_reference(s, tag)?))
            } else {
                (path, None)
            };
            if !valid_repo(repo) {
                return Err(invalid(s, format!("{repo:?} is not a valid repository name (lowercase letters, digits, '.', '_', '-', separated by '/')")));
            }
            return Ok(ImageRef::Registry { host: host.to_string(), repo: repo.to_string(), reference });
        }
        if let Some((transport, _)) = s.split_once(':') {
            if !transport.contains('/') && transport.len() > 1 {
                return Err(RefError::UnknownTransport(s.to_string()));
            }
        }
        Err(RefError::NoTransport(s.to_string()))
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Layout { dir, reference } => {
                write!(f, "oci:{}", dir.display())?;
                match reference {
                    Some(Reference::Tag(t)) => write!(f, ":{t}"),
                    Some(Reference::Digest(d)) => write!(f, "@{d}"),
                    None => Ok(()),
                }
            }
            ImageRef::Registry { host, repo, reference } => {
                write!(f, "docker://{host}/{repo}")?;
                match reference {
                    Some(Reference::Tag(t)) => write!(f, ":{t}"),
                    Some(Reference::Digest(d)) => write!(f, "@{d}"),
                    None => Ok(()),
                }
            }
        }
    }
}

impl ImageRef {
    pub fn reference(&self) -> Option<&Reference> {
        match self {
            ImageRef::Layout { reference, .. } | ImageRef::Registry { reference, .. } => reference.as_ref(),
        }
    }

    /// The same location with another tag or digest.
    pub fn with_reference(&self, r: Option<Reference>) -> ImageRef {
        match self.clone() {
            ImageRef::Layout { dir, .. } => ImageRef::Layout { dir, reference: r },
            ImageRef::Registry { host, repo, .. } => ImageRef::Registry { host, repo, reference: r },
        }
    }

    pub fn with_tag(&self, tag: &str) -> ImageRef {
        self.with_reference(Some(Reference::Tag(tag.to_string())))
    }

    /// `host/repo` for registry references (what allow-lists match against).
    pub fn registry_path(&self) -> Option<String> {
        match self {
            ImageRef::Registry { host, repo, .. } => Some(format!("{host}/{repo}")),
            ImageRef::Layout { .. } => None,
        }
    }

    pub fn is_loopback_registry(&self) -> bool {
        match self {
            ImageRef::Registry { host, .. } => {
                let h = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
                h == "localhost" || h == "127.0.0.1" || h == "[::1]" || h.starts_with("127.")
            }
            ImageRef::Layout { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> ImageRef {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn layout_forms() {
        assert_eq!(p("oci:out"), ImageRef::Layout { dir: "out".into(), reference: None });
        assert_eq!(
            p("oci:/tmp/a b/out:1.43.0-wmf.5"),
            ImageRef::Layout { dir: "/tmp/a b/out".into(), reference: Some(Reference::Tag("1.43.0-wmf.5".into())) }
        );
        let d = Digest::of(b"x");
        assert_eq!(
            p(&format!("oci:out@{d}")),
            ImageRef::Layout { dir: "out".into(), reference: Some(Reference::Digest(d)) }
        );
        assert_eq!(p("oci:out:multiversion").to_string(), "oci:out:multiversion");
    }

    #[test]
    fn registry_forms() {
        assert_eq!(
            p("docker://127.0.0.1:5000/mediawiki/multiversion:wmf.5"),
            ImageRef::Registry {
                host: "127.0.0.1:5000".into(),
                repo: "mediawiki/multiversion".into(),
                reference: Some(Reference::Tag("wmf.5".into()))
            }
        );
        let d = Digest::of(b"x");
        let r = p(&format!("docker://docker-registry.wikimedia.org/bookworm@{d}"));
        assert_eq!(r.reference(), Some(&Reference::Digest(d)));
        assert_eq!(r.registry_path().as_deref(), Some("docker-registry.wikimedia.org/bookworm"));
        assert!(p("docker://localhost:5000/x").is_loopback_registry());
        assert!(!p("docker://registry.example.org/x").is_loopback_registry());
    }

    #[test]
    fn bad_references_name_the_problem() {
        for (s, needle) in [
            ("out", "no transport"),
            ("docker-archive:x.tar", "unknown transport"),
            ("docker://ubuntu:22.04", "expected docker://<host>"),
            ("docker://r.example.org/Upper", "not a valid repository"),
            ("docker://r.example.org/x@sha256:abc", "sha256:<64"),
            ("docker://ubuntu/x", "not a registry host"),
            ("oci:", "missing"),
        ] {
            let e = s.parse::<ImageRef>().expect_err(s).to_string();
            assert!(e.contains(needle), "{s}: {e}");
        }
    }
}
