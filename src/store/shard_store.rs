//! One shard's LMDB environment: opening it, applying write batches, flushing.
//!
//! Invariants:
//! - One `ShardStore` per shard directory per process (heed refuses a second open; we
//!   report [`StoreError::AlreadyOpen`]). Only the owning shard's thread writes to it.
//! - Every `apply` runs in one LMDB write transaction: its own, or (deferred apply, see
//!   [`StoreOptions::apply_interval`]) the one the acked batches since LMDB's last commit left
//!   open. When it returns `Ok`, the batch is committed with the durability of the store's
//!   [`Durability`] mode (with the log: its record is synced, or with `batch` written) and
//!   readers see it; when it
//!   returns `Err`, nothing of the batch is stored and in-memory state is unchanged, except
//!   when LMDB committed the batch and the checkpoint after it failed (a batch that did not fit
//!   the log, or the checkpoint every [`CHECKPOINT_COMMITS`]): then the batch is readable, and
//!   recognised when re-sent.
//! - `Conversation::last_seq` is the seq of the newest stored message of that
//!   conversation; the next message gets `last_seq + 1`.
//! - A re-sent message (same conversation and client id as one of the conversation's newest
//!   [`WINDOW`] messages) is answered with the original seq and not stored again; the
//!   answer comes from the stored records themselves ([`RecentIds`]), so it cannot
//!   disagree with them after a crash.
//! - A batch that does not fit the map (`MDB_MAP_FULL`) is aborted, the map is doubled (up
//!   to [`StoreOptions::max_map_size`]) and the SAME batch runs again; only its final
//!   attempt's outcomes are returned, so nothing is acked before it commits. The map is
//!   only resized by the writer, between transactions, behind the [`ResizeGate`] that
//!   every read view of every handle holds (LMDB forbids live transactions during a remap).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use heed::types::Bytes;
use heed::{CommitOrAbort, Database, Env, EnvFlags, EnvOpenOptions, RoTxn, RwTxn, WithoutTls};
use rkyv::rancor;

use super::batch::{AppendOutcome, NewMessage, Op, OpOutcome, ReadSide};
use super::error::{Rejection, StoreError};
use super::flusher::Flusher;
use super::keys::{self, MAX_CLIENT_ID_BYTES, MAX_SITE_BYTES, MAX_VISITOR_BYTES};
use super::options::{Durability, StoreOptions};
use super::overlay::SharedOverlay;
use super::read::{self, ReadView};
use super::recent_ids::{client_id_hash, RecentIds, WINDOW};
use super::records::{
    ArchivedMessageRecord, Conversation, ConversationId, ConversationMap, ConversationState,
    MessageRecord, MAX_LOCAL_CONVERSATION, MAX_SHARDS,
};
use super::resize_gate::ResizeGate;
use super::wal::{
    self, meta_pages, redo::RedoTable, FileDevice, LogDevice, Recovered, Wal, WalError,
};

/// The write-ahead log's file in the shard's directory.
pub const LOG_FILE: &str = "wal.log";

/// With the log, a checkpoint also comes after this many LMDB commits (with deferred apply, one
/// per `apply_interval` under load: 6.4 s at the default 50 ms). The pinned checkpoint
/// snapshot (see `wal::meta_pages`) keeps LMDB from reusing any page freed since, so every
/// commit's copied pages stay allocated until the next checkpoint: the data file grows by
/// about this many commits' pages, and the checkpoint syncs them. Measured by
/// `store::tests::pinned_checkpoints_bound_the_data_file` with batches of 100 messages over
/// 100 conversations (about 0.5 MB of pages per commit): pinned for a whole 64 MiB log, the
/// data file grew to 2.6 GB for 1.8 M messages (463 MB unpinned); with a checkpoint every 64
/// or 256 commits it stayed within 55-225 MB of the unpinned size, at about a third of the
/// unpinned store throughput on that heavy batch.
pub const CHECKPOINT_COMMITS: u64 = 128;

/// The least time between two write-behinds ([`StoreLog::write_behind`]).
pub const WRITE_BEHIND_INTERVAL: Duration = Duration::from_millis(20);

/// Whether a commit at `now` should hand LMDB's dirty pages to writeback, the last write-behind
/// having started at `last`: the first one always, then one per [`WRITE_BEHIND_INTERVAL`].
pub(crate) fn write_behind_due(last: Option<Instant>, now: Instant) -> bool {
    last.is_none_or(|last| now.saturating_duration_since(last) >= WRITE_BEHIND_INTERVAL)
}

/// A file error of the log's (its file, or LMDB's meta pages it restores), as a
/// [`StoreError::Log`] whose message says what was being done: "`doing`: `error`".
fn log_file_error(error: std::io::Error, doing: String) -> StoreError {
    StoreError::Log(WalError::Io(std::io::Error::new(
        error.kind(),
        format!("{doing}: {error}"),
    )))
}

/// Version of the on-disk layout written into the `info` table.
pub const FORMAT_VERSION: u64 = 1;
/// Reader slots of the LMDB lock table. Each live [`ReadView`] holds one, and so does the
/// log's pinned checkpoint snapshot; a shard thread needs a handful, the rest is headroom for
/// diagnostics tools.
pub const MAX_READERS: u32 = 126;
/// Named tables of a shard environment (6 used; format 1 files may also hold an unused
/// `dedup` table from before re-sends were recognised from the records; the rest spare).
pub const MAX_DBS: u32 = 10;

/// The scratch serialisation buffer is dropped after a batch that grew it past this.
const SCRATCH_KEEP_BYTES: usize = 64 * 1024;
/// How long a resize waits for open read views to end (they are microseconds long; one
/// held this long is a bug, and the batch fails instead of the writer hanging).
#[cfg(not(test))]
const RESIZE_PATIENCE: Duration = Duration::from_secs(5);
#[cfg(test)]
const RESIZE_PATIENCE: Duration = Duration::from_millis(300);

const INFO_FORMAT: &[u8] = b"format_version";
const INFO_SHARD: &[u8] = b"shard";
const INFO_NEXT_CONVERSATION: &[u8] = b"next_conversation";

pub(crate) type Table = Database<'static, Bytes, Bytes>;

/// Handles of the named tables of a shard environment.
#[derive(Clone, Copy)]
pub(crate) struct Tables {
    /// `(conversation, seq)` -> archived [`MessageRecord`].
    pub messages: Table,
    /// conversation -> archived [`Conversation`].
    pub conversations: Table,
    /// conversation -> empty, for every conversation that is not closed.
    pub open: Table,
    /// `(site, visitor)` -> conversation, for the visitor's open conversation.
    pub visitors: Table,
    /// Layout version, shard index, conversation id counter.
    pub info: Table,
    /// `(site, visitor)` -> SHA-256 of the visitor's secret (32 bytes). Added after
    /// format 1 shipped; created empty when a store from before is opened.
    pub visitor_secrets: Table,
    /// conversation -> the name of its gray-release variant (UTF-8). Added after format 1
    /// shipped; created empty when a store from before is opened.
    pub variants: Table,
}

/// The durable store of the conversations one shard owns.
///
/// `Send`: an `Fsync` commit blocks its thread for milliseconds, so the driver may keep the
/// store on a blocking helper thread instead of the shard's reactor thread.
pub struct ShardStore {
    env: Env<WithoutTls>,
    tables: Tables,
    /// Shared with every [`StoreReader`]: a resize waits for their views.
    gate: Arc<ResizeGate>,
    /// The map grows up to this when a batch does not fit.
    max_map_size: usize,
    shard: usize,
    durability: Durability,
    path: PathBuf,
    /// Reused buffer for serialising records (released when a batch made it large).
    scratch: Vec<u8>,
    /// Conversations loaded or changed by the current batch (empty between batches).
    staged: StagedConversations,
    /// Client ids of the newest messages of recently written conversations.
    recent: RecentIds,
    /// The write-ahead log (`Durability::Fsync` or `Batch` with `log_bytes > 0`).
    log: Option<StoreLog>,
    /// The current batch's redo list for the log (reused; released when a batch made it large).
    redo: Vec<u8>,
    /// The write transaction of the batches acked since LMDB's last commit (deferred apply, see
    /// [`StoreOptions::apply_interval`] and `overlay`), or of the batch being applied; `None`
    /// otherwise. Declared before `txn_env`, which it borrows.
    open: Option<OpenApply>,
    /// The environment handle `open` borrows, boxed so that its address does not change when the
    /// store moves between threads. Never replaced.
    txn_env: Box<Env<WithoutTls>>,
    /// See [`StoreOptions::apply_interval`]: zero (or no log) commits LMDB at every batch.
    apply_interval: Duration,
    /// The writes of the batches acked since LMDB's last commit (each key's last one), for
    /// readers (shared with every [`StoreReader`]). They are also in the log and in `open`; if
    /// `open` has to be abandoned (a later batch failed in it), the next transaction replays
    /// them from here first.
    overlay: Arc<SharedOverlay>,
    /// Bytes of redo lists the batches in `overlay` logged (the bound of deferred apply).
    pending_bytes: usize,
}

