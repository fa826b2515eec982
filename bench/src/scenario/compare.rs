//! `compare a.json b.json ...`: reads reports, prints their figures side by side with the ratio of each
//! report to the first (the baseline), and optionally plots their latency histograms together.

use std::path::PathBuf;

use crate::cli::CompareArgs;
use crate::report::{format_value, Report};

/// The histogram a report is best compared on.
fn main_histogram(r: &Report) -> Option<&str> {
    ["latency", "handshake", "all", "reply_latency"]
        .into_iter()
        .find(|k| r.histograms.contains_key(*k))
}

/// Builds the comparison table as text lines.
pub fn table(reports: &[Report], only: &[String]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for r in reports {
        for (n, _) in &r.figures {
            if !names.contains(n) && (only.is_empty() || only.contains(n)) {
                names.push(n.clone());
            }
        }
    }
    let mut header = vec!["figure".to_string()];
    for (i, r) in reports.iter().enumerate() {
        header.push(r.label.clone());
        if i > 0 {
            header.push(format!(
                "{} / {}",
                short(&r.label),
                short(&reports[0].label)
            ));
        }
    }
    let mut rows = vec![header];
    for n in &names {
        let mut row = vec![n.clone()];
        let base = reports[0].get(n);
        for (i, r) in reports.iter().enumerate() {
            let v = r.get(n);
            row.push(v.map(format_value).unwrap_or_else(|| "-".into()));
            if i > 0 {
                row.push(match (v, base) {
                    (Some(v), Some(b)) if b != 0.0 => format!("{:.2}x", v / b),
                    _ => "-".into(),
                });
            }
        }
        rows.push(row);
    }
    let cols = rows[0].len();
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .map(|(c, cell)| {
                    if c == 0 {
                        format!("{cell:<w$}", w = widths[c])
                    } else {
                        format!("{cell:>w$}", w = widths[c])
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
        })
        .collect()
}

fn short(label: &str) -> &str {
    label.split_whitespace().next().unwrap_or(label)
}

pub fn run(args: &CompareArgs) -> Result<(), String> {
    let reports: Vec<Report> = args
        .reports
        .iter()
        .map(|p: &PathBuf| Report::read_json(p))
        .collect::<Result<_, _>>()?;
    let scenarios: Vec<&str> = reports.iter().map(|r| r.scenario.as_str()).collect();
    println!(
        "== compare: {} (baseline: {})",
        scenarios.join(", "),
        reports[0].label
    );
    for r in &reports {
        let load = r
            .loadavg_before
            .map(|l| format!("load {:.2}", l[0]))
            .unwrap_or_default();
        println!(
            "   {} = {} {} ({} protocol) {}",
            r.label, r.scenario, r.target, r.protocol, load
        );
    }
    for line in table(&reports, &args.figures) {
        println!("{line}");
    }
    if let Some(path) = &args.plot {
        let curves: Vec<crate::plot::Curve> = reports
            .iter()
            .filter_map(|r| {
                main_histogram(r).map(|h| crate::plot::Curve {
                    label: match r.get("rate_offered_per_s") {
                        Some(rate) => format!(
                            "{} ({} at {}/s)",
                            r.label,
                            r.scenario,
                            format_value(rate.round())
                        ),
                        None => format!("{} ({})", r.label, r.scenario),
                    },
                    hist: &r.histograms[h],
                })
            })
            .filter(|c| c.hist.summary.count > 0)
            .collect();
        if curves.is_empty() {
            return Err("no report has a latency histogram to plot".into());
        }
        crate::plot::percentile_plot(path, "latency by percentile", &curves)?;
        println!("plot written to {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_against_the_first_report() {
        let mut a = Report::new("relay", "go 127.0.0.1:9100", "ws://a", "relay", 2);
        a.set("throughput_per_s", 1000.0);
        a.set("p99_ms", 10.0);
        let mut b = Report::new("relay", "switchboard 127.0.0.1:8080", "ws://b", "echo", 2);
        b.set("throughput_per_s", 2500.0);
        b.set("only_b", 1.0);
        let lines = table(&[a, b], &[]);
        assert!(lines[0].contains("switchboard / go"), "{lines:?}");
        let tput = lines
            .iter()
            .find(|l| l.starts_with("throughput_per_s"))
            .unwrap();
        assert!(tput.contains("2.50x"), "{tput}");
        let p99 = lines.iter().find(|l| l.starts_with("p99_ms")).unwrap();
        assert!(p99.trim_end().ends_with('-'), "{p99}");
        assert!(lines.iter().any(|l| l.starts_with("only_b")));
    }
}
