//! The byte format of the write-ahead log, sans-IO: encoding a record, and scanning a log
//! file's bytes for the records that were written whole.
//!
//! A log file is a 4 KiB header block, then records back to back:
//!
//! ```text
//! header (offset 0):  magic "SBWAL002" | generation u64 LE | saved length u32 LE | saved bytes
//!                     | crc32c of everything before, u32 LE
//!                     (saved: LMDB's meta pages at the checkpoint that began the generation,
//!                     see `meta_pages`; a "SBWAL001" header has no saved bytes and its crc
//!                     covers the 16 bytes of magic and generation)
//! record:             payload length u32 LE | crc32c u32 LE | generation u64 LE | payload
//!                     (the crc covers length, generation and payload)
//! ```
//!
//! Invariants:
//! - A record counts only if its generation is the file header's and its checksum holds.
//!   The first record that fails either (a torn write, zeros, a record of an earlier use
//!   of the file, flipped bits) ends the log: it and everything after it are never replayed.
//! - Encoding then scanning gives back exactly the payloads encoded, in order.

/// Bytes reserved for the file header; records start here.
pub const HEADER_BYTES: u64 = 4096;
/// Bytes of a record's header.
pub const RECORD_HEADER_BYTES: usize = 16;
const MAGIC: &[u8; 8] = b"SBWAL002";
/// The header of logs written before the meta pages were saved.
const MAGIC_V1: &[u8; 8] = b"SBWAL001";
/// The most bytes a header can save (the block less magic, generation, length and crc).
pub const MAX_SAVED_BYTES: usize = HEADER_BYTES as usize - 24;

/// A decoded header block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub generation: u64,
    /// LMDB's meta pages at the checkpoint that began this generation (empty: none saved).
    pub saved: Vec<u8>,
}

/// The header block of a log file with this generation, saving `saved` (at most
/// [`MAX_SAVED_BYTES`]).
pub fn encode_header(generation: u64, saved: &[u8]) -> Vec<u8> {
    assert!(
        saved.len() <= MAX_SAVED_BYTES,
        "the saved bytes fit the header"
    );
    let mut block = vec![0u8; HEADER_BYTES as usize];
    block[..8].copy_from_slice(MAGIC);
    block[8..16].copy_from_slice(&generation.to_le_bytes());
    block[16..20].copy_from_slice(&(saved.len() as u32).to_le_bytes());
    let end = 20 + saved.len();
    block[20..end].copy_from_slice(saved);
    let crc = crc32c::crc32c(&block[..end]);
    block[end..end + 4].copy_from_slice(&crc.to_le_bytes());
    block
}

/// The header in a header block, or `None` when the block is not a valid header.
pub fn decode_header(block: &[u8]) -> Option<Header> {
    let crc_at = |end: usize| -> Option<bool> {
        let crc = u32::from_le_bytes(block.get(end..end + 4)?.try_into().ok()?);
        Some(crc32c::crc32c(&block[..end]) == crc)
    };
    let magic = block.get(..8)?;
    let generation = u64::from_le_bytes(block.get(8..16)?.try_into().ok()?);
    if magic == MAGIC_V1 {
        return crc_at(16)?.then_some(Header {
            generation,
            saved: Vec::new(),
        });
    }
    if magic != MAGIC {
        return None;
    }
    let length = u32::from_le_bytes(block.get(16..20)?.try_into().ok()?) as usize;
    if length > MAX_SAVED_BYTES {
        return None;
    }
    crc_at(20 + length)?.then(|| Header {
        generation,
        saved: block[20..20 + length].to_vec(),
    })
}

/// Appends one record holding `payload` to `out`.
pub fn encode_record(generation: u64, payload: &[u8], out: &mut Vec<u8>) {
    let length = u32::try_from(payload.len()).expect("a log record is smaller than 4 GiB");
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(&checksum(length, generation, payload).to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(payload);
}

/// The encoded size of a record with a payload of `payload_bytes`.
pub fn record_bytes(payload_bytes: usize) -> u64 {
    (RECORD_HEADER_BYTES + payload_bytes) as u64
}

fn checksum(length: u32, generation: u64, payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&length.to_le_bytes());
    let crc = crc32c::crc32c_append(crc, &generation.to_le_bytes());
    crc32c::crc32c_append(crc, payload)
}

/// The whole records of `generation` in `records` (a log file's bytes from
/// [`HEADER_BYTES`] on), and where the valid part ends (relative to `records`).
pub fn scan(records: &[u8], generation: u64) -> (Vec<&[u8]>, usize) {
    let mut found = Vec::new();
    let mut at = 0usize;
    while let Some(header) = records.get(at..at + RECORD_HEADER_BYTES) {
        let length = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        let record_generation = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        if record_generation != generation {
            break;
        }
        let start = at + RECORD_HEADER_BYTES;
        let Some(payload) = start
            .checked_add(length as usize)
            .and_then(|end| records.get(start..end))
        else {
            break;
        };
        if checksum(length, generation, payload) != crc {
            break;
        }
        found.push(payload);
        at = start + payload.len();
    }
    (found, at)
}

