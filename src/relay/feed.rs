//! Database feeds in relay mode: ONE `db.watch()` cursor per database and `fullDocument…`
//! options for the whole fleet, publishing to each member stream's own subject.
//!
//! Without the relay, the `$match`-only workers of one instance share their database's cursor
//! (`worker/feed.rs`). With it, the unit a lease guards is the *fleet's* feed: its members are
//! the shareable workers any instance has, and the instance holding the feed's lease reads one
//! cursor whose `$match` is the `$or` of every member's collection and conditions
//! ([`filter_of`]) and publishes each change to the subject of every member on its collection
//! (`ns.coll`), exactly as a worker's own owner would (`owner.rs`: the same wire messages, the
//! same `Nats-Msg-Id` scoped to the member, batches). The reading side is unchanged: every
//! worker on every instance reads its own subject (`consumer.rs`), so ids, routing, the
//! document view, catch-ups and every byte a client gets are the same as with a cursor per
//! stream.
//!
//! * **Members.** Each instance lists its members of each feed in the key-value bucket
//!   `feed_bucket`, one key per feed and instance (`<feed>.<instance>`: each member's subject,
//!   key, collection, pipeline and routing fields), written when a member joins or leaves and
//!   every `heartbeat_ms`, deleted when its last member leaves, dropped by the bucket's
//!   `max_age` (`instance_ttl_ms`) when the instance was killed. The feed's owner watches its
//!   feed's keys; the members are the union of the lists heard within `instance_ttl_ms`.
//! * **Ownership** is the relay's (`owner.rs`'s [`Contender`]): the feed's key (database and
//!   options) is its lease key and its place in the heartbeats, so feeds spread over the
//!   instances as workers do, and move, hand over and are taken over from a killed owner as a
//!   worker's cursor is.
//! * **Positions.** Each member's subject is its log. A member the owner adds (a new owner's
//!   every member, a joining one) starts where its subject stands: the cursor (re)opens at the
//!   cluster time of the *oldest* of its members' positions (`startAtOperationTime`, since a
//!   position of another filter may not be resumable), and each member skips the changes at or
//!   before its own position, so nothing is published twice and nothing is skipped. A member
//!   whose subject is empty (or ended) starts at "before T", T the cluster time the cursor
//!   opens at (its opening `mark`), or at the open's position when it opens "now". Members
//!   already served skip what they had (up to the cursor's position), as in `worker/feed.rs`.
//!   Every `mark_interval_ms` each member whose log has not moved gets a `mark`: the cursor's
//!   post-batch token when it is quiet, else "before the cluster time of its last change"
//!   (never another collection's change id), so a new owner rarely rewinds far.
//! * **One filter per collection** is not needed fleet-wide: when members on one collection
//!   filter differently, MongoDB says which of a batch's changes each one's `$match` takes
//!   (over `$documents`, one aggregate per batch and pipeline), so routing by `ns.coll` never
//!   leaks a change to a member whose `$match` refuses it.
//! * **Ends.** A collection's `drop` or `rename` ends its members with the change (when their
//!   `$match` takes it) and an `invalidate` ([`invalidate_after`]), as a collection cursor
//!   would; a database's `invalidate` ends every member. An ended member is added again (from
//!   an empty log) once its workers are gone from the lists, or after `lease_ttl_ms`.
//! * **Failure.** Members whose `$match` evaluates expressions (`$expr`, which can fail the
//!   cursor on a change: [`fails_on_data`]) do not join: each is relayed on its own cursor,
//!   so no member's data takes the others down. A cursor refused right after members were
//!   added is probed member by member (each one's clause alone on a cursor of its own): those
//!   MongoDB refuses end with the error their own cursor would have given, the others go on.
//!   History lost (a member's log older than the oplog) ends the members at the oldest
//!   position with it; any other error retrying cannot fix ends every member with it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use mongodb::bson::{Bson, Document, Timestamp, doc};
use mongodb::options::ChangeStreamOptions;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Relay;
use super::lease::{Lease, Renewal};
use super::membership::{Membership, View};
use super::owner::{
    BATCH_BYTES, BATCH_CHANGES, Contender, OPEN_SETTLE, Outcome, Turn, Unit, cursor_comment,
    last_position, publish, spawn_kill_orphans, wall_ms,
};
use super::wire::{self, Outbound};
use crate::event::{ErrorCode, Token};
use crate::metrics::{Metrics, now_ms};
use crate::spec::WatchSpec;
use crate::sync::lock;
use crate::worker::Worker;
use crate::worker::feed::{
    FEED_MAX_AWAIT, fails_on_data, filter_of, invalidate_after, shareable, taken_by,
};
use crate::worker::source::{ChangeSource, RawChange, ServerFeatures, Step, Watch};

/// How long one write of an instance's member list may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a probe of one member's clause may take to be refused or opened.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether a relayed worker's changes come from its database's fleet feed: its pipeline only
/// filters, without expressions that can fail the shared cursor on a change.
pub(super) fn joins(worker: &Worker) -> bool {
    let spec = worker.spec();
    worker.settings().shared_database_cursors && shareable(spec) && !fails_on_data(&spec.pipeline)
}

/// The feed's key (lease, heartbeat and member-list keys): what its members have in common.
fn feed_key(spec: &WatchSpec) -> String {
    let described = doc! {
        "feed": &spec.db,
        "fullDocument": format!("{:?}", spec.full_document),
        "fullDocumentBeforeChange": format!("{:?}", spec.full_document_before_change),
    };
    let bytes = mongodb::bson::to_vec(&described).unwrap_or_default();
    hex::encode(&Sha256::digest(&bytes)[..16])
}

/// One member as an instance lists it.
#[derive(Debug, Clone, PartialEq)]
struct Advert {
    subject: String,
    /// The worker's key (its messages' de-duplication scope).
    key: String,
    coll: String,
    pipeline: Vec<Document>,
    /// Fields an oversize change's placeholder must keep (its routing fields).
    fields: Vec<String>,
}

