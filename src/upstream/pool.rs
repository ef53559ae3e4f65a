//! Keep-alive HTTP/1.1 connections to the tools, pooled per origin (scheme, `host:port`).
//!
//! hyper-util's legacy client did this before, and it was the largest single cost of a
//! forwarded call after the checks themselves (~6k instructions under callgrind,
//! docs/benchmarks.md): per call it hashes the pool key with SipHash twice, races the checkout
//! against a lazily built connect future, wraps the connection in a guard whose drop locks the
//! pool again, and copies the request through two layers. What toolgate needs is smaller, and
//! is all here:
//!
//! - an idle connection is taken (newest first: the warmest) under one short lock, and given
//!   back after its response was read to the end; connections idle longer than the timeout,
//!   or closed by the tool, are dropped when met;
//! - idle connections are kept per thread (a shard each, picked by a thread-local index): the
//!   data plane runs one event loop per core (`server::workers`), and a connection is driven
//!   by the loop that opened it, so a call reuses its own loop's connections and the tool's
//!   answer wakes the same thread — no lock or cache line shared between cores per call. As in
//!   Envoy's per-worker pools, `max_idle_per_host` is per thread;
//! - a new connection is opened only when none is idle (hyper's `HttpConnector`: DNS, connect
//!   timeout, `TCP_NODELAY`; for `https://` tools, TLS through `hyper-rustls` with the system's
//!   trust store), and its connection task runs on its own;
//! - **a request is sent again only if it was never written**: a pooled connection the tool
//!   closed while it sat idle hands the request back untouched (`try_send_request`), and it
//!   goes out once on another connection. Once written, a failure is the caller's to see —
//!   the call may have acted, so it is never retried.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tower::Service;

use crate::{FastMap, per_thread};

type Sender = SendRequest<Full<Bytes>>;

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection could be opened (DNS, refused, connect timeout, handshake).
    #[error("{0}")]
    Connect(Box<dyn std::error::Error + Send + Sync>),
    /// The exchange failed on an open connection.
    #[error(transparent)]
    Exchange(#[from] hyper::Error),
    #[error("the upstream URL has no host")]
    NoAuthority,
}

/// The pool (cheap to share: the `Upstream` holding it is behind an `Arc`).
#[derive(Debug)]
pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// Idle connections, one shard per thread (`per_thread`).
    idle: Box<[per_thread::Shard<IdleMap>]>,
    idle_timeout: Duration,
    max_idle_per_host: usize,
}

/// Idle connections per authority: plain HTTP at index 0, TLS at 1.
type IdleMap = Mutex<[FastMap<Box<str>, Vec<Idle>>; 2]>;

#[derive(Debug)]
struct Idle {
    sender: Sender,
    since: Instant,
}

/// A connection lent to one exchange. [`Lease::release`] gives it back once the response has
/// been read to the end; dropped instead (an error, a timeout), the connection closes.
pub struct Lease<'a> {
    pool: &'a Pool,
    origin: Origin,
    sender: Sender,
}

impl Lease<'_> {
    pub fn release(self) {
        self.pool.put_back(self.origin, self.sender);
    }
}

/// What connections are pooled by: an `http` and an `https` connection to the same
/// `host:port` are different connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Tls {
    No = 0,
    Yes = 1,
}

