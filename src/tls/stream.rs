//! A TLS server stream over a glommio `TcpStream`, driving rustls's unbuffered connection
//! (`UnbufferedServerConnection`) so that this module, not rustls, owns every buffer.
//!
//! Why unbuffered: rustls's buffered `ServerConnection` keeps a receive buffer of at least 4 KiB
//! per connection for the whole life of the connection (its deframer buffer never shrinks below
//! one read). Here an idle established session holds no buffer at all: [`TlsStream`] keeps only
//! the connection state (keys, sequence numbers) and three `Vec`s that are empty, capacity 0,
//! whenever nothing is in flight:
//! - `incoming`: ciphertext of a record that arrived only in part (exactly its bytes);
//! - `plaintext`: decrypted bytes a reader has not taken yet (the reader's buffer was smaller);
//! - `outgoing`: ciphertext the socket has not taken yet.
//!
//! Reads go straight into the caller's buffer: [`AsyncRead::poll_read`] reads ciphertext into the
//! buffer it is given, decrypts the whole records found there, and copies the plaintext back into
//! it, so the connection driver's discipline (borrow a pooled buffer for one read, give it back
//! when the socket has nothing) holds over TLS too.
//!
//! Writes: `poll_write` encrypts the whole slice into `outgoing` once, then reports it written
//! only when the socket took all of it (a `Pending` in between is retried with the same slice, as
//! `AsyncWrite` callers do), so `write_all` returning means the bytes reached the socket.
//!
//! Not supported on purpose: early data (0-RTT) and resumption (see `tls` module).

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures_lite::io::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use rustls::ServerConfig;

/// The largest handshake flight a client may send before the handshake completes.
const MAX_HANDSHAKE_BYTES: usize = 64 * 1024;
/// First size of the handshake receive buffer (a ClientHello is usually well under 2 KiB).
const HANDSHAKE_BUFFER: usize = 4096;
/// Bytes read at a time to complete a partial record whose length is not known yet.
const PARTIAL_READ: usize = 512;
/// TLS record header: type (1), version (2), length (2).
const RECORD_HEADER: usize = 5;

/// An established TLS session (see the module documentation for its memory).
pub struct TlsStream {
    tcp: TcpStream,
    /// Boxed (about 1 KiB): the stream is moved into the session task and an async fn's
    /// future can hold more than one slot for it, each as big as the stream.
    conn: Box<UnbufferedServerConnection>,
    incoming: Vec<u8>,
    plaintext: Vec<u8>,
    /// Bytes of `plaintext` already handed to a reader.
    delivered: usize,
    outgoing: Vec<u8>,
    /// Bytes of `outgoing` already written to the socket.
    sent: usize,
    /// Plaintext length a pending `poll_write` already encrypted into `outgoing`.
    write_in_flight: Option<usize>,
    peer_closed: bool,
    close_queued: bool,
}

/// Where the state machine stopped after consuming what it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// The handshake needs more bytes from the peer.
    Handshaking,
    /// Established; every whole record was processed.
    Established,
    /// The peer sent close_notify.
    PeerClosed,
}

/// Runs the TLS handshake on an accepted connection. The caller bounds it in time.
pub async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<TlsStream> {
    let conn = Box::new(UnbufferedServerConnection::new(config).map_err(tls_error)?);
    let mut stream = TlsStream {
        tcp,
        conn,
        incoming: Vec::new(),
        plaintext: Vec::new(),
        delivered: 0,
        outgoing: Vec::new(),
        sent: 0,
        write_in_flight: None,
        peer_closed: false,
        close_queued: false,
    };
    // Dropped when the handshake ends: an established session keeps only what is left unread.
    let mut buffer = vec![0u8; HANDSHAKE_BUFFER];
    let mut filled = 0;
    loop {
        let processed = process(
            &mut stream.conn,
            &mut buffer[..filled],
            &mut stream.plaintext,
            &mut stream.outgoing,
        );
        // Send what the state machine produced, the fatal alert of a failure included.
        let flushed = poll_fn(|cx| stream.poll_flush_outgoing(cx)).await;
        let (consumed, step) = processed?;
        flushed?;
        buffer.copy_within(consumed..filled, 0);
        filled -= consumed;
        match step {
            Step::Established if !stream.conn.is_handshaking() => break,
            Step::PeerClosed => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed during the TLS handshake",
                ))
            }
            _ => {}
        }
        if filled == buffer.len() {
            if buffer.len() >= MAX_HANDSHAKE_BYTES {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS handshake messages too large",
                ));
            }
            buffer.resize(buffer.len() * 2, 0);
        }
        let read =
            poll_fn(|cx| Pin::new(&mut stream.tcp).poll_read(cx, &mut buffer[filled..])).await?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "peer closed during the TLS handshake",
            ));
        }
        filled += read;
    }
    if filled > 0 {
        stream.incoming = buffer[..filled].to_vec();
    }
    Ok(stream)
}

