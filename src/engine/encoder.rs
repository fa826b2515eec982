//! Sentence encoder: text in, one L2-normalised embedding per text out.
//!
//! An [`Encoder`] owns one ONNX Runtime session and one Hugging Face tokenizer. It works with any
//! ONNX sentence encoder whose graph takes `input_ids` and `attention_mask` (and optionally
//! `token_type_ids`), all int64 `[batch, sequence]`, and returns a float32
//! `[batch, sequence, dim]` hidden state (the output named `last_hidden_state`, or the only
//! rank-3 float output). The embedding of a text is the mean of its token states over the
//! attention mask, scaled to unit length, exactly what sentence-transformers does for
//! all-MiniLM-L6-v2.
//!
//! Invariants:
//! - Every returned vector has `dim()` elements and unit L2 norm (for tokenizers that add
//!   special tokens, as BERT's do, no sequence is empty; one that is gives a zero vector).
//! - Row `i` of a result is the embedding of text `i`, whatever batch it was computed in: a
//!   batch is sorted by token count and split into model calls of similar lengths, each padded
//!   to its own longest sequence (never to a fixed length); masked positions are excluded from
//!   the mean, so padding does not change an embedding.
//! - The session's threads are fixed at load time. The token buffers grow to the largest call
//!   seen and are reused ([`Encoder::release_buffers`] gives them back); each call still
//!   allocates its tokenizer encodings and the ONNX Runtime output.
//! - [`Encoder::fingerprint`] names the model and tokenizer by the sha256 of their files, so
//!   vectors stored by one encoder are never scored against queries embedded by another.
//! - ONNX Runtime is loaded dynamically from the library path given at load time. The library
//!   and its environment are process-wide: every encoder in a process must name the same file.
//!
//! A model may also expose the hidden states of an inner layer as a second output (models/fetch
//! builds `model.split.onnx`, the `en` model with layer 4's output added). Such an encoder can
//! embed with *tuned top layers* ([`Encoder::encode_tuned_into`]): ONNX Runtime runs the frozen
//! lower layers only (it prunes the rest), and [`TopLayers`] (fine-tuned at import time,
//! `engine::finetune`) runs the top ones and pools. Without tuned layers such a model embeds
//! exactly as the original file does (a run asks for `last_hidden_state` alone).
//!
//! An encoder may carry a *companion* ([`Encoder::with_companion`]): a second model whose
//! embedding of the same text is appended to this one's, each half scaled by 1/√2. The result
//! is still one unit-length vector (width = the sum of the two widths), and the cosine of two
//! such vectors is the mean of the two models' cosines, so everything downstream (neighbour
//! search, the trained head, the caches, `min_similarity`) works unchanged. On BANKING77,
//! all-MiniLM-L6-v2 with multilingual-e5-small as companion lifts top-1 from 93.6% to 94.2%
//! for a second model run per query (models/README.md); on Chinese it hurts (the English
//! model's vocabulary has no Chinese), so the multilingual profile runs without one.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::session::builder::GraphOptimizationLevel;
use ort::session::{HasSelectedOutputs, OutputSelector, RunOptions, Session, SessionInputValue};
use ort::value::{TensorElementType, TensorRef, ValueType};
use tokenizers::{Tokenizer, TruncationParams};

use super::finetune::{Scratch as TunedScratch, TopLayers};

/// Why an encoder could not be loaded or could not encode.
#[derive(Debug, thiserror::Error)]
pub enum EncoderError {
    #[error("{what} not found at {path} (run models/fetch to provision the model files)")]
    MissingFile { what: &'static str, path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not load the ONNX Runtime library {path}: {message}")]
    RuntimeLoad { path: PathBuf, message: String },
    #[error(
        "ONNX Runtime is already loaded from {loaded} in this process; cannot also load {requested}"
    )]
    RuntimeMismatch { loaded: PathBuf, requested: PathBuf },
    #[error("could not load the ONNX model {path}: {source}")]
    Model { path: PathBuf, source: ort::Error },
    #[error("the ONNX model {path} is not a supported sentence encoder: {reason}")]
    UnsupportedModel { path: PathBuf, reason: String },
    #[error("could not load the tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("invalid encoder setting: {0}")]
    InvalidSetting(String),
    #[error("could not tokenize text #{index}: {message}")]
    Tokenize { index: usize, message: String },
    #[error("inference failed: {0}")]
    Inference(#[from] ort::Error),
    #[error("the model returned an unexpected output: {0}")]
    BadOutput(String),
}

/// The process-wide ONNX Runtime environment, and the library file it came from.
struct Runtime {
    library: PathBuf,
    environment: ort::environment::Environment,
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
/// Serialises the first load only; never touched once `RUNTIME` is set.
static RUNTIME_INIT: Mutex<()> = Mutex::new(());

fn runtime(library: &Path) -> Result<&'static Runtime, EncoderError> {
    let canonical = std::fs::canonicalize(library).map_err(|_| EncoderError::MissingFile {
        what: "ONNX Runtime library",
        path: library.to_path_buf(),
    })?;
    let check = |rt: &'static Runtime| {
        if rt.library == canonical {
            Ok(rt)
        } else {
            Err(EncoderError::RuntimeMismatch {
                loaded: rt.library.clone(),
                requested: canonical.clone(),
            })
        }
    };
    if let Some(rt) = RUNTIME.get() {
        return check(rt);
    }
    let _guard = RUNTIME_INIT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(rt) = RUNTIME.get() {
        return check(rt);
    }
    let load_error = |message: String| EncoderError::RuntimeLoad {
        path: canonical.clone(),
        message,
    };
    let environment = ort::init_from(&canonical)
        .map_err(|e| load_error(e.to_string()))?
        .with_name("switchboard")
        .with_telemetry(false)
        .build()
        .map_err(|e| load_error(e.to_string()))?;
    let rt = RUNTIME.get_or_init(|| Runtime {
        library: canonical.clone(),
        environment,
    });
    Ok(rt)
}

/// Embeddings of a batch, row-major: row `i` is `data[i * dim..(i + 1) * dim]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    pub dim: usize,
    pub data: Vec<f32>,
}

impl Embeddings {
    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.data.len().checked_div(self.dim).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The `i`-th vector.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
}

/// Share of unknown tokens above which `kb import` warns that the model does not fit the
/// knowledge base's language.
pub const UNKNOWN_TOKEN_WARNING_SHARE: f64 = 0.05;

