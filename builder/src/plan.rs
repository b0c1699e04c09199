//! The layer plan: which entries of which tree go into which layer.
//!
//! Every shared tree is one layer. A version's tree is cut by the spec's `layers.split`
//! directories (the deepest matching split wins; a split with `bins = N` is cut into N
//! layers by a stable hash of each path); everything else is the version's `core` layer.
//! The assignment depends only on relative paths and the spec, so it is stable from build
//! to build.

use crate::spec::{Spec, Split, Tree};
use crate::walk::Entry;
use sha2::{Digest as _, Sha256};
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct LayerPlan {
    /// Stable identity of this layer across builds, e.g. `1.43.0-wmf.5/extensions#2of4`.
    pub slot: String,
    /// What the layer holds, e.g. `extensions#2of4`, `core`, `shared/wmf-config`.
    pub component: String,
    /// The version it belongs to (None for shared trees).
    pub version: Option<String>,
    /// Source directory of the tree.
    pub source: PathBuf,
    /// Directory in the image the tree goes to, e.g. `srv/mediawiki/php-1.43.0-wmf.5`.
    pub dest: String,
    pub entries: Vec<Entry>,
}

impl LayerPlan {
    pub fn file_bytes(&self) -> u64 {
        self.entries
            .iter()
            .map(|e| match e.kind {
                crate::walk::Kind::File { size, .. } => size,
                _ => 0,
            })
            .sum()
    }
}

/// Stable bin of a path: the first 8 bytes of its sha256, modulo `bins`.
pub fn bin_of(rel: &str, bins: u32) -> u32 {
    if bins <= 1 {
        return 0;
    }
    let h = Sha256::digest(rel.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[..8]);
    (u64::from_le_bytes(b) % u64::from(bins.max(1))) as u32
}

fn under(rel: &str, dir: &str) -> bool {
    rel == dir || (rel.len() > dir.len() && rel.starts_with(dir) && rel.as_bytes()[dir.len()] == b'/')
}

pub fn plan_shared(tree: &Tree, entries: Vec<Entry>) -> LayerPlan {
    LayerPlan {
        slot: format!("shared/{}", tree.name),
        component: format!("shared/{}", tree.name),
        version: None,
        source: tree.source.clone(),
        dest: tree.dest.clone(),
        entries,
    }
}

pub fn plan_version(tree: &Tree, entries: Vec<Entry>, splits: &[Split]) -> Vec<LayerPlan> {
    // index 0: core; then one slot per (split, bin) in spec order.
    let mut names = vec!["core".to_string()];
    let mut first_slot = Vec::new();
    for s in splits {
        first_slot.push(names.len());
        for b in 0..s.bins {
            names.push(if s.bins == 1 { s.path.clone() } else { format!("{}#{}of{}", s.path, b + 1, s.bins) });
        }
    }
    let mut buckets: Vec<Vec<Entry>> = vec![Vec::new(); names.len()];
    for e in entries {
        let best = splits.iter().enumerate().filter(|(_, s)| under(&e.rel, &s.path)).max_by_key(|(_, s)| s.path.len());
        let idx = match best {
            None => 0,
            Some((i, s)) => first_slot[i] + bin_of(&e.rel, s.bins) as usize,
        };
        buckets[idx].push(e);
    }
    names
        .into_iter()
        .zip(buckets)
        .filter(|(_, entries)| !entries.is_empty())
        .map(|(component, entries)| LayerPlan {
            slot: format!("{}/{component}", tree.name),
            component,
            version: Some(tree.name.clone()),
            source: tree.source.clone(),
            dest: tree.dest.clone(),
            entries,
        })
        .collect()
}

/// Check the layer budget before doing any work.
pub fn check_layer_count(
    spec: &Spec,
    base_layers: usize,
    shared: usize,
    per_version: &[(String, usize)],
) -> Result<(), String> {
    let total: usize = base_layers + shared + per_version.iter().map(|(_, n)| n).sum::<usize>();
    if total > spec.max_layers {
        let detail: Vec<String> = per_version.iter().map(|(v, n)| format!("{v}: {n}")).collect();
        return Err(format!(
            "the aggregate image would have {total} layers (base {base_layers}, shared {shared}, {}), more than layers.max_layers = {}; use fewer split bins or fewer versions",
            detail.join(", "),
            spec.max_layers
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::walk::{Kind, Stat};

    fn e(rel: &str) -> Entry {
        Entry {
            rel: rel.into(),
            kind: Kind::File { size: 1, exec: false },
            stat: Stat { dev: 0, ino: 0, size: 1, mtime_ns: 0, ctime_ns: 0, mode: 0 },
        }
    }

    #[test]
    fn deepest_split_wins_and_bins_are_stable() {
        let tree = Tree { name: "v".into(), source: "/s".into(), dest: "srv/mediawiki/php-v".into() };
        let splits = vec![Split { path: "cache".into(), bins: 1 }, Split { path: "cache/l10n".into(), bins: 2 }];
        let entries = vec![
            e("cache"),
            e("cache/x"),
            e("cache/l10n"),
            e("cache/l10n/a.cdb"),
            e("cache/l10n/b.cdb"),
            e("cachex"),
            e("index.php"),
        ];
        let plans = plan_version(&tree, entries.clone(), &splits);
        let find =
            |rel: &str| plans.iter().find(|p| p.entries.iter().any(|x| x.rel == rel)).map(|p| p.component.clone());
        assert_eq!(find("index.php").as_deref(), Some("core"));
        assert_eq!(find("cachex").as_deref(), Some("core"));
        assert_eq!(find("cache/x").as_deref(), Some("cache"));
        assert!(find("cache/l10n/a.cdb").is_some_and(|c| c.starts_with("cache/l10n#")));
        assert_eq!(bin_of("cache/l10n/a.cdb", 2), bin_of("cache/l10n/a.cdb", 2));
        let again = plan_version(&tree, entries, &splits);
        let a: Vec<_> = plans.iter().map(|p| (p.slot.clone(), p.entries.len())).collect();
        let b: Vec<_> = again.iter().map(|p| (p.slot.clone(), p.entries.len())).collect();
        assert_eq!(a, b);
    }
}
