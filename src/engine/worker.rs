//! The per-shard inference worker: one sentence-encoder session on a dedicated thread pinned
//! next to its shard, fed through a bounded crossbeam channel, answering through oneshots that
//! an async shard task awaits.
//!
//! The shard calls [`InferenceHandle::embed`]; that only does a `try_send`, so the shard's
//! event loop never blocks on inference: a full queue, or a queue whose expected wait is
//! already longer than `max_wait`, is refused at once with [`EmbedError::Overloaded`] and the
//! caller degrades (the intent engine falls back to a lexical match). The future it returns
//! resolves when the worker has embedded the text; the worker wakes the shard's task from its
//! own thread (glommio routes foreign wakes to the task's executor).
//!
//! Batching: the worker blocks for the first request, then keeps collecting until it has
//! `max_batch` requests or `batch_window` has passed since the first one was sent, and runs
//! them in one [`Encoder::encode_batch`] call (which groups texts of similar length, see the
//! encoder). A request that already waited longer than the window is not held back further.
//! A lone request is not held back either: one sent more than `batch_window` after the
//! request before it, with nothing else queued, runs at once ([`waits_for_company`]), since
//! a window only pays when requests come close together. Requests that queue while the
//! worker is busy, or arrive within `batch_window` of the one before, still batch. The
//! trade-off: of a burst that follows a quiet gap, the first request runs alone when the
//! worker wakes before the others are queued, and the others then wait for its model call
//! (several milliseconds) instead of the window. Without the rule, every question on a quiet
//! shard waited out the whole window for company that was not coming.
//!
//! Invariants:
//! - Every accepted request is answered exactly once: with its vector, [`EmbedError::Expired`]
//!   when it had waited more than `max_wait` before its batch started (it is then not
//!   embedded), or [`EmbedError::Failed`] when the model failed. A request whose worker has
//!   gone resolves to [`EmbedError::Stopped`].
//! - [`WorkerStats::pending`] counts requests accepted and not yet answered; the expected
//!   wait of a new request is `pending × service time per text` (a moving average).
//! - With [`WorkerOptions::metrics`] the worker thread owns the shard's inference histograms
//!   (queue wait per request, texts per model call) and publishes them after a batch at most
//!   once a second and whenever it has been idle for a second (see [`crate::metrics::histogram`]).
//! - The thread ends when the [`InferenceHandle`] is dropped (the drop waits for the batch in
//!   progress). After a second without requests the worker releases its token buffers.
//!
//! Loading: [`InferenceWorker::start_loading`] returns at once; the worker thread loads the
//! primary model itself while a helper thread loads the companion (if any), so a shard can
//! accept connections before any model is ready. [`InferenceHandle::primary`] and
//! [`InferenceHandle::companion`] say what is ready (set once, never unset); requests queued
//! before the primary is ready wait for it, and a [`Part::Companion`] request before the
//! companion is attached is answered [`EmbedError::Failed`]. Readiness is logged with timings.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender, TrySendError};
use futures_channel::oneshot;

use super::encoder::{Encoder, EncoderError, Part};
use super::finetune::TopLayers;
use crate::config::InferenceConfig;
use crate::metrics::histogram::{Family, Recorder, PUBLISH_INTERVAL};
use crate::metrics::Metrics;

/// Why a text was not embedded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmbedError {
    #[error("the inference queue is full or its expected wait exceeds max_wait")]
    Overloaded,
    #[error("the request waited {waited:?} in the inference queue, more than max_wait")]
    Expired { waited: Duration },
    #[error("the inference worker has stopped")]
    Stopped,
    #[error("inference failed: {0}")]
    Failed(String),
}

/// How a worker batches and when it refuses work.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerOptions {
    /// Most texts in one model call (at least 1).
    pub max_batch: usize,
    /// How long after the first request of a batch the worker waits for more.
    pub batch_window: Duration,
    /// A request that would wait longer than this is refused or expires.
    pub max_wait: Duration,
    /// Requests the channel holds (at least 1).
    pub queue_capacity: usize,
    /// Where the worker publishes its queue-wait and batch-size histograms (`None`: nowhere,
    /// as for the command line and the tests).
    pub metrics: Option<WorkerMetrics>,
}

/// A shard's histograms an inference worker records into (its thread owns the recorders).
#[derive(Clone, Debug)]
pub struct WorkerMetrics {
    metrics: Metrics,
    shard: usize,
}

impl WorkerMetrics {
    pub fn new(metrics: Metrics, shard: usize) -> WorkerMetrics {
        WorkerMetrics { metrics, shard }
    }

