//! Database feeds: one change-stream cursor per database for every worker that can share it.
//!
//! Every open change stream makes MongoDB read each new oplog entry, so 200 streams on 200
//! collections cost 200 `getMore`s per write and per `maxAwaitTimeMS`, however idle each stream
//! is. Workers whose pipeline is only `$match` stages (most streams) instead join a [`Feed`]:
//! ONE `db.watch()` cursor per database and change-stream options, whose `$match` is the `$or`
//! of each member's collection and conditions. The feed routes every change by `ns.coll` to
//! the members on that collection, in oplog order; each member's worker publishes it as if it
//! had read it from a cursor of its own (same ids, same events, same exactly-once rules).
//!
//! * **Join.** A worker joins pending; the feed reopens its cursor with the new `$or` at the
//!   cluster time T of where it stood (`startAtOperationTime`, since the old position may be a
//!   change the new filter does not match as a token). The new member covers everything from T
//!   on (its start position is "before T"); members already served skip what they had (ids up
//!   to the old position). Joins that arrive together share one reopen.
//! * **Positions.** Members get the ids of their own collection's changes and the feed's
//!   high-water marks (post-batch tokens that are not a change), never another collection's
//!   change id: a client resuming with one would be refused as `other_collection`.
//! * **Ends.** A database feed sees no `invalidate` when one collection is dropped or renamed,
//!   only the `drop`/`rename` change (its `$match` takes those for every member's collection):
//!   the feed turns that into the change, for members whose `$match` takes it (MongoDB
//!   evaluates a filtering member's stages over `$documents`), followed by an `invalidate` with
//!   the same id, as a collection stream would.
//! * **Failure.** A cursor MongoDB refuses to open right after members joined is likely refused
//!   for one of their `$match`es: those members fall back to cursors of their own (which then
//!   report the error to their clients alone), and the feed reopens without them. A cursor that
//!   fails later on a change (an `$expr` such as `{$toInt: "$fullDocument.code"}` meeting
//!   `"x"`) is failed by a member whose `$match` evaluates expressions: the feed *probes* those
//!   suspects, each group with its own clauses of the feed's `$match` on a cursor of its own
//!   from the feed's position (by cluster time) until it fails, or reads past the oplog's head
//!   as of the failure, halving failing groups down to the members that fail alone
//!   (`feed_probe_timeout_ms` bounds the search). Those members move to cursors of their own
//!   from where the feed served them (which then give their clients the error a cursor of their
//!   own gives) and never rejoin this feed; the feed reopens at its position without them, so
//!   the others lose and repeat nothing. No culprit found, or any other failure (history lost,
//!   `dropDatabase`'s `invalidate`): every member ends with it.
//! * **Leave.** A member leaves when its worker stops (its [`Membership`] drops); the feed
//!   stops with its last member.
//!
//! In relay mode the fleet shares feeds instead (`relay/feed/`, whose members are every
//! instance's): it reuses this module's filter ([`filter_of`]), ends ([`invalidate_after`],
//! [`taken_by`]) and the rule of which pipelines share ([`shareable`], [`fails_on_data`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::FutureExt;
use mongodb::bson::{Bson, Document, Timestamp, doc};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::hub::Routed;
use super::membership::Encoder;
use super::source::{ChangeSource, RawChange, Step, Watch};
use super::{Worker, WorkerContext, lock};
use crate::event::{ErrorCode, Event, EventKind, Token};
use crate::membership::Membership as MembershipSpec;
use crate::routing::MatchRule;
use crate::spec::{FullDocument, FullDocumentBeforeChange, WatchSpec};

/// How long MongoDB gets to say whether a filtering member's `$match` takes its collection's
/// `drop`/`rename` (past it, the member gets the `invalidate` alone).
pub(crate) const END_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Steps read without waiting (what the driver already holds) that go out as one batch.
const BATCH: usize = 1024;

/// `maxAwaitTimeMS` of a feed's `getMore` (at most the workers' `max_await`).
pub(crate) const FEED_MAX_AWAIT: Duration = Duration::from_millis(100);

/// `maxAwaitTimeMS` of a probe's `getMore`: an empty batch is how a probe that matches nothing
/// new learns it read to the head, so it must come soon (the feed's members wait meanwhile).
const PROBE_MAX_AWAIT: Duration = Duration::from_millis(20);

/// Feeds by database and options; part of the [`WorkerContext`].
#[derive(Default)]
pub(crate) struct Feeds {
    feeds: Mutex<HashMap<FeedKey, Arc<Feed>>>,
}

/// What workers must have in common to share a cursor.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FeedKey {
    db: String,
    full_document: FullDocument,
    full_document_before_change: FullDocumentBeforeChange,
}

/// One database cursor and the workers it feeds.
pub(crate) struct Feed {
    key: FeedKey,
    state: Mutex<State>,
    /// Members joined or left.
    changed: Notify,
}

struct State {
    members: Vec<Member>,
    next_id: u64,
    /// Members joined since the cursor opened: reopen with the new filter.
    reopen: bool,
    /// The feed's task ended; a joiner starts a new feed.
    stopped: bool,
    /// Collections and pipelines of members whose `$match` failed this feed's cursor on a
    /// change: a worker with one of them does not join (it would fail the feed again on the
    /// next such change), it reads a cursor of its own.
    isolated: Vec<(String, Vec<Document>)>,
}

