//! `mwbuild build`: walk the trees, plan layers, build or reuse each layer, then publish
//! every blob, then every manifest, then the tags — so a failure never leaves a tag
//! pointing at something incomplete.

use crate::cache::{BlobStat, Cache, CacheError};
use crate::compress::Engine;
use crate::image::{self, LayerDesc};
use crate::layer::{params_digest, LayerBuilder, LayerError, LayerOutcome};
use crate::plan::{check_layer_count, plan_shared, plan_version, LayerPlan};
use crate::publish::{BlobSource, Publisher, PushStats};
use crate::report::{ImageReport, LayerReport, Report};
use crate::spec::{BaseImage, Spec};
use crate::walk::{walk_with, Excludes, WalkError};
use oci_core::digest::Digest;
use oci_core::media;
use oci_core::reference::{ImageRef, Reference};
use oci_core::registry::ClientOptions;
use oci_core::store::{Store, StoreError};
use rayon::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Walk(#[from] WalkError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error("build cache")]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Plan(String),
    #[error("base image {image}: {what}")]
    Base { image: String, what: String },
    #[error("internal task failed: {0}")]
    Task(String),
}

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub output: ImageRef,
    pub cache_dir: PathBuf,
    pub jobs: usize,
    pub registry: ClientOptions,
    pub progress: bool,
    /// Tag time (UTC) for the date tag; `None` means now.
    pub now: Option<time::OffsetDateTime>,
}

/// The base image as the builder needs it.
pub struct Base {
    pub layers: Vec<LayerDesc>,
    pub config: Value,
    pub store: Option<Store>,
    /// `ref@digest` for the provenance label; empty for scratch.
    pub provenance: String,
}

pub async fn load_base(
    spec_base: &BaseImage,
    platform: &(String, String),
    opts: &ClientOptions,
) -> Result<Base, BuildError> {
    let r = match spec_base {
        BaseImage::Scratch => {
            return Ok(Base {
                layers: Vec::new(),
                config: image::scratch_config(platform),
                store: None,
                provenance: String::new(),
            })
        }
        BaseImage::Image(r) => r,
    };
    let store = Store::open(r, opts, false)?;
    let img = store.load_image(r.reference(), (&platform.0, &platform.1)).await?;
    let config: Value = serde_json::from_slice(&img.config_bytes)
        .map_err(|e| BuildError::Base { image: r.to_string(), what: format!("config: {e}") })?;
    let mut layers = Vec::new();
    for (i, l) in img.manifest.layers().iter().enumerate() {
        let mt = l.media_type().to_string();
        let Some(oci_mt) = image::oci_layer_media_type(&mt) else {
            return Err(BuildError::Base { image: r.to_string(), what: format!("layer {i} has media type {mt:?}, which cannot be redistributed; use a base image with ordinary tar layers") });
        };
        let digest =
            Digest::from_oci(l.digest()).map_err(|e| BuildError::Base { image: r.to_string(), what: e.to_string() })?;
        let diff_id: Digest = img.config.rootfs().diff_ids()[i]
            .parse()
            .map_err(|e: oci_core::DigestError| BuildError::Base { image: r.to_string(), what: e.to_string() })?;
        layers.push(LayerDesc {
            media_type: oci_mt.to_string(),
            digest,
            size: l.size(),
            diff_id,
            annotations: BTreeMap::new(),
        });
    }
    let provenance = format!("{}@{}", r.with_reference(None), img.manifest_digest);
    Ok(Base { layers, config, store: Some(store), provenance })
}

