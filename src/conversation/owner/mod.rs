//! The conversations one shard owns, as a pure state machine.
//!
//! Events come in (a visitor attached, a frame arrived, a commit finished, the
//! dispatcher assigned an agent); actions go out (store these operations,
//! send this frame to that session, tell the dispatcher, replay history). The
//! router executes actions and feeds commit results back as
//! [`OwnerEvent::Committed`]. Nothing here does I/O or reads a clock.
//!
//! Invariants:
//! - Every message reaches storage before anyone but its sender hears of it:
//!   fan-out and acks are emitted only from `Committed` outcomes, so an ack
//!   means durable and `seq` is the order every reader sees.
//! - A session is told about a seq at most once: replays cover
//!   `(after, last_seq]` where `last_seq` is what this machine has fanned out
//!   so far, and later seqs arrive only through fan-out.
//! - Agents act only on conversations assigned to them; visitors only ever
//!   address their own conversation (their frames are routed by their key, not
//!   by a conversation id they could forge).
//! - A session is attached to an existing visitor id only with that visitor's
//!   secret (compared by hash in constant time) or a verified identity; else it
//!   is moved to a fresh visitor id (see [`super::identity`]), and the owner
//!   resolves its frames to that id from then on. What storage knows about an
//!   id (secret hash, open conversation) arrives as an event after a
//!   [`OwnerAction::LoadVisitor`], never through a read in here.
//! - A conversation is created by a visitor's first `message` or `handoff`, not
//!   by connecting: a visitor without one is greeted with `"conversation":null`.
//! - Typing: each side forwards at most one change per `typing_interval`; a
//!   change inside the interval is held and its final state sent at the first
//!   tick after the interval ends.
//!
//! Files by role: this one holds the types, events, actions and `handle`; `visitor` the visitor
//! side (attach, greet, frames, open), `agent` the agent side and what the dispatcher tells the
//! owner, `commit` what happens once storage answered, `typing` the throttled indicators, `tests`
//! the unit tests.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;

use super::dispatch::DispatchEvent;
use super::protocol::{self, AgentFrame, VisitorFrame};
use super::SessionRef;
use crate::admission::shed;
use crate::audit::AuditEvent;
use crate::auth::rbac::{self, Action, Role};
use crate::ratelimit::RetryAfter;
use crate::store::{
    Author, Conversation, ConversationId, ConversationMap, ConversationState, NewMessage, Op,
    OpOutcome, ReadSide,
};

mod agent;
mod commit;
#[cfg(test)]
mod tests;
mod typing;
mod visitor;

use commit::op_conversation;
use typing::Typing;

/// A visitor's identity on a site: `site` and visitor id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VisitorKey {
    pub site: Arc<str>,
    pub visitor: Arc<str>,
}

/// What a visitor connection presented to be attached to its claimed visitor id,
/// and what the owner gives it if it becomes a new visitor.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// SHA-256 of the `secret` the client presented, if any.
    pub secret_hash: Option<[u8; 32]>,
    /// The host site vouched for the visitor id (a valid `identity_hash`).
    pub verified: bool,
    /// Drawn by the driver for this connection: a secret issued if the session
    /// starts a visitor, and a replacement visitor id (owned by the same shard)
    /// used if the claimed id is refused.
    pub fresh: FreshVisitor,
}

/// A random visitor id and secret the owner may hand out.
#[derive(Debug, Clone)]
pub struct FreshVisitor {
    pub visitor: Arc<str>,
    pub secret: Box<str>,
    pub secret_hash: [u8; 32],
}

/// Why a group commit stored nothing (the `Err` of [`OwnerEvent::Committed`]): the
/// `error` frame code the sender gets (`storage_error`, or `storage_full` while the store
/// has no space) and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitFailure {
    pub code: &'static str,
    pub message: String,
}

/// What storage knows about a visitor id (the answer to [`OwnerAction::LoadVisitor`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredVisitor {
    /// SHA-256 of the visitor's secret.
    pub secret_hash: Option<[u8; 32]>,
    /// The visitor's open conversation.
    pub conversation: Option<ConversationId>,
}

