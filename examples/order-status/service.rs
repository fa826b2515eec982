//! The sample's order service: a tiny HTTP server on loopback standing in for a shop's order
//! system. `GET /orders/NUMBER` answers `200` with the order as JSON, or `404` for an
//! unknown number. One thread, one request per connection; enough for a demo.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// The orders the service knows: number, status, carrier, expected or actual date.
const ORDERS: &[(&str, &str, &str, &str)] = &[
    ("12345", "shipped", "DHL", "2026-12-04"),
    ("20240", "processing", "", "2026-12-08"),
    ("77777", "delivered", "SF Express", "2026-11-28"),
];

/// Starts the service on `listen` (port 0 picks a free one) and returns its address.
pub fn start(listen: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(listen)?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("order-service".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                // A stuck client must not stop the service.
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = answer(stream);
            }
        })?;
    Ok(addr)
}

fn answer(stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Skip the headers.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    let number = path.strip_prefix("/orders/").unwrap_or("");
    let (status, body) = match ORDERS.iter().find(|(n, ..)| *n == number) {
        Some((number, status, carrier, date)) => (
            "200 OK",
            serde_json::json!({
                "order": number, "status": status, "carrier": carrier, "date": date,
            })
            .to_string(),
        ),
        None => (
            "404 Not Found",
            serde_json::json!({"error": "no such order"}).to_string(),
        ),
    };
    let mut stream = reader.into_inner();
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}
