//! TLS listener tests against the real binary: rustls clients over std sockets (and tungstenite
//! for WebSocket), a hand-made TLS 1.1 ClientHello, hot reload of the certificate files, and the
//! `tls self-signed` command.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{http_get, self_signed, tls_addr, Server, BIN};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, StreamOwned};

type TlsClient = StreamOwned<ClientConnection, TcpStream>;

fn tls_overlay(cert: &Path, key: &Path) -> String {
    format!(
        "[tls]\nlisten = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\nwatch_interval = \"200ms\"\n",
        cert.display().to_string(),
        key.display().to_string()
    )
}

fn client_config(
    trusted: &Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(trusted).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Connects and completes the handshake (or returns its error).
fn connect(addr: SocketAddr, config: Arc<ClientConfig>, name: &str) -> Result<TlsClient, String> {
    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let conn = ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    let mut stream = StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(|e| e.to_string())?;
    }
    Ok(stream)
}

fn healthz(mut stream: TlsClient) -> String {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn tls13_and_tls12_serve_healthz_and_websocket_beside_the_plain_listener() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(certs.path(), "a", "localhost");
    let server = Server::start(&tls_overlay(&cert, &key));
    let addr = tls_addr(&server);
    assert_ne!(addr, server.addr);
    for (version, expected) in [
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
    ] {
        let config = client_config(&cert, &[version], &[b"http/1.1"]);
        let stream = connect(addr, config.clone(), "localhost").unwrap();
        assert_eq!(stream.conn.protocol_version(), Some(expected));
        assert_eq!(stream.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
        let response = healthz(stream);
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.ends_with("ok\n"), "{response}");

        // A visitor session over TLS gets its hello; the plain listener serves meanwhile.
        let stream = connect(addr, config.clone(), "localhost").unwrap();
        let (mut ws, response) =
            tungstenite::client("ws://localhost/ws/visitor?site=tls-test", stream).unwrap();
        assert_eq!(response.status(), 101);
        let hello = ws.read().unwrap().into_text().unwrap();
        let hello: serde_json::Value = serde_json::from_str(&hello).unwrap();
        assert_eq!(hello["type"], "hello", "{hello}");
        assert_eq!(http_get(server.addr, "/healthz"), (200, "ok\n".to_string()));
        let mut plain = common::RawClient::connect(server.addr, "/ws/visitor?site=plain").unwrap();
        assert_eq!(plain.read_json()["type"], "hello");
        // Echo over TLS, bigger than one TLS record (16 KiB) and than the server's read buffer.
        let stream = connect(addr, config, "localhost").unwrap();
        let (mut echo, _) = tungstenite::client("ws://localhost/ws/echo", stream).unwrap();
        let big = "x".repeat(60_000);
        echo.send(tungstenite::Message::text(big.clone())).unwrap();
        assert_eq!(echo.read().unwrap().into_text().unwrap().as_str(), big);
        echo.close(None).unwrap();
    }
    assert!(server.metric("tls_handshakes_completed") >= 6);
}

/// A TLS 1.1 ClientHello (legacy version 3.2, no supported_versions extension).
fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02];
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // no session id
    body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // two TLS 1.1 suites
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut handshake = vec![0x01, 0x00, 0x00, body.len() as u8];
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01, 0x00, handshake.len() as u8];
    record.extend_from_slice(&handshake);
    record
}

#[test]
fn tls11_and_a_foreign_alpn_are_refused() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(certs.path(), "a", "localhost");
    let server = Server::start(&tls_overlay(&cert, &key));
    let addr = tls_addr(&server);

    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    tcp.write_all(&tls11_client_hello()).unwrap();
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer);
    // No ServerHello (record type 22) but a fatal alert record: type 21, level 2 (fatal),
    // handshake_failure (40, what rustls sends) or protocol_version (70).
    assert!(answer.len() >= 7, "no alert: {answer:?}");
    assert_eq!((answer[0], answer[5]), (21, 2), "{answer:?}");
    assert!(matches!(answer[6], 40 | 70), "{answer:?}");

    let h2_only = client_config(&cert, &[&rustls::version::TLS13], &[b"h2"]);
    let err = connect(addr, h2_only, "localhost").unwrap_err();
    assert!(err.contains("NoApplicationProtocol"), "{err}");
    // No ALPN at all is accepted (HTTP/1.1 is the only protocol served).
    let no_alpn = client_config(&cert, &[&rustls::version::TLS13], &[]);
    assert!(healthz(connect(addr, no_alpn, "localhost").unwrap()).starts_with("HTTP/1.1 200"));
    wait_for("failures counted", Duration::from_secs(5), || {
        server.metric("tls_handshake_failures") >= 2
    });
}

/// Replaces `path` with `bytes` the way a deploy does: write aside, rename over.
fn replace(path: &Path, bytes: &[u8]) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, bytes).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