/// How well a tokenizer's vocabulary covers some texts: of `tokens` (special tokens excluded),
/// `unknown` became the tokenizer's unknown token (`[UNK]`, `<unk>`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VocabularyCoverage {
    pub texts: usize,
    pub tokens: usize,
    pub unknown: usize,
}

impl VocabularyCoverage {
    /// Unknown tokens over all tokens, 0 without tokens.
    pub fn unknown_share(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.unknown as f64 / self.tokens as f64
        }
    }

    /// The warning `kb import` prints when more than [`UNKNOWN_TOKEN_WARNING_SHARE`] of the
    /// tokens are unknown: the figures, what it does to answers, and the profile that fits.
    pub fn warning(&self, tokenizer: &Path) -> Option<String> {
        if self.unknown_share() <= UNKNOWN_TOKEN_WARNING_SHARE {
            return None;
        }
        Some(format!(
            "{:.1}% of the knowledge base's tokens ({} of {}, in {} questions) are unknown to the \
             tokenizer {}: the model cannot tell those questions apart, so answers will be \
             poor. The knowledge base is probably in a language the model does not cover \
             (the en profile, all-MiniLM-L6-v2, knows almost no Chinese). Use the multilingual \
             profile: run `models/fetch --profile multilingual`, set [inference] model = \
             \"models/cache/multilingual-e5-small.onnx\", tokenizer = \
             \"models/cache/multilingual-e5-small.tokenizer.json\", text_prefix = \"query: \" \
             and no companion_model (see models/README.md), and import again.",
            100.0 * self.unknown_share(),
            self.unknown,
            self.tokens,
            self.texts,
            tokenizer.display()
        ))
    }
}

/// Largest share of padding cells (relative to real tokens) one model call may carry; a batch
/// whose lengths differ more is split into calls of similar lengths.
pub const MAX_PADDING: f32 = 0.25;

/// Scale of each half of a vector made with a companion: two unit vectors scaled by this make
/// one unit vector.
const HALF_SCALE: f32 = std::f32::consts::FRAC_1_SQRT_2;

/// One ONNX sentence-encoder session plus its tokenizer (and optionally a companion encoder).
pub struct Encoder {
    session: Session,
    fingerprint: String,
    tokenizer: Tokenizer,
    output_index: usize,
    uses_token_type_ids: bool,
    /// Embedding width; known from the model's output shape or from the first run.
    dim: Option<usize>,
    max_sequence_length: usize,
    /// Prepended to every text before tokenizing (e5 models expect `"query: "`).
    text_prefix: String,
    ids: Vec<i64>,
    mask: Vec<i64>,
    type_ids: Vec<i64>,
    /// A second model whose vectors are appended to this one's (see the module documentation).
    companion: Option<Box<Encoder>>,
    /// This model's own fingerprint (without the companion's).
    own_fingerprint: String,
    /// The inner-layer output, when the model has one (see the module documentation).
    split: Option<SplitOutput>,
    /// Buffers of the tuned top layers (empty until used, released with the token buffers).
    tuned_scratch: TunedScratch,
}

/// A model's second, inner-layer output and the run options that ask for one output only.
struct SplitOutput {
    name: String,
    /// Asks for `last_hidden_state` alone (the whole model runs).
    full_run: RunOptions<HasSelectedOutputs>,
    /// Asks for the inner output alone (ONNX Runtime skips the layers above it).
    split_run: RunOptions<HasSelectedOutputs>,
}

/// Which output a model call reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    Last,
    Split,
}

/// Which part of an encoder with a companion embeds a text (see [`Encoder::encode_part`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// Both models, vectors joined (the encoder's [`dim`](Encoder::dim)); the primary alone
    /// when there is no companion.
    Joined,
    /// The primary model alone ([`primary_dim`](Encoder::primary_dim), unit length).
    Primary,
    /// The companion alone (unit length); an error without a companion.
    Companion,
}

/// The fingerprint of vectors joined from a primary part fingerprinted `primary` and a
/// companion's part fingerprinted `companion`: `<primary> + <companion>`.
pub fn joined_fingerprint(primary: &str, companion: &str) -> String {
    format!("{primary} + {companion}")
}

/// The companion's fingerprint, if `rest` (what follows the primary part of a stored
/// fingerprint) names one: the inverse of [`joined_fingerprint`].
pub fn companion_of_joined(rest: &str) -> Option<&str> {
    rest.strip_prefix(" + ")
}

/// Appends to `out` each row of `first` (`first_dim` wide) followed by the same row of
/// `second` (`second_dim` wide), both scaled by 1/√2: two unit vectors joined into one unit
/// vector whose cosine with another joined vector is the mean of the two parts' cosines.
pub fn join_parts(
    first: &[f32],
    first_dim: usize,
    second: &[f32],
    second_dim: usize,
    out: &mut Vec<f32>,
) {
    out.reserve(first.len() + second.len());
    for (a, b) in first
        .chunks_exact(first_dim.max(1))
        .zip(second.chunks_exact(second_dim.max(1)))
    {
        out.extend(a.iter().chain(b).map(|x| x * HALF_SCALE));
    }
}

impl Encoder {
    /// Loads ONNX Runtime from `ort_library` (once per process), the model and the tokenizer.
    ///
    /// `threads` is the session's intra-op thread count (1 for a worker pinned next to a shard);
    /// texts longer than `max_sequence_length` tokens (special tokens included) are truncated.
    pub fn load(
        model: &Path,
        tokenizer: &Path,
        ort_library: &Path,
        threads: usize,
        max_sequence_length: usize,
    ) -> Result<Encoder, EncoderError> {
        if threads == 0 {
            return Err(EncoderError::InvalidSetting(
                "threads must be at least 1".into(),
            ));
        }
        if max_sequence_length < 2 {
            return Err(EncoderError::InvalidSetting(
                "max_sequence_length must be at least 2 (room for the special tokens)".into(),
            ));
        }
        for (what, path) in [("model", model), ("tokenizer", tokenizer)] {
            if !path.is_file() {
                return Err(EncoderError::MissingFile {
                    what,
                    path: path.to_path_buf(),
                });
            }
        }
        // Hashing the files and parsing the tokenizer (17 MB for a 250,000-piece multilingual
        // vocabulary) run on their own thread while the session is created: a cold start
        // costs the longest of them, not their sum.
        let tokenizer_path = tokenizer;
        let side = std::thread::scope(|scope| {
            let side = scope.spawn(move || -> Result<_, EncoderError> {
                let fingerprint = fingerprint(model, tokenizer_path)?;
                let tokenizer = load_tokenizer(tokenizer_path, max_sequence_length)?;
                Ok((fingerprint, tokenizer))
            });
            let session = Self::create_session(model, ort_library, threads);
            let side = side
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            session.map(|session| (session, side))
        });
        let (session, side) = side?;
        let (fingerprint, tokenizer) = side?;
        Self::from_session(model, session, fingerprint, tokenizer, max_sequence_length)
    }

