//! Unit tests of the layer semantics, on hand-made indexes.

use super::*;
use crate::index::IndexEntry;

fn d(p: &str) -> IndexEntry {
    IndexEntry { path: p.into(), kind: EntryKind::Dir, mode: 0o755 }
}
fn f(p: &str, b: u8) -> IndexEntry {
    IndexEntry { path: p.into(), kind: EntryKind::File { size: 1, sha256: [b; 32] }, mode: 0o644 }
}
fn l(p: &str, t: &str) -> IndexEntry {
    IndexEntry { path: p.into(), kind: EntryKind::Symlink { target: t.into() }, mode: 0o777 }
}
fn h(p: &str, t: &str) -> IndexEntry {
    IndexEntry { path: p.into(), kind: EntryKind::Hardlink { target: t.into() }, mode: 0o644 }
}
fn wh(p: &str) -> IndexEntry {
    IndexEntry { path: p.into(), kind: EntryKind::Whiteout, mode: 0 }
}
fn opq(p: &str) -> IndexEntry {
    IndexEntry { path: p.into(), kind: EntryKind::Opaque, mode: 0 }
}

fn view(scope: &str, layers: &[Vec<IndexEntry>], policy: SymlinkPolicy) -> Result<View> {
    let mut b = ViewBuilder::new(scope);
    for (i, entries) in layers.iter().enumerate() {
        let idx = LayerIndex { diff_id: Digest::of(&[i as u8]), entries: entries.clone() };
        b.apply(i, &Digest::of(&[i as u8]), &idx)?;
    }
    b.finish(policy)
}

fn paths(v: &View) -> Vec<String> {
    v.nodes.keys().map(|k| k.as_str().to_string()).collect()
}

fn refusal(r: Result<View>) -> Option<Refusal> {
    match r {
        Err(Error::Entry { reason, .. }) => Some(reason),
        _ => None,
    }
}

#[test]
fn whiteouts_hide_lower_layers_only_wherever_they_are() -> Result<()> {
    let v = view(
        "",
        &[vec![d("a"), f("a/x", 1), f("a/y", 1), f("a/z", 1)], vec![f("a/y", 2), wh("a/y"), f("a/n", 2), wh("a/x")]],
        SymlinkPolicy::Inside,
    )?;
    assert_eq!(paths(&v), ["", "a", "a/n", "a/y", "a/z"]);
    assert!(matches!(v.get("a/y").map(|n| &n.kind), Some(NodeKind::File { sha256, .. }) if sha256[0] == 2));
    Ok(())
}

#[test]
fn opaque_dirs_hide_lower_children_only() -> Result<()> {
    let v = view("", &[vec![f("d/a", 1), f("d/b", 1), f("e", 1)], vec![f("d/c", 2), opq("d")]], SymlinkPolicy::Inside)?;
    assert_eq!(paths(&v), ["", "d", "d/c", "e"]);
    Ok(())
}

#[test]
fn dir_over_dir_keeps_children_anything_else_replaces() -> Result<()> {
    let mut dm = d("a");
    dm.mode = 0o700;
    let v = view("", &[vec![d("a"), f("a/x", 1), d("b"), f("b/y", 1)], vec![dm, f("b", 2)]], SymlinkPolicy::Inside)?;
    assert_eq!(paths(&v), ["", "a", "a/x", "b"]);
    assert_eq!(v.get("a").map(|n| n.mode), Some(0o700));
    Ok(())
}

#[test]
fn nothing_is_written_through_a_symlink_or_file() {
    let r = view("", &[vec![l("a", "/etc")], vec![f("a/passwd", 1)]], SymlinkPolicy::Any);
    assert_eq!(refusal(r), Some(Refusal::ThroughSymlink("a".into())));
    let r = view("", &[vec![l("a", "b"), f("a/x", 1)]], SymlinkPolicy::Any);
    assert_eq!(refusal(r), Some(Refusal::ThroughSymlink("a".into())));
    let r = view("", &[vec![f("a", 1), f("a/x", 1)]], SymlinkPolicy::Any);
    assert_eq!(refusal(r), Some(Refusal::ParentNotDir("a".into())));
    // A directory replacing a lower symlink is a new directory, not the symlink's target.
    let v = view("", &[vec![l("a", "/etc")], vec![d("a"), f("a/x", 1)]], SymlinkPolicy::Any);
    assert!(v.is_ok_and(|v| v.get("a").is_some_and(|n| n.kind == NodeKind::Dir)));
}

