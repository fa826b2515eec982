//! TLS for the appliance's second listener (`[tls]`): loading and validating a certificate/key
//! pair into a rustls [`ServerConfig`], sharing the current one with every shard, reloading it on
//! SIGHUP or when the files change, and writing a self-signed pair for a first start.
//!
//! Invariants:
//! - Only TLS 1.2 and 1.3 are offered (rustls with the ring provider), ALPN `http/1.1` only: a
//!   client that offers ALPN without `http/1.1` is refused with `no_application_protocol`.
//! - A pair is checked whole before it is used: every certificate parses, the key parses, and the
//!   key matches the leaf certificate. A pair that fails at start-up stops the process (exit 2);
//!   one that fails at reload leaves the previous pair in use, is logged and counted
//!   (`tls_reload_failures`).
//! - Shards read the current configuration through an [`ArcSwap`] ([`Certificates::current`]):
//!   one lock-free load per handshake, never a lock; the watcher thread is the only writer.
//!   A reload changes only what new handshakes use: an established session keeps the keys it
//!   negotiated, so nothing is dropped. (arc-swap rather than a mesh message per shard: the watcher
//!   is not a shard and has no mesh sender, and a swap needs no new message type in the router.)
//! - No session resumption state is kept (no ticket keys, no session cache): a session costs the
//!   server nothing once closed, and there is no process-wide cache lock on the handshake path.

pub mod stream;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

use crate::metrics::{Metrics, ShardMetrics};

pub use stream::{accept, TlsStream};

/// Why a certificate/key pair could not be loaded or written. `Display` is one line naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: no PEM certificate found (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: PathBuf },
    #[error("{path}: invalid PEM certificate: {message}")]
    BadCertificate { path: PathBuf, message: String },
    #[error("{path}: no usable PEM private key found (PKCS#8, PKCS#1 or SEC1): {message}")]
    BadKey { path: PathBuf, message: String },
    #[error("{cert} and {key} do not form a usable pair: {source}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{path}: cannot write: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} exists; pass --force to overwrite it")]
    Exists { path: PathBuf },
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
}

/// The ALPN protocol the listener speaks.
pub const ALPN_HTTP_1_1: &[u8] = b"http/1.1";

