//! OpenTelemetry traces: an OTLP/HTTP receiver in the test decodes the real protobuf the
//! gateway exports, and the spans are checked against the calls: the caller's trace continued,
//! a child per stage, the tool's span as the parent the tool received, the refusal's code, and
//! no argument value anywhere in what was exported.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

use crate::support::{Harness, SUPPORT_KEY};

/// What the receiver got: every export request, decoded.
type Received = Arc<Mutex<Vec<ExportTraceServiceRequest>>>;

async fn receiver() -> (String, Received) {
    let got: Received = Arc::default();
    let log = got.clone();
    let app = Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let log = log.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export request");
                log.lock().unwrap().push(request);
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

fn spans(got: &Received) -> Vec<Span> {
    got.lock()
        .unwrap()
        .iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|r| &r.scope_spans)
        .flat_map(|s| s.spans.clone())
        .collect()
}

/// The spans of one trace, once its server span has arrived.
async fn trace(got: &Received, trace_id: &[u8]) -> Vec<Span> {
    for _ in 0..100 {
        let all: Vec<Span> = spans(got).into_iter().filter(|s| s.trace_id == trace_id).collect();
        if all.iter().any(|s| s.parent_span_id.is_empty() || s.kind == 2) {
            return all;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no trace {} exported", hex::encode(trace_id));
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
            Any::StringValue(s) => Some(s.clone()),
            Any::IntValue(i) => Some(i.to_string()),
            other => Some(format!("{other:?}")),
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_is_one_trace_continuing_the_callers_with_a_span_per_stage_and_no_arguments() {
    let (endpoint, got) = receiver().await;
    let h = Harness::start_with(&format!("telemetry: {{ otlp_endpoint: \"{endpoint}\" }}\n")).await;
    let (trace_id, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let traceparent = format!("00-{trace_id}-{parent}-01");
    let secret = "argument-value-7c1f";
    let r = h
        .call_with(
            "kb.search",
            SUPPORT_KEY,
            &format!(r#"{{"query":"{secret}"}}"#),
            &[("traceparent", &traceparent)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    let spans = trace(&got, &hex::decode(trace_id).unwrap()).await;
    let call = spans.iter().find(|s| s.kind == 2).expect("a server span for the call");
    assert_eq!(call.name, "execute_tool kb.search");
    assert_eq!(
        hex::encode(&call.parent_span_id),
        parent,
        "the caller's span is the call's parent"
    );
    assert_eq!(attribute(call, "gen_ai.tool.name").as_deref(), Some("kb.search"));
    assert_eq!(attribute(call, "gen_ai.agent.id").as_deref(), Some("support-bot"));
    assert_eq!(attribute(call, "toolgate.decision").as_deref(), Some("allow"));
    assert_eq!(attribute(call, "error.type"), None);

    // A child per stage that ran, each inside the call.
    let stages: Vec<&str> = spans
        .iter()
        .filter(|s| s.parent_span_id == call.span_id)
        .map(|s| s.name.as_str())
        .collect();
    for stage in ["authentication", "policy", "limits", "audit", "upstream", "output"] {
        assert!(stages.contains(&stage), "no {stage} span: {stages:?}");
    }
    for s in spans.iter().filter(|s| s.parent_span_id == call.span_id) {
        assert!(s.start_time_unix_nano >= call.start_time_unix_nano && s.end_time_unix_nano <= call.end_time_unix_nano);
    }
    // The tool's span, inside `upstream`, is the parent the tool was given.
    let upstream = spans.iter().find(|s| s.name == "upstream").unwrap();
    let client = spans.iter().find(|s| s.kind == 3).expect("a client span for the tool");
    assert_eq!(client.parent_span_id, upstream.span_id);
    let seen = h.upstream.requests();
    let sent = seen
        .last()
        .unwrap()
        .headers
        .get("traceparent")
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(sent, format!("00-{trace_id}-{}-01", hex::encode(&client.span_id)));

    // Nothing the agent sent is in what was exported.
    let exported = format!("{:?}", got.lock().unwrap());
    assert!(!exported.contains(secret), "an argument value was exported");
    assert!(!exported.contains(SUPPORT_KEY), "a credential was exported");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_call_is_traced_with_its_code_and_the_stages_that_ran() {
    let (endpoint, got) = receiver().await;
    let h = Harness::start_with(&format!("telemetry: {{ otlp_endpoint: \"{endpoint}\" }}\n")).await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let r = h
        .call_with(
            "kb.search",
            "not-a-key",
            r#"{"query":"q"}"#,
            &[("traceparent", &format!("00-{trace_id}-b7ad6b7169203331-01"))],
        )
        .await;
    r.assert_error(401, "unauthenticated");
    let spans = trace(&got, &hex::decode(trace_id).unwrap()).await;
    let call = spans.iter().find(|s| s.kind == 2).unwrap();
    assert_eq!(attribute(call, "error.type").as_deref(), Some("unauthenticated"));
    assert_eq!(call.status.as_ref().map(|s| s.code), Some(2), "status ERROR");
    let stages: Vec<&str> = spans
        .iter()
        .filter(|s| s.parent_span_id == call.span_id)
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(stages, ["authentication"], "only authentication ran");
    assert_eq!(h.upstream.requests().len(), 0);
}
