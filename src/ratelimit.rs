//! Token buckets: the one rate limiter every admission rule uses (new connections per IP,
//! messages per session, bot queries per site, logins per account and per IP).
//!
//! Pure and sans-IO: callers pass a monotonic `now` in milliseconds (the shard's own clock,
//! never the wall clock) and get a decision back. Nothing here allocates per decision.
//!
//! Invariants:
//! - A bucket never holds more than `burst` tokens and never goes negative: a refused take
//!   changes nothing, so a client that keeps hammering is not punished beyond the refusal.
//! - `retry_after_ms` of a refusal is the exact time until the requested tokens are back,
//!   rounded up to a whole millisecond, so a client that waits that long is admitted (if
//!   nobody else took tokens from the same bucket meanwhile).
//! - [`KeyedBuckets`] holds at most `capacity` keys. When it is full, keys whose bucket has
//!   refilled completely are forgotten first (they carry no information); if none has, the
//!   least recently used key is dropped, which can only make the limiter more lenient for
//!   that key, never stricter. Memory stays bounded whatever the number of distinct keys.

use std::collections::HashMap;
use std::hash::Hash;

/// A rate: `per_second` tokens refill each second, up to `burst` stored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

impl Rate {
    /// A rate of `per_second` with room for `burst` at once.
    pub fn new(per_second: f64, burst: f64) -> Rate {
        Rate { per_second, burst }
    }

    /// Whether this rate admits everything (a `per_second` of 0 means unlimited).
    pub fn is_unlimited(&self) -> bool {
        self.per_second <= 0.0
    }
}

/// A refusal: try again after this many milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryAfter {
    pub ms: u64,
}

impl RetryAfter {
    /// Whole seconds, rounded up (the HTTP `Retry-After` header's unit), at least 1.
    pub fn secs(self) -> u64 {
        self.ms.div_ceil(1000).max(1)
    }
}

/// One token bucket.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    tokens: f64,
    updated_ms: u64,
}

impl TokenBucket {
    /// A full bucket at time `now_ms`.
    pub fn full(rate: Rate, now_ms: u64) -> TokenBucket {
        TokenBucket {
            tokens: rate.burst,
            updated_ms: now_ms,
        }
    }

    fn refill(&mut self, rate: Rate, now_ms: u64) {
        if now_ms > self.updated_ms {
            let elapsed = (now_ms - self.updated_ms) as f64 / 1000.0;
            self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
            self.updated_ms = now_ms;
        }
    }

    /// Takes `cost` tokens, or says how long until they are there.
    pub fn try_take(&mut self, rate: Rate, now_ms: u64, cost: f64) -> Result<(), RetryAfter> {
        if rate.is_unlimited() {
            return Ok(());
        }
        self.refill(rate, now_ms);
        if self.tokens >= cost {
            self.tokens -= cost;
            Ok(())
        } else {
            // A cost above the burst can never be met; callers keep costs within it.
            let missing = cost - self.tokens;
            // The epsilon absorbs binary rounding of the refill (0.99 tokens is 0.98999...).
            let ms = (missing / rate.per_second * 1000.0 - 1e-6).ceil() as u64;
            Err(RetryAfter { ms: ms.max(1) })
        }
    }

    /// Tokens available at `now_ms` (for metrics and tests).
    pub fn available(&self, rate: Rate, now_ms: u64) -> f64 {
        let mut copy = *self;
        copy.refill(rate, now_ms);
        copy.tokens
    }

    /// Whether the bucket is full at `now_ms` (it then carries no state worth keeping).
    pub fn is_full(&self, rate: Rate, now_ms: u64) -> bool {
        self.available(rate, now_ms) >= rate.burst
    }
}

/// Buckets by key (an IP address, an account name, a site), bounded in number.
#[derive(Debug)]
pub struct KeyedBuckets<K: Hash + Eq + Clone> {
    rate: Rate,
    capacity: usize,
    buckets: HashMap<K, (TokenBucket, u64)>,
    /// Monotonic use counter for least-recently-used eviction.
    clock: u64,
}

impl<K: Hash + Eq + Clone> KeyedBuckets<K> {
    /// At most `capacity` keys (at least 1) share `rate` each.
    pub fn new(rate: Rate, capacity: usize) -> Self {
        KeyedBuckets {
            rate,
            capacity: capacity.max(1),
            buckets: HashMap::new(),
            clock: 0,
        }
    }

    /// The rate every key gets.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Changes the rate (on a configuration reload); existing buckets keep their tokens,
    /// clamped to the new burst at their next take.
    pub fn set_rate(&mut self, rate: Rate) {
        self.rate = rate;
    }

