//! A fleet: `deploy/haproxy.cfg` in front of three `streamgate` processes on the shared replica
//! set, hundreds of reconnecting SSE clients through it and an inserter writing all along. The
//! fleet tests (`ops.rs` without the relay, `relay.rs` with it) share it: they differ only in
//! the instances' configuration and in what they check around each failure.

use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mongodb::Collection;
use mongodb::bson::{Document, doc};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::eventually;
use super::mongod;

const WAIT: Duration = Duration::from_secs(20);

/// The value of the sample named exactly `series` (name plus labels), if exposed.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// A streamgate process on a fixed port (restartable on the same one).
pub struct Instance {
    pub port: u16,
    config: tempfile::NamedTempFile,
    child: Option<tokio::process::Child>,
}

impl Instance {
    /// An instance serving stream `s` of `db`.`c`; `extra` is appended to its TOML file (a
    /// `[relay]` section, say).
    pub fn new(db: &str, extra: &str) -> Instance {
        let port = mongod::free_port();
        let mut config = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        let text = format!(
            "listen = \"127.0.0.1:{port}\"\nmongo_uri = {:?}\nkeepalive_secs = 5\n\
             shutdown_grace_secs = 3\nsse_retry_ms = 300\n\
             [[streams]]\ndb = {db:?}\ncoll = \"c\"\nname = \"s\"\n{extra}",
            mongod::shared().uri()
        );
        std::io::Write::write_all(&mut config, text.as_bytes()).unwrap();
        Instance {
            port,
            config,
            child: None,
        }
    }

