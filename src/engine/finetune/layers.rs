//! [`TopLayers`]: the weights of N consecutive BERT layers, loaded from a safetensors export,
//! (de)serialised to a versioned little-endian byte format, and run on one sequence.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::math::{self, Layout, Seq};
use super::FineTuneError;

/// First bytes of [`TopLayers::to_bytes`].
pub const MAGIC: &[u8; 8] = b"SBTOPLYR";
/// Version of the byte format written by [`TopLayers::to_bytes`].
pub const FORMAT_VERSION: u32 = 1;
/// Header: magic, version, first layer, count, hidden, intermediate, heads (six u32 after the magic).
const HEADER_LEN: usize = 8 + 6 * 4;
/// Refuse sizes beyond this (a hostile header must not make us allocate terabytes).
const MAX_WIDTH: usize = 1 << 16;
const MAX_LAYERS: usize = 1 << 10;

/// The weights of `count` consecutive post-LayerNorm BERT layers, in `f32`: per layer one flat
/// vector laid out as [`Layout`] describes (dense weights `[in, out]`, the transpose of the
/// PyTorch tensors; query/key/value fused into one `[h, 3h]` matrix).
#[derive(Clone, Debug, PartialEq)]
pub struct TopLayers {
    pub(crate) first_layer: usize,
    pub(crate) count: usize,
    pub(crate) heads: usize,
    pub(crate) layout: Layout,
    /// `count · layout.len()` values, layer after layer.
    pub(crate) params: Vec<f32>,
}

/// The safetensors key suffixes for each parameter kind (query, key and value are fused).
const KEY_PARTS: [&str; 8] = [
    "attention.output.dense",
    "attention.output.LayerNorm",
    "intermediate.dense",
    "output.dense",
    "output.LayerNorm",
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
];

