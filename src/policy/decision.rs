//! What the pipeline decides, and why: stable reason codes shared by responses, audit events and
//! tests. A deny is a value, never an error.

use serde::{Deserialize, Serialize};

/// A stable reason code (the contract's error table). The string form never changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    Unauthenticated,
    ToolNotAllowed,
    InvalidArguments,
    ContentBlocked,
    RuleDenied,
    ApprovalRequired,
    ApprovalDenied,
    RateLimited,
    BudgetExceeded,
    AgentQuarantined,
    /// An upstream MCP tool's definition changed since it was pinned.
    ToolChanged,
    PayloadTooLarge,
    UpstreamTimeout,
    UpstreamError,
    Unavailable,
    /// A malformed request: a session id, an unreadable body, a bad MCP message. (A malformed
    /// `X-Request-Id` is replaced, not refused.)
    InvalidRequest,
    /// Not a block: the route does not exist on this plane.
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    /// An admin action on something not in the right state (deciding a decided approval).
    Conflict,
    /// An authenticated admin caller whose roles or approval groups do not allow the action.
    Forbidden,
    Internal,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Unauthenticated => "unauthenticated",
            Code::ToolNotAllowed => "tool_not_allowed",
            Code::InvalidArguments => "invalid_arguments",
            Code::ContentBlocked => "content_blocked",
            Code::RuleDenied => "rule_denied",
            Code::ApprovalRequired => "approval_required",
            Code::ApprovalDenied => "approval_denied",
            Code::RateLimited => "rate_limited",
            Code::BudgetExceeded => "budget_exceeded",
            Code::AgentQuarantined => "agent_quarantined",
            Code::ToolChanged => "tool_changed",
            Code::PayloadTooLarge => "payload_too_large",
            Code::UpstreamTimeout => "upstream_timeout",
            Code::UpstreamError => "upstream_error",
            Code::Unavailable => "unavailable",
            Code::InvalidRequest => "invalid_request",
            Code::NotFound => "not_found",
            Code::MethodNotAllowed => "method_not_allowed",
            Code::RequestTimeout => "request_timeout",
            Code::Conflict => "conflict",
            Code::Forbidden => "forbidden",
            Code::Internal => "internal",
        }
    }

    /// The HTTP status the contract assigns to this code.
    pub fn http_status(self) -> u16 {
        match self {
            Code::Unauthenticated => 401,
            Code::ToolNotAllowed
            | Code::ContentBlocked
            | Code::RuleDenied
            | Code::ApprovalDenied
            | Code::AgentQuarantined
            | Code::ToolChanged
            | Code::Forbidden => 403,
            Code::InvalidArguments => 422,
            Code::ApprovalRequired => 202,
            Code::RateLimited | Code::BudgetExceeded => 429,
            Code::PayloadTooLarge => 413,
            Code::UpstreamTimeout => 504,
            Code::UpstreamError => 502,
            Code::Unavailable => 503,
            Code::InvalidRequest => 400,
            Code::NotFound => 404,
            Code::MethodNotAllowed => 405,
            Code::RequestTimeout => 408,
            Code::Conflict => 409,
            Code::Internal => 500,
        }
    }
}

/// The pipeline stage that produced a reason, in pipeline order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Request,
    Authentication,
    Allowlist,
    Arguments,
    Content,
    /// Business rules (Cedar), after the content filters.
    Rules,
    /// An approval presented with the call (`X-Toolgate-Approval`).
    Approval,
    /// Rate limits and token budgets (stateful, after the static checks).
    Limits,
    /// Quarantine (after authentication).
    Quarantine,
    Upstream,
    /// Output filters over the tool's response (the tool did run).
    Output,
    Audit,
}

/// Why a call was blocked (or, for `Stage::Content` redactions, changed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reason {
    pub stage: Stage,
    #[serde(skip)]
    pub code: Code,
    /// The rule, filter or check that decided, e.g. `allowlist`, `schema`, `internal-terms`.
    pub rule: String,
    /// Safe to show the agent: never echoes its input or a matched secret.
    pub message: String,
    /// Seconds to wait before retrying (`Retry-After`), for rate and budget denials.
    #[serde(skip)]
    pub retry_after: Option<u64>,
    /// For `approval_required`: the approval to wait for (the body adds `status_url`).
    #[serde(skip)]
    pub approval_id: Option<String>,
}

impl Reason {
    pub fn new(code: Code, stage: Stage, rule: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            stage,
            code,
            rule: rule.into(),
            message: message.into(),
            retry_after: None,
            approval_id: None,
        }
    }

    /// The same reason, asking the caller to retry after `secs` (at least 1).
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }
}

/// The outcome of evaluating one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(Reason),
}

impl Decision {
    pub fn as_str(&self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny(r) if r.code == Code::ApprovalRequired => "approval_required",
            Decision::Deny(_) => "deny",
        }
    }

    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialise_as_their_stable_names() {
        for code in [Code::ToolNotAllowed, Code::UpstreamTimeout, Code::Unauthenticated] {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
    }

    #[test]
    fn statuses_follow_the_contract_table() {
        assert_eq!(Code::Unauthenticated.http_status(), 401);
        assert_eq!(Code::InvalidArguments.http_status(), 422);
        assert_eq!(Code::ApprovalRequired.http_status(), 202);
        assert_eq!(Code::BudgetExceeded.http_status(), 429);
        assert_eq!(Code::UpstreamTimeout.http_status(), 504);
    }
}
