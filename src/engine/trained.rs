//! What a knowledge-base import trains, as one stored record: the classifier heads and, when
//! the encoder was fine-tuned on the knowledge base (`engine::finetune`), its tuned top layers.
//!
//! The replica stores one opaque value per version (`kb::KbReplica::apply_snapshot`'s
//! classifier bytes). Without tuned layers it is the heads' bytes alone
//! ([`SoftmaxRegression::heads_to_bytes`](super::classifier::SoftmaxRegression::heads_to_bytes)),
//! exactly as before fine-tuning existed, so older versions read unchanged. With them it is
//! `b"SBTL"`, a little-endian u32 format version (1), a u64 length, the layers' bytes
//! ([`TopLayers::to_bytes`]) and then the heads' bytes.
//!
//! Invariants:
//! - Vectors embedded with tuned layers carry [`tuned_fingerprint`] as their model fingerprint
//!   (the base model's, then ` tuned:` and the layers' digest; with a companion, ` + ` and the
//!   companion's fingerprint follow, see `engine::update`), so they are only ever scored
//!   against queries embedded with the same layers: a version whose record lost its layers, or
//!   an engine whose model cannot run them, falls back to the lexical match instead of
//!   comparing unlike vectors.
//! - Decoding never panics: a malformed record is a [`TrainedError`].

use super::finetune::{FineTuneError, TopLayers};

const MAGIC: &[u8; 4] = b"SBTL";
const FORMAT_VERSION: u32 = 1;
const HEADER_BYTES: usize = 16;

/// Why a stored record could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum TrainedError {
    #[error("the tuned-layers record is truncated or malformed: {0}")]
    Malformed(String),
    #[error("the tuned-layers record has format version {0}, expected {FORMAT_VERSION}")]
    Version(u32),
    #[error("the stored tuned layers are unusable: {0}")]
    Layers(#[from] FineTuneError),
}

/// The record of one version: `heads` (the classifier heads' bytes) and optional `tuned` layers.
pub fn encode(heads: &[u8], tuned: Option<&TopLayers>) -> Vec<u8> {
    let Some(tuned) = tuned else {
        return heads.to_vec();
    };
    let layers = tuned.to_bytes();
    let mut bytes = Vec::with_capacity(HEADER_BYTES + layers.len() + heads.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(layers.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&layers);
    bytes.extend_from_slice(heads);
    bytes
}

/// Splits a record made by [`encode`] into the heads' bytes and the tuned layers, if any.
pub fn decode(bytes: &[u8]) -> Result<(&[u8], Option<TopLayers>), TrainedError> {
    if bytes.len() < 4 || &bytes[..4] != MAGIC {
        return Ok((bytes, None));
    }
    if bytes.len() < HEADER_BYTES {
        return Err(TrainedError::Malformed(format!(
            "{} bytes, shorter than the {HEADER_BYTES}-byte header",
            bytes.len()
        )));
    }
    let version = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(TrainedError::Version(version));
    }
    let length = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let end = usize::try_from(length)
        .ok()
        .and_then(|length| length.checked_add(HEADER_BYTES))
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| {
            TrainedError::Malformed(format!(
                "the layers claim {length} bytes but {} follow the header",
                bytes.len() - HEADER_BYTES
            ))
        })?;
    let layers = TopLayers::from_bytes(&bytes[HEADER_BYTES..end])?;
    Ok((&bytes[end..], Some(layers)))
}

/// The model fingerprint of vectors embedded by the model `base` with `tuned` top layers.
/// ([`TopLayers::digest`] hashes 14 MB: compute it once per version, see [`is_tuned_fingerprint`].)
pub fn tuned_fingerprint(base: &str, tuned: &TopLayers) -> String {
    format!("{base} tuned:{}", tuned.digest())
}

/// Whether `stored` is [`tuned_fingerprint`] of `base` and the layers whose digest is `digest`.
pub fn is_tuned_fingerprint(stored: &str, base: &str, digest: &str) -> bool {
    after_tuned_fingerprint(stored, base, digest) == Some("")
}

