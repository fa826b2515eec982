//! systemd integration through the real binary: the notify protocol as systemd would see it,
//! on a Unix datagram socket the test binds and names in `NOTIFY_SOCKET` (with `WATCHDOG_USEC`,
//! as `WatchdogSec=` sets it): `READY=1` only once every shard's model is loaded, `STATUS=`
//! lines with the sessions, `WATCHDOG=1` pings that stop while one shard's thread is blocked
//! (`POST /debug/stall`) and resume after, `STOPPING=1` on SIGTERM. And the shipped unit passes
//! `systemd-analyze verify`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// The watchdog timeout the test gives the server: pings every 2 s, a shard stale after 2 s.
const WATCHDOG: Duration = Duration::from_secs(4);
/// How long shard 1 is blocked.
const STALL: Duration = Duration::from_secs(8);

/// Every datagram the server sent, with when it arrived.
#[derive(Clone, Default)]
struct Notifications(Arc<Mutex<Vec<(Instant, String)>>>);

impl Notifications {
    /// Receives on `socket` until the test ends.
    fn listen(socket: UnixDatagram) -> Notifications {
        let notifications = Notifications::default();
        let sink = notifications.clone();
        std::thread::spawn(move || {
            let mut buffer = vec![0u8; 4096];
            while let Ok(length) = socket.recv(&mut buffer) {
                let text = String::from_utf8_lossy(&buffer[..length]).into_owned();
                sink.0.lock().unwrap().push((Instant::now(), text));
            }
        });
        notifications
    }

