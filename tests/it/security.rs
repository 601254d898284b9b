//! Security in a real deployment (issue 14): keys from a JWKS URL served by the test (rotation,
//! outage, forged `kid`s), the client address behind Debian's haproxy (`X-Forwarded-For` and
//! `send-proxy`, forged headers from untrusted peers), permission rules withdrawn through the
//! admin API of one instance ending streams on another, and impossible resume ids.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mongodb::bson::{Document, doc};
use serde_json::{Value, json};
use streamgate::config::{Config, LimitsConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::harness::clients::{Client, Kind, Next};
use crate::harness::fixture::Fixture;
use crate::harness::server::{self, TestServer};
use crate::harness::{eventually, mongod, unique_db};

const AUDIENCE: &str = "streamgate";
const SECRET: &str = "security-secret-0123456789-0123456789-ab";
/// Every request must be answered within this: a refusal never hangs.
const ANSWER: Duration = Duration::from_secs(10);
const WAIT: Duration = Duration::from_secs(15);

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/auth")
        .join(name)
}

fn claims(sub: &str, roles: &[&str]) -> Value {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    json!({ "sub": sub, "roles": roles, "aud": AUDIENCE, "exp": now.as_secs() + 600 })
}

/// A JWT for `roles` signed by `key` with `alg`, naming `kid`.
fn token(key: &EncodingKey, alg: Algorithm, kid: &str, roles: &[&str]) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, &claims("u", roles), key).unwrap()
}

fn hs256(roles: &[&str]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("u", roles),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Status of a GET with a bearer token (SSE `Accept`, so a stream URL opens a stream, which is
/// dropped at once).
async fn status(url: &str, token: &str) -> u16 {
    let request = reqwest::Client::new()
        .get(url)
        .header("accept", "text/event-stream")
        .bearer_auth(token);
    tokio::time::timeout(ANSWER, request.send())
        .await
        .expect("answered in time")
        .expect("request")
        .status()
        .as_u16()
}

async fn ready(server: &TestServer) -> u16 {
    reqwest::get(server.url("/health/ready"))
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// What the test's JWKS endpoint serves.
struct Jwks {
    /// The body, or `None`: answer 503 (the provider is down).
    body: Option<String>,
    /// `Cache-Control: max-age` sent.
    max_age: u64,
}

/// A real HTTP JWKS endpoint on `127.0.0.1:0`, counting requests.
struct JwksServer {
    url: String,
    state: Arc<Mutex<Jwks>>,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(body: Option<String>, max_age: u64) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        let state = Arc::new(Mutex::new(Jwks { body, max_age }));
        let requests = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let (state, requests) = (state.clone(), requests.clone());
            async move {
                loop {
                    let Ok((mut socket, _)) = listener.accept().await else {
                        return;
                    };
                    let (state, requests) = (state.clone(), requests.clone());
                    tokio::spawn(async move {
                        // One request per connection: read the head, answer, close.
                        let mut head = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match socket.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        requests.fetch_add(1, Ordering::SeqCst);
                        let response = {
                            let jwks = state.lock().unwrap();
                            match &jwks.body {
                                Some(body) => format!(
                                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                                     cache-control: public, max-age={}\r\ncontent-length: {}\r\n\
                                     connection: close\r\n\r\n{body}",
                                    jwks.max_age,
                                    body.len()
                                ),
                                None => "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\
                                         connection: close\r\n\r\n"
                                    .to_owned(),
                            }
                        };
                        let _ = socket.write_all(response.as_bytes()).await;
                        let _ = socket.shutdown().await;
                    });
                }
            }
        });
        JwksServer {
            url,
            state,
            requests,
            task,
        }
    }

    fn serve(&self, body: Option<String>) {
        self.state.lock().unwrap().body = body;
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A JWKS document holding the keys of the given fixture files.
fn key_set(files: &[&str]) -> String {
    let mut keys = Vec::new();
    for file in files {
        let set: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(file)).unwrap()).unwrap();
        keys.extend(set["keys"].as_array().unwrap().iter().cloned());
    }
    json!({ "keys": keys }).to_string()
}

