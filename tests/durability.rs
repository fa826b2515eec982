//! Exactly-once under failure, through the real binary: connections cut at
//! random points with resend and resume, and `kill -9` of the server under
//! load followed by a restart on the same data directory.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// No bot, and none of the limits a person never reaches (flood guard, per-IP connection rate,
/// per-session message rates): these tests drive one IP as fast as it goes.
const NO_BOT: &str = "[inference]\nenabled = false\n\n[risk_control]\nflood_messages = 10000\nflood_window = \"100ms\"\n\n[limits]\nconnections_per_ip = 0\nvisitor_messages_per_second = 0\nvisitor_frames_per_second = 0\nadmit_latency_budget = \"0s\"\n\n[visitors.sites.crash]\nidentity_key = \"durability-test-identity-key-0123456789\"\n";

/// One visitor's client-side view: what it sent and what was acked.
#[derive(Default, Clone, Debug)]
struct Ledger {
    /// client id -> seq, for every acked message.
    acked: BTreeMap<String, u64>,
    /// Ids sent and not (yet) acked.
    unacked: Vec<String>,
    /// Highest seq seen, for resume.
    seen: u64,
}

/// The identity key of site `crash`: these clients reconnect as a host site's verified
/// users (`identity_hash`), so a connection cut before its hello (and its secret) arrived
/// still finds its conversation again.
const IDENTITY_KEY: &str = "durability-test-identity-key-0123456789";

fn connect(server_addr: std::net::SocketAddr, visitor: &str, resume: u64) -> Option<RawClient> {
    let identity_hash =
        switchboard::conversation::identity::identity_hash(IDENTITY_KEY.as_bytes(), visitor);
    let mut client = RawClient::connect(
        server_addr,
        &format!(
            "/ws/visitor?site=crash&visitor={visitor}&identity_hash={identity_hash}&resume={resume}"
        ),
    )
    .ok()?;
    client.set_read_timeout(Duration::from_secs(5));
    Some(client)
}

/// Handles one server frame, updating the ledger.
fn absorb(ledger: &mut Ledger, value: &Value) {
    match value["type"].as_str() {
        Some("ack") => {
            let id = value["id"].as_str().unwrap().to_string();
            let seq = value["seq"].as_u64().unwrap();
            if let Some(previous) = ledger.acked.insert(id.clone(), seq) {
                assert_eq!(
                    previous, seq,
                    "a resent id must be acked with its original seq"
                );
            }
            ledger.unacked.retain(|u| *u != id);
            ledger.seen = ledger.seen.max(seq);
        }
        Some("message") => ledger.seen = ledger.seen.max(value["seq"].as_u64().unwrap()),
        _ => {}
    }
}

/// Reads the whole conversation back with resume=0 and checks it against the
/// ledger: every acked id present once with its seq, seqs dense, no duplicates.
fn verify(server: &Server, visitor: &str, ledger: &Ledger) {
    let mut client = connect(server.addr, visitor, 0).expect("reconnect for verification");
    let (last, by_seq) = read_replay(&mut client);
    assert_eq!(
        by_seq.len() as u64,
        last,
        "{visitor}: replay holds every seq up to {last}"
    );
    assert_eq!(
        by_seq.keys().copied().collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>()
    );
    let mut seen_texts = HashMap::new();
    for (seq, text) in &by_seq {
        assert!(
            seen_texts.insert(text.clone(), *seq).is_none(),
            "{text} stored twice"
        );
    }
    for (id, seq) in &ledger.acked {
        assert_eq!(
            seen_texts.get(id),
            Some(seq),
            "{visitor}: acked {id} must be stored at seq {seq}"
        );
    }
}

