//! The shard store's write-ahead log: with `durability = "fsync"`, a group commit is one
//! sequential append to this log plus one `fdatasync`, instead of LMDB's sync of every
//! B-tree page the batch touched (scattered writes, about 30 µs each on the reference disk).
//! With `durability = "batch"` the append is not synced ([`Wal::set_sync_appends`]); the
//! store's periodic flush syncs the log ([`Wal::sync`]), so a power loss keeps the records up
//! to the last flush (and possibly some after it: a prefix, cut at the first torn record).
//!
//! # How a group commit uses it (see `ShardStore::apply`)
//! 1. The batch runs in an LMDB write transaction, which records every put and delete as a
//!    redo list ([`redo`]).
//! 2. The redo list is appended to the log as one record and synced ([`Wal::append`]; with
//!    `batch`, synced by the next flush instead).
//! 3. The transaction commits with `MDB_NOSYNC` (LMDB does not sync), its pages are handed
//!    to the kernel's writeback without waiting for it (write-behind, see `shard_store`), and
//!    the batch is acked. If the commit fails, the record is taken back ([`Wal::undo_last`]).
//! 4. When the log is full, and every `shard_store::CHECKPOINT_COMMITS` commits (which bounds
//!    the pinned snapshot's cost), a checkpoint syncs LMDB (`mdb_env_sync`) and starts the log
//!    over with a new generation ([`Wal::reset`]); records of older generations are dead.
//!    The new header saves LMDB's meta pages as synced ([`meta_pages`]), and the store keeps
//!    that snapshot's pages from being reused until the next checkpoint.
//!
//! # Recovery ([`Wal::open`])
//! The saved meta pages are written back into LMDB's data file before LMDB opens (a power
//! loss may have let newer meta pages reach the disk ahead of the pages they point to), which
//! takes LMDB to the checkpoint's snapshot. The records of the header's generation, up to the
//! first that fails its checksum (a torn or corrupt tail is cut there, never replayed), are
//! replayed into LMDB in one transaction; replay is idempotent ([`redo`]), so records that
//! had reached LMDB are harmless. Then LMDB is synced and the log reset.
//!
//! Invariants:
//! - With `fsync`, a batch is acked only after its record is synced: after a power loss, every
//!   acked message is in LMDB's last synced state or in a whole record of the log. With
//!   `batch`, that holds for every batch acked before the last [`Wal::sync`].
//! - The log never holds a record of a batch LMDB refused: a failed commit zeroes the record
//!   it just appended before the next append.
//! - Records of a generation are contiguous from [`record::HEADER_BYTES`]; the header's
//!   generation changes only after LMDB was synced.

pub mod device;
pub mod meta_pages;
pub mod record;
pub mod redo;

use std::io;

use thiserror::Error;

pub use device::{FileDevice, LogDevice};

/// Why the log could not be used.
#[derive(Debug, Error)]
pub enum WalError {
    #[error("write-ahead log I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The record does not fit in what is left of the log: checkpoint, then append again.
    #[error("the write-ahead log is full")]
    Full,
    /// The record does not fit even in an empty log (`[storage] log_bytes` is too small for
    /// this batch): the batch has to be synced into LMDB directly.
    #[error("a record of {bytes} bytes does not fit in a write-ahead log of {capacity} bytes")]
    TooLarge { bytes: u64, capacity: u64 },
}

/// An open log: where the next record goes, and the generation it carries.
pub struct Wal {
    device: Box<dyn LogDevice>,
    generation: u64,
    /// Offset of the next record.
    end: u64,
    /// Offset of the last record appended (for [`Wal::undo_last`]).
    last: Option<u64>,
    /// Reused buffer for encoding a record.
    buffer: Vec<u8>,
    /// Whether [`Wal::append`] syncs (`durability = "fsync"`; the default).
    sync_appends: bool,
}

