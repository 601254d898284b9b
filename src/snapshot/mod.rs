//! Snapshot, then changes (PROTOCOL.md §6), and the initial `put` of the document view (§7).
//!
//! ```text
//!  worker position P ──cluster time T──┐
//!                                      ├─▶ scan task: aggregate at readConcern snapshot,
//!  MongoDB ◀── atClusterTime T ────────┘   atClusterTime T, sorted by _id, each document
//!                                          wrapped as an insert event + the stream's stages
//!        bounded channel (back-pressure) ──▶ Feed prelude: snapshot… ready
//!  Subscription at `Token::after_cluster_time(T)` ──────────▶ Feed: changes after T
//! ```
//!
//! **Why it is gapless and duplicate-free.** The documents are read at one cluster time T, so
//! they include every change committed at or before T and none after. The client's
//! [`Subscription`] starts at the position "after every change at T" (a synthetic id that sorts
//! after every real token of T and before every later one, see [`Token::after_cluster_time`]).
//! From there the ordinary machinery applies: T is taken from the worker's own position, so the
//! ring covers it; live events at or before it are skipped (`skip_through`); and if the ring
//! moved past it during a long snapshot, the shared catch-up opens with `startAtOperationTime`
//! just after T. No event at T can be delivered as a change, and none after T is missing.
//!
//! **Bounded.** Documents come from a cursor in batches of [`BATCH_SIZE`] and go through a
//! channel of [`QUEUE`] events: the scan reads on only as fast as the client's socket takes
//! them. Scans running at once are limited per server (`snapshot_max_scans`, 503 past it after
//! a short wait). The document view's `put` is one event, so it holds at most
//! `snapshot_max_docs` documents (413 past it).
//!
//! **Resumable.** Each snapshot event's id is `82` + T + `FE` + the count so far + the BSON of
//! its `_id` (hex): a client that drops mid-snapshot resumes after that `_id` at the same T
//! while MongoDB still holds it (`minSnapshotHistoryWindowInSeconds`), else gets `history_lost`
//! (start again). `ready` carries `after_cluster_time(T)`: resuming from it is resuming changes.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::{Bson, Document, Timestamp, doc};
use mongodb::{ClientSession, SessionCursor};
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::event::{ErrorCode, Event, EventKind, Token};
use crate::routing::{ClientFilter, route_values};
use crate::streams::registry::SubscribeFailure;
use crate::streams::{Registry, Requester, StreamKey};
use crate::worker::errors::{Disposition, classify, server_code};
use crate::worker::{Subscription, Worker};

/// Documents per cursor batch: bounds what one getMore holds in memory.
const BATCH_SIZE: u32 = 500;
/// Snapshot events queued between the scan and the client's socket.
const QUEUE: usize = 512;
/// How long a request waits for a free scan slot before 503.
const SCAN_SLOT_WAIT: Duration = Duration::from_secs(5);
/// Longest snapshot id we hand out (a huge `_id` gets no id: resuming restarts before it).
const MAX_ID_LEN: usize = 2048;
/// `SnapshotTooOld`: MongoDB no longer holds the requested cluster time.
const SNAPSHOT_TOO_OLD: i32 = 239;
/// Times a scan reopens after a transient error (election, network) before giving up.
const MAX_RETRIES: u32 = 5;

/// Events sent before a subscription's own (the snapshot); closes when the snapshot is done.
pub type Prelude = mpsc::Receiver<Arc<Event>>;

/// What a subscribe asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `snapshot=true`: `snapshot` events, `ready`, then changes.
    Events,
    /// The document view: one `put` of every document, then the changes as `put`/`patch`.
    View,
}

/// Where a snapshot event stands: its cluster time, how many events came before it (itself
/// included), and its document's `_id`.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotId {
    /// The snapshot's cluster time.
    pub at: Timestamp,
    /// Snapshot events delivered through this one.
    pub count: u32,
    /// The `_id` of this event's document.
    pub after: Bson,
}

impl SnapshotId {
    /// The event id (`None` when the `_id` is too large to carry).
    pub fn encode(&self) -> Option<Token> {
        let bytes = mongodb::bson::to_vec(&doc! { "i": self.after.clone() }).ok()?;
        let ts = (u64::from(self.at.time) << 32) | u64::from(self.at.increment);
        let mut hex = format!("82{ts:016X}FE{:08X}", self.count);
        if hex.len() + 2 * bytes.len() > MAX_ID_LEN {
            return None;
        }
        for byte in bytes {
            let _ = write!(hex, "{byte:02X}");
        }
        Token::parse(&hex).ok()
    }

