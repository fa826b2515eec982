//! Admission control and hostile input through the real binary: per-IP connection rate (429
//! before the request is read), the blocklist, per-session message and frame rates, flood
//! refusals closing the session, back-pressure against a client that floods cheap frames,
//! and the small HTTP findings of the hostile-input probe (reason phrases, repeated query
//! parameters and headers). Each test here failed on the code before issue 10.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const ONE_SHARD: &str = "[shards]\ncores = [0]\n";

const AGENT: &str = r#"
[agents]
dev_static_tokens = true

[agents.accounts.alice]
token = "alice-token-0123456789"
name = "Alice"
max_open = 5
"#;

/// The raw response (status line, headers, body) to `request`.
fn raw_response(addr: std::net::SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).expect("send request");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

fn upgrade_request(path_and_query: &str, extra_headers: &str) -> String {
    format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
    )
}

#[test]
fn a_missing_agent_token_is_401_unauthorized_not_unknown() {
    let server = Server::start(AGENT);
    let response = raw_response(server.addr, &upgrade_request("/ws/agent", ""));
    assert!(
        response.starts_with("HTTP/1.1 401 Unauthorized\r\n"),
        "{response}"
    );
}

#[test]
fn a_repeated_query_parameter_is_refused_whatever_the_order() {
    let server = Server::start(AGENT);
    for query in [
        "token=x&token=alice-token-0123456789",
        "token=alice-token-0123456789&token=x",
        "token=alice-token-0123456789&token=alice-token-0123456789",
    ] {
        let response = raw_response(
            server.addr,
            &upgrade_request(&format!("/ws/agent?{query}"), ""),
        );
        assert!(response.starts_with("HTTP/1.1 400 "), "{query}: {response}");
        assert!(response.contains("repeated"), "{response}");
    }
    for query in ["site=a&site=b", "site=a&visitor=v&visitor=w"] {
        let response = raw_response(
            server.addr,
            &upgrade_request(&format!("/ws/visitor?{query}"), ""),
        );
        assert!(response.starts_with("HTTP/1.1 400 "), "{query}: {response}");
    }
    // The same token once still opens the agent endpoint.
    let mut agent = RawClient::connect(server.addr, "/ws/agent?token=alice-token-0123456789")
        .expect("a single token is accepted");
    assert_eq!(agent.read_json()["type"], "hello");
}

#[test]
fn repeated_websocket_key_version_or_upgrade_headers_are_refused_with_400() {
    let server = Server::start("");
    for extra in [
        "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        "Sec-WebSocket-Version: 13\r\n",
        "Upgrade: websocket\r\n",
    ] {
        let response = raw_response(server.addr, &upgrade_request("/ws/visitor?site=s", extra));
        assert!(
            response.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{extra:?}: {response}"
        );
        assert!(response.contains("more than once"), "{response}");
    }
    assert!(server.has_logged("hostile input"));
}

#[test]
fn too_many_connections_from_one_ip_get_429_with_retry_after_before_the_request_is_read() {
    let server = Server::start(&format!(
        "{ONE_SHARD}[limits]\nconnections_per_ip = 0.5\nconnection_burst = 2\n"
    ));
    for _ in 0..2 {
        assert_eq!(http_get(server.addr, "/healthz").0, 200);
    }
    // The third connection is refused at accept: the answer comes even though the client
    // sends nothing at all.
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response);
    assert!(
        response.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
        "{response}"
    );
    assert!(response.contains("\r\nRetry-After: 2\r\n"), "{response}");
    // And a client that does send a request gets the same answer.
    let (status, _) = http_get(server.addr, "/healthz");
    assert_eq!(status, 429);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.logs().contains("429") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let logs = server.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("hostile input") && l.contains("127.0.0.1") && l.contains("429")),
        "{logs}"
    );
}

/// Whether a connection is closed without a byte of answer (a blocked peer).
fn closed_without_answer(addr: std::net::SocketAddr) -> bool {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut response = Vec::new();
    match stream.read_to_end(&mut response) {
        Ok(_) => response.is_empty(),
        Err(err) => err.kind() == std::io::ErrorKind::ConnectionReset && response.is_empty(),
    }
}

