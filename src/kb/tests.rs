//! Tests of the replica (versions, atomicity, persistence, alignment) and of the index
//! (exact top-k against a naive computation, BM25 ranking), plus the measurements quoted
//! in the module documentation (`#[ignore]`d; run them in release mode).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

const MAP_SIZE: usize = 256 << 20;

/// Deterministic pseudo-random floats in [-1, 1) (xorshift64*), no extra dependency.
fn random_floats(count: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..count)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let bits = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
            (bits as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn entry(id: &str, questions: &[&str], answer: &str) -> Entry {
    Entry {
        id: id.into(),
        intent: id.into(),
        questions: questions.iter().map(|q| q.to_string()).collect(),
        answer: answer.into(),
        tags: vec![],
    }
}

/// Entries `e0..` with the given numbers of questions.
fn entries_with(question_counts: &[usize], tag: &str) -> Vec<Entry> {
    question_counts
        .iter()
        .enumerate()
        .map(|(e, &count)| Entry {
            id: format!("e{e}"),
            intent: format!("intent{}", e % 3),
            questions: (0..count)
                .map(|q| format!("question {q} of {e} {tag}"))
                .collect(),
            answer: format!("answer {e} {tag}"),
            tags: vec![tag.to_owned()],
        })
        .collect()
}

fn normalised(row: &[f32]) -> Vec<f32> {
    let norm = row
        .iter()
        .map(|x| f64::from(*x).powi(2))
        .sum::<f64>()
        .sqrt();
    row.iter().map(|x| (f64::from(*x) / norm) as f32).collect()
}

fn open(dir: &Path, shard: usize) -> KbReplica {
    KbReplica::open(dir, shard, MAP_SIZE).unwrap()
}

#[test]
fn snapshot_is_stored_read_back_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let entries = entries_with(&[2, 1, 3], "v1");
    let dim = 5;
    let vectors = random_floats(6 * dim, 1);
    {
        let mut replica = open(dir.path(), 3);
        assert_eq!(replica.current_version().unwrap(), None);
        assert!(replica.read().unwrap().snapshot().unwrap().is_none());
        assert!(KbIndex::load(&replica.reader()).unwrap().is_none());
        replica
            .apply_snapshot(7, &entries, &vectors, dim, "minilm:abc", Some(b"weights"))
            .unwrap();
        assert_eq!(replica.current_version().unwrap(), Some(7));
        assert_eq!(replica.path(), dir.path().join("kb-3"));
    }
    let replica = open(dir.path(), 3);
    let view = replica.read().unwrap();
    let snapshot = view.snapshot().unwrap().unwrap();
    assert_eq!(snapshot.info.version, 7);
    assert_eq!(snapshot.info.dim, 5);
    assert_eq!(snapshot.info.model_fingerprint, "minilm:abc");
    assert_eq!(
        (snapshot.info.entry_count, snapshot.info.question_count),
        (3, 6)
    );
    assert!(snapshot.info.has_classifier);
    assert_eq!(snapshot.classifier, Some(&b"weights"[..]));
    let stored: Vec<Entry> = snapshot.entries.iter().map(|e| e.to_entry()).collect();
    assert_eq!(stored, entries);
    assert_eq!(view.entries().unwrap(), entries);
    for (row, (stored, given)) in snapshot
        .vectors
        .chunks_exact(dim)
        .zip(vectors.chunks_exact(dim))
        .enumerate()
    {
        for (a, b) in stored.iter().zip(normalised(given)) {
            assert!((a - b).abs() < 1e-6, "row {row}: {stored:?}");
        }
    }
}

#[test]
fn wrong_shard_and_double_open_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path(), 0));
    std::fs::rename(dir.path().join("kb-0"), dir.path().join("kb-1")).unwrap();
    assert!(matches!(
        KbReplica::open(dir.path(), 1, MAP_SIZE),
        Err(KbError::ShardMismatch {
            expected: 1,
            found: 0,
            ..
        })
    ));
    let _first = open(dir.path(), 2);
    assert!(matches!(
        KbReplica::open(dir.path(), 2, MAP_SIZE),
        Err(KbError::AlreadyOpen { .. })
    ));
    assert!(matches!(
        KbReplica::open(dir.path(), MAX_SHARDS, MAP_SIZE),
        Err(KbError::ShardOutOfRange(_))
    ));
}