    /// Reads a snapshot id back; `None` for any other id (real tokens never have `FE` after
    /// the timestamp: that byte is a KeyString type, at most `F0`).
    pub fn decode(token: &Token) -> Option<SnapshotId> {
        let hex = token.as_str();
        if hex.get(18..20)? != "FE" {
            return None;
        }
        let at = token.cluster_time()?;
        let count = u32::from_str_radix(hex.get(20..28)?, 16).ok()?;
        let bytes = (28..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        let document = Document::from_reader(bytes.as_slice()).ok()?;
        Some(SnapshotId {
            at,
            count,
            after: document.get("i")?.clone(),
        })
    }
}

/// The server's snapshot scans: the slot limit and the document view's size guard.
pub struct Snapshots {
    slots: Arc<Semaphore>,
    max_docs: usize,
}

impl Snapshots {
    /// `max_scans` scans at once; document-view `put`s of at most `max_docs` documents.
    pub fn new(max_scans: usize, max_docs: usize) -> Snapshots {
        Snapshots {
            slots: Arc::new(Semaphore::new(max_scans.max(1))),
            max_docs,
        }
    }

    /// Subscribes a client that wants the current documents first. `resume` is its last id:
    /// a snapshot id resumes the snapshot (event mode), any other id resumes changes only
    /// (the client already has a snapshot).
    #[allow(clippy::too_many_arguments)]
    pub async fn subscribe(
        &self,
        registry: &Registry,
        key: &StreamKey,
        avars: Option<&str>,
        resume: Option<Token>,
        requester: Requester<'_>,
        mode: Mode,
    ) -> Result<(Subscription, Option<Prelude>), SnapshotError> {
        let snapshot_resume = resume.as_ref().and_then(SnapshotId::decode);
        if let Some(resume) = resume.filter(|_| snapshot_resume.is_none()) {
            return Ok((
                registry
                    .subscribe(key, avars, Some(resume), requester)
                    .await?,
                None,
            ));
        }
        let (guard, filter) = registry.attach(key, avars, requester).await?;
        let worker = Arc::clone(guard.worker());
        // The document view's `put` is one event: a partial snapshot cannot be resumed there.
        let from = snapshot_resume.filter(|_| mode == Mode::Events);
        let slot =
            match tokio::time::timeout(SCAN_SLOT_WAIT, Arc::clone(&self.slots).acquire_owned())
                .await
            {
                Ok(Ok(slot)) => slot,
                _ => {
                    return Err(SnapshotError::SlotsBusy);
                }
            };
        let mut scan = Scan {
            worker: Arc::clone(&worker),
            filter: filter.clone(),
            at: from.as_ref().map(|f| f.at),
        };
        let (count, after) = match from {
            Some(from) => (from.count, Some(from.after)),
            None => (0, None),
        };
        let mut reader = Reader::after(after);
        // Opened here, before the response: a fresh snapshot's time T is the one MongoDB
        // picks (the latest majority-committed time), which the subscription needs.
        let at = match scan.open(&mut reader).await {
            Ok(at) => at,
            // A resumed snapshot whose time MongoDB no longer holds: `history_lost` (the
            // client starts again); the subscription is never read.
            Err(ScanError::TooOld(message)) if scan.at.is_some() => {
                let (tx, rx) = mpsc::channel(1);
                let _ = tx.try_send(Arc::new(ScanError::TooOld(message).event()));
                let subscription = Subscription::start(guard, None, filter)
                    .await
                    .map_err(SubscribeFailure::from)?;
                return Ok((subscription, Some(rx)));
            }
            Err(error) => return Err(error.into()),
        };
        let prelude = match mode {
            Mode::Events => {
                let (tx, rx) = mpsc::channel(QUEUE);
                worker.tracker().spawn(scan.stream(reader, count, tx, slot));
                rx
            }
            Mode::View => {
                let put = scan.view_put(reader, self.max_docs).await?;
                drop(slot);
                let (tx, rx) = mpsc::channel(1);
                let _ = tx.try_send(Arc::new(put));
                rx
            }
        };
        let subscription = Subscription::start(guard, Some(Token::after_cluster_time(at)), filter)
            .await
            .map_err(SubscribeFailure::from)?;
        Ok((subscription, Some(prelude)))
    }
}

/// One client's scan of the stream's collection at cluster time `at`.
struct Scan {
    worker: Arc<Worker>,
    filter: Option<Arc<ClientFilter>>,
    /// The cluster time read at: a resumed snapshot's, or (`None` until the first open) the
    /// one MongoDB picks.
    at: Option<Timestamp>,
}

/// A scan's open cursor and where it is.
struct Reader {
    cursor: Option<(ClientSession, SessionCursor<Document>)>,
    /// The `_id` of the last document read (the next open starts after it).
    after: Option<Bson>,
    retries: u32,
}

impl Reader {
    fn after(after: Option<Bson>) -> Reader {
        Reader {
            cursor: None,
            after,
            retries: 0,
        }
    }
}

/// What a scan found wrong.
enum ScanError {
    /// MongoDB no longer holds `at`.
    TooOld(String),
    /// Retrying cannot help (a pipeline MongoDB refuses, …).
    Fatal(String),
    /// Worth another try from the last `_id`.
    Transient(String),
}

/// Why a snapshot subscription could not start. The HTTP layer answers it (`http::error`):
/// 400 when retrying cannot help, 413 past `snapshot_max_docs`, else 503.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The subscription itself (unknown stream, limits, filters…).
    #[error(transparent)]
    Subscribe(#[from] SubscribeFailure),
    /// No scan slot freed up in time.
    #[error("every snapshot scan slot is busy (snapshot_max_scans); retry shortly")]
    SlotsBusy,
    /// The document view's `put` would hold more than `snapshot_max_docs` documents.
    #[error(
        "the document view sends every document in one first event and this stream has more \
         than snapshot_max_docs ({max_docs}); subscribe with ?snapshot=true to stream them one \
         by one"
    )]
    TooManyDocs {
        /// `snapshot_max_docs`.
        max_docs: usize,
    },
    /// Retrying cannot help (a pipeline MongoDB refuses, …).
    #[error("the snapshot could not be read: {0}")]
    Unreadable(String),
    /// A retry may succeed (election, network, the snapshot time no longer held).
    #[error("the snapshot could not be read: {0}")]
    Unavailable(String),
}

