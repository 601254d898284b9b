//! A change-stream cursor that reopens itself from its last position and never wedges.
//!
//! Both the worker's cursor and the shared catch-ups read through a [`ChangeSource`]:
//!
//! * A transient MongoDB error (network, election, restart) drops the cursor; the next call backs
//!   off ([`Backoff`]) and reopens it from the last event's token or the latest post-batch token.
//! * A change over MongoDB's 16 MB document limit must not end the stream (every client that
//!   resumes would hit it again). On servers with `$changeStreamSplitLargeEvent` (6.0.9+, 7.0+) the
//!   stage is appended and the fragments are reassembled into one change. On older servers the
//!   `getMore` fails with `BSONObjectTooLarge`, and the ordinary changes before the large one in
//!   that batch (a transaction's other operations, a catch-up's backlog, on a database feed
//!   another collection's change) fail with it. The source first *isolates* the large change:
//!   it reopens from its last position with batches of one change and delivers the ordinary
//!   changes one by one, until a `getMore` (or the open's first batch) of one change fails: that
//!   change, the first after the last one delivered, is the large one. It then opens a short
//!   *probe* cursor from that position with the same pipeline plus a `$project` to a few small
//!   fields, reads the change's id, emits `event: skipped` (`event_too_large`) with that id
//!   alone, and goes on after it with full batches. Isolating ends early after
//!   `oversize_isolation_changes` changes or an empty batch (the change was large only for a
//!   moment: `updateLookup` reads the document as it is now), and begins again if the large
//!   change is still ahead.

use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::{Document, doc};
use mongodb::change_stream::ChangeStream;
use mongodb::options::ChangeStreamOptions;

use super::Worker;
use super::errors::{Disposition, classify, server_code};
use super::hub::Routed;
use super::membership::Encoder;
use crate::backoff::Backoff;
use crate::event::{EncodeError, ErrorCode, Event, EventKind, Token};
use crate::membership::Membership;
use crate::routing::MatchRule;
use prometheus_client::metrics::counter::Counter;

/// `BSONObjectTooLarge`: a change event over 16 MB on a server that cannot split it.
const BSON_OBJECT_TOO_LARGE: i32 = 10334;

/// What the MongoDB server can do, from its reported version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerFeatures {
    /// `$changeStreamSplitLargeEvent` is available (6.0.9+ and 7.0+).
    pub split_large_events: bool,
}

impl ServerFeatures {
    /// Features of a server reporting `version` (`buildInfo.version`, e.g. `"6.0.5"`).
    pub fn from_version(version: &str) -> ServerFeatures {
        let mut parts = version
            .split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty())
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor, patch) = (
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
        );
        ServerFeatures {
            split_large_events: major >= 7 || (major == 6 && minor == 0 && patch >= 9),
        }
    }

    /// Asks the server (`buildInfo`, bounded by [`DETECT_TIMEOUT`]). `None` when it cannot
    /// answer now: the caller uses the conservative defaults and asks again next time.
    pub async fn detect(client: &mongodb::Client) -> Option<ServerFeatures> {
        let admin = client.database("admin");
        let command = admin.run_command(doc! { "buildInfo": 1 });
        match tokio::time::timeout(DETECT_TIMEOUT, command).await {
            Ok(Ok(info)) => Some(ServerFeatures::from_version(
                info.get_str("version").unwrap_or(""),
            )),
            Ok(Err(error)) => {
                tracing::warn!(%error, "buildInfo failed; assuming no $changeStreamSplitLargeEvent for now");
                None
            }
            Err(_) => {
                tracing::warn!(
                    "buildInfo timed out; assuming no $changeStreamSplitLargeEvent for now"
                );
                None
            }
        }
    }
}

/// How long a worker waits for `buildInfo` before opening its cursor anyway.
const DETECT_TIMEOUT: Duration = Duration::from_secs(2);

