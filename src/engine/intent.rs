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
//! - A hot-cache entry answers only the cascade setting it was computed with
//!   ([`Cascade`]: the configured cascade, or a gray-release variant's `model`): the setting is
//!   part of its key.
//! - The hot-query cache only holds model (not degraded) results of the current version: it is
//!   emptied when a new version is loaded and when the companion becomes ready, and a result
//!   computed against a version that was replaced meanwhile is not stored. A version imported with
//!   fine-tuned top layers (`engine::finetune`) embeds its queries with those layers: its
//!   embeddings are cached under the version number, so they never serve another version.
//!   Otherwise the embedding cache survives reloads (the vectors depend
//!   only on the model).
//! - Vectors from another model are never scored: a version whose model fingerprint or
//!   dimension differs from the engine's encoder is answered lexically (degraded) only.
//! - Shard-local (`Rc`, `RefCell`, not `Send`); no borrow is held across an `await`.
//! - A new version found by the periodic poll ([`IntentEngine::maybe_reload`]) is loaded on a
//!   thread of its own (`kb-load-N`; building BANKING77's index and decoding its tuned layers
//!   takes tens of milliseconds) and swapped in by a later poll or recognition: the shard's
//!   event loop never waits for it, and the loaded version keeps answering meanwhile. At most
//!   one load is in flight per shard.
//!
//! # The companion cascade
//! With `[inference] companion_model`, the knowledge base stores the two models' vectors
//! joined (each unit vector scaled by 1/√2) and, next to the head over the joined vectors, a
//! head over the primary model's part. A query is first embedded by the primary model alone
//! and classified against the primary part of the stored vectors (a query `[√2·q, 0]` scores
//! exactly the primary model's cosines against joined rows) with the primary head; only when
//! the best score is below `[inference] companion_below` does the companion embed it too, and
//! the joined vector decides. A version imported with fine-tuning stores tuned primary vectors
//! joined with the companion's; its first step embeds with the tuned layers. Chosen on 5-fold
//! cross-validation inside BANKING77
//! (models/README.md): escalating a few percent of the queries keeps the accuracy of always
//! running both models at a fraction of the cost. A gray-release variant's `model` overrides
//! the cascade per call ([`IntentEngine::recognise_with`]): [`Cascade::PrimaryOnly`] stops at
//! the first stage, [`Cascade::Always`] escalates every query.
//!
//! # Loading
//! The models load on the worker's threads ([`InferenceWorker::start_loading`]) while the
//! shard already serves: until the primary model is ready every recognition is lexical
//! (degraded); until the companion is ready the primary model answers alone (the cascade
//! never escalates). `EngineSettings::wait_for_models` makes [`IntentEngine::open`] wait
//! instead (the command line).
//!
//! Lexical scores are put on the model's 0..1 scale as a softmax over every entry's BM25
//! score with temperature [`LEXICAL_TEMPERATURE`] (an entry sharing no word scores 0 and still
//! takes its share), so a single weak word in common gives a low score and the thresholds
//! apply unchanged. The temperature was picked with `switchboard kb eval --lexical` on the
//! BANKING77 hold-out.

