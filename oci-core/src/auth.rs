//! Registry credentials and authentication challenges.
//!
//! * [`AuthConfig`] reads credentials from a docker `config.json` / containers `auth.json`
//!   (`auths.<host>.auth` = base64 `user:pass`, or `username`/`password`), looking where
//!   docker, podman and skopeo look.
//! * [`parse_www_authenticate`] parses `WWW-Authenticate` headers (RFC 7235 challenges
//!   with quoted-string parameters, several challenges per header).
//!
//! Credentials never appear in `Debug` output, logs or error messages.

use base64::Engine as _;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A user name and password for one registry (or namespace of one).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    password: String,
}

impl Credentials {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials { username: username.into(), password: password.into() }
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// The value of an `Authorization: Basic …` header.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error(
        "cannot read registry auth file {path}; fix its permissions or point --authfile / REGISTRY_AUTH_FILE elsewhere"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("registry auth file {path} is not valid JSON; fix or remove it (`skopeo login` rewrites it)")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("registry auth file {path}: entry {key:?}: {why}; fix the entry or log in again with `skopeo login`")]
    Entry { path: PathBuf, key: String, why: String },
}

/// Where a lookup looked; used to explain a refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthSource {
    pub path: PathBuf,
    pub present: bool,
}

/// Credentials from every auth file consulted, first file first.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    sources: Vec<AuthSource>,
    /// `(normalized key, credentials, file)`, in lookup order.
    entries: Vec<(String, Credentials, PathBuf)>,
}

/// The files consulted, in order. An explicit file (option or `$REGISTRY_AUTH_FILE`) is the
/// only one consulted; otherwise docker's config then the containers auth file.
pub fn auth_file_candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(p) = explicit {
        return vec![p.to_path_buf()];
    }
    if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE").filter(|v| !v.is_empty()) {
        return vec![PathBuf::from(p)];
    }
    let mut v = Vec::new();
    if let Some(d) = std::env::var_os("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
        v.push(PathBuf::from(d).join("config.json"));
    } else if let Some(home) = dirs::home_dir() {
        v.push(home.join(".docker/config.json"));
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        v.push(PathBuf::from(d).join("containers/auth.json"));
    }
    v
}

