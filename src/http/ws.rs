//! WebSocket transport: one text frame per envelope, pings as keep-alive, close codes for
//! terminal events (`EventKind::ws_close_code`; 1001 on shutdown).
//!
//! [`serve`] is generic over the sink and stream halves so it can be driven by channels in
//! unit tests as well as by a real socket.

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use bytes::Bytes;
use futures::{Sink, SinkExt, Stream, StreamExt};

use super::feed::{Feed, Frame};

/// Close code sent when the server shuts down ("going away").
const GOING_AWAY: u16 = 1001;

/// Runs one WebSocket client until its feed ends, it closes, or the server shuts down.
pub async fn serve<W, R, E>(mut sink: W, mut incoming: R, mut feed: Feed)
where
    W: Sink<Message> + Unpin,
    R: Stream<Item = Result<Message, E>> + Unpin,
{
    loop {
        tokio::select! {
            frame = feed.next() => {
                let outcome = match frame {
                    None => close(&mut sink, 1000, "stream ended").await,
                    Some(Frame::Events(batch)) => write_batch(&mut sink, &feed, &batch).await,
                    Some(Frame::KeepAlive) => sink.send(Message::Ping(Bytes::new())).await.map(|_| true),
                    Some(Frame::Shutdown) => close(&mut sink, GOING_AWAY, "server shutting down").await,
                };
                match outcome {
                    Ok(true) => {}
                    _ => return,
                }
            }
            message = incoming.next() => match message {
                // Pings are answered by the protocol layer; text from clients is ignored.
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

/// Writes a batch; returns `Ok(false)` after a terminal event (then the socket is closed).
async fn write_batch<W: Sink<Message> + Unpin>(
    sink: &mut W,
    feed: &Feed,
    batch: &[std::sync::Arc<crate::event::Event>],
) -> Result<bool, W::Error> {
    let mut bytes = 0;
    for event in batch {
        bytes += event.ws.len();
        sink.feed(Message::Text(event.ws.clone())).await?;
        if event.kind.is_terminal() {
            sink.flush().await?;
            feed.delivered(batch.len(), bytes);
            close(sink, event.kind.ws_close_code(), event.kind.name()).await?;
            return Ok(false);
        }
    }
    sink.flush().await?;
    feed.delivered(batch.len(), bytes);
    Ok(true)
}

async fn close<W: Sink<Message> + Unpin>(
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
