//! The decision pipeline alone, on the bundled policies: authentication, and `evaluate` for a
//! ~2 KB argument body through allowlist, JSON Schema, URL template and content filters.

use criterion::{Criterion, criterion_group, criterion_main};

/// The binary's allocator, so the numbers are the binary's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use serde_json::json;
use std::hint::black_box;
use toolgate::policy::history::{NoHistory, PastCall, Recorded, hash_value};
use toolgate::policy::{ParseLimits, Policy, ToolCall, content};

fn bundled_policy() -> Policy {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
    Policy::load(std::path::Path::new(dir)).expect("bundled policies load")
}

/// A realistic ~2 KB reply: prose, a ticket id, no PII (the common case: nothing to redact).
fn reply_body() -> Vec<u8> {
    let sentence =
        "Thanks for reaching out about the login problem; we reset the session and the fix ships on Monday. ";
    let body = sentence.repeat(19);
    let v = json!({"ticket_id": "T-1001", "body": body});
    let bytes = serde_json::to_vec(&v).unwrap();
    assert!((1900..2300).contains(&bytes.len()), "{}", bytes.len());
    bytes
}

fn pipeline(c: &mut Criterion) {
    let policy = bundled_policy();
    let limits = ParseLimits { max_json_depth: 64 };
    let body = reply_body();
    let call = ToolCall::new("support-bot", "tickets.reply", &body);
    assert!(policy.evaluate(&call, limits, &NoHistory).decision.is_allow());

    c.bench_function("authenticate_api_key", |b| {
        b.iter(|| {
            policy
                .auth
                .authenticate(black_box(Some("Bearer demo-support-key")), None)
                .unwrap()
        })
    });
    c.bench_function("evaluate_2kb_allow_with_filters", |b| {
        b.iter(|| policy.evaluate(black_box(&call), limits, &NoHistory))
    });
    let denied = ToolCall::new("support-bot", "billing.delete_account", &body);
    c.bench_function("evaluate_not_allowed", |b| {
        b.iter(|| policy.evaluate(black_box(&denied), limits, &NoHistory))
    });
    let small = br#"{"query": "reset my password", "limit": 5}"#;
    let kb = ToolCall::new("support-bot", "kb.search", small);
    c.bench_function("evaluate_small_kb_search", |b| {
        b.iter(|| policy.evaluate(black_box(&kb), limits, &NoHistory))
    });

    // Content scanning alone: 50 deny terms, 20 deny patterns, every detector, over 2 KB.
    let terms: Vec<String> = (0..50).map(|i| format!("codename {i} internal")).collect();
    let patterns: Vec<String> = (0..20).map(|i| format!("proj[e3]ct[- ]?{i}(?:alpha|beta)")).collect();
    let cfg: content::FilterConfig = serde_json::from_value(json!({
        "deny_terms": terms, "deny_patterns": patterns,
        "detect": ["email", "phone", "ssn", "credit_card", "iban", "aws_access_key", "aws_secret_key", "private_key", "bearer_token"],
        "action": "redact"
    }))
    .unwrap();
    let filter = content::Filter::compile("bench", &cfg).unwrap();
    let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
    c.bench_function("scan_2kb_50_terms_20_patterns_all_detectors", |b| {
        b.iter(|| {
            let mut v = value.clone();
            content::apply(&[&filter], black_box(&mut v))
        })
    });
}

/// Rules: the bundled rule set (five forbids on `billing.refund`, two of them reading session
/// history, one shadow) against the same policy without its rule file, on the same call.
fn rules(c: &mut Criterion) {
    let limits = ParseLimits { max_json_depth: 64 };
    let with_rules: Vec<(String, String)> = toolgate::demo::POLICIES
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    let without: Vec<(String, String)> = with_rules
        .iter()
        .filter(|(n, _)| !n.ends_with(".cedar"))
        .cloned()
        .collect();
    let read = |p: &std::path::Path| std::fs::read_to_string(p);
    let ruled = Policy::compile(&with_rules, read).expect("bundled policies load");
    let plain = Policy::compile(&without, read).expect("bundled policies load");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // A busy hour: 40 earlier calls, one of them the fraud check that lets this refund through.
    let mut history = Recorded::default();
    for i in 0..40u64 {
        let (tool, order) = if i == 39 {
            ("fraud.check", "O-17")
        } else {
            ("kb.search", "x")
        };
        history.0.push((
            "support-bot".to_owned(),
            PastCall {
                tool: tool.into(),
                at_ms: now_ms - (40 - i) * 60_000,
                session: None,
                values: vec![("order_id".into(), hash_value(&json!(order)))],
            },
        ));
    }
    let body = br#"{"order_id": "O-17", "amount": 20, "note": "duplicate charge on the March invoice"}"#;
    let call = ToolCall::new("support-bot", "billing.refund", body);
    assert!(ruled.evaluate(&call, limits, &history).decision.is_allow());
    assert!(plain.evaluate(&call, limits, &history).decision.is_allow());
    c.bench_function("evaluate_refund_without_rules", |b| {
        b.iter(|| plain.evaluate(black_box(&call), limits, &history))
    });
    c.bench_function("evaluate_refund_with_5_rules_and_history", |b| {
        b.iter(|| ruled.evaluate(black_box(&call), limits, &history))
    });
    let args = json!({"order_id": "O-17", "amount": 20, "note": "duplicate charge on the March invoice"});
    let args = args.as_object().unwrap();
    c.bench_function("rules_only_refund", |b| {
        b.iter(|| {
            ruled
                .rules
                .evaluate(
                    "support-bot",
                    "billing.refund",
                    None,
                    call.now,
                    black_box(args),
                    &history,
                )
                .unwrap()
        })
    });
}

criterion_group!(benches, pipeline, rules);
criterion_main!(benches);