impl Advert {
    fn to_doc(&self) -> Document {
        doc! {
            "s": &self.subject,
            "k": &self.key,
            "c": &self.coll,
            "p": self.pipeline.clone(),
            "f": self.fields.clone(),
        }
    }

    fn from_doc(doc: &Document) -> Option<Advert> {
        let pipeline = doc
            .get_array("p")
            .ok()?
            .iter()
            .map(|stage| stage.as_document().cloned())
            .collect::<Option<Vec<_>>>()?;
        let fields = doc
            .get_array("f")
            .ok()?
            .iter()
            .map(|field| field.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()?;
        Some(Advert {
            subject: doc.get_str("s").ok()?.to_owned(),
            key: doc.get_str("k").ok()?.to_owned(),
            coll: doc.get_str("c").ok()?.to_owned(),
            pipeline,
            fields,
        })
    }
}

/// An instance's list of members of one feed, as stored.
fn encode(adverts: &[Advert]) -> Bytes {
    let members: Vec<Document> = adverts.iter().map(Advert::to_doc).collect();
    Bytes::from(mongodb::bson::to_vec(&doc! { "m": members }).unwrap_or_default())
}

fn decode(bytes: &[u8]) -> Vec<Advert> {
    let Ok(doc) = mongodb::bson::from_slice::<Document>(bytes) else {
        return Vec::new();
    };
    doc.get_array("m")
        .map(|members| {
            members
                .iter()
                .filter_map(|m| m.as_document().and_then(Advert::from_doc))
                .collect()
        })
        .unwrap_or_default()
}

/// What the feed's cursor needs, taken from its first member on this instance.
struct Template {
    client: mongodb::Client,
    db: String,
    options: ChangeStreamOptions,
    features: ServerFeatures,
    isolation_changes: usize,
    max_backoff: Duration,
    tracker: TaskTracker,
    metrics: Arc<Metrics>,
}

/// This instance's side of one fleet feed: its members (listed for the owner, wherever it is)
/// and its contention for the feed's cursor. Lives while the instance has members.
pub(super) struct LocalFeed {
    key: String,
    /// Subject → the member and how many of this instance's workers have it.
    members: Mutex<BTreeMap<String, (Advert, usize)>>,
    /// Members joined or left: write the list now.
    changed: tokio::sync::Notify,
    /// Cancelled when the last member leaves.
    cancel: CancellationToken,
    template: Template,
}

impl LocalFeed {
    fn adverts(&self) -> Vec<Advert> {
        lock(&self.members)
            .values()
            .map(|(advert, _)| advert.clone())
            .collect()
    }
}

/// `worker` (relayed to `subject`, de-duplicated under `key`) joins its database's fleet feed
/// on this instance until it stops, starting this instance's side of the feed if needed.
pub(super) fn join(relay: &Arc<Relay>, worker: &Arc<Worker>, subject: String, key: String) {
    let spec = worker.spec();
    let feed_key = feed_key(spec);
    let advert = Advert {
        subject: subject.clone(),
        key,
        coll: spec.coll.clone(),
        pipeline: spec.pipeline.clone(),
        fields: spec.routing.iter().map(|r| r.field.join(".")).collect(),
    };
    let (local, started) = {
        let mut feeds = lock(&relay.feeds);
        let current = feeds
            .get(&feed_key)
            .filter(|local| !local.cancel.is_cancelled())
            .cloned();
        let (local, started) = match current {
            Some(local) => (local, false),
            None => {
                let mut options = spec.options();
                // A reopen for a join cancels the waiting `getMore` (as in `worker/feed.rs`).
                options.max_await_time = Some(worker.settings().max_await.min(FEED_MAX_AWAIT));
                let local = Arc::new(LocalFeed {
                    key: feed_key.clone(),
                    members: Mutex::new(BTreeMap::new()),
                    changed: tokio::sync::Notify::new(),
                    cancel: CancellationToken::new(),
                    template: Template {
                        client: worker.client().clone(),
                        db: spec.db.clone(),
                        options,
                        features: worker.features(),
                        isolation_changes: worker.settings().oversize_isolation_changes,
                        max_backoff: worker.settings().max_backoff,
                        tracker: worker.tracker().clone(),
                        metrics: Arc::clone(&relay.metrics),
                    },
                });
                feeds.insert(feed_key, Arc::clone(&local));
                (local, true)
            }
        };
        lock(&local.members)
            .entry(subject.clone())
            .or_insert_with(|| (advert, 0))
            .1 += 1;
        (local, started)
    };
    local.changed.notify_one();
    let tracker = worker.tracker().clone();
    if started {
        tracker.spawn(run(Arc::clone(relay), Arc::clone(&local)));
    }
    let (relay, cancel) = (Arc::clone(relay), worker.cancel_token().clone());
    tracker.spawn(async move {
        cancel.cancelled().await;
        leave(&relay, &local, &subject);
    });
}

/// A worker of `subject` stopped: the member leaves this instance's list when it was the last
/// worker with it, and this instance's side of the feed stops with its last member.
fn leave(relay: &Relay, local: &Arc<LocalFeed>, subject: &str) {
    let mut feeds = lock(&relay.feeds);
    let empty = {
        let mut members = lock(&local.members);
        if let Some((_, count)) = members.get_mut(subject) {
            *count -= 1;
            if *count == 0 {
                members.remove(subject);
            }
        }
        members.is_empty()
    };
    if empty {
        local.cancel.cancel();
        if feeds.get(&local.key).is_some_and(|f| Arc::ptr_eq(f, local)) {
            feeds.remove(&local.key);
        }
    }
    drop(feeds);
    local.changed.notify_one();
}

/// This instance's side of a feed: lists its members and contends for the feed's cursor
/// (once the list was written, so that an owner always hears of its own members).
async fn run(relay: Arc<Relay>, local: Arc<LocalFeed>) {
    Membership::want(&relay, &local.key);
    let (written, mut first) = watch::channel(false);
    let contend = async {
        if first.wait_for(|w| *w).await.is_err() {
            return;
        }
        Contender::new(&relay, &*local, &local.key)
            .run(&local.cancel)
            .await;
    };
    tokio::join!(advertise(&relay, &local, written), contend);
    Membership::unwant(&relay, &local.key).await;
}

/// Writes this instance's member list when it changes and every `heartbeat_ms`; deletes it
/// once the last member left.
async fn advertise(relay: &Relay, local: &LocalFeed, written: watch::Sender<bool>) {
    let entry = format!("{}.{}", local.key, relay.instance);
    let every = relay.settings.heartbeat();
    loop {
        if local.cancel.is_cancelled() {
            break;
        }
        let value = encode(&local.adverts());
        match relay.handles().await {
            Ok(handles) => {
                match tokio::time::timeout(WRITE_TIMEOUT, handles.feeds.put(&entry, value)).await {
                    Ok(Ok(_)) => {
                        written.send_replace(true);
                    }
                    Ok(Err(error)) => {
                        relay.metrics().relay.error("lease");
                        tracing::warn!(%error, "relay: cannot list this instance's database feed members");
                    }
                    Err(_) => {
                        relay.metrics().relay.error("lease");
                        tracing::warn!(
                            "relay: listing this instance's database feed members timed out"
                        );
                    }
                }
            }
            Err(error) => {
                relay.metrics().relay.error("connect");
                tracing::warn!(%error, "relay: JetStream not available yet");
            }
        }
        tokio::select! {
            _ = local.cancel.cancelled() => break,
            _ = local.changed.notified() => {}
            _ = tokio::time::sleep(every) => {}
        }
    }
    if let Ok(handles) = relay.handles().await {
        let _ = tokio::time::timeout(WRITE_TIMEOUT, handles.feeds.delete(&entry)).await;
    }
}

impl Unit for LocalFeed {
    fn label(&self) -> String {
        format!("{} (database feed)", self.template.db)
    }

