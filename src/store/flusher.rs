//! A handle that forces a shard store's commits to disk from another thread.
//!
//! With [`Durability::Batch`](super::Durability::Batch) commits do not sync; something has
//! to call fdatasync every commit window. Doing it on the thread that commits makes every
//! commit behind it wait (measured: 5-10 ms per sync on the reference disk), so the driver
//! can hand a `Flusher` to a timer thread instead.
//!
//! Invariants:
//! - The handle holds its own duplicate of the data file descriptor, never LMDB state, so
//!   it is safe alongside commits, reads and `set_map_size` on the store's thread.
//! - When [`Flusher::flush`] returns `Ok`, every commit that had returned before the call
//!   started is on stable storage (fdatasync covers all writes made to the file).

use std::fs::File;
use std::sync::Arc;

use super::error::StoreError;

/// Forces a shard store's committed data to disk; cheap to clone, `Send + Sync`.
#[derive(Clone, Debug)]
pub struct Flusher {
    data_file: Arc<File>,
}

impl Flusher {
    pub(crate) fn new(data_file: File) -> Self {
        Flusher {
            data_file: Arc::new(data_file),
        }
    }

    /// fdatasync of the store's data file. Blocks for the length of one disk flush.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.data_file.sync_data().map_err(StoreError::Sync)
    }
}
