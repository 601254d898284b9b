//! One connection, many streams (`GET /_streams`, PROTOCOL.md §8) and the options every
//! subscription takes: the composite id resumes every stream exactly, WebSocket
//! `subscribe`/`unsubscribe`, `rewind`, `operationType` narrowing, `heartbeats`,
//! `enveloped=false`, `info`, per-stream permission refusals and bad input.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use mongodb::Collection;
use mongodb::bson::{Document, doc};
use serde_json::{Value, json};
use streamgate::config::Config;

use crate::harness::clients::{Client, Envelope, Kind, Next};
use crate::harness::fixture::insert_seqs;
use crate::harness::server::{self, TestServer};
use crate::harness::{eventually, mongod, unique_db};

const WAIT: Duration = Duration::from_secs(20);

/// A server with streams `a`, `b`, `c` on collections `a`, `b`, `c` of a fresh database.
struct Multi {
    server: TestServer,
    db: String,
}

impl Multi {
    async fn start(prefix: &str, tweak: impl FnOnce(&mut Config, &str)) -> Multi {
        let db = unique_db(prefix);
        let mut config = server::config(mongod::shared());
        for name in ["a", "b", "c"] {
            config
                .streams
                .push(server::stream(&db, name, name, json!([])));
        }
        tweak(&mut config, &db);
        Multi {
            server: TestServer::start(config).await,
            db,
        }
    }

    fn stream(&self, name: &str) -> String {
        format!("/{}/{name}/_streams/{name}", self.db)
    }

    /// `/_streams?streams=…` for `names`, plus `extra` query parameters.
    fn path(&self, names: &[&str], extra: &str) -> String {
        let list: Vec<String> = names.iter().map(|n| self.stream(n)).collect();
        let mut path = format!("/_streams?streams={}", list.join(","));
        if !extra.is_empty() {
            path.push('&');
            path.push_str(extra);
        }
        path
    }

    async fn coll(&self, name: &str) -> Collection<Document> {
        mongod::shared()
            .client()
            .await
            .database(&self.db)
            .collection(name)
    }

    async fn connect(&self, kind: Kind, path: &str, last_id: Option<&str>) -> Client {
        Client::connect(kind, &self.server.url(""), path, last_id)
            .await
            .unwrap()
    }
}

/// The stream and `fullDocument.seq` of a multi-stream change, whatever the transport (SSE
/// carries the whole envelope as `data`).
fn stream_seq(kind: Kind, event: &Envelope) -> (String, i64) {
    let (stream, change) = match kind {
        Kind::Sse => (
            event.data["stream"].as_str().map(str::to_owned),
            &event.data["data"],
        ),
        _ => (event.stream.clone(), &event.data),
    };
    (
        stream.expect("the envelope names its stream"),
        change["fullDocument"]["seq"].as_i64().expect("seq"),
    )
}

/// `n` changes, grouped by stream (per-stream order kept).
async fn by_stream(kind: Kind, client: &mut Client, n: usize) -> BTreeMap<String, Vec<i64>> {
    let mut out: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for event in client.changes(n, WAIT).await {
        let (stream, seq) = stream_seq(kind, &event);
        out.entry(stream).or_default().push(seq);
    }
    out
}

