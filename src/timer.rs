//! Deadlines for every call — the header-read timeout hyper keeps per connection and the
//! upstream exchange's timeout — from timers that stay registered with tokio between calls.
//!
//! Why: every call used to arm two fresh tokio timers and cancel both a moment later. Arming and
//! cancelling each take the runtime's one timer-wheel lock (shared by every worker), and arming one
//! when the wheel is empty wakes the timer driver with a syscall. A deadline here takes a spare
//! `Sleep` from its thread's list and moves it *later*, which tokio does with a single atomic
//! compare-and-swap while the timer is still registered (`Sleep::reset` extends in place); a
//! finished deadline puts its `Sleep` back, still registered. A spare timer that fires while
//! unused is harmless (whoever polled it last gets a spurious wake-up, which futures allow); the
//! next deadline that takes it re-registers it under the lock, as before. Each thread keeps at
//! most [`SPARES_PER_THREAD`] spare timers, the oldest dropped (cancelled) first.
//!
//! A `Sleep` belongs to the runtime it was made in, so spares are kept per owner ([`Timers`]: one
//! per server and one per upstream client, each living in one runtime), never handed from one
//! owner to another: a thread that runs two runtimes in turn never gets a timer of the other.
//!
//! Deadlines only ever move later in the common case (same timeout, later start); a shorter
//! timeout than the spare's current deadline falls back to tokio's re-registration: correct,
//! only slower.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Spare timers a thread keeps, for all owners: about the number of calls in flight on one worker.
const SPARES_PER_THREAD: usize = 256;

thread_local! {
    static SPARES: RefCell<VecDeque<(u64, Pin<Box<Sleep>>)>> = const { RefCell::new(VecDeque::new()) };
}

/// Whose spare timers these are: made once per server or upstream client, used in one runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    owner: u64,
}

impl Timers {
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Self {
            owner: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// A deadline at `deadline`, on one of this owner's spare timers if the thread has one.
    pub fn at(self, deadline: Instant) -> Deadline {
        let owner = self.owner;
        let spare = SPARES
            .try_with(|s| {
                let mut spares = s.borrow_mut();
                let i = spares.iter().rposition(|(o, _)| *o == owner)?;
                spares.remove(i).map(|(_, sleep)| sleep)
            })
            .ok()
            .flatten();
        let sleep = match spare {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        Deadline {
            owner,
            sleep: Some(sleep),
        }
    }

    pub fn after(self, limit: Duration) -> Deadline {
        self.at(Instant::now() + limit)
    }

    /// Runs `work` until `deadline` at most, like `tokio::time::timeout_at`, with a recycled
    /// timer that is only taken if `work` does not finish on its first poll. A deadline, not a
    /// duration: the caller has usually read the clock already.
    pub async fn until<F: Future>(self, deadline: Instant, work: F) -> Result<F::Output, Elapsed> {
        let mut work = std::pin::pin!(work);
        let mut timer: Option<Deadline> = None;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = work.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            let timer = timer.get_or_insert_with(|| self.at(deadline));
            Pin::new(timer).poll(cx).map(|()| Err(Elapsed))
        })
        .await
    }
}

impl Default for Timers {
    fn default() -> Self {
        Self::new()
    }
}

