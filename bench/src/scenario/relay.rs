//! `relay`: conversations of one visitor and one agent (visitor only with `--protocol echo`). Visitors send
//! probes open-loop: conversation c sends message k at `start + (c/C + k) * C/R`, whatever the server is
//! doing, so all visitors together offer R messages/s, evenly spread. One pacer per shard sends its
//! visitors' messages in time order, waking at most once per `--tick` and sending up to one tick early.
//! The agent replies with the same text; the visitor takes the latency as receive time minus the
//! *scheduled* send time carried in the probe (or the time the pacer picked the message up, if it went
//! out early). A slow server cannot hide its queueing behind a slowed-down sender (no coordinated
//! omission), and the tick adds only its timer's overshoot at rates where wakes are a tick apart.
//!
//! Every probe carries (conversation, seq): first arrivals, duplicates, misrouted and unknown replies are
//! counted per conversation; lost = sent - received after the drain period. Messages scheduled in the
//! warm-up are counted but their latency is not recorded. The generator's own lag (how late past its
//! schedule each message was picked up, 0 for one sent early) is reported too: a large lag means the load
//! generator, not the server, was the bottleneck.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cli::{LoadShape, RelayArgs};
use crate::codec::Message;
use crate::payload::Probe;
use crate::progress::Bars;
use crate::protocol::{self, Protocol, ServerFrame};
use crate::report::Report;
use crate::runtime::{run_shards, sleep_until, Coordinator, Phase, Progress};
use crate::scenario::{
    agent_loop, bump, close_all, close_conversations, handoff_until_assigned, merge_tally,
    open_session, seed, AgentStats, Ctx, Tally,
};
use crate::stats::{Arrival, Arrivals, Latency};
use crate::wsclient::{WsReader, WsWriter};

#[derive(Debug, Clone)]
pub struct RelayPlan {
    pub conversations: u64,
    pub rate: f64,
    pub duration: Duration,
    pub size: usize,
    pub warmup: Duration,
    pub drain: Duration,
    pub agents: u64,
    pub tick: Duration,
}

impl RelayPlan {
    pub fn new(shape: &LoadShape, rate: f64, duration: Duration) -> Result<RelayPlan, String> {
        if rate <= 0.0 || !rate.is_finite() {
            return Err("--rate must be positive".into());
        }
        if shape.conversations == 0 {
            return Err("--conversations must be at least 1".into());
        }
        Ok(RelayPlan {
            conversations: shape.conversations,
            rate,
            duration,
            size: shape.size,
            warmup: shape.warmup,
            drain: shape.drain,
            agents: shape.agents.max(1),
            tick: shape.tick,
        })
    }
}

/// Merged results of one relay run.
#[derive(Debug, Default)]
pub struct RelayTotals {
    pub conversations_up: u64,
    pub setup_failures: Tally,
    pub errors: Tally,
    pub sent: u64,
    pub sent_measured: u64,
    pub received: u64,
    pub received_measured: u64,
    pub duplicates: u64,
    pub unknown: u64,
    pub misrouted: u64,
    pub lost: u64,
    /// Messages the server refused explicitly with `overloaded` (not stored; the bench does not
    /// re-send them): neither lost nor part of the admitted traffic's latency.
    pub refused: u64,
    pub acks: u64,
    pub agent_replies: u64,
    pub agent_ignored: u64,
    /// Up to 20 lost messages as `conversation:seq`, to help find where a server drops them.
    pub lost_sample: Vec<String>,
    pub latency: Latency,
    pub send_lag: Latency,
    pub measure_start: Option<Instant>,
    pub last_measured_receive: Option<Instant>,
    /// CPU the server (and its `--cpu-pid` helpers) used from the start of the schedule to the end of
    /// the drain; `None` without `--pid`.
    pub server_cpu: Option<ServerCpu>,
    /// Steal over the same window, machine-wide; `None` where /proc/stat has no steal field.
    pub machine_steal: Option<MachineSteal>,
}

/// Time the hypervisor took from the machine's cores over a run's load (the window of
/// [`ServerCpu`]): on a shared virtual machine it delays the server and the generator alike.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MachineSteal {
    /// Steal seconds summed over the cores.
    pub seconds: f64,
    pub wall_seconds: f64,
    pub cores: usize,
}

