//! The common test setup: the shared replica set, a fresh database, one stream `c`/`s` on it
//! (empty pipeline unless changed), and a server serving it.

use mongodb::Collection;
use mongodb::bson::{Document, doc};
use serde_json::json;
use std::sync::Arc;
use streamgate::config::Config;

use streamgate::streams::StreamKey;
use streamgate::worker::Worker;

use super::clients::{Client, Envelope, Kind};
use super::mongod::{self, MongoD};
use super::server::{self, TestServer};
use super::unique_db;

/// A server with one stream, and the collection it watches.
pub struct Fixture {
    /// The running server.
    pub server: TestServer,
    /// The test's own database.
    pub db: String,
    /// `/{db}/c/_streams/s`.
    pub path: String,
    /// `{db}.c`, for inserts.
    pub coll: Collection<Document>,
    /// The config the server was started with (to start another on the same stream).
    pub config: Config,
}

impl Fixture {
    /// Starts a server for stream `c`/`s` in a new database named after `prefix`, on the shared
    /// replica set. `tweak` may change the config (and the stream) before the server starts.
    pub async fn start(prefix: &str, tweak: impl FnOnce(&mut Config)) -> Fixture {
        Self::start_on(mongod::shared(), prefix, tweak).await
    }

    /// Like [`Fixture::start`], on a given replica set.
    pub async fn start_on(
        mongo: &MongoD,
        prefix: &str,
        tweak: impl FnOnce(&mut Config),
    ) -> Fixture {
        let db = unique_db(prefix);
        let mut config = server::config(mongo);
        config
            .streams
            .push(server::stream(&db, "c", "s", json!([])));
        tweak(&mut config);
        let server = TestServer::start(config.clone()).await;
        let coll = mongo
            .client()
            .await
            .database(&db)
            .collection::<Document>("c");
        Fixture {
            server,
            path: format!("/{db}/c/_streams/s"),
            db,
            coll,
            config,
        }
    }

    /// The stream's key.
    pub fn key(&self) -> StreamKey {
        StreamKey::new(&self.db, "c", "s").unwrap()
    }

    /// The stream's running worker (panics if none is running).
    pub fn worker(&self) -> Arc<Worker> {
        self.server
            .registry
            .workers_of(&self.key())
            .pop()
            .expect("a running worker")
    }

    /// Connects a client from now.
    pub async fn connect(&self, kind: Kind) -> Client {
        Client::connect(kind, &self.server.url(""), &self.path, None)
            .await
            .unwrap()
    }

    /// Connects a client resuming after `id`: `Last-Event-ID` for SSE, `?lastEventId=` otherwise.
    pub async fn resume(&self, kind: Kind, id: &str) -> Client {
        resume(&self.server, &self.path, kind, id).await
    }

    /// Inserts `{seq}` documents one by one, in order.
    pub async fn insert_seqs(&self, range: std::ops::Range<i64>) {
        insert_seqs(&self.coll, range).await;
    }
}

/// Connects to `server` resuming after `id` (see [`Fixture::resume`]).
pub async fn resume(server: &TestServer, path: &str, kind: Kind, id: &str) -> Client {
    let (header, path) = match kind {
        Kind::Sse => (Some(id), path.to_owned()),
        _ => (None, format!("{path}?lastEventId={id}")),
    };
    Client::connect(kind, &server.url(""), &path, header)
        .await
        .unwrap()
}

/// Inserts `{seq}` documents one by one, in order.
pub async fn insert_seqs(coll: &Collection<Document>, range: std::ops::Range<i64>) {
    for seq in range {
        coll.insert_one(doc! { "seq": seq }).await.unwrap();
    }
}

/// The `fullDocument.seq` of each event.
pub fn seqs(events: &[Envelope]) -> Vec<i64> {
    events
        .iter()
        .map(|e| e.data["fullDocument"]["seq"].as_i64().expect("seq"))
        .collect()
}
