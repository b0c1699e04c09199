//! A cap on the requests a port handles at once (`--max-requests`). One more is refused
//! at once with `503` and `Retry-After: 1`, before any other work (even the secret
//! check), so that the requester asks another peer (or the origin) instead of queueing.
//! A request counts until its response body is fully sent or dropped.

use crate::metrics::{Metrics, M};
use axum::body::{Body, HttpBody};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Default cap of an agent's peer port.
pub const AGENT_MAX_REQUESTS: usize = 256;
/// Default cap of the origin's (and a tracker's) port.
pub const ORIGIN_MAX_REQUESTS: usize = 1024;

/// The shared state of the middleware.
#[derive(Clone)]
pub struct RequestCap {
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl RequestCap {
    /// At most `max` requests at once (`0` is taken as 1).
    pub fn new(max: usize, metrics: Arc<Metrics>) -> Self {
        RequestCap { slots: Arc::new(Semaphore::new(max.max(1))), metrics }
    }
}

/// axum middleware: refuse a request when `max` are already being handled.
pub async fn limit(State(cap): State<RequestCap>, req: Request, next: Next) -> Response {
    let Ok(permit) = cap.slots.clone().try_acquire_owned() else {
        cap.metrics.add(M::RequestsRefused, 1);
        return (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")]).into_response();
    };
    let (parts, body) = next.run(req).await.into_parts();
    Response::from_parts(parts, Body::new(Held { body, _permit: permit }))
}

/// A response body that keeps its request's slot until it is sent or dropped.
struct Held {
    body: Body,
    _permit: OwnedSemaphorePermit,
}

impl HttpBody for Held {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
