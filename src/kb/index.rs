//! The per-shard query index over one version of the knowledge base: exact cosine
//! scoring of an embedded query against every question vector (best question per
//! entry), and a BM25 lexical matcher over the question texts for degraded mode.
//!
//! Invariants:
//! - A [`KbIndex`] is one replica version, frozen: it owns the LMDB read transaction it
//!   was loaded through, and its entries (and usually its vectors, see
//!   [`KbIndex::vectors_are_mapped`]) are read in place from that transaction's pages.
//!   A newer version never shows through; the shard loads a new index and drops the old
//!   one (which ends the transaction and lets LMDB reuse the old version's pages).
//! - Stored vectors are L2-normalised (`apply_snapshot` does it), so a score is the
//!   cosine similarity of the query and the question, in [-1, 1]; queries need not be
//!   normalised.
//! - The lexical index has one BM25 document per entry (all its questions).
//! - Entry `e` owns matrix rows `entry_rows[e]..entry_rows[e + 1]`, in
//!   [`question_texts`](super::question_texts) order.
//!
//! # Measured
//! See the module documentation of `kb` (`cargo test --release -- --ignored
//! --nocapture measure_`).

use std::borrow::Cow;
use std::ops::Range;

use super::entry::ArchivedEntry;
use super::error::KbError;
use super::lexical::Bm25;
use super::replica::{ReplicaReader, ReplicaView, Snapshot, VersionInfo};
use super::scoring::{entry_max_scores, top_k_of};

/// A read-only, queryable version of a replica. `Send + Sync`.
pub struct KbIndex {
    info: VersionInfo,
    /// Validated archived entries, borrowed from `pinned`'s pages.
    entries: Vec<&'static ArchivedEntry>,
    /// `question_count × dim` normalised floats, row-major.
    vectors: Cow<'static, [f32]>,
    classifier: Option<&'static [u8]>,
    /// Entry `e` owns rows `entry_rows[e]..entry_rows[e + 1]`.
    entry_rows: Vec<u32>,
    lexical: Bm25,
    /// Keeps the pages the borrowed fields point into alive. Declared last, so it is
    /// dropped after them (the borrows are plain references; order is belt and braces).
    pinned: PinnedVersion,
}

/// The read transaction behind a [`KbIndex`].
struct PinnedVersion {
    _view: ReplicaView<'static>,
}

// SAFETY: `RoTxn` is `!Sync` because using one transaction from two threads at once is
// not allowed. A `PinnedVersion` is never used through `&self`: it is created, held and
// dropped (which needs ownership), so sharing `&KbIndex` between threads cannot reach it.
// Reading the mapped pages it keeps alive from several threads is fine (they are
// immutable while the transaction lives).
unsafe impl Sync for PinnedVersion {}

const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<KbIndex>();
};

impl KbIndex {
    /// Loads the replica's current version; `None` before its first snapshot.
    ///
    /// Costs one pass over the entries (bytecheck validation and the BM25 build:
    /// ~5-20 ms for BANKING77 in release) and no copy of the vectors when they are aligned.
    pub fn load(reader: &ReplicaReader) -> Result<Option<KbIndex>, KbError> {
        let view = reader.read_owned()?;
        let Some(snapshot) = view.snapshot()? else {
            return Ok(None);
        };
        // SAFETY: the snapshot borrows pages of `view`'s read transaction, which moves
        // into the index below and lives exactly as long as it. LMDB keeps a read
        // transaction's pages mapped and unchanged until the transaction ends: the
        // environment handle is owned by the transaction (`static_read_txn`), and the
        // map is never resized by this module. Moving the `RoTxn` value does not move
        // the pages. The `'static` references never leave the index: every accessor
        // re-borrows them for the lifetime of `&self`.
        let snapshot: Snapshot<'static> =
            unsafe { std::mem::transmute::<Snapshot<'_>, Snapshot<'static>>(snapshot) };

        let mut entry_rows = Vec::with_capacity(snapshot.entries.len() + 1);
        entry_rows.push(0u32);
        let mut rows = 0u32;
        for entry in &snapshot.entries {
            rows += entry.question_count() as u32;
            entry_rows.push(rows);
        }
        let lexical =
            Bm25::build_from_parts(snapshot.entries.iter().map(|entry| entry.questions()));
        Ok(Some(KbIndex {
            info: snapshot.info,
            entries: snapshot.entries,
            vectors: snapshot.vectors,
            classifier: snapshot.classifier,
            entry_rows,
            lexical,
            pinned: PinnedVersion { _view: view },
        }))
    }

    pub fn version(&self) -> u64 {
        self.info.version
    }

    /// Length of the question vectors (queries must have it too).
    pub fn dim(&self) -> usize {
        self.info.dim as usize
    }

    /// The model that produced the question vectors.
    pub fn model_fingerprint(&self) -> &str {
        &self.info.model_fingerprint
    }

