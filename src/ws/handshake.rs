//! The RFC 6455 opening handshake, both sides, sans-IO.
//!
//! Server side: [`validate_upgrade`] checks a parsed [`RequestHead`] and yields the `Sec-WebSocket-Accept`
//! value; [`write_101`] writes the switching-protocols response. A rejected handshake is a typed
//! [`HandshakeError`] whose [`HandshakeError::write_response`] writes the matching HTTP error (426 carries
//! `Sec-WebSocket-Version: 13` as RFC 6455 §4.4 requires).
//!
//! Client side (load-test harness, tests): [`generate_key`], [`client_request`], [`parse_client_response`].
//!
//! Invariants: no extension and no subprotocol is ever negotiated (a client's permessage-deflate offer is
//! ignored, and a server response that selects an extension we did not offer is rejected).

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

use crate::http::{write_response, HttpVersion, RequestHead};

/// The GUID RFC 6455 appends to the client key before hashing.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Largest response head [`parse_client_response`] waits for.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// Computes `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`: base64(SHA-1(key + GUID)).
pub fn accept_key(client_key: &str) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(client_key.as_bytes());
    sha.update(WEBSOCKET_GUID.as_bytes());
    BASE64.encode(sha.digest().bytes())
}

/// Why a server rejected an upgrade request. [`HandshakeError::status`] is the HTTP status to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("WebSocket upgrade must use GET")]
    MethodNotAllowed,
    #[error("WebSocket upgrade requires HTTP/1.1")]
    HttpVersion,
    #[error("missing `Upgrade: websocket`")]
    NotWebSocket,
    #[error("missing `Connection: Upgrade`")]
    MissingConnectionUpgrade,
    #[error("missing or unsupported Sec-WebSocket-Version (only 13 is supported)")]
    UnsupportedVersion,
    #[error("missing or invalid Sec-WebSocket-Key")]
    InvalidKey,
    #[error("the {0} header is given more than once")]
    DuplicateHeader(&'static str),
}

impl HandshakeError {
    /// HTTP status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            HandshakeError::MethodNotAllowed => 405,
            HandshakeError::NotWebSocket | HandshakeError::UnsupportedVersion => 426,
            HandshakeError::HttpVersion
            | HandshakeError::MissingConnectionUpgrade
            | HandshakeError::InvalidKey
            | HandshakeError::DuplicateHeader(_) => 400,
        }
    }

    /// Headers the error response must carry besides the standard ones.
    pub fn extra_headers(&self) -> &'static [(&'static str, &'static str)] {
        match self {
            HandshakeError::MethodNotAllowed => &[("Allow", "GET")],
            HandshakeError::NotWebSocket => {
                &[("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")]
            }
            HandshakeError::UnsupportedVersion => &[("Sec-WebSocket-Version", "13")],
            _ => &[],
        }
    }

    /// Appends the complete HTTP error response (status, extra headers, a short text body) to `out`.
    pub fn write_response(&self, out: &mut Vec<u8>) {
        let body = self.to_string();
        write_response(
            out,
            self.status(),
            "text/plain; charset=utf-8",
            body.as_bytes(),
            self.extra_headers(),
        );
    }
}

/// Checks that `head` is a valid RFC 6455 version-13 upgrade request and returns the
/// `Sec-WebSocket-Accept` value to put in the 101 response. The request path is not checked here.
pub fn validate_upgrade(head: &RequestHead) -> Result<String, HandshakeError> {
    if head.method != "GET" {
        return Err(HandshakeError::MethodNotAllowed);
    }
    if head.version != HttpVersion::Http11 {
        return Err(HandshakeError::HttpVersion);
    }
    // A header that must be single is refused when repeated: which copy counts would be a
    // guess (two keys, two versions), and a proxy in front may have guessed differently.
    for name in ["Upgrade", "Sec-WebSocket-Key", "Sec-WebSocket-Version"] {
        if head
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
            > 1
        {
            return Err(HandshakeError::DuplicateHeader(name));
        }
    }
    if !head.has_token("upgrade", "websocket") {
        return Err(HandshakeError::NotWebSocket);
    }
    if !head.has_token("connection", "upgrade") {
        return Err(HandshakeError::MissingConnectionUpgrade);
    }
    if head.header_str("sec-websocket-version") != Some("13") {
        return Err(HandshakeError::UnsupportedVersion);
    }
    let key = head
        .header_str("sec-websocket-key")
        .ok_or(HandshakeError::InvalidKey)?;
    // The key must be the base64 encoding of exactly 16 bytes (24 characters with padding).
    match BASE64.decode(key) {
        Ok(raw) if raw.len() == 16 => Ok(accept_key(key)),
        _ => Err(HandshakeError::InvalidKey),
    }
}

