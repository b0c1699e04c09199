//! Entry names as data: validation and normalisation of tar names into relative,
//! `/`-separated paths, and [`PathKey`], the order in which trees are walked (a directory
//! is immediately followed by all of its descendants).
//!
//! Nothing here touches the file system; the file system side never re-resolves these
//! strings through symlinks (see `fsutil`).

use crate::error::Refusal;
use std::cmp::Ordering;
use std::fmt;

/// Longest path component (Linux `NAME_MAX`).
pub const NAME_MAX: usize = 255;
/// Longest path (Linux `PATH_MAX`).
pub const PATH_MAX: usize = 4096;

fn check_chars(s: &str) -> Result<(), Refusal> {
    if s.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err(Refusal::ControlChar);
    }
    Ok(())
}

/// Normalise a tar entry name: `./` prefixes, `.` components, repeated and trailing
/// slashes go; the root itself (`.`, `./`, `/`) becomes `""`. Refused: `..` components,
/// other absolute names, control characters, over-long components or paths, backslashes
/// and drive letters, names that are not UTF-8.
pub fn normalize(raw: &[u8]) -> Result<String, Refusal> {
    if raw.is_empty() {
        return Err(Refusal::EmptyPath);
    }
    if raw.len() > PATH_MAX {
        return Err(Refusal::PathTooLong);
    }
    let s = std::str::from_utf8(raw).map_err(|_| Refusal::NotUtf8)?;
    check_chars(s)?;
    if s.contains('\\') {
        return Err(Refusal::WindowsPath);
    }
    let b = s.as_bytes();
    if b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':' {
        return Err(Refusal::WindowsPath);
    }
    if s.bytes().all(|c| c == b'/' || c == b'.') && !s.contains("..") {
        return Ok(String::new());
    }
    if s.starts_with('/') {
        return Err(Refusal::Absolute);
    }
    let mut out = String::with_capacity(s.len());
    for c in s.split('/') {
        match c {
            "" | "." => continue,
            ".." => return Err(Refusal::DotDot),
            c if c.len() > NAME_MAX => return Err(Refusal::NameTooLong),
            c => {
                if !out.is_empty() {
                    out.push('/');
                }
                out.push_str(c);
            }
        }
    }
    Ok(out)
}

/// Check a symlink target: UTF-8, not empty, at most `PATH_MAX`, no control characters.
/// Where it points is checked against the final tree (see `view`).
pub fn link_target(raw: &[u8]) -> Result<String, Refusal> {
    if raw.is_empty() {
        return Err(Refusal::EmptyTarget);
    }
    if raw.len() > PATH_MAX {
        return Err(Refusal::PathTooLong);
    }
    let s = std::str::from_utf8(raw).map_err(|_| Refusal::NotUtf8)?;
    check_chars(s)?;
    Ok(s.to_string())
}

/// `parent` of a relative path (`""` for top-level names).
pub fn parent(p: &str) -> &str {
    p.rsplit_once('/').map_or("", |(a, _)| a)
}

/// Last component.
pub fn file_name(p: &str) -> &str {
    p.rsplit_once('/').map_or(p, |(_, b)| b)
}

/// `a/b` joined; `b` alone when `a` is the root.
pub fn join(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_string()
    } else if b.is_empty() {
        a.to_string()
    } else {
        format!("{a}/{b}")
    }
}

/// Whether `p` is `root` or below it.
pub fn within(p: &str, root: &str) -> bool {
    root.is_empty() || p == root || (p.len() > root.len() && p.starts_with(root) && p.as_bytes()[root.len()] == b'/')
}

