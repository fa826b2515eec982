//! The knowledge-base commands through the real binary, the real model and real LMDB
//! replicas: `kb import` (CSV and JSON), `kb list`, `kb export`, `kb eval`.
//!
//! The model files must be provisioned first (`models/fetch`, which `scripts/test` runs); set
//! SWITCHBOARD_MODELS_DIR to use another directory. The BANKING77 test embeds the committed
//! 9,000-question knowledge base once (about 40 s) and evaluates the committed hold-out.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::BIN;

fn models_dir() -> PathBuf {
    std::env::var_os("SWITCHBOARD_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models/cache"))
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/banking77")
        .join(name)
}

/// A temporary directory with a configuration whose storage lives inside it.
struct Site {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Site {
    fn new() -> Site {
        Site::with_model(&models_dir().join("model.onnx"))
    }

    fn with_model(model: &Path) -> Site {
        let dir = tempfile::tempdir().expect("temporary directory");
        let models = models_dir();
        for file in ["model.onnx", "tokenizer.json", "libonnxruntime.so"] {
            assert!(
                models.join(file).is_file(),
                "{} is missing: run models/fetch before these tests",
                models.join(file).display()
            );
        }
        let config = dir.path().join("site.toml");
        let text = format!(
            "[storage]\ndir = {:?}\n\n[inference]\nmodel = {:?}\ntokenizer = {:?}\nort_library = {:?}\n",
            dir.path().join("data"),
            model,
            models.join("tokenizer.json"),
            models.join("libonnxruntime.so"),
        );
        std::fs::write(&config, text).expect("write the configuration");
        Site { dir, config }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).expect("write a test file");
        path
    }

    /// Runs `switchboard kb <args> --config <site.toml>`.
    fn kb(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("kb")
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run switchboard")
    }

