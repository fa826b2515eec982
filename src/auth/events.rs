//! Security events of accounts and logins: ONE function per event kind, each logging at
//! info (warn for lockouts) with `target: "switchboard::audit"`.
//!
//! Each also appends a record to the audit chain (`src/audit.rs`, through [`emit`]). `by` names who
//! did it: `cli` for the command line, `api:NAME` for an admin through `/api/`.

use std::net::IpAddr;

use super::rbac::Role;
use crate::audit::{emit, AuditEvent};

/// A client-supplied name as logged: at most 64 characters (valid names are no longer).
fn short(name: &str) -> &str {
    match name.char_indices().nth(64) {
        Some((at, _)) => &name[..at],
        None => name,
    }
}

fn ip_text(ip: Option<IpAddr>) -> String {
    ip.map_or_else(|| "-".to_owned(), |ip| ip.to_string())
}

/// A login succeeded and a token was issued.
pub fn login_succeeded(name: &str, ip: Option<IpAddr>) {
    tracing::info!(target: "switchboard::audit", event = "login", name, ip = %ip_text(ip), "login succeeded");
    emit(AuditEvent::new("login", name).peer(ip_text(ip)));
}

/// A login failed. `reason` is for the log only (the client always hears
/// `invalid_credentials`): `unknown_account`, `wrong_password`, `disabled`, `locked`.
pub fn login_failed(name: &str, ip: Option<IpAddr>, reason: &'static str) {
    tracing::info!(target: "switchboard::audit", event = "login_failed", name = short(name), ip = %ip_text(ip), reason, "login failed");
    emit(
        AuditEvent::new("login_failed", short(name))
            .peer(ip_text(ip))
            .detail("reason", reason),
    );
}

/// Consecutive failures locked the account until `until` (Unix seconds).
pub fn locked_out(name: &str, ip: Option<IpAddr>, until: u64) {
    tracing::warn!(target: "switchboard::audit", event = "lockout", name, ip = %ip_text(ip), until = %super::clock::rfc3339(until), "account locked after repeated login failures");
    emit(
        AuditEvent::new("lockout", name)
            .target(name)
            .peer(ip_text(ip))
            .detail("until", super::clock::rfc3339(until)),
    );
}

/// A login attempt was refused by the per-IP or per-account rate limit.
pub fn login_rate_limited(name: &str, ip: Option<IpAddr>, retry_after_ms: u64) {
    tracing::info!(target: "switchboard::audit", event = "login_rate_limited", name = short(name), ip = %ip_text(ip), retry_after_ms, "login rate-limited");
    emit(
        AuditEvent::new("login_rate_limited", short(name))
            .peer(ip_text(ip))
            .detail("retry_after_ms", retry_after_ms),
    );
}

/// A token was refused (bad signature, expired, revoked, disabled account).
pub fn token_refused(ip: Option<IpAddr>, reason: &str) {
    tracing::info!(target: "switchboard::audit", event = "token_refused", ip = %ip_text(ip), reason, "agent token refused");
    emit(
        AuditEvent::new("token_refused", "-")
            .peer(ip_text(ip))
            .detail("reason", reason),
    );
}

/// A token was refreshed.
pub fn token_refreshed(name: &str) {
    tracing::info!(target: "switchboard::audit", event = "token_refreshed", name, "token refreshed");
}

pub fn account_created(by: &str, name: &str, role: Role) {
    tracing::info!(target: "switchboard::audit", event = "account_created", by, name, role = role.as_str(), "agent account created");
    emit(
        AuditEvent::new("account_created", by)
            .target(name)
            .detail("role", role.as_str()),
    );
}

pub fn account_disabled(by: &str, name: &str) {
    tracing::info!(target: "switchboard::audit", event = "account_disabled", by, name, "agent account disabled");
    emit(AuditEvent::new("account_disabled", by).target(name));
}

pub fn account_enabled(by: &str, name: &str) {
    tracing::info!(target: "switchboard::audit", event = "account_enabled", by, name, "agent account enabled");
    emit(AuditEvent::new("account_enabled", by).target(name));
}

pub fn role_changed(by: &str, name: &str, from: Role, to: Role) {
    tracing::info!(target: "switchboard::audit", event = "role_changed", by, name, from = from.as_str(), to = to.as_str(), "agent role changed");
    emit(
        AuditEvent::new("role_changed", by)
            .target(name)
            .detail("from", from.as_str())
            .detail("to", to.as_str()),
    );
}

pub fn password_changed(by: &str, name: &str) {
    tracing::info!(target: "switchboard::audit", event = "password_changed", by, name, "agent password changed");
    emit(AuditEvent::new("password_changed", by).target(name));
}

pub fn account_unlocked(by: &str, name: &str) {
    tracing::info!(target: "switchboard::audit", event = "account_unlocked", by, name, "agent account unlocked");
    emit(AuditEvent::new("account_unlocked", by).target(name));
}

/// An agent was refused an action by the RBAC table.
pub fn access_denied(name: &str, role: Role, action: &str) {
    tracing::info!(target: "switchboard::audit", event = "access_denied", name, role = role.as_str(), action, "action denied by role");
    emit(
        AuditEvent::new("access_denied", name)
            .detail("role", role.as_str())
            .detail("action", action),
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn logged_names_are_bounded() {
        assert_eq!(super::short("alice"), "alice");
        assert_eq!(super::short(&"é".repeat(100)).chars().count(), 64);
    }
}