    pub async fn start(&mut self) {
        // `STREAMGATE_FLEET_LOG=info` shows what the instances do (their logs go to stdout).
        let log = std::env::var("STREAMGATE_FLEET_LOG").ok();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamgate"))
            .arg("--config")
            .arg(self.config.path())
            .env("RUST_LOG", log.as_deref().unwrap_or("warn"))
            .stdout(if log.is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let url = format!("http://127.0.0.1:{}/health/ready", self.port);
        eventually("instance ready", WAIT, async || {
            reqwest::get(&url).await.is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    /// Sends `signal` (`-STOP`, `-CONT`, …) without waiting for anything.
    pub fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .and_then(|c| c.id())
            .unwrap()
            .to_string();
        let sent = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// Sends `signal` and waits for the process to exit.
    pub async fn stop(&mut self, signal: &str) -> ExitStatus {
        self.signal(signal);
        let mut child = self.child.take().unwrap();
        tokio::time::timeout(WAIT, child.wait())
            .await
            .unwrap()
            .unwrap()
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Its `/metrics` text (empty if it does not answer).
    pub async fn metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.port);
        match reqwest::get(url).await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// The value of `series` in its metrics (0 if absent or if it does not answer).
    pub async fn metric(&self, series: &str) -> f64 {
        sample(&self.metrics().await, series).unwrap_or(0.0)
    }
}

/// One SSE client through the load balancer that reconnects with `Last-Event-ID` on every
/// failure and records the `seq` of every change, in order.
async fn fleet_client(url: String, seen: Arc<Mutex<Vec<i64>>>, done: CancellationToken) -> usize {
    use futures::StreamExt;
    let http = reqwest::Client::new();
    let mut last_id: Option<String> = None;
    let mut connects = 0;
    while !done.is_cancelled() {
        let mut request = http.get(&url).header("accept", "text/event-stream");
        if let Some(id) = &last_id {
            request = request.header("last-event-id", id);
        }
        let response = tokio::select! {
            _ = done.cancelled() => break,
            response = request.send() => response,
        };
        match response {
            Ok(response) if response.status() == 200 => {
                connects += 1;
                let mut body = response.bytes_stream();
                let mut buffer = String::new();
                let (mut id, mut event, mut data) = (None::<String>, String::new(), String::new());
                loop {
                    let chunk = tokio::select! {
                        _ = done.cancelled() => return connects,
                        chunk = body.next() => chunk,
                    };
                    let Some(Ok(chunk)) = chunk else { break };
                    buffer.push_str(&String::from_utf8_lossy(&chunk));
                    while let Some(end) = buffer.find('\n') {
                        let line: String = buffer.drain(..=end).collect();
                        let line = line.trim_end_matches(['\n', '\r']);
                        if let Some(value) = line.strip_prefix("id: ") {
                            id = Some(value.to_owned());
                        } else if let Some(value) = line.strip_prefix("event: ") {
                            event = value.to_owned();
                        } else if let Some(value) = line.strip_prefix("data: ") {
                            data = value.to_owned();
                        } else if line.is_empty() && !event.is_empty() {
                            assert_ne!(event, "error", "a fleet client got {data}");
                            if event == "change" {
                                let change: Value = serde_json::from_str(&data).unwrap();
                                let seq = change["fullDocument"]["seq"].as_i64().unwrap();
                                seen.lock().unwrap().push(seq);
                                last_id = id.take();
                            }
                            event.clear();
                        }
                    }
                }
            }
            // Refused (an instance going away) or unreachable: try again through the LB.
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    connects
}

/// The number of fleet clients: `STREAMGATE_FLEET_CLIENTS`, else 300.
pub fn client_count() -> usize {
    std::env::var("STREAMGATE_FLEET_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

/// Three instances behind haproxy, `clients` SSE clients through it, each with seq 0, and
/// inserts flowing (one every 20 ms) until [`Fleet::finish`].
pub struct Fleet {
    pub instances: Vec<Instance>,
    pub clients: usize,
    pub coll: Collection<Document>,
    haproxy: tokio::process::Child,
    seen: Vec<Arc<Mutex<Vec<i64>>>>,
    tasks: Vec<tokio::task::JoinHandle<usize>>,
    done: CancellationToken,
    next_seq: Arc<AtomicI64>,
    inserting: CancellationToken,
    inserter: tokio::task::JoinHandle<()>,
}

impl Fleet {
    /// Starts the fleet on `db` (stream `s` of collection `c`), `extra` appended to every
    /// instance's configuration.
    pub async fn start(db: &str, clients: usize, extra: &str) -> Fleet {
        let coll = mongod::shared()
            .client()
            .await
            .database(db)
            .collection::<Document>("c");
        let mut instances: Vec<Instance> = (0..3).map(|_| Instance::new(db, extra)).collect();
        for instance in &mut instances {
            instance.start().await;
        }
        let lb = format!("127.0.0.1:{}", mongod::free_port());
        let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy.cfg");
        let mut haproxy = tokio::process::Command::new("haproxy");
        haproxy
            .args(["-db", "-f", cfg])
            .env("STREAMGATE_LB_BIND", &lb);
        for (i, instance) in instances.iter().enumerate() {
            haproxy.env(
                format!("STREAMGATE_{}", i + 1),
                format!("127.0.0.1:{}", instance.port),
            );
        }
        let haproxy = haproxy
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("haproxy is installed (Debian package haproxy; scripts/test installs it)");
        let ready = format!("http://{lb}/health/ready");
        eventually("haproxy forwards", WAIT, async || {
            reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200)
        })
        .await;

        let done = CancellationToken::new();
        let url = format!("http://{lb}/{db}/c/_streams/s");
        let seen: Vec<Arc<Mutex<Vec<i64>>>> = (0..clients).map(|_| Arc::default()).collect();
        let tasks = seen
            .iter()
            .map(|seen| tokio::spawn(fleet_client(url.clone(), Arc::clone(seen), done.clone())))
            .collect();
        // Every client has a position (the first change) before anything fails. Until then a
        // client may still be connecting: insert seq 0 only once all are attached.
        eventually("every client attached", WAIT, async || {
            let mut total = 0;
            for instance in &instances {
                total += instance
                    .metric("streamgate_clients{transport=\"sse\"}")
                    .await as usize;
            }
            total == clients
        })
        .await;
        coll.insert_one(doc! { "seq": 0_i64 }).await.unwrap();

        // Inserts flow from now until the last restart is over.
        let next_seq = Arc::new(AtomicI64::new(1));
        let inserting = CancellationToken::new();
        let inserter = tokio::spawn({
            let (coll, next_seq, inserting) =
                (coll.clone(), Arc::clone(&next_seq), inserting.clone());
            async move {
                while !inserting.is_cancelled() {
                    let seq = next_seq.fetch_add(1, Ordering::SeqCst);
                    coll.insert_one(doc! { "seq": seq }).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        let fleet = Fleet {
            instances,
            clients,
            coll,
            haproxy,
            seen,
            tasks,
            done,
            next_seq,
            inserting,
            inserter,
        };
        fleet
            .until_every_client_has(0, "every client has seq 0")
            .await;
        fleet.until_every_client_has(20, "inserts flowing").await;
        fleet
    }

    /// The seq the inserter writes next.
    pub fn next_seq(&self) -> i64 {
        self.next_seq.load(Ordering::SeqCst)
    }

    /// Waits until every client has seen `seq` (clients record changes in order, asserted in
    /// [`Fleet::finish`], so the last one tells).
    pub async fn until_every_client_has(&self, seq: i64, what: &str) {
        eventually(what, Duration::from_secs(60), async || {
            self.seen
                .iter()
                .all(|s| s.lock().unwrap().last().is_some_and(|last| *last >= seq))
        })
        .await;
    }

    /// Sends `signal` to instance `i` and waits until every client has a change inserted after
    /// it; prints and returns how long that took.
    pub async fn recover(&mut self, what: &str, i: usize, signal: &str) -> (ExitStatus, Duration) {
        let after = self.next_seq() + 1;
        let started = Instant::now();
        let status = self.instances[i].stop(signal).await;
        self.until_every_client_has(after, what).await;
        let took = started.elapsed();
        println!(
            "fleet ({} clients): {what}: every client had the next change after {took:?}",
            self.clients
        );
        (status, took)
    }

    /// Restarts the three instances one by one with SIGTERM (each one started again before
    /// the next stops), every client getting the next change after each; returns the times.
    pub async fn rolling_restart(&mut self) -> Vec<Duration> {
        let mut took = Vec::new();
        for i in 0..self.instances.len() {
            let what = format!("SIGTERM instance {} (rolling restart)", i + 1);
            let (status, recovered) = self.recover(&what, i, "-TERM").await;
            assert!(status.success(), "SIGTERM exits cleanly: {status}");
            took.push(recovered);
            self.instances[i].start().await;
        }
        took
    }

    /// Stops the inserts, waits until every client has every change and asserts each has them
    /// exactly once, in order; stops haproxy and the instances. Returns how many changes were
    /// written.
    pub async fn finish(mut self) -> i64 {
        self.inserting.cancel();
        (&mut self.inserter).await.unwrap();
        let last = self.next_seq() - 1;
        self.until_every_client_has(last, "every client has every change")
            .await;
        self.done.cancel();
        let mut reconnects = 0;
        for task in self.tasks.drain(..) {
            reconnects += task.await.unwrap() - 1;
        }
        let expected: Vec<i64> = (0..=last).collect();
        for (i, seen) in self.seen.iter().enumerate() {
            // Exactly once, in order: no gap, no duplicate.
            assert_eq!(*seen.lock().unwrap(), expected, "client {i}");
        }
        println!(
            "fleet ({} clients): {} changes each, {reconnects} reconnects in all",
            self.clients,
            last + 1
        );
        let _ = self.haproxy.kill().await;
        for instance in &mut self.instances {
            if instance.is_running() {
                let _ = instance.stop("-TERM").await;
            }
        }
        last + 1
    }
}
