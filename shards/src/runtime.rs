//! Starting, pinning and stopping the shards.
//!
//! [`Runtime::start`] binds the listeners, then starts one glommio executor per
//! core with `Placement::Fixed(core)`, so each shard's thread is pinned. Inside
//! each shard it joins the mesh, builds the shard-id/peer-id tables, and calls the
//! application's `shard_main` with a [`ShardContext`]: the shard's per-shard state
//! container (its id, its listeners (one per configured address), its mesh, the shutdown flag).
//!
//! Invariant: `shard_main` runs on the shard's own thread; nothing it creates is
//! shared with another shard except what it sends through the mesh.

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement};

use crate::listener::{bind_reuseport, ListenerError};
use crate::mesh::{Inbox, Mesh};
use crate::ShardId;

thread_local! {
    /// The shard whose executor runs on this thread, set when the shard starts.
    static CURRENT_SHARD: std::cell::Cell<Option<ShardId>> = const { std::cell::Cell::new(None) };
}

/// The shard running on the calling thread, or `None` off the shard threads (for a panic
/// hook, which runs on the panicking thread, to name the shard).
pub fn current_shard() -> Option<ShardId> {
    CURRENT_SHARD.with(|shard| shard.get())
}

/// How to start the runtime.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// CPU ids to pin one shard each to, in shard order.
    pub cores: Vec<usize>,
    /// Bytes of locked memory glommio reserves per shard for io_uring buffers.
    pub io_memory: usize,
    /// Addresses every shard listens on (each with `SO_REUSEPORT`), in order: shard listener `i`
    /// ([`ShardContext::take_listener_at`]) is bound to `listen[i]`. Empty for no listener.
    pub listen: Vec<SocketAddr>,
    /// Listen backlog of each shard's socket.
    pub backlog: i32,
    /// Capacity of each mesh channel, in messages.
    pub mesh_capacity: usize,
    /// Thread-name prefix; shards are named `<prefix>-<id>`.
    pub thread_name: String,
}

/// Why the runtime could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("no cores configured")]
    NoCores,
    #[error("core {core} is not available on this machine (available: {available:?})")]
    UnknownCore { core: usize, available: Vec<usize> },
    #[error(transparent)]
    Listener(#[from] ListenerError),
    #[error("cannot start shard {shard} on core {core}: {message}")]
    Spawn {
        shard: usize,
        core: usize,
        message: String,
    },
    #[error("shard {shard} panicked or failed: {message}")]
    ShardFailed { shard: usize, message: String },
}

/// The process-wide stop flag. Set by a signal handler; every shard polls it.
#[derive(Clone, Debug, Default)]
pub struct Shutdown(Arc<AtomicBool>);

