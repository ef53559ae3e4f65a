//! The stages through [`Gateway::call`], without a transport: each refusal with its code, the
//! order the stages run in (what a call learns, and what it costs, depends on it), the outcome
//! the transports map, and the event every call leaves. Tools point at a closed port, so a call
//! that gets past every check fails at the upstream, `allow`ed.

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use super::{Arguments, CallOutcome, CallRequest, Caller, Gateway, ToolName};
use crate::approval::Approvals;
use crate::audit::AuditLog;
use crate::config::ServerConfig;
use crate::policy::{Code, Policy, Reason, Stage};
use crate::upstream::TraceContext;

const KEY: &str = "test-key";

fn files() -> String {
    let digest = crate::policy::arguments::sha256_hex(KEY.as_bytes());
    format!(
        r#"
agents:
  bot:
    credentials: {{ api_key_sha256: [ "{digest}" ] }}
    tools: [ kb.search, pay.send ]
    limits: {{ calls_per_minute: 2 }}
tools:
  kb.search:
    upstream: {{ url: "http://127.0.0.1:9/kb" }}
  pay.send:
    upstream: {{ url: "http://127.0.0.1:9/pay" }}
    arguments: {{ type: object, required: [ amount ], properties: {{ amount: {{ type: integer }} }} }}
"#
    )
}

const RULES: &str = "@id(\"big\")\n@approval(\"finance\")\nforbid (principal, action == Action::\"pay.send\", resource) when { context.input.amount > 100 };\n";

struct Fixture {
    gateway: Gateway,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        Self::with_audit_file(None)
    }

    fn with_audit_file(file: Option<&str>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let audit = match file {
            Some(f) => f.to_owned(),
            None => dir.path().join("audit.jsonl").display().to_string(),
        };
        let config = ServerConfig::parse(
            "test.yaml",
            &format!("listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\naudit: {{ file: {audit} }}\nlimits: {{ upstream_timeout_ms: 2000 }}\n"),
        )
        .unwrap();
        let sources = [
            ("policy.yaml".to_owned(), files()),
            ("rules.cedar".to_owned(), RULES.to_owned()),
        ];
        let policy = Policy::compile(&sources, |_| Err(std::io::Error::other("none"))).unwrap();
        let log = AuditLog::open(&config.audit).unwrap();
        let approvals = Approvals::open(&dir.path().join("approvals.redb"), Duration::from_secs(600)).unwrap();
        Fixture {
            gateway: Gateway::new(config, policy, None, log, approvals),
            dir,
        }
    }

    async fn call(&self, id: &str, caller: Caller, tool: &str, args: Result<&str, Reason>) -> CallOutcome {
        self.call_with(id, caller, tool, args, None, None).await
    }

    async fn call_with(
        &self,
        id: &str,
        caller: Caller,
        tool: &str,
        args: Result<&str, Reason>,
        session: Option<&str>,
        approval: Option<&str>,
    ) -> CallOutcome {
        let arguments = args.map(|a| Arguments::Body(Bytes::from(a.to_owned())));
        self.gateway
            .call(CallRequest {
                request_id: id.into(),
                request_id_header: None,
                source: None,
                caller,
                tool: ToolName::new(tool),
                arguments,
                session: session.map(str::to_owned),
                approval: approval.map(str::to_owned),
                trace: TraceContext::default(),
            })
            .await
    }

    /// The `tool_call` event of request `id`.
    fn event(&self, id: &str) -> Value {
        let text = std::fs::read_to_string(self.dir.path().join("audit.jsonl")).unwrap();
        text.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|e| e["event"] == "tool_call" && e["request_id"] == id)
            .unwrap_or_else(|| panic!("no event for {id}"))
    }
}

fn bot() -> Caller {
    Caller::Credentials {
        authorization: Some(http::HeaderValue::from_static("Bearer test-key")),
        client: None,
    }
}

/// The refusal's code, stage and rule, checked against its decision.
fn refused(outcome: &CallOutcome) -> (Code, Stage, &str) {
    let CallOutcome::Refused(r) = outcome else {
        panic!("refused, not {outcome:?}")
    };
    assert_eq!(outcome.decision(), "deny");
    (r.code, r.stage, r.rule.as_str())
}

fn too_large() -> Reason {
    Reason::new(Code::PayloadTooLarge, Stage::Request, "limits", "too large")
}

#[tokio::test]
async fn an_unauthenticated_caller_learns_nothing_not_even_the_body_limit() {
    let f = Fixture::new();
    let out = f
        .call(
            "r1",
            Caller::Credentials {
                authorization: None,
                client: None,
            },
            "kb.search",
            Err(too_large()),
        )
        .await;
    assert_eq!(
        refused(&out),
        (Code::Unauthenticated, Stage::Authentication, "authentication")
    );
    let out = f.call("r2", Caller::Agent("ghost".into()), "kb.search", Ok("{}")).await;
    assert_eq!(
        refused(&out).0,
        Code::Unauthenticated,
        "an agent no longer in the policy"
    );
    let e = f.event("r1");
    assert_eq!(
        (e["agent"].clone(), e["code"].clone()),
        (Value::Null, "unauthenticated".into())
    );
    // An authenticated caller is told about its body.
    let out = f.call("r3", bot(), "kb.search", Err(too_large())).await;
    assert_eq!(refused(&out), (Code::PayloadTooLarge, Stage::Request, "limits"));
    assert_eq!(f.event("r3")["agent"], "bot");
}