    fn kb_ok(&self, args: &[&str]) -> String {
        let output = self.kb(args);
        assert!(
            output.status.success(),
            "kb {args:?} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("UTF-8 output")
    }

    fn export(&self) -> String {
        self.kb_ok(&["export"])
    }
}

/// The first line of `kb list`: "version N: ...".
fn listed_version(listing: &str) -> u64 {
    let first = listing.lines().next().unwrap_or_default();
    first
        .strip_prefix("version ")
        .and_then(|rest| rest.split(':').next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no version line in:\n{listing}"))
}

/// Three intents of BANKING77 with three questions each and explicit answers.
const SMALL_CSV: &str = "text,category,answer
I am still waiting on my card?,card_arrival,Cards arrive within 5 working days.
What can I do if my card still hasn't arrived after 2 weeks?,card_arrival,
How long does a card take to arrive?,card_arrival,
I need to change my PIN,change_pin,\"Go to Security, then Change PIN.\"
How do I reset my PIN?,change_pin,
Can I change my PIN at an ATM?,change_pin,
What is the exchange rate?,exchange_rate,We use the interbank rate.
Which exchange rate do you use?,exchange_rate,
How are exchange rates calculated?,exchange_rate,
";

#[test]
fn banking77_imports_lists_and_evaluates_above_the_target() {
    let site = Site::new();
    let import = site.kb_ok(&["import", data("kb.csv").to_str().unwrap()]);
    assert!(
        import.contains("77 entries, 9000 questions"),
        "import output:\n{import}"
    );
    assert!(import.contains("stored version 1 in"), "{import}");

    let listing = site.kb_ok(&["list"]);
    assert_eq!(listed_version(&listing), 1);
    assert!(
        listing
            .lines()
            .next()
            .unwrap()
            .contains("77 entries, 9000 questions"),
        "{listing}"
    );
    // The version line, the column header, then one line per entry.
    assert_eq!(listing.lines().count(), 2 + 77, "{listing}");
    assert!(listing
        .lines()
        .any(|line| line.starts_with("card_arrival ")));

    let report = site.kb_ok(&["eval", data("holdout.csv").to_str().unwrap()]);
    eprintln!("{report}");
    let accuracy: f64 = report
        .lines()
        .find_map(|line| line.strip_prefix("accuracy: "))
        .and_then(|rest| rest.split('%').next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no accuracy line in:\n{report}"));
    assert!(
        accuracy >= 92.0,
        "accuracy {accuracy}% is below the 92% target:\n{report}"
    );
    for expected in [
        "queries: 1003 from",
        "fallback rate: ",
        "latency per query, one at a time: p50 ",
        "per intent: 77 intents",
        "degraded (lexical) recognitions: 0",
    ] {
        assert!(report.contains(expected), "{expected:?} missing:\n{report}");
    }
}

#[test]
fn export_round_trips_through_import() {
    let site = Site::new();
    let csv = site.write("small.csv", SMALL_CSV);
    site.kb_ok(&["import", csv.to_str().unwrap()]);
    let first = site.export();
    let entries: serde_json::Value = serde_json::from_str(&first).expect("the export is JSON");
    let entries = entries.as_array().expect("an array of entries");
    assert_eq!(entries.len(), 3);
    assert_eq!(entries[1]["id"], "change_pin");
    assert_eq!(entries[1]["answer"], "Go to Security, then Change PIN.");
    assert_eq!(entries[0]["questions"].as_array().unwrap().len(), 3);

    // The export, imported again, is a new version with the same content.
    let exported = site.path("export.json");
    let output = site.kb(&["export", "--output", exported.to_str().unwrap()]);
    assert!(output.status.success());
    assert_eq!(std::fs::read_to_string(&exported).unwrap(), first);
    site.kb_ok(&["import", exported.to_str().unwrap()]);
    assert_eq!(listed_version(&site.kb_ok(&["list"])), 2);
    assert_eq!(site.export(), first);
}

#[test]
fn a_malformed_file_reports_every_problem_by_line_and_keeps_the_current_version() {
    let site = Site::new();
    let csv = site.write("small.csv", SMALL_CSV);
    site.kb_ok(&["import", csv.to_str().unwrap()]);
    let before = site.export();

    let bad = site.write(
        "bad.csv",
        "text,category\nwhere is my card?,card_arrival\n,card_arrival\nnew pin please\nrate?,exchange_rate\n\"unclosed,exchange_rate\n",
    );
    let output = site.kb(&["import", bad.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    for line in ["line 3:", "line 4:", "line 6:"] {
        assert!(stderr.contains(line), "{line} missing from:\n{stderr}");
    }
    assert!(stderr.contains("nothing imported"), "{stderr}");
    assert!(
        !String::from_utf8_lossy(&output.stdout).contains("embedded"),
        "nothing may be embedded for a malformed file"
    );
    assert_eq!(listed_version(&site.kb_ok(&["list"])), 1);
    assert_eq!(site.export(), before);

    let bad_json = site.write(
        "bad.json",
        "[\n  {\"id\": \"a\", \"questions\": [\"q\"], \"answer\": \"x\"},\n  {\"id\": \"a\", \"questions\": [], \"answer\": \"y\"}\n]\n",
    );
    let output = site.kb(&["import", bad_json.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("line 3"));
    assert_eq!(site.export(), before);
}

#[test]
fn missing_model_files_and_an_empty_knowledge_base_are_explained() {
    let site = Site::with_model(Path::new("/nonexistent/model.onnx"));
    let csv = site.write("small.csv", SMALL_CSV);
    let output = site.kb(&["import", csv.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/model.onnx"), "{stderr}");
    assert!(stderr.contains("run models/fetch"), "{stderr}");

    for args in [&["list"][..], &["export"][..]] {
        let output = site.kb(args);
        assert_eq!(output.status.code(), Some(1), "kb {args:?}: {output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("no knowledge base has been imported"),
            "{stderr}"
        );
    }
    let output = site.kb(&["eval", csv.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("run models/fetch"));
}

#[test]
fn a_knowledge_base_the_tokenizer_cannot_read_is_warned_about_with_figures() {
    let site = Site::new();
    // The shipped Chinese FAQ set with the English profile: most characters are [UNK].
    let chinese = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/zh_faq/kb.csv");
    let output = site.kb(&["import", chinese.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "a warning does not stop the import"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("warning: "), "{stderr}");
    assert!(
        stderr.contains("of the knowledge base's tokens (") && stderr.contains("in 125 questions"),
        "{stderr}"
    );
    assert!(stderr.contains("--profile multilingual"), "{stderr}");
    assert!(stderr.contains("text_prefix = \"query: \""), "{stderr}");
    // The lexical fallback still tells Chinese questions apart (characters and bigrams).
    let holdout = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/zh_faq/holdout.csv");
    let report = site.kb_ok(&["eval", "--lexical", holdout.to_str().unwrap()]);
    let top1: f64 = report
        .lines()
        .find_map(|line| line.strip_prefix("top-1 before thresholds: "))
        .and_then(|rest| rest.trim_end_matches('%').parse().ok())
        .unwrap_or_else(|| panic!("no top-1 line in:\n{report}"));
    assert!(
        top1 >= 80.0,
        "lexical top-1 {top1}% on the Chinese hold-out:\n{report}"
    );

    // An English knowledge base gets no warning.
    let csv = site.write("small.csv", SMALL_CSV);
    let output = site.kb(&["import", csv.to_str().unwrap()]);
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("warning"), "{stderr}");
}

/// `kb import` draws a progress bar on stderr (one line per tenth when stderr is not a
/// terminal), and `[inference] companion_model` joins a second model's vectors to the first's:
/// the import reports both models and twice the width, and `kb eval` answers through both.
#[test]
fn an_import_shows_its_progress_and_a_companion_model_joins_the_vectors() {
    let site = Site::new();
    let csv = site.write("small.csv", SMALL_CSV);
    let output = site.kb(&["import", csv.to_str().unwrap()]);
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("embedding [##############################] 9/9 100%"),
        "{stderr}"
    );
    assert!(stderr.trim_end().ends_with("done"), "{stderr}");

    // Half a companion is a configuration error (exit 2), naming the missing key.
    let models = models_dir();
    let base = std::fs::read_to_string(&site.config).unwrap();
    let half = format!(
        "{base}companion_model = {:?}\n",
        models.join("multilingual-e5-small.onnx")
    );
    std::fs::write(&site.config, &half).unwrap();
    let output = site.kb(&["import", csv.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("inference.companion_tokenizer"), "{stderr}");

    let full = format!(
        "{half}companion_tokenizer = {:?}\ncompanion_text_prefix = \"query: \"\n",
        models.join("multilingual-e5-small.tokenizer.json")
    );
    std::fs::write(&site.config, full).unwrap();
    let import = site.kb_ok(&["import", csv.to_str().unwrap()]);
    assert!(import.contains("(768 dimensions"), "{import}");
    assert!(
        import.contains(" + multilingual-e5-small.onnx sha256:"),
        "{import}"
    );
    let queries = site.write(
        "queries.csv",
        "text,category\nmy card has not arrived yet,card_arrival\nhow can I change my pin,change_pin\n",
    );
    let report = site.kb_ok(&["eval", queries.to_str().unwrap()]);
    assert!(
        report.contains("top-1 before thresholds: 100.00%"),
        "{report}"
    );
    let cascade_line = |report: &str| -> String {
        report
            .lines()
            .find(|line| line.starts_with("companion cascade:"))
            .unwrap_or_else(|| panic!("no cascade line:\n{report}"))
            .to_owned()
    };
    let node_cascade = cascade_line(&report);

    // Variants that choose an encoder get a table row each, recognised again with it; the
    // cascade's figure stays the node's (the "companion" variant's own escalations not in it).
    let variants = "\n[bot]\nconfidence_threshold = 0.4\nmargin_threshold = 0.0\n\
        [[bot.variants]]\nname = \"english\"\nweight = 1\nmodel = \"primary\"\n\
        [[bot.variants]]\nname = \"multilingual\"\nweight = 1\nmodel = \"companion\"\n";
    let with_variants = std::fs::read_to_string(&site.config).unwrap() + variants;
    std::fs::write(&site.config, with_variants).unwrap();
    let report = site.kb_ok(&["eval", queries.to_str().unwrap()]);
    for (name, model) in [("english", "primary"), ("multilingual", "companion")] {
        let row = report
            .lines()
            .find(|line| line.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name}:\n{report}"));
        assert!(
            row.contains(&format!(" {model} ")) && row.contains("100.00%"),
            "{row}"
        );
    }
    assert_eq!(cascade_line(&report), node_cascade);
}

/// With `[[bot.variants]]`, `kb eval` ends with a line per variant: its handlers and thresholds
/// applied to the same recognitions, so a stricter margin answers less and an echo chain answers
/// everything, never with the right intent.
#[test]
fn kb_eval_reports_every_gray_release_variant() {
    let site = Site::new();
    let csv = site.write("small.csv", SMALL_CSV);
    site.kb_ok(&["import", csv.to_str().unwrap()]);
    let queries = site.write(
        "queries.csv",
        "text,category\nmy card has not arrived yet,card_arrival\nhow can I change my pin,change_pin\n\
         what's the weather like on mars tomorrow?,(none)\n",
    );
    let plain = site.kb_ok(&["eval", queries.to_str().unwrap()]);
    assert!(!plain.contains("gray-release variants"), "{plain}");
    let base = std::fs::read_to_string(&site.config).unwrap();
    let variants = "\n[bot]\nconfidence_threshold = 0.4\n\
        [[bot.variants]]\nname = \"control\"\nweight = 80\n\
        [[bot.variants]]\nname = \"strict\"\nweight = 10\nmargin_threshold = 1.0\n\
        [[bot.variants]]\nname = \"echo\"\nweight = 10\nhandlers = [\"echo\"]\n";
    std::fs::write(&site.config, format!("{base}{variants}")).unwrap();
    let report = site.kb_ok(&["eval", queries.to_str().unwrap()]);
    let row = |name: &str| -> Vec<String> {
        report
            .lines()
            .find(|line| line.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name}:\n{report}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    // variant, model, share, answered, right of answered, accuracy, fallbacks, handoffs,
    // off-topic
    assert_eq!(
        row("control")[1..7],
        ["node", "80.0%", "100.00%", "100.00%", "100.00%", "0"]
    );
    assert_eq!(
        row("strict")[1..7],
        ["node", "10.0%", "0.00%", "0.00%", "0.00%", "2"]
    );
    assert_eq!(
        row("echo")[1..6],
        ["node", "10.0%", "100.00%", "0.00%", "0.00%"]
    );
    assert_eq!(
        row("echo")[8..],
        ["0", "of", "1"],
        "echo answers off-topic too"
    );
}

/// The BANKING77 hold-out rows of `intents` as a `kb eval` CSV.
fn holdout_of(intents: &[&str]) -> String {
    let source = std::fs::read_to_string(data("holdout.csv")).expect("the committed hold-out");
    let mut csv = String::from("text,category\n");
    for line in source.lines().skip(1) {
        if let Some((_, category)) = line.rsplit_once(',') {
            if intents.contains(&category) {
                csv.push_str(line);
                csv.push('\n');
            }
        }
    }
    csv
}

/// The BANKING77 intents the fine-tuning tests import (72 questions).
const INTENTS: [&str; 6] = [
    "card_arrival",
    "change_pin",
    "exchange_rate",
    "lost_or_stolen_card",
    "top_up_failed",
    "declined_transfer",
];

/// The "top-1 before thresholds" percentage of a `kb eval` report.
fn top1_of(report: &str) -> f64 {
    report
        .lines()
        .find_map(|line| line.strip_prefix("top-1 before thresholds: "))
        .and_then(|rest| rest.split('%').next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no top-1 line in:\n{report}"))
}

/// `[inference] fine_tune` with the split model: the import runs the frozen layers, trains the
/// top two on the knowledge base (progress bars for both), stores the tuned layers with the
/// version and names them in the fingerprint; `kb eval` then embeds queries with the same
/// layers (no lexical fallback) and answers the hold-out. With `fine_tune = false`, or below
/// `fine_tune_min_questions`, or with the plain model, the import says why it did not tune.
#[test]
fn fine_tuning_trains_the_top_layers_at_import_and_queries_use_them() {
    let site = Site::with_model(&models_dir().join("model.split.onnx"));
    let base = std::fs::read_to_string(&site.config).unwrap();
    let tuned_config = format!(
        "{base}fine_tune = true\nfine_tune_weights = {:?}\nfine_tune_min_questions = 50\n",
        models_dir().join("model.fp32.safetensors")
    );
    std::fs::write(&site.config, &tuned_config).unwrap();
    let answers: Vec<(&str, &str)> = INTENTS
        .iter()
        .map(|i| (*i, "See our help pages."))
        .collect();
    let kb = site.write("six.csv", &common::banking77_kb(&answers));
    let output = site.kb(&["import", kb.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("fine-tuned the top layer on the knowledge base"),
        "{stdout}"
    );
    assert!(
        stdout.contains("vectors embedded by model.split.onnx sha256:")
            && stdout.contains(" tuned:"),
        "the fingerprint names the tuned layers:\n{stdout}"
    );
    for bar in ["frozen layers [", "fine-tuning [", "steps/s"] {
        assert!(stderr.contains(bar), "{bar:?} missing:\n{stderr}");
    }

    let queries = site.write("queries.csv", &holdout_of(&INTENTS));
    let report = site.kb_ok(&["eval", queries.to_str().unwrap()]);
    assert!(
        report.contains("degraded (lexical) recognitions: 0"),
        "queries must be embedded with the tuned layers:\n{report}"
    );
    let top1 = top1_of(&report);
    assert!(top1 >= 90.0, "top-1 {top1}% on six intents:\n{report}");

    // Not tuned, and the import says why.
    std::fs::write(
        &site.config,
        tuned_config.replace("fine_tune = true", "fine_tune = false"),
    )
    .unwrap();
    let import = site.kb_ok(&["import", kb.to_str().unwrap()]);
    assert!(
        import.contains("not fine-tuned: [inference] fine_tune is false"),
        "{import}"
    );
    assert!(!import.contains("vectors embedded by"), "{import}");
    std::fs::write(
        &site.config,
        tuned_config.replace(
            "fine_tune_min_questions = 50",
            "fine_tune_min_questions = 1000",
        ),
    )
    .unwrap();
    let import = site.kb_ok(&["import", kb.to_str().unwrap()]);
    assert!(
        import.contains("not fine-tuned: the knowledge base has 72 questions, fewer than"),
        "{import}"
    );
    let plain = Site::new();
    let plain_base = std::fs::read_to_string(&plain.config).unwrap();
    std::fs::write(
        &plain.config,
        format!("{plain_base}fine_tune = true\nfine_tune_min_questions = 50\n"),
    )
    .unwrap();
    let import = plain.kb_ok(&["import", kb.to_str().unwrap()]);
    assert!(
        import.contains("not fine-tuned: the model has no `layer_norm_10` output"),
        "{import}"
    );
}

/// Fine-tuning with a companion model: the import tunes the primary model's top layer and joins
/// its vectors with the companion's (the fingerprint names the tuned layers, then the
/// companion); `kb eval` answers every query with the models (no lexical fallback) and, with
/// `companion_below = 1`, runs the companion on every query. That the first step embeds with
/// the tuned layer is tested in `tests/inference.rs`.
#[test]
fn fine_tuning_with_a_companion_tunes_the_primary_model_and_the_cascade_uses_it() {
    let models = models_dir();
    let site = Site::with_model(&models.join("model.split.onnx"));
    let base = std::fs::read_to_string(&site.config).unwrap();
    std::fs::write(
        &site.config,
        format!(
            "{base}fine_tune = true\nfine_tune_weights = {:?}\nfine_tune_min_questions = 50\n\
             companion_model = {:?}\ncompanion_tokenizer = {:?}\ncompanion_text_prefix = \"query: \"\n\
             companion_below = 1.0\n",
            models.join("model.fp32.safetensors"),
            models.join("multilingual-e5-small.onnx"),
            models.join("multilingual-e5-small.tokenizer.json"),
        ),
    )
    .unwrap();
    let answers: Vec<(&str, &str)> = INTENTS
        .iter()
        .map(|i| (*i, "See our help pages."))
        .collect();
    let kb = site.write("six.csv", &common::banking77_kb(&answers));
    let import = site.kb_ok(&["import", kb.to_str().unwrap()]);
    assert!(
        import.contains("fine-tuned the top layer on the knowledge base")
            && import.contains("(768 dimensions"),
        "{import}"
    );
    let fingerprint = import
        .lines()
        .find_map(|line| line.strip_prefix("vectors embedded by "))
        .unwrap_or_else(|| panic!("no fingerprint in:\n{import}"));
    let (primary, companion) = fingerprint
        .split_once(" + ")
        .unwrap_or_else(|| panic!("no companion in the fingerprint {fingerprint:?}"));
    assert!(
        primary.starts_with("model.split.onnx sha256:") && primary.contains(" tuned:"),
        "{fingerprint}"
    );
    assert!(
        companion.starts_with("multilingual-e5-small.onnx sha256:"),
        "{fingerprint}"
    );

    let queries = site.write("queries.csv", &holdout_of(&INTENTS));
    let asked = holdout_of(&INTENTS).lines().count() - 1;
    let report = site.kb_ok(&["eval", queries.to_str().unwrap()]);
    assert!(
        report.contains("degraded (lexical) recognitions: 0"),
        "queries must be embedded with the tuned layers and the companion:\n{report}"
    );
    assert!(
        report.contains(&format!(
            "companion cascade: {asked} of {asked} queries (100.0%)"
        )),
        "{report}"
    );
    let top1 = top1_of(&report);
    assert!(top1 >= 90.0, "top-1 {top1}% on six intents:\n{report}");
}
