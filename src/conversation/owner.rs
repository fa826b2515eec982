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
    Author, Conversation, ConversationId, ConversationState, NewMessage, Op, OpOutcome, ReadSide,
};

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
    live: HashMap<ConversationId, Live>,
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
            live: HashMap::new(),
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
            } => self.bot_verdict(conversation, verdict, &mut out),
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

    fn visitor_attach(
        &mut self,
        key: VisitorKey,
        resume: Option<u64>,
        session: SessionRef,
        credentials: Box<Credentials>,
        stored: Option<Box<StoredVisitor>>,
        out: &mut Vec<OwnerAction>,
    ) {
        let presented_ok = |hash: Option<[u8; 32]>| {
            credentials.verified
                || matches!((hash, credentials.secret_hash),
                    (Some(stored), Some(presented)) if super::identity::hashes_match(&stored, &presented))
        };
        let (key, issue) = if let Some(entry) = self.visitors.get(&key) {
            // Someone is connected as this visitor, or it is being opened.
            if presented_ok(entry.secret_hash) {
                (key, false)
            } else {
                (self.move_to_fresh(&key, session, &credentials), true)
            }
        } else {
            let Some(stored) = stored else {
                out.push(OwnerAction::LoadVisitor {
                    key: key.clone(),
                    event: Box::new(OwnerEvent::VisitorAttach {
                        key,
                        resume,
                        session,
                        credentials,
                        stored: None,
                    }),
                });
                return;
            };
            let StoredVisitor {
                secret_hash: stored_hash,
                conversation: stored_conversation,
            } = *stored;
            match (stored_hash, stored_conversation) {
                // Nothing is stored under this id: it becomes this visitor's, with a new secret.
                (None, None) => {
                    self.visitors.insert(
                        key.clone(),
                        VisitorEntry {
                            secret_hash: Some(credentials.fresh.secret_hash),
                            ..VisitorEntry::default()
                        },
                    );
                    (key, true)
                }
                (hash, conversation) if presented_ok(hash) => {
                    self.visitors.insert(
                        key.clone(),
                        VisitorEntry {
                            conversation,
                            secret_hash: hash,
                            secret_stored: hash.is_some(),
                            ..VisitorEntry::default()
                        },
                    );
                    (key, false)
                }
                _ => (self.move_to_fresh(&key, session, &credentials), true),
            }
        };
        let entry = self.visitors.get_mut(&key).expect("entry made above");
        if !entry.sessions.contains(&session) {
            entry.sessions.push(session);
        }
        if issue {
            entry.issued.push((session, credentials.fresh.secret));
        }
        match entry.conversation {
            Some(conversation) if !entry.opening => {
                if self.live.contains_key(&conversation) {
                    self.greet(conversation, session, resume, out);
                } else {
                    out.push(OwnerAction::Load {
                        conversation,
                        event: Box::new(OwnerEvent::Greet {
                            key,
                            conversation,
                            awaiting: vec![(session, resume)],
                            reattached: Vec::new(),
                            pending: Vec::new(),
                        }),
                    });
                }
            }
            // No conversation yet: it is created by the first message or handoff.
            None if !entry.opening => {
                let secret = take_issued(entry, session);
                out.push(OwnerAction::Hello {
                    to: session,
                    frame: hello_frame(&key, None, 0, secret.as_deref()),
                });
            }
            // Its conversation is being opened: greeted once it is.
            _ => entry.awaiting_hello.push((session, resume)),
        }
    }

    /// Moves a session whose claim on `claimed` was refused to the fresh visitor
    /// drawn for it, and returns that visitor's key.
    fn move_to_fresh(
        &mut self,
        claimed: &VisitorKey,
        session: SessionRef,
        credentials: &Credentials,
    ) -> VisitorKey {
        let key = VisitorKey {
            site: claimed.site.clone(),
            visitor: credentials.fresh.visitor.clone(),
        };
        self.moved.insert(session, key.clone());
        self.visitors
            .entry(key.clone())
            .or_insert_with(|| VisitorEntry {
                secret_hash: Some(credentials.fresh.secret_hash),
                ..VisitorEntry::default()
            });
        key
    }

    /// Opens a conversation for the visitor (its first, or a new one after a
    /// close); `frame` runs once it is open. The visitor's secret is stored
    /// first if it is not yet, and the conversation is opened only once that
    /// commit succeeded: queued together, the two ops may land in different
    /// group commits (the first batch full at `max_batch`), and an open that
    /// commits while the secret's batch failed leaves a conversation nobody
    /// can reattach to (a stored conversation without a secret is refused to
    /// every unverified connection, its own visitor's included).
    fn open_conversation(
        &mut self,
        key: &VisitorKey,
        session: SessionRef,
        frame_in: VisitorFrame,
        out: &mut Vec<OwnerAction>,
    ) {
        let Some(entry) = self.visitors.get_mut(key) else {
            return;
        };
        entry.conversation = None;
        entry.opening = true;
        entry.pending.push((session, frame_in));
        if let (Some(secret_hash), false) = (entry.secret_hash, entry.secret_stored) {
            entry.secret_stored = true;
            out.push(OwnerAction::Store {
                op: Op::SetVisitorSecret {
                    site: key.site.to_string(),
                    visitor: key.visitor.to_string(),
                    secret_hash,
                },
                completion: Completion::SecretStored { key: key.clone() },
            });
            // The open follows once the secret is committed (see `committed`).
            return;
        }
        out.push(open_op(key));
    }

    /// Sends a session its hello, the messages it missed and the state.
    fn greet(
        &mut self,
        conversation: ConversationId,
        session: SessionRef,
        resume: Option<u64>,
        out: &mut Vec<OwnerAction>,
    ) {
        let Some(live) = self.live.get(&conversation) else {
            return;
        };
        let last = live.meta.last_seq;
        let secret = self
            .visitors
            .get_mut(&live.key)
            .and_then(|entry| take_issued(entry, session));
        out.push(OwnerAction::Hello {
            to: session,
            frame: hello_frame(&live.key, Some(conversation), last, secret.as_deref()),
        });
        if let Some(after) = resume {
            if after < last {
                out.push(OwnerAction::Replay {
                    to: vec![session],
                    conversation,
                    after,
                    up_to: last,
                });
            }
        }
        match &live.meta.state {
            ConversationState::Assigned { .. } => {
                let name = live.agent.as_ref().map_or("", |(_, name)| name.as_str());
                out.push(OwnerAction::Send {
                    to: session,
                    frame: frame(serde_json::json!({
                        "type": "assigned",
                        "conversation": conversation.0,
                        "agent": name,
                    })),
                });
            }
            ConversationState::Queued => out.push(OwnerAction::Dispatch(DispatchEvent::Enqueue {
                // Idempotent: makes the dispatcher resend this conversation's position.
                conversation: super::dispatch::ConversationId(conversation.0),
                owner: self.config.shard,
            })),
            _ => {}
        }
    }

    fn visitor_detach(&mut self, key: &VisitorKey, session: SessionRef) {
        let Some(entry) = self.visitors.get_mut(key) else {
            return;
        };
        entry.sessions.retain(|s| *s != session);
        entry.awaiting_hello.retain(|(s, _)| *s != session);
        entry.issued.retain(|(s, _)| *s != session);
        if entry.sessions.is_empty() && !entry.opening {
            let conversation = entry.conversation;
            self.visitors.remove(key);
            if let Some(conversation) = conversation {
                self.maybe_evict(conversation);
            }
        }
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

    fn visitor_frame(
        &mut self,
        key: VisitorKey,
        session: SessionRef,
        frame_in: VisitorFrame,
        now_ms: u64,
        out: &mut Vec<OwnerAction>,
    ) {
        let Some(entry) = self.visitors.get_mut(&key) else {
            // The session detached (or never attached) before its frame arrived.
            return;
        };
        let conversation = match entry.conversation {
            Some(conversation) if !entry.opening => conversation,
            None if !entry.opening => {
                // A first message or handoff creates the conversation; typing
                // and read have nobody to tell yet.
                if matches!(
                    frame_in,
                    VisitorFrame::Message { .. } | VisitorFrame::Handoff {}
                ) {
                    self.open_conversation(&key, session, frame_in, out);
                }
                return;
            }
            _ if entry.pending.len() >= self.config.max_opening_frames => {
                // The conversation is still being stored and this visitor keeps sending: refuse
                // rather than queue without bound. A message is re-sent with the same id.
                let frame = match &frame_in {
                    VisitorFrame::Message { id, .. } => Arc::from(shed::overloaded_frame(
                        id,
                        RetryAfter {
                            ms: OPENING_RETRY_MS,
                        },
                    )),
                    _ => error(
                        "overloaded",
                        "too many frames while the conversation opens; retry later",
                    ),
                };
                out.push(OwnerAction::Send { to: session, frame });
                return;
            }
            _ => {
                entry.pending.push((session, frame_in));
                return;
            }
        };
        let Some(live) = self.live.get_mut(&conversation) else {
            out.push(OwnerAction::Load {
                conversation,
                event: Box::new(OwnerEvent::Visitor {
                    key,
                    session,
                    frame: frame_in,
                }),
            });
            return;
        };
        let closed = live.meta.state == ConversationState::Closed;
        match frame_in {
            VisitorFrame::Message { id, text } => {
                if closed {
                    // The visitor writes again after a close: a new conversation.
                    self.open_conversation(&key, session, VisitorFrame::Message { id, text }, out);
                    return;
                }
                out.push(OwnerAction::Store {
                    op: Op::Append(NewMessage {
                        conversation,
                        from: Author::Visitor,
                        name: "visitor".into(),
                        text,
                        client_id: Some(id.clone()),
                    }),
                    completion: Completion::VisitorMessage {
                        key: key.clone(),
                        session,
                        conversation,
                        client_id: id,
                    },
                });
                if live.meta.state == ConversationState::Bot && !self.config.bot_enabled {
                    self.enqueue(conversation, out);
                }
            }
            VisitorFrame::Typing { on } => {
                if closed {
                    return;
                }
                let Some(on) =
                    live.visitor_typing
                        .request(on, now_ms, self.config.typing_interval_ms)
                else {
                    return;
                };
                let typing = frame(serde_json::json!({
                    "type": "typing", "conversation": conversation.0, "from": "visitor", "on": on,
                }));
                for to in live.followers() {
                    out.push(OwnerAction::Send {
                        to: *to,
                        frame: typing.clone(),
                    });
                }
            }
            VisitorFrame::Read { seq } => out.push(OwnerAction::Store {
                op: Op::MarkRead {
                    conversation,
                    side: ReadSide::Visitor,
                    seq,
                },
                completion: Completion::Read {
                    conversation,
                    side: ReadSide::Visitor,
                },
            }),
            VisitorFrame::Handoff {} => match live.meta.state {
                ConversationState::Bot => self.enqueue(conversation, out),
                ConversationState::Closed => out.push(OwnerAction::Send {
                    to: session,
                    frame: error("conversation_closed", "this conversation is closed"),
                }),
                // Already waiting for or talking to a human.
                _ => {}
            },
        }
    }

    /// Deletes an empty, abandoned conversation (see [`OwnerEvent::ExpireEmpty`]).
    fn expire_empty(&mut self, conversation: ConversationId, out: &mut Vec<OwnerAction>) {
        let Some(live) = self.live.get(&conversation) else {
            out.push(OwnerAction::Load {
                conversation,
                event: Box::new(OwnerEvent::ExpireEmpty { conversation }),
            });
            return;
        };
        let someone_connected = !live.agent_sessions.is_empty()
            || !live.watchers.is_empty()
            || self.visitors.get(&live.key).is_some_and(|entry| {
                entry.conversation == Some(conversation) && !entry.sessions.is_empty()
            });
        let abandoned = live.meta.last_seq == 0
            && live.in_flight == 0
            && matches!(
                live.meta.state,
                ConversationState::Bot | ConversationState::Queued
            );
        if someone_connected || !abandoned {
            return;
        }
        out.push(OwnerAction::Store {
            op: Op::DeleteEmpty { conversation },
            completion: Completion::Expired { conversation },
        });
    }

    /// Moves a conversation to the queue (once).
    fn enqueue(&mut self, conversation: ConversationId, out: &mut Vec<OwnerAction>) {
        let Some(live) = self.live.get_mut(&conversation) else {
            return;
        };
        if live.meta.state != ConversationState::Bot {
            return;
        }
        live.meta.state = ConversationState::Queued;
        out.push(OwnerAction::Store {
            op: Op::SetState {
                conversation,
                state: ConversationState::Queued,
            },
            completion: Completion::StateChanged { conversation },
        });
        out.push(OwnerAction::Dispatch(DispatchEvent::Enqueue {
            conversation: super::dispatch::ConversationId(conversation.0),
            owner: self.config.shard,
        }));
    }

    #[allow(clippy::too_many_arguments)]
    fn agent_frame(
        &mut self,
        agent: String,
        name: String,
        role: Role,
        session: SessionRef,
        frame_in: AgentFrame,
        now_ms: u64,
        out: &mut Vec<OwnerAction>,
    ) {
        let Some(conversation) = frame_in.conversation() else {
            return;
        };
        let Some(live) = self.live.get_mut(&conversation) else {
            out.push(OwnerAction::Load {
                conversation,
                event: Box::new(OwnerEvent::Agent {
                    agent,
                    name,
                    role,
                    session,
                    frame: frame_in,
                }),
            });
            return;
        };
        let action = match &frame_in {
            AgentFrame::Close { .. } => Action::CloseAssigned,
            AgentFrame::Watch { .. } | AgentFrame::Unwatch { .. } => Action::ReadAnyConversation,
            _ => Action::MessageAssigned,
        };
        if !rbac::allows(role, action) {
            crate::auth::events::access_denied(&agent, role, &format!("{action:?}"));
            out.push(OwnerAction::Send {
                to: session,
                frame: error(
                    "forbidden",
                    &format!(
                        "role {role} may not do this in conversation {}",
                        conversation.0
                    ),
                ),
            });
            return;
        }
        match frame_in {
            AgentFrame::Watch { .. } => return self.watch(conversation, agent, role, session, out),
            AgentFrame::Unwatch { .. } => {
                live.watchers.retain(|s| *s != session);
                out.push(OwnerAction::Send {
                    to: session,
                    frame: frame(serde_json::json!({
                        "type": "unwatched", "conversation": conversation.0,
                    })),
                });
                self.maybe_evict(conversation);
                return;
            }
            _ => {}
        }
        let assigned =
            matches!(&live.meta.state, ConversationState::Assigned { agent: a } if *a == agent);
        if !assigned {
            out.push(OwnerAction::Send {
                to: session,
                frame: error(
                    "not_assigned",
                    &format!("conversation {} is not assigned to you", conversation.0),
                ),
            });
            return;
        }
        // The display name travels with the session: a conversation loaded from storage
        // (which records only the agent id) learns it from its agent's first frame.
        if let Some((_, shown)) = &mut live.agent {
            if *shown != name {
                *shown = name.clone();
            }
        }
        match frame_in {
            AgentFrame::Message { id, text, .. } => out.push(OwnerAction::Store {
                op: Op::Append(NewMessage {
                    conversation,
                    from: Author::Agent,
                    name,
                    text,
                    client_id: Some(id.clone()),
                }),
                completion: Completion::AgentMessage {
                    session,
                    conversation,
                    client_id: id,
                },
            }),
            AgentFrame::Typing { on, .. } => {
                let Some(on) =
                    live.agent_typing
                        .request(on, now_ms, self.config.typing_interval_ms)
                else {
                    return;
                };
                let typing = frame(serde_json::json!({
                    "type": "typing", "conversation": conversation.0, "from": "agent", "on": on,
                }));
                let key = live.key.clone();
                for to in live.followers().filter(|s| **s != session) {
                    out.push(OwnerAction::Send {
                        to: *to,
                        frame: typing.clone(),
                    });
                }
                self.send_visitors(&key, None, &typing, out);
            }
            AgentFrame::Read { seq, .. } => out.push(OwnerAction::Store {
                op: Op::MarkRead {
                    conversation,
                    side: ReadSide::Agent,
                    seq,
                },
                completion: Completion::Read {
                    conversation,
                    side: ReadSide::Agent,
                },
            }),
            AgentFrame::Close { .. } => {
                live.meta.state = ConversationState::Closed;
                out.push(OwnerAction::Store {
                    op: Op::SetState {
                        conversation,
                        state: ConversationState::Closed,
                    },
                    completion: Completion::ClosedBy {
                        conversation,
                        agent,
                    },
                });
            }
            // Accept, transfer and status go to the dispatcher, not here; watch was
            // handled above.
            AgentFrame::Accept { .. }
            | AgentFrame::Transfer { .. }
            | AgentFrame::Status { .. }
            | AgentFrame::Watch { .. }
            | AgentFrame::Unwatch { .. } => {}
        }
    }

    /// A session allowed `ReadAnyConversation` follows a conversation without taking it:
    /// a `watching` frame, the whole history (replay), then live frames until it unwatches
    /// or closes. A closed conversation's history is sent without subscribing. The caller
    /// has checked the role.
    fn watch(
        &mut self,
        conversation: ConversationId,
        agent: String,
        role: Role,
        session: SessionRef,
        out: &mut Vec<OwnerAction>,
    ) {
        let Some(live) = self.live.get_mut(&conversation) else {
            return;
        };
        let holding = live.agent_sessions.contains(&session);
        let open = live.meta.state != ConversationState::Closed;
        out.push(OwnerAction::Send {
            to: session,
            frame: watching_frame(live),
        });
        // The conversation's own agent already hears everything.
        if holding {
            return;
        }
        let newly = open && !live.watchers.contains(&session);
        if newly {
            live.watchers.push(session);
            out.push(OwnerAction::Track {
                session,
                conversation,
            });
        }
        if live.meta.last_seq > 0 {
            out.push(OwnerAction::Replay {
                to: vec![session],
                conversation,
                after: 0,
                up_to: live.meta.last_seq,
            });
        }
        // The visitor's indicator is throttled per conversation, on what its followers were
        // last shown: a session that arrives while that is "on" (forwarded before it followed)
        // is shown the same now, else a later "on" is no change and it never hears it. A held
        // "off" still reaches it with the next tick.
        if live.visitor_typing.shown {
            out.push(OwnerAction::Send {
                to: session,
                frame: frame(serde_json::json!({
                    "type": "typing", "conversation": conversation.0, "from": "visitor", "on": true,
                })),
            });
        }
        out.push(OwnerAction::Audit(
            AuditEvent::new("conversation_watched", &agent)
                .target(conversation.0.to_string())
                .detail("role", role.as_str())
                .detail("state", state_name(&live.meta.state)),
        ));
    }

    /// Tells a conversation's watchers its current state.
    fn tell_watchers(&self, conversation: ConversationId, out: &mut Vec<OwnerAction>) {
        let Some(live) = self.live.get(&conversation) else {
            return;
        };
        if live.watchers.is_empty() {
            return;
        }
        let note = watching_frame(live);
        for to in &live.watchers {
            out.push(OwnerAction::Send {
                to: *to,
                frame: note.clone(),
            });
        }
    }

    fn agent_subscribe(
        &mut self,
        conversation: ConversationId,
        agent: String,
        session: SessionRef,
        out: &mut Vec<OwnerAction>,
    ) {
        let Some(live) = self.live.get_mut(&conversation) else {
            out.push(OwnerAction::Load {
                conversation,
                event: Box::new(OwnerEvent::AgentSubscribe {
                    conversation,
                    agent,
                    session,
                }),
            });
            return;
        };
        if !matches!(&live.meta.state, ConversationState::Assigned { agent: a } if *a == agent) {
            return;
        }
        // A watcher that gets the conversation assigned hears it once, as its agent.
        live.watchers.retain(|s| *s != session);
        if !live.agent_sessions.contains(&session) {
            live.agent_sessions.push(session);
        }
        out.push(OwnerAction::Track {
            session,
            conversation,
        });
        out.push(OwnerAction::Send {
            to: session,
            frame: assigned_to_agent(live),
        });
        // The whole history, so an agent who takes the conversation over (a transfer, a
        // re-queue) or reopens the console sees what came before; `assigned` carries the read
        // mark so the console counts only the messages after it as unread.
        if live.meta.last_seq > 0 {
            out.push(OwnerAction::Replay {
                to: vec![session],
                conversation,
                after: 0,
                up_to: live.meta.last_seq,
            });
        }
        // The visitor's indicator is throttled per conversation, on what its followers were
        // last shown: a session that arrives while that is "on" (forwarded before it followed)
        // is shown the same now, else a later "on" is no change and it never hears it. A held
        // "off" still reaches it with the next tick.
        if live.visitor_typing.shown {
            out.push(OwnerAction::Send {
                to: session,
                frame: frame(serde_json::json!({
                    "type": "typing", "conversation": conversation.0, "from": "visitor", "on": true,
                })),
            });
        }
    }

    fn assigned(
        &mut self,
        conversation: ConversationId,
        agent: String,
        agent_name: String,
        sessions: Vec<SessionRef>,
        transfer: bool,
        out: &mut Vec<OwnerAction>,
    ) {
        let Some(live) = self.live.get_mut(&conversation) else {
            out.push(OwnerAction::Load {
                conversation,
                event: Box::new(if transfer {
                    OwnerEvent::Transferred {
                        conversation,
                        to: agent,
                        to_name: agent_name,
                        sessions,
                    }
                } else {
                    OwnerEvent::Assigned {
                        conversation,
                        agent,
                        agent_name,
                        sessions,
                    }
                }),
            });
            return;
        };
        if live.meta.state == ConversationState::Closed {
            out.push(OwnerAction::Dispatch(DispatchEvent::Closed {
                conversation: super::dispatch::ConversationId(conversation.0),
            }));
            return;
        }
        if transfer {
            let note = frame(serde_json::json!({
                "type": "transferred", "conversation": conversation.0, "to": &agent,
            }));
            for to in &live.agent_sessions {
                out.push(OwnerAction::Send {
                    to: *to,
                    frame: note.clone(),
                });
            }
        }
        live.agent_sessions.clear();
        live.meta.state = ConversationState::Assigned {
            agent: agent.clone(),
        };
        live.agent = Some((agent.clone(), agent_name.clone()));
        out.push(OwnerAction::Store {
            op: Op::SetState {
                conversation,
                state: ConversationState::Assigned {
                    agent: agent.clone(),
                },
            },
            completion: Completion::StateChanged { conversation },
        });
        let key = live.key.clone();
        let note = frame(serde_json::json!({
            "type": "assigned", "conversation": conversation.0, "agent": &agent_name,
        }));
        self.send_visitors(&key, None, &note, out);
        for session in sessions {
            self.agent_subscribe(conversation, agent.clone(), session, out);
        }
        self.tell_watchers(conversation, out);
    }

    /// Tells the connected visitors of queued conversations that no agent is
    /// online. A conversation not in memory (evicted while its visitor idles)
    /// is found through the visitors' entries, in one pass for all of them;
    /// one whose visitor is not connected needs nothing: a returning visitor's
    /// greeting enqueues it again and the dispatcher answers then.
    fn no_agents(&self, conversations: &[ConversationId], out: &mut Vec<OwnerAction>) {
        let note = |conversation: ConversationId| {
            frame(serde_json::json!({"type": "no_agents", "conversation": conversation.0}))
        };
        let mut evicted = Vec::new();
        for &conversation in conversations {
            match self.live.get(&conversation) {
                Some(live) if live.meta.state == ConversationState::Queued => {
                    self.send_visitors(&live.key, None, &note(conversation), out)
                }
                Some(_) => {}
                None => evicted.push(conversation),
            }
        }
        if evicted.is_empty() {
            return;
        }
        for (key, entry) in &self.visitors {
            if entry.sessions.is_empty() {
                continue;
            }
            if let Some(conversation) = entry.conversation.filter(|c| evicted.contains(c)) {
                self.send_visitors(key, None, &note(conversation), out);
            }
        }
    }

    fn requeued(&mut self, conversation: ConversationId, out: &mut Vec<OwnerAction>) {
        let Some(live) = self.live.get_mut(&conversation) else {
            out.push(OwnerAction::Load {
                conversation,
                event: Box::new(OwnerEvent::Requeued { conversation }),
            });
            return;
        };
        if live.meta.state == ConversationState::Closed {
            return;
        }
        let note = frame(serde_json::json!({
            "type": "requeued", "conversation": conversation.0,
        }));
        for to in live.agent_sessions.drain(..) {
            out.push(OwnerAction::Send {
                to,
                frame: note.clone(),
            });
        }
        live.agent = None;
        live.meta.state = ConversationState::Queued;
        out.push(OwnerAction::Store {
            op: Op::SetState {
                conversation,
                state: ConversationState::Queued,
            },
            completion: Completion::StateChanged { conversation },
        });
        self.tell_watchers(conversation, out);
    }

    fn committed(
        &mut self,
        completion: Completion,
        op: Op,
        outcome: Result<OpOutcome, CommitFailure>,
        out: &mut Vec<OwnerAction>,
    ) {
        if let Some(live) = op_conversation(&op).and_then(|c| self.live.get_mut(&c)) {
            live.in_flight = live.in_flight.saturating_sub(1);
        }
        match completion {
            Completion::Opened { key } => self.opened(key, outcome, out),
            Completion::Expired { conversation } => {
                if !matches!(outcome, Ok(OpOutcome::Updated)) {
                    return;
                }
                if let Some(live) = self.live.remove(&conversation) {
                    if let Some(entry) = self.visitors.get_mut(&live.key) {
                        if entry.conversation == Some(conversation) && !entry.opening {
                            entry.conversation = None;
                        }
                    }
                }
                out.push(OwnerAction::Dispatch(DispatchEvent::Closed {
                    conversation: super::dispatch::ConversationId(conversation.0),
                }));
            }
            Completion::SecretStored { key } => {
                let Some(entry) = self.visitors.get_mut(&key) else {
                    return;
                };
                let stored = matches!(outcome, Ok(OpOutcome::Updated));
                if !stored {
                    // Tried again with the next conversation the visitor opens.
                    entry.secret_stored = false;
                }
                // The conversation waiting for this secret: opened now, or not at all.
                if entry.opening {
                    if stored {
                        out.push(open_op(&key));
                    } else {
                        self.opened(key, outcome, out);
                    }
                }
            }
            Completion::VisitorMessage {
                key,
                session,
                conversation,
                client_id,
            } => {
                let ack = |seq: u64| {
                    frame(serde_json::json!({
                        "type": "ack", "id": &client_id, "conversation": conversation.0, "seq": seq,
                    }))
                };
                self.message_committed(conversation, session, op, outcome, ack, Some(&key), out);
            }
            Completion::AgentMessage {
                session,
                conversation,
                client_id,
            } => {
                let ack = |seq: u64| {
                    frame(serde_json::json!({
                        "type": "ack", "id": &client_id, "conversation": conversation.0, "seq": seq,
                    }))
                };
                self.message_committed(conversation, session, op, outcome, ack, None, out);
            }
            Completion::Read { conversation, side } => {
                let Ok(OpOutcome::ReadMarked { watermark }) = outcome else {
                    return;
                };
                let Some(live) = self.live.get_mut(&conversation) else {
                    return;
                };
                let (from, changed) = match side {
                    ReadSide::Visitor => {
                        let changed = watermark > live.meta.visitor_read;
                        live.meta.visitor_read = live.meta.visitor_read.max(watermark);
                        ("visitor", changed)
                    }
                    ReadSide::Agent => {
                        let changed = watermark > live.meta.agent_read;
                        live.meta.agent_read = live.meta.agent_read.max(watermark);
                        ("agent", changed)
                    }
                };
                if !changed {
                    return;
                }
                let note = frame(serde_json::json!({
                    "type": "read", "conversation": conversation.0, "from": from, "seq": watermark,
                }));
                match side {
                    ReadSide::Visitor => {
                        for to in live.followers() {
                            out.push(OwnerAction::Send {
                                to: *to,
                                frame: note.clone(),
                            });
                        }
                    }
                    ReadSide::Agent => {
                        for to in &live.watchers {
                            out.push(OwnerAction::Send {
                                to: *to,
                                frame: note.clone(),
                            });
                        }
                        let key = live.key.clone();
                        self.send_visitors(&key, None, &note, out);
                    }
                }
            }
            Completion::BotMessage { conversation } => {
                self.bot_message_committed(conversation, op, outcome, out)
            }
            Completion::ClosedBy {
                conversation,
                agent,
            } => {
                if matches!(outcome, Ok(OpOutcome::Updated)) {
                    out.push(OwnerAction::Audit(
                        AuditEvent::new("conversation_closed", &agent)
                            .target(conversation.0.to_string()),
                    ));
                } else if outcome.is_err() {
                    // Nothing was stored: the conversation is still open, and still this
                    // agent's (a close is accepted only from its agent). Left `Closed` in
                    // memory, the visitor's next message would open a new conversation,
                    // which storage answers with this same open one, whose pending message
                    // opens again, forever.
                    if let Some(live) = self.live.get_mut(&conversation) {
                        if live.meta.state == ConversationState::Closed {
                            live.meta.state = ConversationState::Assigned { agent };
                        }
                    }
                }
                self.state_committed(conversation, op, outcome, out);
            }
            Completion::StateChanged { conversation } => {
                self.state_committed(conversation, op, outcome, out)
            }
        }
    }

    /// A state change was committed: a close tells everyone and frees the dispatcher's slot.
    fn state_committed(
        &mut self,
        conversation: ConversationId,
        op: Op,
        outcome: Result<OpOutcome, CommitFailure>,
        out: &mut Vec<OwnerAction>,
    ) {
        if !matches!(
            op,
            Op::SetState {
                state: ConversationState::Closed,
                ..
            }
        ) {
            return;
        }
        if !matches!(outcome, Ok(OpOutcome::Updated)) {
            return;
        }
        let Some(mut live) = self.live.remove(&conversation) else {
            return;
        };
        let note = frame(serde_json::json!({
            "type": "closed", "conversation": conversation.0,
        }));
        for to in live.followers() {
            out.push(OwnerAction::Send {
                to: *to,
                frame: note.clone(),
            });
        }
        self.send_visitors(&live.key, None, &note, out);
        // Watchers heard `closed`; nothing more happens in this conversation.
        live.watchers.clear();
        out.push(OwnerAction::Dispatch(DispatchEvent::Closed {
            conversation: super::dispatch::ConversationId(conversation.0),
        }));
        // The visitor's next message opens a new conversation.
        if let Some(entry) = self.visitors.get_mut(&live.key) {
            if entry.conversation == Some(conversation) && !entry.opening {
                self.live.insert(conversation, live);
            }
        }
    }

    /// Acks a stored message to its sender and fans it out to everyone else.
    #[allow(clippy::too_many_arguments)]
    fn message_committed(
        &mut self,
        conversation: ConversationId,
        session: SessionRef,
        op: Op,
        outcome: Result<OpOutcome, CommitFailure>,
        ack: impl Fn(u64) -> Arc<str>,
        visitor_key: Option<&VisitorKey>,
        out: &mut Vec<OwnerAction>,
    ) {
        let (seq, ts_ms) = match outcome {
            Ok(OpOutcome::Stored { seq, ts_ms }) => (seq, ts_ms),
            Ok(OpOutcome::Duplicate { seq }) => {
                out.push(OwnerAction::Send {
                    to: session,
                    frame: ack(seq),
                });
                return;
            }
            Ok(OpOutcome::Rejected(rejection)) => {
                out.push(OwnerAction::Send {
                    to: session,
                    frame: error("rejected", &rejection.to_string()),
                });
                return;
            }
            Ok(other) => {
                out.push(OwnerAction::Send {
                    to: session,
                    frame: error("rejected", &format!("unexpected outcome {other:?}")),
                });
                return;
            }
            Err(err) => {
                out.push(OwnerAction::Send {
                    to: session,
                    frame: error(err.code, &err.message),
                });
                return;
            }
        };
        out.push(OwnerAction::Send {
            to: session,
            frame: ack(seq),
        });
        let Op::Append(message) = op else {
            return;
        };
        let bot_enabled = self.config.bot_enabled;
        // The sender has its ack; its other tabs and the other side get the message.
        let Some(live) = self.fan_out(conversation, seq, ts_ms, &message, Some(session), out)
        else {
            return;
        };
        let key = live.key.clone();
        let bot_turn =
            visitor_key.is_some() && bot_enabled && live.meta.state == ConversationState::Bot;
        if bot_turn {
            // The bot's work counts as in flight: the conversation stays in
            // memory until its verdict is handled.
            live.in_flight += 1;
            out.push(OwnerAction::Bot {
                conversation,
                site: key.site.clone(),
                visitor: key.visitor.clone(),
                text: message.text,
                failed_turns: live.meta.failed_bot_turns,
            });
        }
    }

    /// Applies the bot's verdict on a visitor message: store its answer, or
    /// queue the conversation for a human.
    fn bot_verdict(
        &mut self,
        conversation: ConversationId,
        verdict: BotOutcome,
        out: &mut Vec<OwnerAction>,
    ) {
        let Some(live) = self.live.get_mut(&conversation) else {
            // Cannot happen while in flight; a conversation loaded again has no
            // pending bot turn to finish.
            return;
        };
        live.in_flight = live.in_flight.saturating_sub(1);
        if live.meta.state != ConversationState::Bot {
            // A human took over (or the conversation closed) meanwhile: the bot stays silent.
            return;
        }
        match verdict {
            BotOutcome::Reply { text, failed_turns } => {
                out.push(OwnerAction::Store {
                    op: Op::Append(NewMessage {
                        conversation,
                        from: Author::Bot,
                        name: "bot".into(),
                        text,
                        client_id: None,
                    }),
                    completion: Completion::BotMessage { conversation },
                });
                if failed_turns != live.meta.failed_bot_turns {
                    live.meta.failed_bot_turns = failed_turns;
                    out.push(OwnerAction::Store {
                        op: Op::SetFailedBotTurns {
                            conversation,
                            count: failed_turns,
                        },
                        completion: Completion::StateChanged { conversation },
                    });
                }
            }
            BotOutcome::Handoff => {
                if live.meta.failed_bot_turns != 0 {
                    live.meta.failed_bot_turns = 0;
                    out.push(OwnerAction::Store {
                        op: Op::SetFailedBotTurns {
                            conversation,
                            count: 0,
                        },
                        completion: Completion::StateChanged { conversation },
                    });
                }
                self.enqueue(conversation, out);
            }
            BotOutcome::Silent => {}
        }
    }

    /// Fans a stored bot answer out to everyone in the conversation.
    fn bot_message_committed(
        &mut self,
        conversation: ConversationId,
        op: Op,
        outcome: Result<OpOutcome, CommitFailure>,
        out: &mut Vec<OwnerAction>,
    ) {
        let Ok(OpOutcome::Stored { seq, ts_ms }) = outcome else {
            return;
        };
        if let Op::Append(message) = op {
            self.fan_out(conversation, seq, ts_ms, &message, None, out);
        }
    }

    /// Sends a stored message to every session of the conversation except
    /// `except`, and records its seq as delivered. Returns the conversation.
    fn fan_out(
        &mut self,
        conversation: ConversationId,
        seq: u64,
        ts_ms: u64,
        message: &NewMessage,
        except: Option<SessionRef>,
        out: &mut Vec<OwnerAction>,
    ) -> Option<&mut Live> {
        let live = self.live.get_mut(&conversation)?;
        live.meta.last_seq = live.meta.last_seq.max(seq);
        let rendered: Arc<str> = Arc::from(message_frame(
            conversation,
            seq,
            message.from,
            &message.name,
            &message.text,
            ts_ms,
        ));
        // A visitor session still waiting for its hello is left out: its hello carries
        // the conversation's last seq as of its greeting, which includes this message,
        // and its resume replay (from storage) delivers it. Sent here as well, it arrived
        // twice when a visitor reconnected while its previous tab's message was committing.
        let entry = self.visitors.get(&live.key);
        let awaiting = entry
            .map(|entry| entry.awaiting_hello.as_slice())
            .unwrap_or_default();
        let targets = live
            .followers()
            .chain(
                entry
                    .map(|entry| entry.sessions.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .filter(|s| !awaiting.iter().any(|(waiting, _)| waiting == *s)),
            )
            .filter(|s| Some(**s) != except);
        for to in targets {
            out.push(OwnerAction::Send {
                to: *to,
                frame: rendered.clone(),
            });
        }
        Some(live)
    }

    fn opened(
        &mut self,
        key: VisitorKey,
        outcome: Result<OpOutcome, CommitFailure>,
        out: &mut Vec<OwnerAction>,
    ) {
        let Some(entry) = self.visitors.get_mut(&key) else {
            return;
        };
        entry.opening = false;
        let conversation = match outcome {
            Ok(OpOutcome::Opened { conversation, .. }) => conversation,
            other => {
                let code = match &other {
                    Err(failure) => failure.code,
                    Ok(_) => "storage_error",
                };
                let message = format!("cannot open the conversation: {other:?}");
                for (session, _) in entry.awaiting_hello.drain(..) {
                    // In place of the hello, so it is not held back.
                    out.push(OwnerAction::Hello {
                        to: session,
                        frame: error(code, &message),
                    });
                }
                entry.pending.clear();
                return;
            }
        };
        entry.conversation = Some(conversation);
        let awaiting = std::mem::take(&mut entry.awaiting_hello);
        let pending = std::mem::take(&mut entry.pending);
        // Sessions already attached to a previous (closed) conversation get a new hello too.
        let reattached: Vec<SessionRef> = entry
            .sessions
            .iter()
            .filter(|s| !awaiting.iter().any(|(a, _)| a == *s))
            .copied()
            .collect();
        if !self.live.contains_key(&conversation) {
            out.push(OwnerAction::Load {
                conversation,
                event: Box::new(OwnerEvent::Greet {
                    key,
                    conversation,
                    awaiting,
                    reattached,
                    pending,
                }),
            });
            return;
        }
        self.greet_all(key, conversation, awaiting, reattached, pending, out);
    }

    fn greet_all(
        &mut self,
        key: VisitorKey,
        conversation: ConversationId,
        awaiting: Vec<(SessionRef, Option<u64>)>,
        reattached: Vec<SessionRef>,
        pending: Vec<(SessionRef, VisitorFrame)>,
        out: &mut Vec<OwnerAction>,
    ) {
        for (session, resume) in awaiting {
            self.greet(conversation, session, resume, out);
        }
        for session in reattached {
            self.greet(conversation, session, None, out);
        }
        for (session, frame_in) in pending {
            self.visitor_frame(key.clone(), session, frame_in, 0, out);
        }
        // Every session left while the conversation was opened: nothing keeps the entry.
        if self
            .visitors
            .get(&key)
            .is_some_and(|entry| entry.sessions.is_empty() && !entry.opening)
        {
            self.visitors.remove(&key);
            self.maybe_evict(conversation);
        }
    }

    /// Sends `frame` to every connected session of a visitor except `except`.
    fn send_visitors(
        &self,
        key: &VisitorKey,
        except: Option<SessionRef>,
        frame: &Arc<str>,
        out: &mut Vec<OwnerAction>,
    ) {
        if let Some(entry) = self.visitors.get(key) {
            for to in entry.sessions.iter().filter(|s| Some(**s) != except) {
                out.push(OwnerAction::Send {
                    to: *to,
                    frame: frame.clone(),
                });
            }
        }
    }

    /// Sends the typing changes held back by the throttle whose interval has
    /// ended, and switches off indicators not renewed within `typing_expiry`.
    fn flush_typing(&mut self, now_ms: u64, out: &mut Vec<OwnerAction>) {
        let (interval, expiry) = (self.config.typing_interval_ms, self.config.typing_expiry_ms);
        let mut changes = Vec::new();
        for (conversation, live) in &mut self.live {
            if let Some(on) = live.visitor_typing.tick(now_ms, interval, expiry) {
                changes.push((*conversation, "visitor", on));
            }
            if let Some(on) = live.agent_typing.tick(now_ms, interval, expiry) {
                changes.push((*conversation, "agent", on));
            }
        }
        for (conversation, from, on) in changes {
            let Some(live) = self.live.get(&conversation) else {
                continue;
            };
            let typing = frame(serde_json::json!({
                "type": "typing", "conversation": conversation.0, "from": from, "on": on,
            }));
            if from == "visitor" {
                for to in live.followers() {
                    out.push(OwnerAction::Send {
                        to: *to,
                        frame: typing.clone(),
                    });
                }
            } else {
                for to in &live.watchers {
                    out.push(OwnerAction::Send {
                        to: *to,
                        frame: typing.clone(),
                    });
                }
                self.send_visitors(&live.key, None, &typing, out);
            }
        }
    }
}

/// The visitor's `hello`: `conversation` is `null` (and `seq` 0) until the
/// visitor's first message or handoff creates one; `secret` is present when a
/// secret was issued to this session.
fn hello_frame(
    key: &VisitorKey,
    conversation: Option<ConversationId>,
    seq: u64,
    secret: Option<&str>,
) -> Arc<str> {
    let mut hello = serde_json::json!({
        "type": "hello",
        "visitor": &*key.visitor,
        "site": &*key.site,
        "conversation": conversation.map(|c| c.0),
        "seq": seq,
    });
    if let Some(secret) = secret {
        hello["secret"] = secret.into();
    }
    frame(hello)
}

/// The secret issued to `session`, once (its first hello carries it).
fn take_issued(entry: &mut VisitorEntry, session: SessionRef) -> Option<Box<str>> {
    let at = entry.issued.iter().position(|(s, _)| *s == session)?;
    Some(entry.issued.swap_remove(at).1)
}

/// One side's typing indicator as the other side sees it, throttled.
///
/// At most one change (or renewal of "on") is forwarded per interval, however
/// the client alternates on and off; a change inside the interval is held and
/// the LAST requested state is delivered by [`Typing::tick`] once the interval
/// has ended, so the other side always ends up with the true final state.
#[derive(Debug, Default, Clone, Copy)]
struct Typing {
    /// Whether the other side was last told "on".
    shown: bool,
    /// When an indicator was last forwarded.
    forwarded_ms: Option<u64>,
    /// The state requested inside the interval, not yet forwarded.
    held: Option<bool>,
}

impl Typing {
    /// A client asked for `on`; returns the state to forward now, if any.
    fn request(&mut self, on: bool, now_ms: u64, interval_ms: u64) -> Option<bool> {
        let in_interval = self
            .forwarded_ms
            .is_some_and(|at| now_ms.saturating_sub(at) < interval_ms);
        if in_interval {
            self.held = (on != self.shown).then_some(on);
            return None;
        }
        if !on && !self.shown {
            self.held = None;
            return None;
        }
        self.forward(on, now_ms)
    }

    /// Once a tick: the held state when its interval is over, or "off" when an
    /// "on" was not renewed within `expiry_ms`.
    fn tick(&mut self, now_ms: u64, interval_ms: u64, expiry_ms: u64) -> Option<bool> {
        let since = now_ms.saturating_sub(self.forwarded_ms?);
        if let Some(on) = self.held {
            if since >= interval_ms {
                return self.forward(on, now_ms);
            }
        } else if self.shown && since >= expiry_ms {
            return self.forward(false, now_ms);
        }
        None
    }

    fn forward(&mut self, on: bool, now_ms: u64) -> Option<bool> {
        self.shown = on;
        self.held = None;
        self.forwarded_ms = Some(now_ms);
        Some(on)
    }

    /// Whether the indicator needs the conversation kept in memory.
    fn busy(&self) -> bool {
        self.shown || self.held.is_some()
    }
}

/// What a watcher is told about a conversation: where it stands and who holds it.
fn watching_frame(live: &Live) -> Arc<str> {
    let agent = match &live.meta.state {
        ConversationState::Assigned { agent } => Some(agent.as_str()),
        _ => None,
    };
    frame(serde_json::json!({
        "type": "watching",
        "conversation": live.meta.id.0,
        "site": &*live.key.site,
        "visitor": &*live.key.visitor,
        "seq": live.meta.last_seq,
        "state": state_name(&live.meta.state),
        "agent": agent,
    }))
}

fn state_name(state: &ConversationState) -> &'static str {
    match state {
        ConversationState::Bot => "bot",
        ConversationState::Queued => "queued",
        ConversationState::Assigned { .. } => "assigned",
        ConversationState::Closed => "closed",
    }
}

