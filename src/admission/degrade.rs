//! Adaptive degradation: the load level of one shard, from what it measures about itself.
//!
//! The shard samples its event-loop lag (how late a timer of fixed interval fires) and its
//! queue depths (frames waiting for the mesh, operations waiting for a commit, texts waiting
//! for the model) a few times a second and feeds each [`Sample`] to a [`Controller`], a pure
//! state machine with three [`Level`]s:
//!
//! - `Normal`: everything is served.
//! - `Shed`: non-core work is dropped: typing indicators are not relayed, and the bot answers
//!   with the lexical (BM25) match instead of running the model.
//! - `Refuse`: additionally, new WebSocket sessions are refused (HTTP 503 with `Retry-After`;
//!   a visitor upgrade is completed and closed with 1013 so a browser learns why). Existing
//!   conversations continue; `/healthz`, `/readyz` and `/metrics` are still answered.
//!
//! Hysteresis: a level is entered when two consecutive samples reach its threshold (lag or
//! queue depth; a threshold of 0 disables that input), and left, one level at a time, only when
//! every sample for `recover_after` stayed below half of the thresholds that entered it. So a
//! single slow timer does not flip the level, and a level does not flap at its threshold.

/// A shard's load level, in increasing order of what it gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Level {
    #[default]
    Normal = 0,
    Shed = 1,
    Refuse = 2,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Normal => "normal",
            Level::Shed => "shed",
            Level::Refuse => "refuse",
        }
    }

    fn below(self) -> Level {
        match self {
            Level::Refuse => Level::Shed,
            _ => Level::Normal,
        }
    }
}

/// Where the levels start (from `[limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Event-loop lag (ms) that enters `Shed`; 0 = lag never sheds.
    pub shed_lag_ms: u64,
    /// Event-loop lag (ms) that enters `Refuse`; 0 = lag never refuses.
    pub refuse_lag_ms: u64,
    /// Queued items that enter `Shed`; 0 = queues never shed.
    pub shed_queue: usize,
    /// Queued items that enter `Refuse`; 0 = queues never refuse.
    pub refuse_queue: usize,
    /// How long samples must stay below half the thresholds before a level is left.
    pub recover_after_ms: u64,
}

/// One measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sample {
    /// How late the sampling timer fired, in milliseconds.
    pub lag_ms: u64,
    /// Items waiting in the shard's queues (mesh outgoing + commit pending + inference).
    pub queue: usize,
}

/// A level change, for the log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: Level,
    pub to: Level,
    pub sample: Sample,
}

/// The per-shard controller.
#[derive(Debug, Clone)]
pub struct Controller {
    thresholds: Thresholds,
    level: Level,
    /// Consecutive samples that asked for a level above the current one (the lowest of them).
    rising: Option<(Level, u32)>,
    /// Since when every sample has been calm enough to leave the current level.
    calm_since: Option<u64>,
}

/// Samples in a row needed to enter a higher level.
const RISE_SAMPLES: u32 = 2;

impl Controller {
    pub fn new(thresholds: Thresholds) -> Controller {
        Controller {
            thresholds,
            level: Level::Normal,
            rising: None,
            calm_since: None,
        }
    }

    pub fn level(&self) -> Level {
        self.level
    }

    /// New thresholds (a configuration reload); the level and the samples seen so far stay.
    pub fn set_thresholds(&mut self, thresholds: Thresholds) {
        self.thresholds = thresholds;
    }

    /// The level one sample alone calls for.
    fn pressure(&self, sample: Sample) -> Level {
        let t = &self.thresholds;
        let reaches = |lag: u64, queue: usize| {
            (lag > 0 && sample.lag_ms >= lag) || (queue > 0 && sample.queue >= queue)
        };
        if reaches(t.refuse_lag_ms, t.refuse_queue) {
            Level::Refuse
        } else if reaches(t.shed_lag_ms, t.shed_queue) {
            Level::Shed
        } else {
            Level::Normal
        }
    }

    /// Whether `sample` is below half of what enters `level`.
    fn calm_for(&self, level: Level, sample: Sample) -> bool {
        let t = &self.thresholds;
        let (lag, queue) = match level {
            Level::Normal => return true,
            Level::Shed => (t.shed_lag_ms, t.shed_queue),
            Level::Refuse => (t.refuse_lag_ms, t.refuse_queue),
        };
        (lag == 0 || sample.lag_ms.saturating_mul(2) < lag)
            && (queue == 0 || sample.queue.saturating_mul(2) < queue)
    }