impl TopLayers {
    /// Reads layers `first_layer .. first_layer + count` of a BERT encoder from an fp32
    /// safetensors file (keys `encoder.layer.{L}.…`, or with a `bert.` prefix). Hidden and
    /// intermediate sizes come from the tensor shapes; `heads` must divide the hidden size.
    pub fn from_safetensors(
        path: &Path,
        first_layer: usize,
        count: usize,
        heads: usize,
    ) -> Result<TopLayers, FineTuneError> {
        let io = |source| FineTuneError::Io {
            path: path.to_path_buf(),
            source,
        };
        let bytes = std::fs::read(path).map_err(io)?;
        let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
            FineTuneError::Safetensors {
                path: path.to_path_buf(),
                message: e.to_string(),
            }
        })?;
        if count == 0 {
            return Err(FineTuneError::InvalidConfig("zero layers requested".into()));
        }
        let names = file.names();
        let prefix = if names.iter().any(|n| n.starts_with("bert.encoder.")) {
            "bert."
        } else {
            ""
        };
        let tensor =
            |key: &str, shape: Option<&[usize]>| -> Result<(Vec<f32>, Vec<usize>), FineTuneError> {
                let full = format!("{prefix}{key}");
                let view = file
                    .tensor(&full)
                    .map_err(|_| FineTuneError::MissingTensor {
                        path: path.to_path_buf(),
                        key: full.clone(),
                    })?;
                let bad = |message: String| FineTuneError::BadTensor {
                    path: path.to_path_buf(),
                    key: full.clone(),
                    message,
                };
                if view.dtype() != safetensors::Dtype::F32 {
                    return Err(bad(format!("dtype {:?}, expected F32", view.dtype())));
                }
                if let Some(shape) = shape {
                    if view.shape() != shape {
                        return Err(bad(format!(
                            "shape {:?}, expected {:?}",
                            view.shape(),
                            shape
                        )));
                    }
                }
                let values = view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                Ok((values, view.shape().to_vec()))
            };
        let (_, q_shape) = tensor(
            &format!("encoder.layer.{first_layer}.attention.self.query.weight"),
            None,
        )?;
        let (_, i_shape) = tensor(
            &format!("encoder.layer.{first_layer}.intermediate.dense.weight"),
            None,
        )?;
        let (hidden, intermediate) = match (q_shape.as_slice(), i_shape.as_slice()) {
            ([a, b], [i, c]) if a == b && c == a && *a > 0 && *i > 0 => (*a, *i),
            _ => {
                return Err(FineTuneError::InvalidConfig(format!(
                    "query weight {q_shape:?} and intermediate weight {i_shape:?} are not [h, h] and [i, h]"
                )))
            }
        };
        let layout = Layout {
            hidden,
            intermediate,
        };
        check_heads(hidden, heads)?;
        let (h, i) = (hidden, intermediate);
        let mut params = Vec::with_capacity(count * layout.len());
        for layer in first_layer..first_layer + count {
            let key = |part: &str, what: &str| format!("encoder.layer.{layer}.{part}.{what}");
            let get =
                |part: &str, what: &str, shape: &[usize]| -> Result<Vec<f32>, FineTuneError> {
                    Ok(tensor(&key(part, what), Some(shape))?.0)
                };
            // Query, key and value: [out, in] each, stored fused and transposed as [h, 3h].
            let qkv = [
                get(KEY_PARTS[5], "weight", &[h, h])?,
                get(KEY_PARTS[6], "weight", &[h, h])?,
                get(KEY_PARTS[7], "weight", &[h, h])?,
            ];
            for k in 0..h {
                for w in &qkv {
                    params.extend((0..h).map(|o| w[o * h + k]));
                }
            }
            for part in &KEY_PARTS[5..] {
                params.extend(get(part, "bias", &[h])?);
            }
            push_transposed(&mut params, &get(KEY_PARTS[0], "weight", &[h, h])?, h, h);
            params.extend(get(KEY_PARTS[0], "bias", &[h])?);
            params.extend(get(KEY_PARTS[1], "weight", &[h])?);
            params.extend(get(KEY_PARTS[1], "bias", &[h])?);
            push_transposed(&mut params, &get(KEY_PARTS[2], "weight", &[i, h])?, i, h);
            params.extend(get(KEY_PARTS[2], "bias", &[i])?);
            push_transposed(&mut params, &get(KEY_PARTS[3], "weight", &[h, i])?, h, i);
            params.extend(get(KEY_PARTS[3], "bias", &[h])?);
            params.extend(get(KEY_PARTS[4], "weight", &[h])?);
            params.extend(get(KEY_PARTS[4], "bias", &[h])?);
        }
        debug_assert_eq!(params.len(), count * layout.len());
        Ok(TopLayers {
            first_layer,
            count,
            heads,
            layout,
            params,
        })
    }

    /// Index (in the whole encoder) of the first of these layers.
    pub fn first_layer(&self) -> usize {
        self.first_layer
    }

    /// Number of layers.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Hidden size (width of a token's state).
    pub fn hidden(&self) -> usize {
        self.layout.hidden
    }

    /// Intermediate (feed-forward) size.
    pub fn intermediate(&self) -> usize {
        self.layout.intermediate
    }

    /// Number of attention heads.
    pub fn heads(&self) -> usize {
        self.heads
    }

    pub(crate) fn layer(&self, index: usize) -> &[f32] {
        let len = self.layout.len();
        &self.params[index * len..(index + 1) * len]
    }

    /// Magic `SBTOPLYR`, then little-endian u32 format version, first layer, count, hidden,
    /// intermediate, heads, then every layer's `f32` parameters in [`Layout`] order (dense
    /// weights `[in, out]`).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 4 * self.params.len());
        out.extend_from_slice(MAGIC);
        for v in [
            FORMAT_VERSION as usize,
            self.first_layer,
            self.count,
            self.layout.hidden,
            self.layout.intermediate,
            self.heads,
        ] {
            out.extend_from_slice(&(v as u32).to_le_bytes());
        }
        for v in &self.params {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Parses [`TopLayers::to_bytes`]'s format; any malformed input is an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<TopLayers, FineTuneError> {
        if bytes.len() < HEADER_LEN {
            return Err(FineTuneError::Truncated {
                expected: HEADER_LEN,
                actual: bytes.len(),
            });
        }
        if &bytes[..8] != MAGIC {
            return Err(FineTuneError::BadMagic);
        }
        let word = |i: usize| {
            let at = 8 + 4 * i;
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize
        };
        let version = word(0) as u32;
        if version != FORMAT_VERSION {
            return Err(FineTuneError::UnsupportedVersion(version));
        }
        let (first_layer, count, hidden, intermediate, heads) =
            (word(1), word(2), word(3), word(4), word(5));
        if count == 0 || count > MAX_LAYERS {
            return Err(FineTuneError::InvalidConfig(format!("{count} layers")));
        }
        if hidden == 0 || hidden > MAX_WIDTH || intermediate == 0 || intermediate > MAX_WIDTH {
            return Err(FineTuneError::InvalidConfig(format!(
                "hidden {hidden}, intermediate {intermediate}"
            )));
        }
        check_heads(hidden, heads)?;
        let layout = Layout {
            hidden,
            intermediate,
        };
        let expected = count
            .checked_mul(layout.len())
            .and_then(|n| n.checked_mul(4))
            .and_then(|n| n.checked_add(HEADER_LEN))
            .ok_or_else(|| FineTuneError::InvalidConfig("sizes overflow".into()))?;
        if bytes.len() != expected {
            return Err(FineTuneError::Truncated {
                expected,
                actual: bytes.len(),
            });
        }
        let params: Vec<f32> = bytes[HEADER_LEN..]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if params.iter().any(|v| !v.is_finite()) {
            return Err(FineTuneError::InvalidConfig(
                "a weight is not finite".into(),
            ));
        }
        Ok(TopLayers {
            first_layer,
            count,
            heads,
            layout,
            params,
        })
    }

    /// The element-wise mean of the weights of `runs`, all trained from the same starting
    /// layers (same layers, heads and sizes): a uniform "model soup".
    pub fn average(runs: &[TopLayers]) -> Result<TopLayers, FineTuneError> {
        let Some(first) = runs.first() else {
            return Err(FineTuneError::InvalidConfig("no layers to average".into()));
        };
        let mut mean = first.clone();
        for other in &runs[1..] {
            if (
                other.first_layer,
                other.count,
                other.heads,
                other.layout,
                other.params.len(),
            ) != (
                first.first_layer,
                first.count,
                first.heads,
                first.layout,
                first.params.len(),
            ) {
                return Err(FineTuneError::InvalidConfig(
                    "cannot average layers of different shapes".into(),
                ));
            }
            for (m, v) in mean.params.iter_mut().zip(&other.params) {
                *m += v;
            }
        }
        let k = 1.0 / runs.len() as f32;
        mean.params.iter_mut().for_each(|m| *m *= k);
        Ok(mean)
    }

    /// First 16 hex digits of the SHA-256 of [`TopLayers::to_bytes`].
    pub fn digest(&self) -> String {
        let hash = Sha256::digest(self.to_bytes());
        hash.iter().take(8).map(|b| format!("{b:02x}")).collect()
    }

    /// Runs the layers on one sequence's input states (`[tokens, hidden]` row-major, unpadded)
    /// and writes its mean-pooled, unit-length vector (`hidden` long) to `out`.
    ///
    /// # Panics
    /// If `states.len() != tokens · hidden`, `tokens == 0` or `out.len() != hidden`.
    pub fn embed_sequence(
        &self,
        states: &[f32],
        tokens: usize,
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        let h = self.layout.hidden;
        assert!(tokens > 0, "embed_sequence: empty sequence");
        assert_eq!(
            states.len(),
            tokens * h,
            "embed_sequence: states is not [tokens, hidden]"
        );
        assert_eq!(out.len(), h, "embed_sequence: out is not hidden long");
        let seqs = [Seq { start: 0, tokens }];
        let acts = &mut scratch.activations;
        math::sized(&mut acts.input, tokens * h).copy_from_slice(states);
        for layer in 0..self.count {
            if layer > 0 {
                std::mem::swap(&mut acts.input, &mut acts.output);
            }
            let p = math::split(self.layer(layer), self.layout);
            math::forward_layer(
                &p,
                self.layout,
                self.heads,
                &seqs,
                tokens,
                acts,
                math::Kernel::Streamed,
            );
        }
        mean_unit(&acts.output[..tokens * h], tokens, out);
    }
}