/// One step of a source: `C` is a [`RawChange`] straight from the cursor, or a [`Routed`]
/// change encoded for one worker.
#[derive(Debug)]
pub enum Step<C = Routed> {
    /// A cursor was (re)opened; its start position (for a first open: "now").
    Opened(Option<Token>),
    /// A change (or a `skipped` placeholder).
    Change(C),
    /// An empty batch; the post-batch token, if it moved.
    Quiet(Option<Token>),
    /// An `invalidate` (or a cursor the server closed): the stream is over.
    Invalidated(Arc<Event>),
    /// A transient error; the source backed off and will reopen on the next call.
    Retrying(String),
    /// An error retrying cannot fix (history lost, bad pipeline, bad token).
    Failed(ErrorCode, String),
}

/// A change as the cursor returned it, before encoding: a database feed routes it by `ns` and
/// computes each worker's routing values from it.
#[derive(Debug, Clone)]
pub struct RawChange {
    /// The change's resume token.
    pub id: Token,
    /// The change document (for a skipped change: the probe's small projection of it).
    pub doc: Document,
    /// Whether this stands for a change over 16 MB that was skipped.
    pub skipped: bool,
}

impl RawChange {
    /// The collection the change is about (`ns.coll`); `None` for database-wide events.
    pub fn coll(&self) -> Option<&str> {
        self.doc.get_document("ns").ok()?.get_str("coll").ok()
    }

    /// `operationType`.
    pub fn operation_type(&self) -> &str {
        self.doc.get_str("operationType").unwrap_or("")
    }
}

/// What a [`ChangeSource`] watches, and what it needs to do so.
#[derive(Clone)]
pub struct Watch {
    /// The MongoDB client.
    pub client: mongodb::Client,
    /// Database watched.
    pub db: String,
    /// Collection watched; `None` watches the whole database (a database feed).
    pub coll: Option<String>,
    /// The pipeline (without `$changeStreamSplitLargeEvent`, added here when the server has it).
    pub pipeline: Vec<Document>,
    /// Driver options without a position (`fullDocument…`, `maxAwaitTimeMS`).
    pub options: ChangeStreamOptions,
    /// Fields an oversize probe must keep (routing fields, `ns`).
    pub probe_fields: Vec<String>,
    /// What the server can do.
    pub features: ServerFeatures,
    /// Changes re-read one per batch while isolating an oversize change, at most.
    pub isolation_changes: usize,
    /// Upper bound of the reopen backoff.
    pub max_backoff: Duration,
    /// Name in logs.
    pub label: String,
    /// Called for every cursor opened (stats).
    pub on_open: Arc<dyn Fn() + Send + Sync>,
    /// Called for every change skipped as oversize (metrics).
    pub on_skip: Arc<dyn Fn() + Send + Sync>,
}

impl Watch {
    /// A worker's own collection cursor (and its catch-ups').
    pub fn of_worker(worker: &Arc<Worker>) -> Watch {
        let spec = worker.spec();
        let mut options = spec.options();
        options.max_await_time = Some(worker.settings().max_await);
        let counted = Arc::clone(worker);
        let skipped = Arc::clone(worker);
        Watch {
            client: worker.client().clone(),
            db: spec.db.clone(),
            coll: Some(spec.coll.clone()),
            pipeline: spec.pipeline.clone(),
            options,
            probe_fields: spec.routing.iter().map(|r| r.field.join(".")).collect(),
            features: worker.features(),
            isolation_changes: worker.settings().oversize_isolation_changes,
            max_backoff: worker.settings().max_backoff,
            label: worker.key.stream.to_string(),
            on_open: Arc::new(move || counted.count_cursor_opened()),
            on_skip: Arc::new(move || {
                skipped.metrics().oversize_skipped.inc();
            }),
        }
    }
}

