//! Typing indicators: each side forwards at most one change per `typing_interval`; a change inside
//! the interval is held and its final state sent at the first tick after the interval ends, and an
//! indicator not renewed within `typing_expiry` is switched off.

use super::*;

/// One side's typing indicator as the other side sees it, throttled.
///
/// At most one change (or renewal of "on") is forwarded per interval, however
/// the client alternates on and off; a change inside the interval is held and
/// the LAST requested state is delivered by [`Typing::tick`] once the interval
/// has ended, so the other side always ends up with the true final state.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Typing {
    /// Whether the other side was last told "on".
    pub(super) shown: bool,
    /// When an indicator was last forwarded.
    pub(super) forwarded_ms: Option<u64>,
    /// The state requested inside the interval, not yet forwarded.
    pub(super) held: Option<bool>,
}

impl Typing {
    /// A client asked for `on`; returns the state to forward now, if any.
    pub(super) fn request(&mut self, on: bool, now_ms: u64, interval_ms: u64) -> Option<bool> {
        let in_interval = self
            .forwarded_ms
            .is_some_and(|at| now_ms.saturating_sub(at) < interval_ms);
        if in_interval {
            self.held = (on != self.shown).then_some(on);
            return None;
        }
        if !on && !self.shown {
            self.held = None;
            return None;
        }
        self.forward(on, now_ms)
    }

    /// Once a tick: the held state when its interval is over, or "off" when an
    /// "on" was not renewed within `expiry_ms`.
    pub(super) fn tick(&mut self, now_ms: u64, interval_ms: u64, expiry_ms: u64) -> Option<bool> {
        let since = now_ms.saturating_sub(self.forwarded_ms?);
        if let Some(on) = self.held {
            if since >= interval_ms {
                return self.forward(on, now_ms);
            }
        } else if self.shown && since >= expiry_ms {
            return self.forward(false, now_ms);
        }
        None
    }

    pub(super) fn forward(&mut self, on: bool, now_ms: u64) -> Option<bool> {
        self.shown = on;
        self.held = None;
        self.forwarded_ms = Some(now_ms);
        Some(on)
    }

    /// Whether the indicator needs the conversation kept in memory.
    pub(super) fn busy(&self) -> bool {
        self.shown || self.held.is_some()
    }
}

impl Owner {
    /// Sends the typing changes held back by the throttle whose interval has
    /// ended, and switches off indicators not renewed within `typing_expiry`.
    pub(super) fn flush_typing(&mut self, now_ms: u64, out: &mut Vec<OwnerAction>) {
        let (interval, expiry) = (self.config.typing_interval_ms, self.config.typing_expiry_ms);
        let mut changes = Vec::new();
        for (conversation, live) in &mut self.live {
            if let Some(on) = live.visitor_typing.tick(now_ms, interval, expiry) {
                changes.push((*conversation, "visitor", on));
            }
            if let Some(on) = live.agent_typing.tick(now_ms, interval, expiry) {
                changes.push((*conversation, "agent", on));
            }
        }
        for (conversation, from, on) in changes {
            let Some(live) = self.live.get(&conversation) else {
                continue;
            };
            let typing = frame(serde_json::json!({
                "type": "typing", "conversation": conversation.0, "from": from, "on": on,
            }));
            if from == "visitor" {
                for to in live.followers() {
                    out.push(OwnerAction::Send {
                        to: *to,
                        frame: typing.clone(),
                    });
                }
            } else {
                for to in &live.watchers {
                    out.push(OwnerAction::Send {
                        to: *to,
                        frame: typing.clone(),
                    });
                }
                self.send_visitors(&live.key, None, &typing, out);
            }
        }
    }
}