struct Member {
    id: u64,
    coll: String,
    pipeline: Vec<Document>,
    rules: Arc<[MatchRule]>,
    /// How its worker decides membership (PROTOCOL.md §10).
    membership: Option<Arc<MembershipSpec>>,
    /// Joined since the cursor last opened: not served yet.
    pending: bool,
    /// In the filter of the cursor being opened or read. A member that joins while a reopen is
    /// under way is not: it stays pending until the next reopen includes it.
    included: bool,
    /// Served before the last reopen by time: skip changes at or before this.
    through: Option<Token>,
    link: Arc<Link>,
}

/// How the feed reaches a member's worker: it applies steps to the worker's hub itself (no
/// queue, no hand-off between tasks) and tells the worker's loop when it is done with it.
struct Link {
    worker: Weak<Worker>,
    signal: watch::Sender<Signal>,
}

/// What the feed tells a member's worker loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    /// The feed serves the worker.
    Serving,
    /// The worker ended (its last step was terminal): its loop stops.
    Ended,
    /// The feed cannot serve the worker (MongoDB refused its `$match`, or it failed the feed's
    /// cursor on a change): it must open a cursor of its own, from where the feed served it
    /// through (its hub's position; from now when it was not served yet).
    OwnCursor,
}

impl Link {
    /// Whether the member's worker still runs (not ended or cancelled).
    fn is_live(&self) -> bool {
        self.worker.upgrade().is_some_and(|w| !w.is_finished())
    }

    /// Applies `steps` to the worker in order; a terminal step ends it.
    fn deliver(&self, steps: Batch) {
        let Some(worker) = self.worker.upgrade() else {
            return; // It stopped; its membership is going.
        };
        for step in steps {
            if worker.apply(step).is_stop() {
                self.signal.send_replace(Signal::Ended);
                return;
            }
        }
    }
}

/// A worker's place in a feed; leaving (drop) removes it.
pub(crate) struct Membership {
    feed: Arc<Feed>,
    id: u64,
    signal: watch::Receiver<Signal>,
}

impl Membership {
    /// Waits until the feed is done with this worker (cancel-safe): it ended, or it must open
    /// a cursor of its own.
    pub async fn done(&mut self) -> Signal {
        match self.signal.wait_for(|s| *s != Signal::Serving).await {
            Ok(signal) => *signal,
            Err(_) => Signal::OwnCursor,
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let mut state = lock(&self.feed.state);
        state.members.retain(|m| m.id != self.id);
        if state.members.is_empty() {
            drop(state);
            self.feed.changed.notify_one();
        }
    }
}

/// Whether a worker with `spec` can share a database cursor: its pipeline only filters.
pub(crate) fn shareable(spec: &WatchSpec) -> bool {
    spec.pipeline
        .iter()
        .all(|stage| stage.len() == 1 && stage.get_document("$match").is_ok())
}

impl Feeds {
    /// Joins `worker` to its database's feed, starting one if needed. `None` when the worker's
    /// pipeline cannot be shared.
    pub fn join(&self, context: &Arc<WorkerContext>, worker: &Arc<Worker>) -> Option<Membership> {
        let spec = worker.spec();
        if !worker.settings().shared_database_cursors || !shareable(spec) {
            return None;
        }
        let key = FeedKey {
            db: spec.db.clone(),
            full_document: spec.full_document,
            full_document_before_change: spec.full_document_before_change,
        };
        let (signal, watch_signal) = watch::channel(Signal::Serving);
        let link = Arc::new(Link {
            worker: Arc::downgrade(worker),
            signal,
        });
        let member = Member {
            id: 0,
            coll: spec.coll.clone(),
            pipeline: spec.pipeline.clone(),
            rules: spec.routing.clone().into(),
            membership: spec.membership.clone(),
            pending: true,
            included: false,
            through: None,
            link,
        };
        let mut feeds = lock(&self.feeds);
        if let Some(feed) = feeds.get(&key) {
            let mut state = lock(&feed.state);
            if !state.stopped {
                if state.isolates(&member.coll, &member.pipeline) {
                    // Its `$match` failed this feed on a change once: it would again.
                    return None;
                }
                // A replaced definition's worker may not have left yet: it no longer counts.
                state.members.retain(|m| m.link.is_live());
                if state
                    .members
                    .iter()
                    .any(|m| m.coll == member.coll && m.pipeline != member.pipeline)
                {
                    // One filter per collection keeps routing by `ns.coll` exact.
                    return None;
                }
                let id = state.add(member);
                drop(state);
                feed.changed.notify_one();
                return Some(Membership {
                    feed: Arc::clone(feed),
                    id,
                    signal: watch_signal,
                });
            }
        }
        let mut state = State {
            members: Vec::new(),
            next_id: 1,
            reopen: true,
            stopped: false,
            isolated: Vec::new(),
        };
        let id = state.add(member);
        let feed = Arc::new(Feed {
            key: key.clone(),
            state: Mutex::new(state),
            changed: Notify::new(),
        });
        feeds.insert(key, Arc::clone(&feed));
        drop(feeds);
        let mut options = spec.options();
        // One cursor for a whole database can afford short waits (10 getMore/s when idle), and
        // a reopen for a join cancels the waiting `getMore`, whose server cursor and
        // connection live until that wait ends: short waits keep a burst of joins from
        // piling up such cursors.
        options.max_await_time = Some(context.settings.max_await.min(FEED_MAX_AWAIT));
        // Counted for the feed, not for a member: the closures must not keep a worker alive.
        let (opened, skipped) = (Arc::clone(&context.metrics), Arc::clone(&context.metrics));
        let template = Watch {
            client: context.client.clone(),
            db: spec.db.clone(),
            coll: None,
            // Set from the members at every (re)open.
            pipeline: Vec::new(),
            options,
            probe_fields: Vec::new(),
            features: worker.features(),
            isolation_changes: context.settings.oversize_isolation_changes,
            max_backoff: context.settings.max_backoff,
            label: format!("{} (database feed)", spec.db),
            on_open: Arc::new(move || {
                opened.cursors_opened.inc();
            }),
            on_skip: Arc::new(move || {
                skipped.oversize_skipped.inc();
            }),
        };
        let task = FeedTask {
            feed: Arc::clone(&feed),
            context: Arc::clone(context),
            template,
        };
        context.metrics.database_feeds.inc();
        let metrics = Arc::clone(&context.metrics);
        context.tracker.spawn(async move {
            task.run().await;
            metrics.database_feeds.dec();
        });
        Some(Membership {
            feed,
            id,
            signal: watch_signal,
        })
    }
}

impl State {
    /// The cursor is open: pending members it includes start at `start`; served members learn
    /// it is running; members that joined during the open wait for the next one.
    fn opened(&mut self, start: Option<Token>, outbox: &mut Outbox) {
        for member in &mut self.members {
            let step = match (member.pending, member.included) {
                (true, true) => {
                    member.pending = false;
                    Step::Opened(start.clone())
                }
                (true, false) => continue,
                (false, _) => Step::Opened(None),
            };
            outbox.push(member.id, &member.link, step);
        }
    }

