//! Parsing knowledge-base files (CSV and JSON) into validated [`Entry`]s.
//!
//! Invariants:
//! - All or nothing: the whole input is parsed and checked before anything is returned;
//!   any problem makes the import fail with EVERY problem found (the first
//!   [`MAX_REPORTED_PROBLEMS`] by line, plus a count of the rest), each with the 1-based
//!   line it starts on. Nothing is written anywhere by this module.
//! - Returned entries are normalised (trimmed) and pass [`Entry::problems`]; their ids
//!   are unique.
//!
//! # CSV
//! A header row names the columns `text`, `category` and optionally `answer` (any order,
//! nothing else). Quoting follows RFC 4180 (`"..."`, `""` for a quote inside); a quoted
//! field may span lines. Rows sharing a category form one entry, in order of first
//! appearance: `id` = `intent` = the category, `questions` = the texts in file order,
//! `answer` = the answer column of whichever rows fill it (rows may leave it empty; two
//! different answers for one category are an error naming both lines), else
//! [`default_answer`]. Fields are trimmed; blank lines are skipped.
//!
//! The `csv` crate parses; it is lenient by design and accepts an unterminated quote by
//! running the field to the end of the file, or text after a closing quote. Such input
//! is almost always a stray quote that would silently merge rows, so each record's raw
//! bytes are also checked for quote balance ([`check_quotes`]) and rejected.
//!
//! # JSON
//! An array of [`Entry`] objects (`id`, `questions`, `answer`, optional `intent` —
//! defaulting to the id — and `tags`); unknown fields, blank values, entries without
//! questions and duplicate ids are errors. Syntax errors report serde_json's line and
//! column; every other problem reports the line where its entry's `{` is.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use super::entry::{
    Entry, EntryProblem, MAX_ANSWER_BYTES, MAX_ID_BYTES, MAX_INTENT_BYTES, MAX_QUESTION_BYTES,
};

/// Largest file `import_file` reads (the whole input is held in memory while checked).
pub const MAX_IMPORT_BYTES: u64 = 256 << 20;
/// How many problems an [`InvalidInput`] lists; the rest are only counted.
pub const MAX_REPORTED_PROBLEMS: usize = 20;

/// The answer of a CSV category for which no row gives one.
pub fn default_answer(intent: &str) -> String {
    format!("No answer has been written for \"{intent}\" yet.")
}

/// Input formats `import` understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Json,
}

impl Format {
    /// The format named by a file's extension (`.csv`, `.json`, any case).
    pub fn from_path(path: &Path) -> Option<Format> {
        let extension = path.extension()?.to_str()?.to_ascii_lowercase();
        match extension.as_str() {
            "csv" => Some(Format::Csv),
            "json" => Some(Format::Json),
            _ => None,
        }
    }

    /// Guesses from the content: JSON if the first non-blank character is `[`.
    pub fn sniff(input: &[u8]) -> Format {
        let first = strip_bom(input)
            .iter()
            .find(|byte| !byte.is_ascii_whitespace());
        if first == Some(&b'[') {
            Format::Json
        } else {
            Format::Csv
        }
    }
}

/// Why `import_file` failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is {len} bytes, more than the {max} an import may be")]
    TooLarge { path: PathBuf, len: u64, max: u64 },
    #[error("{path}: {invalid}")]
    Invalid {
        path: PathBuf,
        invalid: InvalidInput,
    },
}

/// Everything wrong with an input; nothing of it was imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidInput {
    /// The first [`MAX_REPORTED_PROBLEMS`] problems, by line.
    pub problems: Vec<LineProblem>,
    /// How many problems were found in all (≥ `problems.len()`).
    pub total: usize,
}

impl std::error::Error for InvalidInput {}

impl fmt::Display for InvalidInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = if self.total == 1 { "" } else { "s" };
        write!(f, "{} problem{plural}, nothing imported", self.total)?;
        for problem in &self.problems {
            write!(f, "\n  {problem}")?;
        }
        if self.total > self.problems.len() {
            write!(f, "\n  ... and {} more", self.total - self.problems.len())?;
        }
        Ok(())
    }
}

/// One problem and the 1-based line it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineProblem {
    pub line: u64,
    pub problem: Problem,
}

