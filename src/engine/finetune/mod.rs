//! Fine-tuning the sentence encoder's top transformer layers on a knowledge base's labelled
//! questions, at import time, in pure Rust on the CPU.
//!
//! The encoder (all-MiniLM-L6-v2: BERT, hidden 384, 12 heads, intermediate 1536, post-LayerNorm,
//! exact erf GELU, LayerNorm eps 1e-12) is split in two: the lower layers stay frozen and run in
//! ONNX Runtime elsewhere; this module gets, per question, the output states of the last frozen
//! layer (`[tokens, 384]` row-major, unpadded, [CLS] and [SEP] included) and trains the top
//! layers ([`TopLayers`], any consecutive ones of the fp32 `model.safetensors`; the product
//! tunes layer 5 alone, see `engine::update`, and the tests and figures below use layers 4-5).
//! It reproduces `scripts/finetune_experiment.py`:
//!
//! - sentence vector: the last layer's output averaged over the tokens, divided by its L2 norm;
//! - loss: one proxy per class (started at the sum of the class's untuned sentence vectors),
//!   logits `scale · e · P_c/‖P_c‖` (scale 20), mean cross-entropy over the batch;
//! - Adam (β 0.9/0.999, eps 1e-8, bias correction) with decoupled weight decay
//!   `p ← p − rate·(m̂/(√v̂ + eps) + 0.01·p)`, rate 5e-5 for every layer parameter, 1e-3 for the
//!   proxies;
//! - batches of 32 questions of similar length (all questions sorted by token count, stable, cut
//!   into consecutive chunks), the chunk order shuffled each epoch with a seeded splitmix64.
//!
//! Invariants:
//! - every dense product goes through `matrixmultiply::sgemm` ([`math::gemm`] checks the bounds
//!   of its strided views before the one `unsafe` call); the per-token layers run on all the
//!   tokens of a thread's share of a batch at once, attention per sequence and head;
//! - each batch is split into `threads` fixed contiguous shares; each thread computes its
//!   gradients into its own buffers, which are then summed in thread order, so a run is
//!   bit-for-bit deterministic for a given seed and thread count (not across thread counts);
//! - the buffers (activations kept for backward, gradients) live across batches and only grow;
//! - a class without any question keeps a zero proxy (logit 0) and is never updated;
//! - [`TopLayers::from_bytes`] turns every malformed input into a [`FineTuneError`].
//!
//! # Measured
//! 2-core AVX2/AVX-512 machine shared with another compilation (load average 1-5), this crate
//! at opt-level 3 without debug assertions, its dependencies at the workspace's opt-level 2:
//! `CARGO_PROFILE_TEST_OPT_LEVEL=3 CARGO_PROFILE_TEST_DEBUG_ASSERTIONS=false
//! CARGO_PROFILE_TEST_OVERFLOW_CHECKS=false CARGO_PROFILE_TEST_DEBUG=0 cargo test --lib
//! engine::finetune::tests::measure -- --ignored --nocapture` (real weights of layers 4-5,
//! synthetic states, 9,000 questions of 8-40 tokens, 141,133 tokens in all).
//!
//! | what | result |
//! | --- | --- |
//! | `fine_tune`, 1 epoch, 2 threads | 34 s: 9 s for the untuned pass that starts the proxies, 25-26 s for the epoch's 282 steps (22-23 s with the earlier `[out, in]` weights) |
//! | `embed_sequence`, one thread, 1 / 16 / 64 tokens | 2.6-4.1 / 2.9-3.4 / 8.4-8.8 ms |
//! | untuned fp32 layers 4-5 vs the shipped model's vectors (6 questions of tests/data/finetune) | lowest cosine 0.99977 |
//! | the experiment's real layer-3 states of kb.csv (9,000 questions, 146,087 tokens), defaults (2 epochs, 2 threads), test `real_knowledge_base_trains_like_the_experiment` | epoch losses 0.4488, 0.3223 (JAX: 0.4487, 0.3227); 62 s in all: 9 s proxy pass, 26 + 27 s for the epochs |
//!
//! The two layers hold 3.5 M weights, i.e. 7.1 MFLOP per token, so 16 tokens cost 113 MFLOP:
//! more than 1 ms even at this core's peak. Profile of `embed_sequence` (`perf record`): 53% in
//! `matrixmultiply`'s AVX-512 kernel (about 70 GFLOP/s at 16 tokens; it computes whole 16-row
//! tiles, so 1 token costs as much as 16), 22% packing the weight matrices (done on every call;
//! storing the weights `[in, out]` instead of PyTorch's `[out, in]` cut 16 tokens from 3.7-4.1
//! to 2.9-3.4 ms), 9% softmax/LayerNorm/GELU loops, 7% `erff`.
//!
//! So a query (up to `math::STREAMED_MAX_TOKENS` = 24 tokens) no longer packs the weights: its
//! dense products use `math`'s streamed AVX2 kernel, which reads each 16-column slab of a weight
//! matrix once and keeps it in cache for all the query's rows. Training keeps `matrixmultiply`
//! (its shares hold hundreds of tokens), so a run's weights are unchanged. The four dense
//! products of layer 5, this 2-core AVX2 machine (`cargo test --release --lib
//! engine::finetune::tests::measure_kernels -- --ignored --nocapture`), packed → streamed:
//! 4 tokens 1.37 → 0.39 ms, 12 tokens 1.36 → 0.81 ms, 16 tokens 1.11 → 0.94 ms, 24 tokens
//! 1.89 → 1.69 ms. At 48 tokens packing won (2.8-3.2 against 4.2-5.2 ms with an earlier
//! 4-row version of the kernel), hence the 24-token limit.

