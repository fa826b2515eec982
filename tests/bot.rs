//! The bot through the real binary with the real model: knowledge-base
//! answers, fallback, handoff to a human, risk control, and a knowledge-base
//! update while the server runs.
//!
//! Needs the model files (`models/fetch`, which `scripts/test` runs first).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const CARD_ARRIVAL: &str =
    "Cards arrive within 5 working days; track yours under Cards > Delivery.";
const CARD_ARRIVAL_V2: &str = "New policy: cards arrive within 2 working days.";

/// A small knowledge base from the committed BANKING77 split: a few intents,
/// twelve questions each, with written answers.
fn small_kb(card_answer: &str) -> String {
    let wanted = [
        ("card_arrival", card_answer.to_string()),
        (
            "lost_or_stolen_card",
            "Freeze your card in the app right away, then order a new one.".into(),
        ),
        (
            "exchange_rate",
            "We use the interbank rate plus a small margin shown before you pay.".into(),
        ),
        (
            "age_limit",
            "You must be 18 or older to open an account.".into(),
        ),
        (
            "pin_blocked",
            "Unblock your PIN at any of our ATMs with your card.".into(),
        ),
    ];
    let source = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/banking77/kb.csv"
    ))
    .expect("the committed BANKING77 split");
    let mut reader = csv_rows(&source);
    let mut csv = String::from("text,category,answer\n");
    for (intent, answer) in &wanted {
        let mut taken = 0;
        for (text, category) in reader.by_ref().filter(|(_, c)| c == intent) {
            let _ = category;
            csv.push_str(&format!("{},{intent},{}\n", quote(&text), quote(answer)));
            taken += 1;
            if taken == 12 {
                break;
            }
        }
        reader = csv_rows(&source);
        assert_eq!(taken, 12, "{intent} has questions in the split");
    }
    csv
}

/// `text,category` rows of the split (its texts contain no quotes or commas
/// that need more than this).
fn csv_rows(source: &str) -> impl Iterator<Item = (String, String)> + '_ {
    source.lines().skip(1).filter_map(|line| {
        let (text, category) = line.rsplit_once(',')?;
        Some((
            text.trim_matches('"').replace("\"\"", "\""),
            category.to_string(),
        ))
    })
}

fn quote(field: &str) -> String {
    format!("\"{}\"", field.replace('"', "\"\""))
}

const BOT_CONFIG: &str = r#"
[inference]
enabled = true

[bot]
confidence_threshold = 0.45
margin_threshold = 0.0

[risk_control]
blocked_words = ["scam"]
# The update test asks many questions quickly.
flood_messages = 10000
flood_window = "100ms"
"#;

/// Writes the config and imports a knowledge base into the server's directory
/// with the CLI, as an operator would.
fn import(dir: &std::path::Path, csv: &str) {
    let path = dir.join(format!("kb-{}.csv", rand_suffix()));
    std::fs::write(&path, csv).unwrap();
    kb_import(&dir.join("test.toml"), &path);
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Starts a server whose storage already holds `csv` as its knowledge base.
fn server_with_kb(csv: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), BOT_CONFIG);
    import(dir.path(), csv);
    Server::start_in(dir, BOT_CONFIG)
}

fn ask(tab: &mut RawClient, id: &str, text: &str) -> Value {
    tab.send_json(&json!({"type": "message", "id": id, "text": text}));
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let frame = tab.read_message().expect("a frame");
        let value = frame.json();
        if value["type"] == "message" && value["from"] == "bot" {
            return value;
        }
        if value["type"] == "queued" || value["type"] == "error" {
            return value;
        }
    }
    panic!("no answer to {text:?}");
}

fn visitor(server: &Server, id: &str) -> RawClient {
    let mut tab = RawClient::connect(server.addr, &visitor_path(server, "bank", id, None)).unwrap();
    tab.set_read_timeout(Duration::from_secs(20));
    let hello = tab.read_json();
    assert_eq!(hello["type"], "hello");
    remember_visitor(server, &hello);
    tab
}