    /// Loads ONNX Runtime (once per process) and creates the model's session.
    fn create_session(
        model: &Path,
        ort_library: &Path,
        threads: usize,
    ) -> Result<Session, EncoderError> {
        let rt = runtime(ort_library)?;
        let model_error = |source: ort::Error| EncoderError::Model {
            path: model.to_path_buf(),
            source,
        };
        Session::builder(&rt.environment)
            .map_err(model_error)?
            .with_intra_threads(threads)
            .map_err(|e| model_error(e.into()))?
            .with_inter_threads(1)
            .map_err(|e| model_error(e.into()))?
            .with_intra_op_spinning(false)
            .map_err(|e| model_error(e.into()))?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| model_error(e.into()))?
            .commit_from_file(model)
            .map_err(model_error)
    }

    /// Checks the session's inputs and outputs and builds the encoder.
    fn from_session(
        model: &Path,
        session: Session,
        fingerprint: String,
        tokenizer: Tokenizer,
        max_sequence_length: usize,
    ) -> Result<Encoder, EncoderError> {
        let unsupported = |reason: String| EncoderError::UnsupportedModel {
            path: model.to_path_buf(),
            reason,
        };
        let mut uses_token_type_ids = false;
        for required in ["input_ids", "attention_mask"] {
            if !session.inputs().iter().any(|i| i.name() == required) {
                return Err(unsupported(format!("it has no `{required}` input")));
            }
        }
        for input in session.inputs() {
            match input.name() {
                "input_ids" | "attention_mask" => {}
                "token_type_ids" => uses_token_type_ids = true,
                other => return Err(unsupported(format!("unexpected input `{other}`"))),
            }
            if !matches!(
                input.dtype(),
                ValueType::Tensor {
                    ty: TensorElementType::Int64,
                    ..
                }
            ) {
                return Err(unsupported(format!(
                    "input `{}` is not int64",
                    input.name()
                )));
            }
        }
        let rank3_float = |t: &ValueType| matches!(t, ValueType::Tensor { ty: TensorElementType::Float32, shape, .. } if shape.len() == 3);
        let outputs = session.outputs();
        let output_index = outputs
            .iter()
            .position(|o| o.name() == "last_hidden_state")
            .or_else(|| {
                let mut candidates = outputs.iter().enumerate().filter(|(_, o)| rank3_float(o.dtype()));
                match (candidates.next(), candidates.next()) {
                    (Some((i, _)), None) => Some(i),
                    _ => None,
                }
            })
            .ok_or_else(|| {
                unsupported("no `last_hidden_state` output and no single float [batch, sequence, dim] output".into())
            })?;
        // A second float [batch, sequence, hidden] output next to `last_hidden_state`: the
        // inner layer tuned top layers start from.
        let split_name = (outputs[output_index].name() == "last_hidden_state")
            .then(|| {
                outputs
                    .iter()
                    .enumerate()
                    .find(|(i, o)| *i != output_index && rank3_float(o.dtype()))
                    .map(|(_, o)| o.name().to_owned())
            })
            .flatten();
        let split = match split_name {
            Some(name) => {
                let options =
                    |output: &str| -> Result<RunOptions<HasSelectedOutputs>, EncoderError> {
                        Ok(RunOptions::new()?
                            .with_outputs(OutputSelector::no_default().with(output)))
                    };
                Some(SplitOutput {
                    full_run: options("last_hidden_state")?,
                    split_run: options(&name)?,
                    name,
                })
            }
            None => None,
        };
        let dim = match outputs[output_index].dtype() {
            ValueType::Tensor {
                ty: TensorElementType::Float32,
                shape,
                ..
            } if shape.len() == 3 => usize::try_from(shape[2]).ok().filter(|&d| d > 0),
            _ => {
                return Err(unsupported(
                    "`last_hidden_state` is not float [batch, sequence, dim]".into(),
                ))
            }
        };
        Ok(Encoder {
            session,
            own_fingerprint: fingerprint.clone(),
            fingerprint,
            tokenizer,
            output_index,
            uses_token_type_ids,
            dim,
            max_sequence_length,
            text_prefix: String::new(),
            ids: Vec::new(),
            mask: Vec::new(),
            type_ids: Vec::new(),
            companion: None,
            split,
            tuned_scratch: TunedScratch::default(),
        })
    }

    /// The name of the inner-layer output tuned top layers start from, if the model has one.
    pub fn split_output(&self) -> Option<&str> {
        self.split.as_ref().map(|split| split.name.as_str())
    }

    /// Appends `companion`'s embedding of every text to this encoder's (each half scaled by
    /// 1/√2, see the module documentation). The fingerprint names both models, so vectors
    /// stored with and without a companion are never mixed. `companion` must not have one.
    pub fn with_companion(mut self, companion: Encoder) -> Result<Self, EncoderError> {
        self.attach_companion(companion)?;
        Ok(self)
    }

    /// [`with_companion`](Self::with_companion) in place.
    pub fn attach_companion(&mut self, companion: Encoder) -> Result<(), EncoderError> {
        if companion.companion.is_some() || self.companion.is_some() {
            return Err(EncoderError::InvalidSetting(
                "an encoder takes at most one companion".into(),
            ));
        }
        self.fingerprint = joined_fingerprint(&self.own_fingerprint, &companion.fingerprint);
        self.companion = Some(Box::new(companion));
        Ok(())
    }

    /// The companion encoder, if any.
    pub fn companion(&self) -> Option<&Encoder> {
        self.companion.as_deref()
    }

    /// The companion encoder, mutably (to embed with it alone), if any.
    pub fn companion_mut(&mut self) -> Option<&mut Encoder> {
        self.companion.as_deref_mut()
    }

    /// Removes and returns the companion (the fingerprint goes back to this model's own).
    pub fn take_companion(&mut self) -> Option<Encoder> {
        let companion = self.companion.take()?;
        self.fingerprint = self.own_fingerprint.clone();
        Some(*companion)
    }

    /// The fingerprint of this model alone (with its prefix), without the companion's.
    pub fn primary_fingerprint(&self) -> &str {
        &self.own_fingerprint
    }

    /// Width of this model's own vectors (without the companion's), if known.
    pub fn primary_dim(&self) -> Option<usize> {
        self.dim
    }

    /// Embeds `texts` with the given [`Part`] and appends the vectors to `out`; returns their
    /// width.
    pub fn encode_part_into(
        &mut self,
        texts: &[&str],
        part: Part,
        out: &mut Vec<f32>,
    ) -> Result<usize, EncoderError> {
        match part {
            Part::Joined => self.encode_batch_into(texts, out),
            Part::Primary => self.encode_own_into(texts, out),
            Part::Companion => match self.companion.as_deref_mut() {
                Some(companion) => companion.encode_own_into(texts, out),
                None => Err(EncoderError::InvalidSetting(
                    "no companion model is loaded".into(),
                )),
            },
        }
    }

    /// Prepends `prefix` to every text before it is tokenized: models trained with an
    /// instruction prefix (multilingual-e5 wants `"query: "` on both sides of a symmetric
    /// match) embed worse without it. A non-empty prefix becomes part of the fingerprint,
    /// since it changes every vector.
    pub fn with_text_prefix(mut self, prefix: &str) -> Self {
        if !prefix.is_empty() {
            self.fingerprint = format!("{} prefix:{prefix:?}", self.fingerprint);
            self.own_fingerprint = format!("{} prefix:{prefix:?}", self.own_fingerprint);
        }
        self.text_prefix = prefix.to_string();
        self
    }

    /// The prefix every text gets before tokenizing (empty for most models).
    pub fn text_prefix(&self) -> &str {
        &self.text_prefix
    }

    /// The tokenizer (for vocabulary checks such as the share of unknown tokens).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Counts the tokens of `texts` that the tokenizer maps to its unknown token (`[UNK]` or
    /// `<unk>`; a tokenizer with neither has none). Special tokens and the text prefix are not
    /// counted.
    pub fn vocabulary_coverage<'a>(
        &self,
        texts: impl IntoIterator<Item = &'a str>,
    ) -> Result<VocabularyCoverage, EncoderError> {
        let unknown_id = ["[UNK]", "<unk>"]
            .iter()
            .find_map(|token| self.tokenizer.token_to_id(token));
        let mut coverage = VocabularyCoverage::default();
        for (index, text) in texts.into_iter().enumerate() {
            let encoding =
                self.tokenizer
                    .encode(text, false)
                    .map_err(|e| EncoderError::Tokenize {
                        index,
                        message: e.to_string(),
                    })?;
            coverage.texts += 1;
            coverage.tokens += encoding.get_ids().len();
            coverage.unknown += encoding
                .get_ids()
                .iter()
                .filter(|&&id| Some(id) == unknown_id)
                .count();
        }
        Ok(coverage)
    }

    /// Names the model: `<model file name> sha256:<16 hex> tokenizer sha256:<16 hex>` (the
    /// start of each file's sha256), plus ` prefix:"…"` when a text prefix is set. Stored with
    /// knowledge-base vectors.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Embedding width, if the model declares it (otherwise known after the first batch); with
    /// a companion, the sum of both widths.
    pub fn dim(&self) -> Option<usize> {
        match &self.companion {
            None => self.dim,
            Some(companion) => Some(self.dim? + companion.dim()?),
        }
    }

    pub fn max_sequence_length(&self) -> usize {
        self.max_sequence_length
    }

    /// Embeds `texts`; row `i` of the result is the embedding of `texts[i]`.
    pub fn encode_batch(&mut self, texts: &[&str]) -> Result<Embeddings, EncoderError> {
        let mut data = Vec::new();
        let dim = self.encode_batch_into(texts, &mut data)?;
        Ok(Embeddings { dim, data })
    }

    /// Embeds `texts` and appends their vectors to `out`, in the order of `texts`; returns the
    /// dimension.
    ///
    /// The texts are sorted by token count and run in as few model calls as possible such that
    /// no call pads more than [`MAX_PADDING`] of its cells: a batch of 16 typical questions
    /// padded to its longest member would be about half padding (measured on BANKING77), and
    /// padding costs as much as real tokens.
    pub fn encode_batch_into(
        &mut self,
        texts: &[&str],
        out: &mut Vec<f32>,
    ) -> Result<usize, EncoderError> {
        let Some(companion) = self.companion.as_deref_mut() else {
            return self.encode_own_into(texts, out);
        };
        if texts.is_empty() {
            return self.dim().ok_or_else(|| {
                EncoderError::InvalidSetting("empty first batch: dimension unknown".into())
            });
        }
        let mut second = Vec::with_capacity(texts.len() * companion.dim.unwrap_or(0));
        let second_dim = companion.encode_batch_into(texts, &mut second)?;
        let mut first = Vec::with_capacity(texts.len() * self.dim.unwrap_or(0));
        let first_dim = self.encode_own_into(texts, &mut first)?;
        join_parts(&first, first_dim, &second, second_dim, out);
        Ok(first_dim + second_dim)
    }

    /// [`encode_batch_into`](Self::encode_batch_into) with this encoder's own model only.
    fn encode_own_into(
        &mut self,
        texts: &[&str],
        out: &mut Vec<f32>,
    ) -> Result<usize, EncoderError> {
        if texts.is_empty() {
            return self.dim.ok_or_else(|| {
                EncoderError::InvalidSetting("empty first batch: dimension unknown".into())
            });
        }
        let base = out.len();
        let mut dim = 0;
        self.run_grouped(texts, Output::Last, |row, states, tokens, width| {
            dim = width;
            let needed = base + (row + 1) * width;
            if out.len() < needed {
                out.resize(needed, 0.0);
            }
            mean_pool(states, tokens, width, &mut out[base + row * width..needed]);
        })?;
        debug_assert_eq!(Some(dim), self.dim);
        Ok(self.dim.expect("set by run_model"))
    }

    /// Embeds `texts` with `tuned` top layers over this model's inner-layer output (own model
    /// only, no companion) and appends the vectors to `out`; returns their width. An error if
    /// the model has no inner output or its width is not the layers'.
    pub fn encode_tuned_into(
        &mut self,
        texts: &[&str],
        tuned: &TopLayers,
        out: &mut Vec<f32>,
    ) -> Result<usize, EncoderError> {
        let width = tuned.hidden();
        let base = out.len();
        out.resize(base + texts.len() * width, 0.0);
        let mut scratch = std::mem::take(&mut self.tuned_scratch);
        let mut mismatch = None;
        let result = self.run_grouped(texts, Output::Split, |row, states, tokens, hidden| {
            if hidden != width {
                mismatch = Some(hidden);
                return;
            }
            let vector = &mut out[base + row * width..base + (row + 1) * width];
            tuned.embed_sequence(&states[..tokens * width], tokens, &mut scratch, vector);
        });
        self.tuned_scratch = scratch;
        result?;
        if let Some(hidden) = mismatch {
            out.truncate(base);
            return Err(EncoderError::BadOutput(format!(
                "the inner output is {hidden} wide but the tuned layers take {width}"
            )));
        }
        Ok(width)
    }

    /// The inner-layer hidden states of every text (`[tokens, hidden]` row-major, unpadded),
    /// in the order of `texts`, computed in batches of `batch_size` texts of similar length;
    /// `progress` gets the number of texts done after each batch. What fine-tuning trains on.
    pub fn inner_states_many(
        &mut self,
        texts: &[&str],
        batch_size: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<f32>>, EncoderError> {
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| (texts[i].len(), i));
        let mut states: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
        let mut chunk: Vec<&str> = Vec::with_capacity(batch_size.max(1));
        let mut done = 0;
        for group in order.chunks(batch_size.max(1)) {
            chunk.clear();
            chunk.extend(group.iter().map(|&i| texts[i]));
            self.run_grouped(&chunk, Output::Split, |row, hidden, tokens, width| {
                states[group[row]] = hidden[..tokens * width].to_vec();
            })?;
            done += group.len();
            progress(done);
        }
        Ok(states)
    }

    /// Tokenizes `texts`, sorts them by token count and runs them in as few model calls as
    /// possible such that no call pads more than [`MAX_PADDING`] of its cells (a batch of 16
    /// typical questions padded to its longest member would be about half padding, measured
    /// on BANKING77, and padding costs as much as real tokens). Calls `each(text index,
    /// states, tokens, width)` with the text's rows of `output` (its `tokens` real positions
    /// first; `width` values per position).
    fn run_grouped(
        &mut self,
        texts: &[&str],
        output: Output,
        mut each: impl FnMut(usize, &[f32], usize, usize),
    ) -> Result<(), EncoderError> {
        if output == Output::Split && self.split.is_none() {
            return Err(EncoderError::InvalidSetting(
                "the model has no inner-layer output (use models/fetch's model.split.onnx)".into(),
            ));
        }
        let mut encodings = Vec::with_capacity(texts.len());
        for (index, text) in texts.iter().enumerate() {
            let encoded = if self.text_prefix.is_empty() {
                self.tokenizer.encode(*text, true)
            } else {
                self.tokenizer
                    .encode(format!("{}{text}", self.text_prefix), true)
            };
            let encoding = encoded.map_err(|e| EncoderError::Tokenize {
                index,
                message: e.to_string(),
            })?;
            encodings.push(encoding);
        }
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| (encodings[i].get_ids().len(), i));
        let mut group_start = 0;
        while group_start < order.len() {
            // Extend the group (ascending lengths, so the last is the longest) while padding
            // stays within the limit.
            let mut tokens = 0usize;
            let mut group_end = group_start;
            while group_end < order.len() {
                let length = encodings[order[group_end]].get_ids().len().max(1);
                let cells = length * (group_end + 1 - group_start);
                let real = tokens + length;
                if group_end > group_start && cells as f32 > real as f32 * (1.0 + MAX_PADDING) {
                    break;
                }
                tokens = real;
                group_end += 1;
            }
            let rows = &order[group_start..group_end];
            self.run_model(&encodings, rows, output, &mut each)?;
            group_start = group_end;
        }
        Ok(())
    }

    /// Runs the model on `encodings[rows]` padded to the longest of them and calls `each` for
    /// every row (see [`run_grouped`](Self::run_grouped)).
    fn run_model(
        &mut self,
        encodings: &[tokenizers::Encoding],
        rows: &[usize],
        output: Output,
        each: &mut impl FnMut(usize, &[f32], usize, usize),
    ) -> Result<(), EncoderError> {
        let batch = rows.len();
        let seq = rows
            .iter()
            .map(|&r| encodings[r].get_ids().len())
            .max()
            .unwrap_or(0)
            .max(1);
        let cells = batch * seq;
        for buffer in [&mut self.ids, &mut self.mask, &mut self.type_ids] {
            buffer.clear();
            buffer.resize(cells, 0);
        }
        for (slot, &r) in rows.iter().enumerate() {
            let encoding = &encodings[r];
            let start = slot * seq;
            let n = encoding.get_ids().len();
            for (dst, &src) in self.ids[start..start + n]
                .iter_mut()
                .zip(encoding.get_ids())
            {
                *dst = i64::from(src);
            }
            let mask = encoding.get_attention_mask();
            for (dst, &src) in self.mask[start..start + n].iter_mut().zip(mask) {
                *dst = i64::from(src);
            }
            let type_ids = encoding.get_type_ids();
            for (dst, &src) in self.type_ids[start..start + n].iter_mut().zip(type_ids) {
                *dst = i64::from(src);
            }
        }

        let shape = [batch as i64, seq as i64];
        let mut inputs: Vec<(&str, SessionInputValue<'_>)> = vec![
            (
                "input_ids",
                TensorRef::from_array_view((shape, self.ids.as_slice()))?.into(),
            ),
            (
                "attention_mask",
                TensorRef::from_array_view((shape, self.mask.as_slice()))?.into(),
            ),
        ];
        if self.uses_token_type_ids {
            inputs.push((
                "token_type_ids",
                TensorRef::from_array_view((shape, self.type_ids.as_slice()))?.into(),
            ));
        }
        let outputs = match (&self.split, output) {
            (None, _) => self.session.run(inputs)?,
            (Some(split), Output::Last) => {
                self.session.run_with_options(inputs, &split.full_run)?
            }
            (Some(split), Output::Split) => {
                self.session.run_with_options(inputs, &split.split_run)?
            }
        };
        let value = match (&self.split, output) {
            (Some(split), Output::Split) => &outputs[split.name.as_str()],
            (Some(_), Output::Last) => &outputs["last_hidden_state"],
            (None, _) => &outputs[self.output_index],
        };
        let (out_shape, hidden) = value.try_extract_tensor::<f32>()?;
        if out_shape.len() != 3
            || out_shape[0] != batch as i64
            || out_shape[1] != seq as i64
            || out_shape[2] <= 0
        {
            return Err(EncoderError::BadOutput(format!(
                "expected shape [{batch}, {seq}, dim], got {out_shape}"
            )));
        }
        let width = out_shape[2] as usize;
        if output == Output::Last {
            match self.dim {
                Some(known) if known != width => {
                    return Err(EncoderError::BadOutput(format!(
                        "dimension changed from {known} to {width}"
                    )))
                }
                _ => self.dim = Some(width),
            }
        }
        for (slot, &r) in rows.iter().enumerate() {
            let tokens = encodings[r].get_ids().len();
            let states = &hidden[slot * seq * width..(slot + 1) * seq * width];
            each(r, states, tokens, width);
        }
        Ok(())
    }

    /// Embeds any number of texts in batches of `batch_size`, grouping texts of similar length
    /// to limit padding; the result is in the order of `texts`. Meant for knowledge-base imports.
    pub fn encode_many(
        &mut self,
        texts: &[&str],
        batch_size: usize,
    ) -> Result<Embeddings, EncoderError> {
        self.encode_many_with_progress(texts, batch_size, &mut |_| {})
    }

    /// [`encode_many`](Self::encode_many), calling `progress` with the number of texts embedded
    /// so far after every batch.
    pub fn encode_many_with_progress(
        &mut self,
        texts: &[&str],
        batch_size: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Embeddings, EncoderError> {
        let batch_size = batch_size.max(1);
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| (texts[i].len(), i));
        let mut sorted = Vec::new();
        let mut dim = self.dim().unwrap_or(0);
        let mut chunk: Vec<&str> = Vec::with_capacity(batch_size);
        for group in order.chunks(batch_size) {
            chunk.clear();
            chunk.extend(group.iter().map(|&i| texts[i]));
            dim = self.encode_batch_into(&chunk, &mut sorted)?;
            progress(sorted.len() / dim.max(1));
        }
        let mut data = vec![0.0f32; texts.len() * dim];
        for (position, &original) in order.iter().enumerate() {
            data[original * dim..(original + 1) * dim]
                .copy_from_slice(&sorted[position * dim..(position + 1) * dim]);
        }
        Ok(Embeddings { dim, data })
    }

    /// Frees the token buffers (they regrow on the next batch). Call when the worker goes idle.
    pub fn release_buffers(&mut self) {
        self.tuned_scratch = TunedScratch::default();
        self.ids = Vec::new();
        self.mask = Vec::new();
        self.type_ids = Vec::new();
        if let Some(companion) = &mut self.companion {
            companion.release_buffers();
        }
    }
}

