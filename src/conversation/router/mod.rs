//! The shard-local driver of conversations: runs the [`Owner`] state machine
//! (every shard) and the [`Dispatcher`] (one shard), executes their actions and
//! feeds results back.
//!
//! - Storage: operations are queued and applied by a committer task in group
//!   commits: it waits `commit_window` after the first pending operation, and
//!   never starts a commit less than `commit_interval` after the previous one
//!   started (`max_batch` pending operations commit at once), then applies the
//!   whole batch (one log record, and its writes in ONE LMDB transaction) on glommio's blocking
//!   thread (pinned next to the shard; one thread, which keeps a deferred LMDB transaction on the
//!   thread that began it), so an fsync never stalls the event loop. While a commit is in flight
//!   the next batch accumulates. Reads (replay, metadata) use a [`StoreReader`]
//!   on the shard's thread; LMDB readers never wait for the writer. With the log, LMDB commits
//!   the acked batches of up to `apply_interval` at once (deferred apply, see `store`); when no
//!   batch ends that interval, the committer applies them itself, and `finish_commits` does at
//!   shutdown.
//!   A full map grows inside the commit (the store retries the batch). When the
//!   store is out of space (map at `max_map_size`, disk full) the batch's senders
//!   get `storage_full`, and later batches are refused at once until a retry
//!   after a growing delay commits ([`WriteBackoff`]); reads go on meanwhile.
//! - Mesh: everything for another shard goes through a per-destination FIFO
//!   drained by one task, so messages are never dropped when a channel is
//!   full and arrive in the order they were produced.
//! - Metrics: the router records the shard's relay, bot and commit histograms (no lock: the
//!   recorders live here, on the shard's thread) and its one-second tick publishes them with
//!   the storage size and the inference queue depth (see [`crate::metrics`]).
//!
//! Invariant: the owner state machine sees commit results in commit order, and
//! a replay never reaches past what the owner has fanned out (see `owner`).
//!
//! This file holds the router, the mesh and the execution of owner actions; the rest by role:
//! `commit` (group commit), `replay` (streamed resume replays), `bot` (guards and bot turns),
//! `dispatching` (dispatcher actions), `housekeeping` (the tick, restore at start) and `audit`.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use shards::{Mesh, ShardId};

use super::clock::monotonic_ms;
use super::dispatch::{self, DispatchAction, DispatchEvent, Dispatcher, DispatcherConfig};
use super::owner::{
    message_frame, BotOutcome, CommitFailure, Completion, Owner, OwnerAction, OwnerConfig,
    OwnerEvent, StoredVisitor, VisitorKey,
};
use super::protocol::{self, now_ms, VisitorFrame};
use super::SessionRef;
use crate::admission::{self, Level};
use crate::arena::{Arena, Outbound, SessionId};
use crate::audit::AuditEvent;
use crate::bot::{BotContext, Chain, HandlerSpec, Registry, Verdict};
use crate::config::Config;
use crate::engine::intent::{CacheOutcome, EngineSettings, IntentEngine};
use crate::engine::WorkerMetrics;
use crate::metrics::histogram::{Family, Recorder};
use crate::metrics::{Metrics, ShardMetrics};
use crate::ratelimit::KeyedBuckets;
use crate::store::{
    ConversationId, Durability, Op, ShardStore, StoreOptions, StoreReader, WriteBackoff,
};

mod audit;
mod bot;
mod commit;
mod dispatching;
pub use dispatching::{route_dispatch, Routed};
mod housekeeping;
mod queries;
mod replay;

use audit::{auditable, dispatch_audit, record};
use bot::Bot;
use commit::start_flusher;
use housekeeping::RouterHistograms;

/// What a delivered frame is to the session's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// A live frame.
    Live,
    /// The session's `hello`: released together with anything held back.
    Hello,
    /// A frame of a resume replay (exempt from the backlog bound).
    Replay,
    /// A resume replay longer than one chunk starts streaming: live frames wait behind it
    /// (see [`Arena::begin_replay`]). The frame is empty.
    ReplayBegin,
    /// The streamed replay ended: the live frames held behind it follow. The frame is empty.
    ReplayEnd,
    /// An `error` frame refusing something the session sent: it counts toward the session's
    /// abuse limit (see [`crate::admission::SessionLimits::refused`]).
    Refusal,
}

