//! The Bearer token flow against a real `docker-registry` configured for token auth, with
//! a tiny token service in the test: it checks Basic credentials and issues RS256 JWTs
//! signed by `openssl` with a throwaway certificate the registry trusts.

use base64::Engine as _;
use bytes::Bytes;
use oci_core::media;
use oci_core::registry::{BlobPush, ClientOptions, RegistryClient, RegistryError};
use oci_core::testing::{TestRegistry, TestRegistryOptions, TokenAuth};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

type Res = Result<(), Box<dyn std::error::Error>>;

const SERVICE: &str = "oci-core-test-registry";
const ISSUER: &str = "oci-core-test-issuer";

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

struct TokenService {
    key: PathBuf,
    cert_der_b64: String,
    /// `(user or "-", scopes)` of every token request.
    log: Mutex<Vec<(String, Vec<String>)>>,
}

impl TokenService {
    fn new(dir: &Path) -> Result<Self, Box<dyn std::error::Error>> {
        let (key, cert, der) = (dir.join("key.pem"), dir.join("cert.pem"), dir.join("cert.der"));
        let ok = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=oci-core-test-token"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()?;
        assert!(ok.status.success(), "openssl req: {}", String::from_utf8_lossy(&ok.stderr));
        let ok = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .arg("-out")
            .arg(&der)
            .output()?;
        assert!(ok.status.success(), "openssl x509: {}", String::from_utf8_lossy(&ok.stderr));
        let cert_der_b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&der)?);
        Ok(TokenService { key, cert_der_b64, log: Mutex::new(Vec::new()) })
    }

    fn log(&self) -> Vec<(String, Vec<String>)> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    async fn jwt(&self, user: &str, scopes: &[String]) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
        let access: Vec<serde_json::Value> = scopes
            .iter()
            .filter_map(|s| {
                let mut parts = s.splitn(3, ':');
                let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                // "reader" may only pull.
                let actions: Vec<&str> = actions.split(',').filter(|a| user != "reader" || *a == "pull").collect();
                Some(serde_json::json!({"type": kind, "name": name, "actions": actions}))
            })
            .collect();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5c": [self.cert_der_b64]});
        let claims = serde_json::json!({
            "iss": ISSUER, "sub": user, "aud": SERVICE, "exp": now + 300, "nbf": now - 10, "iat": now,
            "jti": format!("{now}-{}", scopes.join(" ")), "access": access,
        });
        let input = format!("{}.{}", b64url(header.to_string().as_bytes()), b64url(claims.to_string().as_bytes()));
        let mut child = tokio::process::Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(&self.key)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let mut stdin = child.stdin.take().ok_or("no stdin")?;
        stdin.write_all(input.as_bytes()).await?;
        drop(stdin);
        let out = child.wait_with_output().await?;
        if !out.status.success() {
            return Err("openssl dgst failed".into());
        }
        Ok(format!("{input}.{}", b64url(&out.stdout)))
    }

    /// Serve `GET /token?service=..&scope=..` one request per connection.
    async fn serve(self: Arc<Self>, listener: TcpListener) {
        while let Ok((mut conn, _)) = listener.accept().await {
            let me = self.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 65536 {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let (status, body) = me.answer(&String::from_utf8_lossy(&buf)).await;
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(resp.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    }

    async fn answer(&self, head: &str) -> (&'static str, String) {
        let mut lines = head.split("\r\n");
        let target = lines.next().and_then(|l| l.split_whitespace().nth(1)).unwrap_or("/");
        let Ok(url) = reqwest::Url::parse(&format!("http://token{target}")) else {
            return ("400 Bad Request", "{}".into());
        };
        let scopes: Vec<String> = url.query_pairs().filter(|(k, _)| k == "scope").map(|(_, v)| v.to_string()).collect();
        let basic = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            .and_then(|(_, v)| v.trim().strip_prefix("Basic "))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|b| String::from_utf8(b).ok());
        let user = match basic.as_deref().and_then(|b| b.split_once(':')) {
            Some(("bob", "pw")) => "bob",
            Some(("reader", "pw")) => "reader",
            _ => {
                if let Ok(mut l) = self.log.lock() {
                    l.push(("-".into(), scopes));
                }
                return ("401 Unauthorized", r#"{"details":"bad credentials"}"#.into());
            }
        };
        if let Ok(mut l) = self.log.lock() {
            l.push((user.into(), scopes.clone()));
        }
        match self.jwt(user, &scopes).await {
            Ok(t) => ("200 OK", serde_json::json!({"token": t, "expires_in": 300}).to_string()),
            Err(_) => ("500 Internal Server Error", "{}".into()),
        }
    }
}

fn auth_file(dir: &Path, host: &str, user: &str) -> Result<PathBuf, std::io::Error> {
    let p = dir.join(format!("{user}.json"));
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:pw"));
    std::fs::write(&p, serde_json::json!({"auths": {host: {"auth": auth}}}).to_string())?;
    Ok(p)
}

fn client(host: &str, auth: PathBuf) -> Result<RegistryClient, RegistryError> {
    RegistryClient::new(host, &ClientOptions { auth_file: Some(auth), max_attempts: 2, ..ClientOptions::default() })
}

#[tokio::test]
async fn bearer_tokens_from_a_token_service() -> Res {
    let dir = tempfile::tempdir()?;
    let svc = Arc::new(TokenService::new(dir.path())?);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let realm = format!("http://{}/token", listener.local_addr()?);
    tokio::spawn(svc.clone().serve(listener));
    let reg = TestRegistry::start_with(&TestRegistryOptions {
        token_auth: Some(TokenAuth {
            realm,
            service: SERVICE.into(),
            issuer: ISSUER.into(),
            root_cert_bundle: dir.path().join("cert.pem"),
        }),
        ..Default::default()
    })?;
    let host = reg.host();

    let c = client(&host, auth_file(dir.path(), &host, "bob")?)?;
    let (d, p) = c.push_blob_bytes("tok/a", Bytes::from_static(b"layer bytes")).await?;
    assert_eq!(p, BlobPush::Uploaded(11));
    assert_eq!(c.get_blob_bytes("tok/a", &d, 100).await?, b"layer bytes");
    // A mount needs push on the target and pull on the source in one token.
    assert_eq!(c.push_blob_bytes("tok/a", Bytes::from_static(b"layer bytes")).await?.1, BlobPush::Existed);
    let path = dir.path().join("blob");
    std::fs::write(&path, b"layer bytes")?;
    assert_eq!(c.push_blob_file("tok/b", &path, &d, 11, Some("tok/a")).await?, BlobPush::Mounted);
    let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"DIGEST","size":11},"layers":[]}"#;
    let manifest = String::from_utf8_lossy(manifest).replace("DIGEST", &d.to_string());
    let md = c.put_manifest("tok/a", "v1", manifest.as_bytes(), media::OCI_MANIFEST).await?;
    assert_eq!(c.get_manifest("tok/a", "v1").await?.digest, md);
    assert_eq!(c.list_tags("tok/a").await?, ["v1"]);
    assert!(c.delete_manifest("tok/a", &md).await?);

    let log = svc.log();
    eprintln!("token requests: {log:?}");
    assert!(!log.is_empty(), "the token service was never asked");
    assert!(log.iter().all(|(u, _)| u == "bob"), "{log:?}");
    assert!(
        log.iter().any(|(_, s)| s.contains(&"repository:tok/b:pull,push".to_string())
            && s.contains(&"repository:tok/a:pull".to_string())),
        "no mount token request: {log:?}"
    );
    // Tokens are cached per scope: pull, push (tok/a), mount, delete.
    assert!(log.len() <= 5, "too many token requests: {log:?}");

    // No credentials: the token service refuses, and the error says how to log in.
    let anon = client(&host, dir.path().join("missing.json"))?;
    let err = anon.blob_size("tok/a", &d).await.expect_err("anonymous");
    let msg = err.to_string();
    assert!(matches!(err, RegistryError::Token { .. }), "{msg}");
    assert!(msg.contains("anonymous access") && msg.contains(&format!("skopeo login {host}")), "{msg}");

    // A user whose token does not grant push.
    let reader = client(&host, auth_file(dir.path(), &host, "reader")?)?;
    assert_eq!(reader.blob_size("tok/a", &d).await?, Some(11));
    let err = reader.push_blob_bytes("tok/c", Bytes::from_static(b"other")).await.expect_err("reader pushes");
    let msg = err.to_string();
    assert!(matches!(err, RegistryError::Unauthorized { action: "push", .. }), "{msg}");
    assert!(msg.contains("user reader") && msg.contains("does not grant"), "{msg}");
    Ok(())
}
