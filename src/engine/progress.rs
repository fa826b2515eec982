//! The progress bar `kb import` shows while it embeds the knowledge base's questions (and,
//! when it fine-tunes the encoder, one bar per stage: the frozen layers, the training steps,
//! the embedding with the tuned layers).
//!
//! Sans-IO: [`ImportProgress::update`] takes how many questions are done and how long it has
//! been, and returns the line to show now, or `None` when nothing changed enough to redraw; the
//! caller writes it (on a terminal over the previous line with `\r`, elsewhere as a new line).
//!
//! Invariants:
//! - On a terminal a line is produced at most every [`REDRAW_INTERVAL`] (and always for the
//!   last question); elsewhere (a log file, CI) once per tenth of the work, so a redirected
//!   import of 10,000 questions writes about ten lines, not thousands.
//! - The estimate of the time left is the elapsed time scaled by the share left; it is only
//!   shown once 2% of the questions are done, when the rate means something.

use std::time::Duration;

/// Least time between two redraws on a terminal.
pub const REDRAW_INTERVAL: Duration = Duration::from_millis(200);

/// Width of the bar in characters.
const BAR_WIDTH: usize = 30;

/// State of one import's progress bar.
#[derive(Debug, Clone)]
pub struct ImportProgress {
    total: usize,
    terminal: bool,
    /// When the last line was produced (terminal mode).
    last_drawn: Option<Duration>,
    /// Tenths already reported (line mode).
    last_tenth: usize,
    /// What the bar counts: the stage's name and its unit.
    label: &'static str,
    unit: &'static str,
}

impl ImportProgress {
    /// A bar for `total` questions; `terminal`: redraw in place (stderr is a terminal).
    pub fn new(total: usize, terminal: bool) -> Self {
        ImportProgress {
            total,
            terminal,
            last_drawn: None,
            last_tenth: 0,
            label: "embedding",
            unit: "questions",
        }
    }

    /// The same bar for another stage: `label` starts the line, `unit` names what is counted.
    pub fn labelled(mut self, label: &'static str, unit: &'static str) -> Self {
        self.label = label;
        self.unit = unit;
        self
    }

    /// The line to show now that `done` of the questions are embedded after `elapsed`.
    pub fn update(&mut self, done: usize, elapsed: Duration) -> Option<String> {
        let done = done.min(self.total);
        let finished = done == self.total;
        if self.terminal {
            let due = self
                .last_drawn
                .is_none_or(|last| elapsed.saturating_sub(last) >= REDRAW_INTERVAL);
            if !due && !finished {
                return None;
            }
            self.last_drawn = Some(elapsed);
        } else {
            let tenth = (done * 10).checked_div(self.total).unwrap_or(10);
            if tenth <= self.last_tenth && !(finished && self.last_tenth < 10) {
                return None;
            }
            self.last_tenth = tenth.max(usize::from(finished) * 10);
        }
        Some(self.render(done, elapsed))
    }

    fn render(&self, done: usize, elapsed: Duration) -> String {
        let share = if self.total == 0 {
            1.0
        } else {
            done as f64 / self.total as f64
        };
        let filled = ((share * BAR_WIDTH as f64).round() as usize).min(BAR_WIDTH);
        let bar: String = "#".repeat(filled) + &".".repeat(BAR_WIDTH - filled);
        let seconds = elapsed.as_secs_f64();
        let rate = if seconds > 0.0 {
            done as f64 / seconds
        } else {
            0.0
        };
        let left = if done == self.total {
            "done".to_string()
        } else if share >= 0.02 {
            format!("about {:.0} s left", seconds * (1.0 - share) / share)
        } else {
            "estimating".to_string()
        };
        format!(
            "{} [{bar}] {done}/{} {:>3.0}%  {seconds:.0} s, {rate:.0} {}/s, {left}",
            self.label,
            self.total,
            100.0 * share,
            self.unit
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_log_gets_one_line_per_tenth_and_the_last() {
        let mut progress = ImportProgress::new(1000, false);
        let lines: Vec<String> = (1..=1000)
            .filter_map(|done| progress.update(done, ms(done as u64 * 10)))
            .collect();
        assert_eq!(lines.len(), 10, "{lines:#?}");
        assert!(lines[0].contains("100/1000  10%"), "{}", lines[0]);
        assert!(lines[0].contains("about 9 s left"), "{}", lines[0]);
        let last = lines.last().unwrap();
        assert!(last.contains("[##############################] 1000/1000 100%"));
        assert!(last.ends_with("done"), "{last}");
        // Nothing more once finished.
        assert_eq!(progress.update(1000, ms(20_000)), None);
    }

    #[test]
    fn a_terminal_is_redrawn_at_most_every_interval_and_at_the_end() {
        let mut progress = ImportProgress::new(100, true);
        assert!(progress.update(1, ms(0)).is_some());
        assert_eq!(progress.update(2, ms(100)), None);
        let line = progress.update(3, ms(250)).unwrap();
        assert!(line.contains("3/100   3%"), "{line}");
        assert!(line.contains("questions/s"), "{line}");
        assert!(progress.update(100, ms(260)).unwrap().ends_with("done"));
    }

    #[test]
    fn a_stage_bar_names_its_stage_and_unit() {
        let mut progress = ImportProgress::new(10, false).labelled("fine-tuning", "steps");
        let line = progress.update(5, ms(1000)).unwrap();
        assert!(line.starts_with("fine-tuning ["), "{line}");
        assert!(line.contains("5/10  50%  1 s, 5 steps/s"), "{line}");
    }

    #[test]
    fn no_estimate_before_two_percent_and_an_empty_import_is_done() {
        let mut progress = ImportProgress::new(1000, true);
        assert!(progress
            .update(10, ms(500))
            .unwrap()
            .ends_with("estimating"));
        let mut empty = ImportProgress::new(0, false);
        assert!(empty.update(0, ms(1)).unwrap().ends_with("done"));
        assert_eq!(empty.update(0, ms(2)), None);
    }
}
