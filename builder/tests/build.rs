//! End-to-end tests of `mwbuild build` on generated MediaWiki-shaped trees, checked with
//! independent tools (umoci, oci-image-tool, skopeo) where they are installed.

use mwbuild::build::{build, BuildOptions};
use mwbuild::report::Report;
use mwbuild::spec::Spec;
use mwfixture::{generate_train, Size, Train, TrainOptions};
use oci_core::layout::Layout;
use oci_core::reference::ImageRef;
use oci_core::registry::ClientOptions;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime")
}

fn train(dir: &Path, versions: usize) -> R<Train> {
    Ok(generate_train(
        &dir.join("train"),
        &TrainOptions { seed: 7, size: Size::Tiny, versions, churn: 0.05, ..TrainOptions::default() },
    )?)
}

fn opts(out: &Path, cache: &Path, jobs: usize) -> BuildOptions {
    BuildOptions {
        output: format!("oci:{}", out.display()).parse().expect("ref"),
        cache_dir: cache.to_path_buf(),
        jobs,
        registry: ClientOptions::default(),
        progress: false,
        now: None,
    }
}

fn run_build(spec: &Spec, o: &BuildOptions) -> R<Report> {
    Ok(rt().block_on(build(spec, o))?)
}

/// flavour -> ordered layer digests, from the layout itself.
fn layers_by_tag(out: &Path) -> R<BTreeMap<String, Vec<String>>> {
    let l = Layout::open(out)?;
    let mut m = BTreeMap::new();
    for (tag, desc) in l.tags()? {
        if tag.starts_with("sha256-") {
            continue;
        }
        let d = oci_core::Digest::from_oci(desc.digest())?;
        let v: serde_json::Value = serde_json::from_slice(&l.read_blob(&d, None)?)?;
        let layers = v["layers"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x["digest"].as_str().map(String::from)).collect())
            .unwrap_or_default();
        m.insert(tag, layers);
    }
    Ok(m)
}

fn digests(r: &Report) -> Vec<String> {
    r.images.iter().map(|i| format!("{}={}", i.flavour, i.digest)).collect()
}

/// Copy a tree in reverse name order, with scrambled mtimes and group-writable modes (as
/// a different umask would give).
fn scrambled_copy(src: &Path, dst: &Path, salt: i64) -> R {
    fs::create_dir_all(dst)?;
    let mut names: Vec<_> = fs::read_dir(src)?.collect::<Result<Vec<_>, _>>()?;
    names.sort_by_key(|e| std::cmp::Reverse(e.file_name()));
    for e in names {
        let (s, d) = (e.path(), dst.join(e.file_name()));
        let ft = e.file_type()?;
        if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&s)?, &d)?;
            continue;
        }
        if ft.is_dir() {
            scrambled_copy(&s, &d, salt)?;
            fs::set_permissions(&d, fs::Permissions::from_mode(0o775))?;
        } else {
            fs::copy(&s, &d)?;
            let m = fs::metadata(&s)?.permissions().mode();
            fs::set_permissions(&d, fs::Permissions::from_mode(if m & 0o111 != 0 { 0o775 } else { 0o664 }))?;
        }
        let t = filetime(1_000_000 + salt * 7919 + d.as_os_str().len() as i64);
        let f = fs::File::options().write(!ft.is_dir()).read(ft.is_dir()).open(&d)?;
        f.set_modified(t)?;
    }
    Ok(())
}

fn filetime(secs: i64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64)
}

fn spec_with_sources(t: &Train, versions: &[PathBuf]) -> R<Spec> {
    let mut spec = Spec::load(&t.spec)?;
    for (v, src) in spec.versions.iter_mut().zip(versions) {
        v.source = src.clone();
    }
    Ok(spec)
}

#[test]
fn reproducible_across_copies_mtimes_modes_order_and_jobs() -> R {
    let tmp = tempfile::tempdir()?;
    let t = train(tmp.path(), 2)?;
    let spec = Spec::load(&t.spec)?;
    let a = run_build(&spec, &opts(&tmp.path().join("a"), &tmp.path().join("cache-a"), 1))?;
    // A scrambled copy of every tree, built with another cache and thread count.
    let mut copies = Vec::new();
    for (i, v) in spec.versions.iter().enumerate() {
        let c = tmp.path().join(format!("copy-{i}"));
        scrambled_copy(&v.source, &c, i as i64 + 3)?;
        copies.push(c);
    }
    let spec_b = spec_with_sources(&t, &copies)?;
    let b = run_build(&spec_b, &opts(&tmp.path().join("b"), &tmp.path().join("cache-b"), 4))?;
    assert_eq!(digests(&a), digests(&b));
    assert!(
        b.layers.iter().all(|l| l.rebuilt),
        "second build had its own cache, so it must have compressed everything"
    );
    Ok(())
}

