//! The registry client against a real registry (Debian's `docker-registry`, started per
//! test by `oci_core::testing::TestRegistry`), cross-checked with skopeo.

use bytes::Bytes;
use oci_core::media;
use oci_core::registry::{BlobPush, ClientOptions, RegistryClient, RegistryError};
use oci_core::testing::{TestRegistry, TestRegistryOptions};
use oci_core::Digest;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

type Res = Result<(), Box<dyn std::error::Error>>;

/// Small limits so that a few MiB exercise chunked uploads.
fn opts(auth_file: &Path) -> ClientOptions {
    ClientOptions {
        insecure: false,
        auth_file: Some(auth_file.to_path_buf()),
        max_attempts: 5,
        monolithic_limit: 1 << 20,
        chunk_size: 256 << 10,
    }
}

struct Env {
    reg: TestRegistry,
    dir: tempfile::TempDir,
    client: RegistryClient,
}

fn env_with(o: &TestRegistryOptions) -> Result<Env, Box<dyn std::error::Error>> {
    let reg = TestRegistry::start_with(o)?;
    let dir = tempfile::tempdir()?;
    // A missing auth file: the tests never read the user's credentials.
    let client = RegistryClient::new(&reg.host(), &opts(&dir.path().join("no-auth.json")))?;
    Ok(Env { reg, dir, client })
}

fn env() -> Result<Env, Box<dyn std::error::Error>> {
    env_with(&TestRegistryOptions::default())
}

/// Deterministic pseudo-random bytes (incompressible enough, distinct per seed).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn write_blob(dir: &Path, name: &str, data: &[u8]) -> Result<(PathBuf, Digest, u64), std::io::Error> {
    let p = dir.join(name);
    std::fs::write(&p, data)?;
    Ok((p, Digest::of(data), data.len() as u64))
}

async fn blobs_round_trip(e: &Env) -> Res {
    let c = &e.client;
    let small = Bytes::from(noise(1, 1000));
    let (sd, pushed) = c.push_blob_bytes("test/blobs", small.clone()).await?;
    assert_eq!(pushed, BlobPush::Uploaded(1000));
    assert_eq!(sd, Digest::of(&small));
    assert_eq!(c.get_blob_bytes("test/blobs", &sd, 1 << 20).await?, small);
    assert_eq!(c.push_blob_bytes("test/blobs", small.clone()).await?.1, BlobPush::Existed);
    // From memory, chunked.
    let mid = Bytes::from(noise(7, (1 << 20) + (300 << 10)));
    let (md, pushed) = c.push_blob_bytes("test/blobs", mid.clone()).await?;
    assert_eq!(pushed, BlobPush::Uploaded(mid.len() as u64));
    assert_eq!(c.get_blob_bytes("test/blobs", &md, 2 << 20).await?, mid);
    let (ed, pushed) = c.push_blob_bytes("test/blobs", Bytes::new()).await?;
    assert_eq!(pushed, BlobPush::Uploaded(0));
    assert!(c.get_blob_bytes("test/blobs", &ed, 0).await?.is_empty());

    // Larger than monolithic_limit and not a multiple of chunk_size: chunked, from a file.
    let big = noise(2, (3 << 20) + 12345);
    let (path, bd, size) = write_blob(e.dir.path(), "big", &big)?;
    assert_eq!(c.blob_size("test/blobs", &bd).await?, None);
    assert_eq!(c.push_blob_file("test/blobs", &path, &bd, size, None).await?, BlobPush::Uploaded(size));
    assert_eq!(c.blob_size("test/blobs", &bd).await?, Some(size));
    assert_eq!(c.push_blob_file("test/blobs", &path, &bd, size, None).await?, BlobPush::Existed);

    let dst = e.dir.path().join("out/big.copy");
    std::fs::create_dir_all(e.dir.path().join("out"))?;
    assert_eq!(c.fetch_blob_to_file("test/blobs", &bd, Some(size), &dst).await?, size);
    assert!(std::fs::read(&dst)? == big, "fetched blob differs");
    assert_eq!(c.get_blob_bytes("test/blobs", &bd, size).await?.len() as u64, size);

    let err = c.get_blob_bytes("test/blobs", &bd, 1 << 20).await.expect_err("over max_size");
    assert!(matches!(err, RegistryError::TooLarge { .. }), "{err}");

    // A wrong expected size leaves nothing behind.
    let dst2 = e.dir.path().join("out/wrong-size");
    let err = c.fetch_blob_to_file("test/blobs", &bd, Some(size - 1), &dst2).await.expect_err("wrong size");
    assert!(matches!(err, RegistryError::SizeMismatch { .. }), "{err}");
    assert_eq!(std::fs::read_dir(e.dir.path().join("out"))?.count(), 1, "temporary files left behind");

    let mut r = c.blob_response("test/blobs", &bd, Some((100, Some(199)))).await?;
    assert_eq!(r.status().as_u16(), 206);
    let mut got = Vec::new();
    while let Some(chunk) = r.chunk().await? {
        got.extend_from_slice(&chunk);
    }
    assert!(got == big[100..200], "range differs");

    let missing = Digest::of(b"not there");
    assert_eq!(c.blob_size("test/blobs", &missing).await?, None);
    let err = c.get_blob_bytes("test/blobs", &missing, 100).await.expect_err("missing blob");
    assert!(matches!(err, RegistryError::BlobUnknown { .. }), "{err}");
    assert!(err.to_string().contains(&e.reg.host()) && err.to_string().contains(&missing.to_string()), "{err}");
    Ok(())
}