    /// Whether a member on `coll` with `pipeline` failed this feed once (and must not join).
    fn isolates(&self, coll: &str, pipeline: &[Document]) -> bool {
        self.isolated
            .iter()
            .any(|(c, p)| c == coll && p.as_slice() == pipeline)
    }

    fn add(&mut self, mut member: Member) -> u64 {
        member.id = self.next_id;
        self.next_id += 1;
        self.reopen = true;
        let id = member.id;
        self.members.push(member);
        id
    }
}

/// The feed's cursor loop and what it needs.
struct FeedTask {
    feed: Arc<Feed>,
    context: Arc<WorkerContext>,
    /// The database's watch (client, options, features, counters); each open sets its
    /// pipeline and probe fields from the members.
    template: Watch,
}

impl FeedTask {
    async fn run(self) {
        tracing::info!(db = %self.feed.key.db, "database feed started");
        let mut source: Option<ChangeSource> = None;
        let mut read = Reading::default();
        loop {
            if self.stop_if_empty() {
                break;
            }
            let reopen = std::mem::take(&mut lock(&self.feed.state).reopen);
            if reopen || source.is_none() {
                let position = source.as_ref().and_then(|s| s.position().cloned());
                read.pending_start = position
                    .as_ref()
                    .and_then(Token::cluster_time)
                    .map(Token::before_cluster_time);
                source = Some(self.reopen(position));
                read.joined = true;
            }
            let Some(cursor) = source.as_mut() else {
                continue;
            };
            let changed = self.feed.changed.notified();
            let first = tokio::select! {
                _ = changed => continue,
                step = cursor.next() => step,
            };
            // Everything the driver already holds goes out together: each member's worker
            // publishes its batch back to back, as it would from a cursor of its own.
            let mut outbox = Outbox::default();
            let mut end = self.take(first, &mut read, &mut outbox);
            // Only from an open cursor: an open polled once and dropped would leave its
            // server-side cursor behind.
            while end.is_none() && outbox.steps < BATCH && cursor.is_open() {
                match cursor.next().now_or_never() {
                    Some(step) => end = self.take(step, &mut read, &mut outbox),
                    None => break,
                }
            }
            outbox.deliver();
            match end {
                None => {}
                Some(End::Refused(message)) => {
                    tracing::warn!(db = %self.feed.key.db, %message, "database feed refused a new member's $match; it opens its own cursor");
                    // Reopen from where the feed stood, without them.
                    let position = cursor.position().cloned();
                    source = Some(self.reopen(position));
                }
                Some(End::Failed(message)) => {
                    // Perhaps one member's `$match` failed on a change: find it, and go on
                    // without it from where the feed stood.
                    let position = cursor.position().cloned();
                    if self.isolate_culprits(position.as_ref(), &message).await {
                        source = Some(self.reopen(position));
                    } else {
                        tracing::error!(db = %self.feed.key.db, %message, "database feed failed");
                        self.end(|| Step::Failed(ErrorCode::Upstream, message.clone()));
                        break;
                    }
                }
                Some(End::With(step)) => {
                    self.end(|| clone_terminal(&step));
                    break;
                }
            }
        }
        tracing::info!(db = %self.feed.key.db, "database feed stopped");
    }

    /// Adds what `step` means for the members to `outbox`; `Some` when the feed must reopen
    /// without the newly joined filters, or end.
    fn take(&self, step: Step<RawChange>, read: &mut Reading, outbox: &mut Outbox) -> Option<End> {
        match step {
            Step::Opened(start) => {
                read.joined = false;
                self.opened(read.pending_start.take().or(start), outbox);
            }
            Step::Change(raw) => {
                read.last_change = Some(raw.id.clone());
                self.route(raw, outbox);
            }
            Step::Quiet(Some(token)) if Some(&token) != read.last_change.as_ref() => {
                self.high_water_mark(&token, outbox);
            }
            Step::Quiet(_) => {}
            Step::Retrying(error) => {
                tracing::warn!(db = %self.feed.key.db, %error, "database feed cursor lost, retrying");
                self.context.metrics.worker_retries.inc();
                self.to_served(|| Step::Retrying(error.clone()), outbox);
            }
            Step::Invalidated(event) => return Some(End::With(Step::Invalidated(event))),
            Step::Failed(code, message) => {
                if read.joined && code == ErrorCode::Upstream && self.refuse_pending_filters() {
                    return Some(End::Refused(message));
                }
                if code == ErrorCode::Upstream {
                    return Some(End::Failed(message));
                }
                tracing::error!(db = %self.feed.key.db, code = code.as_str(), %message, "database feed failed");
                return Some(End::With(Step::Failed(code, message)));
            }
        }
        None
    }