#[test]
fn aggregate_reuses_version_layers_and_noop_compresses_nothing() -> R {
    let tmp = tempfile::tempdir()?;
    let t = train(tmp.path(), 2)?;
    let spec = Spec::load(&t.spec)?;
    let (out, cache) = (tmp.path().join("out"), tmp.path().join("cache"));
    let first = run_build(&spec, &opts(&out, &cache, 2))?;
    let tags = layers_by_tag(&out)?;
    let agg: BTreeSet<&String> = tags["multiversion"].iter().collect();
    for v in &t.versions {
        for d in &tags[v] {
            assert!(agg.contains(d), "layer {d} of {v} missing from the aggregate");
        }
    }
    // Every layer of the aggregate is the base's, a shared one, or one version's.
    let union: BTreeSet<&String> = t.versions.iter().flat_map(|v| tags[v].iter()).collect();
    assert_eq!(agg, union);
    assert!(
        tags.keys().any(|k| k.ends_with("-multiversion") && k.len() == "2026-01-01-000000-multiversion".len()),
        "date tag missing: {tags:?}"
    );
    assert!(first.layers.len() <= 64 && tags["multiversion"].len() <= 64);

    // An hour later, the same content: the date tag that names it stays the only one,
    // and the output is not written at all.
    let index_before = fs::read(out.join("index.json"))?;
    let mut later = opts(&out, &cache, 2);
    later.now = Some(time::OffsetDateTime::now_utc() + time::Duration::hours(1));
    let again = run_build(&spec, &later)?;
    assert_eq!(digests(&first), digests(&again));
    assert!(again.layers.iter().all(|l| !l.rebuilt && l.bytes_compressed == 0), "no-op rebuild compressed something");
    assert_eq!(again.totals.pushed, 0);
    assert_eq!(fs::read(out.join("index.json"))?, index_before, "a no-op build changed the output's index");
    let agg_report = again.images.iter().find(|i| i.flavour == "multiversion").ok_or("no aggregate")?;
    let date_tags = |tags: &BTreeMap<String, Vec<String>>| tags.keys().filter(|k| k.ends_with("-multiversion")).count();
    assert_eq!(date_tags(&layers_by_tag(&out)?), 1);
    assert!(
        agg_report.tags.iter().any(|t| t.ends_with("-multiversion") && tags.contains_key(t)),
        "{:?}",
        agg_report.tags
    );
    // A changed aggregate gets a date tag of its own.
    mwfixture::edit_files(&spec.versions[0].source, 1, 5)?;
    let mut later2 = opts(&out, &cache, 2);
    later2.now = Some(time::OffsetDateTime::now_utc() + time::Duration::hours(2));
    run_build(&spec, &later2)?;
    assert_eq!(date_tags(&layers_by_tag(&out)?), 2);
    Ok(())
}

#[test]
fn one_changed_file_changes_exactly_one_layer() -> R {
    let tmp = tempfile::tempdir()?;
    let t = train(tmp.path(), 1)?;
    let spec = Spec::load(&t.spec)?;
    let (out, cache) = (tmp.path().join("out"), tmp.path().join("cache"));
    run_build(&spec, &opts(&out, &cache, 2))?;
    let before = layers_by_tag(&out)?[&t.versions[0]].clone();
    let changed = mwfixture::edit_files(&spec.versions[0].source, 1, 99)?;
    assert_eq!(changed.len(), 1);
    let r = run_build(&spec, &opts(&out, &cache, 2))?;
    let after = layers_by_tag(&out)?[&t.versions[0]].clone();
    assert_eq!(before.len(), after.len());
    let differing = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 1, "editing {changed:?} changed {differing} layers");
    assert_eq!(r.layers.iter().filter(|l| l.rebuilt).count(), 1);
    Ok(())
}