#[test]
fn bot_answers_falls_back_hands_off_and_refuses() {
    let server = server_with_kb(&small_kb(CARD_ARRIVAL));
    let mut tab = visitor(&server, "asker");

    // A BANKING77-style question not in the knowledge base verbatim.
    let answer = ask(
        &mut tab,
        "q1",
        "my new card still hasn't come in the mail, where is it?",
    );
    assert_eq!(answer["text"], CARD_ARRIVAL, "{answer}");

    // Something the knowledge base knows nothing about: the fallback.
    let answer = ask(&mut tab, "q2", "what's the weather like on mars tomorrow?");
    assert_eq!(answer["from"], "bot");
    assert_ne!(answer["text"], CARD_ARRIVAL);
    assert!(
        answer["text"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("human")
            || answer["text"]
                .as_str()
                .unwrap()
                .to_lowercase()
                .contains("rephrase"),
        "fallback offers to rephrase or a human: {answer}"
    );

    // A blocked word: refused, not stored.
    let refused = ask(&mut tab, "q3", "is this a scam?");
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["code"], "blocked");

    // Card numbers are masked before they are stored and forwarded.
    let mut other = visitor(&server, "asker");
    tab.send_json(
        &json!({"type": "message", "id": "q4", "text": "my card 4111 1111 1111 1111 was stolen"}),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let echoed = loop {
        let value = other.read_json();
        if value["type"] == "message" && value["from"] == "visitor" {
            break value;
        }
        assert!(Instant::now() < deadline);
    };
    let stored = echoed["text"].as_str().unwrap();
    assert!(!stored.contains("4111 1111 1111 1111"), "{stored}");
    assert!(
        stored.contains("1111"),
        "the last four digits stay: {stored}"
    );

    // Asking for a human reaches the queue.
    let mut human = visitor(&server, "wants-a-human");
    let queued = ask(&mut human, "h1", "I want to talk to a human");
    assert_eq!(queued["type"], "queued", "{queued}");
    assert_eq!(queued["position"], 1);
}

#[test]
fn knowledge_base_update_mid_run_is_atomic() {
    let server = server_with_kb(&small_kb(CARD_ARRIVAL));
    let question = "my card has not arrived yet, how long does it take?";
    let mut tab = visitor(&server, "updater");
    assert_eq!(ask(&mut tab, "before", question)["text"], CARD_ARRIVAL);

    // Import a new version while visitors keep asking; every answer is wholly
    // from the old version or wholly from the new one.
    let dir = server.dir.path().to_path_buf();
    let importer = std::thread::spawn(move || import(&dir, &small_kb(CARD_ARRIVAL_V2)));
    let mut seen_new = false;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut n = 0;
    while Instant::now() < deadline {
        n += 1;
        let answer = ask(&mut tab, &format!("during-{n}"), question);
        let text = answer["text"].as_str().unwrap_or_default().to_string();
        assert!(
            text == CARD_ARRIVAL || text == CARD_ARRIVAL_V2,
            "an answer from neither version: {answer}"
        );
        if text == CARD_ARRIVAL_V2 {
            seen_new = true;
            if importer.is_finished() {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    importer.join().unwrap();
    assert!(seen_new, "the new version took effect without a restart");
    // And it stays.
    assert_eq!(ask(&mut tab, "after", question)["text"], CARD_ARRIVAL_V2);
}

#[test]
fn over_the_sites_bot_query_rate_the_bot_answers_lexically() {
    // One model query per site, then the rate (one per ~17 minutes) is spent.
    let config = format!("{BOT_CONFIG}\n[limits]\nbot_queries_per_site = 0.001\nbot_burst = 1\n");
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &config);
    import(dir.path(), &small_kb(CARD_ARRIVAL));
    let server = Server::start_in(dir, &config);
    let mut tab = visitor(&server, "limited");
    let first = ask(
        &mut tab,
        "q1",
        "my new card still hasn't come in the mail, where is it?",
    );
    assert_eq!(first["text"], CARD_ARRIVAL, "{first}");
    assert_eq!(server.metric("bot_rate_limited"), 0);
    // Over the limit: still answered by the bot, from the lexical match (its answer, or the
    // fallback when the lexical score is below the thresholds); the model is not asked.
    let second = ask(&mut tab, "q2", "when will my card arrive in the mail?");
    assert_eq!(second["from"], "bot", "{second}");
    assert_eq!(server.metric("bot_rate_limited"), 1);
}

/// The models load on the inference worker's threads after the server is listening: a
/// question asked at once is answered by the bot (lexically while the models load, marked
/// degraded), never lost or refused, and once the models are ready (logged with timings)
/// the model answers. With a companion, so loading takes longest.
#[test]
fn a_question_asked_right_after_start_is_answered_while_the_models_load() {
    let config = r#"
[inference]
enabled = true
companion_model = "models/cache/multilingual-e5-small.onnx"
companion_tokenizer = "models/cache/multilingual-e5-small.tokenizer.json"
companion_text_prefix = "query: "

[bot]
confidence_threshold = 0.45
margin_threshold = 0.0
"#;
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), config);
    import(dir.path(), &small_kb(CARD_ARRIVAL));
    let started = Instant::now();
    let server = Server::start_listening(Command::new(BIN), dir, config);
    let mut tab = visitor(&server, "early");
    let accepted = started.elapsed();
    let first = ask(&mut tab, "e1", "How long does a card take to arrive?");
    let answered = started.elapsed();
    assert_eq!(first["type"], "message", "{first}");
    assert_eq!(first["from"], "bot", "{first}");
    let logs = server.logs();
    eprintln!(
        "accepted after {accepted:?}, first answer after {answered:?}: {first}\n\
         models loaded before the first answer: primary {}, companion {}",
        logs.contains("primary model ready"),
        logs.contains("companion model ready")
    );

    let deadline = Instant::now() + Duration::from_secs(120);
    while !server.logs().contains("companion model ready") {
        assert!(
            Instant::now() < deadline,
            "the models never became ready:\n{}",
            server.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let logs = server.logs();
    assert!(logs.contains("primary model ready"), "{logs}");
    assert!(logs.contains("load_ms"), "{logs}");
    let later = ask(
        &mut tab,
        "e2",
        "my new card still hasn't come in the mail, where is it?",
    );
    assert_eq!(later["text"], CARD_ARRIVAL, "{later}");
}