fn assigned_to_agent(live: &Live) -> Arc<str> {
    frame(serde_json::json!({
        "type": "assigned",
        "conversation": live.meta.id.0,
        "site": &*live.key.site,
        "visitor": &*live.key.visitor,
        "seq": live.meta.last_seq,
        "read": live.meta.agent_read,
    }))
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

/// The conversation an operation writes to (none for `Open`, which creates it).
fn op_conversation(op: &Op) -> Option<ConversationId> {
    match op {
        Op::Open { .. } | Op::SetVisitorSecret { .. } => None,
        Op::Append(message) => Some(message.conversation),
        Op::SetState { conversation, .. }
        | Op::DeleteEmpty { conversation }
        | Op::MarkRead { conversation, .. }
        | Op::SetFailedBotTurns { conversation, .. } => Some(*conversation),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arena::SessionId;

    fn session(n: u64) -> SessionRef {
        SessionRef {
            shard: 0,
            session: SessionId::from_u64(n),
        }
    }

    fn owner() -> Owner {
        Owner::new(OwnerConfig {
            shard: 0,
            bot_enabled: false,
            typing_interval_ms: 1000,
            typing_expiry_ms: 5000,
            agent_names: HashMap::new(),
            max_opening_frames: 64,
        })
    }

    /// The store ops among `actions`, as the router would queue them.
    fn stores(actions: &[OwnerAction]) -> Vec<(Op, Completion)> {
        actions
            .iter()
            .filter_map(|action| match action {
                OwnerAction::Store { op, completion } => Some((op.clone(), completion.clone())),
                _ => None,
            })
            .collect()
    }

    fn committed(
        owner: &mut Owner,
        (op, completion): (Op, Completion),
        outcome: OpOutcome,
    ) -> Vec<OwnerAction> {
        owner.handle(
            OwnerEvent::Committed {
                completion,
                op,
                outcome: Ok(outcome),
            },
            1_000,
        )
    }

    fn messages_to(actions: &[OwnerAction], to: SessionRef) -> usize {
        actions
            .iter()
            .filter(|action| {
                matches!(action, OwnerAction::Send { to: target, frame }
                    if *target == to && frame.contains("\"type\":\"message\""))
            })
            .count()
    }

    fn credentials(secret: Option<&str>, verified: bool, fresh: &str) -> Credentials {
        Credentials {
            secret_hash: secret.map(super::super::identity::hash_secret),
            verified,
            fresh: FreshVisitor {
                visitor: fresh.into(),
                secret: format!("secret-of-{fresh}").into(),
                secret_hash: super::super::identity::hash_secret(&format!("secret-of-{fresh}")),
            },
        }
    }

    fn key(visitor: &str) -> VisitorKey {
        VisitorKey {
            site: "acme".into(),
            visitor: visitor.into(),
        }
    }

    /// Attaches `session` as the driver would: answers `LoadVisitor` with `stored`.
    fn attach(
        owner: &mut Owner,
        visitor: &str,
        session: SessionRef,
        resume: Option<u64>,
        credentials: Credentials,
        stored: StoredVisitor,
    ) -> Vec<OwnerAction> {
        let actions = owner.handle(
            OwnerEvent::VisitorAttach {
                key: key(visitor),
                resume,
                session,
                credentials: Box::new(credentials),
                stored: None,
            },
            0,
        );
        match &actions[..] {
            [OwnerAction::LoadVisitor { .. }] => {
                let Some(OwnerAction::LoadVisitor { event, .. }) = actions.into_iter().next()
                else {
                    unreachable!()
                };
                let mut event = *event;
                if let OwnerEvent::VisitorAttach { stored: slot, .. } = &mut event {
                    *slot = Some(Box::new(stored));
                }
                owner.handle(event, 0)
            }
            _ => actions,
        }
    }

    fn meta(conversation: ConversationId, visitor: &str, last_seq: u64) -> Conversation {
        Conversation {
            id: conversation,
            site: "acme".into(),
            visitor: visitor.into(),
            state: ConversationState::Bot,
            state_since_ms: 0,
            last_seq,
            created_ms: 0,
            updated_ms: 0,
            visitor_read: 0,
            agent_read: 0,
            failed_bot_turns: 0,
        }
    }

    fn hello_of(actions: &[OwnerAction], to: SessionRef) -> serde_json::Value {
        actions
            .iter()
            .find_map(|action| match action {
                OwnerAction::Hello { to: target, frame } if *target == to => {
                    Some(serde_json::from_str(frame).unwrap())
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("no hello for {to:?} in {actions:#?}"))
    }

    #[test]
    fn frames_waiting_on_an_opening_conversation_are_bounded_and_refused_past_it() {
        let mut owner = Owner::new(OwnerConfig {
            max_opening_frames: 3,
            ..owner().config
        });
        let tab = session(1);
        attach(
            &mut owner,
            "v1",
            tab,
            None,
            credentials(None, false, "fresh-1"),
            StoredVisitor::default(),
        );
        let send = |owner: &mut Owner, n: usize| {
            owner.handle(
                OwnerEvent::Visitor {
                    key: key("v1"),
                    session: tab,
                    frame: VisitorFrame::Message {
                        id: format!("m{n}"),
                        text: "hi".into(),
                    },
                },
                0,
            )
        };
        // The first message opens the conversation; two more wait with it.
        assert!(!stores(&send(&mut owner, 0)).is_empty());
        for n in 1..3 {
            let actions = send(&mut owner, n);
            assert!(actions.is_empty(), "message {n} waits: {actions:#?}");
        }
        // The fourth is refused, with its id, and nothing is queued or stored for it.
        let refused = send(&mut owner, 3);
        let [OwnerAction::Send { to, frame }] = &refused[..] else {
            panic!("{refused:#?}");
        };
        assert_eq!(*to, tab);
        let frame: serde_json::Value = serde_json::from_str(frame).unwrap();
        assert_eq!(frame["code"], "overloaded");
        assert_eq!(frame["id"], "m3");
        assert_eq!(frame["retry_after"], OPENING_RETRY_MS);
        assert_eq!(owner.visitors[&key("v1")].pending.len(), 3);
        let typing = owner.handle(
            OwnerEvent::Visitor {
                key: key("v1"),
                session: tab,
                frame: VisitorFrame::Typing { on: true },
            },
            0,
        );
        assert!(
            matches!(&typing[..], [OwnerAction::Send { frame, .. }] if frame.contains("overloaded")),
            "{typing:#?}"
        );
    }

    #[test]
    fn connecting_stores_nothing_and_the_first_message_opens_the_conversation() {
        let mut owner = owner();
        let tab = session(1);
        let greeted = attach(
            &mut owner,
            "v1",
            tab,
            None,
            credentials(None, false, "fresh-1"),
            StoredVisitor::default(),
        );
        assert!(stores(&greeted).is_empty(), "{greeted:#?}");
        let hello = hello_of(&greeted, tab);
        assert_eq!(hello["visitor"], "v1");
        assert_eq!(hello["conversation"], serde_json::Value::Null);
        assert_eq!(hello["seq"], 0);
        assert_eq!(hello["secret"], "secret-of-fresh-1");
        // Typing and read before a conversation exists store nothing either.
        for frame in [
            VisitorFrame::Typing { on: true },
            VisitorFrame::Read { seq: 3 },
        ] {
            let actions = owner.handle(
                OwnerEvent::Visitor {
                    key: key("v1"),
                    session: tab,
                    frame,
                },
                0,
            );
            assert!(actions.is_empty(), "{actions:#?}");
        }
        // Leaving without a word leaves nothing behind.
        owner.handle(
            OwnerEvent::VisitorDetach {
                key: key("v1"),
                session: tab,
            },
            0,
        );
        assert!(owner.visitors.is_empty());
        // The first message stores the secret's hash, then opens the conversation.
        attach(
            &mut owner,
            "v1",
            tab,
            None,
            credentials(None, false, "fresh-1"),
            StoredVisitor::default(),
        );
        let sent = owner.handle(
            OwnerEvent::Visitor {
                key: key("v1"),
                session: tab,
                frame: VisitorFrame::Message {
                    id: "m1".into(),
                    text: "hi".into(),
                },
            },
            0,
        );
        let queued = stores(&sent);
        let ops: Vec<&Op> = queued.iter().map(|(op, _)| op).collect();
        assert!(
            matches!(&ops[..], [Op::SetVisitorSecret { visitor, secret_hash, .. }]
                if visitor == "v1" && *secret_hash == super::super::identity::hash_secret("secret-of-fresh-1")),
            "{ops:#?}"
        );
        // The conversation is opened once the secret is committed.
        let opened = committed(&mut owner, queued[0].clone(), OpOutcome::Updated);
        let ops: Vec<Op> = stores(&opened).into_iter().map(|(op, _)| op).collect();
        assert!(
            matches!(&ops[..], [Op::Open { visitor, .. }] if visitor == "v1"),
            "{ops:#?}"
        );
    }

    /// Found by the simulation (seed 694): an agent's close whose commit failed left the
    /// conversation `Closed` in memory but open in storage; the visitor's next message then
    /// asked storage to open a conversation, got this one back, replayed the message into
    /// it, found it closed and asked again: a commit per turn, forever.
    #[test]
    fn a_close_that_failed_to_commit_leaves_the_conversation_open() {
        let conversation = ConversationId::from_parts(0, 5);
        let mut owner = owner();
        let mut assigned = meta(conversation, "v1", 2);
        assigned.state = ConversationState::Assigned { agent: "a1".into() };
        owner.insert_loaded(assigned);
        let agent_frame = |frame: AgentFrame| OwnerEvent::Agent {
            agent: "a1".into(),
            name: "A1".into(),
            role: Role::Agent,
            session: session(7),
            frame,
        };
        let closing = owner.handle(
            agent_frame(AgentFrame::Close {
                conversation: conversation.0,
            }),
            0,
        );
        let queued = stores(&closing);
        assert!(
            matches!(
                &queued[..],
                [(
                    Op::SetState {
                        state: ConversationState::Closed,
                        ..
                    },
                    _
                )]
            ),
            "{queued:#?}"
        );
        let (op, completion) = queued[0].clone();
        let failed = owner.handle(
            OwnerEvent::Committed {
                completion,
                op,
                outcome: Err(CommitFailure {
                    code: "storage_error",
                    message: "disk on fire".into(),
                }),
            },
            0,
        );
        assert!(
            !failed
                .iter()
                .any(|a| matches!(a, OwnerAction::Send { frame, .. } if frame.contains("closed"))),
            "{failed:#?}"
        );
        // Still the agent's and open: its reply is stored in it.
        let reply = owner.handle(
            agent_frame(AgentFrame::Message {
                conversation: conversation.0,
                id: "r1".into(),
                text: "still here".into(),
            }),
            0,
        );
        assert!(
            matches!(&stores(&reply)[..], [(Op::Append(m), _)] if m.conversation == conversation),
            "{reply:#?}"
        );
        // And the visitor's message goes into it too, not into a new conversation.
        attach(
            &mut owner,
            "v1",
            session(1),
            None,
            credentials(Some("s"), true, "fresh-1"),
            StoredVisitor {
                secret_hash: Some(super::super::identity::hash_secret("s")),
                conversation: Some(conversation),
            },
        );
        let sent = owner.handle(
            OwnerEvent::Visitor {
                key: key("v1"),
                session: session(1),
                frame: VisitorFrame::Message {
                    id: "m9".into(),
                    text: "hello?".into(),
                },
            },
            0,
        );
        assert!(
            matches!(&stores(&sent)[..], [(Op::Append(m), _)] if m.conversation == conversation),
            "{sent:#?}"
        );
    }

    /// Found by the simulation (seed 1 with `max_batch` 1): the secret's commit failed, the
    /// open's (queued with it, committed in the next batch) did not, and the visitor's next
    /// connection, presenting its secret, was moved to a fresh visitor id: the stored
    /// conversation had no secret to match. Now nothing is opened without the secret.
    #[test]
    fn a_failed_secret_commit_opens_no_conversation() {
        let mut owner = owner();
        let tab = session(1);
        attach(
            &mut owner,
            "v1",
            tab,
            None,
            credentials(None, false, "fresh-1"),
            StoredVisitor::default(),
        );
        let message = |id: &str| OwnerEvent::Visitor {
            key: key("v1"),
            session: tab,
            frame: VisitorFrame::Message {
                id: id.into(),
                text: "hi".into(),
            },
        };
        let sent = owner.handle(message("m1"), 0);
        let queued = stores(&sent);
        assert!(
            matches!(&queued[..], [(Op::SetVisitorSecret { .. }, _)]),
            "{queued:#?}"
        );
        let (op, completion) = queued[0].clone();
        let failed = owner.handle(
            OwnerEvent::Committed {
                completion,
                op,
                outcome: Err(CommitFailure {
                    code: "storage_error",
                    message: "disk on fire".into(),
                }),
            },
            0,
        );
        assert!(stores(&failed).is_empty(), "nothing opened: {failed:#?}");
        // The visitor is not left opening: its next message tries the secret again.
        let again = owner.handle(message("m1"), 0);
        assert!(
            matches!(&stores(&again)[..], [(Op::SetVisitorSecret { .. }, _)]),
            "{again:#?}"
        );
    }

    #[test]
    fn a_guessed_visitor_id_without_its_secret_becomes_a_new_visitor() {
        let conversation = ConversationId::from_parts(0, 7);
        let real_secret = "the-real-secret";
        let stored = StoredVisitor {
            secret_hash: Some(super::super::identity::hash_secret(real_secret)),
            conversation: Some(conversation),
        };
        for presented in [None, Some("a-wrong-secret"), Some("")] {
            let mut owner = owner();
            let intruder = session(9);
            let actions = attach(
                &mut owner,
                "victim",
                intruder,
                Some(0),
                credentials(presented, false, "fresh-9"),
                stored.clone(),
            );
            // No load, no replay of the victim's conversation: a hello for a new visitor.
            assert!(
                !actions.iter().any(|a| matches!(
                    a,
                    OwnerAction::Load { .. }
                        | OwnerAction::Replay { .. }
                        | OwnerAction::Store { .. }
                )),
                "{actions:#?}"
            );
            let hello = hello_of(&actions, intruder);
            assert_eq!(hello["visitor"], "fresh-9");
            assert_eq!(hello["conversation"], serde_json::Value::Null);
            assert_eq!(hello["secret"], "secret-of-fresh-9");
            // Its frames go to the new visitor: a message opens a conversation for fresh-9.
            let sent = owner.handle(
                OwnerEvent::Visitor {
                    key: key("victim"),
                    session: intruder,
                    frame: VisitorFrame::Message {
                        id: "m1".into(),
                        text: "hi".into(),
                    },
                },
                0,
            );
            assert!(stores(&sent).iter().all(|(op, _)| matches!(op,
                Op::Open { visitor, .. } | Op::SetVisitorSecret { visitor, .. } if visitor == "fresh-9")));
            assert_eq!(owner.visitor_of(&key("victim"), intruder), key("fresh-9"));
            // While the intruder is connected the real visitor still gets in with its secret.
            let real = session(1);
            let actions = attach(
                &mut owner,
                "victim",
                real,
                Some(0),
                credentials(Some(real_secret), false, "fresh-1"),
                stored.clone(),
            );
            let OwnerAction::Load { event, .. } = &actions[0] else {
                panic!("the real visitor's conversation is loaded: {actions:#?}")
            };
            owner.insert_loaded(meta(conversation, "victim", 4));
            assert!(matches!(&**event, OwnerEvent::Greet { .. }), "{event:?}");
            let Some(OwnerAction::Load { event, .. }) = actions.into_iter().next() else {
                unreachable!()
            };
            let greeted = owner.handle(*event, 0);
            let hello = hello_of(&greeted, real);
            assert_eq!(hello["visitor"], "victim");
            assert_eq!(hello["conversation"], conversation.0);
            assert!(hello.get("secret").is_none());
            assert!(greeted.iter().any(|a| matches!(a,
                OwnerAction::Replay { to, after: 0, up_to: 4, .. } if to == &vec![real])));
            // A second guess while the real visitor is connected is refused from memory.
            let actions = attach(
                &mut owner,
                "victim",
                session(10),
                Some(0),
                credentials(None, false, "fresh-10"),
                stored.clone(),
            );
            assert_eq!(hello_of(&actions, session(10))["visitor"], "fresh-10");
            assert!(!actions
                .iter()
                .any(|a| matches!(a, OwnerAction::Replay { .. })));
        }
    }

    #[test]
    fn a_verified_identity_resumes_without_the_secret_and_a_legacy_visitor_needs_one() {
        let conversation = ConversationId::from_parts(0, 3);
        let mut owner = owner();
        owner.insert_loaded(meta(conversation, "user-42", 2));
        let stored = StoredVisitor {
            secret_hash: Some([7; 32]),
            conversation: Some(conversation),
        };
        let actions = attach(
            &mut owner,
            "user-42",
            session(1),
            Some(0),
            credentials(None, true, "fresh-1"),
            stored,
        );
        assert_eq!(
            hello_of(&actions, session(1))["conversation"],
            conversation.0
        );
        // A visitor from before secrets existed: only a verified identity gets its conversation.
        let legacy = StoredVisitor {
            secret_hash: None,
            conversation: Some(conversation),
        };
        let mut owner = self::owner();
        owner.insert_loaded(meta(conversation, "user-42", 2));
        let refused = attach(
            &mut owner,
            "user-42",
            session(2),
            Some(0),
            credentials(Some("anything"), false, "fresh-2"),
            legacy.clone(),
        );
        assert_eq!(hello_of(&refused, session(2))["visitor"], "fresh-2");
        let verified = attach(
            &mut owner,
            "user-42",
            session(3),
            Some(0),
            credentials(None, true, "fresh-3"),
            legacy,
        );
        assert_eq!(
            hello_of(&verified, session(3))["conversation"],
            conversation.0
        );
    }

    #[test]
    fn an_abandoned_empty_conversation_is_deleted_unless_someone_is_connected() {
        let conversation = ConversationId::from_parts(0, 8);
        let mut owner = owner();
        let mut queued = meta(conversation, "asker", 0);
        queued.state = ConversationState::Queued;
        owner.insert_loaded(queued.clone());
        // The visitor is connected: kept.
        let tab = session(1);
        attach(
            &mut owner,
            "asker",
            tab,
            None,
            credentials(None, true, "fresh-1"),
            StoredVisitor {
                secret_hash: Some([1; 32]),
                conversation: Some(conversation),
            },
        );
        let kept = owner.handle(OwnerEvent::ExpireEmpty { conversation }, 0);
        assert!(stores(&kept).is_empty(), "{kept:#?}");
        // Gone: deleted, and the dispatcher drops it from the queue.
        owner.handle(
            OwnerEvent::VisitorDetach {
                key: key("asker"),
                session: tab,
            },
            0,
        );
        owner.insert_loaded(queued);
        let expire = stores(&owner.handle(OwnerEvent::ExpireEmpty { conversation }, 0));
        assert!(
            matches!(&expire[..], [(Op::DeleteEmpty { .. }, _)]),
            "{expire:#?}"
        );
        let done = committed(
            &mut owner,
            expire.into_iter().next().unwrap(),
            OpOutcome::Updated,
        );
        assert!(done
            .iter()
            .any(|a| matches!(a, OwnerAction::Dispatch(DispatchEvent::Closed { .. }))));
        assert!(!owner.is_live(conversation));
        // A conversation with a message is never deleted.
        let mut owner = self::owner();
        owner.insert_loaded(meta(conversation, "talker", 1));
        assert!(stores(&owner.handle(OwnerEvent::ExpireEmpty { conversation }, 0)).is_empty());
    }

    #[test]
    fn no_agents_reaches_the_connected_visitor_even_after_eviction() {
        let conversation = ConversationId::from_parts(0, 9);
        let mut owner = owner();
        let mut queued = meta(conversation, "waiter", 1);
        queued.state = ConversationState::Queued;
        owner.insert_loaded(queued);
        let tab = session(1);
        attach(
            &mut owner,
            "waiter",
            tab,
            None,
            credentials(None, true, "fresh-1"),
            StoredVisitor {
                secret_hash: Some([1; 32]),
                conversation: Some(conversation),
            },
        );
        let tell = |owner: &mut Owner| {
            let actions = owner.handle(
                OwnerEvent::NoAgents {
                    conversations: vec![conversation],
                },
                0,
            );
            frames_to(&actions, tab)
        };
        let expected = serde_json::json!({"type": "no_agents", "conversation": conversation.0});
        assert_eq!(tell(&mut owner), vec![expected.clone()]);
        // Evicted while the visitor idles: found through the visitor's entry.
        owner.handle(OwnerEvent::Tick, 0);
        assert!(!owner.is_live(conversation));
        assert_eq!(tell(&mut owner), vec![expected]);
        // Gone: nobody to tell.
        owner.handle(
            OwnerEvent::VisitorDetach {
                key: key("waiter"),
                session: tab,
            },
            0,
        );
        assert!(tell(&mut owner).is_empty());
    }

    #[test]
    fn a_new_queue_position_reaches_a_visitor_whose_conversation_was_evicted() {
        let conversation = ConversationId::from_parts(0, 9);
        let mut owner = owner();
        let mut queued = meta(conversation, "waiter", 1);
        queued.state = ConversationState::Queued;
        owner.insert_loaded(queued.clone());
        let tab = session(1);
        attach(
            &mut owner,
            "waiter",
            tab,
            None,
            credentials(None, true, "fresh-1"),
            StoredVisitor {
                secret_hash: Some([1; 32]),
                conversation: Some(conversation),
            },
        );
        owner.handle(OwnerEvent::Tick, 0);
        assert!(!owner.is_live(conversation));
        let position = OwnerEvent::QueuePosition {
            conversation,
            position: 1,
        };
        let actions = owner.handle(position, 0);
        let Some(OwnerAction::Load { event, .. }) = actions
            .into_iter()
            .find(|a| matches!(a, OwnerAction::Load { .. }))
        else {
            panic!("an evicted conversation is loaded to tell its visitor");
        };
        // The driver loads it and hands the event back.
        owner.insert_loaded(queued);
        let actions = owner.handle(*event, 0);
        assert_eq!(
            frames_to(&actions, tab),
            vec![
                serde_json::json!({"type": "queued", "conversation": conversation.0, "position": 1})
            ]
        );
    }

    /// Every typing frame forwarded to `to`, as `on` values.
    fn typing_to(actions: &[OwnerAction], to: SessionRef) -> Vec<bool> {
        actions
            .iter()
            .filter_map(|action| match action {
                OwnerAction::Send { to: target, frame }
                    if *target == to && frame.contains("\"type\":\"typing\"") =>
                {
                    Some(frame.contains("\"on\":true"))
                }
                _ => None,
            })
            .collect()
    }

    /// An owner holding conversation 5 of visitor "typist", assigned to alice, with the
    /// visitor's tab (session 1) attached; also returns the agent's tab (session 2).
    fn typist_assigned_to_alice() -> (Owner, ConversationId, SessionRef, SessionRef) {
        let conversation = ConversationId::from_parts(0, 5);
        let (visitor_tab, agent_tab) = (session(1), session(2));
        let mut owner = owner();
        let mut assigned = meta(conversation, "typist", 1);
        assigned.state = ConversationState::Assigned {
            agent: "alice".into(),
        };
        owner.insert_loaded(assigned);
        attach(
            &mut owner,
            "typist",
            visitor_tab,
            None,
            credentials(None, true, "fresh-1"),
            StoredVisitor {
                secret_hash: Some([1; 32]),
                conversation: Some(conversation),
            },
        );
        (owner, conversation, visitor_tab, agent_tab)
    }

    #[test]
    fn an_agent_who_joins_while_the_visitor_is_shown_typing_is_shown_it_too() {
        let (mut owner, conversation, visitor_tab, agent_tab) = typist_assigned_to_alice();
        let typing = |owner: &mut Owner, on: bool, now: u64| {
            owner.handle(
                OwnerEvent::Visitor {
                    key: key("typist"),
                    session: visitor_tab,
                    frame: VisitorFrame::Typing { on },
                },
                now,
            )
        };
        // "On" forwarded to nobody yet, then "off" held by the throttle.
        typing(&mut owner, true, 10_000);
        typing(&mut owner, false, 10_050);
        let joined = owner.handle(
            OwnerEvent::AgentSubscribe {
                conversation,
                agent: "alice".into(),
                session: agent_tab,
            },
            10_100,
        );
        assert_eq!(typing_to(&joined, agent_tab), vec![true]);
        // Typing again inside the interval cancels the held "off": no change to send, and
        // the agent already shows "typing".
        assert!(typing_to(&typing(&mut owner, true, 10_200), agent_tab).is_empty());
        assert!(typing_to(&owner.handle(OwnerEvent::Tick, 11_100), agent_tab).is_empty());
        // Stopping reaches the agent.
        assert_eq!(
            typing_to(&typing(&mut owner, false, 12_000), agent_tab),
            vec![false]
        );
    }

    #[test]
    fn alternating_typing_on_and_off_is_throttled_and_ends_in_the_final_state() {
        let (mut owner, conversation, visitor_tab, agent_tab) = typist_assigned_to_alice();
        owner.handle(
            OwnerEvent::AgentSubscribe {
                conversation,
                agent: "alice".into(),
                session: agent_tab,
            },
            0,
        );
        // 1,000 frames in one second from each side, alternating on and off.
        let (mut to_agent, mut to_visitor) = (Vec::new(), Vec::new());
        for i in 0..1000u64 {
            let on = i % 2 == 0;
            let now = 10_000 + i;
            let actions = owner.handle(
                OwnerEvent::Visitor {
                    key: key("typist"),
                    session: visitor_tab,
                    frame: VisitorFrame::Typing { on },
                },
                now,
            );
            to_agent.extend(typing_to(&actions, agent_tab));
            let actions = owner.handle(
                OwnerEvent::Agent {
                    agent: "alice".into(),
                    name: "Alice".into(),
                    role: crate::auth::rbac::Role::Agent,
                    session: agent_tab,
                    frame: AgentFrame::Typing {
                        conversation: conversation.0,
                        on,
                    },
                },
                now,
            );
            to_visitor.extend(typing_to(&actions, visitor_tab));
        }
        assert_eq!(
            to_agent,
            vec![true],
            "one change per interval reaches the agent"
        );
        assert_eq!(
            to_visitor,
            vec![true],
            "one change per interval reaches the visitor"
        );
        // The last frame was "off": delivered once the interval is over, and only once.
        let tick = owner.handle(OwnerEvent::Tick, 11_000);
        assert_eq!(typing_to(&tick, agent_tab), vec![false]);
        assert_eq!(typing_to(&tick, visitor_tab), vec![false]);
        let tick = owner.handle(OwnerEvent::Tick, 12_000);
        assert!(typing_to(&tick, agent_tab).is_empty());
        assert!(typing_to(&tick, visitor_tab).is_empty());
        // An "on" that is not renewed is switched off after the expiry.
        let on = owner.handle(
            OwnerEvent::Visitor {
                key: key("typist"),
                session: visitor_tab,
                frame: VisitorFrame::Typing { on: true },
            },
            20_000,
        );
        assert_eq!(typing_to(&on, agent_tab), vec![true]);
        assert!(typing_to(&owner.handle(OwnerEvent::Tick, 24_000), agent_tab).is_empty());
        assert_eq!(
            typing_to(&owner.handle(OwnerEvent::Tick, 25_000), agent_tab),
            vec![false]
        );
        // Typing again right after an "off" was forwarded: held, then delivered by a tick.
        let on = owner.handle(
            OwnerEvent::Visitor {
                key: key("typist"),
                session: visitor_tab,
                frame: VisitorFrame::Typing { on: true },
            },
            25_300,
        );
        assert!(typing_to(&on, agent_tab).is_empty());
        assert_eq!(
            typing_to(&owner.handle(OwnerEvent::Tick, 26_000), agent_tab),
            vec![true]
        );
    }

    #[test]
    fn a_tab_waiting_for_its_hello_gets_a_committing_message_from_its_replay_only() {
        let conversation = ConversationId::from_parts(0, 1);
        let (first, second) = (session(1), session(2));
        let mut owner = owner();

        // The first tab connects and sends a message: that opens the conversation.
        attach(
            &mut owner,
            "v1",
            first,
            None,
            credentials(None, false, "fresh-1"),
            StoredVisitor::default(),
        );
        let first_message = owner.handle(
            OwnerEvent::Visitor {
                key: key("v1"),
                session: first,
                frame: VisitorFrame::Message {
                    id: "m0".into(),
                    text: "first".into(),
                },
            },
            0,
        );
        // The secret is stored first, then the conversation is opened.
        let secret = stores(&first_message)
            .into_iter()
            .next()
            .expect("the first message stores the secret");
        let opening = committed(&mut owner, secret, OpOutcome::Updated);
        let open = stores(&opening)
            .into_iter()
            .find(|(op, _)| matches!(op, Op::Open { .. }))
            .expect("the first message opens the conversation");
        let load = committed(
            &mut owner,
            open,
            OpOutcome::Opened {
                conversation,
                created: true,
                last_seq: 0,
            },
        );
        assert!(matches!(load[..], [OwnerAction::Load { .. }]));
        owner.insert_loaded(meta(conversation, "v1", 0));
        let OwnerAction::Load { event, .. } = load.into_iter().next().unwrap() else {
            unreachable!()
        };
        owner.handle(*event, 0);

        // It sends a message and goes away before the commit completes.
        let sent = owner.handle(
            OwnerEvent::Visitor {
                key: key("v1"),
                session: first,
                frame: VisitorFrame::Message {
                    id: "m1".into(),
                    text: "hello".into(),
                },
            },
            0,
        );
        let append = stores(&sent)
            .into_iter()
            .find(|(op, _)| matches!(op, Op::Append(_)))
            .expect("the message is stored");
        owner.handle(
            OwnerEvent::VisitorDetach {
                key: key("v1"),
                session: first,
            },
            0,
        );

        // A new tab attaches with its secret and resume = 0 while the message commits.
        let greeting = attach(
            &mut owner,
            "v1",
            second,
            Some(0),
            credentials(Some("secret-of-fresh-1"), false, "fresh-2"),
            StoredVisitor {
                secret_hash: Some(super::super::identity::hash_secret("secret-of-fresh-1")),
                conversation: Some(conversation),
            },
        );
        // The conversation is still in memory (a commit in flight): greeted from there, at
        // the seq fanned out so far, with nothing to replay.
        let hello = hello_of(&greeting, second);
        assert_eq!(
            (hello["visitor"].as_str(), hello["seq"].as_u64()),
            (Some("v1"), Some(0))
        );
        assert!(!greeting
            .iter()
            .any(|a| matches!(a, OwnerAction::Replay { .. })));
        // So the message reaches it exactly once, by fan-out.
        let fan_out = committed(&mut owner, append, OpOutcome::Stored { seq: 1, ts_ms: 1 });
        assert_eq!(messages_to(&fan_out, second), 1, "{fan_out:#?}");
    }

    fn frames_to(actions: &[OwnerAction], to: SessionRef) -> Vec<serde_json::Value> {
        actions
            .iter()
            .filter_map(|action| match action {
                OwnerAction::Send { to: target, frame } if *target == to => {
                    Some(serde_json::from_str(frame).unwrap())
                }
                _ => None,
            })
            .collect()
    }

    fn audits(actions: &[OwnerAction]) -> Vec<&AuditEvent> {
        actions
            .iter()
            .filter_map(|action| match action {
                OwnerAction::Audit(event) => Some(event),
                _ => None,
            })
            .collect()
    }

    fn agent_frame(agent: &str, role: Role, session: SessionRef, frame: AgentFrame) -> OwnerEvent {
        OwnerEvent::Agent {
            agent: agent.into(),
            name: agent.to_uppercase(),
            role,
            session,
            frame,
        }
    }

    #[test]
    fn a_supervisor_watches_any_conversation_without_taking_it_and_an_agent_may_not() {
        let conversation = ConversationId::from_parts(0, 7);
        let mut owner = owner();
        let mut stored = meta(conversation, "v1", 3);
        stored.state = ConversationState::Assigned {
            agent: "alice".into(),
        };
        owner.insert_loaded(stored);
        let (alice, bob, sue) = (session(10), session(11), session(20));
        owner.handle(
            OwnerEvent::AgentSubscribe {
                conversation,
                agent: "alice".into(),
                session: alice,
            },
            0,
        );
        let c = conversation.0;

        // A plain agent is refused by role: no subscription, no history.
        let refused = owner.handle(
            agent_frame(
                "bob",
                Role::Agent,
                bob,
                AgentFrame::Watch { conversation: c },
            ),
            0,
        );
        assert_eq!(frames_to(&refused, bob)[0]["code"], "forbidden");
        assert!(!refused.iter().any(|a| matches!(
            a,
            OwnerAction::Replay { .. } | OwnerAction::Track { .. } | OwnerAction::Audit(_)
        )));

        // A supervisor gets the state, the whole history and is tracked; it is audited.
        let watched = owner.handle(
            agent_frame(
                "sue",
                Role::Supervisor,
                sue,
                AgentFrame::Watch { conversation: c },
            ),
            0,
        );
        let info = &frames_to(&watched, sue)[0];
        assert_eq!(info["type"], "watching");
        assert_eq!(info["state"], "assigned");
        assert_eq!(info["agent"], "alice");
        assert_eq!(info["seq"], 3);
        assert!(watched.iter().any(|a| matches!(a,
            OwnerAction::Replay { to, after: 0, up_to: 3, .. } if *to == vec![sue])));
        assert!(watched.iter().any(|a| matches!(a,
            OwnerAction::Track { session, .. } if *session == sue)));
        let records = audits(&watched);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].kind, "conversation_watched");
        assert_eq!(records[0].actor, "sue");
        assert_eq!(records[0].target, c.to_string());
        // Watching twice does not deliver live frames twice.
        owner.handle(
            agent_frame(
                "sue",
                Role::Supervisor,
                sue,
                AgentFrame::Watch { conversation: c },
            ),
            0,
        );

        // Live messages and typing of the conversation reach the watcher once.
        let sent = owner.handle(
            agent_frame(
                "alice",
                Role::Agent,
                alice,
                AgentFrame::Message {
                    conversation: c,
                    id: "m1".into(),
                    text: "hi".into(),
                },
            ),
            0,
        );
        let fanned = committed(
            &mut owner,
            stores(&sent).remove(0),
            OpOutcome::Stored { seq: 4, ts_ms: 5 },
        );
        assert_eq!(messages_to(&fanned, sue), 1);
        let typing = owner.handle(
            agent_frame(
                "alice",
                Role::Agent,
                alice,
                AgentFrame::Typing {
                    conversation: c,
                    on: true,
                },
            ),
            10_000,
        );
        assert_eq!(frames_to(&typing, sue)[0]["type"], "typing");

        // Watching is not holding: the supervisor cannot write in it.
        let write = owner.handle(
            agent_frame(
                "sue",
                Role::Supervisor,
                sue,
                AgentFrame::Message {
                    conversation: c,
                    id: "s1".into(),
                    text: "psst".into(),
                },
            ),
            0,
        );
        assert_eq!(frames_to(&write, sue)[0]["code"], "not_assigned");
        assert!(stores(&write).is_empty());

        // The watcher keeps the conversation in memory and follows a transfer.
        owner.handle(OwnerEvent::Tick, 20_000);
        owner.handle(
            OwnerEvent::AgentUnsubscribe {
                conversation,
                session: alice,
            },
            0,
        );
        owner.handle(OwnerEvent::Tick, 30_000);
        assert!(owner.is_live(conversation));
        let moved = owner.handle(
            OwnerEvent::Transferred {
                conversation,
                to: "carol".into(),
                to_name: "Carol".into(),
                sessions: vec![],
            },
            0,
        );
        let info = frames_to(&moved, sue);
        assert_eq!(info.last().unwrap()["type"], "watching");
        assert_eq!(info.last().unwrap()["agent"], "carol");

        // Closing by its agent is audited once committed, and the watcher hears `closed`.
        let close = owner.handle(
            agent_frame(
                "carol",
                Role::Agent,
                session(12),
                AgentFrame::Close { conversation: c },
            ),
            0,
        );
        assert!(audits(&close).is_empty(), "audited only when committed");
        let closing = stores(&close)
            .into_iter()
            .find(|(op, _)| matches!(op, Op::SetState { .. }))
            .unwrap();
        let closed = committed(&mut owner, closing, OpOutcome::Updated);
        assert_eq!(frames_to(&closed, sue)[0]["type"], "closed");
        let records = audits(&closed);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].kind, "conversation_closed");
        assert_eq!(records[0].actor, "carol");
        assert_eq!(records[0].target, c.to_string());
    }

    #[test]
    fn an_unwatched_conversation_no_longer_reaches_the_supervisor() {
        let conversation = ConversationId::from_parts(0, 8);
        let mut owner = owner();
        let mut stored = meta(conversation, "v1", 0);
        stored.state = ConversationState::Assigned {
            agent: "alice".into(),
        };
        owner.insert_loaded(stored);
        let (alice, sue) = (session(10), session(20));
        owner.handle(
            OwnerEvent::AgentSubscribe {
                conversation,
                agent: "alice".into(),
                session: alice,
            },
            0,
        );
        let c = conversation.0;
        let watched = owner.handle(
            agent_frame(
                "sue",
                Role::Admin,
                sue,
                AgentFrame::Watch { conversation: c },
            ),
            0,
        );
        assert!(
            !watched
                .iter()
                .any(|a| matches!(a, OwnerAction::Replay { .. })),
            "no history yet"
        );
        let unwatched = owner.handle(
            agent_frame(
                "sue",
                Role::Admin,
                sue,
                AgentFrame::Unwatch { conversation: c },
            ),
            0,
        );
        assert_eq!(frames_to(&unwatched, sue)[0]["type"], "unwatched");
        let sent = owner.handle(
            agent_frame(
                "alice",
                Role::Agent,
                alice,
                AgentFrame::Message {
                    conversation: c,
                    id: "m1".into(),
                    text: "hi".into(),
                },
            ),
            0,
        );
        let fanned = committed(
            &mut owner,
            stores(&sent).remove(0),
            OpOutcome::Stored { seq: 1, ts_ms: 5 },
        );
        assert_eq!(messages_to(&fanned, sue), 0);
        // An agent may not unwatch either (the frame is a supervisor's).
        let refused = owner.handle(
            agent_frame(
                "alice",
                Role::Agent,
                alice,
                AgentFrame::Unwatch { conversation: c },
            ),
            0,
        );
        assert_eq!(frames_to(&refused, alice)[0]["code"], "forbidden");
    }
}
