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
//!
//! Priority: the pool is one thread, pinned to the shard's core. The group commit is on every
//! message's path, so [`BlockingJobs::set_up_commit_thread`] can give that thread a lower nice
//! value than the shard's: woken for a commit (or by its fdatasync's end) it then preempts the
//! shard's event loop instead of waiting for it to sleep (the figures: bench/README.md, "The
//! commit thread's priority"). Every other job ([`BlockingJobs::run`]: API reads, exports) runs
//! at the shard's own nice value, so a long one cannot starve the event loop;
//! [`BlockingJobs::run_commit`] runs at the raised one.

use std::cell::Cell;
use std::time::Duration;

/// Why [`BlockingJobs::set_up_commit_thread`] left the thread at the shard's priority.
#[derive(Debug, thiserror::Error)]
pub enum CommitThreadError {
    #[error("cannot change the commit thread's nice value: {0}")]
    Priority(std::io::Error),
    #[error(transparent)]
    Stopping(#[from] Stopping),
}

/// [`BlockingJobs::run`] after [`BlockingJobs::close`]: the shard is stopping.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("the shard is stopping: no new blocking job starts")]
pub struct Stopping;

/// The shard's blocking jobs in flight, and whether new ones may start.
#[derive(Debug, Default)]
pub struct BlockingJobs {
    in_flight: Cell<usize>,
    closed: Cell<bool>,
    /// `(raised, normal)` nice values while [`BlockingJobs::set_up_commit_thread`] raises the
    /// thread or once it did.
    priority: Cell<Option<(i32, i32)>>,
}

impl BlockingJobs {
    /// Names the pool's thread `name` (for `top -H` and `/proc`) and gives it nice value `nice`
    /// (lower is more urgent) while it waits for and runs commits; [`BlockingJobs::run`] sets it
    /// back to the shard's own value for each other job. A `nice` not below the shard thread's
    /// own leaves the priority alone. [`CommitThreadError::Priority`] when the process may not
    /// lower a nice value (it needs `CAP_SYS_NICE` or an `RLIMIT_NICE` that allows it, e.g.
    /// systemd's `LimitNICE=`): the thread keeps the shard's priority.
    pub async fn set_up_commit_thread(
        &self,
        name: &str,
        nice: i32,
    ) -> Result<(), CommitThreadError> {
        let normal = thread_nice().map_err(CommitThreadError::Priority)?;
        let name = std::ffi::CString::new(name).unwrap_or_default();
        let raise = nice < normal;
        // Set before the job runs, so that a job queued behind it is already wrapped; taken back
        // below if the raise fails (the wrapper's restore then fails harmlessly).
        if raise {
            self.priority.set(Some((nice, normal)));
        }
        let raised = self
            .run_commit(move || {
                // SAFETY: PR_SET_NAME reads a NUL-terminated string of which it keeps 15 bytes.
                unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
                if raise {
                    set_thread_nice(nice)
                } else {
                    Ok(())
                }
            })
            .await;
        let outcome = match raised {
            Err(stopping) => Err(CommitThreadError::Stopping(stopping)),
            Ok(result) => result.map_err(CommitThreadError::Priority),
        };
        if outcome.is_err() {
            self.priority.set(None);
        }
        outcome
    }

    /// Runs a group commit's `job` on the executor's blocking pool, at the raised priority if
    /// [`BlockingJobs::set_up_commit_thread`] set one; see [`BlockingJobs::run`].
    pub async fn run_commit<F, R>(&self, job: F) -> Result<R, Stopping>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        self.run_on_pool(job).await
    }

    /// Runs `job` on the executor's blocking pool, at the shard's own priority, and returns its
    /// result, or refuses with [`Stopping`] (without running it) once the set is closed.
    pub async fn run<F, R>(&self, job: F) -> Result<R, Stopping>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        match self.priority.get() {
            None => self.run_on_pool(job).await,
            Some((raised, normal)) => {
                self.run_on_pool(move || {
                    // Failures are ignored: the job runs either way, at worst at the raised value.
                    let _ = set_thread_nice(normal);
                    let _restore = RestoreNice(raised);
                    job()
                })
                .await
            }
        }
    }

    async fn run_on_pool<F, R>(&self, job: F) -> Result<R, Stopping>
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

/// Sets the calling thread's nice value back when dropped (a job that panicked included).
struct RestoreNice(i32);

impl Drop for RestoreNice {
    fn drop(&mut self) {
        let _ = set_thread_nice(self.0);
    }
}

/// The calling thread's id, for the per-thread priority calls (Linux's nice value is per thread).
fn thread_id() -> libc::id_t {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() as libc::id_t }
}

/// The calling thread's nice value.
fn thread_nice() -> std::io::Result<i32> {
    // getpriority returns -1 both for nice -1 and for an error; errno tells them apart.
    // SAFETY: errno is thread-local; getpriority has no memory preconditions.
    unsafe {
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, thread_id());
        if nice == -1 && *libc::__errno_location() != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(nice)
    }
}

/// Sets the calling thread's nice value.
fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority has no memory preconditions.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, thread_id(), nice) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
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

    #[test]
    fn commits_run_at_the_raised_priority_and_other_jobs_at_the_shards() {
        glommio::LocalExecutorBuilder::default()
            .make()
            .unwrap()
            .run(async {
                let jobs = BlockingJobs::default();
                let normal = thread_nice().unwrap();
                let nice_of_job = || thread_nice().unwrap();
                assert_eq!(jobs.run_commit(nice_of_job).await, Ok(normal));
                let raised = (normal - 3).max(-20);
                let name = || std::fs::read_to_string("/proc/thread-self/comm").unwrap();
                assert_ne!(jobs.run(name).await.unwrap().trim(), "sb-commit-test");
                let outcome = jobs.set_up_commit_thread("sb-commit-test", raised).await;
                assert_eq!(jobs.run(name).await.unwrap().trim(), "sb-commit-test");
                match outcome {
                    Err(CommitThreadError::Stopping(_)) => panic!("the set is open"),
                    Err(CommitThreadError::Priority(error)) => {
                        // Not permitted here (no CAP_SYS_NICE, no RLIMIT_NICE): nothing changed.
                        assert_eq!(error.kind(), std::io::ErrorKind::PermissionDenied);
                        assert_eq!(jobs.run_commit(nice_of_job).await, Ok(normal));
                        assert_eq!(jobs.run(nice_of_job).await, Ok(normal));
                    }
                    Ok(()) => {
                        assert_eq!(jobs.run_commit(nice_of_job).await, Ok(raised));
                        assert_eq!(jobs.run(nice_of_job).await, Ok(normal));
                        assert_eq!(
                            jobs.run_commit(nice_of_job).await,
                            Ok(raised),
                            "the thread is raised again after another job"
                        );
                    }
                }
                assert_eq!(
                    thread_nice().unwrap(),
                    normal,
                    "the shard's own thread is untouched"
                );
            });
    }
}