/// A config with auth on, keys from `jwks_url`, readers may subscribe to `db`'s streams.
fn jwks_config(db: &str, url: &str, min_refresh_secs: u64) -> Config {
    let mut config = server::config(mongod::shared());
    config.auth = toml::from_str(&format!(
        r#"
        enabled = true
        [jwt]
        jwks_url = "{url}"
        jwks_min_refresh_secs = {min_refresh_secs}
        audience = "{AUDIENCE}"
        [[rules]]
        roles = ["reader"]
        streams = ["/{db}/*/_streams/*"]
        "#
    ))
    .unwrap();
    config.streams.push(server::stream(db, "c", "s", json!([])));
    config
}

fn metric(server: &TestServer, name_and_labels: &str) -> u64 {
    server
        .metrics
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(name_and_labels))
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn jwks_url_keys_rotate_without_restart_and_survive_an_outage() {
    let db = unique_db("sec_jwks_rotate");
    let path = format!("/{db}/c/_streams/s");
    let ec =
        EncodingKey::from_ec_pem(&std::fs::read(fixture("es256_private.pem")).unwrap()).unwrap();
    let rsa =
        EncodingKey::from_rsa_pem(&std::fs::read(fixture("rs256_private.pem")).unwrap()).unwrap();
    let old = token(&ec, Algorithm::ES256, "test-es256", &["reader"]);
    let new = token(&rsa, Algorithm::RS256, "test-rs256", &["reader"]);

    // The provider is down at startup: not ready, and tokens cannot be checked yet (503).
    let jwks = JwksServer::start(None, 1).await;
    let server = TestServer::start(jwks_config(&db, &jwks.url, 1)).await;
    let url = server.url(&path);
    assert_eq!(ready(&server).await, 503);
    assert_eq!(status(&url, &old).await, 503);
    // It comes up: the refresher's retry loads the set, readiness turns green.
    jwks.serve(Some(key_set(&["es256_jwks.json"])));
    eventually("ready once the JWKS is fetched", WAIT, async || {
        ready(&server).await == 200
    })
    .await;
    assert_eq!(status(&url, &old).await, 200);

    // Rotation, step 1: the provider publishes the new key beside the old one. A token with
    // the new kid works at once (the unknown kid triggers a fetch), the old one still does.
    jwks.serve(Some(key_set(&["es256_jwks.json", "rs256_jwks.json"])));
    let before = jwks.requests();
    assert_eq!(status(&url, &new).await, 200, "new key accepted at once");
    assert!(jwks.requests() > before, "the unknown kid fetched the set");
    assert_eq!(status(&url, &old).await, 200, "old key still in the set");

    // Step 2: the old key leaves the set; its tokens stop working at the next refresh (the
    // cache lifetime, max-age=1), new ones go on. No restart anywhere.
    jwks.serve(Some(key_set(&["rs256_jwks.json"])));
    eventually("the retired key is refused", WAIT, async || {
        status(&url, &old).await == 401
    })
    .await;
    assert_eq!(status(&url, &new).await, 200);

    // The provider goes down: the last good set keeps serving, readiness stays green, and the
    // failures are counted.
    let failed = r#"streamgate_jwks_fetches_total{trigger="scheduled",result="error"} "#;
    let failures_before = metric(&server, failed);
    jwks.serve(None);
    eventually("failed fetches are counted", WAIT, async || {
        metric(&server, failed) >= failures_before + 2
    })
    .await;
    assert_eq!(status(&url, &new).await, 200, "last good keys still serve");
    assert_eq!(ready(&server).await, 200, "readiness stays green");
    server.stop().await;
}

