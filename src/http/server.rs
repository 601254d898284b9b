//! The accept loop. Ordinary requests and WebSocket upgrades go to hyper; SSE and NDJSON
//! subscriptions are answered by the same router but written straight to the socket.
//!
//! Why: for as long as a streaming response lives, hyper keeps an 8 KiB read buffer and an
//! 8 KiB header buffer per connection (neither configurable smaller), which was 16 of the
//! 19.5 KiB an idle SSE client cost. Here the request head is *peeked* (nothing consumed): if it
//! is a complete `GET …/_streams/…` asking for `text/event-stream` or `application/x-ndjson`,
//! we consume it, run the router (auth, limits, negotiation: everything identical), write the
//! response head ourselves and then the body chunks with `writev`, closing the connection at
//! the end (close-delimited body, RFC 9112 §6.3). Anything else, including a head that did not
//! arrive in one segment, is left untouched for hyper.
//!
//! A connection from a peer in `trusted_proxies` may start with a PROXY protocol header (v1 or
//! v2, haproxy's `send-proxy`): it is read and consumed first (within the head timeout), and
//! its source address stands for the peer from then on, on both paths (`ConnectInfo`). From
//! any other peer nothing is parsed (see `auth::proxy`).
//!
//! Every connection's socket is wrapped in a [`Deadline`]: a client whose socket accepts no
//! bytes for `stall_timeout_secs` while we have some to write is closed, on the direct path,
//! under hyper and after a WebSocket upgrade alike. While a direct-path client stalls, its task
//! holds only the chunks queued for one `writev` (at most [`MAX_IOVECS`] `Bytes` handles to
//! event encodings shared with the worker's ring, no copies) and the socket's kernel buffers;
//! it pulls nothing more from its feed until the socket moves again, so its backlog stays in
//! the shared ring.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderName, HeaderValue, Request, header};
use bytes::{Buf, Bytes};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::deadline::Deadline;
use super::negotiate::{Transport, negotiate};
use crate::auth::proxy::{TrustedProxies, read_proxy_header};

/// Largest request head we answer directly; longer ones go through hyper.
const MAX_DIRECT_HEAD: usize = 4096;
/// Most headers in a request head we answer directly.
const MAX_DIRECT_HEADERS: usize = 32;
/// Most body chunks (events) written in one `writev`.
const MAX_IOVECS: usize = 64;
/// `TCP_NOTSENT_LOWAT`: the kernel takes more bytes for a socket only while less than this is
/// queued unsent, and reports it writable again below half of it. Without it, a socket's send
/// buffer autotunes up to `tcp_wmem` max (4 MiB): a lagging client then pins megabytes of
/// kernel memory, and a writer sees progress only each time a third of that has drained, so
/// a client reading slowly but steadily (say 40 KiB/s) would look stalled for tens of seconds.
/// With it, progress is visible every 64 KiB read and unsent data per client stays small.
const NOTSENT_LOWAT: u32 = 128 * 1024;

/// Per-connection time limits (from the config).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// How long a write may wait for the peer to accept a byte (`stall_timeout_secs`).
    pub stall: Duration,
    /// How long a connection may take to send a complete request head, the first counted from
    /// accept, later ones from the end of the previous response (`head_timeout_secs`).
    pub head: Duration,
    /// How long a kept-alive connection may move no bytes either way (`idle_timeout_secs`).
    pub idle: Duration,
}

