//! One snapshot's reads: batches at one cluster time T, each holding a scan slot only while
//! MongoDB works for it.
//!
//! ```text
//!  session (readConcern snapshot) ── first read: MongoDB picks T (or T from a snapshot id)
//!  batch k: slot ─▶ aggregate [$sort _id, $match _id > last, as-insert, stream stages,
//!                              $limit n] at T ─▶ read ≤ budget bytes ─▶ slot freed
//!  (the client drains; no slot, no cursor, no MongoDB work)
//!  batch k+1: slot ─▶ … _id > last of batch k …
//! ```
//!
//! **Why batches, not one cursor.** A cursor held across the client's pauses held its scan slot
//! too, so eight clients that stopped reading took every slot of the server. A batch is a
//! complete query: its slot is taken just before and given back just after, whatever the
//! client does next. Every batch reads at the same T through the same snapshot session, so
//! the batches together are exactly the collection at T, in `_id` order.
//!
//! **Fairness.** Slots are a FIFO semaphore: a scan waiting for one waits behind at most one
//! batch of each scan ahead of it, and a scan's batch is short (at most [`BATCH_SIZE`]
//! documents or its byte budget). A client that stops reading stops asking for batches.
//!
//! **Progress.** The `$limit` is after the stream's own stages, so a batch ends at its last
//! output document (filtered documents before it are passed for good); fewer outputs than the
//! limit means the collection is done. `$expr` compares `_id`s across BSON types in sort
//! order and still seeks the `_id` index (checked with `explain`: 10 keys examined for 10
//! documents).
//!
//! **Snapshot history.** T must stay within MongoDB's `minSnapshotHistoryWindowInSeconds`
//! (300 s by default). A batch read after T aged out fails with `SnapshotTooOld`, which reaches
//! the client as `history_lost` (start the snapshot again, PROTOCOL.md §6).

use std::sync::Arc;
use std::time::Duration;

use mongodb::ClientSession;
use mongodb::bson::{Bson, Document, RawDocumentBuf, Timestamp, doc};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::event::{ErrorCode, Event, EventKind};
use crate::routing::{ClientFilter, route_values};
use crate::worker::Worker;
use crate::worker::errors::{Disposition, classify, server_code};

/// Most documents per batch.
pub const BATCH_SIZE: usize = 500;
/// Documents the first batch of a scan asks for, before it knows their size (8 documents of
/// 1 MB are one reply MongoDB sends at once, whatever we then keep).
const FIRST_BATCH: usize = 8;
/// `SnapshotTooOld`: MongoDB no longer holds the requested cluster time.
const SNAPSHOT_TOO_OLD: i32 = 239;
/// Times a batch is retried after a transient error (election, network) before giving up.
const MAX_RETRIES: u32 = 5;

/// The server's scan slots (`snapshot_max_scans`), taken per batch.
pub struct Slots {
    semaphore: Arc<Semaphore>,
    /// `streamgate_snapshot_scans_active`: slots held now.
    active: Gauge,
}

/// A held scan slot; given back (and taken off the gauge) on drop.
struct Slot {
    _permit: OwnedSemaphorePermit,
    active: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.active.dec();
    }
}

impl Slots {
    /// `max` slots (at least 1), reporting to `active`.
    pub fn new(max: usize, active: Gauge) -> Slots {
        Slots {
            semaphore: Arc::new(Semaphore::new(max.max(1))),
            active,
        }
    }

    /// Waits for a slot (at most `wait`, when given).
    async fn acquire(&self, wait: Option<Duration>) -> Result<Slot, ScanError> {
        let acquire = Arc::clone(&self.semaphore).acquire_owned();
        let permit = match wait {
            Some(wait) => tokio::time::timeout(wait, acquire)
                .await
                .map_err(|_| ScanError::Busy)?,
            None => acquire.await,
        }
        .map_err(|_| ScanError::Busy)?;
        self.active.inc();
        Ok(Slot {
            _permit: permit,
            active: self.active.clone(),
        })
    }
}

