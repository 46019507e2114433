//! The supervisor's decisions as pure functions: what to do after an exit, how long to
//! back off. Unit-tested without processes.

use std::time::Duration;

use crate::config::{BackoffConfig, RestartPolicy};
use crate::procs::ExitStatus;

/// What follows a service's exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterExit {
    /// Start again after this delay.
    Restart(Duration),
    /// Done: the policy says not to restart.
    Stop,
    /// Too many failures in the window: give up until started by hand.
    GiveUp,
}

/// Failure bookkeeping of one service (times are seconds since an arbitrary epoch).
#[derive(Debug, Clone, Default)]
pub struct Failures {
    /// When recent failures happened (only those inside the window are kept).
    pub at: Vec<f64>,
    /// Consecutive quick failures: the exponent of the backoff.
    pub streak: u32,
}

/// Decide what follows an exit. `ran_for` is how long the run lasted; `failed` says the
/// run counts as a failure (non-zero exit, killed, never became healthy, unhealthy).
#[allow(clippy::too_many_arguments)]
pub fn after_exit(
    policy: RestartPolicy,
    backoff: &BackoffConfig,
    failures: &mut Failures,
    status: Option<ExitStatus>,
    failed: bool,
    ran_for: Duration,
    now: f64,
    jitter: f64,
) -> AfterExit {
    let clean = !failed && status.is_some_and(|s| s.success());
    let restart = match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => !clean,
        RestartPolicy::Never => false,
    };
    if ran_for >= backoff.reset_after {
        failures.streak = 0;
    }
    if !clean {
        failures.at.push(now);
    }
    let window = backoff.window.as_secs_f64();
    failures.at.retain(|t| now - *t <= window);
    if !restart {
        return AfterExit::Stop;
    }
    if failures.at.len() as u32 >= backoff.max_failures {
        return AfterExit::GiveUp;
    }
    let delay = backoff_delay(backoff, failures.streak, jitter);
    failures.streak = failures.streak.saturating_add(1);
    AfterExit::Restart(delay)
}

/// `initial * 2^attempt`, capped at `max`, scaled by `jitter` in [0.8, 1.2] (still capped):
/// the one policy of [`crate::backoff`].
pub fn backoff_delay(b: &BackoffConfig, attempt: u32, jitter: f64) -> Duration {
    crate::backoff::scaled(b.initial, b.max, attempt, jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b() -> BackoffConfig {
        BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            reset_after: Duration::from_secs(10),
            max_failures: 4,
            window: Duration::from_secs(60),
        }
    }
    const FAIL: Option<ExitStatus> = Some(ExitStatus {
        code: Some(1),
        signal: None,
    });
    const OK: Option<ExitStatus> = Some(ExitStatus {
        code: Some(0),
        signal: None,
    });

    #[test]
    fn delays_grow_exponentially_then_cap_and_give_up_after_max_failures() {
        let mut f = Failures::default();
        let mut delays = vec![];
        for i in 0..3 {
            match after_exit(
                RestartPolicy::Always,
                &b(),
                &mut f,
                FAIL,
                true,
                Duration::ZERO,
                i as f64,
                1.0,
            ) {
                AfterExit::Restart(d) => delays.push(d.as_millis()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(delays, [100, 200, 400]);
        let last = after_exit(
            RestartPolicy::Always,
            &b(),
            &mut f,
            FAIL,
            true,
            Duration::ZERO,
            3.0,
            1.0,
        );
        assert_eq!(last, AfterExit::GiveUp);
    }

    #[test]
    fn failures_outside_the_window_are_forgotten_and_a_long_run_resets_the_delay() {
        let mut f = Failures::default();
        for i in 0..3 {
            after_exit(
                RestartPolicy::Always,
                &b(),
                &mut f,
                FAIL,
                true,
                Duration::ZERO,
                i as f64,
                1.0,
            );
        }
        let r = after_exit(
            RestartPolicy::Always,
            &b(),
            &mut f,
            FAIL,
            true,
            Duration::from_secs(20),
            100.0,
            1.0,
        );
        assert_eq!(r, AfterExit::Restart(Duration::from_millis(100)));
        assert_eq!(f.at.len(), 1);
    }

    #[test]
    fn policies_decide_on_clean_exits() {
        let mut f = Failures::default();
        assert_eq!(
            after_exit(
                RestartPolicy::OnFailure,
                &b(),
                &mut f,
                OK,
                false,
                Duration::ZERO,
                0.0,
                1.0
            ),
            AfterExit::Stop
        );
        assert!(matches!(
            after_exit(
                RestartPolicy::OnFailure,
                &b(),
                &mut f,
                FAIL,
                true,
                Duration::ZERO,
                0.0,
                1.0
            ),
            AfterExit::Restart(_)
        ));
        assert_eq!(
            after_exit(
                RestartPolicy::Never,
                &b(),
                &mut f,
                FAIL,
                true,
                Duration::ZERO,
                0.0,
                1.0
            ),
            AfterExit::Stop
        );
        assert!(matches!(
            after_exit(
                RestartPolicy::Always,
                &b(),
                &mut f,
                OK,
                false,
                Duration::ZERO,
                0.0,
                1.0
            ),
            AfterExit::Restart(_)
        ));
    }

    #[test]
    fn jitter_never_exceeds_the_cap() {
        assert_eq!(backoff_delay(&b(), 20, 1.2), Duration::from_secs(1));
        assert_eq!(backoff_delay(&b(), 0, 0.8), Duration::from_millis(80));
    }
}
