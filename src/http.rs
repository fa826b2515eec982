//! Bounded, sans-IO parser for HTTP/1.1 request heads and a writer for simple responses.
//!
//! switchboard only serves a handful of GET endpoints (the WebSocket upgrade, health and metrics), so this
//! module parses exactly one request head per connection and never reads a body. The driver feeds the bytes
//! it has read so far to [`parse_request`]; the parser either asks for more bytes, returns the parsed head
//! together with the number of bytes it consumed (anything after that belongs to the next protocol, e.g.
//! WebSocket frames sent eagerly after the upgrade request), or returns a typed [`HttpError`] that maps to
//! the status code the driver answers with before closing.
//!
//! Invariants and choices:
//! - A head larger than [`HttpLimits::max_header_bytes`] (measured up to and including the blank line) is
//!   rejected with 431, whether it is complete or still partial, so a peer can never make the driver buffer
//!   more than that many bytes.
//! - More than [`HttpLimits::max_headers`] header lines: 431.
//! - Requests announcing a body (`Content-Length` other than 0, or any `Transfer-Encoding`) are rejected with
//!   400 [`HttpError::BodyNotAllowed`], except a `Content-Length` body on the JSON API (paths under
//!   [`API_PREFIX`]), which the driver reads, bounded, after the head ([`RequestHead::content_length`]).
//!   Elsewhere silently skipping a body would make the following bytes ambiguous (they would be read as
//!   WebSocket frames). An unparsable or conflicting `Content-Length` is a 400 as well.
//! - Only origin-form request targets (`/path?query`) are accepted; absolute-form and `*` get a 400.
//! - HTTP/1.0 and HTTP/1.1 heads both parse; deciding which endpoints need 1.1 is up to the caller (the
//!   WebSocket handshake rejects 1.0).
//! - A missing `Host` header is tolerated (RFC 9112 says a server MUST reject it, but the endpoints do not
//!   use it and health probes often omit it).
//! - Every response written by [`write_response`] carries `Content-Length` and `Connection: close`: the server
//!   closes the connection after any plain HTTP response.

use std::borrow::Cow;
use std::io::Write as _;

/// Paths under this prefix may carry a `Content-Length` body (the JSON API).
pub const API_PREFIX: &str = "/api/";

/// Limits applied while parsing a request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Maximum size of the request line plus all header lines plus the terminating blank line.
    pub max_header_bytes: usize,
    /// Maximum number of header lines.
    pub max_headers: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_header_bytes: 8 * 1024,
            max_headers: 32,
        }
    }
}

/// Why a request head was rejected. [`HttpError::status`] gives the response status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("request head exceeds {limit} bytes")]
    HeaderTooLarge { limit: usize },
    #[error("request has more than {limit} header lines")]
    TooManyHeaders { limit: usize },
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("request body not allowed on this endpoint")]
    BodyNotAllowed,
}

impl HttpError {
    /// HTTP status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeaderTooLarge { .. } | HttpError::TooManyHeaders { .. } => 431,
            HttpError::Malformed(_) | HttpError::BodyNotAllowed => 400,
        }
    }
}

/// HTTP protocol version of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http10,
    Http11,
}

/// A parsed request head. Header names keep the case the client sent; lookups are case-insensitive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The request target up to (not including) `?`, not percent-decoded.
    pub path: String,
    /// The raw query string after `?` (not decoded; see [`query_param`]). `None` when there is no `?`.
    pub query: Option<String>,
    pub version: HttpVersion,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The `Content-Length` header's value, if any (above 0 only under [`API_PREFIX`]).
    pub content_length: Option<u64>,
}

