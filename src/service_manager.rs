//! systemd integration through the notify protocol (`sd_notify(3)`, `Type=notify` units):
//! `READY=1`, `WATCHDOG=1`, `STATUS=` and `STOPPING=1`.
//!
//! [`ServiceManager::from_env`] is `None` without `NOTIFY_SOCKET` (not started by systemd with
//! `Type=notify`, or by hand): then nothing here runs and nothing is sent. Otherwise
//! [`ServiceManager::spawn`] starts one thread, `switchboard-notify`, which every tick reads the
//! shards' [`Liveness`] slots and the session gauges and
//! - sends `READY=1` once, when every shard listens and its inference worker's primary model has
//!   settled (loaded, failed and answering lexically, or none configured): the models load in
//!   the background after the listeners are up, and dependants should not start before the bot
//!   answers from its model;
//! - with a watchdog (`WatchdogSec=` sets `WATCHDOG_USEC`), from `READY=1` on (when systemd
//!   arms it) sends `WATCHDOG=1` every half of `WATCHDOG_USEC`, but only while every shard's heartbeat is younger than that same half
//!   (`stale_after`). A shard whose event loop is stuck (a blocking call, a busy loop) or whose
//!   thread is gone stops beating, the pings stop, and systemd restarts the process
//!   `WATCHDOG_USEC` after the last one. The stale shard is logged (at most every
//!   [`STALE_LOG_EVERY`]), and the pings resume, logged, if it beats again in time;
//! - sends `STATUS=` with the shards and the open visitor and agent sessions when the text
//!   changed, at most every [`STATUS_EVERY`] (and at once with `READY=1`).
//!
//! [`notify_stopping`] sends `STOPPING=1` when draining starts (SIGTERM or SIGINT). From then on
//! the watchdog pings go on without the heartbeat check: shards end one by one while they drain,
//! and `TimeoutStopSec=` bounds a drain that hangs.
//!
//! Invariants: the decisions are made by [`Supervisor::tick`], a pure function of the time and
//! what the shards published, so every rule is tested without a socket; only the thread talks to
//! the socket (and [`notify_stopping`], from the signal thread). A failed send is logged (once
//! per kind of message) and never stops the process: systemd's own timeouts handle a lost
//! `READY=1` or lost pings.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::arena::SessionKind;
use crate::liveness::{all_started, stale_shards, Liveness, ModelState, ShardLiveness};
use crate::metrics::Metrics;

/// How often each shard beats without a watchdog (only `STATUS=` and `READY=1` read it then).
const BEAT_WITHOUT_WATCHDOG: Duration = Duration::from_secs(1);
/// The most often a changed `STATUS=` line is sent.
pub const STATUS_EVERY: Duration = Duration::from_secs(2);
/// The most often a stale shard is logged while it stays stale.
pub const STALE_LOG_EVERY: Duration = Duration::from_secs(10);
/// The longest the notify thread sleeps between two looks at the shards.
const MAX_TICK: Duration = Duration::from_millis(250);
/// The shortest tick, heartbeat interval and ping interval (a `WATCHDOG_USEC` of a few
/// milliseconds would otherwise spin).
const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// Why the notify thread did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceManagerError {
    #[error("cannot start the systemd notify thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// The watchdog's timing, derived from `WATCHDOG_USEC`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watchdog {
    /// `WATCHDOG_USEC`: systemd restarts the process when no ping came for this long.
    pub timeout: Duration,
    /// How often `WATCHDOG=1` is sent: half of `timeout` (as `sd_watchdog_enabled(3)` advises).
    pub ping_every: Duration,
    /// A shard whose last heartbeat is older than this stops the pings: half of `timeout`, so
    /// a stuck shard makes systemd restart the process within 1.5 × `timeout`.
    pub stale_after: Duration,
}

impl Watchdog {
    pub fn new(timeout: Duration) -> Watchdog {
        let half = (timeout / 2).max(MIN_INTERVAL);
        Watchdog {
            timeout,
            ping_every: half,
            stale_after: half,
        }
    }