/// How many whole records of `generation` lie in `records` after `from` (where [`scan`] stopped):
/// records written after one that never reached the disk, which are not replayed. The kernel
/// writes unsynced pages back in any order, so with `durability = "batch"` a power loss can
/// keep later records and lose an earlier one. Records are not aligned: every offset where the
/// generation appears is tried, and a record counts only if its checksum holds.
/// (`memchr::memmem` finds the candidates: a full 64 MiB log is searched in milliseconds at start-up.)
pub fn whole_records_after(records: &[u8], generation: u64, from: usize) -> usize {
    let pattern = generation.to_le_bytes();
    let finder = memchr::memmem::Finder::new(&pattern);
    let mut count = 0;
    // The generation sits 8 bytes into a record's header.
    let mut search_from = from.saturating_add(1).saturating_add(8);
    while let Some(found_at) = records
        .get(search_from..)
        .and_then(|rest| finder.find(rest))
    {
        let at = search_from + found_at - 8;
        let (found, valid) = scan(&records[at..], generation);
        count += found.len();
        search_from = at + valid.max(1) + 8;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_records_after_a_hole_are_counted_and_nothing_else() {
        let generation = 0x0102_0304_0506_0708;
        let mut log = Vec::new();
        encode_record(generation, b"first", &mut log);
        let second = log.len();
        encode_record(generation, b"second, lost", &mut log);
        let third = log.len();
        encode_record(generation, b"third", &mut log);
        encode_record(generation, b"fourth", &mut log);
        let end = log.len();
        encode_record(generation - 1, b"an older generation", &mut log);
        // A payload that holds the generation's bytes is not a record.
        let mut payload = generation.to_le_bytes().repeat(3);
        payload.extend_from_slice(b"not a record");
        encode_record(generation, &payload, &mut log);
        let bait = log.len() - payload.len() - RECORD_HEADER_BYTES;
        log[second..third].fill(0);
        log[bait..bait + 4].fill(0xff); // its own header is broken

        let (found, valid) = scan(&log, generation);
        assert_eq!(found, vec![b"first".as_slice()]);
        assert_eq!(valid, second);
        assert_eq!(whole_records_after(&log, generation, valid), 2);
        assert_eq!(whole_records_after(&log, generation, end), 0);
        assert_eq!(whole_records_after(&[], generation, 0), 0);
    }

    fn log_of(generation: u64, payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for payload in payloads {
            encode_record(generation, payload, &mut out);
        }
        out
    }

    #[test]
    fn records_round_trip_and_the_scan_stops_at_zeros() {
        let mut bytes = log_of(7, &[b"first", b"", b"third record"]);
        let end = bytes.len();
        bytes.extend_from_slice(&[0u8; 100]);
        let (records, valid) = scan(&bytes, 7);
        assert_eq!(records, vec![&b"first"[..], b"", b"third record"]);
        assert_eq!(valid, end);
    }

    #[test]
    fn records_of_another_generation_are_not_replayed() {
        let mut bytes = log_of(3, &[b"current"]);
        bytes.extend_from_slice(&log_of(2, &[b"left over from the file's last use"]));
        let (records, _) = scan(&bytes, 3);
        assert_eq!(records, vec![&b"current"[..]]);
        assert!(scan(&bytes, 4).0.is_empty());
    }

    /// Every cut of the last record, at every byte offset, loses that record and only it.
    #[test]
    fn a_torn_last_record_is_cut_at_every_offset() {
        let whole = log_of(1, &[b"kept one", b"kept two", b"the last record, torn"]);
        let last_starts = log_of(1, &[b"kept one", b"kept two"]).len();
        for cut in last_starts..whole.len() {
            let (records, valid) = scan(&whole[..cut], 1);
            assert_eq!(records, vec![&b"kept one"[..], b"kept two"], "cut at {cut}");
            assert_eq!(valid, last_starts, "cut at {cut}");
        }
        assert_eq!(scan(&whole, 1).0.len(), 3);
    }

    /// Flipping any bit of the last record (header or payload) makes the scan drop it.
    #[test]
    fn a_corrupt_last_record_is_dropped_at_every_byte() {
        let whole = log_of(9, &[b"kept", b"last record"]);
        let last_starts = log_of(9, &[b"kept"]).len();
        for at in last_starts..whole.len() {
            for bit in 0..8 {
                let mut bytes = whole.clone();
                bytes[at] ^= 1 << bit;
                let (records, valid) = scan(&bytes, 9);
                assert_eq!(records, vec![&b"kept"[..]], "byte {at} bit {bit}");
                assert_eq!(valid, last_starts);
            }
        }
    }

    #[test]
    fn headers_round_trip_and_reject_damage() {
        for saved in [&b""[..], b"the meta pages", &[5u8; MAX_SAVED_BYTES]] {
            let block = encode_header(42, saved);
            assert_eq!(block.len() as u64, HEADER_BYTES);
            let header = decode_header(&block).unwrap();
            assert_eq!((header.generation, &header.saved[..]), (42, saved));
            for at in 0..24 + saved.len() {
                let mut damaged = block.clone();
                damaged[at] ^= 0x10;
                assert_eq!(decode_header(&damaged), None, "byte {at}");
            }
        }
        assert_eq!(decode_header(&[0u8; 4096]), None);
    }

    /// A log written before the meta pages were saved still opens, with nothing saved.
    #[test]
    fn a_version_1_header_is_read() {
        let mut block = vec![0u8; HEADER_BYTES as usize];
        block[..8].copy_from_slice(MAGIC_V1);
        block[8..16].copy_from_slice(&7u64.to_le_bytes());
        let crc = crc32c::crc32c(&block[..16]);
        block[16..20].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            decode_header(&block),
            Some(Header {
                generation: 7,
                saved: Vec::new()
            })
        );
        block[9] ^= 1;
        assert_eq!(decode_header(&block), None);
    }
}
