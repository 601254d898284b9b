//! Newline-delimited JSON over a streaming HTTP body (close-delimited on the direct path,
//! chunked under hyper): one envelope per line, empty line as keep-alive.

use axum::response::Response;
use bytes::Bytes;

use super::body::{Encoding, streaming_response};
use super::feed::Feed;
use super::negotiate::Transport;
use super::options::Options;

/// The NDJSON response for a feed; `info` (an encoded `info` line) comes first.
pub fn response(feed: Feed, options: &Options, info: Option<Bytes>) -> Response {
    let encoding = Encoding {
        preamble: info.into_iter().collect(),
        keepalive: options
            .heartbeat(Transport::Ndjson)
            .unwrap_or(Bytes::from_static(b"\n")),
        goodbye: None,
        pick: |event| &event.ndjson,
        bare: !options.enveloped,
    };
    streaming_response(feed, encoding, "application/x-ndjson")
}
