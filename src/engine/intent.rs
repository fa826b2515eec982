//! The per-shard intent engine: recognises which knowledge-base entry a visitor message
//! asks about, through the shard's caches, its inference worker and its replica's current
//! version.
//!
//! [`IntentEngine::recognise`] takes, in order:
//! 1. the hot-query cache (normalised text → entry and scores, LFU-DA): a hit skips the model;
//! 2. the embedding cache (text → vector, LFU-DA): a hit skips the worker;
//! 3. the inference worker ([`InferenceHandle::embed`]), awaited without blocking the shard;
//!
//! then classifies the vector with the version's [`IntentClassifier`] (neighbour vote over
//! the question vectors blended with the trained head). The classifier only ranks the entries
//! against each other, so with few entries it is confident about unrelated messages too; a
//! match whose nearest question has a cosine below `[bot] min_similarity` scores 0 (measured:
//! see `tuning/default.toml`). When the worker refuses or expires
//! the request (queue too long for `[inference] max_wait`), fails, or is not running, it
//! degrades to BM25 over the questions ([`KbIndex::lexical_top`]) and marks the result
//! `degraded`. The caller applies the confidence and margin thresholds (the `intent` bot
//! handler does).
//!
//! Invariants:
//! - One knowledge-base version per recognition: the engine holds the current version as an
//!   `Rc<LoadedKb>`; a recognition clones it before it awaits anything, so a reload while it
//!   waits never mixes versions. The old version's LMDB read transaction ends when the last
//!   recognition using it does.
//! - The hot-query cache only holds model (not degraded) results of the current version: it is
//!   emptied when a new version is loaded, and a result computed against a version that was
//!   replaced meanwhile is not stored. The embedding cache survives reloads (the vectors depend
//!   only on the model).
//! - Vectors from another model are never scored: a version whose model fingerprint or
//!   dimension differs from the engine's encoder is answered lexically (degraded) only.
//! - Shard-local (`Rc`, `RefCell`, not `Send`); no borrow is held across an `await`.
//!
//! Lexical scores are put on the model's 0..1 scale as a softmax over every entry's BM25
//! score with temperature [`LEXICAL_TEMPERATURE`] (an entry sharing no word scores 0 and still
//! takes its share), so a single weak word in common gives a low score and the thresholds
//! apply unchanged. The temperature was picked with `switchboard kb eval --lexical` on the
//! BANKING77 hold-out.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::cache::{CacheCounters, LfuCache};
use super::classifier::{BlendParams, IntentClassifier, PredictScratch, QuestionVectors};
use super::encoder::{Encoder, EncoderError};
use super::worker::{InferenceHandle, InferenceWorker, WorkerOptions, WorkerSnapshot};
use crate::bot::IntentMatch;
use crate::config::Config;
use crate::kb::{self, KbError, KbIndex, KbReplica, ReplicaReader};

/// Softmax temperature, in BM25 score units, turning lexical scores into 0..1 confidences.
///
/// Measured with `kb eval --lexical` on the BANKING77 hold-out (top-1 84.15% whatever the
/// temperature), answering at score ≥ 0.4 (margin 0): temperature 1 answers 84.7% of the
/// questions, 89.2% of them right; 1.5 answers 71.2%, 91.9% right; 2 answers 56.5%, 93.7%
/// right (the model: 98.1%, 94.7% right); 3 answers 30.3%, 96.7% right. Of 20 out-of-domain
/// questions (margin 0.05), temperature 1 answers 5, 1.5 answers 1, 2 answers none.
/// Degraded answers should be about as trustworthy as the model's, so 2.
pub const LEXICAL_TEMPERATURE: f32 = 2.0;

/// Why an engine could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Kb(#[from] KbError),
    #[error(transparent)]
    Encoder(#[from] EncoderError),
    #[error("cannot start the inference worker thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Where the model files are and how they run.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSettings {
    pub model: PathBuf,
    pub tokenizer: PathBuf,
    pub ort_library: PathBuf,
    pub max_sequence_length: usize,
    /// Prepended to every text before tokenizing (`[inference] text_prefix`).
    pub text_prefix: String,
    /// Intra-op threads of the session (1 for a worker next to a shard).
    pub threads: usize,
    /// A second model whose vectors are appended to the first's (`[inference] companion_*`).
    pub companion: Option<CompanionSettings>,
}

