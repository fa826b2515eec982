//! A bounded, shard-local cache with least-frequently-used eviction and dynamic aging
//! (LFU-DA), used for the engine's hot-query cache (normalised text → answer) and its
//! embedding cache (text → vector).
//!
//! Each entry has a priority `L + hits`, where `hits` counts its uses (1 when inserted) and
//! `L` is the priority of the last entry evicted, taken when the entry was last used. When
//! the cache is full, the entry with the lowest priority goes (the least recently used of
//! them on a tie). Plain LFU would keep an entry that was popular long ago forever; the
//! aging term lets new popular entries overtake it (Arlitt et al., "Evaluating content
//! management techniques for Web proxy caches", 2000).
//!
//! Invariants:
//! - At most `capacity` entries; capacity 0 stores nothing (every lookup is a miss).
//! - `entries` and `order` always hold the same keys: `order` maps `(priority, tick)` to the
//!   key, and each entry remembers its own `(priority, tick)`. Ticks are unique and
//!   increasing, so a key appears once in `order`.
//! - Lookups, inserts and evictions are O(log n) and allocate only for a new key (the key is
//!   shared by both maps through an `Rc<str>`); the maps grow on demand up to the capacity
//!   and [`LfuCache::clear`] gives their memory back.
//!
//! Hand-written rather than taken from a crate: the one LFU crate found, `lfu_cache` 1.3.0
//! (last released 2022), is built on raw-pointer linked lists (over a hundred `unsafe`
//! blocks) and declares itself `Send` and `Sync` while sharing `Rc` keys between threads;
//! the moka family implements TinyLFU admission with LRU eviction and thread-safe
//! structures this shard-local cache does not need. This one is safe code over std maps.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

/// Counts of lookups, for the hit-ratio metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheCounters {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

impl CacheCounters {
    /// Hits over lookups, 0 before the first lookup.
    pub fn hit_ratio(&self) -> f64 {
        let lookups = self.hits + self.misses;
        if lookups == 0 {
            0.0
        } else {
            self.hits as f64 / lookups as f64
        }
    }
}

struct Slot<V> {
    value: V,
    hits: u64,
    /// The entry's key in `order`.
    rank: (u64, u64),
}

/// An LFU-DA cache from strings to `V` (see the module documentation).
pub struct LfuCache<V> {
    capacity: usize,
    entries: HashMap<Rc<str>, Slot<V>>,
    order: BTreeMap<(u64, u64), Rc<str>>,
    /// The aging term `L`: the priority of the last evicted entry.
    age: u64,
    tick: u64,
    counters: CacheCounters,
}

impl<V> LfuCache<V> {
    /// An empty cache holding at most `capacity` entries (0 disables it).
    pub fn new(capacity: usize) -> Self {
        LfuCache {
            capacity,
            entries: HashMap::new(),
            order: BTreeMap::new(),
            age: 0,
            tick: 0,
            counters: CacheCounters::default(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn counters(&self) -> CacheCounters {
        self.counters
    }

    /// The value for `key`, counting a hit (and a use of the entry) or a miss.
    pub fn get(&mut self, key: &str) -> Option<&V> {
        self.tick += 1;
        let Some(slot) = self.entries.get_mut(key) else {
            self.counters.misses += 1;
            return None;
        };
        self.counters.hits += 1;
        let name = self
            .order
            .remove(&slot.rank)
            .expect("every entry is in the order map");
        slot.hits += 1;
        slot.rank = (self.age + slot.hits, self.tick);
        self.order.insert(slot.rank, name);
        Some(&slot.value)
    }

    /// Stores `value` under `key` (replacing and re-ranking an existing entry), evicting the
    /// lowest-priority entry when the cache is full. Does nothing when the capacity is 0.
    pub fn insert(&mut self, key: &str, value: V) {
        if self.capacity == 0 {
            return;
        }
        self.tick += 1;
        if let Some(slot) = self.entries.get_mut(key) {
            let name = self
                .order
                .remove(&slot.rank)
                .expect("every entry is in the order map");
            slot.value = value;
            slot.hits += 1;
            slot.rank = (self.age + slot.hits, self.tick);
            self.order.insert(slot.rank, name);
            return;
        }
        if self.entries.len() >= self.capacity {
            if let Some(((priority, _), victim)) = self.order.pop_first() {
                self.entries.remove(&victim);
                self.age = priority;
                self.counters.evictions += 1;
            }
        }
        let name: Rc<str> = Rc::from(key);
        let rank = (self.age + 1, self.tick);
        self.order.insert(rank, name.clone());
        self.entries.insert(
            name,
            Slot {
                value,
                hits: 1,
                rank,
            },
        );
    }

    /// Removes every entry and releases the maps' memory; counters are kept.
    pub fn clear(&mut self) {
        self.entries = HashMap::new();
        self.order = BTreeMap::new();
        self.age = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_frequently_used_and_evicts_the_rest() {
        let mut cache = LfuCache::new(2);
        cache.insert("a", 1);
        cache.insert("b", 2);
        assert_eq!(cache.get("a"), Some(&1));
        assert_eq!(cache.get("a"), Some(&1));
        // "b" has one use, "a" three: "b" goes.
        cache.insert("c", 3);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get("b"), None);
        assert_eq!(cache.get("a"), Some(&1));
        assert_eq!(cache.get("c"), Some(&3));
        let counters = cache.counters();
        assert_eq!(
            (counters.hits, counters.misses, counters.evictions),
            (4, 1, 1)
        );
        assert!((counters.hit_ratio() - 0.8).abs() < 1e-9);
    }

    #[test]
    fn ties_evict_the_least_recently_used() {
        let mut cache = LfuCache::new(2);
        cache.insert("a", 1);
        cache.insert("b", 2);
        cache.insert("c", 3);
        assert_eq!(cache.get("a"), None, "a was older than b at equal counts");
        assert_eq!(cache.get("b"), Some(&2));
    }

    #[test]
    fn aging_lets_new_popular_entries_replace_old_ones() {
        let mut cache = LfuCache::new(2);
        cache.insert("old", 0);
        for _ in 0..5 {
            cache.get("old");
        }
        // A stream of one-off keys ages the cache: each eviction raises L.
        for i in 0..4 {
            cache.insert(&format!("once-{i}"), i);
        }
        assert!(cache.get("old").is_some(), "6 uses outlive 4 one-off keys");
        for i in 0..40 {
            cache.insert(&format!("more-{i}"), i);
        }
        assert_eq!(cache.get("old"), None, "but not forever");
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn insert_replaces_and_zero_capacity_stores_nothing() {
        let mut cache = LfuCache::new(3);
        cache.insert("a", 1);
        cache.insert("a", 2);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get("a"), Some(&2));
        cache.clear();
        assert!(cache.is_empty());
        assert_eq!(cache.get("a"), None);

        let mut off = LfuCache::new(0);
        off.insert("a", 1);
        assert!(off.is_empty());
        assert_eq!(off.get("a"), None);
        assert_eq!(off.counters().misses, 1);
    }

    #[test]
    fn stays_bounded_and_consistent_under_a_mixed_stream() {
        let mut cache = LfuCache::new(50);
        let mut state = 7u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Skewed keys: key k comes with probability ~1/k², so the 50 most frequent keys
            // get ~98% of the lookups.
            let key = format!("k{}", 1000 / (1 + state % 1000));
            if cache.get(&key).is_none() {
                cache.insert(&key, state);
            }
            assert!(cache.len() <= 50);
            assert_eq!(cache.entries.len(), cache.order.len());
        }
        assert!(cache.counters().hit_ratio() > 0.9, "{:?}", cache.counters());
    }
}