/// A build of `spec` with a cache and an output of its own (named by `n`) under `dir`,
/// with one compression thread.
fn cold_build(spec: &Spec, dir: &Path, n: u64) -> R<Report> {
    run_build(spec, &opts(&dir.join(format!("cold{n}")), &dir.join(format!("cold-cache{n}")), 1))
}

/// A rebuild takes the frames of unchanged segments from the slot's previous blob, and
/// the result is byte for byte what a cold build of the edited tree makes.
#[test]
fn incremental_rebuild_reuses_frames_and_equals_a_cold_build() -> R {
    let tmp = tempfile::tempdir()?;
    let t = train(tmp.path(), 1)?;
    let mut spec = Spec::load(&t.spec)?;
    spec.compression.block_size = 64 * 1024;
    let (out, cache) = (tmp.path().join("out"), tmp.path().join("cache"));
    run_build(&spec, &opts(&out, &cache, 2))?;
    let (mut compressed, mut read) = (0u64, 0u64);
    for seed in 0..3u64 {
        mwfixture::edit_files(&spec.versions[0].source, 2, 500 + seed)?;
        let inc = run_build(&spec, &opts(&out, &cache, 2))?;
        let cold = cold_build(&spec, tmp.path(), seed)?;
        assert_eq!(digests(&inc), digests(&cold), "incremental rebuild {seed} differs from a cold build");
        for l in inc.layers.iter().filter(|l| l.rebuilt) {
            compressed += l.bytes_compressed;
            read += l.bytes_read;
        }
    }
    assert!(read > 0 && compressed * 2 < read, "rebuilt layers compressed {compressed} of {read} bytes");
    Ok(())
}

/// An edit at the end of a layer, then one in its middle: the rebuild keeps the previous blob's
/// frames before the edit as they are (resuming the DiffID where they end), and takes the
/// frames after it from the previous blob once the stream is back in step, so it reads
/// little more than the edited file; the result is still byte for byte a cold build's.
#[test]
fn rebuild_after_an_edit_reads_only_the_frames_around_it() -> R {
    let tmp = tempfile::tempdir()?;
    let t = train(tmp.path(), 1)?;
    let mut spec = Spec::load(&t.spec)?;
    // Small segments, so that the frames around an edit are few bytes of the layer.
    spec.compression.block_size = 2 * 1024;
    let (out, cache) = (tmp.path().join("out"), tmp.path().join("cache"));
    // Past the racy window, so that the stat cache vouches for every file.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let first = run_build(&spec, &opts(&out, &cache, 2))?;
    // The files of the version's largest layer, from that layer's table of contents.
    let big = first.layers.iter().filter(|l| l.version.is_some()).max_by_key(|l| l.bytes_read).ok_or("no layer")?;
    let layout = Layout::open(&out)?;
    let tag = layout.tags()?.into_iter().find(|(t, _)| *t == spec.versions[0].name).ok_or("tag")?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&layout.read_blob(&oci_core::Digest::from_oci(tag.1.digest())?, None)?)?;
    let desc = manifest["layers"]
        .as_array()
        .and_then(|a| a.iter().find(|l| l["digest"].as_str() == Some(big.digest.to_string().as_str())))
        .ok_or("layer not in the manifest")?;
    let toc_digest: oci_core::Digest =
        desc["annotations"][oci_core::media::ANNOTATION_TOC_DIGEST].as_str().ok_or("toc annotation")?.parse()?;
    let toc = mwbuild::layer::parse_toc(&layout.read_blob(&toc_digest, None)?)?;
    let files: Vec<&str> =
        toc.entries.iter().filter(|e| e.kind == mwbuild::layer::TocKind::File).map(|e| e.path.as_str()).collect();
    assert!(files.len() > 20, "the layer has {} files", files.len());
    for (round, path) in [files[files.len() - 1], files[files.len() / 2]].into_iter().enumerate() {
        if round > 0 {
            // Let the last edit leave the racy window: a racy file is never taken unread.
            std::thread::sleep(std::time::Duration::from_millis(2100));
        }
        let rel = path.strip_prefix(&format!("{}/", spec.versions[0].dest)).ok_or("not under the version")?;
        let victim = spec.versions[0].source.join(rel);
        let mut bytes = fs::read(&victim)?;
        bytes.extend_from_slice(b"\n// one more line\n");
        fs::write(&victim, bytes)?;
        let inc = run_build(&spec, &opts(&out, &cache, 2))?;
        let cold = cold_build(&spec, tmp.path(), 10 + round as u64)?;
        assert_eq!(digests(&inc), digests(&cold), "rebuild {round} differs from a cold build");
        let rebuilt: Vec<_> = inc.layers.iter().filter(|l| l.rebuilt).collect();
        assert_eq!(rebuilt.len(), 1, "one layer holds the edit");
        assert_eq!(rebuilt[0].slot, big.slot);
        // The edited file is read twice (hashed, then written); little else is read.
        let victim_size = fs::metadata(&victim)?.len();
        // Bytes of the layer's files before and after the edited one.
        let at = toc.entries.iter().position(|e| e.path == path).ok_or("victim not in the table of contents")?;
        let sizes = |r: &[mwbuild::layer::TocEntry]| r.iter().filter_map(|e| e.size).sum::<u64>();
        let (before, after) = (sizes(&toc.entries[..at]), sizes(&toc.entries[at + 1..]));
        let read = rebuilt[0].bytes_read;
        // The edited file is read twice (hashed, then written); of the rest, only the
        // few segments next to it.
        assert!(
            read < 2 * victim_size + before / 4,
            "rebuild {round} read {read} bytes: the files before the edit were read"
        );
        if round > 0 {
            assert!(after > 8 * 1024, "the edit is not in the middle: {after} bytes follow it");
            assert!(
                read < 2 * victim_size + after / 2,
                "rebuild {round} read {read} bytes: the files after the edit were read"
            );
        }
        assert!(rebuilt[0].bytes_compressed * 4 < big.bytes_read);
    }
    Ok(())
}

