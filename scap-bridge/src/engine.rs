//! The whole run of `prep` and `unpack` (one engine): lock, resolve, index, view, plan,
//! build, swap, record.
//!
//! Layer indexes come from our cache (layers we verified before), else from the builder's
//! table of contents (planning only: such a layer is then read, and every entry checked
//! against the TOC, before the swap), else from reading the layer once up front. A layer
//! is read during the build when content is needed from it or it has not been verified
//! yet; layers we verified before and need nothing from are not read at all. A re-run on
//! an unchanged tree with the same image and options stops after one `statx` per entry
//! (see [`crate::recheck`]).

use crate::apply::Builder;
use crate::blob::Limits;
use crate::error::{Error, Result};
use crate::fsutil::{self, FsKind, Time};
use crate::image::{LayerRef, ResolvedImage};
use crate::index::{self, LayerIndex};
use crate::layer::{open_layer, read_opened, Job, NoExtract};
use crate::lock::Lock;
use crate::path::PathKey;
use crate::plan::{self, in_scap_region, Counts, Modes};
use crate::provenance::{self, PROVENANCE_FILE};
use crate::recheck;
use crate::source::Source;
use crate::state::{Recorded, StateDir, TreeState};
use crate::view::{ContentRef, Node, NodeKind, SymlinkPolicy, View, ViewBuilder};
use oci_core::reference::ImageRef;
use oci_core::registry::ClientOptions;
use sha2::Digest as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What every command needs to read an image.
#[derive(Debug, Clone)]
pub struct ImageOptions {
    pub image: ImageRef,
    pub platform: String,
    pub registry: ClientOptions,
    pub state_dir: PathBuf,
    pub limits: Limits,
    /// Most uncompressed bytes read over all layers of one run.
    pub max_total_bytes: u64,
    pub symlinks: SymlinkPolicy,
    /// The subtree of the image to take, normalised (`""` for all of it).
    pub subpath: String,
}

/// `prep` and `unpack`.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    pub image: ImageOptions,
    /// The directory to make equal to the subtree.
    pub target: PathBuf,
    pub modes: Modes,
    /// Carry scap's regions over from the live tree and ignore the image's.
    pub scap_regions: bool,
    /// Write the provenance file (prep): the version name.
    pub provenance: Option<String>,
    pub scap_lock: Option<PathBuf>,
    pub lock_wait: Duration,
    pub changed_list: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    pub target: PathBuf,
    pub image: String,
    pub manifest_digest: String,
    #[serde(flatten)]
    pub counts: Counts,
    pub bytes_written: u64,
    pub files_written: u64,
    pub layers: usize,
    pub layers_read: usize,
    pub nothing_to_do: bool,
    pub seconds: f64,
}

/// Indexes of every layer, and which are verified.
pub(crate) struct Indexed {
    pub indexes: Vec<LayerIndex>,
    /// `false` for layers known only from a TOC.
    pub verified: Vec<bool>,
    pub layers_read: usize,
    pub bytes_read: u64,
}

/// Split a target path into its parent directory and its (UTF-8) name.
fn split_target(target: &Path) -> Result<(PathBuf, String)> {
    let abs = std::path::absolute(target).map_err(Error::io(target, "cannot make absolute"))?;
    let name = abs.file_name().and_then(|n| n.to_str()).filter(|n| !n.is_empty() && *n != ".." && *n != ".");
    match (abs.parent(), name) {
        (Some(p), Some(n)) => Ok((p.to_path_buf(), n.to_string())),
        _ => Err(Error::Usage(format!("{} cannot be a target directory", target.display()))),
    }
}

/// Get an index for every layer, reading (and verifying) the layers that have neither a
/// cached index nor, when `use_tocs`, a table of contents.
pub(crate) fn index_layers(
    src: &Source,
    img: &ResolvedImage,
    o: &ImageOptions,
    state: &StateDir,
    use_tocs: bool,
) -> Result<Indexed> {
    let mut out = Indexed { indexes: Vec::new(), verified: Vec::new(), layers_read: 0, bytes_read: 0 };
    for (i, l) in img.layers.iter().enumerate() {
        if let Some(idx) = state.load_layer(&l.digest).filter(|x| x.diff_id == l.diff_id) {
            out.indexes.push(idx);
            out.verified.push(true);
            continue;
        }
        if use_tocs {
            if let Some((d, size)) = &l.toc {
                let bytes = src.toc(d, *size)?;
                let toc = index::from_toc(&bytes, &l.diff_id).map_err(|what| Error::Layer {
                    layer: i,
                    digest: l.digest.clone(),
                    what,
                })?;
                if let Some(idx) = toc {
                    out.indexes.push(idx);
                    out.verified.push(false);
                    continue;
                }
            }
        }
        let (idx, n) = read_one(src, i, l, None, o, out.bytes_read, &mut NoExtract)?;
        state.save_layer(&l.digest, &idx)?;
        out.bytes_read += n;
        out.layers_read += 1;
        out.indexes.push(idx);
        out.verified.push(true);
    }
    Ok(out)
}

