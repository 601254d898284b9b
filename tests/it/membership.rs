//! Membership (PROTOCOL.md §10): documents move into and out of filtered streams, and every
//! client's state stays equal to the documents its filter selects, whatever kind of filter
//! (pipeline `$match` on `fullDocument`, `match` with `$claim`, routable `$var`, both), on every
//! transport and in the document view.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};
use mongodb::options::ReplaceOptions;
use serde_json::{Value, json};

use crate::docview::Tree;
use crate::harness::clients::{Client, Envelope, Kind, Next};
use crate::harness::server::{self, TestServer};
use crate::harness::{mongod, unique_db};
use streamgate::streams::StreamKey;
use streamgate::streams::definition::FullDocument;

const SECRET: &str = "membership-secret-0123456789-0123456789";
const WAIT: Duration = Duration::from_secs(30);

fn token(tenant: Value) -> String {
    let claims = json!({ "sub": "someone", "roles": ["r"], "tenant": tenant, "exp": server::expires_in(600) });
    server::hs256(SECRET, &claims)
}

/// What a client has built from its events: documents by `_id` text.
enum State {
    /// Change events folded as the JS client's `applyChange` does (entries and removals too).
    Changes(BTreeMap<String, Value>),
    /// The document view's `put`/`patch`, applied to a Firebase tree.
    View(Tree),
}

struct Subscriber {
    label: &'static str,
    client: Client,
    state: State,
    /// The query selecting what it should hold at the end.
    filter: Document,
    /// Entries and removals seen (a change stream client; the view shows them as `put`s).
    moves: usize,
}

impl Subscriber {
    fn documents(&self) -> BTreeMap<String, Value> {
        match &self.state {
            State::Changes(docs) => docs.clone(),
            State::View(tree) => tree.documents(),
        }
    }

    fn apply(&mut self, event: &Envelope) {
        match &mut self.state {
            State::View(tree) => {
                tree.apply(event);
            }
            State::Changes(docs) => {
                assert_eq!(event.event, "change", "{}: {event:?}", self.label);
                let data = &event.data;
                assert!(
                    data.get("fullDocumentBeforeChange").is_none(),
                    "{}: pre-images read for membership only are not sent: {data}",
                    self.label
                );
                let key = data["documentKey"]["_id"].to_string();
                let full = data.get("fullDocument").filter(|d| d.is_object()).cloned();
                match data
                    .pointer("/streamgate/membership")
                    .and_then(Value::as_str)
                {
                    Some("left") => {
                        self.moves += 1;
                        docs.remove(&key);
                        return;
                    }
                    Some("entered") => {
                        self.moves += 1;
                        let full = full.unwrap_or_else(|| {
                            panic!("{}: an entry carries its document: {data}", self.label)
                        });
                        docs.insert(key, full);
                        return;
                    }
                    Some(other) => panic!("{}: unknown membership {other}", self.label),
                    None => {}
                }
                match data["operationType"].as_str() {
                    Some("insert" | "replace" | "update") => {
                        if let Some(full) = full {
                            docs.insert(key, full);
                        }
                    }
                    Some("delete") => {
                        docs.remove(&key);
                    }
                    other => panic!("{}: unexpected {other:?}: {data}", self.label),
                }
            }
        }
    }
}

/// The documents `filter` selects, keyed and shaped like the clients' states.
async fn selected(
    coll: &mongodb::Collection<Document>,
    filter: &Document,
) -> BTreeMap<String, Value> {
    let docs: Vec<Document> = coll
        .find(filter.clone())
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    docs.into_iter()
        .map(|d| {
            let id = d
                .get("_id")
                .cloned()
                .unwrap()
                .into_relaxed_extjson()
                .to_string();
            (id, Bson::Document(d).into_relaxed_extjson())
        })
        .collect()
}

/// A small deterministic generator (the writer is random but reproducible).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }

    fn pick(&mut self, values: &[Bson]) -> Bson {
        values[self.below(values.len() as u64) as usize].clone()
    }
}

fn tenants() -> Vec<Bson> {
    vec![
        "A".into(),
        "B".into(),
        "C".into(),
        Bson::Array(vec!["A".into(), "B".into()]),
    ]
}

