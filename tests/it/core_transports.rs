//! Each transport delivers insert, update, replace and delete with the right ids, names and
//! relaxed Extended JSON; bad requests get the right status codes.

use std::time::Duration;

use mongodb::bson::doc;
use serde_json::json;

use crate::harness::clients::{Client, Kind, Next};
use crate::harness::fixture::Fixture;

const WAIT: Duration = Duration::from_secs(10);

async fn four_changes(kind: Kind) {
    let f = Fixture::start("transports", |_| {}).await;
    let mut client = f.connect(kind).await;
    let coll = &f.coll;
    coll.insert_one(
        doc! { "_id": 1, "n": 1_i64, "price": 2.5, "at": mongodb::bson::DateTime::from_millis(0) },
    )
    .await
    .unwrap();
    coll.update_one(
        doc! { "_id": 1 },
        doc! { "$set": { "n": 2 }, "$unset": { "price": "" } },
    )
    .await
    .unwrap();
    coll.replace_one(doc! { "_id": 1 }, doc! { "n": 3 })
        .await
        .unwrap();
    coll.delete_one(doc! { "_id": 1 }).await.unwrap();

    let events = client.changes(4, WAIT).await;
    let kinds: Vec<_> = events
        .iter()
        .map(|e| e.data["operationType"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, ["insert", "update", "replace", "delete"]);

    // Ids are resume tokens, strictly increasing, and `_id` is not repeated in data.
    let ids: Vec<_> = events.iter().map(|e| e.id.clone().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert!(ids.iter().all(|id| id.starts_with("82") && id.len() > 20));
    assert!(events.iter().all(|e| e.data.get("_id").is_none()));

    // Relaxed Extended JSON: plain numbers, $date as ISO string.
    let insert = &events[0].data;
    assert_eq!(insert["fullDocument"]["n"], json!(1));
    assert_eq!(insert["fullDocument"]["price"], json!(2.5));
    assert_eq!(
        insert["fullDocument"]["at"],
        json!({"$date": "1970-01-01T00:00:00Z"})
    );
    assert_eq!(insert["documentKey"], json!({"_id": 1}));
    assert_eq!(insert["ns"], json!({"db": f.db, "coll": "c"}));
    let update = &events[1].data;
    assert_eq!(
        update["updateDescription"]["updatedFields"],
        json!({"n": 2})
    );
    assert_eq!(
        update["updateDescription"]["removedFields"],
        json!(["price"])
    );
    assert_eq!(events[2].data["fullDocument"], json!({"_id": 1, "n": 3}));
    assert_eq!(events[3].data["documentKey"], json!({"_id": 1}));

    if kind == Kind::Sse {
        assert_eq!(client.retry, Some(2000));
        assert_eq!(client.headers["content-type"], "text/event-stream");
        assert_eq!(client.headers["cache-control"], "no-cache");
        assert_eq!(client.headers["x-accel-buffering"], "no");
        // Written directly, not through hyper (see `http::server`): close-delimited.
        assert_eq!(client.headers["connection"], "close");
    }
    if kind == Kind::Ndjson {
        assert_eq!(client.headers["content-type"], "application/x-ndjson");
    }
    f.server.stop().await;
}

#[tokio::test]
async fn sse_delivers_every_operation() {
    four_changes(Kind::Sse).await;
}

#[tokio::test]
async fn websocket_delivers_every_operation() {
    four_changes(Kind::Ws).await;
}

#[tokio::test]
async fn ndjson_delivers_every_operation() {
    four_changes(Kind::Ndjson).await;
}

#[tokio::test]
async fn request_errors_have_status_and_json_body() {
    let f = Fixture::start("errors", |_| {}).await;
    let (server, db, path) = (&f.server, &f.db, &f.path);
    let base = server.url("");

    let unknown = Client::connect(Kind::Sse, &base, &format!("/{db}/c/_streams/nope"), None)
        .await
        .err()
        .unwrap();
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.content_type, "application/problem+json");

    let ws_unknown = Client::connect(Kind::Ws, &base, &format!("/{db}/c/_streams/nope"), None)
        .await
        .err()
        .unwrap();
    assert_eq!(ws_unknown.status, 404);

    let plain = reqwest::get(server.url(path)).await.unwrap();
    assert_eq!(plain.status(), 406);
    let body: serde_json::Value = plain.json().await.unwrap();
    assert_eq!(body["status"], 406);
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("application/x-ndjson")
    );

    for bad in ["zz", "abc", "00112233445566778899", "{\"x\":1}"] {
        let refused = Client::connect(Kind::Sse, &base, path, Some(bad))
            .await
            .err()
            .unwrap();
        assert_eq!(refused.status, 400, "id {bad:?}");
        assert!(refused.body.contains("event id"), "{}", refused.body);
    }
    let ws_bad = Client::connect(Kind::Ws, &base, &format!("{path}?lastEventId=nothex"), None)
        .await
        .err()
        .unwrap();
    assert_eq!(ws_bad.status, 400);

    // No worker was started by any refused request.
    assert!(server.registry.all_workers().is_empty());
    f.server.stop().await;
}

#[tokio::test]
async fn keepalive_and_shutdown_goodbye() {
    let f = Fixture::start("keepalive", |config| config.keepalive_secs = 1).await;
    let mut sse = f.connect(Kind::Sse).await;
    let mut ndjson = f.connect(Kind::Ndjson).await;
    let mut ws = f.connect(Kind::Ws).await;
    // The three wait side by side: 2.5 s in all, not each.
    let quiet = Duration::from_millis(2500);
    let (a, b, c) = tokio::join!(sse.next(quiet), ndjson.next(quiet), ws.next(quiet));
    for next in [a, b, c] {
        assert!(matches!(next, Next::Timeout));
    }
    for client in [&sse, &ndjson, &ws] {
        assert!(
            client.keepalives >= 1,
            "keep-alive within 2.5 s at 1 s period"
        );
    }
    let stopping = tokio::spawn(f.server.stop());
    assert!(matches!(ws.next(WAIT).await, Next::End(Some(1001))));
    assert!(matches!(sse.next(WAIT).await, Next::End(None)));
    assert_eq!(sse.retry, Some(2000));
    assert!(matches!(ndjson.next(WAIT).await, Next::End(None)));
    tokio::time::timeout(WAIT, stopping).await.unwrap().unwrap();
}
