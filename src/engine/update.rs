//! A knowledge-base update (`switchboard kb import`): embed the questions once, train the
//! classifier head once, then store the same snapshot in every shard's replica under one new
//! version number.
//!
//! With `[inference] fine_tune` (and a model that exposes an inner output, and a knowledge base
//! of at least `fine_tune_min_questions` questions) the embedding is preceded by fine-tuning:
//! the frozen lower layers run once over every question (ONNX Runtime), the top layers train on
//! the questions' entries (`engine::finetune`), and the questions are embedded with the tuned
//! layers, which are stored with the version (`engine::trained`). With a companion model, only
//! the primary model is tuned: its tuned vectors are joined with the companion's (fingerprint
//! `<primary> tuned:<digest> + <companion>`), and the cascade's first step embeds queries with
//! the tuned layers.
//!
//! Invariants:
//! - Nothing is written before everything that can fail without touching a replica has
//!   succeeded: the input was parsed and checked (by `kb::import_file`), the questions
//!   embedded, the head trained, and every replica opened.
//! - The version is one more than the highest current version over the replicas, so it is
//!   new everywhere and every replica given version `v` holds the same content for it. Each
//!   replica switches atomically (one LMDB transaction); during the update some shards may
//!   already answer from the new version while others still use the old one, never a mix
//!   within one shard.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::classifier::{
    BlendParams, ClassifierError, IntentClassifier, QuestionVectors, SoftmaxRegression,
    TrainOptions, TrainReport,
};
use super::encoder::{join_parts, joined_fingerprint, Embeddings, Encoder, EncoderError};
use super::finetune::{self, FineTuneError, TopLayers, TuneOptions, TuneReport};
use super::intent::row_labels;
use super::trained;
use crate::config::Config;
use crate::kb::{self, Entry, KbError, KbReplica};

/// The layers fine-tuning trains: all-MiniLM-L6-v2's top one of six (BERT, 12 attention heads),
/// starting from the inner output `layer_norm_10` (layer 4's) that models/split_graph.py exposes.
/// Tuning the top two gained a little more in cross-validation on BANKING77 (+0.8 against +0.7
/// points top-1) but doubles the fp32 work every query does in Rust (models/README.md).
pub const TUNED_FIRST_LAYER: usize = 5;
pub const TUNED_LAYER_COUNT: usize = 1;
pub const TUNED_HEADS: usize = 12;

/// How an import fine-tunes the encoder (`[inference] fine_tune*`).
#[derive(Debug, Clone, PartialEq)]
pub struct FineTuneSettings {
    pub enabled: bool,
    pub weights: PathBuf,
    pub epochs: usize,
    pub min_questions: usize,
    /// Training threads.
    pub threads: usize,
}

impl FineTuneSettings {
    pub fn from_config(config: &Config, threads: usize) -> Self {
        let inference = &config.inference;
        FineTuneSettings {
            enabled: inference.fine_tune,
            weights: inference.fine_tune_weights.clone(),
            epochs: inference.fine_tune_epochs,
            min_questions: inference.fine_tune_min_questions,
            threads: threads.max(1),
        }
    }

    /// No fine-tuning.
    pub fn off() -> Self {
        FineTuneSettings {
            enabled: false,
            weights: PathBuf::new(),
            epochs: 1,
            min_questions: usize::MAX,
            threads: 1,
        }
    }

    /// Why an import of `questions` questions with `encoder` is not fine-tuned, or `None`
    /// when it is.
    pub fn skip_reason(&self, encoder: &Encoder, questions: usize) -> Option<String> {
        let split = format!("layer_norm_{}", 2 * TUNED_FIRST_LAYER);
        if !self.enabled {
            Some("[inference] fine_tune is false".into())
        } else if questions < self.min_questions {
            Some(format!(
                "the knowledge base has {questions} questions, fewer than [inference] fine_tune_min_questions = {}",
                self.min_questions
            ))
        } else if encoder.split_output() != Some(split.as_str()) {
            Some(format!(
                "the model has no `{split}` output to tune from (the default en model is models/cache/model.split.onnx, built by models/fetch)"
            ))
        } else {
            None
        }
    }
}

