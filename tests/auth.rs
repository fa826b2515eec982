//! Agent accounts, login, tokens and RBAC on the real binary: `switchboard agent ...` over
//! the real account store, `POST /api/login` over loopback, and `/ws/agent?token=`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const PASSWORD: &str = "a good long password";

/// Runs `switchboard agent ARGS --config CONFIG`, feeding `stdin`.
fn agent_cli(config: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(BIN)
        .arg("agent")
        .args(args)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run switchboard agent");
    // A command that refuses its arguments exits before reading stdin: a broken pipe here is
    // that exit, which the caller checks.
    match child.stdin.take().unwrap().write_all(stdin.as_bytes()) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(err) => panic!("write the password: {err}"),
    }
    child.wait_with_output().unwrap()
}

fn add(config: &Path, name: &str, role: &str) {
    let out = agent_cli(
        config,
        &["add", name, "--role", role],
        &format!("{PASSWORD}\n"),
    );
    assert!(
        out.status.success(),
        "agent add {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn config_of(server: &Server) -> PathBuf {
    server.dir.path().join("test.toml")
}

/// A raw HTTP request; returns status, the whole head and the JSON body.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> (u16, String, Value) {
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
    if let Some(token) = bearer {
        text.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if let Some(body) = body {
        text.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        text.push_str("\r\n");
    }
    raw(addr, text.as_bytes())
}

fn raw(addr: SocketAddr, bytes: &[u8]) -> (u16, String, Value) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let value = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, head.to_owned(), value)
}

fn login(addr: SocketAddr, name: &str, password: &str) -> (u16, String, Value) {
    let body = json!({"name": name, "password": password}).to_string();
    request(addr, "POST", "/api/login", None, Some(&body))
}

fn token_of(addr: SocketAddr, name: &str) -> String {
    let (status, _, body) = login(addr, name, PASSWORD);
    assert_eq!(status, 200, "{body}");
    body["token"].as_str().unwrap().to_owned()
}

fn agent_hello(addr: SocketAddr, token: &str) -> (RawClient, Value) {
    let mut client = RawClient::connect(addr, &format!("/ws/agent?token={token}"))
        .unwrap_or_else(|e| panic!("agent upgrade refused: {e:?}"));
    let hello = client.read_json();
    assert_eq!(hello["type"], "hello", "{hello}");
    (client, hello)
}

/// Reads frames until one satisfies `want` (15 s at most).
fn wait_for(client: &mut RawClient, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let Some(frame) = client.read_message() else {
            panic!("connection ended waiting for {what}; saw {seen:#?}")
        };
        let value = frame.json();
        if want(&value) {
            return value;
        }
        seen.push(value);
    }
    panic!("timed out waiting for {what}; saw {seen:#?}");
}

#[test]
fn agent_add_login_and_token_opens_the_agent_socket() {
    let server = Server::start("");
    let config = config_of(&server);
    let out = agent_cli(
        &config,
        &[
            "add",
            "alice",
            "--role",
            "agent",
            "--display",
            "Alice A.",
            "--max-open",
            "3",
        ],
        &format!("{PASSWORD}\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The secret was created on first start, 0600, 32 bytes.
    let secret = server.dir.path().join("data/auth-secret");
    let meta = std::fs::metadata(&secret).expect("secret file created at start");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), 32);

    let (status, head, body) = login(server.addr, "alice", PASSWORD);
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("Content-Type: application/json"), "{head}");
    let token = body["token"].as_str().unwrap().to_owned();
    let expires = body["expires"].as_str().unwrap();
    assert!(expires.ends_with('Z') && expires.len() == 20, "{expires}");

    let (_agent, hello) = agent_hello(server.addr, &token);
    assert_eq!(hello["agent"], "Alice A.");
    assert_eq!(hello["id"], "alice");

    let (status, _, me) = request(server.addr, "GET", "/api/me", Some(&token), None);
    assert_eq!(status, 200, "{me}");
    assert_eq!(
        (
            me["name"].as_str(),
            me["role"].as_str(),
            me["max_open"].as_u64()
        ),
        (Some("alice"), Some("agent"), Some(3))
    );

    let (status, _, refreshed) =
        request(server.addr, "POST", "/api/refresh", Some(&token), Some(""));
    assert_eq!(status, 200, "{refreshed}");
    agent_hello(server.addr, refreshed["token"].as_str().unwrap());

    // A token not from this server's secret is refused.
    let forged = format!("{}A", &token[..token.len() - 1]);
    let forged = if forged == token {
        format!("{}B", &token[..token.len() - 1])
    } else {
        forged
    };
    assert_eq!(
        RawClient::connect(server.addr, &format!("/ws/agent?token={forged}"))
            .err()
            .unwrap()
            .0,
        401
    );
    // Signed tokens survive a restart (the secret file is reused).
    let dir = server.crash();
    let server = Server::start_in(dir, "");
    agent_hello(server.addr, &token);
}

