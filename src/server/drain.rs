//! Graceful shutdown of the listeners' connections, at no cost per request.
//!
//! hyper-util's `GracefulShutdown` wraps each connection in a future that polls a `watch`
//! channel's `changed()` before every poll of the connection — several times per request, each
//! time under a lock that all connections share (~1k instructions per call under callgrind,
//! docs/benchmarks.md). Here a connection's task registers with the shutdown signal once, on
//! its first poll; after that each poll reads one flag that is written once, at shutdown. On
//! shutdown every connection is told to finish its in-flight request and close
//! (`graceful_shutdown`: a keep-alive connection closes at once), and [`Drain::shutdown`] waits
//! until all of them have ended.

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{Notify, watch};

/// A hyper connection that can be asked to finish and close.
pub trait Connection: Future {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S> Connection for hyper::server::conn::http1::Connection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http1::Connection::graceful_shutdown(self);
    }
}

/// The shutdown signal of one listener's connections.
pub struct Drain {
    stopping: Arc<Stopping>,
    /// Every connection holds a receiver; `closed()` resolves when the last one has ended.
    open: watch::Sender<()>,
}

struct Stopping {
    flag: AtomicBool,
    notify: Notify,
}

impl Drain {
    pub fn new() -> Self {
        Self {
            stopping: Arc::new(Stopping {
                flag: AtomicBool::new(false),
                notify: Notify::new(),
            }),
            open: watch::Sender::new(()),
        }
    }

    /// A connection's place in the drain, taken when it is accepted (before a TLS handshake,
    /// so shutdown waits for that too).
    pub fn watcher(&self) -> Watcher {
        Watcher {
            stopping: self.stopping.clone(),
            open: self.open.subscribe(),
        }
    }

    /// Tells every connection to finish and close, and waits until all have.
    pub async fn shutdown(self) {
        self.stopping.flag.store(true, Ordering::Release);
        self.stopping.notify.notify_waiters();
        self.open.closed().await;
    }
}

/// One connection's handle on the shutdown signal ([`Drain::watcher`]).
pub struct Watcher {
    stopping: Arc<Stopping>,
    open: watch::Receiver<()>,
}

impl Watcher {
    /// Runs `conn` to its end; once shutdown begins, it finishes what it is doing and closes.
    pub async fn watch<C: Connection>(self, conn: C) -> C::Output {
        let Watcher { stopping, open } = self;
        let _open = open;
        let mut conn = pin!(conn);
        let mut signal = pin!(stopping.notify.notified());
        let (mut registered, mut draining) = (false, false);
        poll_fn(|cx| {
            if !draining {
                // Polled once, the signal keeps this task's waker (a task's waker stays the
                // same) and wakes it at shutdown; later polls only read the flag.
                if !registered {
                    registered = true;
                    let _ = signal.as_mut().poll(cx);
                }
                if stopping.flag.load(Ordering::Acquire) {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            conn.as_mut().poll(cx)
        })
        .await
    }
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}
