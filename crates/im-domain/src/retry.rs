//! Retries with a growing, bounded wait between attempts. Runtime-free: the caller passes the
//! sleep function of its runtime. [`on_conflict`] is the wait-free case: an operation that lost
//! a race for a conditional write reads again and tries again at once.

use std::future::Future;
use std::time::Duration;

use crate::error::DomainError;

/// How many attempts, and how long to wait between them: `first`, doubled after each attempt,
/// never more than `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub attempts: u32,
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    /// `attempts` attempts, one right after the other.
    #[must_use]
    pub const fn immediate(attempts: u32) -> Self {
        Self { attempts, first: Duration::ZERO, max: Duration::ZERO }
    }

    /// The wait after the `failed`-th failed attempt (1-based).
    #[must_use]
    pub fn delay(&self, failed: u32) -> Duration {
        let factor = 2u32.saturating_pow(failed.saturating_sub(1));
        self.first.saturating_mul(factor).min(self.max)
    }
}

/// Why an attempt failed: worth another attempt, or not.
#[derive(Debug)]
pub enum Failure<E> {
    Transient(E),
    Permanent(E),
}

/// Runs `attempt` (given the 1-based attempt number) until it succeeds, fails permanently, or
/// `backoff.attempts` attempts (at least one) failed; then the last error is returned. Between
/// attempts it awaits `sleep` with the [`Backoff::delay`] of the attempts so far.
///
/// # Errors
/// The error of the permanent failure, or of the last transient one.
pub async fn retry<T, E, A, AF, S, SF>(backoff: Backoff, mut attempt: A, mut sleep: S) -> Result<T, E>
where
    A: FnMut(u32) -> AF,
    AF: Future<Output = Result<T, Failure<E>>>,
    S: FnMut(Duration) -> SF,
    SF: Future<Output = ()>,
{
    let attempts = backoff.attempts.max(1);
    let mut number = 1;
    loop {
        match attempt(number).await {
            Ok(value) => return Ok(value),
            Err(Failure::Permanent(e)) => return Err(e),
            Err(Failure::Transient(e)) if number >= attempts => return Err(e),
            Err(Failure::Transient(_)) => {
                sleep(backoff.delay(number)).await;
                number += 1;
            }
        }
    }
}

/// Runs `attempt` up to `attempts` times (at least once) while it fails with
/// `PreconditionFailed` (another writer changed what it read), with no wait in between: each
/// attempt reads the current version again. Success and every other error end it at once.
///
/// # Errors
/// The first error other than `PreconditionFailed`, or `PreconditionFailed` when every attempt
/// lost the race.
pub async fn on_conflict<T>(attempts: u32, mut attempt: impl AsyncFnMut() -> Result<T, DomainError>) -> Result<T, DomainError> {
    // `retry` with `Backoff::immediate`, written out: `attempt` may lend its state to the future
    // it returns, which an `FnMut` returning a future cannot.
    let attempts = attempts.max(1);
    let mut made = 1;
    loop {
        match attempt().await {
            Err(DomainError::PreconditionFailed) if made < attempts => made += 1,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::services::block_on;

    const BACKOFF: Backoff = Backoff { attempts: 5, first: Duration::from_millis(100), max: Duration::from_millis(500) };

    /// Runs `retry` with attempts answered from `outcomes` in order; returns the result, the
    /// attempt numbers seen and the waits asked for.
    fn run(outcomes: Vec<Result<u32, Failure<&'static str>>>) -> (Result<u32, &'static str>, Vec<u32>, Vec<Duration>) {
        let outcomes = RefCell::new(outcomes.into_iter());
        let (seen, waits) = (RefCell::new(Vec::new()), RefCell::new(Vec::new()));
        let result = block_on(retry(
            BACKOFF,
            |n| {
                seen.borrow_mut().push(n);
                let next = outcomes.borrow_mut().next().expect("more attempts than expected");
                async move { next }
            },
            |d| {
                waits.borrow_mut().push(d);
                async {}
            },
        ));
        (result, seen.into_inner(), waits.into_inner())
    }

    #[test]
    fn retries_transient_failures_until_success() {
        let (result, seen, waits) = run(vec![Err(Failure::Transient("a")), Err(Failure::Transient("b")), Ok(7)]);
        assert_eq!(result, Ok(7));
        assert_eq!(seen, [1, 2, 3]);
        assert_eq!(waits, [Duration::from_millis(100), Duration::from_millis(200)]);
    }

    #[test]
    fn gives_up_after_the_attempts_with_the_last_error_and_bounded_waits() {
        let (result, seen, waits) = run(vec![
            Err(Failure::Transient("1")),
            Err(Failure::Transient("2")),
            Err(Failure::Transient("3")),
            Err(Failure::Transient("4")),
            Err(Failure::Transient("5")),
        ]);
        assert_eq!(result, Err("5"));
        assert_eq!(seen, [1, 2, 3, 4, 5]);
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [100, 200, 400, 500], "no wait after the last attempt; waits double up to the maximum");
    }

    #[test]
    fn stops_at_a_permanent_failure() {
        let (result, seen, waits) = run(vec![Err(Failure::Transient("busy")), Err(Failure::Permanent("refused"))]);
        assert_eq!(result, Err("refused"));
        assert_eq!(seen, [1, 2]);
        assert_eq!(waits.len(), 1);
    }

    #[test]
    fn a_single_attempt_never_waits() {
        let backoff = Backoff { attempts: 0, ..BACKOFF };
        let result: Result<(), &str> =
            block_on(retry(backoff, |_| async { Err(Failure::Transient("down")) }, |_| async { panic!("waited") }));
        assert_eq!(result, Err("down"));
        assert_eq!(BACKOFF.delay(40), Duration::from_millis(500), "huge attempt numbers stay bounded");
    }

    #[test]
    fn conflicts_are_retried_at_once_and_other_errors_end_it() {
        let tries = RefCell::new(0);
        let result = block_on(on_conflict(3, async || {
            *tries.borrow_mut() += 1;
            if *tries.borrow() < 3 { Err(DomainError::PreconditionFailed) } else { Ok(*tries.borrow()) }
        }));
        assert_eq!(result.ok(), Some(3));

        *tries.borrow_mut() = 0;
        let result: Result<(), _> = block_on(on_conflict(4, async || {
            *tries.borrow_mut() += 1;
            Err(DomainError::PreconditionFailed)
        }));
        assert!(matches!(result, Err(DomainError::PreconditionFailed)));
        assert_eq!(*tries.borrow(), 4, "every attempt was made");

        *tries.borrow_mut() = 0;
        let result: Result<(), _> = block_on(on_conflict(4, async || {
            *tries.borrow_mut() += 1;
            Err(DomainError::not_found("webhook", 1))
        }));
        assert!(matches!(result, Err(DomainError::NotFound { .. })));
        assert_eq!(*tries.borrow(), 1, "not a conflict: no second attempt");
    }
}