/// The audit records once one of `kind` is there (10 s at most).
fn audit_until(server: &Server, kind: &str) -> Vec<serde_json::Value> {
    let audit = server.dir.path().join("data/audit.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records: Vec<serde_json::Value> = std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        if records.iter().any(|r| r["kind"] == kind) {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "no {kind} record: {records:#?}\nserver log:\n{}",
            server.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_blocklist_closes_at_accept_and_reloads_when_the_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("blocked.txt");
    std::fs::write(&list, "# local abuse\n127.0.0.0/8\n2001:db8::/32\n").unwrap();
    let server = Server::start_in(
        dir,
        &format!("[limits]\nblocklist_file = {list:?}\nblocklist_poll = \"100ms\"\n"),
    );
    // A shard that started after the change below would load the new list as its first and
    // never see a change: shard 0, which audits changes, would then record none.
    server.wait_for_shards();
    assert!(closed_without_answer(server.addr));

    // Emptied: served again after the next poll.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&list, "# nobody\n").unwrap();
    // Every shard reloads on its own poll: wait until 20 connections in a row (spread over the
    // shards by SO_REUSEPORT) are served, so no shard still holds the old list.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut served_in_a_row = 0;
    while served_in_a_row < 20 {
        assert!(
            Instant::now() < deadline,
            "the emptied list was not reloaded"
        );
        if http_get(server.addr, "/healthz").0 == 200 {
            served_in_a_row += 1;
        } else {
            served_in_a_row = 0;
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // Shard 0 (which audits the change) has the emptied list.
    audit_until(&server, "blocklist_changed");

    // A bad line at a reload keeps the previous (empty) list and says where.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&list, "127.0.0.0/8\nnot-a-network\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.logs().contains("blocklist not reloaded") {
        assert!(Instant::now() < deadline, "no reload error logged");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server.logs().contains("blocked.txt:2"), "{}", server.logs());
    assert_eq!(http_get(server.addr, "/healthz").0, 200);

    // The change and the refused reload are in the audit chain, once each (not per shard).
    let records = audit_until(&server, "blocklist_reload_failed");
    let changed: Vec<_> = records
        .iter()
        .filter(|r| r["kind"] == "blocklist_changed")
        .collect();
    assert_eq!(changed.len(), 1, "{records:#?}");
    assert_eq!(
        changed[0]["detail"]["removed"],
        serde_json::json!(["127.0.0.0/8", "2001:db8::/32"])
    );
    assert_eq!(changed[0]["detail"]["networks"], 0);
    assert_eq!(
        records
            .iter()
            .filter(|r| r["kind"] == "blocklist_reload_failed")
            .count(),
        1
    );
}

#[test]
fn a_bad_blocklist_stops_start_up_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("blocked.txt");
    std::fs::write(&list, "10.0.0.0/8\n\n10.0.0.0/40\n").unwrap();
    let config = write_config(
        dir.path(),
        &format!("[limits]\nblocklist_file = {list:?}\n"),
    );
    let output = std::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("blocked.txt:3"), "{stderr}");
    assert!(stderr.contains("10.0.0.0/40"), "{stderr}");
}

/// Reads JSON frames until one satisfies `want` (panics on close or timeout).
fn until(client: &mut RawClient, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    client.read_until(what, want)
}

/// The next `ack` or `error` frame: a message's answer either way.
fn ack_or_error(client: &mut RawClient, what: &str) -> Value {
    until(client, what, |v| v["type"] == "ack" || v["type"] == "error")
}

#[test]
fn a_visitor_over_its_message_rate_gets_rate_limited_with_retry_after_and_nothing_is_stored() {
    let server =
        Server::start("[limits]\nvisitor_messages_per_second = 1.0\nvisitor_message_burst = 2\n");
    let mut visitor = RawClient::connect(server.addr, "/ws/visitor?site=s").unwrap();
    until(&mut visitor, "hello", |v| v["type"] == "hello");
    for id in ["m1", "m2", "m3"] {
        visitor.send_json(&json!({"type": "message", "id": id, "text": "hi"}));
    }
    let mut acks = Vec::new();
    let mut refusal = None;
    while acks.len() < 2 || refusal.is_none() {
        let v = ack_or_error(&mut visitor, "acks and a refusal");
        if v["type"] == "ack" {
            acks.push(v);
        } else {
            refusal = Some(v);
        }
    }
    let refusal = refusal.unwrap();
    assert_eq!(refusal["code"], "rate_limited", "{refusal}");
    let retry = refusal["retry_after"].as_u64().expect("retry_after in ms");
    assert!((1..=1000).contains(&retry), "{refusal}");
    assert_eq!(acks[0]["id"], "m1");
    assert_eq!(acks[1]["id"], "m2");
    // After the wait the same message is taken, right after m2: m3 was never stored.
    std::thread::sleep(Duration::from_millis(retry + 50));
    visitor.send_json(&json!({"type": "message", "id": "m3", "text": "hi"}));
    let ack = until(&mut visitor, "ack of m3", |v| v["type"] == "ack");
    assert_eq!(ack["id"], "m3");
    assert_eq!(
        ack["seq"].as_u64().unwrap(),
        acks[1]["seq"].as_u64().unwrap() + 1,
        "{ack}"
    );
}

/// Floods `frame` on a second handle of `client`'s socket from a thread until `stop` or an
/// error; returns the frames written.
fn flood(
    client: &RawClient,
    frame: &[u8],
    limit: u64,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    let mut stream = client.stream_clone();
    let batch_frames = 10_000u64;
    let chunk: Vec<u8> = frame.repeat(batch_frames as usize);
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) && sent.load(Ordering::Relaxed) < limit {
            if stream.write_all(&chunk).is_err() {
                break;
            }
            sent.fetch_add(batch_frames, Ordering::Relaxed);
        }
    })
}

