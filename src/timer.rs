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
//! most [`SPARES_PER_THREAD`] spare timers; past that they are dropped (cancelled) as usual.
//!
//! Deadlines only ever move later in the common case (same timeout, later start); a shorter
//! timeout than the spare's current deadline falls back to tokio's re-registration: correct,
//! only slower.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Spare timers a thread keeps: about the number of calls in flight on one worker.
const SPARES_PER_THREAD: usize = 256;

thread_local! {
    static SPARES: RefCell<Vec<Pin<Box<Sleep>>>> = const { RefCell::new(Vec::new()) };
}

/// A sleep until a deadline; completes (with `()`) once the deadline has passed.
pub struct Deadline {
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Deadline {
    pub fn at(deadline: Instant) -> Self {
        let spare = SPARES.try_with(|s| s.borrow_mut().pop()).ok().flatten();
        let sleep = match spare {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        Deadline { sleep: Some(sleep) }
    }

    pub fn after(limit: Duration) -> Self {
        Self::at(Instant::now() + limit)
    }

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
            if spares.len() < SPARES_PER_THREAD {
                spares.push(sleep);
            }
        });
    }
}

/// The deadline ran out before the work finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// Runs `work` for at most `limit`, like `tokio::time::timeout`, with a recycled timer that is
/// only taken if `work` does not finish on its first poll.
pub async fn within<F: Future>(limit: Duration, work: F) -> Result<F::Output, Elapsed> {
    let deadline = Instant::now() + limit;
    let mut work = std::pin::pin!(work);
    let mut timer: Option<Deadline> = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = work.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        let timer = timer.get_or_insert_with(|| Deadline::at(deadline));
        Pin::new(timer).poll(cx).map(|()| Err(Elapsed))
    })
    .await
}

/// hyper's timer (the header-read timeout of each request on a connection), on recycled timers.
#[derive(Debug, Clone, Copy, Default)]
pub struct HyperTimer;

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
        Box::pin(HyperSleep(Deadline::after(duration)))
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HyperSleep(Deadline::at(deadline.into())))
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

    #[tokio::test]
    async fn a_deadline_fires_after_its_limit_and_not_before() {
        fires_after(Deadline::after(30 * MS), 30 * MS).await;
    }

    #[tokio::test]
    async fn a_recycled_timer_takes_its_new_deadline_later_or_earlier() {
        // Leave a registered spare behind with a deadline far away: a shorter deadline taken on
        // the same thread must still fire on time (re-registered)...
        drop(Deadline::after(Duration::from_secs(60)));
        fires_after(Deadline::after(20 * MS), 20 * MS).await;
        // ...and a longer one must not fire at the spare's earlier deadline (extended in place).
        drop(Deadline::after(10 * MS));
        fires_after(Deadline::after(80 * MS), 80 * MS).await;
    }

    #[tokio::test]
    async fn a_spare_that_fired_while_unused_is_rearmed() {
        drop(Deadline::after(10 * MS));
        tokio::time::sleep(40 * MS).await; // the spare fires with nobody waiting
        fires_after(Deadline::after(50 * MS), 50 * MS).await;
    }

    #[tokio::test]
    async fn within_answers_the_work_or_elapsed() {
        assert_eq!(within(Duration::from_secs(1), async { 7 }).await, Ok(7));
        let started = Instant::now();
        let slow = tokio::time::sleep(Duration::from_secs(30));
        assert_eq!(within(40 * MS, slow).await, Err(Elapsed));
        assert!(started.elapsed() >= 40 * MS);
        let quick = async {
            tokio::time::sleep(10 * MS).await;
            "done"
        };
        assert_eq!(within(Duration::from_secs(30), quick).await, Ok("done"));
    }
}
