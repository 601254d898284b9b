//! A connection's socket with a write deadline and an activity clock.
//!
//! [`Deadline`] wraps the IO of every connection, both on the direct SSE/NDJSON path and under
//! hyper (where it also stays under an upgraded WebSocket), so one mechanism covers every
//! transport:
//!
//! - **Write deadline.** A write (or flush) that cannot make progress arms a timer of `stall`;
//!   any bytes the socket accepts disarm it. When it fires, the write fails with `TimedOut`,
//!   the writer gives up and the connection is dropped. Without it a peer that stops reading
//!   (zero receive window) pins its task, its socket and its place in the worker forever.
//!   The timer is one allocation, made the first time a write has to wait.
//! - **Activity clock.** The time of the last byte read or written, shared with the accept
//!   loop, which closes keep-alive connections idle for too long.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// When a connection last moved a byte, readable from another task.
#[derive(Debug)]
pub struct Activity {
    /// The connection's start; `last` counts from it.
    base: Instant,
    /// Milliseconds from `base` to the last byte read or written.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            base: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    /// When the last byte was read or written (the connection's start if none yet).
    pub fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }
}

/// IO with a write deadline (see the module docs).
pub struct Deadline<T> {
    io: T,
    /// How long a write may wait for the peer to accept a byte.
    stall: Duration,
    /// Created on the first write that has to wait, then reused.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether `timer` runs for the current wait (set on `Pending`, cleared on progress).
    armed: bool,
    activity: Arc<Activity>,
    /// Counts connections closed by the deadline (`streamgate_slow_consumers_total`).
    stalled: Counter,
    /// Whether this connection's stall was counted.
    counted: bool,
}

impl<T> Deadline<T> {
    /// Wraps `io`; writes fail after `stall` without progress, counted in `stalled`.
    pub fn new(io: T, stall: Duration, stalled: Counter) -> Deadline<T> {
        Deadline {
            io,
            stall,
            stalled,
            counted: false,
            timer: None,
            armed: false,
            activity: Arc::new(Activity::new()),
        }
    }

    /// The wrapped IO (for readiness checks and peeking that need the concrete type).
    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// The activity clock, to watch from another task.
    pub fn activity(&self) -> Arc<Activity> {
        Arc::clone(&self.activity)
    }

    /// Bookkeeping after a write-side poll: progress disarms the timer, waiting arms it and
    /// fails once it has run out.
    fn after_write<R>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        match poll {
            Poll::Ready(result) => {
                self.armed = false;
                self.activity.touch();
                Poll::Ready(result)
            }
            Poll::Pending => {
                let deadline = Instant::now() + self.stall;
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !self.armed {
                    timer.as_mut().reset(deadline);
                    self.armed = true;
                }
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        // Still armed: a writer that retries fails at once, and is counted once.
                        if !std::mem::replace(&mut self.counted, true) {
                            self.stalled.inc();
                        }
                        Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the peer accepted no bytes within the stall timeout",
                        )))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Deadline<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Deadline<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        this.after_write(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.after_write(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_flush(cx);
        this.after_write(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A pipe whose reader stops: the writer fails after the stall timeout, not before, and
    /// reading a little at a time keeps it going.
    #[tokio::test]
    async fn write_fails_after_stall_without_progress() {
        let stall = Duration::from_millis(300);
        let (a, mut b) = tokio::io::duplex(64);
        let stalled = Counter::default();
        let mut io = Deadline::new(a, stall, stalled.clone());
        io.write_all(&[0; 64]).await.unwrap();
        // Reads 16 bytes every 100 ms: no wait reaches the deadline, 128 more bytes go through.
        let reader = async {
            let mut chunk = [0u8; 16];
            for _ in 0..8 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                b.read_exact(&mut chunk).await.unwrap();
            }
            b
        };
        let writer = async {
            let start = Instant::now();
            io.write_all(&[1; 128]).await.unwrap();
            (io, start.elapsed())
        };
        let (_b, (mut io, took)) = tokio::join!(reader, writer);
        assert!(
            took > stall,
            "the slow reader kept the writer going for {took:?}"
        );
        // Nobody reads any more: the pipe is full, the next write times out after `stall`.
        let start = Instant::now();
        let error = io.write_all(&[2; 16]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(stalled.get(), 1, "the stall is counted once");
        let took = start.elapsed();
        assert!(took >= stall && took < stall * 5, "{took:?}");
    }
}
