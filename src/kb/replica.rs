//! One shard's knowledge-base replica: an LMDB environment (heed) holding one version of
//! the knowledge base — rkyv-archived entries, their question vectors as raw f32 bytes,
//! an optional classifier head — and a pointer to that current version.
//!
//! # Layout
//! `dir/kb-<shard>/` (a separate environment from the conversation store's
//! `dir/shard-<shard>/`) with tables:
//! - `meta`: `format_version`, `shard`, `current_version` (u64, big-endian);
//! - `versions`: version (u64 BE) -> archived [`VersionInfo`] (dimension, model
//!   fingerprint, entry and question counts, ...);
//! - `entries`: `(version u64 BE, entry index u32 BE)` -> archived [`Entry`];
//! - `vectors`: version -> ONE value holding the L2-normalised question vectors, row-major
//!   f32 (native little-endian), one row per question in [`question_texts`] order; the
//!   entry of a row is implied by that order (entry `e` owns the next
//!   `questions.len()` rows), so no per-row entry index is stored;
//! - `classifiers`: version -> opaque classifier-head bytes (present iff
//!   `VersionInfo::has_classifier`).
//!
//! # Versions and atomicity
//! [`KbReplica::apply_snapshot`] writes a whole new version, moves `current_version` to it
//! and drops every other version, all in ONE write transaction. LMDB is copy-on-write with
//! MVCC: a read transaction sees the database as of its start, and pages it can see are
//! not reused until it ends, however many commits happen meanwhile. So a reader (a
//! [`ReplicaView`] or a [`KbIndex`](super::KbIndex)) sees the old version or the new one,
//! never a mix, and the old version stays readable for as long as such a reader lives even
//! though its keys were deleted; there is no need to keep old versions around by hand.
//! The cost is space: while an old reader lives, the file holds both versions.
//!
//! Versions must increase (a stale or repeated version is refused), so every replica
//! that was given version `v` holds the same content for `v`.
//!
//! # Alignment and zero-copy vectors
//! LMDB only guarantees 2-byte alignment for a value inside a leaf page; a value too large
//! for a leaf page (more than ~2 KiB with 4 KiB pages) gets its own run of overflow pages
//! and starts right after the 16-byte page header. Measured
//! (`tests::per_question_rows_are_neither_reliably_aligned_nor_contiguous`), a layout with
//! one value per question (12-byte key, entry index + 384 f32 = 1,540 bytes) happens to
//! put every row on a 4-byte boundary, but only because the node sizes are multiples of 4:
//! with 1,538-byte values 999 of 1,000 rows sit at 2 mod 4. Worse, such rows are never
//! contiguous (node headers and keys between them, 2 rows per page, 24% of each page
//! unused), so the flat matrix the scan wants would have to be copied together anyway.
//! Hence one value per version: contiguous, and 16-byte aligned when on overflow pages
//! (any knowledge base with 2+ questions of dimension 384). [`Snapshot::vectors`]
//! borrows it straight from the memory map through `bytemuck::try_cast_slice`; were it
//! ever misaligned (a tiny value in a leaf page; not observed, since it is the only node
//! of its page) it is copied out with `bytemuck::pod_read_unaligned` instead
//! ([`Snapshot::vectors_are_mapped`] tells which).
//!
//! Entries are validated with bytecheck on read (`rkyv::access`), so a damaged file is a
//! [`KbError::Corrupt`], never undefined behaviour.
//!
//! # Processes
//! `switchboard kb import` may run while `serve` has the same replicas open: LMDB
//! coordinates processes through `lock.mdb`. Both must use the same map size; the
//! environment is never resized by this module (a resize needs no live transaction in the
//! process, and a [`KbIndex`](super::KbIndex) keeps one open).

use std::borrow::Cow;
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use std::sync::{Arc, Mutex, Weak};

use heed::types::Bytes;
use heed::{CommitOrAbort, Database, Env, EnvOpenOptions, RoTxn, WithoutTls};
use rkyv::{rancor, Archive, Deserialize, Serialize};

