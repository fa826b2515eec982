//! The per-shard intent engine over the real model and real LMDB replicas: recognition
//! through the hot-query and embedding caches, reload of a new knowledge-base version (a
//! recognition never mixes versions), degradation to the lexical match when the inference
//! queue is overloaded, and a knowledge base embedded by another model.
//!
//! An import while an engine is open runs `switchboard kb import` in its own process, as in
//! production: LMDB lets several processes share a replica, while one process may open an
//! environment only once.
//!
//! The model files must be provisioned first (`models/fetch`, which `scripts/test` runs); set
//! SWITCHBOARD_MODELS_DIR to use another directory.
//!
//! `cargo test --release --test inference -- --ignored --nocapture` measures the worker's
//! throughput one text at a time against batches.

mod common;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::time::{Duration, Instant};

use futures_lite::future::{block_on, poll_once};
use switchboard::engine::encoder::Part;
use switchboard::engine::intent::Cascade;
use switchboard::engine::update::{self, PreparedUpdate};
use switchboard::engine::{
    CacheOutcome, EngineSettings, IntentEngine, IntentResult, ModelSettings, WorkerOptions,
};
use switchboard::kb::{self, Entry};

fn models_dir() -> PathBuf {
    std::env::var_os("SWITCHBOARD_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models/cache"))
}

fn model() -> ModelSettings {
    let dir = models_dir();
    ModelSettings {
        model: dir.join("model.onnx"),
        tokenizer: dir.join("tokenizer.json"),
        ort_library: dir.join("libonnxruntime.so"),
        max_sequence_length: 128,
        text_prefix: String::new(),
        companion: None,
        threads: 1,
    }
}

fn settings(storage: &Path) -> EngineSettings {
    EngineSettings {
        storage_dir: storage.to_path_buf(),
        kb_map_size: kb::DEFAULT_MAP_SIZE,
        model: Some(model()),
        worker: WorkerOptions {
            max_batch: 16,
            batch_window: Duration::from_millis(2),
            max_wait: Duration::from_secs(10),
            queue_capacity: 256,
            metrics: None,
        },
        hot_cache_entries: 64,
        embedding_cache_entries: 64,
        min_similarity: 0.5,
        reload_interval: Duration::ZERO,
        companion_below: 0.4,
        wait_for_models: true,
    }
}

fn entry(id: &str, answer: &str, questions: &[&str]) -> Entry {
    Entry {
        id: id.into(),
        intent: id.into(),
        questions: questions.iter().map(|q| q.to_string()).collect(),
        answer: answer.into(),
        tags: Vec::new(),
    }
}

fn knowledge_base(card_answer: &str) -> Vec<Entry> {
    vec![
        entry(
            "card_arrival",
            card_answer,
            &[
                "I am still waiting on my card?",
                "What can I do if my card still hasn't arrived after 2 weeks?",
                "How long does a card take to arrive?",
                "My card has not been delivered yet",
            ],
        ),
        entry(
            "change_pin",
            "Go to Security, then Change PIN.",
            &[
                "I need to change my PIN",
                "How do I reset my PIN?",
                "Can I change my PIN at an ATM?",
                "I forgot my PIN number",
            ],
        ),
        entry(
            "exchange_rate",
            "We use the interbank rate.",
            &[
                "What is the exchange rate?",
                "Which exchange rate do you use?",
                "How are exchange rates calculated?",
                "What rate do I get when I pay in euros?",
            ],
        ),
    ]
}

/// Embeds and trains once, with the shipped model.
fn prepare(entries: Vec<Entry>) -> PreparedUpdate {
    let mut encoder = model().load().expect("load the model (run models/fetch)");
    update::prepare(entries, &mut encoder, &update::FineTuneSettings::off())
        .expect("prepare the update")
}

/// Stores `prepared` in shard 0's replica, in this process (no engine may have it open).
fn import(storage: &Path, prepared: &PreparedUpdate) -> u64 {
    update::apply(storage, 1, kb::DEFAULT_MAP_SIZE, prepared).expect("apply the update")
}

