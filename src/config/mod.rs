//! Tuning: switchboard's typed configuration, loaded from TOML.
//!
//! `tuning/default.toml` is embedded in the binary and lists every key with its documentation. A file
//! given with `--config FILE` is laid over it: it holds only the keys it changes, tables merge key by
//! key, and arrays are replaced whole. Everything is validated while loading; the first problem is
//! reported as `FILE:LINE: key 'section.key': reason` (the embedded file is named `<embedded default>`).
//!
//! Invariants:
//! - A [`Config`] returned by [`load`] / [`load_str`] satisfies every range and cross-field rule
//!   documented in `tuning/default.toml`, so code using it need not check again.
//! - Every key [`Config::to_toml`] prints must be present in the embedded default (checked at every load)
//!   and is accepted by the loader, so `load_str(name, &config.to_toml())` gives back an equal `Config`.
//! - Durations are strings with a unit ("250ms"); bare integers are rejected because their unit would be
//!   a guess. Sizes are integers (bytes) or strings with a binary unit ("16KiB").
//! - Each key is written once, in its section's `config_section!` (module `binding`): the struct
//!   field, the loader, the printer and the blank value all come from that line. The printed key
//!   list is the list of valid keys: "unknown key" errors and the completeness check derive from it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml_edit::{ImDocument, Item, TableLike, Value};

mod binding;
mod builder;
mod source;
#[cfg(test)]
mod tests;
mod values;
mod writer;

use binding::*;
use builder::*;
use source::*;
use values::*;
use writer::*;

/// The name errors use for the embedded `tuning/default.toml`.
pub const EMBEDDED_DEFAULT_NAME: &str = "<embedded default>";

/// Text of the embedded `tuning/default.toml`.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../tuning/default.toml");

// ---------------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------------

/// Why a configuration could not be loaded. `Display` is one line, ready to print.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read (missing, unreadable, not UTF-8).
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{file}:{line}: invalid TOML: {message}")]
    Syntax {
        file: String,
        line: usize,
        message: String,
    },
    /// A key is unknown, has the wrong type, is out of range, or conflicts with another key.
    #[error("{file}:{line}: key '{key}': {message}")]
    Invalid {
        file: String,
        line: usize,
        key: String,
        message: String,
    },
    /// The embedded default lacks a key (a build defect; every key must be documented there).
    #[error("{file}: key '{key}': missing (every key must be present in the embedded default)")]
    Incomplete { file: String, key: String },
}

impl ConfigError {
    /// The file the problem is in (`<embedded default>` for the embedded defaults).
    pub fn file(&self) -> &str {
        match self {
            ConfigError::Read { file, .. }
            | ConfigError::Syntax { file, .. }
            | ConfigError::Invalid { file, .. }
            | ConfigError::Incomplete { file, .. } => file,
        }
    }

    /// The 1-based line of the problem, when it has one.
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::Syntax { line, .. } | ConfigError::Invalid { line, .. } => Some(*line),
            ConfigError::Read { .. } | ConfigError::Incomplete { .. } => None,
        }
    }

    /// The dotted key the problem is about, when it is about one (e.g. `websocket.idle_timeout`).
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } | ConfigError::Incomplete { key, .. } => Some(key),
            ConfigError::Read { .. } | ConfigError::Syntax { .. } => None,
        }
    }
}

/// Why [`Cores::resolve`] could not pick cores.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoresError {
    #[error("no CPU cores are available to this process")]
    NoneAvailable,
    #[error("core {core} is not available to this process (available: {available:?})")]
    Unavailable { core: usize, available: Vec<usize> },
}

// ---------------------------------------------------------------------------------------------------
// The configuration: each key is written once, as `field: Type = Kind(range)` (see `binding`).
// Ranges are documented in tuning/default.toml; keep both in step.
// ---------------------------------------------------------------------------------------------------

config_sections! {
    server: ServerConfig,
    shards: ShardsConfig,
    http: HttpConfig,
    websocket: WebSocketConfig,
    diagnostics: DiagnosticsConfig,
    log: LogConfig,
    storage: StorageConfig,
    conversations: ConversationsConfig,
    agents: AgentsConfig,
    auth: AuthConfig,
    api: ApiConfig,
    inference: InferenceConfig,
    bot: BotConfig,
    risk_control: RiskControlConfig,
    audit: AuditConfig,
    visitors: VisitorsConfig,
    limits: LimitsConfig,
    tls: TlsConfig,
    metrics: MetricsConfig,
}

