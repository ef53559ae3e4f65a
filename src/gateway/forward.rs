//! Stage 11: an admitted call to its tool and the answer back. HTTP tools through the pooled
//! client (`upstream`), upstream MCP servers through toolgate's MCP client, each under the
//! tool's AWS role when it has one (credentials first, never an unsigned call); then the answer
//! through Bedrock guardrails and the output filters (`policy::output`), which withhold what
//! they cannot read.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::{Answer, CallRequest, Gateway, Record};
use crate::audit::UpstreamInfo;
use crate::policy::tool::{Target, Tool};
use crate::policy::{Code, Policy, Reason, Stage, output};
use crate::upstream::aws::{RoleError, Roles};
use crate::upstream::guardrail::{Guardrails, Source as GuardrailSource, Verdict as GuardrailVerdict};
use crate::upstream::mcp::{McpClient, RpcOutcome};
use crate::upstream::{Inbound, Outbound, Signing, Upstream, UpstreamError};

/// What reaches tools: the HTTP client, the MCP client, role credentials, guardrails.
pub(super) struct Forwarder {
    pub(super) upstream: Upstream,
    pub(super) mcp: McpClient,
    pub(super) roles: Roles,
    pub(super) guardrails: Guardrails,
}

/// An admitted call as forwarding needs it.
pub(super) struct Call<'a> {
    pub(super) agent: &'a str,
    pub(super) tool: &'a Tool,
    /// The filled URL of an HTTP tool.
    pub(super) url: &'a str,
    pub(super) args: &'a Map<String, Value>,
    /// The arguments' canonical JSON.
    pub(super) body: Bytes,
}

/// Credentials, region and service to sign with, owned for the call's length.
type SigningParts = (aws_credential_types::Credentials, String, String);

impl Gateway {
    /// Forwards the call and brings back its answer, filtered. `rec.upstream` says what the
    /// tool did (or that it was not reached).
    pub(super) async fn forward(
        &self,
        policy: &Policy,
        req: &CallRequest,
        rec: &mut Record<'_>,
        call: &Call<'_>,
    ) -> Result<Answer, Reason> {
        let tool = call.tool;
        let timeout = tool
            .timeout
            .unwrap_or(Duration::from_millis(self.config.limits.upstream_timeout_ms));
        let signing_parts = self.signing_parts(req, rec, call).await?;
        let signing = signing_parts.as_ref().map(|(credentials, region, service)| Signing {
            credentials,
            region,
            service,
        });
        let since = rec.clock();
        let started = Instant::now();
        let result = match &tool.target {
            Target::Http { method, url: template } => {
                let out = Outbound {
                    method: *method,
                    url: call.url,
                    origin: template.origin(),
                    arguments: call.args,
                    body: call.body.clone(),
                    request_id: &req.request_id,
                    request_id_header: req.request_id_header.as_ref(),
                    agent: call.agent,
                    trace: &req.trace,
                    timeout,
                    idle_timeout: tool
                        .idle_timeout
                        .unwrap_or(Duration::from_millis(self.config.limits.upstream_idle_timeout_ms)),
                    started,
                    max_response_bytes: tool.max_response_bytes.unwrap_or(self.config.limits.max_response_bytes),
                    headers: &tool.headers,
                    signing,
                };
                self.forwarder.upstream.forward(&out).await.map(Answer::Http)
            }
            Target::Mcp { server, tool: name } => {
                let server = policy.mcp_servers.get(server).expect("discovered tools have a server");
                let args = Value::Object(call.args.clone());
                let called = self
                    .forwarder
                    .mcp
                    .call_tool(server, name, &args, timeout, signing.as_ref());
                Box::pin(called).await.map(|outcome| match outcome {
                    RpcOutcome::Result(Value::Object(result)) => Answer::Mcp(result),
                    // Not a `CallToolResult`: passed on as the JSON it is.
                    RpcOutcome::Result(other) => Answer::Http(Inbound {
                        status: 200,
                        content_type: Some(http::HeaderValue::from_static("application/json")),
                        body: Bytes::from(serde_json::to_vec(&other).expect("JSON serialises")),
                    }),
                    RpcOutcome::Error { code, message } => Answer::McpError(json!({"error": {
                        "code": "upstream_error",
                        "message": format!("The MCP server refused the call ({code}): {message}"),
                    }})),
                })
            }
        };
        let elapsed = started.elapsed();
        rec.ran("upstream", since);
        self.meters.upstream_duration(&tool.name, elapsed.as_secs_f64());
        rec.upstream = Some(UpstreamInfo {
            status: result.as_ref().ok().map(Answer::status),
            duration_ms: crate::audit::millis(elapsed),
            role_arn: tool.aws_role.as_ref().map(|r| r.arn.clone()),
        });
        let mut answer = result.map_err(|e| {
            tracing::warn!(request_id = &*req.request_id, tool = %tool.name, "upstream failed: {e}");
            upstream_failed(tool, e)
        })?;
        if let Some((credentials, _, _)) = &signing_parts {
            answer = scrub_credentials(answer, credentials, &mut rec.notes);
        }
        let since = rec.clock();
        let answer = self.filter_output(policy, tool, answer, &mut rec.notes);
        let answer = match answer {
            Ok(answer) => self.output_guardrails(policy, tool, answer, rec).await,
            Err(reason) => Err(reason),
        };
        rec.ran("output", since);
        answer
    }