#[tokio::test]
async fn forged_kids_cause_only_a_handful_of_jwks_fetches() {
    let db = unique_db("sec_jwks_forged");
    let ec =
        EncodingKey::from_ec_pem(&std::fs::read(fixture("es256_private.pem")).unwrap()).unwrap();
    // Default rate limit (one unknown-kid fetch per 10 s) and a 5-minute cache lifetime.
    let jwks = JwksServer::start(Some(key_set(&["es256_jwks.json"])), 300).await;
    let mut config = jwks_config(&db, &jwks.url, 10);
    config.auth.jwt.as_mut().unwrap().jwks_min_refresh_secs = 10;
    let server = TestServer::start(config).await;
    assert_eq!(ready(&server).await, 200);
    let after_start = jwks.requests();
    assert_eq!(after_start, 1, "fetched once at startup");

    // 1,000 tokens, each with a random kid, 8 clients at a time (kept-alive connections). The
    // kid is refused before any signature check, so one real signature serves them all.
    let signed = token(&ec, Algorithm::ES256, "test-es256", &["admin"]);
    let (_, payload_and_signature) = signed.split_once('.').unwrap();
    let url = server.url("/_admin/streams");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..8u64 {
        let url = url.clone();
        let rest = payload_and_signature.to_owned();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut statuses = Vec::new();
            for i in 0..125u64 {
                let kid = format!("forged-{worker}-{i}-{}", rand_suffix(worker * 1000 + i));
                let header = json!({ "alg": "ES256", "typ": "JWT", "kid": kid }).to_string();
                let forged = format!("{}.{rest}", base64url(header.as_bytes()));
                let send = client.get(&url).bearer_auth(forged).send();
                let response = tokio::time::timeout(ANSWER, send)
                    .await
                    .expect("answered in time")
                    .unwrap();
                statuses.push(response.status().as_u16());
            }
            statuses
        }));
    }
    let mut refused = 0;
    for task in tasks {
        refused += task.await.unwrap().iter().filter(|s| **s == 401).count();
    }
    let fetches = jwks.requests() - after_start;
    println!(
        "1000 forged kids in {:?}: {fetches} JWKS fetch(es)",
        started.elapsed()
    );
    assert_eq!(refused, 1000, "every forged kid is refused");
    assert!(fetches <= 2, "at most a handful of fetches, got {fetches}");
    // The real key still works.
    let good = token(&ec, Algorithm::ES256, "test-es256", &["reader"]);
    assert_eq!(
        status(&server.url(&format!("/{db}/c/_streams/s")), &good).await,
        200
    );
    server.stop().await;
}

