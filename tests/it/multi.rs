//! One connection, many streams (`GET /_streams`, PROTOCOL.md §8) and the options every
//! subscription takes: the composite id resumes every stream exactly, WebSocket
//! `subscribe`/`unsubscribe`, `rewind`, `operationType` narrowing, `heartbeats`,
//! `enveloped=false`, `info`, per-stream permission refusals and bad input. The composite id
//! (issue 21): its size at 10 and 100 streams, exactly-once across a kill -9 of the server, a
//! MongoDB stepdown and WebSocket `subscribe`/`unsubscribe`, and ids of the former format.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use mongodb::Collection;
use mongodb::bson::{Document, doc};
use serde_json::{Value, json};
use streamgate::config::Config;
use tokio::time::Instant;

use crate::harness::clients::{Client, Envelope, Kind, Next};
use crate::harness::fixture::insert_seqs;
use crate::harness::mongod::MongoD;
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
        Multi::start_on(mongod::shared(), prefix, tweak).await
    }

    async fn start_on(
        mongo: &MongoD,
        prefix: &str,
        tweak: impl FnOnce(&mut Config, &str),
    ) -> Multi {
        let db = unique_db(prefix);
        let mut config = server::config(mongo);
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

/// Reads changes until the stream ends or nothing comes for `quiet`, adding each stream's
/// `seq`s to `seen` (anything but a change fails the test).
async fn drain(
    kind: Kind,
    client: &mut Client,
    seen: &mut BTreeMap<String, Vec<i64>>,
    quiet: Duration,
) {
    drain_until(kind, client, seen, quiet, Instant::now() + WAIT).await;
}

/// [`drain`], but returning at `until` too: with a writer still running the stream is never
/// quiet, and a read bounded only by quiet would never end.
async fn drain_until(
    kind: Kind,
    client: &mut Client,
    seen: &mut BTreeMap<String, Vec<i64>>,
    quiet: Duration,
    until: Instant,
) {
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match client.next(quiet.min(left)).await {
            Next::Event(event) if event.event == "change" => {
                let (stream, seq) = stream_seq(kind, &event);
                seen.entry(stream).or_default().push(seq);
            }
            Next::Event(event) => panic!("unexpected {event:?}"),
            Next::End(_) | Next::Timeout => return,
        }
    }
}

/// Inserts `{seq}` into each of `colls` in one transaction: their changes share one cluster
/// time and differ by `txnOpIndex`.
async fn insert_in_one_transaction(colls: &[Collection<Document>], seq: i64) {
    let mut session = colls[0].client().start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    for coll in colls {
        coll.insert_one(doc! { "seq": seq })
            .session(&mut session)
            .await
            .unwrap();
    }
    session.commit_transaction().await.unwrap();
}

