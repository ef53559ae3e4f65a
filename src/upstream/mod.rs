//! Forwarding an allowed call to its tool: pooled keep-alive HTTP/1.1 connections, a per-call
//! deadline over the whole exchange, a bounded response, and only the headers toolgate chooses.
//!
//! No retries of a call that may have acted: the only retry is for a request that was never
//! written, on a pooled connection the upstream had already closed (see [`pool`]) — nothing
//! was sent, so nothing can have happened twice.

pub mod aws;
pub(crate) mod aws_sdk;
pub mod guardrail;
pub mod mcp;
pub mod pool;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderName, HeaderValue, TRANSFER_ENCODING, USER_AGENT};
use http::uri::PathAndQuery;
use http::{Request, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Map, Value};
use std::borrow::Cow;

use crate::body::BodyError;
use crate::policy::tool::{Method, Origin};
use crate::timer::Timers;
use pool::{Pool, PoolError};

pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_TOOLGATE_AGENT: HeaderName = HeaderName::from_static("x-toolgate-agent");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Why a forward failed. The call was allowed; the tool did not answer usefully.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the tool did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the tool could not be reached: {0}")]
    Unreachable(String),
    #[error("the tool's response is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the tool's response was malformed: {0}")]
    Protocol(String),
}

/// What toolgate sends upstream.
#[derive(Debug)]
pub struct Outbound<'a> {
    pub method: Method,
    /// The filled URL (`eval.url`), which starts with `origin`.
    pub url: &'a str,
    pub origin: &'a Origin,
    pub arguments: &'a Map<String, Value>,
    /// The arguments' canonical JSON, sent as the body for methods that have one.
    pub body: Bytes,
    pub request_id: &'a str,
    /// `request_id` as a header value, if the caller has one (else it is made from the text).
    pub request_id_header: Option<&'a HeaderValue>,
    pub agent: &'a str,
    pub trace: &'a TraceContext,
    pub timeout: Duration,
    /// How long a pooled connection may have been idle to carry this call.
    pub idle_timeout: Duration,
    /// When forwarding began (the caller reads the clock for its own timing): `timeout` counts
    /// from here, and the pool checks its idle connections' age against it.
    pub started: Instant,
    pub max_response_bytes: usize,
    /// Fixed headers from the tool's config.
    pub headers: &'a [(http::HeaderName, HeaderValue)],
    /// SigV4: sign with these role credentials for this region and service.
    pub signing: Option<Signing<'a>>,
}

/// A call's W3C trace context, as forwarded to its tool. Built only by [`TraceContext::new`],
/// which checks it, so every transport forwards exactly the same: a malformed `traceparent`
/// (anything but `vv-<32 hex>-<16 hex>-ff`, lowercase) or a `tracestate` over 512 bytes is
/// dropped, not forwarded.
#[derive(Debug, Clone, Default)]
pub struct TraceContext {
    traceparent: Option<HeaderValue>,
    tracestate: Option<HeaderValue>,
}

impl TraceContext {
    /// The caller's `traceparent`, as checked.
    pub fn traceparent(&self) -> Option<&HeaderValue> {
        self.traceparent.as_ref()
    }

    /// The same trace state under a new parent (toolgate's own span, when it traces calls).
    pub fn with_parent(&self, traceparent: HeaderValue) -> Self {
        Self {
            traceparent: Some(traceparent),
            tracestate: self.tracestate.clone(),
        }
    }

    pub fn new(traceparent: Option<&HeaderValue>, tracestate: Option<&HeaderValue>) -> Self {
        Self {
            traceparent: traceparent.filter(|v| is_traceparent(v)).cloned(),
            tracestate: tracestate.filter(|v| v.len() <= 512).cloned(),
        }
    }
}

/// W3C `traceparent`: `vv-<32 hex>-<16 hex>-ff`.
fn is_traceparent(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    b.len() == 55
        && b.iter().enumerate().all(|(i, c)| match i {
            2 | 35 | 52 => *c == b'-',
            _ => c.is_ascii_hexdigit() && !c.is_ascii_uppercase(),
        })
}

/// How to sign an outbound request.
#[derive(Debug)]
pub struct Signing<'a> {
    pub credentials: &'a aws_credential_types::Credentials,
    pub region: &'a str,
    pub service: &'a str,
}

/// What the tool answered.
#[derive(Debug)]
pub struct Inbound {
    pub status: u16,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

/// The shared upstream client.
#[derive(Debug)]
pub struct Upstream {
    pool: Pool,
    /// The exchanges' deadlines (recycled per thread, see [`crate::timer`]).
    timers: Timers,
}

impl Default for Upstream {
    fn default() -> Self {
        Self::new()
    }
}

impl Upstream {
    pub fn new() -> Self {
        Self {
            // Idle connections are kept at most this long, whatever a tool allows.
            pool: Pool::new(connector(), Duration::from_secs(30), 512),
            timers: Timers::new(),
        }
    }