#[test]
fn wrong_password_and_unknown_name_answer_alike() {
    let server = Server::start("");
    add(&config_of(&server), "bob", "agent");
    let wrong = login(server.addr, "bob", "not the password");
    let unknown = login(server.addr, "nobody", "not the password");
    assert_eq!(wrong.0, 401);
    assert_eq!(unknown.0, 401);
    assert_eq!(wrong.2, unknown.2, "same body: no account enumeration");
    assert_eq!(wrong.2["error"]["code"], "invalid_credentials");
    // Malformed bodies and limits.
    let (status, _, body) = request(
        server.addr,
        "POST",
        "/api/login",
        None,
        Some("{\"name\":1}"),
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_request"))
    );
    let (status, _, body) = raw(server.addr, b"POST /api/login HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (411, Some("length_required"))
    );
    let (status, _, body) = raw(
        server.addr,
        b"POST /api/login HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n{",
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("body_too_large"))
    );
    let (status, _, _) = request(server.addr, "GET", "/api/login", None, None);
    assert_eq!(status, 405);
    // A missing agent token: a proper 401 status line (was "401 Unknown").
    let (status, head, _) = raw(server.addr, b"GET /ws/agent HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status, 401);
    assert!(head.starts_with("HTTP/1.1 401 Unauthorized"), "{head}");
}