mod layers;
mod math;
#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

pub use layers::{Scratch, TopLayers, FORMAT_VERSION, MAGIC};
use math::{BackwardBuffers, LayerActivations, Seq};

/// Everything that can go wrong loading, parsing or training the top layers.
#[derive(Debug, thiserror::Error)]
pub enum FineTuneError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a readable safetensors file: {message}")]
    Safetensors {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("{path} has no tensor {key}")]
    MissingTensor {
        path: std::path::PathBuf,
        key: String,
    },
    #[error("tensor {key} of {path}: {message}")]
    BadTensor {
        path: std::path::PathBuf,
        key: String,
        message: String,
    },
    #[error("invalid layer configuration: {0}")]
    InvalidConfig(String),
    #[error("not serialised top layers: wrong magic")]
    BadMagic,
    #[error("serialised top layers of format version {0}, this build reads {FORMAT_VERSION}")]
    UnsupportedVersion(u32),
    #[error("serialised top layers: {actual} bytes where the header announces {expected}")]
    Truncated { expected: usize, actual: usize },
    #[error("no questions to train on")]
    EmptyInput,
    #[error("{sequences} sequences but {labels} labels")]
    LengthMismatch { sequences: usize, labels: usize },
    #[error(
        "question {index}: {len} values is not a positive multiple of the hidden size {hidden}"
    )]
    BadSequence {
        index: usize,
        len: usize,
        hidden: usize,
    },
    #[error("question {index}: label {label} is not below the number of classes {classes}")]
    LabelOutOfRange {
        index: usize,
        label: usize,
        classes: usize,
    },
    #[error("invalid fine-tuning option: {0}")]
    InvalidOptions(String),
    #[error("training diverged: the loss is not finite at step {step}")]
    Diverged { step: usize },
}