    /// How often each shard beats: a quarter of `stale_after` (so a shard is stale only after
    /// missing four beats in a row), at most [`BEAT_WITHOUT_WATCHDOG`].
    pub fn beat_interval(&self) -> Duration {
        (self.stale_after / 4).clamp(MIN_INTERVAL, BEAT_WITHOUT_WATCHDOG)
    }
}

/// The service manager found in the environment.
#[derive(Debug)]
pub struct ServiceManager {
    watchdog: Option<Watchdog>,
}

impl ServiceManager {
    /// `None` without `NOTIFY_SOCKET`; the watchdog is on when `WATCHDOG_USEC` is set (and
    /// `WATCHDOG_PID`, if set, is this process).
    pub fn from_env() -> Option<ServiceManager> {
        std::env::var_os("NOTIFY_SOCKET")?;
        let watchdog = sd_notify::watchdog_enabled()
            .filter(|timeout| !timeout.is_zero())
            .map(Watchdog::new);
        Some(ServiceManager { watchdog })
    }

    pub fn watchdog(&self) -> Option<Watchdog> {
        self.watchdog
    }

    /// How often each shard's heartbeat task must beat.
    pub fn beat_interval(&self) -> Duration {
        self.watchdog
            .map_or(BEAT_WITHOUT_WATCHDOG, |watchdog| watchdog.beat_interval())
    }

    /// Starts the `switchboard-notify` thread (see the module documentation). It runs until
    /// the process exits.
    pub fn spawn(
        self,
        liveness: Arc<Liveness>,
        metrics: Metrics,
        shutdown: shards::Shutdown,
    ) -> Result<(), ServiceManagerError> {
        match self.watchdog {
            Some(watchdog) => tracing::info!(
                watchdog_ms = watchdog.timeout.as_millis() as u64,
                ping_every_ms = watchdog.ping_every.as_millis() as u64,
                stale_after_ms = watchdog.stale_after.as_millis() as u64,
                beat_ms = liveness.beat_interval().as_millis() as u64,
                "systemd notify socket and watchdog: READY=1 once every shard listens with its \
                 model settled; WATCHDOG=1 while every shard's heartbeat is fresh"
            ),
            None => tracing::info!(
                "systemd notify socket (no watchdog): READY=1 once every shard listens with its \
                 model settled"
            ),
        }
        let tick = self.watchdog.map_or(MAX_TICK, |watchdog| {
            (watchdog.ping_every / 8).clamp(MIN_INTERVAL, MAX_TICK)
        });
        let mut supervisor = Supervisor::new(self.watchdog);
        let mut sender = Sender::default();
        std::thread::Builder::new()
            .name("switchboard-notify".into())
            .spawn(move || loop {
                let now = Instant::now();
                let observation = Observation {
                    shards: liveness.snapshot(now),
                    sessions: Sessions::of(&metrics, liveness.shard_count()),
                    stopping: shutdown.is_triggered(),
                };
                let step = supervisor.tick(now, &observation);
                sender.carry_out(&step, &observation);
                std::thread::sleep(tick);
            })
            .map(drop)
            .map_err(ServiceManagerError::Spawn)
    }
}

/// Sends `STOPPING=1` (with a `STATUS=` saying so): draining has started. A no-op without
/// `NOTIFY_SOCKET`. Called from the signal thread right after it asks the shards to stop.
pub fn notify_stopping() {
    match sd_notify::notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: draining sessions"),
    ]) {
        Ok(()) => tracing::info!("told the service manager STOPPING=1"),
        Err(error) => tracing::warn!(%error, "cannot send STOPPING=1 to the service manager"),
    }
}

/// Open sessions, summed over the shards' gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sessions {
    pub visitors: u64,
    pub agents: u64,
}

impl Sessions {
    fn of(metrics: &Metrics, shards: usize) -> Sessions {
        use std::sync::atomic::Ordering::Relaxed;
        (0..shards)
            .map(|shard| metrics.shard(shard))
            .fold(Sessions::default(), |sum, shard| Sessions {
                visitors: sum.visitors
                    + shard.sessions_by_kind[SessionKind::Visitor.index()].load(Relaxed),
                agents: sum.agents
                    + shard.sessions_by_kind[SessionKind::Agent.index()].load(Relaxed),
            })
    }
}

