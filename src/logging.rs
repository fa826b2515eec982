//! Log set-up: human-readable text on a terminal, JSON lines otherwise or when
//! `[log] format = "json"` (see `LogFormat::resolve`).
//!
//! Logs go to standard error so standard output stays free for command output
//! (`config print`, `kb export`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. `level` is an `EnvFilter` directive such as
/// `info` or `switchboard=debug,info`; `RUST_LOG` overrides it when set.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = matches!(
        format.resolve(std::io::stderr().is_terminal()),
        LogFormat::Json
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
    // A second init (in tests) keeps the first subscriber.
    let _ = result;
}
