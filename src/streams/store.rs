//! Stream definitions stored in MongoDB, shared by every Streamgate instance on the cluster.
//!
//! ```text
//!  PUT/DELETE ──▶ Store::put / delete ──▶ definitions collection ──(oplog)──┐
//!       │                                                                  ▼
//!       └──────── apply (at the write's cluster time) ◀── watcher (change stream, every instance)
//!                          │
//!                          ▼
//!                      Registry  (put_stored / remove_stored: idempotent, never over a static)
//! ```
//!
//! * One document per stream: `{_id: "db/coll/name", db, coll, name, definition, updatedAt}`.
//!   `definition` is the definition's JSON as a string: pipelines are full of `$`-prefixed keys,
//!   which MongoDB only recently accepts as field names, and a string keeps the operator's
//!   Extended JSON byte-for-byte.
//! * The watcher opens a change stream on the collection *first*, then loads every document,
//!   then applies changes as they come: nothing written between the load and the watch is
//!   missed. On any error (or a dropped collection) it starts over the same way, with backoff;
//!   the reload reconciles whatever happened while it was away.
//! * Every change carries a cluster time (the write's `operationTime`, the event's
//!   `clusterTime`, the load's `operationTime`). The store remembers, per key, the time of the
//!   last change it applied and skips older ones: this instance's own writes echoed back by the
//!   watcher, and events replayed after a reload, never undo a newer state. Applying the same
//!   definition twice changes nothing, so clients are only disturbed by real changes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use mongodb::bson::{DateTime, Document, Timestamp, doc};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType};
use mongodb::options::FullDocumentType;

use super::definition::{CompiledDefinition, DefinitionError, StreamDefinition, StreamKey};
use super::registry::{Applied, Origin, Registry, Removed};
use crate::backoff::Backoff;
use crate::sync::SyncFlag;
use crate::watcher::Watched;
use crate::worker::lock;

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// MongoDB refused the operation or could not be reached.
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
    /// The definition could not be serialised (cannot happen for a parsed definition).
    #[error("cannot encode the definition: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The result of a [`Store::put`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// No stored definition had this key.
    Created,
    /// A stored definition was replaced (possibly by an identical one).
    Replaced,
}

/// Why a stored document was ignored.
#[derive(Debug, thiserror::Error)]
enum BadDocument {
    #[error("missing or non-string field {0:?}")]
    Field(&'static str),
    #[error("_id {0:?} does not match db/coll/name")]
    Id(String),
    #[error("definition is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Definition(#[from] DefinitionError),
}

/// One change to a key, from any source.
enum Change {
    Put(Box<CompiledDefinition>),
    Delete,
}

/// Persistence of admin-API definitions and their propagation to the local [`Registry`].
pub struct Store {
    client: mongodb::Client,
    collection: mongodb::Collection<Document>,
    registry: Arc<Registry>,
    /// Cluster time of the last change applied, per key (deletes included). Changes at or
    /// before it are stale and skipped. Also serialises every apply, so the check and the
    /// registry update are one step. Never held across an await.
    applied: Mutex<HashMap<StreamKey, Timestamp>>,
    /// `true` once the watcher has loaded the collection and is watching it.
    synced: crate::sync::SyncFlag,
}

impl Store {
    /// A store on `database.collection`, applying to `registry`. Does no I/O.
    pub fn new(registry: Arc<Registry>, database: &str, collection: &str) -> Arc<Store> {
        let client = registry.mongo().clone();
        let collection = client.database(database).collection::<Document>(collection);
        Arc::new(Store {
            client,
            collection,
            registry,
            applied: Mutex::new(HashMap::new()),
            synced: crate::sync::SyncFlag::default(),
        })
    }