    fn own<'a>(
        &'a self,
        turn: Turn<'a>,
        lease: Lease,
        view: &'a mut watch::Receiver<Arc<View>>,
        cancel: &'a CancellationToken,
    ) -> impl Future<Output = (Outcome, Option<Lease>)> + Send + 'a {
        Owner {
            local: self,
            members: BTreeMap::new(),
            heard: BTreeMap::new(),
            ended: HashMap::new(),
            position: None,
            last_change: None,
            quiet_at: None,
            pending_start: None,
            joined: false,
            turn,
        }
        .own(lease, view, cancel)
    }
}

/// A member as the owner serves it.
struct Member {
    advert: Advert,
    /// Where its log stands: changes at or before this are not published to it again.
    at: Option<Token>,
    /// Its log has a start (read from JetStream, or the start published at an open).
    served: bool,
    /// Added since the last open: its log's position is still to be read.
    added: bool,
    /// Added at the last open, which has not succeeded yet (a refusal may be its).
    joined: bool,
    /// Its log stood far behind the feed: a cursor of its own brings it up to the oplog's
    /// head before it joins the feed's filter ([`catch_up`]).
    catching: bool,
}

/// Why the feed's turn stops, beside the ways every owner's turn ends.
enum Exit {
    Cancelled,
    Lost,
    HandOver,
    Unpublished,
}

/// What ended reading one step: go on, or open the cursor again (members changed or ended).
enum Next {
    Go,
    Reopen,
}

/// One turn as owner of a fleet feed.
struct Owner<'a> {
    local: &'a LocalFeed,
    turn: Turn<'a>,
    /// Subject → member.
    members: BTreeMap<String, Member>,
    /// Instance → its members and when its list came.
    heard: BTreeMap<String, (Vec<Advert>, Instant)>,
    /// Members whose stream ended (subject → when): not added again while listed, for a while.
    ended: HashMap<String, Instant>,
    /// The cursor's position (its last change or post-batch token).
    position: Option<Token>,
    /// The last change read (a post-batch token equal to it is not a high-water mark).
    last_change: Option<Token>,
    /// The last post-batch token that is no change's id (a high-water mark).
    quiet_at: Option<Token>,
    /// The start of members whose log is empty, after an open by time ("before T").
    pending_start: Option<Token>,
    /// Members were added since the last open succeeded (a refusal may be theirs).
    joined: bool,
}

