//! How a shard store is opened: map size, its growth ceiling and durability mode.
//!
//! Invariant: the durability mode decides the LMDB flags at open time only; it cannot be
//! changed on an open store. See the module documentation of [`crate::store`] for the
//! trade-off of each mode.

use heed::EnvFlags;

/// How far a commit goes before `apply`/`append_batch` return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Every commit is on stable storage before the call returns (LMDB default flags:
    /// data pages and meta page are fdatasync'd). An ack sent after the call survives a
    /// power loss.
    #[default]
    Fsync,
    /// Commits only reach the OS page cache; [`ShardStore::flush`] forces them to disk and
    /// must be called every commit window or so. A process crash loses nothing; a machine
    /// crash loses up to one flush interval. With a write-ahead log (`log_bytes > 0`) a
    /// commit is appended to the log without a sync, and the flush syncs the log, so a
    /// machine crash keeps a prefix of the acked batches; without one LMDB commits with
    /// `MDB_NOSYNC` and the flush syncs LMDB.
    ///
    /// [`ShardStore::flush`]: super::ShardStore::flush
    Batch,
    /// Like `Batch` plus `MDB_NOMETASYNC`, and nobody calls `flush` on a timer: the kernel
    /// writes back when it likes (tens of seconds by default). For tests and benchmarks.
    None,
}

impl Durability {
    /// The LMDB environment flags for this mode.
    pub(crate) fn env_flags(self) -> EnvFlags {
        match self {
            Durability::Fsync => EnvFlags::empty(),
            Durability::Batch => EnvFlags::NO_SYNC,
            Durability::None => EnvFlags::NO_SYNC | EnvFlags::NO_META_SYNC,
        }
    }

    /// Whether the store writes its commits through the write-ahead log (when it has one:
    /// `log_bytes > 0`).
    pub(crate) fn uses_log(self) -> bool {
        matches!(self, Durability::Fsync | Durability::Batch)
    }

    /// Whether every log append is synced before the batch is acked (`Fsync`); with `Batch`
    /// the periodic flush syncs the log.
    pub(crate) fn syncs_every_commit(self) -> bool {
        self == Durability::Fsync
    }

    /// Whether the driver has to call `flush` periodically for the documented guarantee.
    pub fn needs_periodic_flush(self) -> bool {
        self == Durability::Batch
    }

    /// Parses the `[storage] durability` config value.
    pub fn parse(value: &str) -> Option<Durability> {
        match value {
            "fsync" => Some(Durability::Fsync),
            "batch" => Some(Durability::Batch),
            "none" => Some(Durability::None),
            _ => None,
        }
    }

    /// The config spelling of this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Fsync => "fsync",
            Durability::Batch => "batch",
            Durability::None => "none",
        }
    }
}

/// Options of [`ShardStore::open`](super::ShardStore::open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// Size of the LMDB memory map in bytes: the most the shard's data file can grow to.
    /// It is address space, not memory, so it can be generous (rounded up to 4 KiB).
    pub map_size: usize,
    /// The ceiling the map grows to when a batch does not fit: the store doubles the map
    /// (capped here) and retries the batch. At most `map_size` means the map never grows.
    pub max_map_size: usize,
    pub durability: Durability,
    /// Size of the write-ahead log file with [`Durability::Fsync`] and [`Durability::Batch`]
    /// (see `store::wal`); 0 commits without a log (with `Fsync`, syncing LMDB at every
    /// commit).
    pub log_bytes: u64,
    /// Deferred apply (with the log only): a batch is acked once its log record is synced (with
    /// `Batch`: written), and
    /// its LMDB writes stay in a write transaction that commits, with the batches after it, at
    /// the end of the first batch this long after it began, or when the driver calls
    /// [`ShardStore::apply_pending`](super::ShardStore::apply_pending) (see `store::overlay`). A
    /// transaction abandoned by a failed batch starts over, so its batches can wait longer. Zero
    /// commits LMDB at every batch.
    pub apply_interval: std::time::Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            map_size: DEFAULT_MAP_SIZE,
            max_map_size: DEFAULT_MAP_SIZE,
            durability: Durability::Fsync,
            log_bytes: DEFAULT_LOG_BYTES,
            apply_interval: std::time::Duration::ZERO,
        }
    }
}

/// Default size of a shard's write-ahead log file: 64 MiB.
pub const DEFAULT_LOG_BYTES: u64 = 64 << 20;

/// Default map size per shard: 16 GiB of address space.
pub const DEFAULT_MAP_SIZE: usize = 16 << 30;
