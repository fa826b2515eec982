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

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;

use super::dispatch::DispatchEvent;
use super::protocol::{self, AgentFrame, VisitorFrame};
use super::SessionRef;
use crate::auth::rbac::{self, Action, Role};
use crate::store::{
    Author, Conversation, ConversationId, ConversationState, NewMessage, Op, OpOutcome, ReadSide,
};

/// A visitor's identity on a site: `site` and visitor id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VisitorKey {
    pub site: Arc<str>,
    pub visitor: Arc<str>,
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
}

/// What happened.
#[derive(Debug)]
pub enum OwnerEvent {
    VisitorAttach {
        key: VisitorKey,
        resume: Option<u64>,
        session: SessionRef,
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
    /// A store operation finished; `op` is handed back with its outcome.
    Committed {
        completion: Completion,
        op: Op,
        outcome: Result<OpOutcome, String>,
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
    BotMessage {
        conversation: ConversationId,
    },
}

#[derive(Debug, Default)]
struct VisitorEntry {
    conversation: Option<ConversationId>,
    opening: bool,
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
    /// When each side's typing indicator was last forwarded as "on".
    visitor_typing_since: Option<u64>,
    agent_typing_since: Option<u64>,
    /// Store operations of this conversation not yet committed; a conversation
    /// is never evicted from memory while this is non-zero, so a reload from
    /// storage never sees a seq the fan-out has not handled.
    in_flight: u32,
}

/// The conversations owned by one shard.
pub struct Owner {
    config: OwnerConfig,
    visitors: HashMap<VisitorKey, VisitorEntry>,
    live: HashMap<ConversationId, Live>,
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
        }
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
            visitor_typing_since: None,
            agent_typing_since: None,
            in_flight: 0,
        });
    }

    /// Handles one event at time `now_ms`.
    pub fn handle(&mut self, event: OwnerEvent, now_ms: u64) -> Vec<OwnerAction> {
        let mut out = Vec::new();
        match event {
            OwnerEvent::VisitorAttach {
                key,
                resume,
                session,
            } => self.visitor_attach(key, resume, session, &mut out),
            OwnerEvent::VisitorDetach { key, session } => self.visitor_detach(&key, session),
            OwnerEvent::Visitor {
                key,
                session,
                frame,
            } => self.visitor_frame(key, session, frame, now_ms, &mut out),
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
                }
            }
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
                self.expire_typing(now_ms, &mut out);
                self.evict_idle();
            }
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
                || live.in_flight > 0
                || live.visitor_typing_since.is_some()
                || live.agent_typing_since.is_some()
        });
    }

    fn visitor_attach(
        &mut self,
        key: VisitorKey,
        resume: Option<u64>,
        session: SessionRef,
        out: &mut Vec<OwnerAction>,
    ) {
        let entry = self.visitors.entry(key.clone()).or_default();
        if !entry.sessions.contains(&session) {
            entry.sessions.push(session);
        }
        match entry.conversation {
            Some(conversation) if !entry.opening => {
                if self.live.contains_key(&conversation) {
                    self.greet(conversation, session, resume, out);
                } else {
                    out.push(OwnerAction::Load {
                        conversation,
                        event: Box::new(OwnerEvent::VisitorAttach {
                            key,
                            resume,
                            session,
                        }),
                    });
                }
            }
            _ => {
                entry.awaiting_hello.push((session, resume));
                if !entry.opening {
                    entry.opening = true;
                    out.push(OwnerAction::Store {
                        op: Op::Open {
                            site: key.site.to_string(),
                            visitor: key.visitor.to_string(),
                        },
                        completion: Completion::Opened { key },
                    });
                }
            }
        }
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
        out.push(OwnerAction::Hello {
            to: session,
            frame: frame(serde_json::json!({
                "type": "hello",
                "visitor": &*live.key.visitor,
                "site": &*live.key.site,
                "conversation": conversation.0,
                "seq": last,
            })),
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
        if !visitors_connected && live.agent_sessions.is_empty() && live.in_flight == 0 {
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
                    entry.conversation = None;
                    entry.opening = true;
                    entry
                        .pending
                        .push((session, VisitorFrame::Message { id, text }));
                    out.push(OwnerAction::Store {
                        op: Op::Open {
                            site: key.site.to_string(),
                            visitor: key.visitor.to_string(),
                        },
                        completion: Completion::Opened { key: key.clone() },
                    });
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
                if !rate_ok(
                    &mut live.visitor_typing_since,
                    on,
                    now_ms,
                    self.config.typing_interval_ms,
                ) {
                    return;
                }
                let typing = frame(serde_json::json!({
                    "type": "typing", "conversation": conversation.0, "from": "visitor", "on": on,
                }));
                for to in &live.agent_sessions {
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
                if !rate_ok(
                    &mut live.agent_typing_since,
                    on,
                    now_ms,
                    self.config.typing_interval_ms,
                ) {
                    return;
                }
                let typing = frame(serde_json::json!({
                    "type": "typing", "conversation": conversation.0, "from": "agent", "on": on,
                }));
                let key = live.key.clone();
                for to in live.agent_sessions.iter().filter(|s| **s != session) {
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
                    completion: Completion::StateChanged { conversation },
                });
            }
            // Accept, transfer and status go to the dispatcher, not here.
            AgentFrame::Accept { .. } | AgentFrame::Transfer { .. } | AgentFrame::Status { .. } => {
            }
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
        let after = live.meta.agent_read;
        if after < live.meta.last_seq {
            out.push(OwnerAction::Replay {
                to: vec![session],
                conversation,
                after,
                up_to: live.meta.last_seq,
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
    }

    fn committed(
        &mut self,
        completion: Completion,
        op: Op,
        outcome: Result<OpOutcome, String>,
        out: &mut Vec<OwnerAction>,
    ) {
        if let Some(live) = op_conversation(&op).and_then(|c| self.live.get_mut(&c)) {
            live.in_flight = live.in_flight.saturating_sub(1);
        }
        match completion {
            Completion::Opened { key } => self.opened(key, outcome, out),
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
                        for to in &live.agent_sessions {
                            out.push(OwnerAction::Send {
                                to: *to,
                                frame: note.clone(),
                            });
                        }
                    }
                    ReadSide::Agent => {
                        let key = live.key.clone();
                        self.send_visitors(&key, None, &note, out);
                    }
                }
            }
            Completion::BotMessage { conversation } => {
                self.bot_message_committed(conversation, op, outcome, out)
            }
            Completion::StateChanged { conversation } => {
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
                let Some(live) = self.live.remove(&conversation) else {
                    return;
                };
                let note = frame(serde_json::json!({
                    "type": "closed", "conversation": conversation.0,
                }));
                for to in &live.agent_sessions {
                    out.push(OwnerAction::Send {
                        to: *to,
                        frame: note.clone(),
                    });
                }
                self.send_visitors(&live.key, None, &note, out);
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
        }
    }

    /// Acks a stored message to its sender and fans it out to everyone else.
    #[allow(clippy::too_many_arguments)]
    fn message_committed(
        &mut self,
        conversation: ConversationId,
        session: SessionRef,
        op: Op,
        outcome: Result<OpOutcome, String>,
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
                    frame: error("storage_error", &err),
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
        outcome: Result<OpOutcome, String>,
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
            .agent_sessions
            .iter()
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
        outcome: Result<OpOutcome, String>,
        out: &mut Vec<OwnerAction>,
    ) {
        let Some(entry) = self.visitors.get_mut(&key) else {
            return;
        };
        entry.opening = false;
        let conversation = match outcome {
            Ok(OpOutcome::Opened { conversation, .. }) => conversation,
            other => {
                let message = format!("cannot open the conversation: {other:?}");
                for (session, _) in entry.awaiting_hello.drain(..) {
                    // In place of the hello, so it is not held back.
                    out.push(OwnerAction::Hello {
                        to: session,
                        frame: error("storage_error", &message),
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

    fn expire_typing(&mut self, now_ms: u64, out: &mut Vec<OwnerAction>) {
        let expiry = self.config.typing_expiry_ms;
        let mut expired = Vec::new();
        for (conversation, live) in &mut self.live {
            if live
                .visitor_typing_since
                .is_some_and(|since| now_ms.saturating_sub(since) >= expiry)
            {
                live.visitor_typing_since = None;
                expired.push((*conversation, "visitor"));
            }
            if live
                .agent_typing_since
                .is_some_and(|since| now_ms.saturating_sub(since) >= expiry)
            {
                live.agent_typing_since = None;
                expired.push((*conversation, "agent"));
            }
        }
        for (conversation, from) in expired {
            let Some(live) = self.live.get(&conversation) else {
                continue;
            };
            let off = frame(serde_json::json!({
                "type": "typing", "conversation": conversation.0, "from": from, "on": false,
            }));
            if from == "visitor" {
                for to in &live.agent_sessions {
                    out.push(OwnerAction::Send {
                        to: *to,
                        frame: off.clone(),
                    });
                }
            } else {
                self.send_visitors(&live.key, None, &off, out);
            }
        }
    }
}

fn assigned_to_agent(live: &Live) -> Arc<str> {
    frame(serde_json::json!({
        "type": "assigned",
        "conversation": live.meta.id.0,
        "site": &*live.key.site,
        "visitor": &*live.key.visitor,
        "seq": live.meta.last_seq,
    }))
}

/// Typing rate limit: an "on" is forwarded at most once per interval (and
/// renews the expiry); an "off" is forwarded only when "on" was.
fn rate_ok(since: &mut Option<u64>, on: bool, now_ms: u64, interval_ms: u64) -> bool {
    match (on, *since) {
        (true, Some(at)) if now_ms.saturating_sub(at) < interval_ms => false,
        (true, _) => {
            *since = Some(now_ms);
            true
        }
        (false, Some(_)) => {
            *since = None;
            true
        }
        (false, None) => false,
    }
}

/// The conversation an operation writes to (none for `Open`, which creates it).
fn op_conversation(op: &Op) -> Option<ConversationId> {
    match op {
        Op::Open { .. } => None,
        Op::Append(message) => Some(message.conversation),
        Op::SetState { conversation, .. }
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

    #[test]
    fn a_tab_waiting_for_its_hello_gets_a_committing_message_from_its_replay_only() {
        let key = VisitorKey {
            site: "acme".into(),
            visitor: "v1".into(),
        };
        let conversation = ConversationId::from_parts(0, 1);
        let (first, second) = (session(1), session(2));
        let mut owner = owner();

        // The first tab opens the conversation and is greeted.
        let attach = |session, resume| OwnerEvent::VisitorAttach {
            key: key.clone(),
            resume,
            session,
        };
        let open = stores(&owner.handle(attach(first, None), 0)).remove(0);
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
        owner.insert_loaded(Conversation {
            id: conversation,
            site: "acme".into(),
            visitor: "v1".into(),
            state: ConversationState::Bot,
            state_since_ms: 0,
            last_seq: 0,
            created_ms: 0,
            updated_ms: 0,
            visitor_read: 0,
            agent_read: 0,
            failed_bot_turns: 0,
        });
        let OwnerAction::Load { event, .. } = load.into_iter().next().unwrap() else {
            unreachable!()
        };
        owner.handle(*event, 0);

        // It sends a message and goes away before the commit completes.
        let sent = owner.handle(
            OwnerEvent::Visitor {
                key: key.clone(),
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
                key: key.clone(),
                session: first,
            },
            0,
        );

        // A new tab attaches with resume = 0 while the message commits.
        let reopen = stores(&owner.handle(attach(second, Some(0)), 0)).remove(0);
        let fan_out = committed(&mut owner, append, OpOutcome::Stored { seq: 1, ts_ms: 1 });
        assert_eq!(
            messages_to(&fan_out, second),
            0,
            "a tab waiting for its hello must not get the message here: {fan_out:#?}"
        );

        // Its greeting covers the message: hello at seq 1 and a replay of (0, 1].
        let greeting = committed(
            &mut owner,
            reopen,
            OpOutcome::Opened {
                conversation,
                created: false,
                last_seq: 1,
            },
        );
        assert!(greeting.iter().any(|action| matches!(action,
            OwnerAction::Hello { to, frame } if *to == second && frame.contains("\"seq\":1"))));
        assert!(greeting.iter().any(|action| matches!(action,
            OwnerAction::Replay { to, after: 0, up_to: 1, .. } if to == &vec![second])));
    }
}