#[test]
fn lockout_after_failures_is_visible_and_survives_restart() {
    let overlay = "[auth]\nlockout_failures = 3\nlockout_time = \"1h\"\n";
    let server = Server::start(overlay);
    let config = config_of(&server);
    add(&config, "carol", "agent");
    add(&config, "root", "admin");
    for _ in 0..3 {
        assert_eq!(login(server.addr, "carol", "wrong password!").0, 401);
    }
    // Locked: the right password answers exactly as a wrong one.
    let locked = login(server.addr, "carol", PASSWORD);
    assert_eq!(locked.0, 401);
    assert_eq!(locked.2, login(server.addr, "nobody", PASSWORD).2);

    let list = agent_cli(&config, &["list"], "");
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    let carol = list.lines().find(|l| l.starts_with("carol")).unwrap();
    assert!(carol.contains("locked until"), "{list}");

    let admin = token_of(server.addr, "root");
    let (status, _, agents) = request(server.addr, "GET", "/api/agents", Some(&admin), None);
    assert_eq!(status, 200);
    let entry = agents["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "carol")
        .unwrap()
        .clone();
    assert_eq!(entry["locked"], true, "{entry}");

    // The lock is in the store: it survives a restart.
    let dir = server.crash();
    let server = Server::start_in(dir, overlay);
    assert_eq!(login(server.addr, "carol", PASSWORD).0, 401);
    let out = agent_cli(&config, &["unlock", "carol"], "");
    assert!(out.status.success());
    assert_eq!(login(server.addr, "carol", PASSWORD).0, 200);
}

#[test]
fn login_rate_limit_answers_429_with_retry_after() {
    let server = Server::start("[auth]\nlogin_per_account_per_minute = 2\n");
    add(&config_of(&server), "dave", "agent");
    assert_eq!(login(server.addr, "dave", "wrong password!").0, 401);
    assert_eq!(login(server.addr, "dave", "wrong password!").0, 401);
    // Both shards keep their own buckets; within a few more attempts both refuse.
    let mut refused = None;
    for _ in 0..6 {
        let answer = login(server.addr, "dave", PASSWORD);
        if answer.0 == 429 {
            refused = Some(answer);
            break;
        }
    }
    let (_, head, body) = refused.expect("a 429 after the per-account budget");
    assert_eq!(body["error"]["code"], "rate_limited");
    let retry: u64 = head
        .lines()
        .find_map(|l| l.strip_prefix("Retry-After: "))
        .expect("Retry-After header")
        .trim()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
}

#[test]
fn disabled_and_expired_tokens_are_refused() {
    let server = Server::start("");
    let config = config_of(&server);
    add(&config, "erin", "agent");
    let token = token_of(server.addr, "erin");
    agent_hello(server.addr, &token);
    let out = agent_cli(&config, &["disable", "erin"], "");
    assert!(out.status.success());
    assert_eq!(
        RawClient::connect(server.addr, &format!("/ws/agent?token={token}"))
            .err()
            .unwrap()
            .0,
        401
    );
    assert_eq!(login(server.addr, "erin", PASSWORD).0, 401);
    let out = agent_cli(&config, &["enable", "erin"], "");
    assert!(out.status.success());
    assert_eq!(
        RawClient::connect(server.addr, &format!("/ws/agent?token={token}"))
            .err()
            .unwrap()
            .0,
        401,
        "enabling again does not revive old tokens"
    );

    // An expired token, correctly signed with this server's secret.
    let key: [u8; 32] = std::fs::read(server.dir.path().join("data/auth-secret"))
        .unwrap()
        .try_into()
        .unwrap();
    let expired = switchboard::auth::token::sign(
        &switchboard::auth::token::SigningKey::new(key),
        &switchboard::auth::token::Claims {
            name: "erin".into(),
            role: switchboard::auth::rbac::Role::Agent,
            expires: switchboard::auth::clock::unix_now() - 1,
            generation: 1,
        },
    );
    let (status, body) = RawClient::connect(server.addr, &format!("/ws/agent?token={expired}"))
        .err()
        .unwrap();
    assert_eq!(status, 401);
    assert!(body.contains("expired"), "{body}");
    let (status, _, body) = request(server.addr, "GET", "/api/me", Some(&expired), None);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("token_expired"))
    );
    // The same claims not yet expired work (generation 1 after the disable).
    let valid = switchboard::auth::token::sign(
        &switchboard::auth::token::SigningKey::new(key),
        &switchboard::auth::token::Claims {
            name: "erin".into(),
            role: switchboard::auth::rbac::Role::Agent,
            expires: switchboard::auth::clock::unix_now() + 60,
            generation: 1,
        },
    );
    agent_hello(server.addr, &valid);
}

#[test]
fn static_tokens_only_in_dev_mode() {
    let accounts = "[agents.accounts.sam]\ntoken = \"sam-static-token-0123\"\nname = \"Sam\"\n";
    let server = Server::start(accounts);
    assert_eq!(
        RawClient::connect(server.addr, "/ws/agent?token=sam-static-token-0123")
            .err()
            .unwrap()
            .0,
        401
    );
    assert!(
        server.logs().contains("static tokens are ignored"),
        "{}",
        server.logs()
    );
    drop(server);
    let server = Server::start(&format!("[agents]\ndev_static_tokens = true\n{accounts}"));
    assert!(
        server.logs().contains("DEVELOPMENT MODE"),
        "{}",
        server.logs()
    );
    let (_, hello) = agent_hello(server.addr, "sam-static-token-0123");
    assert_eq!(hello["agent"], "Sam");
}

