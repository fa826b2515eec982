//! Agent authentication and authorisation: accounts with argon2id passwords in LMDB, login
//! with lockout and rate limits, signed expiring tokens, and the RBAC table.
//!
//! Module map: [`accounts`] (record, lockout rules, store), [`password`] (argon2id),
//! [`token`] (HMAC-SHA256 tokens), [`secret`] (the signing key file), [`rbac`] (the one
//! permission table), [`manage`] (account operations shared by the CLI and the admin API),
//! [`events`] (one function per security event: the audit hook points), [`clock`].
//!
//! [`Authority`] is what a server process holds once and shares with every shard (`Arc`):
//! the store, the key and the settings. Its methods that hash or write (`login`) take tens
//! of milliseconds and must run off the event loop (the API driver runs them on the shard's
//! blocking thread); `verify_token` is a MAC and one LMDB read and runs inline.
//!
//! Invariants:
//! - A wrong name, a wrong password, a disabled account and a locked account all answer
//!   [`LoginRefusal::InvalidCredentials`], after one argon2 verification each (against a
//!   dummy hash when there is no usable account), so neither the answer nor its timing tells
//!   whether an account exists.
//! - A token opens a session only if its MAC verifies, it has not expired, its account exists
//!   and is enabled, and the account's `token_generation` is still the token's.
//! - Static `[agents.accounts]` tokens are honoured only with `[agents] dev_static_tokens`.

pub mod accounts;
pub mod clock;
pub mod events;
pub mod manage;
pub mod password;
pub mod rbac;
pub mod secret;
pub mod token;

use std::net::IpAddr;
use std::path::PathBuf;

use crate::config::Config;
use crate::ratelimit::{KeyedBuckets, Rate, RetryAfter};

use accounts::{Account, AccountError, AccountStore, FailureOutcome, LockoutPolicy};
use rbac::Role;
use token::{Claims, SigningKey, TokenError};

/// Settings from `[auth]` and `[agents]`.
#[derive(Clone, Debug, PartialEq)]
pub struct AuthSettings {
    pub token_ttl_secs: u64,
    pub lockout: LockoutPolicy,
    pub min_password_chars: usize,
    pub dev_static_tokens: bool,
    pub secret_file: PathBuf,
}

impl AuthSettings {
    pub fn from_config(config: &Config) -> AuthSettings {
        AuthSettings {
            token_ttl_secs: config.auth.token_ttl.as_secs().max(1),
            lockout: LockoutPolicy {
                failures: config.auth.lockout_failures,
                lock_secs: config.auth.lockout_time.as_secs().max(1),
            },
            min_password_chars: config.auth.min_password_length,
            dev_static_tokens: config.agents.dev_static_tokens,
            secret_file: config.auth.secret_path(&config.storage.dir),
        }
    }
}

/// Why the authority could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Accounts(#[from] AccountError),
    #[error(transparent)]
    Secret(#[from] secret::SecretError),
}

/// A freshly issued token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    pub token: String,
    /// Unix seconds.
    pub expires: u64,
}

/// Why a login was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoginRefusal {
    #[error("wrong name or password")]
    InvalidCredentials,
    #[error(transparent)]
    Store(#[from] AccountError),
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenRefusal {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("the token's account no longer exists")]
    UnknownAccount,
    #[error("the account is disabled")]
    Disabled,
    #[error("the token was revoked (password, role or status changed)")]
    Revoked,
    #[error("unknown agent token")]
    UnknownStatic,
    #[error(transparent)]
    Store(#[from] AccountError),
}

impl TokenRefusal {
    /// A stable code for logs and error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            TokenRefusal::Token(TokenError::Expired) => "token_expired",
            TokenRefusal::Store(_) => "internal",
            _ => "invalid_token",
        }
    }
}

/// Who an agent session is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentIdentity {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub max_open: u32,
}