#[cfg(doc)]
use super::entry::question_texts;
use super::entry::{question_count, ArchivedEntry, Entry};
use super::error::{corrupt, KbError};

#[cfg(not(target_endian = "little"))]
compile_error!("knowledge-base vectors are stored as little-endian f32 bytes");

/// Version of the on-disk layout written into the `meta` table.
pub const FORMAT_VERSION: u64 = 1;
/// Highest shard index + 1 a replica directory may be opened for.
pub const MAX_SHARDS: usize = 256;
/// Largest embedding dimension accepted.
pub const MAX_DIM: usize = 8192;
/// Longest model fingerprint, in bytes.
pub const MAX_FINGERPRINT_BYTES: usize = 1024;
/// Most entries in one snapshot (indexes are `u32` on disk).
pub const MAX_ENTRIES: usize = 1 << 24;
/// Most example questions (vector rows) in one snapshot.
pub const MAX_QUESTIONS: usize = 1 << 26;
/// Reader slots: each live view or index holds one (a shard needs two during a reload).
pub const MAX_READERS: u32 = 126;
/// Named tables (5 used).
pub const MAX_DBS: u32 = 8;
/// A reasonable default map size: 1 GiB of address space (BANKING77 with 384-dim vectors
/// takes ~17 MB per version; an update needs room for two versions).
pub const DEFAULT_MAP_SIZE: usize = 1 << 30;

/// A row whose length is within this of 1 is stored as it is, not scaled again.
const UNIT_LENGTH_TOLERANCE: f64 = 1e-6;

/// The serialisation buffer is dropped after a snapshot that grew it past this.
const SCRATCH_KEEP_BYTES: usize = 64 * 1024;

const META_FORMAT: &[u8] = b"format_version";
const META_SHARD: &[u8] = b"shard";
const META_CURRENT: &[u8] = b"current_version";

/// What describes one stored version. Key: version (u64 BE).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct VersionInfo {
    pub version: u64,
    /// Length of every question vector.
    pub dim: u32,
    /// Names the model that produced the vectors; a query embedded by another model
    /// must not be scored against them.
    pub model_fingerprint: String,
    pub entry_count: u32,
    pub question_count: u32,
    pub has_classifier: bool,
    /// When the version was written (unix ms).
    pub created_ms: u64,
}

// LMDB values sit at 2-byte aligned addresses; reading them in place needs alignment 1.
const _: () = assert!(std::mem::align_of::<ArchivedVersionInfo>() == 1);

type Table = Database<'static, Bytes, Bytes>;

/// Handles of the named tables of a replica environment.
#[derive(Clone, Copy)]
struct Tables {
    meta: Table,
    versions: Table,
    entries: Table,
    vectors: Table,
    classifiers: Table,
}

/// A shard's knowledge-base replica, opened for writing.
///
/// `Send`. One per replica directory per process (heed refuses a second open; reported as
/// [`KbError::AlreadyOpen`]); use [`KbReplica::reader`] for more read handles.
pub struct KbReplica {
    env: Env<WithoutTls>,
    tables: Tables,
    shard: usize,
    path: PathBuf,
    /// Reused serialisation buffer (released when a snapshot made it large).
    scratch: Vec<u8>,
    /// Keeps the environment findable by [`KbReplica::open_shared`] while this handle lives.
    shared: Option<Arc<SharedEnv>>,
}

/// An environment opened through [`KbReplica::open_shared`], findable by its path while any
/// handle made from it lives.
struct SharedEnv {
    env: Env<WithoutTls>,
    tables: Tables,
}

/// Replica environments open in this process, by path (weak: an entry whose handles are all
/// gone no longer upgrades, and the path is opened afresh). Admin paths only (engine start,
/// `kb import` over the API), never per message.
static SHARED: Mutex<Vec<(PathBuf, Weak<SharedEnv>)>> = Mutex::new(Vec::new());

const _: fn() = || {
    fn send<T: Send>() {}
    send::<KbReplica>();
    send::<ReplicaReader>();
};