/// Imports `entries` with `switchboard kb import` (another process) into one shard's replica.
fn import_with_cli(storage: &Path, entries: &[Entry]) {
    let dir = tempfile::tempdir().unwrap();
    let models = models_dir();
    let config = dir.path().join("site.toml");
    std::fs::write(
        &config,
        format!(
            "[shards]\ncores = [0]\n\n[storage]\ndir = {storage:?}\n\n[inference]\nmodel = {:?}\ntokenizer = {:?}\nort_library = {:?}\n",
            models.join("model.onnx"),
            models.join("tokenizer.json"),
            models.join("libonnxruntime.so"),
        ),
    )
    .unwrap();
    let file = dir.path().join("kb.json");
    std::fs::write(&file, kb::export_json(entries)).unwrap();
    common::kb_import(&config, &file);
}

fn recognise(engine: &IntentEngine, text: &str) -> IntentResult {
    block_on(engine.recognise(text)).unwrap_or_else(|| panic!("no match for {text:?}"))
}

#[test]
fn recognition_goes_through_the_caches_and_follows_new_versions() {
    let dir = tempfile::tempdir().unwrap();
    let engine = IntentEngine::open(&settings(dir.path()), 0, 0).expect("open the engine");
    assert_eq!(engine.version(), None);
    assert_eq!(block_on(engine.recognise("where is my card")), None);

    import_with_cli(
        dir.path(),
        &knowledge_base("Cards arrive within 5 working days."),
    );
    swap_in_new_version(&engine);
    let found = recognise(&engine, "my new card still has not arrived");
    assert_eq!(
        (
            found.version,
            found.intent.as_str(),
            found.cache,
            found.degraded
        ),
        (1, "card_arrival", CacheOutcome::Miss, false)
    );
    assert_eq!(found.answer, "Cards arrive within 5 working days.");
    assert!(
        found.score > 0.5 && found.second_score < found.score,
        "{found:?}"
    );
    let other = recognise(&engine, "how do I set a new PIN");
    assert_eq!(other.intent, "change_pin");
    assert!(other.similarity.unwrap() >= 0.5, "{other:?}");
    // With three entries the classifier alone is sure of something even for an unrelated
    // message; its distance to every question gives it away.
    let unrelated = recognise(&engine, "what's the weather like on mars tomorrow?");
    assert!(unrelated.similarity.unwrap() < 0.5, "{unrelated:?}");
    assert_eq!((unrelated.score, unrelated.second_score), (0.0, 0.0));

    // The same question with other spacing and case is a hot-cache hit.
    let again = recognise(&engine, "  My new card STILL has not   arrived ");
    assert_eq!(again.cache, CacheOutcome::HotHit);
    assert_eq!((again.entry, again.score), (found.entry, found.score));

    // A new version empties the hot cache but keeps the embeddings.
    import_with_cli(dir.path(), &knowledge_base("Your card is on its way."));
    swap_in_new_version(&engine);
    let reloaded = recognise(&engine, "my new card still has not arrived");
    assert_eq!(
        (reloaded.version, reloaded.cache),
        (2, CacheOutcome::EmbeddingHit)
    );
    assert_eq!(reloaded.answer, "Your card is on its way.");

    let stats = engine.stats();
    assert_eq!(stats.version, Some(2));
    assert_eq!(stats.reloads, 2);
    assert_eq!((stats.hot_cache.hits, stats.embedding_cache.hits), (1, 1));
    assert_eq!(stats.degraded, 0);
    assert_eq!(stats.worker.unwrap().embedded, 3);
}

