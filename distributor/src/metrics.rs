//! Prometheus counters for every role, rendered in the text exposition format at
//! `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// One counter (or gauge) per variant.
#[derive(Debug, Clone, Copy)]
pub enum M {
    BytesDownPeers,
    BytesDownOrigin,
    BytesDownUpstream,
    BytesUpPeers,
    BytesUpClients,
    PiecesVerified,
    PiecesRejected,
    PeersDropped,
    ActiveTransfers,
    TransfersCompleted,
    TransfersFailed,
    CompletionMillisSum,
    RequestsRefused,
    PiecesResumed,
    BlobsEvicted,
    PeerRequestsBusy,
    ConnectionsRefused,
    WatchdogReplans,
}

const ALL: [(M, &str, &str, &str); 18] = [
    (M::BytesDownPeers, "mwdist_bytes_down_total{source=\"peers\"}", "counter", "Bytes received"),
    (M::BytesDownOrigin, "mwdist_bytes_down_total{source=\"origin\"}", "counter", ""),
    (M::BytesDownUpstream, "mwdist_bytes_down_total{source=\"upstream\"}", "counter", ""),
    (M::BytesUpPeers, "mwdist_bytes_up_total{to=\"peers\"}", "counter", "Bytes sent"),
    (M::BytesUpClients, "mwdist_bytes_up_total{to=\"clients\"}", "counter", ""),
    (M::PiecesVerified, "mwdist_pieces_verified_total", "counter", "Pieces whose SHA-256 matched"),
    (M::PiecesRejected, "mwdist_pieces_rejected_total", "counter", "Pieces whose SHA-256 did not match"),
    (M::PeersDropped, "mwdist_peers_dropped_total", "counter", "Peers dropped for serving bad bytes"),
    (M::ActiveTransfers, "mwdist_active_transfers", "gauge", "Blobs being fetched"),
    (M::TransfersCompleted, "mwdist_transfers_completed_total", "counter", "Blobs fetched and verified"),
    (M::TransfersFailed, "mwdist_transfers_failed_total", "counter", "Blob fetches that failed"),
    (M::CompletionMillisSum, "mwdist_completion_milliseconds_sum", "counter", "Sum of blob completion times"),
    (M::RequestsRefused, "mwdist_requests_refused_total", "counter", "Requests refused with 503 (--max-requests)"),
    (M::PiecesResumed, "mwdist_pieces_resumed_total", "counter", "Verified pieces reused from partial/ at start"),
    (M::BlobsEvicted, "mwdist_blobs_evicted_total", "counter", "Blobs evicted to stay under --cache-max"),
    (M::PeerRequestsBusy, "mwdist_piece_requests_busy_total", "counter", "Piece requests refused: upload slots busy"),
    (
        M::ConnectionsRefused,
        "mwdist_connections_refused_total",
        "counter",
        "Connections closed at once: the port had its cap of open connections",
    ),
    (
        M::WatchdogReplans,
        "mwdist_watchdog_replans_total",
        "counter",
        "Transfers re-planned after no byte arrived for 2 s",
    ),
];

#[derive(Debug, Default)]
pub struct Metrics {
    values: [AtomicU64; 18],
}

impl Metrics {
    pub fn add(&self, m: M, n: u64) {
        self.values[m as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn sub(&self, m: M, n: u64) {
        self.values[m as usize].fetch_sub(n, Ordering::Relaxed);
    }

    pub fn get(&self, m: M) -> u64 {
        self.values[m as usize].load(Ordering::Relaxed)
    }

    /// The text exposition format.
    pub fn render(&self, role: &str) -> String {
        let mut out = String::new();
        let mut last_family = "";
        for (m, name, kind, help) in ALL {
            let family = name.split('{').next().unwrap_or(name);
            if family != last_family {
                let _ = writeln!(out, "# HELP {family} {help} ({role})");
                let _ = writeln!(out, "# TYPE {family} {kind}");
                last_family = family;
            }
            let _ = writeln!(out, "{name} {}", self.get(m));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_counter_once() {
        let m = Metrics::default();
        m.add(M::BytesDownPeers, 5);
        m.add(M::ActiveTransfers, 2);
        m.sub(M::ActiveTransfers, 1);
        let t = m.render("agent");
        assert!(t.contains("mwdist_bytes_down_total{source=\"peers\"} 5\n"), "{t}");
        assert!(t.contains("mwdist_active_transfers 1\n"), "{t}");
        assert_eq!(t.matches("# TYPE mwdist_bytes_down_total").count(), 1);
    }
}