impl MachineSteal {
    /// Steal as a share of the machine's core time over the window, in percent to 0.1.
    pub fn percent(&self) -> f64 {
        let available = self.wall_seconds * self.cores.max(1) as f64;
        if available <= 0.0 {
            return 0.0;
        }
        (self.seconds / available * 1000.0).round() / 10.0
    }
}

/// Server CPU time over a run's load (warm-up, measurement and drain).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServerCpu {
    pub seconds: f64,
    pub wall_seconds: f64,
}

impl RelayTotals {
    fn merge(&mut self, o: RelayTotals) {
        self.conversations_up += o.conversations_up;
        merge_tally(&mut self.setup_failures, &o.setup_failures);
        merge_tally(&mut self.errors, &o.errors);
        self.sent += o.sent;
        self.sent_measured += o.sent_measured;
        self.received += o.received;
        self.received_measured += o.received_measured;
        self.duplicates += o.duplicates;
        self.unknown += o.unknown;
        self.misrouted += o.misrouted;
        self.lost += o.lost;
        self.refused += o.refused;
        self.acks += o.acks;
        self.agent_replies += o.agent_replies;
        self.agent_ignored += o.agent_ignored;
        for id in o.lost_sample {
            if self.lost_sample.len() < 20 {
                self.lost_sample.push(id);
            }
        }
        self.latency.merge(&o.latency);
        self.send_lag.merge(&o.send_lag);
        self.measure_start = self.measure_start.or(o.measure_start);
        self.server_cpu = self.server_cpu.or(o.server_cpu);
        self.machine_steal = self.machine_steal.or(o.machine_steal);
        self.last_measured_receive = match (self.last_measured_receive, o.last_measured_receive) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }

    /// Replies per second over the measured window: measured replies divided by the time from the start of
    /// measurement to the last measured reply (a server that falls behind stretches the denominator).
    pub fn throughput(&self, plan: &RelayPlan) -> f64 {
        match (self.measure_start, self.last_measured_receive) {
            (Some(start), Some(last)) => {
                let secs = last
                    .saturating_duration_since(start)
                    .as_secs_f64()
                    .max(plan.duration.as_secs_f64() * 0.5);
                self.received_measured as f64 / secs
            }
            _ => 0.0,
        }
    }

    /// Server CPU microseconds per round trip (every first arrival of the load, warm-up included, as
    /// the CPU window is), to 0.1 µs; `None` without `--pid` or without a reply.
    pub fn server_cpu_us_per_round_trip(&self) -> Option<f64> {
        let cpu = self.server_cpu?;
        (self.received > 0)
            .then(|| (cpu.seconds * 1e6 / self.received as f64 * 10.0).round() / 10.0)
    }

