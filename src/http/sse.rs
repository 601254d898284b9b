//! Server-Sent Events: `text/event-stream` framing of PROTOCOL.md §3.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;

use super::AppState;
use super::body::{Encoding, streaming_response};
use super::feed::Feed;
use super::negotiate::{Transport, negotiate};
use super::options::Options;

/// The SSE response for a feed. `retry_ms` is the reconnect hint sent first and on shutdown;
/// `info` (an encoded `info` event) follows it.
pub fn response(feed: Feed, retry_ms: u64, options: &Options, info: Option<Bytes>) -> Response {
    let retry = Bytes::from(format!("retry: {retry_ms}\n\n"));
    let encoding = Encoding {
        preamble: std::iter::once(retry.clone()).chain(info).collect(),
        keepalive: options
            .heartbeat(Transport::Sse)
            .unwrap_or(Bytes::from_static(b": keep-alive\n\n")),
        goodbye: Some(retry),
        pick: |event| &event.sse,
        // `enveloped` is about NDJSON and WebSocket: an SSE `data:` is the change already.
        bare: false,
    };
    streaming_response(feed, encoding, "text/event-stream")
}

/// The answer to an SSE subscribe that meets a server shutting down: `200` with only the
/// `retry:` hint, then the end of the stream, so the client reconnects (to this instance's
/// successor or another one). Any error status would end a browser's `EventSource` for good
/// (HTML: a non-200 response fails the connection without reconnecting).
fn goodbye(retry_ms: u64) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from(format!("retry: {retry_ms}\n\n")))
        .unwrap_or_default()
}

/// Middleware of the stream routes: an SSE subscribe that arrives while the server shuts down
/// (on a kept-alive connection), or that fails because shutdown began while its worker
/// opened, gets the [`goodbye`] instead of an error status.
pub async fn reconnect_on_shutdown(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let sse = negotiate(request.headers()).is_ok_and(|t| t == Transport::Sse);
    if sse && state.shutdown.is_cancelled() {
        return goodbye(state.config.sse_retry_ms);
    }
    let response = next.run(request).await;
    if sse && !response.status().is_success() && state.shutdown.is_cancelled() {
        return goodbye(state.config.sse_retry_ms);
    }
    response
}