impl fmt::Display for LineProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.problem)
    }
}

/// What is wrong at a line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("the input is empty")]
    EmptyInput,
    #[error("the input has no entries")]
    NoEntries,
    #[error("not valid UTF-8")]
    NotUtf8,
    #[error("unknown column {0:?}: the header row must be text,category[,answer]")]
    UnknownColumn(String),
    #[error("column {0:?} appears twice in the header row")]
    DuplicateColumn(String),
    #[error("the header row has no {0:?} column: it must be text,category[,answer]")]
    MissingColumn(&'static str),
    #[error("unbalanced quote: the quoted field that opens here is never closed")]
    UnclosedQuote,
    #[error(
        "unbalanced quote: the quoted field that opens here closes on line {closed_on} \
         and is followed by more text (a stray or unescaped '\"'?)"
    )]
    TextAfterQuote { closed_on: u64 },
    #[error("expected {expected} fields ({columns}), found {found}")]
    FieldCount {
        expected: usize,
        found: usize,
        columns: String,
    },
    #[error("the text is empty")]
    EmptyText,
    #[error("the category is empty")]
    EmptyCategory,
    #[error(
        "category {category:?} gets a different answer here than on line {first_line}; \
         give it one answer (or leave the column empty on the other rows)"
    )]
    ConflictingAnswer { category: String, first_line: u64 },
    #[error("{0}")]
    Entry(EntryProblem),
    #[error("CSV: {0}")]
    Csv(String),
    #[error("JSON syntax: {message} (column {column})")]
    JsonSyntax { message: String, column: usize },
    #[error("the top level must be a JSON array of entries")]
    NotAnArray,
    #[error("entry {index}: {message}")]
    JsonEntry { index: usize, message: String },
    #[error("id {id:?} is already used by the entry on line {first_line}")]
    DuplicateId { id: String, first_line: u64 },
}

