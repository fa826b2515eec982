//! Message-level WebSocket state machine (RFC 6455), sans-IO: bytes in, messages and reply bytes out.
//!
//! The driver passes each chunk it reads to [`Connection::receive`] and writes whatever lands in `out` to the
//! socket. Complete data messages are handed to a callback together with a [`Sender`] that can write replies
//! (e.g. an echo) while the message is still borrowed. Pings are answered, closes are validated and answered,
//! and every protocol violation writes a close frame with the right code and moves to [`State::Closed`].
//!
//! Invariants:
//! - Whole frames inside one `input` slice are unmasked in place and delivered borrowed from `input` (no copy).
//!   Only a frame cut by the end of `input`, or a fragmented message, is copied into the single internal
//!   buffer `buf` = `[assembled message bytes | partial frame bytes]`.
//! - `buf` holds no allocation whenever the connection is idle (no partial frame, no fragmented message): it is
//!   replaced by an empty `Vec` as soon as a message or partial frame completes, so an idle connection owns
//!   exactly `size_of::<Connection>()` bytes and nothing on the heap.
//! - Data-frame sizes are checked on the frame header, before any payload is buffered: a single frame or the
//!   sum of a message's fragments above `max_message_bytes` fails the connection with 1009.
//! - Partial payloads are unmasked and (for text) UTF-8 checked as they arrive, so an invalid prefix fails with
//!   1007 immediately, even inside one frame delivered in pieces (Autobahn 6.4.x, "fail fast").
//! - Server role requires masked frames, client role unmasked ones (else 1002). RSV bits, reserved opcodes,
//!   fragmented or oversized control frames: 1002 (see [`crate::ws::frame`]). Continuation without a started
//!   message, or a new data frame inside a fragmented message: 1002. Close frame with a 1-byte payload or an
//!   invalid code: 1002; non-UTF-8 close reason: 1007.
//! - After our close frame is sent, received data frames are dropped (still size-checked) and pings are not
//!   answered; the peer's close frame then moves the connection to `Closed`. Receiving a close while `Open`
//!   queues the echoed close in `out` and moves to `Closed` at once. In `Closed`, input is ignored and nothing
//!   more is ever written: the driver flushes `out` and shuts the socket down.
//!
//! Why hand-written (measured, not assumed). Live heap bytes of one server-side session over an in-memory
//! stream, counted by a counting global allocator; "idle" = after echoing one message, nothing in flight;
//! "reads" = `read` calls on the stream (syscalls on a real socket) to receive a 64 KiB message
//! (program: `tests/ws_idle_memory.rs`, `cargo test --test ws_idle_memory`):
//!
//! | implementation                                 | fresh   | idle (5 B msg) | idle (64 KiB msg) | reads |
//! |------------------------------------------------|---------|----------------|-------------------|-------|
//! | tungstenite 0.24 (switchboard's pin), default  | 8 192   | 8 200          | 135 178           | 17    |
//! | tungstenite 0.30, default (128 KiB read buf)   | 131 072 | 131 120        | 327 730           | 1     |
//! | tungstenite 0.30, `read_buffer_size = 0`       | 0       | 62             | 131 136           | 4 683 |
//! | this `Connection`                              | 0       | 0              | 0                 | —     |
//!
//! (0 is the smallest `read_buffer_size` tungstenite 0.30 accepts.) Inline size: 256 bytes for
//! `tungstenite::WebSocket<S>` minus the stream, 56 bytes for `Connection`. At 100k idle visitors the
//! default configurations hold 0.8 GB (0.24) or 13 GB (0.30); 0.30 with `read_buffer_size = 0` comes close
//! at idle (62 B) but then reads 14 bytes per syscall and keeps 131 KB after any large message for the life of
//! the connection. tungstenite also needs a blocking-style `Read + Write` stream (an extra copy through an
//! adapter under glommio), while this state machine borrows the driver's read buffer and returns to zero heap
//! after every message: 100k idle sessions = 5.6 MB.

use crate::ws::frame::{self, apply_mask, encode_frame, FrameHeader, OpCode, MAX_CONTROL_PAYLOAD};

/// Close codes used by switchboard (RFC 6455 §7.4.1).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// Reported by [`super::Connection::close_code_received`] for a close frame without a payload; never sent.
    pub const NO_STATUS: u16 = 1005;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// Whether `code` may appear in a close frame on the wire: the defined codes 1000-1003 and 1007-1014
/// (1012-1014 registered with IANA after RFC 6455), and the registered/private ranges 3000-4999. 1004-1006 and
/// 1015 are reserved and must never be sent; everything else is unassigned.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Which end of the connection this is; decides the masking direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Expects masked frames, sends unmasked ones.
    Server,
    /// Expects unmasked frames, sends masked ones.
    Client,
}

/// Size limits. A single frame and a whole (reassembled) message share the same bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsLimits {
    /// Largest data message accepted (bytes of payload, summed over fragments); larger fails with 1009.
    /// Values above `u32::MAX` are clamped to it.
    pub max_message_bytes: usize,
}

/// A complete data message, borrowed either from the `input` slice or from the reassembly buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
}

/// Where the close handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Messages flow both ways.
    Open,
    /// We sent a close frame and are waiting for the peer's.
    CloseSent,
    /// The close handshake finished or the connection failed: flush `out`, then shut the socket down.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataKind {
    Text,
    Binary,
}

/// Outgoing side: what is needed to write frames. Kept separate so a [`Sender`] can borrow it while a
/// message borrowed from the reassembly buffer is being delivered.
#[derive(Debug)]
struct Tx {
    /// xorshift32 state for client masking keys (never 0).
    mask_seed: u32,
    role: Role,
    close_sent: bool,
    /// The code of the close frame we sent, if it had one.
    close_code_sent: Option<u16>,
}

impl Tx {
    fn next_mask(&mut self) -> Option<[u8; 4]> {
        match self.role {
            Role::Server => None,
            Role::Client => {
                let mut x = self.mask_seed;
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                self.mask_seed = x;
                Some(x.to_ne_bytes())
            }
        }
    }

    fn write_frame(&mut self, out: &mut Vec<u8>, opcode: OpCode, payload: &[u8]) -> bool {
        if self.close_sent {
            return false;
        }
        let mask = self.next_mask();
        encode_frame(out, true, opcode, payload, mask);
        true
    }

    /// Writes a close frame (`None`: empty payload). The reason is cut to fit 123 bytes on a char boundary.
    fn write_close(&mut self, out: &mut Vec<u8>, code: Option<u16>, reason: &str) -> bool {
        if self.close_sent {
            return false;
        }
        let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
        let mut len = 0;
        if let Some(code) = code {
            payload[..2].copy_from_slice(&code.to_be_bytes());
            let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            payload[2..2 + cut].copy_from_slice(&reason.as_bytes()[..cut]);
            len = 2 + cut;
        }
        let mask = self.next_mask();
        encode_frame(out, true, OpCode::Close, &payload[..len], mask);
        self.close_sent = true;
        self.close_code_sent = code;
        true
    }
}

