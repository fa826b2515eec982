//! Typed errors of the shard store.
//!
//! Two levels, on purpose:
//! - [`Rejection`]: one operation of a batch was refused because of its input (unknown or
//!   closed conversation, oversize id ...). It is reported in that operation's outcome; the
//!   operation wrote nothing and the rest of the batch still commits.
//! - [`StoreError`]: the whole call failed (LMDB, I/O, full map, full disk, corrupt data);
//!   the write transaction was aborted and nothing of the batch is stored.
//!   [`StoreError::is_full`] tells the failures that end once space is freed.

use std::path::PathBuf;

use super::records::{ConversationId, MAX_SHARDS};

/// Why one operation of a batch was refused. Nothing of that operation was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("conversation {0} does not exist")]
    UnknownConversation(ConversationId),
    #[error("conversation {conversation} belongs to shard {owner}, not to this shard")]
    ForeignConversation {
        conversation: ConversationId,
        owner: usize,
    },
    #[error("conversation {0} is closed")]
    ConversationClosed(ConversationId),
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} is {len} bytes, more than the {max} allowed")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("this shard has used up its conversation ids")]
    ConversationIdsExhausted,
    #[error("conversation {0} has messages or an agent; it is not deleted")]
    NotEmpty(ConversationId),
}

/// A failure of a whole store call.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create store directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("shard index {0} is out of range (at most {MAX_SHARDS} shards)")]
    ShardOutOfRange(usize),
    #[error("store at {path} is already open in this process")]
    AlreadyOpen { path: PathBuf },
    #[error("store at {path} belongs to shard {found}, but was opened as shard {expected}")]
    ShardMismatch {
        path: PathBuf,
        expected: usize,
        found: u64,
    },
    #[error(
        "store format version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedFormat { found: u64, supported: u64 },
    #[error(
        "the LMDB map is full at its ceiling ({map_size} bytes): raise [storage] \
         max_map_size and restart, or free space; the batch was not stored"
    )]
    MapFull { map_size: usize },
    #[error("the disk holding the store is full: {0}; the batch was not stored")]
    DiskFull(#[source] std::io::Error),
    #[error(
        "cannot grow the LMDB map: read views stayed open for {waited_ms} ms; \
         the batch was not stored"
    )]
    ResizeBlocked { waited_ms: u64 },
    #[error("too many concurrent read views (LMDB reader table is full)")]
    ReadersFull,
    #[error("corrupt {table} record at key {key:02x?}: {detail}")]
    Corrupt {
        table: &'static str,
        key: Vec<u8>,
        detail: String,
    },
    #[error("cannot serialise a {record} record: {detail}")]
    Serialize {
        record: &'static str,
        detail: String,
    },
    #[error("cannot sync the write-ahead log or the data file: {0}")]
    Sync(#[source] std::io::Error),
    #[error("LMDB: {0}")]
    Lmdb(#[source] heed::Error),
    /// The write-ahead log could not be written or synced; the batch was not stored.
    #[error("{0}; the batch was not stored")]
    Log(#[source] super::wal::WalError),
    /// The write-ahead log holds a record that does not parse (its checksum held).
    #[error("the write-ahead log at {path} holds a malformed record: {detail}")]
    LogCorrupt { path: PathBuf, detail: String },
}

impl StoreError {
    /// Whether the store refused the write for lack of space (a full map at its ceiling, a
    /// full disk): writes may succeed again once space is freed, so the driver refuses new
    /// writes for a while instead of retrying at once (see [`super::WriteBackoff`]).
    pub fn is_full(&self) -> bool {
        matches!(self, StoreError::MapFull { .. } | StoreError::DiskFull(_))
    }

    /// Whether LMDB reported the environment unusable (`MDB_PANIC`: a meta page update failed or
    /// the environment had a fatal error): every later transaction fails until it is reopened.
    /// The driver then ends the process through the fatal-panic path (exit 70, see
    /// [`crate::fault`]) so the service manager restarts it on a freshly opened store; the failed
    /// batch was not acked, and every acked one is in the last committed meta page.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            StoreError::Lmdb(heed::Error::Mdb(heed::MdbError::Panic))
        )
    }
}

impl From<heed::Error> for StoreError {
    fn from(error: heed::Error) -> Self {
        match error {
            // The size is filled in by the store, which knows it (see `ShardStore::lmdb`).
            heed::Error::Mdb(heed::MdbError::MapFull) => StoreError::MapFull { map_size: 0 },
            heed::Error::Mdb(heed::MdbError::ReadersFull) => StoreError::ReadersFull,
            heed::Error::Io(io)
                if matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) =>
            {
                StoreError::DiskFull(io)
            }
            other => StoreError::Lmdb(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_lmdb_panic_is_fatal_and_only_a_full_map_or_disk_is_full() {
        let panic = StoreError::from(heed::Error::Mdb(heed::MdbError::Panic));
        assert!(panic.is_fatal() && !panic.is_full());
        let full = StoreError::from(heed::Error::Mdb(heed::MdbError::MapFull));
        assert!(full.is_full() && !full.is_fatal());
        let disk = StoreError::from(heed::Error::Io(std::io::Error::from_raw_os_error(
            libc::ENOSPC,
        )));
        assert!(disk.is_full() && !disk.is_fatal());
        let readers = StoreError::from(heed::Error::Mdb(heed::MdbError::ReadersFull));
        assert!(!readers.is_full() && !readers.is_fatal());
    }
}