    /// The tool's AWS role credentials, region and signing service, if it has a role. Without
    /// them the call is not sent (`rec.upstream` names the role, with no status).
    async fn signing_parts(
        &self,
        req: &CallRequest,
        rec: &mut Record<'_>,
        call: &Call<'_>,
    ) -> Result<Option<SigningParts>, Reason> {
        let tool = call.tool;
        let Some(role) = &tool.aws_role else {
            return Ok(None);
        };
        let mut fail = |code: Code, msg: String| {
            rec.upstream = Some(UpstreamInfo {
                status: None,
                duration_ms: 0.0,
                role_arn: Some(role.arn.clone()),
            });
            Reason::new(code, Stage::Upstream, "aws_role", msg)
        };
        let roles = &self.forwarder.roles;
        let credentials = match Box::pin(roles.credentials(role, call.agent, &tool.name, &req.request_id)).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(request_id = &*req.request_id, tool = %tool.name, "{e}");
                return Err(match e {
                    RoleError::Refused { .. } => fail(
                        Code::UpstreamError,
                        format!(
                            "toolgate could not assume the AWS role of tool '{}' ({}): STS refused. The call was not sent.",
                            tool.name, role.arn
                        ),
                    ),
                    RoleError::Unavailable { .. } => fail(
                        Code::Unavailable,
                        format!(
                            "toolgate could not get credentials for the AWS role of tool '{}' ({}): STS is unavailable. The call was not sent; try again later.",
                            tool.name, role.arn
                        ),
                    ),
                });
            }
        };
        let Some(region) = Box::pin(roles.region_for(role)).await else {
            let msg = format!(
                "No AWS region is configured to sign calls to tool '{}': set `aws.region` or the role's `region`.",
                tool.name
            );
            return Err(fail(Code::Unavailable, msg));
        };
        Ok(Some((credentials, region, role.sign.clone())))
    }

    /// The output filters over the answer, in the form it has.
    fn filter_output(
        &self,
        policy: &Policy,
        tool: &Tool,
        answer: Answer,
        notes: &mut Vec<Reason>,
    ) -> Result<Answer, Reason> {
        let depth = self.config.limits.max_json_depth;
        Ok(match answer {
            Answer::Http(inbound) => {
                let body =
                    output::filter_http(policy, tool, inbound.content_type.as_ref(), &inbound.body, depth, notes)?;
                Answer::Http(Inbound { body, ..inbound })
            }
            Answer::Mcp(result) => {
                let mut value = Value::Object(result);
                output::filter_value(policy, tool, &mut value, depth, notes)?;
                let Value::Object(result) = value else {
                    unreachable!("filters replace strings, not the result object")
                };
                Answer::Mcp(result)
            }
            Answer::McpError(mut error) => {
                output::filter_value(policy, tool, &mut error, depth, notes)?;
                Answer::McpError(error)
            }
        })
    }

    /// Bedrock guardrail filters among `filters` over `body` (`source` says which side of the
    /// call it is): `Some(masked text)` if one anonymised it. Nothing is allocated for a tool
    /// without guardrail filters.
    async fn guardrails(
        &self,
        policy: &Policy,
        filters: &[usize],
        source: GuardrailSource,
        what: &str,
        body: &[u8],
        rec: &mut Record<'_>,
    ) -> Result<Option<String>, Reason> {
        let stage = match source {
            GuardrailSource::Input => Stage::Content,
            GuardrailSource::Output => Stage::Output,
        };
        let mut text: Option<String> = None;
        for f in filters.iter().map(|&i| &policy.filters[i]) {
            let Some(g) = &f.guardrail else { continue };
            let current = text
                .clone()
                .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
            let reason = |code: Code, message: String| Reason::new(code, stage, f.name.clone(), message);
            match Box::pin(self.forwarder.guardrails.apply(g, source, &current)).await {
                Ok(GuardrailVerdict::Pass) => {}
                Ok(GuardrailVerdict::Masked { text: t, summary }) => {
                    rec.notes.push(reason(
                        Code::ContentBlocked,
                        format!("Guardrail filter '{}' anonymised {what} ({summary}).", f.name),
                    ));
                    text = Some(t);
                }
                Ok(GuardrailVerdict::Blocked { summary }) => {
                    return Err(reason(
                        Code::ContentBlocked,
                        format!("Guardrail filter '{}' blocked {what} ({summary}).", f.name),
                    ));
                }
                Err(e) => {
                    tracing::warn!(filter = %f.name, "guardrail failed: {e}");
                    return Err(reason(
                        Code::Unavailable,
                        format!(
                            "Guardrail filter '{}' could not check {what}, so the call was refused. Try again later.",
                            f.name
                        ),
                    ));
                }
            }
        }
        Ok(text)
    }

    /// Input guardrails over the arguments: `Some(masked)` if one anonymised them.
    pub(super) async fn input_guardrails(
        &self,
        policy: &Policy,
        tool: &Tool,
        body: &[u8],
        rec: &mut Record<'_>,
    ) -> Result<Option<Map<String, Value>>, Reason> {
        let masked = self
            .guardrails(
                policy,
                &tool.input_filters,
                GuardrailSource::Input,
                "the arguments",
                body,
                rec,
            )
            .await?;
        match masked.map(|t| serde_json::from_str::<Value>(&t)) {
            None => Ok(None),
            Some(Ok(Value::Object(m))) => Ok(Some(m)),
            Some(_) => Err(Reason::new(
                Code::ContentBlocked,
                Stage::Content,
                "guardrail",
                "A guardrail anonymised the arguments into something that is no longer a JSON object, so the call was refused.",
            )),
        }
    }

    /// Output guardrails over the answer (the tool did run), as the text the agent receives.
    /// A masked MCP result that is no longer an object goes on as JSON text.
    async fn output_guardrails(
        &self,
        policy: &Policy,
        tool: &Tool,
        answer: Answer,
        rec: &mut Record<'_>,
    ) -> Result<Answer, Reason> {
        if tool
            .output_filters
            .iter()
            .all(|&i| policy.filters[i].guardrail.is_none())
        {
            return Ok(answer);
        }
        let what = format!("the response of tool '{}'", tool.name);
        let text = match &answer {
            Answer::Http(inbound) => inbound.body.clone(),
            Answer::Mcp(result) => Bytes::from(serde_json::to_vec(result).expect("JSON serialises")),
            Answer::McpError(error) => Bytes::from(serde_json::to_vec(error).expect("JSON serialises")),
        };
        let filters = &tool.output_filters;
        let Some(masked) = self
            .guardrails(policy, filters, GuardrailSource::Output, &what, &text, rec)
            .await?
        else {
            return Ok(answer);
        };
        Ok(match answer {
            Answer::Http(inbound) => Answer::Http(Inbound {
                body: Bytes::from(masked),
                ..inbound
            }),
            Answer::Mcp(_) => match serde_json::from_str::<Value>(&masked) {
                Ok(Value::Object(result)) => Answer::Mcp(result),
                _ => Answer::Http(Inbound {
                    status: 200,
                    content_type: Some(http::HeaderValue::from_static("application/json")),
                    body: Bytes::from(masked),
                }),
            },
            Answer::McpError(_) => Answer::Http(Inbound {
                status: 502,
                content_type: Some(http::HeaderValue::from_static("application/json")),
                body: Bytes::from(masked),
            }),
        })
    }
}

