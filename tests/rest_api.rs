//! The admin REST API on the real binary, over loopback with a real storage directory:
//! conversations made by visitors over WebSocket and handed to an agent, then searched,
//! paged, read as transcripts (JSON and text) and exported (NDJSON) across shards; the queue
//! with waiting visitors; canned replies through create, change, delete and a restart; and the
//! knowledge base's get, delete and export (re-imported to the same entries).

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const PASSWORD: &str = "a good long password";

fn get(addr: SocketAddr, path: &str, bearer: &str) -> HttpReply {
    http_request(addr, "GET", path, Some(bearer), None)
}

fn send_json(addr: SocketAddr, method: &str, path: &str, bearer: &str, body: &Value) -> HttpReply {
    let body = body.to_string();
    http_request(
        addr,
        method,
        path,
        Some(bearer),
        Some(("application/json", body.as_bytes())),
    )
}

fn login(addr: SocketAddr, name: &str) -> String {
    let body = json!({"name": name, "password": PASSWORD}).to_string();
    let reply = http_request(
        addr,
        "POST",
        "/api/login",
        None,
        Some(("application/json", body.as_bytes())),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()["token"].as_str().unwrap().to_owned()
}

/// The next frame of `client` that satisfies `want` (others are skipped).
fn wait_for(client: &mut RawClient, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let frame = client
            .read_message()
            .unwrap_or_else(|| panic!("connection ended waiting for {what}"));
        let value = frame.json();
        if want(&value) {
            return value;
        }
    }
    panic!("timed out waiting for {what}");
}

/// A visitor of `site` that writes `text` and waits for its ack; returns the session and the
/// conversation id.
fn visitor_writes(server: &Server, site: &str, id: &str, text: &str) -> (RawClient, u64) {
    let path = visitor_path(server, site, id, None);
    let mut client = RawClient::connect(server.addr, &path).expect("visitor upgrade");
    let hello = wait_for(&mut client, "hello", |v| v["type"] == "hello");
    remember_visitor(server, &hello);
    client.send_json(&json!({"type": "message", "id": format!("{id}-1"), "text": text}));
    let ack = wait_for(&mut client, "ack", |v| v["type"] == "ack");
    (client, ack["conversation"].as_u64().unwrap())
}

