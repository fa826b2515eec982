//! `switchboard kb sync --from https://HOST:PORT`: the replica side of knowledge-base delta
//! sync. It asks the primary (any `switchboard serve`, over its TLS listener, with an admin's
//! bearer token) for its snapshot's hash; when that differs from the local one it syncs in two
//! rounds (`kb::delta_plan`): the coarse rsync signature of its own snapshot file gets a plan
//! back, then a fine signature of the base blocks the plan leaves unused gets the delta of the
//! stretches it still needs. It rebuilds the primary's file, verifies its length and BLAKE3 hash, and stores it in every shard's replica like an
//! import, so a `serve` running on these replicas switches to it while chats go on.
//!
//! Invariants:
//! - Nothing is written unless the rebuilt file has the primary's length and hash and decodes
//!   as a snapshot whose entries and vectors a replica accepts; any failure exits non-zero
//!   with the reason, and the replicas keep serving the version they had.
//! - TLS only (`https://`): the token and the knowledge base never cross the network in clear.
//!   The server's certificate is checked against `--ca-file`, or the system's roots.
//! - The bytes reported are the ones on the wire, TLS records and HTTP heads included.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use super::{audit_cli, kb_config, millis, Failure};
use crate::engine::update;
use crate::kb::{self, KbReplica};

/// Where the system's trusted roots are read from when there is no `--ca-file`.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";
/// How long to wait for the primary to connect and to answer (a large diff takes seconds).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(300);
/// The largest snapshot accepted: what one replica's map can hold.
const MAX_SNAPSHOT_BYTES: u64 = kb::DEFAULT_MAP_SIZE as u64;