/// Settings of the owner state machine.
#[derive(Clone, Debug)]
pub struct OwnerConfig {
    /// This shard's index.
    pub shard: usize,
    /// Whether a bot answers conversations in state `Bot`. Without one, a
    /// visitor's first message queues the conversation for a human.
    pub bot_enabled: bool,
    /// Minimum time between two forwarded typing indicators of one side.
    pub typing_interval_ms: u64,
    /// A typing indicator not renewed within this time is switched off.
    pub typing_expiry_ms: u64,
    /// Display names of agent accounts by id (for conversations loaded from
    /// storage, which records only the id).
    pub agent_names: HashMap<String, String>,
    /// Frames of one visitor that may wait while its conversation is being opened
    /// (`[limits] max_opening_frames`); further ones are refused with `overloaded`.
    pub max_opening_frames: usize,
}

/// How long a visitor refused for too many frames waiting on its conversation's opening is told
/// to wait: about one group commit.
const OPENING_RETRY_MS: u64 = 100;

/// What happened.
#[derive(Debug)]
pub enum OwnerEvent {
    VisitorAttach {
        key: VisitorKey,
        resume: Option<u64>,
        session: SessionRef,
        /// Boxed: it is large, and this enum travels through the mesh channels.
        credentials: Box<Credentials>,
        /// `None` until the driver has looked the id up ([`OwnerAction::LoadVisitor`]).
        stored: Option<Box<StoredVisitor>>,
    },
    VisitorDetach {
        key: VisitorKey,
        session: SessionRef,
    },
    Visitor {
        key: VisitorKey,
        session: SessionRef,
        frame: VisitorFrame,
    },
    /// A conversation-scoped agent frame (message, typing, read, close).
    /// A frame of an agent session; `name` is the account's display name and `role` its
    /// role, both carried by the session (accounts live in the account store, not here).
    Agent {
        agent: String,
        name: String,
        role: Role,
        session: SessionRef,
        frame: AgentFrame,
    },
    /// An agent session wants the conversations assigned to its agent.
    AgentSubscribe {
        conversation: ConversationId,
        agent: String,
        session: SessionRef,
    },
    AgentUnsubscribe {
        conversation: ConversationId,
        session: SessionRef,
    },
    Assigned {
        conversation: ConversationId,
        agent: String,
        agent_name: String,
        sessions: Vec<SessionRef>,
    },
    Transferred {
        conversation: ConversationId,
        to: String,
        to_name: String,
        sessions: Vec<SessionRef>,
    },
    Requeued {
        conversation: ConversationId,
    },
    QueuePosition {
        conversation: ConversationId,
        position: usize,
    },
    /// No agent is online: the visitors of these queued conversations are told
    /// (`no_agents`) that they may leave a message; the conversations stay queued.
    NoAgents {
        conversations: Vec<ConversationId>,
    },
    /// A store operation finished; `op` is handed back with its outcome.
    Committed {
        completion: Completion,
        op: Op,
        outcome: Result<OpOutcome, CommitFailure>,
    },
    /// Internal: greet sessions once a just-opened conversation is loaded.
    Greet {
        key: VisitorKey,
        conversation: ConversationId,
        awaiting: Vec<(SessionRef, Option<u64>)>,
        reattached: Vec<SessionRef>,
        pending: Vec<(SessionRef, VisitorFrame)>,
    },
    /// The bot's answer to a visitor message.
    BotVerdict {
        conversation: ConversationId,
        verdict: BotOutcome,
        /// The gray-release variant this turn assigned the conversation (its first bot turn),
        /// to store with it before the answer; `None` when it had one (`bot::gray`).
        variant: Option<String>,
    },
    /// About once a second: expire typing indicators.
    Tick,
    /// Storage lists this conversation as empty (no message ever stored, no
    /// agent) and idle past `[visitors] empty_conversation_ttl`: delete it
    /// unless someone is connected to it or it changed meanwhile.
    ExpireEmpty {
        conversation: ConversationId,
    },
}

/// What the bot decided about a visitor message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BotOutcome {
    /// Answer with `text`; the conversation's failed-turn count becomes `failed_turns`.
    Reply { text: String, failed_turns: u32 },
    /// Queue the conversation for a human.
    Handoff,
    /// Say nothing.
    Silent,
}

