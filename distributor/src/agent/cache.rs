//! The agent's disk bound: least-recently-used complete blobs are evicted once
//! `blobs/` holds more than `--cache-max` bytes. Never evicted: a blob being fetched, one
//! a client or peer is being served from (someone else holds its transfer), and a pinned
//! one (`<data>/pins`, one digest per line, edited by `mwdist pin`/`unpin`).
//! Recency is the blob file's mtime, touched on every use, so it survives restarts.

use super::Agent;
use oci_core::Digest;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

pub fn pins_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("pins")
}

/// The pinned digests (a missing file pins nothing; malformed lines are ignored).
pub fn read_pins(data_dir: &Path) -> HashSet<Digest> {
    std::fs::read_to_string(pins_path(data_dir))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Add or remove a pin (the file is rewritten atomically).
pub fn set_pin(data_dir: &Path, d: &Digest, pinned: bool) -> std::io::Result<bool> {
    let mut pins = read_pins(data_dir);
    let changed = if pinned { pins.insert(d.clone()) } else { pins.remove(d) };
    let mut lines: Vec<String> = pins.iter().map(ToString::to_string).collect();
    lines.sort();
    std::fs::create_dir_all(data_dir)?;
    let tmp = data_dir.join("pins.tmp");
    std::fs::write(&tmp, lines.join("\n") + "\n")?;
    std::fs::rename(tmp, pins_path(data_dir))?;
    Ok(changed)
}

/// Mark a blob file as just used.
pub fn touch(f: &std::fs::File) {
    let _ = f.set_modified(SystemTime::now());
}

/// Evict until the bound holds; the bytes freed.
pub async fn evict(agent: &Arc<Agent>) -> u64 {
    let Some(max) = agent.opts.cache_max else { return 0 };
    let dir = agent.opts.data_dir.join("blobs");
    let mut blobs = crate::disk::list_blobs(&dir);
    let mut total: u64 = blobs.iter().map(|b| b.1).sum();
    if total <= max {
        return 0;
    }
    blobs.sort();
    let pins = read_pins(&agent.opts.data_dir);
    let mut freed = 0;
    let mut map = agent.transfers.lock().await;
    for (_, size, d) in blobs {
        if total <= max {
            break;
        }
        if pins.contains(&d) {
            continue;
        }
        if let Some(t) = map.get(&d) {
            // The map holds one reference; any other is a client or peer being served.
            if !t.is_done() || Arc::strong_count(t) > 1 {
                continue;
            }
        }
        if std::fs::remove_file(dir.join(d.hex())).is_ok() {
            map.remove(&d);
            tracing::info!("agent: evicted {d} ({size} bytes) to stay under {max} bytes");
            total -= size;
            freed += size;
        }
    }
    freed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        assert!(read_pins(dir.path()).is_empty());
        assert!(set_pin(dir.path(), &a, true).expect("pin"));
        assert!(!set_pin(dir.path(), &a, true).expect("pin again"));
        set_pin(dir.path(), &b, true).expect("pin");
        assert!(set_pin(dir.path(), &a, false).expect("unpin"));
        assert_eq!(read_pins(dir.path()), HashSet::from([b]));
    }
}
