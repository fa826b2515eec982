//! Visitor identity through the real binary (issue 10): a guessed visitor id without its
//! secret sees nothing of the real visitor's conversation; the secret or a verified
//! identity resumes it; Origin allow-lists; connecting stores nothing; typing and
//! invisible text cannot be used to flood or deceive an agent.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use switchboard::conversation::identity::identity_hash;

const SITE_KEY: &str = "acme-identity-key-0123456789abcdef";

fn overlay() -> String {
    format!(
        r#"
[inference]
enabled = false

[shards]
cores = [0, 1]

[agents]
dev_static_tokens = true

[agents.accounts.alice]
token = "alice-token-0123456789"
name = "Alice"

[limits]
# One test client opens 1,000 connections and sends typing floods on purpose.
connections_per_ip = 0
visitor_frames_per_second = 0
agent_frames_per_second = 0

[visitors.sites.acme]
identity_key = "{SITE_KEY}"

[visitors.sites.shop]
origins = ["https://shop.example", "http://localhost:8080"]
"#
    )
}

/// Every frame that arrives within `quiet` of the previous one.
fn drain(client: &mut RawClient, quiet: Duration) -> Vec<Value> {
    client.set_read_timeout(quiet);
    let mut frames = Vec::new();
    while let Some(frame) = client.read_message() {
        if frame.opcode == TEXT {
            frames.push(frame.json());
        }
    }
    client.set_read_timeout(Duration::from_secs(10));
    frames
}

fn read_until(client: &mut RawClient, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let Some(frame) = client.read_message() else {
            break;
        };
        let value = frame.json();
        if want(&value) {
            return value;
        }
        seen.push(value);
    }
    panic!("no {what}; saw {seen:#?}");
}

fn connect(server: &Server, path: &str) -> (RawClient, Value) {
    let mut client = RawClient::connect(server.addr, path)
        .unwrap_or_else(|err| panic!("{path}: {err:?}; server log:\n{}", server.logs()));
    let hello = read_until(&mut client, "hello", |v| v["type"] == "hello");
    (client, hello)
}

fn say(client: &mut RawClient, id: &str, text: &str) -> Value {
    client.send_json(&json!({"type": "message", "id": id, "text": text}));
    read_until(client, "ack", |v| v["type"] == "ack" && v["id"] == id)
}