#[test]
fn touched_tree_is_rehashed_not_recompressed() -> R {
    let tmp = tempfile::tempdir()?;
    let t = train(tmp.path(), 1)?;
    let spec = Spec::load(&t.spec)?;
    let (out, cache) = (tmp.path().join("out"), tmp.path().join("cache"));
    let first = run_build(&spec, &opts(&out, &cache, 2))?;
    // Same content, new mtimes everywhere: the stat fast path misses, content matches.
    let copy = tmp.path().join("copy");
    scrambled_copy(&spec.versions[0].source, &copy, 11)?;
    fs::remove_dir_all(&spec.versions[0].source)?;
    fs::rename(&copy, &spec.versions[0].source)?;
    let r = run_build(&spec, &opts(&out, &cache, 2))?;
    assert_eq!(digests(&first), digests(&r));
    assert!(r.layers.iter().all(|l| !l.rebuilt), "unchanged content was recompressed");
    assert!(r.totals_read > 0, "changed stat must be re-read");
    Ok(())
}

#[test]
fn corrupt_cache_entry_is_rebuilt_not_used() -> R {
    let tmp = tempfile::tempdir()?;
    let t = train(tmp.path(), 1)?;
    let spec = Spec::load(&t.spec)?;
    let (cache, out1, out2) = (tmp.path().join("cache"), tmp.path().join("o1"), tmp.path().join("o2"));
    let first = run_build(&spec, &opts(&out1, &cache, 2))?;
    let victim = &first.layers[0];
    let p = cache.join("blobs/sha256").join(victim.digest.hex());
    let mut bytes = fs::read(&p)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&p, bytes)?;
    let r = run_build(&spec, &opts(&out2, &cache, 2))?;
    assert_eq!(digests(&first), digests(&r));
    let l = r.layers.iter().find(|l| l.slot == victim.slot).ok_or("slot missing")?;
    assert!(l.rebuilt, "corrupt cached layer was reused");
    Ok(())
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// (path, type, mode, content or link target) of every entry below `root`.
fn listing(root: &Path, exclude: &[&str]) -> R<BTreeMap<String, String>> {
    let mut m = BTreeMap::new();
    fn go(root: &Path, dir: &Path, exclude: &[&str], m: &mut BTreeMap<String, String>) -> R {
        for e in fs::read_dir(dir)? {
            let e = e?;
            let p = e.path();
            let rel = p.strip_prefix(root)?.to_string_lossy().to_string();
            if exclude.iter().any(|x| {
                rel == *x
                    || rel.starts_with(&format!("{x}/"))
                    || rel.ends_with(&format!("/{x}"))
                    || rel.contains(&format!("/{x}/"))
            }) {
                continue;
            }
            let md = fs::symlink_metadata(&p)?;
            let v = if md.file_type().is_symlink() {
                format!("link {}", fs::read_link(&p)?.display())
            } else if md.is_dir() {
                go(root, &p, exclude, m)?;
                "dir".to_string()
            } else {
                format!("file {} {}", md.permissions().mode() & 0o111 != 0, oci_core::Digest::of(&fs::read(&p)?))
            };
            m.insert(rel, v);
        }
        Ok(())
    }
    go(root, root, exclude, &mut m)?;
    Ok(m)
}

