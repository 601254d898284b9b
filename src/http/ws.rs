//! WebSocket transport: one text frame per envelope, pings as keep-alive, close codes for
//! terminal events (`close_code`; 1001 on shutdown).
//!
//! [`serve`] is generic over the sink and stream halves so it can be driven by channels in
//! unit tests as well as by a real socket.

use std::future::Future;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{Sink, SinkExt, Stream, StreamExt};

use super::feed::{Feed, Frame};
use crate::event::{ErrorCode, EventKind};

/// Close code sent when the server shuts down ("going away").
pub(super) const GOING_AWAY: u16 = 1001;
/// Close code sent when a client's message exceeds the size we accept (RFC 6455 §7.4.1).
pub(super) const MESSAGE_TOO_BIG: u16 = 1009;

/// WebSocket read/write buffer sizes. tungstenite's 128 KiB defaults cost 135 KiB per idle
/// client and a 128 KiB memset on every read (51% of server CPU at 1,000 clients, measured);
/// clients send us little (pings, closes, a multi-stream `subscribe`), and we flush after
/// every batch.
const BUFFER: usize = 4096;

/// Accepts `upgrade` with our buffer sizes and client messages of at most `max_incoming`
/// bytes, then runs `serve` on the socket's two halves.
pub(super) fn accept<F, Fut>(upgrade: WebSocketUpgrade, max_incoming: usize, serve: F) -> Response
where
    F: FnOnce(SplitSink<WebSocket, Message>, SplitStream<WebSocket>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    upgrade
        .max_message_size(max_incoming)
        .read_buffer_size(BUFFER)
        .write_buffer_size(BUFFER)
        .on_upgrade(move |socket| {
            let (sink, incoming) = socket.split();
            serve(sink, incoming)
        })
        .into_response()
}

/// What a client's options add to the framing (PROTOCOL.md §8).
#[derive(Debug, Default, Clone)]
pub struct Extras {
    /// The `info` message, sent first.
    pub info: Option<Bytes>,
    /// `heartbeats=true`: this text message instead of a ping when idle.
    pub heartbeat: Option<Bytes>,
    /// `enveloped=false`: changes as their bare document.
    pub bare: bool,
}

/// Text bytes we encoded ourselves (an event's envelope or `data`, an `info` or heartbeat
/// message) as a text message, sharing the bytes (no copy). `try_from` checks the UTF-8, which
/// our encodings (built from `str`s) always pass; a lossy copy is only the never-taken
/// fallback, so a request cannot make this panic.
pub(crate) fn text(bytes: &Bytes) -> Message {
    let text = Utf8Bytes::try_from(bytes.clone())
        .unwrap_or_else(|_| Utf8Bytes::from(String::from_utf8_lossy(bytes).as_ref()));
    Message::Text(text)
}

/// Runs one WebSocket client until its feed ends, it closes, or the server shuts down.
pub async fn serve<W, R, E>(mut sink: W, mut incoming: R, mut feed: Feed, extras: Extras)
where
    W: Sink<Message> + Unpin,
    R: Stream<Item = Result<Message, E>> + Unpin,
    E: std::error::Error + 'static,
{
    if let Some(info) = &extras.info
        && sink.send(text(info)).await.is_err()
    {
        return;
    }
    loop {
        tokio::select! {
            frame = feed.next() => {
                let outcome = match frame {
                    None => close(&mut sink, 1000, "stream ended").await,
                    Some(Frame::Events(batch)) => write_batch(&mut sink, &mut feed, &batch, extras.bare).await,
                    Some(Frame::KeepAlive) => match &extras.heartbeat {
                        Some(heartbeat) => sink.send(text(heartbeat)).await.map(|_| true),
                        None => sink.send(Message::Ping(Bytes::new())).await.map(|_| true),
                    },
                    Some(Frame::Shutdown) => close(&mut sink, GOING_AWAY, "server shutting down").await,
                };
                match outcome {
                    Ok(true) => {}
                    _ => return,
                }
            }
            message = incoming.next() => match message {
                // Pings are answered by the protocol layer; text from clients is ignored.
                Some(Ok(Message::Close(_))) | None => return,
                Some(Err(error)) => {
                    // Over the size limit the socket is still sound: say why we close it.
                    if too_big(&error) {
                        let _ = close(&mut sink, MESSAGE_TOO_BIG, "message too big").await;
                    }
                    return;
                }
                Some(Ok(_)) => {}
            },
        }
    }
}

/// Whether a read error is a message over the configured maximum size (tungstenite's
/// capacity error, possibly wrapped, as in `axum::Error`).
pub(crate) fn too_big(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if matches!(
            error.downcast_ref::<tokio_tungstenite::tungstenite::Error>(),
            Some(tokio_tungstenite::tungstenite::Error::Capacity(_))
        ) {
            return true;
        }
        cause = error.source();
    }
    false
}

