//! Printing the configuration back as TOML: [`TomlWriter`] builds the text and records every dotted
//! key it writes, which is how the loader learns the set of valid keys (one source of truth).
//!
//! Invariant: every value is written in a syntax the loader accepts for its key, so printed text
//! loads back to an equal configuration.

use super::*;

/// Builds TOML text and records each dotted key written.
#[derive(Default)]
pub(super) struct TomlWriter {
    pub(super) out: String,
    pub(super) keys: Vec<String>,
    pub(super) section: String,
}

impl TomlWriter {
    pub(super) fn section(&mut self, name: &str) {
        if !self.out.is_empty() {
            self.out.push('\n');
        }
        let _ = writeln!(self.out, "[{name}]");
        self.section = name.to_owned();
        self.keys.push(name.to_owned());
    }

    /// An element of an array of tables: `[[name]]`; the keys that follow belong to it.
    pub(super) fn array_table(&mut self, name: &str) {
        if !self.out.is_empty() {
            self.out.push('\n');
        }
        let _ = writeln!(self.out, "[[{name}]]");
        self.section = name.to_owned();
    }

    /// `value` must already be a TOML literal.
    pub(super) fn raw(&mut self, key: &str, value: &str) {
        let _ = writeln!(self.out, "{key} = {value}");
        self.keys.push(format!("{}.{key}", self.section));
    }

    pub(super) fn display(&mut self, key: &str, value: impl fmt::Display) {
        self.raw(key, &value.to_string());
    }

    pub(super) fn string(&mut self, key: &str, value: &str) {
        self.raw(key, &Value::from(value).to_string());
    }

    pub(super) fn path(&mut self, key: &str, value: &Path) {
        self.string(key, &value.to_string_lossy());
    }

    pub(super) fn float(&mut self, key: &str, value: f64) {
        self.raw(key, &Value::from(value).to_string());
    }

    pub(super) fn duration(&mut self, key: &str, value: Duration) {
        self.string(key, &format_duration(value));
    }

    pub(super) fn size(&mut self, key: &str, bytes: u64) {
        let text = format_size(bytes);
        if text.bytes().all(|b| b.is_ascii_digit()) {
            self.raw(key, &text);
        } else {
            self.string(key, &text);
        }
    }

    pub(super) fn strings<'s>(&mut self, key: &str, items: impl Iterator<Item = &'s str>) {
        let items: Vec<String> = items.map(|s| Value::from(s).to_string()).collect();
        self.raw(key, &format!("[{}]", items.join(", ")));
    }
}
