//! The HTTP edge: the direct SSE/NDJSON path (request heads in odd shapes, pipelining,
//! half-close, HTTP/1.0, partial writes), the stream end with frames queued, and the
//! harness's own guarantee that a server panic fails the test.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use futures::{SinkExt, StreamExt};

use mongodb::bson::doc;
use sha2::Digest;
use streamgate::metrics::TransportLabel;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};

use crate::harness::clients::{Envelope, Kind, Next, parse_envelope};
use crate::harness::fixture::{Fixture, seqs};
use crate::harness::{eventually, mongod, unique_db};

const WAIT: Duration = Duration::from_secs(10);

/// A stream that ends (here: `invalidate` after a dropped collection) while the last batch is
/// still being drained must end cleanly. It used to poll the finished body again, a panic in
/// the connection task that only the harness's panic record makes visible.
#[tokio::test]
async fn stream_end_with_frames_queued_does_not_panic() {
    let f = Fixture::start("edge_end", |_| {}).await;
    for kind in [Kind::Sse, Kind::Ndjson] {
        let mut client = f.connect(kind).await;
        f.coll
            .insert_many((0..5).map(|seq| doc! { "seq": seq }))
            .await
            .unwrap();
        f.coll.drop().await.unwrap();
        let mut events = Vec::new();
        loop {
            match client.next(WAIT).await {
                Next::Event(e) => events.push(e.event),
                Next::End(_) => break,
                Next::Timeout => panic!("{kind:?}: no end after {events:?}"),
            }
        }
        // Five inserts, the drop, then the terminal `invalidate`.
        assert_eq!(events.len(), 7, "{kind:?}: {events:?}");
        assert_eq!(events.last().map(String::as_str), Some("invalidate"));
    }
    f.server.stop().await;
}

/// Connects to `addr` with a receive buffer of `rcvbuf` bytes (the kernel rounds it up), so a
/// client that stops reading stops the server's writes after a few KiB instead of megabytes.
async fn connect_small(addr: SocketAddr, rcvbuf: u32) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(rcvbuf).unwrap();
    socket.connect(addr).await.unwrap()
}

/// A subscribe request head for `path` accepting `accept`, with `extra` header lines.
fn head(path: &str, accept: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAccept: {accept}\r\n{extra}\r\n")
}

/// Reads up to the end of the response head; returns it and whatever body bytes came with it.
async fn read_head(tcp: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let body = buffer.split_off(end + 4);
            return (String::from_utf8(buffer).expect("utf-8 head"), body);
        }
        let n = tokio::time::timeout(WAIT, tcp.read(&mut chunk))
            .await
            .expect("response head in time")
            .expect("read");
        assert!(
            n > 0,
            "connection closed before the response head: {buffer:?}"
        );
        buffer.extend_from_slice(&chunk[..n]);
    }
}

/// Clients of `transport` the server counts right now.
fn clients(f: &Fixture, transport: &'static str) -> i64 {
    f.server
        .metrics
        .clients
        .get_or_create(&TransportLabel { transport })
        .get()
}

/// A document of about `kib` KiB.
fn big(seq: i64, kib: usize) -> mongodb::bson::Document {
    doc! { "seq": seq, "pad": "x".repeat(kib * 1024) }
}

