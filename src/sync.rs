//! Lock helpers: one way to take a std lock everywhere.
//!
//! A poisoned lock (a panic while it was held) is taken anyway: every critical section in
//! Streamgate leaves its data consistent between statements, and one panicking task must not
//! take the server down with it.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use tokio::sync::watch;

/// Locks a mutex, recovering from poisoning.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Read-locks a rwlock, recovering from poisoning.
pub fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Write-locks a rwlock, recovering from poisoning.
pub fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// Whether a watcher (the definitions store, the rules store) has loaded its collection and is
/// watching it: readiness and start-up wait on it.
#[derive(Debug)]
pub struct SyncFlag(watch::Sender<bool>);

impl Default for SyncFlag {
    fn default() -> Self {
        SyncFlag(watch::channel(false).0)
    }
}

impl SyncFlag {
    /// Marks the watcher loaded (`true`) or starting over (`false`).
    pub fn set(&self, synced: bool) {
        self.0.send_replace(synced);
    }

    /// Whether the watcher is currently loaded and watching.
    pub fn get(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until the watcher is loaded, at most `timeout`; returns whether it is.
    pub async fn wait(&self, timeout: Duration) -> bool {
        let mut synced = self.0.subscribe();
        matches!(
            tokio::time::timeout(timeout, synced.wait_for(|s| *s)).await,
            Ok(Ok(_))
        )
    }
}
