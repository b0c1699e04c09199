//! File writers: the threads that create, fill and finish the files of the new tree while
//! the parsing thread goes on with the layer.
//!
//! Creating a file, copying its bytes into the page cache, setting its mode and mtime and
//! closing it is kernel work that costs more than parsing and hashing the stream does, so
//! it runs here, on [`WRITERS`] threads, each with its own queue. A file goes to one writer
//! (its messages stay in order), and successive files go to successive writers. Buffers come
//! back through a return queue and are reused, so memory stays bounded by the queues'
//! capacity, whatever the tree size.
//!
//! Only files inside the hidden new tree are written here, and the content of a file has
//! been hashed and checked against the plan by the parsing thread before its
//! [`Msg::End`] is sent; the tree becomes visible only after [`Pool::finish`] has joined
//! every writer without an error and every layer has been verified.

use crate::apply::io_at;
use crate::error::{Error, Result};
use crate::fsutil::{self, Time};
use crate::path;
use rustix::fd::OwnedFd;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Writer threads.
pub const WRITERS: usize = 2;
/// Size of one content buffer.
pub const CHUNK: usize = 256 * 1024;
/// Messages each writer's queue holds.
const QUEUE: usize = 16;

/// One file to write: its first path, the paths to hardlink to it, its mode and mtime.
pub struct FileJob {
    pub first: String,
    pub others: Vec<String>,
    pub mode: u32,
    pub mtime: Time,
}

/// Content held in one buffer: the buffer and how many of its bytes count.
type Held = Option<(Vec<u8>, usize)>;

enum Msg {
    Begin(Box<FileJob>),
    /// The next `.1` bytes of the current file.
    Chunk(Vec<u8>, usize),
    End,
    /// A file whose content fits one buffer, in one message (most files).
    Whole(Box<FileJob>, Held),
}

struct Shared {
    failed: AtomicBool,
    error: Mutex<Option<Error>>,
    /// The umask in effect, if known: files are created with their final mode and only
    /// `fchmod`ed when the umask would take bits away.
    umask: Option<u32>,
}

pub struct Pool {
    queues: Vec<SyncSender<Msg>>,
    threads: Vec<JoinHandle<()>>,
    spare: Receiver<Vec<u8>>,
    /// Buffers made so far; at most [`Pool::max_buffers`] exist at once.
    buffers: usize,
    next: usize,
    /// The writer of the file being delivered, once its first message is sent.
    current: Option<usize>,
    /// A file not sent yet: until its content turns out to need more than one buffer, it
    /// is held to go as one [`Msg::Whole`].
    pending: Option<(Box<FileJob>, Held)>,
    shared: Arc<Shared>,
}

impl Pool {
    /// Start the writers, each with its own descriptor of the new tree's root.
    pub fn start(root: &OwnedFd, root_path: &Path) -> Result<Pool> {
        let shared = Arc::new(Shared { failed: AtomicBool::new(false), error: Mutex::new(None), umask: read_umask() });
        let (give_back, spare) = mpsc::channel();
        let mut pool = Pool {
            queues: Vec::new(),
            threads: Vec::new(),
            spare,
            buffers: 0,
            next: 0,
            current: None,
            pending: None,
            shared,
        };
        for i in 0..WRITERS {
            let fd = rustix::io::fcntl_dupfd_cloexec(root, 0)
                .map_err(|e| Error::io(root_path, "cannot duplicate the descriptor of the new tree")(e.into()))?;
            let (tx, rx) = mpsc::sync_channel(QUEUE);
            let mut w = Writer {
                root: fd,
                root_path: root_path.to_path_buf(),
                dirs: Vec::new(),
                shared: Arc::clone(&pool.shared),
                give_back: give_back.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("file-writer-{i}"))
                .spawn(move || w.run(rx))
                .map_err(Error::io(root_path, "cannot start a file writer"))?;
            pool.queues.push(tx);
            pool.threads.push(handle);
        }
        Ok(pool)
    }

    fn max_buffers() -> usize {
        WRITERS * (QUEUE + 2) + 1
    }