#[test]
fn reload_swaps_the_certificate_keeps_sessions_and_refuses_a_bad_pair() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(certs.path(), "live", "localhost");
    let server = Server::start(&tls_overlay(&cert, &key));
    let addr = tls_addr(&server);
    let old_trust = certs.path().join("old-trust.pem");
    std::fs::copy(&cert, &old_trust).unwrap();
    let old = client_config(&old_trust, &[&rustls::version::TLS13], &[b"http/1.1"]);

    // A session on the first certificate.
    let stream = connect(addr, old.clone(), "localhost").unwrap();
    let (mut session, _) = tungstenite::client("ws://localhost/ws/echo", stream).unwrap();
    session.send(tungstenite::Message::text("before")).unwrap();
    assert_eq!(
        session.read().unwrap().into_text().unwrap().as_str(),
        "before"
    );

    // A new pair for another host name replaces the files.
    let (new_cert, new_key) = self_signed(certs.path(), "next", "reloaded.test");
    replace(&key, &std::fs::read(&new_key).unwrap());
    replace(&cert, &std::fs::read(&new_cert).unwrap());
    let new = client_config(&new_cert, &[&rustls::version::TLS13], &[b"http/1.1"]);
    wait_for("the new certificate", Duration::from_secs(10), || {
        connect(addr, new.clone(), "reloaded.test").is_ok()
    });
    let presented = connect(addr, new.clone(), "reloaded.test").unwrap();
    let expected = CertificateDer::from_pem_file(&new_cert).unwrap();
    assert_eq!(presented.conn.peer_certificates().unwrap()[0], expected);
    assert!(connect(addr, old.clone(), "localhost").is_err());
    assert!(server.metric("tls_reloads") >= 1);

    // The session opened before the reload is still up.
    session.send(tungstenite::Message::text("after")).unwrap();
    assert_eq!(
        session.read().unwrap().into_text().unwrap().as_str(),
        "after"
    );

    // A bad pair (a certificate that does not match the key) is refused; the current one stays.
    let failures = server.metric("tls_reload_failures");
    let (other_cert, _) = self_signed(certs.path(), "other", "other.test");
    replace(&cert, &std::fs::read(&other_cert).unwrap());
    wait_for("the refused reload", Duration::from_secs(10), || {
        server.metric("tls_reload_failures") > failures
    });
    assert!(server.has_logged("keeping the previous certificate"));
    // Both reloads are in the audit chain (written by its own thread, so wait for it).
    let audit = server.dir.path().join("data/audit.log");
    wait_for("the audit records", Duration::from_secs(10), || {
        let kinds: Vec<String> = std::fs::read_to_string(&audit)
            .unwrap_or_default()
            .lines()
            .map(|line| {
                serde_json::from_str::<serde_json::Value>(line).unwrap()["kind"].to_string()
            })
            .collect();
        kinds.contains(&"\"tls_reloaded\"".to_owned())
            && kinds.contains(&"\"tls_reload_failed\"".to_owned())
    });
    assert!(
        healthz(connect(addr, new.clone(), "reloaded.test").unwrap()).starts_with("HTTP/1.1 200")
    );

    // SIGHUP reloads too (and, with the pair still bad, is refused and counted again).
    let failures = server.metric("tls_reload_failures");
    // SAFETY: kill(2) with a pid we own.
    unsafe { libc::kill(server.pid() as i32, libc::SIGHUP) };
    wait_for("the SIGHUP reload", Duration::from_secs(10), || {
        server.metric("tls_reload_failures") > failures
    });
    assert!(connect(addr, new, "reloaded.test").is_ok());
    session.send(tungstenite::Message::text("still")).unwrap();
    assert_eq!(
        session.read().unwrap().into_text().unwrap().as_str(),
        "still"
    );
}

#[test]
fn bad_pair_at_start_up_exits_2_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = self_signed(dir.path(), "a", "localhost");
    let (_, other_key) = self_signed(dir.path(), "b", "localhost");
    let config = common::write_config(dir.path(), &tls_overlay(&cert, &other_key));
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid TLS certificate or key"),
        "{stderr}"
    );
    assert!(stderr.contains("do not form a usable pair"), "{stderr}");

    // listen without cert/key is a configuration error.
    let config = common::write_config(dir.path(), "[tls]\nlisten = \"127.0.0.1:0\"\n");
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("key 'tls.cert': required when tls.listen is set"),
        "{stderr}"
    );
}

#[test]
fn self_signed_writes_a_0600_key_and_refuses_to_overwrite() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "a", "127.0.0.1");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(std::fs::read_to_string(&cert)
        .unwrap()
        .starts_with("-----BEGIN CERTIFICATE-----"));
    let out = Command::new(BIN)
        .args(["tls", "self-signed", "--host", "x", "--cert"])
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pass --force"));
    // The pair serves: an IP-address certificate verified against 127.0.0.1.
    let server = Server::start(&tls_overlay(&cert, &key));
    let config = client_config(&cert, &[&rustls::version::TLS13], &[b"http/1.1"]);
    let stream = connect(tls_addr(&server), config, "127.0.0.1").unwrap();
    assert!(healthz(stream).starts_with("HTTP/1.1 200"));
}
