//! The simulated process: N shards, each with its [`Owner`], the [`Dispatcher`] on the
//! dispatcher shard, a real [`ShardStore`] on a temporary directory, a group-commit queue
//! and the mesh channels between shards; and the seeded scheduler that picks what happens
//! next.
//!
//! Actions are executed with the semantics of `router.rs`, single-threaded:
//! - `Store` ops queue per shard; a commit step (when, is the seed's choice) applies what
//!   is pending, at most `max_batch`, in ONE `ShardStore::apply` and feeds every outcome
//!   back as `Committed`, in order, before anything else runs (as `commit_loop` does). A
//!   commit step may instead fail the whole batch with `storage_error` (nothing stored).
//! - `Load`, `LoadVisitor` and `Replay` read the store synchronously and continue the same
//!   action queue (as `run_owner` does).
//! - Everything for another shard, and an owner's message to itself, goes through a FIFO
//!   channel per (from, to) pair. The scheduler delivers the head of a channel of its choice:
//!   order is kept within a channel and varies across channels, as in the real mesh. A frame
//!   for a session on the same shard is pushed directly (the arena), else it is a `Deliver`
//!   message on the channel to the session's shard.
//! - A session holds frames back until its `hello`, like `Arena::push_hello`.
//! - Bot questions become tasks the scheduler answers later (reply, handoff or silence).
//!
//! A crash of shard k drops everything k held in memory (owner, dispatcher, pending ops,
//! bot tasks, the channels from and to k), closes the sessions living on k (their owners are
//! told, as a supervisor restarting the shard would) and the sessions whose state was on k
//! (visitors owned by k; agents following a conversation of k; every agent if k runs the
//! dispatcher), then reopens k's store and restarts k as `Router::start` does: `Restore` of
//! its open conversations to the dispatcher (from every shard when k is the dispatcher,
//! whose directory is rebuilt the way a process restart rebuilds it).
//!
//! Invariant of this driver: it is deterministic for a seed. Every choice comes from the
//! seeded `StdRng`; maps are ordered (`BTreeMap`) or indexed; the stored timestamps (wall
//! clock) never steer a choice.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::clients::{AgentClient, VisitorClient};
use super::invariants::{self, Checker};
use crate::arena::SessionId;
use crate::auth::rbac::Role;
use crate::conversation::dispatch::{
    self, DispatchAction, DispatchEvent, Dispatcher, DispatcherConfig,
};
use crate::conversation::owner::{
    message_frame, BotOutcome, CommitFailure, Completion, Credentials, FreshVisitor, Owner,
    OwnerAction, OwnerConfig, OwnerEvent, VisitorKey,
};
use crate::conversation::protocol::{AgentFrame, Presence, VisitorFrame};
use crate::conversation::router::{
    look_up_visitor, route_dispatch, Delivery, Routed, ShardMessage,
};
use crate::conversation::{dispatcher_shard, visitor_owner, SessionRef};
use crate::store::{ConversationId, ConversationState, Durability, Op, ShardStore, StoreOptions};

pub const SITE: &str = "sim";
const TYPING_INTERVAL_MS: u64 = 100;
const TYPING_EXPIRY_MS: u64 = 300;
const AGENT_GRACE_MS: u64 = 400;
/// A seed's run has a few hundred messages at most; settling them takes far fewer steps.
const QUIESCENCE_STEPS: usize = 20_000;

/// The shape of one simulated run, drawn from the seed.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub shards: usize,
    pub visitors: usize,
    pub agents: usize,
    pub steps: usize,
    pub bot: bool,
    pub auto_assign: bool,
    pub max_batch: usize,
}

impl SimConfig {
    pub fn draw(rng: &mut StdRng) -> SimConfig {
        SimConfig {
            shards: rng.gen_range(1..=3),
            visitors: rng.gen_range(1..=4),
            agents: rng.gen_range(1..=2),
            steps: rng.gen_range(150..=400),
            bot: rng.gen_bool(0.5),
            auto_assign: rng.gen_bool(0.7),
            max_batch: rng.gen_range(1..=8),
        }
    }
}

/// Who a session belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRef {
    Visitor(usize),
    Agent(usize),
    /// A connection claiming another visitor's id without its secret.
    Intruder,
}

/// One connection, as the shard's arena and the client see it.
#[derive(Debug)]
pub struct Session {
    pub shard: usize,
    pub client: ClientRef,
    /// Frames arriving before the `hello` wait here (`Arena::push_hello`).
    awaiting_hello: bool,
    held: Vec<Arc<str>>,
    /// Conversations an agent session follows (`ShardMessage::Track`).
    follows: Vec<ConversationId>,
    /// The visitor key a visitor or intruder connection claimed.
    claimed: Option<VisitorKey>,
    /// What the invariants track for this connection.
    pub view: invariants::ConnectionView,
}

pub struct Shard {
    owner: Owner,
    dispatcher: Option<Dispatcher>,
    store: Option<ShardStore>,
    pending: Vec<(Op, Completion)>,
}

struct BotTask {
    shard: usize,
    conversation: ConversationId,
}

pub struct World {
    pub seed: u64,
    pub config: SimConfig,
    pub rng: StdRng,
    pub now: u64,
    pub step: usize,
    dir: tempfile::TempDir,
    pub shards: Vec<Shard>,
    /// `channels[from * n + to]`.
    channels: Vec<VecDeque<ShardMessage>>,
    pub sessions: BTreeMap<u64, Session>,
    next_session: u64,
    pub visitors: Vec<VisitorClient>,
    pub agents: Vec<AgentClient>,
    bots: Vec<BotTask>,
    pub checker: Checker,
    pub verbose: bool,
    /// Faults (drops, crashes, failed commits) are injected only while this is set.
    pub faults: bool,
    pub stats: Stats,
}

/// What a run exercised (summed over seeds by the many-seeds test).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub crashes: usize,
    pub failed_commits: usize,
    pub dropped_connections: usize,
    pub acks: usize,
    pub duplicate_acks: usize,
    pub messages_delivered: usize,
    pub replayed: usize,
    pub resumes_with_replay: usize,
    pub assignments: usize,
    pub checked_at_rest: usize,
    pub intruders_refused: usize,
}

impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, o: Stats) {
        self.crashes += o.crashes;
        self.failed_commits += o.failed_commits;
        self.dropped_connections += o.dropped_connections;
        self.acks += o.acks;
        self.duplicate_acks += o.duplicate_acks;
        self.messages_delivered += o.messages_delivered;
        self.replayed += o.replayed;
        self.resumes_with_replay += o.resumes_with_replay;
        self.assignments += o.assignments;
        self.checked_at_rest += o.checked_at_rest;
        self.intruders_refused += o.intruders_refused;
    }
}

fn store_options() -> StoreOptions {
    StoreOptions {
        map_size: 8 << 20,
        max_map_size: 64 << 20,
        durability: Durability::None,
        log_bytes: 0,
        apply_interval: std::time::Duration::ZERO,
    }
}

impl World {
    pub fn new(seed: u64, verbose: bool) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let config = SimConfig::draw(&mut rng);
        let dir = tempfile::tempdir().expect("temp dir");
        let n = config.shards;
        let mut world = World {
            seed,
            rng,
            now: 1_000,
            step: 0,
            shards: Vec::new(),
            channels: (0..n * n).map(|_| VecDeque::new()).collect(),
            sessions: BTreeMap::new(),
            next_session: 1,
            visitors: (0..config.visitors).map(VisitorClient::new).collect(),
            agents: (0..config.agents).map(AgentClient::new).collect(),
            bots: Vec::new(),
            checker: Checker::new(seed),
            verbose,
            faults: true,
            stats: Stats::default(),
            config,
            dir,
        };
        for shard in 0..n {
            let fresh = world.fresh_shard(shard);
            world.shards.push(fresh);
        }
        world.trace(format_args!("config {:?}", world.config));
        world
    }

    fn fresh_shard(&self, shard: usize) -> Shard {
        let store = ShardStore::open(self.dir.path(), shard, store_options()).expect("open store");
        Shard {
            owner: Owner::new(OwnerConfig {
                shard,
                bot_enabled: self.config.bot,
                typing_interval_ms: TYPING_INTERVAL_MS,
                typing_expiry_ms: TYPING_EXPIRY_MS,
                agent_names: Default::default(),
                // Small, so that the refusal past the bound (`overloaded`) happens in runs.
                max_opening_frames: 3,
            }),
            dispatcher: (dispatcher_shard(self.config.shards) == shard).then(|| {
                Dispatcher::new(DispatcherConfig {
                    agent_grace_ms: AGENT_GRACE_MS,
                    auto_assign: self.config.auto_assign,
                })
            }),
            store: Some(store),
            pending: Vec::new(),
        }
    }

    pub fn trace(&self, what: std::fmt::Arguments<'_>) {
        if self.verbose {
            eprintln!(
                "[seed {} step {} t={}] {what}",
                self.seed, self.step, self.now
            );
        }
    }

    /// Fails the run: the seed, the step and how to replay it.
    pub fn fail(&self, what: &str) -> ! {
        self.checker.fail(self.step, what)
    }

    pub fn store(&self, shard: usize) -> &ShardStore {
        self.shards[shard].store.as_ref().expect("store open")
    }

    fn n(&self) -> usize {
        self.config.shards
    }

    // ----- the scheduler -----

    /// Runs the seed's steps, then heals and checks the quiescent state.
    pub fn run(&mut self) {
        for _ in 0..self.config.steps {
            self.step += 1;
            self.random_step();
            self.check_all();
        }
        self.heal();
    }

    fn random_step(&mut self) {
        self.now += self.rng.gen_range(0..30);
        let roll = self.rng.gen_range(0..1000);
        match roll {
            0..=419 => {
                if !self.deliver_one() {
                    self.client_step();
                }
            }
            420..=569 => {
                let shard = self.rng.gen_range(0..self.n());
                self.commit(shard);
            }
            570..=839 => self.client_step(),
            840..=879 => {
                let shard = self.rng.gen_range(0..self.n());
                self.tick(shard);
            }
            880..=939 => self.answer_bot(),
            940..=949 => {
                let shard = self.rng.gen_range(0..self.n());
                self.expire_empty(shard);
            }
            950..=989 => {
                if self.faults {
                    self.drop_random_connection();
                }
            }
            _ => {
                if self.faults && self.rng.gen_bool(0.3) {
                    let shard = self.rng.gen_range(0..self.n());
                    self.crash(shard);
                }
            }
        }
    }

    /// Stops injecting faults, reconnects every client, lets them re-send what is unacked,
    /// and runs everything to quiescence; then checks what must hold at rest.
    fn heal(&mut self) {
        self.faults = false;
        self.trace(format_args!("heal"));
        self.quiesce();
        for visitor in 0..self.visitors.len() {
            if self.visitors[visitor].tabs.is_empty() {
                self.connect_visitor(visitor);
            }
        }
        for agent in 0..self.agents.len() {
            if self.agents[agent].session.is_none() {
                self.connect_agent(agent);
            }
        }
        self.quiesce();
        // A second round: frames answered by resends of the first.
        for visitor in 0..self.visitors.len() {
            self.resend_unacked(visitor);
        }
        self.quiesce();
        invariants::check_quiescent(self);
    }

    /// Runs deliveries, commits and bot answers until none is left. A run that does not
    /// settle within `QUIESCENCE_STEPS` is a livelock (a loop of commits or messages).
    fn quiesce(&mut self) {
        for _ in 0..QUIESCENCE_STEPS {
            self.step += 1;
            if self.deliver_one() {
                self.check_all();
                continue;
            }
            if let Some(shard) = (0..self.n()).find(|s| !self.shards[*s].pending.is_empty()) {
                self.commit(shard);
                self.check_all();
                continue;
            }
            if !self.bots.is_empty() {
                self.answer_bot();
                self.check_all();
                continue;
            }
            return;
        }
        self.fail(&format!(
            "no quiescence after {QUIESCENCE_STEPS} steps (a livelock?): {}",
            self.describe_state()
        ));
    }

    fn check_all(&mut self) {
        for shard in 0..self.n() {
            if let Some(dispatcher) = &self.shards[shard].dispatcher {
                if let Err(what) = invariants::check_dispatcher(dispatcher) {
                    self.fail(&what);
                }
            }
        }
    }

    // ----- the mesh -----

    fn send(&mut self, from: usize, to: usize, message: ShardMessage) {
        let n = self.n();
        self.channels[from * n + to].push_back(message);
    }

    /// Delivers the head of a random non-empty channel; false when all are empty.
    fn deliver_one(&mut self) -> bool {
        let busy: Vec<usize> = (0..self.channels.len())
            .filter(|c| !self.channels[*c].is_empty())
            .collect();
        if busy.is_empty() {
            return false;
        }
        let channel = busy[self.rng.gen_range(0..busy.len())];
        let message = self.channels[channel].pop_front().expect("non-empty");
        let to = channel % self.n();
        self.trace(format_args!(
            "deliver {} -> {to}: {}",
            channel / self.n(),
            describe(&message)
        ));
        self.on_mesh(to, message);
        true
    }

    fn on_mesh(&mut self, shard: usize, message: ShardMessage) {
        match message {
            ShardMessage::Owner(event) => self.on_owner(shard, event),
            ShardMessage::Dispatch(event) => self.on_dispatch(shard, event),
            ShardMessage::Deliver {
                session,
                frame,
                kind,
            } => self.push(session.to_u64(), frame, kind),
            ShardMessage::Track {
                session,
                conversation,
            } => {
                if let Some(record) = self.sessions.get_mut(&session.to_u64()) {
                    if !record.follows.contains(&conversation) {
                        record.follows.push(conversation);
                    }
                }
            }
            ShardMessage::Batch(messages) => {
                for message in messages {
                    self.on_mesh(shard, message);
                }
            }
            // The simulation has no admin API and injects no faults.
            ShardMessage::Query(_)
            | ShardMessage::InjectPanic
            | ShardMessage::InjectStall { .. } => {}
        }
    }

    // ----- executing the owner's actions (router::run_owner) -----

    pub fn on_owner(&mut self, shard: usize, event: OwnerEvent) {
        let now = self.now;
        let actions = self.shards[shard].owner.handle(event, now);
        self.run_owner(shard, actions);
    }

    fn run_owner(&mut self, shard: usize, actions: Vec<OwnerAction>) {
        let mut queue: VecDeque<OwnerAction> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                OwnerAction::Store { op, completion } => {
                    self.shards[shard].pending.push((op, completion))
                }
                OwnerAction::Send { to, frame } => self.deliver(shard, to, frame, Delivery::Live),
                OwnerAction::Hello { to, frame } => self.deliver(shard, to, frame, Delivery::Hello),
                OwnerAction::Bot { conversation, .. } => {
                    self.bots.push(BotTask {
                        shard,
                        conversation,
                    });
                }
                OwnerAction::Audit(_) => {}
                OwnerAction::Replay {
                    to,
                    conversation,
                    after,
                    up_to,
                } => self.replay(shard, &to, conversation, after, up_to),
                OwnerAction::Dispatch(event) => {
                    let to = dispatcher_shard(self.n());
                    self.send(shard, to, ShardMessage::Dispatch(event));
                }
                OwnerAction::Track {
                    session,
                    conversation,
                } => {
                    let message = ShardMessage::Track {
                        session: session.session,
                        conversation,
                    };
                    if session.shard == shard {
                        self.on_mesh(shard, message);
                    } else {
                        self.send(shard, session.shard, message);
                    }
                }
                OwnerAction::Load {
                    conversation,
                    event,
                } => {
                    let loaded = self
                        .store(shard)
                        .read()
                        .and_then(|v| v.conversation(conversation));
                    match loaded {
                        Ok(Some(meta)) => {
                            self.shards[shard].owner.insert_loaded(meta);
                            let now = self.now;
                            queue.extend(self.shards[shard].owner.handle(*event, now));
                        }
                        Ok(None) => {
                            if let OwnerEvent::Agent { session, .. } = *event {
                                let frame = crate::conversation::protocol::error_frame(
                                    "unknown_conversation",
                                    "no such conversation",
                                );
                                self.deliver(shard, session, Arc::from(frame), Delivery::Live);
                            }
                        }
                        Err(err) => self.fail(&format!("load failed: {err}")),
                    }
                }
                OwnerAction::LoadVisitor { key, event } => {
                    let stored = self
                        .store(shard)
                        .read()
                        .and_then(|view| look_up_visitor(&view, &key));
                    let mut event = *event;
                    match (stored, &mut event) {
                        (Ok(found), OwnerEvent::VisitorAttach { stored, .. }) => {
                            *stored = Some(Box::new(found));
                            let now = self.now;
                            queue.extend(self.shards[shard].owner.handle(event, now));
                        }
                        (Err(err), _) => self.fail(&format!("visitor lookup failed: {err}")),
                        _ => {}
                    }
                }
            }
        }
    }

    fn deliver(&mut self, from: usize, to: SessionRef, frame: Arc<str>, kind: Delivery) {
        if to.shard == from {
            self.push(to.session.to_u64(), frame, kind);
        } else {
            self.send(
                from,
                to.shard,
                ShardMessage::Deliver {
                    session: to.session,
                    frame,
                    kind,
                },
            );
        }
    }

    fn replay(
        &mut self,
        shard: usize,
        to: &[SessionRef],
        conversation: ConversationId,
        after: u64,
        up_to: u64,
    ) {
        let frames: Vec<Arc<str>> = {
            let view = self.store(shard).read().expect("read");
            let limit = up_to.saturating_sub(after) as usize;
            let mut frames = Vec::new();
            for record in view
                .messages_after(conversation, after, limit)
                .expect("replay")
            {
                let record = record.expect("record");
                if record.seq() > up_to {
                    break;
                }
                frames.push(Arc::from(message_frame(
                    conversation,
                    record.seq(),
                    record.from(),
                    record.name(),
                    record.text(),
                    record.ts_ms(),
                )));
            }
            frames
        };
        self.stats.replayed += frames.len() * to.len();
        for session in to {
            for frame in &frames {
                self.deliver(shard, *session, frame.clone(), Delivery::Replay);
            }
        }
    }

    // ----- the dispatcher (router::on_mesh + run_dispatch) -----

    fn on_dispatch(&mut self, shard: usize, event: DispatchEvent) {
        let now = self.now;
        let attaching = match &event {
            DispatchEvent::AgentAttached { agent, name, .. } => Some((agent.clone(), name.clone())),
            _ => None,
        };
        let Some(dispatcher) = self.shards[shard].dispatcher.as_mut() else {
            self.fail("dispatch event sent to a shard that is not the dispatcher");
        };
        let before: Vec<dispatch::ConversationId> = dispatcher.queue().collect();
        let manual = matches!(
            event,
            DispatchEvent::Accept { .. } | DispatchEvent::Transfer { .. }
        );
        let actions = dispatcher.handle(event, now);
        let after: Vec<dispatch::ConversationId> = dispatcher.queue().collect();
        if let Err(what) = invariants::check_queue_fifo(&before, &after, &actions, manual) {
            self.fail(&what);
        }
        self.run_dispatch(shard, actions, attaching);
    }

    /// Carries out dispatcher actions with the router's own routing ([`route_dispatch`]).
    fn run_dispatch(
        &mut self,
        shard: usize,
        actions: Vec<DispatchAction>,
        attaching: Option<(String, String)>,
    ) {
        self.stats.assignments += actions
            .iter()
            .filter(|action| matches!(action, DispatchAction::Assigned { .. }))
            .count();
        for routed in route_dispatch(actions, attaching) {
            match routed {
                Routed::Owner { shard: to, event } => {
                    self.send(shard, to, ShardMessage::Owner(event))
                }
                Routed::Frame { to, frame, kind } => self.deliver(shard, to, frame, kind),
            }
        }
    }

    // ----- storage -----

    /// A group commit on `shard`: a prefix of its pending ops in one transaction.
    fn commit(&mut self, shard: usize) {
        let pending = self.shards[shard].pending.len();
        if pending == 0 {
            return;
        }
        // As `commit_loop`: everything pending when the commit starts, up to `max_batch`
        // (ops queued by one event are never split unless the batch is full).
        let take = pending.min(self.config.max_batch);
        let batch: Vec<(Op, Completion)> = self.shards[shard].pending.drain(..take).collect();
        let (ops, completions): (Vec<Op>, Vec<Completion>) = batch.into_iter().unzip();
        if self.faults && self.rng.gen_range(0..100) < 3 {
            self.trace(format_args!(
                "commit on {shard}: {take} ops FAIL (injected)"
            ));
            self.stats.failed_commits += 1;
            let failure = CommitFailure {
                code: "storage_error",
                message: "injected".into(),
            };
            for (op, completion) in ops.into_iter().zip(completions) {
                self.on_owner(
                    shard,
                    OwnerEvent::Committed {
                        completion,
                        op,
                        outcome: Err(failure.clone()),
                    },
                );
            }
            return;
        }
        let outcomes = match self.shards[shard]
            .store
            .as_mut()
            .expect("store")
            .apply(&ops)
        {
            Ok(outcomes) => outcomes,
            Err(err) => self.fail(&format!("commit failed: {err}")),
        };
        self.trace(format_args!(
            "commit on {shard}: {take} ops {ops:?} -> {outcomes:?}"
        ));
        let touched: BTreeSet<ConversationId> = ops
            .iter()
            .zip(&outcomes)
            .filter_map(|(op, outcome)| match (op, outcome) {
                (_, crate::store::OpOutcome::Opened { conversation, .. }) => Some(*conversation),
                (Op::Append(m), _) => Some(m.conversation),
                (Op::SetState { conversation, .. }, _)
                | (Op::DeleteEmpty { conversation }, _)
                | (Op::MarkRead { conversation, .. }, _)
                | (Op::SetFailedBotTurns { conversation, .. }, _)
                | (Op::SetVariant { conversation, .. }, _) => Some(*conversation),
                _ => None,
            })
            .collect();
        for conversation in touched {
            invariants::check_stored(self, shard, conversation);
        }
        for ((op, completion), outcome) in ops.into_iter().zip(completions).zip(outcomes) {
            self.on_owner(
                shard,
                OwnerEvent::Committed {
                    completion,
                    op,
                    outcome: Ok(outcome),
                },
            );
        }
    }

    fn tick(&mut self, shard: usize) {
        self.trace(format_args!("tick {shard}"));
        self.on_owner(shard, OwnerEvent::Tick);
        let now = self.now;
        if let Some(dispatcher) = self.shards[shard].dispatcher.as_mut() {
            let before: Vec<dispatch::ConversationId> = dispatcher.queue().collect();
            let actions = dispatcher.handle(DispatchEvent::Tick, now);
            let after: Vec<dispatch::ConversationId> = dispatcher.queue().collect();
            if let Err(what) = invariants::check_queue_fifo(&before, &after, &actions, false) {
                self.fail(&what);
            }
            self.run_dispatch(shard, actions, None);
        }
    }

    /// The empty-conversation sweep, as if every empty one were past its TTL.
    fn expire_empty(&mut self, shard: usize) {
        let open = self
            .store(shard)
            .read()
            .and_then(|v| v.open_conversations());
        let open = open.expect("open conversations");
        for conversation in open {
            if conversation.last_seq == 0
                && !matches!(conversation.state, ConversationState::Assigned { .. })
            {
                self.trace(format_args!("expire empty {}", conversation.id.0));
                self.on_owner(
                    shard,
                    OwnerEvent::ExpireEmpty {
                        conversation: conversation.id,
                    },
                );
            }
        }
    }

    fn answer_bot(&mut self) {
        if self.bots.is_empty() {
            return;
        }
        let at = self.rng.gen_range(0..self.bots.len());
        let task = self.bots.remove(at);
        let verdict = match self.rng.gen_range(0..10) {
            0..=5 => BotOutcome::Reply {
                text: format!("bot answer at step {}", self.step),
                failed_turns: self.rng.gen_range(0..3),
            },
            6..=7 => BotOutcome::Handoff,
            _ => BotOutcome::Silent,
        };
        self.trace(format_args!(
            "bot verdict for {}: {verdict:?}",
            task.conversation.0
        ));
        self.on_owner(
            task.shard,
            OwnerEvent::BotVerdict {
                conversation: task.conversation,
                verdict,
                variant: None,
            },
        );
    }

    // ----- faults -----

    fn drop_random_connection(&mut self) {
        if self.sessions.is_empty() {
            return;
        }
        let ids: Vec<u64> = self.sessions.keys().copied().collect();
        let id = ids[self.rng.gen_range(0..ids.len())];
        self.trace(format_args!("drop connection {id}"));
        self.stats.dropped_connections += 1;
        self.close_session(id);
    }

    /// Crashes shard `shard` and restarts it from its store (see the module comment).
    pub fn crash(&mut self, shard: usize) {
        self.stats.crashes += 1;
        let n = self.n();
        let dispatcher = dispatcher_shard(n);
        self.trace(format_args!("CRASH shard {shard}"));
        for other in 0..n {
            self.channels[shard * n + other].clear();
            self.channels[other * n + shard].clear();
        }
        self.bots.retain(|task| task.shard != shard);
        // Drop the old shard (and its store) before reopening the store.
        self.shards[shard].store = None;
        self.shards[shard].pending.clear();
        let fresh = self.fresh_shard(shard);
        self.shards[shard] = fresh;
        invariants::check_survived_crash(self, shard);
        // Sessions living on the shard or depending on its memory are closed.
        let doomed: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.shard == shard
                    || match s.client {
                        ClientRef::Visitor(_) | ClientRef::Intruder => s
                            .claimed
                            .as_ref()
                            .is_some_and(|key| visitor_owner(SITE, &key.visitor, n) == shard),
                        ClientRef::Agent(_) => {
                            shard == dispatcher || s.follows.iter().any(|c| c.shard() == shard)
                        }
                    }
            })
            .map(|(id, _)| *id)
            .collect();
        for id in doomed {
            self.close_session(id);
        }
        // Router::start's restore.
        let restoring: Vec<usize> = if shard == dispatcher {
            (0..n).collect()
        } else {
            vec![shard]
        };
        for from in restoring {
            let open = self.store(from).read().and_then(|v| v.open_conversations());
            for conversation in open.expect("open conversations") {
                let assigned = match conversation.state {
                    ConversationState::Queued => None,
                    ConversationState::Assigned { agent } => Some(agent),
                    _ => continue,
                };
                self.send(
                    from,
                    dispatcher,
                    ShardMessage::Dispatch(DispatchEvent::Restore {
                        conversation: dispatch::ConversationId(conversation.id.0),
                        owner: from,
                        assigned,
                    }),
                );
            }
        }
    }

    // ----- sessions -----

    fn new_session(&mut self, client: ClientRef) -> SessionRef {
        let id = self.next_session;
        self.next_session += 1;
        let shard = self.rng.gen_range(0..self.n());
        self.sessions.insert(
            id,
            Session {
                shard,
                client,
                awaiting_hello: true,
                held: Vec::new(),
                follows: Vec::new(),
                claimed: None,
                view: invariants::ConnectionView {
                    agent: matches!(client, ClientRef::Agent(_)),
                    ..Default::default()
                },
            },
        );
        SessionRef {
            shard,
            session: SessionId::from_u64(id),
        }
    }

    /// A frame reaches a session's queue (`Arena::push*`); the client reads it at once.
    fn push(&mut self, id: u64, frame: Arc<str>, kind: Delivery) {
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        if kind == Delivery::Hello {
            session.awaiting_hello = false;
            let held = std::mem::take(&mut session.held);
            self.receive(id, frame);
            for frame in held {
                self.receive(id, frame);
            }
        } else if session.awaiting_hello {
            session.held.push(frame);
        } else {
            self.receive(id, frame);
        }
    }

    fn receive(&mut self, id: u64, frame: Arc<str>) {
        let Some(session) = self.sessions.get(&id) else {
            return;
        };
        let value: serde_json::Value = serde_json::from_str(&frame).expect("frames are JSON");
        if self.verbose && value["type"] != "typing" {
            self.trace(format_args!("session {id} receives {frame}"));
        }
        match session.client {
            ClientRef::Visitor(v) => self.visitor_receives(v, id, &value),
            ClientRef::Agent(a) => self.agent_receives(a, id, &value),
            ClientRef::Intruder => self.intruder_receives(id, &value),
        }
    }

    /// Closes a session as `Session::drop` does: its owners and the dispatcher are told.
    fn close_session(&mut self, id: u64) {
        let Some(session) = self.sessions.remove(&id) else {
            return;
        };
        let me = SessionRef {
            shard: session.shard,
            session: SessionId::from_u64(id),
        };
        let n = self.n();
        match session.client {
            ClientRef::Visitor(_) | ClientRef::Intruder => {
                if let ClientRef::Visitor(v) = session.client {
                    self.visitors[v].tabs.retain(|t| *t != id);
                }
                let key = session
                    .claimed
                    .clone()
                    .expect("visitor sessions claim a key");
                let owner = visitor_owner(SITE, &key.visitor, n);
                self.send(
                    session.shard,
                    owner,
                    ShardMessage::Owner(OwnerEvent::VisitorDetach { key, session: me }),
                );
            }
            ClientRef::Agent(a) => {
                self.agents[a].disconnected();
                let agent = self.agents[a].name.clone();
                self.send(
                    session.shard,
                    dispatcher_shard(n),
                    ShardMessage::Dispatch(DispatchEvent::AgentDetached {
                        agent,
                        session: me.to_dispatch(),
                    }),
                );
                for conversation in session.follows {
                    self.send(
                        session.shard,
                        conversation.shard(),
                        ShardMessage::Owner(OwnerEvent::AgentUnsubscribe {
                            conversation,
                            session: me,
                        }),
                    );
                }
            }
        }
    }

    // ----- clients -----

    fn client_step(&mut self) {
        if self.faults && self.rng.gen_range(0..100) < 3 {
            let target = self.rng.gen_range(0..self.visitors.len());
            self.connect_intruder(target);
            return;
        }
        let total = self.visitors.len() + self.agents.len();
        let pick = self.rng.gen_range(0..total);
        if pick < self.visitors.len() {
            self.visitor_step(pick);
        } else {
            self.agent_step(pick - self.visitors.len());
        }
    }

    pub fn connect_visitor(&mut self, v: usize) {
        let key = self.visitors[v].key();
        let me = self.new_session(ClientRef::Visitor(v));
        let resume = self.visitors[v].resume();
        self.visitors[v].tabs.push(me.session.to_u64());
        if let Some(session) = self.sessions.get_mut(&me.session.to_u64()) {
            session.view.resume = resume;
            session.claimed = Some(key.clone());
        }
        let n = self.n();
        let owner = visitor_owner(SITE, &key.visitor, n);
        let fresh_visitor = self.fresh_visitor_id(v, owner);
        let fresh_secret = format!("secret-{v}-{}", me.session.to_u64());
        let credentials = Credentials {
            secret_hash: self.visitors[v]
                .secret
                .as_deref()
                .map(crate::conversation::identity::hash_secret),
            verified: false,
            fresh: FreshVisitor {
                visitor: fresh_visitor.into(),
                secret_hash: crate::conversation::identity::hash_secret(&fresh_secret),
                secret: fresh_secret.into(),
            },
        };
        self.trace(format_args!(
            "visitor {v} connects as session {} on shard {} (resume {resume:?})",
            me.session.to_u64(),
            me.shard
        ));
        self.send(
            me.shard,
            owner,
            ShardMessage::Owner(OwnerEvent::VisitorAttach {
                key,
                resume,
                session: me,
                credentials: Box::new(credentials),
                stored: None,
            }),
        );
    }

    /// Someone claims visitor `target`'s id with a wrong secret (or none), and `resume=0`.
    fn connect_intruder(&mut self, target: usize) {
        let key = self.visitors[target].key();
        let me = self.new_session(ClientRef::Intruder);
        let id = me.session.to_u64();
        if let Some(session) = self.sessions.get_mut(&id) {
            session.view.resume = Some(0);
            session.claimed = Some(key.clone());
        }
        let owner = visitor_owner(SITE, &key.visitor, self.n());
        let fresh_secret = format!("intruder-secret-{id}");
        let credentials = Credentials {
            secret_hash: self
                .rng
                .gen_bool(0.5)
                .then(|| crate::conversation::identity::hash_secret("a guess")),
            verified: false,
            fresh: FreshVisitor {
                visitor: format!("intruder-{id}").into(),
                secret_hash: crate::conversation::identity::hash_secret(&fresh_secret),
                secret: fresh_secret.into(),
            },
        };
        self.trace(format_args!(
            "intruder session {id} claims visitor {target} ({})",
            key.visitor
        ));
        self.send(
            me.shard,
            owner,
            ShardMessage::Owner(OwnerEvent::VisitorAttach {
                key,
                resume: Some(0),
                session: me,
                credentials: Box::new(credentials),
                stored: None,
            }),
        );
    }

    /// An intruder learns nothing of the visitor it claimed: it is given the id only when
    /// nothing is stored under it, and it never hears of a conversation.
    fn intruder_receives(&mut self, id: u64, frame: &serde_json::Value) {
        let claimed = self.sessions[&id]
            .claimed
            .clone()
            .expect("intruders claim a key");
        let kind = frame["type"].as_str().unwrap_or_default();
        if kind == "hello" && frame["visitor"].as_str() != Some(&*claimed.visitor) {
            self.stats.intruders_refused += 1;
        }
        if kind == "hello" && frame["visitor"].as_str() == Some(&*claimed.visitor) {
            let owner = visitor_owner(SITE, &claimed.visitor, self.n());
            let stored = self
                .store(owner)
                .read()
                .and_then(|view| {
                    Ok((
                        view.visitor_secret(SITE, &claimed.visitor)?,
                        view.conversation_of_visitor(SITE, &claimed.visitor)?,
                    ))
                })
                .expect("read");
            if stored != (None, None) {
                self.fail(&format!(
                    "intruder session {id} was given visitor {} which has {stored:?} stored",
                    claimed.visitor
                ));
            }
        }
        if !frame["conversation"].is_null() {
            self.fail(&format!(
                "intruder session {id} claiming {} was sent {frame}",
                claimed.visitor
            ));
        }
    }

    /// A visitor id owned by `owner` that no client uses (for a refused claim).
    fn fresh_visitor_id(&self, v: usize, owner: usize) -> String {
        (0..)
            .map(|k| format!("fresh-{v}-{}-{k}", self.next_session))
            .find(|id| visitor_owner(SITE, id, self.n()) == owner)
            .expect("some id hashes to every shard")
    }

    fn visitor_frame(&mut self, v: usize, tab: u64, frame: VisitorFrame) {
        let Some(session) = self.sessions.get(&tab) else {
            return;
        };
        let from = session.shard;
        let key = session
            .claimed
            .clone()
            .expect("visitor sessions claim a key");
        let owner = visitor_owner(SITE, &key.visitor, self.n());
        self.trace(format_args!("visitor {v} tab {tab} sends {frame:?}"));
        self.send(
            from,
            owner,
            ShardMessage::Owner(OwnerEvent::Visitor {
                key,
                session: SessionRef {
                    shard: from,
                    session: SessionId::from_u64(tab),
                },
                frame,
            }),
        );
    }

    fn visitor_step(&mut self, v: usize) {
        if self.visitors[v].tabs.is_empty() {
            self.connect_visitor(v);
            return;
        }
        let tabs = self.visitors[v].tabs.clone();
        let tab = tabs[self.rng.gen_range(0..tabs.len())];
        let greeted = self.sessions.get(&tab).is_some_and(|s| s.view.hellos > 0);
        let roll = self.rng.gen_range(0..100);
        // The page talks once greeted: before its hello a client does not know the
        // secret it may just have been issued (were the connection to drop, a message
        // sent now would open a conversation under a secret the client never learnt).
        if !greeted && roll < 78 {
            return;
        }
        match roll {
            0..=54 => {
                let (id, text) = self.visitors[v].new_message();
                self.visitor_frame(v, tab, VisitorFrame::Message { id, text });
            }
            55..=61 => self.visitor_frame(v, tab, VisitorFrame::Handoff {}),
            62..=71 => {
                let on = self.rng.gen_bool(0.6);
                self.visitor_frame(v, tab, VisitorFrame::Typing { on });
            }
            72..=77 => {
                let seq = self.visitors[v].high;
                self.visitor_frame(v, tab, VisitorFrame::Read { seq });
            }
            // A second tab only once every open one is greeted: before that, the
            // client may not know the secret it was just issued.
            78..=84 if tabs.len() < 2 && self.all_greeted(v) => self.connect_visitor(v),
            _ => {
                self.trace(format_args!("visitor {v} closes tab {tab}"));
                self.close_session(tab);
            }
        }
    }

    fn all_greeted(&self, v: usize) -> bool {
        self.visitors[v]
            .tabs
            .iter()
            .all(|t| self.sessions.get(t).is_some_and(|s| s.view.hellos > 0))
    }

    fn resend_unacked(&mut self, v: usize) {
        let Some(&tab) = self.visitors[v].tabs.first() else {
            return;
        };
        for (id, text) in self.visitors[v].unacked.clone() {
            self.visitor_frame(v, tab, VisitorFrame::Message { id, text });
        }
    }

    fn visitor_receives(&mut self, v: usize, id: u64, frame: &serde_json::Value) {
        let kind = frame["type"].as_str().unwrap_or_default();
        match kind {
            "hello" => {
                let conversation = frame["conversation"].as_u64();
                let seq = frame["seq"].as_u64().unwrap_or(0);
                let given = frame["visitor"].as_str().unwrap_or_default().to_string();
                if given != self.visitors[v].name {
                    // Refused: a tab closed before its hello brought the secret it was
                    // issued, and its detach had not reached the owner when the client came
                    // back with an older secret (or none). Harmless only for a visitor with
                    // nothing stored, which then goes on as the new id.
                    let client = &self.visitors[v];
                    let owner = visitor_owner(SITE, &client.name, self.n());
                    let stored = self
                        .store(owner)
                        .read()
                        .and_then(|view| view.conversation_of_visitor(SITE, &client.name))
                        .expect("read");
                    if stored.is_some()
                        || client.conversation.is_some()
                        || !client.acked.is_empty()
                        || client.tabs.len() > 1
                    {
                        self.fail(&format!(
                            "visitor {v} (secret {:?}, conversation {:?}) was moved to {given}",
                            client.secret, client.conversation
                        ));
                    }
                    self.trace(format_args!("visitor {v} becomes {given}"));
                    self.visitors[v].name = given;
                }
                // A hello with a secret carries the one to present from now on.
                if let Some(secret) = frame["secret"].as_str() {
                    self.visitors[v].secret = Some(secret.to_string());
                }
                let session = self.sessions.get_mut(&id).expect("receiving session");
                session.view.hello(conversation, seq);
                if session.view.hellos == 1 && session.view.from < seq {
                    self.stats.resumes_with_replay += 1;
                }
                self.visitors[v].hello(conversation, seq);
                // A client re-sends its unacked messages once it is greeted.
                for (msg, text) in self.visitors[v].unacked.clone() {
                    self.visitor_frame(v, id, VisitorFrame::Message { id: msg, text });
                }
            }
            "ack" => {
                let (msg, conversation, seq) = ack_fields(frame);
                invariants::check_ack(self, id, &msg, conversation, seq, false);
                self.visitors[v].acked(&msg, conversation, seq);
            }
            "message" => {
                let conversation = frame["conversation"].as_u64().expect("conversation");
                let seq = frame["seq"].as_u64().expect("seq");
                invariants::check_message(self, id, conversation, seq, frame);
                self.visitors[v].saw(conversation, seq);
            }
            "error" => {
                let session = self.sessions.get_mut(&id).expect("receiving session");
                session.view.errors += 1;
            }
            _ => {}
        }
    }

    // ----- agents -----

    pub fn connect_agent(&mut self, a: usize) {
        let me = self.new_session(ClientRef::Agent(a));
        self.agents[a].connected(me.session.to_u64());
        let n = self.n();
        self.trace(format_args!(
            "agent {a} connects as session {} on shard {}",
            me.session.to_u64(),
            me.shard
        ));
        let agent = self.agents[a].name.clone();
        self.send(
            me.shard,
            dispatcher_shard(n),
            ShardMessage::Dispatch(DispatchEvent::AgentAttached {
                name: agent.clone(),
                agent,
                max_open: 2,
                session: me.to_dispatch(),
            }),
        );
    }

    fn agent_frame(&mut self, a: usize, frame: AgentFrame) {
        let Some(id) = self.agents[a].session else {
            return;
        };
        let Some(session) = self.sessions.get(&id) else {
            return;
        };
        let me = SessionRef {
            shard: session.shard,
            session: SessionId::from_u64(id),
        };
        let agent = self.agents[a].name.clone();
        let n = self.n();
        self.trace(format_args!("agent {a} sends {frame:?}"));
        let dispatcher = dispatcher_shard(n);
        match frame {
            AgentFrame::Status { status } => self.send(
                me.shard,
                dispatcher,
                ShardMessage::Dispatch(DispatchEvent::AgentStatus {
                    agent,
                    status: match status {
                        Presence::Online => dispatch::AgentStatus::Online,
                        Presence::Away => dispatch::AgentStatus::Away,
                    },
                }),
            ),
            AgentFrame::Accept { conversation } => self.send(
                me.shard,
                dispatcher,
                ShardMessage::Dispatch(DispatchEvent::Accept {
                    agent,
                    session: me.to_dispatch(),
                    conversation: dispatch::ConversationId(conversation),
                }),
            ),
            AgentFrame::Transfer { conversation, to } => self.send(
                me.shard,
                dispatcher,
                ShardMessage::Dispatch(DispatchEvent::Transfer {
                    from: agent,
                    session: me.to_dispatch(),
                    conversation: dispatch::ConversationId(conversation),
                    to,
                    role: Role::Agent,
                }),
            ),
            frame => {
                let conversation = frame.conversation().expect("scoped frames name one");
                if conversation.shard() >= n {
                    return;
                }
                self.send(
                    me.shard,
                    conversation.shard(),
                    ShardMessage::Owner(OwnerEvent::Agent {
                        name: agent.clone(),
                        agent,
                        role: Role::Agent,
                        session: me,
                        frame,
                    }),
                );
            }
        }
    }

    fn agent_step(&mut self, a: usize) {
        if self.agents[a].session.is_none() {
            self.connect_agent(a);
            return;
        }
        let held: Vec<u64> = self.agents[a].held.iter().copied().collect();
        let queue = self.agents[a].queue.clone();
        let roll = self.rng.gen_range(0..100);
        match roll {
            0..=44 if !held.is_empty() => {
                let conversation = held[self.rng.gen_range(0..held.len())];
                let (id, text) = self.agents[a].new_message(conversation);
                self.agent_frame(
                    a,
                    AgentFrame::Message {
                        conversation,
                        id,
                        text,
                    },
                );
            }
            45..=59 if !queue.is_empty() => {
                let conversation = queue[self.rng.gen_range(0..queue.len())];
                self.agent_frame(a, AgentFrame::Accept { conversation });
            }
            60..=66 if !held.is_empty() => {
                let conversation = held[self.rng.gen_range(0..held.len())];
                self.agent_frame(a, AgentFrame::Close { conversation });
            }
            67..=71 if !held.is_empty() && self.agents.len() > 1 => {
                let conversation = held[self.rng.gen_range(0..held.len())];
                let to = self.agents[(a + 1) % self.agents.len()].name.clone();
                self.agent_frame(a, AgentFrame::Transfer { conversation, to });
            }
            72..=77 if !held.is_empty() => {
                let conversation = held[self.rng.gen_range(0..held.len())];
                let on = self.rng.gen_bool(0.5);
                self.agent_frame(a, AgentFrame::Typing { conversation, on });
            }
            78..=85 => {
                let status = if self.rng.gen_bool(0.7) {
                    Presence::Online
                } else {
                    Presence::Away
                };
                self.agent_frame(a, AgentFrame::Status { status });
            }
            86..=91 => {
                let id = self.agents[a].session.expect("connected");
                self.trace(format_args!("agent {a} disconnects"));
                self.close_session(id);
            }
            _ => {}
        }
    }

    fn agent_receives(&mut self, a: usize, id: u64, frame: &serde_json::Value) {
        let kind = frame["type"].as_str().unwrap_or_default();
        let conversation = frame["conversation"].as_u64();
        match kind {
            "hello" => {
                let held: Vec<u64> = frame["conversations"]
                    .as_array()
                    .map(|list| list.iter().filter_map(|c| c.as_u64()).collect())
                    .unwrap_or_default();
                self.agents[a].queue = queue_of(&frame["queue"]);
                self.agents[a].held.extend(held);
                // Re-send unacked replies (same ids) once greeted.
                for (msg, conversation, text) in self.agents[a].unacked.clone() {
                    self.agent_frame(
                        a,
                        AgentFrame::Message {
                            conversation,
                            id: msg,
                            text,
                        },
                    );
                }
            }
            "queue" => self.agents[a].queue = queue_of(&frame["conversations"]),
            "assigned" => {
                let conversation = conversation.expect("conversation");
                self.agents[a].held.insert(conversation);
                let session = self.sessions.get_mut(&id).expect("receiving session");
                session.view.agent_assigned(conversation);
            }
            "closed" | "requeued" | "transferred" => {
                if let Some(conversation) = conversation {
                    self.agents[a].held.remove(&conversation);
                    self.agents[a]
                        .unacked
                        .retain(|(_, c, _)| *c != conversation);
                }
            }
            "ack" => {
                let (msg, conversation, seq) = ack_fields(frame);
                invariants::check_ack(self, id, &msg, conversation, seq, true);
                self.agents[a].acked(&msg, conversation, seq);
            }
            "message" => {
                let conversation = conversation.expect("conversation");
                let seq = frame["seq"].as_u64().expect("seq");
                invariants::check_message(self, id, conversation, seq, frame);
            }
            "error" => {
                let session = self.sessions.get_mut(&id).expect("receiving session");
                session.view.errors += 1;
                // `not_assigned` and the like: the reply cannot be stored; forget it.
                if frame["code"].as_str() == Some("not_assigned") {
                    self.agents[a].unacked.clear();
                }
            }
            _ => {}
        }
    }

    /// One line per shard: what is pending, for the failure report.
    pub fn describe_state(&self) -> String {
        let mut out = String::new();
        for (i, shard) in self.shards.iter().enumerate() {
            let _ = write!(
                out,
                "shard {i}: {} pending ops, {} live conversations; ",
                shard.pending.len(),
                shard.owner.live_count()
            );
        }
        out
    }
}