/// The companion encoder of [`ModelSettings`] (see [`Encoder::with_companion`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CompanionSettings {
    pub model: PathBuf,
    pub tokenizer: PathBuf,
    pub text_prefix: String,
}

impl ModelSettings {
    /// `[inference]` model, tokenizer, ort_library, max_sequence_length, text_prefix and the
    /// companion keys, with `threads`.
    pub fn from_config(config: &Config, threads: usize) -> Self {
        let inference = &config.inference;
        let companion =
            (!inference.companion_model.as_os_str().is_empty()).then(|| CompanionSettings {
                model: inference.companion_model.clone(),
                tokenizer: inference.companion_tokenizer.clone(),
                text_prefix: inference.companion_text_prefix.clone(),
            });
        ModelSettings {
            model: inference.model.clone(),
            tokenizer: inference.tokenizer.clone(),
            ort_library: inference.ort_library.clone(),
            max_sequence_length: inference.max_sequence_length,
            text_prefix: inference.text_prefix.clone(),
            threads,
            companion,
        }
    }

    /// Loads the encoder these settings describe; with a companion, both models load at once
    /// (on two threads), so a cold start costs the slower of the two, not their sum.
    pub fn load(&self) -> Result<Encoder, EncoderError> {
        let load = |model: &Path, tokenizer: &Path, prefix: &str| {
            Encoder::load(
                model,
                tokenizer,
                &self.ort_library,
                self.threads,
                self.max_sequence_length,
            )
            .map(|encoder| encoder.with_text_prefix(prefix))
        };
        let Some(companion) = &self.companion else {
            return load(&self.model, &self.tokenizer, &self.text_prefix);
        };
        let (main, second) = std::thread::scope(|scope| {
            let second = scope.spawn(|| {
                load(
                    &companion.model,
                    &companion.tokenizer,
                    &companion.text_prefix,
                )
            });
            let main = load(&self.model, &self.tokenizer, &self.text_prefix);
            let second = second
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (main, second)
        });
        main?.with_companion(second?)
    }
}

/// Everything an [`IntentEngine`] is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineSettings {
    /// `[storage] dir`: the replicas are `<dir>/kb-<shard>/`.
    pub storage_dir: PathBuf,
    /// LMDB map size of the replicas; every process opening them must use the same.
    pub kb_map_size: usize,
    /// `None`: no model (`[inference] enabled = false`); every recognition is lexical.
    pub model: Option<ModelSettings>,
    pub worker: WorkerOptions,
    /// `[bot] hot_cache_entries` (0 disables).
    pub hot_cache_entries: usize,
    /// `[bot] embedding_cache_entries` (0 disables).
    pub embedding_cache_entries: usize,
    /// `[bot] min_similarity`: a model match whose nearest question's cosine is below this
    /// scores 0.
    pub min_similarity: f32,
    /// How often [`IntentEngine::maybe_reload`] looks for a new version.
    pub reload_interval: Duration,
}

impl EngineSettings {
    pub fn from_config(config: &Config) -> Self {
        EngineSettings {
            storage_dir: config.storage.dir.clone(),
            kb_map_size: kb::DEFAULT_MAP_SIZE,
            model: config
                .inference
                .enabled
                .then(|| ModelSettings::from_config(config, 1)),
            worker: WorkerOptions::from_config(&config.inference),
            hot_cache_entries: config.bot.hot_cache_entries,
            embedding_cache_entries: config.bot.embedding_cache_entries,
            min_similarity: config.bot.min_similarity as f32,
            reload_interval: Duration::from_secs(1),
        }
    }
}

/// Which cache answered a recognition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// The hot-query cache had the answer: no model, no classification.
    HotHit,
    /// The embedding cache had the vector: no model.
    EmbeddingHit,
    /// Neither (the text went to the worker, or was matched lexically).
    Miss,
}