    fn recorders(&self) -> WorkerRecorders {
        let histograms = self.metrics.histograms(self.shard);
        WorkerRecorders {
            queue_wait: histograms.recorder(Family::InferenceQueueWait),
            batch_size: histograms.recorder(Family::InferenceBatchSize),
            published: Instant::now(),
        }
    }
}

/// Options compare by their settings; where metrics go is not one.
impl PartialEq for WorkerMetrics {
    fn eq(&self, other: &Self) -> bool {
        self.shard == other.shard
    }
}

/// The worker thread's recorders, published at most every [`PUBLISH_INTERVAL`] after a batch
/// and when the worker goes idle.
struct WorkerRecorders {
    queue_wait: Recorder,
    batch_size: Recorder,
    published: Instant,
}

impl WorkerRecorders {
    fn publish(&mut self) {
        self.queue_wait.publish();
        self.batch_size.publish();
        self.published = Instant::now();
    }

    fn publish_if_due(&mut self) {
        if self.published.elapsed() >= PUBLISH_INTERVAL {
            self.publish();
        }
    }
}

impl WorkerOptions {
    /// `[inference] max_batch`, `batch_window` and `max_wait`; the queue holds 16 batches
    /// (at least 64 requests). The expected-wait check refuses work long before that fills
    /// up unless the model is very fast.
    pub fn from_config(inference: &InferenceConfig) -> Self {
        WorkerOptions {
            max_batch: inference.max_batch,
            batch_window: inference.batch_window,
            max_wait: inference.max_wait,
            queue_capacity: (inference.max_batch * 16).clamp(64, 16_384),
            metrics: None,
        }
    }
}

/// Counters shared by the worker thread and its handle.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pending: AtomicUsize,
    /// Moving average of the model time per text, in nanoseconds, as f64 bits (0: unknown).
    service_ns_per_text: AtomicU64,
    batches: AtomicU64,
    embedded: AtomicU64,
    expired: AtomicU64,
    failed: AtomicU64,
    overloaded: AtomicU64,
    busy_ns: AtomicU64,
    running: AtomicBool,
    primary: OnceLock<ModelInfo>,
    companion: OnceLock<ModelInfo>,
    /// Set when loading ends: both models loaded, or one failed.
    loading_done: AtomicBool,
    load_error: OnceLock<String>,
}

/// A loaded model as the worker publishes it: its fingerprint and vector width.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// [`Encoder::primary_fingerprint`] of the model (with its text prefix).
    pub fingerprint: String,
    pub dim: usize,
    /// The model exposes an inner-layer output, so it can embed with tuned top layers
    /// ([`InferenceHandle::embed_tuned`]).
    pub tunable: bool,
    /// From the worker's start to the model answering its warm-up text.
    pub load_time: Duration,
}

/// Loads one model (on the worker thread or the companion's helper thread).
pub type ModelLoader = Box<dyn FnOnce() -> Result<Encoder, EncoderError> + Send>;

/// A copy of a worker's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct WorkerSnapshot {
    /// Requests accepted and not answered yet.
    pub pending: usize,
    /// Moving average of the model time per text (zero before the first batch).
    pub service_time_per_text: Duration,
    /// Model calls made (batches run).
    pub batches: u64,
    /// Texts embedded.
    pub embedded: u64,
    /// Requests answered `Expired`.
    pub expired: u64,
    /// Requests answered `Failed`.
    pub failed: u64,
    /// Requests refused with `Overloaded`.
    pub overloaded: u64,
    /// Time spent in the model.
    pub busy: Duration,
}

impl WorkerStats {
    fn service_ns_per_text(&self) -> f64 {
        f64::from_bits(self.service_ns_per_text.load(Ordering::Relaxed))
    }

    fn record_batch(&self, texts: usize, elapsed: Duration) {
        // Weight 0.2: follows a change of load within a few batches, smooths single outliers.
        const WEIGHT: f64 = 0.2;
        let per_text = elapsed.as_nanos() as f64 / texts.max(1) as f64;
        let old = self.service_ns_per_text();
        let new = if old == 0.0 {
            per_text
        } else {
            old + WEIGHT * (per_text - old)
        };
        self.service_ns_per_text
            .store(new.to_bits(), Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.busy_ns
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    fn snapshot(&self) -> WorkerSnapshot {
        WorkerSnapshot {
            pending: self.pending.load(Ordering::Relaxed),
            service_time_per_text: Duration::from_nanos(self.service_ns_per_text() as u64),
            batches: self.batches.load(Ordering::Relaxed),
            embedded: self.embedded.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            overloaded: self.overloaded.load(Ordering::Relaxed),
            busy: Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed)),
        }
    }
}

