//! Faults: mongod killed and restarted, slow consumers, dropped collections, lost history.

use std::time::Duration;

use mongodb::bson::{Document, doc};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::clients::{Client, Envelope, Kind, Next};
use crate::harness::mongod::MongoD;
use crate::harness::server::{self, TestServer};
use crate::harness::{mongod, unique_db};

const WAIT: Duration = Duration::from_secs(20);

fn seqs(events: &[Envelope]) -> Vec<i64> {
    events
        .iter()
        .map(|e| e.data["fullDocument"]["seq"].as_i64().expect("seq"))
        .collect()
}

#[tokio::test]
async fn mongod_killed_and_restarted_is_invisible_to_clients() {
    let mongo = tokio::task::spawn_blocking(MongoD::start).await.unwrap();
    let db = unique_db("kill");
    let mut config = server::config(&mongo);
    config
        .streams
        .push(server::stream(&db, "c", "s", json!([])));
    let server = TestServer::start(config).await;
    let path = format!("/{db}/c/_streams/s");
    let mut sse = Client::connect(Kind::Sse, &server.url(""), &path, None)
        .await
        .unwrap();
    let mut ws = Client::connect(Kind::Ws, &server.url(""), &path, None)
        .await
        .unwrap();

    {
        let coll = mongo
            .client()
            .await
            .database(&db)
            .collection::<Document>("c");
        for seq in 0..5 {
            coll.insert_one(doc! { "seq": seq }).await.unwrap();
        }
    }
    assert_eq!(
        seqs(&sse.changes(5, WAIT).await),
        (0..5).collect::<Vec<_>>()
    );
    assert_eq!(seqs(&ws.changes(5, WAIT).await), (0..5).collect::<Vec<_>>());

    let mongo = tokio::task::spawn_blocking(move || {
        mongo.kill();
        // Longer than the server-selection timeout (5 s): the driver's own one-shot resume
        // gives up, so Streamgate's reconnect loop has to do the work.
        std::thread::sleep(Duration::from_secs(6));
        mongo.restart();
        mongo
    })
    .await
    .unwrap();

    let coll = mongo
        .client()
        .await
        .database(&db)
        .collection::<Document>("c");
    for seq in 5..10 {
        coll.insert_one(doc! { "seq": seq }).await.unwrap();
    }
    assert_eq!(
        seqs(&sse.changes(5, WAIT).await),
        (5..10).collect::<Vec<_>>()
    );
    assert_eq!(
        seqs(&ws.changes(5, WAIT).await),
        (5..10).collect::<Vec<_>>()
    );
    // Nothing more (no duplicate replayed after the resume).
    assert!(matches!(
        sse.next(Duration::from_millis(700)).await,
        Next::Timeout
    ));
    assert!(
        server.metrics.worker_retries.get() >= 1,
        "the worker did reconnect"
    );
    server.stop().await;
}

