//! A catch-up read from JetStream's retained window: a client whose id is older than its
//! worker's ring gets the changes after it from the worker's subject, which every instance
//! can read, rather than from a MongoDB cursor of its own (issue 22: "resume from the local
//! ring, then from JetStream's retained window, then from a MongoDB catch-up cursor").
//!
//! * **Covered.** The window serves a position T when the subject's first retained message is
//!   at or before T: the log is one unbroken run of the owners' cursors from there on (each
//!   owner resumes after the log's last message), so retention dropped nothing after T. Not
//!   covered, the catch-up opens its MongoDB cursor as without the relay: T before the first
//!   retained message (older than retention, or than the relay), T after the end of an
//!   earlier life of the stream (an `invalidate`, after which the next owner opened at "now",
//!   so changes between the two are in no log), a message the search cannot place (a
//!   `failed` end, a message this relay did not write), or NATS failing while locating.
//! * **Located in few round trips.** A binary search by stream sequence ([`locate`]), each
//!   probe a direct get of the subject's next message at or after a sequence, compared by its
//!   `Sg-Token` header alone: about 2 + log2(the subject's span of the stream) requests (22
//!   for a million messages). It ends with two neighbours of the subject: the last message at
//!   or before T (never an end: that would put T between two lives) and the first after it,
//!   where an ordered consumer (`DeliverPolicy::ByStartSequence`) starts reading.
//! * **Each change once, in order.** The first step is `Opened(Some(T))`, as a cursor's; the
//!   messages then go through the consumer's own [`Applied`], started after T, which drops
//!   whatever is at or before the last position given (the changes of a batch at or before T,
//!   a change two owners both published across a hand-over), exactly as every worker's
//!   consumer does. An `invalidate` or `failed` read ends the catch-up as a cursor's would.
//!   The consumer's rule for an *earlier life* (an end read as the first message is passed
//!   over) does not apply here: the search never starts a read at an end it could not place
//!   before T, and a read that reaches an end reaches the end of T's own life.
//! * **Retention while reading.** A slow catch-up may still be reading when JetStream drops
//!   old messages (`retention_secs`, `max_bytes`, oldest first). The stream drops only from its
//!   front, so before messages are applied the source checks, once per group of messages
//!   read together, that the stream's first sequence is not past the last message it had
//!   read (skipped when their sequences follow each other: nothing between them could have
//!   gone). When it is, or NATS fails, the source gives up (`None`) and the catch-up goes on
//!   from MongoDB after the last position it gave: nothing lost or repeated.
//! * **The search relies on order.** A subject's positions grow with its stream sequence: a
//!   new owner resumes after the log's last message, and every owner publishes expecting the
//!   subject's last sequence it knows (`owner.rs`, `publish`), so an owner frozen past its
//!   lease cannot append, once it thaws, a batch its successor already published. (Before
//!   that rule, such a late duplicate could sit after newer messages, and a probe landing on
//!   it would have placed the start after changes only an earlier message held.)

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};

use super::Relay;
use super::consumer::Applied;
use super::wire::{self, Placement, Relayed};
use crate::event::Token;
use crate::worker::hub::Routed;
use crate::worker::relayed::WindowSource;
use crate::worker::source::{ChangeRouter, Step};

/// Longest the search for the start may take before the catch-up asks MongoDB instead.
const LOCATE_TIMEOUT: Duration = Duration::from_secs(3);

/// Messages taken off the consumer at once, then checked against retention together (each
/// holds up to 1,000 changes, or 256 KiB).
const READ_AHEAD: usize = 16;

/// A subject's log as the search sees it.
trait Log {
    /// The subject's first message at or after stream sequence `sequence` (its sequence and
    /// placement); `None` when there is none.
    async fn next_from(&mut self, sequence: u64) -> Result<Option<(u64, Placement)>, String>;
    /// The subject's first retained message.
    async fn first(&mut self) -> Result<Option<(u64, Placement)>, String>;
    /// The subject's last message.
    async fn last(&mut self) -> Result<Option<(u64, Placement)>, String>;
}

