//! BM25 over the knowledge base's example questions: the lexical matcher the `intent`
//! handler degrades to when the inference queue is too slow.
//!
//! A document may be made of several texts ([`Bm25::build_from_parts`]); the index uses
//! one document per entry, made of all its questions. Measured on BANKING77 (held-out
//! tenth, `tests::measure_lexical_accuracy_and_speed`): 83.1% top-1 that way against
//! 78.7% with one document per question and the entry scoring as its best question.
//!
//! Invariants:
//! - Tokens are maximal runs of Unicode alphanumeric characters, lowercased
//!   ([`tokens`]); nothing else (no stemming, no stop words: IDF already discounts
//!   words that every question has). Scripts written without spaces (Han, Hiragana,
//!   Katakana) are cut out of those runs: each such character is a token, and so is each
//!   pair of adjacent ones (a bigram), so 怎么修改密码 matches 密码怎么改 on 密码, 怎么, 改, ...
//!   without a word segmenter.
//! - Postings are stored compressed-sparse-row: the documents of term `t` are
//!   `postings[starts[t]..starts[t + 1]]`, in increasing document order.
//! - Scores are standard Okapi BM25 with `k1 = 1.2`, `b = 0.75` and the non-negative
//!   IDF `ln(1 + (N - df + 0.5) / (df + 0.5))`; a document that shares no term with the
//!   query scores 0. A query term repeated counts once.

use std::collections::HashMap;

/// Term-frequency saturation.
pub const K1: f32 = 1.2;
/// Document-length normalisation.
pub const B: f32 = 0.75;

/// An inverted index over a fixed list of documents.
#[derive(Debug, Default)]
pub struct Bm25 {
    vocabulary: HashMap<Box<str>, u32>,
    /// Term id -> start of its postings; one extra element at the end.
    starts: Vec<u32>,
    postings: Vec<Posting>,
    /// Term id -> inverse document frequency.
    idf: Vec<f32>,
    /// Document -> number of tokens.
    doc_len: Vec<u32>,
    average_len: f32,
}

#[derive(Debug, Clone, Copy)]
struct Posting {
    doc: u32,
    term_frequency: u32,
}

/// The lowercased alphanumeric tokens of `text`, with CJK runs split into characters and
/// bigrams (see the module invariants).
pub fn tokens(text: &str) -> std::vec::IntoIter<String> {
    let mut out = Vec::new();
    for run in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|run| !run.is_empty())
    {
        let mut word_start = None;
        let mut previous_cjk: Option<char> = None;
        for (at, c) in run.char_indices() {
            if is_cjk(c) {
                if let Some(start) = word_start.take() {
                    out.push(run[start..at].to_lowercase());
                }
                out.push(c.to_string());
                if let Some(previous) = previous_cjk {
                    out.push([previous, c].iter().collect());
                }
                previous_cjk = Some(c);
            } else {
                previous_cjk = None;
                word_start.get_or_insert(at);
            }
        }
        if let Some(start) = word_start {
            out.push(run[start..].to_lowercase());
        }
    }
    out.into_iter()
}

/// Characters of scripts written without spaces between words: CJK ideographs (with the
/// extensions and compatibility blocks), Hiragana and Katakana.
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF       // Hiragana, Katakana
        | 0x31F0..=0x31FF     // Katakana phonetic extensions
        | 0x3400..=0x4DBF     // CJK extension A
        | 0x4E00..=0x9FFF     // CJK unified ideographs
        | 0xF900..=0xFAFF     // CJK compatibility ideographs
        | 0xFF66..=0xFF9F     // half-width Katakana
        | 0x20000..=0x3134F   // CJK extensions B..G
    )
}