/// Reads and parses a knowledge-base file; the format comes from the extension, or from
/// the content when the extension says nothing ([`Format::sniff`]).
pub fn import_file(path: &Path) -> Result<Vec<Entry>, ImportError> {
    let read_error = |source| ImportError::Read {
        path: path.to_owned(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_error)?.len();
    if len > MAX_IMPORT_BYTES {
        return Err(ImportError::TooLarge {
            path: path.to_owned(),
            len,
            max: MAX_IMPORT_BYTES,
        });
    }
    let input = std::fs::read(path).map_err(read_error)?;
    let format = Format::from_path(path).unwrap_or_else(|| Format::sniff(&input));
    import(&input, format).map_err(|invalid| ImportError::Invalid {
        path: path.to_owned(),
        invalid,
    })
}

/// Parses `input` in the given format.
pub fn import(input: &[u8], format: Format) -> Result<Vec<Entry>, InvalidInput> {
    match format {
        Format::Csv => import_csv(input),
        Format::Json => import_json(input),
    }
}

/// Collects problems: keeps the first few, counts all.
#[derive(Default)]
struct Problems {
    kept: Vec<LineProblem>,
    total: usize,
}

impl Problems {
    fn push(&mut self, line: u64, problem: Problem) {
        self.total += 1;
        if self.kept.len() < MAX_REPORTED_PROBLEMS {
            self.kept.push(LineProblem { line, problem });
        }
    }

    fn into_result<T>(mut self, value: T) -> Result<T, InvalidInput> {
        if self.total == 0 {
            return Ok(value);
        }
        self.kept.sort_by_key(|problem| problem.line);
        Err(InvalidInput {
            problems: self.kept,
            total: self.total,
        })
    }

    fn fail(line: u64, problem: Problem) -> InvalidInput {
        InvalidInput {
            problems: vec![LineProblem { line, problem }],
            total: 1,
        }
    }
}

// ---------------------------------------------------------------------------------------
// CSV

/// The entries accumulated for one category.
struct Group {
    category: String,
    first_line: u64,
    questions: Vec<String>,
    /// The answer and the line that gave it.
    answer: Option<(String, u64)>,
}

/// Where each column is in a row.
struct Columns {
    text: usize,
    category: usize,
    answer: Option<usize>,
    count: usize,
    names: String,
}

/// Parses CSV with a `text,category[,answer]` header; see the module documentation.
pub fn import_csv(input: &[u8]) -> Result<Vec<Entry>, InvalidInput> {
    let input = strip_bom(input);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(input);

    // Read every record with the byte offset and line where it starts; a record's raw
    // bytes run to the start of the next one.
    let mut records: Vec<(csv::ByteRecord, u64, usize)> = Vec::new();
    loop {
        let mut record = csv::ByteRecord::new();
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                // Records read by a `Reader` always carry their position. It is where the
                // reader stood, before the blank lines it skipped: move past those.
                let (mut line, mut byte) = record.position().map_or((1, 0), |position| {
                    (position.line(), position.byte() as usize)
                });
                while let Some(&terminator @ (b'\r' | b'\n')) = input.get(byte) {
                    line += u64::from(terminator == b'\n');
                    byte += 1;
                }
                records.push((record, line, byte));
            }
            Err(error) => {
                let line = error.position().map_or(1, |position| position.line());
                return Err(Problems::fail(line, Problem::Csv(error.to_string())));
            }
        }
    }
    let raw_of = |index: usize| {
        let start = records[index].2;
        let end = records.get(index + 1).map_or(input.len(), |next| next.2);
        &input[start..end]
    };

    let Some((header, header_line, _)) = records.first() else {
        return Err(Problems::fail(1, Problem::EmptyInput));
    };
    if let Some(problem) = check_quotes(raw_of(0), *header_line) {
        return Err(Problems::fail(problem.line, problem.problem));
    }
    let columns = parse_header(header).map_err(|problem| Problems::fail(*header_line, problem))?;

    let mut problems = Problems::default();
    let mut groups: Vec<Group> = Vec::new();
    let mut group_of: HashMap<String, usize> = HashMap::new();
    for (index, (record, line, _)) in records.iter().enumerate().skip(1) {
        let line = *line;
        if let Some(problem) = check_quotes(raw_of(index), line) {
            problems.push(problem.line, problem.problem);
            continue;
        }
        if record.len() != columns.count {
            problems.push(
                line,
                Problem::FieldCount {
                    expected: columns.count,
                    found: record.len(),
                    columns: columns.names.clone(),
                },
            );
            continue;
        }
        let field = |column: usize| std::str::from_utf8(&record[column]).map(str::trim);
        let (Ok(text), Ok(category), Ok(answer)) = (
            field(columns.text),
            field(columns.category),
            columns.answer.map(field).transpose(),
        ) else {
            problems.push(line, Problem::NotUtf8);
            continue;
        };
        let answer = answer.filter(|answer| !answer.is_empty());

        let mut row_ok = true;
        let mut check = |problem: Option<Problem>| {
            if let Some(problem) = problem {
                problems.push(line, problem);
                row_ok = false;
            }
        };
        check(text.is_empty().then_some(Problem::EmptyText));
        check(too_long("text", text, MAX_QUESTION_BYTES));
        check(category.is_empty().then_some(Problem::EmptyCategory));
        check(too_long(
            "category",
            category,
            MAX_ID_BYTES.min(MAX_INTENT_BYTES),
        ));
        check(answer.and_then(|answer| too_long("answer", answer, MAX_ANSWER_BYTES)));
        if !row_ok {
            continue;
        }

        let slot = *group_of.entry(category.to_owned()).or_insert_with(|| {
            groups.push(Group {
                category: category.to_owned(),
                first_line: line,
                questions: Vec::new(),
                answer: None,
            });
            groups.len() - 1
        });
        let group = &mut groups[slot];
        group.questions.push(text.to_owned());
        if let Some(answer) = answer {
            match &group.answer {
                None => group.answer = Some((answer.to_owned(), line)),
                Some((first, _)) if first == answer => {}
                Some((_, first_line)) => problems.push(
                    line,
                    Problem::ConflictingAnswer {
                        category: category.to_owned(),
                        first_line: *first_line,
                    },
                ),
            }
        }
    }
    if records.len() == 1 && problems.total == 0 {
        problems.push(*header_line, Problem::NoEntries);
    }

    let mut entries = Vec::with_capacity(groups.len());
    for group in groups {
        let answer = match group.answer {
            Some((answer, _)) => answer,
            None => default_answer(&group.category),
        };
        let entry = Entry {
            id: group.category.clone(),
            intent: group.category,
            questions: group.questions,
            answer,
            tags: Vec::new(),
        };
        // Rows were checked one by one; what is left is whole-entry limits.
        for problem in entry.problems() {
            problems.push(group.first_line, Problem::Entry(problem));
        }
        entries.push(entry);
    }
    problems.into_result(entries)
}

