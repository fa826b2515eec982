//! Power-loss tests of the store with its write-ahead log: the log lives on a
//! [`SimulatedDisk`] that keeps only what was synced (optionally with a torn prefix of the
//! write in flight), and LMDB's data file is taken back to its state at the last sync (a
//! checkpoint), which is what survives a power loss under `MDB_NOSYNC`. The store is then
//! opened on that state, replays its log, and must hold every acked message exactly once,
//! with the seq its ack gave.
//!
//! A variant keeps every LMDB commit instead (the kernel happened to write them all back):
//! replaying records that already reached LMDB must change nothing. Another keeps a random
//! mix of pages, each from the last sync or from the newest commit, with the newest meta
//! pages: LMDB's file as a power loss can leave it under `MDB_NOSYNC`, a meta page pointing at
//! pages that never reached the disk. The saved meta pages (`wal::meta_pages`) must take it
//! back to the last checkpoint.
//!
//! With `durability = "batch"` the log is appended without a sync and flushed now and then:
//! the power loss keeps a random subset of the unsynced writes. Every message acked before the
//! last flush must survive, and what survives must be the acked batches up to some point,
//! never a later batch without an earlier one.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::wal::device::SimulatedDisk;
use super::*;

const SHARD: usize = 1;

fn options(apply: Apply, durability: Durability) -> StoreOptions {
    StoreOptions {
        map_size: 32 << 20,
        max_map_size: 32 << 20,
        durability,
        log_bytes: 0, // the device is given; its size rules
        apply_interval: match apply {
            Apply::EveryBatch => std::time::Duration::ZERO,
            // LMDB commits only when the log fills up (a checkpoint) or its 8 MiB bound.
            Apply::Deferred => std::time::Duration::from_secs(3600),
        },
    }
}

/// When LMDB commits a batch's writes ([`StoreOptions::apply_interval`]).
#[derive(Clone, Copy, Debug)]
enum Apply {
    EveryBatch,
    /// After later batches: at the loss, the newest acked batches are only in the log.
    Deferred,
}

/// What LMDB's data file holds after the power loss.
#[derive(Clone, Copy, Debug)]
enum LmdbAfterLoss {
    /// Only what the last checkpoint synced.
    LastSync,
    /// Every commit (written back by the kernel before the loss).
    Everything,
    /// Each page from the last sync or the newest commit, at random; the meta pages (0 and
    /// 1) always the newest.
    MixedPages,
}

/// `synced` with a random choice of `newest`'s pages over it (pages past `synced`'s end are
/// the newest or zeros), and `newest`'s first two pages (the meta pages).
fn mixed_pages(synced: &[u8], newest: &[u8], rng: &mut StdRng) -> Vec<u8> {
    let page = wal::meta_pages::page_size() as usize;
    let mut out = vec![0u8; synced.len().max(newest.len())];
    out[..synced.len()].copy_from_slice(synced);
    for (index, chunk) in newest.chunks(page).enumerate() {
        let at = index * page;
        if index < 2 || rng.gen_bool(0.5) {
            out[at..at + chunk.len()].copy_from_slice(chunk);
        }
    }
    out
}

fn data_file(dir: &Path) -> std::path::PathBuf {
    dir.join(format!("shard-{SHARD}")).join("data.mdb")
}

/// Runs random batches on a store whose log is on `disk`, loses power at a random batch
/// (torn at a random length), recovers, and checks every acked message. Returns how many
/// checkpoints the run made before the loss.
fn run(seed: u64, lmdb: LmdbAfterLoss, apply: Apply) -> u64 {
    run_with(seed, lmdb, apply, Durability::Fsync)
}

