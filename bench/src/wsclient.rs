//! WebSocket client sessions over glommio sockets, driving the project's own sans-IO codec
//! (`switchboard::ws`: client handshake helpers and the client-role `Connection`). No second codec.
//!
//! A session is split in two: the [`WsReader`] (owned by one task) reads bytes, feeds the `Connection`
//! and yields messages; any number of [`WsWriter`] clones queue frames. The `Connection` and the pending
//! output live in one `Rc<RefCell<Shared>>` (one shard, one thread: never borrowed across an await).
//! Writes need no lock: whoever finds the socket's write half free takes it and writes until the pending
//! output is empty, so frames queued meanwhile (a pong from the reader, a message from a sender) go out in
//! order with the next write. Pings are answered by the codec, server closes are echoed.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::rc::Rc;
use std::time::Duration;

use futures_lite::io::{split, AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};

use crate::tls::ClientStream;

use crate::codec::handshake::{
    accept_key, client_request, generate_key, parse_client_response, ClientHandshakeError,
};
use crate::codec::{Connection, Message, Role, State, WsLimits};
use crate::net;
use crate::runtime::with_timeout;
use crate::target::Target;

/// Largest message the harness accepts from a server.
const MAX_MESSAGE: usize = 16 << 20;
/// Bytes read per read call; the buffer is allocated per session.
const READ_CHUNK: usize = 4096;

/// Why a session could not be opened. [`OpenError::reason`] is the short label used in reports.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("handshake i/o: {0}")]
    Io(std::io::Error),
    #[error("server closed the connection during the handshake")]
    Eof,
    #[error("handshake timed out")]
    Timeout,
    #[error("{0}")]
    Handshake(ClientHandshakeError),
}

impl OpenError {
    pub fn reason(&self) -> String {
        match self {
            OpenError::Connect(e) => format!("connect: {}", net::io_reason(e)),
            // A write on a socket whose connect failed reports the connect error.
            OpenError::Io(e) => match e.raw_os_error() {
                Some(libc::ECONNREFUSED) | Some(libc::ETIMEDOUT) | Some(libc::EHOSTUNREACH) => {
                    format!("connect: {}", net::io_reason(e))
                }
                _ => format!("handshake: {}", net::io_reason(e)),
            },
            OpenError::Eof => "handshake: connection closed by server".into(),
            OpenError::Timeout => "handshake: timeout".into(),
            OpenError::Handshake(ClientHandshakeError::UnexpectedStatus(code)) => {
                format!("handshake: http {code}")
            }
            OpenError::Handshake(e) => format!("handshake: {e}"),
        }
    }
}

/// Why an open session ended or failed.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("i/o: {0}")]
    Io(std::io::Error),
    #[error("connection closed without a close frame")]
    Eof,
    #[error("protocol error from server, closed with {0}")]
    Protocol(u16),
    #[error("session already closed")]
    Closed,
}

impl WsError {
    pub fn reason(&self) -> String {
        match self {
            WsError::Io(e) => net::io_reason(e),
            WsError::Eof => "eof without close frame".into(),
            WsError::Protocol(code) => format!("protocol error ({code})"),
            WsError::Closed => "closed".into(),
        }
    }
}

/// An owned incoming event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Text(String),
    Binary(Vec<u8>),
    /// The close handshake finished; the code the server sent (1005 when it sent none).
    Close(u16),
}

struct Shared {
    conn: Connection,
    /// Frames queued for the socket.
    out: Vec<u8>,
    /// The socket's write half while nobody is writing.
    half: Option<WriteHalf<ClientStream>>,
    /// Set once a write failed; every later write fails too.
    broken: bool,
    /// The buffer a flush writes from, kept between flushes: `out` and `spare` swap, so that frames
    /// queued during a write go to the other one and no flush allocates.
    spare: Vec<u8>,
}

/// Writing side of a session; cheap to clone.
#[derive(Clone)]
pub struct WsWriter {
    shared: Rc<RefCell<Shared>>,
}

/// Reading side of a session.
pub struct WsReader {
    shared: Rc<RefCell<Shared>>,
    io: ReadSide,
    queued: VecDeque<Incoming>,
}