    /// Writes the figures into `report`.
    pub fn fill(&self, plan: &RelayPlan, report: &mut Report) {
        let s = self.latency.summary();
        report.set("rate_offered_per_s", plan.rate);
        report.set("throughput_per_s", self.throughput(plan).round());
        report.set("p50_ms", s.p50_ms);
        report.set("p90_ms", s.p90_ms);
        report.set("p99_ms", s.p99_ms);
        report.set("p999_ms", s.p999_ms);
        report.set("max_ms", s.max_ms);
        report.set("mean_ms", s.mean_ms);
        report.set("conversations", plan.conversations as f64);
        report.set("conversations_up", self.conversations_up as f64);
        report.set("sent", self.sent as f64);
        report.set("received", self.received as f64);
        report.set("lost", self.lost as f64);
        if self.refused > 0 {
            // Offered = sent; admitted = sent - refused; p50/p99 above are admitted traffic only.
            report.set("refused_overloaded", self.refused as f64);
            report.set("admitted", self.sent.saturating_sub(self.refused) as f64);
        }
        report.set("duplicated", self.duplicates as f64);
        report.set("misrouted", self.misrouted as f64);
        report.set("unknown", self.unknown as f64);
        report.set("errors", self.errors.values().sum::<u64>() as f64);
        report.set(
            "setup_failures",
            self.setup_failures.values().sum::<u64>() as f64,
        );
        report.set("measured_samples", s.count as f64);
        let lag = self.send_lag.summary();
        report.set("generator_lag_p99_ms", lag.p99_ms);
        report.set("generator_lag_max_ms", lag.max_ms);
        if let Some(cpu) = self.server_cpu {
            report.set("server_cpu_s", (cpu.seconds * 1000.0).round() / 1000.0);
            if cpu.wall_seconds > 0.0 {
                report.set(
                    "server_cpu_percent",
                    (cpu.seconds / cpu.wall_seconds * 1000.0).round() / 10.0,
                );
            }
            if let Some(us) = self.server_cpu_us_per_round_trip() {
                report.set("server_cpu_us_per_round_trip", us);
            }
        }
        if let Some(steal) = self.machine_steal {
            report.set("machine_steal_percent", steal.percent());
        }
        if self.acks > 0 {
            report.set("acks", self.acks as f64);
        }
        if self.agent_replies > 0 {
            report.set("agent_replies", self.agent_replies as f64);
        }
        if self.agent_ignored > 0 {
            report.set("agent_ignored_earlier_runs", self.agent_ignored as f64);
        }
        report.add_failures(&self.setup_failures);
        report.add_failures(&self.errors);
        if !self.lost_sample.is_empty() {
            report.notes.push(format!(
                "lost (conversation:seq): {}",
                self.lost_sample.join(" ")
            ));
        }
        report
            .histograms
            .insert("latency".into(), self.latency.to_json());
        report
            .histograms
            .insert("generator_lag".into(), self.send_lag.to_json());
    }
}

pub fn run(args: &RelayArgs) -> Result<Report, String> {
    let ctx = Arc::new(Ctx::new(&args.common)?);
    let plan = RelayPlan::new(&args.shape, args.rate, args.duration)?;
    let bars = Bars::new(ctx.progress);
    let mut report = ctx.report("relay");
    report.settings = settings(&ctx, &plan);
    let totals = execute(&ctx, &plan, &bars)?;
    totals.fill(&plan, &mut report);
    report.finish();
    if let Some(path) = &args.common.plot {
        crate::plot::percentile_plot(
            path,
            &format!(
                "relay latency at {} msg/s, {} conversations",
                plan.rate, plan.conversations
            ),
            &[crate::plot::Curve {
                label: ctx.label.clone(),
                hist: &report.histograms["latency"],
            }],
        )?;
    }
    Ok(report)
}

pub fn settings(ctx: &Ctx, plan: &RelayPlan) -> serde_json::Value {
    serde_json::json!({
        "conversations": plan.conversations, "rate_per_s": plan.rate, "duration_s": plan.duration.as_secs_f64(),
        "size_bytes": plan.size, "warmup_s": plan.warmup.as_secs_f64(), "drain_s": plan.drain.as_secs_f64(),
        "agents": if ctx.protocol == Protocol::Switchboard { plan.agents } else { plan.conversations },
        "sources": ctx.sources, "echo_delay_ms": ctx.endpoints.echo_delay_ms,
        "tick_us": plan.tick.as_micros() as u64,
        "issued_visitor_ids": ctx.endpoints.issued_visitor_ids,
    })
}

