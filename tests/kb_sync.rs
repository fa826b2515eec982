//! Knowledge-base delta sync on the real binary over loopback: a primary `serve` with TLS
//! (a `tls self-signed` certificate) and an admin, a replica node's `serve` with its own LMDB
//! replicas, `switchboard kb sync` between them. The replica's bot answers from an entry added
//! on the primary while its visitor keeps chatting; a corrupted, truncated or mismatched delta
//! (made by a TLS man in the middle that edits the real primary's real answers) and a wrong or
//! missing token change nothing and the old knowledge base keeps serving.
//! Needs the model at `models/cache`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value};

const PASSWORD: &str = "a good long password";
const AGE_LIMIT: &str = "You must be 18 or older to open an account with us.";
const CARD_ARRIVAL: &str = "Cards arrive within 3 working days.";
const AGE_QUESTION: &str = "how old do I have to be to get an account?";
const CARD_QUESTION: &str = "my card has not arrived yet, how long does it take?";

const CONFIG: &str = r#"
[inference]
enabled = true

[bot]
confidence_threshold = 0.45
margin_threshold = 0.0

[risk_control]
flood_messages = 10000
flood_window = "100ms"
"#;

/// The replica's starting knowledge base; the primary's later one adds `age_limit`.
fn kb_before() -> String {
    banking77_kb(&[
        ("card_arrival", CARD_ARRIVAL),
        (
            "lost_or_stolen_card",
            "Freeze your card in the app right away.",
        ),
        (
            "exchange_rate",
            "We use the interbank rate plus a small margin.",
        ),
        ("pin_blocked", "Unblock your PIN at any of our ATMs."),
    ])
}

fn kb_after() -> String {
    let mut csv = kb_before();
    let added = banking77_kb(&[("age_limit", AGE_LIMIT)]);
    csv.push_str(added.split_once('\n').unwrap().1);
    csv
}

fn import(config: &Path, csv: &str) {
    let path = config.with_file_name(format!("kb-{}.csv", csv.len()));
    std::fs::write(&path, csv).unwrap();
    kb_import(config, &path);
}

/// A primary with TLS, an admin `root` and `kb_after()`; returns it, its TLS address, the
/// certificate to trust and a file holding the admin's token.
struct Primary {
    server: Server,
    tls: SocketAddr,
    cert: PathBuf,
    key: PathBuf,
    token_file: PathBuf,
}

/// A primary's directory before it serves: a TLS certificate, its overlay (written as its
/// config) and `kb_after()` imported. Returns the directory, certificate, key, overlay and
/// config path.
fn primary_dir() -> (tempfile::TempDir, PathBuf, PathBuf, String, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "primary", "localhost");
    let overlay = format!(
        "{CONFIG}\n[tls]\nlisten = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    let config = write_config(dir.path(), &overlay);
    import(&config, &kb_after());
    (dir, cert, key, overlay, config)
}

fn primary() -> Primary {
    let (dir, cert, key, overlay, config) = primary_dir();
    let server = Server::start_in(dir, &overlay);
    agent_add(&config, "root", "admin", PASSWORD);
    agent_add(&config, "al", "agent", PASSWORD);
    let token_file = server.dir.path().join("root.token");
    std::fs::write(&token_file, login(server.addr, "root")).unwrap();
    let tls = tls_addr(&server);
    Primary {
        server,
        tls,
        cert,
        key,
        token_file,
    }
}

impl Primary {
    /// `switchboard kb sync` of `replica` from this primary, with the admin's token.
    fn sync(&self, replica: &Server) -> Output {
        sync(replica, self.tls.port(), &self.token_file, &self.cert)
    }
}

/// A replica node's `serve` holding `kb_before()`.
fn replica() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), CONFIG);
    import(&config, &kb_before());
    Server::start_in(dir, CONFIG)
}

fn config_of(server: &Server) -> PathBuf {
    server.dir.path().join("test.toml")
}

