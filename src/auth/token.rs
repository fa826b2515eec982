//! Signed, expiring agent tokens: `sb1.<payload>.<mac>`.
//!
//! `payload` is base64url (no padding) of `name:role:expires:generation` (`expires` in Unix
//! seconds); `mac` is base64url of HMAC-SHA256 over `sb1.<payload>` with the 32-byte secret
//! of `[auth] secret_file`. Account names are `[A-Za-z0-9_-]`, so `:` separates unambiguously.
//!
//! Invariants:
//! - [`verify`] checks the MAC (in constant time) before it looks at the payload, so nothing
//!   of an unsigned token is parsed or trusted.
//! - A token is valid only until `expires`; the account checks (enabled, same
//!   `token_generation`) are the caller's (see `Authority::verify_token`): bumping an
//!   account's generation (disable, password or role change) revokes its tokens.
//! - Sans-IO: time is passed in.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::rbac::Role;

type HmacSha256 = Hmac<Sha256>;

const PREFIX: &str = "sb1.";

/// The signing key (`[auth] secret_file`). `Debug` does not print it.
#[derive(Clone)]
pub struct SigningKey([u8; 32]);

impl SigningKey {
    pub fn new(bytes: [u8; 32]) -> SigningKey {
        SigningKey(bytes)
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.0).expect("HMAC takes a key of any length")
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

/// What a token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    pub name: String,
    pub role: Role,
    /// Unix seconds.
    pub expires: u64,
    pub generation: u64,
}

/// Why a token was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's signature is not valid")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
}

/// Signs `claims`.
pub fn sign(key: &SigningKey, claims: &Claims) -> String {
    let payload = format!(
        "{}:{}:{}:{}",
        claims.name, claims.role, claims.expires, claims.generation
    );
    let mut token = String::with_capacity(96);
    token.push_str(PREFIX);
    URL_SAFE_NO_PAD.encode_string(payload.as_bytes(), &mut token);
    let mut mac = key.mac();
    mac.update(token.as_bytes());
    let tag = mac.finalize().into_bytes();
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(tag, &mut token);
    token
}

/// Checks the signature and the expiry at `now` (Unix seconds) and returns the claims.
pub fn verify(key: &SigningKey, token: &str, now: u64) -> Result<Claims, TokenError> {
    if token.len() > 512 || !token.starts_with(PREFIX) {
        return Err(TokenError::Malformed);
    }
    let (signed, tag) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
    let tag = URL_SAFE_NO_PAD
        .decode(tag)
        .map_err(|_| TokenError::Malformed)?;
    let mut mac = key.mac();
    mac.update(signed.as_bytes());
    mac.verify_slice(&tag)
        .map_err(|_| TokenError::BadSignature)?;
    let payload = URL_SAFE_NO_PAD
        .decode(&signed[PREFIX.len()..])
        .map_err(|_| TokenError::Malformed)?;
    let payload = String::from_utf8(payload).map_err(|_| TokenError::Malformed)?;
    let mut parts = payload.split(':');
    let (Some(name), Some(role), Some(expires), Some(generation), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(TokenError::Malformed);
    };
    let claims = Claims {
        name: name.to_owned(),
        role: role.parse().map_err(|_| TokenError::Malformed)?,
        expires: expires.parse().map_err(|_| TokenError::Malformed)?,
        generation: generation.parse().map_err(|_| TokenError::Malformed)?,
    };
    if now >= claims.expires {
        return Err(TokenError::Expired);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SigningKey {
        SigningKey::new([byte; 32])
    }

    fn claims() -> Claims {
        Claims {
            name: "alice".into(),
            role: Role::Supervisor,
            expires: 1_000,
            generation: 3,
        }
    }

    #[test]
    fn sign_then_verify() {
        let token = sign(&key(1), &claims());
        assert!(token.starts_with("sb1."));
        assert_eq!(verify(&key(1), &token, 999), Ok(claims()));
    }

    #[test]
    fn expiry() {
        let token = sign(&key(1), &claims());
        assert_eq!(verify(&key(1), &token, 1_000), Err(TokenError::Expired));
        assert_eq!(verify(&key(1), &token, 5_000), Err(TokenError::Expired));
    }

    #[test]
    fn another_key_is_refused() {
        let token = sign(&key(1), &claims());
        assert_eq!(verify(&key(2), &token, 0), Err(TokenError::BadSignature));
    }

    #[test]
    fn tampering_anywhere_is_refused() {
        let token = sign(&key(1), &claims());
        // Forge a payload with a later expiry and an admin role, keep the old tag.
        let forged_payload = URL_SAFE_NO_PAD.encode("alice:admin:99999999:3");
        let tag = token.rsplit_once('.').unwrap().1;
        let forged = format!("sb1.{forged_payload}.{tag}");
        assert_eq!(verify(&key(1), &forged, 0), Err(TokenError::BadSignature));
        // Flip every character of the token once.
        let bytes = token.as_bytes();
        for i in 0..bytes.len() {
            let mut changed = bytes.to_vec();
            changed[i] = if changed[i] == b'A' { b'B' } else { b'A' };
            let changed = String::from_utf8(changed).unwrap();
            if changed == token {
                continue;
            }
            assert!(verify(&key(1), &changed, 0).is_err(), "position {i}");
        }
    }

    #[test]
    fn garbage_is_malformed() {
        for bad in ["", "sb1.", "sb1..", "x.y.z", "sb1.abc", &"sb1.".repeat(200)] {
            assert!(verify(&key(1), bad, 0).is_err(), "{bad:?}");
        }
        assert_eq!(verify(&key(1), "nope", 0), Err(TokenError::Malformed));
    }
}
