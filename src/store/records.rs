//! Records kept in a shard's LMDB environment, and the ids that name them.
//!
//! Invariants:
//! - Records are rkyv-archived with the `unaligned` rkyv feature: LMDB only guarantees
//!   2-byte alignment for values inside a page, so every archived type here must have
//!   alignment 1 to be read in place (checked at compile time below).
//! - A [`ConversationId`] carries the shard that owns it in its low [`SHARD_BITS`] bits,
//!   and stays below 2^53 so it survives a round trip through a JavaScript number.
//! - `MessageRecord::seq` equals the seq in the record's key; seqs are dense from 1.

use rkyv::{Archive, Deserialize, Serialize};

/// Bits of a [`ConversationId`] that name the owning shard.
pub const SHARD_BITS: u32 = 8;
/// Highest number of shards a store layout supports.
pub const MAX_SHARDS: usize = 1 << SHARD_BITS;
/// Highest per-shard conversation counter that keeps ids below 2^53.
pub const MAX_LOCAL_CONVERSATION: u64 = (1 << (53 - SHARD_BITS)) - 1;

/// Names one conversation across the whole appliance.
///
/// Layout: `local << SHARD_BITS | shard`, where `local` is a counter kept by the owning
/// shard's store (starting at 1) and `shard` is that shard's index.
#[derive(
    Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
pub struct ConversationId(pub u64);

impl ConversationId {
    /// Builds the id of the `local`-th conversation created by `shard`.
    pub fn from_parts(shard: usize, local: u64) -> Self {
        debug_assert!(shard < MAX_SHARDS && local <= MAX_LOCAL_CONVERSATION);
        ConversationId((local << SHARD_BITS) | shard as u64)
    }

    /// The shard that owns (orders and stores) this conversation.
    pub fn shard(self) -> usize {
        (self.0 & (MAX_SHARDS as u64 - 1)) as usize
    }

    /// The per-shard counter part of the id.
    pub fn local(self) -> u64 {
        self.0 >> SHARD_BITS
    }
}

/// A hash map keyed by [`ConversationId`], hashed by [`ConversationIdHasher`] instead of
/// SipHash. The maps on the message path (the owner's live conversations, the store's staged
/// ones, the re-send windows) look an id up several times per message, and SipHash's setup and
/// rounds were about 1% of the server's CPU at 60,000 relayed round trips/s. Their keys are ids
/// the server minted; the hash starts from a random per-process seed, so ids a client collects
/// (by opening many conversations) do not tell it which ones share a bucket.
pub type ConversationMap<V> = std::collections::HashMap<ConversationId, V, ConversationIdState>;

/// Builds [`ConversationIdHasher`]s from this process's seed.
#[derive(Clone, Copy, Debug)]
pub struct ConversationIdState {
    seed: u64,
}

impl Default for ConversationIdState {
    fn default() -> Self {
        static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let seed = *SEED.get_or_init(|| {
            use std::hash::BuildHasher;
            std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64)
        });
        ConversationIdState { seed }
    }
}

impl std::hash::BuildHasher for ConversationIdState {
    type Hasher = ConversationIdHasher;

    fn build_hasher(&self) -> ConversationIdHasher {
        ConversationIdHasher(self.seed)
    }
}

/// Mixes each written word into its state (FxHash's step) and finishes with splitmix64's
/// finaliser, so every bit of the id reaches every bit of the hash: an id's low [`SHARD_BITS`]
/// are the same for all of one shard's ids, and the identity or a plain multiplication would
/// crowd them into a few buckets.
pub struct ConversationIdHasher(u64);

impl ConversationIdHasher {
    fn mix(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl std::hash::Hasher for ConversationIdHasher {
    fn finish(&self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not used by `ConversationId` (its derived `Hash` writes one u64); kept correct.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.mix(value);
    }
}

impl std::fmt::Display for ConversationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Who wrote a message.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug, Clone, Copy, PartialEq, Eq))]
pub enum Author {
    Visitor,
    Bot,
    Agent,
    System,
}

impl Author {
    /// The protocol name (`"visitor"`, `"bot"`, `"agent"`, `"system"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Author::Visitor => "visitor",
            Author::Bot => "bot",
            Author::Agent => "agent",
            Author::System => "system",
        }
    }
}

impl ArchivedAuthor {
    /// The native value of an archived author.
    pub fn to_native(self) -> Author {
        match self {
            ArchivedAuthor::Visitor => Author::Visitor,
            ArchivedAuthor::Bot => Author::Bot,
            ArchivedAuthor::Agent => Author::Agent,
            ArchivedAuthor::System => Author::System,
        }
    }
}

