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

use std::net::IpAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::rc::Rc;

use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Shard;
use crate::api::admin::{self, AdminPlan};
use crate::api::{self, ApiRequest, ApiResponse, Plan};
use crate::auth::{clock, events};
use crate::http::{self, RequestHead};
use crate::kb::{self, KbError, KbReplica, ReplicaReader};
use crate::metrics::ShardMetrics;

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
        .collect();
    let mut out = shard.buffers.take();
    http::write_response(
        &mut out,
        response.status,
        "application/json",
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
            let replica = ShardReplica::of(shard);
            shard
                .router
                .blocking_jobs()
                .run(move || {
                    let listed = || -> Result<ApiResponse, KbError> {
                        let reader = replica.reader()?;
                        let view = reader.read()?;
                        let version = view.version()?;
                        let entries = view.entries()?;
                        Ok(admin::entries(version, &entries, query.as_deref(), limit))
                    };
                    listed().unwrap_or_else(|err| {
                        tracing::error!(error = %err, "knowledge-base replica unreadable");
                        ApiResponse::error(500, "internal", "the knowledge base could not be read")
                    })
                })
                .await
                .unwrap_or_else(|_| stopping())
        }
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
