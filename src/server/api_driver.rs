//! The shard-local driver of one `/api/` request: reads the bounded body, runs the sans-IO
//! [`crate::api`] core, applies the login rate limits, and writes the JSON response.
//!
//! Bodies: `Content-Length` only (chunked bodies are refused by the head parser); above
//! `[api] max_body_bytes` → 413 before reading any of it; a POST or PUT without
//! `Content-Length` → 411; a body not complete within `[http] handshake_timeout` → 408. The
//! body buffer is allocated for the announced length only after that check.
//!
//! Password hashing and account commits run on the shard's blocking thread
//! (through [`crate::blocking::BlockingJobs`], so shutdown waits for them), never on the
//! event loop; a request arriving while the shard stops gets 503 `shutting_down`. Generic over the stream type, so plain TCP
//! and TLS connections share it.
//!
//! Admin plans ([`api::admin`]): the audit file and the replica's entries are read on the
//! blocking thread; a try-a-question goes through the shard's intent engine like a visitor's
//! message (awaited on the loop, the model runs on the inference worker); an import runs on
//! its own `kb-import` thread (it takes seconds to minutes and must not hold up logins on the
//! blocking thread) and the request waits for it; so does a sync (`GET|POST /api/kb/sync`:
//! encoding, hashing and diffing the snapshot) on a `kb-sync` thread. The bodies of
//! `POST /api/kb/import` and `POST /api/kb/sync` are bounded by `[api] max_import_bytes`,
//! every other body by `[api] max_body_bytes`.
//!
//! Canned replies are read and written on the blocking thread (the process's one
//! [`crate::canned::CannedStore`]). Conversation and queue requests ask the shards that hold
//! the answer through the mesh (`ShardMessage::Query`; every shard of a search at once, the
//! owner of one conversation, the dispatcher for the queue), wait up to
//! [`SHARD_ANSWER_TIMEOUT`] for each answer (503 `shard_unavailable` after it) and merge the
//! pages (`conversation::query::merge`); each shard reads its own store on its own blocking
//! thread.

use std::net::IpAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::rc::Rc;

use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use std::time::Duration;

use super::{Shard, ShardMessage};
use crate::api::admin::{self, AdminPlan};
use crate::api::canned;
use crate::api::conversations::{self, ConversationPlan};
use crate::api::{self, ApiRequest, ApiResponse, Plan};
use crate::auth::{clock, events};
use crate::conversation::query::{self, Answer, Query, Question};
use crate::http::{self, RequestHead};
use crate::kb::{self, KbError, KbReplica, ReplicaReader};
use crate::metrics::ShardMetrics;
use crate::store::ConversationId;

/// Answers one API request on `stream` and closes it. `buffer[leftover]` are body bytes
/// that arrived with the head.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    shard: &Rc<Shard>,
    stream: &mut S,
    head: RequestHead,
    buffer: Vec<u8>,
    leftover: Range<usize>,
    peer: Option<IpAddr>,
) {
    let response = answer(shard, stream, &head, buffer, leftover, peer).await;
    if response.status >= 400 {
        ShardMetrics::add(&shard.counters().http_errors, 1);
    }
    let retry_after = response.retry_after.map(|secs| secs.to_string());
    let extra: Vec<(&str, &str)> = retry_after
        .as_deref()
        .map(|secs| ("Retry-After", secs))
        .into_iter()
        .chain(
            response
                .headers
                .iter()
                .map(|(name, value)| (*name, value.as_str())),
        )
        .collect();
    let mut out = shard.buffers.take();
    http::write_response(
        &mut out,
        response.status,
        response.content_type,
        response.body.as_bytes(),
        &extra,
    );
    let _ = stream.write_all(&out).await;
    let _ = stream.close().await;
    shard.buffers.give(out);
}

