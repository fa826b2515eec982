//! The invariants the simulation checks, after every step and at quiescence. A violation
//! panics with the seed, the step and the command that replays the seed.
//!
//! After every step (or as the frame concerned arrives):
//! - Storage: in every conversation a commit touched, the stored seqs are exactly
//!   `1..=last_seq` (dense), no client id is stored twice, and what was stored before is
//!   still there unchanged (also right after a crash and reopen: nothing committed is lost);
//!   read watermarks never pass `last_seq` and never go down.
//! - Identity: a connection claiming a visitor id without its secret is given that id only
//!   when nothing (secret, open conversation) is stored under it, and never hears of any
//!   conversation (it sends nothing, so every frame naming a conversation is a leak).
//! - Acks: an ack names a stored record carrying that client id at that seq; an id acked
//!   again in the same conversation (a re-send) gets the same seq.
//! - Delivery: a `message` frame is a stored record (same text); on one connection each seq
//!   of a conversation arrives at most once and in increasing order (for an agent
//!   connection: between two `assigned` frames, which each replay the history); a visitor
//!   connection greeted with `seq` L after `resume` S never gets a seq <= min(S, L).
//! - Dispatcher: a conversation is queued at most once, never both queued and assigned,
//!   and assigned to at most one agent (`assigned_to` agrees with the agents' lists); the
//!   queue is FIFO: conversations that stay queued across an event keep their relative
//!   order, and automatic assignment (any event but `Accept`/`Transfer`) only takes
//!   conversations from the head (everything ahead of an auto-assigned one left the queue).
//!
//! At quiescence (no fault, every client connected and its unacked messages re-sent, every
//! channel, commit queue and bot question drained):
//! - Resume is complete: a visitor connection greeted at L after `resume` S has received
//!   every stored seq in `(min(S, L), last_seq]` of its conversation, as a `message` or as
//!   the ack of its own message.
//! - Nothing is left unacked by a visitor connected to a conversation, unless one of its
//!   connections was refused something (an `error` frame, e.g. a re-send into a conversation
//!   closed meanwhile).

use std::collections::{BTreeMap, BTreeSet};

use super::world::{ClientRef, World};
use crate::conversation::dispatch::{self, DispatchAction, Dispatcher};
use crate::store::ConversationId;

/// What one connection has been told, for the delivery invariants.
#[derive(Debug, Default)]
pub struct ConnectionView {
    pub agent: bool,
    /// The `resume` the visitor connection presented.
    pub resume: Option<u64>,
    pub hellos: u32,
    /// Conversation of the latest visitor `hello`, and the seq after which it is owed
    /// every message.
    pub conversation: Option<u64>,
    pub from: u64,
    /// Message seqs received, per conversation.
    pub messages: BTreeMap<u64, BTreeSet<u64>>,
    /// Seqs acked on this connection, per conversation.
    pub acks: BTreeMap<u64, BTreeSet<u64>>,
    pub errors: u32,
}

impl ConnectionView {
    pub fn hello(&mut self, conversation: Option<u64>, seq: u64) {
        let first = self.hellos == 0;
        self.hellos += 1;
        self.conversation = conversation;
        self.from = match self.resume {
            Some(resume) if first => resume.min(seq),
            _ => seq,
        };
    }

    /// An agent connection is (re)assigned a conversation: its history is replayed anew.
    pub fn agent_assigned(&mut self, conversation: u64) {
        self.messages.remove(&conversation);
    }
}

/// A stored message as the checker remembers it: its client id and text.
type StoredMessage = (Option<String>, String);

/// The seed's bookkeeping of what storage must keep.
pub struct Checker {
    seed: u64,
    /// Per conversation: the client id and text of each stored seq (index seq - 1).
    stored: BTreeMap<u64, Vec<StoredMessage>>,
    /// Per conversation: the stored read watermarks (visitor, agent).
    watermarks: BTreeMap<u64, (u64, u64)>,
}

impl Checker {
    pub fn new(seed: u64) -> Checker {
        Checker {
            seed,
            stored: BTreeMap::new(),
            watermarks: BTreeMap::new(),
        }
    }

    /// Everything stored in the run, as (conversation, [(client id, text)]).
    pub fn stored(&self) -> &BTreeMap<u64, Vec<StoredMessage>> {
        &self.stored
    }

    pub fn fail(&self, step: usize, what: &str) -> ! {
        panic!(
            "simulation invariant violated (seed {seed}, step {step}): {what}\n\
             replay with: SIMULATION_SEED={seed} cargo test --lib simulation_replays_one_seed -- --nocapture",
            seed = self.seed
        )
    }
}

