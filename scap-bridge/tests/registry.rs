//! Images from a registry (`docker://`, Debian's docker-registry on loopback, pushed with
//! skopeo), Docker v2 manifests, and image indexes with platform selection.

mod common;

use common::*;
use oci_core::layout::Layout;
use oci_core::testing::TestRegistry;
use oci_spec::image::{Descriptor, MediaType};
use scap_bridge::engine::apply;
use scap_bridge::testing::{Compress, RawTar, TestImage};
use std::path::Path;
use std::process::Command;

fn version_tar(content: &[u8]) -> Vec<u8> {
    let mut t = RawTar::new();
    t.dir("srv/", 0o755).dir("srv/mediawiki/", 0o755).dir("srv/mediawiki/php-1.0/", 0o755);
    t.file("srv/mediawiki/php-1.0/arch.txt", 0o644, content).symlink("srv/mediawiki/php-1.0/l", "arch.txt");
    t.finish()
}

/// A layout with an amd64 and an arm64 image and an index over both, tagged "multi".
fn multi_arch(dir: &Path) -> R {
    let mut arm = TestImage::new().layer(&version_tar(b"arm64"), Compress::Gzip);
    arm.architecture = "arm64".into();
    let amd = TestImage::new().layer(&version_tar(b"amd64"), Compress::Gzip);
    let mut manifests = Vec::new();
    for (img, arch) in [(&arm, "arm64"), (&amd, "amd64")] {
        let d = img.write(dir, arch)?;
        let size = Layout::open(dir)?.blob_size(&d).unwrap_or(0);
        manifests.push(serde_json::json!({
            "mediaType": oci_core::media::OCI_MANIFEST, "digest": d.to_string(), "size": size,
            "platform": { "os": "linux", "architecture": arch },
        }));
    }
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": oci_core::media::OCI_INDEX, "manifests": manifests,
    }))?;
    let layout = Layout::open(dir)?;
    let (d, n) = layout.put_blob_bytes(&index)?;
    layout.set_tag("multi", &Descriptor::new(MediaType::ImageIndex, n, d.to_oci()))?;
    Ok(())
}

fn prep_arch(image: &str, platform: &str, t: &Path, name: &str) -> R<String> {
    let staging = t.join(name);
    std::fs::create_dir_all(&staging)?;
    let mut o = prep_options(image, "1.0", &staging, &t.join(format!("state-{name}")));
    o.image.platform = platform.into();
    apply(&o)?;
    Ok(std::fs::read_to_string(staging.join("php-1.0/arch.txt"))?)
}

#[test]
fn index_platform_selection() -> R {
    let t = tmp();
    let l = t.path().join("L");
    multi_arch(&l)?;
    let image = oci(&l, "multi");
    assert_eq!(prep_arch(&image, "linux/amd64", t.path(), "a")?, "amd64");
    assert_eq!(prep_arch(&image, "linux/arm64", t.path(), "b")?, "arm64");
    let e = prep_arch(&image, "linux/s390x", t.path(), "c").map_err(|e| e.to_string());
    assert!(e.as_ref().is_err_and(|m| m.contains("no image for linux/s390x")), "{e:?}");
    Ok(())
}

#[test]
fn registry_images_oci_and_docker_v2() -> R {
    let has_skopeo = Command::new("skopeo").arg("--version").output().is_ok_and(|o| o.status.success());
    let reg = match TestRegistry::start() {
        Ok(r) if has_skopeo => r,
        _ => {
            eprintln!("docker-registry or skopeo missing; skipping");
            return Ok(());
        }
    };
    let t = tmp();
    let l = t.path().join("L");
    multi_arch(&l)?;
    let host = reg.host();
    let copy = |args: &[&str]| -> R {
        let out = Command::new("skopeo").arg("copy").arg("--dest-tls-verify=false").args(args).output()?;
        if !out.status.success() {
            return Err(format!("skopeo {args:?}: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        Ok(())
    };
    copy(&["--all", &format!("oci:{}:multi", l.display()), &format!("docker://{host}/mw/app:multi")])?;
    copy(&["--format", "v2s2", &format!("oci:{}:amd64", l.display()), &format!("docker://{host}/mw/app:v2")])?;
    assert_eq!(prep_arch(&format!("docker://{host}/mw/app:multi"), "linux/arm64", t.path(), "r1")?, "arm64");
    assert_eq!(prep_arch(&format!("docker://{host}/mw/app:v2"), "linux/amd64", t.path(), "r2")?, "amd64");
    // Downloads are spooled in the state directory and removed once read.
    let spool = t.path().join("state-r2/spool");
    let left: Vec<_> = walkdir(&spool)?;
    assert!(left.is_empty(), "spool not cleaned: {left:?}");
    Ok(())
}

fn walkdir(p: &Path) -> R<Vec<String>> {
    let mut out = Vec::new();
    if !p.exists() {
        return Ok(out);
    }
    for e in std::fs::read_dir(p)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            out.extend(walkdir(&e.path())?);
        } else {
            out.push(e.path().display().to_string());
        }
    }
    Ok(out)
}
