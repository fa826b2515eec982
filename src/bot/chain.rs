//! The handler registry (name → factory) and the chain built from it for one shard.
//!
//! Invariants: a registry name maps to exactly one factory; a chain holds each handler at most
//! once, sorted by descending priority with ties kept in the order the config lists them; `run`
//! never calls a handler before `start` and returns `NeedIntent` only while `ctx.intent` is `None`.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{
    BotContext, BotError, Echo, Fallback, HumanTransfer, IntentAnswer, MessageHandler, RiskControl,
    Verdict,
};
use crate::config::{BotConfig, RiskControlConfig};

/// Builds a handler from the config. Called once per shard per chain.
pub type HandlerFactory = Arc<
    dyn Fn(&BotConfig, &RiskControlConfig) -> Result<Box<dyn MessageHandler>, BotError>
        + Send
        + Sync,
>;

/// The handlers a chain can be built from, by the name config uses. Cheap to clone (the
/// factories are shared), so one registry can be built at start-up and handed to every shard.
#[derive(Clone)]
pub struct Registry {
    factories: BTreeMap<&'static str, HandlerFactory>,
}

impl Default for Registry {
    /// The built-ins: `risk_control`, `human_transfer`, `intent`, `fallback` and `echo`.
    fn default() -> Self {
        let mut registry = Registry::empty();
        let built_ins: [(&'static str, HandlerFactory); 5] = [
            (
                "risk_control",
                Arc::new(|_: &BotConfig, risk: &RiskControlConfig| {
                    Ok(Box::new(RiskControl::from_config(risk)?) as Box<dyn MessageHandler>)
                }),
            ),
            (
                "human_transfer",
                Arc::new(|bot: &BotConfig, _: &RiskControlConfig| {
                    Ok(Box::new(HumanTransfer::from_config(bot)?) as Box<dyn MessageHandler>)
                }),
            ),
            (
                "intent",
                Arc::new(|bot: &BotConfig, _: &RiskControlConfig| {
                    Ok(Box::new(IntentAnswer::from_config(bot)) as Box<dyn MessageHandler>)
                }),
            ),
            (
                "fallback",
                Arc::new(|_: &BotConfig, _: &RiskControlConfig| {
                    Ok(Box::new(Fallback) as Box<dyn MessageHandler>)
                }),
            ),
            (
                "echo",
                Arc::new(|_: &BotConfig, _: &RiskControlConfig| {
                    Ok(Box::new(Echo) as Box<dyn MessageHandler>)
                }),
            ),
        ];
        for (name, factory) in built_ins {
            registry.factories.insert(name, factory);
        }
        registry
    }
}

impl Registry {
    /// A registry with no handlers at all.
    pub fn empty() -> Self {
        Registry {
            factories: BTreeMap::new(),
        }
    }

    /// Adds a handler under `name` (the spelling config uses). A name is registered once.
    pub fn register<F>(&mut self, name: &'static str, factory: F) -> Result<(), BotError>
    where
        F: Fn(&BotConfig, &RiskControlConfig) -> Result<Box<dyn MessageHandler>, BotError>
            + Send
            + Sync
            + 'static,
    {
        if self.factories.contains_key(name) {
            return Err(BotError::AlreadyRegistered {
                name: name.to_string(),
            });
        }
        self.factories.insert(name, Arc::new(factory));
        Ok(())
    }

    /// Whether `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.factories.contains_key(name)
    }

    /// The registered names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.factories.keys().copied()
    }

    fn build(
        &self,
        name: &str,
        bot: &BotConfig,
        risk: &RiskControlConfig,
    ) -> Result<Box<dyn MessageHandler>, BotError> {
        match self.factories.get(name) {
            Some(factory) => factory(bot, risk),
            None => Err(BotError::UnknownHandler {
                name: name.to_string(),
                registered: self.names().collect::<Vec<_>>().join(", "),
            }),
        }
    }
}

/// One entry of a chain description: a registered handler name and, optionally, a priority
/// that replaces the handler's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandlerSpec<'a> {
    pub name: &'a str,
    pub priority: Option<i32>,
}

