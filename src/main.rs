//! The `switchboard` command line: `serve`, `config check`, `config print`.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or
//! arguments (clap also exits 2 for bad arguments).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, Subcommand};
use switchboard::config::{self, Config};
use switchboard::metrics::Metrics;
use switchboard::server::{self, ShardMessage};
use switchboard::{logging, system};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

fn main() -> ExitCode {
    let exec_started = Instant::now();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, listen } => {
            let mut config = match config::load(config.as_deref()) {
                Ok(config) => config,
                Err(err) => return config_error(&err),
            };
            if let Some(listen) = listen {
                config.server.listen = listen;
            }
            serve(config, exec_started)
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => match config::load(Some(&file)) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(err) => config_error(&err),
        },
        Command::Config {
            command: ConfigCommand::Print { config },
        } => match config::load(config.as_deref()) {
            Ok(config) => {
                print!("{}", config.to_toml());
                ExitCode::SUCCESS
            }
            Err(err) => config_error(&err),
        },
    }
}

fn config_error(err: &config::ConfigError) -> ExitCode {
    eprintln!("switchboard: invalid configuration: {err}");
    ExitCode::from(2)
}

fn serve(config: Config, exec_started: Instant) -> ExitCode {
    logging::init(config.log.format, &config.log.level);
    match system::raise_open_file_limit() {
        Ok((before, after)) => {
            tracing::info!(before, after, "open-file limit raised to the hard limit")
        }
        Err(err) => tracing::warn!(error = %err, "cannot raise the open-file limit"),
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
    let config = Arc::new(config);
    let metrics = Metrics::new(cores.len());
    let runtime_config = shards::RuntimeConfig {
        cores: cores.clone(),
        io_memory: config.shards.io_memory,
        listen: Some(config.server.listen),
        backlog: i32::try_from(config.server.backlog).unwrap_or(i32::MAX),
        mesh_capacity: config.shards.mesh_capacity,
        thread_name: "switchboard-shard".into(),
    };
    let shard_config = config.clone();
    let runtime =
        match shards::Runtime::start::<ShardMessage, _, _>(runtime_config, move |context| {
            server::shard_main(context, shard_config.clone(), metrics.clone())
        }) {
            Ok(runtime) => runtime,
            Err(err) => {
                eprintln!("switchboard: cannot start: {err}");
                return ExitCode::FAILURE;
            }
        };
    let addr = runtime.local_addr().expect("serve always binds a listener");
    tracing::info!(
        shards = cores.len(),
        ?cores,
        startup_ms = exec_started.elapsed().as_secs_f64() * 1000.0,
        "switchboard listening on {addr}"
    );

    let shutdown = runtime.shutdown();
    if let Err(err) = install_signal_handlers(shutdown) {
        tracing::error!(error = %err, "cannot install signal handlers");
        return ExitCode::FAILURE;
    }
    match runtime.join() {
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

fn core_ids() -> Vec<usize> {
    let mut ids: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|core| core.id)
        .collect();
    ids.sort_unstable();
    ids
}

/// SIGTERM and SIGINT start a graceful shutdown; a second one exits at once.
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
            }
        })?;
    Ok(())
}