config_section! {
    /// `[server]`
    pub struct ServerConfig {
        pub listen: SocketAddr = Address,
        pub backlog: u32 = Int(1, 65_535),
        pub shutdown_grace: Duration = Dur(Duration::ZERO, mins(10)),
        /// What the listeners serve: everything, or only knowledge-base sync (`kb serve-sync`).
        pub role: ServerRole = Choice(ServerRole::CHOICES),
    }
}

/// `server.role`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerRole {
    /// Chats, the consoles, the API: a full node.
    Chat,
    /// A knowledge-base sync primary only: `/api/login`, `/api/refresh`, `/api/me`,
    /// `/api/kb/sync`, the health and metrics endpoints; everything else is 404.
    Sync,
}

impl ServerRole {
    const CHOICES: &'static [(&'static str, ServerRole)] =
        &[("chat", ServerRole::Chat), ("sync", ServerRole::Sync)];

    /// The spelling used in TOML.
    pub fn as_str(self) -> &'static str {
        name_of(Self::CHOICES, self)
    }
}

config_section! {
    /// `[shards]`
    pub struct ShardsConfig {
        pub cores: Cores = CoreList,
        /// Bytes of glommio io_memory per shard.
        pub io_memory: usize = Size(64 * KIB, 64 * MIB),
        /// Capacity of each cross-shard channel, in messages.
        pub mesh_capacity: usize = Int(1, 1_048_576),
        /// 0 = unlimited; see [`ShardsConfig::session_limit`].
        pub max_sessions_per_shard: usize = Int(0, 10_000_000),
    }
}

/// Which cores run shards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cores {
    /// Every core available to the process.
    All,
    /// These core ids, distinct, in the order given (at least one).
    List(Vec<usize>),
}

config_section! {
    /// `[http]`
    pub struct HttpConfig {
        pub max_header_bytes: usize = Size(KIB, MIB),
        pub max_headers: usize = Int(8, 256),
        pub handshake_timeout: Duration = Dur(ms(100), mins(5)),
    }
}

config_section! {
    /// `[websocket]`
    pub struct WebSocketConfig {
        pub max_message_bytes: usize = Size(125, 64 * MIB),
        pub ping_interval: Duration = Dur(secs(1), hours(1)),
        /// Always greater than `ping_interval`.
        pub idle_timeout: Duration = Dur(secs(2), hours(24)),
        pub read_buffer_bytes: usize = Size(KIB, MIB),
        pub pool_max_idle_buffers: usize = Int(0, 1_000_000),
        pub write_timeout: Duration = Dur(ms(100), mins(10)),
    }
}

config_section! {
    /// `[diagnostics]`
    pub struct DiagnosticsConfig {
        /// Serve `/ws/echo`.
        pub echo: bool = Bool,
        /// Serve `POST /debug/panic?shard=N` to loopback peers: makes shard N panic (to test that
        /// a shard panic stops the process for a restart). Never in production.
        pub panic_endpoint: bool = Bool,
        /// Serve `POST /debug/stall?shard=N&ms=M` to loopback peers: blocks shard N's thread for M
        /// ms (to test that a stuck shard stops the systemd watchdog pings). Never in production.
        pub stall_endpoint: bool = Bool,
    }
}

config_section! {
    /// `[log]`
    pub struct LogConfig {
        pub format: LogFormat = Choice(LogFormat::CHOICES),
        /// A validated level or EnvFilter-style directive list, e.g. `info,switchboard::storage=debug`.
        pub level: String = LogDirectives,
    }
}

/// `log.format`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// `Text` when stderr is a terminal, `Json` otherwise.
    Auto,
    Text,
    Json,
}

config_section! {
    /// `[storage]`
    pub struct StorageConfig {
        /// Relative paths are relative to the working directory.
        pub dir: PathBuf = FilePath,
        pub durability: Durability = Choice(Durability::CHOICES),
        pub commit_window: Duration = Dur(Duration::ZERO, secs(1)),
        /// The least time from the start of one group commit to the start of the next.
        pub commit_interval: Duration = Dur(Duration::ZERO, secs(1)),
        pub max_batch: usize = Int(1, 100_000),
        /// Only used with `Durability::Batch`.
        pub sync_interval: Duration = Dur(ms(1), mins(1)),
        /// Bytes; a multiple of 4096.
        pub map_size: u64 = MapSize,
        /// Bytes; a multiple of 4096, at least `map_size`: the map doubles up to this when full.
        pub max_map_size: u64 = MapSize,
        /// Size of each shard's write-ahead log file with `durability = "fsync"` or `"batch"`;
        /// 0: no log.
        pub log_bytes: u64 = Size(0, GIB),
        /// With the log: the longest LMDB's commit of acked batches waits for later ones.
        pub apply_interval: Duration = Dur(Duration::ZERO, secs(1)),
        /// Nice value of each shard's commit thread while it waits for and runs group commits;
        /// one not below the process's own leaves it unchanged.
        pub commit_nice: i32 = Int(-20, 0),
    }
}

