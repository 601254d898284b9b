//! Newline-delimited JSON over a streaming HTTP body (close-delimited on the direct path,
//! chunked under hyper): one envelope per line, empty line as keep-alive.

use axum::response::Response;
use bytes::Bytes;

use super::body::{Encoding, streaming_response};
use super::feed::Feed;

/// The NDJSON response for a feed.
pub fn response(feed: Feed) -> Response {
    let encoding = Encoding {
        preamble: None,
        keepalive: Bytes::from_static(b"\n"),
        goodbye: None,
        pick: |event| &event.ndjson,
    };
    streaming_response(feed, encoding, "application/x-ndjson")
}
