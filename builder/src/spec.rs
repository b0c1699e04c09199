//! The build spec: one declarative TOML file describing the base image, the shared trees,
//! the versions, the layer plan, compression, ownership and image metadata.
//!
//! Parsing is strict: an unknown key or a bad value is an error naming the key and its
//! line. Relative paths resolve against the spec file's directory. `mwbuild explain`
//! prints [`FIELDS`].

use oci_core::reference::{valid_tag, ImageRef, Reference};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use toml::Spanned;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read build spec {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("build spec {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("build spec {path}, line {line}: `{key}`: {why}")]
    Invalid { path: PathBuf, line: usize, key: String, why: String },
}

/// Documentation of every field, for `mwbuild explain`.
pub const FIELDS: &[(&str, &str, &str)] = &[
    ("mount", "string, default \"/srv/mediawiki\"", "Absolute directory in the image under which shared trees and php-<version> trees are placed."),
    ("base", "table, required", "The image the MediaWiki layers go on top of."),
    ("base.image", "string, required", "Base image reference: \"oci:<dir>[:<tag>]\" (relative to the spec), \"docker://<host>/<repo>@sha256:<digest>\" (must be pinned by digest and match base.allowed_registries), or \"scratch\" for none."),
    ("base.allowed_registries", "array of strings, default []", "Prefixes of \"<host>/<repo>\" a docker:// base image may come from, e.g. \"docker-registry.wikimedia.org/\". A registry base matching none is refused."),
    ("shared", "array of tables", "Trees every image carries (wmf-config, multiversion, ...), one layer each."),
    ("shared.name", "string, required", "Name of the shared tree; also its directory under the mount point unless `dest` is given."),
    ("shared.source", "path, required", "Directory holding the tree (relative to the spec)."),
    ("shared.dest", "string, default: name", "Directory under the mount point the tree goes to (relative, no \"..\")."),
    ("versions", "array of tables, at least one", "MediaWiki versions; each becomes one image tagged with its name and goes to <mount>/php-<name>."),
    ("versions.name", "string, required", "Version name such as \"1.43.0-wmf.5\"; must be a valid tag (letters, digits, '.', '_', '-')."),
    ("versions.source", "path, required", "Directory holding the version's tree (relative to the spec)."),
    ("layers", "table", "How each version's tree is cut into layers."),
    ("layers.exclude", "array of patterns, default [\".git\"]", "Paths left out. A pattern without '/' matches a name at any depth (\".git\"); with '/' it is anchored at the tree root (\"cache/l10n/upstream\"). '*' and '?' match within one name."),
    ("layers.split", "array of {path, bins}", "Subdirectories that become their own layers (\"vendor\", \"extensions\", \"cache/l10n\"); everything else goes to the version's \"core\" layer. The deepest matching split wins."),
    ("layers.split.path", "string, required", "Directory relative to the version root."),
    ("layers.split.bins", "integer 1..=32, default 1", "Cut this directory into N layers by a stable hash of each path, so one change rebuilds 1/N of it."),
    ("layers.max_layers", "integer, default 64", "Most layers an image (including the aggregate) may have; the build fails before doing any work if the plan exceeds it."),
    ("compression", "table", "Layer compression."),
    ("compression.algorithm", "\"zstd\" (default) or \"gzip\"", "zstd layers are application/vnd.oci.image.layer.v1.tar+zstd, gzip ones ...tar+gzip."),
    ("compression.level", "integer, default 3 (zstd) / 6 (gzip)", "Compression level (zstd 1..=19, gzip 1..=9)."),
    ("compression.block_size_kib", "integer 64..=65536, default 4096", "Average size of the segments the tar stream is cut into (at entry boundaries chosen by a hash of the path; between a quarter and three times this size). Each segment is compressed as an independent zstd frame or gzip member, in parallel, so the output does not depend on the thread count, and a rebuild reuses the frames of unchanged segments."),
    ("ownership", "table", "Owner and mode policy for every entry of the MediaWiki layers."),
    ("ownership.uid", "integer, default 0", "Owner uid of every entry."),
    ("ownership.gid", "integer, default 0", "Owner gid of every entry."),
    ("ownership.file_mode", "octal string, default \"0644\"", "Mode of regular files without any execute bit in the source."),
    ("ownership.exec_mode", "octal string, default \"0755\"", "Mode of regular files with an execute bit in the source."),
    ("ownership.dir_mode", "octal string, default \"0755\"", "Mode of directories."),
    ("ownership.mtime", "integer (Unix seconds), default 0", "The mtime of every entry (source mtimes are ignored)."),
    ("ownership.symlinks", "\"inside\" (default) or \"any\"", "With \"inside\", a symlink whose target (followed through other symlinks) leaves its tree, is absolute, or loops is an error."),
    ("image", "table", "Image metadata."),
    ("image.tags", "array of strings, default []", "Extra tags put on the aggregate image, besides \"multiversion\" and the date tag."),
    ("image.date_tag", "bool, default true", "Also tag the aggregate as <YYYY-MM-DD-HHMMSS>-multiversion (UTC build time). A build whose aggregate is the one the newest date tag already names keeps that tag and adds none, so a no-op build leaves the output unchanged."),
    ("image.labels", "table of strings", "Labels added to every image config."),
    ("image.annotations", "table of strings", "Annotations added to every image manifest."),
    ("image.platform", "\"os/arch\", default \"linux/amd64\"", "Platform chosen from a base image index; written into the config."),
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    mount: Option<Spanned<String>>,
    base: RawBase,
    #[serde(default)]
    shared: Vec<RawShared>,
    versions: Spanned<Vec<RawVersion>>,
    #[serde(default)]
    layers: RawLayers,
    #[serde(default)]
    compression: RawCompression,
    #[serde(default)]
    ownership: RawOwnership,
    #[serde(default)]
    image: RawImage,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBase {
    image: Spanned<String>,
    #[serde(default)]
    allowed_registries: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShared {
    name: Spanned<String>,
    source: Spanned<String>,
    dest: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVersion {
    name: Spanned<String>,
    source: Spanned<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLayers {
    exclude: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    split: Vec<RawSplit>,
    max_layers: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSplit {
    path: Spanned<String>,
    bins: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCompression {
    algorithm: Option<Algorithm>,
    level: Option<Spanned<i64>>,
    block_size_kib: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawOwnership {
    uid: Option<Spanned<i64>>,
    gid: Option<Spanned<i64>>,
    file_mode: Option<Spanned<String>>,
    exec_mode: Option<Spanned<String>>,
    dir_mode: Option<Spanned<String>>,
    mtime: Option<Spanned<i64>>,
    symlinks: Option<SymlinkPolicy>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawImage {
    #[serde(default)]
    tags: Vec<Spanned<String>>,
    date_tag: Option<bool>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    platform: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    Zstd,
    Gzip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SymlinkPolicy {
    Inside,
    Any,
}

/// Where the base image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseImage {
    Scratch,
    Image(ImageRef),
}

#[derive(Debug, Clone)]
pub struct Tree {
    pub name: String,
    pub source: PathBuf,
    /// Directory in the image, relative (no leading '/'), e.g. `srv/mediawiki/php-1.43.0-wmf.5`.
    pub dest: String,
}

#[derive(Debug, Clone)]
pub struct Split {
    pub path: String,
    pub bins: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Compression {
    pub algorithm: Algorithm,
    pub level: i32,
    pub block_size: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Ownership {
    pub uid: u64,
    pub gid: u64,
    pub file_mode: u32,
    pub exec_mode: u32,
    pub dir_mode: u32,
    pub mtime: u64,
}

/// A validated build spec.
#[derive(Debug, Clone)]
pub struct Spec {
    pub path: PathBuf,
    pub mount: String,
    pub base: BaseImage,
    pub shared: Vec<Tree>,
    pub versions: Vec<Tree>,
    pub exclude: Vec<String>,
    pub splits: Vec<Split>,
    pub max_layers: usize,
    pub compression: Compression,
    pub ownership: Ownership,
    pub symlinks: SymlinkPolicy,
    pub tags: Vec<String>,
    pub date_tag: bool,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub platform: (String, String),
}

struct Ctx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn line(&self, span: std::ops::Range<usize>) -> usize {
        self.text[..span.start.min(self.text.len())].bytes().filter(|b| *b == b'\n').count() + 1
    }
    fn err<T>(&self, span: std::ops::Range<usize>, key: &str, why: impl Into<String>) -> Result<T, SpecError> {
        Err(SpecError::Invalid {
            path: self.path.to_path_buf(),
            line: self.line(span),
            key: key.to_string(),
            why: why.into(),
        })
    }
    /// A source path, relative to the spec's directory. Canonical when it exists, so the
    /// cache knows a tree however the spec or the command line spells its path.
    fn resolve(&self, p: &str) -> PathBuf {
        let base = self.path.parent().unwrap_or(Path::new("."));
        let joined = base.join(p);
        std::fs::canonicalize(&joined).unwrap_or(joined)
    }
}

/// A relative path inside the image or a tree: no empty, `.` or `..` components, no
/// leading `/`.
fn clean_relative(p: &str) -> Option<String> {
    let trimmed = p.trim_matches('/');
    if trimmed.is_empty() || p.starts_with('/') {
        return None;
    }
    if trimmed.split('/').any(|c| c.is_empty() || c == "." || c == ".." || c.contains('\0')) {
        return None;
    }
    Some(trimmed.to_string())
}

fn parse_mode(ctx: &Ctx, v: &Option<Spanned<String>>, key: &str, default: u32) -> Result<u32, SpecError> {
    let Some(v) = v else { return Ok(default) };
    let s = v.get_ref().trim_start_matches("0o");
    match u32::from_str_radix(s, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => ctx.err(
            v.span(),
            key,
            format!(
                "{:?} is not an octal permission such as \"0644\" (0..=0777; setuid/setgid/sticky are not allowed)",
                v.get_ref()
            ),
        ),
    }
}

fn int_in(
    ctx: &Ctx,
    v: &Option<Spanned<i64>>,
    key: &str,
    range: std::ops::RangeInclusive<i64>,
    default: i64,
) -> Result<i64, SpecError> {
    let Some(v) = v else { return Ok(default) };
    if !range.contains(v.get_ref()) {
        return ctx.err(v.span(), key, format!("{} is out of range {}..={}", v.get_ref(), range.start(), range.end()));
    }
    Ok(*v.get_ref())
}

impl Spec {
    pub fn load(path: &Path) -> Result<Spec, SpecError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| SpecError::Read { path: path.to_path_buf(), source })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Spec, SpecError> {
        let raw: RawSpec = toml::from_str(text).map_err(|e| SpecError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let ctx = Ctx { path, text };

        let mount = match &raw.mount {
            None => "srv/mediawiki".to_string(),
            Some(m) => {
                if !m.get_ref().starts_with('/') {
                    return ctx.err(m.span(), "mount", "must be an absolute path such as \"/srv/mediawiki\"");
                }
                match clean_relative(m.get_ref().trim_start_matches('/')) {
                    Some(c) => c,
                    None => {
                        return ctx.err(
                            m.span(),
                            "mount",
                            "must be a clean absolute path (no \"..\", \".\", or empty components)",
                        )
                    }
                }
            }
        };

        let base = {
            let s = raw.base.image.get_ref();
            if s == "scratch" {
                BaseImage::Scratch
            } else {
                let r: ImageRef = match s.parse() {
                    Ok(r) => r,
                    Err(e) => return ctx.err(raw.base.image.span(), "base.image", e.to_string()),
                };
                match r {
                    ImageRef::Layout { dir, reference } => {
                        BaseImage::Image(ImageRef::Layout { dir: ctx.resolve(&dir.to_string_lossy()), reference })
                    }
                    ImageRef::Registry { ref reference, .. } => {
                        if !matches!(reference, Some(Reference::Digest(_))) {
                            return ctx.err(
                                raw.base.image.span(),
                                "base.image",
                                format!(
                                    "a registry base image must be pinned by digest: write {}@sha256:<digest>",
                                    r.with_reference(None)
                                ),
                            );
                        }
                        let rp = r.registry_path().unwrap_or_default();
                        if !raw.base.allowed_registries.iter().any(|p| !p.is_empty() && rp.starts_with(p.as_str())) {
                            return ctx.err(raw.base.image.span(), "base.image", format!("{rp} is not in base.allowed_registries ({}); add its prefix there if it is trusted", if raw.base.allowed_registries.is_empty() { "empty".to_string() } else { raw.base.allowed_registries.join(", ") }));
                        }
                        BaseImage::Image(r)
                    }
                }
            }
        };

        let mut seen_dest = BTreeMap::new();
        let mut shared = Vec::new();
        for s in &raw.shared {
            let name = s.name.get_ref();
            if clean_relative(name).is_none_or(|c| c.contains('/')) {
                return ctx.err(s.name.span(), "shared.name", "must be a single directory name");
            }
            let dest_raw = s.dest.as_ref().map_or(name.as_str(), |d| d.get_ref().as_str());
            let Some(dest) = clean_relative(dest_raw) else {
                let span = s.dest.as_ref().map_or(s.name.span(), |d| d.span());
                return ctx.err(span, "shared.dest", "must be a relative path without \"..\"");
            };
            if dest.starts_with("php-") {
                return ctx.err(s.name.span(), "shared.dest", "php-* directories are reserved for versions");
            }
            if seen_dest.insert(dest.clone(), ()).is_some() {
                return ctx.err(s.name.span(), "shared.name", format!("destination {dest:?} is used twice"));
            }
            shared.push(Tree {
                name: name.clone(),
                source: ctx.resolve(s.source.get_ref()),
                dest: format!("{mount}/{dest}"),
            });
        }

        if raw.versions.get_ref().is_empty() {
            return ctx.err(raw.versions.span(), "versions", "at least one version is needed");
        }
        let mut versions = Vec::new();
        for v in raw.versions.get_ref() {
            let name = v.name.get_ref();
            if !valid_tag(name) || name == "multiversion" {
                return ctx.err(
                    v.name.span(),
                    "versions.name",
                    format!("{name:?} cannot be a tag (letters, digits, '.', '_', '-'; not \"multiversion\")"),
                );
            }
            if versions.iter().any(|t: &Tree| &t.name == name) {
                return ctx.err(v.name.span(), "versions.name", format!("version {name:?} is listed twice"));
            }
            versions.push(Tree {
                name: name.clone(),
                source: ctx.resolve(v.source.get_ref()),
                dest: format!("{mount}/php-{name}"),
            });
        }

        let exclude = match &raw.layers.exclude {
            None => vec![".git".to_string()],
            Some(list) => {
                let mut out = Vec::new();
                for p in list {
                    match clean_relative(p.get_ref()) {
                        Some(c) => out.push(c),
                        None => {
                            return ctx.err(
                                p.span(),
                                "layers.exclude",
                                format!("{:?} is not a relative pattern", p.get_ref()),
                            )
                        }
                    }
                }
                out
            }
        };
        let mut splits = Vec::new();
        for s in &raw.layers.split {
            let Some(path) = clean_relative(s.path.get_ref()) else {
                return ctx.err(
                    s.path.span(),
                    "layers.split.path",
                    format!("{:?} is not a relative directory path", s.path.get_ref()),
                );
            };
            if splits.iter().any(|x: &Split| x.path == path) {
                return ctx.err(s.path.span(), "layers.split.path", format!("{path:?} is listed twice"));
            }
            let bins = int_in(&ctx, &s.bins, "layers.split.bins", 1..=32, 1)? as u32;
            splits.push(Split { path, bins });
        }
        let max_layers = int_in(&ctx, &raw.layers.max_layers, "layers.max_layers", 1..=127, 64)? as usize;

        let algorithm = raw.compression.algorithm.unwrap_or(Algorithm::Zstd);
        let (lo, hi, def) = match algorithm {
            Algorithm::Zstd => (1, 19, 3),
            Algorithm::Gzip => (1, 9, 6),
        };
        let level = int_in(&ctx, &raw.compression.level, "compression.level", lo..=hi, def)? as i32;
        let block_kib = int_in(&ctx, &raw.compression.block_size_kib, "compression.block_size_kib", 64..=65536, 4096)?;
        let compression = Compression { algorithm, level, block_size: block_kib as usize * 1024 };

        let o = &raw.ownership;
        let ownership = Ownership {
            uid: int_in(&ctx, &o.uid, "ownership.uid", 0..=i64::from(u32::MAX), 0)? as u64,
            gid: int_in(&ctx, &o.gid, "ownership.gid", 0..=i64::from(u32::MAX), 0)? as u64,
            file_mode: parse_mode(&ctx, &o.file_mode, "ownership.file_mode", 0o644)?,
            exec_mode: parse_mode(&ctx, &o.exec_mode, "ownership.exec_mode", 0o755)?,
            dir_mode: parse_mode(&ctx, &o.dir_mode, "ownership.dir_mode", 0o755)?,
            mtime: int_in(&ctx, &o.mtime, "ownership.mtime", 0..=8_589_934_591, 0)? as u64,
        };

        let mut tags = Vec::new();
        for t in &raw.image.tags {
            if !valid_tag(t.get_ref()) {
                return ctx.err(t.span(), "image.tags", format!("{:?} is not a valid tag", t.get_ref()));
            }
            tags.push(t.get_ref().clone());
        }
        let platform = match &raw.image.platform {
            None => ("linux".to_string(), "amd64".to_string()),
            Some(p) => match p.get_ref().split_once('/') {
                Some((os, arch)) if !os.is_empty() && !arch.is_empty() && !arch.contains('/') => {
                    (os.to_string(), arch.to_string())
                }
                _ => return ctx.err(p.span(), "image.platform", "expected \"os/arch\", e.g. \"linux/amd64\""),
            },
        };

        let spec = Spec {
            path: path.to_path_buf(),
            mount,
            base,
            shared,
            versions,
            exclude,
            splits,
            max_layers,
            compression,
            ownership,
            symlinks: o.symlinks.unwrap_or(SymlinkPolicy::Inside),
            tags,
            date_tag: raw.image.date_tag.unwrap_or(true),
            labels: raw.image.labels,
            annotations: raw.image.annotations,
            platform,
        };
        Ok(spec)
    }
}

/// Text for `mwbuild explain [FIELD]`.
pub fn explain(field: Option<&str>) -> Result<String, String> {
    let mut out = String::new();
    let matches: Vec<_> = match field {
        None => FIELDS.iter().collect(),
        Some(f) => FIELDS.iter().filter(|(k, _, _)| *k == f || k.starts_with(&format!("{f}."))).collect(),
    };
    if matches.is_empty() {
        let known: Vec<_> = FIELDS.iter().map(|(k, _, _)| *k).collect();
        return Err(format!("no field {:?}; fields are: {}", field.unwrap_or_default(), known.join(", ")));
    }
    for (k, ty, doc) in matches {
        out.push_str(&format!("{k}\n    type: {ty}\n    {doc}\n\n"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
mount = "/srv/mediawiki"
[base]
image = "oci:base:latest"
[[shared]]
name = "wmf-config"
source = "shared/wmf-config"
[[versions]]
name = "1.43.0-wmf.5"
source = "v5"
[layers]
exclude = [".git", "cache/l10n/upstream"]
split = [{ path = "vendor" }, { path = "cache/l10n", bins = 4 }]
[compression]
algorithm = "gzip"
[ownership]
file_mode = "0640"
"#;

    fn parse(text: &str) -> Result<Spec, SpecError> {
        Spec::parse(Path::new("/x/spec.toml"), text)
    }

    #[test]
    fn parses_and_resolves() -> Result<(), SpecError> {
        let s = parse(GOOD)?;
        assert_eq!(s.mount, "srv/mediawiki");
        assert_eq!(s.versions[0].dest, "srv/mediawiki/php-1.43.0-wmf.5");
        assert_eq!(s.versions[0].source, PathBuf::from("/x/v5"));
        assert_eq!(s.shared[0].dest, "srv/mediawiki/wmf-config");
        assert_eq!(
            s.base,
            BaseImage::Image(
                "oci:/x/base:latest".parse().map_err(|_| SpecError::Parse { path: "".into(), message: "".into() })?
            )
        );
        assert_eq!(s.compression, Compression { algorithm: Algorithm::Gzip, level: 6, block_size: 4 << 20 });
        assert_eq!(s.ownership.file_mode, 0o640);
        assert_eq!(s.splits[1].bins, 4);
        Ok(())
    }

    fn err_of(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn errors_name_key_and_line() {
        let e = err_of(&GOOD.replace("[compression]", "[compression]\nlevle = 3"));
        assert!(e.contains("levle") && e.contains("line 15"), "{e}");
        let e = err_of(&GOOD.replace("\"gzip\"", "\"lz4\""));
        assert!(e.contains("lz4") && e.contains("line 15"), "{e}");
        let e = err_of(&GOOD.replace("bins = 4", "bins = 0"));
        assert!(e.contains("layers.split.bins") && e.contains("line 13"), "{e}");
        let e = err_of(&GOOD.replace("\"0640\"", "\"4755\""));
        assert!(e.contains("ownership.file_mode") && e.contains("line 17"), "{e}");
        let e = err_of(&GOOD.replace("oci:base:latest", "docker://registry.example.org/base:latest"));
        assert!(e.contains("pinned by digest") && e.contains("line 4"), "{e}");
        let d = oci_core::Digest::of(b"x");
        let e = err_of(&GOOD.replace("oci:base:latest", &format!("docker://evil.example.org/base@{d}")));
        assert!(e.contains("allowed_registries"), "{e}");
        let ok = GOOD
            .replace("oci:base:latest", &format!("docker://good.example.org/base@{d}"))
            .replace("[base]", "[base]\nallowed_registries = [\"good.example.org/\"]");
        assert!(parse(&ok).is_ok());
        let e = err_of(&GOOD.replace("name = \"1.43.0-wmf.5\"", "name = \"../x\""));
        assert!(e.contains("versions.name"), "{e}");
        let e = err_of(
            &GOOD.replace("source = \"v5\"", "source = \"v5\"\n[[versions]]\nname = \"1.43.0-wmf.5\"\nsource = \"v6\""),
        );
        assert!(e.contains("listed twice"), "{e}");
        let e = err_of(&GOOD.replace("\"cache/l10n/upstream\"", "\"../up\""));
        assert!(e.contains("layers.exclude"), "{e}");
    }

    #[test]
    fn explain_covers_every_raw_key() {
        for k in [
            "mount",
            "base.image",
            "layers.split.bins",
            "compression.block_size_kib",
            "ownership.symlinks",
            "image.platform",
        ] {
            assert!(explain(Some(k)).is_ok(), "{k}");
        }
        assert!(explain(Some("nope")).is_err());
        assert!(explain(Some("ownership")).unwrap_or_default().contains("ownership.uid"));
    }
}