impl<'a> HandlerSpec<'a> {
    /// The handler `name` at its own priority.
    pub fn new(name: &'a str) -> Self {
        HandlerSpec {
            name,
            priority: None,
        }
    }
}

struct Slot {
    priority: i32,
    handler: Box<dyn MessageHandler>,
}

/// The handlers one shard runs, in order. Owns their state (e.g. flood counters).
pub struct Chain {
    slots: Vec<Slot>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.slots.iter().map(|s| (s.handler.name(), s.priority)))
            .finish()
    }
}

impl Chain {
    /// The chain `[bot] handlers` describes, built from `registry`.
    pub fn from_config(
        registry: &Registry,
        bot: &BotConfig,
        risk: &RiskControlConfig,
    ) -> Result<Chain, BotError> {
        let specs: Vec<HandlerSpec<'_>> = bot
            .handlers
            .iter()
            .map(|h| HandlerSpec::new(h.as_str()))
            .collect();
        Chain::from_specs(registry, &specs, bot, risk)
    }

    /// The chain of `specs`, built from `registry`: unknown or repeated names and factory
    /// failures (such as an invalid blocked pattern) are errors naming the culprit.
    pub fn from_specs(
        registry: &Registry,
        specs: &[HandlerSpec<'_>],
        bot: &BotConfig,
        risk: &RiskControlConfig,
    ) -> Result<Chain, BotError> {
        let mut slots: Vec<Slot> = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            if specs[..i].iter().any(|s| s.name == spec.name) {
                return Err(BotError::DuplicateHandler {
                    name: spec.name.to_string(),
                });
            }
            let handler = registry.build(spec.name, bot, risk)?;
            let priority = spec.priority.unwrap_or_else(|| handler.priority());
            slots.push(Slot { priority, handler });
        }
        // Stable: equal priorities keep the listed order.
        slots.sort_by_key(|slot| std::cmp::Reverse(slot.priority));
        Ok(Chain { slots })
    }

    /// Runs the handlers from index `start` on until one decides. Returns the verdict and an
    /// index: for `NeedIntent`, where to resume once `ctx.intent` is filled; for a decision, the
    /// deciding handler (see [`Chain::name`]); for `Continue` (nobody decided), `self.len()`.
    ///
    /// A handler that answers `NeedIntent` although `ctx.intent` is already filled is treated
    /// as `Continue`, so a resumed run always makes progress.
    pub fn run(&mut self, ctx: &mut BotContext<'_>, start: usize) -> (Verdict, usize) {
        for (index, slot) in self.slots.iter_mut().enumerate().skip(start) {
            let handler = &mut slot.handler;
            if ctx.agent_assigned && !handler.is_guard() {
                continue;
            }
            if handler.needs_intent() && ctx.intent.is_none() {
                return (Verdict::NeedIntent, index);
            }
            match handler.handle(ctx) {
                Verdict::Continue => {}
                Verdict::NeedIntent if ctx.intent.is_some() => {}
                verdict => return (verdict, index),
            }
        }
        (Verdict::Continue, self.slots.len())
    }

    /// Lets every handler drop state that is idle at `now_ms` (call from a periodic timer).
    pub fn prune(&mut self, now_ms: u64) {
        for slot in &mut self.slots {
            slot.handler.prune(now_ms);
        }
    }

