//! `switchboard audit verify` and `switchboard audit tail`: the operator's view of the audit
//! chain kept by [`crate::audit`]. Exit codes: 0 the chain is intact (or the records were
//! printed), 1 the chain is broken or the file unreadable, 2 invalid configuration.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::audit;
use crate::config;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check the whole chain; report the first broken or missing record and exit 1.
    Verify {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print the newest records and the head's hash (keep it elsewhere to detect a cut tail).
    Tail {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// How many records.
        #[arg(short = 'n', long, default_value_t = 20)]
        count: usize,
    },
}

fn audit_path(config: Option<&Path>) -> Result<PathBuf, ExitCode> {
    match config::load(config) {
        Ok(config) => Ok(config.audit_path()),
        Err(err) => {
            eprintln!("switchboard: invalid configuration: {err}");
            Err(ExitCode::from(2))
        }
    }
}

pub fn run(command: AuditCommand) -> ExitCode {
    match command {
        AuditCommand::Verify { config } => {
            let path = match audit_path(config.as_deref()) {
                Ok(path) => path,
                Err(code) => return code,
            };
            match audit::verify(&path) {
                Ok(Ok(summary)) => {
                    println!(
                        "{}: ok, {} records, head {}",
                        path.display(),
                        summary.records,
                        summary.head
                    );
                    ExitCode::SUCCESS
                }
                Ok(Err(broken)) => {
                    eprintln!(
                        "switchboard: {}: chain broken at line {} (record {}): {}",
                        path.display(),
                        broken.line,
                        broken.expected_seq,
                        broken.reason
                    );
                    ExitCode::FAILURE
                }
                Err(err) => {
                    eprintln!("switchboard: cannot read the audit chain: {err}");
                    ExitCode::FAILURE
                }
            }
        }
        AuditCommand::Tail { config, count } => {
            let path = match audit_path(config.as_deref()) {
                Ok(path) => path,
                Err(code) => return code,
            };
            match audit::tail(&path, count) {
                Ok(lines) => {
                    for line in &lines {
                        println!("{line}");
                    }
                    if let Ok(Ok(summary)) = audit::verify(&path) {
                        eprintln!("head: record {} hash {}", summary.records, summary.head);
                    } else {
                        eprintln!("the chain is broken: run `switchboard audit verify`");
                    }
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("switchboard: cannot read the audit chain: {err}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The actor of a command-line action: `cli:` and the login name of whoever ran it.
pub fn cli_actor() -> String {
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| format!("uid{}", unsafe { libc::getuid() }));
    format!("cli:{user}")
}

/// Appends one record from a command-line action (synchronously: the command waits for the sync).
pub fn record(config: &config::Config, event: audit::AuditEvent) -> Result<(), String> {
    let path = config.audit_path();
    audit::AuditFile::open(&path)
        .and_then(|mut file| file.append(&event, audit::wall_clock_ms()))
        .map(|_| ())
        .map_err(|err| {
            format!("the change was made but its audit record could not be written: {err}")
        })
}