impl AuthConfig {
    /// Read the auth files (see [`auth_file_candidates`]). Missing files are skipped; an
    /// unreadable or malformed one is an error naming it.
    pub fn load(explicit: Option<&Path>) -> Result<Self, CredentialsError> {
        let mut cfg = AuthConfig::default();
        for path in auth_file_candidates(explicit) {
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    cfg.sources.push(AuthSource { path, present: false });
                    continue;
                }
                Err(source) => return Err(CredentialsError::Read { path, source }),
            };
            cfg.add_json(&path, &text)?;
            cfg.sources.push(AuthSource { path, present: true });
        }
        Ok(cfg)
    }

    /// Parse the text of one auth file (as read from `path`) and add its entries.
    pub fn add_json(&mut self, path: &Path, text: &str) -> Result<(), CredentialsError> {
        #[derive(serde::Deserialize)]
        struct File {
            #[serde(default)]
            auths: BTreeMap<String, Entry>,
        }
        #[derive(serde::Deserialize)]
        struct Entry {
            auth: Option<String>,
            username: Option<String>,
            password: Option<String>,
        }
        let file: File =
            serde_json::from_str(text).map_err(|source| CredentialsError::Json { path: path.to_path_buf(), source })?;
        let bad = |key: &str, why: &str| CredentialsError::Entry {
            path: path.to_path_buf(),
            key: key.to_string(),
            why: why.to_string(),
        };
        for (key, e) in file.auths {
            let creds = match (e.auth.as_deref().filter(|a| !a.is_empty()), e.username, e.password) {
                (Some(auth), _, _) => {
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .map_err(|_| bad(&key, "\"auth\" is not base64"))?;
                    let raw = String::from_utf8(raw).map_err(|_| bad(&key, "\"auth\" is not UTF-8"))?;
                    let (u, p) =
                        raw.split_once(':').ok_or_else(|| bad(&key, "\"auth\" does not decode to user:password"))?;
                    Credentials::new(u, p)
                }
                (None, Some(u), Some(p)) if !u.is_empty() => Credentials::new(u, p),
                // identitytoken-only or empty entries: nothing we can use.
                _ => continue,
            };
            self.entries.push((normalize_key(&key), creds, path.to_path_buf()));
        }
        Ok(())
    }

    /// Credentials for `repo` on `host`: the most specific `host/namespace` entry wins, then
    /// the plain host entry; earlier files win over later ones. Returns the file too.
    pub fn lookup(&self, host: &str, repo: &str) -> Option<(&Credentials, &Path)> {
        let hosts: Vec<&str> = match host {
            "docker.io" | "registry-1.docker.io" | "index.docker.io" => {
                vec!["docker.io", "registry-1.docker.io", "index.docker.io"]
            }
            h => vec![h],
        };
        let mut best: Option<(usize, &Credentials, &Path)> = None;
        for (key, creds, path) in &self.entries {
            let (khost, kpath) = key.split_once('/').unwrap_or((key.as_str(), ""));
            if !hosts.contains(&khost) {
                continue;
            }
            let specificity = if kpath.is_empty() {
                0
            } else if repo == kpath || repo.starts_with(&format!("{kpath}/")) {
                kpath.len()
            } else {
                continue;
            };
            if best.as_ref().is_none_or(|(s, _, _)| specificity > *s) {
                best = Some((specificity, creds, path));
            }
        }
        best.map(|(_, c, p)| (c, p))
    }

    /// The files consulted (present or not), for error messages.
    pub fn sources(&self) -> &[AuthSource] {
        &self.sources
    }

    /// A short human description of where credentials were looked for.
    pub fn describe_sources(&self) -> String {
        if self.sources.is_empty() {
            return "no auth file location is known (no HOME, DOCKER_CONFIG or XDG_RUNTIME_DIR)".to_string();
        }
        self.sources
            .iter()
            .map(|s| format!("{}{}", s.path.display(), if s.present { "" } else { " (missing)" }))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `https://host/v1/` → `host`; `host/ns/` → `host/ns`.
fn normalize_key(key: &str) -> String {
    let k = key.trim();
    let k = k.strip_prefix("https://").or_else(|| k.strip_prefix("http://")).unwrap_or(k);
    let k = k.trim_end_matches('/');
    let k = k.strip_suffix("/v1").or_else(|| k.strip_suffix("/v2")).unwrap_or(k);
    k.to_ascii_lowercase()
}

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lowercased scheme: `bearer`, `basic`, ….
    pub scheme: String,
    /// Parameters with lowercased names.
    pub params: BTreeMap<String, String>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed WWW-Authenticate header at byte {at}: {why}")]
pub struct ChallengeError {
    pub at: usize,
    pub why: &'static str,
}

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn skip_ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t') {
            self.i += 1;
        }
    }
    fn skip_ws_commas(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b',') {
            self.i += 1;
        }
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn token(&mut self) -> &str {
        let start = self.i;
        while self.i < self.s.len() && is_tchar(self.s[self.i]) {
            self.i += 1;
        }
        std::str::from_utf8(&self.s[start..self.i]).unwrap_or("")
    }
    fn err(&self, why: &'static str) -> ChallengeError {
        ChallengeError { at: self.i, why }
    }
    fn quoted(&mut self) -> Result<String, ChallengeError> {
        // at the opening quote
        self.i += 1;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None => return Err(self.err("unterminated quoted string")),
                Some(b'"') => {
                    self.i += 1;
                    break;
                }
                Some(b'\\') => {
                    self.i += 1;
                    let c = self.peek().ok_or_else(|| self.err("unterminated quoted string"))?;
                    out.push(c);
                    self.i += 1;
                }
                Some(c) => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|_| self.err("quoted string is not UTF-8"))
    }
}

