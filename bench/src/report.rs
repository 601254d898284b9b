//! Results of a scenario: computed from the clients' results and histograms, printed as a
//! human table or JSON.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::client::ClientResult;
use crate::upstream::Upstream;

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// 50th percentile.
    pub p50: f64,
    /// 90th.
    pub p90: f64,
    /// 99th.
    pub p99: f64,
    /// 99.9th.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
}

impl Percentiles {
    /// From a histogram of microseconds.
    pub fn from_us(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |v: u64| v as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// Everything measured in one scenario.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Scenario label.
    pub scenario: String,
    /// `live` or `catchup`.
    pub mode: String,
    /// Transport (`sse`, `ws`, `ndjson`, `mixed`).
    pub transport: String,
    /// Clients asked for.
    pub clients: usize,
    /// Clients whose handshake completed.
    pub connected: usize,
    /// Documents inserted.
    pub docs: u64,
    /// Target insert rate (0 = as fast as possible).
    pub rate: f64,
    /// Achieved insert rate, docs/s.
    pub insert_rate: f64,
    /// Handshake times, ms.
    pub connect_ms: Percentiles,
    /// Accept-queue overflows (machine-wide) during the connect phase.
    pub listen_overflows: Option<u64>,
    /// Seconds to connect every client.
    pub connect_all_secs: f64,
    /// End-to-end latency (receive − sentAt), ms.
    pub latency_ms: Percentiles,
    /// Events delivered (sum over clients, duplicates included).
    pub deliveries: u64,
    /// docs × connected clients.
    pub expected_deliveries: u64,
    /// Deliveries per second, first insert → last delivery.
    pub deliveries_per_sec: f64,
    /// Expected events never received (sum over clients).
    pub lost: u64,
    /// Clients that missed at least one event.
    pub clients_with_loss: usize,
    /// Duplicate events (sum over clients).
    pub duplicates: u64,
    /// Out-of-order events (sum over clients).
    pub order_violations: u64,
    /// Fewest / most events a client received.
    pub min_received: u64,
    /// Most events a client received.
    pub max_received: u64,
    /// Why clients ended early: reason → count.
    pub client_errors: BTreeMap<String, usize>,
    /// Server RSS before the clients connected, KiB.
    pub server_rss_base_kib: Option<u64>,
    /// Server RSS with every client connected and idle, KiB.
    pub server_rss_connected_kib: Option<u64>,
    /// (connected − base) / connected clients, KiB.
    pub server_rss_per_client_kib: Option<f64>,
    /// Server peak RSS at the end, KiB.
    pub server_rss_peak_kib: Option<u64>,
    /// Server CPU use while events flowed, % of one core.
    pub server_cpu_pct: Option<f64>,
    /// mongod CPU use while events flowed, % of one core.
    pub mongod_cpu_pct: Option<f64>,
    /// This tool's CPU use while events flowed, % of one core.
    pub bench_cpu_pct: Option<f64>,
    /// Server CPU time while events flowed, per delivery, µs (issue 21).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_us_per_delivery: Option<f64>,
    /// Bytes the clients received while events flowed, per delivery (framing, envelope and
    /// id included; issue 21).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_per_delivery: Option<f64>,
    /// Longest change id a client received, bytes (`/_streams`: the composite position).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_id_len: Option<usize>,
    /// Seconds from first insert to last delivery.
    pub delivery_secs: f64,
    /// 1-minute load average before and after the scenario.
    pub loadavg: [f64; 2],
    /// Catch-up mode: events/s a resuming client received.
    pub catch_up_events_per_sec: Option<f64>,
    /// Catch-up mode: ms until the first event arrived.
    pub catch_up_first_event_ms: Option<f64>,
    /// Clients closed with an `error` event `slow_consumer`.
    pub slow_consumer_cuts: usize,
    /// Events clients received that belonged to another client's binding (must be 0).
    pub other_bindings: u64,
    /// Run with `--relay` (the servers read through NATS JetStream).
    pub relay: bool,
    /// Change-stream cursors on mongod with every client attached (live runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mongod_cursors: Option<u64>,
    /// mongod's open connections at the same moment (the tool's own few included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mongod_connections: Option<u64>,
    /// Issue 8 scenarios: change-stream cursors and connections on mongod, server counters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Upstream>,
    /// `streams`: cold subscribes made while the scenario's workers ran, ms to the response head.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cold_subscribe_ms: Option<Percentiles>,
    /// `streams`: cold subscribes that failed or timed out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cold_failed: Option<usize>,
    /// `restart-storm`: seconds from SIGKILL until the restarted server was ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_secs: Option<f64>,
    /// `restart-storm`: seconds from the first reconnect until every client had every event
    /// (or the scenario gave up).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub complete_secs: Option<f64>,
    /// `noisy`: what the abusive party did (actions, refusals, bytes read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abuser: Option<String>,
    /// `stall`: what happened to the client that stopped reading.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stall: Option<Stall>,
}

/// The fate of a client that stopped reading (`stall` scenario).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stall {
    /// How long the tool waited at most, seconds.
    pub bound_secs: f64,
    /// Seconds until the server's socket left ESTABLISHED (closed by the server), if it did.
    pub socket_closed_secs: Option<f64>,
    /// Seconds until the server stopped counting the client in `streamgate_clients`, if it did.
    pub client_gone_secs: Option<f64>,
    /// Bytes the server had queued in its socket's send buffer at the last reading.
    pub server_send_queue: Option<u64>,
    /// Server RSS when the client stalled, KiB.
    pub rss_start_kib: Option<u64>,
    /// Most server RSS while it was stalled, KiB.
    pub rss_max_kib: Option<u64>,
    /// Events inserted meanwhile.
    pub events: u64,
}