#[test]
fn hardlinks() -> Result<()> {
    let v = view("", &[vec![f("a", 1)], vec![h("b", "a"), f("a", 2)]], SymlinkPolicy::Inside)?;
    let sha = |p| match v.get(p).map(|n| &n.kind) {
        Some(NodeKind::File { sha256, .. }) => sha256[0],
        _ => 0,
    };
    assert_eq!((sha("a"), sha("b")), (2, 1));
    let cases = [
        (vec![vec![h("b", "a"), f("a", 1)]], Refusal::HardlinkMissing("a".into())),
        (vec![vec![f("a", 1)], vec![wh("a"), h("b", "a")]], Refusal::HardlinkMissing("a".into())),
        (vec![vec![d("a"), h("b", "a")]], Refusal::HardlinkNotFile("a".into())),
        (vec![vec![l("a", "x"), h("b", "a")]], Refusal::HardlinkNotFile("a".into())),
    ];
    for (layers, want) in cases {
        assert_eq!(refusal(view("", &layers, SymlinkPolicy::Inside)), Some(want));
    }
    let r = view("s", &[vec![f("etc/shadow", 1), h("s/x", "etc/shadow")]], SymlinkPolicy::Inside);
    assert_eq!(refusal(r), Some(Refusal::HardlinkOutside("etc/shadow".into())));
    Ok(())
}

#[test]
fn symlinks_that_leave_the_tree() {
    let ok = view(
        "",
        &[vec![d("a"), f("a/x", 1), l("a/l", "x"), l("up", "a/../a/x"), l("dangling", "nope/x")]],
        SymlinkPolicy::Inside,
    );
    assert!(ok.is_ok(), "{ok:?}");
    let bad = [
        vec![l("x", "/etc/passwd")],
        vec![d("a"), l("a/x", "../../etc")],
        // Two hops: each lexically inside, together outside.
        vec![d("a"), d("a/b"), d("a/b/c"), l("a/b/c/up", "../.."), l("a/b/escape", "c/up/../..")],
    ];
    for layers in bad {
        assert!(
            matches!(
                refusal(view("", std::slice::from_ref(&layers), SymlinkPolicy::Inside)),
                Some(Refusal::SymlinkEscapes(_))
            ),
            "{layers:?}"
        );
        assert!(view("", &[layers], SymlinkPolicy::Any).is_ok());
    }
    let loop_ = vec![l("a", "b"), l("b", "a"), l("c", "a/x")];
    assert_eq!(refusal(view("", &[loop_], SymlinkPolicy::Inside)), Some(Refusal::SymlinkLoop));
    let chain: Vec<IndexEntry> = (0..45).map(|i| l(&format!("l{i}"), &format!("l{}", i + 1))).collect();
    assert_eq!(refusal(view("", &[chain], SymlinkPolicy::Inside)), Some(Refusal::SymlinkLoop));
}

#[test]
fn subtree_scope_and_ancestors() -> Result<()> {
    let base = vec![d("srv"), d("srv/mw"), d("srv/mw/php"), f("srv/mw/php/a", 1), f("etc/x", 1), f("srv/mw/other", 1)];
    let v = view("srv/mw/php", std::slice::from_ref(&base), SymlinkPolicy::Inside)?;
    assert_eq!(paths(&v), ["", "a"]);
    for upper in [vec![wh("srv/mw")], vec![opq("srv")], vec![l("srv/mw", "/elsewhere")]] {
        assert!(matches!(
            view("srv/mw/php", &[base.clone(), upper], SymlinkPolicy::Inside),
            Err(Error::NoSubtree { .. })
        ));
    }
    let through =
        view("srv/mw/php", &[base.clone(), vec![l("srv/mw", "/x")], vec![f("srv/mw/php/b", 1)]], SymlinkPolicy::Any);
    assert_eq!(refusal(through), Some(Refusal::ThroughSymlink("srv/mw".into())));
    // Devices are refused inside the subtree, ignored outside it.
    let dev = IndexEntry { path: "dev/null".into(), kind: EntryKind::Special("character device"), mode: 0o666 };
    assert!(view("srv/mw/php", &[base.clone(), vec![dev.clone()]], SymlinkPolicy::Inside).is_ok());
    let inside = IndexEntry { path: "srv/mw/php/null".into(), ..dev };
    assert_eq!(
        refusal(view("srv/mw/php", &[base, vec![inside]], SymlinkPolicy::Inside)),
        Some(Refusal::Special("character device"))
    );
    Ok(())
}

#[test]
fn duplicates_in_one_layer() {
    let r = view("", &[vec![l("a", "x"), d("a")]], SymlinkPolicy::Any);
    assert_eq!(refusal(r), Some(Refusal::Duplicate));
    let r = view("", &[vec![f("a", 1), f("a", 2)]], SymlinkPolicy::Any);
    assert_eq!(refusal(r), Some(Refusal::Duplicate));
}
