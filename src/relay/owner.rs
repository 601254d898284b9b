//! The owner side of a relayed worker: contend for its lease; while holding it, read the
//! worker's MongoDB cursor and publish every step to the worker's subject.
//!
//! The contention (placement, lease, hand-over, takeover) is the same for whatever an owner
//! reads: a [`Unit`] is one worker's cursor ([`StreamCursor`], here) or a database feed's
//! (`feed/`), each with its own turn as owner.
//!
//! Who contends: the instance the fleet's placement (`membership.rs`) names for the worker
//! takes a free lease at once, and a lease held by an instance whose heartbeat expired without
//! waiting for the lease to; any other instance that has the worker only once the lease has
//! been free for `takeover_grace_ms` (the named one cannot take it, or the views differ for a
//! moment). An owner the placement no longer names (an instance joined, or it took the lease
//! in the grace) hands it over: it stops reading, publishes its last position, releases the
//! lease, and the named instance goes on from there.
//!
//! A new owner resumes from the last message of the subject (a change's token or a marked
//! position): what the last owner published is where the fleet stands. Whatever goes wrong
//! while owning (a publish not acknowledged, the lease lost) ends the turn: the cursor is
//! dropped and the instance contends again, resuming, if it wins, from the subject's last
//! message once more. JetStream's de-duplication by resume token makes those re-reads
//! publish nothing twice, and each publish expects the subject's last sequence the owner
//! knows, so an owner whose lease ran out while it was frozen appends nothing after its
//! successor's messages (the subject's positions grow with its sequence).
//!
//! An owner's cursor carries a comment naming the worker and the instance, so that a new
//! owner can end the cursor a killed one left idle on mongod ([`kill_orphans`]).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use futures::{FutureExt, TryStreamExt};
use mongodb::bson::{Document, doc};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::lease::{Lease, Renewal};
use super::membership::{Membership, View};
use super::wire::{self, Outbound};
use super::{Handles, Relay};
use crate::backoff::Backoff;
use crate::event::{ErrorCode, Token};
use crate::metrics::now_ms;
use crate::worker::Worker;
use crate::worker::source::{ChangeSource, RawChange, Step, Watch};

/// How a turn as owner ended.
pub(super) enum Outcome {
    /// The worker stopped (retired, evicted, shut down): release the lease.
    Cancelled,
    /// Another instance holds the lease now.
    Lost,
    /// The stream ended (invalidate, or an error retrying cannot fix) and that was published.
    Ended,
    /// JetStream did not take a message (or could not say where the log stands).
    Unpublished,
    /// The placement names another instance: the last position is published, the lease is
    /// to be released.
    HandedOver,
}

/// Changes this instance published as owner, handed straight to its own reader of the
/// subject (`consumer.rs`, [`Relay::hand_to_reader`]), which applies them without waiting for
/// JetStream to deliver what it just acknowledged, when it has read everything before them.
#[derive(Debug)]
pub(super) struct Local {
    /// The subject's message before this one (the sequence the publish expected).
    pub previous: u64,
    /// This message's stream sequence.
    pub sequence: u64,
    /// When it was published, Unix ms.
    pub published: u64,
    /// Its changes, in order.
    pub changes: Vec<RawChange>,
}

/// Starts contending for `worker`'s cursor, on its tracker, until the worker stops.
pub(super) fn spawn(relay: Arc<Relay>, worker: &Arc<Worker>, subject: String, key: String) {
    let worker = Arc::clone(worker);
    let tracker = worker.tracker().clone();
    tracker.spawn(async move {
        // Announced in this instance's heartbeat while the worker runs.
        Membership::want(&relay, &key);
        let cancel = worker.cancel_token().clone();
        let unit = StreamCursor { worker, subject };
        Contender::new(&relay, &unit, &key).run(&cancel).await;
        Membership::unwant(&relay, &key).await;
    });
}

/// What an owner reads for the fleet: one worker's cursor ([`StreamCursor`]), or a database
/// feed's (`feed/`).
pub(super) trait Unit: Sync {
    /// Name in logs.
    fn label(&self) -> String;

    /// One turn as owner: reads and publishes until something ends it. Gives the lease back
    /// when it may still be held.
    fn own<'a>(
        &'a self,
        turn: Turn<'a>,
        lease: Lease,
        view: &'a mut watch::Receiver<Arc<View>>,
        cancel: &'a CancellationToken,
    ) -> impl Future<Output = (Outcome, Option<Lease>)> + Send + 'a;
}

