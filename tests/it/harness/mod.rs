//! Shared test harness: real mongod replica sets, in-process servers, transport clients.
#![allow(dead_code)] // harness items are used by some test modules, not all

pub mod clients;
pub mod fixture;
pub mod mongod;
pub mod server;

use std::sync::atomic::{AtomicUsize, Ordering};

/// A database name unique to this test run and call.
pub fn unique_db(prefix: &str) -> String {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}
