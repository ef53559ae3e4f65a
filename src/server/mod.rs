//! The two listeners: the data plane (agents) and the admin plane (operators), each served by
//! hyper with bounded headers and read timeouts. The data plane is one hand-written service
//! ([`DataPlane`]: request id, load shedding, panics, then tool calls straight to their handler
//! and the rest through its axum router); the admin plane is an axum router inside tower layers.

pub mod admin;
mod conn;
pub mod data;
mod drain;
pub mod mcp;
mod policy_watch;
pub mod probe;
pub mod request;
pub mod tls;
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
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tower_http::catch_panic::CatchPanicLayer;

use crate::gateway::Gateway;
use crate::policy::Code;
use request::{IdFrom, client_address, request_id_of, with_request_id};
pub use request::{RequestId, Source, error_body, error_response};

/// As [`request_id_of`], also left in the request's extensions for the handlers behind a router
/// (the admin plane: there a malformed id is replaced, not refused).
fn assign_request_id(req: &mut Request) -> HeaderValue {
    let (id, header, _) = request_id_of(req);
    req.extensions_mut().insert(RequestId(id));
    header
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

/// A data-plane response body: a tool call's bytes as they are, or whatever the router built
/// (tool calls skip axum's boxed `Body` both ways: an allocation and dynamic calls per call),
/// counted against `limits.max_buffered_response_bytes` until it is written or dropped.
pub type DataBody = Held<http_body_util::Either<http_body_util::Full<bytes::Bytes>, Body>>;

/// A response body and the bytes it holds of the data plane's allowance for answers not yet
/// taken by their clients, given back when it is dropped: written, or its connection gone (a
/// client that stops reading is cut off by the write timeout, `conn::Conn`).
///
/// Its data goes to hyper in pieces of at most [`Held::PIECE`]: hyper takes the next piece only
/// when its write buffer has room, so the body (and its count) lasts until all but the last
/// piece of the answer is on the socket. Given whole, a large answer would be queued in hyper's
/// buffer at once and the body dropped, uncounted, while the client had read none of it.
pub struct Held<B> {
    body: B,
    /// The rest of a data frame larger than one piece.
    rest: Option<bytes::Bytes>,
    held: Option<(Arc<DataPlaneInner>, usize)>,
}

impl<B: hyper::body::Body<Data = bytes::Bytes> + Unpin> hyper::body::Body for Held<B> {
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, B::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        let data = match this.rest.take() {
            Some(rest) => rest,
            None => match std::task::ready!(std::pin::Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                other => return Poll::Ready(other),
            },
        };
        if data.len() <= Self::PIECE {
            return Poll::Ready(Some(Ok(hyper::body::Frame::data(data))));
        }
        let mut data = data;
        let piece = data.split_to(Self::PIECE);
        this.rest = Some(data);
        Poll::Ready(Some(Ok(hyper::body::Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let rest = self.rest.as_ref().map_or(0, |r| r.len() as u64);
        let inner = self.body.size_hint();
        let mut hint = hyper::body::SizeHint::new();
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint.set_lower(inner.lower() + rest);
        hint
    }
}

impl<B: hyper::body::Body> Held<B> {
    /// The most given to hyper at once.
    const PIECE: usize = 64 * 1024;

    /// A body that holds nothing of the allowance (refusals: small, and made here).
    fn new(body: B) -> Self {
        Self {
            body,
            rest: None,
            held: None,
        }
    }

    /// A body that holds its size of the allowance until it is dropped.
    fn counted(body: B, plane: &Arc<DataPlaneInner>) -> Self {
        let bytes = body.size_hint().lower() as usize;
        plane
            .limit
            .buffered
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        Self {
            body,
            rest: None,
            held: Some((plane.clone(), bytes)),
        }
    }
}

impl<B> Drop for Held<B> {
    fn drop(&mut self) {
        if let Some((plane, bytes)) = self.held.take() {
            plane
                .limit
                .buffered
                .fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

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
    mcp: Arc<mcp::Mcp>,
    limit: Arc<InFlight>,
    router: axum::Router,
}

pub fn data_plane(gateway: Arc<Gateway>) -> DataPlane {
    let mcp = mcp::Mcp::new(gateway.clone());
    DataPlane(Arc::new(DataPlaneInner {
        limit: Arc::new(InFlight::new(&gateway.config.limits)),
        router: data::routes(gateway.clone(), mcp.clone()),
        mcp,
        gateway,
    }))
}

/// The calls in flight on the data plane, against `limits.max_concurrent_requests`: one
/// counter for every thread (the limit is the whole gateway's), taken and given back with one
/// atomic add each. tokio's `Semaphore` also locks its wait list on every release, and a shed
/// call never waits.
///
/// Beside it, on the same cache line, the bytes of answers held for clients still reading them:
/// past `limits.max_buffered_response_bytes`, new calls are shed the same way, so clients that
/// read slowly (or not at all, until the write timeout cuts them off) cannot make the gateway
/// hold answers without bound.
struct InFlight {
    calls: std::sync::atomic::AtomicUsize,
    max: usize,
    buffered: std::sync::atomic::AtomicUsize,
    max_buffered: usize,
}

impl InFlight {
    fn new(limits: &crate::config::Limits) -> Self {
        Self {
            calls: std::sync::atomic::AtomicUsize::new(0),
            max: limits.max_concurrent_requests,
            buffered: std::sync::atomic::AtomicUsize::new(0),
            max_buffered: limits.max_buffered_response_bytes,
        }
    }
}

/// One call's place in [`InFlight`], held by the call (its task, for a tool call: a call whose
/// client went away still counts until it ends), given back when dropped: the call answered,
/// failed or panicked. It holds the data plane by its per-thread handle, which is also how the
/// call reaches the gateway.
pub(crate) struct InFlightCall(Arc<DataPlaneInner>);

impl InFlightCall {
    /// A place for one more call, or `None` if `max` are in flight, or the answers held for
    /// slow clients are over their allowance.
    fn try_enter(plane: &Arc<DataPlaneInner>) -> Option<InFlightCall> {
        use std::sync::atomic::Ordering::Relaxed;
        let limit = &plane.limit;
        if limit.buffered.load(Relaxed) > limit.max_buffered {
            return None;
        }
        if limit.calls.fetch_add(1, Relaxed) >= limit.max {
            limit.calls.fetch_sub(1, Relaxed);
            return None;
        }
        Some(InFlightCall(plane.clone()))
    }
}

impl request::HoldsGateway for InFlightCall {
    fn gateway(&self) -> &Gateway {
        &self.0.gateway
    }
}

impl Drop for InFlightCall {
    fn drop(&mut self) {
        self.0.limit.calls.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
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
        client: Option<Arc<tls::ClientCertificate>>,
    ) -> impl hyper::service::Service<
        axum::http::Request<Incoming>,
        Response = axum::http::Response<DataBody>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static {
        hyper::service::service_fn(move |req| self.clone().handle(req, source, client.clone()))
    }

    async fn handle(
        self,
        req: axum::http::Request<Incoming>,
        source: Option<std::net::IpAddr>,
        client: Option<Arc<tls::ClientCertificate>>,
    ) -> Result<axum::http::Response<DataBody>, Infallible> {
        let plane = self.0;
        let (id, id_header, from) = request_id_of(&req);
        let trusted = &plane.gateway.config.trusted_proxies;
        let source = match source {
            Some(peer) if !trusted.is_empty() => Some(client_address(peer, req.headers(), trusted)),
            other => other,
        };
        if from == IdFrom::Refused {
            let message = "X-Request-Id must be 1 to 128 characters: letters, digits, `-`, `_`, `.`, `:`.";
            let refusal = request::Refusal::of(&req, id, source);
            let res = refusal.refuse(&plane.gateway, Code::InvalidRequest, message).await;
            return Ok(with_request_id(res.map(|b| Held::new(Either::Right(b))), id_header));
        }
        // Load shedding instead of queueing: over the limit, a 503 at once.
        let Some(in_flight) = InFlightCall::try_enter(&plane) else {
            metrics::counter!("toolgate_shed_total").increment(1);
            let res = data::shed(&plane.gateway, id, source, &req).await;
            return Ok(with_request_id(res.map(|b| Held::new(Either::Right(b))), id_header));
        };
        let routed = async {
            if data::is_tool_call(&req) {
                data::call_tool(in_flight, id.clone(), Some(&id_header), source, client, req)
                    .await
                    .map(Either::Left)
            } else if req.method() == axum::http::Method::POST && req.uri().path() == "/mcp" {
                let mut req = req.map(Body::new);
                req.extensions_mut().insert(RequestId(id.clone()));
                if let Some(ip) = source {
                    req.extensions_mut().insert(Source(ip));
                }
                if let Some(client) = client {
                    req.extensions_mut().insert(request::Client(client));
                }
                mcp::post(&plane.mcp, in_flight, req).await.map(Either::Right)
            } else {
                let mut req = req.map(Body::new);
                req.extensions_mut().insert(RequestId(id.clone()));
                if let Some(ip) = source {
                    req.extensions_mut().insert(Source(ip));
                }
                if let Some(client) = client {
                    req.extensions_mut().insert(request::Client(client));
                }
                let Ok(res) = plane.router.clone().oneshot(req).await;
                drop(in_flight);
                res.map(Either::Right)
            }
        };
        let res = AssertUnwindSafe(routed)
            .catch_unwind()
            .await
            .unwrap_or_else(|_| panic_response(&id).map(Either::Right));
        Ok(with_request_id(res.map(|body| Held::counted(body, &plane)), id_header))
    }
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

/// Why the gateway could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({plane} plane): {source}")]
    Bind {
        plane: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the {plane} plane's TLS: {source}")]
    Tls { plane: &'static str, source: tls::TlsError },
}

/// A running gateway: its addresses, and a handle to stop it.
pub struct Running {
    pub data_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// `http` or `https`, for each plane.
    pub data_scheme: &'static str,
    pub admin_scheme: &'static str,
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
        // The last line: the chain's head, signed, so a verifier knows the trail ends here.
        if let Err(e) = self.gateway.audit.checkpoint("shutdown") {
            tracing::error!("the audit checkpoint at shutdown could not be written: {e}");
        }
    }
}

/// Binds both listeners and starts serving — the data plane on its own threads (one event loop
/// per core, [`workers`]), the admin plane, policy watcher and metrics upkeep on the caller's
/// runtime.
pub async fn start(gateway: Arc<Gateway>) -> Result<Running, StartError> {
    let config = &gateway.config;
    let tls = |plane: &'static str, files: Option<&crate::config::TlsConfig>| {
        files
            .map(|f| tls::Tls::load(f).map(Arc::new))
            .transpose()
            .map_err(|source| StartError::Tls { plane, source })
    };
    let (data_tls, admin_tls) = (
        tls("data", config.tls.as_ref())?,
        tls("admin", config.admin.tls.as_ref())?,
    );
    let bind = |plane, addr| move |source| StartError::Bind { plane, addr, source };
    let data = workers::bind(config.listen, config.workers).map_err(bind("data", config.listen))?;
    let admin = TcpListener::bind(config.admin.listen)
        .await
        .map_err(bind("admin", config.admin.listen))?;
    let data_addr = data[0].local_addr().map_err(bind("data", config.listen))?;
    let admin_addr = admin.local_addr().map_err(bind("admin", config.admin.listen))?;
    let (stop, stopped) = watch::channel(false);
    let limits = &gateway.config.limits;
    let timeouts = Timeouts {
        read: Duration::from_millis(limits.request_read_timeout_ms),
        write: Duration::from_millis(limits.response_write_timeout_ms),
    };
    let metrics = admin::metrics_handle();
    let mut tasks = vec![
        workers::spawn(
            data,
            gateway.config.workers,
            data_plane(gateway.clone()),
            timeouts,
            data_tls.clone(),
            stopped.clone(),
        )
        .map_err(bind("data", config.listen))?,
        tokio::spawn(serve(
            admin,
            {
                // Each request knows its connection's peer: the auth proxy's identity headers
                // are believed from the proxy's addresses only.
                let plane = admin_plane(gateway.clone());
                move |peer: SocketAddr, _| {
                    let plane = plane.clone();
                    let source = Source(peer.ip().to_canonical());
                    hyper::service::service_fn(move |mut req: axum::http::Request<Incoming>| {
                        req.extensions_mut().insert(source);
                        plane.clone().oneshot(req)
                    })
                }
            },
            timeouts,
            admin_tls.clone(),
            wait(stopped.clone()),
        )),
    ];
    let scheme = |tls: &Option<Arc<tls::Tls>>| if tls.is_some() { "https" } else { "http" };
    let (data_scheme, admin_scheme) = (scheme(&data_tls), scheme(&admin_tls));
    // Certificates are reloaded when their files change.
    let certificates: Vec<_> = [("data", data_tls), ("admin", admin_tls)]
        .into_iter()
        .filter_map(|(plane, tls)| Some((plane, tls?)))
        .collect();
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
    // Calls' traces, to the collector (`telemetry`).
    if gateway.telemetry.is_some() {
        let (gateway, stopped) = (gateway.clone(), stopped.clone());
        tasks.push(tokio::spawn(async move {
            if let Some(t) = &gateway.telemetry {
                t.export(stopped).await;
            }
        }));
    }
    // Refusals of unknown callers counted beyond their allowance: one event per source.
    tasks.push(tokio::spawn(write_summaries(gateway.clone(), stopped.clone())));
    // Signed checkpoints of the audit chain, every `audit.checkpoint_seconds` (with a key).
    if gateway.config.audit.checkpoint_key_file.is_some() {
        tasks.push(tokio::spawn(write_checkpoints(gateway.clone(), stopped.clone())));
    }
    // Upstream MCP servers: their tools at once, then every `mcp.refresh_seconds`.
    tasks.push(tokio::spawn(refresh_mcp(gateway.clone(), stopped.clone())));
    tasks.push(tokio::spawn(upkeep(
        gateway.clone(),
        metrics,
        certificates,
        stopped.clone(),
    )));
    Ok(Running {
        data_addr,
        admin_addr,
        data_scheme,
        admin_scheme,
        gateway,
        stop,
        tasks,
    })
}

/// Writes the `refusals_summarized` events due, every `audit.unknown_callers.summary_seconds`.
async fn write_summaries(gateway: Arc<Gateway>, mut stopped: watch::Receiver<bool>) {
    let every = Duration::from_secs(gateway.config.audit.unknown_callers.summary_seconds);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                gateway.audit.write_summaries().await;
            }
            _ = stopped.changed() => return,
        }
    }
}

/// Writes an `audit_checkpoint` every `audit.checkpoint_seconds`.
async fn write_checkpoints(gateway: Arc<Gateway>, mut stopped: watch::Receiver<bool>) {
    let every = Duration::from_secs(gateway.config.audit.checkpoint_seconds);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let audit = gateway.clone();
                // Under the file's lock, possibly syncing: off the event loop.
                let written = tokio::task::spawn_blocking(move || audit.audit.checkpoint("interval")).await;
                if let Ok(Err(e)) = written {
                    tracing::error!("the audit checkpoint could not be written: {e}");
                }
            }
            _ = stopped.changed() => return,
        }
    }
}