/// Writes the mean of the first `tokens` rows of `states` (`width` values each), scaled to unit
/// length, into `pooled`. The 1/tokens factor cancels in the normalisation, but it is kept so
/// the intermediate matches the reference pooling numerically.
fn mean_pool(states: &[f32], tokens: usize, width: usize, pooled: &mut [f32]) {
    pooled.fill(0.0);
    for state in states.chunks_exact(width).take(tokens) {
        for (acc, &x) in pooled.iter_mut().zip(state) {
            *acc += x;
        }
    }
    let inv_tokens = 1.0 / tokens.max(1) as f32;
    pooled.iter_mut().for_each(|x| *x *= inv_tokens);
    let norm = pooled.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    pooled.iter_mut().for_each(|x| *x /= norm);
}

/// See [`Encoder::fingerprint`].
fn fingerprint(model: &Path, tokenizer: &Path) -> Result<String, EncoderError> {
    let model_hash = file_sha256(model)?;
    let tokenizer_hash = file_sha256(tokenizer)?;
    let name = model
        .file_name()
        .map_or_else(|| "model".into(), |name| name.to_string_lossy());
    Ok(format!(
        "{name} sha256:{} tokenizer sha256:{}",
        &model_hash[..16],
        &tokenizer_hash[..16]
    ))
}

