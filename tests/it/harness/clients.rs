//! Test clients for the three transports, all yielding the same [`Envelope`].

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Transport under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Server-Sent Events.
    Sse,
    /// WebSocket.
    Ws,
    /// NDJSON.
    Ndjson,
}

/// One received event, whatever the transport.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// `change`, `error`, `cancel`, …
    pub event: String,
    /// The id (`Some("")` for an SSE empty `id:` line).
    pub id: Option<String>,
    /// The payload.
    pub data: Value,
    /// The stream a multi-stream envelope names (NDJSON / WebSocket; SSE carries the whole
    /// envelope in `data`).
    pub stream: Option<String>,
}

/// What [`Client::next`] saw.
#[derive(Debug)]
pub enum Next {
    /// An event.
    Event(Envelope),
    /// The server ended the stream (WebSocket: with this close code).
    End(Option<u16>),
    /// Nothing within the timeout.
    Timeout,
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

enum Inner {
    Text {
        body: Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send + Unpin>,
        buffer: String,
        /// Leading bytes of `buffer` already searched for a frame's end (not found): a large
        /// frame arriving in many chunks is scanned once, not once per chunk.
        scanned: usize,
        sse: bool,
    },
    Ws(Box<WsStream>),
}

/// A connected client.
pub struct Client {
    inner: Inner,
    /// Response headers (empty for WebSocket).
    pub headers: reqwest::header::HeaderMap,
    /// The SSE `retry:` value seen, if any.
    pub retry: Option<u64>,
    /// Last id seen (as a browser would track it).
    pub last_id: Option<String>,
    /// Comment / empty-line keep-alives seen.
    pub keepalives: usize,
    /// The `info` event sent on connect (PROTOCOL.md §8); [`Client::next`] does not return it.
    pub info: Option<Envelope>,
}

/// A refused connection.
#[derive(Debug)]
pub struct Refused {
    /// HTTP status.
    pub status: u16,
    /// Response body.
    pub body: String,
    /// Content type.
    pub content_type: String,
}

impl Client {
    /// Connects `kind` to `base` (`http://addr`) + `path`, with an optional `Last-Event-ID`
    /// header (WebSocket: must use the query parameter instead).
    pub async fn connect(
        kind: Kind,
        base: &str,
        path: &str,
        last_event_id: Option<&str>,
    ) -> Result<Client, Refused> {
        match kind {
            Kind::Ws => {
                let url = format!("{}{}", base.replacen("http://", "ws://", 1), path);
                let request = url.into_client_request().unwrap();
                match tokio_tungstenite::connect_async(request).await {
                    Ok((socket, _)) => Ok(Client {
                        inner: Inner::Ws(Box::new(socket)),
                        headers: Default::default(),
                        retry: None,
                        last_id: None,
                        keepalives: 0,
                        info: None,
                    }),
                    Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(Refused {
                        status: response.status().as_u16(),
                        content_type: response
                            .headers()
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned(),
                        body: String::from_utf8_lossy(response.body().as_deref().unwrap_or(&[]))
                            .into_owned(),
                    }),
                    Err(other) => panic!("websocket connect failed: {other}"),
                }
            }
            Kind::Sse | Kind::Ndjson => {
                let accept = if kind == Kind::Sse {
                    "text/event-stream"
                } else {
                    "application/x-ndjson"
                };
                let mut request = reqwest::Client::new()
                    .get(format!("{base}{path}"))
                    .header("accept", accept);
                if let Some(id) = last_event_id {
                    request = request.header("last-event-id", id);
                }
                let response = request.send().await.expect("request");
                let status = response.status().as_u16();
                let headers = response.headers().clone();
                if status != 200 {
                    return Err(Refused {
                        status,
                        content_type: headers
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned(),
                        body: response.text().await.unwrap_or_default(),
                    });
                }
                Ok(Client {
                    inner: Inner::Text {
                        body: Box::new(response.bytes_stream()),
                        buffer: String::new(),
                        scanned: 0,
                        sse: kind == Kind::Sse,
                    },
                    headers,
                    retry: None,
                    last_id: None,
                    keepalives: 0,
                    info: None,
                })
            }
        }
    }

