//! The mtime contract as a property over random edit sequences (applied within the same
//! second, same-size edits included): after every prep, unchanged files keep inode, mtime
//! and mode; changed files get a new mtime in a strictly greater second; directories with
//! no direct change keep their mtime; the tree equals the model; re-prepping writes nothing.

mod common;

use common::*;
use proptest::prelude::*;
use scap_bridge::engine::apply;
use scap_bridge::testing::{Compress, RawTar, TestImage};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone)]
enum Edit {
    /// Change a file's content; `same_size` keeps its length.
    Modify {
        file: usize,
        same_size: bool,
        byte: u8,
    },
    Add {
        dir: usize,
        name: u8,
    },
    Remove {
        file: usize,
    },
    ToggleExec {
        file: usize,
    },
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<usize>(), any::<bool>(), any::<u8>()).prop_map(|(file, same_size, byte)| Edit::Modify { file, same_size, byte }),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(dir, name)| Edit::Add { dir, name }),
        1 => any::<usize>().prop_map(|file| Edit::Remove { file }),
        1 => any::<usize>().prop_map(|file| Edit::ToggleExec { file }),
    ]
}

const DIRS: [&str; 4] = ["", "a", "a/b", "c"];

/// path -> (content, exec)
type Model = BTreeMap<String, (Vec<u8>, bool)>;

fn initial() -> Model {
    let mut m = Model::new();
    for (i, d) in DIRS.iter().enumerate() {
        for j in 0..3 {
            let p = if d.is_empty() { format!("f{j}.php") } else { format!("{d}/f{j}.php") };
            m.insert(p, (format!("content {i} {j}").into_bytes(), j == 2));
        }
    }
    m
}

fn apply_edit(m: &mut Model, e: &Edit) {
    let keys: Vec<String> = m.keys().cloned().collect();
    match *e {
        Edit::Modify { file, same_size, byte } if !keys.is_empty() => {
            if let Some((c, _)) = m.get_mut(&keys[file % keys.len()]) {
                if same_size && !c.is_empty() {
                    let i = byte as usize % c.len();
                    c[i] = if c[i] == byte { byte.wrapping_add(1) } else { byte };
                } else {
                    c.push(byte);
                }
            }
        }
        Edit::Add { dir, name } => {
            let d = DIRS[dir % DIRS.len()];
            let p = if d.is_empty() { format!("n{name}.php") } else { format!("{d}/n{name}.php") };
            m.entry(p).or_insert((vec![name; 3], false));
        }
        Edit::Remove { file } if keys.len() > 1 => {
            m.remove(&keys[file % keys.len()]);
        }
        Edit::ToggleExec { file } if !keys.is_empty() => {
            if let Some((_, x)) = m.get_mut(&keys[file % keys.len()]) {
                *x = !*x;
            }
        }
        _ => {}
    }
}

fn image_of(m: &Model, dir: &std::path::Path, tag: &str) -> R<String> {
    let mut t = RawTar::new();
    t.dir("srv/", 0o755).dir("srv/mediawiki/", 0o755).dir("srv/mediawiki/php-1.0/", 0o755);
    for d in &DIRS[1..] {
        t.dir(&format!("srv/mediawiki/php-1.0/{d}/"), 0o755);
    }
    for (p, (c, x)) in m {
        t.file(&format!("srv/mediawiki/php-1.0/{p}"), if *x { 0o755 } else { 0o644 }, c);
    }
    TestImage::new().layer(&t.finish(), Compress::Zstd).write(dir, tag)?;
    Ok(oci(dir, tag))
}

fn parent(p: &str) -> String {
    p.rsplit_once('/').map_or(String::new(), |(a, _)| a.to_string())
}

fn run(steps: Vec<Vec<Edit>>) -> R {
    let t = tmp();
    let (staging, state, img) = (t.path().join("staging"), t.path().join("state"), t.path().join("img"));
    std::fs::create_dir_all(&staging)?;
    let live = staging.join("php-1.0");
    let mut model = initial();
    apply(&prep_options(&image_of(&model, &img, "s0")?, "1.0", &staging, &state))?;
    let mut before = facts(&live)?;
    for (n, edits) in steps.iter().enumerate() {
        let old = model.clone();
        for e in edits {
            apply_edit(&mut model, e);
        }
        let image = image_of(&model, &img, &format!("s{}", n + 1))?;
        let s = apply(&prep_options(&image, "1.0", &staging, &state))?;
        let after = facts(&live)?;
        let mut touched: BTreeSet<String> = BTreeSet::new();
        let mut changed_bytes = 0;
        for (p, v) in &model {
            let f = after.get(p).ok_or_else(|| format!("{p} missing"))?;
            assert_eq!(f.sha, oci_core::Digest::of(&v.0).to_string(), "{p}");
            assert_eq!(f.mode, if v.1 { 0o775 } else { 0o664 }, "{p}");
            if old.get(p) == Some(v) {
                assert_eq!(f, &before[p], "{p} unchanged in content and mode: must be untouched");
            } else {
                touched.insert(parent(p));
                changed_bytes += v.0.len() as u64;
                if let Some(b) = before.get(p) {
                    assert!(f.mtime.0 > b.mtime.0, "{p}: mtime {:?} not in a later second than {:?}", f.mtime, b.mtime);
                    assert_ne!(f.ino, b.ino, "{p}: changed content must be a new inode");
                }
            }
        }
        for p in old.keys().filter(|p| !model.contains_key(*p)) {
            assert!(!after.contains_key(p), "{p} should be gone");
            touched.insert(parent(p));
        }
        for d in &DIRS[1..] {
            if !touched.contains(*d) {
                assert_eq!(after[*d].mtime, before[*d].mtime, "directory {d} saw no change");
            }
        }
        let provenance = after[".scap-bridge-provenance.json"].size;
        assert!(s.bytes_written <= changed_bytes + provenance, "{} > {changed_bytes} + {provenance}", s.bytes_written);
        before = after;
    }
    let last = image_of(&model, &img, &format!("s{}", steps.len()))?;
    let s = apply(&prep_options(&last, "1.0", &staging, &state))?;
    assert!(s.nothing_to_do && s.bytes_written == 0, "{s:?}");
    assert_eq!(facts(&live)?, before);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn mtime_contract_holds(steps in prop::collection::vec(prop::collection::vec(edit(), 1..4), 1..5)) {
        run(steps).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
}
