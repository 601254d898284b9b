//! Database feeds in relay mode: ONE `db.watch()` cursor per database and `fullDocument…`
//! options for the whole fleet, publishing to each member stream's own subject.
//!
//! Without the relay, the `$match`-only workers of one instance share their database's cursor
//! (`worker/feed.rs`). With it, the unit a lease guards is the *fleet's* feed: its members are
//! the shareable workers any instance has, and the instance holding the feed's lease reads one
//! cursor whose `$match` is the `$or` of every member's collection and conditions
//! ([`crate::worker::feed::filter_of`]) and publishes each change to the subject of every member on its collection
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
//!   `$match` takes it) and an `invalidate` ([`crate::worker::feed::invalidate_after`]), as a collection cursor
//!   would; a database's `invalidate` ends every member. An ended member is added again (from
//!   an empty log) once its workers are gone from the lists, or after `lease_ttl_ms`.
//! * **Failure.** Members whose `$match` evaluates expressions (`$expr`, which can fail the
//!   cursor on a change: [`fails_on_data`]) do not join: each is relayed on its own cursor,
//!   so no member's data takes the others down. A cursor refused right after members were
//!   added is probed member by member (each one's clause alone on a cursor of its own): those
//!   MongoDB refuses end with the error their own cursor would have given, the others go on.
//!   History lost (a member's log older than the oplog) ends the members at the oldest
//!   position with it; any other error retrying cannot fix ends every member with it.
//!
//! Here: the members an instance has and lists, its contention ([`join`], [`LocalFeed`]);
//! `turn.rs`: a turn as the feed's owner; `catch_up.rs`: a member far behind brought up to
//! date.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use mongodb::bson::{Document, doc};
use mongodb::options::ChangeStreamOptions;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Relay;
use super::lease::Lease;
use super::membership::{Membership, View};
use super::owner::{Contender, Outcome, Turn, Unit};
use crate::metrics::Metrics;
use crate::spec::WatchSpec;
use crate::sync::lock;
use crate::worker::Worker;
use crate::worker::feed::{FEED_MAX_AWAIT, fails_on_data, shareable};
use crate::worker::source::ServerFeatures;

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
        turn::Owner::new(self, turn).own(lease, view, cancel)
    }
}

mod catch_up;
mod turn;

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
