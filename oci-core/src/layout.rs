//! The OCI image layout on disk: `oci-layout`, `index.json`, `blobs/sha256/<hex>`.
//!
//! Every blob is written to a temporary file in the layout, hashed while written, checked
//! against the expected digest and size, and only then renamed into place, so a blob path
//! never holds content other than what its name says. `index.json` is replaced atomically.

use crate::digest::{digest_reader, Digest, Hasher};
use crate::media;
use oci_spec::image::{Descriptor, ImageIndex, MediaType};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not an OCI image layout ({why})")]
    NotALayout { path: PathBuf, why: String },
    #[error("blob {digest} in {path}: expected {expected_size} bytes with that digest, got {actual_size} bytes with digest {actual}; the file is corrupt: delete it and write it again")]
    Mismatch { path: PathBuf, digest: Digest, expected_size: u64, actual: Digest, actual_size: u64 },
    #[error("blob {digest} is not in layout {dir}")]
    MissingBlob { dir: PathBuf, digest: Digest },
    #[error("layout {dir} has no image tagged {tag:?} (tags: {known})")]
    UnknownTag { dir: PathBuf, tag: String, known: String },
    #[error("layout {dir} holds {count} images; name one with oci:{dir}:<tag>")]
    Ambiguous { dir: PathBuf, count: usize },
    #[error("{path}: invalid JSON")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(path: &Path, what: &'static str) -> impl FnOnce(io::Error) -> LayoutError {
    let path = path.to_path_buf();
    move |source| LayoutError::Io { path, what, source }
}

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct Layout {
    dir: PathBuf,
}

