//! Visitor identity that cannot be guessed: visitor secrets and host-verified identities.
//!
//! A visitor id alone proves nothing (it travels in URLs and logs). Reconnecting to an
//! existing visitor id requires one of:
//! - the visitor's **secret**: 128 random bits (32 hex characters) the server issues in
//!   the visitor's first `hello`. Storage keeps only its SHA-256 (table
//!   `visitor_secrets`), written with the visitor's first conversation; the owner shard
//!   compares hashes in constant time.
//! - a **verified identity**: the host site passes `identity_hash =
//!   hex(HMAC-SHA256(site_key, visitor))`, checked here against the site's key from
//!   `[visitors.sites.<name>]`; a verified visitor resumes from any device.
//!
//! A connection that presents neither, or a wrong secret, becomes a NEW visitor (new id,
//! new secret) and never sees the old conversation. The owner state machine decides that
//! (it knows the stored hash); this module holds the pure checks and, for the driver, the
//! random draws (the owner itself draws no randomness).

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Bytes of randomness in a visitor secret (hex-encoded: twice as many characters).
pub const SECRET_BYTES: usize = 16;

/// SHA-256 of a presented or issued secret (what storage keeps).
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Whether two secret hashes are equal, in time independent of where they differ.
pub fn hashes_match(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.ct_eq(b).into()
}

/// A new random secret and its hash.
pub fn new_secret() -> (String, [u8; 32]) {
    let bytes: [u8; SECRET_BYTES] = rand::random();
    let secret = hex(&bytes);
    let hash = hash_secret(&secret);
    (secret, hash)
}

/// A new random visitor id (128 bits) whose conversations live on `owner` of
/// `shard_count` shards: a refused claim is moved to it without leaving the claimed id's
/// owner shard, and a new visitor gets one owned by the shard its connection landed on.
pub fn new_visitor_on(site: &str, owner: usize, shard_count: usize) -> String {
    loop {
        let visitor = format!("v-{:032x}", rand::random::<u128>());
        if super::visitor_owner(site, &visitor, shard_count) == owner {
            return visitor;
        }
    }
}

/// `hex(HMAC-SHA256(key, visitor))`: what a host site passes as `identity_hash`.
pub fn identity_hash(key: &[u8], visitor: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(visitor.as_bytes());
    hex(&mac.finalize().into_bytes())
}

/// Whether `presented` (hex, either case) is `identity_hash(key, visitor)`; the MAC is
/// compared in constant time.
pub fn identity_matches(key: &[u8], visitor: &str, presented: &str) -> bool {
    let Some(bytes) = unhex(presented) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(visitor.as_bytes());
    mac.verify_slice(&bytes).is_ok()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_128_random_bits_and_only_their_hash_matches() {
        let (a, hash_a) = new_secret();
        let (b, hash_b) = new_secret();
        assert_eq!(a.len(), 2 * SECRET_BYTES);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert!(hashes_match(&hash_a, &hash_secret(&a)));
        assert!(!hashes_match(&hash_a, &hash_b));
        assert!(!hashes_match(&hash_a, &hash_secret(&a[1..])));
    }

    #[test]
    fn identity_hash_is_hmac_sha256_of_the_visitor_id() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            identity_hash(b"Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let key = b"0123456789abcdef0123456789abcdef";
        let good = identity_hash(key, "user-42");
        assert!(identity_matches(key, "user-42", &good));
        assert!(identity_matches(key, "user-42", &good.to_uppercase()));
        assert!(!identity_matches(key, "user-43", &good));
        assert!(!identity_matches(
            b"another key of at least 32 bytes!",
            "user-42",
            &good
        ));
        assert!(!identity_matches(key, "user-42", &good[..62]));
        assert!(!identity_matches(key, "user-42", "zz"));
        assert!(!identity_matches(key, "user-42", ""));
    }

    #[test]
    fn a_replacement_visitor_stays_on_the_owner_shard() {
        for owner in 0..4 {
            let visitor = new_visitor_on("acme", owner, 4);
            assert_eq!(super::super::visitor_owner("acme", &visitor, 4), owner);
        }
    }
}