impl RequestHead {
    /// Value of the first header called `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Like [`RequestHead::header`] but only if the value is valid UTF-8; surrounding whitespace trimmed.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(|s| s.trim_matches(|c| c == ' ' || c == '\t'))
    }

    /// True if any header called `name` holds `token` in its comma-separated list (both compared
    /// ASCII case-insensitively, optional whitespace around list items ignored). Used for `Connection`
    /// and `Upgrade`, which clients may send as several lines or as lists like `keep-alive, Upgrade`.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .any(|(_, v)| {
                v.split(|&b| b == b',')
                    .any(|item| trim_ows(item).eq_ignore_ascii_case(token.as_bytes()))
            })
    }
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Header slots kept on the stack; larger `max_headers` values fall back to one heap allocation per parse.
const STACK_HEADER_SLOTS: usize = 64;

/// Parses one request head from the start of `buf`.
///
/// Returns `Ok(None)` when `buf` holds an incomplete head that is still within the limits (read more and call
/// again with the whole buffer), `Ok(Some((head, consumed)))` when complete, where `consumed` is the length of
/// the head including the blank line, or an error (answer with [`HttpError::status`] and close).
pub fn parse_request(
    buf: &[u8],
    limits: &HttpLimits,
) -> Result<Option<(RequestHead, usize)>, HttpError> {
    // Only ever look at max_header_bytes: anything beyond cannot be part of an acceptable head.
    let window = &buf[..buf.len().min(limits.max_header_bytes)];
    let mut stack_slots = [httparse::EMPTY_HEADER; STACK_HEADER_SLOTS];
    let mut heap_slots;
    let slots: &mut [httparse::Header<'_>] = if limits.max_headers <= STACK_HEADER_SLOTS {
        &mut stack_slots[..limits.max_headers]
    } else {
        heap_slots = vec![httparse::EMPTY_HEADER; limits.max_headers];
        &mut heap_slots
    };
    let mut req = httparse::Request::new(slots);
    let consumed = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= limits.max_header_bytes {
                Err(HttpError::HeaderTooLarge {
                    limit: limits.max_header_bytes,
                })
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::TooManyHeaders {
                limit: limits.max_headers,
            })
        }
        Err(e) => return Err(HttpError::Malformed(parse_error_text(e))),
    };

    let method = req.method.ok_or(HttpError::Malformed("missing method"))?;
    let target = req
        .path
        .ok_or(HttpError::Malformed("missing request target"))?;
    let version = match req.version {
        Some(0) => HttpVersion::Http10,
        Some(1) => HttpVersion::Http11,
        _ => return Err(HttpError::Malformed("unsupported HTTP version")),
    };
    if !target.starts_with('/') {
        return Err(HttpError::Malformed(
            "request target must be a path starting with '/'",
        ));
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (target, None),
    };

    let mut content_length: Option<u64> = None;
    let mut headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::BodyNotAllowed);
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = parse_content_length(h.value)?;
            if content_length.is_some_and(|prev| prev != n) {
                return Err(HttpError::Malformed("conflicting Content-Length headers"));
            }
            content_length = Some(n);
        }
        headers.push((h.name.to_owned(), h.value.to_vec()));
    }
    if content_length.is_some_and(|n| n > 0) && !path.starts_with(API_PREFIX) {
        return Err(HttpError::BodyNotAllowed);
    }

    let head = RequestHead {
        method: method.to_owned(),
        path: path.to_owned(),
        query,
        version,
        headers,
        content_length,
    };
    Ok(Some((head, consumed)))
}

fn parse_content_length(value: &[u8]) -> Result<u64, HttpError> {
    let digits = trim_ows(value);
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(HttpError::Malformed("invalid Content-Length"));
    }
    Ok(digits
        .iter()
        .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0')))
}

fn parse_error_text(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token in request line",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "invalid HTTP version",
    }
}