/// Where a window read starts.
#[derive(Debug, PartialEq, Eq)]
enum Located {
    /// At this stream sequence: the subject's first message after the position (the one
    /// after the subject's last message when none is yet).
    From(u64),
    /// The window cannot serve the position, and why (for the log).
    Uncovered(&'static str),
}

/// On which side of a position a message stands.
enum Side {
    /// At or before it; `end`: the message ended a life of the stream there.
    AtOrBefore {
        end: bool,
    },
    After,
}

fn side(placement: &Placement, after: &Token) -> Option<Side> {
    let (position, end) = match placement {
        Placement::At(position) => (position, false),
        Placement::EndAt(position) => (position, true),
        Placement::Unknown => return None,
    };
    Some(if position <= after {
        Side::AtOrBefore { end }
    } else {
        Side::After
    })
}

/// Where to read the subject from to get every step after `after`: binary search by stream
/// sequence for the two neighbours around it (module doc).
async fn locate(log: &mut impl Log, after: &Token) -> Result<Located, String> {
    const UNPLACEABLE: &str = "a message of the log cannot be placed";
    let Some((first, placement)) = log.first().await? else {
        return Ok(Located::Uncovered("the log holds nothing"));
    };
    // `lo`: a message at or before `after`; `lo_end`: it is an end.
    let (mut lo, mut lo_end) = match side(&placement, after) {
        Some(Side::AtOrBefore { end }) => (first, end),
        Some(Side::After) => return Ok(Located::Uncovered("the log starts after it")),
        None => return Ok(Located::Uncovered(UNPLACEABLE)),
    };
    let Some((last, placement)) = log.last().await? else {
        return Ok(Located::Uncovered("the log holds nothing"));
    };
    // `hi`: the first message known to be after `after` (past the last one: none yet);
    // `bound`: the subject holds no message in [bound, hi). Unknown: (lo, bound).
    let mut hi = last + 1;
    match side(&placement, after) {
        Some(Side::AtOrBefore { end }) => (lo, lo_end) = (last, end),
        Some(Side::After) => hi = last,
        None => return Ok(Located::Uncovered(UNPLACEABLE)),
    }
    let mut bound = hi;
    while lo + 1 < bound {
        let middle = lo + (bound - lo) / 2;
        match log.next_from(middle).await? {
            Some((sequence, placement)) if sequence < bound => match side(&placement, after) {
                Some(Side::AtOrBefore { end }) => (lo, lo_end) = (sequence, end),
                Some(Side::After) => (hi, bound) = (sequence, sequence),
                None => return Ok(Located::Uncovered(UNPLACEABLE)),
            },
            // Nothing of the subject in [middle, bound).
            _ => bound = middle,
        }
    }
    if lo_end {
        return Ok(Located::Uncovered(
            "it is past the end of an earlier life of the stream",
        ));
    }
    Ok(Located::From(hi))
}

/// The worker's subject, read by direct gets.
struct Subject<'a> {
    stream: &'a Stream,
    subject: &'a str,
}

type Found = Result<Option<(u64, Placement)>, String>;

fn found(
    message: Result<
        async_nats::jetstream::message::StreamMessage,
        async_nats::jetstream::stream::DirectGetError,
    >,
) -> Found {
    match message {
        Ok(message) => Ok(Some((
            message.sequence,
            wire::placement(Some(&message.headers)),
        ))),
        Err(error) if error.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(error) => Err(error.to_string()),
    }
}

impl Log for Subject<'_> {
    async fn next_from(&mut self, sequence: u64) -> Found {
        found(
            self.stream
                .direct_get_next_for_subject(self.subject, Some(sequence))
                .await,
        )
    }

    async fn first(&mut self) -> Found {
        found(self.stream.direct_get_first_for_subject(self.subject).await)
    }

    async fn last(&mut self) -> Found {
        found(self.stream.direct_get_last_for_subject(self.subject).await)
    }
}

/// A catch-up's reader of the worker's subject from after its start.
pub(super) struct Window {
    relay: Arc<Relay>,
    stream: Stream,
    subject: String,
    router: ChangeRouter,
    /// The catch-up's start, until `Opened` for it was given.
    opening: Option<Token>,
    /// What the catch-up has been given (drops what is at or before it).
    applied: Applied,
    messages: pull::Ordered,
    /// Stream sequence of the last message taken off the consumer.
    last_sequence: u64,
    /// Messages taken off the consumer, not yet checked against retention (sequence, message).
    unchecked: Vec<(u64, Relayed)>,
    /// Messages checked, not yet applied.
    checked: VecDeque<Relayed>,
}

