//! The shard-local driver of admission control (the pure rules are in [`crate::admission`]):
//! the accept-time check, the 429 answer written without reading the request, the
//! blocklist poller, the load sampler feeding the degradation controller, and the
//! rate-limited hostile-input log.
//!
//! Invariants: everything runs on the shard's thread; one sampler and one poller task per
//! shard; nothing here holds memory per session.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use super::Shard;
use crate::admission::{
    blocklist, degrade::Controller, shed, AcceptDecision, AcceptGate, Blocklist, Level, LogGate,
    Sample, SessionRates, Thresholds,
};
use crate::audit::AuditEvent;
use crate::config::Config;
use crate::metrics::ShardMetrics;
use crate::ratelimit::{Rate, RetryAfter, TokenBucket};

/// How often the sampler measures the event-loop lag and the queues.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// The process's monotonic clock, shared by every shard, from when the first shard started its
/// load sampler: the sampler stamps its samples with it and another shard reads their age with
/// it ([`shed::LagSamples`]).
pub fn process_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The lag samples a shard published (`published`: its metrics), as of `now_ms`
/// ([`process_ms`]); see [`shed::LagSamples`].
pub fn lag_samples(published: &ShardMetrics, now_ms: u64) -> shed::LagSamples {
    // A shard that has not started its sampler counts as sampled at the epoch: not serving.
    // The loads go timestamp, last, previous (the reverse of the sampler's stores), so a pair
    // is always two real consecutive samples or the last one twice.
    let sampled_ms = published.event_loop_sampled_ms.load(Ordering::Relaxed);
    shed::LagSamples {
        last_micros: published.event_loop_lag_micros.load(Ordering::Relaxed),
        previous_micros: published
            .event_loop_lag_previous_micros
            .load(Ordering::Relaxed),
        age_micros: now_ms.saturating_sub(sampled_ms).saturating_mul(1000),
        interval_micros: SAMPLE_INTERVAL.as_micros() as u64,
    }
}

/// How long a refused connection may keep sending before it is dropped (its request is
/// discarded unread so that closing does not reset the connection before the answer arrives).
const REFUSAL_LINGER: Duration = Duration::from_millis(500);

/// A shard's admission state.
pub struct Admission {
    gate: RefCell<AcceptGate>,
    log: RefCell<LogGate>,
    pub visitor_rates: Cell<SessionRates>,
    pub agent_rates: Cell<SessionRates>,
    blocklist_path: Option<PathBuf>,
    blocklist_mtime: Cell<Option<SystemTime>>,
    /// The shard's rated capacity for visitor chat messages (`[limits]
    /// shard_messages_per_second`), shared by all its connections.
    message_capacity: Cell<Rate>,
    message_bucket: RefCell<TokenBucket>,
    started: Instant,
}

impl Admission {
    /// Starts from the blocklist main loaded (`None`: no blocklist file). The poller compares
    /// the file's time with the time main read before its load, so a change made while the
    /// shards were starting is reloaded and audited like any other, against the list in force.
    pub fn new(config: &Config, checked: Option<super::CheckedBlocklist>) -> Admission {
        let limits = &config.limits;
        let path = limits.blocklist_file.clone();
        let (list, mtime) = match checked {
            Some(checked) => (checked.list, checked.mtime),
            None => (Blocklist::default(), None),
        };
        let abuse_limit = config.conversations.abuse_limit;
        let message_capacity = Rate::new(
            limits.shard_messages_per_second,
            f64::from(limits.shard_message_burst.max(1)),
        );
        Admission {
            message_capacity: Cell::new(message_capacity),
            message_bucket: RefCell::new(TokenBucket::full(message_capacity, 0)),
            gate: RefCell::new(AcceptGate::new(limits, list)),
            log: RefCell::new(LogGate::new(limits.log_lines_per_second, 0)),
            visitor_rates: Cell::new(SessionRates::visitor(limits, abuse_limit)),
            agent_rates: Cell::new(SessionRates::agent(limits, abuse_limit)),
            blocklist_path: path,
            blocklist_mtime: Cell::new(mtime),
            started: Instant::now(),
        }
    }

    /// Takes one visitor chat message from the shard's rated capacity, or says when to
    /// re-send it (at least [`shed::MIN_RETRY_MS`], so refused clients do not spin).
    pub fn take_message_capacity(&self) -> Result<(), RetryAfter> {
        let now = self.now_ms();
        self.message_bucket
            .borrow_mut()
            .try_take(self.message_capacity.get(), now, 1.0)
            .map_err(|retry| RetryAfter {
                ms: retry.ms.max(shed::MIN_RETRY_MS),
            })
    }

