//! K-fold cross-validation of the import-time fine-tuning recipe and the classifier blend,
//! inside a knowledge base, through the engine's own code (ONNX Runtime for the frozen layers,
//! `engine::finetune` for the tuned one, `engine::classifier` for the head and the vote).
//!
//! How the defaults were chosen (models/README.md, "Choosing the recipe in cross-validation"):
//! nothing here reads the hold-out. Each fold holds out every K-th question of every intent
//! (after a seeded shuffle within the intent), fine-tunes layer 5 on the other questions,
//! trains the head on them, and scores the held-out ones under every blend of the grid.
//!
//! ```text
//! cargo run --release --example intent_cv -- --kb tests/data/banking77/kb.csv \
//!     [--models models/cache] [--folds 5] [--epochs 2] [--lr 5e-5] [--scale 20] \
//!     [--states /tmp/kb.states] [--frozen] [--soup N] [--dropout P] [--companion] [--cascade]
//!     [--joined-blend HEAD,T,K] [--holdout FILE] [--export PREFIX]
//! ```
//! `--states` caches the frozen layers' output (about 220 MB for BANKING77) so later runs skip
//! them; `--frozen` also scores the untuned layer (the shipped model) as a baseline; `--soup N`
//! trains N runs (seeds `seed`..`seed + N`), scores each, and scores their weight average.
//! `--cascade` (implies `--companion`) also scores the engine's cascade at several
//! `[inference] companion_below` thresholds: the tuned model's answer in the shipped cell, unless
//! its score is below the threshold, then the answer from the joined vectors in the shipped cell
//! or in the one `--joined-blend HEAD,T,K` names. `--export PREFIX` writes the questions
//! (`PREFIX.tsv`: row, fold, label, intent, text) and each variant's blended scores in the
//! shipped cell (`PREFIX-<variant>.f32`) for `scripts/lexical_blend_experiment.py`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use switchboard::engine::classifier::{
    best_two, BlendParams, Prediction, SoftmaxRegression, TrainOptions,
};
use switchboard::engine::encoder::Encoder;
use switchboard::engine::eval;
use switchboard::engine::finetune::{self, TopLayers, TuneOptions};
use switchboard::engine::intent::row_labels;
use switchboard::engine::update::{embed_tuned, TUNED_FIRST_LAYER, TUNED_HEADS, TUNED_LAYER_COUNT};
use switchboard::kb::{self, row_scores, top_k_of};

/// The bot's shipped thresholds: `[bot] confidence_threshold`, `margin_threshold`,
/// `min_similarity`.
const CONFIDENCE: f32 = 0.4;
const MARGIN: f32 = 0.05;
const MIN_SIMILARITY: f32 = 0.5;