impl Window {
    /// A reader of `subject` after `after`, when the retained log covers it (`None`: the
    /// catch-up asks MongoDB).
    pub(super) async fn open(
        relay: Arc<Relay>,
        subject: String,
        router: ChangeRouter,
        after: Token,
    ) -> Option<Box<dyn WindowSource>> {
        use crate::worker::relayed::Relay as _;
        if !relay.reachable() {
            // Not worth a client's wait for the search's timeout.
            return None;
        }
        let located = async {
            let handles = relay.handles().await.map_err(|e| e.to_string())?;
            let mut log = Subject {
                stream: &handles.stream,
                subject: &subject,
            };
            let located = locate(&mut log, &after).await?;
            Ok::<_, String>((handles.stream.clone(), located))
        };
        let (stream, start) = match tokio::time::timeout(LOCATE_TIMEOUT, located).await {
            Ok(Ok((stream, Located::From(start)))) => (stream, start),
            Ok(Ok((_, Located::Uncovered(why)))) => {
                tracing::debug!(%subject, why, "relay: the retained log cannot serve a catch-up; MongoDB will");
                return None;
            }
            Ok(Err(error)) => return relay.window_failed(&subject, &error),
            Err(_) => return relay.window_failed(&subject, "locating the start timed out"),
        };
        let messages = async {
            stream
                .create_consumer(pull::OrderedConfig {
                    filter_subject: subject.clone(),
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: start,
                    },
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?
                .messages()
                .await
                .map_err(|e| e.to_string())
        };
        let messages = match messages.await {
            Ok(messages) => messages,
            Err(error) => return relay.window_failed(&subject, &error),
        };
        tracing::debug!(%subject, start, "relay: a catch-up reads the retained log");
        Some(Box::new(Window {
            relay,
            stream,
            subject,
            router,
            opening: Some(after.clone()),
            applied: Applied::after(after),
            messages,
            last_sequence: start.saturating_sub(1),
            unchecked: Vec::new(),
            checked: VecDeque::new(),
        }))
    }

    /// The next step; `None`: the catch-up goes on from MongoDB.
    async fn step(&mut self) -> Option<Step<Routed>> {
        if let Some(after) = self.opening.take() {
            return Some(Step::Opened(Some(after)));
        }
        loop {
            if let Some(step) = self.applied.next_batched() {
                return Some(self.router.route(step));
            }
            if let Some(relayed) = self.checked.pop_front() {
                if let Some(step) = self.applied.read(relayed) {
                    return Some(self.router.route(step));
                }
                continue;
            }
            if self.unchecked.is_empty() {
                self.take_messages().await?;
            }
            self.check_retention().await?;
        }
    }

    /// Takes the next message off the consumer (waiting for it), and those already here.
    async fn take_messages(&mut self) -> Option<()> {
        let first = self.messages.next().await;
        self.take(first)?;
        while self.unchecked.len() < READ_AHEAD {
            match self.messages.next().now_or_never() {
                None => break,
                Some(message) => self.take(message)?,
            }
        }
        Some(())
    }

    fn take(
        &mut self,
        message: Option<Result<async_nats::jetstream::Message, pull::OrderedError>>,
    ) -> Option<()> {
        let message = match message {
            Some(Ok(message)) => message,
            Some(Err(error)) => return self.give_up(&error.to_string()),
            None => return self.give_up("the consumer ended"),
        };
        let sequence = match message.info() {
            Ok(info) => info.stream_sequence,
            Err(error) => return self.give_up(&error.to_string()),
        };
        // A message this relay cannot read is one the catch-up cannot vouch for: MongoDB can.
        match wire::decode(message.headers.as_ref(), &message.payload) {
            Ok(relayed) => self.unchecked.push((sequence, relayed)),
            Err(error) => return self.give_up(&error.to_string()),
        }
        Some(())
    }

    /// Moves the messages taken to `checked` once it is sure retention dropped none before
    /// them (module doc).
    async fn check_retention(&mut self) -> Option<()> {
        let follows = self
            .unchecked
            .iter()
            .zip(self.last_sequence..)
            .all(|((sequence, _), previous)| *sequence == previous + 1);
        if !follows {
            let info = match self.stream.get_info().await {
                Ok(info) => info,
                Err(error) => return self.give_up(&error.to_string()),
            };
            if info.state.first_sequence > self.last_sequence + 1 {
                tracing::info!(subject = %self.subject, "relay: retention dropped messages a catch-up had yet to read; it goes on from MongoDB");
                self.unchecked.clear();
                return None;
            }
        }
        for (sequence, relayed) in self.unchecked.drain(..) {
            self.last_sequence = sequence;
            self.checked.push_back(relayed);
        }
        Some(())
    }

    fn give_up(&mut self, error: &str) -> Option<()> {
        self.unchecked.clear();
        self.relay.window_failed::<()>(&self.subject, error)
    }
}

impl WindowSource for Window {
    fn next(&mut self) -> BoxFuture<'_, Option<Step<Routed>>> {
        Box::pin(self.step())
    }
}

