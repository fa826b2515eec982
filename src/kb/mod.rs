//! The knowledge base: entries (intent, example questions, answer), their import from
//! CSV/JSON, the per-shard LMDB replicas that hold one version of them with their
//! embedding vectors, and the in-memory query index (vector and lexical) over a version.
//!
//! # Flow
//! 1. [`import_file`] (or [`import_csv`] / [`import_json`]) parses and checks the whole
//!    input; any malformed row fails the import with every problem and its line number.
//! 2. The caller embeds [`question_texts`]`(&entries)` ONCE, in that order, with its
//!    sentence encoder (this module does not know the model).
//! 3. For every shard, [`KbReplica::apply_snapshot`] stores the entries and vectors as a
//!    new version (larger than the replica's current one) and makes it current in one
//!    LMDB transaction. Readers see the old version or the new one, never a mix (the
//!    `replica` module docs explain why, with LMDB's MVCC). Pick the version as one more
//!    than the highest [`KbReplica::current_version`] over the shards, so all replicas
//!    agree on what a version number holds.
//! 4. Each shard loads a [`KbIndex`] from its replica ([`KbIndex::load`]), answers
//!    queries with [`KbIndex::top_k`] / [`KbIndex::top_k_batch`] (exact cosine, best
//!    question per entry) or, degraded, [`KbIndex::lexical_top`] (BM25), and polls
//!    [`ReplicaReader::current_version`] to reload when a new version lands.
//!
//! `kb export` / `kb list` use [`ReplicaView::entries`] with [`export_json`] / [`list`].
//!
//! Delta sync between nodes (`kb sync`, `POST /api/kb/sync`): a version is serialised as a
//! deterministic snapshot file ([`encode_snapshot_view`], [`decode_snapshot`],
//! [`content_hash`]); the replica sends the [`signature`] of its file, the primary answers
//! the [`delta`] of its own, and the replica [`rebuild`]s and verifies it, then stores the
//! content like an import (`engine::update::apply_synced`).
//!
//! # Measured
//! `cargo test --release -- --ignored --nocapture --test-threads=1 measure_` on the
//! 2-vCPU AMD EPYC VM (AVX2), while other builds kept the load average at ~7: wall times
//! were about twice the thread CPU times quoted here, so read these as upper bounds.
//!
//! | what | cost |
//! |------|------|
//! | `top_k`, 10,000 questions × 384 in 77 entries, one query | ~0.7-0.8 ms CPU (memory-bound: 15 MB per pass) |
//! | `top_k_batch`, 8 or 32 queries per pass | ~0.28-0.29 ms CPU per query |
//! | same AVX2 kernel, rows resident in L2 (compute only) | ~0.24 ms per 10,000 rows |
//! | portable kernel (SSE2) / naive scalar loop, one query | ~1.3-1.4 ms / ~3.3 ms CPU |
//! | vectors read in place from the map vs from a heap copy | same within noise (mapped is not slower) |
//! | `lexical_top` on BANKING77 (BM25, one document per entry) | ~3.4 µs CPU per query; 83.1% top-1 on a held-out tenth |
//! | `KbIndex::load`, 10,000 × 384 | 3-20 ms (bytecheck of the entries, BM25 build; vectors not copied) |
//! | `apply_snapshot`, 10,000 × 384, fsync | ~90-110 ms |
//!
//! An index holds ~0.2 MB of heap for BANKING77 (BM25 postings, row offsets); the
//! 15 MB of vectors stay in the page cache of the replica's file.

mod delta;
mod delta_plan;
mod entry;
mod error;
mod import;
mod index;
mod lexical;
mod replica;
mod scoring;
mod snapshot;
mod snapshot_file;

#[cfg(test)]
mod tests;

pub use delta::{
    block_size_for, check_signature, delta, rebuild, signature, DeltaError, MAX_BLOCK, MIN_BLOCK,
    STRONG_HASH_BYTES,
};
pub use delta_plan::{
    check_fine_signature, decode_regions, encode_regions, fine_signature, rebuild_planned,
    regions_delta, Plan, PlanStep,
};
pub use entry::{
    question_count, question_texts, ArchivedEntry, Entry, EntryProblem, MAX_ANSWER_BYTES,
    MAX_ID_BYTES, MAX_INTENT_BYTES, MAX_QUESTIONS_PER_ENTRY, MAX_QUESTION_BYTES,
    MAX_TAGS_PER_ENTRY, MAX_TAG_BYTES,
};
pub use error::KbError;
pub use import::{
    default_answer, import, import_csv, import_file, import_json, Format, ImportError,
    InvalidInput, LineProblem, Problem, MAX_IMPORT_BYTES, MAX_REPORTED_PROBLEMS,
};
pub use index::KbIndex;
pub use lexical::{tokens, Bm25};
pub use replica::{
    ArchivedVersionInfo, KbReplica, ReplicaReader, ReplicaView, Snapshot, VersionInfo,
    DEFAULT_MAP_SIZE, FORMAT_VERSION, MAX_DIM, MAX_ENTRIES, MAX_FINGERPRINT_BYTES, MAX_QUESTIONS,
    MAX_READERS, MAX_SHARDS,
};
pub use scoring::{row_scores, top_k_of};
pub use snapshot::{describe, export_json, list, preview, write_export, PREVIEW_CHARS};
pub use snapshot_file::{
    content_hash, decode as decode_snapshot, encode as encode_snapshot,
    encode_view as encode_snapshot_view, SnapshotContent, SnapshotFileError, SNAPSHOT_FORMAT,
    SNAPSHOT_MAGIC,
};
