//! `shards`: a small thread-per-core runtime on glommio (io_uring).
//!
//! It knows nothing about customer service. It starts one glommio executor per
//! configured core, pinned to that core, hands each one its own listening socket
//! per configured address (every shard's socket for an address bound with
//! `SO_REUSEPORT`, so the kernel spreads connections over the shards), and
//! connects every pair of shards with a typed, bounded channel (a full mesh).
//!
//! Invariants:
//! - Shards share nothing but the mesh and the [`Shutdown`] flag; per-shard state is
//!   created inside the shard's thread and never leaves it.
//! - Shard ids are dense `0..count` and stable for a given configuration;
//!   [`owner_of`] maps a key to a shard with a hash that never changes between
//!   versions, so routing decisions can be persisted.
//! - Sockets are created and bound before any shard starts, so a bind error is
//!   reported synchronously and a port of 0 resolves to one port shared by all.

mod listener;
mod mesh;
mod runtime;

pub use listener::{bind_reuseport, ListenerError};
pub use mesh::{Mesh, MeshError};
pub use runtime::{current_shard, Runtime, RuntimeConfig, RuntimeError, ShardContext, Shutdown};

/// Index of a shard, dense in `0..shard_count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardId(pub usize);

impl std::fmt::Display for ShardId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "shard-{}", self.0)
    }
}

/// 64-bit FNV-1a. Chosen because it is fixed forever (unlike `std`'s
/// `DefaultHasher`, whose algorithm may change between Rust releases) and cheap
/// for the short keys routed here.
pub fn stable_hash(key: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final avalanche (from splitmix64) so that keys differing only in their
    // last bytes still spread over a small number of shards.
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// The shard that owns `key` among `shard_count` shards.
///
/// # Panics
/// If `shard_count` is zero.
pub fn owner_of(key: &[u8], shard_count: usize) -> ShardId {
    assert!(shard_count > 0, "owner_of needs at least one shard");
    ShardId((stable_hash(key) % shard_count as u64) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_hash_is_fixed() {
        const PINNED: u64 = 8_475_201_547_905_913_463;
        // These values must never change: routing and storage depend on them.
        assert_eq!(stable_hash(b"conversation-1"), PINNED);
        let a = stable_hash(b"conversation-1");
        let b = stable_hash(b"conversation-2");
        assert_ne!(a, b);
        assert_eq!(stable_hash(b"conversation-1"), a);
        assert_eq!(owner_of(b"x", 1), ShardId(0));
    }

    #[test]
    fn owner_of_spreads_keys() {
        let shards = 4;
        let mut counts = [0usize; 4];
        for i in 0..40_000u32 {
            counts[owner_of(&i.to_le_bytes(), shards).0] += 1;
        }
        for count in counts {
            assert!(
                (9_000..11_000).contains(&count),
                "uneven spread: {counts:?}"
            );
        }
    }
}
