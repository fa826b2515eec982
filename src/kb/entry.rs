//! A knowledge-base entry: one intent with its example questions and its answer.
//!
//! Invariants of a valid entry (checked by [`Entry::problems`], which both importers and
//! [`KbReplica::apply_snapshot`](super::KbReplica::apply_snapshot) run):
//! - `id`, `intent`, `answer` and every question are non-blank, have no surrounding
//!   whitespace (the importers trim) and stay within the `MAX_*_BYTES` limits below;
//! - there is at least one question and at most [`MAX_QUESTIONS_PER_ENTRY`];
//! - tags are non-blank and trimmed too; there may be none.
//!
//! The same struct is the JSON import/export format (serde, unknown fields rejected) and
//! the record archived with rkyv in a replica's `entries` table (`unaligned` format, so it
//! can be read in place from LMDB's 2-byte aligned values).

use rkyv::{Archive, Deserialize as RkyvDeserialize, Serialize as RkyvSerialize};
use serde::{Deserialize, Serialize};

/// Longest entry id, in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Longest intent name, in bytes.
pub const MAX_INTENT_BYTES: usize = 256;
/// Longest example question, in bytes (a sentence encoder reads ~256 tokens at most).
pub const MAX_QUESTION_BYTES: usize = 4096;
/// Longest answer, in bytes.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Longest tag, in bytes.
pub const MAX_TAG_BYTES: usize = 128;
/// Most example questions one entry may have.
pub const MAX_QUESTIONS_PER_ENTRY: usize = 100_000;
/// Most tags one entry may have.
pub const MAX_TAGS_PER_ENTRY: usize = 64;

/// One knowledge-base entry.
///
/// JSON form: `{"id": ..., "intent": ..., "questions": [...], "answer": ..., "tags": [...]}`;
/// `intent` defaults to the id and `tags` to none when absent.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Archive, RkyvSerialize, RkyvDeserialize,
)]
#[serde(deny_unknown_fields)]
#[rkyv(derive(Debug))]
pub struct Entry {
    /// Unique within a knowledge base.
    pub id: String,
    /// The intent this entry answers (several entries may share one).
    #[serde(default)]
    pub intent: String,
    /// Example phrasings; each one gets an embedding vector.
    pub questions: Vec<String>,
    /// What the bot replies.
    pub answer: String,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Something wrong with one entry (the importers add the line number).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryProblem {
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} is {len} bytes, more than the {max} allowed")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} has leading or trailing whitespace")]
    Untrimmed { field: &'static str },
    #[error("entry {id:?} has no questions")]
    NoQuestions { id: String },
    #[error("entry {id:?} has {count} questions, more than the {max} allowed")]
    TooManyQuestions {
        id: String,
        count: usize,
        max: usize,
    },
    #[error("entry {id:?} has {count} tags, more than the {max} allowed")]
    TooManyTags {
        id: String,
        count: usize,
        max: usize,
    },
}

impl Entry {
    /// Removes surrounding whitespace from every text field and fills a missing intent
    /// with the id (what both importers do before validating).
    pub fn normalize(&mut self) {
        trim_in_place(&mut self.id);
        trim_in_place(&mut self.intent);
        trim_in_place(&mut self.answer);
        self.questions.iter_mut().for_each(trim_in_place);
        self.tags.iter_mut().for_each(trim_in_place);
        if self.intent.is_empty() {
            self.intent.clone_from(&self.id);
        }
    }

    /// Everything that makes this entry invalid (empty when it is valid).
    pub fn problems(&self) -> Vec<EntryProblem> {
        let mut problems = Vec::new();
        check_text(&mut problems, "id", &self.id, MAX_ID_BYTES);
        check_text(&mut problems, "intent", &self.intent, MAX_INTENT_BYTES);
        check_text(&mut problems, "answer", &self.answer, MAX_ANSWER_BYTES);
        if self.questions.is_empty() {
            problems.push(EntryProblem::NoQuestions {
                id: self.id.clone(),
            });
        } else if self.questions.len() > MAX_QUESTIONS_PER_ENTRY {
            problems.push(EntryProblem::TooManyQuestions {
                id: self.id.clone(),
                count: self.questions.len(),
                max: MAX_QUESTIONS_PER_ENTRY,
            });
        }
        for question in &self.questions {
            check_text(&mut problems, "a question", question, MAX_QUESTION_BYTES);
        }
        if self.tags.len() > MAX_TAGS_PER_ENTRY {
            problems.push(EntryProblem::TooManyTags {
                id: self.id.clone(),
                count: self.tags.len(),
                max: MAX_TAGS_PER_ENTRY,
            });
        }
        for tag in &self.tags {
            check_text(&mut problems, "a tag", tag, MAX_TAG_BYTES);
        }
        problems
    }
}

impl ArchivedEntry {
    pub fn id(&self) -> &str {
        self.id.as_str()
    }
    pub fn intent(&self) -> &str {
        self.intent.as_str()
    }
    pub fn answer(&self) -> &str {
        self.answer.as_str()
    }
    pub fn question_count(&self) -> usize {
        self.questions.len()
    }
    pub fn questions(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.questions.iter().map(|question| question.as_str())
    }
    pub fn tags(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.tags.iter().map(|tag| tag.as_str())
    }
    /// Copies the archived entry out (CLI listing and export; not for the query path).
    pub fn to_entry(&self) -> Entry {
        Entry {
            id: self.id().to_owned(),
            intent: self.intent().to_owned(),
            questions: self.questions().map(str::to_owned).collect(),
            answer: self.answer().to_owned(),
            tags: self.tags().map(str::to_owned).collect(),
        }
    }
}

/// Every example question of `entries`, entry by entry, in the order the caller must
/// embed them: row `i` of the `question_vectors` given to
/// [`KbReplica::apply_snapshot`](super::KbReplica::apply_snapshot) is the vector of
/// `question_texts(entries)[i]`.
pub fn question_texts(entries: &[Entry]) -> Vec<&str> {
    entries
        .iter()
        .flat_map(|entry| entry.questions.iter().map(String::as_str))
        .collect()
}

/// Total number of example questions (= rows of the question-vector matrix).
pub fn question_count(entries: &[Entry]) -> usize {
    entries.iter().map(|entry| entry.questions.len()).sum()
}

fn trim_in_place(text: &mut String) {
    let trimmed = text.trim();
    if trimmed.len() != text.len() {
        *text = trimmed.to_owned();
    }
}

fn check_text(problems: &mut Vec<EntryProblem>, field: &'static str, value: &str, max: usize) {
    if value.trim().is_empty() {
        problems.push(EntryProblem::Empty { field });
    } else if value.len() > max {
        problems.push(EntryProblem::TooLong {
            field,
            len: value.len(),
            max,
        });
    } else if value.trim().len() != value.len() {
        problems.push(EntryProblem::Untrimmed { field });
    }
}

// LMDB values sit at 2-byte aligned addresses; reading them in place needs alignment 1.
const _: () = assert!(
    std::mem::align_of::<ArchivedEntry>() == 1,
    "enable rkyv's `unaligned` feature: LMDB values are not 8-byte aligned"
);