    pub fn info(&self) -> &VersionInfo {
        &self.info
    }

    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }

    pub fn question_count(&self) -> usize {
        self.info.question_count as usize
    }

    /// Entry `index` (as returned by the queries), read in place.
    ///
    /// # Panics
    /// If `index >= entry_count()`.
    pub fn entry(&self, index: usize) -> &ArchivedEntry {
        self.entries[index]
    }

    /// Every entry, in index order.
    pub fn entries(&self) -> impl ExactSizeIterator<Item = &ArchivedEntry> + '_ {
        self.entries.iter().map(|entry| &**entry)
    }

    /// The index of the entry with this id (linear scan; not for the query path).
    pub fn position_of(&self, id: &str) -> Option<usize> {
        self.entries.iter().position(|entry| entry.id() == id)
    }

    /// The normalised question vectors, row-major (`question_count × dim`), e.g. to
    /// train or apply a classifier head.
    pub fn question_vectors(&self) -> &[f32] {
        &self.vectors
    }

    /// The matrix rows of entry `index`.
    pub fn rows_of(&self, index: usize) -> Range<usize> {
        self.entry_rows[index] as usize..self.entry_rows[index + 1] as usize
    }

    /// The entry a matrix row (question) belongs to.
    ///
    /// # Panics
    /// If `row >= question_count()`.
    pub fn entry_of_row(&self, row: usize) -> usize {
        assert!(row < self.question_count(), "row {row} out of range");
        self.entry_rows
            .partition_point(|&start| start as usize <= row)
            - 1
    }

    /// The classifier head stored with this version, as given to `apply_snapshot`.
    pub fn classifier(&self) -> Option<&[u8]> {
        self.classifier
    }

    /// Whether the vectors are read in place from the memory map (true) or were copied
    /// because LMDB stored them at an address not aligned for f32.
    pub fn vectors_are_mapped(&self) -> bool {
        matches!(self.vectors, Cow::Borrowed(_))
    }

    /// The `k` best entries for an embedded query: `(entry index, cosine)` best first,
    /// an entry scoring as its best question. Empty when the query is all zeros or not
    /// finite.
    ///
    /// # Panics
    /// If `query.len() != dim()` (the query came from another model: check
    /// [`model_fingerprint`](Self::model_fingerprint) when loading).
    pub fn top_k(&self, query: &[f32], k: usize) -> Vec<(usize, f32)> {
        assert_eq!(query.len(), self.dim(), "query dimension");
        self.top_k_batch(query, k).pop().unwrap_or_default()
    }

    /// [`top_k`](Self::top_k) for several queries (row-major, `dim` floats each) in one
    /// pass over the matrix, which is much cheaper than one pass per query once the
    /// matrix does not fit in the CPU caches.
    ///
    /// # Panics
    /// If `queries.len()` is not a multiple of `dim()`.
    pub fn top_k_batch(&self, queries: &[f32], k: usize) -> Vec<Vec<(usize, f32)>> {
        let dim = self.dim();
        assert!(
            queries.len().is_multiple_of(dim),
            "queries must be {dim} floats each, got {} floats",
            queries.len()
        );
        let count = queries.len() / dim;
        let entries = self.entries.len();
        let mut scores = vec![0f32; count * entries];
        entry_max_scores(&self.vectors, dim, &self.entry_rows, queries, &mut scores);
        queries
            .chunks_exact(dim)
            .zip(scores.chunks_exact_mut(entries))
            .map(|(query, scores)| {
                let norm = query
                    .iter()
                    .map(|&value| f64::from(value) * f64::from(value))
                    .sum::<f64>()
                    .sqrt();
                if !(norm.is_finite() && norm > 0.0) {
                    return Vec::new();
                }
                let scale = (1.0 / norm) as f32;
                scores.iter_mut().for_each(|score| *score *= scale);
                top_k_of(scores, k)
            })
            .collect()
    }

    /// The `k` best entries for `text` by BM25 over the question texts (one document
    /// per entry, made of all its questions), best first; entries sharing no word with
    /// `text` are left out. For degraded mode: no model involved.
    pub fn lexical_top(&self, text: &str, k: usize) -> Vec<(usize, f32)> {
        let mut scores = vec![0f32; self.entries.len()];
        if !self.lexical.add_scores(text, &mut scores) {
            return Vec::new();
        }
        for score in &mut scores {
            if *score <= 0.0 {
                *score = f32::NEG_INFINITY;
            }
        }
        top_k_of(&scores, k)
    }

    /// Approximate heap bytes this index holds itself (the mapped pages are page cache,
    /// shared with the OS and not counted).
    pub fn heap_bytes(&self) -> usize {
        let vectors = match &self.vectors {
            Cow::Borrowed(_) => 0,
            Cow::Owned(vectors) => vectors.capacity() * 4,
        };
        vectors
            + self.entries.capacity() * std::mem::size_of::<usize>()
            + self.entry_rows.capacity() * 4
            + self.lexical.heap_bytes()
            + std::mem::size_of_val(&self.pinned)
    }
}