/// A write transaction kept open across batches (see [`ShardStore::open`]'s field docs).
///
/// LMDB ties a write transaction to the thread that began it (its writer lock is a mutex that
/// thread holds). The group commit runs every batch on the shard's blocking pool, which glommio
/// gives one thread per shard (a `Placement::Fixed` executor's pool), so the transaction stays on
/// its thread; [`OpenApply::check_thread`] stops the process instead of misusing it.
struct OpenApply {
    txn: RwTxn<'static>,
    thread: std::thread::ThreadId,
    began: Instant,
}

impl OpenApply {
    fn check_thread(&self) {
        assert_eq!(
            self.thread,
            std::thread::current().id(),
            "an LMDB write transaction kept open across batches was used from another thread \
             than the one that began it"
        );
    }
}

/// A deferred apply commits LMDB early once its batches' redo lists reach this size, which
/// bounds the memory of the open transaction's dirty pages and of the overlay.
const MAX_PENDING_REDO_BYTES: usize = 8 << 20;

/// How a batch's log record went (see [`BatchWriter::commit`]).
enum Logged {
    /// No log: LMDB's commit is the batch's commit.
    NoLog,
    /// The record is in the log (synced with `Durability::Fsync`).
    Appended,
    /// The batch wrote nothing (re-sends, refusals): no record, no sync. Whatever its outcomes
    /// refer to was made durable by an earlier batch (a checkpoint that failed is owed first:
    /// [`CheckpointCause::Owed`]).
    Nothing,
    /// The batch commits by committing LMDB and syncing it (a checkpoint), with no record. If
    /// the sync fails after LMDB committed, the batch is reported failed but is readable; its
    /// re-send is recognised, and the next batch checkpoints again before it is acked.
    Checkpoint(CheckpointCause),
}

/// Why a batch commits with a checkpoint instead of a log record.
#[derive(Clone, Copy)]
enum CheckpointCause {
    /// The log is full.
    LogFull,
    /// The batch is larger than the whole log.
    TooLarge,
    /// A checkpoint failed, or a flush of the log did (`durability = "batch"`): what the acked
    /// batches before rely on may not be on disk, so no batch is acked before a checkpoint
    /// succeeds.
    Owed,
}

const _: fn() = || {
    fn send<T: Send>() {}
    send::<ShardStore>();
};

impl ShardStore {
    /// Opens (creating if needed) `dir/shard-<shard>/` as this shard's environment.
    pub fn open(dir: &Path, shard: usize, options: StoreOptions) -> Result<Self, StoreError> {
        Self::open_with_log(dir, shard, options, None)
    }

    /// [`ShardStore::open`] with the log on `device` instead of `wal.log` in the store's
    /// directory (tests: a simulated disk that can lose power).
    pub(crate) fn open_with_log(
        dir: &Path,
        shard: usize,
        options: StoreOptions,
        device: Option<Box<dyn LogDevice>>,
    ) -> Result<Self, StoreError> {
        if shard >= MAX_SHARDS {
            return Err(StoreError::ShardOutOfRange(shard));
        }
        let path = dir.join(format!("shard-{shard}"));
        std::fs::create_dir_all(&path).map_err(|source| StoreError::CreateDir {
            path: path.clone(),
            source,
        })?;

        let logged = options.durability.uses_log() && (options.log_bytes > 0 || device.is_some());
        // The log is read before LMDB opens: its header's saved meta pages go back into the
        // data file first (see `wal::meta_pages`). A log left by an earlier run with the log
        // (`durability = "fsync"` or `"batch"`) is recovered even when this run has none, then
        // removed.
        let log_file = path.join(LOG_FILE);
        let leftover = !logged && device.is_none() && log_file.exists();
        let device: Option<Box<dyn LogDevice>> = match device {
            Some(device) => Some(device),
            None if logged || leftover => {
                let size = if logged { options.log_bytes } else { 0 };
                Some(Box::new(FileDevice::open(&log_file, size).map_err(
                    |error| log_file_error(error, format!("cannot open {}", log_file.display())),
                )?))
            }
            None => None,
        };
        let opened_log = match device {
            Some(device) => {
                let (mut wal, recovered) = Wal::open(device).map_err(StoreError::Log)?;
                wal.set_sync_appends(options.durability.syncs_every_commit());
                let data = path.join("data.mdb");
                let restored =
                    meta_pages::restore(&data, &recovered.saved_meta_pages).map_err(|error| {
                        log_file_error(
                            error,
                            format!(
                                "cannot restore the checkpoint's meta pages in {}",
                                data.display()
                            ),
                        )
                    })?;
                if restored {
                    tracing::info!(
                        shard,
                        "LMDB taken back to the last checkpoint's meta pages (the store was not \
                         closed cleanly); the log replays what came after"
                    );
                }
                Some((wal, recovered))
            }
            None => None,
        };

        let mut env_options = EnvOpenOptions::new().read_txn_without_tls();
        env_options
            .map_size(round_up_to_page(options.map_size))
            .max_readers(MAX_READERS)
            .max_dbs(MAX_DBS);
        // SAFETY: NO_SYNC / NO_META_SYNC are "unsafe" in heed because a machine crash may
        // then lose or (for NO_SYNC) corrupt recent commits. That is the documented
        // contract of `Durability::Batch` and `Durability::None`. With a log, LMDB commits
        // with NO_SYNC too: each batch is in the log before it commits (synced with `Fsync`,
        // by the next flush with `Batch`) and LMDB is synced at checkpoints (see `wal`);
        // `Fsync` without a log sets no flag.
        unsafe {
            env_options.flags(if logged {
                EnvFlags::NO_SYNC
            } else {
                options.durability.env_flags()
            });
        }
        // SAFETY: the memory map is only unsound if the data file is changed behind LMDB's
        // back. The file lives in a directory owned by this shard, heed refuses a second
        // open of the same path in this process, and no other program opens it.
        let env = unsafe { env_options.open(&path) }.map_err(|error| match error {
            heed::Error::EnvAlreadyOpened => StoreError::AlreadyOpen { path: path.clone() },
            other => other.into(),
        })?;
        // Reader slots of a killed process are reclaimed here rather than leaking.
        env.clear_stale_readers()?;
        // With a log, the checkpoint's snapshot stays pinned from here (before any write) until
        // the recovery's checkpoint: no page of it is reused meanwhile.
        let pin = match &opened_log {
            Some(_) => Some(env.clone().static_read_txn()?),
            None => None,
        };

        let wtxn = env.write_txn()?;
        let tables = env
            .create_databases_and_commit(wtxn, |opener, wtxn| -> Result<_, StoreError> {
                let messages = opener.create_database::<Bytes, Bytes>(wtxn, Some("messages"))?;
                let conversations =
                    opener.create_database::<Bytes, Bytes>(wtxn, Some("conversations"))?;
                let open = opener.create_database::<Bytes, Bytes>(wtxn, Some("open"))?;
                let visitors = opener.create_database::<Bytes, Bytes>(wtxn, Some("visitors"))?;
                let info = opener.create_database::<Bytes, Bytes>(wtxn, Some("info"))?;
                let visitor_secrets =
                    opener.create_database::<Bytes, Bytes>(wtxn, Some("visitor_secrets"))?;
                let variants = opener.create_database::<Bytes, Bytes>(wtxn, Some("variants"))?;

                match info.get(wtxn, INFO_FORMAT)? {
                    None => {
                        info.put(wtxn, INFO_FORMAT, &keys::u64_value(FORMAT_VERSION))?;
                        info.put(wtxn, INFO_SHARD, &keys::u64_value(shard as u64))?;
                    }
                    Some(bytes) => {
                        let found = decode_info(INFO_FORMAT, bytes)?;
                        if found != FORMAT_VERSION {
                            return Err(StoreError::UnsupportedFormat {
                                found,
                                supported: FORMAT_VERSION,
                            });
                        }
                        let owner = match info.get(wtxn, INFO_SHARD)? {
                            Some(bytes) => decode_info(INFO_SHARD, bytes)?,
                            None => return Err(corrupt("info", INFO_SHARD, "missing shard")),
                        };
                        if owner != shard as u64 {
                            return Err(StoreError::ShardMismatch {
                                path: path.clone(),
                                expected: shard,
                                found: owner,
                            });
                        }
                    }
                }
                Ok(CommitOrAbort::<_, ()>::Commit((
                    messages,
                    conversations,
                    open,
                    visitors,
                    info,
                    visitor_secrets,
                    variants,
                )))
            })?
            .unwrap_commit();
        let (messages, conversations, open, visitors, info, visitor_secrets, variants) = tables;

        let env_for_txn = env.clone();
        let mut store = ShardStore {
            env,
            tables: Tables {
                messages,
                conversations,
                open,
                visitors,
                info,
                visitor_secrets,
                variants,
            },
            gate: Arc::default(),
            max_map_size: round_up_to_page(options.max_map_size.max(options.map_size)),
            shard,
            durability: options.durability,
            path,
            scratch: Vec::new(),
            staged: StagedConversations::default(),
            recent: RecentIds::default(),
            log: None,
            redo: Vec::new(),
            open: None,
            txn_env: Box::new(env_for_txn),
            apply_interval: options.apply_interval,
            overlay: Arc::default(),
            pending_bytes: 0,
        };
        if let Some((wal, recovered)) = opened_log {
            store.recover(wal, recovered, pin)?;
            if leftover {
                // This run has no log: everything is in LMDB and synced now.
                store.log = None;
                std::fs::remove_file(&log_file)
                    .and_then(|()| std::fs::File::open(&store.path)?.sync_all())
                    .map_err(|error| {
                        log_file_error(error, format!("cannot remove {}", log_file.display()))
                    })?;
                tracing::info!(
                    shard,
                    "a write-ahead log left by an earlier run (durability = \"fsync\" or \
                     \"batch\") was recovered into LMDB and removed"
                );
            }
        }
        Ok(store)
    }