/// Writes round `seq` = 0, 1, 2… into each of `colls` until `stop`: every third round in one
/// transaction over all of them (their changes then share one cluster time and differ by
/// `txnOpIndex`), the others one insert each. Returns how many rounds were written.
async fn write_rounds(
    colls: Vec<Collection<Document>>,
    stop: tokio_util::sync::CancellationToken,
) -> i64 {
    let mut seq = 0;
    while !stop.is_cancelled() {
        if seq % 3 == 0 {
            insert_in_one_transaction(&colls, seq).await;
        } else {
            for coll in &colls {
                coll.insert_one(doc! { "seq": seq }).await.unwrap();
            }
        }
        seq += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    seq
}

/// Every stream of `names` (streams `/db/<name>/_streams/<name>`) got exactly `0..rounds`, in
/// order.
/// Reads an SSE multi-stream client (see [`drain`]) until each of the streams `names` of `db`
/// has at least `rounds` changes in `seen`.
async fn drain_until_every_stream_has(
    client: &mut Client,
    seen: &mut BTreeMap<String, Vec<i64>>,
    db: &str,
    names: &[&str],
    rounds: i64,
) {
    eventually("every change arrived", WAIT, async || {
        drain(Kind::Sse, client, seen, Duration::from_millis(300)).await;
        names.iter().all(|n| {
            seen.get(&format!("/{db}/{n}/_streams/{n}"))
                .is_some_and(|s| s.len() >= rounds as usize)
        })
    })
    .await;
}

fn assert_exactly_once(db: &str, names: &[&str], seen: &BTreeMap<String, Vec<i64>>, rounds: i64) {
    for name in names {
        let got = seen
            .get(&format!("/{db}/{name}/_streams/{name}"))
            .cloned()
            .unwrap_or_default();
        let lost = (0..rounds).filter(|s| !got.contains(s)).count();
        let doubled = got.len() + lost - rounds as usize;
        assert_eq!(
            (lost, doubled),
            (0, 0),
            "{name}: {lost} lost, {doubled} duplicated of {rounds}"
        );
        assert_eq!(got, (0..rounds).collect::<Vec<_>>(), "{name}: in order");
    }
}

/// The composite id of 10 and 100 streams, after plain changes and after one transaction
/// over every stream's collection (entries that differ only by `txnOpIndex`), is within
/// PROTOCOL.md §8's bounds; over SSE it is not repeated in the envelope; the 100-stream id
/// resumes every stream exactly, transaction included; an id of the former format is a 400.
#[tokio::test]
async fn composite_ids_of_10_and_100_streams_stay_small_and_resume_exactly() {
    let names: Vec<String> = (0..100).map(|i| format!("s{i}")).collect();
    let m = Multi::start("multi_size", |config, db| {
        for name in &names {
            config
                .streams
                .push(server::stream(db, name, name, json!([])));
        }
    })
    .await;
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    let colls: Vec<Collection<Document>> = {
        let db = mongod::shared().client().await.database(&m.db);
        all.iter().map(|n| db.collection(n)).collect()
    };
    let mut ten = m.connect(Kind::Sse, &m.path(&all[..10], ""), None).await;
    let mut hundred = m.connect(Kind::Sse, &m.path(&all, ""), None).await;
    for coll in &colls {
        insert_seqs(coll, 0..1).await;
    }
    ten.changes(10, WAIT).await;
    hundred.changes(100, WAIT).await;
    insert_in_one_transaction(&colls, 1).await;
    for event in ten.changes(10, WAIT).await {
        assert!(event.data["stream"].is_string(), "{event:?}");
        assert!(
            event.data.get("id").is_none(),
            "the SSE envelope does not repeat the id: {event:?}"
        );
    }
    hundred.changes(100, WAIT).await;
    let (ten_id, hundred_id) = (
        ten.last_id.clone().unwrap(),
        hundred.last_id.clone().unwrap(),
    );
    println!(
        "composite id: 10 streams {} characters, 100 streams {}",
        ten_id.len(),
        hundred_id.len()
    );
    assert!(ten_id.len() <= 160, "10 streams: {ten_id}");
    assert!(hundred_id.len() <= 1000, "100 streams: {hundred_id}");

    drop(hundred);
    insert_in_one_transaction(&colls, 2).await;
    let mut resumed = m
        .connect(Kind::Sse, &m.path(&all, ""), Some(&hundred_id))
        .await;
    for coll in &colls {
        insert_seqs(coll, 3..4).await;
    }
    let got = by_stream(Kind::Sse, &mut resumed, 200).await;
    for name in &all {
        assert_eq!(got[&m.stream(name)], vec![2, 3], "{name}");
    }

    // An id of the former format (whole tokens): refused, saying why.
    let mut old = vec![1u8, 0, 0, 0x12, 0x34, 0x56, 0x78, 0, 19];
    old.extend_from_slice(&hex::decode("8265A1B2C3000000012B022C0100296E5A1004").unwrap());
    old.resize(old.len().div_ceil(3) * 3, 0);
    use base64::Engine;
    let old = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&old);
    let refused = Client::connect(
        Kind::Sse,
        &m.server.url(""),
        &m.path(&all[..3], ""),
        Some(&old),
    )
    .await
    .err()
    .expect("an old id is refused");
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(
        refused.body.contains("old_position_format"),
        "{}",
        refused.body
    );
    m.server.stop().await;
}

/// A streamgate process on a fixed port with streams `a`, `b`, `c` of `db`.
struct Process {
    port: u16,
    config: tempfile::NamedTempFile,
    child: Option<tokio::process::Child>,
}

