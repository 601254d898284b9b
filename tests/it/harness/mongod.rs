//! Real `mongod` replica sets for tests: one shared per test binary, or dedicated ones for
//! tests that kill and restart the server.
//!
//! Every mongod is spawned by one long-lived "spawner" thread with `PR_SET_PDEATHSIG`, so the
//! kernel kills it when the test process exits, however it exits: no stray servers.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use futures::StreamExt;
use mongodb::bson::{Document, doc};

/// A running single-node replica set.
pub struct MongoD {
    port: u16,
    dir: PathBuf,
    child: Mutex<Option<Child>>,
    _tempdir: Option<tempfile::TempDir>,
}

type SpawnRequest = (Vec<String>, mpsc::Sender<std::io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::spawn(move || {
            // Lives as long as the process: children die with it (PDEATHSIG fires when the
            // spawning *thread* ends).
            for (args, reply) in rx {
                let mut command = Command::new(&args[0]);
                command
                    .args(&args[1..])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                use std::os::unix::process::CommandExt;
                // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
                unsafe {
                    command.pre_exec(|| {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                let _ = reply.send(command.spawn());
            }
        });
        Mutex::new(tx)
    })
}

/// Spawns `args` (program first) from the spawner thread, so that the child dies with the
/// test process.
pub fn spawn_child(args: Vec<String>) -> std::io::Result<Child> {
    let (tx, rx) = mpsc::channel();
    spawner()
        .lock()
        .unwrap()
        .send((args, tx))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}

/// Path of the mongod binary: `$MONGOD`, or whatever `scripts/fetch-mongod` finds/downloads.
pub fn mongod_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            if let Ok(path) = std::env::var("MONGOD")
                && !path.is_empty()
            {
                return PathBuf::from(path);
            }
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-mongod");
            let output = Command::new(&script)
                .stderr(Stdio::inherit())
                .output()
                .expect("run scripts/fetch-mongod");
            assert!(output.status.success(), "scripts/fetch-mongod failed");
            PathBuf::from(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        })
        .clone()
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The replica set shared by every test of this binary (each test uses its own database).
pub fn shared() -> &'static MongoD {
    static SHARED: OnceLock<MongoD> = OnceLock::new();
    SHARED.get_or_init(|| {
        sweep_stale_dirs();
        MongoD::start()
    })
}

/// Removes data directories that earlier test runs left behind: the shared mongod lives in a
/// static that is never dropped, and a killed run drops nothing. A directory goes only when
/// its mongod is gone (the pid in `mongod.lock` is empty or dead) and it is older than ten
/// minutes, so another run's live or starting mongod is never touched.
fn sweep_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let stale_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("streamgate-mongod-"));
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(600));
        if !stale_name || !old {
            continue;
        }
        let Ok(lock) = std::fs::read_to_string(path.join("mongod.lock")) else {
            continue;
        };
        let alive = lock
            .trim()
            .parse::<u32>()
            .is_ok_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

impl MongoD {
    /// Starts a dedicated single-node replica set in a temp dir and waits until it is primary.
    pub fn start() -> MongoD {
        let tempdir = tempfile::Builder::new()
            .prefix("streamgate-mongod-")
            .tempdir()
            .expect("tempdir");
        let mongod = MongoD {
            port: free_port(),
            dir: tempdir.path().to_owned(),
            child: Mutex::new(None),
            _tempdir: Some(tempdir),
        };
        mongod.spawn();
        mongod.initiate();
        mongod
    }

    fn spawn(&self) {
        let args = vec![
            mongod_binary().display().to_string(),
            "--replSet".into(),
            "rs0".into(),
            "--bind_ip".into(),
            "127.0.0.1".into(),
            "--port".into(),
            self.port.to_string(),
            "--dbpath".into(),
            self.dir.display().to_string(),
            "--logpath".into(),
            self.dir.join("mongod.log").display().to_string(),
            "--oplogSize".into(),
            "128".into(),
            "--wiredTigerCacheSizeGB".into(),
            "0.25".into(),
            "--setParameter".into(),
            "diagnosticDataCollectionEnabled=false".into(),
            // Small journal files, not three preallocated 100 MB ones per test mongod.
            "--wiredTigerEngineConfigString".into(),
            "log=(prealloc=false,file_max=20MB)".into(),
        ];
        let child = spawn_child(args).expect("spawn mongod");
        *self.child.lock().unwrap() = Some(child);
    }

