//! The conversation and queue endpoints of the `/api/` core: their query strings parsed into
//! the questions of [`crate::conversation::query`], and the shards' answers rendered as JSON,
//! text or NDJSON. The shard driver (`server::api_driver`) asks the shards and merges; nothing
//! here touches a socket or a store.
//!
//! Endpoints (documented in `docs/api.md` and `docs/openapi.yaml`):
//! - `GET /api/conversations?site&visitor&agent&status&from&to&before&limit`
//!   (`ReadAnyConversation`) → `{"conversations":[SUMMARY,...],"next":ID|null}`, newest first
//! - `GET /api/conversations/ID` → SUMMARY
//! - `GET /api/conversations/ID/transcript?format=json|text&after&limit` → the messages
//! - `GET /api/conversations/export?...search filters...` → NDJSON, one conversation with its
//!   messages a line, `X-Next-Cursor` when there is more
//! - `GET /api/queue?limit` (`ViewQueue`) → `{"total","agents_present","waiting":[...]}`
//!
//! Invariants: every list is bounded (`limit`, at most [`MAX_SEARCH`] conversations,
//! [`MAX_TRANSCRIPT`] messages, [`MAX_EXPORT`] conversations and [`EXPORT_BYTE_BUDGET`] bytes
//! of text a page); times are unix milliseconds or RFC 3339 in, RFC 3339 (ms) out.

use serde_json::{json, Value};

use super::ApiResponse;
use crate::conversation::protocol::rfc3339;
use crate::conversation::query::{Filter, Found, QueueView, Status, Transcript};
use crate::store::{ConversationState, MessageRecord};

/// Conversations a search returns without `limit`, and at most.
pub const DEFAULT_SEARCH: usize = 50;
pub const MAX_SEARCH: usize = 500;
/// Messages a transcript returns without `limit`, and at most.
pub const DEFAULT_TRANSCRIPT: usize = 1000;
pub const MAX_TRANSCRIPT: usize = 10_000;
/// Conversations an export page holds without `limit`, and at most.
pub const DEFAULT_EXPORT: usize = 100;
pub const MAX_EXPORT: usize = 1000;
/// Bytes of message text one export page gathers across all shards, about.
pub const EXPORT_BYTE_BUDGET: usize = 16 << 20;
/// Queue entries `GET /api/queue` lists without `limit`, and at most.
pub const DEFAULT_QUEUE: usize = 100;
pub const MAX_QUEUE: usize = 1000;

/// How a transcript is wanted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TranscriptFormat {
    Json,
    Text,
}

/// A conversation or queue request, parsed and authorized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConversationPlan {
    Search {
        filter: Filter,
        before: Option<u64>,
        limit: usize,
    },
    Export {
        filter: Filter,
        before: Option<u64>,
        limit: usize,
    },
    Get {
        id: u64,
    },
    Transcript {
        id: u64,
        format: TranscriptFormat,
        after: u64,
        limit: usize,
    },
    Queue {
        limit: usize,
    },
}

fn bad(message: impl std::fmt::Display) -> ApiResponse {
    ApiResponse::error(400, "bad_request", message)
}

/// A whole number from a query string, if present.
pub fn parse_number(raw: Option<&str>, name: &str) -> Result<Option<u64>, ApiResponse> {
    raw.map(|raw| {
        raw.parse::<u64>()
            .map_err(|_| bad(format_args!("{name} must be a whole number")))
    })
    .transpose()
}

/// A time from a query string: unix milliseconds (at most 19 digits), or RFC 3339
/// (`2026-12-03T04:00:00Z`, optional fraction, `Z` or `±HH:MM`, upper-case `T` and `Z`: the
/// pattern `docs/openapi.yaml` gives). A time before 1970 is 0.
pub fn parse_time(raw: &str) -> Option<u64> {
    if !raw.is_empty() && raw.len() <= 19 && raw.bytes().all(|b| b.is_ascii_digit()) {
        return raw.parse().ok();
    }
    let b = raw.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = raw.get(range)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    let mut rest = &raw[19..];
    let mut millis = 0i64;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let ms: String = fraction[..digits]
            .chars()
            .chain("000".chars())
            .take(3)
            .collect();
        millis = ms.parse().ok()?;
        rest = &fraction[digits..];
    }
    let offset_minutes = match rest {
        "Z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let tz = rest.as_bytes();
            if tz.len() != 6 || tz[3] != b':' {
                return None;
            }
            let hh: i64 = rest[1..3].parse().ok()?;
            let mm: i64 = rest[4..6].parse().ok()?;
            if hh > 23 || mm > 59 {
                return None;
            }
            sign * (hh * 60 + mm)
        }
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60;
    // Before 1970 is the epoch: nothing is older.
    Some(u64::try_from(secs * 1000 + millis).unwrap_or(0))
}