/// Writes a batch; returns `Ok(false)` after a terminal event (then the socket is closed).
async fn write_batch<W: Sink<Message> + Unpin>(
    sink: &mut W,
    feed: &mut Feed,
    batch: &[std::sync::Arc<crate::event::Event>],
    bare: bool,
) -> Result<bool, W::Error> {
    let mut bytes = 0;
    for event in batch {
        if bare && event.kind == crate::event::EventKind::Change {
            let data = event.data();
            bytes += data.len();
            sink.feed(text(&data)).await?;
            continue;
        }
        let envelope = event.envelope();
        bytes += envelope.len();
        sink.feed(text(&envelope)).await?;
        if event.kind.is_terminal() {
            sink.flush().await?;
            feed.delivered(batch.len(), bytes);
            close(sink, close_code(event.kind), event.kind.name()).await?;
            return Ok(false);
        }
    }
    sink.flush().await?;
    feed.delivered(batch.len(), bytes);
    Ok(true)
}

/// Sends a close frame; `Ok(false)`: the connection is over.
pub(super) async fn close<W: Sink<Message> + Unpin>(
    sink: &mut W,
    code: u16,
    reason: &'static str,
) -> Result<bool, W::Error> {
    sink.send(Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    })))
    .await?;
    Ok(false)
}

/// WebSocket close code sent after a terminal event (see README "WebSocket close codes").
pub(super) fn close_code(kind: EventKind) -> u16 {
    match kind {
        EventKind::Change
        | EventKind::Skipped
        | EventKind::Invalidate
        | EventKind::Snapshot
        | EventKind::Ready
        | EventKind::View => 1000,
        EventKind::Cancel => 4001,
        EventKind::AuthRevoked => 4003,
        EventKind::Error(ErrorCode::SlowConsumer) => 4008,
        EventKind::Error(ErrorCode::HistoryLost) => 4010,
        EventKind::Error(ErrorCode::Shutdown) => GOING_AWAY,
        EventKind::Error(ErrorCode::Upstream) => 4000,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use futures::channel::mpsc;
    use mongodb::bson::doc;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::event::{Event, EventKind};
    use crate::http::negotiate::Transport;
    use crate::metrics::Metrics;
    use crate::worker::{ClientGuard, Subscription, Worker, WorkerSettings};

    async fn idle_worker() -> Arc<Worker> {
        crate::worker::test_worker(WorkerSettings::default().ring_size).await
    }

    async fn feed(worker: &Arc<Worker>, shutdown: &CancellationToken) -> Feed {
        let guard = ClientGuard::new(Arc::clone(worker));
        let subscription = Subscription::start(guard, None, None).await.unwrap();
        Feed::new(
            subscription,
            Duration::from_secs(60),
            shutdown.clone(),
            Arc::new(Metrics::new()),
            Transport::WebSocket,
            None,
        )
    }

    fn change(n: i32) -> mongodb::bson::Document {
        doc! { "_id": { "_data": format!("8200000001000000{n:02}") }, "operationType": "insert", "fullDocument": { "n": n } }
    }

    #[tokio::test]
    async fn envelopes_then_close_code_of_the_terminal_event() {
        let worker = idle_worker().await;
        let shutdown = CancellationToken::new();
        let feed = feed(&worker, &shutdown).await;
        let (sink, mut written) = mpsc::unbounded::<Message>();
        let (_client_tx, incoming) = mpsc::unbounded::<Result<Message, std::convert::Infallible>>();
        let task = tokio::spawn(serve(sink, incoming, feed, Extras::default()));

        worker.publish_change_for_test(change(1));
        worker.publish_change_for_test(change(2));
        worker.terminate(Event::control(EventKind::Cancel, "deleted", false));
        task.await.unwrap();

        let mut texts = Vec::new();
        let mut close = None;
        while let Ok(message) = written.try_recv() {
            match message {
                Message::Text(text) => {
                    texts.push(serde_json::from_str::<serde_json::Value>(text.as_str()).unwrap())
                }
                Message::Close(frame) => close = frame.map(|f| f.code),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(texts.len(), 3);
        assert_eq!(texts[0]["event"], "change");
        assert_eq!(texts[0]["id"], "820000000100000001");
        assert_eq!(texts[1]["data"]["fullDocument"]["n"], 2);
        assert_eq!(texts[2]["event"], "cancel");
        assert_eq!(close, Some(4001));
    }

    #[tokio::test]
    async fn shutdown_closes_with_going_away_and_client_close_ends_the_loop() {
        let worker = idle_worker().await;
        let shutdown = CancellationToken::new();
        let (sink, mut written) = mpsc::unbounded::<Message>();
        let (_client_tx, incoming) = mpsc::unbounded::<Result<Message, std::convert::Infallible>>();
        let task = tokio::spawn(serve(
            sink,
            incoming,
            feed(&worker, &shutdown).await,
            Extras::default(),
        ));
        shutdown.cancel();
        task.await.unwrap();
        match written.try_recv() {
            Ok(Message::Close(Some(frame))) => assert_eq!(frame.code, 1001),
            other => panic!("expected a 1001 close, got {other:?}"),
        }

        let (sink, _written) = mpsc::unbounded::<Message>();
        let (client_tx, incoming) = mpsc::unbounded::<Result<Message, std::convert::Infallible>>();
        let task = tokio::spawn(serve(
            sink,
            incoming,
            feed(&worker, &CancellationToken::new()).await,
            Extras::default(),
        ));
        client_tx.unbounded_send(Ok(Message::Close(None))).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(worker.client_count(), 0, "both clients released the worker");
    }
}
