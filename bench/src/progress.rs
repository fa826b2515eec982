//! Progress bars for long phases (indicatif). Bars draw on stderr and hide themselves when stderr is not a
//! terminal or `--no-progress` is given, so reports on stdout stay clean.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Bars {
    multi: MultiProgress,
    enabled: bool,
}

impl Bars {
    pub fn new(enabled: bool) -> Bars {
        let target = if enabled {
            ProgressDrawTarget::stderr_with_hz(10)
        } else {
            ProgressDrawTarget::hidden()
        };
        Bars {
            multi: MultiProgress::with_draw_target(target),
            enabled,
        }
    }

    /// A bar counting `total` items.
    pub fn counter(&self, name: &str, total: u64) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new(total));
        bar.set_style(
            ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {per_sec} {msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.set_prefix(name.to_string());
        bar
    }

    /// A bar over a phase of `secs` seconds (position in tenths of a second).
    pub fn timed(&self, name: &str, secs: f64) -> ProgressBar {
        let bar = self
            .multi
            .add(ProgressBar::new((secs * 10.0).ceil().max(1.0) as u64));
        bar.set_style(
            ProgressStyle::with_template("{prefix:>10} [{bar:30}] {elapsed_precise} {msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.set_prefix(name.to_string());
        bar
    }

    /// A line on stderr above the bars (plainly when the bars are hidden).
    pub fn println(&self, line: &str) {
        if self.enabled && !self.multi.is_hidden() {
            let _ = self.multi.println(line);
        } else {
            eprintln!("{line}");
        }
    }
}