fn login(addr: SocketAddr, name: &str) -> String {
    let body = json!({"name": name, "password": PASSWORD}).to_string();
    let request = format!(
        "POST /api/login HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, reply) = http_raw(addr, request.as_bytes());
    assert_eq!(status, 200, "{reply}");
    let reply: Value = serde_json::from_str(&reply).unwrap();
    reply["token"].as_str().unwrap().to_owned()
}

/// `switchboard kb sync` for the replica node.
fn sync(replica: &Server, port: u16, token_file: &Path, ca_file: &Path) -> Output {
    sync_config(&config_of(replica), port, token_file, ca_file)
}

fn sync_config(config: &Path, port: u16, token_file: &Path, ca_file: &Path) -> Output {
    Command::new(BIN)
        .args(["kb", "sync", "--config"])
        .arg(config)
        .arg("--from")
        .arg(format!("https://localhost:{port}"))
        .arg("--token-file")
        .arg(token_file)
        .arg("--ca-file")
        .arg(ca_file)
        .output()
        .expect("run switchboard kb sync")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The first line of `kb list`: "version N: ...".
fn version_line(config: &Path) -> String {
    let out = Command::new(BIN)
        .args(["kb", "list", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).lines().next().unwrap().to_owned()
}

fn export(config: &Path) -> String {
    let out = Command::new(BIN)
        .args(["kb", "export", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

fn visitor(server: &Server, id: &str) -> RawClient {
    let mut tab = RawClient::connect(server.addr, &visitor_path(server, "bank", id, None)).unwrap();
    tab.set_read_timeout(Duration::from_secs(20));
    let hello = tab.read_json();
    assert_eq!(hello["type"], "hello");
    remember_visitor(server, &hello);
    tab
}

/// The bot's answer to `text` (or the `queued`/`error` frame that came instead). A message
/// refused as `overloaded` (the machine is busy: a sync, other tests) or `rate_limited` is sent
/// again after the `retry_after` the server asks for, as a client does.
fn ask(tab: &mut RawClient, id: &str, text: &str) -> Value {
    for _ in 0..50 {
        tab.send_json(&json!({"type": "message", "id": id, "text": text}));
        let value = loop {
            let frame = tab
                .read_message()
                .unwrap_or_else(|| panic!("no answer to {text:?} ({id})"));
            let value = frame.json();
            if (value["type"] == "message" && value["from"] == "bot")
                || value["type"] == "queued"
                || value["type"] == "error"
            {
                break value;
            }
        };
        if !matches!(value["code"].as_str(), Some("overloaded" | "rate_limited")) {
            return value;
        }
        let wait = value["retry_after"].as_u64().unwrap_or(100);
        std::thread::sleep(Duration::from_millis(wait));
    }
    panic!("{text:?} ({id}) refused as overloaded 50 times");
}

/// Waits (at most 20 s) until a new visitor of `replica` gets the answer of the entry only
/// `kb_after()` has: a running server swaps a synced version in within about two seconds.
fn await_new_entry(replica: &Server) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in 0.. {
        let mut fresh = visitor(replica, &format!("after-{n}"));
        let answer = ask(&mut fresh, "q", AGE_QUESTION);
        if answer["text"] == AGE_LIMIT {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never answered from the new entry: {answer}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A number in `out` just before `suffix` (e.g. "1234-byte delta").
fn number_before(out: &str, suffix: &str) -> u64 {
    let before = out.split(suffix).next().unwrap();
    let digits: String = before
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number before {suffix:?} in {out}"))
}

#[test]
fn a_replica_syncs_an_added_entry_and_answers_from_it_while_chatting() {
    let primary = primary();
    let replica = replica();
    let config = config_of(&replica);
    let mut tab = visitor(&replica, "chatting");
    assert_eq!(ask(&mut tab, "q1", CARD_QUESTION)["text"], CARD_ARRIVAL);
    let mut before_sync = visitor(&replica, "before-sync");
    assert_ne!(ask(&mut before_sync, "q", AGE_QUESTION)["text"], AGE_LIMIT);
    let before = version_line(&config);

    // The sync runs while the visitor goes on chatting; every answer stays right.
    let (port, token, cert) = (
        primary.tls.port(),
        primary.token_file.clone(),
        primary.cert.clone(),
    );
    let config_path = config.clone();
    let syncing = std::thread::spawn(move || sync_config(&config_path, port, &token, &cert));
    let mut during = 0;
    while !syncing.is_finished() {
        during += 1;
        let answer = ask(&mut tab, &format!("during-{during}"), CARD_QUESTION);
        assert_eq!(answer["text"], CARD_ARRIVAL, "{answer}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = syncing.join().unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("synced https://localhost:"), "{stdout}");
    // Only part of the snapshot crossed: the old questions' rows were copied, not sent.
    let snapshot = number_before(&stdout, "-byte snapshot");
    let delta = number_before(&stdout, "-byte delta");
    let received = number_before(&stdout, " bytes in ");
    assert!(
        delta < snapshot / 2 && received < snapshot,
        "delta {delta}, received {received}, snapshot {snapshot}: {stdout}"
    );
    assert_ne!(version_line(&config), before);
    assert_eq!(export(&config), export(&config_of(&primary.server)));

    // The running server picks the new version up (each shard polls its replica's version
    // once a second): a new visitor, then the one who kept chatting, get the new entry's answer.
    await_new_entry(&replica);
    // The chatting visitor's conversation may live on another shard, which reloads on its
    // first question once a second has passed since its last poll.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(ask(&mut tab, "after", AGE_QUESTION)["text"], AGE_LIMIT);
    assert_eq!(ask(&mut tab, "still", CARD_QUESTION)["text"], CARD_ARRIVAL);

    // Nothing changed since: only the hashes cross.
    let out = primary.sync(&replica);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("already up to date"), "{stdout}");
    assert!(number_before(&stdout, " bytes in ") < 16 * 1024, "{stdout}");
}

#[test]
fn a_sync_only_primary_serves_the_sync_and_nothing_else() {
    // The knowledge base imported, an admin added, then `kb serve-sync` on that directory.
    let (dir, cert, _key, overlay, config) = primary_dir();
    agent_add(&config, "root", "admin", PASSWORD);
    let primary = Server::start_subcommand(Command::new(BIN), &["kb", "serve-sync"], dir, &overlay);
    let logs = primary.logs();
    assert!(
        !logs.contains("primary model ready"),
        "no model on a sync node:\n{logs}"
    );
    let token_file = primary.dir.path().join("root.token");
    std::fs::write(&token_file, login(primary.addr, "root")).unwrap();
    let tls = tls_addr(&primary);

    // Chats, consoles and the rest of the API are not served.
    for path in ["/ws/visitor?site=demo", "/api/agents", "/demo", "/admin"] {
        let (status, body) = http_get(primary.addr, path);
        assert_eq!(status, 404, "{path}: {body}");
    }

    // A replica syncs from it and answers from the added entry.
    let replica = replica();
    let out = sync(&replica, tls.port(), &token_file, &cert);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(export(&config_of(&replica)), export(&config));
    await_new_entry(&replica);

    // Without a TLS listener it refuses to start.
    let plain = tempfile::tempdir().unwrap();
    let plain_config = write_config(plain.path(), CONFIG);
    let out = Command::new(BIN)
        .args(["kb", "serve-sync", "--config"])
        .arg(&plain_config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("needs a [tls] listener"),
        "{}",
        text(&out.stderr)
    );
}

/// What the man in the middle does to one sync.
#[derive(Clone, Copy, Debug)]
enum Tamper {
    /// Flips bytes in the middle of the delta the primary answered.
    CorruptDelta,
    /// Cuts the delta to half its length.
    TruncateDelta,
    /// Flips bytes in the middle of the coarse round's plan.
    CorruptPlan,
    /// Swaps neighbouring blocks' entries in the replica's signature, so the primary's delta is
    /// computed for another base than the one the replica holds.
    MismatchedBase,
}

#[test]
fn corrupted_truncated_and_mismatched_deltas_and_bad_tokens_change_nothing() {
    let primary = primary();
    let replica = replica();
    let config = config_of(&replica);
    let before = version_line(&config);
    let exported = export(&config);

    for tamper in [
        Tamper::CorruptDelta,
        Tamper::TruncateDelta,
        Tamper::CorruptPlan,
        Tamper::MismatchedBase,
    ] {
        let proxy = TamperingProxy::start(&primary, tamper);
        let out = sync(&replica, proxy.port, &primary.token_file, &primary.cert);
        let stderr = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{tamper:?}: {}{stderr}",
            text(&out.stdout)
        );
        assert!(
            stderr.contains("the delta does not apply")
                || stderr.contains("BLAKE3 hash")
                || stderr.contains("rebuilt snapshot is"),
            "{tamper:?}: {stderr}"
        );
        proxy.finish();
        assert_eq!(version_line(&config), before, "{tamper:?}");
    }

    // A wrong token, an agent's token, a missing token file.
    let wrong = replica.dir.path().join("wrong.token");
    std::fs::write(&wrong, "not-a-token").unwrap();
    let out = sync(&replica, primary.tls.port(), &wrong, &primary.cert);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("refused GET /api/kb/sync with 401"),
        "{}",
        text(&out.stderr)
    );
    let agent = replica.dir.path().join("agent.token");
    std::fs::write(&agent, login(primary.server.addr, "al")).unwrap();
    let out = sync(&replica, primary.tls.port(), &agent, &primary.cert);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("with 403 forbidden"),
        "{}",
        text(&out.stderr)
    );
    let out = sync(
        &replica,
        primary.tls.port(),
        &replica.dir.path().join("none"),
        &primary.cert,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("cannot read the token file"),
        "{}",
        text(&out.stderr)
    );
    // A certificate the replica does not trust, and a CA file with no certificate in it.
    let (other, _) = self_signed(replica.dir.path(), "other", "localhost");
    let out = sync(&replica, primary.tls.port(), &primary.token_file, &other);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("invalid peer certificate"),
        "{}",
        text(&out.stderr)
    );
    let out = sync(
        &replica,
        primary.tls.port(),
        &primary.token_file,
        &primary.key,
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("no certificate found"),
        "{}",
        text(&out.stderr)
    );

    // The fine round straight to the API: a plan made against another file is refused with
    // 409, regions past the file or a bad signature with 400.
    let admin_token = std::fs::read_to_string(&primary.token_file).unwrap();
    let post = |body: Value| {
        let body = body.to_string();
        let request = format!(
            "POST /api/kb/sync HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            admin_token.trim(),
            body.len()
        );
        let (status, reply) = http_raw(primary.server.addr, request.as_bytes());
        (status, serde_json::from_str::<Value>(&reply).unwrap())
    };
    let engine = base64::engine::general_purpose::STANDARD;
    let fine = engine.encode(switchboard::kb::fine_signature(b"some unused base bytes"));
    let (status, reply) = post(json!({
        "hash": "0".repeat(64), "fine_signature": fine, "regions": engine.encode([0u8, 10]),
    }));
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (409, Some("kb_changed")),
        "{reply}"
    );
    let request = format!(
        "GET /api/kb/sync HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\r\n",
        admin_token.trim()
    );
    let state: Value =
        serde_json::from_str(&http_raw(primary.server.addr, request.as_bytes()).1).unwrap();
    let hash = state["hash"].as_str().unwrap();
    let past_the_end = engine.encode(switchboard::kb::encode_regions(&[(1 << 40, 10)]));
    let (status, reply) =
        post(json!({"hash": hash, "fine_signature": fine, "regions": past_the_end}));
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (400, Some("bad_signature")),
        "{reply}"
    );
    let (status, reply) = post(json!({"hash": hash, "fine_signature": "%%", "regions": ""}));
    assert_eq!(status, 400, "{reply}");
    let (status, reply) = post(json!({"signature": fine, "hash": hash}));
    assert_eq!(status, 400, "{reply}");

    // Nothing changed, and the old knowledge base keeps serving.
    assert_eq!(version_line(&config), before);
    assert_eq!(export(&config), exported);
    let mut tab = visitor(&replica, "after-refusals");
    assert_eq!(ask(&mut tab, "q", CARD_QUESTION)["text"], CARD_ARRIVAL);
    assert_ne!(ask(&mut tab, "q2", AGE_QUESTION)["text"], AGE_LIMIT);

    // The same replica then syncs for real.
    let out = primary.sync(&replica);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(export(&config), export(&config_of(&primary.server)));
}

/// A TLS server on loopback (the primary's certificate) that forwards each request to the
/// primary's TLS listener and edits the request or the answer as its [`Tamper`] says. It
/// serves the requests of one sync (the state, the plan, the regions), then stops.
struct TamperingProxy {
    port: u16,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
}

impl TamperingProxy {
    fn start(primary: &Primary, tamper: Tamper) -> TamperingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&primary.cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(&primary.key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server_config = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain.clone(), key)
                .unwrap(),
        );
        let mut roots = rustls::RootCertStore::empty();
        roots.add(chain[0].clone()).unwrap();
        let client_config = Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let upstream = primary.tls;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut served = 0;
            loop {
                let (tcp, _) = listener.accept().unwrap();
                if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    return served;
                }
                served += 1;
                tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let connection = rustls::ServerConnection::new(server_config.clone()).unwrap();
                let mut downstream = rustls::StreamOwned::new(connection, tcp);
                let request = read_request(&mut downstream);
                let request = match tamper {
                    Tamper::MismatchedBase => edit_body(&request, swap_signature_blocks),
                    _ => request,
                };
                let answer = forward(&client_config, upstream, &request);
                let answer = match tamper {
                    Tamper::CorruptDelta => edit_body(&answer, corrupt_delta),
                    Tamper::TruncateDelta => edit_body(&answer, truncate_delta),
                    Tamper::CorruptPlan => edit_body(&answer, corrupt_plan),
                    Tamper::MismatchedBase => answer,
                };
                downstream.write_all(&answer).unwrap();
                downstream.conn.send_close_notify();
                downstream.flush().unwrap();
            }
        });
        TamperingProxy { port, stop, thread }
    }

    /// Stops the proxy once the sync is over; it must have served the state and the plan.
    fn finish(self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let served = self.thread.join().expect("the proxy ran");
        assert!(served >= 2, "the proxy served {served} requests");
    }
}

