//! `fallback`: the last resort. Always replies, asking the visitor to rephrase and offering a
//! human, and marks the turn failed so the driver counts it (see
//! [`Verdict::next_failed_turns`]); enough failed turns in a row make `human_transfer` hand off.

use super::{priority, BotContext, MessageHandler, Verdict};

/// What the bot says when it cannot help.
pub const FALLBACK_TEXT: &str = "Sorry, I did not understand that. Could you rephrase your \
question? You can also ask to talk to a human.";

/// The `fallback` handler.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fallback;

impl MessageHandler for Fallback {
    fn name(&self) -> &'static str {
        "fallback"
    }

    fn priority(&self) -> i32 {
        priority::FALLBACK
    }

    fn handle(&mut self, ctx: &mut BotContext<'_>) -> Verdict {
        Verdict::fallback(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bot::IntentMatch;

    #[test]
    fn replies_with_the_fallback_text_as_a_failed_turn() {
        let mut ctx = BotContext::new(1, "acme", "v", "qwerty");
        let verdict = Fallback.handle(&mut ctx);
        assert_eq!(
            verdict,
            Verdict::Reply {
                text: FALLBACK_TEXT.into(),
                intent: None,
                confidence: 0.0,
                failed: true,
                degraded: false,
            }
        );
        assert_eq!(verdict.next_failed_turns(1), 2);
        assert!(FALLBACK_TEXT.contains("human"));
    }

    #[test]
    fn reports_the_score_it_fell_back_from() {
        let mut ctx = BotContext::new(1, "acme", "v", "qwerty");
        ctx.intent = Some(IntentMatch {
            intent: "card_arrival".into(),
            answer: Some("a".into()),
            score: 0.31,
            second_score: 0.3,
            degraded: false,
        });
        let Verdict::Reply {
            confidence, intent, ..
        } = Fallback.handle(&mut ctx)
        else {
            panic!("no reply")
        };
        assert_eq!(confidence, 0.31);
        assert_eq!(intent, None);
    }
}