impl Owner<'_> {
    async fn own(
        mut self,
        mut lease: Lease,
        view: &mut watch::Receiver<Arc<View>>,
        cancel: &CancellationToken,
    ) -> (Outcome, Option<Lease>) {
        let (relay, handles, key) = (self.turn.relay, self.turn.handles, self.turn.key);
        let taken = Instant::now();
        let template = &self.local.template;
        spawn_kill_orphans(relay, &template.client, &template.tracker, key);
        let mut roster = match handles.feeds.watch(format!("{key}.*")).await {
            Ok(roster) => roster,
            Err(error) => {
                relay.metrics().relay.error("read");
                tracing::warn!(%error, "relay: cannot watch a database feed's members");
                return (Outcome::Unpublished, Some(lease));
            }
        };
        // The lists as they stand (the replay ends with `delta` 0), bounded by their lifetime.
        let caught_up = Instant::now() + relay.settings.instance_ttl();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return (Outcome::Cancelled, Some(lease)),
                _ = tokio::time::sleep_until(caught_up) => break,
                entry = roster.next() => match entry {
                    Some(Ok(entry)) => {
                        let last = entry.delta == 0;
                        self.hear(entry);
                        if last {
                            break;
                        }
                    }
                    _ => return (Outcome::Unpublished, Some(lease)),
                },
            }
        }
        self.take_roster();
        let every = Lease::renew_every(relay.settings.lease_ttl());
        let mut renew = tokio::time::interval_at(Instant::now() + every, every);
        let mut expire = tokio::time::interval(relay.settings.heartbeat());
        let mark_every = Duration::from_millis(relay.settings.mark_interval_ms);
        let mut marked = Instant::now();
        let mut source: Option<ChangeSource> = None;
        let mut reopen = true;
        // The cluster time the feed has read to, for members catching up on their own.
        let feed_at = watch::Sender::new(None::<Timestamp>);
        // Members catching up on cursors of their own: each ends with its subject.
        let mut catch_ups: futures::stream::FuturesUnordered<
            futures::future::BoxFuture<'_, (String, Caught)>,
        > = futures::stream::FuturesUnordered::new();
        // A step read while gathering a batch that did not go into it: the next one handled.
        let mut carried: Option<Step<RawChange>> = None;
        let exit = 'turn: loop {
            if reopen && carried.is_none() {
                reopen = false;
                source = None;
                match self.prepare().await {
                    Ok(started) => {
                        for (subject, advert, from) in started {
                            let (local, instance) = (self.local, relay.instance.as_str());
                            let feed_at = feed_at.subscribe();
                            catch_ups.push(Box::pin(async move {
                                let caught =
                                    catch_up(relay, local, key, instance, &advert, from, feed_at)
                                        .await;
                                (subject, caught)
                            }));
                        }
                    }
                    Err(error) => {
                        relay.metrics().relay.error("read");
                        tracing::warn!(%error, "relay: cannot read where a database feed member's log stands");
                        break 'turn Exit::Unpublished;
                    }
                }
                let feeding = self.members.values().any(|m| !m.catching);
                source = feeding.then(|| self.open());
            }
            let step = if let Some(step) = carried.take() {
                step
            } else {
                let opening = source.as_ref().is_some_and(|s| !s.is_open());
                let mut pending = std::pin::pin!(async {
                    match source.as_mut() {
                        Some(source) => source.next().await,
                        None => std::future::pending().await,
                    }
                });
                // An open dropped in flight would leave its cursor on mongod: let it finish.
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
                            let exit = match lease.renew().await {
                                Renewal::Held | Renewal::Unsure => self
                                    .turn
                                    .handing_over(taken, &view.borrow_and_update())
                                    .then_some(Exit::HandOver),
                                Renewal::Lost => Some(Exit::Lost),
                            };
                            if let Some(exit) = exit {
                                settle(pending.as_mut()).await;
                                break 'turn exit;
                            }
                        }
                        Ok(()) = view.changed() => {
                            if self.turn.handing_over(taken, &view.borrow_and_update()) {
                                settle(pending.as_mut()).await;
                                break 'turn Exit::HandOver;
                            }
                        }
                        entry = roster.next() => match entry {
                            Some(Ok(entry)) => {
                                self.hear(entry);
                                if self.take_roster() {
                                    settle(pending.as_mut()).await;
                                    reopen = true;
                                    continue 'turn;
                                }
                            }
                            _ => {
                                settle(pending.as_mut()).await;
                                break 'turn Exit::Unpublished;
                            }
                        },
                        Some((subject, caught)) = catch_ups.next(), if !catch_ups.is_empty() => {
                            match caught {
                                Caught::Up(at) => {
                                    if let Some(member) = self.members.get_mut(&subject) {
                                        member.at = Some(at);
                                        member.catching = false;
                                        member.served = true;
                                    }
                                    // It joins the feed's filter from where it caught up.
                                    settle(pending.as_mut()).await;
                                    reopen = true;
                                    continue 'turn;
                                }
                                Caught::Ended => {
                                    self.members.remove(&subject);
                                    self.ended.insert(subject, Instant::now());
                                }
                                Caught::Unpublished(error) => {
                                    relay.metrics().relay.error("publish");
                                    tracing::warn!(%error, "relay: JetStream did not take a catching-up member's change; resuming from the logs");
                                    settle(pending.as_mut()).await;
                                    break 'turn Exit::Unpublished;
                                }
                            }
                        }
                        _ = expire.tick() => {
                            if self.take_roster() {
                                settle(pending.as_mut()).await;
                                reopen = true;
                                continue 'turn;
                            }
                        }
                        step = &mut pending => break step,
                    }
                }
            };
            let next = match step {
                Step::Opened(start) => {
                    tracing::debug!(db = %template.db, "relay: database feed cursor open");
                    self.joined = false;
                    for member in self.members.values_mut() {
                        member.joined = false;
                    }
                    let start = self.pending_start.take().or(start);
                    self.start_fresh(start.as_ref()).await
                }
                Step::Change(raw) => {
                    let mut batch = vec![raw];
                    while batch.len() < BATCH_CHANGES
                        && source.as_ref().is_some_and(|s| s.is_open())
                    {
                        let Some(source) = source.as_mut() else {
                            break;
                        };
                        match source.next().now_or_never() {
                            Some(Step::Change(raw)) => batch.push(raw),
                            Some(step) => {
                                carried = Some(step);
                                break;
                            }
                            None => break,
                        }
                    }
                    self.route(batch).await
                }
                Step::Quiet(Some(token)) => {
                    if self.last_change.as_ref() != Some(&token) {
                        self.quiet_at = Some(token.clone());
                    }
                    self.position = Some(token);
                    // Members whose log is empty start at the first position there is.
                    let start = self.quiet_at.clone();
                    self.start_fresh(start.as_ref()).await
                }
                Step::Quiet(None) => Ok(Next::Go),
                Step::Retrying(error) => {
                    tracing::warn!(db = %template.db, %error, "relay: database feed cursor lost, retrying");
                    template.metrics.worker_retries.inc();
                    Ok(Next::Go)
                }
                Step::Invalidated(event) => {
                    // The database is gone: every member ends, as its collection's cursor would.
                    let ends = self.served_subjects();
                    let end = |m: &Member| wire::invalidate(&event, m.at.as_ref(), now_ms());
                    self.end(ends, end).await.map(|()| {
                        self.position = None;
                        Next::Reopen
                    })
                }
                Step::Failed(code, message) => self.failed(code, message).await,
            };
            match next {
                Ok(Next::Go) => {}
                Ok(Next::Reopen) => {
                    reopen = true;
                    continue;
                }
                Err(error) => {
                    relay.metrics().relay.error("publish");
                    tracing::warn!(%error, "relay: JetStream did not take a database feed's change; resuming from the logs");
                    break 'turn Exit::Unpublished;
                }
            }
            if let Some(position) = source.as_ref().and_then(ChangeSource::position) {
                self.position = Some(position.clone());
            }
            feed_at.send_replace(self.position.as_ref().and_then(Token::cluster_time));
            if marked.elapsed() >= mark_every {
                marked = Instant::now();
                if let Err(error) = self.mark_moved().await {
                    relay.metrics().relay.error("publish");
                    tracing::warn!(%error, "relay: JetStream did not take a database feed's position");
                    break 'turn Exit::Unpublished;
                }
            }
        };
        drop(source);
        drop(catch_ups);
        match exit {
            Exit::Cancelled => (Outcome::Cancelled, Some(lease)),
            Exit::Lost => (Outcome::Lost, None),
            Exit::Unpublished => (Outcome::Unpublished, Some(lease)),
            Exit::HandOver => {
                // Where each member's log stands, so that the next owner opens close to here.
                if let Err(error) = self.mark_moved().await {
                    relay.metrics().relay.error("publish");
                    tracing::warn!(%error, "relay: the last positions before a hand-over were not published");
                }
                (Outcome::HandedOver, Some(lease))
            }
        }
    }

    /// Takes one entry of the member lists' watch.
    fn hear(&mut self, entry: kv::Entry) {
        let Some(instance) = entry
            .key
            .strip_prefix(self.turn.key)
            .and_then(|k| k.strip_prefix('.'))
        else {
            return;
        };
        if entry.operation == kv::Operation::Put {
            self.heard
                .insert(instance.to_owned(), (decode(&entry.value), Instant::now()));
        } else {
            self.heard.remove(instance);
        }
    }

    /// Brings the members in line with the lists (live ones, and this instance's own as they
    /// are now): members no longer listed leave; `true` when some were added (the cursor must
    /// open again with them).
    fn take_roster(&mut self) -> bool {
        let relay = self.turn.relay;
        let ttl = relay.settings.instance_ttl();
        // A killed instance's list expired without a delete.
        self.heard.retain(|_, (_, at)| at.elapsed() < ttl);
        let mut listed: BTreeMap<String, Advert> = BTreeMap::new();
        for (instance, (adverts, _)) in &self.heard {
            if *instance != relay.instance {
                for advert in adverts {
                    listed.insert(advert.subject.clone(), advert.clone());
                }
            }
        }
        for advert in self.local.adverts() {
            listed.insert(advert.subject.clone(), advert);
        }
        let linger = relay.settings.lease_ttl();
        self.ended
            .retain(|subject, at| listed.contains_key(subject) && at.elapsed() < linger);
        self.members
            .retain(|subject, _| listed.contains_key(subject));
        let mut added = false;
        for (subject, advert) in listed {
            if self.members.contains_key(&subject) || self.ended.contains_key(&subject) {
                continue;
            }
            self.members.insert(
                subject,
                Member {
                    advert,
                    at: None,
                    served: false,
                    added: true,
                    joined: false,
                    catching: false,
                },
            );
            added = true;
        }
        added
    }

    /// Before an open: members served so far skip what they had (up to the cursor's
    /// position); added members start where their log stands, those whose log stands far
    /// behind the others after a catch-up of their own (returned: subject, member, position).
    async fn prepare(&mut self) -> Result<Vec<(String, Advert, Token)>, String> {
        let handles = self.turn.handles;
        for (subject, member) in &mut self.members {
            if member.served {
                if let Some(position) = &self.position
                    && member.at.as_ref().is_none_or(|at| at < position)
                {
                    member.at = Some(position.clone());
                }
            } else if member.added {
                member.at = last_position(handles, subject).await?;
                member.served = member.at.is_some();
                member.added = false;
                member.joined = true;
                self.joined = true;
            }
        }
        // Far behind the newest position: rewinding the feed there would hold every other
        // member's changes back while it re-reads; the member catches up on its own instead.
        let behind = 2 * Duration::from_millis(self.turn.relay.settings.mark_interval_ms);
        let newest = self
            .members
            .values()
            .filter(|m| !m.catching)
            .filter_map(|m| m.at.clone())
            .chain(self.position.clone())
            .max();
        let Some(newest) = newest.as_ref().and_then(Token::cluster_time) else {
            return Ok(Vec::new());
        };
        let mut catch_ups = Vec::new();
        for (subject, member) in &mut self.members {
            let far = member
                .at
                .as_ref()
                .and_then(Token::cluster_time)
                .is_some_and(|at| {
                    seconds(newest).saturating_sub(seconds(at)) > behind.as_secs().max(1)
                });
            if member.joined
                && member.served
                && far
                && let Some(at) = member.at.clone()
            {
                tracing::info!(coll = %member.advert.coll, "relay: a database feed member's log stands far behind; it catches up on a cursor of its own, then joins");
                self.turn.relay.metrics().relay.feed_catch_ups.inc();
                member.served = false;
                member.joined = false;
                member.catching = true;
                catch_ups.push((subject.clone(), member.advert.clone(), at));
            }
        }
        Ok(catch_ups)
    }

    /// The cursor for the members: at the cluster time of the oldest log position, or from
    /// now when no member's log has one.
    fn open(&mut self) -> ChangeSource {
        let template = &self.local.template;
        let relay = self.turn.relay;
        let from = self
            .members
            .values()
            .filter(|m| !m.catching)
            .filter_map(|m| m.at.clone())
            .min();
        self.pending_start = from
            .as_ref()
            .and_then(Token::cluster_time)
            .map(Token::before_cluster_time);
        let filter = filter_of(
            self.members
                .values()
                .filter(|m| !m.catching)
                .map(|m| (m.advert.coll.as_str(), m.advert.pipeline.as_slice())),
        );
        let mut fields: Vec<String> = self
            .members
            .values()
            .flat_map(|m| m.advert.fields.iter().cloned())
            .collect();
        fields.sort_unstable();
        fields.dedup();
        let (opened, skipped) = (Arc::clone(&template.metrics), Arc::clone(&template.metrics));
        let watch = Watch {
            client: template.client.clone(),
            db: template.db.clone(),
            coll: None,
            // The comment first (how a later owner finds this cursor if this one is killed).
            pipeline: vec![
                doc! { "$match": { "$comment": cursor_comment(self.turn.key, &relay.instance) } },
                doc! { "$match": filter },
            ],
            options: template.options.clone(),
            probe_fields: fields,
            features: template.features,
            isolation_changes: template.isolation_changes,
            max_backoff: template.max_backoff,
            label: format!("{} (relayed database feed)", template.db),
            on_open: Arc::new(move || {
                opened.cursors_opened.inc();
            }),
            on_skip: Arc::new(move || {
                skipped.oversize_skipped.inc();
            }),
        };
        self.position = from.clone();
        match from {
            Some(from) => ChangeSource::at_time_of(watch, from),
            None => ChangeSource::new(watch, None),
        }
    }

    /// Members whose log is empty start at `start` (their opening `mark`).
    async fn start_fresh(&mut self, start: Option<&Token>) -> Result<Next, String> {
        let Some(start) = start else {
            return Ok(Next::Go);
        };
        let fresh: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| !m.served && !m.added && !m.catching)
            .map(|(subject, _)| subject.clone())
            .collect();
        let messages = fresh
            .iter()
            .filter_map(|subject| {
                let member = self.members.get(subject)?;
                Some((
                    subject.clone(),
                    member.advert.key.clone(),
                    vec![wire::mark(start, now_ms())],
                ))
            })
            .collect();
        self.publish_all(messages).await?;
        for subject in fresh {
            if let Some(member) = self.members.get_mut(&subject) {
                member.at = Some(start.clone());
                member.served = true;
            }
        }
        Ok(Next::Go)
    }

    /// Every `mark_interval_ms`: a position for each member whose log has not moved to it (the
    /// cursor's high-water mark when quiet, else "before the cluster time of its last
    /// change": never another collection's change id).
    async fn mark_moved(&mut self) -> Result<(), String> {
        let mark = match (&self.quiet_at, &self.position) {
            (Some(quiet), Some(position)) if quiet == position => Some(quiet.clone()),
            (_, Some(position)) => position.cluster_time().map(Token::before_cluster_time),
            _ => None,
        };
        let Some(mark) = mark else {
            return Ok(());
        };
        let mut messages = Vec::new();
        for (subject, member) in &self.members {
            if member.served && member.at.as_ref().is_some_and(|at| *at < mark) {
                let message = wire::mark(&mark, now_ms());
                messages.push((subject.clone(), member.advert.key.clone(), vec![message]));
            }
        }
        self.publish_all(messages).await?;
        for member in self.members.values_mut() {
            if member.served && member.at.as_ref().is_some_and(|at| *at < mark) {
                member.at = Some(mark.clone());
            }
        }
        Ok(())
    }

    /// Publishes a batch of changes to the members on their collections (MongoDB says which a
    /// member's `$match` takes where members of one collection filter differently, and
    /// whether a filtering member's `$match` takes its collection's `drop`/`rename`); a
    /// `drop`/`rename` ends its members.
    async fn route(&mut self, batch: Vec<RawChange>) -> Result<Next, String> {
        let relay = self.turn.relay;
        let published = now_ms();
        for raw in &batch {
            if let Some(at_ms) = wall_ms(raw) {
                relay
                    .metrics()
                    .relay
                    .publish_lag
                    .observe_ms(published.saturating_sub(at_ms));
            }
        }
        let taken = self.evaluate(&batch).await?;
        let judged: HashMap<String, &HashSet<String>> = self
            .members
            .iter()
            .filter_map(|(subject, m)| {
                Some((
                    subject.clone(),
                    taken.get(&pipeline_bytes(&m.advert.pipeline))?,
                ))
            })
            .collect();
        // Per member: its messages in order.
        let mut out: BTreeMap<String, (String, Vec<Outbound>, wire::Batch)> = BTreeMap::new();
        let mut ended: Vec<String> = Vec::new();
        for raw in &batch {
            self.last_change = Some(raw.id.clone());
            self.position = Some(raw.id.clone());
            let Some(coll) = raw.coll() else {
                continue; // `dropDatabase`: each collection's `drop` came before it.
            };
            let ends = matches!(raw.operation_type(), "drop" | "rename");
            for (subject, member) in &mut self.members {
                if !member.served
                    || member.advert.coll != coll
                    || member.at.as_ref().is_some_and(|at| raw.id <= *at)
                {
                    continue;
                }
                let takes = match judged.get(subject) {
                    Some(ids) => raw.skipped || ids.contains(raw.id.as_str()),
                    None => true,
                };
                member.at = Some(raw.id.clone());
                let (_, messages, pending) = out.entry(subject.clone()).or_insert_with(|| {
                    (
                        member.advert.key.clone(),
                        Vec::new(),
                        wire::Batch::default(),
                    )
                });
                if takes
                    && !pending
                        .try_push(raw, BATCH_BYTES)
                        .map_err(|e| e.to_string())?
                {
                    let full = std::mem::take(pending);
                    messages.extend(full.finish(published));
                    pending
                        .try_push(raw, BATCH_BYTES)
                        .map_err(|e| e.to_string())?;
                }
                if ends {
                    let full = std::mem::take(pending);
                    messages.extend(full.finish(published));
                    let invalidate = invalidate_after(raw);
                    messages.push(wire::invalidate(&invalidate, Some(&raw.id), published));
                    ended.push(subject.clone());
                }
            }
        }
        let messages = out
            .into_iter()
            .map(|(subject, (key, mut messages, pending))| {
                messages.extend(pending.finish(published));
                (subject, key, messages)
            })
            .collect();
        self.publish_all(messages).await?;
        for subject in &ended {
            self.members.remove(subject);
            self.ended.insert(subject.clone(), Instant::now());
        }
        Ok(Next::Go)
    }

    /// For each pipeline MongoDB must judge changes of this batch for (members of one
    /// collection filtering differently; a filtering member's `drop`/`rename`): the ids of
    /// those it takes. A pipeline absent from the answer takes every change routed to it.
    async fn evaluate(
        &self,
        batch: &[RawChange],
    ) -> Result<HashMap<Vec<u8>, HashSet<String>>, String> {
        let mut pipelines_of: HashMap<&str, BTreeSet<Vec<u8>>> = HashMap::new();
        let mut by_bytes: HashMap<Vec<u8>, &[Document]> = HashMap::new();
        for member in self.members.values().filter(|m| m.served) {
            let bytes = pipeline_bytes(&member.advert.pipeline);
            by_bytes.insert(bytes.clone(), &member.advert.pipeline);
            pipelines_of
                .entry(member.advert.coll.as_str())
                .or_default()
                .insert(bytes);
        }
        // Pipeline → the changes it must judge.
        let mut judge: HashMap<Vec<u8>, Vec<Document>> = HashMap::new();
        for raw in batch {
            let Some(pipelines) = raw.coll().and_then(|c| pipelines_of.get(c)) else {
                continue;
            };
            let ends = matches!(raw.operation_type(), "drop" | "rename");
            for bytes in pipelines {
                let filters = by_bytes.get(bytes).is_some_and(|p| !p.is_empty());
                if filters && (pipelines.len() > 1 || ends) && !raw.skipped {
                    judge
                        .entry(bytes.clone())
                        .or_default()
                        .push(raw.doc.clone());
                }
            }
        }
        let mut taken = HashMap::new();
        if judge.is_empty() {
            return Ok(taken);
        }
        let db = self.local.template.client.database(&self.local.template.db);
        for (bytes, changes) in judge {
            let Some(pipeline) = by_bytes.get(&bytes) else {
                continue;
            };
            let ids = taken_by(&db, changes, pipeline).await?;
            let ids: HashSet<String> = ids
                .iter()
                .filter_map(|id| id.as_document()?.get_str("_data").ok().map(str::to_owned))
                .collect();
            taken.insert(bytes, ids);
        }
        Ok(taken)
    }

    /// Subjects of the members that have a log start.
    fn served_subjects(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|(_, m)| m.served)
            .map(|(subject, _)| subject.clone())
            .collect()
    }

    /// Ends the members `subjects` with the message `end` makes for each. A member whose log
    /// is empty gets a start first ("before" the cluster time the feed stands at): a log
    /// whose first message is an end reads as an earlier life of the stream, and its workers
    /// would wait for a start rather than end with the error.
    async fn end(
        &mut self,
        subjects: Vec<String>,
        end: impl Fn(&Member) -> Outbound,
    ) -> Result<(), String> {
        let start = self.pending_start.clone().or_else(|| {
            let at = self.position.as_ref()?.cluster_time()?;
            Some(Token::before_cluster_time(at))
        });
        let messages = subjects
            .iter()
            .filter_map(|subject| {
                let member = self.members.get(subject)?;
                let mut messages = Vec::with_capacity(2);
                if member.at.is_none()
                    && let Some(start) = &start
                {
                    messages.push(wire::mark(start, now_ms()));
                }
                messages.push(end(member));
                Some((subject.clone(), member.advert.key.clone(), messages))
            })
            .collect();
        self.publish_all(messages).await?;
        for subject in subjects {
            self.members.remove(&subject);
            self.ended.insert(subject, Instant::now());
        }
        Ok(())
    }

    /// The cursor failed in a way retrying cannot fix: a refused open right after members
    /// joined ends those MongoDB refuses alone; history lost ends the members at the oldest
    /// position; anything else ends every member.
    async fn failed(&mut self, code: ErrorCode, message: String) -> Result<Next, String> {
        let db = &self.local.template.db;
        if code == ErrorCode::Upstream && self.joined {
            let refused = self.refused_members().await;
            if !refused.is_empty() {
                tracing::warn!(db = %db, %message, members = refused.len(), "relay: MongoDB refused database feed members' $match; their streams end");
                let subjects: Vec<String> = refused.iter().map(|(s, _)| s.clone()).collect();
                let errors: HashMap<String, String> = refused.into_iter().collect();
                let end = |m: &Member| {
                    let message = errors
                        .get(&m.advert.subject)
                        .map_or(message.as_str(), String::as_str);
                    wire::failed(ErrorCode::Upstream, message, m.at.as_ref(), now_ms())
                };
                self.end(subjects, end).await?;
                return Ok(Next::Reopen);
            }
        }
        let oldest = self.members.values().filter_map(|m| m.at.clone()).min();
        let ending: Vec<String> = match (code, &oldest) {
            (ErrorCode::HistoryLost, Some(oldest)) => self
                .members
                .iter()
                .filter(|(_, m)| m.at.as_ref() == Some(oldest))
                .map(|(subject, _)| subject.clone())
                .collect(),
            _ => self.members.keys().cloned().collect(),
        };
        tracing::error!(db = %db, code = code.as_str(), %message, members = ending.len(), "relay: database feed failed; its members end");
        let end = |m: &Member| wire::failed(code, &message, m.at.as_ref(), now_ms());
        self.end(ending, end).await?;
        self.position = None;
        Ok(Next::Reopen)
    }

    /// The members added at the last open whose `$match` MongoDB refuses alone, with the
    /// error a cursor of their own got.
    async fn refused_members(&self) -> Vec<(String, String)> {
        let template = &self.local.template;
        let mut refused = Vec::new();
        for (subject, member) in &self.members {
            if member.advert.pipeline.is_empty() || !member.joined {
                continue;
            }
            let watch = Watch {
                client: template.client.clone(),
                db: template.db.clone(),
                coll: None,
                pipeline: vec![doc! { "$match": filter_of(std::iter::once((
                    member.advert.coll.as_str(),
                    member.advert.pipeline.as_slice(),
                ))) }],
                options: template.options.clone(),
                probe_fields: Vec::new(),
                features: template.features,
                isolation_changes: template.isolation_changes,
                max_backoff: template.max_backoff,
                label: format!("{} (database feed probe)", template.db),
                on_open: Arc::new(|| {}),
                on_skip: Arc::new(|| {}),
            };
            let mut probe = ChangeSource::new(watch, None);
            if let Ok(Step::Failed(ErrorCode::Upstream, error)) =
                tokio::time::timeout(PROBE_TIMEOUT, probe.next()).await
            {
                refused.push((subject.clone(), error));
            }
        }
        refused
    }

    /// Publishes each member's messages in order (members side by side).
    async fn publish_all(
        &self,
        messages: Vec<(String, String, Vec<Outbound>)>,
    ) -> Result<(), String> {
        let relay = self.turn.relay;
        let sends = messages
            .into_iter()
            .map(|(subject, key, messages)| async move {
                for message in messages {
                    publish(relay, &subject, &key, message).await?;
                }
                Ok::<_, String>(())
            });
        futures::future::try_join_all(sends).await.map(|_| ())
    }
}