/// The answer to one request.
pub type EmbedResult = Result<Vec<f32>, EmbedError>;

struct Request {
    text: String,
    part: Part,
    /// Top layers tuned for the knowledge base: run over the model's inner output instead of
    /// its own top layers (`part` is then [`Part::Primary`]).
    tuned: Option<Arc<TopLayers>>,
    sent: Instant,
    reply: oneshot::Sender<EmbedResult>,
}

/// Starts inference workers.
pub struct InferenceWorker;

impl InferenceWorker {
    /// Moves an already loaded `encoder` (and its companion, if any) to a new worker thread;
    /// see [`start_loading`](Self::start_loading).
    pub fn start(
        shard: usize,
        core: usize,
        mut encoder: Encoder,
        options: WorkerOptions,
    ) -> std::io::Result<InferenceHandle> {
        let companion = encoder.take_companion();
        let companion = companion.map(|c| Box::new(move || Ok(c)) as ModelLoader);
        Self::start_loading(
            shard,
            core,
            Box::new(move || Ok(encoder)),
            companion,
            options,
        )
    }

    /// Starts a thread named `switchboard-infer-<shard>`, pinned to `core` (a warning is
    /// logged and the thread runs unpinned if the core cannot be used), that loads the primary
    /// model with `primary` while `companion` (if any) loads on a helper thread, and returns at
    /// once the handle the shard submits texts through. A model that fails to load is logged;
    /// without a primary the thread ends ([`InferenceHandle::is_running`] turns false).
    pub fn start_loading(
        shard: usize,
        core: usize,
        primary: ModelLoader,
        companion: Option<ModelLoader>,
        options: WorkerOptions,
    ) -> std::io::Result<InferenceHandle> {
        let options = WorkerOptions {
            max_batch: options.max_batch.max(1),
            queue_capacity: options.queue_capacity.max(1),
            ..options
        };
        let (sender, receiver) = channel::bounded(options.queue_capacity);
        let stats = Arc::new(WorkerStats::default());
        stats.running.store(true, Ordering::Relaxed);
        let thread_stats = stats.clone();
        let thread_options = options.clone();
        let thread = std::thread::Builder::new()
            .name(format!("switchboard-infer-{shard}"))
            .spawn(move || {
                let started = Instant::now();
                // core_affinity does not check the id (an id past the CPU set panics in
                // libc's CPU_SET), so only a core the process may use is asked for.
                let pinned = core_affinity::get_core_ids()
                    .unwrap_or_default()
                    .into_iter()
                    .find(|candidate| candidate.id == core)
                    .is_some_and(core_affinity::set_for_current);
                if !pinned {
                    tracing::warn!(shard, core, "cannot pin the inference worker to its core");
                }
                let companion = companion.map(|load| load_companion(shard, started, load));
                match load_primary(shard, started, primary, &thread_stats) {
                    Some(encoder) => {
                        if companion.is_none() {
                            thread_stats.loading_done.store(true, Ordering::Release);
                        }
                        let recorders = thread_options
                            .metrics
                            .as_ref()
                            .map(WorkerMetrics::recorders);
                        run(
                            encoder,
                            receiver,
                            companion,
                            &thread_options,
                            &thread_stats,
                            recorders,
                        );
                    }
                    None => {
                        thread_stats.loading_done.store(true, Ordering::Release);
                        // Answer what was queued meanwhile: the caller degrades.
                        thread_stats.running.store(false, Ordering::Relaxed);
                        for request in receiver.try_iter() {
                            thread_stats.pending.fetch_sub(1, Ordering::Relaxed);
                            let _ = request.reply.send(Err(EmbedError::Stopped));
                        }
                    }
                }
                thread_stats.running.store(false, Ordering::Relaxed);
            })?;
        Ok(InferenceHandle {
            sender: Some(sender),
            stats,
            options,
            thread: Some(thread),
        })
    }
}

/// Loads the primary model and embeds a warm-up text (which also tells its width); publishes
/// it in `stats`. `None` (logged) when it cannot be loaded.
fn load_primary(
    shard: usize,
    started: Instant,
    load: ModelLoader,
    stats: &WorkerStats,
) -> Option<Encoder> {
    let warmed = load().and_then(|mut encoder| {
        let dim = encoder.encode_part_into(&["hello"], Part::Primary, &mut Vec::new())?;
        Ok((encoder, dim))
    });
    match warmed {
        Ok((encoder, dim)) => {
            let info = ModelInfo {
                fingerprint: encoder.primary_fingerprint().to_owned(),
                dim,
                tunable: encoder.split_output().is_some(),
                load_time: started.elapsed(),
            };
            tracing::info!(
                shard,
                load_ms = millis(info.load_time),
                model = %info.fingerprint,
                "primary model ready"
            );
            let _ = stats.primary.set(info);
            Some(encoder)
        }
        Err(error) => {
            tracing::error!(shard, %error, "cannot load the model: answering lexically (degraded)");
            let _ = stats.load_error.set(error.to_string());
            None
        }
    }
}

