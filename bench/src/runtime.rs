//! The load generator's own thread-per-core runtime: one glommio executor per shard, pinned to a CPU, each
//! running its share of the sessions; a `Coordinator` shared with the main thread carries progress counters
//! (atomics, read by the progress bars) and the common start signal, so every shard starts its schedule at
//! the same instant. Shards share nothing else; their results come back through the join handles and are
//! merged on the main thread.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};

/// Counters the shards bump and the main thread reads for progress bars.
#[derive(Debug, Default)]
pub struct Progress {
    pub connected: AtomicU64,
    pub failed: AtomicU64,
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

impl Progress {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Barriers of a run. Shards `arrive` at the end of a phase; the main thread `release`s the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connections are set up; release gives the common start instant of the schedule.
    SetUp = 0,
    /// The load (ramp, schedule) is over; release starts the closing phase.
    Loaded = 1,
}

const PHASES: usize = 2;

/// State shared by all shards of one run and the main thread.
#[derive(Debug)]
pub struct Coordinator {
    pub shards: usize,
    /// Origin of every timestamp carried in messages (microseconds since `epoch`).
    pub epoch: Instant,
    pub progress: Progress,
    arrived: [AtomicUsize; PHASES],
    released: [OnceLock<Instant>; PHASES],
}

impl Coordinator {
    pub fn new(shards: usize) -> Arc<Coordinator> {
        Arc::new(Coordinator {
            shards,
            epoch: Instant::now(),
            progress: Progress::default(),
            arrived: Default::default(),
            released: Default::default(),
        })
    }

    /// Microseconds from the epoch to `t`.
    pub fn micros(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_micros() as u64
    }

    pub fn instant_at(&self, micros: u64) -> Instant {
        self.epoch + Duration::from_micros(micros)
    }

    /// Shard side of a barrier: this shard has finished `phase`.
    pub fn arrive(&self, phase: Phase) {
        self.arrived[phase as usize].fetch_add(1, Ordering::AcqRel);
    }

    /// Main-thread side: have all shards finished `phase`?
    pub fn all_arrived(&self, phase: Phase) -> bool {
        self.arrived[phase as usize].load(Ordering::Acquire) >= self.shards
    }

    /// Main-thread side: lets the shards go on after `phase`, at instant `at` (the common start time).
    pub fn release(&self, phase: Phase, at: Instant) {
        let _ = self.released[phase as usize].set(at);
    }

    pub fn is_released(&self, phase: Phase) -> bool {
        self.released[phase as usize].get().is_some()
    }

    /// Shard side: waits until the main thread releases `phase` and returns the instant it gave. Polls
    /// every millisecond; gives up after `limit` (returns `None`) so a wedged run cannot hang.
    pub async fn wait_release(&self, phase: Phase, limit: Duration) -> Option<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(at) = self.released[phase as usize].get() {
                return Some(*at);
            }
            if Instant::now() > deadline {
                return None;
            }
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Number of CPUs this process may run on.
pub fn available_cpus() -> Vec<usize> {
    core_affinity::get_core_ids()
        .map(|ids| ids.into_iter().map(|c| c.id).collect())
        .unwrap_or_default()
}

/// Runs `work(shard)` on `n` glommio executors, shard `i` pinned to `cores[i % cores.len()]` (unpinned
/// when `cores` is empty). While they run, `monitor` is called on the calling thread every 100 ms (for
/// progress bars) until all shards have finished. Returns the shard results in shard order.
pub fn run_shards<T, F, Fut>(
    n: usize,
    cores: &[usize],
    work: F,
    mut monitor: impl FnMut(),
) -> Result<Vec<T>, String>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = T> + 'static,
{
    let finished = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::with_capacity(n);
    for shard in 0..n {
        let placement = match cores.len() {
            0 => Placement::Unbound,
            k => Placement::Fixed(cores[shard % k]),
        };
        let work = work.clone();
        let finished = finished.clone();
        let handle = LocalExecutorBuilder::new(placement)
            .name(&format!("bench-shard-{shard}"))
            // The harness does no file I/O: keep the registered io_uring buffer small.
            .io_memory(1 << 20)
            .spawn(move || async move {
                let out = work(shard).await;
                finished.fetch_add(1, Ordering::AcqRel);
                out
            })
            .map_err(|e| format!("cannot start shard {shard}: {e}"))?;
        handles.push(handle);
    }
    while finished.load(Ordering::Acquire) < n {
        monitor();
        std::thread::sleep(Duration::from_millis(100));
    }
    monitor();
    handles
        .into_iter()
        .enumerate()
        .map(|(i, h)| h.join().map_err(|e| format!("shard {i} failed: {e}")))
        .collect()
}

/// Sleeps inside a shard until `at`. If `at` is already past (the task is behind its schedule) it still
/// yields once, so a task catching up cannot starve the shard's other tasks (glommio is cooperative).
pub async fn sleep_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        glommio::timer::sleep(at - now).await;
    } else {
        futures_lite::future::yield_now().await;
    }
}

/// Runs `fut` for at most `limit`; `None` if it did not finish in time (it is then dropped).
pub async fn with_timeout<T>(limit: Duration, fut: impl Future<Output = T>) -> Option<T> {
    glommio::timer::timeout(limit, async {
        Ok::<T, glommio::GlommioError<()>>(fut.await)
    })
    .await
    .ok()
}
