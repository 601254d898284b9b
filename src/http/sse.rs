//! Server-Sent Events: `text/event-stream` framing of PROTOCOL.md §3.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::body::{Encoding, streaming_body};
use super::feed::Feed;

/// The SSE response for a feed. `retry_ms` is the reconnect hint sent first and on shutdown.
pub fn response(feed: Feed, retry_ms: u64) -> Response {
    let retry = Bytes::from(format!("retry: {retry_ms}\n\n"));
    let body = streaming_body(
        feed,
        Encoding {
            preamble: Some(retry.clone()),
            keepalive: Bytes::from_static(b": keep-alive\n\n"),
            goodbye: Some(retry),
            pick: |event| &event.sse,
        },
    );
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        body,
    )
        .into_response()
}