/// What follows [`tuned_fingerprint`] of `base` and `digest` in `stored` (empty when `stored`
/// is exactly that; ` + <companion>` when a companion's vectors were joined, see
/// [`encoder::companion_of_joined`](super::encoder::companion_of_joined)), or `None` when
/// `stored` does not start with it. Allocates nothing.
pub fn after_tuned_fingerprint<'a>(stored: &'a str, base: &str, digest: &str) -> Option<&'a str> {
    stored
        .strip_prefix(base)
        .and_then(|rest| rest.strip_prefix(" tuned:"))
        .and_then(|rest| rest.strip_prefix(digest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::model_file;

    fn layers() -> TopLayers {
        TopLayers::from_safetensors(&model_file("model.fp32.safetensors"), 4, 2, 12)
            .expect("the fp32 weights (models/fetch)")
    }

    #[test]
    fn heads_alone_are_stored_unchanged_and_tuned_layers_round_trip() {
        let heads = b"SBSR and the rest of a head record".to_vec();
        assert_eq!(encode(&heads, None), heads);
        let (read, tuned) = decode(&heads).unwrap();
        assert_eq!((read, tuned.is_none()), (heads.as_slice(), true));

        let layers = layers();
        let record = encode(&heads, Some(&layers));
        assert_eq!(&record[..4], b"SBTL");
        let (read, tuned) = decode(&record).unwrap();
        assert_eq!(read, heads.as_slice());
        let tuned = tuned.expect("the layers");
        assert_eq!(tuned.digest(), layers.digest());
        assert_eq!(tuned.first_layer(), 4);
        let fingerprint = tuned_fingerprint("model.split.onnx sha256:ab", &tuned);
        assert_eq!(
            fingerprint,
            format!("model.split.onnx sha256:ab tuned:{}", layers.digest())
        );
        assert!(is_tuned_fingerprint(
            &fingerprint,
            "model.split.onnx sha256:ab",
            &layers.digest()
        ));
        assert!(!is_tuned_fingerprint(
            &fingerprint,
            "model.onnx sha256:ab",
            &layers.digest()
        ));
        assert!(!is_tuned_fingerprint(
            &fingerprint,
            "model.split.onnx sha256:ab",
            "0123456789abcdef"
        ));
        // Joined with a companion's vectors: the companion's fingerprint follows.
        let joined =
            crate::engine::encoder::joined_fingerprint(&fingerprint, "companion sha256:cd");
        assert!(!is_tuned_fingerprint(
            &joined,
            "model.split.onnx sha256:ab",
            &layers.digest()
        ));
        let rest = after_tuned_fingerprint(&joined, "model.split.onnx sha256:ab", &layers.digest());
        assert_eq!(rest, Some(" + companion sha256:cd"));
        assert_eq!(
            rest.and_then(crate::engine::encoder::companion_of_joined),
            Some("companion sha256:cd")
        );
    }

    #[test]
    fn malformed_records_are_errors_not_panics() {
        let layers = layers();
        let record = encode(b"heads", Some(&layers));
        // Too short for the header.
        assert!(matches!(
            decode(&record[..10]),
            Err(TrainedError::Malformed(_))
        ));
        // Another format version.
        let mut other = record.clone();
        other[4] = 9;
        assert!(matches!(decode(&other), Err(TrainedError::Version(9))));
        // A length past the end.
        let mut long = record.clone();
        long[8..16].copy_from_slice(&(u64::MAX).to_le_bytes());
        assert!(matches!(decode(&long), Err(TrainedError::Malformed(_))));
        // Layers cut short.
        let cut = [&record[..16], &record[16 + 100..]].concat();
        let mut lying = cut.clone();
        lying[8..16].copy_from_slice(&((record.len() - 16 - 100) as u64).to_le_bytes());
        assert!(decode(&lying).is_err());
    }
}
