//! The admin endpoints of the `/api/` core: the audit log, the knowledge base's entries, a
//! try-a-question box and the knowledge-base import. [`super::plan`] parses and authorizes
//! them into an [`AdminPlan`]; the shard driver (`server::api_driver`) gathers what each
//! needs from its shard (the audit file's path, the replica, the intent engine's match) and
//! calls the functions here, which build the response. No function here touches a socket.
//!
//! Endpoints (documented in `docs/api.md`):
//! - `GET /api/audit?limit=N` (`ViewAudit`) → `{"records":[...],"head","intact"}`, newest last
//! - `GET /api/kb/entries?q=TEXT&limit=N` (`ManageKnowledgeBase`) → `{"version","total",
//!   "matched","entries":[{"id","category","intent","questions","question","answer"}]}`
//! - `GET /api/kb/entries/ID` (`ManageKnowledgeBase`) → the entry with its version;
//!   `DELETE /api/kb/entries/ID` → a new version without it (the import's steps, the import
//!   slot); `GET /api/kb/export` → the entries as the JSON array an import reads back
//! - `POST /api/kb/try` `{"text"}` (`TryKnowledgeBase`) → `{"intent","confidence","answer",
//!   "fallback",...}`
//! - `POST /api/kb/import` CSV or JSON body (`ManageKnowledgeBase`) → `{"version","entries",
//!   "questions",...}`
//! - `GET /api/kb/sync` (`ManageKnowledgeBase`) → `{"version","length","hash",...}` of the
//!   current version's snapshot file; `POST /api/kb/sync` `{"signature"}` (base64 of a
//!   replica's rsync signature) → the same plus `"delta"` (base64), or the two-round sync's
//!   plan and regions delta (see [`SyncBody`] and `kb::delta_plan`): see `kb::delta` and
//!   docs/api.md
//!
//! Invariants:
//! - [`audit`] and [`import`] block (file reads, the model, LMDB commits): the driver runs
//!   them off the event loop.
//! - One import at a time per process ([`ImportSlot`]); a second gets 409 `import_running`
//!   and changes nothing.
//! - An import changes nothing unless the body parsed and the questions were embedded and the
//!   head trained (`engine::update`'s invariant); a malformed body is a 400 that lists the
//!   problems by line, as `switchboard kb import` prints them.

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde_json::json;

use super::ApiResponse;
use crate::audit::{self, AuditEvent};
use crate::bot::intent::IntentAnswer;
use crate::bot::{BotContext, IntentMatch, MessageHandler, Verdict};
use crate::config::{BotConfig, Config};
use crate::engine::intent::ModelSettings;
use crate::engine::update;
use crate::kb::{self, Entry, Format};

/// Records `GET /api/audit` returns without `limit`.
pub const DEFAULT_AUDIT_RECORDS: usize = 100;
/// Most records one `GET /api/audit` returns.
pub const MAX_AUDIT_RECORDS: usize = 1000;
/// Entries `GET /api/kb/entries` returns without `limit`.
pub const DEFAULT_ENTRIES: usize = 200;
/// Most entries one `GET /api/kb/entries` returns.
pub const MAX_ENTRIES: usize = 1000;
/// Longest `text` `POST /api/kb/try` takes, in characters (a visitor message's order of size).
pub const MAX_TRY_CHARS: usize = 4096;