#[tokio::test]
async fn a_malformed_session_is_refused_and_never_recorded() {
    let f = Fixture::new();
    let out = f
        .call_with("s1", bot(), "kb.search", Ok("{}"), Some("no spaces allowed"), None)
        .await;
    assert_eq!(refused(&out), (Code::InvalidRequest, Stage::Request, "session"));
    assert_eq!(f.event("s1")["session"], Value::Null);
}

#[tokio::test]
async fn a_quarantined_agent_is_refused_before_anything_else_is_looked_at() {
    let f = Fixture::new();
    let done = f
        .gateway
        .quarantine("bot", None, crate::audit::By::gateway("alice"), "testing")
        .await
        .unwrap();
    assert!(done.changed && done.audited);
    // Its body would be refused too, and its tool is not allowed: quarantine answers first.
    let out = f.call("q1", bot(), "billing.delete", Err(too_large())).await;
    assert_eq!(refused(&out), (Code::AgentQuarantined, Stage::Quarantine, "quarantine"));
    assert!(
        f.gateway
            .release("bot", crate::audit::By::gateway("alice"), "done")
            .await
            .unwrap()
    );
    let out = f.call("q2", bot(), "billing.delete", Ok("{}")).await;
    assert_eq!(refused(&out).0, Code::ToolNotAllowed);
}

#[tokio::test]
async fn a_call_that_cannot_be_recorded_is_refused_and_the_next_is_not_decided() {
    if !std::path::Path::new("/dev/full").exists() {
        return;
    }
    let f = Fixture::with_audit_file(Some("/dev/full"));
    let out = f.call("a1", bot(), "kb.search", Ok("{}")).await;
    assert_eq!(refused(&out), (Code::Unavailable, Stage::Audit, "audit"));
    // The sink is known to fail now: the next call stops at stage 2, before its tool is even
    // looked up.
    let out = f.call("a2", bot(), "no.such.tool", Ok("{}")).await;
    assert_eq!(refused(&out), (Code::Unavailable, Stage::Audit, "audit"));
}

#[tokio::test]
async fn a_held_call_costs_no_rate_allowance_and_its_approval_is_spent_only_past_the_limits() {
    let f = Fixture::new();
    // Three held calls with a limit of two a minute: each is held, none is refused for rate.
    let mut id = String::new();
    for n in 0..3 {
        let out = f
            .call(&format!("h{n}"), bot(), "pay.send", Ok(r#"{"amount": 500}"#))
            .await;
        let CallOutcome::Held(reason) = &out else {
            panic!("held, not {out:?}")
        };
        assert_eq!(
            (out.decision(), reason.code),
            ("approval_required", Code::ApprovalRequired)
        );
        id = reason.approval_id.clone().expect("the approval to poll");
    }
    assert_eq!(f.event("h2")["approval_id"], id.as_str(), "the same pending approval");
    let decided = f
        .gateway
        .decide_approval(
            &id,
            true,
            &crate::approval::Approver {
                name: "dana".to_owned(),
                groups: None,
            },
            None,
            crate::audit::By::gateway("dana"),
            "ok",
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(decided.status.as_str(), "approved");
    // Use up the rate allowance, then present the approval: refused for rate, and not spent.
    for n in 0..2 {
        let out = f.call(&format!("k{n}"), bot(), "kb.search", Ok("{}")).await;
        assert!(matches!(out, CallOutcome::Failed(_)), "{out:?}");
    }
    let approved = Ok(r#"{"amount": 500}"#);
    let out = f
        .call_with("p1", bot(), "pay.send", approved.clone(), None, Some(&id))
        .await;
    assert_eq!(refused(&out), (Code::RateLimited, Stage::Limits, "calls_per_minute"));
    let CallOutcome::Refused(r) = &out else { unreachable!() };
    assert!(r.retry_after.is_some_and(|s| s > 0), "a 429 says when to retry");
    let still = f
        .gateway
        .approvals
        .get(id, crate::state::unix_now())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(still.status.as_str(), "approved", "a 429 does not use the approval up");
}

#[tokio::test]
async fn an_allowed_call_whose_tool_cannot_be_reached_failed_but_stays_allowed() {
    let f = Fixture::new();
    let out = f.call("u1", bot(), "kb.search", Ok(r#"{"q": "x"}"#)).await;
    let CallOutcome::Failed(reason) = &out else {
        panic!("failed, not {out:?}")
    };
    assert_eq!(
        (out.decision(), reason.code, reason.stage),
        ("allow", Code::UpstreamError, Stage::Upstream)
    );
    let e = f.event("u1");
    assert_eq!(
        (e["decision"].as_str(), e["code"].as_str()),
        (Some("allow"), Some("upstream_error"))
    );
    assert!(e["upstream"]["duration_ms"].is_number(), "{e}");
    assert_eq!(e["upstream"]["status"], Value::Null, "no answer, no status");
    assert_eq!(e["arguments"], serde_json::json!({"q": "x"}));
}
