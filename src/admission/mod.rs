//! Admission control: who gets in, how fast, and what the shard gives up under load.
//!
//! Everything here is pure and sans-IO (callers pass a monotonic `now_ms`, the shard's own
//! clock); `server` drives it at accept and in each session task, `conversation::router` for bot
//! queries. Every rate goes through the one limiter in [`crate::ratelimit`].
//!
//! - [`AcceptGate`]: at accept, before a byte is parsed: the IP blocklist, then new connections
//!   per IP (a per-shard [`KeyedBuckets`], so a client spread over `n` shards by the kernel gets
//!   at most `n` times the rate).
//! - [`SessionLimits`]: per session, messages and frames (every frame, cheap ones included),
//!   and the abuse budget: every refused frame takes from it, and an empty budget closes the
//!   session with 1008.
//! - [`degrade`]: the shard's load level (normal, shed, refuse) from its event-loop lag and
//!   queue depths, with hysteresis.
//! - [`shed`]: message-level load shedding: a visitor message that would wait past
//!   `limits.admit_latency_budget` on its owner shard is refused at once with `overloaded`.
//! - [`blocklist`]: the CIDR list file.
//! - [`LogGate`]: at most so many hostile-input log lines per second per shard, counting the
//!   ones it suppresses.
//!
//! Invariants: a refusal always tells the client why (HTTP 429 with `Retry-After`, an `error`
//! frame `rate_limited` with `retry_after`, or a close code); nothing here allocates per idle
//! session; keyed state is bounded by `limits.tracked_keys`.

pub mod blocklist;
pub mod degrade;
pub mod shed;

use std::net::IpAddr;

use crate::config::LimitsConfig;
use crate::ratelimit::{KeyedBuckets, Rate, RetryAfter, TokenBucket};

pub use blocklist::{Blocklist, BlocklistError};
pub use degrade::{Level, Sample, Thresholds, Transition};

/// What the accept loop does with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptDecision {
    /// Serve it.
    Admit,
    /// The peer is on the blocklist: close at once, write nothing.
    Blocked,
    /// Too many new connections from this IP: answer 429 with `Retry-After` and close.
    RateLimited(RetryAfter),
}

/// The accept-time checks of one shard.
#[derive(Debug)]
pub struct AcceptGate {
    per_ip: KeyedBuckets<IpAddr>,
    blocklist: Blocklist,
}

impl AcceptGate {
    pub fn new(limits: &LimitsConfig, blocklist: Blocklist) -> AcceptGate {
        AcceptGate {
            per_ip: KeyedBuckets::new(
                rate(limits.connections_per_ip, limits.connection_burst),
                limits.tracked_keys,
            ),
            blocklist,
        }
    }

    /// Decides about a connection from `ip` at `now_ms`.
    pub fn check(&mut self, ip: IpAddr, now_ms: u64) -> AcceptDecision {
        let ip = canonical(ip);
        if self.blocklist.contains(ip) {
            return AcceptDecision::Blocked;
        }
        match self.per_ip.try_take(&ip, now_ms, 1.0) {
            Ok(()) => AcceptDecision::Admit,
            Err(retry) => AcceptDecision::RateLimited(retry),
        }
    }

    /// Takes new per-IP connection limits (a configuration reload); every IP's bucket starts
    /// full again, the blocklist stays.
    pub fn set_limits(&mut self, limits: &LimitsConfig) {
        self.per_ip = KeyedBuckets::new(
            rate(limits.connections_per_ip, limits.connection_burst),
            limits.tracked_keys,
        );
    }

    /// Replaces the blocklist (after a reload).
    pub fn set_blocklist(&mut self, blocklist: Blocklist) {
        self.blocklist = blocklist;
    }

    /// The blocklist in force.
    pub fn blocklist(&self) -> &Blocklist {
        &self.blocklist
    }
}

/// An IPv4 address mapped into IPv6 (`::ffff:a.b.c.d`, what a dual-stack socket reports) is the
/// IPv4 address: the same client gets the same bucket and the same blocklist verdict.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// A configured rate: `per_second` (0 = unlimited) with room for `burst` at once.
pub fn rate(per_second: f64, burst: u32) -> Rate {
    Rate::new(per_second, f64::from(burst.max(1)))
}

/// What a frame is, for the per-session budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameClass {
    /// A chat message (stored): takes from the message budget and the frame budget.
    Message,
    /// Anything else (typing, read, handoff, accept, status, ...): the frame budget only.
    Other,
}

/// The rates every session of a shard shares (from `[limits]` and `[conversations]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SessionRates {
    pub messages: Rate,
    pub frames: Rate,
    /// Refused frames: `abuse_limit` per `abuse_window`. The budget holds `abuse_limit - 1`, so
    /// the `abuse_limit`-th refusal within a window closes the session (as before the window
    /// existed: 10 malformed frames in a row close it).
    pub abuse: Rate,
}

