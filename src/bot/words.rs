//! Whole-word, case-insensitive matching of a list of words or phrases.
//!
//! A word matches only where it is not part of a longer word ("scam" matches "Scam!" but not
//! "scamper"); letters, digits and `_` are word characters in any script (Unicode word
//! boundaries), and case folding is Unicode simple case folding. A phrase's words may be
//! separated by any run of white space in the text. An edge of an entry that is not a word
//! character ("$$$", "c++") has no boundary requirement there.
//!
//! The list is compiled into one regular expression at construction, so matching is one scan of
//! the text whatever the number of entries.

use regex::{Regex, RegexBuilder};

use super::BotError;

/// Compiled size limit for one list: generous enough for thousands of entries, bounded so a
/// pathological config fails at start-up instead of eating memory.
const SIZE_LIMIT: usize = 64 << 20;

/// A compiled list of words and phrases.
#[derive(Clone, Debug)]
pub struct WordList {
    /// `None` when the list is empty: nothing matches.
    regexes: Option<Regexes>,
}

#[derive(Clone, Debug)]
struct Regexes {
    /// The entries without the word-boundary conditions: a superset of `exact`'s matches that
    /// the lazy DFA runs fast on any text. (Unicode `\b` makes the regex crate fall back to a
    /// slower engine on non-ASCII text — about 8x slower per message, measured — so the exact
    /// regex only runs when this one found a candidate.)
    prefilter: Regex,
    exact: Regex,
}

impl WordList {
    /// Compiles `words` (blank entries are ignored). `key` names the config key in errors.
    pub fn new<I, S>(key: &'static str, words: I) -> Result<WordList, BotError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut prefilter = Vec::new();
        let mut exact = Vec::new();
        for word in words {
            if let Some((loose, strict)) = entry_patterns(word.as_ref()) {
                prefilter.push(loose);
                exact.push(strict);
            }
        }
        if exact.is_empty() {
            return Ok(WordList { regexes: None });
        }
        let build = |alternatives: Vec<String>| {
            RegexBuilder::new(&format!("(?:{})", alternatives.join("|")))
                .case_insensitive(true)
                .size_limit(SIZE_LIMIT)
                .build()
                .map_err(|source| BotError::BadList { key, source })
        };
        Ok(WordList {
            regexes: Some(Regexes {
                prefilter: build(prefilter)?,
                exact: build(exact)?,
            }),
        })
    }

    /// Whether no entry can match.
    pub fn is_empty(&self) -> bool {
        self.regexes.is_none()
    }

    /// Whether some entry occurs in `text` as a whole word.
    pub fn matches(&self, text: &str) -> bool {
        self.regexes
            .as_ref()
            .is_some_and(|r| r.prefilter.is_match(text) && r.exact.is_match(text))
    }

    /// The first occurrence in `text`, as written in the text.
    pub fn find<'t>(&self, text: &'t str) -> Option<&'t str> {
        let r = self.regexes.as_ref()?;
        if !r.prefilter.is_match(text) {
            return None;
        }
        r.exact.find(text).map(|m| m.as_str())
    }
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The patterns of one entry, without and with its word-boundary conditions, or `None` for a
/// blank entry.
fn entry_patterns(entry: &str) -> Option<(String, String)> {
    let entry = entry.trim();
    let first = entry.chars().next()?;
    let last = entry.chars().next_back()?;
    let body: Vec<String> = entry.split_whitespace().map(regex::escape).collect();
    let body = body.join(r"\s+");
    let mut exact = String::with_capacity(body.len() + 4);
    if is_word_char(first) {
        exact.push_str(r"\b");
    }
    exact.push_str(&body);
    if is_word_char(last) {
        exact.push_str(r"\b");
    }
    Some((body, exact))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(words: &[&str]) -> WordList {
        WordList::new("test.words", words).unwrap()
    }

    #[test]
    fn whole_words_only() {
        let l = list(&["scam"]);
        assert!(l.matches("this is a scam"));
        assert!(l.matches("Scam!"));
        assert!(l.matches("(scam)"));
        assert!(!l.matches("scamper away"));
        assert!(!l.matches("antiscam"));
        assert!(!l.matches("scam_bot"));
        assert!(!l.matches("scam2"));
        // Non-ASCII text around a candidate takes the exact (slower) path; same answers.
        assert!(l.matches("Grüße — ça, c'est un scam, señor"));
        assert!(!l.matches("Grüße — ça, c'est un scamé, señor"));
        assert!(!l.matches("Grüße — ça, c'est un éscam, señor"));
    }

    #[test]
    fn case_insensitive_including_non_ascii() {
        let l = list(&["Éclair", "straße"]);
        assert!(l.matches("an ÉCLAIR please"));
        assert!(l.matches("an éclair please"));
        assert!(l.matches("STRAßE"));
        // Accented letters are word characters: no boundary inside "éclairé".
        assert!(!l.matches("éclairé"));
    }

    #[test]
    fn phrases_allow_any_white_space_between_words() {
        let l = list(&["free  money"]);
        assert!(l.matches("get FREE money now"));
        assert!(l.matches("free\n\tmoney"));
        assert!(!l.matches("freemoney"));
        assert!(!l.matches("free moneybags"));
        assert_eq!(l.find("Get Free   Money!"), Some("Free   Money"));
    }

    #[test]
    fn non_word_edges_have_no_boundary() {
        let l = list(&["$$$", "c++"]);
        assert!(l.matches("win $$$ now"));
        assert!(l.matches("win$$$now"));
        assert!(l.matches("I love C++."));
        // The leading "c" still needs a boundary.
        assert!(!l.matches("abc++"));
    }

    #[test]
    fn metacharacters_are_literal() {
        let l = list(&["a.b"]);
        assert!(l.matches("x a.b y"));
        assert!(!l.matches("x axb y"));
    }

    #[test]
    fn empty_and_blank_lists_match_nothing() {
        assert!(list(&[]).is_empty());
        let blank = list(&["", "   "]);
        assert!(blank.is_empty());
        assert!(!blank.matches("anything at all"));
        assert!(!blank.matches(""));
    }
}
