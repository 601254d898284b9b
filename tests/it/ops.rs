//! Operating Streamgate (issue 13): metrics a Prometheus linter accepts and that answer "is it
//! behind?", JSON logs with refusals at debug, `check-config`, the console (served from the
//! binary behind the admin role, and driven in a real browser).
//!
//! `promtool` (Debian's `prometheus`) and, for the browser test, Chromium + node are installed by
//! `scripts/test`; a missing tool fails the test that needs it rather than skipping it.

use std::process::Stdio;
use std::time::Duration;

use mongodb::bson::{Document, doc};
use serde_json::{Value, json};
use sha2::Digest;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::harness::browser::BrowserScript;
use crate::harness::clients::{Client, Kind};
use crate::harness::eventually;
use crate::harness::fixture::{Fixture, seqs};
use crate::harness::fleet::{self, Fleet, sample};
use crate::harness::mongod::{self, MongoD};
use crate::harness::server::{self, TestServer};
use crate::harness::unique_db;

const WAIT: Duration = Duration::from_secs(20);

/// `GET /metrics` as Prometheus text (what promtool and curl get).
async fn scrape(server: &TestServer) -> String {
    let response = reqwest::get(server.url("/metrics")).await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    response.text().await.unwrap()
}

/// Runs `promtool check metrics` on `text`; panics with its findings if it objects.
async fn promtool_check(text: &str) {
    let mut promtool = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian package prometheus; scripts/test installs it)");
    let mut stdin = promtool.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let output = promtool.wait_with_output().await.unwrap();
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "promtool check metrics failed:\n{}{}\n--- metrics ---\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn metrics_pass_promtool_after_traffic_and_count_refusals_and_bytes() {
    let f = Fixture::start("ops_prom", |c| c.limits.per_stream = Some(2)).await;
    let mut sse = f.connect(Kind::Sse).await;
    let mut ws = f.connect(Kind::Ws).await;
    let refused = Client::connect(Kind::Ndjson, &f.server.url(""), &f.path, None)
        .await
        .err()
        .expect("a third client is over per_stream = 2");
    assert_eq!(refused.status, 429);
    f.insert_seqs(0..5).await;
    assert_eq!(
        seqs(&sse.changes(5, WAIT).await),
        (0..5).collect::<Vec<_>>()
    );
    assert_eq!(seqs(&ws.changes(5, WAIT).await), (0..5).collect::<Vec<_>>());
    // WebSocket batches are counted after their flush, which may trail the client's read.
    let metrics = &f.server.metrics;
    eventually("both clients' changes timed", WAIT, async || {
        metrics.delivery_latency.count() >= 10
    })
    .await;

    let text = scrape(&f.server).await;
    for (series, at_least) in [
        (
            "streamgate_connection_refusals_total{limit=\"per_stream\"}",
            1.0,
        ),
        ("streamgate_delivery_latency_seconds_count", 10.0),
        (
            "streamgate_delivery_latency_seconds_bucket{le=\"+Inf\"}",
            10.0,
        ),
        ("streamgate_bytes_written_total{transport=\"sse\"}", 500.0),
        (
            "streamgate_bytes_written_total{transport=\"websocket\"}",
            500.0,
        ),
        ("streamgate_events_received_total", 5.0),
        ("streamgate_upstream_cursors", 1.0),
    ] {
        let value = sample(&text, series).unwrap_or_else(|| panic!("{series} missing:\n{text}"));
        assert!(value >= at_least, "{series} = {value} < {at_least}");
    }
    let lag = format!("streamgate_worker_lag_seconds{{stream=\"{}\"}}", f.path);
    assert!(sample(&text, &lag).is_some(), "{lag} missing:\n{text}");
    promtool_check(&text).await;
    // Every metric the Grafana dashboard queries is one the server exports.
    let dashboard = include_str!("../../deploy/grafana-dashboard.json");
    let dashboard: Value = serde_json::from_str(dashboard).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for name in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if name.starts_with("streamgate_") {
                    let exported = text.contains(&format!("# TYPE {name} "))
                        || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                            name.strip_suffix(suffix).is_some_and(|base| {
                                text.contains(&format!("# TYPE {base} histogram"))
                            })
                        });
                    assert!(
                        exported,
                        "the dashboard queries {name}, which /metrics lacks"
                    );
                }
            }
        }
    }

    // A Prometheus server asks for OpenMetrics and gets it.
    let open = reqwest::Client::new()
        .get(f.server.url("/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert!(
        open.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let body = open.text().await.unwrap();
    assert!(body.contains("# TYPE streamgate_deliveries counter") && body.ends_with("# EOF\n"));
    f.server.stop().await;
}

#[tokio::test]
async fn latency_histogram_and_lag_gauge_move_with_events_and_when_the_worker_is_behind() {
    let mongo = tokio::task::spawn_blocking(MongoD::start).await.unwrap();
    let f = Fixture::start_on(&mongo, "ops_lag", |_| {}).await;
    let lag_series = format!("streamgate_worker_lag_seconds{{stream=\"{}\"}}", f.path);
    let lag = async || sample(&scrape(&f.server).await, &lag_series);
    let mut sse = f.connect(Kind::Sse).await;
    let metrics = &f.server.metrics;
    assert_eq!(metrics.delivery_latency.count(), 0);

    // Events flow: each change is timed, well under a second on loopback; the worker keeps up.
    f.insert_seqs(0..5).await;
    assert_eq!(
        seqs(&sse.changes(5, WAIT).await),
        (0..5).collect::<Vec<_>>()
    );
    let text = scrape(&f.server).await;
    assert_eq!(
        sample(&text, "streamgate_delivery_latency_seconds_count"),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &text,
            "streamgate_delivery_latency_seconds_bucket{le=\"1.0\"}"
        ),
        Some(5.0),
        "{text}"
    );
    eventually("the worker is at the head", WAIT, async || {
        lag().await.is_some_and(|l| l < 2.0)
    })
    .await;

    // MongoDB goes away: the worker reads nothing and falls behind, one second per second.
    let mongo = mongo.killed().await;
    let behind = eventually(
        "the lag gauge climbs while the worker cannot read",
        WAIT,
        async || lag().await.is_some_and(|l| l >= 3.0),
    )
    .await;
    let view: Value = reqwest::get(f.server.url(&format!("/_admin/streams/{}/c/s", f.db)))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        view["stats"]["lagSeconds"].as_f64().unwrap() >= 3.0,
        "{view}"
    );

    // Back: the worker resumes, delivers, and is at the head again.
    let mongo = mongo.restarted().await;
    f.insert_seqs(5..10).await;
    assert_eq!(
        seqs(&sse.changes(5, WAIT).await),
        (5..10).collect::<Vec<_>>()
    );
    assert_eq!(metrics.delivery_latency.count(), 10);
    let recovered = eventually("the lag gauge falls back", WAIT, async || {
        lag().await.is_some_and(|l| l < 2.0)
    })
    .await;
    println!(
        "lag reached 3 s after {behind:?} without MongoDB; back under 2 s {recovered:?} after the first delivery"
    );
    f.server.stop().await;
    drop(mongo);
}