/// Read layer `i`, within what is left of the run's byte budget.
fn read_one(
    src: &Source,
    i: usize,
    l: &LayerRef,
    expected: Option<&LayerIndex>,
    o: &ImageOptions,
    spent: u64,
    extract: &mut dyn crate::layer::Extract,
) -> Result<(LayerIndex, u64)> {
    let (idx, v) = start_layer(src, i, l, o, spent, crate::blob::CHANNEL_DEPTH)?.read(l, expected, extract)?;
    tracing::debug!("layer {i} ({}) verified: {} → {} bytes", l.digest, v.compressed, v.uncompressed);
    Ok((idx, v.uncompressed))
}

/// Chunks (256 KiB) the first layer to read may decompress ahead while the skeleton of
/// the new tree is made.
const FIRST_AHEAD: usize = 128;

/// A layer whose decompression was started ahead of its turn.
struct Ahead {
    number: usize,
    blob: crate::source::LocalBlob,
    stream: crate::blob::LayerStream,
    limits: Limits,
}

/// Start decompressing layer `i`, within what is left of the run's byte budget.
fn start_layer(src: &Source, i: usize, l: &LayerRef, o: &ImageOptions, spent: u64, depth: usize) -> Result<Ahead> {
    let blob = src.layer_blob(l)?;
    let mut limits = o.limits;
    limits.max_layer_bytes = limits.max_layer_bytes.min(o.max_total_bytes.saturating_sub(spent));
    let job = Job { number: i, layer: l, blob: &blob.path, expected: None };
    let stream = open_layer(&job, &limits, depth)?;
    Ok(Ahead { number: i, blob, stream, limits })
}

impl Ahead {
    /// Read, verify and index the layer (`l`, the one it was started for).
    fn read(
        self,
        l: &LayerRef,
        expected: Option<&LayerIndex>,
        extract: &mut dyn crate::layer::Extract,
    ) -> Result<(LayerIndex, crate::blob::Verified)> {
        let job = Job { number: self.number, layer: l, blob: &self.blob.path, expected };
        read_opened(&job, self.stream, &self.limits, extract)
    }
}

/// The final view of `o.subpath`.
pub(crate) fn build_view(img: &ResolvedImage, idx: &Indexed, o: &ImageOptions) -> Result<View> {
    let mut vb = ViewBuilder::new(&o.subpath);
    for (i, (l, x)) in img.layers.iter().zip(&idx.indexes).enumerate() {
        vb.apply(i, &l.digest, x)?;
    }
    vb.finish(o.symlinks)
}

fn fingerprint(o: &ApplyOptions) -> String {
    format!(
        "ref={} sub={} modes={:?}/{:o} regions={} symlinks={:?} prov={:?}",
        o.image.image, o.image.subpath, o.modes.policy, o.modes.umask, o.scap_regions, o.image.symlinks, o.provenance
    )
}

