//! Durable per-shard storage of conversations: one LMDB environment (heed) per shard,
//! messages as rkyv-archived records read in place, group commit, dedup and resume.
//!
//! # Layout
//! `dir/shard-<n>/` holds shard `n`'s environment (`data.mdb`, `lock.mdb`) with tables:
//! - `messages`: big-endian `(conversation, seq)` -> archived [`MessageRecord`]; a range
//!   scan replays a conversation in order ([`ReadView::messages_after`]).
//! - (no dedup table) a re-sent message is recognised from the client id in the stored
//!   records of the conversation's newest [`recent_ids::WINDOW`] messages, through an
//!   in-memory window per recently written conversation ([`recent_ids`]), and gets its
//!   ORIGINAL seq back instead of being stored twice.
//! - `conversations`: conversation -> archived [`Conversation`] (state, last seq, read
//!   watermarks, failed bot turns, timestamps).
//! - `open`: the conversations that are not closed (rebuilds queues after a restart).
//! - `visitors`: `(site, visitor id)` -> the visitor's open conversation (resume).
//! - `visitor_secrets`: `(site, visitor id)` -> SHA-256 of the visitor's secret, written
//!   with the visitor's first conversation; reconnecting to the id requires the secret
//!   (see `conversation::identity`). Only the hash is stored.
//! - `variants`: conversation -> the name of the gray-release variant (`[[bot.variants]]`)
//!   that serves it, written at its first bot turn and never changed after
//!   ([`Op::SetVariant`]; see `bot::gray`).
//! - `info`: layout version, shard index, conversation id counter.
//!
//! Conversation ids carry their owning shard ([`ConversationId::shard`]); a store only
//! accepts operations on its own shard's conversations.
//!
//! # Writing
//! [`ShardStore::apply`] runs a batch of [`Op`]s in ONE write transaction (group commit);
//! [`ShardStore::append_batch`] is the message-only form. Seqs are dense from 1 per
//! conversation, also with several messages of one conversation in a batch. An op refused
//! for its input gets a `Rejected` outcome and writes nothing; the rest commits. `Err`
//! (LMDB/I/O failure, [`StoreError::MapFull`], corruption) means nothing was stored.
//!
//! # Durability (`[storage] durability`)
//! | mode | LMDB flags | cost per commit | process crash (kill -9) | machine crash / power loss |
//! |------|-----------|-----------------|--------------------------|----------------------------|
//! | `fsync` (log, the default) | `MDB_NOSYNC` | one append to the shard's write-ahead log and one fdatasync ([`wal`]); LMDB is synced at checkpoints | nothing lost | nothing acked is lost: replayed from the log at start-up |
//! | `fsync` with `log_bytes = 0` | none | 2 fdatasyncs (data, then meta page) | nothing lost | nothing acked is lost |
//! | `batch` (log) | `MDB_NOSYNC` | one append to the write-ahead log, not synced; a [`Flusher`] on a timer thread syncs the log every `sync_interval` | nothing lost | batches acked since the last flush may be lost, always the newest (the log replays a prefix) |
//! | `batch` with `log_bytes = 0` | `MDB_NOSYNC` | none; the [`Flusher`] syncs LMDB's data file | nothing lost | commits since the last flush may be lost; LMDB warns that without the sync ordering the file can even be damaged |
//! | `none` | `MDB_NOSYNC`, `MDB_NOMETASYNC` | none; no periodic flush | nothing lost | whatever the kernel had not written back (up to ~30 s by default) may be lost or damaged |
//!
//! A process crash loses nothing committed in any mode, because a commit has written the
//! pages into the OS page cache with `pwrite` before returning. Only `fsync` makes "ack
//! after commit" hold across a power loss; group commit is what makes it affordable: the
//! sync of a transaction is shared by every message in the batch.
//!
//! Without the log, what an `fsync` commit costs is mostly the number of scattered pages it
//! dirties (~30 us each in fdatasync on the reference disk, ~5 us when sequential): one
//! B-tree leaf per conversation touched, which is why re-sends are recognised from the
//! records instead of a dedup table ([`recent_ids`]). With the log, a commit syncs one
//! sequential record instead, and LMDB's scattered pages are synced once per checkpoint
//! (when the log is full, or after `CHECKPOINT_COMMITS` commits), however many commits touched
//! them; each commit hands its pages to writeback early (write-behind), so the checkpoint's
//! sync has little left to write. `examples/store_bench.rs`
//! measures both. A commit blocks its thread for its sync: keep the store off the shard's
//! reactor thread (it is `Send`), and let the messages that arrive during one commit form
//! the next batch.
//!
//! Power-loss safety of the log depends on LMDB's last synced state surviving the loss. Under
//! `MDB_NOSYNC` the kernel may write a newer meta page back before the pages it points to
//! (ext4 keeps no order between them), so each checkpoint saves LMDB's meta pages in the
//! log's header and pins that snapshot with a read transaction until the next checkpoint;
//! at the next open the saved meta pages are written back before LMDB opens, which takes it
//! to that intact snapshot, and the log replays the rest ([`wal::meta_pages`]). The pin keeps
//! every page copied since from being reused, so a checkpoint also comes every
//! [`CHECKPOINT_COMMITS`] commits. `power_loss_tests` take the data file back to the last
//! sync, keep every commit, or mix pages of both under the newest meta pages.
//!
//! A clean shutdown (drop) checkpoints a store with a log, and syncs a `batch` or `none`
//! store without one.
//!
//! # Deferred apply (`[storage] apply_interval`, with the log)
//! Once a batch's record is synced in the log the batch is acked, and its LMDB writes stay in
//! the open write transaction, which the batches after it continue; LMDB commits it at the end
//! of the first batch `apply_interval` after it began, when it holds
//! `MAX_PENDING_REDO_BYTES` of writes, at a checkpoint, or when the driver calls
//! [`ShardStore::apply_pending`] (a transaction an interval old with no batch in progress,
//! shutdown). A B-tree page the messages touch is then copied and written once per interval
//! instead of once per batch. Readers see the acked writes LMDB has not committed through the
//! `overlay` every [`ReadView`] reads through. A batch that fails abandons the transaction; the
//! next one replays the acked batches' writes (from the overlay: each key's last write) before
//! its own. After a crash the log replays them, as it replays everything since the last
//! checkpoint. The transaction stays on the
//! thread that began it (LMDB's writer lock is that thread's): the driver applies every batch
//! on the shard's one blocking-pool thread. `deferred_tests` and the `Deferred` power-loss and
//! kill -9 runs check it.
//!
//! # Reading
//! [`ShardStore::read`] opens a [`ReadView`] (one LMDB read transaction): a consistent
//! snapshot whose message records are validated with bytecheck and then borrowed straight
//! from the memory map (no copy). Validation costs ~50-80 ns per 150-byte record (replay
//! runs at ~10 M messages/s per core with it), small next to sending the message, and turns
//! a damaged file into [`StoreError::Corrupt`] instead of undefined behaviour; so there is
//! no unchecked path. LMDB only aligns values to 2 bytes, so the records use
//! rkyv's `unaligned` format (enforced at compile time in `records.rs`). Keep views short
//! and never hold one across an `await`: a live view pins old pages and the file grows.
//!
//! # Sizing
//! `map_size` is the size the memory map starts at (address space, not memory). A batch
//! that does not fit is aborted, the map doubles (up to `max_map_size`) and the batch runs
//! again, so a full map is transparent below the ceiling. The writer is the only one that
//! resizes, between transactions, behind a gate every read view holds (`resize_gate`):
//! LMDB forbids a remap while any transaction of the env is live in the process. At the
//! ceiling the batch fails with [`StoreError::MapFull`]; a full disk fails it with
//! [`StoreError::DiskFull`]. Either way nothing of it is stored, the store stays usable
//! (reads go on), and the driver refuses writes for a while ([`WriteBackoff`]) before
//! trying again. Reader slots: [`MAX_READERS`]; tables: [`MAX_DBS`].