/// A relayed worker's own cursor.
struct StreamCursor {
    worker: Arc<Worker>,
    subject: String,
}

impl Unit for StreamCursor {
    fn label(&self) -> String {
        self.worker.key.stream.to_string()
    }

    fn own<'a>(
        &'a self,
        turn: Turn<'a>,
        lease: Lease,
        view: &'a mut watch::Receiver<Arc<View>>,
        cancel: &'a CancellationToken,
    ) -> impl Future<Output = (Outcome, Option<Lease>)> + Send + 'a {
        turn.own_stream(&self.worker, &self.subject, lease, view, cancel)
    }
}

/// At most this many changes the cursor held together go out as one message.
pub(super) const BATCH_CHANGES: usize = 1_000;

/// A batch of changes stays under this many bytes (JetStream's default `max_payload` is 1 MB;
/// a single change may pass it, as without batching).
pub(super) const BATCH_BYTES: usize = 256 * 1024;

/// Longest an owner that keeps taking leases in the grace keeps one before handing it over
/// again, in lease lifetimes.
const MAX_HOLD_LIFETIMES: u32 = 32;

/// One unit's contention for its cursor on this instance.
pub(super) struct Contender<'a, U: Unit> {
    relay: &'a Relay,
    unit: &'a U,
    key: &'a str,
    view: watch::Receiver<Arc<View>>,
    backoff: Backoff,
    /// Since when this instance has seen the lease free (for the grace).
    free_since: Option<Instant>,
    /// How long an owner keeps a lease before handing it over: one lifetime, doubled for
    /// each lease in a row taken in the grace (so that an instance the placement names but
    /// that cannot take it costs a pause per hand-over attempt, ever more rarely).
    hold: Duration,
}

impl<'a, U: Unit> Contender<'a, U> {
    /// A contender for `unit`'s lease `key`.
    pub(super) fn new(relay: &'a Relay, unit: &'a U, key: &'a str) -> Self {
        let ttl = relay.settings.lease_ttl();
        Contender {
            relay,
            unit,
            key,
            view: relay.membership.subscribe(),
            backoff: Backoff::new(Duration::from_millis(100), ttl),
            free_since: None,
            hold: ttl,
        }
    }

