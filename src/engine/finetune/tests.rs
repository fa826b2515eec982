//! Tests of the fine-tuning module: gradients against finite differences of an independent f64
//! reference, training, the byte format, the real weights and the forward against the
//! reference experiment's vectors.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::math::{Layout, PARAMETER_KINDS};
use super::*;

fn uniform(rng: &mut SplitMix64) -> f32 {
    (rng.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
}

/// Random layers with weights of a realistic scale (1/√fan-in), LayerNorm gains near 1.
fn random_layers(
    hidden: usize,
    heads: usize,
    intermediate: usize,
    count: usize,
    seed: u64,
) -> TopLayers {
    let layout = Layout {
        hidden,
        intermediate,
    };
    let mut rng = SplitMix64(seed);
    let mut params = Vec::with_capacity(count * layout.len());
    for _ in 0..count {
        for (kind, size) in layout.sizes().iter().enumerate() {
            let name = PARAMETER_KINDS[kind];
            let fan_in = if name.starts_with("output.weight") {
                intermediate
            } else {
                hidden
            };
            for _ in 0..*size {
                let u = uniform(&mut rng);
                params.push(if name.ends_with(".gain") {
                    1.0 + 0.2 * u
                } else if name.ends_with(".weight") {
                    u * 1.5 / (fan_in as f32).sqrt()
                } else {
                    0.1 * u
                });
            }
        }
    }
    TopLayers {
        first_layer: 0,
        count,
        heads,
        layout,
        params,
    }
}

fn random_sequences(lengths: &[usize], hidden: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = SplitMix64(seed);
    lengths
        .iter()
        .map(|&n| (0..n * hidden).map(|_| uniform(&mut rng)).collect())
        .collect()
}

/// An independent, naive f64 implementation of the experiment's `encode` and loss.
mod reference {
    use super::Layout;

    /// `x · W + b` with `W` stored `[in, out]`.
    fn linear(x: &[f64], n: usize, w: &[f64], b: &[f64]) -> Vec<f64> {
        let out = b.len();
        let inp = w.len() / out;
        let mut y = vec![0.0; n * out];
        for t in 0..n {
            for o in 0..out {
                let mut s = b[o];
                for i in 0..inp {
                    s += x[t * inp + i] * w[i * out + o];
                }
                y[t * out + o] = s;
            }
        }
        y
    }

    fn layer_norm(x: &mut [f64], g: &[f64], b: &[f64]) {
        let w = g.len();
        for row in x.chunks_exact_mut(w) {
            let mean = row.iter().sum::<f64>() / w as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / w as f64;
            for j in 0..w {
                row[j] = (row[j] - mean) / (var + 1e-12).sqrt() * g[j] + b[j];
            }
        }
    }

    fn erf(x: f64) -> f64 {
        libm::erf(x)
    }

    pub fn layer(p: &[f64], layout: Layout, heads: usize, x: &[f64], n: usize) -> Vec<f64> {
        let (h, inter) = (layout.hidden, layout.intermediate);
        let r = |k: usize| &p[layout.range(k)];
        let qkv = linear(x, n, r(0), r(1));
        let q: Vec<f64> = (0..n * h).map(|j| qkv[(j / h) * 3 * h + j % h]).collect();
        let k: Vec<f64> = (0..n * h)
            .map(|j| qkv[(j / h) * 3 * h + h + j % h])
            .collect();
        let v: Vec<f64> = (0..n * h)
            .map(|j| qkv[(j / h) * 3 * h + 2 * h + j % h])
            .collect();
        let d = h / heads;
        let mut ctx = vec![0.0; n * h];
        for hd in 0..heads {
            for i in 0..n {
                let mut s: Vec<f64> = (0..n)
                    .map(|j| {
                        (0..d)
                            .map(|c| q[i * h + hd * d + c] * k[j * h + hd * d + c])
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = s.iter().map(|z| (z - max).exp()).sum();
                for z in s.iter_mut() {
                    *z = (*z - max).exp() / sum;
                }
                for c in 0..d {
                    ctx[i * h + hd * d + c] = (0..n).map(|j| s[j] * v[j * h + hd * d + c]).sum();
                }
            }
        }
        let mut x1 = linear(&ctx, n, r(2), r(3));
        for (a, b) in x1.iter_mut().zip(x) {
            *a += b;
        }
        layer_norm(&mut x1, r(4), r(5));
        let mut act = linear(&x1, n, r(6), r(7));
        for a in act.iter_mut() {
            *a = 0.5 * *a * (1.0 + erf(*a / 2f64.sqrt()));
        }
        assert_eq!(act.len(), n * inter);
        let mut out = linear(&act, n, r(8), r(9));
        for (a, b) in out.iter_mut().zip(&x1) {
            *a += b;
        }
        layer_norm(&mut out, r(10), r(11));
        out
    }

    pub fn encode(
        params: &[f64],
        layout: Layout,
        heads: usize,
        count: usize,
        x: &[f64],
    ) -> Vec<f64> {
        let h = layout.hidden;
        let n = x.len() / h;
        let mut x = x.to_vec();
        for l in 0..count {
            x = layer(
                &params[l * layout.len()..(l + 1) * layout.len()],
                layout,
                heads,
                &x,
                n,
            );
        }
        let mut u = vec![0.0; h];
        for row in x.chunks_exact(h) {
            for (a, b) in u.iter_mut().zip(row) {
                *a += b / n as f64;
            }
        }
        let norm = u.iter().map(|v| v * v).sum::<f64>().sqrt();
        u.iter().map(|v| v / norm).collect()
    }

    #[allow(clippy::too_many_arguments)]
    pub fn loss(
        params: &[f64],
        proxies: &[f64],
        layout: Layout,
        heads: usize,
        count: usize,
        sequences: &[Vec<f64>],
        labels: &[usize],
        scale: f64,
    ) -> f64 {
        let h = layout.hidden;
        let mut total = 0.0;
        for (x, &y) in sequences.iter().zip(labels) {
            let e = encode(params, layout, heads, count, x);
            let logits: Vec<f64> = proxies
                .chunks_exact(h)
                .map(|p| {
                    let norm = p.iter().map(|v| v * v).sum::<f64>().sqrt();
                    scale * e.iter().zip(p).map(|(a, b)| a * b).sum::<f64>() / norm
                })
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + logits.iter().map(|z| (z - max).exp()).sum::<f64>().ln();
            total += lse - logits[y];
        }
        total / sequences.len() as f64
    }
}

#[test]
fn gradients_match_finite_differences_of_an_f64_reference() {
    let (hidden, heads, intermediate, count, classes) = (8, 2, 16, 2, 3);
    let layers = random_layers(hidden, heads, intermediate, count, 1);
    let layout = layers.layout;
    let lengths = [3, 5, 2, 4, 6];
    let sequences = random_sequences(&lengths, hidden, 2);
    let labels = [0, 1, 2, 1, 0];
    let mut rng = SplitMix64(3);
    let proxies: Vec<f32> = (0..classes * hidden).map(|_| uniform(&mut rng)).collect();
    let scale = 20.0;

    // Analytic, through the trainer's own code path (two threads: the batch is split in shares).
    let views: Vec<&[f32]> = sequences.iter().map(|s| s.as_slice()).collect();
    let mut unit = vec![0.0; proxies.len()];
    let mut norms = vec![0.0; classes];
    normalise_proxies(&proxies, hidden, &mut unit, &mut norms);
    let cx = StepContext {
        layers: &layers,
        unit_proxies: &unit,
        classes,
        scale,
        batch_len: lengths.len(),
        sequences: &views,
        labels: &labels,
        dropout: 0.0,
        step_seed: 0,
    };
    let mut workers: Vec<Worker> = (0..2).map(|_| Worker::default()).collect();
    let batch: Vec<usize> = (0..lengths.len()).collect();
    let loss = batch_gradients(&mut workers, &cx, &batch, &norms);
    let grads = workers[0].grads.clone();
    let proxy_grads = workers[0].proxy_grads.clone();

    let params64: Vec<f64> = layers.params.iter().map(|&v| f64::from(v)).collect();
    let proxies64: Vec<f64> = proxies.iter().map(|&v| f64::from(v)).collect();
    let seqs64: Vec<Vec<f64>> = sequences
        .iter()
        .map(|s| s.iter().map(|&v| f64::from(v)).collect())
        .collect();
    let f = |p: &[f64], q: &[f64]| {
        reference::loss(
            p,
            q,
            layout,
            heads,
            count,
            &seqs64,
            &labels,
            f64::from(scale),
        )
    };
    let loss64 = f(&params64, &proxies64);
    assert!(
        (loss - loss64).abs() < 1e-4 * loss64.abs().max(1.0),
        "loss {loss} vs f64 reference {loss64}"
    );

    let eps = 1e-5;
    let check = |name: &str, analytic: f32, numeric: f64, failures: &mut Vec<String>| {
        let tolerance = 2e-3 * numeric.abs() + 2e-5;
        if (f64::from(analytic) - numeric).abs() > tolerance {
            failures.push(format!(
                "{name}: analytic {analytic:e}, finite difference {numeric:e}"
            ));
        }
    };
    let mut failures = Vec::new();
    let mut largest = 0.0f64;
    for l in 0..count {
        for (kind, name) in PARAMETER_KINDS.iter().enumerate() {
            let range = layout.range(kind);
            for _ in 0..4 {
                let index = l * layout.len() + range.start + (rng.next() as usize) % range.len();
                let mut plus = params64.clone();
                plus[index] += eps;
                let mut minus = params64.clone();
                minus[index] -= eps;
                let numeric = (f(&plus, &proxies64) - f(&minus, &proxies64)) / (2.0 * eps);
                largest = largest.max(numeric.abs());
                check(
                    &format!("layer {l} {name}[{index}]"),
                    grads[index],
                    numeric,
                    &mut failures,
                );
            }
        }
    }
    for _ in 0..6 {
        let index = (rng.next() as usize) % proxies.len();
        let mut plus = proxies64.clone();
        plus[index] += eps;
        let mut minus = proxies64.clone();
        minus[index] -= eps;
        let numeric = (f(&params64, &plus) - f(&params64, &minus)) / (2.0 * eps);
        check(
            &format!("proxy[{index}]"),
            proxy_grads[index],
            numeric,
            &mut failures,
        );
    }
    assert!(
        failures.is_empty(),
        "gradient mismatches:\n{}",
        failures.join("\n")
    );
    assert!(
        largest > 1e-2,
        "the sampled gradients are all tiny ({largest:e}): the check proves nothing"
    );
}

fn separable_problem(
    hidden: usize,
    classes: usize,
    per_class: usize,
) -> (Vec<Vec<f32>>, Vec<usize>) {
    let mut rng = SplitMix64(11);
    let centres: Vec<Vec<f32>> = (0..classes)
        .map(|_| (0..hidden).map(|_| uniform(&mut rng)).collect())
        .collect();
    let mut sequences = Vec::new();
    let mut labels = Vec::new();
    for i in 0..classes * per_class {
        let class = i % classes;
        let n = 3 + (rng.next() % 6) as usize;
        let s: Vec<f32> = (0..n * hidden)
            .map(|j| centres[class][j % hidden] + 1.5 * uniform(&mut rng))
            .collect();
        sequences.push(s);
        labels.push(class);
    }
    (sequences, labels)
}

/// Rates and batches that train [`separable_problem`] in a few epochs.
fn small_problem_options() -> TuneOptions {
    TuneOptions {
        learning_rate: 2e-3,
        proxy_learning_rate: 1e-2,
        batch_size: 8,
        threads: 2,
        seed: 5,
        ..TuneOptions::default()
    }
}

#[test]
fn training_lowers_the_loss_and_is_deterministic() {
    let (sequences, labels) = separable_problem(16, 3, 20);
    let views: Vec<&[f32]> = sequences.iter().map(|s| s.as_slice()).collect();
    let options = TuneOptions {
        epochs: 6,
        ..small_problem_options()
    };
    let run = || {
        let mut calls = Vec::new();
        let (tuned, report) = fine_tune(
            random_layers(16, 4, 32, 2, 9),
            &views,
            &labels,
            3,
            &options,
            &mut |done, total| calls.push((done, total)),
        )
        .expect("fine_tune");
        (tuned, report, calls)
    };
    let (a, report_a, calls) = run();
    let (b, report_b, _) = run();
    assert_eq!(report_a.steps, 6 * 8);
    assert_eq!(calls.len(), 48);
    assert_eq!(calls.last(), Some(&(48, 48)));
    assert!(
        report_a.last_epoch_loss < 0.8 * report_a.first_epoch_loss,
        "loss {} -> {}",
        report_a.first_epoch_loss,
        report_a.last_epoch_loss
    );
    assert_eq!(
        a.digest(),
        b.digest(),
        "two runs with the same seed and threads differ"
    );
    assert_eq!(report_a.last_epoch_loss, report_b.last_epoch_loss);
    assert_ne!(
        a.digest(),
        random_layers(16, 4, 32, 2, 9).digest(),
        "nothing was trained"
    );

    // A different thread count trains too (not bit-identical: the sums are ordered differently).
    let single = TuneOptions {
        threads: 1,
        ..options.clone()
    };
    let (_, report_c) = fine_tune(
        random_layers(16, 4, 32, 2, 9),
        &views,
        &labels,
        3,
        &single,
        &mut |_, _| {},
    )
    .expect("fine_tune");
    assert!(
        (report_c.last_epoch_loss - report_a.last_epoch_loss).abs()
            < 1e-2 * report_a.first_epoch_loss
    );
}

#[test]
fn input_dropout_is_deterministic_and_changes_training() {
    let (sequences, labels) = separable_problem(16, 3, 20);
    let views: Vec<&[f32]> = sequences.iter().map(|s| s.as_slice()).collect();
    let options = TuneOptions {
        epochs: 3,
        ..small_problem_options()
    };
    let run = |options: &TuneOptions| {
        fine_tune(
            random_layers(16, 4, 32, 2, 9),
            &views,
            &labels,
            3,
            options,
            &mut |_, _| {},
        )
        .expect("fine_tune")
    };
    let dropped = TuneOptions {
        input_dropout: 0.2,
        ..options.clone()
    };
    let (plain, plain_report) = run(&options);
    let (a, report_a) = run(&dropped);
    let (b, _) = run(&dropped);
    assert_eq!(a.digest(), b.digest(), "dropout masks must follow the seed");
    assert_ne!(a.digest(), plain.digest(), "dropout changed nothing");
    assert!(report_a.last_epoch_loss < report_a.first_epoch_loss);
    // The proxies come back, one row per class.
    assert_eq!(plain_report.proxies.len(), 3 * 16);
    assert!(plain_report.proxies.iter().all(|v| v.is_finite()));
    // Out of range rates are refused.
    for rate in [1.0, -0.1, f32::NAN] {
        let bad = TuneOptions {
            input_dropout: rate,
            ..options.clone()
        };
        assert!(matches!(
            fine_tune(
                random_layers(16, 4, 32, 2, 9),
                &views,
                &labels,
                3,
                &bad,
                &mut |_, _| {}
            ),
            Err(FineTuneError::InvalidOptions(_))
        ));
    }
}

#[test]
fn averaging_layers_takes_the_mean_and_checks_shapes() {
    let a = random_layers(8, 2, 16, 1, 1);
    let b = random_layers(8, 2, 16, 1, 2);
    let mean = TopLayers::average(&[a.clone(), b.clone()]).expect("same shapes");
    for ((m, x), y) in mean.params.iter().zip(&a.params).zip(&b.params) {
        assert!((m - 0.5 * (x + y)).abs() <= 1e-6 * (1.0 + x.abs() + y.abs()));
    }
    assert_eq!(
        TopLayers::average(std::slice::from_ref(&a)).expect("one"),
        a
    );
    assert!(matches!(
        TopLayers::average(&[]),
        Err(FineTuneError::InvalidConfig(_))
    ));
    let wider = random_layers(16, 2, 16, 1, 1);
    assert!(matches!(
        TopLayers::average(&[a, wider]),
        Err(FineTuneError::InvalidConfig(_))
    ));
}

#[test]
fn the_streamed_kernel_computes_what_the_packed_one_does() {
    let mut rng = SplitMix64(3);
    let mut values = |n: usize| -> Vec<f32> { (0..n).map(|_| uniform(&mut rng)).collect() };
    let has_avx2 =
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
    const PAD: usize = 19;
    const MARK: f32 = 1234.5;
    for (inp, out) in [(7, 16), (24, 48), (384, 64)] {
        let w = values(inp * out);
        let bias = values(out);
        for tokens in (1..=13).chain([23, 24, 25]) {
            let x = values(tokens * inp);
            let mut packed = vec![0.0; tokens * out];
            // Marker values after the output: the kernel must not write past `tokens · out`.
            let mut streamed = vec![MARK; tokens * out + PAD];
            math::linear(&x, tokens, &w, &bias, &mut packed, math::Kernel::Packed);
            math::linear(&x, tokens, &w, &bias, &mut streamed, math::Kernel::Streamed);
            for (a, b) in packed.iter().zip(&streamed) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                    "{inp}x{out}, {tokens} tokens: {a} {b}"
                );
            }
            assert!(streamed[tokens * out..].iter().all(|&v| v == MARK));
            // The kernel itself ran (on a CPU that has it), not the packed fallback.
            let mut direct = vec![0.0; tokens * out];
            assert_eq!(
                math::streamed::accumulate(&x, tokens, &w, out, &mut direct),
                has_avx2
            );
        }
    }
    // A width that is not a multiple of 16 falls back to the packed product.
    let (w, bias, x) = (values(5 * 10), values(10), values(2 * 5));
    let mut packed = vec![0.0; 20];
    let mut streamed = vec![0.0; 20];
    math::linear(&x, 2, &w, &bias, &mut packed, math::Kernel::Packed);
    math::linear(&x, 2, &w, &bias, &mut streamed, math::Kernel::Streamed);
    assert_eq!(packed, streamed);
    assert!(!math::streamed::accumulate(&x, 2, &w, 10, &mut streamed));
}

/// Times one query's dense products with either kernel on layer-5-sized random weights.
/// `cargo test --release --lib engine::finetune::tests::measure_kernels -- --ignored --nocapture`
#[test]
#[ignore]
fn measure_kernels() {
    let mut rng = SplitMix64(5);
    let mut values = |n: usize| -> Vec<f32> { (0..n).map(|_| uniform(&mut rng)).collect() };
    let shapes = [(384, 1152), (384, 384), (384, 1536), (1536, 384)];
    let weights: Vec<(Vec<f32>, Vec<f32>)> = shapes
        .iter()
        .map(|&(i, o)| (values(i * o), values(o)))
        .collect();
    for tokens in [4, 12, 16, 24, 48] {
        let x = values(tokens * 1536);
        let mut y = vec![0.0; tokens * 1536];
        for kernel in [math::Kernel::Packed, math::Kernel::Streamed] {
            let rounds = 300;
            let started = Instant::now();
            for _ in 0..rounds {
                for ((w, b), &(i, _)) in weights.iter().zip(&shapes) {
                    math::linear(&x[..tokens * i], tokens, w, b, &mut y, kernel);
                }
            }
            let ms = started.elapsed().as_secs_f64() * 1e3 / rounds as f64;
            println!("{tokens} tokens, {kernel:?}: {ms:.3} ms for the four products");
        }
    }
}

#[test]
fn fine_tune_rejects_bad_input() {
    let layers = random_layers(8, 2, 16, 1, 1);
    let good = vec![0.5f32; 16];
    let options = TuneOptions::default();
    let err = |s: &[&[f32]], l: &[usize], c: usize, o: &TuneOptions| {
        fine_tune(layers.clone(), s, l, c, o, &mut |_, _| {}).err()
    };
    assert!(matches!(
        err(&[], &[], 2, &options),
        Some(FineTuneError::EmptyInput)
    ));
    assert!(matches!(
        err(&[&good], &[2], 2, &options),
        Some(FineTuneError::LabelOutOfRange { label: 2, .. })
    ));
    assert!(matches!(
        err(&[&good, &good[..12]], &[0, 1], 2, &options),
        Some(FineTuneError::BadSequence {
            index: 1,
            len: 12,
            ..
        })
    ));
    assert!(matches!(
        err(&[&good], &[0, 1], 2, &options),
        Some(FineTuneError::LengthMismatch { .. })
    ));
    let no_threads = TuneOptions {
        threads: 0,
        ..TuneOptions::default()
    };
    assert!(matches!(
        err(&[&good], &[0], 2, &no_threads),
        Some(FineTuneError::InvalidOptions(_))
    ));
    // A class without questions keeps a zero proxy and training still runs.
    assert!(err(&[&good, &good], &[0, 0], 3, &options).is_none());
}

#[test]
fn bytes_round_trip_and_reject_malformed_input() {
    let layers = random_layers(8, 2, 16, 2, 4);
    let bytes = layers.to_bytes();
    let back = TopLayers::from_bytes(&bytes).expect("round trip");
    assert_eq!(back, layers);
    assert_eq!(back.digest(), layers.digest());
    assert_eq!(layers.digest().len(), 16);

    assert!(matches!(
        TopLayers::from_bytes(&bytes[..bytes.len() - 1]),
        Err(FineTuneError::Truncated { .. })
    ));
    assert!(matches!(
        TopLayers::from_bytes(&bytes[..10]),
        Err(FineTuneError::Truncated { .. })
    ));
    assert!(matches!(
        TopLayers::from_bytes(&[]),
        Err(FineTuneError::Truncated { .. })
    ));
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        TopLayers::from_bytes(&longer),
        Err(FineTuneError::Truncated { .. })
    ));

    let patched = |at: usize, value: u32| {
        let mut b = bytes.clone();
        b[at..at + 4].copy_from_slice(&value.to_le_bytes());
        TopLayers::from_bytes(&b)
    };
    let mut magic = bytes.clone();
    magic[0] = b'X';
    assert!(matches!(
        TopLayers::from_bytes(&magic),
        Err(FineTuneError::BadMagic)
    ));
    assert!(matches!(
        patched(8, 2),
        Err(FineTuneError::UnsupportedVersion(2))
    ));
    // Lying shapes: count, hidden, intermediate that do not match the data, absurd sizes.
    assert!(matches!(
        patched(16, 3),
        Err(FineTuneError::Truncated { .. })
    ));
    assert!(matches!(
        patched(20, 16),
        Err(FineTuneError::Truncated { .. })
    ));
    assert!(matches!(
        patched(24, 8),
        Err(FineTuneError::Truncated { .. })
    ));
    assert!(matches!(
        patched(16, 0),
        Err(FineTuneError::InvalidConfig(_))
    ));
    assert!(matches!(
        patched(20, u32::MAX),
        Err(FineTuneError::InvalidConfig(_))
    ));
    assert!(matches!(
        patched(28, 3),
        Err(FineTuneError::InvalidConfig(_))
    ));
    assert!(matches!(
        patched(28, 0),
        Err(FineTuneError::InvalidConfig(_))
    ));
    let mut nan = bytes.clone();
    let at = nan.len() - 4;
    nan[at..].copy_from_slice(&f32::NAN.to_le_bytes());
    assert!(matches!(
        TopLayers::from_bytes(&nan),
        Err(FineTuneError::InvalidConfig(_))
    ));
}

