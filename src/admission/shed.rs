//! Message-level load shedding: whether a visitor's chat message is admitted now or refused at
//! once with `overloaded` because it would wait longer than the latency budget.
//!
//! Back-pressure alone (stop reading a socket while the queues toward its owner are full) keeps
//! memory bounded but turns overload into latency: messages wait in socket buffers and queues,
//! and every admitted message ends up late. Shedding refuses the excess instead, so what is
//! admitted stays fast and what is refused is told so (`{"type":"error","code":"overloaded",
//! "retry_after":MS,"id":CLIENT_ID}`; the message was not stored and is re-sent with the same id).
//!
//! The prediction, from what the conversation's owner shard publishes about itself:
//!
//! ```text
//! wait = owner's event-loop lag + commits ahead × mean commit time
//! commits ahead = pending / max_batch + 1  (the batch being written, then the queued ones),
//!                 0 when nothing is pending
//! ```
//!
//! A message is refused when `wait` exceeds the budget; `retry_after` is the predicted wait
//! (the time for the backlog to drain), at least [`MIN_RETRY_MS`].
//!
//! The owner's lag ([`LagSamples::predicted_micros`]) comes from its sampler, which measures
//! how late a 100 ms timer fires. One late timer says the loop *was* stuck; after a single
//! stall (a slow disk, a page fault storm) the loop runs again at once, and refusing every
//! message for the next sample interval with a `retry_after` as long as the stall that already
//! ended would be wrong. So the lag that counts is:
//! - **sustained lag**: the lesser of the last two samples (a loop that is slow now was slow
//!   twice in a row), and
//! - **an ongoing stall**: how far the owner's next sample is overdue (its loop is stuck right
//!   now, for at least that long), which the samples alone would only show after it ended;
//!
//! whichever is larger. The lesser of two samples sheds less than the last one did for a lag
//! that jitters around the budget (40/80 ms samples against 50 ms never shed); the degradation
//! controller, which reads the last sample, still reacts to it.
//!
//! Invariants: pure (no clock, no I/O); a budget of 0 admits everything; with nothing pending
//! and no lag every message is admitted, whatever the last commit cost; a single late sample
//! followed by an on-time loop sheds nothing.

use crate::ratelimit::RetryAfter;

/// The least `retry_after` an `overloaded` refusal carries.
pub const MIN_RETRY_MS: u64 = 50;

/// The most `retry_after` an `overloaded` refusal carries.
pub const MAX_RETRY_MS: u64 = 10_000;

/// What the owner shard of a conversation reports about its load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OwnerLoad {
    /// Storage operations waiting for a group commit.
    pub pending_commits: usize,
    /// Recent mean duration of one group commit, in microseconds (0 = none measured yet).
    pub commit_micros: u64,
    /// The owner's largest batch (`[storage] max_batch`).
    pub max_batch: usize,
    /// The owner's event-loop lag that counts, in microseconds
    /// ([`LagSamples::predicted_micros`]).
    pub lag_micros: u64,
}

impl OwnerLoad {
    /// How long a message admitted now is expected to wait before its commit is done, in
    /// microseconds.
    pub fn predicted_wait_micros(&self) -> u64 {
        // With an empty backlog a message is admitted whatever the last commit cost: a
        // backlog is what makes the wait, and refusing on an idle shard would never end (no
        // commit would come to lower the measured cost).
        let commits_ahead = if self.pending_commits == 0 {
            0
        } else {
            (self.pending_commits / self.max_batch.max(1)) as u64 + 1
        };
        let commits = commits_ahead.saturating_mul(self.commit_micros);
        self.lag_micros.saturating_add(commits)
    }
}

/// What the owner's lag sampler last published, as read by another shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LagSamples {
    /// Lag of the last sample, in microseconds.
    pub last_micros: u64,
    /// Lag of the sample before it, in microseconds.
    pub previous_micros: u64,
    /// Time since the last sample was taken, in microseconds; before the first sample, since
    /// the shard started its sampler (see `server::admission::lag_samples`).
    pub age_micros: u64,
    /// How often the sampler samples, in microseconds.
    pub interval_micros: u64,
}

