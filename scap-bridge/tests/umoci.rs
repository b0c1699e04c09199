//! `scap-bridge unpack` against `umoci raw unpack` of the same images (gzip: Debian's umoci
//! 0.4.7 has no zstd): fixture images built by mwbuild, images written by umoci itself
//! (whiteouts, hardlinks, symlinks, odd modes), and a crafted image with opaque
//! directories. Equal means: same paths, types, permission bits, contents, link targets.
//! `verify` must find no difference either way, and report real differences.

mod common;

use common::*;
use mwbuild::build::{build, BuildOptions};
use mwbuild::spec::Spec;
use mwfixture::{generate_train, Size, TrainOptions};
use scap_bridge::engine::apply;
use scap_bridge::plan::{ModePolicy, Modes};
use scap_bridge::testing::{Compress, RawTar, TestImage};
use scap_bridge::verify::{verify, Difference, VerifyOptions};
use scap_bridge::view::SymlinkPolicy;
use std::path::Path;
use std::process::Command;

fn have_umoci() -> bool {
    Command::new("umoci").arg("--version").output().is_ok_and(|o| o.status.success())
}

fn umoci(args: &[&str]) -> R {
    let out = Command::new("umoci").args(args).output()?;
    if !out.status.success() {
        return Err(format!("umoci {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

fn umoci_raw_unpack(image: &str, dir: &Path) -> R {
    let d = dir.to_string_lossy();
    let img = image.trim_start_matches("oci:");
    if rustix::process::geteuid().is_root() {
        umoci(&["raw", "unpack", "--image", img, &d])
    } else {
        umoci(&["raw", "unpack", "--rootless", "--image", img, &d])
    }
}

/// Unpack with us and with umoci, compare, and check `verify` both ways.
fn compare(image: &str, work: &Path) -> R {
    let (ours, theirs, state) = (work.join("ours"), work.join("theirs"), work.join("state"));
    apply(&unpack_options(image, &ours, &state))?;
    umoci_raw_unpack(image, &theirs)?;
    // setuid, setgid and sticky bits are stripped by design (umoci keeps them): compare the
    // permission bits, and check that the special bits are the only other difference.
    let strip = |m: std::collections::BTreeMap<String, (char, u32, String, String)>| {
        m.into_iter()
            .map(|(k, (c, mode, s, t))| (k, (c, mode & 0o777, s, t)))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let (a, b) = (content(&facts(&ours)?), content(&facts(&theirs)?));
    assert!(a.values().all(|v| v.1 & 0o7000 == 0), "special bits left in our tree");
    let (a, b) = (strip(a), strip(b));
    let only_a: Vec<_> = a.iter().filter(|(k, v)| b.get(*k) != Some(v)).collect();
    let only_b: Vec<_> = b.iter().filter(|(k, v)| a.get(*k) != Some(v)).collect();
    assert!(only_a.is_empty() && only_b.is_empty(), "{image}:\nours: {only_a:?}\numoci: {only_b:?}");
    for dir in [&ours, &theirs] {
        let o = VerifyOptions {
            image: image_options(image, "", &state, SymlinkPolicy::Any),
            dir: dir.clone(),
            modes: Modes { policy: ModePolicy::Image, umask: 0 },
            staging: false,
        };
        let r = verify(&o)?;
        // umoci's tree may keep special bits that we strip; nothing else may differ.
        let real: Vec<_> = r
            .differences
            .iter()
            .filter(|d| !matches!(d, Difference::Mode { image, tree, .. } if *dir == theirs && tree & 0o777 == *image))
            .collect();
        assert!(real.is_empty(), "{}: {real:?}", dir.display());
    }
    Ok(())
}

#[test]
fn fixture_images_equal_umoci() -> R {
    if !have_umoci() {
        eprintln!("umoci not installed; skipping");
        return Ok(());
    }
    let t = tmp();
    let train = generate_train(
        &t.path().join("train"),
        &TrainOptions { seed: 11, size: Size::Tiny, versions: 2, churn: 0.1, force: false },
    )?;
    let text = std::fs::read_to_string(&train.spec)?.replace("algorithm = \"zstd\"", "algorithm = \"gzip\"");
    std::fs::write(&train.spec, text)?;
    let spec = Spec::load(&train.spec)?;
    let layout = t.path().join("layout");
    let opts = BuildOptions {
        output: format!("oci:{}", layout.display()).parse()?,
        cache_dir: t.path().join("cache"),
        jobs: 2,
        registry: oci_core::registry::ClientOptions::default(),
        progress: false,
        now: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(build(&spec, &opts))?;
    for tag in [train.versions[1].as_str(), "multiversion"] {
        compare(&oci(&layout, tag), &t.path().join(format!("cmp-{tag}")))?;
    }
    // The prepared staging tree verifies clean, and verify sees an edit.
    let staging = t.path().join("staging");
    std::fs::create_dir_all(&staging)?;
    let v = &train.versions[0];
    let image = oci(&layout, v);
    let state = t.path().join("state");
    apply(&prep_options(&image, v, &staging, &state))?;
    let vo = VerifyOptions {
        image: image_options(&image, &format!("srv/mediawiki/php-{v}"), &state, SymlinkPolicy::Any),
        dir: staging.join(format!("php-{v}")),
        modes: Modes { policy: ModePolicy::Umask, umask: 0o002 },
        staging: true,
    };
    assert!(verify(&vo)?.differences.is_empty());
    let edited = mwfixture::edit_files(&staging.join(format!("php-{v}")), 2, 5)?;
    std::fs::write(staging.join(format!("php-{v}/stray.txt")), b"x")?;
    let r = verify(&vo)?;
    let mut want: Vec<Difference> = edited
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .filter(|p| p != scap_bridge::provenance::PROVENANCE_FILE)
        .map(|path| Difference::Content { path })
        .collect();
    want.push(Difference::Extra { path: "stray.txt".into(), what: "file" });
    want.sort_by_key(ToString::to_string);
    let mut got = r.differences;
    got.sort_by_key(ToString::to_string);
    assert_eq!(got, want);
    Ok(())
}

#[test]
fn umoci_made_images_equal_umoci() -> R {
    if !have_umoci() {
        eprintln!("umoci not installed; skipping");
        return Ok(());
    }
    let t = tmp();
    let l = t.path().join("L");
    let ls = l.to_string_lossy().into_owned();
    umoci(&["init", "--layout", &ls])?;
    umoci(&["new", "--image", &format!("{ls}:base")])?;
    let b1 = t.path().join("b1");
    umoci(&["unpack", "--image", &format!("{ls}:base"), &b1.to_string_lossy()])?;
    let r = b1.join("rootfs");
    std::fs::create_dir_all(r.join("srv/app/sub/deeper"))?;
    std::fs::create_dir_all(r.join("srv/gone/inner"))?;
    std::fs::write(r.join("srv/app/a.php"), b"<?php a")?;
    std::fs::write(r.join("srv/app/secret"), b"0600")?;
    std::fs::write(r.join("srv/app/run.sh"), b"#!/bin/sh")?;
    std::fs::write(r.join("srv/app/sub/deeper/x"), b"x")?;
    std::fs::write(r.join("srv/gone/inner/y"), b"y")?;
    std::os::unix::fs::symlink("../a.php", r.join("srv/app/sub/rel"))?;
    std::os::unix::fs::symlink("/etc/hostname", r.join("srv/app/abs"))?;
    std::fs::hard_link(r.join("srv/app/a.php"), r.join("srv/app/hard"))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(r.join("srv/app/secret"), std::fs::Permissions::from_mode(0o600))?;
    std::fs::set_permissions(r.join("srv/app/run.sh"), std::fs::Permissions::from_mode(0o750))?;
    std::fs::set_permissions(r.join("srv/app/sub"), std::fs::Permissions::from_mode(0o711))?;
    umoci(&["repack", "--image", &format!("{ls}:v1"), &b1.to_string_lossy()])?;
    // A second layer: deletions (whiteouts), a replaced file, a file turned into a directory.
    let b2 = t.path().join("b2");
    umoci(&["unpack", "--image", &format!("{ls}:v1"), &b2.to_string_lossy()])?;
    let r = b2.join("rootfs");
    std::fs::remove_dir_all(r.join("srv/gone"))?;
    std::fs::remove_file(r.join("srv/app/secret"))?;
    std::fs::write(r.join("srv/app/a.php"), b"<?php a, version 2")?;
    std::fs::remove_file(r.join("srv/app/sub/deeper/x"))?;
    std::fs::create_dir(r.join("srv/app/sub/deeper/x"))?;
    std::fs::write(r.join("srv/app/sub/deeper/x/z"), b"z")?;
    umoci(&["repack", "--image", &format!("{ls}:v2"), &b2.to_string_lossy()])?;
    for tag in ["v1", "v2"] {
        compare(&format!("oci:{ls}:{tag}"), &t.path().join(format!("cmp-{tag}")))?;
    }
    Ok(())
}

#[test]
fn crafted_whiteouts_and_opaques_equal_umoci() -> R {
    if !have_umoci() {
        eprintln!("umoci not installed; skipping");
        return Ok(());
    }
    let t = tmp();
    let mut l0 = RawTar::new();
    l0.dir("a/", 0o755).file("a/x", 0o644, b"x0").file("a/y", 0o755, b"y0").dir("d/", 0o750).file("d/in", 0o644, b"in");
    l0.dir("d/sub/", 0o755).file("d/sub/deep", 0o644, b"deep").symlink("a/link", "x").hardlink("a/hl", "a/x");
    let mut l1 = RawTar::new();
    l1.file("a/x", 0o644, b"x1").file("a/.wh.y", 0o644, b"").file("d/new", 0o600, b"n").file(
        "d/.wh..wh..opq",
        0o644,
        b"",
    );
    l1.dir("a/", 0o700).file("a/link", 0o640, b"no longer a link");
    let img = TestImage::new().layer(&l0.finish(), Compress::Gzip).layer(&l1.finish(), Compress::None);
    img.write(&t.path().join("img"), "t")?;
    compare(&oci(&t.path().join("img"), "t"), &t.path().join("cmp"))
}
