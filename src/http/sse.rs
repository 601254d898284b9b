//! Server-Sent Events: `text/event-stream` framing of PROTOCOL.md §3.

use axum::response::Response;
use bytes::Bytes;

use super::body::{Encoding, streaming_response};
use super::feed::Feed;

/// The SSE response for a feed. `retry_ms` is the reconnect hint sent first and on shutdown.
pub fn response(feed: Feed, retry_ms: u64) -> Response {
    let retry = Bytes::from(format!("retry: {retry_ms}\n\n"));
    let encoding = Encoding {
        preamble: Some(retry.clone()),
        keepalive: Bytes::from_static(b": keep-alive\n\n"),
        goodbye: Some(retry),
        pick: |event| &event.sse,
    };
    streaming_response(feed, encoding, "text/event-stream")
}
