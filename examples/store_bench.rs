//! Measures the shard store on this machine's disk: appends/s and commit latency for
//! batches of 1, 16 and 128 messages under each durability mode (`fsync` with its
//! write-ahead log, and `fsync` without one: LMDB syncing every commit), then replay speed
//! and the cost of bytecheck validation of a record.
//!
//! `cargo run --release --example store_bench -- [--seconds S] [--dir PATH] [--batches 1,16,128]`
//! PATH defaults to `./bench-data` (use a directory on the disk the service will use).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use switchboard::store::{
    AppendOutcome, ArchivedMessageRecord, Author, ConversationId, Durability, MessageRecord,
    NewMessage, Op, OpOutcome, ShardStore, StoreOptions, DEFAULT_LOG_BYTES,
};

const CONVERSATIONS: usize = 64;
/// A typical chat line.
const TEXT: &str = "Hello, I ordered a blue jacket last week and the tracking page still says \
                    label created. Can you check?";
/// In `batch` mode a timer thread flushes about once per commit window.
const FLUSH_INTERVAL: Duration = Duration::from_millis(1);

fn main() {
    let mut seconds = 3.0f64;
    let mut dir = PathBuf::from("bench-data");
    let mut batches = vec![1usize, 16, 128];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--seconds N")
            }
            "--dir" => dir = args.next().map(PathBuf::from).expect("--dir PATH"),
            "--batches" => {
                batches = args
                    .next()
                    .map(|v| {
                        v.split(',')
                            .map(|n| n.parse().expect("batch size"))
                            .collect()
                    })
                    .expect("--batches 1,16,128")
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let run_for = Duration::from_secs_f64(seconds);
    std::fs::create_dir_all(&dir).unwrap();
    let dir = tempfile::tempdir_in(&dir).unwrap();
    println!(
        "store_bench: {seconds} s per case, data in {}",
        dir.path().display()
    );
    println!(
        "text {} bytes, {CONVERSATIONS} conversations, client ids on every message",
        TEXT.len()
    );
    println!();
    println!("| durability | batch | msgs/s | commits/s | commit p50 | commit p99 | commit max | flushes | flush p50 | flush p99 |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");

    // The default deferred apply (`[storage] apply_interval`) next to LMDB committing every batch.
    let deferred = Duration::from_millis(50);
    let cases = [
        (
            Durability::Fsync,
            DEFAULT_LOG_BYTES,
            deferred,
            "fsync (log, apply 50ms)",
        ),
        (
            Durability::Fsync,
            DEFAULT_LOG_BYTES,
            Duration::ZERO,
            "fsync (log)",
        ),
        (Durability::Fsync, 0, Duration::ZERO, "fsync (no log)"),
        (Durability::Batch, 0, Duration::ZERO, "batch"),
        (Durability::None, 0, Duration::ZERO, "none"),
    ];
    for (durability, log_bytes, apply_interval, name) in cases {
        for &batch_size in &batches {
            let case_dir = dir.path().join(format!(
                "{}-{log_bytes}-{}-{batch_size}",
                durability.as_str(),
                apply_interval.as_millis()
            ));
            append_case(
                &case_dir,
                (durability, log_bytes, apply_interval, name),
                batch_size,
                run_for,
            );
        }
    }
    println!();
    replay_case(&dir.path().join("replay"));
}

fn append_case(
    dir: &std::path::Path,
    (durability, log_bytes, apply_interval, name): (Durability, u64, Duration, &str),
    batch_size: usize,
    run_for: Duration,
) {
    let options = StoreOptions {
        map_size: 8 << 30,
        max_map_size: 8 << 30,
        durability,
        log_bytes,
        apply_interval,
    };
    let mut store = ShardStore::open(dir, 0, options).unwrap();
    let conversations = open_conversations(&mut store, CONVERSATIONS);
    let mut commit = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    // `batch` mode: a timer thread syncs every FLUSH_INTERVAL, off the committing thread.
    let stop = Arc::new(AtomicBool::new(false));
    let flusher_thread = durability.needs_periodic_flush().then(|| {
        let flusher = store.flusher().unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut flush = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(FLUSH_INTERVAL);
                let t0 = Instant::now();
                flusher.flush().unwrap();
                flush
                    .record(t0.elapsed().as_micros().max(1) as u64)
                    .unwrap();
            }
            flush
        })
    });
    let mut next_id = 0u64;
    let mut messages = 0u64;
    let mut batch = Vec::with_capacity(batch_size);
    let started = Instant::now();
    while started.elapsed() < run_for {
        batch.clear();
        for _ in 0..batch_size {
            batch.push(NewMessage {
                conversation: conversations[next_id as usize % conversations.len()],
                from: Author::Visitor,
                name: "Visitor".into(),
                text: TEXT.into(),
                client_id: Some(format!("c{next_id}")),
            });
            next_id += 1;
        }
        let t0 = Instant::now();
        let outcomes = store.append_batch(&batch).unwrap();
        commit
            .record(t0.elapsed().as_micros().max(1) as u64)
            .unwrap();
        debug_assert!(outcomes
            .iter()
            .all(|o| matches!(o, AppendOutcome::Stored { .. })));
        messages += outcomes.len() as u64;
    }
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let flush = flusher_thread.map(|thread| thread.join().unwrap());
    let (flushes, flush_p50, flush_p99) = if let Some(flush) = flush {
        (
            flush.len().to_string(),
            micros(flush.value_at_quantile(0.5)),
            micros(flush.value_at_quantile(0.99)),
        )
    } else {
        ("-".to_string(), "-".to_string(), "-".to_string())
    };
    println!(
        "| {name} | {batch_size} | {:.0} | {:.0} | {} | {} | {} | {flushes} | {flush_p50} | {flush_p99} |",
        messages as f64 / elapsed,
        commit.len() as f64 / elapsed,
        micros(commit.value_at_quantile(0.5)),
        micros(commit.value_at_quantile(0.99)),
        micros(commit.max()),
    );
}