    fn initiate(&self) {
        let uri = format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port);
        let host = format!("127.0.0.1:{}", self.port);
        // Run on a private runtime: callers may be inside another runtime.
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(streamgate::replset::initiate(
                    &uri,
                    "rs0",
                    &host,
                    Duration::from_secs(60),
                ))
        })
        .join()
        .unwrap()
        .expect("initiate replica set");
    }

    /// `mongodb://127.0.0.1:<port>/?replicaSet=rs0`.
    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?replicaSet=rs0", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A driver client for test setup and inserts (call inside the test's runtime).
    pub async fn client(&self) -> mongodb::Client {
        let mut options = mongodb::options::ClientOptions::parse(self.uri())
            .await
            .unwrap();
        options.heartbeat_freq = Some(Duration::from_millis(500));
        options.server_selection_timeout = Some(Duration::from_secs(30));
        mongodb::Client::with_options(options).unwrap()
    }

    /// SIGKILLs the server (no clean shutdown).
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and data, and waits until it is primary.
    pub fn restart(&self) {
        self.kill();
        self.spawn();
        self.initiate();
    }

    /// [`MongoD::kill`] off the async runtime's threads; gives the server back.
    pub async fn killed(self) -> MongoD {
        self.off_runtime(MongoD::kill).await
    }

    /// [`MongoD::restart`] off the async runtime's threads; gives the server back.
    pub async fn restarted(self) -> MongoD {
        self.off_runtime(MongoD::restart).await
    }

    /// Runs the blocking `step` on a blocking thread, so the runtime's tasks (the server under
    /// test) keep running meanwhile.
    async fn off_runtime(self, step: fn(&MongoD)) -> MongoD {
        tokio::task::spawn_blocking(move || {
            step(&self);
            self
        })
        .await
        .unwrap()
    }
}

impl Drop for MongoD {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Change-stream cursors MongoDB holds open on `db.coll`, from `$currentOp`: the collection's
/// own, or its database's shared feed (`ns: "<db>.$cmd"`).
pub async fn change_stream_cursors(mongo: &mongodb::Client, db: &str, coll: &str) -> usize {
    let ns = doc! { "$in": [format!("{db}.{coll}"), format!("{db}.$cmd")] };
    cursors_on(mongo, ns.into()).await
}

/// Change-stream cursors MongoDB holds open on any collection of `db`, or on `db` itself.
pub async fn database_change_stream_cursors(mongo: &mongodb::Client, db: &str) -> usize {
    let ns = doc! { "$regex": format!("^{}\\.", regex_escape(db)) };
    cursors_on(mongo, ns.into()).await
}

fn regex_escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escape = !c.is_ascii_alphanumeric() && c != '_';
            escape.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

/// Change-stream cursors (`$currentOp`) whose `ns` matches `ns`.
async fn cursors_on(mongo: &mongodb::Client, ns: mongodb::bson::Bson) -> usize {
    let pipeline = vec![
        doc! { "$currentOp": { "idleCursors": true, "allUsers": true } },
        doc! { "$match": {
            "ns": ns,
            "cursor.originatingCommand.pipeline.0.$changeStream": { "$exists": true },
        } },
    ];
    let ops: Vec<Document> = mongo
        .database("admin")
        .aggregate(pipeline)
        .await
        .unwrap()
        .map(|d| d.unwrap())
        .collect()
        .await;
    let mut ids: Vec<i64> = ops
        .iter()
        .filter_map(|op| op.get_document("cursor").ok()?.get_i64("cursorId").ok())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids.len()
}
