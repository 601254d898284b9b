//! The document view (`.json`, `?format=firebase`, PROTOCOL.md §7) against a Firebase-style
//! client that applies `put`/`patch` to a JSON tree.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mongodb::bson::{Bson, doc};
use serde_json::{Map, Value};

use crate::harness::browser::BrowserScript;
use crate::harness::clients::{Client, Envelope, Kind, Next};
use crate::harness::fixture::Fixture;
use crate::snapshot::{random_writes, seed, shaping_pipeline};

const WAIT: Duration = Duration::from_secs(30);

/// A Firebase REST-streaming client's tree (also used by `membership.rs`).
#[derive(Default)]
pub(crate) struct Tree {
    root: Value,
    last_id: Option<String>,
}

impl Tree {
    /// Applies `put`/`patch`; `true` when the `end` marker arrived.
    pub(crate) fn apply(&mut self, event: &Envelope) -> bool {
        if event.event == "keep-alive" {
            return false;
        }
        if let Some(id) = &event.id {
            self.last_id = Some(id.clone());
        }
        let path = event.data["path"].as_str().expect("path");
        let data = &event.data["data"];
        match event.event.as_str() {
            "put" => set(&mut self.root, &segments(path), data.clone()),
            "patch" => {
                for (child, value) in data.as_object().expect("patch data is an object") {
                    let mut at = segments(path);
                    at.extend(segments(child));
                    set(&mut self.root, &at, value.clone());
                }
            }
            other => panic!("unexpected event {other}: {event:?}"),
        }
        path == "/end"
    }

    pub(crate) fn documents(&self) -> BTreeMap<String, Value> {
        match &self.root {
            Value::Object(map) => map
                .iter()
                .filter(|(k, _)| *k != "end")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            _ => BTreeMap::new(),
        }
    }
}

