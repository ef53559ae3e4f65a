//! The two listeners: the data plane (agents) and the admin plane (operators), each served by
//! hyper with bounded headers and read timeouts. The data plane is one hand-written service
//! ([`DataPlane`]: request id, load shedding, panics, then tool calls straight to their handler
//! and the rest through its axum router); the admin plane is an axum router inside tower layers.

pub mod admin;
pub mod data;
mod drain;
mod workers;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tower_http::catch_panic::CatchPanicLayer;

use crate::gateway::{Gateway, ReloadError, error_body};
use crate::policy::{Code, Reason, Stage};
use crate::upstream::X_REQUEST_ID;

/// The request id of the call being served: the caller's `X-Request-Id` if it is sane, else a
/// fresh UUID. Set by the outermost layer, read by handlers, echoed on every response.
#[derive(Clone, Debug)]
pub struct RequestId(pub Arc<str>);

/// The address the call's connection came from (the TCP peer; an IPv4 address mapped into IPv6
/// is written as IPv4). Set on requests the router handles; recorded as the events' `source`.
#[derive(Clone, Copy, Debug)]
pub struct Source(pub std::net::IpAddr);

/// A JSON error response with the contract's body.
pub fn error_response(code: Code, message: impl Into<String>, request_id: &str) -> Response {
    let reason = Reason::new(code, Stage::Request, "", message);
    let status = axum::http::StatusCode::from_u16(code.http_status()).expect("contract statuses are valid");
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        error_body(&reason, request_id),
    )
        .into_response()
}

fn is_sane_request_id(v: &str) -> bool {
    (1..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// The id every response carries: the caller's `X-Request-Id` if it is sane, else a fresh one.
/// As text (for events and error bodies) and as the header value it is echoed and forwarded as,
/// made once: the caller's is reused as it came.
fn request_id_of<B>(req: &axum::http::Request<B>) -> (Arc<str>, HeaderValue) {
    if let Some(h) = req.headers().get(X_REQUEST_ID)
        && let Ok(v) = h.to_str()
        && is_sane_request_id(v)
    {
        return (v.into(), h.clone());
    }
    let mut buf = uuid::Uuid::encode_buffer();
    let id = &*uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    (
        id.into(),
        HeaderValue::from_str(id).expect("a UUID is a valid header value"),
    )
}

/// As [`request_id_of`], also left in the request's extensions for the handlers behind a router.
fn assign_request_id(req: &mut Request) -> HeaderValue {
    let (id, header) = request_id_of(req);
    req.extensions_mut().insert(RequestId(id));
    header
}

fn with_request_id<B>(mut res: axum::http::Response<B>, id: HeaderValue) -> axum::http::Response<B> {
    res.headers_mut().insert(X_REQUEST_ID, id);
    res
}

async fn request_id(mut req: Request, next: Next) -> Response {
    let id = assign_request_id(&mut req);
    with_request_id(next.run(req).await, id)
}

fn panic_response(request_id: &str) -> Response {
    error_response(
        Code::Internal,
        "The gateway hit an internal error; the call was not forwarded.",
        request_id,
    )
}

/// A data-plane response body: a tool call's bytes as they are, or whatever the router built.
/// Tool calls skip axum's boxed `Body` both ways (an allocation and dynamic calls per call).
pub type DataBody = http_body_util::Either<http_body_util::Full<bytes::Bytes>, Body>;

/// The admin listener's whole service: its router inside its transport layers.
pub type Plane = BoxCloneSyncService<axum::http::Request<Incoming>, Response, Infallible>;

/// The data-plane service: the request id (before anything that may answer, so every response
/// carries one), the concurrency limit (after the id, so a shed call's 503 has one too), panics
/// caught, then the routes — tool calls and `POST /mcp` straight to their handlers, the rest
/// through the router.
///
/// Written out rather than stacked from tower layers: every call takes this path, and each
/// layer costs a boxed future and a request or response map per call (docs/benchmarks.md).
///
/// Each data-plane thread serves its own copy ([`DataPlane::for_thread`]): hyper clones the
/// service once per call, and a clone shared by every thread would make that a write to a
/// reference count both cores use.
#[derive(Clone)]
pub struct DataPlane(Arc<DataPlaneInner>);

struct DataPlaneInner {
    gateway: Arc<Gateway>,
    /// `POST /mcp` is taken before the router too; the router's `/mcp` routes share it.
    mcp: Arc<crate::mcp::Mcp>,
    limit: Arc<InFlight>,
    router: axum::Router,
}

pub fn data_plane(gateway: Arc<Gateway>) -> DataPlane {
    let mcp = crate::mcp::Mcp::new(gateway.clone());
    DataPlane(Arc::new(DataPlaneInner {
        limit: Arc::new(InFlight::new(gateway.config.limits.max_concurrent_requests)),
        router: data::routes(gateway.clone(), mcp.clone()),
        mcp,
        gateway,
    }))
}

/// The calls in flight on the data plane, against `limits.max_concurrent_requests`: one
/// counter for every thread (the limit is the whole gateway's), taken and given back with one
/// atomic add each. tokio's `Semaphore` also locks its wait list on every release, and a shed
/// call never waits.
struct InFlight {
    calls: std::sync::atomic::AtomicUsize,
    max: usize,
}

impl InFlight {
    fn new(max: usize) -> Self {
        Self {
            calls: std::sync::atomic::AtomicUsize::new(0),
            max,
        }
    }

    /// A place for one more call, or `None` if `max` are in flight.
    fn try_enter(&self) -> Option<InFlightCall<'_>> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.calls.fetch_add(1, Relaxed) >= self.max {
            self.calls.fetch_sub(1, Relaxed);
            return None;
        }
        Some(InFlightCall(self))
    }
}

