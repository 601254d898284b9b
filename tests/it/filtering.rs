//! Per-user document filtering on one shared cursor (`match` rules with `$claim`).

use std::collections::HashMap;
use std::time::Duration;

use mongodb::bson::doc;
use serde_json::{Value, json};

use crate::harness::clients::{Client, Kind};
use crate::harness::fixture::Fixture;
use streamgate::streams::SubscribeFailure;

const WAIT: Duration = Duration::from_secs(15);

fn claims(value: Value) -> serde_json::Map<String, Value> {
    json!({ "sub": "someone", "tenant": value })
        .as_object()
        .cloned()
        .unwrap()
}

#[tokio::test]
async fn tenants_on_one_cursor_only_see_their_documents() {
    let f = Fixture::start("tenants", |config| {
        config.streams[0].definition.match_rules =
            Some(json!({ "fullDocument.tenantId": { "$claim": "tenant" } }));
    })
    .await;
    let (server, key) = (&f.server, f.key());

    let subscribe = |tenant: Value| {
        let registry = server.registry.clone();
        let key = key.clone();
        async move {
            registry
                .subscribe(&key, None, None, Some(&claims(tenant)).into())
                .await
                .unwrap()
        }
    };
    let mut a1 = subscribe(json!("A")).await;
    let mut a2 = subscribe(json!("A")).await;
    let mut b = subscribe(json!("B")).await;
    let mut both = subscribe(json!(["A", "B"])).await;
    let mut c = subscribe(json!("C")).await;

    // Mixed load: A, B, documents for both (array field), and for nobody.
    let coll = &f.coll;
    let mut expected: HashMap<&str, Vec<i64>> = HashMap::new();
    let mut docs = Vec::new();
    for seq in 0..300_i64 {
        let tenant = match seq % 4 {
            0 | 3 => mongodb::bson::Bson::from("A"),
            1 => mongodb::bson::Bson::from("B"),
            _ if seq % 8 == 2 => mongodb::bson::Bson::Array(vec!["A".into(), "B".into()]),
            _ => mongodb::bson::Bson::from("Z"),
        };
        let for_a = matches!(seq % 4, 0 | 3) || seq % 8 == 2;
        let for_b = seq % 4 == 1 || seq % 8 == 2;
        if for_a {
            expected.entry("A").or_default().push(seq);
        }
        if for_b {
            expected.entry("B").or_default().push(seq);
        }
        if for_a || for_b {
            expected.entry("AB").or_default().push(seq);
        }
        docs.push(doc! { "seq": seq, "tenantId": tenant });
    }
    for chunk in docs.chunks(25) {
        coll.insert_many(chunk.to_vec()).await.unwrap();
    }

    async fn collect(sub: &mut streamgate::worker::Subscription, n: usize) -> Vec<i64> {
        let mut out = Vec::new();
        while out.len() < n {
            let event = tokio::time::timeout(WAIT, sub.next())
                .await
                .expect("event in time")
                .expect("open");
            let text = std::str::from_utf8(&event.ndjson).unwrap();
            let envelope: Value = serde_json::from_str(text).unwrap();
            out.push(envelope["data"]["fullDocument"]["seq"].as_i64().unwrap());
        }
        out
    }
    assert_eq!(collect(&mut a1, expected["A"].len()).await, expected["A"]);
    assert_eq!(collect(&mut a2, expected["A"].len()).await, expected["A"]);
    assert_eq!(collect(&mut b, expected["B"].len()).await, expected["B"]);
    assert_eq!(
        collect(&mut both, expected["AB"].len()).await,
        expected["AB"]
    );
    // Nothing else arrives for anyone; C got nothing at all.
    coll.insert_one(doc! { "seq": 1000, "tenantId": "C" })
        .await
        .unwrap();
    assert_eq!(collect(&mut c, 1).await, vec![1000]);
    for sub in [&mut a1, &mut a2, &mut b, &mut both] {
        assert!(
            tokio::time::timeout(Duration::from_millis(300), sub.next())
                .await
                .is_err()
        );
    }

    let workers = server.registry.workers_of(&key);
    assert_eq!(workers.len(), 1, "one worker for every tenant");
    assert_eq!(server.metrics.cursors_opened.get(), 1);
    assert_eq!(
        workers[0].partition_count(),
        4,
        "A, B, [A,B] and C partitions; A's two clients share one"
    );
    f.server.stop().await;
}