/// A snapshot that cannot start: unreadable when retrying cannot help, else unavailable.
impl From<ScanError> for SnapshotError {
    fn from(error: ScanError) -> SnapshotError {
        match error {
            ScanError::Fatal(message) => SnapshotError::Unreadable(message),
            ScanError::TooOld(message) | ScanError::Transient(message) => {
                SnapshotError::Unavailable(message)
            }
        }
    }
}

impl ScanError {
    fn from(error: &mongodb::error::Error) -> ScanError {
        if server_code(error) == Some(SNAPSHOT_TOO_OLD) {
            return ScanError::TooOld(error.to_string());
        }
        match classify(error) {
            Disposition::Retry => ScanError::Transient(error.to_string()),
            Disposition::HistoryLost(message) => ScanError::TooOld(message),
            Disposition::Fatal(message) => ScanError::Fatal(message),
        }
    }

    fn event(self) -> Event {
        match self {
            ScanError::TooOld(message) => Event::control(
                EventKind::Error(ErrorCode::HistoryLost),
                &format!(
                    "the snapshot's cluster time is no longer held by MongoDB; \
                     reconnect with snapshot=true and no event id: {message}"
                ),
                true,
            ),
            ScanError::Fatal(message) | ScanError::Transient(message) => Event::control(
                EventKind::Error(ErrorCode::Upstream),
                &format!("the snapshot could not be read: {message}"),
                false,
            ),
        }
    }
}