/// Accepts connections until `shutdown` fires. Connection tasks run on `connections`; the
/// caller waits for them (bounded) after this returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    connections: TaskTracker,
    timeouts: Timeouts,
    stalled: Counter,
    trusted: Arc<TrustedProxies>,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (mut tcp, mut peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Events are small and latency matters: no Nagle delay.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        if let Err(error) = limit_unsent(&tcp) {
            tracing::debug!(%error, "cannot set TCP_NOTSENT_LOWAT");
        }
        let router = router.clone();
        let shutdown = shutdown.clone();
        let head_deadline = Instant::now() + timeouts.head;
        let stalled = stalled.clone();
        let from_proxy = trusted.trusts(peer.ip());
        connections.spawn(async move {
            if from_proxy {
                match tokio::time::timeout_at(head_deadline, read_proxy_header(&mut tcp)).await {
                    Ok(Ok(Some(source))) => peer = source,
                    Ok(Ok(None)) => {}
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "connection from a trusted proxy dropped");
                        return;
                    }
                    Err(_) => return,
                }
            }
            let io = Deadline::new(tcp, timeouts.stall, stalled);
            match tokio::time::timeout_at(head_deadline, stream_request(io.get_ref(), peer)).await {
                Ok(Some((head_len, request))) => direct(io, head_len, request, router).await,
                Ok(None) => {
                    through_hyper(io, peer, router, shutdown, timeouts, head_deadline).await;
                }
                // Not even a first segment in time.
                Err(_) => {}
            }
        });
    }
}

/// Sets [`NOTSENT_LOWAT`] on a socket (Linux only; elsewhere the kernel default stays).
#[cfg(target_os = "linux")]
fn limit_unsent(tcp: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(NOTSENT_LOWAT).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid socket descriptor (borrowed for the call) and a pointer to a live c_int
    // of the length passed.
    let result = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn limit_unsent(_tcp: &TcpStream) -> std::io::Result<()> {
    Ok(())
}

/// Peeks at the request head; returns it when it is a stream subscription we answer directly.
async fn stream_request(tcp: &TcpStream, peer: SocketAddr) -> Option<(usize, Request<Body>)> {
    // On the heap, freed on return: an array here would live in the connection task's future,
    // which is sized for its largest state and kept for the connection's whole life (4 KiB of
    // every idle client's memory).
    let mut buffer = vec![0u8; MAX_DIRECT_HEAD];
    tcp.readable().await.ok()?;
    let peeked = tcp.peek(&mut buffer).await.ok()?;
    let mut headers = [httparse::EMPTY_HEADER; MAX_DIRECT_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(&buffer[..peeked]) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return None,
    };
    if parsed.method != Some("GET") || parsed.version != Some(1) {
        return None;
    }
    let path = parsed.path?;
    // A single stream (`/db/coll/_streams/name`) or many (`/_streams?streams=…`).
    if !path.contains("/_streams/") && path != "/_streams" && !path.starts_with("/_streams?") {
        return None;
    }
    let mut request = Request::get(path).body(Body::empty()).ok()?;
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        request.headers_mut().append(name, value);
    }
    // The router's own negotiation decides: SSE and NDJSON are written here, WebSocket (and
    // anything it refuses, answered by the router) go to hyper.
    if !matches!(
        negotiate(request.headers()),
        Ok(Transport::Sse | Transport::Ndjson)
    ) {
        return None;
    }
    request.extensions_mut().insert(ConnectInfo(peer));
    Some((head_len, request))
}

/// Answers a stream request without hyper: router → our own head → body chunks → close.
async fn direct(
    mut io: Deadline<TcpStream>,
    head_len: usize,
    request: Request<Body>,
    router: Router,
) {
    // Consume the head we peeked (it is all in the socket buffer already).
    let mut head = vec![0u8; head_len];
    if io.read_exact(&mut head).await.is_err() {
        return;
    }
    drop(head);
    let response = match router.oneshot(request).await {
        Ok(response) => response,
        Err(infallible) => match infallible {},
    };
    let (parts, mut body) = response.into_parts();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (name, value) in &parts.headers {
        if name == header::CONNECTION || name == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // RFC 9110 §6.6.1: an origin server with a clock must send `Date` (hyper does; so do we).
    if !parts.headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"connection: close\r\n\r\n");
    let mut pending: VecDeque<Bytes> = VecDeque::from([Bytes::from(out)]);
    let mut probe = [0u8; 64];
    // Set once the body has returned its last frame (or an error): a finished body must never
    // be polled again (`futures::stream::unfold` panics if it is).
    let mut ended = false;
    while !ended {
        // Fails after `stall` without progress: the task then drops the socket and the feed.
        if write_all(&mut io, &mut pending).await.is_err() {
            return;
        }
        tokio::select! {
            frame = body.frame() => match frame {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        pending.push_back(data);
                    }
                    // Take every chunk that is ready now: one writev for a whole batch.
                    while pending.len() < MAX_IOVECS {
                        match futures::FutureExt::now_or_never(body.frame()) {
                            Some(Some(Ok(frame))) => {
                                if let Ok(data) = frame.into_data() {
                                    pending.push_back(data);
                                }
                            }
                            // The body ended inside the batch: write what is queued, then close.
                            Some(Some(Err(_)) | None) => {
                                ended = true;
                                break;
                            }
                            None => break,
                        }
                    }
                }
                Some(Err(_)) | None => ended = true,
            },
            // The client hung up (EOF) or sent something we do not expect mid-stream.
            readable = io.get_ref().readable() => {
                if readable.is_err() {
                    return;
                }
                match io.get_ref().try_read(&mut probe) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        }
    }
    let _ = write_all(&mut io, &mut pending).await;
    let _ = io.shutdown().await;
}

