//! The rsync algorithm over snapshot files (see `kb::snapshot_file`), with `fast_rsync`
//! (librsync's signature and delta formats: a rolling weak checksum and an MD4 strong hash per
//! block; copy and literal commands) and a BLAKE3 check of the rebuilt whole file.
//!
//! 1. The replica computes the [`signature`] of the snapshot file it holds (its base).
//! 2. The primary checks it ([`check_signature`]) and answers the [`delta`] of its own file
//!    against it, with the file's length and [`content_hash`](super::content_hash).
//! 3. The replica [`rebuild`]s the primary's file from its base and the delta.
//!
//! Invariants:
//! - [`rebuild`] returns bytes only when they are exactly `expected_len` long and hash to
//!   `expected_hash`: a corrupted or truncated delta, or one computed against another base
//!   (MD4 block matches are never trusted on their own), is an error, never a wrong file.
//! - The primary never loops or allocates without bound on a hostile signature: block size
//!   and strong-hash length are checked before `fast_rsync` sees them, and the rebuilt
//!   output is capped at the announced length.
//!
//! Block size: about the square root of the base's length (rsync's rule), between
//! [`MIN_BLOCK`] and [`MAX_BLOCK`] bytes, so the signature and the delta's lost blocks
//! both stay near `sqrt(len)` blocks; [`STRONG_HASH_BYTES`] of MD4 per block (the whole-file
//! hash catches what a block collision would spoil).

use fast_rsync::{Signature, SignatureOptions};

use super::snapshot_file::content_hash;

/// Smallest block a signature may use.
pub const MIN_BLOCK: u32 = 512;
/// Largest block a signature may use.
pub const MAX_BLOCK: u32 = 128 * 1024;
/// Bytes of each block's MD4 hash in the signatures this module makes.
pub const STRONG_HASH_BYTES: u32 = 8;
/// Fewest strong-hash bytes a signature may carry.
const MIN_STRONG_HASH_BYTES: u32 = 4;
/// librsync's MD4 signature magic (`fast_rsync` makes no other kind).
const MD4_SIGNATURE_MAGIC: u32 = 0x7273_0136;
/// Signature header: magic, block size, strong-hash length (u32 big-endian each).
const SIGNATURE_HEADER: usize = 12;

/// Why a signature, a delta or a rebuilt file was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("invalid signature: {0}")]
    InvalidSignature(String),
    #[error("cannot compute the delta: {0}")]
    Diff(String),
    #[error("the delta does not apply to this snapshot (corrupted or truncated): {0}")]
    Apply(String),
    #[error("the rebuilt snapshot is {found} bytes, the primary's is {expected}")]
    LengthMismatch { expected: u64, found: u64 },
    #[error(
        "the rebuilt snapshot's BLAKE3 hash is {found}, the primary's is {expected} \
         (the delta is corrupted or was computed for another base)"
    )]
    HashMismatch { expected: String, found: String },
}

/// The block size for a base of `len` bytes (see the module docs).
pub fn block_size_for(len: usize) -> u32 {
    let root = (len as f64).sqrt() as u32;
    (root.div_ceil(8) * 8).clamp(MIN_BLOCK, MAX_BLOCK)
}

/// The serialised signature of `base` (librsync format).
pub fn signature(base: &[u8]) -> Vec<u8> {
    Signature::calculate(
        base,
        SignatureOptions {
            block_size: block_size_for(base.len()),
            crypto_hash_size: STRONG_HASH_BYTES,
        },
    )
    .into_serialized()
}

/// Parses a signature received from a replica, refusing block sizes and hash lengths outside
/// this module's bounds (a zero block size would make the diff loop forever).
pub fn check_signature(bytes: Vec<u8>) -> Result<Signature, DeltaError> {
    check_signature_within(bytes, MIN_BLOCK)
}