struct Args {
    kb: PathBuf,
    models: PathBuf,
    folds: usize,
    fold_seed: u64,
    tune: TuneOptions,
    states: Option<PathBuf>,
    frozen: bool,
    /// Train on the whole kb and score this labelled file instead of cross-validating.
    holdout: Option<PathBuf>,
    /// Also score every variant's vectors joined with the multilingual companion's.
    companion: bool,
    /// Fine-tuning runs (seeds `seed`, `seed + 1`, ...) averaged into one layer.
    soup: usize,
    /// Also score the tuned → tuned + companion cascade (implies `companion`).
    cascade: bool,
    /// The blend the cascade's escalation step uses (`--joined-blend HEAD,T,K`).
    joined_blend: BlendParams,
    /// Writes every scored question's blended scores in the shipped cell to `PREFIX-<variant>.f32`
    /// and the questions (row, fold, label, text) to `PREFIX.tsv` (`--export PREFIX`).
    export: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        kb: PathBuf::from("tests/data/banking77/kb.csv"),
        models: PathBuf::from("models/cache"),
        folds: 5,
        fold_seed: 11,
        tune: TuneOptions::default(),
        states: None,
        frozen: false,
        soup: 1,
        companion: false,
        cascade: false,
        joined_blend: BlendParams::default(),
        holdout: None,
        export: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--frozen" || flag == "--companion" || flag == "--cascade" {
            args.frozen |= flag == "--frozen";
            args.companion |= flag == "--companion" || flag == "--cascade";
            args.cascade |= flag == "--cascade";
            continue;
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let number = |v: &str| v.parse::<f64>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--kb" => args.kb = value.into(),
            "--models" => args.models = value.into(),
            "--holdout" => args.holdout = Some(value.into()),
            "--export" => args.export = Some(value.into()),
            "--states" => args.states = Some(value.into()),
            "--folds" => args.folds = number(&value)? as usize,
            "--fold-seed" => args.fold_seed = number(&value)? as u64,
            "--epochs" => args.tune.epochs = number(&value)? as usize,
            "--lr" => args.tune.learning_rate = number(&value)? as f32,
            "--proxy-lr" => args.tune.proxy_learning_rate = number(&value)? as f32,
            "--scale" => args.tune.scale = number(&value)? as f32,
            "--batch" => args.tune.batch_size = number(&value)? as usize,
            "--seed" => args.tune.seed = number(&value)? as u64,
            "--dropout" => args.tune.input_dropout = number(&value)? as f32,
            "--soup" => args.soup = number(&value)?.max(1.0) as usize,
            "--threads" => args.tune.threads = number(&value)? as usize,
            "--joined-blend" => {
                let parts: Vec<&str> = value.split(',').collect();
                let [head, temperature, neighbours] = parts[..] else {
                    return Err(format!("--joined-blend {value}: expected HEAD,T,K"));
                };
                args.joined_blend = BlendParams {
                    head_weight: number(head)? as f32,
                    temperature: number(temperature)? as f32,
                    neighbours: number(neighbours)? as usize,
                };
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if args.folds < 2 {
        return Err("--folds must be at least 2".into());
    }
    if args.cascade && args.soup > 1 {
        return Err("--cascade scores the one tuned run: leave out --soup".into());
    }
    Ok(args)
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("intent_cv: {message}");
            std::process::exit(2);
        }
    };
    if let Err(message) = run(&args) {
        eprintln!("intent_cv: {message}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    let entries = kb::import_file(&args.kb).map_err(|e| e.to_string())?;
    let mut texts = kb::question_texts(&entries);
    let mut labels = row_labels(entries.iter().map(|entry| entry.questions.len()));
    let classes = entries.len();
    // With --holdout its questions follow the knowledge base's and form the one fold scored.
    let mut folds = assign_folds(&labels, args.folds, args.fold_seed);
    let holdout = match &args.holdout {
        Some(path) => eval::read_labelled(path).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    for query in &holdout {
        let label = entries
            .iter()
            .position(|entry| entry.intent == query.category)
            .ok_or(format!(
                "hold-out intent {} is not in the kb",
                query.category
            ))?;
        texts.push(&query.text);
        labels.push(label as u32);
    }
    if args.holdout.is_some() {
        folds = (0..labels.len())
            .map(|i| usize::from(i < folds.len()))
            .collect();
    }
    let states = frozen_states(args, &texts)?;
    let hidden = 384;
    let base = TopLayers::from_safetensors(
        &args.models.join("model.fp32.safetensors"),
        TUNED_FIRST_LAYER,
        TUNED_LAYER_COUNT,
        TUNED_HEADS,
    )
    .map_err(|e| e.to_string())?;
    println!(
        "{} questions, {classes} intents, {} folds; recipe {:?}",
        texts.len(),
        args.folds,
        args.tune
    );

    let grid = blend_grid();
    let heads = [
        ENGINE_HEAD,
        HeadKind::Regression(1e-4),
        HeadKind::Proxies,
        HeadKind::Mix(1e-5),
    ];
    let companion = if args.companion {
        Some(companion_vectors(args, &texts)?)
    } else {
        None
    };
    let mut variants: Vec<(String, Tally)> = Vec::new();
    let scored_folds = if args.holdout.is_some() {
        1
    } else {
        args.folds
    };
    for fold in 0..scored_folds {
        let train: Vec<usize> = (0..labels.len()).filter(|&i| folds[i] != fold).collect();
        let test: Vec<usize> = (0..labels.len()).filter(|&i| folds[i] == fold).collect();
        let mut score = |name: String, layers: &TopLayers, proxies: Option<&[f32]>| {
            let started = Instant::now();
            let proxies = match proxies {
                Some(p) => Some(proxy_head(p, hidden, classes, args.tune.scale)?),
                None => None,
            };
            let vectors = embed_tuned(layers, &states, args.tune.threads).data;
            let joined = companion.as_ref().map(|companion| {
                let half = std::f32::consts::FRAC_1_SQRT_2;
                let width = companion.len() / labels.len();
                vectors
                    .chunks_exact(hidden)
                    .zip(companion.chunks_exact(width))
                    .flat_map(|(v, c)| v.iter().chain(c).map(move |x| x * half))
                    .collect::<Vec<f32>>()
            });
            let mut sets = vec![(name.clone(), vectors, hidden, proxies.as_ref())];
            if let Some(joined) = joined {
                let width = joined.len() / labels.len();
                sets.push((format!("{name} + companion"), joined, width, None));
            }
            for (name, vectors, dim, proxies) in sets {
                let at = match variants.iter().position(|(n, _)| *n == name) {
                    Some(at) => at,
                    None => {
                        variants.push((name.clone(), Tally::new(&grid, &heads)));
                        variants.len() - 1
                    }
                };
                variants[at].1.score_fold(
                    &vectors,
                    dim,
                    &labels,
                    (&train, &test),
                    classes,
                    &grid,
                    &heads,
                    proxies,
                )?;
            }
            eprintln!(
                "fold {fold} {name}: scored in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            Ok::<(), String>(())
        };
        if args.frozen {
            score("frozen".into(), &base, None)?;
        }
        let sequences: Vec<&[f32]> = train.iter().map(|&i| states[i].as_slice()).collect();
        let train_labels: Vec<usize> = train.iter().map(|&i| labels[i] as usize).collect();
        let mut runs = Vec::new();
        let mut run_proxies: Vec<f32> = Vec::new();
        for run in 0..args.soup {
            let options = TuneOptions {
                seed: args.tune.seed + run as u64,
                ..args.tune.clone()
            };
            let (tuned, report) = finetune::fine_tune(
                base.clone(),
                &sequences,
                &train_labels,
                classes,
                &options,
                &mut |_, _| {},
            )
            .map_err(|e| e.to_string())?;
            eprintln!(
                "fold {fold}: run {run} tuned in {:.1} s, loss {:.4} -> {:.4}",
                report.elapsed.as_secs_f64(),
                report.first_epoch_loss,
                report.last_epoch_loss
            );
            let name = if args.soup == 1 {
                "tuned".to_string()
            } else {
                format!("tuned seed {}", options.seed)
            };
            score(name, &tuned, Some(&report.proxies))?;
            if run_proxies.is_empty() {
                run_proxies = report.proxies;
            } else {
                run_proxies
                    .iter_mut()
                    .zip(&report.proxies)
                    .for_each(|(a, b)| *a += b);
            }
            runs.push(tuned);
        }
        if args.soup > 1 {
            let soup = TopLayers::average(&runs).map_err(|e| e.to_string())?;
            score(format!("soup of {}", args.soup), &soup, Some(&run_proxies))?;
        }
    }
    for (name, tally) in &variants {
        let scored = if args.holdout.is_some() {
            holdout.len()
        } else {
            labels.len()
        };
        tally.print(name, &grid, &heads, scored);
    }
    if let Some(prefix) = &args.export {
        export(prefix, &texts, &labels, &folds, &entries, &variants)
            .map_err(|e| format!("--export {}: {e}", prefix.display()))?;
    }
    if args.cascade {
        let answers = |name: &str, blend: &BlendParams| {
            let cell = grid
                .iter()
                .position(|p| p == blend)
                .ok_or(format!("{blend:?} is not a cell of the grid"))?;
            variants
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, tally)| &tally.answers[cell])
                .ok_or(format!("no {name} variant was scored"))
        };
        print_cascade(
            answers("tuned", &BlendParams::default())?,
            answers("tuned + companion", &args.joined_blend)?,
            &args.joined_blend,
        );
    }
    Ok(())
}

/// Writes `PREFIX.tsv` (row, fold, label, intent, text) and, per variant, the shipped cell's
/// scores of every scored question as little-endian f32 rows (`PREFIX-<variant>.f32`, NaN for
/// a question that was not scored).
fn export(
    prefix: &Path,
    texts: &[&str],
    labels: &[u32],
    folds: &[usize],
    entries: &[kb::Entry],
    variants: &[(String, Tally)],
) -> std::io::Result<()> {
    use std::io::Write;
    let mut tsv = std::io::BufWriter::new(std::fs::File::create(prefix.with_extension("tsv"))?);
    for (row, text) in texts.iter().enumerate() {
        let label = labels[row] as usize;
        let text = text.replace(['\t', '\n'], " ");
        writeln!(
            tsv,
            "{row}\t{}\t{label}\t{}\t{text}",
            folds[row], entries[label].intent
        )?;
    }
    tsv.flush()?;
    let classes = entries.len();
    for (name, tally) in variants {
        let file = format!("{}-{}.f32", prefix.display(), name.replace([' ', '+'], "_"));
        let mut out = std::io::BufWriter::new(std::fs::File::create(file)?);
        for row in 0..texts.len() {
            match tally.shipped_scores.get(row).and_then(Option::as_ref) {
                Some(scores) => scores
                    .iter()
                    .try_for_each(|x| out.write_all(&x.to_le_bytes()))?,
                None => (0..classes).try_for_each(|_| out.write_all(&f32::NAN.to_le_bytes()))?,
            }
        }
        out.flush()?;
    }
    Ok(())
}

/// The cascade's top-1 and answered right per `companion_below`, from the shipped cell's
/// answers of the tuned vectors (the first step) and the `blend` cell's of the joined ones (the
/// escalation).
fn print_cascade(first: &[Option<Answer>], joined: &[Option<Answer>], blend: &BlendParams) {
    println!(
        "\ncascade tuned (shipped cell) -> tuned + companion (head {:.1} T {:.2} k {}): top-1 / answered right / escalated",
        blend.head_weight, blend.temperature, blend.neighbours
    );
    let pairs: Vec<(Answer, Answer)> = first
        .iter()
        .zip(joined)
        .filter_map(|(a, b)| Some(((*a)?, (*b)?)))
        .collect();
    let total = pairs.len() as f64;
    for below in [0.0f32, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 1.0] {
        let (mut top1, mut answered, mut escalated) = (0usize, 0usize, 0usize);
        for (step, companion) in &pairs {
            // As the engine: 1 escalates every query, even a certain one.
            let pick = if below >= 1.0 || step.score < below {
                escalated += 1;
                companion
            } else {
                step
            };
            top1 += usize::from(pick.right);
            answered += usize::from(pick.right && pick.answered);
        }
        println!(
            "companion_below {below:.2}: {top1} ({:.2}%) / {answered} ({:.2}%) / {:.1}%",
            100.0 * top1 as f64 / total,
            100.0 * answered as f64 / total,
            100.0 * escalated as f64 / total
        );
    }
}

/// One question's answer in one cell of the engine's head.
#[derive(Debug, Clone, Copy)]
struct Answer {
    /// The blended score of the best intent (the cascade compares it with `companion_below`).
    score: f32,
    right: bool,
    /// Over the shipped confidence, margin and similarity thresholds.
    answered: bool,
}

/// The frozen layers' output for every question, from `--states` when it holds them.
fn frozen_states(args: &Args, texts: &[&str]) -> Result<Vec<Vec<f32>>, String> {
    if let Some(path) = &args.states {
        if let Ok(bytes) = std::fs::read(path) {
            return decode_states(&bytes, texts.len());
        }
    }
    let started = Instant::now();
    let mut encoder = Encoder::load(
        &args.models.join("model.split.onnx"),
        &args.models.join("tokenizer.json"),
        &args.models.join("libonnxruntime.so"),
        2,
        128,
    )
    .map_err(|e| e.to_string())?;
    let states = encoder
        .inner_states_many(texts, 32, &mut |_| {})
        .map_err(|e| e.to_string())?;
    eprintln!("frozen layers: {:.1} s", started.elapsed().as_secs_f64());
    if let Some(path) = &args.states {
        write_states(path, &states).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(states)
}

fn write_states(path: &Path, states: &[Vec<f32>]) -> std::io::Result<()> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&(states.len() as u64).to_le_bytes());
    for state in states {
        bytes.extend_from_slice(&(state.len() as u64).to_le_bytes());
        bytes.extend_from_slice(bytemuck::cast_slice(state));
    }
    std::fs::write(path, bytes)
}