    /// Replays the log's records into LMDB (taken back to the records' checkpoint by the
    /// caller, which pinned that snapshot in `pin`), syncs LMDB and starts the log over.
    fn recover(
        &mut self,
        wal: Wal,
        recovered: Recovered,
        pin: Option<RoTxn<'static, WithoutTls>>,
    ) -> Result<(), StoreError> {
        let started = Instant::now();
        if recovered.cut_tail {
            tracing::warn!(
                shard = self.shard,
                "write-ahead log: a torn or corrupt record after the last whole one was cut \
                 (a crash during a write: with durability = \"fsync\" that batch was never acked; \
                 with \"batch\" it was written after the last flush)"
            );
        }
        if recovered.records_after_hole > 0 {
            tracing::warn!(
                shard = self.shard,
                dropped = recovered.records_after_hole,
                "write-ahead log: whole records after a missing or torn one were not replayed (a \
                 power loss with durability = \"batch\": batches acknowledged after the last \
                 flush)"
            );
        }
        let records = recovered.payloads.len();
        let mut writes = 0;
        for payload in &recovered.payloads {
            writes += wal::redo::decode(payload)
                .map_err(|error| StoreError::LogCorrupt {
                    path: self.path.join(LOG_FILE),
                    detail: error.to_string(),
                })?
                .len();
        }
        let payloads = recovered.payloads;
        self.growing(|store| {
            let mut txn = store.env.write_txn()?;
            for payload in &payloads {
                let list = wal::redo::decode(payload).expect("decoded above");
                for entry in list {
                    write(
                        &mut txn,
                        &store.tables,
                        None,
                        entry.table,
                        entry.key,
                        entry.value,
                    )?;
                }
            }
            txn.commit()?;
            Ok(())
        })?;
        let mut log = StoreLog {
            wal,
            data_file: self.env.try_clone_inner_file()?,
            page_size: meta_pages::page_size(),
            pinned: pin,
            commits_since_checkpoint: 0,
            checkpoints_for_pinned_pages: 0,
            env: self.env.clone(),
            checkpoints: 0,
            checkpoints_for_large_batches: 0,
            writes_behind: 0,
            last_write_behind: None,
            write_behind_failed: false,
            checkpoint_owed: Arc::new(AtomicBool::new(false)),
            #[cfg(test)]
            after_checkpoint: None,
        };
        log.restart()?;
        if records > 0 {
            tracing::info!(
                shard = self.shard,
                records,
                writes,
                micros = started.elapsed().as_micros() as u64,
                "write-ahead log replayed into LMDB"
            );
        }
        self.log = Some(log);
        Ok(())
    }

