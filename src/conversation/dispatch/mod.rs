//! Queue and assignment of conversations to human agents: a pure, sans-IO
//! state machine run by the single "dispatcher shard".
//!
//! Events come in ([`DispatchEvent`]) together with the current time in
//! milliseconds; actions come out ([`DispatchAction`]) for the driver to turn
//! into mesh messages and frames. Nothing here does I/O, spawns tasks or reads
//! a clock.
//!
//! Rules:
//! - The queue is FIFO. With `auto_assign` on, after every event the queue
//!   head goes to the *available* agent (at least one attached session, status
//!   Online, below its `max_open`) with the fewest open conversations; ties go
//!   to the agent assigned least recently, then to the smallest agent id. This
//!   repeats until the queue is empty or nobody is available.
//! - An agent that stops being *present* (goes Away or loses its last session)
//!   keeps its conversations for `agent_grace_ms`. The first `Tick` at or after
//!   that deadline puts them back at the front of the queue, in the order they
//!   first entered it, and the queue is dispatched again. Becoming present
//!   again before that cancels the timer.
//! - Visitors learn their 1-based queue position: a `QueuePositions` action
//!   lists exactly the queued conversations whose position differs from the
//!   last one reported for them.
//! - Nobody online: when no agent is *present* after an event, every
//!   conversation that entered the queue during it (enqueued, enqueued again
//!   by its visitor reconnecting, re-queued after a grace period) is listed in
//!   a `NoAgents` action, so its visitor hears that nobody will answer soon
//!   and may leave a message; the conversation stays queued. When the last
//!   present agent leaves, every queued conversation is listed once. At
//!   capacity is not "nobody online": agents who are present but full leave
//!   their visitors waiting with a position, as before.
//! - An agent's status is sticky while the dispatcher runs: an agent who went
//!   Away and reconnects is still Away (their `AgentHello` says so).
//! - `Accept` takes a queued conversation for an agent who is present and
//!   below cap, ignoring the "fewest open" rule. With `auto_assign` on, such
//!   an agent never coexists with a waiting conversation after an event, so
//!   an accept then only races with auto-assignment and is refused with
//!   `not_queued` ("already assigned to you" when the race went their way).
//!
//! Invariants (checked by the randomized test after every event):
//! - a tracked conversation is either queued (exactly once) or assigned to
//!   exactly one agent, never both; `assigned_to` agrees with the agents'
//!   open lists;
//! - assignments made here (auto, accept, transfer) never take an agent above
//!   its `max_open`; an agent is above it only if its cap was lowered on a
//!   later attach or `Restore` gave it more than the cap;
//! - with `auto_assign`, when the queue is non-empty after an event no agent
//!   is available;
//! - outputs never depend on hash-map iteration order.
//!
//! Cost: removing a conversation from the middle of the queue (accept, close)
//! is O(queue). Position reporting after an event is O(queue - i), where i is
//! the first index that moved; a dequeue from the head moves every waiting
//! conversation, so with n waiting visitors an assignment produces n position
//! updates (several assignments in one event still produce one pass).
//! `QueueSnapshot` carries the whole queue to every agent session whenever
//! its content changed. `NoAgents` lists the whole queue only when the last
//! present agent leaves (once per such transition); otherwise it lists the
//! few conversations that just entered the queue. Picking an agent is O(agents). Agents are never
//! forgotten: their number is bounded by the configured accounts plus the
//! agents named in restored assignments. Measured with 50,000 waiting
//! (`long_queue_cost`, release): an assignment from the head takes about
//! 0.5 ms including its ~50,000 position updates and the snapshot; closing a
//! conversation at the tail about 0.13 ms (search plus snapshot).
//!
//! Files by role: this one holds the types, events, actions and `handle`; `queue` the FIFO and
//! what is reported about it, `agents` presence and the choice of agent, `requests` accept,
//! transfer, close and restore, `tests` the unit and randomized tests.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::auth::rbac::{self, Action, Role};

mod agents;
mod queue;
mod requests;
#[cfg(test)]
mod tests;

// Types shared with the owner and the driver.

/// Identifies a conversation across shards.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct ConversationId(pub u64);

/// One WebSocket session of an agent: the shard it lives on and its id there.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SessionRef {
    pub shard: usize,
    pub session: u64,
}

/// Account id of an agent, from the `[agents]` config table.
pub type AgentId = String;

/// What an agent said about their availability.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AgentStatus {
    Online,
    Away,
}

// Dispatcher

