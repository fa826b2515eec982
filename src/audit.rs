//! The audit chain: an append-only, fsynced log of security-relevant events (logins and their
//! failures, lockouts, account and role changes, agent actions on conversations, knowledge-base
//! and configuration changes, blocks), in which every record carries the SHA-256 of the one
//! before it, so that editing, removing or reordering a record is detected by [`verify`].
//!
//! Format: one JSON object per line (UTF-8, `\n`-terminated), fields in this order:
//! `{"seq":N,"ts":"RFC 3339","prev":"64 hex","kind":"...","actor":"...","target":"...",
//! "peer":"...","detail":{...}}`. `seq` starts at 1 and grows by one; `prev` is the SHA-256 of
//! the previous line's bytes (without its newline), 64 zeros for the first record. `target`,
//! `peer` and `detail` are omitted when empty.
//!
//! Kinds recorded by the server for agents' actions on conversations (actor = the agent's
//! account, target = the conversation id): `conversation_accepted`, `conversation_transferred`
//! (detail `from`, `to`, `role`; the actor is who asked, e.g. a supervisor), `conversation_closed`
//! (once the close is committed), `conversation_watched` (a supervisor's `watch`), and
//! `access_denied` for refusals by role. Configuration-relevant reloads: `blocklist_changed`
//! (added and removed networks), `blocklist_reload_failed`, `tls_reloaded`, `tls_reload_failed`.
//!
//! Invariants:
//! - A record is appended whole and then `fdatasync`'d before [`AuditFile::append`] returns;
//!   appends from several processes (the server and `switchboard agent ...` commands) are
//!   serialised by an exclusive `flock` on the file, and each append re-reads the current last
//!   record under that lock, so the chain stays linear whoever writes.
//! - A torn last line (a crash in the middle of a write) is reported by `verify` as broken; the
//!   next append starts a fresh line after it, so it can never be mistaken for a good record.
//! - The chain cannot show that records were cut off the END of the file. `audit tail` prints
//!   the head's hash and seq so an operator can anchor it elsewhere (a ticket, a second box).
//! - The server never writes on a shard thread: [`AuditLog`] hands records to one writer thread
//!   over a bounded channel, so an fsync never stalls an event loop. When the channel is full the
//!   sender waits (audit events are rare; losing one is worse than a short stall).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Longest record accepted, in bytes; longer free-text fields are cut to fit.
const MAX_RECORD_BYTES: usize = 8192;
/// The `prev` of the first record.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Why the audit file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: the last record (line {line}) is not a valid audit record, so the chain cannot be continued: {reason}; run `switchboard audit verify`")]
    UnreadableHead {
        path: String,
        line: u64,
        reason: String,
    },
}

/// One security-relevant event, as the caller describes it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuditEvent {
    /// What happened, e.g. `login`, `login_failed`, `lockout`, `agent_added`, `role_changed`,
    /// `conversation_transferred`, `kb_imported`, `blocked`.
    pub kind: String,
    /// Who did it: an account name, `cli:USER`, `system`, or a peer address.
    pub actor: String,
    /// What it was done to (an account, a conversation id, a file); empty when nothing.
    pub target: String,
    /// The client address, when the event came over the network.
    pub peer: String,
    /// Anything else worth keeping, as a JSON object.
    pub detail: serde_json::Map<String, serde_json::Value>,
}

impl AuditEvent {
    /// An event of `kind` by `actor`.
    pub fn new(kind: &str, actor: &str) -> AuditEvent {
        AuditEvent {
            kind: kind.to_string(),
            actor: actor.to_string(),
            ..AuditEvent::default()
        }
    }

    /// Sets the target.
    pub fn target(mut self, target: impl Into<String>) -> AuditEvent {
        self.target = target.into();
        self
    }

    /// Sets the peer address.
    pub fn peer(mut self, peer: impl ToString) -> AuditEvent {
        self.peer = peer.to_string();
        self
    }

    /// Adds a detail field.
    pub fn detail(mut self, key: &str, value: impl Into<serde_json::Value>) -> AuditEvent {
        self.detail.insert(key.to_string(), value.into());
        self
    }
}

