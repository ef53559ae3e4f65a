//! Fetching the identity provider's keys into their cache (`policy::jwks`): the key set at
//! `auth.jwt.jwks_url`, or at the `jwks_uri` of the issuer's OpenID Connect discovery document,
//! over HTTPS (the provider verified against the system's trust store or `SSL_CERT_FILE`, as
//! for https tools), within [`FETCH_TIMEOUT`] and [`MAX_DOCUMENT`]. One fetch at a time: a call
//! that needs keys while another fetch is under way waits for it instead of starting its own.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};

use crate::policy::identity::parse_jwks;
use crate::policy::jwks::{Key, KeySource, RemoteKeys};

/// A fetch (discovery and key set together) that takes longer fails.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest discovery document or key set read.
const MAX_DOCUMENT: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: {why}")]
    Http { url: String, why: String },
    #[error("{url}: answered {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: {why}")]
    Document { url: String, why: String },
    #[error("no answer within {FETCH_TIMEOUT:?}")]
    Timeout,
}

/// Fetches `remote`'s keys if the last fetch began at least `min_interval` ago, one fetch at a
/// time (`lock`). `Ok(false)` when it was too soon.
pub async fn refresh(
    remote: &RemoteKeys,
    lock: &tokio::sync::Mutex<()>,
    min_interval: Duration,
) -> Result<bool, FetchError> {
    let _one_at_a_time = lock.lock().await;
    if !remote.claim_fetch(min_interval) {
        return Ok(false);
    }
    let fetched = tokio::time::timeout(FETCH_TIMEOUT, fetch(&remote.source))
        .await
        .unwrap_or(Err(FetchError::Timeout));
    match fetched {
        Ok(keys) => {
            remote.store(keys);
            metrics::counter!("toolgate_jwks_fetches_total", "result" => "ok").increment(1);
            Ok(true)
        }
        Err(e) => {
            metrics::counter!("toolgate_jwks_fetches_total", "result" => "error").increment(1);
            Err(e)
        }
    }
}

async fn fetch(source: &KeySource) -> Result<Vec<Key>, FetchError> {
    let url = match source {
        KeySource::Url(url) => url.clone(),
        KeySource::Discovery { issuer } => {
            let discovery = format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'));
            let body = get(&discovery).await?;
            let doc: serde_json::Value = serde_json::from_slice(&body).map_err(|e| FetchError::Document {
                url: discovery.clone(),
                why: format!("not JSON: {e}"),
            })?;
            let Some(uri) = doc.get("jwks_uri").and_then(|u| u.as_str()) else {
                return Err(FetchError::Document {
                    url: discovery,
                    why: "the discovery document has no `jwks_uri`".to_owned(),
                });
            };
            if !uri.starts_with("https://") {
                return Err(FetchError::Document {
                    url: discovery,
                    why: format!("`jwks_uri` {uri} is not https"),
                });
            }
            uri.to_owned()
        }
    };
    let text = get(&url).await?;
    let text = std::str::from_utf8(&text).map_err(|e| FetchError::Document {
        url: url.clone(),
        why: e.to_string(),
    })?;
    parse_jwks(text).map_err(|why| FetchError::Document { url, why })
}

/// `GET url` over HTTPS (the server verified against the system's trust store or
/// `SSL_CERT_FILE`, as for https tools), its body within [`MAX_DOCUMENT`].
async fn get(url: &str) -> Result<Bytes, FetchError> {
    let http = |why: String| FetchError::Http {
        url: url.to_owned(),
        why,
    };
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(crate::upstream::tls_config())
        .https_only()
        .enable_http1()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, Empty<Bytes>>(connector);
    let req = http::Request::get(url)
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::new())
        .map_err(|e| http(e.to_string()))?;
    let res = client.request(req).await.map_err(|e| http(e.to_string()))?;
    if !res.status().is_success() {
        return Err(FetchError::Status {
            url: url.to_owned(),
            status: res.status().as_u16(),
        });
    }
    Limited::new(res.into_body(), MAX_DOCUMENT)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| http(format!("reading the answer: {e}")))
}
