//! Health, readiness and metrics endpoints.

use serde_json::{Value, json};

use crate::harness::clients::{Client, Kind};
use crate::harness::fixture::Fixture;
use crate::harness::mongod::{self, free_port};
use crate::harness::server::{self, TestServer};

#[tokio::test]
async fn live_ready_and_metrics() {
    let f = Fixture::start("ops", |_| {}).await;
    let server = &f.server;

    let live = reqwest::get(server.url("/health/live")).await.unwrap();
    assert_eq!(live.status(), 200);
    let ready = reqwest::get(server.url("/health/ready")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["replicaSet"], "rs0");

    let _client = f.connect(Kind::Sse).await;
    let metrics = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("streamgate_clients{transport=\"sse\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("streamgate_workers 1"), "{metrics}");
    assert!(
        metrics.contains("streamgate_cursors_opened_total 1"),
        "{metrics}"
    );
    f.server.stop().await;
}

#[tokio::test]
async fn not_ready_without_mongodb_and_subscribe_is_503_not_a_hang() {
    let mut config = server::config(mongod::shared());
    // Nothing listens there.
    config.mongo_uri = format!(
        "mongodb://127.0.0.1:{}/?replicaSet=rs0&serverSelectionTimeoutMS=500",
        free_port()
    );
    config
        .streams
        .push(server::stream("db", "c", "s", json!([])));
    // How long the subscribe waits for the cursor before its 503 (default 10 s).
    config.cursor_open_wait_ms = 1_000;
    let server = TestServer::start(config).await;
    assert_eq!(
        reqwest::get(server.url("/health/live"))
            .await
            .unwrap()
            .status(),
        200
    );
    let ready = reqwest::get(server.url("/health/ready")).await.unwrap();
    assert_eq!(ready.status(), 503);
    let started = std::time::Instant::now();
    let refused = Client::connect(Kind::Ndjson, &server.url(""), "/db/c/_streams/s", None)
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, 503);
    // Not a hang: the configured wait, not the default's 10 s or more.
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_secs(1) && waited < std::time::Duration::from_secs(8),
        "{waited:?}"
    );
    server.stop().await;
}