impl LagSamples {
    /// The lag a message admitted now is expected to meet on the owner's event loop: the
    /// sustained lag or the ongoing stall, whichever is larger (module docs).
    pub fn predicted_micros(&self) -> u64 {
        let sustained = self.last_micros.min(self.previous_micros);
        // The next sample is due one interval after the last; past that the loop has not
        // come round to take it.
        let overdue = self.age_micros.saturating_sub(self.interval_micros);
        sustained.max(overdue)
    }
}

/// The verdict on one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageVerdict {
    Admit,
    /// Refuse it with `overloaded`; the client retries after this long.
    Overloaded(RetryAfter),
}

/// Decides about one message given the owner's `load` and the budget (ms; 0 = no shedding).
pub fn decide(load: OwnerLoad, budget_ms: u64) -> MessageVerdict {
    if budget_ms == 0 {
        return MessageVerdict::Admit;
    }
    let wait_micros = load.predicted_wait_micros();
    if wait_micros <= budget_ms.saturating_mul(1000) {
        return MessageVerdict::Admit;
    }
    let ms = wait_micros.div_ceil(1000).clamp(MIN_RETRY_MS, MAX_RETRY_MS);
    MessageVerdict::Overloaded(RetryAfter { ms })
}

/// A running mean of commit durations (exponentially weighted, so it follows a change of load
/// within a few commits); the committer feeds it and publishes [`CommitCost::micros`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CommitCost {
    micros: Option<f64>,
}

impl CommitCost {
    /// Weight of the newest commit.
    const WEIGHT: f64 = 0.2;

    pub fn record(&mut self, micros: u64) -> u64 {
        let sample = micros as f64;
        let mean = match self.micros {
            None => sample,
            Some(mean) => mean + Self::WEIGHT * (sample - mean),
        };
        self.micros = Some(mean);
        self.micros()
    }

    pub fn micros(&self) -> u64 {
        self.micros.map_or(0, |m| m.round() as u64)
    }
}

