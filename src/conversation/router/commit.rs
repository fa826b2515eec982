//! Group commit: storage operations queue here and a committer task applies each batch on the
//! shard's blocking thread (`ShardStore::apply`: one log record and fdatasync, or with
//! `durability = "batch"` one log record synced later by the flusher, and LMDB writes
//! that commit with the batch or, deferred, with the batches of the next `apply_interval`);
//! outcomes go back to the owner in commit order. Out of space, the batch's senders get
//! `storage_full` and writes back off.
//!
//! Invariants: an operation is acked (through its completion) only after the store committed it
//! (its log record synced, or written with `batch`, or LMDB's transaction committed without a
//! log); the acked batches
//! LMDB has not committed are applied by the first batch that ends `apply_interval` after their
//! transaction began, or by the committer at that time when no batch is in progress, and at
//! shutdown; no blocking job outlives the shard's executor.

use super::*;

/// With `durability = "batch"`, a thread syncs the write-ahead log (or, without one, the data
/// file) every `sync_interval`, off the shard and off the committer. A failed sync makes the
/// store's next batch checkpoint before it is acked (`store::flusher`).
pub(super) fn start_flusher(store: &ShardStore, interval: Duration, shard: usize) {
    let flusher = match store.flusher() {
        Ok(flusher) => flusher,
        Err(err) => {
            tracing::error!(shard, error = %err, "cannot start the batch flusher");
            return;
        }
    };
    let _ = std::thread::Builder::new()
        .name(format!("switchboard-flush-{shard}"))
        .spawn(move || loop {
            std::thread::sleep(interval);
            if let Err(err) = flusher.flush() {
                tracing::error!(shard, error = %err, "batch flush failed");
            }
        });
}

/// How long the committer waits before taking its next batch (unless `max_batch` operations
/// are pending, which commit at once):
/// - the first batch after an idle period waits `window`, so that the writes of one burst
///   share a commit;
/// - every batch waits until `interval` has passed since the previous commit started, so that
///   under a steady load commits come at most once per `interval` and each carries what
///   arrived meanwhile. A commit's fixed costs (the log's `fdatasync`, LMDB's meta and freelist
///   pages, the hand-off to the blocking thread, the wake-ups of the fan-out) are then paid per
///   `interval`, not per message or per short batch.
///
/// Measured (bench/README.md, "Commit pacing"): with 3 ms the server's CPU per round trip
/// fell by 25-35% at 1,000/s, about 33% at 5,000/s, 21% at 10,000/s and 11% at 20,000/s, and
/// p99 at 20,000/s went from 22-28 to 19 ms; p50 rose by about 2.5 ms at 1,000-5,000/s. Near
/// saturation (compare.sh's sweep) it saves little CPU and mostly adds its wait.
fn commit_wait(
    first: bool,
    window: Duration,
    interval: Duration,
    last_start: Option<std::time::Instant>,
    now: std::time::Instant,
) -> Duration {
    let windowed = if first { window } else { Duration::ZERO };
    let paced = last_start.map_or(Duration::ZERO, |last| {
        interval.saturating_sub(now.saturating_duration_since(last))
    });
    windowed.max(paced)
}

impl Router {
    /// This shard's blocking-pool jobs (see [`crate::blocking`]).
    pub fn blocking_jobs(&self) -> &Rc<crate::blocking::BlockingJobs> {
        &self.jobs
    }

    /// For shutdown: waits (up to `limit`) until the operations queued for the group commit
    /// are committed, then stops the committer and every new blocking job of this shard, and
    /// waits for the job in flight. After this no blocking job of the shard runs, so its
    /// executor may end.
    pub async fn finish_commits(&self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        while (self.committing.get() || !self.pending.borrow().is_empty())
            && std::time::Instant::now() < deadline
        {
            glommio::timer::sleep(Duration::from_millis(2)).await;
        }
        // From here the committer takes no new batch (nor the store): the apply below may hold it.
        self.stopping.set(true);
        // Deferred apply: the acked batches go into LMDB now, on the blocking thread that holds
        // their transaction. If a commit is still in flight (the limit passed), the store is not
        // here and they stay pending: the store's drop leaves them to the log's replay.
        if self.store_pending() {
            self.apply_pending().await;
        }
        let left = self.pending.borrow().len();
        if left > 0 {
            tracing::warn!(
                shard = self.shard,
                left,
                "stopping with operations not committed (none was acked)"
            );
        }
        self.jobs.close();
        self.jobs.drained().await;
    }

