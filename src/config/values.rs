//! The syntaxes of single values: durations ("250ms"), sizes ("16KiB"), names, origins and log
//! directives: parsing with a reason on failure, and formatting back.

use super::*;

/// A site name as `/ws/visitor?site=` accepts it.
pub(super) fn valid_site_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// An `Origin` header value: `http(s)://host[:port]`, no path.
pub(super) fn check_origin(origin: &str) -> Result<(), String> {
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"));
    match rest {
        Some(host)
            if !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "invalid origin \"{origin}\": write scheme://host[:port] as a browser sends it, e.g. \"https://shop.example\""
        )),
    }
}

pub(super) fn trim_line_break(bytes: &[u8]) -> &[u8] {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    bytes.strip_suffix(b"\r").unwrap_or(bytes)
}

/// A TOML key, quoted when it holds a dot.
pub(super) fn toml_key(name: &str) -> String {
    if name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
    {
        name.to_owned()
    } else {
        Value::from(name).to_string()
    }
}

pub(super) fn check_account_id(id: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if id.is_empty() || id.len() > 64 || !id.chars().all(ok_char) {
        return Err(format!(
            "invalid agent id \"{id}\": use 1 to 64 characters of A-Z a-z 0-9 _ -"
        ));
    }
    Ok(())
}

/// Accepts `level` or a comma-separated list of `level` / `target=level` directives.
pub(super) fn check_log_directives(text: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let is_level = |s: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(s));
    let is_target = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '.'))
    };
    if text.trim().is_empty() {
        return Err("must not be empty; use a level such as \"info\"".to_owned());
    }
    for directive in text.split(',').map(str::trim) {
        let valid = match directive.split_once('=') {
            Some((target, level)) => is_target(target) && is_level(level),
            None => is_level(directive),
        };
        if !valid {
            return Err(format!(
                "invalid log directive \"{directive}\": expected a level (trace, debug, info, warn, \
                 error, off) or target=level such as \"switchboard::storage=debug\""
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Durations and sizes
// ---------------------------------------------------------------------------------------------------

pub(super) const DURATION_UNITS: [(&str, Duration); 5] = [
    ("h", hours(1)),
    ("m", mins(1)),
    ("s", secs(1)),
    ("ms", ms(1)),
    ("us", Duration::from_micros(1)),
];

/// "250ms" → 250 ms. One whole number and one unit (us, ms, s, m, h).
pub(super) fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = split_number(text);
    let hint = "expected a whole number and a unit (us, ms, s, m, h), e.g. \"250ms\"";
    if number.is_empty() {
        return Err(format!("invalid duration \"{text}\": {hint}"));
    }
    let Some(&(_, scale)) = DURATION_UNITS.iter().find(|(name, _)| *name == unit) else {
        return Err(if unit.starts_with('.') {
            format!("invalid duration \"{text}\": fractions are not accepted; use a smaller unit, e.g. \"1500ms\"")
        } else if unit.is_empty() {
            format!("invalid duration \"{text}\": missing unit; {hint}")
        } else {
            format!("invalid duration \"{text}\": unknown unit \"{unit}\"; use us, ms, s, m or h")
        });
    };
    let count: u32 = number
        .parse()
        .map_err(|_| format!("invalid duration \"{text}\": number too large"))?;
    scale
        .checked_mul(count)
        .ok_or_else(|| format!("invalid duration \"{text}\": too large"))
}

/// The largest unit that represents `duration` exactly ("90s", "1500ms"); "0s" for zero.
pub(super) fn format_duration(duration: Duration) -> String {
    if duration.is_zero() {
        return "0s".to_owned();
    }
    let nanos = duration.as_nanos();
    for (name, scale) in DURATION_UNITS {
        let scale = scale.as_nanos();
        if nanos.is_multiple_of(scale) {
            return format!("{}{name}", nanos / scale);
        }
    }
    // Only reachable for sub-microsecond durations, which parsing never produces.
    format!("{}us", duration.as_micros())
}

pub(super) const SIZE_UNITS: [(&str, u64); 5] = [
    ("TiB", TIB),
    ("GiB", GIB),
    ("MiB", MIB),
    ("KiB", KIB),
    ("B", 1),
];

/// "16KiB" → 16384. One whole number and one binary unit (B, KiB, MiB, GiB, TiB).
pub(super) fn parse_size(text: &str) -> Result<u64, String> {
    let (number, unit) = split_number(text);
    if number.is_empty() {
        return Err(format!(
            "invalid size \"{text}\": expected a whole number and a unit (B, KiB, MiB, GiB, TiB), e.g. \"16KiB\""
        ));
    }
    let Some(&(_, scale)) = SIZE_UNITS.iter().find(|(name, _)| *name == unit) else {
        return Err(if unit.is_empty() {
            format!("invalid size \"{text}\": missing unit; write {number} without quotes for bytes, or add B, KiB, MiB, GiB or TiB")
        } else if unit.starts_with('.') {
            format!("invalid size \"{text}\": fractions are not accepted; use a smaller unit")
        } else {
            format!("invalid size \"{text}\": unknown unit \"{unit}\"; use B, KiB, MiB, GiB or TiB (1KiB = 1024 bytes)")
        });
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("invalid size \"{text}\": too large"))
}

/// The largest binary unit that represents `bytes` exactly ("64KiB"), or plain digits ("1000").
pub(super) fn format_size(bytes: u64) -> String {
    for (name, scale) in SIZE_UNITS {
        if scale > 1 && bytes != 0 && bytes.is_multiple_of(scale) {
            return format!("{}{name}", bytes / scale);
        }
    }
    bytes.to_string()
}

/// Splits "250ms" into ("250", "ms").
pub(super) fn split_number(text: &str) -> (&str, &str) {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    text.split_at(digits)
}