    /// The datagram lines (`KEY=value`) received so far, each with its arrival time.
    fn lines(&self) -> Vec<(Instant, String)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(at, text)| text.lines().map(|line| (*at, line.to_owned())))
            .collect()
    }

    /// Waits (at most `limit`) for a line matching `wanted` that arrived after `after`.
    fn wait_for(
        &self,
        after: Instant,
        limit: Duration,
        wanted: impl Fn(&str) -> bool,
    ) -> Option<(Instant, String)> {
        let deadline = Instant::now() + limit;
        loop {
            let found = self
                .lines()
                .into_iter()
                .find(|(at, line)| *at >= after && wanted(line));
            if found.is_some() || Instant::now() >= deadline {
                return found;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `WATCHDOG=1` pings that arrived within `from..to`.
    fn pings_between(&self, from: Instant, to: Instant) -> usize {
        self.lines()
            .iter()
            .filter(|(at, line)| *at >= from && *at < to && line == "WATCHDOG=1")
            .count()
    }

    fn dump(&self, since: Instant) -> String {
        self.lines()
            .iter()
            .map(|(at, line)| format!("{:>8.3} s  {line}", at.duration_since(since).as_secs_f64()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[test]
fn ready_after_the_models_then_watchdog_pings_stop_while_a_shard_stalls_and_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    let notifications = Notifications::listen(socket);
    let started = Instant::now();

    let mut program = Command::new(BIN);
    program
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", WATCHDOG.as_micros().to_string());
    // Two shards, each with the shipped model (loading in the background once they listen).
    let overlay = "[shards]\ncores = [0, 1]\n\n[inference]\nenabled = true\n\n\
                   [diagnostics]\necho = true\nstall_endpoint = true\n";
    let mut server = Server::start_listening(program, dir, overlay);

    // READY=1, with the status, once both primary models are ready, and not before.
    let ready = notifications.wait_for(started, Duration::from_secs(90), |l| l == "READY=1");
    let logs = server.logs();
    assert!(
        ready.is_some(),
        "no READY=1 within 90 s; got:\n{}\nlogs:\n{logs}",
        notifications.dump(started)
    );
    assert!(server.has_logged("told the service manager READY=1"));
    let logs = server.logs();
    let told = logs.find("told the service manager READY=1").unwrap();
    let loaded: Vec<usize> = logs
        .match_indices("primary model ready")
        .map(|(at, _)| at)
        .collect();
    assert_eq!(
        loaded.len(),
        2,
        "both shards' models loaded before READY=1; logs:\n{logs}"
    );
    assert!(
        loaded.iter().all(|at| *at < told),
        "READY=1 came after every 'primary model ready'; logs:\n{logs}"
    );
    let (ready_at, _) = ready.unwrap();
    assert!(
        notifications
            .wait_for(ready_at, Duration::ZERO, |l| l
                == "STATUS=2 shards, 0 visitor sessions, 0 agent sessions")
            .is_some(),
        "the status goes with READY=1; got:\n{}",
        notifications.dump(started)
    );

    // The status follows the sessions.
    let visitor = RawClient::connect(server.addr, "/ws/visitor?site=notify").expect("visitor");
    assert!(
        notifications
            .wait_for(ready_at, Duration::from_secs(10), |l| l
                == "STATUS=2 shards, 1 visitor session, 0 agent sessions")
            .is_some(),
        "a STATUS= line counts the visitor; got:\n{}",
        notifications.dump(started)
    );
    drop(visitor);

    // Pings every 2 s while both shards beat.
    let watching = Instant::now();
    let deadline = watching + Duration::from_secs(10);
    while notifications.pings_between(watching, Instant::now()) < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        notifications.pings_between(watching, Instant::now()) >= 2,
        "fewer than 2 WATCHDOG=1 pings in 10 s with healthy shards; got:\n{}",
        notifications.dump(started)
    );

    // Shard 1 blocks its thread for 8 s: its heartbeat is stale 2 s into it at the latest (it
    // beats every 500 ms, the notify thread looks every 250 ms), and from then on no ping goes
    // out until it beats again.
    let (status, body) = http_raw(
        server.addr,
        b"POST /debug/stall?shard=1&ms=8000 HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!((status, body.as_str()), (202, "stalling\n"));
    let stall_asked = Instant::now();
    std::thread::sleep(STALL - Duration::from_millis(500));
    let silent_from = stall_asked + Duration::from_secs(3);
    let silent_to = stall_asked + STALL - Duration::from_millis(500);
    let during = notifications.pings_between(silent_from, silent_to);
    assert_eq!(
        during,
        0,
        "WATCHDOG=1 sent while shard 1 was stalled; got:\n{}\nlogs:\n{}",
        notifications.dump(started),
        server.logs()
    );
    assert!(
        server.has_logged("shard 1's heartbeat is stale"),
        "the stale shard is named in the logs:\n{}",
        server.logs()
    );
    assert!(
        notifications
            .wait_for(stall_asked, Duration::ZERO, |l| l.starts_with("STATUS=")
                && l.contains("shard 1 unresponsive"))
            .is_some(),
        "the status names the stalled shard; got:\n{}",
        notifications.dump(started)
    );

    // Once the stall is over the pings resume.
    let resumed = notifications.wait_for(silent_to, Duration::from_secs(10), |l| l == "WATCHDOG=1");
    assert!(
        resumed.is_some(),
        "no WATCHDOG=1 within 10 s after the stall; got:\n{}\nlogs:\n{}",
        notifications.dump(started),
        server.logs()
    );
    assert!(server.has_logged("watchdog pings resumed"));

    // SIGTERM: STOPPING=1 as the drain starts, then a clean exit.
    let stopping = Instant::now();
    let exit = server.terminate(Duration::from_secs(15));
    assert_eq!(
        exit.and_then(|status| status.code()),
        Some(0),
        "logs:\n{}",
        server.logs()
    );
    assert!(
        notifications
            .wait_for(stopping, Duration::from_secs(2), |l| l == "STOPPING=1")
            .is_some(),
        "no STOPPING=1 after SIGTERM; got:\n{}",
        notifications.dump(started)
    );
    eprintln!("notifications:\n{}", notifications.dump(started));
}

/// Without NOTIFY_SOCKET nothing is sent and the stall endpoint does not exist unless switched on.
#[test]
fn the_stall_endpoint_is_404_unless_switched_on() {
    let mut program = Command::new(BIN);
    program.env_remove("NOTIFY_SOCKET");
    let server = Server::start_program(
        program,
        tempfile::tempdir().unwrap(),
        "[shards]\ncores = [0, 1]\n",
    );
    let (status, _) = http_raw(
        server.addr,
        b"POST /debug/stall?shard=0&ms=5000 HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(status, 404);
    assert!(
        !server.logs().contains("systemd notify socket"),
        "no notify thread without NOTIFY_SOCKET"
    );
}

/// The unit file as install.sh installs it, with its binary paths pointing at the built binary
/// (`systemd-analyze verify` checks that the commands exist).
fn unit_for_test(dir: &Path, unit_text: &str) -> std::path::PathBuf {
    let path = dir.join("switchboard.service");
    std::fs::write(&path, unit_text.replace("/usr/local/bin/switchboard", BIN)).unwrap();
    path
}

/// Runs `systemd-analyze verify UNIT`; returns whether it passed and what it said about the unit
/// (it exits 0 on an unknown key or a bad value, only warning, so those count as failures).
fn verify(unit: &Path) -> (bool, String) {
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .output()
        .expect("run systemd-analyze (Debian package systemd; .ci/run installs it)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let about_unit: Vec<&str> = said
        .lines()
        .filter(|line| line.contains("switchboard.service"))
        .collect();
    (output.status.success() && about_unit.is_empty(), said)
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/switchboard.service"),
    )
    .unwrap();
    for directive in [
        "\nType=notify\n",
        "\nNotifyAccess=main\n",
        "\nWatchdogSec=",
        "\nRestart=on-failure\n",
    ] {
        assert!(shipped.contains(directive), "the unit sets {directive:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let (passed, said) = verify(&unit_for_test(dir.path(), &shipped));
    eprintln!("systemd-analyze verify: {said:?}");
    assert!(passed, "systemd-analyze verify:\n{said}");

    // The check catches a mistake: a misspelt key is only a warning to systemd-analyze.
    let broken = shipped.replace("NotifyAccess=main", "NotifyAcess=main");
    let other = tempfile::tempdir().unwrap();
    let (passed, said) = verify(&unit_for_test(other.path(), &broken));
    assert!(
        !passed && said.contains("NotifyAcess"),
        "a misspelt key is reported: {said}"
    );
}