impl SessionRates {
    /// The rates of visitor sessions.
    pub fn visitor(limits: &LimitsConfig, abuse_limit: u32) -> SessionRates {
        let window = limits.abuse_window.as_secs_f64().max(0.001);
        let abuse_limit = abuse_limit.max(1);
        SessionRates {
            messages: rate(
                limits.visitor_messages_per_second,
                limits.visitor_message_burst,
            ),
            frames: rate(limits.visitor_frames_per_second, limits.visitor_frame_burst),
            abuse: Rate::new(f64::from(abuse_limit) / window, f64::from(abuse_limit - 1)),
        }
    }

    /// The rates of agent sessions.
    pub fn agent(limits: &LimitsConfig, abuse_limit: u32) -> SessionRates {
        SessionRates {
            messages: rate(limits.agent_messages_per_second, limits.agent_message_burst),
            frames: rate(limits.agent_frames_per_second, limits.agent_frame_burst),
            ..SessionRates::visitor(limits, abuse_limit)
        }
    }
}

/// One session's budgets: 48 bytes, no heap.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    messages: TokenBucket,
    frames: TokenBucket,
    abuse: TokenBucket,
}

/// What to do with a refused frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbuseVerdict {
    /// Answer the refusal; the session stays.
    Tolerate,
    /// The abuse budget is spent: close with 1008.
    Close,
}

impl SessionLimits {
    /// Full budgets at `now_ms`.
    pub fn new(rates: &SessionRates, now_ms: u64) -> SessionLimits {
        SessionLimits {
            messages: TokenBucket::full(rates.messages, now_ms),
            frames: TokenBucket::full(rates.frames, now_ms),
            abuse: TokenBucket::full(rates.abuse, now_ms),
        }
    }

    /// Admits a frame, or says when to retry. A refused frame takes nothing from any budget
    /// except (through [`SessionLimits::refused`], which the caller calls) the abuse budget.
    pub fn admit(
        &mut self,
        rates: &SessionRates,
        class: FrameClass,
        now_ms: u64,
    ) -> Result<(), RetryAfter> {
        if class == FrameClass::Message {
            // Check the frame budget first without taking, so a refusal takes from neither.
            if !rates.frames.is_unlimited() && self.frames.available(rates.frames, now_ms) < 1.0 {
                return self.frames.try_take(rates.frames, now_ms, 1.0);
            }
            self.messages.try_take(rates.messages, now_ms, 1.0)?;
        }
        self.frames.try_take(rates.frames, now_ms, 1.0)
    }

    /// Counts one refused frame (ours, or one refused by the conversation's owner).
    pub fn refused(&mut self, rates: &SessionRates, now_ms: u64) -> AbuseVerdict {
        match self.abuse.try_take(rates.abuse, now_ms, 1.0) {
            Ok(()) => AbuseVerdict::Tolerate,
            Err(_) => AbuseVerdict::Close,
        }
    }
}

/// The `error` frame of a rate-limited frame: `retry_after` in milliseconds.
pub fn rate_limited_frame(what: &str, retry: RetryAfter) -> String {
    serde_json::json!({
        "type": "error",
        "code": "rate_limited",
        "message": format!("too many {what}; retry after {} ms", retry.ms),
        "retry_after": retry.ms,
    })
    .to_string()
}

/// The HTTP 429 (or 503) answer written at accept without reading the request.
pub fn refusal_response(status: u16, retry: RetryAfter, body: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    let secs = retry.secs().to_string();
    crate::http::write_response(
        &mut out,
        status,
        "text/plain; charset=utf-8",
        body.as_bytes(),
        &[("Retry-After", &secs)],
    );
    out
}

/// Lets at most `per_second` hostile-input log lines through per shard (a burst of as many),
/// and counts the rest so the next line can say how many were suppressed.
#[derive(Debug)]
pub struct LogGate {
    rate: Rate,
    bucket: TokenBucket,
    suppressed: u64,
}

impl LogGate {
    /// `per_second` of 0 logs every line.
    pub fn new(per_second: u32, now_ms: u64) -> LogGate {
        let rate = Rate::new(f64::from(per_second), f64::from(per_second.max(1)));
        LogGate {
            rate,
            bucket: TokenBucket::full(rate, now_ms),
            suppressed: 0,
        }
    }

