//! The JSON frames visitors and agents exchange with the server
//! (`docs/protocol.md` is the public contract).
//!
//! Parsing is a pure function from a text frame to a typed frame or a
//! [`FrameError`] with a stable `code`; the session stays open on every error,
//! and the driver counts errors to close abusive sessions with 1008.
//! Rendering produces the server's frames; timestamps are RFC 3339 UTC.
//!
//! Invariants: a parsed frame has passed every size and shape check (ids are
//! 1..=128 bytes, text is 1..=`max_text_bytes` bytes), so the owner shard never
//! sees an unchecked value.

use serde::{Deserialize, Serialize};

use crate::store::ConversationId;

/// Longest client message id accepted, in bytes.
pub const MAX_CLIENT_ID_BYTES: usize = 128;

/// A frame a visitor sends.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum VisitorFrame {
    /// A chat message; `id` is the client's id for dedup and acks.
    Message { id: String, text: String },
    /// Typing indicator on/off.
    Typing { on: bool },
    /// Everything up to `seq` was read.
    Read { seq: u64 },
    /// Ask for a human.
    Handoff {},
}

/// Agent presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Presence {
    Online,
    Away,
}

/// A frame an agent sends.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentFrame {
    /// Take a queued conversation.
    Accept {
        conversation: u64,
    },
    /// A reply in an assigned conversation.
    Message {
        conversation: u64,
        id: String,
        text: String,
    },
    Typing {
        conversation: u64,
        on: bool,
    },
    Read {
        conversation: u64,
        seq: u64,
    },
    /// Hand an assigned conversation to another agent (account id).
    Transfer {
        conversation: u64,
        to: String,
    },
    /// End an assigned conversation.
    Close {
        conversation: u64,
    },
    /// Online or away.
    Status {
        status: Presence,
    },
    /// Follow any conversation without taking it (roles allowed `ReadAnyConversation`):
    /// its history, then its live messages, typing and read marks.
    Watch {
        conversation: u64,
    },
    /// Stop following a watched conversation.
    Unwatch {
        conversation: u64,
    },
}

impl AgentFrame {
    /// The conversation the frame acts on, if any.
    pub fn conversation(&self) -> Option<ConversationId> {
        match self {
            AgentFrame::Accept { conversation }
            | AgentFrame::Message { conversation, .. }
            | AgentFrame::Typing { conversation, .. }
            | AgentFrame::Read { conversation, .. }
            | AgentFrame::Transfer { conversation, .. }
            | AgentFrame::Close { conversation }
            | AgentFrame::Watch { conversation }
            | AgentFrame::Unwatch { conversation } => Some(ConversationId(*conversation)),
            AgentFrame::Status { .. } => None,
        }
    }
}

/// Why a frame was refused. `code` is stable and documented.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FrameError {
    pub code: &'static str,
    pub message: String,
}

impl FrameError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// The fields of a `message` frame, parsed straight into a struct. An internally tagged enum
/// (`#[serde(tag = "type")]`) first buffers the whole object into serde's `Content` values and
/// then parses those again; for the frame that carries nearly all the traffic that was half of
/// the parse and allocation cost (`perf` at 20,000 round trips/s: frame parsing 3.9% of the
/// server's CPU, `ContentDeserializer` 1.7%). The fast path only returns a frame when the
/// struct parses and `type` is `"message"`, which is exactly when the enum gives
/// `Message { id, text }`; every other frame, and every error, goes through the enum as before.
/// Unknown fields are refused here (so such a frame takes the enum's path): the enum parses
/// every value it buffers in full and refuses a lone surrogate escape, a number out of range
/// or nesting past serde_json's limit in an unknown field, where skipping it would not.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageFields<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    id: String,
    text: String,
}

/// [`MessageFields`] with the agent's `conversation`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentMessageFields<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    conversation: u64,
    id: String,
    text: String,
}

/// Parses a visitor's text frame.
pub fn parse_visitor(text: &str, max_text_bytes: usize) -> Result<VisitorFrame, FrameError> {
    let frame = match serde_json::from_str::<MessageFields>(text) {
        Ok(fields) if fields.kind == "message" => VisitorFrame::Message {
            id: fields.id,
            text: fields.text,
        },
        _ => parse(text)?,
    };
    checked_visitor(frame, max_text_bytes)
}

