//! `soak`: a mixed load held for `--duration` while the server's RSS is sampled, to show whether memory
//! creeps. Visitors live for a random time (exponential, mean `--mean-session`), then drop (half with a
//! close handshake, half abruptly) and reconnect as the same visitor with `resume` = the last sequence
//! number they hold, re-sending every message not yet acked (same id). Relay visitors (handed to agents)
//! send probes the agents echo; the others ask the bot (switchboard only).
//!
//! Checks, per visitor, against the exactly-once contract of issue 4: the sequence numbers seen (acks and
//! delivered messages) are dense from the conversation start (gaps counted), no seq is delivered twice on
//! one connection (a reconnect resumes from the contiguous prefix held, so what lies above a gap comes again),
//! nothing at or below the resume point is replayed, a resent id is acked with its original seq, and every
//! probe's reply arrives (lost counted after a final drain). With `--protocol relay` (the peers: no
//! storage, no resume) only the churn, relay and RSS parts apply, and messages sent while a visitor is
//! away are lost by design of those servers.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::cli::SoakArgs;
use crate::payload::Probe;
use crate::progress::Bars;
use crate::protocol::{self, Protocol, ServerFrame};
use crate::report::Report;
use crate::runtime::{run_shards, sleep_until, with_timeout, Coordinator, Phase, Progress};
use crate::scenario::{
    agent_loop, bump, close_all, close_conversations, handoff_until_assigned, merge_tally,
    open_session, seed, AgentStats, Ctx, Tally,
};
use crate::stats::{Arrival, Arrivals, Latency};
use crate::wsclient::{Incoming, WsReader};

#[derive(Debug, Default)]
struct SoakTotals {
    connects: u64,
    connect_failures: Tally,
    errors: Tally,
    clean_disconnects: u64,
    abrupt_disconnects: u64,
    sent: u64,
    resent: u64,
    acks: u64,
    probes: u64,
    replies: u64,
    lost: u64,
    duplicate_replies: u64,
    bot_answers: u64,
    seq_gaps: u64,
    duplicate_deliveries: u64,
    replayed_below_resume: u64,
    ack_conflicts: u64,
    unacked_at_end: u64,
    latency: Latency,
}

impl SoakTotals {
    fn merge(&mut self, o: SoakTotals) {
        self.connects += o.connects;
        merge_tally(&mut self.connect_failures, &o.connect_failures);
        merge_tally(&mut self.errors, &o.errors);
        self.clean_disconnects += o.clean_disconnects;
        self.abrupt_disconnects += o.abrupt_disconnects;
        self.sent += o.sent;
        self.resent += o.resent;
        self.acks += o.acks;
        self.probes += o.probes;
        self.replies += o.replies;
        self.lost += o.lost;
        self.duplicate_replies += o.duplicate_replies;
        self.bot_answers += o.bot_answers;
        self.seq_gaps += o.seq_gaps;
        self.duplicate_deliveries += o.duplicate_deliveries;
        self.replayed_below_resume += o.replayed_below_resume;
        self.ack_conflicts += o.ack_conflicts;
        self.unacked_at_end += o.unacked_at_end;
        self.latency.merge(&o.latency);
    }
}

/// What one visitor knows across its reconnections.
#[derive(Default)]
struct VisitorBook {
    /// `seq` of `hello` on the first connection: the conversation's messages before this run.
    baseline: Option<u64>,
    /// Sequence numbers seen in acks or delivered messages.
    seen: Arrivals,
    /// Sequence numbers delivered on the current connection. A reconnect resumes from the
    /// contiguous prefix it holds, so messages above a gap (its own message whose ack was lost
    /// in an abrupt drop) are rightly replayed again: only a second delivery within one
    /// connection breaks the contract (and anything at or below `resume`, counted apart).
    delivered: Arrivals,
    /// Duplicate deliveries of earlier connections.
    duplicate_deliveries: u64,
    max_seq: u64,
    /// Resume point given on the current connection.
    resume: Option<u64>,
    acked: HashMap<String, u64>,
    unacked: VecDeque<(String, String)>,
    replies: Arrivals,
    probes_sent: u64,
    assigned: bool,
    /// The visitor's secret from its first `hello`: reconnecting to the visitor id needs it.
    secret: Option<String>,
}