fn real_weights() -> PathBuf {
    crate::engine::testing::model_file("model.fp32.safetensors")
}

#[test]
fn real_weights_load_and_bad_files_are_clear_errors() {
    let path = real_weights();
    let layers = TopLayers::from_safetensors(&path, 4, 2, 12).expect("layers 4-5");
    assert_eq!(
        (layers.first_layer(), layers.count(), layers.heads()),
        (4, 2, 12)
    );
    assert_eq!((layers.hidden(), layers.intermediate()), (384, 1536));
    assert_eq!(
        layers.params.len(),
        2 * (4 * 384 * 384 + 2 * 384 * 1536 + 9 * 384 + 1536)
    );
    let fifth = TopLayers::from_safetensors(&path, 5, 1, 12).expect("layer 5");
    assert_eq!(fifth.params.as_slice(), layers.layer(1));
    assert!(layers.params.iter().all(|v| v.is_finite()));

    match TopLayers::from_safetensors(&path, 5, 2, 12) {
        Err(FineTuneError::MissingTensor { key, .. }) => {
            assert!(key.starts_with("encoder.layer.6."), "{key}")
        }
        other => panic!("layer 6 does not exist: {other:?}"),
    }
    assert!(matches!(
        TopLayers::from_safetensors(&path, 4, 2, 5),
        Err(FineTuneError::InvalidConfig(_))
    ));
    assert!(matches!(
        TopLayers::from_safetensors(Path::new("/nonexistent/model.safetensors"), 4, 2, 12),
        Err(FineTuneError::Io { .. })
    ));

    // A file holding only the query weight: the first other tensor asked for is missing.
    let dir = tempfile::tempdir().expect("tempdir");
    let small = dir.path().join("small.safetensors");
    let data: Vec<u8> = (0..16).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 4], &data)
        .expect("view");
    let bytes = safetensors::serialize(
        [("encoder.layer.0.attention.self.query.weight", view)],
        None,
    )
    .expect("serialize");
    std::fs::write(&small, bytes).expect("write");
    match TopLayers::from_safetensors(&small, 0, 1, 2) {
        Err(e @ FineTuneError::MissingTensor { .. }) => {
            assert!(e.to_string().contains("intermediate.dense.weight"), "{e}")
        }
        other => panic!("expected a missing tensor: {other:?}"),
    }
    std::fs::write(&small, b"not a safetensors file").expect("write");
    assert!(matches!(
        TopLayers::from_safetensors(&small, 0, 1, 2),
        Err(FineTuneError::Safetensors { .. })
    ));
}

