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
    /// `/{db}/{coll}/_streams/{name}`.
    pub path: String,
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
                    url.push_str("?lastEventId=");
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
    ) -> Result<bool, String> {
        match self {
            Conn::Ws(ws) => match ws.next().await {
                None | Some(Ok(Message::Close(_))) => Ok(false),
                Some(Err(e)) => Err(format!("websocket: {e}")),
                Some(Ok(Message::Text(text))) => {
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
}

impl Shared {
    /// A fresh state for `shards` histogram shards.
    pub fn new(shards: usize) -> Arc<Shared> {
        Arc::new(Shared {
            shards: (0..shards.max(1))
                .map(|_| Mutex::new(histogram()))
                .collect(),
            delivered: AtomicU64::new(0),
            last_delivery_us: AtomicI64::new(0),
            connected: AtomicUsize::new(0),
            connect_failed: AtomicUsize::new(0),
            complete: AtomicUsize::new(0),
            ended: AtomicUsize::new(0),
            stop: CancellationToken::new(),
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
    /// Id of the first change event received.
    #[serde(skip)]
    pub first_id: Option<String>,
    /// Why the client ended early (connect error, control event, read error).
    pub error: Option<String>,
}

/// What a client expects: `seq` values `first .. first + count`.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// Lowest expected `seq`.
    pub first: i64,
    /// How many.
    pub count: u64,
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
            _ = shared.stop.cancelled() => Err("stopped before connecting".into()),
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
                if result.first_id.is_none() {
                    result.first_id = id.map(|id| String::from_utf8_lossy(id).into_owned());
                }
                let offset = seq - expect.first;
                if offset < 0 || offset as u64 >= expect.count {
                    return;
                }
                result.received += 1;
                latencies.push((now - sent_at).max(1) as u64);
                let (word, bit) = ((offset / 64) as usize, 1u64 << (offset % 64));
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
            read = conn.read_some(&mut on_event) => read,
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

/// Connects one client and returns the id of the first change event whose `seq` is `seq`.
pub async fn first_id_of(
    target: &Target,
    transport: Transport,
    seq: i64,
    timeout: Duration,
    insert: impl std::future::Future<Output = Result<(), String>>,
) -> Result<String, String> {
    let mut conn = Conn::connect(target, transport, None).await?;
    insert.await?;
    let deadline = Instant::now() + timeout;
    let mut found = None;
    while found.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut on_event = |ev: Ev<'_>, _| {
            if let Ev::Change {
                seq: s,
                id: Some(id),
                ..
            } = ev
                && s == seq
            {
                found = Some(String::from_utf8_lossy(id).into_owned());
            }
        };
        match tokio::time::timeout(left, conn.read_some(&mut on_event)).await {
            Err(_) => return Err(format!("no event with seq {seq} within {timeout:?}")),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(false)) if found.is_none() => return Err("stream ended".into()),
            Ok(Ok(_)) => {}
        }
    }
    Ok(found.unwrap_or_default())
}