/// Make `o.target` equal to the image's subtree; see the module docs.
pub fn apply(o: &ApplyOptions) -> Result<Summary> {
    let t0 = Instant::now();
    let (parent_path, name) = split_target(&o.target)?;
    let target = parent_path.join(&name);
    let _scap_lock = o.scap_lock.as_deref().map(|p| Lock::acquire(p, o.lock_wait)).transpose()?;
    let state = StateDir::new(&o.image.state_dir);
    let _own_lock = Lock::acquire(&state.lock_path(&target), o.lock_wait)?;
    let src = Source::open(&o.image.image, &o.image.registry, &state.spool_dir().join(StateDir::key(&target)))?;
    src.clean_spool();
    let img = src.resolve(&o.image.platform)?;
    tracing::debug!("{:?}: resolved {}", t0.elapsed(), img.manifest_digest);
    let mut summary = Summary {
        target: target.clone(),
        image: img.reference.clone(),
        manifest_digest: img.manifest_digest.to_string(),
        layers: img.layers.len(),
        ..Summary::default()
    };

    let parent = fsutil::open_dir_path(&parent_path).map_err(Error::io(&parent_path, "cannot open"))?;
    let live_root = match fsutil::stat_at(&parent, &name).map_err(Error::io(&target, "cannot stat"))? {
        None => None,
        Some(s) if s.kind == FsKind::Dir => {
            Some(fsutil::open_dir_beneath(&parent, &name).map_err(Error::io(&target, "cannot open"))?)
        }
        Some(_) => return Err(Error::Usage(format!("{} exists and is not a directory", target.display()))),
    };
    let recorded = state.load_tree(&target);
    tracing::debug!("{:?}: loaded the state", t0.elapsed());
    let fp = fingerprint(o);
    if let (Some(ts), Some(root)) = (&recorded, &live_root) {
        let regions = o.scap_regions;
        if ts.manifest == summary.manifest_digest
            && ts.fingerprint == fp
            && recheck::unchanged(root, ts, &|p| regions && in_scap_region(p))
        {
            tracing::debug!("{:?}: the live tree is as recorded", t0.elapsed());
            summary.counts.unchanged = ts.entries.iter().filter(|(_, r)| r.stat.kind != FsKind::Dir).count() as u64;
            summary.nothing_to_do = true;
            summary.seconds = t0.elapsed().as_secs_f64();
            write_changed_list(o, &name, &[])?;
            return Ok(summary);
        }
    }
    let live = match &live_root {
        Some(fd) => Some(fsutil::scan_tree(fd, &|_| false).map_err(Error::io(&target, "cannot read the live tree"))?),
        None => None,
    };
    tracing::debug!("{:?}: scanned the live tree", t0.elapsed());

    let mut indexed = index_layers(&src, &img, &o.image, &state, true)?;
    tracing::debug!("{:?}: indexed {} layers", t0.elapsed(), indexed.indexes.len());
    let mut view = build_view(&img, &indexed, &o.image)?;
    tracing::debug!("{:?}: built the view", t0.elapsed());
    // Only the indexes still to be checked against their layers (TOCs) are needed now.
    for (x, verified) in indexed.indexes.iter_mut().zip(&indexed.verified) {
        if *verified {
            x.entries = Vec::new();
        }
    }
    let prov_bytes = match &o.provenance {
        Some(version) => {
            let bytes = provenance::render(&img, version, &o.image.subpath);
            let sha: [u8; 32] = sha2::Sha256::digest(&bytes).into();
            let src_ref = ContentRef { layer: ContentRef::INLINE, seq: 0 };
            let node = Node {
                kind: NodeKind::File { size: bytes.len() as u64, sha256: sha, src: src_ref },
                mode: 0o644,
                layer: 0,
            };
            view.nodes.insert(PathKey::new(PROVENANCE_FILE), node);
            Some(bytes)
        }
        None => None,
    };
    let now = Time::now();
    let plan = plan::plan(&plan::Inputs {
        view: &view,
        live: match (&live_root, &live) {
            (Some(fd), Some(m)) => Some((fd, m)),
            _ => None,
        },
        state: recorded.as_ref(),
        modes: o.modes,
        regions: o.scap_regions,
        now,
        target: &target,
    })?;
    drop(live);
    tracing::debug!("{:?}: planned {:?}", t0.elapsed(), plan.counts);
    summary.counts = plan.counts;

    // The layers to read: those with content to write, and those known only from a TOC.
    let wanted: std::collections::BTreeSet<usize> = plan
        .actions
        .values()
        .filter_map(|a| match a {
            plan::Action::Write { src, .. } if src.layer != ContentRef::INLINE => Some(src.layer as usize),
            _ => None,
        })
        .collect();
    let order: Vec<usize> = (0..img.layers.len()).filter(|i| !indexed.verified[*i] || wanted.contains(i)).collect();
    let mut b = Builder::start(&parent, &parent_path, &name, live_root.as_ref())?;
    let built = (|| -> Result<(usize, Vec<(usize, LayerIndex)>)> {
        // The first layer decompresses while the skeleton is made.
        let mut spent = indexed.bytes_read;
        let mut ahead = match order.first() {
            Some(&i) => Some(start_layer(&src, i, &img.layers[i], &o.image, spent, FIRST_AHEAD)?),
            None => None,
        };
        b.skeleton(&plan)?;
        tracing::debug!("{:?}: built the skeleton", t0.elapsed());
        let mut read = Vec::new();
        for k in 0..order.len() {
            let Some(cur) = ahead.take() else { break };
            // The next layer decompresses while this one is parsed and written.
            if let Some(&j) = order.get(k + 1) {
                ahead = Some(start_layer(&src, j, &img.layers[j], &o.image, spent, crate::blob::CHANNEL_DEPTH)?);
            }
            let i = cur.number;
            let l = &img.layers[i];
            let li = u32::try_from(i).unwrap_or(u32::MAX);
            let expected = (!indexed.verified[i]).then(|| &indexed.indexes[i]);
            let (idx, v) = cur.read(l, expected, b.for_layer(li))?;
            spent += v.uncompressed;
            if spent > o.image.max_total_bytes {
                return Err(Error::Layer {
                    layer: i,
                    digest: l.digest.clone(),
                    what: format!(
                        "the layers expand to more than {} bytes in all (see --max-total-bytes)",
                        o.image.max_total_bytes
                    ),
                });
            }
            tracing::debug!("{:?}: read layer {i} ({} → {} bytes)", t0.elapsed(), v.compressed, v.uncompressed);
            read.push((i, idx));
        }
        if let Some(bytes) = &prov_bytes {
            b.write_inline(0, bytes)?;
        }
        b.finish_writes()?;
        b.check_complete()?;
        b.finish_dirs(&plan)?;
        Ok((read.len(), read))
    })();
    let (n_read, read) = match built {
        Ok(r) => r,
        Err(e) => {
            b.abandon();
            return Err(e);
        }
    };
    summary.bytes_written = b.bytes_written;
    summary.files_written = b.files_written;
    tracing::debug!("{:?}: finished the new tree", t0.elapsed());
    b.swap(live_root.is_some())?;
    drop(live_root);
    tracing::debug!("{:?}: swapped, old tree removed", t0.elapsed());
    for (i, idx) in &read {
        state.save_layer(&img.layers[*i].digest, idx)?;
    }
    summary.layers_read = indexed.layers_read + n_read;
    tracing::debug!("{:?}: saved the layer indexes", t0.elapsed());

    // The tree is in place: failing to record it only costs time on the next run.
    if let Err(e) = record(&state, &parent, &target, &name, &view, o, &summary.manifest_digest, &fp) {
        tracing::warn!("cannot record what was written ({e}); the next run will hash the tree");
        let _ = state.forget_tree(&target);
    }
    tracing::debug!("{:?}: recorded the state", t0.elapsed());
    write_changed_list(o, &name, &plan.changed_paths)?;
    let keep: Vec<_> = img.layers.iter().map(|l| l.digest.clone()).collect();
    state.prune_layers(&keep, 30);
    summary.seconds = t0.elapsed().as_secs_f64();
    Ok(summary)
}

