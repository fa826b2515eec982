//! The snapshot file: one knowledge-base version as a deterministic byte string, the unit
//! that delta sync (`kb sync`, `POST /api/kb/sync`) compares, transfers and verifies.
//!
//! # Layout (integers little-endian)
//! ```text
//! "SBKBSNAP"                      8 bytes, magic
//! format        u32               SNAPSHOT_FORMAT
//! dim           u32               length of every question vector
//! fingerprint   u32 len + bytes   the model that embedded the vectors (UTF-8)
//! entry_count   u32
//! question_count u32
//! entries       u64 len + bytes   compact JSON array of the entries (serde, field order fixed)
//! vectors       u64 len + bytes   question_count × dim f32, row-major, as the replica stores them
//! classifier    u8 present, then u64 len + bytes when present
//! ```
//! Nothing else follows.
//!
//! Invariants:
//! - Same content, same bytes: the file holds what a replica stores for a version except the
//!   version number and its creation time, so two nodes holding the same knowledge base under
//!   different version numbers have byte-identical files and equal [`content_hash`]es.
//! - [`decode`] accepts exactly what [`encode`] writes: every length is checked against the
//!   bytes that remain and against the counts in the header, and trailing bytes are refused.
//!   The entries themselves are validated again when stored (`KbReplica::apply_stored_snapshot`).
//! - Entries come first, then vectors, then the classifier head: an edit of a few entries
//!   changes a few places in the entries and the rows of their questions; the rsync delta
//!   (see `kb::delta`) carries those and copies the rest, shifted or not.

use super::entry::{question_count, Entry};
use super::replica::{Snapshot, MAX_DIM, MAX_FINGERPRINT_BYTES};

/// The file's first bytes.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"SBKBSNAP";
/// The layout version written after the magic.
pub const SNAPSHOT_FORMAT: u32 = 1;

/// One knowledge-base version's content, decoded from (or to be encoded into) a snapshot file.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotContent {
    pub dim: usize,
    pub model_fingerprint: String,
    pub entries: Vec<Entry>,
    /// `question_count(entries) × dim` floats, row-major, unit length per row.
    pub vectors: Vec<f32>,
    pub classifier: Option<Vec<u8>>,
}

/// Why bytes are not a snapshot file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotFileError {
    #[error("not a knowledge-base snapshot (bad magic)")]
    BadMagic,
    #[error("snapshot format {found} is not supported (this build reads {supported})")]
    UnsupportedFormat { found: u32, supported: u32 },
    #[error("the snapshot ends inside its {field} ({needed} bytes needed, {left} left)")]
    Truncated {
        field: &'static str,
        needed: u64,
        left: usize,
    },
    #[error("the snapshot's {field} is invalid: {detail}")]
    Invalid { field: &'static str, detail: String },
    #[error("{0} bytes follow the end of the snapshot")]
    TrailingBytes(usize),
}

/// The snapshot file of the version a replica view holds.
pub fn encode_view(snapshot: &Snapshot<'_>) -> Vec<u8> {
    let entries: Vec<Entry> = snapshot.entries.iter().map(|e| e.to_entry()).collect();
    encode_parts(
        snapshot.info.dim as usize,
        &snapshot.info.model_fingerprint,
        &entries,
        &snapshot.vectors,
        snapshot.classifier,
    )
}

/// The snapshot file of `content`.
pub fn encode(content: &SnapshotContent) -> Vec<u8> {
    encode_parts(
        content.dim,
        &content.model_fingerprint,
        &content.entries,
        &content.vectors,
        content.classifier.as_deref(),
    )
}

