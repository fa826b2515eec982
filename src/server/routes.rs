//! Maps a parsed request head to what the shard does with it.
//!
//! Pure: no I/O, no shard state beyond the configuration passed in, so every
//! routing rule is tested without sockets.

use crate::arena::SessionKind;
use crate::config::Config;
use crate::http::{query_param, RequestHead};

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /healthz`: the process is alive.
    Health,
    /// `GET /readyz`: the shard accepts sessions (not draining).
    Ready,
    /// `GET /metrics`: Prometheus counters.
    Metrics,
    /// A WebSocket endpoint.
    Upgrade(Endpoint),
    /// Answer with this HTTP status and message.
    Reject(u16, &'static str),
    /// An embedded web asset (widget, console, admin, demo page); see [`crate::web`].
    Asset(&'static crate::web::Asset),
}

/// A WebSocket endpoint and what its query string asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/ws/echo[?delay_ms=N]`: diagnostic echo, each message delayed by N ms.
    Echo { delay_ms: u32 },
    /// `/ws/visitor?site=S[&visitor=V][&resume=SEQ]`.
    Visitor {
        site: String,
        visitor: Option<String>,
        resume: Option<u64>,
    },
    /// `/ws/agent?token=T`, resolved to the matching `[agents]` account.
    Agent {
        id: String,
        name: String,
        max_open: u32,
    },
}

impl Endpoint {
    pub fn kind(&self) -> SessionKind {
        match self {
            Endpoint::Echo { .. } => SessionKind::Echo,
            Endpoint::Visitor { .. } => SessionKind::Visitor,
            Endpoint::Agent { .. } => SessionKind::Agent,
        }
    }
}

/// Longest site or visitor id accepted, in bytes.
const MAX_ID_BYTES: usize = 128;
/// Longest echo delay accepted (a diagnostic, not a feature).
const MAX_ECHO_DELAY_MS: u32 = 10_000;

/// Decides what to do with a request.
pub fn route(head: &RequestHead, config: &Config) -> Route {
    let query = head.query.as_deref().unwrap_or("");
    let path = head.path.as_str();
    let is_websocket = path.starts_with("/ws/");
    if let Some(asset) = crate::web::lookup(path) {
        return match head.method.as_str() {
            "GET" => Route::Asset(asset),
            _ => Route::Reject(405, "only GET is served here"),
        };
    }
    let known = matches!(path, "/healthz" | "/readyz" | "/metrics")
        || matches!(path, "/ws/visitor" | "/ws/agent")
        || (path == "/ws/echo" && config.diagnostics.echo);
    if !known {
        return Route::Reject(404, "no such endpoint");
    }
    if head.method != "GET" {
        return Route::Reject(405, "only GET is served here");
    }
    if !is_websocket {
        return match path {
            "/healthz" => Route::Health,
            "/readyz" => Route::Ready,
            _ => Route::Metrics,
        };
    }
    match path {
        "/ws/echo" => match query_param(query, "delay_ms") {
            None => Route::Upgrade(Endpoint::Echo { delay_ms: 0 }),
            Some(value) => match value.parse::<u32>() {
                Ok(delay_ms) if delay_ms <= MAX_ECHO_DELAY_MS => {
                    Route::Upgrade(Endpoint::Echo { delay_ms })
                }
                _ => Route::Reject(400, "delay_ms must be an integer from 0 to 10000"),
            },
        },
        "/ws/visitor" => {
            let Some(site) = query_param(query, "site") else {
                return Route::Reject(400, "the site parameter is required");
            };
            if !valid_id(&site) {
                return Route::Reject(400, "site must be 1 to 128 characters of [A-Za-z0-9._-]");
            }
            let visitor = query_param(query, "visitor");
            if let Some(visitor) = &visitor {
                if !valid_id(visitor) {
                    return Route::Reject(
                        400,
                        "visitor must be 1 to 128 characters of [A-Za-z0-9._-]",
                    );
                }
            }
            let resume = match query_param(query, "resume") {
                None => None,
                Some(value) => match value.parse::<u64>() {
                    Ok(seq) => Some(seq),
                    Err(_) => return Route::Reject(400, "resume must be a sequence number"),
                },
            };
            Route::Upgrade(Endpoint::Visitor {
                site: site.into_owned(),
                visitor: visitor.map(|v| v.into_owned()),
                resume,
            })
        }
        _ => {
            let Some(token) = query_param(query, "token") else {
                return Route::Reject(401, "the token parameter is required");
            };
            match config.agent_by_token(&token) {
                Some((id, account)) => Route::Upgrade(Endpoint::Agent {
                    id: id.to_string(),
                    name: account.name.clone(),
                    max_open: account.max_open,
                }),
                None => Route::Reject(403, "unknown agent token"),
            }
        }
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
