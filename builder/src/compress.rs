//! Block-parallel compression with output independent of the thread count.
//!
//! The uncompressed tar stream is cut into fixed-size blocks; each block becomes one
//! independent zstd frame or gzip member, compressed on a shared thread pool, and the
//! results are written in order. Concatenated frames/members are valid zstd/gzip streams.
//! A writer thread hashes the uncompressed stream (the DiffID) and the compressed one
//! (the blob digest) while the producer keeps reading files. Memory is bounded by a
//! global budget of blocks in flight.

use crate::spec::{Algorithm, Compression};
use oci_core::digest::{Digest, Hasher};
use std::fs::File;
use std::io::{self, Write};
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

pub struct Engine {
    pub pool: rayon::ThreadPool,
    pub budget: Arc<Budget>,
    pub compression: Compression,
}

impl Engine {
    pub fn new(jobs: usize, compression: Compression) -> io::Result<Arc<Self>> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(jobs.max(1))
            .thread_name(|i| format!("compress-{i}"))
            .build()
            .map_err(io::Error::other)?;
        Ok(Arc::new(Engine { pool, budget: Budget::new(2 * jobs.max(1) + 2), compression }))
    }
}

pub fn compress_block(c: &Compression, block: &[u8]) -> io::Result<Vec<u8>> {
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
                    Some((_, z)) => z.compress(block),
                    None => Err(io::Error::other("zstd context missing")),
                }
            })
        }
        Algorithm::Gzip => {
            let mut e = flate2::GzBuilder::new()
                .mtime(0)
                .operating_system(255)
                .write(Vec::with_capacity(block.len() / 2), flate2::Compression::new(c.level as u32));
            e.write_all(block)?;
            e.finish()
        }
    }
}

/// What a finished layer stream produced.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub diff_id: Digest,
    pub uncompressed_size: u64,
    pub digest: Digest,
    pub size: u64,
}

type Item = (Arc<Vec<u8>>, Receiver<io::Result<Vec<u8>>>);

/// A `Write` sink that compresses into `out` in parallel.
pub struct BlockSink {
    engine: Arc<Engine>,
    block: Vec<u8>,
    tx: Option<SyncSender<Item>>,
    writer: Option<JoinHandle<io::Result<Sealed>>>,
}

impl BlockSink {
    pub fn new(engine: Arc<Engine>, mut out: File) -> Self {
        let (tx, rx) = sync_channel::<Item>(engine.budget_hint());
        let budget = engine.budget.clone();
        let writer = std::thread::Builder::new().name("layer-writer".into()).spawn(move || {
            let mut raw = Hasher::new();
            let mut packed = Hasher::new();
            let mut result = Ok(());
            for (block, done) in rx {
                raw.update(&block);
                let r = done.recv().unwrap_or_else(|_| Err(io::Error::other("compression task vanished")));
                budget.release();
                if result.is_err() {
                    continue;
                }
                result = r.and_then(|c| {
                    packed.update(&c);
                    out.write_all(&c)
                });
            }
            result?;
            out.sync_data()?;
            let (diff_id, uncompressed_size) = raw.finish();
            let (digest, size) = packed.finish();
            Ok(Sealed { diff_id, uncompressed_size, digest, size })
        });
        let (tx, writer) = match writer {
            Ok(h) => (Some(tx), Some(h)),
            Err(_) => (None, None),
        };
        let cap = engine.compression.block_size;
        BlockSink { engine, block: Vec::with_capacity(cap), tx, writer }
    }

    fn dispatch(&mut self) -> io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        let cap = self.engine.compression.block_size;
        let block = Arc::new(std::mem::replace(&mut self.block, Vec::with_capacity(cap)));
        self.engine.budget.acquire();
        let (done_tx, done_rx) = sync_channel(1);
        let b = block.clone();
        let c = self.engine.compression.clone();
        self.engine.pool.spawn(move || {
            let _ = done_tx.send(compress_block(&c, &b));
        });
        let Some(tx) = &self.tx else { return Err(io::Error::other("layer writer thread could not start")) };
        tx.send((block, done_rx)).map_err(|_| io::Error::other("layer writer stopped"))
    }

    pub fn finish(mut self) -> io::Result<Sealed> {
        self.dispatch()?;
        drop(self.tx.take());
        match self.writer.take() {
            Some(h) => h.join().map_err(|_| io::Error::other("layer writer panicked"))?,
            None => Err(io::Error::other("layer writer thread could not start")),
        }
    }
}

impl Engine {
    fn budget_hint(&self) -> usize {
        self.pool.current_num_threads() * 2 + 2
    }
}

impl Write for BlockSink {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let total = buf.len();
        let cap = self.engine.compression.block_size;
        while !buf.is_empty() {
            let room = cap - self.block.len();
            let n = room.min(buf.len());
            self.block.extend_from_slice(&buf[..n]);
            buf = &buf[n..];
            if self.block.len() == cap {
                self.dispatch()?;
            }
        }
        Ok(total)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for BlockSink {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

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
