//! Histograms: recorded with hdrhistogram by the one thread that owns them, published to fixed
//! Prometheus buckets for the scrape.
//!
//! A [`Recorder`] belongs to exactly one thread (a shard, or a shard's inference worker) and is
//! never shared: recording is a plain hdrhistogram `record` (no atomic, no lock). Its owner
//! calls [`Recorder::publish`] now and then (every [`PUBLISH_INTERVAL`]): that folds the
//! hdrhistogram into the [`Family`]'s fixed buckets and stores the counts in the recorder's
//! [`Published`] slot with relaxed atomic stores, which a scrape on any thread reads.
//!
//! Invariants:
//! - A published slot has one writer (its recorder); every stored bucket count is the count
//!   since start, so each bucket only grows from one publication to the next.
//! - Buckets are published *non-cumulative*; the scrape accumulates them, and a histogram's
//!   `_count` is the sum of the buckets it read. So `_bucket{le="+Inf"}` always equals `_count`
//!   and the buckets are monotonic, even when a scrape races a publication.
//! - A value falls into the first bucket whose bound is at least the value's hdrhistogram
//!   equivalence class top (3 significant digits: exact below 2,048, within 0.1% above).
//! - A scrape sees what was published, at most one [`PUBLISH_INTERVAL`] old.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often the owners publish their recorders.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

/// What a family's recorded values are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Durations, recorded in microseconds and exported in seconds.
    Seconds,
    /// Plain counts (batch sizes), exported as they are.
    Count,
}

/// Upper bounds of the latency buckets, in microseconds (+Inf is implied).
pub const LATENCY_BUCKETS_MICROS: [u64; 16] = [
    100, 250, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
    1_000_000, 2_000_000, 5_000_000, 10_000_000,
];

/// Upper bounds of the batch-size buckets (+Inf is implied).
pub const SIZE_BUCKETS: [u64; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

/// Every histogram family. The discriminant indexes a shard's published slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    RelayLatency,
    BotLatency,
    CommitLatency,
    CommitBatchSize,
    InferenceQueueWait,
    InferenceBatchSize,
}

impl Family {
    /// Every family, in the order `/metrics` renders them.
    pub const ALL: [Family; 6] = [
        Family::RelayLatency,
        Family::BotLatency,
        Family::CommitLatency,
        Family::CommitBatchSize,
        Family::InferenceQueueWait,
        Family::InferenceBatchSize,
    ];

