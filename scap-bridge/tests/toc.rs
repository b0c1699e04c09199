//! Images written by mwbuild carry a table of contents per layer: a cold prep reads every
//! layer once; after a rebuild with K edited files only the changed layers are read and
//! only the changed files are written (≤ 1.05× their bytes); a TOC that lies about its
//! layer is caught before anything is visible.

mod common;

use common::*;
use mwbuild::build::{build, BuildOptions};
use mwbuild::spec::Spec;
use mwfixture::{edit_files, generate_train, Size, TrainOptions};
use scap_bridge::engine::apply;
use scap_bridge::testing::{Compress, RawTar, TestImage};
use std::path::Path;

fn build_into(spec: &Spec, layout: &Path, cache: &Path) -> R {
    let opts = BuildOptions {
        output: format!("oci:{}", layout.display()).parse()?,
        cache_dir: cache.to_path_buf(),
        jobs: 2,
        registry: oci_core::registry::ClientOptions::default(),
        progress: false,
        now: None,
    };
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(build(spec, &opts))?;
    Ok(())
}

#[test]
fn builder_tocs_make_prep_single_pass_and_incremental() -> R {
    let t = tmp();
    let train = generate_train(
        &t.path().join("train"),
        &TrainOptions { seed: 5, size: Size::Tiny, versions: 1, churn: 0.0, force: false },
    )?;
    let spec = Spec::load(&train.spec)?;
    let (layout, cache) = (t.path().join("layout"), t.path().join("cache"));
    build_into(&spec, &layout, &cache)?;
    let v = train.versions[0].clone();
    let staging = t.path().join("staging");
    std::fs::create_dir_all(&staging)?;
    let state = t.path().join("state");
    let s = apply(&prep_options(&oci(&layout, &v), &v, &staging, &state))?;
    assert_eq!(s.layers_read, s.layers, "cold prep reads each layer exactly once: {s:?}");

    // Edit K files in the source and rebuild: the new image shares most layers.
    let edited = edit_files(&train.version_dir(&v), 3, 9)?;
    let changed_bytes: u64 = edited
        .iter()
        .map(|p| std::fs::metadata(train.version_dir(&v).join(p)).map(|m| m.len()))
        .sum::<Result<u64, _>>()?;
    build_into(&spec, &layout, &cache)?;
    let s2 = apply(&prep_options(&oci(&layout, &v), &v, &staging, &state))?;
    let prov = std::fs::metadata(staging.join(format!("php-{v}/.scap-bridge-provenance.json")))?.len();
    assert_eq!((s2.counts.changed, s2.counts.added, s2.counts.removed), (edited.len() as u64 + 1, 0, 0), "{s2:?}");
    assert!(
        s2.bytes_written as f64 <= 1.05 * changed_bytes as f64 + prov as f64,
        "{} bytes for {changed_bytes}",
        s2.bytes_written
    );
    assert!(s2.layers_read < s2.layers, "unchanged layers are not read again: {s2:?}");
    for p in &edited {
        assert_eq!(
            std::fs::read(staging.join(format!("php-{v}")).join(p))?,
            std::fs::read(train.version_dir(&v).join(p))?
        );
    }
    Ok(())
}

#[test]
fn a_lying_toc_is_caught() -> R {
    let t = tmp();
    let mut tar = RawTar::new();
    tar.dir("srv/", 0o755).dir("srv/mediawiki/", 0o755).dir("srv/mediawiki/php-1.0/", 0o755);
    tar.file("srv/mediawiki/php-1.0/a.php", 0o644, b"real");
    let sha = |b: &[u8]| oci_core::Digest::of(b).to_string();
    let toc = |content: &[u8]| {
        serde_json::to_vec(&serde_json::json!({
            "mediaType": oci_core::media::TOC_MEDIA_TYPE,
            "entries": [
                { "path": "srv", "type": "dir", "mode": 0o755 },
                { "path": "srv/mediawiki", "type": "dir", "mode": 0o755 },
                { "path": "srv/mediawiki/php-1.0", "type": "dir", "mode": 0o755 },
                { "path": "srv/mediawiki/php-1.0/a.php", "type": "file", "mode": 0o644, "size": 4, "sha256": sha(content) },
            ],
        }))
    };
    let bytes = tar.finish();
    let staging = t.path().join("staging");
    std::fs::create_dir_all(&staging)?;
    TestImage::new().layer(&bytes, Compress::Zstd).toc(&toc(b"real")?).write(&t.path().join("ok"), "v")?;
    let s = apply(&prep_options(&oci(&t.path().join("ok"), "v"), "1.0", &staging, &t.path().join("state-ok")))?;
    assert_eq!(s.layers_read, 1);
    let before = facts(&staging)?;
    TestImage::new().layer(&bytes, Compress::Zstd).toc(&toc(b"lies")?).write(&t.path().join("bad"), "v")?;
    let e = apply(&prep_options(&oci(&t.path().join("bad"), "v"), "1.0", &staging, &t.path().join("state-bad")));
    let msg = e.map(|_| String::new()).unwrap_or_else(|e| e.to_string());
    assert!(msg.contains("table of contents said") && msg.contains("a.php"), "{msg}");
    // The staging directory's own mtime moves (our temporary tree came and went); nothing
    // in it changed.
    let mut after = facts(&staging)?;
    after.remove("");
    let mut before = before;
    before.remove("");
    assert_eq!(after, before);
    Ok(())
}