/// Tuning of the dispatcher.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DispatcherConfig {
    /// How long an agent who went Away or lost their last session keeps
    /// their conversations before they are re-queued.
    pub agent_grace_ms: u64,
    /// Assign queued conversations automatically. When off, conversations
    /// wait until an agent `Accept`s them (grace expiry still re-queues).
    pub auto_assign: bool,
}

impl DispatcherConfig {
    /// Automatic assignment with the given grace period.
    pub fn new(agent_grace_ms: u64) -> Self {
        Self {
            agent_grace_ms,
            auto_assign: true,
        }
    }
}

/// Something that happened elsewhere, reported to the dispatcher.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum DispatchEvent {
    /// A session of the agent connected (an agent may have several tabs).
    /// `name` and `max_open` replace the values from earlier attaches.
    AgentAttached {
        agent: AgentId,
        name: String,
        max_open: u32,
        session: SessionRef,
    },
    /// A session of the agent went away. Unknown agents/sessions are ignored.
    AgentDetached { agent: AgentId, session: SessionRef },
    /// The agent changed status. Unknown agents are ignored.
    AgentStatus { agent: AgentId, status: AgentStatus },
    /// Bot handoff or visitor "handoff". No-op if already queued or assigned.
    Enqueue {
        conversation: ConversationId,
        owner: usize,
    },
    /// Manual pick of a queued conversation.
    Accept {
        agent: AgentId,
        session: SessionRef,
        conversation: ConversationId,
    },
    /// The assigned agent hands the conversation to another agent; a role allowed
    /// `TransferAny` (supervisor, admin) may move any assigned conversation.
    Transfer {
        from: AgentId,
        session: SessionRef,
        conversation: ConversationId,
        to: AgentId,
        role: Role,
    },
    /// Closed by agent or visitor: leaves the queue or frees the agent's slot.
    /// Unknown conversations are ignored.
    Closed { conversation: ConversationId },
    /// Rebuild after a restart, from storage. Conversations already tracked
    /// are ignored. Restore in creation order: it defines the original queue
    /// order used when conversations are re-queued.
    Restore {
        conversation: ConversationId,
        owner: usize,
        assigned: Option<AgentId>,
    },
    /// About once a second: expires grace periods.
    Tick,
}

/// Something the driver must do.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum DispatchAction {
    /// Tell the owner shard (which stores it and notifies the visitor) and the
    /// agent's sessions.
    Assigned {
        conversation: ConversationId,
        owner: usize,
        agent: AgentId,
        agent_name: String,
        sessions: Vec<SessionRef>,
    },
    /// The conversation went back to the queue because its agent did not
    /// return within the grace period. `sessions` are the agent's sessions
    /// still attached (an Away agent may have tabs open), possibly none.
    Requeued {
        conversation: ConversationId,
        owner: usize,
        from_agent: AgentId,
        sessions: Vec<SessionRef>,
    },
    /// New 1-based positions, in queue order; only those that changed.
    QueuePositions {
        updates: Vec<(ConversationId, usize, usize)>,
    },
    /// The queue's content changed: send it to every attached agent session.
    QueueSnapshot {
        sessions: Vec<SessionRef>,
        queue: Vec<ConversationId>,
        /// How long each of `queue` has waited, in ms (same order).
        waited_ms: Vec<u64>,
    },
    /// `sessions` are the new agent's, `from_sessions` the previous agent's.
    Transferred {
        conversation: ConversationId,
        owner: usize,
        from: AgentId,
        to: AgentId,
        to_name: String,
        sessions: Vec<SessionRef>,
        from_sessions: Vec<SessionRef>,
    },
    /// An agent request was refused; `code` is [`Rejection::code`].
    Rejected {
        session: SessionRef,
        code: &'static str,
        message: String,
    },
    /// No agent is present: tell the visitors of these queued conversations
    /// (conversation, owner shard) that nobody is online. Queue order when
    /// the last agent left, else the order they entered the queue.
    NoAgents {
        conversations: Vec<(ConversationId, usize)>,
    },
    /// Reply to `AgentAttached`: the agent's open conversations (in the order
    /// they were assigned), the queue, and the agent's current status.
    AgentHello {
        session: SessionRef,
        conversations: Vec<ConversationId>,
        queue: Vec<ConversationId>,
        /// How long each of `queue` has waited, in ms (same order).
        waited_ms: Vec<u64>,
        status: AgentStatus,
    },
}