/// Clients that stop reading while events keep flowing are closed by the write deadline, on
/// the direct path (NDJSON), through hyper (an SSE head too large for the direct path) and on
/// an upgraded WebSocket, within `stall_timeout_secs` + 5 s of the flood's start.
#[tokio::test]
async fn stalled_clients_are_closed_after_the_stall_timeout() {
    let f = Fixture::start("edge_stall", |c| c.stall_timeout_secs = 2).await;
    let addr = f.server.addr;

    let mut direct = connect_small(addr, 4096).await;
    direct
        .write_all(head(&f.path, "application/x-ndjson", "").as_bytes())
        .await
        .unwrap();
    let (status, _) = read_head(&mut direct).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");

    let mut hyper = connect_small(addr, 4096).await;
    let padding = format!("X-Padding: {}\r\n", "p".repeat(5000));
    hyper
        .write_all(head(&f.path, "text/event-stream", &padding).as_bytes())
        .await
        .unwrap();
    let (status, _) = read_head(&mut hyper).await;
    assert!(
        status.contains("transfer-encoding: chunked"),
        "via hyper: {status}"
    );

    let ws_tcp = connect_small(addr, 4096).await;
    let (_ws, _) = tokio_tungstenite::client_async(f.server.ws_url(&f.path), ws_tcp)
        .await
        .unwrap();

    let all = || {
        [
            clients(&f, "ndjson"),
            clients(&f, "sse"),
            clients(&f, "websocket"),
        ]
    };
    assert_eq!(all(), [1, 1, 1]);
    // None of them reads from here on. 64 events of 256 KiB: far more than the socket
    // buffers hold, far fewer than `client_queue`, so only the deadline can cut them.
    let start = Instant::now();
    for seq in 0..64 {
        f.coll.insert_one(big(seq, 256)).await.unwrap();
    }
    eventually(
        "every stalled client closed",
        Duration::from_secs(2 + 5),
        async || all() == [0, 0, 0],
    )
    .await;
    eprintln!(
        "stalled clients closed {:?} after the flood started",
        start.elapsed()
    );
    assert_eq!(
        f.server.metrics.slow_consumers.get(),
        3,
        "each stalled client cut by the deadline, and counted once"
    );
    f.server.stop().await;
}