    /// The metric name without the `switchboard_` prefix.
    pub fn name(self) -> &'static str {
        match self {
            Family::RelayLatency => "relay_latency_seconds",
            Family::BotLatency => "bot_latency_seconds",
            Family::CommitLatency => "commit_latency_seconds",
            Family::CommitBatchSize => "commit_batch_size",
            Family::InferenceQueueWait => "inference_queue_wait_seconds",
            Family::InferenceBatchSize => "inference_batch_size",
        }
    }

    pub fn help(self) -> &'static str {
        match self {
            Family::RelayLatency => {
                "Time from a visitor's or agent's message reaching its conversation's owner shard \
                 to its ack and relay frames being handed to the recipients (group commit included)."
            }
            Family::BotLatency => {
                "Time from a bot turn's start (the visitor's message stored) to the bot's verdict \
                 (handlers, cache, inference queue and model included)."
            }
            Family::CommitLatency => {
                "Time a storage operation (message append, state change) waited from queued to its \
                 group commit done, fsync included."
            }
            Family::CommitBatchSize => "Storage operations written by one group commit.",
            Family::InferenceQueueWait => {
                "Time an embedding request waited in the inference queue before its batch started."
            }
            Family::InferenceBatchSize => "Texts embedded by one model call of the inference worker.",
        }
    }

    pub fn unit(self) -> Unit {
        match self {
            Family::CommitBatchSize | Family::InferenceBatchSize => Unit::Count,
            _ => Unit::Seconds,
        }
    }

    /// The finite bucket bounds, in the recorded unit (microseconds or a count).
    pub fn bounds(self) -> &'static [u64] {
        match self.unit() {
            Unit::Seconds => &LATENCY_BUCKETS_MICROS,
            Unit::Count => &SIZE_BUCKETS,
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Largest value recorded as itself; larger ones are recorded as this (one hour, or a
    /// million texts or operations).
    fn highest(self) -> u64 {
        match self.unit() {
            Unit::Seconds => 3_600_000_000,
            Unit::Count => 1_000_000,
        }
    }
}

/// What the scrape reads of one histogram: bucket counts (non-cumulative, one per bound plus
/// +Inf) and the sum of the values, as last published.
#[derive(Debug)]
pub struct Published {
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl Published {
    fn new(family: Family) -> Published {
        Published {
            buckets: (0..=family.bounds().len())
                .map(|_| AtomicU64::new(0))
                .collect(),
            sum: AtomicU64::new(0),
        }
    }

    /// The bucket counts (non-cumulative) and the sum, as published now.
    pub fn read(&self) -> (Vec<u64>, u64) {
        let buckets = self
            .buckets
            .iter()
            .map(|bucket| bucket.load(Ordering::Relaxed))
            .collect();
        (buckets, self.sum.load(Ordering::Relaxed))
    }
}

/// One shard's published slots, one per [`Family`].
#[derive(Debug)]
pub struct ShardHistograms {
    slots: [Arc<Published>; Family::ALL.len()],
}

impl Default for ShardHistograms {
    fn default() -> Self {
        ShardHistograms {
            slots: Family::ALL.map(|family| Arc::new(Published::new(family))),
        }
    }
}

impl ShardHistograms {
    pub fn get(&self, family: Family) -> &Published {
        &self.slots[family.index()]
    }

    /// A recorder for `family` publishing here. Take one per family and keep it on the thread
    /// that records: two recorders of one slot would overwrite each other's publications.
    pub fn recorder(&self, family: Family) -> Recorder {
        Recorder {
            family,
            histogram: hdrhistogram::Histogram::new_with_bounds(1, family.highest(), 3)
                .expect("static bounds are valid"),
            sum: 0,
            dirty: false,
            published: self.slots[family.index()].clone(),
            scratch: vec![0; family.bounds().len() + 1],
        }
    }
}

/// The recording side of one histogram, owned by one thread.
#[derive(Debug)]
pub struct Recorder {
    family: Family,
    histogram: hdrhistogram::Histogram<u64>,
    /// Exact sum of the recorded values (hdrhistogram keeps none).
    sum: u64,
    /// Recorded since the last publication.
    dirty: bool,
    published: Arc<Published>,
    scratch: Vec<u64>,
}

impl Recorder {
    /// Records one value in the family's unit (microseconds or a count).
    pub fn record(&mut self, value: u64) {
        self.histogram.saturating_record(value);
        self.sum = self.sum.saturating_add(value);
        self.dirty = true;
    }

    /// Records a duration (for the families in seconds).
    pub fn record_duration(&mut self, duration: Duration) {
        debug_assert_eq!(self.family.unit(), Unit::Seconds);
        self.record(u64::try_from(duration.as_micros()).unwrap_or(u64::MAX));
    }

    /// Values recorded so far.
    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// The value at `quantile` (0..=1) of what was recorded, to 3 significant digits.
    pub fn quantile(&self, quantile: f64) -> u64 {
        self.histogram.value_at_quantile(quantile)
    }

    /// Folds the hdrhistogram into the fixed buckets and stores them for the scrape; nothing
    /// to do when nothing was recorded since the last call.
    pub fn publish(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        let bounds = self.family.bounds();
        self.scratch.fill(0);
        for value in self.histogram.iter_recorded() {
            let top = value.value_iterated_to();
            let index = bounds.partition_point(|&bound| bound < top);
            self.scratch[index] += value.count_at_value();
        }
        for (slot, &count) in self.published.buckets.iter().zip(&self.scratch) {
            slot.store(count, Ordering::Relaxed);
        }
        self.published.sum.store(self.sum, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishing_folds_values_into_the_fixed_buckets() {
        let shard = ShardHistograms::default();
        let mut recorder = shard.recorder(Family::CommitLatency);
        for micros in [0, 100, 101, 250, 1_500, 9_000_000, 50_000_000] {
            recorder.record(micros);
        }
        // Nothing is visible before the owner publishes.
        assert_eq!(
            shard
                .get(Family::CommitLatency)
                .read()
                .0
                .iter()
                .sum::<u64>(),
            0
        );
        recorder.publish();
        let (buckets, sum) = shard.get(Family::CommitLatency).read();
        assert_eq!(buckets.len(), LATENCY_BUCKETS_MICROS.len() + 1);
        assert_eq!(buckets[0], 2, "0 and 100 are <= 100 us");
        assert_eq!(buckets[1], 2, "101 and 250 are <= 250 us");
        assert_eq!(buckets[4], 1, "1500 is <= 2 ms");
        assert_eq!(buckets[15], 1, "9 s is <= 10 s");
        assert_eq!(buckets[16], 1, "50 s is over every bound");
        assert_eq!(buckets.iter().sum::<u64>(), 7);
        assert_eq!(sum, 59_001_951);
        assert_eq!(recorder.count(), 7);
    }

    #[test]
    fn counts_are_exact_for_batch_sizes() {
        let shard = ShardHistograms::default();
        let mut recorder = shard.recorder(Family::InferenceBatchSize);
        for size in [1, 1, 2, 3, 4, 5, 64, 65, 2_000] {
            recorder.record(size);
        }
        recorder.publish();
        let (buckets, sum) = shard.get(Family::InferenceBatchSize).read();
        // Bounds 1, 2, 4, 8, 16, 32, 64, 128, ..., 1024, +Inf.
        assert_eq!(&buckets[..8], &[2, 1, 2, 1, 0, 0, 1, 1]);
        assert_eq!(buckets[SIZE_BUCKETS.len()], 1);
        assert_eq!(sum, 2_145);
    }
}
