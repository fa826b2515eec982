//! The behaviours the vendored glommio patches (shards/vendor/PATCHES.md) must keep: a
//! sleeping executor is always woken by a message from another core (the sleep barrier is a
//! fence now, not a membarrier), a user timer fires on time although a preemption timer may
//! be kept armed instead of re-armed, a busy task queue is still preempted after the
//! kept timer has fired, and I/O latencies are still recorded when asked for. Each test fails
//! by a watchdog or an assertion, never by hanging CI.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::channels::shared_channel;
use glommio::{LocalExecutorBuilder, Placement};

/// Fails the test (aborting the process, since the executors may be stuck) if `done` is not set
/// within `limit`.
fn watchdog(name: &'static str, limit: Duration, done: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < limit {
            if done.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{name}: not done after {limit:?}: an executor missed a wake-up");
        std::process::abort();
    });
}

fn builder(name: &str) -> LocalExecutorBuilder {
    LocalExecutorBuilder::new(Placement::Unbound)
        .name(name)
        .io_memory(64 << 10)
}

/// Two executors bounce a counter through shared channels; the bouncer pauses now and then so
/// the other side has gone to sleep when the next message arrives. A lost wake-up stops the
/// exchange for good (nothing else would wake the sleeper): the watchdog catches it. The short
/// preemption timers make a kept timer fire often between the reactor's pass and the run of
/// the woken task, where an executor that parked anyway (a first version did) stalls the
/// exchange.
#[test]
fn a_sleeping_executor_is_woken_by_every_message_from_another_core() {
    const ROUND_TRIPS: u64 = 40_000;
    let done = Arc::new(AtomicBool::new(false));
    watchdog("ping-pong", Duration::from_secs(60), done.clone());
    let (to_pong, from_ping) = shared_channel::new_bounded::<u64>(4);
    let (to_ping, from_pong) = shared_channel::new_bounded::<u64>(4);
    let pong = builder("pong")
        .preempt_timer(Duration::from_micros(200))
        .spawn(move || async move {
            let receiver = from_ping.connect().await;
            let sender = to_ping.connect().await;
            while let Some(n) = receiver.recv().await {
                if n % 7 == 0 {
                    glommio::timer::sleep(Duration::from_micros(50)).await;
                }
                if sender.send(n + 1).await.is_err() {
                    break;
                }
            }
        })
        .unwrap();
    let ping = builder("ping")
        .preempt_timer(Duration::from_micros(300))
        .spawn(move || async move {
            let sender = to_pong.connect().await;
            let receiver = from_pong.connect().await;
            let mut n = 0;
            for round in 0..ROUND_TRIPS {
                sender.send(n).await.unwrap();
                n = receiver.recv().await.unwrap();
                assert_eq!(n, 2 * round + 1);
                n += 1;
                if round % 11 == 0 {
                    glommio::timer::sleep(Duration::from_micros(30)).await;
                }
            }
            n
        })
        .unwrap();
    let n = ping.join().unwrap();
    pong.join().unwrap();
    done.store(true, Ordering::SeqCst);
    assert_eq!(n, 2 * ROUND_TRIPS);
}

/// After a burst of work (which leaves a preemption timer armed, 100 ms by default), short
/// sleeps must still end on time: the reactor may keep an armed timer only when it fires no
/// later than the sleep's own deadline.
#[test]
fn a_short_sleep_after_busy_work_ends_on_time() {
    let done = Arc::new(AtomicBool::new(false));
    watchdog("timers", Duration::from_secs(60), done.clone());
    let worst = builder("timers").make().unwrap().run(async {
        let mut worst = Duration::ZERO;
        for round in 0..40 {
            // Busy work: many tasks, so the loop runs passes with the preemption timer armed.
            let tasks: Vec<_> = (0..50)
                .map(|i| glommio::spawn_local(async move { (0..1000u64).sum::<u64>() + i }))
                .collect();
            for task in tasks {
                task.await;
            }
            let wanted = Duration::from_millis(2 + round % 5);
            let start = Instant::now();
            glommio::timer::sleep(wanted).await;
            let slept = start.elapsed();
            assert!(slept >= wanted, "slept {slept:?}, asked {wanted:?}");
            worst = worst.max(slept - wanted);
        }
        worst
    });
    done.store(true, Ordering::SeqCst);
    // A sleep replaced by the 100 ms preemption timer would overshoot by ~95 ms; on a loaded
    // CI machine a correct one overshoots by a few ms.
    assert!(
        worst < Duration::from_millis(60),
        "a sleep overshot its deadline by {worst:?}"
    );
}