/// Hyper-parameters of [`fine_tune`]; the defaults are the experiment's.
#[derive(Clone, Debug, PartialEq)]
pub struct TuneOptions {
    pub epochs: usize,
    /// Adam rate of every layer parameter.
    pub learning_rate: f32,
    /// Adam rate of the class proxies.
    pub proxy_learning_rate: f32,
    /// Decoupled weight decay (multiplied by the rate), on every parameter.
    pub weight_decay: f32,
    pub batch_size: usize,
    /// Logit scale (inverse temperature) of the normalised softmax.
    pub scale: f32,
    /// Threads sharing each batch (data parallel).
    pub threads: usize,
    /// Seed of the batch-order shuffle (and of the input dropout's masks).
    pub seed: u64,
    /// Share of the input states' values zeroed (the rest scaled by `1/(1 − p)`) at each
    /// training step, a fresh mask per step and question; 0 turns it off.
    pub input_dropout: f32,
}

impl Default for TuneOptions {
    fn default() -> Self {
        TuneOptions {
            epochs: 2,
            learning_rate: 5e-5,
            proxy_learning_rate: 1e-3,
            weight_decay: 0.01,
            batch_size: 32,
            scale: 20.0,
            threads: 2,
            seed: 7,
            input_dropout: 0.0,
        }
    }
}

/// What [`fine_tune`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct TuneReport {
    pub epochs: usize,
    /// Optimiser steps (batches over all epochs).
    pub steps: usize,
    /// Mean of the batch losses of the first and last epoch.
    pub first_epoch_loss: f32,
    pub last_epoch_loss: f32,
    pub elapsed: Duration,
    /// The trained class proxies, `[classes, hidden]` row-major, not normalised (a class
    /// without questions keeps a zero row).
    pub proxies: Vec<f32>,
}