/// `storage.durability`: when a message is acknowledged relative to reaching the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// `"fsync"`: acknowledge after the commit holding it is fsync'd.
    Fsync,
    /// `"batch"`: acknowledge once written to the log (or committed, without a log); fsync
    /// every `storage.sync_interval`.
    Batch,
    /// `"none"`: never fsync explicitly; the OS writes back when it likes.
    NoSync,
}

config_section! {
    /// `[conversations]`
    pub struct ConversationsConfig {
        /// At most `websocket.max_message_bytes`.
        pub max_text_bytes: usize = Size(1, MIB),
        pub typing_interval: Duration = Dur(ms(100), mins(1)),
        /// Always greater than `typing_interval`.
        pub typing_expiry: Duration = Dur(ms(200), mins(10)),
        pub agent_grace: Duration = Dur(Duration::ZERO, hours(1)),
        pub abuse_limit: u32 = Int(1, 1000),
    }
}

config_section! {
    /// `[agents]`
    pub struct AgentsConfig {
        pub default_max_open: u32 = Int(1, 1000),
        /// Development mode: the static `accounts` tokens open `/ws/agent` (warned at start-up).
        pub dev_static_tokens: bool = Bool,
        /// Queued conversations go to an available agent by themselves; when false they wait for
        /// an agent's `accept`.
        pub auto_assign: bool = Bool,
    }
    tables(write_accounts) {
        /// Keyed by agent id. Tokens are unique across accounts. Read by
        /// `Builder::apply_accounts`, which merges accounts key by key.
        pub accounts: BTreeMap<String, AgentAccount>,
    }
}

/// `[agents.accounts.<id>]`. `Debug` does not print the token.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentAccount {
    pub token: String,
    /// The id when the file gives no name.
    pub name: String,
    /// `agents.default_max_open` when the file gives no max_open.
    pub max_open: u32,
}

config_section! {
    /// `[auth]`: agent logins and tokens.
    pub struct AuthConfig {
        /// `None` (written as "") means `<storage dir>/auth-secret`.
        pub secret_file: Option<PathBuf> = OptionalPath,
        pub token_ttl: Duration = Dur(mins(1), hours(24 * 30)),
        pub lockout_failures: u32 = Int(1, 1000),
        pub lockout_time: Duration = Dur(secs(1), hours(24 * 7)),
        pub min_password_length: usize = Int(8, 128),
        /// 0 = unlimited.
        pub login_per_ip_per_minute: u32 = Int(0, 100_000),
        /// 0 = unlimited.
        pub login_per_account_per_minute: u32 = Int(0, 100_000),
    }
}

impl AuthConfig {
    /// The signing secret's path: `secret_file`, or `auth-secret` under the storage dir.
    pub fn secret_path(&self, storage_dir: &Path) -> PathBuf {
        self.secret_file
            .clone()
            .unwrap_or_else(|| storage_dir.join("auth-secret"))
    }
}

config_section! {
    /// `[api]`: the HTTP JSON API under `/api/`.
    pub struct ApiConfig {
        pub max_body_bytes: usize = Size(256, MIB),
        /// Largest body of `POST /api/kb/import` (a whole knowledge base).
        pub max_import_bytes: usize = Size(KIB, 256 * MIB),
    }
}

config_section! {
    /// `[inference]`
    pub struct InferenceConfig {
        pub enabled: bool = Bool,
        pub model: PathBuf = FilePath,
        pub tokenizer: PathBuf = FilePath,
        pub ort_library: PathBuf = FilePath,
        pub max_batch: usize = Int(1, 1024),
        /// Always less than `max_wait`.
        pub batch_window: Duration = Dur(Duration::ZERO, secs(1)),
        pub max_wait: Duration = Dur(ms(1), mins(1)),
        pub max_sequence_length: usize = Int(8, 8192),
        /// Prepended to every text before tokenizing (multilingual-e5 wants `"query: "`).
        pub text_prefix: String = Text(0, 64),
        /// A second encoder whose vectors are appended to the first's; empty = none. Set together
        /// with `companion_tokenizer`.
        pub companion_model: PathBuf = OptionalPath,
        pub companion_tokenizer: PathBuf = OptionalPath,
        pub companion_text_prefix: String = Text(0, 64),
        /// The cascade: the companion embeds a query only when the primary model's best score
        /// is below this (1: every query).
        pub companion_below: f64 = Float(0.0, 1.0),
        /// `kb import` fine-tunes the model's top layers on the knowledge base (when the model has
        /// an inner output and the knowledge base has at least `fine_tune_min_questions`).
        pub fine_tune: bool = Bool,
        /// The fp32 weights the tuned layers start from (safetensors).
        pub fine_tune_weights: PathBuf = OptionalPath,
        pub fine_tune_epochs: usize = Int(1, 20),
        pub fine_tune_min_questions: usize = Int(1, 10_000_000),
    }
}