/// Parse one `WWW-Authenticate` header value into its challenges, e.g.
/// `Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push"`.
pub fn parse_www_authenticate(header: &str) -> Result<Vec<Challenge>, ChallengeError> {
    let mut c = Cursor { s: header.as_bytes(), i: 0 };
    let mut out: Vec<Challenge> = Vec::new();
    c.skip_ws_commas();
    while c.peek().is_some() {
        let scheme = c.token().to_ascii_lowercase();
        if scheme.is_empty() {
            return Err(c.err("expected an authentication scheme"));
        }
        let mut ch = Challenge { scheme, params: BTreeMap::new() };
        c.skip_ws();
        // Parameters until the next scheme (a token not followed by '=').
        loop {
            c.skip_ws_commas();
            let save = c.i;
            let name = c.token().to_ascii_lowercase();
            if name.is_empty() {
                if c.peek().is_some() {
                    return Err(c.err("expected a parameter name"));
                }
                break;
            }
            c.skip_ws();
            if c.peek() != Some(b'=') {
                // The next challenge's scheme (token68 credentials are not used by registries).
                c.i = save;
                break;
            }
            c.i += 1;
            c.skip_ws();
            let value = match c.peek() {
                Some(b'"') => c.quoted()?,
                _ => {
                    let start = c.i;
                    while c.i < c.s.len() && (is_tchar(c.s[c.i]) || matches!(c.s[c.i], b'/' | b'=' | b':')) {
                        c.i += 1;
                    }
                    std::str::from_utf8(&c.s[start..c.i]).unwrap_or("").to_string()
                }
            };
            ch.params.insert(name, value);
            c.skip_ws();
            match c.peek() {
                Some(b',') | None => {}
                Some(_) => return Err(c.err("expected ',' after a parameter")),
            }
        }
        out.push(ch);
        c.skip_ws_commas();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(h: &str) -> Challenge {
        let v = parse_www_authenticate(h).unwrap_or_else(|e| panic!("{h}: {e}"));
        assert_eq!(v.len(), 1, "{h}: {v:?}");
        v.into_iter().next().unwrap_or_else(|| unreachable!())
    }

    #[test]
    fn bearer_with_quoted_scope_containing_commas() {
        let c = one(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:samalba/my-app:pull,push""#,
        );
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c.param("service"), Some("registry.docker.io"));
        assert_eq!(c.param("scope"), Some("repository:samalba/my-app:pull,push"));
    }

    #[test]
    fn case_spaces_unquoted_and_escapes() {
        let c = one(
            r#"  BEARER   Realm = "http://127.0.0.1:1/t" ,  Service=reg.example ,error="insufficient_scope", x="a\"b\\c" "#,
        );
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.param("realm"), Some("http://127.0.0.1:1/t"));
        assert_eq!(c.param("service"), Some("reg.example"));
        assert_eq!(c.param("error"), Some("insufficient_scope"));
        assert_eq!(c.param("x"), Some(r#"a"b\c"#));
        assert_eq!(c.param("scope"), None);
    }

    #[test]
    fn basic_and_several_challenges() {
        let c = one(r#"Basic realm="Registry Realm""#);
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.param("realm"), Some("Registry Realm"));
        assert_eq!(one("Basic").scheme, "basic");

        let v = parse_www_authenticate(r#"Basic realm="a, b", Bearer realm="https://t/x",service=s"#).expect("parses");
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].param("realm"), Some("a, b"));
        assert_eq!(v[1].scheme, "bearer");
        assert_eq!(v[1].param("service"), Some("s"));
    }

    #[test]
    fn malformed_headers_are_errors() {
        for bad in [r#"Bearer realm="unterminated"#, r#"Bearer realm="x" junk="#, "=x", r#"Bearer realm="x"y"#] {
            assert!(parse_www_authenticate(bad).is_err(), "{bad} accepted: {:?}", parse_www_authenticate(bad));
        }
        assert_eq!(parse_www_authenticate("").expect("empty is no challenge"), vec![]);
    }

    #[test]
    fn auth_file_forms_and_lookup() {
        let mut cfg = AuthConfig::default();
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3:cret");
        let text = format!(
            r#"{{"auths": {{
                "https://reg.example.org/v1/": {{"auth": "{b64}"}},
                "reg.example.org/team": {{"username": "bob", "password": "pw"}},
                "other.example.org": {{"auth": ""}},
                "https://index.docker.io/v1/": {{"username": "hub", "password": "h"}}
            }}, "credsStore": "desktop"}}"#
        );
        cfg.add_json(Path::new("/x/config.json"), &text).expect("valid file");
        let (c, p) = cfg.lookup("reg.example.org", "mediawiki/x").expect("host entry");
        assert_eq!((c.username.as_str(), c.password()), ("alice", "s3:cret"));
        assert_eq!(p, Path::new("/x/config.json"));
        assert_eq!(cfg.lookup("reg.example.org", "team/app").expect("namespace entry").0.username, "bob");
        assert_eq!(cfg.lookup("reg.example.org", "teamx/app").expect("host entry").0.username, "alice");
        assert!(cfg.lookup("other.example.org", "a").is_none());
        assert_eq!(cfg.lookup("docker.io", "library/debian").expect("hub").0.username, "hub");
        assert!(!format!("{c:?}").contains("s3:cret"));
        assert_eq!(c.basic_header(), format!("Basic {b64}"));
    }

    #[test]
    fn malformed_auth_files_name_the_file() {
        let mut cfg = AuthConfig::default();
        let e = cfg.add_json(Path::new("/x/auth.json"), "{not json").expect_err("bad json");
        assert!(e.to_string().contains("/x/auth.json"), "{e}");
        let e = cfg.add_json(Path::new("/x/auth.json"), r#"{"auths":{"h":{"auth":"!!!"}}}"#).expect_err("bad b64");
        assert!(e.to_string().contains("/x/auth.json") && e.to_string().contains("\"h\""), "{e}");
        let nocolon = base64::engine::general_purpose::STANDARD.encode("justuser");
        let e = cfg
            .add_json(Path::new("/x/auth.json"), &format!(r#"{{"auths":{{"h":{{"auth":"{nocolon}"}}}}}}"#))
            .expect_err("no colon");
        assert!(e.to_string().contains("user:password"), "{e}");
    }

    #[test]
    fn load_reports_missing_and_reads_explicit_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope.json");
        let cfg = AuthConfig::load(Some(&missing)).expect("missing file is fine");
        assert_eq!(cfg.sources(), &[AuthSource { path: missing.clone(), present: false }]);
        assert!(cfg.describe_sources().contains("(missing)"));
        let f = dir.path().join("auth.json");
        std::fs::write(&f, r#"{"auths":{"127.0.0.1:5000":{"username":"u","password":"p"}}}"#).expect("write");
        let cfg = AuthConfig::load(Some(&f)).expect("valid");
        assert_eq!(cfg.lookup("127.0.0.1:5000", "r").expect("entry").0.username, "u");
    }
}
