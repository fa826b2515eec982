//! Acked writes that are in the write-ahead log but not yet in LMDB, for readers.
//!
//! With [`StoreOptions::apply_interval`](super::StoreOptions::apply_interval) above zero, a
//! group commit is acked once its record is synced in the log (with `durability = "batch"`:
//! written; the log is synced every `sync_interval`), and its LMDB writes stay in a
//! write transaction that commits later with those of the batches after it (one LMDB commit
//! per interval instead of one per batch: each B-tree page a batch touches is copied and
//! written once per interval, not once per batch). Readers use their own LMDB snapshots, so
//! until that commit they would not see those writes; the overlay holds them, keyed like
//! LMDB, and every [`ReadView`](super::ReadView) reads through it.
//!
//! Invariants:
//! - The writer adds a batch's writes after its log record is synced (written, with `batch`)
//!   and before the batch's
//!   outcomes leave the store (so before anything is acked), and clears the overlay only after
//!   the LMDB transaction holding every write in it has committed.
//! - Every write in the overlay was made on top of one LMDB snapshot, its `base` (the overlay
//!   is cleared whenever LMDB commits). A reader takes its overlay snapshot BEFORE it begins
//!   its LMDB read transaction, and uses it only if that transaction's snapshot is `base`;
//!   otherwise LMDB committed every write in it (and maybe newer values of the same keys)
//!   meanwhile, and the reader reads LMDB alone. Any acked write missing from its snapshot was
//!   cleared, so committed before the transaction began and visible in it. So overlay-over-LMDB
//!   is exactly the acked state as of the snapshot.
//! - Snapshots are immutable (`Arc`); the writer copies the map when a reader holds the
//!   current one (readers hold it for the microseconds of a view).
//! - A key's entry is its last write: `Some(value)` a put, `None` a delete.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use super::wal::redo::{RedoTable, RedoWrite};

const TABLES: usize = 7;
/// The table of each slot of [`Overlay::tables`] (see [`slot`]).
const SLOT_TABLES: [RedoTable; TABLES] = [
    RedoTable::Messages,
    RedoTable::Conversations,
    RedoTable::Open,
    RedoTable::Visitors,
    RedoTable::Info,
    RedoTable::VisitorSecrets,
    RedoTable::Variants,
];

/// One table's pending writes, in LMDB's key order (bytewise).
type PendingTable = BTreeMap<Box<[u8]>, Option<Box<[u8]>>>;
/// A key range of a [`PendingTable`].
type PendingRange<'o> = std::collections::btree_map::Range<'o, Box<[u8]>, Option<Box<[u8]>>>;

/// The pending writes of every table.
#[derive(Clone, Default)]
pub(crate) struct Overlay {
    tables: [PendingTable; TABLES],
    /// The id of the LMDB snapshot (last committed transaction) these writes apply on top of.
    base: usize,
}

fn slot(table: RedoTable) -> usize {
    table as usize - 1
}

impl Overlay {
    /// The id of the LMDB snapshot these writes apply on top of: a view whose read transaction
    /// has another id must not use them (see the module's invariants).
    pub(crate) fn base(&self) -> usize {
        self.base
    }

    /// The pending write of `key`: `Some(Some(value))` put, `Some(None)` deleted, `None` not
    /// written since LMDB's last commit.
    pub(crate) fn get(&self, table: RedoTable, key: &[u8]) -> Option<Option<&[u8]>> {
        self.tables[slot(table)]
            .get(key)
            .map(|value| value.as_deref())
    }

    /// Every pending write, table by table: replayed into a new write transaction when the one
    /// holding them was abandoned (each key's last write gives the state the batches left).
    pub(crate) fn writes(&self) -> impl Iterator<Item = (RedoTable, &[u8], Option<&[u8]>)> {
        SLOT_TABLES
            .iter()
            .zip(&self.tables)
            .flat_map(|(&table, writes)| {
                writes
                    .iter()
                    .map(move |(key, value)| (table, &key[..], value.as_deref()))
            })
    }

    /// The pending writes of `table` with keys in `range`, ascending, or descending when
    /// `descending`.
    pub(crate) fn range<'o>(
        &'o self,
        table: RedoTable,
        range: (Bound<&[u8]>, Bound<&[u8]>),
        descending: bool,
    ) -> OverlayRange<'o> {
        OverlayRange {
            range: Some(self.tables[slot(table)].range::<[u8], _>(range)),
            descending,
        }
    }

    fn add(&mut self, writes: &[RedoWrite<'_>]) {
        for write in writes {
            self.tables[slot(write.table)].insert(write.key.into(), write.value.map(Box::from));
        }
    }
}

/// Pending writes in key order (see [`Overlay::range`]); an empty one stands in when a view has
/// no overlay.
pub(crate) struct OverlayRange<'o> {
    range: Option<PendingRange<'o>>,
    descending: bool,
}

impl<'o> OverlayRange<'o> {
    pub(crate) fn empty() -> Self {
        OverlayRange {
            range: None,
            descending: false,
        }
    }
}

impl<'o> Iterator for OverlayRange<'o> {
    type Item = (&'o [u8], Option<&'o [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        let range = self.range.as_mut()?;
        let (key, value) = if self.descending {
            range.next_back()?
        } else {
            range.next()?
        };
        Some((&key[..], value.as_deref()))
    }
}

/// The overlay a store shares with its readers.
#[derive(Default)]
pub(crate) struct SharedOverlay {
    current: Mutex<Option<Arc<Overlay>>>,
}

impl SharedOverlay {
    /// The pending writes now, `None` when there are none (the common case, which costs a
    /// reader one uncontended lock).
    pub(crate) fn snapshot(&self) -> Option<Arc<Overlay>> {
        self.lock().clone()
    }

