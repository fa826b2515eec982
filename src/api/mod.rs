//! The JSON API under `/api/`: sans-IO, request in, response out.
//!
//! The shard driver (`server::api_driver`) reads a request head and its bounded body, then
//! calls [`plan`] (parse, authenticate the bearer token, check the RBAC table; cheap, runs on
//! the event loop), applies the login rate limits to a [`Plan::Login`], and runs
//! [`execute`] (argon2 and LMDB commits; runs on the shard's blocking thread). No function
//! here touches a socket.
//!
//! Endpoints (documented in `docs/protocol.md`):
//! - `POST /api/login` `{"name","password"}` → `{"token","expires"}`
//! - `POST /api/refresh` (Bearer) → a new `{"token","expires"}`
//! - `GET /api/me` (Bearer) → the account
//! - `GET /api/agents`, `POST /api/agents`, `POST /api/agents/NAME/disable`,
//!   `POST /api/agents/NAME/enable`, `PUT /api/agents/NAME/role`, and
//!   `PATCH /api/agents/NAME` `{"role"?, "disabled"?}` (admin: `ManageAgents`)
//! - the admin endpoints of [`admin`]: `GET /api/audit`, `GET /api/kb/entries`,
//!   `GET|DELETE /api/kb/entries/ID`, `GET /api/kb/export`, `POST /api/kb/try`,
//!   `POST /api/kb/import`, `GET|POST /api/kb/sync`; the canned replies of [`canned`]
//!   (`/api/canned[/ID]`); the conversations and the queue of [`conversations`]
//!   (`/api/conversations[/export|/ID[/transcript]]`, `/api/queue`). [`plan`] parses and
//!   authorizes them into a [`Plan::Admin`] that the shard driver carries out with its shard's
//!   resources (and, for conversations, the other shards' through the mesh).
//!
//! `docs/openapi.yaml` describes every endpoint; `tests/openapi.rs` checks the server against
//! it with schemathesis.
//!
//! Invariants:
//! - Every error has one shape, `{"error":{"code":"...","message":"..."}}`, with a proper
//!   status; every response is `application/json`.
//! - Every endpoint but login checks [`crate::auth::rbac::allows`] before doing anything.
//! - Login answers a wrong name, a wrong password, a disabled and a locked account with the
//!   same 401 body.

pub mod admin;
pub mod canned;
pub mod conversations;

use std::net::IpAddr;

use serde::Deserialize;
use serde_json::json;

use crate::auth::accounts::Account;
use crate::auth::rbac::{self, Action, Role};
use crate::auth::{self, clock, events, manage, Authority, LoginRefusal, TokenRefusal};
use admin::AdminPlan;
use canned::CannedPlan;
use conversations::ConversationPlan;

/// A request as the API sees it.
#[derive(Clone, Copy, Debug)]
pub struct ApiRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// The raw query string after `?`, if any (not decoded).
    pub query: Option<&'a str>,
    /// The `Authorization` header, if any.
    pub authorization: Option<&'a str>,
    /// The `Content-Type` header, if any.
    pub content_type: Option<&'a str>,
    pub body: &'a [u8],
    pub peer: Option<IpAddr>,
}

/// A complete response: status, body (JSON unless `content_type` says otherwise), and
/// `Retry-After` seconds for a 429.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: String,
    pub retry_after: Option<u64>,
    /// `application/json` but for a transcript as text and an NDJSON export.
    pub content_type: &'static str,
    /// More headers: `Allow` on a 405, `X-Next-Cursor` where the next page of a paged
    /// non-JSON answer (the export) starts.
    pub headers: Vec<(&'static str, String)>,
}

impl ApiResponse {
    pub fn json(status: u16, value: serde_json::Value) -> ApiResponse {
        ApiResponse {
            status,
            body: value.to_string(),
            retry_after: None,
            content_type: "application/json",
            headers: Vec::new(),
        }
    }

    /// A 200 whose body is not JSON (`text/plain; charset=utf-8`, `application/x-ndjson`).
    pub fn other(content_type: &'static str, body: String) -> ApiResponse {
        ApiResponse {
            status: 200,
            body,
            retry_after: None,
            content_type,
            headers: Vec::new(),
        }
    }

    /// The one error shape.
    pub fn error(status: u16, code: &str, message: impl std::fmt::Display) -> ApiResponse {
        ApiResponse::json(
            status,
            json!({"error": {"code": code, "message": message.to_string()}}),
        )
    }

    /// 429 with `Retry-After`.
    pub fn rate_limited(retry_after_secs: u64) -> ApiResponse {
        let mut response = ApiResponse::error(
            429,
            "rate_limited",
            format_args!("too many login attempts; retry after {retry_after_secs} s"),
        );
        response.retry_after = Some(retry_after_secs);
        response
    }

    fn invalid_credentials() -> ApiResponse {
        ApiResponse::error(401, "invalid_credentials", "wrong name or password")
    }
}

/// What an authenticated caller asked for, checked against the RBAC table.
#[derive(Debug)]
pub enum Plan {
    Login {
        name: String,
        password: String,
    },
    Refresh {
        account: Account,
    },
    Me {
        account: Account,
    },
    ListAgents,
    CreateAgent {
        by: String,
        body: CreateAgent,
    },
    SetDisabled {
        by: String,
        name: String,
        disabled: bool,
    },
    SetRole {
        by: String,
        name: String,
        role: Role,
    },
    /// `PATCH /api/agents/NAME`: the role and/or the disabled flag.
    Patch {
        by: String,
        name: String,
        role: Option<Role>,
        disabled: Option<bool>,
    },
    /// An admin endpoint: carried out by the shard driver (see [`admin`]).
    Admin(AdminPlan),
}

