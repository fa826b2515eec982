//! The HTTP + WebSocket gateway, driven through the real binary on loopback.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn health_ready_metrics_and_unknown_paths() {
    let server = Server::start("");
    assert_eq!(http_get(server.addr, "/healthz"), (200, "ok\n".into()));
    assert_eq!(http_get(server.addr, "/readyz"), (200, "ready\n".into()));
    // The base overlay serves the metrics on their own listener (tests/metrics.rs covers the
    // token on the public one): not here, there.
    assert_eq!(http_get(server.addr, "/metrics").0, 404);
    assert!(server.scrape().contains("switchboard_connections_accepted"));
    assert_eq!(http_get(server.addr, "/nope").0, 404);
    let (status, _) = http_raw(
        server.addr,
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(status, 405);
}

#[test]
fn echo_endpoint_is_off_unless_enabled() {
    let server = Server::start("[diagnostics]\necho = false\n[server]\nlisten = \"127.0.0.1:0\"\n");
    let err = RawClient::connect(server.addr, "/ws/echo")
        .err()
        .expect("404");
    assert_eq!(err.0, 404);
}

#[test]
fn malformed_and_oversized_requests() {
    let server = Server::start("[http]\nmax_header_bytes = 2048\nmax_headers = 16\n");
    assert_eq!(http_raw(server.addr, b"GARBAGE\r\n\r\n").0, 400);
    assert_eq!(
        http_raw(server.addr, b"GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n").0,
        400
    );
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(4096)
    );
    assert_eq!(http_raw(server.addr, big.as_bytes()).0, 431);
    let many: String = (0..40).map(|i| format!("X-H{i}: v\r\n")).collect();
    let request = format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    assert_eq!(http_raw(server.addr, request.as_bytes()).0, 431);
    // A plain GET on a WebSocket path is refused with an upgrade hint.
    let (status, _) = http_get(server.addr, "/ws/echo");
    assert!(status == 400 || status == 426, "got {status}");
    // The server is still fine afterwards.
    assert_eq!(http_get(server.addr, "/healthz").0, 200);
}

