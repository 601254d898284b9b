//! Connection limits: total, per stream, per user, per IP. Over a limit the answer is an
//! immediate 429 with `Retry-After` and a problem+json body, for SSE and WebSocket alike; a
//! slot is held for the life of the stream and freed when it ends; the server stays healthy.

use std::net::IpAddr;
use std::time::Duration;

use mongodb::bson::{Document, doc};
use serde_json::json;
use streamgate::config::{Config, LimitsConfig};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::harness::clients::{Client, Kind};
use crate::harness::server::{self, TestServer};
use crate::harness::{eventually, mongod, unique_db};

const ANSWER: Duration = Duration::from_secs(10);
const SECRET: &str = "limits-secret-0123456789-0123456789-ab";

/// A server on `db` with streams `c/a` and `c/b`, keep-alive 1 s (so a vanished client is
/// noticed quickly), and the given limits.
fn config(db: &str, limits: LimitsConfig) -> Config {
    let mut config = server::config(mongod::shared());
    config.keepalive_secs = 1;
    config.limits = limits;
    config.streams.push(server::stream(db, "c", "a", json!([])));
    config.streams.push(server::stream(db, "c", "b", json!([])));
    config
}

fn limits() -> LimitsConfig {
    LimitsConfig {
        retry_after_secs: 7,
        ..LimitsConfig::default()
    }
}

/// An open SSE stream (kept open while the value lives), or the refusal.
async fn open(
    url: &str,
    from: Option<IpAddr>,
    token: Option<&str>,
) -> Result<reqwest::Response, reqwest::Response> {
    let client = reqwest::Client::builder()
        .local_address(from)
        .build()
        .unwrap();
    let mut request = client.get(url).header("accept", "text/event-stream");
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = tokio::time::timeout(ANSWER, request.send())
        .await
        .expect("answered in time, never a hang")
        .expect("request");
    if response.status() == 200 {
        Ok(response)
    } else {
        Err(response)
    }
}

/// Checks a refusal: 429, `Retry-After`, problem+json naming the limit.
async fn assert_429(refusal: reqwest::Response, limit: &str) {
    assert_eq!(refusal.status(), 429);
    assert_eq!(refusal.headers()["retry-after"], "7");
    assert_eq!(
        refusal.headers()["content-type"],
        "application/problem+json"
    );
    let body: serde_json::Value = refusal.json().await.unwrap();
    assert_eq!(body["status"], 429);
    assert_eq!(body["limit"], limit, "{body}");
}

/// Retries `url` until a slot is free again; returns how long that took.
async fn until_free(url: &str) -> Duration {
    eventually(
        "the slot is released",
        Duration::from_secs(10),
        async || open(url, None, None).await.is_ok(),
    )
    .await
}

/// The server still serves: health, and a fresh stream delivers an insert.
async fn assert_healthy(server: &TestServer, db: &str) {
    let live = reqwest::get(server.url("/health/live")).await.unwrap();
    assert_eq!(live.status(), 200);
    // Slots of clients that just left are freed as soon as the server notices they are gone.
    let mut connected = None;
    eventually(
        "a slot is free again",
        Duration::from_secs(10),
        async || {
            let path = format!("/{db}/c/_streams/b");
            match Client::connect(Kind::Sse, &server.url(""), &path, None).await {
                Ok(client) => connected = Some(client),
                Err(refused) => assert_eq!(refused.status, 429, "{refused:?}"),
            }
            connected.is_some()
        },
    )
    .await;
    let mut client = connected.expect("connected");
    mongod::shared()
        .client()
        .await
        .database(db)
        .collection::<Document>("c")
        .insert_one(doc! { "n": 1 })
        .await
        .unwrap();
    client.changes(1, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn total_limit_refuses_with_429_and_frees_slots() {
    let db = unique_db("limits_total");
    let server = TestServer::start(config(
        &db,
        LimitsConfig {
            max_connections: Some(2),
            ..limits()
        },
    ))
    .await;
    let a = server.url(&format!("/{db}/c/_streams/a"));
    let first = open(&a, None, None).await.unwrap();
    let second = open(&a, None, None).await.unwrap();
    assert_429(open(&a, None, None).await.unwrap_err(), "max_connections").await;

    // WebSocket over the limit: the same 429, before the upgrade.
    let request = a
        .replacen("http://", "ws://", 1)
        .into_client_request()
        .unwrap();
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 429);
            assert_eq!(response.headers()["retry-after"], "7");
        }
        Ok(_) => panic!("WebSocket accepted over the limit"),
        Err(other) => panic!("unexpected: {other}"),
    }

    drop(first);
    let freed = until_free(&a).await;
    eprintln!("slot freed {freed:?} after the client left");
    drop(second);
    assert_healthy(&server, &db).await;
}

#[tokio::test]
async fn per_stream_limit_counts_each_stream() {
    let db = unique_db("limits_stream");
    let server = TestServer::start(config(
        &db,
        LimitsConfig {
            per_stream: Some(1),
            ..limits()
        },
    ))
    .await;
    let a = server.url(&format!("/{db}/c/_streams/a"));
    let held = open(&a, None, None).await.unwrap();
    assert_429(open(&a, None, None).await.unwrap_err(), "per_stream").await;
    drop(held);
    until_free(&a).await;
    assert_healthy(&server, &db).await;
}