impl KbReplica {
    /// Opens (creating if needed) `dir/kb-<shard>/` as this shard's replica.
    ///
    /// `map_size` is the most the data file may grow to (address space, not memory;
    /// rounded up to 4 KiB). It must hold two versions during an update.
    pub fn open(dir: &Path, shard: usize, map_size: usize) -> Result<Self, KbError> {
        if shard >= MAX_SHARDS {
            return Err(KbError::ShardOutOfRange(shard));
        }
        let path = dir.join(format!("kb-{shard}"));
        std::fs::create_dir_all(&path).map_err(|source| KbError::CreateDir {
            path: path.clone(),
            source,
        })?;
        let mut options = EnvOpenOptions::new().read_txn_without_tls();
        options
            .map_size(round_up_to_page(map_size))
            .max_readers(MAX_READERS)
            .max_dbs(MAX_DBS);
        // SAFETY: the memory map is only unsound if the data file is changed behind LMDB's
        // back. The directory belongs to this shard's replica; heed refuses a second open
        // in this process and other processes (`switchboard kb ...`) go through LMDB and
        // its lock file. The map is never resized while transactions are live (never at all).
        let env = unsafe { options.open(&path) }.map_err(|error| match error {
            heed::Error::EnvAlreadyOpened => KbError::AlreadyOpen { path: path.clone() },
            other => other.into(),
        })?;
        // Reader slots of a killed process are reclaimed here rather than leaking.
        env.clear_stale_readers()?;

        let wtxn = env.write_txn()?;
        let tables = env
            .create_databases_and_commit(wtxn, |opener, wtxn| -> Result<_, KbError> {
                let mut create = |name| opener.create_database::<Bytes, Bytes>(wtxn, Some(name));
                let meta = create("meta")?;
                let versions = create("versions")?;
                let entries = create("entries")?;
                let vectors = create("vectors")?;
                let classifiers = create("classifiers")?;
                match meta.get(wtxn, META_FORMAT)? {
                    None => {
                        meta.put(wtxn, META_FORMAT, &FORMAT_VERSION.to_be_bytes())?;
                        meta.put(wtxn, META_SHARD, &(shard as u64).to_be_bytes())?;
                    }
                    Some(bytes) => {
                        let found = decode_u64("meta", META_FORMAT, bytes)?;
                        if found != FORMAT_VERSION {
                            return Err(KbError::UnsupportedFormat {
                                found,
                                supported: FORMAT_VERSION,
                            });
                        }
                        let owner = match meta.get(wtxn, META_SHARD)? {
                            Some(bytes) => decode_u64("meta", META_SHARD, bytes)?,
                            None => return Err(corrupt("meta", META_SHARD, "missing shard")),
                        };
                        if owner != shard as u64 {
                            return Err(KbError::ShardMismatch {
                                path: path.clone(),
                                expected: shard,
                                found: owner,
                            });
                        }
                    }
                }
                Ok(CommitOrAbort::<_, ()>::Commit((
                    meta,
                    versions,
                    entries,
                    vectors,
                    classifiers,
                )))
            })?
            .unwrap_commit();
        let (meta, versions, entries, vectors, classifiers) = tables;
        let tables = Tables {
            meta,
            versions,
            entries,
            vectors,
            classifiers,
        };
        Ok(KbReplica {
            env,
            tables,
            shard,
            path,
            scratch: Vec::new(),
            shared: None,
        })
    }

