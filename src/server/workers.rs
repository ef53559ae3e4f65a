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
//! A connection stays on the thread that accepted it. Each accept goes to whichever thread the
//! kernel wakes first (usually an idle one), so many connections spread evenly; a few very busy
//! kept-alive connections can load one thread more than another, as with any per-core design.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use super::{DataPlane, serve, wait};

/// Serves `plane` from `listener` on `threads` threads until `stopped` turns true (or its
/// sender is gone), each finishing its calls in flight. The task returned ends when every
/// thread has.
pub(super) fn spawn(
    listener: std::net::TcpListener,
    threads: usize,
    plane: DataPlane,
    read_timeout: Duration,
    stopped: watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let mut done = Vec::with_capacity(threads);
    for i in 0..threads {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (listener, app, stopped) = (listener.try_clone()?, plane.for_thread().service(), stopped.clone());
        let (finished, on_finish) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("toolgate-data-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => serve(listener, app, read_timeout, wait(stopped)).await,
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