#[test]
fn random_disconnects_with_resend_and_resume_lose_and_duplicate_nothing() {
    let server = Server::start(NO_BOT);
    let addr = server.addr;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let visitors: Vec<String> = (0..4).map(|i| format!("flaky-{i}")).collect();
    let mut ledgers: Vec<Ledger> = vec![Ledger::default(); visitors.len()];
    let mut counter = 0u64;
    for round in 0..30 {
        for (visitor, ledger) in visitors.iter().zip(ledgers.iter_mut()) {
            let mut client = connect(addr, visitor, ledger.seen).expect("connect");
            // Resend everything not acked, with the same ids.
            for id in ledger.unacked.clone() {
                client.send_json(&json!({"type": "message", "id": id, "text": id}));
            }
            let burst = 1 + next() % 6;
            for _ in 0..burst {
                counter += 1;
                let id = format!("{visitor}-m{counter}");
                ledger.unacked.push(id.clone());
                client.send_json(&json!({"type": "message", "id": id, "text": id}));
            }
            // Read a random number of frames, then cut the connection wherever
            // that leaves us: before, between or after the acks.
            let reads = next() % (burst + 3);
            for _ in 0..reads {
                let Some(frame) = client.read_message() else {
                    break;
                };
                absorb(ledger, &frame.json());
            }
            drop(client);
        }
        if round % 10 == 9 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Final pass: resend what is left until everything is acked.
    for (visitor, ledger) in visitors.iter().zip(ledgers.iter_mut()) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ledger.unacked.is_empty() && Instant::now() < deadline {
            let mut client = connect(addr, visitor, ledger.seen).expect("connect");
            for id in ledger.unacked.clone() {
                client.send_json(&json!({"type": "message", "id": id, "text": id}));
            }
            while !ledger.unacked.is_empty() {
                let Some(frame) = client.read_message() else {
                    break;
                };
                absorb(ledger, &frame.json());
            }
        }
        assert!(
            ledger.unacked.is_empty(),
            "{visitor}: unacked after retries: {:?}",
            ledger.unacked
        );
        verify(&server, visitor, ledger);
    }
    let total: usize = ledgers.iter().map(|l| l.acked.len()).sum();
    assert_eq!(
        total as u64, counter,
        "every message sent was eventually stored once"
    );
}

