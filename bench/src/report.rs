//! Results of a scenario: computed from the clients' results and histograms, printed as a
//! human table or JSON.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::client::ClientResult;

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
    /// Seconds from first insert to last delivery.
    pub delivery_secs: f64,
    /// 1-minute load average before and after the scenario.
    pub loadavg: [f64; 2],
    /// Catch-up mode: events/s a resuming client received.
    pub catch_up_events_per_sec: Option<f64>,
    /// Catch-up mode: ms until the first event arrived.
    pub catch_up_first_event_ms: Option<f64>,
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
            if let Some(e) = &r.error {
                *self.client_errors.entry(error_class(e)).or_default() += 1;
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