/// A config file for the binary: `listen` on any free port, the shared replica set, `extra`.
fn config_file(db: &str, extra: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    let text = format!(
        "listen = \"127.0.0.1:0\"\nmongo_uri = {:?}\nworker_linger_ms = 300\nshutdown_grace_secs = 3\n{extra}\n\
         [[streams]]\ndb = {db:?}\ncoll = \"c\"\nname = \"s\"\n",
        mongod::shared().uri()
    );
    std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
    file
}

#[tokio::test]
async fn json_logs_are_one_object_a_line_and_refusals_are_logged_at_debug() {
    let db = unique_db("ops_log");
    let file = config_file(&db, "log_format = \"json\"");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamgate"))
        .arg("--config")
        .arg(file.path())
        .env("RUST_LOG", "info,streamgate=debug")
        .env_remove("STREAMGATE_LOG_JSON")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Every line is one JSON object with the stable fields.
    let mut next = async || -> Value {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("a log line in time")
            .unwrap()
            .expect("streamgate still running");
        let value: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for field in ["timestamp", "level", "target", "message"] {
            assert!(value.get(field).is_some(), "{field} missing: {line}");
        }
        value
    };
    let addr = loop {
        let line = next().await;
        if line["message"] == "streamgate listening" {
            break line["listen"].as_str().unwrap().to_owned();
        }
    };
    let refused = reqwest::Client::new()
        .get(format!("http://{addr}/{db}/c/_streams/nope"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 404);
    let line = loop {
        let line = next().await;
        if line["message"] == "request refused" {
            break line;
        }
    };
    assert_eq!(line["level"], "DEBUG", "{line}");
    assert_eq!(line["status"], 404, "{line}");
    assert!(
        line["detail"]
            .as_str()
            .unwrap()
            .contains("no stream is defined"),
        "{line}"
    );

    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn check_config_validates_and_describes_without_connecting() {
    let bin = env!("CARGO_BIN_EXE_streamgate");
    // An address nothing answers on: check-config must not try it.
    let mut good = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(
        &mut good,
        b"listen = \"0.0.0.0:9000\"\nmongo_uri = \"mongodb://ops:s3cret@192.0.2.1:27017/?replicaSet=rs0\"\n\
          [[streams]]\ndb = \"shop\"\ncoll = \"orders\"\nname = \"mine\"\n\
          pipeline = [{ \"$match\" = { \"fullDocument.owner\" = { \"$var\" = \"owner\" } } }]\n",
    )
    .unwrap();
    let started = std::time::Instant::now();
    let output = tokio::process::Command::new(bin)
        .arg("check-config")
        .arg(good.path())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "it connected somewhere"
    );
    for expected in [
        ": valid",
        "0.0.0.0:9000",
        "/shop/orders/_streams/mine",
        "avars owner",
        "ops:****@192.0.2.1",
        "warning: listening on 0.0.0.0:9000 WITHOUT authentication",
    ] {
        assert!(stdout.contains(expected), "{expected:?} missing:\n{stdout}");
    }
    assert!(!stdout.contains("s3cret"), "{stdout}");

    // The same file as the server would load it: variables and flags over the file.
    let output = tokio::process::Command::new(bin)
        .arg("--limits-max-workers=7")
        .arg("check-config")
        .arg(good.path())
        .env("STREAMGATE_LISTEN", "127.0.0.1:9100")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    for expected in [
        "listen        127.0.0.1:9100",
        "overrides     listen from STREAMGATE_LISTEN, limits.max_workers from --limits-max-workers",
        "cursors 7",
    ] {
        assert!(stdout.contains(expected), "{expected:?} missing:\n{stdout}");
    }
    assert!(!stdout.contains("WITHOUT authentication"), "{stdout}");
    let output = tokio::process::Command::new(bin)
        .arg("check-config")
        .arg(good.path())
        .env("STREAMGATE_LIMITS_MAX_WORKERS", "many")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr.contains("STREAMGATE_LIMITS_MAX_WORKERS"), "{stderr}");

    let mut bad = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(
        &mut bad,
        b"[[streams]]\ndb = \"a\"\ncoll = \"b\"\nname = \"c\"\npipeline = [{ \"$out\" = \"x\" }]\n",
    )
    .unwrap();
    let output = tokio::process::Command::new(bin)
        .arg("check-config")
        .arg(bad.path())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr.contains("streams[0].pipeline[0].$out"), "{stderr}");
}

