//! `mwbuild inspect` and `mwbuild diff`: read manifests, configs and tables of contents
//! only — never a layer.

use crate::image::{LABEL_BASE_LAYERS, LABEL_VERSIONS};
use crate::layer::{parse_toc, TocEntry};
use crate::report::human;
use oci_core::digest::Digest;
use oci_core::media;
use oci_core::reference::{ImageRef, Reference};
use oci_core::registry::ClientOptions;
use oci_core::store::{Image, Store, StoreError};
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{image}: layer {digest} has no table of contents (annotation {key}); it was not built by mwbuild, so diff cannot compare it without downloading it")]
    NoToc { image: String, digest: Digest, key: &'static str },
    #[error("{image}: table of contents {digest} is invalid: {why}")]
    BadToc { image: String, digest: Digest, why: String },
}

const PLATFORM: (&str, &str) = ("linux", "amd64");

fn label<'a>(img: &'a Image, key: &str) -> Option<&'a String> {
    img.config.config().as_ref()?.labels().as_ref()?.get(key)
}

fn base_layer_count(img: &Image) -> usize {
    label(img, LABEL_BASE_LAYERS).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// The user-visible tags of a store (referrers tags excluded).
async fn user_tags(store: &Store) -> Result<Vec<String>, StoreError> {
    Ok(store.tags().await?.into_iter().filter(|t| !(t.starts_with("sha256-") && t.len() == 71)).collect())
}

pub async fn inspect(r: &ImageRef, opts: &ClientOptions) -> Result<String, InspectError> {
    let store = Store::open(r, opts, false)?;
    let img = store.load_image(r.reference(), PLATFORM).await?;
    let mut holders: HashMap<Digest, Vec<String>> = HashMap::new();
    let own_tag = match r.reference() {
        Some(Reference::Tag(t)) => Some(t.clone()),
        _ => None,
    };
    for t in user_tags(&store).await? {
        if Some(&t) == own_tag.as_ref() {
            continue;
        }
        let Ok(other) = store.load_image(Some(&Reference::Tag(t.clone())), PLATFORM).await else { continue };
        if other.manifest_digest == img.manifest_digest {
            continue;
        }
        for l in other.manifest.layers() {
            if let Ok(d) = Digest::from_oci(l.digest()) {
                holders.entry(d).or_default().push(t.clone());
            }
        }
    }
    let base_n = base_layer_count(&img);
    let total: u64 = img.manifest.layers().iter().map(|l| l.size()).sum();
    let mut s = format!(
        "{r}\n  manifest {}\n  versions {}\n  {} layers, {} compressed\n\n",
        img.manifest_digest,
        label(&img, LABEL_VERSIONS).cloned().unwrap_or_else(|| "-".into()),
        img.manifest.layers().len(),
        human(total)
    );
    s.push_str(&format!("{:>3}  {:<19} {:>10}  {:<34} {}\n", "#", "DIGEST", "SIZE", "COMPONENT", "SHARED WITH"));
    for (i, l) in img.manifest.layers().iter().enumerate() {
        let d = Digest::from_oci(l.digest())
            .map_err(|e| StoreError::Image { image: r.to_string(), what: e.to_string() })?;
        let ann = l.annotations().clone().unwrap_or_default();
        let comp = if i < base_n {
            "base".to_string()
        } else {
            let c = ann.get(media::ANNOTATION_COMPONENT).cloned().unwrap_or_else(|| "?".into());
            match ann.get(media::ANNOTATION_VERSION) {
                Some(v) => format!("{v}/{c}"),
                None => c,
            }
        };
        let mut shared = holders.get(&d).cloned().unwrap_or_default();
        shared.sort();
        shared.dedup();
        s.push_str(&format!(
            "{i:>3}  sha256:{} {:>10}  {:<34} {}\n",
            d.short(),
            human(l.size()),
            comp,
            if shared.is_empty() { "-".to_string() } else { shared.join(", ") }
        ));
    }
    Ok(s)
}

/// What changed between two images, per version directory.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Section name (e.g. `php-1.43.0-wmf.5`, `wmf-config`) -> changes.
    pub sections: BTreeMap<String, Changes>,
    pub base_changed: bool,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        !self.base_changed
            && self.sections.values().all(|c| c.added.is_empty() && c.removed.is_empty() && c.changed.is_empty())
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        if self.base_changed {
            s.push_str("base layers differ\n");
        }
        for (name, c) in &self.sections {
            if c.added.is_empty() && c.removed.is_empty() && c.changed.is_empty() {
                continue;
            }
            s.push_str(&format!(
                "{name}: {} added, {} removed, {} changed\n",
                c.added.len(),
                c.removed.len(),
                c.changed.len()
            ));
            for p in &c.added {
                s.push_str(&format!("  A {p}\n"));
            }
            for p in &c.removed {
                s.push_str(&format!("  D {p}\n"));
            }
            for p in &c.changed {
                s.push_str(&format!("  M {p}\n"));
            }
        }
        if s.is_empty() {
            s.push_str("no differences\n");
        }
        s
    }
}