    /// A source for the current members: from now, or at the cluster time of `position`.
    fn reopen(&self, position: Option<Token>) -> ChangeSource {
        let mut state = lock(&self.feed.state);
        for member in &mut state.members {
            member.included = true;
            if !member.pending {
                member.through.clone_from(&position);
            }
        }
        let watch = Watch {
            pipeline: vec![doc! { "$match": filter(&state.members) }],
            probe_fields: probe_fields(&state.members),
            ..self.template.clone()
        };
        drop(state);
        match position {
            Some(position) => ChangeSource::at_time_of(watch, position),
            None => ChangeSource::new(watch, None),
        }
    }

    /// The cursor is open: pending members start at `start`, the others learn it is running.
    fn opened(&self, start: Option<Token>, outbox: &mut Outbox) {
        lock(&self.feed.state).opened(start, outbox);
    }

    /// Routes a change to the members on its collection.
    fn route(&self, raw: RawChange, outbox: &mut Outbox) {
        let mut state = lock(&self.feed.state);
        let Some(coll) = raw.coll() else {
            return; // `dropDatabase`: each collection's `drop` came before it.
        };
        let served = |m: &Member| {
            !m.pending && m.coll == coll && m.through.as_ref().is_none_or(|t| &raw.id > t)
        };
        let ends = matches!(raw.operation_type(), "drop" | "rename");
        let targets: Vec<Target> = state
            .members
            .iter()
            .filter(|m| served(m))
            .map(|m| Target {
                id: m.id,
                link: Arc::clone(&m.link),
                rules: Arc::clone(&m.rules),
                membership: m.membership.clone(),
                end_check: (ends && !m.pipeline.is_empty()).then(|| m.pipeline.clone()),
            })
            .collect();
        if targets.is_empty() {
            return;
        }
        if ends {
            // The collection is gone: its members end, as a collection stream's would.
            state.members.retain(|m| !served(m));
        }
        drop(state);
        let invalidate = ends.then(|| Arc::new(invalidate_after(&raw)));
        // Whether a filtering member's `$match` takes the `drop`/`rename` is MongoDB's to say.
        let ending = targets
            .iter()
            .any(|t| t.end_check.is_some())
            .then(|| raw.doc.clone());
        let mut encoder = Encoder::new(raw);
        for target in targets {
            let routed = match encoder.routed(&target.rules, target.membership.as_deref()) {
                Ok((routed, missing)) => {
                    if missing {
                        self.context.metrics.membership_without_pre_image.inc();
                    }
                    routed
                }
                Err(error) => {
                    let step = Step::Failed(ErrorCode::Upstream, error.to_string());
                    outbox.push(target.id, &target.link, step);
                    continue;
                }
            };
            match (&invalidate, target.end_check, &ending) {
                (Some(invalidate), Some(pipeline), Some(change)) => {
                    outbox.ends.push(EndCheck {
                        db: self.template.client.database(&self.template.db),
                        tracker: self.context.tracker.clone(),
                        change: change.clone(),
                        pipeline,
                        link: target.link,
                        routed,
                        invalidate: Arc::clone(invalidate),
                    });
                }
                (Some(invalidate), _, _) => {
                    outbox.push(target.id, &target.link, Step::Change(routed));
                    let step = Step::Invalidated(Arc::clone(invalidate));
                    outbox.push(target.id, &target.link, step);
                }
                (None, _, _) => outbox.push(target.id, &target.link, Step::Change(routed)),
            }
        }
    }

    /// A post-batch token that is not a change: every served member has read through it.
    fn high_water_mark(&self, token: &Token, outbox: &mut Outbox) {
        let state = lock(&self.feed.state);
        for m in &state.members {
            if !m.pending && m.through.as_ref().is_none_or(|t| token > t) {
                outbox.push(m.id, &m.link, Step::Quiet(Some(token.clone())));
            }
        }
    }

    /// `step` for every served member.
    fn to_served(&self, step: impl Fn() -> Step<Routed>, outbox: &mut Outbox) {
        let state = lock(&self.feed.state);
        for m in state.members.iter().filter(|m| !m.pending) {
            outbox.push(m.id, &m.link, step());
        }
    }

    /// After a refused open: pending members with a `$match` leave (their workers open their
    /// own cursors). `false` when there were none (the refusal is the feed's own).
    fn refuse_pending_filters(&self) -> bool {
        let mut state = lock(&self.feed.state);
        let (refused, kept) = std::mem::take(&mut state.members)
            .into_iter()
            .partition::<Vec<_>, _>(|m| m.pending && m.included && !m.pipeline.is_empty());
        state.members = kept;
        drop(state);
        for member in &refused {
            member.link.signal.send_replace(Signal::OwnCursor);
        }
        !refused.is_empty()
    }