/// An admin request, parsed and authorized.
#[derive(Debug, PartialEq, Eq)]
pub enum AdminPlan {
    Audit {
        limit: usize,
    },
    KbEntries {
        query: Option<String>,
        limit: usize,
    },
    KbTry {
        text: String,
    },
    /// The body stays with the driver (it may be tens of MiB); `format` is from the
    /// `Content-Type` (`text/csv`, `application/json`) or sniffed when there is none.
    KbImport {
        by: String,
        format: Format,
    },
    /// One entry of the current version.
    KbEntry {
        id: String,
    },
    /// A new version without entry `id` (re-embedded and trained like an import).
    KbDeleteEntry {
        by: String,
        id: String,
    },
    /// Every entry of the current version as a JSON array that `POST /api/kb/import` takes.
    KbExport,
    /// A canned-reply request (see [`super::canned`]).
    Canned(super::canned::CannedPlan),
    /// A conversation or queue request (see [`super::conversations`]).
    Conversations(super::conversations::ConversationPlan),
    /// The current version's snapshot file: its version, length and hash.
    KbSyncState,
    /// A delta, a plan or a regions delta for a replica (see [`SyncRequest`]).
    KbSync {
        by: String,
        request: SyncRequest,
    },
}

/// `limit` from a query string: absent → `default`, else 1..=`max`.
pub fn parse_limit(raw: Option<&str>, default: usize, max: usize) -> Result<usize, ApiResponse> {
    match raw {
        None => Ok(default),
        Some(raw) => match raw.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiResponse::error(
                400,
                "bad_request",
                format_args!("limit must be a whole number from 1 to {max}"),
            )),
        },
    }
}

/// The import body's format from its `Content-Type`.
pub fn import_format(content_type: Option<&str>, body: &[u8]) -> Result<Format, ApiResponse> {
    let Some(content_type) = content_type else {
        return Ok(Format::sniff(body));
    };
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match media.as_str() {
        "text/csv" | "application/csv" => Ok(Format::Csv),
        "application/json" => Ok(Format::Json),
        "text/plain" | "application/octet-stream" | "" => Ok(Format::sniff(body)),
        _ => Err(ApiResponse::error(
            415,
            "unsupported_media_type",
            "send the knowledge base as text/csv or application/json",
        )),
    }
}

/// `GET /api/audit`: the newest `limit` records of the chain at `path`, oldest first, with
/// the chain's head hash and whether the whole chain verifies. Blocking (reads the file).
pub fn audit(path: &Path, limit: usize) -> ApiResponse {
    if !path.exists() {
        return ApiResponse::json(
            200,
            json!({"records": [], "head": null, "intact": true, "count": 0}),
        );
    }
    let lines = match audit::tail(path, limit) {
        Ok(lines) => lines,
        Err(err) => {
            tracing::error!(error = %err, "audit log unreadable");
            return ApiResponse::error(500, "internal", "the audit log could not be read");
        }
    };
    let records: Vec<serde_json::Value> = lines
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| json!({ "unparsed": line })))
        .collect();
    match audit::verify(path) {
        Ok(Ok(summary)) => ApiResponse::json(
            200,
            json!({"records": records, "head": summary.head, "intact": true, "count": summary.records}),
        ),
        Ok(Err(broken)) => ApiResponse::json(
            200,
            json!({
                "records": records,
                "head": null,
                "intact": false,
                "broken": {"line": broken.line, "expected_seq": broken.expected_seq, "reason": broken.reason},
            }),
        ),
        Err(err) => {
            tracing::error!(error = %err, "audit log unreadable");
            ApiResponse::error(500, "internal", "the audit log could not be read")
        }
    }
}

/// Whether `entry` matches the lowercased `needle` (id, intent, tags, questions, answer).
fn entry_matches(entry: &Entry, needle: &str) -> bool {
    let hit = |text: &str| text.to_lowercase().contains(needle);
    hit(&entry.id)
        || hit(&entry.intent)
        || hit(&entry.answer)
        || entry.tags.iter().any(|tag| hit(tag))
        || entry.questions.iter().any(|question| hit(question))
}