    /// The registry this store applies to.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Stores a definition and applies it locally at once (the watcher of every other
    /// instance applies it from the change stream).
    pub async fn put(
        &self,
        key: &StreamKey,
        definition: CompiledDefinition,
    ) -> Result<Put, StoreError> {
        let json = serde_json::to_string(&definition.source)?;
        let id = document_id(key);
        let document = doc! {
            "_id": &id,
            "db": &key.db,
            "coll": &key.coll,
            "name": &key.name,
            "definition": json,
            "updatedAt": DateTime::now(),
        };
        let mut session = self.client.start_session().await?;
        let result = self
            .collection
            .replace_one(doc! { "_id": &id }, document)
            .upsert(true)
            .session(&mut session)
            .await?;
        let at = session.operation_time();
        self.apply(key, Change::Put(Box::new(definition)), at, "api");
        Ok(if result.upserted_id.is_some() {
            Put::Created
        } else {
            Put::Replaced
        })
    }

    /// Deletes a stored definition and removes it locally. Returns whether it existed (in the
    /// collection or, not yet reconciled, in this instance's registry).
    pub async fn delete(&self, key: &StreamKey) -> Result<bool, StoreError> {
        let mut session = self.client.start_session().await?;
        let result = self
            .collection
            .delete_one(doc! { "_id": document_id(key) })
            .session(&mut session)
            .await?;
        let at = session.operation_time();
        let removed = self.apply(key, Change::Delete, at, "api");
        Ok(result.deleted_count > 0 || removed == Some(Outcome::Removed))
    }

    /// Loads every stored definition and removes local stored ones that are gone.
    async fn reload(&self) -> Result<(), StoreError> {
        let mut session = self.client.start_session().await?;
        let mut cursor = self.collection.find(doc! {}).session(&mut session).await?;
        // The first batch reflects the collection at least as of this time; later changes
        // are replayed by the change stream opened before.
        let at = session.operation_time();
        let mut seen = HashSet::new();
        while let Some(document) = cursor.next(&mut session).await {
            if let Some(key) = self.apply_document(&document?, at) {
                seen.insert(key);
            }
        }
        for entry in self.registry.list() {
            if entry.origin == Origin::Stored && !seen.contains(&entry.key) {
                self.apply(&entry.key, Change::Delete, at, "reload");
            }
        }
        tracing::info!(streams = seen.len(), "stored stream definitions loaded");
        Ok(())
    }

    /// Parses and applies a stored document; returns its key when it is valid.
    fn apply_document(&self, document: &Document, at: Option<Timestamp>) -> Option<StreamKey> {
        match parse_document(document) {
            Ok((key, definition)) => {
                self.apply(&key, Change::Put(Box::new(definition)), at, "watcher");
                Some(key)
            }
            Err(error) => {
                let id = document.get("_id");
                tracing::warn!(?id, %error, "ignoring invalid stored stream definition");
                None
            }
        }
    }

    /// Applies a change unless a newer one for the same key was already applied.
    fn apply(
        &self,
        key: &StreamKey,
        change: Change,
        at: Option<Timestamp>,
        source: &'static str,
    ) -> Option<Outcome> {
        let mut applied = lock(&self.applied);
        if let (Some(at), Some(last)) = (at, applied.get(key))
            && at <= *last
        {
            return None;
        }
        if let Some(at) = at {
            applied.insert(key.clone(), at);
        }
        let outcome = match change {
            Change::Put(definition) => match self.registry.put_stored(key.clone(), *definition) {
                Applied::Created => Outcome::Created,
                Applied::Replaced => Outcome::Replaced,
                Applied::Unchanged => Outcome::Unchanged,
                Applied::Static => {
                    tracing::warn!(stream = %key, "a stored definition has the key of a static one; the static one stays");
                    Outcome::Static
                }
            },
            Change::Delete => match self.registry.remove_stored(key) {
                Removed::Removed => Outcome::Removed,
                Removed::Absent => Outcome::Unchanged,
                Removed::Static => Outcome::Static,
            },
        };
        if matches!(
            outcome,
            Outcome::Created | Outcome::Replaced | Outcome::Removed
        ) {
            tracing::info!(stream = %key, ?outcome, source, "stream definition applied");
        }
        Some(outcome)
    }
}

impl Watched for Store {
    const WHAT: &'static str = "definitions";
    type Error = StoreError;

