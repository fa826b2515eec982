//! `/metrics` on the real binary: after real traffic (visitor messages, a bot answer from the
//! model, an agent and an echo session) the whole scrape is parsed with a Prometheus
//! text-format parser (`prometheus-parse`) and checked: every line parses, one HELP and TYPE
//! per family with its samples together, the families of issue #14 are there, histograms are
//! cumulative with `_count` equal to the `+Inf` bucket, and the `shard="all"` series of every
//! counter and histogram is the sum of the shard series. With `[metrics] listen` the scrape is
//! served there without a token and `/metrics` on the public listener is 404; without it the
//! public `/metrics` needs a supervisor's or admin's bearer token (401 / 403 otherwise, in the
//! API's error shape). Needs the model at `models/cache`.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use prometheus_parse::{LineInfo, Scrape, Value};
use serde_json::{json, Value as Json};

const PASSWORD: &str = "a good long password";
const ANSWER: &str = "Cards arrive within 5 working days.";

const BOT_CONFIG: &str = r#"
[inference]
enabled = true

[bot]
confidence_threshold = 0.45
margin_threshold = 0.0

[shards]
cores = [0, 1]
"#;

/// Every family issue #14 asks for (and the ones the admin page charts), by name and type.
const REQUIRED: &[(&str, &str)] = &[
    ("switchboard_sessions_open", "gauge"),
    ("switchboard_sessions_by_kind", "gauge"),
    ("switchboard_messages_received", "counter"),
    ("switchboard_messages_sent", "counter"),
    ("switchboard_relay_latency_seconds", "histogram"),
    ("switchboard_bot_latency_seconds", "histogram"),
    ("switchboard_bot_hot_cache_hits", "counter"),
    ("switchboard_bot_embedding_cache_hits", "counter"),
    ("switchboard_bot_cache_misses", "counter"),
    ("switchboard_bot_cache_hit_ratio", "gauge"),
    ("switchboard_inference_queue_wait_seconds", "histogram"),
    ("switchboard_inference_batch_size", "histogram"),
    ("switchboard_inference_queue_depth", "gauge"),
    ("switchboard_admission_rate_limited", "counter"),
    ("switchboard_frames_rate_limited", "counter"),
    ("switchboard_bot_rate_limited", "counter"),
    ("switchboard_login_rate_limited", "counter"),
    ("switchboard_degrade_level", "gauge"),
    ("switchboard_degrade_transitions", "counter"),
    ("switchboard_storage_used_bytes", "gauge"),
    ("switchboard_storage_map_bytes", "gauge"),
    ("switchboard_commit_latency_seconds", "histogram"),
    ("switchboard_commit_batch_size", "histogram"),
    ("switchboard_store_commits", "counter"),
    ("switchboard_bot_variant_conversations", "counter"),
    ("switchboard_bot_variant_answers", "counter"),
    ("switchboard_bot_variant_fallbacks", "counter"),
    ("switchboard_bot_variant_handoffs", "counter"),
    ("switchboard_resident_bytes", "gauge"),
];