/// What [`Wal::open`] found: the payloads of the whole records, oldest first.
pub struct Recovered {
    pub payloads: Vec<Vec<u8>>,
    /// Bytes after the last whole record that were not zeros (a torn or corrupt tail).
    pub cut_tail: bool,
    /// Whole records of the generation after the first missing or torn one: not replayed
    /// (`record::whole_records_after`; with `durability = "batch"`, batches acked after the
    /// last flush whose record reached the disk when an earlier one did not).
    pub records_after_hole: usize,
    /// LMDB's meta pages saved at the checkpoint that began the log's generation
    /// ([`meta_pages`]; empty when none were saved).
    pub saved_meta_pages: Vec<u8>,
}

impl Wal {
    /// Reads the log on `device` and returns it with the records to replay. Appending is
    /// refused until [`Wal::reset`] is called: the caller replays, syncs LMDB, then resets.
    pub fn open(mut device: Box<dyn LogDevice>) -> Result<(Wal, Recovered), WalError> {
        let bytes = device.read_all()?;
        let header_end = (record::HEADER_BYTES as usize).min(bytes.len());
        let (generation, saved, payloads, cut_tail, records_after_hole) =
            match record::decode_header(&bytes[..header_end]) {
                Some(record::Header { generation, saved }) => {
                    let records = &bytes[header_end..];
                    let (payloads, valid) = record::scan(records, generation);
                    let tail = &records[valid..];
                    let cut_tail = tail
                        .get(..record::RECORD_HEADER_BYTES)
                        .is_some_and(|head| head.iter().any(|&b| b != 0));
                    (
                        generation,
                        saved,
                        payloads.into_iter().map(<[u8]>::to_vec).collect(),
                        cut_tail,
                        record::whole_records_after(records, generation, valid),
                    )
                }
                // A new (zero) file, or a header torn while a checkpoint rewrote it; a
                // checkpoint writes the header only after LMDB was synced, so no record of
                // the previous generation is needed.
                None => (
                    0,
                    Vec::new(),
                    Vec::new(),
                    bytes[..header_end].iter().any(|&b| b != 0),
                    0,
                ),
            };
        let wal = Wal {
            device,
            generation,
            end: u64::MAX,
            last: None,
            buffer: Vec::new(),
            sync_appends: true,
        };
        Ok((
            wal,
            Recovered {
                payloads,
                cut_tail,
                records_after_hole,
                saved_meta_pages: saved,
            },
        ))
    }

    /// Starts the log over, empty, with the next generation, saving nothing in the header.
    /// Call only when everything the log holds is in LMDB's synced state.
    pub fn reset(&mut self) -> Result<(), WalError> {
        self.reset_saving(&[])
    }

    /// [`Wal::reset`], saving `meta_pages` (LMDB's, as just synced: [`meta_pages::read`]) in
    /// the header; a recovery writes them back before LMDB opens.
    pub fn reset_saving(&mut self, meta_pages: &[u8]) -> Result<(), WalError> {
        let saved = if meta_pages.len() <= record::MAX_SAVED_BYTES {
            meta_pages
        } else {
            &[]
        };
        let generation = self.generation + 1;
        self.device
            .write_at(0, &record::encode_header(generation, saved))?;
        self.device.sync()?;
        self.generation = generation;
        self.end = record::HEADER_BYTES;
        self.last = None;
        Ok(())
    }

    /// Whether [`Wal::append`] syncs each record (the default). Without, records survive a
    /// process crash at once (they are in the page cache) and a power loss after the next
    /// [`Wal::sync`].
    pub fn set_sync_appends(&mut self, sync: bool) {
        self.sync_appends = sync;
    }

    /// `fdatasync` of the log: every record appended so far survives a power loss.
    pub fn sync(&mut self) -> Result<(), WalError> {
        self.device.sync().map_err(WalError::Io)
    }

    /// A duplicate of the log file's descriptor, for syncing it from another thread
    /// (`store::flusher`); an error for a device that is not a file (tests).
    pub fn file(&self) -> io::Result<std::fs::File> {
        self.device.try_clone_file()
    }

