//! The reading side of a relayed worker, on every instance that has the worker (its owner
//! too): an ordered JetStream consumer on the worker's subject whose messages become the
//! steps a cursor would have produced.
//!
//! The first message read is the last one published before the worker started: the worker
//! opens at its position (the ring covers every change after it; an older resume id is
//! served by a catch-up, which reads this same log from the id's place, `window.rs`, with
//! this module's [`Applied`] started after the id, or a MongoDB cursor). A message ending an earlier life of
//! the stream (an `invalidate` the collection has since outlived) is passed over: the next
//! owner's open follows it. After that, a message at or before the last position applied
//! (published twice across a hand-over, outside JetStream's de-duplication) is dropped, so
//! each change reaches the hub once, in order.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::wire::{self, Relayed};
use super::{Relay, owner};
use crate::backoff::Backoff;
use crate::event::Token;
use crate::metrics::now_ms;
use crate::worker::Worker;
use crate::worker::hub::Routed;
use crate::worker::relayed::RelayedSource;
use crate::worker::source::{ChangeRouter, RawChange, Step};

/// One worker's reader of its subject.
pub(super) struct Consumer {
    relay: Arc<Relay>,
    subject: String,
    router: ChangeRouter,
    messages: Option<pull::Ordered>,
    /// Stream sequence of the last message read: a new consumer goes on after it.
    last_sequence: u64,
    /// Where the worker stands in the log (and the rest of a batch being applied).
    applied: Applied,
    backoff: Backoff,
    /// Whether the last attempt failed (the next call waits out the backoff first).
    failed: bool,
    /// Whether the worker must be told it is reading again (after a `Retrying`).
    reopened: bool,
    /// What this instance publishes as the worker's owner (`owner::Local`).
    local: mpsc::Receiver<owner::Local>,
    /// Stream sequence of the last message applied from `local`: JetStream's delivery of
    /// it, and of anything before it, is passed over unread.
    local_through: u64,
}

impl Consumer {
    /// The worker's reader of `subject` (its owner side is started beside it, `mod.rs`).
    pub(super) fn start(
        relay: Arc<Relay>,
        worker: &Arc<Worker>,
        subject: String,
    ) -> Box<dyn RelayedSource> {
        let local = relay.register_reader(&subject);
        Box::new(Consumer {
            relay,
            subject,
            router: ChangeRouter::of_worker(worker),
            messages: None,
            last_sequence: 0,
            applied: Applied::default(),
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(2)),
            failed: false,
            reopened: false,
            local,
            local_through: 0,
        })
    }

    /// The next step (cancel-safe: a message is taken off the consumer only when returned).
    async fn step(&mut self) -> Step<Routed> {
        loop {
            if let Some(step) = self.applied.next_batched() {
                return self.router.route(step);
            }
            if self.failed {
                tokio::time::sleep(self.backoff.next_delay()).await;
                self.failed = false;
            }
            let messages = match &mut self.messages {
                Some(messages) => messages,
                None => match subscribe(
                    Arc::clone(&self.relay),
                    self.subject.clone(),
                    self.last_sequence,
                )
                .await
                {
                    Ok(messages) => self.messages.insert(messages),
                    Err(error) => return self.retry("consume", error),
                },
            };
            if std::mem::take(&mut self.reopened) && self.applied.opened {
                return Step::Opened(self.applied.last.clone());
            }
            let next = tokio::select! {
                message = messages.next() => Next::Delivered(message),
                Some(local) = self.local.recv() => Next::Local(local),
            };
            let message = match next {
                Next::Delivered(Some(Ok(message))) => message,
                Next::Delivered(Some(Err(error))) => {
                    return self.retry("consume", error.to_string());
                }
                Next::Delivered(None) => return self.retry("consume", "the consumer ended".into()),
                Next::Local(local) => {
                    if let Some(step) = self.apply_local(local) {
                        return self.router.route(step);
                    }
                    continue;
                }
            };
            self.backoff.reset();
            if let Ok(info) = message.info() {
                self.last_sequence = info.stream_sequence;
                if info.stream_sequence <= self.local_through {
                    // Applied already, straight from this instance's owner.
                    continue;
                }
            }
            let headers = message.headers.as_ref();
            let relayed = match wire::decode(headers, &message.payload) {
                Ok(relayed) => relayed,
                Err(error) => {
                    self.relay.metrics().relay.error("consume");
                    tracing::warn!(subject = %self.subject, %error, "relay: message passed over");
                    continue;
                }
            };
            // One observation per change, batched or not.
            let changes = match &relayed {
                Relayed::Change(_) => 1,
                Relayed::Changes(raws) => raws.len(),
                _ => 0,
            };
            if let Some(published) = wire::published_ms(headers) {
                let lag = now_ms().saturating_sub(published);
                for _ in 0..changes {
                    self.relay.metrics().relay.delivery_lag.observe_ms(lag);
                }
            }
            if let Some(step) = self.applied.read(relayed) {
                return self.router.route(step);
            }
        }
    }

    /// A message this instance just published as owner: applied now when it is the next one
    /// of the subject this reader would read (it has read everything before it), else
    /// passed over (JetStream delivers it in its turn).
    fn apply_local(&mut self, local: owner::Local) -> Option<Step<RawChange>> {
        if !self.applied.opened || local.previous != self.last_sequence {
            return None;
        }
        self.last_sequence = local.sequence;
        self.local_through = local.sequence;
        let lag = now_ms().saturating_sub(local.published);
        let metrics = &self.relay.metrics().relay;
        for _ in 0..local.changes.len() {
            metrics.delivery_lag.observe_ms(lag);
        }
        metrics.applied_as_owner.inc_by(local.changes.len() as u64);
        self.applied.read(Relayed::Changes(local.changes))
    }

    /// Drops the consumer and reports a transient error; the next call subscribes again
    /// after the last message read.
    fn retry(&mut self, op: &'static str, error: String) -> Step<Routed> {
        self.relay.metrics().relay.error(op);
        self.messages = None;
        self.failed = true;
        self.reopened = true;
        Step::Retrying(format!("relay: {error}"))
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // Closed first, so that the registry sees this reader gone.
        self.local.close();
        self.relay.unregister_reader(&self.subject);
    }
}