async fn answer<S: AsyncRead + Unpin>(
    shard: &Rc<Shard>,
    stream: &mut S,
    head: &RequestHead,
    buffer: Vec<u8>,
    leftover: Range<usize>,
    peer: Option<IpAddr>,
) -> ApiResponse {
    let max = api::body_limit(&head.method, &head.path, &shard.config().api);
    let length = match head.content_length {
        None if matches!(head.method.as_str(), "POST" | "PUT") => {
            shard.buffers.give(buffer);
            return ApiResponse::error(411, "length_required", "send the body with Content-Length");
        }
        None => 0,
        Some(n) if n > max as u64 => {
            shard.buffers.give(buffer);
            return ApiResponse::error(
                413,
                "body_too_large",
                format_args!("the body may be at most {max} bytes"),
            );
        }
        Some(n) => n as usize,
    };
    let mut body = Vec::with_capacity(length);
    let early = &buffer[leftover];
    body.extend_from_slice(&early[..early.len().min(length)]);
    shard.buffers.give(buffer);
    if body.len() < length {
        let read_rest = async {
            let mut chunk = [0u8; 4096];
            while body.len() < length {
                let want = (length - body.len()).min(chunk.len());
                match stream.read(&mut chunk[..want]).await {
                    Ok(0) | Err(_) => return false,
                    Ok(read) => body.extend_from_slice(&chunk[..read]),
                }
            }
            true
        };
        let complete = futures_lite::future::or(read_rest, async {
            glommio::timer::sleep(shard.config().http.handshake_timeout).await;
            false
        })
        .await;
        if !complete {
            return ApiResponse::error(408, "timeout", "request body not received in time");
        }
    }

    let request = ApiRequest {
        method: &head.method,
        path: &head.path,
        query: head.query.as_deref(),
        authorization: head.header_str("authorization"),
        content_type: head.header_str("content-type"),
        body: &body,
        peer,
    };
    let now = clock::unix_now();
    let plan = match api::plan(&request, &shard.authority, now) {
        Ok(Plan::Admin(plan)) => return answer_admin(shard, plan, body, peer).await,
        Ok(plan) => plan,
        Err(response) => return response,
    };
    if let Some(name) = plan.login_name() {
        let now_ms = shard.started.elapsed().as_millis() as u64;
        if let Err(retry) = shard.login_limiter.borrow_mut().check(peer, name, now_ms) {
            events::login_rate_limited(name, peer, retry.ms);
            ShardMetrics::add(&shard.counters().login_rate_limited, 1);
            return ApiResponse::rate_limited(retry.secs());
        }
    }
    let authority = shard.authority.clone();
    let default_max_open = shard.config().agents.default_max_open;
    shard
        .router
        .blocking_jobs()
        .run(move || api::execute(plan, &authority, peer, now, default_max_open))
        .await
        .unwrap_or_else(|_| stopping())
}

/// Carries out an admin plan with this shard's resources.
async fn answer_admin(
    shard: &Rc<Shard>,
    plan: AdminPlan,
    body: Vec<u8>,
    peer: Option<IpAddr>,
) -> ApiResponse {
    match plan {
        AdminPlan::Audit { limit } => {
            let path = shard.config().audit_path();
            shard
                .router
                .blocking_jobs()
                .run(move || admin::audit(&path, limit))
                .await
                .unwrap_or_else(|_| stopping())
        }
        AdminPlan::KbEntries { query, limit } => {
            with_entries(shard, move |version, entries| {
                admin::entries(version, &entries, query.as_deref(), limit)
            })
            .await
        }
        AdminPlan::KbEntry { id } => {
            with_entries(shard, move |version, entries| {
                admin::entry(version, &entries, &id)
            })
            .await
        }
        AdminPlan::KbExport => with_entries(shard, |_, entries| admin::export(&entries)).await,
        AdminPlan::KbDeleteEntry { by, id } => {
            let slot = match admin::ImportSlot::take() {
                Ok(slot) => slot,
                Err(busy) => return busy,
            };
            let config = shard.config();
            let shards = shard.shard_count;
            let replica = ShardReplica::of(shard);
            on_own_thread("kb-import", move || {
                let _slot = slot;
                match replica.entries() {
                    Ok((_, current)) => {
                        admin::delete_entry(&config, shards, current, &id, &by, peer)
                    }
                    Err(err) => unreadable(&err),
                }
            })
            .await
        }
        AdminPlan::Canned(plan) => {
            let store = shard.canned.clone();
            shard
                .router
                .blocking_jobs()
                .run(move || canned::execute(plan, &store, clock::unix_now()))
                .await
                .unwrap_or_else(|_| stopping())
        }
        AdminPlan::Conversations(plan) => answer_conversations(shard, plan).await,
        AdminPlan::KbTry { text } => {
            let Some(engine) = shard.router.engine() else {
                return ApiResponse::error(
                    503,
                    "bot_disabled",
                    "this server's bot does not answer from the knowledge base ([inference] enabled, [bot] handlers)",
                );
            };
            // A version imported a moment ago is tried, not the one loaded before it.
            if let Err(err) = engine.reload() {
                tracing::warn!(error = %err, "knowledge-base reload for a try failed");
            }
            let found = engine.recognise(&text).await.map(Into::into);
            admin::tried(&text, found, &shard.config().bot)
        }
        AdminPlan::KbImport { by, format } => {
            let slot = match admin::ImportSlot::take() {
                Ok(slot) => slot,
                Err(busy) => return busy,
            };
            let config = shard.config();
            let shards = shard.shard_count;
            on_own_thread("kb-import", move || {
                let _slot = slot;
                admin::import(&config, shards, &body, format, &by, peer)
            })
            .await
        }
        AdminPlan::KbSyncState => {
            let replica = ShardReplica::of(shard);
            on_own_thread("kb-sync", move || sync_answer(&replica, None)).await
        }
        AdminPlan::KbSync { by, request } => {
            let replica = ShardReplica::of(shard);
            on_own_thread("kb-sync", move || {
                let response = sync_answer(&replica, Some(&request));
                tracing::info!(
                    by = by.as_str(),
                    status = response.status,
                    answer_bytes = response.body.len(),
                    "knowledge-base delta served"
                );
                response
            })
            .await
        }
    }
}

