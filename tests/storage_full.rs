//! Running out of space, through the real binary: a small LMDB map that grows while a
//! visitor floods it (every message acked and stored, the log says the map grew), a map at
//! its ceiling (`storage_full` refusals, reads go on, a restart with a higher ceiling
//! accepts the refused messages), and a full disk (a small tmpfs: `storage_full`, then
//! accepted again once a filler file is deleted, nothing acked lost).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const IDENTITY_KEY: &str = "storage-full-test-identity-key-0123456789";

/// No bot and none of the per-session limits: one client sends as fast as it goes.
/// `storage` is the body of the `[storage]` section.
fn overlay(storage: &str) -> String {
    format!(
        "[inference]\nenabled = false\n\n[risk_control]\nflood_messages = 10000\nflood_window = \"100ms\"\n\n\
         [limits]\nconnections_per_ip = 0\nvisitor_messages_per_second = 0\nvisitor_frames_per_second = 0\n\
         admit_latency_budget = \"0s\"\n\n[visitors.sites.full]\nidentity_key = \"{IDENTITY_KEY}\"\n\n\
         [storage]\n{storage}\n"
    )
}

fn connect(server: &Server, visitor: &str, resume: u64) -> (RawClient, u64) {
    let identity_hash =
        switchboard::conversation::identity::identity_hash(IDENTITY_KEY.as_bytes(), visitor);
    let mut client = RawClient::connect(
        server.addr,
        &format!(
            "/ws/visitor?site=full&visitor={visitor}&identity_hash={identity_hash}&resume={resume}"
        ),
    )
    .expect("connect");
    client.set_read_timeout(Duration::from_secs(10));
    loop {
        let frame = client.read_message().expect("hello");
        let value = frame.json();
        if value["type"] == "hello" {
            return (client, value["seq"].as_u64().unwrap_or(0));
        }
        assert_ne!(value["type"], "error", "refused instead of hello: {value}");
    }
}

/// What became of a window of messages sent together.
#[derive(Default, Debug)]
struct Window {
    acked: BTreeMap<String, u64>,
    /// Codes of the error frames received (one per refused message).
    errors: Vec<String>,
}

/// Sends `ids` (the id is also the text, padded to `size` bytes) and reads until every one
/// was acked or refused.
fn send_window(client: &mut RawClient, ids: &[String], size: usize) -> Window {
    for id in ids {
        let text = format!("{id}:{}", "x".repeat(size.saturating_sub(id.len() + 1)));
        client.send_json(&json!({"type": "message", "id": id, "text": text}));
    }
    let mut window = Window::default();
    while window.acked.len() + window.errors.len() < ids.len() {
        let frame = client
            .read_message()
            .unwrap_or_else(|| panic!("connection ended; so far {window:?}"));
        let value = frame.json();
        match value["type"].as_str() {
            Some("ack") => {
                window.acked.insert(
                    value["id"].as_str().unwrap().to_owned(),
                    value["seq"].as_u64().unwrap(),
                );
            }
            Some("error") => window
                .errors
                .push(value["code"].as_str().unwrap_or_default().to_owned()),
            _ => {}
        }
    }
    window
}

/// Reads the whole conversation back (resume from 0) and checks it holds exactly `acked`
/// (id -> seq), with dense seqs.
fn verify(server: &Server, visitor: &str, acked: &BTreeMap<String, u64>) {
    let (mut client, last) = connect(server, visitor, 0);
    let mut by_seq = BTreeMap::new();
    while (by_seq.len() as u64) < last {
        let value = client.read_message().expect("replay").json();
        if value["type"] == "message" {
            let text = value["text"].as_str().unwrap();
            let id = text.split(':').next().unwrap().to_owned();
            let seq = value["seq"].as_u64().unwrap();
            assert!(by_seq.insert(seq, id).is_none(), "seq {seq} replayed twice");
        }
    }
    assert_eq!(
        by_seq.keys().copied().collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>()
    );
    let stored: BTreeMap<String, u64> = by_seq.into_iter().map(|(s, id)| (id, s)).collect();
    assert_eq!(&stored, acked, "the store holds exactly what was acked");
}

fn data_file(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("shard-0").join("data.mdb"))
        .expect("data.mdb of shard 0")
        .len()
}

#[test]
fn a_small_map_grows_while_a_visitor_floods_and_every_message_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let storage = format!("dir = {data:?}\nmap_size = \"1MiB\"\nmax_map_size = \"64MiB\"");
    let server = Server::start_in(
        dir,
        &format!("[shards]\ncores = [0]\n\n{}", overlay(&storage)),
    );
    let (mut client, _) = connect(&server, "grower", 0);
    let mut acked = BTreeMap::new();
    for round in 0..15 {
        let ids: Vec<String> = (0..100).map(|i| format!("g{round}-{i}")).collect();
        let window = send_window(&mut client, &ids, 3000);
        assert!(window.errors.is_empty(), "refused: {:?}", window.errors);
        acked.extend(window.acked);
    }
    assert_eq!(acked.len(), 1500);
    let logs = server.logs();
    for line in logs.lines().filter(|line| line.contains("grew the map")) {
        eprintln!("{line}");
    }
    let grown = logs.matches("LMDB map full: grew the map").count();
    assert!(
        grown >= 2,
        "the map grew (1MiB -> 2 -> 4 -> ...); logs:\n{logs}"
    );
    assert!(data_file(&data) > 4 << 20, "1500 x 3 KB did not fit 1 MiB");
    verify(&server, "grower", &acked);
}