/// What a reader waits for.
enum Next<M> {
    /// JetStream delivered a message (or the consumer failed or ended).
    Delivered(Option<M>),
    /// This instance published a message as owner.
    Local(owner::Local),
}

/// An ordered consumer of `subject` from after `last_sequence` (0: from its last message).
async fn subscribe(
    relay: Arc<Relay>,
    subject: String,
    last_sequence: u64,
) -> Result<pull::Ordered, String> {
    let handles = relay.handles().await.map_err(|e| e.to_string())?;
    let deliver_policy = match last_sequence {
        0 => DeliverPolicy::LastPerSubject,
        last => DeliverPolicy::ByStartSequence {
            start_sequence: last + 1,
        },
    };
    let consumer = handles
        .stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subject,
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    consumer.messages().await.map_err(|e| e.to_string())
}

/// Where a reader of a worker's log stands: what each message read means to it. The worker's
/// consumer starts unopened (its first message opens it); a catch-up reading the retained
/// window (`window.rs`) starts [`Applied::after`] its client's position.
#[derive(Debug, Default)]
pub(super) struct Applied {
    /// Whether the reader has opened (its first message was read).
    opened: bool,
    /// The last position applied.
    last: Option<Token>,
    /// The rest of a `changes` message read (applied one step at a time, before the next
    /// message; kept here so that a future dropped between two steps loses none).
    batched: VecDeque<RawChange>,
}

impl Applied {
    /// A reader that has applied everything through `position`: what the log holds at or
    /// before it is passed over.
    pub(super) fn after(position: Token) -> Applied {
        Applied {
            opened: true,
            last: Some(position),
            batched: VecDeque::new(),
        }
    }

    /// What a message read means to the reader, if anything: a `changes` message, once
    /// opened, is applied change by change (the first now, the rest by
    /// [`Applied::next_batched`] before the next message).
    pub(super) fn read(&mut self, relayed: Relayed) -> Option<Step<RawChange>> {
        match relayed {
            Relayed::Changes(raws) if self.opened => {
                self.batched.extend(raws);
                self.next_batched()
            }
            relayed => self.accept(relayed),
        }
    }

    /// The next step of a batch being applied, if any is left.
    pub(super) fn next_batched(&mut self) -> Option<Step<RawChange>> {
        while let Some(raw) = self.batched.pop_front() {
            if let Some(step) = self.accept(Relayed::Change(raw)) {
                return Some(step);
            }
        }
        None
    }

