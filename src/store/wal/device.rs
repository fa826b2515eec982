//! Where the write-ahead log's bytes live: a [`LogDevice`] is a fixed-size file written at
//! offsets and synced. [`FileDevice`] is the real one; [`SimulatedDisk`] (tests) keeps only
//! what was synced when the power goes, optionally with a torn prefix of the last write.
//!
//! Invariant: after `sync` returns, every byte written before it survives a power loss.
//!
//! The log is written with `pwrite` and (with `durability = "fsync"`) `fdatasync` on the
//! shard's blocking thread, where
//! the group commit already runs: the log record must be on disk before the LMDB
//! transaction that made it commits (so a failed log write leaves nothing stored and
//! nothing acked), and that transaction lives on the blocking thread. io_uring was measured
//! as the alternative (`shards/examples/log_sync.rs`, bench/README.md "Where the log's I/O
//! runs"): the kernel runs an io_uring `fdatasync` on a worker thread of its own, so it costs
//! as much CPU as the blocking thread's hand-off or more, with more context switches. The file is
//! zero-filled ahead of the records in steps of [`GROW_BYTES`] (up to its full size, and
//! kept at that size across restarts), so most appends overwrite allocated blocks and
//! `fdatasync` has no metadata to write: one sequential write and one device flush per
//! group commit. Growing in steps keeps a fresh store's start cheap (tests start hundreds).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A fixed-size file of the log.
pub trait LogDevice: Send {
    /// The whole file.
    fn read_all(&mut self) -> io::Result<Vec<u8>>;
    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()>;
    /// `fdatasync`: everything written so far survives a power loss once this returns.
    fn sync(&mut self) -> io::Result<()>;
    fn size(&self) -> u64;
    /// A duplicate descriptor of the file, to sync it from another thread; an error when the
    /// device is not a file.
    fn try_clone_file(&self) -> io::Result<File> {
        Err(io::Error::other(
            "the log's device cannot be synced from another thread",
        ))
    }
}

/// How far ahead of the records the file is zero-filled.
pub const GROW_BYTES: u64 = 1 << 20;

/// The log in a real file.
pub struct FileDevice {
    file: File,
    /// The log's size: appends may reach this far.
    size: u64,
    /// How far the file is written (zero-filled) now.
    filled: u64,
}

impl FileDevice {
    /// Opens (creating if needed) `path` as a log of `size` bytes (or the file's size, if it
    /// is larger), zero-filled to at least [`GROW_BYTES`] and synced with its directory.
    pub fn open(path: &Path, size: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let filled = file.metadata()?.len();
        let mut device = FileDevice {
            file,
            size: size.max(filled),
            filled,
        };
        if device.filled < GROW_BYTES.min(device.size) {
            device.fill_to(GROW_BYTES.min(device.size))?;
            device.file.sync_all()?;
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        Ok(device)
    }

    /// Writes zeros from the filled end up to `end`.
    fn fill_to(&mut self, end: u64) -> io::Result<()> {
        const CHUNK: usize = 1 << 20;
        let zeros = vec![0u8; CHUNK];
        while self.filled < end {
            let step = (end - self.filled).min(CHUNK as u64) as usize;
            self.file.write_all_at(&zeros[..step], self.filled)?;
            self.filled += step as u64;
        }
        Ok(())
    }
}

impl LogDevice for FileDevice {
    fn read_all(&mut self) -> io::Result<Vec<u8>> {
        let mut bytes = vec![0u8; self.filled as usize];
        self.file.read_exact_at(&mut bytes, 0)?;
        Ok(bytes)
    }

    fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let end = offset + bytes.len() as u64;
        if end > self.size {
            return Err(io::Error::other("write past the end of the log file"));
        }
        if end > self.filled {
            // Synced by the append's fdatasync, which covers the new file size too.
            self.fill_to((end + GROW_BYTES).min(self.size))?;
        }
        self.file.write_all_at(bytes, offset)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn try_clone_file(&self) -> io::Result<File> {
        self.file.try_clone()
    }
}

#[cfg(test)]
pub use simulated::SimulatedDisk;

#[cfg(test)]
mod simulated {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A log device in memory that models a power loss: what was synced survives, writes
    /// since the last sync are lost, except (optionally) a torn prefix of the last one.
    /// Clones share the same disk.
    #[derive(Clone)]
    pub struct SimulatedDisk {
        state: Arc<Mutex<DiskState>>,
    }

    struct DiskState {
        /// What the file holds as the running process sees it.
        current: Vec<u8>,
        /// What survives a power loss.
        durable: Vec<u8>,
        /// Writes since the last sync, oldest first.
        unsynced: Vec<(u64, Vec<u8>)>,
        /// Fail every write and sync from now on (a dying disk).
        failing: bool,
        /// The next sync fails and so does everything after it: the power went while the
        /// last write was on its way.
        lose_power_on_sync: bool,
    }