config_section! {
    /// `[bot]`
    pub struct BotConfig {
        pub confidence_threshold: f64 = Float(0.0, 1.0),
        pub margin_threshold: f64 = Float(0.0, 1.0),
        /// Below this cosine between a message and its nearest knowledge-base question, the
        /// intent engine scores the match 0 (the message is about something else).
        pub min_similarity: f64 = Float(0.0, 1.0),
        pub failed_turns_before_handoff: u32 = Int(1, 100),
        /// Non-empty, each handler at most once, in the order messages pass through them.
        pub handlers: Vec<BotHandler> = HandlerList,
        pub hot_cache_entries: usize = Int(0, 10_000_000),
        pub embedding_cache_entries: usize = Int(0, 10_000_000),
    }
    tables(write_variants) {
        /// `[[bot.variants]]`, the arms of a gray release, in the order written (empty: one
        /// implicit variant, see [`BotConfig::effective_variants`]). Read by
        /// `Builder::apply_variants`; an overlay's array replaces the default's whole.
        pub variants: Vec<BotVariant>,
    }
}

/// The most `[[bot.variants]]` a configuration may list.
pub const MAX_VARIANTS: usize = 16;

/// The name of the one variant a configuration without `[[bot.variants]]` runs.
pub const DEFAULT_VARIANT: &str = "default";

/// `[[bot.variants]]`: one arm of a gray release, as written.
#[derive(Clone, Debug, PartialEq)]
pub struct BotVariant {
    /// Unique, 1..=64 characters of A-Z a-z 0-9 _ - (it is a metric label and a log field).
    pub name: String,
    /// Share of new conversations, relative to the other variants' weights; 0 takes none.
    pub weight: f64,
    /// The variant's answer handlers; `None`: those of `[bot] handlers`. Never `risk_control`
    /// (the guard runs on every message before it is stored, whatever the variant).
    pub handlers: Option<Vec<BotHandler>>,
    /// Overrides `[bot] confidence_threshold` for this variant.
    pub confidence_threshold: Option<f64>,
    /// Overrides `[bot] margin_threshold` for this variant.
    pub margin_threshold: Option<f64>,
    /// Which of the node's encoders recognises this variant's questions; `None`: the cascade as
    /// `[inference]` configures it.
    pub model: Option<VariantModel>,
}

/// A variant's `model`: one of the encoders the node loads (the knowledge base holds vectors for
/// those only), forced for every question of the variant's conversations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VariantModel {
    /// `[inference] model` alone: the companion never runs for the variant.
    Primary,
    /// `[inference] model` and `companion_model` on every question (as `companion_below = 1`).
    Companion,
}

impl VariantModel {
    /// The accepted values of a variant's `model`, as written.
    pub const NAMES: [&'static str; 2] = ["primary", "companion"];

    pub fn as_str(self) -> &'static str {
        match self {
            VariantModel::Primary => "primary",
            VariantModel::Companion => "companion",
        }
    }

    pub fn parse(text: &str) -> Option<VariantModel> {
        match text {
            "primary" => Some(VariantModel::Primary),
            "companion" => Some(VariantModel::Companion),
            _ => None,
        }
    }
}

/// A variant as it runs: its name and weight, its answer handlers, and the `[bot]` settings its
/// handlers are built from (its own thresholds in place).
#[derive(Clone, Debug, PartialEq)]
pub struct EffectiveVariant {
    pub name: String,
    pub weight: f64,
    /// The answer chain, in order (no `risk_control`).
    pub answer_handlers: Vec<BotHandler>,
    /// The variant's `model` (`None`: the cascade as `[inference]` configures it).
    pub model: Option<VariantModel>,
    /// `[bot]` with this variant's thresholds; its `variants` list is empty.
    pub bot: BotConfig,
}

