//! The embedded web assets through the real binary: stable URLs, hashed assets,
//! content encodings, cache headers and revalidation. (The pages themselves are
//! tested in headless Chromium by `scripts/e2e`.)

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

/// Sends a GET with `headers` and returns the status line's code, the headers
/// (lower-cased names) and the raw body bytes.
fn get(server: &Server, path: &str, headers: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut stream = TcpStream::connect(server.addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\n{headers}\r\n").unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, response[split + 4..].to_vec())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn widget_pages_and_hashed_assets_are_served_with_the_right_headers() {
    let server = Server::start("");

    // The widget at its stable URL: short cache, ETag, encodings by Accept-Encoding.
    let (status, headers, identity) = get(&server, "/widget.js", "");
    assert_eq!(status, 200);
    assert_eq!(
        header(&headers, "content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(
        header(&headers, "cache-control"),
        Some("public, max-age=300")
    );
    assert_eq!(header(&headers, "vary"), Some("Accept-Encoding"));
    assert_eq!(header(&headers, "content-encoding"), None);
    assert!(String::from_utf8_lossy(&identity).contains("/ws/visitor"));
    let etag = header(&headers, "etag").expect("an ETag").to_string();

    let (_, headers, gzip) = get(&server, "/widget.js", "Accept-Encoding: gzip\r\n");
    assert_eq!(header(&headers, "content-encoding"), Some("gzip"));
    assert_eq!(gzip[..2], [0x1f, 0x8b]);
    assert!(gzip.len() < identity.len());
    let (_, headers, brotli) = get(&server, "/widget.js", "Accept-Encoding: gzip, br\r\n");
    assert_eq!(header(&headers, "content-encoding"), Some("br"));
    assert!(brotli.len() < gzip.len());
    let (_, headers, _) = get(&server, "/widget.js", "Accept-Encoding: br;q=0, gzip\r\n");
    assert_eq!(header(&headers, "content-encoding"), Some("gzip"));

    // Revalidation: the same ETag gives 304 without a body.
    let (status, _, body) = get(&server, "/widget.js", &format!("If-None-Match: {etag}\r\n"));
    assert_eq!(status, 304);
    assert!(body.is_empty());

    // Pages revalidate every time and link hashed assets, which are immutable.
    for page in ["/console", "/admin", "/demo"] {
        let (status, headers, body) = get(&server, page, "");
        assert_eq!(status, 200, "{page}");
        assert_eq!(
            header(&headers, "cache-control"),
            Some("no-cache"),
            "{page}"
        );
        assert_eq!(
            header(&headers, "content-type"),
            Some("text/html; charset=utf-8")
        );
        let html = String::from_utf8(body).unwrap();
        for link in html.split("\"/assets/").skip(1) {
            let file = link.split('"').next().unwrap();
            let (status, headers, _) = get(
                &server,
                &format!("/assets/{file}"),
                "Accept-Encoding: br\r\n",
            );
            assert_eq!(status, 200, "{file}");
            assert_eq!(
                header(&headers, "cache-control"),
                Some("public, max-age=31536000, immutable")
            );
        }
    }
    let (status, _, _) = get(&server, "/assets/widget-0000000000000000.js", "");
    assert_eq!(status, 404);

    // Only GET.
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream
        .write_all(b"DELETE /widget.js HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
}