    /// Whether the store holds acked batches LMDB has not committed (deferred apply); the
    /// committer applies them once their transaction is `apply_interval` old and no batch is in
    /// progress, and `finish_commits` at shutdown.
    fn store_pending(&self) -> bool {
        self.store
            .borrow()
            .as_ref()
            .is_some_and(|store| store.has_pending())
    }

    /// Commits the deferred batches to LMDB on the blocking thread (see
    /// [`ShardStore::apply_pending`]). A failure leaves them pending (they are in the log) and is
    /// retried at the next idle interval or batch.
    async fn apply_pending(&self) {
        if self.jobs.is_closed() {
            return;
        }
        let Some(store) = self.store.borrow_mut().take() else {
            return;
        };
        self.committing.set(true);
        let (store, result) = self
            .jobs
            .run_commit(move || {
                let mut store = store;
                let result = store.apply_pending();
                (store, result)
            })
            .await
            .expect("the job set was open just before, with no await in between");
        *self.store.borrow_mut() = Some(store);
        self.committing.set(false);
        // Operations queued meanwhile rang nothing (see `queue_op`).
        if !self.pending.borrow().is_empty() {
            let _ = self.doorbell.try_send(());
        }
        if let Err(error) = result {
            if error.is_fatal() {
                panic!("shard {}: the LMDB environment failed: {error}", self.shard);
            }
            tracing::error!(shard = self.shard, %error, "cannot apply acked batches to LMDB yet (they are safe in the write-ahead log)");
        }
    }

    pub(super) fn queue_op(&self, op: Op, completion: Completion) {
        let mut pending = self.pending.borrow_mut();
        pending.push((op, completion, std::time::Instant::now()));
        ShardMetrics::set(&self.metrics().commit_pending, pending.len() as u64);
        // The first operation wakes an idle committer; a full batch ends its wait (see
        // `commit_loop`), so `max_batch` pending operations commit at once.
        let full_batch = pending.len() == self.config.borrow().storage.max_batch.max(1);
        if (pending.len() == 1 && !self.committing.get()) || full_batch {
            let _ = self.doorbell.try_send(());
        }
    }