/// What storage knows about a visitor id, for [`OwnerAction::LoadVisitor`]: its secret's hash and
/// its open conversation.
pub fn look_up_visitor(
    view: &crate::store::ReadView<'_>,
    key: &VisitorKey,
) -> Result<StoredVisitor, crate::store::StoreError> {
    Ok(StoredVisitor {
        secret_hash: view.visitor_secret(&key.site, &key.visitor)?,
        conversation: view.conversation_of_visitor(&key.site, &key.visitor)?,
    })
}

/// Messages shards send each other.
#[derive(Debug)]
pub enum ShardMessage {
    /// For the owner of a conversation (or of a visitor key).
    Owner(OwnerEvent),
    /// For the dispatcher shard.
    Dispatch(DispatchEvent),
    /// Frames for sessions of the receiving shard.
    Deliver {
        session: SessionId,
        frame: Arc<str>,
        kind: Delivery,
    },
    /// An agent session follows a conversation (unsubscribe when it closes).
    Track {
        session: SessionId,
        conversation: ConversationId,
    },
    /// Diagnostics only (`POST /debug/panic`, `[diagnostics] panic_endpoint`): the receiving
    /// shard panics, to exercise the fatal-panic path (see `crate::fault`).
    InjectPanic,
    /// Diagnostics only (`POST /debug/stall`, `[diagnostics] stall_endpoint`): the receiving
    /// shard blocks its thread for this many milliseconds, to exercise the systemd watchdog
    /// (see `crate::service_manager`).
    InjectStall { millis: u64 },
    /// A question of the admin API about this shard's stored conversations or (to the
    /// dispatcher shard) the queue; answered through its reply channel (see
    /// [`crate::conversation::query`]).
    Query(super::query::Query),
    /// Messages queued for the same shard during one turn, sent as one mesh message (at most
    /// [`MESH_BATCH`]): one channel slot and at most one wake-up of the receiver instead of
    /// one per message. Handled in order; never nested.
    Batch(Vec<ShardMessage>),
}

/// The most messages one [`ShardMessage::Batch`] carries.
pub const MESH_BATCH: usize = 256;

/// Why the conversation layer could not start.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("cannot open storage for shard {shard} under {dir}: {source}")]
    Store {
        shard: usize,
        dir: String,
        source: crate::store::StoreError,
    },
    #[error("cannot start the bot: {0}")]
    Bot(String),
}

/// Per-shard conversation state and machinery.
pub struct Router {
    shard: usize,
    shard_count: usize,
    /// The configuration in force (a reload replaces it: [`Router::apply_config`]).
    config: RefCell<Arc<Config>>,
    /// The handler registry the bot's chains are built from (again at a reload).
    registry: Registry,
    mesh: Rc<Mesh<ShardMessage>>,
    arena: Rc<RefCell<Arena>>,
    owner: RefCell<Owner>,
    dispatcher: Option<RefCell<Dispatcher>>,
    reader: StoreReader,
    store: RefCell<Option<ShardStore>>,
    pending: RefCell<Vec<(Op, Completion, std::time::Instant)>>,
    doorbell: LocalSender<()>,
    doorbell_rx: RefCell<Option<LocalReceiver<()>>>,
    outgoing: Vec<RefCell<VecDeque<ShardMessage>>>,
    outgoing_bells: Vec<LocalSender<()>>,
    outgoing_rx: RefCell<Vec<Option<LocalReceiver<()>>>>,
    /// Whether each outgoing queue's drain task has been rung and not yet run.
    outgoing_rung: Vec<Cell<bool>>,
    committing: Cell<bool>,
    /// Set by `finish_commits`: the committer takes no new batch.
    stopping: Cell<bool>,
    /// The store's deferred apply interval (`[storage] apply_interval`).
    apply_interval: Duration,
    /// Whether the store is full (map at its ceiling, disk full): batches are refused with
    /// `storage_full` without touching the store until the next retry.
    full: RefCell<WriteBackoff>,
    /// This shard's jobs on glommio's blocking pool (group commits here, API requests in the
    /// server): shutdown waits for them before the executor ends.
    jobs: Rc<crate::blocking::BlockingJobs>,
    /// Mean cost of recent group commits (published for message shedding).
    commit_cost: Cell<crate::admission::shed::CommitCost>,
    bot: Option<Bot>,
    metrics: Metrics,
    /// This shard's histograms (recorded here, published by the one-second tick).
    histograms: RefCell<RouterHistograms>,
    /// The shard's load level (set by the degradation sampler in `server`).
    level: Cell<Level>,
    /// Bot queries per site on this shard (`[limits] bot_queries_per_site`).
    bot_queries: RefCell<KeyedBuckets<Arc<str>>>,
    /// This router itself, for tasks it spawns.
    me: RefCell<std::rc::Weak<Router>>,
}