#[test]
fn a_scrape_after_real_traffic_parses_and_adds_up() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), BOT_CONFIG);
    let kb = dir.path().join("kb.csv");
    std::fs::write(
        &kb,
        banking77_kb(&[
            ("card_arrival", ANSWER),
            ("age_limit", "You must be 18 or older to open an account."),
        ]),
    )
    .unwrap();
    kb_import(&config, &kb);
    agent_add(&config, "ada", "agent", PASSWORD);
    let server = Server::start_in(dir, BOT_CONFIG);
    // Both shards' models, so the question below goes through the inference worker.
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.logs().matches("primary model ready").count() < 2 {
        assert!(Instant::now() < deadline, "models: {}", server.logs());
        std::thread::sleep(Duration::from_millis(50));
    }

    // Served on the metrics listener only.
    let (status, _) = http_get(server.addr, "/metrics");
    assert_eq!(status, 404, "/metrics left the public listener");
    assert_eq!(http_get(server.metrics_addr(), "/healthz").0, 404);

    // Traffic: an agent online, an echo session, two visitors; one asks the bot.
    let token = login(server.addr, "ada").expect("the agent logs in");
    let mut agent =
        RawClient::connect(server.addr, &format!("/ws/agent?token={token}")).expect("agent");
    agent.set_read_timeout(Duration::from_secs(20));
    let mut echo = RawClient::connect(server.addr, "/ws/echo").expect("echo");
    echo.send_text("ping");
    assert_eq!(echo.read_message().expect("echoed").text(), "ping");
    let mut asker = visitor(&server, "asker");
    let answer = ask(
        &mut asker,
        "q1",
        "my new card hasn't arrived yet, where is it?",
    );
    assert_eq!(answer["text"], ANSWER, "{answer}");
    let mut chatter = visitor(&server, "chatter");
    for n in 0..5 {
        send_and_ack(&mut chatter, &format!("m{n}"), &format!("hello number {n}"));
    }

    // Histograms are published once a second: wait until this traffic shows.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (text, scrape) = loop {
        let text = server.scrape();
        let scrape = check_exposition(&text);
        let done = histogram_count(&scrape, "switchboard_relay_latency_seconds", "all") >= 6
            && histogram_count(&scrape, "switchboard_bot_latency_seconds", "all") >= 1
            && histogram_count(&scrape, "switchboard_inference_batch_size", "all") >= 1
            && histogram_count(&scrape, "switchboard_inference_queue_wait_seconds", "all") >= 1
            && histogram_count(&scrape, "switchboard_commit_batch_size", "all") >= 1;
        if done {
            break (text, scrape);
        }
        assert!(
            Instant::now() < deadline,
            "the traffic never showed in the histograms:\n{text}\nlogs:\n{}",
            server.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };

    // The content type a Prometheus server expects for this format.
    let head = raw_head(server.metrics_addr(), "/metrics", None);
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
        "{head}"
    );

    // Values the traffic explains.
    let value = |name: &str, labels: &[(&str, &str)]| single(&scrape, name, labels);
    assert!(value("switchboard_messages_received", &[("shard", "all")]) >= 7.0);
    assert!(value("switchboard_messages_sent", &[("shard", "all")]) >= 7.0);
    // Without [[bot.variants]] every conversation the bot answers is the default variant's.
    let default_variant = [("shard", "all"), ("variant", "default")];
    assert!(value("switchboard_bot_variant_conversations", &default_variant) >= 1.0);
    assert!(value("switchboard_bot_variant_answers", &default_variant) >= 1.0);
    for kind in ["visitor", "agent", "echo"] {
        let open = value(
            "switchboard_sessions_by_kind",
            &[("shard", "all"), ("kind", kind)],
        );
        assert!(open >= 1.0, "{kind} sessions open: {open}");
    }
    assert_eq!(
        value(
            "switchboard_sessions_by_kind",
            &[("shard", "all"), ("kind", "visitor")]
        ) + value(
            "switchboard_sessions_by_kind",
            &[("shard", "all"), ("kind", "agent")]
        ) + value(
            "switchboard_sessions_by_kind",
            &[("shard", "all"), ("kind", "echo")]
        ),
        value("switchboard_sessions_open", &[("shard", "all")]),
        "the kinds add up to the sessions open"
    );
    assert!(value("switchboard_storage_used_bytes", &[("shard", "all")]) > 0.0);
    assert!(value("switchboard_resident_bytes", &[]) > 0.0);
    let ratio = value(
        "switchboard_bot_cache_hit_ratio",
        &[("shard", "all"), ("cache", "any")],
    );
    assert!((0.0..=1.0).contains(&ratio), "hit ratio {ratio}");
    assert!(histogram_count(&scrape, "switchboard_commit_latency_seconds", "all") >= 6);
    println!("{text}");
}

#[test]
fn without_a_metrics_listener_the_public_scrape_needs_a_supervisor_or_admin_token() {
    let overlay = "[metrics]\nlisten = \"\"\n";
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), overlay);
    agent_add(&config, "root", "admin", PASSWORD);
    agent_add(&config, "sam", "supervisor", PASSWORD);
    agent_add(&config, "ada", "agent", PASSWORD);
    let server = Server::start_in(dir, overlay);
    assert!(!server.logs().contains("metrics endpoint on"));

    // No token, a malformed one, an agent's: refused in the API's error shape.
    for (token, status, code) in [
        (None, 401, "unauthorized"),
        (Some("not-a-token".to_string()), 401, "invalid_token"),
        (login(server.addr, "ada"), 403, "forbidden"),
    ] {
        let (got, body) = get(server.addr, "/metrics", token.as_deref());
        assert_eq!(got, status, "{body}");
        let error: Json = serde_json::from_str(&body).expect("a JSON error");
        assert_eq!(error["error"]["code"], code, "{body}");
        assert!(error["error"]["message"].is_string(), "{body}");
    }

    // An admin's and a supervisor's token: the whole scrape, which parses.
    for name in ["root", "sam"] {
        let token = login(server.addr, name).expect("login");
        let (status, body) = get(server.addr, "/metrics", Some(&token));
        assert_eq!(status, 200, "{body}");
        let scrape = check_exposition(&body);
        // The refusals above were counted as HTTP errors.
        assert!(single(&scrape, "switchboard_http_errors", &[("shard", "all")]) >= 3.0);
    }
}