/// Trains `layers` on the questions' input states `sequences` (each `[tokens, hidden]`,
/// unpadded) labelled `labels` (each below `classes`) and returns the tuned layers.
/// `progress(steps_done, total_steps)` is called after each optimiser step.
pub fn fine_tune(
    layers: TopLayers,
    sequences: &[&[f32]],
    labels: &[usize],
    classes: usize,
    options: &TuneOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(TopLayers, TuneReport), FineTuneError> {
    let started = Instant::now();
    validate(&layers, sequences, labels, classes, options)?;
    let mut layers = layers;
    let h = layers.hidden();

    // Batches: stable sort by token count, consecutive chunks.
    let mut order: Vec<usize> = (0..sequences.len()).collect();
    order.sort_by_key(|&i| sequences[i].len());
    let batches: Vec<&[usize]> = order.chunks(options.batch_size).collect();

    let mut workers: Vec<Worker> = (0..options.threads).map(|_| Worker::default()).collect();

    // Proxies: the sum of each class's untuned sentence vectors.
    let vectors = embed_all(&layers, sequences, &batches, &mut workers);
    let mut proxies = vec![0.0f32; classes * h];
    for (i, &label) in labels.iter().enumerate() {
        for (p, v) in proxies[label * h..(label + 1) * h]
            .iter_mut()
            .zip(&vectors[i * h..(i + 1) * h])
        {
            *p += v;
        }
    }
    drop(vectors);

    let mut layer_adam = Adam::new(layers.params.len());
    let mut proxy_adam = Adam::new(proxies.len());
    let mut unit_proxies = vec![0.0f32; proxies.len()];
    let mut proxy_norms = vec![0.0f32; classes];
    let mut rng = SplitMix64(options.seed);
    let mut chunk_order: Vec<usize> = (0..batches.len()).collect();
    let total_steps = options.epochs * batches.len();
    let mut step = 0;
    let mut epoch_losses = Vec::with_capacity(options.epochs);
    for _ in 0..options.epochs {
        for i in (1..chunk_order.len()).rev() {
            let j = (rng.next() % (i as u64 + 1)) as usize;
            chunk_order.swap(i, j);
        }
        let mut epoch_loss = 0.0f64;
        for &chunk in &chunk_order {
            let batch = batches[chunk];
            normalise_proxies(&proxies, h, &mut unit_proxies, &mut proxy_norms);
            let context = StepContext {
                layers: &layers,
                unit_proxies: &unit_proxies,
                classes,
                scale: options.scale,
                batch_len: batch.len(),
                sequences,
                labels,
                dropout: options.input_dropout,
                step_seed: options.seed ^ ((step as u64 + 1) << 20),
            };
            let loss = batch_gradients(&mut workers, &context, batch, &proxy_norms);
            step += 1;
            if !loss.is_finite() {
                return Err(FineTuneError::Diverged { step });
            }
            epoch_loss += loss;
            let total = &workers[0];
            layer_adam.update(
                &mut layers.params,
                &total.grads,
                options.learning_rate,
                options.weight_decay,
            );
            proxy_adam.update(
                &mut proxies,
                &total.proxy_grads,
                options.proxy_learning_rate,
                options.weight_decay,
            );
            progress(step, total_steps);
        }
        epoch_losses.push((epoch_loss / batches.len() as f64) as f32);
    }
    let report = TuneReport {
        epochs: options.epochs,
        steps: step,
        first_epoch_loss: epoch_losses[0],
        last_epoch_loss: epoch_losses[epoch_losses.len() - 1],
        elapsed: started.elapsed(),
        proxies,
    };
    Ok((layers, report))
}

/// `unit[c] = proxies[c] / ‖proxies[c]‖` (zero for a zero proxy), `norms[c] = ‖proxies[c]‖`.
fn normalise_proxies(proxies: &[f32], h: usize, unit: &mut [f32], norms: &mut [f32]) {
    for ((unit, norm), proxy) in unit
        .chunks_exact_mut(h)
        .zip(norms.iter_mut())
        .zip(proxies.chunks_exact(h))
    {
        *norm = proxy.iter().map(|v| v * v).sum::<f32>().sqrt();
        let k = if *norm > 0.0 { 1.0 / *norm } else { 0.0 };
        for (u, p) in unit.iter_mut().zip(proxy) {
            *u = p * k;
        }
    }
}

/// The batch's mean loss; its gradients are left in `workers[0]` (`grads` for the layers,
/// `proxy_grads` for the raw proxies). The batch is cut into `workers.len()` contiguous shares
/// (fewer if it is smaller), one per thread, summed in thread order.
fn batch_gradients(
    workers: &mut [Worker],
    cx: &StepContext,
    batch: &[usize],
    proxy_norms: &[f32],
) -> f64 {
    let used = workers.len().min(batch.len());
    if used == 1 {
        workers[0].step(cx, batch);
    } else {
        std::thread::scope(|scope| {
            for (k, worker) in workers[..used].iter_mut().enumerate() {
                let share = &batch[k * batch.len() / used..(k + 1) * batch.len() / used];
                scope.spawn(move || worker.step(cx, share));
            }
        });
    }
    let (first, rest) = workers.split_at_mut(1);
    let total = &mut first[0];
    let mut loss = total.loss;
    for other in &rest[..used - 1] {
        loss += other.loss;
        for (a, b) in total.grads.iter_mut().zip(&other.grads) {
            *a += b;
        }
        for (a, b) in total.proxy_grads.iter_mut().zip(&other.proxy_grads) {
            *a += b;
        }
    }
    // d/dP of P/‖P‖: (g − u(u·g))/‖P‖; a zero proxy gets no gradient.
    let h = cx.layers.hidden();
    for ((g, unit), &norm) in total
        .proxy_grads
        .chunks_exact_mut(h)
        .zip(cx.unit_proxies.chunks_exact(h))
        .zip(proxy_norms)
    {
        if norm > 0.0 {
            let dot: f32 = g.iter().zip(unit).map(|(a, b)| a * b).sum();
            for (gv, u) in g.iter_mut().zip(unit) {
                *gv = (*gv - u * dot) / norm;
            }
        } else {
            g.fill(0.0);
        }
    }
    loss / batch.len() as f64
}

fn validate(
    layers: &TopLayers,
    sequences: &[&[f32]],
    labels: &[usize],
    classes: usize,
    options: &TuneOptions,
) -> Result<(), FineTuneError> {
    if sequences.is_empty() {
        return Err(FineTuneError::EmptyInput);
    }
    if sequences.len() != labels.len() {
        return Err(FineTuneError::LengthMismatch {
            sequences: sequences.len(),
            labels: labels.len(),
        });
    }
    let hidden = layers.hidden();
    for (index, s) in sequences.iter().enumerate() {
        if s.is_empty() || !s.len().is_multiple_of(hidden) {
            return Err(FineTuneError::BadSequence {
                index,
                len: s.len(),
                hidden,
            });
        }
    }
    for (index, &label) in labels.iter().enumerate() {
        if label >= classes {
            return Err(FineTuneError::LabelOutOfRange {
                index,
                label,
                classes,
            });
        }
    }
    let bad = |what: &str| Err(FineTuneError::InvalidOptions(what.into()));
    if options.threads == 0 {
        return bad("threads must be at least 1");
    }
    if options.batch_size == 0 {
        return bad("batch_size must be at least 1");
    }
    if options.epochs == 0 {
        return bad("epochs must be at least 1");
    }
    for (name, v) in [
        ("learning_rate", options.learning_rate),
        ("proxy_learning_rate", options.proxy_learning_rate),
        ("weight_decay", options.weight_decay),
        ("scale", options.scale),
    ] {
        if !v.is_finite() || v < 0.0 {
            return bad(&format!("{name} must be finite and not negative"));
        }
    }
    if !(0.0..1.0).contains(&options.input_dropout) {
        return bad("input_dropout must be in [0, 1)");
    }
    Ok(())
}

/// The unit sentence vectors (`[n, hidden]`) of every question with the current layers,
/// the batches shared round-robin among the workers.
fn embed_all(
    layers: &TopLayers,
    sequences: &[&[f32]],
    batches: &[&[usize]],
    workers: &mut [Worker],
) -> Vec<f32> {
    let h = layers.hidden();
    let threads = workers.len();
    let mut parts: Vec<Vec<(usize, Vec<f32>)>> = Vec::new();
    std::thread::scope(|scope| {
        let handles: Vec<_> = workers
            .iter_mut()
            .enumerate()
            .map(|(k, worker)| {
                scope.spawn(move || {
                    let mut out = Vec::new();
                    for batch in batches.iter().skip(k).step_by(threads) {
                        worker.forward(layers, sequences, batch, None);
                        for (s, &i) in batch.iter().enumerate() {
                            out.push((i, worker.vectors[s * h..(s + 1) * h].to_vec()));
                        }
                    }
                    out
                })
            })
            .collect();
        for handle in handles {
            match handle.join() {
                Ok(part) => parts.push(part),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
    });
    let mut vectors = vec![0.0f32; sequences.len() * h];
    for (i, v) in parts.into_iter().flatten() {
        vectors[i * h..(i + 1) * h].copy_from_slice(&v);
    }
    vectors
}

/// What a worker needs to compute its share's loss and gradients (read-only, shared).
struct StepContext<'a> {
    layers: &'a TopLayers,
    unit_proxies: &'a [f32],
    classes: usize,
    scale: f32,
    /// Questions in the whole batch (the loss is a mean over it).
    batch_len: usize,
    sequences: &'a [&'a [f32]],
    labels: &'a [usize],
    /// Input dropout rate, and the seed its masks are drawn from this step.
    dropout: f32,
    step_seed: u64,
}

/// One thread's buffers: activations of its share of a batch, its gradients.
#[derive(Default)]
struct Worker {
    seqs: Vec<Seq>,
    tokens: usize,
    activations: Vec<LayerActivations>,
    backward: BackwardBuffers,
    /// Unit sentence vectors `[share, hidden]` and the norms of the means they came from.
    vectors: Vec<f32>,
    norms: Vec<f32>,
    logits: Vec<f32>,
    d_vectors: Vec<f32>,
    d_state: Vec<f32>,
    d_state_next: Vec<f32>,
    /// Sum over the share of the loss (not yet divided by the batch size).
    loss: f64,
    grads: Vec<f32>,
    /// Gradient with respect to the unit proxies `[classes, hidden]`.
    proxy_grads: Vec<f32>,
}

impl Worker {
    /// Runs the layers on the questions `members` and leaves their unit vectors in `vectors`.
    /// With `dropout = Some((p, seed))` each question's input values are zeroed with
    /// probability `p` (the rest scaled by `1/(1 − p)`), from a mask seeded by `seed` and the
    /// question's index, so a run stays deterministic whatever the thread split.
    fn forward(
        &mut self,
        layers: &TopLayers,
        sequences: &[&[f32]],
        members: &[usize],
        dropout: Option<(f32, u64)>,
    ) {
        let h = layers.hidden();
        self.seqs.clear();
        let mut tokens = 0;
        for &i in members {
            let n = sequences[i].len() / h;
            self.seqs.push(Seq {
                start: tokens,
                tokens: n,
            });
            tokens += n;
        }
        self.tokens = tokens;
        if self.activations.len() < layers.count {
            self.activations
                .resize_with(layers.count, LayerActivations::default);
        }
        let input = math::sized(&mut self.activations[0].input, tokens * h);
        for (seq, &i) in self.seqs.iter().zip(members) {
            let rows = &mut input[seq.start * h..(seq.start + seq.tokens) * h];
            rows.copy_from_slice(sequences[i]);
            if let Some((p, seed)) = dropout.filter(|&(p, _)| p > 0.0) {
                let keep = 1.0 / (1.0 - p);
                let threshold = (f64::from(p) * u64::MAX as f64) as u64;
                let mut rng = SplitMix64(seed ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
                for v in rows.iter_mut() {
                    *v = if rng.next() < threshold {
                        0.0
                    } else {
                        *v * keep
                    };
                }
            }
        }
        for l in 0..layers.count {
            if l > 0 {
                let (before, after) = self.activations.split_at_mut(l);
                math::sized(&mut after[0].input, tokens * h)
                    .copy_from_slice(&before[l - 1].output[..tokens * h]);
            }
            let p = math::split(layers.layer(l), layers.layout);
            math::forward_layer(
                &p,
                layers.layout,
                layers.heads,
                &self.seqs,
                tokens,
                &mut self.activations[l],
                math::Kernel::Packed,
            );
        }
        let last = &self.activations[layers.count - 1].output;
        let vectors = math::sized(&mut self.vectors, members.len() * h);
        self.norms.resize(members.len(), 0.0);
        for ((seq, v), norm) in self
            .seqs
            .iter()
            .zip(vectors.chunks_exact_mut(h))
            .zip(self.norms.iter_mut())
        {
            *norm = layers::mean_unit(
                &last[seq.start * h..(seq.start + seq.tokens) * h],
                seq.tokens,
                v,
            );
        }
    }

    /// Loss (summed over `members`) and gradients (of the batch-mean loss) of the share.
    fn step(&mut self, cx: &StepContext, members: &[usize]) {
        let layers = cx.layers;
        let (h, c, s) = (layers.hidden(), cx.classes, members.len());
        self.forward(
            layers,
            cx.sequences,
            members,
            Some((cx.dropout, cx.step_seed)),
        );
        let t = self.tokens;
        let vectors = &self.vectors[..s * h];

        // Normalised softmax over the classes.
        let logits = math::sized(&mut self.logits, s * c);
        math::gemm(
            s,
            h,
            c,
            cx.scale,
            vectors,
            (h, 1),
            cx.unit_proxies,
            (1, h),
            0.0,
            logits,
            c,
        );
        let mut loss = 0.0f64;
        let inv_batch = 1.0 / cx.batch_len as f32;
        for (row, &i) in logits.chunks_exact_mut(c).zip(members) {
            let label = cx.labels[i];
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let sum: f32 = row.iter().map(|z| (z - max).exp()).sum();
            let log_sum = max + sum.ln();
            loss += f64::from(log_sum - row[label]);
            for z in row.iter_mut() {
                *z = (*z - log_sum).exp() * inv_batch;
            }
            row[label] -= inv_batch;
        }
        self.loss = loss;
        let d_logits = &self.logits[..s * c];
        let proxy_grads = math::sized(&mut self.proxy_grads, c * h);
        math::gemm(
            c,
            s,
            h,
            cx.scale,
            d_logits,
            (1, c),
            vectors,
            (h, 1),
            0.0,
            proxy_grads,
            h,
        );
        let d_vectors = math::sized(&mut self.d_vectors, s * h);
        math::gemm(
            s,
            c,
            h,
            cx.scale,
            d_logits,
            (c, 1),
            cx.unit_proxies,
            (h, 1),
            0.0,
            d_vectors,
            h,
        );

        // Through the normalisation and the mean: d token = (de − e(e·de)) / (‖u‖ · n).
        let d_state = math::sized(&mut self.d_state, t * h);
        for (((seq, e), de), &norm) in self
            .seqs
            .iter()
            .zip(vectors.chunks_exact(h))
            .zip(d_vectors.chunks_exact(h))
            .zip(&self.norms)
        {
            let dot: f32 = e.iter().zip(de).map(|(a, b)| a * b).sum();
            let k = 1.0 / (norm * seq.tokens as f32);
            let rows = &mut d_state[seq.start * h..(seq.start + seq.tokens) * h];
            for row in rows.chunks_exact_mut(h) {
                for ((r, ev), dv) in row.iter_mut().zip(e).zip(de) {
                    *r = (dv - ev * dot) * k;
                }
            }
        }

        let len = layers.layout.len();
        let grads = math::sized(&mut self.grads, layers.params.len());
        grads.fill(0.0);
        math::sized(&mut self.d_state_next, t * h);
        for l in (0..layers.count).rev() {
            let p = math::split(layers.layer(l), layers.layout);
            let mut g = math::split_mut(&mut grads[l * len..(l + 1) * len], layers.layout);
            let d_input = if l > 0 {
                Some(&mut self.d_state_next[..t * h])
            } else {
                None
            };
            math::backward_layer(
                &p,
                &mut g,
                layers.layout,
                layers.heads,
                &self.seqs,
                t,
                &self.activations[l],
                &self.d_state[..t * h],
                &mut self.backward,
                d_input,
            );
            std::mem::swap(&mut self.d_state, &mut self.d_state_next);
        }
    }
}

/// Adam with bias correction and decoupled weight decay, as the experiment's `adam`.
struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
}

impl Adam {
    const BETA1: f32 = 0.9;
    const BETA2: f32 = 0.999;
    const EPS: f32 = 1e-8;

    fn new(len: usize) -> Adam {
        Adam {
            m: vec![0.0; len],
            v: vec![0.0; len],
            t: 0,
        }
    }

    fn update(&mut self, params: &mut [f32], grads: &[f32], rate: f32, decay: f32) {
        self.t += 1;
        let c1 = 1.0 / (1.0 - f64::from(Self::BETA1).powi(self.t)) as f32;
        let c2 = 1.0 / (1.0 - f64::from(Self::BETA2).powi(self.t)) as f32;
        for (((p, &g), m), v) in params
            .iter_mut()
            .zip(grads)
            .zip(self.m.iter_mut())
            .zip(self.v.iter_mut())
        {
            *m = Self::BETA1 * *m + (1.0 - Self::BETA1) * g;
            *v = Self::BETA2 * *v + (1.0 - Self::BETA2) * g * g;
            *p -= rate * ((*m * c1) / ((*v * c2).sqrt() + Self::EPS) + decay * *p);
        }
    }
}

/// The batch-order shuffle's generator (splitmix64: small, deterministic, good enough).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}
