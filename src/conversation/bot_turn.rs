//! One bot turn as a sans-IO state machine: the policy that turns a stored visitor message into
//! a [`BotOutcome`] for the owner, without the I/O it needs (inference, a handler's later
//! answer, timers, the site's query-rate bucket, metrics). The shard driver
//! (`router::bot`) runs it in a loop: it takes an [`Action`], does the I/O, feeds the result
//! back as an event (`on_*`), and stops at [`Action::Done`].
//!
//! The policy, in order:
//! 1. run the answer [`Chain`] from its first handler;
//! 2. on [`Verdict::NeedIntent`], recognise the text once: with the lexical match while the
//!    shard sheds load ([`Level::Shed`] or worse) or when the site's bot-query rate refuses a
//!    token ([`Action::TakeQueryToken`]), with the model otherwise; then resume the chain at the
//!    handler that asked, with the intent (or without one: no engine, no knowledge base);
//! 3. on [`Verdict::Later`], have the driver wait for the handler's answer until
//!    `now + LATER_LIMIT` (`now`: when the chain returned it);
//! 4. a turn that ends without a reply or a handoff (the chain ended undecided, still needs the
//!    intent, blocked, or the later answer was missing, late or undecided) is the standard
//!    fallback turn ([`Verdict::fallback`]);
//! 5. the failed-turn counter follows [`Verdict::next_failed_turns`].
//!
//! Invariants:
//! - no I/O and no clock: time comes in as `now_ms` (monotonic, see [`super::clock`]) with the
//!   message and with the intent; the chain is borrowed only for the length of a call, never
//!   across the driver's awaits;
//! - at most one recognition per turn and at most one query token taken, only when a handler
//!   asked for the intent, the shard has an engine and is not shedding;
//! - every event answers the action handed out last (a driver bug otherwise: debug builds
//!   panic, release builds end the turn with the fallback);
//! - the turn ends in exactly one [`Action::Done`], whose [`TurnCounts`] say which metrics the
//!   driver increments.

use crate::admission::Level;
use crate::bot::later::LATER_LIMIT;
use crate::bot::{BotContext, Chain, HandoffReason, Later, Verdict};
use crate::engine::intent::{CacheOutcome, IntentResult};

use super::owner::BotOutcome;

/// What the shard can do for a turn, when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardConditions {
    /// The shard has an intent engine (without one, a handler asking for the intent gets none).
    pub intent_engine: bool,
    /// The shard's load level: from [`Level::Shed`] on, recognition is lexical.
    pub load: Level,
}

/// What the driver does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Take one token from the site's bot-query bucket; report with
    /// [`BotTurn::on_query_token`].
    TakeQueryToken,
    /// Recognise `text` with the intent engine: lexically, or with the model; report with
    /// [`BotTurn::on_intent`].
    Recognise { text: String, lexical: bool },
    /// Wait for a handler's later answer until `deadline_ms` (monotonic); report with
    /// [`BotTurn::on_later`] or, once the deadline passed without an answer,
    /// [`BotTurn::on_later_timeout`].
    AwaitLater { later: Later, deadline_ms: u64 },
    /// The turn is over: hand `outcome` to the owner and count `counts`.
    Done {
        outcome: BotOutcome,
        counts: TurnCounts,
    },
}

/// What happened during a turn, one field per bot metric.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TurnCounts {
    /// `bot_rate_limited`: the site's query rate sent the question to the lexical match.
    pub rate_limited: bool,
    /// `bot_hot_cache_hits`, `bot_embedding_cache_hits` or `bot_cache_misses`: which cache
    /// answered the recognition (`None`: nothing was recognised).
    pub cache: Option<CacheOutcome>,
    /// `bot_replies`: the bot answered.
    pub replied: bool,
    /// The answer was a failed turn (the fallback): `bot_variant_fallbacks` rather than
    /// `bot_variant_answers`.
    pub fallback: bool,
    /// `bot_degraded`: the answer came from a lexical match.
    pub degraded: bool,
    /// `bot_handoffs`, and why (for the log).
    pub handoff: Option<HandoffReason>,
}