#[test]
fn umoci_unpack_equals_source_and_oci_image_tool_validates() -> R {
    if !have("umoci") || !have("oci-image-tool") {
        eprintln!("SKIP: umoci/oci-image-tool not installed (apt-get install umoci oci-image-tool)");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let t = train(tmp.path(), 2)?;
    // Debian's umoci 0.4.7 and oci-image-tool 1.0.0-rc1 predate zstd layers: use gzip.
    let text = fs::read_to_string(&t.spec)?.replace("algorithm = \"zstd\"", "algorithm = \"gzip\"");
    fs::write(&t.spec, text)?;
    let spec = Spec::load(&t.spec)?;
    let out = tmp.path().join("out");
    run_build(&spec, &opts(&out, &tmp.path().join("cache"), 2))?;
    for v in &spec.versions {
        let bundle = tmp.path().join(format!("bundle-{}", v.name));
        let st = Command::new("umoci")
            .args(["unpack", "--rootless", "--image"])
            .arg(format!("{}:{}", out.display(), v.name))
            .arg(&bundle)
            .output()?;
        assert!(st.status.success(), "umoci: {}", String::from_utf8_lossy(&st.stderr));
        let unpacked = bundle.join("rootfs/srv/mediawiki").join(format!("php-{}", v.name));
        let want = listing(&v.source, &[".git", "cache/l10n/upstream"])?;
        let got = listing(&unpacked, &[])?;
        assert_eq!(want.len(), got.len());
        assert_eq!(want, got, "umoci's unpack of {} differs from the source", v.name);
        assert!(bundle.join("rootfs/srv/mediawiki/wmf-config").is_dir());
        assert!(bundle.join("rootfs/etc/os-release").is_file(), "base layer missing");
    }
    // oci-image-tool 1.0.0-rc1 mis-filters index.json entries when several are present,
    // so validate each image through a layout holding just that one.
    let l = Layout::open(&out)?;
    for (tag, desc) in l.tags()? {
        if tag.starts_with("sha256-") {
            continue;
        }
        let single = tmp.path().join(format!("single-{tag}"));
        let sl = Layout::create(&single)?;
        fs::remove_dir_all(single.join("blobs"))?;
        Command::new("cp").arg("-al").arg(out.join("blobs")).arg(&single).status()?;
        sl.set_tag(&tag, &desc)?;
        let st = Command::new("oci-image-tool")
            .args(["validate", "--type", "image", "--ref"])
            .arg(format!("name={tag}"))
            .arg(&single)
            .output()?;
        assert!(
            st.status.success(),
            "oci-image-tool on {tag}: {}{}",
            String::from_utf8_lossy(&st.stdout),
            String::from_utf8_lossy(&st.stderr)
        );
    }
    Ok(())
}

fn build_err(spec: &Spec, out: &Path, cache: &Path) -> String {
    match run_build(spec, &opts(out, cache, 2)) {
        Ok(_) => panic!("build succeeded"),
        Err(e) => {
            let mut s = e.to_string();
            let mut src = e.source();
            while let Some(c) = src {
                s.push_str(&format!(": {c}"));
                src = c.source();
            }
            s
        }
    }
}

fn no_tags(out: &Path) -> bool {
    Layout::open(out).map(|l| l.tags().map(|t| t.is_empty()).unwrap_or(true)).unwrap_or(true)
}

#[test]
fn bad_input_gives_clear_errors_and_no_tags() -> R {
    let tmp = tempfile::tempdir()?;
    let t = train(tmp.path(), 1)?;
    let cache = tmp.path().join("cache");
    let src = Spec::load(&t.spec)?.versions[0].source.clone();

    let out = tmp.path().join("missing");
    let mut spec = Spec::load(&t.spec)?;
    spec.versions[0].source = tmp.path().join("nope");
    let e = build_err(&spec, &out, &cache);
    assert!(e.contains("nope") && e.contains("does not exist"), "{e}");
    assert!(no_tags(&out));

    let out = tmp.path().join("loop");
    std::os::unix::fs::symlink("loop-b", src.join("loop-a"))?;
    std::os::unix::fs::symlink("loop-a", src.join("loop-b"))?;
    let e = build_err(&Spec::load(&t.spec)?, &out, &cache);
    assert!(e.contains("loop-") && e.contains("loop"), "{e}");
    assert!(no_tags(&out));
    fs::remove_file(src.join("loop-a"))?;
    fs::remove_file(src.join("loop-b"))?;

    let out = tmp.path().join("escape");
    std::os::unix::fs::symlink("../../../../etc/passwd", src.join("escape"))?;
    let e = build_err(&Spec::load(&t.spec)?, &out, &cache);
    assert!(e.contains("escape") && e.contains("leaves the tree"), "{e}");
    fs::remove_file(src.join("escape"))?;

    let out = tmp.path().join("fifo");
    let st = Command::new("mkfifo").arg(src.join("a-fifo")).status()?;
    assert!(st.success());
    let e = build_err(&Spec::load(&t.spec)?, &out, &cache);
    assert!(e.contains("a-fifo") && e.contains("FIFO"), "{e}");
    fs::remove_file(src.join("a-fifo"))?;
    assert!(no_tags(&out));

    // Spec errors name the key and line.
    let text = fs::read_to_string(&t.spec)?;
    let bad = t.spec.with_file_name("bad.toml");
    fs::write(&bad, text.replace("[compression]", "[compression]\nthreads = 4"))?;
    let e = Spec::load(&bad).expect_err("unknown key").to_string();
    assert!(e.contains("threads") && e.contains("line"), "{e}");
    fs::write(&bad, text.replace("oci:base:latest", "docker://registry.example.org/base:latest"))?;
    let e = Spec::load(&bad).expect_err("unpinned").to_string();
    assert!(e.contains("pinned by digest"), "{e}");
    Ok(())
}

#[test]
fn unreadable_file_is_named() -> R {
    // Root reads everything; run the check as an unprivileged user when we are root.
    let tmp = tempfile::tempdir()?;
    let t = train(tmp.path(), 1)?;
    let src = Spec::load(&t.spec)?.versions[0].source.clone();
    let secret = src.join("includes/secret.php");
    fs::write(&secret, "<?php")?;
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o000))?;
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_mwbuild"));
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let mut cmd = if is_root {
        if !have("setpriv") {
            eprintln!("SKIP: running as root without setpriv");
            return Ok(());
        }
        // Let the unprivileged user reach the tree and write its output.
        Command::new("chmod").args(["-R", "a+rwX"]).arg(tmp.path()).status()?;
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o000))?;
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o777))?;
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]).arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    let out = tmp.path().join("out");
    let o = cmd
        .arg("build")
        .arg(&t.spec)
        .arg("--output")
        .arg(format!("oci:{}", out.display()))
        .arg("--cache-dir")
        .arg(tmp.path().join("cache"))
        .arg("--quiet")
        .env("HOME", tmp.path())
        .output()?;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "build of an unreadable file succeeded");
    assert!(err.contains("secret.php") && err.contains("ermission"), "{err}");
    assert!(no_tags(&out));
    Ok(())
}