fn queue_of(value: &serde_json::Value) -> Vec<u64> {
    value
        .as_array()
        .map(|list| list.iter().filter_map(|c| c.as_u64()).collect())
        .unwrap_or_default()
}

fn ack_fields(frame: &serde_json::Value) -> (String, u64, u64) {
    (
        frame["id"].as_str().expect("ack id").to_string(),
        frame["conversation"].as_u64().expect("ack conversation"),
        frame["seq"].as_u64().expect("ack seq"),
    )
}

fn describe(message: &ShardMessage) -> String {
    match message {
        ShardMessage::Owner(event) => {
            let text = format!("{event:?}");
            let cut = text.find("credentials").unwrap_or(text.len()).min(240);
            text[..cut].to_string()
        }
        ShardMessage::Dispatch(event) => format!("dispatch {event:?}"),
        ShardMessage::Deliver { session, kind, .. } => {
            format!("deliver {kind:?} to session {}", session.to_u64())
        }
        ShardMessage::Track { .. } => "track".into(),
        ShardMessage::Batch(messages) => format!("batch of {}", messages.len()),
        ShardMessage::InjectPanic | ShardMessage::InjectStall { .. } => "inject".into(),
        ShardMessage::Query(query) => format!("query {:?}", query.question),
    }
}

impl VisitorClient {
    pub fn key(&self) -> VisitorKey {
        VisitorKey {
            site: SITE.into(),
            visitor: self.name.as_str().into(),
        }
    }
}
