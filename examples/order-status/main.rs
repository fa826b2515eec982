//! A custom bot plugin: an order-status lookup that calls a local HTTP endpoint.
//!
//! This program is the whole `switchboard` command line (`serve`, `agent add`, `kb import`,
//! ...) with one handler more: it builds the default handler registry, registers
//! `order_status` (see `handler.rs`), and runs `switchboard::cli::run_with_registry`. The
//! configuration then lists `order_status` in `[bot] handlers`.
//!
//! For `serve` it first starts its order service (`service.rs`) on loopback, unless
//! `ORDER_SERVICE_ADDR=HOST:PORT` points at one already running (the handler then asks that
//! one). `ORDER_SERVICE_LISTEN=HOST:PORT` chooses where its own service listens
//! (default 127.0.0.1 on a free port).
//!
//! Run it with `examples/order-status/run`; see the README next to this file.

mod handler;
mod service;

use std::net::SocketAddr;
use std::process::ExitCode;

use switchboard::bot::Registry;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let service = match order_service() {
        Ok(service) => service,
        Err(message) => {
            eprintln!("order-status: {message}");
            return ExitCode::from(2);
        }
    };
    let mut registry = Registry::default();
    if let Err(err) = handler::register(&mut registry, service) {
        eprintln!("order-status: {err}");
        return ExitCode::FAILURE;
    }
    switchboard::cli::run_with_registry(registry)
}

/// The order service the handler asks: `ORDER_SERVICE_ADDR`, or the sample's own, started
/// here when the command is `serve`.
fn order_service() -> Result<SocketAddr, String> {
    let parse = |name: &str, value: String| {
        value
            .parse::<SocketAddr>()
            .map_err(|err| format!("{name}={value:?} is not HOST:PORT: {err}"))
    };
    if let Ok(addr) = std::env::var("ORDER_SERVICE_ADDR") {
        return parse("ORDER_SERVICE_ADDR", addr);
    }
    let listen = match std::env::var("ORDER_SERVICE_LISTEN") {
        Ok(listen) => parse("ORDER_SERVICE_LISTEN", listen)?,
        Err(_) => SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    if std::env::args().nth(1).as_deref() != Some("serve") {
        // Other commands (agent add, kb import, config check) never ask the service.
        return Ok(listen);
    }
    let addr = service::start(listen)
        .map_err(|err| format!("cannot start the order service on {listen}: {err}"))?;
    eprintln!(
        "order-status: order service at http://{addr}/orders/NUMBER (try 12345, 20240, 77777)"
    );
    Ok(addr)
}