/// The binary layers its settings: an environment variable over the file (a bad one stops it,
/// naming the setting), a flag over the variable; `--help` lists every setting's flag and
/// variable.
#[tokio::test]
async fn the_binary_takes_settings_from_the_environment_and_flags_over_the_file() {
    let bin = env!("CARGO_BIN_EXE_streamgate");
    let db = unique_db("ops_settings");
    let file = config_file(&db, "[limits]\nmax_workers = 10");
    let start = |flags: &[&str]| {
        tokio::process::Command::new(bin)
            .arg("--config")
            .arg(file.path())
            .args(flags)
            .env("STREAMGATE_LIMITS_MAX_WORKERS", "0")
            .env("STREAMGATE_LOG_FORMAT", "json")
            .env_remove("STREAMGATE_LOG_JSON")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    };
    // The variable wins over the file's 10, and 0 is refused.
    let output = tokio::time::timeout(WAIT, start(&[]).wait_with_output())
        .await
        .expect("exits")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("limits.max_workers must be 1 to"),
        "{stderr}"
    );
    // The flag wins over the variable: the server starts (and logs JSON, from the environment).
    let mut child = start(&["--limits-max-workers=5"]);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let listening = tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("streamgate listening") {
                return line;
            }
        }
        panic!("streamgate exited before listening");
    })
    .await
    .expect("listening in time");
    assert!(
        serde_json::from_str::<Value>(&listening).is_ok(),
        "{listening}"
    );
    child.kill().await.unwrap();

    let help = std::process::Command::new(bin)
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for expected in [
        "--ring-size",
        "STREAMGATE_RING_SIZE",
        "--auth-jwt-jwks-url",
        "STREAMGATE_AUTH_JWT_JWKS_URL",
    ] {
        assert!(help.contains(expected), "{expected} missing:\n{help}");
    }
}