impl VisitorBook {
    /// Highest seq such that every seq from the baseline up to it has been seen.
    fn contiguous(&self) -> u64 {
        let base = self.baseline.unwrap_or(0);
        let mut s = base;
        while self.seen.contains(s + 1) {
            s += 1;
        }
        s
    }

    fn gaps(&self) -> u64 {
        let base = self.baseline.unwrap_or(0);
        (base + 1..=self.max_seq)
            .filter(|s| !self.seen.contains(*s))
            .count() as u64
    }
}

pub fn run(args: &SoakArgs) -> Result<Report, String> {
    let ctx = Arc::new(Ctx::new(&args.common)?);
    if ctx.protocol == Protocol::Echo {
        return Err("soak needs --protocol switchboard (or relay for the peers)".into());
    }
    if args.visitors == 0 || args.rate <= 0.0 {
        return Err("--visitors and --rate must be positive".into());
    }
    let queries: Arc<Vec<String>> = Arc::new(match &args.queries {
        Some(p) => crate::scenario::bot::load_queries(p)?,
        None => vec![
            "what are your opening hours?".into(),
            "how do I reset my password?".into(),
        ],
    });
    let bars = Bars::new(ctx.progress);
    let mut report = ctx.report("soak");
    let relay_visitors = if ctx.protocol == Protocol::Relay {
        args.visitors
    } else {
        args.relay_visitors.min(args.visitors)
    };
    report.settings = serde_json::json!({
        "duration_s": args.duration.as_secs_f64(), "visitors": args.visitors, "relay_visitors": relay_visitors,
        "agents": args.agents, "rate_per_s": args.rate, "mean_session_s": args.mean_session.as_secs_f64(),
        "sample_every_s": args.sample_every.as_secs_f64(), "size_bytes": args.size,
    });
    let coord = Coordinator::new(ctx.shards);
    let run_bar = bars.timed("soak", args.duration.as_secs_f64());
    let work = {
        let (ctx, coord, args, queries) =
            (ctx.clone(), coord.clone(), args.clone(), queries.clone());
        move |shard| {
            shard_main(
                shard,
                ctx.clone(),
                coord.clone(),
                args.clone(),
                queries.clone(),
                relay_visitors,
            )
        }
    };
    let mut started: Option<Instant> = None;
    let mut series: Vec<[f64; 2]> = Vec::new();
    let mut next_sample = Instant::now();
    let monitor = || {
        let p = &coord.progress;
        if coord.all_arrived(Phase::SetUp) && !coord.is_released(Phase::SetUp) {
            let at = Instant::now() + Duration::from_millis(50);
            started = Some(at);
            coord.release(Phase::SetUp, at);
        }
        if let Some(at) = started {
            let t = Instant::now().saturating_duration_since(at);
            run_bar.set_position((t.as_secs_f64().min(args.duration.as_secs_f64()) * 10.0) as u64);
            run_bar.set_message(format!(
                "connects {} sent {} received {}",
                Progress::get(&p.connected),
                Progress::get(&p.sent),
                Progress::get(&p.received)
            ));
            if Instant::now() >= next_sample && t <= args.duration {
                next_sample = Instant::now() + args.sample_every;
                if let Some(rss) = ctx.rss() {
                    series.push([t.as_secs_f64(), rss as f64 / 1048576.0]);
                }
            }
        }
    };
    let results = run_shards(ctx.shards, work, monitor)?;
    run_bar.finish();
    let mut t = SoakTotals::default();
    for r in results {
        t.merge(r);
    }
    report.set("connects", t.connects as f64);
    report.set(
        "connect_failures",
        t.connect_failures.values().sum::<u64>() as f64,
    );
    report.set("clean_disconnects", t.clean_disconnects as f64);
    report.set("abrupt_disconnects", t.abrupt_disconnects as f64);
    report.set("messages_sent", t.sent as f64);
    report.set("messages_resent", t.resent as f64);
    report.set("acks", t.acks as f64);
    report.set("probes", t.probes as f64);
    report.set("replies", t.replies as f64);
    report.set("lost", t.lost as f64);
    report.set("duplicate_replies", t.duplicate_replies as f64);
    report.set("bot_answers", t.bot_answers as f64);
    if ctx.protocol == Protocol::Switchboard {
        report.set("seq_gaps", t.seq_gaps as f64);
        report.set("duplicate_deliveries", t.duplicate_deliveries as f64);
        report.set("replayed_below_resume", t.replayed_below_resume as f64);
        report.set("ack_conflicts", t.ack_conflicts as f64);
        report.set("unacked_at_end", t.unacked_at_end as f64);
    } else {
        report.notes.push(
            "relay protocol: no storage or resume; messages sent while a visitor is away are lost"
                .into(),
        );
    }
    let s = t.latency.summary();
    report.set("reply_p50_ms", s.p50_ms);
    report.set("reply_p99_ms", s.p99_ms);
    report.set("reply_max_ms", s.max_ms);
    if let (Some(first), Some(last)) = (series.first(), series.last()) {
        let max = series.iter().map(|p| p[1]).fold(0f64, f64::max);
        report.set("rss_start_mib", first[1]);
        report.set("rss_end_mib", last[1]);
        report.set("rss_max_mib", max);
        let half: Vec<[f64; 2]> = series
            .iter()
            .copied()
            .filter(|p| p[0] >= last[0] / 2.0)
            .collect();
        if let Some(slope) = slope_per_second(&half) {
            report.set("rss_slope_second_half_mib_per_min", slope * 60.0);
        }
    } else {
        report.notes.push("no --pid: server RSS not sampled".into());
    }
    report.series.insert("server_rss_mib".into(), series);
    report
        .histograms
        .insert("reply_latency".into(), t.latency.to_json());
    report.add_failures(&t.connect_failures);
    report.add_failures(&t.errors);
    report.finish();
    if let Some(path) = &args.common.plot {
        crate::plot::line_plot(
            path,
            "soak: server RSS over time",
            "time (s)",
            "RSS (MiB)",
            vec![crate::plot::Line {
                label: ctx.label.clone(),
                points: report.series["server_rss_mib"].clone(),
            }],
        )?;
    }
    Ok(report)
}