    /// [`open`](Self::open), except that a replica already opened this way in this process
    /// (and still held) is handed out again instead of being refused. The serving shard's
    /// engine and an import over the API (`POST /api/kb/import`, which writes every shard's
    /// replica from one thread) share an environment this way; LMDB serialises their write
    /// transactions and readers keep their MVCC snapshots.
    pub fn open_shared(dir: &Path, shard: usize, map_size: usize) -> Result<Self, KbError> {
        let path = dir.join(format!("kb-{shard}"));
        let mut registry = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        registry.retain(|(_, weak)| weak.strong_count() > 0);
        if let Some(shared) = registry
            .iter()
            .find(|(known, _)| *known == path)
            .and_then(|(_, weak)| weak.upgrade())
        {
            return Ok(KbReplica {
                env: shared.env.clone(),
                tables: shared.tables,
                shard,
                path,
                scratch: Vec::new(),
                shared: Some(shared),
            });
        }
        let mut replica = Self::open(dir, shard, map_size)?;
        let shared = Arc::new(SharedEnv {
            env: replica.env.clone(),
            tables: replica.tables,
        });
        registry.push((path, Arc::downgrade(&shared)));
        replica.shared = Some(shared);
        Ok(replica)
    }

    pub fn shard(&self) -> usize {
        self.shard
    }

    /// The environment directory (`dir/kb-<n>`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Current size of the memory map in bytes.
    pub fn map_size(&self) -> usize {
        self.env.info().map_size
    }

    /// A cloneable read-only handle (for the shard's query side and other threads).
    pub fn reader(&self) -> ReplicaReader {
        ReplicaReader {
            env: self.env.clone(),
            tables: self.tables,
            _shared: self.shared.clone(),
        }
    }

    /// Opens a consistent read-only view (an LMDB read transaction).
    pub fn read(&self) -> Result<ReplicaView<'_>, KbError> {
        Ok(ReplicaView {
            txn: self.env.read_txn()?,
            tables: self.tables,
        })
    }

    /// The current version, `None` before the first snapshot.
    pub fn current_version(&self) -> Result<Option<u64>, KbError> {
        self.read()?.version()
    }

    /// Stores `entries` as version `version` and makes it the current one, atomically
    /// (see the module documentation); every other version is dropped in the same
    /// transaction.
    ///
    /// `question_vectors` is row-major, one row of `dim` floats per question in
    /// [`question_texts`] order. Rows are L2-normalised before they are stored, so the
    /// scores of a [`KbIndex`](super::KbIndex) are cosine similarities (a row already of
    /// unit length within 1e-6 is stored bit for bit, so a stored version stored again, as
    /// `kb sync` does, keeps its bytes and its snapshot file's hash); a row that is all
    /// zeros or not finite is refused. `classifier_weights` is stored as given.
    ///
    /// On `Err` nothing was written and the previous version is still current.
    pub fn apply_snapshot(
        &mut self,
        version: u64,
        entries: &[Entry],
        question_vectors: &[f32],
        dim: usize,
        model_fingerprint: &str,
        classifier_weights: Option<&[u8]>,
    ) -> Result<(), KbError> {
        let info = check_snapshot(version, entries, question_vectors, dim, model_fingerprint)?;
        let info = VersionInfo {
            has_classifier: classifier_weights.is_some(),
            ..info
        };
        let result = self.write_snapshot(&info, entries, question_vectors, classifier_weights);
        if self.scratch.capacity() > SCRATCH_KEEP_BYTES {
            self.scratch = Vec::new();
        }
        result.map_err(|error| match error {
            KbError::MapFull { .. } => KbError::MapFull {
                map_size: self.map_size(),
            },
            other => other,
        })
    }

    fn write_snapshot(
        &mut self,
        info: &VersionInfo,
        entries: &[Entry],
        question_vectors: &[f32],
        classifier_weights: Option<&[u8]>,
    ) -> Result<(), KbError> {
        let tables = self.tables;
        let mut txn = self.env.write_txn()?;
        if let Some(current) = current_version(&tables, &txn)? {
            if info.version <= current {
                return Err(KbError::StaleVersion {
                    version: info.version,
                    current,
                });
            }
        }
        // Readers of older versions keep seeing them through their own snapshot (MVCC).
        tables.versions.clear(&mut txn)?;
        tables.entries.clear(&mut txn)?;
        tables.vectors.clear(&mut txn)?;
        tables.classifiers.clear(&mut txn)?;

        let version_key = info.version.to_be_bytes();
        for (index, entry) in entries.iter().enumerate() {
            let key = entry_key(info.version, index as u32);
            let bytes = serialize(&mut self.scratch, "entry", entry)?;
            tables.entries.put(&mut txn, &key, bytes)?;
        }

        let dim = info.dim as usize;
        let byte_len = std::mem::size_of_val(question_vectors);
        tables
            .vectors
            .put_reserved(&mut txn, &version_key, byte_len, |space| {
                let mut normalised = vec![0f32; dim];
                for row in question_vectors.chunks_exact(dim) {
                    let length = norm(row);
                    if (length - 1.0).abs() <= UNIT_LENGTH_TOLERANCE {
                        // Already unit length (a stored version stored again, as sync
                        // does): kept bit for bit, so its snapshot file does not change.
                        space.write_all(bytemuck::cast_slice(row))?;
                        continue;
                    }
                    let scale = (1.0 / length) as f32;
                    for (out, value) in normalised.iter_mut().zip(row) {
                        *out = value * scale;
                    }
                    space.write_all(bytemuck::cast_slice(&normalised))?;
                }
                Ok(())
            })?;
        if let Some(weights) = classifier_weights {
            tables.classifiers.put(&mut txn, &version_key, weights)?;
        }
        let bytes = serialize(&mut self.scratch, "version", info)?;
        tables.versions.put(&mut txn, &version_key, bytes)?;
        tables
            .meta
            .put(&mut txn, META_CURRENT, &info.version.to_be_bytes())?;
        txn.commit()?;
        Ok(())
    }
}

