//! Authentication and authorization: the credential × route matrix, the three ways to send a
//! token, HS256 / RS256 (PEM) / ES256 (JWKS) keys and API keys, stream rules, expiry of a live
//! stream on a timer, and the browser origin policy (CORS, WebSocket `Origin`).

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mongodb::bson::{Document, doc};
use serde_json::{Value, json};
use streamgate::config::{AuthConfig, Config, CorsConfig};
use streamgate::streams::StreamKey;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};

use crate::harness::clients::{Client, Kind, Next};
use crate::harness::server::{self, TestServer};
use crate::harness::{mongod, unique_db};

/// Shared secret of the HS256 servers (at least 32 bytes, as the config requires).
const SECRET: &str = "test-secret-0123456789-0123456789-abcdef";
const AUDIENCE: &str = "streamgate";
/// Every request must be answered within this: a refusal never hangs.
const ANSWER: Duration = Duration::from_secs(10);
const WAIT: Duration = Duration::from_secs(10);
/// The API key `service-key` (its SHA-256 is in the config, the key itself only here).
const API_KEY: &str = "sg_test_service_key_1";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/auth")
        .join(name)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// Claims for `sub` with `roles`, audience `aud`, expiring `exp_in` seconds from now.
fn claims(sub: &str, roles: &[&str], aud: &str, exp_in: i64) -> Value {
    json!({
        "sub": sub,
        "roles": roles,
        "aud": aud,
        "tenant": "t1",
        "exp": now() as i64 + exp_in,
    })
}

fn hs256(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A config with auth on: HS256 tokens for audience `streamgate`, an API key, readers and
/// admins may subscribe to everything in `db`.
fn auth_config(db: &str) -> Config {
    let mut config = server::config(mongod::shared());
    config.auth = toml::from_str(&format!(
        r#"
        enabled = true
        [jwt]
        hs256_secret = "{SECRET}"
        audience = "{AUDIENCE}"
        [[api_keys]]
        name = "service-key"
        sha256 = "{}"
        roles = ["reader"]
        [[rules]]
        roles = ["reader", "admin"]
        streams = ["/{db}/*/_streams/*"]
        "#,
        sha256_hex(API_KEY)
    ))
    .unwrap();
    config.streams.push(server::stream(db, "c", "s", json!([])));
    config
}

/// Status of an SSE subscribe with `headers`; the stream (if any) is dropped at once.
async fn sse_status(url: &str, headers: &[(&str, String)]) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .get(url)
        .header("accept", "text/event-stream");
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    tokio::time::timeout(ANSWER, request.send())
        .await
        .expect("answered in time")
        .expect("request")
}

/// Status of a WebSocket handshake (101 on success) with `headers`.
async fn ws_status(url: &str, headers: &[(&str, String)]) -> u16 {
    let mut request = url
        .replacen("http://", "ws://", 1)
        .into_client_request()
        .unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    let connected = tokio::time::timeout(ANSWER, tokio_tungstenite::connect_async(request))
        .await
        .expect("answered in time");
    match connected {
        Ok((_socket, response)) => response.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("websocket handshake failed: {other}"),
    }
}

fn bearer(token: &str) -> Vec<(&'static str, String)> {
    if token.is_empty() {
        Vec::new()
    } else {
        vec![("authorization", format!("Bearer {token}"))]
    }
}

