//! The bot's part of the shard driver: the guard handlers run on a visitor message before it is
//! stored, and a bot turn asks the shard's bot chain (inference on the shard's worker thread) about
//! a stored message and feeds the verdict back to the owner as [`OwnerEvent::BotVerdict`].
//!
//! The bot turn's policy is the pure [`BotTurn`] state machine; this file only does its I/O.
//!
//! Invariant: the shard thread never waits for inference; a verdict arrives as an event.

use super::*;
use crate::conversation::bot_turn::{Action, BotTurn, ShardConditions, TurnCounts};

/// The shard's bot: the guard handlers (risk control: masking, blocking,
/// flood) that run on every visitor message before it is stored, the answer
/// handlers that run on messages of conversations the bot still holds, and
/// the shard's intent engine.
pub(super) struct Bot {
    pub(super) guards: RefCell<Chain>,
    pub(super) answers: RefCell<Chain>,
    pub(super) engine: Option<Rc<IntentEngine>>,
}

impl Bot {
    /// The guard chain (risk control) and the answer chain `[bot] handlers` lists, in order.
    pub(super) fn chains(
        config: &Config,
        registry: &Registry,
    ) -> Result<(Chain, Chain), RouterError> {
        let names: Vec<&str> = config.bot.handlers.iter().map(|h| h.as_str()).collect();
        let (guard_names, answer_names): (Vec<&str>, Vec<&str>) =
            names.iter().partition(|name| **name == "risk_control");
        let build = |names: &[&str]| {
            let specs: Vec<HandlerSpec<'_>> = names.iter().map(|n| HandlerSpec::new(n)).collect();
            Chain::from_specs(registry, &specs, &config.bot, &config.risk_control)
                .map_err(|err| RouterError::Bot(err.to_string()))
        };
        Ok((build(&guard_names)?, build(&answer_names)?))
    }

    pub(super) fn open(
        config: &Config,
        shard: usize,
        core: usize,
        registry: &Registry,
        metrics: &Metrics,
    ) -> Result<Option<Bot>, RouterError> {
        let (guards, answers) = Bot::chains(config, registry)?;
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

    /// Drives one [`BotTurn`]: does the I/O its actions ask for (a query token, inference, a
    /// handler's later answer under a timer), feeds the results back and counts the metrics of
    /// the outcome.
    pub(super) async fn decide(
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
        let mut message = BotContext::new(conversation.0, site, visitor, text);
        message.failed_turns = failed_turns;
        message.now_ms = monotonic_ms();
        let shard = ShardConditions {
            intent_engine: bot.engine.is_some(),
            load: self.level.get(),
        };
        let mut turn = BotTurn::new(message, shard);
        let mut action = turn.start(&mut bot.answers.borrow_mut());
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
                        Some(engine) => engine.recognise(&text).await,
                        None => None,
                    };
                    turn.on_intent(&mut bot.answers.borrow_mut(), monotonic_ms(), recognised)
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
                    return outcome;
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