/// What the notify thread saw at one tick.
#[derive(Clone, Debug)]
pub struct Observation {
    pub shards: Vec<ShardLiveness>,
    pub sessions: Sessions,
    /// A stop was asked for (SIGTERM, SIGINT): the shards are draining.
    pub stopping: bool,
}

/// What to do after one tick: the messages for the service manager and what to log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    pub ready: bool,
    pub watchdog: bool,
    pub status: Option<String>,
    /// Shards whose heartbeat is stale (with the time since their last beat), to log now.
    pub log_stale: Vec<(usize, Option<Duration>)>,
    /// Every shard beats again after some were stale: the pings resume.
    pub log_recovered: bool,
}

/// The notify thread's state and rules (see the module documentation).
#[derive(Debug)]
pub struct Supervisor {
    watchdog: Option<Watchdog>,
    ready_sent: bool,
    last_ping: Option<Instant>,
    last_status: Option<(Instant, String)>,
    /// When the stale shards were last logged, while some are stale.
    stale_logged: Option<Instant>,
}

impl Supervisor {
    pub fn new(watchdog: Option<Watchdog>) -> Supervisor {
        Supervisor {
            watchdog,
            ready_sent: false,
            last_ping: None,
            last_status: None,
            stale_logged: None,
        }
    }

    /// Decides what to send and log at `now`.
    pub fn tick(&mut self, now: Instant, seen: &Observation) -> Step {
        let mut step = Step::default();
        if !self.ready_sent && !seen.stopping && all_started(&seen.shards) {
            self.ready_sent = true;
            step.ready = true;
        }
        let mut stale = Vec::new();
        // systemd arms the watchdog when start-up completes (READY=1), so the pings start then.
        let armed = self.ready_sent || seen.stopping;
        if let Some(watchdog) = self.watchdog.filter(|_| armed) {
            if !seen.stopping {
                stale = stale_shards(&seen.shards, watchdog.stale_after);
            }
            if stale.is_empty() {
                if self.stale_logged.take().is_some() {
                    step.log_recovered = true;
                }
                let due = self.last_ping.is_none_or(|last| {
                    step.log_recovered || now.duration_since(last) >= watchdog.ping_every
                });
                if due {
                    self.last_ping = Some(now);
                    step.watchdog = true;
                }
            } else if self
                .stale_logged
                .is_none_or(|logged| now.duration_since(logged) >= STALE_LOG_EVERY)
            {
                self.stale_logged = Some(now);
                step.log_stale = stale.clone();
            }
        }
        let text = status_text(self.ready_sent, seen, &stale);
        let changed = self
            .last_status
            .as_ref()
            .is_none_or(|(_, last)| *last != text);
        let allowed = step.ready
            || self
                .last_status
                .as_ref()
                .is_none_or(|(at, _)| now.duration_since(*at) >= STATUS_EVERY);
        if changed && allowed {
            self.last_status = Some((now, text.clone()));
            step.status = Some(text);
        }
        step
    }
}

/// The `STATUS=` text: "2 shards, 153 visitor sessions, 4 agent sessions", with what is wrong
/// or still starting.
pub fn status_text(
    started: bool,
    seen: &Observation,
    stale: &[(usize, Option<Duration>)],
) -> String {
    let shards = seen.shards.len();
    let sessions = format!(
        "{}, {}",
        counted(seen.sessions.visitors as usize, "visitor session"),
        counted(seen.sessions.agents as usize, "agent session")
    );
    if seen.stopping {
        return format!("stopping: draining {sessions}");
    }
    if !started {
        let listening = seen.shards.iter().filter(|s| s.listening).count();
        let loading = seen
            .shards
            .iter()
            .filter(|s| s.model == ModelState::Loading)
            .count();
        return format!(
            "starting: {listening} of {} listening, {} loading",
            counted(shards, "shard"),
            counted(loading, "model")
        );
    }
    let mut text = format!("{}, {sessions}", counted(shards, "shard"));
    let failed: Vec<String> = seen
        .shards
        .iter()
        .enumerate()
        .filter(|(_, s)| s.model == ModelState::Failed)
        .map(|(index, _)| index.to_string())
        .collect();
    if !failed.is_empty() {
        text.push_str(&format!(
            "; model failed to load on shard {}: lexical answers",
            failed.join(", ")
        ));
    }
    for (shard, since) in stale {
        match since {
            Some(since) => text.push_str(&format!(
                "; shard {shard} unresponsive for {:.1} s, watchdog paused",
                since.as_secs_f64()
            )),
            None => text.push_str(&format!("; shard {shard} never beat, watchdog paused")),
        }
    }
    text
}