/// [`check_signature`] with blocks of `min_block` bytes or more allowed (the fine round of
/// `kb::delta_plan` uses smaller blocks than a whole-file signature).
pub(super) fn check_signature_within(
    bytes: Vec<u8>,
    min_block: u32,
) -> Result<Signature, DeltaError> {
    let field = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
    };
    let (Some(magic), Some(block), Some(strong)) = (field(0), field(4), field(8)) else {
        return Err(DeltaError::InvalidSignature(format!(
            "{} bytes, shorter than its {SIGNATURE_HEADER}-byte header",
            bytes.len()
        )));
    };
    if magic != MD4_SIGNATURE_MAGIC {
        return Err(DeltaError::InvalidSignature(format!(
            "magic {magic:#010x}, expected an MD4 signature ({MD4_SIGNATURE_MAGIC:#010x})"
        )));
    }
    if !(min_block..=MAX_BLOCK).contains(&block) {
        return Err(DeltaError::InvalidSignature(format!(
            "block size {block} is not {min_block} to {MAX_BLOCK}"
        )));
    }
    if !(MIN_STRONG_HASH_BYTES..=16).contains(&strong) {
        return Err(DeltaError::InvalidSignature(format!(
            "strong hash of {strong} bytes is not {MIN_STRONG_HASH_BYTES} to 16"
        )));
    }
    Signature::deserialize(bytes).map_err(|err| DeltaError::InvalidSignature(err.to_string()))
}

/// The delta that turns the signature's base into `target`: copy commands for the blocks the
/// base has (found at any offset by the rolling checksum), literals for the rest.
pub fn delta(signature: &Signature, target: &[u8]) -> Result<Vec<u8>, DeltaError> {
    let mut out = Vec::new();
    fast_rsync::diff(&signature.index(), target, &mut out)
        .map_err(|err| DeltaError::Diff(err.to_string()))?;
    Ok(out)
}

/// Applies `delta` to `base` and returns the result only if it is `expected_len` bytes long
/// and its BLAKE3 hash is `expected_hash` (lowercase hex).
pub fn rebuild(
    base: &[u8],
    delta: &[u8],
    expected_len: u64,
    expected_hash: &str,
) -> Result<Vec<u8>, DeltaError> {
    let limit = usize::try_from(expected_len).map_err(|_| DeltaError::LengthMismatch {
        expected: expected_len,
        found: 0,
    })?;
    let mut out = Vec::with_capacity(limit.min(base.len().saturating_mul(2) + delta.len()));
    fast_rsync::apply_limited(base, delta, &mut out, limit)
        .map_err(|err| DeltaError::Apply(err.to_string()))?;
    rebuild_exact(out, expected_len, expected_hash)
}