fn statuses() -> Vec<Bson> {
    vec!["open".into(), "closed".into()]
}

fn owners() -> Vec<Bson> {
    vec!["u1".into(), "u2".into(), "u3".into()]
}

fn random_doc(rng: &mut Lcg, id: i64) -> Document {
    doc! {
        "_id": id,
        "tenant": rng.pick(&tenants()),
        "status": rng.pick(&statuses()),
        "owner": rng.pick(&owners()),
        "n": rng.below(1000) as i64,
    }
}

/// A random change moving documents in and out of every filter.
fn random_update(rng: &mut Lcg) -> Document {
    match rng.below(4) {
        0 => doc! { "$set": { "status": rng.pick(&statuses()) } },
        1 => doc! { "$set": { "tenant": rng.pick(&tenants()) } },
        2 => doc! { "$set": { "owner": rng.pick(&owners()) } },
        _ => doc! { "$set": { "n": rng.below(1000) as i64 } },
    }
}

async fn random_writes(
    client: &mongodb::Client,
    coll: &mongodb::Collection<Document>,
    seed: u64,
    ops: usize,
) {
    const IDS: u64 = 30;
    let mut rng = Lcg(seed);
    for _ in 0..ops {
        let id = rng.below(IDS) as i64;
        match rng.below(10) {
            0 | 1 => {
                // Insert or replace (upsert), whole document.
                let replacement = random_doc(&mut rng, id);
                coll.replace_one(doc! { "_id": id }, replacement)
                    .with_options(ReplaceOptions::builder().upsert(true).build())
                    .await
                    .unwrap();
            }
            2 => {
                coll.delete_one(doc! { "_id": id }).await.unwrap();
            }
            3 => {
                // Several documents move in one transaction.
                let mut session = client.start_session().await.unwrap();
                session.start_transaction().await.unwrap();
                for _ in 0..3 {
                    let id = rng.below(IDS) as i64;
                    coll.update_one(doc! { "_id": id }, random_update(&mut rng))
                        .session(&mut session)
                        .await
                        .unwrap();
                }
                session.commit_transaction().await.unwrap();
            }
            _ => {
                coll.update_one(doc! { "_id": id }, random_update(&mut rng))
                    .await
                    .unwrap();
            }
        }
    }
}

