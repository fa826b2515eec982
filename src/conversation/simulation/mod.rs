//! Deterministic simulation of the conversation core (issue 13, item 2).
//!
//! One process, no sockets, no threads, no wall clock: N shards (1 to 3), each running the
//! real [`Owner`](super::owner::Owner) state machine on a real LMDB
//! [`ShardStore`](crate::store::ShardStore) in a temporary directory, the real
//! [`Dispatcher`](super::dispatch::Dispatcher) on the dispatcher shard, visitors and agents
//! as simulated clients, and a seeded scheduler that picks every next step: which mesh
//! channel delivers its next message (FIFO per channel, reordered across channels), when a
//! shard group-commits and how much, client actions (connect, send, re-send, handoff,
//! typing, read, second tab, disconnect, reconnect with `resume`; agents attach, accept,
//! reply, transfer, close, go away, detach; intruders claiming a visitor's id without its
//! secret), bot verdicts, ticks on a monotonic simulated
//! clock (typing throttle, agent grace), the empty-conversation sweep, and faults: dropped
//! connections, failed group commits and shard crashes with a restart from what the store
//! had committed. After the seed's steps it heals (no more faults, every client reconnects
//! and re-sends) and runs to quiescence.
//!
//! - [`world`]: the shards, the mesh, the action executor (the semantics of `router.rs`)
//!   and the scheduler.
//! - [`clients`]: what visitor pages and agent consoles remember and do.
//! - [`invariants`]: what is checked after every step and at quiescence.
//!
//! The real store is used, not a model of it: with `Durability::None` (no fsync) a seed
//! costs a few milliseconds of LMDB, and "restart from what the store had committed" is then
//! the real reopen of the real file, dedup window and all.
//!
//! Running: `cargo test --lib simulation` runs [`SEEDS`] seeds (env `SIMULATION_SEEDS`
//! overrides the count, `SIMULATION_FIRST_SEED` the start) on two threads. Measured on the
//! 2-vCPU build machine, debug build, 2026-12-02, which other builds share (the figure
//! moves with their load): 2,000 seeds (about 640,000 steps, 1,600 shard crashes, 1,000
//! failed commits, 21,000 dropped connections, 33,000 acks checked) in 12.4 s at load
//! average ~3 and 50 s at load ~5 (two other builds running); 3,000 seeds in 18.8 s at
//! load ~3 and 73 s at load ~5; 10,000 seeds in 91 s at load ~3
//! (`SIMULATION_SEEDS=10000 cargo test --lib simulation_runs_many_seeds -- --nocapture`
//! prints the figures). Every mutation tried was caught within the first 2,000 seeds: by
//! seed 0 (store dedupe skipped), 1 (any stored secret accepted), 4 (resume replay off by
//! one), 12 (auto-assignment from the queue's tail), 50 (a conversation evicted with a
//! commit in flight), 93 and 508 (either owner fix of this branch taken out: secret before open, a
//! failed close).
//! A failing seed panics with its number, its step and the replay command:
//! `SIMULATION_SEED=<n> cargo test --lib simulation_replays_one_seed -- --nocapture`
//! prints the step trace of that seed and runs it again, identically.
//!
//! Not covered here: the router's own glue (the glommio tasks, the committer's timing,
//! `send_loop`), sessions' back-pressure and admission, the bot's handlers and engine (the
//! bot is a random verdict), guards, watchers (supervisor `watch`), storage-full back-off,
//! verified identities, and a machine crash (the store is reopened after a process-style
//! crash: nothing committed is lost by construction of LMDB).

mod clients;
mod invariants;
mod world;

/// Seeds run by `simulation_runs_many_seeds`.
pub const SEEDS: u64 = 2_000;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Runs one seed to the end (panics on a violated invariant); its step count and stats.
fn run_seed(seed: u64, verbose: bool) -> (usize, world::Stats) {
    let mut world = world::World::new(seed, verbose);
    world.run();
    (world.step, world.stats)
}

#[test]
fn simulation_runs_many_seeds() {
    let count = env_u64("SIMULATION_SEEDS").unwrap_or(SEEDS);
    let first = env_u64("SIMULATION_FIRST_SEED").unwrap_or(0);
    let started = std::time::Instant::now();
    let threads = 2;
    let (steps, stats) = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let mut total = (0, world::Stats::default());
                    for seed in (first..first + count).filter(|seed| seed % threads == t) {
                        let (steps, stats) = run_seed(seed, false);
                        total.0 += steps;
                        total.1 += stats;
                    }
                    total
                })
            })
            .collect();
        let mut total = (0, world::Stats::default());
        for handle in handles {
            let (steps, stats) = handle
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e));
            total.0 += steps;
            total.1 += stats;
        }
        total
    });
    eprintln!(
        "simulation: {count} seeds from {first}, {steps} steps in {:.1?}; {stats:?}",
        started.elapsed()
    );
}

#[test]
fn simulation_replays_one_seed() {
    let Some(seed) = env_u64("SIMULATION_SEED") else {
        return;
    };
    let (steps, stats) = run_seed(seed, true);
    eprintln!("seed {seed}: {steps} steps, all invariants held; {stats:?}");
}

/// A seed replays exactly: same steps, same faults, same deliveries and acks, and the same
/// messages stored under the same seqs in the same conversations.
#[test]
fn simulation_is_deterministic() {
    // 93, 508 and 50 fail when the owner fixes of the secret and of the failed close, or the
    // in-flight eviction guard, are taken out.
    for seed in [3, 17, 50, 93, 508] {
        let mut a = world::World::new(seed, false);
        a.run();
        let mut b = world::World::new(seed, false);
        b.run();
        assert_eq!(a.step, b.step, "seed {seed}");
        assert_eq!(a.stats, b.stats, "seed {seed}");
        assert_eq!(a.checker.stored(), b.checker.stored(), "seed {seed}");
        assert_eq!(a.describe_state(), b.describe_state(), "seed {seed}");
    }
}
