//! Clients per transport and worker: the `clients` figures of the admin API's stream views.
//!
//! The worker counts its clients (it needs the total to know when it is idle) but not how they
//! are connected: transports are this layer's business, so the per-transport counts live here,
//! keyed by worker. A client is counted by a [`TransportCount`] made when its subscription
//! starts and dropped with its feed (or its slot of a multi-stream connection), however the
//! stream ends.
//!
//! One mutex over a small map, taken once per connect and disconnect (never per event); an
//! entry goes when its last client does, so the map holds only workers with clients.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::negotiate::Transport;
use crate::sync::lock;
use crate::worker::Worker;

/// A number per transport.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PerTransport {
    /// Server-Sent Events clients.
    pub sse: usize,
    /// WebSocket clients.
    pub websocket: usize,
    /// NDJSON clients.
    pub ndjson: usize,
}

impl PerTransport {
    /// The count for `transport`.
    pub fn get(&self, transport: Transport) -> usize {
        match transport {
            Transport::Sse => self.sse,
            Transport::WebSocket => self.websocket,
            Transport::Ndjson => self.ndjson,
        }
    }

    fn get_mut(&mut self, transport: Transport) -> &mut usize {
        match transport {
            Transport::Sse => &mut self.sse,
            Transport::WebSocket => &mut self.websocket,
            Transport::Ndjson => &mut self.ndjson,
        }
    }

    /// All transports together.
    pub fn total(&self) -> usize {
        self.sse + self.websocket + self.ndjson
    }

    /// Adds `other`'s counts to these (a stream's figures over its workers).
    pub fn add(&mut self, other: PerTransport) {
        for transport in Transport::ALL {
            *self.get_mut(transport) += other.get(transport);
        }
    }
}

/// The per-transport client counts of every worker with clients.
#[derive(Debug, Default)]
pub struct TransportClients {
    /// By worker address: stable and unique while a [`TransportCount`] holds the worker's
    /// `Arc`, and an entry is removed before its last count lets the worker go.
    by_worker: Mutex<HashMap<usize, PerTransport>>,
}

impl TransportClients {
    /// Counts a client of `worker` on `transport` until the returned count is dropped.
    pub fn count(self: &Arc<Self>, worker: &Arc<Worker>, transport: Transport) -> TransportCount {
        *lock(&self.by_worker)
            .entry(address(worker))
            .or_default()
            .get_mut(transport) += 1;
        TransportCount {
            clients: Arc::clone(self),
            worker: Arc::clone(worker),
            transport,
        }
    }

    /// `worker`'s clients per transport.
    pub fn of(&self, worker: &Arc<Worker>) -> PerTransport {
        lock(&self.by_worker)
            .get(&address(worker))
            .copied()
            .unwrap_or_default()
    }
}

fn address(worker: &Arc<Worker>) -> usize {
    Arc::as_ptr(worker) as usize
}

/// One client of a worker on a transport, counted in [`TransportClients`] for as long as it
/// lives.
#[must_use = "the client is uncounted as soon as the count is dropped"]
pub struct TransportCount {
    clients: Arc<TransportClients>,
    /// Held so the worker's address stays this worker's while it is a key.
    worker: Arc<Worker>,
    transport: Transport,
}

impl Drop for TransportCount {
    fn drop(&mut self) {
        let mut map = lock(&self.clients.by_worker);
        let key = address(&self.worker);
        if let Some(counts) = map.get_mut(&key) {
            let count = counts.get_mut(self.transport);
            *count = count.saturating_sub(1);
            if counts.total() == 0 {
                map.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::WorkerSettings;

    #[tokio::test]
    async fn counts_per_worker_and_transport_until_dropped() {
        let clients = Arc::new(TransportClients::default());
        let a = crate::worker::test_worker(WorkerSettings::default().ring_size).await;
        let b = crate::worker::test_worker(WorkerSettings::default().ring_size).await;
        let sse = clients.count(&a, Transport::Sse);
        let ws = clients.count(&a, Transport::WebSocket);
        let ws_b = clients.count(&b, Transport::WebSocket);
        let expected = PerTransport {
            sse: 1,
            websocket: 1,
            ndjson: 0,
        };
        assert_eq!(clients.of(&a), expected);
        assert_eq!(clients.of(&b).total(), 1);
        drop((sse, ws));
        assert_eq!(clients.of(&a), PerTransport::default());
        // The entry goes with its last client: the map holds only workers with clients.
        assert_eq!(lock(&clients.by_worker).len(), 1);
        drop(ws_b);
        assert!(lock(&clients.by_worker).is_empty());
    }
}
