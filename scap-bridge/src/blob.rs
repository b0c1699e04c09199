//! A layer blob as a verified, decompressed byte stream.
//!
//! A producer thread reads the local blob file, hashes the compressed bytes (digest and
//! size against the manifest), decompresses (gzip members or zstd frames, concatenated)
//! and bounds the result (size and ratio), handing 256 KiB chunks to the consumer through
//! a small bounded channel (so the two cores work in a pipeline and memory stays at a few
//! MiB). The consumer parses tar from [`LayerStream`], which hashes every byte it hands out
//! (the DiffID); file content read through [`LayerStream::read_content`] is hashed for the
//! DiffID and for the file in one pass (`oci_core::sha256::update_both`: content starts
//! at a 512-byte boundary of the stream). The consumer must call [`LayerStream::finish`],
//! which reads everything after the end-of-archive marker to EOF and returns the
//! verification result (digest, size, DiffID): a layer is verified only once `finish` says
//! so.

use oci_core::digest::Hasher;
use oci_core::media::LayerCompression;
use oci_core::sha256::Sha256;
use oci_core::Digest;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

const CHUNK: usize = 256 * 1024;
/// Chunks in flight between the producer and the consumer.
pub const CHANNEL_DEPTH: usize = 8;

/// Bounds on what a layer may expand to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most uncompressed bytes one layer may hold.
    pub max_layer_bytes: u64,
    /// Most uncompressed bytes per compressed byte, once past `ratio_floor`.
    pub max_ratio: u64,
    /// Expansion below this many bytes is never refused for its ratio.
    pub ratio_floor: u64,
    /// Most entries in one layer.
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_layer_bytes: 64 << 30, max_ratio: 100, ratio_floor: 64 << 20, max_entries: 4_000_000 }
    }
}

impl Limits {
    /// The expansion bound for a blob of `compressed` bytes.
    pub fn bound(&self, compressed: u64) -> u64 {
        self.max_layer_bytes.min(compressed.saturating_mul(self.max_ratio).max(self.ratio_floor))
    }
}

/// What went wrong with a layer's bytes (carried inside `io::Error` through the tar reader).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("the blob has {actual} bytes, the manifest says {expected}")]
    Size { expected: u64, actual: u64 },
    #[error("the blob's digest is {actual}, not the one the manifest names")]
    Digest { actual: Digest },
    #[error("the uncompressed digest is {actual}, the config's DiffID is {expected}")]
    DiffId { expected: Digest, actual: Digest },
    #[error("expands to more than {limit} bytes (see --max-ratio and --max-layer-bytes)")]
    Bomb { limit: u64 },
    #[error("decompression failed")]
    Decode(#[source] io::Error),
    #[error("cannot read the blob file")]
    Read(#[source] io::Error),
    #[error("the reading thread stopped unexpectedly")]
    Thread,
}

impl StreamError {
    /// The `StreamError` inside an I/O error that came through the stream, if any.
    pub fn from_io(e: &io::Error) -> Option<&StreamError> {
        e.get_ref().and_then(|i| i.downcast_ref::<StreamError>())
    }
    fn into_io(self) -> io::Error {
        io::Error::other(self)
    }
}

/// What the producer measured.
#[derive(Debug, Clone)]
pub struct Verified {
    pub compressed: u64,
    pub uncompressed: u64,
}

/// Hashes and counts what is read from the blob file; refuses more than `expected` bytes.
struct Counting<R> {
    r: R,
    h: Hasher,
    expected: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(buf).map_err(|e| StreamError::Read(e).into_io())?;
        self.h.update(&buf[..n]);
        if self.h.len() > self.expected {
            return Err(StreamError::Size { expected: self.expected, actual: self.h.len() }.into_io());
        }
        Ok(n)
    }
}

enum Decoder<R: BufRead> {
    Plain(R),
    Gzip(Box<flate2::bufread::MultiGzDecoder<R>>),
    Zstd(zstd::stream::read::Decoder<'static, R>),
}

impl<R: BufRead> Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = match self {
            Decoder::Plain(r) => return r.read(buf),
            Decoder::Gzip(d) => d.read(buf),
            Decoder::Zstd(d) => d.read(buf),
        };
        r.map_err(|e| if StreamError::from_io(&e).is_some() { e } else { StreamError::Decode(e).into_io() })
    }
    fn into_inner(self) -> R {
        match self {
            Decoder::Plain(r) => r,
            Decoder::Gzip(d) => (*d).into_inner(),
            Decoder::Zstd(d) => d.finish(),
        }
    }
}