    /// After the cursor failed on a change: probes the members whose `$match` can fail on one,
    /// and moves those that fail alone to cursors of their own (remembered, so that they do not
    /// rejoin). `false` when none was found (the failure is the feed's own, or the search ran
    /// out of time).
    async fn isolate_culprits(&self, from: Option<&Token>, message: &str) -> bool {
        let Some(from) = from else {
            return false;
        };
        let suspects: Vec<Suspect> = {
            let state = lock(&self.feed.state);
            suspects(&state.members)
        };
        if suspects.is_empty() {
            return false;
        }
        let started = Instant::now();
        let deadline = started + self.context.settings.feed_probe_timeout;
        let head = self.oplog_head(deadline).await;
        let culprits =
            find_culprits(suspects, |group| self.probe(group, from, head, deadline)).await;
        if culprits.is_empty() {
            tracing::warn!(db = %self.feed.key.db, %message, elapsed_ms = started.elapsed().as_millis() as u64, "database feed failed and no member's $match fails alone");
            return false;
        }
        let gone = {
            let mut guard = lock(&self.feed.state);
            let state = &mut *guard;
            for m in state.members.iter().filter(|m| culprits.contains(&m.id)) {
                let key = (m.coll.clone(), m.pipeline.clone());
                if !state.isolated.contains(&key) {
                    state.isolated.push(key);
                }
            }
            // With them, a worker of the same filter that joined during the search.
            let (gone, kept) = std::mem::take(&mut state.members)
                .into_iter()
                .partition::<Vec<_>, _>(|m| state.isolates(&m.coll, &m.pipeline));
            state.members = kept;
            gone
        };
        for member in &gone {
            let stream = member
                .link
                .worker
                .upgrade()
                .map(|w| w.key.stream.to_string());
            tracing::warn!(db = %self.feed.key.db, coll = %member.coll, stream = stream.as_deref().unwrap_or(""), %message, elapsed_ms = started.elapsed().as_millis() as u64, "a stream's $match failed the database feed on a change; it reads a cursor of its own from now on");
            self.context.metrics.database_feed_isolations.inc();
            member.link.signal.send_replace(Signal::OwnCursor);
        }
        true
    }

    /// The time of the last write MongoDB has applied (`hello`'s `lastWrite`): the change the
    /// feed failed on is at or before it. `None` if it cannot tell by `deadline`.
    async fn oplog_head(&self, deadline: Instant) -> Option<Timestamp> {
        let admin = self.template.client.database("admin");
        let hello = admin.run_command(doc! { "hello": 1 });
        let reply = tokio::time::timeout_at(deadline, hello).await.ok()?.ok()?;
        reply
            .get_document("lastWrite")
            .and_then(|w| w.get_document("opTime"))
            .and_then(|t| t.get_timestamp("ts"))
            .ok()
    }

    /// Reads the feed's clauses for `group` alone from the cluster time of `from`: does it fail
    /// before reading past `head` (an empty batch, or a change after it)?
    async fn probe(
        &self,
        group: Vec<Suspect>,
        from: &Token,
        head: Option<Timestamp>,
        deadline: Instant,
    ) -> Verdict {
        let mut options = self.template.options.clone();
        options.max_await_time = Some(PROBE_MAX_AWAIT);
        let watch = Watch {
            pipeline: vec![doc! { "$match": filter_of(group.iter().map(Suspect::clause)) }],
            options,
            probe_fields: Vec::new(),
            label: format!("{} (database feed probe)", self.feed.key.db),
            on_skip: Arc::new(|| {}),
            ..self.template.clone()
        };
        let mut source = ChangeSource::at_time_of(watch, from.clone());
        let read = async {
            loop {
                match source.next().await {
                    Step::Opened(_) | Step::Quiet(None) => {}
                    Step::Change(raw) => {
                        let past = |head| raw.id.cluster_time().is_some_and(|t| t > head);
                        if head.is_some_and(past) {
                            return Verdict::Passes;
                        }
                    }
                    // An empty batch: it read to the oplog's head, which is past the failure.
                    Step::Quiet(Some(_)) | Step::Invalidated(_) => return Verdict::Passes,
                    Step::Failed(ErrorCode::Upstream, _) => return Verdict::Fails,
                    Step::Retrying(_) | Step::Failed(..) => return Verdict::Unknown,
                }
            }
        };
        tokio::time::timeout_at(deadline, read)
            .await
            .unwrap_or(Verdict::Unknown)
    }

    /// Ends every member with `step` and stops the feed.
    fn end(&self, step: impl Fn() -> Step<Routed>) {
        let members = {
            let mut feeds = lock(&self.context.feeds.feeds);
            let mut state = lock(&self.feed.state);
            state.stopped = true;
            remove_if_current(&mut feeds, &self.feed);
            std::mem::take(&mut state.members)
        };
        let mut outbox = Outbox::default();
        for member in members {
            outbox.push(member.id, &member.link, step());
        }
        outbox.deliver();
    }