#[test]
fn diff_and_inspect_read_only_metadata() -> R {
    let tmp = tempfile::tempdir()?;
    let t = train(tmp.path(), 1)?;
    let spec = Spec::load(&t.spec)?;
    let (out, cache) = (tmp.path().join("out"), tmp.path().join("cache"));
    let out2 = tmp.path().join("out2");
    run_build(&spec, &opts(&out, &cache, 2))?;
    let changed = mwfixture::edit_files(&spec.versions[0].source, 3, 5)?;
    run_build(&spec, &opts(&out2, &cache, 2))?;
    let v = &t.versions[0];
    let a: ImageRef = format!("oci:{}:{v}", out.display()).parse()?;
    let b: ImageRef = format!("oci:{}:{v}", out2.display()).parse()?;
    // Remove every MediaWiki layer blob: diff must not need them.
    for o in [&out, &out2] {
        for (_, layers) in layers_by_tag(o)? {
            for d in layers.iter().skip(1) {
                let _ = fs::remove_file(o.join("blobs/sha256").join(d.trim_start_matches("sha256:")));
            }
        }
    }
    let d = rt().block_on(mwbuild::inspect::diff(&a, &b, &ClientOptions::default()))?;
    let sec = &d.sections[&format!("php-{v}")];
    let mut got: Vec<String> =
        sec.changed.iter().map(|p| p.trim_start_matches(&format!("srv/mediawiki/php-{v}/")).to_string()).collect();
    let mut want: Vec<String> = changed.iter().map(|p| p.to_string_lossy().to_string()).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert!(sec.added.is_empty() && sec.removed.is_empty());
    assert!(!d.base_changed);

    let mv: ImageRef = format!("oci:{}:multiversion", out.display()).parse()?;
    let text = rt().block_on(mwbuild::inspect::inspect(&mv, &ClientOptions::default()))?;
    assert!(text.contains("base") && text.contains("core") && text.contains("shared/wmf-config"), "{text}");
    assert!(text.contains(v.as_str()), "inspect does not say the layers are shared with {v}:\n{text}");
    Ok(())
}