    /// The first error a writer met, once every writer has stopped.
    fn stop(&mut self) -> Option<Error> {
        self.join();
        self.shared.error.lock().ok().and_then(|mut e| e.take())
    }

    /// A writer failed: its error.
    fn failure(&mut self) -> Error {
        self.stop().unwrap_or_else(|| Error::Usage("internal: a file writer stopped".into()))
    }

    fn send(&mut self, w: usize, m: Msg) -> Result<()> {
        if self.shared.failed.load(Ordering::Relaxed) || self.queues[w].send(m).is_err() {
            return Err(self.failure());
        }
        Ok(())
    }

    /// Start delivering a file.
    pub fn begin(&mut self, job: FileJob) -> Result<()> {
        if self.current.is_some() || self.pending.is_some() {
            return Err(Error::Usage("internal: a file begun before the last one ended".into()));
        }
        self.pending = Some((Box::new(job), None));
        Ok(())
    }

    fn writer(&mut self) -> usize {
        let w = self.next;
        self.next = (self.next + 1) % self.queues.len().max(1);
        w
    }

    /// An empty buffer of [`CHUNK`] bytes to fill.
    pub fn buffer(&mut self) -> Result<Vec<u8>> {
        if let Ok(b) = self.spare.try_recv() {
            return Ok(b);
        }
        if self.buffers < Self::max_buffers() {
            self.buffers += 1;
            return Ok(vec![0u8; CHUNK]);
        }
        // Every buffer is queued or being written: the writers give them back (also
        // after a failure, when they only drain their queues).
        self.spare.recv().map_err(|_| self.failure())
    }

    /// The first `n` bytes of `buf` are the next content of the current file; `last` if
    /// nothing follows.
    pub fn chunk(&mut self, buf: Vec<u8>, n: usize, last: bool) -> Result<()> {
        if let Some((job, held)) = self.pending.take() {
            if held.is_none() && last {
                self.pending = Some((job, Some((buf, n))));
                return Ok(());
            }
            let w = self.writer();
            self.current = Some(w);
            self.send(w, Msg::Begin(job))?;
            if let Some((b, k)) = held {
                self.send(w, Msg::Chunk(b, k))?;
            }
        }
        let w = self.current.ok_or_else(|| Error::Usage("internal: content without a file".into()))?;
        self.send(w, Msg::Chunk(buf, n))
    }

    /// The current file is complete and its content checked.
    pub fn end(&mut self) -> Result<()> {
        if let Some((job, held)) = self.pending.take() {
            let w = self.writer();
            return self.send(w, Msg::Whole(job, held));
        }
        let w = self.current.take().ok_or_else(|| Error::Usage("internal: end without a file".into()))?;
        self.send(w, Msg::End)
    }

    fn join(&mut self) {
        self.queues.clear();
        for t in self.threads.drain(..) {
            // A panicking writer leaves no error behind: make sure something is reported.
            if t.join().is_err() {
                self.shared.failed.store(true, Ordering::Relaxed);
                if let Ok(mut e) = self.shared.error.lock() {
                    e.get_or_insert_with(|| Error::Usage("internal: a file writer panicked".into()));
                }
            }
        }
    }

    /// Wait until every file sent is on disk; the first error of any writer.
    pub fn finish(&mut self) -> Result<()> {
        self.stop().map_or(Ok(()), Err)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.join();
    }
}

struct Writer {
    root: OwnedFd,
    root_path: PathBuf,
    /// Recently used directories, most recent last (a layer's entries come in path order,
    /// so the same few directories recur).
    dirs: Vec<(String, OwnedFd)>,
    shared: Arc<Shared>,
    give_back: Sender<Vec<u8>>,
}