/// A task that never waits, only `yield_if_needed`, must be preempted again and again: the
/// preemption timer is re-armed after it fires (the kept-timer patch must not leave the loop
/// without one). With a 5 ms timer, 400 ms of busy work sees about 80 preemptions; a timer
/// armed once and never again would give one.
#[test]
fn a_busy_task_is_preempted_again_and_again() {
    let done = Arc::new(AtomicBool::new(false));
    watchdog("preemption", Duration::from_secs(60), done.clone());
    let preemptions = builder("preempt")
        .preempt_timer(Duration::from_millis(5))
        .make()
        .unwrap()
        .run(async {
            let start = Instant::now();
            let mut preemptions = 0u32;
            while start.elapsed() < Duration::from_millis(400) {
                std::hint::black_box((0..200u64).sum::<u64>());
                if glommio::executor().need_preempt() {
                    preemptions += 1;
                }
                glommio::yield_if_needed().await;
            }
            preemptions
        });
    done.store(true, Ordering::SeqCst);
    assert!(
        preemptions >= 20,
        "{preemptions} preemptions in 400 ms with a 5 ms preemption timer"
    );
}

/// Short sleeps and busy stretches alternate, as on a shard between messages: before each
/// sleep the reactor replaces the pending preemption timer with the sooner sleep timer, and
/// after the sleep it needs a preemption timer again (the kept-timer patch decides both on
/// deadlines). Every sleep must still end on time (a sleep left to the pending 5 ms preemption
/// timer would overshoot by about 4 ms, so the median overshoot is checked, and the worst one
/// against a stall), and every busy stretch after a sleep must still be preempted: a sleep timer
/// kept as the preemption timer after it fired, with none armed in its place, would leave a
/// stretch with no preemption at all.
#[test]
fn busy_stretches_between_short_sleeps_are_preempted_and_the_sleeps_end_on_time() {
    let done = Arc::new(AtomicBool::new(false));
    watchdog("spare timer", Duration::from_secs(60), done.clone());
    let (mut overshoots, fewest_preemptions) = builder("spare")
        .preempt_timer(Duration::from_millis(5))
        .make()
        .unwrap()
        .run(async {
            let mut overshoots = Vec::new();
            let mut fewest = u32::MAX;
            for round in 0..40u32 {
                let wanted = Duration::from_micros(300 + 200 * u64::from(round % 5));
                let start = Instant::now();
                glommio::timer::sleep(wanted).await;
                let slept = start.elapsed();
                assert!(slept >= wanted, "slept {slept:?}, asked {wanted:?}");
                overshoots.push(slept - wanted);
                // 25 ms of work that only yields: about 5 preemptions with a 5 ms timer.
                let busy = Instant::now();
                let mut preemptions = 0u32;
                while busy.elapsed() < Duration::from_millis(25) {
                    std::hint::black_box((0..200u64).sum::<u64>());
                    if glommio::executor().need_preempt() {
                        preemptions += 1;
                    }
                    glommio::yield_if_needed().await;
                }
                fewest = fewest.min(preemptions);
            }
            (overshoots, fewest)
        });
    done.store(true, Ordering::SeqCst);
    overshoots.sort();
    let (median, worst) = (
        overshoots[overshoots.len() / 2],
        overshoots[overshoots.len() - 1],
    );
    assert!(
        median < Duration::from_millis(2),
        "the median sleep overshot its deadline by {median:?}"
    );
    assert!(
        worst < Duration::from_millis(60),
        "a sleep overshot its deadline by {worst:?}"
    );
    assert!(
        fewest_preemptions >= 1,
        "a 25 ms busy stretch after a sleep saw {fewest_preemptions} preemptions with a 5 ms timer"
    );
}

/// The reactor reads the clock for an I/O's queued, submitted and fulfilled instants only when
/// the source records its latency (a patch: those reads cost a clock read per socket read and
/// write). An executor built with `record_io_latencies` must still get all three distributions
/// for its (buffered) file reads: that half checks the patch. One built without gets none, as
/// upstream.
#[test]
fn io_latencies_are_still_recorded_when_asked_for() {
    for record in [true, false] {
        let counts = builder("latencies")
            .record_io_latencies(record)
            .spawn(move || async move {
                let path = std::env::temp_dir()
                    .join(format!("sb-io-latency-{}-{record}", std::process::id()));
                std::fs::write(&path, [7u8; 4096]).unwrap();
                let file = glommio::io::BufferedFile::open(&path).await.unwrap();
                for _ in 0..8 {
                    let read = file.read_at(0, 4096).await.unwrap();
                    assert_eq!(read.len(), 4096);
                    assert_eq!(read[0], 7);
                }
                file.close().await.unwrap();
                std::fs::remove_file(&path).unwrap();
                let stats = glommio::executor().io_stats().all_rings();
                [
                    stats.pre_reactor_io_scheduler_latency_us().count(),
                    stats.io_latency_us().count(),
                    stats.post_reactor_io_scheduler_latency_us().count(),
                ]
            })
            .unwrap()
            .join()
            .unwrap();
        if record {
            assert!(
                counts.iter().all(|&count| count >= 8),
                "with record_io_latencies, every read is measured: {counts:?}"
            );
        } else {
            assert_eq!(counts, [0, 0, 0], "without record_io_latencies");
        }
    }
}
