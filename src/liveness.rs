//! Per-shard liveness: a heartbeat and the start-up state of every shard, for the service
//! manager's watchdog and readiness ([`crate::service_manager`]).
//!
//! Each shard owns one [`ShardSlot`] and is the only writer of it: a periodic timer task on the
//! shard's own executor ([`crate::server`]) stores the monotonic time of its last turn and the
//! state of its inference worker's primary model; the shard marks itself listening once its
//! acceptors run and finished when it returns. Any thread may read every slot (relaxed and
//! acquire loads: the reader only needs a recent value, never a consistent cut).
//!
//! Invariants:
//! - A heartbeat only moves forward, and only while the shard's event loop runs: a shard stuck
//!   in a blocking call, a busy loop or a dead thread stops beating, whatever its other tasks.
//! - The times are milliseconds since [`Liveness::new`] on the monotonic clock (`Instant`),
//!   so a wall-clock change never makes a heartbeat look stale or fresh.
//! - `listening` and a final model state, once set, are never unset.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// Where a shard's inference worker is with its primary model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelState {
    /// The primary model is loading in the background (lexical answers meanwhile).
    Loading,
    /// The primary model answers.
    Ready,
    /// The primary model could not be loaded: the shard answers lexically (degraded) for good.
    Failed,
    /// The shard has no model (inference off, or no knowledge base to answer from).
    NotConfigured,
}

impl ModelState {
    /// Whether loading has ended one way or the other (start-up is complete).
    pub fn is_settled(self) -> bool {
        self != ModelState::Loading
    }

    fn to_u8(self) -> u8 {
        match self {
            ModelState::Loading => 0,
            ModelState::Ready => 1,
            ModelState::Failed => 2,
            ModelState::NotConfigured => 3,
        }
    }

    fn from_u8(value: u8) -> ModelState {
        match value {
            1 => ModelState::Ready,
            2 => ModelState::Failed,
            3 => ModelState::NotConfigured,
            _ => ModelState::Loading,
        }
    }
}

/// One shard's slot: written by that shard only.
#[derive(Debug, Default)]
struct ShardSlot {
    /// Milliseconds since the epoch of the shard's last heartbeat, plus one; 0 before the first.
    beat: AtomicU64,
    listening: AtomicBool,
    model: AtomicU8,
    finished: AtomicBool,
}

/// The liveness slots of every shard, shared (in an `Arc`) by the shards and the service
/// manager's thread.
#[derive(Debug)]
pub struct Liveness {
    epoch: Instant,
    beat_interval: Duration,
    slots: Box<[ShardSlot]>,
}

/// What one shard last published, as read by [`Liveness::snapshot`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardLiveness {
    /// Time since the shard's last heartbeat; `None` before its first.
    pub since_beat: Option<Duration>,
    /// The shard's acceptors run.
    pub listening: bool,
    pub model: ModelState,
    /// The shard's main task has returned (at shutdown).
    pub finished: bool,
}

impl Liveness {
    /// Slots for `shards` shards, whose heartbeat tasks beat every `beat_interval`.
    pub fn new(shards: usize, beat_interval: Duration) -> Liveness {
        Liveness {
            epoch: Instant::now(),
            beat_interval,
            slots: (0..shards).map(|_| ShardSlot::default()).collect(),
        }
    }

    /// How often each shard's heartbeat task beats.
    pub fn beat_interval(&self) -> Duration {
        self.beat_interval
    }

    pub fn shard_count(&self) -> usize {
        self.slots.len()
    }

    /// Shard `shard`'s heartbeat: now. Called by that shard only.
    pub fn beat(&self, shard: usize) {
        self.beat_at(shard, Instant::now());
    }

    fn beat_at(&self, shard: usize, at: Instant) {
        let millis = at.saturating_duration_since(self.epoch).as_millis() as u64;
        self.slots[shard]
            .beat
            .fetch_max(millis.saturating_add(1), Ordering::Release);
    }

    /// Shard `shard` accepts connections.
    pub fn set_listening(&self, shard: usize) {
        self.slots[shard].listening.store(true, Ordering::Release);
    }

    /// Shard `shard`'s model state (see [`ModelState`]).
    pub fn set_model(&self, shard: usize, state: ModelState) {
        self.slots[shard]
            .model
            .store(state.to_u8(), Ordering::Release);
    }