/// The best knowledge-base entry for a message.
#[derive(Debug, Clone, PartialEq)]
pub struct IntentResult {
    /// The knowledge-base version it came from.
    pub version: u64,
    /// The entry's index in that version, and its id.
    pub entry: usize,
    pub entry_id: String,
    pub intent: String,
    pub answer: String,
    /// Score of the entry, 0..=1.
    pub score: f32,
    /// Score of the runner-up entry, 0..=1 (0 when there is none).
    pub second_score: f32,
    /// Cosine between the message and its nearest question (`None` for a lexical match).
    /// Below `min_similarity`, `score` and `second_score` are 0.
    pub similarity: Option<f32>,
    /// Matched lexically (BM25) because the model could not be used in time.
    pub degraded: bool,
    pub cache: CacheOutcome,
}

impl From<IntentResult> for IntentMatch {
    fn from(result: IntentResult) -> IntentMatch {
        IntentMatch {
            intent: result.intent,
            answer: Some(result.answer),
            score: result.score,
            second_score: result.second_score,
            degraded: result.degraded,
        }
    }
}

/// Counters of an engine, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct EngineStats {
    /// The loaded knowledge-base version (`None` before the first import).
    pub version: Option<u64>,
    pub hot_cache: CacheCounters,
    pub embedding_cache: CacheCounters,
    /// Recognitions answered lexically.
    pub degraded: u64,
    /// Versions loaded after the first.
    pub reloads: u64,
    /// The inference worker's counters (`None` without a model).
    pub worker: Option<WorkerSnapshot>,
}

/// What a hot-cache entry remembers: the result, by reference into its version.
#[derive(Debug, Clone, Copy)]
struct HotAnswer {
    version: u64,
    found: Found,
}

/// A match within one version.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Found {
    entry: usize,
    score: f32,
    second_score: f32,
    similarity: Option<f32>,
}

/// One loaded knowledge-base version with its classifier.
struct LoadedKb {
    index: KbIndex,
    classifier: IntentClassifier,
    /// Entry index of every question row.
    labels: Vec<u32>,
    /// The vectors came from the engine's model: queries may be scored against them.
    model_matches: bool,
}

/// The entry index of every question row, given each entry's number of questions in order.
pub fn row_labels(question_counts: impl IntoIterator<Item = usize>) -> Vec<u32> {
    question_counts
        .into_iter()
        .enumerate()
        .flat_map(|(entry, count)| std::iter::repeat_n(entry as u32, count))
        .collect()
}

impl LoadedKb {
    /// The replica's current version, `None` before the first import. `encoder` is the
    /// engine's model (fingerprint, dimension), if any.
    fn load(
        reader: &ReplicaReader,
        encoder: Option<(&str, Option<usize>)>,
    ) -> Result<Option<LoadedKb>, KbError> {
        let Some(index) = KbIndex::load(reader)? else {
            return Ok(None);
        };
        let labels = row_labels((0..index.entry_count()).map(|entry| index.rows_of(entry).len()));
        let classes = index.entry_count();
        let head = index.classifier().and_then(|bytes| {
            match super::classifier::SoftmaxRegression::from_bytes(bytes) {
                Ok(head) if head.classes() == classes && head.dim() == index.dim() => Some(head),
                Ok(head) => {
                    tracing::warn!(
                        version = index.version(),
                        head_classes = head.classes(),
                        head_dim = head.dim(),
                        "classifier head does not fit the knowledge base; using the neighbour vote alone"
                    );
                    None
                }
                Err(error) => {
                    tracing::warn!(version = index.version(), %error, "unusable classifier head; using the neighbour vote alone");
                    None
                }
            }
        });
        let classifier = IntentClassifier::new(classes, head, BlendParams::default())
            .expect("a stored version has entries and the default blend is valid");
        let model_matches = match encoder {
            Some((fingerprint, dim)) => {
                let matches = index.model_fingerprint() == fingerprint
                    && dim.is_none_or(|dim| dim == index.dim());
                if !matches {
                    tracing::warn!(
                        version = index.version(),
                        stored = index.model_fingerprint(),
                        loaded = fingerprint,
                        "the knowledge base was embedded with another model: answering lexically until it is imported again"
                    );
                }
                matches
            }
            None => false,
        };
        Ok(Some(LoadedKb {
            index,
            classifier,
            labels,
            model_matches,
        }))
    }