mod batch;
mod error;
mod flusher;
mod keys;
mod layout;
mod options;
mod overlay;
mod read;
pub mod recent_ids;
mod records;
mod resize_gate;
mod shard_store;
pub mod wal;
mod write_backoff;

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod deferred_tests;
#[cfg(test)]
mod full_tests;
#[cfg(test)]
mod power_loss_tests;
#[cfg(test)]
mod tests;

pub use batch::{AppendOutcome, NewMessage, Op, OpOutcome, ReadSide};
pub use error::{Rejection, StoreError};
pub use flusher::Flusher;
pub use keys::{MAX_CLIENT_ID_BYTES, MAX_SITE_BYTES, MAX_VISITOR_BYTES};
pub use layout::{check_shard_layout, LayoutError};
pub use options::{Durability, StoreOptions, DEFAULT_LOG_BYTES, DEFAULT_MAP_SIZE};
pub use read::{ConversationIter, MessageIter, ReadView};
pub use records::{
    ArchivedAuthor, ArchivedMessageRecord, Author, Conversation, ConversationId, ConversationMap,
    ConversationState, MessageRecord, MAX_SHARDS,
};
pub use shard_store::{
    ShardStore, StoreReader, StoreSize, CHECKPOINT_COMMITS, FORMAT_VERSION, MAX_DBS, MAX_READERS,
    MAX_VARIANT_BYTES,
};
pub use write_backoff::WriteBackoff;