/// Parses `text` with `prometheus-parse` and checks the exposition rules it does not check
/// itself; returns the parse.
fn check_exposition(text: &str) -> Scrape {
    assert!(text.ends_with('\n'), "the text ends with a newline");
    // Every line is a HELP, a TYPE or a sample the parser understands (it skips what it does
    // not, so an unparsable line would otherwise go unnoticed).
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashSet<String> = HashSet::new();
    let mut finished: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match LineInfo::parse(line) {
            LineInfo::Doc { metric_name, .. } => {
                assert!(helps.insert(metric_name.to_string()), "HELP twice: {line}");
            }
            LineInfo::Type {
                metric_name,
                metric_alias,
                sample_type,
            } => {
                let family = metric_alias.unwrap_or(metric_name);
                assert!(
                    helps.contains(&family),
                    "TYPE without HELP before it: {line}"
                );
                let kind = format!("{sample_type:?}").to_lowercase();
                assert!(
                    types.insert(family.clone(), kind).is_none(),
                    "TYPE twice: {line}"
                );
                if let Some(previous) = current.replace(family) {
                    finished.insert(previous);
                }
            }
            LineInfo::Sample {
                metric_name, value, ..
            } => {
                let family = family_of(metric_name, &types);
                assert_eq!(
                    current.as_deref(),
                    Some(family.as_str()),
                    "a sample outside its family's group: {line}"
                );
                assert!(!finished.contains(&family), "family split: {line}");
                let parsed = value.parse::<f64>();
                assert!(
                    parsed.is_ok() || value == "NaN" || value == "+Inf",
                    "value of {line}"
                );
            }
            other => panic!("not a valid exposition line ({other:?}): {line:?}"),
        }
    }
    for (name, kind) in REQUIRED {
        assert_eq!(
            types.get(*name).map(String::as_str),
            Some(*kind),
            "family {name} ({kind}) in:\n{text}"
        );
    }

    let scrape = Scrape::parse(text.lines().map(|line| Ok(line.to_string()))).expect("parses");
    let samples_of = |name: &str| -> Vec<&prometheus_parse::Sample> {
        scrape
            .samples
            .iter()
            .filter(|sample| sample.metric == name)
            .collect()
    };
    for (family, kind) in &types {
        match kind.as_str() {
            "histogram" => {
                let mut summed: BTreeMap<String, f64> = BTreeMap::new();
                let mut all: BTreeMap<String, f64> = BTreeMap::new();
                for sample in samples_of(family) {
                    let Value::Histogram(buckets) = &sample.value else {
                        panic!("{family} parsed as {:?}", sample.value);
                    };
                    let shard = sample.labels.get("shard").expect("a shard label");
                    assert!(
                        buckets
                            .windows(2)
                            .all(|pair| pair[0].less_than < pair[1].less_than
                                && pair[0].count <= pair[1].count),
                        "{family}{{shard={shard}}}: cumulative, by increasing le"
                    );
                    let last = buckets.last().expect("buckets");
                    assert!(last.less_than.is_infinite(), "{family}: ends with +Inf");
                    let count = single(&scrape, &format!("{family}_count"), &[("shard", shard)]);
                    assert_eq!(
                        last.count, count,
                        "{family}{{shard={shard}}}: _count = +Inf"
                    );
                    let sum = single(&scrape, &format!("{family}_sum"), &[("shard", shard)]);
                    assert!(
                        sum >= 0.0 && (count > 0.0 || sum == 0.0),
                        "{family} _sum {sum}"
                    );
                    let target = if shard == "all" {
                        &mut all
                    } else {
                        &mut summed
                    };
                    for bucket in buckets {
                        *target.entry(format!("{}", bucket.less_than)).or_default() += bucket.count;
                    }
                }
                assert!(!all.is_empty(), "{family} has a shard=\"all\" series");
                assert_eq!(
                    summed, all,
                    "{family}: shard=\"all\" is the sum of the shards"
                );
            }
            "counter" => {
                let samples = samples_of(family);
                if samples
                    .iter()
                    .all(|sample| sample.labels.get("shard").is_none())
                {
                    continue; // process-wide: one series, no shard label
                }
                // Per value of the other labels (e.g. `variant`): (sum of shards, all, shards).
                let mut series: BTreeMap<String, (f64, Option<f64>, usize)> = BTreeMap::new();
                for sample in samples {
                    let Value::Counter(value) = sample.value else {
                        panic!("{family} parsed as {:?}", sample.value);
                    };
                    let mut others: Vec<String> = sample
                        .labels
                        .iter()
                        .filter(|(key, _)| key.as_str() != "shard")
                        .map(|(key, value)| format!("{key}={value}"))
                        .collect();
                    others.sort();
                    let entry = series.entry(others.join(",")).or_default();
                    match sample.labels.get("shard") {
                        Some("all") => entry.1 = Some(value),
                        Some(_) => {
                            entry.0 += value;
                            entry.2 += 1;
                        }
                        None => panic!("{family}: a series without a shard label"),
                    }
                }
                for (others, (summed, all, shards)) in series {
                    assert_eq!(shards, 2, "{family} {others}: one series per shard");
                    assert_eq!(
                        all,
                        Some(summed),
                        "{family} {others}: shard=\"all\" is the sum"
                    );
                }
            }
            _ => {}
        }
    }
    scrape
}