/// Least-squares slope of y over x; `None` with fewer than 3 points.
pub fn slope_per_second(points: &[[f64; 2]]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p[0]).sum::<f64>() / n;
    let my = points.iter().map(|p| p[1]).sum::<f64>() / n;
    let sxy: f64 = points.iter().map(|p| (p[0] - mx) * (p[1] - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p[0] - mx).powi(2)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

struct ShardState {
    totals: RefCell<SoakTotals>,
    closing: Rc<Cell<bool>>,
}

async fn shard_main(
    shard: usize,
    ctx: Arc<Ctx>,
    coord: Arc<Coordinator>,
    args: SoakArgs,
    queries: Arc<Vec<String>>,
    relay_visitors: u64,
) -> SoakTotals {
    let state = Rc::new(ShardState {
        totals: RefCell::default(),
        closing: Rc::new(Cell::new(false)),
    });
    let agent_stats = Rc::new(RefCell::new(AgentStats::default()));
    let sources = Rc::new(RefCell::new(ctx.source_addrs(shard)));
    let mut agent_writers = Vec::new();
    let mut agent_convs = Vec::new();
    let mut agent_tasks = Vec::new();
    // Agents: with switchboard a few token sessions; with relay one per relay visitor's room.
    let agent_ids: Vec<u64> = match ctx.protocol {
        Protocol::Switchboard => (shard as u64..args.agents).step_by(ctx.shards).collect(),
        _ => (shard as u64..relay_visitors).step_by(ctx.shards).collect(),
    };
    for a in agent_ids {
        let path = ctx.endpoints.agent_path(a).expect("protocol has agents");
        let source = sources.borrow_mut().next();
        match open_session(&ctx, source, &path, seed(shard, 1 << 30 | a, 0)).await {
            Ok((reader, writer, _)) => {
                if ctx.protocol == Protocol::Switchboard {
                    let _ = writer.send_text(&protocol::agent_online()).await;
                }
                let assigned = Rc::new(RefCell::new(Vec::new()));
                agent_convs.push((writer.clone(), assigned.clone()));
                agent_writers.push(writer);
                agent_tasks.push(glommio::spawn_local(agent_loop(
                    ctx.protocol,
                    reader,
                    agent_stats.clone(),
                    state.closing.clone(),
                    ctx.endpoints.run_id.clone(),
                    assigned,
                )));
            }
            Err(reason) => bump(
                &mut state.totals.borrow_mut().connect_failures,
                format!("agent: {reason}"),
            ),
        }
    }
    coord.arrive(Phase::SetUp);
    let Some(start) = coord
        .wait_release(Phase::SetUp, Duration::from_secs(3600))
        .await
    else {
        return SoakTotals::default();
    };
    let end = start + args.duration;
    let interval = args.visitors as f64 / args.rate;
    let mut visitors = Vec::new();
    for v in (shard as u64..args.visitors).step_by(ctx.shards) {
        let (ctx, coord, state, sources, queries, args) = (
            ctx.clone(),
            coord.clone(),
            state.clone(),
            sources.clone(),
            queries.clone(),
            args.clone(),
        );
        let relay = v < relay_visitors;
        let offset = interval * (v as f64 / args.visitors as f64);
        visitors.push(glommio::spawn_local(async move {
            let plan = VisitorPlan {
                v,
                shard,
                relay,
                start,
                end,
                offset,
                interval,
            };
            visitor_life(&ctx, &coord, &state, &sources, &queries, &args, plan).await
        }));
    }
    for t in visitors {
        t.await;
    }
    coord.arrive(Phase::Loaded);
    state.closing.set(true);
    if ctx.protocol == Protocol::Switchboard {
        close_conversations(&agent_convs).await;
    }
    close_all(&agent_writers, agent_tasks, Duration::from_secs(5)).await;
    let mut totals = std::mem::take(&mut *state.totals.borrow_mut());
    merge_tally(&mut totals.errors, &agent_stats.borrow().errors);
    totals
}

struct VisitorPlan {
    v: u64,
    shard: usize,
    relay: bool,
    start: Instant,
    end: Instant,
    offset: f64,
    interval: f64,
}

async fn visitor_life(
    ctx: &Ctx,
    coord: &Coordinator,
    state: &Rc<ShardState>,
    sources: &Rc<RefCell<crate::net::SourceAddrs>>,
    queries: &[String],
    args: &SoakArgs,
    plan: VisitorPlan,
) {
    let book = Rc::new(RefCell::new(VisitorBook::default()));
    let mut rng = StdRng::seed_from_u64(seed(plan.shard, plan.v, 99));
    let mut k: u64 = 0;
    let mut attempt: u64 = 0;
    let switchboard = ctx.protocol == Protocol::Switchboard;
    let epoch_start = plan.start;
    while Instant::now() < plan.end {
        attempt += 1;
        let resume = if switchboard && book.borrow().baseline.is_some() {
            Some(book.borrow().contiguous())
        } else {
            None
        };
        let secret = book.borrow().secret.clone();
        let path = ctx
            .endpoints
            .visitor_path(plan.v, resume, secret.as_deref());
        let source = sources.borrow_mut().next();
        let (mut reader, writer, hello) =
            match open_session(ctx, source, &path, seed(plan.shard, plan.v, attempt)).await {
                Ok(s) => s,
                Err(reason) => {
                    bump(&mut state.totals.borrow_mut().connect_failures, reason);
                    glommio::timer::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
        state.totals.borrow_mut().connects += 1;
        Progress::add(&coord.progress.connected, 1);
        {
            let mut b = book.borrow_mut();
            b.resume = resume;
            b.duplicate_deliveries += std::mem::take(&mut b.delivered).duplicates;
            if b.baseline.is_none() {
                b.baseline = Some(hello.as_ref().and_then(|h| h.seq).unwrap_or(0));
            }
            if let Some(secret) = hello.as_ref().and_then(|h| h.secret.clone()) {
                b.secret = Some(secret);
            }
        }
        if switchboard && plan.relay && !book.borrow().assigned {
            match handoff_until_assigned(&mut reader, &writer, ctx.handshake_timeout).await {
                Ok(()) => book.borrow_mut().assigned = true,
                Err(reason) => bump(&mut state.totals.borrow_mut().errors, reason),
            }
        }
        // Re-send what was never acked, with the same ids.
        let resend: Vec<(String, String)> = book.borrow().unacked.iter().cloned().collect();
        for (_, frame) in &resend {
            if writer.send_text(frame).await.is_err() {
                break;
            }
            state.totals.borrow_mut().resent += 1;
        }
        let receiver = glommio::spawn_local(receive(
            reader,
            book.clone(),
            state.clone(),
            Rc::new(coord_instant_fn(coord)),
            plan.v,
        ));
        let mean = args.mean_session.as_secs_f64().max(0.001);
        let life = -mean * (1.0f64 - rng.gen::<f64>()).ln();
        let until = (Instant::now() + Duration::from_secs_f64(life)).min(plan.end);
        // Send on the schedule until this connection's life is over.
        loop {
            let sched =
                epoch_start + Duration::from_secs_f64(plan.offset + k as f64 * plan.interval);
            if sched >= until {
                break;
            }
            sleep_until(sched).await;
            let (id, frame) = if plan.relay {
                let probe = Probe {
                    stream: plan.v,
                    seq: k,
                    sched_us: coord.micros(sched),
                };
                let text = probe.encode(args.size);
                book.borrow_mut().probes_sent = k + 1;
                (format!("s{}-{k}", plan.v), text)
            } else {
                (
                    format!("s{}-{k}", plan.v),
                    queries[(k as usize) % queries.len()].clone(),
                )
            };
            k += 1;
            let frame = if switchboard {
                protocol::visitor_message(&id, &frame)
            } else {
                frame
            };
            if switchboard {
                book.borrow_mut().unacked.push_back((id, frame.clone()));
            }
            state.totals.borrow_mut().sent += 1;
            Progress::add(&coord.progress.sent, 1);
            if writer.send_text(&frame).await.is_err() {
                break;
            }
        }
        // A clean session lives its full span; an abrupt one is cut right after its last send, with that
        // message (usually) still unacked, so the reconnect has to re-send it and the server to dedup it.
        let abrupt = until < plan.end && rng.gen_bool(0.5);
        if !abrupt {
            sleep_until(until).await;
        }
        if Instant::now() >= plan.end {
            // Final connection: stop sending, let replies and acks drain, close cleanly.
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                let done = {
                    let b = book.borrow();
                    b.unacked.is_empty() && (!plan.relay || b.replies.unique >= b.probes_sent)
                };
                if done {
                    break;
                }
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
            let _ = writer.close(1000).await;
            with_timeout(Duration::from_secs(2), receiver).await;
            break;
        }
        if !abrupt {
            let _ = writer.close(1000).await;
            with_timeout(Duration::from_secs(2), receiver).await;
            state.totals.borrow_mut().clean_disconnects += 1;
        } else {
            // Abrupt: cancel the receiver and drop the socket without a close frame.
            drop(receiver);
            drop(writer);
            state.totals.borrow_mut().abrupt_disconnects += 1;
        }
    }
    let b = book.borrow();
    let mut t = state.totals.borrow_mut();
    t.probes += b.probes_sent;
    t.replies += b.replies.unique;
    t.lost += b.probes_sent.saturating_sub(b.replies.unique);
    t.duplicate_replies += b.replies.duplicates;
    if switchboard {
        t.seq_gaps += b.gaps();
        t.duplicate_deliveries += b.duplicate_deliveries + b.delivered.duplicates;
        t.unacked_at_end += b.unacked.len() as u64;
    }
}

/// Maps a probe's microsecond timestamp back to an instant.
fn coord_instant_fn(coord: &Coordinator) -> impl Fn(u64) -> Instant {
    let epoch = coord.epoch;
    move |us| epoch + Duration::from_micros(us)
}

async fn receive(
    mut reader: WsReader,
    book: Rc<RefCell<VisitorBook>>,
    state: Rc<ShardState>,
    instant_at: Rc<impl Fn(u64) -> Instant>,
    v: u64,
) {
    loop {
        let text = match reader.recv().await {
            Ok(Incoming::Text(t)) => t,
            Ok(Incoming::Binary(_)) => continue,
            Ok(Incoming::Close(_)) | Err(_) => return,
        };
        let now = Instant::now();
        let mut b = book.borrow_mut();
        let mut t = state.totals.borrow_mut();
        let probe_text: Option<String> = match ServerFrame::parse(&text) {
            Ok(f) => match f.kind.as_ref() {
                "ack" => {
                    t.acks += 1;
                    let id = match &f.id {
                        Some(serde_json::Value::String(s)) => s.clone(),
                        Some(other) => other.to_string(),
                        None => String::new(),
                    };
                    if let Some(seq) = f.seq {
                        if let Some(prev) = b.acked.insert(id.clone(), seq) {
                            if prev != seq {
                                t.ack_conflicts += 1;
                            }
                        }
                        b.seen.record(seq);
                        b.max_seq = b.max_seq.max(seq);
                    }
                    b.unacked.retain(|(i, _)| *i != id);
                    None
                }
                "message" => {
                    if let Some(seq) = f.seq {
                        if b.resume.is_some_and(|r| seq <= r) {
                            t.replayed_below_resume += 1;
                        }
                        b.delivered.record(seq);
                        b.seen.record(seq);
                        b.max_seq = b.max_seq.max(seq);
                    }
                    match f.from.as_deref() {
                        Some("agent") => f.text.map(|c| c.into_owned()),
                        Some("bot") => {
                            t.bot_answers += 1;
                            None
                        }
                        _ => None,
                    }
                }
                "error" => {
                    bump(
                        &mut t.errors,
                        format!("server error {}", f.code.clone().unwrap_or_default()),
                    );
                    None
                }
                _ => None,
            },
            // The relay protocol carries bare probes.
            Err(_) => Some(text),
        };
        if let Some(p) = probe_text.as_deref().and_then(Probe::decode) {
            if p.stream == v && p.seq < b.probes_sent && b.replies.record(p.seq) == Arrival::First {
                t.latency
                    .record(now.saturating_duration_since(instant_at(p.sched_us)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line() {
        let pts: Vec<[f64; 2]> = (0..10).map(|i| [i as f64, 3.0 + 0.5 * i as f64]).collect();
        assert!((slope_per_second(&pts).unwrap() - 0.5).abs() < 1e-9);
        assert!(slope_per_second(&pts[..2]).is_none());
    }

    #[test]
    fn book_tracks_contiguity_and_gaps() {
        let mut b = VisitorBook {
            baseline: Some(2),
            ..Default::default()
        };
        for s in [3, 4, 6] {
            b.seen.record(s);
            b.max_seq = b.max_seq.max(s);
        }
        assert_eq!(b.contiguous(), 4);
        assert_eq!(b.gaps(), 1);
    }
}
