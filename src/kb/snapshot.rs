//! Human-facing views of a knowledge-base version: `kb export` (JSON that `kb import`
//! takes back unchanged) and `kb list` (one line per entry).
//!
//! Invariants:
//! - `import_json(export_json(entries))` returns `entries` for any valid, normalised
//!   entries (what imports and replicas hold): the export is the import format.
//! - `list` never prints a line break or control character from the data, and cuts
//!   answers to [`PREVIEW_CHARS`] characters.

use std::io::{self, Write};

use super::entry::Entry;
use super::replica::VersionInfo;

/// Characters of the answer shown by `list`.
pub const PREVIEW_CHARS: usize = 60;

/// The entries as a pretty-printed JSON array (with a final newline).
pub fn export_json(entries: &[Entry]) -> String {
    let mut text = serde_json::to_string_pretty(entries).expect("entries always serialise to JSON");
    text.push('\n');
    text
}

/// Writes [`export_json`] to `out`.
pub fn write_export(entries: &[Entry], mut out: impl Write) -> io::Result<()> {
    out.write_all(export_json(entries).as_bytes())
}

/// One line describing a version: number, counts, dimension, model.
pub fn describe(info: &VersionInfo) -> String {
    format!(
        "version {}: {} entries, {} questions, dimension {}, model {}{}",
        info.version,
        info.entry_count,
        info.question_count,
        info.dim,
        info.model_fingerprint,
        if info.has_classifier {
            ", with classifier head"
        } else {
            ""
        }
    )
}

/// The `kb list` table: a header, then one line per entry with its id, intent, number
/// of questions and the start of its answer, in aligned columns.
pub fn list(entries: &[Entry]) -> String {
    let id_width = column_width("id", entries.iter().map(|entry| entry.id.as_str()));
    let intent_width = column_width("intent", entries.iter().map(|entry| entry.intent.as_str()));
    let mut out = format!(
        "{:id_width$}  {:intent_width$}  {:>9}  answer\n",
        "id", "intent", "questions"
    );
    for entry in entries {
        out.push_str(&format!(
            "{:id_width$}  {:intent_width$}  {:>9}  {}\n",
            one_line(&entry.id),
            one_line(&entry.intent),
            entry.questions.len(),
            preview(&entry.answer),
        ));
    }
    out
}

/// The first [`PREVIEW_CHARS`] characters of `text` on one line, with `…` when cut.
pub fn preview(text: &str) -> String {
    let flat = one_line(text);
    let mut chars = flat.chars();
    let mut cut: String = chars.by_ref().take(PREVIEW_CHARS).collect();
    if chars.next().is_some() {
        cut.push('…');
    }
    cut
}

/// `text` with every run of whitespace or control characters replaced by one space.
fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut gap = false;
    for c in text.chars() {
        if c.is_whitespace() || c.is_control() {
            gap = true;
        } else {
            if gap && !out.is_empty() {
                out.push(' ');
            }
            gap = false;
            out.push(c);
        }
    }
    out
}

fn column_width<'a>(title: &str, values: impl Iterator<Item = &'a str>) -> usize {
    values
        .map(|value| one_line(value).chars().count())
        .chain([title.len()])
        .max()
        .unwrap_or(0)
        .min(40)
}

#[cfg(test)]
mod tests {
    use super::super::import::{import_csv, import_json};
    use super::*;

    fn sample() -> Vec<Entry> {
        vec![
            Entry {
                id: "refund".into(),
                intent: "refunds".into(),
                questions: vec![
                    "Where is my refund?".into(),
                    "Refund \"pending\"\ttoo long".into(),
                ],
                answer: "Refunds take 5 days.\nContact us if not.".into(),
                tags: vec!["money".into(), "ünïcode ✓".into()],
            },
            Entry {
                id: "hello".into(),
                intent: "hello".into(),
                questions: vec!["hi".into()],
                answer: "x".repeat(100),
                tags: vec![],
            },
        ]
    }

    #[test]
    fn export_then_import_is_the_identity() {
        let entries = sample();
        let json = export_json(&entries);
        assert_eq!(import_json(json.as_bytes()).unwrap(), entries);
    }

    #[test]
    fn csv_import_survives_export_round_trip() {
        let csv = "text,category,answer\n\"a, b\",x,\"Say \"\"hi\"\"\"\nc,y,\n";
        let entries = import_csv(csv.as_bytes()).unwrap();
        let again = import_json(export_json(&entries).as_bytes()).unwrap();
        assert_eq!(again, entries);
    }

    #[test]
    fn list_has_one_line_per_entry() {
        let table = list(&sample());
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(
            lines[0].starts_with("id      intent   questions  answer"),
            "{table}"
        );
        assert_eq!(
            lines[1],
            "refund  refunds          2  Refunds take 5 days. Contact us if not."
        );
        assert!(lines[2].starts_with("hello   hello            1  xxxx"));
        assert!(lines[2].ends_with(&format!("  {}…", "x".repeat(PREVIEW_CHARS))));
        assert_eq!(preview(&"é".repeat(70)).chars().count(), PREVIEW_CHARS + 1);
    }
}
