//! Conversations: visitor↔agent routing across shards.
//!
//! - [`protocol`]: the JSON frames (parse and render), pure.
//! - [`clock`]: the monotonic time base of the state machines' timers.
//! - [`owner`]: the state of the conversations a shard owns — ordering,
//!   storage, fan-out, typing, read watermarks — as a pure state machine.
//! - [`dispatch`]: the global queue and agent directory (one shard runs it),
//!   pure.
//! - [`bot_turn`]: one bot turn (answer chain, intent recognition, later answers, fallback)
//!   as a pure state machine.
//! - [`identity`]: visitor secrets and host-verified identities (hashing,
//!   constant-time checks, HMAC), so a visitor id alone opens nothing.
//! - [`router`]: the shard-local driver that runs the state machines,
//!   executes their actions (storage commits, mesh messages, frames to
//!   sessions, bot turns) and feeds results back.
//!
//! Ownership: a conversation's id carries the shard that owns it; that shard
//! is `owner_of(site, visitor)` when the conversation is created, so a visitor
//! always finds their conversation on one shard. Sessions live on whatever
//! shard accepted their socket; they reach owners only through mesh messages.

pub mod bot_turn;
pub mod clock;
pub mod dispatch;
pub mod identity;
pub mod owner;
pub mod protocol;
pub mod query;
pub mod router;
#[cfg(test)]
mod simulation;

use crate::arena::SessionId;

/// A session somewhere in the process: its shard and its arena id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionRef {
    pub shard: usize,
    pub session: SessionId,
}

impl SessionRef {
    /// Packs into the `u64` form the dispatcher keys sessions by.
    pub fn to_dispatch(self) -> dispatch::SessionRef {
        dispatch::SessionRef {
            shard: self.shard,
            session: self.session.to_u64(),
        }
    }

    /// Unpacks the dispatcher's form.
    pub fn from_dispatch(session: dispatch::SessionRef) -> Self {
        SessionRef {
            shard: session.shard,
            session: SessionId::from_u64(session.session),
        }
    }
}

/// The shard that owns the conversation of `(site, visitor)`.
pub fn visitor_owner(site: &str, visitor: &str, shard_count: usize) -> usize {
    let mut key = Vec::with_capacity(site.len() + visitor.len() + 1);
    key.extend_from_slice(site.as_bytes());
    key.push(0);
    key.extend_from_slice(visitor.as_bytes());
    shards::owner_of(&key, shard_count).0
}

/// The shard that runs the queue and the agent directory.
pub fn dispatcher_shard(shard_count: usize) -> usize {
    shards::owner_of(b"switchboard/dispatcher", shard_count).0
}
