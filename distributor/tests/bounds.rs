//! Bounds and recovery, end to end (a real registry upstream, `mwdist` roles as child
//! processes on loopback): request caps, the origin's disk bound, origins sharing one
//! tracker, and an agent restart resuming a partial blob.

mod common;

use common::*;
use futures_util::FutureExt as _;
use oci_core::testing::TestRegistry;
use oci_core::Digest;
use std::time::{Duration, Instant};

const REPO: &str = "mw/app";

struct World {
    reg: TestRegistry,
    tmp: tempfile::TempDir,
    layers: Vec<Digest>,
    /// Blob sizes of the layers.
    sizes: Vec<u64>,
}

impl World {
    async fn new(sizes: &[usize]) -> World {
        let reg = TestRegistry::start().expect("start docker-registry");
        let tmp = tempdir();
        let (_, layers) = write_image(&tmp.path().join("src"), "v1", sizes);
        push(&tmp.path().join("src"), "v1", &reg.host(), REPO).await;
        let sizes = sizes.iter().enumerate().map(|(i, &n)| layer(i, n).len() as u64).collect();
        World { reg, tmp, layers, sizes }
    }

    fn upstream(&self) -> String {
        format!("docker://{}", self.reg.host())
    }

    fn origin(&self, name: &str, extra: &[&str]) -> Proc {
        let cache = self.tmp.path().join(name);
        let cache = cache.to_str().expect("utf-8 path");
        let up = self.upstream();
        let mut args = vec!["origin", "--upstream", &up, "--listen", "127.0.0.1:0", "--cache-dir", cache];
        args.extend_from_slice(extra);
        Proc::start(&args)
    }
}

fn bearer() -> String {
    format!("Bearer {SECRET}")
}

