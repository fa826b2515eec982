//! The appliance's shard: what one pinned core runs.
//!
//! `shard_main` accepts connections on the shard's own listener and spawns one
//! small task per connection ([`connection`]). A sweeper task walks the arena
//! once a second to schedule pings and close sessions that went silent, so no
//! session carries a timer of its own. On shutdown the shard stops accepting,
//! asks every session to close with 1001 and waits for them up to
//! `shutdown_grace`, then lets the committer finish what is queued and waits for every
//! blocking-pool job of the shard before it returns (the executor must outlive them).
//! A [`heartbeat`] task beats in the shard's [`Liveness`] slot from start to return, for the
//! systemd watchdog ([`crate::service_manager`]); the shard marks the slot listening once its
//! acceptors run.
//!
//! Invariants: everything here lives on the shard's thread (`Rc`, `RefCell`);
//! the only things shared with other shards are the mesh, the metrics and the liveness slots
//! (each shard writes only its own).

mod admission;
mod api_driver;
pub mod connection;
mod heartbeat;
mod routes;
pub mod stream;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shards::{ShardContext, ShardId};

use crate::arena::{Arena, CloseRequest};
use crate::audit::AuditLog;
use crate::auth::{Authority, LoginLimiter};
use crate::buffers::BufferPool;
use crate::config::Config;
use crate::liveness::Liveness;
use crate::metrics::{Metrics, ShardMetrics};

use crate::conversation::router::Router;
pub use crate::conversation::router::ShardMessage;

/// Per-shard state: owned by one shard's thread.
pub struct Shard {
    pub id: ShardId,
    pub shard_count: usize,
    /// The configuration in force on this shard; a reload replaces it (see [`Shard::config`]).
    config: RefCell<Arc<Config>>,
    pub arena: Rc<RefCell<Arena>>,
    pub router: Rc<Router>,
    pub buffers: BufferPool,
    pub metrics: Metrics,
    /// The audit chain's writer (security-relevant events only; never on the message path).
    pub audit: AuditLog,
    /// Accounts, token key and settings: one per process, shared by every shard.
    pub authority: Arc<Authority>,
    /// The canned replies: one store per process, shared by every shard.
    pub canned: Arc<crate::canned::CannedStore>,
    /// Login attempts per IP and per account on this shard.
    pub login_limiter: RefCell<LoginLimiter>,
    /// Accept-time checks, session rates, the load sampler's state (see [`admission`]).
    pub admission: admission::Admission,
    started: Instant,
    shutting_down: Cell<bool>,
}

impl Shard {
    /// The configuration in force. Read it afresh for each decision: a reload
    /// ([`crate::reload`]) replaces it between two events.
    pub fn config(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    /// Puts a reloaded configuration in force on this shard: the admission limits, the bound
    /// on a session's backlog, and the router's (owner bounds, bot chains).
    pub fn apply_config(&self, config: Arc<Config>) {
        self.admission.apply(&config);
        self.arena
            .borrow_mut()
            .set_backlog_bound(config.limits.max_outbox_frames);
        self.router.apply_config(config.clone());
        *self.config.borrow_mut() = config;
    }

    /// Seconds since the shard started; the unit of session activity times.
    pub fn now_secs(&self) -> u32 {
        self.started.elapsed().as_secs() as u32
    }

    /// This shard's counters.
    pub fn counters(&self) -> &ShardMetrics {
        self.metrics.shard(self.id.0)
    }

    /// Publishes the number of open sessions, in total and by kind (after one opened or closed).
    pub fn publish_session_counts(&self) {
        let arena = self.arena.borrow();
        let counters = self.counters();
        ShardMetrics::set(&counters.sessions_open, arena.len() as u64);
        for (gauge, count) in counters.sessions_by_kind.iter().zip(arena.len_by_kind()) {
            ShardMetrics::set(gauge, count as u64);
        }
    }

    /// Whether the shard is draining for shutdown.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.get()
    }
}

