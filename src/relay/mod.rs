//! The relay tier (`[relay]`): one MongoDB change-stream cursor per worker for a whole fleet
//! of instances, through NATS JetStream.
//!
//! ```text
//!  instance A (owner of worker W, or of its database feed) instance B, C, …
//!  ChangeSource ──raw change──▶ publish ─▶ JetStream stream ─▶ ordered consumer ─┐
//!   (owner.rs, holds lease)     Nats-Msg-Id = token       one subject per worker   ▼
//!                                            └──────────▶ ordered consumer ─▶ Worker::apply
//!                                                         (consumer.rs)        (ring, hub, …)
//! ```
//!
//! * Every instance with a worker reads its steps from JetStream (`consumer.rs`), the owner
//!   too, and applies them to its hub as a cursor's would be applied: everything above the hub
//!   (resumes, catch-ups, routing, the document view, multi-stream) works as without the relay.
//! * Exactly one instance holds the cursor: the one holding the worker's lease in a JetStream
//!   key-value bucket (`lease.rs`). The lease lives in NATS, not MongoDB, because it guards the
//!   right to *publish to NATS*: an instance that cannot reach NATS cannot renew it, so the
//!   cursor moves to one that can, while a MongoDB lease could stay with an instance cut off
//!   from NATS; and it adds no writes to the database the relay exists to relieve. JetStream
//!   expires it server-side (`max_age`), so a killed owner needs no one to clean up after it.
//! * Which instance should hold it is placed (`membership.rs`): every instance heartbeats the
//!   workers it has into a second key-value bucket, and each computes the same placement,
//!   rendezvous hashing with bounded loads over the live instances that have the worker. The
//!   named instance takes a free lease at once, the others only after a grace; an owner no
//!   longer named hands over. Cursors spread evenly and move when instances join or leave.
//! * The owner (`owner.rs`) resumes from the last message of its subject: a new owner goes on
//!   where the last one stopped, and JetStream's `Nats-Msg-Id` de-duplication (the worker and
//!   the resume token) drops what two owners both publish during a hand-over; consumers also
//!   skip any position at or before the last one they applied, so each change reaches the hub
//!   once.
//! * A worker's subject is a hash of what its cursor watches (database, collection, bound
//!   pipeline, `fullDocument…` options): instances agree on it without agreeing on anything
//!   else, and a replaced definition gets a new log.
//! * A client older than its worker's ring catches up from the subject's retained messages
//!   when they still hold everything after its id (`window.rs`), else from a MongoDB cursor.
//! * Workers that would share their database's cursor on one instance (`worker/feed.rs`)
//!   share it across the fleet (`feed/`): the unit of ownership is then the database feed,
//!   whose owner reads one `db.watch()` for the members every instance lists and publishes
//!   each change to its members' own subjects; the reading side is the same as for a worker
//!   relayed on its own cursor (`consumer.rs`). `Relay::source` picks the owner side.

mod consumer;
mod feed;
mod lease;
mod membership;
mod owner;
mod window;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use futures::future::BoxFuture;
use mongodb::bson::{Document, doc};
use sha2::{Digest, Sha256};
use tokio::sync::{OnceCell, mpsc};

use crate::config::RelayConfig;
use crate::event::Token;
use crate::metrics::Metrics;
use crate::spec::WatchSpec;
use crate::worker::Worker;
use crate::worker::relayed::{RelayedSource, WindowSource};
use crate::worker::source::ChangeRouter;

/// The relay could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// `relay.nats_url` is not a NATS URL list.
    #[error("relay.nats_url: {0}")]
    Url(String),
    /// JetStream refused the stream or the lease bucket.
    #[error("JetStream: {0}")]
    JetStream(String),
}

