//! The one backoff policy: delays that double from `base` up to `cap`, with jitter.
//!
//! Two jitters, for two jobs: a network retry (the control plane, log shipping) waits a
//! uniform time in `[0, ceiling]` ("full jitter": many workspaces retrying one coderd
//! spread out); a service restart waits the ceiling scaled by a factor in `[0.8, 1.2]`
//! (a crash loop's rhythm stays readable in the logs). Hand-written rather than `backon`:
//! backon's jitter adds up to one more delay on top (`[d, 2d)`), not full jitter, and its
//! policies are iterators, where the supervisor needs a pure function of the attempt
//! number it can unit-test and carry across restarts.

use std::time::Duration;

/// `base * 2^attempt`, at most `cap`.
pub fn ceiling(base: Duration, cap: Duration, attempt: u32) -> Duration {
    let factor = 1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(cap)
}

/// [`ceiling`] scaled by `jitter` (clamped to `[0.8, 1.2]`), still at most `cap`.
pub fn scaled(base: Duration, cap: Duration, attempt: u32, jitter: f64) -> Duration {
    let j = jitter.clamp(0.8, 1.2);
    ceiling(base, cap, attempt).mul_f64(j).min(cap)
}

/// A retry loop's state: full jitter under [`ceiling`].
#[derive(Debug, Clone)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The upper bound of the next delay (before jitter).
    pub fn ceiling(&self) -> Duration {
        ceiling(self.base, self.cap, self.attempt)
    }

    pub fn next_delay(&mut self) -> Duration {
        use rand::Rng;
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ms = ceiling.as_millis().min(u64::MAX as u128) as u64;
        Duration::from_millis(rand::rng().random_range(0..=ms))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_by_an_exponential_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut ceilings = Vec::new();
        for _ in 0..6 {
            ceilings.push(b.ceiling().as_millis());
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(1));
        }
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn scaled_delays_double_then_cap_and_jitter_stays_under_the_cap() {
        let (b, c) = (Duration::from_secs(1), Duration::from_secs(10));
        let d: Vec<u64> = (0..6)
            .map(|n| scaled(b, c, n, 1.0).as_millis() as u64)
            .collect();
        assert_eq!(d, [1000, 2000, 4000, 8000, 10000, 10000]);
        assert_eq!(scaled(b, c, 1, 0.1), Duration::from_millis(1600));
        assert_eq!(
            scaled(b, c, 3, 1.2),
            Duration::from_secs(9) + Duration::from_millis(600)
        );
        assert_eq!(scaled(b, c, 9, 1.2), c);
    }
}
