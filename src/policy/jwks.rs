//! An identity provider's signing keys fetched over HTTPS (`auth.jwt.jwks_url`, or the
//! `jwks_uri` of the issuer's OpenID Connect discovery document), cached, and fetched again:
//! every `refresh_seconds` (5 minutes), sooner while none were ever fetched, and when a token
//! names a key id the cache does not hold (the provider rotated its keys) — at most once per
//! `min_refetch_seconds` (10 s), so tokens with made-up key ids cannot turn the gateway into a
//! fetcher.
//!
//! Until keys were fetched once, a JWT is refused with 503 `unavailable`, never let through;
//! keys fetched once are kept while the provider is unreachable (its tokens still verify, as
//! with any cached key set), and a fetch that fails is logged and counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use jsonwebtoken::Algorithm;
use jsonwebtoken::DecodingKey;

/// How often cached keys are fetched again, by default (`auth.jwt.refresh_seconds`).
pub const REFRESH_EVERY: u64 = 300;
/// The least time between two fetches a call or an empty cache asks for, by default
/// (`auth.jwt.min_refetch_seconds`).
pub const MIN_REFETCH: u64 = 10;
/// A fetch (discovery and key set together) that takes longer fails.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest discovery document or key set read.
const MAX_DOCUMENT: usize = 1024 * 1024;

/// One verification key: its id, the algorithm bound to it, the key.
pub type Key = (Option<String>, Algorithm, DecodingKey);

/// Where the keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `auth.jwt.jwks_url`.
    Url(String),
    /// The issuer's `/.well-known/openid-configuration`, then its `jwks_uri`.
    Discovery { issuer: String },
}

/// The cached keys of one provider, shared by the policies that name the same source (a
/// reload keeps the cache).
pub struct RemoteKeys {
    pub source: KeySource,
    /// How often the keys are fetched again.
    pub refresh_every: Duration,
    /// The least time between two fetches that calls, or an empty cache, ask for.
    pub min_refetch: Duration,
    keys: ArcSwapOption<Vec<Key>>,
    /// When the last fetch began, and one fetch at a time.
    last: tokio::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for RemoteKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteKeys")
            .field("source", &self.source)
            .field("keys", &self.keys.load().as_ref().map(|k| k.len()))
            .finish()
    }
}

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

impl RemoteKeys {
    pub fn new(source: KeySource, refresh_every: Duration, min_refetch: Duration) -> Self {
        Self {
            source,
            refresh_every,
            min_refetch,
            keys: ArcSwapOption::empty(),
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// The keys fetched last, or `None` if none ever were.
    pub fn keys(&self) -> Option<Arc<Vec<Key>>> {
        self.keys.load_full()
    }

    /// Whether a token naming `kid` needs a fetch first: no keys yet, or none with that id.
    pub fn lacks(&self, kid: Option<&str>) -> bool {
        match (self.keys.load().as_ref(), kid) {
            (None, _) => true,
            (Some(keys), Some(kid)) => !keys.iter().any(|(id, _, _)| id.as_deref() == Some(kid)),
            (Some(_), None) => false,
        }
    }

    /// Fetches the keys if the last fetch began at least `min_interval` ago (waiting for one
    /// already under way instead of starting another). `Ok(false)` when it was too soon.
    pub async fn refresh(&self, min_interval: Duration) -> Result<bool, FetchError> {
        let mut last = self.last.lock().await;
        if last.is_some_and(|t| t.elapsed() < min_interval) {
            return Ok(false);
        }
        *last = Some(Instant::now());
        let fetched = tokio::time::timeout(FETCH_TIMEOUT, self.fetch())
            .await
            .unwrap_or(Err(FetchError::Timeout));
        match fetched {
            Ok(keys) => {
                self.keys.store(Some(Arc::new(keys)));
                metrics::counter!("toolgate_jwks_fetches_total", "result" => "ok").increment(1);
                Ok(true)
            }
            Err(e) => {
                metrics::counter!("toolgate_jwks_fetches_total", "result" => "error").increment(1);
                Err(e)
            }
        }
    }

    /// Whether `other` fetches the same keys the same way (a reload may keep this cache).
    pub fn same_as(&self, other: &RemoteKeys) -> bool {
        (&self.source, self.refresh_every, self.min_refetch) == (&other.source, other.refresh_every, other.min_refetch)
    }

    /// The periodic refresh: every `refresh_every`, every `min_refetch` while no keys were ever
    /// fetched.
    pub async fn upkeep(&self) {
        let every = if self.keys.load().is_some() {
            self.refresh_every
        } else {
            self.min_refetch
        };
        if let Err(e) = self.refresh(every).await {
            tracing::error!(source = ?self.source, "cannot fetch the identity provider's keys: {e}");
        }
    }

    async fn fetch(&self) -> Result<Vec<Key>, FetchError> {
        let url = match &self.source {
            KeySource::Url(url) => url.clone(),
            KeySource::Discovery { issuer } => {
                let discovery = format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'));
                let doc: serde_json::Value = json(&get(&discovery).await?, &discovery)?;
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
        super::identity::parse_jwks(text).map_err(|why| FetchError::Document { url, why })
    }
}

fn json(body: &[u8], url: &str) -> Result<serde_json::Value, FetchError> {
    serde_json::from_slice(body).map_err(|e| FetchError::Document {
        url: url.to_owned(),
        why: format!("not JSON: {e}"),
    })
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
