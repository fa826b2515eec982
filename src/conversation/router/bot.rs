//! The bot's part of the shard driver: the guard handlers run on a visitor message before it is
//! stored, and a bot turn asks the shard's bot chain (inference on the shard's worker thread) about
//! a stored message and feeds the verdict back to the owner as [`OwnerEvent::BotVerdict`].
//!
//! Invariant: the shard thread never waits for inference; a verdict arrives as an event.

use super::*;

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
}