/// What every shard shares with the rest of the process, handed to [`shard_main`].
#[derive(Clone)]
pub struct ShardShared {
    pub config: Arc<Config>,
    pub metrics: Metrics,
    pub audit: AuditLog,
    pub authority: Arc<Authority>,
    /// The canned replies: one store per process, shared by every shard.
    pub canned: Arc<crate::canned::CannedStore>,
    pub tls: Option<Arc<crate::tls::Certificates>>,
    /// The bot registry the shard's chains are built from (`Registry::default()` for the
    /// built-ins).
    pub handlers: crate::bot::Registry,
    /// Every shard's heartbeat and start-up slot; this shard writes its own.
    pub liveness: Arc<Liveness>,
    /// The blocklist main loaded, with the file's time then: every shard's starting point
    /// (see `admission::Admission::new`); `None` without `[limits] blocklist_file`.
    pub blocklist: Option<CheckedBlocklist>,
    /// The configuration in force, replaced by a reload (see [`crate::reload`]).
    pub live: Arc<crate::reload::LiveConfig>,
}

/// The blocklist as main loaded it before the shards started, and the file's modification time
/// read just before that load.
#[derive(Clone)]
pub struct CheckedBlocklist {
    pub list: crate::admission::Blocklist,
    pub mtime: Option<std::time::SystemTime>,
}

/// Runs one shard until shutdown.
pub async fn shard_main(context: ShardContext<ShardMessage>, shared: ShardShared) {
    let ShardShared {
        config,
        metrics,
        audit,
        authority,
        canned,
        tls,
        handlers,
        liveness,
        blocklist,
        live,
    } = shared;
    let arena = Rc::new(RefCell::new(Arena::with_backlog_bound(
        config.limits.max_outbox_frames,
    )));
    let router = match Router::open(
        context.id.0,
        context.core,
        context.shard_count,
        config.clone(),
        context.mesh.clone(),
        arena.clone(),
        metrics.clone(),
        &handlers,
    ) {
        Ok(router) => router,
        Err(err) => {
            // Nothing has been served yet: stop the process with a clear message.
            tracing::error!(shard = context.id.0, error = %err, "cannot start the shard");
            eprintln!("switchboard: {err}");
            std::process::exit(1);
        }
    };
    let shard_admission = admission::Admission::new(&config, blocklist);
    let shard = Rc::new(Shard {
        id: context.id,
        shard_count: context.shard_count,
        buffers: BufferPool::new(
            config.websocket.read_buffer_bytes,
            config.websocket.pool_max_idle_buffers,
        ),
        login_limiter: RefCell::new(LoginLimiter::from_config(&config)),
        config: RefCell::new(config),
        arena,
        router: router.clone(),
        metrics,
        audit,
        authority,
        canned,
        admission: shard_admission,
        started: Instant::now(),
        shutting_down: Cell::new(false),
    });
    let mesh_router = router.clone();
    context.serve_mesh(move |from, message: ShardMessage| mesh_router.on_mesh(from, message));
    router.start();
    let beating = glommio::spawn_local(heartbeat::run(shard.clone(), liveness.clone())).detach();
    let reloads = {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            let mut seen = live.generation();
            loop {
                glommio::timer::sleep(crate::reload::SHARD_POLL).await;
                let generation = live.generation();
                if generation != seen {
                    seen = generation;
                    shard.apply_config(live.current());
                    tracing::debug!(shard = shard.id.0, generation, "configuration reloaded");
                }
            }
        })
        .detach()
    };

    let listener = context
        .take_listener()
        .expect("the runtime binds a listener for every shard");
    let accept_shard = shard.clone();
    let acceptor = glommio::spawn_local(async move {
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    ShardMetrics::add(&accept_shard.counters().connections_accepted, 1);
                    if let Some((stream, peer)) = admission::on_accept(&accept_shard, stream, true)
                    {
                        glommio::spawn_local(connection::serve(accept_shard.clone(), stream, peer))
                            .detach();
                    }
                }
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning; the
                    // condition clears when sessions close.
                    tracing::warn!(shard = accept_shard.id.0, error = %err, "accept failed");
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
    .detach();

    let admission_tasks = admission::start(&shard);
    // The TLS listener is the runtime's second address when `[tls] listen` is set.
    let tls_acceptor = tls
        .zip(context.take_listener_at(1))
        .map(|(certificates, listener)| {
            glommio::spawn_local(accept_tls(shard.clone(), listener, certificates)).detach()
        });
    liveness.set_listening(shard.id.0);

    let sweeper_shard = shard.clone();
    let sweeper = glommio::spawn_local(async move {
        loop {
            glommio::timer::sleep(Duration::from_secs(1)).await;
            sweep(&sweeper_shard);
        }
    })
    .detach();

    context.shutdown.wait().await;
    shard.shutting_down.set(true);
    acceptor.cancel();
    if let Some(tls_acceptor) = tls_acceptor {
        tls_acceptor.cancel();
    }
    let grace = shard.config().server.shutdown_grace;
    let open = shard.arena.borrow().len();
    tracing::info!(
        shard = shard.id.0,
        open,
        "shutting down: closing sessions with 1001"
    );
    shard.arena.borrow_mut().for_each_mut(|_, record| {
        record.close.get_or_insert(CloseRequest {
            code: 1001,
            reason: "server shutting down",
        });
        Arena::wake(record);
    });
    let deadline = Instant::now() + grace;
    while !shard.arena.borrow().is_empty() && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    sweeper.cancel();
    for task in admission_tasks {
        task.cancel();
    }
    let left = shard.arena.borrow().len();
    if left > 0 {
        tracing::warn!(
            shard = shard.id.0,
            left,
            "sessions still open after the shutdown grace; dropping them"
        );
    }
    // Last: no blocking job (group commit, API request) may outlive this executor, or glommio's
    // pool thread panics sending it its result (see `crate::blocking`).
    shard.router.finish_commits(COMMIT_DRAIN).await;
    beating.cancel();
    reloads.cancel();
    liveness.set_finished(shard.id.0);
}