impl BotConfig {
    /// The variants conversations are split between: `[[bot.variants]]` in order, or, when
    /// there are none, the one variant [`DEFAULT_VARIANT`] made of `[bot]` itself (weight 1).
    pub fn effective_variants(&self) -> Vec<EffectiveVariant> {
        let base = BotConfig {
            variants: Vec::new(),
            ..self.clone()
        };
        let answers_of = |handlers: &[BotHandler]| -> Vec<BotHandler> {
            handlers
                .iter()
                .copied()
                .filter(|handler| *handler != BotHandler::RiskControl)
                .collect()
        };
        if self.variants.is_empty() {
            return vec![EffectiveVariant {
                name: DEFAULT_VARIANT.to_owned(),
                weight: 1.0,
                answer_handlers: answers_of(&self.handlers),
                model: None,
                bot: base,
            }];
        }
        self.variants
            .iter()
            .map(|variant| {
                let mut bot = base.clone();
                if let Some(confidence) = variant.confidence_threshold {
                    bot.confidence_threshold = confidence;
                }
                if let Some(margin) = variant.margin_threshold {
                    bot.margin_threshold = margin;
                }
                EffectiveVariant {
                    name: variant.name.clone(),
                    weight: variant.weight,
                    answer_handlers: answers_of(
                        variant.handlers.as_deref().unwrap_or(&self.handlers),
                    ),
                    model: variant.model,
                    bot,
                }
            })
            .collect()
    }

    /// Whether some variant has answer handlers (the intent engine is loaded only then).
    pub fn has_answer_handlers(&self) -> bool {
        self.effective_variants()
            .iter()
            .any(|variant| !variant.answer_handlers.is_empty())
    }

    /// Prints `variants = []`, or one `[[bot.variants]]` table per variant.
    fn write_variants(&self, w: &mut TomlWriter) {
        if self.variants.is_empty() {
            w.raw("variants", "[]");
            return;
        }
        for variant in &self.variants {
            w.array_table("bot.variants");
            w.string("name", &variant.name);
            w.float("weight", variant.weight);
            if let Some(handlers) = &variant.handlers {
                w.strings("handlers", handlers.iter().map(|h| h.as_str()));
            }
            if let Some(confidence) = variant.confidence_threshold {
                w.float("confidence_threshold", confidence);
            }
            if let Some(margin) = variant.margin_threshold {
                w.float("margin_threshold", margin);
            }
            if let Some(model) = variant.model {
                w.string("model", model.as_str());
            }
        }
    }
}

/// An entry of `bot.handlers`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BotHandler {
    RiskControl,
    HumanTransfer,
    Intent,
    Fallback,
    /// The sample handler that repeats the message (see docs/plugins.md).
    Echo,
    /// A handler registered by the program that embeds switchboard (see
    /// [`allow_plugin_handlers`] and `cli::run_with_registry`), by its registry name.
    Plugin(&'static str),
}

config_section! {
    /// `[risk_control]`
    pub struct RiskControlConfig {
        pub blocked_words: Vec<String> = Strings(1, 256),
        /// Regular-expression source text; compiled (and syntax-checked) by the risk-control handler.
        pub blocked_patterns: Vec<String> = Strings(1, 4096),
        pub mask_card_numbers: bool = Bool,
        pub flood_messages: u32 = Int(1, 10_000),
        pub flood_window: Duration = Dur(ms(100), hours(1)),
    }
}

config_section! {
    /// `[audit]`
    pub struct AuditConfig {
        /// The audit chain's file; `None` (written as "") means `audit.log` under `storage.dir`.
        pub file: Option<PathBuf> = OptionalPath,
    }
}

config_section! {
    /// `[visitors]`: who may open `/ws/visitor` for which site, and how a host site
    /// vouches for its users.
    pub struct VisitorsConfig {
        /// Whether a site without a `[visitors.sites.<name>]` table is served (with
        /// no Origin check and no verified identities).
        pub allow_unlisted_sites: bool = Bool,
        /// A conversation in which no message was ever stored (opened by a `handoff`),
        /// that no agent holds and no visitor is connected to, is deleted after this idle time.
        pub empty_conversation_ttl: Duration = Dur(secs(1), hours(24 * 30)),
    }
    tables(write_sites) {
        /// Keyed by site name. Read by `Builder::apply_sites`.
        pub sites: BTreeMap<String, SiteConfig>,
    }
}

/// `[visitors.sites.<name>]`. `Debug` does not print the identity key.
#[derive(Clone, PartialEq, Eq)]
pub struct SiteConfig {
    /// Allowed `Origin` values (`scheme://host[:port]`); empty = any origin.
    pub origins: Vec<String>,
    /// Where the identity key came from, as written.
    pub identity_key_source: Option<IdentityKeySource>,
    /// The HMAC-SHA256 key of `identity_hash` (the file's bytes, trailing line
    /// break removed); `None` = no verified identities for this site.
    pub identity_key: Option<Vec<u8>>,
}