/// Runs one relay load and returns the merged results.
pub fn execute(ctx: &Arc<Ctx>, plan: &RelayPlan, bars: &Bars) -> Result<RelayTotals, String> {
    let coord = Coordinator::new(ctx.shards);
    let agents = if ctx.protocol == Protocol::Switchboard {
        plan.agents
    } else {
        0
    };
    let setup_bar = bars.counter("set up", plan.conversations + agents);
    let run_secs = (plan.warmup + plan.duration).as_secs_f64();
    let run_bar = bars.timed(&format!("{}/s", plan.rate.round()), run_secs);
    let work = {
        let (ctx, coord, plan) = (ctx.clone(), coord.clone(), plan.clone());
        move |shard| shard_main(shard, ctx.clone(), coord.clone(), plan.clone())
    };
    let mut started: Option<Instant> = None;
    // Server CPU seconds (and the instant) when the schedule starts and when the load is over.
    let mut cpu_start: Option<(f64, Instant)> = None;
    let mut cpu_end: Option<(f64, Instant)> = None;
    let mut steal_start: Option<((f64, usize), Instant)> = None;
    let mut steal_end: Option<((f64, usize), Instant)> = None;
    let monitor = || {
        let p = &coord.progress;
        if started.is_none() {
            setup_bar.set_position(Progress::get(&p.connected) + Progress::get(&p.failed));
        }
        if coord.all_arrived(Phase::SetUp) && !coord.is_released(Phase::SetUp) {
            setup_bar.finish();
            let at = Instant::now() + Duration::from_millis(50);
            started = Some(at);
            cpu_start = ctx.server_cpu_seconds().map(|s| (s, Instant::now()));
            steal_start = crate::cpu::machine_steal_seconds().map(|s| (s, Instant::now()));
            coord.release(Phase::SetUp, at);
        }
        if let Some(at) = started {
            let t = Instant::now()
                .saturating_duration_since(at)
                .as_secs_f64()
                .min(run_secs);
            run_bar.set_position((t * 10.0) as u64);
            run_bar.set_message(format!(
                "sent {} received {}",
                Progress::get(&p.sent),
                Progress::get(&p.received)
            ));
            if coord.all_arrived(Phase::Loaded) && !coord.is_released(Phase::Loaded) {
                // Sampled before the shards close their sessions: the closes are not round trips.
                cpu_end = ctx.server_cpu_seconds().map(|s| (s, Instant::now()));
                steal_end = crate::cpu::machine_steal_seconds().map(|s| (s, Instant::now()));
                coord.release(Phase::Loaded, Instant::now());
                run_bar.finish();
            }
        }
    };
    let results = run_shards(ctx.shards, &ctx.cores, work, monitor)?;
    let mut totals = RelayTotals::default();
    for r in results {
        totals.merge(r);
    }
    if let (Some((a, t0)), Some((b, t1))) = (cpu_start, cpu_end) {
        totals.server_cpu = Some(ServerCpu {
            seconds: (b - a).max(0.0),
            wall_seconds: t1.saturating_duration_since(t0).as_secs_f64(),
        });
    }
    if let (Some(((a, _), t0)), Some(((b, cores), t1))) = (steal_start, steal_end) {
        totals.machine_steal = Some(MachineSteal {
            seconds: (b - a).max(0.0),
            wall_seconds: t1.saturating_duration_since(t0).as_secs_f64(),
            cores,
        });
    }
    Ok(totals)
}

/// Per-shard state shared by the shard's tasks.
struct ShardState {
    totals: RefCell<RelayTotals>,
    arrivals: RefCell<Vec<Arrivals>>,
    /// Per conversation, the seqs refused with `overloaded`.
    refused: RefCell<Vec<Arrivals>>,
    sent_per_conv: Vec<Cell<u64>>,
    closing: Rc<Cell<bool>>,
}

struct Visitor {
    conv: u64,
    local: usize,
    reader: WsReader,
    writer: WsWriter,
}