#[tokio::test]
async fn matrix_of_credentials_and_routes() {
    let db = unique_db("auth_matrix");
    let server = TestServer::start(auth_config(&db)).await;
    let subscribe = server.url(&format!("/{db}/c/_streams/s"));
    let http = reqwest::Client::new();

    let cases: [(&str, String, [u16; 4]); 6] = [
        // (credential, token, [SSE, WebSocket, admin GET, admin PUT])
        ("no token", String::new(), [401, 401, 401, 401]),
        (
            "bad signature",
            hs256(
                "another-secret-0123456789-0123456789",
                &claims("u1", &["admin"], AUDIENCE, 600),
            ),
            [401, 401, 401, 401],
        ),
        (
            "expired",
            hs256(SECRET, &claims("u1", &["admin"], AUDIENCE, -3600)),
            [401, 401, 401, 401],
        ),
        (
            "wrong audience",
            hs256(SECRET, &claims("u1", &["admin"], "someone-else", 600)),
            [401, 401, 401, 401],
        ),
        (
            "valid reader",
            hs256(SECRET, &claims("u1", &["reader"], AUDIENCE, 600)),
            [200, 101, 403, 403],
        ),
        (
            "valid admin",
            hs256(SECRET, &claims("u2", &["admin"], AUDIENCE, 600)),
            [200, 101, 200, 201],
        ),
    ];
    let mut failures = Vec::new();
    for (index, (name, token, expected)) in cases.iter().enumerate() {
        let headers = bearer(token);
        let sse = sse_status(&subscribe, &headers).await;
        let sse_status_code = sse.status().as_u16();
        if sse_status_code == 401 {
            let challenge = sse
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            assert!(challenge.starts_with("Bearer"), "{name}: {challenge:?}");
            assert_eq!(
                sse.headers()["content-type"],
                "application/problem+json",
                "{name}"
            );
        }
        drop(sse);
        let ws = ws_status(&subscribe, &headers).await;

        let admin_get = {
            let mut request = http.get(server.url(&format!("/_admin/streams/{db}/c/s")));
            for (k, v) in &headers {
                request = request.header(*k, v);
            }
            tokio::time::timeout(ANSWER, request.send())
                .await
                .unwrap()
                .unwrap()
                .status()
                .as_u16()
        };
        let admin_put = {
            let mut request = http
                .put(server.url(&format!("/_admin/streams/{db}/c/put{index}")))
                .header("content-type", "application/json")
                .body(json!({ "pipeline": [] }).to_string());
            for (k, v) in &headers {
                request = request.header(*k, v);
            }
            tokio::time::timeout(ANSWER, request.send())
                .await
                .unwrap()
                .unwrap()
                .status()
                .as_u16()
        };
        let got = [sse_status_code, ws, admin_get, admin_put];
        if &got != expected {
            failures.push(format!("{name}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");

    // The admin list needs the role too; probes and metrics need nothing.
    let reader = hs256(SECRET, &claims("u1", &["reader"], AUDIENCE, 600));
    let list = http
        .get(server.url("/_admin/streams"))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), 403);
    for path in ["/health/live", "/metrics"] {
        let response = http.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn access_token_query_cookie_and_api_key_work() {
    let mongo = mongod::shared();
    let db = unique_db("auth_ways");
    let server = TestServer::start(auth_config(&db)).await;
    let token = hs256(SECRET, &claims("u1", &["reader"], AUDIENCE, 600));
    let path = format!("/{db}/c/_streams/s");

    // EventSource style: the token in the query string, events flow.
    let mut by_query = Client::connect(
        Kind::Sse,
        &server.url(""),
        &format!("{path}?access_token={token}"),
        None,
    )
    .await
    .expect("?access_token= is accepted");
    // WebSocket, same way.
    let mut by_query_ws = Client::connect(
        Kind::Ws,
        &server.url(""),
        &format!("{path}?access_token={token}"),
        None,
    )
    .await
    .expect("?access_token= is accepted over WebSocket");

    // Cookie (default name `streamgate_token`) and API key as bearer.
    let cookie = sse_status(
        &server.url(&path),
        &[("cookie", format!("theme=dark; streamgate_token={token}"))],
    )
    .await;
    assert_eq!(cookie.status(), 200);
    let api_key = sse_status(&server.url(&path), &bearer(API_KEY)).await;
    assert_eq!(api_key.status(), 200);
    let wrong_key = sse_status(&server.url(&path), &bearer("sg_test_wrong")).await;
    assert_eq!(wrong_key.status(), 401);
    let wrong_cookie = sse_status(
        &server.url(&path),
        &[("cookie", "streamgate_token=garbage".to_owned())],
    )
    .await;
    assert_eq!(wrong_cookie.status(), 401);

    mongo
        .client()
        .await
        .database(&db)
        .collection::<Document>("c")
        .insert_one(doc! { "_id": 1 })
        .await
        .unwrap();
    for client in [&mut by_query, &mut by_query_ws] {
        let events = client.changes(1, WAIT).await;
        assert_eq!(events[0].data["documentKey"], json!({"_id": 1}));
    }
}

#[tokio::test]
async fn rs256_pem_and_es256_jwks_keys() {
    let db = unique_db("auth_keys");
    let path = format!("/{db}/c/_streams/s");
    let rsa =
        EncodingKey::from_rsa_pem(&std::fs::read(fixture("rs256_private.pem")).unwrap()).unwrap();
    let ec =
        EncodingKey::from_ec_pem(&std::fs::read(fixture("es256_private.pem")).unwrap()).unwrap();
    let good = claims("u1", &["reader"], AUDIENCE, 600);
    let rs256 = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &good, &rsa).unwrap();
    let mut es_header = Header::new(Algorithm::ES256);
    es_header.kid = Some("test-es256".into());
    let es256 = jsonwebtoken::encode(&es_header, &good, &ec).unwrap();
    let mut unknown_kid = es_header.clone();
    unknown_kid.kid = Some("other".into());
    let es256_unknown_kid = jsonwebtoken::encode(&unknown_kid, &good, &ec).unwrap();
    let hs = hs256(SECRET, &good);

    // RS256 with a PEM public key.
    let mut config = auth_config(&db);
    let jwt = config.auth.jwt.as_mut().unwrap();
    jwt.hs256_secret = None;
    jwt.public_key_pem_file = Some(fixture("rs256_public.pem"));
    jwt.algorithms = vec!["RS256".into()];
    let server = TestServer::start(config).await;
    let url = server.url(&path);
    assert_eq!(sse_status(&url, &bearer(&rs256)).await.status(), 200);
    assert_eq!(sse_status(&url, &bearer(&es256)).await.status(), 401);
    assert_eq!(sse_status(&url, &bearer(&hs)).await.status(), 401);
    server.stop().await;

    // ES256 with a JWKS file: the kid picks the key.
    let mut config = auth_config(&db);
    let jwt = config.auth.jwt.as_mut().unwrap();
    jwt.hs256_secret = None;
    jwt.jwks_file = Some(fixture("es256_jwks.json"));
    let server = TestServer::start(config).await;
    let url = server.url(&path);
    assert_eq!(sse_status(&url, &bearer(&es256)).await.status(), 200);
    assert_eq!(
        sse_status(&url, &bearer(&es256_unknown_kid)).await.status(),
        401
    );
    assert_eq!(sse_status(&url, &bearer(&rs256)).await.status(), 401);
    assert_eq!(sse_status(&url, &bearer(&hs)).await.status(), 401);
    server.stop().await;
}

#[tokio::test]
async fn rules_grant_streams_by_pattern_and_role() {
    let db = unique_db("auth_rules");
    let mut config = auth_config(&db);
    config.auth.rules = toml::from_str::<AuthConfig>(&format!(
        r#"
        [[rules]]
        roles = ["orders"]
        streams = ["/{db}/orders/_streams/*"]
        [[rules]]
        roles = ["*"]
        streams = ["/{db}/*/_streams/public"]
        "#
    ))
    .unwrap()
    .rules;
    for (coll, name) in [("orders", "all"), ("items", "public"), ("items", "all")] {
        config
            .streams
            .push(server::stream(&db, coll, name, json!([])));
    }
    let server = TestServer::start(config).await;
    let registry = server.registry.clone();
    let orders = hs256(SECRET, &claims("u1", &["orders"], AUDIENCE, 600));
    let nobody = hs256(SECRET, &claims("u2", &[], AUDIENCE, 600));

    let cases = [
        (&orders, "orders", "all", 200),
        (&orders, "items", "public", 200),
        (&orders, "items", "all", 403),
        (&nobody, "items", "public", 200),
        (&nobody, "orders", "all", 403),
        // Not defined, and not granted: 403, so refused clients cannot probe for streams.
        (&nobody, "orders", "missing", 403),
        // Not defined but granted: the usual 404.
        (&orders, "orders", "missing", 404),
    ];
    for (token, coll, name, expected) in cases {
        let url = server.url(&format!("/{db}/{coll}/_streams/{name}"));
        let status = sse_status(&url, &bearer(token)).await.status().as_u16();
        assert_eq!(status, expected, "{coll}/{name}");
    }
    // A refused request starts no worker.
    let refused = StreamKey::new(&db, "items", "all").unwrap();
    assert!(registry.workers_of(&refused).is_empty());
}

/// Waits for `auth_revoked` on an idle stream and returns how long after `exp` it came.
async fn revoked_after_exp(kind: Kind, server: &TestServer, path: &str, exp: u64) -> Duration {
    let token = hs256(
        SECRET,
        &json!({ "sub": "u1", "roles": ["reader"], "aud": AUDIENCE, "exp": exp }),
    );
    let mut client = Client::connect(
        kind,
        &server.url(""),
        &format!("{path}?access_token={token}"),
        None,
    )
    .await
    .expect("token valid at connect time");
    let event = client.expect_event(Duration::from_secs(10)).await;
    let at = SystemTime::now();
    assert_eq!(event.event, "auth_revoked", "{event:?}");
    let exp_time = UNIX_EPOCH + Duration::from_secs(exp);
    // Never early (the tolerance is the clock granularity of the test itself).
    assert!(
        at + Duration::from_millis(20) >= exp_time,
        "revoked before exp"
    );
    match client.next(Duration::from_secs(3)).await {
        Next::End(code) if kind == Kind::Ws => assert_eq!(code, Some(4003)),
        Next::End(_) => {}
        other => panic!("expected the stream to close, got {other:?}"),
    }
    at.duration_since(exp_time).unwrap_or_default()
}

#[tokio::test]
async fn expiry_mid_stream_yields_auth_revoked_within_a_second() {
    let db = unique_db("auth_expiry");
    let server = TestServer::start(auth_config(&db)).await;
    let path = format!("/{db}/c/_streams/s");
    // Expire 2 s from now: the stream is idle (no inserts, keep-alive 15 s), so only the
    // timer can end it.
    let (sse, ws) = tokio::join!(
        revoked_after_exp(Kind::Sse, &server, &path, now() + 2),
        revoked_after_exp(Kind::Ws, &server, &path, now() + 2),
    );
    eprintln!("auth_revoked after exp: SSE {sse:?}, WebSocket {ws:?}");
    assert!(sse < Duration::from_secs(1), "SSE late by {sse:?}");
    assert!(ws < Duration::from_secs(1), "WebSocket late by {ws:?}");
}

fn cors_config(db: &str) -> Config {
    let mut config = auth_config(db);
    config.cors = CorsConfig {
        allowed_origins: vec!["https://app.example".into()],
        allow_credentials: true,
    };
    config
}

#[tokio::test]
async fn cors_allows_listed_origins_only() {
    let db = unique_db("auth_cors");
    let server = TestServer::start(cors_config(&db)).await;
    let url = server.url(&format!("/{db}/c/_streams/s"));
    let http = reqwest::Client::new();
    let token = hs256(SECRET, &claims("u1", &["reader"], AUDIENCE, 600));

    // Preflight from an allowed origin: answered without a credential.
    let preflight = |origin: &'static str| {
        http.request(reqwest::Method::OPTIONS, &url)
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
            .send()
    };
    let allowed = preflight("https://app.example").await.unwrap();
    assert!(allowed.status().is_success(), "{}", allowed.status());
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(
        allowed.headers()["access-control-allow-credentials"],
        "true"
    );
    let denied = preflight("https://evil.example").await.unwrap();
    assert!(
        denied
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );

    // The actual requests: the allowed origin gets CORS headers, also on a 401, the other none.
    let ok = sse_status(
        &url,
        &[
            ("origin", "https://app.example".into()),
            ("cookie", format!("streamgate_token={token}")),
        ],
    )
    .await;
    assert_eq!(ok.status(), 200);
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let unauthorized = sse_status(&url, &[("origin", "https://app.example".into())]).await;
    assert_eq!(unauthorized.status(), 401);
    assert_eq!(
        unauthorized.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let foreign = sse_status(
        &url,
        &[
            ("origin", "https://evil.example".into()),
            ("cookie", format!("streamgate_token={token}")),
        ],
    )
    .await;
    assert!(
        foreign
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );

    // WebSocket: the Origin is checked by the server itself.
    let with = |origin: &str| {
        let mut headers = bearer(&token);
        headers.push(("origin", origin.to_owned()));
        headers
    };
    assert_eq!(ws_status(&url, &with("https://app.example")).await, 101);
    assert_eq!(ws_status(&url, &with("https://evil.example")).await, 403);
    let same_origin = format!("http://{}", server.addr);
    assert_eq!(ws_status(&url, &with(&same_origin)).await, 101);
    assert_eq!(ws_status(&url, &bearer(&token)).await, 101, "no Origin");
}

#[test]
fn wildcard_origin_with_credentials_is_refused() {
    let text = "[cors]\nallowed_origins = [\"*\"]\nallow_credentials = true\n";
    let error = Config::from_toml_str(text, "x")
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(error.contains("allow_credentials"), "{error}");
}

#[tokio::test]
async fn token_claims_reach_document_filtering() {
    let mongo = mongod::shared();
    let db = unique_db("auth_claims");
    let mut config = auth_config(&db);
    config.streams[0].definition.match_rules =
        Some(json!({ "fullDocument.tenantId": { "$claim": "tenant" } }));
    let server = TestServer::start(config).await;
    let path = format!("/{db}/c/_streams/s");
    let token = |tenant: &str| {
        let mut claims = claims("u1", &["reader"], AUDIENCE, 600);
        claims["tenant"] = json!(tenant);
        hs256(SECRET, &claims)
    };
    let connect = |tenant: &str| {
        let url = server.url("");
        let path = format!("{path}?access_token={}", token(tenant));
        async move { Client::connect(Kind::Sse, &url, &path, None).await.unwrap() }
    };
    let mut t1 = connect("t1").await;
    let mut t2 = connect("t2").await;
    // An API key has no `tenant` claim: refused before any event can leak.
    let api_key = sse_status(&server.url(&path), &bearer(API_KEY)).await;
    assert_eq!(api_key.status(), 403);

    let coll = mongo
        .client()
        .await
        .database(&db)
        .collection::<Document>("c");
    for (n, tenant) in [(1, "t2"), (2, "t1"), (3, "t2")] {
        coll.insert_one(doc! { "n": n, "tenantId": tenant })
            .await
            .unwrap();
    }
    let one = t1.changes(1, WAIT).await;
    assert_eq!(one[0].data["fullDocument"]["n"], json!(2));
    let two = t2.changes(2, WAIT).await;
    let ns: Vec<_> = two
        .iter()
        .map(|e| e.data["fullDocument"]["n"].clone())
        .collect();
    assert_eq!(ns, [json!(1), json!(3)]);
}

// On the server's own runtime flavour: on a test's single-threaded runtime the database feed,
// the catch-up and the client share one thread, and in a debug build on a loaded machine its
// timer wheel is turned only every few hundred milliseconds of their work (seconds at worst),
// which is the test's runtime, not the server's mechanism.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_cuts_a_client_in_the_middle_of_a_long_catch_up() {
    // Issue 9 item 4: a subscription that is always ready (100,000 events to catch up) must
    // not starve the expiry timer.
    let db = unique_db("auth_expiry_catchup");
    let server = TestServer::start(auth_config(&db)).await;
    let path = format!("/{db}/c/_streams/s");
    let coll = mongod::shared()
        .client()
        .await
        .database(&db)
        .collection::<Document>("c");
    let long = hs256(SECRET, &claims("u1", &["reader"], AUDIENCE, 3600));
    let mut first = Client::connect(
        Kind::Ndjson,
        &server.url(""),
        &format!("{path}?access_token={long}"),
        None,
    )
    .await
    .expect("subscribed");
    coll.insert_one(doc! { "seq": -1 }).await.unwrap();
    let from = first.changes(1, WAIT).await[0].id.clone().expect("id");
    const N: i64 = 100_000;
    for chunk in (0..N).collect::<Vec<_>>().chunks(10_000) {
        coll.insert_many(chunk.iter().map(|seq| doc! { "seq": seq }))
            .await
            .unwrap();
    }
    drop(first);
    // Long enough to connect on a loaded machine, short against reading 100,000 changes.
    let exp = now() + 4;
    let short = hs256(
        SECRET,
        &json!({ "sub": "u1", "roles": ["reader"], "aud": AUDIENCE, "exp": exp }),
    );
    // Read raw, a line at a time without parsing JSON: the test measures when the server cut
    // the client, and a client that parses 100,000 events in a debug build on a loaded machine
    // would fall seconds behind what the server had already sent (sitting in socket buffers).
    let response = reqwest::Client::new()
        .get(server.url(&format!("{path}?access_token={short}&lastEventId={from}")))
        .header("Accept", "application/x-ndjson")
        .send()
        .await
        .expect("token valid at connect time");
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut pending: Vec<u8> = Vec::new();
    let mut changes = 0;
    let revoked_at = 'read: loop {
        let chunk = tokio::time::timeout(WAIT, body.next())
            .await
            .unwrap_or_else(|_| panic!("nothing for {WAIT:?} after {changes} changes"))
            .unwrap_or_else(|| panic!("ended without auth_revoked after {changes} changes"))
            .expect("body");
        pending.extend_from_slice(&chunk);
        let mut start = 0;
        while let Some(end) = pending[start..].iter().position(|b| *b == b'\n') {
            let line = &pending[start..start + end];
            start += end + 1;
            if line.starts_with(br#"{"event":"change""#) {
                changes += 1;
            } else if line.starts_with(br#"{"event":"auth_revoked""#) {
                break 'read SystemTime::now();
            } else {
                let quiet = [&br#"{"event":"heartbeat""#[..], br#"{"event":"info""#];
                let text = String::from_utf8_lossy(line);
                assert!(quiet.iter().any(|q| line.starts_with(q)), "{text}");
            }
        }
        pending.drain(..start);
    };
    let late = revoked_at
        .duration_since(UNIX_EPOCH + Duration::from_secs(exp))
        .unwrap_or_default();
    eprintln!("auth_revoked {late:?} after exp, after {changes} of {N} changes");
    // Starved, it would come only after all 100,000 changes; on time it comes within the
    // clock granularity plus a busy machine's scheduling.
    assert!(
        late < Duration::from_secs(5),
        "auth_revoked late by {late:?}"
    );
    assert!(
        changes < N,
        "cut in the middle of the catch-up, not after it ({changes} changes)"
    );
}