#[test]
fn refused_snapshots_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut replica = open(dir.path(), 0);
    let entries = entries_with(&[1, 2], "v1");
    let good = random_floats(3 * 4, 2);
    replica
        .apply_snapshot(1, &entries, &good, 4, "m", None)
        .unwrap();

    let other = entries_with(&[2, 2], "v2");
    let vectors = random_floats(4 * 4, 3);
    let mut zero_row = vectors.clone();
    zero_row[4..8].fill(0.0);
    let mut nan_row = vectors.clone();
    nan_row[13] = f32::NAN;
    let mut duplicate = other.clone();
    duplicate[1].id = "e0".into();
    let mut blank_answer = other.clone();
    blank_answer[1].answer = " ".into();
    let check = |result: Result<(), KbError>, what: &str| {
        let error = result.expect_err(what);
        assert!(!error.to_string().is_empty());
        error
    };

    assert!(matches!(
        check(
            replica.apply_snapshot(1, &other, &vectors, 4, "m", None),
            "same version"
        ),
        KbError::StaleVersion {
            version: 1,
            current: 1
        }
    ));
    assert!(matches!(
        check(
            replica.apply_snapshot(2, &other, &vectors[..15], 4, "m", None),
            "short"
        ),
        KbError::VectorCount {
            expected: 16,
            found: 15,
            ..
        }
    ));
    assert!(matches!(
        check(
            replica.apply_snapshot(2, &other, &zero_row, 4, "m", None),
            "zero"
        ),
        KbError::BadVector { row: 1, .. }
    ));
    let nan = check(
        replica.apply_snapshot(2, &other, &nan_row, 4, "m", None),
        "nan",
    );
    assert!(
        matches!(&nan, KbError::BadVector { row: 3, question, .. } if question == "question 1 of 1 v2"),
        "{nan:?}"
    );
    assert!(matches!(
        check(
            replica.apply_snapshot(2, &duplicate, &vectors, 4, "m", None),
            "dup"
        ),
        KbError::DuplicateId { .. }
    ));
    assert!(matches!(
        check(
            replica.apply_snapshot(2, &blank_answer, &vectors, 4, "m", None),
            "blank"
        ),
        KbError::InvalidEntry {
            index: 1,
            problem: EntryProblem::Empty { field: "answer" },
            ..
        }
    ));
    assert!(matches!(
        check(replica.apply_snapshot(2, &other, &[], 0, "m", None), "dim"),
        KbError::BadDimension { dim: 0 }
    ));
    assert!(matches!(
        check(
            replica.apply_snapshot(2, &other, &vectors, 4, "", None),
            "fingerprint"
        ),
        KbError::BadFingerprint
    ));
    assert!(matches!(
        check(replica.apply_snapshot(2, &[], &[], 4, "m", None), "empty"),
        KbError::NoEntries
    ));

    let view = replica.read().unwrap();
    assert_eq!(view.version().unwrap(), Some(1));
    assert_eq!(view.entries().unwrap(), entries);
    drop(view);
    replica
        .apply_snapshot(2, &other, &vectors, 4, "m", None)
        .unwrap();
    assert_eq!(replica.read().unwrap().entries().unwrap(), other);
}

#[test]
fn full_map_keeps_the_previous_version() {
    let dir = tempfile::tempdir().unwrap();
    let mut replica = KbReplica::open(dir.path(), 0, 1 << 20).unwrap();
    let small = entries_with(&[1], "small");
    replica
        .apply_snapshot(1, &small, &random_floats(8, 4), 8, "m", None)
        .unwrap();
    // 2,000 questions × 384 floats = 3 MB: more than the 1 MiB map.
    let big = entries_with(&[1000, 1000], "big");
    let error = replica
        .apply_snapshot(2, &big, &random_floats(2000 * 384, 5), 384, "m", None)
        .unwrap_err();
    assert!(
        matches!(error, KbError::MapFull { map_size } if map_size == 1 << 20),
        "{error:?}"
    );
    assert_eq!(replica.read().unwrap().entries().unwrap(), small);
    replica
        .apply_snapshot(2, &small, &random_floats(8, 6), 8, "m", None)
        .unwrap();
}

