//! `human_transfer`: hands the conversation to a human when the visitor asks for one, when the
//! knowledge base recognises a "talk to a human" intent, or after too many failed bot turns.
//!
//! Checks, in order, each ending the chain with [`Verdict::Handoff`]:
//! 1. an explicit request — one of the transfer phrases as whole words, case-insensitive
//!    ([`DEFAULT_PHRASES`] unless configured) → [`HandoffReason::Explicit`];
//! 2. `failed_turns >= failed_turns_before_handoff` → [`HandoffReason::TooManyFailures`]: after
//!    N consecutive fallback replies (each of which offered a human), the next message goes to
//!    the queue;
//! 3. only when transfer intents are configured: the message's intent is one of them with a
//!    score at or above `confidence_threshold` → [`HandoffReason::Intent`]. The intent is asked
//!    for ([`Verdict::NeedIntent`]) only when checks 1 and 2 did not decide, so obvious requests
//!    never wait for inference. The checks are pure, so the resumed call repeats them safely.

use super::words::WordList;
use super::{priority, BotContext, BotError, HandoffReason, MessageHandler, Verdict};
use crate::config::BotConfig;

/// Phrases that ask for a human, used when none are configured.
pub const DEFAULT_PHRASES: &[&str] = &[
    "human",
    "humans",
    "agent",
    "agents",
    "real person",
    "live person",
    "actual person",
    "live agent",
    "operator",
    "representative",
    "talk to someone",
    "speak to someone",
    "speak with someone",
    "talk with someone",
];

/// The `human_transfer` handler.
#[derive(Debug)]
pub struct HumanTransfer {
    phrases: WordList,
    intents: Vec<String>,
    failed_turns_before_handoff: u32,
    confidence_threshold: f64,
}

impl HumanTransfer {
    /// The handler with the default phrases and no transfer intents.
    pub fn from_config(bot: &BotConfig) -> Result<HumanTransfer, BotError> {
        HumanTransfer::new(
            DEFAULT_PHRASES,
            &[] as &[&str],
            bot.failed_turns_before_handoff,
            bot.confidence_threshold,
        )
    }

    /// The handler with explicit `phrases` and transfer `intents` (knowledge-base intent names;
    /// empty: never asks for the intent). `failed_turns_before_handoff == 0` disables the
    /// failed-turns rule.
    pub fn new<P, I>(
        phrases: &[P],
        intents: &[I],
        failed_turns_before_handoff: u32,
        confidence_threshold: f64,
    ) -> Result<HumanTransfer, BotError>
    where
        P: AsRef<str>,
        I: AsRef<str>,
    {
        Ok(HumanTransfer {
            phrases: WordList::new("bot.human_transfer_phrases", phrases)?,
            intents: intents.iter().map(|i| i.as_ref().to_string()).collect(),
            failed_turns_before_handoff,
            confidence_threshold,
        })
    }
}

impl MessageHandler for HumanTransfer {
    fn name(&self) -> &'static str {
        "human_transfer"
    }

    fn priority(&self) -> i32 {
        priority::HUMAN_TRANSFER
    }

    fn handle(&mut self, ctx: &mut BotContext<'_>) -> Verdict {
        if self.phrases.matches(&ctx.text) {
            return Verdict::Handoff {
                reason: HandoffReason::Explicit,
            };
        }
        if self.failed_turns_before_handoff > 0
            && ctx.failed_turns >= self.failed_turns_before_handoff
        {
            return Verdict::Handoff {
                reason: HandoffReason::TooManyFailures,
            };
        }
        if self.intents.is_empty() {
            return Verdict::Continue;
        }
        match &ctx.intent {
            None => Verdict::NeedIntent,
            Some(m)
                if f64::from(m.score) >= self.confidence_threshold
                    && self.intents.contains(&m.intent) =>
            {
                Verdict::Handoff {
                    reason: HandoffReason::Intent,
                }
            }
            Some(_) => Verdict::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bot::IntentMatch;
    use crate::config::Config;

    fn handoff(reason: HandoffReason) -> Verdict {
        Verdict::Handoff { reason }
    }

    fn ctx(text: &str) -> BotContext<'static> {
        BotContext::new(1, "acme", "v", text)
    }

    fn default_handler() -> HumanTransfer {
        let mut bot = Config::default().bot;
        bot.failed_turns_before_handoff = 2;
        HumanTransfer::from_config(&bot).unwrap()
    }

    #[test]
    fn explicit_requests_hand_off() {
        let mut h = default_handler();
        for text in [
            "I want to talk to a human",
            "HUMAN please",
            "can I speak with someone?",
            "get me a Real  Person",
            "operator!",
            "connect me to one of your agents",
        ] {
            assert_eq!(
                h.handle(&mut ctx(text)),
                handoff(HandoffReason::Explicit),
                "{text}"
            );
        }
    }

    #[test]
    fn ordinary_messages_continue() {
        let mut h = default_handler();
        for text in [
            "what is my balance",
            "humanitarian aid",
            "reagent delivery",
            "personal loan",
            "someone stole my card",
        ] {
            assert_eq!(h.handle(&mut ctx(text)), Verdict::Continue, "{text}");
        }
    }

    #[test]
    fn too_many_failed_turns_hand_off() {
        let mut h = default_handler();
        let mut c = ctx("what about my card");
        c.failed_turns = 1;
        assert_eq!(h.handle(&mut c), Verdict::Continue);
        c.failed_turns = 2;
        assert_eq!(h.handle(&mut c), handoff(HandoffReason::TooManyFailures));
        c.failed_turns = 7;
        assert_eq!(h.handle(&mut c), handoff(HandoffReason::TooManyFailures));
    }

    #[test]
    fn zero_disables_the_failed_turns_rule() {
        let mut h = HumanTransfer::new(DEFAULT_PHRASES, &[] as &[&str], 0, 0.5).unwrap();
        let mut c = ctx("hello");
        c.failed_turns = 100;
        assert_eq!(h.handle(&mut c), Verdict::Continue);
    }

    #[test]
    fn never_asks_for_the_intent_without_transfer_intents() {
        let mut h = default_handler();
        assert!(!h.needs_intent());
        assert_eq!(h.handle(&mut ctx("hello")), Verdict::Continue);
    }

    #[test]
    fn transfer_intent_asks_for_the_intent_then_hands_off_above_threshold() {
        let mut h = HumanTransfer::new(&["human"], &["contact_agent"], 3, 0.6).unwrap();
        let mut c = ctx("is there anybody who could help me");
        assert_eq!(h.handle(&mut c), Verdict::NeedIntent);
        let intent = |name: &str, score: f32| IntentMatch {
            intent: name.into(),
            answer: None,
            score,
            second_score: 0.0,
            degraded: false,
        };
        c.intent = Some(intent("contact_agent", 0.7));
        assert_eq!(h.handle(&mut c), handoff(HandoffReason::Intent));
        c.intent = Some(intent("contact_agent", 0.55));
        assert_eq!(h.handle(&mut c), Verdict::Continue);
        c.intent = Some(intent("card_arrival", 0.9));
        assert_eq!(h.handle(&mut c), Verdict::Continue);
        // An explicit request does not wait for the intent.
        let mut c = ctx("human please");
        assert_eq!(h.handle(&mut c), handoff(HandoffReason::Explicit));
    }
}