impl Report {
    /// Fills the per-client aggregates.
    pub fn add_clients(&mut self, results: &[ClientResult], docs: u64) {
        let mut connect = crate::client::histogram();
        self.min_received = u64::MAX;
        for r in results {
            if let Some(us) = r.connect_us {
                let _ = connect.record(us.max(1));
            }
            self.lost += r.lost;
            self.clients_with_loss += usize::from(r.lost > 0);
            self.duplicates += r.duplicates;
            self.order_violations += r.order_violations;
            self.min_received = self.min_received.min(r.received);
            self.max_received = self.max_received.max(r.received);
            self.other_bindings += r.other_bindings;
            if let Some(e) = &r.error {
                let class = error_class(e);
                self.slow_consumer_cuts += usize::from(class.contains("slow_consumer"));
                *self.client_errors.entry(class).or_default() += 1;
            }
        }
        if results.is_empty() {
            self.min_received = 0;
        }
        self.connect_ms = Percentiles::from_us(&connect);
        self.expected_deliveries = docs * self.connected as u64;
    }

    /// A human-readable summary of one scenario.
    pub fn print_human(&self) {
        let l = &self.latency_ms;
        let c = &self.connect_ms;
        println!("== {} ==", self.scenario);
        println!(
            "clients        {} {} ({} connected in {:.2} s; handshake p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms)",
            self.clients,
            self.transport,
            self.connected,
            self.connect_all_secs,
            c.p50,
            c.p99,
            c.max
        );
        if let Some(n) = self.listen_overflows.filter(|n| *n > 0) {
            println!("               {n} accept-queue overflows (SYN retried after 1 s)");
        }
        println!(
            "inserts        {} docs, target {} /s, achieved {:.0} /s",
            self.docs,
            if self.rate > 0.0 {
                format!("{}", self.rate)
            } else {
                "max".into()
            },
            self.insert_rate
        );
        if let Some(cursors) = self.mongod_cursors {
            let connections = self
                .mongod_connections
                .map(|n| format!(", {n} connections"))
                .unwrap_or_default();
            println!(
                "mongod         {cursors} change-stream cursors{connections} with every client \
                 attached (relay {})",
                if self.relay { "on" } else { "off" }
            );
        }
        println!(
            "latency ms     p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}  (mean {:.2}, n={})",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean, l.count
        );
        println!(
            "deliveries     {} of {} in {:.2} s = {:.0} /s",
            self.deliveries, self.expected_deliveries, self.delivery_secs, self.deliveries_per_sec
        );
        println!(
            "per client     lost {} ({} clients), duplicates {}, order violations {}, received min {} max {}",
            self.lost,
            self.clients_with_loss,
            self.duplicates,
            self.order_violations,
            self.min_received,
            self.max_received
        );
        if !self.client_errors.is_empty() {
            println!("client errors  {:?}", self.client_errors);
        }
        if let (Some(base), Some(conn)) = (self.server_rss_base_kib, self.server_rss_connected_kib)
        {
            println!(
                "server RSS     {} KiB idle → {} KiB connected = {:.2} KiB/client (peak {} KiB)",
                base,
                conn,
                self.server_rss_per_client_kib.unwrap_or(0.0),
                self.server_rss_peak_kib.unwrap_or(0)
            );
        }
        println!(
            "CPU (% core)   server {}  mongod {}  bench {}  (load average {:.1} → {:.1})",
            pct(self.server_cpu_pct),
            pct(self.mongod_cpu_pct),
            pct(self.bench_cpu_pct),
            self.loadavg[0],
            self.loadavg[1]
        );
        if let Some(bytes) = self.bytes_per_delivery {
            println!(
                "per delivery   {bytes:.0} bytes on the wire, server CPU {}, longest id {} bytes",
                self.server_cpu_us_per_delivery
                    .map_or("-".into(), |us| format!("{us:.2} µs")),
                self.max_id_len.unwrap_or(0)
            );
        }
        self.print_upstream();
        if let Some(rate) = self.catch_up_events_per_sec {
            println!(
                "catch-up       {:.0} events/s (first event after {:.1} ms)",
                rate,
                self.catch_up_first_event_ms.unwrap_or(0.0)
            );
        }
        println!();
    }
}