/// `GET /api/kb/entries`: the first `limit` entries of `version` (in knowledge-base order)
/// that contain `query` (case-insensitive) in their id, category (intent), tags, questions or
/// answer; all of them without a query.
pub fn entries(
    version: Option<u64>,
    all: &[Entry],
    query: Option<&str>,
    limit: usize,
) -> ApiResponse {
    let needle = query
        .map(|q| q.trim().to_lowercase())
        .filter(|q| !q.is_empty());
    let mut matched = 0usize;
    let mut listed = Vec::new();
    for entry in all {
        if needle.as_deref().is_some_and(|n| !entry_matches(entry, n)) {
            continue;
        }
        matched += 1;
        if listed.len() < limit {
            listed.push(entry_json(entry));
        }
    }
    ApiResponse::json(
        200,
        json!({"version": version, "total": all.len(), "matched": matched, "entries": listed}),
    )
}

/// An entry as the API shows it (`category` and `intent` are the same).
fn entry_json(entry: &Entry) -> serde_json::Value {
    json!({
        "id": entry.id,
        "category": entry.intent,
        "intent": entry.intent,
        "questions": entry.questions,
        "question": entry.questions.first(),
        "answer": entry.answer,
        "tags": entry.tags,
    })
}

fn unknown_entry(id: &str) -> ApiResponse {
    ApiResponse::error(
        404,
        "unknown_entry",
        format_args!("the knowledge base has no entry {id:?}"),
    )
}

/// `GET /api/kb/entries/ID`: the entry with that id in `version`, with the version.
pub fn entry(version: Option<u64>, all: &[Entry], id: &str) -> ApiResponse {
    match all.iter().find(|entry| entry.id == id) {
        Some(entry) => {
            let mut body = entry_json(entry);
            body["version"] = json!(version);
            ApiResponse::json(200, body)
        }
        None => unknown_entry(id),
    }
}

/// `GET /api/kb/export`: every entry, in knowledge-base order, as the JSON array
/// `POST /api/kb/import` (and `switchboard kb import`) reads back to the same entries.
pub fn export(all: &[Entry]) -> ApiResponse {
    ApiResponse::json(200, json!(all))
}

/// `POST /api/kb/try` body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TryBody {
    pub text: String,
}

/// `POST /api/kb/try`: what the `intent` handler would do with `found` (the shard's intent
/// engine's match for the text) under `[bot]`'s thresholds. `answer` is what the bot would
/// reply, `null` (and `fallback: true`) when the match is missing, not confident or ambiguous.
pub fn tried(text: &str, found: Option<IntentMatch>, bot: &BotConfig) -> ApiResponse {
    let best = found.clone();
    let mut ctx = BotContext::new(0, "admin", "admin", text);
    ctx.intent = found;
    let verdict = IntentAnswer::from_config(bot).handle(&mut ctx);
    let answer = match verdict {
        Verdict::Reply { text, .. } => Some(text),
        _ => None,
    };
    let (intent, confidence, second, degraded) = match &best {
        Some(m) => (Some(m.intent.as_str()), m.score, m.second_score, m.degraded),
        None => (None, 0.0, 0.0, false),
    };
    ApiResponse::json(
        200,
        json!({
            "intent": intent,
            "confidence": confidence,
            "second_confidence": second,
            "answer": answer,
            "fallback": answer.is_none(),
            "degraded": degraded,
            "confidence_threshold": bot.confidence_threshold,
            "margin_threshold": bot.margin_threshold,
        }),
    )
}

static IMPORT_RUNNING: AtomicBool = AtomicBool::new(false);

/// The process's one import slot, released on drop.
pub struct ImportSlot(());

impl ImportSlot {
    /// The slot, or a 409 when another import is running.
    pub fn take() -> Result<ImportSlot, ApiResponse> {
        if IMPORT_RUNNING
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(ApiResponse::error(
                409,
                "import_running",
                "another knowledge-base import is running; try again when it has finished",
            ));
        }
        Ok(ImportSlot(()))
    }
}

impl Drop for ImportSlot {
    fn drop(&mut self) {
        IMPORT_RUNNING.store(false, Ordering::Release);
    }
}