/// Why a sync failed. Nothing was stored in any of these cases.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("--from {0:?}: expected https://HOST:PORT")]
    BadUrl(String),
    #[error("--from {0}: plain http is refused (the token and the knowledge base would cross the network in clear); use https://")]
    PlainHttp(String),
    #[error("cannot read the token file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the token file {0} is empty (put an admin's token from POST /api/login in it)")]
    EmptyToken(PathBuf),
    #[error("{path}: {detail}")]
    Roots { path: PathBuf, detail: String },
    #[error("cannot reach {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Io(String),
    #[error("the primary's answer is not valid HTTP: {0}")]
    Http(String),
    #[error("the primary refused {request} with {status} {code}: {message}")]
    Refused {
        request: &'static str,
        status: u16,
        code: String,
        message: String,
    },
    #[error("the primary's answer is unusable: {0}")]
    BadAnswer(String),
    #[error(transparent)]
    Delta(#[from] kb::DeltaError),
    #[error("the rebuilt snapshot is not a valid knowledge base: {0}")]
    Snapshot(#[from] kb::SnapshotFileError),
    #[error("cannot read the local knowledge base: {0}")]
    Local(#[from] kb::KbError),
    #[error("cannot store the synced version: {0}")]
    Store(#[from] update::UpdateError),
}

impl SyncError {
    /// Exit 2 for bad arguments or input files, 1 for everything that went wrong later.
    fn into_failure(self) -> Failure {
        match self {
            SyncError::BadUrl(_)
            | SyncError::PlainHttp(_)
            | SyncError::TokenFile { .. }
            | SyncError::EmptyToken(_)
            | SyncError::Roots { .. } => Failure::invalid(self),
            other => Failure::runtime(other),
        }
    }
}

/// `switchboard kb sync`.
pub(super) fn run(
    config_path: Option<&Path>,
    from: &str,
    token_file: &Path,
    ca_file: Option<&Path>,
) -> Result<(), Failure> {
    let started = Instant::now();
    let (config, cores) = kb_config(config_path)?;
    let primary =
        Primary::connectable(from, token_file, ca_file).map_err(SyncError::into_failure)?;
    let outcome =
        sync(&primary, &config.storage.dir, cores.len()).map_err(SyncError::into_failure)?;
    let wire = format!(
        "sent {} bytes, received {} bytes",
        primary.sent(),
        primary.received()
    );
    match outcome {
        Outcome::UpToDate { version, length } => println!(
            "already up to date with {from} (its version {version}, a {length}-byte snapshot): {wire} in {}",
            millis(started.elapsed())
        ),
        Outcome::Synced {
            primary_version,
            stored_version,
            length,
            delta_bytes,
            entries,
        } => {
            println!(
                "synced {from} version {primary_version} ({entries} entries, a {length}-byte snapshot) \
                 from a {delta_bytes}-byte delta; stored as version {stored_version} in {} shard replica{}: {wire} in {}",
                cores.len(),
                if cores.len() == 1 { "" } else { "s" },
                millis(started.elapsed())
            );
            audit_cli::record(
                &config,
                crate::audit::AuditEvent::new("kb_synced", &audit_cli::cli_actor())
                    .target(from.to_owned())
                    .detail("version", stored_version)
                    .detail("primary_version", primary_version)
                    .detail("delta_bytes", delta_bytes as u64)
                    .detail("received_bytes", primary.received()),
            )
            .map_err(Failure::runtime)?;
        }
    }
    Ok(())
}

enum Outcome {
    UpToDate {
        version: u64,
        length: u64,
    },
    Synced {
        primary_version: u64,
        stored_version: u64,
        length: u64,
        delta_bytes: usize,
        entries: usize,
    },
}

/// What the primary says of its snapshot file (`GET|POST /api/kb/sync`).
struct Described {
    version: u64,
    length: u64,
    hash: String,
}

fn sync(primary: &Primary, dir: &Path, shards: usize) -> Result<Outcome, SyncError> {
    let base = local_snapshot(dir)?;
    let base_hash = kb::content_hash(&base);

    let state = primary.exchange("GET /api/kb/sync", None)?;
    let described = describe(&state)?;
    if described.hash == base_hash {
        return Ok(Outcome::UpToDate {
            version: described.version,
            length: described.length,
        });
    }

    // Two rounds (`kb::delta_plan`); a primary whose knowledge base changes between them
    // answers 409 `kb_changed`, and the exchange starts again from its new file.
    let mut attempts = 0;
    let (file, described, delta_bytes) = loop {
        attempts += 1;
        match two_rounds(primary, &base) {
            Err(SyncError::Refused { code, .. }) if code == "kb_changed" && attempts < 3 => {
                continue
            }
            other => break other?,
        }
    };
    drop(base);
    let content = kb::decode_snapshot(&file)?;
    let stored_version = update::apply_synced(
        dir,
        shards,
        kb::DEFAULT_MAP_SIZE,
        &content,
        described.version,
    )?;
    Ok(Outcome::Synced {
        primary_version: described.version,
        stored_version,
        length: described.length,
        delta_bytes,
        entries: content.entries.len(),
    })
}

/// The coarse round (a plan against `base`'s signature), then the fine round (the regions the
/// plan fetches, against the fine signature of the base blocks it leaves unused). Returns the
/// primary's file, as described, and the bytes of plan and regions delta.
fn two_rounds(primary: &Primary, base: &[u8]) -> Result<(Vec<u8>, Described, usize), SyncError> {
    let base64 = &base64::engine::general_purpose::STANDARD;
    let decode = |answer: &serde_json::Value, field: &str| {
        answer[field]
            .as_str()
            .ok_or_else(|| SyncError::BadAnswer(format!("no \"{field}\"")))
            .and_then(|text| {
                base64.decode(text).map_err(|err| {
                    SyncError::BadAnswer(format!("the {field} is not base64: {err}"))
                })
            })
    };
    let body = serde_json::json!({ "signature": base64.encode(kb::signature(base)), "plan": true })
        .to_string();
    let answer = primary.exchange("POST /api/kb/sync", Some(body.as_bytes()))?;
    let described = describe(&answer)?;
    let plan_bytes = decode(&answer, "plan")?;
    let plan = kb::Plan::decode(&plan_bytes, base.len() as u64, described.length)?;
    let regions = plan.fetch_regions();
    let unused = plan.unused_base(base, kb::block_size_for(base.len()));
    let regions_delta = if regions.is_empty() {
        Vec::new()
    } else {
        let body = serde_json::json!({
            "hash": described.hash,
            "fine_signature": base64.encode(kb::fine_signature(&unused)),
            "regions": base64.encode(kb::encode_regions(&regions)),
        })
        .to_string();
        let answer = primary.exchange("POST /api/kb/sync", Some(body.as_bytes()))?;
        if describe(&answer)?.hash != described.hash {
            return Err(SyncError::BadAnswer(
                "the fine round answered for another file than the plan".into(),
            ));
        }
        decode(&answer, "delta")?
    };
    let file = kb::rebuild_planned(
        base,
        &plan,
        &unused,
        &regions_delta,
        described.length,
        &described.hash,
    )?;
    let bytes = plan_bytes.len() + regions_delta.len();
    Ok((file, described, bytes))
}

/// The snapshot file of shard 0's current version, empty before the first import. The
/// environment is closed again before this returns (the store reopens it).
fn local_snapshot(dir: &Path) -> Result<Vec<u8>, SyncError> {
    if !dir.join("kb-0").is_dir() {
        return Ok(Vec::new());
    }
    let replica = KbReplica::open(dir, 0, kb::DEFAULT_MAP_SIZE)?;
    let view = replica.read()?;
    Ok(view
        .snapshot()?
        .map(|snapshot| kb::encode_snapshot_view(&snapshot))
        .unwrap_or_default())
}

fn describe(answer: &serde_json::Value) -> Result<Described, SyncError> {
    let field = |name: &str| {
        answer[name]
            .as_u64()
            .ok_or_else(|| SyncError::BadAnswer(format!("no whole number \"{name}\"")))
    };
    let hash = answer["hash"]
        .as_str()
        .unwrap_or_default()
        .to_ascii_lowercase();
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SyncError::BadAnswer(
            "\"hash\" is not 64 hex digits (a BLAKE3 hash)".into(),
        ));
    }
    let length = field("length")?;
    if length > MAX_SNAPSHOT_BYTES {
        return Err(SyncError::BadAnswer(format!(
            "a {length}-byte snapshot is more than the {MAX_SNAPSHOT_BYTES} bytes a replica holds"
        )));
    }
    Ok(Described {
        version: field("version")?,
        length,
        hash,
    })
}

/// The primary's address, the admin token and the TLS trust, with the bytes exchanged so far.
struct Primary {
    host: String,
    port: u16,
    token: String,
    tls: Arc<ClientConfig>,
    sent: std::cell::Cell<u64>,
    received: std::cell::Cell<u64>,
}

impl Primary {
    fn connectable(
        from: &str,
        token_file: &Path,
        ca_file: Option<&Path>,
    ) -> Result<Primary, SyncError> {
        let (host, port) = parse_url(from)?;
        let token = std::fs::read_to_string(token_file)
            .map_err(|source| SyncError::TokenFile {
                path: token_file.to_owned(),
                source,
            })?
            .trim()
            .to_owned();
        if token.is_empty() {
            return Err(SyncError::EmptyToken(token_file.to_owned()));
        }
        Ok(Primary {
            host,
            port,
            token,
            tls: client_config(ca_file.unwrap_or(Path::new(SYSTEM_ROOTS)))?,
            sent: Default::default(),
            received: Default::default(),
        })
    }

    fn sent(&self) -> u64 {
        self.sent.get()
    }

    fn received(&self) -> u64 {
        self.received.get()
    }

    /// One request (`"METHOD PATH"`) on a new TLS connection; the JSON answer of a 200, else
    /// [`SyncError::Refused`] with the API's error code and message.
    fn exchange(
        &self,
        request: &'static str,
        body: Option<&[u8]>,
    ) -> Result<serde_json::Value, SyncError> {
        let address = format!("{}:{}", self.host, self.port);
        let connect_error = |source| SyncError::Connect {
            address: address.clone(),
            source,
        };
        let socket_address = (self.host.trim_matches(['[', ']']), self.port)
            .to_socket_addrs()
            .map_err(connect_error)?
            .next()
            .ok_or_else(|| connect_error(io::ErrorKind::NotFound.into()))?;
        let tcp =
            TcpStream::connect_timeout(&socket_address, CONNECT_TIMEOUT).map_err(connect_error)?;
        tcp.set_read_timeout(Some(ANSWER_TIMEOUT))
            .and_then(|()| tcp.set_write_timeout(Some(ANSWER_TIMEOUT)))
            .map_err(connect_error)?;
        let name = ServerName::try_from(self.host.trim_matches(['[', ']']).to_owned())
            .map_err(|_| SyncError::BadUrl(self.host.clone()))?;
        let connection = ClientConnection::new(self.tls.clone(), name)
            .map_err(|err| SyncError::Io(format!("TLS: {err}")))?;
        let mut stream = StreamOwned::new(connection, CountingSocket::new(tcp));

        let body = body.unwrap_or_default();
        let mut head = format!(
            "{request} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n",
            self.host, self.token
        );
        if request.starts_with("POST") {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        head.push_str("\r\n");
        let mut response = Vec::new();
        let result = stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(body))
            .and_then(|()| stream.flush())
            .and_then(|()| {
                (&mut stream)
                    .take(2 * MAX_SNAPSHOT_BYTES + 64 * 1024)
                    .read_to_end(&mut response)
            });
        self.sent.set(self.sent.get() + stream.sock.written);
        self.received.set(self.received.get() + stream.sock.read);
        match result {
            Ok(_) => {}
            // The server closes without close_notify after its answer; the length check below
            // still catches a cut answer.
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
            Err(err) => return Err(SyncError::Io(format!("{request} to {address}: {err}"))),
        }
        let (status, body) = parse_response(&response)?;
        let value: serde_json::Value = serde_json::from_slice(body)
            .map_err(|err| SyncError::BadAnswer(format!("{request}: not JSON: {err}")))?;
        if status != 200 {
            return Err(SyncError::Refused {
                request,
                status,
                code: value["error"]["code"].as_str().unwrap_or("?").to_owned(),
                message: value["error"]["message"].as_str().unwrap_or("").to_owned(),
            });
        }
        Ok(value)
    }
}

/// `https://HOST:PORT` (an optional trailing `/`; HOST may be `[IPv6]`) → host and port.
fn parse_url(from: &str) -> Result<(String, u16), SyncError> {
    let bad = || SyncError::BadUrl(from.to_owned());
    if from.starts_with("http://") {
        return Err(SyncError::PlainHttp(from.to_owned()));
    }
    let rest = from.strip_prefix("https://").ok_or_else(bad)?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || host.contains(['/', '@', ' ']) || port == 0 {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

/// The status and the body of an HTTP/1.1 response with `Content-Length`; a body shorter or
/// longer than announced is refused.
fn parse_response(response: &[u8]) -> Result<(u16, &[u8]), SyncError> {
    let end = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or_else(|| SyncError::Http(format!("no complete head in {} bytes", response.len())))?;
    let head = std::str::from_utf8(&response[..end])
        .map_err(|_| SyncError::Http("the head is not UTF-8".into()))?;
    let body = &response[end + 4..];
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| SyncError::Http("no status line".into()))?;
    let length = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .ok_or_else(|| SyncError::Http("no Content-Length".into()))?;
    if body.len() != length {
        return Err(SyncError::Http(format!(
            "the body is {} bytes, Content-Length says {length} (cut short?)",
            body.len()
        )));
    }
    Ok((status, body))
}

/// A TLS client configuration that trusts the PEM certificates in `roots`.
fn client_config(roots: &Path) -> Result<Arc<ClientConfig>, SyncError> {
    let fail = |detail: String| SyncError::Roots {
        path: roots.to_owned(),
        detail,
    };
    let pem = std::fs::read(roots).map_err(|err| {
        fail(format!(
            "cannot read the trusted certificates ({err}); pass --ca-file with the primary's certificate"
        ))
    })?;
    let mut store = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|err| fail(format!("invalid PEM certificate: {err}")))?;
        store
            .add(cert)
            .map_err(|err| fail(format!("unusable certificate: {err}")))?;
    }
    if store.is_empty() {
        return Err(fail(
            "no certificate found (expected -----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| fail(format!("TLS: {err}")))?
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![crate::tls::ALPN_HTTP_1_1.to_vec()];
    Ok(Arc::new(config))
}

/// A socket that counts the bytes through it (what the sync costs on the wire).
struct CountingSocket {
    inner: TcpStream,
    read: u64,
    written: u64,
}

impl CountingSocket {
    fn new(inner: TcpStream) -> CountingSocket {
        CountingSocket {
            inner,
            read: 0,
            written: 0,
        }
    }
}

impl Read for CountingSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.read += read as u64;
        Ok(read)
    }
}

impl Write for CountingSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.written += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_https_with_a_port() {
        assert_eq!(
            parse_url("https://kb.example:8443").unwrap(),
            ("kb.example".to_owned(), 8443)
        );
        assert_eq!(
            parse_url("https://[::1]:9/").unwrap(),
            ("[::1]".to_owned(), 9)
        );
        assert!(matches!(
            parse_url("http://kb.example:80"),
            Err(SyncError::PlainHttp(_))
        ));
        for bad in [
            "kb.example:1",
            "https://kb.example",
            "https://:1",
            "https://h:0",
            "https://h:x",
        ] {
            assert!(matches!(parse_url(bad), Err(SyncError::BadUrl(_))), "{bad}");
        }
    }

    #[test]
    fn responses_must_match_their_content_length() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_response(ok).unwrap(), (200, &b"{}"[..]));
        let cut = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n{}";
        assert!(matches!(parse_response(cut), Err(SyncError::Http(_))));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\n{}").is_err());
    }
}
