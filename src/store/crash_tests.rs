//! Crash test: a child process appends with `Durability::Fsync` (and, in a second test,
//! `Durability::Batch`, whose log appends are not synced: a process crash must lose nothing
//! either, the page cache keeps them) and prints every ack; the
//! parent kills it with SIGKILL at a random moment, several times over the same directory,
//! then checks that every acked message is stored under its acked seq, exactly once, with
//! dense seqs. Each restarted child re-sends the last ids before where it resumes, like a
//! client re-sending unacked messages, and must get the original seqs back.
//!
//! The child is this same test binary, started with the ignored test
//! `crash_child_appender` and its parameters in environment variables.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::Rng;

use super::*;

const ENV_DIR: &str = "STORE_CRASH_CHILD_DIR";
const ENV_START: &str = "STORE_CRASH_CHILD_START";
const ENV_RESEND: &str = "STORE_CRASH_CHILD_RESEND";
const ENV_DURABILITY: &str = "STORE_CRASH_CHILD_DURABILITY";
const CONVERSATIONS: usize = 3;
const SHARD: usize = 1;
const ROUNDS: usize = 4;

/// Message `index` goes to conversation `index % CONVERSATIONS` with client id `m<index>`.
fn client_id(index: u64) -> String {
    format!("m{index}")
}

#[test]
#[ignore = "child process of crash_kill9_keeps_every_acked_message; not a test on its own"]
fn crash_child_appender() {
    let Ok(dir) = std::env::var(ENV_DIR) else {
        return;
    };
    let start: u64 = std::env::var(ENV_START).unwrap().parse().unwrap();
    let resend: u64 = std::env::var(ENV_RESEND).unwrap().parse().unwrap();
    let durability = Durability::parse(&std::env::var(ENV_DURABILITY).unwrap()).unwrap();
    let options = StoreOptions {
        map_size: 256 << 20,
        max_map_size: 256 << 20,
        durability,
        log_bytes: 1 << 20,
        // Deferred apply: at the kill, the newest acked batches are in the log and in an LMDB
        // transaction that never committed.
        apply_interval: std::time::Duration::from_millis(2),
    };
    let mut store = ShardStore::open(Path::new(&dir), SHARD, options).unwrap();
    let opens: Vec<_> = (0..CONVERSATIONS)
        .map(|i| Op::Open {
            site: "crash".into(),
            visitor: format!("visitor-{i}"),
        })
        .collect();
    let conversations: Vec<ConversationId> = store
        .apply(&opens)
        .unwrap()
        .into_iter()
        .map(|outcome| match outcome {
            OpOutcome::Opened { conversation, .. } => conversation,
            other => panic!("open failed: {other:?}"),
        })
        .collect();

    let stdout = std::io::stdout();
    // The test harness has printed "test <name> ... " without a newline: end that line so
    // every ack starts a line of its own.
    writeln!(stdout.lock()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut next = start.saturating_sub(resend);
    while Instant::now() < deadline {
        let size = next % 7 + 1; // batches of 1..=7 messages
        let indexes: Vec<u64> = (next..next + size).collect();
        let batch: Vec<NewMessage> = indexes
            .iter()
            .map(|&i| NewMessage {
                conversation: conversations[i as usize % CONVERSATIONS],
                from: Author::Visitor,
                name: "crash".into(),
                text: format!("text of message {i}"),
                client_id: Some(client_id(i)),
            })
            .collect();
        let outcomes = store.append_batch(&batch).unwrap();
        // Acks are printed only after append_batch returned, as the server acks.
        let mut out = stdout.lock();
        for (i, outcome) in indexes.iter().zip(&outcomes) {
            let conversation = conversations[*i as usize % CONVERSATIONS];
            let (kind, seq) = match outcome {
                AppendOutcome::Stored { seq, .. } => ("stored", seq),
                AppendOutcome::Duplicate { seq } => ("dup", seq),
                AppendOutcome::Rejected(reason) => panic!("rejected: {reason}"),
            };
            writeln!(out, "ACK {i} {} {seq} {kind}", conversation.0).unwrap();
        }
        out.flush().unwrap();
        next += size;
    }
}

/// One ack line of the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ack {
    conversation: u64,
    seq: u64,
    duplicate: bool,
}

fn parse_ack(line: &str) -> Option<(u64, Ack)> {
    let mut parts = line.strip_prefix("ACK ")?.split(' ');
    let index = parts.next()?.parse().ok()?;
    let conversation = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    let duplicate = match parts.next()? {
        "dup" => true,
        "stored" => false,
        _ => return None,
    };
    if parts.next().is_some() {
        return None;
    }
    Some((
        index,
        Ack {
            conversation,
            seq,
            duplicate,
        },
    ))
}

