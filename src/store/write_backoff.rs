//! What the committer does while the store is full (map at its ceiling, disk full): refuse
//! writes at once, and try a real batch again after a growing delay.
//!
//! A sans-IO state machine: the driver passes a monotonic `now` in and asks whether to
//! attempt a batch or refuse it without touching the store.
//!
//! Invariants:
//! - Never full after a successful commit ([`WriteBackoff::committed`]).
//! - While full, at most one batch is attempted per delay; the delay doubles from
//!   [`FIRST_DELAY`] up to [`MAX_DELAY`], so a full disk costs a few failed transactions a
//!   second, not a spin, and space that returns is noticed within [`MAX_DELAY`] of the
//!   next write.

use std::time::{Duration, Instant};

/// Delay before the first retry after the store reported full.
pub const FIRST_DELAY: Duration = Duration::from_millis(100);
/// The longest delay between two attempts while full.
pub const MAX_DELAY: Duration = Duration::from_secs(2);

/// Whether the store is known full, and until when writes are refused without trying.
#[derive(Debug, Default, Clone)]
pub struct WriteBackoff {
    /// `Some` while full: writes before this instant are refused without an attempt.
    retry_at: Option<Instant>,
    delay: Duration,
}

impl WriteBackoff {
    /// Whether a batch arriving at `now` is refused without trying the store.
    pub fn refuse(&self, now: Instant) -> bool {
        self.retry_at.is_some_and(|at| now < at)
    }

    /// Whether the last attempt found the store full.
    pub fn is_full(&self) -> bool {
        self.retry_at.is_some()
    }

    /// The store refused a batch for lack of space at `now`; returns the delay until the
    /// next attempt.
    pub fn full(&mut self, now: Instant) -> Duration {
        self.delay = if self.retry_at.is_some() {
            (self.delay * 2).min(MAX_DELAY)
        } else {
            FIRST_DELAY
        };
        self.retry_at = Some(now + self.delay);
        self.delay
    }

    /// A batch committed; returns whether the store had been full (it recovered).
    pub fn committed(&mut self) -> bool {
        self.delay = Duration::ZERO;
        self.retry_at.take().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_until_the_delay_passed_and_the_delay_doubles_to_a_cap() {
        let t0 = Instant::now();
        let mut backoff = WriteBackoff::default();
        assert!(!backoff.refuse(t0) && !backoff.is_full());
        assert_eq!(backoff.full(t0), FIRST_DELAY);
        assert!(backoff.refuse(t0) && backoff.is_full());
        assert!(backoff.refuse(t0 + FIRST_DELAY - Duration::from_millis(1)));
        assert!(!backoff.refuse(t0 + FIRST_DELAY));
        let mut now = t0 + FIRST_DELAY;
        let mut delays = Vec::new();
        for _ in 0..8 {
            let delay = backoff.full(now);
            delays.push(delay);
            now += delay;
        }
        assert_eq!(delays[0], FIRST_DELAY * 2);
        assert_eq!(delays[1], FIRST_DELAY * 4);
        assert_eq!(*delays.last().unwrap(), MAX_DELAY);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        assert!(backoff.committed(), "it was full");
        assert!(!backoff.refuse(now) && !backoff.is_full());
        assert!(!backoff.committed(), "already recovered");
        assert_eq!(backoff.full(now), FIRST_DELAY, "a new episode starts short");
    }
}
