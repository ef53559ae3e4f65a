//! The data plane's threads: one event loop per core, each a single-threaded tokio runtime
//! accepting from the same listening socket (the model of Envoy's workers and nginx's).
//!
//! A call is read, checked, forwarded and answered on one thread: the upstream connection it
//! borrows was opened by the same loop (the pool keeps idle connections per thread) and is
//! driven by it, so the tool's answer wakes that thread and nothing else; the call's memory is
//! freed where it was allocated. On tokio's work-stealing runtime the same call hopped between
//! cores — the connection task on one, the call on another, a wake-up and a cache miss at each
//! hop — and the load test measured that at about a fifth of toolgate's CPU per call
//! (docs/benchmarks.md). What is shared between threads is what must be: the policy, the
//! agents' budgets and limits, the audit log, the metrics.
//!
//! A connection stays on the thread that accepted it. On Linux each thread has its own
//! listening socket on the same address (`SO_REUSEPORT`, as Envoy and nginx's `reuse_port` do),
//! and the kernel spreads new connections over them by a hash of their addresses. With one
//! socket shared by every thread, whichever thread woke first accepted a whole burst of
//! connections: the load test saw one thread with three times the other's work, so one core
//! saturated while the other idled. A few very busy kept-alive connections can still load one
//! thread more than another, as with any per-core design.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use super::{DataPlane, Timeouts, serve, wait};

/// The data plane's listening sockets for `threads` threads, bound to `addr`: one per thread
/// on Linux (`SO_REUSEPORT`), else one that the threads share.
///
/// `SO_REUSEPORT` would also let a second gateway started on the same port by mistake share it
/// silently instead of failing; a plain socket is bound to the address first, so that mistake
/// still fails with "address in use". (A port of 0 is resolved by the first socket: no other
/// process can be on it.)
pub(super) fn bind(addr: SocketAddr, threads: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Socket, Type};
    let socket = |addr: SocketAddr, reuse_port: bool| -> std::io::Result<std::net::TcpListener> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        // As tokio's `TcpListener::bind` does: a restart need not wait out TIME_WAIT.
        #[cfg(unix)]
        s.set_reuse_address(true)?;
        #[cfg(target_os = "linux")]
        if reuse_port {
            s.set_reuse_port(true)?;
        }
        #[cfg(not(target_os = "linux"))]
        let _ = reuse_port;
        s.bind(&addr.into())?;
        s.listen(1024)?;
        s.set_nonblocking(true)?;
        Ok(s.into())
    };
    if !cfg!(target_os = "linux") || threads <= 1 {
        return Ok(vec![socket(addr, false)?]);
    }
    if addr.port() != 0 {
        drop(socket(addr, false)?);
    }
    let first = socket(addr, true)?;
    let addr = first.local_addr()?;
    let mut all = vec![first];
    for _ in 1..threads {
        all.push(socket(addr, true)?);
    }
    Ok(all)
}

/// Serves `plane` from `listeners` (one per thread, or one they share) on `threads` threads
/// until `stopped` turns true (or its sender is gone), each finishing its calls in flight. The
/// task returned ends when every thread has.
pub(super) fn spawn(
    listeners: Vec<std::net::TcpListener>,
    threads: usize,
    plane: DataPlane,
    timeouts: Timeouts,
    tls: Option<std::sync::Arc<super::tls::Tls>>,
    stopped: watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut done = Vec::with_capacity(threads);
    for i in 0..threads {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let listener = listeners[i % listeners.len()].try_clone()?;
        let (plane, stopped, tls) = (plane.for_thread(), stopped.clone(), tls.clone());
        // Each connection's service knows its peer (IPv4 mapped into IPv6 written as IPv4) and
        // the client certificate it presented.
        let app = move |peer: SocketAddr, client| plane.clone().service(Some(peer.ip().to_canonical()), client);
        let (finished, on_finish) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("toolgate-data-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => serve(listener, app, timeouts, tls, wait(stopped)).await,
                        Err(e) => tracing::error!("data-plane thread {i} cannot listen: {e}"),
                    }
                });
                // Dropping the runtime cancels what calls left running (e.g. idle upstream
                // connections); only then is this thread done.
                drop(runtime);
                let _ = finished.send(());
            })?;
        done.push(on_finish);
    }
    Ok(tokio::spawn(async move {
        for thread in done {
            let _ = thread.await;
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn each_thread_gets_a_socket_on_one_address_and_a_second_gateway_cannot_bind_it() {
        let listeners = bind("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let addr = listeners[0].local_addr().unwrap();
        assert!(listeners.iter().all(|l| l.local_addr().unwrap() == addr));
        let again = bind(addr, 2).expect_err("a second gateway on the same address");
        assert_eq!(again.kind(), std::io::ErrorKind::AddrInUse);
        assert_eq!(bind(addr, 1).unwrap_err().kind(), std::io::ErrorKind::AddrInUse);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn connections_are_spread_over_the_threads_sockets() {
        let listeners = bind("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        assert_eq!(listeners.len(), 2);
        let addr = listeners[0].local_addr().unwrap();
        let clients: Vec<_> = (0..64).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
        let mut accepted = [0; 2];
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while accepted.iter().sum::<usize>() < clients.len() && std::time::Instant::now() < deadline {
            for (i, l) in listeners.iter().enumerate() {
                while l.accept().is_ok() {
                    accepted[i] += 1;
                }
            }
        }
        assert_eq!(accepted.iter().sum::<usize>(), 64, "{accepted:?}");
        // By a hash of each connection's addresses: all 64 on one socket has odds of 2^-63.
        assert!(accepted.iter().all(|&n| n > 0), "{accepted:?}");
    }
}