    /// Stops the feed if it still has no members (checked under the feeds' lock, so a worker
    /// joining now either joins before this or starts a new feed). Returns whether it did.
    fn stop_if_empty(&self) -> bool {
        // The common case without the feeds' lock (every feed's loop passes here per batch).
        if !lock(&self.feed.state).members.is_empty() {
            return false;
        }
        let mut feeds = lock(&self.context.feeds.feeds);
        let mut state = lock(&self.feed.state);
        if !state.members.is_empty() {
            return false;
        }
        state.stopped = true;
        remove_if_current(&mut feeds, &self.feed);
        true
    }
}

/// Removes `feed` from the map unless another feed has taken its key.
fn remove_if_current(feeds: &mut HashMap<FeedKey, Arc<Feed>>, feed: &Arc<Feed>) {
    if feeds.get(&feed.key).is_some_and(|f| Arc::ptr_eq(f, feed)) {
        feeds.remove(&feed.key);
    }
}

/// Steps for members, in order per member, sent as one batch each.
#[derive(Default)]
struct Outbox {
    batches: Vec<(Arc<Link>, Batch)>,
    /// Member id → index in `batches`.
    index: HashMap<u64, usize>,
    /// Steps held, over all members.
    steps: usize,
    /// Filtering members ended by their collection's `drop`/`rename`, checked after the batch.
    ends: Vec<EndCheck>,
}

impl Outbox {
    fn push(&mut self, member: u64, link: &Arc<Link>, step: Step<Routed>) {
        let at = *self.index.entry(member).or_insert_with(|| {
            self.batches.push((Arc::clone(link), Vec::new()));
            self.batches.len() - 1
        });
        self.batches[at].1.push(step);
        self.steps += 1;
    }

