//! containerd pulling through an agent: Debian's `containerd` (a private instance with its
//! own root, state and socket under a temporary directory) runs
//! `ctr images pull --hosts-dir DIR`, with a `hosts.toml` whose mirror is the agent and
//! whose server is the real registry (Debian's `docker-registry`). The image has real tar
//! layers, so containerd unpacks them with its default (overlayfs) snapshotter and checks
//! every layer against its diff ID.

mod common;

use common::*;
use oci_core::testing::TestRegistry;
use oci_core::Digest;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const REPO: &str = "mw/app";
const CONTAINERD: &str = "/usr/bin/containerd";
const CTR: &str = "/usr/bin/ctr";
const NAMESPACE: &str = "mwdist-test";

/// A containerd of our own; stopped (SIGTERM, then SIGKILL) on drop.
struct Containerd {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl Containerd {
    fn start(dir: &Path) -> Containerd {
        let socket = dir.join("containerd.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = socket.display(),
            opt = dir.join("opt").display(),
        );
        let cfg = dir.join("config.toml");
        std::fs::write(&cfg, config).expect("write the containerd config");
        let log = dir.join("containerd.log");
        let logf = std::fs::File::create(&log).expect("containerd log");
        let child = Command::new("/usr/bin/setpriv")
            .args(["--pdeathsig", "KILL", "--", CONTAINERD, "--config"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("start containerd");
        let mut c = Containerd { child: Some(child), socket, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if c.socket.exists() && c.ctr(&["version"]).status.success() {
                break;
            }
            let exited = c.child.as_mut().and_then(|ch| ch.try_wait().ok().flatten());
            assert!(exited.is_none() && Instant::now() < deadline, "containerd did not come up: {}", c.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    fn ctr(&self, args: &[&str]) -> Output {
        Command::new(CTR)
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", NAMESPACE])
            .args(args)
            .output()
            .expect("run ctr")
    }

    /// `ctr <args>`, which must succeed; its stdout.
    fn ctr_ok(&self, args: &[&str]) -> Vec<u8> {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed: {}{}\ncontainerd log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        out.stdout
    }

    fn log_text(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        t.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_and_unpacks_an_image_through_an_agent() {
    if !Path::new(CONTAINERD).exists() || !Path::new(CTR).exists() {
        eprintln!(
            "SKIPPED containerd_pulls_and_unpacks_an_image_through_an_agent: {CONTAINERD} or {CTR} is missing; \
             install them with `apt-get install containerd` (scripts/install-test-deps.sh does)"
        );
        return;
    }
    let reg = TestRegistry::start().expect("start docker-registry");
    let tmp = tempdir();
    let sizes = [2 << 20, 300 << 10];
    let layers_in: Vec<(Vec<u8>, Digest)> = sizes.iter().enumerate().map(|(i, &n)| tar_layer(i, n)).collect();
    let layer_bytes: Vec<Vec<u8>> = layers_in.iter().map(|(gz, _)| gz.clone()).collect();
    let (manifest, layers) = write_image_of(&tmp.path().join("src"), "v1", layers_in);
    push(&tmp.path().join("src"), "v1", &reg.host(), REPO).await;
    let origin = origin(&format!("docker://{}", reg.host()), &tmp.path().join("origin"), "127.0.0.1:0", None);
    let agent = agent(&origin.field("listening"), &tmp.path().join("agent"), &[]);
    let (mirror, peer) = (agent.field("mirror"), agent.field("peer"));

    // containerd: the registry's host directory names the agent as its mirror.
    let host = reg.host();
    let hosts = tmp.path().join("hosts");
    std::fs::create_dir_all(hosts.join(&host)).expect("hosts dir");
    let toml =
        format!("server = \"http://{host}\"\n\n[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n");
    std::fs::write(hosts.join(&host).join("hosts.toml"), toml).expect("hosts.toml");
    let image = format!("{host}/{REPO}:v1");
    let hosts_dir = hosts.to_str().expect("utf-8 path").to_string();
    let ctrd_dir = tmp.path().join("containerd");
    std::fs::create_dir_all(&ctrd_dir).expect("containerd dir");
    let (layers2, image2) = (layers.clone(), image.clone());
    let checked = tokio::task::spawn_blocking(move || {
        let c = Containerd::start(&ctrd_dir);
        c.ctr_ok(&["images", "pull", "--hosts-dir", &hosts_dir, &image2]);
        let listed = String::from_utf8_lossy(&c.ctr_ok(&["images", "ls"])).to_string();
        // Every layer's bytes as containerd stored them, and its unpacked snapshots.
        let stored: Vec<Vec<u8>> = layers2.iter().map(|d| c.ctr_ok(&["content", "get", &d.to_string()])).collect();
        let snapshots = String::from_utf8_lossy(&c.ctr_ok(&["snapshots", "ls"])).to_string();
        (listed, stored, snapshots)
    })
    .await
    .expect("containerd task");
    let (listed, stored, snapshots) = checked;
    assert!(listed.contains(&image) && listed.contains(&manifest.to_string()), "image and manifest digest: {listed}");
    for (i, got) in stored.iter().enumerate() {
        assert_eq!(Digest::of(got), layers[i], "layer {i} in containerd's content store");
        assert_eq!(got, &layer_bytes[i], "layer {i} bytes");
    }
    // One committed snapshot per layer: containerd unpacked both and matched their diff IDs.
    let committed = snapshots.lines().filter(|l| l.contains("Committed")).count();
    assert_eq!(committed, layers.len(), "{snapshots}");

    // The content came through the agent: every layer and the config was a transfer of
    // its own, and the agent sent the client at least all their bytes.
    let config_size = {
        let layout = oci_core::layout::Layout::open(tmp.path().join("src")).expect("src layout");
        let m: serde_json::Value =
            serde_json::from_slice(&layout.read_blob(&manifest, None).expect("manifest")).expect("json");
        m["config"]["size"].as_u64().expect("config size")
    };
    let blob_bytes = layer_bytes.iter().map(|b| b.len() as u64).sum::<u64>() + config_size;
    assert_eq!(metric(&peer, "mwdist_transfers_completed_total").await, layers.len() as u64 + 1);
    assert!(metric(&peer, "mwdist_bytes_up_total{to=\"clients\"}").await >= blob_bytes);
    assert_eq!(metric(&peer, "mwdist_pieces_rejected_total").await, 0);
    for d in &layers {
        assert!(tmp.path().join("agent/blobs").join(d.hex()).exists(), "{d} is in the agent's store");
    }
    // And the registry sent each blob once, to the origin.
    let up = metric(&origin.field("listening"), "mwdist_bytes_down_total{source=\"upstream\"}").await;
    assert_eq!(up, blob_bytes, "upstream bytes");
}
