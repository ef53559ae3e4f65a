//! The AWS SDK's configuration, over toolgate's own HTTP stack.
//!
//! STS (tool roles), CloudWatch Logs (audit shipping) and Bedrock (guardrails) are reached with
//! the SDK, which would otherwise bring its own HTTP client: a second hyper client with HTTP/2
//! (`h2`) and its own rustls set-up, more than a megabyte of the container image for requests
//! that toolgate's client already makes. This adapter hands the SDK the client toolgate reaches tools
//! with ([`super::connector`]: the same trust store, `SSL_CERT_FILE` included, TLS 1.2/1.3 with
//! aws-lc-rs, HTTP/1.1), and applies the SDK's connect and read timeouts as its own client does.
//! Everything else — the credential chain, endpoints (`AWS_ENDPOINT_URL*`), retries, signing —
//! stays the SDK's.

use std::sync::Mutex;
use std::time::Duration;

use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_runtime_api::http::Response;
use aws_smithy_types::body::SdkBody;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector as TcpConnector;

/// The SDK's shared configuration: the standard credential chain and region, `region` when set,
/// and toolgate's HTTP client.
pub(crate) async fn sdk_config(region: Option<String>) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(SharedHttpClient::new(SdkHttpClient::default()));
    if let Some(r) = region {
        loader = loader.region(aws_config::Region::new(r));
    }
    loader.load().await
}

type Hyper = Client<hyper_rustls::HttpsConnector<TcpConnector>, SdkBody>;

/// Used when the SDK sets no connect timeout (it sets 3.1 s by default).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An idle connection is closed after this long: before AWS endpoints close theirs (about a
/// minute), so a request seldom meets one closed under it (the SDK retries it if it does).
const POOL_IDLE: Duration = Duration::from_secs(30);

/// Hands out a connector per timeout setting; the hyper client (and its connection pool) for a
/// setting is built once. The SDK asks per request, and uses one or two settings in all.
#[derive(Debug, Default)]
struct SdkHttpClient {
    clients: Mutex<Vec<(Option<Duration>, Adapter)>>,
}

impl HttpClient for SdkHttpClient {
    fn http_connector(&self, settings: &HttpConnectorSettings, _: &RuntimeComponents) -> SharedHttpConnector {
        let connect = settings.connect_timeout();
        let mut clients = self.clients.lock().expect("SDK client cache lock");
        let adapter = match clients.iter().find(|(c, _)| *c == connect) {
            Some((_, a)) => a.clone(),
            None => {
                let client = Client::builder(hyper_util::rt::TokioExecutor::new())
                    .pool_idle_timeout(POOL_IDLE)
                    .pool_timer(hyper_util::rt::TokioTimer::new())
                    .build(super::connector_with(connect.unwrap_or(CONNECT_TIMEOUT)));
                let a = Adapter {
                    client,
                    read_timeout: None,
                };
                clients.push((connect, a.clone()));
                a
            }
        };
        SharedHttpConnector::new(Adapter {
            read_timeout: settings.read_timeout(),
            ..adapter
        })
    }
}

/// One SDK request over the hyper client; `read_timeout` bounds the wait for the response's head.
#[derive(Clone)]
struct Adapter {
    client: Hyper,
    read_timeout: Option<Duration>,
}

impl std::fmt::Debug for Adapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adapter")
            .field("read_timeout", &self.read_timeout)
            .finish()
    }
}

impl HttpConnector for Adapter {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let request = match request.try_into_http1x() {
            Ok(r) => r,
            Err(e) => return HttpConnectorFuture::ready(Err(ConnectorError::user(e.into()))),
        };
        let sent = self.client.request(request);
        let read_timeout = self.read_timeout;
        HttpConnectorFuture::new(async move {
            let response = match read_timeout {
                Some(t) => tokio::time::timeout(t, sent)
                    .await
                    .map_err(|_| ConnectorError::timeout(format!("no response within {t:?}").into()))?,
                None => sent.await,
            }
            .map_err(connector_error)?;
            Response::try_from(response.map(SdkBody::from_body_1_x)).map_err(|e| ConnectorError::other(e.into(), None))
        })
    }
}

/// The SDK retries `io` and `timeout` errors (a refused or reset connection, a stale pooled
/// one); anything else is reported as it is.
fn connector_error(e: hyper_util::client::legacy::Error) -> ConnectorError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    let mut io = e.is_connect();
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            io |= h.is_closed() || h.is_canceled() || h.is_incomplete_message();
        }
        io |= s.is::<std::io::Error>();
        source = s.source();
    }
    if io {
        ConnectorError::io(e.into())
    } else {
        ConnectorError::other(e.into(), None)
    }
}
