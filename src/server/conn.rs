//! A connection's socket, with two things hyper does not do itself:
//!
//! - **A write timeout.** A write that makes no progress for `write_timeout` fails the
//!   connection, so a client that stops reading cannot hold its answer in memory (and its
//!   place among the calls) for ever. No timer is armed while writes go through.
//! - **A lingering close**, as nginx's `lingering_close`: when the connection closes, its write
//!   side is shut first, then what the client still sends is read and thrown away, while it
//!   keeps coming (a pause of [`LINGER_PAUSE`] ends it), for at most [`LINGER_FOR`] or
//!   [`LINGER_BYTES`], before the socket is closed. A client that sends its
//!   whole body before it reads (Python's `http.client`, `requests`, `httpx`) then receives the
//!   413 it was given instead of a reset that discards it, and so does one refused before its
//!   `Expect: 100-continue` body.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// How long a closing connection is read from at most.
const LINGER_FOR: Duration = Duration::from_secs(5);
/// A closing connection that sends nothing for this long is closed: an idle client is not
/// waited for.
const LINGER_PAUSE: Duration = Duration::from_millis(500);
/// How much a closing connection is read at most.
const LINGER_BYTES: usize = 64 * 1024 * 1024;

pub(super) struct Conn {
    stream: TcpStream,
    write_timeout: Duration,
    /// Armed when a write could not proceed; disarmed by the next one that does.
    stalled: Option<Pin<Box<Sleep>>>,
    /// Set once the write side is shut: the pause timer, when lingering must end at the latest,
    /// and how much was read and discarded.
    linger: Option<(Pin<Box<Sleep>>, tokio::time::Instant, usize)>,
}

impl Conn {
    pub(super) fn new(stream: TcpStream, write_timeout: Duration) -> Self {
        Self {
            stream,
            write_timeout,
            stalled: None,
            linger: None,
        }
    }

    /// A write's result, with the timeout applied to one that cannot proceed.
    fn timed<T>(&mut self, cx: &mut Context<'_>, written: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if written.is_ready() {
            self.stalled = None;
            return written;
        }
        let timeout = self.write_timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        ready!(stalled.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client read nothing of the answer in time",
        )))
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.timed(cx, written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.timed(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.linger.is_none() {
            let shut = Pin::new(&mut this.stream).poll_shutdown(cx);
            ready!(this.timed(cx, shut))?;
            let now = tokio::time::Instant::now();
            this.linger = Some((Box::pin(tokio::time::sleep(LINGER_PAUSE)), now + LINGER_FOR, 0));
        }
        let (pause, until, read) = this.linger.as_mut().expect("set above");
        let mut scratch = [0u8; 8192];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.stream).poll_read(cx, &mut buf) {
                // The client closed its side (or the connection failed): nothing left to wait for.
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    *read += buf.filled().len();
                    let now = tokio::time::Instant::now();
                    if *read >= LINGER_BYTES || now >= *until {
                        return Poll::Ready(Ok(()));
                    }
                    pause.as_mut().reset((now + LINGER_PAUSE).min(*until));
                }
                Poll::Pending => {
                    ready!(pause.as_mut().poll(cx));
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}