    fn version(&self) -> u64 {
        self.index.version()
    }

    /// The classifier's best entry for `vector` with its score and the runner-up's, both 0
    /// when the nearest question is less similar than `min_similarity`.
    fn classify(
        &self,
        vector: &[f32],
        min_similarity: f32,
        scratch: &mut PredictScratch,
    ) -> Option<Found> {
        let questions = QuestionVectors {
            dim: self.index.dim(),
            vectors: self.index.question_vectors(),
            labels: &self.labels,
        };
        match self.classifier.predict(vector, questions, scratch) {
            Ok(found) => found.map(|m| {
                let p = m.prediction;
                let related = m.nearest.score >= min_similarity;
                Found {
                    entry: p.intent as usize,
                    score: if related { p.score } else { 0.0 },
                    second_score: if related { p.second_score } else { 0.0 },
                    similarity: Some(m.nearest.score),
                }
            }),
            Err(error) => {
                tracing::warn!(%error, "cannot classify the query vector");
                None
            }
        }
    }

    /// The best entry by BM25, scores mapped to 0..1 (see the module documentation).
    fn lexical(&self, text: &str) -> Option<Found> {
        let entries = self.index.entry_count();
        let ranked = self.index.lexical_top(text, entries);
        let &(best, best_score) = ranked.first()?;
        let second_score = ranked.get(1).map_or(0.0, |&(_, score)| score);
        let temperature = LEXICAL_TEMPERATURE;
        // Softmax over all entries, shifted by the best score for stability; entries not in
        // `ranked` share no word with the text and score 0.
        let unmatched = (entries - ranked.len()) as f32 * (-best_score / temperature).exp();
        let total: f32 = ranked
            .iter()
            .map(|&(_, score)| ((score - best_score) / temperature).exp())
            .sum::<f32>()
            + unmatched;
        let second_share = if ranked.len() > 1 {
            ((second_score - best_score) / temperature).exp()
        } else if entries > 1 {
            (-best_score / temperature).exp()
        } else {
            0.0
        };
        Some(Found {
            entry: best,
            score: 1.0 / total,
            second_score: second_share / total,
            similarity: None,
        })
    }

    fn result(&self, found: Found, degraded: bool, cache: CacheOutcome) -> IntentResult {
        let archived = self.index.entry(found.entry);
        IntentResult {
            version: self.version(),
            entry: found.entry,
            entry_id: archived.id().to_owned(),
            intent: archived.intent().to_owned(),
            answer: archived.answer().to_owned(),
            score: found.score,
            second_score: found.second_score,
            similarity: found.similarity,
            degraded,
            cache,
        }
    }
}

/// A shard's intent engine (see the module documentation).
pub struct IntentEngine {
    shard: usize,
    reader: ReplicaReader,
    worker: Option<InferenceHandle>,
    /// The model's fingerprint and dimension, when there is a model.
    model: Option<(String, Option<usize>)>,
    kb: RefCell<Option<Rc<LoadedKb>>>,
    reload_interval: Duration,
    min_similarity: f32,
    next_poll: Cell<Instant>,
    hot: RefCell<LfuCache<HotAnswer>>,
    embeddings: RefCell<LfuCache<Rc<[f32]>>>,
    scratch: RefCell<PredictScratch>,
    degraded: Cell<u64>,
    reloads: Cell<u64>,
}

/// How long [`IntentEngine::open`] took, by part.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct OpenTimings {
    /// Loading ONNX Runtime (first time in the process), the model and the tokenizer.
    pub model: Duration,
    /// Opening the replica and loading its current version.
    pub knowledge_base: Duration,
    pub total: Duration,
}

impl IntentEngine {
    /// Opens shard `shard`'s replica under `settings.storage_dir`, loads its current version
    /// and, when a model is configured, loads the encoder and starts its worker pinned to
    /// `core`. Takes about half a second with the shipped model (session creation).
    pub fn open(
        settings: &EngineSettings,
        shard: usize,
        core: usize,
    ) -> Result<IntentEngine, EngineError> {
        Self::open_timed(settings, shard, core).map(|(engine, _)| engine)
    }

