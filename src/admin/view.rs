//! JSON views of streams: the definition as given, where it came from, and live stats.
//!
//! Stats are read from the stream's running workers (one per distinct set of variable values)
//! without stopping them: every counter is an atomic, so a GET never slows a cursor.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use mongodb::bson::DateTime;
use serde::de::{Deserializer, IgnoredAny};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::http::clients::{PerTransport, TransportClients};
use crate::http::negotiate::Transport;
use crate::streams::{Origin, StreamDefinition, StreamEntry};
use crate::worker::{Worker, WorkerState};

/// A stream as `GET` shows it and as a `PUT` body takes it back: where it is served, the
/// definition's own members (flattened: `pipeline`, `fullDocument`, …, `match`), and read-only
/// members. Serde accepts the read-only members with any value on input and drops them, so a
/// GET response can be edited and sent back; anything else on input is the definition's.
///
/// `D` is the definition: [`StreamDefinition`] on output; on input the members are first
/// collected as JSON (`serde_json::Map`) and then deserialized on their own, so that errors
/// keep their path (`fullDocument`, `pipeline[0]`), which serde loses inside `flatten`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamView<D = StreamDefinition> {
    /// Database watched; on input it must equal the URL's or be left out.
    #[serde(default)]
    pub db: Option<String>,
    /// Collection watched; on input it must equal the URL's or be left out.
    #[serde(default)]
    pub coll: Option<String>,
    /// Stream name; on input it must equal the URL's or be left out.
    #[serde(default)]
    pub name: Option<String>,
    /// Where clients subscribe (read-only).
    #[serde(default, deserialize_with = "read_only")]
    pub path: String,
    /// The definition's members.
    #[serde(flatten)]
    pub definition: D,
    /// `static` (config file) or `stored` (admin API) (read-only).
    #[serde(default, deserialize_with = "read_only")]
    pub origin: &'static str,
    /// True for static definitions, which PUT and DELETE refuse (read-only).
    #[serde(default, deserialize_with = "read_only")]
    pub read_only: bool,
    /// Changes whenever this instance applies a different definition (read-only).
    #[serde(default, deserialize_with = "read_only")]
    pub revision: u64,
    /// Names of the pipeline's `$var` placeholders (read-only).
    #[serde(default, deserialize_with = "read_only")]
    pub variables: Vec<String>,
    /// Live stats of the stream's workers (read-only).
    #[serde(default, deserialize_with = "read_only")]
    pub stats: Value,
    /// What does not work as the definition asks, and how to fix it: membership (PROTOCOL.md
    /// §10) that is partial, or a collection without pre-images (read-only).
    #[serde(
        default,
        deserialize_with = "read_only",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub warnings: Vec<String>,
}

/// Takes a read-only member's value, whatever it is, and keeps the default.
fn read_only<'de, D: Deserializer<'de>, T: Default>(input: D) -> Result<T, D::Error> {
    IgnoredAny::deserialize(input)?;
    Ok(T::default())
}

/// The full view of a stream: `db`, `coll`, `name`, the definition members, and `stats`.
pub fn stream(
    entry: &StreamEntry,
    workers: &[Arc<Worker>],
    clients: &TransportClients,
) -> StreamView {
    let mut definition = entry.definition.source.clone();
    // A definition without stages shows `[]`, whichever way it was written.
    if definition.pipeline.is_null() {
        definition.pipeline = Value::Array(Vec::new());
    }
    StreamView {
        db: Some(entry.key.db.clone()),
        coll: Some(entry.key.coll.clone()),
        name: Some(entry.key.name.clone()),
        path: entry.key.to_string(),
        definition,
        origin: match entry.origin {
            Origin::Static => "static",
            Origin::Stored => "stored",
        },
        read_only: entry.origin == Origin::Static,
        revision: entry.revision,
        variables: entry
            .definition
            .variable_names()
            .map(str::to_owned)
            .collect(),
        stats: stats(workers, clients),
        warnings: warnings(entry, workers),
    }
}

/// The definition's membership note and the workers' pre-image warnings, each once.
fn warnings(entry: &StreamEntry, workers: &[Arc<Worker>]) -> Vec<String> {
    let mut warnings: Vec<String> = entry
        .definition
        .membership_note()
        .map(str::to_owned)
        .into_iter()
        .collect();
    for warning in workers.iter().filter_map(|w| w.pre_images_warning()) {
        if !warnings.iter().any(|w| w == warning) {
            warnings.push(warning.to_owned());
        }
    }
    warnings
}