/// The process-wide authentication state, shared by the shards.
pub struct Authority {
    store: AccountStore,
    key: SigningKey,
    settings: AuthSettings,
}

impl Authority {
    /// Opens the accounts store and reads (or creates) the signing secret.
    pub fn open(config: &Config) -> Result<(Authority, secret::SecretOrigin), AuthError> {
        let settings = AuthSettings::from_config(config);
        let store = AccountStore::open(&config.storage.dir)?;
        let (key, origin) = secret::load_or_create(&settings.secret_file)?;
        Ok((Authority::new(store, key, settings), origin))
    }

    pub fn new(store: AccountStore, key: SigningKey, settings: AuthSettings) -> Authority {
        Authority {
            store,
            key,
            settings,
        }
    }

    pub fn store(&self) -> &AccountStore {
        &self.store
    }

    pub fn settings(&self) -> &AuthSettings {
        &self.settings
    }

    /// Signs a token for `account` valid from `now` for `token_ttl`.
    pub fn issue(&self, account: &Account, now: u64) -> Issued {
        let expires = now + self.settings.token_ttl_secs;
        let token = token::sign(
            &self.key,
            &Claims {
                name: account.name.clone(),
                role: account.role,
                expires,
                generation: account.token_generation,
            },
        );
        Issued { token, expires }
    }

    /// Checks a password login at `now` (Unix seconds). Blocking: argon2 and, on a failure or
    /// the first success after failures, an LMDB commit.
    pub fn login(
        &self,
        name: &str,
        password: &str,
        ip: Option<IpAddr>,
        now: u64,
    ) -> Result<(Account, Issued), LoginRefusal> {
        let account = if accounts::check_name(name).is_ok() {
            self.store.get(name)?
        } else {
            None
        };
        let refuse = |reason| {
            password::verify(password, password::dummy_hash());
            // As long as a wrong password's failure count commit.
            self.store.decoy_write()?;
            events::login_failed(name, ip, reason);
            Err(LoginRefusal::InvalidCredentials)
        };
        let Some(account) = account else {
            return refuse("unknown_account");
        };
        if account.disabled {
            return refuse("disabled");
        }
        if account.is_locked(now) {
            return refuse("locked");
        }
        if password::verify(password, &account.password_hash) {
            let account = if account.failed_logins > 0 {
                match self.store.update(name, |a| {
                    a.record_success();
                    Ok::<_, ()>(a.clone())
                })? {
                    Ok(account) => account,
                    Err(()) => unreachable!("the change never refuses"),
                }
            } else {
                account
            };
            events::login_succeeded(name, ip);
            let issued = self.issue(&account, now);
            return Ok((account, issued));
        }
        let policy = self.settings.lockout;
        let outcome = self.store.update(name, |a| {
            // Another shard may have locked it meanwhile: do not count twice.
            if a.is_locked(now) {
                return Err(());
            }
            Ok(a.record_failure(now, policy))
        })?;
        if outcome.is_err() {
            self.store.decoy_write()?;
        }
        events::login_failed(name, ip, "wrong_password");
        if let Ok(FailureOutcome::LockedOut { until }) = outcome {
            events::locked_out(name, ip, until);
        }
        Err(LoginRefusal::InvalidCredentials)
    }

    /// Verifies a signed token at `now` and the account behind it.
    pub fn verify_token(&self, token: &str, now: u64) -> Result<(Claims, Account), TokenRefusal> {
        let claims = token::verify(&self.key, token, now)?;
        let account = self
            .store
            .get(&claims.name)?
            .ok_or(TokenRefusal::UnknownAccount)?;
        if account.disabled {
            return Err(TokenRefusal::Disabled);
        }
        if account.token_generation != claims.generation || account.role != claims.role {
            return Err(TokenRefusal::Revoked);
        }
        Ok((claims, account))
    }

