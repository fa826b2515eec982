//! Faults through the real binary: a shard that panics under load ends the process (logged
//! with its shard and a backtrace, health probes failing meanwhile, exit code 70) and a
//! restart on the same data directory still has every acknowledged message; the diagnostic
//! panic trigger does not exist unless `[diagnostics] panic_endpoint` switches it on; SIGTERM
//! while blocking-pool jobs run waits for them and exits 0.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const IDENTITY_KEY: &str = "faults-test-identity-key-0123456789abc";

/// Two shards, no bot, none of the limits a person never reaches (one IP drives the load).
fn overlay(panic_endpoint: bool) -> String {
    format!(
        "[shards]\ncores = [0, 1]\n\n[diagnostics]\necho = true\npanic_endpoint = {panic_endpoint}\n\n\
         [inference]\nenabled = false\n\n[risk_control]\nflood_messages = 10000\nflood_window = \"100ms\"\n\n\
         [limits]\nconnections_per_ip = 0\nvisitor_messages_per_second = 0\nvisitor_frames_per_second = 0\n\
         admit_latency_budget = \"0s\"\n\n[visitors.sites.faults]\nidentity_key = \"{IDENTITY_KEY}\"\n"
    )
}

/// One visitor's client-side view: what was acked (id -> seq) and what is still unacked.
#[derive(Default, Clone, Debug)]
struct Ledger {
    acked: BTreeMap<String, u64>,
    unacked: Vec<String>,
}

fn connect(addr: SocketAddr, visitor: &str, resume: u64) -> Option<RawClient> {
    let hash = switchboard::conversation::identity::identity_hash(IDENTITY_KEY.as_bytes(), visitor);
    let mut client = RawClient::connect(
        addr,
        &format!("/ws/visitor?site=faults&visitor={visitor}&identity_hash={hash}&resume={resume}"),
    )
    .ok()?;
    client.set_read_timeout(Duration::from_secs(5));
    Some(client)
}

fn absorb(ledger: &mut Ledger, value: &Value) {
    if value["type"] == "ack" {
        let id = value["id"].as_str().unwrap().to_string();
        let seq = value["seq"].as_u64().unwrap();
        ledger.acked.insert(id.clone(), seq);
        ledger.unacked.retain(|u| *u != id);
    }
}

/// Replays the conversation from seq 0 and checks every acked id is stored once, at its seq,
/// with the seqs dense.
fn verify(addr: SocketAddr, visitor: &str, ledger: &Ledger) {
    let mut client = connect(addr, visitor, 0).expect("reconnect for verification");
    let (last, by_seq) = read_replay(&mut client);
    assert_eq!(
        by_seq.keys().copied().collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>(),
        "{visitor}: the replay holds every seq up to {last}, once"
    );
    let stored: HashMap<&String, u64> = by_seq.iter().map(|(seq, text)| (text, *seq)).collect();
    assert_eq!(
        stored.len(),
        by_seq.len(),
        "{visitor}: no text stored twice"
    );
    for (id, seq) in &ledger.acked {
        assert_eq!(
            stored.get(id),
            Some(seq),
            "{visitor}: acked {id} must be stored at seq {seq}"
        );
    }
}

/// `count` visitor ids of site `faults` whose conversations shard `shard` owns (of 2).
fn visitors_owned_by(shard: usize, count: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("panic-{i}"))
        .filter(|v| switchboard::conversation::visitor_owner("faults", v, 2) == shard)
        .take(count)
        .collect()
}