    /// What one message (a batch as a whole) means to the reader, if anything.
    fn accept(&mut self, relayed: Relayed) -> Option<Step<RawChange>> {
        if !self.opened {
            // Where the log stood when the worker started: it covers what follows.
            let start = relayed.token().filter(|_| !relayed.is_end())?.clone();
            self.opened = true;
            self.last = Some(start.clone());
            return Some(Step::Opened(Some(start)));
        }
        if let Some(token) = relayed.token() {
            if self.last.as_ref().is_some_and(|last| token <= last) {
                return None;
            }
            self.last = Some(token.clone());
        }
        Some(match relayed {
            Relayed::Change(raw) => Step::Change(raw),
            // The consumer applies a batch change by change; read as one message, it stands for
            // its last change (as the first message read, where it opens the worker).
            Relayed::Changes(mut raws) => Step::Change(raws.pop()?),
            Relayed::Mark(token) => Step::Quiet(Some(token)),
            Relayed::Invalidate(event) => Step::Invalidated(event),
            Relayed::Failed(code, message) => Step::Failed(code, message),
        })
    }
}

impl RelayedSource for Consumer {
    fn next(&mut self) -> BoxFuture<'_, Step<Routed>> {
        Box::pin(self.step())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ErrorCode, Event, EventKind};
    use mongodb::bson::doc;

    fn token(n: u8) -> Token {
        Token::parse(&format!("8263A1B2C3000000{n:02X}2B022C0100296E5A1004AB")).unwrap()
    }

    fn change(n: u8) -> Relayed {
        let id = token(n);
        Relayed::Change(RawChange {
            doc: doc! { "_id": { "_data": id.as_str() }, "operationType": "insert", "fullDocument": { "n": i32::from(n) } },
            id,
            skipped: false,
        })
    }

    fn id_of(step: Option<Step<RawChange>>) -> Option<Token> {
        match step? {
            Step::Change(raw) => Some(raw.id),
            other => panic!("expected a change, got {other:?}"),
        }
    }

    #[test]
    fn the_first_message_opens_and_later_ones_apply_once_in_order() {
        let mut applied = Applied::default();
        assert!(matches!(applied.accept(change(5)), Some(Step::Opened(Some(t))) if t == token(5)));
        assert_eq!(id_of(applied.accept(change(6))), Some(token(6)));
        // Published again across a hand-over (outside de-duplication): dropped.
        assert_eq!(id_of(applied.accept(change(6))), None);
        assert_eq!(id_of(applied.accept(change(4))), None);
        // A position at or before the last change means nothing; after it, a quiet step.
        assert!(applied.accept(Relayed::Mark(token(6))).is_none());
        assert!(
            matches!(applied.accept(Relayed::Mark(token(7))), Some(Step::Quiet(Some(t))) if t == token(7))
        );
        assert_eq!(id_of(applied.accept(change(8))), Some(token(8)));
        assert!(matches!(
            applied.accept(Relayed::Failed(ErrorCode::HistoryLost, "gone".into())),
            Some(Step::Failed(ErrorCode::HistoryLost, _))
        ));
    }

    #[test]
    fn a_reader_started_after_a_position_skips_what_is_at_or_before_it_even_inside_a_batch() {
        let batch = |ns: std::ops::RangeInclusive<u8>| {
            Relayed::Changes(
                ns.map(|n| match change(n) {
                    Relayed::Change(raw) => raw,
                    _ => unreachable!(),
                })
                .collect(),
            )
        };
        let mut applied = Applied::after(token(5));
        assert!(applied.read(change(4)).is_none());
        assert!(applied.read(Relayed::Mark(token(5))).is_none());
        // A batch holding the position: only what follows it.
        assert_eq!(id_of(applied.read(batch(3..=7))), Some(token(6)));
        assert_eq!(id_of(applied.next_batched()), Some(token(7)));
        assert!(applied.next_batched().is_none());
        // Published again across a hand-over: nothing twice.
        assert!(applied.read(batch(6..=7)).is_none());
        assert_eq!(id_of(applied.read(batch(7..=8))), Some(token(8)));
        assert!(applied.next_batched().is_none());
    }

    #[test]
    fn an_end_of_an_earlier_life_of_the_stream_is_passed_over() {
        let mut applied = Applied::default();
        let ended = Event::control(EventKind::Invalidate, "dropped", false);
        assert!(
            applied
                .accept(Relayed::Invalidate(Arc::new(ended)))
                .is_none()
        );
        assert!(!applied.opened);
        assert!(
            matches!(applied.accept(Relayed::Mark(token(9))), Some(Step::Opened(Some(t))) if t == token(9))
        );
        let ended = Event::control(EventKind::Invalidate, "dropped", false);
        assert!(matches!(
            applied.accept(Relayed::Invalidate(Arc::new(ended))),
            Some(Step::Invalidated(_))
        ));
    }
}
