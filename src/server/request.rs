//! What both transports (and the admin plane) share about a request, written once: its id, its
//! source address, its credentials, its body read within the limits, the contract's error
//! body, and a refusal with its `request_refused` event.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::FutureExt;
use serde_json::{Value, json};

use crate::audit::RequestRefused;
use crate::gateway::{CallOutcome, CallRequest, Gateway};
use crate::policy::identity::ClientCertificate;
use crate::policy::{Code, Reason, Stage};
use crate::upstream::X_REQUEST_ID;

/// The request id of the call being served: the caller's `X-Request-Id` if it is sane, else a
/// fresh UUID. Set by the outermost layer, read by handlers, echoed on every response.
#[derive(Clone, Debug)]
pub struct RequestId(pub Arc<str>);

impl RequestId {
    /// The id the outermost layer gave `req` (empty if none did).
    pub fn of<B>(req: &axum::http::Request<B>) -> Arc<str> {
        req.extensions()
            .get::<RequestId>()
            .map(|r| r.0.clone())
            .unwrap_or_default()
    }
}

/// The address the call's connection came from (the TCP peer; an IPv4 address mapped into IPv6
/// is written as IPv4). Set on requests the router handles; recorded as the events' `source`.
#[derive(Clone, Copy, Debug)]
pub struct Source(pub std::net::IpAddr);

/// The client certificate the request's connection presented (data plane with client CAs),
/// a request extension for the handlers behind the router.
#[derive(Debug, Clone)]
pub struct Client(pub Arc<ClientCertificate>);

impl Client {
    pub fn of<B>(req: &axum::http::Request<B>) -> Option<&ClientCertificate> {
        req.extensions().get::<Client>().map(|c| &*c.0)
    }
}

impl Source {
    pub fn of<B>(req: &axum::http::Request<B>) -> Option<std::net::IpAddr> {
        req.extensions().get::<Source>().map(|s| s.0)
    }
}

/// The contract's error object for `reason`: `{code, message, request_id, rule}`, and for a
/// held call `approval_id` and what to do next.
pub fn error_object(reason: &Reason, request_id: &str) -> Value {
    let mut error = json!({
        "code": reason.code.as_str(),
        "message": reason.message,
        "request_id": request_id,
    });
    if !reason.rule.is_empty() {
        error["rule"] = Value::from(reason.rule.as_str());
    }
    if let Some(id) = &reason.approval_id {
        error["approval_id"] = Value::from(id.as_str());
    }
    error
}

/// An error body, as every HTTP refusal answers: `{"error": {code, message, request_id, rule}}`;
/// for a held call also `approval_id` and `status_url` at the top level (what to poll) and
/// `retry` (how to send it again).
pub fn error_body(reason: &Reason, request_id: &str) -> Bytes {
    let mut body = json!({ "error": error_object(reason, request_id) });
    if let Some(id) = &reason.approval_id {
        body["approval_id"] = Value::from(id.as_str());
        body["status_url"] = Value::from(format!("/v1/approvals/{id}"));
        body["error"]["retry"] = Value::from(format!(
            "Once approved, send the identical call again with the header `X-Toolgate-Approval: {id}`."
        ));
    }
    Bytes::from(serde_json::to_vec(&body).expect("JSON serialises"))
}

/// A JSON error response with the contract's body.
pub fn error_response(code: Code, message: impl Into<String>, request_id: &str) -> Response {
    let reason = Reason::new(code, Stage::Request, "", message);
    let status = StatusCode::from_u16(code.http_status()).expect("contract statuses are valid");
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        error_body(&reason, request_id),
    )
        .into_response()
}

/// Where a request's id came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IdFrom {
    /// The caller's `X-Request-Id`, as it sent it.
    Caller,
    /// Made here: the caller sent none, or one a detector finds something in (then its hash).
    Gateway,
    /// The caller's `X-Request-Id` is not 1 to 128 letters, digits, `-`, `_`, `.`, `:`: the
    /// data plane refuses the request (with a fresh id to name the refusal by).
    Refused,
}

