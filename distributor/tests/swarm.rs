//! End-to-end tests: a real registry upstream (Debian's `docker-registry`), an origin and
//! agents as child processes on loopback, skopeo pulling through an agent.

mod common;

use common::*;
use oci_core::testing::TestRegistry;
use oci_core::Digest;

const REPO: &str = "mw/app";

struct World {
    _reg: TestRegistry,
    tmp: tempfile::TempDir,
    origin: Proc,
    layers: Vec<Digest>,
    manifest: Digest,
}

impl World {
    /// A registry holding one image, and an origin in front of it.
    async fn new(sizes: &[usize], origin_rate: Option<&str>) -> World {
        let reg = TestRegistry::start().expect("start docker-registry");
        let tmp = tempdir();
        let (manifest, layers) = write_image(&tmp.path().join("src"), "v1", sizes);
        push(&tmp.path().join("src"), "v1", &reg.host(), REPO).await;
        let origin =
            origin(&format!("docker://{}", reg.host()), &tmp.path().join("origin"), "127.0.0.1:0", origin_rate);
        World { _reg: reg, tmp, origin, layers, manifest }
    }

    fn origin_addr(&self) -> String {
        self.origin.field("listening")
    }

    fn agent(&self, name: &str, extra: &[&str]) -> Proc {
        agent(&self.origin_addr(), &self.tmp.path().join(name), extra)
    }
}