#[test]
fn kill_9_under_load_keeps_every_acked_message() {
    let server = Server::start(NO_BOT);
    let addr = server.addr;
    let ledgers: Arc<Mutex<Vec<Ledger>>> = Arc::new(Mutex::new(vec![Ledger::default(); 6]));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..6)
        .map(|index| {
            let ledgers = ledgers.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let visitor = format!("crash-{index}");
                let Some(mut client) = connect(addr, &visitor, 0) else {
                    return;
                };
                client.set_read_timeout(Duration::from_millis(200));
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Pipeline: keep up to 8 messages in flight.
                    let in_flight = ledgers.lock().unwrap()[index].unacked.len();
                    if in_flight < 8 {
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
                        None => {
                            if !client.is_alive() {
                                return;
                            }
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let dir = server.crash();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for writer in writers {
        writer.join().unwrap();
    }
    let ledgers = ledgers.lock().unwrap().clone();
    let acked: usize = ledgers.iter().map(|l| l.acked.len()).sum();
    assert!(
        acked > 50,
        "the load produced acked messages before the crash ({acked})"
    );

    // Restart on the same data directory.
    let server = Server::start_in(dir, NO_BOT);
    for (index, ledger) in ledgers.iter().enumerate() {
        let visitor = format!("crash-{index}");
        verify(&server, &visitor, ledger);
        // Resending the unacked ids, and acked ones too, stores nothing twice and
        // re-acks the acked ones with their original seqs. Re-sends are recognised
        // within a conversation's newest 1,024 messages (docs/protocol.md), so the
        // acked ids resent are the newest 512.
        let mut client = connect(server.addr, &visitor, u64::MAX >> 1).expect("reconnect");
        let mut acked: Vec<(&String, &u64)> = ledger.acked.iter().collect();
        acked.sort_by_key(|(_, seq)| std::cmp::Reverse(**seq));
        let mut all: Vec<String> = acked
            .into_iter()
            .take(512)
            .map(|(id, _)| id.clone())
            .collect();
        all.extend(ledger.unacked.iter().cloned());
        for id in &all {
            client.send_json(&json!({"type": "message", "id": id, "text": id}));
        }
        let mut after = ledger.clone();
        let mut acks = 0;
        while acks < all.len() {
            let Some(frame) = client.read_message() else {
                break;
            };
            let value = frame.json();
            if value["type"] == "ack" {
                acks += 1;
            }
            absorb(&mut after, &value);
        }
        assert_eq!(acks, all.len(), "every resend is acked");
        verify(&server, &visitor, &after);
    }
}

/// The name and nice value of each of the server's threads, and of its main thread.
fn thread_names_and_nice_values(pid: u32) -> (Vec<(String, i64)>, i64) {
    let parse = |stat: &str| -> (String, i64) {
        let open = stat.find('(').expect("a stat line names its thread");
        let close = stat.rfind(')').expect("a stat line names its thread");
        // Fields after the parenthesised name: state is field 3, nice field 19.
        let nice = stat[close + 2..].split(' ').nth(16).expect("a nice field");
        (
            stat[open + 1..close].to_string(),
            nice.parse().expect("a number"),
        )
    };
    let main = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the server's stat");
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("the server's threads") {
        if let Ok(stat) = std::fs::read_to_string(task.unwrap().path().join("stat")) {
            threads.push(parse(&stat)); // else the thread ended meanwhile
        }
    }
    (threads, parse(&main).1)
}

/// Whether a process of this test's credentials may lower a thread's nice value to `nice`.
fn may_lower_nice_to(nice: i32) -> bool {
    std::thread::spawn(move || {
        // SAFETY: plain syscalls on the calling (scratch) thread.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) == 0 }
    })
    .join()
    .unwrap()
}

#[test]
fn each_shards_commit_thread_runs_at_the_configured_nice_value() {
    for commit_nice in [-7, 0] {
        let server = Server::start(&format!(
            "{NO_BOT}\n[shards]\ncores = [0, 1]\n\n[storage]\ncommit_nice = {commit_nice}\n"
        ));
        server.wait_for_shards();
        // A message commits, so each shard's committer has set its thread up.
        let mut visitor = connect(server.addr, "nice-check", 0).expect("a visitor connects");
        visitor.send_json(&json!({"type": "message", "id": "n1", "text": "hello"}));
        let ack = visitor.read_until("the ack", |frame| frame["type"] == "ack");
        assert_eq!(ack["id"], "n1");

        let (_, process_nice) = thread_names_and_nice_values(server.pid());
        let lowers = i64::from(commit_nice) < process_nice;
        let permitted = may_lower_nice_to(commit_nice);
        let want = if lowers && permitted {
            i64::from(commit_nice)
        } else {
            process_nice
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let (threads, commit_threads) = loop {
            let (threads, _) = thread_names_and_nice_values(server.pid());
            let mut commit_threads: Vec<_> = threads
                .iter()
                .filter(|(name, _)| name.starts_with("sb-commit-"))
                .cloned()
                .collect();
            commit_threads.sort();
            if commit_threads
                .iter()
                .filter(|(_, nice)| *nice == want)
                .count()
                == 2
                || Instant::now() > deadline
            {
                break (threads, commit_threads);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            commit_threads,
            vec![("sb-commit-0".to_string(), want), ("sb-commit-1".to_string(), want)],
            "commit_nice = {commit_nice}, process nice {process_nice}, may lower: {permitted}; logs:\n{}",
            server.logs()
        );
        for (name, nice) in &threads {
            if !name.starts_with("sb-commit-") {
                assert_eq!(
                    *nice, process_nice,
                    "thread {name} keeps the process's priority"
                );
            }
        }
        let warning = "cannot give the commit threads";
        if lowers && !permitted {
            assert!(server.has_logged(warning), "{}", server.logs());
        } else {
            // Logged, it would precede the ack.
            assert!(!server.logs().contains(warning), "{}", server.logs());
        }
    }
}