    /// The name of the handler at `index`, if any.
    pub fn name(&self, index: usize) -> Option<&'static str> {
        self.slots.get(index).map(|slot| slot.handler.name())
    }

    /// The handler names in run order.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.slots.iter().map(|slot| slot.handler.name())
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bot::{HandoffReason, IntentMatch, FALLBACK_TEXT};
    use crate::config::{BotHandler, Config};

    fn configs() -> (BotConfig, RiskControlConfig) {
        let config = Config::default();
        let mut bot = config.bot;
        bot.handlers = vec![
            BotHandler::RiskControl,
            BotHandler::HumanTransfer,
            BotHandler::Intent,
            BotHandler::Fallback,
        ];
        bot.confidence_threshold = 0.5;
        bot.margin_threshold = 0.05;
        bot.failed_turns_before_handoff = 2;
        let mut risk = config.risk_control;
        risk.blocked_words = vec!["scam".into()];
        risk.blocked_patterns = vec![];
        risk.mask_card_numbers = true;
        risk.flood_messages = 100;
        risk.flood_window = std::time::Duration::from_secs(10);
        (bot, risk)
    }

    fn default_chain() -> Chain {
        let (bot, risk) = configs();
        Chain::from_config(&Registry::default(), &bot, &risk).unwrap()
    }

    /// A stand-in knowledge base: "card" questions match `card_arrival` confidently, anything
    /// else matches weakly.
    fn predict(text: &str) -> IntentMatch {
        if text.contains("card") {
            IntentMatch {
                intent: "card_arrival".into(),
                answer: Some("Your card arrives within 3 days.".into()),
                score: 0.9,
                second_score: 0.4,
                degraded: false,
            }
        } else {
            IntentMatch {
                intent: "card_arrival".into(),
                answer: Some("Your card arrives within 3 days.".into()),
                score: 0.2,
                second_score: 0.19,
                degraded: false,
            }
        }
    }

    /// The driver loop: run, fill the intent on `NeedIntent`, resume. Returns the final verdict
    /// (a chain ending in `Continue` becomes the fallback), the deciding handler and how many
    /// predictions were made.
    fn drive(chain: &mut Chain, ctx: &mut BotContext<'_>) -> (Verdict, Option<&'static str>, u32) {
        let mut start = 0;
        let mut predictions = 0;
        for _ in 0..=chain.len() {
            let (verdict, index) = chain.run(ctx, start);
            match verdict {
                Verdict::NeedIntent => {
                    assert!(ctx.intent.is_none());
                    predictions += 1;
                    ctx.intent = Some(predict(&ctx.text));
                    start = index;
                }
                Verdict::Continue => {
                    assert_eq!(index, chain.len());
                    return (Verdict::fallback(ctx), None, predictions);
                }
                verdict => return (verdict, chain.name(index), predictions),
            }
        }
        panic!("the chain did not finish");
    }

    #[test]
    fn config_order_is_run_by_priority() {
        let (mut bot, risk) = configs();
        bot.handlers = vec![
            BotHandler::Fallback,
            BotHandler::Intent,
            BotHandler::RiskControl,
            BotHandler::HumanTransfer,
        ];
        let chain = Chain::from_config(&Registry::default(), &bot, &risk).unwrap();
        assert_eq!(
            chain.names().collect::<Vec<_>>(),
            ["risk_control", "human_transfer", "intent", "fallback"]
        );
    }

    #[test]
    fn priority_override_and_ties_keep_listed_order() {
        let (bot, risk) = configs();
        let specs = [
            HandlerSpec::new("fallback"),
            HandlerSpec {
                name: "echo",
                priority: Some(crate::bot::priority::FALLBACK),
            },
            HandlerSpec {
                name: "intent",
                priority: Some(1_000),
            },
            HandlerSpec::new("risk_control"),
        ];
        let chain = Chain::from_specs(&Registry::default(), &specs, &bot, &risk).unwrap();
        assert_eq!(
            chain.names().collect::<Vec<_>>(),
            ["intent", "risk_control", "fallback", "echo"]
        );
    }

    #[test]
    fn answers_from_the_intent_after_resuming() {
        let mut chain = default_chain();
        let mut ctx = BotContext::new(1, "acme", "v", "where is my card?");
        let (verdict, index) = chain.run(&mut ctx, 0);
        assert_eq!(verdict, Verdict::NeedIntent);
        assert_eq!(chain.name(index), Some("intent"));
        ctx.intent = Some(predict(&ctx.text));
        let (verdict, index) = chain.run(&mut ctx, index);
        assert_eq!(chain.name(index), Some("intent"));
        assert_eq!(
            verdict,
            Verdict::Reply {
                text: "Your card arrives within 3 days.".into(),
                intent: Some("card_arrival".into()),
                confidence: 0.9,
                failed: false,
                degraded: false,
            }
        );
    }

    /// Counts its calls; lets us check the resume point does not re-run earlier handlers.
    struct Counter {
        priority: i32,
        calls: std::rc::Rc<std::cell::Cell<u32>>,
    }

    impl MessageHandler for Counter {
        fn name(&self) -> &'static str {
            "counter"
        }
        fn priority(&self) -> i32 {
            self.priority
        }
        fn handle(&mut self, _: &mut BotContext<'_>) -> Verdict {
            self.calls.set(self.calls.get() + 1);
            Verdict::Continue
        }
    }

    #[test]
    fn resuming_does_not_rerun_earlier_handlers() {
        let calls = std::rc::Rc::new(std::cell::Cell::new(0));
        let mut chain = Chain {
            slots: vec![
                Slot {
                    priority: 500,
                    handler: Box::new(Counter {
                        priority: 500,
                        calls: calls.clone(),
                    }),
                },
                Slot {
                    priority: 200,
                    handler: Box::new(IntentAnswer::new(0.5, 0.05)),
                },
            ],
        };
        let mut ctx = BotContext::new(1, "acme", "v", "my card");
        let (verdict, index) = chain.run(&mut ctx, 0);
        assert_eq!((verdict, index), (Verdict::NeedIntent, 1));
        ctx.intent = Some(predict("my card"));
        let (verdict, _) = chain.run(&mut ctx, index);
        assert!(matches!(verdict, Verdict::Reply { failed: false, .. }));
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn need_intent_with_the_intent_present_moves_on() {
        struct Greedy;
        impl MessageHandler for Greedy {
            fn name(&self) -> &'static str {
                "greedy"
            }
            fn priority(&self) -> i32 {
                0
            }
            fn handle(&mut self, _: &mut BotContext<'_>) -> Verdict {
                Verdict::NeedIntent
            }
        }
        let mut chain = Chain {
            slots: vec![Slot {
                priority: 0,
                handler: Box::new(Greedy),
            }],
        };
        let mut ctx = BotContext::new(1, "acme", "v", "x");
        assert_eq!(chain.run(&mut ctx, 0), (Verdict::NeedIntent, 0));
        ctx.intent = Some(predict("x"));
        assert_eq!(chain.run(&mut ctx, 0), (Verdict::Continue, 1));
    }

    #[test]
    fn decisions_before_the_intent_skip_inference() {
        let mut chain = default_chain();
        let mut ctx = BotContext::new(1, "acme", "v", "this is a scam");
        let (verdict, handler, predictions) = drive(&mut chain, &mut ctx);
        assert!(matches!(
            verdict,
            Verdict::Block {
                code: "blocked",
                ..
            }
        ));
        assert_eq!((handler, predictions), (Some("risk_control"), 0));

        let mut ctx = BotContext::new(1, "acme", "v", "I want to talk to a human");
        let (verdict, handler, predictions) = drive(&mut chain, &mut ctx);
        assert_eq!(
            verdict,
            Verdict::Handoff {
                reason: HandoffReason::Explicit
            }
        );
        assert_eq!((handler, predictions), (Some("human_transfer"), 0));
    }

    #[test]
    fn masked_text_reaches_later_handlers() {
        let (bot, risk) = configs();
        let specs = [HandlerSpec::new("echo"), HandlerSpec::new("risk_control")];
        let mut chain = Chain::from_specs(&Registry::default(), &specs, &bot, &risk).unwrap();
        let mut ctx = BotContext::new(1, "acme", "v", "card 4111111111111111");
        let (verdict, _) = chain.run(&mut ctx, 0);
        let Verdict::Reply { text, .. } = verdict else {
            panic!("no reply: {verdict:?}")
        };
        assert_eq!(text, "card ************1111");
        assert_eq!(ctx.text, "card ************1111");
    }

    #[test]
    fn failed_turns_count_up_reset_and_hand_off() {
        let mut chain = default_chain();
        let mut failed_turns = 0;
        let mut turn = |text: &str, failed_turns: &mut u32| {
            let mut ctx = BotContext::new(1, "acme", "v", text);
            ctx.failed_turns = *failed_turns;
            let (verdict, _, _) = drive(&mut chain, &mut ctx);
            *failed_turns = verdict.next_failed_turns(*failed_turns);
            verdict
        };
        // A miss: fallback, counted.
        let v = turn("blah", &mut failed_turns);
        assert!(matches!(&v, Verdict::Reply { failed: true, text, .. } if text == FALLBACK_TEXT));
        assert_eq!(failed_turns, 1);
        // An answer resets the count.
        assert!(matches!(
            turn("my card?", &mut failed_turns),
            Verdict::Reply { failed: false, .. }
        ));
        assert_eq!(failed_turns, 0);
        // Two misses in a row (failed_turns_before_handoff = 2)...
        turn("blah", &mut failed_turns);
        turn("blah blah", &mut failed_turns);
        assert_eq!(failed_turns, 2);
        // ...and the next message goes to a human, even one the bot could answer.
        assert_eq!(
            turn("my card?", &mut failed_turns),
            Verdict::Handoff {
                reason: HandoffReason::TooManyFailures
            }
        );
        assert_eq!(failed_turns, 0);
    }

    #[test]
    fn blocks_do_not_change_the_failed_turn_count() {
        let v = Verdict::Block {
            code: "blocked",
            message: String::new(),
        };
        assert_eq!(v.next_failed_turns(1), 1);
        assert_eq!(Verdict::Continue.next_failed_turns(1), 1);
    }

    #[test]
    fn chain_without_fallback_ends_in_continue() {
        let (mut bot, risk) = configs();
        bot.handlers = vec![BotHandler::RiskControl, BotHandler::Intent];
        let mut chain = Chain::from_config(&Registry::default(), &bot, &risk).unwrap();
        let mut ctx = BotContext::new(1, "acme", "v", "blah");
        let (verdict, index) = chain.run(&mut ctx, 0);
        assert_eq!(verdict, Verdict::NeedIntent);
        ctx.intent = Some(predict("blah"));
        assert_eq!(chain.run(&mut ctx, index), (Verdict::Continue, 2));
    }

    #[test]
    fn only_guards_run_while_an_agent_has_the_conversation() {
        let mut chain = default_chain();
        let mut ctx = BotContext::new(1, "acme", "v", "human, card 4111 1111 1111 1111");
        ctx.agent_assigned = true;
        ctx.failed_turns = 5;
        // No handoff, no intent request, no fallback: only masking happened.
        assert_eq!(chain.run(&mut ctx, 0), (Verdict::Continue, 4));
        assert_eq!(ctx.text, "human, card **** **** **** 1111");
        let mut ctx = BotContext::new(1, "acme", "v", "scam");
        ctx.agent_assigned = true;
        assert!(matches!(
            chain.run(&mut ctx, 0).0,
            Verdict::Block {
                code: "blocked",
                ..
            }
        ));
    }

    #[test]
    fn prune_reaches_every_handler() {
        struct Pruned(std::rc::Rc<std::cell::Cell<u64>>);
        impl MessageHandler for Pruned {
            fn name(&self) -> &'static str {
                "pruned"
            }
            fn priority(&self) -> i32 {
                0
            }
            fn handle(&mut self, _: &mut BotContext<'_>) -> Verdict {
                Verdict::Continue
            }
            fn prune(&mut self, now_ms: u64) {
                self.0.set(now_ms);
            }
        }
        let seen = std::rc::Rc::new(std::cell::Cell::new(0));
        let mut chain = default_chain();
        chain.slots.push(Slot {
            priority: 0,
            handler: Box::new(Pruned(seen.clone())),
        });
        chain.prune(12_345);
        assert_eq!(seen.get(), 12_345);
    }

    #[test]
    fn unknown_and_duplicate_handlers_are_errors() {
        let (bot, risk) = configs();
        let registry = Registry::default();
        let err = Chain::from_specs(&registry, &[HandlerSpec::new("smalltalk")], &bot, &risk)
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, BotError::UnknownHandler { ref name, .. } if name == "smalltalk"));
        assert!(text.contains("\"smalltalk\""), "{text}");
        assert!(
            text.contains("echo, fallback, human_transfer, intent, risk_control"),
            "{text}"
        );
        let specs = [HandlerSpec::new("echo"), HandlerSpec::new("echo")];
        assert!(matches!(
            Chain::from_specs(&registry, &specs, &bot, &risk),
            Err(BotError::DuplicateHandler { ref name }) if name == "echo"
        ));
    }

    #[test]
    fn bad_pattern_in_config_fails_the_chain_naming_it() {
        let (bot, mut risk) = configs();
        risk.blocked_patterns = vec![r"ok\d+".into(), r"[unclosed".into()];
        let err = Chain::from_config(&Registry::default(), &bot, &risk).unwrap_err();
        assert!(
            matches!(&err, BotError::BadPattern { pattern, .. } if pattern == "[unclosed"),
            "{err:?}"
        );
        assert!(err.to_string().contains("[unclosed"));
    }

    /// A custom handler, registered like a plugin: answers opening hours.
    struct OpeningHours;

    impl MessageHandler for OpeningHours {
        fn name(&self) -> &'static str {
            "opening_hours"
        }
        fn priority(&self) -> i32 {
            250
        }
        fn handle(&mut self, ctx: &mut BotContext<'_>) -> Verdict {
            if ctx.text.to_lowercase().contains("open") {
                Verdict::Reply {
                    text: "We are open 9:00-17:00.".into(),
                    intent: Some("opening_hours".into()),
                    confidence: 1.0,
                    failed: false,
                    degraded: false,
                }
            } else {
                Verdict::Continue
            }
        }
    }

    #[test]
    fn custom_handler_through_the_registry() {
        let (bot, risk) = configs();
        let mut registry = Registry::default();
        registry
            .register("opening_hours", |_: &BotConfig, _: &RiskControlConfig| {
                Ok(Box::new(OpeningHours) as Box<dyn MessageHandler>)
            })
            .unwrap();
        assert!(matches!(
            registry.register("opening_hours", |_: &BotConfig, _: &RiskControlConfig| {
                Ok(Box::new(OpeningHours) as Box<dyn MessageHandler>)
            }),
            Err(BotError::AlreadyRegistered { .. })
        ));
        let specs: Vec<HandlerSpec<'_>> = ["risk_control", "intent", "opening_hours", "fallback"]
            .into_iter()
            .map(HandlerSpec::new)
            .collect();
        let mut chain = Chain::from_specs(&registry, &specs, &bot, &risk).unwrap();
        assert_eq!(
            chain.names().collect::<Vec<_>>(),
            ["risk_control", "opening_hours", "intent", "fallback"]
        );
        // Priority 250 runs before `intent`, so no prediction is needed.
        let mut ctx = BotContext::new(1, "acme", "v", "When are you open?");
        let (verdict, handler, predictions) = drive(&mut chain, &mut ctx);
        assert_eq!(handler, Some("opening_hours"));
        assert_eq!(predictions, 0);
        assert!(matches!(verdict, Verdict::Reply { text, .. } if text.contains("9:00")));
        // Other messages pass it by.
        let mut ctx = BotContext::new(1, "acme", "v", "my card");
        let (_, handler, predictions) = drive(&mut chain, &mut ctx);
        assert_eq!((handler, predictions), (Some("intent"), 1));
    }

    #[test]
    fn factory_errors_propagate() {
        let (bot, risk) = configs();
        let mut registry = Registry::empty();
        registry
            .register("needs_setup", |_: &BotConfig, _: &RiskControlConfig| {
                Err(BotError::Handler {
                    name: "needs_setup".into(),
                    message: "missing key".into(),
                })
            })
            .unwrap();
        let err = Chain::from_specs(&registry, &[HandlerSpec::new("needs_setup")], &bot, &risk)
            .unwrap_err();
        assert_eq!(err.to_string(), "bot handler \"needs_setup\": missing key");
    }
}
