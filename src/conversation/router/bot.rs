//! The bot's part of the shard driver: the guard handlers run on a visitor message before it is
//! stored, and a bot turn asks the shard's bot chain (inference on the shard's worker thread) about
//! a stored message and feeds the verdict back to the owner as [`OwnerEvent::BotVerdict`].
//!
//! The bot turn's policy is the pure [`BotTurn`] state machine; this file only does its I/O.
//! Which gray-release variant's answer chain runs is the pure [`VariantSplit::resolve`]: the
//! driver reads the variant stored with the conversation and, at its first bot turn, hands the
//! assigned one back with the verdict for the owner to store.
//!
//! Invariants: the shard thread never waits for inference; a verdict arrives as an event. A
//! conversation's variant, once assigned on this shard, is the one every later turn uses: from
//! [`Bot::unrecorded`] until its record is seen in storage, from storage after.

use std::collections::HashMap;

use super::*;
use crate::bot::gray::VariantSplit;
use crate::conversation::bot_turn::{Action, BotTurn, ShardConditions, TurnCounts};
use crate::engine::intent::Cascade;

/// How long an assignment waits in [`Bot::unrecorded`] for its record to be stored (a commit
/// refused for a full store never stores it; the next turn then assigns again).
const UNRECORDED_FOR_MS: u64 = 60_000;

/// The shard's bot: the guard handlers (risk control: masking, blocking,
/// flood) that run on every visitor message before it is stored, the answer
/// chains of the gray-release variants that run on messages of conversations
/// the bot still holds, and the shard's intent engine.
pub(super) struct Bot {
    pub(super) guards: RefCell<Chain>,
    pub(super) variants: RefCell<VariantChains>,
    pub(super) engine: Option<Rc<IntentEngine>>,
    /// Variants assigned by a bot turn of this shard whose record was not seen in storage yet
    /// (it is stored with the turn's answer): the variant, and when it was assigned
    /// (monotonic ms).
    pub(super) unrecorded: RefCell<HashMap<ConversationId, (Arc<str>, u64)>>,
}

/// The answer chains of the gray-release variants (`[[bot.variants]]`, or the one `default`
/// variant of `[bot]`) and the split between them.
pub(super) struct VariantChains {
    pub(super) split: VariantSplit,
    /// One per variant, in the split's order.
    chains: Vec<Chain>,
    /// Each variant's encoders (its `model`), in the split's order.
    cascades: Vec<Cascade>,
    /// Each variant's slot in [`crate::metrics::ShardMetrics::variants`] (`None`: no slot left).
    slots: Vec<Option<usize>>,
}

impl VariantChains {
    /// Whether no variant has an answer handler.
    pub(super) fn is_empty(&self) -> bool {
        self.chains.iter().all(Chain::is_empty)
    }

    /// The index of variant `name`, or, when it is not configured (any more), of the variant
    /// the hash picks for `conversation`.
    fn index(&self, name: &str, conversation: ConversationId) -> usize {
        self.split
            .position(name)
            .unwrap_or_else(|| self.split.pick(conversation))
    }

    /// The chain of the variant that serves `conversation` ([`Self::index`]).
    fn chain(&mut self, name: &str, conversation: ConversationId) -> &mut Chain {
        let index = self.index(name, conversation);
        &mut self.chains[index]
    }

    /// The encoders that recognise the questions of the variant that serves `conversation`
    /// ([`Self::index`]): its `model`, read at each turn, so a reload applies to new turns.
    fn cascade(&self, name: &str, conversation: ConversationId) -> Cascade {
        self.cascades[self.index(name, conversation)]
    }

    /// The metrics slot of variant `name`.
    fn slot(&self, name: &str) -> Option<usize> {
        self.split
            .position(name)
            .and_then(|index| self.slots[index])
    }

    pub(super) fn prune(&mut self, now_ms: u64) {
        for chain in &mut self.chains {
            chain.prune(now_ms);
        }
    }
}

/// Logs the gray-release variants in force, once per process (shard 0 calls it at start and
/// at each reload); nothing without `[[bot.variants]]`.
pub(super) fn log_variants(shard: usize, config: &Config) {
    if shard != 0 || config.bot.variants.is_empty() {
        return;
    }
    let variants: Vec<String> = config
        .bot
        .effective_variants()
        .iter()
        .map(|variant| format!("{} (weight {})", variant.name, variant.weight))
        .collect();
    tracing::info!(
        variants = %variants.join(", "),
        "gray release: new conversations are split between these variants by weight; a \
         conversation keeps the variant it has"
    );
}