#[tokio::test]
async fn filtered_resume_from_catch_up_skips_other_tenants() {
    let f = Fixture::start("tenantresume", |config| {
        config.ring_size = 8;
        config.client_queue = 8;
        config.streams[0].definition.match_rules =
            Some(json!({ "fullDocument.tenantId": { "$claim": "tenant" } }));
    })
    .await;
    let (server, key) = (&f.server, f.key());
    let coll = &f.coll;

    let mut a = server
        .registry
        .subscribe(&key, None, None, Some(&claims(json!("A"))).into())
        .await
        .unwrap();
    coll.insert_one(doc! { "seq": 0, "tenantId": "A" })
        .await
        .unwrap();
    let first = tokio::time::timeout(WAIT, a.next()).await.unwrap().unwrap();
    let resume_from = first.id.clone().unwrap();
    // 60 more documents, alternating tenants: far more than the ring holds.
    for seq in 1..61_i64 {
        let tenant = if seq % 2 == 0 { "A" } else { "B" };
        coll.insert_one(doc! { "seq": seq, "tenantId": tenant })
            .await
            .unwrap();
    }
    let mut resumed = server
        .registry
        .subscribe(
            &key,
            None,
            Some(resume_from),
            Some(&claims(json!("A"))).into(),
        )
        .await
        .unwrap();
    let mut seqs = Vec::new();
    while seqs.len() < 30 {
        let event = tokio::time::timeout(WAIT, resumed.next())
            .await
            .unwrap()
            .unwrap();
        let envelope: Value = serde_json::from_slice(&event.ndjson).unwrap();
        assert_eq!(envelope["data"]["fullDocument"]["tenantId"], "A");
        seqs.push(envelope["data"]["fullDocument"]["seq"].as_i64().unwrap());
    }
    assert_eq!(seqs, (1..61).filter(|s| s % 2 == 0).collect::<Vec<_>>());
    f.server.stop().await;
}

#[tokio::test]
async fn filtered_stream_needs_claims() {
    let f = Fixture::start("noclaims", |config| {
        config.streams[0].definition.match_rules =
            Some(json!({ "fullDocument.tenantId": { "$claim": "tenant" } }));
    })
    .await;
    let (server, key) = (&f.server, f.key());
    let no_tenant = json!({ "sub": "x" }).as_object().cloned().unwrap();
    assert!(matches!(
        server
            .registry
            .subscribe(&key, None, None, Some(&no_tenant).into())
            .await,
        Err(SubscribeFailure::Filter(_))
    ));
    // Over HTTP without authentication: 403, and no worker started.
    let refused = Client::connect(Kind::Sse, &server.url(""), &f.path, None)
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, 403);
    assert!(server.registry.workers_of(&key).is_empty());
    f.server.stop().await;
}

#[tokio::test]
async fn deletes_reach_the_owning_tenant_by_pre_image_and_nobody_else() {
    let f = Fixture::start("tenant_deletes", |config| {
        let definition = &mut config.streams[0].definition;
        definition.match_rules = Some(json!({ "fullDocument.tenantId": { "$claim": "tenant" } }));
        definition.full_document_before_change =
            streamgate::streams::definition::FullDocumentBeforeChange::WhenAvailable;
    })
    .await;
    let db = f.coll.client().database(&f.db);
    db.run_command(doc! { "create": "c" }).await.unwrap();
    db.run_command(doc! { "collMod": "c", "changeStreamPreAndPostImages": { "enabled": true } })
        .await
        .unwrap();
    let subscribe = |tenant: &str| {
        let registry = f.server.registry.clone();
        let key = f.key();
        let claims = claims(json!(tenant));
        async move {
            registry
                .subscribe(&key, None, None, Some(&claims).into())
                .await
                .unwrap()
        }
    };
    let mut a = subscribe("A").await;
    let mut b = subscribe("B").await;
    f.coll
        .insert_one(doc! { "_id": 1, "tenantId": "A" })
        .await
        .unwrap();
    f.coll
        .insert_one(doc! { "_id": 2, "tenantId": "B" })
        .await
        .unwrap();
    f.coll.delete_one(doc! { "_id": 1 }).await.unwrap();
    f.coll
        .insert_one(doc! { "_id": 3, "tenantId": "B" })
        .await
        .unwrap();

    async fn operations(
        sub: &mut streamgate::worker::Subscription,
        n: usize,
    ) -> Vec<(String, i64)> {
        let mut out = Vec::new();
        while out.len() < n {
            let event = tokio::time::timeout(WAIT, sub.next())
                .await
                .expect("event in time")
                .expect("stream open");
            let data: Value = serde_json::from_slice(&event.ndjson).unwrap();
            let data = &data["data"];
            out.push((
                data["operationType"].as_str().unwrap().to_owned(),
                data["documentKey"]["_id"].as_i64().unwrap(),
            ));
        }
        out
    }
    assert_eq!(
        operations(&mut a, 2).await,
        vec![("insert".into(), 1), ("delete".into(), 1)],
        "the owner learns its document went away"
    );
    // B sees its own documents only: the delete of A's document is not for B.
    assert_eq!(
        operations(&mut b, 2).await,
        vec![("insert".into(), 2), ("insert".into(), 3)]
    );
    f.server.stop().await;
}