    /// Who the `token` of `/ws/agent?token=` is: a signed token, or with
    /// `[agents] dev_static_tokens` a static `[agents.accounts]` token (role `agent`).
    pub fn agent_for_token(
        &self,
        token: &str,
        config: &Config,
        now: u64,
    ) -> Result<AgentIdentity, TokenRefusal> {
        if self.settings.dev_static_tokens && !token.starts_with("sb1.") {
            return match config.agent_by_token(token) {
                Some((id, account)) => Ok(AgentIdentity {
                    id: id.to_owned(),
                    name: account.name.clone(),
                    role: Role::Agent,
                    max_open: account.max_open,
                }),
                None => Err(TokenRefusal::UnknownStatic),
            };
        }
        let (_, account) = self.verify_token(token, now)?;
        Ok(AgentIdentity {
            id: account.name,
            name: account.display,
            role: account.role,
            max_open: account.max_open,
        })
    }
}

/// Per-shard login rate limits, per client IP and per account name, on the shared
/// [`crate::ratelimit::KeyedBuckets`]. Checked before any password work is done.
pub struct LoginLimiter {
    per_ip: KeyedBuckets<IpAddr>,
    per_account: KeyedBuckets<String>,
}

/// Keys tracked per limiter (bounded memory; see `KeyedBuckets`).
const LIMITER_KEYS: usize = 10_000;

impl LoginLimiter {
    /// `per_minute` attempts with a burst of the same size, for each key.
    pub fn new(ip_per_minute: u32, account_per_minute: u32) -> LoginLimiter {
        let rate = |n: u32| Rate::new(f64::from(n) / 60.0, f64::from(n));
        LoginLimiter {
            per_ip: KeyedBuckets::new(rate(ip_per_minute), LIMITER_KEYS),
            per_account: KeyedBuckets::new(rate(account_per_minute), LIMITER_KEYS),
        }
    }

    pub fn from_config(config: &Config) -> LoginLimiter {
        LoginLimiter::new(
            config.auth.login_per_ip_per_minute,
            config.auth.login_per_account_per_minute,
        )
    }

    /// Takes one attempt for `ip` and for `name` at `now_ms` (monotonic).
    pub fn check(&mut self, ip: Option<IpAddr>, name: &str, now_ms: u64) -> Result<(), RetryAfter> {
        if let Some(ip) = ip {
            self.per_ip.try_take(&ip, now_ms, 1.0)?;
        }
        // Names longer than any valid one share one key: they can never log in anyway.
        let key: String = name.chars().take(65).collect();
        self.per_account.try_take(&key, now_ms, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority(dir: &std::path::Path) -> Authority {
        Authority::new(
            AccountStore::open(dir).unwrap(),
            SigningKey::new([9; 32]),
            AuthSettings {
                token_ttl_secs: 600,
                lockout: LockoutPolicy {
                    failures: 3,
                    lock_secs: 60,
                },
                min_password_chars: 8,
                dev_static_tokens: false,
                secret_file: dir.join("secret"),
            },
        )
    }

    fn add(auth: &Authority, name: &str, role: Role) {
        manage::create(
            auth.store(),
            &manage::NewAccount {
                name,
                display: None,
                role,
                max_open: 3,
                password: "right password",
            },
            8,
            1,
            "test",
        )
        .unwrap();
    }

    #[test]
    fn login_issues_a_token_that_opens_a_session() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authority(dir.path());
        add(&auth, "alice", Role::Supervisor);
        let (_, issued) = auth.login("alice", "right password", None, 1000).unwrap();
        assert_eq!(issued.expires, 1600);
        let who = auth
            .agent_for_token(&issued.token, &Config::default(), 1001)
            .unwrap();
        assert_eq!(who.id, "alice");
        assert_eq!(who.role, Role::Supervisor);
        assert!(matches!(
            auth.agent_for_token(&issued.token, &Config::default(), 1600),
            Err(TokenRefusal::Token(TokenError::Expired))
        ));
    }

    #[test]
    fn wrong_name_and_password_answer_alike_and_lockout_persists() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authority(dir.path());
        add(&auth, "bob", Role::Agent);
        for name in ["nobody", "bob", "bad name!"] {
            assert!(matches!(
                auth.login(name, "wrong password", None, 10),
                Err(LoginRefusal::InvalidCredentials)
            ));
        }
        auth.login("bob", "wrong again", None, 11).unwrap_err();
        auth.login("bob", "wrong thrice", None, 12).unwrap_err();
        let bob = auth.store().get("bob").unwrap().unwrap();
        assert!(bob.is_locked(12) && bob.locked_until == 72);
        // Locked: even the right password is refused, alike.
        assert!(matches!(
            auth.login("bob", "right password", None, 20),
            Err(LoginRefusal::InvalidCredentials)
        ));
        // Reopened (as after a restart), still locked; after the lock it works.
        drop(auth);
        let auth = authority(dir.path());
        assert!(auth.login("bob", "right password", None, 71).is_err());
        assert!(auth.login("bob", "right password", None, 72).is_ok());
    }