/// A record as stored (the field order is the line's byte order, which the hash covers).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub ts: String,
    pub prev: String,
    pub kind: String,
    pub actor: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub target: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer: String,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub detail: serde_json::Map<String, serde_json::Value>,
}

fn hash_hex(line: &[u8]) -> String {
    let digest = Sha256::digest(line);
    let mut out = String::with_capacity(64);
    for byte in digest {
        use std::fmt::Write as _;
        let _ = write!(out, "{byte:02x}");
    }
    out
}

fn cut(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

/// The audit file, opened for appending by one process.
pub struct AuditFile {
    path: PathBuf,
    file: File,
}

/// What [`AuditFile::append`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    pub hash: String,
}

impl AuditFile {
    /// Opens (creating, mode 0600) the audit file at `path`; its directory is created too.
    pub fn open(path: &Path) -> Result<AuditFile, AuditError> {
        let io = |source| AuditError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        Ok(AuditFile {
            path: path.to_path_buf(),
            file,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `event` as the next record, syncs it, and returns its seq and hash.
    pub fn append(&mut self, event: &AuditEvent, now_ms: u64) -> Result<Appended, AuditError> {
        let path = self.path.display().to_string();
        let io = |source| AuditError::Io {
            path: path.clone(),
            source,
        };
        let _lock = FileLock::exclusive(&self.file).map_err(io)?;
        let head = read_last_line(&self.file).map_err(io)?;
        let (seq, prev) = match head {
            None => (1, GENESIS.to_string()),
            Some(LastLine {
                bytes,
                line,
                terminated,
            }) => match serde_json::from_slice::<AuditRecord>(&bytes) {
                Ok(record) if terminated => (record.seq + 1, hash_hex(&bytes)),
                Ok(_) | Err(_) => {
                    // A torn or damaged head: refuse to extend a chain we cannot anchor.
                    return Err(AuditError::UnreadableHead {
                        path,
                        line,
                        reason: if terminated {
                            "not an audit record".into()
                        } else {
                            "torn write (no final newline)".into()
                        },
                    });
                }
            },
        };
        let mut record = AuditRecord {
            seq,
            ts: crate::conversation::protocol::rfc3339(now_ms),
            prev,
            kind: event.kind.clone(),
            actor: event.actor.clone(),
            target: event.target.clone(),
            peer: event.peer.clone(),
            detail: event.detail.clone(),
        };
        cut(&mut record.kind, 64);
        cut(&mut record.actor, 256);
        cut(&mut record.target, 512);
        cut(&mut record.peer, 64);
        let mut line = serde_json::to_vec(&record).expect("records serialise");
        if line.len() > MAX_RECORD_BYTES {
            record.detail = serde_json::Map::from_iter([(
                "truncated".to_string(),
                serde_json::Value::Bool(true),
            )]);
            line = serde_json::to_vec(&record).expect("records serialise");
        }
        let hash = hash_hex(&line);
        line.push(b'\n');
        (&self.file).write_all(&line).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        Ok(Appended { seq, hash })
    }
}

/// An exclusive `flock`, released on drop.
struct FileLock<'f>(&'f File);

impl<'f> FileLock<'f> {
    fn exclusive(file: &'f File) -> std::io::Result<FileLock<'f>> {
        // SAFETY: flock on a valid descriptor owned by `file`, which outlives the guard.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(FileLock(file))
    }
}

impl Drop for FileLock<'_> {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

struct LastLine {
    bytes: Vec<u8>,
    /// 1-based line number.
    line: u64,
    /// Whether it ends with a newline.
    terminated: bool,
}

/// The last line of the file (without its newline), read backwards from the end.
fn read_last_line(mut file: &File) -> std::io::Result<Option<LastLine>> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(None);
    }
    let mut end = len;
    let mut last = [0u8; 1];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last)?;
    let terminated = last[0] == b'\n';
    if terminated {
        end -= 1;
    }
    // Scan backwards in chunks for the newline before the last line.
    let mut start = end;
    let mut chunk = vec![0u8; 4096];
    'scan: while start > 0 {
        let take = (start as usize).min(chunk.len());
        file.seek(SeekFrom::Start(start - take as u64))?;
        file.read_exact(&mut chunk[..take])?;
        for i in (0..take).rev() {
            if chunk[i] == b'\n' {
                start = start - take as u64 + i as u64 + 1;
                break 'scan;
            }
        }
        start -= take as u64;
        if end - start > (4 * MAX_RECORD_BYTES) as u64 {
            break;
        }
    }
    let mut bytes = vec![0u8; (end - start) as usize];
    file.seek(SeekFrom::Start(start))?;
    file.read_exact(&mut bytes)?;
    // Line number: count newlines before `start` (the file is small enough; audit logs grow slowly).
    let mut line = 1u64;
    if start > 0 {
        file.seek(SeekFrom::Start(0))?;
        let mut reader = BufReader::new(file.take(start));
        let mut buf = Vec::new();
        while reader.read_until(b'\n', &mut buf)? > 0 {
            line += 1;
            buf.clear();
        }
    }
    file.seek(SeekFrom::End(0))?;
    Ok(Some(LastLine {
        bytes,
        line,
        terminated,
    }))
}