    /// `Some(suppressed before this line)` if the line may be written, `None` if it is
    /// suppressed (and counted).
    pub fn admit(&mut self, now_ms: u64) -> Option<u64> {
        match self.bucket.try_take(self.rate, now_ms, 1.0) {
            Ok(()) => Some(std::mem::take(&mut self.suppressed)),
            Err(_) => {
                self.suppressed += 1;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits() -> LimitsConfig {
        let mut limits = crate::config::Config::default().limits;
        limits.connections_per_ip = 2.0;
        limits.connection_burst = 3;
        limits.visitor_messages_per_second = 1.0;
        limits.visitor_message_burst = 2;
        limits.visitor_frames_per_second = 10.0;
        limits.visitor_frame_burst = 4;
        limits.abuse_window = Duration::from_secs(10);
        limits
    }

    #[test]
    fn accept_gate_limits_per_ip_and_blocks_listed_networks() {
        let blocklist = Blocklist::parse("10.0.0.0/8\n2001:db8::/32\n", "test").unwrap();
        let mut gate = AcceptGate::new(&limits(), blocklist);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(gate.check(a, 0), AcceptDecision::Admit);
        }
        assert_eq!(
            gate.check(a, 0),
            AcceptDecision::RateLimited(RetryAfter { ms: 500 })
        );
        assert_eq!(gate.check(b, 0), AcceptDecision::Admit);
        assert_eq!(gate.check(a, 500), AcceptDecision::Admit);
        assert_eq!(
            gate.check("10.1.2.3".parse().unwrap(), 0),
            AcceptDecision::Blocked
        );
        // The IPv4-mapped form of a listed address is blocked too.
        assert_eq!(
            gate.check("::ffff:10.1.2.3".parse().unwrap(), 0),
            AcceptDecision::Blocked
        );
        assert_eq!(
            gate.check("2001:db8::1".parse().unwrap(), 0),
            AcceptDecision::Blocked
        );
    }

    #[test]
    fn zero_connection_rate_admits_everything() {
        let mut limits = limits();
        limits.connections_per_ip = 0.0;
        let mut gate = AcceptGate::new(&limits, Blocklist::default());
        for _ in 0..10_000 {
            assert_eq!(
                gate.check("192.0.2.1".parse().unwrap(), 0),
                AcceptDecision::Admit
            );
        }
    }

    #[test]
    fn messages_and_frames_have_separate_budgets() {
        let rates = SessionRates::visitor(&limits(), 10);
        let mut session = SessionLimits::new(&rates, 0);
        assert_eq!(session.admit(&rates, FrameClass::Message, 0), Ok(()));
        assert_eq!(session.admit(&rates, FrameClass::Message, 0), Ok(()));
        // Third message in the same instant: 1 per second, burst 2.
        assert_eq!(
            session.admit(&rates, FrameClass::Message, 0),
            Err(RetryAfter { ms: 1000 })
        );
        // Frames still have 2 of their 4 (the refused message took none).
        assert_eq!(session.admit(&rates, FrameClass::Other, 0), Ok(()));
        assert_eq!(session.admit(&rates, FrameClass::Other, 0), Ok(()));
        assert_eq!(
            session.admit(&rates, FrameClass::Other, 0),
            Err(RetryAfter { ms: 100 })
        );
        // With the frame budget empty a message is refused on it and its own budget is kept.
        assert_eq!(
            session.admit(&rates, FrameClass::Message, 1000),
            Ok(()),
            "1 s later both budgets have refilled"
        );
    }

    #[test]
    fn the_abuse_limit_th_refusal_within_the_window_closes() {
        let rates = SessionRates::visitor(&limits(), 10);
        let mut session = SessionLimits::new(&rates, 0);
        for _ in 0..9 {
            assert_eq!(session.refused(&rates, 0), AbuseVerdict::Tolerate);
        }
        assert_eq!(session.refused(&rates, 0), AbuseVerdict::Close);
        // Spread over more than the window, refusals never close: 1 per second is the rate.
        let mut calm = SessionLimits::new(&rates, 0);
        for second in 0..100 {
            assert_eq!(calm.refused(&rates, second * 1000), AbuseVerdict::Tolerate);
        }
        // An abuse limit of 1 closes at the first refusal.
        let strict = SessionRates::visitor(&limits(), 1);
        let mut one = SessionLimits::new(&strict, 0);
        assert_eq!(one.refused(&strict, 0), AbuseVerdict::Close);
    }

    #[test]
    fn rate_limited_frame_carries_code_and_retry_after() {
        let frame: serde_json::Value =
            serde_json::from_str(&rate_limited_frame("messages", RetryAfter { ms: 250 })).unwrap();
        assert_eq!(frame["type"], "error");
        assert_eq!(frame["code"], "rate_limited");
        assert_eq!(frame["retry_after"], 250);
        assert!(frame["message"].as_str().unwrap().contains("250 ms"));
    }

    #[test]
    fn refusal_response_has_retry_after_in_whole_seconds() {
        let text = String::from_utf8(refusal_response(
            429,
            RetryAfter { ms: 1200 },
            "slow down\n",
        ))
        .unwrap();
        assert!(
            text.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nRetry-After: 2\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nslow down\n"));
    }

    #[test]
    fn log_gate_passes_its_rate_and_counts_the_rest() {
        let mut gate = LogGate::new(2, 0);
        assert_eq!(gate.admit(0), Some(0));
        assert_eq!(gate.admit(0), Some(0));
        assert_eq!(gate.admit(0), None);
        assert_eq!(gate.admit(100), None);
        assert_eq!(gate.admit(500), Some(2));
        assert_eq!(gate.admit(500), None);
        let mut all = LogGate::new(0, 0);
        for _ in 0..1000 {
            assert_eq!(all.admit(0), Some(0));
        }
    }
}