/// Polls as a shard does (`reload_interval` is zero here) until the version imported a moment
/// ago is swapped in. The first poll only starts loading it on a `kb-load` thread: the
/// shard's loop never waits for a load, and the loaded version answers meanwhile.
fn swap_in_new_version(engine: &IntentEngine) {
    let before = engine.version();
    assert!(!engine.maybe_reload(), "the first poll loaded on the shard");
    assert_eq!(engine.version(), before);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !engine.maybe_reload() {
        assert!(
            Instant::now() < deadline,
            "the new version was never swapped in"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_ne!(engine.version(), before);
}

/// A version a background load finished after a newer one was loaded on the spot (the admin
/// API's try does that) is dropped: the engine never goes back to an older version.
#[test]
fn a_background_load_overtaken_by_a_newer_version_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    import(dir.path(), &prepare(knowledge_base("first answer")));
    let engine = IntentEngine::open(&settings(dir.path()), 0, 0).unwrap();
    import_with_cli(dir.path(), &knowledge_base("second answer"));
    // The poll starts loading version 2 off the calling thread; a small knowledge base loads
    // in milliseconds, so after two seconds its result waits to be swapped in.
    assert!(!engine.maybe_reload());
    std::thread::sleep(Duration::from_secs(2));
    import_with_cli(dir.path(), &knowledge_base("third answer"));
    assert!(engine.reload().unwrap());
    assert_eq!(engine.version(), Some(3));
    for _ in 0..50 {
        assert!(!engine.maybe_reload());
        assert_eq!(engine.version(), Some(3), "went back to an older version");
        std::thread::sleep(Duration::from_millis(10));
    }
    let found = recognise(&engine, "my new card still has not arrived");
    assert_eq!((found.version, found.answer.as_str()), (3, "third answer"));
}

#[test]
fn a_recognition_in_flight_during_an_update_sees_one_version() {
    let dir = tempfile::tempdir().unwrap();
    import(dir.path(), &prepare(knowledge_base("old answer")));
    let mut settings = settings(dir.path());
    settings.hot_cache_entries = 0;
    let engine = IntentEngine::open(&settings, 0, 0).unwrap();
    assert_eq!(engine.version(), Some(1));

    // Start a recognition: it takes the loaded version and waits for the worker.
    let mut pending = pin!(engine.recognise("where is my card? it never came"));
    assert!(block_on(poll_once(pending.as_mut())).is_none());
    // Meanwhile a new version lands and the engine switches to it.
    import_with_cli(dir.path(), &knowledge_base("new answer"));
    assert!(engine.reload().unwrap());
    assert_eq!(engine.version(), Some(2));
    let old = block_on(pending).unwrap();
    assert_eq!(
        (old.version, old.answer.as_str()),
        (1, "old answer"),
        "{old:?}"
    );
    let new = recognise(&engine, "where is my card? it never came");
    assert_eq!((new.version, new.answer.as_str()), (2, "new answer"));
}

/// Polls every future once (so all are submitted together), then waits for each.
fn run_together<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures
        .iter_mut()
        .map(|future| block_on(poll_once(future.as_mut())))
        .collect();
    for (output, future) in outputs.iter_mut().zip(futures) {
        if output.is_none() {
            *output = Some(block_on(future));
        }
    }
    outputs.into_iter().map(Option::unwrap).collect()
}

#[test]
fn an_overloaded_worker_degrades_to_the_lexical_match() {
    let dir = tempfile::tempdir().unwrap();
    import(dir.path(), &prepare(knowledge_base("on its way")));
    let mut settings = settings(dir.path());
    settings.worker = WorkerOptions {
        max_batch: 1,
        batch_window: Duration::ZERO,
        max_wait: Duration::from_secs(10),
        queue_capacity: 1,
        metrics: None,
    };
    settings.hot_cache_entries = 0;
    settings.embedding_cache_entries = 0;
    let engine = IntentEngine::open(&settings, 0, 0).unwrap();
    let texts: Vec<String> = (0..12)
        .map(|i| format!("how do I change my PIN number, attempt {i}"))
        .collect();
    let results = run_together(texts.iter().map(|text| engine.recognise(text)).collect());
    let degraded: Vec<&IntentResult> = results
        .iter()
        .flatten()
        .filter(|result| result.degraded)
        .collect();
    assert!(degraded.len() >= 8, "{results:?}");
    assert!(results.iter().flatten().any(|result| !result.degraded));
    for result in results.iter().flatten() {
        assert_eq!(result.intent, "change_pin", "{result:?}");
        assert!((0.0..=1.0).contains(&result.score) && result.second_score <= result.score);
    }
    let stats = engine.stats();
    assert_eq!(stats.degraded, degraded.len() as u64);
    assert_eq!(stats.worker.unwrap().overloaded, degraded.len() as u64);
    // A degraded match of a text sharing no word with the knowledge base is no match.
    let lexical = engine.recognise_lexically("zebra xylophone");
    assert_eq!(lexical, None);
}