impl TlsStream {
    /// The ALPN protocol agreed on, if the client offered ALPN.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// See glommio's `TcpStream::set_write_timeout`: a socket write that waits longer fails.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) {
        let _ = self.tcp.set_write_timeout(timeout);
    }

    /// Writes `outgoing` to the socket; frees it once all of it is written.
    fn poll_flush_outgoing(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            match ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.sent..])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(written) => self.sent += written,
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
        self.outgoing = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Processes ciphertext in `buffer` (the caller's read buffer) and keeps what is left of a
    /// partial record.
    fn absorb(&mut self, buffer: &mut [u8]) -> io::Result<()> {
        let (consumed, step) = process(
            &mut self.conn,
            buffer,
            &mut self.plaintext,
            &mut self.outgoing,
        )?;
        if consumed < buffer.len() {
            self.incoming.extend_from_slice(&buffer[consumed..]);
        }
        self.peer_closed |= step == Step::PeerClosed;
        Ok(())
    }

    /// Encrypts `data` (or a close_notify when `data` is `None`) into `outgoing`.
    fn encrypt(&mut self, data: Option<&[u8]>) -> io::Result<()> {
        loop {
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
            match state.map_err(tls_error)? {
                ConnectionState::WriteTraffic(mut traffic) => {
                    return match data {
                        Some(data) => grow_into(&mut self.outgoing, data.len() + 64, |out| {
                            traffic.encrypt(data, out).map_err(encrypt_room)
                        }),
                        None => grow_into(&mut self.outgoing, 64, |out| {
                            traffic.queue_close_notify(out).map_err(encrypt_room)
                        }),
                    };
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    grow_into(&mut self.outgoing, 1024, |out| {
                        encode.encode(out).map_err(encode_room)
                    })?;
                }
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        self.plaintext
                            .extend_from_slice(record.map_err(tls_error)?.payload);
                    }
                }
                ConnectionState::PeerClosed => self.peer_closed = true,
                _ => return Err(io::ErrorKind::BrokenPipe.into()),
            }
        }
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if this.delivered < this.plaintext.len() {
                let ready = &this.plaintext[this.delivered..];
                let n = ready.len().min(out.len());
                out[..n].copy_from_slice(&ready[..n]);
                this.delivered += n;
                if this.delivered == this.plaintext.len() {
                    this.plaintext = Vec::new();
                    this.delivered = 0;
                }
                return Poll::Ready(Ok(n));
            }
            if this.peer_closed || out.is_empty() {
                return Poll::Ready(Ok(0));
            }
            // TLS-level answers (e.g. to a KeyUpdate) go out when the socket takes them.
            if let Poll::Ready(Err(err)) = this.poll_flush_outgoing(cx) {
                return Poll::Ready(Err(err));
            }
            if this.incoming.is_empty() {
                // The common case: read ciphertext into the caller's buffer, hold nothing.
                let read = ready!(Pin::new(&mut this.tcp).poll_read(cx, out))?;
                if read == 0 {
                    this.peer_closed = true;
                    continue;
                }
                this.absorb(&mut out[..read])?;
            } else {
                // A record arrived in part: read the rest of it behind what is kept.
                let kept = this.incoming.len();
                let record = if kept >= RECORD_HEADER {
                    RECORD_HEADER
                        + usize::from(u16::from_be_bytes([this.incoming[3], this.incoming[4]]))
                } else {
                    0
                };
                let more = record.saturating_sub(kept).max(PARTIAL_READ);
                this.incoming.resize(kept + more, 0);
                let read = match Pin::new(&mut this.tcp).poll_read(cx, &mut this.incoming[kept..]) {
                    Poll::Ready(Ok(read)) => read,
                    other => {
                        this.incoming.truncate(kept);
                        match other {
                            Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                            _ => return Poll::Pending,
                        }
                    }
                };
                this.incoming.truncate(kept + read);
                if read == 0 {
                    this.peer_closed = true;
                    continue;
                }
                let mut incoming = std::mem::take(&mut this.incoming);
                this.absorb(&mut incoming)?;
                // `absorb` appended the unconsumed tail to the (now empty) `incoming`.
            }
            if let Poll::Ready(Err(err)) = this.poll_flush_outgoing(cx) {
                return Poll::Ready(Err(err));
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(accepted) = this.write_in_flight {
            ready!(this.poll_flush_outgoing(cx))?;
            this.write_in_flight = None;
            return Poll::Ready(Ok(accepted));
        }
        ready!(this.poll_flush_outgoing(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        this.encrypt(Some(data))?;
        this.write_in_flight = Some(data.len());
        ready!(this.poll_flush_outgoing(cx))?;
        this.write_in_flight = None;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_outgoing(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_queued {
            this.close_queued = true;
            // Best effort: a connection that already failed has nothing to close cleanly.
            let _ = this.encrypt(None);
        }
        ready!(this.poll_flush_outgoing(cx))?;
        Pin::new(&mut this.tcp).poll_close(cx)
    }
}

/// Feeds `buffer` to the state machine until it needs more bytes. Decrypted application data is
/// appended to `plaintext`, bytes to send to `outgoing`. Returns how many bytes of `buffer` were
/// consumed (the rest is a partial record) and where it stopped. On a failure, the fatal alert
/// rustls queued is put in `outgoing` before the error is returned.
fn process(
    conn: &mut UnbufferedServerConnection,
    buffer: &mut [u8],
    plaintext: &mut Vec<u8>,
    outgoing: &mut Vec<u8>,
) -> io::Result<(usize, Step)> {
    let mut consumed = 0;
    loop {
        let UnbufferedStatus { mut discard, state } =
            conn.process_tls_records(&mut buffer[consumed..]);
        let state = match state {
            Ok(state) => state,
            Err(err) => {
                queue_alert(conn, outgoing);
                return Err(tls_error(err));
            }
        };
        let step = match state {
            ConnectionState::ReadTraffic(mut traffic) => {
                while let Some(record) = traffic.next_record() {
                    let record = record.map_err(tls_error)?;
                    discard += record.discard;
                    plaintext.extend_from_slice(record.payload);
                }
                None
            }
            ConnectionState::EncodeTlsData(mut encode) => {
                grow_into(outgoing, 1024, |out| {
                    encode.encode(out).map_err(encode_room)
                })?;
                None
            }
            ConnectionState::TransmitTlsData(transmit) => {
                transmit.done();
                None
            }
            ConnectionState::BlockedHandshake => Some(Step::Handshaking),
            ConnectionState::WriteTraffic(_) => Some(Step::Established),
            ConnectionState::PeerClosed | ConnectionState::Closed => Some(Step::PeerClosed),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "unexpected TLS state (early data is not accepted)",
                ))
            }
        };
        consumed += discard;
        if let Some(step) = step {
            return Ok((consumed, step));
        }
    }
}