fn expected(i: usize, sizes: &[usize]) -> Vec<u8> {
    layer(i, sizes[i])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_through_an_agent_gets_the_registry_bytes_and_a_swarm_completes() {
    let sizes = [3 << 20, 200 << 10];
    let w = World::new(&sizes, None).await;
    let agents: Vec<Proc> = (0..3).map(|i| w.agent(&format!("a{i}"), &[])).collect();
    let mirror = agents[0].field("mirror");
    let out = w.tmp.path().join("out");
    let src = format!("docker://{mirror}/{REPO}:v1");
    let dst = format!("oci:{}:v1", out.display());
    tokio::task::spawn_blocking(move || skopeo(&["copy", "--quiet", "--src-tls-verify=false", &src, &dst]))
        .await
        .expect("skopeo task");
    let layout = oci_core::layout::Layout::open(out).expect("skopeo wrote a layout");
    let desc = layout.resolve_tag(Some("v1")).expect("tag v1");
    let got = Digest::from_oci(desc.digest()).expect("digest");
    assert_eq!(
        got,
        w.manifest,
        "same manifest: {}",
        String::from_utf8_lossy(&layout.read_blob(&got, None).expect("manifest"))
    );
    for (i, d) in w.layers.iter().enumerate() {
        assert_eq!(layout.read_blob(d, None).expect("layer copied"), expected(i, &sizes));
    }
    // The other agents pull at once; every blob verified.
    let pulls: Vec<_> = agents[1..]
        .iter()
        .map(|a| {
            let (m, d) = (a.field("mirror"), w.layers[0].clone());
            tokio::spawn(async move { get_blob(&m, REPO, &d).await })
        })
        .collect();
    for p in pulls {
        let bytes = p.await.expect("pull task").expect("pull through the agent");
        assert_eq!(Digest::of(&bytes), w.layers[0]);
    }
    for a in &agents {
        let peer = a.field("peer");
        assert_eq!(metric(&peer, "mwdist_pieces_rejected_total").await, 0);
        assert!(metric(&peer, "mwdist_pieces_verified_total").await > 0);
    }
    // The registry sent each blob once, however many agents pulled.
    let up = metric(&w.origin_addr(), "mwdist_bytes_down_total{source=\"upstream\"}").await;
    assert_eq!(up, image_blob_bytes(&w), "upstream bytes");
}

/// Layers and config (skopeo fetches the config by digest too).
fn image_blob_bytes(w: &World) -> u64 {
    let layout = oci_core::layout::Layout::open(w.tmp.path().join("src")).expect("src layout");
    let m: serde_json::Value =
        serde_json::from_slice(&layout.read_blob(&w.manifest, None).expect("manifest")).expect("json");
    let layers: u64 = m["layers"].as_array().expect("layers").iter().filter_map(|l| l["size"].as_u64()).sum();
    layers + m["config"]["size"].as_u64().expect("config size")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_peer_is_detected_and_dropped() {
    let sizes = [1 << 20];
    let w = World::new(&sizes, None).await;
    let bad = w.agent("bad", &["--corrupt"]);
    let bytes = get_blob(&bad.field("mirror"), REPO, &w.layers[0]).await.expect("the bad agent's own pull");
    assert_eq!(bytes, expected(0, &sizes), "it stores good bytes; it only serves bad ones");
    // Let the tracker learn that the bad agent has everything.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let good = w.agent("good", &[]);
    let bytes = get_blob(&good.field("mirror"), REPO, &w.layers[0]).await.expect("pull despite a bad peer");
    assert_eq!(bytes, expected(0, &sizes));
    let peer = good.field("peer");
    assert!(metric(&peer, "mwdist_pieces_rejected_total").await >= 1, "the bad piece was seen");
    assert_eq!(metric(&peer, "mwdist_peers_dropped_total").await, 1, "and its peer dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_peers_do_not_stop_the_survivors() {
    let sizes = [2 << 20];
    let w = World::new(&sizes, Some("1MiB")).await;
    let rate = ["--rate-up", "1MiB", "--rate-down", "1MiB"];
    let mut agents: Vec<Proc> = (0..4).map(|i| w.agent(&format!("a{i}"), &rate)).collect();
    let pulls: Vec<_> = agents
        .iter()
        .map(|a| {
            let (m, d) = (a.field("mirror"), w.layers[0].clone());
            tokio::spawn(async move { get_blob(&m, REPO, &d).await })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    agents[0].kill();
    agents[1].kill();
    let mut pulls = pulls.into_iter();
    for p in pulls.by_ref().take(2) {
        let _ = p.await.expect("pull task");
    }
    for p in pulls {
        let bytes = p.await.expect("pull task").expect("survivors complete");
        assert_eq!(Digest::of(&bytes), w.layers[0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_restart_does_not_stop_a_transfer() {
    let sizes = [2 << 20];
    let mut w = World::new(&sizes, Some("1MiB")).await;
    let addr = w.origin_addr();
    let a = w.agent("a", &[]);
    let (m, d) = (a.field("mirror"), w.layers[0].clone());
    let pull = tokio::spawn(async move { get_blob(&m, REPO, &d).await });
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    w.origin.kill();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    w.origin = origin(&format!("docker://{}", w._reg.host()), &w.tmp.path().join("origin"), &addr, Some("1MiB"));
    let bytes = pull.await.expect("pull task").expect("the transfer went on");
    assert_eq!(bytes, expected(0, &sizes));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_the_cluster_secret_get_nothing() {
    let w = World::new(&[100 << 10], None).await;
    let a = w.agent("a", &[]);
    let d = &w.layers[0];
    get_blob(&a.field("mirror"), REPO, d).await.expect("pull");
    let c = client();
    let urls = [
        format!("http://{}/dist/v1/pieces/{d}?name={REPO}", w.origin_addr()),
        format!("http://{}/v2/{REPO}/blobs/{d}", w.origin_addr()),
        format!("http://{}/dist/v1/piece/{d}/0", a.field("peer")),
    ];
    for u in &urls {
        for auth in [None, Some("Bearer wrong-secret-wrong-secret")] {
            let mut req = c.get(u);
            if let Some(h) = auth {
                req = req.header("authorization", h);
            }
            let resp = req.send().await.expect("request");
            assert_eq!(resp.status(), 401, "{u} with {auth:?}");
            assert!(!resp.text().await.expect("body").contains("\u{0}"), "no content");
        }
        let ok = c.get(u).header("authorization", format!("Bearer {SECRET}")).send().await.expect("request");
        assert!(ok.status().is_success(), "{u} with the secret: {}", ok.status());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_blob_upstream_is_not_spread() {
    let sizes = [300 << 10];
    let w = World::new(&sizes, None).await;
    let d = &w.layers[0];
    let data = w._reg.storage_dir().join(format!("docker/registry/v2/blobs/sha256/{}/{}/data", &d.hex()[..2], d.hex()));
    let mut bytes = std::fs::read(&data).expect("registry blob");
    bytes[1000] ^= 1;
    std::fs::write(&data, bytes).expect("corrupt the registry's copy");
    let a = w.agent("a", &[]);
    let got = get_blob(&a.field("mirror"), REPO, d).await;
    assert!(got.is_err(), "the client must not get a complete wrong blob");
    assert!(!w.tmp.path().join("origin/blobs").join(d.hex()).exists(), "not cached by the origin");
    assert!(!w.tmp.path().join("a/blobs").join(d.hex()).exists(), "not stored by the agent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_bound_evicts_the_least_recently_used_unpinned_blob() {
    let sizes = [300 << 10, 300 << 10, 300 << 10];
    let w = World::new(&sizes, None).await;
    let data = w.tmp.path().join("a");
    let pin = std::process::Command::new(env!("CARGO_BIN_EXE_mwdist"))
        .args(["pin", &w.layers[0].to_string(), "--data-dir", data.to_str().expect("utf-8")])
        .status()
        .expect("mwdist pin");
    assert!(pin.success());
    let a = w.agent("a", &["--cache-max", "700KiB"]);
    for d in &w.layers {
        get_blob(&a.field("mirror"), REPO, d).await.expect("pull");
    }
    let present = |i: usize| data.join("blobs").join(w.layers[i].hex()).exists();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while present(1) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!((present(0), present(1), present(2)), (true, false, true), "pinned kept, LRU evicted, newest kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_preheats_every_blob_of_an_image() {
    let w = World::new(&[200 << 10, 100 << 10], None).await;
    let a = w.agent("a", &[]);
    let mirror = a.field("mirror");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_mwdist"))
            .args(["pull", &format!("{REPO}:v1"), "--agent", &mirror])
            .output()
            .expect("mwdist pull")
    })
    .await
    .expect("pull task");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed = String::from_utf8_lossy(&out.stdout);
    for d in &w.layers {
        assert!(listed.contains(&d.to_string()), "{listed}");
        assert!(w.tmp.path().join("a/blobs").join(d.hex()).exists(), "{d} is in the agent's store");
    }
}

/// Announce to the origin's tracker, as peer `id` holding nothing, that it dropped `dropped`.
async fn report(tracker: &str, id: &str, d: &Digest, pieces: usize, dropped: &[String]) {
    let a = mwdist::api::Announce {
        peer_id: id.into(),
        addr: format!("127.0.0.1:{}", 9 + id.len()),
        digest: d.to_string(),
        pieces,
        have: mwdist::pieces::Bitfield::new(pieces).to_hex(),
        dropped: dropped.to_vec(),
    };
    let r = client()
        .post(format!("http://{tracker}/dist/v1/announce"))
        .header("authorization", format!("Bearer {SECRET}"))
        .json(&a)
        .send()
        .await
        .expect("announce");
    assert!(r.status().is_success(), "announce: {}", r.status());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_two_others_report_gets_no_new_piece_from_the_origin() {
    let sizes = [1 << 20];
    let w = World::new(&sizes, None).await;
    let d = w.layers[0].clone();
    let n = mwdist::pieces::Geometry::for_size(sizes[0] as u64).count();
    let x = w.agent("x", &[]);
    let accused = [x.field("peer")];
    for id in ["r1", "r2"] {
        report(&w.origin_addr(), id, &d, n, &accused).await;
    }
    // The origin is the only source, and it sends a suspect nothing new.
    let pull = {
        let (m, d) = (x.field("mirror"), d.clone());
        tokio::spawn(async move { get_blob(&m, REPO, &d).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let from_origin = "mwdist_bytes_down_total{source=\"origin\"}";
    assert_eq!(metric(&x.field("peer"), from_origin).await, 0, "no piece for a suspect");
    assert!(!pull.is_finished());
    // One report alone is not enough: once one reporter takes its report back, x completes.
    report(&w.origin_addr(), "r1", &d, n, &[]).await;
    let bytes = pull.await.expect("pull task").expect("the pull completes");
    assert_eq!(bytes, expected(0, &sizes));
    assert!(metric(&x.field("peer"), from_origin).await >= sizes[0] as u64);
}
