//! Shared test harness: real mongod replica sets, in-process servers, transport clients.
#![allow(dead_code)] // harness items are used by some test modules, not all

pub mod browser;
pub mod clients;
pub mod fixture;
pub mod fleet;
pub mod mongod;
pub mod nats;
pub mod panics;
pub mod server;

use std::sync::atomic::{AtomicUsize, Ordering};

/// Tests that measure this process's resident set size (the servers run in it) and tests that
/// allocate tens of megabytes (1-6 MB documents, large `put`s) take this lock in turn: one
/// test's allocations would otherwise read as another's growth.
pub async fn memory_heavy() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// This process's resident set size in bytes (the servers under test run in this process).
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS in /proc/self/status")
        * 1024
}

/// A database name unique to this test run and call.
pub fn unique_db(prefix: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `check` every 2 ms until it holds, panicking with `what` after `timeout`; returns how
/// long it took (the admin tests report propagation times with it).
pub async fn eventually(
    what: &str,
    timeout: std::time::Duration,
    mut check: impl AsyncFnMut() -> bool,
) -> std::time::Duration {
    let start = std::time::Instant::now();
    while !check().await {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    start.elapsed()
}