impl Report {
    /// The issue-8 lines of the human summary (nothing for the matrix's scenarios).
    fn print_upstream(&self) {
        if let Some(c) = &self.cold_subscribe_ms {
            println!(
                "cold subscribe p50 {:.2}  p99 {:.2}  max {:.2} ms (n={}, {} failed)",
                c.p50,
                c.p99,
                c.max,
                c.count,
                self.cold_failed.unwrap_or(0)
            );
        }
        if self.slow_consumer_cuts > 0 || self.upstream.is_some() {
            println!(
                "cut / foreign  {} clients cut with slow_consumer, {} events of another binding",
                self.slow_consumer_cuts, self.other_bindings
            );
        }
        if let Some(secs) = self.restart_secs {
            println!(
                "restart        ready {secs:.2} s after SIGKILL; every client complete after {}",
                opt(self.complete_secs, "s")
            );
        }
        if let Some(s) = &self.stall {
            println!(
                "stalled client socket closed after {}, gone from streamgate_clients after {} \
                 (bound {:.0} s, {} events); server send queue {} B; RSS {} → max {} KiB",
                opt(s.socket_closed_secs, "s"),
                opt(s.client_gone_secs, "s"),
                s.bound_secs,
                s.events,
                s.server_send_queue.map_or("-".into(), |v| v.to_string()),
                s.rss_start_kib.map_or("-".into(), |v| v.to_string()),
                s.rss_max_kib.map_or("-".into(), |v| v.to_string())
            );
        }
        if let Some(u) = &self.upstream {
            let n = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
            println!(
                "mongod         change-stream cursors {} before → peak {} → {} at the end; \
                 connections {} → peak {} → {}; {} getMore/s",
                n(u.cursors_before),
                n(u.cursors_peak),
                n(u.cursors_after),
                n(u.connections_before),
                n(u.connections_peak),
                n(u.connections_after),
                u.getmores_per_sec.map_or("-".into(), |v| format!("{v:.0}"))
            );
            println!(
                "server         cursors opened {}, catch-ups {} (joined {}), lag recoveries {}, \
                 slow consumers {}",
                n(u.server_cursors_opened),
                n(u.server_catchups),
                n(u.server_catchups_joined),
                n(u.server_lag_recoveries),
                n(u.server_slow_consumers)
            );
        }
    }
}

fn opt(v: Option<f64>, unit: &str) -> String {
    v.map_or("never".into(), |v| format!("{v:.2} {unit}"))
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}%"))
}

/// Groups error messages (drops ids, numbers and details).
fn error_class(e: &str) -> String {
    if let Some(at) = e.find("\"code\":\"") {
        let rest = &e[at + 8..];
        if let Some(end) = rest.find('"') {
            return format!("error event {}", &rest[..end]);
        }
    }
    e.chars().take(60).collect()
}