/// Reply handle given to the message callback of [`Connection::receive`]: writes frames (masked as the role
/// requires) into the same `out` buffer. All methods return `false` and write nothing once a close was sent.
pub struct Sender<'a> {
    tx: &'a mut Tx,
    out: &'a mut Vec<u8>,
}

impl Sender<'_> {
    pub fn send_text(&mut self, text: &str) -> bool {
        self.tx.write_frame(self.out, OpCode::Text, text.as_bytes())
    }

    pub fn send_binary(&mut self, data: &[u8]) -> bool {
        self.tx.write_frame(self.out, OpCode::Binary, data)
    }

    /// Starts the close handshake (e.g. 1008 after an unacceptable message). Frames after this in the same
    /// `input` are processed as in [`State::CloseSent`].
    pub fn close(&mut self, code: u16, reason: &str) -> bool {
        self.tx.write_close(self.out, Some(code), reason)
    }

    /// Bytes currently queued in `out` (for back-pressure decisions in the callback).
    pub fn queued_bytes(&self) -> usize {
        self.out.len()
    }
}

/// Incremental UTF-8 validation state: the (at most 3) leading bytes of a code point cut by a fragment or
/// chunk boundary. Empty whenever no text message is in progress.
#[derive(Debug, Default, Clone, Copy)]
struct Utf8Carry {
    bytes: [u8; 3],
    len: u8,
}