/// A reader that holds a view (and an index) across an update keeps seeing exactly the
/// old version; a view opened after the commit sees exactly the new one.
#[test]
fn held_view_sees_the_old_version_across_an_update() {
    let dir = tempfile::tempdir().unwrap();
    let mut replica = open(dir.path(), 0);
    let dim = 16;
    let old = entries_with(&[3, 1], "old");
    let old_vectors = random_floats(4 * dim, 7);
    replica
        .apply_snapshot(1, &old, &old_vectors, dim, "m1", None)
        .unwrap();

    let reader = replica.reader();
    let old_view = reader.read().unwrap();
    let old_index = KbIndex::load(&reader).unwrap().unwrap();
    let query = old_vectors[3 * dim..4 * dim].to_vec();
    assert_eq!(old_index.top_k(&query, 1)[0].0, 1);

    // The writer runs on another thread while the views are held here.
    let new = entries_with(&[2, 2, 2], "new");
    let new_vectors = random_floats(6 * dim, 8);
    let writer = std::thread::spawn(move || {
        replica
            .apply_snapshot(2, &new, &new_vectors, dim, "m2", Some(b"c"))
            .unwrap();
        replica
    });
    let replica = writer.join().unwrap();

    let snapshot = old_view.snapshot().unwrap().unwrap();
    assert_eq!(snapshot.info.version, 1);
    assert_eq!(snapshot.info.model_fingerprint, "m1");
    assert_eq!(snapshot.entries.len(), 2);
    assert!(snapshot.entries.iter().all(|e| e.answer().ends_with("old")));
    assert_eq!(snapshot.vectors.len(), 4 * dim);
    assert!(snapshot.classifier.is_none());
    assert_eq!(old_index.version(), 1);
    assert_eq!(old_index.entry(1).answer(), "answer 1 old");
    assert_eq!(old_index.top_k(&query, 1)[0].0, 1);

    let new_view = replica.read().unwrap();
    let snapshot = new_view.snapshot().unwrap().unwrap();
    assert_eq!(snapshot.info.version, 2);
    assert_eq!(snapshot.entries.len(), 3);
    assert!(snapshot.entries.iter().all(|e| e.answer().ends_with("new")));
    assert_eq!(snapshot.classifier, Some(&b"c"[..]));
    let new_index = KbIndex::load(&replica.reader()).unwrap().unwrap();
    assert_eq!((new_index.version(), new_index.entry_count()), (2, 3));
    drop(old_view);
    drop(old_index);
}

