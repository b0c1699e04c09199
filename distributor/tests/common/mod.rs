//! Test support: an image pushed to a real registry, and `mwdist` roles run as child
//! processes of the built binary (so that killing one is a real kill).

#![allow(dead_code)]

use oci_core::layout::Layout;
use oci_core::Digest;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const SECRET: &str = "test-cluster-secret-0123456789";

/// A child process killed on drop.
pub struct Proc {
    child: Option<Child>,
    pub line: String,
    args: Vec<String>,
}

impl Proc {
    /// Start `mwdist <args>` and wait for its ready line.
    pub fn start(args: &[&str]) -> Proc {
        Self::start_with_secret(args, Some(SECRET))
    }

    pub fn start_with_secret(args: &[&str], secret: Option<&str>) -> Proc {
        let mut cmd = Command::new("/usr/bin/setpriv");
        cmd.args(["--pdeathsig", "KILL", "--", env!("CARGO_BIN_EXE_mwdist")]);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        cmd.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()));
        match secret {
            Some(s) => cmd.env("MWDIST_SECRET", s),
            None => cmd.env_remove("MWDIST_SECRET"),
        };
        let mut child = cmd.spawn().expect("start mwdist");
        let out = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line).expect("read the ready line");
        assert!(!line.is_empty(), "mwdist {args:?} exited before it was ready");
        Proc { child: Some(child), line: line.trim().to_string(), args: args.iter().map(|s| s.to_string()).collect() }
    }

    /// The value of `key=` in the ready line.
    pub fn field(&self, key: &str) -> String {
        let p = format!("{key}=");
        self.line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(p.as_str()))
            .unwrap_or_else(|| panic!("no {key} in {:?}", self.line))
            .to_string()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn origin(upstream: &str, cache: &Path, listen: &str, rate: Option<&str>) -> Proc {
    let mut args = vec!["origin", "--upstream", upstream, "--listen", listen, "--cache-dir"];
    let cache = cache.to_str().expect("utf-8 path");
    args.push(cache);
    if let Some(r) = rate {
        args.extend(["--rate-up", r]);
    }
    Proc::start(&args)
}

pub fn agent(origin: &str, data: &Path, extra: &[&str]) -> Proc {
    let data = data.to_str().expect("utf-8 path");
    let mut args = vec![
        "agent",
        "--origin",
        origin,
        "--listen",
        "127.0.0.1:0",
        "--peer-listen",
        "127.0.0.1:0",
        "--data-dir",
        data,
    ];
    args.extend_from_slice(extra);
    Proc::start(&args)
}

/// Deterministic pseudo-random bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    use rand::{RngCore as _, SeedableRng as _};
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Layer `i`: `n` bytes of noise, gzipped (stored, so about `n` bytes). skopeo would
/// compress an uncompressed layer, changing its digest.
pub fn layer(i: usize, n: usize) -> Vec<u8> {
    use std::io::Write as _;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
    gz.write_all(&noise(i as u64 + 1, n)).expect("gzip to memory");
    gz.finish().expect("gzip to memory")
}

/// An image ("layers" of noise, a config and a manifest) in an OCI layout under
/// `dir`, tagged `tag`. Returns the manifest digest and the layer digests.
pub fn write_image(dir: &Path, tag: &str, sizes: &[usize]) -> (Digest, Vec<Digest>) {
    let layers =
        sizes.iter().enumerate().map(|(i, &n)| (layer(i, n), Digest::of(&noise(i as u64 + 1, n)))).collect::<Vec<_>>();
    write_image_of(dir, tag, layers)
}

/// Layer `i` as a real tar (one file, `data/<i>.bin`, of `n` bytes of noise), gzipped;
/// with its diff ID (the digest of the tar), so that containerd can unpack it.
pub fn tar_layer(i: usize, n: usize) -> (Vec<u8>, Digest) {
    let mut b = tar::Builder::new(Vec::new());
    let data = noise(i as u64 + 1, n);
    let mut h = tar::Header::new_ustar();
    h.set_size(n as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, format!("data/{i}.bin"), data.as_slice()).expect("tar to memory");
    let tar = b.into_inner().expect("tar to memory");
    use std::io::Write as _;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).expect("gzip to memory");
    (gz.finish().expect("gzip to memory"), Digest::of(&tar))
}

/// An image of the given (compressed layer, diff ID) pairs. Returns the manifest digest
/// and the layer digests.
pub fn write_image_of(dir: &Path, tag: &str, layers_in: Vec<(Vec<u8>, Digest)>) -> (Digest, Vec<Digest>) {
    let layout = Layout::create(dir.to_path_buf()).expect("create layout");
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for (gz, diff_id) in layers_in {
        diff_ids.push(diff_id.to_string());
        let (d, _) = layout.put_blob_bytes(&gz).expect("put layer");
        layers.push((d, gz.len()));
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "config": {}
    })
    .to_string();
    let (cd, cn) = layout.put_blob_bytes(config.as_bytes()).expect("put config");
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": cn },
        "layers": layers.iter().map(|(d, n)| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d.to_string(), "size": n
        })).collect::<Vec<_>>()
    })
    .to_string();
    let (md, mn) = layout.put_blob_bytes(manifest.as_bytes()).expect("put manifest");
    let desc = oci_spec::image::Descriptor::new(oci_spec::image::MediaType::ImageManifest, mn, md.to_oci());
    layout.set_tag(tag, &desc).expect("tag");
    (md, layers.into_iter().map(|(d, _)| d).collect())
}

pub fn skopeo(args: &[&str]) {
    let out = Command::new("skopeo").args(args).output().expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Push `dir:tag` to `host/repo:tag` byte for byte (skopeo would recompress).
pub async fn push(dir: &Path, tag: &str, host: &str, repo: &str) {
    let layout = Layout::open(dir.to_path_buf()).expect("layout");
    let opts = oci_core::registry::ClientOptions { insecure: true, ..Default::default() };
    let c = oci_core::registry::RegistryClient::new(host, &opts).expect("client");
    let desc = layout.resolve_tag(Some(tag)).expect("tag");
    let md = Digest::from_oci(desc.digest()).expect("digest");
    let mbytes = layout.read_blob(&md, None).expect("manifest");
    let m: serde_json::Value = serde_json::from_slice(&mbytes).expect("json");
    let blobs = m["layers"].as_array().expect("layers").iter().chain(std::iter::once(&m["config"]));
    for b in blobs {
        let d: Digest = b["digest"].as_str().expect("digest").parse().expect("digest");
        let bytes = layout.read_blob(&d, None).expect("blob");
        c.push_blob_bytes(repo, bytes.into()).await.expect("push blob");
    }
    c.put_manifest(repo, tag, &mbytes, "application/vnd.oci.image.manifest.v1+json").await.expect("push manifest");
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("http client")
}

/// GET a blob through a mirror; its bytes.
pub async fn get_blob(mirror: &str, repo: &str, d: &Digest) -> Result<Vec<u8>, String> {
    let url = format!("http://{mirror}/v2/{repo}/blobs/{d}");
    let resp = client().get(url).send().await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    Ok(body.to_vec())
}

/// The value of a metric line `name value` from a `/metrics` page.
pub async fn metric(addr: &str, name: &str) -> u64 {
    let text =
        client().get(format!("http://{addr}/metrics")).send().await.expect("metrics").text().await.expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("mwdist-test-").tempdir().expect("tempdir")
}

pub fn path(p: &Path, sub: &str) -> PathBuf {
    p.join(sub)
}