fn build_layers(
    spec: &Spec,
    plans: &[LayerPlan],
    opts: &BuildOptions,
    progress: &indicatif::ProgressBar,
) -> Result<Vec<LayerOutcome>, BuildError> {
    let cache = Cache::open(&opts.cache_dir)?;
    let engine = Engine::new(opts.jobs, spec.compression.clone()).map_err(|e| BuildError::Task(e.to_string()))?;
    let builder = LayerBuilder {
        cache: &cache,
        engine,
        ownership: &spec.ownership,
        params: params_digest(&spec.compression, &spec.ownership),
    };
    // Largest layers first so the pool stays busy; results kept in plan order.
    let mut order: Vec<usize> = (0..plans.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(plans[i].file_bytes()));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<LayerOutcome, LayerError>>>> =
        Mutex::new((0..plans.len()).map(|_| None).collect());
    let failed = std::sync::atomic::AtomicBool::new(false);
    let producers = (2 * opts.jobs).clamp(1, 8).min(plans.len().max(1));
    std::thread::scope(|s| {
        for _ in 0..producers {
            s.spawn(|| loop {
                if failed.load(Ordering::Relaxed) {
                    break;
                }
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&i) = order.get(k) else { break };
                let r = builder.build(&plans[i]);
                if r.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                progress.inc(plans[i].file_bytes());
                if let Ok(mut g) = results.lock() {
                    g[i] = Some(r);
                }
            });
        }
    });
    let results = results.into_inner().map_err(|_| BuildError::Task("layer results poisoned".into()))?;
    let mut out = Vec::with_capacity(plans.len());
    for r in results.into_iter().flatten() {
        out.push(r?);
    }
    if out.len() != plans.len() {
        return Err(BuildError::Task("a layer build did not finish".into()));
    }
    Ok(out)
}

fn layer_desc(plan: &LayerPlan, o: &LayerOutcome) -> LayerDesc {
    let mut annotations = BTreeMap::new();
    annotations.insert(media::ANNOTATION_COMPONENT.to_string(), plan.component.clone());
    if let Some(v) = &plan.version {
        annotations.insert(media::ANNOTATION_VERSION.to_string(), v.clone());
    }
    annotations.insert(media::ANNOTATION_TOC_DIGEST.to_string(), o.record.toc_digest.to_string());
    annotations.insert(media::ANNOTATION_TOC_SIZE.to_string(), o.record.toc_size.to_string());
    LayerDesc {
        media_type: o.record.media_type.clone(),
        digest: o.record.digest.clone(),
        size: o.record.size,
        diff_id: o.record.diff_id.clone(),
        annotations,
    }
}