fn file_sha256(path: &Path) -> Result<String, EncoderError> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let read_error = |source| EncoderError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    let mut hasher = Sha256::new();
    let mut block = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut block).map_err(read_error)?;
        if read == 0 {
            break;
        }
        hasher.update(&block[..read]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect())
}

fn load_tokenizer(path: &Path, max_sequence_length: usize) -> Result<Tokenizer, EncoderError> {
    let error = |message: String| EncoderError::Tokenizer {
        path: path.to_path_buf(),
        message,
    };
    let mut tokenizer = Tokenizer::from_file(path).map_err(|e| error(e.to_string()))?;
    // tokenizer.json files often pad every text to a fixed length; batches are padded here
    // instead, to their own longest member.
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: max_sequence_length,
            ..TruncationParams::default()
        }))
        .map_err(|e| error(e.to_string()))?;
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    //! These tests need the real model: run `models/fetch` first (or point
    //! SWITCHBOARD_MODELS_DIR at a directory holding libonnxruntime.so, model.onnx and
    //! tokenizer.json). They fail, rather than skip, when it is missing.

    use super::*;
    use crate::engine::testing::{load_encoder as load, model_file};

    #[derive(serde::Deserialize)]
    struct Fixture {
        max_sequence_length: usize,
        dim: usize,
        texts: Vec<String>,
        vectors: Vec<Vec<f32>>,
    }

    fn fixture() -> Fixture {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/engine/reference_embeddings.json"
        );
        serde_json::from_slice(&std::fs::read(path).expect("read the reference fixture"))
            .expect("parse the fixture")
    }

    fn max_abs_difference(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn chinese_is_mostly_unknown_to_the_english_tokenizer_and_warned_about() {
        let encoder = load(128);
        let chinese = ["怎么修改密码", "如何申请退款", "可以开发票吗", "运费多少钱"];
        let coverage = encoder.vocabulary_coverage(chinese).unwrap();
        assert_eq!(coverage.texts, 4);
        assert!(coverage.tokens >= 20, "{coverage:?}");
        assert!(coverage.unknown_share() > 0.5, "{coverage:?}");
        let warning = coverage.warning(Path::new("tokenizer.json")).unwrap();
        assert!(warning.contains(&format!("{} of {}", coverage.unknown, coverage.tokens)));
        assert!(warning.contains("--profile multilingual"), "{warning}");

        let english = ["how do I change my password?", "can I get an invoice"];
        let coverage = encoder.vocabulary_coverage(english).unwrap();
        assert_eq!(coverage.unknown, 0, "{coverage:?}");
        assert!(coverage.tokens >= 10);
        assert_eq!(coverage.warning(Path::new("tokenizer.json")), None);
        // The prefix is not counted and does not change the figures.
        let encoder = encoder.with_text_prefix("query: ");
        assert_eq!(encoder.vocabulary_coverage(english).unwrap(), coverage);
        assert!(encoder.fingerprint().ends_with(r#"prefix:"query: ""#));
    }

    /// The multilingual profile (`models/fetch --profile multilingual`): the converted 4-bit
    /// multilingual-e5-small, no `token_type_ids`, with the `"query: "` prefix.
    #[test]
    fn multilingual_profile_tells_chinese_paraphrases_apart() {
        let encoder = Encoder::load(
            &model_file("multilingual-e5-small.onnx"),
            &model_file("multilingual-e5-small.tokenizer.json"),
            &model_file("libonnxruntime.so"),
            1,
            128,
        )
        .expect("load the multilingual encoder");
        let mut encoder = encoder.with_text_prefix("query: ");
        assert_eq!(encoder.dim(), Some(384));
        let stored = ["怎么修改密码", "如何申请退款", "可以开发票吗", "运费多少钱"];
        let asked = [
            "密码怎么重新设置一下",
            "买错了，可以退款吗",
            "发票怎么开",
            "邮费是多少",
        ];
        let stored_vectors = encoder.encode_batch(&stored).unwrap();
        let asked_vectors = encoder.encode_batch(&asked).unwrap();
        for (i, question) in asked.iter().enumerate() {
            let query = asked_vectors.row(i);
            let norm: f32 = query.iter().map(|x| x * x).sum();
            assert!((norm - 1.0).abs() < 1e-4);
            let similarities: Vec<f32> = (0..stored.len())
                .map(|j| dot(query, stored_vectors.row(j)))
                .collect();
            let best = (0..stored.len())
                .max_by(|&a, &b| similarities[a].total_cmp(&similarities[b]))
                .unwrap();
            assert_eq!(best, i, "{question}: {similarities:?}");
        }
        // Chinese is covered by this tokenizer: no unknown tokens, so no warning.
        let coverage = encoder.vocabulary_coverage(stored).unwrap();
        assert_eq!(coverage.unknown, 0, "{coverage:?}");
    }

    /// With a companion, a vector is the two models' vectors joined, each scaled by 1/√2: unit
    /// length, twice as wide, and its cosines are the mean of the two models' cosines.
    #[test]
    fn a_companion_joins_both_models_vectors() {
        let multilingual = || {
            Encoder::load(
                &model_file("multilingual-e5-small.onnx"),
                &model_file("multilingual-e5-small.tokenizer.json"),
                &model_file("libonnxruntime.so"),
                1,
                128,
            )
            .expect("load the multilingual encoder")
            .with_text_prefix("query: ")
        };
        let mut english = load(128);
        let mut second = multilingual();
        let mut joined = load(128).with_companion(multilingual()).unwrap();
        assert_eq!(joined.dim(), Some(768));
        assert_eq!(
            joined.fingerprint(),
            format!("{} + {}", english.fingerprint(), second.fingerprint())
        );
        assert!(joined.companion().is_some());
        assert!(matches!(
            load(128).with_companion(joined_again()),
            Err(EncoderError::InvalidSetting(_))
        ));

        let texts = [
            "I am still waiting on my card?",
            "How do I top up with Apple Pay?",
            "hi",
        ];
        let a = english.encode_batch(&texts).unwrap();
        let b = second.encode_batch(&texts).unwrap();
        let both = joined.encode_batch(&texts).unwrap();
        assert_eq!((both.dim, both.len()), (768, 3));
        let half = std::f32::consts::FRAC_1_SQRT_2;
        for i in 0..texts.len() {
            let row = both.row(i);
            for (x, y) in row[..384].iter().zip(a.row(i)) {
                assert!((x - y * half).abs() < 1e-6);
            }
            for (x, y) in row[384..].iter().zip(b.row(i)) {
                assert!((x - y * half).abs() < 1e-6);
            }
            assert!((dot(row, row) - 1.0).abs() < 1e-4);
        }
        let mean = (dot(a.row(0), a.row(1)) + dot(b.row(0), b.row(1))) / 2.0;
        assert!((dot(both.row(0), both.row(1)) - mean).abs() < 1e-5);
        // encode_many keeps the order and the width.
        let many = joined.encode_many(&texts, 2).unwrap();
        for i in 0..texts.len() {
            for (x, y) in many.row(i).iter().zip(both.row(i)) {
                assert!((x - y).abs() < 1e-5);
            }
        }
    }

    fn joined_again() -> Encoder {
        let companion = load(64);
        load(64).with_companion(companion).unwrap()
    }

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// The split model (model.onnx plus layer 4's output, built by models/fetch) embeds exactly
    /// as model.onnx when no tuned layers are given; its inner states, run through the untuned
    /// fp32 top layers, reproduce the int8 model's vectors; tuned layers change the vectors.
    #[test]
    fn the_split_model_embeds_as_the_original_and_feeds_tuned_layers() {
        let texts = [
            "I am still waiting on my card?",
            "How do I top up with Apple Pay?",
            "what is the exchange rate for a card payment abroad",
            "hi",
        ];
        let mut original = load(128);
        let mut split = Encoder::load(
            &model_file("model.split.onnx"),
            &model_file("tokenizer.json"),
            &model_file("libonnxruntime.so"),
            1,
            128,
        )
        .unwrap();
        assert!(original.split_output().is_none());
        assert_eq!(split.split_output(), Some("layer_norm_10"));
        let a = original.encode_batch(&texts).unwrap();
        let b = split.encode_batch(&texts).unwrap();
        assert_eq!(b.dim, 384);
        assert!(max_abs_difference(&a.data, &b.data) < 1e-5);
        assert_ne!(original.fingerprint(), split.fingerprint());

        let mut progress = Vec::new();
        let states = split
            .inner_states_many(&texts, 3, &mut |done| progress.push(done))
            .unwrap();
        assert_eq!(progress, vec![3, 4]);
        for (text, state) in texts.iter().zip(&states) {
            let tokens = split
                .tokenizer()
                .encode(*text, true)
                .unwrap()
                .get_ids()
                .len();
            assert_eq!(state.len(), tokens * 384, "{text}");
        }
        let layers =
            TopLayers::from_safetensors(&model_file("model.fp32.safetensors"), 5, 1, 12).unwrap();
        let mut tuned = Vec::new();
        assert_eq!(
            split
                .encode_tuned_into(&texts, &layers, &mut tuned)
                .unwrap(),
            384
        );
        for i in 0..texts.len() {
            let cosine = dot(&tuned[i * 384..(i + 1) * 384], a.row(i));
            assert!(cosine > 0.999, "{}: cosine {cosine}", texts[i]);
        }
        assert!(matches!(
            original.encode_tuned_into(&texts, &layers, &mut Vec::new()),
            Err(EncoderError::InvalidSetting(_))
        ));
    }

    #[test]
    fn encoder_can_move_to_a_worker_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<Encoder>();
        let mut encoder = load(256);
        let dim = std::thread::spawn(move || encoder.encode_batch(&["hello"]).unwrap().dim)
            .join()
            .unwrap();
        assert_eq!(dim, 384);
    }

    #[test]
    fn matches_the_python_reference_alone_and_in_a_batch() {
        let fixture = fixture();
        let mut encoder = load(fixture.max_sequence_length);
        assert_eq!(
            encoder.dim(),
            Some(fixture.dim),
            "dimension declared by the model"
        );
        for (text, want) in fixture.texts.iter().zip(&fixture.vectors) {
            let got = encoder.encode_batch(&[text.as_str()]).unwrap();
            assert_eq!(got.len(), 1);
            let difference = max_abs_difference(got.row(0), want);
            let shown: String = text.chars().take(40).collect();
            eprintln!("{shown:?}: max |rust - python| = {difference:.1e}");
            assert!(difference < 1e-4, "{text:?}: max difference {difference}");
        }
        // One padded batch holding the empty text and the truncated long one.
        let texts: Vec<&str> = fixture.texts.iter().map(String::as_str).collect();
        let batch = encoder.encode_batch(&texts).unwrap();
        assert_eq!(batch.len(), texts.len());
        for (i, want) in fixture.vectors.iter().enumerate() {
            let difference = max_abs_difference(batch.row(i), want);
            assert!(
                difference < 1e-4,
                "batched {:?}: max difference {difference}",
                texts[i]
            );
            let norm = batch.row(i).iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn encode_many_keeps_the_input_order() {
        let mut encoder = load(256);
        let texts = [
            "a much longer question about my card payment",
            "hi",
            "where is my card?",
        ];
        let many = encoder.encode_many(&texts, 2).unwrap();
        assert_eq!(many.len(), 3);
        for (i, text) in texts.iter().enumerate() {
            let alone = encoder.encode_batch(&[text]).unwrap();
            assert!(
                max_abs_difference(many.row(i), alone.row(0)) < 1e-5,
                "row {i}"
            );
        }
        // Different texts give different vectors; related ones are closer than unrelated ones.
        let similarity = |a: usize, b: usize| -> f32 {
            many.row(a)
                .iter()
                .zip(many.row(b))
                .map(|(x, y)| x * y)
                .sum()
        };
        assert!(similarity(0, 2) > similarity(1, 2));
        assert!(similarity(1, 2) < 0.99);
    }

    #[test]
    fn fingerprint_names_the_model_and_tokenizer_files() {
        let encoder = load(256);
        // The sha256 prefixes pinned in models/fetch.
        assert_eq!(
            encoder.fingerprint(),
            "model.onnx sha256:8199be6f699a395f tokenizer sha256:be50c3628f2bf5bb"
        );
    }

    #[test]
    fn truncation_limits_long_texts() {
        let fixture = fixture();
        let long = fixture.texts.iter().max_by_key(|t| t.len()).unwrap();
        let mut short_limit = load(8);
        let mut long_limit = load(256);
        let a = short_limit.encode_batch(&[long.as_str()]).unwrap();
        let b = long_limit.encode_batch(&[long.as_str()]).unwrap();
        // Only the first 6 word pieces are seen with a limit of 8, so the vectors differ.
        assert!(max_abs_difference(a.row(0), b.row(0)) > 1e-3);
    }

    #[test]
    fn bad_paths_and_settings_are_reported() {
        let model = model_file("model.onnx");
        let tokenizer = model_file("tokenizer.json");
        let library = model_file("libonnxruntime.so");
        let missing = Path::new("/nonexistent/model.onnx");
        assert!(matches!(
            Encoder::load(missing, &tokenizer, &library, 1, 256),
            Err(EncoderError::MissingFile { what: "model", .. })
        ));
        assert!(matches!(
            Encoder::load(
                &model,
                &tokenizer,
                Path::new("/nonexistent/libonnxruntime.so"),
                1,
                256
            ),
            Err(EncoderError::MissingFile { .. })
        ));
        assert!(matches!(
            Encoder::load(&model, &tokenizer, &library, 0, 256),
            Err(EncoderError::InvalidSetting(_))
        ));
        assert!(matches!(
            Encoder::load(&model, &tokenizer, &library, 1, 1),
            Err(EncoderError::InvalidSetting(_))
        ));
        // A tokenizer file that is not a tokenizer, and a model file that is not a model.
        let dir =
            std::env::temp_dir().join(format!("switchboard-encoder-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk");
        std::fs::write(&junk, b"not json, not onnx").unwrap();
        assert!(matches!(
            Encoder::load(&model, &junk, &library, 1, 256),
            Err(EncoderError::Tokenizer { .. })
        ));
        assert!(matches!(
            Encoder::load(&junk, &tokenizer, &library, 1, 256),
            Err(EncoderError::Model { .. })
        ));
        // A different ONNX Runtime library than the one already loaded in this process.
        let other_library = dir.join("libonnxruntime-other.so");
        std::fs::write(&other_library, b"x").unwrap();
        let _ = load(256);
        assert!(matches!(
            Encoder::load(&model, &tokenizer, &other_library, 1, 256),
            Err(EncoderError::RuntimeMismatch { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