impl Writer {
    fn run(&mut self, rx: Receiver<Msg>) {
        let mut current: Option<(Box<FileJob>, File)> = None;
        for m in rx {
            if self.shared.failed.load(Ordering::Relaxed) {
                // Only hand the buffers back, so the parsing thread never waits forever.
                if let Msg::Chunk(b, _) | Msg::Whole(_, Some((b, _))) = m {
                    let _ = self.give_back.send(b);
                }
                continue;
            }
            let r = match m {
                Msg::Begin(job) => self.create(&job).map(|f| current = Some((job, f))),
                Msg::Chunk(b, n) => {
                    let r = match current.as_mut() {
                        Some((job, f)) => f.write_all(&b[..n.min(b.len())]).map_err(io_at(
                            &self.root_path,
                            &job.first,
                            "cannot write extracted file",
                        )),
                        None => Err(Error::Usage("internal: content without a file".into())),
                    };
                    let _ = self.give_back.send(b);
                    r
                }
                Msg::End => match current.take() {
                    Some((job, f)) => self.complete(&job, f),
                    None => Err(Error::Usage("internal: end without a file".into())),
                },
                Msg::Whole(job, content) => {
                    let r = self.create(&job).and_then(|mut f| {
                        if let Some((b, n)) = &content {
                            f.write_all(&b[..(*n).min(b.len())]).map_err(io_at(
                                &self.root_path,
                                &job.first,
                                "cannot write extracted file",
                            ))?;
                        }
                        self.complete(&job, f)
                    });
                    if let Some((b, _)) = content {
                        let _ = self.give_back.send(b);
                    }
                    r
                }
            };
            if let Err(e) = r {
                current = None;
                if let Ok(mut slot) = self.shared.error.lock() {
                    slot.get_or_insert(e);
                }
                self.shared.failed.store(true, Ordering::Relaxed);
            }
        }
    }

    fn dir_of(&mut self, p: &str) -> Result<&OwnedFd> {
        const KEEP: usize = 32;
        let parent = path::parent(p);
        match self.dirs.iter().rposition(|(d, _)| d == parent) {
            Some(i) if i + 1 == self.dirs.len() => {}
            Some(i) => {
                let hit = self.dirs.remove(i);
                self.dirs.push(hit);
            }
            None => {
                let fd = fsutil::open_dir_beneath(&self.root, parent).map_err(io_at(
                    &self.root_path,
                    parent,
                    "cannot open",
                ))?;
                if self.dirs.len() == KEEP {
                    self.dirs.remove(0);
                }
                self.dirs.push((parent.to_string(), fd));
            }
        }
        match self.dirs.last() {
            Some((_, fd)) => Ok(fd),
            None => Err(Error::Usage("internal: no directory".into())),
        }
    }

    fn create(&mut self, job: &FileJob) -> Result<File> {
        let root_path = self.root_path.clone();
        let dir = self.dir_of(&job.first)?;
        fsutil::create_file_at(dir, path::file_name(&job.first), job.mode & 0o777).map_err(io_at(
            &root_path,
            &job.first,
            "cannot create file",
        ))
    }

    fn complete(&mut self, job: &FileJob, file: File) -> Result<()> {
        let root_path = self.root_path.clone();
        let first = &job.first;
        let mode = job.mode & 0o777;
        if self.shared.umask.is_none_or(|u| mode & u != 0) {
            fsutil::chmod_fd(&file, mode).map_err(io_at(&root_path, first, "cannot set mode"))?;
        }
        fsutil::set_mtime_fd(&file, job.mtime).map_err(io_at(&root_path, first, "cannot set mtime"))?;
        drop(file);
        if job.others.is_empty() {
            return Ok(());
        }
        let from = fsutil::open_dir_beneath(&self.root, path::parent(first)).map_err(io_at(
            &root_path,
            first,
            "cannot open",
        ))?;
        for other in &job.others {
            let to = self.dir_of(other)?;
            fsutil::link_at(&from, path::file_name(first), to, path::file_name(other)).map_err(io_at(
                &root_path,
                other,
                "cannot hardlink",
            ))?;
        }
        Ok(())
    }
}