/// A parsed visitor frame's size and shape checks.
fn checked_visitor(
    mut frame: VisitorFrame,
    max_text_bytes: usize,
) -> Result<VisitorFrame, FrameError> {
    if let VisitorFrame::Message { id, text } = &mut frame {
        check_message(id, text, max_text_bytes)?;
    }
    Ok(frame)
}

/// Parses an agent's text frame.
pub fn parse_agent(text: &str, max_text_bytes: usize) -> Result<AgentFrame, FrameError> {
    let frame = match serde_json::from_str::<AgentMessageFields>(text) {
        Ok(fields) if fields.kind == "message" => AgentFrame::Message {
            conversation: fields.conversation,
            id: fields.id,
            text: fields.text,
        },
        _ => parse(text)?,
    };
    checked_agent(frame, max_text_bytes)
}

/// A parsed agent frame's size and shape checks.
fn checked_agent(mut frame: AgentFrame, max_text_bytes: usize) -> Result<AgentFrame, FrameError> {
    match &mut frame {
        AgentFrame::Message { id, text, .. } => check_message(id, text, max_text_bytes)?,
        AgentFrame::Transfer { to, .. } if to.is_empty() || to.len() > 128 => {
            return Err(FrameError::new(
                "invalid_field",
                "to must be an agent id of 1 to 128 bytes",
            ))
        }
        _ => {}
    }
    Ok(frame)
}

fn parse<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, FrameError> {
    serde_json::from_str(text).map_err(|err| classify(text, &err))
}

/// Maps serde's error to a stable code without parsing the frame twice.
fn classify(text: &str, err: &serde_json::Error) -> FrameError {
    use serde_json::error::Category;
    match err.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            FrameError::new("malformed_json", format!("not valid JSON: {err}"))
        }
        Category::Data => {
            let detail = err.to_string();
            if detail.starts_with("missing field `type`") {
                FrameError::new("missing_type", "every frame needs a string \"type\"")
            } else if detail.starts_with("unknown variant") {
                // Either the frame's type or an enum field's value is unknown.
                let kind = serde_json::from_str::<serde_json::Value>(text)
                    .ok()
                    .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned))
                    .unwrap_or_default();
                if detail.starts_with(&format!("unknown variant `{kind}`")) {
                    FrameError::new("unknown_type", format!("unknown frame type {kind:?}"))
                } else {
                    FrameError::new("invalid_field", strip_position(&detail))
                }
            } else if detail.starts_with("missing field") {
                FrameError::new("missing_field", strip_position(&detail))
            } else if text.trim_start().starts_with('{') {
                FrameError::new("invalid_field", strip_position(&detail))
            } else {
                FrameError::new("malformed_json", "a frame must be a JSON object")
            }
        }
    }
}

fn strip_position(detail: &str) -> String {
    match detail.find(" at line ") {
        Some(at) => detail[..at].to_string(),
        None => detail.to_string(),
    }
}

/// Checks a message's id and text, and cleans the text in place (see [`clean_text`]).
fn check_message(id: &str, text: &mut String, max_text_bytes: usize) -> Result<(), FrameError> {
    if id.is_empty() || id.len() > MAX_CLIENT_ID_BYTES {
        return Err(FrameError::new(
            "invalid_field",
            format!("id must be 1 to {MAX_CLIENT_ID_BYTES} bytes"),
        ));
    }
    if text.trim().is_empty() {
        return Err(FrameError::new("invalid_field", "text must not be empty"));
    }
    if !text.chars().any(is_visible) {
        return Err(FrameError::new(
            "invalid_field",
            "text must contain a visible character (not only white space, control, \
             zero-width or bidi-control characters)",
        ));
    }
    if text.chars().any(is_stripped) {
        text.retain(|c| !is_stripped(c));
    }
    if text.len() > max_text_bytes {
        return Err(FrameError::new(
            "text_too_long",
            format!(
                "text is {} bytes; the limit is {max_text_bytes}",
                text.len()
            ),
        ));
    }
    Ok(())
}