    /// Begins the write transaction if none is open, replaying the acked batches LMDB has not
    /// committed yet (an earlier transaction with them was abandoned).
    fn begin(&mut self) -> Result<(), StoreError> {
        if let Some(open) = &self.open {
            open.check_thread();
            return Ok(());
        }
        let txn = self.txn_env.write_txn()?;
        // SAFETY: the transaction borrows `*self.txn_env`, a heap value that is never replaced
        // and is dropped after `self.open` (field order; `Drop` also ends `open` first). Only the
        // lifetime is changed.
        let mut txn: RwTxn<'static> = unsafe { std::mem::transmute::<RwTxn<'_>, _>(txn) };
        if let Some(pending) = self.overlay.snapshot() {
            // Each key's last write, in any order: the same state as the batches' redo lists.
            for (table, key, value) in pending.writes() {
                write(&mut txn, &self.tables, None, table, key, value)?;
            }
        }
        self.open = Some(OpenApply {
            txn,
            thread: std::thread::current().id(),
            began: Instant::now(),
        });
        Ok(())
    }

    /// Ends the open write transaction without committing it (a batch failed in it); the
    /// acked batches in it are replayed by the next [`ShardStore::begin`].
    fn abandon(&mut self) {
        if let Some(open) = self.open.take() {
            open.check_thread();
            drop(open);
        }
    }

    /// Commits the open write transaction ([`ShardStore::commit_lmdb`]), then counts the commit
    /// for the log (write-behind, and a checkpoint every [`CHECKPOINT_COMMITS`]).
    fn commit_open(&mut self) -> Result<(), StoreError> {
        self.commit_lmdb()?;
        self.after_lmdb_commit()
    }

    /// Commits the open write transaction to LMDB. On success nothing is pending any more; on
    /// failure the transaction is gone and the acked batches stay pending (replayed by the next
    /// [`ShardStore::begin`]).
    fn commit_lmdb(&mut self) -> Result<(), StoreError> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        open.check_thread();
        open.txn.commit()?;
        self.overlay.clear();
        self.pending_bytes = 0;
        Ok(())
    }

    /// The log's part of an LMDB commit: write-behind, and a checkpoint every
    /// [`CHECKPOINT_COMMITS`] commits.
    fn after_lmdb_commit(&mut self) -> Result<(), StoreError> {
        if let Some(log) = &mut self.log {
            log.commits_since_checkpoint += 1;
            log.write_behind();
            if log.commits_since_checkpoint >= CHECKPOINT_COMMITS {
                log.restart()?;
                log.checkpoints_for_pinned_pages += 1;
            }
        }
        Ok(())
    }

    /// Whether LMDB's commit of the open transaction can wait for later batches.
    fn defer_commit(&self) -> bool {
        self.log.is_some()
            && !self.apply_interval.is_zero()
            && self.pending_bytes + self.redo.len() < MAX_PENDING_REDO_BYTES
            && self
                .open
                .as_ref()
                .is_some_and(|open| open.began.elapsed() < self.apply_interval)
    }

    /// Ends a batch whose writes are in the open transaction: commits LMDB now, or (deferred
    /// apply) keeps the transaction open and makes the batch's writes visible to readers.
    fn end_batch(&mut self, logged: Logged) -> Result<(), StoreError> {
        match logged {
            Logged::NoLog => self.commit_open(),
            Logged::Checkpoint(cause) => {
                self.commit_lmdb()?;
                let log = self.log.as_mut().expect("a checkpoint needs the log");
                log.restart()?;
                match cause {
                    CheckpointCause::LogFull | CheckpointCause::Owed => log.checkpoints += 1,
                    CheckpointCause::TooLarge => log.checkpoints_for_large_batches += 1,
                }
                Ok(())
            }
            Logged::Nothing if self.pending_bytes == 0 => {
                // No transaction to keep open.
                self.abandon();
                Ok(())
            }
            // The acked batches before stay in the open transaction until it is due.
            Logged::Nothing if self.defer_commit() => Ok(()),
            Logged::Nothing => self.commit_open(),
            Logged::Appended if self.defer_commit() => {
                // The LMDB snapshot these writes apply on top of: the one before this write
                // transaction (see `overlay`'s invariants).
                let base = self.open.as_ref().expect("a batch ran in it").txn.id() - 1;
                self.overlay.add(
                    &wal::redo::decode(&self.redo).expect("the redo list was built by this batch"),
                    base,
                );
                self.pending_bytes += self.redo.len();
                Ok(())
            }
            Logged::Appended => {
                if let Err(error) = self.commit_lmdb() {
                    let log = self.log.as_mut().expect("an appended record needs the log");
                    // LMDB refused the batch: the log must not replay it after a crash.
                    if let Err(undo) = log.wal.undo_last() {
                        panic!(
                            "the write-ahead log holds a batch LMDB refused ({error}) and cannot \
                             take it back ({undo}): stopping before anything else is acked"
                        );
                    }
                    return Err(error);
                }
                self.after_lmdb_commit()
            }
        }
    }

    /// Commits to LMDB the batches acked since its last commit (deferred apply; see
    /// [`StoreOptions::apply_interval`]). The driver calls it when their transaction is an
    /// interval old and no batch is in progress, and at shutdown on the thread that applies its
    /// batches.
    pub fn apply_pending(&mut self) -> Result<(), StoreError> {
        if !self.has_pending() {
            return Ok(());
        }
        self.growing(|store| {
            store.begin()?;
            store.commit_open()
        })
    }

    /// Whether acked batches wait for LMDB's commit, or a write transaction is open between
    /// batches (see [`ShardStore::apply_pending`]).
    pub fn has_pending(&self) -> bool {
        self.open.is_some() || self.pending_bytes > 0
    }

    /// When the open transaction began (or now, if acked batches wait for one after an
    /// abandoned transaction), if [`ShardStore::has_pending`].
    pub fn pending_since(&self) -> Option<Instant> {
        match &self.open {
            Some(open) => Some(open.began),
            None => self.has_pending().then(Instant::now),
        }
    }

    /// The batch writer of the open write transaction (begun if needed).
    fn writer(&mut self) -> Result<BatchWriter<'_>, StoreError> {
        self.redo.clear();
        self.begin()?;
        Ok(BatchWriter {
            txn: &mut self.open.as_mut().expect("begun above").txn,
            tables: self.tables,
            shard: self.shard,
            now_ms: now_ms(),
            scratch: &mut self.scratch,
            staged: &mut self.staged,
            recent: &mut self.recent,
            next_local: None,
            redo: self.log.is_some().then_some(&mut self.redo),
            log: self.log.as_mut(),
        })
    }

    /// The shard index this store belongs to.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// The environment directory (`dir/shard-<n>`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Current size of the memory map in bytes.
    pub fn map_size(&self) -> usize {
        self.env.info().map_size
    }

    /// Applies `ops` in order in ONE write transaction and commits it (deferred apply: logs it,
    /// and LMDB commits it with the batches of the next `apply_interval`).
    ///
    /// Returns one outcome per op. `Err` means nothing was stored (LMDB failure, full map,
    /// corrupt record); a refused op shows up as [`OpOutcome::Rejected`] instead and does
    /// not stop the others.
    pub fn apply(&mut self, ops: &[Op]) -> Result<Vec<OpOutcome>, StoreError> {
        self.growing(|store| store.apply_in_txn(ops))
    }

    /// Appends `batch` in one transaction (group commit). Outcome `i` is message `i`'s:
    /// `Stored` with a fresh seq, `Duplicate` with the seq its client id got before (also
    /// earlier in the same batch), or `Rejected`.
    pub fn append_batch(&mut self, batch: &[NewMessage]) -> Result<Vec<AppendOutcome>, StoreError> {
        // Same transaction logic as `apply`, without cloning the messages into `Op`s.
        self.growing(|store| store.append_in_txn(batch))
    }

    /// The ceiling the map grows to ([`StoreOptions::max_map_size`], rounded to 4 KiB).
    pub fn max_map_size(&self) -> usize {
        self.max_map_size
    }

    /// Runs one batch transaction; when it does not fit the map, grows the map and runs it
    /// again, until it commits, fails otherwise, or the map is at its ceiling.
    fn growing<T>(
        &mut self,
        mut attempt: impl FnMut(&mut Self) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        loop {
            let result = attempt(self);
            self.staged.clear();
            if result.is_err() {
                self.abandon();
                self.recent.clear();
            }
            if self.scratch.capacity() > SCRATCH_KEEP_BYTES {
                self.scratch = Vec::new();
            }
            if self.redo.capacity() > SCRATCH_KEEP_BYTES * 16 {
                self.redo = Vec::new();
            }
            match result {
                // The write transaction is gone (aborted when the attempt returned).
                Err(StoreError::MapFull { .. }) if self.map_size() < self.max_map_size => {
                    self.grow()?;
                }
                other => return other.map_err(|error| self.classify(error)),
            }
        }
    }

    /// Doubles the map, capped at the ceiling, and logs it.
    fn grow(&mut self) -> Result<(), StoreError> {
        let from = self.map_size();
        let to = from.saturating_mul(2).min(self.max_map_size);
        let started = Instant::now();
        self.set_map_size(to)?;
        tracing::warn!(
            shard = self.shard,
            from,
            to = self.map_size(),
            ceiling = self.max_map_size,
            micros = started.elapsed().as_micros() as u64,
            "LMDB map full: grew the map, retrying the batch"
        );
        Ok(())
    }

    /// Forces every commit so far to stable storage: the log's `fdatasync` with a log,
    /// else `mdb_env_sync(force)`.
    ///
    /// With [`Durability::Batch`] the driver calls this every commit window or so; acks
    /// of commits before the call survive a machine crash once it returns. With `Fsync`
    /// it is cheap and unneeded. (A clean drop checkpoints, or syncs without a log.)
    pub fn flush(&mut self) -> Result<(), StoreError> {
        match &mut self.log {
            Some(log) => log.wal.sync().map_err(StoreError::Log),
            None => self.env.force_sync().map_err(StoreError::from),
        }
    }

    /// A handle that syncs this store's commits from another thread (see [`Flusher`]): the
    /// log file with a log (a failed sync makes the next batch checkpoint first), else LMDB's
    /// data file.
    pub fn flusher(&self) -> Result<Flusher, StoreError> {
        let Some(log) = &self.log else {
            return Ok(Flusher::new(self.env.try_clone_inner_file()?, None));
        };
        let file = log
            .wal
            .file()
            .map_err(|error| StoreError::Log(WalError::Io(error)))?;
        Ok(Flusher::new(file, Some(log.checkpoint_owed.clone())))
    }

    /// Grows (or shrinks) the memory map, e.g. after [`StoreError::MapFull`].
    ///
    /// Rounded up to 4 KiB; LMDB raises a size below the data already stored to that size.
    /// Waits (at most a few seconds) for the read views open on other threads through
    /// [`StoreReader`]s to end, and keeps new ones out while it remaps.
    pub fn set_map_size(&mut self, bytes: usize) -> Result<(), StoreError> {
        // LMDB allows no live transaction during a resize, and the checkpoint below starts the
        // log over: the acked batches only the log and memory hold go into LMDB first.
        if self.has_pending() {
            self.begin()?;
            self.commit_open()?;
        }
        if let Some(log) = &mut self.log {
            log.unpin_for_resize()?;
        }
        let resized = self.resize_unpinned(bytes);
        if let Some(log) = &mut self.log {
            log.repin()?;
        }
        resized
    }

    fn resize_unpinned(&mut self, bytes: usize) -> Result<(), StoreError> {
        let Some(_pass) = self.gate.resize(RESIZE_PATIENCE) else {
            return Err(StoreError::ResizeBlocked {
                waited_ms: RESIZE_PATIENCE.as_millis() as u64,
            });
        };
        // SAFETY: LMDB requires that no transaction of this env is live in this process.
        // Write transactions are created and ended inside `&mut self` methods, except the one
        // deferred apply keeps open between batches (`self.open`), which `set_map_size`
        // committed (or a failed batch abandoned) before calling this; so `&mut self` proves
        // none is live. Every read transaction (through this store or any
        // `StoreReader` clone, on any thread) is a `ReadView` holding a `ReadPass` of
        // `self.gate` from before it begins until after it ends, and `_pass` is only
        // granted while no `ReadPass` exists and keeps new ones from being granted. The
        // log's pinned snapshot, the one read transaction without a pass, was let go by
        // `set_map_size`.
        unsafe { self.env.resize(round_up_to_page(bytes)) }.map_err(StoreError::from)
    }

    /// A read-only handle that can be used while this store is busy committing
    /// on another thread (LMDB readers never wait for the writer).
    pub fn reader(&self) -> StoreReader {
        StoreReader {
            env: self.env.clone(),
            tables: self.tables,
            gate: self.gate.clone(),
            overlay: self.overlay.clone(),
        }
    }

    /// Opens a consistent read-only view (an LMDB read transaction).
    ///
    /// Keep it short: a live view pins old pages, so the file grows while it is held.
    /// Never hold one across an `await`.
    pub fn read(&self) -> Result<ReadView<'_>, StoreError> {
        open_view(&self.env, &self.gate, &self.tables, Some(&self.overlay))
    }

    /// The metadata of a conversation.
    pub fn conversation(&self, id: ConversationId) -> Result<Option<Conversation>, StoreError> {
        self.read()?.conversation(id)
    }

    /// The seq of a conversation's newest message (0 if none), `None` if it does not exist.
    pub fn last_seq(&self, id: ConversationId) -> Result<Option<u64>, StoreError> {
        self.read()?.last_seq(id)
    }

    /// The open conversation of a visitor of a site.
    pub fn conversation_of_visitor(
        &self,
        site: &str,
        visitor: &str,
    ) -> Result<Option<ConversationId>, StoreError> {
        self.read()?.conversation_of_visitor(site, visitor)
    }

    /// Every conversation that is not closed, in id order (for rebuilding queues and
    /// agent loads after a restart; queue order is `(state_since_ms, id)`).
    pub fn open_conversations(&self) -> Result<Vec<Conversation>, StoreError> {
        self.read()?.open_conversations()
    }

    /// Calls `visit` with each stored message of `id` with seq > `after_seq`, in seq order,
    /// at most `limit` of them; the records are read in place from the LMDB pages.
    /// Returns how many were visited.
    pub fn messages_after(
        &self,
        id: ConversationId,
        after_seq: u64,
        limit: usize,
        mut visit: impl FnMut(&ArchivedMessageRecord),
    ) -> Result<usize, StoreError> {
        let view = self.read()?;
        let mut count = 0;
        for message in view.messages_after(id, after_seq, limit)? {
            visit(message?);
            count += 1;
        }
        Ok(count)
    }

    fn apply_in_txn(&mut self, ops: &[Op]) -> Result<Vec<OpOutcome>, StoreError> {
        let mut writer = self.writer()?;
        let mut outcomes = Vec::with_capacity(ops.len());
        for op in ops {
            let outcome = match op {
                Op::Open { site, visitor } => writer.open(site, visitor)?,
                Op::Append(message) => writer.append(message)?.into(),
                Op::SetState {
                    conversation,
                    state,
                } => writer.set_state(*conversation, state)?,
                Op::MarkRead {
                    conversation,
                    side,
                    seq,
                } => writer.mark_read(*conversation, *side, *seq)?,
                Op::SetFailedBotTurns {
                    conversation,
                    count,
                } => writer.set_failed_bot_turns(*conversation, *count)?,
                Op::SetVariant {
                    conversation,
                    variant,
                } => writer.set_variant(*conversation, variant)?,
                Op::SetVisitorSecret {
                    site,
                    visitor,
                    secret_hash,
                } => writer.set_visitor_secret(site, visitor, secret_hash)?,
                Op::DeleteEmpty { conversation } => writer.delete_empty(*conversation)?,
            };
            outcomes.push(outcome);
        }
        let logged = writer.commit()?;
        self.end_batch(logged)?;
        Ok(outcomes)
    }

    fn append_in_txn(&mut self, batch: &[NewMessage]) -> Result<Vec<AppendOutcome>, StoreError> {
        let mut writer = self.writer()?;
        let mut outcomes = Vec::with_capacity(batch.len());
        for message in batch {
            outcomes.push(writer.append(message)?);
        }
        let logged = writer.commit()?;
        self.end_batch(logged)?;
        Ok(outcomes)
    }

    /// Fills in the map size of a `MapFull` error, and tells a full disk from other I/O
    /// errors: LMDB reports a short write (the file system ran out of space mid-write) as
    /// `EIO`, so an `EIO` while the file system has (almost) no space left is `DiskFull`.
    fn classify(&self, error: StoreError) -> StoreError {
        match error {
            StoreError::MapFull { .. } => StoreError::MapFull {
                map_size: self.map_size(),
            },
            StoreError::Lmdb(heed::Error::Io(io)) | StoreError::Log(WalError::Io(io))
                if io.raw_os_error() == Some(libc::ENOSPC)
                    || (io.raw_os_error() == Some(libc::EIO)
                        && free_bytes(&self.path).is_some_and(|free| free < DISK_FULL_BYTES)) =>
            {
                StoreError::DiskFull(io)
            }
            other => other,
        }
    }
}