/// One HTTP request (head and `Content-Length` body) from `stream`.
fn read_request(stream: &mut impl Read) -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&bytes[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .map_or(0, |value| value.trim().parse().unwrap());
            if bytes.len() >= end + 4 + length {
                return bytes;
            }
        }
        let read = stream.read(&mut chunk).unwrap();
        assert!(read > 0, "the request ended early");
        bytes.extend_from_slice(&chunk[..read]);
    }
}

/// Sends `request` to the primary over TLS and returns its whole answer.
fn forward(config: &Arc<rustls::ClientConfig>, upstream: SocketAddr, request: &[u8]) -> Vec<u8> {
    let tcp = TcpStream::connect(upstream).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let connection =
        rustls::ClientConnection::new(config.clone(), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let mut stream = rustls::StreamOwned::new(connection, tcp);
    stream.write_all(request).unwrap();
    stream.flush().unwrap();
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(err) => panic!("reading the primary's answer: {err}"),
    }
    answer
}

/// `message` (head and JSON body) with its body edited by `edit` and `Content-Length` fixed.
fn edit_body(message: &[u8], edit: fn(&mut Value)) -> Vec<u8> {
    let end = message.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&message[..end]).into_owned();
    let Ok(mut body) = serde_json::from_slice::<Value>(&message[end + 4..]) else {
        return message.to_vec();
    };
    edit(&mut body);
    let body = body.to_string();
    let head: Vec<String> = head
        .split("\r\n")
        .map(|line| {
            if line.to_lowercase().starts_with("content-length:") {
                format!("Content-Length: {}", body.len())
            } else {
                line.to_owned()
            }
        })
        .collect();
    format!("{}\r\n\r\n{body}", head.join("\r\n")).into_bytes()
}