/// Routes and encodes a worker's raw changes with its `match` rules and membership (§10):
/// the one step between a cursor (own, or relayed from the fleet's owner) and the hub.
pub struct ChangeRouter {
    rules: Vec<MatchRule>,
    membership: Option<Arc<Membership>>,
    /// Counts membership changes that came without a pre-image.
    without_pre_image: Counter,
}

impl ChangeRouter {
    /// The router of `worker`'s changes.
    pub fn of_worker(worker: &Worker) -> ChangeRouter {
        ChangeRouter {
            rules: worker.spec().routing.clone(),
            membership: worker.spec().membership.clone(),
            without_pre_image: worker.metrics().membership_without_pre_image.clone(),
        }
    }

    /// `step` with its change (if any) routed and encoded.
    pub fn route(&self, step: Step<RawChange>) -> Step<Routed> {
        match step {
            Step::Change(raw) => {
                match Encoder::new(raw).routed(&self.rules, self.membership.as_deref()) {
                    Ok((routed, missing)) => {
                        if missing {
                            self.without_pre_image.inc();
                        }
                        Step::Change(routed)
                    }
                    Err(error) => Step::Failed(ErrorCode::Upstream, error.to_string()),
                }
            }
            Step::Opened(start) => Step::Opened(start),
            Step::Quiet(token) => Step::Quiet(token),
            Step::Invalidated(event) => Step::Invalidated(event),
            Step::Retrying(error) => Step::Retrying(error),
            Step::Failed(code, message) => Step::Failed(code, message),
        }
    }
}

/// A worker's cursor: a [`ChangeSource`] whose changes are routed and encoded with the
/// worker's rules and membership.
pub struct WorkerSource {
    source: ChangeSource,
    router: ChangeRouter,
}

impl WorkerSource {
    /// The worker's own cursor from `after` (or "now").
    pub fn new(worker: &Arc<Worker>, after: Option<Token>) -> WorkerSource {
        WorkerSource {
            source: ChangeSource::new(Watch::of_worker(worker), after),
            router: ChangeRouter::of_worker(worker),
        }
    }

    /// The next step (cancel-safe, like [`ChangeSource::next`]).
    pub async fn next(&mut self) -> Step<Routed> {
        let step = self.source.next().await;
        self.router.route(step)
    }
}

/// Fragments of a split change being reassembled.
#[derive(Debug, Default)]
struct Fragments {
    merged: Document,
    received: i32,
}

/// A source re-reading one change per batch to find the change over 16 MB that failed a batch.
#[derive(Debug)]
struct Isolating {
    /// Where the source stood when the batch failed: an empty batch that has not moved past
    /// it says nothing about the large change.
    from: Option<Token>,
    /// Ordinary changes delivered since.
    delivered: usize,
}

/// A self-reopening change-stream cursor over a collection (or a database) and a pipeline.
pub struct ChangeSource {
    watch: Watch,
    cursor: Option<ChangeStream<Document>>,
    /// Resume after this when (re)opening; `None` = from now (first open of a fresh worker).
    position: Option<Token>,
    /// Open at the cluster time of `position` rather than after it as a token: the position
    /// came from another filter (a database feed whose collections changed), so this cursor
    /// may not see its event. The consumer skips what it already has. Cleared by the first
    /// position this cursor reports itself.
    by_time: bool,
    backoff: Backoff,
    fragments: Option<Fragments>,
    /// Whether the last open failed (the next call waits out the backoff first).
    failed: bool,
    /// Changes returned since this source last gave its thread a turn.
    unyielded: u32,
    /// Set while isolating an oversize change; the open cursor then reads one change per batch
    /// (an isolating cursor is never kept once this is cleared, nor the other way round).
    isolating: Option<Isolating>,
    /// A `skipped` change found at an open, returned by the next call (after `Opened`).
    skipped: Option<RawChange>,
}

/// Changes a source returns before it yields to the runtime once (see [`ChangeSource::next`]).
/// Every 128 (tokio's cooperative budget) cost 3% of burst throughput; 1,024 costs nothing
/// measurable and holds a thread for about a millisecond.
const YIELD_EVERY: u32 = 1024;