fn encode_parts(
    dim: usize,
    model_fingerprint: &str,
    entries: &[Entry],
    vectors: &[f32],
    classifier: Option<&[u8]>,
) -> Vec<u8> {
    let entries_json = serde_json::to_vec(entries).expect("entries always serialise to JSON");
    let vector_bytes: &[u8] = bytemuck::cast_slice(vectors);
    let mut out = Vec::with_capacity(
        64 + model_fingerprint.len()
            + entries_json.len()
            + vector_bytes.len()
            + classifier.map_or(0, <[u8]>::len),
    );
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&SNAPSHOT_FORMAT.to_le_bytes());
    out.extend_from_slice(&(dim as u32).to_le_bytes());
    out.extend_from_slice(&(model_fingerprint.len() as u32).to_le_bytes());
    out.extend_from_slice(model_fingerprint.as_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.extend_from_slice(&(question_count(entries) as u32).to_le_bytes());
    out.extend_from_slice(&(entries_json.len() as u64).to_le_bytes());
    out.extend_from_slice(&entries_json);
    out.extend_from_slice(&(vector_bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(vector_bytes);
    match classifier {
        Some(bytes) => {
            out.push(1);
            out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        None => out.push(0),
    }
    out
}

/// The whole-file hash that sync verifies: BLAKE3, as 64 lowercase hex digits.
pub fn content_hash(file: &[u8]) -> String {
    blake3::hash(file).to_hex().to_string()
}

/// Reads a snapshot file back; see the module invariants.
pub fn decode(file: &[u8]) -> Result<SnapshotContent, SnapshotFileError> {
    let mut reader = Reader { rest: file };
    if reader.take("magic", SNAPSHOT_MAGIC.len() as u64)? != SNAPSHOT_MAGIC {
        return Err(SnapshotFileError::BadMagic);
    }
    let format = reader.u32("format")?;
    if format != SNAPSHOT_FORMAT {
        return Err(SnapshotFileError::UnsupportedFormat {
            found: format,
            supported: SNAPSHOT_FORMAT,
        });
    }
    let dim = reader.u32("dimension")? as usize;
    if dim == 0 || dim > MAX_DIM {
        return Err(invalid("dimension", format!("{dim} is not 1 to {MAX_DIM}")));
    }
    let fingerprint_len = reader.u32("fingerprint length")? as u64;
    if fingerprint_len as usize > MAX_FINGERPRINT_BYTES {
        return Err(invalid(
            "model fingerprint",
            format!("{fingerprint_len} bytes, more than {MAX_FINGERPRINT_BYTES}"),
        ));
    }
    let model_fingerprint = std::str::from_utf8(reader.take("model fingerprint", fingerprint_len)?)
        .map_err(|err| invalid("model fingerprint", err.to_string()))?
        .to_owned();
    let entry_count = reader.u32("entry count")? as usize;
    let questions = reader.u32("question count")? as usize;

    let entries_len = reader.u64("entries length")?;
    let entries: Vec<Entry> = serde_json::from_slice(reader.take("entries", entries_len)?)
        .map_err(|err| invalid("entries", err.to_string()))?;
    if entries.len() != entry_count || question_count(&entries) != questions {
        return Err(invalid(
            "entries",
            format!(
                "{} entries with {} questions, the header says {entry_count} with {questions}",
                entries.len(),
                question_count(&entries)
            ),
        ));
    }

    let vectors_len = reader.u64("vectors length")?;
    let expected = (questions as u64) * (dim as u64) * 4;
    if vectors_len != expected {
        return Err(invalid(
            "vectors",
            format!("{vectors_len} bytes, {questions} questions × {dim} floats need {expected}"),
        ));
    }
    let vectors = reader
        .take("vectors", vectors_len)?
        .chunks_exact(4)
        .map(|bytes| f32::from_le_bytes(bytes.try_into().expect("chunks of 4")))
        .collect();

    let classifier = match reader.take("classifier flag", 1)?[0] {
        0 => None,
        1 => {
            let len = reader.u64("classifier length")?;
            Some(reader.take("classifier", len)?.to_vec())
        }
        other => {
            return Err(invalid(
                "classifier flag",
                format!("{other} (expected 0 or 1)"),
            ))
        }
    };
    if !reader.rest.is_empty() {
        return Err(SnapshotFileError::TrailingBytes(reader.rest.len()));
    }
    Ok(SnapshotContent {
        dim,
        model_fingerprint,
        entries,
        vectors,
        classifier,
    })
}

fn invalid(field: &'static str, detail: impl Into<String>) -> SnapshotFileError {
    SnapshotFileError::Invalid {
        field,
        detail: detail.into(),
    }
}

/// A cursor over the file that never reads past its end.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, len: u64) -> Result<&'a [u8], SnapshotFileError> {
        if len > self.rest.len() as u64 {
            return Err(SnapshotFileError::Truncated {
                field,
                needed: len,
                left: self.rest.len(),
            });
        }
        let (taken, rest) = self.rest.split_at(len as usize);
        self.rest = rest;
        Ok(taken)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, SnapshotFileError> {
        let bytes = self.take(field, 4)?;
        Ok(u32::from_le_bytes(bytes.try_into().expect("4 bytes")))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, SnapshotFileError> {
        let bytes = self.take(field, 8)?;
        Ok(u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SnapshotContent {
        let entries = vec![
            Entry {
                id: "refund".into(),
                intent: "refunds".into(),
                questions: vec!["Where is my refund?".into(), "refund pending".into()],
                answer: "Refunds take 5 days.\nContact us if not.".into(),
                tags: vec!["money".into(), "ünïcode ✓".into()],
            },
            Entry {
                id: "hello".into(),
                intent: "hello".into(),
                questions: vec!["hi".into()],
                answer: "Hello!".into(),
                tags: vec![],
            },
        ];
        let dim = 4;
        let vectors = (0..3 * dim).map(|i| 0.5 - (i % 2) as f32).collect();
        SnapshotContent {
            dim,
            model_fingerprint: "test-model".into(),
            entries,
            vectors,
            classifier: Some(vec![1, 2, 3, 4, 5]),
        }
    }

    #[test]
    fn encode_then_decode_is_the_identity_and_deterministic() {
        let content = sample();
        let file = encode(&content);
        assert_eq!(&file[..8], SNAPSHOT_MAGIC);
        assert_eq!(decode(&file).unwrap(), content);
        assert_eq!(
            encode(&decode(&file).unwrap()),
            file,
            "same content, same bytes"
        );
        assert_eq!(content_hash(&file), content_hash(&encode(&content)));
        let without_head = SnapshotContent {
            classifier: None,
            ..content.clone()
        };
        assert_eq!(decode(&encode(&without_head)).unwrap(), without_head);
        assert_ne!(content_hash(&file), content_hash(&encode(&without_head)));
    }

    #[test]
    fn every_truncation_and_trailing_bytes_are_refused() {
        let file = encode(&sample());
        for len in 0..file.len() {
            assert!(
                decode(&file[..len]).is_err(),
                "accepted {len} of {}",
                file.len()
            );
        }
        let mut longer = file.clone();
        longer.push(0);
        assert_eq!(decode(&longer), Err(SnapshotFileError::TrailingBytes(1)));
    }

    #[test]
    fn damaged_headers_are_refused_with_the_field() {
        let file = encode(&sample());
        let mut bad = file.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad), Err(SnapshotFileError::BadMagic));
        let mut bad = file.clone();
        bad[8] = 9;
        assert!(matches!(
            decode(&bad),
            Err(SnapshotFileError::UnsupportedFormat { found: 9, .. })
        ));
        // The dimension disagrees with the vectors' length.
        let mut bad = file.clone();
        bad[12] = 5;
        assert!(matches!(
            decode(&bad),
            Err(SnapshotFileError::Invalid {
                field: "vectors",
                ..
            })
        ));
        // The entry count disagrees with the entries.
        let fingerprint_end = 20 + "test-model".len();
        let mut bad = file;
        bad[fingerprint_end] = 3;
        assert!(matches!(
            decode(&bad),
            Err(SnapshotFileError::Invalid {
                field: "entries",
                ..
            })
        ));
    }
}
