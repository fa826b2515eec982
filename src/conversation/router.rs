//! The shard-local driver of conversations: runs the [`Owner`] state machine
//! (every shard) and the [`Dispatcher`] (one shard), executes their actions and
//! feeds results back.
//!
//! - Storage: operations are queued and applied by a committer task in group
//!   commits: it waits `commit_window` after the first pending operation (or
//!   until `max_batch` are pending), then applies the whole batch in ONE LMDB
//!   transaction on glommio's blocking thread (pinned next to the shard), so
//!   an fsync never stalls the event loop. While a commit is in flight the
//!   next batch accumulates. Reads (replay, metadata) use a [`StoreReader`]
//!   on the shard's thread; LMDB readers never wait for the writer.
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

/// How long a streamed resume replay waits for a recipient that does not read before it sends
/// its next chunk anyway (the backlog bound then closes that session with 1013).
const REPLAY_STALL: Duration = Duration::from_secs(5);

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
}

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
    config: Arc<Config>,
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

/// The histograms the router records: written only on this shard, published by its tick.
struct RouterHistograms {
    relay_latency: Recorder,
    bot_latency: Recorder,
    commit_latency: Recorder,
    commit_batch_size: Recorder,
}

impl RouterHistograms {
    fn new(metrics: &Metrics, shard: usize) -> RouterHistograms {
        let histograms = metrics.histograms(shard);
        RouterHistograms {
            relay_latency: histograms.recorder(Family::RelayLatency),
            bot_latency: histograms.recorder(Family::BotLatency),
            commit_latency: histograms.recorder(Family::CommitLatency),
            commit_batch_size: histograms.recorder(Family::CommitBatchSize),
        }
    }

    fn publish(&mut self) {
        self.relay_latency.publish();
        self.bot_latency.publish();
        self.commit_latency.publish();
        self.commit_batch_size.publish();
    }
}

/// The shard's bot: the guard handlers (risk control: masking, blocking,
/// flood) that run on every visitor message before it is stored, the answer
/// handlers that run on messages of conversations the bot still holds, and
/// the shard's intent engine.
struct Bot {
    guards: RefCell<Chain>,
    answers: RefCell<Chain>,
    engine: Option<Rc<IntentEngine>>,
}