/// The first problem [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ChainBreak {
    /// 1-based line of the first broken or missing record.
    pub line: u64,
    /// The seq that line should have carried.
    pub expected_seq: u64,
    pub reason: String,
}

/// What a successful [`verify`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSummary {
    pub records: u64,
    /// Hash of the last record (64 zeros when the log is empty).
    pub head: String,
}

/// Checks the whole chain: every line a record, seqs 1, 2, 3, ... and every `prev` the hash of
/// the line before. Returns the first break.
pub fn verify(path: &Path) -> Result<Result<ChainSummary, ChainBreak>, AuditError> {
    let io = |source| AuditError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let mut reader = BufReader::new(file);
    let mut prev = GENESIS.to_string();
    let mut expected_seq = 1u64;
    let mut line_no = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let read = reader.read_until(b'\n', &mut buf).map_err(io)?;
        if read == 0 {
            break;
        }
        line_no += 1;
        let broken = |reason: String| {
            Ok(Err(ChainBreak {
                line: line_no,
                expected_seq,
                reason,
            }))
        };
        if buf.last() != Some(&b'\n') {
            return broken("torn record: the file ends in the middle of a line".into());
        }
        buf.pop();
        let record: AuditRecord = match serde_json::from_slice(&buf) {
            Ok(record) => record,
            Err(err) => return broken(format!("not a valid audit record: {err}")),
        };
        if record.seq != expected_seq {
            return broken(if record.seq > expected_seq {
                format!(
                    "record {expected_seq} is missing (found seq {} instead)",
                    record.seq
                )
            } else {
                format!("seq {} out of order (expected {expected_seq})", record.seq)
            });
        }
        if record.prev != prev {
            return broken(format!(
                "record {} does not follow the record before it: its prev hash is {}, the previous record hashes to {prev} (a record was altered, removed or inserted here or just before)",
                record.seq, record.prev
            ));
        }
        prev = hash_hex(&buf);
        expected_seq += 1;
    }
    Ok(Ok(ChainSummary {
        records: expected_seq - 1,
        head: prev,
    }))
}

/// The last `count` lines of the file (records as written).
pub fn tail(path: &Path, count: usize) -> Result<Vec<String>, AuditError> {
    let io = |source| AuditError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let mut lines = std::collections::VecDeque::with_capacity(count.min(10_000));
    for line in BufReader::new(file).lines() {
        let line = line.map_err(io)?;
        if lines.len() == count {
            lines.pop_front();
        }
        if count > 0 {
            lines.push_back(line);
        }
    }
    Ok(lines.into())
}

/// The server's handle: records go to one writer thread that appends and syncs them.
#[derive(Clone)]
pub struct AuditLog {
    sender: crossbeam::channel::Sender<WriterMessage>,
}

enum WriterMessage {
    Record(AuditEvent),
    /// Answer once everything queued before it is written and synced.
    Flush(crossbeam::channel::Sender<()>),
}

/// Records queued for the writer thread before senders wait.
const AUDIT_QUEUE: usize = 4096;