/// Readers on other threads open views as fast as they can while versions are applied:
/// every view must be internally consistent (entries, counts and vectors of ONE version).
#[test]
fn concurrent_readers_never_see_a_mix_of_versions() {
    let dir = tempfile::tempdir().unwrap();
    let mut replica = open(dir.path(), 0);
    let dim = 8;
    // Version v: 1 + v % 4 entries of v % 3 + 1 questions; answers and tags name v; every
    // vector row is (v, 1, 1, ...) before normalisation, so row[0] / row[1] == v.
    let build = |v: u64| {
        let counts = vec![(v % 3 + 1) as usize; (1 + v % 4) as usize];
        let entries = entries_with(&counts, &format!("v{v}"));
        let rows = question_count(&entries);
        let mut vectors = vec![1.0f32; rows * dim];
        vectors
            .chunks_exact_mut(dim)
            .for_each(|row| row[0] = v as f32);
        (entries, vectors)
    };
    let (entries, vectors) = build(1);
    replica
        .apply_snapshot(1, &entries, &vectors, dim, "m", None)
        .unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let reader = replica.reader();
            let done = done.clone();
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(20);
                let mut checked = 0u64;
                let mut versions = std::collections::BTreeSet::new();
                while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let view = reader.read().unwrap();
                    let snapshot = view.snapshot().unwrap().unwrap();
                    let v = snapshot.info.version;
                    let tag = format!("v{v}");
                    assert_eq!(snapshot.entries.len() as u64, 1 + v % 4);
                    for entry in &snapshot.entries {
                        assert!(entry.answer().ends_with(&tag), "{} in {v}", entry.answer());
                        assert_eq!(entry.question_count() as u64, v % 3 + 1);
                        assert_eq!(entry.tags().collect::<Vec<_>>(), [tag.as_str()]);
                    }
                    for row in snapshot.vectors.chunks_exact(dim) {
                        assert!((row[0] / row[1] - v as f32).abs() < 1e-3, "{row:?} in {v}");
                    }
                    versions.insert(v);
                    checked += 1;
                }
                (checked, versions)
            })
        })
        .collect();

    for v in 2..=40 {
        let (entries, vectors) = build(v);
        replica
            .apply_snapshot(v, &entries, &vectors, dim, "m", None)
            .unwrap();
    }
    done.store(true, Ordering::Relaxed);
    for reader in readers {
        let (checked, versions) = reader.join().unwrap();
        assert!(checked > 0);
        eprintln!(
            "reader checked {checked} views over {} versions",
            versions.len()
        );
    }
    assert_eq!(replica.current_version().unwrap(), Some(40));
}

/// The measurement behind the layout choice in `replica.rs`. One value per question
/// (12-byte key, entry index + 384 f32): LMDB guarantees 2-byte alignment only; whether a
/// row is 4-byte aligned is an accident of the key and value sizes, and rows are spread
/// over leaf pages (2 per 4 KiB page), never contiguous, so the flat matrix the scan needs
/// would have to be copied together anyway. One value per version is contiguous and
/// 16-byte aligned (overflow pages).
#[test]
fn per_question_rows_are_neither_reliably_aligned_nor_contiguous() {
    use heed::types::Bytes;
    /// Stores 1,000 rows of `value_len` bytes under 12-byte keys; returns how many sit
    /// at each address mod 4, and how many follow the previous row without a gap.
    fn store_rows(value_len: usize) -> ([usize; 4], usize) {
        let dir = tempfile::tempdir().unwrap();
        let env = unsafe {
            heed::EnvOpenOptions::new()
                .map_size(64 << 20)
                .max_dbs(2)
                .open(dir.path())
                .unwrap()
        };
        let txn = env.write_txn().unwrap();
        let rows = env
            .create_databases_and_commit(txn, |opener, txn| {
                opener
                    .create_database::<Bytes, Bytes>(txn, Some("rows"))
                    .map(heed::CommitOrAbort::<_, ()>::Commit)
            })
            .unwrap()
            .unwrap_commit();
        let mut txn = env.write_txn().unwrap();
        let value = vec![7u8; value_len];
        for row in 0u32..1000 {
            let mut key = [0u8; 12];
            key[8..].copy_from_slice(&row.to_be_bytes());
            rows.put(&mut txn, &key, &value).unwrap();
        }
        txn.commit().unwrap();
        let txn = env.read_txn().unwrap();
        let mut by_remainder = [0usize; 4];
        let mut contiguous = 0;
        let mut previous_end = 0usize;
        for item in rows.iter(&txn).unwrap() {
            let (_, value) = item.unwrap();
            let start = value.as_ptr() as usize;
            by_remainder[start % 4] += 1;
            contiguous += usize::from(start == previous_end);
            previous_end = start + value.len();
        }
        (by_remainder, contiguous)
    }

    let (f32_rows, contiguous) = store_rows(4 + 384 * 4);
    eprintln!("1,540-byte rows by address mod 4: {f32_rows:?}, contiguous with the previous: {contiguous}");
    assert_eq!(
        f32_rows[1] + f32_rows[3],
        0,
        "LMDB aligns values to 2 bytes"
    );
    assert_eq!(contiguous, 0);
    let (odd_rows, _) = store_rows(2 + 384 * 4);
    eprintln!("1,538-byte rows by address mod 4: {odd_rows:?}");
    assert!(
        odd_rows[2] > 0,
        "only 2-byte alignment is guaranteed: {odd_rows:?}"
    );

    // The replica's layout: one value per version, on overflow pages.
    let kb_dir = tempfile::tempdir().unwrap();
    let mut replica = open(kb_dir.path(), 0);
    let entries = entries_with(&[500, 500], "a");
    replica
        .apply_snapshot(1, &entries, &random_floats(1000 * 384, 9), 384, "m", None)
        .unwrap();
    let index = KbIndex::load(&replica.reader()).unwrap().unwrap();
    assert!(index.vectors_are_mapped());
    assert_eq!(index.question_vectors().as_ptr() as usize % 16, 0);
}