#[tokio::test]
async fn blobs_monolithic_and_chunked_round_trip() -> Res {
    blobs_round_trip(&env()?).await
}

#[tokio::test]
async fn blobs_round_trip_with_relative_locations() -> Res {
    blobs_round_trip(&env_with(&TestRegistryOptions { relative_urls: true, ..Default::default() })?).await
}

#[tokio::test]
async fn cross_repository_mount() -> Res {
    let e = env()?;
    let c = &e.client;
    let (path, d, size) = write_blob(e.dir.path(), "b", &noise(3, 5000))?;
    assert_eq!(c.push_blob_file("team/a", &path, &d, size, None).await?, BlobPush::Uploaded(size));
    assert_eq!(c.push_blob_file("team/b", &path, &d, size, Some("team/a")).await?, BlobPush::Mounted);
    assert_eq!(c.blob_size("team/b", &d).await?, Some(size));
    assert!(c.mount_blob("team/c", "team/a", &d).await?);
    // Not in the source repository: the registry opens an upload instead, which is cancelled.
    let other = Digest::of(b"elsewhere");
    assert!(!c.mount_blob("team/c", "team/a", &other).await?);
    // And a push with a useless mount source falls back to uploading.
    let (p2, d2, s2) = write_blob(e.dir.path(), "b2", &noise(4, 2000))?;
    assert_eq!(c.push_blob_file("team/d", &p2, &d2, s2, Some("team/a")).await?, BlobPush::Uploaded(s2));
    Ok(())
}

#[tokio::test]
async fn wrong_digest_is_refused() -> Res {
    let e = env()?;
    let c = &e.client;
    let claimed = Digest::of(b"something else");
    for (name, len) in [("small", 3000usize), ("large", (1 << 20) + 1)] {
        let (path, _, size) = write_blob(e.dir.path(), name, &noise(5, len))?;
        let err = c.push_blob_file("test/bad", &path, &claimed, size, None).await.expect_err("wrong digest accepted");
        let msg = err.to_string();
        assert!(matches!(err, RegistryError::Status { status: 400, .. }), "{name}: {msg}");
        assert!(msg.contains(&e.reg.host()) && msg.contains("DIGEST_INVALID"), "{name}: {msg}");
        assert!(msg.contains(&claimed.to_string()) && msg.contains("test/bad"), "{name}: {msg}");
        assert!(!err.is_transient());
        assert_eq!(c.blob_size("test/bad", &claimed).await?, None);
    }
    // A file whose size differs from the descriptor is caught before any upload.
    let (path, d, size) = write_blob(e.dir.path(), "sized", b"12345")?;
    let err = c.push_blob_file("test/bad", &path, &d, size + 1, None).await.expect_err("wrong size");
    assert!(err.to_string().contains("should be 6 bytes"), "{err}");
    Ok(())
}

/// Config, layer and manifest bytes.
type ImageParts = (Vec<u8>, Vec<u8>, Vec<u8>);

/// A minimal valid image: an OCI config, one tar+gzip layer and a manifest.
fn tiny_image() -> Result<ImageParts, Box<dyn std::error::Error>> {
    let mut tar = tar::Builder::new(Vec::new());
    let data = b"hello from oci-core\n";
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, "hello.txt", &data[..])?;
    let tar = tar.into_inner()?;
    let diff_id = Digest::of(&tar);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar)?;
    let layer = gz.finish()?;
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/true"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id.to_string()]},
    }))?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_MANIFEST,
        "config": {"mediaType": media::OCI_CONFIG, "digest": Digest::of(&config).to_string(), "size": config.len()},
        "layers": [{"mediaType": media::OCI_LAYER_GZIP, "digest": Digest::of(&layer).to_string(), "size": layer.len()}],
    }))?;
    Ok((config, layer, manifest))
}