type Origin = (Tls, Authority);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pool {
    pub fn new(connector: HttpsConnector<HttpConnector>, idle_timeout: Duration, max_idle_per_host: usize) -> Self {
        Self {
            connector,
            idle: per_thread::shards(),
            idle_timeout,
            max_idle_per_host,
        }
    }

    /// Sends `req` (an absolute `http://` or `https://` URI with a `Host` header) in origin form
    /// on a pooled or new connection, and returns the response head with the connection it
    /// arrived on. `now` is the time the caller read last (an idle connection's age is checked
    /// against it; a few microseconds early is no matter against an idle timeout of seconds).
    /// `idle_timeout`: how long an idle connection may have sat to be reused for this call.
    pub async fn send(
        &self,
        mut req: Request<Full<Bytes>>,
        now: Instant,
        idle_timeout: Duration,
    ) -> Result<(Response<Incoming>, Lease<'_>), PoolError> {
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        let authority = parts.authority.take().ok_or(PoolError::NoAuthority)?;
        let tls = match parts.scheme.take() {
            Some(s) if s == Scheme::HTTPS => Tls::Yes,
            _ => Tls::No,
        };
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(PathAndQuery::from_static("/"));
        }
        *req.uri_mut() = Uri::from_parts(parts).expect("a path alone is a URI");
        loop {
            let (mut sender, pooled) =
                match self.take(tls, authority.as_str(), now, idle_timeout.min(self.idle_timeout)) {
                    Some((sender, idle)) => {
                        // A connection that sat idle a while may have been closed by the tool just
                        // now, its FIN not yet read by the connection's task (on this thread): let
                        // the task run once, so the close is seen here, not after the call is sent.
                        if idle >= Duration::from_millis(50) {
                            tokio::task::yield_now().await;
                            if sender.is_closed() {
                                continue;
                            }
                        }
                        (sender, true)
                    }
                    // Boxed: the TLS connect future is large, and every call's state machine would
                    // carry (and copy) it though few calls connect.
                    None => (Box::pin(self.connect(tls, &authority)).await?, false),
                };
            // A pooled connection the tool has closed since fails here, before anything is
            // sent: take another.
            if let Err(e) = sender.ready().await {
                if pooled {
                    continue;
                }
                return Err(PoolError::Exchange(e));
            }
            match sender.try_send_request(req).await {
                Ok(response) => {
                    let lease = Lease {
                        pool: self,
                        origin: (tls, authority),
                        sender,
                    };
                    return Ok((response, lease));
                }
                Err(mut e) => match e.take_message() {
                    // Handed back unwritten (the connection closed first): nothing was sent,
                    // so it may go out on another connection. Each retry uses up one pooled
                    // connection, and a new one is never retried: this ends.
                    Some(unsent) if pooled => req = unsent,
                    _ => return Err(PoolError::Exchange(e.into_error())),
                },
            }
        }
    }

    /// This thread's idle connections.
    fn shard(&self) -> &IdleMap {
        &self.idle[per_thread::index()].0
    }

    /// The most recently used idle connection to the origin that is still open and has been
    /// idle less than `max_idle`, and how long it was.
    fn take(&self, tls: Tls, authority: &str, now: Instant, max_idle: Duration) -> Option<(Sender, Duration)> {
        let mut idle = lock(self.shard());
        let list = idle[tls as usize].get_mut(authority)?;
        while let Some(c) = list.pop() {
            let idle = now.saturating_duration_since(c.since);
            if !c.sender.is_closed() && idle < max_idle {
                return Some((c.sender, idle));
            }
        }
        None
    }

    fn put_back(&self, (tls, authority): Origin, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = lock(self.shard());
        let idle = &mut idle[tls as usize];
        let list = match idle.get_mut(authority.as_str()) {
            Some(list) => list,
            None => idle.entry(authority.as_str().into()).or_default(),
        };
        // Pushed in time order, so the oldest are in front: drop the expired ones there.
        let expired = list.partition_point(|c| now.duration_since(c.since) >= self.idle_timeout);
        list.drain(..expired);
        if list.len() < self.max_idle_per_host {
            list.push(Idle { sender, since: now });
        }
    }

    async fn connect(&self, tls: Tls, authority: &Authority) -> Result<Sender, PoolError> {
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(match tls {
            Tls::Yes => Scheme::HTTPS,
            Tls::No => Scheme::HTTP,
        });
        uri.authority = Some(authority.clone());
        uri.path_and_query = Some(PathAndQuery::from_static("/"));
        let uri = Uri::from_parts(uri).expect("scheme, authority and path make a URI");
        let io = self.connector.clone().call(uri).await.map_err(PoolError::Connect)?;
        let (sender, connection) = http1::handshake(io).await.map_err(|e| PoolError::Connect(e.into()))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("upstream connection ended: {e}");
            }
        });
        Ok(sender)
    }
}
