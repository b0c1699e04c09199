//! End-to-end runs of the engine on images crafted byte by byte: OCI layer semantics, the
//! mtime contract, incrementality, scap regions, provenance, locks.

mod common;

use common::*;
use scap_bridge::engine::apply;
use scap_bridge::testing::{Compress, RawTar, TestImage};
use std::collections::BTreeMap;

fn semantics_image(dir: &std::path::Path) -> R<String> {
    let mut l0 = RawTar::new();
    l0.dir("a/", 0o755).file("a/x", 0o644, b"x0").file("a/y", 0o755, b"y0").dir("d/", 0o750).file("d/in", 0o644, b"in");
    l0.symlink("a/link", "x").file("a/big", 0o4755, b"setuid stripped").hardlink("a/hl", "a/x");
    let mut l1 = RawTar::new();
    l1.file("a/x", 0o644, b"x1")
        .file("a/.wh.y", 0o644, b"")
        .file("d/.wh..wh..opq", 0o644, b"")
        .file("d/new", 0o600, b"n");
    l1.dir("a/", 0o700);
    TestImage::new().layer(&l0.finish(), Compress::Gzip).layer(&l1.finish(), Compress::Zstd).write(dir, "t")?;
    Ok(oci(dir, "t"))
}

#[test]
fn unpack_applies_layer_semantics() -> R {
    let t = tmp();
    let image = semantics_image(&t.path().join("img"))?;
    let out = t.path().join("out");
    let s = apply(&unpack_options(&image, &out, &t.path().join("state")))?;
    // Without a table of contents, each layer is read once to index it and once to extract.
    assert_eq!((s.counts.added, s.layers_read), (5, 4));
    let f = facts(&out)?;
    let got: BTreeMap<_, _> = f.iter().map(|(k, v)| (k.as_str(), (v.kind, v.mode, v.target.as_str()))).collect();
    let want: BTreeMap<_, _> = [
        ("", ('d', 0o755, "")),
        ("a", ('d', 0o700, "")),
        ("a/big", ('f', 0o755, "")),
        ("a/hl", ('f', 0o644, "")),
        ("a/link", ('l', 0o777, "x")),
        ("a/x", ('f', 0o644, "")),
        ("d", ('d', 0o750, "")),
        ("d/new", ('f', 0o600, "")),
    ]
    .into_iter()
    .collect();
    assert_eq!(got, want);
    assert_eq!(std::fs::read(out.join("a/x"))?, b"x1");
    assert_eq!(std::fs::read(out.join("a/hl"))?, b"x0", "the hardlink keeps the content it was made with");
    // Nothing of ours is left beside the target.
    let names: Vec<_> = std::fs::read_dir(t.path())?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
    assert_eq!(names.len(), 3, "{names:?}");
    Ok(())
}

fn version_image(dir: &std::path::Path, files: &[(&str, &[u8])], tag: &str) -> R<String> {
    let mut t = RawTar::new();
    t.dir("srv/", 0o755).dir("srv/mediawiki/", 0o755).dir("srv/mediawiki/php-1.0/", 0o755);
    let mut dirs = std::collections::BTreeSet::new();
    for (p, content) in files {
        let mut acc = String::new();
        let parts: Vec<&str> = p.split('/').collect();
        for c in &parts[..parts.len() - 1] {
            acc = if acc.is_empty() { c.to_string() } else { format!("{acc}/{c}") };
            if dirs.insert(acc.clone()) {
                t.dir(&format!("srv/mediawiki/php-1.0/{acc}/"), 0o755);
            }
        }
        t.file(&format!("srv/mediawiki/php-1.0/{p}"), if p.ends_with(".sh") { 0o755 } else { 0o644 }, content);
    }
    t.file("srv/mediawiki/php-2.0/other", 0o644, b"not ours");
    TestImage::new().layer(&t.finish(), Compress::Zstd).write(dir, tag)?;
    Ok(oci(dir, tag))
}