async fn wait_running(server: &TestServer, keys: &[StreamKey]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let running = keys.iter().all(|key| {
            let workers = server.registry.workers_of(key);
            !workers.is_empty()
                && workers
                    .iter()
                    .all(|w| w.state() == streamgate::worker::WorkerState::Running)
        });
        if running {
            return;
        }
        assert!(Instant::now() < deadline, "workers running in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads until the client's state equals `expected` (then watches a moment for strays).
async fn converge(sub: &mut Subscriber, expected: &BTreeMap<String, Value>) {
    let deadline = Instant::now() + WAIT;
    while sub.documents() != *expected {
        let left = deadline.saturating_duration_since(Instant::now());
        match sub.client.next(left).await {
            Next::Event(event) => sub.apply(&event),
            other => {
                let held = sub.documents();
                let extra: Vec<_> = held.keys().filter(|k| !expected.contains_key(*k)).collect();
                let missing: Vec<_> = expected.keys().filter(|k| !held.contains_key(*k)).collect();
                let differing: Vec<_> = expected
                    .iter()
                    .filter(|(k, v)| held.get(*k).is_some_and(|h| h != *v))
                    .map(|(k, v)| (k, v, &held[k]))
                    .collect();
                panic!(
                    "{}: {other:?} before its state matched: extra {extra:?}, missing {missing:?}, differing {differing:?}",
                    sub.label
                );
            }
        }
    }
    while let Next::Event(event) = sub.client.next(Duration::from_millis(300)).await {
        sub.apply(&event);
    }
    assert_eq!(
        sub.documents(),
        *expected,
        "{}: stray events after matching",
        sub.label
    );
}

#[tokio::test]
async fn every_client_ends_with_exactly_the_documents_its_filter_selects() {
    let mongo = mongod::shared();
    let db = unique_db("membership");
    let mut config = server::config(mongo);
    config.auth = server::hs256_subscribers_of_c(&db, SECRET);
    // The workers turn on the collection's pre-images themselves (creating it).
    config.enable_pre_images = true;
    let open = json!([{ "$match": { "fullDocument.status": "open" } }]);
    let claims = json!({ "fullDocument.tenant": { "$claim": "tenant" } });
    let mut tenant = server::stream(&db, "c", "tenant", json!([]));
    tenant.definition.match_rules = Some(claims.clone());
    let open_stream = server::stream(&db, "c", "open", open.clone());
    let mut owner = server::stream(
        &db,
        "c",
        "owner",
        json!([{ "$match": { "fullDocument.owner": { "$var": "who" } } }]),
    );
    owner.definition.full_document = FullDocument::WhenAvailable;
    let mut open_tenant = server::stream(&db, "c", "open_tenant", open);
    open_tenant.definition.match_rules = Some(claims);
    config
        .streams
        .extend([tenant, open_stream, owner, open_tenant]);
    let server = TestServer::start(config).await;
    let base = server.url("");
    let path = |name: &str| format!("/{db}/c/_streams/{name}");
    let avars = |who: &str| format!("avars=%7B%22who%22%3A%22{who}%22%7D");

    let mut subscribers = Vec::new();
    let plans: Vec<(&'static str, Kind, bool, String, Document)> = vec![
        (
            "tenant A / SSE",
            Kind::Sse,
            false,
            format!("{}?access_token={}", path("tenant"), token(json!("A"))),
            doc! { "tenant": "A" },
        ),
        (
            "tenant B / WebSocket",
            Kind::Ws,
            false,
            format!("{}?access_token={}", path("tenant"), token(json!("B"))),
            doc! { "tenant": "B" },
        ),
        (
            "tenants A+C / NDJSON",
            Kind::Ndjson,
            false,
            format!(
                "{}?access_token={}",
                path("tenant"),
                token(json!(["A", "C"]))
            ),
            doc! { "tenant": { "$in": ["A", "C"] } },
        ),
        (
            "tenant C / view",
            Kind::Sse,
            true,
            format!("{}.json?auth={}", path("tenant"), token(json!("C"))),
            doc! { "tenant": "C" },
        ),
        (
            "open / view",
            Kind::Sse,
            true,
            format!("{}.json?access_token={}", path("open"), token(json!("A"))),
            doc! { "status": "open" },
        ),
        (
            "open / WebSocket",
            Kind::Ws,
            false,
            format!("{}?access_token={}", path("open"), token(json!("A"))),
            doc! { "status": "open" },
        ),
        (
            "owner u1 / NDJSON",
            Kind::Ndjson,
            false,
            format!(
                "{}?{}&access_token={}",
                path("owner"),
                avars("u1"),
                token(json!("A"))
            ),
            doc! { "owner": "u1" },
        ),
        (
            "owner u2 / view",
            Kind::Sse,
            true,
            format!(
                "{}.json?{}&access_token={}",
                path("owner"),
                avars("u2"),
                token(json!("A"))
            ),
            doc! { "owner": "u2" },
        ),
        (
            "open tenant B / SSE",
            Kind::Sse,
            false,
            format!("{}?access_token={}", path("open_tenant"), token(json!("B"))),
            doc! { "status": "open", "tenant": "B" },
        ),
    ];
    for (label, kind, view, url, filter) in plans {
        let mut client = Client::connect(kind, &base, &url, None)
            .await
            .unwrap_or_else(|refused| panic!("{label}: {refused:?}"));
        let state = if view {
            // The view starts with every current document: none yet.
            let mut tree = Tree::default();
            let first = client.expect_event(WAIT).await;
            assert_eq!(first.event, "put", "{label}");
            tree.apply(&first);
            State::View(tree)
        } else {
            State::Changes(BTreeMap::new())
        };
        subscribers.push(Subscriber {
            label,
            client,
            state,
            filter,
            moves: 0,
        });
    }
    let keys: Vec<StreamKey> = ["tenant", "open", "owner", "open_tenant"]
        .iter()
        .map(|name| StreamKey::new(&db, "c", name).unwrap())
        .collect();
    wait_running(&server, &keys).await;

    let mongo_client = mongo.client().await;
    let database = mongo_client.database(&db);
    let listed = database
        .run_command(doc! { "listCollections": 1, "filter": { "name": "c" } })
        .await
        .unwrap();
    let options = listed
        .get_document("cursor")
        .and_then(|c| c.get_array("firstBatch"))
        .unwrap()[0]
        .as_document()
        .unwrap()
        .get_document("options")
        .unwrap()
        .clone();
    assert_eq!(
        options
            .get_document("changeStreamPreAndPostImages")
            .and_then(|p| p.get_bool("enabled")),
        Ok(true),
        "enable_pre_images turned them on: {options}"
    );

    let coll = database.collection::<Document>("c");
    random_writes(&mongo_client, &coll, 19, 400).await;

    let mut moves = 0;
    for sub in &mut subscribers {
        let expected = selected(&coll, &sub.filter).await;
        converge(sub, &expected).await;
        moves += sub.moves;
    }
    assert!(
        moves > 20,
        "documents moved in and out: {moves} entries and removals"
    );
    assert_eq!(server.metrics.membership_without_pre_image.get(), 0);
    server.stop().await;
}

/// A collection without pre-images: the admin API and the worker say which `collMod` to run,
/// the metric counts, and the stream decides by the post-image alone, as before membership.
#[tokio::test]
async fn without_pre_images_the_stream_says_so_and_filters_by_post_image() {
    let mongo = mongod::shared();
    let db = unique_db("membership_off");
    let mut config = server::config(mongo);
    config.admin.database = unique_db("membership_admin");
    let server = TestServer::start(config).await;
    let mongo_client = mongo.client().await;
    let coll = mongo_client.database(&db).collection::<Document>("c");
    coll.insert_one(doc! { "_id": 1, "owner": "u1" })
        .await
        .unwrap();

    let admin = server.url(&format!("/_admin/streams/{db}/c/mine"));
    let put = reqwest::Client::new()
        .put(&admin)
        .header("content-type", "application/json")
        .body(
            json!({ "pipeline": [{ "$match": { "fullDocument.owner": { "$var": "who" } } }] })
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(put.status().as_u16(), 201);
    let view: Value = put.json().await.unwrap();
    let warning = view["warnings"][0].as_str().unwrap_or_default().to_owned();
    assert!(
        warning.contains("collMod") && warning.contains("changeStreamPreAndPostImages"),
        "{view}"
    );

    let path = format!("/{db}/c/_streams/mine");
    let connect = |who: &str| {
        let url = format!("{path}?avars=%7B%22who%22%3A%22{who}%22%7D");
        let base = server.url("");
        async move {
            Client::connect(Kind::Ndjson, &base, &url, None)
                .await
                .unwrap()
        }
    };
    let mut u1 = connect("u1").await;
    let mut u2 = connect("u2").await;
    wait_running(&server, &[StreamKey::new(&db, "c", "mine").unwrap()]).await;
    coll.update_one(doc! { "_id": 1 }, doc! { "$set": { "owner": "u2" } })
        .await
        .unwrap();
    coll.insert_one(doc! { "_id": 2, "owner": "u1" })
        .await
        .unwrap();
    // u1 is not told document 1 left (no pre-image to tell it); u2 gets a plain update.
    let first = u1.expect_event(WAIT).await;
    assert_eq!(first.data["operationType"], "insert", "{first:?}");
    let moved = u2.expect_event(WAIT).await;
    assert_eq!(moved.data["operationType"], "update");
    assert!(moved.data.get("streamgate").is_none(), "{moved:?}");
    assert!(server.metrics.membership_without_pre_image.get() >= 1);
    assert!(server.metrics.membership_pre_images_off.get() >= 1);
    let fetched: Value = reqwest::get(&admin).await.unwrap().json().await.unwrap();
    assert_eq!(fetched["warnings"][0], json!(warning), "{fetched}");
    server.stop().await;
}
