//! Makes growing a shard's LMDB memory map safe while other threads read it.
//!
//! `mdb_env_set_mapsize` unmaps and remaps the data file: LMDB's documentation (and heed's
//! `Env::resize`) require that no transaction of the environment is live in this process
//! while it runs, and the library does not check. A [`StoreReader`](super::StoreReader) reads
//! on the shard's thread while the writer commits on a blocking thread, so `&mut ShardStore`
//! alone does not prove that no read transaction is open.
//!
//! The gate is one atomic word shared by every handle of an environment:
//! - the low bits count the read views that are open (each view holds a [`ReadPass`] for its
//!   whole life, from before its transaction begins until after it ends);
//! - `WANT` is set by the writer when it wants to resize: new views hold back for up to
//!   [`READER_HOLD_BACK`], so overlapping readers on several threads cannot keep the count
//!   above 0 forever (seen in `full_tests`: two threads reading without pause kept a writer
//!   that only waited for a count of 0 out for its whole patience);
//! - `RESIZING` is set while the writer resizes. The writer only sets it when the count is
//!   0, and a reader only enters while it is clear.
//!
//! Invariants:
//! - While a [`ResizePass`] exists no read transaction of the environment is live and none
//!   can begin; the writer holds no write transaction either (it resizes between batches).
//! - A reader waits for a writer that WANTS the gate for a bounded time only, then enters
//!   anyway: a view opened inside another view on the same thread (which the writer is
//!   waiting for) cannot deadlock. Readers wait without bound only for `RESIZING`, which is
//!   never set while a view is open and lasts the microseconds of a remap.
//! - The hot path is one uncontended compare-and-swap per view: the word is shared only by
//!   the shard's own threads, not across shards.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const RESIZING: usize = 1 << (usize::BITS - 1);
const WANT: usize = 1 << (usize::BITS - 2);
#[cfg(test)]
const COUNT: usize = WANT - 1;

/// How long a new view holds back for a writer that wants to resize. Only reached when a
/// view is opened inside another one (the writer then waits for both) or another thread's
/// view lasts this long; otherwise the writer gets the gate as soon as the open views end,
/// and the held-back views go on microseconds later. Longer than a long replay view, so
/// readers on several threads cannot take turns keeping the count above 0.
pub(crate) const READER_HOLD_BACK: Duration = Duration::from_millis(50);

/// The shared state of one environment's gate.
#[derive(Debug, Default)]
pub(crate) struct ResizeGate {
    state: AtomicUsize,
}

/// Held by a read view: the map is not remapped while it lives.
#[derive(Debug)]
pub(crate) struct ReadPass<'g> {
    gate: &'g ResizeGate,
}

/// Held by the writer while it remaps: no read view is open.
#[derive(Debug)]
pub(crate) struct ResizePass<'g> {
    gate: &'g ResizeGate,
}

impl ResizeGate {
    /// Registers a read view; waits while a resize is under way.
    pub(crate) fn read(&self) -> ReadPass<'_> {
        let mut spins = 0u32;
        let mut held_back_since = None;
        let mut state = self.state.load(Ordering::Relaxed);
        loop {
            let hold_back = state & WANT != 0
                && held_back_since.get_or_insert_with(Instant::now).elapsed() < READER_HOLD_BACK;
            if state & RESIZING != 0 || hold_back {
                backoff(&mut spins);
                state = self.state.load(Ordering::Relaxed);
                continue;
            }
            match self.state.compare_exchange_weak(
                state,
                state + 1,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return ReadPass { gate: self },
                Err(now) => state = now,
            }
        }
    }

    /// Waits until no read view is open and keeps new ones out, for at most `patience`.
    /// `None` when views stayed open that long (a view held far longer than it should be).
    pub(crate) fn resize(&self, patience: Duration) -> Option<ResizePass<'_>> {
        let deadline = Instant::now() + patience;
        let mut spins = 0u32;
        self.state.fetch_or(WANT, Ordering::Relaxed);
        loop {
            if self
                .state
                .compare_exchange_weak(WANT, RESIZING, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return Some(ResizePass { gate: self });
            }
            if Instant::now() >= deadline {
                self.state.fetch_and(!WANT, Ordering::Relaxed);
                return None;
            }
            backoff(&mut spins);
        }
    }

    /// Open read views (for tests).
    #[cfg(test)]
    pub(crate) fn readers(&self) -> usize {
        self.state.load(Ordering::Relaxed) & COUNT
    }
}

impl Drop for ReadPass<'_> {
    fn drop(&mut self) {
        self.gate.state.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for ResizePass<'_> {
    fn drop(&mut self) {
        self.gate.state.store(0, Ordering::Release);
    }
}

fn backoff(spins: &mut u32) {
    if *spins < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
    *spins = spins.saturating_add(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn resize_waits_for_open_views_and_nested_views_do_not_block() {
        let gate = ResizeGate::default();
        let outer = gate.read();
        let inner = gate.read();
        assert_eq!(gate.readers(), 2);
        assert!(gate.resize(Duration::from_millis(20)).is_none());
        drop(inner);
        drop(outer);
        let pass = gate
            .resize(Duration::from_millis(20))
            .expect("no view is open");
        drop(pass);
        assert_eq!(gate.readers(), 0);
        drop(gate.read());
    }

    #[test]
    fn a_view_opened_inside_a_view_while_the_writer_waits_does_not_deadlock() {
        let gate = Arc::new(ResizeGate::default());
        let outer = gate.read();
        let writer = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.resize(Duration::from_secs(10)).is_some())
        };
        // Give the writer time to set WANT, then nest: this holds back briefly, then enters.
        std::thread::sleep(Duration::from_millis(20));
        let started = Instant::now();
        let inner = gate.read();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(gate.readers(), 2);
        drop(inner);
        drop(outer);
        assert!(
            writer.join().unwrap(),
            "the writer got the gate once both ended"
        );
        assert_eq!(gate.readers(), 0);
        drop(gate.read());
    }

    #[test]
    fn readers_never_overlap_a_resize() {
        let gate = Arc::new(ResizeGate::default());
        let resizing = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (gate, resizing, stop) = (gate.clone(), resizing.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut views = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let _pass = gate.read();
                        assert!(
                            !resizing.load(Ordering::SeqCst),
                            "a view overlapped a resize"
                        );
                        views += 1;
                    }
                    views
                })
            })
            .collect();
        for _ in 0..200 {
            let pass = gate
                .resize(Duration::from_secs(5))
                .expect("readers are short");
            resizing.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_micros(50));
            resizing.store(false, Ordering::SeqCst);
            drop(pass);
        }
        stop.store(true, Ordering::Relaxed);
        for reader in readers {
            assert!(reader.join().unwrap() > 0);
        }
    }
}