#[test]
fn prep_is_incremental_and_keeps_the_mtime_contract() -> R {
    let t = tmp();
    let (staging, state, img) = (t.path().join("staging"), t.path().join("state"), t.path().join("img"));
    std::fs::create_dir_all(staging.join("php-2.0"))?;
    std::fs::write(staging.join("php-2.0/keep"), b"other version")?;
    let v1 = version_image(
        &img,
        &[("a/one.php", b"1"), ("a/two.php", b"2"), ("b/three.php", b"3"), ("run.sh", b"#!")],
        "v1",
    )?;
    let s = apply(&prep_options(&v1, "1.0", &staging, &state))?;
    assert_eq!((s.counts.added, s.counts.changed), (5, 0), "{s:?}"); // 4 files + provenance
    let live = staging.join("php-1.0");
    let before = facts(&live)?;
    assert_eq!(before["a/one.php"].mode, 0o664);
    assert_eq!(before["run.sh"].mode, 0o775);
    assert_eq!(before[""].mode, 0o775);
    assert!(std::fs::read_to_string(live.join(".scap-bridge-provenance.json"))?.contains("\"version\": \"1.0\""));

    // Re-prep: nothing at all is written.
    let s = apply(&prep_options(&v1, "1.0", &staging, &state))?;
    assert!(s.nothing_to_do && s.bytes_written == 0, "{s:?}");
    assert_eq!(facts(&live)?, before);

    // Scap's regions and a same-size edit within the same second.
    std::fs::write(live.join("LocalSettings.php"), b"<?php // scap's stub")?;
    std::fs::create_dir_all(live.join("cache/l10n"))?;
    std::fs::write(live.join("cache/l10n/l10n_cache-en.cdb"), b"cdb")?;
    let v2 = version_image(
        &img,
        &[("a/one.php", b"9"), ("a/two.php", b"2"), ("b/three.php", b"3"), ("run.sh", b"#!"), ("c/new.php", b"n")],
        "v2",
    )?;
    let list = t.path().join("changed.txt");
    let mut o = prep_options(&v2, "1.0", &staging, &state);
    o.changed_list = Some(list.clone());
    let s = apply(&o)?;
    let after = facts(&live)?;
    assert_eq!((s.counts.added, s.counts.changed, s.counts.removed), (1, 2, 0), "{s:?}"); // new.php; one.php + provenance
    for p in ["a/two.php", "b/three.php", "run.sh"] {
        assert_eq!(after[p], before[p], "{p} must be untouched");
    }
    // Directories are rebuilt (new inodes) but keep mode and mtime when nothing in them changed.
    assert_eq!((after["b"].mode, after["b"].mtime), (before["b"].mode, before["b"].mtime));
    assert_ne!(after["a/one.php"].ino, before["a/one.php"].ino);
    assert!(after["a/one.php"].mtime.0 > before["a/one.php"].mtime.0, "whole second must go up");
    assert_ne!(after["a"].mtime, before["a"].mtime, "a/ saw a changed file");
    assert_eq!(after["LocalSettings.php"].sha, oci_core::Digest::of(b"<?php // scap's stub").to_string());
    assert!(after.contains_key("cache/l10n/l10n_cache-en.cdb"));
    let changed = std::fs::read_to_string(&list)?;
    assert!(changed.contains("php-1.0/a/one.php\n") && changed.contains("php-1.0/c/new.php\n"), "{changed}");
    assert_eq!(std::fs::read(staging.join("php-2.0/keep"))?, b"other version");
    assert!(s.bytes_written <= 2 + 1 + 2048, "wrote {}", s.bytes_written);

    // With the state gone, the live files are hashed instead, and still nothing is rewritten.
    std::fs::remove_dir_all(&state)?;
    let s = apply(&prep_options(&v2, "1.0", &staging, &state))?;
    assert_eq!((s.counts.changed, s.counts.added, s.bytes_written), (0, 0, 0), "{s:?}");
    assert_eq!(content(&facts(&live)?), content(&after));
    Ok(())
}

/// Every kind of edit a person or a tool could make to the live tree behind our back must
/// stop a re-run from taking its early exit: the next prep undoes it, and the run after
/// that has nothing to do again.
#[test]
fn edits_behind_our_back_are_seen_and_undone() -> R {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    type Edit = fn(&Path) -> std::io::Result<()>;
    fn put_back_mtime(p: &Path, change: impl FnOnce() -> std::io::Result<()>) -> std::io::Result<()> {
        let m = fs::symlink_metadata(p)?.modified()?;
        change()?;
        fs::File::open(p)?.set_modified(m)
    }
    let edits: [(&str, Edit); 11] = [
        ("file added in a subdirectory", |l| fs::write(l.join("a/stray.php"), b"x")),
        ("directory added", |l| fs::create_dir(l.join("b/new"))),
        ("file removed", |l| fs::remove_file(l.join("b/three.php"))),
        ("directory removed", |l| fs::remove_dir_all(l.join("b"))),
        ("file renamed", |l| fs::rename(l.join("a/one.php"), l.join("a/uno.php"))),
        ("same-size rewrite, mtime put back", |l| {
            let f = l.join("a/two.php");
            put_back_mtime(&f, || fs::write(&f, b"X"))
        }),
        ("file added, directory mtime put back", |l| put_back_mtime(l, || fs::write(l.join("stray.txt"), b"x"))),
        ("file removed, directory mtime put back", |l| {
            let d = l.join("a");
            put_back_mtime(&d, || fs::remove_file(d.join("two.php")))
        }),
        ("mode changed", |l| fs::set_permissions(l.join("run.sh"), fs::Permissions::from_mode(0o664))),
        ("directory replaced by a symlink", |l| {
            fs::remove_dir_all(l.join("b"))?;
            std::os::unix::fs::symlink("a", l.join("b"))
        }),
        ("file replaced by a directory", |l| {
            fs::remove_file(l.join("a/one.php"))?;
            fs::create_dir(l.join("a/one.php"))
        }),
    ];
    let t = tmp();
    let img = version_image(
        &t.path().join("img"),
        &[("a/one.php", b"1"), ("a/two.php", b"2"), ("b/three.php", b"3"), ("run.sh", b"#!")],
        "v",
    )?;
    for (i, (what, edit)) in edits.iter().enumerate() {
        let (staging, state) = (t.path().join(format!("staging{i}")), t.path().join(format!("state{i}")));
        fs::create_dir_all(&staging)?;
        apply(&prep_options(&img, "1.0", &staging, &state))?;
        let live = staging.join("php-1.0");
        let before = facts(&live)?;
        edit(&live)?;
        assert_ne!(content(&facts(&live)?), content(&before), "{what}: the edit must change the tree");
        let s = apply(&prep_options(&img, "1.0", &staging, &state))?;
        assert!(!s.nothing_to_do, "{what}: not seen");
        assert_eq!(content(&facts(&live)?), content(&before), "{what}: not undone");
        let s = apply(&prep_options(&img, "1.0", &staging, &state))?;
        assert!(s.nothing_to_do && s.bytes_written == 0, "{what}: {s:?}");
    }
    Ok(())
}