#[test]
fn a_guessed_visitor_id_without_its_secret_sees_nothing_of_the_conversation() {
    let server = Server::start(&overlay());
    // Visitor A connects without an id: it gets one and a secret, and no conversation yet.
    let (mut a, hello) = connect(&server, "/ws/visitor?site=acme");
    let id = hello["visitor"].as_str().unwrap().to_owned();
    let secret = hello["secret"].as_str().unwrap().to_owned();
    assert!(
        secret.len() >= 32 && secret.bytes().all(|b| b.is_ascii_hexdigit()),
        "{hello}"
    );
    assert!(hello["conversation"].is_null(), "{hello}");
    assert_eq!(hello["seq"], 0);
    let ack = say(&mut a, "m1", "my account number is 12345678");
    let conversation = ack["conversation"].as_u64().unwrap();
    say(&mut a, "m2", "and my address is 1 Main St");
    drop(a);

    // Someone who knows (or guessed) A's id, without the secret or with a wrong one,
    // asking for the whole history: a new visitor, nothing replayed.
    for path in [
        format!("/ws/visitor?site=acme&visitor={id}&resume=0"),
        format!(
            "/ws/visitor?site=acme&visitor={id}&secret=00000000000000000000000000000000&resume=0"
        ),
        format!(
            "/ws/visitor?site=acme&visitor={id}&secret={}&resume=0",
            &secret[..31]
        ),
    ] {
        let (mut intruder, hello) = connect(&server, &path);
        assert_ne!(hello["visitor"], id.as_str(), "{path}: {hello}");
        assert!(hello["conversation"].is_null(), "{path}: {hello}");
        assert_eq!(hello["seq"], 0);
        let new_secret = hello["secret"].as_str().unwrap();
        assert_ne!(new_secret, secret);
        let frames = drain(&mut intruder, Duration::from_millis(500));
        assert!(
            frames.iter().all(|v| v["type"] != "message"),
            "{path}: nothing of A's conversation: {frames:#?}"
        );
        // What the intruder writes goes to its own new conversation.
        let ack = say(&mut intruder, "x1", "let me in");
        assert_ne!(ack["conversation"], conversation);
        assert_eq!(ack["seq"], 1);
        // Even while the intruder is connected, A's conversation is untouched.
    }

    // With its secret A resumes and gets its history.
    let (mut a, hello) = connect(
        &server,
        &format!("/ws/visitor?site=acme&visitor={id}&secret={secret}&resume=0"),
    );
    assert_eq!(hello["visitor"], id.as_str());
    assert_eq!(hello["conversation"], conversation);
    assert_eq!(hello["seq"], 2);
    assert!(
        hello.get("secret").is_none(),
        "the secret is issued once: {hello}"
    );
    let first = read_until(&mut a, "replay", |v| v["type"] == "message");
    assert_eq!(first["text"], "my account number is 12345678");
    let second = read_until(&mut a, "replay", |v| v["type"] == "message");
    assert_eq!(second["seq"], 2);
    // A guess while A is connected is refused too (checked from memory).
    let (mut intruder, hello) = connect(
        &server,
        &format!("/ws/visitor?site=acme&visitor={id}&resume=0"),
    );
    assert_ne!(hello["visitor"], id.as_str());
    say(&mut a, "m3", "are you there?");
    let frames = drain(&mut intruder, Duration::from_millis(500));
    assert!(frames.iter().all(|v| v["type"] != "message"), "{frames:#?}");
}

#[test]
fn a_verified_identity_resumes_from_any_device_and_a_wrong_one_is_refused() {
    let server = Server::start(&overlay());
    let user = "customer-42";
    let hash = identity_hash(SITE_KEY.as_bytes(), user);
    let path = format!("/ws/visitor?site=acme&visitor={user}&identity_hash={hash}&resume=0");
    let (mut laptop, hello) = connect(&server, &path);
    assert_eq!(hello["visitor"], user);
    let ack = say(&mut laptop, "m1", "order 991 is late");
    drop(laptop);
    // Another device: no secret, only the host site's identity_hash.
    let (mut phone, hello) = connect(&server, &path);
    assert_eq!(hello["visitor"], user);
    assert_eq!(hello["conversation"], ack["conversation"]);
    let replayed = read_until(&mut phone, "replay", |v| v["type"] == "message");
    assert_eq!(replayed["text"], "order 991 is late");

    // A wrong identity_hash is refused before the upgrade.
    let wrong = identity_hash(b"not the site key, but 32 bytes long", user);
    let (status, body) = RawClient::connect(
        server.addr,
        &format!("/ws/visitor?site=acme&visitor={user}&identity_hash={wrong}"),
    )
    .err()
    .expect("refused");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("identity_hash"), "{body}");
    // So is one on a site without an identity key, and one without a visitor id.
    let (status, _) = RawClient::connect(
        server.addr,
        &format!("/ws/visitor?site=other&visitor={user}&identity_hash={hash}"),
    )
    .err()
    .expect("refused");
    assert_eq!(status, 403);
    let (status, _) = RawClient::connect(
        server.addr,
        &format!("/ws/visitor?site=acme&identity_hash={hash}"),
    )
    .err()
    .expect("refused");
    assert_eq!(status, 400);
}

