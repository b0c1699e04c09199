//! `mwbuild build` against a real registry (Debian's `docker-registry` on 127.0.0.1),
//! checked with skopeo.

use mwbuild::build::{build, BuildOptions};
use mwbuild::report::Report;
use mwbuild::spec::Spec;
use mwfixture::{generate_train, Size, Train, TrainOptions};
use oci_core::registry::{ClientOptions, RegistryClient};
use oci_core::testing::TestRegistry;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime")
}

fn opts(output: &str, cache: &Path) -> BuildOptions {
    BuildOptions {
        output: output.parse().expect("output ref"),
        cache_dir: cache.to_path_buf(),
        jobs: 2,
        registry: ClientOptions { max_attempts: 2, ..ClientOptions::default() },
        progress: false,
        now: None,
    }
}

fn train(dir: &Path, size: Size, versions: usize) -> R<Train> {
    Ok(generate_train(
        &dir.join("train"),
        &TrainOptions { seed: 3, size, versions, churn: 0.05, ..TrainOptions::default() },
    )?)
}

fn skopeo(args: &[&str]) -> R<String> {
    let o = Command::new("skopeo").args(args).output()?;
    if !o.status.success() {
        return Err(format!("skopeo {args:?}: {}", String::from_utf8_lossy(&o.stderr)).into());
    }
    Ok(String::from_utf8_lossy(&o.stdout).to_string())
}

fn have_tools() -> bool {
    let ok = Command::new("skopeo").arg("--version").output().is_ok_and(|o| o.status.success())
        && Path::new("/usr/bin/docker-registry").exists();
    if !ok {
        eprintln!("SKIP: needs skopeo and docker-registry (bash scripts/install-test-deps.sh)");
    }
    ok
}

fn tags(host: &str, repo: &str) -> R<Vec<String>> {
    let c = RegistryClient::new(host, &ClientOptions { insecure: true, max_attempts: 2, ..ClientOptions::default() })?;
    Ok(rt().block_on(c.list_tags(repo))?)
}

#[test]
fn push_is_accepted_by_skopeo_and_rebuild_pushes_nothing() -> R {
    if !have_tools() {
        return Ok(());
    }
    let reg = TestRegistry::start()?;
    let tmp = tempfile::tempdir()?;
    let t = train(tmp.path(), Size::Tiny, 2)?;
    let spec = Spec::load(&t.spec)?;
    let out = format!("docker://{}/mediawiki/app", reg.host());
    let r = rt().block_on(build(&spec, &opts(&out, &tmp.path().join("cache"))))?;

    // Every distinct blob went up exactly once: the aggregate uploaded only its config
    // and manifest.
    let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
    for l in &r.layers {
        sizes.insert(l.digest.to_string(), l.size);
    }
    let pushed_layers: u64 = r.layers.iter().map(|l| l.bytes_pushed).sum();
    assert_eq!(pushed_layers, sizes.values().sum::<u64>());

    for img in &r.images {
        let tag = &img.tags[0];
        let j: serde_json::Value = serde_json::from_str(&skopeo(&[
            "inspect",
            "--tls-verify=false",
            &format!("docker://{}/mediawiki/app:{tag}", reg.host()),
        ])?)?;
        assert_eq!(j["Digest"].as_str(), Some(img.digest.to_string().as_str()), "skopeo sees another digest for {tag}");
        assert_eq!(img.image_name, format!("{}/mediawiki/app:{tag}", reg.host()));
    }
    // skopeo copy verifies every blob against its digest on the way.
    let copy = tmp.path().join("copy");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/mediawiki/app:multiversion", reg.host()),
        &format!("oci:{}:x", copy.display()),
    ])?;
    let agg = r.images.iter().find(|i| i.flavour == "multiversion").ok_or("no aggregate")?;
    let copied = oci_core::layout::Layout::open(&copy)?.resolve_tag(Some("x"))?;
    assert_eq!(oci_core::Digest::from_oci(copied.digest())?, agg.digest, "skopeo copy changed the manifest");

    let again = rt().block_on(build(&spec, &opts(&out, &tmp.path().join("cache"))))?;
    assert_eq!(again.totals.pushed, 0);
    assert!(again.totals.skipped > 0);
    assert!(again.layers.iter().all(|l| !l.rebuilt));

    // Another repository of the same registry: every blob is mounted, none uploaded.
    let other = format!("docker://{}/mediawiki/other", reg.host());
    let third = rt().block_on(build(&spec, &opts(&other, &tmp.path().join("cache"))))?;
    assert_eq!(third.totals.pushed, 0, "{:?}", third.totals);
    assert!(third.totals.mounted >= sizes.values().sum::<u64>(), "{:?}", third.totals);
    skopeo(&["inspect", "--tls-verify=false", &format!("docker://{}/mediawiki/other:multiversion", reg.host())])?;
    Ok(())
}