    /// Contends (and owns, when it wins) until `cancel` (the unit stopped).
    pub(super) async fn run(&mut self, cancel: &CancellationToken) {
        let ttl = self.relay.settings.lease_ttl();
        // Others look a few times per lease lifetime; the instance the placement names, twice
        // as often (it waits for a hand-over, a killed owner's heartbeat to expire, or the
        // lease to).
        let (poll, poll_named) = (ttl / 4, ttl / 8);
        loop {
            let named = self.view.borrow_and_update().assignee(self.key)
                == Some(self.relay.instance.as_str());
            let wait = match self.relay.handles().await {
                Err(error) => {
                    self.relay.metrics().relay.error("connect");
                    tracing::warn!(%error, "relay: JetStream not available yet");
                    Some(self.backoff.next_delay())
                }
                Ok(handles) => {
                    if named || self.free_long_enough(&handles).await {
                        self.try_own(&handles, named, cancel).await
                    } else {
                        Some(poll)
                    }
                }
            };
            let Some(wait) = wait else {
                return;
            };
            let wait = if named { wait.min(poll_named) } else { wait };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                // The placement changed: this instance may be the one named now.
                Ok(()) = self.view.changed() => {}
            }
        }
    }

    /// Whether the lease has been free for the grace (as this instance saw it).
    async fn free_long_enough(&mut self, handles: &Handles) -> bool {
        match lease_is_free(&handles.leases, self.key).await {
            Ok(false) => {
                self.free_since = None;
                false
            }
            Ok(true) => {
                let since = *self.free_since.get_or_insert_with(Instant::now);
                since.elapsed() >= self.relay.settings.takeover_grace()
            }
            Err(error) => {
                self.relay.metrics().relay.error("lease");
                tracing::warn!(%error, "relay: cannot read a cursor lease");
                false
            }
        }
    }

    /// Tries to take the lease and, if taken, owns the cursor for a turn. Returns how long
    /// to wait before the next try, `None` once the worker is over.
    async fn try_own(
        &mut self,
        handles: &Handles,
        named: bool,
        cancel: &CancellationToken,
    ) -> Option<Duration> {
        let relay = self.relay;
        let ttl = relay.settings.lease_ttl();
        let taken = Lease::try_take(&handles.leases, self.key, &relay.instance, ttl)
            .await
            .map_err(|error| error.to_string());
        let taken = match taken {
            // Held: by an instance that is gone (killed), the one the placement names takes it
            // now rather than when it expires (`instance_ttl_ms` is shorter than the lease).
            Ok(None) if named => {
                let view = Arc::clone(&self.view.borrow());
                let is_gone = |holder: &str| view.is_gone(holder);
                Lease::try_take_from_gone(&handles.leases, self.key, &relay.instance, ttl, is_gone)
                    .await
            }
            other => other,
        };
        let lease = match taken {
            Ok(None) => return Some(ttl / 4),
            Err(error) => {
                relay.metrics().relay.error("lease");
                tracing::warn!(%error, "relay: cannot ask for a cursor lease");
                return Some(self.backoff.next_delay());
            }
            Ok(Some(lease)) => lease,
        };
        self.backoff.reset();
        self.free_since = None;
        let hold = self.hold;
        self.hold = if named {
            ttl
        } else {
            (self.hold * 2).min(ttl * MAX_HOLD_LIFETIMES)
        };
        let metrics = &relay.metrics().relay;
        metrics.takeovers.inc();
        metrics.owned_cursors.inc();
        let label = self.unit.label();
        tracing::info!(stream = %label, key = self.key, named, "relay: this instance reads the cursor for the fleet");
        let turn = Turn {
            relay,
            handles,
            key: self.key,
            hold,
        };
        let (outcome, lease) = self.unit.own(turn, lease, &mut self.view, cancel).await;
        metrics.owned_cursors.dec();
        if let Some(lease) = lease {
            lease.release().await;
        }
        match outcome {
            Outcome::Cancelled => None,
            Outcome::Ended => {
                // The consumers (this instance's too) end the worker.
                cancel.cancelled().await;
                None
            }
            Outcome::Lost => {
                tracing::info!(stream = %label, "relay: cursor lease lost; another instance reads it");
                Some(ttl / 4)
            }
            Outcome::HandedOver => {
                tracing::info!(stream = %label, "relay: cursor handed over to the instance the placement names");
                Some(ttl / 4)
            }
            Outcome::Unpublished => Some(self.backoff.next_delay()),
        }
    }
}

/// Whether nobody holds the lease on `key` (never taken, released, or expired).
async fn lease_is_free(leases: &kv::Store, key: &str) -> Result<bool, kv::EntryError> {
    Ok(match leases.entry(key).await? {
        Some(entry) => entry.operation != kv::Operation::Put,
        None => true,
    })
}

/// The comment an owner's change stream carries (its pipeline's first stage after
/// `$changeStream`, `{$match: {$comment}}`, shown by `$currentOp` and in mongod's log): how a
/// later owner finds the cursor of one that was killed.
pub(super) fn cursor_comment(key: &str, instance: &str) -> String {
    format!("streamgate relay {key} {instance}")
}

/// Kills the cursors that earlier owners of `key` left on mongod; returns how many.
///
/// An owner killed between two `getMore`s leaves its cursor idle on mongod: mongod ends a
/// cursor whose running `getMore`'s connection closes, but an idle one only when it times
/// out (`cursorTimeoutMillis`, 10 minutes by default), holding its memory meanwhile and
/// counting as a second cursor of the fleet. `$currentOp` with `allUsers: false` lists a
/// user's own cursors without further privileges; where even that is refused, they time out
/// as before.
async fn kill_orphans(
    client: &mongodb::Client,
    key: &str,
    instance: &str,
) -> mongodb::error::Result<usize> {
    let pipeline = vec![
        doc! { "$currentOp": { "idleCursors": true, "allUsers": false } },
        doc! { "$match": { "cursor.originatingCommand.pipeline.1.$match.$comment": {
            "$regex": format!("^streamgate relay {key} "),
            "$ne": cursor_comment(key, instance),
        } } },
        doc! { "$project": { "ns": 1, "id": "$cursor.cursorId" } },
    ];
    let found: Vec<Document> = client
        .database("admin")
        .aggregate(pipeline)
        .await?
        .try_collect()
        .await?;
    let mut killed = 0;
    for cursor in found {
        let (Ok(ns), Ok(id)) = (cursor.get_str("ns"), cursor.get_i64("id")) else {
            continue;
        };
        // Database names hold no dots; collection names may.
        let Some((db, coll)) = ns.split_once('.') else {
            continue;
        };
        let reply = client
            .database(db)
            .run_command(doc! { "killCursors": coll, "cursors": [id] })
            .await?;
        killed += reply.get_array("cursorsKilled").map_or(0, Vec::len);
    }
    Ok(killed)
}

