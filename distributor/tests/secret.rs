//! The cluster secret: no origin, tracker or peer endpoint answers without it (not even
//! with a 404 that would tell which paths exist), and `/metrics` stays scrapeable on
//! every role.

mod common;

use common::*;
use oci_core::testing::TestRegistry;
use oci_core::Digest;

const REPO: &str = "mw/app";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_origin_tracker_or_peer_endpoint_answers_without_the_secret() {
    let reg = TestRegistry::start().expect("start docker-registry");
    let tmp = tempdir();
    let (_, layers) = write_image(&tmp.path().join("src"), "v1", &[100 << 10]);
    push(&tmp.path().join("src"), "v1", &reg.host(), REPO).await;
    let d: &Digest = &layers[0];
    let tracker = Proc::start(&["tracker", "--listen", "127.0.0.1:0"]);
    let t = tracker.field("listening");
    let origin = origin(&format!("docker://{}", reg.host()), &tmp.path().join("origin"), "127.0.0.1:0", None);
    let o = origin.field("listening");
    let a = agent(&o, &tmp.path().join("a"), &[]);
    get_blob(&a.field("mirror"), REPO, d).await.expect("pull");
    let p = a.field("peer");
    let n = mwdist::pieces::Geometry::for_size(layer(0, 100 << 10).len() as u64).count();
    let none = mwdist::pieces::Bitfield::new(n).to_hex();
    let announce = serde_json::json!({
        "peer_id": "intruder", "addr": "127.0.0.1:9", "digest": d.to_string(), "pieces": n,
        "have": mwdist::pieces::Bitfield::full(n).to_hex(),
    });
    let gets = [
        // The origin: distribution API, piece manifests, pieces, tracker.
        format!("http://{o}/v2/"),
        format!("http://{o}/v2/{REPO}/manifests/v1"),
        format!("http://{o}/v2/{REPO}/blobs/{d}"),
        format!("http://{o}/dist/v1/pieces/{d}?name={REPO}"),
        format!("http://{o}/dist/v1/seed/{d}?name={REPO}&skip={none}"),
        format!("http://{o}/dist/v1/availability/{d}?pieces={n}"),
        format!("http://{o}/no/such/path"),
        // The tracker alone.
        format!("http://{t}/dist/v1/availability/{d}?pieces={n}"),
        format!("http://{t}/no/such/path"),
        // An agent's peer port.
        format!("http://{p}/dist/v1/piece/{d}/0"),
        format!("http://{p}/v2/{REPO}/blobs/{d}"),
        format!("http://{p}/no/such/path"),
    ];
    let c = client();
    for u in &gets {
        for auth in [None, Some("Bearer wrong-secret-wrong-secret"), Some(SECRET)] {
            let mut req = c.get(u);
            if let Some(h) = auth {
                req = req.header("authorization", h);
            }
            let resp = req.send().await.expect("request");
            assert_eq!(resp.status(), 401, "GET {u} with {auth:?}");
            let body = resp.text().await.expect("body");
            assert!(body.contains("UNAUTHORIZED") && !body.contains(d.hex()), "GET {u}: {body}");
        }
    }
    for tracker in [&o, &t] {
        let url = format!("http://{tracker}/dist/v1/announce");
        let resp = c.post(&url).json(&announce).send().await.expect("announce");
        assert_eq!(resp.status(), 401, "POST {url}");
        // Nothing was recorded: a peer with the secret is not told about the intruder.
        let mut me = announce.clone();
        me["peer_id"] = "observer".into();
        me["have"] = none.clone().into();
        let reply: mwdist::api::AnnounceReply = c
            .post(&url)
            .header("authorization", format!("Bearer {SECRET}"))
            .json(&me)
            .send()
            .await
            .expect("announce with the secret")
            .json()
            .await
            .expect("announce reply");
        assert!(reply.peers.iter().all(|p| p.peer_id != "intruder"), "{url}: {:?}", reply.peers);
    }
    // With the secret, each family answers.
    for u in [&gets[1], &gets[3], &gets[5], &gets[7], &gets[9]] {
        let ok = c.get(u).header("authorization", format!("Bearer {SECRET}")).send().await.expect("request");
        assert!(ok.status().is_success(), "GET {u} with the secret: {}", ok.status());
    }
    // /metrics needs no secret, on every role.
    for addr in [&o, &t, &p, &a.field("mirror")] {
        let r = c.get(format!("http://{addr}/metrics")).send().await.expect("metrics");
        assert_eq!(r.status(), 200, "{addr}/metrics");
        assert!(r.text().await.expect("text").contains("# TYPE mwdist_requests_refused_total counter"));
    }
}