fn segments(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Firebase semantics: `null` deletes; missing parents are created; arrays are indexed.
fn set(node: &mut Value, path: &[String], value: Value) {
    let Some((first, rest)) = path.split_first() else {
        *node = value;
        return;
    };
    if let Value::Array(items) = node
        && let Ok(index) = first.parse::<usize>()
    {
        if rest.is_empty() && value.is_null() && index + 1 == items.len() {
            items.pop();
            return;
        }
        while items.len() <= index {
            items.push(Value::Null);
        }
        return set(&mut items[index], rest, value);
    }
    if !node.is_object() {
        if value.is_null() {
            return;
        }
        *node = Value::Object(Map::new());
    }
    let Value::Object(map) = node else {
        unreachable!()
    };
    if rest.is_empty() {
        if value.is_null() {
            map.remove(first);
        } else {
            map.insert(first.clone(), value);
        }
        return;
    }
    let child = map.entry(first.clone()).or_insert(Value::Null);
    set(child, rest, value);
    if child.is_null() || child.as_object().is_some_and(Map::is_empty) {
        map.remove(first);
    }
}

/// The collection as the shaping pipeline shows it, keyed like the view (`_id` as text).
async fn expected(f: &Fixture) -> BTreeMap<String, Value> {
    crate::snapshot::expected(&f.coll)
        .await
        .into_iter()
        .map(|(k, v)| (k.trim_matches('"').to_owned(), v))
        .collect()
}

async fn apply_until_end(client: &mut Client, tree: &mut Tree) {
    let deadline = Instant::now() + WAIT;
    loop {
        match client
            .next(deadline.saturating_duration_since(Instant::now()))
            .await
        {
            Next::Event(event) => {
                if tree.apply(&event) {
                    return;
                }
            }
            other => panic!("before the end marker: {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_document_view_equals_the_collection_under_a_concurrent_writer_and_resumes() {
    let f = Fixture::start("docview_writer", |config| {
        config.streams[0].definition.pipeline = shaping_pipeline();
    })
    .await;
    seed(&f.coll, 300).await;
    let mut warm = f.connect(Kind::Sse).await;
    drop(warm.next(Duration::from_millis(10)).await);
    let writer = tokio::spawn(random_writes(f.coll.clone(), 5, 1500, 300));
    let mut clients = Vec::new();
    for path in [
        format!("{}.json", f.path),
        format!("{}?format=firebase", f.path),
        format!("{}.json?snapshot=true", f.path),
    ] {
        let mut client = Client::connect(Kind::Sse, &f.server.url(""), &path, None)
            .await
            .unwrap();
        let first = client.expect_event(WAIT).await;
        assert_eq!(first.event, "put", "{first:?}");
        assert_eq!(first.data["path"], "/");
        assert!(first.id.as_deref().is_some_and(|id| !id.is_empty()));
        let mut tree = Tree::default();
        tree.apply(&first);
        clients.push((client, tree));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // One client drops mid-stream and resumes with its last id (as EventSource would).
    let (mut dropped, mut tree) = clients.pop().unwrap();
    for _ in 0..20 {
        let event = dropped.expect_event(WAIT).await;
        tree.apply(&event);
    }
    drop(dropped);
    let resumed = Client::connect(
        Kind::Sse,
        &f.server.url(""),
        &format!("{}.json", f.path),
        tree.last_id.as_deref(),
    )
    .await
    .unwrap();
    clients.push((resumed, tree));
    writer.await.unwrap();
    f.coll.insert_one(doc! {"_id": "end"}).await.unwrap();
    let want = expected(&f).await;
    for (client, tree) in &mut clients {
        apply_until_end(client, tree).await;
        assert_eq!(tree.documents(), want, "view != collection");
    }
}

#[tokio::test]
async fn the_view_refuses_too_many_documents_and_other_transports() {
    let f = Fixture::start("docview_limits", |config| config.snapshot_max_docs = 5).await;
    let docs: Vec<_> = (0..6).map(|i| doc! {"_id": i, "a": {"b": 1}}).collect();
    f.coll.insert_many(docs).await.unwrap();
    let path = format!("{}.json", f.path);
    let refused = Client::connect(Kind::Sse, &f.server.url(""), &path, None)
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, 413, "{refused:?}");
    assert!(refused.content_type.contains("problem+json"));
    assert!(
        refused.body.contains("snapshot_max_docs"),
        "{}",
        refused.body
    );
    // At the limit it is served; keep-alive is an event.
    f.coll.delete_one(doc! {"_id": 5}).await.unwrap();
    let mut client = Client::connect(Kind::Sse, &f.server.url(""), &path, None)
        .await
        .unwrap();
    let put = client.expect_event(WAIT).await;
    assert_eq!(put.data["data"].as_object().map(Map::len), Some(5));
    assert_eq!(put.data["data"]["3"]["_id"], 3);
    let refused = Client::connect(Kind::Ndjson, &f.server.url(""), &path, None)
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, 406);
    let bad = format!("{}?format=xml", f.path);
    let refused = Client::connect(Kind::Sse, &f.server.url(""), &bad, None)
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, 400);
    // The stream name without the suffix is still the plain stream.
    let mut plain = f.connect(Kind::Sse).await;
    f.coll
        .update_one(doc! {"_id": 1}, doc! {"$set": {"a.b": Bson::Int32(2)}})
        .await
        .unwrap();
    assert_eq!(plain.expect_event(WAIT).await.event, "change");
    let patch = client.expect_event(WAIT).await;
    assert_eq!(patch.event, "patch");
    assert_eq!(patch.data["path"], "/1");
    assert_eq!(patch.data["data"]["a/b"], 2);
}

#[tokio::test]
async fn keep_alive_is_an_event_in_the_view() {
    let f = Fixture::start("docview_keepalive", |config| config.keepalive_secs = 1).await;
    let path = format!("{}.json", f.path);
    let mut client = Client::connect(Kind::Sse, &f.server.url(""), &path, None)
        .await
        .unwrap();
    assert_eq!(client.expect_event(WAIT).await.event, "put");
    let keepalive = client.expect_event(Duration::from_secs(5)).await;
    assert_eq!(keepalive.event, "keep-alive");
    assert_eq!(keepalive.data, Value::Null);
}

#[tokio::test]
#[ignore = "needs Chromium, node and tests/browser/node_modules: scripts/test installs them and runs it"]
async fn browser_eventsource_renders_the_initial_put_and_a_later_patch() {
    let f = Fixture::start("browser_docview", |_| {}).await;
    f.coll
        .insert_many(vec![
            doc! {"_id": "a", "name": "Ada", "score": 1},
            doc! {"_id": "b", "name": "Bob", "score": 2},
        ])
        .await
        .unwrap();
    let mut browser = BrowserScript::start("docview.mjs", &[&f.server.url(""), &f.path], WAIT);
    let put = browser.next().await;
    assert_eq!(put["type"], "put", "{put}");
    assert_eq!(
        put["rows"],
        serde_json::json!([["a", "Ada", "1"], ["b", "Bob", "2"]])
    );
    f.coll
        .update_one(doc! {"_id": "b"}, doc! {"$set": {"score": 300}})
        .await
        .unwrap();
    let patch = browser.next().await;
    assert_eq!(patch["type"], "patch", "{patch}");
    assert_eq!(
        patch["rows"],
        serde_json::json!([["a", "Ada", "1"], ["b", "Bob", "300"]])
    );
    browser.stop().await;
}