use std::cell::{Cell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cache::{CacheCounters, LfuCache};
use super::classifier::{
    BlendParams, IntentClassifier, PredictScratch, QuestionVectors, SoftmaxRegression,
};
use super::encoder::{self, join_parts, Encoder, EncoderError, Part};
use super::finetune::TopLayers;
use super::trained;
use super::worker::{
    InferenceHandle, InferenceWorker, ModelInfo, ModelLoader, WorkerOptions, WorkerSnapshot,
};
use crate::bot::IntentMatch;
use crate::config::{Config, VariantModel};
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
    #[error("cannot load the model: {0}")]
    Load(String),
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

    /// Checks that the model files exist (cheap; before a background load, so a wrong path
    /// is still an error at start).
    pub fn check_files(&self) -> Result<(), EncoderError> {
        let mut files = vec![
            ("model", &self.model),
            ("tokenizer", &self.tokenizer),
            ("ONNX Runtime library", &self.ort_library),
        ];
        if let Some(companion) = &self.companion {
            files.push(("companion model", &companion.model));
            files.push(("companion tokenizer", &companion.tokenizer));
        }
        for (what, path) in files {
            if !path.is_file() {
                return Err(EncoderError::MissingFile {
                    what,
                    path: path.clone(),
                });
            }
        }
        Ok(())
    }

    /// The loaders of the primary model and of the companion (if any), for
    /// [`InferenceWorker::start_loading`].
    pub fn loaders(&self) -> (ModelLoader, Option<ModelLoader>) {
        let loader = |model: PathBuf, tokenizer: PathBuf, prefix: String| -> ModelLoader {
            let (library, threads, length) = (
                self.ort_library.clone(),
                self.threads,
                self.max_sequence_length,
            );
            Box::new(move || {
                Encoder::load(&model, &tokenizer, &library, threads, length)
                    .map(|encoder| encoder.with_text_prefix(&prefix))
            })
        };
        let primary = loader(
            self.model.clone(),
            self.tokenizer.clone(),
            self.text_prefix.clone(),
        );
        let companion = self
            .companion
            .as_ref()
            .map(|c| loader(c.model.clone(), c.tokenizer.clone(), c.text_prefix.clone()));
        (primary, companion)
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
    /// `[inference] companion_below`: with a companion, a query whose best score from the
    /// primary model alone is below this is embedded by the companion too (1: every query).
    pub companion_below: f32,
    /// [`IntentEngine::open`] waits until the models are loaded (or failed) instead of
    /// returning while they load (the command line; a server answers lexically meanwhile).
    pub wait_for_models: bool,
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
            companion_below: config.inference.companion_below as f32,
            wait_for_models: false,
        }
    }
}

/// Which of the node's encoders a recognition uses: the cascade as `[inference]` configures it,
/// or a gray-release variant's `model` in its place ([`IntentEngine::recognise_with`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Cascade {
    /// The primary model, and the companion when the primary's best score is below
    /// `[inference] companion_below`.
    #[default]
    Configured,
    /// The primary model alone: the companion never runs (the cascade's first stage only).
    PrimaryOnly,
    /// Both models on every query (as `companion_below = 1`).
    Always,
}

impl Cascade {
    /// What a variant's `model` asks for (`None`: the node's cascade).
    pub fn of_variant(model: Option<VariantModel>) -> Cascade {
        match model {
            None => Cascade::Configured,
            Some(VariantModel::Primary) => Cascade::PrimaryOnly,
            Some(VariantModel::Companion) => Cascade::Always,
        }
    }