impl Utf8Carry {
    /// Validates `data` as the continuation of everything fed before. `Err` as soon as the bytes seen so far
    /// cannot be a prefix of valid UTF-8.
    fn feed(&mut self, mut data: &[u8]) -> Result<(), ()> {
        if self.len > 0 {
            let have = usize::from(self.len);
            let width = match self.bytes[0] {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                _ => 4,
            };
            let take = (width - have).min(data.len());
            let mut point = [0u8; 4];
            point[..have].copy_from_slice(&self.bytes[..have]);
            point[have..have + take].copy_from_slice(&data[..take]);
            match std::str::from_utf8(&point[..have + take]) {
                Ok(_) => {
                    self.len = 0;
                    data = &data[take..];
                }
                Err(e) if e.error_len().is_some() => return Err(()),
                Err(_) => {
                    // Still a valid but incomplete prefix; `data` is exhausted.
                    self.bytes.copy_from_slice(&point[..3]);
                    self.len = (have + take) as u8;
                    return Ok(());
                }
            }
        }
        match std::str::from_utf8(data) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_some() => Err(()),
            Err(e) => {
                let tail = &data[e.valid_up_to()..];
                self.bytes[..tail.len()].copy_from_slice(tail);
                self.len = tail.len() as u8;
                Ok(())
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One WebSocket connection's protocol state. See the module documentation for the invariants.
#[derive(Debug)]
pub struct Connection {
    /// `[0, msg_len)`: fragments of the message being assembled; `[msg_len, len)`: a frame (header and
    /// payload) cut by the end of an `input` slice. Unallocated when idle.
    buf: Vec<u8>,
    msg_len: u32,
    /// Payload bytes of the partial frame that are already unmasked (and UTF-8 checked if text).
    partial_done: u32,
    max_message: u32,
    tx: Tx,
    utf8: Utf8Carry,
    close_received: Option<u16>,
    state: State,
    /// Kind of the fragmented message in progress.
    fragment: Option<DataKind>,
    pong_received: bool,
}

impl Connection {
    pub fn new(role: Role, limits: WsLimits) -> Self {
        Connection {
            buf: Vec::new(),
            msg_len: 0,
            partial_done: 0,
            max_message: u32::try_from(limits.max_message_bytes).unwrap_or(u32::MAX),
            tx: Tx {
                mask_seed: 0x9E37_79B9,
                role,
                close_sent: false,
                close_code_sent: None,
            },
            utf8: Utf8Carry::default(),
            close_received: None,
            state: State::Open,
            fragment: None,
            pong_received: false,
        }
    }

    /// Seeds the generator of client masking keys (client role only; the default seed is fixed). The keys are
    /// not cryptographically unpredictable, which is fine for the load-test harness and tests this role
    /// serves, not for a browser-facing client.
    pub fn set_mask_seed(&mut self, seed: u32) {
        self.tx.mask_seed = seed.max(1);
    }

    /// Processes received bytes (any chunking). `input` is unmasked in place. Each complete data message is
    /// passed to `on_message` with a [`Sender`] for replies; pongs, close replies and failure closes are
    /// appended to `out`. Returns the state afterwards; on [`State::Closed`] the driver flushes `out` and
    /// closes the socket. Bytes after a close frame in the same `input` are ignored.
    pub fn receive<F>(&mut self, input: &mut [u8], out: &mut Vec<u8>, mut on_message: F) -> State
    where
        F: FnMut(Message<'_>, &mut Sender<'_>),
    {
        let mut input = input;
        while !input.is_empty() && self.state != State::Closed {
            if self.buf.len() > self.msg_len as usize {
                input = self.continue_partial(input, out, &mut on_message);
                continue;
            }
            let (header, hlen) = match frame::parse_header(input) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => {
                    self.buf.extend_from_slice(input);
                    self.partial_done = 0;
                    break;
                }
                Err(e) => {
                    self.fail(e.close_code(), out);
                    break;
                }
            };
            if let Err(code) = self.check_header(&header) {
                self.fail(code, out);
                break;
            }
            // check_header bounded payload_len by max_message (u32) or 125, so this cannot overflow.
            let total = hlen + header.payload_len as usize;
            if input.len() < total {
                self.buf.extend_from_slice(input);
                self.partial_done = 0;
                self.advance_partial(&header, hlen, out);
                break;
            }
            let (frame_bytes, rest) = std::mem::take(&mut input).split_at_mut(total);
            let payload = &mut frame_bytes[hlen..];
            if let Some(key) = header.mask {
                apply_mask(payload, key, 0);
            }
            self.handle_whole_frame(&header, payload, out, &mut on_message);
            input = rest;
        }
        self.state
    }

    /// Sends a text message as one frame. `false` (nothing written) once a close was sent.
    pub fn send_text(&mut self, text: &str, out: &mut Vec<u8>) -> bool {
        self.tx.write_frame(out, OpCode::Text, text.as_bytes())
    }

    /// Sends a binary message as one frame. `false` (nothing written) once a close was sent.
    pub fn send_binary(&mut self, data: &[u8], out: &mut Vec<u8>) -> bool {
        self.tx.write_frame(out, OpCode::Binary, data)
    }

    /// Sends a ping. `false` (nothing written) once a close was sent or if `data` exceeds 125 bytes.
    pub fn send_ping(&mut self, data: &[u8], out: &mut Vec<u8>) -> bool {
        data.len() <= MAX_CONTROL_PAYLOAD && self.tx.write_frame(out, OpCode::Ping, data)
    }

    /// Starts the close handshake with `code` (should satisfy [`is_valid_close_code`]) and `reason` (cut to 123
    /// bytes). `false` if a close was already sent or the connection is closed.
    pub fn close(&mut self, code: u16, reason: &str, out: &mut Vec<u8>) -> bool {
        debug_assert!(
            is_valid_close_code(code),
            "close code {code} must not be sent"
        );
        if self.state != State::Open || !self.tx.write_close(out, Some(code), reason) {
            return false;
        }
        self.state = State::CloseSent;
        true
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Code of the close frame we sent (ours, or the one failing the connection), if any.
    pub fn close_code_sent(&self) -> Option<u16> {
        self.tx.close_code_sent
    }

    /// Code of the peer's valid close frame, if one arrived ([`close_code::NO_STATUS`] for an empty one).
    pub fn close_code_received(&self) -> Option<u16> {
        self.close_received
    }

    /// Whether a pong arrived since the previous call (clears the flag). For ping-based idle timeouts.
    pub fn pong_received_since_last_check(&mut self) -> bool {
        std::mem::take(&mut self.pong_received)
    }

    /// True when no partial frame or fragmented message is buffered (and so no heap memory is held).
    pub fn is_idle(&self) -> bool {
        self.buf.capacity() == 0 && self.fragment.is_none()
    }

    /// Heap bytes currently held by this connection (capacity of the internal buffer).
    pub fn buffered_bytes(&self) -> usize {
        self.buf.capacity()
    }

    /// Role-, state- and sequencing-dependent checks on a complete header. `Err(close code)`.
    fn check_header(&self, header: &FrameHeader) -> Result<(), u16> {
        let masked = header.mask.is_some();
        if masked != (self.tx.role == Role::Server) {
            return Err(close_code::PROTOCOL_ERROR);
        }
        if header.opcode.is_control() {
            return Ok(());
        }
        let max = u64::from(self.max_message);
        if self.state != State::Open {
            // Data after our close is dropped, but still bounded before buffering.
            return if header.payload_len > max {
                Err(close_code::MESSAGE_TOO_BIG)
            } else {
                Ok(())
            };
        }
        match (header.opcode, self.fragment) {
            (OpCode::Continuation, None) => Err(close_code::PROTOCOL_ERROR),
            (OpCode::Continuation, Some(_)) => {
                if u64::from(self.msg_len) + header.payload_len > max {
                    Err(close_code::MESSAGE_TOO_BIG)
                } else {
                    Ok(())
                }
            }
            (_, Some(_)) => Err(close_code::PROTOCOL_ERROR),
            (_, None) if header.payload_len > max => Err(close_code::MESSAGE_TOO_BIG),
            (_, None) => Ok(()),
        }
    }

    fn is_text(&self, header: &FrameHeader) -> bool {
        header.opcode == OpCode::Text
            || (header.opcode == OpCode::Continuation && self.fragment == Some(DataKind::Text))
    }

    /// Feeds bytes from `input` into the partial frame at `buf[msg_len..]`; processes the frame when it
    /// completes. Returns the unconsumed rest of `input`.
    fn continue_partial<'i, F>(
        &mut self,
        mut input: &'i mut [u8],
        out: &mut Vec<u8>,
        on_message: &mut F,
    ) -> &'i mut [u8]
    where
        F: FnMut(Message<'_>, &mut Sender<'_>),
    {
        let start = self.msg_len as usize;
        let (header, hlen) = loop {
            match frame::parse_header(&self.buf[start..]) {
                Ok(Some(parsed)) => break parsed,
                Ok(None) => {
                    if input.is_empty() {
                        return input;
                    }
                    let have = self.buf.len() - start;
                    let need = if have < 2 {
                        2
                    } else {
                        frame::header_len(self.buf[start + 1])
                    };
                    let take = need.saturating_sub(have).clamp(1, input.len());
                    let (head, rest) = std::mem::take(&mut input).split_at_mut(take);
                    self.buf.extend_from_slice(head);
                    input = rest;
                }
                Err(e) => {
                    self.fail(e.close_code(), out);
                    return input;
                }
            }
        };
        if let Err(code) = self.check_header(&header) {
            self.fail(code, out);
            return input;
        }
        let total = hlen + header.payload_len as usize;
        let have = self.buf.len() - start;
        let take = (total - have).min(input.len());
        let (head, rest) = std::mem::take(&mut input).split_at_mut(take);
        self.buf.extend_from_slice(head);
        if self.advance_partial(&header, hlen, out) && self.buf.len() - start == total {
            self.finish_partial(&header, hlen, out, on_message);
        }
        rest
    }

    /// Unmasks (and UTF-8 checks, for text) the payload bytes of the partial frame that arrived since the last
    /// call. `false` if the connection failed.
    fn advance_partial(&mut self, header: &FrameHeader, hlen: usize, out: &mut Vec<u8>) -> bool {
        let payload_start = self.msg_len as usize + hlen;
        let done = self.partial_done as usize;
        if self.buf.len() <= payload_start + done {
            return true;
        }
        let check_text = self.state == State::Open && self.is_text(header);
        let fresh = &mut self.buf[payload_start + done..];
        if let Some(key) = header.mask {
            apply_mask(fresh, key, done);
        }
        if check_text && self.utf8.feed(fresh).is_err() {
            self.fail(close_code::INVALID_PAYLOAD, out);
            return false;
        }
        self.partial_done = (self.buf.len() - payload_start) as u32;
        true
    }

    /// Handles the now complete frame at `buf[msg_len..]` (payload already unmasked).
    fn finish_partial<F>(
        &mut self,
        header: &FrameHeader,
        hlen: usize,
        out: &mut Vec<u8>,
        on_message: &mut F,
    ) where
        F: FnMut(Message<'_>, &mut Sender<'_>),
    {
        let start = self.msg_len as usize;
        self.partial_done = 0;
        if header.opcode.is_control() {
            let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
            let len = self.buf.len() - start - hlen;
            payload[..len].copy_from_slice(&self.buf[start + hlen..]);
            self.buf.truncate(start);
            self.release_if_idle();
            self.handle_control(header.opcode, &payload[..len], out);
            return;
        }
        if self.state != State::Open {
            self.buf.truncate(start);
            self.release_if_idle();
            return;
        }
        if header.fin && header.opcode != OpCode::Continuation {
            // A single-frame message (check_header guaranteed no fragmented message is open, so start == 0).
            let kind = if header.opcode == OpCode::Text {
                DataKind::Text
            } else {
                DataKind::Binary
            };
            self.utf8 = Utf8Carry::default();
            let result = dispatch(
                &mut self.tx,
                out,
                kind,
                &self.buf[start + hlen..],
                on_message,
            );
            self.buf = Vec::new();
            self.after_dispatch(result, out);
            return;
        }
        // A fragment: move its payload next to the bytes assembled so far.
        self.buf.copy_within(start + hlen.., start);
        self.buf.truncate(self.buf.len() - hlen);
        self.msg_len = self.buf.len() as u32;
        if header.opcode != OpCode::Continuation {
            self.fragment = Some(if header.opcode == OpCode::Text {
                DataKind::Text
            } else {
                DataKind::Binary
            });
        }
        if header.fin {
            self.complete_message(out, on_message);
        }
    }

    /// Handles a frame that arrived whole inside `input` (payload already unmasked in place).
    fn handle_whole_frame<F>(
        &mut self,
        header: &FrameHeader,
        payload: &[u8],
        out: &mut Vec<u8>,
        on_message: &mut F,
    ) where
        F: FnMut(Message<'_>, &mut Sender<'_>),
    {
        if header.opcode.is_control() {
            self.handle_control(header.opcode, payload, out);
            return;
        }
        if self.state != State::Open {
            return;
        }
        if header.fin && header.opcode != OpCode::Continuation {
            // Fast path: a whole message, delivered borrowed from `input`.
            let kind = if header.opcode == OpCode::Text {
                DataKind::Text
            } else {
                DataKind::Binary
            };
            let result = dispatch(&mut self.tx, out, kind, payload, on_message);
            self.after_dispatch(result, out);
            return;
        }
        if header.opcode != OpCode::Continuation {
            self.fragment = Some(if header.opcode == OpCode::Text {
                DataKind::Text
            } else {
                DataKind::Binary
            });
        }
        if self.fragment == Some(DataKind::Text) && self.utf8.feed(payload).is_err() {
            self.fail(close_code::INVALID_PAYLOAD, out);
            return;
        }
        self.buf.extend_from_slice(payload);
        self.msg_len = self.buf.len() as u32;
        if header.fin {
            self.complete_message(out, on_message);
        }
    }

    /// Delivers the reassembled message in `buf[..msg_len]` and releases the buffer.
    fn complete_message<F>(&mut self, out: &mut Vec<u8>, on_message: &mut F)
    where
        F: FnMut(Message<'_>, &mut Sender<'_>),
    {
        let kind = self.fragment.take().unwrap_or(DataKind::Binary);
        let result = if kind == DataKind::Text && !self.utf8.is_empty() {
            Err(close_code::INVALID_PAYLOAD)
        } else {
            dispatch(
                &mut self.tx,
                out,
                kind,
                &self.buf[..self.msg_len as usize],
                on_message,
            )
        };
        self.utf8 = Utf8Carry::default();
        self.msg_len = 0;
        self.buf = Vec::new();
        self.after_dispatch(result, out);
    }

    fn after_dispatch(&mut self, result: Result<(), u16>, out: &mut Vec<u8>) {
        if self.tx.close_sent && self.state == State::Open {
            self.state = State::CloseSent;
        }
        if let Err(code) = result {
            self.fail(code, out);
        }
    }

    fn handle_control(&mut self, opcode: OpCode, payload: &[u8], out: &mut Vec<u8>) {
        match opcode {
            OpCode::Ping => {
                if self.state == State::Open {
                    self.tx.write_frame(out, OpCode::Pong, payload);
                }
            }
            OpCode::Pong => self.pong_received = true,
            OpCode::Close => self.handle_close(payload, out),
            OpCode::Continuation | OpCode::Text | OpCode::Binary => {}
        }
    }

    fn handle_close(&mut self, payload: &[u8], out: &mut Vec<u8>) {
        let code = match payload {
            [] => None,
            [_] => return self.fail(close_code::PROTOCOL_ERROR, out),
            [hi, lo, reason @ ..] => {
                let code = u16::from_be_bytes([*hi, *lo]);
                if !is_valid_close_code(code) {
                    return self.fail(close_code::PROTOCOL_ERROR, out);
                }
                if std::str::from_utf8(reason).is_err() {
                    return self.fail(close_code::INVALID_PAYLOAD, out);
                }
                Some(code)
            }
        };
        self.close_received = Some(code.unwrap_or(close_code::NO_STATUS));
        if self.state == State::Open {
            // Echo the peer's code (an empty close is answered with an empty close).
            self.tx.write_close(out, code, "");
        }
        self.enter_closed();
    }

    /// Fails the connection: sends a close with `code` unless one was already sent, then `Closed`.
    fn fail(&mut self, code: u16, out: &mut Vec<u8>) {
        if self.state == State::Open {
            let reason = match code {
                close_code::PROTOCOL_ERROR => "protocol error",
                close_code::INVALID_PAYLOAD => "invalid UTF-8",
                close_code::MESSAGE_TOO_BIG => "message too big",
                _ => "",
            };
            self.tx.write_close(out, Some(code), reason);
        }
        self.enter_closed();
    }

    fn enter_closed(&mut self) {
        self.state = State::Closed;
        self.tx.close_sent = true;
        self.buf = Vec::new();
        self.msg_len = 0;
        self.partial_done = 0;
        self.fragment = None;
        self.utf8 = Utf8Carry::default();
    }

    fn release_if_idle(&mut self) {
        if self.buf.is_empty() && self.fragment.is_none() {
            self.buf = Vec::new();
        }
    }
}

/// Validates and hands one complete message to the callback. `Err(1007)` for invalid UTF-8 text.
fn dispatch<F>(
    tx: &mut Tx,
    out: &mut Vec<u8>,
    kind: DataKind,
    data: &[u8],
    on_message: &mut F,
) -> Result<(), u16>
where
    F: FnMut(Message<'_>, &mut Sender<'_>),
{
    let message = match kind {
        DataKind::Text => {
            Message::Text(std::str::from_utf8(data).map_err(|_| close_code::INVALID_PAYLOAD)?)
        }
        DataKind::Binary => Message::Binary(data),
    };
    on_message(message, &mut Sender { tx, out });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn limits(max: usize) -> WsLimits {
        WsLimits {
            max_message_bytes: max,
        }
    }

    /// A frame as a client would send it (masked).
    fn cf(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame::encode_frame(&mut out, fin, opcode, payload, Some(KEY));
        out
    }

    fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(reason);
        p
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Event {
        Text(String),
        Binary(Vec<u8>),
    }

    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        events: Vec<Event>,
        out: Vec<u8>,
        state: State,
        close_received: Option<u16>,
    }

    /// Feeds `stream` to a fresh server connection in chunks of the given sizes (last chunk takes the rest),
    /// echoing every message.
    fn run_chunked(
        max: usize,
        stream: &[u8],
        chunks: &mut dyn Iterator<Item = usize>,
        echo: bool,
    ) -> Outcome {
        let mut conn = Connection::new(Role::Server, limits(max));
        let mut events = Vec::new();
        let mut out = Vec::new();
        let mut data = stream.to_vec();
        let mut at = 0;
        while at < data.len() {
            let n = chunks
                .next()
                .unwrap_or(usize::MAX)
                .max(1)
                .min(data.len() - at);
            conn.receive(&mut data[at..at + n], &mut out, |m, tx| match m {
                Message::Text(t) => {
                    events.push(Event::Text(t.to_owned()));
                    if echo {
                        tx.send_text(t);
                    }
                }
                Message::Binary(b) => {
                    events.push(Event::Binary(b.to_vec()));
                    if echo {
                        tx.send_binary(b);
                    }
                }
            });
            at += n;
            assert_eq!(
                conn.is_idle(),
                conn.buffered_bytes() == 0 && conn.fragment.is_none()
            );
        }
        Outcome {
            events,
            out,
            state: conn.state(),
            close_received: conn.close_code_received(),
        }
    }

    fn run(stream: &[u8]) -> Outcome {
        run_chunked(1 << 20, stream, &mut std::iter::empty(), true)
    }

    /// Decodes frames written by a server (unmasked) or client (masked).
    fn decode(mut bytes: &[u8], masked: bool) -> Vec<(OpCode, bool, Vec<u8>)> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let (h, n) = frame::parse_header(bytes).unwrap().expect("complete frame");
            assert_eq!(h.mask.is_some(), masked);
            let len = h.payload_len as usize;
            let mut payload = bytes[n..n + len].to_vec();
            if let Some(k) = h.mask {
                apply_mask(&mut payload, k, 0);
            }
            frames.push((h.opcode, h.fin, payload));
            bytes = &bytes[n + len..];
        }
        frames
    }

    /// Asserts that the server output ends with exactly one close frame carrying `code`.
    fn assert_closed_with(outcome: &Outcome, code: u16) {
        assert_eq!(outcome.state, State::Closed);
        let frames = decode(&outcome.out, false);
        let (op, _, payload) = frames.last().expect("a close frame");
        assert_eq!(*op, OpCode::Close, "{frames:?}");
        assert_eq!(
            u16::from_be_bytes([payload[0], payload[1]]),
            code,
            "{frames:?}"
        );
        assert_eq!(frames.iter().filter(|f| f.0 == OpCode::Close).count(), 1);
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn connection_is_small() {
        let size = std::mem::size_of::<Connection>();
        println!("size_of::<Connection>() = {size} bytes");
        assert!(size <= 64, "Connection grew to {size} bytes");
        let conn = Connection::new(Role::Server, limits(1 << 16));
        assert!(conn.is_idle());
        assert_eq!(conn.buffered_bytes(), 0);
    }

    #[test]
    fn whole_frame_is_delivered_borrowed_from_input() {
        let mut conn = Connection::new(Role::Server, limits(1024));
        let mut input = cf(OpCode::Text, true, b"Hello");
        let range = input.as_ptr_range();
        let mut out = Vec::new();
        let mut seen = 0;
        let state = conn.receive(&mut input, &mut out, |m, _| {
            let Message::Text(t) = m else {
                panic!("expected text")
            };
            assert_eq!(t, "Hello");
            assert!(
                range.contains(&t.as_ptr()),
                "message must point into the input slice"
            );
            seen += 1;
        });
        assert_eq!((seen, state), (1, State::Open));
        assert!(out.is_empty());
        assert!(conn.is_idle());
    }

    #[test]
    fn echo_is_unmasked_server_frame() {
        let mut stream = cf(OpCode::Text, true, b"hi");
        stream.extend(cf(OpCode::Binary, true, &[0, 1, 2, 255]));
        let o = run(&stream);
        assert_eq!(
            o.events,
            vec![Event::Text("hi".into()), Event::Binary(vec![0, 1, 2, 255])]
        );
        assert_eq!(o.out, b"\x81\x02hi\x82\x04\x00\x01\x02\xff");
        assert_eq!(o.state, State::Open);
    }

    #[test]
    fn empty_messages() {
        let mut stream = cf(OpCode::Text, true, b"");
        stream.extend(cf(OpCode::Binary, true, b""));
        stream.extend(cf(OpCode::Text, false, b""));
        stream.extend(cf(OpCode::Continuation, true, b""));
        let o = run(&stream);
        assert_eq!(
            o.events,
            vec![
                Event::Text("".into()),
                Event::Binary(vec![]),
                Event::Text("".into())
            ]
        );
    }

    #[test]
    fn fragmented_message_with_interleaved_control_frames() {
        let mut stream = cf(OpCode::Text, false, b"Hel");
        stream.extend(cf(OpCode::Ping, true, b"p1"));
        stream.extend(cf(OpCode::Continuation, false, b"lo, "));
        stream.extend(cf(OpCode::Pong, true, b"unsolicited"));
        stream.extend(cf(OpCode::Ping, true, b""));
        stream.extend(cf(OpCode::Continuation, true, b"world"));
        let o = run(&stream);
        assert_eq!(o.events, vec![Event::Text("Hello, world".into())]);
        assert_eq!(
            decode(&o.out, false),
            vec![
                (OpCode::Pong, true, b"p1".to_vec()),
                (OpCode::Pong, true, vec![]),
                (OpCode::Text, true, b"Hello, world".to_vec()),
            ]
        );
        // Binary fragments too.
        let mut stream = cf(OpCode::Binary, false, &[1]);
        stream.extend(cf(OpCode::Continuation, false, &[2]));
        stream.extend(cf(OpCode::Continuation, true, &[3]));
        assert_eq!(run(&stream).events, vec![Event::Binary(vec![1, 2, 3])]);
    }

    #[test]
    fn sequencing_violations_are_1002() {
        // Continuation without a started message.
        assert_closed_with(&run(&cf(OpCode::Continuation, true, b"x")), 1002);
        // New data frame while a fragmented message is open.
        let mut s = cf(OpCode::Text, false, b"a");
        s.extend(cf(OpCode::Text, true, b"b"));
        assert_closed_with(&run(&s), 1002);
        let mut s = cf(OpCode::Binary, false, b"a");
        s.extend(cf(OpCode::Binary, false, b"b"));
        assert_closed_with(&run(&s), 1002);
    }

    #[test]
    fn frame_violations_are_1002() {
        let mut rsv = cf(OpCode::Text, true, b"x");
        rsv[0] |= 0x40;
        let mut reserved_op = cf(OpCode::Text, true, b"x");
        reserved_op[0] = 0x83;
        let big_ping = cf(OpCode::Ping, true, &[0u8; 126]);
        let mut fragmented_ping = cf(OpCode::Ping, true, b"x");
        fragmented_ping[0] &= 0x7F;
        let mut length_msb = b"\x82\xFF\x80\x00\x00\x00\x00\x00\x00\x00".to_vec();
        length_msb.extend_from_slice(&KEY);
        let mut unmasked = Vec::new();
        frame::encode_frame(&mut unmasked, true, OpCode::Text, b"x", None);
        for stream in [
            rsv,
            reserved_op,
            big_ping,
            fragmented_ping,
            length_msb,
            unmasked,
        ] {
            let o = run(&stream);
            assert_closed_with(&o, 1002);
            assert!(o.events.is_empty());
        }
        // Messages before the violation are still delivered (and echoed) first.
        let mut s = cf(OpCode::Text, true, b"first");
        let mut bad = cf(OpCode::Text, true, b"second");
        bad[0] |= 0x20;
        s.extend(bad);
        s.extend(cf(OpCode::Ping, true, b"never answered"));
        let o = run(&s);
        assert_eq!(o.events, vec![Event::Text("first".into())]);
        let frames = decode(&o.out, false);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0], (OpCode::Text, true, b"first".to_vec()));
        assert_closed_with(&o, 1002);
    }

    #[test]
    fn client_rejects_masked_server_frames() {
        let mut client = Connection::new(Role::Client, limits(1024));
        let mut input = cf(OpCode::Text, true, b"masked");
        let mut out = Vec::new();
        let state = client.receive(&mut input, &mut out, |_, _| panic!("no message expected"));
        assert_eq!(state, State::Closed);
        let frames = decode(&out, true);
        assert_eq!(
            frames,
            vec![(OpCode::Close, true, close_payload(1002, b"protocol error"))]
        );
    }

    #[test]
    fn invalid_utf8_is_1007() {
        let o = run(&cf(OpCode::Text, true, b"ok \xff"));
        assert_closed_with(&o, 1007);
        assert!(o.events.is_empty());
        // Surrogate half encoded in UTF-8 (Autobahn 6.x).
        assert_closed_with(&run(&cf(OpCode::Text, true, b"\xed\xa0\x80")), 1007);
        // Truncated code point at the end of a single-frame message.
        assert_closed_with(&run(&cf(OpCode::Text, true, b"\xce")), 1007);
        // Binary messages are not checked.
        assert_eq!(
            run(&cf(OpCode::Binary, true, b"\xff")).events,
            vec![Event::Binary(vec![0xff])]
        );
    }

    #[test]
    fn utf8_code_points_split_across_fragments() {
        // "κόσμε" with fragment boundaries inside code points.
        let text = "κόσμε €𝄞";
        let bytes = text.as_bytes();
        for split in 0..=bytes.len() {
            let mut s = cf(OpCode::Text, false, &bytes[..split]);
            s.extend(cf(OpCode::Continuation, true, &bytes[split..]));
            assert_eq!(
                run(&s).events,
                vec![Event::Text(text.into())],
                "split {split}"
            );
        }
        // One byte per fragment.
        let mut s = cf(OpCode::Text, false, &bytes[..1]);
        for b in &bytes[1..] {
            s.extend(cf(OpCode::Continuation, false, &[*b]));
        }
        s.extend(cf(OpCode::Continuation, true, b""));
        assert_eq!(run(&s).events, vec![Event::Text(text.into())]);
    }

    #[test]
    fn invalid_utf8_in_a_fragment_fails_before_the_message_ends() {
        // Autobahn 6.4.1/6.4.2: the invalid fragment arrives, the final one has not been sent yet.
        let mut s = cf(OpCode::Text, false, "κόσμε".as_bytes());
        s.extend(cf(
            OpCode::Continuation,
            false,
            b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80",
        ));
        assert_closed_with(&run(&s), 1007);
        // Invalid sequence split across fragments: lead byte in one, bad continuation byte in the next.
        let mut s = cf(OpCode::Text, false, b"a\xe2\x82");
        s.extend(cf(OpCode::Continuation, false, b"a"));
        assert_closed_with(&run(&s), 1007);
        // Incomplete code point when the message ends.
        let mut s = cf(OpCode::Text, false, b"a\xe2\x82");
        s.extend(cf(OpCode::Continuation, true, b""));
        assert_closed_with(&run(&s), 1007);
    }

    #[test]
    fn invalid_utf8_inside_one_frame_fails_fast() {
        // Autobahn 6.4.3/6.4.4: one frame announced, payload sent in chops; the invalid chop must fail at once.
        let payload =
            b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90\x80\x80\x65\x64\x69\x74\x65\x64";
        let frame_bytes = cf(OpCode::Text, true, payload);
        let hlen = 6;
        let mut conn = Connection::new(Role::Server, limits(1024));
        let mut out = Vec::new();
        let mut first = frame_bytes[..hlen + 11].to_vec();
        assert_eq!(
            conn.receive(&mut first, &mut out, |_, _| panic!()),
            State::Open
        );
        assert!(out.is_empty());
        assert!(!conn.is_idle());
        // \xf4\x90 is already impossible (beyond U+10FFFF).
        let mut second = frame_bytes[hlen + 11..hlen + 13].to_vec();
        assert_eq!(
            conn.receive(&mut second, &mut out, |_, _| panic!()),
            State::Closed
        );
        assert_eq!(
            decode(&out, false),
            vec![(OpCode::Close, true, close_payload(1007, b"invalid UTF-8"))]
        );
        assert!(conn.is_idle());
    }

    #[test]
    fn close_handshake_initiated_by_peer() {
        // Empty close: answered with an empty close; reported as 1005.
        let o = run(&cf(OpCode::Close, true, b""));
        assert_eq!(o.state, State::Closed);
        assert_eq!(o.close_received, Some(close_code::NO_STATUS));
        assert_eq!(decode(&o.out, false), vec![(OpCode::Close, true, vec![])]);
        // Valid codes are echoed.
        for code in [
            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999,
            4000, 4999,
        ] {
            let o = run(&cf(OpCode::Close, true, &close_payload(code, b"bye")));
            assert_eq!(o.close_received, Some(code));
            assert_eq!(
                decode(&o.out, false),
                vec![(OpCode::Close, true, code.to_be_bytes().to_vec())]
            );
            assert_eq!(o.state, State::Closed);
        }
        // Longest legal reason (123 bytes).
        let o = run(&cf(OpCode::Close, true, &close_payload(1000, &[b'r'; 123])));
        assert_eq!(o.close_received, Some(1000));
    }

    #[test]
    fn bad_close_frames() {
        assert_closed_with(&run(&cf(OpCode::Close, true, &[0x03])), 1002);
        for code in [
            0u16, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            let o = run(&cf(OpCode::Close, true, &close_payload(code, b"")));
            assert_closed_with(&o, 1002);
            assert_eq!(o.close_received, None);
        }
        assert_closed_with(
            &run(&cf(
                OpCode::Close,
                true,
                &close_payload(1000, b"\xce\xba\xe1\xbd\xb9\xed\xa0\x80"),
            )),
            1007,
        );
        // 124-byte reason: payload 126 > 125.
        assert_closed_with(
            &run(&cf(OpCode::Close, true, &close_payload(1000, &[b'r'; 124]))),
            1002,
        );
    }

    #[test]
    fn everything_after_the_peer_close_is_ignored() {
        // Autobahn 7.1.x: message, close, then more frames in the same read.
        let mut s = cf(OpCode::Text, true, b"before");
        s.extend(cf(OpCode::Close, true, &close_payload(1000, b"")));
        s.extend(cf(OpCode::Ping, true, b"after"));
        s.extend(cf(OpCode::Text, true, b"after"));
        s.extend(b"\xff\xff garbage");
        let o = run(&s);
        assert_eq!(o.events, vec![Event::Text("before".into())]);
        assert_eq!(
            decode(&o.out, false),
            vec![
                (OpCode::Text, true, b"before".to_vec()),
                (OpCode::Close, true, vec![0x03, 0xe8])
            ]
        );
        // A fragmented message interrupted by close is dropped.
        let mut s = cf(OpCode::Text, false, b"frag");
        s.extend(cf(OpCode::Close, true, &close_payload(1000, b"")));
        s.extend(cf(OpCode::Continuation, true, b"ment"));
        let o = run(&s);
        assert!(o.events.is_empty());
        assert_eq!(o.state, State::Closed);
    }

    #[test]
    fn close_handshake_initiated_locally() {
        let mut conn = Connection::new(Role::Server, limits(1024));
        let mut out = Vec::new();
        assert!(conn.close(close_code::GOING_AWAY, "shutting down", &mut out));
        assert_eq!(conn.state(), State::CloseSent);
        assert!(!conn.close(1000, "", &mut out), "second close is refused");
        assert!(!conn.send_text("late", &mut out));
        assert!(!conn.send_ping(b"", &mut out));
        assert_eq!(
            decode(&out, false),
            vec![(OpCode::Close, true, close_payload(1001, b"shutting down"))]
        );
        out.clear();
        // The peer still sends data and a ping before its close: dropped, unanswered.
        let mut s = cf(OpCode::Text, true, b"ignored");
        s.extend(cf(OpCode::Ping, true, b"x"));
        s.extend(cf(OpCode::Text, false, b"frag"));
        s.extend(cf(OpCode::Close, true, &close_payload(1000, b"ok")));
        let state = conn.receive(&mut s, &mut out, |_, _| {
            panic!("data after close must be dropped")
        });
        assert_eq!(state, State::Closed);
        assert!(out.is_empty(), "nothing is written after our close");
        assert_eq!(conn.close_code_received(), Some(1000));
        assert!(conn.is_idle());
        // Closed ignores everything.
        let mut more = cf(OpCode::Text, true, b"x");
        assert_eq!(
            conn.receive(&mut more, &mut out, |_, _| panic!()),
            State::Closed
        );
        assert!(out.is_empty());
    }

    #[test]
    fn close_after_our_close_with_protocol_error_sends_nothing_more() {
        let mut conn = Connection::new(Role::Server, limits(1024));
        let mut out = Vec::new();
        conn.close(1000, "", &mut out);
        out.clear();
        let mut bad = cf(OpCode::Close, true, &[1]);
        assert_eq!(conn.receive(&mut bad, &mut out, |_, _| {}), State::Closed);
        assert!(out.is_empty());
    }

    #[test]
    fn callback_can_close() {
        let mut s = cf(OpCode::Text, true, b"bad word");
        s.extend(cf(OpCode::Text, true, b"dropped"));
        s.extend(cf(OpCode::Close, true, &close_payload(1000, b"")));
        let mut conn = Connection::new(Role::Server, limits(1024));
        let mut out = Vec::new();
        let mut delivered = Vec::new();
        let state = conn.receive(&mut s, &mut out, |m, tx| {
            delivered.push(format!("{m:?}"));
            assert!(tx.close(close_code::POLICY_VIOLATION, "policy"));
            assert!(!tx.send_text("after close"));
        });
        assert_eq!(delivered.len(), 1);
        assert_eq!(state, State::Closed);
        assert_eq!(
            decode(&out, false),
            vec![(OpCode::Close, true, close_payload(1008, b"policy"))]
        );
    }

    #[test]
    fn oversized_messages_are_1009_before_buffering() {
        // A frame header announcing too much: fails with only the header received.
        let full = cf(OpCode::Binary, true, &[7u8; 101]);
        let mut conn = Connection::new(Role::Server, limits(100));
        let mut out = Vec::new();
        let mut header = full[..8].to_vec();
        assert_eq!(
            conn.receive(&mut header, &mut out, |_, _| panic!()),
            State::Closed
        );
        assert_eq!(
            decode(&out, false),
            vec![(OpCode::Close, true, close_payload(1009, b"message too big"))]
        );
        assert_eq!(conn.buffered_bytes(), 0);
        // 64-bit length far beyond the limit.
        let mut huge = b"\x82\xFF\x00\x00\x00\x01\x00\x00\x00\x00".to_vec();
        huge.extend_from_slice(&KEY);
        assert_closed_with(&run(&huge), 1009);
        // Exactly at the limit is fine, one more byte is not.
        assert_eq!(
            run_chunked(
                100,
                &cf(OpCode::Binary, true, &[7u8; 100]),
                &mut std::iter::empty(),
                false
            )
            .events
            .len(),
            1
        );
        // Sum of fragments over the limit, each fragment under it.
        let mut s = cf(OpCode::Text, false, &[b'a'; 60]);
        s.extend(cf(OpCode::Continuation, false, &[b'a'; 40]));
        s.extend(cf(OpCode::Continuation, true, &[b'a'; 1]));
        let o = run_chunked(100, &s, &mut std::iter::empty(), true);
        assert!(o.events.is_empty());
        assert_closed_with(&o, 1009);
        s.truncate(s.len() - 7);
        s.extend(cf(OpCode::Continuation, true, b""));
        assert_eq!(
            run_chunked(100, &s, &mut std::iter::empty(), true)
                .events
                .len(),
            1
        );
    }

    #[test]
    fn sixteen_and_sixty_four_bit_lengths() {
        for len in [125usize, 126, 127, 1000, 65535, 65536, 100_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let stream = cf(OpCode::Binary, true, &payload);
            let o = run(&stream);
            assert_eq!(o.events, vec![Event::Binary(payload.clone())], "len {len}");
            assert_eq!(
                decode(&o.out, false),
                vec![(OpCode::Binary, true, payload.clone())]
            );
            let chunked = run_chunked(1 << 20, &stream, &mut std::iter::repeat(997), true);
            assert_eq!(chunked, o);
        }
    }

    /// A long client stream exercising every kind of frame, ending with a close.
    fn mixed_stream() -> Vec<u8> {
        let mut s = Vec::new();
        s.extend(cf(OpCode::Text, true, "héllo wörld €𝄞".as_bytes()));
        s.extend(cf(OpCode::Ping, true, b"ping-1"));
        s.extend(cf(
            OpCode::Binary,
            true,
            &(0..300u32).map(|i| i as u8).collect::<Vec<_>>(),
        ));
        s.extend(cf(OpCode::Text, false, "κό".as_bytes()));
        s.extend(cf(OpCode::Ping, true, b""));
        s.extend(cf(OpCode::Continuation, false, &"σμε".as_bytes()[..3]));
        s.extend(cf(OpCode::Pong, true, b"pong"));
        s.extend(cf(OpCode::Continuation, true, &"σμε".as_bytes()[3..]));
        s.extend(cf(OpCode::Binary, true, &vec![0xAB; 70_000]));
        s.extend(cf(OpCode::Text, true, &"x".repeat(126).into_bytes()));
        s.extend(cf(OpCode::Binary, false, b"ab"));
        s.extend(cf(OpCode::Continuation, true, b"cd"));
        s.extend(cf(OpCode::Text, true, b""));
        s
    }

    fn assert_chunking_invariant(stream: &[u8], max: usize) -> Outcome {
        let whole = run_chunked(max, stream, &mut std::iter::empty(), true);
        let bytewise = run_chunked(max, stream, &mut std::iter::repeat(1), true);
        assert_eq!(bytewise, whole, "1-byte chunks differ from one slice");
        let mut rng = Rng(0x243F_6A88_85A3_08D3);
        for round in 0..150 {
            let max_chunk = [2u64, 5, 14, 64, 700, 20_000][round % 6];
            let mut sizes = std::iter::from_fn(|| Some((rng.next() % max_chunk) as usize + 1));
            let random = run_chunked(max, stream, &mut sizes, true);
            assert_eq!(random, whole, "random chunking (round {round}) differs");
        }
        whole
    }

    #[test]
    fn chunking_does_not_change_results() {
        let mut s = mixed_stream();
        s.extend(cf(OpCode::Close, true, &close_payload(1000, b"done")));
        let whole = assert_chunking_invariant(&s, 1 << 20);
        assert_eq!(whole.events.len(), 7);
        assert_eq!(whole.events[2], Event::Text("κόσμε".into()));
        assert_eq!(whole.state, State::Closed);
        assert_eq!(whole.close_received, Some(1000));
        let frames = decode(&whole.out, false);
        assert_eq!(frames.iter().filter(|f| f.0 == OpCode::Pong).count(), 2);
        assert_eq!(
            frames.last().unwrap(),
            &(OpCode::Close, true, vec![0x03, 0xe8])
        );
    }

    #[test]
    fn chunking_does_not_change_failures() {
        let mut bad_utf8 = mixed_stream();
        bad_utf8.extend(cf(OpCode::Text, false, b"abc\xe2\x82"));
        bad_utf8.extend(cf(OpCode::Continuation, true, b"\x28 more"));
        let o = assert_chunking_invariant(&bad_utf8, 1 << 20);
        assert_closed_with(&o, 1007);

        let mut too_big = mixed_stream();
        too_big.extend(cf(OpCode::Binary, false, &[0; 50]));
        too_big.extend(cf(OpCode::Continuation, true, &[0; 80_000]));
        let o = assert_chunking_invariant(&too_big, 80_000);
        assert_closed_with(&o, 1009);

        let mut bad_close = mixed_stream();
        bad_close.extend(cf(OpCode::Close, true, &close_payload(1005, b"")));
        let o = assert_chunking_invariant(&bad_close, 1 << 20);
        assert_closed_with(&o, 1002);
    }

    #[test]
    fn buffers_are_released_when_idle() {
        let stream = cf(OpCode::Text, true, &vec![b'z'; 10_000]);
        let mut conn = Connection::new(Role::Server, limits(1 << 20));
        let mut out = Vec::new();
        let mut data = stream.clone();
        let (a, b) = data.split_at_mut(5000);
        conn.receive(a, &mut out, |_, _| panic!("not complete yet"));
        assert!(!conn.is_idle());
        assert!(conn.buffered_bytes() >= 5000);
        let mut got = 0;
        conn.receive(b, &mut out, |m, _| {
            got = matches!(m, Message::Text(t) if t.len() == 10_000) as u8
        });
        assert_eq!(got, 1);
        assert!(conn.is_idle());
        assert_eq!(conn.buffered_bytes(), 0);
        // A partial control frame inside a fragmented message keeps only the message bytes.
        let mut s = cf(OpCode::Binary, false, b"abc");
        let ping = cf(OpCode::Ping, true, b"pp");
        s.extend_from_slice(&ping[..3]);
        conn.receive(&mut s, &mut out, |_, _| panic!());
        assert!(!conn.is_idle());
        let mut rest = ping[3..].to_vec();
        rest.extend(cf(OpCode::Continuation, true, b"d"));
        let mut msg = Vec::new();
        conn.receive(&mut rest, &mut out, |m, _| {
            msg = format!("{m:?}").into_bytes()
        });
        assert_eq!(msg, b"Binary([97, 98, 99, 100])");
        assert!(conn.is_idle());
        assert_eq!(conn.buffered_bytes(), 0);
    }

    #[test]
    fn client_server_round_trip() {
        let mut client = Connection::new(Role::Client, limits(1 << 20));
        client.set_mask_seed(12345);
        let mut server = Connection::new(Role::Server, limits(1 << 20));
        let mut to_server = Vec::new();
        assert!(client.send_text("hello server", &mut to_server));
        assert!(client.send_binary(&[1, 2, 3], &mut to_server));
        assert!(client.send_ping(b"are you there", &mut to_server));
        assert!(
            !client.send_ping(&[0; 126], &mut to_server),
            "oversized ping refused"
        );
        let big = "b".repeat(70_000);
        assert!(client.send_text(&big, &mut to_server));
        // Client frames are masked, each with its own key.
        let frames = decode(&to_server, true);
        assert_eq!(frames.len(), 4);
        let keys: Vec<_> = {
            let mut keys = Vec::new();
            let mut bytes = &to_server[..];
            while !bytes.is_empty() {
                let (h, n) = frame::parse_header(bytes).unwrap().unwrap();
                keys.push(h.mask.unwrap());
                bytes = &bytes[n + h.payload_len as usize..];
            }
            keys
        };
        assert!(keys.windows(2).all(|w| w[0] != w[1]));

        let mut to_client = Vec::new();
        let mut server_got = Vec::new();
        server.receive(&mut to_server, &mut to_client, |m, tx| {
            server_got.push(format!("{:?}", m).len());
            match m {
                Message::Text(t) => tx.send_text(&t.to_uppercase()),
                Message::Binary(b) => tx.send_binary(&b.iter().rev().copied().collect::<Vec<_>>()),
            };
        });
        assert_eq!(server_got.len(), 3);
        assert!(!server.pong_received_since_last_check());

        let mut client_got = Vec::new();
        let state = client.receive(&mut to_client, &mut Vec::new(), |m, _| match m {
            Message::Text(t) => client_got.push(Event::Text(t.into())),
            Message::Binary(b) => client_got.push(Event::Binary(b.into())),
        });
        assert_eq!(state, State::Open);
        assert_eq!(
            client_got,
            vec![
                Event::Text("HELLO SERVER".into()),
                Event::Binary(vec![3, 2, 1]),
                Event::Text(big.to_uppercase())
            ]
        );
        assert!(
            client.pong_received_since_last_check(),
            "server answered the ping"
        );
        assert!(
            !client.pong_received_since_last_check(),
            "flag is cleared by the check"
        );

        // Close handshake client -> server -> client.
        let mut to_server = Vec::new();
        assert!(client.close(1000, "bye", &mut to_server));
        let mut to_client = Vec::new();
        assert_eq!(
            server.receive(&mut to_server, &mut to_client, |_, _| {}),
            State::Closed
        );
        assert_eq!(server.close_code_received(), Some(1000));
        assert_eq!(
            client.receive(&mut to_client, &mut Vec::new(), |_, _| {}),
            State::Closed
        );
        assert_eq!(client.close_code_received(), Some(1000));
    }

    #[test]
    fn close_reason_is_cut_on_a_char_boundary() {
        let mut conn = Connection::new(Role::Server, limits(10));
        let mut out = Vec::new();
        let reason = "é".repeat(100); // 200 bytes
        conn.close(1000, &reason, &mut out);
        let frames = decode(&out, false);
        let payload = &frames[0].2;
        assert!(payload.len() <= 125);
        assert_eq!(payload.len(), 2 + 122);
        assert!(std::str::from_utf8(&payload[2..]).is_ok());
    }

    #[test]
    fn utf8_carry_matches_std_on_every_split() {
        let samples: [&[u8]; 6] = [
            "aκόσμε€𝄞z".as_bytes(),
            b"\xf0\x9f\x98",
            b"\xe2\x28\xa1",
            b"\xf4\x90\x80\x80",
            b"\xc0\xaf",
            b"ok\xed\x9f\xbf\xee\x80\x80",
        ];
        for s in samples {
            let full_ok = std::str::from_utf8(s).is_ok();
            for a in 0..=s.len() {
                for b in a..=s.len() {
                    let mut v = Utf8Carry::default();
                    let fed = v
                        .feed(&s[..a])
                        .and_then(|_| v.feed(&s[a..b]))
                        .and_then(|_| v.feed(&s[b..]));
                    assert_eq!(fed.is_ok() && v.is_empty(), full_ok, "{s:?} split {a}/{b}");
                }
            }
        }
    }
}
