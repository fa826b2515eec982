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
//! - The printed key list and the loader share one source of truth: `Config::write_toml`. The list of
//!   valid keys shown in "unknown key" errors and the completeness check are both derived from it.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml_edit::{ImDocument, Item, TableLike, Value};

/// The name errors use for the embedded `tuning/default.toml`.
pub const EMBEDDED_DEFAULT_NAME: &str = "<embedded default>";

/// Text of the embedded `tuning/default.toml`.
pub const EMBEDDED_DEFAULT: &str = include_str!("../tuning/default.toml");

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
// The configuration
// ---------------------------------------------------------------------------------------------------

/// The effective configuration: embedded defaults with the optional `--config` file laid over them.
/// Field meanings, units and ranges are documented in `tuning/default.toml`.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub shards: ShardsConfig,
    pub http: HttpConfig,
    pub websocket: WebSocketConfig,
    pub diagnostics: DiagnosticsConfig,
    pub log: LogConfig,
    pub storage: StorageConfig,
    pub conversations: ConversationsConfig,
    pub agents: AgentsConfig,
    pub auth: AuthConfig,
    pub api: ApiConfig,
    pub inference: InferenceConfig,
    pub bot: BotConfig,
    pub risk_control: RiskControlConfig,
    pub audit: AuditConfig,
    pub visitors: VisitorsConfig,
    pub limits: LimitsConfig,
    pub tls: TlsConfig,
    pub metrics: MetricsConfig,
    /// Where each key was last set; used to point errors found after loading at the right line.
    origins: Origins,
}

/// `[server]`
#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub backlog: u32,
    pub shutdown_grace: Duration,
}

/// `[shards]`
#[derive(Clone, Debug, PartialEq)]
pub struct ShardsConfig {
    pub cores: Cores,
    /// Bytes of glommio io_memory per shard.
    pub io_memory: usize,
    /// Capacity of each cross-shard channel, in messages.
    pub mesh_capacity: usize,
    /// 0 = unlimited; see [`ShardsConfig::session_limit`].
    pub max_sessions_per_shard: usize,
}

/// Which cores run shards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cores {
    /// Every core available to the process.
    All,
    /// These core ids, distinct, in the order given (at least one).
    List(Vec<usize>),
}

/// `[http]`
#[derive(Clone, Debug, PartialEq)]
pub struct HttpConfig {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub handshake_timeout: Duration,
}

/// `[websocket]`
#[derive(Clone, Debug, PartialEq)]
pub struct WebSocketConfig {
    pub max_message_bytes: usize,
    pub ping_interval: Duration,
    /// Always greater than `ping_interval`.
    pub idle_timeout: Duration,
    pub read_buffer_bytes: usize,
    pub pool_max_idle_buffers: usize,
    pub write_timeout: Duration,
}

/// `[diagnostics]`
#[derive(Clone, Debug, PartialEq)]
pub struct DiagnosticsConfig {
    /// Serve `/ws/echo`.
    pub echo: bool,
    /// Serve `POST /debug/panic?shard=N` to loopback peers: makes shard N panic (to test that
    /// a shard panic stops the process for a restart). Never in production.
    pub panic_endpoint: bool,
    /// Serve `POST /debug/stall?shard=N&ms=M` to loopback peers: blocks shard N's thread for M
    /// ms (to test that a stuck shard stops the systemd watchdog pings). Never in production.
    pub stall_endpoint: bool,
}

/// `[log]`
#[derive(Clone, Debug, PartialEq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A validated level or EnvFilter-style directive list, e.g. `info,switchboard::storage=debug`.
    pub level: String,
}

/// `log.format`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// `Text` when stderr is a terminal, `Json` otherwise.
    Auto,
    Text,
    Json,
}

/// `[storage]`
#[derive(Clone, Debug, PartialEq)]
pub struct StorageConfig {
    /// Relative paths are relative to the working directory.
    pub dir: PathBuf,
    pub durability: Durability,
    pub commit_window: Duration,
    pub max_batch: usize,
    /// Only used with `Durability::Batch`.
    pub sync_interval: Duration,
    /// Bytes; a multiple of 4096.
    pub map_size: u64,
    /// Bytes; a multiple of 4096, at least `map_size`: the map doubles up to this when full.
    pub max_map_size: u64,
}

/// `storage.durability`: when a message is acknowledged relative to reaching the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// `"fsync"`: acknowledge after the commit holding it is fsync'd.
    Fsync,
    /// `"batch"`: acknowledge after commit; fsync every `storage.sync_interval`.
    Batch,
    /// `"none"`: never fsync explicitly; the OS writes back when it likes.
    NoSync,
}

/// `[conversations]`
#[derive(Clone, Debug, PartialEq)]
pub struct ConversationsConfig {
    /// At most `websocket.max_message_bytes`.
    pub max_text_bytes: usize,
    pub typing_interval: Duration,
    /// Always greater than `typing_interval`.
    pub typing_expiry: Duration,
    pub agent_grace: Duration,
    pub abuse_limit: u32,
}

/// `[limits]`: admission rates, back-pressure bounds, degradation thresholds, the blocklist.
/// A rate of 0 is unlimited; see `crate::admission`.
#[derive(Clone, Debug, PartialEq)]
pub struct LimitsConfig {
    /// New connections per second per client IP, per shard.
    pub connections_per_ip: f64,
    pub connection_burst: u32,
    /// Chat messages per second per visitor session.
    pub visitor_messages_per_second: f64,
    pub visitor_message_burst: u32,
    /// Frames of any kind per second per visitor session.
    pub visitor_frames_per_second: f64,
    pub visitor_frame_burst: u32,
    /// Chat messages per second per agent session (an agent serves many conversations).
    pub agent_messages_per_second: f64,
    pub agent_message_burst: u32,
    /// Frames of any kind per second per agent session.
    pub agent_frames_per_second: f64,
    pub agent_frame_burst: u32,
    /// Bot queries per second per site, per owner shard.
    pub bot_queries_per_site: f64,
    pub bot_burst: u32,
    /// `conversations.abuse_limit` refusals within this window close a session with 1008.
    pub abuse_window: Duration,
    /// Messages queued toward one shard past which sessions sending there stop reading.
    pub max_queued_per_shard: usize,
    /// Storage operations waiting for a commit past which sessions stop reading.
    pub max_pending_commits: usize,
    /// Frames waiting for one session (outbox plus held back) past which it is closed with 1013.
    pub max_outbox_frames: usize,
    /// Messages a resume replay reads and sends at a time.
    pub replay_chunk: usize,
    /// Frames of one visitor waiting while its conversation is being opened, past which its
    /// further frames are refused with `overloaded`.
    pub max_opening_frames: usize,
    /// Event-loop lag that sheds non-core work; 0 disables.
    pub shed_lag: Duration,
    /// Event-loop lag that refuses new sessions; 0 disables.
    pub refuse_lag: Duration,
    /// Queued items that shed non-core work; 0 disables.
    pub shed_queue: usize,
    /// Queued items that refuse new sessions; 0 disables.
    pub refuse_queue: usize,
    pub recover_after: Duration,
    /// Message-level shedding: a visitor message whose predicted wait (owner's event-loop lag
    /// plus its commit backlog) exceeds this is refused with `overloaded`; zero disables.
    pub admit_latency_budget: Duration,
    /// Rated capacity: visitor chat messages per second one shard admits through its
    /// connections; over it a message is refused with `overloaded`. Zero: unlimited.
    pub shard_messages_per_second: f64,
    /// Burst of `shard_messages_per_second`.
    pub shard_message_burst: u32,
    /// `None`: no blocklist.
    pub blocklist_file: Option<PathBuf>,
    pub blocklist_poll: Duration,
    /// Hostile-input log lines per second per shard; 0 = every one.
    pub log_lines_per_second: u32,
    /// Keys (IPs, sites) each keyed limiter tracks at most.
    pub tracked_keys: usize,
}

/// `[agents]`
#[derive(Clone, Debug, PartialEq)]
pub struct AgentsConfig {
    pub default_max_open: u32,
    /// Development mode: the static `accounts` tokens open `/ws/agent` (warned at start-up).
    pub dev_static_tokens: bool,
    /// Queued conversations go to an available agent by themselves; when false they wait for
    /// an agent's `accept`.
    pub auto_assign: bool,
    /// Keyed by agent id. Tokens are unique across accounts.
    pub accounts: BTreeMap<String, AgentAccount>,
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

/// `[auth]`: agent logins and tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct AuthConfig {
    /// `None` (written as "") means `<storage dir>/auth-secret`.
    pub secret_file: Option<PathBuf>,
    pub token_ttl: Duration,
    pub lockout_failures: u32,
    pub lockout_time: Duration,
    pub min_password_length: usize,
    /// 0 = unlimited.
    pub login_per_ip_per_minute: u32,
    /// 0 = unlimited.
    pub login_per_account_per_minute: u32,
}

impl AuthConfig {
    /// The signing secret's path: `secret_file`, or `auth-secret` under the storage dir.
    pub fn secret_path(&self, storage_dir: &Path) -> PathBuf {
        self.secret_file
            .clone()
            .unwrap_or_else(|| storage_dir.join("auth-secret"))
    }
}

/// `[api]`: the HTTP JSON API under `/api/`.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiConfig {
    pub max_body_bytes: usize,
    /// Largest body of `POST /api/kb/import` (a whole knowledge base).
    pub max_import_bytes: usize,
}

