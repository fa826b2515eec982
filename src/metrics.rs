//! Counters every shard keeps, exported at `/metrics` in Prometheus text format.
//!
//! Each shard writes only its own [`ShardMetrics`] (relaxed atomics, so a write
//! is a plain add on x86 and never contends); any shard may read all of them to
//! answer a scrape. This is observation, not coordination: no decision is made
//! from another shard's counters, with one exception: a session pauses reading
//! its socket while the `commit_pending` gauge of its conversation's shard is
//! above `[limits] max_pending_commits` (a relaxed read; a stale value only
//! delays the pause or the resume by a moment).
//!
//! Besides the counters, each shard keeps one [`LatencyHistogram`]: how long each
//! storage operation (a message append, a state change) waited from being queued
//! to its group commit finishing, which is the server's part of the time before a
//! message is acked and relayed. It is exported as the Prometheus histogram
//! `switchboard_commit_latency_seconds` (fixed buckets, cumulative), from which
//! the admin pages chart the p99.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident : $kind:literal),* $(,)?) => {
        /// One shard's counters.
        #[derive(Default, Debug)]
        pub struct ShardMetrics {
            $($(#[doc = $doc])* pub $name: AtomicU64,)*
        }

        impl ShardMetrics {
            fn fields(&self) -> impl Iterator<Item = (&'static str, &'static str, &'static str, u64)> + '_ {
                [$((stringify!($name), $kind, concat!($($doc),*), self.$name.load(Ordering::Relaxed))),*].into_iter()
            }
        }
    };
}

counters! {
    /// TCP connections accepted.
    connections_accepted: "counter",
    /// WebSocket handshakes completed.
    handshakes_completed: "counter",
    /// Requests answered with an HTTP error (400, 404, 405, 426, 431, ...).
    http_errors: "counter",
    /// Connections that did not send a complete request head in time.
    handshake_timeouts: "counter",
    /// WebSocket sessions open now.
    sessions_open: "gauge",
    /// Visitor sessions (`/ws/visitor`) open now.
    visitor_sessions_open: "gauge",
    /// Agent console sessions (`/ws/agent`) open now.
    agent_sessions_open: "gauge",
    /// WebSocket data messages received.
    messages_received: "counter",
    /// WebSocket data messages sent.
    messages_sent: "counter",
    /// Sessions closed because of a protocol error sent by the peer.
    protocol_errors: "counter",
    /// Sessions closed because they stayed silent past the idle timeout.
    idle_timeouts: "counter",
    /// Spare I/O buffers pooled now.
    pooled_buffers: "gauge",
    /// Answers the bot gave (knowledge-base answers and fallbacks).
    bot_replies: "counter",
    /// Bot answers matched lexically because inference was overloaded.
    bot_degraded: "counter",
    /// Conversations the bot handed to the human queue.
    bot_handoffs: "counter",
    /// Visitor messages refused by risk control.
    bot_blocked: "counter",
    /// Recognitions answered from the hot-query cache.
    bot_hot_cache_hits: "counter",
    /// Recognitions that reused a cached embedding.
    bot_embedding_cache_hits: "counter",
    /// Recognitions that needed the model (or the lexical fallback).
    bot_cache_misses: "counter",
    /// Storage group commits (LMDB write transactions) completed.
    store_commits: "counter",
    /// Operations (message appends, state changes, ...) written by those commits.
    store_commit_ops: "counter",
    /// Microseconds spent in group commits, fsync included (divide by store_commits for the mean).
    store_commit_micros: "counter",
    /// Connections closed at accept because the peer is on the blocklist.
    admission_blocked: "counter",
    /// Connections answered 429 at accept (too many new connections from the IP).
    admission_rate_limited: "counter",
    /// Upgrades refused because the shard is at the refuse level (503 or close 1013).
    admission_overloaded: "counter",
    /// Frames refused with `rate_limited` (message or frame budget of a session spent).
    frames_rate_limited: "counter",
    /// Sessions closed with 1008 because their refused frames passed the abuse limit.
    abuse_closes: "counter",
    /// Times a session stopped reading its socket because the queues toward its owner were full.
    backpressure_pauses: "counter",
    /// Bot queries answered lexically because the site's bot-query rate was spent.
    bot_rate_limited: "counter",
    /// Typing indicators not relayed because the shard was shedding load.
    typing_shed: "counter",
    /// Hostile-input log lines suppressed by the per-shard log rate.
    hostile_log_suppressed: "counter",
    /// Storage operations waiting for a group commit now.
    commit_pending: "gauge",
    /// Recent mean duration of one group commit in microseconds (feeds message shedding).
    commit_recent_micros: "gauge",
    /// Visitor messages refused with `overloaded` (predicted wait over the latency budget).
    messages_overloaded: "counter",
    /// Messages waiting for the mesh, toward all shards, now.
    mesh_queued: "gauge",
    /// Event-loop lag of the last sample, in microseconds.
    event_loop_lag_micros: "gauge",
    /// Load level now: 0 normal, 1 shed, 2 refuse.
    degrade_level: "gauge",
    /// Load-level changes (each logged).
    degrade_transitions: "counter",
    /// TLS handshakes completed on the TLS listener.
    tls_handshakes_completed: "counter",
    /// TLS handshakes that failed or timed out (bad client hello, protocol version, ALPN, ...).
    tls_handshake_failures: "counter",
}

impl ShardMetrics {
    pub fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }

    pub fn set(gauge: &AtomicU64, value: u64) {
        gauge.store(value, Ordering::Relaxed);
    }
}