#[test]
fn origin_is_checked_against_the_sites_allow_list() {
    let server = Server::start(&overlay());
    let path = "/ws/visitor?site=shop";
    for headers in ["", "Origin: https://evil.example\r\n", "Origin: null\r\n"] {
        let (status, body) = RawClient::connect_with_headers(server.addr, path, headers)
            .err()
            .unwrap_or_else(|| panic!("{headers:?} must be refused"));
        assert_eq!(status, 403, "{headers:?}");
        assert!(body.contains("Origin not allowed"), "{body}");
    }
    for origin in [
        "https://shop.example",
        "http://localhost:8080",
        "HTTPS://SHOP.EXAMPLE",
    ] {
        let mut client =
            RawClient::connect_with_headers(server.addr, path, &format!("Origin: {origin}\r\n"))
                .unwrap_or_else(|err| panic!("{origin}: {err:?}"));
        assert_eq!(client.read_json()["type"], "hello");
    }
    // A site without a table is served by default (allow_unlisted_sites = true)...
    let mut client = RawClient::connect(server.addr, "/ws/visitor?site=unlisted").unwrap();
    assert_eq!(client.read_json()["type"], "hello");
    drop(server);
    // ...and refused when the operator lists every site.
    let server = Server::start(&format!(
        "{}\n[visitors]\nallow_unlisted_sites = false\n",
        overlay()
    ));
    let (status, body) = RawClient::connect(server.addr, "/ws/visitor?site=unlisted")
        .err()
        .expect("refused");
    assert_eq!(status, 403, "{body}");
    let mut client = RawClient::connect(server.addr, "/ws/visitor?site=acme").unwrap();
    assert_eq!(client.read_json()["type"], "hello");
}

fn store_bytes(server: &Server) -> u64 {
    let mut total = 0;
    for shard in 0..2 {
        let path = server
            .dir
            .path()
            .join(format!("data/shard-{shard}/data.mdb"));
        let alt = server.dir.path().join(format!("shard-{shard}/data.mdb"));
        total += std::fs::metadata(&path)
            .or_else(|_| std::fs::metadata(&alt))
            .map(|m| m.len())
            .unwrap_or(0);
    }
    total
}