/// A markdown table of many scenarios.
pub fn print_table(reports: &[Report]) {
    println!(
        "| scenario | transport | clients | rate/s | docs | connect p99 ms | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | deliveries/s | lost | dup | order | server KiB/client | server CPU |"
    );
    println!(
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in reports {
        let l = &r.latency_ms;
        let rate = if r.mode == "catchup" {
            "catch-up".to_string()
        } else if r.rate > 0.0 {
            format!("{}", r.rate)
        } else {
            format!("max ({:.0})", r.insert_rate)
        };
        let throughput = match r.catch_up_events_per_sec {
            Some(v) => format!("{v:.0} (catch-up)"),
            None => format!("{:.0}", r.deliveries_per_sec),
        };
        println!(
            "| {} | {} | {} | {} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.transport,
            r.connected,
            rate,
            r.docs,
            r.connect_ms.p99,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            throughput,
            r.lost,
            r.duplicates,
            r.order_violations,
            r.server_rss_per_client_kib
                .map_or("-".into(), |v| format!("{v:.2}")),
            pct(r.server_cpu_pct)
        );
    }
}

/// The header of [`fanin_row`]'s table.
pub const FANIN_HEADER: &str = "| scenario | clients (subscribed) | subscribe p50 / p99 / max ms | all subscribed s | \
cold subscribe p99 ms | latency p50 / p99 / max ms | deliveries/s | lost / dup / order | cut | \
other binding | cursors on mongod before → peak → end | cursors opened (server) | catch-ups | \
mongod connections before → peak |\n|---|---:|---|---:|---:|---|---:|---|---:|---:|---|---:|---:|---|";

/// One row of the issue-8 table (docs/benchmarks.md, "Upstream fan-in").
pub fn fanin_row(r: &Report) -> String {
    let n = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
    let (c, l) = (&r.connect_ms, &r.latency_ms);
    let up = r.upstream.clone().unwrap_or_default();
    format!(
        "| {} | {} ({}) | {:.1} / {:.1} / {:.1} | {:.1} | {} | {:.1} / {:.1} / {:.1} | {:.0} | {} / {} / {} | {} | {} | {} → {} → {} | {} | {} | {} → {} |",
        r.scenario,
        r.clients,
        r.connected,
        c.p50,
        c.p99,
        c.max,
        r.connect_all_secs,
        r.cold_subscribe_ms
            .as_ref()
            .map_or("-".into(), |p| format!("{:.1}", p.p99)),
        l.p50,
        l.p99,
        l.max,
        r.deliveries_per_sec,
        r.lost,
        r.duplicates,
        r.order_violations,
        r.slow_consumer_cuts,
        r.other_bindings,
        n(up.cursors_before),
        n(up.cursors_peak),
        n(up.cursors_after),
        n(up.server_cursors_opened),
        n(up.server_catchups),
        n(up.connections_before),
        n(up.connections_peak),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cuts_and_foreign_events() {
        let results = [
            ClientResult {
                received: 5,
                error: Some(
                    r#"error {"code":"slow_consumer","message":"more than 4096 behind"}"#.into(),
                ),
                ..ClientResult::default()
            },
            ClientResult {
                received: 7,
                other_bindings: 2,
                lost: 1,
                ..ClientResult::default()
            },
            ClientResult {
                error: Some("HTTP 503: busy".into()),
                lost: 10,
                ..ClientResult::default()
            },
        ];
        let mut report = Report {
            connected: 2,
            ..Report::default()
        };
        report.add_clients(&results, 10);
        assert_eq!(report.slow_consumer_cuts, 1);
        assert_eq!(report.other_bindings, 2);
        assert_eq!(report.lost, 11);
        assert_eq!(report.clients_with_loss, 2);
        assert_eq!(report.min_received, 0);
        assert_eq!(report.max_received, 7);
        assert_eq!(report.expected_deliveries, 20);
        assert_eq!(
            report.client_errors.get("error event slow_consumer"),
            Some(&1)
        );
    }

    #[test]
    fn a_fanin_row_has_a_cell_per_header_column() {
        let report = Report {
            scenario: "streams x40".into(),
            clients: 40,
            connected: 39,
            upstream: Some(Upstream {
                cursors_before: Some(1),
                cursors_peak: Some(41),
                server_cursors_opened: Some(40),
                ..Upstream::default()
            }),
            ..Report::default()
        };
        let row = fanin_row(&report);
        let header = FANIN_HEADER.lines().next().unwrap_or_default();
        assert_eq!(row.matches('|').count(), header.matches('|').count());
        assert!(row.starts_with("| streams x40 | 40 (39) |"), "{row}");
        assert!(row.contains("| 1 → 41 → - | 40 |"), "{row}");
    }
}
