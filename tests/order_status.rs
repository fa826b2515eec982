//! The custom-plugin sample (`examples/order-status`) through its real program over loopback:
//! the switchboard command line plus the `order_status` handler, which asks an HTTP order
//! service. A visitor asking for an order gets its status from the sample's own service, in
//! English or Chinese; an unknown number gets a clear reply; a service that is down or hangs
//! gets a polite reply, and while a lookup hangs the shard keeps serving other visitors.
//!
//! Needs the model files (the bot answers only with the intent engine loaded), like
//! tests/bot.rs. Builds the example first if needed (`cargo test` builds it anyway).

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// One shard, so the hanging-lookup test proves the shard's event loop is not blocked.
const OVERLAY: &str = r#"
[shards]
cores = [0]

[inference]
enabled = true

[bot]
handlers = ["risk_control", "human_transfer", "order_status", "fallback"]
"#;

/// `target/<profile>/examples/order-status`, brought up to date with cargo. `cargo test` builds
/// the example only as a test harness (`test = true`), so this links the program; `--workspace`
/// resolves features as `cargo test --workspace` does, so the libraries already built are reused
/// (without it every dependency is built a second time, minutes on CI, while other tests run).
fn example_binary() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        let mut build = Command::new(env!("CARGO"));
        build.args([
            "build",
            "--workspace",
            "--locked",
            "--example",
            "order-status",
        ]);
        if !cfg!(debug_assertions) {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(
            status.success(),
            "cargo build --example order-status failed"
        );
    });
    let test = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/order_status-HASH
    test.parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>")
        .join("examples")
        .join("order-status")
}

/// Starts the sample; `service` points it at an order service instead of its own.
fn start_sample(service: Option<SocketAddr>) -> Server {
    let mut program = Command::new(example_binary());
    program.current_dir(env!("CARGO_MANIFEST_DIR"));
    if let Some(addr) = service {
        program.env("ORDER_SERVICE_ADDR", addr.to_string());
    } else {
        program.env_remove("ORDER_SERVICE_ADDR");
    }
    Server::start_program(program, tempfile::tempdir().unwrap(), OVERLAY)
}

struct Visitor {
    client: RawClient,
    seen: Vec<Value>,
}

impl Visitor {
    fn connect(server: &Server, id: &str) -> Visitor {
        let client = RawClient::connect(server.addr, &visitor_path(server, "shop", id, None))
            .expect("visitor upgrade");
        let mut visitor = Visitor {
            client,
            seen: Vec::new(),
        };
        visitor.next_where(|v| v["type"] == "hello");
        visitor
    }

    fn send(&mut self, id: &str, text: &str) {
        self.client
            .send_json(&json!({"type": "message", "id": id, "text": text}));
    }

    /// The next frame matching `want`.
    fn next_where(&mut self, want: impl Fn(&Value) -> bool) -> Value {
        self.client.set_read_timeout(Duration::from_secs(20));
        loop {
            let frame = self
                .client
                .read_message()
                .unwrap_or_else(|| panic!("no matching frame; saw {:#?}", self.seen));
            let value = frame.json();
            if want(&value) {
                return value;
            }
            self.seen.push(value);
        }
    }

    /// The bot's next reply.
    fn bot_reply(&mut self) -> String {
        let reply = self.next_where(|v| v["type"] == "message" && v["from"] == "bot");
        reply["text"].as_str().unwrap().to_owned()
    }

    fn ask(&mut self, id: &str, text: &str) -> String {
        self.send(id, text);
        self.bot_reply()
    }
}

#[test]
fn order_questions_are_answered_from_the_local_order_service() {
    let server = start_sample(None);
    let mut visitor = Visitor::connect(&server, "buyer");
    assert_eq!(
        visitor.ask("m1", "Where is my order 12345?"),
        "Order 12345 has shipped with DHL and should arrive on 2026-12-04."
    );
    assert_eq!(
        visitor.ask("m2", "where is my order 99999"),
        "I could not find an order numbered 99999. Please check the number in your \
         confirmation email."
    );
    assert_eq!(
        visitor.ask("m3", "where is my order?"),
        "What is your order number? For example: where is my order 12345"
    );
    let mut chinese = Visitor::connect(&server, "buyer-zh");
    assert_eq!(
        chinese.ask("m1", "我的订单77777到哪了"),
        "订单 77777 已于 2026-11-28 送达。"
    );
    assert_eq!(
        chinese.ask("m2", "查一下订单 20240"),
        "订单 20240 正在备货，预计 2026-12-08 前发货。"
    );
    // Not an order question: the rest of the chain answers.
    let other = visitor.ask("m4", "hello there");
    assert!(other.contains("rephrase"), "{other}");
    assert!(
        server.has_logged("order service at http://127.0.0.1:"),
        "{}",
        server.logs()
    );
}

#[test]
fn a_service_that_is_down_gets_a_polite_reply() {
    // A port nothing listens on: the connection is refused.
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let server = start_sample(Some(dead));
    let mut visitor = Visitor::connect(&server, "unlucky");
    let started = Instant::now();
    assert_eq!(
        visitor.ask("m1", "Where is my order 12345?"),
        "Sorry, I cannot look up orders right now. Please try again in a few minutes, or ask \
         to talk to a human."
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    let mut chinese = Visitor::connect(&server, "unlucky-zh");
    assert_eq!(
        chinese.ask("m1", "我的订单12345到哪了"),
        "抱歉，订单查询暂时不可用。请稍后再试，或转人工客服。"
    );
}

#[test]
fn a_hanging_service_times_out_politely_without_stalling_the_shard() {
    // Accepts connections and never answers.
    let hanging = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = hanging.local_addr().unwrap();
    let held = std::thread::spawn(move || {
        let mut open = Vec::new();
        for stream in hanging.incoming().take(1) {
            open.push(stream);
        }
        std::thread::sleep(Duration::from_secs(10));
    });
    let server = start_sample(Some(addr));
    let mut waiting = Visitor::connect(&server, "waiting");
    let mut other = Visitor::connect(&server, "other");
    let started = Instant::now();
    waiting.send("m1", "Where is my order 12345?");
    // While that lookup hangs, the (only) shard answers someone else at once.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        other.ask("m1", "where is my order?"),
        "What is your order number? For example: where is my order 12345"
    );
    let answered_other = started.elapsed();
    let reply = waiting.bot_reply();
    let answered_waiting = started.elapsed();
    assert!(
        reply.starts_with("Sorry, I cannot look up orders right now"),
        "{reply}"
    );
    assert!(
        answered_other < answered_waiting,
        "the other visitor waited for the hanging lookup ({answered_other:?} vs {answered_waiting:?})"
    );
    // The lookup deadline (1.5 s) ended it, well before the server's own limit (10 s).
    assert!(
        answered_waiting < Duration::from_secs(5),
        "{answered_waiting:?}"
    );
    drop(held);
}