impl ChangeSource {
    /// A source that will open `after` (or at "now").
    pub fn new(watch: Watch, after: Option<Token>) -> ChangeSource {
        let backoff = Backoff::new(Duration::from_millis(100), watch.max_backoff);
        ChangeSource {
            watch,
            cursor: None,
            position: after,
            by_time: false,
            backoff,
            fragments: None,
            failed: false,
            unyielded: 0,
            isolating: None,
            skipped: None,
        }
    }

    /// A source that opens at the cluster time of `at` (every change at that time included).
    pub fn at_time_of(watch: Watch, at: Token) -> ChangeSource {
        let mut source = ChangeSource::new(watch, Some(at));
        source.by_time = true;
        source
    }

    /// Whether a cursor is open (the next step reads it rather than opening one).
    pub fn is_open(&self) -> bool {
        self.cursor.is_some() && !self.failed
    }

    /// Where the source stands: its last change or post-batch token.
    pub fn position(&self) -> Option<&Token> {
        self.position.as_ref()
    }

    /// The next step. Cancel-safe: dropping the future loses nothing (the driver keeps an
    /// in-flight `getMore` inside the cursor; an open or a backoff sleep is simply redone).
    pub async fn next(&mut self) -> Step<RawChange> {
        if let Some(skipped) = self.skipped.take() {
            return Step::Change(skipped);
        }
        if self.failed {
            tokio::time::sleep(self.backoff.next_delay()).await;
            self.failed = false;
        }
        let Some(cursor) = self.cursor.as_mut() else {
            return match self.open().await {
                Ok(start) => Step::Opened(start),
                Err(step) => step,
            };
        };
        // A change the driver already holds is returned without ever yielding: without this, a
        // 16 MB batch (~100,000 small changes) would be routed and encoded in one poll, holding
        // a runtime thread (and every client and timer queued on it) for its whole length. A
        // turn every `YIELD_EVERY` changes bounds that to about a millisecond (release build).
        // (Reset only once the turn was taken: a caller draining with `now_or_never` drops the
        // pending yield, and its next awaited call must yield instead.)
        self.unyielded += 1;
        if self.unyielded > YIELD_EVERY {
            tokio::task::yield_now().await;
            self.unyielded = 0;
        }
        match cursor.next_if_any().await {
            Ok(Some(change)) => {
                let step = self.change(change);
                if let (Step::Change(_), Some(isolating)) = (&step, &mut self.isolating) {
                    isolating.delivered += 1;
                    if isolating.delivered >= self.watch.isolation_changes.max(1) {
                        // Enough one-change round trips: try full batches again (isolating
                        // again if the large change is still ahead).
                        self.stop_isolating();
                    }
                }
                step
            }
            Ok(None) => {
                if !cursor.is_alive() {
                    // The server closed the cursor after an invalidate our pipeline filtered out.
                    self.cursor = None;
                    return Step::Invalidated(Arc::new(Event::control(
                        EventKind::Invalidate,
                        "the collection was dropped or renamed",
                        false,
                    )));
                }
                let token = cursor.resume_token().as_ref().and_then(Token::from_driver);
                if self.fragments.is_none()
                    && let Some(token) = &token
                {
                    self.position = Some(token.clone());
                    self.by_time = false;
                }
                if self
                    .isolating
                    .as_ref()
                    .is_some_and(|i| i.from != self.position)
                {
                    // Read past where the batch failed without meeting a large change: it was
                    // large only for a moment.
                    self.stop_isolating();
                }
                Step::Quiet(if self.fragments.is_none() {
                    token
                } else {
                    None
                })
            }
            Err(error) => {
                self.cursor = None;
                self.fragments = None;
                if self.too_large(&error) {
                    return self.on_too_large().await;
                }
                self.on_error(&error)
            }
        }
    }

