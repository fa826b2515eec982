//! Writes the Prometheus text exposition format (version 0.0.4): `# HELP` and `# TYPE` lines
//! and samples, with the `switchboard_` prefix added to every name.
//!
//! Invariants: help texts are escaped (`\\` and newlines), label values too (`\\`, `"`,
//! newlines); every line ends with `\n`. Names are the caller's static identifiers, written as
//! given. Grouping (all samples of a family right after its `# TYPE`) is the caller's order.

use std::fmt::{Display, Write};

/// Every metric name starts with this.
pub const PREFIX: &str = "switchboard_";

/// The text being written.
#[derive(Default, Debug)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// Starts a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.trim().replace('\\', r"\\").replace('\n', r"\n");
        let _ = writeln!(self.text, "# HELP {PREFIX}{name} {help}");
        let _ = writeln!(self.text, "# TYPE {PREFIX}{name} {kind}");
    }

    /// One sample with an integer value.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.sample_text(name, labels, &value.to_string());
    }

    /// One sample with a float value (`NaN`, `+Inf`, `-Inf` spelt as the format wants).
    pub fn sample_f64(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let text = if value.is_nan() {
            "NaN".to_string()
        } else if value.is_infinite() {
            if value > 0.0 { "+Inf" } else { "-Inf" }.to_string()
        } else {
            value.to_string()
        };
        self.sample_text(name, labels, &text);
    }

    /// One sample whose value is already formatted.
    pub fn sample_text(&mut self, name: &str, labels: &[(&str, &str)], value: &dyn Display) {
        let _ = write!(self.text, "{PREFIX}{name}");
        if !labels.is_empty() {
            self.text.push('{');
            for (index, (label, label_value)) in labels.iter().enumerate() {
                if index > 0 {
                    self.text.push(',');
                }
                let escaped = label_value
                    .replace('\\', r"\\")
                    .replace('"', "\\\"")
                    .replace('\n', r"\n");
                let _ = write!(self.text, "{label}=\"{escaped}\"");
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    pub fn finish(self) -> String {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_help_and_label_values() {
        let mut out = Exposition::default();
        out.family("x", "gauge", " a \\ b\nc ");
        out.sample("x", &[("l", "q\"\\\n")], 1);
        out.sample_f64("x", &[], f64::NAN);
        out.sample_f64("x", &[], 0.25);
        assert_eq!(
            out.finish(),
            "# HELP switchboard_x a \\\\ b\\nc\n# TYPE switchboard_x gauge\n\
             switchboard_x{l=\"q\\\"\\\\\\n\"} 1\nswitchboard_x NaN\nswitchboard_x 0.25\n"
        );
    }
}
