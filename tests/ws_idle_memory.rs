//! Measures heap bytes held by an idle WebSocket session: tungstenite 0.30 (default config and its
//! smallest `read_buffer_size`) versus `ws::Connection` (numbers quoted in src/ws/connection.rs).
//! A counting global allocator tracks live heap bytes; the in-memory stream's buffers are allocated before
//! the baseline and never grow, so every byte counted belongs to the WebSocket implementation.
//! Run: `cargo test --test ws_idle_memory`. Needs in Cargo.toml:
//!   [dev-dependencies] tungstenite = { package = "tungstenite", version = "0.30",
//!                                         default-features = false, features = ["handshake"] }
//!   [[test]] name = "ws_idle_memory", harness = false
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicIsize, Ordering};

use switchboard::ws::frame::{encode_frame, OpCode};
use switchboard::ws::{Connection, Message, Role, WsLimits};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Reads from a pre-filled buffer (then WouldBlock), writes into a pre-reserved one.
struct MemStream {
    rx: Vec<u8>,
    rx_pos: usize,
    tx: Vec<u8>,
}

/// Number of `read` calls that returned data (a syscall each on a real socket).
static READS: AtomicIsize = AtomicIsize::new(0);

impl MemStream {
    fn new(input: Vec<u8>) -> Self {
        MemStream {
            rx: input,
            rx_pos: 0,
            tx: Vec::with_capacity(1 << 20),
        }
    }
}

impl Read for MemStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.rx_pos == self.rx.len() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        READS.fetch_add(1, Ordering::Relaxed);
        let n = buf.len().min(self.rx.len() - self.rx_pos);
        buf[..n].copy_from_slice(&self.rx[self.rx_pos..self.rx_pos + n]);
        self.rx_pos += n;
        Ok(n)
    }
}

impl Write for MemStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        assert!(
            self.tx.len() + buf.len() <= self.tx.capacity(),
            "MemStream tx must not grow"
        );
        self.tx.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn client_text(len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(
        &mut out,
        true,
        OpCode::Text,
        &vec![b'a'; len],
        Some([1, 2, 3, 4]),
    );
    out
}

/// (heap right after creation, heap when idle after echoing one message of `len` bytes)
fn tungstenite_030(len: usize, read_buffer_size: Option<usize>) -> Option<(isize, isize)> {
    use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};
    let mut config = WebSocketConfig::default();
    if let Some(size) = read_buffer_size {
        config = config.read_buffer_size(size);
    }
    let run = move || {
        let stream = MemStream::new(client_text(len));
        let base = live();
        let mut ws = WebSocket::from_raw_socket(stream, Role::Server, Some(config));
        let fresh = live() - base;
        let msg = ws.read().ok()?;
        if !msg.is_text() {
            return None;
        }
        ws.send(msg).ok()?;
        if !matches!(ws.read(), Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock)
        {
            return None;
        }
        let idle = live() - base;
        Some((fresh, idle))
    };
    std::panic::catch_unwind(run).ok().flatten()
}

fn connection(len: usize) -> (isize, isize) {
    let mut input = client_text(len);
    let mut out = Vec::with_capacity(1 << 20); // the driver's write buffer, not part of the session
    let base = live();
    let mut conn = Connection::new(
        Role::Server,
        WsLimits {
            max_message_bytes: 1 << 20,
        },
    );
    let fresh = live() - base;
    let mut n = 0;
    conn.receive(&mut input, &mut out, |m, tx| {
        if let Message::Text(t) = m {
            tx.send_text(t);
            n += 1;
        }
    });
    assert_eq!(n, 1);
    let idle = live() - base;
    (fresh, idle)
}

fn main() {
    std::panic::set_hook(Box::new(|_| {})); // probing read_buffer_size values may panic
    println!("heap bytes held by one idle server-side WebSocket (fresh / idle after echoing one message)");
    for len in [5usize, 65_536] {
        println!("-- message of {len} bytes");
        READS.store(0, Ordering::Relaxed);
        let (f, i) = tungstenite_030(len, None).expect("default config works");
        let r = READS.swap(0, Ordering::Relaxed);
        println!("tungstenite 0.30 default config (128 KiB read)  : {f:>7} / {i:>7}  ({r} reads)");
        let smallest = [0usize, 1, 2, 4, 8, 14, 16, 64, 256, 1024, 4096]
            .into_iter()
            .find_map(|size| tungstenite_030(len, Some(size)).map(|r| (size, r)));
        let (size, (f, i)) = smallest.expect("some read_buffer_size works");
        READS.store(0, Ordering::Relaxed);
        tungstenite_030(len, Some(size));
        let r = READS.swap(0, Ordering::Relaxed);
        println!(
            "tungstenite 0.30 smallest read_buffer_size={size:<5}: {f:>7} / {i:>7}  ({r} reads)"
        );
        let (f, i) = connection(len);
        println!("ws::Connection                                  : {f:>7} / {i:>7}");
        assert_eq!(i, 0, "an idle Connection must hold no heap");
    }
    println!(
        "inline sizes: tungstenite 0.30 WebSocket<MemStream> - MemStream = {}, Connection = {}",
        std::mem::size_of::<tungstenite::WebSocket<MemStream>>() - std::mem::size_of::<MemStream>(),
        std::mem::size_of::<Connection>()
    );
    println!("1 passed, 0 failed");
}