/// One call's place; given back when dropped (the call answered, failed or panicked).
struct InFlightCall<'a>(&'a InFlight);

impl Drop for InFlightCall<'_> {
    fn drop(&mut self) {
        self.0.calls.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl DataPlane {
    /// A copy for one data-plane thread: the same gateway, limit and routes.
    pub fn for_thread(&self) -> DataPlane {
        DataPlane(Arc::new(DataPlaneInner {
            gateway: self.0.gateway.clone(),
            mcp: self.0.mcp.clone(),
            limit: self.0.limit.clone(),
            router: self.0.router.clone(),
        }))
    }

    /// The service hyper runs: an unboxed future per call, which hyper keeps in one slot per
    /// connection (a `tower::Service` here would need a boxed future: an allocation and a copy
    /// of the whole call's state machine per call).
    pub fn service(
        self,
        source: Option<std::net::IpAddr>,
    ) -> impl hyper::service::Service<
        axum::http::Request<Incoming>,
        Response = axum::http::Response<DataBody>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static {
        hyper::service::service_fn(move |req| self.clone().handle(req, source))
    }

    async fn handle(
        self,
        req: axum::http::Request<Incoming>,
        source: Option<std::net::IpAddr>,
    ) -> Result<axum::http::Response<DataBody>, Infallible> {
        let plane = self.0;
        let (id, id_header) = request_id_of(&req);
        let trusted = &plane.gateway.config.trusted_proxies;
        let source = match source {
            Some(peer) if !trusted.is_empty() => Some(client_address(peer, req.headers(), trusted)),
            other => other,
        };
        // Load shedding instead of queueing: over the limit, a 503 at once.
        let Some(_in_flight) = plane.limit.try_enter() else {
            metrics::counter!("toolgate_shed_total").increment(1);
            let res = data::shed(&plane.gateway, id, source, &req).await.map(DataBody::Right);
            return Ok(with_request_id(res, id_header));
        };
        let routed = async {
            if data::is_tool_call(&req) {
                data::call_tool(&plane.gateway, id.clone(), Some(&id_header), source, req)
                    .await
                    .map(DataBody::Left)
            } else if req.method() == axum::http::Method::POST && req.uri().path() == "/mcp" {
                let mut req = req.map(Body::new);
                req.extensions_mut().insert(RequestId(id.clone()));
                if let Some(ip) = source {
                    req.extensions_mut().insert(Source(ip));
                }
                crate::mcp::post(&plane.mcp, req).await.map(DataBody::Right)
            } else {
                let mut req = req.map(Body::new);
                req.extensions_mut().insert(RequestId(id.clone()));
                if let Some(ip) = source {
                    req.extensions_mut().insert(Source(ip));
                }
                let Ok(res) = plane.router.clone().oneshot(req).await;
                res.map(DataBody::Right)
            }
        };
        let res = AssertUnwindSafe(routed)
            .catch_unwind()
            .await
            .unwrap_or_else(|_| panic_response(&id).map(DataBody::Right));
        Ok(with_request_id(res, id_header))
    }
}

/// The caller's address: the connection's peer; or, if the peer is a trusted proxy, the
/// right-most `X-Forwarded-For` entry that is not itself a trusted proxy (each proxy appends
/// the address it got the request from, so only the entries trusted proxies appended are
/// evidence: anything to their left the caller may have written). An entry that is not an
/// address stops the walk at the proxy that forwarded it.
fn client_address(
    peer: std::net::IpAddr,
    headers: &axum::http::HeaderMap,
    trusted: &[ipnet::IpNet],
) -> std::net::IpAddr {
    let is_trusted = |ip: &std::net::IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    let mut client = peer;
    for entry in entries.iter().rev() {
        let entry = entry.trim();
        let parsed = entry
            .parse::<std::net::IpAddr>()
            .or_else(|_| entry.parse::<std::net::SocketAddr>().map(|s| s.ip()));
        let Ok(ip) = parsed else { return client };
        client = ip.to_canonical();
        if !is_trusted(&client) {
            return client;
        }
    }
    client
}

/// The admin-plane service: the same panic and request-id layers; its own token check.
pub fn admin_plane(gateway: Arc<Gateway>) -> Plane {
    // Layers wrap the whole router, not each route (as `Router::layer` would), outermost first.
    let svc = ServiceBuilder::new()
        .map_response(IntoResponse::into_response)
        .layer(CatchPanicLayer::custom(|_| panic_response("")))
        .map_request(|r: axum::http::Request<Incoming>| r.map(Body::new))
        .layer(middleware::from_fn(request_id))
        .service(admin::routes(gateway));
    BoxCloneSyncService::new(svc)
}

/// A running gateway: its addresses, and a handle to stop it.
pub struct Running {
    pub data_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, lets in-flight calls finish (up to 10 s), and returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        // What was counted since the last summary, now that no call is left to count; if even
        // that cannot be written, the log is the last place it can go.
        if !self.gateway.audit.write_summaries().await {
            for event in self.gateway.audit.pending_summaries() {
                tracing::error!(event = %event, "refusals_summarized not written to the audit log at shutdown");
            }
        }
    }
}