/// The id every response carries, as text (for events and error bodies) and as the header
/// value it is echoed and forwarded as, made once: the caller's `X-Request-Id` if it is safe to
/// record; its SHA-256 (`sha256:<hex>`) if a detector finds something in it (a card number, a
/// key: the id is written into every event of the call); a fresh UUID if it sent none, or one
/// outside the safe alphabet.
pub(super) fn request_id_of<B>(req: &axum::http::Request<B>) -> (Arc<str>, HeaderValue, IdFrom) {
    let fresh = || {
        let mut buf = uuid::Uuid::encode_buffer();
        let id = &*uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
        (
            id.into(),
            HeaderValue::from_str(id).expect("a UUID is a valid header value"),
        )
    };
    let Some(h) = req.headers().get(X_REQUEST_ID) else {
        let (id, header) = fresh();
        return (id, header, IdFrom::Gateway);
    };
    match h.to_str().ok().filter(|v| crate::audit::is_safe_text(v)) {
        None => {
            let (id, header) = fresh();
            (id, header, IdFrom::Refused)
        }
        Some(v) => match crate::audit::recorded(v) {
            std::borrow::Cow::Borrowed(v) => (v.into(), h.clone(), IdFrom::Caller),
            std::borrow::Cow::Owned(hashed) => {
                let header = HeaderValue::from_str(&hashed).expect("a hash is a valid header value");
                (hashed.into(), header, IdFrom::Gateway)
            }
        },
    }
}

pub(super) fn with_request_id<B>(mut res: axum::http::Response<B>, id: HeaderValue) -> axum::http::Response<B> {
    res.headers_mut().insert(X_REQUEST_ID, id);
    res
}

/// The caller's address: the connection's peer; or, if the peer is a trusted proxy, the
/// right-most `X-Forwarded-For` entry that is not itself a trusted proxy (each proxy appends
/// the address it got the request from, so only the entries trusted proxies appended are
/// evidence: anything to their left the caller may have written). An entry that is not an
/// address stops the walk at the proxy that forwarded it.
pub(super) fn client_address(
    peer: std::net::IpAddr,
    headers: &HeaderMap,
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

/// The agent whose credentials the `Authorization` header and the connection's client
/// certificate carry, in the policy in force. A request with more than one header is refused.
pub(super) async fn authenticate(
    gw: &Gateway,
    headers: &HeaderMap,
    client: Option<&ClientCertificate>,
) -> Result<Arc<str>, Reason> {
    let mut all = headers.get_all(header::AUTHORIZATION).iter();
    let authorization = all.next();
    if all.next().is_some() {
        return Err(crate::gateway::two_credentials());
    }
    let authorization = authorization.and_then(|v| v.to_str().ok());
    gw.fetch_keys_for(authorization).await;
    gw.policy_now().auth.authenticate(authorization, client).cloned()
}

/// Whether the client waits for `100 Continue` before it sends its body (`Expect:
/// 100-continue`). hyper sends that the first time the body is read: a request refused on its
/// headers alone is answered before, and the client never sends the body.
pub(super) fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// A request's body, whole, within `limits.max_body_bytes` and `limits.request_read_timeout_ms`.
pub(super) async fn read_body<B>(gw: &Gateway, headers: &HeaderMap, body: B) -> Result<Bytes, Reason>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<axum::BoxError>,
{
    let limit = gw.config.limits.max_body_bytes;
    let too_large = || {
        Reason::new(
            Code::PayloadTooLarge,
            Stage::Request,
            "limits",
            format!("The body is larger than the limit of {limit} bytes."),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let timeout = Duration::from_millis(gw.config.limits.request_read_timeout_ms);
    let mut collect = std::pin::pin!(crate::body::read_all(body, limit));
    // Usually the body came with the headers: then it is read without arming a timer.
    let read = match (&mut collect).now_or_never() {
        Some(read) => Ok(read),
        None => tokio::time::timeout(timeout, collect).await,
    };
    match read {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(crate::body::BodyError::TooLarge(_))) => Err(too_large()),
        Ok(Err(crate::body::BodyError::Read(_))) => Err(Reason::new(
            Code::InvalidRequest,
            Stage::Request,
            "transport",
            "The request body could not be read.",
        )),
        Err(_) => Err(Reason::new(
            Code::RequestTimeout,
            Stage::Request,
            "limits",
            "The request body was not received in time.",
        )),
    }
}

/// What a detached call holds the gateway by: the data plane's per-thread handle (whose
/// reference count only its own thread writes, see `DataPlane::for_thread`), or the gateway
/// itself behind an `Arc`.
pub trait HoldsGateway: Send + Sync + 'static {
    fn gateway(&self) -> &Gateway;
}

impl HoldsGateway for Arc<Gateway> {
    fn gateway(&self) -> &Gateway {
        self
    }
}

/// Runs a call and waits for its outcome, detached from the client's connection: if the
/// connection goes away first (the client hung up, or its own timeout fired), the call goes on
/// in a task of its own and runs to its end, forwarded or not, recorded, its budget settled,
/// instead of being dropped half-way with the connection's future.
///
/// While the client waits (nearly always) the call runs inside the connection's own future, as
/// any handler does: no task, no extra wake-up of the connection per call. Only when that
/// future is dropped before the call is done is the call moved, boxed as it already is, into a
/// task on the same thread.
pub async fn call_detached(owner: impl HoldsGateway, req: CallRequest) -> CallOutcome {
    Detached(Some(Box::pin(async move { owner.gateway().call(req).await }))).await
}

/// A boxed future that, dropped before it is done, finishes in a task of its own.
struct Detached<F: Future<Output = CallOutcome> + Send + 'static>(Option<std::pin::Pin<Box<F>>>);

impl<F: Future<Output = CallOutcome> + Send + 'static> Future for Detached<F> {
    type Output = CallOutcome;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<CallOutcome> {
        let call = self.0.as_mut().expect("polled after it was done");
        let outcome = std::task::ready!(call.as_mut().poll(cx));
        self.0 = None;
        std::task::Poll::Ready(outcome)
    }
}