/// Runs one child from `start`, kills it with SIGKILL after a random delay once it has
/// acked something, and returns the acks it printed.
fn run_and_kill(
    dir: &Path,
    durability: Durability,
    start: u64,
    resend: u64,
    rng: &mut impl Rng,
) -> Vec<(u64, Ack)> {
    // The harness names tests by module path without the crate name.
    let module = module_path!().split_once("::").map_or("", |(_, rest)| rest);
    let child_test = format!("{module}::crash_child_appender");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            child_test.as_str(),
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV_DIR, dir)
        .env(ENV_START, start.to_string())
        .env(ENV_RESEND, resend.to_string())
        .env(ENV_DURABILITY, durability.as_str())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match stdout.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            // A line cut short by the kill has no newline and is not an ack.
            let Some(complete) = line.strip_suffix('\n') else {
                break;
            };
            if let Some(ack) = parse_ack(complete) {
                if lines_tx.send(ack).is_err() {
                    break;
                }
            }
        }
    });

    // Wait for the first ack (bounded), then let it run a random while and kill it.
    let mut acks = Vec::new();
    match lines_rx.recv_timeout(Duration::from_secs(15)) {
        Ok(ack) => acks.push(ack),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child acked nothing within 15 s");
        }
    }
    std::thread::sleep(Duration::from_millis(rng.gen_range(50..400)));
    child.kill().expect("SIGKILL child");
    let status = child.wait().unwrap();
    assert!(!status.success(), "child ended on its own before the kill");
    reader.join().unwrap();
    acks.extend(lines_rx.try_iter());
    acks
}

#[test]
fn crash_kill9_keeps_every_acked_message() {
    kill9_rounds(Durability::Fsync);
}

#[test]
fn crash_kill9_keeps_every_acked_message_with_batch_durability() {
    kill9_rounds(Durability::Batch);
}

/// [`ROUNDS`] children appending with `durability`, each killed; then every ack is checked.
fn kill9_rounds(durability: Durability) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand::thread_rng();
    // index -> (conversation, seq) as first acked.
    let mut acked: BTreeMap<u64, Ack> = BTreeMap::new();
    let mut duplicates_checked = 0usize;
    let mut committed_unacked = 0usize;
    let mut next_start = 0u64;

    for round in 0..ROUNDS {
        let resend = if round == 0 { 0 } else { 20 };
        let acks = run_and_kill(dir.path(), durability, next_start, resend, &mut rng);
        eprintln!(
            "crash round {round}: {} ack lines after resuming at {next_start}",
            acks.len()
        );
        for (index, ack) in acks {
            match acked.get(&index) {
                Some(first) => {
                    // Re-sent after a crash: must be recognised with the original seq.
                    assert!(
                        ack.duplicate,
                        "message {index} stored twice: {first:?} then {ack:?}"
                    );
                    assert_eq!((ack.conversation, ack.seq), (first.conversation, first.seq));
                    duplicates_checked += 1;
                }
                None => {
                    // A `dup` here was committed by a killed child before it could print.
                    committed_unacked += usize::from(ack.duplicate);
                    acked.insert(index, ack);
                }
            }
        }
        // Everything below the highest ack was acked (batches go out in index order).
        next_start = acked.keys().next_back().map_or(0, |last| last + 1);
        let holes: Vec<u64> = (0..next_start).filter(|i| !acked.contains_key(i)).collect();
        assert!(
            holes.is_empty(),
            "round {round}: acks missing for {holes:?}"
        );
    }
    assert!(duplicates_checked >= 20, "resends were not exercised");

    let store = ShardStore::open(
        dir.path(),
        SHARD,
        StoreOptions {
            map_size: 256 << 20,
            max_map_size: 256 << 20,
            durability,
            log_bytes: 1 << 20,
            apply_interval: std::time::Duration::ZERO,
        },
    )
    .unwrap();
    let open = store.open_conversations().unwrap();
    assert_eq!(
        open.len(),
        CONVERSATIONS,
        "restarts must resume, not create, conversations"
    );

    // Everything stored, per conversation: seq -> client index.
    let mut stored: HashMap<u64, BTreeMap<u64, u64>> = HashMap::new();
    for conversation in &open {
        let mut by_seq = BTreeMap::new();
        let mut seen_ids = std::collections::HashSet::new();
        store
            .messages_after(conversation.id, 0, usize::MAX, |m| {
                let id = m.client_id().expect("client id").to_owned();
                assert!(seen_ids.insert(id.clone()), "client id {id} stored twice");
                let index: u64 = id[1..].parse().unwrap();
                assert_eq!(m.text(), format!("text of message {index}"));
                by_seq.insert(m.seq(), index);
            })
            .unwrap();
        let expected: Vec<u64> = (1..=conversation.last_seq).collect();
        assert_eq!(
            by_seq.keys().copied().collect::<Vec<_>>(),
            expected,
            "seqs of {} must be dense 1..=last_seq",
            conversation.id
        );
        stored.insert(conversation.id.0, by_seq);
    }
    for (index, ack) in &acked {
        let at = stored
            .get(&ack.conversation)
            .and_then(|by_seq| by_seq.get(&ack.seq));
        assert_eq!(
            at,
            Some(index),
            "acked message {index} ({ack:?}) missing after crash"
        );
    }
    // Committed-but-unacked messages may exist beyond the last ack; none may be skipped.
    let total: usize = stored.values().map(BTreeMap::len).sum();
    assert!(total >= acked.len());
    eprintln!(
        "crash test: {} acked, {total} stored, {duplicates_checked} resends of acked and \
         {committed_unacked} of committed-but-unacked messages recognised",
        acked.len()
    );
    let mut all_indexes: Vec<u64> = stored.values().flat_map(|m| m.values().copied()).collect();
    all_indexes.sort_unstable();
    assert_eq!(all_indexes, (0..total as u64).collect::<Vec<_>>());
}