    /// [`open`](Self::open), also returning how long each part took.
    pub fn open_timed(
        settings: &EngineSettings,
        shard: usize,
        core: usize,
    ) -> Result<(IntentEngine, OpenTimings), EngineError> {
        let started = Instant::now();
        let (worker, model) = match &settings.model {
            Some(model_settings) => {
                let encoder = model_settings.load()?;
                let model = (encoder.fingerprint().to_owned(), encoder.dim());
                let worker = InferenceWorker::start(shard, core, encoder, settings.worker.clone())
                    .map_err(EngineError::Spawn)?;
                (Some(worker), Some(model))
            }
            None => (None, None),
        };
        let model_time = started.elapsed();
        let kb_started = Instant::now();
        let reader =
            KbReplica::open_shared(&settings.storage_dir, shard, settings.kb_map_size)?.reader();
        let loaded = LoadedKb::load(&reader, model.as_ref().map(|(f, d)| (f.as_str(), *d)))?;
        let engine = IntentEngine {
            shard,
            reader,
            worker,
            model,
            kb: RefCell::new(loaded.map(Rc::new)),
            reload_interval: settings.reload_interval,
            min_similarity: settings.min_similarity,
            next_poll: Cell::new(Instant::now() + settings.reload_interval),
            hot: RefCell::new(LfuCache::new(settings.hot_cache_entries)),
            embeddings: RefCell::new(LfuCache::new(settings.embedding_cache_entries)),
            scratch: RefCell::new(PredictScratch::default()),
            degraded: Cell::new(0),
            reloads: Cell::new(0),
        };
        let timings = OpenTimings {
            model: model_time,
            knowledge_base: kb_started.elapsed(),
            total: started.elapsed(),
        };
        Ok((engine, timings))
    }

    /// A read handle on the shard's replica (for the admin API's entry listing).
    pub fn replica(&self) -> &ReplicaReader {
        &self.reader
    }

    pub fn shard(&self) -> usize {
        self.shard
    }

    /// The loaded knowledge-base version, `None` before the first import.
    pub fn version(&self) -> Option<u64> {
        self.kb.borrow().as_ref().map(|kb| kb.version())
    }

    /// Entries of the loaded version (0 before the first import).
    pub fn entry_count(&self) -> usize {
        self.kb
            .borrow()
            .as_ref()
            .map_or(0, |kb| kb.index.entry_count())
    }

    /// The distinct intents of the loaded version, in entry order.
    pub fn intents(&self) -> Vec<String> {
        let kb = self.kb.borrow();
        let mut seen = std::collections::HashSet::new();
        kb.iter()
            .flat_map(|kb| kb.index.entries())
            .map(|entry| entry.intent())
            .filter(|intent| seen.insert(*intent))
            .map(str::to_owned)
            .collect()
    }

    /// The encoder's fingerprint, `None` without a model.
    pub fn model_fingerprint(&self) -> Option<&str> {
        self.model
            .as_ref()
            .map(|(fingerprint, _)| fingerprint.as_str())
    }

