//! A handle that forces a shard store's commits to disk from another thread.
//!
//! With [`Durability::Batch`](super::Durability::Batch) commits do not sync; something has
//! to call fdatasync every commit window. Doing it on the thread that commits makes every
//! commit behind it wait (measured: 5-10 ms per sync on the reference disk, for LMDB's
//! scattered pages), so the driver can hand a `Flusher` to a timer thread instead.
//!
//! The file is the write-ahead log when the store has one (every commit is appended there
//! first; LMDB itself is synced at the log's checkpoints), else LMDB's data file.
//!
//! Invariants:
//! - The handle holds its own duplicate of the file descriptor, never LMDB or log state, so
//!   it is safe alongside commits, reads, checkpoints and `set_map_size` on the store's
//!   thread.
//! - When [`Flusher::flush`] returns `Ok`, every commit that had returned before the call
//!   started is on stable storage (fdatasync covers all writes made to the file; a log
//!   checkpoint syncs LMDB before it restarts the log).
//! - When a sync of the log fails, the store is told (a shared flag): after a failed
//!   fdatasync the kernel may drop the error with the pages, so a later sync that succeeds
//!   proves nothing about them. The store's next batch checkpoints (syncs LMDB, which holds
//!   everything acked, and restarts the log) before it is acked.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::error::StoreError;

/// Forces a shard store's committed data to disk; cheap to clone, `Send + Sync`.
#[derive(Clone, Debug)]
pub struct Flusher {
    file: Arc<File>,
    /// With a log: set when a sync fails (the store's `checkpoint_owed`).
    failed: Option<Arc<AtomicBool>>,
}

impl Flusher {
    pub(crate) fn new(file: File, failed: Option<Arc<AtomicBool>>) -> Self {
        Flusher {
            file: Arc::new(file),
            failed,
        }
    }

    /// fdatasync of the store's log (or data file). Blocks for the length of one disk flush.
    pub fn flush(&self) -> Result<(), StoreError> {
        let result = self.file.sync_data();
        if result.is_err() {
            self.report_failure();
        }
        result.map_err(StoreError::Sync)
    }

    fn report_failure(&self) {
        if let Some(failed) = &self.failed {
            failed.store(true, Ordering::Relaxed);
        }
    }

    /// What a failed sync does, without a failing disk (tests).
    #[cfg(test)]
    pub(crate) fn simulate_failure(&self) {
        self.report_failure();
    }
}
