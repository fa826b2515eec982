//! Password hashing with argon2id (the `argon2` crate's defaults: 19 MiB, 2 passes, 1 lane,
//! the OWASP recommendation) and a random 16-byte salt per hash, stored as a PHC string.
//!
//! Invariants:
//! - Plain passwords are never stored or logged; only PHC strings are.
//! - [`verify`] takes the same time whether the account exists or not: for a missing
//!   account callers verify against [`dummy_hash`], a hash of a random password made once per
//!   process with the same parameters.
//! - Hashing and verifying cost tens of milliseconds of CPU: the server runs them on the
//!   shard's blocking thread, never on the event loop.

use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::rngs::OsRng;

/// Longest password accepted, in bytes (argon2 takes any length; this bounds the work).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// Why a password was not accepted for an account.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordError {
    #[error("the password is empty")]
    Empty,
    #[error("the password is too short: at least {min} characters are required")]
    TooShort { min: usize },
    #[error("the password is too long: at most {MAX_PASSWORD_BYTES} bytes")]
    TooLong,
    #[error("the password must not contain control characters")]
    ControlCharacters,
    #[error("the password cannot be hashed: {0}")]
    Hash(String),
}

/// Checks a new password against the policy (length; no control characters).
pub fn check_policy(password: &str, min_chars: usize) -> Result<(), PasswordError> {
    if password.is_empty() {
        return Err(PasswordError::Empty);
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(PasswordError::TooLong);
    }
    if password.chars().any(char::is_control) {
        return Err(PasswordError::ControlCharacters);
    }
    if password.chars().count() < min_chars {
        return Err(PasswordError::TooShort { min: min_chars });
    }
    Ok(())
}

/// An argon2id PHC string of `password` with a fresh random salt.
pub fn hash(password: &str) -> Result<String, PasswordError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|err| PasswordError::Hash(err.to_string()))
}

/// Whether `password` matches the PHC string `phc` (false for a malformed hash too).
pub fn verify(password: &str, phc: &str) -> bool {
    if password.len() > MAX_PASSWORD_BYTES {
        // Still spend the time, so length does not tell anything either.
        let _ = verify_inner(password.get(..0).unwrap_or(""), dummy_hash());
        return false;
    }
    verify_inner(password, phc)
}

fn verify_inner(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// A hash nobody knows the password of, for verifying when the account does not exist.
pub fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let random = format!("{:032x}", rand::random::<u128>());
        hash(&random).expect("argon2 hashes a 32-character password")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_then_verify() {
        let phc = hash("correct horse battery").unwrap();
        assert!(phc.starts_with("$argon2id$"), "{phc}");
        assert!(verify("correct horse battery", &phc));
        assert!(!verify("correct horse batterY", &phc));
        assert!(!verify("", &phc));
        assert!(!verify("correct horse battery", "not a phc string"));
    }

    #[test]
    fn salts_differ() {
        let a = hash("same password").unwrap();
        let b = hash("same password").unwrap();
        assert_ne!(a, b, "a random salt per hash");
        assert!(verify("same password", &a) && verify("same password", &b));
    }

    #[test]
    fn dummy_hash_matches_nothing_guessable() {
        assert!(dummy_hash().starts_with("$argon2id$"));
        assert!(!verify("", dummy_hash()));
        assert!(!verify("password", dummy_hash()));
    }

    #[test]
    fn policy() {
        assert_eq!(check_policy("", 8), Err(PasswordError::Empty));
        assert_eq!(
            check_policy("short", 8),
            Err(PasswordError::TooShort { min: 8 })
        );
        assert_eq!(check_policy("long enough", 8), Ok(()));
        assert_eq!(
            check_policy("tab\there!", 4),
            Err(PasswordError::ControlCharacters)
        );
        assert_eq!(
            check_policy(&"x".repeat(MAX_PASSWORD_BYTES + 1), 8),
            Err(PasswordError::TooLong)
        );
        // Characters, not bytes.
        assert_eq!(
            check_policy("ééééééé", 8),
            Err(PasswordError::TooShort { min: 8 })
        );
    }
}