    /// Adds a batch's writes (its log record is in the log; the batch is not acked yet), made in a
    /// write transaction on top of LMDB snapshot `base`.
    pub(crate) fn add(&self, writes: &[RedoWrite<'_>], base: usize) {
        if writes.is_empty() {
            return;
        }
        let mut current = self.lock();
        let overlay = Arc::make_mut(current.get_or_insert_with(|| {
            Arc::new(Overlay {
                base,
                ..Overlay::default()
            })
        }));
        debug_assert_eq!(
            overlay.base, base,
            "the overlay is cleared at every LMDB commit"
        );
        overlay.add(writes);
    }

    /// Forgets every pending write (LMDB has committed them all).
    pub(crate) fn clear(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<Overlay>>> {
        // A panic while holding the lock leaves a consistent map (each insert is whole).
        self.current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// LMDB's entries of a range merged with the overlay's, in the range's order: a key in both
/// takes the overlay's write, and a pending delete hides the key.
pub(crate) struct Merged<'v, L: Iterator> {
    lmdb: std::iter::Peekable<L>,
    overlay: std::iter::Peekable<OverlayRange<'v>>,
    descending: bool,
}

impl<'v, L> Merged<'v, L>
where
    L: Iterator<Item = heed::Result<(&'v [u8], &'v [u8])>>,
{
    pub(crate) fn new(lmdb: L, overlay: OverlayRange<'v>) -> Self {
        let descending = overlay.descending;
        Merged {
            lmdb: lmdb.peekable(),
            overlay: overlay.peekable(),
            descending,
        }
    }
}

impl<'v, L> Iterator for Merged<'v, L>
where
    L: Iterator<Item = heed::Result<(&'v [u8], &'v [u8])>>,
{
    type Item = heed::Result<(&'v [u8], &'v [u8])>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let order = match (self.lmdb.peek(), self.overlay.peek()) {
                (None, None) => return None,
                (Some(Err(_)), _) | (Some(_), None) => return self.lmdb.next(),
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(Ok((stored, _))), Some((pending, _))) => {
                    let order = stored.cmp(pending);
                    if self.descending {
                        order.reverse()
                    } else {
                        order
                    }
                }
            };
            match order {
                std::cmp::Ordering::Less => return self.lmdb.next(),
                std::cmp::Ordering::Equal => {
                    // The pending write replaces the stored entry.
                    self.lmdb.next();
                }
                std::cmp::Ordering::Greater => {}
            }
            let (key, value) = self.overlay.next().expect("peeked");
            if let Some(value) = value {
                return Some(Ok((key, value)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put<'a>(key: &'a [u8], value: &'a [u8]) -> RedoWrite<'a> {
        RedoWrite {
            table: RedoTable::Messages,
            key,
            value: Some(value),
        }
    }

    fn delete(key: &[u8]) -> RedoWrite<'_> {
        RedoWrite {
            table: RedoTable::Messages,
            key,
            value: None,
        }
    }

    fn merged(
        stored: &[(&[u8], &[u8])],
        overlay: &Overlay,
        descending: bool,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut stored: Vec<_> = stored.to_vec();
        if descending {
            stored.reverse();
        }
        let lmdb = stored.into_iter().map(Ok);
        let range = overlay.range(
            RedoTable::Messages,
            (Bound::Unbounded, Bound::Unbounded),
            descending,
        );
        Merged::new(lmdb, range)
            .map(|entry| {
                let (key, value) = entry.unwrap();
                (key.to_vec(), value.to_vec())
            })
            .collect()
    }

    #[test]
    fn the_overlay_wins_on_equal_keys_and_its_deletes_hide_stored_keys() {
        let mut overlay = Overlay::default();
        overlay.add(&[
            put(b"b", b"B2"),
            delete(b"c"),
            put(b"e", b"E"),
            delete(b"z"),
        ]);
        let stored: &[(&[u8], &[u8])] = &[(b"a", b"A"), (b"b", b"B"), (b"c", b"C"), (b"d", b"D")];
        let expected: Vec<(Vec<u8>, Vec<u8>)> = [("a", "A"), ("b", "B2"), ("d", "D"), ("e", "E")]
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        assert_eq!(merged(stored, &overlay, false), expected);
        let mut reversed = expected.clone();
        reversed.reverse();
        assert_eq!(merged(stored, &overlay, true), reversed);
    }

    #[test]
    fn the_last_write_of_a_key_is_the_one_read() {
        let mut overlay = Overlay::default();
        overlay.add(&[put(b"k", b"1")]);
        overlay.add(&[delete(b"k")]);
        assert_eq!(overlay.get(RedoTable::Messages, b"k"), Some(None));
        overlay.add(&[put(b"k", b"3")]);
        assert_eq!(
            overlay.get(RedoTable::Messages, b"k"),
            Some(Some(&b"3"[..]))
        );
        assert_eq!(overlay.get(RedoTable::Conversations, b"k"), None);
    }

    #[test]
    fn every_table_maps_to_its_own_slot() {
        for (index, table) in SLOT_TABLES.iter().enumerate() {
            assert_eq!(slot(*table), index);
        }
    }

    #[test]
    fn a_snapshot_does_not_change_when_writes_are_added_or_cleared() {
        let shared = SharedOverlay::default();
        assert!(shared.snapshot().is_none());
        shared.add(&[put(b"a", b"1")], 7);
        let before = shared.snapshot().unwrap();
        assert_eq!(before.base(), 7);
        shared.add(&[put(b"b", b"2")], 7);
        shared.clear();
        assert!(shared.snapshot().is_none());
        assert_eq!(before.get(RedoTable::Messages, b"a"), Some(Some(&b"1"[..])));
        assert_eq!(before.get(RedoTable::Messages, b"b"), None);
    }
}
