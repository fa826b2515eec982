//! `intent`: answers from the knowledge base when the match is confident and unambiguous.
//!
//! It always needs the intent (the chain asks the driver for it before calling). It replies with
//! the matched entry's answer when `score >= confidence_threshold`, `score - second_score >=
//! margin_threshold` and the entry has an answer; otherwise it lets the message through, and a
//! chain that ends without a decision is a failed (fallback) turn. A reply from a degraded
//! (lexical) match carries `degraded: true` so the driver can count it.

use super::{priority, BotContext, MessageHandler, Verdict};
use crate::config::BotConfig;

/// The `intent` handler.
#[derive(Clone, Debug)]
pub struct IntentAnswer {
    confidence_threshold: f64,
    margin_threshold: f64,
}

impl IntentAnswer {
    pub fn from_config(bot: &BotConfig) -> IntentAnswer {
        IntentAnswer::new(bot.confidence_threshold, bot.margin_threshold)
    }

    pub fn new(confidence_threshold: f64, margin_threshold: f64) -> IntentAnswer {
        IntentAnswer {
            confidence_threshold,
            margin_threshold,
        }
    }
}

impl MessageHandler for IntentAnswer {
    fn name(&self) -> &'static str {
        "intent"
    }

    fn priority(&self) -> i32 {
        priority::INTENT
    }

    fn needs_intent(&self) -> bool {
        true
    }

    fn handle(&mut self, ctx: &mut BotContext<'_>) -> Verdict {
        let Some(m) = &ctx.intent else {
            return Verdict::NeedIntent;
        };
        let Some(answer) = &m.answer else {
            return Verdict::Continue;
        };
        let score = f64::from(m.score);
        let margin = score - f64::from(m.second_score);
        if score >= self.confidence_threshold && margin >= self.margin_threshold {
            Verdict::Reply {
                text: answer.clone(),
                intent: Some(m.intent.clone()),
                confidence: m.score,
                failed: false,
                degraded: m.degraded,
            }
        } else {
            Verdict::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bot::IntentMatch;

    fn with_match(score: f32, second: f32, answer: Option<&str>, degraded: bool) -> Verdict {
        let mut h = IntentAnswer::new(0.5, 0.05);
        let mut ctx = BotContext::new(1, "acme", "v", "where is my card");
        ctx.intent = Some(IntentMatch {
            intent: "card_arrival".into(),
            answer: answer.map(String::from),
            score,
            second_score: second,
            degraded,
        });
        h.handle(&mut ctx)
    }

    #[test]
    fn answers_a_confident_unambiguous_match() {
        assert_eq!(
            with_match(0.8, 0.3, Some("It arrives in 3 days."), false),
            Verdict::Reply {
                text: "It arrives in 3 days.".into(),
                intent: Some("card_arrival".into()),
                confidence: 0.8,
                failed: false,
                degraded: false,
            }
        );
    }

    #[test]
    fn thresholds_are_inclusive() {
        assert!(matches!(
            with_match(0.5, 0.25, Some("a"), false),
            Verdict::Reply { .. }
        ));
        assert!(matches!(
            with_match(0.75, 0.7, Some("a"), false),
            Verdict::Reply { .. }
        ));
    }

    #[test]
    fn low_score_ambiguity_or_missing_answer_continue() {
        assert_eq!(with_match(0.49, 0.0, Some("a"), false), Verdict::Continue);
        assert_eq!(with_match(0.9, 0.86, Some("a"), false), Verdict::Continue);
        assert_eq!(with_match(0.9, 0.1, None, false), Verdict::Continue);
    }

    #[test]
    fn degraded_matches_are_marked() {
        let Verdict::Reply { degraded, .. } = with_match(0.9, 0.1, Some("a"), true) else {
            panic!("no reply")
        };
        assert!(degraded);
    }

    #[test]
    fn asks_for_the_intent() {
        let mut h = IntentAnswer::new(0.5, 0.05);
        assert!(h.needs_intent());
        let mut ctx = BotContext::new(1, "acme", "v", "hello");
        assert_eq!(h.handle(&mut ctx), Verdict::NeedIntent);
    }
}
