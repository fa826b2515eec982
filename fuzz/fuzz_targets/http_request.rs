//! Fuzzes the request-head parser (and, on the same bytes, the client-side handshake response parser).
//!
//! Byte 0 selects the limits; the rest is the request. Invariants besides "never panics": results respect
//! the limits, `consumed` is within the input and the head limit, a complete head parses identically from
//! exactly `consumed` bytes, errors map to 400/431, and the derived helpers (header lookup, tokens, query
//! decoding, upgrade validation, response writing) accept whatever the parser produced.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::http::{parse_request, query_param, write_response, HttpLimits};
use switchboard::ws::handshake::{accept_key, parse_client_response, validate_upgrade};

fuzz_target!(|data: &[u8]| {
    let Some((&config, request)) = data.split_first() else {
        return;
    };
    let limits = HttpLimits {
        max_header_bytes: [64usize, 512, 8192][usize::from(config & 3) % 3],
        max_headers: [0usize, 4, 32, 100][usize::from(config >> 2) & 3],
    };
    match parse_request(request, &limits) {
        Ok(None) => assert!(request.len() < limits.max_header_bytes),
        Ok(Some((head, consumed))) => {
            assert!(consumed <= request.len() && consumed <= limits.max_header_bytes);
            assert!(head.headers.len() <= limits.max_headers);
            assert!(head.path.starts_with('/'));
            assert!(!head.path.contains('?'));
            let again = parse_request(&request[..consumed], &limits);
            assert_eq!(again, Ok(Some((head.clone(), consumed))));
            for (name, _) in &head.headers {
                assert!(head.header(name).is_some());
                let _ = head.header_str(name);
                let _ = head.has_token(name, "upgrade");
            }
            if let Some(q) = &head.query {
                for name in ["a", "room", ""] {
                    if let Some(v) = query_param(q, name) {
                        assert!(v.len() <= q.len());
                    }
                }
            }
            match validate_upgrade(&head) {
                Ok(accept) => assert_eq!(accept.len(), 28),
                Err(e) => {
                    let mut out = Vec::new();
                    e.write_response(&mut out);
                    assert!(out.starts_with(b"HTTP/1.1 4"));
                }
            }
            let mut out = Vec::new();
            write_response(&mut out, 200, "text/plain", head.path.as_bytes(), &[]);
            assert!(out.ends_with(head.path.as_bytes()));
        }
        Err(e) => assert!(matches!(e.status(), 400 | 431)),
    }
    let accept = accept_key("dGhlIHNhbXBsZSBub25jZQ==");
    if let Ok(Some(consumed)) = parse_client_response(request, &accept) {
        assert!(consumed <= request.len());
    }
});
