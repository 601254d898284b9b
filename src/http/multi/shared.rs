//! An event framed once for every multi-stream connection in the same state.
//!
//! A single-stream connection writes an event's pre-encoded bytes, shared by all its
//! clients. A `/_streams` connection cannot: its frame carries the connection's composite id
//! (every stream's place, `position.rs`) and the stream's name. But in a fan-out most
//! connections over the same streams stand at the same places, so their frames of an event
//! are byte for byte the same. The first connection to frame an event keeps its frame on the
//! event ([`Event::shared_frame`](crate::event::Event)) with what made it: transport,
//! envelope, the stream's head, the tag width and every stream's entry in order. Another
//! connection whose state is equal in all of these sends that frame (a reference count, no
//! encoding, no copy); any other frames its own. The state is compared, not hashed, so a
//! connection never sends another's id.

use bytes::Bytes;

use super::position::Entry;
use crate::http::negotiate::Transport;

/// One event's frame and the connection state it was made for.
pub(super) struct SharedFrame {
    transport: Transport,
    enveloped: bool,
    head: Bytes,
    width: usize,
    entries: Vec<(u64, Entry)>,
    frame: Bytes,
}

/// What a connection's frame of an event depends on.
#[derive(Clone, Copy)]
pub(super) struct FrameState<'a, I> {
    pub transport: Transport,
    pub enveloped: bool,
    /// The stream's `{"stream":…,"event":"` head.
    pub head: &'a Bytes,
    /// The composite id's tag width.
    pub width: usize,
    /// Each stream's tag hash and entry, in the connection's order (what the id encodes).
    pub entries: I,
}

impl<'a, I> FrameState<'a, I>
where
    I: Iterator<Item = (u64, &'a Entry)> + Clone,
{
    /// The frame kept for this state, if `kept` was made for an equal one.
    pub fn reuse(&self, kept: &SharedFrame) -> Option<Bytes> {
        let mut entries = self.entries.clone();
        let equal = kept.transport == self.transport
            && kept.enveloped == self.enveloped
            && kept.width == self.width
            && kept.head == *self.head
            && kept.entries.iter().all(|(hash, entry)| {
                entries
                    .next()
                    .is_some_and(|(h, e)| h == *hash && e == entry)
            })
            && entries.next().is_none();
        equal.then(|| kept.frame.clone())
    }

    /// `frame`, made for this state, to keep on the event.
    pub fn keep(&self, frame: Bytes) -> SharedFrame {
        SharedFrame {
            transport: self.transport,
            enveloped: self.enveloped,
            head: self.head.clone(),
            width: self.width,
            entries: self
                .entries
                .clone()
                .map(|(hash, entry)| (hash, entry.clone()))
                .collect(),
            frame,
        }
    }
}

#[cfg(test)]
mod tests {
    use mongodb::bson::Timestamp;

    use super::*;
    use crate::event::{Place, Token};

    fn at(time: u32, increment: u32) -> Entry {
        Entry::Place(Place {
            at: Timestamp { time, increment },
            fields: None,
        })
    }

    fn state<'a>(
        head: &'a Bytes,
        entries: &'a [(u64, Entry)],
    ) -> FrameState<'a, impl Iterator<Item = (u64, &'a Entry)> + Clone> {
        FrameState {
            transport: Transport::Sse,
            enveloped: true,
            head,
            width: 2,
            entries: entries.iter().map(|(hash, entry)| (*hash, entry)),
        }
    }

    #[test]
    fn a_frame_is_reused_only_by_a_connection_in_the_same_state() {
        let head = Bytes::from_static(b"{\"stream\":\"/d/a/_streams/s\",\"event\":\"");
        let entries = vec![(1, at(10, 1)), (2, at(10, 2)), (3, at(9, 7))];
        let kept = state(&head, &entries).keep(Bytes::from_static(b"frame"));

        let same = entries.clone();
        assert_eq!(
            state(&head, &same).reuse(&kept),
            Some(Bytes::from_static(b"frame"))
        );

        // One stream at another place (a connection behind or ahead on it).
        let behind = vec![(1, at(10, 1)), (2, at(10, 2)), (3, at(9, 6))];
        assert_eq!(state(&head, &behind).reuse(&kept), None);
        // The same places in another order (another id), one stream fewer, one more.
        let reordered = vec![(2, at(10, 2)), (1, at(10, 1)), (3, at(9, 7))];
        assert_eq!(state(&head, &reordered).reuse(&kept), None);
        assert_eq!(state(&head, &entries[..2]).reuse(&kept), None);
        let more = [entries.clone(), vec![(4, at(11, 1))]].concat();
        assert_eq!(state(&head, &more).reuse(&kept), None);
        // A stream carried whole (a snapshot id) against its place.
        let whole = vec![
            (1, at(10, 1)),
            (
                2,
                Entry::Whole(Token::after_cluster_time(Timestamp {
                    time: 10,
                    increment: 2,
                })),
            ),
            (3, at(9, 7)),
        ];
        assert_eq!(state(&head, &whole).reuse(&kept), None);

        // Another stream's head, transport, envelope or tag width.
        let other_head = Bytes::from_static(b"{\"stream\":\"/d/b/_streams/s\",\"event\":\"");
        assert_eq!(state(&other_head, &entries).reuse(&kept), None);
        let mut ndjson = state(&head, &entries);
        ndjson.transport = Transport::Ndjson;
        assert_eq!(ndjson.reuse(&kept), None);
        let mut bare = state(&head, &entries);
        bare.enveloped = false;
        assert_eq!(bare.reuse(&kept), None);
        let mut wider = state(&head, &entries);
        wider.width = 3;
        assert_eq!(wider.reuse(&kept), None);
    }
}
