//! `risk_control`: the first handler. Per message, in this order:
//!
//! 1. flood guard — a visitor (of a site) whose last `flood_window` already holds `flood_messages`
//!    accepted messages is refused with code `"flood"`; refused messages are not counted, so a
//!    visitor is throttled to `flood_messages` per window rather than locked out while sending;
//! 2. blocked words (whole-word, case-insensitive, see [`WordList`]) and blocked patterns
//!    (regular expressions, matched as written) → code `"blocked"`; the visitor is not told
//!    which rule matched;
//! 3. card-number masking (see [`cards`](super::cards)) in `ctx.text`, so the stored text is
//!    masked.
//!
//! It is a guard: it also runs while an agent has the conversation.
//!
//! Memory: the flood guard keeps, per visitor seen within the last window, at most
//! `flood_messages` timestamps. Visitors idle for a whole window are dropped by
//! [`FloodGuard::prune`], which also runs by itself at most once per window as messages arrive,
//! so the map holds only visitors active in about the last two windows.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};

use super::cards::mask_card_numbers;
use super::words::WordList;
use super::{priority, BotContext, BotError, MessageHandler, Verdict};
use crate::config::RiskControlConfig;

/// Compiled size limit of one pattern and of the pattern set.
const PATTERN_SIZE_LIMIT: usize = 10 << 20;

/// The `risk_control` handler.
#[derive(Debug)]
pub struct RiskControl {
    blocked_words: WordList,
    /// `None` when no patterns are configured.
    blocked_patterns: Option<RegexSet>,
    mask_card_numbers: bool,
    flood: FloodGuard,
}

impl RiskControl {
    /// Compiles the word list and the patterns; an invalid pattern is an error quoting it.
    pub fn from_config(config: &RiskControlConfig) -> Result<RiskControl, BotError> {
        let blocked_words = WordList::new("risk_control.blocked_words", &config.blocked_words)?;
        let blocked_patterns = compile_patterns(&config.blocked_patterns)?;
        Ok(RiskControl {
            blocked_words,
            blocked_patterns,
            mask_card_numbers: config.mask_card_numbers,
            flood: FloodGuard::new(config.flood_messages, config.flood_window),
        })
    }

    /// The flood guard (for its size in metrics).
    pub fn flood(&self) -> &FloodGuard {
        &self.flood
    }

    fn is_blocked(&self, text: &str) -> bool {
        self.blocked_words.matches(text)
            || self
                .blocked_patterns
                .as_ref()
                .is_some_and(|set| set.is_match(text))
    }
}

fn compile_patterns(patterns: &[String]) -> Result<Option<RegexSet>, BotError> {
    if patterns.is_empty() {
        return Ok(None);
    }
    // One by one first, so an error names the pattern at fault.
    for pattern in patterns {
        let result: Result<Regex, _> = RegexBuilder::new(pattern)
            .size_limit(PATTERN_SIZE_LIMIT)
            .build();
        if let Err(source) = result {
            return Err(BotError::BadPattern {
                pattern: pattern.clone(),
                source,
            });
        }
    }
    RegexSetBuilder::new(patterns)
        .size_limit(PATTERN_SIZE_LIMIT)
        .build()
        .map(Some)
        .map_err(|source| BotError::BadList {
            key: "risk_control.blocked_patterns",
            source,
        })
}

impl MessageHandler for RiskControl {
    fn name(&self) -> &'static str {
        "risk_control"
    }

    fn priority(&self) -> i32 {
        priority::RISK_CONTROL
    }

    fn is_guard(&self) -> bool {
        true
    }

    fn handle(&mut self, ctx: &mut BotContext<'_>) -> Verdict {
        if !self.flood.admit(ctx.site, ctx.visitor, ctx.now_ms) {
            return Verdict::Block {
                code: "flood",
                message: format!(
                    "too many messages: at most {} every {}; wait a moment and send it again",
                    self.flood.limit,
                    human_duration(self.flood.window_ms)
                ),
            };
        }
        if self.is_blocked(&ctx.text) {
            return Verdict::Block {
                code: "blocked",
                message:
                    "the message was refused: it contains content this service does not accept"
                        .to_string(),
            };
        }
        if self.mask_card_numbers {
            mask_card_numbers(&mut ctx.text);
        }
        Verdict::Continue
    }

    fn prune(&mut self, now_ms: u64) {
        self.flood.prune(now_ms);
    }
}

