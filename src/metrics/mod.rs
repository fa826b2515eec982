//! What every shard counts, exported at `/metrics` in the Prometheus text format (0.0.4).
//!
//! Each shard writes only its own [`ShardMetrics`] (relaxed atomics, so a write is a plain add
//! on x86 and never contends) and its own histograms ([`histogram`]: recorded with
//! hdrhistogram by their owning thread, published to fixed buckets once a second); any thread
//! may read all of them to answer a scrape, which sums the shards. No lock is taken on the
//! recording side, and no shard is asked anything by a scrape. This is observation, not
//! coordination: no decision is made from another shard's counters, with these exceptions
//! (relaxed reads; a stale value only moves a decision by a moment):
//! - a session pauses reading its socket while the `commit_pending` gauge of its
//!   conversation's shard is above `[limits] max_pending_commits`;
//! - message shedding (`admission::shed`) reads the owner shard's `commit_pending`,
//!   `commit_recent_micros`, its last two lag samples and `event_loop_sampled_ms`, the time of
//!   its last sample, as a sign of life.
//!
//! The exposition ([`Metrics::render`], see docs/api.md "GET /metrics"):
//! - every family has one `# HELP` and one `# TYPE` line, then all its samples;
//! - per-shard families have one series per shard, labelled `shard="N"`, followed by the
//!   summed series labelled `shard="all"`: the sum over shards for counters, additive gauges
//!   and histogram buckets, `_sum` and `_count`; the maximum for level gauges (a
//!   [`Aggregate::Max`] field, e.g. `degrade_level`); for the cache hit ratios the ratio of
//!   the summed counters. Sum over `shard!="all"` in queries, or read `shard="all"`;
//! - the gray-release families (`bot_variant_*`) have one series per shard and variant,
//!   labelled `shard="N",variant="NAME"`, then `shard="all"` per variant (the sum); every
//!   variant configured since start keeps its series (a reload that drops one leaves its
//!   counts). Slots are fixed ([`MAX_VARIANT_SERIES`]), so recording takes no lock;
//! - process-wide values (RSS, TLS reloads) have no `shard` label;
//! - histograms have cumulative `_bucket{le="..."}` series ending with `le="+Inf"` (equal to
//!   `_count`), then `_sum` and `_count`; durations are in seconds.

pub mod histogram;
pub mod listener;
mod text;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::arena::SessionKind;
use histogram::{Family, ShardHistograms, Unit};
use text::Exposition;

/// The `Content-Type` of a scrape: the Prometheus text format, version 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How the `shard="all"` series of a per-shard value is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aggregate {
    /// A counter: the sum over shards.
    Counter,
    /// A gauge whose shard values add up (sessions open, queue lengths, bytes).
    Sum,
    /// A gauge that is a level or a recent duration: the worst (largest) shard.
    Max,
}

impl Aggregate {
    fn prometheus_type(self) -> &'static str {
        match self {
            Aggregate::Counter => "counter",
            Aggregate::Sum | Aggregate::Max => "gauge",
        }
    }
}

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident : $aggregate:ident),* $(,)?) => {
        /// One shard's counters and gauges.
        #[derive(Default, Debug)]
        pub struct ShardMetrics {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
            /// Sessions open now by kind, in the order of [`SessionKind::ALL`].
            pub sessions_by_kind: [AtomicU64; 3],
            /// Per gray-release variant, by the slot [`Metrics::variant_slot`] gave its name.
            pub variants: [VariantCounters; MAX_VARIANT_SERIES],
        }

        impl ShardMetrics {
            /// Name, aggregate and help of every field, in rendering order.
            const FIELDS: &'static [(&'static str, Aggregate, &'static str)] =
                &[$((stringify!($name), Aggregate::$aggregate, concat!($($doc),*))),*];

            /// The values of [`Self::FIELDS`], in the same order.
            fn values(&self) -> Vec<u64> {
                vec![$(self.$name.load(Ordering::Relaxed)),*]
            }
        }
    };
}

