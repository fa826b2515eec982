//! Fuzzes the WebSocket state machine: arbitrary bytes, cut into arbitrary chunks, into a `Connection`.
//!
//! Input layout: byte 0 = configuration (bits 0-1 message limit, bit 2 client role, bit 3 start a local close
//! before the third chunk, bits 4-7 chunking style), byte 1 = chunking seed, rest = the byte stream.
//!
//! Invariants checked besides "never panics":
//! - the state only moves forward (Open -> CloseSent -> Closed, or Open -> Closed);
//! - delivered messages respect the size limit; nothing is delivered or written once Closed;
//! - everything written to `out` parses as frames of the right masking direction, with at most one close
//!   frame, which is the last frame written;
//! - no heap is held when idle or closed, and buffering stays within a small factor of the limit;
//! - without the injected local close, every chunking gives the same messages, output and final state as
//!   feeding the stream in one slice.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::ws::frame::{self, OpCode};
use switchboard::ws::{Connection, Message, Role, State, WsLimits};

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    events: Vec<(bool, Vec<u8>)>,
    out: Vec<u8>,
    state: State,
    close_received: Option<u16>,
}

fn rank(s: State) -> u8 {
    match s {
        State::Open => 0,
        State::CloseSent => 1,
        State::Closed => 2,
    }
}

fn run(
    role: Role,
    max: usize,
    stream: &[u8],
    chunks: &mut dyn Iterator<Item = usize>,
    local_close: bool,
) -> Outcome {
    let mut conn = Connection::new(
        role,
        WsLimits {
            max_message_bytes: max,
        },
    );
    let mut data = stream.to_vec();
    let mut out = Vec::new();
    let mut events = Vec::new();
    let mut at = 0;
    let mut chunk_no = 0;
    let mut state = conn.state();
    while at < data.len() {
        if local_close && chunk_no == 2 {
            conn.close(1001, "going away", &mut out);
        }
        let n = chunks
            .next()
            .unwrap_or(usize::MAX)
            .clamp(1, data.len() - at);
        let out_before = out.len();
        let was_closed = state == State::Closed;
        let new_state = conn.receive(&mut data[at..at + n], &mut out, |m, tx| {
            assert!(!was_closed, "message delivered after Closed");
            match m {
                Message::Text(t) => {
                    assert!(t.len() <= max);
                    events.push((true, t.as_bytes().to_vec()));
                    tx.send_text(t);
                }
                Message::Binary(b) => {
                    assert!(b.len() <= max);
                    events.push((false, b.to_vec()));
                    tx.send_binary(b);
                }
            }
        });
        assert_eq!(new_state, conn.state());
        assert!(
            rank(new_state) >= rank(state),
            "state went back: {state:?} -> {new_state:?}"
        );
        if was_closed {
            assert_eq!(out.len(), out_before, "bytes written after Closed");
        }
        state = new_state;
        if conn.is_idle() || state == State::Closed {
            assert_eq!(conn.buffered_bytes(), 0, "heap held while idle/closed");
        }
        // Assembled message (<= max) plus one partial frame (header + data payload <= max or control <= 125),
        // with Vec's doubling growth.
        let bound = 2 * (max + frame::MAX_HEADER_LEN + max.max(frame::MAX_CONTROL_PAYLOAD));
        assert!(conn.buffered_bytes() <= bound, "buffer grew past the limit");
        at += n;
        chunk_no += 1;
    }
    check_output(&out, role);
    Outcome {
        events,
        out,
        state,
        close_received: conn.close_code_received(),
    }
}

/// Everything written must be well-formed frames in our direction, with at most one close, last.
fn check_output(mut out: &[u8], role: Role) {
    let mut saw_close = false;
    while !out.is_empty() {
        assert!(!saw_close, "frame written after a close frame");
        let (header, hlen) = frame::parse_header(out)
            .expect("valid frame")
            .expect("complete frame");
        assert_eq!(header.mask.is_some(), role == Role::Client);
        assert!(header.fin);
        let end = hlen + header.payload_len as usize;
        assert!(end <= out.len());
        if header.opcode == OpCode::Close {
            saw_close = true;
            let mut payload = out[hlen..end].to_vec();
            if let Some(key) = header.mask {
                frame::apply_mask(&mut payload, key, 0);
            }
            assert!(payload.len() != 1);
            if payload.len() >= 2 {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                assert!(
                    switchboard::ws::is_valid_close_code(code),
                    "sent close code {code}"
                );
                assert!(std::str::from_utf8(&payload[2..]).is_ok());
            }
        }
        out = &out[end..];
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let config = data[0];
    let mut seed = u64::from(data[1]) | 0x100;
    let stream = &data[2..];
    let max = [0usize, 125, 1000, 1 << 16][usize::from(config & 3)];
    let role = if config & 4 != 0 {
        Role::Client
    } else {
        Role::Server
    };
    let local_close = config & 8 != 0;
    let max_chunk = [1u64, 2, 3, 7, 16, 64, 500, 100_000][usize::from(config >> 4) & 7];
    let mut sizes = std::iter::from_fn(move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        Some((seed % max_chunk) as usize + 1)
    });
    let chunked = run(role, max, stream, &mut sizes, local_close);
    if !local_close {
        let whole = run(role, max, stream, &mut std::iter::empty(), false);
        assert_eq!(chunked, whole, "chunking changed the outcome");
    }
});
