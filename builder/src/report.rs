//! The build report: JSON in the shape scap reads (`mediawiki.flavours.<f>.kinds.image`)
//! plus per-layer figures, and the human summary table.

use crate::publish::PushStats;
use oci_core::digest::Digest;
use serde::Serialize;
use serde_json::json;

#[derive(Debug, Clone, Serialize)]
pub struct ImageReport {
    pub flavour: String,
    pub image_name: String,
    pub reference: String,
    pub digest: Digest,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub slot: String,
    pub component: String,
    pub version: Option<String>,
    pub digest: Digest,
    pub size: u64,
    pub files: usize,
    pub rebuilt: bool,
    pub bytes_read: u64,
    pub bytes_compressed: u64,
    pub bytes_pushed: u64,
    pub bytes_skipped: u64,
    pub bytes_mounted: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Durations {
    pub walk: f64,
    pub layers: f64,
    pub publish: f64,
    pub total: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub images: Vec<ImageReport>,
    pub layers: Vec<LayerReport>,
    pub base_layers: usize,
    pub totals: PushStats,
    pub totals_read: u64,
    pub totals_compressed: u64,
    pub durations: Durations,
}

impl Report {
    pub fn to_json(&self) -> serde_json::Value {
        let mut flavours = serde_json::Map::new();
        for i in &self.images {
            flavours.insert(
                i.flavour.clone(),
                json!({ "kinds": { "image": { "image_name": i.image_name, "digest": i.digest.to_string(), "tags": i.tags, "reference": i.reference } } }),
            );
        }
        json!({
            "mediawiki": { "flavours": flavours },
            "build": {
                "layers": self.layers,
                "base_layers": self.base_layers,
                "layers_rebuilt": self.layers.iter().filter(|l| l.rebuilt).count(),
                "layers_reused": self.layers.iter().filter(|l| !l.rebuilt).count(),
                "bytes_read": self.totals_read,
                "bytes_compressed": self.totals_compressed,
                "bytes_pushed": self.totals.pushed,
                "bytes_skipped": self.totals.skipped,
                "bytes_mounted": self.totals.mounted,
                "durations": self.durations,
            }
        })
    }

    /// The table printed at the end of a build.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "{:<44} {:>7} {:>10} {:>10} {:>10} {:>8}  {}\n",
            "LAYER", "FILES", "SIZE", "READ", "PUSHED", "SECS", "STATE"
        ));
        for l in &self.layers {
            s.push_str(&format!(
                "{:<44} {:>7} {:>10} {:>10} {:>10} {:>8.2}  {}\n",
                l.slot,
                l.files,
                human(l.size),
                human(l.bytes_read),
                human(l.bytes_pushed),
                l.seconds,
                if l.rebuilt { "rebuilt" } else { "reused" }
            ));
        }
        let rebuilt = self.layers.iter().filter(|l| l.rebuilt).count();
        s.push_str(&format!(
            "\n{} layers ({} rebuilt, {} reused) + {} base; read {}, compressed {}, pushed {}, skipped {}, mounted {}; {:.2}s (walk {:.2}s, layers {:.2}s, publish {:.2}s)\n",
            self.layers.len(),
            rebuilt,
            self.layers.len() - rebuilt,
            self.base_layers,
            human(self.totals_read),
            human(self.totals_compressed),
            human(self.totals.pushed),
            human(self.totals.skipped),
            human(self.totals.mounted),
            self.durations.total,
            self.durations.walk,
            self.durations.layers,
            self.durations.publish
        ));
        for i in &self.images {
            s.push_str(&format!("{:<14} {}  {}\n", i.flavour, i.digest, i.tags.join(", ")));
        }
        s
    }
}

pub fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}
