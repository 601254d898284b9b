//! One cursor per stream, worker linger, and exactly-once resume (ring, catch-up, restart).

use std::time::Duration;

use futures::StreamExt;
use mongodb::bson::{Document, doc};
use serde_json::json;

use crate::harness::clients::{Client, Envelope, Kind};
use crate::harness::server::{self, TestServer};
use crate::harness::{mongod, unique_db};
use streamgate::streams::StreamKey;

const WAIT: Duration = Duration::from_secs(15);

fn seqs(events: &[Envelope]) -> Vec<i64> {
    events
        .iter()
        .map(|e| e.data["fullDocument"]["seq"].as_i64().expect("seq"))
        .collect()
}

async fn insert_range(coll: &mongodb::Collection<Document>, range: std::ops::Range<i64>) {
    for seq in range {
        coll.insert_one(doc! { "seq": seq }).await.unwrap();
    }
}

/// Change-stream cursors MongoDB holds open on `db.coll`, from `$currentOp`.
async fn change_stream_cursors(mongo: &mongodb::Client, db: &str, coll: &str) -> usize {
    let pipeline = vec![
        doc! { "$currentOp": { "idleCursors": true, "allUsers": true } },
        doc! { "$match": {
            "ns": format!("{db}.{coll}"),
            "cursor.originatingCommand.pipeline.0.$changeStream": { "$exists": true },
        } },
    ];
    let ops: Vec<Document> = mongo
        .database("admin")
        .aggregate(pipeline)
        .await
        .unwrap()
        .map(|d| d.unwrap())
        .collect()
        .await;
    let mut ids: Vec<i64> = ops
        .iter()
        .filter_map(|op| op.get_document("cursor").ok()?.get_i64("cursorId").ok())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids.len()
}

#[tokio::test]
async fn mixed_clients_share_one_cursor_and_worker_lingers_then_stops() {
    let mongo = mongod::shared();
    let db = unique_db("onecursor");
    let mut config = server::config(mongo);
    config
        .streams
        .push(server::stream(&db, "c", "s", json!([])));
    let server = TestServer::start(config).await;
    let path = format!("/{db}/c/_streams/s");
    let mut clients = Vec::new();
    for kind in [Kind::Sse, Kind::Ws, Kind::Ndjson]
        .into_iter()
        .cycle()
        .take(9)
    {
        clients.push(
            Client::connect(kind, &server.url(""), &path, None)
                .await
                .unwrap(),
        );
    }
    let mongo_client = mongo.client().await;
    let coll = mongo_client.database(&db).collection::<Document>("c");
    insert_range(&coll, 0..20).await;
    for client in &mut clients {
        assert_eq!(
            seqs(&client.changes(20, WAIT).await),
            (0..20).collect::<Vec<_>>()
        );
    }
    let key = StreamKey::new(&db, "c", "s").unwrap();
    let workers = server.registry.workers_of(&key);
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].client_count(), 9);
    assert_eq!(
        workers[0]
            .stats
            .cursors_opened
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(change_stream_cursors(&mongo_client, &db, "c").await, 1);

    for client in &mut clients {
        client.close().await;
    }
    drop(clients);
    // Linger is 300 ms; reads return at least every 500 ms.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !server.registry.workers_of(&key).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker did not stop after linger"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while change_stream_cursors(&mongo_client, &db, "c").await != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "cursor still open on the server"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn resume_from_ring_is_exactly_once() {
    let mongo = mongod::shared();
    let db = unique_db("ring");
    let mut config = server::config(mongo);
    config
        .streams
        .push(server::stream(&db, "c", "s", json!([])));
    let server = TestServer::start(config).await;
    let path = format!("/{db}/c/_streams/s");
    let coll = mongo
        .client()
        .await
        .database(&db)
        .collection::<Document>("c");

    // A keeps the worker running; B leaves and comes back.
    let mut a = Client::connect(Kind::Sse, &server.url(""), &path, None)
        .await
        .unwrap();
    let mut b = Client::connect(Kind::Sse, &server.url(""), &path, None)
        .await
        .unwrap();
    insert_range(&coll, 0..5).await;
    let first = b.changes(5, WAIT).await;
    let resume_from = first[2].id.clone().unwrap();
    drop(b);
    insert_range(&coll, 5..10).await;
    a.changes(10, WAIT).await;

    for kind in [Kind::Sse, Kind::Ndjson, Kind::Ws] {
        let (header, query) = match kind {
            Kind::Sse => (Some(resume_from.as_str()), String::new()),
            _ => (None, format!("?lastEventId={resume_from}")),
        };
        let mut resumed = Client::connect(kind, &server.url(""), &format!("{path}{query}"), header)
            .await
            .unwrap();
        assert_eq!(
            seqs(&resumed.changes(7, WAIT).await),
            (3..10).collect::<Vec<_>>(),
            "{kind:?}"
        );
    }
    assert_eq!(server.metrics.catchups.get(), 0, "served from the ring");
    server.stop().await;
}