/// What a scan found wrong.
#[derive(Debug)]
pub enum ScanError {
    /// No scan slot freed up in time.
    Busy,
    /// MongoDB no longer holds T.
    TooOld(String),
    /// Retrying cannot help (a pipeline MongoDB refuses, …).
    Fatal(String),
    /// Worth another try from the last `_id`.
    Transient(String),
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

    /// The event that ends a snapshot that failed after its response started.
    pub fn event(self) -> Event {
        match self {
            ScanError::TooOld(message) => Event::control(
                EventKind::Error(ErrorCode::HistoryLost),
                &format!(
                    "the snapshot's cluster time is no longer held by MongoDB \
                     (minSnapshotHistoryWindowInSeconds; a client that reads too slowly or \
                     resumes too late meets it); reconnect with snapshot=true and no event id: \
                     {message}"
                ),
                true,
            ),
            ScanError::Busy => Event::control(
                EventKind::Error(ErrorCode::Upstream),
                "the snapshot could not be read: no scan slot",
                false,
            ),
            ScanError::Fatal(message) | ScanError::Transient(message) => Event::control(
                EventKind::Error(ErrorCode::Upstream),
                &format!("the snapshot could not be read: {message}"),
                false,
            ),
        }
    }
}

/// One client's scan of the stream's collection at cluster time T.
pub struct Scan {
    worker: Arc<Worker>,
    filter: Option<Arc<ClientFilter>>,
    slots: Arc<Slots>,
    /// The snapshot session: its first read fixes T, later ones read at it. Dropped after an
    /// error (a new one reads at the same T).
    session: Option<ClientSession>,
    /// T: a resumed snapshot's, or (`None` until the first read) the one MongoDB picks.
    pub at: Option<Timestamp>,
    /// The `_id` of the last document read (the next batch starts after it).
    pub after: Option<Bson>,
    /// Every document at T has been read.
    pub done: bool,
    /// Mean BSON bytes of the documents read so far (sizes the next batch's `$limit`).
    mean: Option<usize>,
    retries: u32,
}

impl Scan {
    /// A scan of `worker`'s collection for a client with `filter`, at `at` after `after` (a
    /// resumed snapshot) or from the start at the time MongoDB picks.
    pub fn new(
        worker: Arc<Worker>,
        filter: Option<Arc<ClientFilter>>,
        slots: Arc<Slots>,
        at: Option<Timestamp>,
        after: Option<Bson>,
    ) -> Scan {
        Scan {
            worker,
            filter,
            slots,
            session: None,
            at,
            after,
            done: false,
            mean: None,
            retries: 0,
        }
    }