/// Binds both listeners and starts serving — the data plane on its own threads (one event loop
/// per core, [`workers`]), the admin plane, policy watcher and metrics upkeep on the caller's
/// runtime.
pub async fn start(gateway: Arc<Gateway>) -> std::io::Result<Running> {
    let data = workers::bind(gateway.config.listen, gateway.config.workers)?;
    let admin = TcpListener::bind(gateway.config.admin.listen).await?;
    let (data_addr, admin_addr) = (data[0].local_addr()?, admin.local_addr()?);
    let (stop, stopped) = watch::channel(false);
    let read_timeout = Duration::from_millis(gateway.config.limits.request_read_timeout_ms);
    let metrics = admin::metrics_handle();
    let mut tasks = vec![
        workers::spawn(
            data,
            gateway.config.workers,
            data_plane(gateway.clone()),
            read_timeout,
            stopped.clone(),
        )?,
        tokio::spawn(serve(
            admin,
            {
                let plane = TowerToHyperService::new(admin_plane(gateway.clone()));
                move |_| plane.clone()
            },
            read_timeout,
            wait(stopped.clone()),
        )),
    ];
    // The CloudWatch Logs sink follows the audit file.
    if let (Some(cw), Some(file)) = (
        gateway.config.audit.cloudwatch.clone(),
        gateway.config.audit.file.clone(),
    ) {
        let region = gateway.config.aws.as_ref().and_then(|a| a.region.clone());
        let stop_ship = stopped.clone();
        tasks.push(tokio::spawn(async move {
            crate::audit::cloudwatch::Shipper::new(cw, file, region)
                .await
                .run(stop_ship)
                .await;
        }));
    }
    // Refusals of unknown callers counted beyond their allowance: one event per source.
    let gw = gateway.clone();
    let mut stop_summaries = stopped.clone();
    tasks.push(tokio::spawn(async move {
        let every = Duration::from_secs(gw.config.audit.unknown_callers.summary_seconds);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    gw.audit.write_summaries().await;
                }
                _ = stop_summaries.changed() => return,
            }
        }
    }));
    // Upstream MCP servers: discover their tools at once, then every `mcp.refresh_seconds`.
    let gw = gateway.clone();
    let mut stop_refresh = stopped.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(gw.config.mcp.refresh_seconds));
        loop {
            tokio::select! {
                _ = tick.tick() => gw.refresh_mcp("refresh").await,
                _ = stop_refresh.changed() => return,
            }
        }
    }));
    let gw = gateway.clone();
    let mut stop_watch = stopped.clone();
    tasks.push(tokio::spawn(async move {
        // Nothing seen yet: the first polls compare the files with the policy in force by
        // loading them (a reload that finds the same version changes nothing and writes no
        // event), so a file changed between the policy's load and this task's start is not
        // missed.
        let mut last = Vec::new();
        let mut settling = None;
        let mut unsettled: u32 = 0;
        let (mut retry_at, mut retry_backoff): (u64, u64) = (0, 1);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop_watch.changed() => return,
            }
            ticks += 1;
            metrics.run_upkeep();
            // Settled approvals older than a week go hourly, not only when the store opens.
            if ticks % 3600 == 0 {
                let store = gw.approvals.clone();
                let pruned = tokio::task::spawn_blocking(move || store.prune(crate::state::unix_now())).await;
                if let Ok(Err(e)) = pruned {
                    tracing::error!("pruning the approval store failed: {e}");
                }
            }
            // A change is loaded once it has held still for one poll: an editor or a deploy
            // that writes in place, or moves files one by one, is never caught half-way (a
            // truncated rules file is valid, with fewer rules).
            let now = gw.policy_fingerprint();
            if now == last {
                settling = None;
                unsettled = 0;
                // A valid policy whose event could not be written was not put in force
                // (whether the files, an admin or the MCP catalog asked for it): tried again
                // here until it is. An invalid one waits for the files to change.
                if ticks >= retry_at && gw.take_retry_due() {
                    // Backing off while the log stays broken: 1, 2, 4 … 60 s between tries.
                    let failed = matches!(gw.reload("retry", None).await, Err(ReloadError::Unrecorded { .. }));
                    retry_backoff = if failed { (retry_backoff * 2).min(60) } else { 1 };
                    retry_at = ticks + retry_backoff;
                }
            } else if settling.as_ref() == Some(&now) {
                last = now;
                settling = None;
                unsettled = 0;
                let _ = gw.reload("file_change", None).await;
            } else {
                settling = Some(now);
                unsettled += 1;
                if unsettled == UNSETTLED_WARNING {
                    tracing::warn!(
                        "the policy files have changed on every poll for {UNSETTLED_WARNING} s: nothing is \
                         reloaded until they hold still for a second (write elsewhere and rename)"
                    );
                }
            }
        }
    }));
    Ok(Running {
        data_addr,
        admin_addr,
        gateway,
        stop,
        tasks,
    })
}

