//! Block-parallel compression with output independent of the thread count.
//!
//! The uncompressed tar stream is cut into segments (see [`BlockSink`]); each segment
//! becomes one independent zstd frame or gzip member, compressed on a shared thread pool,
//! and the results are written in order. Concatenated frames/members are valid zstd/gzip
//! streams. A writer thread hashes the uncompressed stream (the DiffID) and the compressed
//! one (the blob digest) while the producer keeps reading files. Memory is bounded by a
//! global budget of segments in flight.

use crate::spec::{Algorithm, Compression};
use oci_core::digest::{Digest, Hasher, Midstate};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// A counting semaphore bounding blocks in flight across every layer being built.
pub struct Budget {
    free: Mutex<usize>,
    cv: Condvar,
}

impl Budget {
    pub fn new(n: usize) -> Arc<Self> {
        Arc::new(Budget { free: Mutex::new(n.max(1)), cv: Condvar::new() })
    }
    fn acquire(&self) {
        let mut g = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *g == 0 {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        *g -= 1;
    }
    fn release(&self) {
        let mut g = self.free.lock().unwrap_or_else(|p| p.into_inner());
        *g += 1;
        self.cv.notify_one();
    }
}

/// Buffers kept for reuse, as many as can be in flight at once.
struct Spares {
    free: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

impl Spares {
    fn new(keep: usize) -> Self {
        Spares { free: Mutex::new(Vec::new()), keep }
    }
    fn take(&self) -> Option<Vec<u8>> {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }
    fn give(&self, buf: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.keep {
            free.push(buf);
        }
    }
}

pub struct Engine {
    pub pool: rayon::ThreadPool,
    pub budget: Arc<Budget>,
    pub compression: Compression,
    /// Segment buffers (each `3 × block_size` long) ready for reuse: their pages are
    /// already mapped, so a new segment costs neither page faults nor a reallocation.
    spare: Spares,
    /// Compressed-output buffers ready for reuse, for the same reason.
    spare_out: Spares,
}

impl Engine {
    pub fn new(jobs: usize, compression: Compression) -> io::Result<Arc<Self>> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(jobs.max(1))
            .thread_name(|i| format!("compress-{i}"))
            .build()
            .map_err(io::Error::other)?;
        Ok(Arc::new(Engine {
            pool,
            budget: Budget::new(2 * jobs.max(1) + 2),
            compression,
            // What the budget can have in flight, plus one being filled per layer.
            spare: Spares::new(2 * jobs.max(1) + 4),
            spare_out: Spares::new(2 * jobs.max(1) + 4),
        }))
    }

    fn segment_capacity(&self) -> usize {
        3 * self.compression.block_size
    }

    fn take_buffer(&self) -> Vec<u8> {
        self.spare.take().unwrap_or_else(|| vec![0u8; self.segment_capacity()])
    }

    fn give_buffer(&self, buf: Vec<u8>) {
        if buf.len() == self.segment_capacity() {
            self.spare.give(buf);
        }
    }

    fn take_out(&self) -> Vec<u8> {
        self.spare_out.take().unwrap_or_default()
    }

    fn give_out(&self, buf: Vec<u8>) {
        self.spare_out.give(buf);
    }
}

/// Compress `block` into `out` (cleared first; a reused buffer keeps its pages mapped).
pub fn compress_block_into(c: &Compression, block: &[u8], mut out: Vec<u8>) -> io::Result<Vec<u8>> {
    out.clear();
    match c.algorithm {
        Algorithm::Zstd => {
            thread_local! {
                static CTX: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { std::cell::RefCell::new(None) };
            }
            CTX.with(|cell| {
                let mut slot = cell.borrow_mut();
                if slot.as_ref().map(|(l, _)| *l) != Some(c.level) {
                    *slot = Some((c.level, zstd::bulk::Compressor::new(c.level)?));
                }
                match slot.as_mut() {
                    Some((_, z)) => {
                        out.reserve(zstd::zstd_safe::compress_bound(block.len()));
                        z.compress_to_buffer(block, &mut out)?;
                        Ok(out)
                    }
                    None => Err(io::Error::other("zstd context missing")),
                }
            })
        }
        Algorithm::Gzip => {
            let mut e = flate2::GzBuilder::new()
                .mtime(0)
                .operating_system(255)
                .write(out, flate2::Compression::new(c.level as u32));
            e.write_all(block)?;
            e.finish()
        }
    }
}

/// The bytes of one zstd frame or gzip member known to hold `raw` bytes; `None` when it
/// does not decode to exactly that many.
pub fn decompress_frame(algorithm: Algorithm, frame: &[u8], raw: u64) -> Option<Vec<u8>> {
    let n = usize::try_from(raw).ok()?;
    let plain = match algorithm {
        Algorithm::Zstd => zstd::bulk::decompress(frame, n).ok()?,
        Algorithm::Gzip => {
            let mut out = Vec::with_capacity(n);
            flate2::read::GzDecoder::new(frame).take(raw + 1).read_to_end(&mut out).ok()?;
            out
        }
    };
    (plain.len() == n).then_some(plain)
}

/// One compressed frame of a layer: its segment key, uncompressed and compressed sizes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Frame {
    pub key: Digest,
    pub raw: u64,
    pub packed: u64,
    /// Present when the frame begins with a tar entry: what a rebuild needs to start
    /// right there (see [`Resume`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<FrameStart>,
}