/// `POST /api/kb/import`: parses `body`, embeds and trains, stores one new version in the
/// replicas of shards `0..shards` (the same steps as `switchboard kb import`) and records
/// `kb_imported` in the audit chain. Blocking for seconds to minutes: run it on its own thread.
pub fn import(
    config: &Config,
    shards: usize,
    body: &[u8],
    format: Format,
    by: &str,
    peer: Option<IpAddr>,
) -> ApiResponse {
    let started = Instant::now();
    let entries = match kb::import(body, format) {
        Ok(entries) => entries,
        Err(invalid) => {
            let problems: Vec<String> = invalid.problems.iter().map(|p| p.to_string()).collect();
            return ApiResponse::json(
                400,
                json!({"error": {
                    "code": "invalid_knowledge_base",
                    "message": invalid.to_string(),
                    "problems": problems,
                    "total": invalid.total,
                }}),
            );
        }
    };
    let event = AuditEvent::new("kb_imported", by).target("api");
    store_version(config, shards, entries, event, peer, started)
}

/// `DELETE /api/kb/entries/ID`: a new version holding every entry of `current` but `id`,
/// embedded, trained and stored like an import (the same cost: every question is embedded
/// again). `404 unknown_entry` when there is no such entry, `409 last_entry` when it is the
/// only one (a knowledge base is never empty). Blocking: run it on its own thread.
pub fn delete_entry(
    config: &Config,
    shards: usize,
    current: Vec<Entry>,
    id: &str,
    by: &str,
    peer: Option<IpAddr>,
) -> ApiResponse {
    let started = Instant::now();
    if !current.iter().any(|entry| entry.id == id) {
        return unknown_entry(id);
    }
    if current.len() == 1 {
        return ApiResponse::error(
            409,
            "last_entry",
            "this is the knowledge base's only entry: import a new knowledge base instead",
        );
    }
    let rest: Vec<Entry> = current.into_iter().filter(|entry| entry.id != id).collect();
    let event = AuditEvent::new("kb_entry_deleted", by)
        .target("api")
        .detail("entry", id);
    let mut response = store_version(config, shards, rest, event, peer, started);
    if response.status == 200 {
        if let Ok(mut body) = serde_json::from_str::<serde_json::Value>(&response.body) {
            body["deleted"] = json!(id);
            response.body = body.to_string();
        }
    }
    response
}

/// Embeds and trains `entries` and stores them as one new version in every shard's replica,
/// then records `event` (with the version and counts) in the audit chain.
fn store_version(
    config: &Config,
    shards: usize,
    entries: Vec<Entry>,
    event: AuditEvent,
    peer: Option<IpAddr>,
    started: Instant,
) -> ApiResponse {
    // Like the CLI: two intra-op threads at most, off the serving path.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
    let mut encoder = match ModelSettings::from_config(config, threads).load() {
        Ok(encoder) => encoder,
        Err(err) => {
            tracing::error!(error = %err, "kb import over the API: cannot load the model");
            return ApiResponse::error(
                503,
                "model_unavailable",
                format_args!("cannot load the sentence encoder: {err}"),
            );
        }
    };
    let mut warnings = Vec::new();
    if let Ok(coverage) = encoder.vocabulary_coverage(
        entries
            .iter()
            .flat_map(|e| e.questions.iter().map(String::as_str)),
    ) {
        warnings.extend(coverage.warning(&config.inference.tokenizer));
    }
    let fine_tune = update::FineTuneSettings::from_config(config, threads);
    let prepared = match update::prepare(entries, &mut encoder, &fine_tune) {
        Ok(prepared) => prepared,
        Err(err) => return ApiResponse::error(500, "import_failed", err),
    };
    drop(encoder);
    let version = match update::apply(&config.storage.dir, shards, kb::DEFAULT_MAP_SIZE, &prepared)
    {
        Ok(version) => version,
        Err(err) => {
            tracing::error!(error = %err, "kb import over the API failed");
            return ApiResponse::error(500, "import_failed", err);
        }
    };
    let questions = prepared.question_count();
    let mut event = event
        .detail("version", version)
        .detail("entries", prepared.entries.len() as u64)
        .detail("questions", questions as u64);
    if let Some(peer) = peer {
        event = event.peer(peer);
    }
    audit::emit(event);
    tracing::info!(
        version,
        entries = prepared.entries.len(),
        questions,
        seconds = started.elapsed().as_secs_f64(),
        "knowledge-base version stored over the API"
    );
    ApiResponse::json(
        200,
        json!({
            "version": version,
            "entries": prepared.entries.len(),
            "questions": questions,
            "shards": shards,
            "embed_ms": prepared.embed_time.as_millis() as u64,
            "train_ms": prepared.train_time.as_millis() as u64,
            "fine_tuned": matches!(prepared.fine_tune, update::FineTuneOutcome::Tuned { .. }),
            "total_ms": started.elapsed().as_millis() as u64,
            "warnings": warnings,
        }),
    )
}

