//! The intelligent engine's model side: the sentence encoder (ONNX Runtime + tokenizer), the
//! intent classifier trained at import time, the per-shard inference worker, the caches and
//! the per-shard [`IntentEngine`] that ties them to the knowledge base (`crate::kb`).
//!
//! - [`encoder`]: text → unit-length embedding (any ONNX sentence encoder with a HF
//!   `tokenizer.json`);
//! - [`classifier`]: softmax-regression head blended with a neighbour vote (scored with the
//!   knowledge base's kernel, `kb::row_scores`);
//! - [`worker`]: the encoder on a pinned thread, batching requests from its shard;
//! - [`cache`]: the LFU-DA cache behind the hot-query and embedding caches;
//! - [`intent`]: [`IntentEngine`], one per shard: caches → worker → classifier, lexical
//!   fallback when degraded, reload on a new knowledge-base version;
//! - [`update`]: `kb import`'s embed-once, train-once, apply-to-every-replica;
//! - [`finetune`]: the encoder's top layer trained on the knowledge base at import (Rust, CPU);
//! - [`trained`]: what an import trains (heads, tuned layer) as the one record a version stores;
//! - [`progress`]: the progress bar `kb import` shows while it embeds;
//! - [`eval`]: `kb eval`.
//!
//! # Measured
//! Release build, the shipped model, the 2-core AVX2 machine shared with other jobs (load
//! average 1.2-1.9); knowledge base `tests/data/banking77/kb.csv` (9,000 questions, 77
//! intents), queries `tests/data/banking77/holdout.csv` (1,003).
//!
//! | what | command | result |
//! | --- | --- | --- |
//! | accuracy (top-1, fallbacks count as wrong) | `switchboard kb eval --config C holdout.csv` | 92.62% (93.62% before the thresholds; 2.59% fallbacks) |
//! | latency, one query at a time, uncached, through the worker | same | p50 10.5 ms, p90 14.5 ms, p99 21.3 ms (2 ms of it was `batch_window`, which a lone query no longer waits out; with `batch_window = "0s"`: p50 8.3 ms, p99 19.0 ms) |
//! | Python onnxruntime, same model, encode only, same run | `scripts/py_baseline.py latency --queries 1003` | p50 7.4 ms, p99 17.8-18.2 ms |
//! | engine cold start (`IntentEngine::open`: runtime, model, tokenizer, fingerprint, worker, index) | `kb eval` prints it | 350-440 ms, of which the index 8 ms; first query 14-20 ms |
//! | worker throughput, one text at a time vs 16 submitted together | `cargo test --release --test inference -- --ignored --nocapture` | 102 vs 171 texts/s (1.68×) |
//! | `kb import` of kb.csv (2 intra-op threads) | `switchboard kb import --config C kb.csv` | 33 s: model 0.4 s, embedding 30.4 s, head 2.1 s, 2 replicas 0.14 s |
//! | with `[inference] companion_model` (multilingual-e5-small next to the `en` model), every query through both (`companion_below = 1`) | the same, see models/README.md | top-1 94.22% (93.62% without), answered right 92.22% (92.62%), p99 27-36 ms (11-13 ms), models loaded 1.9-4.3 s, import of 10,003 questions 96 s (31 s) |
//! | the cascade, `companion_below = 0.4` (shipped; 1.9% of the queries run the companion) | the same, `batch_window = "0s"` | top-1 93.92%, answered right 92.82%, p50 6.9 ms, p99 15.5 ms (`en` alone in the same run: 6.4 / 13.0 ms) |
//! | `[inference] fine_tune` (default): layer 5 tuned on the knowledge base at import, run in Rust per query | the same, `model.split.onnx`, interleaved with `model.onnx` (models/README.md, "Fine-tuning at import") | top-1 93.72% (93.62%), answered right 93.32% (92.62%), p50 / p99 8.2-8.6 / 19.8-20.5 ms (6.3-6.6 / 15.4-16.4 ms) with `batch_window = "0s"`, import 69 s (33 s) |
//! | `serve` to the first accepted WebSocket (models load in the background) / to the first model answer | `scripts/cold_start.py` | `en` 0.08 / 0.32 s, `en` + companion 0.03 / 1.44 s, `multilingual` 0.03 / 0.85 s (before: accept after loading, 0.28 / 1.27 / 0.79 s) |

pub mod cache;
pub mod classifier;
pub mod encoder;
pub mod eval;
pub mod finetune;
pub mod intent;
pub mod progress;
pub mod trained;
pub mod update;
pub mod worker;

pub use intent::{
    CacheOutcome, EngineError, EngineSettings, EngineStats, IntentEngine, IntentResult,
    ModelSettings, OpenTimings,
};
pub use worker::{
    EmbedError, InferenceHandle, InferenceWorker, WorkerMetrics, WorkerOptions, WorkerSnapshot,
};

/// Model files for tests: `models/fetch` provisions them (or point SWITCHBOARD_MODELS_DIR at a
/// directory holding libonnxruntime.so, model.onnx and tokenizer.json). Tests that need them
/// fail, rather than skip, when they are missing.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::{Path, PathBuf};

    use super::encoder::Encoder;

    pub fn models_dir() -> PathBuf {
        std::env::var_os("SWITCHBOARD_MODELS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models/cache"))
    }

    pub fn model_file(name: &str) -> PathBuf {
        let path = models_dir().join(name);
        assert!(
            path.is_file(),
            "{} is missing: run models/fetch (or set SWITCHBOARD_MODELS_DIR) before these tests",
            path.display()
        );
        path
    }

    /// The shipped encoder with one thread.
    pub fn load_encoder(max_sequence_length: usize) -> Encoder {
        Encoder::load(
            &model_file("model.onnx"),
            &model_file("tokenizer.json"),
            &model_file("libonnxruntime.so"),
            1,
            max_sequence_length,
        )
        .expect("load the encoder")
    }
}