    pub(super) async fn commit_loop(&self) {
        let Some(doorbell) = self.doorbell_rx.borrow_mut().take() else {
            return;
        };
        let window = self.config().storage.commit_window;
        let interval = self.config().storage.commit_interval;
        let max_batch = self.config().storage.max_batch.max(1);
        let apply_interval = self.apply_interval;
        let nice = self.config().storage.commit_nice;
        let thread = format!("sb-commit-{}", self.shard);
        if let Err(crate::blocking::CommitThreadError::Priority(error)) =
            self.jobs.set_up_commit_thread(&thread, nice).await
        {
            // Once per process, not once per shard: every shard would say the same.
            static WARNED: std::sync::atomic::AtomicBool =
                std::sync::atomic::AtomicBool::new(false);
            if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    nice,
                    %error,
                    "cannot give the commit threads [storage] commit_nice; group commits run at the \
                     process's priority (allow it with systemd's LimitNICE={nice:+}, as the shipped \
                     unit does, or CAP_SYS_NICE; or set commit_nice = 0)"
                );
            }
        }
        // When the previous commit started (see `commit_wait`).
        let mut last_start: Option<std::time::Instant> = None;
        loop {
            // Idle: wait for an operation, or (deferred apply) until the acked batches are due
            // in LMDB. Not once the shard is stopping: `finish_commits` applies them then.
            let due = self
                .store
                .borrow()
                .as_ref()
                .and_then(|store| store.pending_since())
                .filter(|_| !self.jobs.is_closed() && !self.stopping.get())
                .map(|since| apply_interval.saturating_sub(since.elapsed()));
            let rang = match due {
                None => doorbell.recv().await,
                Some(wait) => {
                    let rang =
                        futures_lite::future::or(async { Some(doorbell.recv().await) }, async {
                            glommio::timer::sleep(wait).await;
                            None
                        })
                        .await;
                    match rang {
                        Some(rang) => rang,
                        None => {
                            self.apply_pending().await;
                            continue;
                        }
                    }
                }
            };
            if rang.is_none() {
                break;
            }
            // Only the first batch after an idle period waits for the window;
            // operations that queued up during a commit have waited already.
            let mut first = true;
            loop {
                if self.pending.borrow().is_empty() {
                    break;
                }
                self.committing.set(true);
                // Wait for company (the window) and for the pacing interval, unless the batch is
                // full already or storage refuses writes (the refusal below then comes at once).
                let mut waited_window = Duration::ZERO;
                let now = std::time::Instant::now();
                if self.pending.borrow().len() < max_batch && !self.full.borrow().refuse(now) {
                    let wait = commit_wait(first, window, interval, last_start, now);
                    if !wait.is_zero() {
                        // `queue_op` rings the doorbell when the batch fills up meanwhile. A
                        // leftover ring only makes the outer loop look at an empty queue once.
                        futures_lite::future::or(glommio::timer::sleep(wait), async {
                            let _ = doorbell.recv().await;
                        })
                        .await;
                        if first {
                            waited_window = now.elapsed().min(window);
                        }
                    }
                }
                let started_at = std::time::Instant::now();
                last_start = Some(started_at);
                // The cost a queued message sees per commit ahead of it, for message shedding
                // (`admission::shed`): the window (if waited) and the write. The pacing wait is
                // left out: a backlog of `max_batch` or more commits back to back, unpaced.
                let cycle = started_at.checked_sub(waited_window).unwrap_or(started_at);
                let batch: Vec<(Op, Completion, std::time::Instant)> = {
                    let mut pending = self.pending.borrow_mut();
                    let take = pending.len().min(max_batch);
                    let batch = pending.drain(..take).collect();
                    ShardMetrics::set(&self.metrics().commit_pending, pending.len() as u64);
                    batch
                };
                let mut queued_at = Vec::with_capacity(batch.len());
                let (ops, completions): (Vec<Op>, Vec<Completion>) = batch
                    .into_iter()
                    .map(|(op, completion, at)| {
                        queued_at.push(at);
                        (op, completion)
                    })
                    .unzip();
                if self.full.borrow().refuse(std::time::Instant::now()) {
                    // Refused at once, not queued: the sender learns now and re-sends later.
                    let failure = CommitFailure {
                        code: "storage_full",
                        message: "storage is full; re-send later with the same id".into(),
                    };
                    for (op, completion) in ops.into_iter().zip(completions) {
                        self.on_owner(OwnerEvent::Committed {
                            completion,
                            op,
                            outcome: Err(failure.clone()),
                        });
                    }
                    first = false;
                    glommio::yield_if_needed().await;
                    continue;
                }
                if self.jobs.is_closed() || self.stopping.get() {
                    // The shard is stopping (see `finish_commits`): these ops were never
                    // acked; their clients resend them after the restart.
                    self.committing.set(false);
                    return;
                }
                let store = self
                    .store
                    .borrow_mut()
                    .take()
                    .expect("only the committer takes the store");
                let started = std::time::Instant::now();
                // No await since the `is_closed` check: the job set cannot refuse.
                let (store, ops, result) = self
                    .jobs
                    .run_commit(move || {
                        let mut store = store;
                        let result = store.apply(&ops);
                        (store, ops, result)
                    })
                    .await
                    .expect("the job set was open just before, with no await in between");
                let counters = self.metrics();
                ShardMetrics::add(&counters.store_commits, 1);
                ShardMetrics::add(&counters.store_commit_ops, ops.len() as u64);
                ShardMetrics::add(
                    &counters.store_commit_micros,
                    started.elapsed().as_micros() as u64,
                );
                {
                    // One clock read for the batch: every op's commit ended now.
                    let committed_at = std::time::Instant::now();
                    let mut histograms = self.histograms.borrow_mut();
                    histograms.commit_batch_size.record(ops.len() as u64);
                    for at in &queued_at {
                        histograms
                            .commit_latency
                            .record_duration(committed_at.saturating_duration_since(*at));
                    }
                }
                let mut cost = self.commit_cost.get();
                let cycle_micros = cycle.elapsed().as_micros() as u64;
                ShardMetrics::set(&counters.commit_recent_micros, cost.record(cycle_micros));
                self.commit_cost.set(cost);
                *self.store.borrow_mut() = Some(store);
                first = false;
                match result {
                    Ok(outcomes) => {
                        if self.full.borrow_mut().committed() {
                            tracing::warn!(shard = self.shard, "storage writable again");
                        }
                        // When each relayed message was queued; measured against one clock read
                        // once the whole batch's acks and relay frames are queued.
                        let mut relayed_queued_at = Vec::with_capacity(queued_at.len());
                        for (((op, completion), outcome), at) in ops
                            .into_iter()
                            .zip(completions)
                            .zip(outcomes)
                            .zip(queued_at)
                        {
                            let relayed = matches!(
                                completion,
                                Completion::VisitorMessage { .. } | Completion::AgentMessage { .. }
                            );
                            self.on_owner(OwnerEvent::Committed {
                                completion,
                                op,
                                outcome: Ok(outcome),
                            });
                            if relayed {
                                relayed_queued_at.push(at);
                            }
                        }
                        // The owner has now queued the acks and the relay frames.
                        let relayed_at = std::time::Instant::now();
                        let mut histograms = self.histograms.borrow_mut();
                        for at in relayed_queued_at {
                            histograms
                                .relay_latency
                                .record_duration(relayed_at.saturating_duration_since(at));
                        }
                    }
                    Err(err) => {
                        let failure = CommitFailure {
                            code: if err.is_full() {
                                "storage_full"
                            } else {
                                "storage_error"
                            },
                            message: err.to_string(),
                        };
                        if err.is_full() {
                            let retry_in = self.full.borrow_mut().full(std::time::Instant::now());
                            tracing::error!(shard = self.shard, error = %err, retry_in_ms = retry_in.as_millis() as u64, "storage full: refusing writes until a retry succeeds");
                        } else {
                            tracing::error!(shard = self.shard, error = %err, "group commit failed");
                        }
                        if err.is_fatal() {
                            // Every later commit would fail too: end the process through the
                            // panic hook (503 on the health endpoints, exit 70, restart by the
                            // service manager on a reopened store). Nothing of this batch was acked.
                            panic!("shard {}: the LMDB environment failed: {err}", self.shard);
                        }
                        for (op, completion) in ops.into_iter().zip(completions) {
                            self.on_owner(OwnerEvent::Committed {
                                completion,
                                op,
                                outcome: Err(failure.clone()),
                            });
                        }
                    }
                }
            }
            self.committing.set(false);
            // Ops queued while we were finishing rang nothing; loop again if any.
            if !self.pending.borrow().is_empty() {
                let _ = self.doorbell.try_send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::commit_wait;
    use std::time::{Duration, Instant};

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_first_batch_after_idle_waits_the_window_and_the_rest_do_not() {
        let now = Instant::now();
        assert_eq!(commit_wait(true, MS, Duration::ZERO, None, now), MS);
        assert_eq!(
            commit_wait(false, MS, Duration::ZERO, None, now),
            Duration::ZERO
        );
        assert_eq!(
            commit_wait(false, MS, Duration::ZERO, Some(now - 5 * MS), now),
            Duration::ZERO
        );
    }

    #[test]
    fn commits_start_at_least_an_interval_apart() {
        let now = Instant::now();
        // The previous commit started 1 ms ago: 2 ms of a 3 ms interval are left.
        assert_eq!(commit_wait(false, MS, 3 * MS, Some(now - MS), now), 2 * MS);
        // After an idle period the longer of the window and the rest of the interval.
        assert_eq!(commit_wait(true, MS, 3 * MS, Some(now - MS), now), 2 * MS);
        assert_eq!(
            commit_wait(true, 4 * MS, 3 * MS, Some(now - MS), now),
            4 * MS
        );
        // The interval has passed already, or there was no commit yet.
        assert_eq!(
            commit_wait(false, MS, 3 * MS, Some(now - 3 * MS), now),
            Duration::ZERO
        );
        assert_eq!(commit_wait(false, MS, 3 * MS, None, now), Duration::ZERO);
    }
}