/// The state of a layer stream where a frame begins with a tar entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FrameStart {
    /// Index (in tar order, ancestors included) of the entry the frame begins with.
    pub item: u64,
    /// The DiffID hash over every uncompressed byte before the frame.
    pub diff: Midstate,
    /// Digest of the compressed bytes before the frame, so that a rebuild copying them
    /// from the previous blob can check it copied exactly those.
    pub packed: Digest,
}

/// Where a rebuild starts instead of at the first entry: the previous blob's first
/// frames, whose entries are exactly the new stream's first entries, are kept as they
/// are (copied to the output before the sink starts, and hashed into `packed`), and
/// the DiffID goes on from the midstate recorded where they end. A cold build of the
/// same entries cuts the same segments there, so the result is the same bytes.
pub struct Resume {
    pub frames: Vec<Frame>,
    pub packed: Hasher,
    pub diff: Hasher,
    /// Index of the first entry the sink will be given.
    pub item: u64,
}

/// What a finished layer stream produced.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub diff_id: Digest,
    pub uncompressed_size: u64,
    pub digest: Digest,
    pub size: u64,
    pub frames: Vec<Frame>,
    /// Uncompressed bytes whose frame was taken from an earlier blob instead of compressed.
    pub reused: u64,
}

/// Frames of an earlier blob of the same layer slot, found by segment key. A frame is
/// used only after it decompresses to exactly the bytes it stands for, so a stale or
/// damaged earlier blob costs a compression, never a wrong layer.
pub struct Reuse {
    file: File,
    algorithm: Algorithm,
    frames: HashMap<Digest, (u64, u64, u64)>,
}

impl Reuse {
    pub fn new(file: File, algorithm: Algorithm, frames: &[Frame]) -> Reuse {
        let mut at = 0u64;
        let mut map = HashMap::new();
        for f in frames {
            map.entry(f.key.clone()).or_insert((at, f.packed, f.raw));
            at += f.packed;
        }
        Reuse { file, algorithm, frames: map }
    }

    fn frame_for(&self, key: &Digest, block: &[u8]) -> Option<Vec<u8>> {
        let &(off, packed, raw) = self.frames.get(key)?;
        if raw != block.len() as u64 {
            return None;
        }
        let mut frame = vec![0u8; usize::try_from(packed).ok()?];
        self.file.read_exact_at(&mut frame, off).ok()?;
        let plain = decompress_frame(self.algorithm, &frame, raw)?;
        (plain == block).then_some(frame)
    }
}

/// A segment on its way to the writer: its buffer (the first `len` bytes are the
/// segment), key, entry index and DiffID midstate where it starts (when it starts with
/// an entry), and the compression result to wait for.
type Item = (Arc<Vec<u8>>, usize, Digest, Option<(u64, Midstate)>, Receiver<io::Result<(Vec<u8>, bool)>>);

/// What the writer thread produced: the compressed side of a [`Sealed`].
struct Packed {
    digest: Digest,
    size: u64,
    frames: Vec<Frame>,
    reused: u64,
}