/// `identity_key` or `identity_key_file` of a site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityKeySource {
    Inline(String),
    File(PathBuf),
}

impl fmt::Debug for SiteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SiteConfig")
            .field("origins", &self.origins)
            .field(
                "identity_key",
                &self.identity_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

config_section! {
    /// `[limits]`: admission rates, back-pressure bounds, degradation thresholds, the blocklist.
    /// A rate of 0 is unlimited; see `crate::admission`.
    pub struct LimitsConfig {
        /// New connections per second per client IP, per shard.
        pub connections_per_ip: f64 = Float(0.0, 1e6),
        pub connection_burst: u32 = Int(1, 1_000_000),
        /// Chat messages per second per visitor session.
        pub visitor_messages_per_second: f64 = Float(0.0, 1e6),
        pub visitor_message_burst: u32 = Int(1, 1_000_000),
        /// Frames of any kind per second per visitor session.
        pub visitor_frames_per_second: f64 = Float(0.0, 1e6),
        pub visitor_frame_burst: u32 = Int(1, 1_000_000),
        /// Chat messages per second per agent session (an agent serves many conversations).
        pub agent_messages_per_second: f64 = Float(0.0, 1e6),
        pub agent_message_burst: u32 = Int(1, 1_000_000),
        /// Frames of any kind per second per agent session.
        pub agent_frames_per_second: f64 = Float(0.0, 1e6),
        pub agent_frame_burst: u32 = Int(1, 1_000_000),
        /// Bot queries per second per site, per owner shard.
        pub bot_queries_per_site: f64 = Float(0.0, 1e6),
        pub bot_burst: u32 = Int(1, 1_000_000),
        /// `conversations.abuse_limit` refusals within this window close a session with 1008.
        pub abuse_window: Duration = Dur(secs(1), hours(1)),
        /// Messages queued toward one shard past which sessions sending there stop reading.
        pub max_queued_per_shard: usize = Int(16, 10_000_000),
        /// Storage operations waiting for a commit past which sessions stop reading.
        pub max_pending_commits: usize = Int(16, 10_000_000),
        /// Frames waiting for one session (outbox plus held back) past which it is closed with 1013.
        pub max_outbox_frames: usize = Int(16, 10_000_000),
        /// Messages a resume replay reads and sends at a time.
        pub replay_chunk: usize = Int(1, 1_000_000),
        /// Frames of one visitor waiting while its conversation is being opened, past which its
        /// further frames are refused with `overloaded`.
        pub max_opening_frames: usize = Int(1, 1_000_000),
        /// Event-loop lag that sheds non-core work; 0 disables.
        pub shed_lag: Duration = Dur(Duration::ZERO, mins(1)),
        /// Event-loop lag that refuses new sessions; 0 disables.
        pub refuse_lag: Duration = Dur(Duration::ZERO, mins(1)),
        /// Queued items that shed non-core work; 0 disables.
        pub shed_queue: usize = Int(0, 100_000_000),
        /// Queued items that refuse new sessions; 0 disables.
        pub refuse_queue: usize = Int(0, 100_000_000),
        pub recover_after: Duration = Dur(Duration::ZERO, hours(1)),
        /// Message-level shedding: a visitor message whose predicted wait (owner's event-loop lag
        /// plus its commit backlog) exceeds this is refused with `overloaded`; zero disables.
        pub admit_latency_budget: Duration = Dur(Duration::ZERO, mins(1)),
        /// Rated capacity: visitor chat messages per second one shard admits through its
        /// connections; over it a message is refused with `overloaded`. Zero: unlimited.
        pub shard_messages_per_second: f64 = Float(0.0, 1e7),
        /// Burst of `shard_messages_per_second`.
        pub shard_message_burst: u32 = Int(1, 10_000_000),
        /// `None`: no blocklist.
        pub blocklist_file: Option<PathBuf> = OptionalPath,
        pub blocklist_poll: Duration = Dur(ms(100), hours(1)),
        /// Hostile-input log lines per second per shard; 0 = every one.
        pub log_lines_per_second: u32 = Int(0, 1_000_000),
        /// Keys (IPs, sites) each keyed limiter tracks at most.
        pub tracked_keys: usize = Int(1, 10_000_000),
    }
}

config_section! {
    /// `[tls]`
    pub struct TlsConfig {
        /// `None` (written `""`) = no TLS listener.
        pub listen: Option<SocketAddr> = OptionalAddress,
        /// PEM certificate chain; empty when unset (required when `listen` is set).
        pub cert: PathBuf = OptionalPath,
        /// PEM private key; empty when unset (required when `listen` is set).
        pub key: PathBuf = OptionalPath,
        /// How often the certificate and key files are checked for changes.
        pub watch_interval: Duration = Dur(ms(100), hours(1)),
    }
}

config_section! {
    /// `[metrics]`
    pub struct MetricsConfig {
        /// `None` (written `""`): `/metrics` is served on the public listeners to supervisors and
        /// admins (bearer token). An address: a separate plain-HTTP listener serves `/metrics`
        /// there without a token, and the public listeners answer 404 for it.
        pub listen: Option<SocketAddr> = OptionalAddress,
    }
}

impl AgentsConfig {
    /// Prints `[agents.accounts]` and one table per account.
    fn write_accounts(&self, w: &mut TomlWriter) {
        w.section("agents.accounts");
        for (id, account) in &self.accounts {
            w.section(&format!("agents.accounts.{id}"));
            w.string("token", &account.token);
            w.string("name", &account.name);
            w.display("max_open", account.max_open);
        }
    }
}

impl VisitorsConfig {
    /// Prints `[visitors.sites]` and one table per site.
    fn write_sites(&self, w: &mut TomlWriter) {
        w.section("visitors.sites");
        for (name, site) in &self.sites {
            w.section(&format!("visitors.sites.{}", toml_key(name)));
            w.strings("origins", site.origins.iter().map(String::as_str));
            match &site.identity_key_source {
                Some(IdentityKeySource::Inline(key)) => w.string("identity_key", key),
                Some(IdentityKeySource::File(path)) => w.path("identity_key_file", path),
                None => {}
            }
        }
    }

    /// The table of `site`, if it has one.
    pub fn site(&self, site: &str) -> Option<&SiteConfig> {
        self.sites.get(site)
    }
}

// ---------------------------------------------------------------------------------------------------
// Public entry points
// ---------------------------------------------------------------------------------------------------

/// Loads the embedded defaults, overlaid with `path` when given. Errors name `path` as displayed.
pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    match path {
        None => load_layers(EMBEDDED_DEFAULT, &[]),
        Some(path) => {
            let name = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                file: name.clone(),
                source,
            })?;
            load_str(&name, &text)
        }
    }
}

