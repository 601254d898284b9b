//! The document view (`.json`, `?format=firebase`, PROTOCOL.md §7) against a Firebase-style
//! client that applies `put`/`patch` to a JSON tree.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mongodb::bson::{Bson, doc};
use serde_json::{Map, Value};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::browser::BrowserScript;
use crate::harness::clients::{Client, Envelope, Kind, Next};
use crate::harness::fixture::Fixture;
use crate::harness::server;
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

/// The view read as raw bytes, the way the Firebase SDKs' own SSE parsers read it (firebase-admin's
/// `_sseclient.py`, Pyrebase's `pyre_sseclient.py`): blocks split at a blank line.
struct RawView {
    socket: TcpStream,
    buffer: Vec<u8>,
}

impl RawView {
    /// `GET {target}` with what firebase-admin sends an emulator (`?ns=`, `Bearer owner`);
    /// returns the response head and the stream positioned after it.
    async fn open(addr: std::net::SocketAddr, target: &str) -> (String, RawView) {
        let mut socket = TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\
             Cache-Control: no-cache\r\nAuthorization: Bearer owner\r\nConnection: close\r\n\r\n"
        );
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut view = RawView {
            socket,
            buffer: Vec::new(),
        };
        let head = loop {
            if let Some(end) = view.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8(view.buffer[..end].to_vec()).unwrap();
                view.buffer.drain(..end + 4);
                break head;
            }
            assert!(
                view.fill().await,
                "connection closed before the response head"
            );
        };
        (head, view)
    }

    /// Reads more bytes; `false` at the end of the stream.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(WAIT, self.socket.read(&mut chunk))
            .await
            .expect("the view went quiet")
            .unwrap();
        self.buffer.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// The next block (without its blank line), `None` at the end of the stream. A block the
    /// stream ends in the middle of is returned too, so the checks see it.
    async fn block(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block = String::from_utf8(self.buffer[..end].to_vec()).unwrap();
                self.buffer.drain(..end + 2);
                return Some(block);
            }
            if !self.fill().await {
                let rest = String::from_utf8(std::mem::take(&mut self.buffer)).unwrap();
                return (!rest.is_empty()).then_some(rest);
            }
        }
    }
}

/// A block as Firebase frames it: `(event name, data)`, or the reason it is not one. Firebase
/// sends only these events, each with JSON `data`, and no comment lines; the SDKs
/// `json.loads` every block's data, so anything else kills their listener thread.
fn firebase_block(block: &str) -> Result<(String, Value), String> {
    let (mut event, mut data) = (None, None);
    for line in block.split('\n') {
        let (field, value) = line.split_once(": ").unwrap_or((line, ""));
        match field {
            "event" => event = Some(value.to_owned()),
            "data" => data = Some(value.to_owned()),
            "id" | "retry" => {}
            _ => return Err(format!("line {line:?} is not a Firebase field")),
        }
    }
    let event = event.ok_or("a block without `event:`")?;
    if !["put", "patch", "keep-alive", "cancel", "auth_revoked"].contains(&event.as_str()) {
        return Err(format!("`{event}` is not a Firebase event"));
    }
    let data = data.ok_or("a block without `data:`")?;
    let data = serde_json::from_str(&data).map_err(|e| format!("data is not JSON: {e}"))?;
    Ok((event, data))
}

/// The next block, checked to be Firebase's.
async fn firebase_event(view: &mut RawView) -> Option<(String, Value, String)> {
    let block = view.block().await?;
    match firebase_block(&block) {
        Ok((event, data)) => Some((event, data, block)),
        Err(why) => panic!("{why}: {block:?}"),
    }
}

#[tokio::test]
async fn the_view_speaks_only_firebase_events_and_takes_the_emulators_query_and_credential() {
    let f = Fixture::start("docview_framing", |config| config.keepalive_secs = 1).await;
    f.coll
        .insert_one(doc! {"_id": "a", "name": "Zoë", "n": 1})
        .await
        .unwrap();
    // What firebase-admin 7.7.0 asks of `databaseURL = "http://host/?ns=demo"`.
    let target = format!("{}.json?ns=demo", f.path);
    let (head, mut view) = RawView::open(f.server.addr, &target).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Without a charset, Python's requests decodes text/* as ISO-8859-1 ("ZoÃ«").
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/event-stream; charset=utf-8"),
        "{head}"
    );
    let (event, data, block) = firebase_event(&mut view).await.expect("the first put");
    assert_eq!(event, "put", "{block}");
    assert_eq!(data["path"], "/");
    assert_eq!(data["data"]["a"]["name"], "Zoë");
    // The reconnect hint and the position ride on the first event, not blocks of their own.
    assert!(block.starts_with("retry: "), "{block}");
    assert!(block.contains("\nid: "), "{block}");
    f.coll
        .update_one(doc! {"_id": "a"}, doc! {"$set": {"n": 2}})
        .await
        .unwrap();
    let (event, data, _) = firebase_event(&mut view).await.expect("the patch");
    assert_eq!(
        (event.as_str(), &data["data"]),
        ("patch", &serde_json::json!({"n": 2}))
    );
    let (event, data, _) = firebase_event(&mut view).await.expect("a keep-alive");
    assert_eq!((event.as_str(), data), ("keep-alive", Value::Null));
    // A dropped collection (`invalidate`, which Firebase has no name for) ends it with `cancel`.
    f.coll.drop().await.unwrap();
    let mut last = None;
    while let Some((event, data, _)) = firebase_event(&mut view).await {
        if event != "keep-alive" {
            last = Some((event, data));
        }
    }
    let (event, data) = last.expect("a last event");
    assert_eq!(event, "cancel");
    assert_eq!(data["code"], "invalidate");
}

#[tokio::test]
async fn the_view_closes_on_shutdown_without_a_block_of_its_own() {
    let f = Fixture::start("docview_goodbye", |_| {}).await;
    f.coll.insert_one(doc! {"_id": 1}).await.unwrap();
    let (head, mut view) = RawView::open(f.server.addr, &format!("{}.json", f.path)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(firebase_event(&mut view).await.unwrap().0, "put");
    f.server.stop().await;
    // Everything up to the close is Firebase's (a keep-alive at most), then the end.
    while let Some((event, _, block)) = firebase_event(&mut view).await {
        assert_eq!(event, "keep-alive", "{block}");
    }
}

#[tokio::test]
async fn the_emulator_credential_gets_a_401_naming_it_when_auth_is_on() {
    let f = Fixture::start("docview_owner", |config| {
        config.auth = server::hs256_subscribers_of_c(
            &config.streams[0].db,
            "docview-emulator-credential-secret-0123456789",
        );
    })
    .await;
    let (head, mut view) = RawView::open(f.server.addr, &format!("{}.json?ns=demo", f.path)).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let mut body = String::new();
    while let Some(block) = view.block().await {
        body.push_str(&block);
    }
    assert!(body.contains("Firebase emulator"), "{body}");
}