impl Plan {
    /// The account name of a login attempt (for the per-account rate limit).
    pub fn login_name(&self) -> Option<&str> {
        match self {
            Plan::Login { name, .. } => Some(name),
            _ => None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    name: String,
    password: String,
}

/// `POST /api/agents` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAgent {
    name: String,
    password: String,
    role: String,
    display: Option<String>,
    max_open: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleBody {
    role: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    #[serde(default, deserialize_with = "present")]
    role: Option<String>,
    #[serde(default, deserialize_with = "present")]
    disabled: Option<bool>,
}

/// A field that may be left out but, when present, must not be `null`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

fn parse_role(role: &str) -> Result<Role, ApiResponse> {
    role.parse::<Role>()
        .map_err(|err| ApiResponse::error(400, "bad_request", err))
}

/// `limit` from the query string: absent → `default`, else 1..=`max` (400 otherwise).
fn limit_param(req: &ApiRequest<'_>, default: usize, max: usize) -> Result<usize, ApiResponse> {
    admin::parse_limit(query_param(req, "limit").as_deref(), default, max)
}

/// A query parameter, percent-decoded (`None` when absent or undecodable).
fn query_param(req: &ApiRequest<'_>, name: &str) -> Option<String> {
    req.query
        .and_then(|query| crate::http::query_param(query, name))
        .map(|value| value.into_owned())
}

fn parse_body<'de, T: Deserialize<'de>>(req: &ApiRequest<'de>) -> Result<T, ApiResponse> {
    if let Some(content_type) = req.content_type {
        let media = content_type.split(';').next().unwrap_or("").trim();
        if !media.eq_ignore_ascii_case("application/json") {
            return Err(ApiResponse::error(
                415,
                "unsupported_media_type",
                "send the body as application/json",
            ));
        }
    }
    serde_json::from_slice(req.body).map_err(|err| {
        ApiResponse::error(400, "bad_request", format_args!("invalid JSON body: {err}"))
    })
}

/// 405 with `Allow`; `allowed` reads like "GET or POST".
fn method_not_allowed(allowed: &str) -> ApiResponse {
    let mut response = ApiResponse::error(
        405,
        "method_not_allowed",
        format_args!("this endpoint takes {allowed}"),
    );
    response
        .headers
        .push(("Allow", allowed.replace(" or ", ", ")));
    response
}

/// An admin may not disable their own account or change its role over the API: the request
/// that would lock the last admin out (or leave the caller without the rights they used) is
/// refused with `409 own_account`. Another admin, or `switchboard agent` on the host, can.
fn keeps_own_access(
    admin: &Account,
    name: &str,
    role: Option<Role>,
    disabled: Option<bool>,
) -> Result<(), ApiResponse> {
    let own = admin.name == name;
    if own && (disabled == Some(true) || role.is_some_and(|role| role != admin.role)) {
        return Err(ApiResponse::error(
            409,
            "own_account",
            "an admin cannot disable or change the role of their own account; another admin can",
        ));
    }
    Ok(())
}

/// What the API trims from free text: space, tab, CR and LF (the same set `docs/openapi.yaml`
/// names, so a client's validator and the server agree on what is blank).
pub const ASCII_BLANKS: &[char] = &[' ', '\t', '\r', '\n'];

/// A path segment as text (percent-decoded, 1..=256 characters), or a 400.
fn path_text(segment: &str) -> Result<String, ApiResponse> {
    match crate::http::decode_path_segment(segment) {
        Some(text) if !text.is_empty() && text.chars().count() <= 256 => Ok(text.into_owned()),
        _ => Err(ApiResponse::error(
            400,
            "bad_request",
            "the id in the path must be 1 to 256 characters of UTF-8",
        )),
    }
}

/// A numeric id in the path, or a 400.
fn path_number(segment: &str) -> Result<u64, ApiResponse> {
    segment.parse::<u64>().map_err(|_| {
        ApiResponse::error(
            400,
            "bad_request",
            "the id in the path must be a whole number",
        )
    })
}

/// The agent a conversation search looks for: the account's display name signs their
/// messages; an unknown name (an account since renamed, a static development account) is
/// matched as it is.
fn agent_filter(authority: &Authority, id: String) -> crate::conversation::query::AgentFilter {
    let display = match authority.store().get(&id) {
        Ok(Some(account)) => account.display,
        _ => id.clone(),
    };
    crate::conversation::query::AgentFilter { id, display }
}

/// The bearer token's account, with the RBAC check for `action`.
fn authorize(
    req: &ApiRequest<'_>,
    authority: &Authority,
    action: Action,
    now: u64,
) -> Result<Account, ApiResponse> {
    let token = req
        .authorization
        .and_then(|value| {
            let (scheme, token) = value.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .ok_or_else(|| {
            ApiResponse::error(
                401,
                "unauthorized",
                "send a token from POST /api/login as Authorization: Bearer TOKEN",
            )
        })?;
    let (_, account) = authority.verify_token(token, now).map_err(|refusal| {
        events::token_refused(req.peer, refusal.code());
        token_refusal_response(&refusal)
    })?;
    if !rbac::allows(account.role, action) {
        events::access_denied(&account.name, account.role, &format!("{action:?}"));
        return Err(ApiResponse::error(
            403,
            "forbidden",
            format_args!("role {} may not do this ({action:?})", account.role),
        ));
    }
    Ok(account)
}

/// `GET /metrics` on the public listeners (no `[metrics] listen`): the bearer token's account,
/// if its role may read the metrics (`ViewMetrics`: supervisors and admins). The refusals are
/// the API's: 401 without a valid token, 403 for an agent, in the one error shape.
pub fn authorize_metrics(
    authorization: Option<&str>,
    peer: Option<IpAddr>,
    authority: &Authority,
    now: u64,
) -> Result<Account, ApiResponse> {
    let request = ApiRequest {
        method: "GET",
        path: "/metrics",
        query: None,
        authorization,
        content_type: None,
        body: &[],
        peer,
    };
    authorize(&request, authority, Action::ViewMetrics, now)
}

/// The HTTP answer to a refused token.
pub fn token_refusal_response(refusal: &TokenRefusal) -> ApiResponse {
    match refusal {
        TokenRefusal::Store(err) => {
            tracing::error!(error = %err, "account store");
            ApiResponse::error(500, "internal", "the account store failed")
        }
        refusal => ApiResponse::error(401, refusal.code(), refusal),
    }
}

/// Parses and authorizes a request at `now` (Unix seconds).
pub fn plan(req: &ApiRequest<'_>, authority: &Authority, now: u64) -> Result<Plan, ApiResponse> {
    let segments: Vec<&str> = req
        .path
        .strip_prefix("/api/")
        .unwrap_or("")
        .split('/')
        .collect();
    let by = |account: &Account| format!("api:{}", account.name);
    match segments.as_slice() {
        ["login"] => {
            if req.method != "POST" {
                return Err(method_not_allowed("POST"));
            }
            let body: LoginBody = parse_body(req)?;
            Ok(Plan::Login {
                name: body.name,
                password: body.password,
            })
        }
        ["refresh"] => {
            if req.method != "POST" {
                return Err(method_not_allowed("POST"));
            }
            let account = authorize(req, authority, Action::ViewOwnAccount, now)?;
            Ok(Plan::Refresh { account })
        }
        ["me"] => {
            if req.method != "GET" {
                return Err(method_not_allowed("GET"));
            }
            let account = authorize(req, authority, Action::ViewOwnAccount, now)?;
            Ok(Plan::Me { account })
        }
        ["agents"] => match req.method {
            "GET" => {
                authorize(req, authority, Action::ManageAgents, now)?;
                Ok(Plan::ListAgents)
            }
            "POST" => {
                let admin = authorize(req, authority, Action::ManageAgents, now)?;
                let body: CreateAgent = parse_body(req)?;
                Ok(Plan::CreateAgent {
                    by: by(&admin),
                    body,
                })
            }
            _ => Err(method_not_allowed("GET or POST")),
        },
        ["agents", name, verb @ ("disable" | "enable")] => {
            if req.method != "POST" {
                return Err(method_not_allowed("POST"));
            }
            let admin = authorize(req, authority, Action::ManageAgents, now)?;
            let disabled = *verb == "disable";
            keeps_own_access(&admin, name, None, Some(disabled))?;
            Ok(Plan::SetDisabled {
                by: by(&admin),
                name: (*name).to_owned(),
                disabled,
            })
        }
        ["agents", name, "role"] => {
            if req.method != "PUT" {
                return Err(method_not_allowed("PUT"));
            }
            let admin = authorize(req, authority, Action::ManageAgents, now)?;
            let body: RoleBody = parse_body(req)?;
            let role = body
                .role
                .parse::<Role>()
                .map_err(|err| ApiResponse::error(400, "bad_request", err))?;
            keeps_own_access(&admin, name, Some(role), None)?;
            Ok(Plan::SetRole {
                by: by(&admin),
                name: (*name).to_owned(),
                role,
            })
        }
        ["agents", name] => {
            if req.method != "PATCH" {
                return Err(method_not_allowed("PATCH"));
            }
            let admin = authorize(req, authority, Action::ManageAgents, now)?;
            let body: PatchBody = parse_body(req)?;
            let role = body.role.as_deref().map(parse_role).transpose()?;
            if role.is_none() && body.disabled.is_none() {
                return Err(ApiResponse::error(
                    400,
                    "bad_request",
                    "send \"role\" and/or \"disabled\"",
                ));
            }
            keeps_own_access(&admin, name, role, body.disabled)?;
            Ok(Plan::Patch {
                by: by(&admin),
                name: (*name).to_owned(),
                role,
                disabled: body.disabled,
            })
        }
        ["audit"] => {
            if req.method != "GET" {
                return Err(method_not_allowed("GET"));
            }
            authorize(req, authority, Action::ViewAudit, now)?;
            let limit = limit_param(req, admin::DEFAULT_AUDIT_RECORDS, admin::MAX_AUDIT_RECORDS)?;
            Ok(Plan::Admin(AdminPlan::Audit { limit }))
        }
        ["kb", "entries"] => {
            if req.method != "GET" {
                return Err(method_not_allowed("GET"));
            }
            authorize(req, authority, Action::ManageKnowledgeBase, now)?;
            let limit = limit_param(req, admin::DEFAULT_ENTRIES, admin::MAX_ENTRIES)?;
            Ok(Plan::Admin(AdminPlan::KbEntries {
                query: query_param(req, "q"),
                limit,
            }))
        }
        ["kb", "entries", id] => {
            let id = path_text(id)?;
            match req.method {
                "GET" => {
                    authorize(req, authority, Action::ManageKnowledgeBase, now)?;
                    Ok(Plan::Admin(AdminPlan::KbEntry { id }))
                }
                "DELETE" => {
                    let admin = authorize(req, authority, Action::ManageKnowledgeBase, now)?;
                    Ok(Plan::Admin(AdminPlan::KbDeleteEntry { by: by(&admin), id }))
                }
                _ => Err(method_not_allowed("GET or DELETE")),
            }
        }
        ["kb", "export"] => {
            if req.method != "GET" {
                return Err(method_not_allowed("GET"));
            }
            authorize(req, authority, Action::ManageKnowledgeBase, now)?;
            Ok(Plan::Admin(AdminPlan::KbExport))
        }
        ["canned"] => match req.method {
            "GET" => {
                authorize(req, authority, Action::UseCannedReplies, now)?;
                let after =
                    conversations::parse_number(query_param(req, "after").as_deref(), "after")?;
                let limit = limit_param(req, canned::DEFAULT_LIST, canned::MAX_LIST)?;
                Ok(Plan::Admin(AdminPlan::Canned(CannedPlan::List {
                    after: after.unwrap_or(0),
                    limit,
                    query: query_param(req, "q"),
                })))
            }
            "POST" => {
                let manager = authorize(req, authority, Action::ManageCannedReplies, now)?;
                Ok(Plan::Admin(AdminPlan::Canned(CannedPlan::Create {
                    by: by(&manager),
                    content: parse_body(req)?,
                })))
            }
            _ => Err(method_not_allowed("GET or POST")),
        },
        ["canned", id] => {
            let id = path_number(id)?;
            match req.method {
                "GET" => {
                    authorize(req, authority, Action::UseCannedReplies, now)?;
                    Ok(Plan::Admin(AdminPlan::Canned(CannedPlan::Get { id })))
                }
                "PUT" => {
                    let manager = authorize(req, authority, Action::ManageCannedReplies, now)?;
                    Ok(Plan::Admin(AdminPlan::Canned(CannedPlan::Replace {
                        by: by(&manager),
                        id,
                        content: parse_body(req)?,
                    })))
                }
                "DELETE" => {
                    let manager = authorize(req, authority, Action::ManageCannedReplies, now)?;
                    Ok(Plan::Admin(AdminPlan::Canned(CannedPlan::Delete {
                        by: by(&manager),
                        id,
                    })))
                }
                _ => Err(method_not_allowed("GET, PUT or DELETE")),
            }
        }
        ["conversations"] | ["conversations", "export"] => {
            if req.method != "GET" {
                return Err(method_not_allowed("GET"));
            }
            authorize(req, authority, Action::ReadAnyConversation, now)?;
            let export = segments.len() == 2;
            let (mut filter, agent) = conversations::parse_filter(|name| query_param(req, name))?;
            filter.agent = agent.map(|id| agent_filter(authority, id));
            let before =
                conversations::parse_number(query_param(req, "before").as_deref(), "before")?;
            let (default, max) = if export {
                (conversations::DEFAULT_EXPORT, conversations::MAX_EXPORT)
            } else {
                (conversations::DEFAULT_SEARCH, conversations::MAX_SEARCH)
            };
            let limit = limit_param(req, default, max)?;
            Ok(Plan::Admin(AdminPlan::Conversations(if export {
                ConversationPlan::Export {
                    filter,
                    before,
                    limit,
                }
            } else {
                ConversationPlan::Search {
                    filter,
                    before,
                    limit,
                }
            })))
        }
        ["conversations", id] => {
            let id = path_number(id)?;
            if req.method != "GET" {
                return Err(method_not_allowed("GET"));
            }
            authorize(req, authority, Action::ReadAnyConversation, now)?;
            Ok(Plan::Admin(AdminPlan::Conversations(
                ConversationPlan::Get { id },
            )))
        }
        ["conversations", id, "transcript"] => {
            let id = path_number(id)?;
            if req.method != "GET" {
                return Err(method_not_allowed("GET"));
            }
            authorize(req, authority, Action::ReadAnyConversation, now)?;
            let format = match query_param(req, "format").as_deref() {
                None | Some("json") => conversations::TranscriptFormat::Json,
                Some("text") => conversations::TranscriptFormat::Text,
                Some(_) => {
                    return Err(ApiResponse::error(
                        400,
                        "bad_request",
                        "format must be json or text",
                    ))
                }
            };
            let after = conversations::parse_number(query_param(req, "after").as_deref(), "after")?;
            let limit = limit_param(
                req,
                conversations::DEFAULT_TRANSCRIPT,
                conversations::MAX_TRANSCRIPT,
            )?;
            Ok(Plan::Admin(AdminPlan::Conversations(
                ConversationPlan::Transcript {
                    id,
                    format,
                    after: after.unwrap_or(0),
                    limit,
                },
            )))
        }
        ["queue"] => {
            if req.method != "GET" {
                return Err(method_not_allowed("GET"));
            }
            authorize(req, authority, Action::ViewQueue, now)?;
            let limit = limit_param(req, conversations::DEFAULT_QUEUE, conversations::MAX_QUEUE)?;
            Ok(Plan::Admin(AdminPlan::Conversations(
                ConversationPlan::Queue { limit },
            )))
        }
        ["kb", "try"] => {
            if req.method != "POST" {
                return Err(method_not_allowed("POST"));
            }
            authorize(req, authority, Action::TryKnowledgeBase, now)?;
            let body: admin::TryBody = parse_body(req)?;
            let text = body.text.trim_matches(ASCII_BLANKS);
            if text.is_empty() || body.text.chars().count() > admin::MAX_TRY_CHARS {
                return Err(ApiResponse::error(
                    400,
                    "bad_request",
                    format_args!(
                        "text must be 1 to {} characters, not all blank",
                        admin::MAX_TRY_CHARS
                    ),
                ));
            }
            Ok(Plan::Admin(AdminPlan::KbTry {
                text: text.to_owned(),
            }))
        }
        ["kb", "import"] => {
            if req.method != "POST" {
                return Err(method_not_allowed("POST"));
            }
            let admin = authorize(req, authority, Action::ManageKnowledgeBase, now)?;
            let format = admin::import_format(req.content_type, req.body)?;
            Ok(Plan::Admin(AdminPlan::KbImport {
                by: by(&admin),
                format,
            }))
        }
        ["kb", "sync"] => match req.method {
            "GET" => {
                authorize(req, authority, Action::ManageKnowledgeBase, now)?;
                Ok(Plan::Admin(AdminPlan::KbSyncState))
            }
            "POST" => {
                let admin = authorize(req, authority, Action::ManageKnowledgeBase, now)?;
                let body: admin::SyncBody = parse_body(req)?;
                Ok(Plan::Admin(AdminPlan::KbSync {
                    by: by(&admin),
                    request: admin::sync_request(body)?,
                }))
            }
            _ => Err(method_not_allowed("GET or POST")),
        },
        _ => Err(ApiResponse::error(404, "not_found", "no such endpoint")),
    }
}

/// The body limit for a request to `path`: `[api] max_import_bytes` for the import and for a
/// sync's signature (both grow with the knowledge base), `[api] max_body_bytes` for everything
/// else.
pub fn body_limit(method: &str, path: &str, api: &crate::config::ApiConfig) -> usize {
    if method == "POST" && matches!(path, "/api/kb/import" | "/api/kb/sync") {
        api.max_import_bytes
    } else {
        api.max_body_bytes
    }
}

fn issued(issued: &auth::Issued) -> ApiResponse {
    ApiResponse::json(
        200,
        json!({"token": issued.token, "expires": clock::rfc3339(issued.expires)}),
    )
}

fn manage_error(err: manage::ManageError) -> ApiResponse {
    use crate::auth::accounts::AccountError;
    match &err {
        manage::ManageError::Account(AccountError::NotFound(_)) => {
            ApiResponse::error(404, "unknown_agent", &err)
        }
        manage::ManageError::Account(AccountError::Exists(_)) => {
            ApiResponse::error(409, "agent_exists", &err)
        }
        _ if err.is_bad_input() => ApiResponse::error(400, "bad_request", &err),
        _ => {
            tracing::error!(error = %err, "account store");
            ApiResponse::error(500, "internal", "the account store failed")
        }
    }
}

/// Does what `plan` asked at `now` (Unix seconds). Blocking (argon2, LMDB commits): run it
/// off the event loop. `default_max_open` is `[agents] default_max_open`.
pub fn execute(
    plan: Plan,
    authority: &Authority,
    peer: Option<IpAddr>,
    now: u64,
    default_max_open: u32,
) -> ApiResponse {
    let store = authority.store();
    let min_password = authority.settings().min_password_chars;
    match plan {
        Plan::Login { name, password } => match authority.login(&name, &password, peer, now) {
            Ok((_, token)) => issued(&token),
            Err(LoginRefusal::InvalidCredentials) => ApiResponse::invalid_credentials(),
            Err(LoginRefusal::Store(err)) => {
                tracing::error!(error = %err, "account store");
                ApiResponse::error(500, "internal", "the account store failed")
            }
        },
        Plan::Refresh { account } => {
            events::token_refreshed(&account.name);
            issued(&authority.issue(&account, now))
        }
        Plan::Me { account } => ApiResponse::json(200, manage::public_view(&account, now)),
        Plan::ListAgents => match store.list() {
            Ok(accounts) => ApiResponse::json(
                200,
                json!({"agents": accounts.iter().map(|a| manage::public_view(a, now)).collect::<Vec<_>>()}),
            ),
            Err(err) => manage_error(err.into()),
        },
        Plan::CreateAgent { by, body } => {
            let role = match body.role.parse::<Role>() {
                Ok(role) => role,
                Err(err) => return ApiResponse::error(400, "bad_request", err),
            };
            let new = manage::NewAccount {
                name: &body.name,
                display: body.display.as_deref(),
                role,
                max_open: body.max_open.unwrap_or(default_max_open),
                password: &body.password,
            };
            match manage::create(store, &new, min_password, now, &by) {
                Ok(account) => ApiResponse::json(201, manage::public_view(&account, now)),
                Err(err) => manage_error(err),
            }
        }
        Plan::SetDisabled { by, name, disabled } => {
            match manage::set_disabled(store, &name, disabled, now, &by) {
                Ok(account) => ApiResponse::json(200, manage::public_view(&account, now)),
                Err(err) => manage_error(err),
            }
        }
        Plan::SetRole { by, name, role } => match manage::set_role(store, &name, role, now, &by) {
            Ok(account) => ApiResponse::json(200, manage::public_view(&account, now)),
            Err(err) => manage_error(err),
        },
        Plan::Patch {
            by,
            name,
            role,
            disabled,
        } => {
            let mut result = None;
            if let Some(role) = role {
                result = Some(manage::set_role(store, &name, role, now, &by));
            }
            if let Some(disabled) = disabled {
                if !matches!(result, Some(Err(_))) {
                    result = Some(manage::set_disabled(store, &name, disabled, now, &by));
                }
            }
            match result {
                Some(Ok(account)) => ApiResponse::json(200, manage::public_view(&account, now)),
                Some(Err(err)) => manage_error(err),
                None => ApiResponse::error(400, "bad_request", "nothing to change"),
            }
        }
        Plan::Admin(_) => {
            tracing::error!("an admin plan reached the account executor");
            ApiResponse::error(500, "internal", "this request cannot be carried out here")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::accounts::{AccountStore, LockoutPolicy};
    use crate::auth::token::SigningKey;
    use crate::auth::AuthSettings;

    fn authority(dir: &std::path::Path) -> Authority {
        let auth = Authority::new(
            AccountStore::open(dir).unwrap(),
            SigningKey::new([3; 32]),
            AuthSettings {
                token_ttl_secs: 3600,
                lockout: LockoutPolicy {
                    failures: 5,
                    lock_secs: 60,
                },
                min_password_chars: 8,
                dev_static_tokens: false,
                secret_file: dir.join("secret"),
            },
        );
        for (name, role) in [
            ("root", Role::Admin),
            ("sue", Role::Supervisor),
            ("al", Role::Agent),
        ] {
            manage::create(
                auth.store(),
                &manage::NewAccount {
                    name,
                    display: None,
                    role,
                    max_open: 2,
                    password: "password-123",
                },
                8,
                0,
                "test",
            )
            .unwrap();
        }
        auth
    }

    fn call(
        auth: &Authority,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: &str,
    ) -> (u16, serde_json::Value) {
        let header = bearer.map(|t| format!("Bearer {t}"));
        let req = ApiRequest {
            method,
            path,
            query: None,
            authorization: header.as_deref(),
            content_type: Some("application/json"),
            body: body.as_bytes(),
            peer: None,
        };
        let response = match plan(&req, auth, 100) {
            Ok(plan) => execute(plan, auth, None, 100, 5),
            Err(response) => response,
        };
        (
            response.status,
            serde_json::from_str(&response.body).unwrap(),
        )
    }

    fn login(auth: &Authority, name: &str) -> String {
        let (status, body) = call(
            auth,
            "POST",
            "/api/login",
            None,
            &json!({"name": name, "password": "password-123"}).to_string(),
        );
        assert_eq!(status, 200, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }

    #[test]
    fn login_answers_alike_for_unknown_name_and_wrong_password() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authority(dir.path());
        let wrong_password = call(
            &auth,
            "POST",
            "/api/login",
            None,
            r#"{"name":"al","password":"nope-nope"}"#,
        );
        let unknown_name = call(
            &auth,
            "POST",
            "/api/login",
            None,
            r#"{"name":"zed","password":"nope-nope"}"#,
        );
        assert_eq!(wrong_password.0, 401);
        assert_eq!(wrong_password, unknown_name);
        assert_eq!(wrong_password.1["error"]["code"], "invalid_credentials");
        let (status, body) = call(
            &auth,
            "POST",
            "/api/login",
            None,
            r#"{"name":"al","password":"password-123"}"#,
        );
        assert_eq!(status, 200);
        assert_eq!(body["expires"], clock::rfc3339(3700));
    }

    #[test]
    fn every_endpoint_checks_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authority(dir.path());
        let tokens: Vec<(Role, String)> = [
            ("al", Role::Agent),
            ("sue", Role::Supervisor),
            ("root", Role::Admin),
        ]
        .into_iter()
        .map(|(name, role)| (role, login(&auth, name)))
        .collect();
        let admin_calls = [
            ("GET", "/api/agents", ""),
            (
                "POST",
                "/api/agents",
                r#"{"name":"new-{role}","password":"password-123","role":"agent"}"#,
            ),
            ("POST", "/api/agents/al/disable", ""),
            ("POST", "/api/agents/al/enable", ""),
            ("PUT", "/api/agents/sue/role", r#"{"role":"supervisor"}"#),
        ];
        for (role, token) in &tokens {
            for (method, path, body) in admin_calls {
                let body = body.replace("{role}", role.as_str());
                let (status, reply) = call(&auth, method, path, Some(token), &body);
                if rbac::allows(*role, Action::ManageAgents) {
                    assert!(
                        status == 200 || status == 201,
                        "{role} {method} {path}: {reply}"
                    );
                } else {
                    assert_eq!(status, 403, "{role} {method} {path}: {reply}");
                    assert_eq!(reply["error"]["code"], "forbidden");
                }
            }
            // Disabling revoked al's token; the others keep theirs.
            if *role != Role::Agent {
                let (status, me) = call(&auth, "GET", "/api/me", Some(token), "");
                assert_eq!(status, 200, "{me}");
                assert_eq!(me["role"], role.as_str());
            }
        }
        // Without a token: 401 everywhere but login.
        for (method, path, body) in admin_calls {
            assert_eq!(call(&auth, method, path, None, body).0, 401);
        }
        assert_eq!(call(&auth, "GET", "/api/me", None, "").0, 401);
        assert_eq!(
            call(&auth, "POST", "/api/refresh", Some("sb1.x.y"), "").0,
            401
        );
    }

    #[test]
    fn refresh_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authority(dir.path());
        let token = login(&auth, "sue");
        let (status, body) = call(&auth, "POST", "/api/refresh", Some(&token), "");
        assert_eq!(status, 200);
        assert!(body["token"].as_str().unwrap().starts_with("sb1."));
        assert_eq!(call(&auth, "GET", "/api/login", None, "").0, 405);
        assert_eq!(call(&auth, "GET", "/api/nothing", None, "").0, 404);
        let (status, body) = call(&auth, "POST", "/api/login", None, "{not json");
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("bad_request"))
        );
        let root = login(&auth, "root");
        let (status, body) = call(
            &auth,
            "PUT",
            "/api/agents/al/role",
            Some(&root),
            r#"{"role":"king"}"#,
        );
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("bad_request"))
        );
        let (status, _) = call(&auth, "POST", "/api/agents/ghost/disable", Some(&root), "");
        assert_eq!(status, 404);
        let (status, _) = call(
            &auth,
            "POST",
            "/api/agents",
            Some(&root),
            r#"{"name":"al","password":"password-123","role":"agent"}"#,
        );
        assert_eq!(status, 409);
        let (status, body) = call(
            &auth,
            "POST",
            "/api/agents",
            Some(&root),
            r#"{"name":"weak","password":"short","role":"agent"}"#,
        );
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("bad_request"))
        );
        let (status, body) = call(&auth, "GET", "/api/agents", Some(&root), "");
        assert_eq!(status, 200);
        let names: Vec<&str> = body["agents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["al", "root", "sue"]);
        assert!(
            body.to_string().find("argon2").is_none(),
            "hashes never leave the store"
        );
    }