#[tokio::test]
async fn manifests_tags_and_skopeo() -> Res {
    let e = env()?;
    let c = &e.client;
    let repo = "mediawiki/tiny";
    let (config, layer, manifest) = tiny_image()?;
    c.push_blob_bytes(repo, Bytes::from(config)).await?;
    c.push_blob_bytes(repo, Bytes::from(layer)).await?;
    let md = c.put_manifest(repo, "v1", &manifest, media::OCI_MANIFEST).await?;
    assert_eq!(md, Digest::of(&manifest));

    for reference in ["v1".to_string(), md.to_string()] {
        let got = c.get_manifest(repo, &reference).await?;
        assert_eq!(got.bytes, manifest);
        assert_eq!(got.digest, md);
        assert_eq!(got.media_type, media::OCI_MANIFEST);
        assert_eq!(c.manifest_digest(repo, &reference).await?, Some(md.clone()));
    }
    assert_eq!(c.manifest_digest(repo, "nope").await?, None);
    let err = c.get_manifest(repo, "nope").await.expect_err("missing tag");
    assert!(matches!(err, RegistryError::ManifestUnknown { .. }), "{err}");
    assert!(err.to_string().contains("mediawiki/tiny:nope"), "{err}");
    let err = c.put_manifest(repo, &Digest::of(b"x").to_string(), &manifest, media::OCI_MANIFEST).await;
    assert!(matches!(err, Err(RegistryError::InvalidName { .. })), "{err:?}");

    // An index pointing at it, pushed by digest.
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": [{"mediaType": media::OCI_MANIFEST, "digest": md.to_string(), "size": manifest.len(),
                       "platform": {"architecture": "amd64", "os": "linux"}}],
    }))?;
    let id = c.put_manifest(repo, &Digest::of(&index).to_string(), &index, media::OCI_INDEX).await?;
    let got = c.get_manifest(repo, &id.to_string()).await?;
    assert_eq!((got.media_type.as_str(), got.digest), (media::OCI_INDEX, id.clone()));

    for t in ["v2", "v3", "latest"] {
        c.put_manifest(repo, t, &manifest, media::OCI_MANIFEST).await?;
    }
    let mut tags = c.list_tags(repo).await?;
    tags.sort();
    assert_eq!(tags, ["latest", "v1", "v2", "v3"]);
    let mut paged = c.list_tags_paged(repo, Some(1)).await?;
    paged.sort();
    assert_eq!(paged, tags, "Link pagination");
    assert!(c.list_tags("no/such-repo").await?.is_empty());

    // skopeo reads what we pushed and agrees on the digest.
    let out = std::process::Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--raw"])
        .arg(format!("docker://{}/{repo}:v1", e.reg.host()))
        .output()?;
    assert!(out.status.success(), "skopeo inspect --raw: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, manifest);
    let out = std::process::Command::new("skopeo")
        .args(["inspect", "--tls-verify=false"])
        .arg(format!("docker://{}/{repo}:v1", e.reg.host()))
        .output()?;
    assert!(out.status.success(), "skopeo inspect: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["Digest"].as_str(), Some(md.to_string().as_str()), "{v}");
    assert_eq!(v["Layers"].as_array().map(Vec::len), Some(1), "{v}");

    assert!(c.delete_manifest(repo, &id).await?);
    assert!(matches!(c.get_manifest(repo, &id.to_string()).await, Err(RegistryError::ManifestUnknown { .. })));
    Ok(())
}

#[tokio::test]
async fn basic_auth_from_config_json() -> Res {
    let reg = TestRegistry::start_with_basic_auth("alice", "s3cret:with:colons")?;
    let dir = tempfile::tempdir()?;
    let good = dir.path().join("config.json");
    reg.write_auth_file(&good, "alice", "s3cret:with:colons")?;
    let c = RegistryClient::new(&reg.host(), &opts(&good))?;
    let (d, p) = c.push_blob_bytes("private/x", Bytes::from_static(b"secret layer")).await?;
    assert_eq!(p, BlobPush::Uploaded(12));
    assert_eq!(c.get_blob_bytes("private/x", &d, 100).await?, b"secret layer");

    let none = RegistryClient::new(&reg.host(), &opts(&dir.path().join("missing.json")))?;
    let err = none.blob_size("private/x", &d).await.expect_err("anonymous access");
    let msg = err.to_string();
    assert!(matches!(err, RegistryError::Unauthorized { status: 401, .. }), "{msg}");
    assert!(msg.contains(&format!("no credentials for {}", reg.host())), "{msg}");
    assert!(msg.contains("missing.json (missing)") && msg.contains("skopeo login"), "{msg}");

    let bad = dir.path().join("bad.json");
    reg.write_auth_file(&bad, "alice", "wrong")?;
    let wrong = RegistryClient::new(&reg.host(), &opts(&bad))?;
    let err = wrong.blob_size("private/x", &d).await.expect_err("wrong password");
    let msg = err.to_string();
    assert!(msg.contains("user alice") && msg.contains("were rejected") && !msg.contains("wrong"), "{msg}");

    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, "{\"auths\": [")?;
    let err = RegistryClient::new(&reg.host(), &opts(&broken)).expect_err("malformed auth file");
    assert!(err.to_string().contains("broken.json"), "{err}");
    Ok(())
}

