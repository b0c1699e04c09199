//! The agent's two HTTP faces: the mirror (distribution pull API on loopback, no
//! authentication, streams blobs in order as pieces arrive) and the peer API (verified
//! pieces for other agents, cluster secret required).

use super::transfer::FetchError;
use super::Agent;
use crate::api::{parse_range, registry_error};
use crate::auth;
use crate::limit::throttled_body;
use crate::metrics::M;
use crate::v2::{self, V2Path};
use axum::extract::{Path as AxPath, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::StreamExt as _;
use oci_core::Digest;
use std::sync::Arc;

pub fn mirror_router(agent: &Arc<Agent>) -> Router {
    let me = agent.clone();
    Router::new()
        .route("/v2/", get(|| async { Json(serde_json::json!({})) }))
        .route("/v2/{*rest}", get(v2_handler).head(v2_handler))
        .route("/metrics", get(move || async move { me.metrics.render("agent") }))
        .with_state(agent.clone())
}

/// How long a piece request waits for an upload slot before the peer answers busy.
const UPLOAD_WAIT: std::time::Duration = std::time::Duration::from_millis(300);

pub fn peer_router(agent: &Arc<Agent>) -> Router {
    let me = agent.clone();
    Router::new()
        .route("/dist/v1/piece/{digest}/{index}", get(piece_handler))
        .layer(axum::middleware::from_fn_with_state(agent.opts.secret.clone(), auth::require))
        .layer(axum::middleware::from_fn_with_state(agent.peer_cap.clone(), crate::cap::limit))
        .route("/metrics", get(move || async move { me.metrics.render("agent") }))
        .with_state(agent.clone())
}

async fn piece_handler(
    State(a): State<Arc<Agent>>,
    AxPath((d, i)): AxPath<(String, usize)>,
    headers: HeaderMap,
) -> Response {
    let Ok(d) = d.parse::<Digest>() else {
        return registry_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "not a sha256 digest");
    };
    let Some(t) = a.known_transfer(&d).await else {
        return registry_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "this peer does not have that piece");
    };
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    if let (Some(addr), Some(have)) = (header(crate::api::PEER_ADDR), header(crate::api::PEER_HAVE)) {
        t.heard_from(addr, have);
    }
    if !t.has(i) {
        return registry_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", "this peer does not have that piece");
    }
    // A busy peer queues the request briefly, so that its link does not idle between
    // pieces, then refuses (with its bitfield) so that the requester asks another.
    let Ok(Ok(permit)) = tokio::time::timeout(UPLOAD_WAIT, a.upload_slots.clone().acquire_owned()).await else {
        a.metrics.add(M::PeerRequestsBusy, 1);
        return (StatusCode::SERVICE_UNAVAILABLE, [(crate::api::PEER_HAVE, t.have_hex())]).into_response();
    };
    match t.read_piece(i) {
        Ok(mut bytes) => {
            if a.opts.corrupt {
                if let Some(b) = bytes.first_mut() {
                    *b ^= 0xff;
                }
            }
            let have = [(crate::api::PEER_HAVE, t.have_hex())];
            (have, throttled_body(bytes.into(), a.up.clone(), a.metrics.clone(), M::BytesUpPeers, Some(permit)))
                .into_response()
        }
        Err(e) => registry_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", &format!("reading piece {i}: {e}")),
    }
}

async fn v2_handler(
    State(a): State<Arc<Agent>>,
    method: Method,
    AxPath(rest): AxPath<String>,
    headers: HeaderMap,
) -> Response {
    match v2::parse_path(&rest) {
        Some(V2Path::Manifest { name, reference }) => manifest(&a, &method, &name, &reference, &headers).await,
        Some(V2Path::Blob { name, digest }) => blob(&a, &method, &name, &digest, &headers).await,
        None => registry_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", "not a distribution API path"),
    }
}

/// Manifests by tag are resolved upstream, through the origin; checked against the digest
/// asked for or announced.
async fn manifest(a: &Agent, method: &Method, name: &str, reference: &str, headers: &HeaderMap) -> Response {
    let url = format!("http://{}/v2/{name}/manifests/{reference}", a.opts.origin);
    let mut req = a.http.get(url).header("authorization", a.auth());
    if let Some(accept) = headers.get(header::ACCEPT) {
        req = req.header(header::ACCEPT, accept.clone());
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return registry_error(StatusCode::BAD_GATEWAY, "UNAVAILABLE", &format!("origin: {e}")),
    };
    let status = resp.status();
    let ctype = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
    let announced = resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()?.parse::<Digest>().ok());
    let body = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => return registry_error(StatusCode::BAD_GATEWAY, "UNAVAILABLE", &format!("origin: {e}")),
    };
    if !status.is_success() {
        let s = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        return (s, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    }
    let digest = Digest::of(&body);
    let wanted = reference.parse::<Digest>().ok();
    if wanted.iter().chain(announced.iter()).any(|w| *w != digest) {
        return registry_error(StatusCode::BAD_GATEWAY, "MANIFEST_INVALID", "the manifest does not match its digest");
    }
    let ctype = ctype.unwrap_or_else(|| oci_core::media::OCI_MANIFEST.to_string());
    v2::manifest_response(method, &body, &ctype, &digest)
}

/// A blob from the swarm, streamed in order (from the first requested byte) as pieces
/// are verified.
async fn blob(a: &Arc<Agent>, method: &Method, name: &str, d: &Digest, headers: &HeaderMap) -> Response {
    let t = match a.transfer(name, d).await {
        Ok(t) => t,
        Err(FetchError::NotFound(e)) => return registry_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN", &e),
        Err(FetchError::Unavailable(e)) => return registry_error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", &e),
    };
    if t.is_done() {
        t.touch();
    }
    let size = t.geo.size;
    let range = match parse_range(headers.get(header::RANGE).and_then(|v| v.to_str().ok()), size) {
        Ok(r) => r,
        Err(_) => {
            return (StatusCode::RANGE_NOT_SATISFIABLE, [(header::CONTENT_RANGE, format!("bytes */{size}"))])
                .into_response()
        }
    };
    let status = if range.is_some() { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
    let h = v2::blob_headers(d, size, range);
    if *method == Method::HEAD {
        return (status, h).into_response();
    }
    let (start, end) = range.unwrap_or((0, size));
    if start == end {
        return (status, h).into_response();
    }
    let (first, last) = (t.geo.piece_at(start), t.geo.piece_at(end - 1));
    let metrics = a.metrics.clone();
    let to_the_end = end == size;
    let s = futures_util::stream::iter(first..=last).then(move |i| {
        let (t, metrics) = (t.clone(), metrics.clone());
        async move {
            let bytes = t.read_piece_when_ready(i).await.map_err(std::io::Error::other)?;
            // The last bytes wait for the whole-blob check, so that a client never
            // receives a complete wrong blob.
            if i == last && to_the_end {
                t.wait_done().await.map_err(std::io::Error::other)?;
            }
            let (ps, _) = t.geo.range(i);
            let from = usize::try_from(start.saturating_sub(ps)).unwrap_or(0).min(bytes.len());
            let to = usize::try_from(end - ps).unwrap_or(usize::MAX).min(bytes.len());
            metrics.add(M::BytesUpClients, (to - from) as u64);
            let mut b = bytes::Bytes::from(bytes);
            Ok::<_, std::io::Error>(b.split_off(from).split_to(to - from))
        }
    });
    (status, h, axum::body::Body::from_stream(s)).into_response()
}
