//! What a scenario costs upstream (issue 8): change-stream cursors and connections on mongod,
//! and the server's own cursor counters.
//!
//! * Cursors: `$currentOp` with `idleCursors: true`, counting every cursor whose originating
//!   command (or, while it is being opened, whose own command) is an aggregate starting with
//!   `$changeStream`: the idle ones between two `getMore`s and the ones inside a `getMore`.
//! * Connections: `serverStatus` `connections.current` (the tool's own few included).
//! * Server: `streamgate_cursors_opened_total`, `streamgate_catchups_total`,
//!   `streamgate_catchups_joined_total`, `streamgate_lag_recoveries_total`,
//!   `streamgate_slow_consumers_total` from `/metrics`, when the server exports them.
//!
//! A [`Probe`] samples mongod every 500 ms during a scenario, so short-lived catch-up cursors
//! may slip between two samples; the server's counter does not miss them.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{Bson, Document, doc};
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The cursors counted in one `$currentOp` result.
pub fn count_change_stream_cursors(ops: &[Document]) -> u64 {
    let mut ids = HashSet::new();
    let mut opening = 0;
    for op in ops {
        let cursor = op.get_document("cursor").ok();
        let origin = cursor
            .and_then(|c| c.get_document("originatingCommand").ok())
            .or_else(|| op.get_document("originatingCommand").ok());
        if let Some(origin) = origin
            && opens_change_stream(origin)
        {
            match cursor.and_then(|c| c.get("cursorId")).and_then(as_i64) {
                Some(id) => {
                    ids.insert(id);
                }
                None => opening += 1,
            }
        } else if let Ok(command) = op.get_document("command")
            && opens_change_stream(command)
        {
            // The aggregate that opens the stream, still running: no cursor id yet.
            opening += 1;
        }
    }
    ids.len() as u64 + opening
}

/// Whether a command is an aggregate whose first stage is `$changeStream`.
fn opens_change_stream(command: &Document) -> bool {
    command.contains_key("aggregate")
        && command
            .get_array("pipeline")
            .ok()
            .and_then(|p| p.first())
            .and_then(Bson::as_document)
            .is_some_and(|stage| stage.contains_key("$changeStream"))
}

fn as_i64(value: &Bson) -> Option<i64> {
    match value {
        Bson::Int32(v) => Some(i64::from(*v)),
        Bson::Int64(v) => Some(*v),
        Bson::Double(v) => Some(*v as i64),
        _ => None,
    }
}

/// Change-stream cursors open on mongod now.
pub async fn change_stream_cursors(mongo: &mongodb::Client) -> Result<u64, String> {
    let pipeline = [doc! { "$currentOp": { "allUsers": true, "idleCursors": true } }];
    let ops: Vec<Document> = mongo
        .database("admin")
        .aggregate(pipeline)
        .await
        .map_err(|e| format!("$currentOp: {e}"))?
        .try_collect()
        .await
        .map_err(|e| format!("$currentOp: {e}"))?;
    Ok(count_change_stream_cursors(&ops))
}

/// mongod's `connections.current`.
pub async fn mongod_connections(mongo: &mongodb::Client) -> Result<u64, String> {
    let status = server_status(mongo).await?;
    status
        .get_document("connections")
        .ok()
        .and_then(|c| c.get("current"))
        .and_then(as_i64)
        .map(|n| n.max(0) as u64)
        .ok_or_else(|| "serverStatus has no connections.current".into())
}

/// mongod's `metrics.commands.getMore.total`: every idle change-stream cursor costs a `getMore`
/// per `maxAwaitTimeMS` and, while anything is written, one per wake-up, so this rate shows
/// what N cursors cost mongod.
pub async fn mongod_getmores(mongo: &mongodb::Client) -> Result<u64, String> {
    let status = server_status(mongo).await?;
    status
        .get_document("metrics")
        .and_then(|m| m.get_document("commands"))
        .and_then(|c| c.get_document("getMore"))
        .ok()
        .and_then(|g| g.get("total"))
        .and_then(as_i64)
        .map(|n| n.max(0) as u64)
        .ok_or_else(|| "serverStatus has no metrics.commands.getMore.total".into())
}

async fn server_status(mongo: &mongodb::Client) -> Result<Document, String> {
    mongo
        .database("admin")
        .run_command(doc! { "serverStatus": 1 })
        .await
        .map_err(|e| format!("serverStatus: {e}"))
}