/// A cloneable, `Send` read-only handle on a replica (see [`KbReplica::reader`]).
#[derive(Clone)]
pub struct ReplicaReader {
    env: Env<WithoutTls>,
    tables: Tables,
    /// See [`KbReplica::open_shared`].
    _shared: Option<Arc<SharedEnv>>,
}

impl ReplicaReader {
    /// Opens a consistent read-only view (an LMDB read transaction).
    pub fn read(&self) -> Result<ReplicaView<'_>, KbError> {
        Ok(ReplicaView {
            txn: self.env.read_txn()?,
            tables: self.tables,
        })
    }

    /// A view that owns its transaction (and a handle on the environment), for a
    /// [`KbIndex`](super::KbIndex) that keeps reading the mapped pages of one version.
    pub(crate) fn read_owned(&self) -> Result<ReplicaView<'static>, KbError> {
        Ok(ReplicaView {
            txn: self.env.clone().static_read_txn()?,
            tables: self.tables,
        })
    }

    /// The current version, `None` before the first snapshot. One short read
    /// transaction (~1 µs): cheap enough to poll for updates.
    pub fn current_version(&self) -> Result<Option<u64>, KbError> {
        self.read()?.version()
    }
}

/// A consistent read-only snapshot of a replica: one LMDB read transaction. Everything
/// read through it belongs to the same version. Keep it short unless it backs an index:
/// while it lives, the pages of its version cannot be reused.
pub struct ReplicaView<'e> {
    txn: RoTxn<'e, WithoutTls>,
    tables: Tables,
}

/// The current version as seen by a [`ReplicaView`], read in place.
pub struct Snapshot<'v> {
    pub info: VersionInfo,
    /// Validated archived entries, in index order.
    pub entries: Vec<&'v ArchivedEntry>,
    /// `info.question_count × info.dim` normalised floats, row-major; borrowed from the
    /// memory map when the stored value is 4-byte aligned (see the module docs).
    pub vectors: Cow<'v, [f32]>,
    pub classifier: Option<&'v [u8]>,
}

impl Snapshot<'_> {
    /// Whether the vectors are read in place (true) or were copied because the stored
    /// value was not 4-byte aligned.
    pub fn vectors_are_mapped(&self) -> bool {
        matches!(self.vectors, Cow::Borrowed(_))
    }
}

impl<'e> ReplicaView<'e> {
    /// The current version, `None` before the first snapshot.
    pub fn version(&self) -> Result<Option<u64>, KbError> {
        current_version(&self.tables, &self.txn)
    }

