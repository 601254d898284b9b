//! Load clients: hand-written HTTP/1.1 for SSE and NDJSON (one `TcpStream`, two buffers),
//! tokio-tungstenite for WebSocket. Each client checks order, gaps and duplicates of the
//! benchmark's `seq` numbers and records latency (receive time − `sentAt`) in a shared,
//! sharded histogram.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BytesMut};
use futures::StreamExt;
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use crate::parse::{self, Chunked, Ev};

/// How clients subscribe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Server-Sent Events.
    Sse,
    /// WebSocket.
    Ws,
    /// Newline-delimited JSON.
    Ndjson,
    /// Round-robin over the three.
    Mixed,
}

impl Transport {
    /// The transport of client `i`.
    pub fn for_client(self, i: usize) -> Transport {
        match self {
            Transport::Mixed => [Transport::Sse, Transport::Ws, Transport::Ndjson][i % 3],
            other => other,
        }
    }

    /// Short name.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Sse => "sse",
            Transport::Ws => "ws",
            Transport::Ndjson => "ndjson",
            Transport::Mixed => "mixed",
        }
    }
}

/// Wall clock in unix microseconds (the same clock the inserter stamps `sentAt` with).
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// A new latency histogram: 1 µs .. 10 min, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// An open subscription.
pub enum Conn {
    /// SSE or NDJSON over chunked HTTP/1.1.
    Http {
        stream: TcpStream,
        raw: BytesMut,
        body: Vec<u8>,
        state: Chunked,
        sse: bool,
    },
    /// WebSocket.
    Ws(Box<WebSocketStream<TcpStream>>),
}

/// Where and how to subscribe.
#[derive(Debug, Clone)]
pub struct Target {
    /// Server address (loopback).
    pub addr: SocketAddr,
    /// `/{db}/{coll}/_streams/{name}`, possibly with a query (`?avars=…`).
    pub path: String,
}

impl Target {
    /// `/{db}/{coll}/_streams/{name}` on `addr`.
    pub fn stream(addr: SocketAddr, db: &str, coll: &str, name: &str) -> Target {
        Target {
            addr,
            path: format!("/{db}/{coll}/_streams/{name}"),
        }
    }

