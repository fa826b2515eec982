//! The `switchboard` binary: the command line of [`switchboard::cli`] with the built-in bot
//! handlers. A program with its own handlers calls `switchboard::cli::run_with_registry`
//! instead (see `examples/order-status`).

use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    switchboard::cli::run()
}