/// The stage an import is in, for its progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportStage {
    /// The frozen lower layers over every question (fine-tuning only); counts questions.
    LowerLayers,
    /// Training steps; counts steps.
    FineTuning,
    /// Embedding the questions; counts questions.
    Embedding,
}

/// What fine-tuning did in an import.
#[derive(Debug, Clone)]
pub enum FineTuneOutcome {
    Tuned {
        report: TuneReport,
        /// The frozen lower layers over every question.
        lower_layers_time: Duration,
    },
    /// Not tuned, and why.
    Skipped(String),
}
/// Questions per model call while embedding a knowledge base.
pub const IMPORT_BATCH: usize = 32;

/// Why an update failed (nothing was written unless the error says otherwise).
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("cannot embed the questions: {0}")]
    Encoder(#[from] EncoderError),
    #[error("cannot train the classifier head: {0}")]
    Classifier(#[from] ClassifierError),
    #[error("cannot fine-tune the encoder ([inference] fine_tune = false turns it off): {0}")]
    FineTune(#[from] FineTuneError),
    #[error("cannot open the knowledge-base replica of shard {shard}: {source}")]
    Open {
        shard: usize,
        #[source]
        source: KbError,
    },
    #[error(
        "cannot store version {version} in the replica of shard {shard}: {source}{}",
        partial_note(*written)
    )]
    Apply {
        shard: usize,
        version: u64,
        /// Replicas (shards `0..written`) that already hold the new version.
        written: usize,
        #[source]
        source: KbError,
    },
}

fn partial_note(written: usize) -> String {
    if written == 0 {
        " (nothing was written)".into()
    } else {
        format!(" (shards 0..{written} already hold it: run the import again)")
    }
}

/// Entries with their question vectors and trained head, ready to store.
pub struct PreparedUpdate {
    pub entries: Vec<Entry>,
    /// Row-major, one unit-length row per question in `kb::question_texts` order.
    pub vectors: Vec<f32>,
    pub dim: usize,
    pub model_fingerprint: String,
    /// The heads' byte form (`SoftmaxRegression::heads_to_bytes`: with a companion, the
    /// primary model's head follows the full one).
    pub head: Vec<u8>,
    pub train_report: TrainReport,
    pub embed_time: Duration,
    pub train_time: Duration,
    pub fine_tune: FineTuneOutcome,
}

impl PreparedUpdate {
    pub fn question_count(&self) -> usize {
        kb::question_count(&self.entries)
    }
}

/// Embeds every question of `entries` with `encoder` (fine-tuning it first as `fine_tune`
/// says) and trains the classifier head.
pub fn prepare(
    entries: Vec<Entry>,
    encoder: &mut Encoder,
    fine_tune: &FineTuneSettings,
) -> Result<PreparedUpdate, UpdateError> {
    prepare_with_progress(entries, encoder, fine_tune, &mut |_, _, _| {})
}