/// What to do.
#[derive(Debug)]
pub enum OwnerAction {
    /// Apply `op` in the next group commit, then feed back `Committed`.
    Store { op: Op, completion: Completion },
    /// Send a text frame to a session.
    Send { to: SessionRef, frame: Arc<str> },
    /// Send a session its `hello`; frames that reached it earlier are held
    /// back until then.
    Hello { to: SessionRef, frame: Arc<str> },
    /// Send stored messages `(after, up_to]` of a conversation to sessions.
    Replay {
        to: Vec<SessionRef>,
        conversation: ConversationId,
        after: u64,
        up_to: u64,
    },
    /// Tell the dispatcher.
    Dispatch(DispatchEvent),
    /// Tell an agent session's shard that it follows a conversation (so it
    /// can unsubscribe when it closes).
    Track {
        session: SessionRef,
        conversation: ConversationId,
    },
    /// Ask the bot about a visitor message (stored as `text`); the answer
    /// comes back as [`OwnerEvent::BotVerdict`].
    Bot {
        conversation: ConversationId,
        site: Arc<str>,
        visitor: Arc<str>,
        text: String,
        failed_turns: u32,
    },
    /// The conversation's metadata is needed: load it from storage and feed
    /// `event` again.
    Load {
        conversation: ConversationId,
        event: Box<OwnerEvent>,
    },
    /// What storage knows about `key` is needed: look up its secret hash and
    /// open conversation, put them in `event` (a `VisitorAttach`) as `stored`
    /// and feed it again.
    LoadVisitor {
        key: VisitorKey,
        event: Box<OwnerEvent>,
    },
    /// Append a record to the audit chain: an agent's action on a conversation whose
    /// outcome is now known (a close committed, a watch granted).
    Audit(AuditEvent),
}

/// What a store operation was for.
#[derive(Debug, Clone)]
pub enum Completion {
    Opened {
        key: VisitorKey,
    },
    VisitorMessage {
        key: VisitorKey,
        session: SessionRef,
        conversation: ConversationId,
        client_id: String,
    },
    AgentMessage {
        session: SessionRef,
        conversation: ConversationId,
        client_id: String,
    },
    Read {
        conversation: ConversationId,
        side: ReadSide,
    },
    StateChanged {
        conversation: ConversationId,
    },
    /// An agent closed the conversation (audited once the close is committed).
    ClosedBy {
        conversation: ConversationId,
        agent: String,
    },
    BotMessage {
        conversation: ConversationId,
    },
    SecretStored {
        key: VisitorKey,
    },
    Expired {
        conversation: ConversationId,
    },
}

#[derive(Debug, Default)]
struct VisitorEntry {
    conversation: Option<ConversationId>,
    opening: bool,
    /// SHA-256 of the visitor's secret; `None` for a visitor from before secrets
    /// existed, which only a verified identity can reattach to.
    secret_hash: Option<[u8; 32]>,
    /// Whether `secret_hash` is in storage (else it is written with the first
    /// conversation).
    secret_stored: bool,
    /// Sessions whose hello still has to carry the secret issued to them.
    issued: Vec<(SessionRef, Box<str>)>,
    sessions: Vec<SessionRef>,
    /// Sessions waiting for their hello, with their resume point.
    awaiting_hello: Vec<(SessionRef, Option<u64>)>,
    /// Frames that arrived while the conversation was being opened.
    pending: Vec<(SessionRef, VisitorFrame)>,
}

#[derive(Debug)]
struct Live {
    meta: Conversation,
    key: VisitorKey,
    agent: Option<(String, String)>,
    agent_sessions: Vec<SessionRef>,
    /// Sessions that watch the conversation without holding it (a supervisor's `watch`):
    /// they hear what its agent hears but cannot act in it. Never also in `agent_sessions`.
    watchers: Vec<SessionRef>,
    /// Each side's typing indicator as the other side sees it.
    visitor_typing: Typing,
    agent_typing: Typing,
    /// Store operations of this conversation not yet committed; a conversation
    /// is never evicted from memory while this is non-zero, so a reload from
    /// storage never sees a seq the fan-out has not handled.
    in_flight: u32,
}

impl Live {
    /// The agent sessions that hear the conversation: its agent's, then its watchers.
    fn followers(&self) -> impl Iterator<Item = &SessionRef> + '_ {
        self.agent_sessions.iter().chain(self.watchers.iter())
    }
}

/// The conversations owned by one shard.
pub struct Owner {
    config: OwnerConfig,
    visitors: HashMap<VisitorKey, VisitorEntry>,
    live: ConversationMap<Live>,
    /// Sessions whose claimed visitor id was refused, and the fresh visitor they
    /// were moved to (their frames still name the claimed key).
    moved: HashMap<SessionRef, VisitorKey>,
}