#[test]
fn a_map_at_its_ceiling_refuses_with_storage_full_keeps_serving_reads_and_a_higher_ceiling_recovers(
) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let storage = |ceiling: &str| {
        format!("dir = {data:?}\nmap_size = \"1MiB\"\nmax_map_size = \"{ceiling}\"")
    };
    let server = Server::start_in(
        dir,
        &format!("[shards]\ncores = [0]\n\n{}", overlay(&storage("1MiB"))),
    );
    let (mut client, _) = connect(&server, "ceiling", 0);
    let mut acked = BTreeMap::new();
    let mut refused = Vec::new();
    for round in 0..100 {
        let ids: Vec<String> = (0..20).map(|i| format!("c{round}-{i}")).collect();
        let window = send_window(&mut client, &ids, 3000);
        refused.extend(
            ids.iter()
                .filter(|id| !window.acked.contains_key(*id))
                .cloned(),
        );
        acked.extend(window.acked);
        if !window.errors.is_empty() {
            assert!(
                window.errors.iter().all(|code| code == "storage_full"),
                "{:?}",
                window.errors
            );
            break;
        }
    }
    assert!(!refused.is_empty(), "1 MiB never filled up");
    assert!(acked.len() > 100);
    // Refused at once while full, not hanging: the session stays usable and is told again.
    // (A single message may still fit the last free pages of the map; then it is acked.)
    let mut told_again = false;
    for _ in 0..50 {
        let again = send_window(&mut client, &refused[..1], 3000);
        if let Some(code) = again.errors.first() {
            assert_eq!(code, "storage_full");
            told_again = true;
            break;
        }
        refused.remove(0);
        acked.extend(again.acked);
    }
    assert!(told_again, "a full map kept accepting messages");
    assert!(server.has_logged("storage full: refusing writes"));
    // Reads go on: the resume replay holds everything acked.
    verify(&server, "ceiling", &acked);
    drop(client);

    // A restart with a higher ceiling accepts the refused messages.
    let dir = server.crash();
    let server = Server::start_in(
        dir,
        &format!("[shards]\ncores = [0]\n\n{}", overlay(&storage("16MiB"))),
    );
    let (mut client, _) = connect(&server, "ceiling", acked.len() as u64);
    let window = send_window(&mut client, &refused, 3000);
    assert!(window.errors.is_empty(), "{:?}", window.errors);
    acked.extend(window.acked);
    verify(&server, "ceiling", &acked);
}

/// A small tmpfs mounted for one test, unmounted on drop. Needs root (CAP_SYS_ADMIN), as
/// CI has; without it the test fails and says why rather than passing untested.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(out) if out.status.success() => SmallFs { dir },
            Ok(out) => panic!(
                "this test needs a small file system and cannot run: `mount -t tmpfs` was \
                 refused ({}; it needs root or CAP_SYS_ADMIN): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(error) => panic!("this test needs `mount` to make a small tmpfs: {error}"),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the file system with a file until a write fails.
    fn fill(&self, name: &str) -> PathBuf {
        use std::io::Write;
        let path = self.path().join(name);
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0xa5u8; 64 << 10];
        while file.write_all(&chunk).is_ok() {}
        while file.write_all(&chunk[..4096]).is_ok() {}
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn a_full_disk_refuses_with_storage_full_and_recovers_when_space_returns() {
    let fs = SmallFs::mount("8m");
    let data = fs.path().join("data");
    let storage = format!(
        "dir = {data:?}\nmap_size = \"64MiB\"\nmax_map_size = \"64MiB\"\nlog_bytes = \"1MiB\""
    );
    let server = Server::start(&format!("[shards]\ncores = [0]\n\n{}", overlay(&storage)));
    let (mut client, _) = connect(&server, "disk", 0);
    let mut acked = BTreeMap::new();
    let ids: Vec<String> = (0..50).map(|i| format!("d-{i}")).collect();
    let window = send_window(&mut client, &ids, 3000);
    assert!(window.errors.is_empty(), "{:?}", window.errors);
    acked.extend(window.acked);

    let filler = fs.fill("filler");
    // LMDB may still reuse pages it freed; once those are gone, messages are refused.
    let mut refused = Vec::new();
    for round in 0..200 {
        let ids: Vec<String> = (0..10).map(|i| format!("f{round}-{i}")).collect();
        let window = send_window(&mut client, &ids, 3000);
        refused.extend(
            ids.iter()
                .filter(|id| !window.acked.contains_key(*id))
                .cloned(),
        );
        acked.extend(window.acked);
        if !window.errors.is_empty() {
            assert!(
                window.errors.iter().all(|code| code == "storage_full"),
                "{:?}",
                window.errors
            );
            break;
        }
    }
    assert!(!refused.is_empty(), "the disk never filled up");
    assert!(
        server.has_logged("storage full: refusing writes"),
        "{}",
        server.logs()
    );
    // Reads go on while the disk is full.
    verify(&server, "disk", &acked);

    std::fs::remove_file(filler).unwrap();
    // Re-send the refused messages with their ids until accepted: the committer retries
    // within 2 s of a write.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !refused.is_empty() {
        assert!(
            Instant::now() < deadline,
            "still refused 20 s after space returned"
        );
        let window = send_window(&mut client, &refused, 3000);
        refused.retain(|id| !window.acked.contains_key(id));
        acked.extend(window.acked);
        if !refused.is_empty() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert!(server.has_logged("storage writable again"));
    let ids: Vec<String> = (0..50).map(|i| format!("after-{i}")).collect();
    let window = send_window(&mut client, &ids, 3000);
    assert!(window.errors.is_empty(), "{:?}", window.errors);
    acked.extend(window.acked);
    verify(&server, "disk", &acked);
}