fn counted(count: usize, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// Sends a [`Step`]'s messages in one datagram and writes its log lines.
#[derive(Debug, Default)]
struct Sender {
    /// A send already failed (logged once; later failures are not).
    failed: bool,
}

impl Sender {
    fn carry_out(&mut self, step: &Step, seen: &Observation) {
        for (shard, since) in &step.log_stale {
            tracing::error!(
                shard,
                since_beat_ms = since.map(|since| since.as_millis() as u64),
                "shard {shard}'s heartbeat is stale: its event loop is stuck or gone; \
                 watchdog pings to systemd paused (it restarts the process when the watchdog \
                 timeout passes without one)"
            );
        }
        if step.log_recovered {
            tracing::warn!("every shard's heartbeat is fresh again: watchdog pings resumed");
        }
        let mut states = Vec::with_capacity(3);
        if step.ready {
            states.push(NotifyState::Ready);
        }
        if step.watchdog {
            states.push(NotifyState::Watchdog);
        }
        if let Some(status) = &step.status {
            states.push(NotifyState::Status(status));
        }
        if states.is_empty() {
            return;
        }
        match sd_notify::notify(&states) {
            Ok(()) => {
                if step.ready {
                    tracing::info!(
                        shards = seen.shards.len(),
                        "told the service manager READY=1: every shard listens and its model \
                         has settled"
                    );
                }
            }
            Err(error) => {
                if !std::mem::replace(&mut self.failed, true) {
                    tracing::warn!(%error, "cannot notify the service manager (NOTIFY_SOCKET)");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(since_beat_ms: u64, model: ModelState) -> ShardLiveness {
        ShardLiveness {
            since_beat: Some(Duration::from_millis(since_beat_ms)),
            listening: true,
            model,
            finished: false,
        }
    }

    fn seen(shards: Vec<ShardLiveness>) -> Observation {
        Observation {
            shards,
            sessions: Sessions {
                visitors: 153,
                agents: 4,
            },
            stopping: false,
        }
    }

    #[test]
    fn the_watchdog_derives_its_timing_from_watchdog_usec() {
        let watchdog = Watchdog::new(Duration::from_secs(10));
        assert_eq!(watchdog.ping_every, Duration::from_secs(5));
        assert_eq!(watchdog.stale_after, Duration::from_secs(5));
        assert_eq!(watchdog.beat_interval(), Duration::from_secs(1));
        let short = Watchdog::new(Duration::from_secs(2));
        assert_eq!(short.beat_interval(), Duration::from_millis(250));
        let silly = Watchdog::new(Duration::from_micros(3));
        assert_eq!(silly.ping_every, MIN_INTERVAL);
        assert_eq!(silly.beat_interval(), MIN_INTERVAL);
    }

    #[test]
    fn ready_waits_for_every_model_and_comes_once() {
        let mut supervisor = Supervisor::new(None);
        let t0 = Instant::now();
        let loading = seen(vec![
            shard(0, ModelState::Ready),
            shard(0, ModelState::Loading),
        ]);
        let step = supervisor.tick(t0, &loading);
        assert!(!step.ready);
        assert_eq!(
            step.status.as_deref(),
            Some("starting: 2 of 2 shards listening, 1 model loading")
        );
        let ready = seen(vec![
            shard(0, ModelState::Ready),
            shard(0, ModelState::Ready),
        ]);
        let step = supervisor.tick(t0 + Duration::from_millis(10), &ready);
        assert!(step.ready, "READY=1 once both models are ready");
        assert_eq!(
            step.status.as_deref(),
            Some("2 shards, 153 visitor sessions, 4 agent sessions"),
            "the status goes with READY=1 at once"
        );
        let step = supervisor.tick(t0 + Duration::from_secs(5), &ready);
        assert!(!step.ready, "READY=1 is sent once");
        assert_eq!(step.status, None, "an unchanged status is not sent again");
    }

    #[test]
    fn pings_stop_while_a_shard_is_stale_and_resume_when_it_beats() {
        let watchdog = Watchdog::new(Duration::from_secs(4));
        let mut supervisor = Supervisor::new(Some(watchdog));
        let t0 = Instant::now();
        let fresh = seen(vec![
            shard(100, ModelState::NotConfigured),
            shard(100, ModelState::NotConfigured),
        ]);
        let step = supervisor.tick(t0, &fresh);
        assert!(step.ready && step.watchdog);
        let at = |ms| t0 + Duration::from_millis(ms);
        assert!(
            !supervisor.tick(at(1000), &fresh).watchdog,
            "not before ping_every"
        );
        assert!(supervisor.tick(at(2000), &fresh).watchdog);
        let stuck = seen(vec![
            shard(100, ModelState::NotConfigured),
            shard(2100, ModelState::NotConfigured),
        ]);
        let step = supervisor.tick(at(4000), &stuck);
        assert!(!step.watchdog, "a stale shard stops the pings");
        assert_eq!(step.log_stale, vec![(1, Some(Duration::from_millis(2100)))]);
        assert!(step
            .status
            .unwrap()
            .contains("shard 1 unresponsive for 2.1 s, watchdog paused"));
        let step = supervisor.tick(at(6000), &stuck);
        assert!(!step.watchdog);
        assert!(
            step.log_stale.is_empty(),
            "the stale shard is logged at most every 10 s"
        );
        assert_eq!(supervisor.tick(at(14_000), &stuck).log_stale.len(), 1);
        let step = supervisor.tick(at(14_100), &fresh);
        assert!(step.watchdog && step.log_recovered, "pings resume at once");
        assert!(!supervisor.tick(at(15_000), &fresh).watchdog);
    }

    #[test]
    fn after_stop_the_pings_go_on_without_the_heartbeat_check() {
        let mut supervisor = Supervisor::new(Some(Watchdog::new(Duration::from_secs(4))));
        let t0 = Instant::now();
        let mut draining = seen(vec![shard(60_000, ModelState::Ready)]);
        draining.stopping = true;
        let step = supervisor.tick(t0, &draining);
        assert!(step.watchdog && !step.ready);
        assert_eq!(
            step.status.as_deref(),
            Some("stopping: draining 153 visitor sessions, 4 agent sessions")
        );
    }

    #[test]
    fn no_ping_and_no_stale_shard_before_start_up_completes() {
        let mut supervisor = Supervisor::new(Some(Watchdog::new(Duration::from_secs(4))));
        let t0 = Instant::now();
        let starting = seen(vec![ShardLiveness {
            since_beat: None,
            listening: false,
            model: ModelState::Loading,
            finished: false,
        }]);
        let step = supervisor.tick(t0, &starting);
        assert!(!step.watchdog && !step.ready && step.log_stale.is_empty());
        let loading = seen(vec![shard(0, ModelState::Loading)]);
        let step = supervisor.tick(t0 + Duration::from_secs(3), &loading);
        assert!(!step.watchdog, "the watchdog is armed by READY=1");
        let step = supervisor.tick(
            t0 + Duration::from_secs(4),
            &seen(vec![shard(0, ModelState::Ready)]),
        );
        assert!(step.ready && step.watchdog);
    }

    #[test]
    fn a_failed_model_shows_in_the_status() {
        let observation = seen(vec![
            shard(0, ModelState::Failed),
            shard(0, ModelState::Ready),
        ]);
        assert_eq!(
            status_text(true, &observation, &[]),
            "2 shards, 153 visitor sessions, 4 agent sessions; model failed to load on shard 0: \
             lexical answers"
        );
        let one = Observation {
            shards: vec![shard(0, ModelState::Ready)],
            sessions: Sessions {
                visitors: 1,
                agents: 0,
            },
            stopping: false,
        };
        assert_eq!(
            status_text(true, &one, &[]),
            "1 shard, 1 visitor session, 0 agent sessions"
        );
    }
}
