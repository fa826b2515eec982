//! The time base of the conversation state machines' timers.
//!
//! [`monotonic_ms`] counts milliseconds from the first call in the process on `Instant`
//! (`CLOCK_MONOTONIC`): agent grace, typing expiry, queue waits, the bot's flood windows and
//! query rates all run on it, so a step of the wall clock (NTP, `date -s`, a VM resumed)
//! moves none of them. It never goes backwards and is the same on every shard.
//!
//! What is data stays on the wall clock ([`super::protocol::now_ms`]): the timestamps stored
//! with messages and conversations, and anything compared with them (the expiry of empty
//! conversations reads their stored `updated_ms`).

use std::sync::OnceLock;
use std::time::Instant;

static ORIGIN: OnceLock<Instant> = OnceLock::new();

/// Milliseconds on the process's monotonic clock (origin: the first call).
pub fn monotonic_ms() -> u64 {
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_monotonic_clock_starts_near_zero_and_follows_elapsed_time() {
        let first = monotonic_ms();
        let started = Instant::now();
        std::thread::sleep(Duration::from_millis(30));
        let second = monotonic_ms();
        assert!(second >= first + 30, "{first} then {second}");
        assert!(second - first <= started.elapsed().as_millis() as u64 + 1);
        // Not a Unix time: far below 2001-09-09 (10^12 ms), whatever the wall clock says.
        assert!(second < 1_000_000_000_000);
    }
}
