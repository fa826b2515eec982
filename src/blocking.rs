//! The jobs a shard runs on glommio's blocking thread pool (group commits, API requests that
//! read or write LMDB and files), counted so that the shard's executor outlives every one.
//!
//! glommio's pool thread sends a job's result back to the executor that started it and panics
//! ("failed to send response", glommio `sys/blocking.rs`) when that executor has ended. So a
//! shard stops in this order (`server::shard_main`): it lets the committer finish what is
//! queued, [`BlockingJobs::close`]s (no new job starts; [`BlockingJobs::run`] refuses), waits
//! for [`BlockingJobs::drained`], and only then returns and lets its executor end.
//!
//! Invariants: per shard, on the shard's thread (`Cell`s, no locks). A job counts as in
//! flight from [`BlockingJobs::run`] until its result is back on the shard; the task awaiting
//! a job is never cancelled (no code cancels one), so the count reaches zero only when the
//! pool holds no job of this shard.

use std::cell::Cell;
use std::time::Duration;

/// [`BlockingJobs::run`] after [`BlockingJobs::close`]: the shard is stopping.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the shard is stopping: no new blocking job starts")]
pub struct Stopping;

/// The shard's blocking jobs in flight, and whether new ones may start.
#[derive(Debug, Default)]
pub struct BlockingJobs {
    in_flight: Cell<usize>,
    closed: Cell<bool>,
}

impl BlockingJobs {
    /// Runs `job` on the executor's blocking pool and returns its result, or refuses with
    /// [`Stopping`] (without running it) once the set is closed.
    pub async fn run<F, R>(&self, job: F) -> Result<R, Stopping>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        if self.closed.get() {
            return Err(Stopping);
        }
        self.in_flight.set(self.in_flight.get() + 1);
        let _in_flight = InFlight(&self.in_flight);
        Ok(glommio::executor().spawn_blocking(job).await)
    }

    /// No new job starts from now on.
    pub fn close(&self) {
        self.closed.set(true);
    }

    /// Whether [`BlockingJobs::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.get()
    }

    /// Jobs started and not yet returned.
    pub fn in_flight(&self) -> usize {
        self.in_flight.get()
    }

    /// Resolves once no job is in flight (checked every millisecond; call after
    /// [`BlockingJobs::close`], or new jobs may keep it waiting).
    pub async fn drained(&self) {
        while self.in_flight.get() > 0 {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Counts one job out when its awaiting future ends.
struct InFlight<'a>(&'a Cell<usize>);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn drained_waits_for_the_job_in_flight_and_close_refuses_new_ones() {
        glommio::LocalExecutorBuilder::default()
            .make()
            .unwrap()
            .run(async {
                let jobs = Rc::new(BlockingJobs::default());
                let finished = Arc::new(AtomicBool::new(false));
                let job_finished = finished.clone();
                let runner = jobs.clone();
                let slow = glommio::spawn_local(async move {
                    runner
                        .run(move || {
                            std::thread::sleep(Duration::from_millis(50));
                            job_finished.store(true, Ordering::SeqCst);
                            7
                        })
                        .await
                });
                // Let the job start.
                while jobs.in_flight() == 0 {
                    glommio::yield_if_needed().await;
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                jobs.close();
                assert!(jobs.is_closed());
                assert_eq!(jobs.run(|| 1).await, Err(Stopping));
                jobs.drained().await;
                assert!(
                    finished.load(Ordering::SeqCst),
                    "drained before the job ended"
                );
                assert_eq!(jobs.in_flight(), 0);
                assert_eq!(slow.await, Ok(7));
            });
    }
}
