//! The write operations a shard store applies in one transaction, and their outcomes.
//!
//! Invariants:
//! - Operations of one `apply` call run in order inside ONE LMDB write transaction, so a
//!   later operation sees the effects of an earlier one (a duplicate inside the same batch
//!   is recognised, seqs stay dense when one batch holds several messages of a conversation).
//! - Outcome `i` belongs to operation `i`. A [`Rejection`] outcome means that operation
//!   wrote nothing; the other operations still commit.

use super::error::Rejection;
use super::records::{Author, ConversationId, ConversationState};

/// A message to append; the store gives it its seq and timestamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub conversation: ConversationId,
    pub from: Author,
    /// Display name of the sender.
    pub name: String,
    pub text: String,
    /// The sender's message id. A message whose id was already stored in the same
    /// conversation is not stored again: its outcome is `Duplicate` with the original seq.
    pub client_id: Option<String>,
}

/// Which side's read watermark an operation moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadSide {
    Visitor,
    Agent,
}

/// One write operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Finds the open conversation of `(site, visitor)`, or creates one in state `Bot`.
    Open { site: String, visitor: String },
    /// Appends a message (deduplicated by `client_id`).
    Append(NewMessage),
    /// Moves a conversation to `state`. Closing removes it from the open list and the
    /// visitor index. A closed conversation accepts no further state change or message.
    SetState {
        conversation: ConversationId,
        state: ConversationState,
    },
    /// Raises a read watermark to `min(seq, last_seq)`; it never goes down.
    MarkRead {
        conversation: ConversationId,
        side: ReadSide,
        seq: u64,
    },
    /// Deletes a conversation in which no message was ever stored (`last_seq == 0`) and
    /// that no agent holds: its record, its open entry and the visitor's pointer to it.
    /// `Updated` when deleted; `Rejected(NotEmpty)` when it has messages or an agent.
    DeleteEmpty { conversation: ConversationId },
    /// Records the SHA-256 of a visitor's secret, unless one is stored already (the
    /// first stored secret of a visitor id stays). Outcome `Updated`.
    SetVisitorSecret {
        site: String,
        visitor: String,
        secret_hash: [u8; 32],
    },
    /// Records the gray-release variant (`[[bot.variants]]` name) a conversation is served by,
    /// unless one is stored already (the first stays: a conversation keeps its variant).
    /// Outcome `Updated`; `Rejected` for an unknown or closed conversation or an empty or
    /// over-long name.
    SetVariant {
        conversation: ConversationId,
        variant: String,
    },
    /// Records the number of consecutive failed bot turns.
    SetFailedBotTurns {
        conversation: ConversationId,
        count: u32,
    },
}

/// What one operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpOutcome {
    /// `Open`: the visitor's open conversation, `created` when it is new.
    Opened {
        conversation: ConversationId,
        created: bool,
        last_seq: u64,
    },
    /// `Append`: stored with this seq and timestamp.
    Stored { seq: u64, ts_ms: u64 },
    /// `Append`: this client id was stored before, under `seq`; nothing new was written.
    Duplicate { seq: u64 },
    /// `MarkRead`: the watermark after the operation.
    ReadMarked { watermark: u64 },
    /// `SetState`, `SetFailedBotTurns`, `SetVisitorSecret`, `SetVariant`: applied (possibly a no-op when nothing changed).
    Updated,
    /// The operation was refused and wrote nothing.
    Rejected(Rejection),
}

/// What one message of [`ShardStore::append_batch`](super::ShardStore::append_batch) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Stored with this seq and timestamp.
    Stored { seq: u64, ts_ms: u64 },
    /// The client id was stored before under `seq`; ack it again with that seq.
    Duplicate { seq: u64 },
    /// Refused; nothing was written for this message.
    Rejected(Rejection),
}

impl AppendOutcome {
    /// The seq to acknowledge, if the message is (now or earlier) stored.
    pub fn seq(&self) -> Option<u64> {
        match self {
            AppendOutcome::Stored { seq, .. } | AppendOutcome::Duplicate { seq } => Some(*seq),
            AppendOutcome::Rejected(_) => None,
        }
    }
}