fn produce(
    file: File,
    compression: LayerCompression,
    digest: &Digest,
    size: u64,
    limit: u64,
    tx: &std::sync::mpsc::SyncSender<io::Result<Vec<u8>>>,
    spare: &Receiver<Vec<u8>>,
) -> Result<Verified, StreamError> {
    let counting = Counting { r: file, h: Hasher::new(), expected: size };
    let inner = BufReader::with_capacity(CHUNK, counting);
    let mut dec = match compression {
        LayerCompression::None => Decoder::Plain(inner),
        LayerCompression::Gzip => Decoder::Gzip(Box::new(flate2::bufread::MultiGzDecoder::new(inner))),
        LayerCompression::Zstd => {
            Decoder::Zstd(zstd::stream::read::Decoder::with_buffer(inner).map_err(StreamError::Decode)?)
        }
    };
    let mut uncompressed = 0u64;
    let lift = |e: io::Error| match e.into_inner() {
        Some(b) => match b.downcast::<StreamError>() {
            Ok(se) => *se,
            Err(other) => StreamError::Decode(io::Error::other(other)),
        },
        None => StreamError::Thread,
    };
    loop {
        // Chunks the consumer is done with come back: no allocation or page faults per chunk.
        let mut chunk = spare.try_recv().unwrap_or_default();
        chunk.resize(CHUNK, 0);
        let mut filled = 0;
        while filled < CHUNK {
            match dec.read(&mut chunk[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(lift(e)),
            }
        }
        if filled == 0 {
            break;
        }
        chunk.truncate(filled);
        uncompressed += filled as u64;
        if uncompressed > limit {
            return Err(StreamError::Bomb { limit });
        }
        if tx.send(Ok(chunk)).is_err() {
            // The consumer gave up; its own error is the one reported.
            return Err(StreamError::Thread);
        }
    }
    // Whatever follows the compressed stream still belongs to the blob and its digest.
    let mut inner = dec.into_inner();
    io::copy(&mut inner, &mut io::sink()).map_err(lift)?;
    let counting = inner.into_inner();
    let (actual, n) = counting.h.finish();
    if n != size {
        return Err(StreamError::Size { expected: size, actual: n });
    }
    if &actual != digest {
        return Err(StreamError::Digest { actual });
    }
    Ok(Verified { compressed: n, uncompressed })
}

/// The decompressed content of a layer blob; see the module docs.
pub struct LayerStream {
    rx: Option<Receiver<io::Result<Vec<u8>>>>,
    /// Where consumed chunks go back to the producer.
    back: std::sync::mpsc::Sender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
    failed: bool,
    handle: Option<JoinHandle<Result<Verified, StreamError>>>,
    /// Every byte handed out so far, hashed: checked against `diff_id` by `finish`.
    diff: Sha256,
    diff_id: Digest,
}

/// What a layer is expected to be.
#[derive(Debug, Clone)]
pub struct Expect {
    pub digest: Digest,
    pub size: u64,
    pub diff_id: Digest,
    pub compression: LayerCompression,
}

impl LayerStream {
    /// Start reading the blob at `path`.
    pub fn open(path: &Path, expect: &Expect, limits: &Limits) -> io::Result<LayerStream> {
        Self::open_ahead(path, expect, limits, CHANNEL_DEPTH)
    }

    /// Start reading the blob at `path`, with up to `depth` chunks decompressed ahead of
    /// the consumer (a stream opened early, while the consumer is busy elsewhere).
    pub fn open_ahead(path: &Path, expect: &Expect, limits: &Limits, depth: usize) -> io::Result<LayerStream> {
        let file = File::open(path)?;
        let (tx, rx) = sync_channel(depth.max(1));
        let (back, spare) = std::sync::mpsc::channel();
        let e = expect.clone();
        let limit = limits.bound(expect.size);
        let handle = std::thread::Builder::new().name("layer-reader".into()).spawn(move || {
            let r = produce(file, e.compression, &e.digest, e.size, limit, &tx, &spare);
            if let Err(err) = &r {
                // Tell the consumer why the stream stops; it may be blocked in read().
                let _ = tx.send(Err(io::Error::other(err.to_string())));
            }
            r
        })?;
        Ok(LayerStream {
            rx: Some(rx),
            back,
            cur: Vec::new(),
            pos: 0,
            failed: false,
            handle: Some(handle),
            diff: Sha256::new(),
            diff_id: expect.diff_id.clone(),
        })
    }

    /// Read everything left to EOF and return the verification result.
    pub fn finish(mut self) -> Result<Verified, StreamError> {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match self.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        self.rx = None;
        let verified = match self.handle.take().map(JoinHandle::join) {
            Some(Ok(r)) => r?,
            _ => return Err(StreamError::Thread),
        };
        let actual = Digest::from_sha256(std::mem::take(&mut self.diff).finalize());
        if actual != self.diff_id {
            return Err(StreamError::DiffId { expected: self.diff_id.clone(), actual });
        }
        Ok(verified)
    }

    /// Read file content: like `read`, and the bytes are hashed into `content` too, in
    /// the same pass as the DiffID.
    pub fn read_content(&mut self, buf: &mut [u8], content: &mut Sha256) -> io::Result<usize> {
        let n = self.take(buf)?;
        oci_core::sha256::update_both(content, &mut self.diff, &buf[..n]);
        Ok(n)
    }

    /// Copy the next bytes of the stream into `buf`, unhashed.
    fn take(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            if self.failed {
                return Err(io::Error::other("layer stream failed"));
            }
            let Some(rx) = &self.rx else { return Ok(0) };
            match rx.recv() {
                Ok(Ok(chunk)) => {
                    let done = std::mem::replace(&mut self.cur, chunk);
                    if done.capacity() > 0 {
                        let _ = self.back.send(done);
                    }
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.failed = true;
                    return Err(e);
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }

    /// The producer's own error, once the stream has failed.
    pub fn failure(mut self) -> Option<StreamError> {
        self.rx = None;
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => Some(e),
            _ => None,
        }
    }
}

impl Read for LayerStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.take(buf)?;
        self.diff.update(&buf[..n]);
        Ok(n)
    }
}

impl Drop for LayerStream {
    fn drop(&mut self) {
        // Dropping the receiver makes a blocked producer fail its send and return.
        self.rx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