/// Reads the current knowledge-base version's entries on the shard's blocking thread and
/// answers with `answer(version, entries)`.
async fn with_entries(
    shard: &Rc<Shard>,
    answer: impl FnOnce(Option<u64>, Vec<kb::Entry>) -> ApiResponse + Send + 'static,
) -> ApiResponse {
    let replica = ShardReplica::of(shard);
    shard
        .router
        .blocking_jobs()
        .run(move || match replica.entries() {
            Ok((version, entries)) => answer(version, entries),
            Err(err) => unreadable(&err),
        })
        .await
        .unwrap_or_else(|_| stopping())
}

fn unreadable(err: &KbError) -> ApiResponse {
    tracing::error!(error = %err, "knowledge-base replica unreadable");
    ApiResponse::error(500, "internal", "the knowledge base could not be read")
}

/// How long a request waits for another shard's answer before giving up with 503.
const SHARD_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Asks shard `to` a question through the mesh and waits for its answer; `None` when it does
/// not answer in time or dropped the question (it is stopping).
async fn ask(shard: &Shard, to: usize, question: Question) -> Option<Answer> {
    answer_of(send_question(shard, to, question)).await
}

/// Sends shard `to` a question; its answer comes through the returned channel.
fn send_question(
    shard: &Shard,
    to: usize,
    question: Question,
) -> futures_channel::oneshot::Receiver<Answer> {
    let (reply, answer) = futures_channel::oneshot::channel();
    shard
        .router
        .send(to, ShardMessage::Query(Query { question, reply }));
    answer
}

/// The answer of a question sent, or `None` after [`SHARD_ANSWER_TIMEOUT`] or when the shard
/// dropped it.
async fn answer_of(answer: futures_channel::oneshot::Receiver<Answer>) -> Option<Answer> {
    futures_lite::future::or(async { answer.await.ok() }, async {
        glommio::timer::sleep(SHARD_ANSWER_TIMEOUT).await;
        None
    })
    .await
}

fn shard_unavailable() -> ApiResponse {
    ApiResponse::error(
        503,
        "shard_unavailable",
        "a shard did not answer in time; retry shortly",
    )
}

fn store_failed(err: &crate::store::StoreError) -> ApiResponse {
    tracing::error!(error = %err, "conversation store unreadable");
    ApiResponse::error(500, "internal", "the conversation store could not be read")
}

/// The conversation and queue endpoints: every shard that may hold an answer is asked
/// through the mesh (it reads its own store on its blocking thread), and the answers merged.
async fn answer_conversations(shard: &Rc<Shard>, plan: ConversationPlan) -> ApiResponse {
    let shards = shard.shard_count;
    match plan {
        ConversationPlan::Search {
            filter,
            before,
            limit,
        } => match gather(shard, filter, before, limit, false).await {
            Ok((found, next)) => conversations::search_page(&found, next),
            Err(response) => response,
        },
        ConversationPlan::Export {
            filter,
            before,
            limit,
        } => match gather(shard, filter, before, limit, true).await {
            Ok((found, next)) => conversations::export_page(&found, next),
            Err(response) => response,
        },
        ConversationPlan::Get { id } | ConversationPlan::Transcript { id, .. }
            if ConversationId(id).shard() >= shards =>
        {
            conversations::unknown(id)
        }
        ConversationPlan::Get { id } => {
            let question = Question::Transcript {
                id: ConversationId(id),
                after: 0,
                limit: 0,
            };
            match ask(shard, ConversationId(id).shard(), question).await {
                Some(Answer::Transcript(Ok(Some(found)))) => {
                    ApiResponse::json(200, conversations::summary(&found.conversation))
                }
                Some(Answer::Transcript(Ok(None))) => conversations::unknown(id),
                Some(Answer::Transcript(Err(err))) => store_failed(&err),
                _ => shard_unavailable(),
            }
        }
        ConversationPlan::Transcript {
            id,
            format,
            after,
            limit,
        } => {
            let question = Question::Transcript {
                id: ConversationId(id),
                after,
                limit,
            };
            match ask(shard, ConversationId(id).shard(), question).await {
                Some(Answer::Transcript(Ok(Some(found)))) => {
                    conversations::transcript(&found, format, limit)
                }
                Some(Answer::Transcript(Ok(None))) => conversations::unknown(id),
                Some(Answer::Transcript(Err(err))) => store_failed(&err),
                _ => shard_unavailable(),
            }
        }
        ConversationPlan::Queue { limit } => {
            let dispatcher = crate::conversation::dispatcher_shard(shards);
            match ask(shard, dispatcher, Question::Queue { limit }).await {
                Some(Answer::Queue(view)) => conversations::queue(&view),
                _ => shard_unavailable(),
            }
        }
    }
}

