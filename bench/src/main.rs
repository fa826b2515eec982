//! `switchboard-bench`: the load-test harness. Parses the command line, runs one scenario, prints the final
//! table, and writes the JSON report when asked. Exit code 0 on success, 1 on a harness error.

use mimalloc::MiMalloc;

#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

mod chaos;
mod cli;
mod cpu;
mod limits;
mod net;
mod payload;
mod plot;
mod progress;
mod protocol;
mod report;
mod rss;
mod runtime;
mod scenario;
mod stats;
mod target;
mod tls;
mod wsclient;

/// The project's WebSocket codec (client role), shared with the server.
mod codec {
    pub use switchboard::ws::*;
}

use clap::Parser;

use cli::{Cli, Command, Common};

fn main() {
    let cli = Cli::parse();
    let outcome = match &cli.command {
        Command::Density(a) => finish(scenario::density::run(a), &a.common),
        Command::Relay(a) => finish(scenario::relay::run(a), &a.common),
        Command::Sweep(a) => finish(scenario::sweep::run(a), &a.common),
        Command::Bot(a) => finish(scenario::bot::run(a), &a.common),
        Command::Soak(a) => scenario::soak::run(a).and_then(|report| {
            let verdict = scenario::soak::verdict(&report);
            let ledger = report.clone();
            finish(Ok(report), &a.common)?;
            scenario::soak::print_ledger(&ledger);
            if let Err(e) = verdict {
                // Exit 2: the run worked and the server broke the contract (1 is a harness error).
                eprintln!("switchboard-bench: {e}");
                std::process::exit(2);
            }
            Ok(())
        }),
        Command::Compare(a) => scenario::compare::run(a),
        Command::Get(a) => {
            report::Report::read_json(&a.report).and_then(|r| match r.get(&a.figure) {
                Some(v) => {
                    println!("{v}");
                    Ok(())
                }
                None => Err(format!("{} has no figure {}", a.report.display(), a.figure)),
            })
        }
    };
    if let Err(e) = outcome {
        eprintln!("switchboard-bench: {e}");
        std::process::exit(1);
    }
}

fn finish(result: Result<report::Report, String>, common: &Common) -> Result<(), String> {
    let report = result?;
    report.print_table();
    if let Some(path) = &common.json {
        report.write_json(path)?;
        println!("report written to {}", path.display());
    }
    if let Some(path) = &common.plot {
        println!("plot written to {}", path.display());
    }
    Ok(())
}