/// Asks upstream MCP servers for their tools at once, then every `mcp.refresh_seconds`.
async fn refresh_mcp(gateway: Arc<Gateway>, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(gateway.config.mcp.refresh_seconds));
    loop {
        tokio::select! {
            _ = tick.tick() => gateway.refresh_mcp("refresh").await,
            _ = stopped.changed() => return,
        }
    }
}

/// Once a second: metrics upkeep, the policy watcher's poll, and hourly, the pruning of
/// settled approvals older than a week (not only when the store opens).
async fn upkeep(
    gateway: Arc<Gateway>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    certificates: Vec<(&'static str, Arc<tls::Tls>)>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut policy = policy_watch::PolicyWatch::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.changed() => return,
        }
        ticks += 1;
        metrics.run_upkeep();
        if ticks % crate::state::HEARTBEAT_SECONDS == 1 {
            gateway.heartbeat().await;
        }
        if ticks % 3600 == 0
            && let Err(e) = gateway.approvals.prune(crate::state::unix_now()).await
        {
            tracing::error!("pruning the approval store failed: {e}");
        }
        policy.poll(&gateway, ticks).await;
        // The identity provider's keys, fetched off this loop (a fetch may take seconds).
        if gateway.policy_now().auth.remote_keys().is_some() {
            let gateway = gateway.clone();
            tokio::spawn(async move { gateway.refresh_keys().await });
        }
        for (plane, tls) in &certificates {
            match tls.poll() {
                Some(Ok(())) => tracing::info!(plane, "TLS certificate reloaded"),
                Some(Err(e)) => {
                    metrics::counter!("toolgate_tls_reload_failures_total").increment(1);
                    tracing::error!(
                        plane,
                        "TLS files changed but do not load; the last good ones still serve: {e}"
                    );
                }
                None => {}
            }
        }
    }
}

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
/// How long a connection may take to send a request's headers, and to take in a response.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    read: Duration,
    write: Duration,
}