    fn splits(&self) -> bool {
        self.watch.features.split_large_events
    }

    /// Whether `error` is a change over 16 MB this server could not send.
    fn too_large(&self, error: &mongodb::error::Error) -> bool {
        server_code(error) == Some(BSON_OBJECT_TOO_LARGE) && !self.splits()
    }

    /// A batch (or an open's first batch) failed for a change over 16 MB (the cursor is
    /// dropped). Batches of one change since the last change delivered: the failing change is
    /// the first after our position, skip it alone. Full batches: the changes before it in the
    /// failed batch were lost with it, so re-read from our position one change per batch (the
    /// next call opens that cursor).
    async fn on_too_large(&mut self) -> Step<RawChange> {
        if self.isolating.take().is_some() {
            return self.skip_oversize().await;
        }
        tracing::info!(stream = %self.watch.label, "a batch failed for a change over 16 MB; reading one change per batch to find it");
        self.isolating = Some(Isolating {
            from: self.position.clone(),
            delivered: 0,
        });
        Step::Quiet(None)
    }

    /// Back to full batches: the next call reopens from our position.
    fn stop_isolating(&mut self) {
        self.isolating = None;
        self.cursor = None;
    }

    fn on_error<C>(&mut self, error: &mongodb::error::Error) -> Step<C> {
        match classify(error) {
            Disposition::Retry => {
                self.failed = true;
                Step::Retrying(error.to_string())
            }
            Disposition::HistoryLost(message) => Step::Failed(ErrorCode::HistoryLost, message),
            Disposition::Fatal(message) => Step::Failed(ErrorCode::Upstream, message),
        }
    }

    async fn open(&mut self) -> Result<Option<Token>, Step<RawChange>> {
        let mut pipeline = self.watch.pipeline.clone();
        if self.splits() {
            pipeline.push(doc! { "$changeStreamSplitLargeEvent": {} });
        }
        let batch_size = self.isolating.as_ref().map(|_| 1);
        let opened = open(
            &self.watch,
            pipeline,
            self.position.as_ref(),
            self.by_time,
            batch_size,
        )
        .await;
        match opened {
            Ok(cursor) => {
                let start = cursor.resume_token().as_ref().and_then(Token::from_driver);
                if self.position.is_none() {
                    self.position = start.clone();
                }
                self.backoff.reset();
                self.cursor = Some(cursor);
                Ok(start)
            }
            // The first batch held a change over 16 MB. Found (this was a one-change open): the
            // consumer learns the source opened before it gets the `skipped` change, as after
            // any open (a database feed starts the members that joined at this open then).
            Err(error) if self.too_large(&error) => {
                let start = self.position.clone();
                match self.on_too_large().await {
                    Step::Change(skipped) => {
                        self.skipped = Some(skipped);
                        Ok(start)
                    }
                    step => Err(step),
                }
            }
            Err(error) => Err(self.on_error(&error)),
        }
    }

    /// Takes a change, reassembling split fragments first.
    fn change(&mut self, change: Document) -> Step<RawChange> {
        let change = match reassemble(&mut self.fragments, change) {
            Assembled::Whole(change) => change,
            Assembled::Partial => return Step::Quiet(None),
            Assembled::OutOfOrder(fragment) => {
                // Cannot be reassembled: reopen from the last whole change, which delivers the
                // fragments again from the first.
                self.cursor = None;
                self.failed = true;
                return Step::Retrying(format!("split event fragment {fragment} out of order"));
            }
        };
        if change.get_str("operationType") == Ok("invalidate") {
            self.cursor = None;
            return match Event::from_change(change) {
                Ok(event) => Step::Invalidated(Arc::new(event)),
                Err(error) => Step::Failed(ErrorCode::Upstream, error.to_string()),
            };
        }
        let id = change
            .get_document("_id")
            .ok()
            .and_then(Token::from_resume_document);
        let Some(id) = id else {
            return Step::Failed(ErrorCode::Upstream, EncodeError::MissingId.to_string());
        };
        self.position = Some(id.clone());
        self.by_time = false;
        Step::Change(RawChange {
            id,
            doc: change,
            skipped: false,
        })
    }

