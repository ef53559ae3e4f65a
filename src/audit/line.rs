//! The `tool_call` event, the one line every call writes, serialised by hand: the same JSON
//! serde's derive produces (a test holds the two equal), without serde_json escaping every key
//! and value byte by byte when nearly all of them — ids, hashes, names, timestamps — are plain.
//! That escaping was ~7% of a call's instructions (docs/benchmarks.md). Strings that do need
//! escaping, and the structured parts (reasons, redacted arguments), still go through serde_json.

use serde::Serialize;

use super::{CallForwarding, Event, RecordedArguments, Timestamp, ToolCallEvent};
use crate::policy::arguments::write_str;

/// A key as [`Line::key`] takes it, `,"name":`, put together at compile time: one copy per key.
macro_rules! k {
    ($name:literal) => {
        concat!(",\"", $name, "\":")
    };
}

/// One JSON object under construction.
struct Line(Vec<u8>);

impl Line {
    fn new() -> Self {
        let mut out = Vec::with_capacity(1024);
        out.push(b'{');
        Self(out)
    }

    /// `key` is `,"name":` as [`k!`] writes it; the comma is left out after a `{`.
    fn key(&mut self, key: &'static str) {
        let key = if self.0.last() == Some(&b'{') { &key[1..] } else { key };
        self.0.extend_from_slice(key.as_bytes());
    }

    fn str(&mut self, key: &'static str, value: &str) {
        self.key(key);
        write_str(&mut self.0, value);
    }

    fn opt_str(&mut self, key: &'static str, value: Option<&str>) {
        match value {
            Some(v) => self.str(key, v),
            None => self.raw(key, b"null"),
        }
    }

    fn raw(&mut self, key: &'static str, json: &[u8]) {
        self.key(key);
        self.0.extend_from_slice(json);
    }

    fn serde<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) {
        self.key(key);
        serde_json::to_writer(&mut self.0, value).expect("audit values serialise");
    }

    /// An IP address as a string: IPv4 octet by octet (`Display` goes through `fmt`, several
    /// times the cost, and every event has one), IPv6 through `Display`.
    fn ip(&mut self, key: &'static str, ip: &std::net::IpAddr) {
        use std::io::Write as _;
        self.key(key);
        match ip {
            std::net::IpAddr::V4(v4) => {
                self.0.push(b'"');
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        self.0.push(b'.');
                    }
                    self.0.extend_from_slice(itoa::Buffer::new().format(octet).as_bytes());
                }
                self.0.push(b'"');
            }
            std::net::IpAddr::V6(_) => write!(self.0, "\"{ip}\"").expect("writing to a Vec cannot fail"),
        }
    }

    fn number(&mut self, key: &'static str, n: impl itoa::Integer) {
        self.key(key);
        self.0.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }

    /// Opens a nested object as `key`'s value; [`Line::close`] ends it.
    fn open(&mut self, key: &'static str) {
        self.key(key);
        self.0.push(b'{');
    }

    fn close(&mut self) {
        self.0.push(b'}');
    }

    /// The line, newline-terminated.
    fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(b"}\n");
        self.0
    }
}

impl ToolCallEvent<'_> {
    /// The event as one newline-terminated JSON line, field for field what serde would write.
    pub(super) fn write_line(&self) -> Vec<u8> {
        let mut line = Line::new();
        line.str(k!("ts"), self.ts.as_str());
        line.str(k!("event"), Self::NAME);
        line.str(k!("request_id"), self.request_id);
        if let Some(ip) = &self.source {
            line.ip(k!("source"), ip);
        }
        line.opt_str(k!("session"), self.session);
        line.opt_str(k!("agent"), self.agent);
        line.opt_str(k!("tool"), self.tool);
        line.str(k!("decision"), self.decision);
        line.opt_str(k!("code"), self.code);
        if self.reasons.is_empty() {
            line.raw(k!("reasons"), b"[]");
        } else {
            line.serde(k!("reasons"), self.reasons);
        }
        match &self.arguments {
            None => line.raw(k!("arguments"), b"null"),
            Some(RecordedArguments::Json(json)) => line.raw(k!("arguments"), json),
            Some(RecordedArguments::Value(v)) => line.serde(k!("arguments"), v),
        }
        line.str(k!("arguments_sha256"), self.arguments_sha256);
        match &self.upstream {
            None => line.raw(k!("upstream"), b"null"),
            Some(u) => {
                line.open(k!("upstream"));
                if let Some(status) = u.status {
                    line.number(k!("status"), status);
                }
                line.serde(k!("duration_ms"), &u.duration_ms);
                if let Some(arn) = &u.role_arn {
                    line.str(k!("role_arn"), arn);
                }
                line.close();
            }
        }
        match self.tokens {
            None => line.raw(k!("tokens"), b"null"),
            Some(t) => {
                line.open(k!("tokens"));
                line.number(k!("input"), t.input);
                line.number(k!("output"), t.output);
                line.close();
            }
        }
        if let Some(id) = self.approval_id {
            line.str(k!("approval_id"), id);
        }
        if !self.would_deny.is_empty() {
            line.serde(k!("would_deny"), self.would_deny);
        }
        if let Some(shadow) = self.shadow {
            line.serde(k!("shadow"), shadow);
        }
        line.serde(k!("duration_ms"), &self.duration_ms);
        line.str(k!("policy_version"), self.policy_version);
        line.finish()
    }
}