/// Where the turn is: which event it waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    NotStarted,
    /// Waiting for [`BotTurn::on_query_token`]; the chain resumes at `resume_at`.
    QueryToken {
        resume_at: usize,
    },
    /// Waiting for [`BotTurn::on_intent`]; the chain resumes at `resume_at`.
    Intent {
        resume_at: usize,
    },
    /// Waiting for [`BotTurn::on_later`] or [`BotTurn::on_later_timeout`] (the driver's timer
    /// keeps the deadline).
    Later,
    Done,
}

/// One visitor message's way through the answer chain. See the module docs.
#[derive(Debug)]
pub struct BotTurn<'a> {
    ctx: BotContext<'a>,
    intent_engine: bool,
    load: Level,
    stage: Stage,
    /// The intent was asked for once already: a second `NeedIntent` is the fallback.
    intent_asked: bool,
    counts: TurnCounts,
}

impl<'a> BotTurn<'a> {
    /// A turn for `message`: a context with the stored text, the conversation's failed turns
    /// and `now_ms` (monotonic) filled in, no intent and no agent.
    pub fn new(message: BotContext<'a>, shard: ShardConditions) -> Self {
        BotTurn {
            ctx: message,
            intent_engine: shard.intent_engine,
            load: shard.load,
            stage: Stage::NotStarted,
            intent_asked: false,
            counts: TurnCounts::default(),
        }
    }

    /// Runs the chain from its first handler.
    pub fn start(&mut self, chain: &mut Chain) -> Action {
        if !self.expect(matches!(self.stage, Stage::NotStarted)) {
            return self.finish(Verdict::Continue);
        }
        let now_ms = self.ctx.now_ms;
        self.run(chain, 0, now_ms)
    }

    /// The site's query rate granted a token (`true`) or refused one.
    pub fn on_query_token(&mut self, granted: bool) -> Action {
        let Stage::QueryToken { resume_at } = self.stage else {
            self.expect(false);
            return self.finish(Verdict::Continue);
        };
        self.counts.rate_limited = !granted;
        self.recognise(resume_at, !granted)
    }

    /// The engine's answer to [`Action::Recognise`] (`None`: no match, e.g. no knowledge base),
    /// at `now_ms`: resumes the chain where it asked for the intent.
    pub fn on_intent(
        &mut self,
        chain: &mut Chain,
        now_ms: u64,
        recognised: Option<IntentResult>,
    ) -> Action {
        let Stage::Intent { resume_at } = self.stage else {
            self.expect(false);
            return self.finish(Verdict::Continue);
        };
        if let Some(result) = recognised {
            self.counts.cache = Some(result.cache);
            self.ctx.intent = Some(result.into());
        }
        self.run(chain, resume_at, now_ms)
    }

    /// The handler's later answer, received before the deadline (`None`: dropped unsent). An
    /// answer that does not decide (`Continue`, `NeedIntent`, `Later`, `Block`) is the fallback.
    pub fn on_later(&mut self, answer: Option<Verdict>) -> Action {
        if !self.expect(self.stage == Stage::Later) {
            return self.finish(Verdict::Continue);
        }
        self.finish(answer.unwrap_or(Verdict::Continue))
    }

    /// The later answer did not come before the deadline: the fallback.
    pub fn on_later_timeout(&mut self) -> Action {
        self.expect(self.stage == Stage::Later);
        self.finish(Verdict::Continue)
    }

    /// Whether an event came in the stage it answers; see the module's invariants.
    fn expect(&self, in_order: bool) -> bool {
        debug_assert!(in_order, "bot turn event out of order in {:?}", self.stage);
        in_order
    }

    fn run(&mut self, chain: &mut Chain, start: usize, now_ms: u64) -> Action {
        let (verdict, next) = chain.run(&mut self.ctx, start);
        match verdict {
            Verdict::NeedIntent if !self.intent_asked => {
                self.intent_asked = true;
                if !self.intent_engine {
                    // No engine: resume without an intent (the handler decides what that means).
                    self.stage = Stage::Intent { resume_at: next };
                    return self.on_intent(chain, now_ms, None);
                }
                if self.load >= Level::Shed {
                    // Shedding load: the visitor is still served, by the lexical match.
                    return self.recognise(next, true);
                }
                self.stage = Stage::QueryToken { resume_at: next };
                Action::TakeQueryToken
            }
            Verdict::Later(later) => {
                // A handler waits for something outside the process (docs/plugins.md).
                let deadline_ms = now_ms.saturating_add(LATER_LIMIT.as_millis() as u64);
                self.stage = Stage::Later;
                Action::AwaitLater { later, deadline_ms }
            }
            verdict => self.finish(verdict),
        }
    }