/// Wait (at most `limit`) until `cond` holds; whether it did.
async fn eventually<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Ask the tracker at `tracker` for the peers of `d` (as a peer holding nothing, which
/// nobody asks for pieces); how many of them hold every piece.
async fn seeders(tracker: &str, d: &Digest, size: u64) -> usize {
    let n = mwdist::pieces::Geometry::for_size(size).count();
    let empty = mwdist::pieces::Bitfield::new(n);
    let a = mwdist::api::Announce {
        peer_id: "test-observer".into(),
        addr: "127.0.0.1:9".into(),
        digest: d.to_string(),
        pieces: n,
        have: empty.to_hex(),
        dropped: Vec::new(),
    };
    let url = format!("http://{tracker}/dist/v1/announce");
    let Ok(r) = client().post(url).header("authorization", bearer()).json(&a).send().await else { return 0 };
    let Ok(reply) = r.json::<mwdist::api::AnnounceReply>().await else { return 0 };
    reply.peers.iter().filter(|p| mwdist::pieces::Bitfield::from_hex(&p.have, n).is_some_and(|b| b.is_full())).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_at_its_request_cap_refuses_at_once_and_pullers_go_elsewhere() {
    // 40 MiB: 128 KiB pieces, more than one burst of the rate limiter (64 KiB), so that
    // a piece sent at 1 KiB/s stays in flight for the whole test.
    let sizes: [usize; 1] = [40 << 20];
    assert!(mwdist::pieces::piece_size_for(sizes[0] as u64) > 64 << 10);
    let w = World::new(&sizes).await;
    let d = &w.layers[0];
    let origin = w.origin("origin", &[]);
    let o = origin.field("listening");
    let a = agent(&o, &w.tmp.path().join("a"), &["--max-requests", "1", "--rate-up", "1K"]);
    let bytes = get_blob(&a.field("mirror"), REPO, d).await.expect("agent a pulls");
    assert_eq!(Digest::of(&bytes), *d);
    let c = client();
    let peer = a.field("peer");
    let piece = |i: usize| format!("http://{peer}/dist/v1/piece/{d}/{i}");

    // One request in flight (its body crawls at 1 KiB/s) takes the only slot.
    let mut held = c.get(piece(0)).header("authorization", bearer()).send().await.expect("piece 0");
    assert_eq!(held.status(), 200);
    assert!(held.chunk().await.expect("first bytes of piece 0").is_some());
    let refused = c.get(piece(1)).header("authorization", bearer()).send().await.expect("piece 1");
    assert_eq!(refused.status(), 503, "a second request is refused");
    assert_eq!(refused.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    assert!(refused.bytes().await.expect("body").is_empty(), "and sent nothing");
    assert_eq!(metric(&peer, "mwdist_requests_refused_total").await, 1, "/metrics is outside the cap");

    // Another agent pulling meanwhile is refused by a and gets the blob elsewhere.
    let known = eventually(Duration::from_secs(10), || seeders(&o, d, w.sizes[0]).map(|n| n == 1)).await;
    assert!(known, "the tracker learns that a has the blob");
    let b = agent(&o, &w.tmp.path().join("b"), &[]);
    let bytes = get_blob(&b.field("mirror"), REPO, d).await.expect("agent b pulls despite a busy peer");
    assert_eq!(Digest::of(&bytes), *d);
    assert!(metric(&peer, "mwdist_requests_refused_total").await > 1, "b asked a and was refused");
    assert_eq!(metric(&peer, "mwdist_bytes_up_total{to=\"peers\"}").await, 64 << 10, "a sent only one burst");

    // The slot comes back once the held response is dropped.
    drop(held);
    let freed = eventually(Duration::from_secs(10), || async {
        let r = c.get(piece(1)).header("authorization", bearer()).send().await;
        r.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(freed, "the slot of a dropped response is released");

    // The origin too: one slot, held by a piece crawling at 1 KiB/s.
    let capped = w.origin("origin2", &["--max-requests", "1", "--rate-up", "1K"]);
    let o2 = capped.field("listening");
    let none = mwdist::pieces::Bitfield::new(mwdist::pieces::Geometry::for_size(w.sizes[0]).count()).to_hex();
    let mut held = c
        .get(format!("http://{o2}/dist/v1/seed/{d}?name={REPO}&skip={none}"))
        .header("authorization", bearer())
        .send()
        .await
        .expect("a piece from the origin");
    assert_eq!(held.status(), 200);
    assert!(held.chunk().await.expect("first bytes").is_some());
    for url in [
        format!("http://{o2}/dist/v1/pieces/{d}?name={REPO}"),
        format!("http://{o2}/v2/{REPO}/blobs/{d}"),
        format!("http://{o2}/v2/{REPO}/manifests/v1"),
    ] {
        let r = c.get(&url).header("authorization", bearer()).send().await.expect("request");
        assert_eq!(r.status(), 503, "{url}");
        assert!(r.headers().contains_key("retry-after"), "{url}");
    }
    assert_eq!(metric(&o2, "mwdist_requests_refused_total").await, 3);
}

/// GET `path` from `addr` with the secret on a socket with a tiny receive buffer, read the
/// response head, and return the socket unread: the server's body stays in flight.
async fn held_get(addr: &str, path: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("small receive buffer");
    let mut s = sock.connect(addr.parse().expect("address")).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: {}\r\n\r\n", bearer());
    s.write_all(req.as_bytes()).await.expect("send the request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).await.expect("response head"), 1, "the connection closed");
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_cache_bound_evicts_the_least_recently_used_blob_not_being_served() {
    let sizes = [12 << 20, 300 << 10, 300 << 10];
    let w = World::new(&sizes).await;
    let bound = w.sizes[0] + w.sizes[1] + (w.sizes[2] / 2);
    let origin = w.origin("origin", &["--cache-max", &bound.to_string()]);
    let o = origin.field("listening");
    let c = client();
    let get = |i: usize| {
        let (c, url) = (c.clone(), format!("http://{o}/v2/{REPO}/blobs/{}", w.layers[i]));
        async move {
            let r = c.get(url).header("authorization", bearer()).send().await.expect("blob from the origin");
            assert_eq!(r.status(), 200);
            Digest::of(&r.bytes().await.expect("blob bytes"))
        }
    };
    let cached = |i: usize| w.tmp.path().join("origin/blobs").join(w.layers[i].hex()).exists();
    assert_eq!(get(0).await, w.layers[0]);
    // A client is being sent blob 0 (and reads nothing) while blobs 1 then 2 are fetched.
    let held = held_get(&o, &format!("/v2/{REPO}/blobs/{}", w.layers[0])).await;
    assert_eq!(get(1).await, w.layers[1]);
    assert!(cached(0) && cached(1), "under the bound");
    assert_eq!(get(2).await, w.layers[2]);
    let evicted = eventually(Duration::from_secs(10), || async { !cached(1) }).await;
    assert!(evicted, "blob 1 is evicted");
    assert!(cached(0), "blob 0 is least recently used but being served: kept");
    assert!(cached(2), "the newest blob is kept");
    let sent = metric(&o, "mwdist_bytes_up_total{to=\"clients\"}").await;
    assert!(sent < 2 * w.sizes[0] + w.sizes[1] + w.sizes[2], "blob 0 was still being sent ({sent} bytes sent)");
    // Once released, blob 0 is the first to go.
    drop(held);
    assert_eq!(get(1).await, w.layers[1], "an evicted blob is fetched again and verified");
    let evicted = eventually(Duration::from_secs(10), || async { !cached(0) }).await;
    assert!(evicted, "blob 0 is evicted once no longer served");
    assert!(cached(1) && cached(2));
    // The counter moves just after the file is gone.
    eventually(Duration::from_secs(5), || async { metric(&o, "mwdist_blobs_evicted_total").await >= 2 }).await;
    assert_eq!(metric(&o, "mwdist_blobs_evicted_total").await, 2);
    let upstream = metric(&o, "mwdist_bytes_down_total{source=\"upstream\"}").await;
    assert_eq!(upstream, w.sizes[0] + 2 * w.sizes[1] + w.sizes[2], "blob 1 was read from upstream twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_sharing_a_tracker_form_one_swarm_and_a_tracker_restart_loses_nothing() {
    let sizes = [2 << 20];
    let w = World::new(&sizes).await;
    let d = &w.layers[0];
    let mut tracker = Proc::start(&["tracker", "--listen", "127.0.0.1:0"]);
    let t = tracker.field("listening");
    let o1 = w.origin("o1", &["--tracker", &t]);
    let o2 = w.origin("o2", &["--tracker", &t]);
    // a1 announces to its origin, which forwards to the shared tracker.
    let a1 = agent(&o1.field("listening"), &w.tmp.path().join("a1"), &[]);
    let bytes = get_blob(&a1.field("mirror"), REPO, d).await.expect("a1 pulls through o1");
    assert_eq!(Digest::of(&bytes), *d);
    let known = eventually(Duration::from_secs(10), || seeders(&t, d, w.sizes[0]).map(|n| n == 1)).await;
    assert!(known, "the shared tracker knows a1 holds the blob");
    // a2, behind the other origin, finds a1 there.
    let a2 = agent(&o2.field("listening"), &w.tmp.path().join("a2"), &[]);
    let bytes = get_blob(&a2.field("mirror"), REPO, d).await.expect("a2 pulls through o2");
    assert_eq!(Digest::of(&bytes), *d);
    assert!(metric(&a2.field("peer"), "mwdist_bytes_down_total{source=\"peers\"}").await > 0, "a2 got pieces from a1");

    // The tracker restarts empty; the seeders' announcements rebuild it.
    tracker.kill();
    tracker = Proc::start(&["tracker", "--listen", &t]);
    assert_eq!(tracker.field("listening"), t);
    let rebuilt = eventually(Duration::from_secs(10), || seeders(&t, d, w.sizes[0]).map(|n| n == 2)).await;
    assert!(rebuilt, "both seeders are known again");
    // An agent announcing to the tracker directly finds them.
    let a3 = agent(&o1.field("listening"), &w.tmp.path().join("a3"), &["--tracker", &t]);
    let bytes = get_blob(&a3.field("mirror"), REPO, d).await.expect("a3 pulls");
    assert_eq!(Digest::of(&bytes), *d);
    assert!(
        metric(&a3.field("peer"), "mwdist_bytes_down_total{source=\"peers\"}").await > 0,
        "a3 got pieces from peers"
    );
    for o in [&o1, &o2] {
        assert_eq!(metric(&o.field("listening"), "mwdist_requests_refused_total").await, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_keeps_the_verified_pieces_of_a_partial_blob() {
    let sizes = [8 << 20];
    let w = World::new(&sizes).await;
    let d = &w.layers[0];
    let size = w.sizes[0];
    let geo = mwdist::pieces::Geometry::for_size(size);
    let origin = w.origin("origin", &[]);
    let o = origin.field("listening");
    let data = w.tmp.path().join("a");
    let mut a = agent(&o, &data, &["--rate-down", "1MiB"]);
    let (mirror, peer) = (a.field("mirror"), a.field("peer"));
    let pull = tokio::spawn({
        let d = d.clone();
        async move { get_blob(&mirror, REPO, &d).await }
    });
    // Kill the agent part-way: at least a quarter of the pieces verified.
    let quarter = geo.count() as u64 / 4;
    let part_way = eventually(Duration::from_secs(20), || async {
        metric(&peer, "mwdist_pieces_verified_total").await >= quarter
    })
    .await;
    assert!(part_way, "the agent verified some pieces");
    a.kill();
    let _ = pull.await;
    assert!(!data.join("blobs").join(d.hex()).exists(), "killed before the blob was complete");
    let partial = data.join("partial").join(d.hex());
    let on_disk = std::fs::read(&partial).expect("the partial blob is left");
    let want = layer(0, sizes[0]);
    let piece = |b: &[u8], i: usize| {
        let (s, e) = geo.range(i);
        b[s as usize..e as usize].to_vec()
    };
    let intact: Vec<usize> = (0..geo.count()).filter(|&i| piece(&on_disk, i) == piece(&want, i)).collect();
    assert!(intact.len() as u64 >= quarter, "every verified piece is on disk: {} of {quarter}", intact.len());
    assert!(intact.len() < geo.count(), "some pieces are missing");
    // Damage one of them: it must be fetched again, not trusted.
    let damaged = intact[0];
    {
        use std::os::unix::fs::FileExt as _;
        let f = std::fs::OpenOptions::new().write(true).open(&partial).expect("partial");
        f.write_all_at(&[0xAA; 16], geo.range(damaged).0).expect("damage a piece");
    }
    let kept: u64 = intact[1..].iter().map(|&i| geo.len_of(i)).sum();
    let a = agent(&o, &data, &[]);
    let bytes = get_blob(&a.field("mirror"), REPO, d).await.expect("the restarted agent completes");
    assert_eq!(Digest::of(&bytes), *d);
    let peer = a.field("peer");
    let resumed = metric(&peer, "mwdist_pieces_resumed_total").await;
    let fetched = metric(&peer, "mwdist_bytes_down_total{source=\"origin\"}").await
        + metric(&peer, "mwdist_bytes_down_total{source=\"peers\"}").await;
    assert_eq!(resumed, intact.len() as u64 - 1, "every intact piece but the damaged one is reused");
    let remainder = size - kept;
    assert!(fetched >= remainder, "fetched {fetched}, remainder {remainder}");
    assert!(fetched <= remainder + 2 * geo.piece_size, "fetched {fetched}: more than the remainder {remainder}");
    assert_eq!(metric(&peer, "mwdist_pieces_verified_total").await + resumed, geo.count() as u64);
}