/// The sum of every series of metric `name` in a Prometheus text exposition (`None` if the
/// metric is absent).
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // `name value` or `name{labels} value`, not a longer name sharing the prefix.
        let value = if let Some(labelled) = rest.strip_prefix('{') {
            labelled.rsplit_once('}').map(|(_, v)| v)
        } else if rest.starts_with(' ') {
            Some(rest)
        } else {
            None
        };
        if let Some(v) = value.and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()) {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// The server's counters at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerCounters {
    /// `streamgate_cursors_opened_total`.
    pub cursors_opened: Option<f64>,
    /// `streamgate_catchups_total`.
    pub catchups: Option<f64>,
    /// `streamgate_catchups_joined_total` (clients served by a catch-up another one opened).
    pub catchups_joined: Option<f64>,
    /// `streamgate_lag_recoveries_total` (clients lapped by the live channel, read on from
    /// the ring).
    pub lag_recoveries: Option<f64>,
    /// `streamgate_slow_consumers_total`.
    pub slow_consumers: Option<f64>,
    /// `streamgate_clients` (every transport).
    pub clients: Option<f64>,
}

impl ServerCounters {
    /// Reads `/metrics` of the server at `addr` (all `None` if it does not answer).
    pub async fn read(addr: SocketAddr) -> ServerCounters {
        let Some(text) = crate::env::http_body(addr, "/metrics").await else {
            return ServerCounters::default();
        };
        ServerCounters {
            cursors_opened: metric_sum(&text, "streamgate_cursors_opened_total"),
            catchups: metric_sum(&text, "streamgate_catchups_total"),
            catchups_joined: metric_sum(&text, "streamgate_catchups_joined_total"),
            lag_recoveries: metric_sum(&text, "streamgate_lag_recoveries_total"),
            slow_consumers: metric_sum(&text, "streamgate_slow_consumers_total"),
            clients: metric_sum(&text, "streamgate_clients"),
        }
    }
}

/// mongod and server readings at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    /// Change-stream cursors on mongod.
    pub cursors: Option<u64>,
    /// mongod connections.
    pub connections: Option<u64>,
    /// mongod's `getMore` commands so far.
    pub getmores: Option<u64>,
    /// When it was taken.
    pub at: Option<std::time::Instant>,
    /// The server's counters.
    pub server: ServerCounters,
}

impl Snapshot {
    /// Reads everything now.
    pub async fn take(mongo: &mongodb::Client, server: SocketAddr) -> Snapshot {
        Snapshot {
            cursors: change_stream_cursors(mongo).await.ok(),
            connections: mongod_connections(mongo).await.ok(),
            getmores: mongod_getmores(mongo).await.ok(),
            at: Some(std::time::Instant::now()),
            server: ServerCounters::read(server).await,
        }
    }
}

/// Highest readings of a [`Probe`].
#[derive(Debug, Clone, Copy, Default)]
struct Peaks {
    cursors: Option<u64>,
    connections: Option<u64>,
}

/// Samples mongod's cursors and connections in the background until [`Probe::finish`].
pub struct Probe {
    stop: CancellationToken,
    task: JoinHandle<Peaks>,
}

impl Probe {
    /// Starts sampling every 500 ms.
    pub fn start(mongo: &mongodb::Client) -> Probe {
        let stop = CancellationToken::new();
        let mongo = mongo.clone();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut peaks = Peaks::default();
            let max = |a: Option<u64>, b: Option<u64>| a.max(b);
            loop {
                peaks.cursors = max(peaks.cursors, change_stream_cursors(&mongo).await.ok());
                peaks.connections = max(peaks.connections, mongod_connections(&mongo).await.ok());
                tokio::select! {
                    _ = token.cancelled() => return peaks,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        });
        Probe { stop, task }
    }