fn parse_header(header: &csv::ByteRecord) -> Result<Columns, Problem> {
    let mut text = None;
    let mut category = None;
    let mut answer = None;
    let mut names = Vec::new();
    for (index, raw) in header.iter().enumerate() {
        let name = std::str::from_utf8(raw)
            .map_err(|_| Problem::NotUtf8)?
            .trim();
        let slot = match name {
            "text" => &mut text,
            "category" => &mut category,
            "answer" => &mut answer,
            other => return Err(Problem::UnknownColumn(other.to_owned())),
        };
        if slot.replace(index).is_some() {
            return Err(Problem::DuplicateColumn(name.to_owned()));
        }
        names.push(name);
    }
    Ok(Columns {
        text: text.ok_or(Problem::MissingColumn("text"))?,
        category: category.ok_or(Problem::MissingColumn("category"))?,
        answer,
        count: header.len(),
        names: names.join(","),
    })
}

fn too_long(field: &'static str, value: &str, max: usize) -> Option<Problem> {
    (value.len() > max).then_some(Problem::Entry(EntryProblem::TooLong {
        field,
        len: value.len(),
        max,
    }))
}

/// Checks that the quotes of one raw CSV record (its bytes up to the next record) are
/// balanced in the RFC 4180 sense: a field that starts with `"` must end with a `"`
/// followed by `,` or the end of the line. Quotes inside an unquoted field are literal
/// (as the `csv` crate reads them). `line` is the line the record starts on.
fn check_quotes(raw: &[u8], line: u64) -> Option<LineProblem> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        FieldStart,
        Unquoted,
        Quoted,
        /// A quote inside a quoted field: either the first of `""` or the closing one.
        QuoteInQuoted,
        /// Past the line terminator (blank lines the reader skipped may follow).
        RecordEnd,
    }
    let mut state = State::FieldStart;
    let mut current_line = line;
    let mut opened_on = line;
    for &byte in raw {
        state = match (state, byte) {
            (State::RecordEnd, _) => State::RecordEnd,
            (State::FieldStart, b'"') => {
                opened_on = current_line;
                State::Quoted
            }
            (State::FieldStart | State::Unquoted | State::QuoteInQuoted, b',') => State::FieldStart,
            (State::FieldStart | State::Unquoted | State::QuoteInQuoted, b'\r' | b'\n') => {
                State::RecordEnd
            }
            (State::FieldStart | State::Unquoted, _) => State::Unquoted,
            (State::Quoted, b'"') => State::QuoteInQuoted,
            (State::Quoted, _) => State::Quoted,
            (State::QuoteInQuoted, b'"') => State::Quoted,
            (State::QuoteInQuoted, _) => {
                return Some(LineProblem {
                    line: opened_on,
                    problem: Problem::TextAfterQuote {
                        closed_on: current_line,
                    },
                })
            }
        };
        if byte == b'\n' {
            current_line += 1;
        }
    }
    (state == State::Quoted).then_some(LineProblem {
        line: opened_on,
        problem: Problem::UnclosedQuote,
    })
}

fn strip_bom(input: &[u8]) -> &[u8] {
    input.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(input)
}

// ---------------------------------------------------------------------------------------
// JSON