#[test]
fn a_knowledge_base_embedded_by_another_model_is_only_matched_lexically() {
    let dir = tempfile::tempdir().unwrap();
    let mut prepared = prepare(knowledge_base("on its way"));
    prepared.model_fingerprint = "another-model sha256:0000".into();
    import(dir.path(), &prepared);
    let engine = IntentEngine::open(&settings(dir.path()), 0, 0).unwrap();
    let result = recognise(&engine, "what exchange rate will I get");
    assert!(result.degraded, "{result:?}");
    assert_eq!(result.intent, "exchange_rate");
    assert_eq!(engine.stats().worker.unwrap().embedded, 0);
}

fn holdout_texts(count: usize) -> Vec<String> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/banking77/holdout.csv"),
    )
    .unwrap();
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    reader
        .records()
        .take(count)
        .map(|record| record.unwrap()[0].to_string())
        .collect()
}

/// Throughput of the worker (embedding only): one text at a time against batches of 16
/// submitted together. Prints; run with `--release --ignored --nocapture`.
#[test]
#[ignore = "measurement"]
fn measure_worker_throughput() {
    use switchboard::engine::InferenceWorker;
    let texts = holdout_texts(480);
    let worker = InferenceWorker::start(
        0,
        0,
        model().load().unwrap(),
        WorkerOptions {
            max_batch: 16,
            batch_window: Duration::from_millis(2),
            max_wait: Duration::from_secs(60),
            queue_capacity: 1024,
            metrics: None,
        },
    )
    .unwrap();
    for text in texts.iter().take(20) {
        block_on(worker.embed(text)).unwrap();
    }
    let started = Instant::now();
    for text in &texts {
        block_on(worker.embed(text)).unwrap();
    }
    let single = texts.len() as f64 / started.elapsed().as_secs_f64();
    let batches_before = worker.stats().batches;
    let started = Instant::now();
    for chunk in texts.chunks(16) {
        let futures: Vec<_> = chunk.iter().map(|text| worker.embed(text)).collect();
        for future in futures {
            block_on(future).unwrap();
        }
    }
    let batched = texts.len() as f64 / started.elapsed().as_secs_f64();
    let batches = worker.stats().batches - batches_before;
    println!(
        "worker throughput over {} hold-out questions: one at a time {single:.0} texts/s; \
         16 submitted together {batched:.0} texts/s ({:.2}x, {batches} model calls)",
        texts.len(),
        batched / single
    );
}

fn with_companion() -> ModelSettings {
    let dir = models_dir();
    ModelSettings {
        companion: Some(switchboard::engine::intent::CompanionSettings {
            model: dir.join("multilingual-e5-small.onnx"),
            tokenizer: dir.join("multilingual-e5-small.tokenizer.json"),
            text_prefix: "query: ".into(),
        }),
        ..model()
    }
}

/// The test knowledge base embedded by the primary model and the companion (joined vectors).
fn prepare_with_companion() -> PreparedUpdate {
    let mut encoder = with_companion().load().expect("load both models");
    update::prepare(
        knowledge_base("Cards arrive soon."),
        &mut encoder,
        &update::FineTuneSettings::off(),
    )
    .unwrap()
}

/// With a companion, the primary model answers alone when it is sure enough
/// (`companion_below`), and both models decide otherwise; the knowledge base stores the head
/// of each step.
#[test]
fn the_cascade_runs_the_companion_only_below_the_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let prepared = prepare_with_companion();
    assert_eq!(prepared.dim, 768);
    let (full, primary) =
        switchboard::engine::classifier::SoftmaxRegression::heads_from_bytes(&prepared.head)
            .unwrap();
    assert_eq!((full.dim(), primary.map(|h| h.dim())), (768, Some(384)));
    import(dir.path(), &prepared);
    let questions = [
        ("my card has still not come", "card_arrival"),
        ("I want a new PIN", "change_pin"),
        ("what rate do you use for dollars", "exchange_rate"),
    ];
    let mut escalated = Vec::new();
    for below in [0.0f32, 1.01] {
        let mut settings = settings(dir.path());
        settings.model = Some(with_companion());
        settings.companion_below = below;
        settings.hot_cache_entries = 0;
        let engine = IntentEngine::open(&settings, 0, 0).unwrap();
        assert!(engine.model_fingerprint().unwrap().contains(" + "));
        for (text, intent) in questions {
            let result = recognise(&engine, text);
            assert_eq!(
                result.intent, intent,
                "{text:?} with companion_below {below}"
            );
            assert!(!result.degraded);
        }
        escalated.push(engine.stats().escalated);
    }
    assert_eq!(escalated, vec![0, questions.len() as u64]);
}