    /// Stops sampling; the report from `before` (no client yet), the samples and `after`.
    pub async fn finish(self, before: &Snapshot, after: &Snapshot) -> Upstream {
        self.stop.cancel();
        let peaks = self.task.await.unwrap_or_default();
        let delta = |a: Option<f64>, b: Option<f64>| Some((b? - a.unwrap_or(0.0)).max(0.0) as u64);
        Upstream {
            cursors_before: before.cursors,
            cursors_peak: peaks.cursors.max(after.cursors),
            cursors_after: after.cursors,
            connections_before: before.connections,
            connections_peak: peaks.connections.max(after.connections),
            connections_after: after.connections,
            getmores_per_sec: match (before.getmores, after.getmores, before.at, after.at) {
                (Some(a), Some(b), Some(t0), Some(t1)) if t1 > t0 => {
                    Some(b.saturating_sub(a) as f64 / t1.duration_since(t0).as_secs_f64())
                }
                _ => None,
            },
            server_cursors_opened: delta(before.server.cursors_opened, after.server.cursors_opened),
            server_catchups: delta(before.server.catchups, after.server.catchups),
            server_catchups_joined: delta(
                before.server.catchups_joined,
                after.server.catchups_joined,
            ),
            server_lag_recoveries: delta(before.server.lag_recoveries, after.server.lag_recoveries),
            server_slow_consumers: delta(before.server.slow_consumers, after.server.slow_consumers),
        }
    }
}

/// What a scenario cost upstream.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Upstream {
    /// Change-stream cursors on mongod with the server up and no client yet (its definitions
    /// watcher; after a restart also the killed server's orphans).
    pub cursors_before: Option<u64>,
    /// Most change-stream cursors seen during the scenario.
    pub cursors_peak: Option<u64>,
    /// Change-stream cursors at the end, clients still connected.
    pub cursors_after: Option<u64>,
    /// mongod connections before, at most and at the end (the tool's own included).
    pub connections_before: Option<u64>,
    /// Most mongod connections seen.
    pub connections_peak: Option<u64>,
    /// mongod connections at the end.
    pub connections_after: Option<u64>,
    /// mongod `getMore` commands per second between the two snapshots (the tool's own
    /// `$currentOp` samples are aggregates, not `getMore`s).
    pub getmores_per_sec: Option<f64>,
    /// `streamgate_cursors_opened_total` increase over the scenario.
    pub server_cursors_opened: Option<u64>,
    /// `streamgate_catchups_total` increase.
    pub server_catchups: Option<u64>,
    /// `streamgate_catchups_joined_total` increase.
    pub server_catchups_joined: Option<u64>,
    /// `streamgate_lag_recoveries_total` increase.
    pub server_lag_recoveries: Option<u64>,
    /// `streamgate_slow_consumers_total` increase.
    pub server_slow_consumers: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change_stream() -> Document {
        doc! { "aggregate": "c", "pipeline": [ { "$changeStream": {} }, { "$match": { "x": 1 } } ] }
    }

    #[test]
    fn counts_idle_active_and_opening_change_stream_cursors_once() {
        let ops = vec![
            // Idle between two getMores.
            doc! { "type": "idleCursor",
            "cursor": { "cursorId": 11_i64, "originatingCommand": change_stream() } },
            // Inside a getMore.
            doc! { "type": "op", "command": { "getMore": 12_i64, "collection": "c" },
            "cursor": { "cursorId": 12_i64, "originatingCommand": change_stream() } },
            // The same cursor reported twice is one cursor.
            doc! { "type": "idleCursor",
            "cursor": { "cursorId": 12_i64, "originatingCommand": change_stream() } },
            // Being opened.
            doc! { "type": "op", "command": change_stream() },
            // Not change streams: a find cursor, the $currentOp itself, a plain op.
            doc! { "type": "idleCursor",
            "cursor": { "cursorId": 13_i64, "originatingCommand": { "find": "c" } } },
            doc! { "type": "op", "command": { "aggregate": 1, "pipeline": [ { "$currentOp": {} } ] } },
            doc! { "type": "op", "command": { "insert": "c" } },
        ];
        assert_eq!(count_change_stream_cursors(&ops), 3);
        assert_eq!(count_change_stream_cursors(&[]), 0);
    }

    #[test]
    fn sums_metric_series_by_exact_name() {
        let text = "# HELP streamgate_clients Connected clients by transport
# TYPE streamgate_clients gauge
streamgate_clients{transport=\"sse\"} 3
streamgate_clients{transport=\"websocket\"} 2
streamgate_cursors_opened_total 7
streamgate_cursors_opened_total_other 100
# EOF
";
        assert_eq!(metric_sum(text, "streamgate_clients"), Some(5.0));
        assert_eq!(
            metric_sum(text, "streamgate_cursors_opened_total"),
            Some(7.0)
        );
        assert_eq!(metric_sum(text, "streamgate_catchups_total"), None);
    }
}