/// One stored message. Key: big-endian `(conversation, seq)`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct MessageRecord {
    /// Position in the conversation, dense from 1.
    pub seq: u64,
    pub from: Author,
    /// Display name of the sender (agent name, bot name, visitor label).
    pub name: String,
    pub text: String,
    /// Unix time in milliseconds, never decreasing within a conversation.
    pub ts_ms: u64,
    /// The sender's own message id, used to deduplicate re-sends.
    pub client_id: Option<String>,
}

impl ArchivedMessageRecord {
    pub fn seq(&self) -> u64 {
        self.seq.to_native()
    }
    pub fn from(&self) -> Author {
        self.from.to_native()
    }
    pub fn name(&self) -> &str {
        self.name.as_str()
    }
    pub fn text(&self) -> &str {
        self.text.as_str()
    }
    pub fn ts_ms(&self) -> u64 {
        self.ts_ms.to_native()
    }
    pub fn client_id(&self) -> Option<&str> {
        self.client_id.as_ref().map(|id| id.as_str())
    }
    /// Copies the archived record out (for tests and rare slow paths).
    pub fn to_owned_record(&self) -> MessageRecord {
        MessageRecord {
            seq: self.seq(),
            from: self.from(),
            name: self.name().to_owned(),
            text: self.text().to_owned(),
            ts_ms: self.ts_ms(),
            client_id: self.client_id().map(str::to_owned),
        }
    }
}

/// Where a conversation is in its life cycle.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub enum ConversationState {
    /// The bot answers.
    Bot,
    /// Waiting for an agent; queue order is `(state_since_ms, id)`.
    Queued,
    /// An agent owns the conversation.
    Assigned { agent: String },
    /// Terminal: no more messages or state changes; the visitor index no longer points here.
    Closed,
}

/// Per-conversation metadata. Key: big-endian conversation id.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Conversation {
    pub id: ConversationId,
    pub site: String,
    pub visitor: String,
    pub state: ConversationState,
    /// When `state` last changed (unix ms); orders the queue.
    pub state_since_ms: u64,
    /// Seq of the newest message, 0 when there is none.
    pub last_seq: u64,
    pub created_ms: u64,
    /// Last time anything in the conversation changed (unix ms).
    pub updated_ms: u64,
    /// Highest seq the visitor side has read (never above `last_seq`, never decreasing).
    pub visitor_read: u64,
    /// Highest seq the agent side has read (never above `last_seq`, never decreasing).
    pub agent_read: u64,
    /// Consecutive bot turns that failed to answer; the router hands off past a limit.
    pub failed_bot_turns: u32,
}

// LMDB values sit at 2-byte aligned addresses; reading them in place needs alignment 1.
const _: () = assert!(
    std::mem::align_of::<ArchivedMessageRecord>() == 1
        && std::mem::align_of::<ArchivedConversation>() == 1,
    "enable rkyv's `unaligned` feature: LMDB values are not 8-byte aligned"
);

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, Hash, Hasher};

    #[test]
    fn one_shards_conversation_ids_spread_over_the_buckets() {
        let build = ConversationIdState::default();
        for shard in [0, 1, 7] {
            let mut buckets = std::collections::HashSet::new();
            let mut tags = std::collections::HashSet::new();
            for local in 1..=4096 {
                let hash = build.hash_one(ConversationId::from_parts(shard, local));
                buckets.insert(hash & 4095);
                tags.insert(hash >> 57);
            }
            // 4,096 keys thrown at random into 4,096 buckets fill about 63% of them.
            assert!(
                buckets.len() > 2400,
                "shard {shard}: {} buckets",
                buckets.len()
            );
            assert_eq!(tags.len(), 128, "the top 7 bits (hashbrown's tag) vary too");
        }
        // Two words in either order hash apart (a tuple key would not collide with its mirror).
        let hash_of = |words: &[u64]| {
            let mut hasher = build.build_hasher();
            for word in words {
                word.hash(&mut hasher);
            }
            hasher.finish()
        };
        assert_ne!(hash_of(&[1, 2]), hash_of(&[2, 1]));
        assert_ne!(hash_of(&[3, 3]), hash_of(&[]));
        let mut map = ConversationMap::default();
        map.insert(ConversationId(5), "five");
        assert_eq!(map.get(&ConversationId(5)), Some(&"five"));
        assert_eq!(map.get(&ConversationId(6)), None);
    }
}