    /// Prefix of the hot-cache key of a query recognised this way: results computed with
    /// another setting never answer it. Each prefix holds one U+001F, at its end, so a key
    /// splits unambiguously at its first U+001F whatever the visitor's text holds.
    fn hot_key_prefix(self) -> &'static str {
        match self {
            Cascade::Configured => "configured\u{1f}",
            Cascade::PrimaryOnly => "primary\u{1f}",
            Cascade::Always => "companion\u{1f}",
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
    /// Recognitions the cascade sent to the companion model too.
    pub escalated: u64,
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
    /// The classifier's score before `min_similarity` (what the cascade looks at).
    raw_score: f32,
    score: f32,
    second_score: f32,
    similarity: Option<f32>,
}

/// One loaded knowledge-base version with its classifier.
struct LoadedKb {
    index: KbIndex,
    classifier: IntentClassifier,
    /// With joined vectors: the classifier of the cascade's first step (the primary model's
    /// head, when stored, blended with the vote over the primary part).
    primary_classifier: IntentClassifier,
    /// Whether `primary_classifier` has its head (knowledge bases imported before the cascade
    /// have none: every query then goes to both models).
    has_primary_head: bool,
    /// Entry index of every question row.
    labels: Vec<u32>,
    /// The top layers this version's questions were embedded with, when the import
    /// fine-tuned them: queries must be embedded with the same ones.
    tuned: Option<Arc<TopLayers>>,
    /// Their digest (computed once: it hashes the 14 MB of weights).
    tuned_digest: String,
    /// A model mismatch was logged for this version.
    warned: Cell<bool>,
}

/// How the stored vectors relate to the engine's models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fit {
    /// Embedded with the primary model alone.
    Primary,
    /// Embedded with the primary model's lower layers and this version's tuned top layers.
    Tuned,
    /// The primary and a companion's vectors joined; `companion` when that companion is the
    /// loaded one (else only the primary part can be used); `tuned` when the primary part was
    /// embedded with this version's tuned top layers.
    Joined {
        primary_dim: usize,
        companion: bool,
        tuned: bool,
    },
    /// Another model: lexical only.
    Other,
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
    fn load(reader: &ReplicaReader) -> Result<Option<LoadedKb>, KbError> {
        let Some(index) = KbIndex::load(reader)? else {
            return Ok(None);
        };
        let labels = row_labels((0..index.entry_count()).map(|entry| index.rows_of(entry).len()));
        let classes = index.entry_count();
        let (head_bytes, tuned) = match index.classifier().map(trained::decode) {
            None => (None, None),
            Some(Ok((heads, tuned))) => (Some(heads), tuned.map(Arc::new)),
            Some(Err(error)) => {
                tracing::warn!(version = index.version(), %error, "unusable trained record: answering lexically until the knowledge base is imported again");
                (None, None)
            }
        };
        let heads = head_bytes.and_then(|bytes| {
            match SoftmaxRegression::heads_from_bytes(bytes) {
                Ok((head, primary)) if head.classes() == classes && head.dim() == index.dim() => {
                    Some((head, primary))
                }
                Ok((head, _)) => {
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
        let (head, primary_head) = heads.map_or((None, None), |(h, p)| (Some(h), p));
        let has_primary_head = primary_head.is_some();
        let classifier = IntentClassifier::new(classes, head, BlendParams::default())
            .expect("a stored version has entries and the default blend is valid");
        let primary_classifier =
            IntentClassifier::new(classes, primary_head, BlendParams::default())
                .expect("a stored version has entries and the default blend is valid");
        Ok(Some(LoadedKb {
            index,
            classifier,
            primary_classifier,
            has_primary_head,
            labels,
            tuned_digest: tuned.as_ref().map(|t| t.digest()).unwrap_or_default(),
            tuned,
            warned: Cell::new(false),
        }))
    }

    /// How the stored vectors relate to the worker's loaded models (`primary` is loaded).
    fn fit(&self, primary: &ModelInfo, companion: Option<&ModelInfo>) -> Fit {
        let stored = self.index.model_fingerprint();
        let dim = self.index.dim();
        if let Some(tuned) = &self.tuned {
            let fits =
                trained::is_tuned_fingerprint(stored, &primary.fingerprint, &self.tuned_digest);
            if fits && primary.tunable && dim == tuned.hidden() {
                return Fit::Tuned;
            }
            // Tuned primary vectors joined with a companion's: `<primary> tuned:<digest> + …`.
            let rest =
                trained::after_tuned_fingerprint(stored, &primary.fingerprint, &self.tuned_digest)
                    .and_then(encoder::companion_of_joined);
            if let Some(rest) = rest
                .filter(|_| primary.tunable && primary.dim == tuned.hidden() && dim > primary.dim)
            {
                return self.joined(rest, primary, companion, dim, true);
            }
            if !self.warned.replace(true) {
                tracing::warn!(
                    version = self.version(),
                    stored,
                    loaded = %primary.fingerprint,
                    tunable = primary.tunable,
                    "the knowledge base was fine-tuned on another model, or the loaded model has no inner output (use model.split.onnx): answering lexically until it is imported again"
                );
            }
            return Fit::Other;
        }
        if stored == primary.fingerprint && dim == primary.dim {
            return Fit::Primary;
        }
        let rest = stored
            .strip_prefix(primary.fingerprint.as_str())
            .and_then(encoder::companion_of_joined);
        if let Some(rest) = rest.filter(|_| dim > primary.dim) {
            return self.joined(rest, primary, companion, dim, false);
        }
        if !self.warned.replace(true) {
            tracing::warn!(
                version = self.version(),
                stored,
                loaded = %primary.fingerprint,
                "the knowledge base was embedded with another model: answering lexically until it is imported again"
            );
        }
        Fit::Other
    }

    /// [`Fit::Joined`] for stored vectors `dim` wide whose companion part was embedded by the
    /// model `stored_companion` names; `companion` is the loaded one, if any.
    fn joined(
        &self,
        stored_companion: &str,
        primary: &ModelInfo,
        companion: Option<&ModelInfo>,
        dim: usize,
        tuned: bool,
    ) -> Fit {
        let loaded = companion;
        let companion =
            loaded.is_some_and(|c| c.fingerprint == stored_companion && primary.dim + c.dim == dim);
        if let Some(loaded) = loaded.filter(|_| !companion) {
            if !self.warned.replace(true) {
                tracing::warn!(
                    version = self.version(),
                    stored = stored_companion,
                    loaded = %loaded.fingerprint,
                    "the knowledge base was embedded with another companion model: the primary model answers alone until it is imported again"
                );
            }
        }
        Fit::Joined {
            primary_dim: primary.dim,
            companion,
            tuned,
        }
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
        self.classify_with(&self.classifier, vector, vector, min_similarity, scratch)
    }

    /// The cascade's first step: `primary` (the primary model's vector) against the primary
    /// part of joined rows, with the primary head.
    fn classify_primary(
        &self,
        primary: &[f32],
        min_similarity: f32,
        scratch: &mut PredictScratch,
    ) -> Option<Found> {
        let mut padded = vec![0.0f32; self.index.dim()];
        for (slot, x) in padded.iter_mut().zip(primary) {
            *slot = x * std::f32::consts::SQRT_2;
        }
        self.classify_with(
            &self.primary_classifier,
            &padded,
            primary,
            min_similarity,
            scratch,
        )
    }

    fn classify_with(
        &self,
        classifier: &IntentClassifier,
        vector: &[f32],
        head_vector: &[f32],
        min_similarity: f32,
        scratch: &mut PredictScratch,
    ) -> Option<Found> {
        let questions = QuestionVectors {
            dim: self.index.dim(),
            vectors: self.index.question_vectors(),
            labels: &self.labels,
        };
        match classifier.predict_split(vector, head_vector, questions, scratch) {
            Ok(found) => found.map(|m| {
                let p = m.prediction;
                let related = m.nearest.score >= min_similarity;
                Found {
                    entry: p.intent as usize,
                    raw_score: p.score,
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
            raw_score: 1.0 / total,
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
    kb: RefCell<Option<Rc<LoadedKb>>>,
    companion_below: f32,
    escalated: Cell<u64>,
    /// The companion was seen ready (the hot cache was emptied then: its answers came from the
    /// primary model alone).
    companion_seen: Cell<bool>,
    reload_interval: Duration,
    min_similarity: f32,
    next_poll: Cell<Instant>,
    hot: RefCell<LfuCache<HotAnswer>>,
    embeddings: RefCell<LfuCache<Rc<[f32]>>>,
    scratch: RefCell<PredictScratch>,
    degraded: Cell<u64>,
    reloads: Cell<u64>,
    /// The version [`maybe_reload`](Self::maybe_reload) is loading off the shard's thread.
    loading: RefCell<Option<BackgroundLoad>>,
}

/// A knowledge-base version being loaded on a `kb-load-N` thread.
struct BackgroundLoad {
    started: Instant,
    result: crossbeam::channel::Receiver<Result<Option<LoadedKb>, KbError>>,
}

/// How long [`IntentEngine::open`] took, by part.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct OpenTimings {
    /// Loading ONNX Runtime (first time in the process), the model(s) and the tokenizer(s):
    /// until they are ready with `wait_for_models`, else starting the worker.
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
        let worker = match &settings.model {
            Some(model_settings) => {
                model_settings.check_files()?;
                let (primary, companion) = model_settings.loaders();
                let worker = InferenceWorker::start_loading(
                    shard,
                    core,
                    primary,
                    companion,
                    settings.worker.clone(),
                )
                .map_err(EngineError::Spawn)?;
                if settings.wait_for_models {
                    worker.wait_loaded(Duration::MAX);
                    if let Some(error) = worker.load_error() {
                        return Err(EngineError::Load(error.to_owned()));
                    }
                }
                Some(worker)
            }
            None => None,
        };
        let model_time = started.elapsed();
        let kb_started = Instant::now();
        let reader =
            KbReplica::open_shared(&settings.storage_dir, shard, settings.kb_map_size)?.reader();
        let loaded = LoadedKb::load(&reader)?;
        let engine = IntentEngine {
            shard,
            reader,
            worker,
            companion_below: settings.companion_below,
            escalated: Cell::new(0),
            companion_seen: Cell::new(false),
            kb: RefCell::new(loaded.map(Rc::new)),
            reload_interval: settings.reload_interval,
            min_similarity: settings.min_similarity,
            next_poll: Cell::new(Instant::now() + settings.reload_interval),
            hot: RefCell::new(LfuCache::new(settings.hot_cache_entries)),
            embeddings: RefCell::new(LfuCache::new(settings.embedding_cache_entries)),
            scratch: RefCell::new(PredictScratch::default()),
            degraded: Cell::new(0),
            reloads: Cell::new(0),
            loading: RefCell::new(None),
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

    /// The loaded encoder's fingerprint (the primary model's, then ` + ` the companion's once
    /// it is loaded); `None` without a model or before the primary is loaded.
    pub fn model_fingerprint(&self) -> Option<String> {
        let worker = self.worker.as_ref()?;
        let primary = worker.primary()?;
        Some(match worker.companion() {
            Some(companion) => format!("{} + {}", primary.fingerprint, companion.fingerprint),
            None => primary.fingerprint.clone(),
        })
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
            escalated: self.escalated.get(),
            worker: self.worker.as_ref().map(InferenceHandle::stats),
        }
    }

    /// Looks for a new version at most once per `reload_interval` (cheap otherwise: one clock
    /// read), loads it on a `kb-load-N` thread, and swaps it in at the first call after the
    /// load finished. Returns whether a new version was swapped in by this call; a failed load
    /// is logged and the loaded version kept (the next poll tries again).
    pub fn maybe_reload(&self) -> bool {
        if self.loading.borrow().is_some() {
            return self.finish_background_load();
        }
        let now = Instant::now();
        if now < self.next_poll.get() {
            return false;
        }
        self.next_poll.set(now + self.reload_interval);
        match self.reader.current_version() {
            Ok(current) if current == self.version() => false,
            Ok(_) => self.start_background_load(),
            Err(error) => {
                tracing::warn!(shard = self.shard, %error, "cannot read the knowledge base's current version; keeping the loaded version");
                false
            }
        }
    }

    /// Starts loading the replica's current version on a thread; if no thread can be
    /// started, loads it here instead. Returns whether a version was swapped in.
    fn start_background_load(&self) -> bool {
        let (sender, result) = crossbeam::channel::bounded(1);
        let reader = self.reader.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("kb-load-{}", self.shard))
            .spawn(move || {
                // The receiver is gone only when the engine is: nothing to hand over then.
                let _ = sender.send(LoadedKb::load(&reader));
            });
        match spawned {
            Ok(_) => {
                *self.loading.borrow_mut() = Some(BackgroundLoad {
                    started: Instant::now(),
                    result,
                });
                false
            }
            Err(error) => {
                tracing::warn!(shard = self.shard, %error, "cannot start a knowledge-base load thread; loading on the shard");
                match self.reload() {
                    Ok(changed) => changed,
                    Err(error) => {
                        tracing::warn!(shard = self.shard, %error, "cannot reload the knowledge base; keeping the loaded version");
                        false
                    }
                }
            }
        }
    }

    /// Swaps in the version a `kb-load-N` thread loaded, once it is there.
    fn finish_background_load(&self) -> bool {
        let received = {
            let loading = self.loading.borrow();
            let Some(load) = loading.as_ref() else {
                return false;
            };
            match load.result.try_recv() {
                Ok(result) => Ok((result, load.started.elapsed())),
                Err(crossbeam::channel::TryRecvError::Empty) => return false,
                Err(crossbeam::channel::TryRecvError::Disconnected) => Err(()),
            }
        };
        *self.loading.borrow_mut() = None;
        match received {
            Ok((Ok(loaded), took)) => {
                // A synchronous `reload` (the admin API's try) may have loaded this version, or
                // a newer one, meanwhile: versions only grow, so never go back.
                if loaded.as_ref().map(LoadedKb::version) <= self.version() {
                    return false;
                }
                self.install(loaded, took);
                true
            }
            Ok((Err(error), _)) => {
                tracing::warn!(shard = self.shard, %error, "cannot reload the knowledge base; keeping the loaded version");
                false
            }
            Err(()) => {
                tracing::error!(
                    shard = self.shard,
                    "the knowledge-base load thread ended without a result; keeping the loaded version"
                );
                false
            }
        }
    }

    /// Loads the replica's current version now, on the calling thread, if it is not the
    /// loaded one (one short LMDB read when it is). Returns whether a new version was loaded.
    /// Loading BANKING77 takes tens of milliseconds; a running shard uses
    /// [`maybe_reload`](Self::maybe_reload), which loads off its thread.
    pub fn reload(&self) -> Result<bool, KbError> {
        let current = self.reader.current_version()?;
        if current == self.version() {
            return Ok(false);
        }
        let started = Instant::now();
        let loaded = LoadedKb::load(&self.reader)?;
        self.install(loaded, started.elapsed());
        Ok(true)
    }

    /// Makes `loaded` the version recognitions use (`took`: how long loading it took).
    fn install(&self, loaded: Option<LoadedKb>, took: Duration) {
        let version = loaded
            .as_ref()
            .map_or_else(|| "none".to_owned(), |kb| kb.version().to_string());
        *self.kb.borrow_mut() = loaded.map(Rc::new);
        self.hot.borrow_mut().clear();
        self.reloads.set(self.reloads.get() + 1);
        tracing::info!(
            shard = self.shard,
            %version,
            load_ms = took.as_secs_f64() * 1000.0,
            "knowledge base reloaded"
        );
    }

    /// The best entry for `text`, or `None` when no knowledge base has been imported or,
    /// degraded, no entry shares a word with the text. Never blocks the calling thread on
    /// inference; see the module documentation for the order of the caches.
    pub async fn recognise(&self, text: &str) -> Option<IntentResult> {
        self.recognise_with(text, Cascade::Configured).await
    }

    /// [`recognise`](Self::recognise) with `cascade` in place of the configured one (a
    /// gray-release variant's `model`). Its hot-cache entries are kept apart from the other
    /// settings' ([`Cascade::hot_key_prefix`]); the embedding cache is shared (a text's primary
    /// vector is the same whatever runs next).
    pub async fn recognise_with(&self, text: &str, cascade: Cascade) -> Option<IntentResult> {
        self.maybe_reload();
        let companion_ready = self.worker.as_ref().and_then(InferenceHandle::companion);
        if companion_ready.is_some() && !self.companion_seen.replace(true) {
            self.hot.borrow_mut().clear();
        }
        let kb = self.kb.borrow().clone()?;
        let text = collapse_whitespace(text);
        let hot_key = format!("{}{}", cascade.hot_key_prefix(), text.to_lowercase());
        let hot = self.hot.borrow_mut().get(&hot_key).copied();
        if let Some(hot) = hot.filter(|hot| hot.version == kb.version()) {
            return Some(kb.result(hot.found, false, CacheOutcome::HotHit));
        }
        let Some(worker) = self.worker.as_ref().filter(|worker| worker.is_running()) else {
            return self.lexical(&kb, &text);
        };
        // Before the primary model is loaded: lexical (degraded).
        let Some(primary) = worker.primary() else {
            return self.lexical(&kb, &text);
        };
        let fit = kb.fit(primary, worker.companion());
        if fit == Fit::Other {
            return self.lexical(&kb, &text);
        }
        let tuned = match fit {
            Fit::Tuned | Fit::Joined { tuned: true, .. } => kb.tuned.clone(),
            _ => None,
        };
        // Tuned vectors belong to their version (see the module documentation). As for the
        // hot keys, the prefix holds one U+001F, at its end: a visitor's text cannot make one
        // version's key out of another's.
        let cache_key = match &tuned {
            Some(_) => format!("{}\u{1f}{text}", kb.version()),
            None => format!("model\u{1f}{text}"),
        };
        let cached = self.embeddings.borrow_mut().get(&cache_key).cloned();
        let (vector, cache) = match cached {
            Some(vector) => (vector, CacheOutcome::EmbeddingHit),
            None => match match tuned {
                Some(layers) => worker.embed_tuned(&text, layers).await,
                None => worker.embed_part(&text, Part::Primary).await,
            } {
                Ok(vector) => {
                    let vector: Rc<[f32]> = vector.into();
                    self.embeddings
                        .borrow_mut()
                        .insert(&cache_key, vector.clone());
                    (vector, CacheOutcome::Miss)
                }
                Err(error) => {
                    tracing::debug!(shard = self.shard, %error, "degrading to the lexical match");
                    return self.lexical(&kb, &text);
                }
            },
        };
        let classified = match fit {
            Fit::Joined {
                primary_dim,
                companion,
                ..
            } if vector.len() == primary_dim => {
                let first = kb.classify_primary(
                    &vector,
                    self.min_similarity,
                    &mut self.scratch.borrow_mut(),
                );
                let escalate = companion
                    && match cascade {
                        Cascade::Configured => {
                            // 1 promises every query both models, even a certain one.
                            !kb.has_primary_head
                                || self.companion_below >= 1.0
                                || first.is_none_or(|found| found.raw_score < self.companion_below)
                        }
                        Cascade::PrimaryOnly => false,
                        Cascade::Always => true,
                    };
                if escalate {
                    self.escalated.set(self.escalated.get() + 1);
                    match worker.embed_part(&text, Part::Companion).await {
                        Ok(second) => {
                            let mut joined = Vec::with_capacity(vector.len() + second.len());
                            join_parts(&vector, vector.len(), &second, second.len(), &mut joined);
                            kb.classify(
                                &joined,
                                self.min_similarity,
                                &mut self.scratch.borrow_mut(),
                            )
                            .or(first)
                        }
                        Err(error) => {
                            tracing::debug!(shard = self.shard, %error, "the companion could not embed: the primary model answers alone");
                            first
                        }
                    }
                } else {
                    first
                }
            }
            Fit::Primary | Fit::Tuned => {
                kb.classify(&vector, self.min_similarity, &mut self.scratch.borrow_mut())
            }
            _ => None,
        };
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
