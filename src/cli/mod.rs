//! The `switchboard` command line: `serve`, `config check`, `config print`, the
//! knowledge-base commands `kb import`, `kb export`, `kb list`, `kb eval`, `kb sync`, the agent
//! account commands `agent add|list|disable|enable|passwd|role|unlock`, `audit verify|tail`
//! and `tls self-signed`.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 invalid configuration, arguments or input
//! file (clap also exits 2 for bad arguments).
//!
//! The `kb` commands work on the replicas under `[storage] dir` of the given configuration,
//! the directory `serve` uses, and may run while a server has them open (LMDB coordinates
//! the processes); they hold the environments only while they read or write.
//!
//! The `switchboard` binary is [`run`]. A program that adds its own bot handlers (see
//! docs/plugins.md and `examples/order-status`) builds a [`Registry`] and calls
//! [`run_with_registry`]: the same commands, with its handlers available to `[bot] handlers`
//! (checked when the configuration is loaded, like the built-ins).

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod audit_cli;
mod kb_sync;

use crate::auth::{self, manage, rbac::Role, Authority};
use crate::bot::Registry;
use crate::config::{self, Config};
use crate::engine::eval::{self, EvalMode};
use crate::engine::progress::ImportProgress;
use crate::engine::{update, EngineSettings, IntentEngine, ModelSettings};
use crate::kb::{self, ImportError, KbReplica};
use crate::liveness::Liveness;
use crate::metrics::listener::MetricsListener;
use crate::metrics::Metrics;
use crate::server::{self, ShardMessage};
use crate::service_manager::ServiceManager;
use crate::{logging, system};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "switchboard",
    version,
    about = "Self-hosted customer-service appliance"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the appliance.
    Serve {
        /// Tuning file laid over the embedded defaults.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Listen address, overriding `[server] listen`.
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
    },
    /// Check or show configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Manage the knowledge base under `[storage] dir`.
    Kb {
        #[command(subcommand)]
        command: KbCommand,
    },
    /// Check or read the audit chain (`[audit] file`).
    Audit {
        #[command(subcommand)]
        command: audit_cli::AuditCommand,
    },
    /// Manage agent accounts (stored under `[storage] dir`/accounts).
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// TLS certificates for `[tls]`.
    Tls {
        #[command(subcommand)]
        command: TlsCommand,
    },
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Create an account; the password is read from a prompt, or from stdin when stdin is not
    /// a terminal (one line).
    Add {
        #[arg(value_name = "NAME")]
        name: String,
        /// admin, supervisor or agent.
        #[arg(long, value_name = "ROLE")]
        role: String,
        /// Display name shown to visitors (default: NAME).
        #[arg(long, value_name = "NAME")]
        display: Option<String>,
        /// Conversations the agent may hold open at once (default: `[agents] default_max_open`).
        #[arg(long, value_name = "N")]
        max_open: Option<u32>,
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// List accounts with their role, status and lockout state.
    List {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Disable an account (its tokens stop working).
    Disable {
        #[arg(value_name = "NAME")]
        name: String,
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Enable a disabled account.
    Enable {
        #[arg(value_name = "NAME")]
        name: String,
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Set a new password (prompt or stdin); the account's tokens stop working.
    Passwd {
        #[arg(value_name = "NAME")]
        name: String,
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Set the role (admin, supervisor or agent); the account's tokens stop working.
    Role {
        #[arg(value_name = "NAME")]
        name: String,
        #[arg(value_name = "ROLE")]
        role: String,
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Lift a lockout after failed logins.
    Unlock {
        #[arg(value_name = "NAME")]
        name: String,
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TlsCommand {
    /// Write a self-signed certificate and its private key (mode 0600) for a first start.
    SelfSigned {
        /// The DNS name or IP address the certificate is for (clients check it).
        #[arg(long, value_name = "NAME")]
        host: String,
        /// Where to write the PEM certificate.
        #[arg(long, value_name = "FILE", default_value = "cert.pem")]
        cert: PathBuf,
        /// Where to write the PEM private key.
        #[arg(long, value_name = "FILE", default_value = "key.pem")]
        key: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

/// The file formats `kb import` takes, shown by `switchboard kb import --help`.
const KB_FORMAT_HELP: &str = "\
FORMATS
  CSV: a header row naming `text`, `category` and optionally `answer` (any order). Each row
  is one question; rows sharing a category form one entry, whose answer is the `answer` of
  whichever of its rows gives one (giving two different answers is an error). RFC 4180
  quoting; UTF-8.

      text,category,answer
      How do I change my password?,change_password,\"Go to My account > Security.\"
      I want a new password,change_password,
      怎么修改密码,change_password_zh,在「我的账户 → 安全设置」里修改。

  JSON: an array of entries:

      [{\"id\": \"change_password\",
        \"questions\": [\"How do I change my password?\", \"I want a new password\"],
        \"answer\": \"Go to My account > Security.\",
        \"tags\": [\"account\"]}]

  (`intent` defaults to `id`; unknown fields, blank values and duplicate ids are errors.)
  The whole file is checked first: any problem fails the import with every problem and
  its line, and the serving version is left as it was. A sample bilingual knowledge base
  is examples/kb/starter.csv; `switchboard kb export` writes the current one as JSON.
";

/// How delta sync works, shown by `switchboard kb sync --help`.
const KB_SYNC_HELP: &str = "\
PRIMARY AND REPLICA
  The primary is either a sync-only node, `switchboard kb serve-sync --config FILE` (its
  `[tls]` listener serves sign-in and `/api/kb/sync` only, no chats and no model), or any full
  `switchboard serve` with `[tls]`: both answer `GET|POST /api/kb/sync` (docs/api.md) behind an
  admin's token. Run `kb sync` on each replica node, against the same `--config` as that
  node's `serve`:

      switchboard kb sync --config /etc/switchboard/switchboard.toml \\
          --from https://primary.example:8443 --token-file /etc/switchboard/primary.token \\
          --ca-file /etc/switchboard/primary-cert.pem

  The replica asks for the primary's snapshot hash; when it differs from its own, it syncs in
  two rounds (the rsync algorithm, refined): the coarse signature of its snapshot gets a plan
  of copies and stretches to fetch; a fine signature of only the base blocks the plan leaves
  unused gets the delta of those stretches. The replica rebuilds the primary's snapshot,
  checks its length and BLAKE3 hash, and stores it in every shard's replica as a new version.
  A running `serve` switches to it within about two seconds: each shard polls its replica's
  version every second and loads a new one on a thread of its own, then swaps it in.
  A corrupted, truncated or mismatched plan or delta changes nothing and exits 1. The bytes
  sent and received are printed.
";

#[derive(Subcommand)]
enum KbCommand {
    /// Import a CSV (`text,category[,answer]`) or JSON file as a new version of every
    /// shard's replica: questions embedded once, classifier head trained once.
    #[command(after_long_help = KB_FORMAT_HELP)]
    Import {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Write the current version as JSON (the format `kb import` takes).
    Export {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Write here instead of standard output.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// List the entries of the current version.
    List {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Bring this node's knowledge base up to date with a primary's by delta sync (the rsync
    /// algorithm): only the changed parts of the snapshot cross the network, and the result
    /// is verified (length, BLAKE3 hash) before it replaces the current version in every
    /// shard's replica, while a `serve` on them goes on answering.
    #[command(after_long_help = KB_SYNC_HELP)]
    Sync {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The primary: any `switchboard serve` with `[tls]`, as https://HOST:PORT of its TLS
        /// listener.
        #[arg(long, value_name = "URL")]
        from: String,
        /// A file holding an admin's bearer token for the primary (from `POST /api/login`).
        #[arg(long, value_name = "FILE")]
        token_file: PathBuf,
        /// PEM certificates to trust for the primary (e.g. its `tls self-signed` certificate);
        /// default: the system's roots.
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
    },
    /// Serve this node's knowledge base to replicas (`kb sync --from`) on its `[tls]` listener,
    /// and nothing else: no chats, no consoles, no model (`[server] role = "sync"`).
    #[command(name = "serve-sync", after_long_help = KB_SYNC_HELP)]
    ServeSync {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Accuracy, confusions, fallback rate and latency on a labelled CSV (`text,category`, or
    /// any file `kb import` takes), through the same engine and thresholds as the server.
    Eval {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Evaluate the degraded (lexical, BM25) match instead of the model.
        #[arg(long)]
        lexical: bool,
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a tuning file (laid over the embedded defaults).
    Check {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Print the effective configuration.
    Print {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

/// The `switchboard` command line with the built-in bot handlers.
pub fn run() -> ExitCode {
    run_with_registry(Registry::default())
}

/// The `switchboard` command line (arguments from the process) with the bot handlers of
/// `registry`: its names may appear in `[bot] handlers`, and `serve` builds every shard's
/// chain from it. Start from `Registry::default()` to keep the built-ins.
pub fn run_with_registry(registry: Registry) -> ExitCode {
    let exec_started = Instant::now();
    let cli = Cli::parse();
    // Every command loads the configuration; each must accept the registry's handler names.
    config::allow_plugin_handlers(registry.names());
    let load = config::load;
    match cli.command {
        Command::Serve {
            config: path,
            listen,
        } => {
            let mut config = match load(path.as_deref()) {
                Ok(config) => config,
                Err(err) => return config_error(&err),
            };
            if let Some(listen) = listen {
                config.server.listen = listen;
            }
            serve(config, registry, exec_started, path, listen)
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => match load(Some(&file)) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(err) => config_error(&err),
        },
        Command::Config {
            command: ConfigCommand::Print { config },
        } => match load(config.as_deref()) {
            Ok(config) => {
                print!("{}", config.to_toml());
                ExitCode::SUCCESS
            }
            Err(err) => config_error(&err),
        },
        Command::Kb {
            command: KbCommand::ServeSync { config: path },
        } => {
            let mut config = match load(path.as_deref()) {
                Ok(config) => config,
                Err(err) => return config_error(&err),
            };
            if config.tls.listen.is_none() {
                eprintln!(
                    "switchboard: kb serve-sync needs a [tls] listener (listen, cert, key): \
                     replicas sync over TLS only (`switchboard tls self-signed` makes a certificate)"
                );
                return ExitCode::from(2);
            }
            config.server.role = config::ServerRole::Sync;
            config.inference.enabled = false;
            serve(config, registry, exec_started, path, None)
        }
        Command::Kb { command } => kb_command(command, &registry),
        Command::Audit { command } => audit_cli::run(command),
        Command::Agent { command } => agent_command(command),
        Command::Tls {
            command:
                TlsCommand::SelfSigned {
                    host,
                    cert,
                    key,
                    force,
                },
        } => match crate::tls::write_self_signed(&host, &cert, &key, force) {
            Ok(()) => {
                println!(
                    "wrote a self-signed certificate for {host} to {} and its key to {} (mode 0600)",
                    cert.display(),
                    key.display()
                );
                ExitCode::SUCCESS
            }
            Err(err @ crate::tls::TlsError::Exists { .. }) => {
                eprintln!("switchboard: {err}");
                ExitCode::from(2)
            }
            Err(err) => {
                eprintln!("switchboard: {err}");
                ExitCode::FAILURE
            }
        },
    }
}

fn config_error(err: &config::ConfigError) -> ExitCode {
    eprintln!("switchboard: invalid configuration: {err}");
    ExitCode::from(2)
}

/// `config_path` and `listen` are where the configuration came from (`--config`, `--listen`):
/// a SIGHUP reads it again from there (see [`crate::reload`]).
fn serve(
    config: Config,
    registry: Registry,
    exec_started: Instant,
    config_path: Option<PathBuf>,
    listen: Option<std::net::SocketAddr>,
) -> ExitCode {
    logging::init(config.log.format, &config.log.level);
    match system::raise_open_file_limit() {
        Ok((before, after)) => {
            tracing::info!(before, after, "open-file limit raised to the hard limit")
        }
        Err(err) => tracing::warn!(error = %err, "cannot raise the open-file limit"),
    }
    if config.visitors.allow_unlisted_sites {
        tracing::warn!(
            listed = config.visitors.sites.len(),
            "[visitors] allow_unlisted_sites = true: /ws/visitor serves any site name without an \
             Origin check; list your sites under [visitors.sites] and set it to false"
        );
    }
    if let Some(memlock) = system::locked_memory_limit() {
        tracing::info!(
            memlock,
            io_memory = config.shards.io_memory,
            "locked-memory limit"
        );
    }
    let available = core_ids();
    let cores = match config.shards.cores.resolve(&available) {
        Ok(cores) => cores,
        Err(err) => {
            eprintln!("switchboard: invalid configuration: {err}");
            return ExitCode::from(2);
        }
    };
    if let Err(err) = crate::store::check_shard_layout(&config.storage.dir, cores.len()) {
        eprintln!("switchboard: cannot start: {err}");
        return ExitCode::from(2);
    }
    let audit = match crate::audit::AuditLog::start(&config.audit_path()) {
        Ok(audit) => audit,
        Err(err) => {
            eprintln!("switchboard: cannot start: audit chain: {err}");
            return ExitCode::FAILURE;
        }
    };
    crate::audit::install(audit.clone());
    audit.record(
        crate::audit::AuditEvent::new("server_started", "system")
            .detail("version", env!("CARGO_PKG_VERSION"))
            .detail("shards", cores.len() as u64)
            .detail("config_sha256", config_digest(&config)),
    );
    // One accounts environment and one signing key per process, shared by every shard.
    let authority = match Authority::open(&config) {
        Ok((authority, origin)) => {
            let secret = &authority.settings().secret_file;
            if origin == auth::secret::SecretOrigin::Created {
                tracing::info!(path = %secret.display(), "created the token signing secret (mode 0600)");
            }
            Arc::new(authority)
        }
        Err(err) => {
            eprintln!("switchboard: cannot start: {err}");
            let code = match err {
                auth::AuthError::Secret(_) => 2,
                auth::AuthError::Accounts(_) => 1,
            };
            return ExitCode::from(code);
        }
    };
    // One canned-replies environment per process too.
    let canned = match crate::canned::CannedStore::open(&config.storage.dir) {
        Ok(store) => Arc::new(store),
        Err(err) => {
            eprintln!("switchboard: cannot start: {err}");
            return ExitCode::FAILURE;
        }
    };
    if config.agents.dev_static_tokens {
        tracing::warn!(
            accounts = config.agents.accounts.len(),
            "DEVELOPMENT MODE: [agents] dev_static_tokens = true lets static tokens from the \
             configuration open /ws/agent; never use it in production"
        );
    } else if !config.agents.accounts.is_empty() {
        tracing::warn!(
            accounts = config.agents.accounts.len(),
            "[agents.accounts] static tokens are ignored (dev_static_tokens = false); \
             create accounts with `switchboard agent add`"
        );
    }
    // Main loads the list once, reading the file's time before its content: every shard starts
    // from this list and this time, so a change made after this check is seen (and audited by
    // shard 0) however late a shard starts. A bad file stops the start here.
    let blocklist = match &config.limits.blocklist_file {
        Some(path) => {
            let mtime = crate::admission::blocklist::modified(path);
            match crate::admission::Blocklist::load(path) {
                Ok(list) => Some(crate::server::CheckedBlocklist { list, mtime }),
                Err(err) => {
                    eprintln!("switchboard: invalid configuration: limits.blocklist_file: {err}");
                    return ExitCode::from(2);
                }
            }
        }
        None => None,
    };
    let tls = match config.tls.listen {
        None => None,
        Some(_) => match crate::tls::load_server_config(&config.tls.cert, &config.tls.key) {
            Ok(server_config) => Some(Arc::new(crate::tls::Certificates::new(server_config))),
            Err(err) => {
                eprintln!("switchboard: invalid TLS certificate or key ([tls] cert, key): {err}");
                return ExitCode::from(2);
            }
        },
    };
    // From here a panic on any thread is fatal (see `crate::fault`): logged, 503 on the health
    // probes, exit 70 for a restart.
    let fatal_audit = audit.clone();
    crate::fault::install_panic_hook(move || fatal_audit.flush());
    // Bound before the shards start, so a taken port stops the start like a bad setting.
    let metrics_listener = match config.metrics.listen.map(MetricsListener::bind).transpose() {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("switchboard: cannot start: {err}");
            return ExitCode::from(2);
        }
    };
    let config = Arc::new(config);
    let metrics = Metrics::new(cores.len());
    // systemd's notify socket (Type=notify) and watchdog; `None` when not started by systemd.
    let service_manager = ServiceManager::from_env();
    let liveness = Arc::new(Liveness::new(
        cores.len(),
        service_manager
            .as_ref()
            .map_or(Duration::from_secs(1), ServiceManager::beat_interval),
    ));
    let runtime_config = shards::RuntimeConfig {
        cores: cores.clone(),
        io_memory: config.shards.io_memory,
        listen: std::iter::once(config.server.listen)
            .chain(config.tls.listen)
            .collect(),
        backlog: i32::try_from(config.server.backlog).unwrap_or(i32::MAX),
        mesh_capacity: config.shards.mesh_capacity,
        thread_name: "switchboard-shard".into(),
    };
    // SIGHUP re-reads the configuration and applies what can change live (it no longer ends
    // the process, as the signal's default action would).
    let live = crate::reload::LiveConfig::new(config.clone());
    if let Err(err) = crate::reload::spawn(config_path, listen, live.clone()) {
        tracing::error!(error = %err, "cannot start the configuration reloader");
        return ExitCode::FAILURE;
    }
    let shared = server::ShardShared {
        config: config.clone(),
        metrics: metrics.clone(),
        audit: audit.clone(),
        authority,
        canned,
        tls: tls.clone(),
        handlers: registry,
        liveness: liveness.clone(),
        blocklist,
        live: live.clone(),
    };
    let runtime =
        match shards::Runtime::start::<ShardMessage, _, _>(runtime_config, move |context| {
            server::shard_main(context, shared.clone())
        }) {
            Ok(runtime) => runtime,
            Err(err) => {
                eprintln!("switchboard: cannot start: {err}");
                return ExitCode::FAILURE;
            }
        };
    // Before announcing the address: a SIGTERM right after it must drain, not kill.
    let shutdown = runtime.shutdown();
    if let Err(err) = install_signal_handlers(shutdown) {
        tracing::error!(error = %err, "cannot install signal handlers");
        return ExitCode::FAILURE;
    }
    if let Some(service_manager) = service_manager {
        if let Err(err) = service_manager.spawn(liveness, metrics.clone(), runtime.shutdown()) {
            tracing::error!(error = %err, "systemd notification");
            return ExitCode::FAILURE;
        }
    }
    let addr = runtime.local_addr().expect("serve always binds a listener");
    tracing::info!(
        shards = cores.len(),
        ?cores,
        startup_ms = exec_started.elapsed().as_secs_f64() * 1000.0,
        "switchboard listening on {addr}"
    );
    if let Some(listener) = metrics_listener {
        if let Ok(metrics_addr) = listener.local_addr() {
            tracing::info!("metrics endpoint on http://{metrics_addr}/metrics (no token)");
        }
        let limits = crate::http::HttpLimits {
            max_header_bytes: config.http.max_header_bytes,
            max_headers: config.http.max_headers,
        };
        if let Err(err) = listener.spawn(metrics.clone(), limits) {
            tracing::error!(error = %err, "cannot serve [metrics] listen");
            return ExitCode::FAILURE;
        }
    }
    if let (Some(certificates), Some(tls_addr)) = (tls, runtime.local_addrs().get(1)) {
        tracing::info!("switchboard TLS listening on {tls_addr}");
        if let Err(err) = crate::tls::spawn_watcher(
            certificates,
            config.tls.cert.clone(),
            config.tls.key.clone(),
            config.tls.watch_interval,
            metrics,
        ) {
            tracing::error!(error = %err, "cannot start the TLS certificate watcher");
            return ExitCode::FAILURE;
        }
    }

    let result = runtime.join();
    // A shard that panicked ends the process through the panic hook (exit 70), not here.
    crate::fault::await_fatal_exit();
    audit.flush();
    match result {
        Ok(()) => {
            tracing::info!("switchboard stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!(error = %err, "a shard failed");
            ExitCode::FAILURE
        }
    }
}

/// SHA-256 of the effective configuration as `config print` shows it: the audit chain records
/// it at every start, so a configuration change shows as a new digest.
fn config_digest(config: &Config) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(config.to_toml().as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn core_ids() -> Vec<usize> {
    let mut ids: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|core| core.id)
        .collect();
    ids.sort_unstable();
    ids
}

/// SIGTERM and SIGINT start a graceful shutdown (and tell systemd STOPPING=1); a second one
/// exits at once.
fn install_signal_handlers(shutdown: shards::Shutdown) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("switchboard-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for signal in signals.forever() {
                seen += 1;
                if seen > 1 {
                    tracing::warn!(signal, "second signal: exiting now");
                    std::process::exit(1);
                }
                tracing::info!(signal, "signal received: stopping");
                shutdown.trigger();
                crate::service_manager::notify_stopping();
            }
        })?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// kb commands
// ---------------------------------------------------------------------------------------------------

/// A failed `kb` command: what to print and the exit code.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    /// Exit 1: the command could not do its work.
    fn runtime(message: impl std::fmt::Display) -> Failure {
        Failure {
            code: 1,
            message: message.to_string(),
        }
    }

    /// Exit 2: the configuration, the arguments or the input file are wrong.
    fn invalid(message: impl std::fmt::Display) -> Failure {
        Failure {
            code: 2,
            message: message.to_string(),
        }
    }
}

fn kb_command(command: KbCommand, registry: &Registry) -> ExitCode {
    let result = match command {
        KbCommand::Import { config, file } => kb_import(config.as_deref(), &file),
        KbCommand::Export { config, output } => kb_export(config.as_deref(), output.as_deref()),
        KbCommand::List { config } => kb_list(config.as_deref()),
        KbCommand::Sync {
            config,
            from,
            token_file,
            ca_file,
        } => kb_sync::run(config.as_deref(), &from, &token_file, ca_file.as_deref()),
        KbCommand::ServeSync { .. } => unreachable!("run_with_registry serves it"),
        KbCommand::Eval {
            config,
            lexical,
            file,
        } => kb_eval(config.as_deref(), &file, lexical, registry),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("switchboard: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

/// The configuration and the cores its shards run on.
fn kb_config(path: Option<&Path>) -> Result<(Config, Vec<usize>), Failure> {
    let config = config::load(path)
        .map_err(|err| Failure::invalid(format_args!("invalid configuration: {err}")))?;
    let cores = config
        .shard_cores(&core_ids())
        .map_err(|err| Failure::invalid(format_args!("invalid configuration: {err}")))?;
    Ok((config, cores))
}

/// A malformed input file exits 2, an unreadable one 1.
fn import_failure(err: ImportError) -> Failure {
    match err {
        ImportError::Invalid { .. } => Failure::invalid(err),
        other => Failure::runtime(other),
    }
}

fn seconds(duration: Duration) -> String {
    format!("{:.2} s", duration.as_secs_f64())
}

fn millis(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1e3)
}

fn kb_import(config_path: Option<&Path>, file: &Path) -> Result<(), Failure> {
    let started = Instant::now();
    let (config, cores) = kb_config(config_path)?;
    let entries = kb::import_file(file).map_err(import_failure)?;
    println!(
        "read {}: {} entries, {} questions ({})",
        file.display(),
        entries.len(),
        kb::question_count(&entries),
        millis(started.elapsed())
    );
    // An import runs once, off the serving path: two intra-op threads halve its time.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
    let load_started = Instant::now();
    let mut encoder = ModelSettings::from_config(&config, threads)
        .load()
        .map_err(|err| Failure::runtime(format_args!("cannot load the sentence encoder: {err}")))?;
    println!(
        "loaded the model in {} ({})",
        millis(load_started.elapsed()),
        encoder.fingerprint()
    );
    let coverage = encoder
        .vocabulary_coverage(
            entries
                .iter()
                .flat_map(|e| e.questions.iter().map(String::as_str)),
        )
        .map_err(|err| Failure::runtime(format_args!("cannot tokenize the questions: {err}")))?;
    if let Some(warning) = coverage.warning(&config.inference.tokenizer) {
        eprintln!("warning: {warning}");
    }
    let fine_tune = update::FineTuneSettings::from_config(&config, threads);
    let terminal = std::io::stderr().is_terminal();
    // One bar per stage (see `ImportStage`), each started when its stage starts.
    let mut stage: Option<(update::ImportStage, ImportProgress, Instant)> = None;
    let prepared = update::prepare_with_progress(
        entries,
        &mut encoder,
        &fine_tune,
        &mut |current, done, total| {
            if stage.as_ref().is_none_or(|(shown, _, _)| *shown != current) {
                if terminal && stage.is_some() {
                    eprintln!();
                }
                let (label, unit) = match current {
                    update::ImportStage::LowerLayers => ("frozen layers", "questions"),
                    update::ImportStage::FineTuning => ("fine-tuning", "steps"),
                    update::ImportStage::Embedding => ("embedding", "questions"),
                };
                let bar = ImportProgress::new(total, terminal).labelled(label, unit);
                stage = Some((current, bar, Instant::now()));
            }
            let (_, bar, started) = stage.as_mut().expect("set above");
            if let Some(line) = bar.update(done, started.elapsed()) {
                if terminal {
                    eprint!("\r{line}");
                } else {
                    eprintln!("{line}");
                }
            }
        },
    );
    if terminal {
        eprintln!();
    }
    let prepared = prepared.map_err(Failure::runtime)?;
    drop(encoder);
    match &prepared.fine_tune {
        update::FineTuneOutcome::Tuned {
            report,
            lower_layers_time,
        } => println!(
            "fine-tuned the top {} on the knowledge base: frozen layers {}, {} epochs ({} steps) in {}, loss {:.3} -> {:.3}",
            match update::TUNED_LAYER_COUNT {
                1 => "layer".to_string(),
                n => format!("{n} layers"),
            },
            seconds(*lower_layers_time),
            report.epochs,
            report.steps,
            seconds(report.elapsed),
            report.first_epoch_loss,
            report.last_epoch_loss
        ),
        update::FineTuneOutcome::Skipped(reason) => {
            println!("not fine-tuned: {reason}")
        }
    }
    println!(
        "embedded {} questions in {} ({} dimensions, {threads} threads)",
        prepared.question_count(),
        seconds(prepared.embed_time),
        prepared.dim
    );
    if matches!(prepared.fine_tune, update::FineTuneOutcome::Tuned { .. }) {
        println!("vectors embedded by {}", prepared.model_fingerprint);
    }
    println!(
        "trained the classifier head in {} ({} iterations, loss {:.4})",
        seconds(prepared.train_time),
        prepared.train_report.iterations,
        prepared.train_report.loss
    );
    let apply_started = Instant::now();
    let version = update::apply(
        &config.storage.dir,
        cores.len(),
        kb::DEFAULT_MAP_SIZE,
        &prepared,
    )
    .map_err(Failure::runtime)?;
    println!(
        "stored version {version} in {} shard replica{} under {} ({})",
        cores.len(),
        if cores.len() == 1 { "" } else { "s" },
        config.storage.dir.display(),
        millis(apply_started.elapsed())
    );
    println!("imported in {}", seconds(started.elapsed()));
    audit_cli::record(
        &config,
        crate::audit::AuditEvent::new("kb_imported", &audit_cli::cli_actor())
            .target(file.display().to_string())
            .detail("version", version)
            .detail("entries", prepared.entries.len() as u64),
    )
    .map_err(Failure::runtime)?;
    Ok(())
}

/// Shard 0's current version and entries, read in one transaction; the environment is
/// closed again before this returns.
fn read_replica_zero(config: &Config) -> Result<(kb::VersionInfo, Vec<kb::Entry>), Failure> {
    let dir = &config.storage.dir;
    let no_kb = || {
        Failure::runtime(format_args!(
            "no knowledge base has been imported under {} (run `switchboard kb import`)",
            dir.display()
        ))
    };
    if !dir.join("kb-0").is_dir() {
        return Err(no_kb());
    }
    let replica = KbReplica::open(dir, 0, kb::DEFAULT_MAP_SIZE).map_err(Failure::runtime)?;
    let view = replica.read().map_err(Failure::runtime)?;
    let info = view.info().map_err(Failure::runtime)?.ok_or_else(no_kb)?;
    let entries = view.entries().map_err(Failure::runtime)?;
    Ok((info, entries))
}

fn kb_export(config_path: Option<&Path>, output: Option<&Path>) -> Result<(), Failure> {
    let (config, _) = kb_config(config_path)?;
    let (info, entries) = read_replica_zero(&config)?;
    let text = kb::export_json(&entries);
    match output {
        Some(path) => {
            std::fs::write(path, text.as_bytes()).map_err(|err| {
                Failure::runtime(format_args!("cannot write {}: {err}", path.display()))
            })?;
            eprintln!("exported {} to {}", kb::describe(&info), path.display());
        }
        None => std::io::stdout()
            .lock()
            .write_all(text.as_bytes())
            .map_err(|err| Failure::runtime(format_args!("cannot write the export: {err}")))?,
    }
    Ok(())
}

fn kb_list(config_path: Option<&Path>) -> Result<(), Failure> {
    let (config, _) = kb_config(config_path)?;
    let (info, entries) = read_replica_zero(&config)?;
    println!("{}", kb::describe(&info));
    print!("{}", kb::list(&entries));
    Ok(())
}

fn kb_eval(
    config_path: Option<&Path>,
    file: &Path,
    lexical: bool,
    registry: &Registry,
) -> Result<(), Failure> {
    let (config, cores) = kb_config(config_path)?;
    let queries = eval::read_labelled(file).map_err(import_failure)?;
    let mut settings = EngineSettings::from_config(&config);
    if !lexical && settings.model.is_none() {
        return Err(Failure::invalid(
            "[inference] enabled = false: there is no model to evaluate (use --lexical)",
        ));
    }
    if lexical {
        settings.model = None;
    }
    // Every query must reach the model: a cache hit would not measure it.
    settings.hot_cache_entries = 0;
    settings.embedding_cache_entries = 0;
    settings.wait_for_models = true;
    let (engine, timings) =
        IntentEngine::open_timed(&settings, 0, cores[0]).map_err(Failure::runtime)?;
    let Some(version) = engine.version() else {
        return Err(Failure::runtime(format_args!(
            "no knowledge base has been imported under {} (run `switchboard kb import`)",
            config.storage.dir.display()
        )));
    };
    println!(
        "knowledge base: version {version}, {} entries; model: {}",
        engine.entry_count(),
        engine
            .model_fingerprint()
            .unwrap_or_else(|| "none (lexical)".into())
    );
    let mode = if lexical {
        EvalMode::Lexical
    } else {
        EvalMode::Model
    };
    if !lexical {
        let first = Instant::now();
        futures_lite::future::block_on(engine.recognise(&queries[0].text));
        println!(
            "engine opened in {} (model {}, knowledge base {}); first query {}",
            millis(timings.total),
            millis(timings.model),
            millis(timings.knowledge_base),
            millis(first.elapsed())
        );
    }
    println!("queries: {} from {}", queries.len(), file.display());
    if !lexical {
        println!(
            "one query at a time: a lone query does not wait out [inference] batch_window ({:?})",
            settings.worker.batch_window
        );
    }
    let escalated_before = engine.stats().escalated;
    let report = eval::evaluate(&engine, &config.bot, &queries, mode);
    // The cascade's figure is the node's; variants with their own model run afterwards.
    let escalated = engine.stats().escalated - escalated_before;
    print!("{report}");
    if !config.bot.variants.is_empty() {
        // A variant with its own model is recognised again with it.
        let variants = eval::evaluate_variants(
            &report.recognitions,
            &queries,
            &config,
            registry,
            |query, cascade| match mode {
                EvalMode::Model => {
                    futures_lite::future::block_on(engine.recognise_with(&query.text, cascade))
                }
                EvalMode::Lexical => engine.recognise_lexically(&query.text),
            },
        );
        print!("{}", eval::VariantTable(&variants));
    }
    if !lexical
        && settings
            .model
            .as_ref()
            .is_some_and(|m| m.companion.is_some())
    {
        println!(
            "companion cascade: {escalated} of {} queries ({:.1}%) also ran the companion model \
             ([inference] companion_below = {})",
            queries.len(),
            100.0 * escalated as f64 / queries.len().max(1) as f64,
            config.inference.companion_below
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// agent commands
// ---------------------------------------------------------------------------------------------------

fn agent_command(command: AgentCommand) -> ExitCode {
    match agent_run(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("switchboard: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

/// Bad input (unknown agent, weak password, bad name) exits 2; a store failure 1.
fn manage_failure(err: manage::ManageError) -> Failure {
    if err.is_bad_input() {
        Failure::invalid(err)
    } else {
        Failure::runtime(err)
    }
}

fn parse_role(role: &str) -> Result<Role, Failure> {
    role.parse::<Role>().map_err(Failure::invalid)
}

fn open_accounts(path: Option<&Path>) -> Result<(Config, auth::accounts::AccountStore), Failure> {
    let config = config::load(path)
        .map_err(|err| Failure::invalid(format_args!("invalid configuration: {err}")))?;
    let store =
        auth::accounts::AccountStore::open(&config.storage.dir).map_err(Failure::runtime)?;
    crate::audit::install_file(&config.audit_path()).map_err(Failure::runtime)?;
    Ok((config, store))
}

/// The password from a prompt (twice, no echo) or, when stdin is not a terminal, its first line.
fn read_password(name: &str) -> Result<String, Failure> {
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password(format!("password for {name}: "))
            .map_err(|err| Failure::runtime(format_args!("cannot read the password: {err}")))?;
        let again = rpassword::prompt_password("repeat the password: ")
            .map_err(|err| Failure::runtime(format_args!("cannot read the password: {err}")))?;
        if first != again {
            return Err(Failure::invalid("the two passwords differ"));
        }
        Ok(first)
    } else {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map_err(|err| {
            Failure::invalid(format_args!("cannot read the password from stdin: {err}"))
        })?;
        let trimmed = line.strip_suffix('\n').unwrap_or(&line);
        let trimmed = trimmed.strip_suffix('\r').unwrap_or(trimmed);
        Ok(trimmed.to_owned())
    }
}

fn agent_run(command: AgentCommand) -> Result<(), Failure> {
    let now = auth::clock::unix_now();
    let by = &audit_cli::cli_actor();
    match command {
        AgentCommand::Add {
            name,
            role,
            display,
            max_open,
            config,
        } => {
            let role = parse_role(&role)?;
            let (config, store) = open_accounts(config.as_deref())?;
            auth::accounts::check_name(&name).map_err(Failure::invalid)?;
            if store.get(&name).map_err(Failure::runtime)?.is_some() {
                return Err(Failure::invalid(format_args!(
                    "an agent account named {name:?} already exists"
                )));
            }
            let password = read_password(&name)?;
            let new = manage::NewAccount {
                name: &name,
                display: display.as_deref(),
                role,
                max_open: max_open.unwrap_or(config.agents.default_max_open),
                password: &password,
            };
            let account = manage::create(&store, &new, config.auth.min_password_length, now, by)
                .map_err(manage_failure)?;
            println!(
                "created agent {} ({}, role {}, max_open {})",
                account.name, account.display, account.role, account.max_open
            );
        }
        AgentCommand::List { config } => {
            let (_, store) = open_accounts(config.as_deref())?;
            let accounts = store.list().map_err(Failure::runtime)?;
            println!(
                "{:<24} {:<10} {:<9} {:>8}  {:<28} display",
                "name", "role", "status", "max_open", "lockout"
            );
            for account in accounts {
                let lockout = if account.is_locked(now) {
                    format!(
                        "locked until {}",
                        auth::clock::rfc3339(account.locked_until)
                    )
                } else if account.failed_logins > 0 {
                    format!("{} failed login(s)", account.failed_logins)
                } else {
                    "-".to_owned()
                };
                println!(
                    "{:<24} {:<10} {:<9} {:>8}  {:<28} {}",
                    account.name,
                    account.role.as_str(),
                    if account.disabled {
                        "disabled"
                    } else {
                        "enabled"
                    },
                    account.max_open,
                    lockout,
                    account.display
                );
            }
        }
        AgentCommand::Disable { name, config } => {
            let (_, store) = open_accounts(config.as_deref())?;
            manage::set_disabled(&store, &name, true, now, by).map_err(manage_failure)?;
            println!("{name} disabled; its tokens no longer work");
        }
        AgentCommand::Enable { name, config } => {
            let (_, store) = open_accounts(config.as_deref())?;
            manage::set_disabled(&store, &name, false, now, by).map_err(manage_failure)?;
            println!("{name} enabled");
        }
        AgentCommand::Passwd { name, config } => {
            let (config, store) = open_accounts(config.as_deref())?;
            auth::accounts::check_name(&name).map_err(Failure::invalid)?;
            if store.get(&name).map_err(Failure::runtime)?.is_none() {
                return Err(Failure::invalid(format_args!(
                    "no agent account named {name:?}"
                )));
            }
            let password = read_password(&name)?;
            manage::set_password(
                &store,
                &name,
                &password,
                config.auth.min_password_length,
                now,
                by,
            )
            .map_err(manage_failure)?;
            println!("password of {name} changed; its tokens no longer work");
        }
        AgentCommand::Role { name, role, config } => {
            let role = parse_role(&role)?;
            let (_, store) = open_accounts(config.as_deref())?;
            manage::set_role(&store, &name, role, now, by).map_err(manage_failure)?;
            println!("{name} is now {role}");
        }
        AgentCommand::Unlock { name, config } => {
            let (_, store) = open_accounts(config.as_deref())?;
            manage::unlock(&store, &name, now, by).map_err(manage_failure)?;
            println!("{name} unlocked");
        }
    }
    Ok(())
}