/// The JetStream handles every worker uses, made once NATS first answers.
#[derive(Clone)]
struct Handles {
    stream: jetstream::stream::Stream,
    leases: jetstream::kv::Store,
    /// The instances' heartbeats (`membership.rs`).
    instances: jetstream::kv::Store,
    /// Each instance's members of each database feed (`feed/`).
    feeds: jetstream::kv::Store,
}

/// The relay tier of one instance.
pub struct Relay {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    settings: RelayConfig,
    /// This instance's name in the leases it holds and in its heartbeat.
    instance: String,
    handles: OnceCell<Handles>,
    metrics: Arc<Metrics>,
    /// Who of the fleet is live and should read which cursor.
    membership: Arc<membership::Membership>,
    /// This instance's members of the fleet's database feeds, by feed key.
    feeds: std::sync::Mutex<std::collections::HashMap<String, Arc<feed::LocalFeed>>>,
    /// This instance's reader of each subject, which takes what this instance publishes as
    /// owner straight from it (`owner::Local`).
    readers: std::sync::Mutex<std::collections::HashMap<String, mpsc::Sender<owner::Local>>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The heartbeat task waits on it, holding the relay only weakly: let it end.
        self.membership.wake.notify_one();
    }
}

/// How long one JetStream request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

impl Relay {
    /// A relay on `settings.nats_url` (which must be set). Connects in the background: an
    /// unreachable NATS at startup is survived, and shows in `/health/ready`.
    pub async fn connect(
        settings: &RelayConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Relay>, RelayError> {
        let url = settings
            .nats_url
            .clone()
            .ok_or_else(|| RelayError::Url("not set".into()))?;
        let addrs: Vec<async_nats::ServerAddr> = url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                u.parse()
                    .map_err(|e| RelayError::Url(format!("{u:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        if addrs.is_empty() {
            return Err(RelayError::Url("no URL given".into()));
        }
        let instance = instance_name();
        let client = async_nats::ConnectOptions::new()
            .name(format!("streamgate {instance}"))
            .retry_on_initial_connect()
            .connection_timeout(REQUEST_TIMEOUT)
            // Reconnect quickly: relayed streams wait while NATS is away.
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((50u64 << attempts.min(5)).min(1_000))
            })
            .connect(addrs)
            .await
            .map_err(|e| RelayError::Url(e.to_string()))?;
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .build(client.clone());
        tracing::info!(nats = %url, %instance, "relay mode: workers read through NATS JetStream");
        Ok(Arc::new(Relay {
            client,
            jetstream,
            settings: settings.clone(),
            membership: Arc::new(membership::Membership::new(instance.clone())),
            instance,
            handles: OnceCell::new(),
            metrics,
            feeds: std::sync::Mutex::default(),
            readers: std::sync::Mutex::default(),
        }))
    }

    /// The stream and the lease bucket, created if missing (once; a failure is retried by
    /// the next caller).
    async fn handles(&self) -> Result<Handles, RelayError> {
        self.handles
            .get_or_try_init(|| async {
                let stream = self.open_stream().await?;
                let leases = self
                    .open_bucket(
                        &self.settings.lease_bucket,
                        "Streamgate relay: which instance holds each worker's cursor",
                        self.settings.lease_ttl(),
                    )
                    .await?;
                let instances = self
                    .open_bucket(
                        &self.settings.instance_bucket,
                        "Streamgate relay: live instances and the workers each has",
                        self.settings.instance_ttl(),
                    )
                    .await?;
                let feeds = self
                    .open_bucket(
                        &self.settings.feed_bucket,
                        "Streamgate relay: each instance's members of each database feed",
                        self.settings.instance_ttl(),
                    )
                    .await?;
                Ok(Handles {
                    stream,
                    leases,
                    instances,
                    feeds,
                })
            })
            .await
            .cloned()
    }

    async fn open_stream(&self) -> Result<jetstream::stream::Stream, RelayError> {
        let settings = &self.settings;
        let retention = Duration::from_secs(settings.retention_secs);
        let config = jetstream::stream::Config {
            name: settings.stream.clone(),
            description: Some(
                "Streamgate relay: MongoDB change events, one subject per worker".into(),
            ),
            subjects: vec![format!("{}.>", settings.subject_prefix)],
            max_age: retention,
            max_bytes: i64::try_from(settings.max_bytes).unwrap_or(i64::MAX),
            // A hand-over publishes again what the last owner may have published: de-duplicate
            // by resume token over a window longer than any hand-over.
            duplicate_window: retention.min(Duration::from_secs(120)),
            discard: jetstream::stream::DiscardPolicy::Old,
            storage: jetstream::stream::StorageType::File,
            num_replicas: settings.replicas,
            allow_direct: true,
            ..Default::default()
        };
        self.jetstream
            .get_or_create_stream(config)
            .await
            .map_err(|e| RelayError::JetStream(format!("stream {}: {e}", settings.stream)))
    }

    /// A key-value bucket whose entries live `max_age` unless written again (created if
    /// missing).
    async fn open_bucket(
        &self,
        bucket: &str,
        description: &str,
        max_age: Duration,
    ) -> Result<jetstream::kv::Store, RelayError> {
        if let Ok(store) = self.jetstream.get_key_value(bucket).await {
            return Ok(store);
        }
        let config = jetstream::kv::Config {
            bucket: bucket.to_owned(),
            description: description.to_owned(),
            history: 1,
            max_age,
            storage: jetstream::stream::StorageType::Memory,
            num_replicas: self.settings.replicas,
            ..Default::default()
        };
        match self.jetstream.create_key_value(config).await {
            Ok(store) => Ok(store),
            // Another instance created it meanwhile.
            Err(error) => self
                .jetstream
                .get_key_value(bucket)
                .await
                .map_err(|_| RelayError::JetStream(format!("bucket {bucket}: {error}"))),
        }
    }

    /// The subject (and lease key) of a worker: a hash of what its cursor watches.
    fn subject_of(&self, spec: &WatchSpec) -> (String, String) {
        let key = spec_hash(spec);
        (format!("{}.{key}", self.settings.subject_prefix), key)
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Registers this instance's reader of `subject` for what this instance publishes there
    /// as owner (a later reader of the same subject takes its place: the earlier one reads
    /// from JetStream only, which is slower, never wrong).
    fn register_reader(&self, subject: &str) -> mpsc::Receiver<owner::Local> {
        // A few messages in flight: the reader takes them as fast as acknowledgements come,
        // and one it misses it reads from JetStream.
        let (sender, receiver) = mpsc::channel(16);
        crate::sync::lock(&self.readers).insert(subject.to_owned(), sender);
        receiver
    }

    /// The reader of `subject` is gone (unless another took its place).
    fn unregister_reader(&self, subject: &str) {
        let mut readers = crate::sync::lock(&self.readers);
        if readers.get(subject).is_some_and(mpsc::Sender::is_closed) {
            readers.remove(subject);
        }
    }

    /// A batch for a message to `subject`: keeping its changes when this instance has a
    /// reader of the subject to hand them to ([`Relay::hand_to_reader`]).
    fn batch_for(&self, subject: &str) -> wire::Batch {
        if crate::sync::lock(&self.readers).contains_key(subject) {
            wire::Batch::keeping()
        } else {
            wire::Batch::default()
        }
    }

    /// Hands the changes of a message this instance just stored on `subject` as owner (the
    /// subject's message before it being `previous`) to this instance's reader of it, if any.
    /// A reader that is busy or gone reads them from JetStream instead.
    fn hand_to_reader(
        &self,
        subject: &str,
        previous: u64,
        sequence: u64,
        published: u64,
        changes: Vec<crate::worker::source::RawChange>,
    ) {
        if changes.is_empty() {
            return;
        }
        let reader = crate::sync::lock(&self.readers).get(subject).cloned();
        if let Some(reader) = reader {
            let _ = reader.try_send(owner::Local {
                previous,
                sequence,
                published,
                changes,
            });
        }
    }
}

impl crate::worker::relayed::Relay for Relay {
    fn source(self: Arc<Self>, worker: &Arc<Worker>) -> Box<dyn RelayedSource> {
        let (subject, key) = self.subject_of(worker.spec());
        // The owner side: the database feed's (one cursor for many workers) or the worker's.
        if feed::joins(worker) {
            feed::join(&self, worker, subject.clone(), key);
        } else {
            owner::spawn(Arc::clone(&self), worker, subject.clone(), key);
        }
        consumer::Consumer::start(self, worker, subject)
    }

    fn reachable(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn window(
        self: Arc<Self>,
        worker: &Arc<Worker>,
        after: Token,
    ) -> BoxFuture<'static, Option<Box<dyn WindowSource>>> {
        let (subject, _) = self.subject_of(worker.spec());
        let router = ChangeRouter::of_worker(worker);
        Box::pin(window::Window::open(self, subject, router, after))
    }
}

/// This instance's name in leases, heartbeats and NATS connection names: the host name and
/// process id, plus a random part (two in-process test servers share both). Only characters
/// a key-value key may hold.
fn instance_name() -> String {
    let host: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| {
            h.trim()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let host = if host.is_empty() {
        "streamgate".to_owned()
    } else {
        host
    };
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!(
        "{host}-{}-{:06x}",
        std::process::id(),
        hasher.finish() & 0xFF_FFFF
    )
}

/// A stable name for what a cursor watches: the same on every instance and across restarts.
fn spec_hash(spec: &WatchSpec) -> String {
    let described: Document = doc! {
        "db": &spec.db,
        "coll": &spec.coll,
        "pipeline": spec.pipeline.clone(),
        "fullDocument": format!("{:?}", spec.full_document),
        "fullDocumentBeforeChange": format!("{:?}", spec.full_document_before_change),
    };
    let bytes = mongodb::bson::to_vec(&described).unwrap_or_default();
    hex::encode(&Sha256::digest(&bytes)[..16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{FullDocument, FullDocumentBeforeChange};

    fn spec(pipeline: Vec<Document>, full: FullDocument) -> WatchSpec {
        WatchSpec {
            db: "db".into(),
            coll: "c".into(),
            pipeline,
            full_document: full,
            full_document_before_change: FullDocumentBeforeChange::Off,
            routing: Vec::new(),
            membership: None,
        }
    }

    #[test]
    fn heartbeats_must_fit_their_lifetime() {
        let valid = RelayConfig::default();
        assert!(valid.validate().is_ok());
        for (heartbeat_ms, instance_ttl_ms, takeover_grace_ms) in [
            (10, 900, 900),
            (300, 500, 900),
            (40, 90, 900),
            (300, 900, 0),
        ] {
            let settings = RelayConfig {
                heartbeat_ms,
                instance_ttl_ms,
                takeover_grace_ms,
                ..RelayConfig::default()
            };
            assert!(
                settings.validate().is_err(),
                "{heartbeat_ms} / {instance_ttl_ms} / {takeover_grace_ms}"
            );
        }
    }

    #[test]
    fn subjects_follow_what_the_cursor_watches() {
        let a = spec_hash(&spec(
            vec![doc! {"$match": {"x": 1}}],
            FullDocument::Default,
        ));
        assert_eq!(
            a,
            spec_hash(&spec(
                vec![doc! {"$match": {"x": 1}}],
                FullDocument::Default
            ))
        );
        assert_ne!(
            a,
            spec_hash(&spec(
                vec![doc! {"$match": {"x": 2}}],
                FullDocument::Default
            ))
        );
        assert_ne!(
            a,
            spec_hash(&spec(
                vec![doc! {"$match": {"x": 1}}],
                FullDocument::UpdateLookup
            ))
        );
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