/// The (decoded) name of the first parameter that appears more than once in a raw query string,
/// if any. Requests with a repeated parameter are refused as a whole: with `token=x&token=y`
/// any choice of value (first wins, last wins) is a guess a proxy or client library may make
/// differently. An undecodable name counts under its raw form.
pub fn repeated_query_param(query: &str) -> Option<Cow<'_, str>> {
    let names: Vec<Cow<'_, str>> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let raw = pair.split_once('=').map_or(pair, |(name, _)| name);
            percent_decode(raw).unwrap_or(Cow::Borrowed(raw))
        })
        .collect();
    names
        .iter()
        .enumerate()
        .find(|(i, name)| names[..*i].contains(name))
        .map(|(_, name)| name.clone())
}

/// Finds the first parameter called `name` in a raw query string (`a=1&b=x+y`) and returns its value,
/// percent-decoded with `+` meaning space. Parameter names are compared after decoding. A parameter without
/// `=` has the empty value.
///
/// Returns `None` when the parameter is absent **or** when its value is not decodable (a `%` not followed by
/// two hex digits, or bytes that are not UTF-8): callers treat both as "no usable value". Borrows from
/// `query` when the value needs no decoding.
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<Cow<'a, str>> {
    for pair in query.split('&') {
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        match percent_decode(raw_name) {
            Some(n) if n == name => return percent_decode(raw_value),
            _ => continue,
        }
    }
    None
}

fn percent_decode(s: &str) -> Option<Cow<'_, str>> {
    decode(s, true)
}

/// A path segment percent-decoded (`+` stays `+`); `None` when a `%` is not followed by two hex
/// digits or the bytes are not UTF-8.
pub fn decode_path_segment(s: &str) -> Option<Cow<'_, str>> {
    decode(s, false)
}