    #[test]
    fn disable_password_and_role_changes_revoke_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authority(dir.path());
        add(&auth, "carol", Role::Agent);
        let config = Config::default();
        let (_, t1) = auth.login("carol", "right password", None, 100).unwrap();
        manage::set_role(auth.store(), "carol", Role::Supervisor, 101, "test").unwrap();
        assert!(matches!(
            auth.agent_for_token(&t1.token, &config, 102),
            Err(TokenRefusal::Revoked)
        ));
        let (_, t2) = auth.login("carol", "right password", None, 103).unwrap();
        manage::set_password(auth.store(), "carol", "another password", 8, 104, "test").unwrap();
        assert!(auth.agent_for_token(&t2.token, &config, 105).is_err());
        let (_, t3) = auth.login("carol", "another password", None, 106).unwrap();
        assert!(auth.agent_for_token(&t3.token, &config, 107).is_ok());
        manage::set_disabled(auth.store(), "carol", true, 108, "test").unwrap();
        assert!(auth.agent_for_token(&t3.token, &config, 109).is_err());
        assert!(auth.login("carol", "another password", None, 110).is_err());
        manage::set_disabled(auth.store(), "carol", false, 111, "test").unwrap();
        assert!(
            auth.agent_for_token(&t3.token, &config, 112).is_err(),
            "enabling again does not revive old tokens"
        );
    }

    #[test]
    fn static_tokens_only_in_dev_mode() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::load_str(
            "t.toml",
            "[agents.accounts.dev]\ntoken = \"dev-token-0123456789\"\n",
        )
        .unwrap();
        let mut auth = authority(dir.path());
        assert!(auth
            .agent_for_token("dev-token-0123456789", &config, 0)
            .is_err());
        auth.settings.dev_static_tokens = true;
        let who = auth
            .agent_for_token("dev-token-0123456789", &config, 0)
            .unwrap();
        assert_eq!((who.id.as_str(), who.role), ("dev", Role::Agent));
    }

    #[test]
    fn limiter_refuses_per_ip_and_per_account() {
        let mut limiter = LoginLimiter::new(3, 2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(limiter.check(Some(ip), "a", 0).is_ok());
        assert!(limiter.check(Some(ip), "b", 0).is_ok());
        assert!(limiter.check(Some(ip), "c", 0).is_ok());
        let refused = limiter.check(Some(ip), "d", 0).unwrap_err();
        assert_eq!(refused.ms, 20_000, "3 per minute: one every 20 s");
        // Same account from another IP: per-account budget of 2.
        assert!(limiter.check(Some(other), "a", 0).is_ok());
        assert!(limiter.check(Some(other), "a", 0).is_err());
        assert!(limiter.check(Some(ip), "d", 20_000).is_ok());
    }
}
