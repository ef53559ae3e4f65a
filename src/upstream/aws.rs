//! Every tool under its own AWS role: credentials from STS `AssumeRole` (per role and agent,
//! cached, refreshed before they expire, one `AssumeRole` however many calls wait for it) and
//! the upstream request signed with SigV4 for the tool's service, session token included.
//!
//! The STS client uses the standard AWS chain (environment, profile, instance or task role) and
//! the standard endpoint overrides (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_STS`), so a local
//! emulator is one environment variable away. The caller's own credentials never reach AWS or
//! the tool: toolgate signs with the role's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use tokio::sync::OnceCell;

pub use crate::policy::tool::AwsRoleConfig;

/// Why role credentials could not be had. Both block the call; neither forwards it unsigned.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    /// STS refused (access denied, malformed, expired token): a configuration problem.
    #[error("STS refused AssumeRole for {arn}: {detail}")]
    Refused { arn: String, detail: String },
    /// STS was unreachable, throttled or failed: try again later.
    #[error("STS is unavailable for {arn}: {detail}")]
    Unavailable { arn: String, detail: String },
}

/// Credentials are refreshed this long before they expire.
const REFRESH_BEFORE: Duration = Duration::from_secs(300);

struct Cached {
    credentials: Credentials,
    expires: SystemTime,
}

/// One (role, agent)'s credentials; its lock is held while they are fetched, so callers queue
/// behind one `AssumeRole`.
type Slot = Arc<tokio::sync::Mutex<Option<Cached>>>;

/// Role credentials per (role, agent), and the STS client (built on first use).
#[derive(Default)]
pub struct Roles {
    region: Option<String>,
    sts: OnceCell<(aws_sdk_sts::Client, Option<String>)>,
    cache: Mutex<HashMap<(String, String), Slot>>,
}

impl Roles {
    pub fn new(region: Option<String>) -> Self {
        Self {
            region,
            ..Self::default()
        }
    }

    async fn sts(&self) -> &(aws_sdk_sts::Client, Option<String>) {
        self.sts
            .get_or_init(|| async {
                let config = super::aws_sdk::sdk_config(self.region.clone()).await;
                let region = config.region().map(|r| r.to_string());
                (aws_sdk_sts::Client::new(&config), region)
            })
            .await
    }

    /// The signing region for a role: its own, else the configured or SDK region.
    pub async fn region_for(&self, role: &AwsRoleConfig) -> Option<String> {
        match &role.region {
            Some(r) => Some(r.clone()),
            None => self.sts().await.1.clone(),
        }
    }

    /// Credentials for `role` as `agent`: cached, refreshed ahead of expiry; concurrent callers
    /// share one `AssumeRole`.
    pub async fn credentials(
        &self,
        role: &AwsRoleConfig,
        agent: &str,
        tool: &str,
        request_id: &str,
    ) -> Result<Credentials, RoleError> {
        let slot = self
            .cache
            .lock()
            .expect("role cache lock")
            .entry((role.arn.clone(), agent.to_owned()))
            .or_default()
            .clone();
        let mut slot = slot.lock().await;
        if let Some(c) = slot.as_ref()
            && c.expires > SystemTime::now() + REFRESH_BEFORE
        {
            return Ok(c.credentials.clone());
        }
        let fresh = self.assume(role, agent, tool, request_id).await?;
        let credentials = fresh.credentials.clone();
        *slot = Some(fresh);
        metrics::counter!("toolgate_sts_assume_role_total", "result" => "ok").increment(1);
        Ok(credentials)
    }

    async fn assume(
        &self,
        role: &AwsRoleConfig,
        agent: &str,
        tool: &str,
        request_id: &str,
    ) -> Result<Cached, RoleError> {
        let (sts, _) = self.sts().await;
        let tag = |k: &str, v: &str| {
            aws_sdk_sts::types::Tag::builder()
                .key(k)
                .value(sts_text(v, 256))
                .build()
                .expect("key and value are set")
        };
        let mut req = sts
            .assume_role()
            .role_arn(&role.arn)
            .role_session_name(sts_text(&format!("toolgate-{agent}"), 64))
            .source_identity(sts_text(agent, 64))
            .duration_seconds(role.session_seconds as i32)
            .tags(tag("toolgate:agent", agent))
            .tags(tag("toolgate:tool", tool))
            .tags(tag("toolgate:request-id", request_id));
        if let Some(id) = &role.external_id {
            req = req.external_id(id);
        }
        let out = req.send().await.map_err(|e| {
            metrics::counter!("toolgate_sts_assume_role_total", "result" => "error").increment(1);
            let detail = aws_sdk_sts::error::DisplayErrorContext(&e).to_string();
            let service = e.as_service_error().is_some() && !detail.contains("Throttl");
            let arn = role.arn.clone();
            if service {
                RoleError::Refused { arn, detail }
            } else {
                RoleError::Unavailable { arn, detail }
            }
        })?;
        let c = out.credentials().ok_or_else(|| RoleError::Unavailable {
            arn: role.arn.clone(),
            detail: "AssumeRole returned no credentials".to_owned(),
        })?;
        let expires =
            SystemTime::try_from(*c.expiration()).unwrap_or_else(|_| SystemTime::now() + Duration::from_secs(900));
        Ok(Cached {
            credentials: Credentials::new(
                c.access_key_id(),
                c.secret_access_key(),
                Some(c.session_token().to_owned()),
                Some(expires),
                "toolgate-assume-role",
            ),
            expires,
        })
    }
}

/// STS text fields allow `[\w+=,.@-]`; anything else becomes `-`, and the length is capped.
fn sts_text(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(max)
        .collect();
    while out.len() < 2 {
        out.push('-');
    }
    out
}

/// Signs `request` in place with SigV4 (the body hashed, the session token added).
pub fn sign_request(
    request: &mut http::Request<http_body_util::Full<bytes::Bytes>>,
    body: &[u8],
    credentials: &Credentials,
    region: &str,
    service: &str,
) -> Result<(), String> {
    let identity = credentials.clone().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let headers: Vec<(&str, &str)> = request
        .headers()
        .iter()
        .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str(), v)))
        .collect();
    let uri = request.uri().to_string();
    let signable = SignableRequest::new(
        request.method().as_str(),
        &uri,
        headers.into_iter(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| e.to_string())?;
    let (instructions, _signature) = sign(signable, &params).map_err(|e| e.to_string())?.into_parts();
    instructions.apply_to_request_http1x(request);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sts_text_is_sanitised_and_bounded() {
        assert_eq!(sts_text("support bot/1", 64), "support-bot-1");
        assert_eq!(sts_text("x", 64), "x-");
        assert_eq!(sts_text(&"a".repeat(100), 64).len(), 64);
    }
}