/// `[visitors]`: who may open `/ws/visitor` for which site, and how a host site
/// vouches for its users.
#[derive(Clone, Debug, PartialEq)]
pub struct VisitorsConfig {
    /// Whether a site without a `[visitors.sites.<name>]` table is served (with
    /// no Origin check and no verified identities).
    pub allow_unlisted_sites: bool,
    /// A conversation in which no message was ever stored (opened by a `handoff`),
    /// that no agent holds and no visitor is connected to, is deleted after this idle time.
    pub empty_conversation_ttl: Duration,
    /// Keyed by site name.
    pub sites: BTreeMap<String, SiteConfig>,
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

/// `[inference]`
#[derive(Clone, Debug, PartialEq)]
pub struct InferenceConfig {
    pub enabled: bool,
    pub model: PathBuf,
    pub tokenizer: PathBuf,
    pub ort_library: PathBuf,
    pub max_batch: usize,
    /// Always less than `max_wait`.
    pub batch_window: Duration,
    pub max_wait: Duration,
    pub max_sequence_length: usize,
    /// Prepended to every text before tokenizing (multilingual-e5 wants `"query: "`).
    pub text_prefix: String,
    /// A second encoder whose vectors are appended to the first's; empty = none. Set together
    /// with `companion_tokenizer`.
    pub companion_model: PathBuf,
    pub companion_tokenizer: PathBuf,
    pub companion_text_prefix: String,
    /// The cascade: the companion embeds a query only when the primary model's best score
    /// is below this (1: every query).
    pub companion_below: f64,
    /// `kb import` fine-tunes the model's top layers on the knowledge base (when the model has
    /// an inner output and the knowledge base has at least `fine_tune_min_questions`).
    pub fine_tune: bool,
    /// The fp32 weights the tuned layers start from (safetensors).
    pub fine_tune_weights: PathBuf,
    pub fine_tune_epochs: usize,
    pub fine_tune_min_questions: usize,
}

/// `[bot]`
#[derive(Clone, Debug, PartialEq)]
pub struct BotConfig {
    pub confidence_threshold: f64,
    pub margin_threshold: f64,
    /// Below this cosine between a message and its nearest knowledge-base question, the
    /// intent engine scores the match 0 (the message is about something else).
    pub min_similarity: f64,
    pub failed_turns_before_handoff: u32,
    /// Non-empty, each handler at most once, in the order messages pass through them.
    pub handlers: Vec<BotHandler>,
    pub hot_cache_entries: usize,
    pub embedding_cache_entries: usize,
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

/// `[risk_control]`
#[derive(Clone, Debug, PartialEq)]
pub struct RiskControlConfig {
    pub blocked_words: Vec<String>,
    /// Regular-expression source text; compiled (and syntax-checked) by the risk-control handler.
    pub blocked_patterns: Vec<String>,
    pub mask_card_numbers: bool,
    pub flood_messages: u32,
    pub flood_window: Duration,
}

/// `[audit]`
#[derive(Clone, Debug, PartialEq)]
pub struct AuditConfig {
    /// The audit chain's file; `None` (written as "") means `audit.log` under `storage.dir`.
    pub file: Option<PathBuf>,
}

/// `[tls]`
#[derive(Clone, Debug, PartialEq)]
pub struct TlsConfig {
    /// `None` (written `""`) = no TLS listener.
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain; empty when unset (required when `listen` is set).
    pub cert: PathBuf,
    /// PEM private key; empty when unset (required when `listen` is set).
    pub key: PathBuf,
    /// How often the certificate and key files are checked for changes.
    pub watch_interval: Duration,
}

/// `[metrics]`
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsConfig {
    /// `None` (written `""`): `/metrics` is served on the public listeners to supervisors and
    /// admins (bearer token). An address: a separate plain-HTTP listener serves `/metrics`
    /// there without a token, and the public listeners answer 404 for it.
    pub listen: Option<SocketAddr>,
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

// ---------------------------------------------------------------------------------------------------
// Reading sections: each `set` returns Ok(false) for a key it does not know.
// ---------------------------------------------------------------------------------------------------

impl ServerConfig {
    fn set(&mut self, key: &str, f: &Field<'_>) -> Result<bool, ConfigError> {
        match key {
            "listen" => self.listen = f.socket_addr()?,
            "backlog" => self.backlog = f.integer_in(1, 65_535)?,
            "shutdown_grace" => self.shutdown_grace = f.duration_in(Duration::ZERO, mins(10))?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl ShardsConfig {
    fn set(&mut self, key: &str, f: &Field<'_>) -> Result<bool, ConfigError> {
        match key {
            "cores" => self.cores = f.cores()?,
            "io_memory" => self.io_memory = f.size_in(64 * KIB, 64 * MIB)?,
            "mesh_capacity" => self.mesh_capacity = f.integer_in(1, 1_048_576)?,
            "max_sessions_per_shard" => {
                self.max_sessions_per_shard = f.integer_in(0, 10_000_000)?
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl HttpConfig {
    fn set(&mut self, key: &str, f: &Field<'_>) -> Result<bool, ConfigError> {
        match key {
            "max_header_bytes" => self.max_header_bytes = f.size_in(KIB, MIB)?,
            "max_headers" => self.max_headers = f.integer_in(8, 256)?,
            "handshake_timeout" => self.handshake_timeout = f.duration_in(ms(100), mins(5))?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl WebSocketConfig {
    fn set(&mut self, key: &str, f: &Field<'_>) -> Result<bool, ConfigError> {
        match key {
            "max_message_bytes" => self.max_message_bytes = f.size_in(125, 64 * MIB)?,
            "ping_interval" => self.ping_interval = f.duration_in(secs(1), hours(1))?,
            "idle_timeout" => self.idle_timeout = f.duration_in(secs(2), hours(24))?,
            "read_buffer_bytes" => self.read_buffer_bytes = f.size_in(KIB, MIB)?,
            "pool_max_idle_buffers" => self.pool_max_idle_buffers = f.integer_in(0, 1_000_000)?,
            "write_timeout" => self.write_timeout = f.duration_in(ms(100), mins(10))?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl DiagnosticsConfig {
    fn set(&mut self, key: &str, f: &Field<'_>) -> Result<bool, ConfigError> {
        match key {
            "echo" => self.echo = f.boolean()?,
            "panic_endpoint" => self.panic_endpoint = f.boolean()?,
            "stall_endpoint" => self.stall_endpoint = f.boolean()?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl LogConfig {
    fn set(&mut self, key: &str, f: &Field<'_>) -> Result<bool, ConfigError> {
        match key {
            "format" => self.format = f.choice(LogFormat::CHOICES)?,
            "level" => {
                let level = f.string()?;
                check_log_directives(level).map_err(|reason| f.error(reason))?;
                self.level = level.to_owned();
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// A map size: 1MiB..=1TiB and a multiple of 4KiB.
fn map_size(f: &Field<'_>) -> Result<u64, ConfigError> {
    let bytes: u64 = f.size_in(MIB, TIB)?;
    if !bytes.is_multiple_of(MAP_SIZE_GRANULE) {
        return Err(f.error(format_args!(
            "must be a multiple of 4KiB (4096 bytes), got {}",
            f.written()
        )));
    }
    Ok(bytes)
}

impl StorageConfig {
    fn set(&mut self, key: &str, f: &Field<'_>) -> Result<bool, ConfigError> {
        match key {
            "dir" => self.dir = f.path()?,
            "durability" => self.durability = f.choice(Durability::CHOICES)?,
            "commit_window" => self.commit_window = f.duration_in(Duration::ZERO, secs(1))?,
            "max_batch" => self.max_batch = f.integer_in(1, 100_000)?,
            "sync_interval" => self.sync_interval = f.duration_in(ms(1), mins(1))?,
            "map_size" => self.map_size = map_size(f)?,
            "max_map_size" => self.max_map_size = map_size(f)?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl ConversationsConfig {
    fn set(&mut self, key: &str, f: &Field<'_>) -> Result<bool, ConfigError> {
        match key {
            "max_text_bytes" => self.max_text_bytes = f.size_in(1, MIB)?,
            "typing_interval" => self.typing_interval = f.duration_in(ms(100), mins(1))?,
            "typing_expiry" => self.typing_expiry = f.duration_in(ms(200), mins(10))?,
            "agent_grace" => self.agent_grace = f.duration_in(Duration::ZERO, hours(1))?,
            "abuse_limit" => self.abuse_limit = f.integer_in(1, 1000)?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl LimitsConfig {
    fn set(&mut self, key: &str, f: &Field<'_>) -> Result<bool, ConfigError> {
        match key {
            "connections_per_ip" => self.connections_per_ip = f.float_in(0.0, 1e6)?,
            "connection_burst" => self.connection_burst = f.integer_in(1, 1_000_000)?,
            "visitor_messages_per_second" => {
                self.visitor_messages_per_second = f.float_in(0.0, 1e6)?
            }
            "visitor_message_burst" => self.visitor_message_burst = f.integer_in(1, 1_000_000)?,
            "visitor_frames_per_second" => self.visitor_frames_per_second = f.float_in(0.0, 1e6)?,
            "visitor_frame_burst" => self.visitor_frame_burst = f.integer_in(1, 1_000_000)?,
            "agent_messages_per_second" => self.agent_messages_per_second = f.float_in(0.0, 1e6)?,
            "agent_message_burst" => self.agent_message_burst = f.integer_in(1, 1_000_000)?,
            "agent_frames_per_second" => self.agent_frames_per_second = f.float_in(0.0, 1e6)?,
            "agent_frame_burst" => self.agent_frame_burst = f.integer_in(1, 1_000_000)?,
            "bot_queries_per_site" => self.bot_queries_per_site = f.float_in(0.0, 1e6)?,
            "bot_burst" => self.bot_burst = f.integer_in(1, 1_000_000)?,
            "abuse_window" => self.abuse_window = f.duration_in(secs(1), hours(1))?,
            "max_queued_per_shard" => self.max_queued_per_shard = f.integer_in(16, 10_000_000)?,
            "max_pending_commits" => self.max_pending_commits = f.integer_in(16, 10_000_000)?,
            "max_outbox_frames" => self.max_outbox_frames = f.integer_in(16, 10_000_000)?,
            "replay_chunk" => self.replay_chunk = f.integer_in(1, 1_000_000)?,
            "max_opening_frames" => self.max_opening_frames = f.integer_in(1, 1_000_000)?,
            "shed_lag" => self.shed_lag = f.duration_in(Duration::ZERO, mins(1))?,
            "refuse_lag" => self.refuse_lag = f.duration_in(Duration::ZERO, mins(1))?,
            "shed_queue" => self.shed_queue = f.integer_in(0, 100_000_000)?,
            "refuse_queue" => self.refuse_queue = f.integer_in(0, 100_000_000)?,
            "recover_after" => self.recover_after = f.duration_in(Duration::ZERO, hours(1))?,
            "admit_latency_budget" => {
                self.admit_latency_budget = f.duration_in(Duration::ZERO, mins(1))?
            }
            "shard_messages_per_second" => self.shard_messages_per_second = f.float_in(0.0, 1e7)?,
            "shard_message_burst" => self.shard_message_burst = f.integer_in(1, 10_000_000)?,
            "blocklist_file" => {
                let text = f.text(0, 4096)?;
                self.blocklist_file = (!text.is_empty()).then(|| PathBuf::from(text));
            }
            "blocklist_poll" => self.blocklist_poll = f.duration_in(ms(100), hours(1))?,
            "log_lines_per_second" => self.log_lines_per_second = f.integer_in(0, 1_000_000)?,
            "tracked_keys" => self.tracked_keys = f.integer_in(1, 10_000_000)?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl AgentsConfig {
    /// `accounts` is read by `Builder::apply_accounts`, which merges accounts key by key.
    fn set(&mut self, key: &str, f: &Field<'_>) -> Result<bool, ConfigError> {
        match key {
            "default_max_open" => self.default_max_open = f.integer_in(1, 1000)?,
            "dev_static_tokens" => self.dev_static_tokens = f.boolean()?,
            "auto_assign" => self.auto_assign = f.boolean()?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl AuthConfig {
    fn set(&mut self, key: &str, f: &Field<'_>) -> Result<bool, ConfigError> {
        match key {
            "secret_file" => {
                self.secret_file = match f.string()? {
                    "" => None,
                    _ => Some(f.path()?),
                }
            }
            "token_ttl" => self.token_ttl = f.duration_in(mins(1), hours(24 * 30))?,
            "lockout_failures" => self.lockout_failures = f.integer_in(1, 1000)?,
            "lockout_time" => self.lockout_time = f.duration_in(secs(1), hours(24 * 7))?,
            "min_password_length" => self.min_password_length = f.integer_in(8, 128)?,
            "login_per_ip_per_minute" => self.login_per_ip_per_minute = f.integer_in(0, 100_000)?,
            "login_per_account_per_minute" => {
                self.login_per_account_per_minute = f.integer_in(0, 100_000)?
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl ApiConfig {
    fn set(&mut self, key: &str, f: &Field<'_>) -> Result<bool, ConfigError> {
        match key {
            "max_body_bytes" => self.max_body_bytes = f.size_in(256, MIB)?,
            "max_import_bytes" => self.max_import_bytes = f.size_in(KIB, 256 * MIB)?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl VisitorsConfig {
    /// `sites` is read by `Builder::apply_sites`.
    fn set(&mut self, key: &str, f: &Field<'_>) -> Result<bool, ConfigError> {
        match key {
            "allow_unlisted_sites" => self.allow_unlisted_sites = f.boolean()?,
            "empty_conversation_ttl" => {
                self.empty_conversation_ttl = f.duration_in(secs(1), hours(24 * 30))?
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The table of `site`, if it has one.
    pub fn site(&self, site: &str) -> Option<&SiteConfig> {
        self.sites.get(site)
    }
}

impl InferenceConfig {
    fn set(&mut self, key: &str, f: &Field<'_>) -> Result<bool, ConfigError> {
        match key {
            "enabled" => self.enabled = f.boolean()?,
            "model" => self.model = f.path()?,
            "tokenizer" => self.tokenizer = f.path()?,
            "ort_library" => self.ort_library = f.path()?,
            "max_batch" => self.max_batch = f.integer_in(1, 1024)?,
            "batch_window" => self.batch_window = f.duration_in(Duration::ZERO, secs(1))?,
            "max_wait" => self.max_wait = f.duration_in(ms(1), mins(1))?,
            "max_sequence_length" => self.max_sequence_length = f.integer_in(8, 8192)?,
            "text_prefix" => self.text_prefix = f.text(0, 64)?.to_string(),
            "companion_model" => self.companion_model = f.optional_path()?,
            "companion_tokenizer" => self.companion_tokenizer = f.optional_path()?,
            "companion_text_prefix" => self.companion_text_prefix = f.text(0, 64)?.to_string(),
            "companion_below" => self.companion_below = f.float_in(0.0, 1.0)?,
            "fine_tune" => self.fine_tune = f.boolean()?,
            "fine_tune_weights" => self.fine_tune_weights = f.optional_path()?,
            "fine_tune_epochs" => self.fine_tune_epochs = f.integer_in(1, 20)?,
            "fine_tune_min_questions" => {
                self.fine_tune_min_questions = f.integer_in(1, 10_000_000)?
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl BotConfig {
    fn set(&mut self, key: &str, f: &Field<'_>) -> Result<bool, ConfigError> {
        match key {
            "confidence_threshold" => self.confidence_threshold = f.float_in(0.0, 1.0)?,
            "margin_threshold" => self.margin_threshold = f.float_in(0.0, 1.0)?,
            "min_similarity" => self.min_similarity = f.float_in(0.0, 1.0)?,
            "failed_turns_before_handoff" => {
                self.failed_turns_before_handoff = f.integer_in(1, 100)?
            }
            "handlers" => self.handlers = f.handlers()?,
            "hot_cache_entries" => self.hot_cache_entries = f.integer_in(0, 10_000_000)?,
            "embedding_cache_entries" => {
                self.embedding_cache_entries = f.integer_in(0, 10_000_000)?
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl RiskControlConfig {
    fn set(&mut self, key: &str, f: &Field<'_>) -> Result<bool, ConfigError> {
        match key {
            "blocked_words" => self.blocked_words = f.strings(1, 256)?,
            "blocked_patterns" => self.blocked_patterns = f.strings(1, 4096)?,
            "mask_card_numbers" => self.mask_card_numbers = f.boolean()?,
            "flood_messages" => self.flood_messages = f.integer_in(1, 10_000)?,
            "flood_window" => self.flood_window = f.duration_in(ms(100), hours(1))?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl AuditConfig {
    fn set(&mut self, key: &str, f: &Field<'_>) -> Result<bool, ConfigError> {
        match key {
            "file" => {
                let text = f.text(0, 4096)?;
                self.file = (!text.is_empty()).then(|| PathBuf::from(text));
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl TlsConfig {
    fn set(&mut self, key: &str, f: &Field<'_>) -> Result<bool, ConfigError> {
        match key {
            "listen" => self.listen = f.optional_socket_addr()?,
            "cert" => self.cert = f.optional_path()?,
            "key" => self.key = f.optional_path()?,
            "watch_interval" => self.watch_interval = f.duration_in(ms(100), hours(1))?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl MetricsConfig {
    fn set(&mut self, key: &str, f: &Field<'_>) -> Result<bool, ConfigError> {
        match key {
            "listen" => self.listen = f.optional_socket_addr()?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

// ---------------------------------------------------------------------------------------------------
// Writing: the one list of keys. Order here is the order `config print` shows.
// ---------------------------------------------------------------------------------------------------

impl Config {
    fn write_toml(&self, w: &mut TomlWriter) {
        let Config {
            server,
            shards,
            http,
            websocket: ws,
            diagnostics,
            log,
            storage,
            conversations: conv,
            agents,
            auth,
            api,
            inference: inf,
            bot,
            risk_control: risk,
            audit,
            visitors,
            limits,
            tls,
            metrics,
            origins: _,
        } = self;

        w.section("server");
        w.string("listen", &server.listen.to_string());
        w.display("backlog", server.backlog);
        w.duration("shutdown_grace", server.shutdown_grace);

        w.section("shards");
        match &shards.cores {
            Cores::All => w.string("cores", "all"),
            Cores::List(ids) => {
                let ids: Vec<String> = ids.iter().map(usize::to_string).collect();
                w.raw("cores", &format!("[{}]", ids.join(", ")));
            }
        }
        w.size("io_memory", shards.io_memory as u64);
        w.display("mesh_capacity", shards.mesh_capacity);
        w.display("max_sessions_per_shard", shards.max_sessions_per_shard);

        w.section("http");
        w.size("max_header_bytes", http.max_header_bytes as u64);
        w.display("max_headers", http.max_headers);
        w.duration("handshake_timeout", http.handshake_timeout);

        w.section("websocket");
        w.size("max_message_bytes", ws.max_message_bytes as u64);
        w.duration("ping_interval", ws.ping_interval);
        w.duration("idle_timeout", ws.idle_timeout);
        w.size("read_buffer_bytes", ws.read_buffer_bytes as u64);
        w.display("pool_max_idle_buffers", ws.pool_max_idle_buffers);
        w.duration("write_timeout", ws.write_timeout);

        w.section("diagnostics");
        w.display("echo", diagnostics.echo);
        w.display("panic_endpoint", diagnostics.panic_endpoint);
        w.display("stall_endpoint", diagnostics.stall_endpoint);

        w.section("log");
        w.string("format", log.format.as_str());
        w.string("level", &log.level);

        w.section("storage");
        w.path("dir", &storage.dir);
        w.string("durability", storage.durability.as_str());
        w.duration("commit_window", storage.commit_window);
        w.display("max_batch", storage.max_batch);
        w.duration("sync_interval", storage.sync_interval);
        w.size("map_size", storage.map_size);
        w.size("max_map_size", storage.max_map_size);

        w.section("conversations");
        w.size("max_text_bytes", conv.max_text_bytes as u64);
        w.duration("typing_interval", conv.typing_interval);
        w.duration("typing_expiry", conv.typing_expiry);
        w.duration("agent_grace", conv.agent_grace);
        w.display("abuse_limit", conv.abuse_limit);

        w.section("agents");
        w.display("default_max_open", agents.default_max_open);
        w.display("dev_static_tokens", agents.dev_static_tokens);
        w.display("auto_assign", agents.auto_assign);
        w.section("agents.accounts");
        for (id, account) in &agents.accounts {
            w.section(&format!("agents.accounts.{id}"));
            w.string("token", &account.token);
            w.string("name", &account.name);
            w.display("max_open", account.max_open);
        }

        w.section("auth");
        match &auth.secret_file {
            Some(path) => w.path("secret_file", path),
            None => w.string("secret_file", ""),
        }
        w.duration("token_ttl", auth.token_ttl);
        w.display("lockout_failures", auth.lockout_failures);
        w.duration("lockout_time", auth.lockout_time);
        w.display("min_password_length", auth.min_password_length);
        w.display("login_per_ip_per_minute", auth.login_per_ip_per_minute);
        w.display(
            "login_per_account_per_minute",
            auth.login_per_account_per_minute,
        );

        w.section("api");
        w.size("max_body_bytes", api.max_body_bytes as u64);
        w.size("max_import_bytes", api.max_import_bytes as u64);

        w.section("inference");
        w.display("enabled", inf.enabled);
        w.path("model", &inf.model);
        w.path("tokenizer", &inf.tokenizer);
        w.path("ort_library", &inf.ort_library);
        w.display("max_batch", inf.max_batch);
        w.duration("batch_window", inf.batch_window);
        w.duration("max_wait", inf.max_wait);
        w.display("max_sequence_length", inf.max_sequence_length);
        w.string("text_prefix", &inf.text_prefix);
        w.path("companion_model", &inf.companion_model);
        w.path("companion_tokenizer", &inf.companion_tokenizer);
        w.string("companion_text_prefix", &inf.companion_text_prefix);
        w.float("companion_below", inf.companion_below);
        w.display("fine_tune", inf.fine_tune);
        w.path("fine_tune_weights", &inf.fine_tune_weights);
        w.display("fine_tune_epochs", inf.fine_tune_epochs);
        w.display("fine_tune_min_questions", inf.fine_tune_min_questions);

        w.section("bot");
        w.float("confidence_threshold", bot.confidence_threshold);
        w.float("margin_threshold", bot.margin_threshold);
        w.float("min_similarity", bot.min_similarity);
        w.display(
            "failed_turns_before_handoff",
            bot.failed_turns_before_handoff,
        );
        w.strings("handlers", bot.handlers.iter().map(|h| h.as_str()));
        w.display("hot_cache_entries", bot.hot_cache_entries);
        w.display("embedding_cache_entries", bot.embedding_cache_entries);

        w.section("risk_control");
        w.strings(
            "blocked_words",
            risk.blocked_words.iter().map(String::as_str),
        );
        w.strings(
            "blocked_patterns",
            risk.blocked_patterns.iter().map(String::as_str),
        );
        w.display("mask_card_numbers", risk.mask_card_numbers);
        w.display("flood_messages", risk.flood_messages);
        w.duration("flood_window", risk.flood_window);

        w.section("audit");
        w.path("file", audit.file.as_deref().unwrap_or(Path::new("")));
        w.section("visitors");
        w.display("allow_unlisted_sites", visitors.allow_unlisted_sites);
        w.duration("empty_conversation_ttl", visitors.empty_conversation_ttl);
        w.section("visitors.sites");
        for (name, site) in &visitors.sites {
            w.section(&format!("visitors.sites.{}", toml_key(name)));
            w.strings("origins", site.origins.iter().map(String::as_str));
            match &site.identity_key_source {
                Some(IdentityKeySource::Inline(key)) => w.string("identity_key", key),
                Some(IdentityKeySource::File(path)) => w.path("identity_key_file", path),
                None => {}
            }
        }
        w.section("limits");
        w.float("connections_per_ip", limits.connections_per_ip);
        w.display("connection_burst", limits.connection_burst);
        w.float(
            "visitor_messages_per_second",
            limits.visitor_messages_per_second,
        );
        w.display("visitor_message_burst", limits.visitor_message_burst);
        w.float(
            "visitor_frames_per_second",
            limits.visitor_frames_per_second,
        );
        w.display("visitor_frame_burst", limits.visitor_frame_burst);
        w.float(
            "agent_messages_per_second",
            limits.agent_messages_per_second,
        );
        w.display("agent_message_burst", limits.agent_message_burst);
        w.float("agent_frames_per_second", limits.agent_frames_per_second);
        w.display("agent_frame_burst", limits.agent_frame_burst);
        w.float("bot_queries_per_site", limits.bot_queries_per_site);
        w.display("bot_burst", limits.bot_burst);
        w.duration("abuse_window", limits.abuse_window);
        w.display("max_queued_per_shard", limits.max_queued_per_shard);
        w.display("max_pending_commits", limits.max_pending_commits);
        w.display("max_outbox_frames", limits.max_outbox_frames);
        w.display("replay_chunk", limits.replay_chunk);
        w.display("max_opening_frames", limits.max_opening_frames);
        w.duration("shed_lag", limits.shed_lag);
        w.duration("refuse_lag", limits.refuse_lag);
        w.display("shed_queue", limits.shed_queue);
        w.display("refuse_queue", limits.refuse_queue);
        w.duration("recover_after", limits.recover_after);
        w.duration("admit_latency_budget", limits.admit_latency_budget);
        w.display(
            "shard_messages_per_second",
            limits.shard_messages_per_second,
        );
        w.display("shard_message_burst", limits.shard_message_burst);
        w.path(
            "blocklist_file",
            limits.blocklist_file.as_deref().unwrap_or(Path::new("")),
        );
        w.duration("blocklist_poll", limits.blocklist_poll);
        w.display("log_lines_per_second", limits.log_lines_per_second);
        w.display("tracked_keys", limits.tracked_keys);
        w.section("tls");
        w.string(
            "listen",
            &tls.listen.map(|addr| addr.to_string()).unwrap_or_default(),
        );
        w.path("cert", &tls.cert);
        w.path("key", &tls.key);
        w.duration("watch_interval", tls.watch_interval);
        w.section("metrics");
        w.string(
            "listen",
            &metrics
                .listen
                .map(|addr| addr.to_string())
                .unwrap_or_default(),
        );
    }

    /// Placeholder values the embedded default overwrites entirely (it must set every key).
    fn blank() -> Config {
        Config {
            server: ServerConfig {
                listen: SocketAddr::from(([0, 0, 0, 0], 0)),
                backlog: 0,
                shutdown_grace: Duration::ZERO,
            },
            shards: ShardsConfig {
                cores: Cores::All,
                io_memory: 0,
                mesh_capacity: 0,
                max_sessions_per_shard: 0,
            },
            http: HttpConfig {
                max_header_bytes: 0,
                max_headers: 0,
                handshake_timeout: Duration::ZERO,
            },
            websocket: WebSocketConfig {
                max_message_bytes: 0,
                ping_interval: Duration::ZERO,
                idle_timeout: Duration::ZERO,
                read_buffer_bytes: 0,
                pool_max_idle_buffers: 0,
                write_timeout: Duration::ZERO,
            },
            diagnostics: DiagnosticsConfig {
                echo: false,
                panic_endpoint: false,
                stall_endpoint: false,
            },
            log: LogConfig {
                format: LogFormat::Auto,
                level: String::new(),
            },
            storage: StorageConfig {
                dir: PathBuf::new(),
                durability: Durability::Fsync,
                commit_window: Duration::ZERO,
                max_batch: 0,
                sync_interval: Duration::ZERO,
                map_size: 0,
                max_map_size: 0,
            },
            conversations: ConversationsConfig {
                max_text_bytes: 0,
                typing_interval: Duration::ZERO,
                typing_expiry: Duration::ZERO,
                agent_grace: Duration::ZERO,
                abuse_limit: 0,
            },
            agents: AgentsConfig {
                default_max_open: 0,
                dev_static_tokens: false,
                auto_assign: false,
                accounts: BTreeMap::new(),
            },
            auth: AuthConfig {
                secret_file: None,
                token_ttl: Duration::ZERO,
                lockout_failures: 0,
                lockout_time: Duration::ZERO,
                min_password_length: 0,
                login_per_ip_per_minute: 0,
                login_per_account_per_minute: 0,
            },
            api: ApiConfig {
                max_body_bytes: 0,
                max_import_bytes: 0,
            },
            inference: InferenceConfig {
                enabled: false,
                model: PathBuf::new(),
                tokenizer: PathBuf::new(),
                ort_library: PathBuf::new(),
                max_batch: 0,
                batch_window: Duration::ZERO,
                max_wait: Duration::ZERO,
                max_sequence_length: 0,
                text_prefix: String::new(),
                companion_model: PathBuf::new(),
                companion_tokenizer: PathBuf::new(),
                companion_text_prefix: String::new(),
                companion_below: 0.0,
                fine_tune: false,
                fine_tune_weights: PathBuf::new(),
                fine_tune_epochs: 0,
                fine_tune_min_questions: 0,
            },
            bot: BotConfig {
                confidence_threshold: 0.0,
                margin_threshold: 0.0,
                min_similarity: 0.0,
                failed_turns_before_handoff: 0,
                handlers: Vec::new(),
                hot_cache_entries: 0,
                embedding_cache_entries: 0,
            },
            risk_control: RiskControlConfig {
                blocked_words: Vec::new(),
                blocked_patterns: Vec::new(),
                mask_card_numbers: false,
                flood_messages: 0,
                flood_window: Duration::ZERO,
            },
            audit: AuditConfig { file: None },
            visitors: VisitorsConfig {
                allow_unlisted_sites: false,
                empty_conversation_ttl: Duration::ZERO,
                sites: BTreeMap::new(),
            },
            limits: LimitsConfig {
                connections_per_ip: 0.0,
                connection_burst: 0,
                visitor_messages_per_second: 0.0,
                visitor_message_burst: 0,
                visitor_frames_per_second: 0.0,
                visitor_frame_burst: 0,
                agent_messages_per_second: 0.0,
                agent_message_burst: 0,
                agent_frames_per_second: 0.0,
                agent_frame_burst: 0,
                bot_queries_per_site: 0.0,
                bot_burst: 0,
                abuse_window: Duration::ZERO,
                max_queued_per_shard: 0,
                max_pending_commits: 0,
                max_outbox_frames: 0,
                replay_chunk: 0,
                max_opening_frames: 0,
                shed_lag: Duration::ZERO,
                refuse_lag: Duration::ZERO,
                shed_queue: 0,
                refuse_queue: 0,
                recover_after: Duration::ZERO,
                admit_latency_budget: Duration::ZERO,
                shard_messages_per_second: 0.0,
                shard_message_burst: 0,
                blocklist_file: None,
                blocklist_poll: Duration::ZERO,
                log_lines_per_second: 0,
                tracked_keys: 0,
            },
            tls: TlsConfig {
                listen: None,
                cert: PathBuf::new(),
                key: PathBuf::new(),
                watch_interval: Duration::ZERO,
            },
            metrics: MetricsConfig { listen: None },
            origins: Origins::default(),
        }
    }
}

/// Every known dotted key, sections included (e.g. `server`, `server.listen`, `agents.accounts`).
fn known_keys() -> Vec<String> {
    let mut writer = TomlWriter::default();
    Config::blank().write_toml(&mut writer);
    writer.keys
}

/// The valid keys directly under `parent` ("" for the top level), for "unknown key" messages.
fn valid_children(parent: &str) -> String {
    let children: Vec<String> = known_keys()
        .into_iter()
        .filter_map(|key| {
            let rest = if parent.is_empty() {
                Some(key.as_str())
            } else {
                key.strip_prefix(parent).and_then(|r| r.strip_prefix('.'))
            }?;
            (!rest.contains('.')).then(|| rest.to_owned())
        })
        .collect();
    children.join(", ")
}

/// Builds TOML text and records each dotted key written.
#[derive(Default)]
struct TomlWriter {
    out: String,
    keys: Vec<String>,
    section: String,
}

impl TomlWriter {
    fn section(&mut self, name: &str) {
        if !self.out.is_empty() {
            self.out.push('\n');
        }
        let _ = writeln!(self.out, "[{name}]");
        self.section = name.to_owned();
        self.keys.push(name.to_owned());
    }

    /// `value` must already be a TOML literal.
    fn raw(&mut self, key: &str, value: &str) {
        let _ = writeln!(self.out, "{key} = {value}");
        self.keys.push(format!("{}.{key}", self.section));
    }

    fn display(&mut self, key: &str, value: impl fmt::Display) {
        self.raw(key, &value.to_string());
    }

    fn string(&mut self, key: &str, value: &str) {
        self.raw(key, &Value::from(value).to_string());
    }

    fn path(&mut self, key: &str, value: &Path) {
        self.string(key, &value.to_string_lossy());
    }

    fn float(&mut self, key: &str, value: f64) {
        self.raw(key, &Value::from(value).to_string());
    }

    fn duration(&mut self, key: &str, value: Duration) {
        self.string(key, &format_duration(value));
    }

    fn size(&mut self, key: &str, bytes: u64) {
        let text = format_size(bytes);
        if text.bytes().all(|b| b.is_ascii_digit()) {
            self.raw(key, &text);
        } else {
            self.string(key, &text);
        }
    }

    fn strings<'s>(&mut self, key: &str, items: impl Iterator<Item = &'s str>) {
        let items: Vec<String> = items.map(|s| Value::from(s).to_string()).collect();
        self.raw(key, &format!("[{}]", items.join(", ")));
    }
}

// ---------------------------------------------------------------------------------------------------
// Loading: parse each layer, apply it key by key, then check rules spanning several keys.
// ---------------------------------------------------------------------------------------------------

fn load_layers(default_text: &str, overlays: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let mut builder = Builder::new();
    let default = Source::parse(EMBEDDED_DEFAULT_NAME, default_text, 0)?;
    builder.apply(&default)?;
    builder.require_complete()?;
    for (index, (name, text)) in overlays.iter().enumerate() {
        let source = Source::parse(name, text, index + 1)?;
        builder.apply(&source)?;
    }
    builder.finish()
}

/// One parsed layer: the embedded default (layer 0) or an overlay file.
struct Source<'t> {
    name: &'t str,
    text: &'t str,
    layer: usize,
    doc: ImDocument<&'t str>,
}

impl<'t> Source<'t> {
    fn parse(name: &'t str, text: &'t str, layer: usize) -> Result<Self, ConfigError> {
        let doc = ImDocument::parse(text).map_err(|error| ConfigError::Syntax {
            file: name.to_owned(),
            line: error.span().map_or(1, |span| line_at(text, span.start)),
            message: one_line(error.message()),
        })?;
        Ok(Source {
            name,
            text,
            layer,
            doc,
        })
    }

    /// The value as written, on one line and shortened, for messages.
    fn snippet(&self, value: &Value) -> String {
        let written = match value.span().and_then(|span| self.text.get(span)) {
            Some(text) => text.trim().to_owned(),
            None => value.to_string().trim().to_owned(),
        };
        let first_line = written.lines().next().unwrap_or("");
        let mut shown: String = first_line.chars().take(60).collect();
        if shown.len() < written.len() {
            shown.push('…');
        }
        shown
    }
}

fn line_at(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn one_line(message: &str) -> String {
    let parts: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    parts.join("; ")
}

/// Where each dotted key (and each section) got its effective value.
#[derive(Clone, Default)]
struct Origins(HashMap<String, Origin>);

#[derive(Clone, Debug)]
struct Origin {
    file: String,
    line: usize,
    layer: usize,
}

/// Origins say where values came from, not what they are: configs with equal values are equal.
impl PartialEq for Origins {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl fmt::Debug for Origins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Origins { .. }")
    }
}

impl Origins {
    fn record(&mut self, field: &Field<'_>) {
        self.0.insert(
            field.key.clone(),
            Origin {
                file: field.src.name.to_owned(),
                line: field.line,
                layer: field.src.layer,
            },
        );
    }

    /// The origin of `key`, or of its nearest recorded parent (an optional key that was never set
    /// is located at its table).
    fn find(&self, key: &str) -> Option<&Origin> {
        let mut key = key;
        loop {
            if let Some(origin) = self.0.get(key) {
                return Some(origin);
            }
            key = &key[..key.rfind('.')?];
        }
    }

    /// (layer, line): larger means set later, i.e. by the overlay rather than the default.
    fn rank(&self, key: &str) -> (usize, usize) {
        self.find(key).map_or((0, 0), |o| (o.layer, o.line))
    }

    fn error_at(&self, key: &str, message: impl fmt::Display) -> ConfigError {
        let (file, line) = match self.find(key) {
            Some(origin) => (origin.file.clone(), origin.line),
            None => (EMBEDDED_DEFAULT_NAME.to_owned(), 1),
        };
        ConfigError::Invalid {
            file,
            line,
            key: key.to_owned(),
            message: message.to_string(),
        }
    }
}

/// An agent account as merged so far; optional keys are filled in by `Builder::finish`.
#[derive(Default)]
struct PartialAccount {
    token: Option<String>,
    name: Option<String>,
    max_open: Option<u32>,
}

struct Builder {
    config: Config,
    accounts: BTreeMap<String, PartialAccount>,
    origins: Origins,
}

impl Builder {
    fn new() -> Self {
        Builder {
            config: Config::blank(),
            accounts: BTreeMap::new(),
            origins: Origins::default(),
        }
    }

    fn apply(&mut self, source: &Source<'_>) -> Result<(), ConfigError> {
        let root = Field::root(source);
        let top: &dyn TableLike = source.doc.as_table();
        for (name, item) in top.iter() {
            let section = root.child(top, name, item);
            if !known_keys().iter().any(|k| k == name) {
                return Err(section.error(format_args!(
                    "unknown section; valid sections are: {}",
                    valid_children("")
                )));
            }
            let entries = section.table("a table")?;
            self.origins.record(&section);
            for (key, item) in entries.iter() {
                let field = section.child(entries, key, item);
                if !self.set(name, key, &field)? {
                    return Err(field.error(format_args!(
                        "unknown key; valid keys in [{name}] are: {}",
                        valid_children(name)
                    )));
                }
                self.origins.record(&field);
            }
        }
        Ok(())
    }

    fn set(&mut self, section: &str, key: &str, f: &Field<'_>) -> Result<bool, ConfigError> {
        let c = &mut self.config;
        match section {
            "server" => c.server.set(key, f),
            "shards" => c.shards.set(key, f),
            "http" => c.http.set(key, f),
            "websocket" => c.websocket.set(key, f),
            "diagnostics" => c.diagnostics.set(key, f),
            "log" => c.log.set(key, f),
            "storage" => c.storage.set(key, f),
            "conversations" => c.conversations.set(key, f),
            "agents" if key == "accounts" => self.apply_accounts(f).map(|()| true),
            "agents" => c.agents.set(key, f),
            "auth" => c.auth.set(key, f),
            "api" => c.api.set(key, f),
            "inference" => c.inference.set(key, f),
            "bot" => c.bot.set(key, f),
            "risk_control" => c.risk_control.set(key, f),
            "audit" => c.audit.set(key, f),
            "visitors" if key == "sites" => self.apply_sites(f).map(|()| true),
            "visitors" => c.visitors.set(key, f),
            "limits" => c.limits.set(key, f),
            "tls" => c.tls.set(key, f),
            "metrics" => c.metrics.set(key, f),
            _ => Ok(false),
        }
    }

    fn apply_accounts(&mut self, accounts: &Field<'_>) -> Result<(), ConfigError> {
        let table = accounts.table("a table of agent accounts")?;
        for (id, item) in table.iter() {
            let account = accounts.child(table, id, item);
            check_account_id(id).map_err(|reason| account.error(reason))?;
            let entries = account.table("a table with token, name and max_open")?;
            self.origins.record(&account);
            let partial = self.accounts.entry(id.to_owned()).or_default();
            for (key, item) in entries.iter() {
                let field = account.child(entries, key, item);
                match key {
                    "token" => partial.token = Some(field.token()?),
                    "name" => partial.name = Some(field.display_name()?),
                    "max_open" => partial.max_open = Some(field.integer_in(1, 1000)?),
                    _ => return Err(field.error(
                        "unknown key in an agent account; valid keys are: token, name, max_open",
                    )),
                }
                self.origins.record(&field);
            }
        }
        Ok(())
    }

    fn apply_sites(&mut self, sites: &Field<'_>) -> Result<(), ConfigError> {
        let table = sites.table("a table of sites")?;
        for (name, item) in table.iter() {
            let site = sites.child(table, name, item);
            if !valid_site_name(name) {
                return Err(site.error(format_args!(
                    "invalid site name \"{name}\": use 1 to 128 characters of A-Z a-z 0-9 . _ -"
                )));
            }
            let entries = site.table("a table with origins, identity_key or identity_key_file")?;
            self.origins.record(&site);
            let config = self
                .config
                .visitors
                .sites
                .entry(name.to_owned())
                .or_insert(SiteConfig {
                    origins: Vec::new(),
                    identity_key_source: None,
                    identity_key: None,
                });
            for (key, item) in entries.iter() {
                let field = site.child(entries, key, item);
                match key {
                    "origins" => {
                        let origins = field.strings(1, 512)?;
                        for origin in &origins {
                            check_origin(origin).map_err(|reason| field.error(reason))?;
                        }
                        config.origins = origins;
                    }
                    "identity_key" => {
                        let key = field.string()?;
                        if key.len() < 32 {
                            return Err(field.error(format_args!(
                                "must be at least 32 bytes of random text, got {}",
                                key.len()
                            )));
                        }
                        config.identity_key = Some(key.as_bytes().to_vec());
                        config.identity_key_source = Some(IdentityKeySource::Inline(key.to_owned()));
                    }
                    "identity_key_file" => {
                        let path = field.path()?;
                        let bytes = std::fs::read(&path).map_err(|err| {
                            field.error(format_args!("cannot read {}: {err}", path.display()))
                        })?;
                        let key = trim_line_break(&bytes);
                        if key.len() < 32 {
                            return Err(field.error(format_args!(
                                "{} holds {} bytes; an identity key needs at least 32",
                                path.display(),
                                key.len()
                            )));
                        }
                        config.identity_key = Some(key.to_vec());
                        config.identity_key_source = Some(IdentityKeySource::File(path));
                    }
                    _ => {
                        return Err(field.error(
                            "unknown key in a site; valid keys are: origins, identity_key, identity_key_file",
                        ))
                    }
                }
                self.origins.record(&field);
            }
        }
        Ok(())
    }

    /// The embedded default must set every key (so it documents every key).
    fn require_complete(&self) -> Result<(), ConfigError> {
        match known_keys()
            .into_iter()
            .find(|key| !self.origins.0.contains_key(key))
        {
            Some(key) => Err(ConfigError::Incomplete {
                file: EMBEDDED_DEFAULT_NAME.to_owned(),
                key,
            }),
            None => Ok(()),
        }
    }

    fn finish(mut self) -> Result<Config, ConfigError> {
        self.finish_accounts()?;
        self.check_cross_field_rules()?;
        self.config.origins = self.origins;
        Ok(self.config)
    }

    fn finish_accounts(&mut self) -> Result<(), ConfigError> {
        let default_max_open = self.config.agents.default_max_open;
        let mut accounts = BTreeMap::new();
        for (id, partial) in std::mem::take(&mut self.accounts) {
            let token = partial.token.ok_or_else(|| {
                self.origins.error_at(
                    &format!("agents.accounts.{id}.token"),
                    "required: every agent account needs a token",
                )
            })?;
            let account = AgentAccount {
                token,
                name: partial.name.unwrap_or_else(|| id.clone()),
                max_open: partial.max_open.unwrap_or(default_max_open),
            };
            accounts.insert(id, account);
        }

        let mut owner_of_token: HashMap<&str, &str> = HashMap::new();
        for (id, account) in &accounts {
            if let Some(other) = owner_of_token.insert(&account.token, id) {
                let key = format!("agents.accounts.{id}.token");
                let other_key = format!("agents.accounts.{other}.token");
                let (blamed, partner) = if self.origins.rank(&key) >= self.origins.rank(&other_key)
                {
                    (id.as_str(), other)
                } else {
                    (other, id.as_str())
                };
                return Err(self.origins.error_at(
                    &format!("agents.accounts.{blamed}.token"),
                    format_args!(
                        "same token as agents.accounts.{partner}; every account needs its own token"
                    ),
                ));
            }
        }
        self.config.agents.accounts = accounts;
        Ok(())
    }

    fn check_cross_field_rules(&self) -> Result<(), ConfigError> {
        let c = &self.config;
        let d = format_duration;
        if c.tls.listen.is_some() {
            for (key, path) in [("tls.cert", &c.tls.cert), ("tls.key", &c.tls.key)] {
                if path.as_os_str().is_empty() {
                    return Err(self.origins.error_at(
                        key,
                        "required when tls.listen is set (`switchboard tls self-signed` writes a pair)",
                    ));
                }
            }
        }
        if let Some(metrics) = c.metrics.listen {
            let public = [Some(c.server.listen), c.tls.listen];
            if metrics.port() != 0 && public.contains(&Some(metrics)) {
                return Err(self.origins.error_at(
                    "metrics.listen",
                    "must differ from server.listen and tls.listen: the metrics listener is a \
                     separate socket, served without a token",
                ));
            }
        }
        let companion = &c.inference;
        if companion.companion_model.as_os_str().is_empty()
            != companion.companion_tokenizer.as_os_str().is_empty()
        {
            let key = if companion.companion_model.as_os_str().is_empty() {
                "inference.companion_model"
            } else {
                "inference.companion_tokenizer"
            };
            return Err(self.origins.error_at(
                key,
                "companion_model and companion_tokenizer are set together (both \"\" for none)",
            ));
        }
        self.ordered(
            ("websocket.ping_interval", d(c.websocket.ping_interval)),
            ("websocket.idle_timeout", d(c.websocket.idle_timeout)),
            c.websocket.ping_interval < c.websocket.idle_timeout,
            Strictness::Strict,
        )?;
        self.ordered(
            (
                "conversations.typing_interval",
                d(c.conversations.typing_interval),
            ),
            (
                "conversations.typing_expiry",
                d(c.conversations.typing_expiry),
            ),
            c.conversations.typing_interval < c.conversations.typing_expiry,
            Strictness::Strict,
        )?;
        self.ordered(
            ("storage.map_size", format_size(c.storage.map_size)),
            ("storage.max_map_size", format_size(c.storage.max_map_size)),
            c.storage.map_size <= c.storage.max_map_size,
            Strictness::OrEqual,
        )?;
        self.ordered(
            ("inference.batch_window", d(c.inference.batch_window)),
            ("inference.max_wait", d(c.inference.max_wait)),
            c.inference.batch_window < c.inference.max_wait,
            Strictness::Strict,
        )?;
        self.ordered(
            (
                "conversations.max_text_bytes",
                c.conversations.max_text_bytes.to_string(),
            ),
            (
                "websocket.max_message_bytes",
                c.websocket.max_message_bytes.to_string(),
            ),
            c.conversations.max_text_bytes <= c.websocket.max_message_bytes,
            Strictness::OrEqual,
        )
    }

    /// Checks `lower < upper` (or `<=`); on failure blames whichever key was set later, so the error
    /// points into the overlay that broke the rule rather than at the default it conflicts with.
    fn ordered(
        &self,
        (lower, lower_shown): (&str, String),
        (upper, upper_shown): (&str, String),
        holds: bool,
        strictness: Strictness,
    ) -> Result<(), ConfigError> {
        if holds {
            return Ok(());
        }
        let (greater, smaller) = match strictness {
            Strictness::Strict => ("greater than", "less than"),
            Strictness::OrEqual => ("at least", "at most"),
        };
        Err(if self.origins.rank(upper) >= self.origins.rank(lower) {
            self.origins.error_at(
                upper,
                format_args!("must be {greater} {lower} ({lower_shown}), got {upper_shown}"),
            )
        } else {
            self.origins.error_at(
                lower,
                format_args!("must be {smaller} {upper} ({upper_shown}), got {lower_shown}"),
            )
        })
    }
}

#[derive(Clone, Copy)]
enum Strictness {
    Strict,
    OrEqual,
}

// ---------------------------------------------------------------------------------------------------
// Field: one value in one source, with its dotted key and line, and typed readers that give errors
// naming both.
// ---------------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    /// An element of an array.
    Element(&'a Value),
}

struct Field<'a> {
    src: &'a Source<'a>,
    key: String,
    line: usize,
    node: Node<'a>,
    /// Index within its array, for array elements.
    element: Option<usize>,
}

impl<'a> Field<'a> {
    fn root(src: &'a Source<'a>) -> Self {
        Field {
            src,
            key: String::new(),
            line: 1,
            node: Node::Item(src.doc.as_item()),
            element: None,
        }
    }

    fn child(&self, table: &'a dyn TableLike, name: &str, item: &'a Item) -> Field<'a> {
        let span = table
            .key(name)
            .and_then(|k| k.span())
            .or_else(|| item.span());
        let line = span.map_or(self.line, |span| line_at(self.src.text, span.start));
        let key = if self.key.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.key)
        };
        Field {
            src: self.src,
            key,
            line,
            node: Node::Item(item),
            element: None,
        }
    }

    fn error(&self, message: impl fmt::Display) -> ConfigError {
        let message = match self.element {
            Some(index) => format!("element {}: {message}", index + 1),
            None => message.to_string(),
        };
        ConfigError::Invalid {
            file: self.src.name.to_owned(),
            line: self.line,
            key: self.key.clone(),
            message,
        }
    }

    fn wrong_type(&self, expected: &str) -> ConfigError {
        self.error(format_args!("expected {expected}, got {}", self.describe()))
    }

    /// Type and text of the value, e.g. `integer 10`, `string "abc"`, `a table`.
    fn describe(&self) -> String {
        let value = match self.node {
            Node::Item(Item::Value(value)) | Node::Element(value) => value,
            Node::Item(Item::Table(_)) => return "a table".to_owned(),
            Node::Item(Item::ArrayOfTables(_)) => return "an array of tables".to_owned(),
            Node::Item(Item::None) => return "nothing".to_owned(),
        };
        let kind = match value {
            Value::String(_) => "string",
            Value::Integer(_) => "integer",
            Value::Float(_) => "float",
            Value::Boolean(_) => "boolean",
            Value::Datetime(_) => "datetime",
            Value::Array(_) => "array",
            Value::InlineTable(_) => "inline table",
        };
        format!("{kind} {}", self.src.snippet(value))
    }

    /// The value as written in the file, for "got ..." in messages.
    fn written(&self) -> String {
        match self.value() {
            Some(value) => self.src.snippet(value),
            None => self.describe(),
        }
    }

    fn value(&self) -> Option<&'a Value> {
        match self.node {
            Node::Item(item) => item.as_value(),
            Node::Element(value) => Some(value),
        }
    }

    fn table(&self, expected: &str) -> Result<&'a dyn TableLike, ConfigError> {
        let table = match self.node {
            Node::Item(item) => item.as_table_like(),
            Node::Element(value) => value.as_inline_table().map(|t| t as &dyn TableLike),
        };
        table.ok_or_else(|| self.wrong_type(expected))
    }

    fn elements(&self, expected: &str) -> Result<Vec<Field<'a>>, ConfigError> {
        let array = self
            .value()
            .and_then(Value::as_array)
            .ok_or_else(|| self.wrong_type(expected))?;
        Ok(array
            .iter()
            .enumerate()
            .map(|(index, value)| Field {
                src: self.src,
                key: self.key.clone(),
                line: value
                    .span()
                    .map_or(self.line, |span| line_at(self.src.text, span.start)),
                node: Node::Element(value),
                element: Some(index),
            })
            .collect())
    }

    fn boolean(&self) -> Result<bool, ConfigError> {
        self.value()
            .and_then(Value::as_bool)
            .ok_or_else(|| self.wrong_type("true or false"))
    }

    fn string(&self) -> Result<&'a str, ConfigError> {
        self.value()
            .and_then(Value::as_str)
            .ok_or_else(|| self.wrong_type("a string"))
    }

    /// A string of `min..=max` characters without control characters.
    fn text(&self, min: usize, max: usize) -> Result<&'a str, ConfigError> {
        let text = self.string()?;
        let chars = text.chars().count();
        if chars < min || chars > max {
            return Err(self.error(format_args!(
                "must be {min} to {max} characters long, got {chars}"
            )));
        }
        if text.chars().any(char::is_control) {
            return Err(self.error("must not contain control characters"));
        }
        Ok(text)
    }

    fn path(&self) -> Result<PathBuf, ConfigError> {
        Ok(PathBuf::from(self.text(1, 4096)?))
    }

    /// A path, or `""` for none (an empty `PathBuf`).
    fn optional_path(&self) -> Result<PathBuf, ConfigError> {
        Ok(PathBuf::from(self.text(0, 4096)?))
    }

    fn integer_in<T: TryFrom<i64>>(&self, min: i64, max: i64) -> Result<T, ConfigError> {
        let n = self
            .value()
            .and_then(Value::as_integer)
            .ok_or_else(|| self.wrong_type("an integer"))?;
        if !(min..=max).contains(&n) {
            return Err(self.error(format_args!(
                "must be between {min} and {max}, got {}",
                self.written()
            )));
        }
        T::try_from(n).map_err(|_| self.error("does not fit this platform's integer size"))
    }

    fn float_in(&self, min: f64, max: f64) -> Result<f64, ConfigError> {
        let x = match self.value() {
            Some(Value::Float(f)) => *f.value(),
            Some(Value::Integer(i)) => *i.value() as f64,
            _ => return Err(self.wrong_type("a number")),
        };
        if !(min..=max).contains(&x) {
            return Err(self.error(format_args!(
                "must be between {min:?} and {max:?}, got {}",
                self.written()
            )));
        }
        Ok(x)
    }

    fn duration_in(&self, min: Duration, max: Duration) -> Result<Duration, ConfigError> {
        let text = match self.value() {
            Some(Value::String(s)) => s.value().as_str(),
            Some(Value::Integer(_)) | Some(Value::Float(_)) => return Err(self.wrong_type(
                "a duration string such as \"250ms\" or \"5s\" (bare numbers are not accepted: \
                     the unit would be a guess)",
            )),
            _ => return Err(self.wrong_type("a duration string such as \"250ms\" or \"5s\"")),
        };
        let duration = parse_duration(text).map_err(|reason| self.error(reason))?;
        if duration < min || duration > max {
            return Err(self.error(format_args!(
                "must be between {} and {}, got {}",
                format_duration(min),
                format_duration(max),
                self.written()
            )));
        }
        Ok(duration)
    }

    /// Bounds are shown in the style the value was written in: bytes for integers, units for strings.
    fn size_in<T: TryFrom<u64>>(&self, min: u64, max: u64) -> Result<T, ConfigError> {
        let (bytes, as_string) = match self.value() {
            Some(Value::Integer(i)) => (u64::try_from(*i.value()).ok(), false),
            Some(Value::String(s)) => (
                Some(parse_size(s.value()).map_err(|reason| self.error(reason))?),
                true,
            ),
            _ => {
                return Err(
                    self.wrong_type("a size: bytes as an integer, or a string such as \"16KiB\"")
                )
            }
        };
        match bytes {
            Some(bytes) if (min..=max).contains(&bytes) => T::try_from(bytes)
                .map_err(|_| self.error("does not fit this platform's integer size")),
            _ => {
                let shown = |n: u64| {
                    if as_string {
                        format_size(n)
                    } else {
                        n.to_string()
                    }
                };
                Err(self.error(format_args!(
                    "must be between {} and {}, got {}",
                    shown(min),
                    shown(max),
                    self.written()
                )))
            }
        }
    }

    /// An address, or `None` for an empty string (a listener that is switched off).
    fn optional_socket_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.string()?.is_empty() {
            Ok(None)
        } else {
            self.socket_addr().map(Some)
        }
    }

    fn socket_addr(&self) -> Result<SocketAddr, ConfigError> {
        let expected = "an address \"IP:port\" such as \"127.0.0.1:8080\" or \"[::1]:8080\"";
        let text = self
            .value()
            .and_then(Value::as_str)
            .ok_or_else(|| self.wrong_type(expected))?;
        text.parse().map_err(|_| {
            self.error(format_args!(
                "expected {expected} (host names are not resolved), got {}",
                self.written()
            ))
        })
    }

    fn choice<T: Copy>(&self, choices: &[(&'static str, T)]) -> Result<T, ConfigError> {
        let names: Vec<String> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
        let names = names.join(", ");
        let text = self
            .value()
            .and_then(Value::as_str)
            .ok_or_else(|| self.wrong_type(&format!("one of {names}")))?;
        choices
            .iter()
            .find(|(name, _)| *name == text)
            .map(|(_, value)| *value)
            .ok_or_else(|| {
                self.error(format_args!(
                    "must be one of {names}, got {}",
                    self.written()
                ))
            })
    }

    /// An array of strings, each `min_len..=max_len` characters.
    fn strings(&self, min_len: usize, max_len: usize) -> Result<Vec<String>, ConfigError> {
        self.elements("an array of strings")?
            .iter()
            .map(|element| element.text(min_len, max_len).map(str::to_owned))
            .collect()
    }

    fn cores(&self) -> Result<Cores, ConfigError> {
        let expected = "\"all\" or a list of core ids such as [0, 1]";
        match self.value() {
            Some(Value::String(s)) if s.value() == "all" => return Ok(Cores::All),
            Some(Value::Array(_)) => {}
            _ => return Err(self.wrong_type(expected)),
        }
        let mut ids: Vec<usize> = Vec::new();
        for element in self.elements(expected)? {
            let id: usize = element.integer_in(0, MAX_CORE_ID)?;
            if ids.contains(&id) {
                return Err(element.error(format_args!("core {id} is listed twice")));
            }
            ids.push(id);
        }
        if ids.is_empty() {
            return Err(self.error("must list at least one core id, or be \"all\""));
        }
        Ok(Cores::List(ids))
    }

    fn handlers(&self) -> Result<Vec<BotHandler>, ConfigError> {
        let mut handlers = Vec::new();
        for element in self.elements("an array of handler names")? {
            let handler = element.choice(&BotHandler::choices())?;
            if handlers.contains(&handler) {
                return Err(element.error(format_args!(
                    "handler \"{}\" is listed twice",
                    handler.as_str()
                )));
            }
            handlers.push(handler);
        }
        if handlers.is_empty() {
            return Err(self.error("must list at least one handler"));
        }
        Ok(handlers)
    }

    fn token(&self) -> Result<String, ConfigError> {
        let token = self.string()?;
        let length = token.chars().count();
        if !(16..=256).contains(&length) {
            return Err(self.error(format_args!(
                "must be 16 to 256 characters long, got {length}"
            )));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(self.error("must be printable ASCII without spaces"));
        }
        Ok(token.to_owned())
    }

    fn display_name(&self) -> Result<String, ConfigError> {
        self.text(1, 128).map(str::to_owned)
    }
}

/// A site name as `/ws/visitor?site=` accepts it.
fn valid_site_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// An `Origin` header value: `http(s)://host[:port]`, no path.
fn check_origin(origin: &str) -> Result<(), String> {
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"));
    match rest {
        Some(host)
            if !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "invalid origin \"{origin}\": write scheme://host[:port] as a browser sends it, e.g. \"https://shop.example\""
        )),
    }
}

fn trim_line_break(bytes: &[u8]) -> &[u8] {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    bytes.strip_suffix(b"\r").unwrap_or(bytes)
}

/// A TOML key, quoted when it holds a dot.
fn toml_key(name: &str) -> String {
    if name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
    {
        name.to_owned()
    } else {
        Value::from(name).to_string()
    }
}

fn check_account_id(id: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if id.is_empty() || id.len() > 64 || !id.chars().all(ok_char) {
        return Err(format!(
            "invalid agent id \"{id}\": use 1 to 64 characters of A-Z a-z 0-9 _ -"
        ));
    }
    Ok(())
}

/// Accepts `level` or a comma-separated list of `level` / `target=level` directives.
fn check_log_directives(text: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let is_level = |s: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(s));
    let is_target = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '.'))
    };
    if text.trim().is_empty() {
        return Err("must not be empty; use a level such as \"info\"".to_owned());
    }
    for directive in text.split(',').map(str::trim) {
        let valid = match directive.split_once('=') {
            Some((target, level)) => is_target(target) && is_level(level),
            None => is_level(directive),
        };
        if !valid {
            return Err(format!(
                "invalid log directive \"{directive}\": expected a level (trace, debug, info, warn, \
                 error, off) or target=level such as \"switchboard::storage=debug\""
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Durations and sizes
// ---------------------------------------------------------------------------------------------------

const DURATION_UNITS: [(&str, Duration); 5] = [
    ("h", hours(1)),
    ("m", mins(1)),
    ("s", secs(1)),
    ("ms", ms(1)),
    ("us", Duration::from_micros(1)),
];

/// "250ms" → 250 ms. One whole number and one unit (us, ms, s, m, h).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = split_number(text);
    let hint = "expected a whole number and a unit (us, ms, s, m, h), e.g. \"250ms\"";
    if number.is_empty() {
        return Err(format!("invalid duration \"{text}\": {hint}"));
    }
    let Some(&(_, scale)) = DURATION_UNITS.iter().find(|(name, _)| *name == unit) else {
        return Err(if unit.starts_with('.') {
            format!("invalid duration \"{text}\": fractions are not accepted; use a smaller unit, e.g. \"1500ms\"")
        } else if unit.is_empty() {
            format!("invalid duration \"{text}\": missing unit; {hint}")
        } else {
            format!("invalid duration \"{text}\": unknown unit \"{unit}\"; use us, ms, s, m or h")
        });
    };
    let count: u32 = number
        .parse()
        .map_err(|_| format!("invalid duration \"{text}\": number too large"))?;
    scale
        .checked_mul(count)
        .ok_or_else(|| format!("invalid duration \"{text}\": too large"))
}

/// The largest unit that represents `duration` exactly ("90s", "1500ms"); "0s" for zero.
fn format_duration(duration: Duration) -> String {
    if duration.is_zero() {
        return "0s".to_owned();
    }
    let nanos = duration.as_nanos();
    for (name, scale) in DURATION_UNITS {
        let scale = scale.as_nanos();
        if nanos.is_multiple_of(scale) {
            return format!("{}{name}", nanos / scale);
        }
    }
    // Only reachable for sub-microsecond durations, which parsing never produces.
    format!("{}us", duration.as_micros())
}

const SIZE_UNITS: [(&str, u64); 5] = [
    ("TiB", TIB),
    ("GiB", GIB),
    ("MiB", MIB),
    ("KiB", KIB),
    ("B", 1),
];

/// "16KiB" → 16384. One whole number and one binary unit (B, KiB, MiB, GiB, TiB).
fn parse_size(text: &str) -> Result<u64, String> {
    let (number, unit) = split_number(text);
    if number.is_empty() {
        return Err(format!(
            "invalid size \"{text}\": expected a whole number and a unit (B, KiB, MiB, GiB, TiB), e.g. \"16KiB\""
        ));
    }
    let Some(&(_, scale)) = SIZE_UNITS.iter().find(|(name, _)| *name == unit) else {
        return Err(if unit.is_empty() {
            format!("invalid size \"{text}\": missing unit; write {number} without quotes for bytes, or add B, KiB, MiB, GiB or TiB")
        } else if unit.starts_with('.') {
            format!("invalid size \"{text}\": fractions are not accepted; use a smaller unit")
        } else {
            format!("invalid size \"{text}\": unknown unit \"{unit}\"; use B, KiB, MiB, GiB or TiB (1KiB = 1024 bytes)")
        });
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("invalid size \"{text}\": too large"))
}

/// The largest binary unit that represents `bytes` exactly ("64KiB"), or plain digits ("1000").
fn format_size(bytes: u64) -> String {
    for (name, scale) in SIZE_UNITS {
        if scale > 1 && bytes != 0 && bytes.is_multiple_of(scale) {
            return format!("{}{name}", bytes / scale);
        }
    }
    bytes.to_string()
}

/// Splits "250ms" into ("250", "ms").
fn split_number(text: &str) -> (&str, &str) {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    text.split_at(digits)
}

// ---------------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> ConfigError {
        match load_str("tuning/bad.toml", text) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(error) => error,
        }
    }

    /// Asserts an `Invalid` error at `line` about `key` whose message contains `needle`.
    fn assert_invalid(error: &ConfigError, line: usize, key: &str, needle: &str) {
        assert!(
            matches!(error, ConfigError::Invalid { .. }),
            "not Invalid: {error}"
        );
        assert_eq!(error.file(), "tuning/bad.toml", "{error}");
        assert_eq!(error.line(), Some(line), "{error}");
        assert_eq!(error.key(), Some(key), "{error}");
        assert!(
            error.to_string().contains(needle),
            "{error:?} lacks {needle:?}"
        );
    }

    #[test]
    fn metrics_listen_is_off_by_default_and_must_be_its_own_address() {
        assert_eq!(load_str("t.toml", "").unwrap().metrics.listen, None);
        let c = load_str("t.toml", "[metrics]\nlisten = \"127.0.0.1:9100\"\n").unwrap();
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(load_str("t.toml", &c.to_toml()).unwrap(), c);
        let same =
            "[server]\nlisten = \"127.0.0.1:8080\"\n[metrics]\nlisten = \"127.0.0.1:8080\"\n";
        assert_invalid(
            &err(same),
            4,
            "metrics.listen",
            "must differ from server.listen",
        );
        assert_invalid(
            &err("[metrics]\nlisten = \"localhost:9100\"\n"),
            2,
            "metrics.listen",
            "host names are not resolved",
        );
    }

    #[test]
    fn defaults_load_with_documented_values() {
        let c = load(None).unwrap();
        assert_eq!(
            c.server.listen,
            "127.0.0.1:8080".parse::<std::net::SocketAddr>().unwrap()
        );
        assert_eq!(c.server.backlog, 4096);
        assert_eq!(c.shards.cores, Cores::All);
        assert_eq!(c.shards.io_memory, 256 * 1024);
        assert_eq!(c.shards.session_limit(), None);
        assert_eq!(c.http.max_header_bytes, 8192);
        assert_eq!(c.websocket.max_message_bytes, 65536);
        assert_eq!(c.websocket.ping_interval, secs(30));
        assert_eq!(c.websocket.idle_timeout, secs(75));
        assert_eq!(c.log.format, LogFormat::Auto);
        assert_eq!(c.storage.durability, Durability::Fsync);
        assert_eq!(c.storage.commit_window, ms(1));
        assert_eq!(c.storage.map_size, GIB);
        assert_eq!(c.agents.accounts.len(), 0);
        assert_eq!(
            c.bot.handlers,
            vec![
                BotHandler::RiskControl,
                BotHandler::HumanTransfer,
                BotHandler::Intent,
                BotHandler::Fallback
            ]
        );
        assert!(!c.diagnostics.echo);
        assert!(!c.diagnostics.panic_endpoint);
        assert!(!c.diagnostics.stall_endpoint);
        assert_eq!(c, Config::default());
    }

    #[test]
    fn every_key_in_default_toml_has_a_comment_above_it() {
        let lines: Vec<&str> = EMBEDDED_DEFAULT.lines().collect();
        let mut checked = 0;
        for (i, line) in lines.iter().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
                continue;
            }
            let above = lines[..i].last().map(|l| l.trim()).unwrap_or("");
            assert!(
                above.starts_with('#'),
                "default.toml line {}: `{line}` has no comment above it",
                i + 1
            );
            checked += 1;
        }
        // Every leaf key except sections is documented.
        let leaves = known_keys()
            .iter()
            .filter(|k| k.contains('.') && *k != "agents.accounts" && *k != "visitors.sites")
            .count();
        assert_eq!(checked, leaves);
    }

    #[test]
    fn embedded_default_missing_a_key_is_reported() {
        let without: String = EMBEDDED_DEFAULT
            .lines()
            .filter(|l| !l.starts_with("write_timeout"))
            .map(|l| format!("{l}\n"))
            .collect();
        let error = load_layers(&without, &[]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "<embedded default>: key 'websocket.write_timeout': missing (every key must be present in the embedded default)"
        );
        assert_eq!(error.line(), None);
    }

    #[test]
    fn errors_in_the_embedded_default_are_named_so() {
        let broken = EMBEDDED_DEFAULT.replace("backlog = 4096", "backlog = 0");
        let error = load_layers(&broken, &[]).unwrap_err();
        assert_eq!(error.file(), "<embedded default>");
        assert_eq!(error.key(), Some("server.backlog"));
        let expected_line = EMBEDDED_DEFAULT
            .lines()
            .position(|l| l.starts_with("backlog"))
            .unwrap()
            + 1;
        assert_eq!(error.line(), Some(expected_line));
    }

    #[test]
    fn overlay_changes_only_the_given_keys() {
        let c = load_str(
            "over.toml",
            "[websocket]\nping_interval = \"40s\"\n\n[shards]\ncores = [1, 0]\n",
        )
        .unwrap();
        let mut expected = Config::default();
        expected.websocket.ping_interval = secs(40);
        expected.shards.cores = Cores::List(vec![1, 0]);
        assert_eq!(c, expected);
        // and it really differs from the defaults
        assert_ne!(c, Config::default());
    }

    #[test]
    fn dotted_and_inline_tables_overlay_too() {
        let c = load_str(
            "over.toml",
            "websocket.idle_timeout = \"2m\"\nhttp = { max_headers = 64 }\n",
        )
        .unwrap();
        assert_eq!(c.websocket.idle_timeout, mins(2));
        assert_eq!(c.http.max_headers, 64);
        assert_eq!(c.http.max_header_bytes, 8192);
    }

    /// Dotted key → value text, from a TOML document.
    fn flatten(text: &str) -> BTreeMap<String, String> {
        fn walk(prefix: &str, table: &dyn TableLike, out: &mut BTreeMap<String, String>) {
            for (key, item) in table.iter() {
                let dotted = if prefix.is_empty() {
                    key.to_owned()
                } else {
                    format!("{prefix}.{key}")
                };
                match item.as_table_like() {
                    Some(inner) => walk(&dotted, inner, out),
                    None => {
                        out.insert(dotted, item.to_string().trim().to_owned());
                    }
                }
            }
        }
        let doc: toml_edit::DocumentMut = text.parse().unwrap();
        let mut out = BTreeMap::new();
        walk("", doc.as_table(), &mut out);
        out
    }

    #[test]
    fn profiles_load_and_every_key_they_set_changes_something() {
        let defaults = flatten(&Config::default().to_toml());
        for (name, text) in [
            (
                "high-density.toml",
                include_str!("../tuning/high-density.toml"),
            ),
            (
                "low-latency.toml",
                include_str!("../tuning/low-latency.toml"),
            ),
            (
                "multilingual.toml",
                include_str!("../tuning/multilingual.toml"),
            ),
        ] {
            let config = load_str(name, text).unwrap_or_else(|e| panic!("{e}"));
            let effective = flatten(&config.to_toml());
            let changed: Vec<&String> = effective
                .iter()
                .filter(|(k, v)| defaults.get(*k) != Some(*v))
                .map(|(k, _)| k)
                .collect();
            let set_by_profile: Vec<String> = flatten(text).into_keys().collect();
            assert!(!set_by_profile.is_empty(), "{name} sets nothing");
            assert_eq!(
                changed.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
                set_by_profile
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>(),
                "{name}: each key a profile sets must differ from the default"
            );
        }
    }

    #[test]
    fn unknown_section_is_named_with_its_line() {
        let e = err("[server]\nbacklog = 10\n\n[serverz]\nlisten = \"127.0.0.1:1\"\n");
        assert_invalid(
            &e,
            4,
            "serverz",
            "unknown section; valid sections are: server, shards",
        );
    }

    #[test]
    fn unknown_nested_key_is_named_with_its_line() {
        let e = err("# comment\n[websocket]\nping_interval = \"20s\"\nping_intervall = \"30s\"\n");
        assert_invalid(
            &e,
            4,
            "websocket.ping_intervall",
            "unknown key; valid keys in [websocket] are: max_message_bytes, ping_interval",
        );
        let e = err("\nwebsocket.nope = 1\n");
        assert_invalid(&e, 2, "websocket.nope", "unknown key");
    }

    #[test]
    fn unknown_key_inside_an_agent_account_is_named() {
        let e = err("[agents.accounts.alice]\ntoken = \"0123456789abcdef\"\nnmae = \"Alice\"\n");
        assert_invalid(
            &e,
            3,
            "agents.accounts.alice.nmae",
            "unknown key in an agent account; valid keys are: token, name, max_open",
        );
        let e = err("[agents]\naccounts = { bob = { token = \"0123456789abcdef\", x = 1 } }\n");
        assert_invalid(
            &e,
            2,
            "agents.accounts.bob.x",
            "unknown key in an agent account",
        );
    }

    #[test]
    fn wrong_type_names_line_key_and_what_was_found() {
        let e = err("[server]\n\nbacklog = \"many\"\n");
        assert_invalid(
            &e,
            3,
            "server.backlog",
            "expected an integer, got string \"many\"",
        );
        let e = err("[diagnostics]\necho = 1\n");
        assert_invalid(
            &e,
            2,
            "diagnostics.echo",
            "expected true or false, got integer 1",
        );
        let e = err("websocket = 5\n");
        assert_invalid(&e, 1, "websocket", "expected a table, got integer 5");
        let e = err("[[server]]\nbacklog = 1\n");
        assert_invalid(&e, 1, "server", "expected a table, got an array of tables");
        let e = err("[websocket.ping_interval]\n");
        assert_invalid(&e, 1, "websocket.ping_interval", "got a table");
        let e = err("[risk_control]\nblocked_words = [\"ok\",\n  7]\n");
        assert_invalid(
            &e,
            3,
            "risk_control.blocked_words",
            "element 2: expected a string, got integer 7",
        );
    }

    #[test]
    fn out_of_range_message_is_exact() {
        let text = "# line 1\n\n\n\n\n[websocket]\nmax_message_bytes = 10\n";
        assert_eq!(
            err(text).to_string(),
            "tuning/bad.toml:7: key 'websocket.max_message_bytes': must be between 125 and 67108864, got 10"
        );
        let e = err("[websocket]\nmax_message_bytes = \"128MiB\"\n");
        assert_invalid(
            &e,
            2,
            "websocket.max_message_bytes",
            "must be between 125 and 64MiB, got \"128MiB\"",
        );
        let e = err("[server]\nbacklog = -1\n");
        assert_invalid(
            &e,
            2,
            "server.backlog",
            "must be between 1 and 65535, got -1",
        );
        let e = err("[bot]\nconfidence_threshold = 1.5\n");
        assert_invalid(
            &e,
            2,
            "bot.confidence_threshold",
            "between 0.0 and 1.0, got 1.5",
        );
        let e = err("[bot]\nmargin_threshold = nan\n");
        assert_invalid(&e, 2, "bot.margin_threshold", "got nan");
        let e = err("[http]\nhandshake_timeout = \"1h\"\n");
        assert_invalid(
            &e,
            2,
            "http.handshake_timeout",
            "must be between 100ms and 5m, got \"1h\"",
        );
        let e = err("[storage]\nmap_size = 1048577\n");
        assert_invalid(&e, 2, "storage.map_size", "multiple of 4KiB");
        let e = err("[storage]\nmax_map_size = \"1MiB\"\n");
        assert_invalid(
            &e,
            2,
            "storage.max_map_size",
            "at least storage.map_size (1GiB)",
        );
        let e = err("[storage]\nmax_map_size = 1048577\n");
        assert_invalid(&e, 2, "storage.max_map_size", "multiple of 4KiB");
        let c = load_str(
            "ok.toml",
            "[storage]\nmap_size = \"4MiB\"\nmax_map_size = \"4MiB\"\n",
        )
        .unwrap();
        assert_eq!(
            (c.storage.map_size, c.storage.max_map_size),
            (4 * MIB, 4 * MIB)
        );
    }

    #[test]
    fn bad_duration_strings() {
        for (value, needle) in [
            ("\"5sec\"", "unknown unit \"sec\""),
            ("\"1.5s\"", "fractions are not accepted"),
            ("\"\"", "expected a whole number and a unit"),
            ("\"5\"", "missing unit"),
            ("\"5 s\"", "unknown unit \" s\""),
            ("\"-5s\"", "expected a whole number and a unit"),
            ("\"99999999999h\"", "too large"),
            ("250", "bare numbers are not accepted"),
            ("true", "expected a duration string"),
        ] {
            let e = err(&format!("[websocket]\nwrite_timeout = {value}\n"));
            assert_invalid(&e, 2, "websocket.write_timeout", needle);
        }
    }

    #[test]
    fn bad_size_strings() {
        for (value, needle) in [
            (
                "\"16KB\"",
                "unknown unit \"KB\"; use B, KiB, MiB, GiB or TiB",
            ),
            ("\"4 KiB\"", "unknown unit \" KiB\""),
            ("\"16384\"", "missing unit; write 16384 without quotes"),
            ("\"1.5MiB\"", "fractions are not accepted"),
            ("\"KiB\"", "expected a whole number and a unit"),
            ("\"99999999999TiB\"", "too large"),
            ("1.5", "expected a size"),
        ] {
            let e = err(&format!("[websocket]\nread_buffer_bytes = {value}\n"));
            assert_invalid(&e, 2, "websocket.read_buffer_bytes", needle);
        }
    }

    #[test]
    fn duration_and_size_parsing_and_formatting() {
        assert_eq!(parse_duration("250ms"), Ok(ms(250)));
        assert_eq!(parse_duration("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_duration("2m"), Ok(secs(120)));
        assert_eq!(parse_duration("1h"), Ok(secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(format_duration(secs(120)), "2m");
        assert_eq!(format_duration(secs(90)), "90s");
        assert_eq!(format_duration(ms(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_micros(200)), "200us");
        assert_eq!(parse_size("16KiB"), Ok(16384));
        assert_eq!(parse_size("1GiB"), Ok(GIB));
        assert_eq!(parse_size("10B"), Ok(10));
        assert_eq!(format_size(16384), "16KiB");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(0), "0");
        for d in ["1us", "999us", "1ms", "61s", "59m", "25h", "3600ms"] {
            let parsed = parse_duration(d).unwrap();
            assert_eq!(parse_duration(&format_duration(parsed)), Ok(parsed));
        }
    }

    #[test]
    fn cross_field_rule_blames_the_key_the_overlay_set() {
        // The overlay lowers idle_timeout below the default ping_interval (30s).
        let e = err("[websocket]\nidle_timeout = \"20s\"\n");
        assert_eq!(
            e.to_string(),
            "tuning/bad.toml:2: key 'websocket.idle_timeout': must be greater than websocket.ping_interval (30s), got 20s"
        );
        // The overlay raises ping_interval above the default idle_timeout (75s).
        let e = err("[websocket]\n\nping_interval = \"90s\"\n");
        assert_eq!(
            e.to_string(),
            "tuning/bad.toml:3: key 'websocket.ping_interval': must be less than websocket.idle_timeout (75s), got 90s"
        );
        // Both set and consistent: fine.
        load_str(
            "ok.toml",
            "[websocket]\nping_interval = \"90s\"\nidle_timeout = \"4m\"\n",
        )
        .unwrap();
        let e = err("[conversations]\ntyping_expiry = \"1s\"\n");
        assert_invalid(
            &e,
            2,
            "conversations.typing_expiry",
            "greater than conversations.typing_interval (1s)",
        );
        let e = err("[inference]\nbatch_window = \"500ms\"\n");
        assert_invalid(
            &e,
            2,
            "inference.batch_window",
            "less than inference.max_wait (200ms)",
        );
        let e = err("[conversations]\nmax_text_bytes = \"128KiB\"\n");
        assert_invalid(
            &e,
            2,
            "conversations.max_text_bytes",
            "must be at most websocket.max_message_bytes (65536), got 131072",
        );
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let e = err("[server]\nbacklog = 10\nlisten = \n");
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
        assert_eq!(e.line(), Some(3), "{e}");
        assert!(
            e.to_string()
                .starts_with("tuning/bad.toml:3: invalid TOML: "),
            "{e}"
        );
        assert!(!e.to_string().contains('\n'));
        let e = err("[server]\nbacklog = 1\nbacklog = 2\n");
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
        assert_eq!(e.line(), Some(3), "{e}");
    }

    #[test]
    fn plugin_handlers_are_accepted_once_allowed_and_auto_assign_parses() {
        // Process-wide and set once; no other test allows plugins.
        allow_plugin_handlers(["lookup_sample"]);
        let c = load_str(
            "t.toml",
            "[bot]\nhandlers = [\"lookup_sample\", \"fallback\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.bot.handlers,
            [BotHandler::Plugin("lookup_sample"), BotHandler::Fallback]
        );
        assert!(c
            .to_toml()
            .contains("handlers = [\"lookup_sample\", \"fallback\"]"));
        let e = err("[bot]\nhandlers = [\"lookup_sampel\"]\n");
        assert_invalid(
            &e,
            2,
            "bot.handlers",
            "\"lookup_sample\", got \"lookup_sampel\"",
        );

        assert!(Config::default().agents.auto_assign);
        let c = load_str("t.toml", "[agents]\nauto_assign = false\n").unwrap();
        assert!(!c.agents.auto_assign);
        let e = err("[agents]\nauto_assign = \"no\"\n");
        assert_invalid(&e, 2, "agents.auto_assign", "");
    }

    #[test]
    fn choices_log_level_and_listen_are_validated() {
        let e = err("[storage]\ndurability = \"fsink\"\n");
        assert_invalid(
            &e,
            2,
            "storage.durability",
            "must be one of \"fsync\", \"batch\", \"none\", got \"fsink\"",
        );
        let e = err("[log]\nlevel = \"verbose\"\n");
        assert_invalid(&e, 2, "log.level", "invalid log directive \"verbose\"");
        let e = err("[log]\nlevel = \"info,my crate=debug\"\n");
        assert_invalid(
            &e,
            2,
            "log.level",
            "invalid log directive \"my crate=debug\"",
        );
        let c = load_str(
            "ok.toml",
            "[log]\nlevel = \"warn,switchboard::storage=debug\"\nformat = \"json\"\n",
        )
        .unwrap();
        assert_eq!(c.log.level, "warn,switchboard::storage=debug");
        assert_eq!(c.log.format.resolve(true), LogFormat::Json);
        assert_eq!(LogFormat::Auto.resolve(true), LogFormat::Text);
        assert_eq!(LogFormat::Auto.resolve(false), LogFormat::Json);
        let e = err("[server]\nlisten = \"localhost:8080\"\n");
        assert_invalid(&e, 2, "server.listen", "host names are not resolved");
        let c = load_str("ok.toml", "[server]\nlisten = \"[::1]:0\"\n").unwrap();
        assert_eq!(
            c.server.listen,
            "[::1]:0".parse::<std::net::SocketAddr>().unwrap()
        );
        let e = err("[bot]\nhandlers = [\"intent\", \"fallback\", \"intent\"]\n");
        assert_invalid(
            &e,
            2,
            "bot.handlers",
            "element 3: handler \"intent\" is listed twice",
        );
        let e = err("[bot]\nhandlers = [\"intent\", \"smalltalk\"]\n");
        assert_invalid(&e, 2, "bot.handlers", "element 2: must be one of");
        let e = err("[bot]\nhandlers = []\n");
        assert_invalid(&e, 2, "bot.handlers", "at least one handler");
        let c = load_str("t.toml", "[bot]\nhandlers = [\"risk_control\", \"echo\"]\n").unwrap();
        assert_eq!(c.bot.handlers, [BotHandler::RiskControl, BotHandler::Echo]);
        let e = err("[storage]\ndir = \"\"\n");
        assert_invalid(
            &e,
            2,
            "storage.dir",
            "must be 1 to 4096 characters long, got 0",
        );
    }

    #[test]
    fn cores_are_validated_and_resolved() {
        let e = err("[shards]\ncores = [0,\n  1,\n  0]\n");
        assert_invalid(&e, 4, "shards.cores", "element 3: core 0 is listed twice");
        let e = err("[shards]\ncores = []\n");
        assert_invalid(&e, 2, "shards.cores", "at least one core id");
        let e = err("[shards]\ncores = \"some\"\n");
        assert_invalid(
            &e,
            2,
            "shards.cores",
            "expected \"all\" or a list of core ids",
        );
        let e = err("[shards]\ncores = [-1]\n");
        assert_invalid(
            &e,
            2,
            "shards.cores",
            "element 1: must be between 0 and 4095, got -1",
        );

        assert_eq!(Cores::All.resolve(&[0, 1]), Ok(vec![0, 1]));
        assert_eq!(Cores::List(vec![1]).resolve(&[0, 1]), Ok(vec![1]));
        assert_eq!(
            Cores::List(vec![0, 2]).resolve(&[0, 1]),
            Err(CoresError::Unavailable {
                core: 2,
                available: vec![0, 1]
            })
        );
        assert_eq!(Cores::All.resolve(&[]), Err(CoresError::NoneAvailable));

        let c = load_str("mine.toml", "\n[shards]\ncores = [3]\n").unwrap();
        let e = c.shard_cores(&[0, 1]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "mine.toml:3: key 'shards.cores': core 3 is not available to this process (available: [0, 1])"
        );
        assert_eq!(c.shard_cores(&[2, 3]).unwrap(), vec![3]);
    }

    #[test]
    fn auth_and_api_sections() {
        let c = Config::default();
        assert_eq!(c.auth.secret_file, None);
        assert_eq!(
            c.auth.secret_path(Path::new("/var/lib/sb")),
            PathBuf::from("/var/lib/sb/auth-secret")
        );
        assert!(!c.agents.dev_static_tokens);
        let c = load_str(
            "auth.toml",
            "[auth]\nsecret_file = \"/etc/sb/secret\"\ntoken_ttl = \"1h\"\nlockout_failures = 3\n\n[api]\nmax_body_bytes = \"4KiB\"\n\n[agents]\ndev_static_tokens = true\n",
        )
        .unwrap();
        assert_eq!(
            c.auth.secret_path(Path::new("x")),
            PathBuf::from("/etc/sb/secret")
        );
        assert_eq!(c.auth.token_ttl, Duration::from_secs(3600));
        assert_eq!(c.auth.lockout_failures, 3);
        assert_eq!(c.api.max_body_bytes, 4096);
        assert!(c.agents.dev_static_tokens);
        assert_eq!(load_str("again", &c.to_toml()).unwrap(), c);
        let e = err("[auth]\ntoken_ttl = \"10s\"\n");
        assert_invalid(&e, 2, "auth.token_ttl", "");
        let e = err("[auth]\nmin_password_length = 4\n");
        assert_invalid(&e, 2, "auth.min_password_length", "");
        let e = err("[api]\nmax_body_bytes = \"2MiB\"\n");
        assert_invalid(&e, 2, "api.max_body_bytes", "");
    }

    #[test]
    fn visitor_sites_load_keys_validate_and_never_print_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("acme.key");
        std::fs::write(&key_file, "k".repeat(40) + "\n").unwrap();
        let c = load_str(
            "t.toml",
            &format!(
                "[visitors]\nallow_unlisted_sites = false\n\n[visitors.sites.acme]\norigins = [\"https://shop.example\"]\nidentity_key_file = {key_file:?}\n\n[visitors.sites.\"b.example\"]\n"
            ),
        )
        .unwrap();
        assert!(!c.visitors.allow_unlisted_sites);
        let acme = c.visitors.site("acme").unwrap();
        assert_eq!(
            acme.identity_key.as_deref(),
            Some("k".repeat(40).as_bytes())
        );
        assert_eq!(acme.origins, vec!["https://shop.example".to_string()]);
        assert!(c.visitors.site("b.example").unwrap().identity_key.is_none());
        assert!(!format!("{acme:?}").contains("kkkk"), "{acme:?}");
        assert_eq!(load_str("p", &c.to_toml()).unwrap(), c);
        // No default key, no short key, no unreadable file, no bad origin.
        assert!(Config::default().visitors.sites.is_empty());
        let e = err("[visitors.sites.acme]\nidentity_key = \"short\"\n");
        assert_invalid(
            &e,
            2,
            "visitors.sites.acme.identity_key",
            "at least 32 bytes",
        );
        let e = err("[visitors.sites.acme]\nidentity_key_file = \"/nonexistent/key\"\n");
        assert_invalid(
            &e,
            2,
            "visitors.sites.acme.identity_key_file",
            "cannot read",
        );
        let e = err("[visitors.sites.acme]\norigins = [\"shop.example/path\"]\n");
        assert_invalid(&e, 2, "visitors.sites.acme.origins", "scheme://host");
        let e = err("[visitors.sites.acme]\ncolour = 1\n");
        assert_invalid(&e, 2, "visitors.sites.acme.colour", "valid keys are");
    }

    #[test]
    fn agent_accounts_merge_default_and_validate() {
        let c = load_str(
            "agents.toml",
            "[agents]\ndefault_max_open = 7\n\n[agents.accounts.alice]\ntoken = \"alice-0123456789abcdef\"\nname = \"Alice\"\nmax_open = 2\n\n[agents.accounts.bob]\ntoken = \"bob-0123456789abcdef\"\n",
        )
        .unwrap();
        let alice = &c.agents.accounts["alice"];
        assert_eq!((alice.name.as_str(), alice.max_open), ("Alice", 2));
        let bob = &c.agents.accounts["bob"];
        assert_eq!((bob.name.as_str(), bob.max_open), ("bob", 7));
        assert!(!format!("{bob:?}").contains("0123456789"));

        let e = err("[agents.accounts.carol]\nname = \"Carol\"\n");
        assert_invalid(&e, 1, "agents.accounts.carol.token", "required");
        let e = err("[agents.accounts.dan]\ntoken = \"short\"\n");
        assert_invalid(&e, 2, "agents.accounts.dan.token", "16 to 256 characters");
        let e = err("[agents.accounts.\"bad id\"]\ntoken = \"0123456789abcdef\"\n");
        assert_invalid(&e, 1, "agents.accounts.bad id", "invalid agent id");
        let e = err(
            "[agents.accounts.a]\ntoken = \"0123456789abcdef\"\n[agents.accounts.b]\ntoken = \"0123456789abcdef\"\n",
        );
        assert_invalid(
            &e,
            4,
            "agents.accounts.b.token",
            "same token as agents.accounts.a",
        );
        let e = err("[agents.accounts.a]\ntoken = \"0123456789abcdef\"\nmax_open = 0\n");
        assert_invalid(
            &e,
            3,
            "agents.accounts.a.max_open",
            "between 1 and 1000, got 0",
        );
    }

    #[test]
    fn to_toml_round_trips() {
        let overlay = r#"
[server]
listen = "[::1]:9000"
[shards]
cores = [1, 0]
max_sessions_per_shard = 9000
[websocket]
read_buffer_bytes = 1500
[storage]
commit_window = "250us"
durability = "batch"
map_size = "2GiB"
[agents.accounts.alice]
token = "tok\"en-with-quote-0123"
name = "Alice \"Al\" Ünicode\\"
[bot]
confidence_threshold = 0.1
margin_threshold = 1
handlers = ["intent", "fallback"]
[risk_control]
blocked_words = ["spam", "naïve \"quoted\""]
blocked_patterns = ['\d{16}']
"#;
        let config = load_str("over.toml", overlay).unwrap();
        let printed = config.to_toml();
        let reloaded =
            load_str("printed.toml", &printed).unwrap_or_else(|e| panic!("{e}\n{printed}"));
        assert_eq!(reloaded, config);
        assert_eq!(reloaded.to_toml(), printed);
        assert_eq!(
            config.risk_control.blocked_patterns,
            vec![r"\d{16}".to_owned()]
        );
        assert_eq!(config.bot.margin_threshold, 1.0);
        // The defaults round-trip too, and printing lists every key.
        let defaults = Config::default();
        assert_eq!(load_str("p", &defaults.to_toml()).unwrap(), defaults);
        let printed_keys = flatten(&defaults.to_toml()).len();
        let leaf_keys = known_keys()
            .iter()
            .filter(|k| k.contains('.') && *k != "agents.accounts" && *k != "visitors.sites")
            .count();
        assert_eq!(printed_keys, leaf_keys);
    }

    #[test]
    fn load_reads_files_and_names_them() {
        let dir =
            std::env::temp_dir().join(format!("switchboard-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, "[diagnostics]\necho = true\n").unwrap();
        assert!(load(Some(&good)).unwrap().diagnostics.echo);
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[diagnostics]\necho = \"yes\"\n").unwrap();
        let e = load(Some(&bad)).unwrap_err();
        assert_eq!(e.file(), bad.display().to_string());
        assert_eq!(e.line(), Some(2));
        let missing = dir.join("missing.toml");
        let e = load(Some(&missing)).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert!(
            e.to_string()
                .starts_with(&format!("{}: cannot read: ", missing.display())),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn error_at_points_where_the_value_came_from() {
        let c = load_str("site.toml", "# x\n[inference]\nmodel = \"/opt/m.onnx\"\n").unwrap();
        let e = c.error_at("inference.model", "file not found");
        assert_eq!(
            e.to_string(),
            "site.toml:3: key 'inference.model': file not found"
        );
        let e = c.error_at("inference.tokenizer", "file not found");
        assert_eq!(e.file(), "<embedded default>");
        let line = EMBEDDED_DEFAULT
            .lines()
            .position(|l| l.starts_with("tokenizer ="))
            .unwrap()
            + 1;
        assert_eq!(e.line(), Some(line));
    }
}