/// [`run`] with `durability`: with `Batch`, the store is flushed after random batches, the loss
/// comes after a random batch was acked, and only what was acked before the last flush has to
/// survive, as a prefix of the acked batches.
fn run_with(seed: u64, lmdb: LmdbAfterLoss, apply: Apply, durability: Durability) -> u64 {
    let batch_mode = durability == Durability::Batch;
    let mut rng = StdRng::seed_from_u64(seed);
    let before = tempfile::tempdir().unwrap();
    // A small log, so runs go through several checkpoints.
    let disk = SimulatedDisk::new(wal::record::HEADER_BYTES + rng.gen_range(2_000..40_000));
    let synced_lmdb = Arc::new(Mutex::new(Vec::new()));
    let mut store = ShardStore::open_with_log(
        before.path(),
        SHARD,
        options(apply, durability),
        Some(Box::new(disk.clone())),
    )
    .unwrap();
    // Opening synced LMDB and reset the log: that is the first synced state.
    *synced_lmdb.lock().unwrap() = std::fs::read(data_file(before.path())).unwrap();
    let hook_copy = synced_lmdb.clone();
    let hook_path = data_file(before.path());
    store.set_checkpoint_hook(Box::new(move || {
        *hook_copy.lock().unwrap() = std::fs::read(&hook_path).unwrap();
    }));

    let mut conversations: Vec<ConversationId> = Vec::new();
    // (conversation, seq) -> text, for every acked message.
    let mut acked: BTreeMap<(ConversationId, u64), String> = BTreeMap::new();
    // (conversation, seq) -> index of the batch that acked it.
    let mut acked_in: BTreeMap<(ConversationId, u64), usize> = BTreeMap::new();
    // conversation -> index of the batch that opened it.
    let mut opened_in: BTreeMap<ConversationId, usize> = BTreeMap::new();
    // With `Batch`: the batches before this index were acked before the last flush.
    let mut flushed_batches = 0;
    let mut in_flight: Vec<(ConversationId, String)> = Vec::new();
    let batches = rng.gen_range(5..60);
    let crash_at = rng.gen_range(0..batches);
    for batch_index in 0..batches {
        let mut ops = Vec::new();
        if conversations.is_empty() || rng.gen_bool(0.2) {
            ops.push(Op::Open {
                site: "site".into(),
                visitor: format!("visitor-{batch_index}"),
            });
        }
        for _ in 0..rng.gen_range(0..12) {
            let Some(&conversation) =
                conversations.get(rng.gen_range(0..conversations.len().max(1)))
            else {
                break;
            };
            let text = format!(
                "message {batch_index}-{} {}",
                ops.len(),
                "x".repeat(rng.gen_range(0..300))
            );
            ops.push(Op::Append(NewMessage {
                conversation,
                from: Author::Visitor,
                name: "Visitor".into(),
                text,
                client_id: Some(format!("c-{batch_index}-{}", ops.len())),
            }));
        }
        if batch_index == crash_at && !batch_mode {
            disk.lose_power_on_next_sync();
        }
        let result = store.apply(&ops);
        // A batch whose log sync failed is not acked. (A batch too large for the log is
        // synced into LMDB directly and acked: then it is in LMDB's last synced state.)
        if batch_index == crash_at && result.is_err() {
            in_flight = ops
                .iter()
                .filter_map(|op| match op {
                    Op::Append(message) => Some((message.conversation, message.text.clone())),
                    _ => None,
                })
                .collect();
            break;
        }
        let outcomes = result.unwrap_or_else(|error| panic!("seed {seed}: {error}"));
        let crashed = batch_index == crash_at;
        for (op, outcome) in ops.iter().zip(outcomes) {
            match (op, outcome) {
                (Op::Open { .. }, OpOutcome::Opened { conversation, .. }) => {
                    conversations.push(conversation);
                    opened_in.insert(conversation, batch_index);
                }
                (Op::Append(message), OpOutcome::Stored { seq, .. }) => {
                    acked.insert((message.conversation, seq), message.text.clone());
                    acked_in.insert((message.conversation, seq), batch_index);
                }
                (op, outcome) => panic!("seed {seed}: {op:?} gave {outcome:?}"),
            }
        }
        if crashed {
            break;
        }
        if batch_mode && rng.gen_bool(0.25) {
            store.flush().unwrap();
            flushed_batches = batch_index + 1;
        }
    }
    let torn = rng.gen_range(0..=disk.last_unsynced_len().unwrap_or(0));
    let kept_writes: Vec<bool> = if batch_mode {
        (0..disk.unsynced_writes())
            .map(|_| rng.gen_bool(0.5))
            .collect()
    } else {
        Vec::new()
    };
    let lmdb_bytes = match lmdb {
        LmdbAfterLoss::LastSync => synced_lmdb.lock().unwrap().clone(),
        LmdbAfterLoss::Everything => std::fs::read(data_file(before.path())).unwrap(),
        LmdbAfterLoss::MixedPages => mixed_pages(
            &synced_lmdb.lock().unwrap(),
            &std::fs::read(data_file(before.path())).unwrap(),
            &mut rng,
        ),
    };
    let (checkpoints, _) = store.checkpoints();
    // The process dies with the power: nothing it does from now reaches the disk.
    disk.fail_from_now();
    drop(store);
    disk.power_loss_keeping(&kept_writes, Some(torn));

    // The machine comes back: LMDB's file as it survived, the log as the disk kept it.
    let after = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(data_file(after.path()).parent().unwrap()).unwrap();
    std::fs::write(data_file(after.path()), &lmdb_bytes).unwrap();
    let store = ShardStore::open_with_log(
        after.path(),
        SHARD,
        options(apply, durability),
        Some(Box::new(disk.clone())),
    )
    .unwrap_or_else(|error| panic!("seed {seed}: recovery failed: {error}"));

    let view = store.read().unwrap();
    let mut stored: BTreeMap<(ConversationId, u64), String> = BTreeMap::new();
    // With `Batch`, the batches before this index survived (see below).
    let mut survived = flushed_batches;
    let mut missing_conversations = Vec::new();
    for &conversation in &conversations {
        let Some(last) = view.last_seq(conversation).unwrap() else {
            assert!(
                batch_mode,
                "seed {seed}: conversation {conversation} opened and acked, now missing"
            );
            missing_conversations.push(conversation);
            continue;
        };
        survived = survived.max(opened_in[&conversation] + 1);
        let mut expected_seq = 1;
        for message in view.messages_after(conversation, 0, usize::MAX).unwrap() {
            let message = message.unwrap();
            assert_eq!(
                message.seq.to_native(),
                expected_seq,
                "seed {seed}: seqs not dense"
            );
            expected_seq += 1;
            stored.insert(
                (conversation, message.seq.to_native()),
                message.text.to_string(),
            );
        }
        assert_eq!(
            expected_seq - 1,
            last,
            "seed {seed}: last_seq disagrees with the messages"
        );
    }
    if batch_mode {
        // Everything acked before the last flush, and a prefix of the acked batches.
        let survived = acked_in
            .iter()
            .filter(|(key, _)| stored.contains_key(key))
            .map(|(_, &batch)| batch + 1)
            .max()
            .unwrap_or(0)
            .max(survived);
        for conversation in missing_conversations {
            assert!(
                opened_in[&conversation] >= survived,
                "seed {seed}: conversation {conversation} of batch {} lost; batches up to \
                 {survived} survived (flushed: {flushed_batches})",
                opened_in[&conversation]
            );
        }
        for (key, text) in &acked {
            if acked_in[key] < survived {
                assert_eq!(
                    stored.get(key),
                    Some(text),
                    "seed {seed} ({lmdb:?}, {apply:?}): acked {key:?} of batch {} lost; batches \
                     up to {survived} survived (flushed: {flushed_batches})",
                    acked_in[key]
                );
            }
        }
    } else {
        for (key, text) in &acked {
            assert_eq!(
                stored.get(key),
                Some(text),
                "seed {seed} ({lmdb:?}, {apply:?}, torn {torn}): acked {key:?} lost"
            );
        }
    }
    // Anything else stored is from the batch in flight (its record reached the disk whole:
    // stored but never acked, as when an ack is lost).
    for (key, text) in &stored {
        if !acked.contains_key(key) {
            assert!(
                in_flight.iter().any(|(c, t)| *c == key.0 && t == text),
                "seed {seed}: {key:?} stored but never sent: {text:?}"
            );
        }
    }
    checkpoints
}