/// Three streams on one connection get all their events; the client drops, events go on on
/// all three, and the last composite id resumes every stream with exactly the missed ones.
#[tokio::test]
async fn three_streams_on_one_connection_resume_exactly() {
    let m = Multi::start("multi_resume", |_, _| {}).await;
    let names = ["a", "b", "c"];
    for kind in [Kind::Sse, Kind::Ndjson, Kind::Ws] {
        let base = match kind {
            Kind::Sse => 0,
            Kind::Ndjson => 100,
            Kind::Ws => 200,
        };
        let path = m.path(&names, "");
        let mut client = m.connect(kind, &path, None).await;
        for name in names {
            insert_seqs(&m.coll(name).await, base..base + 3).await;
        }
        let got = by_stream(kind, &mut client, 9).await;
        for name in names {
            assert_eq!(
                got[&m.stream(name)],
                (base..base + 3).collect::<Vec<_>>(),
                "{kind:?}"
            );
        }
        let info = client.info.clone().expect("an info event on connect");
        assert_eq!(info.data["streams"].as_array().unwrap().len(), 3);
        let last = client.last_id.clone().expect("a composite id");
        drop(client);

        for name in names {
            insert_seqs(&m.coll(name).await, base + 3..base + 6).await;
        }
        let resumed_path = match kind {
            Kind::Sse => path.clone(),
            _ => format!("{path}&lastEventId={last}"),
        };
        let header = (kind == Kind::Sse).then_some(last.as_str());
        let mut client = m.connect(kind, &resumed_path, header).await;
        // One more per stream after the missed ones: anything doubled would come before it.
        for name in names {
            insert_seqs(&m.coll(name).await, base + 6..base + 7).await;
        }
        let got = by_stream(kind, &mut client, 12).await;
        for name in names {
            assert_eq!(
                got[&m.stream(name)],
                (base + 3..base + 7).collect::<Vec<_>>(),
                "{kind:?}: exactly the missed events of {name}, in order"
            );
        }
    }
    m.server.stop().await;
}

/// WebSocket `subscribe` / `unsubscribe` on a live connection, each answered; bad messages get
/// an `error` answer and the connection goes on.
#[tokio::test]
async fn websocket_subscribe_and_unsubscribe_mid_stream() {
    let m = Multi::start("multi_ws_ops", |_, _| {}).await;
    let (a, b) = (m.coll("a").await, m.coll("b").await);
    let mut client = m.connect(Kind::Ws, &m.path(&["a"], ""), None).await;
    insert_seqs(&a, 0..1).await;
    assert_eq!(
        by_stream(Kind::Ws, &mut client, 1).await[&m.stream("a")],
        vec![0]
    );

    client
        .send_text(&json!({"op": "subscribe", "stream": m.stream("b")}).to_string())
        .await;
    let answer = client.expect_event(WAIT).await;
    assert_eq!(answer.event, "subscribed", "{answer:?}");
    insert_seqs(&b, 0..1).await;
    insert_seqs(&a, 1..2).await;
    let got = by_stream(Kind::Ws, &mut client, 2).await;
    assert_eq!(got[&m.stream("a")], vec![1]);
    assert_eq!(got[&m.stream("b")], vec![0]);

    client
        .send_text(&json!({"op": "unsubscribe", "stream": m.stream("a")}).to_string())
        .await;
    let answer = client.expect_event(WAIT).await;
    assert_eq!(answer.event, "unsubscribed", "{answer:?}");
    insert_seqs(&a, 2..3).await;
    insert_seqs(&b, 1..2).await;
    let got = by_stream(Kind::Ws, &mut client, 1).await;
    assert_eq!(
        got.get(&m.stream("b")),
        Some(&vec![1]),
        "a no longer delivers"
    );

    for (message, code) in [
        ("not json".to_owned(), "bad_request"),
        (json!({"op": "dance"}).to_string(), "bad_request"),
        (json!({"op": "subscribe"}).to_string(), "bad_request"),
        (
            json!({"op": "subscribe", "stream": "/nodb/x/_streams/none"}).to_string(),
            "not_found",
        ),
        (
            json!({"op": "subscribe", "stream": m.stream("b")}).to_string(),
            "already_subscribed",
        ),
        (
            json!({"op": "unsubscribe", "stream": m.stream("a")}).to_string(),
            "not_subscribed",
        ),
        (
            json!({"op": "subscribe", "stream": m.stream("c"), "lastEventId": "zz"}).to_string(),
            "bad_request",
        ),
    ] {
        client.send_text(&message).await;
        let answer = client.expect_event(WAIT).await;
        assert_eq!(answer.event, "error", "{message}: {answer:?}");
        assert_eq!(answer.data["code"], code, "{message}: {answer:?}");
    }
    // Still serving.
    insert_seqs(&b, 2..3).await;
    assert_eq!(
        by_stream(Kind::Ws, &mut client, 1).await[&m.stream("b")],
        vec![2]
    );
    m.server.stop().await;
}