/// Parses a JSON array of entries; see the module documentation.
pub fn import_json(input: &[u8]) -> Result<Vec<Entry>, InvalidInput> {
    let input = strip_bom(input);
    let text = std::str::from_utf8(input).map_err(|error| {
        let line = line_of(input, error.valid_up_to());
        Problems::fail(line, Problem::NotUtf8)
    })?;

    let mut position = skip_whitespace(text, 0);
    match text.as_bytes().get(position) {
        None => return Err(Problems::fail(1, Problem::EmptyInput)),
        Some(b'[') => position += 1,
        Some(_) => {
            return Err(Problems::fail(
                line_of(input, position),
                Problem::NotAnArray,
            ))
        }
    }

    let mut problems = Problems::default();
    let mut entries = Vec::new();
    let mut first_line_of_id: HashMap<String, u64> = HashMap::new();
    position = skip_whitespace(text, position);
    if text.as_bytes().get(position) == Some(&b']') {
        position += 1;
    } else {
        loop {
            let line = line_of(input, position);
            let mut stream = serde_json::Deserializer::from_str(&text[position..])
                .into_iter::<serde_json::Value>();
            let value = match stream.next() {
                Some(Ok(value)) => value,
                _ => return Err(syntax_error(text)),
            };
            position += stream.byte_offset();

            let index = entries.len() + 1;
            match serde_json::from_value::<Entry>(value) {
                Err(error) => problems.push(
                    line,
                    Problem::JsonEntry {
                        index,
                        message: error.to_string(),
                    },
                ),
                Ok(mut entry) => {
                    entry.normalize();
                    for problem in entry.problems() {
                        problems.push(line, Problem::Entry(problem));
                    }
                    match first_line_of_id.get(&entry.id) {
                        Some(&first_line) if !entry.id.is_empty() => problems.push(
                            line,
                            Problem::DuplicateId {
                                id: entry.id.clone(),
                                first_line,
                            },
                        ),
                        _ => {
                            first_line_of_id.insert(entry.id.clone(), line);
                        }
                    }
                    entries.push(entry);
                }
            }

            position = skip_whitespace(text, position);
            match text.as_bytes().get(position) {
                Some(b',') => position = skip_whitespace(text, position + 1),
                Some(b']') => {
                    position += 1;
                    break;
                }
                _ => return Err(syntax_error(text)),
            }
        }
    }
    if skip_whitespace(text, position) != text.len() {
        return Err(syntax_error(text));
    }
    if entries.is_empty() && problems.total == 0 {
        problems.push(1, Problem::NoEntries);
    }
    problems.into_result(entries)
}

/// Re-parses the whole document to get serde_json's own position and message for a
/// syntax error found while walking the array.
fn syntax_error(text: &str) -> InvalidInput {
    match serde_json::from_str::<serde_json::Value>(text) {
        Err(error) => {
            let full = error.to_string();
            let suffix = format!(" at line {} column {}", error.line(), error.column());
            let message = full.strip_suffix(&suffix).unwrap_or(&full).to_owned();
            Problems::fail(
                error.line() as u64,
                Problem::JsonSyntax {
                    message,
                    column: error.column(),
                },
            )
        }
        // Valid JSON that is not an array of values (cannot happen after the walk
        // above, which only gives up on invalid syntax).
        Ok(_) => Problems::fail(1, Problem::NotAnArray),
    }
}

fn skip_whitespace(text: &str, from: usize) -> usize {
    text.as_bytes()[from..]
        .iter()
        .position(|byte| !matches!(byte, b' ' | b'\t' | b'\n' | b'\r'))
        .map_or(text.len(), |offset| from + offset)
}

