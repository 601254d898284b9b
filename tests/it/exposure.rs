//! Smaller holes of issue 23 item 7: a token without `sub` is limited by `per_user` like any
//! other; `/metrics` (which names every running stream) can move to its own address or need a
//! role; and a loopback server without auth does not answer a page that reached it through
//! DNS rebinding (`Host` not a loopback name).

use std::time::Duration;

use serde_json::{Value, json};
use streamgate::config::Config;

use crate::harness::clients::{Client, Kind};
use crate::harness::server::{self, TestServer};
use crate::harness::{mongod, unique_db};

const SECRET: &str = "exposure-secret-0123456789-0123456789";

fn token(claims: Value) -> String {
    server::hs256(SECRET, &claims)
}

/// A server with stream `c`/`s` on a fresh database, HS256 auth on, every role may subscribe.
fn auth_config(db: &str) -> Config {
    let mut config = server::config(mongod::shared());
    config.keepalive_secs = 1;
    config.streams.push(server::stream(db, "c", "s", json!([])));
    config.auth = server::hs256_subscribers_of_c(db, SECRET);
    config
}

async fn sse(url: &str, bearer: Option<&str>, host: Option<&str>) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .get(url)
        .header("accept", "text/event-stream");
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    if let Some(host) = host {
        request = request.header("host", host);
    }
    tokio::time::timeout(Duration::from_secs(10), request.send())
        .await
        .expect("answered in time")
        .expect("request")
}

/// Before, `per_user` skipped a principal whose token had no `sub`: any number of streams.
/// Now such a token is keyed by its lasting claims: two tokens of the same holder (issued at
/// different times) share one allowance, another holder has its own.
#[tokio::test]
async fn per_user_limits_a_token_without_sub_by_its_lasting_claims() {
    let db = unique_db("exposure_nosub");
    let mut config = auth_config(&db);
    config.limits.per_user = Some(1);
    let server = TestServer::start(config).await;
    let url = server.url(&format!("/{db}/c/_streams/s"));
    let first = token(
        json!({ "client_id": "svc-a", "roles": ["r"], "exp": server::expires_in(600), "iat": 1 }),
    );
    let again = token(
        json!({ "roles": ["r"], "client_id": "svc-a", "exp": server::expires_in(900), "iat": 2 }),
    );
    let other =
        token(json!({ "client_id": "svc-b", "roles": ["r"], "exp": server::expires_in(600) }));
    let held = sse(&url, Some(&first), None).await;
    assert_eq!(held.status(), 200);
    let refused = sse(&url, Some(&again), None).await;
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["limit"], "per_user", "{body}");
    let _other = sse(&url, Some(&other), None).await;
    assert_eq!(_other.status(), 200, "another holder has its own allowance");
    drop(held);
    server.stop().await;
}

/// `metrics_listen`: `/metrics` on its own address only; the main one answers 404 there and
/// serves streams as before.
#[tokio::test]
async fn metrics_can_be_served_on_their_own_address_only() {
    let db = unique_db("exposure_metrics_addr");
    let mut config = server::config(mongod::shared());
    config
        .streams
        .push(server::stream(&db, "c", "s", json!([])));
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let server = TestServer::start(config).await;
    let path = format!("/{db}/c/_streams/s");
    let _client = Client::connect(Kind::Sse, &server.url(""), &path, None)
        .await
        .unwrap();
    let main = reqwest::get(server.url("/metrics")).await.unwrap();
    assert_eq!(main.status(), 404);
    let addr = server.metrics_addr.expect("metrics_listen bound");
    assert_ne!(addr.port(), server.addr.port());
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains(&format!("stream=\"{path}\"")), "{text}");
    // Only /metrics there.
    let other = reqwest::get(format!("http://{addr}/health/live"))
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    server.stop().await;
}

/// `auth.metrics_role`: with auth on, `/metrics` needs a credential holding the role (401
/// without one, 403 without the role); unset, it stays public (`auth.rs` checks that).
#[tokio::test]
async fn metrics_need_the_metrics_role_when_it_is_set() {
    let db = unique_db("exposure_metrics_role");
    let mut config = auth_config(&db);
    config.auth.metrics_role = Some("metrics".into());
    let server = TestServer::start(config).await;
    let http = reqwest::Client::new();
    let get = |bearer: Option<String>| {
        let mut request = http.get(server.url("/metrics"));
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        request.send()
    };
    let anonymous = get(None).await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let reader = token(json!({ "sub": "u", "roles": ["reader"], "exp": server::expires_in(600) }));
    let forbidden = get(Some(reader)).await.unwrap();
    assert_eq!(forbidden.status(), 403);
    let body: Value = forbidden.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("metrics"),
        "{body}"
    );
    let scraper =
        token(json!({ "sub": "prom", "roles": ["metrics"], "exp": server::expires_in(600) }));
    let scraped = get(Some(scraper)).await.unwrap();
    assert_eq!(scraped.status(), 200);
    assert!(scraped.text().await.unwrap().contains("streamgate_workers"));
    // The probes stay public.
    let live = http.get(server.url("/health/live")).send().await.unwrap();
    assert_eq!(live.status(), 200);
    server.stop().await;
}

/// With auth off on a loopback address, a request whose `Host` is not a loopback name (a page
/// of `evil.example` whose name was rebound to 127.0.0.1) gets 421 with a problem body, on
/// every route and on the direct SSE path; loopback names with any port, and names in
/// `allowed_hosts`, are served.
#[tokio::test]
async fn a_rebound_host_is_refused_on_loopback_without_auth() {
    let db = unique_db("exposure_host");
    let mut config = server::config(mongod::shared());
    config
        .streams
        .push(server::stream(&db, "c", "s", json!([])));
    config.allowed_hosts = vec!["streams.example".into()];
    let server = TestServer::start(config).await;
    let stream = server.url(&format!("/{db}/c/_streams/s"));
    let refused = sse(&stream, None, Some("evil.example")).await;
    assert_eq!(refused.status(), 421);
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["status"], 421);
    assert_eq!(body["setting"], "allowed_hosts", "{body}");
    let http = reqwest::Client::new();
    for path in ["/_admin/streams", "/metrics", "/health/live"] {
        let response = http
            .get(server.url(path))
            .header("host", "evil.example:8080")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 421, "{path}");
    }
    let port = server.addr.port();
    for host in [
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        "127.0.0.1".to_owned(),
        "streams.example".to_owned(),
    ] {
        assert_eq!(
            sse(&stream, None, Some(&host)).await.status(),
            200,
            "{host}"
        );
    }
    // reqwest's own Host (127.0.0.1:port), as every other test sends.
    assert_eq!(sse(&stream, None, None).await.status(), 200);
    server.stop().await;
}

/// The guard is for servers without credentials: with auth on, the `Host` is not checked.
#[tokio::test]
async fn the_host_guard_is_off_with_auth_on() {
    let db = unique_db("exposure_host_auth");
    let server = TestServer::start(auth_config(&db)).await;
    let bearer = token(json!({ "sub": "u", "roles": ["r"], "exp": server::expires_in(600) }));
    let stream = server.url(&format!("/{db}/c/_streams/s"));
    let response = sse(&stream, Some(&bearer), Some("streams.example.com")).await;
    assert_eq!(response.status(), 200);
    server.stop().await;
}
