//! Agent accounts: the record, its lockout rules (sans-IO, time passed in) and the LMDB store
//! holding them (`<storage dir>/accounts/`, one environment per process).
//!
//! Records are serde_json, not rkyv: an account is read at a login, a token check or an admin
//! command, a few hundred bytes each, never on a per-message path; JSON keeps them readable
//! with `mdb_dump`, lets fields be added with `#[serde(default)]` without a migration, and
//! zero-copy access would buy nothing here.
//!
//! Invariants:
//! - Keys are account names (`[A-Za-z0-9_-]`, 1..=64 bytes); a name is never reused for a
//!   different record (there is no delete, only disable).
//! - `password_hash` is an argon2id PHC string; the plain password is never stored.
//! - `token_generation` grows whenever existing tokens must stop working: disable, password
//!   change, role change. Tokens carry the generation they were issued under.
//! - `locked_until` (Unix seconds) survives restarts; `failed_logins` counts consecutive
//!   failures and is reset by a success or when a lockout starts.
//! - heed refuses to open one environment twice in a process: `serve` opens the store once
//!   and shares it (`Arc`) with every shard; the CLI opens it for one command (LMDB
//!   coordinates the two processes).

use std::path::{Path, PathBuf};

use heed::types::{Bytes, Str};
use heed::{CommitOrAbort, Database, Env, EnvOpenOptions, WithoutTls};
use serde::{Deserialize, Serialize};

use super::rbac::Role;

/// Size of the accounts map: room for about 50,000 accounts.
const MAP_SIZE: usize = 64 << 20;

/// One agent account.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// The login name and agent id.
    pub name: String,
    /// Shown to visitors.
    pub display: String,
    pub role: Role,
    /// Conversations this agent may hold open at once.
    pub max_open: u32,
    pub disabled: bool,
    pub password_hash: String,
    /// Consecutive failed logins since the last success or lockout.
    #[serde(default)]
    pub failed_logins: u32,
    /// Unix seconds; logins are refused before it. 0 when not locked.
    #[serde(default)]
    pub locked_until: u64,
    #[serde(default)]
    pub token_generation: u64,
    /// Unix seconds.
    pub created: u64,
    pub updated: u64,
}

/// The lockout rule: `failures` consecutive failures lock for `lock_secs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockoutPolicy {
    pub failures: u32,
    pub lock_secs: u64,
}

/// What a failed login did to the account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureOutcome {
    /// Counted; `failed_logins` is the new count.
    Counted { failed_logins: u32 },
    /// This failure started a lockout until the given Unix second.
    LockedOut { until: u64 },
}

impl Account {
    /// Whether logins are refused at `now` because of a lockout.
    pub fn is_locked(&self, now: u64) -> bool {
        self.locked_until > now
    }

    /// Seconds left of a lockout at `now` (0 when not locked).
    pub fn lock_remaining(&self, now: u64) -> u64 {
        self.locked_until.saturating_sub(now)
    }

    /// Records a wrong password at `now`. Call only when not locked.
    pub fn record_failure(&mut self, now: u64, policy: LockoutPolicy) -> FailureOutcome {
        self.failed_logins += 1;
        self.updated = now;
        if self.failed_logins >= policy.failures {
            self.failed_logins = 0;
            self.locked_until = now + policy.lock_secs;
            FailureOutcome::LockedOut {
                until: self.locked_until,
            }
        } else {
            FailureOutcome::Counted {
                failed_logins: self.failed_logins,
            }
        }
    }

    /// Records a successful login: the failure count starts again.
    pub fn record_success(&mut self) {
        self.failed_logins = 0;
    }

    /// Lifts a lockout and forgets failures (`agent unlock`).
    pub fn unlock(&mut self, now: u64) {
        self.failed_logins = 0;
        self.locked_until = 0;
        self.updated = now;
    }

    /// Makes every token issued so far invalid.
    pub fn revoke_tokens(&mut self) {
        self.token_generation += 1;
    }
}

/// Checks an account name: 1..=64 characters of `A-Z a-z 0-9 _ -`.
pub fn check_name(name: &str) -> Result<(), AccountError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(AccountError::InvalidName(name.to_owned()))
    }
}

/// Checks a display name: 1..=128 characters, no control characters.
pub fn check_display(display: &str) -> Result<(), AccountError> {
    let chars = display.chars().count();
    if chars == 0 || chars > 128 || display.chars().any(char::is_control) {
        return Err(AccountError::InvalidDisplay);
    }
    Ok(())
}