impl CallForwarding<'_> {
    /// The event as one newline-terminated JSON line, field for field what serde would write.
    pub(super) fn write_line(&self, ts: Timestamp) -> Vec<u8> {
        let mut line = Line::new();
        line.str(k!("ts"), ts.as_str());
        line.str(k!("event"), Self::NAME);
        line.str(k!("request_id"), self.request_id);
        line.str(k!("agent"), self.agent);
        line.str(k!("tool"), self.tool);
        line.str(k!("arguments_sha256"), self.arguments_sha256);
        if let Some(session) = self.session {
            line.str(k!("session"), session);
        }
        if let Some(id) = self.approval_id {
            line.str(k!("approval_id"), id);
        }
        line.str(k!("policy_version"), self.policy_version);
        line.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Tokens, UpstreamInfo};
    use crate::policy::{Code, Reason, Stage};
    use serde_json::{Value, json};

    fn both(event: &ToolCallEvent<'_>) -> (Value, Value) {
        let line = event.write_line();
        assert_eq!(line.last(), Some(&b'\n'), "one line, newline-terminated");
        assert!(!line[..line.len() - 1].contains(&b'\n'), "no newline inside the line");
        let by_hand: Value = serde_json::from_slice(&line).expect("the hand-written line is JSON");
        let by_serde = serde_json::from_slice(&crate::audit::events::stamped(event.ts, event)).unwrap();
        (by_hand, by_serde)
    }

    #[test]
    fn plain_events_match_serde() {
        let event = ToolCallEvent {
            ts: crate::audit::now(),
            request_id: "r-1",
            source: Some("10.1.2.3".parse().unwrap()),
            session: None,
            agent: Some("support-bot"),
            tool: Some("kb.search"),
            decision: "allow",
            code: None,
            reasons: &[],
            arguments: Some(RecordedArguments::Json(bytes::Bytes::from_static(
                br#"{"limit":5,"query":"x"}"#,
            ))),
            arguments_sha256: "ab",
            upstream: Some(UpstreamInfo {
                status: Some(200),
                duration_ms: 3.125,
                role_arn: None,
            }),
            tokens: Some(Tokens { input: 54, output: 14 }),
            approval_id: None,
            would_deny: &[],
            shadow: None,
            duration_ms: 3.5,
            policy_version: "78f3",
        };
        let (by_hand, by_serde) = both(&event);
        assert_eq!(by_hand, by_serde);
        assert_eq!(by_hand["arguments"], json!({"limit": 5, "query": "x"}));
        assert_eq!(by_hand["source"], "10.1.2.3");
    }

    #[test]
    fn strings_that_need_escaping_and_every_optional_part_match_serde() {
        let reasons = [Reason::new(
            Code::ContentBlocked,
            Stage::Request,
            "internal-terms",
            "Blocked by \"internal-terms\"\n(deny_term).",
        )];
        let would_deny = ["shadow \\ rule".to_owned()];
        let event = ToolCallEvent {
            ts: crate::audit::now(),
            request_id: "quote\"back\\slash\u{1}ctl",
            source: Some("2001:db8::1".parse().unwrap()),
            session: Some("s\ttab"),
            agent: None,
            tool: Some("é\u{7f}\u{2028}"),
            decision: "deny",
            code: Some("content_blocked"),
            reasons: &reasons,
            arguments: Some(RecordedArguments::Value(
                json!({"note": "[REDACTED:email]", "k\"": [1, null]}),
            )),
            arguments_sha256: "",
            upstream: Some(UpstreamInfo {
                status: None,
                duration_ms: 0.0,
                role_arn: Some("arn:aws:iam::123456789012:role/x".into()),
            }),
            tokens: None,
            approval_id: Some("ap-1"),
            would_deny: &would_deny,
            shadow: None,
            duration_ms: 12.345,
            policy_version: "v",
        };
        let (by_hand, by_serde) = both(&event);
        assert_eq!(by_hand, by_serde);
        assert_eq!(by_hand["request_id"], "quote\"back\\slash\u{1}ctl");
    }

    #[test]
    fn absent_parts_are_null_as_serde_writes_them() {
        let event = ToolCallEvent {
            ts: crate::audit::now(),
            request_id: "r",
            source: None,
            session: None,
            agent: None,
            tool: None,
            decision: "deny",
            code: Some("unauthenticated"),
            reasons: &[],
            arguments: None,
            arguments_sha256: "",
            upstream: None,
            tokens: None,
            approval_id: None,
            would_deny: &[],
            shadow: None,
            duration_ms: 0.25,
            policy_version: "v",
        };
        let (by_hand, by_serde) = both(&event);
        assert_eq!(by_hand, by_serde);
    }

    #[test]
    fn a_call_forwarding_line_matches_serde() {
        let ts = crate::audit::now();
        for (session, approval_id) in [(None, None), (Some("s-1"), Some("apr_x\"q"))] {
            let event = CallForwarding {
                request_id: "r-1",
                agent: "support-bot",
                tool: "kb.search",
                arguments_sha256: "ab12",
                session,
                approval_id,
                policy_version: "v1",
            };
            let line = event.write_line(ts);
            let by_hand: Value = serde_json::from_slice(&line).unwrap();
            let by_serde: Value = serde_json::from_slice(&crate::audit::events::stamped(ts, &event)).unwrap();
            assert_eq!(by_hand, by_serde);
            assert_eq!(line.last(), Some(&b'\n'));
        }
    }
}
