//! Test support: start the real `switchboard` binary on loopback and talk to it
//! over real sockets.
//!
//! `Server` runs the binary with a generated tuning overlay in a temporary
//! directory (its storage lives there too) on `127.0.0.1:0`, and learns the
//! port from the "listening on" log line. `RawClient` speaks WebSocket frame by
//! frame, so tests can send what a well-behaved client library never would.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_switchboard");

/// A running switchboard process, killed on drop.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts the binary with `overlay` appended to a base overlay that enables
    /// the echo endpoint and keeps storage in a temporary directory.
    pub fn start(overlay: &str) -> Server {
        let dir = tempfile::tempdir().expect("temporary directory");
        Self::start_in(dir, overlay)
    }

    /// Like [`Server::start`] but reuses a directory (a restart on the same data).
    pub fn start_in(dir: tempfile::TempDir, overlay: &str) -> Server {
        Self::start_program(Command::new(BIN), dir, overlay)
    }

    /// Like [`Server::start_in`] with another program that runs the switchboard command line
    /// (a sample built on `switchboard::cli`), given as a `Command` so a test can set its
    /// environment.
    pub fn start_program(program: Command, dir: tempfile::TempDir, overlay: &str) -> Server {
        let server = Self::start_listening(program, dir, overlay);
        server.wait_for_models();
        server
    }

    /// Waits (at most a minute) until every shard's primary model is loaded: the models load
    /// in the background after the server listens, and tests that check the model's answers
    /// need it (a server without a model returns at once; a companion may still be loading).
    pub fn wait_for_models(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let logs = self.logs();
            let engines = logs.matches("intent engine ready").count();
            let primaries = logs.matches("primary model ready").count();
            if primaries >= engines || logs.contains("cannot load the model") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the models did not load within a minute; logs:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most 20 s) until every shard has started: the server logs that it listens
    /// (its sockets are bound) before the shards run, so a test that changes a file a shard
    /// reads at start must wait for them first.
    pub fn wait_for_shards(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let logs = self.logs();
            let shards: usize = logs
                .split("listening on ")
                .nth(1)
                .and_then(|rest| rest.split("shards=").nth(1))
                .and_then(|rest| {
                    rest.split(|c: char| !c.is_ascii_digit())
                        .next()?
                        .parse()
                        .ok()
                })
                .expect("the listening line names the shard count");
            if logs.matches("shard started").count() >= shards {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not every shard started within 20 s; logs:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Like [`Server::start_program`] but returns as soon as the server listens, while its
    /// models may still be loading.
    pub fn start_listening(program: Command, dir: tempfile::TempDir, overlay: &str) -> Server {
        Self::start_subcommand(program, &["serve"], dir, overlay)
    }

    /// Like [`Server::start_listening`] with another serving subcommand (e.g. `kb serve-sync`).
    pub fn start_subcommand(
        mut program: Command,
        subcommand: &[&str],
        dir: tempfile::TempDir,
        overlay: &str,
    ) -> Server {
        let config_path = write_config(dir.path(), overlay);
        let mut child = program
            .args(subcommand)
            .arg("--config")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start switchboard");
        let stderr = child.stderr.take().expect("stderr is piped");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut addr_tx = Some(addr_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let addr = line.split("listening on ").nth(1).map(|rest| {
                    rest.chars()
                        .take_while(|c| !c.is_whitespace() && *c != '"')
                        .collect::<String>()
                });
                // The line is in the logs before the test learns the address, so a test that
                // reads the listening line (shard count, cores) right after start finds it.
                sink.lock().unwrap().push(line);
                if let Some(addr) = addr.and_then(|addr| addr.parse::<SocketAddr>().ok()) {
                    if let Some(tx) = addr_tx.take() {
                        let _ = tx.send(addr);
                    }
                }
            }
        });
        let addr = match addr_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "switchboard did not report its address; logs:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        Server {
            child,
            addr,
            dir,
            logs,
        }
    }

    /// The address of the `[metrics] listen` endpoint (the base overlay sets one; an overlay
    /// with its own `[metrics]` section may not): waits (at most 10 s) for its log line.
    pub fn metrics_addr(&self) -> SocketAddr {
        const MARK: &str = "metrics endpoint on http://";
        assert!(
            self.has_logged(MARK),
            "no metrics endpoint logged:\n{}",
            self.logs()
        );
        let logs = self.logs();
        let rest = logs.split(MARK).nth(1).expect("the line was logged");
        rest.split('/')
            .next()
            .and_then(|addr| addr.parse().ok())
            .expect("an address after the mark")
    }

    /// `GET /metrics` on the metrics listener; panics unless it answers 200.
    pub fn scrape(&self) -> String {
        let (status, body) = http_get(self.metrics_addr(), "/metrics");
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The value of `switchboard_NAME` summed over shards (its `shard="all"` series) or, for a
    /// process-wide value, its one series without labels; 0 when absent.
    pub fn metric(&self, name: &str) -> u64 {
        let summed = format!("switchboard_{name}{{shard=\"all\"}} ");
        let single = format!("switchboard_{name} ");
        self.scrape()
            .lines()
            .find_map(|line| {
                line.strip_prefix(&summed)
                    .or_else(|| line.strip_prefix(&single))
            })
            .map_or(0, |value| value.trim().parse().expect("an integer value"))
    }

    /// Shard `shard`'s series of the per-shard family `switchboard_NAME`; panics when absent.
    pub fn shard_metric(&self, name: &str, shard: usize) -> u64 {
        let prefix = format!("switchboard_{name}{{shard=\"{shard}\"}} ");
        self.scrape()
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .map(|value| value.trim().parse().expect("an integer value"))
            .unwrap_or_else(|| panic!("no {prefix}in the scrape"))
    }

    /// Everything the server logged so far.
    /// Waits (at most 10 s) until the logs hold `needle`. The logs reach the test through a
    /// reader thread, so a line the server wrote just before the frame a test received may not
    /// be in [`Server::logs`] yet.
    pub fn has_logged(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.logs().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Sends SIGTERM and waits (at most `limit`) for the process to exit.
    pub fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        // SAFETY: kill(2) with a pid we own.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait(limit)
    }

    /// Kills the process with SIGKILL (a crash), reaps it, and hands back its
    /// directory (configuration and data) for a restart.
    pub fn crash(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let placeholder = tempfile::tempdir().expect("temporary directory");
        std::mem::replace(&mut self.dir, placeholder)
    }

    /// Waits for the process to exit, up to `limit`.
    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Writes `dir/test.toml`: `overlay` plus base sections (listen on a free
/// loopback port, echo on, no model, storage in `dir/data`, text logs), each base
/// section left out when the overlay brings its own. Returns its path.
pub fn write_config(dir: &std::path::Path, overlay: &str) -> std::path::PathBuf {
    let config_path = dir.join("test.toml");
    let storage = dir.join("data");
    let base = [
        (
            "[server]",
            "listen = \"127.0.0.1:0\"\nshutdown_grace = \"3s\"".to_string(),
        ),
        ("[diagnostics]", "echo = true".to_string()),
        // Tests that exercise the bot load the model by naming [inference].
        ("[inference]", "enabled = false".to_string()),
        ("[storage]", format!("dir = {storage:?}")),
        ("[log]", "format = \"text\"\nlevel = \"info\"".to_string()),
        // Metrics on their own listener (no token); see `Server::scrape`.
        ("[metrics]", "listen = \"127.0.0.1:0\"".to_string()),
    ];
    let mut text = String::new();
    for (section, body) in base {
        if !overlay.contains(section) {
            text.push_str(&format!("{section}\n{body}\n\n"));
        }
    }
    // An overlay with its own [storage] section still stores under the test's directory (not in
    // ./data of the checkout, where `scripts/install-and-run` would find it) unless it names a dir.
    let overlay = if overlay.contains("[storage]\n") {
        with_default(overlay, "[storage]", "dir", &format!("dir = {storage:?}"))
    } else {
        overlay.to_string()
    };
    // No message-level shedding unless the overlay asks for it (tests/admission.rs does): on a
    // starved CI machine (debug builds, four tests at once on two cores) an event-loop lag over
    // the default 50 ms budget refuses a message with `overloaded`, which is the product
    // working, not what those tests check.
    let overlay = with_default(
        &overlay,
        "[limits]",
        "admit_latency_budget",
        "admit_latency_budget = \"0s\"",
    );
    text.push_str(&overlay);
    text.push('\n');
    std::fs::write(&config_path, text).expect("write test config");
    config_path
}

/// `overlay` with `line` (setting `key`) in its `section`: added at the section's top when the
/// section does not set `key`, or as a new section at the end when the overlay has none.
fn with_default(overlay: &str, section: &str, key: &str, line: &str) -> String {
    let header = format!("{section}\n");
    match overlay.split_once(header.as_str()) {
        Some((before, body)) => {
            let sets_key = body.split("\n[").next().unwrap_or("").lines().any(|l| {
                l.trim_start()
                    .strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            });
            if sets_key {
                overlay.to_string()
            } else {
                format!("{before}{header}{line}\n{body}")
            }
        }
        None => format!("{overlay}\n{header}{line}\n"),
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Four BANKING77 intents with answers, for [`banking77_kb`].
pub const BANKING77_ANSWERS: [(&str, &str); 4] = [
    ("card_arrival", "Cards arrive within 3 working days."),
    (
        "lost_or_stolen_card",
        "Freeze your card in the app right away.",
    ),
    (
        "exchange_rate",
        "We use the interbank rate plus a small margin.",
    ),
    ("age_limit", "You must be 18 or older to open an account."),
];

/// A knowledge-base CSV (`text,category,answer`): the first twelve questions of each intent in
/// the committed BANKING77 split, with the given answers.
pub fn banking77_kb(intents: &[(&str, &str)]) -> String {
    let source = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/banking77/kb.csv"
    ))
    .expect("the committed BANKING77 split");
    let mut csv = String::from("text,category,answer\n");
    for (intent, answer) in intents {
        let questions: Vec<&str> = source
            .lines()
            .skip(1)
            .filter_map(|line| line.rsplit_once(','))
            .filter(|(_, category)| category == intent)
            .map(|(text, _)| text)
            .take(12)
            .collect();
        assert_eq!(questions.len(), 12, "{intent} in the split");
        for text in questions {
            let text = text.trim_matches('"').replace("\"\"", "\"");
            csv.push_str(&format!(
                "\"{}\",{intent},\"{answer}\"\n",
                text.replace('"', "\"\"")
            ));
        }
    }
    csv
}

/// `switchboard agent add NAME --role ROLE` on a server's config, the password on stdin.
pub fn agent_add(config: &std::path::Path, name: &str, role: &str, password: &str) {
    let mut child = Command::new(BIN)
        .args(["agent", "add", name, "--role", role, "--config"])
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run switchboard agent add");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "agent add {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `switchboard kb import --config CONFIG FILE`, as an operator would; panics with
/// its stderr if the import fails.
pub fn kb_import(config: &std::path::Path, file: &std::path::Path) {
    let output = Command::new(BIN)
        .args(["kb", "import", "--config"])
        .arg(config)
        .arg(file)
        .output()
        .expect("run switchboard kb import");
    assert!(
        output.status.success(),
        "kb import failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Writes a self-signed pair for `host` with the binary and returns (cert, key).
pub fn self_signed(dir: &Path, name: &str, host: &str) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    let out = Command::new(BIN)
        .args(["tls", "self-signed", "--host", host, "--cert"])
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .output()
        .expect("run switchboard tls self-signed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// The TLS listener's address, from the "TLS listening on" log line.
pub fn tls_addr(server: &Server) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = server.logs();
        if let Some(rest) = logs.split("TLS listening on ").nth(1) {
            let addr: String = rest
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '"')
                .collect();
            return addr.parse().expect("TLS address");
        }
        assert!(Instant::now() < deadline, "no TLS listener logged:\n{logs}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends raw bytes as an HTTP request and returns the status and the body.
pub fn http_raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request).expect("send request");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    parse_status(&response)
}

/// `GET path` over HTTP/1.1.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes(),
    )
}

fn parse_status(response: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

/// An HTTP response: status, headers (names lower-case) and body.
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request with an optional bearer token and an optional `(content type, body)`
/// (sent with `Content-Length`); waits up to five minutes for the whole answer (an import).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<(&str, &[u8])>,
) -> HttpReply {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
    if let Some(token) = bearer {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if let Some((content_type, body)) = body {
        head.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.map_or(&[][..], |(_, body)| body));
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    stream.write_all(&bytes).expect("send request");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    HttpReply {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// A WebSocket frame as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.payload).expect("text frame is UTF-8")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).expect("frame is JSON")
    }

    /// The close code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

pub const TEXT: u8 = 1;
pub const BINARY: u8 = 2;
pub const CLOSE: u8 = 8;
pub const PING: u8 = 9;
pub const PONG: u8 = 10;

/// A frame-level WebSocket client over a blocking socket.
pub struct RawClient {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl RawClient {
    /// Connects and upgrades; on a non-101 answer returns the status and body.
    pub fn connect(addr: SocketAddr, path: &str) -> Result<RawClient, (u16, String)> {
        Self::connect_with_headers(addr, path, "")
    }

    /// Like [`RawClient::connect`] with extra request header lines (each ending in `\r\n`).
    pub fn connect_with_headers(
        addr: SocketAddr,
        path: &str,
        headers: &str,
    ) -> Result<RawClient, (u16, String)> {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
        );
        stream.write_all(request.as_bytes()).expect("send upgrade");
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let read = stream.read(&mut chunk).unwrap_or(0);
            if read == 0 {
                return Err(parse_status(&buffer));
            }
            buffer.extend_from_slice(&chunk[..read]);
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        if !head.starts_with("HTTP/1.1 101") {
            // Read the rest of the body.
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest);
            buffer.extend_from_slice(&rest);
            return Err(parse_status(&buffer));
        }
        assert!(
            head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "accept key per RFC 6455: {head}"
        );
        buffer.drain(..head_end);
        Ok(RawClient { stream, buffer })
    }

    /// Sends one frame; `masked` should be true for a conforming client.
    pub fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8], masked: bool) {
        let mut frame = vec![(u8::from(fin) << 7) | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            len @ 0..=125 => frame.push(mask_bit | len as u8),
            len @ 126..=65535 => {
                frame.push(mask_bit | 126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                frame.push(mask_bit | 127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        if masked {
            let key = [0x37, 0xfa, 0x21, 0x3d];
            frame.extend_from_slice(&key);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            frame.extend_from_slice(payload);
        }
        self.send_bytes(&frame);
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    pub fn send_text(&mut self, text: &str) {
        self.send_frame(true, TEXT, text.as_bytes(), true);
    }

    pub fn send_json(&mut self, value: &serde_json::Value) {
        self.send_text(&value.to_string());
    }

    pub fn send_close(&mut self, code: u16, reason: &str) {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason.as_bytes());
        self.send_frame(true, CLOSE, &payload, true);
    }

    /// Reads the next frame; `None` when the server closed the TCP connection
    /// or nothing came within the read timeout.
    pub fn read_frame(&mut self) -> Option<Frame> {
        let mut chunk = [0u8; 65536];
        loop {
            if let Some((frame, used)) = parse_frame(&self.buffer) {
                self.buffer.drain(..used);
                return Some(frame);
            }
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(read) => self.buffer.extend_from_slice(&chunk[..read]),
            }
        }
    }

    /// Reads the next data or close frame, answering pings along the way.
    pub fn read_message(&mut self) -> Option<Frame> {
        loop {
            let frame = self.read_frame()?;
            match frame.opcode {
                PING => self.send_frame(true, PONG, &frame.payload.clone(), true),
                PONG => {}
                _ => return Some(frame),
            }
        }
    }

    /// Reads JSON text messages until one satisfies `want` and returns it; panics (naming
    /// `what`) when the connection ends or the read times out first.
    pub fn read_until(
        &mut self,
        what: &str,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        loop {
            let frame = self.read_message().unwrap_or_else(|| panic!("no {what}"));
            assert_eq!(
                frame.opcode, TEXT,
                "expected text while waiting for {what}: {frame:?}"
            );
            let value = frame.json();
            if want(&value) {
                return value;
            }
        }
    }

    /// Reads the next JSON text message.
    pub fn read_json(&mut self) -> serde_json::Value {
        let frame = self.read_message().expect("a message");
        assert_eq!(frame.opcode, TEXT, "expected a text frame, got {frame:?}");
        frame.json()
    }

    /// Reads until a close frame and returns its code.
    pub fn expect_close(&mut self) -> u16 {
        loop {
            match self.read_frame() {
                Some(frame) if frame.opcode == CLOSE => {
                    return frame.close_code().unwrap_or(1005);
                }
                Some(_) => continue,
                None => panic!("connection ended without a close frame"),
            }
        }
    }

    /// Whether the server closed the TCP connection (EOF) within the timeout.
    pub fn is_closed_by_server(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    /// Whether the connection still looks open (no EOF or reset seen).
    pub fn is_alive(&mut self) -> bool {
        let mut probe = [0u8; 1];
        self.stream.set_nonblocking(true).ok();
        let alive = match self.stream.peek(&mut probe) {
            Ok(0) => false,
            Ok(_) => true,
            Err(err) => err.kind() == std::io::ErrorKind::WouldBlock,
        };
        self.stream.set_nonblocking(false).ok();
        alive
    }

    pub fn set_read_timeout(&mut self, timeout: Duration) {
        self.stream.set_read_timeout(Some(timeout)).unwrap();
    }
}

fn parse_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = buf[0] & 0x0f;
    assert_eq!(buf[1] & 0x80, 0, "server frames are never masked");
    let (len, mut at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return None,
        len => (len as usize, 2),
    };
    if buf.len() < at + len {
        return None;
    }
    let payload = buf[at..at + len].to_vec();
    at += len;
    Some((
        Frame {
            fin,
            opcode,
            payload,
        },
        at,
    ))
}

/// Visitor secrets the server issued, by storage directory, site and visitor id.
/// Reconnecting to a visitor id needs its secret (docs/protocol.md, "Visitor identity").
/// (storage directory, site, visitor id).
type VisitorSlot = (std::path::PathBuf, String, String);

static VISITOR_SECRETS: Mutex<Vec<(VisitorSlot, String)>> = Mutex::new(Vec::new());

/// `/ws/visitor?site=S&visitor=V[&secret=X][&resume=N]`, with the secret the server
/// issued to `visitor` if a hello carried one (see [`remember_visitor`]).
pub fn visitor_path(server: &Server, site: &str, visitor: &str, resume: Option<u64>) -> String {
    let mut path = format!("/ws/visitor?site={site}&visitor={visitor}");
    let key = (
        server.dir.path().to_owned(),
        site.to_owned(),
        visitor.to_owned(),
    );
    if let Some((_, secret)) = VISITOR_SECRETS
        .lock()
        .unwrap()
        .iter()
        .find(|(k, _)| *k == key)
    {
        path.push_str(&format!("&secret={secret}"));
    }
    if let Some(seq) = resume {
        path.push_str(&format!("&resume={seq}"));
    }
    path
}

/// Keeps the secret of a visitor `hello` that carries one, as a client keeps it in
/// `localStorage`.
pub fn remember_visitor(server: &Server, hello: &serde_json::Value) {
    let (Some(site), Some(visitor), Some(secret)) = (
        hello["site"].as_str(),
        hello["visitor"].as_str(),
        hello["secret"].as_str(),
    ) else {
        return;
    };
    let key = (
        server.dir.path().to_owned(),
        site.to_owned(),
        visitor.to_owned(),
    );
    let mut secrets = VISITOR_SECRETS.lock().unwrap();
    secrets.retain(|(k, _)| *k != key);
    secrets.push((key, secret.to_owned()));
}

impl RawClient {
    /// A second handle on the socket (e.g. a writer thread flooding while the test reads).
    pub fn stream_clone(&self) -> TcpStream {
        self.stream.try_clone().expect("clone the socket")
    }
}

/// Resident set size of process `pid` in KiB (`VmRSS` in /proc/PID/status).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0)
}

/// One masked client text frame (what a conforming client sends).
pub fn masked_text_frame(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() <= 125, "short frames only");
    let key = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&key);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    frame
}

/// Reads a conversation replayed from seq 0 on `client` (connected with `resume=0`): the seq
/// its `hello` announces and every message text by seq, until all of them arrived (or the
/// connection ends). A seq replayed twice fails the test.
pub fn read_replay(client: &mut RawClient) -> (u64, std::collections::BTreeMap<u64, String>) {
    let mut by_seq = std::collections::BTreeMap::new();
    let mut hello_seq = None;
    while let Some(frame) = client.read_message() {
        let value = frame.json();
        match value["type"].as_str() {
            Some("hello") => hello_seq = value["seq"].as_u64(),
            Some("message") => {
                let seq = value["seq"].as_u64().unwrap();
                let text = value["text"].as_str().unwrap().to_string();
                assert!(
                    by_seq.insert(seq, text).is_none(),
                    "seq {seq} replayed twice"
                );
            }
            _ => {}
        }
        if hello_seq.is_some_and(|last| by_seq.len() as u64 == last) {
            break;
        }
    }
    (hello_seq.expect("hello"), by_seq)
}

/// Sends SIGHUP to the server (a configuration reload).
pub fn hangup(server: &Server) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}
