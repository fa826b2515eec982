//! End-to-end checks of the harness's own correctness against the real `switchboard` binary on loopback:
//! every session and every message is counted, and the measured latency agrees with a delay the server
//! injects on purpose (`/ws/echo?delay_ms=20`). Both processes are real: the server is started with the
//! echo diagnostic enabled, the harness binary is run with `--json`, and the report is checked.
//!
//! The server binary is built (or found up to date) with `cargo build -p switchboard --bin switchboard` in
//! the same target directory as this test, unless `SWITCHBOARD_BIN` names one.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

mod common;
use common::{figure, switchboard_bin};

const BENCH: &str = env!("CARGO_BIN_EXE_switchboard-bench");

/// A switchboard process with the echo diagnostic on, on an ephemeral loopback port; killed on drop.
struct Server {
    child: Child,
    port: u16,
    _dir: PathBuf,
}

impl Server {
    fn start() -> Server {
        let dir = std::env::temp_dir().join(format!(
            "bench-harness-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("bench.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n\n[diagnostics]\necho = true\n\n[inference]\nenabled = false\n\n[storage]\ndir = {:?}\n\n[log]\nformat = \"text\"\nlevel = \"info\"\n",
                dir.join("data")
            ),
        )
        .unwrap();
        let mut child = Command::new(switchboard_bin())
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start switchboard");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr: String = rest
                        .chars()
                        .take_while(|c| !c.is_whitespace() && *c != '"')
                        .collect();
                    if let (Some(t), Ok(a)) = (tx.take(), addr.parse::<std::net::SocketAddr>()) {
                        let _ = t.send(a.port());
                    }
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("switchboard did not log its listen address");
        Server {
            child,
            port,
            _dir: dir,
        }
    }

    fn target(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

/// Runs the harness with `args` plus `--json`, returns the parsed report.
fn bench(args: &[&str], name: &str) -> Value {
    let json =
        std::env::temp_dir().join(format!("bench-harness-{}-{name}.json", std::process::id()));
    let out = Command::new(BENCH)
        .args(args)
        .arg("--no-progress")
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run switchboard-bench");
    assert!(
        out.status.success(),
        "switchboard-bench {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    report
}

#[test]
fn density_counts_every_session_and_reads_server_rss() {
    let server = Server::start();
    let pid = server.child.id().to_string();
    let report = bench(
        &[
            "density",
            "--target",
            &server.target(),
            "--protocol",
            "echo",
            "--pid",
            &pid,
            "--sessions",
            "300",
            "--ramp",
            "1000",
            "--hold",
            "1s",
            "--settle",
            "0.2s",
            "--shards",
            "2",
        ],
        "density",
    );
    assert_eq!(figure(&report, "sessions_requested"), 300.0);
    assert_eq!(
        figure(&report, "sessions_established"),
        300.0,
        "{}",
        report["failures"]
    );
    assert_eq!(figure(&report, "handshakes_failed"), 0.0);
    assert_eq!(figure(&report, "dropped_during_hold"), 0.0);
    assert_eq!(
        figure(&report, "clean_closes"),
        300.0,
        "every session must finish the close handshake"
    );
    assert_eq!(report["histograms"]["handshake"]["summary"]["count"], 300);
    // 300 sessions at 1000/s take about 0.3 s: the open-loop ramp is honoured.
    let ramp = figure(&report, "ramp_duration_s");
    assert!((0.25..3.0).contains(&ramp), "ramp took {ramp} s");
    assert!(figure(&report, "server_rss_after_mib") > 0.0);
    assert!(figure(&report, "rss_per_session_bytes").is_finite());
}

#[test]
fn relay_counts_every_message_exactly() {
    let server = Server::start();
    // 10 conversations at 200 msg/s for 1 s warm-up + 2 s: the schedule holds exactly 600 messages.
    let plot = std::env::temp_dir().join(format!("bench-harness-{}-relay.svg", std::process::id()));
    let report = bench(
        &[
            "relay",
            "--target",
            &server.target(),
            "--protocol",
            "echo",
            "--conversations",
            "10",
            "--rate",
            "200",
            "--warmup",
            "1s",
            "--duration",
            "2s",
            "--drain",
            "3s",
            "--shards",
            "2",
            "--plot",
            plot.to_str().unwrap(),
        ],
        "relay",
    );
    assert_eq!(
        figure(&report, "conversations_up"),
        10.0,
        "{}",
        report["failures"]
    );
    assert_eq!(figure(&report, "sent"), 600.0);
    assert_eq!(figure(&report, "received"), 600.0, "{}", report["failures"]);
    assert_eq!(figure(&report, "lost"), 0.0);
    assert_eq!(figure(&report, "duplicated"), 0.0);
    assert_eq!(figure(&report, "misrouted"), 0.0);
    assert_eq!(figure(&report, "unknown"), 0.0);
    assert_eq!(figure(&report, "errors"), 0.0, "{}", report["failures"]);
    // The 2 s measured window holds 400 of the 600 messages.
    assert_eq!(figure(&report, "measured_samples"), 400.0);
    let tput = figure(&report, "throughput_per_s");
    assert!((180.0..=210.0).contains(&tput), "throughput {tput}");
    let svg = std::fs::read_to_string(&plot).expect("plot written");
    assert!(svg.starts_with("<svg") && svg.contains("percentile"));
    let _ = std::fs::remove_file(&plot);
}

#[test]
fn percentiles_agree_with_an_injected_delay() {
    let server = Server::start();
    let report = bench(&delayed_relay(&server.target(), &[]), "delay");
    assert_measures_the_injected_delay(&report);
}

/// The pacer sends up to one tick early and measures such a message from when it went out. With a
/// 5 ms tick and a shard's messages 10 ms apart, each goes out about 5 ms ahead of its schedule:
/// measured from the schedule, the injected 20 ms would read as about 15 ms.
#[test]
fn a_message_sent_ahead_of_its_schedule_is_measured_from_its_send() {
    let server = Server::start();
    let report = bench(
        &delayed_relay(&server.target(), &["--tick", "5ms"]),
        "early",
    );
    assert_eq!(report["settings"]["tick_us"], 5000);
    assert_measures_the_injected_delay(&report);
}

/// A relay run on the echo endpoint with a 20 ms delay injected by the server: 10 conversations at
/// 200/s on 2 shards, so each shard sends every 10 ms.
fn delayed_relay<'a>(target: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "relay",
        "--target",
        target,
        "--protocol",
        "echo",
        "--echo-delay-ms",
        "20",
        "--conversations",
        "10",
        "--rate",
        "200",
        "--warmup",
        "0.5s",
        "--duration",
        "2s",
        "--shards",
        "2",
    ];
    args.extend_from_slice(extra);
    args
}

fn assert_measures_the_injected_delay(report: &Value) {
    assert_eq!(figure(report, "lost"), 0.0, "{}", report["failures"]);
    let p50 = figure(report, "p50_ms");
    let p99 = figure(report, "p99_ms");
    assert!(
        p50 >= 20.0,
        "p50 {p50} ms is below the injected 20 ms delay"
    );
    assert!(
        p50 < 20.0 + 15.0,
        "p50 {p50} ms is far above the injected 20 ms delay"
    );
    assert!(p99 >= p50 && p99 < 20.0 + 100.0, "p99 {p99} ms");
    // No sample may be faster than the delay (HDR precision is 3 significant digits).
    let lowest = report["histograms"]["latency"]["percentiles"][0][1]
        .as_f64()
        .unwrap();
    assert!(
        lowest >= 19.9,
        "fastest reply {lowest} ms beat the injected delay"
    );
}