/// Aggregate stats over `workers`, plus one entry per worker; client counts per transport
/// from `by_transport`.
fn stats(workers: &[Arc<Worker>], by_transport: &TransportClients) -> Value {
    let mut clients = PerTransport::default();
    let (mut received, mut delivered, mut bytes, mut last_ms) = (0u64, 0u64, 0u64, 0u64);
    // The freshest position among running workers (positions are per cursor; with several
    // workers "current position" means the latest one seen).
    let mut position: Option<String> = None;
    let mut per_worker = Vec::with_capacity(workers.len());
    let now = crate::metrics::now_ms();
    // The worst lag of the running workers (`null` without any).
    let mut lag: Option<f64> = None;
    for worker in workers {
        let w_lag = (worker.state() != WorkerState::Stopped).then(|| worker.lag_seconds(now));
        if let Some(l) = w_lag {
            lag = Some(lag.map_or(l, |worst| worst.max(l)));
        }
        let worker_clients = by_transport.of(worker);
        clients.add(worker_clients);
        let stats = &worker.stats;
        let w_received = stats.events.load(Ordering::Relaxed);
        let w_delivered = stats.delivered.load(Ordering::Relaxed);
        let w_bytes = stats.delivered_bytes.load(Ordering::Relaxed);
        let w_last = stats.last_event_ms.load(Ordering::Relaxed);
        received += w_received;
        delivered += w_delivered;
        bytes += w_bytes;
        last_ms = last_ms.max(w_last);
        let w_position = worker.position().map(|t| t.to_string());
        if let Some(p) = &w_position
            && position.as_ref().is_none_or(|current| p > current)
        {
            position = Some(p.clone());
        }
        per_worker.push(json!({
            "vars": serde_json::from_str::<Value>(&worker.key.vars).unwrap_or(Value::Null),
            "revision": worker.key.revision,
            "state": worker.state().as_str(),
            "clients": clients_json(worker_clients),
            "eventsReceived": w_received,
            "eventsDelivered": w_delivered,
            "bytesDelivered": w_bytes,
            "lastEventAt": timestamp(w_last),
            "position": w_position,
            "cursorsOpened": stats.cursors_opened.load(Ordering::Relaxed),
            "databaseFeed": stats.on_database_feed.load(Ordering::Relaxed),
            "lagSeconds": w_lag,
        }));
    }
    json!({
        "state": aggregate_state(workers.iter().map(|w| w.state())),
        "clients": clients_json(clients),
        "eventsReceived": received,
        "eventsDelivered": delivered,
        "bytesDelivered": bytes,
        "lastEventAt": timestamp(last_ms),
        "position": position,
        "lagSeconds": lag,
        "workers": per_worker,
    })
}

/// `running` if any worker runs, else `retrying`, else `starting`; `idle` without workers.
fn aggregate_state(states: impl Iterator<Item = WorkerState>) -> &'static str {
    states
        .filter(|s| *s != WorkerState::Stopped)
        .max_by_key(|s| match s {
            WorkerState::Running => 3,
            WorkerState::Retrying => 2,
            WorkerState::Starting => 1,
            WorkerState::Stopped => 0,
        })
        .map_or("idle", WorkerState::as_str)
}

fn clients_json(counts: PerTransport) -> Value {
    let mut object = serde_json::Map::new();
    for transport in Transport::ALL {
        object.insert(
            transport.as_str().to_owned(),
            Value::from(counts.get(transport)),
        );
    }
    object.insert("total".into(), Value::from(counts.total()));
    Value::Object(object)
}

/// Unix milliseconds as RFC 3339, `null` for 0 (never).
fn timestamp(ms: u64) -> Value {
    if ms == 0 {
        return Value::Null;
    }
    i64::try_from(ms)
        .ok()
        .and_then(|ms| DateTime::from_millis(ms).try_to_rfc3339_string().ok())
        .map_or(Value::Null, Value::String)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_prefers_running_and_is_idle_without_workers() {
        assert_eq!(aggregate_state(std::iter::empty()), "idle");
        assert_eq!(
            aggregate_state([WorkerState::Retrying, WorkerState::Running].into_iter()),
            "running"
        );
        assert_eq!(
            aggregate_state([WorkerState::Stopped, WorkerState::Retrying].into_iter()),
            "retrying"
        );
        assert_eq!(aggregate_state([WorkerState::Stopped].into_iter()), "idle");
    }

    #[test]
    fn clients_by_transport_and_total() {
        assert_eq!(
            clients_json(PerTransport {
                sse: 1,
                websocket: 2,
                ndjson: 3
            }),
            json!({"sse": 1, "websocket": 2, "ndjson": 3, "total": 6})
        );
    }

    #[test]
    fn timestamps_are_rfc3339_or_null() {
        assert_eq!(timestamp(0), Value::Null);
        assert_eq!(timestamp(1_000), json!("1970-01-01T00:00:01Z"));
    }
}