impl Drop for ShardStore {
    fn drop(&mut self) {
        // A clean shutdown leaves nothing unsynced, whatever the mode. Errors cannot be
        // reported from drop; the data is still in the page cache.
        if self.has_pending() {
            let same_thread = self
                .open
                .as_ref()
                .is_none_or(|open| open.thread == std::thread::current().id());
            let applied = same_thread && self.apply_pending().is_ok();
            if !applied {
                // The acked batches are in the log: no checkpoint, so the next open replays them.
                tracing::warn!(
                    shard = self.shard,
                    "closing with acked batches not applied to LMDB; the next start replays them \
                     from the write-ahead log"
                );
                // Ended without committing. On another thread than the one that began it (the
                // driver's `finish_commits` gave up waiting), LMDB's unlock of its writer mutex
                // fails with EPERM (a robust mutex), which LMDB ignores: the lock stays with the
                // blocking thread until it exits, so nothing in this process writes this
                // environment again meanwhile; the process is stopping.
                if let Some(open) = self.open.take() {
                    drop(open.txn);
                }
                // With `durability = "batch"` their records are not synced yet.
                if let Some(log) = &mut self.log {
                    let _ = log.wal.sync();
                }
                return;
            }
        }
        if let Some(log) = &mut self.log {
            // Checkpoint, so the next open has nothing to replay.
            let _ = log.checkpoint();
        } else if self.durability != Durability::Fsync {
            let _ = self.env.force_sync();
        }
    }
}

impl From<AppendOutcome> for OpOutcome {
    fn from(outcome: AppendOutcome) -> Self {
        match outcome {
            AppendOutcome::Stored { seq, ts_ms } => OpOutcome::Stored { seq, ts_ms },
            AppendOutcome::Duplicate { seq } => OpOutcome::Duplicate { seq },
            AppendOutcome::Rejected(reason) => OpOutcome::Rejected(reason),
        }
    }
}

/// A conversation loaded by the current batch, and whether the batch changed it.
struct Staged {
    conversation: Conversation,
    dirty: bool,
}

/// Conversations touched by the current batch; each changed one is written once at commit.
#[derive(Default)]
struct StagedConversations {
    entries: Vec<Staged>,
    index: ConversationMap<usize>,
}

impl StagedConversations {
    fn clear(&mut self) {
        self.entries.clear();
        self.index.clear();
        if self.entries.capacity() > 1024 {
            *self = StagedConversations::default();
        }
    }

    fn get(&self, id: ConversationId) -> Option<usize> {
        self.index.get(&id).copied()
    }

    fn insert(&mut self, conversation: Conversation, dirty: bool) -> usize {
        let slot = self.entries.len();
        self.index.insert(conversation.id, slot);
        self.entries.push(Staged {
            conversation,
            dirty,
        });
        slot
    }
}

/// The state of one write transaction while its ops run.
struct BatchWriter<'s> {
    txn: &'s mut RwTxn<'static>,
    tables: Tables,
    shard: usize,
    now_ms: u64,
    scratch: &'s mut Vec<u8>,
    staged: &'s mut StagedConversations,
    recent: &'s mut RecentIds,
    /// The conversation counter, once an `Open` of this batch has read it.
    next_local: Option<u64>,
    /// The batch's writes, for the log (`None` when the store has no log).
    redo: Option<&'s mut Vec<u8>>,
    log: Option<&'s mut StoreLog>,
}

/// One LMDB put (`value: Some`) or delete, appended to `redo` when given.
fn write(
    txn: &mut RwTxn<'_>,
    tables: &Tables,
    redo: Option<&mut Vec<u8>>,
    table: RedoTable,
    key: &[u8],
    value: Option<&[u8]>,
) -> Result<(), StoreError> {
    let database = tables.of(table);
    match value {
        Some(value) => {
            database.put(txn, key, value)?;
            if let Some(redo) = redo {
                wal::redo::put(redo, table, key, value);
            }
        }
        None => {
            database.delete(txn, key)?;
            if let Some(redo) = redo {
                wal::redo::delete(redo, table, key);
            }
        }
    }
    Ok(())
}

impl Tables {
    pub(crate) fn of(&self, table: RedoTable) -> Table {
        match table {
            RedoTable::Messages => self.messages,
            RedoTable::Conversations => self.conversations,
            RedoTable::Open => self.open,
            RedoTable::Visitors => self.visitors,
            RedoTable::Info => self.info,
            RedoTable::VisitorSecrets => self.visitor_secrets,
            RedoTable::Variants => self.variants,
        }
    }
}