/// Writes every queued chunk with `writev`, handling partial writes.
async fn write_all(
    io: &mut Deadline<TcpStream>,
    pending: &mut VecDeque<Bytes>,
) -> std::io::Result<()> {
    while !pending.is_empty() {
        let slices: Vec<IoSlice<'_>> = pending
            .iter()
            .take(MAX_IOVECS)
            .map(|b| IoSlice::new(b))
            .collect();
        let mut written = io.write_vectored(&slices).await?;
        drop(slices);
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let Some(front) = pending.front_mut() else {
                break;
            };
            if written >= front.len() {
                written -= front.len();
                pending.pop_front();
            } else {
                front.advance(written);
                written = 0;
            }
        }
    }
    Ok(())
}

/// Serves a connection with hyper (HTTP/1.1 keep-alive, WebSocket upgrades).
async fn through_hyper(
    io: Deadline<TcpStream>,
    peer: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
    timeouts: Timeouts,
    head_deadline: Instant,
) {
    let activity = io.activity();
    // Set when hyper hands over the first complete request head.
    let started = Arc::new(AtomicBool::new(false));
    let service = hyper::service::service_fn({
        let started = Arc::clone(&started);
        move |mut request: Request<hyper::body::Incoming>| {
            started.store(true, Ordering::Relaxed);
            request.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(request.map(Body::new))
        }
    });
    // hyper's header-read timer starts each time it waits for a head, the first one and every
    // one after a keep-alive response (so it also bounds a silent idle connection).
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.head)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    // Wakes at the first head's deadline (counted from accept, which hyper's timer is not)
    // and whenever the connection could have become idle for too long.
    let timer = tokio::time::sleep_until(head_deadline.min(Instant::now() + timeouts.idle));
    tokio::pin!(timer);
    let mut timer_armed = true;
    let mut shutting_down = false;
    let mut idle_closed = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection error");
                }
                return;
            }
            _ = shutdown.cancelled(), if !shutting_down => {
                connection.as_mut().graceful_shutdown();
                shutting_down = true;
            }
            _ = timer.as_mut(), if timer_armed => {
                let now = Instant::now();
                let started = started.load(Ordering::Relaxed);
                if !started && now >= head_deadline {
                    // No complete first head in time: drop the connection.
                    return;
                }
                let idle_until = activity.last() + timeouts.idle;
                if !idle_closed && now >= idle_until {
                    // Closes an idle connection at once; one in the middle of a request (a
                    // head still arriving, a response streaming) finishes it without
                    // keep-alive.
                    connection.as_mut().graceful_shutdown();
                    idle_closed = true;
                }
                let next = match (started, idle_closed) {
                    (false, false) => Some(head_deadline.min(idle_until)),
                    (false, true) => Some(head_deadline),
                    (true, false) => Some(idle_until),
                    (true, true) => None,
                };
                match next {
                    Some(at) => timer.as_mut().reset(at),
                    None => timer_armed = false,
                }
            }
        }
    }
}