#[test]
fn a_thousand_connect_and_close_cycles_do_not_grow_the_store() {
    let server = Server::start(&overlay());
    // One visitor that speaks, so the stores exist and have their tables.
    let (mut a, _) = connect(&server, "/ws/visitor?site=acme");
    say(&mut a, "m1", "hello");
    drop(a);
    std::thread::sleep(Duration::from_millis(300));
    let before = store_bytes(&server);
    assert!(before > 0, "the store files are found");
    for i in 0..1000 {
        let path = if i % 2 == 0 {
            "/ws/visitor?site=acme".to_owned()
        } else {
            format!("/ws/visitor?site=acme&visitor=drive-by-{i}&resume=0")
        };
        let (client, hello) = connect(&server, &path);
        assert!(hello["conversation"].is_null());
        drop(client);
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = store_bytes(&server);
    assert_eq!(
        after, before,
        "1,000 visitors who never spoke must not grow the store ({before} -> {after} bytes)"
    );
}

#[test]
fn alternating_typing_is_throttled_and_invisible_text_is_refused() {
    let server = Server::start(&overlay());
    let mut alice =
        RawClient::connect(server.addr, "/ws/agent?token=alice-token-0123456789").unwrap();
    read_until(&mut alice, "agent hello", |v| v["type"] == "hello");
    let (mut tab, _) = connect(&server, "/ws/visitor?site=acme");
    let ack = say(&mut tab, "m1", "hi");
    let conversation = ack["conversation"].as_u64().unwrap();
    // Alice is assigned the conversation (then gets its message): both sides may type.
    read_until(&mut alice, "visitor message", |v| v["type"] == "message");

    // 1,000 alternating typing frames from each side, as fast as the socket takes them.
    for i in 0..1000 {
        let on = i % 2 == 0;
        tab.send_json(&json!({"type": "typing", "on": on}));
        alice.send_json(&json!({"type": "typing", "conversation": conversation, "on": on}));
    }
    let started = Instant::now();
    let to_agent: Vec<Value> = drain(&mut alice, Duration::from_millis(2500))
        .into_iter()
        .filter(|v| v["type"] == "typing")
        .collect();
    let to_visitor: Vec<Value> = drain(&mut tab, Duration::from_millis(500))
        .into_iter()
        .filter(|v| v["type"] == "typing")
        .collect();
    let seconds = started.elapsed().as_secs_f64().ceil() as usize + 1;
    // typing_interval is 1s: about one change per second per side, ending "off".
    for (side, frames) in [("agent", &to_agent), ("visitor", &to_visitor)] {
        assert!(
            !frames.is_empty() && frames.len() <= seconds + 1,
            "{side} got {} typing frames in ~{seconds}s: {frames:?}",
            frames.len()
        );
        assert_eq!(
            frames.last().unwrap()["on"],
            false,
            "{side} ends with the final state"
        );
    }

    // Text made only of NUL, zero-width or bidi controls is refused...
    for text in [
        "\u{0}\u{0}",
        "\u{200B}\u{200D}\u{FEFF}",
        "\u{202E}\u{2066}\u{2069}",
    ] {
        tab.send_json(&json!({"type": "message", "id": "invisible", "text": text}));
        let error = read_until(&mut tab, "error", |v| v["type"] == "error");
        assert_eq!(error["code"], "invalid_field", "{text:?}");
    }
    // ...and visible text reaches the agent without its bidi overrides.
    say(&mut tab, "m2", "refund \u{202E}txt.exe\u{202C} please");
    let message = read_until(&mut alice, "message", |v| {
        v["type"] == "message" && v["seq"] == 2
    });
    assert_eq!(message["text"], "refund txt.exe please");
}

#[test]
fn an_empty_conversation_left_behind_is_expired() {
    let server = Server::start(&format!(
        "{}\n[visitors]\nempty_conversation_ttl = \"1s\"\n",
        overlay()
    ));
    // A handoff without a word opens (and queues) a conversation; the visitor leaves.
    let (mut tab, hello) = connect(&server, "/ws/visitor?site=acme");
    let id = hello["visitor"].as_str().unwrap().to_owned();
    let secret = hello["secret"].as_str().unwrap().to_owned();
    tab.send_json(&json!({"type": "handoff"}));
    let hello = read_until(&mut tab, "hello with the conversation", |v| {
        v["type"] == "hello" && !v["conversation"].is_null()
    });
    let conversation = hello["conversation"].as_u64().unwrap();
    // One who stays connected keeps theirs.
    let (mut stayer, _) = connect(&server, "/ws/visitor?site=acme");
    stayer.send_json(&json!({"type": "handoff"}));
    let kept = read_until(&mut stayer, "hello with the conversation", |v| {
        v["type"] == "hello" && !v["conversation"].is_null()
    })["conversation"]
        .clone();
    drop(tab);
    std::thread::sleep(Duration::from_millis(3500));
    let (_tab, hello) = connect(
        &server,
        &format!("/ws/visitor?site=acme&visitor={id}&secret={secret}&resume=0"),
    );
    assert_eq!(hello["visitor"], id.as_str(), "the visitor keeps its id");
    assert!(
        hello["conversation"].is_null(),
        "conversation {conversation} was expired: {hello}"
    );
    // The agent who comes online finds only the conversation of the one who stayed.
    let mut alice =
        RawClient::connect(server.addr, "/ws/agent?token=alice-token-0123456789").unwrap();
    let hello = read_until(&mut alice, "agent hello", |v| v["type"] == "hello");
    let held: Vec<Value> = hello["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .chain(hello["queue"].as_array().unwrap())
        .cloned()
        .collect();
    assert!(!held.contains(&json!(conversation)), "{hello}");
    assert!(
        held.contains(&kept)
            || drain(&mut alice, Duration::from_millis(500))
                .iter()
                .any(|v| v["conversation"] == kept),
        "{hello}"
    );
}