/// Vectors stored at an address not aligned for f32 are copied out and read the same.
/// (In practice the `vectors` value is always 4-byte aligned: its node is the only one
/// in its leaf page, or on overflow pages; the copy path is the safety net.)
#[test]
fn unaligned_vector_bytes_are_copied_and_read_the_same() {
    let floats = random_floats(9, 10);
    let mut buffer = [0u8; 4 + 36];
    for offset in 0..4 {
        buffer[offset..offset + 36].copy_from_slice(bytemuck::cast_slice(&floats));
        let read = super::replica::floats_of(&buffer[offset..offset + 36]);
        let aligned = (buffer.as_ptr() as usize + offset).is_multiple_of(4);
        assert_eq!(matches!(read, std::borrow::Cow::Borrowed(_)), aligned);
        assert_eq!(&read[..], &floats[..]);
    }
}

/// Naive reference: cosine of `query` with every question, best per entry, ranked.
fn naive_top_k(
    entries: &[Entry],
    vectors: &[f32],
    dim: usize,
    query: &[f32],
    k: usize,
) -> Vec<(usize, f64)> {
    let query = normalised(query);
    let mut row = 0;
    let mut best: Vec<(usize, f64)> = Vec::new();
    for (e, entry) in entries.iter().enumerate() {
        let mut entry_best = f64::NEG_INFINITY;
        for _ in &entry.questions {
            let v = normalised(&vectors[row * dim..(row + 1) * dim]);
            let score: f64 = v
                .iter()
                .zip(&query)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            entry_best = entry_best.max(score);
            row += 1;
        }
        best.push((e, entry_best));
    }
    best.sort_by(|a, b| b.1.total_cmp(&a.1));
    best.truncate(k);
    best
}

#[test]
fn top_k_agrees_with_a_naive_computation() {
    let dir = tempfile::tempdir().unwrap();
    let mut replica = open(dir.path(), 0);
    let dim = 100; // not a multiple of the 32-float step: exercises the tail
    let counts: Vec<usize> = (0..60).map(|e| 1 + (e * 7) % 9).collect();
    let entries = entries_with(&counts, "t");
    let rows = question_count(&entries);
    let vectors = random_floats(rows * dim, 11);
    replica
        .apply_snapshot(1, &entries, &vectors, dim, "m", None)
        .unwrap();
    let index = KbIndex::load(&replica.reader()).unwrap().unwrap();
    assert_eq!(index.question_count(), rows);

    let queries = random_floats(20 * dim, 12);
    let batch = index.top_k_batch(&queries, 5);
    for (q, query) in queries.chunks_exact(dim).enumerate() {
        // Scale the query: scores must not depend on its length.
        let scaled: Vec<f32> = query.iter().map(|x| x * 3.5).collect();
        let found = index.top_k(&scaled, 5);
        let expected = naive_top_k(&entries, &vectors, dim, query, 5);
        assert_eq!(found.len(), 5);
        for ((e, score), (expected_e, expected_score)) in found.iter().zip(&expected) {
            assert_eq!(e, expected_e, "query {q}: {found:?} vs {expected:?}");
            assert!((f64::from(*score) - expected_score).abs() < 1e-5);
        }
        assert_eq!(
            batch[q].iter().map(|r| r.0).collect::<Vec<_>>(),
            found.iter().map(|r| r.0).collect::<Vec<_>>()
        );
    }

    // A stored question is its own best match, with cosine 1.
    let row = index.rows_of(17).start + 1;
    let hit = index.top_k(&vectors[row * dim..(row + 1) * dim], 1);
    assert_eq!(hit[0].0, 17);
    assert!((hit[0].1 - 1.0).abs() < 1e-5);
    assert_eq!(index.entry_of_row(row), 17);
    assert_eq!(index.entry_of_row(0), 0);
    assert_eq!(index.entry_of_row(rows - 1), 59);
    assert_eq!(index.position_of("e17"), Some(17));
    // k larger than the entry count returns every entry; a zero query returns nothing.
    assert_eq!(index.top_k(&queries[..dim], 1000).len(), 60);
    assert!(index.top_k(&vec![0.0; dim], 3).is_empty());
}

