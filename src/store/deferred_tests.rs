//! Tests of deferred apply ([`StoreOptions::apply_interval`]): batches acked from the log while
//! their LMDB writes wait in an open transaction, read through the overlay, replayed when that
//! transaction has to be abandoned, and recovered from the log when the process dies.

use std::path::Path;
use std::time::Duration;

use super::full_tests::{message, open_conversation as opened};
use super::*;

const SHARD: usize = 2;

fn options(map: usize, max_map: usize) -> StoreOptions {
    StoreOptions {
        map_size: map,
        max_map_size: max_map,
        durability: Durability::Fsync,
        log_bytes: 4 << 20,
        apply_interval: Duration::from_secs(3600),
    }
}

fn open(dir: &Path, map: usize, max_map: usize) -> ShardStore {
    ShardStore::open(dir, SHARD, options(map, max_map)).expect("open store")
}

/// Every message of `conversation` as a reader on another handle sees it: (seq, text).
fn read_all(reader: &StoreReader, conversation: ConversationId) -> Vec<(u64, String)> {
    let view = reader.read().unwrap();
    view.messages_after(conversation, 0, usize::MAX)
        .unwrap()
        .map(|message| {
            let message = message.unwrap();
            (message.seq.to_native(), message.text.to_string())
        })
        .collect()
}

/// What LMDB itself has committed, without the overlay: the number of messages of
/// `conversation` in a fresh environment handle's read transaction.
fn committed_messages(store: &ShardStore, conversation: ConversationId) -> usize {
    let view = store.read_committed().unwrap();
    view.messages_after(conversation, 0, usize::MAX)
        .unwrap()
        .count()
}

#[test]
fn readers_see_acked_batches_before_lmdb_commits_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), 64 << 20, 64 << 20);
    let reader = store.reader();
    let first = opened(&mut store, "v1");
    let second = opened(&mut store, "v2");
    for round in 0..3 {
        let batch: Vec<_> = [first, second]
            .iter()
            .map(|&c| message(c, &format!("r{round} {c}"), &format!("{c}-{round}")))
            .collect();
        store.append_batch(&batch).unwrap();
    }
    store
        .apply(&[Op::SetState {
            conversation: second,
            state: ConversationState::Closed,
        }])
        .unwrap();
    assert!(store.has_pending());
    assert_eq!(
        committed_messages(&store, first),
        0,
        "LMDB has not committed yet"
    );

    let check = |reader: &StoreReader| {
        let expected = |c: ConversationId| -> Vec<(u64, String)> {
            (0..3).map(|r| (r + 1, format!("r{r} {c}"))).collect()
        };
        assert_eq!(read_all(reader, first), expected(first));
        assert_eq!(read_all(reader, second), expected(second));
        let view = reader.read().unwrap();
        assert_eq!(view.last_seq(first).unwrap(), Some(3));
        assert_eq!(
            view.conversation_of_visitor("s", "v1").unwrap(),
            Some(first)
        );
        assert_eq!(
            view.message(second, 2).unwrap().unwrap().text,
            "r1 ".to_owned() + &second.to_string()
        );
        let open: Vec<_> = view
            .open_conversations()
            .unwrap()
            .iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(
            open,
            vec![first],
            "the closed conversation left the open set"
        );
        let newest_first: Vec<_> = view
            .conversations_before(None)
            .unwrap()
            .map(|c| c.unwrap().id)
            .collect();
        assert_eq!(newest_first, vec![second, first]);
        assert_eq!(
            view.messages_after(first, 1, 1)
                .unwrap()
                .map(|m| m.unwrap().seq.to_native())
                .collect::<Vec<_>>(),
            vec![2]
        );
    };
    check(&reader);
    // The writer's own reads continue the seqs and recognise a re-sent message.
    let outcomes = store
        .append_batch(&[
            message(first, "again", &format!("{first}-1")),
            message(first, "fourth", "new"),
        ])
        .unwrap();
    assert_eq!(
        outcomes.iter().map(AppendOutcome::seq).collect::<Vec<_>>(),
        vec![Some(2), Some(4)]
    );

    store.apply_pending().unwrap();
    assert!(!store.has_pending());
    assert_eq!(committed_messages(&store, first), 4);
    assert_eq!(read_all(&reader, first).len(), 4);
    // A batch that writes nothing (a re-send) keeps no transaction open, and logs nothing.
    let logged = store.log_used();
    let outcomes = store
        .append_batch(&[message(first, "fourth", "new")])
        .unwrap();
    assert_eq!(outcomes[0], AppendOutcome::Duplicate { seq: 4 });
    assert!(!store.has_pending());
    assert_eq!(store.log_used(), logged, "an empty batch appended a record");
}

#[test]
fn a_failed_batch_leaves_the_acked_batches_before_it_in_place() {
    let dir = tempfile::tempdir().unwrap();
    // A small map that does not grow: a large batch fails with `MapFull` inside the open
    // transaction that holds the acked batches.
    let mut store = open(dir.path(), 1 << 20, 1 << 20);
    let reader = store.reader();
    let c = opened(&mut store, "v");
    for i in 0..5 {
        store
            .append_batch(&[message(c, &format!("m{i}"), &format!("id{i}"))])
            .unwrap();
    }
    assert!(store.has_pending());
    let huge: Vec<_> = (0..400)
        .map(|i| message(c, &"x".repeat(4000), &format!("big{i}")))
        .collect();
    let error = store.append_batch(&huge).unwrap_err();
    assert!(matches!(error, StoreError::MapFull { .. }), "{error}");
    // Nothing of the failed batch, everything acked before it, in the overlay and after the
    // next batch (whose transaction replays the acked batches first).
    assert_eq!(read_all(&reader, c).len(), 5);
    let outcomes = store
        .append_batch(&[message(c, "after", "after"), message(c, "dup", "id3")])
        .unwrap();
    assert_eq!(
        outcomes.iter().map(AppendOutcome::seq).collect::<Vec<_>>(),
        vec![Some(6), Some(4)]
    );
    store.apply_pending().unwrap();
    let texts: Vec<_> = read_all(&reader, c).into_iter().map(|(_, t)| t).collect();
    assert_eq!(texts, ["m0", "m1", "m2", "m3", "m4", "after"]);
}

