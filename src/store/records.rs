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