    /// The aggregation: documents after `after` in `_id` order, each as the insert event a
    /// change stream would show, then the stream's own stages, then at most `limit`.
    fn pipeline(&self, limit: usize) -> Vec<Document> {
        let spec = self.worker.spec();
        let mut pipeline = Vec::with_capacity(spec.pipeline.len() + 4);
        pipeline.push(doc! { "$sort": { "_id": 1 } });
        if let Some(after) = &self.after {
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
        pipeline.push(doc! { "$limit": i64::try_from(limit).unwrap_or(i64::MAX) });
        pipeline
    }

    /// Fixes T with a first read of at most one document (discarded), holding a slot for it
    /// (waiting at most `wait`). For a resumed snapshot this checks that MongoDB still holds T.
    pub async fn pick_time(&mut self, wait: Duration) -> Result<Timestamp, ScanError> {
        let _slot = self.slots.acquire(Some(wait)).await?;
        let mut session = self.session().await?;
        let after = self.after.clone();
        let result = self.read(&mut session, 1, usize::MAX).await;
        // Nothing kept: the first batch starts where this read did. But a read that found
        // nothing found the end: the scan is done at T. (Reading again at T would fail with
        // `SnapshotUnavailable` once the collection is created after T, as the first insert
        // into a collection that did not exist does.)
        (self.after, self.mean) = (after, None);
        let picked = session.snapshot_time().or(self.at);
        self.session = Some(session);
        result.map_err(|e| ScanError::from(&e))?;
        let at = picked
            .ok_or_else(|| ScanError::Fatal("MongoDB did not report the snapshot time".into()))?;
        self.at = Some(at);
        Ok(at)
    }

    /// The next batch: documents the client's filter lets through (each `_id` taken out), of
    /// at most about `budget` BSON bytes (at least one document), holding a scan slot only
    /// while it reads (waiting at most `wait` for one, when given). Empty with `done` set at
    /// the end. A transient error is retried (after the last `_id` read, at the same T).
    pub async fn batch(
        &mut self,
        budget: usize,
        wait: Option<Duration>,
    ) -> Result<Vec<(Bson, Document)>, ScanError> {
        loop {
            if self.done {
                return Ok(Vec::new());
            }
            let limit = match self.mean {
                Some(mean) => (budget / mean.max(1)).clamp(1, BATCH_SIZE),
                None => FIRST_BATCH,
            };
            let slot = self.slots.acquire(wait).await?;
            let mut session = match self.session.take() {
                Some(session) => session,
                None => self.session().await?,
            };
            let result = self.read(&mut session, limit, budget).await;
            drop(slot);
            if self.at.is_none() {
                self.at = session.snapshot_time();
            }
            match result {
                Ok(batch) => {
                    self.session = Some(session);
                    self.retries = 0;
                    return Ok(batch);
                }
                Err(error) => match ScanError::from(&error) {
                    ScanError::Transient(message) if self.retries < MAX_RETRIES => {
                        self.retries += 1;
                        tracing::debug!(%message, retries = self.retries, "snapshot batch retrying");
                        tokio::time::sleep(Duration::from_millis(100 << self.retries)).await;
                    }
                    other => return Err(other),
                },
            }
        }
    }

    /// A snapshot session reading at `at` (or at the time MongoDB picks, when `None`).
    async fn session(&self) -> Result<ClientSession, ScanError> {
        let mut options = mongodb::options::SessionOptions::builder()
            .snapshot(true)
            .build();
        options.snapshot_time = self.at;
        self.worker
            .client()
            .start_session()
            .with_options(options)
            .await
            .map_err(|e| ScanError::from(&e))
    }

    /// One query: up to `limit` documents after `after`, stopping early past `budget` bytes
    /// (the cursor is then dropped, which kills it). Moves `after`; sets `done` at the end.
    async fn read(
        &mut self,
        session: &mut ClientSession,
        limit: usize,
        budget: usize,
    ) -> mongodb::error::Result<Vec<(Bson, Document)>> {
        let spec = self.worker.spec();
        let mut cursor = self
            .worker
            .client()
            .database(&spec.db)
            .collection::<Document>(&spec.coll)
            .aggregate(self.pipeline(limit))
            // One more than the limit: MongoDB then finds the end within the first reply and
            // closes the cursor itself (no empty `getMore` to learn it, no `killCursors`).
            .batch_size(u32::try_from(limit + 1).unwrap_or(u32::MAX))
            .with_type::<RawDocumentBuf>()
            .session(&mut *session)
            .await?;
        let (mut batch, mut read, mut bytes) = (Vec::new(), 0usize, 0usize);
        let stopped = loop {
            let Some(raw) = cursor.next(session).await.transpose()? else {
                break false;
            };
            read += 1;
            bytes += raw.as_bytes().len();
            let mut document = raw.to_document().map_err(mongodb::error::Error::custom)?;
            let Some(id) = document.remove("_id") else {
                // A pipeline that removes `_id` would read the first batch forever.
                return Err(mongodb::error::Error::custom(
                    "the stream's pipeline removes _id from documents, which a snapshot needs",
                ));
            };
            self.after = Some(id.clone());
            let keep = self
                .filter
                .as_ref()
                .is_none_or(|filter| filter.matches(&route_values(&spec.routing, &document)));
            if keep {
                batch.push((id, document));
            }
            if bytes >= budget {
                break true;
            }
        };
        if let Some(mean) = bytes.checked_div(read) {
            self.mean = Some(self.mean.map_or(mean, |old| (old + mean) / 2));
        }
        if !stopped && read < limit {
            self.done = true;
        }
        Ok(batch)
    }
}