/// Appends the `101 Switching Protocols` response for an accepted upgrade.
pub fn write_101(out: &mut Vec<u8>, accept: &str) {
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(accept.as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
}

/// Why a client rejected the server's handshake response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientHandshakeError {
    #[error("malformed handshake response: {0}")]
    Malformed(&'static str),
    #[error("handshake response head exceeds {MAX_RESPONSE_HEAD} bytes")]
    TooLarge,
    #[error("server answered {0} instead of 101")]
    UnexpectedStatus(u16),
    #[error("response lacks `Upgrade: websocket` / `Connection: Upgrade`")]
    NotUpgraded,
    #[error("Sec-WebSocket-Accept missing or wrong")]
    BadAccept,
    #[error("server selected an extension or subprotocol that was not offered")]
    UnrequestedNegotiation,
}

/// A cheap, non-cryptographic `Sec-WebSocket-Key` (base64 of 16 bytes derived from `seed` with SplitMix64).
/// Good enough for the load-test harness and tests; the key only has to be fresh per connection.
pub fn generate_key(seed: u64) -> String {
    let mut state = seed;
    let mut raw = [0u8; 16];
    for chunk in raw.chunks_exact_mut(8) {
        chunk.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
    BASE64.encode(raw)
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Appends a client upgrade request for `path_and_query` (must start with `/`) on `host` with `key`
/// (from [`generate_key`]).
pub fn client_request(out: &mut Vec<u8>, host: &str, path_and_query: &str, key: &str) {
    for part in [
        "GET ",
        path_and_query,
        " HTTP/1.1\r\nHost: ",
        host,
        "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ",
        key,
        "\r\nSec-WebSocket-Version: 13\r\n\r\n",
    ] {
        out.extend_from_slice(part.as_bytes());
    }
}

/// Parses the server's handshake response at the start of `buf`. `Ok(None)`: incomplete, read more.
/// `Ok(Some(consumed))`: a valid 101 whose accept value equals `expected_accept` (= [`accept_key`] of the
/// key sent); bytes after `consumed` are already WebSocket frames.
pub fn parse_client_response(
    buf: &[u8],
    expected_accept: &str,
) -> Result<Option<usize>, ClientHandshakeError> {
    let window = &buf[..buf.len().min(MAX_RESPONSE_HEAD)];
    let mut slots = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut slots);
    let consumed = match resp.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_RESPONSE_HEAD => {
            return Err(ClientHandshakeError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ClientHandshakeError::Malformed("too many headers"))
        }
        Err(_) => return Err(ClientHandshakeError::Malformed("not an HTTP response head")),
    };
    let code = resp
        .code
        .ok_or(ClientHandshakeError::Malformed("missing status"))?;
    if code != 101 {
        return Err(ClientHandshakeError::UnexpectedStatus(code));
    }
    let has_token = |name: &str, token: &str| {
        resp.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .any(|h| {
                h.value
                    .split(|&b| b == b',')
                    .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
            })
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err(ClientHandshakeError::NotUpgraded);
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.trim_ascii())
    };
    if header("sec-websocket-accept") != Some(expected_accept.as_bytes()) {
        return Err(ClientHandshakeError::BadAccept);
    }
    if header("sec-websocket-extensions").is_some() || header("sec-websocket-protocol").is_some() {
        return Err(ClientHandshakeError::UnrequestedNegotiation);
    }
    Ok(Some(consumed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{parse_request, HttpLimits};

    fn head(raw: &str) -> RequestHead {
        parse_request(raw.as_bytes(), &HttpLimits::default())
            .unwrap()
            .unwrap()
            .0
    }

    const GOOD: &str = "GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://example.com\r\n\
Sec-WebSocket-Extensions: permessage-deflate\r\nSec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn rfc6455_example_accept_key() {
        // RFC 6455 §1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn valid_upgrade_yields_accept_and_101() {
        let accept = validate_upgrade(&head(GOOD)).unwrap();
        assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let mut out = Vec::new();
        write_101(&mut out, &accept);
        assert_eq!(
            out,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
        // The client side accepts exactly this response, and no extension is negotiated.
        assert_eq!(parse_client_response(&out, &accept), Ok(Some(out.len())));
    }

    #[test]
    fn repeated_single_headers_are_refused_with_400() {
        let second_key = GOOD.replace(
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-key: AAAAAAAAAAAAAAAAAAAAAA==\r\n",
        );
        let same_key_twice = GOOD.replace(
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        );
        let two_versions = GOOD.replace(
            "Sec-WebSocket-Version: 13\r\n",
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Version: 8\r\n",
        );
        let two_upgrades = GOOD.replace(
            "Upgrade: websocket\r\n",
            "Upgrade: websocket\r\nUpgrade: websocket\r\n",
        );
        for (raw, name) in [
            (second_key, "Sec-WebSocket-Key"),
            (same_key_twice, "Sec-WebSocket-Key"),
            (two_versions, "Sec-WebSocket-Version"),
            (two_upgrades, "Upgrade"),
        ] {
            let err = validate_upgrade(&head(&raw)).unwrap_err();
            assert_eq!(err, HandshakeError::DuplicateHeader(name));
            assert_eq!(err.status(), 400);
        }
        // Connection may still come as several lines.
        let two_connections = GOOD.replace(
            "Connection: Upgrade\r\n",
            "Connection: keep-alive\r\nConnection: Upgrade\r\n",
        );
        assert!(validate_upgrade(&head(&two_connections)).is_ok());
    }

    #[test]
    fn case_insensitive_tokens_and_lists() {
        let raw = GOOD
            .replace("Upgrade: websocket", "upgrade: WebSocket")
            .replace("Connection: Upgrade", "connection: keep-alive, upgrade");
        assert!(validate_upgrade(&head(&raw)).is_ok());
    }

    #[test]
    fn rejections_map_to_statuses() {
        let cases: [(String, HandshakeError, u16); 9] = [
            (
                GOOD.replace("GET", "POST"),
                HandshakeError::MethodNotAllowed,
                405,
            ),
            (
                GOOD.replace("HTTP/1.1", "HTTP/1.0"),
                HandshakeError::HttpVersion,
                400,
            ),
            (
                GOOD.replace("Upgrade: websocket\r\n", ""),
                HandshakeError::NotWebSocket,
                426,
            ),
            (
                GOOD.replace("Upgrade: websocket", "Upgrade: h2c"),
                HandshakeError::NotWebSocket,
                426,
            ),
            (
                GOOD.replace("Connection: Upgrade", "Connection: keep-alive"),
                HandshakeError::MissingConnectionUpgrade,
                400,
            ),
            (
                GOOD.replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"),
                HandshakeError::UnsupportedVersion,
                426,
            ),
            (
                GOOD.replace("Sec-WebSocket-Version: 13\r\n", ""),
                HandshakeError::UnsupportedVersion,
                426,
            ),
            (
                GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25j"),
                HandshakeError::InvalidKey,
                400,
            ),
            (
                GOOD.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
                HandshakeError::InvalidKey,
                400,
            ),
        ];
        for (raw, expected, status) in cases {
            let err = validate_upgrade(&head(&raw)).unwrap_err();
            assert_eq!(err, expected, "{raw}");
            assert_eq!(err.status(), status);
        }
    }

    #[test]
    fn version_426_response_carries_version_header() {
        let mut out = Vec::new();
        HandshakeError::UnsupportedVersion.write_response(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{text}");
        assert!(text.contains("\r\nConnection: close\r\n"), "{text}");
    }

    #[test]
    fn client_request_round_trips_through_server_validation() {
        let key = generate_key(42);
        assert_eq!(BASE64.decode(&key).unwrap().len(), 16);
        assert_ne!(key, generate_key(43));
        let mut req = Vec::new();
        client_request(&mut req, "127.0.0.1:8080", "/ws?visitor=abc", &key);
        let (h, n) = parse_request(&req, &HttpLimits::default())
            .unwrap()
            .unwrap();
        assert_eq!(n, req.len());
        assert_eq!(h.path, "/ws");
        assert_eq!(h.query.as_deref(), Some("visitor=abc"));
        let accept = validate_upgrade(&h).unwrap();
        assert_eq!(accept, accept_key(&key));

        let mut resp = Vec::new();
        write_101(&mut resp, &accept);
        resp.extend_from_slice(b"\x81\x02hi");
        for end in 0..resp.len() - 4 {
            assert_eq!(parse_client_response(&resp[..end], &accept), Ok(None));
        }
        assert_eq!(
            parse_client_response(&resp, &accept),
            Ok(Some(resp.len() - 4))
        );
        assert_eq!(
            parse_client_response(&resp, &accept_key("other")),
            Err(ClientHandshakeError::BadAccept)
        );
    }

    #[test]
    fn client_rejects_bad_responses() {
        let accept = accept_key("dGhlIHNhbXBsZSBub25jZQ==");
        let mut out = Vec::new();
        HandshakeError::InvalidKey.write_response(&mut out);
        assert_eq!(
            parse_client_response(&out, &accept),
            Err(ClientHandshakeError::UnexpectedStatus(400))
        );
        let no_upgrade =
            format!("HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: {accept}\r\n\r\n");
        assert_eq!(
            parse_client_response(no_upgrade.as_bytes(), &accept),
            Err(ClientHandshakeError::NotUpgraded)
        );
        let ext = format!(
            "HTTP/1.1 101 OK\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\
Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
        );
        assert_eq!(
            parse_client_response(ext.as_bytes(), &accept),
            Err(ClientHandshakeError::UnrequestedNegotiation)
        );
        assert!(matches!(
            parse_client_response(b"SSH-2.0-OpenSSH\r\n\r\n", &accept),
            Err(ClientHandshakeError::Malformed(_))
        ));
        let huge = vec![b'a'; MAX_RESPONSE_HEAD];
        let mut big = b"HTTP/1.1 101 OK\r\nX: ".to_vec();
        big.extend_from_slice(&huge);
        assert_eq!(
            parse_client_response(&big, &accept),
            Err(ClientHandshakeError::TooLarge)
        );
    }
}
