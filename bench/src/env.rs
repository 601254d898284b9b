//! The environment of a run: a throw-away mongod replica set and a Streamgate child process
//! (or ones already running), the open-files limit, and /proc readings.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Raises the soft open-files limit to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
        limit.rlim_cur
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}

/// Resident set size of a process, KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS:")
}

/// Peak resident set size of a process, KiB.
pub fn hwm_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmHWM:")
}

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The 1-minute load average (other work on the machine skews every number).
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The kernel's `TcpExt ListenOverflows` counter (accept queue full: the connecting client
/// retransmits its SYN after 1 s).
pub fn listen_overflows() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let names = lines.next()?.split_whitespace();
    let values = lines.next()?.split_whitespace();
    names
        .zip(values)
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
}

/// CPU seconds (user + system) a process has used.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((utime + stime) / ticks)
}

/// A mongod started by `scripts/mongo-local`, stopped on drop.
pub struct Mongo {
    repo: PathBuf,
    dbpath: PathBuf,
    /// `mongodb://127.0.0.1:P/?replicaSet=rs0`.
    pub uri: String,
    /// mongod's pid (for CPU readings).
    pub pid: Option<u32>,
}

impl Mongo {
    /// Starts a fresh single-node replica set on a free port under `dir`.
    pub fn start(repo: &Path, dir: &Path, server_bin: &Path) -> Result<Mongo, String> {
        let port = free_port()?;
        let dbpath = dir.join("mongo");
        std::fs::create_dir_all(&dbpath).map_err(|e| e.to_string())?;
        eprintln!(
            "bench: starting mongod on 127.0.0.1:{port} (dbpath {})",
            dbpath.display()
        );
        let status = Command::new(repo.join("scripts/mongo-local"))
            .args(["--port", &port.to_string(), "--dbpath"])
            .arg(&dbpath)
            .env("STREAMGATE_BIN", server_bin)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status()
            .map_err(|e| format!("cannot run scripts/mongo-local: {e}"))?;
        let mongo = Mongo {
            repo: repo.to_owned(),
            pid: std::fs::read_to_string(dbpath.join("mongod.lock"))
                .ok()
                .and_then(|s| s.trim().parse().ok()),
            dbpath,
            uri: format!("mongodb://127.0.0.1:{port}/?replicaSet=rs0"),
        };
        if !status.success() {
            return Err(format!("scripts/mongo-local failed ({status})"));
        }
        Ok(mongo)
    }
}

impl Drop for Mongo {
    fn drop(&mut self) {
        let _ = Command::new(self.repo.join("scripts/mongo-local"))
            .arg("stop")
            .arg("--dbpath")
            .arg(&self.dbpath)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// One `[[streams]]` table of a generated config.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    /// Database watched.
    pub db: String,
    /// Collection watched.
    pub coll: String,
    /// Stream name.
    pub name: String,
    /// The `pipeline` value as TOML (an inline array), `None` for every change.
    pub pipeline_toml: Option<String>,
    /// More members of the definition, as TOML lines (`membership = false`).
    pub more_toml: Option<String>,
}

impl StreamSpec {
    /// A stream of every change to `db.coll`.
    pub fn all(db: &str, coll: &str, name: &str) -> StreamSpec {
        StreamSpec {
            db: db.to_owned(),
            coll: coll.to_owned(),
            name: name.to_owned(),
            pipeline_toml: None,
            more_toml: None,
        }
    }
}

/// Settings of a Streamgate started by the tool.
pub struct ServerSpec<'a> {
    /// The `streamgate` binary.
    pub bin: &'a Path,
    /// MongoDB URI.
    pub mongo_uri: &'a str,
    /// The streams defined in its config file.
    pub streams: &'a [StreamSpec],
    /// `Some(client_queue)`: the matrix's tuning (how far a client may lag; `ring_size` is this
    /// or 10,000, if larger; workers linger for an hour). `None`: the server's defaults.
    pub client_queue: Option<usize>,
    /// Directory for the config and log.
    pub dir: &'a Path,
    /// Extra environment for the server (e.g. `RUST_LOG`).
    pub env: &'a [(String, String)],
    /// Wrapper command (e.g. `valgrind --tool=callgrind`), empty for none.
    pub wrapper: &'a [String],
    /// `Some(nats_url)`: the relay tier (`[relay] nats_url`, docs/relay.md).
    pub relay_url: Option<&'a str>,
    /// More top-level TOML (e.g. an `[auth]` table), after the streams.
    pub more_toml: Option<&'a str>,
}

