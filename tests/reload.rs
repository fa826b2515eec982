//! Live configuration reload through the real binary: SIGHUP re-reads the `--config` file, applies
//! the keys that can change live (here the visitor message rate) to new and open sessions, names
//! the keys that need a restart, and refuses an invalid file without changing anything.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn until(client: &mut RawClient, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    client.read_until(what, want)
}

/// Sends three messages at once from a new visitor; returns how many were refused `rate_limited`.
fn refused_of_three(server: &Server) -> usize {
    let mut visitor = RawClient::connect(server.addr, "/ws/visitor?site=s").unwrap();
    visitor.set_read_timeout(Duration::from_secs(10));
    until(&mut visitor, "hello", |v| v["type"] == "hello");
    for id in ["m1", "m2", "m3"] {
        visitor.send_json(&json!({"type": "message", "id": id, "text": "hi"}));
    }
    let mut refused = 0;
    for _ in 0..3 {
        let answer = until(&mut visitor, "ack or refusal", |v| {
            v["type"] == "ack" || v["type"] == "error"
        });
        if answer["code"] == "rate_limited" {
            refused += 1;
        }
    }
    refused
}

#[test]
fn sighup_applies_live_keys_names_restart_keys_and_refuses_a_bad_file() {
    let server = Server::start("[limits]\nvisitor_messages_per_second = 0\n");
    let path = server.dir.path().join("test.toml");
    assert_eq!(refused_of_three(&server), 0, "no rate limit at start");
    let mut open = RawClient::connect(server.addr, "/ws/visitor?site=s").unwrap();
    open.set_read_timeout(Duration::from_secs(10));
    until(&mut open, "hello", |v| v["type"] == "hello");

    // A live key and a restart key change.
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "visitor_messages_per_second = 0",
        "visitor_messages_per_second = 0.1\nvisitor_message_burst = 1\n\
         [websocket]\nping_interval = \"7s\"",
    );
    std::fs::write(&path, text).unwrap();
    hangup(&server);
    assert!(
        server.has_logged("limits.visitor_message_burst, limits.visitor_messages_per_second"),
        "{}",
        server.logs()
    );
    assert!(server.has_logged("configuration reloaded"));
    assert!(server.has_logged("websocket.ping_interval"));
    assert!(server.has_logged("need a restart"));
    // The shards take it within their poll interval.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        refused_of_three(&server),
        2,
        "a new session has a burst of one"
    );
    // A session opened before the reload is limited too, from its next frame.
    for id in ["o1", "o2", "o3"] {
        open.send_json(&json!({"type": "message", "id": id, "text": "hi"}));
    }
    let refusal = until(&mut open, "a refusal", |v| v["type"] == "error");
    assert_eq!(refusal["code"], "rate_limited", "{refusal}");

    // An invalid file changes nothing and says why, with the file and line.
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        good.replace("visitor_message_burst = 1", "visitor_message_burst = 0"),
    )
    .unwrap();
    hangup(&server);
    assert!(server.has_logged("configuration reload refused"));
    assert!(server.has_logged("test.toml:"));
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(refused_of_three(&server), 2, "the previous limits stay");
    // The process is still serving (SIGHUP did not end it).
    assert_eq!(http_get(server.addr, "/healthz").0, 200);
}