/// `out` if it is `expected_len` bytes long with BLAKE3 hash `expected_hash` (lowercase hex).
pub(super) fn rebuild_exact(
    out: Vec<u8>,
    expected_len: u64,
    expected_hash: &str,
) -> Result<Vec<u8>, DeltaError> {
    if out.len() as u64 != expected_len {
        return Err(DeltaError::LengthMismatch {
            expected: expected_len,
            found: out.len() as u64,
        });
    }
    let found = content_hash(&out);
    if !found.eq_ignore_ascii_case(expected_hash) {
        return Err(DeltaError::HashMismatch {
            expected: expected_hash.to_owned(),
            found,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes (xorshift), like a vector region.
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    /// `base` with an insertion, a deletion and a replacement at three places.
    fn edited(base: &[u8]) -> Vec<u8> {
        let third = base.len() / 3;
        let mut out = base[..third].to_vec();
        out.extend_from_slice(b"an inserted entry, shifting everything after it");
        out.extend_from_slice(&base[third..2 * third]);
        out.extend_from_slice(&base[2 * third + 300..2 * third + 5000]);
        out.extend_from_slice(&noise(700, 99));
        out.extend_from_slice(&base[2 * third + 5700..]);
        out
    }

    fn sync(base: &[u8], target: &[u8]) -> (Vec<u8>, Result<Vec<u8>, DeltaError>) {
        let signature = check_signature(signature(base)).unwrap();
        let delta = delta(&signature, target).unwrap();
        let rebuilt = rebuild(base, &delta, target.len() as u64, &content_hash(target));
        (delta, rebuilt)
    }

    #[test]
    fn a_small_edit_moves_a_small_delta_and_rebuilds_exactly() {
        let base = noise(1 << 20, 7);
        let target = edited(&base);
        let (delta, rebuilt) = sync(&base, &target);
        assert_eq!(rebuilt.unwrap(), target);
        // Three edits spoil at most ~2 blocks each (1,024-byte blocks here), plus literals.
        assert!(delta.len() < 8 * 1024, "delta of {} bytes", delta.len());
        // No change: a delta of copy commands only.
        let (delta, rebuilt) = sync(&base, &base);
        assert_eq!(rebuilt.unwrap(), base);
        assert!(delta.len() < 64, "delta of {} bytes", delta.len());
        // From nothing: the delta is the file.
        let (delta, rebuilt) = sync(&[], &target);
        assert_eq!(rebuilt.unwrap(), target);
        assert!(delta.len() >= target.len());
    }

    #[test]
    fn corrupted_truncated_and_mismatched_deltas_are_refused() {
        let base = noise(256 * 1024, 3);
        let target = edited(&base);
        let hash = content_hash(&target);
        let len = target.len() as u64;
        let signature = check_signature(signature(&base)).unwrap();
        let good = delta(&signature, &target).unwrap();
        assert_eq!(rebuild(&base, &good, len, &hash).unwrap(), target);

        // A flipped byte in every position either breaks a command or changes the output.
        for at in [0, 4, good.len() / 2, good.len() - 2, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            assert!(
                rebuild(&base, &bad, len, &hash).is_err(),
                "byte {at} flipped"
            );
        }
        for cut in [0, 3, good.len() / 2, good.len() - 1] {
            assert!(
                matches!(
                    rebuild(&base, &good[..cut], len, &hash),
                    Err(DeltaError::Apply(_))
                ),
                "cut at {cut}"
            );
        }
        // The same delta on another base: copies fetch the wrong bytes.
        let other_base = noise(256 * 1024, 4);
        assert!(matches!(
            rebuild(&other_base, &good, len, &hash),
            Err(DeltaError::Apply(_) | DeltaError::HashMismatch { .. })
        ));
        let mut shifted = base.clone();
        shifted.rotate_left(1000);
        assert!(matches!(
            rebuild(&shifted, &good, len, &hash),
            Err(DeltaError::HashMismatch { .. })
        ));
        // A wrong announced length or hash.
        assert!(matches!(
            rebuild(&base, &good, len + 1, &hash),
            Err(DeltaError::LengthMismatch { .. })
        ));
        assert!(rebuild(&base, &good, len - 1, &hash).is_err());
        assert!(matches!(
            rebuild(&base, &good, len, &content_hash(b"other")),
            Err(DeltaError::HashMismatch { .. })
        ));
    }

    #[test]
    fn hostile_signatures_are_refused_before_the_diff() {
        let good = signature(&noise(10_000, 5));
        assert!(check_signature(good.clone()).is_ok());
        let with = |at: usize, value: u32| {
            let mut bytes = good.clone();
            bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
            check_signature(bytes)
        };
        assert!(with(4, 0).is_err(), "block size 0 would loop forever");
        assert!(with(4, MAX_BLOCK + 1).is_err());
        assert!(with(8, 17).is_err());
        assert!(
            with(0, 0x7273_0137).is_err(),
            "BLAKE2 signatures are not supported"
        );
        assert!(check_signature(good[..7].to_vec()).is_err());
        assert!(check_signature(good[..good.len() - 1].to_vec()).is_err());
    }

    #[test]
    fn block_size_follows_the_square_root() {
        assert_eq!(block_size_for(0), MIN_BLOCK);
        assert_eq!(block_size_for(17_000_000), 4128);
        assert_eq!(block_size_for(1 << 30), 32_768);
        assert_eq!(block_size_for(usize::MAX / 2), MAX_BLOCK);
    }
}