/// The `error` frame of a refused message: code `overloaded`, the client's message `id` and
/// `retry_after` in milliseconds.
pub fn overloaded_frame(id: &str, retry: RetryAfter) -> String {
    serde_json::json!({
        "type": "error",
        "code": "overloaded",
        "message": format!("server overloaded; message not stored, re-send it after {} ms", retry.ms),
        "retry_after": retry.ms,
        "id": id,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pending: usize, commit_ms: u64, lag_ms: u64) -> OwnerLoad {
        OwnerLoad {
            pending_commits: pending,
            commit_micros: commit_ms * 1000,
            max_batch: 100,
            lag_micros: lag_ms * 1000,
        }
    }

    #[test]
    fn idle_owner_admits_even_after_a_slow_commit() {
        assert_eq!(decide(load(0, 400, 0), 50), MessageVerdict::Admit);
        // One pending: its commit and ours.
        assert_eq!(decide(load(1, 20, 0), 50), MessageVerdict::Admit);
        assert_eq!(
            decide(load(1, 400, 0), 50),
            MessageVerdict::Overloaded(RetryAfter { ms: 400 })
        );
    }

    #[test]
    fn backlog_over_budget_is_refused_with_its_drain_time() {
        // 500 pending at 100 per batch: 6 commits of 20 ms = 120 ms > 50 ms.
        assert_eq!(
            decide(load(500, 20, 0), 50),
            MessageVerdict::Overloaded(RetryAfter { ms: 120 })
        );
        // The same backlog with fast commits fits.
        assert_eq!(decide(load(500, 5, 0), 50), MessageVerdict::Admit);
    }

    #[test]
    fn event_loop_lag_counts_toward_the_wait() {
        assert_eq!(decide(load(0, 1, 30), 50), MessageVerdict::Admit);
        assert_eq!(
            decide(load(0, 1, 80), 50),
            MessageVerdict::Overloaded(RetryAfter { ms: 80 })
        );
    }

    fn samples(last_ms: u64, previous_ms: u64, age_ms: u64) -> LagSamples {
        LagSamples {
            last_micros: last_ms * 1000,
            previous_micros: previous_ms * 1000,
            age_micros: age_ms * 1000,
            interval_micros: 100_000,
        }
    }

    #[test]
    fn a_stall_that_has_ended_sheds_nothing() {
        // A 1.9 s stall, then the loop runs again: 10 ms after the late sample the owner is
        // on time, and a message is admitted (it used to be refused for up to a whole
        // interval, with retry_after 1.9 s).
        let lag = samples(1900, 0, 10).predicted_micros();
        assert_eq!(lag, 0);
        let owner = OwnerLoad {
            lag_micros: lag,
            ..load(0, 1, 0)
        };
        assert_eq!(decide(owner, 50), MessageVerdict::Admit);
    }

    #[test]
    fn a_sustained_lag_sheds_by_its_lesser_sample() {
        assert_eq!(samples(80, 120, 0).predicted_micros(), 80_000);
        assert_eq!(samples(120, 80, 50).predicted_micros(), 80_000);
        let owner = OwnerLoad {
            lag_micros: samples(120, 80, 50).predicted_micros(),
            ..load(0, 1, 0)
        };
        assert_eq!(
            decide(owner, 50),
            MessageVerdict::Overloaded(RetryAfter { ms: 80 })
        );
    }

    #[test]
    fn an_ongoing_stall_sheds_by_how_overdue_the_next_sample_is() {
        // On time, or late by less than the budget: admitted.
        assert_eq!(samples(0, 0, 100).predicted_micros(), 0);
        assert_eq!(samples(0, 0, 130).predicted_micros(), 30_000);
        // The owner has not sampled for 1.1 s: stuck for at least 1 s now.
        assert_eq!(samples(0, 0, 1100).predicted_micros(), 1_000_000);
        // Overdue beats an older, smaller sustained lag.
        assert_eq!(samples(60, 70, 400).predicted_micros(), 300_000);
        let owner = OwnerLoad {
            lag_micros: samples(0, 0, 1100).predicted_micros(),
            ..load(0, 1, 0)
        };
        assert_eq!(
            decide(owner, 50),
            MessageVerdict::Overloaded(RetryAfter { ms: 1000 })
        );
    }

    #[test]
    fn zero_budget_never_sheds() {
        assert_eq!(
            decide(load(1_000_000, 1000, 1000), 0),
            MessageVerdict::Admit
        );
    }

    #[test]
    fn retry_after_is_clamped() {
        assert_eq!(
            decide(load(0, 0, 20), 10),
            MessageVerdict::Overloaded(RetryAfter { ms: MIN_RETRY_MS })
        );
        assert_eq!(
            decide(load(10_000_000, 1000, 0), 50),
            MessageVerdict::Overloaded(RetryAfter { ms: MAX_RETRY_MS })
        );
    }

    #[test]
    fn zero_max_batch_does_not_divide_by_zero() {
        let l = OwnerLoad {
            pending_commits: 3,
            commit_micros: 1000,
            max_batch: 0,
            lag_micros: 0,
        };
        assert_eq!(l.predicted_wait_micros(), 4000);
    }

    #[test]
    fn commit_cost_follows_recent_commits() {
        let mut cost = CommitCost::default();
        assert_eq!(cost.micros(), 0);
        assert_eq!(cost.record(1000), 1000);
        for _ in 0..50 {
            cost.record(10_000);
        }
        assert!(
            (9_900..=10_000).contains(&cost.micros()),
            "{}",
            cost.micros()
        );
    }

    #[test]
    fn overloaded_frame_names_the_message() {
        let frame: serde_json::Value =
            serde_json::from_str(&overloaded_frame("m-7", RetryAfter { ms: 120 })).unwrap();
        assert_eq!(frame["type"], "error");
        assert_eq!(frame["code"], "overloaded");
        assert_eq!(frame["id"], "m-7");
        assert_eq!(frame["retry_after"], 120);
    }
}