/// Ends, beside a takeover (not before it), the cursors earlier owners of `key` left.
pub(super) fn spawn_kill_orphans(
    relay: &Relay,
    client: &mongodb::Client,
    tracker: &tokio_util::task::TaskTracker,
    key: &str,
) {
    let client = client.clone();
    let (key, instance) = (key.to_owned(), relay.instance.clone());
    tracker.spawn(async move {
        let killed = tokio::time::timeout(
            Duration::from_secs(5),
            kill_orphans(&client, &key, &instance),
        )
        .await;
        match killed {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                tracing::info!(
                    cursors = n,
                    "relay: ended the cursors an earlier owner left on mongod"
                );
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "relay: cannot look for cursors an earlier owner left");
            }
            Err(_) => tracing::debug!("relay: looking for cursors an earlier owner left timed out"),
        }
    });
}

/// Longest an owner stopping waits for a cursor open in flight to finish.
pub(super) const OPEN_SETTLE: Duration = Duration::from_secs(2);

/// Why an owner stops reading.
pub(super) enum Exit {
    /// The worker stopped.
    Cancelled,
    /// The lease was lost.
    Lost,
    /// The placement names another instance.
    HandOver,
}

/// One turn as owner of a unit's cursor.
pub(super) struct Turn<'a> {
    pub relay: &'a Relay,
    pub handles: &'a Handles,
    /// The lease key.
    pub key: &'a str,
    /// How long to keep the lease before handing it over.
    pub hold: Duration,
}

/// Where the fleet's log of `subject` stands: the last change or position published, `None`
/// when there is none (or the last message ended an earlier life of the stream), and the
/// stream sequence of the subject's last message (0: none), which the next publish expects.
pub(super) async fn last_position(
    handles: &Handles,
    subject: &str,
) -> Result<(Option<Token>, u64), String> {
    match handles
        .stream
        .get_last_raw_message_by_subject(subject)
        .await
    {
        Ok(message) => match wire::decode(Some(&message.headers), &message.payload) {
            Ok(relayed) if relayed.is_end() => Ok((None, message.sequence)),
            Ok(relayed) => Ok((relayed.token().cloned(), message.sequence)),
            Err(error) => Err(error.to_string()),
        },
        Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Ok((None, 0)),
        Err(error) => Err(error.to_string()),
    }
}