    /// Finds the change that was too large and replaces it with a `skipped` event.
    async fn skip_oversize(&mut self) -> Step<RawChange> {
        let mut pipeline = self.watch.pipeline.clone();
        pipeline.push(probe_projection(&self.watch.probe_fields));
        let opened = open(
            &self.watch,
            pipeline,
            self.position.as_ref(),
            self.by_time,
            None,
        )
        .await;
        let probe = match opened {
            Ok(probe) => probe,
            Err(error) => return self.on_error(&error),
        };
        let mut probe = probe;
        // The oversize change is the first one after our position.
        let found = loop {
            match probe.next_if_any().await {
                Ok(Some(change)) => break change,
                Ok(None) if probe.is_alive() => continue,
                Ok(None) => {
                    self.failed = true;
                    return Step::Retrying("probe cursor closed".into());
                }
                Err(error) => return self.on_error(&error),
            }
        };
        let id = match found.get_document("_id") {
            Ok(id) => Token::from_resume_document(id),
            Err(_) => None,
        };
        let Some(id) = id else {
            return Step::Failed(ErrorCode::Upstream, "oversize change without id".into());
        };
        tracing::warn!(stream = %self.watch.label, id = %id, "change over 16 MB skipped");
        (self.watch.on_skip)();
        self.position = Some(id.clone());
        self.by_time = false;
        Step::Change(RawChange {
            id,
            doc: found,
            skipped: true,
        })
    }
}

/// `$project` keeping what a `skipped` event and routing need, dropping the large parts.
fn probe_projection(fields_kept: &[String]) -> Document {
    let mut fields = doc! {
        "_id": 1, "operationType": 1, "ns": 1, "documentKey": 1, "clusterTime": 1,
    };
    for field in fields_kept {
        fields.insert(field.as_str(), 1);
    }
    doc! { "$project": fields }
}

/// Opens a change stream on the watched collection or database with `pipeline`, after
/// `after` (at its cluster time when `by_time`); `batch_size` applies to the aggregate's first
/// batch and to every `getMore`.
async fn open(
    watch: &Watch,
    pipeline: Vec<Document>,
    after: Option<&Token>,
    by_time: bool,
    batch_size: Option<u32>,
) -> mongodb::error::Result<ChangeStream<Document>> {
    let mut options = watch.options.clone();
    options.batch_size = batch_size;
    // A cluster-time position (a snapshot's hand-over, `Token::after_cluster_time`) is not a
    // token MongoDB can resume from: open at the first change after that time instead.
    let start_at = match after {
        Some(after) if by_time => after.cluster_time(),
        Some(after) => after.start_at(),
        None => None,
    };
    match start_at {
        Some(start) => options.start_at_operation_time = Some(start),
        None => options.resume_after = after.and_then(Token::to_driver),
    }
    let db = watch.client.database(&watch.db);
    let stream = match &watch.coll {
        Some(coll) => {
            db.collection::<Document>(coll)
                .watch()
                .pipeline(pipeline)
                .with_options(options)
                .await?
        }
        None => db.watch().pipeline(pipeline).with_options(options).await?,
    }
    .with_type::<Document>();
    (watch.on_open)();
    Ok(stream)
}

/// The result of feeding one change document to the reassembler.
#[derive(Debug, PartialEq)]
enum Assembled {
    /// A whole change (never split, or its last fragment arrived).
    Whole(Document),
    /// A fragment was stored; more are to come.
    Partial,
    /// A fragment arrived out of order (its number).
    OutOfOrder(i32),
}