    /// The inference worker, `None` without a model.
    pub fn worker(&self) -> Option<&InferenceHandle> {
        self.worker.as_ref()
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            version: self.version(),
            hot_cache: self.hot.borrow().counters(),
            embedding_cache: self.embeddings.borrow().counters(),
            degraded: self.degraded.get(),
            reloads: self.reloads.get(),
            worker: self.worker.as_ref().map(InferenceHandle::stats),
        }
    }

    /// Reloads when the replica's current version changed, at most once per
    /// `reload_interval` (cheap otherwise: one clock read). Returns whether a new version
    /// was loaded; a failure is logged and the loaded version kept.
    pub fn maybe_reload(&self) -> bool {
        let now = Instant::now();
        if now < self.next_poll.get() {
            return false;
        }
        self.next_poll.set(now + self.reload_interval);
        match self.reload() {
            Ok(changed) => changed,
            Err(error) => {
                tracing::warn!(shard = self.shard, %error, "cannot reload the knowledge base; keeping the loaded version");
                false
            }
        }
    }

    /// Loads the replica's current version now if it is not the loaded one (one short LMDB
    /// read when it is). Returns whether a new version was loaded. Loading BANKING77 takes
    /// a few milliseconds on the calling thread.
    pub fn reload(&self) -> Result<bool, KbError> {
        let current = self.reader.current_version()?;
        if current == self.version() {
            return Ok(false);
        }
        let model = self.model.as_ref().map(|(f, d)| (f.as_str(), *d));
        let loaded = LoadedKb::load(&self.reader, model)?;
        let version = loaded.as_ref().map(LoadedKb::version);
        *self.kb.borrow_mut() = loaded.map(Rc::new);
        self.hot.borrow_mut().clear();
        self.reloads.set(self.reloads.get() + 1);
        tracing::info!(shard = self.shard, ?version, "knowledge base reloaded");
        Ok(true)
    }

    /// The best entry for `text`, or `None` when no knowledge base has been imported or,
    /// degraded, no entry shares a word with the text. Never blocks the calling thread on
    /// inference; see the module documentation for the order of the caches.
    pub async fn recognise(&self, text: &str) -> Option<IntentResult> {
        self.maybe_reload();
        let kb = self.kb.borrow().clone()?;
        let text = collapse_whitespace(text);
        let hot_key = text.to_lowercase();
        let hot = self.hot.borrow_mut().get(&hot_key).copied();
        if let Some(hot) = hot.filter(|hot| hot.version == kb.version()) {
            return Some(kb.result(hot.found, false, CacheOutcome::HotHit));
        }
        let worker = match &self.worker {
            Some(worker) if kb.model_matches && worker.is_running() => worker,
            _ => return self.lexical(&kb, &text),
        };
        let cached = self.embeddings.borrow_mut().get(&text).cloned();
        let (vector, cache) = match cached {
            Some(vector) => (vector, CacheOutcome::EmbeddingHit),
            None => match worker.embed(&text).await {
                Ok(vector) => {
                    let vector: Rc<[f32]> = vector.into();
                    self.embeddings.borrow_mut().insert(&text, vector.clone());
                    (vector, CacheOutcome::Miss)
                }
                Err(error) => {
                    tracing::debug!(shard = self.shard, %error, "degrading to the lexical match");
                    return self.lexical(&kb, &text);
                }
            },
        };
        let classified = kb.classify(&vector, self.min_similarity, &mut self.scratch.borrow_mut());
        let Some(found) = classified else {
            return self.lexical(&kb, &text);
        };
        if self.version() == Some(kb.version()) {
            let answer = HotAnswer {
                version: kb.version(),
                found,
            };
            self.hot.borrow_mut().insert(&hot_key, answer);
        }
        Some(kb.result(found, false, cache))
    }

    /// The degraded path: BM25 over the questions.
    fn lexical(&self, kb: &LoadedKb, text: &str) -> Option<IntentResult> {
        self.degraded.set(self.degraded.get() + 1);
        let found = kb.lexical(text)?;
        Some(kb.result(found, true, CacheOutcome::Miss))
    }

    /// The lexical match alone, whatever the worker's state (for `kb eval --lexical`).
    pub fn recognise_lexically(&self, text: &str) -> Option<IntentResult> {
        let kb = self.kb.borrow().clone()?;
        self.lexical(&kb, &collapse_whitespace(text))
    }
}

/// `text` with surrounding whitespace removed and inner runs of whitespace made one space:
/// what is embedded and what keys the embedding cache (the hot cache also lowercases it).
pub fn collapse_whitespace(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_is_collapsed() {
        assert_eq!(
            collapse_whitespace("  Where is\tmy \n card? "),
            "Where is my card?"
        );
        assert_eq!(collapse_whitespace(" \t\n"), "");
    }

    #[test]
    fn row_labels_follow_the_entries() {
        assert_eq!(row_labels([2, 1, 3]), vec![0, 0, 1, 2, 2, 2]);
        assert!(row_labels(std::iter::empty()).is_empty());
    }
}