async fn file_view(store: &Store, r: &ImageRef) -> Result<(Image, BTreeMap<String, TocEntry>), InspectError> {
    let img = store.load_image(r.reference(), PLATFORM).await?;
    let base_n = base_layer_count(&img);
    let mut view = BTreeMap::new();
    for (i, l) in img.manifest.layers().iter().enumerate().skip(base_n) {
        let d = Digest::from_oci(l.digest())
            .map_err(|e| StoreError::Image { image: r.to_string(), what: e.to_string() })?;
        let ann = l.annotations().clone().unwrap_or_default();
        let (Some(td), Some(ts)) = (ann.get(media::ANNOTATION_TOC_DIGEST), ann.get(media::ANNOTATION_TOC_SIZE)) else {
            return Err(InspectError::NoToc { image: r.to_string(), digest: d, key: media::ANNOTATION_TOC_DIGEST });
        };
        let bad = |why: String| InspectError::BadToc { image: r.to_string(), digest: d.clone(), why };
        let td: Digest = td.parse().map_err(|e: oci_core::DigestError| bad(e.to_string()))?;
        let ts: u64 = ts.parse().map_err(|_| bad(format!("layer {i}: size annotation {ts:?} is not a number")))?;
        let bytes = store.get_blob(&td, Some(ts)).await?;
        let toc = parse_toc(&bytes).map_err(|e| bad(e.to_string()))?;
        for e in toc.entries {
            view.insert(e.path.clone(), e);
        }
    }
    Ok((img, view))
}

/// Section of a path: the first component under the mount point (`php-<v>`, `wmf-config`).
fn section(path: &str) -> String {
    let comps: Vec<&str> = path.split('/').collect();
    comps
        .iter()
        .find(|c| c.starts_with("php-"))
        .map_or_else(|| if comps.len() >= 3 { comps[2].to_string() } else { path.to_string() }, |c| c.to_string())
}

pub async fn diff(a: &ImageRef, b: &ImageRef, opts: &ClientOptions) -> Result<Diff, InspectError> {
    let sa = Store::open(a, opts, false)?;
    let sb = Store::open(b, opts, false)?;
    let (ia, va) = file_view(&sa, a).await?;
    let (ib, mut vb) = file_view(&sb, b).await?;
    // Two single-version images of different versions: compare php-A with php-B.
    let mut renamed = None;
    if let (Some(x), Some(y)) = (label(&ia, LABEL_VERSIONS), label(&ib, LABEL_VERSIONS)) {
        if x != y && !x.contains(',') && !y.contains(',') {
            renamed = Some((format!("php-{x}"), format!("php-{x} -> php-{y}")));
            let (from, to) = (format!("/php-{y}/"), format!("/php-{x}/"));
            let (from_end, to_end) = (format!("/php-{y}"), format!("/php-{x}"));
            vb = vb
                .into_values()
                .map(|mut e| {
                    if e.path.ends_with(&from_end) {
                        e.path = format!("{}{to_end}", &e.path[..e.path.len() - from_end.len()]);
                    } else {
                        e.path = e.path.replacen(&from, &to, 1);
                    }
                    (e.path.clone(), e)
                })
                .collect();
        }
    }
    let base_a: Vec<_> = ia.manifest.layers().iter().take(base_layer_count(&ia)).map(|l| l.digest().clone()).collect();
    let base_b: Vec<_> = ib.manifest.layers().iter().take(base_layer_count(&ib)).map(|l| l.digest().clone()).collect();
    let mut d = Diff { base_changed: base_a != base_b, ..Diff::default() };
    for (p, ea) in &va {
        let sec = d.sections.entry(section(p)).or_default();
        match vb.get(p) {
            None => sec.removed.push(p.clone()),
            Some(eb) if eb != ea => sec.changed.push(p.clone()),
            Some(_) => {}
        }
    }
    for p in vb.keys() {
        if !va.contains_key(p) {
            d.sections.entry(section(p)).or_default().added.push(p.clone());
        }
    }
    if let Some((from, to)) = renamed {
        if let Some(c) = d.sections.remove(&from) {
            d.sections.insert(to, c);
        }
    }
    Ok(d)
}