fn human_duration(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Per-visitor sliding-window message counter.
#[derive(Debug)]
pub struct FloodGuard {
    limit: u32,
    window_ms: u64,
    /// Key: `site`, NUL, `visitor`. Value: accepted message times within the window, oldest
    /// first, at most `limit` of them.
    visitors: HashMap<Box<str>, VecDeque<u64>>,
    /// Reused to build lookup keys without allocating.
    key: String,
    next_prune_ms: u64,
}

impl FloodGuard {
    /// At most `limit` messages per visitor in any `window`. A zero limit refuses everything.
    pub fn new(limit: u32, window: Duration) -> FloodGuard {
        FloodGuard {
            limit,
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            visitors: HashMap::new(),
            key: String::new(),
            next_prune_ms: 0,
        }
    }

    /// Records a message of `visitor` at `now_ms` and returns `true`, or returns `false`
    /// without recording it when the visitor's messages in `(now_ms - window, now_ms]`
    /// already number `limit`. `now_ms` must not go backwards (use a monotonic clock).
    pub fn admit(&mut self, site: &str, visitor: &str, now_ms: u64) -> bool {
        if now_ms >= self.next_prune_ms {
            self.prune(now_ms);
            self.next_prune_ms = now_ms.saturating_add(self.window_ms);
        }
        let limit = self.limit as usize;
        if limit == 0 {
            return false;
        }
        self.key.clear();
        self.key.push_str(site);
        self.key.push('\0');
        self.key.push_str(visitor);
        let window_ms = self.window_ms;
        if !self.visitors.contains_key(self.key.as_str()) {
            self.visitors
                .insert(Box::from(self.key.as_str()), VecDeque::new());
        }
        let Some(times) = self.visitors.get_mut(self.key.as_str()) else {
            return true; // just inserted
        };
        while times
            .front()
            .is_some_and(|&t| t.saturating_add(window_ms) <= now_ms)
        {
            times.pop_front();
        }
        if times.len() >= limit {
            return false;
        }
        times.push_back(now_ms);
        true
    }

    /// Forgets visitors with no accepted message in `(now_ms - window, now_ms]`.
    pub fn prune(&mut self, now_ms: u64) {
        let window_ms = self.window_ms;
        self.visitors.retain(|_, times| {
            times
                .back()
                .is_some_and(|&t| t.saturating_add(window_ms) > now_ms)
        });
        let capacity = self.visitors.capacity();
        if capacity > 64 && self.visitors.len() < capacity / 4 {
            self.visitors.shrink_to(self.visitors.len() * 2);
        }
    }

    /// Visitors currently tracked.
    pub fn tracked_visitors(&self) -> usize {
        self.visitors.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config() -> RiskControlConfig {
        let mut c = Config::default().risk_control;
        c.blocked_words = vec!["scam".into(), "free money".into()];
        c.blocked_patterns = vec![r"(?i)bit\.ly/\w+".into(), r"\b\d{3}-\d{2}-\d{4}\b".into()];
        c.mask_card_numbers = true;
        c.flood_messages = 3;
        c.flood_window = Duration::from_secs(10);
        c
    }

    fn run(h: &mut RiskControl, visitor: &str, text: &str, now_ms: u64) -> (Verdict, String) {
        let mut ctx = BotContext::new(1, "acme", visitor, text);
        ctx.now_ms = now_ms;
        let verdict = h.handle(&mut ctx);
        (verdict, ctx.text)
    }

    fn code(v: &Verdict) -> Option<&'static str> {
        match v {
            Verdict::Block { code, .. } => Some(code),
            _ => None,
        }
    }

    #[test]
    fn blocked_words_and_patterns_block() {
        let mut h = RiskControl::from_config(&config()).unwrap();
        for (i, text) in [
            "this is a SCAM",
            "get Free Money now",
            "see BIT.LY/abc123",
            "my ssn is 123-45-6789",
        ]
        .iter()
        .enumerate()
        {
            let (v, _) = run(&mut h, &format!("v{i}"), text, 0);
            assert_eq!(code(&v), Some("blocked"), "{text}");
        }
        for (i, text) in [
            "scampi for dinner",
            "freemoney",
            "bitXly/abc",
            "123-456-789",
        ]
        .iter()
        .enumerate()
        {
            let (v, out) = run(&mut h, &format!("w{i}"), text, 0);
            assert_eq!(v, Verdict::Continue, "{text}");
            assert_eq!(out, *text);
        }
    }

    #[test]
    fn block_message_does_not_reveal_the_rule() {
        let mut h = RiskControl::from_config(&config()).unwrap();
        let (v, _) = run(&mut h, "v", "scam", 0);
        let Verdict::Block { message, .. } = v else {
            panic!("not blocked: {v:?}")
        };
        assert!(!message.to_lowercase().contains("scam"), "{message}");
    }

    #[test]
    fn masks_cards_in_the_stored_text_only_when_enabled() {
        let mut h = RiskControl::from_config(&config()).unwrap();
        let (v, text) = run(&mut h, "v", "pay with 4111 1111 1111 1111 please", 0);
        assert_eq!(v, Verdict::Continue);
        assert_eq!(text, "pay with **** **** **** 1111 please");

        let mut off = config();
        off.mask_card_numbers = false;
        let mut h = RiskControl::from_config(&off).unwrap();
        let (_, text) = run(&mut h, "v", "pay with 4111 1111 1111 1111 please", 0);
        assert_eq!(text, "pay with 4111 1111 1111 1111 please");
    }

    #[test]
    fn invalid_pattern_is_named() {
        let mut c = config();
        c.blocked_patterns = vec!["fine".into(), "broken(".into()];
        let err = RiskControl::from_config(&c).unwrap_err();
        match &err {
            BotError::BadPattern { pattern, .. } => assert_eq!(pattern, "broken("),
            other => panic!("unexpected error {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains("risk_control.blocked_patterns"), "{text}");
        assert!(text.contains("\"broken(\""), "{text}");
    }

    #[test]
    fn oversized_pattern_is_an_error_not_a_hang() {
        let mut c = config();
        c.blocked_patterns = vec![r"a{1000}{1000}".into()];
        assert!(matches!(
            RiskControl::from_config(&c),
            Err(BotError::BadPattern { .. })
        ));
    }

    #[test]
    fn flood_window_slides() {
        let mut h = RiskControl::from_config(&config()).unwrap();
        // 3 allowed per 10 s window.
        for t in [0, 1_000, 2_000] {
            assert_eq!(run(&mut h, "v", "hi", t).0, Verdict::Continue, "t={t}");
        }
        let (v, _) = run(&mut h, "v", "hi", 9_999);
        assert_eq!(code(&v), Some("flood"));
        // Another visitor, and the same visitor name on another site, are separate.
        assert_eq!(run(&mut h, "w", "hi", 9_999).0, Verdict::Continue);
        let mut ctx = BotContext::new(2, "other-site", "v", "hi");
        ctx.now_ms = 9_999;
        assert_eq!(h.handle(&mut ctx), Verdict::Continue);
        // At 10 000 the message of t=0 left the window: one slot.
        assert_eq!(run(&mut h, "v", "hi", 10_000).0, Verdict::Continue);
        assert_eq!(code(&run(&mut h, "v", "hi", 10_500).0), Some("flood"));
        // At 11 000 the one of t=1 000 left.
        assert_eq!(run(&mut h, "v", "hi", 11_000).0, Verdict::Continue);
        assert_eq!(code(&run(&mut h, "v", "hi", 11_001).0), Some("flood"));
    }

    #[test]
    fn refused_messages_do_not_extend_the_throttle() {
        let mut guard = FloodGuard::new(2, Duration::from_secs(1));
        assert!(guard.admit("s", "v", 0));
        assert!(guard.admit("s", "v", 100));
        // Hammering while throttled...
        for t in (200..1_000).step_by(50) {
            assert!(!guard.admit("s", "v", t));
        }
        // ...does not push the window: the first slot frees at 1 000.
        assert!(guard.admit("s", "v", 1_000));
        assert!(!guard.admit("s", "v", 1_050));
        assert!(guard.admit("s", "v", 1_100));
    }

    #[test]
    fn flood_block_message_names_the_limit() {
        let mut c = config();
        c.flood_messages = 1;
        c.flood_window = Duration::from_millis(1500);
        let mut h = RiskControl::from_config(&c).unwrap();
        run(&mut h, "v", "a", 0);
        let Verdict::Block { code, message } = run(&mut h, "v", "b", 1).0 else {
            panic!("not blocked")
        };
        assert_eq!(code, "flood");
        assert!(message.contains("at most 1 every 1500ms"), "{message}");
    }

    #[test]
    fn blocked_messages_count_toward_the_flood_limit() {
        let mut h = RiskControl::from_config(&config()).unwrap();
        for t in 0..3 {
            assert_eq!(code(&run(&mut h, "v", "scam", t).0), Some("blocked"));
        }
        assert_eq!(code(&run(&mut h, "v", "hello", 3).0), Some("flood"));
    }

    #[test]
    fn idle_visitors_are_pruned() {
        let mut guard = FloodGuard::new(5, Duration::from_secs(10));
        for i in 0..1_000 {
            assert!(guard.admit("s", &format!("visitor-{i}"), 0));
        }
        assert!(guard.admit("s", "late", 5_000));
        assert_eq!(guard.tracked_visitors(), 1_001);
        guard.prune(9_999);
        assert_eq!(guard.tracked_visitors(), 1_001);
        guard.prune(10_000);
        assert_eq!(
            guard.tracked_visitors(),
            1,
            "only the visitor active at 5 000 stays"
        );
        guard.prune(15_000);
        assert_eq!(guard.tracked_visitors(), 0);
    }

    #[test]
    fn admit_prunes_by_itself_once_per_window() {
        let mut guard = FloodGuard::new(5, Duration::from_secs(10));
        for i in 0..100 {
            assert!(guard.admit("s", &format!("visitor-{i}"), 1));
        }
        assert_eq!(guard.tracked_visitors(), 100);
        // The first admit (t=1) scheduled the next sweep for t=10 001.
        assert!(guard.admit("s", "x", 10_000));
        assert_eq!(guard.tracked_visitors(), 101);
        assert!(guard.admit("s", "y", 10_001));
        assert_eq!(guard.tracked_visitors(), 2);
    }
}