impl Layout {
    /// Open an existing layout, checking its `oci-layout` marker.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, LayoutError> {
        let dir = dir.into();
        let marker = dir.join("oci-layout");
        let text = fs::read_to_string(&marker).map_err(|e| LayoutError::NotALayout {
            path: dir.clone(),
            why: format!("cannot read {}: {e}", marker.display()),
        })?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| LayoutError::NotALayout { path: dir.clone(), why: format!("oci-layout: {e}") })?;
        if v.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
            return Err(LayoutError::NotALayout { path: dir, why: "imageLayoutVersion is not 1.0.0".into() });
        }
        Ok(Layout { dir })
    }

    /// Open a layout, creating an empty one if the directory does not hold one yet.
    pub fn create(dir: impl Into<PathBuf>) -> Result<Self, LayoutError> {
        let dir = dir.into();
        if dir.join("oci-layout").exists() {
            return Self::open(dir);
        }
        fs::create_dir_all(dir.join("blobs/sha256")).map_err(io_err(&dir, "cannot create layout directory"))?;
        let layout = Layout { dir };
        layout.write_atomic("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        if !layout.dir.join("index.json").exists() {
            layout.write_index(&empty_index())?;
        }
        Ok(layout)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs").join(d.algorithm()).join(d.hex())
    }

    /// Size of the blob if present (not verified).
    pub fn blob_size(&self, d: &Digest) -> Option<u64> {
        fs::metadata(self.blob_path(d)).ok().filter(|m| m.is_file()).map(|m| m.len())
    }

    fn tmp_file(&self) -> Result<tempfile::NamedTempFile, LayoutError> {
        let blobs = self.dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(io_err(&blobs, "cannot create blob directory"))?;
        tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&blobs)
            .map_err(io_err(&blobs, "cannot create temporary blob"))
    }

    /// Store bytes as a blob; returns its digest and size.
    pub fn put_blob_bytes(&self, bytes: &[u8]) -> Result<(Digest, u64), LayoutError> {
        let d = Digest::of(bytes);
        if self.blob_size(&d) == Some(bytes.len() as u64) {
            return Ok((d, bytes.len() as u64));
        }
        let mut tmp = self.tmp_file()?;
        tmp.write_all(bytes).map_err(io_err(tmp.path(), "cannot write blob"))?;
        self.persist(tmp, &d)?;
        Ok((d, bytes.len() as u64))
    }

    /// Stream a blob in, verifying digest and size before it becomes visible.
    pub fn put_blob_reader(&self, r: impl Read, expected: &Digest, size: u64) -> Result<(), LayoutError> {
        if self.blob_size(expected) == Some(size) {
            return Ok(());
        }
        let blobs = self.dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(io_err(&blobs, "cannot create blob directory"))?;
        write_verified(r, expected, size, &self.blob_path(expected))
    }

    /// Bring a file that is believed to hold `expected` into the layout: hardlinked when
    /// the file system allows (after verifying it), copied otherwise.
    pub fn put_blob_file(&self, src: &Path, expected: &Digest, size: u64) -> Result<(), LayoutError> {
        if self.blob_size(expected) == Some(size) {
            return Ok(());
        }
        let f = File::open(src).map_err(io_err(src, "cannot open blob source"))?;
        let (actual, actual_size) =
            digest_reader(io::BufReader::new(f)).map_err(io_err(src, "cannot read blob source"))?;
        if &actual != expected || actual_size != size {
            return Err(LayoutError::Mismatch {
                path: src.to_path_buf(),
                digest: expected.clone(),
                expected_size: size,
                actual,
                actual_size,
            });
        }
        let dst = self.blob_path(expected);
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent, "cannot create blob directory"))?;
        }
        match fs::hard_link(src, &dst) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(_) => {
                let f = File::open(src).map_err(io_err(src, "cannot open blob source"))?;
                self.put_blob_reader(io::BufReader::new(f), expected, size)
            }
        }
    }

    /// Bring in a blob the caller has verified itself (e.g. hashed while writing it):
    /// hardlinked without re-reading when the sizes agree, else copied with verification.
    pub fn put_verified_blob_file(&self, src: &Path, expected: &Digest, size: u64) -> Result<(), LayoutError> {
        if self.blob_size(expected) == Some(size) {
            return Ok(());
        }
        let dst = self.blob_path(expected);
        let src_size = fs::metadata(src).map_err(io_err(src, "cannot stat blob source"))?.len();
        if src_size == size {
            if let Some(parent) = dst.parent() {
                fs::create_dir_all(parent).map_err(io_err(parent, "cannot create blob directory"))?;
            }
            match fs::hard_link(src, &dst) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
                Err(_) => {}
            }
        }
        self.put_blob_file(src, expected, size)
    }

    fn persist(&self, tmp: tempfile::NamedTempFile, d: &Digest) -> Result<(), LayoutError> {
        let dst = self.blob_path(d);
        tmp.as_file().sync_data().map_err(io_err(&dst, "cannot sync blob"))?;
        tmp.persist(&dst).map_err(|e| LayoutError::Io {
            path: dst,
            what: "cannot move blob into place",
            source: e.error,
        })?;
        Ok(())
    }

    /// Open a blob after checking its size; callers that need the bytes use
    /// [`Layout::read_blob`], which verifies the digest too.
    pub fn open_blob(&self, d: &Digest) -> Result<File, LayoutError> {
        let p = self.blob_path(d);
        File::open(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                LayoutError::MissingBlob { dir: self.dir.clone(), digest: d.clone() }
            } else {
                LayoutError::Io { path: p, what: "cannot open blob", source: e }
            }
        })
    }

    /// Read a whole (small) blob and verify its digest and, when given, its size.
    pub fn read_blob(&self, d: &Digest, size: Option<u64>) -> Result<Vec<u8>, LayoutError> {
        let mut f = self.open_blob(d)?;
        let mut v = Vec::new();
        f.read_to_end(&mut v).map_err(io_err(&self.blob_path(d), "cannot read blob"))?;
        let actual = Digest::of(&v);
        if &actual != d || size.is_some_and(|s| s != v.len() as u64) {
            return Err(LayoutError::Mismatch {
                path: self.blob_path(d),
                digest: d.clone(),
                expected_size: size.unwrap_or(v.len() as u64),
                actual,
                actual_size: v.len() as u64,
            });
        }
        Ok(v)
    }

    pub fn index(&self) -> Result<ImageIndex, LayoutError> {
        let p = self.dir.join("index.json");
        let text = fs::read(&p).map_err(io_err(&p, "cannot read index"))?;
        serde_json::from_slice(&text).map_err(|source| LayoutError::Json { path: p, source })
    }

    fn write_index(&self, index: &ImageIndex) -> Result<(), LayoutError> {
        let bytes = serde_json::to_vec_pretty(index)
            .map_err(|source| LayoutError::Json { path: self.dir.join("index.json"), source })?;
        self.write_atomic("index.json", &bytes)
    }

    fn write_atomic(&self, name: &str, bytes: &[u8]) -> Result<(), LayoutError> {
        let dst = self.dir.join(name);
        let mut tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&self.dir)
            .map_err(io_err(&self.dir, "cannot create temporary file"))?;
        tmp.write_all(bytes).map_err(io_err(&dst, "cannot write"))?;
        tmp.as_file().sync_data().map_err(io_err(&dst, "cannot sync"))?;
        tmp.persist(&dst).map_err(|e| LayoutError::Io { path: dst, what: "cannot replace", source: e.error })?;
        Ok(())
    }

    /// Tags and their descriptors, in index order.
    pub fn tags(&self) -> Result<Vec<(String, Descriptor)>, LayoutError> {
        Ok(self
            .index()?
            .manifests()
            .iter()
            .filter_map(|d| {
                let name = d.annotations().as_ref()?.get(media::ANNOTATION_REF_NAME)?.clone();
                Some((name, d.clone()))
            })
            .collect())
    }

    /// Point `tag` at a manifest (replacing what it pointed at). The manifest blob must
    /// already be in the layout.
    pub fn set_tag(&self, tag: &str, manifest: &Descriptor) -> Result<(), LayoutError> {
        self.set_tags(&[(tag.to_string(), manifest.clone())])
    }

    /// Point several tags at manifests in one atomic `index.json` update (nothing is
    /// written when every tag already points where asked).
    pub fn set_tags(&self, tags: &[(String, Descriptor)]) -> Result<(), LayoutError> {
        for (_, manifest) in tags {
            let d = Digest::from_oci(manifest.digest())
                .map_err(|e| LayoutError::NotALayout { path: self.dir.clone(), why: e.to_string() })?;
            if self.blob_size(&d).is_none() {
                return Err(LayoutError::MissingBlob { dir: self.dir.clone(), digest: d });
            }
        }
        let ref_name = |m: &Descriptor| -> Option<String> {
            m.annotations().as_ref().and_then(|a| a.get(media::ANNOTATION_REF_NAME)).cloned()
        };
        let mut index = self.index()?;
        let before = index.manifests().clone();
        let mut manifests: Vec<Descriptor> =
            before.iter().filter(|m| ref_name(m).is_none_or(|n| !tags.iter().any(|(t, _)| *t == n))).cloned().collect();
        for (tag, manifest) in tags {
            let mut desc = manifest.clone();
            let mut ann = desc.annotations().clone().unwrap_or_default();
            ann.insert(media::ANNOTATION_REF_NAME.to_string(), tag.clone());
            desc.set_annotations(Some(ann));
            manifests.retain(|m| ref_name(m).as_deref() != Some(tag.as_str()));
            manifests.push(desc);
        }
        let unchanged = manifests.len() == before.len()
            && manifests.iter().all(|m| before.iter().any(|b| b.digest() == m.digest() && ref_name(b) == ref_name(m)));
        if unchanged {
            return Ok(());
        }
        index.set_manifests(manifests);
        self.write_index(&index)
    }

    /// Remove a tag; returns whether it existed.
    pub fn remove_tag(&self, tag: &str) -> Result<bool, LayoutError> {
        let mut index = self.index()?;
        let before = index.manifests().len();
        let kept: Vec<Descriptor> = index
            .manifests()
            .iter()
            .filter(|m| {
                m.annotations().as_ref().and_then(|a| a.get(media::ANNOTATION_REF_NAME)).map(String::as_str)
                    != Some(tag)
            })
            .cloned()
            .collect();
        let removed = kept.len() != before;
        index.set_manifests(kept);
        self.write_index(&index)?;
        Ok(removed)
    }

    /// Find the descriptor a tag names; with no tag, the layout's only image.
    pub fn resolve_tag(&self, tag: Option<&str>) -> Result<Descriptor, LayoutError> {
        let index = self.index()?;
        match tag {
            None => match index.manifests().as_slice() {
                [one] => Ok(one.clone()),
                many => Err(LayoutError::Ambiguous { dir: self.dir.clone(), count: many.len() }),
            },
            Some(tag) => index
                .manifests()
                .iter()
                .find(|m| {
                    m.annotations().as_ref().and_then(|a| a.get(media::ANNOTATION_REF_NAME)).map(String::as_str)
                        == Some(tag)
                })
                .cloned()
                .ok_or_else(|| LayoutError::UnknownTag {
                    dir: self.dir.clone(),
                    tag: tag.to_string(),
                    known: index
                        .manifests()
                        .iter()
                        .filter_map(|m| m.annotations().as_ref()?.get(media::ANNOTATION_REF_NAME).cloned())
                        .collect::<Vec<_>>()
                        .join(", "),
                }),
        }
    }
}

