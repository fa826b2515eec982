//! LMDB's two meta pages, saved in the write-ahead log's header at each checkpoint and
//! written back before LMDB is opened again.
//!
//! Why: with the log, LMDB commits with `MDB_NOSYNC`. A commit writes its new B-tree pages
//! and then a meta page pointing at them, and the kernel may write those back in any order.
//! After a power loss the data file can hold a meta page newer than some of the pages it
//! points to: a corrupt tree that no replay could repair. So the store keeps the snapshot
//! of its last checkpoint intact and can always go back to it:
//! - at a checkpoint, after LMDB's sync, the first [`SAVED_BYTES`] of pages 0 and 1 (the
//!   meta pages; LMDB's `MDB_meta` is 136 bytes after a 16-byte page header) are read from
//!   the data file and saved in the log's header with the new generation;
//! - a read transaction stays open on that snapshot until the next checkpoint, so LMDB
//!   never reuses (overwrites) a page of it;
//! - at the next open, the saved meta pages are written back first, which takes LMDB to
//!   the checkpoint's snapshot whatever else reached the disk, and the log's records are
//!   replayed on top of it.
//!
//! Invariants:
//! - What [`read`] returns is [`encode`]d page by page (offset, length, bytes) and restores
//!   exactly those bytes; anything else is refused by [`decode`] and never written.
//! - A page whose bytes do not start with LMDB's meta magic is not saved: nothing is restored
//!   rather than something that is not a meta page.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Bytes saved of each meta page (LMDB writes only the first 152).
pub const SAVED_BYTES: usize = 256;
/// `MDB_MAGIC`, the first field of `MDB_meta`, after the 16-byte page header.
const MDB_MAGIC: u32 = 0xBEEF_C0DE;
const PAGE_HEADER_BYTES: usize = 16;

/// The system page size, which is LMDB's page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

/// The saved form of the meta pages of the data file `file` (LMDB pages of `page_size`),
/// or an empty vector when the file does not hold two meta pages.
pub fn read(file: &File, page_size: u64) -> io::Result<Vec<u8>> {
    let mut pages = Vec::new();
    for page in 0..2u64 {
        let mut bytes = vec![0u8; SAVED_BYTES];
        let offset = page * page_size;
        if file.read_exact_at(&mut bytes, offset).is_err() || !is_meta_page(&bytes) {
            return Ok(Vec::new());
        }
        pages.push((offset, bytes));
    }
    Ok(encode(&pages))
}

fn is_meta_page(bytes: &[u8]) -> bool {
    bytes
        .get(PAGE_HEADER_BYTES..PAGE_HEADER_BYTES + 4)
        .is_some_and(|magic| u32::from_le_bytes(magic.try_into().expect("4 bytes")) == MDB_MAGIC)
}

/// `(offset, bytes)` pages as `offset u64 LE | length u16 LE | bytes`, one after another.
pub fn encode(pages: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (offset, bytes) in pages {
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

/// The pages of [`encode`]'s form, or `None` if `saved` is not exactly that.
pub fn decode(saved: &[u8]) -> Option<Vec<(u64, Vec<u8>)>> {
    let mut pages = Vec::new();
    let mut rest = saved;
    while !rest.is_empty() {
        let offset = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
        let length = u16::from_le_bytes(rest.get(8..10)?.try_into().ok()?) as usize;
        let bytes = rest.get(10..10 + length)?;
        if !is_meta_page(bytes) {
            return None;
        }
        pages.push((offset, bytes.to_vec()));
        rest = &rest[10 + length..];
    }
    Some(pages)
}

/// Writes the saved meta pages back into the data file at `path` and syncs it. Returns
/// whether anything was written (nothing when `saved` is empty or the file does not exist).
pub fn restore(path: &Path, saved: &[u8]) -> io::Result<bool> {
    if saved.is_empty() {
        return Ok(false);
    }
    let pages = decode(saved).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "the log header's saved LMDB meta pages are malformed",
        )
    })?;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(error) => return Err(error),
    };
    let mut changed = false;
    for (offset, bytes) in &pages {
        let mut current = vec![0u8; bytes.len()];
        if file.read_exact_at(&mut current, *offset).is_err() || current != *bytes {
            file.write_all_at(bytes, *offset)?;
            changed = true;
        }
    }
    if changed {
        file.sync_all()?;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta_page(fill: u8) -> Vec<u8> {
        let mut page = vec![fill; SAVED_BYTES];
        page[PAGE_HEADER_BYTES..PAGE_HEADER_BYTES + 4].copy_from_slice(&MDB_MAGIC.to_le_bytes());
        page
    }

    #[test]
    fn saved_pages_round_trip_and_damage_is_refused() {
        let pages = vec![(0, meta_page(1)), (4096, meta_page(2))];
        let saved = encode(&pages);
        assert_eq!(decode(&saved), Some(pages));
        // Cut anywhere but at a page boundary: refused.
        for cut in 1..saved.len() {
            if cut != 10 + SAVED_BYTES {
                assert_eq!(decode(&saved[..cut]), None, "cut at {cut}");
            }
        }
        // A page that is not a meta page: refused.
        let mut bad = saved.clone();
        bad[10 + PAGE_HEADER_BYTES] ^= 1;
        assert_eq!(decode(&bad), None);
    }

    #[test]
    fn restore_writes_back_only_what_differs_and_needs_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.mdb");
        let mut file_bytes = vec![7u8; 3 * 4096];
        file_bytes[..SAVED_BYTES].copy_from_slice(&meta_page(1));
        file_bytes[4096..4096 + SAVED_BYTES].copy_from_slice(&meta_page(2));
        std::fs::write(&path, &file_bytes).unwrap();
        let saved = read(&File::open(&path).unwrap(), 4096).unwrap();
        assert!(!saved.is_empty());
        assert!(!restore(&path, &saved).unwrap(), "nothing differs");

        // Newer meta pages reached the disk: they are taken back, and nothing else changes.
        let mut newer = file_bytes.clone();
        newer[..SAVED_BYTES].copy_from_slice(&meta_page(9));
        newer[4096 + 100] = 0;
        newer[2 * 4096 + 5] = 1;
        std::fs::write(&path, &newer).unwrap();
        assert!(restore(&path, &saved).unwrap());
        let after = std::fs::read(&path).unwrap();
        assert_eq!(
            after[..4096 + SAVED_BYTES],
            file_bytes[..4096 + SAVED_BYTES]
        );
        assert_eq!(after[2 * 4096 + 5], 1, "a data page is not touched");

        assert!(!restore(&dir.path().join("missing.mdb"), &saved).unwrap());
        assert!(restore(&path, b"junk").is_err());
        // A file without meta pages is not saved.
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        assert!(read(&File::open(&path).unwrap(), 4096).unwrap().is_empty());
    }
}