/// How long a stopping shard waits for the operations already queued for its group commit.
const COMMIT_DRAIN: Duration = Duration::from_secs(2);

/// Accepts on the TLS listener: each connection's TLS handshake (bounded by
/// `[http] handshake_timeout`) runs in its own task, then the same driver as plain connections.
async fn accept_tls(
    shard: Rc<Shard>,
    listener: glommio::net::TcpListener,
    certificates: Arc<crate::tls::Certificates>,
) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                ShardMetrics::add(&shard.counters().connections_accepted, 1);
                let Some((stream, peer)) = admission::on_accept(&shard, stream, false) else {
                    continue;
                };
                let shard = shard.clone();
                let config = certificates.current();
                glommio::spawn_local(async move {
                    let timeout = shard.config().http.handshake_timeout;
                    let handshake = futures_lite::future::or(
                        async { Some(crate::tls::accept(stream, config).await) },
                        async {
                            glommio::timer::sleep(timeout).await;
                            None
                        },
                    )
                    .await;
                    match handshake {
                        Some(Ok(tls)) => {
                            ShardMetrics::add(&shard.counters().tls_handshakes_completed, 1);
                            connection::serve(shard, tls, peer).await;
                        }
                        Some(Err(err)) => {
                            ShardMetrics::add(&shard.counters().tls_handshake_failures, 1);
                            admission::hostile(&shard, peer, "tls", &err.to_string());
                        }
                        None => {
                            ShardMetrics::add(&shard.counters().tls_handshake_failures, 1);
                            ShardMetrics::add(&shard.counters().handshake_timeouts, 1);
                        }
                    }
                })
                .detach();
            }
            Err(err) => {
                tracing::warn!(shard = shard.id.0, error = %err, "TLS accept failed");
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// How long a closing session may take to answer our close frame.
const CLOSE_TIMEOUT_SECS: u32 = 5;

/// Schedules pings for quiet sessions, closes the ones past the idle timeout,
/// and drops the ones that did not finish a close handshake in time.
fn sweep(shard: &Shard) {
    let now = shard.now_secs();
    let ping_after = shard.config().websocket.ping_interval.as_secs().max(1) as u32;
    let idle_after = shard.config().websocket.idle_timeout.as_secs().max(1) as u32;
    let mut timed_out = 0;
    shard.arena.borrow_mut().for_each_mut(|_, record| {
        let quiet = now.saturating_sub(record.last_activity);
        if let Some(since) = record.closing_since {
            if now.saturating_sub(since) >= CLOSE_TIMEOUT_SECS && !record.abort {
                record.abort = true;
                Arena::wake(record);
            }
        } else if quiet >= idle_after && record.close.is_none() {
            record.close = Some(CloseRequest {
                code: 1001,
                reason: "idle timeout",
            });
            timed_out += 1;
            Arena::wake(record);
        } else if quiet >= ping_after && record.ping_sent_at.is_none() && !record.ping_due {
            record.ping_due = true;
            Arena::wake(record);
        }
    });
    let counters = shard.counters();
    ShardMetrics::add(&counters.idle_timeouts, timed_out);
    ShardMetrics::set(&counters.pooled_buffers, shard.buffers.idle_count() as u64);
}