/// Record what the tree now holds (after the swap and the old tree's removal, so that the
/// ctimes are final).
#[allow(clippy::too_many_arguments)]
fn record(
    state: &StateDir,
    parent: &rustix::fd::OwnedFd,
    target: &Path,
    name: &str,
    view: &View,
    o: &ApplyOptions,
    manifest: &str,
    fp: &str,
) -> Result<()> {
    let root = fsutil::open_dir_beneath(parent, name).map_err(Error::io(target, "cannot open"))?;
    let regions = o.scap_regions;
    let scanned =
        fsutil::scan_tree(&root, &|p| regions && in_scap_region(p)).map_err(Error::io(target, "cannot read"))?;
    let mut ts = TreeState { manifest: manifest.to_string(), fingerprint: fp.to_string(), entries: Vec::new() };
    // In walk order, as the record must be.
    for (k, e) in scanned {
        if regions && in_scap_region(k.as_str()) {
            continue;
        }
        let sha256 = match view.nodes.get(&k) {
            Some(Node { kind: NodeKind::File { sha256, .. }, .. }) if e.stat.kind == FsKind::File => Some(*sha256),
            _ => None,
        };
        ts.entries.push((k, Recorded { stat: e.stat, sha256 }));
    }
    state.save_tree(target, &ts)
}

fn write_changed_list(o: &ApplyOptions, name: &str, paths: &[String]) -> Result<()> {
    let Some(list) = &o.changed_list else { return Ok(()) };
    let mut s = String::new();
    for p in paths {
        s.push_str(&crate::path::join(name, p));
        s.push('\n');
    }
    std::fs::write(list, s).map_err(Error::io(list, "cannot write the changed list"))
}