/// How a member's catch-up ended.
enum Caught {
    /// Its log reached the oplog's head at this position (an empty batch): it joins the feed.
    Up(Token),
    /// Its stream ended (the collection dropped, an error retrying cannot fix), published.
    Ended,
    /// JetStream did not take a message.
    Unpublished(String),
}

/// Brings a member whose log stands far behind the feed up to the oplog's head on a cursor
/// of its own (its collection and pipeline, as its own owner would read, from the cluster
/// time of `from`, skipping what its log has), publishing to its subject; the feed then
/// includes it from there. The other members' changes are not held back meanwhile.
async fn catch_up(
    relay: &Relay,
    local: &LocalFeed,
    feed_key: &str,
    instance: &str,
    advert: &Advert,
    from: Token,
    feed_at: watch::Receiver<Option<Timestamp>>,
) -> Caught {
    let template = &local.template;
    let mut pipeline = vec![doc! { "$match": { "$comment": cursor_comment(feed_key, instance) } }];
    pipeline.extend(advert.pipeline.iter().cloned());
    let watch = Watch {
        client: template.client.clone(),
        db: template.db.clone(),
        coll: Some(advert.coll.clone()),
        pipeline,
        options: template.options.clone(),
        probe_fields: advert.fields.clone(),
        features: template.features,
        isolation_changes: template.isolation_changes,
        max_backoff: template.max_backoff,
        label: format!(
            "{}.{} (relayed database feed catch-up)",
            template.db, advert.coll
        ),
        on_open: Arc::new(|| {}),
        on_skip: Arc::new(|| {}),
    };
    let mut source = ChangeSource::at_time_of(watch, from.clone());
    let mut at = from;
    let send =
        async |message: Outbound| publish(relay, &advert.subject, &advert.key, message).await;
    // A step read while gathering a batch that did not go into it: the next one handled.
    let mut carried: Option<Step<RawChange>> = None;
    loop {
        let step = match carried.take() {
            Some(step) => step,
            None => source.next().await,
        };
        let published = now_ms();
        let message = match step {
            Step::Opened(_) | Step::Quiet(None) | Step::Retrying(_) => continue,
            Step::Quiet(Some(token)) => return Caught::Up(if token > at { token } else { at }),
            Step::Change(raw) => {
                // Reached where the feed reads: it joins the feed from here.
                let reached = |raw: &RawChange| {
                    let feed_at = *feed_at.borrow();
                    raw.id
                        .cluster_time()
                        .zip(feed_at)
                        .is_some_and(|(t, f)| t >= f)
                };
                let mut caught = false;
                let mut batch = wire::Batch::default();
                let mut next = Some(raw);
                while let Some(raw) = next.take() {
                    // Opened at the cluster time of `from`: what its log has is skipped.
                    caught = reached(&raw);
                    if raw.id > at {
                        match batch.try_push(&raw, BATCH_BYTES) {
                            Ok(true) => at = raw.id.clone(),
                            Ok(false) => {
                                carried = Some(Step::Change(raw));
                                break;
                            }
                            Err(error) => return Caught::Unpublished(error.to_string()),
                        }
                    }
                    if caught || batch.len() >= BATCH_CHANGES || !source.is_open() {
                        break;
                    }
                    match source.next().now_or_never() {
                        Some(Step::Change(raw)) => next = Some(raw),
                        Some(step) => carried = Some(step),
                        None => {}
                    }
                }
                if let Some(message) = batch.finish(published)
                    && let Err(error) = send(message).await
                {
                    return Caught::Unpublished(error);
                }
                if caught && carried.is_none() {
                    return Caught::Up(at);
                }
                continue;
            }
            Step::Invalidated(event) => wire::invalidate(&event, Some(&at), published),
            Step::Failed(code, message) => wire::failed(code, &message, Some(&at), published),
        };
        return match send(message).await {
            Ok(()) => Caught::Ended,
            Err(error) => Caught::Unpublished(error),
        };
    }
}