impl Turn<'_> {
    /// Whether the placement names another instance and the lease was held long enough.
    pub(super) fn handing_over(&self, taken: Instant, view: &View) -> bool {
        taken.elapsed() >= self.hold
            && view
                .assignee(self.key)
                .is_some_and(|named| named != self.relay.instance)
    }

    /// At a renewal tick: renews `lease`, and says why the turn must end, if it must: the
    /// lease was lost ([`Exit::Lost`]), or the placement names another instance and the lease
    /// was held long enough ([`Exit::HandOver`]).
    pub(super) async fn renew(
        &self,
        lease: &mut Lease,
        taken: Instant,
        view: &mut watch::Receiver<Arc<View>>,
    ) -> Option<Exit> {
        match lease.renew().await {
            Renewal::Held | Renewal::Unsure => self
                .handing_over(taken, &view.borrow_and_update())
                .then_some(Exit::HandOver),
            Renewal::Lost => Some(Exit::Lost),
        }
    }

    /// Reads `worker`'s cursor and publishes to `subject`, until something ends the turn.
    /// Gives the lease back when it may still be held.
    async fn own_stream(
        self,
        worker: &Arc<Worker>,
        subject: &str,
        mut lease: Lease,
        view: &mut watch::Receiver<Arc<View>>,
        cancel: &CancellationToken,
    ) -> (Outcome, Option<Lease>) {
        let Turn {
            relay,
            handles,
            key,
            ..
        } = self;
        let taken = Instant::now();
        let metrics = &relay.metrics().relay;
        spawn_kill_orphans(relay, worker.client(), worker.tracker(), key);
        // `last_sequence`: the subject's last message as far as this owner knows; each publish
        // expects it (`publish`), so that nothing is appended after a successor's messages.
        let (after, mut last_sequence) = match last_position(handles, subject).await {
            Ok(last) => last,
            Err(error) => {
                metrics.error("read");
                tracing::warn!(%error, subject, "relay: cannot read where the stream's log stands");
                return (Outcome::Unpublished, Some(lease));
            }
        };
        tracing::debug!(subject, "relay: the log's last position read");
        let mut position = after.clone();
        let mut watch = Watch::of_worker(worker);
        // A `$match` that keeps everything, for the comment: the driver would put the
        // `comment` option into the `$changeStream` stage too, which MongoDB refuses.
        watch.pipeline.insert(
            0,
            doc! { "$match": { "$comment": cursor_comment(key, &relay.instance) } },
        );
        let mut source = ChangeSource::new(watch, after);
        let every = Lease::renew_every(relay.settings.lease_ttl());
        let mut renew = tokio::time::interval_at(Instant::now() + every, every);
        let mark_every = Duration::from_millis(relay.settings.mark_interval_ms);
        let mut marked = Instant::now();
        // The step in flight is kept across renewals and view changes rather than dropped: an
        // open dropped in flight would leave its cursor on mongod (the driver never learns
        // its id), idle there until `cursorTimeoutMillis`. When the turn ends with an open in
        // flight, it is let finish (bounded), so that dropping the source ends its cursor.
        // A step read while gathering a batch that did not go into it: the next one handled.
        let mut carried: Option<Step<RawChange>> = None;
        let exit = 'turn: loop {
            let opening = !source.is_open();
            let step = if let Some(step) = carried.take() {
                step
            } else {
                let mut pending = std::pin::pin!(source.next());
                let settle = async |pending: std::pin::Pin<&mut _>| {
                    if opening {
                        let _ = tokio::time::timeout(OPEN_SETTLE, pending).await;
                    }
                };
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => {
                            settle(pending.as_mut()).await;
                            break 'turn Exit::Cancelled;
                        }
                        _ = renew.tick() => {
                            if let Some(exit) = self.renew(&mut lease, taken, view).await {
                                settle(pending.as_mut()).await;
                                break 'turn exit;
                            }
                        }
                        Ok(()) = view.changed() => {
                            if self.handing_over(taken, &view.borrow_and_update()) {
                                settle(pending.as_mut()).await;
                                break 'turn Exit::HandOver;
                            }
                        }
                        step = &mut pending => break step,
                    }
                }
            };
            let published = now_ms();
            let (message, ends) = match step {
                Step::Opened(start) => {
                    tracing::debug!(subject, "relay: cursor open");
                    if start.is_some() {
                        position = start;
                    }
                    (position.as_ref().map(|t| wire::mark(t, published)), false)
                }
                Step::Change(raw) => {
                    // What the cursor already holds goes out with this change: one message,
                    // one acknowledgement. (A round trip per change held the owner to one
                    // change per acknowledgement, which a busy JetStream stretched until the
                    // relay fell behind the writes.)
                    let mut batch = relay.batch_for(subject);
                    let mut next = Some(raw);
                    while let Some(raw) = next.take() {
                        match batch.try_push(&raw, BATCH_BYTES) {
                            Ok(true) => {}
                            Ok(false) => {
                                carried = Some(Step::Change(raw));
                                break;
                            }
                            Err(error) => {
                                // Published after what came before it, at its position.
                                carried =
                                    Some(Step::Failed(ErrorCode::Upstream, error.to_string()));
                                break;
                            }
                        }
                        position = Some(raw.id.clone());
                        if let Some(at_ms) = wall_ms(&raw) {
                            metrics
                                .publish_lag
                                .observe_ms(published.saturating_sub(at_ms));
                        }
                        // Only from an open cursor: an open polled once and dropped would leave
                        // its server-side cursor behind.
                        if batch.len() >= BATCH_CHANGES || !source.is_open() {
                            break;
                        }
                        match source.next().now_or_never() {
                            Some(Step::Change(raw)) => next = Some(raw),
                            Some(step) => carried = Some(step),
                            None => {}
                        }
                    }
                    (batch.finish(published), false)
                }
                Step::Quiet(Some(token)) => {
                    let moved = position.as_ref() != Some(&token);
                    position = Some(token);
                    if moved && marked.elapsed() >= mark_every {
                        marked = Instant::now();
                        (position.as_ref().map(|t| wire::mark(t, published)), false)
                    } else {
                        (None, false)
                    }
                }
                Step::Quiet(None) => (None, false),
                Step::Retrying(error) => {
                    tracing::warn!(stream = %worker.key.stream, %error, "relay: cursor lost, retrying");
                    worker.metrics().worker_retries.inc();
                    (None, false)
                }
                Step::Invalidated(event) => (
                    Some(wire::invalidate(&event, position.as_ref(), published)),
                    true,
                ),
                Step::Failed(code, message) => (
                    Some(wire::failed(code, &message, position.as_ref(), published)),
                    true,
                ),
            };
            if let Some(message) = message
                && let Err(error) = publish(relay, subject, key, message, &mut last_sequence).await
            {
                metrics.error("publish");
                tracing::warn!(%error, subject, "relay: JetStream did not take a change; resuming from the log");
                return (Outcome::Unpublished, Some(lease));
            }
            if ends {
                return (Outcome::Ended, Some(lease));
            }
        };
        match exit {
            Exit::Cancelled => return (Outcome::Cancelled, Some(lease)),
            Exit::Lost => return (Outcome::Lost, None),
            Exit::HandOver => {}
        }
        // Hand-over: stop reading (dropping the cursor ends it on mongod), then say where the
        // cursor stood, so that the next owner opens there. Every change before that position
        // was published before it (steps are published in order), so nothing is lost; a
        // change the next owner reads again is one JetStream and the consumers drop.
        drop(source);
        if let Some(position) = &position
            && let Err(error) = publish(
                relay,
                subject,
                key,
                wire::mark(position, now_ms()),
                &mut last_sequence,
            )
            .await
        {
            metrics.error("publish");
            tracing::warn!(%error, subject, "relay: the last position before a hand-over was not published");
        }
        (Outcome::HandedOver, Some(lease))
    }
}