fn decode_states(bytes: &[u8], expected: usize) -> Result<Vec<Vec<f32>>, String> {
    let mut at = 0;
    let word = |at: &mut usize| -> Result<usize, String> {
        let slice = bytes.get(*at..*at + 8).ok_or("states file is truncated")?;
        *at += 8;
        Ok(u64::from_le_bytes(slice.try_into().expect("8 bytes")) as usize)
    };
    let count = word(&mut at)?;
    if count != expected {
        return Err(format!(
            "states file has {count} questions, the kb {expected}"
        ));
    }
    let mut states = Vec::with_capacity(count);
    for _ in 0..count {
        let len = word(&mut at)?;
        let end = at + 4 * len;
        let slice = bytes.get(at..end).ok_or("states file is truncated")?;
        states.push(
            slice
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect(),
        );
        at = end;
    }
    Ok(states)
}

/// Every question's unit vector from the multilingual companion (`query: ` prefix, as the
/// engine's `[inference] companion_*` keys set it up), cached next to `--states`.
fn companion_vectors(args: &Args, texts: &[&str]) -> Result<Vec<f32>, String> {
    let cache = args.states.as_ref().map(|p| p.with_extension("companion"));
    // multilingual-e5-small's width; a cache of another size (another kb) is recomputed.
    const WIDTH: usize = 384;
    if let Some(bytes) = cache.as_ref().and_then(|p| std::fs::read(p).ok()) {
        if bytes.len() == texts.len() * WIDTH * 4 {
            return Ok(bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect());
        }
    }
    let started = Instant::now();
    let mut encoder = Encoder::load(
        &args.models.join("multilingual-e5-small.onnx"),
        &args.models.join("multilingual-e5-small.tokenizer.json"),
        &args.models.join("libonnxruntime.so"),
        2,
        128,
    )
    .map_err(|e| e.to_string())?
    .with_text_prefix("query: ");
    let embeddings = encoder.encode_many(texts, 32).map_err(|e| e.to_string())?;
    if embeddings.dim != WIDTH {
        return Err(format!(
            "the companion gives {} values, not {WIDTH}",
            embeddings.dim
        ));
    }
    eprintln!("companion: {:.1} s", started.elapsed().as_secs_f64());
    if let Some(path) = &cache {
        std::fs::write(path, bytemuck::cast_slice::<f32, u8>(&embeddings.data))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(embeddings.data)
}

/// Fold of every question: within each intent, a seeded shuffle dealt round-robin.
fn assign_folds(labels: &[u32], folds: usize, seed: u64) -> Vec<usize> {
    let mut by_intent: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for (i, &label) in labels.iter().enumerate() {
        by_intent.entry(label).or_default().push(i);
    }
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut fold_of = vec![0; labels.len()];
    for rows in by_intent.values_mut() {
        for i in (1..rows.len()).rev() {
            let j = (next() % (i as u64 + 1)) as usize;
            rows.swap(i, j);
        }
        for (k, &row) in rows.iter().enumerate() {
            fold_of[row] = k % folds;
        }
    }
    fold_of
}

fn blend_grid() -> Vec<BlendParams> {
    let mut grid = Vec::new();
    for head_weight in [0.0, 0.3, 0.5, 0.7, 1.0] {
        for temperature in [0.02, 0.03, 0.05, 0.08] {
            for neighbours in [5, 10, 20] {
                if head_weight == 1.0 && (temperature != 0.05 || neighbours != 10) {
                    continue;
                }
                grid.push(BlendParams {
                    neighbours,
                    temperature,
                    head_weight,
                });
            }
        }
    }
    grid
}

/// The head of the blend.
#[derive(Debug, Clone, Copy, PartialEq)]
enum HeadKind {
    /// The engine's softmax regression with this L2 penalty.
    Regression(f32),
    /// The fine-tuning's own class proxies: `softmax(scale · q · P_c/‖P_c‖)`.
    Proxies,
    /// The mean of the two heads' probabilities (regression with this L2 penalty).
    Mix(f32),
}

/// Whether this is the shipped cell: the engine's head and its default blend.
fn is_shipped(kind: &HeadKind, params: &BlendParams) -> bool {
    *kind == ENGINE_HEAD && *params == BlendParams::default()
}

/// The engine's head: softmax regression with the default L2 penalty.
const ENGINE_HEAD: HeadKind = HeadKind::Regression(1e-5);

/// The proxies as a softmax-regression head: weights `scale · P_c/‖P_c‖`, no bias.
fn proxy_head(
    proxies: &[f32],
    dim: usize,
    classes: usize,
    scale: f32,
) -> Result<SoftmaxRegression, String> {
    let mut weights = Vec::with_capacity(proxies.len());
    for row in proxies.chunks_exact(dim) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        let k = if norm > 0.0 { scale / norm } else { 0.0 };
        weights.extend(row.iter().map(|v| v * k));
    }
    SoftmaxRegression::from_parts(dim, weights, vec![0.0; classes]).map_err(|e| e.to_string())
}