#[test]
fn a_shard_panic_under_load_exits_70_and_loses_no_acked_message() {
    let mut server = Server::start(&overlay(true));
    let addr = server.addr;
    let mut visitors = visitors_owned_by(1, 3);
    visitors.extend(visitors_owned_by(0, 3));
    let ledgers = Arc::new(Mutex::new(vec![Ledger::default(); visitors.len()]));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = visitors
        .iter()
        .cloned()
        .enumerate()
        .map(|(index, visitor)| {
            let (ledgers, stop) = (ledgers.clone(), stop.clone());
            std::thread::spawn(move || {
                let Some(mut client) = connect(addr, &visitor, 0) else {
                    return;
                };
                client.set_read_timeout(Duration::from_millis(200));
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    if ledgers.lock().unwrap()[index].unacked.len() < 8 {
                        n += 1;
                        let id = format!("{visitor}-m{n}");
                        ledgers.lock().unwrap()[index].unacked.push(id.clone());
                        client.send_json(&json!({"type": "message", "id": id, "text": id}));
                        continue;
                    }
                    match client.read_message() {
                        Some(frame) if frame.opcode == TEXT => {
                            absorb(&mut ledgers.lock().unwrap()[index], &frame.json())
                        }
                        Some(_) => {}
                        None if !client.is_alive() => return,
                        None => {}
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    let acked_before: usize = ledgers.lock().unwrap().iter().map(|l| l.acked.len()).sum();
    assert!(
        acked_before > 50,
        "the load is acked before the panic ({acked_before})"
    );

    let (status, body) = http_raw(
        addr,
        b"POST /debug/panic?shard=1 HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!((status, body.as_str()), (202, "panicking\n"));
    // Probe the health endpoints until the process is gone: the surviving shard answers 503
    // (a probe the kernel hands to the dead shard's socket just times out).
    let exited = Arc::new(AtomicBool::new(false));
    let probes: Vec<_> = (0..4)
        .map(|i| {
            let exited = exited.clone();
            std::thread::spawn(move || {
                let mut answers = Vec::new();
                let path = if i % 2 == 0 { "/healthz" } else { "/readyz" };
                while !exited.load(Ordering::Relaxed) {
                    if let Some(answer) = probe(addr, path) {
                        answers.push(answer);
                    }
                }
                answers
            })
        })
        .collect();
    let exit = server.wait(Duration::from_secs(10));
    exited.store(true, Ordering::Relaxed);
    let answers: Vec<(u16, String)> = probes.into_iter().flat_map(|p| p.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.join().unwrap();
    }
    let logs = server.logs();
    let exit = exit.unwrap_or_else(|| panic!("the process outlived the panic by 10 s:\n{logs}"));
    assert_eq!(
        exit.code(),
        Some(70),
        "exit code after a panic; logs:\n{logs}"
    );
    assert!(
        logs.contains("PANIC on shard 1")
            && logs.contains("injected panic on shard 1")
            && logs.contains("backtrace:")
            && logs.contains("Router::on_mesh"),
        "the panic is logged with its shard and a backtrace; logs:\n{logs}"
    );
    assert!(
        answers
            .iter()
            .any(|(status, body)| *status == 503 && body.contains("panicked")),
        "a health probe saw the failure before the exit: {answers:?}"
    );

    // Restart on the same data: every acked message is there, once, at its seq.
    let ledgers = ledgers.lock().unwrap().clone();
    let acked: usize = ledgers.iter().map(|l| l.acked.len()).sum();
    let server = Server::start_in(server.crash(), &overlay(false));
    for (visitor, ledger) in visitors.iter().zip(&ledgers) {
        verify(server.addr, visitor, ledger);
    }
    eprintln!("{acked} messages acked before the panic, all found after the restart");
}

/// One HTTP GET with a short timeout; `None` when no answer came.
fn probe(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

#[test]
fn the_panic_endpoint_is_404_unless_switched_on() {
    let server = Server::start(&overlay(false));
    let request = b"POST /debug/panic?shard=0 HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n";
    for _ in 0..4 {
        let (status, _) = http_raw(server.addr, request);
        assert_eq!(status, 404, "no panic trigger without panic_endpoint");
    }
    // Nothing panicked: both shards still answer, healthy.
    for _ in 0..4 {
        assert_eq!(http_get(server.addr, "/healthz"), (200, "ok\n".into()));
    }
    assert!(!server.logs().contains("PANIC"), "{}", server.logs());
}

/// SIGTERM while logins are being hashed on the blocking pool (argon2 takes a while): a shard
/// with no session to drain stops at once while the other one drains a session that ignores
/// the close, so before the fix the first shard's pool thread outlived its executor and
/// panicked ("failed to send response"). Now each shard waits for its jobs; the exit is 0.
#[test]
fn sigterm_while_logins_hash_on_the_blocking_pool_exits_0() {
    use std::io::Write;
    let mut server = Server::start(&overlay(false));
    // A session that never answers the close: its shard drains it for the whole grace.
    let stubborn = RawClient::connect(server.addr, "/ws/echo").expect("echo session");
    let body = r#"{"name":"nobody","password":"a password that takes a while to hash"}"#;
    let request = format!(
        "POST /api/login HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // Spread over both shards by the kernel: some land on the shard without the session.
    let logins: Vec<_> = (0..8)
        .map(|_| {
            let mut stream = std::net::TcpStream::connect(server.addr).unwrap();
            stream.write_all(request.as_bytes()).unwrap();
            stream
        })
        .collect();
    // The requests are read and their hashing jobs started; then stop.
    std::thread::sleep(Duration::from_millis(30));
    let exit = server.terminate(Duration::from_secs(15));
    drop((logins, stubborn));
    let logs = server.logs();
    let exit = exit.unwrap_or_else(|| panic!("no exit within 15 s of SIGTERM:\n{logs}"));
    assert!(
        !logs.contains("failed to send response") && !logs.contains("PANIC"),
        "a blocking job outlived its executor:\n{logs}"
    );
    assert_eq!(exit.code(), Some(0), "logs:\n{logs}");
}
