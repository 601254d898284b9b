//! A panic inside a server fails the test that caused it.
//!
//! Servers run in-process, on the test's runtime. A panic in a connection, worker or WebSocket
//! task is caught by tokio, printed, and otherwise ignored: the client just sees a closed
//! socket, and the test may well pass. So [`Watch::start`] installs (once) a panic hook that
//! records every panic against the live servers it belongs to, and `TestServer` turns a
//! non-empty record into a failure on `stop()` and on drop.
//!
//! Attribution, with tests running two at a time (`--test-threads=2`):
//! - `#[tokio::test]` runtimes are current-thread: every task a server spawns (`tokio::spawn`,
//!   task trackers, axum's WebSocket upgrade) runs on the thread of the test that started the
//!   server. A panic on a thread that started live servers is charged to those servers only.
//! - A panic on a thread of tokio's (`tokio-runtime-worker`: workers of a multi-thread runtime
//!   and `spawn_blocking`) or an unnamed helper thread cannot be told apart: it is charged to
//!   *every* live server. It may thus also fail the test running next to the guilty one, but it
//!   can never go unnoticed.
//! - A panic on any other named thread (libtest runs each test on a thread named after it)
//!   with no live server is the test's own failure (its server may be stopped already): it is
//!   charged to no one, so it cannot fail the test next to it.
//!
//! A panic of the test's own code (a failed assertion) while its server lives is recorded too,
//! but the test fails anyway and the check is skipped while the thread unwinds (a second panic
//! would abort).

use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::thread::ThreadId;

/// The panics charged to one server.
pub struct Watch {
    /// The thread that started the server (the test's thread).
    thread: ThreadId,
    panics: Mutex<Vec<String>>,
}

/// Every live server's watch; dead ones are pruned on registration.
fn live() -> &'static Mutex<Vec<Weak<Watch>>> {
    static LIVE: OnceLock<Mutex<Vec<Weak<Watch>>>> = OnceLock::new();
    LIVE.get_or_init(|| Mutex::new(Vec::new()))
}

/// Installs the recording hook once, in front of the default one (which still prints).
fn install() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let print = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            record(info);
            print(info);
        }));
    });
}

/// Charges a panic to the servers of the panicking thread, or to all when it is one of tokio's
/// or unnamed (see the module docs). Must not panic itself (that would abort), hence no
/// `unwrap` on the locks.
fn record(info: &std::panic::PanicHookInfo<'_>) {
    let current = std::thread::current();
    let payload = info
        .payload()
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| info.payload().downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".to_owned());
    let message = format!(
        "thread '{}' panicked at {}: {payload}",
        current.name().unwrap_or("<unnamed>"),
        info.location()
            .map(|l| l.to_string())
            .unwrap_or_else(|| "<unknown>".to_owned()),
    );
    let watches: Vec<Arc<Watch>> = live()
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    let own: Vec<&Arc<Watch>> = watches
        .iter()
        .filter(|w| w.thread == current.id())
        .collect();
    let anonymous = matches!(current.name(), None | Some("tokio-runtime-worker"));
    let charged = if own.is_empty() && anonymous {
        watches.iter().collect()
    } else {
        own
    };
    for watch in charged {
        watch
            .panics
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(message.clone());
    }
}

impl Watch {
    /// Starts recording panics for a server started on the current thread.
    pub fn start() -> Arc<Watch> {
        install();
        let watch = Arc::new(Watch {
            thread: std::thread::current().id(),
            panics: Mutex::new(Vec::new()),
        });
        let mut live = live().lock().unwrap_or_else(PoisonError::into_inner);
        live.retain(|w| w.strong_count() > 0);
        live.push(Arc::downgrade(&watch));
        watch
    }

    /// Fails the test if a panic was charged to this server (unless the thread is already
    /// unwinding from the test's own failure).
    pub fn check(&self) {
        if std::thread::panicking() {
            return;
        }
        let panics =
            std::mem::take(&mut *self.panics.lock().unwrap_or_else(PoisonError::into_inner));
        assert!(
            panics.is_empty(),
            "the server panicked during this test:\n{}",
            panics.join("\n")
        );
    }
}