    /// Feeds one sample taken at `now_ms`; returns the transition it caused, if any.
    pub fn observe(&mut self, sample: Sample, now_ms: u64) -> Option<Transition> {
        let from = self.level;
        let pressure = self.pressure(sample);
        if pressure > self.level {
            self.calm_since = None;
            let (target, count) = match self.rising {
                Some((level, count)) => (level.min(pressure), count + 1),
                None => (pressure, 1),
            };
            if count >= RISE_SAMPLES {
                self.rising = None;
                self.level = target;
                return Some(Transition {
                    from,
                    to: target,
                    sample,
                });
            }
            self.rising = Some((target, count));
            return None;
        }
        self.rising = None;
        if self.level == Level::Normal {
            return None;
        }
        if !self.calm_for(self.level, sample) {
            self.calm_since = None;
            return None;
        }
        let since = *self.calm_since.get_or_insert(now_ms);
        if now_ms.saturating_sub(since) < self.thresholds.recover_after_ms {
            return None;
        }
        self.level = self.level.below();
        // Leaving the next level down needs its own calm period.
        self.calm_since = (self.level != Level::Normal).then_some(now_ms);
        Some(Transition {
            from,
            to: self.level,
            sample,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thresholds() -> Thresholds {
        Thresholds {
            shed_lag_ms: 50,
            refuse_lag_ms: 200,
            shed_queue: 1000,
            refuse_queue: 10_000,
            recover_after_ms: 1000,
        }
    }

    fn lag(ms: u64) -> Sample {
        Sample {
            lag_ms: ms,
            queue: 0,
        }
    }

    fn queue(items: usize) -> Sample {
        Sample {
            lag_ms: 0,
            queue: items,
        }
    }

    #[test]
    fn stays_normal_when_calm_and_ignores_one_slow_sample() {
        let mut c = Controller::new(thresholds());
        for t in 0..100 {
            assert_eq!(c.observe(lag(10), t * 100), None);
        }
        assert_eq!(c.observe(lag(500), 10_000), None);
        assert_eq!(c.observe(lag(1), 10_100), None);
        assert_eq!(c.level(), Level::Normal);
    }

    #[test]
    fn two_slow_samples_enter_the_level_they_both_reach() {
        let mut c = Controller::new(thresholds());
        assert_eq!(c.observe(lag(300), 0), None);
        let t = c.observe(lag(60), 100).unwrap();
        assert_eq!((t.from, t.to), (Level::Normal, Level::Shed));
        assert_eq!(c.observe(queue(20_000), 200), None);
        let t = c.observe(queue(20_000), 300).unwrap();
        assert_eq!((t.from, t.to), (Level::Shed, Level::Refuse));
        assert_eq!(t.sample, queue(20_000));
    }

    #[test]
    fn recovers_one_level_at_a_time_after_a_calm_period() {
        let mut c = Controller::new(thresholds());
        c.observe(lag(1000), 0);
        c.observe(lag(1000), 100);
        assert_eq!(c.level(), Level::Refuse);
        // Below the refuse threshold but not below half of it: no recovery.
        for t in 2..50 {
            assert_eq!(c.observe(lag(150), t * 100), None);
        }
        assert_eq!(c.level(), Level::Refuse);
        // Calm (below 100 ms) for a whole second: down to Shed.
        let mut down = None;
        for t in 50..70 {
            if let Some(tr) = c.observe(lag(40), t * 100) {
                down = Some((t, tr));
                break;
            }
        }
        let (at, tr) = down.expect("recovers");
        assert_eq!((tr.from, tr.to), (Level::Refuse, Level::Shed));
        assert_eq!(at, 60);
        // 40 ms is not below half of the shed threshold (25 ms): stays at Shed.
        for t in 61..100 {
            assert_eq!(c.observe(lag(40), t * 100), None);
        }
        // A calm second at 5 ms: back to Normal.
        let mut back = None;
        for t in 100..120 {
            if let Some(tr) = c.observe(lag(5), t * 100) {
                back = Some(tr);
                break;
            }
        }
        assert_eq!(back.map(|tr| tr.to), Some(Level::Normal));
    }

    #[test]
    fn a_busy_sample_restarts_the_calm_period() {
        let mut c = Controller::new(thresholds());
        c.observe(queue(5000), 0);
        c.observe(queue(5000), 100);
        assert_eq!(c.level(), Level::Shed);
        c.observe(queue(10), 200);
        c.observe(queue(10), 1000);
        c.observe(queue(800), 1100); // not calm (above half of 1000)
        assert_eq!(c.observe(queue(10), 1200), None);
        assert_eq!(c.observe(queue(10), 2100), None);
        assert!(c.observe(queue(10), 2200).is_some());
        assert_eq!(c.level(), Level::Normal);
    }

    #[test]
    fn a_threshold_of_one_recovers_on_empty_queues() {
        let mut c = Controller::new(Thresholds {
            shed_lag_ms: 0,
            refuse_lag_ms: 0,
            shed_queue: 1,
            refuse_queue: 1,
            recover_after_ms: 500,
        });
        c.observe(queue(1), 0);
        c.observe(queue(3), 100);
        assert_eq!(c.level(), Level::Refuse);
        c.observe(queue(0), 200);
        assert_eq!(c.observe(queue(0), 700).map(|t| t.to), Some(Level::Shed));
        c.observe(queue(0), 800);
        assert_eq!(c.observe(queue(0), 1300).map(|t| t.to), Some(Level::Normal));
    }

    #[test]
    fn zero_thresholds_disable_their_input() {
        let mut c = Controller::new(Thresholds {
            shed_lag_ms: 0,
            refuse_lag_ms: 0,
            shed_queue: 0,
            refuse_queue: 0,
            recover_after_ms: 0,
        });
        for t in 0..10 {
            assert_eq!(
                c.observe(
                    Sample {
                        lag_ms: 100_000,
                        queue: usize::MAX
                    },
                    t
                ),
                None
            );
        }
        assert_eq!(c.level(), Level::Normal);
    }
}
