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
//!   `POST /api/agents/NAME/enable`, `PUT /api/agents/NAME/role` (admin: `ManageAgents`)
//!
//! Invariants:
//! - Every error has one shape, `{"error":{"code":"...","message":"..."}}`, with a proper
//!   status; every response is `application/json`.
//! - Every endpoint but login checks [`crate::auth::rbac::allows`] before doing anything.
//! - Login answers a wrong name, a wrong password, a disabled and a locked account with the
//!   same 401 body.

use std::net::IpAddr;

use serde::Deserialize;
use serde_json::json;

use crate::auth::accounts::Account;
use crate::auth::rbac::{self, Action, Role};
use crate::auth::{self, clock, events, manage, Authority, LoginRefusal, TokenRefusal};

/// A request as the API sees it.
#[derive(Clone, Copy, Debug)]
pub struct ApiRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// The `Authorization` header, if any.
    pub authorization: Option<&'a str>,
    /// The `Content-Type` header, if any.
    pub content_type: Option<&'a str>,
    pub body: &'a [u8],
    pub peer: Option<IpAddr>,
}

/// A complete response: status, JSON body, and `Retry-After` seconds for a 429.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: String,
    pub retry_after: Option<u64>,
}

impl ApiResponse {
    pub fn json(status: u16, value: serde_json::Value) -> ApiResponse {
        ApiResponse {
            status,
            body: value.to_string(),
            retry_after: None,
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

fn method_not_allowed(allowed: &str) -> ApiResponse {
    ApiResponse::error(
        405,
        "method_not_allowed",
        format_args!("this endpoint takes {allowed}"),
    )
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
            Ok(Plan::SetDisabled {
                by: by(&admin),
                name: (*name).to_owned(),
                disabled: *verb == "disable",
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
            Ok(Plan::SetRole {
                by: by(&admin),
                name: (*name).to_owned(),
                role,
            })
        }
        _ => Err(ApiResponse::error(404, "not_found", "no such endpoint")),
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
}
