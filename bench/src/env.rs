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

/// Settings of a Streamgate started by the tool.
pub struct ServerSpec<'a> {
    /// The `streamgate` binary.
    pub bin: &'a Path,
    /// MongoDB URI.
    pub mongo_uri: &'a str,
    /// Database and collection watched by the one stream, named `all`.
    pub db: &'a str,
    /// Collection watched.
    pub coll: &'a str,
    /// `client_queue` (how far a client may lag); `ring_size` is this or 10,000, if larger.
    pub client_queue: usize,
    /// Directory for the config and log.
    pub dir: &'a Path,
    /// Extra environment for the server (e.g. `RUST_LOG`).
    pub env: &'a [(String, String)],
    /// Wrapper command (e.g. `valgrind --tool=callgrind`), empty for none.
    pub wrapper: &'a [String],
}

/// A Streamgate child process, terminated on drop.
pub struct Server {
    child: Child,
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
        let config = format!(
            "listen = \"{addr}\"\nmongo_uri = \"{}\"\nkeepalive_secs = 15\nclient_queue = {}\n\
             ring_size = {}\nworker_linger_ms = 3600000\n\n[[streams]]\ndb = \"{}\"\n\
             coll = \"{}\"\nname = \"all\"\n",
            spec.mongo_uri,
            spec.client_queue,
            spec.client_queue.max(10_000),
            spec.db,
            spec.coll
        );
        let config_path = spec.dir.join(format!("streamgate-{port}.toml"));
        std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
        let log = spec.dir.join(format!("streamgate-{port}.log"));
        let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let mut command = match spec.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(spec.bin);
                c
            }
            None => Command::new(spec.bin),
        };
        command
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
            .stderr(log_file);
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", spec.bin.display()))?;
        let mut server = Server { child, addr, log };
        let deadline = Instant::now() + ready_timeout;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!(
                    "streamgate exited ({status}); see {}",
                    server.log.display()
                ));
            }
            if http_status(addr, "/health/ready").await == Some(200) {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "streamgate not ready within {ready_timeout:?}; see {}",
                    server.log.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
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