impl Process {
    fn new(db: &str) -> Process {
        let port = mongod::free_port();
        let mut config = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        let mut text = format!(
            "listen = \"127.0.0.1:{port}\"\nmongo_uri = {:?}\nworker_linger_ms = 300\n",
            mongod::shared().uri()
        );
        for name in ["a", "b", "c"] {
            text.push_str(&format!(
                "[[streams]]\ndb = {db:?}\ncoll = {name:?}\nname = {name:?}\n"
            ));
        }
        std::io::Write::write_all(&mut config, text.as_bytes()).unwrap();
        Process {
            port,
            config,
            child: None,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn start(&mut self) {
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamgate"))
            .arg("--config")
            .arg(self.config.path())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let url = format!("{}/health/ready", self.url());
        eventually("the server is ready", WAIT, async || {
            reqwest::get(&url).await.is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    /// SIGKILL: no shutdown, no goodbye to clients.
    async fn kill(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().await.unwrap();
    }
}

/// Changes flow into three streams (a transaction over all three every third round) while
/// an SSE client reads them on one connection; the server is killed with SIGKILL, changes go
/// on while it is down, it restarts (its workers start from now), and the client resumes
/// with its last composite id: every stream gets every change exactly once, in order, the
/// missed ones through catch-ups opened at each stream's place in the oplog.
#[tokio::test]
async fn composite_id_resumes_every_stream_exactly_once_after_kill_9_and_restart() {
    let db = unique_db("multi_kill");
    let mut process = Process::new(&db);
    process.start().await;
    let names = ["a", "b", "c"];
    let stream = |name: &str| format!("/{db}/{name}/_streams/{name}");
    let path = format!("/_streams?streams={}", names.map(stream).join(","));
    let colls: Vec<Collection<Document>> = {
        let db = mongod::shared().client().await.database(&db);
        names.iter().map(|n| db.collection(n)).collect()
    };
    let mut client = Client::connect(Kind::Sse, &process.url(), &path, None)
        .await
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = tokio::spawn(write_rounds(colls, stop.clone()));
    let mut seen = BTreeMap::new();
    while seen
        .get(&stream("c"))
        .is_none_or(|s: &Vec<i64>| s.len() < 20)
    {
        let (stream, seq) = stream_seq(Kind::Sse, &client.expect_event(WAIT).await);
        seen.entry(stream).or_default().push(seq);
    }
    process.kill().await;
    drain(Kind::Sse, &mut client, &mut seen, Duration::from_secs(2)).await;
    let last = client.last_id.clone().expect("a composite id");
    process.start().await;
    // Subscribed at once after the restart: a worker whose cursor is open but has no position
    // yet is not ready (an immediate 503 here was that, about 1 run in 16).
    let mut client = Client::connect(Kind::Sse, &process.url(), &path, Some(&last))
        .await
        .unwrap();
    // Read on for a while with changes still flowing, then stop them and read the rest.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        drain_until(
            Kind::Sse,
            &mut client,
            &mut seen,
            Duration::from_millis(200),
            until,
        )
        .await;
    }
    stop.cancel();
    let rounds = writer.await.unwrap();
    drain_until_every_stream_has(&mut client, &mut seen, &db, &names, rounds).await;
    client.expect_quiet(Duration::from_millis(500)).await;
    assert_exactly_once(&db, &names, &seen, rounds);
    process.kill().await;
}

/// Steps MongoDB's only member down (every cursor and connection on it is interrupted) and
/// waits until it is primary again.
async fn step_down_and_back(mongo: &MongoD) {
    let uri = format!(
        "mongodb://127.0.0.1:{}/?directConnection=true",
        mongo.port()
    );
    let direct = mongodb::Client::with_uri_str(&uri).await.unwrap();
    let admin = direct.database("admin");
    let is_primary = async || {
        admin
            .run_command(doc! { "hello": 1 })
            .await
            .ok()
            .and_then(|hello| hello.get_bool("isWritablePrimary").ok())
            == Some(true)
    };
    // The primary drops its connections as it steps down: the answer may be an error.
    let _ = admin
        .run_command(doc! { "replSetStepDown": 60, "force": true })
        .await;
    assert!(!is_primary().await, "stepped down");
    // A single-member set stands for election as soon as it is unfrozen.
    eventually("primary again", WAIT, async || {
        let _ = admin.run_command(doc! { "replSetFreeze": 0 }).await;
        is_primary().await
    })
    .await;
}

/// A stepdown while a client reads three streams on one connection and while it is away:
/// the worker's cursors reopen after it, and the client, resuming with its composite id
/// after the server's workers have retired, gets every change exactly once per stream.
#[tokio::test]
async fn composite_id_resumes_every_stream_exactly_once_across_a_stepdown() {
    let mongo = tokio::task::spawn_blocking(MongoD::start).await.unwrap();
    let m = Multi::start_on(&mongo, "multi_stepdown", |_, _| {}).await;
    let names = ["a", "b", "c"];
    let path = m.path(&names, "");
    let colls = {
        let db = mongo.client().await.database(&m.db);
        names.map(|n| db.collection::<Document>(n))
    };
    let round = async |seq: i64| {
        for coll in &colls {
            coll.insert_one(doc! { "seq": seq }).await.unwrap();
        }
    };
    let mut seen = BTreeMap::new();
    let mut client = m.connect(Kind::Sse, &path, None).await;
    for seq in 0..3 {
        round(seq).await;
    }
    for (stream, seqs) in by_stream(Kind::Sse, &mut client, 9).await {
        seen.insert(stream, seqs);
    }
    // Live across the stepdown.
    step_down_and_back(&mongo).await;
    for seq in 3..6 {
        round(seq).await;
    }
    drain(Kind::Sse, &mut client, &mut seen, Duration::from_secs(3)).await;
    let last = client.last_id.clone().expect("a composite id");
    drop(client);
    // Away across a second one; the workers retire meanwhile (300 ms linger).
    for seq in 6..9 {
        round(seq).await;
    }
    step_down_and_back(&mongo).await;
    for seq in 9..12 {
        round(seq).await;
    }
    let mut client = m.connect(Kind::Sse, &path, Some(&last)).await;
    round(12).await;
    drain_until_every_stream_has(&mut client, &mut seen, &m.db, &names, 13).await;
    assert_exactly_once(&m.db, &names, &seen, 13);
    m.server.stop().await;
    drop(mongo);
}

/// WebSocket `subscribe`/`unsubscribe` mid-connection with composite ids: a stream
/// unsubscribed and subscribed again with an id from before gets exactly what it missed; a
/// stream the id does not hold starts from now; on a new connection, streams subscribed one
/// by one, in another order, with the last id each resume exactly.
#[tokio::test]
async fn websocket_subscribe_with_a_composite_id_resumes_exactly_once() {
    let m = Multi::start("multi_ws_resume", |_, _| {}).await;
    let (a, b, c) = (m.coll("a").await, m.coll("b").await, m.coll("c").await);
    let op = |op: &str, name: &str, id: Option<&str>| {
        json!({"op": op, "stream": m.stream(name), "lastEventId": id}).to_string()
    };
    let answer = async |client: &mut Client, expected: &str| {
        let answer = client.expect_event(WAIT).await;
        assert_eq!(answer.event, expected, "{answer:?}");
    };
    let mut client = m.connect(Kind::Ws, &m.path(&["a"], ""), None).await;
    insert_seqs(&a, 0..1).await;
    assert_eq!(
        by_stream(Kind::Ws, &mut client, 1).await[&m.stream("a")],
        vec![0]
    );
    client.send_text(&op("subscribe", "b", None)).await;
    answer(&mut client, "subscribed").await;
    insert_seqs(&a, 1..2).await;
    insert_seqs(&b, 0..1).await;
    by_stream(Kind::Ws, &mut client, 2).await;
    let before = client.last_id.clone().expect("a composite id");

    client.send_text(&op("unsubscribe", "a", None)).await;
    answer(&mut client, "unsubscribed").await;
    insert_seqs(&a, 2..4).await;
    insert_seqs(&b, 1..2).await;
    assert_eq!(
        by_stream(Kind::Ws, &mut client, 1).await[&m.stream("b")],
        vec![1]
    );
    client.send_text(&op("subscribe", "a", Some(&before))).await;
    answer(&mut client, "subscribed").await;
    insert_seqs(&a, 4..5).await;
    assert_eq!(
        by_stream(Kind::Ws, &mut client, 3).await[&m.stream("a")],
        vec![2, 3, 4],
        "exactly what it missed, then on"
    );
    // `before` holds no entry for c: c starts from now.
    insert_seqs(&c, 100..101).await;
    client.send_text(&op("subscribe", "c", Some(&before))).await;
    answer(&mut client, "subscribed").await;
    insert_seqs(&c, 0..1).await;
    assert_eq!(
        by_stream(Kind::Ws, &mut client, 1).await[&m.stream("c")],
        vec![0]
    );
    let last = client.last_id.clone().expect("a composite id");
    drop(client);

    insert_seqs(&a, 5..6).await;
    insert_seqs(&b, 2..3).await;
    insert_seqs(&c, 1..2).await;
    let mut client = m.connect(Kind::Ws, "/_streams", None).await;
    for name in ["c", "a", "b"] {
        client.send_text(&op("subscribe", name, Some(&last))).await;
    }
    // Three answers; a stream's missed change may come before the next stream's answer.
    let mut got: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut answers = 0;
    while answers < 3 {
        let event = client.expect_event(WAIT).await;
        match event.event.as_str() {
            "subscribed" => answers += 1,
            "change" => {
                let (stream, seq) = stream_seq(Kind::Ws, &event);
                got.entry(stream).or_default().push(seq);
            }
            _ => panic!("unexpected {event:?}"),
        }
    }
    insert_seqs(&a, 6..7).await;
    insert_seqs(&b, 3..4).await;
    insert_seqs(&c, 2..3).await;
    let changes = 6 - got.values().map(Vec::len).sum::<usize>();
    for (stream, seqs) in by_stream(Kind::Ws, &mut client, changes).await {
        got.entry(stream).or_default().extend(seqs);
    }
    assert_eq!(got[&m.stream("a")], vec![5, 6]);
    assert_eq!(got[&m.stream("b")], vec![2, 3]);
    assert_eq!(got[&m.stream("c")], vec![1, 2]);
    client.expect_quiet(Duration::from_millis(500)).await;
    m.server.stop().await;
}