/// The companion loading on its own thread (warm-up included); the worker attaches it
/// between batches.
fn load_companion(
    shard: usize,
    started: Instant,
    load: ModelLoader,
) -> Receiver<Result<(Encoder, Duration), EncoderError>> {
    let (sender, receiver) = channel::bounded(1);
    let spawned = std::thread::Builder::new()
        .name(format!("switchboard-load-{shard}"))
        .spawn(move || {
            let loaded = load().and_then(|mut encoder| {
                encoder.encode_part_into(&["hello"], Part::Primary, &mut Vec::new())?;
                Ok((encoder, started.elapsed()))
            });
            let _ = sender.send(loaded);
        });
    if let Err(error) = spawned {
        tracing::error!(shard, %error, "cannot start the companion model's loading thread");
    }
    receiver
}

fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1e4).round() / 10.0
}

/// The future of a submission's answer (a refusal resolves at once).
async fn answer_of(submitted: Result<oneshot::Receiver<EmbedResult>, EmbedError>) -> EmbedResult {
    match submitted {
        Ok(answer) => answer.await.unwrap_or(Err(EmbedError::Stopped)),
        Err(error) => Err(error),
    }
}

/// The shard's side of an inference worker. Dropping it stops the worker.
pub struct InferenceHandle {
    sender: Option<Sender<Request>>,
    stats: Arc<WorkerStats>,
    options: WorkerOptions,
    thread: Option<JoinHandle<()>>,
}