/// Checks a `max_open`: 1..=1000.
pub fn check_max_open(max_open: u32) -> Result<(), AccountError> {
    if (1..=1000).contains(&max_open) {
        Ok(())
    } else {
        Err(AccountError::InvalidMaxOpen(max_open))
    }
}

/// Why an account operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("invalid account name {0:?}: use 1 to 64 characters of A-Z a-z 0-9 _ -")]
    InvalidName(String),
    #[error("invalid display name: use 1 to 128 characters without control characters")]
    InvalidDisplay,
    #[error("invalid max_open {0}: use 1 to 1000")]
    InvalidMaxOpen(u32),
    #[error("no agent account named {0:?}")]
    NotFound(String),
    #[error("an agent account named {0:?} already exists")]
    Exists(String),
    #[error("cannot create {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("account store: {0}")]
    Store(#[from] heed::Error),
    #[error("account record {name:?} is damaged: {source}")]
    Damaged {
        name: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The accounts environment.
#[derive(Clone)]
pub struct AccountStore {
    env: Env<WithoutTls>,
    accounts: Database<'static, Str, Bytes>,
    /// One record rewritten by [`AccountStore::decoy_write`].
    decoy: Database<'static, Str, Bytes>,
}

impl AccountStore {
    /// The directory of the store under `[storage] dir`.
    pub fn dir(storage_dir: &Path) -> PathBuf {
        storage_dir.join("accounts")
    }

    /// Opens (creating if needed) the store under `storage_dir`. Once per process.
    pub fn open(storage_dir: &Path) -> Result<AccountStore, AccountError> {
        let path = Self::dir(storage_dir);
        std::fs::create_dir_all(&path).map_err(|source| AccountError::CreateDir {
            path: path.clone(),
            source,
        })?;
        let mut options = EnvOpenOptions::new().read_txn_without_tls();
        options.map_size(MAP_SIZE).max_dbs(4).max_readers(512);
        // SAFETY: the map is unsound only if the file changes behind LMDB's back; the
        // directory is ours, opened once per process, and other processes (the CLI) go
        // through LMDB too.
        let env = unsafe { options.open(&path) }?;
        env.clear_stale_readers()?;
        let wtxn = env.write_txn()?;
        let (accounts, decoy) = env
            .create_databases_and_commit(wtxn, |opener, wtxn| -> Result<_, AccountError> {
                let accounts = opener.create_database::<Str, Bytes>(wtxn, Some("accounts"))?;
                let decoy = opener.create_database::<Str, Bytes>(wtxn, Some("decoy"))?;
                Ok(CommitOrAbort::<_, ()>::Commit((accounts, decoy)))
            })?
            .unwrap_commit();
        Ok(AccountStore {
            env,
            accounts,
            decoy,
        })
    }

    /// The account called `name`.
    pub fn get(&self, name: &str) -> Result<Option<Account>, AccountError> {
        let rtxn = self.env.read_txn()?;
        match self.accounts.get(&rtxn, name)? {
            Some(bytes) => decode(name, bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Every account, by name.
    pub fn list(&self) -> Result<Vec<Account>, AccountError> {
        let rtxn = self.env.read_txn()?;
        let mut out = Vec::new();
        for item in self.accounts.iter(&rtxn)? {
            let (name, bytes) = item?;
            out.push(decode(name, bytes)?);
        }
        Ok(out)
    }

    /// Commits a write of the same shape as a failed-login update (one small record, one
    /// synced commit) to a table of its own. A refused login of a missing, disabled or
    /// locked account calls it, so that it costs what a wrong password costs and the answer
    /// time does not reveal whether the account exists.
    pub fn decoy_write(&self) -> Result<(), AccountError> {
        let mut wtxn = self.env.write_txn()?;
        let count = self
            .decoy
            .get(&wtxn, "decoy")?
            .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
            .map_or(0, u64::from_le_bytes);
        let filler = [0u8; 200];
        let mut record = (count + 1).to_le_bytes().to_vec();
        record.extend_from_slice(&filler);
        self.decoy.put(&mut wtxn, "decoy", &record[..8])?;
        self.decoy.put(&mut wtxn, "filler", &record)?;
        wtxn.commit()?;
        Ok(())
    }

    /// Stores a new account; refuses an existing name.
    pub fn create(&self, account: &Account) -> Result<(), AccountError> {
        let mut wtxn = self.env.write_txn()?;
        if self.accounts.get(&wtxn, &account.name)?.is_some() {
            return Err(AccountError::Exists(account.name.clone()));
        }
        let bytes = serde_json::to_vec(account).expect("accounts serialise");
        self.accounts.put(&mut wtxn, &account.name, &bytes)?;
        wtxn.commit()?;
        Ok(())
    }

    /// Reads, changes and writes back one account in one write transaction. `change`
    /// returning an error writes nothing.
    pub fn update<T, E>(
        &self,
        name: &str,
        change: impl FnOnce(&mut Account) -> Result<T, E>,
    ) -> Result<Result<T, E>, AccountError> {
        let mut wtxn = self.env.write_txn()?;
        let Some(bytes) = self.accounts.get(&wtxn, name)? else {
            return Err(AccountError::NotFound(name.to_owned()));
        };
        let mut account = decode(name, bytes)?;
        match change(&mut account) {
            Ok(value) => {
                let bytes = serde_json::to_vec(&account).expect("accounts serialise");
                self.accounts.put(&mut wtxn, name, &bytes)?;
                wtxn.commit()?;
                Ok(Ok(value))
            }
            Err(err) => Ok(Err(err)),
        }
    }
}

fn decode(name: &str, bytes: &[u8]) -> Result<Account, AccountError> {
    serde_json::from_slice(bytes).map_err(|source| AccountError::Damaged {
        name: name.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(name: &str) -> Account {
        Account {
            name: name.into(),
            display: name.to_uppercase(),
            role: Role::Agent,
            max_open: 5,
            disabled: false,
            password_hash: "$argon2id$placeholder".into(),
            failed_logins: 0,
            locked_until: 0,
            token_generation: 0,
            created: 100,
            updated: 100,
        }
    }

    const POLICY: LockoutPolicy = LockoutPolicy {
        failures: 3,
        lock_secs: 60,
    };

    #[test]
    fn lockout_after_consecutive_failures_then_expires() {
        let mut a = account("alice");
        assert_eq!(
            a.record_failure(1000, POLICY),
            FailureOutcome::Counted { failed_logins: 1 }
        );
        assert_eq!(
            a.record_failure(1001, POLICY),
            FailureOutcome::Counted { failed_logins: 2 }
        );
        assert!(!a.is_locked(1001));
        assert_eq!(
            a.record_failure(1002, POLICY),
            FailureOutcome::LockedOut { until: 1062 }
        );
        assert!(a.is_locked(1002));
        assert!(a.is_locked(1061));
        assert_eq!(a.lock_remaining(1030), 32);
        assert!(!a.is_locked(1062), "the lock ends by itself");
        assert_eq!(a.failed_logins, 0, "a new lockout needs N new failures");
    }

    #[test]
    fn success_resets_the_count() {
        let mut a = account("alice");
        a.record_failure(1, POLICY);
        a.record_failure(2, POLICY);
        a.record_success();
        assert_eq!(
            a.record_failure(3, POLICY),
            FailureOutcome::Counted { failed_logins: 1 },
            "failures must be consecutive"
        );
    }

    #[test]
    fn unlock_lifts_the_lock() {
        let mut a = account("alice");
        for t in 0..3 {
            a.record_failure(t, POLICY);
        }
        assert!(a.is_locked(10));
        a.unlock(10);
        assert!(!a.is_locked(10));
        assert_eq!(a.failed_logins, 0);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("alice_01-x").is_ok());
        for bad in ["", "a b", "a:b", "ä", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn store_round_trip_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = AccountStore::open(dir.path()).unwrap();
            store.create(&account("bob")).unwrap();
            store.create(&account("alice")).unwrap();
            assert!(matches!(
                store.create(&account("bob")),
                Err(AccountError::Exists(_))
            ));
            store
                .update("alice", |a| {
                    a.record_failure(5, POLICY);
                    Ok::<_, ()>(())
                })
                .unwrap()
                .unwrap();
            // A refused change writes nothing.
            let refused = store
                .update("alice", |a| {
                    a.disabled = true;
                    Err::<(), _>("no")
                })
                .unwrap();
            assert_eq!(refused, Err("no"));
            assert!(matches!(
                store.update("nobody", |_| Ok::<_, ()>(())),
                Err(AccountError::NotFound(_))
            ));
        }
        // heed keeps environments open per process; reopening the same path gives it back.
        let store = AccountStore::open(dir.path()).unwrap();
        let names: Vec<String> = store.list().unwrap().into_iter().map(|a| a.name).collect();
        assert_eq!(names, ["alice", "bob"]);
        let alice = store.get("alice").unwrap().unwrap();
        assert_eq!(alice.failed_logins, 1);
        assert!(!alice.disabled);
        assert!(store.get("carol").unwrap().is_none());
    }
}