#[test]
fn handshake_timeout_stops_slowloris() {
    let server = Server::start("[http]\nhandshake_timeout = \"1s\"\n");
    let mut stream = TcpStream::connect(server.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    use std::io::{Read, Write};
    let started = Instant::now();
    // Dribble a header one byte every 300 ms: each read is quick, the whole is not.
    let mut response = Vec::new();
    for byte in b"GET /healthz HTTP/1.1\r\nHost: slow".iter() {
        if stream.write_all(&[*byte]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
        if started.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    let _ = stream.read_to_end(&mut response);
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&response);
    // Only the server's timer can produce a 408 here: the head never completes.
    assert!(text.starts_with("HTTP/1.1 408"), "got {text:?}");
    assert!(
        elapsed < Duration::from_secs(10),
        "closed after {elapsed:?}"
    );
}

#[test]
fn echo_text_binary_and_close_handshake() {
    let server = Server::start("");
    let mut client = RawClient::connect(server.addr, "/ws/echo").unwrap();
    client.send_text("hello, switchboard");
    let frame = client.read_message().unwrap();
    assert_eq!((frame.opcode, frame.text()), (TEXT, "hello, switchboard"));
    let payload: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    client.send_frame(true, BINARY, &payload[..60_000], true);
    let frame = client.read_message().unwrap();
    assert_eq!(frame.opcode, BINARY);
    assert_eq!(frame.payload, &payload[..60_000]);
    client.send_close(1000, "bye");
    assert_eq!(client.expect_close(), 1000);
    assert!(client.is_closed_by_server());
}

#[test]
fn echo_through_an_independent_client_library() {
    let server = Server::start("");
    let (mut socket, _) =
        tungstenite::client::connect(format!("ws://{}/ws/echo", server.addr)).unwrap();
    for i in 0..100 {
        let text = format!("message {i} {}", "é".repeat(i));
        socket
            .send(tungstenite::Message::text(text.clone()))
            .unwrap();
        let reply = socket.read().unwrap();
        assert_eq!(reply.into_text().unwrap().as_str(), text);
    }
    socket.close(None).unwrap();
}

#[test]
fn fragmented_message_with_interleaved_ping() {
    let server = Server::start("");
    let mut client = RawClient::connect(server.addr, "/ws/echo").unwrap();
    client.send_frame(false, TEXT, b"frag", true);
    client.send_frame(true, PING, b"are you there", true);
    client.send_frame(false, 0, b"men", true);
    client.send_frame(true, 0, b"ted", true);
    let pong = client.read_frame().unwrap();
    assert_eq!(
        (pong.opcode, pong.payload.as_slice()),
        (PONG, &b"are you there"[..])
    );
    let frame = client.read_frame().unwrap();
    assert_eq!((frame.opcode, frame.text()), (TEXT, "fragmented"));
}

#[test]
fn oversize_message_closes_with_1009() {
    let server = Server::start(
        "[websocket]\nmax_message_bytes = 1024\n[conversations]\nmax_text_bytes = 1000\n",
    );
    let mut client = RawClient::connect(server.addr, "/ws/echo").unwrap();
    client.send_frame(true, TEXT, &vec![b'a'; 1000], true);
    assert_eq!(client.read_message().unwrap().payload.len(), 1000);
    client.send_frame(true, TEXT, &vec![b'a'; 2000], true);
    assert_eq!(client.expect_close(), 1009);

    // The sum of fragments counts too.
    let mut client = RawClient::connect(server.addr, "/ws/echo").unwrap();
    client.send_frame(false, TEXT, &vec![b'a'; 800], true);
    client.send_frame(true, 0, &vec![b'a'; 800], true);
    assert_eq!(client.expect_close(), 1009);
}

#[test]
fn unmasked_client_frame_closes_with_1002() {
    let server = Server::start("");
    let mut client = RawClient::connect(server.addr, "/ws/echo").unwrap();
    client.send_frame(true, TEXT, b"not masked", false);
    assert_eq!(client.expect_close(), 1002);
}

#[test]
fn invalid_utf8_closes_with_1007() {
    let server = Server::start("");
    let mut client = RawClient::connect(server.addr, "/ws/echo").unwrap();
    client.send_frame(true, TEXT, &[0x68, 0x69, 0xff, 0xfe], true);
    assert_eq!(client.expect_close(), 1007);

    // Split across fragments: valid start of a code point, invalid end.
    let mut client = RawClient::connect(server.addr, "/ws/echo").unwrap();
    client.send_frame(false, TEXT, &[0x61, 0xe2, 0x82], true);
    client.send_frame(true, 0, &[0x28], true);
    assert_eq!(client.expect_close(), 1007);
}

#[test]
fn reserved_opcode_and_bad_close_code_close_with_1002() {
    let server = Server::start("");
    let mut client = RawClient::connect(server.addr, "/ws/echo").unwrap();
    client.send_frame(true, 3, b"", true);
    assert_eq!(client.expect_close(), 1002);
    let mut client = RawClient::connect(server.addr, "/ws/echo").unwrap();
    client.send_close(1005, "");
    assert_eq!(client.expect_close(), 1002);
}

#[test]
fn server_pings_and_closes_silent_sessions() {
    let server = Server::start("[websocket]\nping_interval = \"1s\"\nidle_timeout = \"3s\"\n");
    let mut client = RawClient::connect(server.addr, "/ws/echo").unwrap();
    client.set_read_timeout(Duration::from_secs(6));
    let started = Instant::now();
    let ping = client.read_frame().unwrap();
    assert_eq!(ping.opcode, PING, "a quiet session gets a ping");
    // Never answer: the session must be closed after the idle timeout.
    assert_eq!(client.expect_close(), 1001);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(2),
        "closed too early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(6),
        "closed too late: {elapsed:?}"
    );

    // A client that answers pings stays open past the idle timeout.
    let mut client = RawClient::connect(server.addr, "/ws/echo").unwrap();
    client.set_read_timeout(Duration::from_millis(500));
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if let Some(frame) = client.read_frame() {
            assert_eq!(frame.opcode, PING, "only pings while idle: {frame:?}");
            client.send_frame(true, PONG, &frame.payload, true);
        }
    }
    client.set_read_timeout(Duration::from_secs(5));
    client.send_text("still here");
    assert_eq!(client.read_message().unwrap().text(), "still here");
}