/// `out` = mean of the `tokens` rows of `rows`, divided by its L2 norm; returns that norm.
pub(crate) fn mean_unit(rows: &[f32], tokens: usize, out: &mut [f32]) -> f32 {
    out.fill(0.0);
    for row in rows.chunks_exact(out.len()).take(tokens) {
        for (o, v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
    let inv_n = 1.0 / tokens as f32;
    let norm = out
        .iter()
        .map(|v| v * v * inv_n * inv_n)
        .sum::<f32>()
        .sqrt();
    let k = inv_n / norm.max(f32::MIN_POSITIVE);
    for o in out.iter_mut() {
        *o *= k;
    }
    norm
}

/// Appends the `[out, in]` matrix `w` transposed, i.e. as `[in, out]`.
fn push_transposed(params: &mut Vec<f32>, w: &[f32], out: usize, inp: usize) {
    for k in 0..inp {
        params.extend((0..out).map(|o| w[o * inp + k]));
    }
}

fn check_heads(hidden: usize, heads: usize) -> Result<(), FineTuneError> {
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(FineTuneError::InvalidConfig(format!(
            "{heads} heads do not divide hidden size {hidden}"
        )));
    }
    Ok(())
}

/// Reusable buffers for [`TopLayers::embed_sequence`]; grows to the longest sequence seen.
#[derive(Default)]
pub struct Scratch {
    activations: math::LayerActivations,
}