impl AuditLog {
    /// Opens the file and starts the writer thread.
    pub fn start(path: &Path) -> Result<AuditLog, AuditError> {
        let file = AuditFile::open(path)?;
        // Refuse to start on a head we cannot extend: the operator must look first.
        if let Some(last) = read_last_line(&file.file).map_err(|source| AuditError::Io {
            path: path.display().to_string(),
            source,
        })? {
            if !last.terminated || serde_json::from_slice::<AuditRecord>(&last.bytes).is_err() {
                return Err(AuditError::UnreadableHead {
                    path: path.display().to_string(),
                    line: last.line,
                    reason: "the last line is not a complete audit record".into(),
                });
            }
        }
        let (sender, receiver) = crossbeam::channel::bounded::<WriterMessage>(AUDIT_QUEUE);
        std::thread::Builder::new()
            .name("switchboard-audit".into())
            .spawn(move || {
                let mut file = file;
                for message in receiver {
                    match message {
                        WriterMessage::Record(event) => {
                            if let Err(err) = file.append(&event, wall_clock_ms()) {
                                tracing::error!(error = %err, kind = %event.kind, "audit record not written");
                            }
                        }
                        WriterMessage::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })
            .map_err(|source| AuditError::Io {
                path: path.display().to_string(),
                source,
            })?;
        Ok(AuditLog { sender })
    }

    /// Queues `event` for the chain (and logs it at info level).
    pub fn record(&self, event: AuditEvent) {
        tracing::info!(
            kind = %event.kind,
            actor = %event.actor,
            target = %event.target,
            peer = %event.peer,
            "audit"
        );
        if self.sender.send(WriterMessage::Record(event)).is_err() {
            tracing::error!("the audit writer thread is gone; record not written");
        }
    }

    /// Waits until every record queued so far is written and synced (at shutdown).
    pub fn flush(&self) {
        let (done, wait) = crossbeam::channel::bounded(1);
        if self.sender.send(WriterMessage::Flush(done)).is_ok() {
            let _ = wait.recv();
        }
    }
}

/// Where [`emit`] sends records: the server's writer thread, or a command's own file.
type Sink = Box<dyn Fn(AuditEvent) + Send + Sync>;

static SINK: std::sync::OnceLock<Sink> = std::sync::OnceLock::new();

/// Makes `log` the process's audit sink (the server, once at start-up).
pub fn install(log: AuditLog) {
    let _ = SINK.set(Box::new(move |event| log.record(event)));
}

/// Makes the file at `path` the process's audit sink, written synchronously (one-shot commands
/// such as `switchboard agent add`, which must not return before their record is on disk).
pub fn install_file(path: &Path) -> Result<(), AuditError> {
    let file = std::sync::Mutex::new(AuditFile::open(path)?);
    let _ = SINK.set(Box::new(move |event: AuditEvent| {
        let mut file = file.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(err) = file.append(&event, wall_clock_ms()) {
            tracing::error!(error = %err, kind = %event.kind, "audit record not written");
            eprintln!("switchboard: audit record not written: {err}");
        }
    }));
    Ok(())
}

/// Records a security-relevant event in the process's audit chain. Security events are rare
/// (logins, account and admin actions), never per message; without an installed sink (unit
/// tests) the event is dropped.
pub fn emit(event: AuditEvent) {
    if let Some(sink) = SINK.get() {
        sink(event);
    }
}

/// Milliseconds since the Unix epoch: audit timestamps are calendar times by design.
pub fn wall_clock_ms() -> u64 {
    crate::conversation::protocol::now_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_records(path: &Path, n: u64) {
        let mut file = AuditFile::open(path).unwrap();
        let before = verify(path).unwrap().map_or(0, |summary| summary.records);
        for i in 0..n {
            let event = AuditEvent::new("login", &format!("agent{i}"))
                .peer("127.0.0.1:5000")
                .detail("attempt", i);
            let appended = file.append(&event, 1_700_000_000_000 + i).unwrap();
            assert_eq!(appended.seq, before + i + 1);
        }
    }

    #[test]
    fn an_intact_chain_verifies_and_counts_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_records(&path, 10);
        let summary = verify(&path).unwrap().unwrap();
        assert_eq!(summary.records, 10);
        let last = tail(&path, 1).unwrap();
        assert_eq!(summary.head, hash_hex(last[0].as_bytes()));
        // Reopening continues the chain.
        write_records(&path, 1);
        assert_eq!(verify(&path).unwrap().unwrap().records, 11);
    }

    #[test]
    fn a_flipped_byte_in_the_middle_is_found_at_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_records(&path, 9);
        let mut bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        // Flip a byte inside record 5's actor name ("agent4" -> "agent5").
        let line_start: usize = text.lines().take(4).map(|l| l.len() + 1).sum();
        let at = line_start + text.lines().nth(4).unwrap().find("agent4").unwrap() + 5;
        bytes[at] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let broken = verify(&path).unwrap().unwrap_err();
        // Record 5 itself still parses; record 6 no longer follows it.
        assert_eq!(broken.line, 6, "{broken}");
        assert!(broken.reason.contains("does not follow"), "{broken}");
    }