    /// The same stream with `?avars=` set to the URL-encoded JSON object `avars`.
    pub fn with_avars(&self, avars: &serde_json::Value) -> Target {
        Target {
            addr: self.addr,
            path: format!("{}?avars={}", self.path, url_encode(&avars.to_string())),
        }
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters (a query component).
pub fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Conn {
    /// Connects and completes the handshake (HTTP 200 or WebSocket 101).
    pub async fn connect(
        target: &Target,
        transport: Transport,
        last_event_id: Option<&str>,
    ) -> Result<Conn, String> {
        let stream = TcpStream::connect(target.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        match transport {
            Transport::Ws => {
                let mut url = format!("ws://{}{}", target.addr, target.path);
                if let Some(id) = last_event_id {
                    // The path may already carry a query (`?avars=`).
                    url.push(if target.path.contains('?') { '&' } else { '?' });
                    url.push_str("lastEventId=");
                    url.push_str(id);
                }
                let config = WebSocketConfig::default()
                    .read_buffer_size(16 * 1024)
                    .write_buffer_size(0);
                let (ws, _) =
                    tokio_tungstenite::client_async_with_config(url, stream, Some(config))
                        .await
                        .map_err(|e| format!("websocket handshake: {e}"))?;
                Ok(Conn::Ws(Box::new(ws)))
            }
            Transport::Sse | Transport::Ndjson | Transport::Mixed => {
                let sse = transport != Transport::Ndjson;
                let accept = if sse {
                    "text/event-stream"
                } else {
                    "application/x-ndjson"
                };
                http_get(stream, target, accept, last_event_id, sse).await
            }
        }
    }

    /// Waits for data and hands every complete event to `on_event` with the receive time.
    /// Returns `Ok(false)` when the server ended the stream.
    pub async fn read_some(
        &mut self,
        on_event: &mut impl FnMut(Ev<'_>, i64),
        bytes: &AtomicU64,
    ) -> Result<bool, String> {
        match self {
            Conn::Ws(ws) => match ws.next().await {
                None | Some(Ok(Message::Close(_))) => Ok(false),
                Some(Err(e)) => Err(format!("websocket: {e}")),
                Some(Ok(Message::Text(text))) => {
                    bytes.fetch_add(text.len() as u64, Ordering::Relaxed);
                    if let Some(ev) = parse::envelope(text.as_bytes()) {
                        on_event(ev, now_us());
                    }
                    Ok(true)
                }
                Some(Ok(_)) => Ok(true),
            },
            Conn::Http {
                stream,
                raw,
                body,
                state,
                sse,
            } => {
                if raw.capacity() - raw.len() < 1024 {
                    raw.reserve(16 * 1024);
                }
                let n = stream
                    .read_buf(raw)
                    .await
                    .map_err(|e| format!("read: {e}"))?;
                bytes.fetch_add(n as u64, Ordering::Relaxed);
                let now = now_us();
                let mut pos = 0;
                parse::dechunk(state, raw, &mut pos, body)?;
                raw.advance(pos);
                let used = if *sse {
                    split_events(body, b"\n\n", parse::sse_block, now, on_event)
                } else {
                    split_events(body, b"\n", parse::envelope, now, on_event)
                };
                body.drain(..used);
                Ok(n != 0 && *state != Chunked::End)
            }
        }
    }
}

fn split_events(
    body: &[u8],
    sep: &[u8],
    parse: impl Fn(&[u8]) -> Option<Ev<'_>>,
    now: i64,
    on_event: &mut impl FnMut(Ev<'_>, i64),
) -> usize {
    let mut used = 0;
    while let Some(at) = memchr::memmem::find(&body[used..], sep) {
        if let Some(ev) = parse(&body[used..used + at]) {
            on_event(ev, now);
        }
        used += at + sep.len();
    }
    used
}

async fn http_get(
    mut stream: TcpStream,
    target: &Target,
    accept: &str,
    last_event_id: Option<&str>,
    sse: bool,
) -> Result<Conn, String> {
    let resume = last_event_id
        .map(|id| format!("Last-Event-ID: {id}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: {accept}\r\n{resume}\r\n",
        target.path, target.addr
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write request: {e}"))?;
    let mut raw = BytesMut::with_capacity(4096);
    loop {
        let n = stream
            .read_buf(&mut raw)
            .await
            .map_err(|e| format!("read response: {e}"))?;
        if n == 0 {
            return Err("connection closed before the response headers".into());
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response
            .parse(&raw)
            .map_err(|e| format!("bad response: {e}"))?
        {
            httparse::Status::Partial if raw.len() > 64 * 1024 => {
                return Err("response headers too large".into());
            }
            httparse::Status::Partial => continue,
            httparse::Status::Complete(len) => {
                let code = response.code.unwrap_or(0);
                if code != 200 {
                    let body = String::from_utf8_lossy(&raw[len..]).into_owned();
                    return Err(format!("HTTP {code}: {}", body.trim()));
                }
                let chunked = response.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("transfer-encoding")
                        && String::from_utf8_lossy(h.value)
                            .to_ascii_lowercase()
                            .contains("chunked")
                });
                raw.advance(len);
                return Ok(Conn::Http {
                    stream,
                    raw,
                    body: Vec::new(),
                    state: if chunked {
                        Chunked::Size
                    } else {
                        Chunked::Identity
                    },
                    sse,
                });
            }
        }
    }
}

/// State shared by every client of a run.
pub struct Shared {
    /// Latency histograms (µs), sharded to keep lock contention negligible.
    pub shards: Vec<Mutex<Histogram<u64>>>,
    /// Benchmark events received, over all clients (duplicates included).
    pub delivered: AtomicU64,
    /// Receive time of the latest event (unix µs).
    pub last_delivery_us: AtomicI64,
    /// Bytes received from the server over all clients (HTTP: as read from the socket,
    /// chunk framing included; WebSocket: text payloads).
    pub bytes: AtomicU64,
    /// Longest change id received (on `/_streams`: the composite position), bytes.
    pub max_id_len: AtomicUsize,
    /// Clients whose handshake completed.
    pub connected: AtomicUsize,
    /// Clients that failed to connect.
    pub connect_failed: AtomicUsize,
    /// Clients that have every expected event.
    pub complete: AtomicUsize,
    /// Clients that ended (any reason) after connecting.
    pub ended: AtomicUsize,
    /// Stops every client.
    pub stop: CancellationToken,
    /// Stops only the clients still connecting (a bounded subscribe phase); a child of `stop`.
    pub stop_connecting: CancellationToken,
}

impl Shared {
    /// A fresh state for `shards` histogram shards.
    pub fn new(shards: usize) -> Arc<Shared> {
        let stop = CancellationToken::new();
        Arc::new(Shared {
            shards: (0..shards.max(1))
                .map(|_| Mutex::new(histogram()))
                .collect(),
            delivered: AtomicU64::new(0),
            last_delivery_us: AtomicI64::new(0),
            bytes: AtomicU64::new(0),
            max_id_len: AtomicUsize::new(0),
            connected: AtomicUsize::new(0),
            connect_failed: AtomicUsize::new(0),
            complete: AtomicUsize::new(0),
            ended: AtomicUsize::new(0),
            stop_connecting: stop.child_token(),
            stop,
        })
    }

    /// All shards merged.
    pub fn merged(&self) -> Histogram<u64> {
        let mut all = histogram();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            all.add(&*shard).expect("same bounds");
        }
        all
    }
}

/// What one client saw.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ClientResult {
    /// Client index.
    pub index: usize,
    /// Transport used.
    pub transport: &'static str,
    /// Handshake time, µs (`None` if it failed).
    pub connect_us: Option<u64>,
    /// Benchmark events received (duplicates included).
    pub received: u64,
    /// Distinct expected `seq` values received.
    pub unique: u64,
    /// Events whose `seq` was already received.
    pub duplicates: u64,
    /// Events with a `seq` lower than one received before (not duplicates).
    pub order_violations: u64,
    /// Expected events never received.
    pub lost: u64,
    /// Benchmark events of another binding (`Expect::every`: a `seq` of another residue).
    pub other_bindings: u64,
    /// Id of the first change event received.
    #[serde(skip)]
    pub first_id: Option<String>,
    /// Why the client ended early (connect error, control event, read error).
    pub error: Option<String>,
}

/// What a client expects: the `count` values `first + residue + k × stride` (k = 0, 1, …).
/// A `seq` at or after `first` of another residue belongs to another client's binding.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// Lowest `seq` of the run (lower ones are markers and ignored).
    pub first: i64,
    /// How many.
    pub count: u64,
    /// Distance between two expected `seq` values (1: a contiguous range).
    pub stride: u64,
    /// Offset of this client's values within each stride.
    pub residue: u64,
}

/// Where a received `seq` falls for one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// The k-th expected event.
    Mine(u64),
    /// An event of another binding.
    Other,
    /// Before `first` or past the last expected one: not part of the measurement.
    Outside,
}

impl Expect {
    /// Every `seq` in `first .. first + count`.
    pub fn range(first: i64, count: u64) -> Expect {
        Expect {
            first,
            count,
            stride: 1,
            residue: 0,
        }
    }

    /// `count` values: `first + residue`, then every `stride`-th after it.
    pub fn every(first: i64, count: u64, stride: u64, residue: u64) -> Expect {
        Expect {
            first,
            count,
            stride: stride.max(1),
            residue,
        }
    }

    /// Classifies a received `seq`.
    pub fn slot(&self, seq: i64) -> Slot {
        let Some(offset) = seq.checked_sub(self.first).filter(|o| *o >= 0) else {
            return Slot::Outside;
        };
        let offset = offset as u64;
        let stride = self.stride.max(1);
        let k = offset / stride;
        if k >= self.count {
            Slot::Outside
        } else if offset % stride == self.residue {
            Slot::Mine(k)
        } else {
            Slot::Other
        }
    }
}

/// Runs one client: connect (under `connect_gate`), then read until it has every expected
/// event, the server ends the stream, or `shared.stop` fires.
pub async fn run_client(
    index: usize,
    transport: Transport,
    target: Arc<Target>,
    expect: Expect,
    last_event_id: Option<String>,
    connect_gate: Arc<Semaphore>,
    shared: Arc<Shared>,
) -> ClientResult {
    let mut result = ClientResult {
        index,
        transport: transport.as_str(),
        ..ClientResult::default()
    };
    let conn = {
        let _permit = connect_gate.acquire().await;
        let started = Instant::now();
        let attempt = tokio::select! {
            conn = Conn::connect(&target, transport, last_event_id.as_deref()) => conn,
            _ = shared.stop_connecting.cancelled() => Err("stopped before connecting".into()),
        };
        match attempt {
            Ok(conn) => {
                result.connect_us = Some(started.elapsed().as_micros() as u64);
                shared.connected.fetch_add(1, Ordering::AcqRel);
                conn
            }
            Err(e) => {
                result.error = Some(e);
                result.lost = expect.count;
                shared.connect_failed.fetch_add(1, Ordering::AcqRel);
                return result;
            }
        }
    };
    let mut conn = conn;
    let shard = &shared.shards[index % shared.shards.len()];
    let mut seen = vec![0u64; expect.count.div_ceil(64) as usize];
    let mut max_seq = i64::MIN;
    let mut latencies: Vec<u64> = Vec::with_capacity(64);
    let mut control: Option<String> = None;
    let mut complete = expect.count == 0;
    if complete {
        shared.complete.fetch_add(1, Ordering::AcqRel);
    }
    loop {
        let mut on_event = |ev: Ev<'_>, now: i64| match ev {
            Ev::Change { seq, sent_at, id } => {
                if let Some(id) = id {
                    shared.max_id_len.fetch_max(id.len(), Ordering::Relaxed);
                }
                if result.first_id.is_none() {
                    result.first_id = id.map(|id| String::from_utf8_lossy(id).into_owned());
                }
                let k = match expect.slot(seq) {
                    Slot::Mine(k) => k,
                    Slot::Other => {
                        result.other_bindings += 1;
                        return;
                    }
                    Slot::Outside => return,
                };
                result.received += 1;
                latencies.push((now - sent_at).max(1) as u64);
                let (word, bit) = ((k / 64) as usize, 1u64 << (k % 64));
                if seen[word] & bit != 0 {
                    result.duplicates += 1;
                    return;
                }
                seen[word] |= bit;
                result.unique += 1;
                if seq < max_seq {
                    result.order_violations += 1;
                }
                max_seq = max_seq.max(seq);
            }
            Ev::Foreign => {}
            Ev::Control { name, data } => {
                if control.is_none() {
                    control = Some(format!(
                        "{} {}",
                        String::from_utf8_lossy(name),
                        String::from_utf8_lossy(&data[..data.len().min(200)])
                    ));
                }
            }
        };
        let read = tokio::select! {
            read = conn.read_some(&mut on_event, &shared.bytes) => read,
            _ = shared.stop.cancelled() => break,
        };
        if !latencies.is_empty() {
            {
                let mut hist = shard.lock().unwrap_or_else(|p| p.into_inner());
                for &l in &latencies {
                    let _ = hist.record(l.min(600_000_000));
                }
            }
            shared
                .delivered
                .fetch_add(latencies.len() as u64, Ordering::Relaxed);
            shared
                .last_delivery_us
                .fetch_max(now_us(), Ordering::Relaxed);
            latencies.clear();
        }
        if !complete && result.unique == expect.count {
            complete = true;
            shared.complete.fetch_add(1, Ordering::AcqRel);
        }
        if let Some(reason) = control.take() {
            result.error = Some(reason);
            break;
        }
        match read {
            Ok(true) => {}
            Ok(false) => {
                if !complete {
                    result.error = Some("server ended the stream".into());
                }
                break;
            }
            Err(e) => {
                result.error = Some(e);
                break;
            }
        }
    }
    shared.ended.fetch_add(1, Ordering::AcqRel);
    result.lost = expect.count - result.unique;
    result
}

/// Connects one client, runs `insert`, and returns the ids of the change events with `seq`
/// `first .. first + count`, in `seq` order.
pub async fn ids_of(
    target: &Target,
    transport: Transport,
    first: i64,
    count: usize,
    timeout: Duration,
    insert: impl std::future::Future<Output = Result<(), String>>,
) -> Result<Vec<String>, String> {
    let mut conn = Conn::connect(target, transport, None).await?;
    insert.await?;
    let deadline = Instant::now() + timeout;
    let mut ids: Vec<Option<String>> = vec![None; count];
    let mut found = 0;
    while found < count {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut on_event = |ev: Ev<'_>, _| {
            if let Ev::Change {
                seq, id: Some(id), ..
            } = ev
                && let Some(slot) = usize::try_from(seq - first)
                    .ok()
                    .and_then(|i| ids.get_mut(i))
                && slot.is_none()
            {
                *slot = Some(String::from_utf8_lossy(id).into_owned());
                found += 1;
            }
        };
        match tokio::time::timeout(left, conn.read_some(&mut on_event, &AtomicU64::new(0))).await {
            Err(_) => {
                return Err(format!(
                    "{found} of the events {first}..{} within {timeout:?}",
                    first + count as i64
                ));
            }
            Ok(Err(e)) => return Err(e),
            Ok(Ok(false)) if found < count => return Err("stream ended".into()),
            Ok(Ok(_)) => {}
        }
    }
    Ok(ids.into_iter().flatten().collect())
}