#[tokio::test]
async fn deploy_files_pass_their_linters() {
    let root = env!("CARGO_MANIFEST_DIR");
    let yamllint = std::process::Command::new("yamllint")
        .args(["-s", "-c", "deploy/yamllint.yml", "deploy/kubernetes"])
        .current_dir(root)
        .output()
        .expect("yamllint is installed (Debian package yamllint; scripts/test installs it)");
    assert!(
        yamllint.status.success(),
        "yamllint:\n{}",
        String::from_utf8_lossy(&yamllint.stdout)
    );
    let haproxy = std::process::Command::new("haproxy")
        .args(["-c", "-f", "deploy/haproxy.cfg"])
        .current_dir(root)
        .output()
        .expect("haproxy is installed (Debian package haproxy; scripts/test installs it)");
    assert!(
        haproxy.status.success() && !String::from_utf8_lossy(&haproxy.stderr).contains("WARNING"),
        "haproxy -c:\n{}",
        String::from_utf8_lossy(&haproxy.stderr)
    );
    // The pod's grace period covers preStop + shutdown_grace_secs + the 4 s the workers and
    // the MongoDB client may take after it (App::serve).
    let deployment =
        std::fs::read_to_string(format!("{root}/deploy/kubernetes/deployment.yaml")).unwrap();
    let configmap =
        std::fs::read_to_string(format!("{root}/deploy/kubernetes/configmap.yaml")).unwrap();
    let number_after = |text: &str, key: &str| -> u64 {
        let rest = &text[text.find(key).unwrap_or_else(|| panic!("{key} missing")) + key.len()..];
        let digits: String = rest
            .chars()
            .skip_while(|c| !c.is_ascii_digit())
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().unwrap()
    };
    let period = number_after(&deployment, "terminationGracePeriodSeconds:");
    let pre_stop = number_after(&deployment, "\"/bin/sleep\",");
    let grace = number_after(&configmap, "shutdown_grace_secs =");
    assert!(
        pre_stop + grace + 4 < period,
        "{pre_stop} + {grace} + 4 >= {period}"
    );
    assert!(deployment.contains("path: /health/ready"));
    for kind in ["Deployment", "Service", "PodDisruptionBudget", "ConfigMap"] {
        let found = std::fs::read_dir(format!("{root}/deploy/kubernetes"))
            .unwrap()
            .any(|f| {
                std::fs::read_to_string(f.unwrap().path())
                    .unwrap()
                    .contains(&format!("kind: {kind}\n"))
            });
        assert!(found, "no {kind} in deploy/kubernetes");
    }
}

const ADMIN_KEY: &str = "sg_ops_admin_key";
const READER_KEY: &str = "sg_ops_reader_key";

/// `[auth]` with an admin key (which may also subscribe to everything) and a reader key.
fn auth_config(config: &mut streamgate::config::Config) {
    let admin = hex::encode(sha2::Sha256::digest(ADMIN_KEY.as_bytes()));
    let reader = hex::encode(sha2::Sha256::digest(READER_KEY.as_bytes()));
    config.auth = toml::from_str(&format!(
        "enabled = true\n\
         [[api_keys]]\nname = \"ops\"\nsha256 = \"{admin}\"\nroles = [\"admin\"]\n\
         [[api_keys]]\nname = \"app\"\nsha256 = \"{reader}\"\nroles = [\"reader\"]\n\
         [[rules]]\nroles = [\"admin\", \"reader\"]\nstreams = [\"/*/*/_streams/*\"]\n"
    ))
    .unwrap();
}

#[tokio::test]
async fn console_is_served_from_the_binary_behind_the_admin_role() {
    let f = Fixture::start("ops_ui", auth_config).await;
    let http = reqwest::Client::new();
    let get = async |path: &str, bearer: Option<&str>| {
        let mut request = http.get(f.server.url(path));
        if let Some(key) = bearer {
            request = request.bearer_auth(key);
        }
        request.send().await.unwrap()
    };
    assert_eq!(get("/_admin/ui", None).await.status(), 401);
    assert_eq!(get("/_admin/ui", Some(READER_KEY)).await.status(), 403);
    assert_eq!(get("/_admin/stats", Some(READER_KEY)).await.status(), 403);
    for page in [
        get("/_admin/ui", Some(ADMIN_KEY)).await,
        get(&format!("/_admin/ui?access_token={ADMIN_KEY}"), None).await,
    ] {
        assert_eq!(page.status(), 200);
        let headers = page.headers().clone();
        assert!(
            headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("script-src 'sha256-") && csp.contains("connect-src 'self'"),
            "{csp}"
        );
        let html = page.text().await.unwrap();
        assert!(html.contains("Streamgate console") && html.contains("new EventSource"));
    }

    let _client = f.connect_with_key().await;
    let stats = get("/_admin/stats", Some(ADMIN_KEY)).await;
    assert_eq!(stats.status(), 200);
    let stats: Value = stats.json().await.unwrap();
    assert_eq!(stats["clients"]["sse"], 1, "{stats}");
    assert_eq!(stats["workers"], 1, "{stats}");
    assert_eq!(stats["cursors"], 1, "{stats}");
    assert!(stats["maxLagSeconds"].as_f64().is_some(), "{stats}");
    // The body is what the OpenAPI document declares.
    let openapi: Value = get("/_admin/openapi.json", Some(ADMIN_KEY))
        .await
        .json()
        .await
        .unwrap();
    assert!(openapi["components"]["securitySchemes"]["bearerAuth"].is_object());
    assert_eq!(openapi["security"].as_array().map(Vec::len), Some(3));
    let root = json!({
        "components": openapi["components"],
        "allOf": [openapi["paths"]["/_admin/stats"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]],
    });
    let validator = jsonschema::validator_for(&root).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&stats)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{errors:?}\n{stats}");
    f.server.stop().await;
}