    /// Takes the `[limits]` of a reloaded configuration: session rates (open sessions too, from
    /// their next frame), the shard's message capacity, the per-IP connection rate (its buckets
    /// start full again; the blocklist stays) and the hostile-input log rate.
    pub fn apply(&self, config: &Config) {
        let limits = &config.limits;
        let abuse_limit = config.conversations.abuse_limit;
        self.visitor_rates
            .set(SessionRates::visitor(limits, abuse_limit));
        self.agent_rates
            .set(SessionRates::agent(limits, abuse_limit));
        let capacity = Rate::new(
            limits.shard_messages_per_second,
            f64::from(limits.shard_message_burst.max(1)),
        );
        self.message_capacity.set(capacity);
        *self.message_bucket.borrow_mut() = TokenBucket::full(capacity, self.now_ms());
        self.gate.borrow_mut().set_limits(limits);
        *self.log.borrow_mut() = LogGate::new(limits.log_lines_per_second, self.now_ms());
    }

    /// Milliseconds on the shard's monotonic clock (the limiters' time base).
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// Logs one piece of hostile input (a refused upgrade or connection, a protocol-error close)
/// at info level with the peer address, at most `[limits] log_lines_per_second` per shard.
pub fn hostile(shard: &Shard, peer: Option<SocketAddr>, what: &str, detail: &str) {
    let admitted = shard
        .admission
        .log
        .borrow_mut()
        .admit(shard.admission.now_ms());
    match admitted {
        Some(suppressed) => {
            let peer = peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
            tracing::info!(shard = shard.id.0, %peer, what, detail, suppressed, "hostile input");
        }
        None => ShardMetrics::add(&shard.counters().hostile_log_suppressed, 1),
    }
}

/// Decides about a freshly accepted connection; `Some(peer)` if it is to be served.
/// Refused connections are answered here (blocked: closed at once; rate-limited: 429).
///
/// `plain` says whether the listener speaks HTTP in the clear: a TLS client over its rate
/// cannot read a plain 429 before its handshake, so it is closed at once instead.
pub fn on_accept(
    shard: &Rc<Shard>,
    stream: TcpStream,
    plain: bool,
) -> Option<(TcpStream, Option<SocketAddr>)> {
    let peer = stream.peer_addr().ok();
    let Some(ip) = peer.map(|p| p.ip()) else {
        return Some((stream, peer));
    };
    let decision = shard
        .admission
        .gate
        .borrow_mut()
        .check(ip, shard.admission.now_ms());
    match decision {
        AcceptDecision::Admit => Some((stream, peer)),
        AcceptDecision::Blocked => {
            ShardMetrics::add(&shard.counters().admission_blocked, 1);
            hostile(
                shard,
                peer,
                "blocked",
                "peer is on the blocklist; closed at accept",
            );
            drop(stream);
            None
        }
        AcceptDecision::RateLimited(retry) => {
            ShardMetrics::add(&shard.counters().admission_rate_limited, 1);
            hostile(
                shard,
                peer,
                "429",
                "too many new connections from this address",
            );
            if !plain {
                drop(stream);
                return None;
            }
            let response = crate::admission::refusal_response(
                429,
                retry,
                "too many new connections from this address\n",
            );
            glommio::spawn_local(refuse(stream, response)).detach();
            None
        }
    }
}

/// Writes `response` without reading the request, then closes, discarding (never parsing)
/// whatever the client sends meanwhile for a short while so the close does not reset the
/// connection before the client has read the answer.
pub async fn refuse(mut stream: TcpStream, response: Vec<u8>) {
    let _ = stream.set_write_timeout(Some(REFUSAL_LINGER));
    if stream.write_all(&response).await.is_err() {
        return;
    }
    let _ = stream.shutdown(std::net::Shutdown::Write).await;
    let mut sink = [0u8; 512];
    let _ = futures_lite::future::or(
        async {
            let mut discarded = 0usize;
            while discarded < 64 * 1024 {
                match stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(read) => discarded += read,
                }
            }
        },
        glommio::timer::sleep(REFUSAL_LINGER),
    )
    .await;
}

/// The 503 an upgrade gets while the shard refuses new sessions.
pub fn overload_response() -> Vec<u8> {
    crate::admission::refusal_response(
        503,
        RetryAfter { ms: 5000 },
        "the server is overloaded; retry later\n",
    )
}

/// Starts the shard's blocklist poller and load sampler.
pub fn start(shard: &Rc<Shard>) -> Vec<glommio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    if let Some(path) = shard.admission.blocklist_path.clone() {
        let poller = shard.clone();
        let every = shard.config().limits.blocklist_poll;
        tasks.push(
            glommio::spawn_local(async move {
                loop {
                    glommio::timer::sleep(every).await;
                    poll_blocklist(&poller, &path);
                }
            })
            .detach(),
        );
    }
    let sampler = shard.clone();
    // Starts the clock the samples are stamped with, if no shard has yet, and counts this
    // shard as sampled now: until its first sample it is measured from its own start, not
    // from the first shard's (shards open their stores at different speeds).
    ShardMetrics::set(&shard.counters().event_loop_sampled_ms, process_ms());
    tasks.push(glommio::spawn_local(async move { sample_load(&sampler).await }).detach());
    tasks
}