counters! {
    /// TCP connections accepted.
    connections_accepted: Counter,
    /// WebSocket handshakes completed.
    handshakes_completed: Counter,
    /// Requests answered with an HTTP error (400, 404, 405, 426, 431, ...).
    http_errors: Counter,
    /// Connections that did not send a complete request head in time.
    handshake_timeouts: Counter,
    /// WebSocket sessions open now.
    sessions_open: Sum,
    /// WebSocket data messages received.
    messages_received: Counter,
    /// WebSocket data messages sent.
    messages_sent: Counter,
    /// Sessions closed because of a protocol error sent by the peer.
    protocol_errors: Counter,
    /// Sessions closed because they stayed silent past the idle timeout.
    idle_timeouts: Counter,
    /// Spare I/O buffers pooled now.
    pooled_buffers: Sum,
    /// Answers the bot gave (knowledge-base answers and fallbacks).
    bot_replies: Counter,
    /// Bot answers matched lexically because inference was overloaded.
    bot_degraded: Counter,
    /// Conversations the bot handed to the human queue.
    bot_handoffs: Counter,
    /// Visitor messages refused by risk control.
    bot_blocked: Counter,
    /// Recognitions answered from the hot-query cache.
    bot_hot_cache_hits: Counter,
    /// Recognitions that reused a cached embedding.
    bot_embedding_cache_hits: Counter,
    /// Recognitions that needed the model (or the lexical fallback).
    bot_cache_misses: Counter,
    /// Storage group commits (LMDB write transactions) completed.
    store_commits: Counter,
    /// Operations (message appends, state changes, ...) written by those commits.
    store_commit_ops: Counter,
    /// Microseconds spent in group commits, fsync included (divide by store_commits for the mean).
    store_commit_micros: Counter,
    /// Connections closed at accept because the peer is on the blocklist.
    admission_blocked: Counter,
    /// Connections answered 429 at accept (too many new connections from the IP).
    admission_rate_limited: Counter,
    /// Upgrades refused because the shard is at the refuse level (503 or close 1013).
    admission_overloaded: Counter,
    /// Frames refused with `rate_limited` (message or frame budget of a session spent).
    frames_rate_limited: Counter,
    /// Sessions closed with 1008 because their refused frames passed the abuse limit.
    abuse_closes: Counter,
    /// Sessions closed with 1013 (or dropped mid-write) because their client stopped reading and
    /// the frames waiting for them passed `[limits] max_outbox_frames`.
    slow_consumer_closes: Counter,
    /// Times a session stopped reading its socket because the queues toward its owner were full.
    backpressure_pauses: Counter,
    /// Bot queries answered lexically because the site's bot-query rate was spent.
    bot_rate_limited: Counter,
    /// Typing indicators not relayed because the shard was shedding load.
    typing_shed: Counter,
    /// Hostile-input log lines suppressed by the per-shard log rate.
    hostile_log_suppressed: Counter,
    /// Storage operations waiting for a group commit now.
    commit_pending: Sum,
    /// Recent mean duration of one group commit in microseconds (feeds message shedding).
    commit_recent_micros: Max,
    /// Visitor messages refused with `overloaded` (predicted wait over the latency budget).
    messages_overloaded: Counter,
    /// Messages waiting for the mesh, toward all shards, now.
    mesh_queued: Sum,
    /// Event-loop lag of the last sample, in microseconds.
    event_loop_lag_micros: Max,
    /// Event-loop lag of the sample before the last, in microseconds (message shedding counts the lesser of the two).
    event_loop_lag_previous_micros: Max,
    /// When the shard last sampled its event-loop lag, in milliseconds since the first shard started (it stops moving while the shard's event loop is stuck).
    event_loop_sampled_ms: Max,
    /// Load level now: 0 normal, 1 shed, 2 refuse.
    degrade_level: Max,
    /// Load-level changes (each logged).
    degrade_transitions: Counter,
    /// TLS handshakes completed on the TLS listener.
    tls_handshakes_completed: Counter,
    /// TLS handshakes that failed or timed out (bad client hello, protocol version, ALPN, ...).
    tls_handshake_failures: Counter,
    /// Login attempts refused by the per-IP or per-account login token buckets (429).
    login_rate_limited: Counter,
    /// Embedding requests waiting for or in the shard's inference worker now.
    inference_queue_depth: Sum,
    /// Bytes of the shard's LMDB data file in use (pages up to the last one written).
    storage_used_bytes: Sum,
    /// Bytes of the shard's LMDB memory map (the file's current ceiling; it grows on demand).
    storage_map_bytes: Sum,
}

