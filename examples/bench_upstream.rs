//! A minimal tool for load tests: answers every request with a small JSON body. Not a product
//! part; `scripts/loadtest.sh` runs it behind both toolgate and the bare proxy.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

#[tokio::main]
async fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:19100".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    loop {
        let (stream, _) = listener.accept().await.expect("accept");
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let _ = req.into_body().collect().await;
                let res = hyper::Response::builder()
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(
                        br#"{"ok":true,"results":[{"title":"Resetting a password"}]}"#,
                    )))
                    .unwrap();
                Ok::<_, Infallible>(res)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