/// Loads the embedded defaults overlaid with `text`; errors in `text` are named `source_name`.
pub fn load_str(source_name: &str, text: &str) -> Result<Config, ConfigError> {
    load_layers(EMBEDDED_DEFAULT, &[(source_name, text)])
}

/// The embedded defaults. Panics only if `tuning/default.toml` is invalid, which the tests rule out.
impl Default for Config {
    fn default() -> Self {
        match load(None) {
            Ok(config) => config,
            Err(error) => panic!("embedded tuning/default.toml is invalid: {error}"),
        }
    }
}

impl Config {
    /// The account id and account whose token is `token`.
    ///
    /// Compares every account's token in constant time so that response timing
    /// does not reveal how much of a guessed token matched.
    pub fn agent_by_token(&self, token: &str) -> Option<(&str, &AgentAccount)> {
        let mut found = None;
        for (id, account) in &self.agents.accounts {
            if constant_time_eq(account.token.as_bytes(), token.as_bytes()) {
                found = Some((id.as_str(), account));
            }
        }
        found
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Config {
    /// The effective configuration as TOML, every key present (for `switchboard config print`).
    /// Loading the output with [`load_str`] gives back an equal `Config`.
    pub fn to_toml(&self) -> String {
        let mut writer = TomlWriter::default();
        self.write_toml(&mut writer);
        writer.out
    }

    /// An error about `key` (dotted, e.g. `"inference.model"`) located where the key's effective value
    /// was set: for problems found after loading, e.g. a model file that does not exist.
    pub fn error_at(&self, key: &str, message: impl fmt::Display) -> ConfigError {
        self.origins.error_at(key, message)
    }

    /// The core ids to start shards on, given the ids available to the process (e.g. from
    /// `core_affinity::get_core_ids()`); errors point at `shards.cores`.
    pub fn shard_cores(&self, available: &[usize]) -> Result<Vec<usize>, ConfigError> {
        self.shards
            .cores
            .resolve(available)
            .map_err(|error| self.error_at("shards.cores", error))
    }
}

impl Config {
    /// Where the audit chain is kept: `[audit] file`, or `audit.log` under `[storage] dir`.
    pub fn audit_path(&self) -> PathBuf {
        self.audit
            .file
            .clone()
            .unwrap_or_else(|| self.storage.dir.join("audit.log"))
    }
}

impl ShardsConfig {
    /// `None` when unlimited (`max_sessions_per_shard = 0`).
    pub fn session_limit(&self) -> Option<usize> {
        (self.max_sessions_per_shard != 0).then_some(self.max_sessions_per_shard)
    }
}

impl Cores {
    /// The cores to run shards on. `available` lists the core ids usable by the process.
    pub fn resolve(&self, available: &[usize]) -> Result<Vec<usize>, CoresError> {
        if available.is_empty() {
            return Err(CoresError::NoneAvailable);
        }
        match self {
            Cores::All => Ok(available.to_vec()),
            Cores::List(ids) => {
                if let Some(&core) = ids.iter().find(|id| !available.contains(id)) {
                    return Err(CoresError::Unavailable {
                        core,
                        available: available.to_vec(),
                    });
                }
                Ok(ids.clone())
            }
        }
    }
}

impl LogFormat {
    const CHOICES: &'static [(&'static str, LogFormat)] = &[
        ("auto", LogFormat::Auto),
        ("text", LogFormat::Text),
        ("json", LogFormat::Json),
    ];