/// `POST /api/kb/sync` body, one of three (base64 fields: standard alphabet, padded):
/// - `{"signature"}`: the replica's rsync signature of its snapshot file (`kb::signature`);
///   the answer carries the one-round delta.
/// - `{"signature","plan":true}`: the coarse round of the two-round sync (`kb::delta_plan`);
///   the answer carries the plan.
/// - `{"hash","fine_signature","regions"}`: the fine round, against the file of that hash.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncBody {
    pub signature: Option<String>,
    #[serde(default)]
    pub plan: bool,
    pub hash: Option<String>,
    pub fine_signature: Option<String>,
    pub regions: Option<String>,
}

/// A checked `POST /api/kb/sync` request.
#[derive(Debug, PartialEq, Eq)]
pub enum SyncRequest {
    /// One round: the delta against the signature's base.
    Delta(fast_rsync::Signature),
    /// The coarse round: the plan against the signature's base.
    Plan(fast_rsync::Signature),
    /// The fine round: the delta of `regions` (encoded, checked against the file's length
    /// when it is read) against the fine signature, if the file's hash is still `hash`.
    Regions {
        hash: String,
        fine: fast_rsync::Signature,
        regions: Vec<u8>,
    },
}

/// Checks a sync request's fields, or a 400 `bad_signature` saying what is wrong.
pub fn sync_request(body: SyncBody) -> Result<SyncRequest, ApiResponse> {
    use base64::Engine as _;
    let bad = |detail: String| ApiResponse::error(400, "bad_signature", detail);
    let decode = |name: &str, text: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|err| bad(format!("{name} is not base64: {err}")))
    };
    match body {
        SyncBody {
            signature: Some(signature),
            plan,
            hash: None,
            fine_signature: None,
            regions: None,
        } => {
            let signature = kb::check_signature(decode("signature", &signature)?)
                .map_err(|err| bad(err.to_string()))?;
            Ok(if plan {
                SyncRequest::Plan(signature)
            } else {
                SyncRequest::Delta(signature)
            })
        }
        SyncBody {
            signature: None,
            plan: false,
            hash: Some(hash),
            fine_signature: Some(fine),
            regions: Some(regions),
        } => Ok(SyncRequest::Regions {
            hash: hash.trim().to_ascii_lowercase(),
            fine: kb::check_fine_signature(decode("fine_signature", &fine)?)
                .map_err(|err| bad(err.to_string()))?,
            regions: decode("regions", &regions)?,
        }),
        _ => Err(bad(
            "send {\"signature\"} (one round), {\"signature\",\"plan\":true} (the coarse \
             round) or {\"hash\",\"fine_signature\",\"regions\"} (the fine round)"
                .into(),
        )),
    }
}

/// `404 no_knowledge_base`: nothing to sync from.
pub fn no_knowledge_base() -> ApiResponse {
    ApiResponse::error(
        404,
        "no_knowledge_base",
        "this server holds no knowledge base yet: import one first",
    )
}