async fn serve<S, B>(
    listener: TcpListener,
    app: impl Fn(SocketAddr, Option<Arc<tls::ClientCertificate>>) -> S + Send + Sync + 'static,
    timeouts: Timeouts,
    tls: Option<Arc<tls::Tls>>,
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
        .header_read_timeout(timeouts.read)
        .max_buf_size(64 * 1024);
    let app = Arc::new(app);
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
                let io = conn::Conn::new(stream, timeouts.write);
                let watcher = drain.watcher();
                let Some(tls) = &tls else {
                    let conn = watcher.watch(http.serve_connection(TokioIo::new(io), app(peer, None)));
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    continue;
                };
                // The handshake on the connection's own task, within the time allowed for a
                // request's headers: a client that never finishes it holds nothing else.
                let (acceptor, http, app) = (tls.acceptor(), http.clone(), app.clone());
                tokio::spawn(async move {
                    let stream = match tokio::time::timeout(timeouts.read, acceptor.accept(io)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => return tls::handshake_failed(peer, &e.to_string()),
                        Err(_) => return tls::handshake_failed(peer, "not finished in time"),
                    };
                    let client = tls::client_certificate(stream.get_ref().1);
                    let _ = watcher.watch(http.serve_connection(TokioIo::new(stream), app(peer, client))).await;
                });
            }
            _ = &mut shutdown => break,
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), drain.shutdown()).await;
}
