//! Newline-delimited JSON over chunked HTTP: one envelope per line, empty line as keep-alive.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::body::{Encoding, streaming_body};
use super::feed::Feed;

/// The NDJSON response for a feed.
pub fn response(feed: Feed) -> Response {
    let body = streaming_body(
        feed,
        Encoding {
            preamble: None,
            keepalive: Bytes::from_static(b"\n"),
            goodbye: None,
            pick: |event| &event.ndjson,
        },
    );
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-ndjson"),
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