    /// The spelling used in TOML.
    pub fn as_str(self) -> &'static str {
        name_of(Self::CHOICES, self)
    }

    /// `Auto` becomes `Text` on a terminal and `Json` otherwise; `Text` and `Json` stay as they are.
    pub fn resolve(self, stderr_is_terminal: bool) -> LogFormat {
        match self {
            LogFormat::Auto if stderr_is_terminal => LogFormat::Text,
            LogFormat::Auto => LogFormat::Json,
            other => other,
        }
    }
}

impl Durability {
    const CHOICES: &'static [(&'static str, Durability)] = &[
        ("fsync", Durability::Fsync),
        ("batch", Durability::Batch),
        ("none", Durability::NoSync),
    ];

    /// The spelling used in TOML.
    pub fn as_str(self) -> &'static str {
        name_of(Self::CHOICES, self)
    }
}

impl BotHandler {
    const CHOICES: &'static [(&'static str, BotHandler)] = &[
        ("risk_control", BotHandler::RiskControl),
        ("human_transfer", BotHandler::HumanTransfer),
        ("intent", BotHandler::Intent),
        ("fallback", BotHandler::Fallback),
        ("echo", BotHandler::Echo),
    ];

    /// The spelling used in TOML.
    pub fn as_str(self) -> &'static str {
        match self {
            BotHandler::Plugin(name) => name,
            _ => name_of(Self::CHOICES, self),
        }
    }

    /// The names `[bot] handlers` accepts: the built-ins, then the plugins allowed by
    /// [`allow_plugin_handlers`].
    fn choices() -> Vec<(&'static str, BotHandler)> {
        let mut choices = Self::CHOICES.to_vec();
        for name in PLUGIN_HANDLERS.get().into_iter().flatten() {
            if !choices.iter().any(|(n, _)| n == name) {
                choices.push((name, BotHandler::Plugin(name)));
            }
        }
        choices
    }
}

/// Handler names registered by the program embedding switchboard, accepted in `[bot] handlers`.
static PLUGIN_HANDLERS: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();

/// Lets `[bot] handlers` name the handlers of a custom bot registry (the built-in names are
/// always accepted). Process-wide, because every command loads the configuration: call it
/// once at start-up, before the first load (`cli::run_with_registry` does). Later calls are
/// ignored.
pub fn allow_plugin_handlers(names: impl IntoIterator<Item = &'static str>) {
    let _ = PLUGIN_HANDLERS.set(names.into_iter().collect());
}

impl fmt::Debug for AgentAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentAccount")
            .field("token", &"<redacted>")
            .field("name", &self.name)
            .field("max_open", &self.max_open)
            .finish()
    }
}

fn name_of<T: PartialEq + Copy>(choices: &[(&'static str, T)], value: T) -> &'static str {
    choices
        .iter()
        .find(|(_, v)| *v == value)
        .map(|(name, _)| *name)
        .expect("every variant is listed in CHOICES")
}

// ---------------------------------------------------------------------------------------------------
// Ranges (documented in tuning/default.toml; keep both in step)
// ---------------------------------------------------------------------------------------------------

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
const fn mins(n: u64) -> Duration {
    Duration::from_secs(n * 60)
}
const fn hours(n: u64) -> Duration {
    Duration::from_secs(n * 3600)
}

/// The largest core id accepted in `shards.cores`.
const MAX_CORE_ID: i64 = 4095;
/// LMDB's map size must be a multiple of the OS page size.
const MAP_SIZE_GRANULE: u64 = 4096;