    /// Shard `shard`'s main task has returned.
    pub fn set_finished(&self, shard: usize) {
        self.slots[shard].finished.store(true, Ordering::Release);
    }

    /// Every shard's state as of `now`.
    pub fn snapshot(&self, now: Instant) -> Vec<ShardLiveness> {
        let now_millis = now.saturating_duration_since(self.epoch).as_millis() as u64;
        self.slots
            .iter()
            .map(|slot| {
                let beat = slot.beat.load(Ordering::Acquire);
                ShardLiveness {
                    since_beat: (beat > 0)
                        .then(|| Duration::from_millis(now_millis.saturating_sub(beat - 1))),
                    listening: slot.listening.load(Ordering::Acquire),
                    model: ModelState::from_u8(slot.model.load(Ordering::Acquire)),
                    finished: slot.finished.load(Ordering::Acquire),
                }
            })
            .collect()
    }
}

/// Whether start-up is complete: every shard listens and its model has settled (ready, failed
/// and answering lexically, or not configured).
pub fn all_started(shards: &[ShardLiveness]) -> bool {
    shards
        .iter()
        .all(|shard| shard.listening && shard.model.is_settled())
}

/// The shards whose last heartbeat is older than `stale_after` (or that never beat), with the
/// time since their last beat (`None`: never). A finished shard is not stale: it stopped
/// beating on purpose.
pub fn stale_shards(
    shards: &[ShardLiveness],
    stale_after: Duration,
) -> Vec<(usize, Option<Duration>)> {
    shards
        .iter()
        .enumerate()
        .filter(|(_, shard)| !shard.finished)
        .filter(|(_, shard)| shard.since_beat.is_none_or(|since| since > stale_after))
        .map(|(index, shard)| (index, shard.since_beat))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_that_stops_beating_goes_stale_and_fresh_again_when_it_beats() {
        let liveness = Liveness::new(2, Duration::from_millis(100));
        let start = liveness.epoch;
        let stale_after = Duration::from_secs(1);
        assert_eq!(
            stale_shards(&liveness.snapshot(start), stale_after),
            vec![(0, None), (1, None)],
            "a shard that never beat is stale"
        );
        liveness.beat_at(0, start);
        liveness.beat_at(1, start);
        let later = start + Duration::from_millis(900);
        assert!(stale_shards(&liveness.snapshot(later), stale_after).is_empty());
        // Shard 0 goes on beating, shard 1 stops.
        liveness.beat_at(0, later);
        let much_later = start + Duration::from_millis(1500);
        assert_eq!(
            stale_shards(&liveness.snapshot(much_later), stale_after),
            vec![(1, Some(Duration::from_millis(1500)))]
        );
        liveness.beat_at(1, much_later);
        assert!(stale_shards(&liveness.snapshot(much_later), stale_after).is_empty());
        // A heartbeat never moves back.
        liveness.beat_at(1, start);
        assert_eq!(
            liveness.snapshot(much_later)[1].since_beat,
            Some(Duration::ZERO)
        );
        // A finished shard is not stale.
        liveness.set_finished(0);
        let end = start + Duration::from_secs(10);
        assert_eq!(
            stale_shards(&liveness.snapshot(end), stale_after),
            vec![(1, Some(Duration::from_millis(8500)))]
        );
    }

    #[test]
    fn start_up_completes_when_every_shard_listens_and_its_model_settled() {
        let liveness = Liveness::new(2, Duration::from_millis(100));
        let now = Instant::now();
        assert!(!all_started(&liveness.snapshot(now)));
        liveness.set_listening(0);
        liveness.set_listening(1);
        assert!(
            !all_started(&liveness.snapshot(now)),
            "a model still loading holds start-up back"
        );
        liveness.set_model(0, ModelState::Ready);
        assert!(!all_started(&liveness.snapshot(now)));
        liveness.set_model(1, ModelState::NotConfigured);
        assert!(all_started(&liveness.snapshot(now)));
        liveness.set_model(1, ModelState::Failed);
        assert!(
            all_started(&liveness.snapshot(now)),
            "a model that failed leaves the shard answering lexically: started"
        );
        let other = Liveness::new(1, Duration::from_millis(100));
        other.set_model(0, ModelState::Ready);
        assert!(
            !all_started(&other.snapshot(now)),
            "a shard that does not listen yet holds start-up back"
        );
    }
}
