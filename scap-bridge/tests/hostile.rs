//! One crafted image per known class of hostile image. Each is prepared over an existing
//! `php-1.0`; each must be refused with a message naming the problem (and the layer and
//! entry where there is one), leave the live tree and everything around it unchanged, and
//! leave nothing behind.

mod common;

use common::*;
use oci_core::Digest;
use scap_bridge::engine::apply;
use scap_bridge::testing::{compress, Compress, RawTar, TestImage};

const V: &str = "srv/mediawiki/php-1.0";

fn base_tar() -> Vec<u8> {
    let mut t = RawTar::new();
    t.dir("srv/", 0o755).dir("srv/mediawiki/", 0o755).dir(&format!("{V}/"), 0o755);
    t.file(&format!("{V}/a.php"), 0o644, b"a").dir(&format!("{V}/dir/"), 0o755).file(
        &format!("{V}/dir/b.php"),
        0o644,
        b"b",
    );
    t.finish()
}

/// A layer over the base, built by `f` with `V` as the version's directory.
fn layer(f: impl FnOnce(&mut RawTar)) -> Vec<u8> {
    let mut t = RawTar::new();
    f(&mut t);
    t.finish()
}

fn p(rel: &str) -> String {
    format!("{V}/{rel}")
}

struct Case {
    name: &'static str,
    image: TestImage,
    /// Every one of these must appear in the error's text.
    expect: &'static [&'static str],
}