#[test]
fn every_acked_message_survives_a_power_loss_with_lmdb_at_its_last_sync() {
    let checkpoints: u64 = (0..150)
        .map(|seed| run(seed, LmdbAfterLoss::LastSync, Apply::EveryBatch))
        .sum();
    // The runs went through checkpoints, so "LMDB at its last sync" was not only the start.
    assert!(checkpoints > 100, "only {checkpoints} checkpoints");
}

#[test]
fn replaying_records_that_already_reached_lmdb_changes_nothing() {
    let checkpoints: u64 = (1000..1100)
        .map(|seed| run(seed, LmdbAfterLoss::Everything, Apply::EveryBatch))
        .sum();
    assert!(checkpoints > 50, "only {checkpoints} checkpoints");
}

#[test]
fn newer_meta_pages_over_stale_data_pages_are_taken_back_to_the_checkpoint() {
    let checkpoints: u64 = (2000..2150)
        .map(|seed| run(seed, LmdbAfterLoss::MixedPages, Apply::EveryBatch))
        .sum();
    assert!(checkpoints > 100, "only {checkpoints} checkpoints");
}

/// The three [`LmdbAfterLoss`] cases in turn.
fn lmdb_after_loss(seed: u64) -> LmdbAfterLoss {
    match seed % 3 {
        0 => LmdbAfterLoss::LastSync,
        1 => LmdbAfterLoss::Everything,
        _ => LmdbAfterLoss::MixedPages,
    }
}

