//! The chaos soak of issue 13, in CI's reach: the real harness binary runs `soak --chaos` against the
//! real `switchboard` binary, which it starts itself on a temporary data directory and SIGKILLs every
//! 2-4 s (restarting it on the same data), while visitors churn (clean and abrupt drops, resume,
//! re-sends), agents reconnect and one client floods. The ledger read back at the end must show
//! every acked message present once at its seq, nothing delivered twice on a connection, and the
//! ordinary visitors not held up by the flooder.
//!
//! About 45 s (30 s of load with the last 6 s free of kills, the drain and the read-back).

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

mod common;
use common::{figure, switchboard_bin};

const BENCH: &str = env!("CARGO_BIN_EXE_switchboard-bench");

/// A port free right now on loopback (the server must keep one port across restarts).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// Removes the test's directory when the test ends, passed or not.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn chaos_soak_loses_and_duplicates_nothing_acked() {
    let dir = TempDir(std::env::temp_dir().join(format!("bench-chaos-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let port = free_port();
    let config = dir.0.join("chaos.toml");
    // Default limits (the flooder meets the rate limit, the flood guard and the abuse close); fsync
    // durability (the default); no model, so a restart is ready in a few tens of milliseconds.
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace = \"2s\"\n\n\
             [storage]\ndir = {data:?}\n\n[log]\nformat = \"text\"\nlevel = \"info\"\n\n\
             [inference]\nenabled = false\n\n[agents]\ndev_static_tokens = true\n\n\
             [agents.accounts.bench0]\ntoken = \"switchboard-bench-agent-0\"\nmax_open = 1000\n\n\
             [agents.accounts.bench1]\ntoken = \"switchboard-bench-agent-1\"\nmax_open = 1000\n",
            data = dir.0.join("data"),
        ),
    )
    .unwrap();
    let server_cmd = format!(
        "'{}' serve --config '{}'",
        switchboard_bin().display(),
        config.display()
    );
    let json = dir.0.join("report.json");
    let log = dir.0.join("server.log");
    let target = format!("ws://127.0.0.1:{port}");
    let started = std::time::Instant::now();
    let out = Command::new(BENCH)
        .args(["soak", "--target", &target, "--server-cmd", &server_cmd])
        .args(["--chaos", "--kill-every", "2s..4s", "--seed", "13"])
        .args(["--duration", "30s", "--settle", "6s"])
        // 0.5 messages/s per visitor: half the flood guard's default 10 per 10 s, so a visitor's
        // catch-up and re-sends after a kill stay under it even on a loaded machine (at 1/s, with
        // a busy box shedding `overloaded`, their re-sends tripped it and the abuse close).
        .args(["--visitors", "20", "--relay-visitors", "10", "--rate", "10"])
        .args(["--mean-session", "4s", "--agents", "2"])
        .args(["--agent-token", "switchboard-bench-agent-0"])
        .args(["--agent-token", "switchboard-bench-agent-1"])
        .args(["--shards", "2", "--no-progress"])
        // A start that is not ready in 10 s is killed and started again (counted and noted with
        // its threads' states in the report: it happened once in some twenty runs here).
        .args(["--ready-timeout", "10s"])
        .arg("--json")
        .arg(&json)
        .arg("--server-log")
        .arg(&log)
        .output()
        .expect("run switchboard-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let server_log = std::fs::read_to_string(&log).unwrap_or_default();
    let tail: Vec<&str> = server_log.lines().rev().take(40).collect();
    let context = format!(
        "switchboard-bench soak --chaos exited {:?} after {:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- server log (last lines, newest first)\n{}",
        out.status.code(),
        started.elapsed(),
        tail.join("\n")
    );
    // Exit 2 is the ledger's verdict (something acked lost or duplicated), 1 a harness error.
    assert!(out.status.success(), "{context}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let f = |name: &str| figure(&report, name);
    assert!(f("kills") >= 4.0, "too few kills: {context}");
    assert_eq!(f("server_restarts"), f("kills"), "{context}");
    assert_eq!(f("server_unexpected_exits"), 0.0, "{context}");
    assert_eq!(f("ledger_lost"), 0.0, "{context}");
    assert_eq!(f("ledger_duplicated"), 0.0, "{context}");
    assert_eq!(f("ledger_unverified"), 0.0, "{context}");
    assert_eq!(f("ack_conflicts"), 0.0, "{context}");
    // The ledger covered real traffic: the 20 visitors' 300 scheduled messages, all acked in the
    // end (the flooder did not hold them up), and some of the flooder's.
    assert_eq!(f("ledger_visitors"), 21.0, "{context}");
    assert!(f("ledger_acked") >= 300.0, "{context}");
    assert_eq!(f("ledger_present"), f("ledger_acked"), "{context}");
    assert_eq!(f("unacked_at_end"), 0.0, "{context}");
    assert!(f("flood_messages_sent") > 0.0, "{context}");
    assert!(
        f("refusals") > 0.0,
        "the flooder was never refused: {context}"
    );
    // Every kill dropped the connections of the moment; they came back (resume) and went on.
    assert!(f("server_side_drops") >= f("kills") * 10.0, "{context}");
    assert!(f("agent_reconnects") >= f("kills"), "{context}");
    assert!(stdout.contains("== ledger"), "{context}");
    // Acked agent replies are in the ledger too.
    assert!(f("ledger_agent_acked") > 0.0, "{context}");
    assert_eq!(f("ledger_agent_lost"), 0.0, "{context}");
    eprintln!("{stdout}");
}