    /// Reads and discards every event in a task of its own until the handle is dropped (or
    /// the stream ends): a client kept connected only to keep its worker running, whose
    /// socket must not fill up and be cut as a slow consumer when a test writes megabytes.
    pub fn drain_in_background(mut self) -> tokio_util::task::AbortOnDropHandle<()> {
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            while !matches!(self.next(Duration::from_secs(3600)).await, Next::End(_)) {}
        }))
    }

    /// Waits up to `timeout` for the next event.
    pub async fn next(&mut self, timeout: Duration) -> Next {
        let deadline = Instant::now() + timeout;
        loop {
            // A complete frame already buffered?
            if let Inner::Text {
                buffer,
                scanned,
                sse,
                ..
            } = &mut self.inner
            {
                let separator = if *sse { "\n\n" } else { "\n" };
                // (A separator may straddle the end of what was scanned.)
                let from = scanned.saturating_sub(separator.len() - 1);
                let found = memchr::memmem::find(&buffer.as_bytes()[from..], separator.as_bytes())
                    .map(|at| from + at);
                *scanned = if found.is_some() { 0 } else { buffer.len() };
                if let Some(end) = found {
                    let frame: String = buffer.drain(..end + separator.len()).collect();
                    let frame = &frame[..end];
                    let sse = *sse;
                    if let Some(envelope) = self.parse_frame(frame, sse) {
                        if let Some(id) = &envelope.id {
                            self.last_id = Some(id.clone());
                        }
                        if envelope.event == "info" {
                            self.info = Some(envelope);
                            continue;
                        }
                        return Next::Event(envelope);
                    }
                    continue;
                }
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Next::Timeout;
            }
            match &mut self.inner {
                Inner::Text { body, buffer, .. } => {
                    match tokio::time::timeout(remaining, body.next()).await {
                        Err(_) => return Next::Timeout,
                        Ok(None) | Ok(Some(Err(_))) => return Next::End(None),
                        Ok(Some(Ok(chunk))) => {
                            buffer.push_str(std::str::from_utf8(&chunk).expect("utf-8 body"))
                        }
                    }
                }
                Inner::Ws(socket) => match tokio::time::timeout(remaining, socket.next()).await {
                    Err(_) => return Next::Timeout,
                    Ok(None) | Ok(Some(Err(_))) => return Next::End(None),
                    Ok(Some(Ok(Message::Close(frame)))) => {
                        return Next::End(frame.map(|f| u16::from(f.code)));
                    }
                    Ok(Some(Ok(Message::Text(text)))) => {
                        let envelope = parse_envelope(&text);
                        if let Some(id) = &envelope.id {
                            self.last_id = Some(id.clone());
                        }
                        if envelope.event == "info" {
                            self.info = Some(envelope);
                            continue;
                        }
                        return Next::Event(envelope);
                    }
                    Ok(Some(Ok(Message::Ping(_)))) => self.keepalives += 1,
                    Ok(Some(Ok(_))) => {}
                },
            }
        }
    }

    fn parse_frame(&mut self, frame: &str, sse: bool) -> Option<Envelope> {
        if !sse {
            if frame.trim().is_empty() {
                self.keepalives += 1;
                return None;
            }
            return Some(parse_envelope(frame));
        }
        let mut id = None;
        let mut event = None;
        let mut data = String::new();
        for line in frame.lines() {
            if line.starts_with(':') {
                self.keepalives += 1;
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "id" => id = Some(value.to_owned()),
                "event" => event = Some(value.to_owned()),
                "data" => data.push_str(value),
                "retry" => self.retry = value.parse().ok(),
                other => panic!("unexpected SSE field {other:?}"),
            }
        }
        let event = event?;
        Some(Envelope {
            event,
            id,
            data: serde_json::from_str(&data).expect("SSE data is JSON on one line"),
            stream: None,
        })
    }

    /// Next event or panic.
    pub async fn expect_event(&mut self, timeout: Duration) -> Envelope {
        match self.next(timeout).await {
            Next::Event(envelope) => envelope,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    /// Asserts that nothing but keep-alives arrives for `quiet`.
    pub async fn expect_quiet(&mut self, quiet: Duration) {
        match self.next(quiet).await {
            Next::Timeout => {}
            other => panic!("expected nothing, got {other:?}"),
        }
    }

    /// Collects `n` change events (panics on anything else or on timeout).
    pub async fn changes(&mut self, n: usize, timeout: Duration) -> Vec<Envelope> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.next(remaining).await {
                Next::Event(e) if e.event == "change" => out.push(e),
                other => panic!("after {} of {n} changes: {other:?}", out.len()),
            }
        }
        out
    }

    /// Sends a WebSocket text message (panics for other transports).
    pub async fn send_text(&mut self, text: &str) {
        match &mut self.inner {
            Inner::Ws(socket) => socket.send(Message::text(text)).await.expect("sent"),
            Inner::Text { .. } => panic!("only a WebSocket client can send"),
        }
    }

    /// Sends a WebSocket close (no-op for other transports).
    pub async fn close(&mut self) {
        if let Inner::Ws(socket) = &mut self.inner {
            let _ = socket.send(Message::Close(None)).await;
        }
    }
}

/// Parses a `{"event","id","data"}` envelope (multi-stream: `{"stream",…}` too, kept in
/// `data` as the whole envelope's `stream` field is read by `Envelope::stream`).
pub fn parse_envelope(text: &str) -> Envelope {
    let value: Value = serde_json::from_str(text).expect("envelope is JSON");
    Envelope {
        event: value["event"].as_str().expect("event name").to_owned(),
        id: value.get("id").and_then(Value::as_str).map(str::to_owned),
        stream: value
            .get("stream")
            .and_then(Value::as_str)
            .map(str::to_owned),
        data: value["data"].clone(),
    }
}

/// A client that never reads its socket: it sends an SSE request over HTTP/1.0 (a
/// close-delimited body, so the raw bytes are the SSE text) from a socket with a 4 KB receive
/// buffer, reads the response head and then nothing more, so the socket fills at once with
/// what the server sends. Returns the socket and the bytes read so far (the head, maybe more).
/// The head comes only once the subscription is attached (a refusal would need another
/// status), so every change written afterwards is meant for this client.
pub async fn stalled_sse(
    addr: std::net::SocketAddr,
    path: &str,
) -> (tokio::net::TcpStream, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut chunk))
            .await
            .expect("response head in time")
            .unwrap();
        assert!(n > 0, "connection closed before the response head");
        head.extend_from_slice(&chunk[..n]);
    }
    (stream, head)
}

/// The frames of a raw HTTP/1.0 SSE response (a [`stalled_sse`] client's bytes): `(id, event,
/// data)` for each frame with an event and JSON data.
pub fn parse_raw_sse(raw: &str) -> Vec<(Option<String>, String, Value)> {
    let body = raw.split_once("\r\n\r\n").expect("headers").1;
    body.split("\n\n")
        .filter_map(|frame| {
            let mut id = None;
            let mut event = None;
            let mut data = None;
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("event: ") {
                    event = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(v).ok();
                }
            }
            Some((id, event?, data?))
        })
        .collect()
}
