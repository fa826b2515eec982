//! `density`: open N idle visitor sessions at a fixed ramp rate (open loop: session i is attempted at
//! start + i/RATE whatever happened to the others), hold them idle, and read the server's RSS growth per
//! session; then close every session with a close handshake.
//!
//! Figures: sessions established, failures by reason, handshake rate, handshake latency (taken from the
//! scheduled attempt time), server RSS before/after/peak and growth per session, sessions the server dropped
//! during the hold, clean closes.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cli::DensityArgs;
use crate::progress::Bars;
use crate::report::Report;
use crate::runtime::{run_shards, sleep_until, Coordinator, Phase, Progress};
use crate::scenario::{bump, merge_tally, open_session, seed, Ctx, Tally};
use crate::stats::Latency;
use crate::wsclient::{Incoming, WsWriter};

#[derive(Debug, Clone)]
pub struct DensityPlan {
    pub sessions: u64,
    pub ramp: f64,
    pub hold: Duration,
    pub settle: Duration,
}

/// One shard's results.
#[derive(Debug, Default)]
struct ShardResult {
    established: u64,
    failures: Tally,
    dropped: Tally,
    clean_closes: u64,
    close_timeouts: u64,
    handshake: Latency,
    first_attempt: Option<Instant>,
    last_established: Option<Instant>,
}

#[derive(Default)]
struct ShardState {
    result: RefCell<ShardResult>,
    resolved: Cell<u64>,
    closing: Cell<bool>,
    writers: RefCell<Vec<WsWriter>>,
}

pub fn run(args: &DensityArgs) -> Result<Report, String> {
    let ctx = Arc::new(Ctx::new(&args.common)?);
    let plan = DensityPlan {
        sessions: args.sessions,
        ramp: args.ramp,
        hold: args.hold,
        settle: args.settle,
    };
    if plan.ramp <= 0.0 {
        return Err("--ramp must be positive".into());
    }
    let bars = Bars::new(ctx.progress);
    let mut report = ctx.report("density");
    report.settings = serde_json::json!({
        "sessions": plan.sessions, "ramp_per_s": plan.ramp, "hold_s": plan.hold.as_secs_f64(),
        "sources": ctx.sources, "handshake_timeout_s": ctx.handshake_timeout.as_secs_f64(),
    });

    std::thread::sleep(plan.settle);
    let rss_before = ctx.rss();
    let coord = Coordinator::new(ctx.shards);

    let connect_bar = bars.counter("connect", plan.sessions);
    let hold_bar = bars.timed("hold", plan.hold.as_secs_f64());
    let mut hold_started: Option<Instant> = None;
    let mut rss_after = None;
    let mut rss_peak = rss_before;
    let mut last_sample = Instant::now();

    let work = {
        let ctx = ctx.clone();
        let coord = coord.clone();
        let plan = plan.clone();
        move |shard| shard_main(shard, ctx.clone(), coord.clone(), plan.clone())
    };
    let monitor = || {
        let p = &coord.progress;
        connect_bar.set_position(Progress::get(&p.connected) + Progress::get(&p.failed));
        connect_bar.set_message(format!("failed {}", Progress::get(&p.failed)));
        if coord.all_arrived(Phase::SetUp) && !coord.is_released(Phase::SetUp) {
            coord.release(Phase::SetUp, Instant::now() + Duration::from_millis(20));
        }
        if coord.all_arrived(Phase::Loaded) && !coord.is_released(Phase::Loaded) {
            let started = *hold_started.get_or_insert_with(|| {
                connect_bar.finish();
                Instant::now()
            });
            let held = started.elapsed();
            hold_bar.set_position((held.as_secs_f64() * 10.0) as u64);
            if last_sample.elapsed() >= Duration::from_millis(500) {
                last_sample = Instant::now();
                if let Some(rss) = ctx.rss() {
                    rss_peak = Some(rss_peak.unwrap_or(0).max(rss));
                }
            }
            if held >= plan.hold {
                rss_after = ctx.rss();
                if let Some(rss) = rss_after {
                    rss_peak = Some(rss_peak.unwrap_or(0).max(rss));
                }
                hold_bar.finish();
                coord.release(Phase::Loaded, Instant::now());
            }
        }
    };
    let results = run_shards(ctx.shards, &ctx.cores, work, monitor)?;

    let mut total = ShardResult::default();
    for r in results {
        total.established += r.established;
        merge_tally(&mut total.failures, &r.failures);
        merge_tally(&mut total.dropped, &r.dropped);
        total.clean_closes += r.clean_closes;
        total.close_timeouts += r.close_timeouts;
        total.handshake.merge(&r.handshake);
        total.first_attempt = min_opt(total.first_attempt, r.first_attempt);
        total.last_established = max_opt(total.last_established, r.last_established);
    }
    let failed: u64 = total.failures.values().sum();
    report.set("sessions_requested", plan.sessions as f64);
    report.set("sessions_established", total.established as f64);
    report.set("handshakes_failed", failed as f64);
    if let (Some(first), Some(last)) = (total.first_attempt, total.last_established) {
        let secs = last
            .saturating_duration_since(first)
            .as_secs_f64()
            .max(1e-6);
        report.set(
            "handshake_rate_per_s",
            (total.established as f64 / secs).round(),
        );
        report.set("ramp_duration_s", secs);
    }
    let hs = total.handshake.summary();
    report.set("handshake_p50_ms", hs.p50_ms);
    report.set("handshake_p99_ms", hs.p99_ms);
    report.set("handshake_max_ms", hs.max_ms);
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        report.set("server_rss_before_mib", before as f64 / 1048576.0);
        report.set("server_rss_after_mib", after as f64 / 1048576.0);
        report.set(
            "server_rss_peak_mib",
            rss_peak.unwrap_or(after) as f64 / 1048576.0,
        );
        if total.established > 0 {
            let per = (after as f64 - before as f64) / total.established as f64;
            report.set("rss_per_session_bytes", per.round());
            report.set("rss_per_session_kib", per / 1024.0);
        }
    } else if ctx.pid.is_some() {
        report
            .notes
            .push("server RSS unavailable (process gone?)".into());
    } else {
        report
            .notes
            .push("no --pid: server RSS not measured".into());
    }
    report.set(
        "dropped_during_hold",
        total.dropped.values().sum::<u64>() as f64,
    );
    report.set("clean_closes", total.clean_closes as f64);
    report.set("close_timeouts", total.close_timeouts as f64);
    report.add_failures(&total.failures);
    for (reason, n) in &total.dropped {
        *report
            .failures
            .entry(format!("dropped during hold: {reason}"))
            .or_default() += n;
    }
    report
        .histograms
        .insert("handshake".into(), total.handshake.to_json());
    report
        .notes
        .push("handshake latency is measured from each session's scheduled attempt time".into());
    report.finish();
    if let Some(path) = &args.common.plot {
        crate::plot::percentile_plot(
            path,
            &format!(
                "handshake latency, {} sessions at {}/s",
                plan.sessions, plan.ramp
            ),
            &[crate::plot::Curve {
                label: ctx.label.clone(),
                hist: &report.histograms["handshake"],
            }],
        )?;
    }
    Ok(report)
}