/// When the change was written (its `wallTime`), Unix ms.
pub(super) fn wall_ms(raw: &RawChange) -> Option<u64> {
    let wall = raw.doc.get_datetime("wallTime").ok()?;
    u64::try_from(wall.timestamp_millis()).ok()
}

/// Publishes one message and waits for JetStream's acknowledgement (a duplicate, which
/// another owner published already, is as good).
///
/// The message expects the subject's last message to be `last_sequence`
/// (`Nats-Expected-Last-Subject-Sequence`), which it then becomes: once another owner has
/// published (this one's lease expired while it was frozen, and it has not noticed yet),
/// JetStream refuses it and the turn ends. So no owner appends a batch its successor already
/// published after the successor's messages, and a subject's positions grow with its stream
/// sequence, which the search of a catch-up from the retained window relies on
/// (`window.rs`).
pub(super) async fn publish(
    relay: &Relay,
    subject: &str,
    key: &str,
    message: Outbound,
    last_sequence: &mut u64,
) -> Result<(), String> {
    let mut message = message.scoped(key);
    message.headers.insert(
        async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        last_sequence.to_string().as_str(),
    );
    let published = wire::published_ms(Some(&message.headers)).unwrap_or_else(now_ms);
    let changes = std::mem::take(&mut message.changes);
    let ack = relay
        .jetstream
        .publish_with_headers(subject.to_owned(), message.headers, message.payload)
        .await
        .map_err(|e| e.to_string())?;
    let ack = ack.await.map_err(|e| e.to_string())?;
    // A duplicate stored nothing: the subject's last message is still the one expected.
    if !ack.duplicate {
        let previous = std::mem::replace(last_sequence, ack.sequence);
        // Stored as the subject's next message: this instance's reader may apply it now.
        relay.hand_to_reader(subject, previous, ack.sequence, published, changes);
    }
    relay.metrics().relay.published.inc();
    Ok(())
}