    /// The description of the current version.
    pub fn info(&self) -> Result<Option<VersionInfo>, KbError> {
        let Some(version) = self.version()? else {
            return Ok(None);
        };
        let key = version.to_be_bytes();
        let bytes = self
            .tables
            .versions
            .get(&self.txn, &key)?
            .ok_or_else(|| corrupt("versions", &key, "the current version has no record"))?;
        let archived = rkyv::access::<ArchivedVersionInfo, rancor::Error>(bytes)
            .map_err(|error| corrupt("versions", &key, error.to_string()))?;
        let info = rkyv::deserialize::<VersionInfo, rancor::Error>(archived)
            .map_err(|error| corrupt("versions", &key, error.to_string()))?;
        if info.version != version {
            return Err(corrupt("versions", &key, "record names another version"));
        }
        Ok(Some(info))
    }

    /// The current version's entries, vectors and classifier, read in place and checked
    /// against each other; `None` before the first snapshot.
    pub fn snapshot(&self) -> Result<Option<Snapshot<'_>>, KbError> {
        let Some(info) = self.info()? else {
            return Ok(None);
        };
        let version_key = info.version.to_be_bytes();

        let mut entries = Vec::with_capacity(info.entry_count as usize);
        let mut questions = 0usize;
        for item in self.tables.entries.prefix_iter(&self.txn, &version_key)? {
            let (key, bytes) = item?;
            if key != entry_key(info.version, entries.len() as u32) {
                return Err(corrupt("entries", key, "entry indexes are not dense"));
            }
            let entry = rkyv::access::<ArchivedEntry, rancor::Error>(bytes)
                .map_err(|error| corrupt("entries", key, error.to_string()))?;
            questions += entry.question_count();
            entries.push(entry);
        }
        if entries.len() != info.entry_count as usize || questions != info.question_count as usize {
            return Err(corrupt(
                "entries",
                &version_key,
                format!(
                    "{} entries with {questions} questions, the version record says {} with {}",
                    entries.len(),
                    info.entry_count,
                    info.question_count
                ),
            ));
        }

        let bytes = self
            .tables
            .vectors
            .get(&self.txn, &version_key)?
            .ok_or_else(|| corrupt("vectors", &version_key, "missing"))?;
        let expected = questions * info.dim as usize * std::mem::size_of::<f32>();
        if bytes.len() != expected {
            return Err(corrupt(
                "vectors",
                &version_key,
                format!("{} bytes, expected {expected}", bytes.len()),
            ));
        }
        let vectors = floats_of(bytes);