fn edit_base64(value: &mut Value, field: &str, edit: impl FnOnce(&mut Vec<u8>)) {
    let Some(text) = value[field].as_str() else {
        return;
    };
    let engine = base64::engine::general_purpose::STANDARD;
    let mut bytes = engine.decode(text).unwrap();
    edit(&mut bytes);
    value[field] = json!(engine.encode(&bytes));
}

fn corrupt_delta(answer: &mut Value) {
    edit_base64(answer, "delta", |delta| {
        let middle = delta.len() / 2;
        for byte in &mut delta[middle..middle + 8] {
            *byte ^= 0x5a;
        }
    });
}

fn corrupt_plan(answer: &mut Value) {
    edit_base64(answer, "plan", |plan| {
        let (middle, end) = (plan.len() / 2, (plan.len() / 2 + 4).min(plan.len()));
        for byte in &mut plan[middle..end] {
            *byte ^= 0x5a;
        }
    });
}

fn truncate_delta(answer: &mut Value) {
    edit_base64(answer, "delta", |delta| delta.truncate(delta.len() / 2));
}

/// Swaps each even block's (weak checksum, strong hash) with the next block's.
fn swap_signature_blocks(request: &mut Value) {
    edit_base64(request, "signature", |signature| {
        let strong = u32::from_be_bytes(signature[8..12].try_into().unwrap()) as usize;
        let record = 4 + strong;
        let blocks = &mut signature[12..];
        let pairs = blocks.len() / (2 * record);
        assert!(pairs > 4, "a signature of {} blocks", blocks.len() / record);
        for pair in 0..pairs {
            let at = pair * 2 * record;
            let (first, second) = blocks[at..at + 2 * record].split_at_mut(record);
            first.swap_with_slice(second);
        }
    });
}