/// A `Write` sink that compresses into `out` in parallel.
///
/// The stream is cut into segments at entry boundaries chosen by a hash of the entry's
/// path (`begin_entry`/`end_entry`), about `block_size` long, between a quarter and three
/// times that. Cut points depend only on paths and sizes, so an edit moves at most the
/// cuts next to it, and the other segments keep their bytes: a rebuild takes their frames
/// from the slot's previous blob ([`Reuse`]) instead of compressing them again. A
/// segment's key hashes the (path, offset, length) of each entry piece it holds.
pub struct BlockSink {
    engine: Arc<Engine>,
    /// The segment being filled: `block[..used]`; `block.len()` is the segment capacity.
    block: Vec<u8>,
    used: usize,
    tx: Option<SyncSender<Item>>,
    writer: Option<JoinHandle<io::Result<Packed>>>,
    reuse: Option<Arc<Reuse>>,
    /// The DiffID: every byte written, hashed as it arrives.
    diff: Hasher,
    key: Hasher,
    path: String,
    entry_off: u64,
    piece_start: u64,
    /// Entries begun so far (the index of the next one).
    items: u64,
    /// Where the segment being filled starts, when it starts with an entry.
    seg_start: Option<(u64, Midstate)>,
}

impl BlockSink {
    pub fn new(engine: Arc<Engine>, out: File) -> Self {
        Self::with_reuse(engine, out, None, None)
    }

    /// A sink that takes unchanged frames from `reuse`, and starts after the kept
    /// frames of `resume` (already written to `out`) when given one.
    pub fn with_reuse(engine: Arc<Engine>, mut out: File, reuse: Option<Reuse>, resume: Option<Resume>) -> Self {
        let (tx, rx) = sync_channel::<Item>(engine.budget_hint());
        let eng = engine.clone();
        let (kept, packed, diff, items) = match resume {
            Some(r) => (r.frames, r.packed, r.diff, r.item),
            None => (Vec::new(), Hasher::new(), Hasher::new(), 0),
        };
        let seg_start = diff.midstate().map(|m| (items, m));
        let writer = std::thread::Builder::new().name("layer-writer".into()).spawn(move || {
            let mut packed = packed;
            let mut reused: u64 = kept.iter().map(|f| f.raw).sum();
            let mut frames = kept;
            let mut result = Ok(());
            for (block, len, key, start, done) in rx {
                let r = done.recv().unwrap_or_else(|_| Err(io::Error::other("compression task vanished")));
                eng.budget.release();
                // The compression task has let go of the buffer before answering.
                if let Ok(buf) = Arc::try_unwrap(block) {
                    eng.give_buffer(buf);
                }
                if result.is_err() {
                    continue;
                }
                result = r.and_then(|(c, was_reused)| {
                    let start = start.map(|(item, diff)| FrameStart { item, diff, packed: packed.clone().finish().0 });
                    packed.update(&c);
                    if was_reused {
                        reused += len as u64;
                    }
                    frames.push(Frame { key, raw: len as u64, packed: c.len() as u64, start });
                    let w = out.write_all(&c);
                    eng.give_out(c);
                    w
                });
            }
            result?;
            out.sync_data()?;
            let (digest, size) = packed.finish();
            Ok(Packed { digest, size, frames, reused })
        });
        let (tx, writer) = match writer {
            Ok(h) => (Some(tx), Some(h)),
            Err(_) => (None, None),
        };
        let block = engine.take_buffer();
        BlockSink {
            engine,
            block,
            used: 0,
            tx,
            writer,
            reuse: reuse.map(Arc::new),
            diff,
            key: Hasher::new(),
            path: String::new(),
            entry_off: 0,
            piece_start: 0,
            items,
            seg_start,
        }
    }

    /// The next bytes written belong to the tar entry for `path`.
    pub fn begin_entry(&mut self, path: &str) {
        self.close_piece();
        self.path.clear();
        self.path.push_str(path);
        self.entry_off = 0;
        self.piece_start = 0;
        self.items += 1;
    }

    /// The current entry is complete: cut here if its path says so.
    pub fn end_entry(&mut self) -> io::Result<()> {
        let avg = self.engine.compression.block_size as u64;
        let min = avg / 4;
        if (self.used as u64) < min {
            return Ok(());
        }
        // FNV-1a: stable across builds and machines, which is all a cut rule needs.
        let h =
            self.path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        if h % (avg - min).max(1) < self.entry_off {
            self.dispatch(true)?;
        }
        Ok(())
    }

    fn close_piece(&mut self) {
        if self.entry_off > self.piece_start {
            self.key.update(self.path.as_bytes());
            self.key.update(&[0]);
            self.key.update(&self.piece_start.to_le_bytes());
            self.key.update(&(self.entry_off - self.piece_start).to_le_bytes());
            self.piece_start = self.entry_off;
        }
    }