/// Merges `$changeStreamSplitLargeEvent` fragments (`splitEvent: {fragment, of}`) into one
/// change: top-level fields of every fragment, `_id` (the resume token) of the last one.
fn reassemble(fragments: &mut Option<Fragments>, mut change: Document) -> Assembled {
    let Ok(split) = change.get_document("splitEvent") else {
        *fragments = None;
        return Assembled::Whole(change);
    };
    let fragment = split.get_i32("fragment").unwrap_or(1);
    let of = split.get_i32("of").unwrap_or(1);
    change.remove("splitEvent");
    let parts = fragments.get_or_insert_with(Fragments::default);
    if fragment != parts.received + 1 {
        *fragments = None;
        return Assembled::OutOfOrder(fragment);
    }
    parts.received = fragment;
    let id = change.remove("_id");
    for (key, value) in change {
        parts.merged.insert(key, value);
    }
    if fragment < of {
        return Assembled::Partial;
    }
    let mut merged = fragments.take().map(|f| f.merged).unwrap_or_default();
    if let Some(id) = id {
        merged.insert("_id", id);
    }
    Assembled::Whole(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_support_by_version() {
        assert!(!ServerFeatures::from_version("6.0.5").split_large_events);
        assert!(!ServerFeatures::from_version("6.0.8").split_large_events);
        assert!(ServerFeatures::from_version("6.0.9").split_large_events);
        assert!(ServerFeatures::from_version("7.0.0").split_large_events);
        assert!(ServerFeatures::from_version("8.0.4-rc1").split_large_events);
        assert!(!ServerFeatures::from_version("5.0.20").split_large_events);
        assert!(!ServerFeatures::from_version("").split_large_events);
    }

    #[test]
    fn reassembles_split_fragments_in_order() {
        let mut fragments = None;
        let first = doc! {
            "_id": {"_data": "8201"}, "splitEvent": {"fragment": 1, "of": 3},
            "operationType": "update", "fullDocument": {"big": "a"},
        };
        let second = doc! {
            "_id": {"_data": "8202"}, "splitEvent": {"fragment": 2, "of": 3},
            "updateDescription": {"updatedFields": {"x": 1}},
        };
        let third = doc! {
            "_id": {"_data": "8203"}, "splitEvent": {"fragment": 3, "of": 3},
            "fullDocumentBeforeChange": {"big": "b"},
        };
        assert_eq!(reassemble(&mut fragments, first), Assembled::Partial);
        assert_eq!(reassemble(&mut fragments, second), Assembled::Partial);
        let Assembled::Whole(whole) = reassemble(&mut fragments, third) else {
            panic!("expected a whole change");
        };
        assert_eq!(whole.get_document("_id").unwrap(), &doc! {"_data": "8203"});
        assert_eq!(whole.get_str("operationType").unwrap(), "update");
        assert!(whole.contains_key("fullDocument"));
        assert!(whole.contains_key("updateDescription"));
        assert!(whole.contains_key("fullDocumentBeforeChange"));
        assert!(!whole.contains_key("splitEvent"));
        assert!(fragments.is_none());
    }

    #[test]
    fn unsplit_changes_pass_and_gaps_are_detected() {
        let mut fragments = None;
        let plain = doc! { "_id": {"_data": "8201"}, "operationType": "insert" };
        assert_eq!(
            reassemble(&mut fragments, plain.clone()),
            Assembled::Whole(plain)
        );
        let second = doc! { "_id": {"_data": "8202"}, "splitEvent": {"fragment": 2, "of": 2} };
        assert_eq!(reassemble(&mut fragments, second), Assembled::OutOfOrder(2));
        assert!(fragments.is_none());
    }

    #[test]
    fn probe_keeps_routing_fields() {
        let stage = probe_projection(&["fullDocument.tenantId".to_owned()]);
        let fields = stage.get_document("$project").unwrap();
        assert!(fields.contains_key("fullDocument.tenantId"));
        assert!(fields.contains_key("documentKey"));
        assert!(!fields.contains_key("fullDocument"));
    }
}
