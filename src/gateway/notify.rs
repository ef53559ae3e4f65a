//! Tells approvers about new approval requests: one POST per request to `approvals.webhook`,
//! over HTTPS (the receiver verified against the system's trust store or `SSL_CERT_FILE`, as
//! for https tools), signed the way Stripe and Slack sign theirs, retried with back-off, in
//! toolgate's JSON or as a Slack message with a link to the inbox entry.
//!
//! The signature: `X-Toolgate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
//! "<t>.<body>")>`. A receiver recomputes it over the raw body, compares in constant time, and
//! refuses a `t` more than five minutes from its clock (a replay); `X-Toolgate-Delivery`, the
//! same on every attempt of one notification, lets it drop a retry it already took.
//!
//! A notification never holds up a call: it is sent from its own task, at most
//! [`MAX_IN_FLIGHT`] at once (beyond, it is dropped and logged; the approval stands and is
//! listed on the admin plane and in the inbox).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::approval::Approval;
use crate::config::{WebhookConfig, WebhookFormat};

const MAX_IN_FLIGHT: usize = 64;
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

pub(super) struct Webhook {
    config: WebhookConfig,
    /// The signing secret, read from `secret_env` at start. `Err`: the variable is named but
    /// unset, so nothing is sent (never unsigned in its place).
    secret: Result<Option<Vec<u8>>, String>,
    /// `admin.public_url`: where the inbox links point.
    inbox: Option<String>,
    client: Client,
    in_flight: Arc<tokio::sync::Semaphore>,
}

/// The signature header's value for `body` sent at `t`.
pub fn signature(secret: &[u8], t: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

impl Webhook {
    pub(super) fn new(config: &WebhookConfig, public_url: Option<&str>) -> Self {
        let secret = match &config.secret_env {
            None => Ok(None),
            Some(var) => match std::env::var(var) {
                Ok(s) if !s.trim().is_empty() => Ok(Some(s.trim().as_bytes().to_vec())),
                _ => {
                    let why = format!("approvals.webhook.secret_env names {var}, which is not set");
                    tracing::error!("{why}: approval notifications will not be sent");
                    Err(why)
                }
            },
        };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(crate::upstream::tls_config())
            .https_or_http()
            .enable_http1()
            .build();
        Self {
            config: config.clone(),
            secret,
            inbox: public_url.map(|u| format!("{}/ui/", u.trim_end_matches('/'))),
            client: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
        }
    }

    pub(super) fn notify(&self, a: &Approval) {
        let secret = match &self.secret {
            Ok(s) => s.clone(),
            Err(why) => {
                tracing::error!(approval = %a.id, "approval webhook not sent: {why}");
                metrics::counter!("toolgate_webhook_deliveries_total", "result" => "dropped").increment(1);
                return;
            }
        };
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            tracing::warn!(approval = %a.id, "approval webhook: too many notifications in flight, dropped this one");
            metrics::counter!("toolgate_webhook_deliveries_total", "result" => "dropped").increment(1);
            return;
        };
        let body = Bytes::from(self.payload(a).to_string());
        let delivery = uuid::Uuid::new_v4().to_string();
        let (client, config, id) = (self.client.clone(), self.config.clone(), a.id.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let mut wait = Duration::from_millis(config.backoff_ms);
            for attempt in 1..=config.max_attempts {
                let t = crate::state::unix_now();
                let mut request = http::Request::post(&config.url)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .header("x-toolgate-delivery", &delivery)
                    .header("x-toolgate-event", "approval_requested");
                if let Some(secret) = &secret {
                    request = request.header("x-toolgate-signature", signature(secret, t, &body));
                }
                let Ok(request) = request.body(Full::new(body.clone())) else {
                    tracing::warn!("approval webhook: the configured URL is not usable");
                    return;
                };
                let timeout = Duration::from_millis(config.timeout_ms);
                let why = match tokio::time::timeout(timeout, client.request(request)).await {
                    Ok(Ok(r)) if r.status().is_success() => {
                        metrics::counter!("toolgate_webhook_deliveries_total", "result" => "ok").increment(1);
                        return;
                    }
                    Ok(Ok(r))
                        if (r.status().is_client_error() && r.status() != http::StatusCode::TOO_MANY_REQUESTS)
                            || r.status().is_redirection() =>
                    {
                        // The receiver refuses this notification as such: sending it again
                        // would be refused again.
                        tracing::warn!(approval = %id, status = r.status().as_u16(), "approval webhook refused the notification");
                        metrics::counter!("toolgate_webhook_deliveries_total", "result" => "refused").increment(1);
                        return;
                    }
                    Ok(Ok(r)) => format!("answered {}", r.status().as_u16()),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no answer within {timeout:?}"),
                };
                if attempt == config.max_attempts {
                    tracing::error!(approval = %id, attempts = attempt, "approval webhook failed, gave up: {why}");
                    metrics::counter!("toolgate_webhook_deliveries_total", "result" => "failed").increment(1);
                    return;
                }
                tracing::warn!(approval = %id, attempt, "approval webhook failed, retrying in {wait:?}: {why}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_BACKOFF);
            }
        });
    }

    /// The inbox entry of `a`, if the admin plane's public address is known.
    fn link(&self, a: &Approval) -> Option<String> {
        self.inbox.as_ref().map(|inbox| format!("{inbox}#{}", a.id))
    }

    fn payload(&self, a: &Approval) -> Value {
        let link = self.link(a);
        match self.config.format {
            WebhookFormat::Toolgate => json!({
                "event": "approval_requested", "approval_id": a.id, "agent": a.agent, "tool": a.tool,
                "rule": a.rule, "group": a.group, "quorum": a.quorum, "reason": a.reason, "arguments": a.arguments,
                "arguments_sha256": a.arguments_sha256, "request_id": a.request_id,
                "requested_at": crate::audit::format_unix(a.requested_at), "expires_at": crate::audit::format_unix(a.expires_at),
                "inbox_url": link,
                "approve": format!("POST /admin/approvals/{}/approve", a.id), "deny": format!("POST /admin/approvals/{}/deny", a.id),
            }),
            WebhookFormat::Slack => slack(a, link.as_deref()),
        }
    }
}

