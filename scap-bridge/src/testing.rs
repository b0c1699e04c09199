//! Helpers for tests and benches: tar bytes written header by header (so that hostile
//! entries can be expressed exactly, whatever a tar library would refuse to write), and
//! OCI image layouts made of such layers with correct digests and DiffIDs — every field
//! public, so a test can falsify exactly one thing.

use oci_core::layout::Layout;
use oci_core::media;
use oci_core::Digest;
use oci_spec::image::{Descriptor, MediaType};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// A tar stream built block by block.
#[derive(Debug, Default, Clone)]
pub struct RawTar {
    pub buf: Vec<u8>,
}

fn octal(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    let s = format!("{v:0digits$o}");
    let s = &s.as_bytes()[s.len().saturating_sub(digits)..];
    field[..s.len()].copy_from_slice(s);
    field[digits] = 0;
}

impl RawTar {
    pub fn new() -> Self {
        Self::default()
    }

    /// One header block: `name` and `link` as raw bytes (truncated to 100), the type flag,
    /// mode and the size field as given; the checksum is computed.
    pub fn header(&mut self, name: &[u8], flag: u8, mode: u32, size: u64, link: &[u8]) -> &mut Self {
        let mut h = [0u8; 512];
        let n = name.len().min(100);
        h[..n].copy_from_slice(&name[..n]);
        octal(&mut h[100..108], u64::from(mode));
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], size);
        octal(&mut h[136..148], 0);
        h[156] = flag;
        let l = link.len().min(100);
        h[157..157 + l].copy_from_slice(&link[..l]);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        self.buf.extend_from_slice(&h);
        self
    }

    /// Content bytes, padded to the block size.
    pub fn data(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        let pad = (512 - bytes.len() % 512) % 512;
        self.buf.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    pub fn file(&mut self, name: &str, mode: u32, content: &[u8]) -> &mut Self {
        self.header(name.as_bytes(), b'0', mode, content.len() as u64, b"").data(content)
    }

    pub fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
        self.header(name.as_bytes(), b'5', mode, 0, b"")
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.header(name.as_bytes(), b'2', 0o777, 0, target.as_bytes())
    }

    pub fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.header(name.as_bytes(), b'1', 0o644, 0, target.as_bytes())
    }

    /// A PAX extended header for the next entry.
    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut body = Vec::new();
        for (k, v) in records {
            let rest = k.len() + v.len() + 3;
            let mut len = rest + 1;
            while len != rest + len.to_string().len() {
                len = rest + len.to_string().len();
            }
            body.extend_from_slice(format!("{len} {k}=").as_bytes());
            body.extend_from_slice(v);
            body.push(b'\n');
        }
        self.header(b"PaxHeaders/x", b'x', 0o644, body.len() as u64, b"").data(&body)
    }

    /// The end-of-archive marker; the bytes.
    pub fn finish(&mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&[0u8; 1024]);
        std::mem::take(&mut self.buf)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compress {
    None,
    Gzip,
    Zstd,
}

pub fn compress(tar: &[u8], c: Compress) -> Vec<u8> {
    match c {
        Compress::None => tar.to_vec(),
        Compress::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            let _ = e.write_all(tar);
            e.finish().unwrap_or_default()
        }
        Compress::Zstd => zstd::encode_all(tar, 1).unwrap_or_default(),
    }
}

/// One layer as the manifest and config will describe it.
#[derive(Debug, Clone)]
pub struct TestLayer {
    pub blob: Vec<u8>,
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    pub diff_id: Digest,
    pub annotations: BTreeMap<String, String>,
}

/// An image under construction; see the module docs.
#[derive(Debug, Clone)]
pub struct TestImage {
    pub layers: Vec<TestLayer>,
    pub labels: BTreeMap<String, String>,
    pub os: String,
    pub architecture: String,
    pub manifest_media_type: String,
    pub config_media_type: String,
    /// Extra blobs to store (e.g. tables of contents).
    pub extra_blobs: Vec<Vec<u8>>,
}

impl Default for TestImage {
    fn default() -> Self {
        TestImage {
            layers: Vec::new(),
            labels: BTreeMap::new(),
            os: "linux".into(),
            architecture: "amd64".into(),
            manifest_media_type: media::OCI_MANIFEST.into(),
            config_media_type: media::OCI_CONFIG.into(),
            extra_blobs: Vec::new(),
        }
    }
}