#[test]
fn agent_cli_refuses_bad_input_with_exit_2() {
    let server = Server::start("");
    let config = config_of(&server);
    let cases: [(&[&str], &str, &str); 6] = [
        (
            &["add", "x1", "--role", "root"],
            "a good long password\n",
            "unknown role",
        ),
        (&["add", "x2", "--role", "agent"], "\n", "empty"),
        (&["add", "x3", "--role", "agent"], "short\n", "too short"),
        (
            &["add", "bad name", "--role", "agent"],
            "a good long password\n",
            "invalid account name",
        ),
        (&["disable", "ghost"], "", "no agent account"),
        (&["role", "ghost", "admin"], "", "no agent account"),
    ];
    for (args, stdin, message) in cases {
        let out = agent_cli(&config, args, stdin);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
    add(&config, "x4", "agent");
    let out = agent_cli(
        &config,
        &["add", "x4", "--role", "agent"],
        "a good long password\n",
    );
    assert_eq!(out.status.code(), Some(2));
    let list = String::from_utf8_lossy(&agent_cli(&config, &["list"], "").stdout).into_owned();
    assert!(list.contains("x4") && !list.contains("x1"), "{list}");
}

#[test]
fn rbac_agent_refused_supervisor_allowed() {
    let server = Server::start("[inference]\nenabled = false\n");
    let config = config_of(&server);
    for (name, role) in [
        ("al", "agent"),
        ("bo", "agent"),
        ("sue", "supervisor"),
        ("root", "admin"),
    ] {
        add(&config, name, role);
    }
    let (al_token, bo_token, sue_token, root_token) = (
        token_of(server.addr, "al"),
        token_of(server.addr, "bo"),
        token_of(server.addr, "sue"),
        token_of(server.addr, "root"),
    );
    // Admin API: an agent and a supervisor are refused, an admin allowed.
    for token in [&al_token, &sue_token] {
        let (status, _, body) = request(server.addr, "GET", "/api/agents", Some(token), None);
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (403, Some("forbidden"))
        );
        let create = json!({"name": "new1", "password": PASSWORD, "role": "admin"}).to_string();
        assert_eq!(
            request(
                server.addr,
                "POST",
                "/api/agents",
                Some(token),
                Some(&create)
            )
            .0,
            403
        );
    }
    let create = json!({"name": "new1", "password": PASSWORD, "role": "agent"}).to_string();
    assert_eq!(
        request(
            server.addr,
            "POST",
            "/api/agents",
            Some(&root_token),
            Some(&create)
        )
        .0,
        201
    );
    let role = json!({"role": "supervisor"}).to_string();
    let (status, _, body) = request(
        server.addr,
        "PUT",
        "/api/agents/new1/role",
        Some(&root_token),
        Some(&role),
    );
    assert_eq!((status, body["role"].as_str()), (200, Some("supervisor")));
    assert_eq!(
        request(
            server.addr,
            "POST",
            "/api/agents/new1/disable",
            Some(&root_token),
            Some("")
        )
        .0,
        200
    );
    assert_eq!(
        login(server.addr, "new1", PASSWORD).0,
        401,
        "disabled through the API"
    );

    // A conversation assigned to al.
    let (mut al, _) = agent_hello(server.addr, &al_token);
    let mut visitor =
        RawClient::connect(server.addr, "/ws/visitor?site=acme&visitor=rbac-visitor").unwrap();
    assert_eq!(visitor.read_json()["type"], "hello");
    visitor.send_json(&json!({"type": "message", "id": "q1", "text": "I need a human"}));
    // The first message creates the conversation; a second hello names it.
    let conversation = loop {
        let frame = visitor.read_json();
        if frame["type"] == "hello" {
            if let Some(id) = frame["conversation"].as_u64() {
                break id;
            }
        }
    };
    wait_for(&mut al, "assignment", |v| {
        v["type"] == "assigned" && v["conversation"] == conversation
    });
    let (mut bo, _) = agent_hello(server.addr, &bo_token);
    let (mut sue, _) = agent_hello(server.addr, &sue_token);

    // bo (agent) may not move al's conversation; nor write in it.
    bo.send_json(&json!({"type": "transfer", "conversation": conversation, "to": "bo"}));
    let error = wait_for(&mut bo, "refusal", |v| v["type"] == "error");
    assert_eq!(error["code"], "not_assigned");
    bo.send_json(
        &json!({"type": "message", "conversation": conversation, "id": "m", "text": "hi"}),
    );
    let error = wait_for(&mut bo, "refusal", |v| v["type"] == "error");
    assert_eq!(error["code"], "not_assigned");

    // sue (supervisor) may move it to bo.
    sue.send_json(&json!({"type": "transfer", "conversation": conversation, "to": "bo"}));
    wait_for(&mut bo, "assigned by the supervisor", |v| {
        v["type"] == "assigned" && v["conversation"] == conversation
    });
    wait_for(&mut al, "transferred away", |v| {
        v["type"] == "transferred" && v["conversation"] == conversation
    });
    bo.send_json(
        &json!({"type": "message", "conversation": conversation, "id": "m2", "text": "Bo here"}),
    );
    let reply = wait_for(&mut visitor, "bo's reply", |v| {
        v["type"] == "message" && v["text"] == "Bo here"
    });
    assert_eq!(reply["name"], "bo");
}