impl Fixture {
    /// An SSE client of the fixture's stream with the admin key (auth on).
    async fn connect_with_key(&self) -> Client {
        let path = format!("{}?access_token={ADMIN_KEY}", self.path);
        Client::connect(Kind::Sse, &self.server.url(""), &path, None)
            .await
            .unwrap()
    }
}

/// Chromium drives the console (tests/browser/console.mjs): a definition with a deliberate
/// error shows the API's message next to the pipeline field; fixed, it is created; an insert
/// appears in the live tail; the stream is deleted. Set `STREAMGATE_SCREENSHOTS=docs` to refresh
/// the screenshots in `docs/`.
#[tokio::test]
#[ignore = "needs Chromium, node and tests/browser/node_modules: scripts/test installs them and runs it"]
async fn browser_console_defines_fixes_tails_and_deletes_a_stream() {
    let mongo = mongod::shared();
    let db = unique_db("ops_browser");
    let mut config = server::config(mongo);
    auth_config(&mut config);
    let server = TestServer::start(config).await;
    let mut browser = BrowserScript::start(
        "console.mjs",
        &[&server.url(""), ADMIN_KEY, &db],
        Duration::from_secs(60),
    );

    let error = browser.next().await;
    assert_eq!(error["type"], "field-error", "{error}");
    assert!(error["text"].as_str().unwrap().contains("$out"), "{error}");
    let created = browser.next().await;
    assert_eq!(created["type"], "created", "{created}");
    let path = format!("/{db}/orders/_streams/fresh");
    assert_eq!(created["path"], path.as_str());
    let tailing = browser.next().await;
    assert_eq!(tailing["type"], "tailing", "{tailing}");

    let coll = mongo
        .client()
        .await
        .database(&db)
        .collection::<Document>("orders");
    coll.insert_one(doc! { "item": "tea", "by": "ada" })
        .await
        .unwrap();
    let tail = browser.next().await;
    assert_eq!(tail["type"], "tail", "{tail}");
    assert!(
        tail["text"].as_str().unwrap().contains("\"item\":\"tea\""),
        "{tail}"
    );

    let deleted = browser.next().await;
    assert_eq!(deleted["type"], "deleted", "{deleted}");
    let gone = reqwest::Client::new()
        .get(server.url(&format!("/_admin/streams/{db}/orders/fresh")))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
    browser.wait().await;
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The fleet (harness/fleet.rs): deploy/haproxy.cfg in front of three streamgate processes on
// one replica set. relay.rs runs the same fleet in relay mode.

/// 300 SSE clients through haproxy (`STREAMGATE_FLEET_CLIENTS` changes it; a debug build runs
/// it in about 3 s), inserts flowing all along; one instance is killed with SIGKILL, then all
/// three are restarted one by one with SIGTERM. Every client must end with every change exactly
/// once, in order; the time until every client has the first change made after each failure is
/// printed.
#[tokio::test]
async fn fleet_behind_haproxy_survives_kill_and_rolling_restart_exactly_once() {
    let db = unique_db("ops_fleet");
    let mut fleet = Fleet::start(&db, fleet::client_count(), "").await;
    let (_, took) = fleet.recover("kill -9 instance 1", 0, "-KILL").await;
    let mut recoveries = vec![took];
    fleet.instances[0].start().await;
    recoveries.extend(fleet.rolling_restart().await);
    fleet.finish().await;
    for took in &recoveries {
        assert!(*took < Duration::from_secs(30), "a recovery took {took:?}");
    }
}
