//! `echo`: a sample handler that replies with the (already masked) message text. Not in the
//! default chain; useful to try the chain without a model, and the smallest example of a handler.

use super::{priority, BotContext, MessageHandler, Verdict};

/// The `echo` handler.
#[derive(Clone, Copy, Debug, Default)]
pub struct Echo;

impl MessageHandler for Echo {
    fn name(&self) -> &'static str {
        "echo"
    }

    fn priority(&self) -> i32 {
        priority::ECHO
    }

    fn handle(&mut self, ctx: &mut BotContext<'_>) -> Verdict {
        Verdict::Reply {
            text: ctx.text.clone(),
            intent: None,
            confidence: 1.0,
            failed: false,
            degraded: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_with_the_text() {
        let mut ctx = BotContext::new(1, "acme", "v", "ping 42");
        let verdict = Echo.handle(&mut ctx);
        assert_eq!(
            verdict,
            Verdict::Reply {
                text: "ping 42".into(),
                intent: None,
                confidence: 1.0,
                failed: false,
                degraded: false,
            }
        );
        assert_eq!(verdict.next_failed_turns(3), 0);
    }
}