/// An SSE client that connects and then does not read: its socket buffers fill up.
async fn stalled_sse(addr: std::net::SocketAddr, path: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    // HTTP/1.0: the body is close-delimited, so the raw bytes are the SSE text.
    let request = format!("GET {path} HTTP/1.0\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

fn parse_sse(raw: &str) -> Vec<(Option<String>, String, serde_json::Value)> {
    let body = raw.split_once("\r\n\r\n").expect("headers").1;
    body.split("\n\n")
        .filter_map(|frame| {
            let mut id = None;
            let mut event = None;
            let mut data = None;
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("event: ") {
                    event = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(v).ok();
                }
            }
            Some((id, event?, data?))
        })
        .collect()
}

#[tokio::test]
async fn stalled_client_is_cut_while_fast_client_gets_everything() {
    let mongo = mongod::shared();
    let db = unique_db("slow");
    let mut config = server::config(mongo);
    config.client_queue = 64;
    config
        .streams
        .push(server::stream(&db, "c", "s", json!([])));
    let server = TestServer::start(config).await;
    let path = format!("/{db}/c/_streams/s");
    let mut fast = Client::connect(Kind::Sse, &server.url(""), &path, None)
        .await
        .unwrap();
    let mut stalled = stalled_sse(server.addr, &path).await;
    // Let the stalled client attach before inserting.
    tokio::time::sleep(Duration::from_millis(300)).await;

    const N: i64 = 1000;
    let coll = mongo
        .client()
        .await
        .database(&db)
        .collection::<Document>("c");
    let padding = "x".repeat(16 * 1024);
    let docs: Vec<Document> = (0..N)
        .map(|seq| doc! { "seq": seq, "pad": &padding })
        .collect();
    let reader = tokio::spawn(async move {
        let events = fast.changes(N as usize, WAIT).await;
        (fast, events)
    });
    // Paced so a reading client never lags 64 events; the stalled one lags without bound.
    for chunk in docs.chunks(8) {
        coll.insert_many(chunk.to_vec()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (_fast, events) = reader.await.unwrap();
    assert_eq!(
        seqs(&events),
        (0..N).collect::<Vec<_>>(),
        "fast client got everything in order"
    );

    // Now read what the stalled client was sent: a gap-free prefix, then slow_consumer, then EOF.
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stalled.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let frames = parse_sse(&String::from_utf8_lossy(&raw));
    let (last, changes) = frames.split_last().expect("frames");
    assert_eq!(last.1, "error");
    assert_eq!(last.2["code"], "slow_consumer");
    let got: Vec<i64> = changes
        .iter()
        .map(|f| f.2["fullDocument"]["seq"].as_i64().unwrap())
        .collect();
    assert!(
        (got.len() as i64) < N,
        "the stalled client was cut before the end"
    );
    assert_eq!(got, (0..got.len() as i64).collect::<Vec<_>>());
    assert!(server.metrics.slow_consumers.get() >= 1);

    // It resumes from its last id and gets the rest.
    let last_id = changes
        .last()
        .and_then(|f| f.0.clone())
        .expect("stalled client got some events first");
    let mut resumed = Client::connect(Kind::Sse, &server.url(""), &path, Some(&last_id))
        .await
        .unwrap();
    let rest = resumed.changes((N as usize) - got.len(), WAIT).await;
    assert_eq!(seqs(&rest), (got.len() as i64..N).collect::<Vec<_>>());
    server.stop().await;
}

#[tokio::test]
async fn burst_larger_than_live_buffer_reaches_every_client() {
    let mongo = mongod::shared();
    let db = unique_db("burst");
    let mut config = server::config(mongo);
    config
        .streams
        .push(server::stream(&db, "c", "s", json!([])));
    let server = TestServer::start(config).await;
    let path = format!("/{db}/c/_streams/s");
    let mut clients = Vec::new();
    for kind in [Kind::Sse, Kind::Ws, Kind::Ndjson] {
        clients.push(
            Client::connect(kind, &server.url(""), &path, None)
                .await
                .unwrap(),
        );
    }
    // One insert_many: the worker publishes 3,000 events as fast as MongoDB returns them,
    // far more than the 256 live slots; clients catch up from the ring instead of being cut.
    const N: i64 = 3000;
    let coll = mongo
        .client()
        .await
        .database(&db)
        .collection::<Document>("c");
    coll.insert_many((0..N).map(|seq| doc! { "seq": seq }))
        .await
        .unwrap();
    for client in &mut clients {
        assert_eq!(
            seqs(&client.changes(N as usize, WAIT).await),
            (0..N).collect::<Vec<_>>()
        );
    }
    assert_eq!(server.metrics.slow_consumers.get(), 0);
    server.stop().await;
}

#[tokio::test]
async fn dropped_collection_invalidates_and_closes() {
    let mongo = mongod::shared();
    let db = unique_db("drop");
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
    coll.insert_one(doc! { "seq": 0 }).await.unwrap();
    let mut sse = Client::connect(Kind::Sse, &server.url(""), &path, None)
        .await
        .unwrap();
    let mut ws = Client::connect(Kind::Ws, &server.url(""), &path, None)
        .await
        .unwrap();
    coll.drop().await.unwrap();
    for client in [&mut sse, &mut ws] {
        let drop_event = client.expect_event(WAIT).await;
        assert_eq!(drop_event.event, "change");
        assert_eq!(drop_event.data["operationType"], "drop");
        let invalidate = client.expect_event(WAIT).await;
        assert_eq!(invalidate.event, "invalidate");
        assert!(invalidate.id.is_some());
    }
    assert!(matches!(sse.next(WAIT).await, Next::End(None)));
    assert!(matches!(ws.next(WAIT).await, Next::End(Some(1000))));
    server.stop().await;
}

#[tokio::test]
async fn history_lost_sends_error_then_empty_id_and_closes() {
    let mongo = mongod::shared();
    let db = unique_db("lost");
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
    let mut client = Client::connect(Kind::Sse, &server.url(""), &path, None)
        .await
        .unwrap();
    coll.insert_one(doc! { "seq": 0 }).await.unwrap();
    let real = client.changes(1, WAIT).await[0].id.clone().unwrap();
    // Same token, cluster time moved back to 1970: long gone from the oplog.
    let ancient = format!("82{}{}", "0000000100000001", &real[18..]);

    for kind in [Kind::Sse, Kind::Ws] {
        let (header, query) = match kind {
            Kind::Sse => (Some(ancient.as_str()), String::new()),
            _ => (None, format!("?lastEventId={ancient}")),
        };
        let mut lost = Client::connect(kind, &server.url(""), &format!("{path}{query}"), header)
            .await
            .unwrap();
        let error = lost.expect_event(WAIT).await;
        assert_eq!(error.event, "error");
        assert_eq!(error.data["code"], "history_lost");
        if kind == Kind::Sse {
            assert_eq!(
                error.id.as_deref(),
                Some(""),
                "SSE resets the browser's last id"
            );
        }
        let end = lost.next(WAIT).await;
        match kind {
            Kind::Ws => assert!(matches!(end, Next::End(Some(4010))), "{end:?}"),
            _ => assert!(matches!(end, Next::End(None)), "{end:?}"),
        }
    }
    server.stop().await;
}
