//! The audit chain through the real binary: the server records its starts (with the digest of
//! its configuration), `switchboard audit verify` accepts the intact chain and reports, with a
//! non-zero exit, the first record broken by a flipped byte or a deleted record.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Server, BIN};

/// Starts and stops the server `n` times on one directory; returns the directory and the
/// config path.
fn chain_of_starts(n: usize) -> (tempfile::TempDir, std::path::PathBuf) {
    let mut dir = tempfile::tempdir().unwrap();
    for _ in 0..n {
        let mut server = Server::start_in(dir, "");
        assert!(server.terminate(Duration::from_secs(10)).is_some());
        dir = std::mem::replace(&mut server.dir, tempfile::tempdir().unwrap());
    }
    let config = dir.path().join("test.toml");
    (dir, config)
}

fn verify(config: &std::path::Path) -> (Option<i32>, String, String) {
    let output = Command::new(BIN)
        .args(["audit", "verify", "--config"])
        .arg(config)
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn server_starts_are_chained_and_verify() {
    let (dir, config) = chain_of_starts(3);
    let (code, stdout, stderr) = verify(&config);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("ok, 3 records"), "{stdout}");
    let log = std::fs::read_to_string(dir.path().join("data/audit.log")).unwrap();
    assert_eq!(log.lines().count(), 3);
    assert!(log
        .lines()
        .all(|l| l.contains("\"kind\":\"server_started\"") && l.contains("config_sha256")));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("data/audit.log"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let tail = Command::new(BIN)
        .args(["audit", "tail", "-n", "2", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(tail.status.success());
    assert_eq!(String::from_utf8_lossy(&tail.stdout).lines().count(), 2);
    assert!(String::from_utf8_lossy(&tail.stderr).contains("head: record 3"));
}

#[test]
fn a_flipped_byte_in_the_middle_fails_verify_at_that_point() {
    let (dir, config) = chain_of_starts(3);
    let path = dir.path().join("data/audit.log");
    let mut bytes = std::fs::read(&path).unwrap();
    let first_line = bytes.iter().position(|&b| b == b'\n').unwrap();
    // A byte inside record 2's timestamp: the record still parses, record 3 no longer follows.
    let at = first_line + 1 + 20;
    bytes[at] = if bytes[at] == b'1' { b'2' } else { b'1' };
    std::fs::write(&path, &bytes).unwrap();
    let (code, _, stderr) = verify(&config);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("chain broken at line"), "{stderr}");
    assert!(
        stderr.contains("line 2") || stderr.contains("line 3"),
        "{stderr}"
    );
}

#[test]
fn a_deleted_record_fails_verify_naming_the_missing_record() {
    let (dir, config) = chain_of_starts(3);
    let path = dir.path().join("data/audit.log");
    let text = std::fs::read_to_string(&path).unwrap();
    let kept: Vec<&str> = text
        .lines()
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .map(|(_, line)| line)
        .collect();
    std::fs::write(&path, kept.join("\n") + "\n").unwrap();
    let (code, _, stderr) = verify(&config);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("record 2 is missing"), "{stderr}");
}

#[test]
fn a_server_refuses_to_extend_a_torn_chain() {
    let (dir, _config) = chain_of_starts(1);
    let path = dir.path().join("data/audit.log");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() - 5);
    std::fs::write(&path, &bytes).unwrap();
    let output = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(dir.path().join("test.toml"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("audit chain"), "{stderr}");
    assert!(
        stderr.contains("torn") || stderr.contains("not a complete"),
        "{stderr}"
    );
}
