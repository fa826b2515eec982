//! Typed errors of the knowledge-base replicas and indexes.
//!
//! Import problems (bad CSV/JSON input) are [`InvalidInput`](super::InvalidInput) /
//! [`ImportError`](super::ImportError); this is everything after a valid import: a
//! snapshot refused for its shape ([`KbError::StaleVersion`], [`KbError::VectorCount`],
//! ...), in which case nothing was written, and failures of the environment itself.

use std::path::PathBuf;

use super::entry::EntryProblem;

/// A failure of a replica or index call. When `apply_snapshot` returns one, its write
/// transaction was aborted: the replica still holds its previous version, untouched.
#[derive(Debug, thiserror::Error)]
pub enum KbError {
    #[error("cannot create knowledge-base directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("shard index {0} is out of range (at most {max} shards)", max = super::replica::MAX_SHARDS)]
    ShardOutOfRange(usize),
    #[error("knowledge-base replica at {path} is already open in this process")]
    AlreadyOpen { path: PathBuf },
    #[error("knowledge-base replica at {path} belongs to shard {found}, but was opened as shard {expected}")]
    ShardMismatch {
        path: PathBuf,
        expected: usize,
        found: u64,
    },
    #[error(
        "knowledge-base format version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedFormat { found: u64, supported: u64 },
    #[error(
        "the knowledge-base LMDB map is full ({map_size} bytes): raise its map size; \
         the snapshot was not stored"
    )]
    MapFull { map_size: usize },
    #[error("too many concurrent read views of the knowledge base (LMDB reader table is full)")]
    ReadersFull,
    #[error("corrupt knowledge-base {table} record at key {key:02x?}: {detail}")]
    Corrupt {
        table: &'static str,
        key: Vec<u8>,
        detail: String,
    },
    #[error("cannot serialise a knowledge-base {record} record: {detail}")]
    Serialize {
        record: &'static str,
        detail: String,
    },
    #[error("snapshot version {version} is not newer than the current version {current}")]
    StaleVersion { version: u64, current: u64 },
    #[error("a snapshot needs at least one entry")]
    NoEntries,
    #[error("entry {index} ({id:?}): {problem}")]
    InvalidEntry {
        index: usize,
        id: String,
        problem: EntryProblem,
    },
    #[error("entry id {id:?} appears twice in the snapshot")]
    DuplicateId { id: String },
    #[error("vector dimension {dim} is not between 1 and {max}", max = super::replica::MAX_DIM)]
    BadDimension { dim: usize },
    #[error("expected {expected} floats ({questions} questions × dimension {dim}), got {found}")]
    VectorCount {
        expected: usize,
        found: usize,
        questions: usize,
        dim: usize,
    },
    #[error("the vector of question {row} ({question:?}) {reason}")]
    BadVector {
        row: usize,
        question: String,
        reason: &'static str,
    },
    #[error("the model fingerprint must be 1 to {max} bytes", max = super::replica::MAX_FINGERPRINT_BYTES)]
    BadFingerprint,
    #[error("a snapshot may hold at most {max} {what}, this one has {count}")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("LMDB: {0}")]
    Lmdb(#[source] heed::Error),
}

impl From<heed::Error> for KbError {
    fn from(error: heed::Error) -> Self {
        match error {
            // The size is filled in by the replica, which knows it.
            heed::Error::Mdb(heed::MdbError::MapFull) => KbError::MapFull { map_size: 0 },
            heed::Error::Mdb(heed::MdbError::ReadersFull) => KbError::ReadersFull,
            other => KbError::Lmdb(other),
        }
    }
}

pub(crate) fn corrupt(table: &'static str, key: &[u8], detail: impl Into<String>) -> KbError {
    KbError::Corrupt {
        table,
        key: key.to_vec(),
        detail: detail.into(),
    }
}