/// [`prepare`], calling `progress(stage, done, total)` as it goes (after each batch of
/// [`IMPORT_BATCH`] questions, each training step), e.g. to draw
/// [`ImportProgress`](super::progress::ImportProgress).
pub fn prepare_with_progress(
    entries: Vec<Entry>,
    encoder: &mut Encoder,
    fine_tune: &FineTuneSettings,
    progress: &mut dyn FnMut(ImportStage, usize, usize),
) -> Result<PreparedUpdate, UpdateError> {
    let started = Instant::now();
    let texts = kb::question_texts(&entries);
    let total = texts.len();
    let labels = row_labels(entries.iter().map(|entry| entry.questions.len()));
    let (embeddings, tuned, outcome) = match fine_tune.skip_reason(encoder, total) {
        Some(reason) => {
            let embeddings =
                encoder.encode_many_with_progress(&texts, IMPORT_BATCH, &mut |done| {
                    progress(ImportStage::Embedding, done, total)
                })?;
            (embeddings, None, FineTuneOutcome::Skipped(reason))
        }
        None => {
            let base = TopLayers::from_safetensors(
                &fine_tune.weights,
                TUNED_FIRST_LAYER,
                TUNED_LAYER_COUNT,
                TUNED_HEADS,
            )?;
            let states = encoder.inner_states_many(&texts, IMPORT_BATCH, &mut |done| {
                progress(ImportStage::LowerLayers, done, total)
            })?;
            let lower_layers_time = started.elapsed();
            let sequences: Vec<&[f32]> = states.iter().map(Vec::as_slice).collect();
            let classes: Vec<usize> = labels.iter().map(|&label| label as usize).collect();
            let options = TuneOptions {
                epochs: fine_tune.epochs,
                threads: fine_tune.threads,
                ..TuneOptions::default()
            };
            let (tuned, report) = finetune::fine_tune(
                base,
                &sequences,
                &classes,
                entries.len(),
                &options,
                &mut |done, steps| progress(ImportStage::FineTuning, done, steps),
            )?;
            progress(ImportStage::Embedding, 0, total);
            let primary = embed_tuned(&tuned, &states, fine_tune.threads);
            drop(states);
            let embeddings = match encoder.companion() {
                None => {
                    progress(ImportStage::Embedding, total, total);
                    primary
                }
                // The companion is not tuned: its vectors join the tuned primary ones.
                Some(_) => join_companion(encoder, &texts, primary, &mut |done| {
                    progress(ImportStage::Embedding, done, total)
                })?,
            };
            let outcome = FineTuneOutcome::Tuned {
                report,
                lower_layers_time,
            };
            (embeddings, Some(tuned), outcome)
        }
    };
    let embed_time = started.elapsed();

    let started = Instant::now();
    let questions = QuestionVectors {
        dim: embeddings.dim,
        vectors: &embeddings.data,
        labels: &labels,
    };
    let (classifier, train_report) = IntentClassifier::train(
        questions,
        entries.len(),
        &TrainOptions::default(),
        BlendParams::default(),
    )?;
    let full_head = classifier.head().expect("a trained classifier has a head");
    // With a companion, also the head over the primary model's part of the vectors (each part
    // is a unit vector scaled by 1/√2): the cascade's first step (`engine::intent`).
    // The tuned layers' width when tuned (a tuned import never runs the model's last output,
    // so the encoder may not know its width), the model's otherwise.
    let primary_dim = match &tuned {
        Some(tuned) => Some(tuned.hidden()),
        None => encoder.primary_dim(),
    };
    let primary_head = match (encoder.companion(), primary_dim) {
        (Some(_), Some(primary_dim)) if primary_dim < embeddings.dim => {
            let scale = std::f32::consts::SQRT_2;
            let primary: Vec<f32> = embeddings
                .data
                .chunks_exact(embeddings.dim)
                .flat_map(|row| row[..primary_dim].iter().map(move |x| x * scale))
                .collect();
            let (head, _) = SoftmaxRegression::train(
                &primary,
                primary_dim,
                &labels,
                entries.len(),
                &TrainOptions::default(),
            )?;
            Some(head)
        }
        _ => None,
    };
    let heads = SoftmaxRegression::heads_to_bytes(full_head, primary_head.as_ref());
    let model_fingerprint = match (&tuned, encoder.companion()) {
        (Some(tuned), None) => trained::tuned_fingerprint(encoder.fingerprint(), tuned),
        (Some(tuned), Some(companion)) => joined_fingerprint(
            &trained::tuned_fingerprint(encoder.primary_fingerprint(), tuned),
            companion.fingerprint(),
        ),
        (None, _) => encoder.fingerprint().to_owned(),
    };
    Ok(PreparedUpdate {
        dim: embeddings.dim,
        vectors: embeddings.data,
        model_fingerprint,
        head: trained::encode(&heads, tuned.as_ref()),
        train_report,
        embed_time,
        train_time: started.elapsed(),
        fine_tune: outcome,
        entries,
    })
}

