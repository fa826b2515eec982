//! `bot`: visitors ask questions the bot answers (switchboard protocol only; needs the bot of issue 5).
//! Questions come from `--queries` (one per line, or the first column of a CSV with a `text,...` header)
//! and are sent open-loop at `--rate` in total, round-robin over the list, so the first pass over the list
//! asks each question for the first time and later passes repeat them.
//!
//! Latency is taken from the scheduled send time to the bot's answer. Within a conversation the server
//! answers in order, so each visitor matches answers to its questions first-in first-out. Cache hits and
//! misses are reported apart when the answer says (`"cache":"hit"|"miss"` or `"cached":bool`); otherwise
//! the split is by "first ask" against "repeat" (a repeat can still miss: the cache is per server shard).
//! A visitor whose conversation is handed to a human (`queued`/`assigned`) stops asking; this is counted.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cli::BotArgs;
use crate::progress::Bars;
use crate::protocol::{self, Protocol, ServerFrame};
use crate::report::Report;
use crate::runtime::{run_shards, sleep_until, Coordinator, Phase, Progress};
use crate::scenario::{bump, close_all, merge_tally, open_session, seed, Ctx, Tally};
use crate::stats::Latency;
use crate::wsclient::{Incoming, WsWriter};

/// Reads questions: one per line, or the first column of a CSV whose header starts with `text`.
pub fn load_queries(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut lines = text.lines().peekable();
    let csv = lines
        .peek()
        .is_some_and(|h| h.trim().to_ascii_lowercase().starts_with("text,"));
    if csv {
        lines.next();
    }
    let queries: Vec<String> = lines
        .map(|l| {
            if csv {
                first_csv_field(l)
            } else {
                l.trim().to_string()
            }
        })
        .filter(|q| !q.is_empty())
        .collect();
    if queries.is_empty() {
        return Err(format!("{} holds no questions", path.display()));
    }
    Ok(queries)
}

/// First field of a CSV line, honouring double quotes ("" inside quotes is a quote).
fn first_csv_field(line: &str) -> String {
    let line = line.trim();
    if let Some(rest) = line.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = rest.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    out.push('"');
                } else {
                    break;
                }
            } else {
                out.push(c);
            }
        }
        out
    } else {
        line.split(',').next().unwrap_or("").trim().to_string()
    }
}

#[derive(Debug, Default)]
struct BotTotals {
    visitors_up: u64,
    setup_failures: Tally,
    errors: Tally,
    asked: u64,
    answered: u64,
    unanswered: u64,
    handoffs: u64,
    server_reports_cache: bool,
    hit: Latency,
    miss: Latency,
    first_ask: Latency,
    repeat_ask: Latency,
    all: Latency,
    measure_start: Option<Instant>,
    last_answer: Option<Instant>,
}

struct Question {
    sched: Instant,
    first_ask: bool,
}

struct ShardState {
    totals: RefCell<BotTotals>,
    closing: Cell<bool>,
}