/// Storage invariants for one conversation after a commit (or a reopen).
pub fn check_stored(world: &mut World, shard: usize, conversation: ConversationId) {
    let known_marks = world.checker.watermarks.get(&conversation.0).copied();
    let result = (|| -> Result<(Vec<StoredMessage>, (u64, u64)), String> {
        let view = world.store(shard).read().map_err(|e| e.to_string())?;
        let Some(meta) = view.conversation(conversation).map_err(|e| e.to_string())? else {
            return Ok((Vec::new(), (0, 0)));
        };
        let marks = (meta.visitor_read, meta.agent_read);
        if marks.0 > meta.last_seq || marks.1 > meta.last_seq {
            return Err(format!(
                "conversation {}: read watermarks {marks:?} above last_seq {}",
                conversation.0, meta.last_seq
            ));
        }
        if let Some(known) = known_marks {
            if marks.0 < known.0 || marks.1 < known.1 {
                return Err(format!(
                    "conversation {}: read watermarks went down from {known:?} to {marks:?}",
                    conversation.0
                ));
            }
        }
        let mut records = Vec::new();
        let mut ids = BTreeSet::new();
        for (expected, record) in (1u64..).zip(
            view.messages_after(conversation, 0, usize::MAX)
                .map_err(|e| e.to_string())?,
        ) {
            let record = record.map_err(|e| e.to_string())?;
            if record.seq() != expected {
                return Err(format!(
                    "conversation {}: seq {} stored where {expected} was due (seqs not dense)",
                    conversation.0,
                    record.seq()
                ));
            }
            if let Some(id) = record.client_id() {
                if !ids.insert(id.to_string()) {
                    return Err(format!(
                        "conversation {}: client id {id} stored twice (again at seq {})",
                        conversation.0,
                        record.seq()
                    ));
                }
            }
            records.push((
                record.client_id().map(str::to_string),
                record.text().to_string(),
            ));
        }
        if records.len() as u64 != meta.last_seq {
            return Err(format!(
                "conversation {}: last_seq {} but {} messages stored",
                conversation.0,
                meta.last_seq,
                records.len()
            ));
        }
        Ok((records, marks))
    })();
    let (records, marks) = match result {
        Ok(found) => found,
        Err(what) => world.fail(&what),
    };
    world.checker.watermarks.insert(conversation.0, marks);
    let known = world
        .checker
        .stored
        .get(&conversation.0)
        .cloned()
        .unwrap_or_default();
    if records.len() < known.len() || records[..known.len()] != known[..] {
        world.fail(&format!(
            "conversation {}: committed messages changed or vanished ({} known, {} stored now)",
            conversation.0,
            known.len(),
            records.len()
        ));
    }
    world.checker.stored.insert(conversation.0, records);
}

/// After shard `shard` restarted: everything it had committed is still there.
pub fn check_survived_crash(world: &mut World, shard: usize) {
    let conversations: Vec<u64> = world
        .checker
        .stored
        .keys()
        .copied()
        .filter(|c| ConversationId(*c).shard() == shard)
        .collect();
    for conversation in conversations {
        check_stored(world, shard, ConversationId(conversation));
    }
}

/// The stored record `(conversation, seq)`: its client id and text.
fn stored_record(world: &World, conversation: u64, seq: u64) -> Option<StoredMessage> {
    let id = ConversationId(conversation);
    if id.shard() >= world.shards.len() {
        return None;
    }
    let view = world.store(id.shard()).read().ok()?;
    let record = view.message(id, seq).ok()??;
    Some((
        record.client_id().map(str::to_string),
        record.text().to_string(),
    ))
}

/// An ack of `id` with `(conversation, seq)` reached session `session`.
pub fn check_ack(
    world: &mut World,
    session: u64,
    id: &str,
    conversation: u64,
    seq: u64,
    agent: bool,
) {
    match stored_record(world, conversation, seq) {
        Some((Some(stored), _)) if stored == id => {}
        other => world.fail(&format!(
            "ack of {id} names conversation {conversation} seq {seq}, which holds {other:?}"
        )),
    }
    let earlier = match world.sessions.get(&session).map(|s| s.client) {
        Some(ClientRef::Visitor(v)) if !agent => world.visitors[v].acked.get(id).copied(),
        Some(ClientRef::Agent(a)) if agent => world.agents[a].acked.get(id).copied(),
        _ => None,
    };
    world.stats.acks += 1;
    if earlier.is_some() {
        world.stats.duplicate_acks += 1;
    }
    if let Some((was_conversation, was_seq)) = earlier {
        if was_conversation == conversation && was_seq != seq {
            world.fail(&format!(
                "{id} acked with seq {was_seq} and later with seq {seq} in conversation {conversation}"
            ));
        }
    }
    if let Some(record) = world.sessions.get_mut(&session) {
        record
            .view
            .acks
            .entry(conversation)
            .or_default()
            .insert(seq);
    }
}

