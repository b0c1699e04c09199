//! What travels between the roles: paths, headers, the tracker's announce messages, and
//! error bodies in the distribution API's format.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// Response header carrying a piece's index (origin `seed` answers).
pub const PIECE_INDEX: &str = "x-mwdist-piece";
/// Response header carrying a piece's SHA-256 (hex).
pub const PIECE_SHA256: &str = "x-mwdist-piece-sha256";

/// Header on peer piece requests and responses: the sender's current hex bitfield.
pub const PEER_HAVE: &str = "x-mwdist-have";
/// Request header on peer piece requests: where the requester serves its pieces, so that
/// the peer asked learns the requester's bitfield at once (fresher than the tracker's).
pub const PEER_ADDR: &str = "x-mwdist-peer";

/// An agent's announcement to the tracker for one blob.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Announce {
    /// Stable per process; lets the tracker replace older announcements.
    pub peer_id: String,
    /// Where other agents reach this agent's peer API (`host:port`).
    pub addr: String,
    pub digest: String,
    pub pieces: usize,
    /// Hex bitfield of the pieces held (see [`crate::pieces::Bitfield`]).
    pub have: String,
    /// Peers (addresses) this one dropped because they sent bytes that did not match
    /// their hash. Peers reported by [`crate::tracker::SUSPECT_REPORTS`] others are left
    /// out of announce replies and availability counts, and the origin seeds them no new
    /// piece.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerInfo {
    pub peer_id: String,
    pub addr: String,
    pub have: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AnnounceReply {
    pub peers: Vec<PeerInfo>,
    /// Seconds until this announcement expires.
    pub ttl_secs: u64,
}

/// A distribution-API error response: `{"errors":[{"code","message"}]}`.
pub fn registry_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "errors": [{ "code": code, "message": message, "detail": null }] });
    (status, [("content-type", "application/json")], body.to_string()).into_response()
}

/// A `Range` header that is malformed or cannot be satisfied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadRange;

/// Parse a `Range: bytes=a-b` / `bytes=a-` / `bytes=-n` header against `size`, giving
/// `[start, end)`. `None` when absent; `Err` when unsatisfiable or malformed.
pub fn parse_range(h: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, BadRange> {
    let Some(h) = h else { return Ok(None) };
    let spec = h.trim().strip_prefix("bytes=").ok_or(BadRange)?;
    if spec.contains(',') {
        return Err(BadRange);
    }
    let (a, b) = spec.split_once('-').ok_or(BadRange)?;
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| BadRange)?;
        (size.saturating_sub(n), size)
    } else {
        let s: u64 = a.parse().map_err(|_| BadRange)?;
        let e = if b.is_empty() { size } else { b.parse::<u64>().map_err(|_| BadRange)?.saturating_add(1).min(size) };
        (s, e)
    };
    if start >= end || start >= size {
        return Err(BadRange);
    }
    Ok(Some((start, end)))
}

/// Percent-encode a query value (repository names rarely need it).
pub fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-"), 10), Ok(Some((0, 10))));
        assert_eq!(parse_range(Some("bytes=2-4"), 10), Ok(Some((2, 5))));
        assert_eq!(parse_range(Some("bytes=2-40"), 10), Ok(Some((2, 10))));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Ok(Some((7, 10))));
        for bad in ["bytes=10-", "bytes=5-2", "items=0-1", "bytes=0-1,3-4", "bytes=x-"] {
            assert_eq!(parse_range(Some(bad), 10), Err(BadRange), "{bad}");
        }
    }
}