/// Reloads the blocklist when its modification time changed; a bad file keeps the old list.
fn poll_blocklist(shard: &Shard, path: &std::path::Path) {
    let mtime = blocklist::modified(path);
    if mtime == shard.admission.blocklist_mtime.get() {
        return;
    }
    shard.admission.blocklist_mtime.set(mtime);
    // Every shard reloads the same file; shard 0 alone records it in the audit chain.
    let audited = shard.id.0 == 0;
    match Blocklist::load(path) {
        Ok(list) => {
            tracing::info!(
                shard = shard.id.0,
                networks = list.len(),
                file = %path.display(),
                "blocklist reloaded"
            );
            let (added, removed) = shard.admission.gate.borrow().blocklist().changes(&list);
            if audited && (!added.is_empty() || !removed.is_empty()) {
                const SHOWN: usize = 50;
                crate::audit::emit(
                    AuditEvent::new("blocklist_changed", "system")
                        .target(path.display().to_string())
                        .detail("networks", list.len())
                        .detail("added_count", added.len())
                        .detail("removed_count", removed.len())
                        .detail("added", added.into_iter().take(SHOWN).collect::<Vec<_>>())
                        .detail(
                            "removed",
                            removed.into_iter().take(SHOWN).collect::<Vec<_>>(),
                        ),
                );
            }
            shard.admission.gate.borrow_mut().set_blocklist(list);
        }
        Err(err) => {
            let kept = shard.admission.gate.borrow().blocklist().len();
            tracing::error!(
                shard = shard.id.0,
                error = %err,
                kept_networks = kept,
                "blocklist not reloaded; the previous list stays in force"
            );
            if audited {
                crate::audit::emit(
                    AuditEvent::new("blocklist_reload_failed", "system")
                        .target(path.display().to_string())
                        .detail("error", err.to_string())
                        .detail("kept_networks", kept),
                );
            }
        }
    }
}

/// Measures the event-loop lag and the queues every [`SAMPLE_INTERVAL`] and runs the
/// degradation controller; logs and counts every level change.
async fn sample_load(shard: &Shard) {
    let thresholds = |config: &Config| {
        let limits = &config.limits;
        Thresholds {
            shed_lag_ms: limits.shed_lag.as_millis() as u64,
            refuse_lag_ms: limits.refuse_lag.as_millis() as u64,
            shed_queue: limits.shed_queue,
            refuse_queue: limits.refuse_queue,
            recover_after_ms: limits.recover_after.as_millis() as u64,
        }
    };
    let mut config = shard.config();
    let mut controller = Controller::new(thresholds(&config));
    let counters = shard.counters();
    loop {
        let now = shard.config();
        if !Arc::ptr_eq(&now, &config) {
            // A reload: the thresholds change, the level and its history stay.
            controller.set_thresholds(thresholds(&now));
            config = now;
        }
        let asleep = Instant::now();
        glommio::timer::sleep(SAMPLE_INTERVAL).await;
        let lag = asleep.elapsed().saturating_sub(SAMPLE_INTERVAL);
        let router = &shard.router;
        let mesh = router.queued_total();
        let sample = Sample {
            lag_ms: lag.as_millis() as u64,
            queue: mesh + router.pending_commits() + router.inference_queue(),
        };
        ShardMetrics::set(&counters.mesh_queued, mesh as u64);
        // The previous sample first: a reader between the two stores sees the last lag
        // twice, never a pair from different turns that would hide a sustained lag.
        let previous = counters.event_loop_lag_micros.load(Ordering::Relaxed);
        ShardMetrics::set(&counters.event_loop_lag_previous_micros, previous);
        ShardMetrics::set(&counters.event_loop_lag_micros, lag.as_micros() as u64);
        ShardMetrics::set(&counters.event_loop_sampled_ms, process_ms());
        if let Some(transition) = controller.observe(sample, shard.admission.now_ms()) {
            router.set_level(transition.to);
            ShardMetrics::set(&counters.degrade_level, transition.to as u64);
            ShardMetrics::add(&counters.degrade_transitions, 1);
            let (from, to) = (transition.from.as_str(), transition.to.as_str());
            if transition.to > transition.from {
                tracing::warn!(
                    shard = shard.id.0,
                    from,
                    to,
                    lag_ms = sample.lag_ms,
                    queued = sample.queue,
                    "load level raised"
                );
            } else {
                tracing::info!(
                    shard = shard.id.0,
                    from,
                    to,
                    lag_ms = sample.lag_ms,
                    queued = sample.queue,
                    "load level lowered"
                );
            }
        }
    }
}

/// Whether the shard refuses new sessions now.
pub fn refusing(shard: &Shard) -> bool {
    shard.router.level() >= Level::Refuse
}