/// The write-ahead log of a store with `Durability::Fsync` or `Batch` (see [`wal`]), and the handle
/// that syncs LMDB at a checkpoint.
pub(crate) struct StoreLog {
    wal: Wal,
    env: Env<WithoutTls>,
    /// LMDB's data file (a duplicate of LMDB's own descriptor), for reading its meta pages
    /// after a sync and for write-behind ([`StoreLog::write_behind`]).
    data_file: std::fs::File,
    page_size: u64,
    /// A read transaction on the last checkpoint's snapshot (saved in the log's header):
    /// while it lives LMDB reuses no page of that snapshot, so writing the saved meta pages
    /// back always finds an intact tree. Dropped only to resize the map, after a checkpoint.
    pinned: Option<RoTxn<'static, WithoutTls>>,
    /// Commits since the snapshot was pinned (see [`CHECKPOINT_COMMITS`]).
    commits_since_checkpoint: u64,
    /// Checkpoints made because [`CHECKPOINT_COMMITS`] commits kept their pages.
    checkpoints_for_pinned_pages: u64,
    /// Checkpoints made because the log was full.
    checkpoints: u64,
    /// Batches too large for the log, committed with an LMDB sync instead.
    checkpoints_for_large_batches: u64,
    /// Commits whose pages were handed to writeback ([`StoreLog::write_behind`]).
    writes_behind: u64,
    /// When the last write-behind started ([`write_behind_due`]).
    last_write_behind: Option<Instant>,
    /// A write-behind failed once (logged once; the checkpoint's fdatasync reports errors).
    write_behind_failed: bool,
    /// A checkpoint failed, or the [`Flusher`] (which shares it) failed to sync the log: the
    /// next batch checkpoints before it is acked ([`CheckpointCause::Owed`]).
    checkpoint_owed: Arc<AtomicBool>,
    #[cfg(test)]
    after_checkpoint: Option<Box<dyn FnMut() + Send>>,
}

impl StoreLog {
    /// A checkpoint because the log was full: [`StoreLog::restart`], counted.
    fn checkpoint(&mut self) -> Result<(), StoreError> {
        self.restart()?;
        self.checkpoints += 1;
        Ok(())
    }