pub fn run(args: &BotArgs) -> Result<Report, String> {
    let ctx = Arc::new(Ctx::new(&args.common)?);
    if ctx.protocol != Protocol::Switchboard {
        return Err("bot needs --protocol switchboard (the peers and /ws/echo have no bot)".into());
    }
    if args.rate <= 0.0 || args.visitors == 0 {
        return Err("--rate and --visitors must be positive".into());
    }
    let queries = Arc::new(load_queries(&args.queries)?);
    let bars = Bars::new(ctx.progress);
    let mut report = ctx.report("bot");
    report.settings = serde_json::json!({
        "rate_per_s": args.rate, "duration_s": args.duration.as_secs_f64(), "visitors": args.visitors,
        "queries_file": args.queries.display().to_string(), "queries": queries.len(),
        "warmup_s": args.warmup.as_secs_f64(), "drain_s": args.drain.as_secs_f64(),
    });
    let coord = Coordinator::new(ctx.shards);
    let counter = Arc::new(AtomicU64::new(0));
    let setup_bar = bars.counter("visitors", args.visitors);
    let run_secs = (args.warmup + args.duration).as_secs_f64();
    let run_bar = bars.timed("asking", run_secs);
    let work = {
        let (ctx, coord, args, queries, counter) = (
            ctx.clone(),
            coord.clone(),
            args.clone(),
            queries.clone(),
            counter.clone(),
        );
        move |shard| {
            shard_main(
                shard,
                ctx.clone(),
                coord.clone(),
                args.clone(),
                queries.clone(),
                counter.clone(),
            )
        }
    };
    let mut started: Option<Instant> = None;
    let monitor = || {
        let p = &coord.progress;
        setup_bar.set_position(Progress::get(&p.connected) + Progress::get(&p.failed));
        if coord.all_arrived(Phase::SetUp) && !coord.is_released(Phase::SetUp) {
            setup_bar.finish();
            let at = Instant::now() + Duration::from_millis(50);
            started = Some(at);
            coord.release(Phase::SetUp, at);
        }
        if let Some(at) = started {
            let t = Instant::now()
                .saturating_duration_since(at)
                .as_secs_f64()
                .min(run_secs);
            run_bar.set_position((t * 10.0) as u64);
            run_bar.set_message(format!(
                "asked {} answered {}",
                Progress::get(&p.sent),
                Progress::get(&p.received)
            ));
        }
    };
    let results = run_shards(ctx.shards, &ctx.cores, work, monitor)?;
    let mut t = BotTotals::default();
    for r in results {
        t.visitors_up += r.visitors_up;
        merge_tally(&mut t.setup_failures, &r.setup_failures);
        merge_tally(&mut t.errors, &r.errors);
        t.asked += r.asked;
        t.answered += r.answered;
        t.unanswered += r.unanswered;
        t.handoffs += r.handoffs;
        t.server_reports_cache |= r.server_reports_cache;
        t.hit.merge(&r.hit);
        t.miss.merge(&r.miss);
        t.first_ask.merge(&r.first_ask);
        t.repeat_ask.merge(&r.repeat_ask);
        t.all.merge(&r.all);
        t.measure_start = t.measure_start.or(r.measure_start);
        t.last_answer = match (t.last_answer, r.last_answer) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    report.set("rate_offered_per_s", args.rate);
    if let (Some(s), Some(l)) = (t.measure_start, t.last_answer) {
        let secs = l
            .saturating_duration_since(s)
            .as_secs_f64()
            .max(args.duration.as_secs_f64() * 0.5);
        report.set("answers_per_s", (t.all.count() as f64 / secs).round());
    }
    report.set("visitors_up", t.visitors_up as f64);
    report.set("asked", t.asked as f64);
    report.set("answered", t.answered as f64);
    report.set("unanswered", t.unanswered as f64);
    report.set("handoffs", t.handoffs as f64);
    let put = |name: &str, l: &Latency, report: &mut Report| {
        let s = l.summary();
        report.set(&format!("{name}_count"), s.count as f64);
        report.set(&format!("{name}_p50_ms"), s.p50_ms);
        report.set(&format!("{name}_p99_ms"), s.p99_ms);
        report.set(&format!("{name}_max_ms"), s.max_ms);
        report.histograms.insert(name.to_string(), l.to_json());
    };
    put("all", &t.all, &mut report);
    if t.server_reports_cache {
        put("cache_hit", &t.hit, &mut report);
        put("cache_miss", &t.miss, &mut report);
    } else {
        report
            .notes
            .push("the server does not report cache hits; split is first ask vs repeat".into());
        put("first_ask", &t.first_ask, &mut report);
        put("repeat_ask", &t.repeat_ask, &mut report);
    }
    report.add_failures(&t.setup_failures);
    report.add_failures(&t.errors);
    report.finish();
    if let Some(path) = &args.common.plot {
        let names: Vec<&str> = if t.server_reports_cache {
            vec!["cache_hit", "cache_miss"]
        } else {
            vec!["first_ask", "repeat_ask"]
        };
        let curves: Vec<crate::plot::Curve> = names
            .iter()
            .filter(|n| report.histograms[**n].summary.count > 0)
            .map(|n| crate::plot::Curve {
                label: format!("{} {n}", ctx.label),
                hist: &report.histograms[*n],
            })
            .collect();
        crate::plot::percentile_plot(
            path,
            &format!("bot answer latency at {}/s", args.rate),
            &curves,
        )?;
    }
    Ok(report)
}

async fn shard_main(
    shard: usize,
    ctx: Arc<Ctx>,
    coord: Arc<Coordinator>,
    args: BotArgs,
    queries: Arc<Vec<String>>,
    counter: Arc<AtomicU64>,
) -> BotTotals {
    let mine: Vec<u64> = (shard as u64..args.visitors).step_by(ctx.shards).collect();
    let state = Rc::new(ShardState {
        totals: RefCell::new(BotTotals::default()),
        closing: Cell::new(false),
    });
    let mut sources = ctx.source_addrs(shard);
    let mut sessions = Vec::new();
    for &v in &mine {
        match open_session(
            &ctx,
            sources.next(),
            &ctx.endpoints.visitor_path(v, None, None),
            seed(shard, v, 0),
        )
        .await
        {
            Ok((r, w, _)) => {
                Progress::add(&coord.progress.connected, 1);
                sessions.push((v, r, w));
            }
            Err(reason) => {
                bump(&mut state.totals.borrow_mut().setup_failures, reason);
                Progress::add(&coord.progress.failed, 1);
            }
        }
    }
    state.totals.borrow_mut().visitors_up = sessions.len() as u64;
    coord.arrive(Phase::SetUp);
    let Some(start) = coord
        .wait_release(Phase::SetUp, Duration::from_secs(3600))
        .await
    else {
        return std::mem::take(&mut *state.totals.borrow_mut());
    };
    let measure_start = start + args.warmup;
    let end = measure_start + args.duration;
    state.totals.borrow_mut().measure_start = Some(measure_start);
    let interval = args.visitors as f64 / args.rate;
    let mut writers: Vec<WsWriter> = Vec::new();
    let mut tasks = Vec::new();
    let mut senders = Vec::new();
    for (v, mut reader, writer) in sessions {
        let outstanding: Rc<RefCell<VecDeque<Question>>> = Rc::default();
        let handed_off = Rc::new(Cell::new(false));
        writers.push(writer.clone());
        {
            let (state, outstanding, handed_off, coord) = (
                state.clone(),
                outstanding.clone(),
                handed_off.clone(),
                coord.clone(),
            );
            tasks.push(glommio::spawn_local(async move {
                loop {
                    match reader.recv().await {
                        Ok(Incoming::Text(t)) => {
                            let now = Instant::now();
                            let Ok(f) = ServerFrame::parse(&t) else {
                                bump(&mut state.totals.borrow_mut().errors, "malformed json");
                                continue;
                            };
                            let mut tot = state.totals.borrow_mut();
                            match (f.kind.as_ref(), f.from.as_deref()) {
                                ("message", Some("bot")) => {
                                    let Some(q) = outstanding.borrow_mut().pop_front() else {
                                        bump(&mut tot.errors, "bot answer without a question");
                                        continue;
                                    };
                                    tot.answered += 1;
                                    Progress::add(&coord.progress.received, 1);
                                    if q.sched < measure_start || q.sched >= end {
                                        continue;
                                    }
                                    let lat = now.saturating_duration_since(q.sched);
                                    tot.all.record(lat);
                                    tot.last_answer = Some(now);
                                    if let Some(hit) = f.cache_hit() {
                                        tot.server_reports_cache = true;
                                        if hit {
                                            tot.hit.record(lat)
                                        } else {
                                            tot.miss.record(lat)
                                        }
                                    }
                                    if q.first_ask {
                                        tot.first_ask.record(lat)
                                    } else {
                                        tot.repeat_ask.record(lat)
                                    }
                                }
                                ("queued", _) | ("assigned", _) if !handed_off.get() => {
                                    handed_off.set(true);
                                    tot.handoffs += 1;
                                    outstanding.borrow_mut().pop_front();
                                }
                                ("error", _) => {
                                    outstanding.borrow_mut().pop_front();
                                    bump(
                                        &mut tot.errors,
                                        format!(
                                            "server error {}",
                                            f.code.clone().unwrap_or_default()
                                        ),
                                    );
                                }
                                _ => {}
                            }
                        }
                        Ok(Incoming::Binary(_)) => {}
                        Ok(Incoming::Close(code)) => {
                            if !state.closing.get() {
                                bump(
                                    &mut state.totals.borrow_mut().errors,
                                    format!("closed by server ({code})"),
                                );
                            }
                            return;
                        }
                        Err(e) => {
                            if !state.closing.get() {
                                bump(
                                    &mut state.totals.borrow_mut().errors,
                                    format!("session lost: {}", e.reason()),
                                );
                            }
                            return;
                        }
                    }
                }
            }));
        }
        let offset = interval * (v as f64 / args.visitors as f64);
        let (state, coord, queries, counter) = (
            state.clone(),
            coord.clone(),
            queries.clone(),
            counter.clone(),
        );
        senders.push(glommio::spawn_local(async move {
            for k in 0u64.. {
                let sched = start + Duration::from_secs_f64(offset + k as f64 * interval);
                if sched >= end || handed_off.get() || state.closing.get() {
                    break;
                }
                sleep_until(sched).await;
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let query = &queries[(n % queries.len() as u64) as usize];
                outstanding.borrow_mut().push_back(Question {
                    sched,
                    first_ask: n < queries.len() as u64,
                });
                state.totals.borrow_mut().asked += 1;
                Progress::add(&coord.progress.sent, 1);
                let msg = protocol::visitor_message(&format!("q{v}-{k}"), query);
                if let Err(e) = writer.send_text(&msg).await {
                    bump(
                        &mut state.totals.borrow_mut().errors,
                        format!("send: {}", e.reason()),
                    );
                    break;
                }
            }
            // Wait (bounded) for this visitor's answers.
            let deadline = Instant::now().max(end) + args.drain;
            while !outstanding.borrow().is_empty() && Instant::now() < deadline && !handed_off.get()
            {
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            let left = outstanding.borrow().len() as u64;
            state.totals.borrow_mut().unanswered += left;
        }));
    }
    for s in senders {
        s.await;
    }
    coord.arrive(Phase::Loaded);
    state.closing.set(true);
    let stuck = close_all(&writers, tasks, Duration::from_secs(5)).await;
    let mut totals = std::mem::take(&mut *state.totals.borrow_mut());
    if stuck > 0 {
        *totals
            .errors
            .entry("sessions not closed within 5s".into())
            .or_default() += stuck;
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_plain_and_csv_queries() {
        let dir = std::env::temp_dir().join(format!("bench-queries-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = dir.join("q.txt");
        std::fs::write(&plain, "how do I top up?\n\n  card lost \n").unwrap();
        assert_eq!(
            load_queries(&plain).unwrap(),
            vec!["how do I top up?", "card lost"]
        );
        let csv = dir.join("q.csv");
        std::fs::write(
            &csv,
            "text,category\n\"Hi, my card, \"\"new\"\"\",card_arrival\nwhere is it,card_arrival\n",
        )
        .unwrap();
        assert_eq!(
            load_queries(&csv).unwrap(),
            vec!["Hi, my card, \"new\"", "where is it"]
        );
        let empty = dir.join("e.txt");
        std::fs::write(&empty, "\n").unwrap();
        assert!(load_queries(&empty).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