/// Base64url without padding (JWT segments).
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// A cheap pseudo-random number (the kids only need to differ).
fn rand_suffix(seed: u64) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    (seed ^ u64::from(nanos)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

// ---- trusted proxies, behind haproxy ----

/// A running haproxy (Debian's package; `scripts/test` installs it), killed on drop.
struct Haproxy {
    child: Child,
    dir: tempfile::TempDir,
}

impl Haproxy {
    /// Starts haproxy with `config` and waits until each of `ports` accepts connections.
    async fn start(config: &str, ports: &[u16]) -> Haproxy {
        let binary = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect(
                "haproxy is not installed: the trusted-proxy tests need Debian's haproxy \
                 (scripts/test installs it; or `apt-get install haproxy`)",
            );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("haproxy.cfg");
        std::fs::write(&file, config).unwrap();
        let child = Command::new(binary)
            .arg("-db")
            .arg("-f")
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let haproxy = Haproxy { child, dir };
        for port in ports {
            eventually("haproxy listens", WAIT, async || {
                tokio::net::TcpStream::connect(("127.0.0.1", *port))
                    .await
                    .is_ok()
            })
            .await;
        }
        haproxy
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.dir;
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// An SSE stream opened from `from` with extra `headers`; `Ok` holds it open.
async fn open_from(
    url: &str,
    from: IpAddr,
    headers: &[(&str, &str)],
) -> Result<reqwest::Response, u16> {
    let client = reqwest::Client::builder()
        .local_address(Some(from))
        .build()
        .unwrap();
    let mut request = client.get(url).header("accept", "text/event-stream");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = tokio::time::timeout(ANSWER, request.send())
        .await
        .expect("answered in time")
        .expect("request");
    match response.status().as_u16() {
        200 => Ok(response),
        other => Err(other),
    }
}

/// A server trusting only 127.0.0.1 (where haproxy connects from), one stream per IP.
async fn proxied_server(db: &str) -> TestServer {
    let mut config = server::config(mongod::shared());
    config.streams.push(server::stream(db, "c", "s", json!([])));
    config.trusted_proxies = vec!["127.0.0.1/32".into()];
    config.limits = LimitsConfig {
        per_ip: Some(1),
        ..LimitsConfig::default()
    };
    TestServer::start(config).await
}

const HAPROXY_DEFAULTS: &str = "global\n  maxconn 200\ndefaults\n  timeout connect 5s\n  \
                                timeout client 60s\n  timeout server 60s\n";

#[tokio::test]
async fn behind_haproxy_with_x_forwarded_for_the_per_ip_limit_counts_real_clients() {
    let db = unique_db("sec_xff");
    let server = proxied_server(&db).await;
    let port = mongod::free_port();
    let config = format!(
        "{HAPROXY_DEFAULTS}frontend fe\n  mode http\n  bind 127.0.0.1:{port}\n  \
         option forwardfor\n  default_backend be\nbackend be\n  mode http\n  \
         server s1 {}\n",
        server.addr
    );
    let _haproxy = Haproxy::start(&config, &[port]).await;
    let url = format!("http://127.0.0.1:{port}/{db}/c/_streams/s");

    // Two real clients (127.0.0.2, 127.0.0.3) behind the one proxy: each has its own slot.
    let a = open_from(&url, ip("127.0.0.2"), &[])
        .await
        .expect("client A");
    let b = open_from(&url, ip("127.0.0.3"), &[])
        .await
        .expect("client B");
    assert_eq!(
        open_from(&url, ip("127.0.0.2"), &[]).await.unwrap_err(),
        429,
        "client A's second stream is over its own limit"
    );
    // A forged hop written by the client is left of what haproxy appends: B is still B.
    assert_eq!(
        open_from(
            &url,
            ip("127.0.0.3"),
            &[("x-forwarded-for", "198.51.100.77")]
        )
        .await
        .unwrap_err(),
        429
    );
    // Directly, from an untrusted peer, X-Forwarded-For is ignored: 127.0.0.4 counts as
    // itself whatever it claims.
    let direct = server.url(&format!("/{db}/c/_streams/s"));
    let c = open_from(
        &direct,
        ip("127.0.0.4"),
        &[("x-forwarded-for", "198.51.100.1")],
    )
    .await
    .expect("client C");
    assert_eq!(
        open_from(
            &direct,
            ip("127.0.0.4"),
            &[("x-forwarded-for", "198.51.100.2")]
        )
        .await
        .unwrap_err(),
        429,
        "a forged X-Forwarded-For from an untrusted peer is ignored"
    );
    // Nor can it borrow another client's address (B's slot is not touched by this).
    drop((a, b, c));
    server.stop().await;
}

#[tokio::test]
async fn behind_haproxy_with_send_proxy_the_per_ip_limit_counts_real_clients() {
    let db = unique_db("sec_proxy_protocol");
    let server = proxied_server(&db).await;
    let (v1, v2) = (mongod::free_port(), mongod::free_port());
    // TCP mode: haproxy does not touch HTTP; the PROXY header (v1 and v2) names the client.
    let config = format!(
        "{HAPROXY_DEFAULTS}frontend v1\n  mode tcp\n  bind 127.0.0.1:{v1}\n  default_backend b1\n\
         frontend v2\n  mode tcp\n  bind 127.0.0.1:{v2}\n  default_backend b2\n\
         backend b1\n  mode tcp\n  server s1 {addr} send-proxy\n\
         backend b2\n  mode tcp\n  server s1 {addr} send-proxy-v2\n",
        addr = server.addr
    );
    let _haproxy = Haproxy::start(&config, &[v1, v2]).await;
    let path = format!("/{db}/c/_streams/s");
    let via_v1 = format!("http://127.0.0.1:{v1}{path}");
    let via_v2 = format!("http://127.0.0.1:{v2}{path}");

    let a = open_from(&via_v1, ip("127.0.0.2"), &[])
        .await
        .expect("A via v1");
    let b = open_from(&via_v2, ip("127.0.0.3"), &[])
        .await
        .expect("B via v2");
    assert_eq!(
        open_from(&via_v2, ip("127.0.0.2"), &[]).await.unwrap_err(),
        429
    );
    assert_eq!(
        open_from(&via_v1, ip("127.0.0.3"), &[]).await.unwrap_err(),
        429
    );
    // Events flow through the proxied connection (the direct SSE path after the header).
    let mut streaming = Client::connect(Kind::Sse, &format!("http://127.0.0.1:{v1}"), &path, None)
        .await
        .expect("a third client (127.0.0.1) via v1");
    mongod::shared()
        .client()
        .await
        .database(&db)
        .collection::<Document>("c")
        .insert_one(doc! { "n": 1 })
        .await
        .unwrap();
    streaming.changes(1, WAIT).await;

    // A PROXY header from an untrusted peer is not parsed: it is just a bad request.
    let raw = tokio::net::TcpSocket::new_v4().unwrap();
    raw.bind("127.0.0.5:0".parse().unwrap()).unwrap();
    let mut raw = raw.connect(server.addr).await.unwrap();
    raw.write_all(
        format!(
            "PROXY TCP4 198.51.100.9 127.0.0.1 4000 80\r\nGET {path} HTTP/1.1\r\nhost: x\r\n\
             accept: text/event-stream\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(ANSWER, raw.read(&mut answer))
        .await
        .expect("answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    drop((a, b));
    server.stop().await;
}

// ---- rules that change live ----

#[tokio::test]
async fn a_rule_withdrawn_on_one_instance_cancels_streams_on_another_within_a_second() {
    let db = unique_db("sec_rules");
    let mut config = server::config(mongod::shared());
    config.auth = toml::from_str(&format!(
        r#"
        enabled = true
        [jwt]
        hs256_secret = "{SECRET}"
        audience = "{AUDIENCE}"
        [[rules]]
        roles = ["static"]
        streams = ["/{db}/c/_streams/s2"]
        "#
    ))
    .unwrap();
    // Rules (and definitions) stored in this test's own database: no other test sees them.
    config.admin.database = db.clone();
    for name in ["s1", "s2"] {
        config
            .streams
            .push(server::stream(&db, "c", name, json!([])));
    }
    let a = TestServer::start(config.clone()).await;
    let b = TestServer::start(config).await;
    let admin = hs256(&["admin"]);
    let put = |server: &TestServer, name: &str, roles: &[&str], streams: &[String]| {
        let request = reqwest::Client::new()
            .put(server.url(&format!("/_admin/rules/{name}")))
            .bearer_auth(&admin)
            .json(&json!({ "roles": roles, "streams": streams }));
        async move { request.send().await.unwrap() }
    };
    let s1 = format!("/{db}/c/_streams/s1");
    let s2 = format!("/{db}/c/_streams/s2");
    let openapi: Value = reqwest::Client::new()
        .get(a.url("/_admin/openapi.json"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let created = put(&a, "live-readers", &["reader"], std::slice::from_ref(&s1)).await;
    assert_eq!(created.status(), 201);
    assert_eq!(created.headers()["location"], "/_admin/rules/live-readers");
    conforms(&openapi, "Rule", &created.json().await.unwrap());
    assert_eq!(
        put(&a, "others", &["other"], std::slice::from_ref(&s1))
            .await
            .status(),
        201
    );
    // Bad rules are refused, naming the member.
    let bad = put(&a, "bad", &["x"], &["/not/a/pattern".to_owned()]).await;
    assert_eq!(bad.status(), 400);
    assert_eq!(bad.json::<Value>().await.unwrap()["field"], "streams");
    // The config's rule is listed read-only beside the stored ones.
    let listed: Value = reqwest::Client::new()
        .get(b.url("/_admin/rules"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = listed["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["config[0]", "live-readers", "others"], "{listed}");
    conforms(&openapi, "RuleList", &listed);
    assert_eq!(listed["rules"][0]["readOnly"], true);

    let reader = hs256(&["reader"]);
    let other = hs256(&["other"]);
    let both = hs256(&["reader", "static"]);
    let query = |path: &str, token: &str| format!("{path}?access_token={token}");
    // The grants reach instance B (within a second: it watches the rules collection).
    eventually("B applies A's rules", Duration::from_secs(1), async || {
        status(&b.url(&s1), &reader).await == 200
    })
    .await;
    let base = b.url("");
    let mut withdrawn = Client::connect(Kind::Sse, &base, &query(&s1, &reader), None)
        .await
        .unwrap();
    let mut kept_by_rule = Client::connect(Kind::Ws, &base, &query(&s1, &other), None)
        .await
        .unwrap();
    let mut kept_by_config = Client::connect(Kind::Ndjson, &base, &query(&s2, &both), None)
        .await
        .unwrap();
    let coll = mongod::shared()
        .client()
        .await
        .database(&db)
        .collection::<Document>("c");
    coll.insert_one(doc! { "n": 1 }).await.unwrap();
    for client in [&mut withdrawn, &mut kept_by_rule, &mut kept_by_config] {
        client.changes(1, WAIT).await;
    }

    // Withdraw the reader's right on A: B's reader stream ends with cancel within a second
    // (counted from the moment the DELETE is sent).
    let withdrawn_at = Instant::now();
    let deleted = reqwest::Client::new()
        .delete(a.url("/_admin/rules/live-readers"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let cancel = withdrawn.expect_event(Duration::from_secs(1)).await;
    let took = withdrawn_at.elapsed();
    println!("rule withdrawn on A → cancel on B in {took:?}");
    assert_eq!(cancel.event, "cancel", "{cancel:?}");
    assert_eq!(cancel.data["message"], "security rules revoked read access");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(matches!(withdrawn.next(WAIT).await, Next::End(_)));

    // The streams still permitted go on untouched.
    coll.insert_one(doc! { "n": 2 }).await.unwrap();
    for client in [&mut kept_by_rule, &mut kept_by_config] {
        let events = client.changes(1, WAIT).await;
        assert_eq!(events[0].data["fullDocument"]["n"], 2);
    }
    // And the reader is refused from now on, on both instances.
    assert_eq!(status(&b.url(&s1), &reader).await, 403);
    assert_eq!(status(&a.url(&s1), &reader).await, 403);
    // A second delete: 404; a config rule cannot be changed here.
    let again = reqwest::Client::new()
        .delete(a.url("/_admin/rules/live-readers"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
    let config_rule = put(&a, "config[0]", &["x"], std::slice::from_ref(&s1)).await;
    assert_eq!(config_rule.status(), 409);
    a.stop().await;
    b.stop().await;
}

/// Validates `body` against the OpenAPI document's component schema `name`.
fn conforms(openapi: &Value, name: &str, body: &Value) {
    let root = json!({
        "components": openapi["components"],
        "$ref": format!("#/components/schemas/{name}"),
    });
    let validator = jsonschema::validator_for(&root).expect("schema compiles");
    let errors: Vec<String> = validator.iter_errors(body).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{name}: {errors:?}\n{body}");
}

// ---- impossible resume ids ----

/// The problem body of a refused SSE subscribe resuming from `id`.
async fn refused_resume(fixture: &Fixture, kind: Kind, id: &str) -> Value {
    let (path, header) = match kind {
        Kind::Sse => (fixture.path.clone(), Some(id)),
        _ => (format!("{}?lastEventId={id}", fixture.path), None),
    };
    match Client::connect(kind, &fixture.server.url(""), &path, header).await {
        Ok(_) => panic!("resuming from {id} was accepted ({kind:?})"),
        Err(refused) => {
            assert_eq!(refused.status, 400, "{refused:?}");
            if kind == Kind::Ws {
                // tungstenite keeps the body; an empty one means the server sent none.
                serde_json::from_str(&refused.body).unwrap_or(Value::Null)
            } else {
                serde_json::from_str(&refused.body).unwrap()
            }
        }
    }
}

#[tokio::test]
async fn impossible_resume_ids_are_refused_with_400_naming_the_reason() {
    let fixture = Fixture::start("sec_resume", |config| {
        let db = config.streams[0].db.clone();
        config
            .streams
            .push(server::stream(&db, "c2", "s", json!([])));
    })
    .await;
    let base = fixture.server.url("");
    let mut here = fixture.connect(Kind::Sse).await;
    let other_path = format!("/{}/c2/_streams/s", fixture.db);
    let mut there = Client::connect(Kind::Sse, &base, &other_path, None)
        .await
        .unwrap();
    fixture.insert_seqs(0..2).await;
    let c2 = mongod::shared()
        .client()
        .await
        .database(&fixture.db)
        .collection::<Document>("c2");
    c2.insert_one(doc! { "seq": 100 }).await.unwrap();
    let ids: Vec<String> = here
        .changes(2, WAIT)
        .await
        .into_iter()
        .map(|e| e.id.unwrap())
        .collect();
    let foreign = there.changes(1, WAIT).await[0].id.clone().unwrap();

    // A real id of this collection resumes (no false positive), from every transport.
    for kind in [Kind::Sse, Kind::Ws, Kind::Ndjson] {
        let mut resumed = fixture.resume(kind, &ids[0]).await;
        let events = resumed.changes(1, WAIT).await;
        assert_eq!(events[0].id.as_deref(), Some(ids[1].as_str()));
    }

    // Later than the cluster's current time: the `8282…` id of the issue, and a real id
    // moved an hour ahead.
    let future = "82".repeat(40);
    let time = u32::from_str_radix(&ids[1][2..10], 16).unwrap();
    let ahead = format!("82{:08X}{}", time + 3600, &ids[1][10..]);
    for (id, kind) in [
        (&future, Kind::Sse),
        (&ahead, Kind::Ndjson),
        (&ahead, Kind::Sse),
    ] {
        let problem = refused_resume(&fixture, kind, id).await;
        assert_eq!(problem["reason"], "future_cluster_time", "{problem}");
        assert!(
            problem["detail"].as_str().unwrap().contains("later than"),
            "{problem}"
        );
    }
    let ws = refused_resume(&fixture, Kind::Ws, &future).await;
    assert!(
        ws.is_null() || ws["reason"] == "future_cluster_time",
        "{ws}"
    );

    // An id of another collection (same database, same cluster).
    for kind in [Kind::Sse, Kind::Ndjson] {
        let problem = refused_resume(&fixture, kind, &foreign).await;
        assert_eq!(problem["reason"], "other_collection", "{problem}");
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("another collection"),
            "{problem}"
        );
    }
    // The foreign id is fine on its own stream.
    let mut own =
        crate::harness::fixture::resume(&fixture.server, &other_path, Kind::Sse, &foreign).await;
    c2.insert_one(doc! { "seq": 101 }).await.unwrap();
    assert_eq!(
        own.changes(1, WAIT).await[0].data["fullDocument"]["seq"],
        101
    );
}

/// A restart storm of resumes on a fresh server asks MongoDB once (one `listCollections`, at
/// most one `ping`), not once per client: N questions at once would open N pooled connections.
#[tokio::test]
async fn a_storm_of_resume_checks_asks_mongodb_once() {
    use mongodb::event::EventHandler;
    use mongodb::event::command::CommandEvent;
    use streamgate::auth::resume::ResumeCheck;
    use streamgate::event::Token;

    let f = Fixture::start("resume_once", |_| {}).await;
    let mut client = f.connect(Kind::Sse).await;
    f.insert_seqs(0..1).await;
    let id = client.changes(1, WAIT).await[0].id.clone().unwrap();
    let token = Token::parse(&id).unwrap();

    let asked: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut options = mongodb::options::ClientOptions::parse(mongod::shared().uri())
        .await
        .unwrap();
    let seen = Arc::clone(&asked);
    options.command_event_handler = Some(EventHandler::callback(move |event| {
        if let CommandEvent::Started(started) = event {
            seen.lock().unwrap().push(started.command_name);
        }
    }));
    let check = Arc::new(ResumeCheck::new(
        mongodb::Client::with_options(options).unwrap(),
    ));
    let key = f.key();
    let checks: Vec<_> = (0..50)
        .map(|_| {
            let (check, key, token) = (Arc::clone(&check), key.clone(), token.clone());
            tokio::spawn(async move { check.check(&key, &token).await })
        })
        .collect();
    for handle in checks {
        assert!(handle.await.unwrap().is_ok());
    }
    let asked = asked.lock().unwrap().clone();
    let count = |name: &str| asked.iter().filter(|n| *n == name).count();
    assert_eq!(count("listCollections"), 1, "{asked:?}");
    assert!(count("ping") <= 1, "{asked:?}");
    f.server.stop().await;
}