/// Why an `Accept` or `Transfer` was refused.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum Rejection {
    #[error("agent {agent:?} is not known to the dispatcher (never connected)")]
    UnknownAgent { agent: AgentId },
    #[error("this session is not attached as agent {agent:?}")]
    NotAttached { agent: AgentId },
    #[error("agent {agent:?} is not online")]
    AgentOffline { agent: AgentId },
    #[error("agent {agent:?} already has {open} of at most {max_open} open conversations")]
    AtCapacity {
        agent: AgentId,
        open: usize,
        max_open: u32,
    },
    #[error("conversation {} is not waiting in the queue: {reason}", .conversation.0)]
    NotQueued {
        conversation: ConversationId,
        reason: &'static str,
    },
    #[error("conversation {} is not assigned to agent {agent:?}", .conversation.0)]
    NotAssigned {
        conversation: ConversationId,
        agent: AgentId,
    },
    #[error("conversation {} is already assigned to agent {agent:?}", .conversation.0)]
    SameAgent {
        conversation: ConversationId,
        agent: AgentId,
    },
}

impl Rejection {
    /// Stable code for the `error` frame.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::UnknownAgent { .. } => "unknown_agent",
            Rejection::NotAttached { .. } => "not_attached",
            Rejection::AgentOffline { .. } => "agent_offline",
            Rejection::AtCapacity { .. } => "at_capacity",
            Rejection::NotQueued { .. } => "not_queued",
            Rejection::NotAssigned { .. } => "not_assigned",
            Rejection::SameAgent { .. } => "same_agent",
        }
    }
}

#[derive(Debug)]
struct Agent {
    id: AgentId,
    name: String,
    /// `None` for an agent known only from a restored assignment.
    max_open: Option<u32>,
    status: AgentStatus,
    sessions: Vec<SessionRef>,
    /// Open conversations, in the order they were given to this agent.
    open: Vec<ConversationId>,
    /// Value of the dispatcher's assignment counter at the last assignment
    /// to this agent; 0 means never.
    last_assigned: u64,
    /// Set while the agent is not present and still owes a re-queue.
    grace_deadline: Option<u64>,
}

impl Agent {
    fn present(&self) -> bool {
        self.status == AgentStatus::Online && !self.sessions.is_empty()
    }

    fn has_room(&self) -> bool {
        self.max_open
            .is_some_and(|max| self.open.len() < max as usize)
    }
}

#[derive(Clone, Copy, Debug)]
enum Place {
    /// Waiting in `Dispatcher::queue`.
    Queued,
    /// Index into `Dispatcher::agents`.
    Assigned { agent: usize },
}

/// A queue entry. The owner is copied here so that reporting positions does
/// not look every waiting conversation up in the map (measured: 4.1 ms per
/// dequeue with 50,000 waiting before, see `long_queue_cost`).
#[derive(Clone, Copy, Debug)]
struct Waiting {
    conversation: ConversationId,
    owner: usize,
    /// The last position sent to the visitor; 0 until one is sent.
    reported_position: usize,
    /// When it entered the queue (the event's `now_ms`; again when re-queued, and the
    /// restore time for a conversation restored as queued after a restart).
    since_ms: u64,
}

impl Waiting {
    fn new(conversation: ConversationId, owner: usize, since_ms: u64) -> Self {
        Self {
            conversation,
            owner,
            reported_position: 0,
            since_ms,
        }
    }
}

#[derive(Debug)]
struct Conversation {
    owner: usize,
    /// Order in which conversations first reached the dispatcher.
    arrival: u64,
    place: Place,
}

/// The global queue and agent directory. See the module comment.
#[derive(Debug)]
pub struct Dispatcher {
    config: DispatcherConfig,
    agents: Vec<Agent>,
    agent_index: BTreeMap<AgentId, usize>,
    conversations: HashMap<ConversationId, Conversation>,
    queue: VecDeque<Waiting>,
    next_arrival: u64,
    assignments: u64,
    /// `now_ms` of the event being handled (queue entry times come from it).
    now_ms: u64,
    /// Agents that are present (Online with a session).
    present_agents: usize,
    // Per-event bookkeeping, reset at the end of `handle`:
    /// Lowest queue index whose conversation may have moved.
    positions_dirty_from: Option<usize>,
    /// Conversations pushed into the queue during this event and still there.
    pushed_this_event: Vec<ConversationId>,
    /// A conversation that was queued before this event left the queue.
    removed_earlier: bool,
    /// Conversations that entered the queue during this event and whose
    /// visitor is told when nobody is present after it.
    entered_this_event: Vec<ConversationId>,
    /// The last present agent left during this event.
    last_agent_left: bool,
}