/// The config file for a server on `addr`: only what `spec` sets, defaults for the rest.
pub fn server_config(addr: SocketAddr, spec: &ServerSpec<'_>) -> String {
    let mut config = format!("listen = \"{addr}\"\nmongo_uri = \"{}\"\n", spec.mongo_uri);
    if let Some(queue) = spec.client_queue {
        config.push_str(&format!(
            "keepalive_secs = 15\nclient_queue = {queue}\nring_size = {}\n\
             worker_linger_ms = 3600000\n",
            queue.max(10_000)
        ));
    }
    for s in spec.streams {
        config.push_str(&format!(
            "\n[[streams]]\ndb = \"{}\"\ncoll = \"{}\"\nname = \"{}\"\n",
            s.db, s.coll, s.name
        ));
        if let Some(pipeline) = &s.pipeline_toml {
            config.push_str(&format!("pipeline = {pipeline}\n"));
        }
        if let Some(more) = &s.more_toml {
            config.push_str(more);
            config.push('\n');
        }
    }
    if let Some(url) = spec.relay_url {
        config.push_str(&format!("\n[relay]\nnats_url = \"{url}\"\n"));
    }
    if let Some(more) = spec.more_toml {
        config.push('\n');
        config.push_str(more);
        config.push('\n');
    }
    config
}

/// A `nats-server -js` for `--relay` runs (store and log in the run's directory), killed on
/// drop.
pub struct Nats {
    child: Child,
    /// `nats://127.0.0.1:P`.
    pub url: String,
}

impl Nats {
    /// Starts `bin` (`--nats-server`, `$NATS_SERVER`, else what `scripts/fetch-nats` prints)
    /// and waits until it accepts connections.
    pub fn start(repo: &Path, dir: &Path, bin: Option<&Path>) -> Result<Nats, String> {
        let bin = match bin {
            Some(bin) => bin.to_owned(),
            None => match std::env::var_os("NATS_SERVER").filter(|v| !v.is_empty()) {
                Some(bin) => PathBuf::from(bin),
                None => {
                    let out = Command::new(repo.join("scripts/fetch-nats"))
                        .stderr(Stdio::inherit())
                        .output()
                        .map_err(|e| format!("scripts/fetch-nats: {e}"))?;
                    if !out.status.success() {
                        return Err("scripts/fetch-nats failed".into());
                    }
                    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
                }
            },
        };
        let port = free_port()?;
        let store = dir.join("nats");
        let child = Command::new(&bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(&store)
            .arg("-l")
            .arg(dir.join("nats.log"))
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let nats = Nats {
            child,
            url: format!("nats://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err("nats-server did not listen within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("bench: nats-server -js on {}", nats.url);
        Ok(nats)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Streamgate child process, terminated on drop.
pub struct Server {
    child: Child,
    /// How to start it again (`restart`).
    command: Vec<std::ffi::OsString>,
    env: Vec<(String, String)>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its log file.
    pub log: PathBuf,
}

impl Server {
    /// Writes a config and starts the server; waits until `/health/ready` answers 200.
    pub async fn start(spec: &ServerSpec<'_>, ready_timeout: Duration) -> Result<Server, String> {
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let config_path = spec.dir.join(format!("streamgate-{port}.toml"));
        std::fs::write(&config_path, server_config(addr, spec)).map_err(|e| e.to_string())?;
        let log = spec.dir.join(format!("streamgate-{port}.log"));
        let mut command: Vec<std::ffi::OsString> = spec.wrapper.iter().map(|w| w.into()).collect();
        command.push(spec.bin.into());
        command.push("--config".into());
        command.push(config_path.into());
        let mut env = vec![("RUST_LOG".to_owned(), "warn".to_owned())];
        env.extend(spec.env.iter().cloned());
        let child = spawn(&command, &env, &log)?;
        let mut server = Server {
            child,
            command,
            env,
            addr,
            log,
        };
        server.wait_ready(ready_timeout).await?;
        Ok(server)
    }

    async fn wait_ready(&mut self, ready_timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + ready_timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "streamgate exited ({status}); see {}",
                    self.log.display()
                ));
            }
            if http_status(self.addr, "/health/ready").await == Some(200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "streamgate not ready within {ready_timeout:?}; see {}",
                    self.log.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL (no goodbye to clients, no cursor cleanup), and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again with the same config (same address) and waits until it is ready.
    pub async fn restart(&mut self, ready_timeout: Duration) -> Result<(), String> {
        self.kill();
        self.child = spawn(&self.command, &self.env, &self.log)?;
        self.wait_ready(ready_timeout).await
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `command` (program and arguments) with `env`, stdout and stderr appended to `log`.
fn spawn(
    command: &[std::ffi::OsString],
    env: &[(String, String)],
    log: &Path,
) -> Result<Child, String> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| "empty server command".to_owned())?;
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| e.to_string())?;
    Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
        .stderr(log_file)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", program.to_string_lossy()))
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(15));
    }
}

/// Status code of a plain `GET path` (no body read), `None` on any failure.
pub async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut buf = vec![0u8; 1024];
        let n = stream.read(&mut buf).await.ok()?;
        let line = std::str::from_utf8(&buf[..n]).ok()?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(3), attempt)
        .await
        .ok()
        .flatten()
}