#[test]
fn lock_held_elsewhere_is_an_error() -> R {
    let t = tmp();
    let img = version_image(&t.path().join("img"), &[("a.php", b"a")], "v")?;
    let staging = t.path().join("staging");
    std::fs::create_dir_all(&staging)?;
    let lock = staging.join("scap.lock");
    // fcntl locks belong to a process: hold it from a child.
    let mut child = std::process::Command::new("python3")
        .args(["-c", "import fcntl,sys,time; f=open(sys.argv[1],'w'); fcntl.lockf(f, fcntl.LOCK_EX); print('ok', flush=True); time.sleep(30)"])
        .arg(&lock)
        .stdout(std::process::Stdio::piped())
        .spawn();
    let Ok(child) = child.as_mut() else {
        eprintln!("python3 not available; skipping");
        return Ok(());
    };
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().expect("stdout")), &mut line)?;
    let r = apply(&prep_options(&img, "1.0", &staging, &t.path().join("state")));
    child.kill()?;
    child.wait()?;
    assert!(matches!(r, Err(scap_bridge::Error::Locked { .. })), "{r:?}");
    assert!(!staging.join("php-1.0").exists());
    apply(&prep_options(&img, "1.0", &staging, &t.path().join("state")))?;
    Ok(())
}

#[test]
fn scap_writing_l10n_does_not_defeat_the_fast_path() -> R {
    let t = tmp();
    let (staging, state) = (t.path().join("staging"), t.path().join("state"));
    std::fs::create_dir_all(&staging)?;
    let img = version_image(&t.path().join("img"), &[("a.php", b"a"), ("cache/l10n/en.json", b"{}")], "v")?;
    apply(&prep_options(&img, "1.0", &staging, &state))?;
    let l10n = staging.join("php-1.0/cache/l10n");
    std::fs::write(l10n.join("l10n_cache-en.cdb"), b"cdb 1")?;
    let s = apply(&prep_options(&img, "1.0", &staging, &state))?;
    assert!(s.nothing_to_do, "{s:?}");
    std::fs::write(l10n.join("l10n_cache-de.cdb"), b"cdb 2")?;
    std::fs::remove_file(l10n.join("l10n_cache-en.cdb"))?;
    let s = apply(&prep_options(&img, "1.0", &staging, &state))?;
    assert!(s.nothing_to_do && s.bytes_written == 0, "{s:?}");
    assert_eq!(std::fs::read(l10n.join("l10n_cache-de.cdb"))?, b"cdb 2");
    Ok(())
}

#[test]
fn cli_unpack_and_verify_exit_codes() -> R {
    let t = tmp();
    let image = semantics_image(&t.path().join("img"))?;
    let dir = t.path().join("deep/er/out");
    let state = t.path().join("state");
    let run = |args: &[&str]| std::process::Command::new(bin()).args(args).arg("--state-dir").arg(&state).output();
    let out = run(&["unpack", &image, &dir.to_string_lossy(), "-q"])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&["verify", &image, &dir.to_string_lossy(), "-q"])?;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    std::fs::write(dir.join("a/x"), b"changed")?;
    std::fs::remove_file(dir.join("d/new"))?;
    let out = run(&["verify", &image, &dir.to_string_lossy(), "-q"])?;
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text, "C a/x: content differs\n- d/new: file missing from the tree\n");
    let out = run(&["unpack", "oci:/nonexistent:x", &dir.to_string_lossy()])?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("scap-bridge: "));
    Ok(())
}