/// tests/data/finetune/layer3_states.bin: magic `FTFX`, u32 count, u32 hidden, then per
/// question u32 tokens, its layer-3 states (`tokens · hidden` f32) and the shipped model's
/// final unit vector (`hidden` f32), all little-endian (exported from the experiment's data for
/// six kb.csv questions of 7 to 14 tokens).
fn fixture() -> Vec<(usize, Vec<f32>, Vec<f32>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/finetune/layer3_states.bin");
    let bytes = std::fs::read(&path).expect("fixture");
    assert_eq!(&bytes[..4], b"FTFX");
    let word =
        |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
    let floats = |at: usize, n: usize| -> Vec<f32> {
        bytes[at..at + 4 * n]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect()
    };
    let (count, hidden) = (word(4), word(8));
    let mut at = 12;
    let mut out = Vec::new();
    for _ in 0..count {
        let tokens = word(at);
        at += 4;
        let states = floats(at, tokens * hidden);
        at += 4 * tokens * hidden;
        let expected = floats(at, hidden);
        at += 4 * hidden;
        out.push((tokens, states, expected));
    }
    assert_eq!(at, bytes.len());
    out
}

#[test]
fn untuned_forward_reproduces_the_shipped_vectors() {
    let layers = TopLayers::from_safetensors(&real_weights(), 4, 2, 12).expect("layers");
    let mut scratch = Scratch::default();
    let mut out = vec![0.0; 384];
    let cases = fixture();
    assert_eq!(cases.len(), 6);
    let mut lowest = f32::INFINITY;
    for (tokens, states, expected) in &cases {
        layers.embed_sequence(states, *tokens, &mut scratch, &mut out);
        let norm: f32 = out.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
        let cosine: f32 = out.iter().zip(expected).map(|(a, b)| a * b).sum();
        assert!(cosine > 0.999, "{tokens} tokens: cosine {cosine}");
        lowest = lowest.min(cosine);
    }
    println!("lowest cosine with the shipped vectors: {lowest:.6}");
    // The batched training forward gives the same vectors as the one-sequence path.
    let views: Vec<&[f32]> = cases.iter().map(|c| c.1.as_slice()).collect();
    let mut worker = Worker::default();
    worker.forward(&layers, &views, &[0, 1, 2, 3, 4, 5], None);
    for (i, (tokens, states, _)) in cases.iter().enumerate() {
        layers.embed_sequence(states, *tokens, &mut scratch, &mut out);
        for (a, b) in out.iter().zip(&worker.vectors[i * 384..(i + 1) * 384]) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}

/// Lengths 8-40, skewed short like kb.csv's questions (mean about 16 tokens).
fn realistic_lengths(count: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64(seed);
    (0..count)
        .map(|_| {
            let u = (uniform(&mut rng) + 1.0) / 2.0;
            8 + (33.0 * u * u * u) as usize
        })
        .collect()
}

/// `cargo test --lib engine::finetune::tests::measure -- --ignored --nocapture` with an
/// optimised build (see the module documentation for the command and the figures).
#[test]
#[ignore]
fn measure_epoch_and_inference() {
    let layers = TopLayers::from_safetensors(&real_weights(), 4, 2, 12).expect("layers");
    let mut scratch = Scratch::default();
    let mut out = vec![0.0; 384];
    for tokens in [1, 16, 64] {
        let states = random_sequences(&[tokens], 384, 1).remove(0);
        for _ in 0..20 {
            layers.embed_sequence(&states, tokens, &mut scratch, &mut out);
        }
        let started = Instant::now();
        let runs = 200;
        for _ in 0..runs {
            layers.embed_sequence(&states, tokens, &mut scratch, &mut out);
        }
        let ms = started.elapsed().as_secs_f64() * 1e3 / runs as f64;
        // 2 flops per weight per token (the attention itself is negligible at these lengths).
        let gflops = 2.0 * layers.params.len() as f64 * tokens as f64 / (ms * 1e6);
        println!("embed_sequence, {tokens} tokens, one thread: {ms:.3} ms ({gflops:.0} GFLOP/s)");
    }

    let threads: usize = std::env::var("FINETUNE_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let lengths = realistic_lengths(9000, 3);
    let tokens: usize = lengths.iter().sum();
    let sequences = random_sequences(&lengths, 384, 4);
    let views: Vec<&[f32]> = sequences.iter().map(|s| s.as_slice()).collect();
    let labels: Vec<usize> = (0..9000).map(|i| i % 77).collect();
    let options = TuneOptions {
        epochs: 1,
        threads,
        ..TuneOptions::default()
    };
    let mut first_step = None;
    let started = Instant::now();
    let (_, report) = fine_tune(layers, &views, &labels, 77, &options, &mut |done, _| {
        if done == 1 {
            first_step = Some(started.elapsed());
        }
    })
    .expect("fine_tune");
    println!(
        "fine_tune 9,000 questions ({tokens} tokens), {threads} threads, 1 epoch: {:.1} s total ({} steps; first step done at {:.1} s, i.e. the untuned pass for the proxies), loss {:.3}",
        report.elapsed.as_secs_f64(),
        report.steps,
        first_step.map_or(0.0, |d| d.as_secs_f64()),
        report.first_epoch_loss
    );
}

/// The experiment's real data: `FINETUNE_REAL_STATES` names a file of u32 count, u32 hidden,
/// `count` u32 token counts, `count` u32 labels, then the layer-3 states (f32), exported from
/// the experiment's `kb_layer_norm_8.npz` (9,000 kb.csv questions, 77 intents). The JAX run
/// (`/tmp/ftpy/train.py`, same hyper-parameters, another shuffle) printed epoch losses 0.4487,
/// 0.3227, 0.2602.
#[test]
#[ignore]
fn real_knowledge_base_trains_like_the_experiment() {
    let Some(path) = std::env::var_os("FINETUNE_REAL_STATES") else {
        panic!("set FINETUNE_REAL_STATES to the exported states");
    };
    let bytes = std::fs::read(path).expect("states");
    let word = |i: usize| {
        u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes")) as usize
    };
    let (count, hidden) = (word(0), word(1));
    let lens: Vec<usize> = (0..count).map(|i| word(2 + i)).collect();
    let labels: Vec<usize> = (0..count).map(|i| word(2 + count + i)).collect();
    let floats: Vec<f32> = bytes[4 * (2 + 2 * count)..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    let mut views = Vec::with_capacity(count);
    let mut at = 0;
    for &n in &lens {
        views.push(&floats[at..at + n * hidden]);
        at += n * hidden;
    }
    assert_eq!(at, floats.len());
    let classes = labels.iter().max().map_or(0, |m| m + 1);
    let layers = TopLayers::from_safetensors(&real_weights(), 4, 2, 12).expect("layers");
    let options = TuneOptions::default();
    let mut epoch_marks = Vec::new();
    let started = Instant::now();
    let (tuned, report) = fine_tune(
        layers,
        &views,
        &labels,
        classes,
        &options,
        &mut |done, total| {
            if done == 1 || done == total / 2 || done == total {
                epoch_marks.push((done, started.elapsed().as_secs_f64()));
            }
        },
    )
    .expect("fine_tune");
    println!(
        "real kb: {count} questions, {} tokens, {classes} classes, {} epochs on {} threads: losses {:.4} -> {:.4}, {:.1} s ({epoch_marks:?}), digest {}",
        lens.iter().sum::<usize>(),
        report.epochs,
        options.threads,
        report.first_epoch_loss,
        report.last_epoch_loss,
        report.elapsed.as_secs_f64(),
        tuned.digest()
    );
    assert!(
        (report.first_epoch_loss - 0.4487).abs() < 0.03,
        "first epoch loss {}",
        report.first_epoch_loss
    );
    assert!(
        (report.last_epoch_loss - 0.3227).abs() < 0.03,
        "second epoch loss {}",
        report.last_epoch_loss
    );
}