/// A gray-release variant's `model` overrides the cascade per call: `Cascade::PrimaryOnly` never
/// runs the companion, even where the configured cascade always would, and `Cascade::Always`
/// runs it on every query, even where the configured cascade never would. Each setting has its
/// own hot-cache entries: a result computed with one is never served to another.
#[test]
fn a_variants_model_overrides_the_cascade_per_call() {
    let dir = tempfile::tempdir().unwrap();
    let prepared = prepare_with_companion();
    import(dir.path(), &prepared);
    let questions = [
        ("my card has still not come", "card_arrival"),
        ("I want a new PIN", "change_pin"),
        ("what rate do you use for dollars", "exchange_rate"),
    ];
    let n = questions.len() as u64;
    let open = |below: f32| {
        let mut settings = settings(dir.path());
        settings.model = Some(with_companion());
        settings.companion_below = below;
        IntentEngine::open(&settings, 0, 0).unwrap()
    };
    // (escalated, texts embedded by the worker) so far.
    let counters = |engine: &IntentEngine| {
        let stats = engine.stats();
        (stats.escalated, stats.worker.unwrap().embedded)
    };
    let run = |engine: &IntentEngine, cascade: Cascade| -> Vec<CacheOutcome> {
        questions
            .iter()
            .map(|(text, intent)| {
                let result = block_on(engine.recognise_with(text, cascade))
                    .unwrap_or_else(|| panic!("no match for {text:?}"));
                assert_eq!(result.intent, *intent, "{text:?} with {cascade:?}");
                assert!(!result.degraded);
                result.cache
            })
            .collect()
    };

    // The configured cascade escalates every query; "primary" never does.
    let always_escalates = open(1.01);
    let caches = run(&always_escalates, Cascade::PrimaryOnly);
    assert_eq!(caches, [CacheOutcome::Miss; 3]);
    assert_eq!(
        counters(&always_escalates),
        (0, n),
        "the primary model alone, one text per query"
    );
    // The configured setting is not answered from the primary-only results.
    let caches = run(&always_escalates, Cascade::Configured);
    assert_eq!(caches, [CacheOutcome::EmbeddingHit; 3]);
    assert_eq!(counters(&always_escalates), (n, 2 * n));
    // Each setting's own hot entries answer it again, without a model.
    assert_eq!(
        run(&always_escalates, Cascade::PrimaryOnly),
        [CacheOutcome::HotHit; 3]
    );
    assert_eq!(counters(&always_escalates), (n, 2 * n));
    drop(always_escalates);

    // The configured cascade never escalates; "companion" always does.
    let never_escalates = open(0.0);
    assert_eq!(
        run(&never_escalates, Cascade::Configured),
        [CacheOutcome::Miss; 3]
    );
    assert_eq!(counters(&never_escalates), (0, n));
    let caches = run(&never_escalates, Cascade::Always);
    assert_eq!(caches, [CacheOutcome::EmbeddingHit; 3]);
    assert_eq!(
        counters(&never_escalates),
        (n, 2 * n),
        "the companion on every query (the primary vectors came from the embedding cache)"
    );
    assert_eq!(
        run(&never_escalates, Cascade::Always),
        [CacheOutcome::HotHit; 3]
    );
    assert_eq!(
        run(&never_escalates, Cascade::Configured),
        [CacheOutcome::HotHit; 3]
    );
    assert_eq!(counters(&never_escalates), (n, 2 * n));
}