/// `primary` (one row per text, the tuned primary model's unit vectors) joined with the
/// companion's vectors of `texts` ([`join_parts`], as `Encoder::encode_batch_into` joins
/// them); `progress` gets the number of texts the companion has embedded.
fn join_companion(
    encoder: &mut Encoder,
    texts: &[&str],
    primary: Embeddings,
    progress: &mut dyn FnMut(usize),
) -> Result<Embeddings, EncoderError> {
    let companion = encoder
        .companion_mut()
        .ok_or_else(|| EncoderError::InvalidSetting("no companion model is loaded".into()))?;
    let second = companion.encode_many_with_progress(texts, IMPORT_BATCH, progress)?;
    let mut data = Vec::new();
    join_parts(
        &primary.data,
        primary.dim,
        &second.data,
        second.dim,
        &mut data,
    );
    Ok(Embeddings {
        dim: primary.dim + second.dim,
        data,
    })
}

/// Every question's vector with the tuned layers, from its inner states, on `threads` threads.
pub fn embed_tuned(tuned: &TopLayers, states: &[Vec<f32>], threads: usize) -> Embeddings {
    let dim = tuned.hidden();
    let mut data = vec![0.0f32; states.len() * dim];
    let per_thread = states.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|scope| {
        for (rows, out) in states
            .chunks(per_thread)
            .zip(data.chunks_mut(per_thread * dim))
        {
            scope.spawn(move || {
                let mut scratch = finetune::Scratch::default();
                for (sequence, vector) in rows.iter().zip(out.chunks_exact_mut(dim)) {
                    tuned.embed_sequence(sequence, sequence.len() / dim, &mut scratch, vector);
                }
            });
        }
    });
    Embeddings { dim, data }
}

/// Stores `update` in the replicas of shards `0..shards` under `dir` as one new version and
/// returns that version. Replicas this process already has open (a serving shard's engine)
/// are written through the same environment ([`KbReplica::open_shared`]).
pub fn apply(
    dir: &Path,
    shards: usize,
    map_size: usize,
    update: &PreparedUpdate,
) -> Result<u64, UpdateError> {
    store_in_every_replica(dir, shards, map_size, 1, |replica, version| {
        replica.apply_snapshot(
            version,
            &update.entries,
            &update.vectors,
            update.dim,
            &update.model_fingerprint,
            Some(&update.head),
        )
    })
}

/// Stores a version received from a primary by delta sync (`switchboard kb sync`) in the
/// replicas of shards `0..shards`, exactly as [`apply`] stores an import (vectors already of
/// unit length are kept bit for bit). Its number is the primary's `primary_version` when that
/// is newer than every local replica's, else one more than the newest local one.
pub fn apply_synced(
    dir: &Path,
    shards: usize,
    map_size: usize,
    content: &kb::SnapshotContent,
    primary_version: u64,
) -> Result<u64, UpdateError> {
    store_in_every_replica(
        dir,
        shards,
        map_size,
        primary_version,
        |replica, version| {
            replica.apply_snapshot(
                version,
                &content.entries,
                &content.vectors,
                content.dim,
                &content.model_fingerprint,
                content.classifier.as_deref(),
            )
        },
    )
}

/// Opens every shard's replica, picks the version (one more than the highest current one, at
/// least `at_least`) and has `write` store it in each, shard by shard.
fn store_in_every_replica(
    dir: &Path,
    shards: usize,
    map_size: usize,
    at_least: u64,
    mut write: impl FnMut(&mut KbReplica, u64) -> Result<(), KbError>,
) -> Result<u64, UpdateError> {
    let mut replicas = Vec::with_capacity(shards);
    let mut highest = 0u64;
    for shard in 0..shards {
        let replica = KbReplica::open_shared(dir, shard, map_size)
            .map_err(|source| UpdateError::Open { shard, source })?;
        let current = replica
            .current_version()
            .map_err(|source| UpdateError::Open { shard, source })?;
        highest = highest.max(current.unwrap_or(0));
        replicas.push(replica);
    }
    let version = (highest + 1).max(at_least);
    for (shard, replica) in replicas.iter_mut().enumerate() {
        write(replica, version).map_err(|source| UpdateError::Apply {
            shard,
            version,
            written: shard,
            source,
        })?;
    }
    Ok(version)
}