    impl SimulatedDisk {
        pub fn new(size: u64) -> Self {
            SimulatedDisk {
                state: Arc::new(Mutex::new(DiskState {
                    current: vec![0; size as usize],
                    durable: vec![0; size as usize],
                    unsynced: Vec::new(),
                    failing: false,
                    lose_power_on_sync: false,
                })),
            }
        }

        /// Drops every write since the last sync; with `torn = Some(n)`, the first `n` bytes
        /// of the last unsynced write reached the disk.
        pub fn power_loss(&self, torn: Option<usize>) {
            self.power_loss_keeping(&[], torn);
        }

        /// [`Self::power_loss`], except that the unsynced writes `keep` marks (by index, oldest
        /// first; the last one excepted, which `torn` decides) reached the disk whole: the
        /// kernel writes back dirty pages in any order before a sync.
        pub fn power_loss_keeping(&self, keep: &[bool], torn: Option<usize>) {
            let mut state = self.state.lock().unwrap();
            let mut after = state.durable.clone();
            let earlier = state.unsynced.len().saturating_sub(1);
            for ((offset, bytes), _) in state.unsynced[..earlier]
                .iter()
                .zip(keep)
                .filter(|(_, &kept)| kept)
            {
                let offset = *offset as usize;
                after[offset..offset + bytes.len()].copy_from_slice(bytes);
            }
            if let (Some(n), Some((offset, bytes))) = (torn, state.unsynced.last()) {
                let n = n.min(bytes.len());
                let offset = *offset as usize;
                after[offset..offset + n].copy_from_slice(&bytes[..n]);
            }
            state.current = after.clone();
            state.durable = after;
            state.unsynced.clear();
            state.failing = false;
            state.lose_power_on_sync = false;
        }

        /// The next sync fails (and every write and sync after it): the writes before it
        /// are on their way to the disk when the power goes (see [`Self::power_loss`]).
        pub fn lose_power_on_next_sync(&self) {
            self.state.lock().unwrap().lose_power_on_sync = true;
        }

        /// Makes every later write and sync fail, as a disk with an I/O error does.
        pub fn fail_from_now(&self) {
            self.state.lock().unwrap().failing = true;
        }

        /// How many writes were made since the last sync.
        pub fn unsynced_writes(&self) -> usize {
            self.state.lock().unwrap().unsynced.len()
        }

        /// Bytes written since the last sync, in the last unsynced write.
        pub fn last_unsynced_len(&self) -> Option<usize> {
            let state = self.state.lock().unwrap();
            state.unsynced.last().map(|(_, bytes)| bytes.len())
        }
    }

    impl LogDevice for SimulatedDisk {
        fn read_all(&mut self) -> io::Result<Vec<u8>> {
            Ok(self.state.lock().unwrap().current.clone())
        }

        fn write_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
            let mut state = self.state.lock().unwrap();
            if state.failing {
                return Err(io::Error::other("simulated I/O error"));
            }
            let start = offset as usize;
            let end = start + bytes.len();
            if end > state.current.len() {
                return Err(io::Error::other("write past the end of the log file"));
            }
            state.current[start..end].copy_from_slice(bytes);
            state.unsynced.push((offset, bytes.to_vec()));
            Ok(())
        }

        fn sync(&mut self) -> io::Result<()> {
            let mut state = self.state.lock().unwrap();
            if state.lose_power_on_sync {
                state.failing = true;
            }
            if state.failing {
                return Err(io::Error::other("simulated I/O error"));
            }
            state.durable = state.current.clone();
            state.unsynced.clear();
            Ok(())
        }

        fn size(&self) -> u64 {
            self.state.lock().unwrap().current.len() as u64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_log_is_zero_filled_ahead_of_its_writes_and_keeps_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.log");
        let mut device = FileDevice::open(&path, 8 * GROW_BYTES).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), GROW_BYTES);
        assert_eq!(device.size(), 8 * GROW_BYTES);
        let at = 3 * GROW_BYTES + 5;
        device.write_at(at, b"record").unwrap();
        device.sync().unwrap();
        let filled = std::fs::metadata(&path).unwrap().len();
        assert_eq!(filled, 4 * GROW_BYTES + 5 + 6);
        assert!(device.write_at(8 * GROW_BYTES - 1, b"xy").is_err());
        drop(device);
        let mut device = FileDevice::open(&path, GROW_BYTES).unwrap();
        assert_eq!(
            device.size(),
            filled,
            "a smaller configured size never shrinks the file"
        );
        let bytes = device.read_all().unwrap();
        assert_eq!(&bytes[at as usize..at as usize + 6], b"record");
        assert!(bytes[..at as usize].iter().all(|&b| b == 0));
    }
}