/// How many variant names the `bot_variant_*` families can hold since start (configured now or
/// before a reload); past it a new name is not counted (logged by the shard).
pub const MAX_VARIANT_SERIES: usize = 32;

/// One shard's counters of one gray-release variant.
#[derive(Default, Debug)]
pub struct VariantCounters {
    /// Conversations given this variant (at their first bot turn).
    pub conversations: AtomicU64,
    /// Bot turns that answered (a reply that is not a fallback).
    pub answers: AtomicU64,
    /// Bot turns that ended in the fallback (a failed turn).
    pub fallbacks: AtomicU64,
    /// Bot turns that handed the conversation to the human queue.
    pub handoffs: AtomicU64,
}

impl VariantCounters {
    /// Name, help and counter of each family, in rendering order.
    fn families(&self) -> [(&'static str, &'static str, &AtomicU64); 4] {
        [
            (
                "bot_variant_conversations",
                "Conversations given each gray-release variant ([[bot.variants]]), at their first bot turn.",
                &self.conversations,
            ),
            (
                "bot_variant_answers",
                "Bot turns of each variant that answered (a reply that is not a fallback).",
                &self.answers,
            ),
            (
                "bot_variant_fallbacks",
                "Bot turns of each variant that ended in the fallback (a failed turn).",
                &self.fallbacks,
            ),
            (
                "bot_variant_handoffs",
                "Bot turns of each variant that handed the conversation to the human queue.",
                &self.handoffs,
            ),
        ]
    }
}

impl ShardMetrics {
    pub fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }

    pub fn set(gauge: &AtomicU64, value: u64) {
        gauge.store(value, Ordering::Relaxed);
    }
}

/// All shards' counters and histograms, shared read-only between threads.
#[derive(Clone, Debug)]
pub struct Metrics {
    shards: Arc<[ShardMetrics]>,
    histograms: Arc<[ShardHistograms]>,
    process: Arc<ProcessMetrics>,
    /// The variant name of each slot of [`ShardMetrics::variants`], in the order first seen.
    /// Written only when a shard builds its chains (start, reload); read by scrapes.
    variant_names: Arc<RwLock<Vec<Arc<str>>>>,
}

/// Counters of work done outside the shards (by the TLS certificate watcher), written by one
/// thread and rendered without a shard label.
#[derive(Default, Debug)]
pub struct ProcessMetrics {
    /// TLS certificate/key pairs loaded by a reload (SIGHUP or a file change).
    pub tls_reloads: AtomicU64,
    /// TLS reloads refused because the new pair did not load; the previous pair stays in use.
    pub tls_reload_failures: AtomicU64,
}

/// The hit ratios `/metrics` derives from the bot's cache counters: label and which hit
/// counters count as hits (indexes into hot, embedding).
const CACHE_RATIOS: [(&str, bool, bool); 3] = [
    ("hot", true, false),
    ("embedding", false, true),
    ("any", true, true),
];

impl Metrics {
    pub fn new(shard_count: usize) -> Self {
        Self {
            shards: (0..shard_count).map(|_| ShardMetrics::default()).collect(),
            histograms: (0..shard_count)
                .map(|_| ShardHistograms::default())
                .collect(),
            process: Arc::default(),
            variant_names: Arc::default(),
        }
    }

    /// The slot of variant `name` in [`ShardMetrics::variants`] (the same on every shard),
    /// given one on first use; `None` once [`MAX_VARIANT_SERIES`] names have slots.
    pub fn variant_slot(&self, name: &str) -> Option<usize> {
        let mut names = self
            .variant_names
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = names.iter().position(|n| &**n == name) {
            return Some(slot);
        }
        if names.len() >= MAX_VARIANT_SERIES {
            return None;
        }
        names.push(Arc::from(name));
        Some(names.len() - 1)
    }

    /// The counters of shard `index`.
    pub fn shard(&self, index: usize) -> &ShardMetrics {
        &self.shards[index]
    }

