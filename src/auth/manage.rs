//! Account management shared by the `agent` commands and the admin API: create, disable,
//! enable, set role, set password, unlock. Each operation validates its input, changes the
//! record in one write transaction and reports its security event (see [`super::events`]).
//!
//! Disabling, a role change and a password change bump `token_generation`, so tokens issued
//! before stop working at their next check (a new WebSocket or API call).

use super::accounts::{self, Account, AccountError, AccountStore};
use super::events;
use super::password::{self, PasswordError};
use super::rbac::Role;

/// Why a management operation failed. Everything but `Account(Store/Damaged/CreateDir)` is
/// bad input (exit 2, HTTP 4xx).
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error(transparent)]
    Account(#[from] AccountError),
    #[error(transparent)]
    Password(#[from] PasswordError),
}

impl ManageError {
    /// Whether the caller's input is at fault (rather than the store).
    pub fn is_bad_input(&self) -> bool {
        match self {
            ManageError::Password(PasswordError::Hash(_)) => false,
            ManageError::Password(_) => true,
            ManageError::Account(err) => !matches!(
                err,
                AccountError::Store(_)
                    | AccountError::Damaged { .. }
                    | AccountError::CreateDir { .. }
            ),
        }
    }
}

/// A new account's fields.
#[derive(Clone, Debug)]
pub struct NewAccount<'a> {
    pub name: &'a str,
    pub display: Option<&'a str>,
    pub role: Role,
    pub max_open: u32,
    pub password: &'a str,
}

/// Creates an account.
pub fn create(
    store: &AccountStore,
    new: &NewAccount<'_>,
    min_password_chars: usize,
    now: u64,
    by: &str,
) -> Result<Account, ManageError> {
    accounts::check_name(new.name)?;
    let display = new.display.unwrap_or(new.name);
    accounts::check_display(display)?;
    accounts::check_max_open(new.max_open)?;
    password::check_policy(new.password, min_password_chars)?;
    if store.get(new.name)?.is_some() {
        return Err(AccountError::Exists(new.name.to_owned()).into());
    }
    let account = Account {
        name: new.name.to_owned(),
        display: display.to_owned(),
        role: new.role,
        max_open: new.max_open,
        disabled: false,
        password_hash: password::hash(new.password)?,
        failed_logins: 0,
        locked_until: 0,
        token_generation: 0,
        created: now,
        updated: now,
    };
    store.create(&account)?;
    events::account_created(by, &account.name, account.role);
    Ok(account)
}

fn change(
    store: &AccountStore,
    name: &str,
    f: impl FnOnce(&mut Account),
) -> Result<Account, ManageError> {
    accounts::check_name(name).map_err(|_| AccountError::NotFound(name.to_owned()))?;
    let updated = store.update(name, |account| {
        f(account);
        Ok::<_, std::convert::Infallible>(account.clone())
    })?;
    Ok(match updated {
        Ok(account) => account,
        Err(never) => match never {},
    })
}

/// Disables (`disabled = true`) or enables an account. Disabling revokes its tokens.
pub fn set_disabled(
    store: &AccountStore,
    name: &str,
    disabled: bool,
    now: u64,
    by: &str,
) -> Result<Account, ManageError> {
    let account = change(store, name, |a| {
        if disabled && !a.disabled {
            a.revoke_tokens();
        }
        a.disabled = disabled;
        a.updated = now;
    })?;
    if disabled {
        events::account_disabled(by, name);
    } else {
        events::account_enabled(by, name);
    }
    Ok(account)
}

/// Sets the role; a change revokes the account's tokens (they carry the role).
pub fn set_role(
    store: &AccountStore,
    name: &str,
    role: Role,
    now: u64,
    by: &str,
) -> Result<Account, ManageError> {
    let mut from = role;
    let account = change(store, name, |a| {
        from = a.role;
        if a.role != role {
            a.role = role;
            a.revoke_tokens();
        }
        a.updated = now;
    })?;
    if from != role {
        events::role_changed(by, name, from, role);
    }
    Ok(account)
}

/// Sets a new password (checked against the policy); revokes the account's tokens.
pub fn set_password(
    store: &AccountStore,
    name: &str,
    new_password: &str,
    min_password_chars: usize,
    now: u64,
    by: &str,
) -> Result<Account, ManageError> {
    accounts::check_name(name).map_err(|_| AccountError::NotFound(name.to_owned()))?;
    if store.get(name)?.is_none() {
        return Err(AccountError::NotFound(name.to_owned()).into());
    }
    password::check_policy(new_password, min_password_chars)?;
    let hash = password::hash(new_password)?;
    let account = change(store, name, |a| {
        a.password_hash = hash;
        a.revoke_tokens();
        a.failed_logins = 0;
        a.updated = now;
    })?;
    events::password_changed(by, name);
    Ok(account)
}

/// Lifts a lockout.
pub fn unlock(
    store: &AccountStore,
    name: &str,
    now: u64,
    by: &str,
) -> Result<Account, ManageError> {
    let account = change(store, name, |a| a.unlock(now))?;
    events::account_unlocked(by, name);
    Ok(account)
}

/// The account as the API shows it (never the hash), with the lockout state at `now`.
pub fn public_view(account: &Account, now: u64) -> serde_json::Value {
    serde_json::json!({
        "name": account.name,
        "display": account.display,
        "role": account.role.as_str(),
        "max_open": account.max_open,
        "disabled": account.disabled,
        "failed_logins": account.failed_logins,
        "locked": account.is_locked(now),
        "locked_until": account.is_locked(now).then(|| super::clock::rfc3339(account.locked_until)),
        "created": super::clock::rfc3339(account.created),
        "updated": super::clock::rfc3339(account.updated),
    })
}
