//! Maps a parsed request head to what the shard does with it.
//!
//! Pure: no I/O, no shard state beyond the configuration and the authority passed
//! in (an agent token is checked against the account store), so every routing rule is
//! tested without sockets.

use crate::arena::SessionKind;
use crate::auth::rbac::Role;
use crate::auth::{events, Authority, TokenRefusal};
use crate::config::Config;
use crate::conversation::identity::identity_matches;
use crate::http::{query_param, RequestHead};

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /healthz`: the process is alive.
    Health,
    /// `GET /readyz`: the shard accepts sessions (not draining).
    Ready,
    /// `GET /metrics`: Prometheus text format, for a supervisor's or admin's bearer token; not
    /// routed when `[metrics] listen` serves it on its own listener.
    Metrics,
    /// `POST /debug/panic?shard=N` (`[diagnostics] panic_endpoint`): make shard N panic.
    /// The driver serves it to loopback peers only.
    DebugPanic { shard: usize },
    /// `POST /debug/stall?shard=N&ms=M` (`[diagnostics] stall_endpoint`): block shard N's
    /// thread for M milliseconds. The driver serves it to loopback peers only.
    DebugStall { shard: usize, millis: u64 },
    /// A WebSocket endpoint.
    Upgrade(Endpoint),
    /// The JSON API under `/api/` (method and path are the API's to check).
    Api,
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
    /// `/ws/visitor?site=S[&visitor=V][&secret=X][&identity_hash=H][&resume=SEQ]`.
    Visitor {
        site: String,
        visitor: Option<String>,
        resume: Option<u64>,
        /// The visitor's secret, as presented (checked by the owner shard).
        secret: Option<String>,
        /// `identity_hash` matched the site's identity key for `visitor`.
        verified: bool,
    },
    /// `/ws/agent?token=T`, resolved to the token's account (or, in development mode, the
    /// matching static `[agents]` account).
    Agent {
        id: String,
        name: String,
        max_open: u32,
        role: Role,
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
/// Longest `secret` accepted, in bytes (issued secrets are 32).
const MAX_SECRET_BYTES: usize = 128;
/// Longest echo delay accepted (a diagnostic, not a feature).
const MAX_ECHO_DELAY_MS: u32 = 10_000;
/// Longest injected stall accepted: past any sensible `WatchdogSec=`.
pub const MAX_STALL_MS: u64 = 300_000;

/// Decides what to do with a request; `now` (Unix seconds) is for token expiry.
pub fn route(head: &RequestHead, config: &Config, authority: &Authority, now: u64) -> Route {
    let query = head.query.as_deref().unwrap_or("");
    let path = head.path.as_str();
    if config.server.role == crate::config::ServerRole::Sync && !serves_in_sync_role(path) {
        return Route::Reject(
            404,
            "this node serves knowledge-base sync only ([server] role = \"sync\")",
        );
    }
    if path.starts_with(crate::http::API_PREFIX) {
        return Route::Api;
    }
    let is_websocket = path.starts_with("/ws/");
    if let Some(asset) = crate::web::lookup(path) {
        return match head.method.as_str() {
            "GET" => Route::Asset(asset),
            _ => Route::Reject(405, "only GET is served here"),
        };
    }
    if path == "/debug/panic" && config.diagnostics.panic_endpoint {
        if head.method != "POST" {
            return Route::Reject(405, "only POST is served here");
        }
        return match query_param(query, "shard").map(|shard| shard.parse::<usize>()) {
            Some(Ok(shard)) => Route::DebugPanic { shard },
            _ => Route::Reject(400, "the shard parameter must be a shard number"),
        };
    }
    if path == "/debug/stall" && config.diagnostics.stall_endpoint {
        if head.method != "POST" {
            return Route::Reject(405, "only POST is served here");
        }
        let Some(Ok(shard)) = query_param(query, "shard").map(|shard| shard.parse::<usize>())
        else {
            return Route::Reject(400, "the shard parameter must be a shard number");
        };
        return match query_param(query, "ms").map(|ms| ms.parse::<u64>()) {
            Some(Ok(millis)) if (1..=MAX_STALL_MS).contains(&millis) => {
                Route::DebugStall { shard, millis }
            }
            _ => Route::Reject(400, "ms must be an integer from 1 to 300000"),
        };
    }
    // With `[metrics] listen` the metrics are served on that listener only.
    let known = matches!(path, "/healthz" | "/readyz")
        || (path == "/metrics" && config.metrics.listen.is_none())
        || matches!(path, "/ws/visitor" | "/ws/agent")
        || (path == "/ws/echo" && config.diagnostics.echo);
    if !known {
        return Route::Reject(404, "no such endpoint");
    }
    if head.method != "GET" {
        return Route::Reject(405, "only GET is served here");
    }
    if crate::http::repeated_query_param(query).is_some() {
        return Route::Reject(400, "a query parameter is repeated; give each at most once");
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
            let secret = query_param(query, "secret");
            if let Some(secret) = &secret {
                if secret.is_empty()
                    || secret.len() > MAX_SECRET_BYTES
                    || !secret.bytes().all(|b| b.is_ascii_graphic())
                {
                    return Route::Reject(
                        400,
                        "secret must be the 1 to 128 character secret from the visitor's hello",
                    );
                }
            }
            let site_config = config.visitors.site(&site);
            if site_config.is_none() && !config.visitors.allow_unlisted_sites {
                return Route::Reject(
                    403,
                    "unknown site: it has no [visitors.sites] entry on this server",
                );
            }
            if let Some(allowed) = site_config.map(|c| &c.origins).filter(|o| !o.is_empty()) {
                let origin = head.header_str("origin");
                if !origin
                    .is_some_and(|origin| allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)))
                {
                    return Route::Reject(
                        403,
                        "Origin not allowed: this site accepts visitors only from the origins \
                         listed in its [visitors.sites] entry",
                    );
                }
            }
            let verified = match query_param(query, "identity_hash") {
                None => false,
                Some(presented) => {
                    let Some(visitor) = &visitor else {
                        return Route::Reject(400, "identity_hash needs the visitor parameter");
                    };
                    let Some(key) = site_config.and_then(|c| c.identity_key.as_deref()) else {
                        return Route::Reject(
                            403,
                            "identity_hash refused: this site has no identity key configured",
                        );
                    };
                    if !identity_matches(key, visitor, &presented) {
                        return Route::Reject(
                            403,
                            "identity_hash does not match the visitor id for this site",
                        );
                    }
                    true
                }
            };
            Route::Upgrade(Endpoint::Visitor {
                site: site.into_owned(),
                visitor: visitor.map(|v| v.into_owned()),
                resume,
                secret: secret.map(|s| s.into_owned()),
                verified,
            })
        }
        _ => {
            let Some(token) = query_param(query, "token") else {
                return Route::Reject(401, "the token parameter is required");
            };
            match authority.agent_for_token(&token, config, now) {
                Ok(agent) => Route::Upgrade(Endpoint::Agent {
                    id: agent.id,
                    name: agent.name,
                    max_open: agent.max_open,
                    role: agent.role,
                }),
                Err(refusal) => {
                    events::token_refused(None, refusal.code());
                    match refusal {
                        TokenRefusal::Store(err) => {
                            tracing::error!(error = %err, "account store");
                            Route::Reject(500, "the account store failed")
                        }
                        TokenRefusal::Token(crate::auth::token::TokenError::Expired) => {
                            Route::Reject(401, "agent token expired: log in again")
                        }
                        _ => Route::Reject(401, "invalid agent token"),
                    }
                }
            }
        }
    }
}

/// What a node with `[server] role = "sync"` serves: sign-in, sync, health and metrics.
fn serves_in_sync_role(path: &str) -> bool {
    matches!(
        path,
        "/api/login"
            | "/api/refresh"
            | "/api/me"
            | "/api/kb/sync"
            | "/healthz"
            | "/readyz"
            | "/metrics"
    )
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::identity::identity_hash;
    use crate::http::{parse_request, HttpLimits};

    const KEY: &str = "acme-identity-key-0123456789abcdef";

    fn config(extra: &str) -> Config {
        crate::config::load_str(
            "test.toml",
            &format!(
                "[visitors.sites.acme]\nidentity_key = \"{KEY}\"\norigins = [\"https://shop.example\"]\n{extra}"
            ),
        )
        .unwrap()
    }

    fn visitor_route(target: &str, origin: Option<&str>, config: &Config) -> Route {
        let origin = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
        let request = format!("GET {target} HTTP/1.1\r\nHost: x\r\n{origin}\r\n");
        let limits = HttpLimits {
            max_header_bytes: 8192,
            max_headers: 32,
        };
        let (head, _) = parse_request(request.as_bytes(), &limits).unwrap().unwrap();
        // Visitor routes never consult accounts; an empty store in a scratch dir will do.
        let dir = tempfile::tempdir().unwrap();
        let mut scratch = config.clone();
        scratch.storage.dir = dir.path().to_path_buf();
        let (authority, _) = Authority::open(&scratch).unwrap();
        route(&head, config, &authority, 0)
    }

    fn plain_route(request: &str, config: &Config) -> Route {
        let limits = HttpLimits {
            max_header_bytes: 8192,
            max_headers: 32,
        };
        let (head, _) = parse_request(request.as_bytes(), &limits).unwrap().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut scratch = config.clone();
        scratch.storage.dir = dir.path().to_path_buf();
        let (authority, _) = Authority::open(&scratch).unwrap();
        route(&head, config, &authority, 0)
    }

    #[test]
    fn the_panic_endpoint_exists_only_when_switched_on() {
        let request = "POST /debug/panic?shard=1 HTTP/1.1\r\nHost: x\r\n\r\n";
        let off = config("");
        assert!(matches!(plain_route(request, &off), Route::Reject(404, _)));
        let on = config("[diagnostics]\npanic_endpoint = true\n");
        assert_eq!(plain_route(request, &on), Route::DebugPanic { shard: 1 });
        assert!(matches!(
            plain_route("GET /debug/panic?shard=1 HTTP/1.1\r\nHost: x\r\n\r\n", &on),
            Route::Reject(405, _)
        ));
        assert!(matches!(
            plain_route("POST /debug/panic HTTP/1.1\r\nHost: x\r\n\r\n", &on),
            Route::Reject(400, _)
        ));
    }

    #[test]
    fn a_sync_node_serves_sign_in_sync_and_health_only() {
        let sync = config("[server]\nrole = \"sync\"\n[diagnostics]\necho = true\n");
        let chat = config("[diagnostics]\necho = true\n");
        let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        for path in ["/api/kb/sync", "/api/login", "/api/me"] {
            assert_eq!(plain_route(&get(path), &sync), Route::Api, "{path}");
        }
        assert!(matches!(
            plain_route(&get("/healthz"), &sync),
            Route::Health
        ));
        for path in [
            "/api/agents",
            "/api/kb/import",
            "/ws/echo",
            "/ws/visitor?site=a",
            "/",
            "/admin",
        ] {
            assert!(
                matches!(plain_route(&get(path), &sync), Route::Reject(404, _)),
                "{path}"
            );
        }
        assert_eq!(plain_route(&get("/api/agents"), &chat), Route::Api);
    }

    #[test]
    fn the_stall_endpoint_exists_only_when_switched_on() {
        let request = "POST /debug/stall?shard=1&ms=2500 HTTP/1.1\r\nHost: x\r\n\r\n";
        let off = config("[diagnostics]\npanic_endpoint = true\n");
        assert!(matches!(plain_route(request, &off), Route::Reject(404, _)));
        let on = config("[diagnostics]\nstall_endpoint = true\n");
        assert_eq!(
            plain_route(request, &on),
            Route::DebugStall {
                shard: 1,
                millis: 2500
            }
        );
        for (request, status) in [
            ("GET /debug/stall?shard=1&ms=5", 405),
            ("POST /debug/stall?ms=5", 400),
            ("POST /debug/stall?shard=1", 400),
            ("POST /debug/stall?shard=1&ms=0", 400),
            ("POST /debug/stall?shard=1&ms=300001", 400),
            ("POST /debug/stall?shard=x&ms=5", 400),
        ] {
            let request = format!("{request} HTTP/1.1\r\nHost: x\r\n\r\n");
            assert!(
                matches!(plain_route(&request, &on), Route::Reject(s, _) if s == status),
                "{request}"
            );
        }
    }

    #[test]
    fn metrics_leave_the_public_listener_when_they_have_their_own() {
        let request = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(plain_route(request, &config("")), Route::Metrics);
        let own = config("[metrics]\nlisten = \"127.0.0.1:9100\"\n");
        assert!(matches!(plain_route(request, &own), Route::Reject(404, _)));
        assert!(matches!(
            plain_route(
                "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
                &config("")
            ),
            Route::Reject(405, _)
        ));
    }

    #[test]
    fn visitor_origin_secret_and_identity_rules() {
        let c = config("");
        let shop = Some("https://shop.example");
        // Origin allow-list of a listed site.
        assert!(matches!(
            visitor_route("/ws/visitor?site=acme", None, &c),
            Route::Reject(403, _)
        ));
        assert!(matches!(
            visitor_route("/ws/visitor?site=acme", Some("https://evil.example"), &c),
            Route::Reject(403, _)
        ));
        assert!(matches!(
            visitor_route("/ws/visitor?site=acme", shop, &c),
            Route::Upgrade(Endpoint::Visitor {
                verified: false,
                ..
            })
        ));
        // An unlisted site: served by default, refused when not allowed.
        assert!(matches!(
            visitor_route("/ws/visitor?site=other", None, &c),
            Route::Upgrade(_)
        ));
        let strict = config("[visitors]\nallow_unlisted_sites = false\n");
        assert!(matches!(
            visitor_route("/ws/visitor?site=other", None, &strict),
            Route::Reject(403, _)
        ));
        // The secret is passed on as given; a malformed one is refused.
        match visitor_route("/ws/visitor?site=acme&visitor=v1&secret=abc123", shop, &c) {
            Route::Upgrade(Endpoint::Visitor { secret, .. }) => {
                assert_eq!(secret.as_deref(), Some("abc123"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            visitor_route("/ws/visitor?site=acme&visitor=v1&secret=", shop, &c),
            Route::Reject(400, _)
        ));
        // identity_hash: verified when it matches; refused when it does not.
        let good = identity_hash(KEY.as_bytes(), "user-1");
        assert!(matches!(
            visitor_route(
                &format!("/ws/visitor?site=acme&visitor=user-1&identity_hash={good}"),
                shop,
                &c
            ),
            Route::Upgrade(Endpoint::Visitor { verified: true, .. })
        ));
        assert!(matches!(
            visitor_route(
                &format!("/ws/visitor?site=acme&visitor=user-2&identity_hash={good}"),
                shop,
                &c
            ),
            Route::Reject(403, _)
        ));
        assert!(matches!(
            visitor_route(
                &format!("/ws/visitor?site=other&visitor=user-1&identity_hash={good}"),
                None,
                &c
            ),
            Route::Reject(403, _)
        ));
        assert!(matches!(
            visitor_route(
                &format!("/ws/visitor?site=acme&identity_hash={good}"),
                shop,
                &c
            ),
            Route::Reject(400, _)
        ));
    }
}