    /// Shard `index`'s published histograms; take each [`histogram::Recorder`] from here once,
    /// on the thread that records it.
    pub fn histograms(&self, index: usize) -> &ShardHistograms {
        &self.histograms[index]
    }

    /// The process-wide counters.
    pub fn process(&self) -> &ProcessMetrics {
        &self.process
    }

    /// Renders everything, per shard and summed, in the Prometheus text format; `resident_bytes`
    /// is the process's RSS (`None`: unknown, the family is left out).
    pub fn render(&self, resident_bytes: Option<u64>) -> String {
        let mut out = Exposition::default();
        let values: Vec<Vec<u64>> = self.shards.iter().map(ShardMetrics::values).collect();
        for (position, &(name, aggregate, help)) in ShardMetrics::FIELDS.iter().enumerate() {
            out.family(name, aggregate.prometheus_type(), help);
            let column = values.iter().map(|shard| shard[position]);
            for (shard, value) in column.clone().enumerate() {
                out.sample(name, &[("shard", &shard.to_string())], value);
            }
            let all = match aggregate {
                Aggregate::Counter | Aggregate::Sum => column.sum(),
                Aggregate::Max => column.max().unwrap_or(0),
            };
            out.sample(name, &[("shard", "all")], all);
        }
        self.render_sessions_by_kind(&mut out);
        self.render_variants(&mut out);
        self.render_cache_ratios(&mut out, &values);
        for family in Family::ALL {
            self.render_histogram(&mut out, family);
        }
        for (name, help, counter) in [
            (
                "tls_reloads",
                "TLS certificate/key pairs loaded by a reload (SIGHUP or a file change).",
                &self.process.tls_reloads,
            ),
            (
                "tls_reload_failures",
                "TLS reloads refused because the new pair did not load (the previous pair stays).",
                &self.process.tls_reload_failures,
            ),
        ] {
            out.family(name, "counter", help);
            out.sample(name, &[], counter.load(Ordering::Relaxed));
        }
        if let Some(bytes) = resident_bytes {
            let name = "resident_bytes";
            out.family(name, "gauge", "Resident set size of the process in bytes.");
            out.sample(name, &[], bytes);
        }
        out.finish()
    }

    fn render_sessions_by_kind(&self, out: &mut Exposition) {
        let name = "sessions_by_kind";
        out.family(
            name,
            "gauge",
            "WebSocket sessions open now, by kind (visitor, agent, echo).",
        );
        for (index, kind) in SessionKind::ALL.iter().enumerate() {
            let mut all = 0;
            for (shard, metrics) in self.shards.iter().enumerate() {
                let value = metrics.sessions_by_kind[index].load(Ordering::Relaxed);
                all += value;
                out.sample(
                    name,
                    &[("shard", &shard.to_string()), ("kind", kind.as_str())],
                    value,
                );
            }
            out.sample(name, &[("shard", "all"), ("kind", kind.as_str())], all);
        }
    }

    fn render_variants(&self, out: &mut Exposition) {
        let names = self
            .variant_names
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let families = VariantCounters::default()
            .families()
            .map(|(name, help, _)| (name, help));
        for (position, (family, help)) in families.into_iter().enumerate() {
            out.family(family, "counter", help);
            for (slot, variant) in names.iter().enumerate() {
                let mut all = 0;
                for (shard, metrics) in self.shards.iter().enumerate() {
                    let (_, _, counter) = metrics.variants[slot].families()[position];
                    let value = counter.load(Ordering::Relaxed);
                    all += value;
                    out.sample(
                        family,
                        &[("shard", &shard.to_string()), ("variant", variant)],
                        value,
                    );
                }
                out.sample(family, &[("shard", "all"), ("variant", variant)], all);
            }
        }
    }