#[tokio::test]
async fn unreachable_registry_is_a_clear_error() -> Res {
    let mut e = env()?;
    e.reg.stop();
    let c = RegistryClient::new(&e.reg.host(), &ClientOptions { max_attempts: 3, ..opts(&e.dir.path().join("x")) })?;
    let t = Instant::now();
    let err = c.blob_size("a/b", &Digest::of(b"x")).await.expect_err("registry is down");
    let msg = err.to_string();
    assert!(msg.contains(&format!("registry {} unreachable after 3 attempts", e.reg.host())), "{msg}");
    assert!(err.is_transient());
    assert!(std::error::Error::source(&err).is_some());
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    let err = c.push_blob_bytes("a/b", Bytes::from_static(b"x")).await.expect_err("registry is down");
    assert!(err.to_string().contains("unreachable after 3 attempts"), "{err}");
    Ok(())
}

#[tokio::test]
async fn restart_between_pushes_then_rerun_completes() -> Res {
    let mut e = env()?;
    let c = RegistryClient::new(&e.reg.host(), &ClientOptions { max_attempts: 2, ..opts(&e.dir.path().join("x")) })?;
    let mut blobs = Vec::new();
    for (i, len) in [2000usize, (1 << 20) + 777, 50, (2 << 20) + 3].into_iter().enumerate() {
        blobs.push(write_blob(e.dir.path(), &format!("b{i}"), &noise(10 + i as u64, len))?);
    }
    for (p, d, s) in &blobs[..2] {
        assert_eq!(c.push_blob_file("seq/x", p, d, *s, None).await?, BlobPush::Uploaded(*s));
    }
    e.reg.stop();
    let (p, d, s) = &blobs[2];
    let err = c.push_blob_file("seq/x", p, d, *s, None).await.expect_err("registry is down");
    assert!(err.is_transient(), "{err}");
    e.reg.restart()?;
    let mut outcomes = Vec::new();
    for (p, d, s) in &blobs {
        outcomes.push(c.push_blob_file("seq/x", p, d, *s, None).await?);
    }
    let sizes: Vec<u64> = blobs.iter().map(|b| b.2).collect();
    assert_eq!(
        outcomes,
        [BlobPush::Existed, BlobPush::Existed, BlobPush::Uploaded(sizes[2]), BlobPush::Uploaded(sizes[3])]
    );
    for (p, d, s) in &blobs {
        assert!(c.get_blob_bytes("seq/x", d, *s).await? == std::fs::read(p)?);
    }
    Ok(())
}

fn upload_dirs(storage: &Path, repo: &str) -> Vec<PathBuf> {
    let dir = storage.join("docker/registry/v2/repositories").join(repo).join("_uploads");
    std::fs::read_dir(dir).map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default()
}

#[tokio::test]
async fn upload_interrupted_by_restart_resumes_in_a_fresh_session() -> Res {
    let mut e = env()?;
    let o = ClientOptions { chunk_size: 64 << 10, ..opts(&e.dir.path().join("x")) };
    let c = RegistryClient::new(&e.reg.host(), &o)?;
    let data = noise(20, 24 << 20);
    let (path, d, size) = write_blob(e.dir.path(), "big", &data)?;
    let push = {
        let (c, path, d) = (c.clone(), path.clone(), d.clone());
        tokio::spawn(async move { c.push_blob_file("restart/x", &path, &d, size, None).await })
    };
    // Wait until the upload has sent some data, then crash and restart the registry.
    let storage = e.reg.storage_dir();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let started = upload_dirs(&storage, "restart/x")
            .iter()
            .any(|u| std::fs::metadata(u.join("data")).is_ok_and(|m| m.len() > (1 << 20)));
        if started || push.is_finished() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(!push.is_finished(), "the upload finished before it could be interrupted");
    e.reg.restart()?;
    assert_eq!(push.await??, BlobPush::Uploaded(size));
    // The interrupted session is still there: the upload really restarted in a new one.
    assert!(!upload_dirs(&storage, "restart/x").is_empty(), "no abandoned upload session");
    assert!(c.get_blob_bytes("restart/x", &d, size).await? == data);
    Ok(())
}