fn replay_case(dir: &std::path::Path) {
    const MESSAGES: u64 = 10_000;
    const ROUNDS: u32 = 50;
    let options = StoreOptions {
        map_size: 1 << 30,
        max_map_size: 1 << 30,
        durability: Durability::None,
        log_bytes: 0,
        apply_interval: std::time::Duration::ZERO,
    };
    let mut store = ShardStore::open(dir, 0, options).unwrap();
    let conversation = open_conversations(&mut store, 1)[0];
    for chunk in 0..MESSAGES / 500 {
        let batch: Vec<_> = (0..500)
            .map(|i| NewMessage {
                conversation,
                from: Author::Agent,
                name: "Ana".into(),
                text: TEXT.into(),
                client_id: Some(format!("r{}", chunk * 500 + i)),
            })
            .collect();
        store.append_batch(&batch).unwrap();
    }

    let mut bytes_seen = 0usize;
    let t0 = Instant::now();
    for _ in 0..ROUNDS {
        let view = store.read().unwrap();
        for message in view.messages_after(conversation, 0, usize::MAX).unwrap() {
            bytes_seen += message.unwrap().text().len();
        }
    }
    let elapsed = t0.elapsed();
    let per_record = elapsed.as_nanos() as f64 / (ROUNDS as f64 * MESSAGES as f64);
    assert_eq!(bytes_seen, ROUNDS as usize * MESSAGES as usize * TEXT.len());
    println!(
        "replay (ReadView::messages_after, validated, zero-copy): {MESSAGES} msgs x {ROUNDS}: \
         {:.0} ns/msg, {:.2} M msgs/s",
        per_record,
        1e3 / per_record
    );

    // Validation cost in isolation: one record at an odd (unaligned) address.
    let record = MessageRecord {
        seq: 42,
        from: Author::Visitor,
        name: "Visitor".into(),
        text: TEXT.into(),
        ts_ms: 1_700_000_000_000,
        client_id: Some("c-1234567".into()),
    };
    let archived = rkyv::to_bytes::<rkyv::rancor::Error>(&record).unwrap();
    let mut buffer = vec![0u8; 1];
    buffer.extend_from_slice(&archived);
    let bytes = &buffer[1..];
    const ITERATIONS: u32 = 2_000_000;
    let t0 = Instant::now();
    let mut sum = 0u64;
    for _ in 0..ITERATIONS {
        let bytes = std::hint::black_box(bytes);
        let message = rkyv::access::<ArchivedMessageRecord, rkyv::rancor::Error>(bytes).unwrap();
        sum += message.seq() + message.text().len() as u64;
    }
    let checked = t0.elapsed().as_nanos() as f64 / ITERATIONS as f64;
    let t0 = Instant::now();
    for _ in 0..ITERATIONS {
        let bytes = std::hint::black_box(bytes);
        // SAFETY: `bytes` was produced by rkyv::to_bytes for this type just above.
        let message = unsafe { rkyv::access_unchecked::<ArchivedMessageRecord>(bytes) };
        sum += message.seq() + message.text().len() as u64;
    }
    let unchecked = t0.elapsed().as_nanos() as f64 / ITERATIONS as f64;
    std::hint::black_box(sum);
    println!(
        "record access ({} bytes archived): checked {checked:.1} ns, unchecked {unchecked:.1} ns, \
         validation {:.1} ns/record",
        archived.len(),
        checked - unchecked
    );
}

fn open_conversations(store: &mut ShardStore, count: usize) -> Vec<ConversationId> {
    let ops: Vec<_> = (0..count)
        .map(|i| Op::Open {
            site: "bench".into(),
            visitor: format!("visitor-{i}"),
        })
        .collect();
    store
        .apply(&ops)
        .unwrap()
        .into_iter()
        .map(|outcome| match outcome {
            OpOutcome::Opened { conversation, .. } => conversation,
            other => panic!("open failed: {other:?}"),
        })
        .collect()
}

fn micros(value: u64) -> String {
    if value >= 10_000 {
        format!("{:.1} ms", value as f64 / 1000.0)
    } else {
        format!("{value} µs")
    }
}
