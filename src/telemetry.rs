//! OpenTelemetry traces of tool calls, exported over OTLP/HTTP (protobuf) when `telemetry:` is
//! configured: one server span per call, a child per pipeline stage that ran, and a client span
//! for the tool, whose id the tool receives in `traceparent` (the caller's trace continued).
//!
//! The spans are built after the call, from the times the pipeline recorded, on the admin
//! runtime: a call adds a few clock reads and one non-blocking send to a bounded queue (full,
//! the trace is dropped and counted: traces never slow or stop calls). With no `telemetry:`,
//! nothing is recorded: one branch per call. Not a `tracing` layer: the log subscriber's filter
//! would then decide whether per-stage spans cost anything, and a `RUST_LOG` could make them.
//!
//! What a span carries is chosen here, never the arguments or the answer: the tool, the agent,
//! the decision and its code, the upstream status (the GenAI and MCP semantic conventions'
//! `gen_ai.tool.name`, `gen_ai.operation.name`, `mcp.method.name`, `error.type`).

use std::borrow::Cow;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::{BodyExt, Full, Limited};
use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use tokio::sync::{mpsc, watch};

use crate::config::TelemetryConfig;

/// Traces sent to the collector at most this many at once.
const BATCH: usize = 512;
/// A batch not full is sent after this long.
const BATCH_DELAY: Duration = Duration::from_millis(500);
/// The last export, at shutdown, gets this long.
const FINAL_EXPORT: Duration = Duration::from_secs(2);

/// The span ids of one call: the trace it belongs to (the caller's, from `traceparent`, or a
/// new one), the caller's span (its parent), the call's span and the tool's.
#[derive(Debug, Clone, Copy)]
pub struct Ids {
    pub trace_id: [u8; 16],
    pub parent: Option<[u8; 8]>,
    pub call: [u8; 8],
    pub upstream: [u8; 8],
    pub flags: u8,
}

impl Ids {
    /// New ids for a call, continuing the caller's `traceparent` (already checked) if any.
    pub fn continuing(traceparent: Option<&HeaderValue>) -> Ids {
        let random = uuid::Uuid::new_v4().into_bytes();
        let spans = uuid::Uuid::new_v4().into_bytes();
        let (call, upstream) = spans.split_at(8);
        let mut ids = Ids {
            trace_id: random,
            parent: None,
            call: call.try_into().expect("8 bytes"),
            upstream: upstream.try_into().expect("8 bytes"),
            flags: 1,
        };
        // `vv-<32 hex trace>-<16 hex span>-<2 hex flags>`.
        if let Some(s) = traceparent.and_then(|v| v.to_str().ok())
            && s.len() == 55
        {
            let mut trace = [0u8; 16];
            let mut parent = [0u8; 8];
            let mut flags = [0u8; 1];
            if hex::decode_to_slice(&s[3..35], &mut trace).is_ok()
                && hex::decode_to_slice(&s[36..52], &mut parent).is_ok()
                && hex::decode_to_slice(&s[53..55], &mut flags).is_ok()
                && trace != [0; 16]
            {
                ids.trace_id = trace;
                ids.parent = Some(parent);
                ids.flags = flags[0];
            }
        }
        ids
    }

    /// The `traceparent` the tool receives: this trace, the tool's span as its parent.
    pub fn outbound(&self) -> HeaderValue {
        let text = format!(
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.upstream),
            self.flags
        );
        HeaderValue::from_str(&text).expect("hex and dashes")
    }
}

/// A stage that ran, and when.
pub type Stage = (&'static str, Instant, Instant);

/// What one call's spans are built from.
#[derive(Debug)]
pub struct CallTrace {
    pub ids: Ids,
    pub started_at: SystemTime,
    pub started: Instant,
    pub ended: Instant,
    pub stages: Vec<Stage>,
    pub tool: String,
    pub agent: Option<String>,
    /// `tools/call` for a call that came through MCP.
    pub mcp: bool,
    pub decision: &'static str,
    pub code: Option<&'static str>,
    pub upstream_status: Option<u16>,
}

/// The queue of traces to export, and the task that exports them.
pub struct Telemetry {
    tx: mpsc::Sender<CallTrace>,
    rx: Mutex<Option<mpsc::Receiver<CallTrace>>>,
    config: TelemetryConfig,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").field("config", &self.config).finish()
    }
}

impl Telemetry {
    pub fn new(config: &TelemetryConfig) -> Self {
        let (tx, rx) = mpsc::channel(config.max_queue);
        Self {
            tx,
            rx: Mutex::new(Some(rx)),
            config: config.clone(),
        }
    }

    /// Queues a call's trace; a full queue drops it (counted).
    pub fn record(&self, trace: CallTrace) {
        if self.tx.try_send(trace).is_err() {
            metrics::counter!("toolgate_traces_dropped_total").increment(1);
        }
    }

