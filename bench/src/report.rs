//! The result of one scenario run: every figure (flat, named with its unit so runs can be compared
//! generically), failure reasons, whole histograms, time series, the settings and the load conditions.
//! Written as JSON with `--json`, printed as a table on stdout, read back by `compare`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::stats::HistogramJson;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Report {
    pub tool: String,
    pub version: String,
    pub scenario: String,
    /// Name of the system under test in tables and plots (`--label`, default from target and protocol).
    pub label: String,
    pub target: String,
    pub protocol: String,
    pub started_unix: u64,
    pub shards: usize,
    /// Cores the load generator's shards ran on (a CPU list such as `1` or `0-1`, or `unpinned`).
    #[serde(default)]
    pub generator_cores: Option<String>,
    /// Cores the server (`--pid`) could run on, from /proc (`unknown` without a pid).
    #[serde(default)]
    pub server_cores: Option<String>,
    /// Load average before and after the run: the machine is shared, absolute figures drift.
    pub loadavg_before: Option<[f64; 3]>,
    pub loadavg_after: Option<[f64; 3]>,
    pub settings: serde_json::Value,
    /// Ordered figures; the name carries the unit (`_ms`, `_per_s`, `_kb`, `_bytes`).
    pub figures: Vec<(String, f64)>,
    pub failures: BTreeMap<String, u64>,
    pub histograms: BTreeMap<String, HistogramJson>,
    /// Named `[x, y]` series, e.g. RSS over time or p99 against offered rate.
    pub series: BTreeMap<String, Vec<[f64; 2]>>,
    /// Sweep steps, each a set of figures.
    pub steps: Vec<BTreeMap<String, f64>>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(scenario: &str, label: &str, target: &str, protocol: &str, shards: usize) -> Report {
        Report {
            tool: "switchboard-bench".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            scenario: scenario.into(),
            label: label.into(),
            target: target.into(),
            protocol: protocol.into(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            shards,
            loadavg_before: crate::rss::load_average(),
            ..Report::default()
        }
    }

    pub fn set(&mut self, name: &str, value: f64) {
        match self.figures.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None => self.figures.push((name.to_string(), value)),
        }
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }

    pub fn add_failures(&mut self, failures: &BTreeMap<String, u64>) {
        for (k, v) in failures {
            *self.failures.entry(k.clone()).or_default() += v;
        }
    }

    pub fn finish(&mut self) {
        self.loadavg_after = crate::rss::load_average();
    }

    pub fn write_json(&self, path: &Path) -> Result<(), String> {
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    pub fn read_json(path: &Path) -> Result<Report, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| format!("{} is not a bench report: {e}", path.display()))
    }

    /// The final table on stdout.
    pub fn print_table(&self) {
        println!();
        println!(
            "== {} · {} · {} ({} protocol, {} shards)",
            self.scenario, self.label, self.target, self.protocol, self.shards
        );
        if self.generator_cores.is_some() || self.server_cores.is_some() {
            println!(
                "   cores: generator {} · server {}",
                self.generator_cores.as_deref().unwrap_or("unknown"),
                self.server_cores.as_deref().unwrap_or("unknown")
            );
        }
        if let (Some(b), Some(a)) = (self.loadavg_before, self.loadavg_after) {
            println!(
                "   load average before {:.2} / after {:.2} (1 min)",
                b[0], a[0]
            );
        }
        let width = self
            .figures
            .iter()
            .map(|(n, _)| n.len())
            .max()
            .unwrap_or(10)
            .max(10);
        for (name, value) in &self.figures {
            println!("   {name:<width$}  {}", format_value(*value));
        }
        if !self.failures.is_empty() {
            println!("   failures:");
            for (reason, n) in &self.failures {
                println!("     {n:>8}  {reason}");
            }
        }
        for note in &self.notes {
            println!("   note: {note}");
        }
    }
}

/// Numbers for humans: integers with thousands separators, others with up to 3 decimals.
pub fn format_value(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    if v.fract() == 0.0 && v.abs() < 1e15 {
        let digits = format!("{}", v.abs() as u64);
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        return if v < 0.0 { format!("-{out}") } else { out };
    }
    if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_numbers() {
        assert_eq!(format_value(1234567.0), "1,234,567");
        assert_eq!(format_value(12.3456), "12.346");
        assert_eq!(format_value(1234.56), "1234.6");
        assert_eq!(format_value(-1000.0), "-1,000");
    }

    #[test]
    fn set_keeps_order_and_overwrites() {
        let mut r = Report::new("relay", "x", "ws://127.0.0.1:1", "relay", 1);
        r.set("b", 1.0);
        r.set("a", 2.0);
        r.set("b", 3.0);
        assert_eq!(
            r.figures,
            vec![("b".to_string(), 3.0), ("a".to_string(), 2.0)]
        );
        let back: Report = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.get("b"), Some(3.0));
    }
}