impl Bot {
    /// The guard chain (risk control, from `[bot] handlers`) and each variant's answer chain,
    /// in order, with its thresholds.
    pub(super) fn chains(
        config: &Config,
        registry: &Registry,
        metrics: &Metrics,
    ) -> Result<(Chain, VariantChains), RouterError> {
        let build = |names: &[&str], bot: &crate::config::BotConfig| {
            let specs: Vec<HandlerSpec<'_>> = names.iter().map(|n| HandlerSpec::new(n)).collect();
            Chain::from_specs(registry, &specs, bot, &config.risk_control)
        };
        let guard_names: Vec<&str> = config
            .bot
            .handlers
            .iter()
            .map(|h| h.as_str())
            .filter(|name| *name == "risk_control")
            .collect();
        let guards =
            build(&guard_names, &config.bot).map_err(|err| RouterError::Bot(err.to_string()))?;
        let variants = config.bot.effective_variants();
        let mut chains = Vec::with_capacity(variants.len());
        let mut slots = Vec::with_capacity(variants.len());
        let cascades = variants
            .iter()
            .map(|variant| Cascade::of_variant(variant.model))
            .collect();
        for variant in &variants {
            let names: Vec<&str> = variant.answer_handlers.iter().map(|h| h.as_str()).collect();
            let chain = build(&names, &variant.bot).map_err(|err| {
                RouterError::Bot(if config.bot.variants.is_empty() {
                    err.to_string()
                } else {
                    format!("variant \"{}\": {err}", variant.name)
                })
            })?;
            chains.push(chain);
            let slot = metrics.variant_slot(&variant.name);
            if slot.is_none() {
                tracing::warn!(
                    variant = %variant.name,
                    "no metrics slot left for this gray-release variant (restart to free the \
                     slots of variants no longer configured); it is not counted"
                );
            }
            slots.push(slot);
        }
        let split = VariantSplit::from_config(&config.bot);
        Ok((
            guards,
            VariantChains {
                split,
                chains,
                cascades,
                slots,
            },
        ))
    }

    pub(super) fn open(
        config: &Config,
        shard: usize,
        core: usize,
        registry: &Registry,
        metrics: &Metrics,
    ) -> Result<Option<Bot>, RouterError> {
        let (guards, variants) = Bot::chains(config, registry, metrics)?;
        log_variants(shard, config);
        let engine = if config.inference.enabled && !variants.is_empty() {
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
            variants: RefCell::new(variants),
            engine,
            unrecorded: RefCell::default(),
        }))
    }
}