/// After a failure rustls holds the fatal alert to send; move it to `outgoing`.
fn queue_alert(conn: &mut UnbufferedServerConnection, outgoing: &mut Vec<u8>) {
    for _ in 0..4 {
        match conn.process_tls_records(&mut []).state {
            Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                let _ = grow_into(outgoing, 64, |out| encode.encode(out).map_err(encode_room));
            }
            Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
            _ => return,
        }
    }
}

/// Appends to `buffer` what `write` writes into a slice, growing the slice while `write` answers
/// `Err(Some(required))`; `Err(None)` is a failure.
fn grow_into(
    buffer: &mut Vec<u8>,
    first_guess: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) -> io::Result<()> {
    let start = buffer.len();
    let mut room = first_guess;
    loop {
        buffer.resize(start + room, 0);
        match write(&mut buffer[start..]) {
            Ok(written) => {
                buffer.truncate(start + written);
                return Ok(());
            }
            Err(Some(required)) if required > room => room = required,
            Err(_) => {
                buffer.truncate(start);
                return Err(io::Error::other("TLS record could not be encoded"));
            }
        }
    }
}

fn encode_room(err: EncodeError) -> Option<usize> {
    match err {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(required_size)
        }
        _ => None,
    }
}

fn encrypt_room(err: EncryptError) -> Option<usize> {
    match err {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(required_size)
        }
        _ => None,
    }
}

fn tls_error(err: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, err)
}