        let classifier = self.tables.classifiers.get(&self.txn, &version_key)?;
        if classifier.is_some() != info.has_classifier {
            return Err(corrupt(
                "classifiers",
                &version_key,
                "presence disagrees with the version record",
            ));
        }
        Ok(Some(Snapshot {
            info,
            entries,
            vectors,
            classifier,
        }))
    }

    /// Copies of the current version's entries (for `kb export` / `kb list`), empty
    /// before the first snapshot.
    pub fn entries(&self) -> Result<Vec<Entry>, KbError> {
        Ok(self
            .snapshot()?
            .map(|snapshot| {
                snapshot
                    .entries
                    .iter()
                    .map(|entry| entry.to_entry())
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// Checks a snapshot before anything is written and returns its description
/// (`has_classifier` is filled in by the caller).
fn check_snapshot(
    version: u64,
    entries: &[Entry],
    question_vectors: &[f32],
    dim: usize,
    model_fingerprint: &str,
) -> Result<VersionInfo, KbError> {
    if entries.is_empty() {
        return Err(KbError::NoEntries);
    }
    if entries.len() > MAX_ENTRIES {
        return Err(KbError::TooMany {
            what: "entries",
            count: entries.len(),
            max: MAX_ENTRIES,
        });
    }
    let mut ids = HashSet::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        if let Some(problem) = entry.problems().into_iter().next() {
            return Err(KbError::InvalidEntry {
                index,
                id: entry.id.clone(),
                problem,
            });
        }
        if !ids.insert(entry.id.as_str()) {
            return Err(KbError::DuplicateId {
                id: entry.id.clone(),
            });
        }
    }
    if dim == 0 || dim > MAX_DIM {
        return Err(KbError::BadDimension { dim });
    }
    let questions = question_count(entries);
    if questions > MAX_QUESTIONS {
        return Err(KbError::TooMany {
            what: "questions",
            count: questions,
            max: MAX_QUESTIONS,
        });
    }
    if question_vectors.len() != questions * dim {
        return Err(KbError::VectorCount {
            expected: questions * dim,
            found: question_vectors.len(),
            questions,
            dim,
        });
    }
    let texts = entries.iter().flat_map(|entry| &entry.questions);
    for (row, (vector, question)) in question_vectors.chunks_exact(dim).zip(texts).enumerate() {
        let reason = if vector.iter().any(|value| !value.is_finite()) {
            Some("has a value that is not finite")
        } else if norm(vector) < f64::from(f32::MIN_POSITIVE).sqrt() {
            Some("is (nearly) all zeros")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(KbError::BadVector {
                row,
                question: question.clone(),
                reason,
            });
        }
    }
    if model_fingerprint.is_empty() || model_fingerprint.len() > MAX_FINGERPRINT_BYTES {
        return Err(KbError::BadFingerprint);
    }
    Ok(VersionInfo {
        version,
        dim: dim as u32,
        model_fingerprint: model_fingerprint.to_owned(),
        entry_count: entries.len() as u32,
        question_count: questions as u32,
        has_classifier: false,
        created_ms: now_ms(),
    })
}

fn current_version(tables: &Tables, txn: &RoTxn) -> Result<Option<u64>, KbError> {
    tables
        .meta
        .get(txn, META_CURRENT)?
        .map(|bytes| decode_u64("meta", META_CURRENT, bytes))
        .transpose()
}

/// Archives `value` into the reused `scratch` buffer and returns the bytes.
fn serialize<'s, T>(
    scratch: &'s mut Vec<u8>,
    record: &'static str,
    value: &T,
) -> Result<&'s [u8], KbError>
where
    T: for<'a> Serialize<
        rkyv::api::high::HighSerializer<
            Vec<u8>,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rancor::Error,
        >,
    >,
{
    let mut buffer = std::mem::take(scratch);
    buffer.clear();
    *scratch =
        rkyv::api::high::to_bytes_in::<_, rancor::Error>(value, buffer).map_err(|error| {
            KbError::Serialize {
                record,
                detail: error.to_string(),
            }
        })?;
    Ok(scratch.as_slice())
}

/// The f32s in `bytes` (native endian): borrowed when `bytes` is 4-byte aligned, else
/// copied out.
pub(crate) fn floats_of(bytes: &[u8]) -> Cow<'_, [f32]> {
    match bytemuck::try_cast_slice::<u8, f32>(bytes) {
        Ok(floats) => Cow::Borrowed(floats),
        Err(_) => Cow::Owned(
            bytes
                .chunks_exact(4)
                .map(bytemuck::pod_read_unaligned::<f32>)
                .collect(),
        ),
    }
}

fn entry_key(version: u64, index: u32) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..8].copy_from_slice(&version.to_be_bytes());
    key[8..].copy_from_slice(&index.to_be_bytes());
    key
}

fn decode_u64(table: &'static str, key: &[u8], bytes: &[u8]) -> Result<u64, KbError> {
    <[u8; 8]>::try_from(bytes)
        .map(u64::from_be_bytes)
        .map_err(|_| corrupt(table, key, "not a u64"))
}

/// Euclidean norm, accumulated in f64.
fn norm(vector: &[f32]) -> f64 {
    vector
        .iter()
        .map(|&value| f64::from(value) * f64::from(value))
        .sum::<f64>()
        .sqrt()
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