impl Dispatcher {
    pub fn new(config: DispatcherConfig) -> Self {
        Self {
            config,
            agents: Vec::new(),
            agent_index: BTreeMap::new(),
            conversations: HashMap::new(),
            queue: VecDeque::new(),
            next_arrival: 0,
            now_ms: 0,
            assignments: 0,
            present_agents: 0,
            positions_dirty_from: None,
            pushed_this_event: Vec::new(),
            removed_earlier: false,
            entered_this_event: Vec::new(),
            last_agent_left: false,
        }
    }

    /// Applies one event and returns what the driver must do, in order. `now_ms` is on a
    /// monotonic clock (the driver passes [`super::clock::monotonic_ms`]): grace deadlines and
    /// queue waits are durations, which a wall-clock step must not move.
    pub fn handle(&mut self, event: DispatchEvent, now_ms: u64) -> Vec<DispatchAction> {
        let mut out = Vec::new();
        self.now_ms = now_ms;
        match event {
            DispatchEvent::AgentAttached {
                agent,
                name,
                max_open,
                session,
            } => self.on_attached(agent, name, max_open, session, now_ms, &mut out),
            DispatchEvent::AgentDetached { agent, session } => {
                self.on_detached(&agent, session, now_ms)
            }
            DispatchEvent::AgentStatus { agent, status } => self.on_status(&agent, status, now_ms),
            DispatchEvent::Enqueue {
                conversation,
                owner,
            } => self.on_enqueue(conversation, owner),
            DispatchEvent::Accept {
                agent,
                session,
                conversation,
            } => self.on_accept(&agent, session, conversation, &mut out),
            DispatchEvent::Transfer {
                from,
                session,
                conversation,
                to,
                role,
            } => self.on_transfer(&from, role, session, conversation, &to, &mut out),
            DispatchEvent::Closed { conversation } => self.on_closed(conversation),
            DispatchEvent::Restore {
                conversation,
                owner,
                assigned,
            } => self.on_restore(conversation, owner, assigned, now_ms),
            DispatchEvent::Tick => self.on_tick(now_ms, &mut out),
        }
        if self.config.auto_assign {
            self.assign_waiting(&mut out);
        }
        self.report_queue_changes(&mut out);
        self.report_no_agents(&mut out);
        out
    }

    // Read-only views.

    /// Number of waiting conversations.
    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// Waiting conversations, head first.
    pub fn queue(&self) -> impl Iterator<Item = ConversationId> + '_ {
        self.queue.iter().map(|w| w.conversation)
    }

    /// How long each waiting conversation has waited at the current event, in ms, head first.
    pub fn queue_waits(&self) -> impl Iterator<Item = u64> + '_ {
        self.queue
            .iter()
            .map(|w| self.now_ms.saturating_sub(w.since_ms))
    }

    pub fn is_queued(&self, conversation: ConversationId) -> bool {
        matches!(
            self.conversations.get(&conversation).map(|c| c.place),
            Some(Place::Queued)
        )
    }

    /// 1-based queue position. O(queue).
    pub fn position(&self, conversation: ConversationId) -> Option<usize> {
        if !self.is_queued(conversation) {
            return None;
        }
        let index = self
            .queue
            .iter()
            .position(|w| w.conversation == conversation)?;
        Some(index + 1)
    }

    pub fn assigned_to(&self, conversation: ConversationId) -> Option<&AgentId> {
        match self.conversations.get(&conversation)?.place {
            Place::Assigned { agent } => Some(&self.agents[agent].id),
            Place::Queued => None,
        }
    }

    /// Number of open conversations of the agent (0 if unknown).
    pub fn agent_open(&self, agent: &str) -> usize {
        self.agent_conversations(agent).len()
    }

    /// Open conversations of the agent, in the order they were given to it.
    pub fn agent_conversations(&self, agent: &str) -> &[ConversationId] {
        match self.agent_index.get(agent) {
            Some(&idx) => &self.agents[idx].open,
            None => &[],
        }
    }

    /// Online with at least one attached session.
    pub fn agent_present(&self, agent: &str) -> bool {
        self.agent_index
            .get(agent)
            .is_some_and(|&idx| self.agents[idx].present())
    }

    /// Every agent the dispatcher knows, in id order.
    pub fn agents(&self) -> impl Iterator<Item = &AgentId> + '_ {
        self.agent_index.keys()
    }

    /// Whether any agent is present (Online with a session).
    pub fn anyone_present(&self) -> bool {
        self.present_agents > 0
    }

    /// Queued plus assigned conversations.
    pub fn tracked_len(&self) -> usize {
        self.conversations.len()
    }

    // Event handlers.
}

impl Dispatcher {}