impl InferenceHandle {
    /// Submits `text` without blocking and returns a future of its embedding (unit length).
    ///
    /// The submission happens now, not when the future is first polled: a refusal
    /// ([`EmbedError::Overloaded`], [`EmbedError::Stopped`]) is decided before this returns
    /// and the future resolves to it at once.
    pub fn embed(&self, text: &str) -> impl Future<Output = EmbedResult> + 'static {
        self.embed_part(text, Part::Joined)
    }

    /// [`embed`](Self::embed) with one [`Part`] of the encoder.
    pub fn embed_part(
        &self,
        text: &str,
        part: Part,
    ) -> impl Future<Output = EmbedResult> + 'static {
        answer_of(self.submit(text, part, None))
    }

    /// [`embed`](Self::embed) with the primary model's lower layers and `tuned` top layers
    /// (the knowledge base's fine-tuned ones; see `engine::finetune`). Fails for a model
    /// without an inner output ([`ModelInfo::tunable`]).
    pub fn embed_tuned(
        &self,
        text: &str,
        tuned: Arc<TopLayers>,
    ) -> impl Future<Output = EmbedResult> + 'static {
        answer_of(self.submit(text, Part::Primary, Some(tuned)))
    }

    fn submit(
        &self,
        text: &str,
        part: Part,
        tuned: Option<Arc<TopLayers>>,
    ) -> Result<oneshot::Receiver<EmbedResult>, EmbedError> {
        let Some(sender) = &self.sender else {
            return Err(EmbedError::Stopped);
        };
        if self.expected_wait() > self.options.max_wait {
            self.stats.overloaded.fetch_add(1, Ordering::Relaxed);
            return Err(EmbedError::Overloaded);
        }
        let (reply, answer) = oneshot::channel();
        self.stats.pending.fetch_add(1, Ordering::Relaxed);
        let request = Request {
            text: text.to_owned(),
            part,
            tuned,
            sent: Instant::now(),
            reply,
        };
        match sender.try_send(request) {
            Ok(()) => Ok(answer),
            Err(error) => {
                self.stats.pending.fetch_sub(1, Ordering::Relaxed);
                match error {
                    TrySendError::Full(_) => {
                        self.stats.overloaded.fetch_add(1, Ordering::Relaxed);
                        Err(EmbedError::Overloaded)
                    }
                    TrySendError::Disconnected(_) => Err(EmbedError::Stopped),
                }
            }
        }
    }

    /// Requests accepted and not answered yet (queued or in the batch being run).
    pub fn queue_depth(&self) -> usize {
        self.stats.pending.load(Ordering::Relaxed)
    }

    /// How long a request submitted now is expected to wait for its answer:
    /// [`queue_depth`](Self::queue_depth) × the moving average of the model time per text.
    pub fn expected_wait(&self) -> Duration {
        let per_text = self.stats.service_ns_per_text();
        Duration::from_nanos((self.queue_depth() as f64 * per_text) as u64)
    }

    /// Whether the worker thread is alive.
    pub fn is_running(&self) -> bool {
        self.stats.running.load(Ordering::Relaxed)
    }

    /// The primary model, once it is loaded.
    pub fn primary(&self) -> Option<&ModelInfo> {
        self.stats.primary.get()
    }

    /// The companion model, once it is loaded and attached.
    pub fn companion(&self) -> Option<&ModelInfo> {
        self.stats.companion.get()
    }

    /// Whether loading has ended (every model loaded, or one failed).
    pub fn loading_done(&self) -> bool {
        self.stats.loading_done.load(Ordering::Acquire)
    }

    /// Why a model could not be loaded, if one could not.
    pub fn load_error(&self) -> Option<&str> {
        self.stats.load_error.get().map(String::as_str)
    }

    /// Blocks the calling thread until loading has ended or `timeout` passed; returns whether
    /// it ended. For the command line and tests, never a shard.
    pub fn wait_loaded(&self, timeout: Duration) -> bool {
        // `None`: too far away to represent, i.e. no deadline.
        let deadline = Instant::now().checked_add(timeout);
        while !self.loading_done() {
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    pub fn options(&self) -> &WorkerOptions {
        &self.options
    }

    pub fn stats(&self) -> WorkerSnapshot {
        self.stats.snapshot()
    }
}

impl Drop for InferenceHandle {
    fn drop(&mut self) {
        // Closing the channel ends the worker's loop once the current batch is answered.
        self.sender = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The worker loop: batch, embed, answer; returns when the channel is closed. Attaches the
/// companion between batches once its loading thread delivers it.
fn run(
    mut encoder: Encoder,
    receiver: Receiver<Request>,
    mut companion: Option<Receiver<Result<(Encoder, Duration), EncoderError>>>,
    options: &WorkerOptions,
    stats: &WorkerStats,
    mut recorders: Option<WorkerRecorders>,
) {
    const IDLE: Duration = Duration::from_secs(1);
    /// How often a worker waiting for its companion looks for it.
    const COMPANION_POLL: Duration = Duration::from_millis(10);
    let mut batch: Vec<Request> = Vec::with_capacity(options.max_batch);
    let mut holding_buffers = false;
    let mut idle_since = Instant::now();
    // When the last request taken from the queue was sent.
    let mut previous_sent: Option<Instant> = None;
    loop {
        if let Some(loading) = &companion {
            let delivered = match loading.try_recv() {
                Ok(result) => Some(result),
                Err(channel::TryRecvError::Empty) => None,
                Err(channel::TryRecvError::Disconnected) => Some(Err(
                    EncoderError::InvalidSetting("its loading thread ended".into()),
                )),
            };
            if let Some(result) = delivered {
                companion = None;
                attach_companion(&mut encoder, result, stats);
                stats.loading_done.store(true, Ordering::Release);
            }
        }
        let wait = if companion.is_some() {
            COMPANION_POLL
        } else {
            IDLE
        };
        let first = match receiver.recv_timeout(wait) {
            Ok(request) => request,
            Err(RecvTimeoutError::Timeout) => {
                if let Some(recorders) = &mut recorders {
                    recorders.publish();
                }
                if holding_buffers && idle_since.elapsed() >= IDLE {
                    encoder.release_buffers();
                    holding_buffers = false;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let window_end = if waits_for_company(
            previous_sent,
            first.sent,
            options.batch_window,
            !receiver.is_empty(),
        ) {
            first.sent + options.batch_window
        } else {
            // What is queued already still joins (a deadline in the past takes it at once).
            first.sent
        };
        previous_sent = Some(first.sent);
        batch.push(first);
        while batch.len() < options.max_batch {
            match receiver.recv_deadline(window_end) {
                Ok(request) => {
                    previous_sent = Some(request.sent);
                    batch.push(request);
                }
                Err(_) => break,
            }
        }
        // Joined vectors need both models: wait for a companion still loading.
        if batch.iter().any(|request| request.part == Part::Joined) {
            if let Some(loading) = companion.take() {
                let result = loading.recv().unwrap_or_else(|_| {
                    Err(EncoderError::InvalidSetting(
                        "its loading thread ended".into(),
                    ))
                });
                attach_companion(&mut encoder, result, stats);
                stats.loading_done.store(true, Ordering::Release);
            }
        }
        run_batch(
            &mut encoder,
            &mut batch,
            options.max_wait,
            stats,
            recorders.as_mut(),
        );
        if let Some(recorders) = &mut recorders {
            recorders.publish_if_due();
        }
        holding_buffers = true;
        idle_since = Instant::now();
    }
}

/// Whether a batch whose first request was sent at `first_sent` waits up to `window` for
/// more. It does unless that request was sent more than `window` after the one before it
/// (`previous_sent`) and nothing else is `queued`: a lone question runs at once. With no
/// request before it (the worker's first) it waits, so a first burst batches too.
fn waits_for_company(
    previous_sent: Option<Instant>,
    first_sent: Instant,
    window: Duration,
    queued: bool,
) -> bool {
    match previous_sent {
        None => true,
        Some(previous) => queued || first_sent.saturating_duration_since(previous) <= window,
    }
}

fn attach_companion(
    encoder: &mut Encoder,
    loaded: Result<(Encoder, Duration), EncoderError>,
    stats: &WorkerStats,
) {
    match loaded {
        Ok((companion, load_time)) => {
            let info = ModelInfo {
                fingerprint: companion.primary_fingerprint().to_owned(),
                dim: companion.primary_dim().unwrap_or(0),
                tunable: false,
                load_time,
            };
            match encoder.attach_companion(companion) {
                Ok(()) => {
                    tracing::info!(
                        load_ms = millis(info.load_time),
                        model = %info.fingerprint,
                        "companion model ready"
                    );
                    let _ = stats.companion.set(info);
                }
                Err(error) => {
                    tracing::error!(%error, "cannot use the companion model");
                    let _ = stats.load_error.set(error.to_string());
                }
            }
        }
        Err(error) => {
            tracing::error!(%error, "cannot load the companion model: the primary model answers alone");
            let _ = stats.load_error.set(error.to_string());
        }
    }
}

/// Answers every request of `batch` (leaving it empty).
fn run_batch(
    encoder: &mut Encoder,
    batch: &mut Vec<Request>,
    max_wait: Duration,
    stats: &WorkerStats,
    mut recorders: Option<&mut WorkerRecorders>,
) {
    let started = Instant::now();
    let answer = |request: Request, result: EmbedResult| {
        stats.pending.fetch_sub(1, Ordering::Relaxed);
        // The receiver may be gone (the caller gave up); nothing to do then.
        let _ = request.reply.send(result);
    };
    let mut live = Vec::with_capacity(batch.len());
    for request in batch.drain(..) {
        let waited = started.saturating_duration_since(request.sent);
        if let Some(recorders) = recorders.as_deref_mut() {
            recorders.queue_wait.record_duration(waited);
        }
        if waited > max_wait || request.reply.is_canceled() {
            stats.expired.fetch_add(1, Ordering::Relaxed);
            answer(request, Err(EmbedError::Expired { waited }));
        } else {
            live.push(request);
        }
    }
    if live.is_empty() {
        return;
    }
    // One model call per part (and set of tuned layers) asked for: almost always one.
    while let Some(first) = live.first() {
        let part = first.part;
        let tuned = first.tuned.clone();
        let same = |request: &Request| {
            request.part == part
                && match (&request.tuned, &tuned) {
                    (None, None) => true,
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    _ => false,
                }
        };
        let (group, rest): (Vec<Request>, Vec<Request>) = live.into_iter().partition(same);
        live = rest;
        let texts: Vec<&str> = group.iter().map(|request| request.text.as_str()).collect();
        if let Some(recorders) = recorders.as_deref_mut() {
            recorders.batch_size.record(texts.len() as u64);
        }
        let mut data = Vec::new();
        let encode_started = Instant::now();
        let result = match &tuned {
            Some(layers) => encoder.encode_tuned_into(&texts, layers, &mut data),
            None => encoder.encode_part_into(&texts, part, &mut data),
        };
        // Recorded before anyone is answered, so a caller that has its answer sees the
        // service time that includes it.
        stats.record_batch(group.len(), encode_started.elapsed());
        match result {
            Ok(dim) => {
                stats
                    .embedded
                    .fetch_add(group.len() as u64, Ordering::Relaxed);
                for (request, vector) in group.into_iter().zip(data.chunks_exact(dim)) {
                    answer(request, Ok(vector.to_vec()));
                }
            }
            Err(error) => {
                let message = error.to_string();
                tracing::warn!(error = %message, texts = group.len(), "inference failed");
                stats
                    .failed
                    .fetch_add(group.len() as u64, Ordering::Relaxed);
                for request in group {
                    answer(request, Err(EmbedError::Failed(message.clone())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! These tests run the real model (see `engine::testing`).

    use std::cell::Cell;
    use std::rc::Rc;

    use futures_lite::future::block_on;

    use super::*;
    use crate::engine::testing::load_encoder;

    fn options(max_batch: usize, batch_window: Duration, max_wait: Duration) -> WorkerOptions {
        WorkerOptions {
            max_batch,
            batch_window,
            max_wait,
            queue_capacity: 64,
            metrics: None,
        }
    }

    const TEXTS: [&str; 6] = [
        "where is my card?",
        "I still have not received my new card, what should I do",
        "exchange rate",
        "Why was I charged a fee for my transfer?",
        "hi",
        "can I top up with apple pay",
    ];

    #[test]
    fn batches_what_arrives_together_and_answers_each_its_own_vector() {
        let handle = InferenceWorker::start(
            0,
            0,
            load_encoder(128),
            options(8, Duration::from_millis(200), Duration::from_secs(10)),
        )
        .unwrap();
        let futures: Vec<_> = TEXTS.iter().map(|text| handle.embed(text)).collect();
        let vectors: Vec<Vec<f32>> = futures
            .into_iter()
            .map(|future| block_on(future).expect("embedded"))
            .collect();
        let stats = handle.stats();
        assert_eq!(
            (stats.batches, stats.embedded),
            (1, TEXTS.len() as u64),
            "{stats:?}"
        );
        assert_eq!(handle.queue_depth(), 0);
        assert!(stats.service_time_per_text > Duration::ZERO);
        // Each answer is its own text's embedding, as if embedded alone.
        let mut reference = load_encoder(128);
        for (text, vector) in TEXTS.iter().zip(&vectors) {
            let alone = reference.encode_batch(&[text]).unwrap();
            let difference = alone
                .row(0)
                .iter()
                .zip(vector)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(difference < 1e-5, "{text:?}: {difference}");
        }
    }

    #[test]
    fn a_lone_request_runs_at_once_and_close_ones_wait_for_company() {
        let window = Duration::from_millis(2);
        let t0 = Instant::now();
        let at = |micros: u64| t0 + Duration::from_micros(micros);
        // The worker's first request waits: a first burst batches.
        assert!(waits_for_company(None, at(0), window, false));
        // Sent within the window after the previous one: more are probably coming.
        assert!(waits_for_company(Some(at(0)), at(1_500), window, false));
        assert!(waits_for_company(Some(at(0)), at(2_000), window, false));
        // After a quiet gap, alone: runs at once; with others queued behind it: waits.
        assert!(!waits_for_company(Some(at(0)), at(2_001), window, false));
        assert!(waits_for_company(Some(at(0)), at(9_000), window, true));
        // A window of zero never waits once a request came before.
        assert!(!waits_for_company(
            Some(at(0)),
            at(1),
            Duration::ZERO,
            false
        ));
    }

    #[test]
    fn a_question_after_a_quiet_gap_does_not_wait_out_the_window() {
        // A long window, so that waiting it out cannot be mistaken for a slow model call.
        let window = Duration::from_millis(400);
        let handle = InferenceWorker::start(
            4,
            0,
            load_encoder(128),
            options(8, window, Duration::from_secs(10)),
        )
        .unwrap();
        let started = Instant::now();
        block_on(handle.embed("the worker's first request waits for company")).unwrap();
        assert!(started.elapsed() >= window, "{:?}", started.elapsed());
        std::thread::sleep(window + Duration::from_millis(50));
        // The model is warm now; a lone question takes one model call (milliseconds).
        let started = Instant::now();
        block_on(handle.embed("hi")).unwrap();
        let lone = started.elapsed();
        assert!(lone < window / 2, "a lone question took {lone:?}");
        assert_eq!(handle.stats().batches, 2);
    }

    fn count(results: &[EmbedResult], wanted: fn(&EmbedResult) -> bool) -> usize {
        results.iter().filter(|result| wanted(result)).count()
    }

    #[test]
    fn a_full_queue_is_refused_at_once_and_every_accepted_request_is_answered() {
        // One text per model call and room for two in the queue: a burst of 20 submitted in
        // microseconds cannot all fit while a call takes milliseconds.
        let handle = InferenceWorker::start(
            1,
            0,
            load_encoder(128),
            WorkerOptions {
                queue_capacity: 2,
                ..options(1, Duration::ZERO, Duration::from_secs(10))
            },
        )
        .unwrap();
        let futures: Vec<_> = (0..20)
            .map(|i| handle.embed(TEXTS[i % TEXTS.len()]))
            .collect();
        let results: Vec<EmbedResult> = futures.into_iter().map(block_on).collect();
        let embedded = count(&results, |r| r.is_ok());
        let overloaded = count(&results, |r| matches!(r, Err(EmbedError::Overloaded)));
        assert_eq!(embedded + overloaded, 20, "{results:?}");
        assert!((2..=4).contains(&embedded), "{results:?}");
        assert_eq!(handle.queue_depth(), 0);
        let stats = handle.stats();
        assert_eq!(
            (stats.overloaded, stats.embedded),
            (overloaded as u64, embedded as u64)
        );
    }

    /// About 120 tokens (close to the 128 the test encoder keeps): one model call on it takes
    /// several milliseconds even on a quiet fast machine (with 50 tokens a call sometimes took
    /// under the 1 ms the test below needs it to exceed).
    const LONG: &str = "I ordered a new card three weeks ago and it still has not arrived, the \
        tracking page says nothing and I am travelling next week, so I really need to know where \
        it is and whether I should cancel it and order another one before I leave. My partner \
        ordered one on the same day and got hers after four days, we live at the same address, \
        and the app still shows my old card as active although I reported it lost last month, \
        so please tell me what to do now";

    #[test]
    fn requests_that_would_wait_longer_than_max_wait_expire_or_are_refused() {
        let handle = InferenceWorker::start(
            2,
            0,
            load_encoder(128),
            options(1, Duration::ZERO, Duration::from_millis(1)),
        )
        .unwrap();
        // Before the model time is known every request is accepted; those queued behind a
        // model call (milliseconds) have waited more than 1 ms when their turn comes.
        let futures: Vec<_> = (0..6).map(|_| handle.embed(LONG)).collect();
        let results: Vec<EmbedResult> = futures.into_iter().map(block_on).collect();
        let embedded = count(&results, |r| r.is_ok());
        let expired = count(&results, |r| matches!(r, Err(EmbedError::Expired { .. })));
        assert_eq!(embedded + expired, 6, "{results:?}");
        assert!(expired >= 4, "{results:?}");
        assert_eq!(handle.stats().expired, expired as u64);
        assert_eq!(handle.queue_depth(), 0);
        // Once the model time is known, a request behind one in progress is expected to wait
        // longer than 1 ms and is refused without being queued.
        // On a loaded machine a thread wake-up alone can take longer than 1 ms, so give the
        // lone request many chances: one start within its budget is what this checks.
        let mut warmed = false;
        for _ in 0..200 {
            warmed |= block_on(handle.embed(LONG)).is_ok();
            if warmed {
                break;
            }
        }
        assert!(warmed, "the idle worker starts a lone request within 1 ms");
        assert!(handle.stats().service_time_per_text > Duration::from_millis(1));
        let first = handle.embed(LONG);
        assert_eq!(block_on(handle.embed("two")), Err(EmbedError::Overloaded));
        assert!(matches!(
            block_on(first),
            Ok(_) | Err(EmbedError::Expired { .. })
        ));
        assert_eq!(handle.queue_depth(), 0);
    }

    #[test]
    fn a_dropped_handle_stops_the_worker_and_an_unpinnable_core_is_tolerated() {
        let handle = InferenceWorker::start(
            3,
            usize::MAX,
            load_encoder(128),
            options(4, Duration::ZERO, Duration::from_secs(10)),
        )
        .unwrap();
        assert!(block_on(handle.embed("hello")).is_ok());
        assert!(handle.is_running());
        let pending = handle.embed("answered before the worker stops");
        drop(handle);
        assert!(block_on(pending).is_ok());
    }

    #[test]
    fn a_glommio_shard_keeps_running_while_it_awaits_an_embedding() {
        let handle = InferenceWorker::start(
            4,
            0,
            load_encoder(128),
            options(4, Duration::ZERO, Duration::from_secs(10)),
        )
        .unwrap();
        let ticks = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(256 << 10)
            .spawn(move || async move {
                let ticks = Rc::new(Cell::new(0u32));
                let done = Rc::new(Cell::new(false));
                let ticker = {
                    let (ticks, done) = (ticks.clone(), done.clone());
                    glommio::spawn_local(async move {
                        while !done.get() {
                            glommio::timer::sleep(Duration::from_millis(1)).await;
                            ticks.set(ticks.get() + 1);
                        }
                    })
                };
                let mut during = Vec::new();
                for text in TEXTS {
                    let before = ticks.get();
                    let vector = handle.embed(text).await.expect("embedded");
                    assert_eq!(vector.len(), 384);
                    during.push(ticks.get() - before);
                }
                done.set(true);
                ticker.await;
                during
            })
            .unwrap()
            .join()
            .unwrap();
        // A model call takes milliseconds; the 1 ms timer task ran meanwhile.
        assert!(
            ticks.iter().sum::<u32>() >= 3,
            "ticks during each await: {ticks:?}"
        );
    }
}