impl<F: Future<Output = CallOutcome> + Send + 'static> Drop for Detached<F> {
    fn drop(&mut self) {
        let Some(call) = self.0.take() else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(call);
            }
            // Only outside any runtime (the process is going down): nothing can run it.
            Err(_) => tracing::error!("a call was abandoned with its runtime"),
        }
    }
}

/// A request refused before it became a tool call, as its event names it: the route it hit
/// (never its path), the method if it is one toolgate knows, and who asked, as far as known.
#[derive(Debug, Clone)]
pub(super) struct Refusal {
    pub id: Arc<str>,
    pub endpoint: &'static str,
    pub method: Option<&'static str>,
    pub source: Option<std::net::IpAddr>,
    /// The agent, once its credentials were checked.
    pub agent: Option<Arc<str>>,
}

impl Refusal {
    /// For a data-plane request: its route and HTTP method.
    pub fn of<B>(req: &axum::http::Request<B>, id: Arc<str>, source: Option<std::net::IpAddr>) -> Self {
        let path = req.uri().path();
        Self {
            id,
            endpoint: match () {
                _ if path.starts_with("/v1/tools/") => "/v1/tools/{tool}",
                _ if path.starts_with("/v1/approvals/") => "/v1/approvals/{id}",
                _ if path == "/mcp" => "/mcp",
                _ => "(unknown)",
            },
            method: Some(match req.method().as_str() {
                "GET" => "GET",
                "HEAD" => "HEAD",
                "POST" => "POST",
                "PUT" => "PUT",
                "PATCH" => "PATCH",
                "DELETE" => "DELETE",
                "OPTIONS" => "OPTIONS",
                _ => "(other)",
            }),
            source,
            agent: None,
        }
    }

    /// Writes its `request_refused` event. Refusals that name no agent go through the
    /// unknown-caller allowance (`audit::unknown`), except shed calls (`unavailable`): those
    /// are the gateway's doing, not the caller's.
    pub async fn audit(&self, gw: &Gateway, status: u16, code: Code, message: &str) {
        let event = RequestRefused {
            request_id: &self.id,
            endpoint: self.endpoint,
            method: self.method,
            source: self.source,
            agent: self.agent.as_deref(),
            status,
            code: code.as_str(),
            message,
        };
        if self.agent.is_some()
            || code == Code::Unavailable
            || gw.audit.admit_unknown_caller(self.source, code.as_str())
        {
            gw.audit.emit_or_log(&event).await;
        }
    }

    /// Audits the refusal and answers it with the contract's error body.
    pub async fn refuse(&self, gw: &Gateway, code: Code, message: &str) -> Response {
        self.audit(gw, code.http_status(), code, message).await;
        error_response(code, message, &self.id)
    }
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