    fn synced_flag(&self) -> &SyncFlag {
        &self.synced
    }

    /// Watch, load, then apply changes until the stream ends (returns why) or fails.
    async fn sync_and_watch(&self, backoff: &mut Backoff) -> Result<&'static str, StoreError> {
        let mut stream = self
            .collection
            .watch()
            .full_document(FullDocumentType::UpdateLookup)
            .await?;
        self.reload().await?;
        self.synced.set(true);
        backoff.reset();
        while let Some(event) = stream.next().await {
            let event: ChangeStreamEvent<Document> = event?;
            match event.operation_type {
                OperationType::Insert | OperationType::Update | OperationType::Replace => {
                    // No document: it was deleted since; its delete event follows.
                    if let Some(document) = event.full_document {
                        self.apply_document(&document, event.cluster_time);
                    }
                }
                OperationType::Delete => {
                    let key = event
                        .document_key
                        .as_ref()
                        .and_then(|k| k.get_str("_id").ok())
                        .and_then(parse_document_id);
                    match key {
                        Some(key) => {
                            self.apply(&key, Change::Delete, event.cluster_time, "watcher");
                        }
                        None => {
                            tracing::warn!(?event.document_key, "ignoring delete of a foreign document")
                        }
                    }
                }
                OperationType::Drop
                | OperationType::DropDatabase
                | OperationType::Rename
                | OperationType::Invalidate => {
                    return Ok("the definitions collection was dropped or renamed");
                }
                _ => {}
            }
        }
        Ok("the change stream ended")
    }
}

/// What applying a change did to the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Created,
    Replaced,
    Removed,
    Unchanged,
    Static,
}

/// `db/coll/name`: unique, and readable in the collection.
fn document_id(key: &StreamKey) -> String {
    format!("{}/{}/{}", key.db, key.coll, key.name)
}

fn parse_document_id(id: &str) -> Option<StreamKey> {
    let mut parts = id.split('/');
    let (db, coll, name) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    StreamKey::new(db, coll, name).ok()
}

fn parse_document(document: &Document) -> Result<(StreamKey, CompiledDefinition), BadDocument> {
    let field = |name: &'static str| document.get_str(name).map_err(|_| BadDocument::Field(name));
    let key = StreamKey::new(field("db")?, field("coll")?, field("name")?)?;
    let id = field("_id")?;
    if id != document_id(&key) {
        return Err(BadDocument::Id(id.to_owned()));
    }
    let definition: StreamDefinition = serde_json::from_str(field("definition")?)?;
    Ok((key, definition.compile()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_ids_round_trip() {
        let key = StreamKey::new("shop", "orders.v2", "all").unwrap();
        assert_eq!(document_id(&key), "shop/orders.v2/all");
        assert_eq!(parse_document_id("shop/orders.v2/all"), Some(key));
        assert_eq!(parse_document_id("shop/orders"), None);
        assert_eq!(parse_document_id("a/b/c/d"), None);
        assert_eq!(parse_document_id("a/system.x/c"), None);
    }

    #[test]
    fn stored_documents_are_checked() {
        let good = doc! {
            "_id": "a/b/c", "db": "a", "coll": "b", "name": "c",
            "definition": r#"{"pipeline":[{"$match":{"x":1}}],"fullDocument":"default"}"#,
        };
        let (key, definition) = parse_document(&good).unwrap();
        assert_eq!(key.name, "c");
        assert_eq!(
            definition.source.full_document,
            super::super::definition::FullDocument::Default
        );
        let mut wrong_id = good.clone();
        wrong_id.insert("_id", "a/b/d");
        assert!(matches!(parse_document(&wrong_id), Err(BadDocument::Id(_))));
        let mut bad = good.clone();
        bad.insert("definition", r#"{"pipeline":[{"$group":{}}]}"#);
        assert!(matches!(
            parse_document(&bad),
            Err(BadDocument::Definition(_))
        ));
    }
}
