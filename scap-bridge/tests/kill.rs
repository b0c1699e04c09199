//! Atomicity under `kill -9`: the binary is killed at random moments of a prep; the live
//! `php-1.0` must then be exactly the old tree or exactly the new one, nothing but our
//! temporary tree may appear beside it, and the next run must clean up and finish.
//! `SCAP_BRIDGE_KILL_ITERATIONS` sets the number of kills and `SCAP_BRIDGE_KILL_SIZE` the
//! tree size (tiny, small, medium); `scripts/kill-soak.sh` runs many kills on a bigger tree.

mod common;

use common::*;
use mwfixture::{derive_version, generate_version_tree, Size};
use rand::{Rng, SeedableRng};
use scap_bridge::testing::{tar_of_dir, Compress, TestImage};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn prep(image: &str, staging: &Path, state: &Path) -> Command {
    let mut c = Command::new(bin());
    c.args(["prep", image, "--version", "1.0", "-q"])
        .arg("--staging-dir")
        .arg(staging)
        .arg("--state-dir")
        .arg(state)
        .arg("--lock-file")
        .arg(staging.join("scap.lock"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn run_to_end(image: &str, staging: &Path, state: &Path) -> R {
    let out = prep(image, staging, state).output()?;
    if !out.status.success() {
        return Err(format!("prep failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

type Content = BTreeMap<String, (char, u32, String, String)>;

#[test]
fn kill_9_leaves_the_old_tree_or_the_new_one() -> R {
    let iterations: usize = std::env::var("SCAP_BRIDGE_KILL_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(6);
    let t = tmp();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    let size: Size = std::env::var("SCAP_BRIDGE_KILL_SIZE").ok().and_then(|v| v.parse().ok()).unwrap_or(Size::Tiny);
    generate_version_tree(&a, 3, size)?;
    derive_version(&a, &b, 4, 0.3)?;
    let img = t.path().join("img");
    for (tag, dir) in [("a", &a), ("b", &b)] {
        TestImage::new().layer(&tar_of_dir(dir, "srv/mediawiki/php-1.0")?, Compress::Zstd).write(&img, tag)?;
    }
    let (ia, ib) = (oci(&img, "a"), oci(&img, "b"));
    let mut expected: Vec<Content> = Vec::new();
    for (i, image) in [&ia, &ib].into_iter().enumerate() {
        let s = t.path().join(format!("expect-{i}"));
        std::fs::create_dir_all(&s)?;
        run_to_end(image, &s, &t.path().join(format!("expect-state-{i}")))?;
        expected.push(content(&facts(&s.join("php-1.0"))?));
    }
    assert_ne!(expected[0], expected[1]);
    let (staging, state) = (t.path().join("staging"), t.path().join("state"));
    std::fs::create_dir_all(&staging)?;
    run_to_end(&ia, &staging, &state)?;
    let start = Instant::now();
    run_to_end(&ib, &staging, &state)?;
    let full = start.elapsed();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5ca9);
    let allowed = ["php-1.0", "scap.lock", ".scap-bridge.php-1.0.new"];
    let mut outcomes = [0usize; 2];
    let mut current = 1;
    for i in 0..iterations {
        // Always towards the other tree, so that every run has work to do.
        let image = if current == 1 { &ia } else { &ib };
        let mut child = prep(image, &staging, &state).spawn()?;
        let wait = rng.gen_range(0..=(full.as_micros() as u64 * 3 / 2));
        std::thread::sleep(Duration::from_micros(wait));
        let _ = child.kill();
        child.wait()?;
        let now = content(&facts(&staging.join("php-1.0"))?);
        let which = expected.iter().position(|e| *e == now);
        assert!(which.is_some(), "iteration {i}: the live tree is neither the old nor the new one");
        current = which.unwrap_or(0);
        outcomes[current] += 1;
        for e in std::fs::read_dir(&staging)? {
            let name = e?.file_name().to_string_lossy().into_owned();
            assert!(allowed.contains(&name.as_str()), "iteration {i}: unexpected {name}");
        }
    }
    eprintln!("{iterations} kills: old/new outcomes {outcomes:?} (full run {full:?})");
    run_to_end(&ib, &staging, &state)?;
    assert_eq!(content(&facts(&staging.join("php-1.0"))?), expected[1]);
    let names: Vec<_> = std::fs::read_dir(&staging)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
    assert_eq!(names.len(), 2, "leftovers: {names:?}");
    // A final re-prep finds nothing to do.
    let out = Command::new(bin())
        .args(["prep", &ib, "--version", "1.0", "--json"])
        .arg("--staging-dir")
        .arg(&staging)
        .arg("--state-dir")
        .arg(&state)
        .arg("--lock-file")
        .arg(staging.join("scap.lock"))
        .output()?;
    let s: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!((s["nothing_to_do"].as_bool(), s["bytes_written"].as_u64()), (Some(true), Some(0)), "{s}");
    Ok(())
}