/// Deferred apply: the acked batches LMDB had not committed at the loss come back from the log,
/// whatever LMDB's file kept.
#[test]
fn every_acked_message_survives_a_power_loss_with_deferred_apply() {
    let mut checkpoints = 0;
    for seed in 3000..3150 {
        let lmdb = lmdb_after_loss(seed);
        checkpoints += run(seed, lmdb, Apply::Deferred);
    }
    assert!(checkpoints > 100, "only {checkpoints} checkpoints");
}

/// `durability = "batch"` over the log: after a power loss, every batch acked before the last
/// flush survives, and the batches that survive are a prefix of the acked ones, whatever
/// unsynced log writes and LMDB pages reached the disk.
#[test]
fn batch_durability_keeps_every_flushed_batch_and_a_prefix_after_a_power_loss() {
    let mut checkpoints = 0;
    for seed in 4000..4150 {
        let lmdb = lmdb_after_loss(seed);
        let apply = if seed % 2 == 0 {
            Apply::EveryBatch
        } else {
            Apply::Deferred
        };
        checkpoints += run_with(seed, lmdb, apply, Durability::Batch);
    }
    assert!(checkpoints > 100, "only {checkpoints} checkpoints");
}

/// The recovered store keeps working: new messages get the next seqs, and a re-sent
/// message of an acked batch is recognised with its original seq.
#[test]
fn a_recovered_store_continues_the_seqs_and_recognises_resent_messages() {
    let before = tempfile::tempdir().unwrap();
    let disk = SimulatedDisk::new(wal::record::HEADER_BYTES + 64 * 1024);
    let mut store = ShardStore::open_with_log(
        before.path(),
        SHARD,
        options(Apply::EveryBatch, Durability::Fsync),
        Some(Box::new(disk.clone())),
    )
    .unwrap();
    let synced = std::fs::read(data_file(before.path())).unwrap();
    let conversation = match store
        .apply(&[Op::Open {
            site: "s".into(),
            visitor: "v".into(),
        }])
        .unwrap()[..]
    {
        [OpOutcome::Opened { conversation, .. }] => conversation,
        ref other => panic!("{other:?}"),
    };
    let message = |text: &str, id: &str| NewMessage {
        conversation,
        from: Author::Visitor,
        name: "Visitor".into(),
        text: text.into(),
        client_id: Some(id.into()),
    };
    let outcomes = store
        .append_batch(&[message("one", "id-1"), message("two", "id-2")])
        .unwrap();
    assert!(matches!(outcomes[1], AppendOutcome::Stored { seq: 2, .. }));
    assert_eq!(
        store.checkpoints(),
        (0, 0),
        "no checkpoint: LMDB was never synced since open"
    );
    disk.fail_from_now();
    drop(store);
    disk.power_loss(None);

    let after = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(data_file(after.path()).parent().unwrap()).unwrap();
    std::fs::write(data_file(after.path()), &synced).unwrap();
    let mut store = ShardStore::open_with_log(
        after.path(),
        SHARD,
        options(Apply::EveryBatch, Durability::Fsync),
        Some(Box::new(disk.clone())),
    )
    .unwrap();
    assert_eq!(store.last_seq(conversation).unwrap(), Some(2));
    let outcomes = store
        .append_batch(&[message("two", "id-2"), message("three", "id-3")])
        .unwrap();
    assert_eq!(outcomes[0], AppendOutcome::Duplicate { seq: 2 });
    assert!(matches!(outcomes[1], AppendOutcome::Stored { seq: 3, .. }));
}