async fn shard_main(
    shard: usize,
    ctx: Arc<Ctx>,
    coord: Arc<Coordinator>,
    plan: RelayPlan,
) -> RelayTotals {
    let mine: Vec<u64> = (shard as u64..plan.conversations)
        .step_by(ctx.shards)
        .collect();
    let state = Rc::new(ShardState {
        totals: RefCell::new(RelayTotals::default()),
        arrivals: RefCell::new(vec![Arrivals::default(); mine.len()]),
        refused: RefCell::new(vec![Arrivals::default(); mine.len()]),
        sent_per_conv: (0..mine.len()).map(|_| Cell::new(0)).collect(),
        closing: Rc::new(Cell::new(false)),
    });
    let agent_stats = Rc::new(RefCell::new(AgentStats::default()));
    let mut writers: Vec<WsWriter> = Vec::new();
    let mut tasks: Vec<glommio::Task<()>> = Vec::new();
    let sources = Rc::new(RefCell::new(ctx.source_addrs(shard)));
    let mut sb_agents = Vec::new();

    // Switchboard agents: a few sessions, each serving the conversations the server assigns to it.
    if ctx.protocol == Protocol::Switchboard {
        for a in (shard as u64..plan.agents).step_by(ctx.shards) {
            let path = ctx.endpoints.agent_path(a).expect("switchboard has agents");
            let source = sources.borrow_mut().next();
            match open_session(&ctx, source, &path, seed(shard, 1 << 30 | a, 0)).await {
                Ok((reader, writer, _)) => {
                    let _ = writer.send_text(&protocol::agent_online()).await;
                    let assigned = Rc::new(RefCell::new(Vec::new()));
                    sb_agents.push((writer.clone(), assigned.clone()));
                    writers.push(writer.clone());
                    tasks.push(glommio::spawn_local(agent_loop(
                        ctx.protocol,
                        reader,
                        writer,
                        agent_stats.clone(),
                        state.closing.clone(),
                        ctx.run_visitors(),
                        assigned,
                    )));
                    Progress::add(&coord.progress.connected, 1);
                }
                Err(reason) => {
                    bump(
                        &mut state.totals.borrow_mut().setup_failures,
                        format!("agent: {reason}"),
                    );
                    Progress::add(&coord.progress.failed, 1);
                }
            }
        }
    }

    // Conversations, set up at most 64 at a time.
    let gate = Rc::new(glommio::sync::Semaphore::new(64));
    let mut setups = Vec::with_capacity(mine.len());
    for (local, &conv) in mine.iter().enumerate() {
        let (ctx, coord, gate, sources, state) = (
            ctx.clone(),
            coord.clone(),
            gate.clone(),
            sources.clone(),
            state.clone(),
        );
        let agent_stats = agent_stats.clone();
        let plan_assign = ctx.handshake_timeout;
        setups.push(glommio::spawn_local(async move {
            let _permit = gate.acquire_permit(1).await.ok();
            let result = set_up_conversation(
                &ctx,
                shard,
                conv,
                &sources,
                agent_stats,
                state.closing.clone(),
                plan_assign,
            )
            .await;
            match result {
                Ok((visitor_rw, agent)) => {
                    Progress::add(&coord.progress.connected, 1);
                    Some((
                        Visitor {
                            conv,
                            local,
                            reader: visitor_rw.0,
                            writer: visitor_rw.1,
                        },
                        agent,
                    ))
                }
                Err(reason) => {
                    bump(&mut state.totals.borrow_mut().setup_failures, reason);
                    Progress::add(&coord.progress.failed, 1);
                    None
                }
            }
        }));
    }
    let mut visitors = Vec::with_capacity(mine.len());
    for s in setups {
        if let Some((v, agent)) = s.await {
            if let Some((w, t)) = agent {
                writers.push(w);
                tasks.push(t);
            }
            visitors.push(v);
        }
    }
    state.totals.borrow_mut().conversations_up = visitors.len() as u64;

    coord.arrive(Phase::SetUp);
    let Some(start) = coord
        .wait_release(Phase::SetUp, Duration::from_secs(3600))
        .await
    else {
        state.closing.set(true);
        close_all(&writers, tasks, Duration::from_secs(2)).await;
        return std::mem::take(&mut *state.totals.borrow_mut());
    };
    let measure_start = start + plan.warmup;
    let end = measure_start + plan.duration;
    state.totals.borrow_mut().measure_start = Some(measure_start);

    let interval = plan.conversations as f64 / plan.rate;
    let mut lanes = Vec::with_capacity(visitors.len());
    for v in visitors {
        writers.push(v.writer.clone());
        tasks.push(glommio::spawn_local(receiver(
            ctx.protocol,
            v.reader,
            v.conv,
            v.local,
            state.clone(),
            coord.clone(),
            measure_start,
            end,
        )));
        lanes.push(Lane {
            writer: v.writer,
            conv: v.conv,
            local: v.local,
            offset: interval * (v.conv as f64 / plan.conversations as f64),
            open: true,
        });
    }
    let schedule = Schedule {
        start,
        interval,
        measure_start,
        end,
        tick: plan.tick,
    };
    pacer(ctx.protocol, lanes, &state, &coord, &schedule, plan.size).await;
    // Drain: wait for outstanding replies, bounded.
    let drain_deadline = Instant::now().max(end) + plan.drain;
    loop {
        let (sent, received) = {
            let t = state.totals.borrow();
            (t.sent, t.received)
        };
        if received >= sent || Instant::now() >= drain_deadline {
            break;
        }
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    coord.arrive(Phase::Loaded);
    // The main thread samples the server's CPU time, then lets the shards close their sessions.
    let _ = coord
        .wait_release(Phase::Loaded, Duration::from_secs(10))
        .await;
    state.closing.set(true);
    close_conversations(&sb_agents).await;
    let stuck = close_all(&writers, tasks, Duration::from_secs(5)).await;
    let mut totals = std::mem::take(&mut *state.totals.borrow_mut());
    if stuck > 0 {
        *totals
            .errors
            .entry("sessions not closed within 5s".into())
            .or_default() += stuck;
    }
    let arrivals = state.arrivals.borrow();
    let refused = state.refused.borrow();
    for (local, a) in arrivals.iter().enumerate() {
        let sent = state.sent_per_conv[local].get();
        let r = &refused[local];
        // A message refused with `overloaded` was not stored: it is not lost (the server said
        // so), and it never arrives.
        totals.refused += r.unique;
        totals.lost += (0..sent)
            .filter(|s| !a.contains(*s) && !r.contains(*s))
            .count() as u64;
        for seq in (0..sent)
            .filter(|s| !a.contains(*s) && !r.contains(*s))
            .take(20)
        {
            if totals.lost_sample.len() < 20 {
                totals.lost_sample.push(format!("{}:{seq}", mine[local]));
            }
        }
    }
    let agents = agent_stats.borrow();
    totals.agent_replies = agents.replies;
    totals.agent_ignored = agents.foreign;
    merge_tally(&mut totals.errors, &agents.errors);
    totals
}

type Agent = Option<(WsWriter, glommio::Task<()>)>;

/// Opens one conversation: relay = agent then visitor of the same room; echo = visitor; switchboard =
/// visitor, hello, handoff until assigned.
async fn set_up_conversation(
    ctx: &Ctx,
    shard: usize,
    conv: u64,
    sources: &Rc<RefCell<crate::net::SourceAddrs>>,
    agent_stats: Rc<RefCell<AgentStats>>,
    closing: Rc<Cell<bool>>,
    assign_timeout: Duration,
) -> Result<((WsReader, WsWriter), Agent), String> {
    let mut agent: Agent = None;
    if ctx.protocol == Protocol::Relay {
        let path = ctx.endpoints.agent_path(conv).expect("relay has agents");
        let source = sources.borrow_mut().next();
        let (reader, writer, _) = open_session(ctx, source, &path, seed(shard, conv, 1))
            .await
            .map_err(|r| format!("agent: {r}"))?;
        let task = glommio::spawn_local(agent_loop(
            ctx.protocol,
            reader,
            writer.clone(),
            agent_stats,
            closing,
            ctx.run_visitors(),
            Rc::default(),
        ));
        agent = Some((writer, task));
    }
    let path = ctx.endpoints.visitor_path(conv, None, None);
    let source = sources.borrow_mut().next();
    let (mut reader, writer, hello) = open_session(ctx, source, &path, seed(shard, conv, 2))
        .await
        .map_err(|r| format!("visitor: {r}"))?;
    if ctx.endpoints.issued_visitor_ids {
        // Before the handoff: this run's agents answer only the visitors recorded here.
        let visitor = hello
            .and_then(|hello| hello.visitor)
            .ok_or("visitor: hello without a visitor id")?;
        ctx.issued_visitors
            .lock()
            .expect("issued ids")
            .insert(visitor);
    }
    if ctx.protocol == Protocol::Switchboard {
        handoff_until_assigned(&mut reader, &writer, assign_timeout)
            .await
            .map_err(|r| format!("visitor: {r}"))?;
    }
    Ok(((reader, writer), agent))
}

/// Sends the pacer makes in a row before it lets the shard's other tasks run.
const SENDS_PER_YIELD: usize = 8;

/// One visitor in the shard's send schedule: its conversation sends message k at
/// `start + offset + k * interval`.
struct Lane {
    writer: WsWriter,
    conv: u64,
    local: usize,
    offset: f64,
    /// False once a send failed: the lane sends no more.
    open: bool,
}

/// The times of a relay run's schedule.
struct Schedule {
    start: Instant,
    interval: f64,
    measure_start: Instant,
    end: Instant,
    tick: Duration,
}

/// The shard's one sender: walks the schedule of all its visitors in time order and sends each message
/// around when it is due. It sleeps on one timer, waking at most once per `tick`, so the shard's
/// executor wakes (and enters io_uring) a few thousand times a second instead of once per message.
///
/// A wake sends every message due before the next wake can come: those already due, and those due
/// within one `tick` (sent up to a tick early). A message carries its schedule and how far ahead of
/// it it went out (`Probe::ahead_us`, from the instant the pacer picked it up, just before encoding
/// and sending it), and its latency is taken from the earlier of the two: a late send counts its lag
/// (no coordinated omission), an early one counts only the time it really took. Which messages are
/// measured still goes by the schedule.
///
/// Waiting for the tick would otherwise add half a tick to every message (0.1 ms at the default,
/// half the Go peer's p50 at 20,000/s), and the timer's own wake-up delay (~50 µs here) would count
/// in full. A send that blocks (a server that stopped reading) holds the later sends back; that lag
/// is in the latency too, and in the generator lag figures.
async fn pacer(
    protocol: Protocol,
    mut lanes: Vec<Lane>,
    state: &ShardState,
    coord: &Coordinator,
    schedule: &Schedule,
    size: usize,
) {
    if lanes.is_empty() {
        return;
    }
    // Within one round (same k) the lanes go in offset order; offsets are below the interval, so
    // (k, lane) in this order is time order.
    lanes.sort_by(|a, b| a.offset.total_cmp(&b.offset));
    let measure_from_us = coord.micros(schedule.measure_start);
    let mut text = String::with_capacity(size.max(32));
    let mut wrapped;
    let mut last_wake = Instant::now();
    let (mut k, mut i) = (0u64, 0usize);
    let mut sent_since_yield = 0;
    while !state.closing.get() {
        let lane = &mut lanes[i];
        let sched =
            schedule.start + Duration::from_secs_f64(lane.offset + k as f64 * schedule.interval);
        if sched >= schedule.end {
            break;
        }
        let mut now = Instant::now();
        if sched > now + schedule.tick {
            let wake = sched.checked_sub(schedule.tick).unwrap_or(sched);
            sleep_until(wake.max(last_wake + schedule.tick)).await;
            last_wake = Instant::now();
            sent_since_yield = 0;
            continue;
        }
        if sent_since_yield == SENDS_PER_YIELD {
            // Behind schedule, every send completes at once: let the readers (agents echoing, visitors
            // counting) run, or the server's queues towards them overflow while the pacer catches up.
            futures_lite::future::yield_now().await;
            sent_since_yield = 0;
            now = Instant::now();
        }
        sent_since_yield += 1;
        if lane.open {
            let probe = Probe {
                stream: lane.conv,
                seq: k,
                sched_us: coord.micros(sched),
                // In whole microseconds of the epoch, so that `start_us` is never after `now`.
                ahead_us: coord.micros(sched).saturating_sub(coord.micros(now)),
            };
            probe.encode_into(size, &mut text);
            let frame = if protocol == Protocol::Switchboard {
                wrapped = protocol::visitor_message(&format!("{}-{k}", lane.conv), &text);
                &wrapped
            } else {
                &text
            };
            {
                let mut t = state.totals.borrow_mut();
                t.sent += 1;
                if probe.sched_us >= measure_from_us {
                    t.sent_measured += 1;
                    t.send_lag.record(now.saturating_duration_since(sched));
                }
            }
            state.sent_per_conv[lane.local].set(k + 1);
            Progress::add(&coord.progress.sent, 1);
            if let Err(e) = lane.writer.send_text(frame).await {
                lane.open = false;
                if !state.closing.get() {
                    bump(
                        &mut state.totals.borrow_mut().errors,
                        format!("send: {}", e.reason()),
                    );
                }
            }
        }
        i += 1;
        if i == lanes.len() {
            i = 0;
            k += 1;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn receiver(
    protocol: Protocol,
    mut reader: WsReader,
    conv: u64,
    local: usize,
    state: Rc<ShardState>,
    coord: Arc<Coordinator>,
    measure_start: Instant,
    end: Instant,
) {
    loop {
        let result = reader
            .read_with(|m, _| {
                let now = Instant::now();
                let Message::Text(t) = m else {
                    state.totals.borrow_mut().unknown += 1;
                    return;
                };
                let frame;
                let probe_text = match protocol {
                    Protocol::Relay | Protocol::Echo => t,
                    Protocol::Switchboard => {
                        frame = match ServerFrame::parse(t) {
                            Ok(f) => f,
                            Err(_) => {
                                bump(
                                    &mut state.totals.borrow_mut().errors,
                                    "visitor: malformed json",
                                );
                                return;
                            }
                        };
                        match (frame.kind.as_ref(), frame.from.as_deref()) {
                            ("message", Some("agent")) => match frame.text.as_deref() {
                                Some(text) => text,
                                None => {
                                    state.totals.borrow_mut().unknown += 1;
                                    return;
                                }
                            },
                            ("ack", _) => {
                                state.totals.borrow_mut().acks += 1;
                                return;
                            }
                            ("error", _)
                                if frame.code.as_ref().and_then(|c| c.as_str())
                                    == Some("overloaded") =>
                            {
                                // An explicit refusal of message `{conv}-{seq}`: not stored.
                                let seq = frame
                                    .id
                                    .as_ref()
                                    .and_then(|id| id.as_str())
                                    .and_then(|id| id.strip_prefix(&format!("{conv}-")))
                                    .and_then(|seq| seq.parse::<u64>().ok());
                                let mut totals = state.totals.borrow_mut();
                                let Some(seq) =
                                    seq.filter(|s| *s < state.sent_per_conv[local].get())
                                else {
                                    bump(
                                        &mut totals.errors,
                                        "visitor: overloaded without a known id",
                                    );
                                    return;
                                };
                                state.refused.borrow_mut()[local].record(seq);
                                return;
                            }
                            ("error", _) => {
                                let code = frame.code.clone().unwrap_or_default();
                                bump(
                                    &mut state.totals.borrow_mut().errors,
                                    format!("visitor: server error {code}"),
                                );
                                return;
                            }
                            // Own messages fanned out back, typing, read, queue updates...
                            _ => return,
                        }
                    }
                };
                let mut totals = state.totals.borrow_mut();
                let Some(probe) = Probe::decode(probe_text) else {
                    totals.unknown += 1;
                    return;
                };
                if probe.stream != conv {
                    totals.misrouted += 1;
                    return;
                }
                if probe.seq >= state.sent_per_conv[local].get() {
                    totals.unknown += 1;
                    return;
                }
                match state.arrivals.borrow_mut()[local].record(probe.seq) {
                    Arrival::First => {
                        totals.received += 1;
                        Progress::add(&coord.progress.received, 1);
                        let sched = coord.instant_at(probe.sched_us);
                        if probe.sched_us >= coord.micros(measure_start) && sched < end {
                            let start = coord.instant_at(probe.start_us());
                            totals.latency.record(now.saturating_duration_since(start));
                            totals.received_measured += 1;
                            totals.last_measured_receive = Some(now);
                        }
                    }
                    Arrival::Duplicate => totals.duplicates += 1,
                }
            })
            .await;
        match result {
            Ok(None) => {}
            Ok(Some(code)) => {
                if !state.closing.get() {
                    bump(
                        &mut state.totals.borrow_mut().errors,
                        format!("visitor closed by server ({code})"),
                    );
                }
                return;
            }
            Err(e) => {
                if !state.closing.get() {
                    bump(
                        &mut state.totals.borrow_mut().errors,
                        format!("visitor session lost: {}", e.reason()),
                    );
                }
                return;
            }
        }
    }
}