    fn render_cache_ratios(&self, out: &mut Exposition, values: &[Vec<u64>]) {
        let position = |field: &str| {
            ShardMetrics::FIELDS
                .iter()
                .position(|(name, _, _)| *name == field)
                .expect("a field of ShardMetrics")
        };
        let (hot, embedding, miss) = (
            position("bot_hot_cache_hits"),
            position("bot_embedding_cache_hits"),
            position("bot_cache_misses"),
        );
        let name = "bot_cache_hit_ratio";
        out.family(
            name,
            "gauge",
            "Share of the bot's recognitions since start answered from a cache: the hot-query \
             cache, the embedding cache, or either (NaN before the first recognition).",
        );
        for (cache, hot_hits, embedding_hits) in CACHE_RATIOS {
            let ratio = |hot_count: u64, embedding_count: u64, misses: u64| {
                let hits = if hot_hits { hot_count } else { 0 }
                    + if embedding_hits { embedding_count } else { 0 };
                let lookups = hot_count + embedding_count + misses;
                if lookups == 0 {
                    f64::NAN
                } else {
                    hits as f64 / lookups as f64
                }
            };
            let (mut all_hot, mut all_embedding, mut all_misses) = (0, 0, 0);
            for (shard, shard_values) in values.iter().enumerate() {
                let (h, e, m) = (
                    shard_values[hot],
                    shard_values[embedding],
                    shard_values[miss],
                );
                all_hot += h;
                all_embedding += e;
                all_misses += m;
                out.sample_f64(
                    name,
                    &[("shard", &shard.to_string()), ("cache", cache)],
                    ratio(h, e, m),
                );
            }
            out.sample_f64(
                name,
                &[("shard", "all"), ("cache", cache)],
                ratio(all_hot, all_embedding, all_misses),
            );
        }
    }

    fn render_histogram(&self, out: &mut Exposition, family: Family) {
        let name = family.name();
        out.family(name, "histogram", family.help());
        let bounds = family.bounds();
        let mut all_buckets = vec![0u64; bounds.len() + 1];
        let mut all_sum = 0u64;
        let series = |out: &mut Exposition, shard: &str, buckets: &[u64], sum: u64| {
            let mut cumulative = 0;
            for (index, count) in buckets.iter().enumerate() {
                cumulative += count;
                let le = bounds.get(index).map_or_else(
                    || "+Inf".to_string(),
                    |&bound| value_text(family.unit(), bound),
                );
                out.sample(
                    &format!("{name}_bucket"),
                    &[("shard", shard), ("le", &le)],
                    cumulative,
                );
            }
            out.sample_text(
                &format!("{name}_sum"),
                &[("shard", shard)],
                &value_text(family.unit(), sum),
            );
            out.sample(&format!("{name}_count"), &[("shard", shard)], cumulative);
        };
        for (shard, histograms) in self.histograms.iter().enumerate() {
            let (buckets, sum) = histograms.get(family).read();
            for (total, count) in all_buckets.iter_mut().zip(&buckets) {
                *total += count;
            }
            all_sum += sum;
            series(out, &shard.to_string(), &buckets, sum);
        }
        series(out, "all", &all_buckets, all_sum);
    }
}