/// A Slack incoming-webhook message (Block Kit, with `text` as the notification's fallback).
/// Every value is escaped for Slack's mrkdwn, so an argument cannot forge a link or a mention.
fn slack(a: &Approval, link: Option<&str>) -> Value {
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let mut arguments = a
        .arguments
        .as_ref()
        .map(|v| serde_json::to_string(v).unwrap_or_default())
        .unwrap_or_else(|| "(not recorded)".to_owned());
    if arguments.len() > 500 {
        let cut = (0..=500).rev().find(|&i| arguments.is_char_boundary(i)).unwrap_or(0);
        arguments.truncate(cut);
        arguments.push('…');
    }
    let summary = format!(
        "*Approval needed* from *{}*: `{}` by `{}`\n{}",
        esc(&a.group),
        esc(&a.tool),
        esc(&a.agent),
        esc(&a.reason)
    );
    let mut blocks = vec![
        json!({"type": "section", "text": {"type": "mrkdwn", "text": summary}}),
        json!({"type": "section", "text": {"type": "mrkdwn", "text": format!("Arguments (redacted):\n```{}```", esc(&arguments))}}),
        json!({"type": "context", "elements": [{"type": "mrkdwn", "text": format!(
            "Rule `{}` · approval `{}` · expires {}", esc(&a.rule), esc(&a.id), crate::audit::format_unix(a.expires_at))}]}),
    ];
    if let Some(link) = link {
        blocks.push(
            json!({"type": "actions", "elements": [{"type": "button", "style": "primary",
            "text": {"type": "plain_text", "text": "Open in the inbox"}, "url": link}]}),
        );
    }
    let text = match link {
        Some(link) => format!(
            "Approval needed from {}: {} by {} — {link}",
            esc(&a.group),
            esc(&a.tool),
            esc(&a.agent)
        ),
        None => format!(
            "Approval needed from {}: {} by {}",
            esc(&a.group),
            esc(&a.tool),
            esc(&a.agent)
        ),
    };
    json!({"text": text, "blocks": blocks})
}
