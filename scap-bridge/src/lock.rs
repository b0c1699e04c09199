//! Exclusive POSIX record locks (`fcntl(F_SETLK, F_WRLCK)` over the whole file), the kind
//! scap takes with Python's `fcntl.lockf` on `/var/lock/scap.srv_mediawiki-staging.lock`.
//! The lock belongs to the process and goes away when the descriptor is closed or the
//! process dies (also under `kill -9`), so a crashed run never leaves staging locked.

use crate::error::{Error, Result};
use rustix::fs::FlockOperation;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Held until dropped.
#[derive(Debug)]
pub struct Lock {
    _file: File,
    path: PathBuf,
}

impl Lock {
    /// Take the lock, waiting up to `wait` for another holder to let go.
    pub fn acquire(path: &Path, wait: Duration) -> Result<Lock> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                std::fs::create_dir_all(dir).map_err(Error::io(dir, "cannot create the lock's directory"))?;
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o664)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path)
            .map_err(Error::io(path, "cannot open lock file"))?;
        let start = Instant::now();
        loop {
            match rustix::fs::fcntl_lock(&file, FlockOperation::NonBlockingLockExclusive) {
                // If the holder unlinked the file on release, our lock is on a stale inode:
                // open the path again.
                Ok(()) if !same_file(&file, path) => return Lock::acquire(path, wait.saturating_sub(start.elapsed())),
                Ok(()) => return Ok(Lock { _file: file, path: path.to_path_buf() }),
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::ACCESS) if start.elapsed() < wait => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::ACCESS) => {
                    return Err(Error::Locked { path: path.to_path_buf() })
                }
                Err(e) => return Err(Error::io(path, "cannot lock")(e.into())),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn same_file(f: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}
