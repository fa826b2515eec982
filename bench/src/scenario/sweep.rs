//! `sweep`: runs the relay scenario at rising rates (each step on fresh sessions), multiplying the rate by
//! `--factor` while a step passes (dividing by it if the first step already fails), then bisecting between
//! the highest pass and the lowest failure. A step passes
//! when p99 <= `--p99-limit`, nothing is lost, duplicated or misrouted, no session failed, and the achieved
//! throughput is within 3% of the offered rate. The answer is the highest passing rate.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::cli::SweepArgs;
use crate::progress::Bars;
use crate::report::Report;
use crate::scenario::relay::{self, RelayPlan, RelayTotals};
use crate::scenario::Ctx;

/// Machine steal (see [`relay::MachineSteal`]) from which a step's line says how much there was.
pub const STEAL_NOTE_PERCENT: f64 = 1.0;

/// What a step's line adds about the hypervisor's steal: nothing below [`STEAL_NOTE_PERCENT`].
pub fn steal_note(percent: Option<f64>) -> String {
    match percent {
        Some(p) if p >= STEAL_NOTE_PERCENT => {
            format!("  (machine steal {p:.1}%: the hypervisor held the cores back)")
        }
        _ => String::new(),
    }
}

/// Why a step failed, or `None` if it passed.
pub fn verdict(t: &RelayTotals, plan: &RelayPlan, p99_limit: Duration) -> Option<String> {
    let p99 = t.latency.summary().p99_ms;
    let limit_ms = p99_limit.as_secs_f64() * 1000.0;
    if t.conversations_up < plan.conversations {
        return Some(format!(
            "{} of {} conversations up",
            t.conversations_up, plan.conversations
        ));
    }
    if t.lost > 0 {
        return Some(format!("{} lost", t.lost));
    }
    if t.duplicates > 0 || t.misrouted > 0 || t.unknown > 0 {
        return Some(format!(
            "{} duplicated, {} misrouted, {} unknown",
            t.duplicates, t.misrouted, t.unknown
        ));
    }
    let errors: u64 = t.errors.values().sum();
    if errors > 0 {
        return Some(format!("{errors} session errors"));
    }
    if p99 > limit_ms {
        return Some(format!("p99 {p99:.1} ms > {limit_ms:.0} ms"));
    }
    let tput = t.throughput(plan);
    if tput < plan.rate * 0.97 {
        return Some(format!(
            "throughput {tput:.0}/s < 97% of {:.0}/s",
            plan.rate
        ));
    }
    None
}

/// What the fixed-rate step adds to a sweep report.
struct FixedStep {
    /// `fixed_*` figures, in report order.
    figures: Vec<(String, f64)>,
    /// Why the step failed, if it did.
    note: Option<String>,
}

/// The step at `--fixed-rate` before the sweep: its figures, named `fixed_*`, and a note if the step
/// failed. The report lists them right after the highest rate, so that the server's CPU time per round
/// trip at a rate every system sustains stands next to it.
fn fixed_step(
    ctx: &Ctx,
    base: &RelayPlan,
    rate: f64,
    args: &SweepArgs,
    bars: &Bars,
) -> Result<FixedStep, String> {
    let plan = RelayPlan {
        rate,
        duration: args.fixed_duration,
        ..base.clone()
    };
    let fixed_ctx = Arc::new(ctx.with_new_run_id(0));
    let totals = relay::execute(&fixed_ctx, &plan, bars)?;
    let v = verdict(&totals, &plan, args.p99_limit);
    let mut figures = Report::default();
    totals.fill(&plan, &mut figures);
    let mut fixed = vec![("fixed_rate_per_s".to_string(), rate)];
    for name in [
        "throughput_per_s",
        "p50_ms",
        "p99_ms",
        "lost",
        "server_cpu_us_per_round_trip",
        "server_cpu_percent",
        "machine_steal_percent",
    ] {
        if let Some(value) = figures.get(name) {
            fixed.push((format!("fixed_{name}"), value));
        }
    }
    fixed.push(("fixed_passed".into(), if v.is_none() { 1.0 } else { 0.0 }));
    let cpu = figures
        .get("server_cpu_us_per_round_trip")
        .map(|us| format!("  server CPU {us:.1} µs/round trip"))
        .unwrap_or_default();
    bars.println(&format!(
        "fixed   : {:>9.0}/s  throughput {:>9.0}/s  p50 {:>8.2} ms  p99 {:>8.2} ms  lost {:>6}{cpu}  {}{}",
        rate,
        totals.throughput(&plan),
        figures.get("p50_ms").unwrap_or(0.0),
        figures.get("p99_ms").unwrap_or(0.0),
        totals.lost,
        v.as_deref()
            .map(|r| format!("FAIL: {r}"))
            .unwrap_or_else(|| "pass".into()),
        steal_note(figures.get("machine_steal_percent"))
    ));
    let note = v.map(|reason| format!("the fixed rate {rate}/s was not sustained: {reason}"));
    std::thread::sleep(Duration::from_millis(500));
    Ok(FixedStep {
        figures: fixed,
        note,
    })
}