    /// Applies every member's batch to its worker (a member that left is skipped).
    fn deliver(self) {
        for (link, batch) in self.batches {
            link.deliver(batch);
        }
        for end in self.ends {
            end.spawn();
        }
    }
}

/// Ends a filtering member after its collection's `drop` or `rename`: the change first if its
/// `$match` takes it (MongoDB evaluates that, over `$documents`), then the `invalidate`, as
/// its own collection cursor would. The member has left the feed, so nothing else reaches it
/// meanwhile; the check starts after the batch with the member's earlier changes went out.
struct EndCheck {
    db: mongodb::Database,
    tracker: tokio_util::task::TaskTracker,
    change: Document,
    pipeline: Vec<Document>,
    link: Arc<Link>,
    routed: Routed,
    invalidate: Arc<Event>,
}

impl EndCheck {
    fn spawn(self) {
        let tracker = self.tracker.clone();
        tracker.spawn(async move {
            let id = self.change.get("_id").cloned();
            let takes = match taken_by(&self.db, vec![self.change], &self.pipeline).await {
                Ok(taken) => id.is_some_and(|id| taken.contains(&id)),
                Err(error) => {
                    tracing::warn!(%error, "could not tell whether a stream's $match takes its collection's end; sending the invalidate alone");
                    false
                }
            };
            let mut steps = Vec::with_capacity(2);
            if takes {
                steps.push(Step::Change(self.routed));
            }
            steps.push(Step::Invalidated(self.invalidate));
            self.link.deliver(steps);
        });
    }
}

/// The `_id`s of those of `changes` that the `$match` stages `pipeline` take, as MongoDB
/// evaluates them over `$documents` (only MongoDB evaluates a `$match`). Bounded by
/// [`END_CHECK_TIMEOUT`].
pub(crate) async fn taken_by(
    db: &mongodb::Database,
    changes: Vec<Document>,
    pipeline: &[Document],
) -> Result<Vec<Bson>, String> {
    let mut stages = vec![doc! { "$documents": changes }];
    stages.extend(pipeline.iter().cloned());
    stages.push(doc! { "$project": { "_id": 1 } });
    let taken = async {
        let mut cursor = db.aggregate(stages).await?;
        let mut ids = Vec::new();
        while cursor.advance().await? {
            if let Ok(id) = cursor.current().get("_id") {
                ids.extend(id.and_then(|id| Bson::try_from(id.to_raw_bson()).ok()));
            }
        }
        Ok::<_, mongodb::error::Error>(ids)
    };
    match tokio::time::timeout(END_CHECK_TIMEOUT, taken).await {
        Ok(Ok(ids)) => Ok(ids),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// Steps for one member, applied back to back.
type Batch = Vec<Step<Routed>>;

/// One member's share of a change.
struct Target {
    id: u64,
    link: Arc<Link>,
    rules: Arc<[MatchRule]>,
    membership: Option<Arc<MembershipSpec>>,
    /// For a `drop`/`rename` reaching a filtering member: its `$match` stages, for MongoDB to
    /// say whether they take it.
    end_check: Option<Vec<Document>>,
}

/// What the feed's loop remembers between steps.
#[derive(Default)]
struct Reading {
    /// Start position of pending members after a reopen by time ("before T").
    pending_start: Option<Token>,
    /// Members joined since the last successful open (a refusal may be theirs).
    joined: bool,
    /// Id of the last change read (a post-batch token equal to it is not a high-water mark).
    last_change: Option<Token>,
}

/// How a batch ended the feed's reading.
enum End {
    /// MongoDB refused the new members' filters: reopen without them.
    Refused(String),
    /// The cursor failed with an error retrying cannot fix: perhaps a member's `$match` failed
    /// on a change (find it and reopen without it), else every member ends with it.
    Failed(String),
    /// Every member ends with this step.
    With(Step<Routed>),
}

/// The terminal step for one more member (`Step` is not `Clone`; its parts are).
fn clone_terminal(step: &Step<Routed>) -> Step<Routed> {
    match step {
        Step::Invalidated(event) => Step::Invalidated(Arc::clone(event)),
        Step::Failed(code, message) => Step::Failed(*code, message.clone()),
        _ => Step::Failed(ErrorCode::Upstream, "database feed ended".into()),
    }
}

/// A member whose `$match` may have failed the feed's cursor.
#[derive(Debug, Clone)]
struct Suspect {
    id: u64,
    coll: String,
    pipeline: Vec<Document>,
}

impl Suspect {
    fn clause(&self) -> (&str, &[Document]) {
        (&self.coll, &self.pipeline)
    }
}

/// What a probe learned about a group of suspects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Its clauses alone failed as the feed did.
    Fails,
    /// They read past the point where the feed failed.
    Passes,
    /// No answer (a transient error, out of time): not a culprit.
    Unknown,
}

/// The served members in the failed cursor's filter whose `$match` can fail on a change.
fn suspects(members: &[Member]) -> Vec<Suspect> {
    members
        .iter()
        .filter(|m| m.included && !m.pending && fails_on_data(&m.pipeline))
        .map(|m| Suspect {
            id: m.id,
            coll: m.coll.clone(),
            pipeline: m.pipeline.clone(),
        })
        .collect()
}

/// Whether a `$match` can fail on a change rather than only when the cursor opens: query
/// operators are checked when MongoDB parses them, but `$expr` evaluates aggregation
/// expressions (`$toInt`, `$divide`, `$function`, …) on each change.
pub(crate) fn fails_on_data(pipeline: &[Document]) -> bool {
    fn has_expr(value: &Bson) -> bool {
        match value {
            Bson::Document(doc) => doc.iter().any(|(k, v)| k == "$expr" || has_expr(v)),
            Bson::Array(items) => items.iter().any(has_expr),
            _ => false,
        }
    }
    pipeline
        .iter()
        .any(|stage| stage.iter().any(|(k, v)| k == "$expr" || has_expr(v)))
}

/// The members of `suspects` that fail alone, by `probe`: the whole group first (a failure
/// that does not come back names nobody), then the halves of each failing group, the halves
/// of one round probed together. `k` culprits among `n` cost about `2k·log2(n)` probes, at
/// most `2k` at a time.
async fn find_culprits<F, Fut>(suspects: Vec<Suspect>, probe: F) -> Vec<u64>
where
    F: Fn(Vec<Suspect>) -> Fut,
    Fut: std::future::Future<Output = Verdict>,
{
    let mut culprits = Vec::new();
    let mut round = vec![suspects];
    while !round.is_empty() {
        let verdicts = futures::future::join_all(round.iter().cloned().map(&probe)).await;
        let mut next = Vec::new();
        for (mut group, verdict) in round.into_iter().zip(verdicts) {
            if verdict != Verdict::Fails {
                continue;
            }
            if group.len() == 1 {
                culprits.extend(group.iter().map(|s| s.id));
            } else {
                let half = group.split_off(group.len() / 2);
                next.push(group);
                next.push(half);
            }
        }
        round = next;
    }
    culprits
}

/// The feed's `$match`: each collection with its members' conditions, plus the `drop` and
/// `rename` that end a collection whose members filter (they must learn it ended).
fn filter(members: &[Member]) -> Document {
    filter_of(
        members
            .iter()
            .map(|m| (m.coll.as_str(), m.pipeline.as_slice())),
    )
}

/// [`filter`] of (collection, pipeline) pairs (also the relay's fleet feeds' `$match`).
pub(crate) fn filter_of<'a>(members: impl Iterator<Item = (&'a str, &'a [Document])>) -> Document {
    let mut clauses: Vec<Document> = Vec::new();
    let mut filtered_colls: Vec<&str> = Vec::new();
    for (coll, pipeline) in members {
        let mut all = vec![doc! { "ns.coll": coll }];
        for stage in pipeline {
            if let Ok(condition) = stage.get_document("$match") {
                all.push(condition.clone());
            }
        }
        let clause = if all.len() == 1 {
            all.remove(0)
        } else {
            filtered_colls.push(coll);
            doc! { "$and": all }
        };
        if !clauses.contains(&clause) {
            clauses.push(clause);
        }
    }
    filtered_colls.sort_unstable();
    filtered_colls.dedup();
    if !filtered_colls.is_empty() {
        clauses.push(doc! {
            "ns.coll": { "$in": filtered_colls },
            "operationType": { "$in": ["drop", "rename"] },
        });
    }
    doc! { "$or": clauses }
}

/// Fields an oversize probe keeps: `ns` (to route the skipped change) and every member's
/// routing fields.
fn probe_fields(members: &[Member]) -> Vec<String> {
    let mut fields: Vec<String> = members
        .iter()
        .flat_map(|m| m.rules.iter().map(|r| r.field.join(".")))
        .collect();
    fields.sort_unstable();
    fields.dedup();
    fields
}

/// The `invalidate` a collection stream sends after its collection's `drop` or `rename`.
pub(crate) fn invalidate_after(change: &RawChange) -> Event {
    let mut invalidate = doc! { "_id": change.doc.get("_id").cloned().unwrap_or_default(), "operationType": "invalidate" };
    for key in ["clusterTime", "wallTime"] {
        if let Some(value) = change.doc.get(key) {
            invalidate.insert(key, value.clone());
        }
    }
    Event::from_change(invalidate).unwrap_or_else(|_| {
        Event::control(
            EventKind::Invalidate,
            "the collection was dropped or renamed",
            false,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(coll: &str, pipeline: Vec<Document>, pending: bool) -> Member {
        Member {
            id: 0,
            coll: coll.into(),
            pipeline,
            rules: Vec::new().into(),
            membership: None,
            pending,
            included: !pending,
            through: None,
            link: Arc::new(Link {
                worker: Weak::new(),
                signal: watch::channel(Signal::Serving).0,
            }),
        }
    }

    #[test]
    fn only_filtering_pipelines_are_shared() {
        let spec = |pipeline| WatchSpec {
            db: "d".into(),
            coll: "c".into(),
            pipeline,
            full_document: FullDocument::Default,
            full_document_before_change: FullDocumentBeforeChange::Off,
            routing: Vec::new(),
            membership: None,
        };
        assert!(shareable(&spec(vec![])));
        assert!(shareable(&spec(vec![
            doc! {"$match": {"operationType": "insert"}},
            doc! {"$match": {"fullDocument.x": 1}},
        ])));
        assert!(!shareable(&spec(vec![doc! {"$project": {"x": 1}}])));
        assert!(!shareable(&spec(vec![
            doc! {"$match": {"x": 1}, "$project": {"x": 1}}
        ])));
    }

    #[test]
    fn filter_is_the_or_of_each_collection_with_its_conditions() {
        let members = vec![
            member("a", vec![], false),
            member("a", vec![], true),
            member(
                "b",
                vec![doc! {"$match": {"operationType": "insert"}}],
                false,
            ),
        ];
        let filter = filter(&members);
        assert_eq!(
            filter,
            doc! { "$or": [
                { "ns.coll": "a" },
                { "$and": [ { "ns.coll": "b" }, { "operationType": "insert" } ] },
                { "ns.coll": { "$in": ["b"] }, "operationType": { "$in": ["drop", "rename"] } },
            ] }
        );
    }

    #[test]
    fn a_member_that_joins_during_an_open_waits_for_the_next_one() {
        let start = Token::parse("826B083BE7000000152B").unwrap();
        let mut served = member("a", vec![], false);
        served.id = 1;
        let mut included = member("b", vec![], true);
        included.id = 2;
        included.included = true;
        let mut late = member("c", vec![], true);
        late.id = 3;
        let mut state = State {
            members: vec![served, included, late],
            next_id: 4,
            reopen: true,
            stopped: false,
            isolated: Vec::new(),
        };
        let mut outbox = Outbox::default();
        state.opened(Some(start.clone()), &mut outbox);
        let steps: Vec<(u64, Option<Token>)> = outbox
            .index
            .iter()
            .map(|(id, at)| match &outbox.batches[*at].1[..] {
                [Step::Opened(position)] => (*id, position.clone()),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        let mut steps = steps;
        steps.sort_by_key(|(id, _)| *id);
        assert_eq!(steps, vec![(1, None), (2, Some(start))]);
        assert!(!state.members[1].pending);
        assert!(state.members[2].pending, "not in this cursor's filter");
    }

    #[test]
    fn only_members_whose_match_evaluates_expressions_are_suspects() {
        let poison = doc! {"$match": {"$expr": {"$eq": [{"$toInt": "$fullDocument.code"}, 5]}}};
        let nested =
            doc! {"$match": {"$or": [{"x": 1}, {"$and": [{"$expr": {"$gt": ["$a", 1]}}]}]}};
        assert!(fails_on_data(std::slice::from_ref(&poison)));
        assert!(fails_on_data(&[doc! {"$match": {"x": 1}}, nested.clone()]));
        assert!(!fails_on_data(&[]));
        assert!(!fails_on_data(&[
            doc! {"$match": {"operationType": "insert", "fullDocument.name": {"$regex": "^a"}}}
        ]));
        // A field named like an operator inside a value is not one (`$literal` strings).
        assert!(!fails_on_data(&[doc! {"$match": {"note": "$expr"}}]));

        let mut plain = member("a", vec![], false);
        plain.id = 1;
        let mut bad = member("b", vec![poison.clone()], false);
        bad.id = 2;
        let mut joining = member("c", vec![poison], true);
        joining.id = 3;
        let ids: Vec<u64> = suspects(&[plain, bad, joining])
            .iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(ids, vec![2], "served and in the failed cursor's filter");
    }

    #[test]
    fn bisection_finds_every_culprit_and_names_nobody_when_the_failure_does_not_come_back() {
        let suspects: Vec<Suspect> = (1..=9)
            .map(|id| Suspect {
                id,
                coll: format!("c{id}"),
                pipeline: Vec::new(),
            })
            .collect();
        let run = |bad: Vec<u64>| {
            let probes = std::sync::atomic::AtomicUsize::new(0);
            let found = futures::executor::block_on(find_culprits(suspects.clone(), |group| {
                probes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let fails = group.iter().any(|s| bad.contains(&s.id));
                async move {
                    if fails {
                        Verdict::Fails
                    } else {
                        Verdict::Passes
                    }
                }
            }));
            (found, probes.into_inner())
        };
        let (found, probes) = run(vec![7]);
        assert_eq!(found, vec![7]);
        assert!(probes <= 1 + 2 * 4, "{probes} probes for 1 culprit of 9");
        let (mut found, _) = run(vec![2, 9]);
        found.sort_unstable();
        assert_eq!(found, vec![2, 9]);
        assert_eq!(run(vec![]), (vec![], 1), "one probe, nobody named");
    }

    #[test]
    fn an_invalidate_follows_a_drop_with_its_id() {
        let drop = RawChange {
            id: Token::parse("826B083BE7000000152B").unwrap(),
            doc: doc! { "_id": {"_data": "826B083BE7000000152B"}, "operationType": "drop", "ns": {"db": "d", "coll": "c"} },
            skipped: false,
        };
        let event = invalidate_after(&drop);
        assert_eq!(event.kind, EventKind::Invalidate);
        assert_eq!(event.id, Some(drop.id.clone()));
    }
}