#[test]
fn registry_down_gives_clear_error_and_no_tag() -> R {
    if !have_tools() {
        return Ok(());
    }
    let mut reg = TestRegistry::start()?;
    let tmp = tempfile::tempdir()?;
    let t = train(tmp.path(), Size::Tiny, 1)?;
    let spec = Spec::load(&t.spec)?;
    reg.stop();
    let out = format!("docker://{}/mediawiki/app", reg.host());
    let e = rt().block_on(build(&spec, &opts(&out, &tmp.path().join("cache")))).expect_err("registry is down");
    let msg = format!("{e}");
    assert!(msg.contains(&reg.host()) && msg.contains("unreachable"), "{msg}");
    reg.restart()?;
    assert!(tags(&reg.host(), "mediawiki/app")?.is_empty());
    Ok(())
}

#[test]
fn push_interrupted_by_registry_restart_completes_when_rerun() -> R {
    if !have_tools() {
        return Ok(());
    }
    let mut reg = TestRegistry::start()?;
    let tmp = tempfile::tempdir()?;
    let t = train(tmp.path(), Size::Small, 1)?;
    let spec = Spec::load(&t.spec)?;
    let out = format!("docker://{}/mediawiki/app", reg.host());
    let cache = tmp.path().join("cache");
    // Build the layers first so that the interrupted run spends its time pushing.
    let local = format!("oci:{}", tmp.path().join("local").display());
    rt().block_on(build(&spec, &opts(&local, &cache)))?;

    let uploads = reg.storage_dir().join("docker/registry/v2/repositories/mediawiki/app/_uploads");
    let (spec2, out2, cache2) = (spec.clone(), out.clone(), cache.clone());
    let h = std::thread::spawn(move || rt().block_on(build(&spec2, &opts(&out2, &cache2))).map_err(|e| e.to_string()));
    let t0 = Instant::now();
    while !uploads.exists() && t0.elapsed() < Duration::from_secs(60) && !h.is_finished() {
        std::thread::sleep(Duration::from_millis(1));
    }
    reg.stop();
    let first = h.join().map_err(|_| "build thread panicked")?;
    assert!(first.is_err(), "the push finished before the registry went down; nothing was interrupted");
    reg.restart()?;
    assert!(tags(&reg.host(), "mediawiki/app")?.is_empty(), "an interrupted push left a tag");
    let r: Report = rt().block_on(build(&spec, &opts(&out, &cache)))?;
    let v = &t.versions[0];
    let j: serde_json::Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{}/mediawiki/app:{v}", reg.host()),
    ])?)?;
    let img = r.images.iter().find(|i| &i.flavour == v).ok_or("version image missing")?;
    assert_eq!(j["Digest"].as_str(), Some(img.digest.to_string().as_str()));
    Ok(())
}

#[test]
fn base_on_same_registry_is_mounted_not_uploaded() -> R {
    if !have_tools() {
        return Ok(());
    }
    let reg = TestRegistry::start()?;
    let tmp = tempfile::tempdir()?;
    let t = train(tmp.path(), Size::Tiny, 1)?;
    let base_ref = format!("docker://{}/base/tiny:latest", reg.host());
    skopeo(&["copy", "--dest-tls-verify=false", &format!("oci:{}:latest", t.root.join("base").display()), &base_ref])?;
    let j: serde_json::Value = serde_json::from_str(&skopeo(&["inspect", "--tls-verify=false", &base_ref])?)?;
    let digest = j["Digest"].as_str().ok_or("no digest")?;
    let text = std::fs::read_to_string(&t.spec)?.replace(
        "image = \"oci:base:latest\"",
        &format!(
            "image = \"docker://{}/base/tiny@{digest}\"\nallowed_registries = [\"{}/base/\"]",
            reg.host(),
            reg.host()
        ),
    );
    std::fs::write(&t.spec, text)?;
    let spec = Spec::load(&t.spec)?;
    let r = rt()
        .block_on(build(&spec, &opts(&format!("docker://{}/mediawiki/app", reg.host()), &tmp.path().join("cache"))))?;
    assert!(r.totals.mounted > 0, "base layers were not mounted: {:?}", r.totals);
    assert_eq!(r.base_layers, 1);
    // The result is a complete image.
    skopeo(&["inspect", "--tls-verify=false", &format!("docker://{}/mediawiki/app:multiversion", reg.host())])?;
    Ok(())
}