fn min_opt(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

fn max_opt(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

async fn shard_main(
    shard: usize,
    ctx: Arc<Ctx>,
    coord: Arc<Coordinator>,
    plan: DensityPlan,
) -> ShardResult {
    let mine: Vec<u64> = (shard as u64..plan.sessions).step_by(ctx.shards).collect();
    coord.arrive(Phase::SetUp);
    let Some(start) = coord
        .wait_release(Phase::SetUp, Duration::from_secs(600))
        .await
    else {
        return ShardResult::default();
    };
    let state = Rc::new(ShardState::default());
    let sources = Rc::new(RefCell::new(ctx.source_addrs(shard)));
    let mut tasks = Vec::with_capacity(mine.len());
    for &i in &mine {
        let at = start + Duration::from_secs_f64(i as f64 / plan.ramp);
        let (ctx, coord, state, sources) =
            (ctx.clone(), coord.clone(), state.clone(), sources.clone());
        tasks.push(glommio::spawn_local(async move {
            sleep_until(at).await;
            {
                let mut r = state.result.borrow_mut();
                if r.first_attempt.is_none() {
                    r.first_attempt = Some(Instant::now());
                }
            }
            let path = ctx.endpoints.visitor_path(i, None, None);
            let source = sources.borrow_mut().next();
            let opened = open_session(&ctx, source, &path, seed(shard, i, 0)).await;
            state.resolved.set(state.resolved.get() + 1);
            let (mut reader, writer) = match opened {
                Ok((r, w, _)) => (r, w),
                Err(reason) => {
                    bump(&mut state.result.borrow_mut().failures, reason);
                    Progress::add(&coord.progress.failed, 1);
                    return;
                }
            };
            {
                let mut r = state.result.borrow_mut();
                r.established += 1;
                r.last_established = Some(Instant::now());
                r.handshake
                    .record(Instant::now().saturating_duration_since(at));
            }
            Progress::add(&coord.progress.connected, 1);
            state.writers.borrow_mut().push(writer);
            // Idle: the codec answers pings; anything else is ignored until the close.
            loop {
                match reader.recv().await {
                    Ok(Incoming::Text(_)) | Ok(Incoming::Binary(_)) => {}
                    Ok(Incoming::Close(code)) => {
                        if state.closing.get() {
                            state.result.borrow_mut().clean_closes += 1;
                        } else {
                            bump(
                                &mut state.result.borrow_mut().dropped,
                                format!("closed by server ({code})"),
                            );
                        }
                        return;
                    }
                    Err(e) => {
                        if !state.closing.get() {
                            bump(&mut state.result.borrow_mut().dropped, e.reason());
                        }
                        return;
                    }
                }
            }
        }));
    }
    // Every attempt resolves within its schedule slot plus the handshake timeout.
    let last_at =
        start + Duration::from_secs_f64(mine.last().copied().unwrap_or(0) as f64 / plan.ramp);
    let deadline = last_at + ctx.handshake_timeout + ctx.handshake_timeout + Duration::from_secs(5);
    while state.resolved.get() < mine.len() as u64 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    coord.arrive(Phase::Loaded);
    let hold_limit = plan.hold + Duration::from_secs(3600);
    let _ = coord.wait_release(Phase::Loaded, hold_limit).await;
    state.closing.set(true);
    let writers = std::mem::take(&mut *state.writers.borrow_mut());
    let timeouts = crate::scenario::close_all(&writers, tasks, Duration::from_secs(10)).await;
    drop(writers);
    let mut result = std::mem::take(&mut *state.result.borrow_mut());
    result.close_timeouts = timeouts;
    result
}