impl Bm25 {
    /// Indexes `docs`; document `i` is the `i`-th item.
    pub fn build<'a>(docs: impl IntoIterator<Item = &'a str>) -> Bm25 {
        Bm25::build_from_parts(docs.into_iter().map(std::iter::once))
    }

    /// Indexes documents made of several texts each (tokens of all parts count as one
    /// document); document `i` is the `i`-th item.
    pub fn build_from_parts<'a, P>(docs: impl IntoIterator<Item = P>) -> Bm25
    where
        P: IntoIterator<Item = &'a str>,
    {
        let mut vocabulary: HashMap<Box<str>, u32> = HashMap::new();
        // (term, doc, frequency) in document order.
        let mut triples: Vec<(u32, u32, u32)> = Vec::new();
        let mut doc_len = Vec::new();
        let mut doc_terms: Vec<u32> = Vec::new();
        for (doc, parts) in docs.into_iter().enumerate() {
            doc_terms.clear();
            for token in parts.into_iter().flat_map(tokens) {
                let next_id = vocabulary.len() as u32;
                let id = *vocabulary.entry(token.into_boxed_str()).or_insert(next_id);
                doc_terms.push(id);
            }
            doc_len.push(doc_terms.len() as u32);
            doc_terms.sort_unstable();
            for run in doc_terms.chunk_by(|a, b| a == b) {
                triples.push((run[0], doc as u32, run.len() as u32));
            }
        }
        // Stable: documents stay in increasing order within a term.
        triples.sort_by_key(|&(term, _, _)| term);

        let docs = doc_len.len();
        let mut starts = Vec::with_capacity(vocabulary.len() + 1);
        let mut idf = Vec::with_capacity(vocabulary.len());
        let postings: Vec<Posting> = triples
            .iter()
            .map(|&(_, doc, term_frequency)| Posting {
                doc,
                term_frequency,
            })
            .collect();
        let mut position = 0usize;
        for term in 0..vocabulary.len() as u32 {
            starts.push(position as u32);
            let df = triples[position..]
                .iter()
                .take_while(|&&(t, _, _)| t == term)
                .count();
            position += df;
            let (n, df) = (docs as f32, df as f32);
            idf.push((1.0 + (n - df + 0.5) / (df + 0.5)).ln());
        }
        starts.push(position as u32);

        let total: u64 = doc_len.iter().map(|&len| u64::from(len)).sum();
        let average_len = if docs == 0 {
            0.0
        } else {
            (total as f64 / docs as f64) as f32
        };
        Bm25 {
            vocabulary,
            starts,
            postings,
            idf,
            doc_len,
            average_len,
        }
    }

    pub fn doc_count(&self) -> usize {
        self.doc_len.len()
    }

    /// Distinct terms indexed.
    pub fn term_count(&self) -> usize {
        self.vocabulary.len()
    }

    /// Adds every document's BM25 score for `query` into `scores` (one slot per
    /// document). Returns false when no query term occurs in any document.
    pub fn add_scores(&self, query: &str, scores: &mut [f32]) -> bool {
        assert_eq!(
            scores.len(),
            self.doc_count(),
            "one score slot per document"
        );
        let mut terms: Vec<u32> = tokens(query)
            .filter_map(|token| self.vocabulary.get(token.as_str()).copied())
            .collect();
        terms.sort_unstable();
        terms.dedup();
        let average_len = self.average_len.max(f32::MIN_POSITIVE);
        for &term in &terms {
            let idf = self.idf[term as usize];
            let postings = &self.postings
                [self.starts[term as usize] as usize..self.starts[term as usize + 1] as usize];
            for posting in postings {
                let tf = posting.term_frequency as f32;
                let len = self.doc_len[posting.doc as usize] as f32;
                let norm = K1 * (1.0 - B + B * len / average_len);
                scores[posting.doc as usize] += idf * tf * (K1 + 1.0) / (tf + norm);
            }
        }
        !terms.is_empty()
    }

    /// Approximate heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        let vocabulary: usize = self
            .vocabulary
            .keys()
            .map(|term| term.len() + std::mem::size_of::<(Box<str>, u32)>() + 8)
            .sum();
        vocabulary
            + self.starts.capacity() * 4
            + self.postings.capacity() * std::mem::size_of::<Posting>()
            + self.idf.capacity() * 4
            + self.doc_len.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(index: &Bm25, query: &str) -> Vec<f32> {
        let mut scores = vec![0.0; index.doc_count()];
        index.add_scores(query, &mut scores);
        scores
    }

    #[test]
    fn tokens_are_lowercase_alphanumeric_runs() {
        let found: Vec<String> =
            tokens("Where's my CARD? (ordered 2 weeks ago) – Ünïcode!").collect();
        assert_eq!(
            found,
            [
                "where",
                "s",
                "my",
                "card",
                "ordered",
                "2",
                "weeks",
                "ago",
                "ünïcode"
            ]
        );
    }

    #[test]
    fn cjk_runs_become_characters_and_bigrams() {
        let found: Vec<String> = tokens("怎么修改密码？").collect();
        assert_eq!(
            found,
            [
                "怎", "么", "怎么", "修", "么修", "改", "修改", "密", "改密", "码", "密码"
            ]
        );
        // Latin words inside a CJK run stay whole and lowercased; punctuation breaks bigrams.
        let found: Vec<String> = tokens("VIP会员，能打折吗").collect();
        assert_eq!(
            found,
            [
                "vip", "会", "员", "会员", "能", "打", "能打", "折", "打折", "吗", "折吗"
            ]
        );
        // Kana count as CJK too; Hangul is written with spaces and stays word-based.
        let found: Vec<String> = tokens("パスワード 비밀번호 변경").collect();
        assert_eq!(found[..3], ["パ", "ス", "パス"]);
        assert_eq!(found[found.len() - 2..], ["비밀번호", "변경"]);
    }

    #[test]
    fn chinese_paraphrases_match_their_entry() {
        let index = Bm25::build_from_parts([
            vec!["怎么修改密码", "我想改一下登录密码"],
            vec!["如何申请退款", "东西不想要了，钱能退吗"],
            vec!["运费多少钱", "包邮吗"],
            vec!["可以开发票吗", "发票在哪里申请"],
        ]);
        for (query, expected) in [
            ("密码怎么改", 0),
            ("退款怎么申请", 1),
            ("邮费是多少", 2),
            ("我要开发票", 3),
        ] {
            let found = scores(&index, query);
            let best = (0..found.len())
                .max_by(|&a, &b| found[a].total_cmp(&found[b]))
                .unwrap();
            assert_eq!(best, expected, "{query}: {found:?}");
        }
        // Nothing shared with an off-topic question scores nothing.
        let mut none = vec![0.0; index.doc_count()];
        assert!(!index.add_scores("今天天气晴朗", &mut none));
    }

    #[test]
    fn matches_a_hand_computed_score() {
        let index = Bm25::build(["card lost", "card card arrived late", "top up"]);
        // "lost": df 1 of 3 docs, tf 1 in doc 0 (2 tokens; average length 8/3).
        let idf = (1.0f32 + (3.0 - 1.0 + 0.5) / (1.0 + 0.5)).ln();
        let expected = idf * 2.2 / (1.0 + 1.2 * (0.25 + 0.75 * 2.0 / (8.0 / 3.0)));
        let found = scores(&index, "LOST lost");
        assert!(
            (found[0] - expected).abs() < 1e-6,
            "{found:?} vs {expected}"
        );
        assert_eq!(&found[1..], [0.0, 0.0]);
    }

    #[test]
    fn rare_and_repeated_terms_rank_higher() {
        let index = Bm25::build([
            "how do i reset my pin",
            "my card has not arrived",
            "my card was stolen",
            "card card card arrived",
            "how do i top up",
        ]);
        let found = scores(&index, "card arrived?");
        // Docs 1 and 3 contain both words; 3 repeats "card" and is shorter. Doc 2 only
        // has "card".
        assert!(
            found[3] > found[1] && found[1] > found[2] && found[2] > 0.0,
            "{found:?}"
        );
        // A word the query shares with doc 1 only ("my" is in 3 of 5 docs) breaks the tie.
        let found = scores(&index, "my card arrived?");
        assert!(found[1] > found[3], "{found:?}");
        // "stolen" is rarer than "card": one rare hit beats one common hit.
        let found = scores(&index, "stolen card");
        assert!(found[2] > found[1] && found[2] > found[3], "{found:?}");
        assert_eq!(found[0], 0.0);
        let mut empty = vec![0.0; index.doc_count()];
        assert!(!index.add_scores("zebra !!", &mut empty));
        assert!(empty.iter().all(|&score| score == 0.0));
    }

    #[test]
    fn parts_form_one_document() {
        let joined = Bm25::build(["card lost", "top up my card please"]);
        let parts =
            Bm25::build_from_parts([vec!["card", "lost"], vec!["top up", "my card please"]]);
        assert_eq!(
            scores(&joined, "lost card up"),
            scores(&parts, "lost card up")
        );
    }

    #[test]
    fn empty_index_is_harmless() {
        let index = Bm25::build(std::iter::empty());
        assert_eq!(index.doc_count(), 0);
        assert!(!index.add_scores("anything", &mut []));
    }
}
