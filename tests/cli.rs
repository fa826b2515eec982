//! The command line: configuration errors, `config check`, `config print`,
//! `--version`, all through the real binary.

mod common;

use std::process::Command;

use common::BIN;

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn serve_with_an_unknown_key_exits_2_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "bad.toml",
        "[server]\nbacklog = 128\n\n[websocket]\nmax_mesage_bytes = 10\n",
    );
    let output = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bad.toml:5"), "{stderr}");
    assert!(stderr.contains("websocket.max_mesage_bytes"), "{stderr}");
}

#[test]
fn wrong_type_and_out_of_range_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    for (text, line, key) in [
        ("[server]\nbacklog = \"many\"\n", 2, "server.backlog"),
        (
            "\n[websocket]\nmax_message_bytes = 10\n",
            3,
            "websocket.max_message_bytes",
        ),
        (
            "[http]\nhandshake_timeout = \"soon\"\n",
            2,
            "http.handshake_timeout",
        ),
    ] {
        let path = write(&dir, "bad.toml", text);
        let output = Command::new(BIN)
            .args(["config", "check"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{text}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("bad.toml:{line}")),
            "{text}: {stderr}"
        );
        assert!(stderr.contains(key), "{text}: {stderr}");
    }
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let output = Command::new(BIN)
        .args(["serve", "--config", "/nonexistent/switchboard.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/switchboard.toml"));
}

#[test]
fn shipped_profiles_check_ok_and_print_round_trips() {
    let root = env!("CARGO_MANIFEST_DIR");
    for profile in ["default", "high-density", "low-latency", "multilingual"] {
        let output = Command::new(BIN)
            .args(["config", "check", &format!("{root}/tuning/{profile}.toml")])
            .output()
            .unwrap();
        assert!(output.status.success(), "{profile}: {output:?}");
    }
    let printed = Command::new(BIN)
        .args([
            "config",
            "print",
            "--config",
            &format!("{root}/tuning/high-density.toml"),
        ])
        .output()
        .unwrap();
    assert!(printed.status.success());
    let text = String::from_utf8(printed.stdout).unwrap();
    assert!(text.contains("[websocket]") && text.contains("max_message_bytes"));
    // What `config print` prints is itself a valid, equivalent tuning file.
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "printed.toml", &text);
    let again = Command::new(BIN)
        .args(["config", "print", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(again.stdout).unwrap(), text);
}

#[test]
fn version_and_bad_arguments() {
    let output = Command::new(BIN).arg("--version").output().unwrap();
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains(env!("CARGO_PKG_VERSION")));
    let output = Command::new(BIN)
        .args(["serve", "--listen", "not-an-address"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not-an-address"));
}

#[test]
fn listen_flag_overrides_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        "c.toml",
        &format!("[storage]\ndir = {:?}\n", dir.path().join("data")),
    );
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let stderr = child.stderr.take().unwrap();
    let mut found = false;
    for line in std::io::BufReader::new(stderr)
        .lines()
        .map_while(Result::ok)
        .take(50)
    {
        if line.contains("listening on 127.0.0.1:") {
            found = true;
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(found);
}