#[derive(Serialize)]
struct MessageFrame<'a> {
    r#type: &'static str,
    conversation: u64,
    seq: u64,
    from: &'a str,
    name: &'a str,
    text: &'a str,
    ts: String,
}

/// Renders a stored message as the `message` frame.
pub fn message_frame(
    conversation: ConversationId,
    seq: u64,
    from: Author,
    name: &str,
    text: &str,
    ts_ms: u64,
) -> String {
    protocol::render(&MessageFrame {
        r#type: "message",
        conversation: conversation.0,
        seq,
        from: from.as_str(),
        name,
        text,
        ts: protocol::rfc3339(ts_ms),
    })
}

/// The `ack` frame of a stored message. Rendered from a struct, not a `json!` value: one ack
/// per message made the value's map and its owned keys 1.8% of the server's CPU at 20,000
/// round trips/s (`perf`). The fields are in the order a `serde_json::Value` map sorts them,
/// so the bytes are those the `json!` form gave.
fn ack_frame(client_id: &str, conversation: ConversationId, seq: u64) -> Arc<str> {
    #[derive(Serialize)]
    struct AckFrame<'a> {
        conversation: u64,
        id: &'a str,
        seq: u64,
        r#type: &'static str,
    }
    Arc::from(protocol::render(&AckFrame {
        conversation: conversation.0,
        id: client_id,
        seq,
        r#type: "ack",
    }))
}

fn frame(value: serde_json::Value) -> Arc<str> {
    Arc::from(value.to_string())
}

fn error(code: &str, message: &str) -> Arc<str> {
    Arc::from(protocol::error_frame(code, message))
}

impl Owner {
    pub fn new(config: OwnerConfig) -> Self {
        Owner {
            config,
            visitors: HashMap::new(),
            live: ConversationMap::default(),
            moved: HashMap::new(),
        }
    }

    /// The visitor a session's frames belong to: its claimed `key`, or the fresh
    /// visitor it was moved to when the claim was refused.
    /// A new bound on frames waiting for an opening conversation (a configuration reload).
    pub fn set_max_opening_frames(&mut self, max_opening_frames: usize) {
        self.config.max_opening_frames = max_opening_frames;
    }

    pub fn visitor_of(&self, key: &VisitorKey, session: SessionRef) -> VisitorKey {
        self.moved.get(&session).unwrap_or(key).clone()
    }

    /// Number of conversations held in memory.
    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    /// Whether `conversation`'s metadata is in memory.
    pub fn is_live(&self, conversation: ConversationId) -> bool {
        self.live.contains_key(&conversation)
    }

    /// Puts a conversation loaded from storage in memory (answer to `Load`).
    pub fn insert_loaded(&mut self, meta: Conversation) {
        let key = VisitorKey {
            site: meta.site.as_str().into(),
            visitor: meta.visitor.as_str().into(),
        };
        let agent = match &meta.state {
            ConversationState::Assigned { agent } => {
                let name = self.config.agent_names.get(agent).unwrap_or(agent);
                Some((agent.clone(), name.clone()))
            }
            _ => None,
        };
        self.live.entry(meta.id).or_insert(Live {
            meta,
            key,
            agent,
            agent_sessions: Vec::new(),
            watchers: Vec::new(),
            visitor_typing: Typing::default(),
            agent_typing: Typing::default(),
            in_flight: 0,
        });
    }