/// Connects one client and returns the id of the change event whose `seq` is `seq`.
pub async fn first_id_of(
    target: &Target,
    transport: Transport,
    seq: i64,
    timeout: Duration,
    insert: impl std::future::Future<Output = Result<(), String>>,
) -> Result<String, String> {
    let ids = ids_of(target, transport, seq, 1, timeout, insert).await?;
    ids.into_iter()
        .next()
        .ok_or_else(|| format!("no event with seq {seq}"))
}

/// Opens an SSE subscription with a `recv_buffer`-byte receive buffer, reads the response head
/// and returns the socket: the caller then never reads from it (a stalled client whose window
/// closes once that buffer is full).
pub async fn stalled_sse(target: &Target, recv_buffer: u32) -> Result<TcpStream, String> {
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    // Before connect, so the window advertised in the handshake is already small.
    socket
        .set_recv_buffer_size(recv_buffer)
        .map_err(|e| e.to_string())?;
    sse_on(socket, target.addr, &target.path, None).await
}

/// Connects `socket` (already configured: receive buffer, local address) to `addr`, sends an
/// SSE `GET path` (with `Last-Event-ID` when given) and reads the response head byte by byte,
/// so that no byte of the body is taken from the socket. A head other than 200 is an error
/// naming its status line.
pub async fn sse_on(
    socket: tokio::net::TcpSocket,
    addr: SocketAddr,
    path: &str,
    last_event_id: Option<&str>,
) -> Result<TcpStream, String> {
    let mut stream = socket
        .connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let resume = last_event_id
        .map(|id| format!("Last-Event-ID: {id}\r\n"))
        .unwrap_or_default();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{resume}\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write request: {e}"))?;
    let mut head = Vec::with_capacity(512);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 64 * 1024 {
            return Err("response headers too large".into());
        }
        match stream.read(&mut byte).await {
            Ok(0) => return Err("connection closed before the response headers".into()),
            Ok(_) => head.push(byte[0]),
            Err(e) => return Err(format!("read response: {e}")),
        }
    }
    if !head.starts_with(b"HTTP/1.1 200") {
        let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
        return Err(String::from_utf8_lossy(line).into_owned());
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_expects_each_seq_once() {
        let e = Expect::range(10, 3);
        assert_eq!(e.slot(9), Slot::Outside);
        assert_eq!(e.slot(10), Slot::Mine(0));
        assert_eq!(e.slot(12), Slot::Mine(2));
        assert_eq!(e.slot(13), Slot::Outside);
        assert_eq!(e.slot(-1), Slot::Outside);
    }

    #[test]
    fn a_binding_expects_its_residue_and_flags_the_others() {
        // Owner 2 of 5, 3 documents each: seq 2, 7, 12 of 0..15.
        let e = Expect::every(0, 3, 5, 2);
        assert_eq!(e.slot(2), Slot::Mine(0));
        assert_eq!(e.slot(7), Slot::Mine(1));
        assert_eq!(e.slot(12), Slot::Mine(2));
        assert_eq!(e.slot(0), Slot::Other);
        assert_eq!(e.slot(13), Slot::Other);
        assert_eq!(e.slot(15), Slot::Outside);
        assert_eq!(e.slot(-1), Slot::Outside);
    }

    #[test]
    fn avars_are_url_encoded() {
        let target = Target::stream(([127, 0, 0, 1], 1).into(), "db", "c", "s");
        let bound = target.with_avars(&serde_json::json!({"who": "o 1"}));
        assert_eq!(
            bound.path,
            "/db/c/_streams/s?avars=%7B%22who%22%3A%22o%201%22%7D"
        );
    }
}