/// A `message` frame `(conversation, seq)` reached session `session`.
pub fn check_message(
    world: &mut World,
    session: u64,
    conversation: u64,
    seq: u64,
    frame: &serde_json::Value,
) {
    match stored_record(world, conversation, seq) {
        Some((_, text)) if frame["text"].as_str() == Some(text.as_str()) => {}
        other => world.fail(&format!(
            "message frame {frame} does not match the stored record {other:?}"
        )),
    }
    world.stats.messages_delivered += 1;
    let Some(record) = world.sessions.get_mut(&session) else {
        return;
    };
    let view = &mut record.view;
    if !view.agent && view.conversation == Some(conversation) && seq <= view.from {
        let what = format!(
            "session {session} (resume {:?}) was sent seq {seq} of conversation {conversation}, \
             at or below {} where its hello said it starts",
            view.resume, view.from
        );
        world.fail(&what);
    }
    let seen = view.messages.entry(conversation).or_default();
    let last = seen.last().copied().unwrap_or(0);
    if !seen.insert(seq) {
        let what = format!("session {session} got seq {seq} of conversation {conversation} twice");
        world.fail(&what);
    }
    if seq < last {
        let what = format!(
            "session {session} got seq {seq} of conversation {conversation} after seq {last}"
        );
        world.fail(&what);
    }
}

/// The dispatcher's structural invariants.
pub fn check_dispatcher(dispatcher: &Dispatcher) -> Result<(), String> {
    let mut queued = BTreeSet::new();
    for conversation in dispatcher.queue() {
        if !queued.insert(conversation) {
            return Err(format!("{conversation:?} is queued twice"));
        }
        if !dispatcher.is_queued(conversation) {
            return Err(format!(
                "{conversation:?} in the queue but not marked queued"
            ));
        }
        if let Some(agent) = dispatcher.assigned_to(conversation) {
            return Err(format!(
                "{conversation:?} is queued and assigned to {agent}"
            ));
        }
    }
    let mut holders: BTreeMap<dispatch::ConversationId, String> = BTreeMap::new();
    for agent in dispatcher.agents() {
        for conversation in dispatcher.agent_conversations(agent) {
            if let Some(other) = holders.insert(*conversation, agent.clone()) {
                return Err(format!(
                    "{conversation:?} assigned to two agents: {other} and {agent}"
                ));
            }
            if queued.contains(conversation) {
                return Err(format!("{conversation:?} assigned to {agent} and queued"));
            }
            if dispatcher.assigned_to(*conversation) != Some(agent) {
                return Err(format!(
                    "{conversation:?} in {agent}'s list but assigned_to says {:?}",
                    dispatcher.assigned_to(*conversation)
                ));
            }
        }
    }
    Ok(())
}

/// FIFO: the queue before and after one dispatcher event.
pub fn check_queue_fifo(
    before: &[dispatch::ConversationId],
    after: &[dispatch::ConversationId],
    actions: &[DispatchAction],
    manual: bool,
) -> Result<(), String> {
    let after_set: BTreeSet<_> = after.iter().copied().collect();
    let before_set: BTreeSet<_> = before.iter().copied().collect();
    let kept_before: Vec<_> = before.iter().filter(|c| after_set.contains(c)).collect();
    let kept_after: Vec<_> = after.iter().filter(|c| before_set.contains(c)).collect();
    if kept_before != kept_after {
        return Err(format!("queue order changed: {before:?} became {after:?}"));
    }
    if manual {
        return Ok(());
    }
    for action in actions {
        if let DispatchAction::Assigned { conversation, .. } = action {
            if let Some(at) = before.iter().position(|c| c == conversation) {
                if let Some(skipped) = before[..at].iter().find(|c| after_set.contains(c)) {
                    return Err(format!(
                        "{conversation:?} was assigned ahead of {skipped:?} (queue {before:?})"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// What must hold once everything has settled (see the module comment).
pub fn check_quiescent(world: &mut World) {
    let mut failures = Vec::new();
    let mut checked = 0;
    for (id, session) in &world.sessions {
        let view = &session.view;
        if view.agent {
            continue;
        }
        let Some(conversation) = view.conversation else {
            continue;
        };
        let last = world
            .checker
            .stored
            .get(&conversation)
            .map_or(0, |records| records.len() as u64);
        let got = |seq: &u64| {
            view.messages
                .get(&conversation)
                .is_some_and(|s| s.contains(seq))
                || view
                    .acks
                    .get(&conversation)
                    .is_some_and(|s| s.contains(seq))
        };
        checked += (last.saturating_sub(view.from)) as usize;
        let missing: Vec<u64> = (view.from + 1..=last).filter(|s| !got(s)).collect();
        if !missing.is_empty() {
            failures.push(format!(
                "session {id} (resume {:?}, greeted at {}) of conversation {conversation} \
                 never got seqs {missing:?} (last stored {last})",
                view.resume, view.from
            ));
        }
    }
    for visitor in &world.visitors {
        let greeted = visitor.tabs.iter().any(|t| {
            world
                .sessions
                .get(t)
                .is_some_and(|s| s.view.conversation.is_some())
        });
        let refused = visitor
            .tabs
            .iter()
            .any(|t| world.sessions.get(t).is_some_and(|s| s.view.errors > 0));
        if greeted && !refused && !visitor.unacked.is_empty() {
            failures.push(format!(
                "visitor {} still has unacked messages {:?} at quiescence",
                visitor.name, visitor.unacked
            ));
        }
    }
    world.stats.checked_at_rest += checked;
    if let Some(first) = failures.first() {
        let what = format!("at quiescence: {first} ({} failures)", failures.len());
        world.fail(&what);
    }
}
