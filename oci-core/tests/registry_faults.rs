//! Misbehaving registries, simulated by a tiny in-test HTTP server: retries on 503/429
//! with backoff, a clear error when they persist, and refusal of content that does not
//! match its digest (nothing is left behind on disk).

use oci_core::registry::{ClientOptions, RegistryClient, RegistryError};
use oci_core::Digest;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

type Res = Result<(), Box<dyn std::error::Error>>;

/// `(status line, extra headers, body)` for a request `(method, path)` and its index.
type Handler = dyn Fn(&str, &str, usize) -> (&'static str, Vec<(String, String)>, Vec<u8>) + Send + Sync;

/// Serve `handler` on a loopback port; returns the host and the request counter.
async fn serve(handler: Box<Handler>) -> Result<(String, Arc<AtomicUsize>), std::io::Error> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let host = listener.local_addr()?.to_string();
    let count = Arc::new(AtomicUsize::new(0));
    let handler: Arc<Handler> = Arc::from(handler);
    let n = count.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (handler, n) = (handler.clone(), n.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let mut first = head.split_whitespace();
                let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
                let i = n.fetch_add(1, Ordering::SeqCst);
                let (status, headers, body) = handler(method, path, i);
                let mut resp = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
                for (k, v) in &headers {
                    resp.push_str(&format!("{k}: {v}\r\n"));
                }
                if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-length")) {
                    resp.push_str(&format!("Content-Length: {}\r\n", body.len()));
                }
                resp.push_str("\r\n");
                let mut out = resp.into_bytes();
                if method != "HEAD" {
                    out.extend_from_slice(&body);
                }
                let _ = conn.write_all(&out).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    Ok((host, count))
}

fn client(host: &str, max_attempts: u32) -> Result<RegistryClient, RegistryError> {
    let dir = std::env::temp_dir().join("oci-core-tests-no-auth.json");
    RegistryClient::new(host, &ClientOptions { auth_file: Some(dir), max_attempts, ..ClientOptions::default() })
}

#[tokio::test]
async fn transient_errors_are_retried_then_reported() -> Res {
    // Two 503s (one asking to retry immediately), a 429, then success.
    let (host, count) = serve(Box::new(|_, _, i| match i {
        0 => ("503 Service Unavailable", vec![("Retry-After".into(), "0".into())], b"busy".to_vec()),
        1 => ("503 Service Unavailable", vec![], Vec::new()),
        2 => ("429 Too Many Requests", vec![("Retry-After".into(), "0".into())], Vec::new()),
        _ => ("200 OK", vec![("Content-Length".into(), "5".into())], Vec::new()),
    }))
    .await?;
    let d = Digest::of(b"hello");
    assert_eq!(client(&host, 5)?.blob_size("a/b", &d).await?, Some(5));
    assert_eq!(count.load(Ordering::SeqCst), 4);

    // Always failing: a clear error after max_attempts, with the registry's message.
    let (host, count) = serve(Box::new(|_, _, _| {
        (
            "503 Service Unavailable",
            vec![("Content-Type".into(), "application/json".into())],
            br#"{"errors":[{"code":"UNAVAILABLE","message":"storage is on fire"}]}"#.to_vec(),
        )
    }))
    .await?;
    let err = client(&host, 3)?.get_manifest("a/b", "v1").await.expect_err("always 503");
    let msg = err.to_string();
    assert!(matches!(err, RegistryError::Unavailable { status: 503, attempts: 3, .. }), "{msg}");
    assert!(msg.contains(&host) && msg.contains("after 3 attempts") && msg.contains("storage is on fire"), "{msg}");
    assert!(err.is_transient());
    assert_eq!(count.load(Ordering::SeqCst), 3);

    // A 404 is an answer, not a failure: no retry.
    let (host, count) = serve(Box::new(|_, _, _| ("404 Not Found", vec![], Vec::new()))).await?;
    assert_eq!(client(&host, 5)?.blob_size("a/b", &d).await?, None);
    assert_eq!(count.load(Ordering::SeqCst), 1);
    Ok(())
}

#[tokio::test]
async fn content_not_matching_its_digest_is_refused() -> Res {
    let real = b"the real manifest".to_vec();
    let d = Digest::of(&real);
    let other = Digest::of(b"something else");
    let d_str = d.to_string();
    let other_str = other.to_string();
    let (host, _) = serve(Box::new(move |_, path, _| {
        if path.contains("/manifests/lying-header") {
            // Right content, wrong Docker-Content-Digest.
            let h = vec![
                ("Content-Type".into(), "application/vnd.oci.image.manifest.v1+json".into()),
                ("Docker-Content-Digest".into(), other_str.clone()),
            ];
            ("200 OK", h, b"the real manifest".to_vec())
        } else if path.contains(&format!("/manifests/{d_str}")) || path.contains("/blobs/") {
            // Asked for `d`, served other bytes.
            ("200 OK", vec![], b"tampered".to_vec())
        } else if path.contains("/manifests/huge") {
            ("200 OK", vec![("Content-Length".into(), (64u64 << 20).to_string())], Vec::new())
        } else {
            ("404 Not Found", vec![], Vec::new())
        }
    }))
    .await?;
    let c = client(&host, 2)?;
    let err = c.get_manifest("a/b", "lying-header").await.expect_err("header mismatch");
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    let err = c.get_manifest("a/b", &d.to_string()).await.expect_err("tampered manifest");
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&d.to_string()) && err.to_string().contains(&host), "{err}");
    let err = c.get_manifest("a/b", "huge").await.expect_err("oversized manifest");
    assert!(matches!(err, RegistryError::TooLarge { .. }), "{err}");

    let err = c.get_blob_bytes("a/b", &d, 1000).await.expect_err("tampered blob");
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    let dir = tempfile::tempdir()?;
    let dst = dir.path().join("blob");
    let err = c.fetch_blob_to_file("a/b", &d, None, &dst).await.expect_err("tampered blob");
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    assert_eq!(std::fs::read_dir(dir.path())?.count(), 0, "something was left behind");
    Ok(())
}