/// `GET /api/kb/sync` (`request` `None`) or `POST /api/kb/sync`: the snapshot `file` of
/// `version`, described (version, length, hash, counts) and, for a POST, what the request asks
/// for, base64. Blocking (hashing, the diff): run it off the event loop.
pub fn sync_answer(
    version: u64,
    file: &[u8],
    entries: u32,
    questions: u32,
    request: Option<&SyncRequest>,
) -> ApiResponse {
    use base64::Engine as _;
    let hash = kb::content_hash(file);
    let mut answer = json!({
        "version": version,
        "format": kb::SNAPSHOT_FORMAT,
        "length": file.len(),
        "hash": hash,
        "entries": entries,
        "questions": questions,
    });
    let base64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    match request {
        None => {}
        Some(SyncRequest::Delta(signature)) => match kb::delta(signature, file) {
            Ok(delta) => {
                answer["delta_bytes"] = json!(delta.len());
                answer["delta"] = json!(base64(&delta));
            }
            Err(err) => return ApiResponse::error(400, "bad_signature", err),
        },
        Some(SyncRequest::Plan(signature)) => match kb::Plan::build(signature, file) {
            Ok(plan) => {
                let bytes = plan.encode();
                answer["plan_bytes"] = json!(bytes.len());
                answer["fetch_bytes"] = json!(plan.fetched_bytes());
                answer["plan"] = json!(base64(&bytes));
            }
            Err(err) => return ApiResponse::error(400, "bad_signature", err),
        },
        Some(SyncRequest::Regions {
            hash: wanted,
            fine,
            regions,
        }) => {
            if *wanted != hash {
                return ApiResponse::error(
                    409,
                    "kb_changed",
                    "the knowledge base changed since the plan was made: sync again",
                );
            }
            let delta = kb::decode_regions(regions, file.len() as u64)
                .and_then(|regions| kb::regions_delta(fine, file, &regions));
            match delta {
                Ok(delta) => {
                    answer["delta_bytes"] = json!(delta.len());
                    answer["delta"] = json!(base64(&delta));
                }
                Err(err) => return ApiResponse::error(400, "bad_signature", err),
            }
        }
    }
    ApiResponse::json(200, answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, questions: &[&str], answer: &str) -> Entry {
        Entry {
            id: id.into(),
            intent: id.into(),
            questions: questions.iter().map(|q| q.to_string()).collect(),
            answer: answer.into(),
            tags: vec![],
        }
    }

    fn body(response: &ApiResponse) -> serde_json::Value {
        serde_json::from_str(&response.body).unwrap()
    }

    #[test]
    fn entries_filter_case_insensitively_and_bound() {
        let all = vec![
            entry(
                "card_arrival",
                &["Where is my CARD?"],
                "It arrives in 3 days.",
            ),
            entry("lost_card", &["I lost my card"], "Freeze it in the app."),
            entry("refund", &["money back"], "Refunds take a week."),
        ];
        let r = entries(Some(4), &all, Some("card"), 10);
        let b = body(&r);
        assert_eq!(r.status, 200);
        assert_eq!(b["matched"], 2);
        assert_eq!(b["total"], 3);
        assert_eq!(b["version"], 4);
        assert_eq!(b["entries"][0]["category"], "card_arrival");
        assert_eq!(b["entries"][0]["questions"][0], "Where is my CARD?");
        // Answer text matches too, and the limit bounds the list but not the count.
        let b = body(&entries(Some(4), &all, Some("WEEK"), 10));
        assert_eq!(b["entries"][0]["id"], "refund");
        let b = body(&entries(Some(4), &all, None, 1));
        assert_eq!(
            (
                b["matched"].as_u64(),
                b["entries"].as_array().unwrap().len()
            ),
            (Some(3), 1)
        );
        let b = body(&entries(None, &[], Some("x"), 10));
        assert_eq!(b["entries"], json!([]));
    }

    #[test]
    fn try_applies_the_bot_thresholds() {
        let mut bot = crate::config::load_str("test", "").unwrap().bot;
        bot.confidence_threshold = 0.5;
        bot.margin_threshold = 0.05;
        let confident = IntentMatch {
            intent: "card_arrival".into(),
            answer: Some("It arrives in 3 days.".into()),
            score: 0.9,
            second_score: 0.1,
            degraded: false,
        };
        let b = body(&tried("where is my card", Some(confident.clone()), &bot));
        assert_eq!(b["intent"], "card_arrival");
        assert_eq!(b["answer"], "It arrives in 3 days.");
        assert_eq!(b["fallback"], false);
        let weak = IntentMatch {
            score: 0.3,
            ..confident
        };
        let b = body(&tried("hm", Some(weak), &bot));
        assert_eq!(b["intent"], "card_arrival");
        assert_eq!(b["answer"], serde_json::Value::Null);
        assert_eq!(b["fallback"], true);
        let b = body(&tried("hm", None, &bot));
        assert_eq!(
            (b["intent"].is_null(), b["fallback"].as_bool()),
            (true, Some(true))
        );
    }

    #[test]
    fn limits_and_formats() {
        assert_eq!(parse_limit(None, 100, 1000).unwrap(), 100);
        assert_eq!(parse_limit(Some("5"), 100, 1000).unwrap(), 5);
        for bad in ["0", "1001", "-1", "x"] {
            assert_eq!(parse_limit(Some(bad), 100, 1000).unwrap_err().status, 400);
        }
        assert_eq!(
            import_format(Some("text/csv; charset=utf-8"), b"").unwrap(),
            Format::Csv
        );
        assert_eq!(
            import_format(Some("application/json"), b"").unwrap(),
            Format::Json
        );
        assert_eq!(import_format(None, b" [ ]").unwrap(), Format::Json);
        assert_eq!(
            import_format(None, b"question,category").unwrap(),
            Format::Csv
        );
        assert_eq!(
            import_format(Some("image/png"), b"").unwrap_err().status,
            415
        );
    }

    #[test]
    fn audit_reads_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let b = body(&audit(&path, 10));
        assert_eq!(
            (
                b["intact"].as_bool(),
                b["records"].as_array().unwrap().len()
            ),
            (Some(true), 0)
        );
        let mut file = audit::AuditFile::open(&path).unwrap();
        for n in 0..5u64 {
            file.append(
                &AuditEvent::new("kb_imported", "api:root").detail("n", n),
                1000 + n,
            )
            .unwrap();
        }
        drop(file);
        let b = body(&audit(&path, 3));
        let records = b["records"].as_array().unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(b["intact"], true);
        assert_eq!(b["count"], 5);
        assert_eq!(b["head"].as_str().unwrap().len(), 64);
        // Newest last.
        assert_eq!(records[2]["detail"]["n"], 4);
        // A tampered line: the records still come back, marked not intact.
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replacen("api:root", "api:evil", 1)).unwrap();
        let b = body(&audit(&path, 3));
        assert_eq!(b["intact"], false);
        // The next record's `prev` no longer matches the altered first line.
        assert_eq!(b["broken"]["line"], 2);
    }

    #[test]
    fn one_import_at_a_time() {
        let slot = ImportSlot::take().unwrap();
        assert_eq!(ImportSlot::take().err().unwrap().status, 409);
        drop(slot);
        drop(ImportSlot::take().unwrap());
    }

    #[test]
    fn a_malformed_import_changes_nothing_and_lists_problems() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = crate::config::load_str("test", "").unwrap();
        config.storage.dir = dir.path().to_owned();
        let r = import(&config, 1, b"[{\"id\": 3}]", Format::Json, "api:root", None);
        assert_eq!(r.status, 400, "{}", r.body);
        assert_eq!(body(&r)["error"]["code"], "invalid_knowledge_base");
        assert!(!dir.path().join("kb-0").exists());
    }
}
