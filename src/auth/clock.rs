//! Wall-clock helpers for account records and tokens: Unix seconds and RFC 3339 text.
//!
//! Lockouts and token expiry are absolute times that must survive restarts, so they use the
//! wall clock (Unix seconds), read only by the drivers and passed into the sans-IO code.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `secs` as RFC 3339 UTC, e.g. `2026-12-02T06:00:00Z` (whole seconds: token expiries and
/// lockouts are never finer). The calendar arithmetic is the protocol's one.
pub fn rfc3339(secs: u64) -> String {
    let with_millis = crate::conversation::protocol::rfc3339(secs.saturating_mul(1000));
    // "YYYY-MM-DDTHH:MM:SS.mmmZ" -> "YYYY-MM-DDTHH:MM:SSZ"
    format!("{}Z", &with_millis[..with_millis.len() - 5])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
        assert_eq!(rfc3339(1_709_210_096), "2024-02-29T12:34:56Z");
    }
}