#[tokio::test]
async fn resume_older_than_ring_hands_over_to_live_without_gap_or_duplicate() {
    let mongo = mongod::shared();
    let db = unique_db("catchup");
    let mut config = server::config(mongo);
    config.ring_size = 5;
    config
        .streams
        .push(server::stream(&db, "c", "s", json!([])));
    let server = TestServer::start(config).await;
    let path = format!("/{db}/c/_streams/s");
    let coll = mongo
        .client()
        .await
        .database(&db)
        .collection::<Document>("c");

    let mut live = Client::connect(Kind::Sse, &server.url(""), &path, None)
        .await
        .unwrap();
    insert_range(&coll, 0..60).await;
    let seen = live.changes(60, WAIT).await;
    let resume_from = seen[1].id.clone().unwrap();

    // Keep inserting while the resumed client catches up and hands over.
    let writer = {
        let coll = coll.clone();
        tokio::spawn(async move { insert_range(&coll, 60..160).await })
    };
    let mut resumed = Client::connect(
        Kind::Ndjson,
        &server.url(""),
        &format!("{path}?lastEventId={resume_from}"),
        None,
    )
    .await
    .unwrap();
    let events = resumed.changes(158, WAIT).await;
    writer.await.unwrap();
    assert_eq!(seqs(&events), (2..160).collect::<Vec<_>>());
    let ids: Vec<_> = events.iter().map(|e| e.id.clone().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    // And it continues live.
    insert_range(&coll, 160..163).await;
    assert_eq!(seqs(&resumed.changes(3, WAIT).await), vec![160, 161, 162]);
    assert_eq!(server.metrics.catchups.get(), 1);
    server.stop().await;
}

#[tokio::test]
async fn client_resumes_across_streamgate_restart() {
    let mongo = mongod::shared();
    let db = unique_db("restart");
    let mut config = server::config(mongo);
    config
        .streams
        .push(server::stream(&db, "c", "s", json!([])));
    let path = format!("/{db}/c/_streams/s");
    let coll = mongo
        .client()
        .await
        .database(&db)
        .collection::<Document>("c");

    let first = TestServer::start(config.clone()).await;
    let mut client = Client::connect(Kind::Sse, &first.url(""), &path, None)
        .await
        .unwrap();
    insert_range(&coll, 0..5).await;
    client.changes(5, WAIT).await;
    let last = client.last_id.clone().unwrap();
    first.stop().await;

    insert_range(&coll, 5..12).await; // while Streamgate is down
    let second = TestServer::start(config).await;
    let mut client = Client::connect(Kind::Sse, &second.url(""), &path, Some(&last))
        .await
        .unwrap();
    let writer = {
        let coll = coll.clone();
        tokio::spawn(async move { insert_range(&coll, 12..20).await })
    };
    let events = client.changes(15, WAIT).await;
    writer.await.unwrap();
    assert_eq!(seqs(&events), (5..20).collect::<Vec<_>>());
    second.stop().await;
}