    /// Appends `payload` as one record and syncs it (unless [`Wal::set_sync_appends`] turned
    /// that off): when this returns `Ok`, the record survives a power loss.
    pub fn append(&mut self, payload: &[u8]) -> Result<(), WalError> {
        let bytes = record::record_bytes(payload.len());
        let capacity = self.device.size().saturating_sub(record::HEADER_BYTES);
        if bytes > capacity {
            return Err(WalError::TooLarge { bytes, capacity });
        }
        if self.end.saturating_add(bytes) > self.device.size() {
            return Err(WalError::Full);
        }
        self.buffer.clear();
        record::encode_record(self.generation, payload, &mut self.buffer);
        self.device.write_at(self.end, &self.buffer)?;
        if self.sync_appends {
            self.device.sync()?;
        }
        self.last = Some(self.end);
        self.end += bytes;
        if self.buffer.capacity() > BUFFER_KEEP_BYTES {
            self.buffer = Vec::new();
        }
        Ok(())
    }

    /// Takes back the record [`Wal::append`] just wrote (its batch did not commit): zeroes
    /// its header, syncs, and appends the next record in its place.
    pub fn undo_last(&mut self) -> Result<(), WalError> {
        if let Some(at) = self.last.take() {
            self.device
                .write_at(at, &[0u8; record::RECORD_HEADER_BYTES])?;
            self.device.sync()?;
            self.end = at;
        }
        Ok(())
    }

    /// After an append failed: best effort to make sure its bytes, if any reached the disk,
    /// are never taken for a record (the next append overwrites them anyway).
    pub fn forget_failed_append(&mut self) {
        if self.end != u64::MAX
            && self
                .device
                .write_at(self.end, &[0u8; record::RECORD_HEADER_BYTES])
                .is_ok()
        {
            let _ = self.device.sync();
        }
    }

    /// Bytes of records in the log now.
    pub fn used(&self) -> u64 {
        self.end.saturating_sub(record::HEADER_BYTES)
    }

    /// The log file's size.
    pub fn size(&self) -> u64 {
        self.device.size()
    }
}