#[test]
fn api_body_may_arrive_in_pieces_within_the_head_timeout() {
    let server = Server::start("[http]\nhandshake_timeout = \"1s\"\n");
    add(&config_of(&server), "fay", "agent");
    let body = json!({"name": "fay", "password": PASSWORD}).to_string();
    let head = format!(
        "POST /api/login HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    // Head and half the body, a pause, then the rest: read as one body.
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (first, rest) = body.split_at(body.len() / 2);
    stream
        .write_all(format!("{head}{first}").as_bytes())
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stream.write_all(rest.as_bytes()).unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"token\":\"sb1."), "{response}");

    // A body that never completes: 408 after the timeout, in the API's error shape.
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(format!("{head}{first}").as_bytes())
        .unwrap();
    let started = Instant::now();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(response.contains("\"code\":\"timeout\""), "{response}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// The audit records (parsed lines) once one of kind `last` is there (10 s at most).
fn audit_records_until(server: &Server, last: &str) -> Vec<Value> {
    let path = server.dir.path().join("data/audit.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records: Vec<Value> = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        if records.iter().any(|r| r["kind"] == last) {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "no {last} record; have {records:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn supervisor_watches_any_conversation_and_agent_actions_are_audited() {
    let server = Server::start("[inference]\nenabled = false\n");
    let config = config_of(&server);
    for (name, role) in [("al", "agent"), ("bo", "agent"), ("sue", "supervisor")] {
        add(&config, name, role);
    }
    let (al_token, bo_token, sue_token) = (
        token_of(server.addr, "al"),
        token_of(server.addr, "bo"),
        token_of(server.addr, "sue"),
    );
    // A conversation assigned to al (the only agent connected), with a message in it.
    let (mut al, _) = agent_hello(server.addr, &al_token);
    let mut visitor =
        RawClient::connect(server.addr, "/ws/visitor?site=acme&visitor=watched-visitor").unwrap();
    assert_eq!(visitor.read_json()["type"], "hello");
    visitor.send_json(&json!({"type": "message", "id": "q1", "text": "I need a human"}));
    let conversation = wait_for(&mut visitor, "the conversation", |v| {
        v["type"] == "hello" && v["conversation"].is_u64()
    })["conversation"]
        .as_u64()
        .unwrap();
    wait_for(&mut al, "assignment", |v| {
        v["type"] == "assigned" && v["conversation"] == conversation
    });
    let (mut bo, _) = agent_hello(server.addr, &bo_token);
    let (mut sue, _) = agent_hello(server.addr, &sue_token);

    // An agent may not watch someone else's conversation.
    bo.send_json(&json!({"type": "watch", "conversation": conversation}));
    let error = wait_for(&mut bo, "refusal", |v| v["type"] == "error");
    assert_eq!(error["code"], "forbidden", "{error}");

    // A supervisor watches it: its state, its history, then live traffic of both sides.
    sue.send_json(&json!({"type": "watch", "conversation": conversation}));
    let info = wait_for(&mut sue, "watching", |v| v["type"] == "watching");
    assert_eq!(
        (
            info["conversation"].as_u64(),
            &info["state"],
            &info["agent"]
        ),
        (Some(conversation), &json!("assigned"), &json!("al")),
        "{info}"
    );
    let history = wait_for(&mut sue, "history", |v| v["type"] == "message");
    assert_eq!(history["text"], "I need a human");
    assert_eq!(history["seq"], 1);
    visitor.send_json(&json!({"type": "message", "id": "q2", "text": "anyone?"}));
    wait_for(&mut sue, "the visitor's live message", |v| {
        v["type"] == "message" && v["text"] == "anyone?"
    });
    al.send_json(
        &json!({"type": "message", "conversation": conversation, "id": "a1", "text": "Al here"}),
    );
    wait_for(&mut sue, "the agent's live message", |v| {
        v["type"] == "message" && v["text"] == "Al here" && v["from"] == "agent"
    });
    // Watching is not holding: the supervisor cannot write in it.
    sue.send_json(
        &json!({"type": "message", "conversation": conversation, "id": "s1", "text": "psst"}),
    );
    let error = wait_for(&mut sue, "refusal", |v| v["type"] == "error");
    assert_eq!(error["code"], "not_assigned");

    // bo may not move it (refused by role); sue moves it to bo; bo closes it.
    bo.send_json(&json!({"type": "transfer", "conversation": conversation, "to": "bo"}));
    assert_eq!(
        wait_for(&mut bo, "refusal", |v| v["type"] == "error")["code"],
        "not_assigned"
    );
    sue.send_json(&json!({"type": "transfer", "conversation": conversation, "to": "bo"}));
    wait_for(&mut bo, "assigned by the supervisor", |v| {
        v["type"] == "assigned" && v["conversation"] == conversation
    });
    let moved = wait_for(&mut sue, "the new holder", |v| {
        v["type"] == "watching" && v["agent"] == "bo"
    });
    assert_eq!(moved["state"], "assigned");
    bo.send_json(&json!({"type": "close", "conversation": conversation}));
    wait_for(&mut sue, "closed", |v| {
        v["type"] == "closed" && v["conversation"] == conversation
    });
    wait_for(&mut visitor, "closed", |v| v["type"] == "closed");

    // Each action left its record, and the chain verifies.
    let records = audit_records_until(&server, "conversation_closed");
    let target = conversation.to_string();
    let find = |kind: &str, actor: &str| {
        records
            .iter()
            .find(|r| r["kind"] == kind && r["actor"] == actor)
            .unwrap_or_else(|| panic!("no {kind} by {actor} in {records:#?}"))
            .clone()
    };
    let watched = find("conversation_watched", "sue");
    assert_eq!(watched["target"], target.as_str());
    assert_eq!(watched["detail"]["role"], "supervisor");
    let transferred = find("conversation_transferred", "sue");
    assert_eq!(transferred["target"], target.as_str());
    assert_eq!(
        (&transferred["detail"]["from"], &transferred["detail"]["to"]),
        (&json!("al"), &json!("bo"))
    );
    assert_eq!(find("conversation_closed", "bo")["target"], target.as_str());
    let denied: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "access_denied" && r["actor"] == "bo")
        .collect();
    assert_eq!(denied.len(), 2, "the watch and the transfer: {denied:#?}");

    let verify = Command::new(BIN)
        .args(["audit", "verify", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let tail = Command::new(BIN)
        .args(["audit", "tail", "-n", "20", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(tail.status.success());
    let shown = String::from_utf8_lossy(&tail.stdout);
    for kind in [
        "conversation_watched",
        "conversation_transferred",
        "conversation_closed",
    ] {
        assert!(shown.contains(kind), "{kind} not in tail: {shown}");
    }
}