/// Characters removed from a message text that also has visible characters:
/// C0/C1 control characters other than tab, line feed and carriage return,
/// and the bidi embedding, override and isolate controls (U+202A..U+202E,
/// U+2066..U+2069), which can make text shown to an agent read differently
/// from what it is. Zero-width characters stay (U+200D joins emoji sequences).
pub fn is_stripped(c: char) -> bool {
    (c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
        || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Whether a character shows something: not white space, not a control
/// character, not zero-width (U+200B..U+200D, U+2060, U+FEFF) and not a bidi
/// control (U+200E, U+200F, U+202A..U+202E, U+2066..U+2069). A text without
/// one is refused with `invalid_field`.
pub fn is_visible(c: char) -> bool {
    !(c.is_whitespace()
        || c.is_control()
        || matches!(
            c,
            '\u{200B}'..='\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{2069}'
                | '\u{FEFF}'
        ))
}

/// A UTC instant's calendar fields.
struct Civil {
    year: i64,
    month: i64,
    day: i64,
    hour: u64,
    minute: u64,
    second: u64,
    millis: u64,
}

impl Civil {
    fn from_unix_ms(unix_ms: u64) -> Civil {
        let secs = unix_ms / 1000;
        let days = secs / 86_400;
        let rem = secs % 86_400;
        // Civil-from-days (Howard Hinnant's algorithm), valid for all u64 days we use.
        let z = days as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        Civil {
            year: yoe + era * 400 + i64::from(month <= 2),
            month,
            day,
            hour: rem / 3600,
            minute: rem % 3600 / 60,
            second: rem % 60,
            millis: unix_ms % 1000,
        }
    }
}

/// RFC 3339 UTC with milliseconds for a unix-ms timestamp.
pub fn rfc3339(unix_ms: u64) -> String {
    let Civil {
        year,
        month,
        day,
        hour,
        minute,
        second,
        millis,
    } = Civil::from_unix_ms(unix_ms);
    if !(0..=9999).contains(&year) {
        return format!(
            "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{millis:03}Z"
        );
    }
    // Every message frame carries one: written digit by digit, since `format!` with padding
    // was 1.2% of the server's CPU at 20,000 round trips/s (`perf`). Same bytes (tested).
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut value: u64| {
        for slot in out[at..at + width].iter_mut().rev() {
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year as u64);
    put(5, 2, month as u64);
    put(8, 2, day as u64);
    put(11, 2, hour);
    put(14, 2, minute);
    put(17, 2, second);
    put(20, 3, millis);
    out.iter().map(|&byte| char::from(byte)).collect()
}

/// Current unix time in milliseconds: the wall clock, for data (stored or shown timestamps).
/// Timers and durations use [`super::clock::monotonic_ms`], which a clock step does not move.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Renders a server frame as JSON text.
pub fn render(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("server frames always serialise")
}

/// `{"type":"error","code":..,"message":..}`.
pub fn error_frame(code: &str, message: &str) -> String {
    #[derive(Serialize)]
    struct Error<'a> {
        r#type: &'static str,
        code: &'a str,
        message: &'a str,
    }
    render(&Error {
        r#type: "error",
        code,
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parsers as they were before the `message` fast path: the tagged enum alone.
    fn enum_only_visitor(text: &str, max: usize) -> Result<VisitorFrame, FrameError> {
        checked_visitor(parse(text)?, max)
    }

    fn enum_only_agent(text: &str, max: usize) -> Result<AgentFrame, FrameError> {
        checked_agent(parse(text)?, max)
    }

    #[test]
    fn the_message_fast_path_gives_what_the_tagged_enum_gives() {
        let frames = [
            r#"{"type":"message","id":"c1","text":"hi"}"#,
            r#"{"text":"hi","id":"c1","type":"message"}"#,
            r#"{"type":"message","id":"c1","text":"hi","conversation":7}"#,
            r#"{"type":"message","id":"c1","text":"hi","conversation":"7"}"#,
            r#"{"type":"message","conversation":7,"id":"c1","text":"hi","extra":[1,{"a":2}]}"#,
            r#"{"type":"message","conversation":-1,"id":"c1","text":"hi"}"#,
            r#"{"type":"message","conversation":1.5,"id":"c1","text":"hi"}"#,
            r#"{"type":"message","id":"c1"}"#,
            r#"{"type":"message","text":"hi"}"#,
            r#"{"type":"message","id":"","text":"hi"}"#,
            r#"{"type":"message","id":"c1","text":""}"#,
            r#"{"type":"message","id":"c1","text":"this text is longer than the limit"}"#,
            r#"{"type":"message","id":null,"text":"hi"}"#,
            r#"{"type":"message","id":"c1","id":"c2","text":"hi"}"#,
            r#"{"type":"message","type":"typing","id":"c1","text":"hi"}"#,
            r#"{"type":"mess\u0061ge","id":"c1","text":"hi"}"#,
            r#"{"type":"message","id":"c\u0031","text":"h\ni"}"#,
            r#"["message",7,"c1","hi"]"#,
            r#"{"type":"message","id":"c1","text":"hi","x":"\udc00"}"#,
            r#"{"type":"message","id":"c1","text":"hi","x":{"\ud800":1}}"#,
            r#"{"type":"message","id":"c1","text":"hi","x":1e400}"#,
            r#"{"type":"message","conversation":1e400,"id":"c1","text":"hi"}"#,
            r#"{"type":"Message","id":"c1","text":"hi"}"#,
            r#"{"type":"typing","on":true,"id":"c1","text":"hi","conversation":7}"#,
            r#"{"type":"typing","on":true,"conversation":7}"#,
            r#"{"type":"read","seq":3,"conversation":7}"#,
            r#"{"type":"handoff"}"#,
            r#"{"type":"transfer","conversation":7,"to":""}"#,
            r#"{"type":"status","status":"away"}"#,
            r#"{"id":"c1","text":"hi"}"#,
            r#"{"type":7,"id":"c1","text":"hi"}"#,
            r#"{"type":"message","id":"c1","text":"hi"} trailing"#,
            r#"{"type":"message","id":"c1","text":"hi""#,
            r#"["message","c1","hi"]"#,
            "",
            "null",
        ];
        let deep = format!(
            r#"{{"type":"message","conversation":7,"id":"c1","text":"hi","x":{}{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        for frame in frames.iter().copied().chain([deep.as_str()]) {
            assert_eq!(
                parse_visitor(frame, 20),
                enum_only_visitor(frame, 20),
                "visitor {frame}"
            );
            assert_eq!(
                parse_agent(frame, 20),
                enum_only_agent(frame, 20),
                "agent {frame}"
            );
        }
    }

    #[test]
    fn parses_every_visitor_frame() {
        assert_eq!(
            parse_visitor(r#"{"type":"message","id":"c1","text":"hi"}"#, 100),
            Ok(VisitorFrame::Message {
                id: "c1".into(),
                text: "hi".into()
            })
        );
        assert_eq!(
            parse_visitor(r#"{"type":"typing","on":true}"#, 100),
            Ok(VisitorFrame::Typing { on: true })
        );
        assert_eq!(
            parse_visitor(r#"{"type":"read","seq":7}"#, 100),
            Ok(VisitorFrame::Read { seq: 7 })
        );
        assert_eq!(
            parse_visitor(r#"{"type":"handoff"}"#, 100),
            Ok(VisitorFrame::Handoff {})
        );
    }

    #[test]
    fn every_bad_input_has_a_code() {
        let code = |text: &str| parse_visitor(text, 10).unwrap_err().code;
        assert_eq!(code("{nope"), "malformed_json");
        assert_eq!(code("[1,2]"), "malformed_json");
        assert_eq!(code(r#"{"text":"x"}"#), "missing_type");
        assert_eq!(code(r#"{"type":"dance"}"#), "unknown_type");
        assert_eq!(code(r#"{"type":"message","text":"x"}"#), "missing_field");
        assert_eq!(code(r#"{"type":"read","seq":"x"}"#), "invalid_field");
        assert_eq!(
            code(r#"{"type":"message","id":"","text":"x"}"#),
            "invalid_field"
        );
        assert_eq!(
            code(r#"{"type":"message","id":"a","text":"   "}"#),
            "invalid_field"
        );
        assert_eq!(
            code(r#"{"type":"message","id":"a","text":"01234567890"}"#),
            "text_too_long"
        );
        let agent = parse_agent(r#"{"type":"status","status":"lunch"}"#, 10).unwrap_err();
        assert_eq!(agent.code, "invalid_field");
    }

    #[test]
    fn invisible_only_text_is_refused_and_bidi_controls_are_stripped() {
        let message = |text: &str| {
            serde_json::json!({"type": "message", "id": "a", "text": text}).to_string()
        };
        for invisible in [
            "\0",
            "\0\0\0",
            "\u{1}\u{7f}\u{9c}",
            "\u{200B}\u{200C}\u{200D}",
            "\u{2060}\u{FEFF}",
            "\u{202E}\u{202A}\u{202D}",
            "\u{2066}\u{2067}\u{2068}\u{2069}",
            " \u{200B}\n\u{202E}\t\0 ",
        ] {
            let err = parse_visitor(&message(invisible), 100).unwrap_err();
            assert_eq!(err.code, "invalid_field", "{invisible:?}");
            let err = parse_agent(
                &serde_json::json!({"type": "message", "conversation": 1, "id": "a", "text": invisible})
                    .to_string(),
                100,
            )
            .unwrap_err();
            assert_eq!(err.code, "invalid_field", "agent {invisible:?}");
        }
        let text = |frame: VisitorFrame| match frame {
            VisitorFrame::Message { text, .. } => text,
            other => panic!("{other:?}"),
        };
        // Visible text keeps zero-width joiners and line breaks, loses bidi controls and NULs.
        assert_eq!(
            text(parse_visitor(&message("pay \u{202E}gpj.exe\u{202C} now\0"), 100).unwrap()),
            "pay gpj.exe now"
        );
        assert_eq!(
            text(parse_visitor(&message("a\u{2066}b\u{2069}\nc\u{200D}d"), 100).unwrap()),
            "ab\nc\u{200D}d"
        );
        assert_eq!(
            text(parse_visitor(&message("plain"), 100).unwrap()),
            "plain"
        );
    }

    #[test]
    fn agent_frames_name_their_conversation() {
        let frame = parse_agent(
            r#"{"type":"message","conversation":42,"id":"a","text":"hello"}"#,
            100,
        )
        .unwrap();
        assert_eq!(frame.conversation(), Some(ConversationId(42)));
        let frame = parse_agent(r#"{"type":"watch","conversation":7}"#, 100).unwrap();
        assert_eq!(frame, AgentFrame::Watch { conversation: 7 });
        assert_eq!(frame.conversation(), Some(ConversationId(7)));
        let frame = parse_agent(r#"{"type":"unwatch","conversation":7}"#, 100).unwrap();
        assert_eq!(frame.conversation(), Some(ConversationId(7)));
        let frame = parse_agent(r#"{"type":"status","status":"away"}"#, 100).unwrap();
        assert_eq!(
            frame,
            AgentFrame::Status {
                status: Presence::Away
            }
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        // The digit-by-digit form gives what `format!` gave, across leap days, centuries,
        // the last millisecond of year 9999 and beyond it (where `format!` is still used).
        let formatted = |unix_ms: u64| {
            let c = Civil::from_unix_ms(unix_ms);
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                c.year, c.month, c.day, c.hour, c.minute, c.second, c.millis
            )
        };
        let mut unix_ms = 1u64;
        while unix_ms < 400_000_000_000_000 {
            for probe in [unix_ms, unix_ms + 999, unix_ms * 7 + 86_399_999] {
                assert_eq!(rfc3339(probe), formatted(probe), "{probe}");
            }
            unix_ms = unix_ms * 3 + 17;
        }
        for day in 0..84_000u64 {
            let probe = day * 86_400_000 + day * 7_919 % 86_400_000;
            assert_eq!(rfc3339(probe), formatted(probe), "{probe}");
        }
        assert_eq!(rfc3339(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(253_402_300_800_000), "10000-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_795_564_800_000), "2026-11-25T00:00:00.000Z");
    }
}