#[test]
fn a_flood_of_cheap_frames_is_closed_with_1008() {
    // Default limits: a visitor flooding `read` frames is refused with `rate_limited` past its
    // frame rate, and the refusals close it within the abuse window (10 s).
    let server = Server::start(ONE_SHARD);
    let mut visitor = RawClient::connect(server.addr, "/ws/visitor?site=s").unwrap();
    until(&mut visitor, "hello", |v| v["type"] == "hello");
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let writer = flood(
        &visitor,
        &masked_text_frame(br#"{"type":"read","seq":0}"#),
        u64::MAX,
        stop.clone(),
        sent.clone(),
    );
    let started = Instant::now();
    let mut rate_limited = 0;
    let code = loop {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no close within 10 s of flood"
        );
        let Some(frame) = visitor.read_frame() else {
            panic!("connection ended without a close frame");
        };
        match frame.opcode {
            8 => break frame.close_code(),
            1 => {
                let v = frame.json();
                if v["code"] == "rate_limited" {
                    assert!(v["retry_after"].as_u64().is_some(), "{v}");
                    rate_limited += 1;
                }
            }
            _ => {}
        }
    };
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();
    assert_eq!(code, Some(1008));
    assert!(rate_limited >= 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.logs().contains("close 1008") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(server.logs().contains("close 1008"), "{}", server.logs());
}

#[test]
fn flood_guard_refusals_count_toward_the_abuse_limit_and_close_with_1008() {
    let server = Server::start(
        "[limits]\nvisitor_messages_per_second = 0\nvisitor_frames_per_second = 0\n\
         [risk_control]\nflood_messages = 2\nflood_window = \"1h\"\n\
         [bot]\nhandlers = [\"risk_control\", \"fallback\"]\n",
    );
    let mut visitor = RawClient::connect(server.addr, "/ws/visitor?site=s").unwrap();
    until(&mut visitor, "hello", |v| v["type"] == "hello");
    for i in 0..40 {
        visitor.send_json(&json!({"type": "message", "id": format!("m{i}"), "text": "hi"}));
    }
    let mut floods = 0;
    let code = loop {
        let frame = visitor.read_frame().expect("a close frame");
        match frame.opcode {
            8 => break frame.close_code(),
            1 if frame.json()["code"] == "flood" => floods += 1,
            _ => {}
        }
    };
    assert_eq!(code, Some(1008));
    // abuse_limit = 10: the 10th refusal closes (the error frames the owner had already
    // answered in the same burst are written before the close).
    assert!(floods >= 10, "{floods} flood refusals before the close");
}

#[test]
fn backpressure_bounds_memory_and_keeps_the_shard_responsive_during_a_flood() {
    // Rate limits off: only back-pressure stands between the flood and the server's memory.
    let server = Server::start(&format!(
        "{ONE_SHARD}[limits]\nvisitor_frames_per_second = 0\nvisitor_messages_per_second = 0\n"
    ));
    let pid = server.pid();
    let mut visitor = RawClient::connect(server.addr, "/ws/visitor?site=s").unwrap();
    until(&mut visitor, "hello", |v| v["type"] == "hello");
    std::thread::sleep(Duration::from_millis(300));
    let baseline = rss_kib(pid);

    const FRAMES: u64 = 2_000_000;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let writer = flood(
        &visitor,
        &masked_text_frame(br#"{"type":"read","seq":0}"#),
        FRAMES,
        stop.clone(),
        sent.clone(),
    );
    // The flooder reads its own socket meanwhile (what it is sent must not pile up either).
    let reader_stop = stop.clone();
    let mut reader_stream = visitor.stream_clone();
    let reader = std::thread::spawn(move || {
        reader_stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut sink = vec![0u8; 65536];
        while !reader_stop.load(Ordering::Relaxed) {
            match reader_stream.read(&mut sink) {
                Ok(0) => break,
                _ => continue,
            }
        }
    });

    let started = Instant::now();
    let mut peak = baseline;
    let mut hello_wait = None;
    while sent.load(Ordering::Relaxed) < FRAMES && started.elapsed() < Duration::from_secs(120) {
        peak = peak.max(rss_kib(pid));
        if hello_wait.is_none() && started.elapsed() > Duration::from_secs(1) {
            let asked = Instant::now();
            let mut second = RawClient::connect(server.addr, "/ws/visitor?site=s").unwrap();
            second.set_read_timeout(Duration::from_secs(30));
            until(&mut second, "second visitor's hello", |v| {
                v["type"] == "hello"
            });
            hello_wait = Some(asked.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let flood_time = started.elapsed();
    peak = peak.max(rss_kib(pid));
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();
    let _ = reader.join();
    let hello_wait = hello_wait.expect("the second visitor connected during the flood");
    eprintln!(
        "flood: {} frames in {:.1} s; RSS baseline {} KiB, peak {} KiB (+{} KiB); second hello after {:?}",
        sent.load(Ordering::Relaxed),
        flood_time.as_secs_f64(),
        baseline,
        peak,
        peak.saturating_sub(baseline),
        hello_wait
    );
    assert!(
        sent.load(Ordering::Relaxed) >= FRAMES,
        "the flood did not get through in 120 s"
    );
    // Before back-pressure 2 M frames grew RSS by about 680 MiB.
    assert!(
        peak.saturating_sub(baseline) < 100 * 1024,
        "RSS grew by {} KiB during the flood",
        peak - baseline
    );
    assert!(
        hello_wait < Duration::from_secs(2),
        "the second visitor waited {hello_wait:?} for its hello"
    );
    // The flooder's session is still served: it is paused, not dropped.
    assert_eq!(http_get(server.addr, "/healthz").0, 200);
}

#[test]
fn protocol_error_closes_are_logged_with_the_peer_address() {
    let server = Server::start("");
    let mut client = RawClient::connect(server.addr, "/ws/echo").unwrap();
    // An unmasked client frame: 1002.
    client.send_frame(true, 1, b"hi", false);
    assert_eq!(client.expect_close(), 1002);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server.logs().contains("close 1002") {
        assert!(Instant::now() < deadline, "{}", server.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    let logs = server.logs();
    let line = logs.lines().find(|l| l.contains("close 1002")).unwrap();
    assert!(
        line.contains("INFO") && line.contains("peer=127.0.0.1:"),
        "{line}"
    );
}

#[test]
fn an_overloaded_shard_refuses_new_sessions_keeps_old_ones_and_recovers() {
    // Thresholds of one queued item: the commit queue a flood of `read` frames keeps busy
    // puts the shard at the refuse level; it recovers half a second after the flood.
    let server = Server::start(&format!(
        "{ONE_SHARD}[limits]\nvisitor_frames_per_second = 0\nshed_lag = \"0s\"\nrefuse_lag = \"0s\"\n\
         shed_queue = 1\nrefuse_queue = 1\nrecover_after = \"500ms\"\n"
    ));
    let mut flooder = RawClient::connect(server.addr, "/ws/visitor?site=s").unwrap();
    until(&mut flooder, "hello", |v| v["type"] == "hello");
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let writer = flood(
        &flooder,
        &masked_text_frame(br#"{"type":"read","seq":0}"#),
        u64::MAX,
        stop.clone(),
        sent.clone(),
    );
    let reader_stop = stop.clone();
    let mut reader_stream = flooder.stream_clone();
    let reader = std::thread::spawn(move || {
        reader_stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut sink = vec![0u8; 65536];
        while !reader_stop.load(Ordering::Relaxed) {
            if let Ok(0) = reader_stream.read(&mut sink) {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.metric("degrade_level") != 2 {
        assert!(Instant::now() < deadline, "never reached the refuse level");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A new visitor is upgraded and closed with 1013; an agent-style client gets 503.
    let mut late = RawClient::connect(server.addr, "/ws/visitor?site=s").unwrap();
    assert_eq!(late.expect_close(), 1013);
    let response = raw_response(server.addr, &upgrade_request("/ws/echo", ""));
    assert!(
        response.starts_with("HTTP/1.1 503 Service Unavailable\r\n")
            && response.contains("Retry-After:"),
        "{response}"
    );
    // Health and metrics are still answered.
    assert_eq!(http_get(server.addr, "/healthz").0, 200);
    stop.store(true, Ordering::Relaxed);
    let _ = writer.join();
    let _ = reader.join();
    // The flood's session was not dropped by the refuse level.
    assert!(flooder.is_alive());
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.metric("degrade_level") != 0 {
        assert!(Instant::now() < deadline, "never recovered");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut again = RawClient::connect(server.addr, "/ws/visitor?site=s").unwrap();
    until(&mut again, "hello after recovery", |v| v["type"] == "hello");
    assert!(server.metric("degrade_transitions") >= 2);
    let logs = server.logs();
    assert!(
        logs.contains("load level raised") && logs.contains("load level lowered"),
        "{logs}"
    );
}

#[test]
fn a_message_sent_right_after_an_ack_waits_out_the_commit_interval() {
    // No window, a 300 ms interval: a message sent right after the previous one was acked
    // waits until 300 ms after the previous commit started, which was after the previous
    // message was sent. Without pacing the second ack comes a few milliseconds after the first.
    let server = Server::start(&format!(
        "{ONE_SHARD}[storage]\ncommit_window = \"0s\"\ncommit_interval = \"300ms\"\n\
         [limits]\nvisitor_messages_per_second = 0\nadmit_latency_budget = \"0s\"\n"
    ));
    let mut visitor = RawClient::connect(server.addr, "/ws/visitor?site=s").unwrap();
    until(&mut visitor, "hello", |v| v["type"] == "hello");
    let mut sent_at = Vec::new();
    let mut seqs = Vec::new();
    for k in 0..3 {
        sent_at.push(Instant::now());
        visitor.send_json(&json!({"type": "message", "id": format!("m{k}"), "text": "hi"}));
        let ack = until(&mut visitor, "ack", |v| v["type"] == "ack");
        assert_eq!(ack["id"], format!("m{k}"), "{ack}");
        seqs.push(ack["seq"].as_u64().unwrap());
    }
    let elapsed = sent_at[0].elapsed();
    // m1's commit started at least 300 ms after m0's, m2's at least 300 ms after m1's.
    assert!(
        elapsed >= Duration::from_millis(590),
        "three sequential messages acked in {elapsed:?}"
    );
    assert_eq!(seqs, vec![seqs[0], seqs[0] + 1, seqs[0] + 2]);
}

#[test]
fn a_steady_stream_is_committed_once_per_commit_interval() {
    // A message every 20 ms for a second, a 250 ms interval and no window: a handful of commits,
    // where unpaced every message would get its own (about 50).
    let server = Server::start(&format!(
        "{ONE_SHARD}[storage]\ncommit_window = \"0s\"\ncommit_interval = \"250ms\"\n\
         [limits]\nvisitor_messages_per_second = 0\nadmit_latency_budget = \"0s\"\n\
         [risk_control]\nflood_messages = 10000\nflood_window = \"100ms\"\n"
    ));
    let mut visitor = RawClient::connect(server.addr, "/ws/visitor?site=s").unwrap();
    until(&mut visitor, "hello", |v| v["type"] == "hello");
    let before = server.metric("store_commits");
    let count = 50;
    let started = Instant::now();
    for k in 0..count {
        visitor.send_json(&json!({"type": "message", "id": format!("m{k}"), "text": "hi"}));
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut acked = std::collections::BTreeSet::new();
    while acked.len() < count {
        let ack = until(&mut visitor, "ack", |v| v["type"] == "ack");
        acked.insert(ack["id"].as_str().unwrap().to_owned());
    }
    let elapsed = started.elapsed();
    let commits = server.metric("store_commits") - before;
    // Commits start at least 250 ms apart: at most one per 250 ms of the run, plus one at
    // each end.
    let bound = elapsed.as_millis() as u64 / 250 + 2;
    assert!(
        (1..=bound).contains(&commits),
        "{count} messages over {elapsed:?} took {commits} commits (at most {bound} expected)"
    );
}

#[test]
fn a_full_batch_does_not_wait_out_the_commit_interval() {
    // The longest interval (1 s) and batches of 5: after m0's commit, m1..m5 fill a batch,
    // which commits at once instead of 1 s after m0's commit started (a few milliseconds
    // against about a second; the bound leaves room for a busy machine).
    let server = Server::start(&format!(
        "{ONE_SHARD}[storage]\ncommit_window = \"0s\"\ncommit_interval = \"1s\"\nmax_batch = 5\n\
         [limits]\nvisitor_messages_per_second = 0\nadmit_latency_budget = \"0s\"\n"
    ));
    let mut visitor = RawClient::connect(server.addr, "/ws/visitor?site=s").unwrap();
    until(&mut visitor, "hello", |v| v["type"] == "hello");
    visitor.send_json(&json!({"type": "message", "id": "m0", "text": "hi"}));
    until(&mut visitor, "ack of m0", |v| v["type"] == "ack");
    let started = Instant::now();
    for k in 1..=5 {
        if k == 5 {
            // m1..m4 are queued and the committer waits out the interval; m5 fills the batch.
            std::thread::sleep(Duration::from_millis(100));
        }
        visitor.send_json(&json!({"type": "message", "id": format!("m{k}"), "text": "hi"}));
    }
    for _ in 1..=5 {
        until(&mut visitor, "ack", |v| v["type"] == "ack");
    }
    assert!(
        started.elapsed() < Duration::from_millis(700),
        "a full batch waited {:?}",
        started.elapsed()
    );
}

#[test]
fn an_overloaded_shard_answers_messages_with_overloaded_and_retry_after_instead_of_queueing() {
    // A tiny commit capacity: every commit after an idle moment waits a 400 ms window, so a
    // second message behind a pending one would wait about 400 ms, past the 50 ms budget.
    let server = Server::start(&format!(
        "{ONE_SHARD}[storage]\ncommit_window = \"400ms\"\nmax_batch = 1000\n\
         [limits]\nvisitor_messages_per_second = 0\nadmit_latency_budget = \"50ms\"\n"
    ));
    let mut visitor = RawClient::connect(server.addr, "/ws/visitor?site=s").unwrap();
    until(&mut visitor, "hello", |v| v["type"] == "hello");
    // The first commit teaches the shard what a commit costs.
    visitor.send_json(&json!({"type": "message", "id": "m0", "text": "hi"}));
    let first = until(&mut visitor, "ack of m0", |v| v["type"] == "ack");
    assert_eq!(first["id"], "m0");
    // A burst: the first is admitted (nothing pending), the rest are refused at once.
    let started = Instant::now();
    let burst = 20;
    for k in 1..=burst {
        visitor.send_json(&json!({"type": "message", "id": format!("m{k}"), "text": "hi"}));
    }
    let mut acked = Vec::new();
    let mut refused = Vec::new();
    while acked.len() + refused.len() < burst {
        let v = ack_or_error(&mut visitor, "acks and refusals");
        if v["type"] == "ack" {
            acked.push(v["id"].as_str().unwrap().to_owned());
        } else {
            assert_eq!(v["code"], "overloaded", "{v}");
            let retry = v["retry_after"].as_u64().expect("retry_after in ms");
            assert!((50..=10_000).contains(&retry), "{v}");
            refused.push((v["id"].as_str().unwrap().to_owned(), retry));
        }
    }
    // Every message got exactly one answer; the refusals came without waiting for commits
    // (generous bound: a queued burst would take 20 windows, 8 s).
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(refused.len() >= burst / 2, "acked {acked:?}");
    let last_seq = first["seq"].as_u64().unwrap() + acked.len() as u64;
    // The session stays open (overloaded is not abuse) and a refused message re-sent with the
    // same id after its retry_after is stored right behind the admitted ones: it was not
    // stored before.
    let (id, retry) = refused[0].clone();
    std::thread::sleep(Duration::from_millis(retry + 500));
    visitor.send_json(&json!({"type": "message", "id": id, "text": "hi"}));
    let ack = until(&mut visitor, "ack of the re-sent message", |v| {
        v["type"] == "ack" || (v["type"] == "error" && v["id"] == id)
    });
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["id"], id);
    assert_eq!(ack["seq"].as_u64().unwrap(), last_seq + 1, "{ack}");
    assert!(server.metric("messages_overloaded") >= refused.len() as u64);
}

#[test]
fn a_stall_that_has_ended_does_not_get_messages_refused() {
    // A 2 s stall of the only shard, with a 300 ms budget. The sampler's timer fires about 1.9 s
    // late when the stall ends; that lag is over by then, so the messages read right after it
    // are admitted, not refused with a retry_after as long as the stall.
    let server = Server::start(&format!(
        "{ONE_SHARD}[limits]\nvisitor_messages_per_second = 0\nadmit_latency_budget = \"300ms\"\n\
         [diagnostics]\nstall_endpoint = true\n"
    ));
    let mut visitor = RawClient::connect(server.addr, "/ws/visitor?site=s").unwrap();
    until(&mut visitor, "hello", |v| v["type"] == "hello");
    visitor.send_json(&json!({"type": "message", "id": "m0", "text": "hi"}));
    let first = until(&mut visitor, "ack of m0", |v| v["type"] == "ack");
    let (status, body) = common::http_raw(
        server.addr,
        b"POST /debug/stall?shard=0&ms=2000 HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!((status, body.as_str()), (202, "stalling\n"));
    // Sent while the shard is stuck: read when the stall ends, as the late sample comes in.
    std::thread::sleep(Duration::from_millis(300));
    let sent = Instant::now();
    visitor.send_json(&json!({"type": "message", "id": "m1", "text": "hi"}));
    let answer = ack_or_error(&mut visitor, "answer to m1");
    // The stall happened: m1 waited out the rest of it (1.7 s, less a late test thread).
    assert!(
        sent.elapsed() >= Duration::from_millis(800),
        "{:?}",
        sent.elapsed()
    );
    assert_eq!(answer["type"], "ack", "{answer}");
    assert_eq!(answer["id"], "m1", "{answer}");
    // Sent right after: the stall's lag is the last sample now.
    visitor.send_json(&json!({"type": "message", "id": "m2", "text": "hi"}));
    let answer = ack_or_error(&mut visitor, "answer to m2");
    assert_eq!(answer["type"], "ack", "{answer}");
    assert_eq!(
        answer["seq"].as_u64().unwrap(),
        first["seq"].as_u64().unwrap() + 2,
        "{answer}"
    );
    assert_eq!(server.metric("messages_overloaded"), 0);
}

#[test]
fn a_message_for_a_shard_that_is_stalled_now_is_refused_at_once() {
    // Two shards. A visitor connected to one shard whose conversation the other owns; the
    // owner stalls for 3 s. The visitor's shard sees the owner's lag sample overdue and
    // refuses the message at once, instead of queueing it behind the stall.
    let server = Server::start(
        "[shards]\ncores = [0, 1]\n[limits]\nvisitor_messages_per_second = 0\n\
         admit_latency_budget = \"300ms\"\n[diagnostics]\nstall_endpoint = true\n",
    );
    let mut kept = Vec::new();
    let (mut visitor, owner, first) = loop {
        assert!(
            kept.len() < 40,
            "no visitor connected away from its owner in 40 tries"
        );
        // An id of its own: an issued one would be owned by the connection's shard.
        let path = format!("/ws/visitor?site=s&visitor=stall-{}", kept.len());
        let mut visitor = RawClient::connect(server.addr, &path).unwrap();
        until(&mut visitor, "hello", |v| v["type"] == "hello");
        // The shard that reads the visitor's frames counts them.
        let received = |shard| server.shard_metric("messages_received", shard);
        let before = [received(0), received(1)];
        visitor.send_json(&json!({"type": "message", "id": "m0", "text": "hi"}));
        let ack = until(&mut visitor, "ack of m0", |v| v["type"] == "ack");
        let after = [received(0), received(1)];
        let connected = usize::from(after[1] > before[1]);
        assert!(
            after[connected] > before[connected],
            "{before:?} -> {after:?}"
        );
        // A conversation id carries its owner shard in its low bits.
        let owner = (ack["conversation"].as_u64().unwrap() & 1) as usize;
        if owner != connected {
            break (visitor, owner, ack);
        }
        kept.push(visitor);
    };
    let (status, body) = common::http_raw(
        server.addr,
        format!(
            "POST /debug/stall?shard={owner}&ms=3000 HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!((status, body.as_str()), (202, "stalling\n"));
    let stalled = Instant::now();
    // A second in (the stall starts as the 202 goes out): 900 ms overdue, or 300 ms if the
    // stall began 600 ms late.
    std::thread::sleep(Duration::from_millis(1000));
    let sent = Instant::now();
    visitor.send_json(&json!({"type": "message", "id": "m1", "text": "hi"}));
    let refusal = ack_or_error(&mut visitor, "answer to m1");
    assert_eq!(
        refusal["code"],
        "overloaded",
        "{refusal} after {:?}",
        sent.elapsed()
    );
    assert_eq!(refusal["id"], "m1", "{refusal}");
    // At once, not after the stall; and the wait it names is at least how overdue the owner is.
    assert!(
        sent.elapsed() < Duration::from_millis(900),
        "{:?}",
        sent.elapsed()
    );
    let retry = refusal["retry_after"].as_u64().expect("retry_after in ms");
    assert!((300..=3000).contains(&retry), "{refusal}");
    // Once the owner runs again the re-sent message is stored right behind m0.
    std::thread::sleep(
        (stalled + Duration::from_millis(3600)).saturating_duration_since(Instant::now()),
    );
    visitor.send_json(&json!({"type": "message", "id": "m1", "text": "hi"}));
    let ack = ack_or_error(&mut visitor, "ack of the re-sent m1");
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(
        ack["seq"].as_u64().unwrap(),
        first["seq"].as_u64().unwrap() + 1,
        "{ack}"
    );
}

#[test]
fn a_shard_over_its_rated_capacity_refuses_with_overloaded_whoever_sends() {
    // Capacity 1 message/s with a burst of 3, shared by every visitor of the shard: two
    // visitors who are each far below their own rate still meet the shard's cap.
    let server = Server::start(&format!(
        "{ONE_SHARD}[limits]\nvisitor_messages_per_second = 0\nadmit_latency_budget = \"0s\"\n\
         shard_messages_per_second = 1.0\nshard_message_burst = 3\n"
    ));
    let mut alice = RawClient::connect(server.addr, "/ws/visitor?site=s").unwrap();
    until(&mut alice, "hello", |v| v["type"] == "hello");
    let mut bob = RawClient::connect(server.addr, "/ws/visitor?site=s").unwrap();
    until(&mut bob, "hello", |v| v["type"] == "hello");
    for k in 1..=2 {
        alice.send_json(&json!({"type": "message", "id": format!("a{k}"), "text": "hi"}));
        let ack = until(&mut alice, "ack", |v| v["type"] == "ack");
        assert_eq!(ack["id"], format!("a{k}"));
    }
    // Bob's first message takes the last token; his next ones are refused at once.
    bob.send_json(&json!({"type": "message", "id": "b1", "text": "hi"}));
    let ack = until(&mut bob, "ack of b1", |v| v["type"] == "ack");
    assert_eq!(ack["id"], "b1");
    bob.send_json(&json!({"type": "message", "id": "b2", "text": "hi"}));
    let refusal = until(&mut bob, "refusal of b2", |v| v["type"] == "error");
    assert_eq!(refusal["code"], "overloaded", "{refusal}");
    assert_eq!(refusal["id"], "b2", "{refusal}");
    let retry = refusal["retry_after"].as_u64().expect("retry_after in ms");
    assert!((50..=1000).contains(&retry), "{refusal}");
    alice.send_json(&json!({"type": "message", "id": "a3", "text": "hi"}));
    let refusal = until(&mut alice, "refusal of a3", |v| v["type"] == "error");
    assert_eq!(refusal["code"], "overloaded", "{refusal}");
    // After the wait the refused message is stored right behind b1: it never was before.
    std::thread::sleep(Duration::from_millis(retry + 100));
    bob.send_json(&json!({"type": "message", "id": "b2", "text": "hi"}));
    let again = until(&mut bob, "ack of b2", |v| v["type"] == "ack");
    assert_eq!(again["id"], "b2");
    assert_eq!(
        again["seq"].as_u64().unwrap(),
        ack["seq"].as_u64().unwrap() + 1,
        "{again}"
    );
    assert!(server.metric("messages_overloaded") >= 2);
}
