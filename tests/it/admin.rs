//! The admin API (PROTOCOL.md §1–2, issue 3): create, replace, delete, validation, variables,
//! persistence across restarts and instances, stats, and the OpenAPI document, against a real
//! replica set. Every response checked here is also validated against `/_admin/openapi.json`.

use std::time::Duration;

use mongodb::bson::{Document, doc};
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use streamgate::config::Config;
use streamgate::streams::StreamKey;
use tokio::time::Instant;

use crate::harness::clients::{Client, Envelope, Kind, Next};
use crate::harness::mongod::{self, MongoD, database_change_stream_cursors};
use crate::harness::server::{self, TestServer};
use crate::harness::{eventually, unique_db};

const WAIT: Duration = Duration::from_secs(10);
/// How long "nothing more arrives" is watched for.
const QUIET: Duration = Duration::from_millis(700);

// ---------------------------------------------------------------------------------------------
// Helpers

/// A test config whose admin definitions live in their own database (`admin_db`), so tests do
/// not see each other's streams.
fn config(mongo: &MongoD, admin_db: &str) -> Config {
    let mut config = server::config(mongo);
    config.admin.database = admin_db.to_owned();
    config
}

/// A response: status, headers, JSON body (`Value::Null` when empty).
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Value,
    raw: String,
}

impl Reply {
    fn content_type(&self) -> &str {
        self.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn detail(&self) -> &str {
        self.body["detail"].as_str().unwrap_or("")
    }
}

async fn send(request: reqwest::RequestBuilder) -> Reply {
    let response = request.send().await.expect("admin request");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let raw = response.text().await.unwrap();
    let body = if raw.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&raw).unwrap_or(Value::Null)
    };
    Reply {
        status,
        headers,
        body,
        raw,
    }
}

fn admin_path(db: &str, coll: &str, name: &str) -> String {
    format!("/_admin/streams/{db}/{coll}/{name}")
}

async fn get(server: &TestServer, path: &str) -> Reply {
    send(reqwest::Client::new().get(server.url(path))).await
}

async fn put(server: &TestServer, path: &str, body: &Value) -> Reply {
    send(
        reqwest::Client::new()
            .put(server.url(path))
            .header("content-type", "application/json")
            .body(body.to_string()),
    )
    .await
}

async fn put_raw(server: &TestServer, path: &str, body: &str, content_type: &str) -> Reply {
    send(
        reqwest::Client::new()
            .put(server.url(path))
            .header("content-type", content_type)
            .body(body.to_owned()),
    )
    .await
}

async fn delete(server: &TestServer, path: &str) -> Reply {
    send(reqwest::Client::new().delete(server.url(path))).await
}

/// Percent-encodes a query value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `/{db}/{coll}/_streams/{name}` with optional `avars`.
fn stream_path(db: &str, coll: &str, name: &str, avars: Option<Value>) -> String {
    match avars {
        Some(avars) => format!(
            "/{db}/{coll}/_streams/{name}?avars={}",
            encode(&avars.to_string())
        ),
        None => format!("/{db}/{coll}/_streams/{name}"),
    }
}

async fn connect(kind: Kind, server: &TestServer, path: &str) -> Client {
    match Client::connect(kind, &server.url(""), path, None).await {
        Ok(client) => client,
        Err(refused) => panic!("{kind:?} {path} refused: {refused:?}"),
    }
}

/// Expects `cancel`, then the end of the stream (WebSocket: close code 4001).
async fn expect_cancel_and_close(client: &mut Client, kind: Kind) -> Envelope {
    let event = client.expect_event(WAIT).await;
    assert_eq!(event.event, "cancel", "{kind:?}: {event:?}");
    assert_eq!(event.data["code"], "cancel");
    match client.next(WAIT).await {
        Next::End(code) if kind == Kind::Ws => assert_eq!(code, Some(4001)),
        Next::End(_) => {}
        other => panic!("{kind:?}: expected the stream to close after cancel, got {other:?}"),
    }
    event
}

/// The served OpenAPI document, used to validate real responses.
struct OpenApi(Value);

impl OpenApi {
    async fn fetch(server: &TestServer) -> OpenApi {
        let reply = get(server, "/_admin/openapi.json").await;
        assert_eq!(reply.status, 200);
        assert!(reply.content_type().starts_with("application/json"));
        assert_eq!(reply.body["openapi"], "3.1.0");
        OpenApi(reply.body)
    }