    /// Syncs LMDB, then starts the log over, saving LMDB's meta pages as synced in its header,
    /// and pins that snapshot: everything the log held is on disk in LMDB, and after a power
    /// loss the saved meta pages lead back to exactly this state.
    fn restart(&mut self) -> Result<(), StoreError> {
        // Owed until this checkpoint completes (see `CheckpointCause::Owed`).
        self.checkpoint_owed.store(true, Ordering::Relaxed);
        self.env.force_sync()?;
        #[cfg(test)]
        if let Some(hook) = &mut self.after_checkpoint {
            hook();
        }
        let saved = meta_pages::read(&self.data_file, self.page_size)
            .map_err(|error| StoreError::Log(WalError::Io(error)))?;
        if saved.is_empty() {
            tracing::warn!("LMDB's meta pages could not be read for the log's header");
        }
        self.wal.reset_saving(&saved).map_err(StoreError::Log)?;
        // The old pin goes only now: until the header above was synced, a recovery would
        // have gone back to the old snapshot, which had to stay intact.
        self.pinned = None;
        self.pinned = Some(self.env.clone().static_read_txn()?);
        self.commits_since_checkpoint = 0;
        self.checkpoint_owed.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Write-behind: after every commit with the log, hands LMDB's dirty pages to the kernel's
    /// writeback (`sync_file_range(SYNC_FILE_RANGE_WRITE)`: it submits the writes, does not wait
    /// for them to complete and flushes no device cache, though submitting can block briefly,
    /// e.g. on a full device queue), so a checkpoint's fdatasync finds little left to write.
    ///
    /// Without it the checkpoint wrote all the pages of its [`CHECKPOINT_COMMITS`] commits
    /// while the next commits waited, and that wait decided the relay's p99. At a fixed 12,000
    /// round trips/s (`switchboard-bench relay`, the compare.sh configuration, 12 alternating
    /// rounds) the median p99 was 55.5 ms without and 32.9 ms with (lower in 11 of 12 rounds),
    /// for a median p50 of 11.9 ms instead of 9.0 (every commit now pays for submitting its
    /// writes) and about 4% more server CPU per round trip; at 6,000/s (3 rounds) p99
    /// 44.6-48.0 ms without and 17.4-27.6 ms with, the same p50, 8% more CPU.
    ///
    /// Durability is unchanged: the kernel may write any dirty page at any time anyway, which
    /// the checkpoint design already allows for (`wal::meta_pages`), and a write error still
    /// surfaces at the checkpoint's fdatasync (this call only starts writes; it consumes no
    /// error).
    ///
    /// At most one write-behind per [`WRITE_BEHIND_INTERVAL`] (see [`write_behind_due`]): one
    /// per commit cost 12% of the server's CPU at 10,000 round trips/s in `perf`, mostly block
    /// requests of a few pages each; paced, the kernel gets 20 ms of pages at once and merges
    /// them (LMDB writes new pages while a checkpoint is pinned, mostly at the end of the
    /// file). Server CPU per round trip went from 121 to 114 us at 10,000/s, with p99 no
    /// worse (bench/README.md, "Write-behind pacing").
    fn write_behind(&mut self) {
        use std::os::fd::AsRawFd;
        let now = Instant::now();
        if !write_behind_due(self.last_write_behind, now) {
            return;
        }
        self.last_write_behind = Some(now);
        // SAFETY: a system call on a descriptor this struct owns (open while `self` lives);
        // no memory is passed.
        let result = unsafe {
            libc::sync_file_range(
                self.data_file.as_raw_fd(),
                0,
                0,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if result == 0 {
            self.writes_behind += 1;
        } else if !self.write_behind_failed {
            self.write_behind_failed = true;
            tracing::warn!(
                error = %std::io::Error::last_os_error(),
                "cannot start the writeback of LMDB's pages early; checkpoints will take longer"
            );
        }
    }

    /// Before a resize (LMDB allows no live transaction then): checkpoints, so the pinned
    /// snapshot is the one just synced, and lets the pin go. [`StoreLog::repin`] after.
    fn unpin_for_resize(&mut self) -> Result<(), StoreError> {
        self.restart()?;
        self.pinned = None;
        Ok(())
    }

    /// Pins the current snapshot again after a resize (nothing was written since the
    /// checkpoint of [`StoreLog::unpin_for_resize`], so it is the saved one).
    fn repin(&mut self) -> Result<(), StoreError> {
        if self.pinned.is_none() {
            self.pinned = Some(self.env.clone().static_read_txn()?);
        }
        Ok(())
    }
}

impl BatchWriter<'_> {
    fn open(&mut self, site: &str, visitor: &str) -> Result<OpOutcome, StoreError> {
        if let Err(reason) = check_text("site", site, MAX_SITE_BYTES)
            .and_then(|()| check_text("visitor id", visitor, MAX_VISITOR_BYTES))
        {
            return Ok(OpOutcome::Rejected(reason));
        }
        let visitor_key = keys::visitor_key(site, visitor);
        if let Some(bytes) = self.tables.visitors.get(self.txn, visitor_key.as_bytes())? {
            let id = ConversationId(
                keys::decode_u64_value(bytes)
                    .ok_or_else(|| corrupt("visitors", visitor_key.as_bytes(), "bad id"))?,
            );
            let slot = self
                .load(id)?
                .ok_or_else(|| corrupt("visitors", visitor_key.as_bytes(), "dangling id"))?;
            return Ok(OpOutcome::Opened {
                conversation: id,
                created: false,
                last_seq: self.staged.entries[slot].conversation.last_seq,
            });
        }

        let local = match self.next_local {
            Some(local) => local,
            None => match self.tables.info.get(self.txn, INFO_NEXT_CONVERSATION)? {
                Some(bytes) => decode_info(INFO_NEXT_CONVERSATION, bytes)?,
                None => 1,
            },
        };
        if local > MAX_LOCAL_CONVERSATION {
            return Ok(OpOutcome::Rejected(Rejection::ConversationIdsExhausted));
        }
        self.next_local = Some(local + 1);
        let id = ConversationId::from_parts(self.shard, local);
        let key = keys::conversation_key(id);
        self.put(RedoTable::Visitors, visitor_key.as_bytes(), &key)?;
        self.put(RedoTable::Open, &key, &[])?;
        self.staged.insert(
            Conversation {
                id,
                site: site.to_owned(),
                visitor: visitor.to_owned(),
                state: ConversationState::Bot,
                state_since_ms: self.now_ms,
                last_seq: 0,
                created_ms: self.now_ms,
                updated_ms: self.now_ms,
                visitor_read: 0,
                agent_read: 0,
                failed_bot_turns: 0,
            },
            true,
        );
        Ok(OpOutcome::Opened {
            conversation: id,
            created: true,
            last_seq: 0,
        })
    }

    fn append(&mut self, message: &NewMessage) -> Result<AppendOutcome, StoreError> {
        let id = message.conversation;
        if let Some(client_id) = &message.client_id {
            if let Err(reason) = check_text("client message id", client_id, MAX_CLIENT_ID_BYTES) {
                return Ok(AppendOutcome::Rejected(reason));
            }
        }
        let slot = match self.writable(id)? {
            Ok(slot) => slot,
            Err(reason) => return Ok(AppendOutcome::Rejected(reason)),
        };
        let conversation = &self.staged.entries[slot].conversation;
        let seq = conversation.last_seq + 1;
        let ts_ms = self.now_ms.max(conversation.updated_ms);

        let client_hash = message.client_id.as_deref().map(client_id_hash);
        if let (Some(client_id), Some(hash)) = (message.client_id.as_deref(), client_hash) {
            if let Some(original) = self.resent(id, seq - 1, client_id, hash)? {
                return Ok(AppendOutcome::Duplicate { seq: original });
            }
        }

        let record = MessageRecord {
            seq,
            from: message.from,
            name: message.name.clone(),
            text: message.text.clone(),
            ts_ms,
            client_id: message.client_id.clone(),
        };
        self.scratch.clear();
        let bytes = rkyv::api::high::to_bytes_in::<_, rancor::Error>(&record, &mut *self.scratch)
            .map_err(|error| StoreError::Serialize {
            record: "message",
            detail: error.to_string(),
        })?;
        write(
            &mut *self.txn,
            &self.tables,
            self.redo.as_deref_mut(),
            RedoTable::Messages,
            &keys::message_key(id, seq),
            Some(bytes),
        )?;

        self.recent.record(id, seq, client_hash);
        let staged = &mut self.staged.entries[slot];
        staged.conversation.last_seq = seq;
        staged.conversation.updated_ms = ts_ms;
        staged.dirty = true;
        Ok(AppendOutcome::Stored { seq, ts_ms })
    }

    fn set_state(
        &mut self,
        id: ConversationId,
        state: &ConversationState,
    ) -> Result<OpOutcome, StoreError> {
        let slot = match self.writable(id)? {
            Ok(slot) => slot,
            Err(reason) => return Ok(OpOutcome::Rejected(reason)),
        };
        let now_ms = self.now_ms;
        let staged = &mut self.staged.entries[slot];
        if staged.conversation.state == *state {
            return Ok(OpOutcome::Updated);
        }
        staged.conversation.state = state.clone();
        staged.conversation.state_since_ms = now_ms;
        staged.conversation.updated_ms = now_ms.max(staged.conversation.updated_ms);
        staged.dirty = true;

        if *state == ConversationState::Closed {
            let site = staged.conversation.site.clone();
            let visitor = staged.conversation.visitor.clone();
            self.forget_open(id, &site, &visitor)?;
        }
        Ok(OpOutcome::Updated)
    }

    /// Takes a conversation off the open list, and off its visitor's pointer when that still
    /// names it (a newer conversation of the visitor keeps its pointer).
    fn forget_open(
        &mut self,
        id: ConversationId,
        site: &str,
        visitor: &str,
    ) -> Result<(), StoreError> {
        let key = keys::conversation_key(id);
        self.delete(RedoTable::Open, &key)?;
        let visitor_key = keys::visitor_key(site, visitor);
        let points_here = self
            .tables
            .visitors
            .get(self.txn, visitor_key.as_bytes())?
            .is_some_and(|bytes| bytes == key);
        if points_here {
            self.delete(RedoTable::Visitors, visitor_key.as_bytes())?;
        }
        Ok(())
    }

    fn mark_read(
        &mut self,
        id: ConversationId,
        side: ReadSide,
        seq: u64,
    ) -> Result<OpOutcome, StoreError> {
        let slot = match self.existing(id)? {
            Ok(slot) => slot,
            Err(reason) => return Ok(OpOutcome::Rejected(reason)),
        };
        let staged = &mut self.staged.entries[slot];
        let conversation = &mut staged.conversation;
        let target = seq.min(conversation.last_seq);
        let watermark = match side {
            ReadSide::Visitor => &mut conversation.visitor_read,
            ReadSide::Agent => &mut conversation.agent_read,
        };
        if target > *watermark {
            *watermark = target;
            staged.dirty = true;
        }
        Ok(OpOutcome::ReadMarked {
            watermark: *watermark,
        })
    }

    fn set_failed_bot_turns(
        &mut self,
        id: ConversationId,
        count: u32,
    ) -> Result<OpOutcome, StoreError> {
        let slot = match self.writable(id)? {
            Ok(slot) => slot,
            Err(reason) => return Ok(OpOutcome::Rejected(reason)),
        };
        let staged = &mut self.staged.entries[slot];
        if staged.conversation.failed_bot_turns != count {
            staged.conversation.failed_bot_turns = count;
            staged.dirty = true;
        }
        Ok(OpOutcome::Updated)
    }

    fn set_variant(&mut self, id: ConversationId, variant: &str) -> Result<OpOutcome, StoreError> {
        if let Err(reason) = check_text("variant", variant, MAX_VARIANT_BYTES) {
            return Ok(OpOutcome::Rejected(reason));
        }
        if let Err(reason) = self.writable(id)? {
            return Ok(OpOutcome::Rejected(reason));
        }
        let key = keys::conversation_key(id);
        if self.tables.variants.get(self.txn, &key)?.is_none() {
            self.put(RedoTable::Variants, &key, variant.as_bytes())?;
        }
        Ok(OpOutcome::Updated)
    }

    fn delete_empty(&mut self, id: ConversationId) -> Result<OpOutcome, StoreError> {
        let slot = match self.writable(id)? {
            Ok(slot) => slot,
            Err(reason) => return Ok(OpOutcome::Rejected(reason)),
        };
        let staged = &mut self.staged.entries[slot];
        let conversation = &staged.conversation;
        if conversation.last_seq != 0
            || matches!(conversation.state, ConversationState::Assigned { .. })
        {
            return Ok(OpOutcome::Rejected(Rejection::NotEmpty(id)));
        }
        let (site, visitor) = (conversation.site.clone(), conversation.visitor.clone());
        // Later ops of this batch see it as closed; commit does not write it back.
        staged.conversation.state = ConversationState::Closed;
        staged.dirty = false;
        self.delete(RedoTable::Conversations, &keys::conversation_key(id))?;
        self.delete(RedoTable::Variants, &keys::conversation_key(id))?;
        self.forget_open(id, &site, &visitor)?;
        Ok(OpOutcome::Updated)
    }

    fn set_visitor_secret(
        &mut self,
        site: &str,
        visitor: &str,
        secret_hash: &[u8; 32],
    ) -> Result<OpOutcome, StoreError> {
        if let Err(reason) = check_text("site", site, MAX_SITE_BYTES)
            .and_then(|()| check_text("visitor id", visitor, MAX_VISITOR_BYTES))
        {
            return Ok(OpOutcome::Rejected(reason));
        }
        let key = keys::visitor_key(site, visitor);
        if self
            .tables
            .visitor_secrets
            .get(self.txn, key.as_bytes())?
            .is_none()
        {
            self.put(RedoTable::VisitorSecrets, key.as_bytes(), secret_hash)?;
        }
        Ok(OpOutcome::Updated)
    }

    /// The seq of the message of `id` with this client id among the conversation's newest
    /// [`WINDOW`] messages (`last_seq` is the newest), if there is one.
    fn resent(
        &mut self,
        id: ConversationId,
        last_seq: u64,
        client_id: &str,
        hash: u64,
    ) -> Result<Option<u64>, StoreError> {
        let messages = self.tables.messages;
        if !self.recent.holds(id) {
            let first = last_seq.saturating_sub(WINDOW - 1).max(1);
            let low = keys::message_key(id, first);
            let high = keys::message_key(id, last_seq);
            let mut entries = Vec::new();
            if last_seq > 0 {
                let range = (
                    std::ops::Bound::Included(&low[..]),
                    std::ops::Bound::Included(&high[..]),
                );
                for entry in messages.range(self.txn, &range)? {
                    let (key, bytes) = entry?;
                    let record = read::access_message(key, bytes)?;
                    if let Some(stored) = record.client_id() {
                        entries.push((client_id_hash(stored), record.seq()));
                    }
                }
            }
            self.recent.install(id, entries);
        }
        let txn = &self.txn;
        self.recent.find(id, hash, |candidate| {
            let key = keys::message_key(id, candidate);
            Ok(match messages.get(txn, &key)? {
                Some(bytes) => read::access_message(&key, bytes)?.client_id() == Some(client_id),
                None => false,
            })
        })
    }

    /// The staged slot of an existing conversation of this shard that is not closed.
    fn writable(&mut self, id: ConversationId) -> Result<Result<usize, Rejection>, StoreError> {
        Ok(match self.existing(id)? {
            Ok(slot)
                if self.staged.entries[slot].conversation.state == ConversationState::Closed =>
            {
                Err(Rejection::ConversationClosed(id))
            }
            other => other,
        })
    }

    /// The staged slot of an existing conversation of this shard.
    fn existing(&mut self, id: ConversationId) -> Result<Result<usize, Rejection>, StoreError> {
        if id.shard() != self.shard {
            return Ok(Err(Rejection::ForeignConversation {
                conversation: id,
                owner: id.shard(),
            }));
        }
        Ok(self.load(id)?.ok_or(Rejection::UnknownConversation(id)))
    }

    /// Stages a conversation (from this batch, else from the table).
    fn load(&mut self, id: ConversationId) -> Result<Option<usize>, StoreError> {
        if let Some(slot) = self.staged.get(id) {
            return Ok(Some(slot));
        }
        let key = keys::conversation_key(id);
        let Some(bytes) = self.tables.conversations.get(self.txn, &key)? else {
            return Ok(None);
        };
        let conversation = read::decode_conversation(&key, bytes)?;
        Ok(Some(self.staged.insert(conversation, false)))
    }

    /// Writes the changed conversations and the id counter, then logs the batch (with a log:
    /// once this returns `Appended` the batch survives a power loss, with `durability =
    /// "batch"` once the next flush succeeds, so LMDB may commit it later and without
    /// syncing). The store commits LMDB ([`ShardStore::end_batch`]).
    fn commit(mut self) -> Result<Logged, StoreError> {
        for staged in self.staged.entries.iter().filter(|staged| staged.dirty) {
            self.scratch.clear();
            let bytes = rkyv::api::high::to_bytes_in::<_, rancor::Error>(
                &staged.conversation,
                &mut *self.scratch,
            )
            .map_err(|error| StoreError::Serialize {
                record: "conversation",
                detail: error.to_string(),
            })?;
            write(
                self.txn,
                &self.tables,
                self.redo.as_deref_mut(),
                RedoTable::Conversations,
                &keys::conversation_key(staged.conversation.id),
                Some(bytes),
            )?;
        }
        if let Some(next) = self.next_local {
            self.put(
                RedoTable::Info,
                INFO_NEXT_CONVERSATION,
                &keys::u64_value(next),
            )?;
        }
        let Some(log) = self.log else {
            return Ok(Logged::NoLog);
        };
        if log.checkpoint_owed.load(Ordering::Relaxed) {
            return Ok(Logged::Checkpoint(CheckpointCause::Owed));
        }
        let redo: &[u8] = self.redo.as_deref().map_or(&[], |redo| redo.as_slice());
        if redo.is_empty() {
            return Ok(Logged::Nothing);
        }
        match log.wal.append(redo) {
            Ok(()) => Ok(Logged::Appended),
            // Everything the log holds is in the open transaction with this batch: committing
            // and syncing LMDB makes all of it durable, and the log starts over.
            Err(WalError::Full) => Ok(Logged::Checkpoint(CheckpointCause::LogFull)),
            // Bigger than the whole log: commit and sync LMDB itself, as without a log.
            Err(WalError::TooLarge { .. }) => Ok(Logged::Checkpoint(CheckpointCause::TooLarge)),
            Err(error) => {
                log.wal.forget_failed_append();
                Err(StoreError::Log(error))
            }
        }
    }

    /// LMDB put, recorded in the redo list when the store has a log.
    fn put(&mut self, table: RedoTable, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        write(
            &mut *self.txn,
            &self.tables,
            self.redo.as_deref_mut(),
            table,
            key,
            Some(value),
        )
    }

    /// LMDB delete, recorded in the redo list when the store has a log.
    fn delete(&mut self, table: RedoTable, key: &[u8]) -> Result<(), StoreError> {
        write(
            &mut *self.txn,
            &self.tables,
            self.redo.as_deref_mut(),
            table,
            key,
            None,
        )
    }
}

/// Longest gray-release variant name [`Op::SetVariant`] stores (the configuration allows 64
/// characters of ASCII).
pub const MAX_VARIANT_BYTES: usize = 64;

fn check_text(field: &'static str, value: &str, max: usize) -> Result<(), Rejection> {
    if value.is_empty() {
        Err(Rejection::Empty { field })
    } else if value.len() > max {
        Err(Rejection::TooLong {
            field,
            len: value.len(),
            max,
        })
    } else {
        Ok(())
    }
}

fn decode_info(key: &[u8], bytes: &[u8]) -> Result<u64, StoreError> {
    keys::decode_u64_value(bytes).ok_or_else(|| corrupt("info", key, "not a u64"))
}

pub(crate) fn corrupt(table: &'static str, key: &[u8], detail: &str) -> StoreError {
    StoreError::Corrupt {
        table,
        key: key.to_vec(),
        detail: detail.to_owned(),
    }
}

/// Below this much free space an `EIO` from a write is taken for a full disk.
const DISK_FULL_BYTES: u64 = 1 << 20;

/// Bytes available to this process on the file system holding `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string and `stat` a valid, writable statvfs.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some(stat.f_bavail as u64 * stat.f_frsize as u64)
}

fn round_up_to_page(bytes: usize) -> usize {
    const PAGE: usize = 4096;
    bytes.max(PAGE).div_ceil(PAGE) * PAGE
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

#[cfg(test)]
impl ShardStore {
    /// A view of what LMDB has committed, without the overlay of acked batches it has not.
    pub(crate) fn read_committed(&self) -> Result<ReadView<'_>, StoreError> {
        open_view(&self.env, &self.gate, &self.tables, None)
    }

    /// Calls `hook` right after every checkpoint's LMDB sync (power-loss tests copy the data
    /// file there: it is what survives a power loss until the next checkpoint).
    pub(crate) fn set_checkpoint_hook(&mut self, hook: Box<dyn FnMut() + Send>) {
        if let Some(log) = &mut self.log {
            log.after_checkpoint = Some(hook);
        }
    }

    /// Bytes of records in the log now (0 without a log).
    pub(crate) fn log_used(&self) -> u64 {
        self.log.as_ref().map_or(0, |log| log.wal.used())
    }

    /// Checkpoints so far (log full), and batches too large for the log.
    pub(crate) fn checkpoints(&self) -> (u64, u64) {
        self.log.as_ref().map_or((0, 0), |log| {
            (log.checkpoints, log.checkpoints_for_large_batches)
        })
    }

    /// Commits whose pages were handed to writeback early.
    pub(crate) fn writes_behind(&self) -> u64 {
        self.log.as_ref().map_or(0, |log| log.writes_behind)
    }

    /// The inode of the file write-behind starts writing (LMDB's data file, if all is well).
    pub(crate) fn write_behind_inode(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        let log = self.log.as_ref()?;
        log.data_file.metadata().ok().map(|metadata| metadata.ino())
    }

    /// Writes raw bytes as a message record, bypassing every check (corruption tests).
    pub(crate) fn put_raw_message(
        &mut self,
        id: ConversationId,
        seq: u64,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        self.apply_pending()?;
        let mut txn = self.env.write_txn()?;
        self.tables
            .messages
            .put(&mut txn, &keys::message_key(id, seq), bytes)?;
        txn.commit()?;
        // Not in the log: a checkpoint makes it part of the snapshot a recovery goes back to.
        if let Some(log) = &mut self.log {
            log.restart()?;
        }
        Ok(())
    }
}

/// A read view: the resize gate's pass first, then the overlay's snapshot, then the LMDB read
/// transaction. The snapshot's writes apply on top of one LMDB snapshot (its `base`). If the read
/// transaction sees a later one, LMDB committed transaction `base + 1` meanwhile, which held every
/// write of the snapshot (the overlay is cleared at every commit, and a transaction abandoned
/// before it was replayed into it): the view reads LMDB alone, where the overlay could only
/// shadow newer values of the same keys.
fn open_view<'s>(
    env: &'s Env<WithoutTls>,
    gate: &'s ResizeGate,
    tables: &'s Tables,
    overlay: Option<&SharedOverlay>,
) -> Result<ReadView<'s>, StoreError> {
    let pass = gate.read();
    let snapshot = overlay.and_then(SharedOverlay::snapshot);
    let txn = env.read_txn()?;
    let snapshot = snapshot.filter(|pending| pending.base() == txn.id());
    Ok(ReadView::new(pass, snapshot, txn, tables))
}