    /// Sends one call and reads the whole response, all within `out.timeout`.
    pub async fn forward(&self, out: &Outbound<'_>) -> Result<Inbound, UpstreamError> {
        let request = build_request(out)?;
        let exchange = async {
            let (response, lease) =
                self.pool
                    .send(request, out.started, out.idle_timeout)
                    .await
                    .map_err(|e| match e {
                        PoolError::Connect(e) => UpstreamError::Unreachable(source_chain(&*e)),
                        e => UpstreamError::Protocol(source_chain(&e)),
                    })?;
            let status = response.status().as_u16();
            // A final status a tool may not send (an informational 1xx other than what hyper
            // already consumed, or past 599) is the tool's fault, not an answer to relay.
            if !(200..=599).contains(&status) {
                return Err(UpstreamError::Protocol(format!(
                    "the tool answered with status {status}"
                )));
            }
            // Both framings at once (RFC 9112 6.3: a sign of request smuggling, or a broken
            // tool): the answer is read by `Transfer-Encoding`, and the connection is closed
            // after it, never reused for another call.
            let reusable = !(response.headers().contains_key(TRANSFER_ENCODING)
                && response.headers().contains_key(CONTENT_LENGTH));
            let content_type = response.headers().get(CONTENT_TYPE).cloned();
            let body = crate::body::read_all(response.into_body(), out.max_response_bytes)
                .await
                .map_err(|e| match e {
                    BodyError::TooLarge(limit) => UpstreamError::TooLarge(limit),
                    BodyError::Read(e) => UpstreamError::Protocol(e.to_string()),
                })?;
            if reusable {
                lease.release();
            }
            Ok::<_, UpstreamError>((status, content_type, body))
        };
        let (status, content_type, body) = self
            .timers
            .until((out.started + out.timeout).into(), exchange)
            .await
            .map_err(|_| UpstreamError::Timeout(out.timeout))??;
        Ok(Inbound {
            status,
            content_type,
            body,
        })
    }
}

/// How toolgate reaches tools and upstream MCP servers: `http://` as it is, `https://` over
/// [`tls_config`]; `TCP_NODELAY`, a 5 s connect timeout.
pub(crate) fn connector() -> hyper_rustls::HttpsConnector<HttpConnector> {
    connector_with(Duration::from_secs(5))
}

/// [`connector`] with another connect timeout (the AWS SDK's own).
pub(crate) fn connector_with(connect_timeout: Duration) -> hyper_rustls::HttpsConnector<HttpConnector> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.enforce_http(false);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config())
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector)
}

