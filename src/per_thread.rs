//! State kept once per thread, for what every call touches: the upstream pool's idle
//! connections and the audit log's pending lines.
//!
//! Why: the data plane runs one event loop per core (`server::workers`). A lock or cache line
//! shared by the cores, taken on every call, moves between them on every call; and a waker
//! registered on one core and woken from the other costs a cross-thread wake-up (a syscall to
//! unpark the other loop). A shard per thread keeps each call's state on its own core. Shards
//! are still behind a lock each, so any thread (a work-stealing runtime, a test) is correct,
//! only slower when two share a shard.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Shards per sharded structure: more than the threads that serve calls, so each has its own.
pub const SHARDS: usize = 64;

/// This thread's shard index. Threads take consecutive indices when they first ask, so up to
/// [`SHARDS`] threads each have a shard to themselves.
pub fn index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    INDEX.with(|i| *i)
}

/// One shard, on cache lines of its own (128 bytes: adjacent-line prefetch pairs lines), so
/// two threads writing their own shards never write the same line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Shard<T>(pub T);

/// [`SHARDS`] shards of `T`.
pub fn shards<T: Default>() -> Box<[Shard<T>]> {
    (0..SHARDS).map(|_| Shard::default()).collect()
}