impl Relay {
    /// Counts and logs a failure of the retained window (the catch-up asks MongoDB).
    fn window_failed<T>(&self, subject: &str, error: &str) -> Option<T> {
        self.metrics().relay.error("window");
        tracing::warn!(%subject, %error, "relay: cannot read the retained log for a catch-up; MongoDB serves it");
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(n: u32) -> Token {
        Token::parse(&format!("8200000001{n:08}")).unwrap()
    }

    /// A subject's messages in a stream shared with others: (sequence, placement).
    struct Synthetic {
        messages: Vec<(u64, Placement)>,
        requests: usize,
    }

    impl Synthetic {
        /// One message of the subject every `stride` sequences from 10, at these positions.
        fn of(positions: &[Placement], stride: u64) -> Synthetic {
            Synthetic {
                messages: (10..)
                    .step_by(stride as usize)
                    .zip(positions.iter().cloned())
                    .collect(),
                requests: 0,
            }
        }

        fn at(&self, n: usize) -> u64 {
            self.messages[n].0
        }
    }

    impl Log for Synthetic {
        async fn next_from(&mut self, sequence: u64) -> Found {
            self.requests += 1;
            Ok(self.messages.iter().find(|(s, _)| *s >= sequence).cloned())
        }

        async fn first(&mut self) -> Found {
            self.requests += 1;
            Ok(self.messages.first().cloned())
        }

        async fn last(&mut self) -> Found {
            self.requests += 1;
            Ok(self.messages.last().cloned())
        }
    }

    fn at(n: u32) -> Placement {
        Placement::At(token(n))
    }

    async fn located(log: &mut Synthetic, after: u32) -> Located {
        locate(log, &token(after)).await.unwrap()
    }

    #[tokio::test]
    async fn the_start_is_the_first_message_after_the_position_found_in_few_requests() {
        // 1,000 messages at positions 10, 20, …, interleaved with other subjects'.
        let positions: Vec<Placement> = (1..=1_000).map(|n| at(n * 10)).collect();
        for after in [10, 15, 20, 4_990, 5_000, 9_990] {
            let mut log = Synthetic::of(&positions, 3);
            // The first message after `after`.
            let index = (after / 10) as usize;
            assert_eq!(
                located(&mut log, after).await,
                Located::From(log.at(index)),
                "{after}"
            );
            assert!(log.requests <= 2 + 13, "{after}: {} requests", log.requests);
        }
        // At or after the last message: read whatever comes next.
        for after in [10_000, 10_005] {
            let mut log = Synthetic::of(&positions, 3);
            let past_last = log.at(999) + 1;
            assert_eq!(located(&mut log, after).await, Located::From(past_last));
            assert_eq!(log.requests, 2, "the first and the last message");
        }
        // One message, at the position.
        let mut log = Synthetic::of(&[at(7)], 1);
        assert_eq!(located(&mut log, 7).await, Located::From(11));
    }

    #[tokio::test]
    async fn the_window_covers_only_positions_at_or_after_its_first_message() {
        let positions: Vec<Placement> = (1..=100).map(|n| at(n * 10)).collect();
        // Older than the first retained message (retention dropped the start, or the relay
        // began after it).
        let mut log = Synthetic::of(&positions, 1);
        assert!(matches!(located(&mut log, 9).await, Located::Uncovered(_)));
        assert_eq!(log.requests, 1);
        // Nothing retained.
        let mut log = Synthetic::of(&[], 1);
        assert!(matches!(located(&mut log, 9).await, Located::Uncovered(_)));
        // The first message is exactly the position: covered.
        let mut log = Synthetic::of(&positions, 1);
        assert_eq!(located(&mut log, 10).await, Located::From(11));
    }

    #[tokio::test]
    async fn lives_of_the_stream_and_unplaceable_messages() {
        // Life one: 10..=50, its invalidate at 55; life two opens at 80 ("now" for the next
        // owner): changes between 55 and 80 are in no log.
        let log = || {
            Synthetic::of(
                &[
                    at(10),
                    at(20),
                    at(30),
                    at(40),
                    at(50),
                    Placement::EndAt(token(55)),
                    at(80),
                    at(90),
                    at(100),
                ],
                1,
            )
        };
        // Before the end: read on to it (it ends the catch-up, as a cursor's would).
        assert_eq!(located(&mut log(), 50).await, Located::From(15));
        assert_eq!(located(&mut log(), 52).await, Located::From(15));
        // Between the two lives: MongoDB.
        for after in [55, 60, 79] {
            assert!(
                matches!(located(&mut log(), after).await, Located::Uncovered(_)),
                "{after}"
            );
        }
        // In the second life.
        assert_eq!(located(&mut log(), 80).await, Located::From(17));
        assert_eq!(located(&mut log(), 95).await, Located::From(18));
        // An end found first, before the position: the next life covers it.
        let mut log = Synthetic::of(&[Placement::EndAt(token(5)), at(10), at(20)], 1);
        assert_eq!(located(&mut log, 15).await, Located::From(12));
        // A message the search cannot place (a `failed`, a foreign one), when probed: MongoDB.
        let mut log = Synthetic::of(&[at(10), Placement::Unknown, at(30)], 1);
        assert!(matches!(located(&mut log, 25).await, Located::Uncovered(_)));
        let mut log = Synthetic::of(&[Placement::Unknown, at(30)], 1);
        assert!(matches!(located(&mut log, 35).await, Located::Uncovered(_)));
    }
}
