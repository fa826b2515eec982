//! The `[metrics] listen` endpoint: a plain-HTTP listener, apart from the shards, that serves
//! `GET /metrics` without a token (for a Prometheus server on a private network).
//!
//! It runs on its own thread (`switchboard-metrics`) with blocking sockets, so a scrape costs the
//! shards nothing but the relaxed loads of their counters; each connection is answered on a
//! short-lived thread of its own, at most [`MAX_CONNECTIONS`] at once (more are closed at
//! accept), each bounded by [`IO_TIMEOUT`] for reading its request head and writing the answer.
//!
//! Invariants: it serves `/metrics` only (`404` for any other path, `405` for another method,
//! the request head's parser and limits are the public listeners'); it never reads a body,
//! answers one request per connection and closes it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Metrics, CONTENT_TYPE};
use crate::http::{self, HttpLimits};

/// Connections answered at once; a scraper needs one.
pub const MAX_CONNECTIONS: usize = 8;
/// How long a connection may take to send its request head, and to take the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the metrics listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("cannot listen on {addr} ([metrics] listen): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the metrics listener's thread: {0}")]
    Spawn(std::io::Error),
}

/// A bound metrics listener, not serving yet.
pub struct MetricsListener {
    listener: TcpListener,
}

impl MetricsListener {
    /// Binds `addr` (port 0 picks a free port; see [`MetricsListener::local_addr`]).
    pub fn bind(addr: SocketAddr) -> Result<MetricsListener, ListenerError> {
        TcpListener::bind(addr)
            .map(|listener| MetricsListener { listener })
            .map_err(|source| ListenerError::Bind { addr, source })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves `metrics` on a thread of its own until the process exits.
    pub fn spawn(self, metrics: Metrics, limits: HttpLimits) -> Result<(), ListenerError> {
        std::thread::Builder::new()
            .name("switchboard-metrics".into())
            .spawn(move || self.serve(metrics, limits))
            .map(|_| ())
            .map_err(ListenerError::Spawn)
    }

    fn serve(self, metrics: Metrics, limits: HttpLimits) {
        let active = Arc::new(AtomicUsize::new(0));
        for stream in self.listener.incoming() {
            let stream = match stream {
                Ok(stream) => stream,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %err, "metrics listener: accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            if active.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
                active.fetch_sub(1, Ordering::Relaxed);
                continue; // dropped: closed at once
            }
            let (metrics, done) = (metrics.clone(), active.clone());
            let spawned = std::thread::Builder::new()
                .name("switchboard-scrape".into())
                .spawn(move || {
                    answer(stream, &metrics, &limits);
                    done.fetch_sub(1, Ordering::Relaxed);
                });
            if let Err(err) = spawned {
                active.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!(error = %err, "metrics listener: cannot start a connection thread");
            }
        }
    }
}

/// Reads one request head from `stream` and answers it.
fn answer(mut stream: TcpStream, metrics: &Metrics, limits: &HttpLimits) {
    let deadline = Instant::now() + IO_TIMEOUT;
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut buffer = vec![0u8; limits.max_header_bytes];
    let mut filled = 0;
    let (status, content_type, body) = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut buffer[filled..]) {
            Ok(0) | Err(_) => return,
            Ok(read) => filled += read,
        }
        match http::parse_request(&buffer[..filled], limits) {
            Ok(None) if filled < buffer.len() => continue,
            Ok(None) => {
                let err = http::HttpError::HeaderTooLarge {
                    limit: limits.max_header_bytes,
                };
                break (err.status(), "text/plain; charset=utf-8", err.to_string());
            }
            Err(err) => break (err.status(), "text/plain; charset=utf-8", err.to_string()),
            Ok(Some((head, _))) => break route(&head.method, &head.path, metrics),
        }
    };
    let mut out = Vec::with_capacity(body.len() + 256);
    http::write_response(&mut out, status, content_type, body.as_bytes(), &[]);
    let _ = stream.write_all(&out);
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// What the metrics listener answers to `method path`.
fn route(method: &str, path: &str, metrics: &Metrics) -> (u16, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    match (method, path) {
        ("GET", "/metrics") => (
            200,
            CONTENT_TYPE,
            metrics.render(crate::system::resident_bytes()),
        ),
        (_, "/metrics") => (405, TEXT, "only GET is served here".into()),
        _ => (
            404,
            TEXT,
            "no such endpoint: this listener serves /metrics only".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(addr: SocketAddr, text: &str) -> String {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(text.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    #[test]
    fn serves_metrics_only() {
        let metrics = Metrics::new(1);
        super::super::ShardMetrics::add(&metrics.shard(0).messages_received, 7);
        let listener = MetricsListener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = HttpLimits {
            max_header_bytes: 8192,
            max_headers: 32,
        };
        listener.spawn(metrics, limits).unwrap();
        let ok = request(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 "), "{ok}");
        assert!(
            ok.contains(&format!("Content-Type: {CONTENT_TYPE}\r\n")),
            "{ok}"
        );
        assert!(
            ok.contains("\nswitchboard_messages_received{shard=\"all\"} 7\n"),
            "{ok}"
        );
        let other = request(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(other.starts_with("HTTP/1.1 404 "), "{other}");
        let post = request(addr, "POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        let garbage = request(addr, "GARBAGE\r\n\r\n");
        assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");
    }
}