impl TestImage {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a layer made of `tar`, compressed with `c`, correctly described.
    pub fn layer(mut self, tar: &[u8], c: Compress) -> Self {
        let blob = compress(tar, c);
        let media_type = match c {
            Compress::None => media::OCI_LAYER_TAR,
            Compress::Gzip => media::OCI_LAYER_GZIP,
            Compress::Zstd => media::OCI_LAYER_ZSTD,
        };
        self.layers.push(TestLayer {
            digest: Digest::of(&blob),
            size: blob.len() as u64,
            diff_id: Digest::of(tar),
            blob,
            media_type: media_type.into(),
            annotations: BTreeMap::new(),
        });
        self
    }

    /// Attach a table of contents (its JSON text) to the last layer.
    pub fn toc(mut self, toc_json: &[u8]) -> Self {
        let d = Digest::of(toc_json);
        if let Some(l) = self.layers.last_mut() {
            l.annotations.insert(media::ANNOTATION_TOC_DIGEST.into(), d.to_string());
            l.annotations.insert(media::ANNOTATION_TOC_SIZE.into(), toc_json.len().to_string());
        }
        self.extra_blobs.push(toc_json.to_vec());
        self
    }

    /// Write into the layout at `dir` (created if needed) and tag it. Each layer blob is
    /// stored under the digest its descriptor names, whatever its content.
    pub fn write(&self, dir: &Path, tag: &str) -> Result<Digest, Box<dyn std::error::Error>> {
        let layout = Layout::create(dir)?;
        for l in &self.layers {
            let p = layout.blob_path(&l.digest);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(p, &l.blob)?;
        }
        for b in &self.extra_blobs {
            layout.put_blob_bytes(b)?;
        }
        let config = json!({
            "architecture": self.architecture,
            "os": self.os,
            "config": { "Labels": self.labels },
            "rootfs": { "type": "layers", "diff_ids": self.layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>() },
        });
        let config = serde_json::to_vec(&config)?;
        let (cd, cs) = layout.put_blob_bytes(&config)?;
        let layers: Vec<_> = self
            .layers
            .iter()
            .map(|l| {
                let mut d = json!({ "mediaType": l.media_type, "digest": l.digest.to_string(), "size": l.size });
                if !l.annotations.is_empty() {
                    d["annotations"] = json!(l.annotations);
                }
                d
            })
            .collect();
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": self.manifest_media_type,
            "config": { "mediaType": self.config_media_type, "digest": cd.to_string(), "size": cs },
            "layers": layers,
        });
        let manifest = serde_json::to_vec(&manifest)?;
        let (md, ms) = layout.put_blob_bytes(&manifest)?;
        let mt: MediaType = self.manifest_media_type.as_str().into();
        layout.set_tag(tag, &Descriptor::new(mt, ms, md.to_oci()))?;
        Ok(md)
    }
}

/// A tar of the tree at `src`, every path prefixed with `prefix/` (with the prefix's own
/// directories first), names sorted, PAX records for long names.
pub fn tar_of_dir(src: &Path, prefix: &str) -> std::io::Result<Vec<u8>> {
    let mut t = RawTar::new();
    let mut acc = String::new();
    for c in prefix.split('/').filter(|c| !c.is_empty()) {
        acc = if acc.is_empty() { c.to_string() } else { format!("{acc}/{c}") };
        t.dir(&format!("{acc}/"), 0o755);
    }
    add_dir(&mut t, src, &acc)?;
    Ok(t.finish())
}

fn named(t: &mut RawTar, name: &str, link: &str) -> (Vec<u8>, Vec<u8>) {
    let mut recs: Vec<(&str, &[u8])> = Vec::new();
    if name.len() > 100 {
        recs.push(("path", name.as_bytes()));
    }
    if link.len() > 100 {
        recs.push(("linkpath", link.as_bytes()));
    }
    if !recs.is_empty() {
        t.pax(&recs);
    }
    (name.as_bytes().to_vec(), link.as_bytes().to_vec())
}

fn add_dir(t: &mut RawTar, dir: &Path, rel: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<Vec<_>, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let p = if rel.is_empty() { name } else { format!("{rel}/{name}") };
        let m = std::fs::symlink_metadata(e.path())?;
        let mode = m.permissions().mode() & 0o7777;
        if m.is_dir() {
            let (n, _) = named(t, &format!("{p}/"), "");
            t.header(&n, b'5', mode, 0, b"");
            add_dir(t, &e.path(), &p)?;
        } else if m.file_type().is_symlink() {
            let target = std::fs::read_link(e.path())?.to_string_lossy().into_owned();
            let (n, l) = named(t, &p, &target);
            t.header(&n, b'2', 0o777, 0, &l);
        } else {
            let content = std::fs::read(e.path())?;
            let (n, _) = named(t, &p, "");
            t.header(&n, b'0', mode, content.len() as u64, b"").data(&content);
        }
    }
    Ok(())
}
