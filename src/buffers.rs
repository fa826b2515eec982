//! A per-shard pool of I/O buffers.
//!
//! Idle sessions hold no read or write buffer: a connection takes a buffer only
//! while bytes are moving and gives it back as soon as the burst is handled.
//! The pool keeps at most `max_idle` buffers of the standard size for reuse and
//! frees the rest, so a burst that needed many buffers does not pin memory
//! forever.
//!
//! Invariants: every buffer handed out has `len() == 0` and a capacity of at
//! least `buffer_bytes`; a buffer that grew past twice the standard size is
//! dropped on return instead of being pooled.

use std::cell::RefCell;

/// Pool of byte buffers owned by one shard (not `Sync`, never shared).
pub struct BufferPool {
    buffer_bytes: usize,
    max_idle: usize,
    idle: RefCell<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// A pool of `buffer_bytes`-sized buffers keeping at most `max_idle` spares.
    pub fn new(buffer_bytes: usize, max_idle: usize) -> Self {
        Self {
            buffer_bytes,
            max_idle,
            idle: RefCell::new(Vec::new()),
        }
    }

    /// The standard buffer size.
    pub fn buffer_bytes(&self) -> usize {
        self.buffer_bytes
    }

    /// Takes an empty buffer, reusing a pooled one when there is one.
    pub fn take(&self) -> Vec<u8> {
        self.idle
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.buffer_bytes))
    }

    /// Takes a buffer whose length is the standard size (zero-filled the first
    /// time), ready to be read into.
    pub fn take_filled(&self) -> Vec<u8> {
        let mut buffer = self.take();
        buffer.resize(self.buffer_bytes, 0);
        buffer
    }

    /// Gives a buffer back.
    pub fn give(&self, mut buffer: Vec<u8>) {
        if buffer.capacity() > 2 * self.buffer_bytes || buffer.capacity() < self.buffer_bytes {
            return;
        }
        let mut idle = self.idle.borrow_mut();
        if idle.len() < self.max_idle {
            buffer.clear();
            idle.push(buffer);
        }
    }

    /// Number of spare buffers currently pooled.
    pub fn idle_count(&self) -> usize {
        self.idle.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_and_caps_spares() {
        let pool = BufferPool::new(1024, 2);
        let a = pool.take_filled();
        assert_eq!(a.len(), 1024);
        let b = pool.take();
        let c = pool.take();
        assert!(b.capacity() >= 1024 && b.is_empty());
        pool.give(a);
        pool.give(b);
        pool.give(c);
        assert_eq!(pool.idle_count(), 2, "at most max_idle spares are kept");
        assert!(pool.take().is_empty(), "pooled buffers come back empty");
    }

    #[test]
    fn oversized_buffers_are_freed() {
        let pool = BufferPool::new(1024, 4);
        let mut big = pool.take();
        big.reserve(64 * 1024);
        pool.give(big);
        assert_eq!(pool.idle_count(), 0);
    }
}