    fn plan_of(
        auth: &Authority,
        method: &str,
        path: &str,
        query: Option<&str>,
        bearer: Option<&str>,
        content_type: Option<&str>,
        body: &str,
    ) -> Result<Plan, ApiResponse> {
        let header = bearer.map(|t| format!("Bearer {t}"));
        let req = ApiRequest {
            method,
            path,
            query,
            authorization: header.as_deref(),
            content_type,
            body: body.as_bytes(),
            peer: None,
        };
        plan(&req, auth, 100)
    }

    #[test]
    fn admin_endpoints_route_and_check_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authority(dir.path());
        let json = Some("application/json");
        /// method, path, query, content type, body, the action it needs
        type Case<'a> = (
            &'a str,
            &'a str,
            Option<&'a str>,
            Option<&'a str>,
            &'a str,
            Action,
        );
        let cases: [Case<'_>; 4] = [
            (
                "GET",
                "/api/audit",
                Some("limit=5"),
                None,
                "",
                Action::ViewAudit,
            ),
            (
                "GET",
                "/api/kb/entries",
                Some("q=Card%20arrival&limit=7"),
                None,
                "",
                Action::ManageKnowledgeBase,
            ),
            (
                "POST",
                "/api/kb/try",
                None,
                json,
                r#"{"text":" where is my card "}"#,
                Action::TryKnowledgeBase,
            ),
            (
                "POST",
                "/api/kb/import",
                None,
                Some("text/csv"),
                "text,category\nhi,greet\n",
                Action::ManageKnowledgeBase,
            ),
        ];
        for name in ["al", "sue", "root"] {
            let token = login(&auth, name);
            let role = auth.verify_token(&token, 100).unwrap().1.role;
            for (method, path, query, content_type, body, action) in cases {
                let planned = plan_of(&auth, method, path, query, Some(&token), content_type, body);
                if !rbac::allows(role, action) {
                    let refused = planned.unwrap_err();
                    assert_eq!(refused.status, 403, "{role} {path}");
                    let reply: serde_json::Value = serde_json::from_str(&refused.body).unwrap();
                    assert_eq!(reply["error"]["code"], "forbidden");
                    continue;
                }
                let Ok(Plan::Admin(admin)) = planned else {
                    panic!("{role} {path}: {planned:?}")
                };
                let expected = match path {
                    "/api/audit" => AdminPlan::Audit { limit: 5 },
                    "/api/kb/entries" => AdminPlan::KbEntries {
                        query: Some("Card arrival".into()),
                        limit: 7,
                    },
                    "/api/kb/try" => AdminPlan::KbTry {
                        text: "where is my card".into(),
                    },
                    _ => AdminPlan::KbImport {
                        by: format!("api:{name}"),
                        format: crate::kb::Format::Csv,
                    },
                };
                assert_eq!(admin, expected);
            }
            // Without a token: 401 on each.
            for (method, path, query, content_type, body, _) in cases {
                let refused =
                    plan_of(&auth, method, path, query, None, content_type, body).unwrap_err();
                assert_eq!(refused.status, 401);
            }
        }
        let root = login(&auth, "root");
        let status = |method, path, query, content_type, body| {
            plan_of(&auth, method, path, query, Some(&root), content_type, body)
                .map(|_| 200)
                .unwrap_or_else(|r| r.status)
        };
        assert_eq!(status("POST", "/api/audit", None, None, ""), 405);
        assert_eq!(status("GET", "/api/kb/try", None, None, ""), 405);
        assert_eq!(status("GET", "/api/audit", Some("limit=0"), None, ""), 400);
        assert_eq!(
            status("GET", "/api/kb/entries", Some("limit=x"), None, ""),
            400
        );
        assert_eq!(
            status("POST", "/api/kb/try", None, json, r#"{"text":"  "}"#),
            400
        );
        assert_eq!(
            status("POST", "/api/kb/try", None, json, r#"{"txt":"a"}"#),
            400
        );
        assert_eq!(
            status("POST", "/api/kb/import", None, Some("image/png"), "x"),
            415
        );
        assert_eq!(status("GET", "/api/kb/nothing", None, None, ""), 404);
        // Import bodies get their own limit.
        let mut api = crate::config::load_str("t", "").unwrap().api;
        api.max_body_bytes = 100;
        api.max_import_bytes = 1000;
        assert_eq!(body_limit("POST", "/api/kb/import", &api), 1000);
        assert_eq!(body_limit("POST", "/api/kb/try", &api), 100);
    }

    #[test]
    fn new_endpoints_check_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authority(dir.path());
        let json = Some("application/json");
        let reply = r#"{"title":"Hi","text":"Hello!"}"#;
        // method, path, query, body, the action it needs
        let cases: [(&str, &str, Option<&str>, &str, Action); 12] = [
            (
                "GET",
                "/api/kb/entries/card%20arrival",
                None,
                "",
                Action::ManageKnowledgeBase,
            ),
            (
                "DELETE",
                "/api/kb/entries/refund",
                None,
                "",
                Action::ManageKnowledgeBase,
            ),
            (
                "GET",
                "/api/kb/export",
                None,
                "",
                Action::ManageKnowledgeBase,
            ),
            (
                "GET",
                "/api/conversations",
                Some("visitor=v1&status=closed&from=2026-12-01T00:00:00Z&limit=5"),
                "",
                Action::ReadAnyConversation,
            ),
            (
                "GET",
                "/api/conversations/257",
                None,
                "",
                Action::ReadAnyConversation,
            ),
            (
                "GET",
                "/api/conversations/257/transcript",
                Some("format=text&after=3"),
                "",
                Action::ReadAnyConversation,
            ),
            (
                "GET",
                "/api/conversations/export",
                Some("to=1000"),
                "",
                Action::ReadAnyConversation,
            ),
            ("GET", "/api/queue", Some("limit=3"), "", Action::ViewQueue),
            (
                "GET",
                "/api/canned",
                Some("q=hi&after=2"),
                "",
                Action::UseCannedReplies,
            ),
            (
                "POST",
                "/api/canned",
                None,
                reply,
                Action::ManageCannedReplies,
            ),
            (
                "PUT",
                "/api/canned/1",
                None,
                reply,
                Action::ManageCannedReplies,
            ),
            (
                "DELETE",
                "/api/canned/1",
                None,
                "",
                Action::ManageCannedReplies,
            ),
        ];
        for name in ["al", "sue", "root"] {
            let token = login(&auth, name);
            let role = auth.verify_token(&token, 100).unwrap().1.role;
            for (method, path, query, body, action) in cases {
                let planned = plan_of(&auth, method, path, query, Some(&token), json, body);
                if rbac::allows(role, action) {
                    assert!(
                        matches!(planned, Ok(Plan::Admin(_))),
                        "{role} {method} {path}: {planned:?}"
                    );
                } else {
                    assert_eq!(planned.unwrap_err().status, 403, "{role} {method} {path}");
                }
                let anonymous = plan_of(&auth, method, path, query, None, json, body);
                assert_eq!(anonymous.unwrap_err().status, 401, "{method} {path}");
            }
        }
        let root = login(&auth, "root");
        let planned =
            |method, path, query| plan_of(&auth, method, path, query, Some(&root), json, "");
        // What the plans carry: the decoded entry id, the parsed filters and paging.
        let Ok(Plan::Admin(AdminPlan::KbEntry { id })) =
            planned("GET", "/api/kb/entries/card%20arrival", None)
        else {
            panic!()
        };
        assert_eq!(id, "card arrival");
        let Ok(Plan::Admin(AdminPlan::Conversations(ConversationPlan::Search {
            filter,
            before,
            limit,
        }))) = planned(
            "GET",
            "/api/conversations",
            Some("agent=al&status=assigned&before=513&limit=7"),
        )
        else {
            panic!()
        };
        assert_eq!((before, limit), (Some(513), 7));
        assert_eq!(filter.agent.map(|a| a.id), Some("al".to_owned()));
        let status = |method, path, query| {
            planned(method, path, query)
                .map(|_| 200)
                .unwrap_or_else(|r| r.status)
        };
        assert_eq!(status("GET", "/api/conversations/abc", None), 400);
        assert_eq!(
            status("GET", "/api/conversations/1/transcript", Some("format=pdf")),
            400
        );
        assert_eq!(status("GET", "/api/conversations", Some("limit=501")), 400);
        assert_eq!(
            status("GET", "/api/conversations/export", Some("limit=1001")),
            400
        );
        assert_eq!(status("POST", "/api/queue", None), 405);
        assert_eq!(status("PATCH", "/api/canned/1", None), 405);
        assert_eq!(status("GET", "/api/canned/-1", None), 400);
        assert_eq!(status("GET", "/api/canned", Some("after=x")), 400);
        assert_eq!(status("GET", "/api/kb/entries/%ZZ", None), 400);
    }

    #[test]
    fn patch_changes_role_and_disabled() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authority(dir.path());
        let root = login(&auth, "root");
        // Not one's own account: that could lock the last admin out.
        for (method, path, body) in [
            ("POST", "/api/agents/root/disable", ""),
            ("PUT", "/api/agents/root/role", r#"{"role":"agent"}"#),
            ("PATCH", "/api/agents/root", r#"{"disabled":true}"#),
        ] {
            let (status, reply) = call(&auth, method, path, Some(&root), body);
            assert_eq!(
                (status, reply["error"]["code"].as_str()),
                (409, Some("own_account")),
                "{method} {path}"
            );
        }
        assert_eq!(
            call(
                &auth,
                "PUT",
                "/api/agents/root/role",
                Some(&root),
                r#"{"role":"admin"}"#
            )
            .0,
            200,
            "keeping one's role is no change"
        );
        let (status, body) = call(
            &auth,
            "PATCH",
            "/api/agents/al",
            Some(&root),
            r#"{"role":"supervisor"}"#,
        );
        assert_eq!(
            (status, body["role"].as_str()),
            (200, Some("supervisor")),
            "{body}"
        );
        let (status, body) = call(
            &auth,
            "PATCH",
            "/api/agents/al",
            Some(&root),
            r#"{"disabled":true}"#,
        );
        assert_eq!(
            (status, body["disabled"].as_bool()),
            (200, Some(true)),
            "{body}"
        );
        assert_eq!(
            call(&auth, "PATCH", "/api/agents/al", Some(&root), "{}").0,
            400
        );
        assert_eq!(
            call(
                &auth,
                "PATCH",
                "/api/agents/ghost",
                Some(&root),
                r#"{"disabled":true}"#
            )
            .0,
            404
        );
        let sue = login(&auth, "sue");
        assert_eq!(
            call(
                &auth,
                "PATCH",
                "/api/agents/al",
                Some(&sue),
                r#"{"disabled":false}"#
            )
            .0,
            403
        );
    }
}