/// A recorded value in the family's exported unit: microseconds as exact decimal seconds
/// (`1500` → `0.0015`), counts as they are.
fn value_text(unit: Unit, value: u64) -> String {
    match unit {
        Unit::Count => value.to_string(),
        Unit::Seconds => {
            let fraction = format!("{:06}", value % 1_000_000);
            let fraction = fraction.trim_end_matches('0');
            if fraction.is_empty() {
                format!("{}", value / 1_000_000)
            } else {
                format!("{}.{fraction}", value / 1_000_000)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_per_shard_and_summed_values() {
        let metrics = Metrics::new(2);
        ShardMetrics::add(&metrics.shard(1).connections_accepted, 3);
        ShardMetrics::add(&metrics.shard(0).connections_accepted, 2);
        ShardMetrics::set(&metrics.shard(0).degrade_level, 1);
        ShardMetrics::set(&metrics.shard(1).degrade_level, 2);
        ShardMetrics::set(&metrics.shard(1).sessions_by_kind[0], 4);
        let text = metrics.render(Some(42));
        for line in [
            r#"switchboard_connections_accepted{shard="0"} 2"#,
            r#"switchboard_connections_accepted{shard="1"} 3"#,
            r#"switchboard_connections_accepted{shard="all"} 5"#,
            r#"switchboard_degrade_level{shard="all"} 2"#,
            r#"switchboard_sessions_by_kind{shard="1",kind="visitor"} 4"#,
            r#"switchboard_sessions_by_kind{shard="all",kind="visitor"} 4"#,
            r#"switchboard_bot_cache_hit_ratio{shard="all",cache="any"} NaN"#,
            "# TYPE switchboard_sessions_open gauge",
            "# TYPE switchboard_connections_accepted counter",
            "switchboard_resident_bytes 42",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn variant_families_have_a_series_per_shard_and_variant_and_their_sum() {
        let metrics = Metrics::new(2);
        assert_eq!(metrics.variant_slot("control"), Some(0));
        assert_eq!(metrics.variant_slot("strict"), Some(1));
        assert_eq!(metrics.variant_slot("control"), Some(0));
        ShardMetrics::add(&metrics.shard(0).variants[1].conversations, 2);
        ShardMetrics::add(&metrics.shard(1).variants[1].conversations, 3);
        ShardMetrics::add(&metrics.shard(1).variants[0].handoffs, 1);
        let text = metrics.render(None);
        assert_eq!(
            text.matches("# TYPE switchboard_bot_variant_conversations counter")
                .count(),
            1
        );
        for line in [
            r#"switchboard_bot_variant_conversations{shard="0",variant="strict"} 2"#,
            r#"switchboard_bot_variant_conversations{shard="1",variant="strict"} 3"#,
            r#"switchboard_bot_variant_conversations{shard="all",variant="strict"} 5"#,
            r#"switchboard_bot_variant_conversations{shard="all",variant="control"} 0"#,
            r#"switchboard_bot_variant_handoffs{shard="all",variant="control"} 1"#,
            r#"switchboard_bot_variant_answers{shard="all",variant="strict"} 0"#,
            r#"switchboard_bot_variant_fallbacks{shard="1",variant="control"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        for n in 2..MAX_VARIANT_SERIES {
            assert_eq!(metrics.variant_slot(&format!("v{n}")), Some(n));
        }
        assert_eq!(metrics.variant_slot("one-too-many"), None);
    }

    #[test]
    fn histograms_render_cumulative_per_shard_and_summed() {
        let metrics = Metrics::new(2);
        let mut recorder = metrics.histograms(1).recorder(Family::CommitLatency);
        for micros in [100, 250, 251, 1_500, 9_000_000, 20_000_000] {
            recorder.record(micros);
        }
        recorder.publish();
        let mut other = metrics.histograms(0).recorder(Family::CommitLatency);
        other.record(300);
        other.publish();
        let text = metrics.render(None);
        assert_eq!(
            text.matches("# TYPE switchboard_commit_latency_seconds histogram")
                .count(),
            1
        );
        for line in [
            r#"switchboard_commit_latency_seconds_bucket{shard="1",le="0.0001"} 1"#,
            r#"switchboard_commit_latency_seconds_bucket{shard="1",le="0.00025"} 2"#,
            r#"switchboard_commit_latency_seconds_bucket{shard="1",le="0.0005"} 3"#,
            r#"switchboard_commit_latency_seconds_bucket{shard="1",le="0.002"} 4"#,
            r#"switchboard_commit_latency_seconds_bucket{shard="1",le="10"} 5"#,
            r#"switchboard_commit_latency_seconds_bucket{shard="1",le="+Inf"} 6"#,
            r#"switchboard_commit_latency_seconds_count{shard="1"} 6"#,
            r#"switchboard_commit_latency_seconds_sum{shard="1"} 29.002101"#,
            r#"switchboard_commit_latency_seconds_bucket{shard="0",le="+Inf"} 1"#,
            r#"switchboard_commit_latency_seconds_bucket{shard="all",le="0.0005"} 4"#,
            r#"switchboard_commit_latency_seconds_bucket{shard="all",le="+Inf"} 7"#,
            r#"switchboard_commit_latency_seconds_sum{shard="all"} 29.002401"#,
            r#"switchboard_commit_latency_seconds_count{shard="all"} 7"#,
            r#"switchboard_inference_batch_size_bucket{shard="all",le="1"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert!(!text.contains("resident_bytes"));
    }
}