/// Writes the fixed-rate step's figures and note into the report.
fn set_fixed(report: &mut Report, fixed: &Option<FixedStep>) {
    if let Some(step) = fixed {
        for (name, value) in &step.figures {
            report.set(name, *value);
        }
        report.notes.extend(step.note.clone());
    }
}

pub fn run(args: &SweepArgs) -> Result<Report, String> {
    let ctx = Arc::new(Ctx::new(&args.common)?);
    if args.factor <= 1.0 {
        return Err("--factor must be above 1".into());
    }
    let bars = Bars::new(ctx.progress);
    let mut report = ctx.report("sweep");
    let base = RelayPlan::new(&args.shape, args.start_rate, args.step_duration)?;
    report.settings = relay::settings(&ctx, &base);
    if let serde_json::Value::Object(m) = &mut report.settings {
        m.insert(
            "p99_limit_ms".into(),
            (args.p99_limit.as_secs_f64() * 1000.0).into(),
        );
        m.insert("factor".into(), args.factor.into());
        m.insert("refine".into(), args.refine.into());
    }

    let fixed = match args.fixed_rate {
        Some(rate) => Some(fixed_step(&ctx, &base, rate, args, &bars)?),
        None => None,
    };

    let mut best: Option<(f64, RelayTotals)> = None;
    let mut steps = 0u32;
    let mut rate = args.start_rate;
    let run_step = |rate: f64,
                    report: &mut Report,
                    steps: &mut u32|
     -> Result<(bool, RelayTotals), String> {
        *steps += 1;
        let plan = RelayPlan {
            rate,
            ..base.clone()
        };
        let step_ctx = Arc::new(ctx.with_new_run_id(*steps as usize));
        let totals = relay::execute(&step_ctx, &plan, &bars)?;
        let v = verdict(&totals, &plan, args.p99_limit);
        let s = totals.latency.summary();
        let mut step = BTreeMap::new();
        step.insert("rate_offered_per_s".to_string(), rate);
        step.insert(
            "throughput_per_s".to_string(),
            totals.throughput(&plan).round(),
        );
        step.insert("p50_ms".to_string(), s.p50_ms);
        step.insert("p99_ms".to_string(), s.p99_ms);
        step.insert("p999_ms".to_string(), s.p999_ms);
        step.insert("max_ms".to_string(), s.max_ms);
        step.insert("lost".to_string(), totals.lost as f64);
        step.insert(
            "errors".to_string(),
            totals.errors.values().sum::<u64>() as f64,
        );
        if let Some(us) = totals.server_cpu_us_per_round_trip() {
            step.insert("server_cpu_us_per_round_trip".to_string(), us);
        }
        let steal = totals.machine_steal.map(|steal| steal.percent());
        if let Some(percent) = steal {
            step.insert("machine_steal_percent".to_string(), percent);
        }
        step.insert("passed".to_string(), if v.is_none() { 1.0 } else { 0.0 });
        report.steps.push(step);
        bars.println(&format!(
            "step {:>2}: {:>9.0}/s  throughput {:>9.0}/s  p50 {:>8.2} ms  p99 {:>8.2} ms  lost {:>6}  {}{}",
            steps,
            rate,
            totals.throughput(&plan),
            s.p50_ms,
            s.p99_ms,
            totals.lost,
            v.as_deref().map(|r| format!("FAIL: {r}")).unwrap_or_else(|| "pass".into()),
            steal_note(steal)
        ));
        // Let TIME_WAIT sockets and server-side state settle between steps.
        std::thread::sleep(Duration::from_millis(500));
        Ok((v.is_none(), totals))
    };

    // Bracket: up by `factor` while steps pass; if the very first step fails, down by `factor` until one
    // passes. Then bisect between the highest pass and the lowest failure.
    let mut lowest_fail: Option<f64> = None;
    while steps < args.max_steps && (1.0..=args.max_rate).contains(&rate) {
        let (passed, totals) = run_step(rate, &mut report, &mut steps)?;
        if passed {
            best = Some((rate, totals));
            if lowest_fail.is_some() {
                break;
            }
            rate *= args.factor;
        } else {
            lowest_fail = Some(rate);
            if best.is_some() {
                break;
            }
            rate = (rate / args.factor).round();
        }
    }
    if let Some(fail) = lowest_fail {
        let mut lo = best.as_ref().map(|b| b.0).unwrap_or(0.0);
        let mut hi = fail;
        for _ in 0..args.refine {
            if steps >= args.max_steps {
                break;
            }
            let mid = ((lo + hi) / 2.0).round();
            if mid <= lo || mid >= hi || mid < 1.0 {
                break;
            }
            let (passed, totals) = run_step(mid, &mut report, &mut steps)?;
            if passed {
                lo = mid;
                best = Some((mid, totals));
            } else {
                hi = mid;
            }
        }
        lowest_fail = Some(hi);
    }

    report.set("steps", steps as f64);
    report.set("p99_limit_ms", args.p99_limit.as_secs_f64() * 1000.0);
    match &best {
        Some((rate, totals)) => {
            report.set("max_sustained_rate_per_s", *rate);
            set_fixed(&mut report, &fixed);
            let plan = RelayPlan {
                rate: *rate,
                ..base.clone()
            };
            totals.fill(&plan, &mut report);
        }
        None => {
            report.set("max_sustained_rate_per_s", 0.0);
            set_fixed(&mut report, &fixed);
            report.notes.push(format!(
                "no step passed, down to {} msg/s",
                lowest_fail.unwrap_or(args.start_rate)
            ));
        }
    }
    // The most the hypervisor took in any step of the sweep proper (the fixed step has its own
    // `fixed_machine_steal_percent`): a failure in a step that lost a tenth of the cores says
    // little about the server (bench/README.md, "Machine steal").
    let most_steal = report
        .steps
        .iter()
        .filter_map(|step| step.get("machine_steal_percent").copied())
        .reduce(f64::max);
    if let Some(percent) = most_steal {
        report.set("max_step_steal_percent", percent);
    }
    if let Some(f) = lowest_fail {
        report.set("lowest_failing_rate_per_s", f);
    } else {
        report
            .notes
            .push("no step failed: raise --max-rate or --max-steps to find the limit".into());
    }
    let p99s: Vec<[f64; 2]> = report
        .steps
        .iter()
        .map(|s| [s["rate_offered_per_s"], s["p99_ms"]])
        .collect::<Vec<_>>();
    let mut sorted = p99s.clone();
    sorted.sort_by(|a, b| a[0].total_cmp(&b[0]));
    report.series.insert("p99_ms_by_rate".into(), sorted);
    report.finish();
    if let Some(path) = &args.common.plot {
        let mut lines = vec![crate::plot::Line {
            label: format!("{} p99", ctx.label),
            points: report.series["p99_ms_by_rate"].clone(),
        }];
        let limit = args.p99_limit.as_secs_f64() * 1000.0;
        let (lo, hi) = report.series["p99_ms_by_rate"]
            .iter()
            .fold((f64::MAX, 0f64), |(a, b), p| (a.min(p[0]), b.max(p[0])));
        if hi > 0.0 {
            lines.push(crate::plot::Line {
                label: "p99 limit".into(),
                points: vec![[lo, limit], [hi, limit]],
            });
        }
        crate::plot::line_plot(
            path,
            "relay sweep: p99 by offered rate",
            "offered rate (msg/s)",
            "p99 (ms)",
            lines,
        )?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::relay::MachineSteal;

    #[test]
    fn a_step_says_how_much_the_hypervisor_stole() {
        let steal = MachineSteal {
            seconds: 3.0,
            wall_seconds: 10.0,
            cores: 2,
        };
        assert_eq!(steal.percent(), 15.0);
        assert_eq!(
            steal_note(Some(steal.percent())),
            "  (machine steal 15.0%: the hypervisor held the cores back)"
        );
        assert_eq!(steal_note(Some(0.4)), "", "below the threshold");
        assert_eq!(steal_note(None), "", "not measured");
        let none = MachineSteal {
            seconds: 0.0,
            wall_seconds: 0.0,
            cores: 2,
        };
        assert_eq!(none.percent(), 0.0, "an empty window divides by nothing");
    }
}
