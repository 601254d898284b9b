//! A real `nats-server -js` for the relay tests: one per test that needs it, on a free
//! loopback port with its JetStream store in a temp dir, killed when dropped (and, like
//! every mongod, when the test process dies: it is spawned by the same PDEATHSIG spawner).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::mongod::{free_port, spawn_child};

/// Path of the nats-server binary: `$NATS_SERVER`, or whatever `scripts/fetch-nats` finds or
/// downloads (once, into `.cache/`).
pub fn nats_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            if let Ok(path) = std::env::var("NATS_SERVER")
                && !path.is_empty()
            {
                return PathBuf::from(path);
            }
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-nats");
            let output = Command::new(&script)
                .stderr(Stdio::inherit())
                .output()
                .expect("run scripts/fetch-nats");
            assert!(output.status.success(), "scripts/fetch-nats failed");
            PathBuf::from(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        })
        .clone()
}

/// A running `nats-server -js`.
pub struct NatsServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl NatsServer {
    /// Starts a JetStream server and waits until it accepts connections.
    pub fn start() -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("streamgate-nats-")
            .tempdir()
            .expect("tempdir");
        let mut server = NatsServer {
            port: free_port(),
            dir,
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let args = vec![
            nats_binary().display().to_string(),
            "-js".into(),
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            self.port.to_string(),
            "-sd".into(),
            self.dir.path().display().to_string(),
            "-l".into(),
            self.dir.path().join("nats.log").display().to_string(),
        ];
        self.child = Some(spawn_child(args).expect("spawn nats-server"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen in 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILLs the server.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