fn progress_bar(enabled: bool, total: u64) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} {msg:12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

pub async fn build(spec: &Spec, opts: &BuildOptions) -> Result<Report, BuildError> {
    let t0 = Instant::now();
    // Held for the whole build, so that `mwbuild prune` never removes what it publishes.
    let _cache_lock = Cache::open(&opts.cache_dir)?.lock_shared()?;
    let base = load_base(&spec.base, &spec.platform, &opts.registry).await?;
    let out = Store::open(&opts.output, &opts.registry, true)?;

    // Walk every tree (in parallel) and plan the layers.
    let t_walk = Instant::now();
    let spec2 = spec.clone();
    let cache_dir = opts.cache_dir.clone();
    let (shared_plans, version_plans) = tokio::task::spawn_blocking(move || -> Result<_, BuildError> {
        let cache = Cache::open(&cache_dir)?;
        let ex = Excludes::new(&spec2.exclude);
        // Walk a tree, reusing the listings of its last walk; keep the new ones.
        let walk_tree = |root: &std::path::Path| -> Result<Vec<crate::walk::Entry>, BuildError> {
            let prev = cache.load_walk(root, &spec2.exclude);
            let (entries, next) = walk_with(root, &ex, spec2.symlinks, prev.as_ref())?;
            if let Some(next) = next {
                cache.save_walk(root, &spec2.exclude, &next)?;
            }
            Ok(entries)
        };
        let shared: Result<Vec<LayerPlan>, BuildError> =
            spec2.shared.par_iter().map(|t| Ok(plan_shared(t, walk_tree(&t.source)?))).collect();
        let versions: Result<Vec<Vec<LayerPlan>>, BuildError> =
            spec2.versions.par_iter().map(|t| Ok(plan_version(t, walk_tree(&t.source)?, &spec2.splits))).collect();
        Ok((shared?, versions?))
    })
    .await
    .map_err(|e| BuildError::Task(e.to_string()))??;
    let per_version: Vec<(String, usize)> =
        spec.versions.iter().zip(&version_plans).map(|(v, p)| (v.name.clone(), p.len())).collect();
    check_layer_count(spec, base.layers.len(), shared_plans.len(), &per_version).map_err(BuildError::Plan)?;
    let walk_secs = t_walk.elapsed().as_secs_f64();

    // Build or reuse every layer.
    let t_layers = Instant::now();
    let n_shared = shared_plans.len();
    let version_lens: Vec<usize> = version_plans.iter().map(Vec::len).collect();
    let all_plans: Arc<Vec<LayerPlan>> =
        Arc::new(shared_plans.into_iter().chain(version_plans.into_iter().flatten()).collect());
    let total_bytes: u64 = all_plans.iter().map(LayerPlan::file_bytes).sum();
    let pb = progress_bar(opts.progress, total_bytes);
    pb.set_message("layers");
    let (spec3, opts3, plans3, pb3) = (spec.clone(), opts.clone(), Arc::clone(&all_plans), pb.clone());
    let outcomes = tokio::task::spawn_blocking(move || build_layers(&spec3, &plans3, &opts3, &pb3))
        .await
        .map_err(|e| BuildError::Task(e.to_string()))??;
    pb.finish_and_clear();
    let layers_secs = t_layers.elapsed().as_secs_f64();

    // Assemble images.
    let t_pub = Instant::now();
    let descs: Vec<LayerDesc> = all_plans.iter().zip(&outcomes).map(|(p, o)| layer_desc(p, o)).collect();
    let mut offsets = Vec::new();
    let mut at = n_shared;
    for n in &version_lens {
        offsets.push(at..at + n);
        at += n;
    }
    let created = image::created(spec);
    let mut images: Vec<(String, Vec<LayerDesc>, Vec<String>)> = Vec::new();
    for (i, v) in spec.versions.iter().enumerate() {
        let mut layers = base.layers.clone();
        layers.extend(descs[..n_shared].iter().cloned());
        layers.extend(descs[offsets[i].clone()].iter().cloned());
        images.push((v.name.clone(), layers, vec![v.name.clone()]));
    }
    let mut agg = base.layers.clone();
    agg.extend(descs.iter().cloned());
    let now = opts.now.unwrap_or_else(time::OffsetDateTime::now_utc);
    let mut agg_tags = vec!["multiversion".to_string()];
    if spec.date_tag {
        let fmt = time::macros::format_description!("[year]-[month]-[day]-[hour][minute][second]");
        agg_tags.push(format!("{}-multiversion", now.format(&fmt).map_err(|e| BuildError::Task(e.to_string()))?));
    }
    agg_tags.extend(spec.tags.iter().cloned());
    images.push(("multiversion".to_string(), agg, agg_tags));

    // Publish: blobs first (base, layers, tables of contents), then manifests, then tags.
    let cache = Cache::open(&opts.cache_dir)?;
    let publisher = Publisher::new(&out, &cache, base.store.iter().collect(), opts.progress);
    let mut blobs: Vec<BlobSource> = Vec::new();
    for l in &base.layers {
        blobs.push(BlobSource::Image { digest: l.digest.clone(), size: l.size, source: 0 });
    }
    for o in &outcomes {
        blobs.push(BlobSource::Cache { digest: o.record.digest.clone(), size: o.record.size });
        blobs.push(BlobSource::Cache { digest: o.record.toc_digest.clone(), size: o.record.toc_size });
    }
    let stats = publisher.push_blobs(blobs).await?;
    // Hard-linking a cache blob into a layout changes its ctime: re-record the stat of the
    // blobs verified in this run so the next run need not rehash them.
    for o in &outcomes {
        if let Ok(now) = BlobStat::of(&cache.blob_path(&o.record.digest)) {
            if now != o.record.blob_stat {
                let mut r = o.record.clone();
                r.blob_stat = now;
                cache.save_layer(&r)?;
            }
        }
    }

    let versions_label = spec.versions.iter().map(|v| v.name.clone()).collect::<Vec<_>>().join(",");
    let mut manifests = Vec::new();
    for (flavour, layers, tags) in &images {
        let mut extra = BTreeMap::new();
        extra.insert(
            image::LABEL_VERSIONS.to_string(),
            if flavour == "multiversion" { versions_label.clone() } else { flavour.clone() },
        );
        if !base.provenance.is_empty() {
            extra.insert(image::LABEL_BASE.to_string(), base.provenance.clone());
        }
        let cfg = image::derive_config(&base.config, &spec.labels, &extra, base.layers.len(), layers, &created);
        let cfg_bytes = image::to_bytes(&cfg);
        let (cfg_digest, cfg_size, _) = out.put_blob_bytes(&cfg_bytes).await?;
        let m = image::manifest(&cfg_digest, cfg_size, layers, &spec.annotations);
        manifests.push((flavour.clone(), image::to_bytes(&m), layers.clone(), tags.clone()));
    }
    // A date tag marks when the aggregate's content became current: a build that makes
    // the aggregate the newest date tag already names keeps that tag instead of adding
    // one, so a no-op build leaves the output unchanged.
    if spec.date_tag {
        if let Some(agg) = manifests.iter_mut().find(|m| m.0 == "multiversion") {
            if let Some(existing) = newest_date_tag_of(&out, &Digest::of(&agg.1)).await {
                if let Some(t) = agg.3.iter_mut().find(|t| is_date_tag(t)) {
                    *t = existing;
                }
            }
        }
    }
    let published = publisher.publish_manifests(&manifests).await?;
    pb.finish_and_clear();
    let publish_secs = t_pub.elapsed().as_secs_f64();

    let mut report = Report::default();
    for (flavour, digest, tags) in &published {
        let tag = tags.first().cloned().unwrap_or_default();
        report.images.push(ImageReport {
            flavour: flavour.clone(),
            image_name: image_name(&opts.output, &tag),
            reference: opts.output.with_reference(Some(Reference::Tag(tag))).to_string(),
            digest: digest.clone(),
            tags: tags.clone(),
        });
    }
    for (p, o) in all_plans.iter().zip(&outcomes) {
        let push = stats.get(&o.record.digest).copied().unwrap_or_default();
        report.layers.push(LayerReport {
            slot: p.slot.clone(),
            component: p.component.clone(),
            version: p.version.clone(),
            digest: o.record.digest.clone(),
            size: o.record.size,
            files: p.entries.len(),
            rebuilt: o.rebuilt,
            bytes_read: o.bytes_read,
            bytes_compressed: o.bytes_compressed,
            bytes_pushed: push.pushed,
            bytes_skipped: push.skipped,
            bytes_mounted: push.mounted,
            seconds: o.duration.as_secs_f64(),
        });
    }
    report.base_layers = base.layers.len();
    report.durations.walk = walk_secs;
    report.durations.layers = layers_secs;
    report.durations.publish = publish_secs;
    report.durations.total = t0.elapsed().as_secs_f64();
    report.totals = PushStats::sum(stats.values());
    report.totals_read = outcomes.iter().map(|o| o.bytes_read).sum();
    report.totals_compressed = outcomes.iter().map(|o| o.bytes_compressed).sum();
    Ok(report)
}

/// `<YYYY-MM-DD-HHMMSS>-multiversion`.
fn is_date_tag(t: &str) -> bool {
    let b = t.as_bytes();
    t.len() == 30
        && t.ends_with("-multiversion")
        && b[..17]
            .iter()
            .enumerate()
            .all(|(i, c)| if [4, 7, 10].contains(&i) { *c == b'-' } else { c.is_ascii_digit() })
}

/// The newest date tag of `out`, if it names the manifest `digest`.
async fn newest_date_tag_of(out: &Store, digest: &Digest) -> Option<String> {
    let newest = out.tags().await.ok()?.into_iter().filter(|t| is_date_tag(t)).max()?;
    let m = out.get_manifest(Some(&Reference::Tag(newest.clone()))).await.ok()?;
    (m.digest == *digest).then_some(newest)
}

/// How scap names an image: `host/repo:tag` for registries, `oci:dir:tag` for layouts.
pub fn image_name(r: &ImageRef, tag: &str) -> String {
    match r {
        ImageRef::Registry { host, repo, .. } => format!("{host}/{repo}:{tag}"),
        ImageRef::Layout { .. } => r.with_tag(tag).to_string(),
    }
}