/// A client that reads slowly but steadily is never cut by the write deadline, however far
/// behind it is; it then gets every event.
#[tokio::test]
async fn slow_steady_reader_is_not_cut() {
    // A stall timeout with room for a busy test machine (other tests run alongside).
    let f = Fixture::start("edge_steady", |c| c.stall_timeout_secs = 4).await;
    let mut tcp = connect_small(f.server.addr, 64 * 1024).await;
    tcp.write_all(head(&f.path, "application/x-ndjson", "").as_bytes())
        .await
        .unwrap();
    let (status, mut body) = read_head(&mut tcp).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    // 8 MiB queued: the server's writes wait on this reader for the whole test.
    for seq in 0..32 {
        f.coll.insert_one(big(seq, 256)).await.unwrap();
    }
    // 16 KiB every 100 ms for 10 s (two and a half stall timeouts): progress, but slow.
    let mut chunk = vec![0u8; 16 * 1024];
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let n = tcp.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the slow reader was cut");
        body.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(clients(&f, "ndjson"), 1, "the slow reader is still served");
    // Now at full speed: every event arrives, in order.
    let mut seqs = Vec::new();
    let deadline = Instant::now() + WAIT;
    loop {
        while let Some(end) = body.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = body.drain(..=end).collect();
            if line.len() > 1 {
                let envelope = parse_envelope(std::str::from_utf8(&line).unwrap());
                if envelope.event == "info" {
                    continue;
                }
                seqs.push(envelope.data["fullDocument"]["seq"].as_i64().unwrap());
            }
        }
        if seqs.len() >= 32 {
            break;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(remaining, tcp.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("all events in time: got {seqs:?}"))
            .unwrap();
        assert!(n > 0, "closed after {} events", seqs.len());
        body.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(seqs, (0..32).collect::<Vec<i64>>());
    f.server.stop().await;
}

/// Reads until the server closes the connection (EOF or reset); panics after `within`.
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> Duration {
    let start = Instant::now();
    let mut sink = [0u8; 1024];
    loop {
        let remaining = within.saturating_sub(start.elapsed());
        match tokio::time::timeout(remaining, tcp.read(&mut sink)).await {
            Err(_) => panic!("connection still open after {within:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

/// 500 connections that send half a request head and then nothing neither keep others from
/// subscribing nor stay open: hyper has a timer and a head timeout. A connection that sends
/// nothing is closed by the same deadline, and a kept-alive connection after `idle_timeout_secs`.
#[tokio::test]
async fn slow_heads_and_idle_connections_are_closed() {
    let f = Fixture::start("edge_heads", |c| {
        c.head_timeout_secs = 2;
        c.idle_timeout_secs = 1;
    })
    .await;
    let addr = f.server.addr;
    let start = Instant::now();
    let mut half = Vec::new();
    for _ in 0..500 {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /health/live HTTP/1.1\r\nHost: localhost\r\n")
            .await
            .unwrap();
        half.push(tcp);
    }
    let mut silent = TcpStream::connect(addr).await.unwrap();

    // Meanwhile a client subscribes and gets an event.
    let mut client = f.connect(Kind::Sse).await;
    f.coll.insert_one(doc! { "seq": 1 }).await.unwrap();
    assert_eq!(client.changes(1, WAIT).await.len(), 1);

    // head_timeout_secs + 3 s of slack for 500 closes on a busy machine.
    let bound = Duration::from_secs(2 + 3);
    let closes = futures::future::join_all(
        half.iter_mut()
            .map(|tcp| closed_within(tcp, bound.saturating_sub(start.elapsed()))),
    )
    .await;
    closed_within(&mut silent, bound.saturating_sub(start.elapsed())).await;
    eprintln!(
        "500 half heads closed {:?}..{:?} after they were sent",
        closes.iter().min(),
        closes.iter().max()
    );

    // A kept-alive connection: one request, then silence.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET /health/live HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let (status, _) = read_head(&mut kept).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let idle = closed_within(&mut kept, Duration::from_secs(1 + 3)).await;
    assert!(idle >= Duration::from_millis(900), "closed after {idle:?}");
    eprintln!("idle keep-alive connection closed after {idle:?}");
    f.server.stop().await;
}

/// Status of a WebSocket handshake to `url` (101 on success) with `headers`.
async fn ws_status(url: &str, headers: &[(&str, &str)]) -> u16 {
    let mut request = url
        .replacen("http://", "ws://", 1)
        .into_client_request()
        .unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
    }
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("answered in time")
    {
        Ok((_socket, response)) => response.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("websocket handshake failed: {other}"),
    }
}

/// `allowed_origins = ["*"]` (or a listed origin without `allow_credentials`) must not let
/// another site open a WebSocket with the user's cookie; a token the page passes itself, or
/// the cookie from the server's own origin, still works.
#[tokio::test]
async fn websocket_from_another_origin_cannot_use_the_cookie() {
    const KEY: &str = "sg_edge_cookie_key";
    let f = Fixture::start("edge_cswsh", |c| {
        let sha256 = hex::encode(sha2::Sha256::digest(KEY.as_bytes()));
        let db = c.streams[0].db.clone();
        c.auth = toml::from_str(&format!(
            "enabled = true\n\
             [[api_keys]]\nname = \"user\"\nsha256 = \"{sha256}\"\nroles = [\"reader\"]\n\
             [[rules]]\nroles = [\"reader\"]\nstreams = [\"/{db}/*/_streams/*\"]\n"
        ))
        .unwrap();
        c.cors.allowed_origins = vec!["*".into(), "https://app.example".into()];
        c.cors.allow_credentials = false;
    })
    .await;
    let url = f.server.url(&f.path);
    let cookie = format!("streamgate_token={KEY}");
    let own = format!("http://{}", f.server.addr);
    let evil = "https://evil.example";
    let listed = "https://app.example";

    assert_eq!(
        ws_status(&url, &[("origin", evil), ("cookie", &cookie)]).await,
        403
    );
    assert_eq!(
        ws_status(&url, &[("origin", listed), ("cookie", &cookie)]).await,
        403
    );
    let with_token = format!("{url}?access_token={KEY}");
    assert_eq!(
        ws_status(&with_token, &[("origin", evil), ("cookie", &cookie)]).await,
        101
    );
    assert_eq!(ws_status(&with_token, &[("origin", listed)]).await, 101);
    assert_eq!(
        ws_status(&url, &[("origin", &own), ("cookie", &cookie)]).await,
        101
    );
    assert_eq!(
        ws_status(&url, &[("cookie", &cookie)]).await,
        101,
        "no Origin"
    );
    f.server.stop().await;
}

/// A response written by the direct path carries `Date`, like those hyper writes.
#[tokio::test]
async fn direct_responses_carry_a_date() {
    let f = Fixture::start("edge_date", |_| {}).await;
    for accept in ["text/event-stream", "application/x-ndjson"] {
        let mut tcp = TcpStream::connect(f.server.addr).await.unwrap();
        tcp.write_all(head(&f.path, accept, "").as_bytes())
            .await
            .unwrap();
        let (response, _) = read_head(&mut tcp).await;
        assert!(
            response.contains("connection: close"),
            "direct path: {response}"
        );
        let date = response
            .lines()
            .find_map(|l| l.strip_prefix("date: "))
            .unwrap_or_else(|| panic!("no Date: {response}"));
        let date = httpdate::parse_http_date(date).expect("an HTTP date");
        let skew = SystemTime::now()
            .duration_since(date)
            .unwrap_or_else(|e| e.duration());
        assert!(skew < Duration::from_secs(5), "{date:?} is off by {skew:?}");
    }
    f.server.stop().await;
}

/// A WebSocket client message over the size limit gets a 1009 close frame, not a silently
/// dropped socket.
#[tokio::test]
async fn oversized_websocket_message_is_closed_with_1009() {
    let f = Fixture::start("edge_1009", |_| {}).await;
    let (mut socket, _) = tokio_tungstenite::connect_async(f.server.ws_url(&f.path))
        .await
        .unwrap();
    socket
        .send(WsMessage::Text("x".repeat(64 * 1024).into()))
        .await
        .unwrap();
    let close = tokio::time::timeout(WAIT, async {
        loop {
            match socket.next().await {
                Some(Ok(WsMessage::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("closed in time");
    assert_eq!(close, Some(1009));
    f.server.stop().await;
}

/// Connections the server's MongoDB client holds (pool and monitoring), by app name.
async fn connections_of(app: &str) -> usize {
    let admin = mongod::shared().client().await.database("admin");
    let mut cursor = admin
        .aggregate([
            doc! { "$currentOp": { "allUsers": true, "idleConnections": true } },
            doc! { "$match": { "appName": app } },
        ])
        .await
        .unwrap();
    let mut n = 0;
    while cursor.advance().await.unwrap() {
        n += 1;
    }
    n
}

/// On shutdown the server ends its MongoDB sessions and closes its connections, even while
/// something (here the test, as an embedder might) still holds the registry and so the client.
#[tokio::test]
async fn shutdown_closes_the_mongodb_connections() {
    let app = unique_db("edge_app");
    let f = Fixture::start("edge_mongo", |c| {
        c.mongo_uri = format!("{}&appName={app}", mongod::shared().uri());
    })
    .await;
    let mut client = f.connect(Kind::Sse).await;
    f.coll.insert_one(doc! { "seq": 1 }).await.unwrap();
    assert_eq!(client.changes(1, WAIT).await.len(), 1);
    assert!(connections_of(&app).await > 0);
    let registry = f.server.registry.clone();
    f.server.stop().await;
    eventually("the server's connections closed", WAIT, async || {
        connections_of(&app).await == 0
    })
    .await;
    drop(registry);
}

/// A response read off a raw socket: the head, then the body decoded (chunked or
/// close-delimited) and split into events.
struct Raw {
    tcp: TcpStream,
    head: String,
    chunked: bool,
    sse: bool,
    /// Bytes read but not decoded yet (an incomplete chunk).
    raw: Vec<u8>,
    /// Decoded body not yet split into events.
    body: Vec<u8>,
}

impl Raw {
    /// Sends `request` (in one write) and reads the response head.
    async fn send(addr: SocketAddr, request: &[u8]) -> Raw {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(request).await.unwrap();
        Raw::read(tcp).await
    }

    /// Reads the response head of a request already sent on `tcp`.
    async fn read(mut tcp: TcpStream) -> Raw {
        let (head, raw) = read_head(&mut tcp).await;
        let lower = head.to_ascii_lowercase();
        let mut response = Raw {
            tcp,
            chunked: lower.contains("transfer-encoding: chunked"),
            sse: lower.contains("text/event-stream"),
            head,
            raw,
            body: Vec::new(),
        };
        response.decode();
        response
    }

    fn decode(&mut self) {
        if !self.chunked {
            self.body.append(&mut self.raw);
            return;
        }
        while let Some(line) = self.raw.windows(2).position(|w| w == b"\r\n") {
            let size = std::str::from_utf8(&self.raw[..line]).unwrap();
            let size = usize::from_str_radix(size.trim(), 16).expect("chunk size");
            if self.raw.len() < line + 2 + size + 2 {
                return;
            }
            self.body
                .extend_from_slice(&self.raw[line + 2..line + 2 + size]);
            self.raw.drain(..line + 2 + size + 2);
        }
    }

    /// The next event (keep-alives and `retry:` skipped); `None` when the server closed.
    async fn next(&mut self) -> Option<Envelope> {
        let deadline = Instant::now() + WAIT;
        loop {
            let separator: &[u8] = if self.sse { b"\n\n" } else { b"\n" };
            while let Some(end) = self
                .body
                .windows(separator.len())
                .position(|w| w == separator)
            {
                let frame: Vec<u8> = self.body.drain(..end + separator.len()).collect();
                let frame = std::str::from_utf8(&frame[..end]).expect("utf-8 body");
                if let Some(envelope) = parse_frame(frame, self.sse) {
                    return Some(envelope);
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let remaining = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(remaining, self.tcp.read(&mut chunk)).await {
                Err(_) => panic!("no event within {WAIT:?}"),
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(n)) => {
                    self.raw.extend_from_slice(&chunk[..n]);
                    self.decode();
                }
            }
        }
    }

    /// The next `n` events, which must be changes.
    async fn changes(&mut self, n: usize) -> Vec<Envelope> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match self.next().await {
                Some(e) if e.event == "change" => out.push(e),
                other => panic!("after {} of {n} changes: {other:?}", out.len()),
            }
        }
        out
    }
}

/// An SSE frame or NDJSON line as an envelope; `None` for keep-alives, `retry:` and the
/// connect-time `info` event.
fn parse_frame(frame: &str, sse: bool) -> Option<Envelope> {
    if !sse {
        return (!frame.trim().is_empty())
            .then(|| parse_envelope(frame))
            .filter(|e| e.event != "info");
    }
    let (mut event, mut id, mut data) = (None, None, String::new());
    for line in frame.lines() {
        match line.split_once(": ") {
            Some(("event", v)) => event = Some(v.to_owned()),
            Some(("id", v)) => id = Some(v.to_owned()),
            Some(("data", v)) => data.push_str(v),
            _ => {}
        }
    }
    let event = event.filter(|e| e != "info")?;
    Some(Envelope {
        event,
        id,
        data: serde_json::from_str(&data).expect("data is JSON"),
        stream: None,
    })
}

/// A request head split over two segments is not for the direct path (it peeks once); hyper
/// serves it, and the stream works the same.
#[tokio::test]
async fn head_split_across_segments() {
    let f = Fixture::start("edge_split", |_| {}).await;
    let request = head(&f.path, "text/event-stream", "");
    let (first, second) = request.split_at(request.len() / 2);
    let mut tcp = TcpStream::connect(f.server.addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.write_all(first.as_bytes()).await.unwrap();
    // Give the server time to see the first segment alone; the assertions below hold whichever
    // path ends up serving the request.
    tokio::time::sleep(Duration::from_millis(100)).await;
    tcp.write_all(second.as_bytes()).await.unwrap();
    let mut response = Raw::read(tcp).await;
    assert!(
        response.head.starts_with("HTTP/1.1 200"),
        "{}",
        response.head
    );
    eprintln!(
        "split head served {}",
        if response.chunked {
            "by hyper"
        } else {
            "directly"
        }
    );
    f.insert_seqs(0..3).await;
    assert_eq!(seqs(&response.changes(3).await), vec![0, 1, 2]);
    f.server.stop().await;
}

/// A head longer than the direct path takes goes to hyper and works; one longer than hyper
/// takes gets 431, not a hang or a panic.
#[tokio::test]
async fn oversized_heads() {
    let f = Fixture::start("edge_big_head", |_| {}).await;
    let padding = format!("X-Padding: {}\r\n", "p".repeat(8 * 1024));
    let request = head(&f.path, "application/x-ndjson", &padding);
    let mut response = Raw::send(f.server.addr, request.as_bytes()).await;
    assert!(
        response.head.starts_with("HTTP/1.1 200"),
        "{}",
        response.head
    );
    assert!(response.chunked, "via hyper: {}", response.head);
    f.insert_seqs(0..2).await;
    assert_eq!(seqs(&response.changes(2).await), vec![0, 1]);

    let huge = format!("X-Padding: {}\r\n", "p".repeat(1024 * 1024));
    let mut tcp = TcpStream::connect(f.server.addr).await.unwrap();
    // The server may answer and close before it has read all of it.
    let _ = tcp
        .write_all(head(&f.path, "application/x-ndjson", &huge).as_bytes())
        .await;
    let (status, _) = read_head(&mut tcp).await;
    assert!(status.starts_with("HTTP/1.1 431"), "{status}");
    f.server.stop().await;
}

/// Bytes after the head in the same segment (a pipelined request) are not part of the
/// subscription: the stream goes on, the bytes are ignored.
#[tokio::test]
async fn pipelined_bytes_after_the_head() {
    let f = Fixture::start("edge_pipelined", |_| {}).await;
    let request = head(&f.path, "text/event-stream", "")
        + "GET /health/live HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut response = Raw::send(f.server.addr, request.as_bytes()).await;
    assert!(
        response.head.starts_with("HTTP/1.1 200"),
        "{}",
        response.head
    );
    f.insert_seqs(0..3).await;
    assert_eq!(seqs(&response.changes(3).await), vec![0, 1, 2]);
    assert!(
        !String::from_utf8_lossy(&response.body).contains("HTTP/1.1"),
        "no second response inside the stream"
    );
    f.server.stop().await;
}

/// A client that half-closes (shuts down its sending side) after the head has hung up, for
/// the direct path as for hyper (`half_close(false)`): the server releases it at once.
#[tokio::test]
async fn half_close_releases_the_client() {
    let f = Fixture::start("edge_half_close", |_| {}).await;
    for (accept, transport) in [
        ("text/event-stream", "sse"),
        ("application/x-ndjson", "ndjson"),
    ] {
        let mut tcp = TcpStream::connect(f.server.addr).await.unwrap();
        tcp.write_all(head(&f.path, accept, "").as_bytes())
            .await
            .unwrap();
        tcp.shutdown().await.unwrap();
        let mut response = Raw::read(tcp).await;
        assert!(
            response.head.starts_with("HTTP/1.1 200"),
            "{}",
            response.head
        );
        assert!(response.next().await.is_none(), "the server closed");
        eventually("the client released", WAIT, async || {
            clients(&f, transport) == 0
        })
        .await;
    }
    f.server.stop().await;
}

/// HTTP/1.0 has no chunked encoding: the stream is close-delimited, and ends with the
/// connection when the stream ends.
#[tokio::test]
async fn http_1_0_streams_without_chunked() {
    let f = Fixture::start("edge_http10", |_| {}).await;
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n",
        f.path
    );
    let mut response = Raw::send(f.server.addr, request.as_bytes()).await;
    assert!(response.head.contains(" 200 "), "{}", response.head);
    assert!(!response.chunked, "{}", response.head);
    f.insert_seqs(0..3).await;
    assert_eq!(seqs(&response.changes(3).await), vec![0, 1, 2]);
    f.coll.drop().await.unwrap();
    let mut rest = Vec::new();
    while let Some(event) = response.next().await {
        rest.push(event.event);
    }
    assert_eq!(
        rest.last().map(String::as_str),
        Some("invalidate"),
        "{rest:?}"
    );
    f.server.stop().await;
}

/// A batch larger than the socket takes at once is written in pieces (partial `writev`s that
/// end inside an event): a slow reader with a small buffer gets every byte, in order.
#[tokio::test]
async fn partial_writes_to_a_slow_reader() {
    let f = Fixture::start("edge_partial", |_| {}).await;
    let mut tcp = connect_small(f.server.addr, 4096).await;
    tcp.write_all(head(&f.path, "application/x-ndjson", "").as_bytes())
        .await
        .unwrap();
    let mut response = Raw::read(tcp).await;
    assert!(!response.chunked, "direct path: {}", response.head);
    // Odd sizes, so write boundaries fall anywhere inside events.
    let docs: Vec<_> = (0..300)
        .map(|seq| doc! { "seq": seq, "pad": "y".repeat(1000 + 37 * seq as usize) })
        .collect();
    f.coll.insert_many(docs).await.unwrap();
    let events = response.changes(300).await;
    assert_eq!(seqs(&events), (0..300).collect::<Vec<i64>>());
    for event in &events {
        let seq = event.data["fullDocument"]["seq"].as_i64().unwrap() as usize;
        assert_eq!(
            event.data["fullDocument"]["pad"].as_str().map(str::len),
            Some(1000 + 37 * seq),
            "event {seq} intact"
        );
    }
    f.server.stop().await;
}