    /// Number of keys tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Takes `cost` tokens from `key`'s bucket.
    pub fn try_take(&mut self, key: &K, now_ms: u64, cost: f64) -> Result<(), RetryAfter> {
        if self.rate.is_unlimited() {
            return Ok(());
        }
        self.clock += 1;
        let clock = self.clock;
        if let Some((bucket, used)) = self.buckets.get_mut(key) {
            *used = clock;
            return bucket.try_take(self.rate, now_ms, cost);
        }
        if self.buckets.len() >= self.capacity {
            self.make_room(now_ms);
        }
        let mut bucket = TokenBucket::full(self.rate, now_ms);
        let decision = bucket.try_take(self.rate, now_ms, cost);
        self.buckets.insert(key.clone(), (bucket, clock));
        decision
    }

    /// Forgets every full bucket; if none was full, the least recently used one.
    fn make_room(&mut self, now_ms: u64) {
        let rate = self.rate;
        self.buckets
            .retain(|_, (bucket, _)| !bucket.is_full(rate, now_ms));
        if self.buckets.len() >= self.capacity {
            if let Some(oldest) = self
                .buckets
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(key, _)| key.clone())
            {
                self.buckets.remove(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_admits_its_burst_then_refuses_with_the_exact_wait() {
        let rate = Rate::new(10.0, 5.0);
        let mut bucket = TokenBucket::full(rate, 0);
        for _ in 0..5 {
            assert_eq!(bucket.try_take(rate, 0, 1.0), Ok(()));
        }
        assert_eq!(bucket.try_take(rate, 0, 1.0), Err(RetryAfter { ms: 100 }));
        // A refused take changes nothing: still 100 ms to wait, not more.
        assert_eq!(bucket.try_take(rate, 0, 1.0), Err(RetryAfter { ms: 100 }));
        assert_eq!(bucket.try_take(rate, 99, 1.0), Err(RetryAfter { ms: 1 }));
        assert_eq!(bucket.try_take(rate, 100, 1.0), Ok(()));
    }

    #[test]
    fn refill_never_exceeds_the_burst() {
        let rate = Rate::new(1000.0, 3.0);
        let mut bucket = TokenBucket::full(rate, 0);
        assert_eq!(bucket.available(rate, 1_000_000), 3.0);
        for _ in 0..3 {
            bucket.try_take(rate, 1_000_000, 1.0).unwrap();
        }
        assert!(bucket.try_take(rate, 1_000_000, 1.0).is_err());
    }

    #[test]
    fn a_clock_that_steps_back_refills_nothing() {
        let rate = Rate::new(1.0, 1.0);
        let mut bucket = TokenBucket::full(rate, 10_000);
        bucket.try_take(rate, 10_000, 1.0).unwrap();
        assert!(bucket.try_take(rate, 5_000, 1.0).is_err());
        assert!(bucket.try_take(rate, 10_999, 1.0).is_err());
        assert!(bucket.try_take(rate, 11_000, 1.0).is_ok());
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let rate = Rate::new(0.0, 0.0);
        let mut bucket = TokenBucket::full(rate, 0);
        for _ in 0..10_000 {
            assert!(bucket.try_take(rate, 0, 1.0).is_ok());
        }
        let mut keyed = KeyedBuckets::new(rate, 1);
        for key in 0..100u32 {
            assert!(keyed.try_take(&key, 0, 1.0).is_ok());
        }
        assert!(keyed.is_empty());
    }

    #[test]
    fn retry_after_seconds_round_up() {
        assert_eq!(RetryAfter { ms: 1 }.secs(), 1);
        assert_eq!(RetryAfter { ms: 1000 }.secs(), 1);
        assert_eq!(RetryAfter { ms: 1001 }.secs(), 2);
    }

    #[test]
    fn keys_are_limited_separately() {
        let mut keyed = KeyedBuckets::new(Rate::new(1.0, 2.0), 100);
        assert!(keyed.try_take(&"a", 0, 1.0).is_ok());
        assert!(keyed.try_take(&"a", 0, 1.0).is_ok());
        assert!(keyed.try_take(&"a", 0, 1.0).is_err());
        assert!(keyed.try_take(&"b", 0, 1.0).is_ok());
    }

    #[test]
    fn keyed_buckets_stay_bounded_and_forget_full_buckets_first() {
        let rate = Rate::new(1.0, 2.0);
        let mut keyed = KeyedBuckets::new(rate, 3);
        // "hot" is drained; the others refill to full by t = 10 s.
        keyed.try_take(&0u32, 0, 2.0).unwrap();
        keyed.try_take(&1u32, 0, 1.0).unwrap();
        keyed.try_take(&2u32, 0, 1.0).unwrap();
        keyed.try_take(&0u32, 9_000, 2.0).unwrap(); // hot again at 9 s
        for key in 3..1000u32 {
            let _ = keyed.try_take(&key, 10_000, 1.0);
            assert!(keyed.len() <= 3);
        }
        // A fresh key beyond the capacity is still limited by its own bucket.
        keyed.try_take(&5000u32, 10_000, 2.0).unwrap();
        assert!(keyed.try_take(&5000u32, 10_000, 1.0).is_err());
    }
}