/// Loads `cert` and `key` (PEM) into a server configuration: TLS 1.2 and 1.3, ALPN `http/1.1`,
/// no resumption state.
pub fn load_server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError::BadCertificate {
            path: cert.to_owned(),
            message: err.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_owned(),
        });
    }
    let private_key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|err| TlsError::BadKey {
        path: key.to_owned(),
        message: err.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let pair_error = |source| TlsError::Pair {
        cert: cert.to_owned(),
        key: key.to_owned(),
        source,
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(pair_error)?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(pair_error)?;
    config.alpn_protocols = vec![ALPN_HTTP_1_1.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// The server configuration every shard's TLS listener uses for new handshakes.
pub struct Certificates {
    current: ArcSwap<ServerConfig>,
}

impl Certificates {
    pub fn new(config: Arc<ServerConfig>) -> Certificates {
        Certificates {
            current: ArcSwap::new(config),
        }
    }

    /// The configuration for a new handshake (a lock-free load).
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Makes `config` the one new handshakes use.
    pub fn replace(&self, config: Arc<ServerConfig>) {
        self.current.store(config);
    }
}

/// What identifies a version of a file: a change of any of these means it was rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

/// Starts the thread that reloads `cert` and `key` into `certificates` on SIGHUP and when either
/// file changes (checked every `interval`). A pair that does not load leaves the current one in
/// place, is logged at error level and counted in `tls_reload_failures`.
pub fn spawn_watcher(
    certificates: Arc<Certificates>,
    cert: PathBuf,
    key: PathBuf,
    interval: Duration,
    metrics: Metrics,
) -> io::Result<()> {
    let hangup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hangup.clone())?;
    std::thread::Builder::new()
        .name("switchboard-tls-watch".into())
        .spawn(move || {
            let mut seen = (stamp(&cert), stamp(&key));
            let mut next_check = Instant::now() + interval;
            loop {
                std::thread::sleep(Duration::from_millis(100).min(interval));
                let signalled = hangup.swap(false, Ordering::AcqRel);
                let due = Instant::now() >= next_check;
                if !signalled && !due {
                    continue;
                }
                next_check = Instant::now() + interval;
                let now = (stamp(&cert), stamp(&key));
                if !signalled && now == seen {
                    continue;
                }
                seen = now;
                let reason = if signalled { "SIGHUP" } else { "file change" };
                match load_server_config(&cert, &key) {
                    Ok(config) => {
                        certificates.replace(config);
                        ShardMetrics::add(&metrics.process().tls_reloads, 1);
                        tracing::info!(
                            reason,
                            cert = %cert.display(),
                            key = %key.display(),
                            "TLS certificate reloaded; new handshakes use it"
                        );
                        crate::audit::emit(
                            crate::audit::AuditEvent::new("tls_reloaded", "system")
                                .target(cert.display().to_string())
                                .detail("key", key.display().to_string())
                                .detail("reason", reason),
                        );
                    }
                    Err(err) => {
                        ShardMetrics::add(&metrics.process().tls_reload_failures, 1);
                        tracing::error!(
                            reason,
                            error = %err,
                            "TLS certificate reload failed; keeping the previous certificate"
                        );
                        crate::audit::emit(
                            crate::audit::AuditEvent::new("tls_reload_failed", "system")
                                .target(cert.display().to_string())
                                .detail("reason", reason)
                                .detail("error", err.to_string()),
                        );
                    }
                }
            }
        })?;
    Ok(())
}

/// Writes a self-signed certificate for `host` (a DNS name or an IP address, also `localhost` and
/// `127.0.0.1`... only what is given) to `cert`, and its private key to `key` with mode 0600.
/// Each file is written to a temporary name and renamed into place, so a watcher never reads
/// half a file. Refuses to overwrite an existing file unless `force`.
pub fn write_self_signed(host: &str, cert: &Path, key: &Path, force: bool) -> Result<(), TlsError> {
    if !force {
        for path in [cert, key] {
            if path.exists() {
                return Err(TlsError::Exists {
                    path: path.to_owned(),
                });
            }
        }
    }
    let generated = rcgen::generate_simple_self_signed(vec![host.to_owned()])
        .map_err(|err| TlsError::Generate(err.to_string()))?;
    write_atomically(key, generated.signing_key.serialize_pem().as_bytes(), 0o600)?;
    write_atomically(cert, generated.cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let write_error = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".tmp-{}", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .map_err(write_error)?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(write_error)?;
    std::fs::rename(&temporary, path).map_err(write_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_pair_loads_and_a_mismatched_pair_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_a, key_a) = (dir.path().join("a.pem"), dir.path().join("a.key"));
        let (cert_b, key_b) = (dir.path().join("b.pem"), dir.path().join("b.key"));
        write_self_signed("a.example", &cert_a, &key_a, false).unwrap();
        write_self_signed("b.example", &cert_b, &key_b, false).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_a).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let config = load_server_config(&cert_a, &key_a).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let err = load_server_config(&cert_a, &key_b).unwrap_err();
        assert!(matches!(err, TlsError::Pair { .. }), "{err}");
        assert!(
            err.to_string().contains("do not form a usable pair"),
            "{err}"
        );
        let err = load_server_config(&key_a, &key_a).unwrap_err();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err}");
        let err = load_server_config(&cert_a, &cert_a).unwrap_err();
        assert!(matches!(err, TlsError::BadKey { .. }), "{err}");
        let err = load_server_config(&dir.path().join("missing"), &key_a).unwrap_err();
        assert!(err.to_string().contains("cannot read"), "{err}");
        let err = write_self_signed("a.example", &cert_a, &key_a, false).unwrap_err();
        assert!(matches!(err, TlsError::Exists { .. }), "{err}");
        write_self_signed("c.example", &cert_a, &key_a, true).unwrap();
    }
}