    fn recognise(&mut self, resume_at: usize, lexical: bool) -> Action {
        self.stage = Stage::Intent { resume_at };
        Action::Recognise {
            text: self.ctx.text.clone(),
            lexical,
        }
    }

    /// Ends the turn on `verdict`; anything but a reply or a handoff becomes the fallback.
    fn finish(&mut self, verdict: Verdict) -> Action {
        self.stage = Stage::Done;
        let verdict = match verdict {
            Verdict::Reply { .. } | Verdict::Handoff { .. } => verdict,
            _ => Verdict::fallback(&self.ctx),
        };
        let failed_turns = verdict.next_failed_turns(self.ctx.failed_turns);
        let outcome = match verdict {
            Verdict::Reply {
                text,
                degraded,
                failed,
                ..
            } => {
                self.counts.replied = true;
                self.counts.fallback = failed;
                self.counts.degraded = degraded;
                BotOutcome::Reply { text, failed_turns }
            }
            Verdict::Handoff { reason } => {
                self.counts.handoff = Some(reason);
                BotOutcome::Handoff
            }
            _ => BotOutcome::Silent,
        };
        Action::Done {
            outcome,
            counts: self.counts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bot::{later, HandlerSpec, MessageHandler, Registry, FALLBACK_TEXT};
    use crate::config::{BotConfig, Config, RiskControlConfig};

    const NOW: u64 = 5_000;
    const CARD_ANSWER: &str = "Your card arrives within 3 days.";

    /// Answers every message later (a handler waiting on an outside service); the test plays the
    /// driver and feeds the answer itself, so the sending half is dropped.
    struct AnswersLater;

    impl MessageHandler for AnswersLater {
        fn name(&self) -> &'static str {
            "answers_later"
        }
        fn priority(&self) -> i32 {
            120
        }
        fn handle(&mut self, _: &mut BotContext<'_>) -> Verdict {
            Verdict::Later(later().1)
        }
    }

    /// The answer chain of `names`, built from the real registry (plus `answers_later`) with
    /// thresholds 0.5/0.05, two failed turns before a handoff and "scam" blocked.
    fn chain(names: &[&str]) -> Chain {
        let config = Config::default();
        let mut bot = config.bot;
        bot.confidence_threshold = 0.5;
        bot.margin_threshold = 0.05;
        bot.failed_turns_before_handoff = 2;
        let mut risk = config.risk_control;
        risk.blocked_words = vec!["scam".into()];
        let mut registry = Registry::default();
        registry
            .register("answers_later", |_: &BotConfig, _: &RiskControlConfig| {
                Ok(Box::new(AnswersLater) as Box<dyn MessageHandler>)
            })
            .unwrap();
        let specs: Vec<HandlerSpec<'_>> = names.iter().map(|n| HandlerSpec::new(n)).collect();
        Chain::from_specs(&registry, &specs, &bot, &risk).unwrap()
    }

    /// The production answer chain (the guards run before the message is stored).
    fn answers() -> Chain {
        chain(&["human_transfer", "intent", "fallback"])
    }

    fn turn(text: &str, failed_turns: u32, load: Level) -> BotTurn<'static> {
        let mut message = BotContext::new(7, "acme", "v1", text);
        message.failed_turns = failed_turns;
        message.now_ms = NOW;
        let shard = ShardConditions {
            intent_engine: true,
            load,
        };
        BotTurn::new(message, shard)
    }

    /// Starts a turn for a card question on a shard with the normal load, hands out the query
    /// token (or refuses it), checks the text goes to the model (or the lexical match), and
    /// answers with `recognised`.
    fn card_question(failed_turns: u32, granted: bool, recognised: Option<IntentResult>) -> Action {
        let mut chain = answers();
        let mut turn = turn("where is my card?", failed_turns, Level::Normal);
        assert_eq!(turn.start(&mut chain), Action::TakeQueryToken);
        assert_eq!(
            turn.on_query_token(granted),
            recognise("where is my card?", !granted)
        );
        turn.on_intent(&mut chain, NOW + 40, recognised)
    }