    /// Exports the queued traces until `stopped`, then what is left. Runs once.
    pub async fn export(&self, mut stopped: watch::Receiver<bool>) {
        let Some(mut rx) = self.rx.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let exporter = match self.exporter() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("traces will not be exported: {e}");
                return;
            }
        };
        let scope = InstrumentationScope::builder("toolgate")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        let mut batch = Vec::new();
        loop {
            let stopping = tokio::select! {
                got = tokio::time::timeout(BATCH_DELAY, rx.recv_many(&mut batch, BATCH)) => matches!(got, Ok(0)),
                _ = stopped.changed() => true,
            };
            if stopping {
                while let Ok(t) = rx.try_recv() {
                    batch.push(t);
                }
            }
            if !batch.is_empty() {
                let spans: Vec<SpanData> = batch.drain(..).flat_map(|t| spans(t, &scope)).collect();
                let n = spans.len() as u64;
                // At shutdown, one short try: the process is draining within its grace period.
                let export = exporter.export(spans);
                let exported = match stopping {
                    true => tokio::time::timeout(FINAL_EXPORT, export)
                        .await
                        .unwrap_or(Err(opentelemetry_sdk::error::OTelSdkError::Timeout(FINAL_EXPORT))),
                    false => export.await,
                };
                match exported {
                    Ok(()) => metrics::counter!("toolgate_spans_exported_total").increment(n),
                    Err(e) => {
                        metrics::counter!("toolgate_traces_export_failures_total").increment(1);
                        tracing::warn!("traces not exported: {e}");
                    }
                }
            }
            if stopping {
                return;
            }
        }
    }

    fn exporter(&self) -> Result<opentelemetry_otlp::SpanExporter, opentelemetry_otlp::ExporterBuildError> {
        use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
        let timeout = Duration::from_millis(self.config.timeout_ms);
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(self.config.otlp_endpoint.clone())
            .with_timeout(timeout)
            .with_http_client(Collector::new(timeout))
            .build()?;
        let resource = opentelemetry_sdk::Resource::builder_empty()
            .with_service_name(self.config.service_name.clone())
            .build();
        exporter.set_resource(&resource);
        Ok(exporter)
    }
}

/// A call's spans: the call (server), a child per stage, the tool (client, inside `upstream`).
fn spans(t: CallTrace, scope: &InstrumentationScope) -> Vec<SpanData> {
    let at = |i: Instant| t.started_at + i.saturating_duration_since(t.started);
    let context = |span: [u8; 8]| {
        SpanContext::new(
            TraceId::from_bytes(t.ids.trace_id),
            SpanId::from_bytes(span),
            TraceFlags::new(t.ids.flags),
            false,
            TraceState::NONE,
        )
    };
    let span =
        |name: Cow<'static, str>, id: [u8; 8], parent: [u8; 8], kind, times: (Instant, Instant), attrs| SpanData {
            span_context: context(id),
            parent_span_id: SpanId::from_bytes(parent),
            parent_span_is_remote: false,
            span_kind: kind,
            name,
            start_time: at(times.0),
            end_time: at(times.1),
            attributes: attrs,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: scope.clone(),
        };
    let mut attributes = vec![
        KeyValue::new("gen_ai.operation.name", "execute_tool"),
        KeyValue::new("gen_ai.tool.name", t.tool.clone()),
        KeyValue::new("toolgate.decision", t.decision),
    ];
    if t.mcp {
        attributes.push(KeyValue::new("mcp.method.name", "tools/call"));
    }
    if let Some(agent) = &t.agent {
        attributes.push(KeyValue::new("gen_ai.agent.id", agent.clone()));
    }
    if let Some(code) = t.code {
        attributes.push(KeyValue::new("error.type", code));
    }
    let name = match t.mcp {
        true => format!("tools/call {}", t.tool),
        false => format!("execute_tool {}", t.tool),
    };
    let mut call = span(
        name.into(),
        t.ids.call,
        t.ids.parent.unwrap_or([0; 8]),
        SpanKind::Server,
        (t.started, t.ended),
        attributes,
    );
    call.parent_span_is_remote = t.ids.parent.is_some();
    if let Some(code) = t.code {
        call.status = Status::error(code);
    }
    let mut out = Vec::with_capacity(t.stages.len() + 2);
    out.push(call);
    for &(stage, start, end) in &t.stages {
        let id = uuid::Uuid::new_v4().into_bytes()[..8].try_into().expect("8 bytes");
        out.push(span(
            stage.into(),
            id,
            t.ids.call,
            SpanKind::Internal,
            (start, end),
            Vec::new(),
        ));
        if stage == "upstream" {
            let mut attrs = vec![KeyValue::new("gen_ai.tool.name", t.tool.clone())];
            if let Some(status) = t.upstream_status {
                attrs.push(KeyValue::new("http.response.status_code", i64::from(status)));
            }
            out.push(span(
                format!("call {}", t.tool).into(),
                t.ids.upstream,
                id,
                SpanKind::Client,
                (start, end),
                attrs,
            ));
        }
    }
    out
}

/// The exporter's HTTP client: this build's hyper client (https verified as for https tools),
/// with a deadline over the whole exchange and a bounded answer.
#[derive(Debug, Clone)]
struct Collector {
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
    timeout: Duration,
}

impl Collector {
    fn new(timeout: Duration) -> Self {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(crate::upstream::tls_config())
            .https_or_http()
            .enable_http1()
            .build();
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
        Self { client, timeout }
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Collector {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let exchange = async {
            let res = self.client.request(request.map(Full::new)).await?;
            let (parts, body) = res.into_parts();
            let body = Limited::new(body, 64 * 1024).collect().await?.to_bytes();
            Ok::<_, opentelemetry_http::HttpError>(http::Response::from_parts(parts, body))
        };
        tokio::time::timeout(self.timeout, exchange).await?
    }
}