/// Copy `r` to `dst` through a temporary file beside it, hashing as it goes; `dst`
/// appears only if the content has the expected digest and size.
pub fn write_verified(mut r: impl Read, expected: &Digest, size: u64, dst: &Path) -> Result<(), LayoutError> {
    let dir = dst.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(io_err(dir, "cannot create temporary file"))?;
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut buf).map_err(io_err(dst, "cannot read blob source"))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        tmp.write_all(&buf[..n]).map_err(io_err(tmp.path(), "cannot write blob"))?;
    }
    let (actual, actual_size) = h.finish();
    if &actual != expected || actual_size != size {
        return Err(LayoutError::Mismatch {
            path: dst.to_path_buf(),
            digest: expected.clone(),
            expected_size: size,
            actual,
            actual_size,
        });
    }
    tmp.as_file().sync_data().map_err(io_err(dst, "cannot sync blob"))?;
    tmp.persist(dst).map_err(|e| LayoutError::Io {
        path: dst.to_path_buf(),
        what: "cannot move blob into place",
        source: e.error,
    })?;
    Ok(())
}

fn empty_index() -> ImageIndex {
    let mut i = ImageIndex::default();
    i.set_schema_version(2);
    i.set_media_type(Some(MediaType::ImageIndex));
    i.set_manifests(Vec::new());
    i.set_annotations(None::<HashMap<String, String>>);
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_verify_tag_resolve() -> Result<(), Box<dyn std::error::Error>> {
        let t = tempfile::tempdir()?;
        let l = Layout::create(t.path().join("l"))?;
        let (d, n) = l.put_blob_bytes(b"{}")?;
        assert_eq!(l.read_blob(&d, Some(n))?, b"{}");
        // A wrong digest is refused and leaves nothing behind.
        let wrong = Digest::of(b"other");
        assert!(l.put_blob_reader(&b"{}"[..], &wrong, 2).is_err());
        assert!(l.blob_size(&wrong).is_none());
        let leftovers: Vec<_> = fs::read_dir(t.path().join("l/blobs/sha256"))?.collect();
        assert_eq!(leftovers.len(), 1, "temporary file left behind");
        let desc = Descriptor::new(MediaType::ImageManifest, n, d.to_oci());
        l.set_tag("a", &desc)?;
        l.set_tag("b", &desc)?;
        l.set_tag("a", &desc)?;
        assert_eq!(l.tags()?.len(), 2);
        assert_eq!(Digest::from_oci(l.resolve_tag(Some("a"))?.digest())?, d);
        assert!(matches!(l.resolve_tag(None), Err(LayoutError::Ambiguous { .. })));
        let e = l.resolve_tag(Some("zz")).expect_err("unknown tag");
        assert!(
            e.to_string().contains("a, b"),
            "re-pointing a tag at the same manifest must not reorder the index: {e}"
        );
        // Corruption is detected on read.
        fs::write(l.blob_path(&d), b"[]")?;
        assert!(matches!(l.read_blob(&d, Some(n)), Err(LayoutError::Mismatch { .. })));
        Ok(())
    }
}