    /// Send the segment off; `at_entry_end` when the next one starts with an entry.
    fn dispatch(&mut self, at_entry_end: bool) -> io::Result<()> {
        self.close_piece();
        let key = std::mem::replace(&mut self.key, Hasher::new()).finish().0;
        if self.used == 0 {
            return Ok(());
        }
        let len = std::mem::take(&mut self.used);
        let block = Arc::new(std::mem::replace(&mut self.block, self.engine.take_buffer()));
        self.engine.budget.acquire();
        let (done_tx, done_rx) = sync_channel(1);
        let b = block.clone();
        let c = self.engine.compression.clone();
        let reuse = self.reuse.clone();
        let k = key.clone();
        let eng = self.engine.clone();
        self.engine.pool.spawn(move || {
            let seg = &b[..len];
            let r = match reuse.as_ref().and_then(|r| r.frame_for(&k, seg)) {
                Some(frame) => Ok((frame, true)),
                None => compress_block_into(&c, seg, eng.take_out()).map(|f| (f, false)),
            };
            // Let go of the buffer first, so the writer can hand it to the next segment.
            drop(b);
            let _ = done_tx.send(r);
        });
        self.send(block, len, key, done_rx)?;
        if at_entry_end {
            self.seg_start = self.diff.midstate().map(|m| (self.items, m));
        }
        Ok(())
    }

    /// Hand a segment to the writer, with where it starts.
    fn send(
        &mut self,
        block: Arc<Vec<u8>>,
        len: usize,
        key: Digest,
        done: Receiver<io::Result<(Vec<u8>, bool)>>,
    ) -> io::Result<()> {
        let start = std::mem::take(&mut self.seg_start);
        let Some(tx) = &self.tx else { return Err(io::Error::other("layer writer thread could not start")) };
        tx.send((block, len, key, start, done)).map_err(|_| io::Error::other("layer writer stopped"))
    }

    /// Whether the next byte starts a segment with entry `item` (the point where the
    /// rest of the stream may be taken from an earlier blob: [`BlockSink::push_frame`]).
    pub fn starts_segment_at(&self, item: u64) -> bool {
        self.used == 0 && self.seg_start.as_ref().is_some_and(|(i, _)| *i == item)
    }

    /// Append a segment that is already compressed: `raw` its bytes, `packed` its frame,
    /// `key` its segment key, all from an earlier blob of the same entries. Only at a
    /// segment start. `next_item` is the entry the next frame begins with, if it begins
    /// with one.
    pub fn push_frame(&mut self, raw: &[u8], packed: Vec<u8>, key: Digest, next_item: Option<u64>) -> io::Result<()> {
        if self.used != 0 {
            return Err(io::Error::other("a ready frame can only start a segment"));
        }
        self.diff.update(raw);
        self.engine.budget.acquire();
        let (done_tx, done_rx) = sync_channel(1);
        let _ = done_tx.send(Ok((packed, true)));
        self.send(Arc::new(Vec::new()), raw.len(), key, done_rx)?;
        if let Some(item) = next_item {
            self.items = item;
            self.seg_start = self.diff.midstate().map(|m| (item, m));
        }
        Ok(())
    }

    pub fn finish(mut self) -> io::Result<Sealed> {
        self.dispatch(true)?;
        drop(self.tx.take());
        let p = match self.writer.take() {
            Some(h) => h.join().map_err(|_| io::Error::other("layer writer panicked"))??,
            None => return Err(io::Error::other("layer writer thread could not start")),
        };
        let (diff_id, uncompressed_size) = std::mem::take(&mut self.diff).finish();
        Ok(Sealed { diff_id, uncompressed_size, digest: p.digest, size: p.size, frames: p.frames, reused: p.reused })
    }

    /// Append to the current segment (already hashed), cutting it when it is full.
    fn append(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = (self.block.len() - self.used).min(buf.len());
            self.block[self.used..self.used + n].copy_from_slice(&buf[..n]);
            self.advance(n)?;
            buf = &buf[n..];
        }
        Ok(())
    }

    /// `n` more bytes of the segment buffer are filled; cut when it is full.
    fn advance(&mut self, n: usize) -> io::Result<()> {
        self.used += n;
        self.entry_off += n as u64;
        if self.used == self.block.len() {
            self.dispatch(false)?;
        }
        Ok(())
    }
}

impl Engine {
    fn budget_hint(&self) -> usize {
        self.pool.current_num_threads() * 2 + 2
    }
}

