//! Streaming HTTP bodies for the two text transports (SSE and NDJSON).
//!
//! Both turn [`Frame`]s into bytes the same way and differ only in the constants of
//! [`Encoding`]. A single event is sent as its shared pre-encoded `Bytes` (no copy); a batch is
//! concatenated into one chunk so hyper makes one write.

use std::convert::Infallible;

use axum::body::Body;
use bytes::{Bytes, BytesMut};

use super::feed::{Feed, Frame};
use crate::event::Event;

/// How a text transport writes frames.
pub struct Encoding {
    /// Sent once, first (`retry:` for SSE).
    pub preamble: Option<Bytes>,
    /// Sent on an idle period.
    pub keepalive: Bytes,
    /// Sent when the server shuts down, before closing.
    pub goodbye: Option<Bytes>,
    /// The pre-encoded bytes of an event for this transport.
    pub pick: fn(&Event) -> &Bytes,
}

/// A response body that streams the feed until it ends.
pub fn streaming_body(feed: Feed, encoding: Encoding) -> Body {
    let state = (feed, encoding, true);
    let stream = futures::stream::unfold(state, |(mut feed, encoding, first)| async move {
        if first && let Some(preamble) = encoding.preamble.clone() {
            return Some((Ok::<Bytes, Infallible>(preamble), (feed, encoding, false)));
        }
        let bytes = match feed.next().await? {
            Frame::Events(batch) => {
                let bytes = concat(&batch, encoding.pick);
                feed.delivered(batch.len(), bytes.len());
                bytes
            }
            Frame::KeepAlive => encoding.keepalive.clone(),
            Frame::Shutdown => encoding.goodbye.clone()?,
        };
        Some((Ok(bytes), (feed, encoding, false)))
    });
    Body::from_stream(stream)
}

fn concat(batch: &[std::sync::Arc<Event>], pick: fn(&Event) -> &Bytes) -> Bytes {
    if let [single] = batch {
        return pick(single).clone();
    }
    let len = batch.iter().map(|e| pick(e).len()).sum();
    let mut out = BytesMut::with_capacity(len);
    for event in batch {
        out.extend_from_slice(pick(event));
    }
    out.freeze()
}