#[test]
fn rebase_swaps_only_base_layers() -> R {
    let tmp = tempfile::tempdir()?;
    let t = train(tmp.path(), 1)?;
    let spec = Spec::load(&t.spec)?;
    let out = tmp.path().join("out");
    run_build(&spec, &opts(&out, &tmp.path().join("cache"), 2))?;
    // A second base: scratch-built layout with a different layer.
    let base2 = tmp.path().join("base2");
    let b2 = Layout::create(&base2)?;
    let layer = {
        let mut w = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(3);
        h.set_mode(0o644);
        h.set_cksum();
        w.append_data(&mut h, "etc/new-base", &b"new"[..])?;
        w.into_inner()?
    };
    let (ld, ls) = b2.put_blob_bytes(&layer)?;
    let cfg = serde_json::json!({"architecture":"amd64","os":"linux","config":{"Env":["NEW=1"]},"rootfs":{"type":"layers","diff_ids":[ld.to_string()]}});
    let (cd, cs) = b2.put_blob_bytes(&serde_json::to_vec(&cfg)?)?;
    let m = serde_json::json!({"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":cd.to_string(),"size":cs},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":ld.to_string(),"size":ls}]});
    let (md, ms) = b2.put_blob_bytes(&serde_json::to_vec(&m)?)?;
    b2.set_tag(
        "latest",
        &oci_spec::image::Descriptor::new(oci_spec::image::MediaType::ImageManifest, ms, md.to_oci()),
    )?;

    let before = layers_by_tag(&out)?["multiversion"].clone();
    let src: ImageRef = format!("oci:{}:multiversion", out.display()).parse()?;
    let dst: ImageRef = format!("oci:{}:rebased", out.display()).parse()?;
    let onto: ImageRef = format!("oci:{}:latest", base2.display()).parse()?;
    rt().block_on(mwbuild::rebase::rebase(&src, &onto, &dst, &ClientOptions::default()))?;
    let after = layers_by_tag(&out)?["rebased"].clone();
    assert_eq!(after[0], ld.to_string());
    assert_eq!(&after[1..], &before[1..], "MediaWiki layers changed");
    Ok(())
}

#[test]
fn diff_between_versions_matches_the_fixture_churn() -> R {
    let tmp = tempfile::tempdir()?;
    let t = train(tmp.path(), 2)?;
    let spec = Spec::load(&t.spec)?;
    let out = tmp.path().join("out");
    run_build(&spec, &opts(&out, &tmp.path().join("cache"), 2))?;
    let (v5, v6) = (&t.versions[0], &t.versions[1]);
    let a: ImageRef = format!("oci:{}:{v5}", out.display()).parse()?;
    let b: ImageRef = format!("oci:{}:{v6}", out.display()).parse()?;
    let d = rt().block_on(mwbuild::inspect::diff(&a, &b, &ClientOptions::default()))?;
    let sec =
        d.sections.get(&format!("php-{v5} -> php-{v6}")).ok_or_else(|| format!("sections: {:?}", d.sections.keys()))?;
    let prefix = format!("srv/mediawiki/php-{v5}/");
    let strip =
        |v: &Vec<String>| -> BTreeSet<String> { v.iter().map(|p| p.trim_start_matches(&prefix).to_string()).collect() };
    let in_image = |p: &PathBuf| {
        let s = p.to_string_lossy();
        !(s.starts_with(".git/") || s.starts_with("cache/l10n/upstream/"))
    };
    let want = |v: &Vec<PathBuf>| -> BTreeSet<String> {
        v.iter().filter(|p| in_image(p)).map(|p| p.to_string_lossy().to_string()).collect()
    };
    let churn = &t.churn[0];
    assert_eq!(strip(&sec.changed), want(&churn.changed));
    assert_eq!(strip(&sec.added), want(&churn.added));
    assert_eq!(strip(&sec.removed), want(&churn.removed));
    assert!(!sec.changed.is_empty());
    Ok(())
}

/// Set the modification time of every file directly in `dir` to `age` ago.
fn age_files(dir: &Path, age: std::time::Duration) -> R {
    let t = std::time::SystemTime::now() - age;
    let secs = t.duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
    let ts = rustix::fs::Timespec { tv_sec: secs, tv_nsec: 0 };
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_file() {
            rustix::fs::utimensat(
                rustix::fs::CWD,
                &p,
                &rustix::fs::Timestamps { last_access: ts, last_modification: ts },
                rustix::fs::AtFlags::empty(),
            )?;
        }
    }
    Ok(())
}