#[tokio::test]
async fn per_ip_limit_counts_each_peer_address() {
    let db = unique_db("limits_ip");
    let server = TestServer::start(config(
        &db,
        LimitsConfig {
            per_ip: Some(2),
            ..limits()
        },
    ))
    .await;
    let a = server.url(&format!("/{db}/c/_streams/a"));
    let one: IpAddr = "127.0.0.1".parse().unwrap();
    let two: IpAddr = "127.0.0.2".parse().unwrap();
    let _held = (
        open(&a, Some(one), None).await.unwrap(),
        open(&a, Some(one), None).await.unwrap(),
    );
    assert_429(open(&a, Some(one), None).await.unwrap_err(), "per_ip").await;
    // Another address (still loopback) has its own count.
    let _other = open(&a, Some(two), None).await.unwrap();
}

#[tokio::test]
async fn per_user_limit_counts_each_subject() {
    let db = unique_db("limits_user");
    let mut config = config(
        &db,
        LimitsConfig {
            per_user: Some(1),
            ..limits()
        },
    );
    config.auth = server::hs256_subscribers_of_c(&db, SECRET);
    let server = TestServer::start(config).await;
    let token = |sub: &str| {
        server::hs256(
            SECRET,
            &json!({ "sub": sub, "exp": server::expires_in(600) }),
        )
    };
    let (alice, bob) = (token("alice"), token("bob"));
    let a = server.url(&format!("/{db}/c/_streams/a"));
    let b = server.url(&format!("/{db}/c/_streams/b"));
    let held = open(&a, None, Some(&alice)).await.unwrap();
    // Any stream counts for the same user.
    assert_429(open(&b, None, Some(&alice)).await.unwrap_err(), "per_user").await;
    let _bob = open(&a, None, Some(&bob)).await.unwrap();
    drop(held);
    eventually(
        "alice's slot is released",
        Duration::from_secs(10),
        async || open(&b, None, Some(&alice)).await.is_ok(),
    )
    .await;
}

/// Issue 8 item 1: the driver's pool is sized from `max_workers`, so N cursors never queue for
/// N connections. With the driver's default pool of 10, at most 10 of these 40 workers could
/// sit in their `getMore` at once (each holds a connection for up to `max_await`), and
/// subscribing to all 40 took 26 s on this machine; now every worker's `getMore` is in flight
/// together.
#[tokio::test]
async fn cursors_never_queue_for_a_pooled_connection() {
    const STREAMS: usize = 40;
    let mongo = mongod::shared();
    let db = unique_db("limits_pool");
    let mut config = server::config(mongo);
    // A cursor per stream (no database feed), so that 40 cursors need 40 connections.
    config.shared_database_cursors = false;
    for i in 0..STREAMS {
        let coll = format!("c{i}");
        config
            .streams
            .push(server::stream(&db, &coll, "s", json!([])));
    }
    let server = TestServer::start(config).await;
    let started = std::time::Instant::now();
    let mut clients = Vec::new();
    for i in 0..STREAMS {
        let path = format!("/{db}/c{i}/_streams/s");
        match Client::connect(Kind::Sse, &server.url(""), &path, None).await {
            Ok(client) => clients.push(client),
            Err(refused) => panic!("{path}: {refused:?}"),
        }
    }
    eprintln!(
        "subscribed to {STREAMS} cold streams in {:?}",
        started.elapsed()
    );

    // More getMores in flight on this database than the default pool (10) could carry; not
    // all 40, so that a worker between two getMores does not make the check flaky.
    let admin = mongo.client().await.database("admin");
    eventually(
        "the workers' getMores run side by side",
        Duration::from_secs(20),
        async || {
            let pipeline = [
                doc! { "$currentOp": { "allUsers": true } },
                doc! { "$match": {
                    "ns": { "$regex": format!("^{db}\\.") },
                    "command.getMore": { "$exists": true },
                } },
                doc! { "$count": "n" },
            ];
            let mut cursor = admin.aggregate(pipeline).await.unwrap();
            let in_flight = if cursor.advance().await.unwrap() {
                cursor
                    .deserialize_current()
                    .unwrap()
                    .get_i32("n")
                    .unwrap_or(0)
            } else {
                0
            };
            in_flight >= 30
        },
    )
    .await;

    // And every stream still delivers.
    let database = mongo.client().await.database(&db);
    for i in 0..STREAMS {
        database
            .collection::<Document>(&format!("c{i}"))
            .insert_one(doc! { "i": i as i64 })
            .await
            .unwrap();
    }
    for (i, client) in clients.iter_mut().enumerate() {
        let events = client.changes(1, Duration::from_secs(10)).await;
        assert_eq!(events[0].data["fullDocument"]["i"], json!(i), "stream c{i}");
    }
    server.stop().await;
}