#[test]
fn a_batch_that_grows_the_map_keeps_the_acked_batches_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path(), 1 << 20, 64 << 20);
    let reader = store.reader();
    let c = opened(&mut store, "v");
    store.append_batch(&[message(c, "first", "a")]).unwrap();
    let large: Vec<_> = (0..400)
        .map(|i| message(c, &"y".repeat(4000), &format!("large{i}")))
        .collect();
    let outcomes = store.append_batch(&large).unwrap();
    assert_eq!(outcomes.last().unwrap().seq(), Some(401));
    assert!(store.map_size() > 1 << 20, "the map grew");
    assert_eq!(read_all(&reader, c).len(), 401);
    drop(reader);
    drop(store);
    let store = open(dir.path(), 1 << 20, 64 << 20);
    assert_eq!(read_all(&store.reader(), c).len(), 401);
}

/// The `apply_interval` of the tests that wait for it to pass.
const SHORT_INTERVAL: Duration = Duration::from_millis(400);

#[test]
fn a_closed_store_keeps_every_acked_batch_and_a_short_interval_commits_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let c;
    {
        let mut store = open(dir.path(), 64 << 20, 64 << 20);
        c = opened(&mut store, "v");
        store.append_batch(&[message(c, "kept", "k")]).unwrap();
        assert!(store.has_pending());
        // Dropped with the batch pending: it is applied (and checkpointed) on the way out.
    }
    let mut options = options(64 << 20, 64 << 20);
    // Long enough that a batch on a loaded CI machine (a synced log append) ends well inside
    // it: 5 ms failed once when the batch itself took longer and committed at once.
    options.apply_interval = SHORT_INTERVAL;
    let mut store = ShardStore::open(dir.path(), SHARD, options).unwrap();
    assert_eq!(committed_messages(&store, c), 1);
    store.append_batch(&[message(c, "second", "s")]).unwrap();
    assert!(store.has_pending());
    std::thread::sleep(SHORT_INTERVAL + Duration::from_millis(50));
    // The interval has passed: the next batch's end commits LMDB.
    store.append_batch(&[message(c, "third", "t")]).unwrap();
    assert!(!store.has_pending());
    assert_eq!(committed_messages(&store, c), 3);
}

/// A batch that writes nothing (a re-send) still ends a transaction that is due: a stream of
/// re-sends does not keep the acked batches out of LMDB.
#[test]
fn a_batch_that_writes_nothing_commits_a_due_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = options(64 << 20, 64 << 20);
    options.apply_interval = SHORT_INTERVAL;
    let mut store = ShardStore::open(dir.path(), SHARD, options).unwrap();
    let c = opened(&mut store, "v");
    store.append_batch(&[message(c, "first", "f")]).unwrap();
    assert!(store.has_pending());
    std::thread::sleep(SHORT_INTERVAL + Duration::from_millis(50));
    let outcomes = store.append_batch(&[message(c, "first", "f")]).unwrap();
    assert_eq!(outcomes[0], AppendOutcome::Duplicate { seq: 1 });
    assert!(!store.has_pending(), "the due transaction stayed open");
    assert_eq!(committed_messages(&store, c), 1);
}

/// `durability = "batch"`: when the flusher's sync of the log fails, the next batch, even one
/// that writes nothing, checkpoints (LMDB synced, the log restarted) before it is acked.
#[test]
fn a_failed_flush_makes_the_next_batch_checkpoint_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = options(64 << 20, 64 << 20);
    options.durability = Durability::Batch;
    let mut store = ShardStore::open(dir.path(), SHARD, options).unwrap();
    let c = opened(&mut store, "v");
    store.append_batch(&[message(c, "first", "f")]).unwrap();
    let flusher = store.flusher().unwrap();
    flusher.flush().unwrap();
    let (checkpoints, _) = store.checkpoints();
    assert!(store.log_used() > 0);

    flusher.simulate_failure();
    let outcomes = store.append_batch(&[message(c, "first", "f")]).unwrap();
    assert_eq!(outcomes[0], AppendOutcome::Duplicate { seq: 1 });
    assert_eq!(
        store.checkpoints().0,
        checkpoints + 1,
        "no checkpoint after the failure"
    );
    assert_eq!(store.log_used(), 0, "the checkpoint restarts the log");
    assert!(
        !store.has_pending(),
        "the checkpoint commits the acked batches to LMDB"
    );
    assert_eq!(committed_messages(&store, c), 1);

    // Owed once: the next batches log as before.
    store.append_batch(&[message(c, "second", "s")]).unwrap();
    assert_eq!(store.checkpoints().0, checkpoints + 1);
    assert!(store.log_used() > 0);

    flusher.simulate_failure();
    store.append_batch(&[message(c, "third", "t")]).unwrap();
    assert_eq!(store.checkpoints().0, checkpoints + 2);
    assert_eq!(committed_messages(&store, c), 3);
}
