//! A knowledge-base update (`switchboard kb import`): embed the questions once, train the
//! classifier head once, then store the same snapshot in every shard's replica under one new
//! version number.
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

use std::path::Path;
use std::time::{Duration, Instant};

use super::classifier::{
    BlendParams, ClassifierError, IntentClassifier, QuestionVectors, SoftmaxRegression,
    TrainOptions, TrainReport,
};
use super::encoder::{Encoder, EncoderError};
use super::intent::row_labels;
use crate::kb::{self, Entry, KbError, KbReplica};

/// Questions per model call while embedding a knowledge base.
pub const IMPORT_BATCH: usize = 32;

/// Why an update failed (nothing was written unless the error says otherwise).
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("cannot embed the questions: {0}")]
    Encoder(#[from] EncoderError),
    #[error("cannot train the classifier head: {0}")]
    Classifier(#[from] ClassifierError),
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
}

impl PreparedUpdate {
    pub fn question_count(&self) -> usize {
        kb::question_count(&self.entries)
    }
}

/// Embeds every question of `entries` with `encoder` and trains the classifier head.
pub fn prepare(entries: Vec<Entry>, encoder: &mut Encoder) -> Result<PreparedUpdate, UpdateError> {
    prepare_with_progress(entries, encoder, &mut |_, _| {})
}

/// [`prepare`], calling `progress(embedded, total)` as the questions are embedded (after each
/// batch of [`IMPORT_BATCH`]), e.g. to draw [`ImportProgress`](super::progress::ImportProgress).
pub fn prepare_with_progress(
    entries: Vec<Entry>,
    encoder: &mut Encoder,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PreparedUpdate, UpdateError> {
    let started = Instant::now();
    let texts = kb::question_texts(&entries);
    let total = texts.len();
    let embeddings = encoder
        .encode_many_with_progress(&texts, IMPORT_BATCH, &mut |done| progress(done, total))?;
    let embed_time = started.elapsed();

    let started = Instant::now();
    let labels = row_labels(entries.iter().map(|entry| entry.questions.len()));
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
    let primary_head = match (encoder.companion(), encoder.primary_dim()) {
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
    let head = SoftmaxRegression::heads_to_bytes(full_head, primary_head.as_ref());
    Ok(PreparedUpdate {
        dim: embeddings.dim,
        vectors: embeddings.data,
        model_fingerprint: encoder.fingerprint().to_owned(),
        head,
        train_report,
        embed_time,
        train_time: started.elapsed(),
        entries,
    })
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
    let version = highest + 1;
    for (shard, replica) in replicas.iter_mut().enumerate() {
        replica
            .apply_snapshot(
                version,
                &update.entries,
                &update.vectors,
                update.dim,
                &update.model_fingerprint,
                Some(&update.head),
            )
            .map_err(|source| UpdateError::Apply {
                shard,
                version,
                written: shard,
                source,
            })?;
    }
    Ok(version)
}