fn decode(s: &str, plus_is_space: bool) -> Option<Cow<'_, str>> {
    if !s.bytes().any(|b| b == b'%' || (plus_is_space && b == b'+')) {
        return Some(Cow::Borrowed(s));
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' if plus_is_space => out.push(b' '),
            b'%' => {
                let hi = hex_value(*bytes.get(i + 1)?)?;
                let lo = hex_value(*bytes.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Standard reason phrase for the status codes switchboard sends.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        423 => "Locked",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Appends a complete HTTP/1.1 response to `out`: status line, `Content-Type` (omitted when empty),
/// `Content-Length`, `Connection: close`, the `extra_headers`, a blank line and `body`.
/// Header names and values must not contain CR or LF (they are written verbatim).
pub fn write_response(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &str,
    body: &[u8],
    extra_headers: &[(&str, &str)],
) {
    debug_assert!(extra_headers
        .iter()
        .all(|(n, v)| !n.contains(['\r', '\n']) && !v.contains(['\r', '\n'])));
    // Writing into a Vec cannot fail.
    let _ = write!(out, "HTTP/1.1 {} {}\r\n", status, reason_phrase(status));
    if !content_type.is_empty() {
        let _ = write!(out, "Content-Type: {content_type}\r\n");
    }
    let _ = write!(
        out,
        "Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in extra_headers {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_query_parameters_are_found_after_decoding() {
        assert_eq!(repeated_query_param(""), None);
        assert_eq!(repeated_query_param("a=1&b=2&c"), None);
        assert_eq!(repeated_query_param("a=1&&b=2"), None);
        assert_eq!(
            repeated_query_param("token=x&token=good").as_deref(),
            Some("token")
        );
        assert_eq!(
            repeated_query_param("token=good&token=x").as_deref(),
            Some("token")
        );
        assert_eq!(
            repeated_query_param("site=a&x=1&site").as_deref(),
            Some("site")
        );
        // `%74oken` is `token` once decoded.
        assert_eq!(
            repeated_query_param("token=a&%74oken=b").as_deref(),
            Some("token")
        );
    }

    fn limits() -> HttpLimits {
        HttpLimits {
            max_header_bytes: 1024,
            max_headers: 8,
        }
    }

    const UPGRADE: &[u8] = b"GET /ws?room=a%20b&x=1 HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n\
Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn parses_complete_head_and_reports_consumed() {
        let mut buf = UPGRADE.to_vec();
        buf.extend_from_slice(b"\x81\x85trailing-frame-bytes");
        let (head, consumed) = parse_request(&buf, &limits()).unwrap().unwrap();
        assert_eq!(consumed, UPGRADE.len());
        assert_eq!(head.method, "GET");
        assert_eq!(head.path, "/ws");
        assert_eq!(head.query.as_deref(), Some("room=a%20b&x=1"));
        assert_eq!(head.version, HttpVersion::Http11);
        assert_eq!(head.headers.len(), 5);
        assert_eq!(head.header("HOST"), Some(&b"example.com"[..]));
        assert_eq!(head.header_str("sec-websocket-version"), Some("13"));
        assert!(head.has_token("connection", "upgrade"));
        assert!(head.has_token("Connection", "KEEP-ALIVE"));
        assert!(!head.has_token("Connection", "close"));
        assert!(head.has_token("upgrade", "WebSocket"));
        assert_eq!(head.header("missing"), None);
    }

    #[test]
    fn every_strict_prefix_needs_more_bytes() {
        for end in 0..UPGRADE.len() {
            assert_eq!(
                parse_request(&UPGRADE[..end], &limits()),
                Ok(None),
                "prefix {end}"
            );
        }
    }

    #[test]
    fn tokens_across_multiple_header_lines() {
        let req =
            b"GET / HTTP/1.1\r\nConnection: keep-alive\r\nConnection:\tfoo ,  upgrade \r\n\r\n";
        let (head, _) = parse_request(req, &limits()).unwrap().unwrap();
        assert!(head.has_token("connection", "Upgrade"));
        assert!(!head.has_token("connection", "upgrad"));
    }

    #[test]
    fn http10_parses() {
        let (head, n) = parse_request(b"GET /healthz HTTP/1.0\r\n\r\n", &limits())
            .unwrap()
            .unwrap();
        assert_eq!(n, 25);
        assert_eq!(head.version, HttpVersion::Http10);
        assert_eq!(head.path, "/healthz");
        assert_eq!(head.query, None);
    }

    #[test]
    fn oversized_partial_head_is_431() {
        let lim = HttpLimits {
            max_header_bytes: 64,
            max_headers: 8,
        };
        let mut buf = b"GET / HTTP/1.1\r\nX-Long: ".to_vec();
        buf.resize(63, b'a');
        assert_eq!(parse_request(&buf, &lim), Ok(None));
        buf.push(b'a');
        let err = parse_request(&buf, &lim).unwrap_err();
        assert_eq!(err, HttpError::HeaderTooLarge { limit: 64 });
        assert_eq!(err.status(), 431);
    }

    #[test]
    fn oversized_complete_head_is_431() {
        let lim = HttpLimits {
            max_header_bytes: 20,
            max_headers: 8,
        };
        let req = b"GET / HTTP/1.1\r\nHost: abcdef\r\n\r\n";
        assert_eq!(
            parse_request(req, &lim).unwrap_err(),
            HttpError::HeaderTooLarge { limit: 20 }
        );
        // Exactly at the limit is fine.
        let lim = HttpLimits {
            max_header_bytes: req.len(),
            max_headers: 8,
        };
        assert!(parse_request(req, &lim).unwrap().is_some());
    }

    #[test]
    fn too_many_headers_is_431() {
        let lim = HttpLimits {
            max_header_bytes: 4096,
            max_headers: 3,
        };
        let ok = b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\n\r\n";
        assert!(parse_request(ok, &lim).unwrap().is_some());
        let bad = b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\nd: 4\r\n\r\n";
        let err = parse_request(bad, &lim).unwrap_err();
        assert_eq!(err, HttpError::TooManyHeaders { limit: 3 });
        assert_eq!(err.status(), 431);
        // Detected before the head is complete.
        assert!(parse_request(&bad[..bad.len() - 2], &lim).is_err());
    }

    #[test]
    fn many_headers_beyond_stack_slots() {
        let lim = HttpLimits {
            max_header_bytes: 1 << 16,
            max_headers: 100,
        };
        let mut req = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..100 {
            req.extend_from_slice(format!("h{i}: {i}\r\n").as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        let (head, n) = parse_request(&req, &lim).unwrap().unwrap();
        assert_eq!(n, req.len());
        assert_eq!(head.header_str("H99"), Some("99"));
    }

    #[test]
    fn malformed_is_400() {
        for bad in [
            &b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n"[..],
            b"GET / HTTP/2.0\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",
            b"\x00\x01\x02\x03\r\n\r\n",
            b"GET http://example.com/ HTTP/1.1\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 1\r\n\r\n",
        ] {
            let err = parse_request(bad, &limits()).expect_err(&String::from_utf8_lossy(bad));
            assert!(matches!(err, HttpError::Malformed(_)), "{err:?}");
            assert_eq!(err.status(), 400);
        }
    }

    #[test]
    fn bodies_are_rejected() {
        for req in [
            &b"GET / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let err = parse_request(req, &limits()).unwrap_err();
            assert_eq!(err, HttpError::BodyNotAllowed);
            assert_eq!(err.status(), 400);
        }
        // An explicit empty body is fine.
        let req = b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
        assert!(parse_request(req, &limits()).unwrap().is_some());
        // The JSON API takes a Content-Length body (read by the driver), never a chunked one.
        let req = b"POST /api/login HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        let (head, consumed) = parse_request(req, &limits()).unwrap().unwrap();
        assert_eq!((head.content_length, consumed), (Some(5), req.len() - 5));
        let req = b"POST /api/login HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(
            parse_request(req, &limits()).unwrap_err(),
            HttpError::BodyNotAllowed
        );
        let req = b"POST /ws/agent HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(
            parse_request(req, &limits()).unwrap_err(),
            HttpError::BodyNotAllowed
        );
    }

    #[test]
    fn query_decoding() {
        let q = "room=a%20b&name=J%C3%BCrgen+M&flag&empty=&bad=%zz&trunc=%4&x%3Dy=1&room=second";
        assert_eq!(query_param(q, "room").as_deref(), Some("a b"));
        assert_eq!(query_param(q, "name").as_deref(), Some("Jürgen M"));
        assert_eq!(query_param(q, "flag").as_deref(), Some(""));
        assert_eq!(query_param(q, "empty").as_deref(), Some(""));
        assert_eq!(query_param(q, "bad"), None);
        assert_eq!(query_param(q, "trunc"), None);
        assert_eq!(query_param(q, "x=y").as_deref(), Some("1"));
        assert_eq!(query_param(q, "missing"), None);
        assert_eq!(query_param("a=%FF", "a"), None, "not UTF-8");
        assert!(matches!(
            query_param("a=plain", "a"),
            Some(Cow::Borrowed("plain"))
        ));
        assert_eq!(query_param("", "a"), None);
    }

    #[test]
    fn response_format() {
        let mut out = Vec::new();
        write_response(
            &mut out,
            426,
            "text/plain",
            b"upgrade",
            &[("Sec-WebSocket-Version", "13")],
        );
        assert_eq!(
            out,
            b"HTTP/1.1 426 Upgrade Required\r\nContent-Type: text/plain\r\nContent-Length: 7\r\n\
Connection: close\r\nSec-WebSocket-Version: 13\r\n\r\nupgrade"
        );
        out.clear();
        write_response(&mut out, 599, "", b"", &[]);
        assert_eq!(
            out,
            b"HTTP/1.1 599 Unknown\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        // Every status the server sends has its phrase (a 401 used to go out as "401 Unknown").
        for s in [
            101, 200, 400, 401, 403, 404, 405, 408, 413, 415, 426, 429, 431, 500, 503,
        ] {
            assert_ne!(reason_phrase(s), "Unknown", "{s}");
        }
        assert_eq!(reason_phrase(401), "Unauthorized");
    }
}