/// `rewind=5` starts with the last 5 events (fewer when the stream has fewer), on a single
/// stream and on many; then live events follow without a gap.
#[tokio::test]
async fn rewind_starts_with_the_last_events() {
    let m = Multi::start("multi_rewind", |_, _| {}).await;
    let (a, b) = (m.coll("a").await, m.coll("b").await);
    // A client that keeps both workers (and their rings) alive.
    let mut holder = m
        .connect(Kind::Ndjson, &m.path(&["a", "b"], ""), None)
        .await;
    insert_seqs(&a, 0..8).await;
    insert_seqs(&b, 0..2).await;
    by_stream(Kind::Ndjson, &mut holder, 10).await;

    let single = format!("{}?rewind=5", m.stream("a"));
    let mut client = m.connect(Kind::Sse, &single, None).await;
    let many = m.path(&["a", "b"], "rewind=5");
    let mut multi = m.connect(Kind::Sse, &many, None).await;
    insert_seqs(&a, 8..9).await;
    let seqs: Vec<i64> = client
        .changes(6, WAIT)
        .await
        .iter()
        .map(|e| e.data["fullDocument"]["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, vec![3, 4, 5, 6, 7, 8]);
    let got = by_stream(Kind::Sse, &mut multi, 8).await;
    assert_eq!(got[&m.stream("a")], vec![3, 4, 5, 6, 7, 8]);
    assert_eq!(
        got[&m.stream("b")],
        vec![0, 1],
        "fewer when the stream has fewer"
    );
    m.server.stop().await;
}

/// `operationType=insert` on a stream of every operation gives only the inserts (single and
/// many); an unknown type is a 400.
#[tokio::test]
async fn operation_type_narrows_a_stream_of_every_operation() {
    let m = Multi::start("multi_narrow", |_, _| {}).await;
    let a = m.coll("a").await;
    let single = format!("{}?operationType=insert", m.stream("a"));
    let mut client = m.connect(Kind::Ndjson, &single, None).await;
    let mut multi = m
        .connect(Kind::Sse, &m.path(&["a"], "operationType=insert"), None)
        .await;
    let mut all = m.connect(Kind::Ndjson, &m.stream("a"), None).await;
    a.insert_one(doc! { "_id": 1, "seq": 0 }).await.unwrap();
    a.update_one(doc! { "_id": 1 }, doc! { "$set": { "seq": 10 } })
        .await
        .unwrap();
    a.replace_one(doc! { "_id": 1 }, doc! { "seq": 11 })
        .await
        .unwrap();
    a.delete_one(doc! { "_id": 1 }).await.unwrap();
    a.insert_one(doc! { "_id": 2, "seq": 1 }).await.unwrap();
    let ops: Vec<String> = all
        .changes(5, WAIT)
        .await
        .iter()
        .map(|e| e.data["operationType"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ops, ["insert", "update", "replace", "delete", "insert"]);
    for event in client.changes(2, WAIT).await {
        assert_eq!(event.data["operationType"], "insert", "{event:?}");
    }
    let got = by_stream(Kind::Sse, &mut multi, 2).await;
    assert_eq!(got[&m.stream("a")], vec![0, 1]);

    let refused = Client::connect(
        Kind::Sse,
        &m.server.url(""),
        &format!("{}?operationType=insert,upsert", m.stream("a")),
        None,
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(refused.status, 400);
    assert!(refused.body.contains("operationType"), "{}", refused.body);
    m.server.stop().await;
}

/// Each stream's permission is checked: a refusal of one is a 403 naming it.
#[tokio::test]
async fn a_refused_stream_is_a_403_naming_it() {
    const KEY: &str = "sg_multi_reader_key";
    let m = Multi::start("multi_auth", |config, db| {
        use sha2::Digest;
        let sha = hex::encode(sha2::Sha256::digest(KEY.as_bytes()));
        config.auth = toml::from_str(&format!(
            r#"
            enabled = true
            [[api_keys]]
            name = "reader"
            sha256 = "{sha}"
            roles = ["reader"]
            [[rules]]
            roles = ["reader"]
            streams = ["/{db}/a/_streams/*", "/{db}/c/_streams/*"]
            "#
        ))
        .unwrap();
    })
    .await;
    let path = m.path(&["a", "b", "c"], &format!("access_token={KEY}"));
    for kind in [Kind::Sse, Kind::Ndjson, Kind::Ws] {
        let refused = Client::connect(kind, &m.server.url(""), &path, None)
            .await
            .err()
            .expect("refused");
        assert_eq!(refused.status, 403, "{kind:?}");
        if kind != Kind::Ws {
            let body: Value = serde_json::from_str(&refused.body).unwrap();
            assert_eq!(body["stream"], m.stream("b"), "{body}");
            assert!(body["detail"].as_str().unwrap().contains(&m.stream("b")));
        }
    }
    // The allowed ones alone are served.
    let ok = m.path(&["a", "c"], &format!("access_token={KEY}"));
    let mut client = m.connect(Kind::Ndjson, &ok, None).await;
    insert_seqs(&m.coll("c").await, 0..1).await;
    assert_eq!(
        by_stream(Kind::Ndjson, &mut client, 1).await[&m.stream("c")],
        vec![0]
    );
    m.server.stop().await;
}

/// Bad requests are clear 4xx answers, never a 500: a malformed composite id, too many
/// streams, an unknown stream, no stream, bad option values.
#[tokio::test]
async fn bad_multi_requests_are_refused_clearly() {
    let m = Multi::start("multi_bad", |config, _| {
        config.limits.max_streams_per_connection = 2;
    })
    .await;
    let url = m.server.url("");
    let unknown = format!("/{}/zz/_streams/zz", m.db);
    let cases: Vec<(String, Option<&str>, u16, String)> = vec![
        (
            m.path(&["a"], ""),
            Some("not-a-position!"),
            400,
            "Last-Event-ID".into(),
        ),
        (
            m.path(&["a"], "lastEventId=AQAAxx"),
            None,
            400,
            "Last-Event-ID".into(),
        ),
        (
            m.path(&["a", "b", "c"], ""),
            None,
            400,
            "max_streams_per_connection".into(),
        ),
        (m.path(&["a", "a"], ""), None, 400, "twice".into()),
        (
            format!("/_streams?streams={unknown}"),
            None,
            404,
            unknown.clone(),
        ),
        ("/_streams".into(), None, 400, "streams".into()),
        (
            "/_streams?streams=/x/y".into(),
            None,
            400,
            "stream path".into(),
        ),
        (m.path(&["a"], "rewind=lots"), None, 400, "rewind".into()),
        (
            m.path(&["a"], "heartbeats=maybe"),
            None,
            400,
            "heartbeats".into(),
        ),
    ];
    for (path, header, status, needle) in cases {
        for kind in [Kind::Sse, Kind::Ndjson] {
            let refused = Client::connect(kind, &url, &path, header)
                .await
                .err()
                .unwrap_or_else(|| panic!("{path} was accepted"));
            assert_eq!(refused.status, status, "{path}: {}", refused.body);
            assert!(refused.body.contains(&needle), "{path}: {}", refused.body);
        }
    }
    m.server.stop().await;
}

/// `heartbeats=true` replaces keep-alive comments / empty lines with `heartbeat` events;
/// `enveloped=false` sends NDJSON changes as the bare change document; `info=false` has no
/// `info` line.
#[tokio::test]
async fn heartbeats_bare_changes_and_no_info() {
    let m = Multi::start("multi_framing", |config, _| config.keepalive_secs = 1).await;
    let a = m.coll("a").await;
    // Each connection inserts its own `seq` (and the previous connection read its own insert
    // before this one subscribes, so no earlier change can reach it).
    for (seq, path) in [
        format!(
            "{}?heartbeats=true&enveloped=false&info=false",
            m.stream("a")
        ),
        m.path(&["a"], "heartbeats=true&enveloped=false&info=false"),
    ]
    .into_iter()
    .enumerate()
    {
        let response = reqwest::Client::new()
            .get(m.server.url(&path))
            .header("accept", "application/x-ndjson")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.bytes_stream();
        let mut buffer = String::new();
        let mut lines = Vec::new();
        let mut inserted = false;
        let deadline = tokio::time::Instant::now() + WAIT;
        // A heartbeat (the server's keep-alive is 1 s), then a bare change.
        while lines.len() < 2 {
            let chunk = tokio::time::timeout_at(deadline, body.next())
                .await
                .expect("in time")
                .expect("open")
                .unwrap();
            buffer.push_str(std::str::from_utf8(&chunk).unwrap());
            while let Some(end) = buffer.find('\n') {
                let line: String = buffer.drain(..=end).collect();
                let value: Value = serde_json::from_str(line.trim()).expect("no empty lines");
                if value["event"] == "heartbeat" && !inserted {
                    inserted = true;
                    a.insert_one(doc! { "seq": seq as i64 }).await.unwrap();
                }
                lines.push(value);
            }
        }
        assert_eq!(lines[0], json!({"event": "heartbeat"}), "{path}");
        assert_eq!(lines[1]["operationType"], "insert", "{path}: {}", lines[1]);
        assert_eq!(lines[1]["fullDocument"]["seq"], seq, "{path}");
    }
    m.server.stop().await;
}

/// A stream deleted under a multi-stream connection ends with `cancel` naming it, while the
/// other streams go on.
#[tokio::test]
async fn one_stream_ending_leaves_the_others() {
    let m = Multi::start("multi_cancel", |_, _| {}).await;
    let mut client = m
        .connect(Kind::Ndjson, &m.path(&["a", "b"], ""), None)
        .await;
    let key = streamgate::streams::StreamKey::new(&m.db, "a", "a").unwrap();
    eventually("both streams attached", WAIT, async || {
        m.server
            .registry
            .workers_of(&key)
            .iter()
            .any(|w| w.client_count() > 0)
    })
    .await;
    // Replacing the definition ends its workers with `cancel`, as the admin API would.
    m.server.registry.upsert(
        key.clone(),
        streamgate::streams::definition::StreamDefinition::default()
            .compile()
            .unwrap(),
        streamgate::streams::Origin::Static,
    );
    match client.next(WAIT).await {
        Next::Event(event) => {
            assert_eq!(event.event, "cancel", "{event:?}");
            assert_eq!(event.stream.as_deref(), Some(m.stream("a").as_str()));
        }
        other => panic!("expected cancel, got {other:?}"),
    }
    insert_seqs(&m.coll("b").await, 0..1).await;
    assert_eq!(
        by_stream(Kind::Ndjson, &mut client, 1).await[&m.stream("b")],
        vec![0]
    );
    m.server.stop().await;
}

/// `snapshot=true` on a connection: every stream starts with its current documents and its own
/// `ready`, then its changes, with nothing lost or doubled between the two.
#[tokio::test]
async fn snapshot_then_changes_on_every_stream_of_a_connection() {
    let m = Multi::start("multi_snapshot", |_, _| {}).await;
    insert_seqs(&m.coll("a").await, 0..3).await;
    insert_seqs(&m.coll("b").await, 10..12).await;
    let mut client = m
        .connect(Kind::Ndjson, &m.path(&["a", "b"], "snapshot=true"), None)
        .await;
    let mut snapshot: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut ready: BTreeMap<String, i64> = BTreeMap::new();
    while ready.len() < 2 {
        let Next::Event(event) = client.next(WAIT).await else {
            panic!("the snapshot ended early");
        };
        let stream = event.stream.clone().expect("the envelope names its stream");
        match event.event.as_str() {
            "snapshot" => {
                assert!(!ready.contains_key(&stream), "snapshot after ready");
                snapshot
                    .entry(stream)
                    .or_default()
                    .push(event.data["fullDocument"]["seq"].as_i64().expect("seq"));
            }
            "ready" => {
                ready.insert(stream, event.data["count"].as_i64().expect("count"));
            }
            other => panic!("unexpected {other} before both streams were ready"),
        }
    }
    assert_eq!(snapshot[&m.stream("a")], vec![0, 1, 2]);
    assert_eq!(snapshot[&m.stream("b")], vec![10, 11]);
    assert_eq!(ready[&m.stream("a")], 3);
    assert_eq!(ready[&m.stream("b")], 2);
    insert_seqs(&m.coll("a").await, 3..4).await;
    insert_seqs(&m.coll("b").await, 12..13).await;
    let got = by_stream(Kind::Ndjson, &mut client, 2).await;
    assert_eq!(got[&m.stream("a")], vec![3]);
    assert_eq!(got[&m.stream("b")], vec![12]);
    m.server.stop().await;
}