impl Router {
    /// Runs the guard handlers on a visitor message before it is stored:
    /// returns the text to store (card numbers masked), or `None` when the
    /// message is refused (the sender gets an error frame).
    pub(super) fn guard(
        &self,
        key: &VisitorKey,
        session: SessionRef,
        text: String,
    ) -> Option<String> {
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
    pub(super) fn bot_turn(
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
            let (verdict, variant) = router
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
                variant,
            });
        })
        .detach();
    }

    /// The variant that serves `conversation` ([`VariantSplit::resolve`] on what this shard
    /// assigned or storage holds), and whether this turn assigned it (then it is counted here
    /// and stored with the verdict).
    fn variant_of(&self, bot: &Bot, conversation: ConversationId) -> (Arc<str>, bool) {
        let unrecorded = bot
            .unrecorded
            .borrow()
            .get(&conversation)
            .map(|(name, _)| name.clone());
        let stored = match unrecorded {
            Some(name) => Some(name),
            None => match self
                .reader
                .read()
                .and_then(|view| view.variant(conversation))
            {
                Ok(stored) => stored.map(Arc::from),
                Err(err) => {
                    // The record, if there is one, stays: `SetVariant` keeps the first.
                    tracing::error!(shard = self.shard, %conversation, error = %err, "cannot read the conversation's variant");
                    None
                }
            },
        };
        let variants = bot.variants.borrow();
        let assignment = variants.split.resolve(conversation, stored.as_deref());
        let name = variants.split.names()[assignment.index].clone();
        if assignment.record {
            bot.unrecorded
                .borrow_mut()
                .insert(conversation, (name.clone(), monotonic_ms()));
            if let Some(slot) = variants.slot(&name) {
                ShardMetrics::add(&self.metrics().variants[slot].conversations, 1);
            }
        }
        (name, assignment.record)
    }

    /// Forgets the assignments whose record storage now holds, or that waited too long.
    pub(super) fn prune_unrecorded(&self, bot: &Bot) {
        let mut unrecorded = bot.unrecorded.borrow_mut();
        if unrecorded.is_empty() {
            return;
        }
        let now = monotonic_ms();
        let Ok(view) = self.reader.read() else {
            return;
        };
        unrecorded.retain(|conversation, (_, since)| {
            now.saturating_sub(*since) < UNRECORDED_FOR_MS
                && matches!(view.variant(*conversation), Ok(None))
        });
    }

    /// Drives one [`BotTurn`] with the conversation's variant's chain: does the I/O its actions
    /// ask for (a query token, inference, a handler's later answer under a timer), feeds the
    /// results back and counts the metrics of the outcome. Returns the outcome and, at the
    /// conversation's first bot turn, the variant to store.
    pub(super) async fn decide(
        &self,
        conversation: ConversationId,
        site: &str,
        visitor: &str,
        text: String,
        failed_turns: u32,
    ) -> (BotOutcome, Option<String>) {
        let Some(bot) = &self.bot else {
            return (BotOutcome::Silent, None);
        };
        let (variant, assigned) = self.variant_of(bot, conversation);
        let record = assigned.then(|| variant.to_string());
        // The chain is looked up by name at every step: a reload between two steps may have
        // rebuilt the chains (the turn then resumes in the rebuilt chain of its variant).
        let mut message = BotContext::new(conversation.0, site, visitor, text);
        message.failed_turns = failed_turns;
        message.now_ms = monotonic_ms();
        let shard = ShardConditions {
            intent_engine: bot.engine.is_some(),
            load: self.level.get(),
        };
        let mut turn = BotTurn::new(message, shard);
        let mut action = turn.start(bot.variants.borrow_mut().chain(&variant, conversation));
        loop {
            action = match action {
                Action::TakeQueryToken => {
                    let taken = self.bot_queries.borrow_mut().try_take(
                        &Arc::<str>::from(site),
                        monotonic_ms(),
                        1.0,
                    );
                    turn.on_query_token(taken.is_ok())
                }
                Action::Recognise { text, lexical } => {
                    let recognised = match &bot.engine {
                        Some(engine) if lexical => engine.recognise_lexically(&text),
                        Some(engine) => {
                            let cascade = bot.variants.borrow().cascade(&variant, conversation);
                            engine.recognise_with(&text, cascade).await
                        }
                        None => None,
                    };
                    turn.on_intent(
                        bot.variants.borrow_mut().chain(&variant, conversation),
                        monotonic_ms(),
                        recognised,
                    )
                }
                Action::AwaitLater { later, deadline_ms } => {
                    // Awaited here without blocking the shard (docs/plugins.md).
                    let wait = Duration::from_millis(deadline_ms.saturating_sub(monotonic_ms()));
                    let answer = async { Ok(later.answer().await) };
                    match glommio::timer::timeout(wait, answer).await {
                        Ok(answer) => turn.on_later(answer),
                        Err(_) => turn.on_later_timeout(),
                    }
                }
                Action::Done { outcome, counts } => {
                    self.count_bot_turn(conversation, &counts);
                    let slot = bot.variants.borrow().slot(&variant);
                    if let Some(slot) = slot {
                        let counters = &self.metrics().variants[slot];
                        if counts.replied && counts.fallback {
                            ShardMetrics::add(&counters.fallbacks, 1);
                        } else if counts.replied {
                            ShardMetrics::add(&counters.answers, 1);
                        }
                        if counts.handoff.is_some() {
                            ShardMetrics::add(&counters.handoffs, 1);
                        }
                    }
                    return (outcome, record);
                }
            };
        }
    }

    /// The metrics of a finished bot turn.
    fn count_bot_turn(&self, conversation: ConversationId, counts: &TurnCounts) {
        let counters = self.metrics();
        if counts.rate_limited {
            ShardMetrics::add(&counters.bot_rate_limited, 1);
        }
        match counts.cache {
            Some(CacheOutcome::HotHit) => ShardMetrics::add(&counters.bot_hot_cache_hits, 1),
            Some(CacheOutcome::EmbeddingHit) => {
                ShardMetrics::add(&counters.bot_embedding_cache_hits, 1)
            }
            Some(CacheOutcome::Miss) => ShardMetrics::add(&counters.bot_cache_misses, 1),
            None => {}
        }
        if counts.replied {
            ShardMetrics::add(&counters.bot_replies, 1);
        }
        if counts.degraded {
            ShardMetrics::add(&counters.bot_degraded, 1);
        }
        if let Some(reason) = counts.handoff {
            ShardMetrics::add(&counters.bot_handoffs, 1);
            tracing::debug!(%conversation, reason = reason.as_str(), "bot hands off");
        }
    }
}