/// Seconds of a cluster time.
fn seconds(at: Timestamp) -> u64 {
    u64::from(at.time)
}

/// A pipeline as bytes (a map key).
fn pipeline_bytes(pipeline: &[Document]) -> Vec<u8> {
    let stages: Vec<Bson> = pipeline.iter().cloned().map(Bson::Document).collect();
    mongodb::bson::to_vec(&doc! { "p": stages }).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_feed_is_its_database_and_options() {
        let spec = |coll: &str, full| WatchSpec {
            db: "d".into(),
            coll: coll.into(),
            pipeline: vec![],
            full_document: full,
            full_document_before_change: crate::spec::FullDocumentBeforeChange::Off,
            routing: Vec::new(),
            membership: None,
        };
        use crate::spec::FullDocument;
        let key = feed_key(&spec("a", FullDocument::Default));
        assert_eq!(key, feed_key(&spec("b", FullDocument::Default)));
        assert_ne!(key, feed_key(&spec("a", FullDocument::UpdateLookup)));
        assert_eq!(key.len(), 32);
    }

    #[test]
    fn member_lists_round_trip() {
        let adverts = vec![
            Advert {
                subject: "streamgate.relay.aa".into(),
                key: "aa".into(),
                coll: "c0".into(),
                pipeline: vec![],
                fields: vec![],
            },
            Advert {
                subject: "streamgate.relay.bb".into(),
                key: "bb".into(),
                coll: "c.1".into(),
                pipeline: vec![doc! {"$match": {"operationType": "insert"}}],
                fields: vec!["fullDocument.owner".into()],
            },
        ];
        assert_eq!(decode(&encode(&adverts)), adverts);
        assert!(decode(b"not bson").is_empty());
    }
}