impl Shutdown {
    /// Asks every shard to stop.
    pub fn trigger(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether a stop was asked for.
    pub fn is_triggered(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Resolves once a stop is asked for (checked every 20 ms, which costs
    /// nothing measurable and bounds the reaction time).
    pub async fn wait(&self) {
        while !self.is_triggered() {
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Everything a shard owns when it starts: the per-shard state container.
pub struct ShardContext<M: Send + 'static> {
    /// This shard's id.
    pub id: ShardId,
    /// How many shards there are.
    pub shard_count: usize,
    /// The CPU this shard is pinned to.
    pub core: usize,
    /// The process-wide stop flag.
    pub shutdown: Shutdown,
    /// Sending side of the mesh.
    pub mesh: Rc<Mesh<M>>,
    listeners: RefCell<Vec<Option<glommio::net::TcpListener>>>,
    inbox: RefCell<Option<Inbox<M>>>,
}

impl<M: Send + 'static> ShardContext<M> {
    /// Takes this shard's listener on the first configured address (once).
    pub fn take_listener(&self) -> Option<glommio::net::TcpListener> {
        self.take_listener_at(0)
    }

    /// Takes this shard's listener on the configured address `index` (once).
    pub fn take_listener_at(&self, index: usize) -> Option<glommio::net::TcpListener> {
        self.listeners.borrow_mut().get_mut(index)?.take()
    }

    /// Starts delivering mesh messages to `handler` (once). Messages from one
    /// sender arrive in the order sent.
    ///
    /// # Panics
    /// If called twice.
    pub fn serve_mesh<H>(&self, handler: H)
    where
        H: Fn(ShardId, M) + 'static,
    {
        let inbox = self
            .inbox
            .borrow_mut()
            .take()
            .expect("serve_mesh called twice");
        inbox.spawn(Rc::new(handler));
    }

    /// The shard owning `key` (see [`crate::owner_of`]).
    pub fn owner_of(&self, key: &[u8]) -> ShardId {
        crate::owner_of(key, self.shard_count)
    }
}

/// A started runtime.
pub struct Runtime {
    handles: Vec<glommio::ExecutorJoinHandle<()>>,
    local_addrs: Vec<SocketAddr>,
    shutdown: Shutdown,
}

impl Runtime {
    /// Binds the listeners and starts one pinned shard per configured core, each
    /// running `shard_main`.
    pub fn start<M, F, Fut>(config: RuntimeConfig, shard_main: F) -> Result<Runtime, RuntimeError>
    where
        M: Send + 'static,
        F: Fn(ShardContext<M>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let count = config.cores.len();
        if count == 0 {
            return Err(RuntimeError::NoCores);
        }
        let available: Vec<usize> = core_affinity::get_core_ids()
            .unwrap_or_default()
            .into_iter()
            .map(|core| core.id)
            .collect();
        if let Some(core) = config.cores.iter().find(|core| !available.contains(core)) {
            return Err(RuntimeError::UnknownCore {
                core: *core,
                available,
            });
        }

        // listeners[shard][address]
        let mut listeners: Vec<Vec<std::net::TcpListener>> =
            (0..count).map(|_| Vec::new()).collect();
        let mut local_addrs = Vec::with_capacity(config.listen.len());
        for addr in &config.listen {
            let (bound, local) = bind_reuseport(*addr, count, config.backlog)?;
            for (shard, listener) in bound.into_iter().enumerate() {
                listeners[shard].push(listener);
            }
            local_addrs.push(local);
        }

        let shutdown = Shutdown::default();
        let mesh_builder = MeshBuilder::<M, _>::full(count, config.mesh_capacity.max(1));
        // Filled by each shard once it has joined the mesh: shard id -> glommio peer id.
        let peer_ids: Arc<Vec<AtomicUsize>> =
            Arc::new((0..count).map(|_| AtomicUsize::new(usize::MAX)).collect());
        let shard_main = Arc::new(shard_main);

        let mut handles = Vec::with_capacity(count);
        for (index, (core, listener)) in config.cores.iter().copied().zip(listeners).enumerate() {
            let mesh_builder = mesh_builder.clone();
            let peer_ids = peer_ids.clone();
            let shard_main = shard_main.clone();
            let shard_shutdown = shutdown.clone();
            let mesh_capacity = config.mesh_capacity.max(1);
            let listener_fds: Vec<_> = listener.into_iter().map(IntoRawFd::into_raw_fd).collect();
            let spawned = LocalExecutorBuilder::new(Placement::Fixed(core))
                .name(&format!("{}-{index}", config.thread_name))
                .io_memory(config.io_memory)
                .spawn(move || async move {
                    // SAFETY: each fd was just created by `bind_reuseport` and its
                    // ownership moved here with `into_raw_fd`.
                    let listeners: Vec<_> = listener_fds
                        .into_iter()
                        .map(|fd| Some(unsafe { glommio::net::TcpListener::from_raw_fd(fd) }))
                        .collect();
                    let (senders, receivers) = mesh_builder
                        .join()
                        .await
                        .expect("a mesh sized for every shard cannot be full");
                    peer_ids[index].store(senders.peer_id(), Ordering::Release);
                    while peer_ids
                        .iter()
                        .any(|peer| peer.load(Ordering::Acquire) == usize::MAX)
                    {
                        glommio::timer::sleep(Duration::from_millis(1)).await;
                    }
                    let peer_of_shard: Rc<[usize]> = peer_ids
                        .iter()
                        .map(|peer| peer.load(Ordering::Acquire))
                        .collect();
                    let mut shard_of_peer = vec![0; peer_of_shard.len()];
                    for (shard, peer) in peer_of_shard.iter().enumerate() {
                        shard_of_peer[*peer] = shard;
                    }
                    let (to_self, from_self) =
                        glommio::channels::local_channel::new_bounded(mesh_capacity);
                    let id = ShardId(index);
                    CURRENT_SHARD.with(|shard| shard.set(Some(id)));
                    // SAFETY: sched_getcpu has no preconditions.
                    let running_on = unsafe { libc::sched_getcpu() };
                    tracing::info!(
                        shard = index,
                        core,
                        running_on,
                        "shard started, pinned to core {core}"
                    );
                    let context = ShardContext {
                        id,
                        shard_count: peer_of_shard.len(),
                        core,
                        shutdown: shard_shutdown,
                        mesh: Rc::new(Mesh::new(id, senders, peer_of_shard, to_self)),
                        listeners: RefCell::new(listeners),
                        inbox: RefCell::new(Some(Inbox {
                            receivers,
                            from_self,
                            shard_of_peer: shard_of_peer.into(),
                        })),
                    };
                    shard_main(context).await;
                });
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(err) => {
                    shutdown.trigger();
                    return Err(RuntimeError::Spawn {
                        shard: index,
                        core,
                        message: err.to_string(),
                    });
                }
            }
        }
        Ok(Runtime {
            handles,
            local_addrs,
            shutdown,
        })
    }

    /// The first address the shards listen on (with the real port when 0 was asked).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addrs.first().copied()
    }

    /// Every address the shards listen on, in the order of [`RuntimeConfig::listen`] (with the
    /// real port when 0 was asked).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// The stop flag shared by all shards.
    pub fn shutdown(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Waits for every shard to finish.
    pub fn join(self) -> Result<(), RuntimeError> {
        let mut first_error = None;
        for (shard, handle) in self.handles.into_iter().enumerate() {
            if let Err(err) = handle.join() {
                self.shutdown.trigger();
                first_error.get_or_insert(RuntimeError::ShardFailed {
                    shard,
                    message: err.to_string(),
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn cores(n: usize) -> Vec<usize> {
        let available: Vec<usize> = core_affinity::get_core_ids()
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect();
        available.into_iter().cycle().take(n).collect()
    }

    #[test]
    fn every_shard_reaches_every_shard_including_itself() {
        let received = Arc::new(Mutex::new(Vec::new()));
        let count = 2;
        let config = RuntimeConfig {
            cores: cores(count),
            io_memory: 256 * 1024,
            listen: Vec::new(),
            backlog: 128,
            mesh_capacity: 16,
            thread_name: "test-shard".into(),
        };
        let sink = received.clone();
        let runtime = Runtime::start::<(usize, usize), _, _>(config, move |ctx| {
            let sink = sink.clone();
            async move {
                let me = ctx.id.0;
                let expected = ctx.shard_count;
                let got = Rc::new(std::cell::Cell::new(0));
                let counter = got.clone();
                ctx.serve_mesh(move |from, (sender, target)| {
                    assert_eq!(from.0, sender, "sender id must be translated");
                    assert_eq!(target, me);
                    sink.lock().unwrap().push((sender, target));
                    counter.set(counter.get() + 1);
                });
                for to in 0..ctx.shard_count {
                    ctx.mesh.send(ShardId(to), (me, to)).await.unwrap();
                }
                while got.get() < expected {
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                assert_eq!(crate::current_shard(), Some(ctx.id));
            }
        })
        .unwrap();
        runtime.join().unwrap();
        let mut pairs = received.lock().unwrap().clone();
        pairs.sort();
        assert_eq!(pairs, vec![(0, 0), (0, 1), (1, 0), (1, 1)]);
    }

    #[test]
    fn every_shard_gets_a_listener_per_address() {
        let config = RuntimeConfig {
            cores: cores(2),
            io_memory: 256 * 1024,
            listen: vec![
                "127.0.0.1:0".parse().unwrap(),
                "127.0.0.1:0".parse().unwrap(),
            ],
            backlog: 128,
            mesh_capacity: 16,
            thread_name: "test-shard".into(),
        };
        let taken = Arc::new(Mutex::new(Vec::new()));
        let sink = taken.clone();
        let runtime = Runtime::start::<(), _, _>(config, move |ctx| {
            let sink = sink.clone();
            async move {
                let addrs: Vec<_> = (0..3)
                    .map(|i| ctx.take_listener_at(i).map(|l| l.local_addr().unwrap()))
                    .collect();
                assert!(ctx.take_listener().is_none(), "taken once");
                sink.lock().unwrap().push(addrs);
            }
        })
        .unwrap();
        let bound = runtime.local_addrs().to_vec();
        runtime.join().unwrap();
        assert_eq!(bound.len(), 2);
        assert_ne!(bound[0], bound[1]);
        let taken = taken.lock().unwrap();
        assert_eq!(taken.len(), 2);
        for addrs in taken.iter() {
            assert_eq!(addrs, &vec![Some(bound[0]), Some(bound[1]), None]);
        }
    }

    #[test]
    fn unknown_core_is_rejected() {
        let config = RuntimeConfig {
            cores: vec![100_000],
            io_memory: 256 * 1024,
            listen: Vec::new(),
            backlog: 128,
            mesh_capacity: 16,
            thread_name: "test-shard".into(),
        };
        let err = Runtime::start::<(), _, _>(config, |_ctx| async {})
            .err()
            .expect("core 100000 does not exist");
        assert!(matches!(
            err,
            RuntimeError::UnknownCore { core: 100_000, .. }
        ));
    }
}