/// Right answers per (head l2, blend): top-1 and answered right under the shipped thresholds.
struct Tally {
    top1: Vec<Vec<usize>>,
    answered_right: Vec<Vec<usize>>,
    /// Top-1 per fold of every cell.
    per_fold: Vec<Vec<Vec<f64>>>,
    /// Per cell of the engine's head ([`ENGINE_HEAD`]) and question (by row), its answer, once
    /// scored.
    answers: Vec<Vec<Option<Answer>>>,
    /// Per question (by row), the shipped cell's blended scores, once scored (`--export`).
    shipped_scores: Vec<Option<Vec<f32>>>,
}

impl Tally {
    fn new(grid: &[BlendParams], heads: &[HeadKind]) -> Tally {
        Tally {
            top1: vec![vec![0; grid.len()]; heads.len()],
            answered_right: vec![vec![0; grid.len()]; heads.len()],
            per_fold: vec![vec![Vec::new(); grid.len()]; heads.len()],
            answers: vec![Vec::new(); grid.len()],
            shipped_scores: Vec::new(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn score_fold(
        &mut self,
        vectors: &[f32],
        dim: usize,
        labels: &[u32],
        (train, test): (&[usize], &[usize]),
        classes: usize,
        grid: &[BlendParams],
        heads: &[HeadKind],
        proxies: Option<&SoftmaxRegression>,
    ) -> Result<(), String> {
        let train_vectors: Vec<f32> = train
            .iter()
            .flat_map(|&i| vectors[i * dim..(i + 1) * dim].iter().copied())
            .collect();
        let train_labels: Vec<u32> = train.iter().map(|&i| labels[i]).collect();
        // Per test question: its 20 most similar training questions (the engine's scan and
        // top-k), then the vote of every grid cell from them; the same arithmetic as
        // `IntentClassifier::predict`, which would redo the scan per cell.
        let mut similarities = vec![0.0f32; train.len()];
        let neighbours: Vec<Vec<(u32, f32)>> = test
            .iter()
            .map(|&i| {
                row_scores(
                    &train_vectors,
                    &vectors[i * dim..(i + 1) * dim],
                    &mut similarities,
                );
                top_k_of(&similarities, 20)
                    .into_iter()
                    .map(|(row, score)| (train_labels[row], score))
                    .collect()
            })
            .collect();
        let mut probabilities = vec![0.0f32; classes];
        let mut scores = vec![0.0f32; classes];
        let mut right = vec![0usize; grid.len()];
        let mut proxy_probabilities = vec![0.0f32; classes];
        for (h, kind) in heads.iter().enumerate() {
            let regression = match kind {
                HeadKind::Regression(l2) | HeadKind::Mix(l2) => {
                    let options = TrainOptions {
                        l2: *l2,
                        ..TrainOptions::default()
                    };
                    let (head, _) = SoftmaxRegression::train(
                        &train_vectors,
                        dim,
                        &train_labels,
                        classes,
                        &options,
                    )
                    .map_err(|e| e.to_string())?;
                    Some(head)
                }
                HeadKind::Proxies => None,
            };
            // Without proxies (frozen vectors, joined vectors) there is no proxy or mixed head.
            if proxies.is_none() && matches!(kind, HeadKind::Proxies | HeadKind::Mix(_)) {
                continue;
            }
            right.fill(0);
            for (&i, near) in test.iter().zip(&neighbours) {
                let query = &vectors[i * dim..(i + 1) * dim];
                match (&regression, proxies) {
                    (Some(head), Some(proxies)) if matches!(kind, HeadKind::Mix(_)) => {
                        head.probabilities_into(query, &mut probabilities)
                            .map_err(|e| e.to_string())?;
                        proxies
                            .probabilities_into(query, &mut proxy_probabilities)
                            .map_err(|e| e.to_string())?;
                        for (p, q) in probabilities.iter_mut().zip(&proxy_probabilities) {
                            *p = 0.5 * (*p + q);
                        }
                    }
                    (Some(head), _) => head
                        .probabilities_into(query, &mut probabilities)
                        .map_err(|e| e.to_string())?,
                    (None, Some(proxies)) => proxies
                        .probabilities_into(query, &mut probabilities)
                        .map_err(|e| e.to_string())?,
                    (None, None) => unreachable!(),
                }
                let best = near[0].1;
                for (g, params) in grid.iter().enumerate() {
                    scores.fill(0.0);
                    let mut total = 0.0f32;
                    for &(label, score) in near.iter().take(params.neighbours) {
                        let weight = ((score - best) / params.temperature).exp();
                        scores[label as usize] += weight;
                        total += weight;
                    }
                    let vote_weight = (1.0 - params.head_weight) / total;
                    for (score, p) in scores.iter_mut().zip(&probabilities) {
                        *score = *score * vote_weight + params.head_weight * p;
                    }
                    let Prediction {
                        intent,
                        score,
                        second_score: second,
                    } = best_two(&scores);
                    let answered =
                        score >= CONFIDENCE && score - second >= MARGIN && best >= MIN_SIMILARITY;
                    if intent == labels[i] {
                        right[g] += 1;
                        if answered {
                            self.answered_right[h][g] += 1;
                        }
                    }
                    if is_shipped(kind, params) {
                        if self.shipped_scores.len() < labels.len() {
                            self.shipped_scores.resize(labels.len(), None);
                        }
                        self.shipped_scores[i] = Some(scores.clone());
                    }
                    if *kind == ENGINE_HEAD {
                        let answers = &mut self.answers[g];
                        if answers.len() < labels.len() {
                            answers.resize(labels.len(), None);
                        }
                        answers[i] = Some(Answer {
                            score,
                            right: intent == labels[i],
                            answered,
                        });
                    }
                }
            }
            for (g, &r) in right.iter().enumerate() {
                self.top1[h][g] += r;
                self.per_fold[h][g].push(100.0 * r as f64 / test.len() as f64);
            }
        }
        Ok(())
    }

    fn print(&self, name: &str, grid: &[BlendParams], heads: &[HeadKind], total: usize) {
        let mut rows = Vec::new();
        for (h, l2) in heads.iter().enumerate() {
            for (g, params) in grid.iter().enumerate() {
                rows.push((self.top1[h][g], self.answered_right[h][g], l2, params, h, g));
            }
        }
        rows.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
        println!("\n{name}: top-1 / answered right over {total} questions, best first");
        // Then the best cell of each head (skipped heads scored nothing) and the shipped cell.
        let best_per_head = heads.iter().enumerate().filter_map(|(h, _)| {
            rows.iter()
                .find(|r| r.4 == h && r.3.head_weight > 0.0 && r.0 > 0)
        });
        let shipped = rows.iter().filter(|r| is_shipped(r.2, r.3));
        for (top1, answered, l2, p, h, g) in
            rows.iter().take(25).chain(best_per_head).chain(shipped)
        {
            let folds: Vec<String> = self.per_fold[*h][*g]
                .iter()
                .map(|v| format!("{v:.2}"))
                .collect();
            println!(
                "{l2:?} head {:.1} T {:.2} k {:2}: {top1} ({:.2}%) / {answered} ({:.2}%)  [{}]",
                p.head_weight,
                p.temperature,
                p.neighbours,
                100.0 * *top1 as f64 / total as f64,
                100.0 * *answered as f64 / total as f64,
                folds.join(" ")
            );
        }
    }
}