#[test]
#[should_panic(expected = "query dimension")]
fn top_k_refuses_a_query_of_another_dimension() {
    let dir = tempfile::tempdir().unwrap();
    let mut replica = open(dir.path(), 0);
    let entries = entries_with(&[1], "x");
    replica
        .apply_snapshot(1, &entries, &[1.0, 0.0], 2, "m", None)
        .unwrap();
    let index = KbIndex::load(&replica.reader()).unwrap().unwrap();
    index.top_k(&[1.0, 0.0, 0.0], 1);
}

#[test]
fn lexical_top_ranks_the_entry_sharing_rare_words() {
    let dir = tempfile::tempdir().unwrap();
    let mut replica = open(dir.path(), 0);
    let entries = vec![
        entry(
            "card_arrival",
            &[
                "My card has not arrived yet",
                "When will my new card arrive?",
            ],
            "Cards arrive within 5 working days.",
        ),
        entry(
            "lost_or_stolen_card",
            &["I lost my card", "My card was stolen"],
            "Freeze your card in the app.",
        ),
        entry(
            "top_up",
            &["How do I top up my account?"],
            "Use the top-up page.",
        ),
    ];
    replica
        .apply_snapshot(1, &entries, &random_floats(5 * 4, 13), 4, "m", None)
        .unwrap();
    let index = KbIndex::load(&replica.reader()).unwrap().unwrap();
    let top = index.lexical_top("my card still hasn't ARRIVED", 3);
    assert_eq!(top[0].0, 0, "{top:?}");
    assert_eq!(
        index.lexical_top("someone stole... no, I lost it, my card", 1)[0].0,
        1
    );
    let top = index.lexical_top("top up", 3);
    assert_eq!(top.len(), 1, "only the entry sharing a word: {top:?}");
    assert_eq!(top[0].0, 2);
    assert!(index.lexical_top("zebra", 3).is_empty());
}

#[test]
fn banking77_imports_stores_and_indexes() {
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/banking77/train.csv"
    ));
    if !path.exists() {
        eprintln!("skipped: {} is not present", path.display());
        return;
    }
    let entries = import_file(path).unwrap();
    let texts = question_texts(&entries);
    assert_eq!((entries.len(), texts.len()), (77, 10_003));
    let dim = 384;
    let vectors = random_floats(texts.len() * dim, 14);
    let dir = tempfile::tempdir().unwrap();
    let mut replica = open(dir.path(), 1);
    replica
        .apply_snapshot(1, &entries, &vectors, dim, "test", None)
        .unwrap();
    let started = Instant::now();
    let index = KbIndex::load(&replica.reader()).unwrap().unwrap();
    eprintln!(
        "BANKING77 index load: {:?}, heap {} bytes",
        started.elapsed(),
        index.heap_bytes()
    );
    assert!(index.vectors_are_mapped());
    assert_eq!(index.question_count(), 10_003);
    // Row i of the matrix is question_texts[i], which belongs to the right entry.
    for row in [0, 1234, 10_002] {
        let entry = index.entry(index.entry_of_row(row));
        assert!(entry.questions().any(|q| q == texts[row]));
        assert_eq!(
            index.top_k(&vectors[row * dim..(row + 1) * dim], 1)[0].0,
            index.entry_of_row(row)
        );
    }
    let top = index.lexical_top("I still have not received my new card", 1);
    assert_eq!(index.entry(top[0].0).id(), "card_arrival");
}