/// Body of a plain `GET path` answered 200 (`Connection: close`, read to the end, at most
/// 8 MiB, within 5 s); `None` on any failure.
pub async fn http_body(addr: SocketAddr, path: &str) -> Option<String> {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut raw = Vec::new();
        (&mut stream)
            .take(8 << 20)
            .read_to_end(&mut raw)
            .await
            .ok()?;
        response_body(&raw)
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
}

/// The body of a complete HTTP/1.1 200 response (chunked or not).
fn response_body(raw: &[u8]) -> Option<String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(len) = response.parse(raw).ok()? else {
        return None;
    };
    if response.code != Some(200) {
        return None;
    }
    let chunked = response.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            && String::from_utf8_lossy(h.value)
                .to_ascii_lowercase()
                .contains("chunked")
    });
    let mut body = Vec::new();
    let mut state = if chunked {
        crate::parse::Chunked::Size
    } else {
        crate::parse::Chunked::Identity
    };
    let mut pos = 0;
    crate::parse::dechunk(&mut state, &raw[len..], &mut pos, &mut body).ok()?;
    String::from_utf8(body).ok()
}

/// One socket of `/proc/net/tcp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSocketInfo {
    /// Still open both ways (state `01`): the owner has not closed it.
    pub established: bool,
    /// Bytes in its send queue (written by the owner, not yet acknowledged by the peer).
    pub send_queue: u64,
}

/// The IPv4 socket from local port `local` to remote port `remote`, from the text of
/// `/proc/net/tcp`; `None` if no such socket exists any more.
pub fn tcp_socket(table: &str, local: u16, remote: u16) -> Option<TcpSocketInfo> {
    let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
    table.lines().skip(1).find_map(|line| {
        let mut fields = line.split_whitespace().skip(1);
        let (l, r, st, queues) = (
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
        );
        if port(l)? != local || port(r)? != remote {
            return None;
        }
        let tx = queues.split(':').next()?;
        Some(TcpSocketInfo {
            established: st == "01",
            send_queue: u64::from_str_radix(tx, 16).ok()?,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_sets_only_the_streams() {
        let streams = [
            StreamSpec::all("bench", "c1", "all"),
            StreamSpec {
                pipeline_toml: Some(
                    r#"[ { "$match" = { "fullDocument.owner" = { "$var" = "who" } } } ]"#.into(),
                ),
                ..StreamSpec::all("bench", "c2", "byowner")
            },
        ];
        let spec = ServerSpec {
            bin: Path::new("streamgate"),
            mongo_uri: "mongodb://127.0.0.1:1/?replicaSet=rs0",
            streams: &streams,
            client_queue: None,
            dir: Path::new("/tmp"),
            env: &[],
            wrapper: &[],
            relay_url: None,
            more_toml: None,
        };
        let text = server_config(([127, 0, 0, 1], 9).into(), &spec);
        let config: toml::Table = text.parse().expect("valid TOML");
        let keys: Vec<&str> = config.keys().map(String::as_str).collect();
        assert_eq!(keys, ["listen", "mongo_uri", "streams"]);
        let defined = config["streams"].as_array().expect("streams");
        assert_eq!(defined.len(), 2);
        assert_eq!(
            defined[1]["pipeline"][0]["$match"]["fullDocument.owner"]["$var"].as_str(),
            Some("who")
        );
        let tuned = server_config(
            ([127, 0, 0, 1], 9).into(),
            &ServerSpec {
                client_queue: Some(5000),
                ..spec
            },
        );
        let tuned: toml::Table = tuned.parse().expect("valid TOML");
        assert_eq!(tuned["client_queue"].as_integer(), Some(5000));
        assert_eq!(tuned["ring_size"].as_integer(), Some(10_000));
        let relayed = server_config(
            ([127, 0, 0, 1], 9).into(),
            &ServerSpec {
                relay_url: Some("nats://127.0.0.1:4222"),
                ..spec
            },
        );
        let relayed: toml::Table = relayed.parse().expect("valid TOML");
        assert_eq!(
            relayed["relay"]["nats_url"].as_str(),
            Some("nats://127.0.0.1:4222")
        );
        assert_eq!(relayed["streams"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn reads_bodies_plain_and_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(response_body(plain).as_deref(), Some("hello"));
        let chunked =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n";
        assert_eq!(response_body(chunked).as_deref(), Some("hello"));
        assert_eq!(response_body(b"HTTP/1.1 503 No\r\n\r\n"), None);
    }

    #[test]
    fn finds_a_connection_in_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:1F90 0100007F:C351 04 0001A000:00000000 01:00000010 00000000     0        0 0 1 0000000000000000 20 4 30 10 -1
";
        assert_eq!(
            tcp_socket(table, 8080, 50000),
            Some(TcpSocketInfo {
                established: true,
                send_queue: 0
            })
        );
        assert_eq!(
            tcp_socket(table, 8080, 50001),
            Some(TcpSocketInfo {
                established: false,
                send_queue: 0x1A000
            })
        );
        assert_eq!(tcp_socket(table, 8080, 50002), None);
    }
}