/// The encoding buffer is released after a record larger than this.
const BUFFER_KEEP_BYTES: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::device::SimulatedDisk;
    use super::*;

    fn reopen(disk: &SimulatedDisk) -> (Wal, Recovered) {
        Wal::open(Box::new(disk.clone())).unwrap()
    }

    #[test]
    fn synced_records_survive_a_power_loss_and_unsynced_ones_do_not() {
        let disk = SimulatedDisk::new(64 * 1024);
        let (mut wal, recovered) = reopen(&disk);
        assert!(recovered.payloads.is_empty());
        wal.reset().unwrap();
        wal.append(b"one").unwrap();
        wal.append(b"two").unwrap();
        disk.power_loss(None);
        let (mut wal, recovered) = reopen(&disk);
        assert_eq!(recovered.payloads, vec![b"one".to_vec(), b"two".to_vec()]);
        assert!(!recovered.cut_tail);
        // After the replay the caller resets: the old records are dead.
        wal.reset().unwrap();
        wal.append(b"three").unwrap();
        let (_, recovered) = reopen(&disk);
        assert_eq!(recovered.payloads, vec![b"three".to_vec()]);
    }

    /// A power loss in the middle of an append, at every length of the torn write: the
    /// record is whole (it was synced: impossible here) or gone, never half replayed.
    #[test]
    fn a_torn_append_is_cut_at_every_length() {
        let disk = SimulatedDisk::new(64 * 1024);
        let (mut wal, _) = reopen(&disk);
        wal.reset().unwrap();
        wal.append(b"acked before the crash").unwrap();
        let record_len = record::record_bytes(b"in flight at the crash".len()) as usize;
        for torn in 0..=record_len {
            let mut on_disk = disk.clone();
            // Write the record without syncing, as a crash between write and fdatasync.
            let mut buffer = Vec::new();
            record::encode_record(wal.generation, b"in flight at the crash", &mut buffer);
            on_disk.write_at(wal.end, &buffer).unwrap();
            disk.power_loss(Some(torn));
            let (_, recovered) = reopen(&disk);
            let expected: Vec<Vec<u8>> = if torn == record_len {
                // Every byte reached the disk: a whole record, never acked, replayed
                // (the same as a commit whose ack was lost).
                vec![
                    b"acked before the crash".to_vec(),
                    b"in flight at the crash".to_vec(),
                ]
            } else {
                vec![b"acked before the crash".to_vec()]
            };
            assert_eq!(recovered.payloads, expected, "torn at {torn}");
            assert_eq!(
                recovered.cut_tail,
                torn > 0 && torn < record_len,
                "torn at {torn}"
            );
            // Undo the torn bytes for the next round.
            on_disk.write_at(wal.end, &vec![0; record_len]).unwrap();
            on_disk.sync().unwrap();
        }
    }

    /// Without a sync per append (`durability = "batch"`) the disk may keep a later record and
    /// lose an earlier one: the log replays up to the hole and counts what it dropped after it.
    #[test]
    fn records_after_a_lost_one_are_not_replayed_but_counted() {
        let disk = SimulatedDisk::new(64 * 1024);
        let (mut wal, _) = reopen(&disk);
        wal.reset().unwrap();
        wal.set_sync_appends(false);
        wal.append(b"flushed").unwrap();
        wal.sync().unwrap();
        wal.append(b"lost").unwrap();
        wal.append(b"reached the disk").unwrap();
        wal.append(b"last, torn").unwrap();
        disk.power_loss_keeping(&[false, true], Some(3));
        let (_, recovered) = reopen(&disk);
        assert_eq!(recovered.payloads, vec![b"flushed".to_vec()]);
        assert_eq!(recovered.records_after_hole, 1);
        assert!(!recovered.cut_tail, "the hole is zeros");
    }

    #[test]
    fn a_full_log_asks_for_a_checkpoint_and_a_huge_record_is_refused() {
        let disk = SimulatedDisk::new(record::HEADER_BYTES + 100);
        let (mut wal, _) = reopen(&disk);
        wal.reset().unwrap();
        wal.append(&[1; 50]).unwrap();
        assert!(matches!(wal.append(&[2; 50]), Err(WalError::Full)));
        assert!(matches!(
            wal.append(&[3; 200]),
            Err(WalError::TooLarge { .. })
        ));
        wal.reset().unwrap();
        wal.append(&[2; 50]).unwrap();
        let (_, recovered) = reopen(&disk);
        assert_eq!(recovered.payloads, vec![vec![2; 50]]);
    }

    #[test]
    fn an_undone_record_is_not_replayed_and_its_place_is_reused() {
        let disk = SimulatedDisk::new(64 * 1024);
        let (mut wal, _) = reopen(&disk);
        wal.reset().unwrap();
        wal.append(b"kept").unwrap();
        wal.append(b"its commit failed").unwrap();
        wal.undo_last().unwrap();
        disk.power_loss(None);
        let (_, recovered) = reopen(&disk);
        assert_eq!(recovered.payloads, vec![b"kept".to_vec()]);
        wal.append(b"next").unwrap();
        let (_, recovered) = reopen(&disk);
        assert_eq!(recovered.payloads, vec![b"kept".to_vec(), b"next".to_vec()]);
    }

    #[test]
    fn a_failing_disk_is_an_error_and_the_record_is_not_counted() {
        let disk = SimulatedDisk::new(64 * 1024);
        let (mut wal, _) = reopen(&disk);
        wal.reset().unwrap();
        wal.append(b"kept").unwrap();
        disk.fail_from_now();
        assert!(matches!(wal.append(b"lost"), Err(WalError::Io(_))));
        disk.power_loss(None);
        let (_, recovered) = reopen(&disk);
        assert_eq!(recovered.payloads, vec![b"kept".to_vec()]);
    }
}
