//! The admin endpoints on the real binary: an admin made with `switchboard agent add` logs
//! in, imports a knowledge base over `POST /api/kb/import`, lists and searches its entries,
//! tries a question and gets the right intent, and reads the audit log with the import's
//! record in it; an agent's token gets 403 on each. Needs the model at `models/cache`.

mod common;

use std::net::SocketAddr;

use common::{agent_add, banking77_kb, Server};
use serde_json::{json, Value};

const PASSWORD: &str = "a good long password";

const CONFIG: &str = r#"
[inference]
enabled = true

[bot]
confidence_threshold = 0.45
margin_threshold = 0.0
"#;

/// One HTTP request; returns the status and the JSON body (`Null` when not JSON).
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<(&str, &[u8])>,
) -> (u16, Value) {
    let reply = common::http_request(addr, method, path, bearer, body);
    (reply.status, reply.json())
}

fn token_of(addr: SocketAddr, name: &str) -> String {
    let body = json!({"name": name, "password": PASSWORD}).to_string();
    let (status, reply) = request(
        addr,
        "POST",
        "/api/login",
        None,
        Some(("application/json", body.as_bytes())),
    );
    assert_eq!(status, 200, "{reply}");
    reply["token"].as_str().unwrap().to_owned()
}

#[test]
fn admin_imports_searches_tries_and_reads_the_audit_log() {
    let server = Server::start(CONFIG);
    let config = server.dir.path().join("test.toml");
    agent_add(&config, "root", "admin", PASSWORD);
    agent_add(&config, "al", "agent", PASSWORD);
    agent_add(&config, "sue", "supervisor", PASSWORD);
    let addr = server.addr;
    let admin = token_of(addr, "root");
    let agent = token_of(addr, "al");
    let supervisor = token_of(addr, "sue");

    // Before any import: the list is empty and a malformed import changes nothing.
    let (status, reply) = request(addr, "GET", "/api/kb/entries", Some(&admin), None);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["entries"], json!([]));
    let (status, reply) = request(
        addr,
        "POST",
        "/api/kb/import",
        Some(&admin),
        Some(("text/csv", b"text,category\n\"unclosed,x\n")),
    );
    assert_eq!(status, 400, "{reply}");
    assert_eq!(reply["error"]["code"], "invalid_knowledge_base");

    // The import.
    let csv = banking77_kb(&common::BANKING77_ANSWERS);
    let (status, reply) = request(
        addr,
        "POST",
        "/api/kb/import",
        Some(&admin),
        Some(("text/csv", csv.as_bytes())),
    );
    assert_eq!(status, 200, "{reply}\n{}", server.logs());
    assert_eq!(reply["version"], 1);
    assert_eq!(reply["entries"], 4);
    assert_eq!(reply["questions"], 48);

    // List and search.
    let (status, reply) = request(addr, "GET", "/api/kb/entries", Some(&admin), None);
    assert_eq!(status, 200, "{reply}");
    let entries = reply["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 4);
    assert_eq!(entries[0]["category"], "card_arrival");
    assert_eq!(entries[0]["questions"].as_array().unwrap().len(), 12);
    let (status, reply) = request(
        addr,
        "GET",
        "/api/kb/entries?q=INTERBANK%20rate",
        Some(&admin),
        None,
    );
    assert_eq!(status, 200, "{reply}");
    let ids: Vec<&str> = reply["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["exchange_rate"]);

    // Try a question (admin and supervisor).
    for token in [&admin, &supervisor] {
        let body =
            json!({"text": "my new card still has not arrived, when will it come?"}).to_string();
        let (status, reply) = request(
            addr,
            "POST",
            "/api/kb/try",
            Some(token),
            Some(("application/json", body.as_bytes())),
        );
        assert_eq!(status, 200, "{reply}");
        assert_eq!(reply["intent"], "card_arrival", "{reply}");
        assert_eq!(reply["answer"], "Cards arrive within 3 working days.");
        assert_eq!(reply["fallback"], false);
        assert!(reply["confidence"].as_f64().unwrap() >= 0.45, "{reply}");
    }

    // The audit log holds the import, by the admin, and the chain is intact.
    let (status, reply) = request(addr, "GET", "/api/audit?limit=50", Some(&admin), None);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["intact"], true, "{reply}");
    assert_eq!(reply["head"].as_str().unwrap().len(), 64);
    let records = reply["records"].as_array().unwrap();
    let import = records
        .iter()
        .find(|r| r["kind"] == "kb_imported")
        .unwrap_or_else(|| panic!("no kb_imported record in {reply}"));
    assert_eq!(import["actor"], "api:root", "{import}");
    assert_eq!(import["detail"]["version"], 1);
    let (_, reply) = request(addr, "GET", "/api/audit?limit=1", Some(&admin), None);
    assert_eq!(reply["records"].as_array().unwrap().len(), 1);
    let (status, reply) = request(addr, "GET", "/api/audit?limit=0", Some(&admin), None);
    assert_eq!(
        (status, &reply["error"]["code"]),
        (400, &json!("bad_request"))
    );

    // An agent gets 403 on each, without a token 401; nothing was imported by them.
    let try_body = json!({"text": "where is my card"}).to_string();
    type Body<'a> = Option<(&'a str, &'a [u8])>;
    let calls: [(&str, &str, Body<'_>); 4] = [
        ("GET", "/api/audit", None),
        ("GET", "/api/kb/entries?q=card", None),
        (
            "POST",
            "/api/kb/try",
            Some(("application/json", try_body.as_bytes())),
        ),
        ("POST", "/api/kb/import", Some(("text/csv", csv.as_bytes()))),
    ];
    for (method, path, body) in calls {
        let (status, reply) = request(addr, method, path, Some(&agent), body);
        assert_eq!(status, 403, "{method} {path}: {reply}");
        assert_eq!(reply["error"]["code"], "forbidden");
        let (status, reply) = request(addr, method, path, None, body);
        assert_eq!(status, 401, "{method} {path}: {reply}");
    }
    // A supervisor may try and read the audit log but not import or list.
    let (status, _) = request(addr, "GET", "/api/audit", Some(&supervisor), None);
    assert_eq!(status, 200);
    let (status, _) = request(addr, "GET", "/api/kb/entries", Some(&supervisor), None);
    assert_eq!(status, 403);
    let (status, reply) = request(addr, "GET", "/api/kb/entries", Some(&admin), None);
    assert_eq!(status, 200);
    assert_eq!(reply["version"], 1, "the refused imports changed nothing");
}