/// Paths compared as if `/` were the smallest byte: a directory sorts immediately before
/// all of its descendants, which form one contiguous range.
pub fn cmp(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let n = a.len().min(b.len());
    // Equal bytes map to equal bytes, so only the first difference matters. Skip the
    // common prefix (long in a tree: `srv/mediawiki/php-…/extensions/…`) 16 bytes at a
    // time, then compare the first differing bytes with '/' sorting first.
    let mut i = 0;
    while i + 16 <= n && a[i..i + 16] == b[i..i + 16] {
        i += 16;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    let map = |c: u8| if c == b'/' { 0 } else { c };
    match (a.get(i), b.get(i)) {
        (Some(&x), Some(&y)) => map(x).cmp(&map(y)),
        _ => a.len().cmp(&b.len()),
    }
}

/// A relative path ordered by [`cmp`].
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PathKey(pub Box<str>);

impl PathKey {
    pub fn new(s: &str) -> Self {
        PathKey(s.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The exclusive upper bound of `p`'s descendants (a key no valid path equals, since
    /// control characters are refused).
    pub fn descendants_end(p: &str) -> PathKey {
        PathKey(format!("{p}\u{1}").into())
    }
}

impl Ord for PathKey {
    fn cmp(&self, other: &Self) -> Ordering {
        cmp(&self.0, &other.0)
    }
}

impl PartialOrd for PathKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for PathKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_table() {
        let ok = [
            ("a", "a"),
            ("./a/b/", "a/b"),
            ("a//b/./c", "a/b/c"),
            (".", ""),
            ("./", ""),
            ("/", ""),
            ("ñandú/x", "ñandú/x"),
            ("x/a:b", "x/a:b"),
        ];
        for (raw, want) in ok {
            assert_eq!(normalize(raw.as_bytes()).as_deref(), Ok(want), "{raw}");
        }
        let long = "x".repeat(256);
        let bad: [(&[u8], Refusal); 11] = [
            (b"", Refusal::EmptyPath),
            (b"../a", Refusal::DotDot),
            (b"a/../../b", Refusal::DotDot),
            (b"..", Refusal::DotDot),
            (b"/etc/passwd", Refusal::Absolute),
            (b"a\nb", Refusal::ControlChar),
            (b"a\0b", Refusal::ControlChar),
            (b"a\\..\\b", Refusal::WindowsPath),
            (b"C:/x", Refusal::WindowsPath),
            (b"\xff\xfe", Refusal::NotUtf8),
            (long.as_bytes(), Refusal::NameTooLong),
        ];
        for (raw, want) in bad {
            assert_eq!(normalize(raw), Err(want), "{:?}", String::from_utf8_lossy(raw));
        }
        let deep = "d/".repeat(2100);
        assert_eq!(normalize(deep.as_bytes()), Err(Refusal::PathTooLong));
    }

    #[test]
    fn order_keeps_descendants_together() {
        let mut v = vec!["a.b", "a/b", "a", "a/b/c", "a-", "b", "a/a"];
        v.sort_by(|x, y| cmp(x, y));
        assert_eq!(v, ["a", "a/a", "a/b", "a/b/c", "a-", "a.b", "b"]);
        assert!(PathKey::new("a/zzz") < PathKey::descendants_end("a"));
        assert!(PathKey::descendants_end("a") < PathKey::new("a-"));
        assert!(within("a/b", "a") && within("a", "a") && !within("ab", "a") && within("x", ""));
    }

    #[test]
    fn order_equals_the_bytewise_order_with_slash_first() {
        // Long shared prefixes and differences at every position, against the definition.
        let reference = |a: &str, b: &str| {
            let map = |c: u8| if c == b'/' { 0 } else { c };
            a.bytes().map(map).cmp(b.bytes().map(map))
        };
        let alphabet = ["a", "/", "-", ".", "z", "é"];
        let mut seed = 7u64;
        let mut word = |len: usize| {
            let mut w = String::from("srv/mediawiki/php-1.43.0-wmf.5/");
            for _ in 0..len {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                w.push_str(alphabet[(seed >> 33) as usize % alphabet.len()]);
            }
            w
        };
        let words: Vec<String> = (0..300).map(|i| word(i % 40)).collect();
        for a in &words {
            for b in words.iter().take(60) {
                assert_eq!(cmp(a, b), reference(a, b), "{a:?} vs {b:?}");
            }
        }
    }
}