#[test]
fn visitor_and_agent_hello() {
    let server = Server::start(
        "[agents]\ndev_static_tokens = true\n[agents.accounts.alice]\ntoken = \"alice-secret-token\"\nname = \"Alice\"\n",
    );
    let mut visitor = RawClient::connect(server.addr, "/ws/visitor?site=acme").unwrap();
    let hello = visitor.read_json();
    assert_eq!(hello["type"], "hello");
    let visitor_id = hello["visitor"].as_str().unwrap().to_string();
    assert!(!visitor_id.is_empty());
    let secret = hello["secret"].as_str().unwrap().to_string();

    // Another tab of the same visitor presents its secret...
    let mut again = RawClient::connect(
        server.addr,
        &format!("/ws/visitor?site=acme&visitor={visitor_id}&secret={secret}"),
    )
    .unwrap();
    assert_eq!(again.read_json()["visitor"], visitor_id.as_str());
    // ...without it, the id is not given out.
    let mut stranger = RawClient::connect(
        server.addr,
        &format!("/ws/visitor?site=acme&visitor={visitor_id}"),
    )
    .unwrap();
    assert_ne!(stranger.read_json()["visitor"], visitor_id.as_str());

    assert_eq!(
        RawClient::connect(server.addr, "/ws/visitor")
            .err()
            .unwrap()
            .0,
        400,
        "site is required"
    );
    assert_eq!(
        RawClient::connect(server.addr, "/ws/agent?token=wrong")
            .err()
            .unwrap()
            .0,
        401
    );
    let mut agent = RawClient::connect(server.addr, "/ws/agent?token=alice-secret-token").unwrap();
    let hello = agent.read_json();
    assert_eq!(hello["type"], "hello");
    assert_eq!(hello["agent"], "Alice");
}

#[test]
fn bad_json_gets_an_error_frame_and_the_session_stays_open() {
    let server = Server::start("");
    let mut visitor = RawClient::connect(server.addr, "/ws/visitor?site=acme").unwrap();
    visitor.read_json();
    visitor.send_text("{not json");
    let error = visitor.read_json();
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "malformed_json");
    visitor.send_text("{\"no\":\"type\"}");
    assert_eq!(visitor.read_json()["code"], "missing_type");
}

#[test]
fn graceful_shutdown_closes_sessions_with_1001() {
    let mut server = Server::start("");
    let mut clients: Vec<RawClient> = (0..20)
        .map(|_| RawClient::connect(server.addr, "/ws/echo").unwrap())
        .collect();
    for client in &mut clients {
        client.send_text("warm");
        client.read_message().unwrap();
    }
    let started = Instant::now();
    // Answer the close frames from another thread so the handshake completes.
    let closers: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            std::thread::spawn(move || {
                let code = client.expect_close();
                client.send_close(code, "");
                code
            })
        })
        .collect();
    let status = server.terminate(Duration::from_secs(10)).expect("exits");
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        server.logs()
    );
    for closer in closers {
        assert_eq!(closer.join().unwrap(), 1001);
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(server.logs().contains("shutting down"));
}

#[test]
fn shards_log_their_cores_and_the_file_limit() {
    let server = Server::start("");
    // Each shard logs its core as it starts; under load the last one may come a little
    // after the listener answers, so wait for the lines rather than a fixed time.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(server.has_logged("pinned to core") && server.has_logged("open-file limit"))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let logs = server.logs();
    assert!(logs.contains("pinned to core"), "{logs}");
    assert!(logs.contains("open-file limit"), "{logs}");
}

#[test]
fn delayed_echoes_waiting_past_the_outbox_bound_close_with_1013() {
    // Each delayed echo waits as a task until it is due; a client sending faster than its
    // echoes come due is stopped at `max_outbox_frames` waiting, like a client that stops
    // reading, instead of piling tasks up on the shard.
    let server = Server::start("[limits]\nmax_outbox_frames = 16\n");
    let mut client = RawClient::connect(server.addr, "/ws/echo?delay_ms=5000").unwrap();
    for n in 0..16 {
        client.send_text(&format!("echo {n}"));
    }
    client.send_text("one too many");
    client.set_read_timeout(Duration::from_secs(4));
    assert_eq!(client.expect_close(), 1013);
    // Within the bound the echoes come back, late.
    let mut client = RawClient::connect(server.addr, "/ws/echo?delay_ms=200").unwrap();
    for n in 0..16 {
        client.send_text(&format!("echo {n}"));
    }
    for n in 0..16 {
        assert_eq!(client.read_message().unwrap().text(), format!("echo {n}"));
    }
}