/// A search of every shard that may hold a match (only the visitor's own shard when the
/// filter names a site and a visitor), merged into one page.
async fn gather(
    shard: &Rc<Shard>,
    filter: query::Filter,
    before: Option<u64>,
    limit: usize,
    with_messages: bool,
) -> Result<(Vec<query::Found>, Option<u64>), ApiResponse> {
    let shards = shard.shard_count;
    let asked: Vec<usize> = match (&filter.site, &filter.visitor) {
        (Some(site), Some(visitor)) => {
            vec![crate::conversation::visitor_owner(site, visitor, shards)]
        }
        _ => (0..shards).collect(),
    };
    let search = query::Search {
        filter,
        before,
        limit,
        with_messages,
        byte_budget: conversations::EXPORT_BYTE_BUDGET / asked.len().max(1),
        scan_budget: query::SCAN_BUDGET,
    };
    // Every shard is asked before any answer is awaited, so they read in parallel.
    let answers: Vec<_> = asked
        .iter()
        .map(|&to| send_question(shard, to, Question::Search(search.clone())))
        .collect();
    let mut pages = Vec::with_capacity(answers.len());
    for answer in answers {
        match answer_of(answer).await {
            Some(Answer::Page(Ok(page))) => pages.push(page),
            Some(Answer::Page(Err(err))) => return Err(store_failed(&err)),
            _ => return Err(shard_unavailable()),
        }
    }
    Ok(query::merge(pages, limit))
}

/// Runs `job` (seconds of work: an import, a snapshot's hash and diff) on a thread of its own
/// named `name`, never on the event loop or the shard's blocking thread, and awaits its answer.
async fn on_own_thread(
    name: &str,
    job: impl FnOnce() -> ApiResponse + Send + 'static,
) -> ApiResponse {
    let (done, result) = futures_channel::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = done.send(job());
        });
    if let Err(err) = spawned {
        tracing::error!(error = %err, thread = name, "cannot start a thread");
        return ApiResponse::error(500, "internal", "cannot start the job");
    }
    result.await.unwrap_or_else(|_| {
        ApiResponse::error(500, "internal", "the job stopped without an answer")
    })
}

/// Where this shard's knowledge-base replica is: its engine's reader, or (no bot on this
/// shard) the directory to open it from. `Send`, for the thread that reads it.
struct ShardReplica {
    engine_reader: Option<ReplicaReader>,
    dir: PathBuf,
    shard: usize,
}

impl ShardReplica {
    fn of(shard: &Shard) -> ShardReplica {
        ShardReplica {
            engine_reader: shard.router.engine().map(|e| e.replica().clone()),
            dir: shard.config().storage.dir.clone(),
            shard: shard.id.0,
        }
    }

    /// The current version and its entries (`None` and none before the first import).
    fn entries(&self) -> Result<(Option<u64>, Vec<kb::Entry>), KbError> {
        let reader = self.reader()?;
        let view = reader.read()?;
        Ok((view.version()?, view.entries()?))
    }

    fn reader(&self) -> Result<ReplicaReader, KbError> {
        match &self.engine_reader {
            Some(reader) => Ok(reader.clone()),
            None => {
                Ok(KbReplica::open_shared(&self.dir, self.shard, kb::DEFAULT_MAP_SIZE)?.reader())
            }
        }
    }
}

/// `GET|POST /api/kb/sync`: the current version's snapshot file, described, with what a POST's
/// `request` asks for.
fn sync_answer(replica: &ShardReplica, request: Option<&admin::SyncRequest>) -> ApiResponse {
    let described = || -> Result<ApiResponse, KbError> {
        let reader = replica.reader()?;
        let view = reader.read()?;
        let Some(snapshot) = view.snapshot()? else {
            return Ok(admin::no_knowledge_base());
        };
        let file = kb::encode_snapshot_view(&snapshot);
        let info = &snapshot.info;
        Ok(admin::sync_answer(
            info.version,
            &file,
            info.entry_count,
            info.question_count,
            request,
        ))
    };
    described().unwrap_or_else(|err| {
        tracing::error!(error = %err, "knowledge-base replica unreadable");
        ApiResponse::error(500, "internal", "the knowledge base could not be read")
    })
}

/// The answer to an API request that arrives while the shard stops (no new blocking job).
fn stopping() -> ApiResponse {
    ApiResponse::error(
        503,
        "shutting_down",
        "the server is shutting down; retry shortly",
    )
}