/// The search filters from a query string (`param` gives a decoded parameter); `agent` is
/// resolved by the caller (it needs the account's display name).
pub fn parse_filter(
    param: impl Fn(&str) -> Option<String>,
) -> Result<(Filter, Option<String>), ApiResponse> {
    let text = |name: &str| -> Result<Option<String>, ApiResponse> {
        match param(name) {
            Some(value) if value.is_empty() || value.chars().count() > 128 => {
                Err(bad(format_args!("{name} must be 1 to 128 characters")))
            }
            other => Ok(other),
        }
    };
    let time = |name: &str| -> Result<Option<u64>, ApiResponse> {
        param(name)
            .map(|raw| {
                parse_time(&raw).ok_or_else(|| {
                    bad(format_args!(
                        "{name} must be unix milliseconds or an RFC 3339 time"
                    ))
                })
            })
            .transpose()
    };
    let status = param("status")
        .map(|raw| {
            Status::parse(&raw).ok_or_else(|| {
                bad(format_args!(
                    "status must be one of {}",
                    Status::NAMES.join(", ")
                ))
            })
        })
        .transpose()?;
    let filter = Filter {
        site: text("site")?,
        visitor: text("visitor")?,
        agent: None,
        status,
        from_ms: time("from")?,
        to_ms: time("to")?,
    };
    Ok((filter, text("agent")?))
}

fn state_json(state: &ConversationState) -> (&'static str, Option<&str>) {
    let status = Status::of(state).as_str();
    match state {
        ConversationState::Assigned { agent } => (status, Some(agent.as_str())),
        _ => (status, None),
    }
}

/// A conversation's metadata as the API shows it.
pub fn summary(conversation: &crate::store::Conversation) -> Value {
    let (status, agent) = state_json(&conversation.state);
    json!({
        "id": conversation.id.0,
        "shard": conversation.id.shard(),
        "site": conversation.site,
        "visitor": conversation.visitor,
        "status": status,
        "agent": agent,
        "created": rfc3339(conversation.created_ms),
        "updated": rfc3339(conversation.updated_ms),
        "status_since": rfc3339(conversation.state_since_ms),
        "messages": conversation.last_seq,
    })
}

fn message_json(message: &MessageRecord) -> Value {
    json!({
        "seq": message.seq,
        "from": message.from.as_str(),
        "name": message.name,
        "text": message.text,
        "ts": rfc3339(message.ts_ms),
    })
}

/// `GET /api/conversations`: a merged page.
pub fn search_page(found: &[Found], next: Option<u64>) -> ApiResponse {
    let listed: Vec<Value> = found.iter().map(|f| summary(&f.conversation)).collect();
    ApiResponse::json(200, json!({"conversations": listed, "next": next}))
}

/// `GET /api/conversations/export`: one JSON object a line (NDJSON): a conversation's
/// summary with its `messages` array (and `"truncated":true` past the per-conversation cap);
/// `X-Next-Cursor` carries the next page's `before`.
pub fn export_page(found: &[Found], next: Option<u64>) -> ApiResponse {
    let mut body = String::new();
    for f in found {
        let mut line = summary(&f.conversation);
        line["messages_stored"] = line["messages"].take();
        line["messages"] = Value::Array(f.messages.iter().map(message_json).collect());
        line["truncated"] = Value::Bool(f.truncated);
        body.push_str(&line.to_string());
        body.push('\n');
    }
    let mut response = ApiResponse::other("application/x-ndjson", body);
    if let Some(next) = next {
        response.headers.push(("X-Next-Cursor", next.to_string()));
    }
    response
}

/// `GET /api/conversations/ID/transcript`, as JSON or as text.
pub fn transcript(transcript: &Transcript, format: TranscriptFormat, limit: usize) -> ApiResponse {
    let next_after = (transcript.messages.len() == limit)
        .then(|| transcript.messages.last().map(|m| m.seq))
        .flatten()
        .filter(|&seq| seq < transcript.conversation.last_seq);
    match format {
        TranscriptFormat::Json => ApiResponse::json(
            200,
            json!({
                "conversation": summary(&transcript.conversation),
                "messages": transcript.messages.iter().map(message_json).collect::<Vec<_>>(),
                "next_after": next_after,
            }),
        ),
        TranscriptFormat::Text => {
            let c = &transcript.conversation;
            let (status, agent) = state_json(&c.state);
            let mut text = format!(
                "Conversation {} (site {}, visitor {}), {}{}\nStarted {}\n\n",
                c.id.0,
                c.site,
                c.visitor,
                status,
                agent.map(|a| format!(" to {a}")).unwrap_or_default(),
                rfc3339(c.created_ms),
            );
            for m in &transcript.messages {
                text.push_str(&format!(
                    "[{}] {} ({}): {}\n",
                    rfc3339(m.ts_ms),
                    m.name,
                    m.from.as_str(),
                    m.text
                ));
            }
            if let Some(after) = next_after {
                text.push_str(&format!(
                    "\n... more messages: ask again with after={after}\n"
                ));
            }
            ApiResponse::other("text/plain; charset=utf-8", text)
        }
    }
}