/// The family a sample line belongs to (`x_bucket`, `x_sum`, `x_count` of histogram `x`).
fn family_of(name: &str, types: &HashMap<String, String>) -> String {
    if types.contains_key(name) {
        return name.to_string();
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types.get(base).is_some_and(|kind| kind == "histogram") {
                return base.to_string();
            }
        }
    }
    panic!("a sample of no declared family: {name}");
}

/// The one sample named `name` with exactly `labels`.
fn single(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|sample| {
            sample.metric == name
                && sample.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(key, value)| sample.labels.get(key) == Some(*value))
        })
        .map(|sample| match sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            ref other => panic!("{name} is {other:?}"),
        })
        .collect();
    assert_eq!(found.len(), 1, "one {name}{labels:?}");
    found[0]
}

/// `_count` of histogram `name` for `shard`.
fn histogram_count(scrape: &Scrape, name: &str, shard: &str) -> u64 {
    single(scrape, &format!("{name}_count"), &[("shard", shard)]) as u64
}

/// `POST /api/login`; the token, or `None` when refused.
fn login(addr: SocketAddr, name: &str) -> Option<String> {
    let body = json!({"name": name, "password": PASSWORD}).to_string();
    let request = format!(
        "POST /api/login HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, reply) = http_raw(addr, request.as_bytes());
    (status == 200).then(|| {
        let reply: Json = serde_json::from_str(&reply).expect("JSON");
        reply["token"].as_str().expect("a token").to_string()
    })
}

/// `GET path` with an optional bearer token: status and body.
fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    http_raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n{auth}\r\n").as_bytes(),
    )
}

/// The response head of `GET path`.
fn raw_head(addr: SocketAddr, path: &str, token: Option<&str>) -> String {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n{auth}\r\n").as_bytes())
        .unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    text.split_once("\r\n\r\n")
        .map(|(head, _)| head.to_string() + "\r\n")
        .unwrap_or(text)
}

fn visitor(server: &Server, id: &str) -> RawClient {
    let mut tab = RawClient::connect(server.addr, &visitor_path(server, "bank", id, None)).unwrap();
    tab.set_read_timeout(Duration::from_secs(20));
    let hello = tab.read_json();
    assert_eq!(hello["type"], "hello");
    remember_visitor(server, &hello);
    tab
}

/// Sends a message and waits for its ack (the message is stored and relayed).
fn send_and_ack(tab: &mut RawClient, id: &str, text: &str) {
    tab.send_json(&json!({"type": "message", "id": id, "text": text}));
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let value = tab.read_message().expect("a frame").json();
        if value["type"] == "ack" && value["id"] == id {
            return;
        }
        assert_ne!(value["type"], "error", "{value}");
    }
    panic!("no ack for {id}");
}

/// Sends a message and waits for the bot's answer (or the hand-off to the queue).
fn ask(tab: &mut RawClient, id: &str, text: &str) -> Json {
    tab.send_json(&json!({"type": "message", "id": id, "text": text}));
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let value = tab.read_message().expect("a frame").json();
        if (value["type"] == "message" && value["from"] == "bot") || value["type"] == "queued" {
            return value;
        }
        assert_ne!(value["type"], "error", "{value}");
    }
    panic!("no answer to {text:?}");
}