impl Bot {
    fn open(
        config: &Config,
        shard: usize,
        core: usize,
        registry: &Registry,
        metrics: &Metrics,
    ) -> Result<Option<Bot>, RouterError> {
        let names: Vec<&str> = config.bot.handlers.iter().map(|h| h.as_str()).collect();
        let (guard_names, answer_names): (Vec<&str>, Vec<&str>) =
            names.iter().partition(|name| **name == "risk_control");
        let build = |names: &[&str]| {
            let specs: Vec<HandlerSpec<'_>> = names.iter().map(|n| HandlerSpec::new(n)).collect();
            Chain::from_specs(registry, &specs, &config.bot, &config.risk_control)
                .map_err(|err| RouterError::Bot(err.to_string()))
        };
        let guards = build(&guard_names)?;
        let answers = build(&answer_names)?;
        let engine = if config.inference.enabled && !answers.is_empty() {
            let started = std::time::Instant::now();
            let mut settings = EngineSettings::from_config(config);
            settings.worker.metrics = Some(WorkerMetrics::new(metrics.clone(), shard));
            let engine = IntentEngine::open(&settings, shard, core)
                .map_err(|err| RouterError::Bot(err.to_string()))?;
            let load_ms = started.elapsed().as_secs_f64() * 1000.0;
            match engine.version() {
                Some(kb_version) => tracing::info!(
                    shard,
                    core,
                    load_ms,
                    kb_version,
                    "intent engine ready (the models load in the background; lexical answers until then)"
                ),
                None => tracing::warn!(
                    shard,
                    core,
                    load_ms,
                    "intent engine ready, but no knowledge base is imported: the bot answers \
                     every question with the fallback; import one with `switchboard kb import FILE`"
                ),
            }
            Some(Rc::new(engine))
        } else {
            None
        };
        if guards.is_empty() && engine.is_none() {
            return Ok(None);
        }
        Ok(Some(Bot {
            guards: RefCell::new(guards),
            answers: RefCell::new(answers),
            engine,
        }))
    }
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
        let store = ShardStore::open(
            &config.storage.dir,
            shard,
            StoreOptions {
                map_size: config.storage.map_size as usize,
                max_map_size: config.storage.max_map_size as usize,
                durability,
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
            config,
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
            let ttl = ticker.config.visitors.empty_conversation_ttl;
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
                    bot.answers.borrow_mut().prune(now);
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

    /// Publishes what the scrape reads but the hot path does not count: the histograms (see
    /// [`crate::metrics::histogram`]), the storage size and the inference queue depth.
    fn publish_metrics(&self) {
        self.histograms.borrow_mut().publish();
        let counters = self.metrics();
        let size = self.reader.size();
        ShardMetrics::set(&counters.storage_used_bytes, size.used_bytes);
        ShardMetrics::set(&counters.storage_map_bytes, size.map_bytes);
        ShardMetrics::set(
            &counters.inference_queue_depth,
            self.inference_queue() as u64,
        );
    }

    /// Finds the open conversations in which no message was ever stored, that no agent
    /// holds and that were idle for `ttl`, and lets the owner delete them (it skips
    /// those someone is connected to).
    fn expire_empty_conversations(&self, ttl: Duration) {
        // `updated_ms` is stored wall-clock data: compare it with the wall clock.
        let cutoff = now_ms().saturating_sub(ttl.as_millis() as u64);
        let Some(open) = self.open_conversations() else {
            return;
        };
        let empty: Vec<ConversationId> = open
            .into_iter()
            .filter(|c| {
                c.last_seq == 0
                    && c.updated_ms <= cutoff
                    && !matches!(c.state, crate::store::ConversationState::Assigned { .. })
            })
            .map(|c| c.id)
            .collect();
        if !empty.is_empty() {
            tracing::info!(
                shard = self.shard,
                count = empty.len(),
                "expiring idle empty conversations"
            );
        }
        for conversation in empty {
            self.on_owner(OwnerEvent::ExpireEmpty { conversation });
        }
    }

    /// The shard's open conversations from storage; a read failure is logged and gives `None`.
    fn open_conversations(&self) -> Option<Vec<crate::store::Conversation>> {
        match self
            .reader
            .read()
            .and_then(|view| view.open_conversations())
        {
            Ok(open) => Some(open),
            Err(err) => {
                tracing::error!(shard = self.shard, error = %err, "cannot list open conversations");
                None
            }
        }
    }

    fn restore(&self) {
        let Some(open) = self.open_conversations() else {
            return;
        };
        let mut restored = 0;
        for conversation in open {
            let assigned = match conversation.state {
                crate::store::ConversationState::Queued => None,
                crate::store::ConversationState::Assigned { agent } => Some(agent),
                _ => continue,
            };
            restored += 1;
            self.send(
                super::dispatcher_shard(self.shard_count),
                ShardMessage::Dispatch(DispatchEvent::Restore {
                    conversation: dispatch::ConversationId(conversation.id.0),
                    owner: self.shard,
                    assigned,
                }),
            );
        }
        if restored > 0 {
            tracing::info!(
                shard = self.shard,
                restored,
                "re-queued conversations after restart"
            );
        }
    }

    /// This shard's index.
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
                let next = self.outgoing[to].borrow_mut().pop_front();
                let Some(message) = next else { break };
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
                    let stored = self.reader.read().and_then(|view| {
                        Ok(StoredVisitor {
                            secret_hash: view.visitor_secret(&key.site, &key.visitor)?,
                            conversation: view.conversation_of_visitor(&key.site, &key.visitor)?,
                        })
                    });
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

    /// Runs the guard handlers on a visitor message before it is stored:
    /// returns the text to store (card numbers masked), or `None` when the
    /// message is refused (the sender gets an error frame).
    fn guard(&self, key: &VisitorKey, session: SessionRef, text: String) -> Option<String> {
        let Some(bot) = &self.bot else {
            return Some(text);
        };
        let mut guards = bot.guards.borrow_mut();
        if guards.is_empty() {
            return Some(text);
        }
        let mut ctx = BotContext::new(0, &key.site, &key.visitor, text);
        ctx.now_ms = monotonic_ms();
        match guards.run(&mut ctx, 0).0 {
            Verdict::Block { code, message } => {
                ShardMetrics::add(&self.metrics().bot_blocked, 1);
                self.deliver_frame(
                    session,
                    Arc::from(protocol::error_frame(code, &message)),
                    Delivery::Refusal,
                );
                None
            }
            _ => Some(ctx.text),
        }
    }

    /// Asks the bot about a stored visitor message, without blocking the
    /// shard: inference runs on the shard's worker thread and the verdict
    /// comes back to the owner as an event.
    fn bot_turn(
        &self,
        conversation: ConversationId,
        site: Arc<str>,
        visitor: Arc<str>,
        text: String,
        failed_turns: u32,
    ) {
        let Some(router) = self.me.borrow().upgrade() else {
            return;
        };
        glommio::spawn_local(async move {
            let started = std::time::Instant::now();
            let verdict = router
                .decide(conversation, &site, &visitor, text, failed_turns)
                .await;
            router
                .histograms
                .borrow_mut()
                .bot_latency
                .record_duration(started.elapsed());
            router.on_owner(OwnerEvent::BotVerdict {
                conversation,
                verdict,
            });
        })
        .detach();
    }

    async fn decide(
        &self,
        conversation: ConversationId,
        site: &str,
        visitor: &str,
        text: String,
        failed_turns: u32,
    ) -> BotOutcome {
        let Some(bot) = &self.bot else {
            return BotOutcome::Silent;
        };
        let counters = self.metrics();
        let mut ctx = BotContext::new(conversation.0, site, visitor, text);
        ctx.failed_turns = failed_turns;
        ctx.now_ms = monotonic_ms();
        let (mut verdict, mut next) = bot.answers.borrow_mut().run(&mut ctx, 0);
        if verdict == Verdict::NeedIntent {
            if let Some(engine) = &bot.engine {
                // Over the site's query rate, or while the shard sheds load, the bot answers
                // with the lexical match: the visitor is still served, the model is not used.
                let lexical = if self.level.get() >= Level::Shed {
                    true
                } else if self
                    .bot_queries
                    .borrow_mut()
                    .try_take(&Arc::<str>::from(site), monotonic_ms(), 1.0)
                    .is_err()
                {
                    ShardMetrics::add(&counters.bot_rate_limited, 1);
                    true
                } else {
                    false
                };
                let recognised = if lexical {
                    engine.recognise_lexically(&ctx.text)
                } else {
                    engine.recognise(&ctx.text).await
                };
                if let Some(result) = recognised {
                    match result.cache {
                        CacheOutcome::HotHit => ShardMetrics::add(&counters.bot_hot_cache_hits, 1),
                        CacheOutcome::EmbeddingHit => {
                            ShardMetrics::add(&counters.bot_embedding_cache_hits, 1)
                        }
                        CacheOutcome::Miss => ShardMetrics::add(&counters.bot_cache_misses, 1),
                    }
                    ctx.intent = Some(result.into());
                }
            }
            (verdict, next) = bot.answers.borrow_mut().run(&mut ctx, next);
        }
        let _ = next;
        if let Verdict::Later(later) = verdict {
            // A handler waits for something outside the process (docs/plugins.md): its answer
            // comes from another thread, awaited here without blocking the shard.
            let answer = async { Ok(later.answer().await) };
            verdict = match glommio::timer::timeout(crate::bot::later::LATER_LIMIT, answer).await {
                Ok(Some(Verdict::Later(_))) | Ok(None) | Err(_) => Verdict::Continue,
                Ok(Some(answer)) => answer,
            };
        }
        if matches!(
            verdict,
            Verdict::Continue | Verdict::NeedIntent | Verdict::Block { .. }
        ) {
            verdict = Verdict::fallback(&ctx);
        }
        let failed = verdict.next_failed_turns(failed_turns);
        match verdict {
            Verdict::Reply { text, degraded, .. } => {
                ShardMetrics::add(&counters.bot_replies, 1);
                if degraded {
                    ShardMetrics::add(&counters.bot_degraded, 1);
                }
                BotOutcome::Reply {
                    text,
                    failed_turns: failed,
                }
            }
            Verdict::Handoff { reason } => {
                ShardMetrics::add(&counters.bot_handoffs, 1);
                tracing::debug!(%conversation, reason = reason.as_str(), "bot hands off");
                BotOutcome::Handoff
            }
            _ => BotOutcome::Silent,
        }
    }

    fn metrics(&self) -> &ShardMetrics {
        self.metrics.shard(self.shard)
    }

    /// Sends stored messages `(after, up_to]` of a conversation to sessions, streamed from
    /// storage in chunks of `[limits] replay_chunk`: the first chunk at once, the rest by a task
    /// that yields between chunks and waits while its recipients' queues are full, so a resume
    /// from seq 0 of a long conversation neither stalls the shard nor piles its history up in
    /// memory. Live frames for the recipients wait behind a streamed replay (`ReplayBegin` /
    /// `ReplayEnd`), so every session still sees each seq once and in order.
    fn replay(&self, to: &[SessionRef], conversation: ConversationId, after: u64, up_to: u64) {
        let chunk = self.config.limits.replay_chunk;
        let Some(sent) = self.replay_chunk(to, conversation, after, up_to, chunk) else {
            return;
        };
        if sent >= up_to {
            return;
        }
        let Some(router) = self.me.borrow().upgrade() else {
            return;
        };
        let to = to.to_vec();
        for session in &to {
            self.deliver_frame(*session, Arc::from(""), Delivery::ReplayBegin);
        }
        glommio::spawn_local(async move {
            let mut sent = sent;
            while sent < up_to {
                glommio::executor().yield_now().await;
                router.wait_for_room(&to, chunk).await;
                match router.replay_chunk(&to, conversation, sent, up_to, chunk) {
                    Some(next) if next > sent => sent = next,
                    _ => break,
                }
            }
            for session in &to {
                router.deliver_frame(*session, Arc::from(""), Delivery::ReplayEnd);
            }
        })
        .detach();
    }

    /// Sends the stored messages `(after, up_to]`, at most `chunk` of them, read in one read
    /// transaction. Returns the seq reached (`up_to` once everything was sent), or `None` when
    /// storage cannot be read (logged; the client's next resume asks again).
    fn replay_chunk(
        &self,
        to: &[SessionRef],
        conversation: ConversationId,
        after: u64,
        up_to: u64,
        chunk: usize,
    ) -> Option<u64> {
        let view = match self.reader.read() {
            Ok(view) => view,
            Err(err) => {
                tracing::error!(shard = self.shard, error = %err, "replay: cannot read");
                return None;
            }
        };
        let limit = (up_to.saturating_sub(after) as usize).min(chunk);
        let messages = match view.messages_after(conversation, after, limit) {
            Ok(messages) => messages,
            Err(err) => {
                tracing::error!(shard = self.shard, error = %err, "replay: cannot read messages");
                return None;
            }
        };
        let mut frames = Vec::with_capacity(limit);
        let mut reached = after;
        let mut complete = true;
        for record in messages {
            match record {
                Ok(record) if record.seq() <= up_to => {
                    reached = record.seq();
                    frames.push(Arc::<str>::from(message_frame(
                        conversation,
                        record.seq(),
                        record.from(),
                        record.name(),
                        record.text(),
                        record.ts_ms(),
                    )))
                }
                Ok(_) => break,
                Err(err) => {
                    tracing::error!(shard = self.shard, error = %err, "replay: damaged record");
                    complete = false;
                    break;
                }
            }
        }
        drop(view);
        for session in to {
            for frame in &frames {
                self.deliver_frame(*session, frame.clone(), Delivery::Replay);
            }
        }
        // Fewer than asked for means nothing more is stored up to `up_to`.
        match complete {
            true if frames.len() < limit => Some(up_to),
            true => Some(reached),
            false => None,
        }
    }

    /// Waits (polling each millisecond) until every recipient of a streamed replay has room for
    /// another chunk: a session of this shard until fewer than `chunk` frames wait to be written
    /// to it (or it is gone; the live frames held behind the replay do not count: they wait for
    /// it to end), a session of another shard until the mesh queue toward that shard is under
    /// half its bound. Gives up after [`REPLAY_STALL`]: a client that stops reading is then
    /// closed by its backlog bound or its idle timeout, not held here.
    async fn wait_for_room(&self, to: &[SessionRef], chunk: usize) {
        let started = std::time::Instant::now();
        let half_mesh = (self.config.limits.max_queued_per_shard / 2).max(1);
        loop {
            let full = to.iter().any(|session| {
                if session.shard == self.shard {
                    self.arena
                        .borrow()
                        .get(session.session)
                        .is_some_and(|record| record.outbox_len() >= chunk)
                } else {
                    self.queued_to(session.shard) >= half_mesh
                }
            });
            if !full || started.elapsed() >= REPLAY_STALL {
                return;
            }
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }

    /// `attaching_agent` is the id and display name of the agent whose attach caused these
    /// actions (its `AgentHello` greets it by name).
    fn run_dispatch(
        &self,
        actions: Vec<DispatchAction>,
        attaching_agent: Option<(String, String)>,
    ) {
        for action in actions {
            match action {
                DispatchAction::Assigned {
                    conversation,
                    owner,
                    agent,
                    agent_name,
                    sessions,
                } => self.send(
                    owner,
                    ShardMessage::Owner(OwnerEvent::Assigned {
                        conversation: ConversationId(conversation.0),
                        agent,
                        agent_name,
                        sessions: sessions
                            .into_iter()
                            .map(SessionRef::from_dispatch)
                            .collect(),
                    }),
                ),
                DispatchAction::Requeued {
                    conversation,
                    owner,
                    ..
                } => self.send(
                    owner,
                    ShardMessage::Owner(OwnerEvent::Requeued {
                        conversation: ConversationId(conversation.0),
                    }),
                ),
                DispatchAction::QueuePositions { updates } => {
                    for (conversation, owner, position) in updates {
                        self.send(
                            owner,
                            ShardMessage::Owner(OwnerEvent::QueuePosition {
                                conversation: ConversationId(conversation.0),
                                position,
                            }),
                        );
                    }
                }
                DispatchAction::QueueSnapshot {
                    sessions,
                    queue,
                    waited_ms,
                } => {
                    let frame: Arc<str> = Arc::from(
                        serde_json::json!({
                            "type": "queue",
                            "conversations": queue.iter().map(|c| c.0).collect::<Vec<_>>(),
                            "waited_ms": waited_ms,
                        })
                        .to_string(),
                    );
                    for session in sessions {
                        self.deliver(SessionRef::from_dispatch(session), frame.clone());
                    }
                }
                DispatchAction::Transferred {
                    conversation,
                    owner,
                    to,
                    to_name,
                    sessions,
                    ..
                } => self.send(
                    owner,
                    ShardMessage::Owner(OwnerEvent::Transferred {
                        conversation: ConversationId(conversation.0),
                        to,
                        to_name,
                        sessions: sessions
                            .into_iter()
                            .map(SessionRef::from_dispatch)
                            .collect(),
                    }),
                ),
                DispatchAction::NoAgents { conversations } => {
                    // One message per owner shard, in the dispatcher's order.
                    let mut by_owner: Vec<(usize, Vec<ConversationId>)> = Vec::new();
                    for (conversation, owner) in conversations {
                        let conversation = ConversationId(conversation.0);
                        match by_owner.iter_mut().find(|(o, _)| *o == owner) {
                            Some((_, list)) => list.push(conversation),
                            None => by_owner.push((owner, vec![conversation])),
                        }
                    }
                    for (owner, conversations) in by_owner {
                        self.send(
                            owner,
                            ShardMessage::Owner(OwnerEvent::NoAgents { conversations }),
                        );
                    }
                }
                DispatchAction::Rejected {
                    session,
                    code,
                    message,
                } => self.deliver(
                    SessionRef::from_dispatch(session),
                    Arc::from(protocol::error_frame(code, &message)),
                ),
                DispatchAction::AgentHello {
                    session,
                    conversations,
                    queue,
                    waited_ms,
                    status,
                } => {
                    let session = SessionRef::from_dispatch(session);
                    let (agent, name) = attaching_agent.clone().unwrap_or_default();
                    let hello = serde_json::json!({
                        "type": "hello",
                        "agent": name,
                        "id": &agent,
                        "conversations": conversations.iter().map(|c| c.0).collect::<Vec<_>>(),
                        "queue": queue.iter().map(|c| c.0).collect::<Vec<_>>(),
                        "queue_waited_ms": waited_ms,
                        "status": match status {
                            dispatch::AgentStatus::Online => "online",
                            dispatch::AgentStatus::Away => "away",
                        },
                    });
                    self.deliver_hello(session, Arc::from(hello.to_string()));
                    for conversation in conversations {
                        let conversation = ConversationId(conversation.0);
                        self.send(
                            conversation.shard(),
                            ShardMessage::Owner(OwnerEvent::AgentSubscribe {
                                conversation,
                                agent: agent.clone(),
                                session,
                            }),
                        );
                    }
                }
            }
        }
    }

    /// This shard's blocking-pool jobs (see [`crate::blocking`]).
    pub fn blocking_jobs(&self) -> &Rc<crate::blocking::BlockingJobs> {
        &self.jobs
    }

    /// For shutdown: waits (up to `limit`) until the operations queued for the group commit
    /// are committed, then stops the committer and every new blocking job of this shard, and
    /// waits for the job in flight. After this no blocking job of the shard runs, so its
    /// executor may end.
    pub async fn finish_commits(&self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        while (self.committing.get() || !self.pending.borrow().is_empty())
            && std::time::Instant::now() < deadline
        {
            glommio::timer::sleep(Duration::from_millis(2)).await;
        }
        let left = self.pending.borrow().len();
        if left > 0 {
            tracing::warn!(
                shard = self.shard,
                left,
                "stopping with operations not committed (none was acked)"
            );
        }
        self.jobs.close();
        self.jobs.drained().await;
    }

    fn queue_op(&self, op: Op, completion: Completion) {
        let mut pending = self.pending.borrow_mut();
        pending.push((op, completion, std::time::Instant::now()));
        ShardMetrics::set(&self.metrics().commit_pending, pending.len() as u64);
        if pending.len() == 1 && !self.committing.get() {
            let _ = self.doorbell.try_send(());
        }
    }

    async fn commit_loop(&self) {
        let Some(doorbell) = self.doorbell_rx.borrow_mut().take() else {
            return;
        };
        let window = self.config.storage.commit_window;
        let max_batch = self.config.storage.max_batch.max(1);
        while doorbell.recv().await.is_some() {
            // Only the first batch after an idle period waits for the window;
            // operations that queued up during a commit have waited already.
            let mut first = true;
            loop {
                if self.pending.borrow().is_empty() {
                    break;
                }
                self.committing.set(true);
                // The cost a queued message sees: the window (if waited) and the write.
                let cycle = std::time::Instant::now();
                if first && self.pending.borrow().len() < max_batch && !window.is_zero() {
                    glommio::timer::sleep(window).await;
                }
                let batch: Vec<(Op, Completion, std::time::Instant)> = {
                    let mut pending = self.pending.borrow_mut();
                    let take = pending.len().min(max_batch);
                    let batch = pending.drain(..take).collect();
                    ShardMetrics::set(&self.metrics().commit_pending, pending.len() as u64);
                    batch
                };
                let mut queued_at = Vec::with_capacity(batch.len());
                let (ops, completions): (Vec<Op>, Vec<Completion>) = batch
                    .into_iter()
                    .map(|(op, completion, at)| {
                        queued_at.push(at);
                        (op, completion)
                    })
                    .unzip();
                if self.full.borrow().refuse(std::time::Instant::now()) {
                    // Refused at once, not queued: the sender learns now and re-sends later.
                    let failure = CommitFailure {
                        code: "storage_full",
                        message: "storage is full; re-send later with the same id".into(),
                    };
                    for (op, completion) in ops.into_iter().zip(completions) {
                        self.on_owner(OwnerEvent::Committed {
                            completion,
                            op,
                            outcome: Err(failure.clone()),
                        });
                    }
                    first = false;
                    glommio::yield_if_needed().await;
                    continue;
                }
                if self.jobs.is_closed() {
                    // The shard is stopping (see `finish_commits`): these ops were never
                    // acked; their clients resend them after the restart.
                    self.committing.set(false);
                    return;
                }
                let store = self
                    .store
                    .borrow_mut()
                    .take()
                    .expect("only the committer takes the store");
                let started = std::time::Instant::now();
                // No await since the `is_closed` check: the job set cannot refuse.
                let (store, ops, result) = self
                    .jobs
                    .run(move || {
                        let mut store = store;
                        let result = store.apply(&ops);
                        (store, ops, result)
                    })
                    .await
                    .expect("the job set was open just before, with no await in between");
                let counters = self.metrics();
                ShardMetrics::add(&counters.store_commits, 1);
                ShardMetrics::add(&counters.store_commit_ops, ops.len() as u64);
                ShardMetrics::add(
                    &counters.store_commit_micros,
                    started.elapsed().as_micros() as u64,
                );
                {
                    let mut histograms = self.histograms.borrow_mut();
                    histograms.commit_batch_size.record(ops.len() as u64);
                    for at in &queued_at {
                        histograms.commit_latency.record_duration(at.elapsed());
                    }
                }
                let mut cost = self.commit_cost.get();
                let cycle_micros = cycle.elapsed().as_micros() as u64;
                ShardMetrics::set(&counters.commit_recent_micros, cost.record(cycle_micros));
                self.commit_cost.set(cost);
                *self.store.borrow_mut() = Some(store);
                first = false;
                match result {
                    Ok(outcomes) => {
                        if self.full.borrow_mut().committed() {
                            tracing::warn!(shard = self.shard, "storage writable again");
                        }
                        for (((op, completion), outcome), at) in ops
                            .into_iter()
                            .zip(completions)
                            .zip(outcomes)
                            .zip(queued_at)
                        {
                            let relayed = matches!(
                                completion,
                                Completion::VisitorMessage { .. } | Completion::AgentMessage { .. }
                            );
                            self.on_owner(OwnerEvent::Committed {
                                completion,
                                op,
                                outcome: Ok(outcome),
                            });
                            // The owner has now queued the ack and the relay frames.
                            if relayed {
                                self.histograms
                                    .borrow_mut()
                                    .relay_latency
                                    .record_duration(at.elapsed());
                            }
                        }
                    }
                    Err(err) => {
                        let failure = CommitFailure {
                            code: if err.is_full() {
                                "storage_full"
                            } else {
                                "storage_error"
                            },
                            message: err.to_string(),
                        };
                        if err.is_full() {
                            let retry_in = self.full.borrow_mut().full(std::time::Instant::now());
                            tracing::error!(shard = self.shard, error = %err, retry_in_ms = retry_in.as_millis() as u64, "storage full: refusing writes until a retry succeeds");
                        } else {
                            tracing::error!(shard = self.shard, error = %err, "group commit failed");
                        }
                        for (op, completion) in ops.into_iter().zip(completions) {
                            self.on_owner(OwnerEvent::Committed {
                                completion,
                                op,
                                outcome: Err(failure.clone()),
                            });
                        }
                    }
                }
            }
            self.committing.set(false);
            // Ops queued while we were finishing rang nothing; loop again if any.
            if !self.pending.borrow().is_empty() {
                let _ = self.doorbell.try_send(());
            }
        }
    }
}

/// With `durability = "batch"`, a thread syncs the data file every
/// `sync_interval`, off the shard and off the committer.
fn start_flusher(store: &ShardStore, interval: Duration, shard: usize) {
    let flusher = match store.flusher() {
        Ok(flusher) => flusher,
        Err(err) => {
            tracing::error!(shard, error = %err, "cannot start the batch flusher");
            return;
        }
    };
    let _ = std::thread::Builder::new()
        .name(format!("switchboard-flush-{shard}"))
        .spawn(move || loop {
            std::thread::sleep(interval);
            if let Err(err) = flusher.flush() {
                tracing::error!(shard, error = %err, "batch flush failed");
            }
        });
}

/// Appends an agent's action on a conversation to the audit chain (the sink logs it too).
fn record(event: AuditEvent) {
    crate::audit::emit(event);
}

/// Whether a dispatcher event is an agent's action whose outcome is audited.
fn auditable(event: &DispatchEvent) -> bool {
    matches!(
        event,
        DispatchEvent::Accept { .. } | DispatchEvent::Transfer { .. }
    )
}

/// The audit records of an agent's `accept` or `transfer` once the dispatcher has handled
/// it: what it carried out (`conversation_accepted`, `conversation_transferred` with `from`
/// and `to`), or `access_denied` when a role without `TransferAny` tried to move a
/// conversation `held_by` someone else. Other refusals (queue races, capacity) are not
/// security events and leave no record. Pure, so it is unit-tested.
fn dispatch_audit(
    event: &DispatchEvent,
    held_by: Option<&str>,
    actions: &[DispatchAction],
) -> Vec<AuditEvent> {
    let mut records = Vec::new();
    match event {
        DispatchEvent::Accept {
            agent,
            conversation,
            ..
        } => {
            let taken = actions.iter().any(|action| {
                matches!(action, DispatchAction::Assigned { conversation: c, agent: a, .. }
                    if c == conversation && a == agent)
            });
            if taken {
                records.push(
                    AuditEvent::new("conversation_accepted", agent)
                        .target(conversation.0.to_string()),
                );
            }
        }
        DispatchEvent::Transfer {
            from: requester,
            conversation,
            role,
            ..
        } => {
            let done = actions.iter().find_map(|action| match action {
                DispatchAction::Transferred {
                    conversation: c,
                    from,
                    to,
                    ..
                } if c == conversation => Some((from, to)),
                _ => None,
            });
            if let Some((from, to)) = done {
                records.push(
                    AuditEvent::new("conversation_transferred", requester)
                        .target(conversation.0.to_string())
                        .detail("from", from.as_str())
                        .detail("to", to.as_str())
                        .detail("role", role.as_str()),
                );
            } else if held_by.is_some_and(|holder| holder != requester)
                && !crate::auth::rbac::allows(*role, crate::auth::rbac::Action::TransferAny)
            {
                records.push(
                    AuditEvent::new("access_denied", requester)
                        .target(conversation.0.to_string())
                        .detail("role", role.as_str())
                        .detail("action", "TransferAny"),
                );
            }
        }
        _ => {}
    }
    records
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::rbac::Role;

    fn sess() -> dispatch::SessionRef {
        dispatch::SessionRef {
            shard: 0,
            session: 1,
        }
    }

    fn transfer(requester: &str, role: Role) -> DispatchEvent {
        DispatchEvent::Transfer {
            from: requester.into(),
            session: sess(),
            conversation: dispatch::ConversationId(9),
            to: "carol".into(),
            role,
        }
    }

    #[test]
    fn accepts_and_transfers_are_audited_only_when_carried_out() {
        let accept = DispatchEvent::Accept {
            agent: "alice".into(),
            session: sess(),
            conversation: dispatch::ConversationId(9),
        };
        let assigned = DispatchAction::Assigned {
            conversation: dispatch::ConversationId(9),
            owner: 0,
            agent: "alice".into(),
            agent_name: "Alice".into(),
            sessions: vec![sess()],
        };
        let records = dispatch_audit(&accept, None, std::slice::from_ref(&assigned));
        assert_eq!(records.len(), 1);
        assert_eq!(
            (
                records[0].kind.as_str(),
                records[0].actor.as_str(),
                records[0].target.as_str()
            ),
            ("conversation_accepted", "alice", "9")
        );
        let refused = DispatchAction::Rejected {
            session: sess(),
            code: "not_queued",
            message: "taken".into(),
        };
        assert!(dispatch_audit(&accept, None, std::slice::from_ref(&refused)).is_empty());

        // A supervisor moves alice's conversation: the supervisor is the actor.
        let moved = DispatchAction::Transferred {
            conversation: dispatch::ConversationId(9),
            owner: 0,
            from: "alice".into(),
            to: "carol".into(),
            to_name: "Carol".into(),
            sessions: vec![],
            from_sessions: vec![],
        };
        let records = dispatch_audit(
            &transfer("sue", Role::Supervisor),
            Some("alice"),
            std::slice::from_ref(&moved),
        );
        assert_eq!(records.len(), 1);
        let record = &records[0];
        assert_eq!(record.kind, "conversation_transferred");
        assert_eq!(record.actor, "sue");
        assert_eq!(record.target, "9");
        assert_eq!(record.detail["from"], "alice");
        assert_eq!(record.detail["to"], "carol");
        assert_eq!(record.detail["role"], "supervisor");

        // An agent trying to move someone else's conversation is refused by role: audited.
        let denied = DispatchAction::Rejected {
            session: sess(),
            code: "not_assigned",
            message: "no".into(),
        };
        let records = dispatch_audit(
            &transfer("bob", Role::Agent),
            Some("alice"),
            std::slice::from_ref(&denied),
        );
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].kind, "access_denied");
        assert_eq!(records[0].actor, "bob");
        // Its own conversation refused for another reason (target offline): no record.
        assert!(dispatch_audit(
            &transfer("alice", Role::Agent),
            Some("alice"),
            std::slice::from_ref(&denied)
        )
        .is_empty());
        // Other events are not agent actions.
        assert!(dispatch_audit(&DispatchEvent::Tick, None, &[assigned]).is_empty());
    }
}