/// `GET /api/queue`.
pub fn queue(view: &QueueView) -> ApiResponse {
    let waiting: Vec<Value> = view
        .waiting
        .iter()
        .map(|w| {
            json!({
                "conversation": w.conversation,
                "shard": crate::store::ConversationId(w.conversation).shard(),
                "position": w.position,
                "waited_ms": w.waited_ms,
            })
        })
        .collect();
    ApiResponse::json(
        200,
        json!({"total": view.total, "agents_present": view.agents_present, "waiting": waiting}),
    )
}

/// `404 unknown_conversation`.
pub fn unknown(id: u64) -> ApiResponse {
    ApiResponse::error(
        404,
        "unknown_conversation",
        format_args!("no conversation {id}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Author, Conversation, ConversationId};

    #[test]
    fn times_parse_as_milliseconds_or_rfc3339() {
        assert_eq!(parse_time("1700000000123"), Some(1_700_000_000_123));
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_time("2024-02-29T12:34:56Z"), Some(1_709_210_096_000));
        assert_eq!(
            parse_time("2024-02-29T12:34:56.5Z"),
            Some(1_709_210_096_500)
        );
        assert_eq!(
            parse_time("2024-02-29T14:34:56+02:00"),
            Some(1_709_210_096_000)
        );
        // The protocol's own format comes back as it went out.
        let ms = 1_798_761_599_042;
        assert_eq!(parse_time(&rfc3339(ms)), Some(ms));
        assert_eq!(parse_time("1969-12-31T23:59:59Z"), Some(0));
        for bad in [
            "",
            "yesterday",
            "2024-13-01T00:00:00Z",
            "2024-02-29T12:34:56",
            "2024-02-29t12:34:56z",
            "-5",
            "12345678901234567890",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn filters_parse_and_refuse_bad_values() {
        let params = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let (filter, agent) = parse_filter(params(&[
            ("visitor", "v1"),
            ("status", "closed"),
            ("from", "1000"),
            ("agent", "alice"),
        ]))
        .unwrap();
        assert_eq!(filter.visitor.as_deref(), Some("v1"));
        assert_eq!(filter.status, Some(Status::Closed));
        assert_eq!(filter.from_ms, Some(1000));
        assert_eq!(agent.as_deref(), Some("alice"));
        for bad in [
            &[("status", "open")][..],
            &[("from", "soon")],
            &[("visitor", "")],
        ] {
            let refused = parse_filter(params(bad)).unwrap_err();
            assert_eq!(refused.status, 400);
        }
    }

    #[test]
    fn transcripts_render_as_json_and_text() {
        let t = Transcript {
            conversation: Conversation {
                id: ConversationId::from_parts(1, 3),
                site: "shop".into(),
                visitor: "v1".into(),
                state: ConversationState::Assigned {
                    agent: "alice".into(),
                },
                state_since_ms: 0,
                last_seq: 2,
                created_ms: 0,
                updated_ms: 0,
                visitor_read: 0,
                agent_read: 0,
                failed_bot_turns: 0,
            },
            messages: vec![
                MessageRecord {
                    seq: 1,
                    from: Author::Visitor,
                    name: "v1".into(),
                    text: "hi".into(),
                    ts_ms: 1000,
                    client_id: None,
                },
                MessageRecord {
                    seq: 2,
                    from: Author::Agent,
                    name: "Alice".into(),
                    text: "hello".into(),
                    ts_ms: 2000,
                    client_id: None,
                },
            ],
        };
        let json: Value =
            serde_json::from_str(&transcript(&t, TranscriptFormat::Json, 10).body).unwrap();
        assert_eq!(json["conversation"]["status"], "assigned");
        assert_eq!(json["conversation"]["agent"], "alice");
        assert_eq!(json["messages"][1]["from"], "agent");
        assert_eq!(json["next_after"], Value::Null);
        // A page as long as the limit, short of the last seq, says where to go on.
        let json: Value = serde_json::from_str(
            &transcript(
                &Transcript {
                    messages: t.messages[..1].to_vec(),
                    ..t.clone()
                },
                TranscriptFormat::Json,
                1,
            )
            .body,
        )
        .unwrap();
        assert_eq!(json["next_after"], 1);
        let text = transcript(&t, TranscriptFormat::Text, 10);
        assert_eq!(text.content_type, "text/plain; charset=utf-8");
        assert!(
            text.body
                .contains("[1970-01-01T00:00:02.000Z] Alice (agent): hello"),
            "{}",
            text.body
        );
    }
}
