//! Waiting on a condition with a deadline, so that no test ever sleeps a fixed time.
//!
//! The condition is polled at short, slowly growing intervals (5 ms up to 100 ms); on
//! timeout [`wait_until`] panics with a message naming what was awaited.

use std::time::{Duration, Instant};

/// What a polled condition returns: `bool` (done when `true`) or `Option<T>` (done when
/// `Some`, and the value is handed back).
pub trait Poll {
    type Output;
    fn ready(self) -> Option<Self::Output>;
}

impl Poll for bool {
    type Output = ();
    fn ready(self) -> Option<()> {
        self.then_some(())
    }
}

impl<T> Poll for Option<T> {
    type Output = T;
    fn ready(self) -> Option<T> {
        self
    }
}

const FIRST_INTERVAL: Duration = Duration::from_millis(5);
const MAX_INTERVAL: Duration = Duration::from_millis(100);

/// Poll `cond` until it is ready or `timeout` has passed; `None` on timeout. The condition
/// is always checked at least once, and once more at the deadline.
pub fn try_wait_until<R: Poll>(
    timeout: Duration,
    mut cond: impl FnMut() -> R,
) -> Option<R::Output> {
    let deadline = Instant::now() + timeout;
    let mut interval = FIRST_INTERVAL;
    loop {
        if let Some(v) = cond().ready() {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::sleep(interval.min(deadline - now));
        interval = (interval * 3 / 2).min(MAX_INTERVAL);
    }
}

/// Poll `cond` until it is ready; panic naming `what` when `timeout` passes first.
///
/// ```
/// # use std::time::{Duration, Instant};
/// let start = Instant::now();
/// integration::wait_until(Duration::from_secs(5), "50 ms to pass", || {
///     start.elapsed() >= Duration::from_millis(50)
/// });
/// let n = integration::wait_until(Duration::from_secs(5), "a number", || Some(7));
/// assert_eq!(n, 7);
/// ```
#[track_caller]
pub fn wait_until<R: Poll>(timeout: Duration, what: &str, cond: impl FnMut() -> R) -> R::Output {
    match try_wait_until(timeout, cond) {
        Some(v) => v,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_as_soon_as_the_condition_holds() {
        let mut calls = 0;
        let got = wait_until(Duration::from_secs(5), "the third call", || {
            calls += 1;
            (calls == 3).then_some(calls * 10)
        });
        assert_eq!(got, 30);
        assert_eq!(calls, 3);
    }

    #[test]
    fn times_out_near_the_deadline_after_checking_more_than_once() {
        let start = Instant::now();
        let mut calls = 0;
        let got = try_wait_until(Duration::from_millis(200), || {
            calls += 1;
            false
        });
        let took = start.elapsed();
        assert_eq!(got, None);
        assert!(calls > 2, "polled only {calls} times");
        assert!(took >= Duration::from_millis(200), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn the_timeout_panic_names_what_was_awaited() {
        let err = std::panic::catch_unwind(|| {
            wait_until(Duration::from_millis(20), "the moon to turn blue", || false)
        })
        .unwrap_err();
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            msg.contains("waiting for the moon to turn blue"),
            "panic message: {msg:?}"
        );
    }
}