impl Write for BlockSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.diff.update(buf);
        self.append(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl crate::tarball::Sink for BlockSink {
    /// Read straight into the segment buffer, and hash the bytes for the DiffID and the
    /// file's content in one pass.
    fn copy_content(&mut self, r: &mut dyn Read, max: usize, content: Option<&mut Hasher>) -> io::Result<usize> {
        let n = max.min(self.block.len() - self.used);
        let n = r.read(&mut self.block[self.used..self.used + n])?;
        let got = &self.block[self.used..self.used + n];
        match content {
            Some(h) => Hasher::update_both(h, &mut self.diff, got),
            None => self.diff.update(got),
        }
        self.advance(n)?;
        Ok(n)
    }
}

impl Drop for BlockSink {
    fn drop(&mut self) {
        self.engine.give_buffer(std::mem::take(&mut self.block));
        drop(self.tx.take());
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(jobs: usize, alg: Algorithm, data: &[u8]) -> Result<(Sealed, Vec<u8>), Box<dyn std::error::Error>> {
        let c = Compression { algorithm: alg, level: 3, block_size: 64 * 1024 };
        let engine = Engine::new(jobs, c)?;
        let t = tempfile::NamedTempFile::new()?;
        let mut s = BlockSink::new(engine, t.reopen()?);
        for chunk in data.chunks(10_000) {
            s.write_all(chunk)?;
        }
        let sealed = s.finish()?;
        let bytes = std::fs::read(t.path())?;
        Ok((sealed, bytes))
    }

    /// Write `entries` (path, bytes) as a stream of entries, reusing frames from `reuse`.
    fn run_entries(
        alg: Algorithm,
        entries: &[(String, Vec<u8>)],
        reuse: Option<Reuse>,
    ) -> Result<(Sealed, Vec<u8>), Box<dyn std::error::Error>> {
        run_resumed(alg, entries, reuse, None)
    }

    /// Like [`run_entries`]; with `resume` = (kept frames' bytes, the resume point), the
    /// output starts with those bytes and only the entries from the point on are given.
    fn run_resumed(
        alg: Algorithm,
        entries: &[(String, Vec<u8>)],
        reuse: Option<Reuse>,
        resume: Option<(&[u8], Resume)>,
    ) -> Result<(Sealed, Vec<u8>), Box<dyn std::error::Error>> {
        let c = Compression { algorithm: alg, level: 3, block_size: 64 * 1024 };
        let engine = Engine::new(2, c)?;
        let t = tempfile::NamedTempFile::new()?;
        let mut out = t.reopen()?;
        let mut skip = 0;
        let resume = match resume {
            Some((bytes, r)) => {
                out.write_all(bytes)?;
                skip = r.item as usize;
                Some(r)
            }
            None => None,
        };
        let mut s = BlockSink::with_reuse(engine, out, reuse, resume);
        for (path, data) in &entries[skip..] {
            s.begin_entry(path);
            s.write_all(data)?;
            s.end_entry()?;
        }
        let sealed = s.finish()?;
        Ok((sealed, std::fs::read(t.path())?))
    }

    #[test]
    fn unchanged_segments_are_reused_and_output_equals_a_fresh_build() -> Result<(), Box<dyn std::error::Error>> {
        // 300 entries of 1-40 KiB, one very large one; then one entry in the middle grows.
        let mut entries: Vec<(String, Vec<u8>)> = (0..300u32)
            .map(|i| {
                let n = 1024 * (1 + (i * 7919) % 40) as usize;
                (format!("dir/file-{i:04}"), (0..n).map(|j| ((j as u32 * 31 + i) % 253) as u8).collect())
            })
            .collect();
        entries.insert(120, ("dir/big".into(), (0..700_000u32).map(|j| (j % 241) as u8).collect()));
        for alg in [Algorithm::Zstd, Algorithm::Gzip] {
            let dir = tempfile::tempdir()?;
            let (old, old_bytes) = run_entries(alg, &entries, None)?;
            assert!(old.frames.len() > 8, "{} frames", old.frames.len());
            assert_eq!(old.reused, 0);
            let old_path = dir.path().join("old");
            std::fs::write(&old_path, &old_bytes)?;
            let mut edited = entries.clone();
            edited[200].1.extend_from_slice(b"one more line\n");
            let (fresh, fresh_bytes) = run_entries(alg, &edited, None)?;
            let reuse = Reuse::new(File::open(&old_path)?, alg, &old.frames);
            let (inc, inc_bytes) = run_entries(alg, &edited, Some(reuse))?;
            assert_eq!(inc_bytes, fresh_bytes, "reuse changed the output");
            assert_eq!((inc.digest.clone(), inc.diff_id.clone()), (fresh.digest.clone(), fresh.diff_id.clone()));
            assert_eq!(inc.frames, fresh.frames);
            // Only the segments next to the edit were compressed.
            assert!(inc.reused * 10 > inc.uncompressed_size * 7, "reused {} of {}", inc.reused, inc.uncompressed_size);
            // Frames that do not decompress to their block are never used: point every key
            // at the wrong frame and the output is still the fresh one.
            let mut wrong = old.frames.clone();
            let keys: Vec<Digest> = wrong.iter().map(|f| f.key.clone()).collect();
            for (i, f) in wrong.iter_mut().enumerate() {
                f.key = keys[(i + 1) % keys.len()].clone();
            }
            let reuse = Reuse::new(File::open(&old_path)?, alg, &wrong);
            let (bad, bad_bytes) = run_entries(alg, &edited, Some(reuse))?;
            assert_eq!(bad_bytes, fresh_bytes);
            assert_eq!(bad.reused, 0);
        }
        Ok(())
    }

    #[test]
    fn a_stream_resumed_after_its_unchanged_first_frames_equals_a_fresh_build() -> Result<(), Box<dyn std::error::Error>>
    {
        let entries: Vec<(String, Vec<u8>)> = (0..200u32)
            .map(|i| {
                let n = 512 * (1 + (i * 7919) % 90) as usize;
                (format!("d/f-{i:04}"), (0..n).map(|j| ((j as u32 * 13 + i) % 251) as u8).collect())
            })
            .collect();
        let (old, old_bytes) = run_entries(Algorithm::Zstd, &entries, None)?;
        // Every frame begins with an entry here (no entry fills a segment).
        assert!(old.frames.len() > 4 && old.frames.iter().all(|f| f.start.is_some()));
        let mut edited = entries.clone();
        edited[150].1.extend_from_slice(b"changed");
        let (fresh, fresh_bytes) = run_entries(Algorithm::Zstd, &edited, None)?;
        // Resume at the last frame that begins at or before the edited entry.
        let f = old.frames.iter().rposition(|fr| fr.start.as_ref().is_some_and(|s| s.item <= 150)).ok_or("no frame")?;
        assert!(f > 0);
        let start = old.frames[f].start.clone().ok_or("start")?;
        let packed_len: u64 = old.frames[..f].iter().map(|fr| fr.packed).sum();
        let prefix = &old_bytes[..packed_len as usize];
        let mut packed = Hasher::new();
        packed.update(prefix);
        assert_eq!(packed.clone().finish().0, start.packed, "the recorded prefix digest");
        let resume = Resume {
            frames: old.frames[..f].to_vec(),
            packed,
            diff: Hasher::resume(&start.diff).ok_or("midstate")?,
            item: start.item,
        };
        let (inc, inc_bytes) = run_resumed(Algorithm::Zstd, &edited, None, Some((prefix, resume)))?;
        assert_eq!(inc_bytes, fresh_bytes);
        assert_eq!((&inc.digest, &inc.diff_id, &inc.frames), (&fresh.digest, &fresh.diff_id, &fresh.frames));
        assert!(inc.reused >= start.diff.len, "the kept frames count as reused");
        Ok(())
    }

    #[test]
    fn output_is_independent_of_jobs_and_decodes() -> Result<(), Box<dyn std::error::Error>> {
        let data: Vec<u8> = (0..1_000_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        for alg in [Algorithm::Zstd, Algorithm::Gzip] {
            let (a, ba) = run(1, alg, &data)?;
            let (b, bb) = run(4, alg, &data)?;
            assert_eq!(a.digest, b.digest);
            assert_eq!(ba, bb);
            assert_eq!(a.diff_id, Digest::of(&data));
            assert_eq!(a.digest, Digest::of(&ba));
            let mut out = Vec::new();
            match alg {
                Algorithm::Zstd => {
                    zstd::stream::read::Decoder::new(&ba[..])?.read_to_end(&mut out)?;
                }
                Algorithm::Gzip => {
                    flate2::read::MultiGzDecoder::new(&ba[..]).read_to_end(&mut out)?;
                }
            }
            assert_eq!(out, data);
        }
        Ok(())
    }
}
