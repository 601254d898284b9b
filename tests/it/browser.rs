//! A real browser: Chromium's `EventSource` receives changes and, when Streamgate restarts,
//! reconnects by itself with `Last-Event-ID` and misses nothing.
//!
//! Needs Debian's `chromium`, `node` and `tests/browser/node_modules` (playwright-core), so it is
//! `#[ignore]`d for a plain `cargo test` (which lists it as ignored, never as passed).
//! `scripts/test` installs them and runs it explicitly (`cargo test --test it browser --
//! --ignored`); once it runs, a missing browser or node is a failure.

use std::time::Duration;

use mongodb::bson::{Document, doc};
use serde_json::json;

use crate::harness::browser::BrowserScript;
use crate::harness::server::{self, TestServer};
use crate::harness::{mongod, unique_db};

#[tokio::test]
#[ignore = "needs Chromium, node and tests/browser/node_modules: scripts/test installs them and runs it"]
async fn browser_eventsource_resumes_across_streamgate_restart() {
    let mongo = mongod::shared();
    let db = unique_db("browser");
    let mut config = server::config(mongo);
    config.sse_retry_ms = 500;
    config
        .streams
        .push(server::stream(&db, "c", "s", json!([])));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let first = TestServer::start_on(config.clone(), listener).await;

    let mut browser = BrowserScript::start(
        "eventsource.mjs",
        &[&format!("http://{addr}"), &format!("/{db}/c/_streams/s")],
        Duration::from_secs(90),
    );
    assert_eq!(browser.next().await["type"], "open");

    let coll = mongo
        .client()
        .await
        .database(&db)
        .collection::<Document>("c");
    for seq in 0..5 {
        coll.insert_one(doc! { "seq": seq }).await.unwrap();
    }
    let mut seqs = Vec::new();
    while seqs.len() < 5 {
        let event = browser.next().await;
        assert_eq!(event["type"], "change", "{event}");
        seqs.push(event["seq"].as_i64().unwrap());
    }

    first.stop().await;
    for seq in 5..10 {
        coll.insert_one(doc! { "seq": seq }).await.unwrap();
    }
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let second = TestServer::start_on(config, listener).await;
    // The browser reconnects on its own (retry: 500) with Last-Event-ID.
    let mut reopened = false;
    while seqs.len() < 10 {
        let event = browser.next().await;
        match event["type"].as_str() {
            Some("open") => reopened = true,
            Some("change") => seqs.push(event["seq"].as_i64().unwrap()),
            _ => panic!("unexpected {event}"),
        }
    }
    assert!(reopened);
    for seq in 10..12 {
        coll.insert_one(doc! { "seq": seq }).await.unwrap();
    }
    while seqs.len() < 12 {
        let event = browser.next().await;
        assert_eq!(event["type"], "change", "{event}");
        seqs.push(event["seq"].as_i64().unwrap());
    }
    assert_eq!(seqs, (0..12).collect::<Vec<_>>());
    browser.stop().await;
    second.stop().await;
}

/// One EventSource over three streams (`/_streams`): every event names its stream, and when
/// Streamgate restarts the browser's own reconnect (`Last-Event-ID` = the composite position)
/// resumes all three exactly.
#[tokio::test]
#[ignore = "needs Chromium, node and tests/browser/node_modules: scripts/test installs them and runs it"]
async fn browser_one_eventsource_three_streams() {
    let mongo = mongod::shared();
    let db = unique_db("browser_multi");
    let mut config = server::config(mongo);
    config.sse_retry_ms = 500;
    let names = ["a", "b", "c"];
    for name in names {
        config
            .streams
            .push(server::stream(&db, name, name, json!([])));
    }
    let paths: Vec<String> = names
        .iter()
        .map(|n| format!("/{db}/{n}/_streams/{n}"))
        .collect();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let first = TestServer::start_on(config.clone(), listener).await;

    let mut browser = BrowserScript::start(
        "eventsource.mjs",
        &[
            &format!("http://{addr}"),
            &format!("/_streams?streams={}", paths.join(",")),
        ],
        Duration::from_secs(90),
    );
    assert_eq!(browser.next().await["type"], "open");
    let client = mongo.client().await;
    let insert = async |range: std::ops::Range<i64>| {
        for seq in range {
            for name in names {
                client
                    .database(&db)
                    .collection::<Document>(name)
                    .insert_one(doc! { "seq": seq })
                    .await
                    .unwrap();
            }
        }
    };
    let mut got: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    let mut collect = async |got: &mut std::collections::BTreeMap<String, Vec<i64>>, n: usize| {
        let mut reopened = false;
        let mut seen = 0;
        while seen < n {
            let event = browser.next().await;
            match event["type"].as_str() {
                Some("open") => reopened = true,
                Some("change") => {
                    let stream = event["stream"].as_str().expect("names its stream");
                    got.entry(stream.to_owned())
                        .or_default()
                        .push(event["seq"].as_i64().unwrap());
                    seen += 1;
                }
                _ => panic!("unexpected {event}"),
            }
        }
        reopened
    };
    insert(0..3).await;
    collect(&mut got, 9).await;

    first.stop().await;
    insert(3..6).await;
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let second = TestServer::start_on(config, listener).await;
    assert!(
        collect(&mut got, 9).await,
        "the browser reconnected by itself"
    );
    insert(6..7).await;
    collect(&mut got, 3).await;
    for path in &paths {
        assert_eq!(got[path], (0..7).collect::<Vec<_>>(), "{path}");
    }
    browser.stop().await;
    second.stop().await;
}