    #[test]
    fn a_flipped_byte_that_breaks_the_json_is_found_on_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_records(&path, 5);
        let mut bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        let line_start: usize = text.lines().take(2).map(|l| l.len() + 1).sum();
        bytes[line_start] = b'X'; // record 3's opening brace
        std::fs::write(&path, &bytes).unwrap();
        let broken = verify(&path).unwrap().unwrap_err();
        assert_eq!((broken.line, broken.expected_seq), (3, 3), "{broken}");
    }

    #[test]
    fn a_deleted_record_is_reported_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_records(&path, 6);
        let text = std::fs::read_to_string(&path).unwrap();
        let kept: Vec<&str> = text
            .lines()
            .enumerate()
            .filter(|(i, _)| *i != 3)
            .map(|(_, l)| l)
            .collect();
        std::fs::write(&path, kept.join("\n") + "\n").unwrap();
        let broken = verify(&path).unwrap().unwrap_err();
        assert_eq!(broken.line, 4);
        assert_eq!(broken.expected_seq, 4);
        assert!(broken.reason.contains("record 4 is missing"), "{broken}");
    }

    #[test]
    fn a_rewritten_record_with_a_fixed_seq_still_breaks_the_hash_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_records(&path, 4);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        // Delete record 2 and renumber the rest: seqs look dense, hashes do not.
        lines.remove(1);
        for (i, line) in lines.iter_mut().enumerate() {
            let mut record: AuditRecord = serde_json::from_str(line).unwrap();
            record.seq = i as u64 + 1;
            *line = serde_json::to_string(&record).unwrap();
        }
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let broken = verify(&path).unwrap().unwrap_err();
        assert_eq!(broken.line, 2);
    }

    #[test]
    fn a_torn_tail_is_reported_and_not_extended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_records(&path, 3);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 10);
        std::fs::write(&path, &bytes).unwrap();
        let broken = verify(&path).unwrap().unwrap_err();
        assert_eq!(broken.line, 3);
        assert!(broken.reason.contains("torn"));
        let mut file = AuditFile::open(&path).unwrap();
        assert!(matches!(
            file.append(&AuditEvent::new("x", "y"), 0),
            Err(AuditError::UnreadableHead { line: 3, .. })
        ));
        assert!(matches!(
            AuditLog::start(&path),
            Err(AuditError::UnreadableHead { .. })
        ));
    }

    #[test]
    fn appends_from_two_handles_keep_one_linear_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let mut file = AuditFile::open(&path).unwrap();
                    for i in 0..25 {
                        file.append(&AuditEvent::new("t", &format!("{t}-{i}")), 0)
                            .unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(verify(&path).unwrap().unwrap().records, 100);
    }

    #[test]
    fn long_fields_are_cut_and_the_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/audit.log");
        let mut file = AuditFile::open(&path).unwrap();
        let huge = "é".repeat(10_000);
        file.append(
            &AuditEvent::new("kb_imported", &huge).detail("file", huge.clone()),
            0,
        )
        .unwrap();
        let line = &tail(&path, 1).unwrap()[0];
        assert!(line.len() <= MAX_RECORD_BYTES);
        assert!(line.contains("\"truncated\":true"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(verify(&path).unwrap().unwrap().records, 1);
    }

    #[test]
    fn tail_returns_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        write_records(&path, 5);
        let lines = tail(&path, 2).unwrap();
        assert_eq!(lines.len(), 2);
        assert!(lines[1].contains("\"seq\":5"));
        assert_eq!(tail(&path, 0).unwrap().len(), 0);
    }
}