    /// Handles one event at time `now_ms`, on a monotonic clock (the driver passes
    /// [`super::clock::monotonic_ms`]; typing intervals and expiry are durations). Stored
    /// timestamps come from the store, not from here.
    pub fn handle(&mut self, event: OwnerEvent, now_ms: u64) -> Vec<OwnerAction> {
        let mut out = Vec::new();
        match event {
            OwnerEvent::VisitorAttach {
                key,
                resume,
                session,
                credentials,
                stored,
            } => self.visitor_attach(key, resume, session, credentials, stored, &mut out),
            OwnerEvent::VisitorDetach { key, session } => {
                let key = self.moved.remove(&session).unwrap_or(key);
                self.visitor_detach(&key, session)
            }
            OwnerEvent::Visitor {
                key,
                session,
                frame,
            } => {
                let key = self.visitor_of(&key, session);
                self.visitor_frame(key, session, frame, now_ms, &mut out)
            }
            OwnerEvent::Agent {
                agent,
                name,
                role,
                session,
                frame,
            } => self.agent_frame(agent, name, role, session, frame, now_ms, &mut out),
            OwnerEvent::AgentSubscribe {
                conversation,
                agent,
                session,
            } => self.agent_subscribe(conversation, agent, session, &mut out),
            OwnerEvent::AgentUnsubscribe {
                conversation,
                session,
            } => {
                if let Some(live) = self.live.get_mut(&conversation) {
                    live.agent_sessions.retain(|s| *s != session);
                    live.watchers.retain(|s| *s != session);
                }
                self.maybe_evict(conversation);
            }
            OwnerEvent::Assigned {
                conversation,
                agent,
                agent_name,
                sessions,
            } => self.assigned(conversation, agent, agent_name, sessions, false, &mut out),
            OwnerEvent::Transferred {
                conversation,
                to,
                to_name,
                sessions,
            } => self.assigned(conversation, to, to_name, sessions, true, &mut out),
            OwnerEvent::Requeued { conversation } => self.requeued(conversation, &mut out),
            OwnerEvent::QueuePosition {
                conversation,
                position,
            } => {
                if let Some(live) = self.live.get(&conversation) {
                    let queued = frame(serde_json::json!({
                        "type": "queued",
                        "conversation": conversation.0,
                        "position": position,
                    }));
                    self.send_visitors(&live.key, None, &queued, &mut out);
                } else {
                    // Evicted while its visitor waits (the usual case after a tick): load it
                    // to learn whose it is, then tell them; the next tick evicts it again.
                    out.push(OwnerAction::Load {
                        conversation,
                        event: Box::new(OwnerEvent::QueuePosition {
                            conversation,
                            position,
                        }),
                    });
                }
            }
            OwnerEvent::NoAgents { conversations } => self.no_agents(&conversations, &mut out),
            OwnerEvent::Committed {
                completion,
                op,
                outcome,
            } => self.committed(completion, op, outcome, &mut out),
            OwnerEvent::Greet {
                key,
                conversation,
                awaiting,
                reattached,
                pending,
            } => self.greet_all(key, conversation, awaiting, reattached, pending, &mut out),
            OwnerEvent::BotVerdict {
                conversation,
                verdict,
                variant,
            } => self.bot_verdict(conversation, verdict, variant, &mut out),
            OwnerEvent::Tick => {
                self.flush_typing(now_ms, &mut out);
                self.evict_idle();
            }
            OwnerEvent::ExpireEmpty { conversation } => self.expire_empty(conversation, &mut out),
        }
        for action in &out {
            if let OwnerAction::Store { op, .. } = action {
                if let Some(live) = op_conversation(op).and_then(|c| self.live.get_mut(&c)) {
                    live.in_flight += 1;
                }
            }
        }
        out
    }

    /// Drops from memory the conversations nobody is working on: no agent
    /// session follows them, nothing is being committed, nobody is typing.
    /// Their state is in storage and is loaded again when a frame arrives, so
    /// an idle visitor costs only its session and visitor entry.
    fn evict_idle(&mut self) {
        self.live.retain(|_, live| {
            !live.agent_sessions.is_empty()
                || !live.watchers.is_empty()
                || live.in_flight > 0
                || live.visitor_typing.busy()
                || live.agent_typing.busy()
        });
    }

    /// Drops a conversation from memory when nobody is connected to it and nothing of it
    /// is being committed.
    ///
    /// A conversation with a commit in flight stays (the tick's `evict_idle` drops it
    /// later): evicted, it would be loaded again from a snapshot that may already hold
    /// the commit and greet a returning session from there, and the commit's completion
    /// would then find it gone and skip its in-flight bookkeeping.
    fn maybe_evict(&mut self, conversation: ConversationId) {
        let Some(live) = self.live.get(&conversation) else {
            return;
        };
        let visitors_connected = self
            .visitors
            .get(&live.key)
            .is_some_and(|entry| entry.conversation == Some(conversation));
        if !visitors_connected
            && live.agent_sessions.is_empty()
            && live.watchers.is_empty()
            && live.in_flight == 0
        {
            self.live.remove(&conversation);
        }
    }
}

/// The store action that opens (or finds) the visitor's open conversation.
fn open_op(key: &VisitorKey) -> OwnerAction {
    OwnerAction::Store {
        op: Op::Open {
            site: key.site.to_string(),
            visitor: key.visitor.to_string(),
        },
        completion: Completion::Opened { key: key.clone() },
    }
}
