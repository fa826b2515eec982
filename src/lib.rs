//! switchboard: a self-hosted customer-service appliance.
//!
//! Visitors chat over long-lived WebSockets; a bot answers from a knowledge
//! base; conversations it cannot handle go to human agents. The process runs
//! one pinned shard per core (see the `shards` crate); each shard owns its
//! listener, its sessions, its buffers and its storage.
//!
//! Module map: protocol cores are sans-IO (`http`, `ws`); `server` is the
//! shard-local driver doing the I/O; `arena` and `buffers` hold per-shard
//! session state; `config` is the tuning file loader; `cli` is the command line (the
//! `switchboard` binary, or a program adding its own bot handlers).

pub mod admission;
pub mod api;
pub mod arena;
pub mod audit;
pub mod auth;
pub mod blocking;
pub mod bot;
pub mod buffers;
pub mod canned;
pub mod cli;
pub mod config;
pub mod conversation;
pub mod engine;
pub mod fault;
pub mod http;
pub mod kb;
pub mod liveness;
pub mod logging;
pub mod metrics;
pub mod ratelimit;
pub mod reload;
pub mod server;
pub mod service_manager;
pub mod store;
pub mod system;
pub mod tls;
pub mod web;
pub mod ws;