impl Scan {
    /// The aggregation: documents after `after` in `_id` order, each as the insert event a
    /// change stream would show, then the stream's own stages.
    fn pipeline(&self, after: Option<&Bson>) -> Vec<Document> {
        let spec = self.worker.spec();
        let mut pipeline = Vec::with_capacity(spec.pipeline.len() + 3);
        pipeline.push(doc! { "$sort": { "_id": 1 } });
        if let Some(after) = after {
            // `$expr` compares across BSON types in sort order (a plain `$gt` would skip
            // `_id`s of other types); it still walks the `_id` index in order.
            pipeline.push(
                doc! { "$match": { "$expr": { "$gt": ["$_id", { "$literal": after.clone() }] } } },
            );
        }
        pipeline.push(doc! { "$replaceWith": {
            "_id": "$_id",
            "operationType": { "$literal": "insert" },
            "fullDocument": "$$ROOT",
            "documentKey": { "_id": "$_id" },
            "ns": { "db": { "$literal": spec.db.as_str() }, "coll": { "$literal": spec.coll.as_str() } },
        } });
        pipeline.extend(spec.pipeline.iter().cloned());
        pipeline
    }

    /// The next document the client's filter lets through (its `_id` taken out), `None` at
    /// the end. Opens the cursor on first use; a transient error reopens it after the last
    /// `_id` seen, at the same cluster time.
    async fn next(&self, reader: &mut Reader) -> Result<Option<(Bson, Document)>, ScanError> {
        let spec = self.worker.spec();
        loop {
            match self.step(reader).await {
                Ok(Some(mut document)) => {
                    let id = document.remove("_id").unwrap_or(Bson::Null);
                    reader.after = Some(id.clone());
                    if let Some(filter) = &self.filter
                        && !filter.matches(&route_values(&spec.routing, &document))
                    {
                        continue;
                    }
                    return Ok(Some((id, document)));
                }
                Ok(None) => return Ok(None),
                Err(error) => {
                    reader.cursor = None;
                    match ScanError::from(&error) {
                        ScanError::Transient(message) if reader.retries < MAX_RETRIES => {
                            reader.retries += 1;
                            tracing::debug!(%message, retries = reader.retries, "snapshot scan retrying");
                            tokio::time::sleep(Duration::from_millis(100 << reader.retries)).await;
                        }
                        other => return Err(other),
                    }
                }
            }
        }
    }

    /// Opens the cursor (without retrying) and returns the cluster time it reads at.
    async fn open(&mut self, reader: &mut Reader) -> Result<Timestamp, ScanError> {
        let cursor = self.open_cursor(reader).await;
        let (session, _) = cursor.map_err(|e| ScanError::from(&e))?;
        let at = session
            .snapshot_time()
            .or(self.at)
            .ok_or_else(|| ScanError::Fatal("MongoDB did not report the snapshot time".into()))?;
        self.at = Some(at);
        Ok(at)
    }