fn on_base(name: &'static str, upper: Vec<u8>, expect: &'static [&'static str]) -> Case {
    Case { name, image: TestImage::new().layer(&base_tar(), Compress::Gzip).layer(&upper, Compress::Zstd), expect }
}

fn path_cases() -> Vec<Case> {
    let long_name = "n".repeat(256);
    let long_path = format!("{V}/{}", "d/".repeat(2100));
    vec![
        on_base(
            "dotdot",
            layer(|t| {
                t.file(&p("../../../../evil"), 0o644, b"x");
            }),
            &["layer 1", "'..'"],
        ),
        on_base(
            "absolute",
            layer(|t| {
                t.file("/etc/evil", 0o644, b"x");
            }),
            &["layer 1", "\"/etc/evil\"", "absolute"],
        ),
        on_base(
            "normalises-outside",
            layer(|t| {
                t.file(&p("dir/../../../../../x"), 0o644, b"x");
            }),
            &["'..'"],
        ),
        on_base(
            "root-not-dir",
            layer(|t| {
                t.symlink("./", "/etc");
            }),
            &["root itself"],
        ),
        on_base(
            "root-file",
            layer(|t| {
                t.file(".", 0o644, b"x");
            }),
            &["root itself"],
        ),
        on_base(
            "control-char",
            layer(|t| {
                t.pax(&[("path", p("a\nb").as_bytes())]).file("x", 0o644, b"x");
            }),
            &["control character"],
        ),
        on_base(
            "nul-in-pax",
            layer(|t| {
                t.pax(&[("path", p("a\0.php").as_bytes())]).file("x", 0o644, b"x");
            }),
            &["NUL"],
        ),
        on_base(
            "name-max",
            layer(|t| {
                t.pax(&[("path", p(&long_name).as_bytes())]).file("x", 0o644, b"x");
            }),
            &["255"],
        ),
        on_base(
            "path-max",
            layer(|t| {
                t.pax(&[("path", long_path.as_bytes())]).file("x", 0o644, b"x");
            }),
            &["4096"],
        ),
        on_base(
            "backslash",
            layer(|t| {
                t.file(&p("..\\..\\x"), 0o644, b"x");
            }),
            &["backslash"],
        ),
        on_base(
            "drive-letter",
            layer(|t| {
                t.file("C:/x", 0o644, b"x");
            }),
            &["drive letter"],
        ),
    ]
}

fn symlink_cases() -> Vec<Case> {
    vec![
        on_base(
            "through-symlink",
            layer(|t| {
                t.symlink(&p("l"), "/tmp").file(&p("l/evil"), 0o644, b"x");
            }),
            &["written through the symlink", "layer 1"],
        ),
        Case {
            name: "through-lower-symlink",
            image: TestImage::new()
                .layer(&base_tar(), Compress::Gzip)
                .layer(
                    &layer(|t| {
                        t.symlink(&p("l"), "dir");
                    }),
                    Compress::Gzip,
                )
                .layer(
                    &layer(|t| {
                        t.file(&p("l/evil"), 0o644, b"x");
                    }),
                    Compress::Gzip,
                ),
            expect: &["layer 2", "written through the symlink"],
        },
        on_base(
            "symlink-then-dir",
            layer(|t| {
                t.symlink(&p("l"), "/etc").dir(&p("l/"), 0o777);
            }),
            &["twice in one layer"],
        ),
        on_base(
            "escapes",
            layer(|t| {
                t.symlink(&p("up"), "../php-2.0/LocalSettings.php");
            }),
            &["leaves the tree"],
        ),
        on_base(
            "absolute-target",
            layer(|t| {
                t.symlink(&p("pw"), "/etc/passwd");
            }),
            &["leaves the tree"],
        ),
        on_base(
            "two-hop",
            layer(|t| {
                t.dir(&p("a/"), 0o755).dir(&p("a/b/"), 0o755).dir(&p("a/b/c/"), 0o755);
                t.symlink(&p("a/b/c/up"), "../..").symlink(&p("a/b/escape"), "c/up/../../..");
            }),
            &["leaves the tree"],
        ),
        on_base(
            "loop",
            layer(|t| {
                t.symlink(&p("x"), "y").symlink(&p("y"), "x").symlink(&p("z"), "x/q");
            }),
            &["loop"],
        ),
        on_base(
            "long-chain",
            layer(|t| {
                for i in 0..50 {
                    t.symlink(&p(&format!("l{i}")), &format!("l{}", i + 1));
                }
            }),
            &["loop"],
        ),
    ]
}

fn link_and_whiteout_cases() -> Vec<Case> {
    vec![
        on_base(
            "hardlink-outside",
            layer(|t| {
                t.file("etc/shadow", 0o600, b"s").hardlink(&p("h"), "etc/shadow");
            }),
            &["outside the extracted subtree"],
        ),
        on_base(
            "hardlink-dotdot",
            layer(|t| {
                t.hardlink(&p("h"), &p("../../../../etc/passwd"));
            }),
            &["'..'"],
        ),
        on_base(
            "hardlink-not-yet",
            layer(|t| {
                t.hardlink(&p("h"), &p("later")).file(&p("later"), 0o644, b"x");
            }),
            &["does not exist"],
        ),
        on_base(
            "hardlink-whiteout",
            layer(|t| {
                t.file(&p(".wh.a.php"), 0o644, b"").hardlink(&p("h"), &p("a.php"));
            }),
            &["does not exist"],
        ),
        on_base(
            "hardlink-then-write",
            layer(|t| {
                t.hardlink(&p("h"), &p("a.php")).file(&p("h"), 0o644, b"evil");
            }),
            &["twice in one layer"],
        ),
        on_base(
            "empty-whiteout",
            layer(|t| {
                t.file(&p("dir/.wh."), 0o644, b"");
            }),
            &["names nothing"],
        ),
        on_base(
            "whiteout-dotdot",
            layer(|t| {
                t.file(&p(".wh.."), 0o644, b"");
            }),
            &["'..'"],
        ),
        on_base(
            "aufs-marker",
            layer(|t| {
                t.file(&p(".wh..wh.plnk"), 0o644, b"");
            }),
            &["unsupported whiteout"],
        ),
        on_base(
            "fifo",
            layer(|t| {
                t.header(p("fifo").as_bytes(), b'6', 0o644, 0, b"");
            }),
            &["FIFO", "layer 1"],
        ),
        on_base(
            "chardev",
            layer(|t| {
                t.header(p("null").as_bytes(), b'3', 0o666, 0, b"");
            }),
            &["character device"],
        ),
        on_base(
            "duplicate",
            layer(|t| {
                t.file(&p("x"), 0o644, b"1").file(&p("x"), 0o644, b"2");
            }),
            &["twice in one layer"],
        ),
    ]
}

fn tar_cases() -> Vec<Case> {
    let mut truncated = RawTar::new();
    truncated.file(&p("x"), 0o644, b"hello world");
    let truncated = truncated.buf[..600].to_vec();
    vec![
        on_base(
            "pax-size",
            layer(|t| {
                t.pax(&[("size", b"0")]).file(&p("x"), 0o644, b"smuggled");
            }),
            &["PAX size 0 disagrees"],
        ),
        on_base(
            "sparse",
            layer(|t| {
                t.header(p("s").as_bytes(), b'S', 0o644, 0, b"");
            }),
            &["sparse"],
        ),
        on_base("truncated", truncated, &["malformed tar", "layer 1"]),
        on_base(
            "bad-checksum",
            {
                let mut b = layer(|t| {
                    t.file(&p("x"), 0o644, b"x");
                });
                b[0] ^= 1;
                b
            },
            &["checksum"],
        ),
    ]
}

fn image_cases() -> Vec<Case> {
    let good = || {
        TestImage::new().layer(&base_tar(), Compress::Gzip).layer(
            &layer(|t| {
                t.file(&p("new.php"), 0o644, b"n");
            }),
            Compress::Zstd,
        )
    };
    let mut digest = good();
    digest.layers[1].blob = compress(
        &layer(|t| {
            t.file(&p("new.php"), 0o644, b"EVIL");
        }),
        Compress::Zstd,
    );
    digest.layers[1].size = digest.layers[1].blob.len() as u64;
    let mut size = good();
    size.layers[1].size -= 1;
    let mut diff = good();
    diff.layers[1].diff_id = Digest::of(b"something else");
    let mut media = good();
    media.layers[1].media_type = "application/vnd.oci.image.layer.v1.tar+bzip2".into();
    let mut wrong_compression = good();
    wrong_compression.layers[1].media_type = oci_core::media::OCI_LAYER_GZIP.into();
    let mut config_type = good();
    config_type.config_media_type = "application/vnd.oci.image.index.v1+json".into();
    let mut manifest_type = good();
    manifest_type.manifest_media_type = oci_core::media::OCI_INDEX.into();
    // Bytes after the end-of-archive marker, outside the DiffID a lazy reader would compute.
    let tar = layer(|t| {
        t.file(&p("new.php"), 0o644, b"n");
    });
    let mut trailing = good();
    let mut with_tail = tar.clone();
    with_tail.extend_from_slice(b"hidden bytes after the end marker");
    trailing.layers[1].blob = compress(&with_tail, Compress::Zstd);
    trailing.layers[1].digest = Digest::of(&trailing.layers[1].blob);
    trailing.layers[1].size = trailing.layers[1].blob.len() as u64;
    trailing.layers[1].diff_id = Digest::of(&tar);
    let mut platform = good();
    platform.architecture = "arm64".into();
    vec![
        Case { name: "blob-digest", image: digest, expect: &["layer 1", "digest"] },
        Case { name: "blob-size", image: size, expect: &["layer 1", "bytes, the manifest says"] },
        Case { name: "diff-id", image: diff, expect: &["layer 1", "DiffID"] },
        Case { name: "layer-media-type", image: media, expect: &["unsupported media type"] },
        Case { name: "media-type-lies", image: wrong_compression, expect: &["layer 1", "decompression failed"] },
        Case { name: "config-media-type", image: config_type, expect: &["config media type"] },
        Case { name: "manifest-media-type", image: manifest_type, expect: &["does not match its media type"] },
        Case { name: "after-end-marker", image: trailing, expect: &["layer 1", "DiffID"] },
        Case { name: "platform", image: platform, expect: &["arm64"] },
    ]
}

#[test]
fn hostile_images_are_refused_and_change_nothing() -> R {
    let t = tmp();
    let root = t.path().join("root");
    let staging = root.join("staging");
    std::fs::create_dir_all(root.join("outside"))?;
    std::fs::write(root.join("outside/sentinel"), b"s")?;
    std::fs::create_dir_all(&staging)?;
    let state = t.path().join("state");
    let good = TestImage::new().layer(&base_tar(), Compress::Gzip);
    good.write(&t.path().join("good"), "v")?;
    apply(&prep_options(&oci(&t.path().join("good"), "v"), "1.0", &staging, &state))?;
    let before = facts(&root)?;
    let mut failures = Vec::new();
    let cases: Vec<Case> = [path_cases(), symlink_cases(), link_and_whiteout_cases(), tar_cases(), image_cases()]
        .into_iter()
        .flatten()
        .collect();
    for (i, case) in cases.into_iter().enumerate() {
        let dir = t.path().join(format!("img-{i}"));
        case.image.write(&dir, "v")?;
        let r = apply(&prep_options(&oci(&dir, "v"), "1.0", &staging, &state));
        let text = match r {
            Ok(s) => format!("ACCEPTED: {s:?}"),
            Err(e) => format!("{:#}", anyhow::Error::from(e)),
        };
        if std::env::var_os("SHOW_ERRORS").is_some() {
            eprintln!("{}: {text}", case.name);
        }
        if !case.expect.iter().all(|x| text.contains(x)) {
            failures.push(format!("{}: expected {:?} in: {text}", case.name, case.expect));
        }
        let after = facts(&root)?;
        if after != before {
            let changed: Vec<_> =
                after.iter().filter(|(k, v)| before.get(*k) != Some(v)).map(|(k, _)| k.clone()).collect();
            let gone: Vec<_> = before.keys().filter(|k| !after.contains_key(*k)).cloned().collect();
            failures.push(format!("{}: tree changed: {changed:?} gone {gone:?}", case.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[test]
fn hardlink_to_an_existing_inode_is_never_written_through() -> R {
    let t = tmp();
    let img = TestImage::new()
        .layer(&base_tar(), Compress::Gzip)
        .layer(
            &layer(|t| {
                t.hardlink(&p("h"), &p("a.php"));
            }),
            Compress::Gzip,
        )
        .layer(
            &layer(|t| {
                t.file(&p("h"), 0o644, b"new content");
            }),
            Compress::Gzip,
        );
    img.write(&t.path().join("img"), "v")?;
    let staging = t.path().join("staging");
    std::fs::create_dir_all(&staging)?;
    apply(&prep_options(&oci(&t.path().join("img"), "v"), "1.0", &staging, &t.path().join("state")))?;
    assert_eq!(std::fs::read(staging.join("php-1.0/a.php"))?, b"a");
    assert_eq!(std::fs::read(staging.join("php-1.0/h"))?, b"new content");
    Ok(())
}

#[test]
fn compression_bombs_are_bounded() -> R {
    let t = tmp();
    let zeros = vec![0u8; 4 << 20];
    let img = TestImage::new().layer(&base_tar(), Compress::Gzip).layer(
        &layer(|t| {
            t.file(&p("zeros"), 0o644, &zeros);
        }),
        Compress::Zstd,
    );
    img.write(&t.path().join("img"), "v")?;
    let staging = t.path().join("staging");
    std::fs::create_dir_all(&staging)?;
    let mut o = prep_options(&oci(&t.path().join("img"), "v"), "1.0", &staging, &t.path().join("state"));
    o.image.limits.ratio_floor = 1 << 20;
    o.image.limits.max_ratio = 50;
    let e = apply(&o).map(|_| ()).map_err(|e| e.to_string());
    assert!(e.as_ref().is_err_and(|m| m.contains("expands to more than")), "{e:?}");
    assert!(!staging.join("php-1.0").exists());
    let names: Vec<_> = std::fs::read_dir(&staging)?.collect::<Result<Vec<_>, _>>()?;
    assert_eq!(names.len(), 1, "only the lock file may remain: {names:?}");
    o.image.limits = scap_bridge::blob::Limits::default();
    o.image.max_total_bytes = 1 << 20;
    assert!(apply(&o).is_err_and(|e| e.to_string().contains("expands to more than")));
    Ok(())
}

#[test]
fn the_total_bound_holds_over_layers_read_ahead() -> R {
    // Without TOCs the layers are read twice (indexed, then extracted): 2.8 MiB in all.
    // The second extraction starts while the first is parsed, when only 2.1 MiB are spent,
    // so the total must be checked once each layer is done too.
    let t = tmp();
    let part = vec![1u8; 700 << 10];
    let img = TestImage::new()
        .layer(&base_tar(), Compress::Gzip)
        .layer(
            &layer(|t| {
                t.file(&p("one"), 0o644, &part);
            }),
            Compress::Zstd,
        )
        .layer(
            &layer(|t| {
                t.file(&p("two"), 0o644, &part);
            }),
            Compress::Zstd,
        );
    img.write(&t.path().join("img"), "v")?;
    let staging = t.path().join("staging");
    std::fs::create_dir_all(&staging)?;
    let mut o = prep_options(&oci(&t.path().join("img"), "v"), "1.0", &staging, &t.path().join("state"));
    o.image.max_total_bytes = 5 << 19;
    let e = apply(&o).map(|_| ()).map_err(|e| e.to_string());
    assert!(e.as_ref().is_err_and(|m| m.contains("more than 2621440 bytes in all")), "{e:?}");
    assert!(!staging.join("php-1.0").exists());
    o.image.max_total_bytes = 4 << 20;
    apply(&o)?;
    assert_eq!(std::fs::read(staging.join("php-1.0/two"))?, part);
    Ok(())
}