/// A cloneable read-only handle on a shard store (see [`ShardStore::reader`]).
///
/// The shard's event loop reads through it (replay on resume, metadata
/// lookups) while the `ShardStore` itself sits on a blocking thread for a
/// group commit.
#[derive(Clone)]
pub struct StoreReader {
    env: Env<WithoutTls>,
    tables: Tables,
    gate: Arc<ResizeGate>,
    overlay: Arc<SharedOverlay>,
}

/// How big a shard's environment is (for `/metrics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreSize {
    /// Pages up to the last one written, in bytes: the part of the data file in use.
    pub used_bytes: u64,
    /// The memory map's size in bytes: how far the data file may grow before a resize.
    pub map_bytes: u64,
}

impl StoreReader {
    /// The environment's size now, from LMDB's environment info (no transaction).
    pub fn size(&self) -> StoreSize {
        let info = self.env.info();
        let page_size = self.env.unnamed_database_stat().page_size as u64;
        StoreSize {
            used_bytes: (info.last_page_number as u64 + 1) * page_size,
            map_bytes: info.map_size as u64,
        }
    }

    /// Opens a consistent read-only view (an LMDB read transaction). Waits for the few
    /// microseconds of a map resize if the writer is doing one.
    pub fn read(&self) -> Result<ReadView<'_>, StoreError> {
        open_view(&self.env, &self.gate, &self.tables, Some(&self.overlay))
    }
}