struct ReadSide {
    half: ReadHalf<ClientStream>,
    buf: Vec<u8>,
    /// Bytes already read and not yet fed to the codec (those following the 101 response).
    pending: Vec<u8>,
}

/// Opens a WebSocket session: non-blocking connect from `source`, upgrade request for `path`, 101 checked.
/// The whole handshake is bounded by `timeout`.
pub async fn open(
    target: &Target,
    source: Option<Ipv4Addr>,
    path: &str,
    seed: u64,
    timeout: Duration,
) -> Result<(WsReader, WsWriter), OpenError> {
    let stream = net::start_connect(target.addr, source).map_err(OpenError::Connect)?;
    with_timeout(timeout, async {
        let stream = match &target.tls {
            None => ClientStream::Plain(stream),
            Some((config, name)) => crate::tls::connect(stream, config.clone(), name)
                .await
                .map_err(OpenError::Io)?,
        };
        handshake(stream, &target.host_header, path, seed).await
    })
    .await
    .unwrap_or(Err(OpenError::Timeout))
}

async fn handshake(
    mut stream: ClientStream,
    host: &str,
    path: &str,
    seed: u64,
) -> Result<(WsReader, WsWriter), OpenError> {
    let key = generate_key(seed);
    let expected = accept_key(&key);
    let mut request = Vec::with_capacity(256);
    client_request(&mut request, host, path, &key);
    stream.write_all(&request).await.map_err(OpenError::Io)?;
    let mut buf = vec![0u8; READ_CHUNK];
    let mut filled = 0;
    let consumed = loop {
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = stream
            .read(&mut buf[filled..])
            .await
            .map_err(OpenError::Io)?;
        if n == 0 {
            return Err(OpenError::Eof);
        }
        filled += n;
        if let Some(consumed) =
            parse_client_response(&buf[..filled], &expected).map_err(OpenError::Handshake)?
        {
            break consumed;
        }
    };
    let pending = buf[consumed..filled].to_vec();
    buf.truncate(READ_CHUNK);
    let mut conn = Connection::new(
        Role::Client,
        WsLimits {
            max_message_bytes: MAX_MESSAGE,
        },
    );
    conn.set_mask_seed((seed as u32) ^ ((seed >> 32) as u32) ^ 0x5bd1_e995);
    let (read_half, write_half) = split(stream);
    let shared = Rc::new(RefCell::new(Shared {
        conn,
        out: Vec::new(),
        half: Some(write_half),
        broken: false,
        spare: Vec::new(),
    }));
    Ok((
        WsReader {
            shared: shared.clone(),
            io: ReadSide {
                half: read_half,
                buf,
                pending,
            },
            queued: VecDeque::new(),
        },
        WsWriter { shared },
    ))
}

impl WsWriter {
    /// Queues a text message and writes it (or leaves it to the writer already at work).
    pub async fn send_text(&self, text: &str) -> Result<(), WsError> {
        {
            let mut s = self.shared.borrow_mut();
            let s = &mut *s;
            if s.broken {
                return Err(WsError::Closed);
            }
            if !s.conn.send_text(text, &mut s.out) {
                return Err(WsError::Closed);
            }
        }
        flush(&self.shared).await
    }

    /// Starts the close handshake with `code`; the reader then sees [`Incoming::Close`] when the server
    /// answers. Does nothing if a close was already sent.
    pub async fn close(&self, code: u16) -> Result<(), WsError> {
        {
            let mut s = self.shared.borrow_mut();
            let s = &mut *s;
            if s.broken {
                return Err(WsError::Closed);
            }
            s.conn.close(code, "", &mut s.out);
        }
        flush(&self.shared).await
    }
}

/// Marks the session broken if a flush is dropped half-way (a timeout cancelled it): part of a frame may
/// be on the wire, so nothing more may be written.
struct FlushGuard<'a> {
    shared: &'a Rc<RefCell<Shared>>,
    finished: bool,
}

impl Drop for FlushGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.shared.borrow_mut().broken = true;
        }
    }
}