/// After this many polls (seconds) of policy files that never hold still, the watcher says so.
const UNSETTLED_WARNING: u32 = 30;

/// How long the accept loop pauses after an error that is not one connection's (e.g. EMFILE).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset | Interrupted
    )
}

async fn wait(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

/// Serves `listener`'s connections, each with the service `app` makes for its peer.
async fn serve<S, B>(
    listener: TcpListener,
    app: impl Fn(SocketAddr) -> S,
    read_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) where
    S: hyper::service::Service<axum::http::Request<Incoming>, Response = axum::http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    let drain = drain::Drain::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    // Bounded headers: at most 64 KiB buffered and 100 headers; slow senders are cut off. 100 is
    // hyper's default, left implicit: set explicitly, hyper builds and fills a 100-slot vector
    // on every request (~1.7k instructions) instead of using an uninitialised array.
    http.timer(crate::timer::HyperTimer(crate::timer::Timers::new()))
        .header_read_timeout(read_timeout)
        .max_buf_size(64 * 1024);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    // One connection that went away before it was taken: the next one is fine.
                    Err(e) if is_connection_error(&e) => continue,
                    // Out of file descriptors or memory: accepting again at once would fail
                    // again at once, a busy loop on a full core. Pause, and say why.
                    Err(e) => {
                        tracing::error!("cannot accept connections: {e}; retrying in {ACCEPT_BACKOFF:?}");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let conn = http.serve_connection(TokioIo::new(stream), app(peer));
                let conn = drain.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = &mut shutdown => break,
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), drain.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::client_address;

    #[test]
    fn forwarded_for_is_believed_only_as_far_as_trusted_proxies_wrote_it() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "192.0.2.7/32".parse().unwrap()];
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let with = |xff: &[&str]| {
            let mut h = axum::http::HeaderMap::new();
            for v in xff {
                h.append("x-forwarded-for", v.parse().unwrap());
            }
            h
        };
        // Not from a trusted proxy: whatever the header says, the peer.
        assert_eq!(
            client_address(ip("198.51.100.1"), &with(&["203.0.113.9"]), &trusted),
            ip("198.51.100.1")
        );
        // Through two trusted proxies: the right-most entry they did not add. The left-most
        // is the caller's own claim, and not believed.
        let h = with(&["1.1.1.1, 203.0.113.9", "10.1.1.1"]);
        assert_eq!(client_address(ip("10.2.2.2"), &h, &trusted), ip("203.0.113.9"));
        // Ports, brackets and IPv4 mapped into IPv6.
        assert_eq!(
            client_address(ip("10.2.2.2"), &with(&["203.0.113.9:4711"]), &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_address(ip("10.2.2.2"), &with(&["[2001:db8::1]:443"]), &trusted),
            ip("2001:db8::1")
        );
        assert_eq!(
            client_address(ip("10.2.2.2"), &with(&["::ffff:203.0.113.9"]), &trusted),
            ip("203.0.113.9")
        );
        // Garbage stops at the proxy that passed it on; no header: the proxy itself.
        assert_eq!(
            client_address(ip("10.2.2.2"), &with(&["unknown, 192.0.2.7"]), &trusted),
            ip("192.0.2.7")
        );
        assert_eq!(client_address(ip("10.2.2.2"), &with(&[]), &trusted), ip("10.2.2.2"));
        // Every entry a trusted proxy: the left-most of them.
        assert_eq!(
            client_address(ip("10.2.2.2"), &with(&["10.9.9.9, 10.8.8.8"]), &trusted),
            ip("10.9.9.9")
        );
    }
}