    /// A recognition of `card_arrival` at `score` (runner-up 0.1).
    fn card_arrival(score: f32, degraded: bool, cache: CacheOutcome) -> Option<IntentResult> {
        Some(IntentResult {
            version: 1,
            entry: 0,
            entry_id: "card_arrival".into(),
            intent: "card_arrival".into(),
            answer: CARD_ANSWER.into(),
            score,
            second_score: 0.1,
            similarity: (!degraded).then_some(score),
            degraded,
            cache,
        })
    }

    fn recognise(text: &str, lexical: bool) -> Action {
        Action::Recognise {
            text: text.into(),
            lexical,
        }
    }

    /// The turn ends replying `text`; `counts` plus the reply.
    fn reply(text: &str, failed_turns: u32, counts: TurnCounts) -> Action {
        Action::Done {
            outcome: BotOutcome::Reply {
                text: text.into(),
                failed_turns,
            },
            counts: TurnCounts {
                replied: true,
                ..counts
            },
        }
    }

    fn fallback(failed_turns: u32, counts: TurnCounts) -> Action {
        let counts = TurnCounts {
            fallback: true,
            ..counts
        };
        reply(FALLBACK_TEXT, failed_turns, counts)
    }

    #[test]
    fn an_answer_on_the_first_pass_needs_no_recognition() {
        let mut chain = chain(&["human_transfer", "echo", "fallback"]);
        let mut turn = turn("hello there", 1, Level::Normal);
        assert_eq!(
            turn.start(&mut chain),
            reply("hello there", 0, TurnCounts::default())
        );
    }

    #[test]
    fn the_intent_comes_from_the_model_when_the_rate_allows_and_resets_failed_turns() {
        let recognised = card_arrival(0.9, false, CacheOutcome::EmbeddingHit);
        let counts = TurnCounts {
            cache: Some(CacheOutcome::EmbeddingHit),
            ..TurnCounts::default()
        };
        assert_eq!(
            card_question(1, true, recognised),
            reply(CARD_ANSWER, 0, counts)
        );
    }

    #[test]
    fn a_refused_query_token_recognises_lexically_and_counts_the_rate_limit() {
        let recognised = card_arrival(0.8, true, CacheOutcome::Miss);
        let counts = TurnCounts {
            rate_limited: true,
            cache: Some(CacheOutcome::Miss),
            degraded: true,
            ..TurnCounts::default()
        };
        assert_eq!(
            card_question(0, false, recognised),
            reply(CARD_ANSWER, 0, counts)
        );
    }

    #[test]
    fn a_shedding_shard_recognises_lexically_without_taking_a_token() {
        let mut chain = answers();
        let mut turn = turn("my card", 0, Level::Shed);
        assert_eq!(turn.start(&mut chain), recognise("my card", true));
        let mut turn = self::turn("my card", 0, Level::Refuse);
        assert_eq!(turn.start(&mut chain), recognise("my card", true));
    }

    #[test]
    fn an_undecided_chain_falls_back_and_counts_a_failed_turn() {
        // No `fallback` handler: a weak match leaves the chain undecided.
        let mut chain = chain(&["human_transfer", "intent"]);
        let mut turn = turn("blah", 1, Level::Normal);
        assert_eq!(turn.start(&mut chain), Action::TakeQueryToken);
        assert_eq!(turn.on_query_token(true), recognise("blah", false));
        let done = turn.on_intent(
            &mut chain,
            NOW,
            card_arrival(0.2, false, CacheOutcome::HotHit),
        );
        assert_eq!(
            done,
            fallback(
                2,
                TurnCounts {
                    cache: Some(CacheOutcome::HotHit),
                    ..TurnCounts::default()
                }
            )
        );
    }

    #[test]
    fn no_engine_or_no_match_is_the_fallback() {
        let mut chain = answers();
        let mut turn = turn("my card", 0, Level::Normal);
        turn.intent_engine = false;
        assert_eq!(turn.start(&mut chain), fallback(1, TurnCounts::default()));

        // An engine without a knowledge base recognises nothing.
        let mut turn = self::turn("my card", 1, Level::Shed);
        assert_eq!(turn.start(&mut chain), recognise("my card", true));
        assert_eq!(
            turn.on_intent(&mut chain, NOW, None),
            fallback(2, TurnCounts::default())
        );
    }