/// A sleep until a deadline; completes (with `()`) once the deadline has passed.
pub struct Deadline {
    owner: u64,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Deadline {
    fn reset(&mut self, deadline: Instant) {
        if let Some(sleep) = &mut self.sleep {
            sleep.as_mut().reset(deadline);
        }
    }
}

impl Future for Deadline {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.sleep {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        let Some(sleep) = self.sleep.take() else { return };
        // A thread being torn down has no list left: then the timer is cancelled as usual.
        let _ = SPARES.try_with(|s| {
            let mut spares = s.borrow_mut();
            if spares.len() >= SPARES_PER_THREAD {
                spares.pop_front();
            }
            spares.push_back((self.owner, sleep));
        });
    }
}

/// The deadline ran out before the work finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// hyper's timer (the header-read timeout of each request on a connection), on recycled timers.
#[derive(Debug, Clone, Copy, Default)]
pub struct HyperTimer(pub Timers);

struct HyperSleep(Deadline);

impl Future for HyperSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl hyper::rt::Sleep for HyperSleep {}

impl hyper::rt::Timer for HyperTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HyperSleep(self.0.after(duration)))
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HyperSleep(self.0.at(deadline.into())))
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: std::time::Instant) {
        match sleep.as_mut().downcast_mut_pin::<HyperSleep>() {
            Some(mut ours) => ours.0.reset(new_deadline.into()),
            None => *sleep = self.sleep_until(new_deadline),
        }
    }

    fn now(&self) -> std::time::Instant {
        Instant::now().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Real time: a deadline must not fire before its instant, and must fire (the bound above
    /// is only there so a broken timer fails instead of hanging).
    async fn fires_after(deadline: Deadline, limit: Duration) {
        let started = Instant::now();
        tokio::time::timeout(limit + Duration::from_secs(5), deadline)
            .await
            .expect("the deadline fired");
        assert!(
            started.elapsed() >= limit,
            "fired after {:?}, before {limit:?}",
            started.elapsed()
        );
    }

    fn spares_of(t: Timers) -> usize {
        SPARES.with(|s| s.borrow().iter().filter(|(o, _)| *o == t.owner).count())
    }

    #[tokio::test]
    async fn a_deadline_fires_after_its_limit_and_not_before() {
        let t = Timers::new();
        fires_after(t.after(30 * MS), 30 * MS).await;
        assert_eq!(spares_of(t), 1, "a finished deadline leaves its timer for the next");
    }

    #[tokio::test]
    async fn a_recycled_timer_takes_its_new_deadline_later_or_earlier() {
        let t = Timers::new();
        // Leave a registered spare behind with a deadline far away: a shorter deadline taken on
        // the same thread must still fire on time (re-registered)...
        drop(t.after(Duration::from_secs(60)));
        assert_eq!(spares_of(t), 1);
        let shorter = t.after(20 * MS);
        assert_eq!(spares_of(t), 0, "the spare was taken");
        fires_after(shorter, 20 * MS).await;
        // ...and a longer one must not fire at the spare's earlier deadline (extended in place).
        drop(t.after(10 * MS));
        fires_after(t.after(80 * MS), 80 * MS).await;
    }

    #[tokio::test]
    async fn a_spare_that_fired_while_unused_is_rearmed() {
        let t = Timers::new();
        drop(t.after(10 * MS));
        tokio::time::sleep(40 * MS).await; // the spare fires with nobody waiting
        fires_after(t.after(50 * MS), 50 * MS).await;
    }

    #[tokio::test]
    async fn until_answers_the_work_or_elapsed() {
        let t = Timers::new();
        let within = |limit: Duration| Instant::now() + limit;
        assert_eq!(t.until(within(Duration::from_secs(1)), async { 7 }).await, Ok(7));
        let started = Instant::now();
        let slow = tokio::time::sleep(Duration::from_secs(30));
        assert_eq!(t.until(within(40 * MS), slow).await, Err(Elapsed));
        assert!(started.elapsed() >= 40 * MS);
        let quick = async {
            tokio::time::sleep(10 * MS).await;
            "done"
        };
        assert_eq!(t.until(within(Duration::from_secs(30)), quick).await, Ok("done"));
    }

    #[test]
    fn a_thread_running_two_runtimes_never_reuses_the_first_ones_timers() {
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap()
        };
        let (first, second) = (Timers::new(), Timers::new());
        let old = runtime();
        old.block_on(async { drop(first.after(Duration::from_secs(60))) });
        drop(old); // its spare timer, still on this thread, belongs to a runtime that is gone
        runtime().block_on(async {
            // Another owner on the same thread makes its own timer (polling one from the dead
            // runtime would panic, and one from an idle runtime would never fire).
            fires_after(second.after(20 * MS), 20 * MS).await;
        });
        assert_eq!(spares_of(first), 1, "the first owner's spare was left alone");
    }
}