/// Writes pending output until none is left. If another task is writing, the bytes are left to it.
async fn flush(shared: &Rc<RefCell<Shared>>) -> Result<(), WsError> {
    let mut guard = FlushGuard {
        shared,
        finished: false,
    };
    let mut half = {
        let mut s = shared.borrow_mut();
        match s.half.take() {
            Some(h) => h,
            None if s.broken => {
                guard.finished = true;
                return Err(WsError::Closed);
            }
            None => {
                guard.finished = true;
                return Ok(());
            }
        }
    };
    let mut chunk = std::mem::take(&mut shared.borrow_mut().spare);
    loop {
        {
            let mut s = shared.borrow_mut();
            if s.out.is_empty() {
                s.half = Some(half);
                s.spare = chunk;
                guard.finished = true;
                return Ok(());
            }
            std::mem::swap(&mut s.out, &mut chunk);
        }
        if let Err(e) = half.write_all(&chunk).await {
            // The guard marks the session broken.
            return Err(WsError::Io(e));
        }
        chunk.clear();
    }
}

impl WsReader {
    /// Reads until at least one message (or the close) has been processed, handing each data message,
    /// borrowed, to `on_message` together with a codec `Sender` for immediate replies (written right after).
    /// Returns `Ok(Some(code))` once the close handshake is over.
    pub async fn read_with<F>(&mut self, on_message: F) -> Result<Option<u16>, WsError>
    where
        F: FnMut(Message<'_>, &mut crate::codec::Sender<'_>),
    {
        self.io.read_with(&self.shared, on_message).await
    }

    /// The next event, owned.
    pub async fn recv(&mut self) -> Result<Incoming, WsError> {
        loop {
            if let Some(m) = self.queued.pop_front() {
                return Ok(m);
            }
            let queued = &mut self.queued;
            let closed = self
                .io
                .read_with(&self.shared, |m, _| {
                    queued.push_back(match m {
                        Message::Text(t) => Incoming::Text(t.to_string()),
                        Message::Binary(b) => Incoming::Binary(b.to_vec()),
                    })
                })
                .await?;
            if let Some(code) = closed {
                self.queued.push_back(Incoming::Close(code));
            }
        }
    }

    /// Takes the events already decoded and not yet returned: [`WsReader::recv`] decodes every frame
    /// of a read and returns one, so after it (e.g. waiting for `hello`) the frames that came in the
    /// same read wait here; [`WsReader::read_with`] does not see them.
    pub fn take_queued(&mut self) -> Vec<Incoming> {
        self.queued.drain(..).collect()
    }

    /// Like [`WsReader::recv`], bounded by `limit`; `Ok(None)` on timeout.
    pub async fn recv_timeout(&mut self, limit: Duration) -> Result<Option<Incoming>, WsError> {
        if let Some(m) = self.queued.pop_front() {
            return Ok(Some(m));
        }
        match with_timeout(limit, self.recv()).await {
            Some(r) => r.map(Some),
            None => Ok(None),
        }
    }
}

impl ReadSide {
    async fn read_with<F>(
        &mut self,
        shared: &Rc<RefCell<Shared>>,
        mut on_message: F,
    ) -> Result<Option<u16>, WsError>
    where
        F: FnMut(Message<'_>, &mut crate::codec::Sender<'_>),
    {
        let mut delivered = false;
        loop {
            let (n, from_pending) = if !self.pending.is_empty() {
                (self.pending.len(), true)
            } else {
                let n = self.half.read(&mut self.buf).await.map_err(WsError::Io)?;
                if n == 0 {
                    shared.borrow_mut().broken = true;
                    return Err(WsError::Eof);
                }
                (n, false)
            };
            let state = {
                let mut s = shared.borrow_mut();
                let s = &mut *s;
                let input = if from_pending {
                    &mut self.pending[..]
                } else {
                    &mut self.buf[..n]
                };
                s.conn.receive(input, &mut s.out, |m, sender| {
                    delivered = true;
                    on_message(m, sender)
                })
            };
            if from_pending {
                self.pending = Vec::new();
            }
            let wrote = !shared.borrow().out.is_empty();
            if wrote {
                // Pongs, close echoes and replies; a failed write shows up on the next read.
                let _ = flush(shared).await;
            }
            if state == State::Closed {
                let received = shared.borrow().conn.close_code_received();
                return match received {
                    Some(code) => Ok(Some(code)),
                    None => Err(WsError::Protocol(1002)),
                };
            }
            if delivered {
                return Ok(None);
            }
        }
    }
}