/// TLS for `https://` tools: TLS 1.2 and 1.3 (aws-lc-rs), HTTP/1.1, and the system's trust
/// store — `SSL_CERT_FILE` / `SSL_CERT_DIR` replace it, as for OpenSSL (a private CA's bundle).
/// A trust store that cannot be read leaves no roots: every https call then fails with a
/// certificate error (a 502 naming it), never unverified.
pub(crate) fn tls_config() -> rustls::ClientConfig {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!("cannot read a trusted certificate for https tools: {e}");
    }
    let mut roots = rustls::RootCertStore::empty();
    let (_, unparsable) = roots.add_parsable_certificates(found.certs);
    if unparsable > 0 {
        tracing::warn!("{unparsable} trusted certificates for https tools could not be parsed");
    }
    if roots.is_empty() {
        tracing::warn!("no trusted certificates for https tools: https calls will fail");
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

fn build_request(out: &Outbound<'_>) -> Result<Request<Full<Bytes>>, UpstreamError> {
    let (url, body) = if out.method.has_body() {
        (Cow::Borrowed(out.url), out.body.clone())
    } else {
        (Cow::Owned(with_query(out.url, out.arguments)), Bytes::new())
    };
    // Scheme and authority were parsed at load; only the path and query are checked here.
    let bad = |e: String| UpstreamError::Protocol(format!("bad upstream URL: {e}"));
    let path = url
        .strip_prefix(out.origin.prefix())
        .and_then(|rest| rest.strip_prefix(out.origin.authority.as_str()))
        .ok_or_else(|| bad("it does not start with its tool's origin".to_owned()))?;
    let path = match path {
        "" => PathAndQuery::from_static("/"),
        p => PathAndQuery::from_maybe_shared(Bytes::copy_from_slice(p.as_bytes())).map_err(|e| bad(e.to_string()))?,
    };
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(out.origin.scheme.clone());
    uri.authority = Some(out.origin.authority.clone());
    uri.path_and_query = Some(path);
    let uri = Uri::from_parts(uri).map_err(|e| bad(e.to_string()))?;
    // Headers straight into the map: `Request::builder` moves its parts through every call.
    let mut request = Request::new(Full::new(body.clone()));
    *request.method_mut() = out.method.as_http();
    *request.uri_mut() = uri;
    let text = |v: &str| HeaderValue::from_str(v).map_err(|e| UpstreamError::Protocol(e.to_string()));
    let headers = request.headers_mut();
    // `Host` is set here, so the client does not build it with `format!` per request, and a
    // SigV4 signature covers exactly the value sent.
    headers.insert(HOST, out.origin.host.clone());
    let request_id = match out.request_id_header {
        Some(h) => h.clone(),
        None => text(out.request_id)?,
    };
    headers.insert(X_REQUEST_ID, request_id);
    headers.insert(X_TOOLGATE_AGENT, text(out.agent)?);
    headers.insert(
        USER_AGENT,
        HeaderValue::from_static(concat!("toolgate/", env!("CARGO_PKG_VERSION"))),
    );
    if out.method.has_body() && !out.headers.iter().any(|(n, _)| n == CONTENT_TYPE) {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    if let Some(tp) = &out.trace.traceparent {
        headers.insert(TRACEPARENT, tp.clone());
    }
    if let Some(ts) = &out.trace.tracestate {
        headers.insert(TRACESTATE, ts.clone());
    }
    for (name, value) in out.headers {
        headers.append(name, value.clone());
    }
    if let Some(s) = &out.signing {
        aws::sign_request(&mut request, &body, s.credentials, s.region, s.service)
            .map_err(|e| UpstreamError::Protocol(format!("cannot sign the request: {e}")))?;
    }
    Ok(request)
}

/// Appends arguments as a query string (for methods without a body): scalars as text, anything
/// else as compact JSON.
fn with_query(url: &str, args: &Map<String, Value>) -> String {
    if args.is_empty() {
        return url.to_owned();
    }
    let mut ser = form_urlencoded_pairs(args);
    let sep = if url.contains('?') { '&' } else { '?' };
    ser.insert(0, sep);
    format!("{url}{ser}")
}

fn form_urlencoded_pairs(args: &Map<String, Value>) -> String {
    use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
    const QUERY: &percent_encoding::AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
    let mut out = String::new();
    let mut pairs: Vec<(&String, &Value)> = args.iter().collect();
    pairs.sort_unstable_by(|a, b| a.0.cmp(b.0));
    for (k, v) in pairs {
        if !out.is_empty() {
            out.push('&');
        }
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            Value::Bool(_) | Value::Number(_) => v.to_string(),
            _ => serde_json::to_string(v).expect("JSON serialises"),
        };
        out.extend(utf8_percent_encode(k, QUERY));
        out.push('=');
        out.extend(utf8_percent_encode(&text, QUERY));
    }
    out
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn host_is_the_authority_without_http_s_default_port() {
        let args = serde_json::Map::new();
        let host = |url: &str| {
            let template = crate::policy::tool::UrlTemplate::parse(url).unwrap();
            let out = Outbound {
                method: Method::Post,
                url,
                origin: template.origin(),
                arguments: &args,
                body: Bytes::new(),
                request_id: "r",
                request_id_header: None,
                agent: "a",
                trace: &TraceContext::default(),
                timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(1),
                started: Instant::now(),
                max_response_bytes: 1,
                headers: &[],
                signing: None,
            };
            let req = build_request(&out).unwrap();
            assert_eq!(req.headers().get_all(HOST).iter().count(), 1);
            req.headers()[HOST].to_str().unwrap().to_owned()
        };
        assert_eq!(host("http://tools.internal:8080/x"), "tools.internal:8080");
        assert_eq!(host("http://tools.internal:80/x"), "tools.internal");
        assert_eq!(host("http://127.0.0.1/x"), "127.0.0.1");
    }

    #[test]
    fn only_a_well_formed_trace_context_is_forwarded() {
        let tp = HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let state = HeaderValue::from_static("vendor=1");
        let kept = TraceContext::new(Some(&tp), Some(&state));
        assert_eq!((kept.traceparent, kept.tracestate), (Some(tp), Some(state)));
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "not a trace",
        ] {
            let bad = HeaderValue::from_static(bad);
            assert_eq!(TraceContext::new(Some(&bad), None).traceparent, None, "{bad:?}");
        }
        let long = HeaderValue::from_str(&"a".repeat(513)).unwrap();
        assert_eq!(TraceContext::new(None, Some(&long)).tracestate, None);
    }

    #[test]
    fn query_strings_encode_keys_and_values() {
        let args = json!({"q": "a b&c", "n": 3, "tags": ["x"]});
        assert_eq!(
            with_query("http://h/s", args.as_object().unwrap()),
            "http://h/s?n=3&q=a%20b%26c&tags=%5B%22x%22%5D"
        );
        assert_eq!(
            with_query("http://h/s?v=1", json!({"a": 1}).as_object().unwrap()),
            "http://h/s?v=1&a=1"
        );
    }
}