/// 1-based line of a byte offset.
fn line_of(input: &[u8], offset: usize) -> u64 {
    input[..offset.min(input.len())]
        .iter()
        .filter(|&&byte| byte == b'\n')
        .count() as u64
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(result: Result<Vec<Entry>, InvalidInput>) -> Vec<(u64, Problem)> {
        result
            .expect_err("the input should be rejected")
            .problems
            .into_iter()
            .map(|problem| (problem.line, problem.problem))
            .collect()
    }

    #[test]
    fn csv_rows_of_a_category_form_one_entry() {
        let input = b"text,category\n\
            Where is my card?,card_arrival\n\
            \"My card, the new one, has not come\",card_arrival\n\
            \"She said \"\"hi\"\"\",greeting\n\
            \"two\nlines\",card_arrival\n\
            \n\
            How do I top up? ,  top_up  \n";
        let entries = import_csv(input).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].id, "card_arrival");
        assert_eq!(entries[0].intent, "card_arrival");
        assert_eq!(
            entries[0].questions,
            [
                "Where is my card?",
                "My card, the new one, has not come",
                "two\nlines"
            ]
        );
        assert_eq!(entries[0].answer, default_answer("card_arrival"));
        assert_eq!(entries[1].questions, ["She said \"hi\""]);
        assert_eq!(entries[2].id, "top_up");
        assert_eq!(entries[2].questions, ["How do I top up?"]);
        assert!(entries.iter().all(|entry| entry.tags.is_empty()));
        assert_eq!(
            super::super::question_texts(&entries).len(),
            5,
            "one question per data row"
        );
    }

    #[test]
    fn csv_answer_column_any_order_and_partial() {
        let input = "category,answer,text\n\
            refund,,Where is my refund?\n\
            refund,Refunds take 5 days.,Refund still missing\n\
            refund,Refunds take 5 days.,No refund yet\n\
            hello,,hi there\n";
        let entries = import_csv(input.as_bytes()).unwrap();
        assert_eq!(entries[0].answer, "Refunds take 5 days.");
        assert_eq!(entries[0].questions.len(), 3);
        assert_eq!(entries[1].answer, default_answer("hello"));
    }

    #[test]
    fn csv_with_bom_and_crlf() {
        let input = b"\xEF\xBB\xBFtext,category\r\n\"a\r\nb\",x\r\nc,y\r\n";
        let entries = import_csv(input).unwrap();
        assert_eq!(entries[0].questions, ["a\r\nb"]);
        assert_eq!(entries[1].questions, ["c"]);
    }

    #[test]
    fn csv_malformed_rows_are_all_reported_with_their_lines() {
        let input = "text,category,answer\n\
            fine,a,\n\
            only one field\n\
            ,a,\n\
            text,,\n\
            x,b,first answer\n\
            y,b,other answer\n\
            z,b,first answer\n\
            too,many,fields,here\n";
        let found = problems(import_csv(input.as_bytes()));
        let columns = "text,category,answer".to_owned();
        assert_eq!(
            found,
            vec![
                (
                    3,
                    Problem::FieldCount {
                        expected: 3,
                        found: 1,
                        columns: columns.clone()
                    }
                ),
                (4, Problem::EmptyText),
                (5, Problem::EmptyCategory),
                (
                    7,
                    Problem::ConflictingAnswer {
                        category: "b".into(),
                        first_line: 6
                    }
                ),
                (
                    9,
                    Problem::FieldCount {
                        expected: 3,
                        found: 4,
                        columns
                    }
                ),
            ]
        );
    }

    #[test]
    fn csv_line_numbers_count_multi_line_fields_and_blank_lines() {
        let input = "text,category\n\"one\ntwo\nthree\",a\n\n\n,a\nok,a\n\"x\ny\",\n";
        assert_eq!(
            problems(import_csv(input.as_bytes())),
            vec![(7, Problem::EmptyText), (9, Problem::EmptyCategory)]
        );
    }

    #[test]
    fn csv_quotes_are_checked_after_blank_lines_too() {
        let input = "text,category\nok,a\n\n\"stray,a\nmore,a\n\"q\",b\n";
        assert_eq!(
            problems(import_csv(input.as_bytes())),
            vec![(4, Problem::TextAfterQuote { closed_on: 6 })]
        );
    }

    #[test]
    fn csv_unclosed_quote_is_reported_where_it_opens() {
        let input = "text,category\nok,a\n\"never closed,a\nmore,a\nrows,b\n";
        assert_eq!(
            problems(import_csv(input.as_bytes())),
            vec![(3, Problem::UnclosedQuote)]
        );
    }

    #[test]
    fn csv_stray_quote_that_swallows_rows_is_reported() {
        // The stray quote on line 3 is closed by the opening quote on line 5, which the
        // csv crate alone would accept as one long field.
        let input = "text,category\nok,a\n\"stray,a\nmore,a\n\"quoted\",b\nlast,c\n";
        assert_eq!(
            problems(import_csv(input.as_bytes())),
            vec![(3, Problem::TextAfterQuote { closed_on: 5 })]
        );
        let input = "text,category\n\"quoted\" then text,a\n";
        assert_eq!(
            problems(import_csv(input.as_bytes())),
            vec![(2, Problem::TextAfterQuote { closed_on: 2 })]
        );
    }

    #[test]
    fn csv_quote_inside_unquoted_field_is_literal() {
        let entries = import_csv(b"text,category\nI said \"hi\" to you,a\n").unwrap();
        assert_eq!(entries[0].questions, ["I said \"hi\" to you"]);
    }

    #[test]
    fn csv_header_problems() {
        assert_eq!(problems(import_csv(b"")), vec![(1, Problem::EmptyInput)]);
        assert_eq!(
            problems(import_csv(b"text,category\n")),
            vec![(1, Problem::NoEntries)]
        );
        assert_eq!(
            problems(import_csv(b"Where is my card?,card_arrival\n")),
            vec![(1, Problem::UnknownColumn("Where is my card?".into()))]
        );
        assert_eq!(
            problems(import_csv(b"text\nhello\n")),
            vec![(1, Problem::MissingColumn("category"))]
        );
        assert_eq!(
            problems(import_csv(b"text,category,text\n")),
            vec![(1, Problem::DuplicateColumn("text".into()))]
        );
    }

    #[test]
    fn csv_invalid_utf8_and_oversize_fields() {
        let mut input = b"text,category\nab\xFFc,a\n".to_vec();
        input.extend_from_slice(format!("{},a\n", "q".repeat(MAX_QUESTION_BYTES + 1)).as_bytes());
        assert_eq!(
            problems(import_csv(&input)),
            vec![
                (2, Problem::NotUtf8),
                (
                    3,
                    Problem::Entry(EntryProblem::TooLong {
                        field: "text",
                        len: MAX_QUESTION_BYTES + 1,
                        max: MAX_QUESTION_BYTES
                    })
                )
            ]
        );
    }

    #[test]
    fn csv_reports_at_most_the_first_problems_and_counts_all() {
        let mut input = String::from("text,category\n");
        for _ in 0..50 {
            input.push_str(",a\n");
        }
        let error = import_csv(input.as_bytes()).unwrap_err();
        assert_eq!(error.total, 50);
        assert_eq!(error.problems.len(), MAX_REPORTED_PROBLEMS);
        assert_eq!(error.problems[0].line, 2);
        assert_eq!(error.problems[19].line, 21);
        assert!(error.to_string().contains("... and 30 more"), "{error}");
    }

    #[test]
    fn banking77_train_imports_to_77_entries() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/data/banking77/train.csv"
        ));
        if !path.exists() {
            eprintln!("skipped: {} is not present", path.display());
            return;
        }
        let entries = import_file(path).unwrap();
        assert_eq!(entries.len(), 77);
        assert_eq!(super::super::question_count(&entries), 10_003);
        assert_eq!(entries[0].id, "card_arrival");
        assert!(entries
            .iter()
            .all(|entry| entry.problems().is_empty() && entry.intent == entry.id));
        // The category list shipped next to the data agrees.
        let categories: Vec<String> = serde_json::from_str(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../shared/data/banking77/categories.json"
            ))
            .unwrap(),
        )
        .unwrap();
        let mut ids: Vec<&str> = entries.iter().map(|entry| entry.id.as_str()).collect();
        let mut expected: Vec<&str> = categories.iter().map(String::as_str).collect();
        ids.sort_unstable();
        expected.sort_unstable();
        assert_eq!(ids, expected);
        // Multi-line quoted texts are trimmed (e.g. "\nHow do I unblock my PIN?").
        assert!(entries
            .iter()
            .flat_map(|entry| &entry.questions)
            .any(|question| question == "How do I unblock my PIN?"));
    }

    #[test]
    fn json_entries_parse_with_defaults() {
        let input = r#"[
            {"id": "refund", "intent": "refunds", "questions": ["Where is my refund?"],
             "answer": "5 days.", "tags": ["money"]},
            {"id": "hello", "questions": [" hi "], "answer": "Hello!"}
        ]"#;
        let entries = import_json(input.as_bytes()).unwrap();
        assert_eq!(entries[0].intent, "refunds");
        assert_eq!(entries[0].tags, ["money"]);
        assert_eq!(entries[1].intent, "hello");
        assert_eq!(entries[1].questions, ["hi"]);
        assert!(entries[1].tags.is_empty());
    }

    #[test]
    fn json_entry_problems_are_all_reported_with_their_lines() {
        let input = r#"[
  {"id": "a", "questions": ["q"], "answer": "x"},
  {"id": "b", "questions": [], "answer": "x"},
  {"id": "c", "questions": ["q"]},
  {"id": "a", "questions": ["q"], "answer": "x"},
  {"id": "d", "questions": ["q", "  "], "answer": " ", "colour": "red"},
  {"id": "e", "questions": ["q"], "answer": "   "},
  5
]"#;
        let found = problems(import_json(input.as_bytes()));
        assert_eq!(found.len(), 6, "{found:?}");
        assert_eq!(
            found[0],
            (
                3,
                Problem::Entry(EntryProblem::NoQuestions { id: "b".into() })
            )
        );
        assert!(
            matches!(&found[1], (4, Problem::JsonEntry { index: 3, message }) if message.contains("missing field `answer`")),
            "{found:?}"
        );
        assert_eq!(
            found[2],
            (
                5,
                Problem::DuplicateId {
                    id: "a".into(),
                    first_line: 2
                }
            )
        );
        assert!(
            matches!(&found[3], (6, Problem::JsonEntry { message, .. }) if message.contains("unknown field `colour`")),
            "{found:?}"
        );
        assert_eq!(
            found[4],
            (7, Problem::Entry(EntryProblem::Empty { field: "answer" }))
        );
        assert!(
            matches!(&found[5], (8, Problem::JsonEntry { message, .. }) if message.contains("invalid type")),
            "{found:?}"
        );
    }

    #[test]
    fn json_syntax_errors_have_serde_positions() {
        let input = "[\n  {\"id\": \"a\", \"questions\": [\"q\"], \"answer\": \"x\"},\n  {\"id\": \"b\",, }\n]";
        let found = problems(import_json(input.as_bytes()));
        assert!(
            matches!(&found[..], [(3, Problem::JsonSyntax { column: 14, .. })]),
            "{found:?}"
        );
        // Trailing comma, unterminated array, trailing garbage, wrong top level.
        for (input, line) in [
            (
                "[{\"id\":\"a\",\"questions\":[\"q\"],\"answer\":\"x\"},\n]",
                2,
            ),
            (
                "[\n{\"id\":\"a\",\"questions\":[\"q\"],\"answer\":\"x\"}",
                2,
            ),
            ("[]\n[]", 2),
        ] {
            let found = problems(import_json(input.as_bytes()));
            assert!(
                matches!(&found[..], [(l, Problem::JsonSyntax { .. })] if *l == line),
                "{input:?}: {found:?}"
            );
        }
        assert_eq!(
            problems(import_json(b"\n {\"id\": 1}")),
            vec![(2, Problem::NotAnArray)]
        );
        assert_eq!(problems(import_json(b"  ")), vec![(1, Problem::EmptyInput)]);
        assert_eq!(problems(import_json(b"[ ]")), vec![(1, Problem::NoEntries)]);
        assert_eq!(
            problems(import_json(b"[\n\"\xFF\"]")),
            vec![(2, Problem::NotUtf8)]
        );
    }

    #[test]
    fn format_from_extension_or_content() {
        assert_eq!(Format::from_path(Path::new("kb.JSON")), Some(Format::Json));
        assert_eq!(Format::from_path(Path::new("kb.csv")), Some(Format::Csv));
        assert_eq!(Format::from_path(Path::new("kb")), None);
        assert_eq!(Format::sniff(b"\xEF\xBB\xBF \n[{}]"), Format::Json);
        assert_eq!(Format::sniff(b"text,category\n"), Format::Csv);
    }

    #[test]
    fn import_file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kb.csv");
        std::fs::write(&path, "text,category\n,a\n").unwrap();
        let message = import_file(&path).unwrap_err().to_string();
        assert!(
            message.contains("kb.csv") && message.contains("line 2: the text is empty"),
            "{message}"
        );
        assert!(matches!(
            import_file(&dir.path().join("missing.csv")),
            Err(ImportError::Read { .. })
        ));
    }
}
