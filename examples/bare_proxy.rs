//! The baseline for load tests: a bare hyper pass-through proxy with the default pooled client,
//! no checks at all. toolgate's cost is reported as a ratio against this, measured in the same run.
//! It gets the same transport toolgate has — TCP_NODELAY both ways, mimalloc, and one
//! single-threaded runtime per core, each with its own listening socket on the same port
//! (`SO_REUSEPORT`) and its own client pool — so the ratio measures the checks, not the tuning.
//! `BARE_RUNTIME=work-stealing` runs it on tokio's default multi-threaded runtime instead (one
//! runtime, one pool), for comparison.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:19101".to_owned());
    let upstream = args.next().unwrap_or_else(|| "http://127.0.0.1:19100".to_owned());
    let addr: std::net::SocketAddr = listen.parse().expect("listen address");
    if std::env::var("BARE_RUNTIME").as_deref() == Ok("work-stealing") {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        return runtime.block_on(proxy(bind(addr), upstream));
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: Vec<_> = (0..cores)
        .map(|_| {
            let (listener, upstream) = (bind(addr), upstream.clone());
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                runtime.block_on(proxy(listener, upstream));
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

/// A listening socket on `addr` that others on the same port share connections with.
fn bind(addr: std::net::SocketAddr) -> std::net::TcpListener {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None).expect("socket");
    s.set_reuse_address(true).expect("SO_REUSEADDR");
    s.set_reuse_port(true).expect("SO_REUSEPORT");
    s.bind(&addr.into()).expect("bind");
    s.listen(1024).expect("listen");
    s.set_nonblocking(true).expect("non-blocking");
    s.into()
}

async fn proxy(listener: std::net::TcpListener, upstream: String) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let listener = tokio::net::TcpListener::from_std(listener).expect("listen");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (client, upstream) = (client.clone(), upstream.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (client, upstream) = (client.clone(), upstream.clone());
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let uri = format!("{upstream}{}", parts.uri.path_and_query().map_or("/", |p| p.as_str()));
                    let out = hyper::Request::builder()
                        .method(parts.method)
                        .uri(uri)
                        .header("content-type", "application/json")
                        .body(Full::new(body))
                        .unwrap();
                    let res = match client.request(out).await {
                        Ok(res) => {
                            let (p, b) = res.into_parts();
                            let b = b.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            hyper::Response::from_parts(p, Full::new(b))
                        }
                        Err(_) => hyper::Response::builder()
                            .status(502)
                            .body(Full::new(Bytes::new()))
                            .unwrap(),
                    };
                    Ok::<_, Infallible>(res)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