    #[test]
    fn handoffs_end_the_turn_before_any_recognition() {
        let mut chain = answers();
        let handoff = |reason| Action::Done {
            outcome: BotOutcome::Handoff,
            counts: TurnCounts {
                handoff: Some(reason),
                ..TurnCounts::default()
            },
        };
        let mut turn = turn("I want to talk to a human", 0, Level::Normal);
        assert_eq!(turn.start(&mut chain), handoff(HandoffReason::Explicit));
        // Two failed turns before (failed_turns_before_handoff = 2): a human takes over.
        let mut turn = self::turn("where is my card?", 2, Level::Normal);
        assert_eq!(
            turn.start(&mut chain),
            handoff(HandoffReason::TooManyFailures)
        );
    }

    #[test]
    fn a_later_answer_in_time_is_the_turn_verdict() {
        let mut chain = chain(&["answers_later", "fallback"]);
        let mut turn = turn("where is order 42?", 2, Level::Normal);
        let Action::AwaitLater { deadline_ms, .. } = turn.start(&mut chain) else {
            panic!("the turn does not wait for the later answer");
        };
        assert_eq!(deadline_ms, NOW + 10_000);
        let answer = Verdict::Reply {
            text: "Order 42 shipped.".into(),
            intent: None,
            confidence: 1.0,
            failed: false,
            degraded: false,
        };
        assert_eq!(
            turn.on_later(Some(answer)),
            reply("Order 42 shipped.", 0, TurnCounts::default())
        );
    }

    #[test]
    fn a_later_answer_timed_out_missing_or_undecided_is_the_fallback() {
        let mut chain = chain(&["answers_later", "fallback"]);
        let waiting = |chain: &mut Chain| {
            let mut turn = turn("where is order 42?", 0, Level::Normal);
            assert!(matches!(turn.start(chain), Action::AwaitLater { .. }));
            turn
        };
        assert_eq!(
            waiting(&mut chain).on_later_timeout(),
            fallback(1, TurnCounts::default())
        );
        assert_eq!(
            waiting(&mut chain).on_later(None),
            fallback(1, TurnCounts::default())
        );
        assert_eq!(
            waiting(&mut chain).on_later(Some(Verdict::Continue)),
            fallback(1, TurnCounts::default())
        );
        let (_, another) = later();
        assert_eq!(
            waiting(&mut chain).on_later(Some(Verdict::Later(another))),
            fallback(1, TurnCounts::default())
        );
    }

    #[test]
    fn a_later_after_the_intent_waits_from_when_the_intent_came() {
        // A weak match lets the message through `intent` to the later handler.
        let mut chain = chain(&["intent", "answers_later"]);
        let mut turn = turn("blah", 0, Level::Shed);
        assert_eq!(turn.start(&mut chain), recognise("blah", true));
        let action = turn.on_intent(
            &mut chain,
            NOW + 700,
            card_arrival(0.2, true, CacheOutcome::Miss),
        );
        let Action::AwaitLater { deadline_ms, .. } = action else {
            panic!("the turn does not wait for the later answer: {action:?}");
        };
        assert_eq!(deadline_ms, NOW + 700 + 10_000);
        let handoff = Verdict::Handoff {
            reason: HandoffReason::Intent,
        };
        assert_eq!(
            turn.on_later(Some(handoff)),
            Action::Done {
                outcome: BotOutcome::Handoff,
                counts: TurnCounts {
                    cache: Some(CacheOutcome::Miss),
                    handoff: Some(HandoffReason::Intent),
                    ..TurnCounts::default()
                },
            }
        );
    }

    #[test]
    fn a_block_in_the_answer_chain_is_the_fallback() {
        let mut chain = chain(&["risk_control", "human_transfer", "intent", "fallback"]);
        let mut turn = turn("this is a scam", 1, Level::Normal);
        assert_eq!(turn.start(&mut chain), fallback(2, TurnCounts::default()));
    }
}