/// A server opens its engine without waiting for the model: a question asked meanwhile is
/// answered lexically (degraded), never lost, and the model answers once it is loaded.
#[test]
fn questions_asked_while_the_models_load_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    import(dir.path(), &prepare(knowledge_base("Cards arrive soon.")));
    let mut settings = settings(dir.path());
    settings.wait_for_models = false;
    settings.hot_cache_entries = 0;
    let opened = Instant::now();
    let engine = IntentEngine::open(&settings, 0, 0).unwrap();
    let open_time = opened.elapsed();
    let first = recognise(&engine, "How do I reset my PIN?");
    assert_eq!(first.intent, "change_pin");
    let worker = engine.worker().unwrap();
    assert!(
        first.degraded || worker.primary().is_some(),
        "a model answer before the model was loaded: {first:?}"
    );
    assert!(
        worker.wait_loaded(Duration::from_secs(60)),
        "the model loads"
    );
    assert_eq!(worker.load_error(), None);
    let later = recognise(&engine, "How do I reset my PIN?");
    assert!(!later.degraded, "{later:?}");
    assert_eq!(later.intent, "change_pin");
    eprintln!(
        "open {open_time:?}, primary ready after {:?}",
        worker.primary().unwrap().load_time
    );
    // A missing model file is still an error at open.
    settings.model = Some(ModelSettings {
        model: dir.path().join("missing.onnx"),
        ..model()
    });
    assert!(IntentEngine::open(&settings, 0, 0).is_err());
}

/// Fine-tuning with a companion: the import stores tuned primary vectors joined with the
/// companion's, and a primary head as wide as the tuned layer; the cascade's first step embeds
/// each query with the tuned layer. A stored question asked word for word with the primary
/// model alone matches its own row exactly, which its untuned embedding does not.
#[test]
fn with_a_companion_the_first_step_embeds_with_the_tuned_layer() {
    let dir = tempfile::tempdir().unwrap();
    let models = ModelSettings {
        model: models_dir().join("model.split.onnx"),
        ..with_companion()
    };
    let mut encoder = models.load().expect("load both models");
    let fine_tune = update::FineTuneSettings {
        enabled: true,
        weights: models_dir().join("model.fp32.safetensors"),
        epochs: 20,
        min_questions: 1,
        threads: 1,
    };
    let entries = knowledge_base("Cards arrive soon.");
    let question = entries[0].questions[0].clone();
    let prepared = update::prepare(entries, &mut encoder, &fine_tune).expect("tune and embed");
    assert!(
        matches!(prepared.fine_tune, update::FineTuneOutcome::Tuned { .. }),
        "{:?}",
        prepared.fine_tune
    );
    assert_eq!(prepared.dim, 768);
    let fingerprint = &prepared.model_fingerprint;
    let (primary_part, companion_part) = fingerprint.split_once(" + ").expect("joined");
    assert!(primary_part.contains(" tuned:"), "{fingerprint}");
    assert!(companion_part.starts_with("multilingual-e5-small.onnx"));
    let (heads, layers) = switchboard::engine::trained::decode(&prepared.head).unwrap();
    assert!(layers.is_some(), "the tuned layer is stored with the heads");
    let (full, primary) =
        switchboard::engine::classifier::SoftmaxRegression::heads_from_bytes(heads).unwrap();
    assert_eq!((full.dim(), primary.map(|h| h.dim())), (768, Some(384)));

    // The question's stored primary part (a unit vector once scaled back by √2) is not what
    // the untuned model gives for it: the check below can tell the two apart.
    let stored: Vec<f32> = prepared.vectors[..384]
        .iter()
        .map(|x| x * std::f32::consts::SQRT_2)
        .collect();
    let mut untuned = Vec::new();
    encoder
        .encode_part_into(&[question.as_str()], Part::Primary, &mut untuned)
        .unwrap();
    let untuned_cosine: f32 = stored.iter().zip(&untuned).map(|(a, b)| a * b).sum();
    assert!(
        untuned_cosine < 0.999,
        "tuning moved the question's vector too little to test: cosine {untuned_cosine}"
    );
    drop(encoder);

    import(dir.path(), &prepared);
    let mut settings = settings(dir.path());
    settings.model = Some(models);
    let engine = IntentEngine::open(&settings, 0, 0).unwrap();
    let result =
        block_on(engine.recognise_with(&question, Cascade::PrimaryOnly)).expect("a model answer");
    assert_eq!(result.intent, "card_arrival");
    assert!(!result.degraded);
    let similarity = result.similarity.expect("a model similarity");
    assert!(
        similarity > 0.9999,
        "the first step must embed with the tuned layer: similarity {similarity} (untuned {untuned_cosine})"
    );
    assert_eq!(engine.stats().escalated, 0);
    // The configured cascade answers it too.
    let result = recognise(&engine, &question);
    assert_eq!(result.intent, "card_arrival");
    eprintln!("untuned cosine {untuned_cosine}, tuned similarity {similarity}");
}