    async fn open_cursor<'r>(
        &self,
        reader: &'r mut Reader,
    ) -> mongodb::error::Result<&'r mut (ClientSession, SessionCursor<Document>)> {
        if reader.cursor.is_none() {
            let spec = self.worker.spec();
            let mut options = mongodb::options::SessionOptions::builder()
                .snapshot(true)
                .build();
            options.snapshot_time = self.at;
            let mut session = self
                .worker
                .client()
                .start_session()
                .with_options(options)
                .await?;
            let cursor = self
                .worker
                .client()
                .database(&spec.db)
                .collection::<Document>(&spec.coll)
                .aggregate(self.pipeline(reader.after.as_ref()))
                .batch_size(BATCH_SIZE)
                .session(&mut session)
                .await?;
            reader.cursor = Some((session, cursor));
        }
        match reader.cursor.as_mut() {
            Some(open) => Ok(open),
            None => Err(mongodb::error::Error::custom("snapshot cursor not open")),
        }
    }

    /// One document from the cursor, opening it (after `reader.after`) if needed.
    async fn step(&self, reader: &mut Reader) -> mongodb::error::Result<Option<Document>> {
        let (session, cursor) = self.open_cursor(reader).await?;
        cursor.next(session).await.transpose()
    }

    /// Streams `snapshot` events, then `ready`, into `tx` (as fast as the client takes them).
    async fn stream(
        self,
        mut reader: Reader,
        mut count: u32,
        tx: mpsc::Sender<Arc<Event>>,
        slot: OwnedSemaphorePermit,
    ) {
        let Some(at) = self.at else {
            return;
        };
        let result = loop {
            match self.next(&mut reader).await {
                Ok(Some((id, document))) => {
                    count = count.saturating_add(1);
                    let id = SnapshotId {
                        at,
                        count,
                        after: id,
                    }
                    .encode();
                    let data = Bson::Document(document).into_relaxed_extjson();
                    let event = Event::new(EventKind::Snapshot, id, &data);
                    // A closed channel: the client left; stop reading.
                    if tx.send(Arc::new(event)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break Ok(()),
                Err(error) => break Err(error),
            }
        };
        drop(slot);
        let last = match result {
            Ok(()) => Event::new(
                EventKind::Ready,
                Some(Token::after_cluster_time(at)),
                &json!({ "count": count }),
            ),
            Err(error) => error.event(),
        };
        let _ = tx.send(Arc::new(last)).await;
    }

    /// The document view's first event: `put` at `/` of every document by `_id` text, built
    /// as JSON text (no tree in memory), refused past `max_docs`.
    async fn view_put(&self, mut reader: Reader, max_docs: usize) -> Result<Event, SnapshotError> {
        let mut data = String::from("{\"path\":\"/\",\"data\":{");
        let mut count = 0usize;
        let mut too_many = false;
        let result = loop {
            match self.next(&mut reader).await {
                Ok(Some((id, mut document))) => {
                    let Some(Bson::Document(full)) = document.remove("fullDocument") else {
                        continue;
                    };
                    count += 1;
                    if count > max_docs {
                        too_many = true;
                        break Ok(());
                    }
                    if count > 1 {
                        data.push(',');
                    }
                    data.push_str(&serde_json::Value::from(id_text(&id)).to_string());
                    data.push(':');
                    data.push_str(&Bson::Document(full).into_relaxed_extjson().to_string());
                }
                Ok(None) => break Ok(()),
                Err(error) => break Err(error),
            }
        };
        match result {
            Ok(()) => {}
            Err(error) => return Err(error.into()),
        }
        if too_many {
            return Err(SnapshotError::TooManyDocs { max_docs });
        }
        data.push_str("}}");
        Ok(Event::view(
            "put",
            self.at.map(Token::after_cluster_time),
            &data,
        ))
    }
}

/// A document's key in the document view: strings as they are, ObjectIds as hex, numbers as
/// digits, anything else as its relaxed Extended JSON.
pub fn id_text(id: &Bson) -> String {
    match id {
        Bson::String(s) => s.clone(),
        Bson::ObjectId(oid) => oid.to_hex(),
        Bson::Int32(n) => n.to_string(),
        Bson::Int64(n) => n.to_string(),
        Bson::Double(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => (*f as i64).to_string(),
        other => other.clone().into_relaxed_extjson().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::oid::ObjectId;

    #[test]
    fn snapshot_ids_round_trip_and_sort_between_the_changes_of_t_and_ready() {
        let at = Timestamp {
            time: 0x65A1_B2C3,
            increment: 4,
        };
        for after in [
            Bson::ObjectId(ObjectId::new()),
            Bson::String("a/b".into()),
            Bson::Int64(-5),
            Bson::Document(doc! { "x": 1, "y": [1, 2] }),
        ] {
            let id = SnapshotId {
                at,
                count: 17,
                after: after.clone(),
            };
            let token = id.encode().unwrap();
            assert_eq!(SnapshotId::decode(&token), Some(id));
            // A client sends it back as Last-Event-ID: it parses as an id.
            assert_eq!(Token::parse(token.as_str()).unwrap(), token);
            let change_at = Token::parse("8265A1B2C3000000042B022C0100296E5A1004").unwrap();
            assert!(change_at < token && token < Token::after_cluster_time(at));
        }
        let real = Token::parse("8265A1B2C3000000042B022C0100296E5A1004").unwrap();
        assert_eq!(SnapshotId::decode(&real), None);
        assert_eq!(SnapshotId::decode(&Token::after_cluster_time(at)), None);
        let huge = SnapshotId {
            at,
            count: 1,
            after: Bson::String("x".repeat(4000)),
        };
        assert_eq!(huge.encode(), None);
    }

    #[test]
    fn view_keys() {
        let oid = ObjectId::new();
        assert_eq!(id_text(&Bson::ObjectId(oid)), oid.to_hex());
        assert_eq!(id_text(&Bson::String("k".into())), "k");
        assert_eq!(id_text(&Bson::Int32(5)), "5");
        assert_eq!(id_text(&Bson::Double(5.0)), "5");
    }
}
