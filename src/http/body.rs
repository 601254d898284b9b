//! Streaming HTTP bodies for the two text transports (SSE and NDJSON).
//!
//! Both turn [`Frame`]s into bytes the same way and differ only in the constants of
//! [`Encoding`]. Every event goes out as its shared pre-encoded `Bytes`, never copied: a batch
//! is yielded as consecutive chunks, which hyper queues and writes with one `writev`.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::feed::{Feed, Frame};
use crate::event::{Event, EventKind};

/// How a text transport writes frames.
pub struct Encoding {
    /// Sent once, first (`retry:` for SSE, then the `info` event).
    pub preamble: Vec<Bytes>,
    /// Sent on an idle period.
    pub keepalive: Bytes,
    /// Sent when the server shuts down, before closing.
    pub goodbye: Option<Bytes>,
    /// The pre-encoded bytes of an event for this transport.
    pub pick: fn(&Event) -> &Bytes,
    /// `enveloped=false`: a change goes out as its bare document plus `\n` (NDJSON only).
    pub bare: bool,
}

/// A streaming response with `content_type` and the no-buffering headers every proxy needs
/// (`Cache-Control: no-cache`, `X-Accel-Buffering: no`).
pub fn streaming_response(feed: Feed, encoding: Encoding, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        streaming_body(feed, encoding),
    )
        .into_response()
}

/// A response body that streams the feed until it ends.
fn streaming_body(feed: Feed, encoding: Encoding) -> Body {
    let pending: VecDeque<Bytes> = encoding.preamble.iter().cloned().collect();
    // The state is boxed: `unfold` moves its state into a new future for every item, and the
    // feed is large (moving it per event was 16% of server CPU at saturation, measured).
    let stream = futures::stream::unfold(
        Box::new((feed, encoding, pending)),
        |mut state| async move {
            let (feed, encoding, pending) = &mut *state;
            if let Some(bytes) = pending.pop_front() {
                return Some((Ok::<Bytes, Infallible>(bytes), state));
            }
            let bytes = match feed.next().await? {
                Frame::Events(batch) => {
                    let mut total = 0;
                    for event in &batch {
                        if encoding.bare && event.kind == EventKind::Change {
                            // A slice of the shared envelope, not a copy.
                            let data = event.data();
                            total += data.len() + 1;
                            pending.push_back(data);
                            pending.push_back(Bytes::from_static(b"\n"));
                            continue;
                        }
                        let bytes = (encoding.pick)(event);
                        total += bytes.len();
                        pending.push_back(bytes.clone());
                    }
                    feed.delivered(batch.len(), total);
                    pending.pop_front()?
                }
                Frame::KeepAlive => encoding.keepalive.clone(),
                Frame::Shutdown => encoding.goodbye.clone()?,
            };
            Some((Ok(bytes), state))
        },
    );
    Body::from_stream(stream)
}
