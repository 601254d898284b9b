//! Streamgate servers on `127.0.0.1:0`, in-process, with a handle to their registry.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use streamgate::config::{AuthConfig, Config, StreamConfig};
use streamgate::metrics::Metrics;
use streamgate::streams::Registry;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::mongod::MongoD;
use super::panics::Watch;

/// A config for tests: the given replica set, fast linger, short keep-alive.
pub fn config(mongo: &MongoD) -> Config {
    Config {
        mongo_uri: mongo.uri(),
        worker_linger_ms: 300,
        keepalive_secs: 15,
        shutdown_grace_secs: 5,
        ..Config::default()
    }
}

/// A static stream definition on `db.coll` named `name` with a JSON pipeline.
pub fn stream(db: &str, coll: &str, name: &str, pipeline: serde_json::Value) -> StreamConfig {
    let text = format!("db = {db:?}\ncoll = {coll:?}\nname = {name:?}\n",);
    let mut stream: StreamConfig = toml::from_str(&text).unwrap();
    stream.definition.pipeline = pipeline;
    stream
}

/// A running server.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its registry.
    pub registry: Arc<Registry>,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    /// Where it serves `/metrics` when `metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    /// Panics charged to this server: checked on `stop()` and on drop (see `harness::panics`).
    panics: Arc<Watch>,
}

impl TestServer {
    /// Starts a server with `config` on an ephemeral port.
    pub async fn start(config: Config) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(config, listener).await
    }

    /// Starts a server on a given listener (to restart on the same address).
    pub async fn start_on(config: Config, listener: tokio::net::TcpListener) -> TestServer {
        let addr = listener.local_addr().unwrap();
        // Before anything of the server runs, so no panic of it escapes the record.
        let panics = Watch::start();
        let mut app = streamgate::App::new(config).await.unwrap();
        let metrics_addr = app.bind_metrics().await.unwrap();
        let registry = app.registry();
        let metrics = app.metrics();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            app.serve(listener, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        TestServer {
            addr,
            registry,
            metrics,
            metrics_addr,
            stop: Some(stop),
            task: Some(task),
            panics,
        }
    }

    /// `http://addr{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `ws://addr{path}`.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Graceful shutdown; waits until the server has returned, then fails the test if the
    /// server panicked.
    pub async fn stop(mut self) {
        self.shutdown().await;
        self.panics.check();
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("server stops within its grace period")
                .unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.panics.check();
    }
}

/// A JWT with `claims`, signed HS256 with `secret`.
pub fn hs256(secret: &str, claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signs any claims")
}

/// An `exp` claim `secs` seconds from now.
pub fn expires_in(secs: u64) -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
        + secs
}

/// Auth on with HS256 tokens signed by `secret`, and every role allowed to subscribe to the
/// streams of `{db}/c` (what limits and exposure tests need to tell principals apart).
pub fn hs256_subscribers_of_c(db: &str, secret: &str) -> AuthConfig {
    toml::from_str(&format!(
        r#"
        enabled = true
        [jwt]
        hs256_secret = "{secret}"
        [[rules]]
        roles = ["*"]
        streams = ["/{db}/c/_streams/*"]
        "#
    ))
    .expect("a valid [auth] table")
}