impl Router {
    /// Opens this shard's store and builds the state machines; the bot's chains come from
    /// `handlers`.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        shard: usize,
        core: usize,
        shard_count: usize,
        config: Arc<Config>,
        mesh: Rc<Mesh<ShardMessage>>,
        arena: Rc<RefCell<Arena>>,
        metrics: Metrics,
        handlers: &Registry,
    ) -> Result<Rc<Router>, RouterError> {
        let durability = match config.storage.durability {
            crate::config::Durability::Fsync => Durability::Fsync,
            crate::config::Durability::Batch => Durability::Batch,
            crate::config::Durability::NoSync => Durability::None,
        };
        let apply_interval = config.storage.apply_interval;
        let store = ShardStore::open(
            &config.storage.dir,
            shard,
            StoreOptions {
                map_size: config.storage.map_size as usize,
                max_map_size: config.storage.max_map_size as usize,
                durability,
                log_bytes: config.storage.log_bytes,
                apply_interval,
            },
        )
        .map_err(|source| RouterError::Store {
            shard,
            dir: config.storage.dir.display().to_string(),
            source,
        })?;
        if durability == Durability::Batch {
            start_flusher(&store, config.storage.sync_interval, shard);
        }
        let reader = store.reader();
        let bot = Bot::open(&config, shard, core, handlers, &metrics)?;
        let histograms = RefCell::new(RouterHistograms::new(&metrics, shard));
        let owner = Owner::new(OwnerConfig {
            shard,
            bot_enabled: bot.as_ref().is_some_and(|bot| bot.engine.is_some()),
            typing_interval_ms: config.conversations.typing_interval.as_millis() as u64,
            typing_expiry_ms: config.conversations.typing_expiry.as_millis() as u64,
            // Static accounts name themselves here (development mode); stored accounts carry
            // their display name with their session's frames.
            agent_names: if config.agents.dev_static_tokens {
                config
                    .agents
                    .accounts
                    .iter()
                    .map(|(id, account)| (id.clone(), account.name.clone()))
                    .collect()
            } else {
                Default::default()
            },
            max_opening_frames: config.limits.max_opening_frames,
        });
        let dispatcher = (super::dispatcher_shard(shard_count) == shard).then(|| {
            RefCell::new(Dispatcher::new(DispatcherConfig {
                agent_grace_ms: config.conversations.agent_grace.as_millis() as u64,
                auto_assign: config.agents.auto_assign,
            }))
        });
        let (doorbell, doorbell_rx) = local_channel::new_bounded(1);
        let mut outgoing_bells = Vec::new();
        let mut outgoing_rx = Vec::new();
        for _ in 0..shard_count {
            let (tx, rx) = local_channel::new_bounded(1);
            outgoing_bells.push(tx);
            outgoing_rx.push(Some(rx));
        }
        let bot_queries = KeyedBuckets::new(
            admission::rate(config.limits.bot_queries_per_site, config.limits.bot_burst),
            config.limits.tracked_keys,
        );
        let router = Rc::new(Router {
            shard,
            shard_count,
            config: RefCell::new(config),
            registry: handlers.clone(),
            mesh,
            arena,
            owner: RefCell::new(owner),
            dispatcher,
            reader,
            store: RefCell::new(Some(store)),
            pending: RefCell::new(Vec::new()),
            doorbell,
            doorbell_rx: RefCell::new(Some(doorbell_rx)),
            outgoing: (0..shard_count).map(|_| RefCell::default()).collect(),
            outgoing_bells,
            outgoing_rx: RefCell::new(outgoing_rx),
            outgoing_rung: (0..shard_count).map(|_| Cell::new(false)).collect(),
            committing: Cell::new(false),
            stopping: Cell::new(false),
            apply_interval,
            full: RefCell::default(),
            jobs: Rc::default(),
            commit_cost: Cell::default(),
            bot,
            metrics,
            histograms,
            level: Cell::new(Level::Normal),
            bot_queries: RefCell::new(bot_queries),
            me: RefCell::new(std::rc::Weak::new()),
        });
        *router.me.borrow_mut() = Rc::downgrade(&router);
        Ok(router)
    }

    /// Starts the committer, the mesh senders and the one-second tick, and
    /// tells the dispatcher about conversations that were waiting or assigned
    /// before a restart.
    pub fn start(self: &Rc<Self>) {
        let committer = self.clone();
        glommio::spawn_local(async move { committer.commit_loop().await }).detach();
        for to in 0..self.shard_count {
            let router = self.clone();
            glommio::spawn_local(async move { router.send_loop(to).await }).detach();
        }
        let ticker = self.clone();
        glommio::spawn_local(async move {
            let ttl = ticker.config().visitors.empty_conversation_ttl;
            let sweep_every = (ttl.as_secs() / 2).clamp(1, 60);
            let mut seconds = 0u64;
            loop {
                glommio::timer::sleep(Duration::from_secs(1)).await;
                ticker.on_owner(OwnerEvent::Tick);
                ticker.publish_metrics();
                seconds += 1;
                if seconds.is_multiple_of(sweep_every) {
                    ticker.expire_empty_conversations(ttl);
                }
                if let Some(bot) = &ticker.bot {
                    let now = monotonic_ms();
                    bot.guards.borrow_mut().prune(now);
                    bot.variants.borrow_mut().prune(now);
                    ticker.prune_unrecorded(bot);
                    if let Some(engine) = &bot.engine {
                        engine.maybe_reload();
                    }
                }
                if let Some(dispatcher) = &ticker.dispatcher {
                    let actions = dispatcher
                        .borrow_mut()
                        .handle(DispatchEvent::Tick, monotonic_ms());
                    ticker.run_dispatch(actions, None);
                }
            }
        })
        .detach();
        self.restore();
    }

    /// This shard's index.
    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    /// Puts a reloaded configuration in force: the owner's bound on frames waiting for an
    /// opening conversation, the per-site bot-query rate, and the bot's chains (handler order,
    /// thresholds, risk control, the gray-release variants and their weights), rebuilt from the
    /// registry. Conversations keep the variant stored with them; new ones get the new weights. Chains that do not build keep the
    /// previous ones (logged). The intent engine stays as loaded: `crate::reload` leaves the keys
    /// that would change it for a restart.
    pub fn apply_config(&self, config: Arc<Config>) {
        self.owner
            .borrow_mut()
            .set_max_opening_frames(config.limits.max_opening_frames);
        *self.bot_queries.borrow_mut() = KeyedBuckets::new(
            admission::rate(config.limits.bot_queries_per_site, config.limits.bot_burst),
            config.limits.tracked_keys,
        );
        if let Some(bot) = &self.bot {
            match Bot::chains(&config, &self.registry, &self.metrics) {
                Ok((guards, variants)) => {
                    *bot.guards.borrow_mut() = guards;
                    *bot.variants.borrow_mut() = variants;
                    bot::log_variants(self.shard, &config);
                }
                Err(err) => tracing::error!(
                    shard = self.shard,
                    error = %err,
                    "reloaded bot handlers do not build; the previous chains stay"
                ),
            }
        }
        *self.config.borrow_mut() = config;
    }

    pub fn shard(&self) -> usize {
        self.shard
    }

    /// Number of shards.
    /// The shard's intent engine, when the bot answers from the knowledge base.
    pub fn engine(&self) -> Option<Rc<IntentEngine>> {
        self.bot.as_ref().and_then(|bot| bot.engine.clone())
    }

    pub fn shard_count(&self) -> usize {
        self.shard_count
    }

    /// Messages waiting for the mesh toward shard `to`.
    pub fn queued_to(&self, to: usize) -> usize {
        self.outgoing[to].borrow().len()
    }

    /// Messages waiting for the mesh toward every shard.
    pub fn queued_total(&self) -> usize {
        self.outgoing.iter().map(|queue| queue.borrow().len()).sum()
    }

    /// Storage operations waiting for a group commit on this shard.
    pub fn pending_commits(&self) -> usize {
        self.pending.borrow().len()
    }

    /// Texts waiting for the shard's inference worker (0 without a model).
    pub fn inference_queue(&self) -> usize {
        self.bot
            .as_ref()
            .and_then(|bot| bot.engine.as_ref())
            .and_then(|engine| engine.worker())
            .map_or(0, |worker| worker.queue_depth())
    }

    /// The shard's load level (see [`crate::admission::degrade`]).
    pub fn level(&self) -> Level {
        self.level.get()
    }

    /// Sets the shard's load level (the degradation sampler does).
    pub fn set_level(&self, level: Level) {
        self.level.set(level);
    }

    /// Handles a message from the mesh.
    pub fn on_mesh(&self, _from: ShardId, message: ShardMessage) {
        match message {
            ShardMessage::Owner(OwnerEvent::Visitor {
                key,
                session,
                frame: VisitorFrame::Message { id, text },
            }) => {
                // Counted against the visitor the session really is (it may have been
                // moved off a claimed id it had no secret for).
                let visitor = self.owner.borrow().visitor_of(&key, session);
                let Some(text) = self.guard(&visitor, session, text) else {
                    return;
                };
                self.on_owner(OwnerEvent::Visitor {
                    key,
                    session,
                    frame: VisitorFrame::Message { id, text },
                });
            }
            ShardMessage::Owner(event) => self.on_owner(event),
            ShardMessage::Batch(messages) => {
                for message in messages {
                    self.on_mesh(_from, message);
                }
            }
            ShardMessage::Dispatch(event) => {
                let Some(dispatcher) = &self.dispatcher else {
                    tracing::error!(
                        shard = self.shard,
                        "dispatch event sent to a shard that is not the dispatcher"
                    );
                    return;
                };
                let context = match &event {
                    DispatchEvent::AgentAttached { agent, name, .. } => {
                        Some((agent.clone(), name.clone()))
                    }
                    _ => None,
                };
                let audited = auditable(&event).then(|| event.clone());
                let held_by = match &event {
                    DispatchEvent::Transfer { conversation, .. } => {
                        dispatcher.borrow().assigned_to(*conversation).cloned()
                    }
                    _ => None,
                };
                let actions = dispatcher.borrow_mut().handle(event, monotonic_ms());
                if let Some(event) = audited {
                    for record in dispatch_audit(&event, held_by.as_deref(), &actions) {
                        self::record(record);
                    }
                }
                self.run_dispatch(actions, context);
            }
            ShardMessage::Deliver {
                session,
                frame,
                kind,
            } => push(&mut self.arena.borrow_mut(), session, frame, kind),
            ShardMessage::Track {
                session,
                conversation,
            } => {
                if let Some(record) = self.arena.borrow_mut().get_mut(session) {
                    if !record.follows.contains(&conversation.0) {
                        record.follows.push(conversation.0);
                    }
                }
            }
            ShardMessage::Query(query) => self.answer_query(query),
            ShardMessage::InjectPanic => {
                panic!(
                    "injected panic on shard {} (POST /debug/panic, [diagnostics] panic_endpoint)",
                    self.shard
                )
            }
            ShardMessage::InjectStall { millis } => {
                tracing::warn!(
                    shard = self.shard,
                    millis,
                    "injected stall: shard {} blocks its thread for {millis} ms (POST \
                     /debug/stall, [diagnostics] stall_endpoint)",
                    self.shard
                );
                // Blocking the shard's thread on purpose: that is the fault being rehearsed.
                std::thread::sleep(std::time::Duration::from_millis(millis));
                tracing::warn!(shard = self.shard, millis, "injected stall over");
            }
        }
    }

    /// Sends a message to a shard (this one included), in order, never dropping it.
    pub fn send(&self, to: usize, message: ShardMessage) {
        // Even a message to this shard takes the mesh (its self channel): it is
        // handled on a later turn of the event loop, so callers never re-enter
        // the state machines.
        self.outgoing[to].borrow_mut().push_back(message);
        if !self.outgoing_rung[to].replace(true) {
            let _ = self.outgoing_bells[to].try_send(());
        }
    }

    async fn send_loop(&self, to: usize) {
        let Some(bell) = self.outgoing_rx.borrow_mut()[to].take() else {
            return;
        };
        while bell.recv().await.is_some() {
            self.outgoing_rung[to].set(false);
            loop {
                let message = {
                    let mut queue = self.outgoing[to].borrow_mut();
                    match queue.len() {
                        0 => break,
                        1 => queue.pop_front().expect("one message"),
                        n => ShardMessage::Batch(queue.drain(..n.min(MESH_BATCH)).collect()),
                    }
                };
                if let Err((err, _)) = self.mesh.send(ShardId(to), message).await {
                    tracing::error!(to, error = %err, "mesh send failed");
                }
            }
        }
    }

    /// Delivers a frame to a session wherever it lives.
    fn deliver(&self, to: SessionRef, frame: Arc<str>) {
        self.deliver_frame(to, frame, Delivery::Live);
    }

    /// Delivers a session's `hello` (see [`Arena::push_hello`]).
    fn deliver_hello(&self, to: SessionRef, frame: Arc<str>) {
        self.deliver_frame(to, frame, Delivery::Hello);
    }

    fn deliver_frame(&self, to: SessionRef, frame: Arc<str>, kind: Delivery) {
        if to.shard == self.shard {
            push(&mut self.arena.borrow_mut(), to.session, frame, kind);
        } else {
            self.send(
                to.shard,
                ShardMessage::Deliver {
                    session: to.session,
                    frame,
                    kind,
                },
            );
        }
    }

    /// Runs one owner event and everything it leads to.
    pub fn on_owner(&self, event: OwnerEvent) {
        let actions = self.owner.borrow_mut().handle(event, monotonic_ms());
        self.run_owner(actions);
    }

    fn run_owner(&self, actions: Vec<OwnerAction>) {
        let mut queue: VecDeque<OwnerAction> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                OwnerAction::Store { op, completion } => self.queue_op(op, completion),
                OwnerAction::Send { to, frame } => self.deliver(to, frame),
                OwnerAction::Bot {
                    conversation,
                    site,
                    visitor,
                    text,
                    failed_turns,
                } => self.bot_turn(conversation, site, visitor, text, failed_turns),
                OwnerAction::Hello { to, frame } => self.deliver_hello(to, frame),
                OwnerAction::Audit(event) => record(event),
                OwnerAction::Replay {
                    to,
                    conversation,
                    after,
                    up_to,
                } => self.replay(&to, conversation, after, up_to),
                OwnerAction::Dispatch(event) => self.send(
                    super::dispatcher_shard(self.shard_count),
                    ShardMessage::Dispatch(event),
                ),
                OwnerAction::Track {
                    session,
                    conversation,
                } => {
                    let message = ShardMessage::Track {
                        session: session.session,
                        conversation,
                    };
                    if session.shard == self.shard {
                        self.on_mesh(ShardId(self.shard), message);
                    } else {
                        self.send(session.shard, message);
                    }
                }
                OwnerAction::Load {
                    conversation,
                    event,
                } => {
                    let loaded = self
                        .reader
                        .read()
                        .and_then(|view| view.conversation(conversation));
                    match loaded {
                        Ok(Some(meta)) => {
                            self.owner.borrow_mut().insert_loaded(meta);
                            let more = self.owner.borrow_mut().handle(*event, monotonic_ms());
                            queue.extend(more);
                        }
                        Ok(None) => {
                            if let OwnerEvent::Agent { session, .. } = *event {
                                self.deliver(
                                    session,
                                    Arc::from(protocol::error_frame(
                                        "unknown_conversation",
                                        &format!("no conversation {}", conversation.0),
                                    )),
                                );
                            }
                        }
                        Err(err) => {
                            tracing::error!(shard = self.shard, %conversation, error = %err, "cannot load conversation");
                        }
                    }
                }
                OwnerAction::LoadVisitor { key, event } => {
                    let stored = self
                        .reader
                        .read()
                        .and_then(|view| look_up_visitor(&view, &key));
                    let mut event = *event;
                    match (stored, &mut event) {
                        (Ok(found), OwnerEvent::VisitorAttach { stored, .. }) => {
                            *stored = Some(Box::new(found));
                            let more = self.owner.borrow_mut().handle(event, monotonic_ms());
                            queue.extend(more);
                        }
                        (Err(err), OwnerEvent::VisitorAttach { session, .. }) => {
                            tracing::error!(shard = self.shard, error = %err, "cannot look up a visitor");
                            self.deliver_hello(
                                *session,
                                Arc::from(protocol::error_frame(
                                    "storage_error",
                                    "cannot look up the visitor; reconnect later",
                                )),
                            );
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    fn metrics(&self) -> &ShardMetrics {
        self.metrics.shard(self.shard)
    }
}

/// Queues a frame for a session of this shard.
fn push(arena: &mut Arena, session: SessionId, frame: Arc<str>, kind: Delivery) {
    let frame = Outbound::Text(frame);
    match kind {
        Delivery::Live => arena.push(session, frame),
        Delivery::Hello => arena.push_hello(session, frame),
        Delivery::Replay => arena.push_replay(session, frame),
        Delivery::ReplayBegin => {
            arena.begin_replay(session);
            None
        }
        Delivery::ReplayEnd => {
            arena.end_replay(session);
            None
        }
        Delivery::Refusal => arena.push_refusal(session, frame),
    };
}