/// The answer without the role credentials the call was signed with: a tool that echoes its
/// request (headers, a debug dump) must not hand the agent toolgate's temporary AWS
/// credentials. Their exact values are replaced wherever they occur, as written and with `/`
/// JSON-escaped, by `[REDACTED:aws_credentials]`; a note says so.
fn scrub_credentials(
    answer: Answer,
    credentials: &aws_credential_types::Credentials,
    notes: &mut Vec<Reason>,
) -> Answer {
    let mut secrets: Vec<String> = [
        Some(credentials.access_key_id()),
        Some(credentials.secret_access_key()),
        credentials.session_token(),
    ]
    .into_iter()
    .flatten()
    .filter(|s| s.len() >= 8)
    .map(str::to_owned)
    .collect();
    let escaped: Vec<String> = secrets
        .iter()
        .filter(|s| s.contains('/'))
        .map(|s| s.replace('/', "\\/"))
        .collect();
    secrets.extend(escaped);
    let Ok(found) = aho_corasick::AhoCorasick::builder()
        .match_kind(aho_corasick::MatchKind::LeftmostLongest)
        .build(&secrets)
    else {
        return answer;
    };
    const GONE: &str = "[REDACTED:aws_credentials]";
    let with = vec![GONE; secrets.len()];
    let mut scrubbed = false;
    let mut scrub_value = |v: &mut Value| {
        let mut stack = vec![v];
        while let Some(v) = stack.pop() {
            match v {
                Value::String(s) if found.is_match(s.as_str()) => {
                    *s = found.replace_all(s, &with);
                    scrubbed = true;
                }
                Value::Array(items) => stack.extend(items.iter_mut()),
                Value::Object(map) => stack.extend(map.values_mut()),
                _ => {}
            }
        }
    };
    let answer = match answer {
        Answer::Http(mut inbound) => {
            if found.is_match(&inbound.body[..]) {
                inbound.body = Bytes::from(found.replace_all_bytes(&inbound.body, &with));
                scrubbed = true;
            }
            Answer::Http(inbound)
        }
        Answer::Mcp(result) => {
            let mut value = Value::Object(result);
            scrub_value(&mut value);
            let Value::Object(result) = value else {
                unreachable!("scrubbing replaces strings only")
            };
            Answer::Mcp(result)
        }
        Answer::McpError(mut error) => {
            scrub_value(&mut error);
            Answer::McpError(error)
        }
    };
    if scrubbed {
        let message = "Removed the AWS credentials the call was signed with from the tool's response.";
        notes.push(Reason::new(Code::ContentBlocked, Stage::Output, "aws_role", message));
    }
    answer
}

/// The reason for a tool that did not answer usefully.
fn upstream_failed(tool: &Tool, e: UpstreamError) -> Reason {
    let (code, message) = match e {
        UpstreamError::Timeout(d) => (
            Code::UpstreamTimeout,
            format!(
                "The tool '{}' did not answer within {} ms. The call may or may not have taken effect; it was not retried.",
                tool.name,
                d.as_millis()
            ),
        ),
        UpstreamError::Unreachable(_) => (
            Code::UpstreamError,
            format!("The tool '{}' could not be reached.", tool.name),
        ),
        UpstreamError::TooLarge(n) => (
            Code::UpstreamError,
            format!("The tool '{}' answered with more than {n} bytes.", tool.name),
        ),
        UpstreamError::Protocol(_) => (
            Code::UpstreamError,
            format!("The tool '{}' sent a malformed response.", tool.name),
        ),
    };
    Reason::new(code, Stage::Upstream, "upstream", message)
}