/// Upper bounds of the [`LatencyHistogram`] buckets, in microseconds (+Inf is implied).
pub const LATENCY_BUCKETS_MICROS: [u64; 14] = [
    250, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000,
    2_000_000, 5_000_000,
];

/// One shard's latency histogram: a count per bucket (not cumulative; the
/// rendering accumulates), the observation count and the sum in microseconds.
/// Written only by its shard, with relaxed adds like the counters.
#[derive(Default, Debug)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS_MICROS.len() + 1],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl LatencyHistogram {
    /// Records one observation of `micros`.
    pub fn observe(&self, micros: u64) {
        let index = LATENCY_BUCKETS_MICROS
            .iter()
            .position(|&bound| micros <= bound)
            .unwrap_or(LATENCY_BUCKETS_MICROS.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

/// All shards' counters, shared read-only between shards.
#[derive(Clone, Debug)]
pub struct Metrics {
    shards: Arc<[ShardMetrics]>,
    commit_latency: Arc<[LatencyHistogram]>,
    process: Arc<ProcessMetrics>,
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

impl Metrics {
    pub fn new(shard_count: usize) -> Self {
        Self {
            shards: (0..shard_count).map(|_| ShardMetrics::default()).collect(),
            commit_latency: (0..shard_count)
                .map(|_| LatencyHistogram::default())
                .collect(),
            process: Arc::default(),
        }
    }

    /// The counters of shard `index`.
    pub fn shard(&self, index: usize) -> &ShardMetrics {
        &self.shards[index]
    }

    /// Shard `index`'s histogram of storage operations' queued-to-committed time.
    pub fn commit_latency(&self, index: usize) -> &LatencyHistogram {
        &self.commit_latency[index]
    }

    /// The process-wide counters.
    pub fn process(&self) -> &ProcessMetrics {
        &self.process
    }

    /// Renders every counter, per shard and summed, in Prometheus text format.
    pub fn render(&self, extra: &[(&str, &str, u64)]) -> String {
        let mut text = String::new();
        let Some(first) = self.shards.first() else {
            return text;
        };
        let names: Vec<_> = first.fields().map(|(n, k, d, _)| (n, k, d)).collect();
        for (position, (name, kind, doc)) in names.iter().enumerate() {
            let _ = writeln!(text, "# HELP switchboard_{name} {doc}");
            let _ = writeln!(text, "# TYPE switchboard_{name} {kind}");
            for (shard, metrics) in self.shards.iter().enumerate() {
                let value = metrics.fields().nth(position).map_or(0, |f| f.3);
                let _ = writeln!(text, "switchboard_{name}{{shard=\"{shard}\"}} {value}");
            }
        }
        let name = "commit_latency_seconds";
        let _ = writeln!(
            text,
            "# HELP switchboard_{name} Time a storage operation (message append, state change) waited from queued to its group commit done, fsync included."
        );
        let _ = writeln!(text, "# TYPE switchboard_{name} histogram");
        for (shard, histogram) in self.commit_latency.iter().enumerate() {
            let mut cumulative = 0;
            for (index, bucket) in histogram.buckets.iter().enumerate() {
                cumulative += bucket.load(Ordering::Relaxed);
                let le = LATENCY_BUCKETS_MICROS
                    .get(index)
                    .map_or_else(|| "+Inf".to_string(), |&micros| seconds(micros));
                let _ = writeln!(
                    text,
                    "switchboard_{name}_bucket{{shard=\"{shard}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let sum = seconds(histogram.sum_micros.load(Ordering::Relaxed));
            let count = histogram.count.load(Ordering::Relaxed);
            let _ = writeln!(text, "switchboard_{name}_sum{{shard=\"{shard}\"}} {sum}");
            let _ = writeln!(
                text,
                "switchboard_{name}_count{{shard=\"{shard}\"}} {count}"
            );
        }
        for (name, doc, counter) in [
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
            let _ = writeln!(text, "# HELP switchboard_{name} {doc}");
            let _ = writeln!(text, "# TYPE switchboard_{name} counter");
            let _ = writeln!(
                text,
                "switchboard_{name} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        for (name, doc, value) in extra {
            let _ = writeln!(text, "# HELP switchboard_{name} {doc}");
            let _ = writeln!(text, "# TYPE switchboard_{name} gauge");
            let _ = writeln!(text, "switchboard_{name} {value}");
        }
        text
    }
}

/// Microseconds as decimal seconds, exactly (`1500` → `0.0015`).
fn seconds(micros: u64) -> String {
    let fraction = format!("{:06}", micros % 1_000_000);
    let fraction = fraction.trim_end_matches('0');
    if fraction.is_empty() {
        format!("{}", micros / 1_000_000)
    } else {
        format!("{}.{fraction}", micros / 1_000_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_per_shard_values() {
        let metrics = Metrics::new(2);
        ShardMetrics::add(&metrics.shard(1).connections_accepted, 3);
        let text = metrics.render(&[("resident_bytes", "RSS", 42)]);
        assert!(text.contains("switchboard_connections_accepted{shard=\"1\"} 3"));
        assert!(text.contains("switchboard_connections_accepted{shard=\"0\"} 0"));
        assert!(text.contains("# TYPE switchboard_sessions_open gauge"));
        assert!(text.contains("switchboard_resident_bytes 42"));
    }

    #[test]
    fn commit_latency_renders_as_a_cumulative_histogram() {
        let metrics = Metrics::new(2);
        let histogram = metrics.commit_latency(1);
        for micros in [100, 250, 251, 1_500, 9_000_000] {
            histogram.observe(micros);
        }
        let text = metrics.render(&[]);
        assert!(text.contains("# TYPE switchboard_commit_latency_seconds histogram"));
        for line in [
            r#"switchboard_commit_latency_seconds_bucket{shard="1",le="0.00025"} 2"#,
            r#"switchboard_commit_latency_seconds_bucket{shard="1",le="0.0005"} 3"#,
            r#"switchboard_commit_latency_seconds_bucket{shard="1",le="0.002"} 4"#,
            r#"switchboard_commit_latency_seconds_bucket{shard="1",le="5"} 4"#,
            r#"switchboard_commit_latency_seconds_bucket{shard="1",le="+Inf"} 5"#,
            r#"switchboard_commit_latency_seconds_count{shard="1"} 5"#,
            r#"switchboard_commit_latency_seconds_sum{shard="1"} 9.002101"#,
            r#"switchboard_commit_latency_seconds_bucket{shard="0",le="+Inf"} 0"#,
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }
}