/// The process's umask, from `/proc/self/status` (reading it with `umask(2)` would change
/// it for a moment under other threads). `None` if it cannot be read.
fn read_umask() -> Option<u32> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find_map(|l| l.strip_prefix("Umask:"))?;
    u32::from_str_radix(line.trim(), 8).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn pool_in(dir: &Path) -> (OwnedFd, Pool) {
        let root = fsutil::open_dir_path(dir).expect("open");
        let pool = Pool::start(&root, dir).expect("start");
        (root, pool)
    }

    fn job(first: &str, others: &[&str], mode: u32) -> FileJob {
        FileJob {
            first: first.into(),
            others: others.iter().map(|s| s.to_string()).collect(),
            mode,
            mtime: Time { sec: 1_600_000_000, nsec: 5 },
        }
    }

    /// Deliver `content` as the layer reader does: buffers filled in turn, `last` on the last.
    fn deliver(pool: &mut Pool, j: FileJob, content: &[u8]) {
        pool.begin(j).expect("begin");
        let mut rest = content;
        while !rest.is_empty() {
            let mut b = pool.buffer().expect("buffer");
            let n = b.len().min(rest.len());
            b[..n].copy_from_slice(&rest[..n]);
            rest = &rest[n..];
            pool.chunk(b, n, rest.is_empty()).expect("chunk");
        }
        pool.end().expect("end");
    }

    #[test]
    fn files_of_every_size_arrive_whole_with_mode_mtime_and_links() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(t.path().join("d")).expect("mkdir");
        let (_root, mut pool) = pool_in(t.path());
        let big: Vec<u8> = (0..CHUNK * 3 + 17).map(|i| (i % 251) as u8).collect();
        let exact: Vec<u8> = vec![7u8; CHUNK];
        deliver(&mut pool, job("empty", &[], 0o640), b"");
        deliver(&mut pool, job("d/small", &["d/small-link", "small-link"], 0o755), b"hello");
        deliver(&mut pool, job("d/big", &[], 0o600), &big);
        deliver(&mut pool, job("exact", &[], 0o644), &exact);
        // More files than the queues and buffers hold, so buffers must come back.
        for i in 0..200 {
            deliver(&mut pool, job(&format!("d/f{i}"), &[], 0o644), format!("file {i}").as_bytes());
        }
        pool.finish().expect("finish");
        let p = t.path();
        assert_eq!(std::fs::read(p.join("empty")).expect("read"), b"");
        assert_eq!(std::fs::read(p.join("d/small")).expect("read"), b"hello");
        assert_eq!(std::fs::read(p.join("d/big")).expect("read"), big);
        assert_eq!(std::fs::read(p.join("exact")).expect("read"), exact);
        assert_eq!(std::fs::read(p.join("d/f199")).expect("read"), b"file 199");
        let small = std::fs::metadata(p.join("d/small")).expect("stat");
        assert_eq!(small.mode() & 0o7777, 0o755);
        assert_eq!((small.mtime(), small.mtime_nsec()), (1_600_000_000, 5));
        assert_eq!(small.nlink(), 3);
        assert_eq!(std::fs::metadata(p.join("small-link")).expect("stat").ino(), small.ino());
        assert_eq!(std::fs::metadata(p.join("empty")).expect("stat").mode() & 0o7777, 0o640);
    }

    #[test]
    fn a_failed_write_is_reported_by_path_and_never_blocks_the_sender() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::write(t.path().join("taken"), b"old").expect("write");
        let (_root, mut pool) = pool_in(t.path());
        pool.begin(job("taken", &[], 0o644)).expect("begin");
        let b = pool.buffer().expect("buffer");
        // Not the last piece: the file is created at once, and that fails (O_EXCL). A writer
        // may fail before this call returns, so the failure may already show here.
        let mut seen = pool.chunk(b, 10, false).err();
        // Keep sending until the failure is seen; the writers drain and give buffers back.
        for _ in 0..10_000 {
            if seen.is_some() {
                break;
            }
            let r = pool.buffer().and_then(|b| pool.chunk(b, CHUNK, false));
            seen = r.err();
        }
        let e = seen.expect("the failure reaches the sender");
        let msg = e.to_string();
        assert!(msg.contains("taken") && msg.contains("cannot create file"), "{msg}");
        assert_eq!(std::fs::read(t.path().join("taken")).expect("read"), b"old", "the existing file is untouched");
    }
}