/// Prune keeps what the last build of each tree made (the next build stays a no-op) and
/// what was used recently, removes the rest, and does not run while a build holds the
/// cache.
#[test]
fn prune_keeps_the_last_build_and_removes_unused_layers() -> R {
    let day = std::time::Duration::from_secs(86_400);
    let tmp = tempfile::tempdir()?;
    let t = train(tmp.path(), 1)?;
    let spec = Spec::load(&t.spec)?;
    let (out, cache) = (tmp.path().join("out"), tmp.path().join("cache"));
    let first = run_build(&spec, &opts(&out, &cache, 2))?;
    mwfixture::edit_files(&spec.versions[0].source, 1, 99)?;
    let second = run_build(&spec, &opts(&out, &cache, 2))?;
    let gone: Vec<String> = first
        .layers
        .iter()
        .filter(|l| !second.layers.iter().any(|m| m.digest == l.digest))
        .map(|l| l.digest.hex().to_string())
        .collect();
    assert_eq!(gone.len(), 1);
    let blob = |hex: &str| cache.join("blobs/sha256").join(hex);

    // Everything was used moments ago: nothing goes.
    let r = mwbuild::prune::prune(&cache, 14 * day, false)?;
    assert_eq!((r.layer_records, r.blobs), (0, 0), "{r:?}");

    // Layers and blobs last used 30 days ago: only what the slots were last built into
    // stays. A dry run says so and removes nothing.
    age_files(&cache.join("layers"), 30 * day)?;
    age_files(&cache.join("blobs/sha256"), 30 * day)?;
    let dry = mwbuild::prune::prune(&cache, 14 * day, true)?;
    assert_eq!(dry.layer_records, 1, "{dry:?}");
    assert_eq!(dry.blobs, 2, "the old layer and its table of contents: {dry:?}");
    assert!(blob(&gone[0]).exists());
    let r = mwbuild::prune::prune(&cache, 14 * day, false)?;
    assert_eq!(r, dry);
    assert!(!blob(&gone[0]).exists());
    for l in &second.layers {
        assert!(blob(l.digest.hex()).exists(), "{} was removed", l.slot);
    }
    let third = run_build(&spec, &opts(&out, &cache, 2))?;
    assert_eq!(digests(&third), digests(&second));
    assert!(third.layers.iter().all(|l| !l.rebuilt), "a pruned cache rebuilt a layer");

    // A build holds the cache: prune refuses at once and says why.
    let c = mwbuild::cache::Cache::open(&cache)?;
    let held = c.lock_shared()?;
    let e = mwbuild::prune::prune(&cache, 14 * day, false).err().ok_or("prune ran under a build")?;
    assert!(e.to_string().contains("lock"), "{e}");
    drop(held);
    mwbuild::prune::prune(&cache, 14 * day, false)?;
    Ok(())
}