    /// Validates `reply` against the response the document declares for `template` + `method`.
    fn check(&self, template: &str, method: &str, reply: &Reply) {
        let operation = &self.0["paths"][template][method];
        assert!(
            operation.is_object(),
            "{method} {template} is not documented"
        );
        let responses = &operation["responses"];
        let mut response = match responses.get(reply.status.to_string()) {
            Some(response) => response.clone(),
            None => panic!(
                "{method} {template}: status {} is not documented",
                reply.status
            ),
        };
        if let Some(reference) = response.get("$ref").and_then(Value::as_str) {
            let pointer = reference.trim_start_matches('#');
            response = self.0.pointer(pointer).expect("response $ref").clone();
        }
        let Some(content) = response.get("content") else {
            assert!(
                reply.raw.is_empty(),
                "{method} {template} {}: documented without a body, got {}",
                reply.status,
                reply.raw
            );
            return;
        };
        let media = reply.content_type().split(';').next().unwrap_or("").trim();
        let schema = &content.get(media).unwrap_or_else(|| {
            panic!(
                "{method} {template} {}: content type {media:?} not documented",
                reply.status
            )
        })["schema"];
        // Component `$ref`s resolve against this root.
        let root = json!({ "components": self.0["components"], "allOf": [schema] });
        let validator = jsonschema::validator_for(&root).expect("schema compiles");
        let errors: Vec<String> = validator
            .iter_errors(&reply.body)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {template} {} does not match the OpenAPI document:\n{}\nbody: {}",
            reply.status,
            errors.join("\n"),
            reply.raw
        );
    }
}

const ONE: &str = "/_admin/streams/{db}/{coll}/{name}";
const LIST: &str = "/_admin/streams";

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn create_subscribe_receive_with_stats() {
    let mongo = mongod::shared();
    let db = unique_db("admin_create");
    let server = TestServer::start(config(mongo, &unique_db("admin_store"))).await;
    let openapi = OpenApi::fetch(&server).await;
    let path = admin_path(&db, "orders", "inserts");
    let definition = json!({
        "pipeline": [{ "$match": { "operationType": "insert" } }],
        "fullDocument": "updateLookup",
        "description": "new orders",
    });

    let created = put(&server, &path, &definition).await;
    assert_eq!(created.status, 201, "{}", created.raw);
    openapi.check(ONE, "put", &created);
    assert_eq!(created.headers["location"], path.as_str());
    assert_eq!(created.body["pipeline"], definition["pipeline"]);
    assert_eq!(created.body["origin"], "stored");
    assert_eq!(created.body["readOnly"], false);
    assert_eq!(created.body["stats"]["state"], "idle");
    assert_eq!(created.body["stats"]["workers"], json!([]));

    let fetched = get(&server, &path).await;
    assert_eq!(fetched.status, 200);
    openapi.check(ONE, "get", &fetched);
    assert_eq!(fetched.body["description"], "new orders");
    assert_eq!(
        fetched.body["path"],
        format!("/{db}/orders/_streams/inserts")
    );

    let mut client = connect(
        Kind::Sse,
        &server,
        &stream_path(&db, "orders", "inserts", None),
    )
    .await;
    let orders = mongo
        .client()
        .await
        .database(&db)
        .collection::<Document>("orders");
    orders.insert_one(doc! { "_id": 1, "n": 1 }).await.unwrap();
    orders
        .update_one(doc! { "_id": 1 }, doc! { "$set": { "n": 2 } })
        .await
        .unwrap();
    orders.insert_one(doc! { "_id": 2, "n": 1 }).await.unwrap();
    let events = client.changes(2, WAIT).await;
    assert_eq!(events[0].data["documentKey"], json!({"_id": 1}));
    assert_eq!(events[1].data["documentKey"], json!({"_id": 2}));
    client.expect_quiet(QUIET).await; // the update was filtered out

    // Stats: one SSE client, two events received and delivered, a position, running.
    let key = StreamKey::new(&db, "orders", "inserts").unwrap();
    let worker = &server.registry.workers_of(&key)[0];
    eventually("deliveries counted", WAIT, async || {
        worker
            .stats
            .delivered
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    })
    .await;
    let stats = get(&server, &path).await;
    openapi.check(ONE, "get", &stats);
    let s = &stats.body["stats"];
    assert_eq!(s["state"], "running");
    assert_eq!(
        s["clients"],
        json!({"sse": 1, "websocket": 0, "ndjson": 0, "total": 1})
    );
    assert_eq!(s["eventsReceived"], 2);
    assert_eq!(s["eventsDelivered"], 2);
    assert!(s["bytesDelivered"].as_u64().unwrap() > 100);
    assert!(s["lastEventAt"].as_str().unwrap().ends_with('Z'));
    assert!(s["position"].as_str().unwrap().starts_with("82"));
    assert_eq!(s["workers"].as_array().unwrap().len(), 1);
    assert_eq!(s["workers"][0]["vars"], json!({}));
    // Served by its database's shared cursor: none of its own.
    assert_eq!(s["workers"][0]["cursorsOpened"], 0);
    assert_eq!(s["workers"][0]["databaseFeed"], true);

    // An identical PUT is a 200 that disturbs nobody.
    let same = put(&server, &path, &definition).await;
    assert_eq!(same.status, 200);
    openapi.check(ONE, "put", &same);
    assert_eq!(same.body["revision"], created.body["revision"]);
    orders.insert_one(doc! { "_id": 3 }).await.unwrap();
    let next = client.changes(1, WAIT).await;
    assert_eq!(next[0].data["documentKey"], json!({"_id": 3}));

    // The list has it; without clients the stream goes idle (linger 300 ms).
    let list = get(&server, "/_admin/streams").await;
    openapi.check(LIST, "get", &list);
    assert_eq!(list.body["streams"].as_array().unwrap().len(), 1);
    drop(client);
    let mut idle = None;
    eventually("the stream goes idle", WAIT, async || {
        let reply = get(&server, &path).await;
        let done = reply.body["stats"]["state"] == "idle";
        idle = done.then_some(reply);
        done
    })
    .await;
    let reply = idle.expect("idle reply");
    openapi.check(ONE, "get", &reply);
    assert_eq!(reply.body["stats"]["workers"], json!([]));
    assert_eq!(reply.body["stats"]["position"], Value::Null);
    server.stop().await;
}