// ---------------------------------------------------------------------------------------
// Measurements (release mode):
// cargo test --release -- --ignored --nocapture measure_

fn nanos_per(iterations: usize, elapsed: Duration) -> f64 {
    elapsed.as_nanos() as f64 / iterations as f64
}

/// CPU time of the calling thread: on a shared 2-core machine wall time also counts the
/// time other processes held the core.
fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write to.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(result, 0);
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// Runs `work` `iterations` times; returns (wall ns, thread-CPU ns) per iteration.
fn time_per(iterations: usize, mut work: impl FnMut(usize)) -> (f64, f64) {
    let (wall, cpu) = (Instant::now(), thread_cpu_time());
    for i in 0..iterations {
        work(i);
    }
    (
        nanos_per(iterations, wall.elapsed()),
        nanos_per(iterations, thread_cpu_time() - cpu),
    )
}

#[test]
#[ignore = "measurement; run with --release --nocapture"]
fn measure_top_k() {
    let dim = 384;
    let rows = 10_000;
    let counts: Vec<usize> = (0..77)
        .map(|e| rows / 77 + usize::from(e < rows % 77))
        .collect();
    let entries = entries_with(&counts, "m");
    let vectors = random_floats(rows * dim, 15);
    let dir = tempfile::tempdir().unwrap();
    let mut replica = open(dir.path(), 0);
    let started = Instant::now();
    replica
        .apply_snapshot(1, &entries, &vectors, dim, "m", None)
        .unwrap();
    eprintln!(
        "apply_snapshot 10,000 x 384 (fsync): {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let index = KbIndex::load(&replica.reader()).unwrap().unwrap();
    eprintln!(
        "KbIndex::load: {:?}, vectors mapped: {}",
        started.elapsed(),
        index.vectors_are_mapped()
    );

    let queries = random_floats(256 * dim, 16);
    let query = |i: usize| &queries[(i % 256) * dim..(i % 256 + 1) * dim];
    let mut sink = 0f32;
    let report = |name: &str, (wall, cpu): (f64, f64)| {
        eprintln!("{name:<40} {wall:>10.0} ns/query wall {cpu:>10.0} ns/query CPU");
    };
    // Warm up (page cache, CPU caches).
    time_per(16, |i| sink += index.top_k(query(i), 5)[0].1);
    report(
        "top_k, one query per pass",
        time_per(256, |i| sink += index.top_k(query(i), 5)[0].1),
    );
    for batch in [8, 32] {
        let (wall, cpu) = time_per(256 / batch, |i| {
            let chunk = &queries[i * batch * dim..(i + 1) * batch * dim];
            sink += index.top_k_batch(chunk, 5)[0][0].1;
        });
        report(
            &format!("top_k_batch, {batch} queries per pass"),
            (wall / batch as f64, cpu / batch as f64),
        );
    }

    // The kernels alone: AVX2 on the mapped pages and on a heap copy, then the portable
    // kernel and a naive loop on the heap copy.
    let copy = index.question_vectors().to_vec();
    let mut entry_rows: Vec<u32> = (0..77).map(|e| index.rows_of(e).start as u32).collect();
    entry_rows.push(rows as u32);
    let mut out = vec![0f32; 77];
    let mapped = index.question_vectors();
    report(
        "AVX2 kernel, mapped pages",
        time_per(256, |i| {
            super::scoring::entry_max_scores(mapped, dim, &entry_rows, query(i), &mut out);
            sink += out[0];
        }),
    );
    report(
        "AVX2 kernel, heap copy",
        time_per(256, |i| {
            super::scoring::entry_max_scores(&copy, dim, &entry_rows, query(i), &mut out);
            sink += out[0];
        }),
    );
    // The same kernel on the first 256 rows only (384 KB, stays in L2), scaled to 10,000
    // rows: the compute cost without the memory traffic.
    let cached_rows = [0u32, 256];
    let mut cached_out = [0f32; 1];
    let (wall, cpu) = time_per(4096, |i| {
        super::scoring::entry_max_scores(
            &copy[..256 * dim],
            dim,
            &cached_rows,
            query(i),
            &mut cached_out,
        );
        sink += cached_out[0];
    });
    let scale = rows as f64 / 256.0;
    report(
        "AVX2 kernel, rows in L2, x 10,000/256",
        (wall * scale, cpu * scale),
    );
    report(
        "portable kernel (auto-vectorised SSE2)",
        time_per(64, |i| {
            super::scoring::entry_max_scores_portable(&copy, dim, &entry_rows, query(i), &mut out);
            sink += out[0];
        }),
    );
    report(
        "naive scalar loop",
        time_per(16, |i| {
            sink += naive_scores(&copy, dim, &entry_rows, query(i))[0]
        }),
    );
    eprintln!("(sink {sink})");
}

#[inline(never)]
fn naive_scores(matrix: &[f32], dim: usize, entry_rows: &[u32], query: &[f32]) -> Vec<f32> {
    entry_rows
        .windows(2)
        .map(|bounds| {
            matrix[bounds[0] as usize * dim..bounds[1] as usize * dim]
                .chunks_exact(dim)
                .map(|row| row.iter().zip(query).fold(0f32, |sum, (a, b)| sum + a * b))
                .fold(f32::NEG_INFINITY, f32::max)
        })
        .collect()
}

/// Degraded-mode quality: BM25 top-1 accuracy on a held-out tenth of BANKING77 train
/// (every 10th question of each intent), knowledge base built from the rest.
#[test]
#[ignore = "measurement; run with --release --nocapture"]
fn measure_lexical_accuracy_and_speed() {
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/data/banking77/train.csv"
    ));
    let all = import_file(path).unwrap();
    let mut kept = all.clone();
    let mut held_out: Vec<(String, usize)> = Vec::new();
    for (e, entry) in kept.iter_mut().enumerate() {
        let questions = std::mem::take(&mut entry.questions);
        for (i, question) in questions.into_iter().enumerate() {
            if i % 10 == 9 {
                held_out.push((question, e));
            } else {
                entry.questions.push(question);
            }
        }
    }
    let rows = question_count(&kept);
    let dir = tempfile::tempdir().unwrap();
    let mut replica = open(dir.path(), 0);
    replica
        .apply_snapshot(1, &kept, &random_floats(rows * 8, 17), 8, "m", None)
        .unwrap();
    let index = KbIndex::load(&replica.reader()).unwrap().unwrap();

    let mut correct = 0;
    let mut no_match = 0;
    let (wall, cpu) = time_per(held_out.len(), |i| {
        let (question, e) = &held_out[i];
        match index.lexical_top(question, 1).first() {
            Some((found, _)) if found == e => correct += 1,
            Some(_) => {}
            None => no_match += 1,
        }
    });
    eprintln!(
        "BM25, one document per entry (lexical_top): {:.2}% top-1 of {} held out, \
         {no_match} without any match; {wall:.0} ns/query wall, {cpu:.0} ns/query CPU",
        100.0 * correct as f64 / held_out.len() as f64,
        held_out.len(),
    );

    // Alternative considered: one document per question, an entry scoring as its best.
    let per_question = Bm25::build(
        kept.iter()
            .flat_map(|entry| entry.questions.iter().map(String::as_str)),
    );
    let mut correct = 0;
    for (question, e) in &held_out {
        let mut scores = vec![0f32; rows];
        per_question.add_scores(question, &mut scores);
        let best = (0..kept.len()).max_by(|a, b| {
            let best_of = |entry: usize| {
                scores[index.rows_of(entry)]
                    .iter()
                    .fold(0f32, |best, &s| best.max(s))
            };
            best_of(*a).total_cmp(&best_of(*b)).then(b.cmp(a))
        });
        correct += usize::from(best == Some(*e));
    }
    eprintln!(
        "BM25, one document per question, best per entry: {:.2}% top-1",
        100.0 * correct as f64 / held_out.len() as f64
    );
}