fn ids_of(page: &Value) -> Vec<u64> {
    page["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_u64().unwrap())
        .collect()
}

#[test]
fn conversations_are_searched_read_and_exported_across_shards() {
    let server = Server::start("[agents]\nauto_assign = true\n");
    let config = server.dir.path().join("test.toml");
    agent_add(&config, "root", "admin", PASSWORD);
    agent_add(&config, "sue", "supervisor", PASSWORD);
    agent_add(&config, "al", "agent", PASSWORD);
    let addr = server.addr;
    let sue = login(addr, "sue");
    let al = login(addr, "al");
    let started = get(addr, "/api/queue", &sue);
    assert_eq!(started.status, 200, "{}", started.body);
    assert_eq!(started.json()["total"], 0);

    // Four visitors write before any agent is online: their conversations wait in the queue.
    let visitors = ["ann", "ben", "cat", "dan"];
    let mut sessions = Vec::new();
    let mut conversations = Vec::new();
    for (n, visitor) in visitors.iter().enumerate() {
        let (client, conversation) = visitor_writes(
            &server,
            "shop",
            visitor,
            &format!("question {n} from {visitor}"),
        );
        sessions.push(client);
        conversations.push(conversation);
        std::thread::sleep(Duration::from_millis(5));
    }
    let shards: BTreeSet<u64> = conversations.iter().map(|id| id & 0xff).collect();
    assert!(
        shards.len() > 1,
        "the visitors landed on one shard: {conversations:?}"
    );

    // The queue, as an agent sees it: every visitor waiting, in order, with positions.
    let deadline = Instant::now() + Duration::from_secs(10);
    let queue = loop {
        let queue = get(addr, "/api/queue", &al).json();
        if queue["total"] == 4 || Instant::now() > deadline {
            break queue;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(queue["total"], 4, "{queue}");
    assert_eq!(queue["agents_present"], false);
    let waiting: Vec<u64> = queue["waiting"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["conversation"].as_u64().unwrap())
        .collect();
    assert_eq!(waiting, conversations, "queue order is arrival order");
    assert_eq!(queue["waiting"][0]["position"], 1);
    assert_eq!(queue["waiting"][3]["position"], 4);
    assert!(
        queue["waiting"][0]["waited_ms"].as_u64().unwrap()
            >= queue["waiting"][3]["waited_ms"].as_u64().unwrap()
    );
    let limited = get(addr, "/api/queue?limit=2", &al).json();
    assert_eq!(
        (
            limited["total"].as_u64(),
            limited["waiting"].as_array().unwrap().len()
        ),
        (Some(4), 2)
    );

    // Al comes online and gets them (auto-assignment), answers ann's and closes ben's.
    let mut agent = RawClient::connect(addr, &format!("/ws/agent?token={al}")).expect("agent");
    for _ in 0..4 {
        wait_for(&mut agent, "assigned", |v| v["type"] == "assigned");
    }
    agent.send_json(&json!({"type": "message", "conversation": conversations[0], "id": "a1", "text": "Hello ann, how can I help?"}));
    wait_for(&mut agent, "ack", |v| v["type"] == "ack");
    agent.send_json(&json!({"type": "close", "conversation": conversations[1]}));
    wait_for(&mut sessions[1], "closed", |v| v["type"] == "closed");
    assert_eq!(get(addr, "/api/queue", &al).json()["total"], 0);

    // An agent may not search; a supervisor may.
    assert_eq!(get(addr, "/api/conversations", &al).status, 403);
    let all = get(addr, "/api/conversations", &sue);
    assert_eq!(all.status, 200, "{}", all.body);
    let all = all.json();
    let mut newest_first = conversations.clone();
    newest_first.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(ids_of(&all), newest_first);
    assert_eq!(all["next"], Value::Null);

    // By visitor (one shard read), by status, by agent, by time.
    let ann = get(addr, "/api/conversations?site=shop&visitor=ann", &sue).json();
    assert_eq!(ids_of(&ann), [conversations[0]]);
    assert_eq!(ann["conversations"][0]["status"], "assigned");
    assert_eq!(ann["conversations"][0]["agent"], "al");
    assert_eq!(ann["conversations"][0]["messages"], 2);
    let closed = get(addr, "/api/conversations?status=closed", &sue).json();
    assert_eq!(ids_of(&closed), [conversations[1]]);
    let by_al = get(addr, "/api/conversations?agent=al", &sue).json();
    assert_eq!(
        ids_of(&by_al).len(),
        3,
        "assigned to al: ann, cat, dan; {by_al}"
    );
    let dan_created = get(
        addr,
        &format!("/api/conversations/{}", conversations[3]),
        &sue,
    )
    .json();
    let created = dan_created["created"].as_str().unwrap().to_owned();
    let late = get(addr, &format!("/api/conversations?to={created}"), &sue).json();
    assert!(ids_of(&late).contains(&conversations[3]));
    let before_dan = get(addr, "/api/conversations?to=1000", &sue).json();
    assert_eq!(ids_of(&before_dan), Vec::<u64>::new());

    // Paging: one at a time, every conversation once, newest first.
    let mut paged = Vec::new();
    let mut path = "/api/conversations?limit=1".to_string();
    loop {
        let page = get(addr, &path, &sue).json();
        paged.extend(ids_of(&page));
        match page["next"].as_u64() {
            Some(next) => path = format!("/api/conversations?limit=1&before={next}"),
            None => break,
        }
        assert!(paged.len() <= 4, "paging does not end: {paged:?}");
    }
    assert_eq!(paged, newest_first);

    // The transcript as JSON and as text.
    let transcript = get(
        addr,
        &format!("/api/conversations/{}/transcript", conversations[0]),
        &sue,
    );
    assert_eq!(transcript.status, 200, "{}", transcript.body);
    let transcript = transcript.json();
    assert_eq!(transcript["messages"][0]["text"], "question 0 from ann");
    assert_eq!(transcript["messages"][0]["from"], "visitor");
    assert_eq!(
        transcript["messages"][1]["text"],
        "Hello ann, how can I help?"
    );
    assert_eq!(transcript["messages"][1]["from"], "agent");
    let text = get(
        addr,
        &format!(
            "/api/conversations/{}/transcript?format=text",
            conversations[0]
        ),
        &sue,
    );
    assert_eq!(
        text.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert!(
        text.body.contains("(agent): Hello ann, how can I help?"),
        "{}",
        text.body
    );
    let one = get(
        addr,
        &format!("/api/conversations/{}/transcript?limit=1", conversations[0]),
        &sue,
    )
    .json();
    assert_eq!(one["next_after"], 1);
    let rest = get(
        addr,
        &format!("/api/conversations/{}/transcript?after=1", conversations[0]),
        &sue,
    )
    .json();
    assert_eq!(rest["messages"][0]["seq"], 2);

    // The export: NDJSON pages joined by X-Next-Cursor hold every conversation with its messages.
    let mut exported = Vec::new();
    let mut path = "/api/conversations/export?limit=3&from=0".to_string();
    loop {
        let page = get(addr, &path, &sue);
        assert_eq!(page.status, 200, "{}", page.body);
        assert_eq!(page.header("content-type"), Some("application/x-ndjson"));
        for line in page.body.lines() {
            exported.push(serde_json::from_str::<Value>(line).unwrap());
        }
        match page.header("x-next-cursor") {
            Some(next) => path = format!("/api/conversations/export?limit=3&from=0&before={next}"),
            None => break,
        }
    }
    let exported_ids: Vec<u64> = exported.iter().map(|c| c["id"].as_u64().unwrap()).collect();
    assert_eq!(exported_ids, newest_first);
    let ann_line = exported.iter().find(|c| c["visitor"] == "ann").unwrap();
    assert_eq!(ann_line["messages"].as_array().unwrap().len(), 2);
    assert_eq!(ann_line["truncated"], false);

    // Errors in the one shape.
    let missing = get(addr, "/api/conversations/999999999/transcript", &sue);
    assert_eq!(
        (missing.status, missing.json()["error"]["code"].clone()),
        (404, json!("unknown_conversation"))
    );
    let bad = get(addr, "/api/conversations?status=open", &sue);
    assert_eq!(
        (bad.status, bad.json()["error"]["code"].clone()),
        (400, json!("bad_request"))
    );
    let wrong = http_request(addr, "DELETE", "/api/queue", Some(&sue), None);
    assert_eq!((wrong.status, wrong.header("allow")), (405, Some("GET")));
}

#[test]
fn canned_replies_survive_a_restart() {
    let server = Server::start("");
    let config = server.dir.path().join("test.toml");
    agent_add(&config, "sue", "supervisor", PASSWORD);
    agent_add(&config, "al", "agent", PASSWORD);
    let addr = server.addr;
    let sue = login(addr, "sue");
    let al = login(addr, "al");

    let hello = json!({"title": "Greeting", "text": "Hello! How can I help?", "shortcut": "hi", "tags": ["opening"]});
    let created = send_json(addr, "POST", "/api/canned", &sue, &hello);
    assert_eq!(created.status, 201, "{}", created.body);
    assert_eq!(created.json()["id"], 1);
    let wait = json!({"title": "Wait", "text": "One moment please."});
    assert_eq!(
        send_json(addr, "POST", "/api/canned", &sue, &wait).json()["id"],
        2
    );
    let bye = json!({"title": "Bye", "text": "Have a nice day."});
    assert_eq!(
        send_json(addr, "POST", "/api/canned", &sue, &bye).json()["id"],
        3
    );
    // An agent reads them but may not write; a taken shortcut is a conflict.
    assert_eq!(
        send_json(addr, "POST", "/api/canned", &al, &wait).status,
        403
    );
    let taken = send_json(
        addr,
        "POST",
        "/api/canned",
        &sue,
        &json!({"title": "x", "text": "y", "shortcut": "HI"}),
    );
    assert_eq!(
        (taken.status, taken.json()["error"]["code"].clone()),
        (409, json!("shortcut_taken"))
    );
    let bad = send_json(
        addr,
        "POST",
        "/api/canned",
        &sue,
        &json!({"title": " ", "text": "y"}),
    );
    assert_eq!(bad.status, 400);
    let changed = send_json(
        addr,
        "PUT",
        "/api/canned/2",
        &sue,
        &json!({"title": "Wait", "text": "One moment, I am checking."}),
    );
    assert_eq!(changed.status, 200, "{}", changed.body);
    assert_eq!(
        http_request(addr, "DELETE", "/api/canned/3", Some(&sue), None).status,
        200
    );
    assert_eq!(
        http_request(addr, "DELETE", "/api/canned/3", Some(&al), None).status,
        403
    );
    let page = get(addr, "/api/canned?limit=1", &al).json();
    assert_eq!(
        (
            page["replies"][0]["id"].as_u64(),
            page["next_after"].as_u64()
        ),
        (Some(1), Some(1))
    );

    // A restart on the same directory.
    let dir = server.crash();
    let server = Server::start_in(dir, "");
    let addr = server.addr;
    let al = login(addr, "al");
    let sue = login(addr, "sue");
    let listed = get(addr, "/api/canned", &al).json();
    let titles: Vec<&str> = listed["replies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["Greeting", "Wait"]);
    assert_eq!(listed["replies"][1]["text"], "One moment, I am checking.");
    assert_eq!(listed["replies"][0]["shortcut"], "hi");
    assert_eq!(get(addr, "/api/canned/3", &al).status, 404);
    assert_eq!(
        get(addr, "/api/canned?q=moment", &al).json()["replies"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Ids are never reused.
    assert_eq!(
        send_json(addr, "POST", "/api/canned", &sue, &bye).json()["id"],
        4
    );
}

#[test]
fn knowledge_base_entries_are_read_deleted_and_exported() {
    let server = Server::start("[inference]\nenabled = true\n");
    let config = server.dir.path().join("test.toml");
    agent_add(&config, "root", "admin", PASSWORD);
    let addr = server.addr;
    let root = login(addr, "root");
    let empty = get(addr, "/api/kb/export", &root);
    assert_eq!((empty.status, empty.json()), (200, json!([])));
    let csv = banking77_kb(&BANKING77_ANSWERS[..3]);
    let imported = http_request(
        addr,
        "POST",
        "/api/kb/import",
        Some(&root),
        Some(("text/csv", csv.as_bytes())),
    );
    assert_eq!(imported.status, 200, "{}", imported.body);

    let entry = get(addr, "/api/kb/entries/card_arrival", &root);
    assert_eq!(entry.status, 200, "{}", entry.body);
    assert_eq!(
        entry.json()["answer"],
        "Cards arrive within 3 working days."
    );
    assert_eq!(get(addr, "/api/kb/entries/nothing_here", &root).status, 404);

    // The export re-imports to the same entries.
    let exported = get(addr, "/api/kb/export", &root);
    assert_eq!(exported.status, 200);
    let before = get(addr, "/api/kb/entries", &root).json();
    let again = http_request(
        addr,
        "POST",
        "/api/kb/import",
        Some(&root),
        Some(("application/json", exported.body.as_bytes())),
    );
    assert_eq!(again.status, 200, "{}", again.body);
    let after = get(addr, "/api/kb/entries", &root).json();
    assert_eq!(after["entries"], before["entries"]);
    assert_eq!(
        after["version"].as_u64(),
        before["version"].as_u64().map(|v| v + 1)
    );

    // Deleting an entry stores a new version without it.
    let deleted = http_request(
        addr,
        "DELETE",
        "/api/kb/entries/exchange_rate",
        Some(&root),
        None,
    );
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(deleted.json()["deleted"], "exchange_rate");
    assert_eq!(deleted.json()["entries"], 2);
    assert_eq!(
        get(addr, "/api/kb/entries/exchange_rate", &root).status,
        404
    );
    let left: Vec<Value> = serde_json::from_str(&get(addr, "/api/kb/export", &root).body).unwrap();
    let ids: Vec<&str> = left.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["card_arrival", "lost_or_stolen_card"]);
    assert_eq!(
        http_request(
            addr,
            "DELETE",
            "/api/kb/entries/exchange_rate",
            Some(&root),
            None
        )
        .status,
        404
    );
}