#[tokio::test]
async fn replace_cancels_clients_who_reconnect_onto_the_new_definition() {
    let mongo = mongod::shared();
    let db = unique_db("admin_replace");
    let server = TestServer::start(config(mongo, &unique_db("admin_store"))).await;
    let path = admin_path(&db, "c", "s");
    let first = json!({ "pipeline": [{ "$match": { "fullDocument.x": 1 } }] });
    assert_eq!(put(&server, &path, &first).await.status, 201);
    let before = get(&server, &path).await.body["revision"].clone();

    let sub = stream_path(&db, "c", "s", None);
    let mut clients = Vec::new();
    for kind in [Kind::Sse, Kind::Ws, Kind::Ndjson] {
        clients.push((kind, connect(kind, &server, &sub).await));
    }
    let second = json!({ "pipeline": [{ "$match": { "fullDocument.x": 2 } }] });
    let replaced = put(&server, &path, &second).await;
    assert_eq!(replaced.status, 200, "{}", replaced.raw);
    assert_ne!(replaced.body["revision"], before);
    assert_eq!(replaced.body["pipeline"], second["pipeline"]);
    for (kind, client) in &mut clients {
        let cancel = expect_cancel_and_close(client, *kind).await;
        assert!(
            cancel.data["message"]
                .as_str()
                .unwrap()
                .contains("replaced"),
            "{cancel:?}"
        );
    }

    // Reconnected clients run the new definition.
    let mut client = connect(Kind::Ws, &server, &sub).await;
    let coll = mongo
        .client()
        .await
        .database(&db)
        .collection::<Document>("c");
    coll.insert_one(doc! { "x": 1 }).await.unwrap();
    coll.insert_one(doc! { "x": 2 }).await.unwrap();
    let events = client.changes(1, WAIT).await;
    assert_eq!(events[0].data["fullDocument"]["x"], 2);
    client.expect_quiet(QUIET).await;
    let key = StreamKey::new(&db, "c", "s").unwrap();
    let workers = server.registry.workers_of(&key);
    assert_eq!(workers.len(), 1);
    // The new definition's worker shares its database's cursor again (the replaced worker,
    // with the old filter on the same collection, no longer holds the feed's place).
    assert!(
        workers[0]
            .stats
            .on_database_feed
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    server.stop().await;
}

#[tokio::test]
async fn delete_cancels_and_closes_clients_and_stops_workers() {
    let mongo = mongod::shared();
    let db = unique_db("admin_delete");
    let server = TestServer::start(config(mongo, &unique_db("admin_store"))).await;
    let openapi = OpenApi::fetch(&server).await;
    let path = admin_path(&db, "c", "s");
    let definition = json!({
        // Inside `$expr` a variable cannot be routed in-process: one worker per binding.
        "pipeline": [{ "$match": { "$expr": { "$eq": ["$fullDocument.k", { "$var": ["k", "a"] }] } } }]
    });
    assert_eq!(put(&server, &path, &definition).await.status, 201);
    let mut sse = connect(Kind::Sse, &server, &stream_path(&db, "c", "s", None)).await;
    let mut ws = connect(
        Kind::Ws,
        &server,
        &stream_path(&db, "c", "s", Some(json!({"k": "b"}))),
    )
    .await;
    let mut ndjson = connect(
        Kind::Ndjson,
        &server,
        &stream_path(&db, "c", "s", Some(json!({"k": "b"}))),
    )
    .await;
    let key = StreamKey::new(&db, "c", "s").unwrap();
    assert_eq!(server.registry.workers_of(&key).len(), 2);

    let deleted = delete(&server, &path).await;
    assert_eq!(deleted.status, 204, "{}", deleted.raw);
    openapi.check(ONE, "delete", &deleted);
    expect_cancel_and_close(&mut sse, Kind::Sse).await;
    expect_cancel_and_close(&mut ws, Kind::Ws).await;
    expect_cancel_and_close(&mut ndjson, Kind::Ndjson).await;
    eventually("workers stopped", WAIT, async || {
        server.registry.workers_of(&key).is_empty()
    })
    .await;

    let gone = get(&server, &path).await;
    assert_eq!(gone.status, 404);
    assert_eq!(gone.content_type(), "application/problem+json");
    openapi.check(ONE, "get", &gone);
    let again = delete(&server, &path).await;
    assert_eq!(again.status, 404);
    openapi.check(ONE, "delete", &again);
    let refused = Client::connect(
        Kind::Sse,
        &server.url(""),
        &stream_path(&db, "c", "s", None),
        None,
    )
    .await
    .err()
    .expect("deleted stream is not served");
    assert_eq!(refused.status, 404);
    server.stop().await;
}

#[tokio::test]
async fn static_streams_are_listed_read_only_and_never_overridden() {
    let mongo = mongod::shared();
    let db = unique_db("admin_static");
    let admin_db = unique_db("admin_store");
    let mut config = config(mongo, &admin_db);
    config
        .streams
        .push(server::stream(&db, "c", "fixed", json!([])));
    let server = TestServer::start(config).await;
    let openapi = OpenApi::fetch(&server).await;
    let path = admin_path(&db, "c", "fixed");

    let list = get(&server, "/_admin/streams").await;
    assert_eq!(list.status, 200);
    openapi.check(LIST, "get", &list);
    let streams = list.body["streams"].as_array().unwrap();
    assert_eq!(streams.len(), 1);
    assert_eq!(streams[0]["origin"], "static");
    assert_eq!(streams[0]["readOnly"], true);

    let put_reply = put(&server, &path, &json!({})).await;
    assert_eq!(put_reply.status, 409);
    assert!(
        put_reply.detail().contains("read-only"),
        "{}",
        put_reply.raw
    );
    openapi.check(ONE, "put", &put_reply);
    let delete_reply = delete(&server, &path).await;
    assert_eq!(delete_reply.status, 409);
    openapi.check(ONE, "delete", &delete_reply);

    // A stored document with the same key (written by an instance without that static
    // definition) does not replace the static one here.
    let store = mongo
        .client()
        .await
        .database(&admin_db)
        .collection::<Document>("streams");
    store
        .insert_one(doc! {
            "_id": format!("{db}/c/fixed"), "db": &db, "coll": "c", "name": "fixed",
            "definition": r#"{"pipeline":[{"$match":{"x":1}}]}"#,
        })
        .await
        .unwrap();
    store
        .insert_one(doc! {
            "_id": format!("{db}/c/other"), "db": &db, "coll": "c", "name": "other",
            "definition": "{}",
        })
        .await
        .unwrap();
    let other = StreamKey::new(&db, "c", "other").unwrap();
    eventually("direct write applied", WAIT, async || {
        server.registry.get(&other).is_some()
    })
    .await;
    let fixed = get(&server, &path).await;
    assert_eq!(fixed.body["origin"], "static");
    assert_eq!(fixed.body["pipeline"], json!([]));
    server.stop().await;
}

#[tokio::test]
async fn every_validation_rule_has_a_helpful_400() {
    let mongo = mongod::shared();
    let admin_db = unique_db("admin_store");
    let mut config = config(mongo, &admin_db);
    config.admin.body_limit = 4096;
    let server = TestServer::start(config).await;
    let openapi = OpenApi::fetch(&server).await;
    let ok = admin_path("shop", "orders", "s");
    let long = "x".repeat(1025);
    // (path, body, field, words the detail must contain)
    let cases: Vec<(String, String, Option<&str>, &str)> = vec![
        (ok.clone(), "{".into(), None, "not valid JSON"),
        (ok.clone(), "".into(), None, "not valid JSON"),
        (ok.clone(), "[]".into(), None, "JSON object"),
        (
            ok.clone(),
            r#"{"pipelin":[]}"#.into(),
            Some("pipelin"),
            "unknown member",
        ),
        (
            ok.clone(),
            r#"{"pipeline":{"$match":{}}}"#.into(),
            Some("pipeline"),
            "array",
        ),
        (
            ok.clone(),
            r#"{"pipeline":[1]}"#.into(),
            Some("pipeline[0]"),
            "document",
        ),
        (
            ok.clone(),
            r#"{"pipeline":[{"$match":{},"$project":{}}]}"#.into(),
            Some("pipeline[0]"),
            "exactly one key",
        ),
        (
            ok.clone(),
            r#"{"pipeline":[{"$match":{}},{"$group":{"_id":1}}]}"#.into(),
            Some("pipeline[1].$group"),
            "not allowed in a change stream",
        ),
        (
            ok.clone(),
            r#"{"stages":[{"$lookup":{"from":"x"}}]}"#.into(),
            Some("pipeline[0].$lookup"),
            "allowed: $match",
        ),
        (
            ok.clone(),
            r#"{"pipeline":[{"$out":"x"}]}"#.into(),
            Some("pipeline[0].$out"),
            "not allowed",
        ),
        (
            ok.clone(),
            r#"{"pipeline":[{"$match":{"$where":"sleep(100)"}}]}"#.into(),
            Some("pipeline[0].$match.$where"),
            "JavaScript",
        ),
        (
            ok.clone(),
            r#"{"pipeline":[{"$match":{"$expr":{"$and":[{"$function":{}}]}}}]}"#.into(),
            Some("pipeline[0].$match.$expr.$and[0].$function"),
            "JavaScript",
        ),
        (
            ok.clone(),
            r#"{"pipeline":[{"$addFields":{"t":{"$accumulator":{}}}}]}"#.into(),
            Some("pipeline[0].$addFields.t.$accumulator"),
            "not allowed",
        ),
        (
            ok.clone(),
            r#"{"pipeline":[{"$match":{"a":{"$var":5}}}]}"#.into(),
            Some("pipeline[0].$match.a.$var"),
            "name",
        ),
        (
            ok.clone(),
            r#"{"pipeline":[{"$match":{"a":{"$var":"bad name"}}}]}"#.into(),
            Some("pipeline[0].$match.a.$var"),
            "letters, digits",
        ),
        (
            ok.clone(),
            r#"{"pipeline":[{"$match":{"a":{"$var":"v","b":1}}}]}"#.into(),
            Some("pipeline[0].$match.a"),
            "alone",
        ),
        (
            ok.clone(),
            r#"{"fullDocument":"yes"}"#.into(),
            Some("fullDocument"),
            "updateLookup",
        ),
        (
            ok.clone(),
            r#"{"fullDocumentBeforeChange":"maybe"}"#.into(),
            Some("fullDocumentBeforeChange"),
            "whenAvailable",
        ),
        (
            ok.clone(),
            format!(r#"{{"description":"{long}"}}"#),
            Some("description"),
            "1024",
        ),
        (
            ok.clone(),
            r#"{"description":7}"#.into(),
            Some("description"),
            "string",
        ),
        (
            ok.clone(),
            r#"{"pipeline":[],"stages":[]}"#.into(),
            Some("stages"),
            "not both",
        ),
        (
            ok.clone(),
            r#"{"name":"other"}"#.into(),
            Some("name"),
            "must match the URL",
        ),
        (
            admin_path("sh%20op", "c", "s"),
            "{}".into(),
            Some("db"),
            "may only contain",
        ),
        (
            admin_path("shop", "system.users", "s"),
            "{}".into(),
            Some("coll"),
            "system",
        ),
        (
            admin_path("shop", ".c", "s"),
            "{}".into(),
            Some("coll"),
            "may only contain",
        ),
        (
            admin_path("shop", "c", &"n".repeat(65)),
            "{}".into(),
            Some("name"),
            "1 to 64",
        ),
    ];
    for (path, body, field, words) in &cases {
        let reply = put_raw(&server, path, body, "application/json").await;
        assert_eq!(reply.status, 400, "{path} {body}: {}", reply.raw);
        assert_eq!(reply.content_type(), "application/problem+json");
        assert!(
            reply.detail().contains(words),
            "{body}: detail {:?} lacks {words:?}",
            reply.detail()
        );
        assert_eq!(
            reply.body["field"].as_str(),
            *field,
            "{body}: {}",
            reply.raw
        );
        openapi.check(ONE, "put", &reply);
    }

    let too_big = format!(r#"{{"description":"{}"}}"#, "x".repeat(5000));
    let reply = put_raw(&server, &ok, &too_big, "application/json").await;
    assert_eq!(reply.status, 413, "{}", reply.raw);
    assert_eq!(reply.content_type(), "application/problem+json");
    assert!(reply.detail().contains("4096 bytes"), "{}", reply.raw);
    openapi.check(ONE, "put", &reply);

    let reply = put_raw(&server, &ok, "{}", "text/plain").await;
    assert_eq!(reply.status, 415);
    assert!(reply.detail().contains("application/json"));
    openapi.check(ONE, "put", &reply);

    // A method the API does not have is a problem too.
    let reply = send(reqwest::Client::new().post(server.url(&ok))).await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.content_type(), "application/problem+json");

    // Nothing was stored or registered by any refused request.
    assert!(server.registry.list().is_empty());
    let stored = mongo
        .client()
        .await
        .database(&admin_db)
        .collection::<Document>("streams")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(stored, 0);
    server.stop().await;
}

#[tokio::test]
async fn two_instances_share_definitions_within_a_second() {
    let mongo = mongod::shared();
    let db = unique_db("admin_two");
    let admin_db = unique_db("admin_store");
    let a = TestServer::start(config(mongo, &admin_db)).await;
    let b = TestServer::start(config(mongo, &admin_db)).await;

    // Propagation latency A → B, measured over several creates.
    let mut latencies = Vec::new();
    for i in 0..10 {
        let name = format!("s{i}");
        let key = StreamKey::new(&db, "c", &name).unwrap();
        let sent = Instant::now();
        let reply = put(&a, &admin_path(&db, "c", &name), &json!({})).await;
        assert_eq!(reply.status, 201);
        eventually(
            "created on A, visible on B",
            Duration::from_secs(1),
            async || b.registry.get(&key).is_some(),
        )
        .await;
        // From the PUT being sent to B having applied it.
        latencies.push(sent.elapsed());
    }
    latencies.sort();
    eprintln!(
        "admin propagation A→B (PUT sent → applied on B): min {:?}, median {:?}, max {:?}",
        latencies[0], latencies[5], latencies[9]
    );

    // Servable on B; clients on both.
    let sub = stream_path(&db, "c", "s0", None);
    let mut on_a = connect(Kind::Sse, &a, &sub).await;
    let mut on_b = connect(Kind::Ws, &b, &sub).await;
    mongo
        .client()
        .await
        .database(&db)
        .collection::<Document>("c")
        .insert_one(doc! { "x": 1 })
        .await
        .unwrap();
    assert_eq!(on_a.changes(1, WAIT).await[0].data["fullDocument"]["x"], 1);
    assert_eq!(on_b.changes(1, WAIT).await[0].data["fullDocument"]["x"], 1);

    // Deleted on B: A's clients get cancel and are closed, within a second.
    let start = Instant::now();
    assert_eq!(delete(&b, &admin_path(&db, "c", "s0")).await.status, 204);
    expect_cancel_and_close(&mut on_a, Kind::Sse).await;
    let cancel_latency = start.elapsed();
    expect_cancel_and_close(&mut on_b, Kind::Ws).await;
    eprintln!("admin propagation B→A (delete → cancel on A): {cancel_latency:?}");
    assert!(cancel_latency < Duration::from_secs(1));
    assert!(
        a.registry
            .get(&StreamKey::new(&db, "c", "s0").unwrap())
            .is_none()
    );

    // Rapid replaces on A settle on the last one everywhere (changes apply in oplog order;
    // A's own writes echoed by its watcher never undo a newer state).
    let path = admin_path(&db, "c", "s1");
    for n in 0..8 {
        let reply = put(&a, &path, &json!({ "description": format!("v{n}") })).await;
        assert_eq!(reply.status, 200);
    }
    let key = StreamKey::new(&db, "c", "s1").unwrap();
    let description = |server: &TestServer| {
        server
            .registry
            .get(&key)
            .and_then(|e| e.definition.source.description.clone())
    };
    eventually(
        "B has the last replace",
        Duration::from_secs(1),
        async || description(&b).as_deref() == Some("v7"),
    )
    .await;
    let revision_a = a.registry.get(&key).unwrap().revision;
    // On purpose: a negative check. A's watcher echoes its own eight writes after the fact;
    // give the late echoes time to arrive and make sure none of them undoes v7.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(description(&a).as_deref(), Some("v7"));
    assert_eq!(description(&b).as_deref(), Some("v7"));
    assert_eq!(
        a.registry.get(&key).unwrap().revision,
        revision_a,
        "A's watcher re-applied an older write"
    );
    a.stop().await;
    b.stop().await;
}

/// Issue 9 item 14: `match` is a member of the one definition type, so a PUT takes it (it was
/// refused as an "unknown member"), the view shows it, and it is stored and applied: a second
/// instance loads it from MongoDB and each client gets only its own documents.
#[tokio::test]
async fn put_with_match_is_stored_and_applied() {
    let mongo = mongod::shared();
    let admin_db = unique_db("admin_store");
    let db = unique_db("admin_match");
    let key_line = |name: &str, roles: &str| {
        use sha2::Digest;
        let digest = hex::encode(sha2::Sha256::digest(format!("key-{name}").as_bytes()));
        format!("[[api_keys]]\nname = \"{name}\"\nsha256 = \"{digest}\"\nroles = [{roles}]\n")
    };
    let mut config = config(mongo, &admin_db);
    config.auth = toml::from_str(&format!(
        "enabled = true\n{}{}{}[[rules]]\nroles = [\"reader\"]\nstreams = [\"/{db}/*/_streams/*\"]\n",
        key_line("admin", "\"admin\""),
        key_line("alice", "\"reader\""),
        key_line("bob", "\"reader\""),
    ))
    .unwrap();
    let openapi = OpenApi(serde_json::from_str(streamgate::admin::OPENAPI).unwrap());
    let a = TestServer::start(config.clone()).await;
    let path = admin_path(&db, "c", "owned");
    let rules = json!({ "fullDocument.owner": { "$claim": "sub" } });
    let reply = send(
        reqwest::Client::new()
            .put(a.url(&path))
            .bearer_auth("key-admin")
            .header("content-type", "application/json")
            .body(json!({ "pipeline": [], "match": rules }).to_string()),
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.raw);
    assert_eq!(reply.body["match"], rules, "{}", reply.raw);
    openapi.check(ONE, "put", &reply);
    let fetched = send(
        reqwest::Client::new()
            .get(a.url(&path))
            .bearer_auth("key-admin"),
    )
    .await;
    assert_eq!(fetched.body["match"], rules, "{}", fetched.raw);
    openapi.check(ONE, "get", &fetched);
    a.stop().await;

    // Stored: a fresh instance gets the definition, match included, from MongoDB.
    let b = TestServer::start(config).await;
    let key = StreamKey::new(&db, "c", "owned").unwrap();
    eventually("B loaded the stored definition", WAIT, async || {
        b.registry.get(&key).is_some()
    })
    .await;
    let entry = b.registry.get(&key).unwrap();
    assert_eq!(entry.definition.source.match_rules.as_ref(), Some(&rules));

    // Applied: each API key's `sub` picks its documents on the shared cursor.
    let stream = |who: &str| {
        format!(
            "{}?access_token=key-{who}",
            stream_path(&db, "c", "owned", None)
        )
    };
    let mut alice = connect(Kind::Sse, &b, &stream("alice")).await;
    let mut bob = connect(Kind::Ndjson, &b, &stream("bob")).await;
    let coll = mongo
        .client()
        .await
        .database(&db)
        .collection::<Document>("c");
    for (n, owner) in [(1, "bob"), (2, "alice"), (3, "carol"), (4, "bob")] {
        coll.insert_one(doc! { "n": n, "owner": owner })
            .await
            .unwrap();
    }
    let ns = |events: Vec<Envelope>| -> Vec<Value> {
        events
            .iter()
            .map(|e| e.data["fullDocument"]["n"].clone())
            .collect()
    };
    assert_eq!(ns(alice.changes(1, WAIT).await), [json!(2)]);
    assert_eq!(ns(bob.changes(2, WAIT).await), [json!(1), json!(4)]);
    alice.expect_quiet(QUIET).await;
    b.stop().await;
}

#[tokio::test]
async fn avars_one_worker_per_distinct_values() {
    let mongo = mongod::shared();
    let db = unique_db("admin_avars");
    let server = TestServer::start(config(mongo, &unique_db("admin_store"))).await;
    let openapi = OpenApi::fetch(&server).await;
    let path = admin_path(&db, "c", "mine");
    // Inside `$expr` variables cannot be routed in-process: one worker per distinct values.
    // (Routable bindings sharing one cursor are covered in fanin.rs.)
    let definition = json!({ "pipeline": [{ "$match": { "$expr": { "$and": [
        { "$eq": ["$fullDocument.owner", { "$var": "owner" }] },
        { "$eq": ["$fullDocument.kind", { "$var": ["kind", "a"] }] },
    ] } } }] });
    let created = put(&server, &path, &definition).await;
    assert_eq!(created.status, 201);
    assert_eq!(created.body["variables"], json!(["kind", "owner"]));

    let sub = |avars: Value| stream_path(&db, "c", "mine", Some(avars));
    let mut alice_sse = connect(Kind::Sse, &server, &sub(json!({"owner": "alice"}))).await;
    let mut bob_ws = connect(Kind::Ws, &server, &sub(json!({"owner": "bob"}))).await;
    let mut alice_ndjson = connect(Kind::Ndjson, &server, &sub(json!({"owner": "alice"}))).await;
    // Giving the default explicitly binds the same values: same worker.
    let mut alice_explicit = connect(
        Kind::Ws,
        &server,
        &sub(json!({"kind": "a", "owner": "alice"})),
    )
    .await;

    let key = StreamKey::new(&db, "c", "mine").unwrap();
    let workers = server.registry.workers_of(&key);
    assert_eq!(workers.len(), 2, "one worker per distinct values");
    let alice = workers
        .iter()
        .find(|w| w.key.vars.contains("alice"))
        .unwrap();
    assert_eq!(alice.key.vars, r#"{"kind":"a","owner":"alice"}"#);
    assert_eq!(alice.client_count(), 3);

    let coll = mongo
        .client()
        .await
        .database(&db)
        .collection::<Document>("c");
    for (owner, kind) in [("alice", "a"), ("bob", "a"), ("alice", "b"), ("carol", "a")] {
        coll.insert_one(doc! { "owner": owner, "kind": kind })
            .await
            .unwrap();
    }
    for client in [&mut alice_sse, &mut alice_ndjson, &mut alice_explicit] {
        let events = client.changes(1, WAIT).await;
        assert_eq!(
            events[0].data["fullDocument"]["owner"], "alice",
            "{events:?}"
        );
        assert_eq!(events[0].data["fullDocument"]["kind"], "a");
        client.expect_quiet(QUIET).await;
    }
    let events = bob_ws.changes(1, WAIT).await;
    assert_eq!(events[0].data["fullDocument"]["owner"], "bob");
    bob_ws.expect_quiet(QUIET).await;

    // The three alice clients share one cursor: two on MongoDB for the two bindings (one
    // serves a binding through the database's feed, the other, another filter on the same
    // collection, has its own).
    let mongo = mongod::shared().client().await;
    assert_eq!(database_change_stream_cursors(&mongo, &db).await, 2);
    assert_eq!(server.metrics.cursors_opened.get(), 2);

    assert_eq!(server.registry.workers_of(&key).len(), 2);

    let stats = get(&server, &path).await;
    openapi.check(ONE, "get", &stats);
    let s = &stats.body["stats"];
    assert_eq!(
        s["clients"],
        json!({"sse": 1, "websocket": 2, "ndjson": 1, "total": 4})
    );
    assert_eq!(s["eventsReceived"], 2);
    let mut per_worker: Vec<(Value, u64)> = s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["vars"].clone(), w["clients"]["total"].as_u64().unwrap()))
        .collect();
    per_worker.sort_by_key(|(_, n)| *n);
    assert_eq!(
        per_worker,
        vec![
            (json!({"kind": "a", "owner": "bob"}), 1),
            (json!({"kind": "a", "owner": "alice"}), 3)
        ]
    );

    // A variable without default must be given.
    let unbound = Client::connect(
        Kind::Sse,
        &server.url(""),
        &stream_path(&db, "c", "mine", None),
        None,
    )
    .await
    .err()
    .expect("unbound variable is refused");
    assert_eq!(unbound.status, 400);
    assert!(unbound.body.contains("owner"), "{}", unbound.body);
    server.stop().await;
}

#[tokio::test]
async fn avars_injection_is_refused() {
    let mongo = mongod::shared();
    let db = unique_db("admin_inject");
    let server = TestServer::start(config(mongo, &unique_db("admin_store"))).await;
    let definition = json!({ "pipeline": [{ "$match": {
        "fullDocument.owner": { "$var": "owner" }
    } }] });
    assert_eq!(
        put(&server, &admin_path(&db, "c", "s"), &definition)
            .await
            .status,
        201
    );
    for avars in [
        json!({"owner": {"$gt": ""}}),
        json!({"owner": "$fullDocument.secret"}),
        json!({"owner": ["$$ROOT"]}),
        json!({"$where": "1"}),
    ] {
        for kind in [Kind::Sse, Kind::Ws] {
            let refused = Client::connect(
                kind,
                &server.url(""),
                &stream_path(&db, "c", "s", Some(avars.clone())),
                None,
            )
            .await
            .err()
            .unwrap_or_else(|| panic!("{avars} was accepted"));
            assert_eq!(refused.status, 400, "{avars}");
            assert_eq!(refused.content_type, "application/problem+json");
            assert!(refused.body.contains("starts with '$'"), "{}", refused.body);
        }
    }
    let not_json = Client::connect(
        Kind::Sse,
        &server.url(""),
        &format!("/{db}/c/_streams/s?avars=owner"),
        None,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(not_json.status, 400);
    let key = StreamKey::new(&db, "c", "s").unwrap();
    assert!(server.registry.workers_of(&key).is_empty());
    server.stop().await;
}

#[tokio::test]
async fn definitions_survive_a_restart() {
    let mongo = mongod::shared();
    let db = unique_db("admin_restart");
    let admin_db = unique_db("admin_store");
    let first = TestServer::start(config(mongo, &admin_db)).await;
    let definition = json!({
        "stages": [{ "$match": { "operationType": "insert" } }],
        "fullDocument": "default",
        "description": "kept",
    });
    assert_eq!(
        put(&first, &admin_path(&db, "c", "kept"), &definition)
            .await
            .status,
        201
    );
    assert_eq!(
        put(&first, &admin_path(&db, "c", "gone"), &json!({}))
            .await
            .status,
        201
    );
    assert_eq!(
        delete(&first, &admin_path(&db, "c", "gone")).await.status,
        204
    );
    first.stop().await;

    let second = TestServer::start(config(mongo, &admin_db)).await;
    let kept = get(&second, &admin_path(&db, "c", "kept")).await;
    assert_eq!(kept.status, 200, "{}", kept.raw);
    assert_eq!(kept.body["pipeline"], definition["stages"]);
    assert_eq!(kept.body["fullDocument"], "default");
    assert_eq!(kept.body["description"], "kept");
    assert_eq!(
        get(&second, &admin_path(&db, "c", "gone")).await.status,
        404
    );

    let mut client = connect(Kind::Ndjson, &second, &stream_path(&db, "c", "kept", None)).await;
    mongo
        .client()
        .await
        .database(&db)
        .collection::<Document>("c")
        .insert_one(doc! { "x": 1 })
        .await
        .unwrap();
    assert_eq!(
        client.changes(1, WAIT).await[0].data["fullDocument"]["x"],
        1
    );
    second.stop().await;
}

#[tokio::test]
async fn watcher_survives_a_mongod_restart() {
    let mongo = MongoD::start();
    let admin_db = unique_db("admin_store");
    let db = unique_db("admin_outage");
    // Server selection gives up after 1 s (the driver's default: 30 s) so that the outage
    // below outlasts the driver's single automatic resume attempt in 2.5 s, not 7.
    let short_selection = || {
        let mut config = config(&mongo, &admin_db);
        config.mongo_uri = format!("{}&serverSelectionTimeoutMS=1000", mongo.uri());
        config
    };
    let a = TestServer::start(short_selection()).await;
    let b = TestServer::start(short_selection()).await;
    // Down longer than the driver's single automatic resume attempt (one server selection):
    // the watchers' own retry loop has to bring them back.
    mongo.kill();
    // On purpose: the outage has to last (see above), there is no condition to wait for.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    mongo.restart();

    // A's first PUT may meet the driver still reconnecting: 503 problem, then success.
    let path = admin_path(&db, "c", "after");
    let sent = Instant::now();
    eventually(
        "MongoDB came back: a PUT stores",
        Duration::from_secs(30),
        async || {
            let reply = put(&a, &path, &json!({})).await;
            if reply.status != 201 {
                assert_eq!(reply.status, 503, "{}", reply.raw);
                assert_eq!(reply.content_type(), "application/problem+json");
            }
            reply.status == 201
        },
    )
    .await;
    let key = StreamKey::new(&db, "c", "after").unwrap();
    eventually(
        "B's watcher recovered",
        Duration::from_secs(15),
        async || b.registry.get(&key).is_some(),
    )
    .await;
    eprintln!(
        "admin propagation after a mongod outage (first PUT sent → on B): {:?}",
        sent.elapsed()
    );
    a.stop().await;
    b.stop().await;
}
