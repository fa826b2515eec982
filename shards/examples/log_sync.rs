//! Measures one group commit's log I/O (append a record, then `fdatasync`) done four ways from a
//! pinned glommio executor, to decide where the write-ahead log's I/O belongs (issue #15 asks for
//! io_uring unless a measurement shows a better way):
//!
//! - `inline`: `pwrite` + `fdatasync` on the executor's own thread (blocks it; the floor);
//! - `blocking`: the same on glommio's blocking thread pool (what the store does today);
//! - `uring-buffered`: glommio's `BufferedFile::write_at` + `fdatasync` (io_uring);
//! - `uring-dma`: glommio's `DmaFile::write_at` (O_DIRECT, aligned) + `fdatasync` (io_uring);
//!
//! and, for `--gap-us`, what the gap alone costs: `none` (the executor sleeps and wakes) and
//! `thread-sleep` (the thread `nanosleep`s, the executor blocked). Results: bench/README.md,
//! "Where the log's I/O runs".
//!
//! Each mode appends `--commits` records of `--bytes` bytes sequentially to a file zero-filled
//! ahead (as the log is), one at a time, optionally `--gap-us` apart (a paced commit), and
//! prints the latency p50/p99 of append+sync and the process's CPU time (every thread; on
//! Linux 5.12 and later io_uring's `iou-wrk` workers are threads of the process, so theirs too)
//! and context switches per commit. With `--gap-us` each mode's CPU and switches include the
//! executor's sleep and wake-up per gap; `--modes none` measures that alone, to subtract.
//!
//! `cargo run --release -p shards --example log_sync -- --dir /var/tmp --commits 3000`

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use glommio::io::{BufferedFile, DmaFile};
use glommio::{LocalExecutorBuilder, Placement};

const FILE_BYTES: u64 = 64 << 20;

struct Args {
    dir: PathBuf,
    commits: usize,
    bytes: usize,
    gap: Duration,
    modes: Vec<String>,
    rounds: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        dir: std::env::temp_dir(),
        commits: 2000,
        bytes: 4096,
        gap: Duration::ZERO,
        modes: vec![
            "inline".into(),
            "blocking".into(),
            "uring-buffered".into(),
            "uring-dma".into(),
        ],
        rounds: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--dir" => args.dir = value()?.into(),
            "--commits" => {
                args.commits = value()?.parse().map_err(|e| format!("--commits: {e}"))?
            }
            "--bytes" => args.bytes = value()?.parse().map_err(|e| format!("--bytes: {e}"))?,
            "--gap-us" => {
                args.gap =
                    Duration::from_micros(value()?.parse().map_err(|e| format!("--gap-us: {e}"))?)
            }
            "--rounds" => args.rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--modes" => args.modes = value()?.split(',').map(str::to_owned).collect(),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    const MODES: [&str; 6] = [
        "inline",
        "blocking",
        "uring-buffered",
        "uring-dma",
        "none",
        "thread-sleep",
    ];
    if let Some(mode) = args
        .modes
        .iter()
        .find(|mode| !MODES.contains(&mode.as_str()))
    {
        return Err(format!(
            "unknown mode {mode:?} (one of {})",
            MODES.join(", ")
        ));
    }
    if args.commits == 0 {
        return Err("--commits must be at least 1".into());
    }
    if args.bytes == 0 || !args.bytes.is_multiple_of(4096) || args.bytes as u64 > FILE_BYTES {
        return Err(
            "--bytes must be a positive multiple of 4096 (O_DIRECT), at most 64 MiB".into(),
        );
    }
    Ok(args)
}

/// CPU time (user + system) of the whole process and its voluntary + involuntary context
/// switches, from `getrusage(RUSAGE_SELF)`.
fn usage() -> (Duration, i64) {
    // SAFETY: `getrusage` fills the zeroed struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let cpu = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (
        cpu(usage.ru_utime) + cpu(usage.ru_stime),
        usage.ru_nvcsw + usage.ru_nivcsw,
    )
}

fn zero_filled(path: &Path) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(FILE_BYTES >> 20) {
        file.write_all(&zeros)?;
    }
    file.sync_all()
}

/// The log file as one mode writes it.
enum Log {
    /// `inline`: std's file, written and synced on the executor's thread.
    Inline(std::fs::File),
    /// `blocking`: std's file, shared with glommio's blocking pool.
    Blocking(std::sync::Arc<std::fs::File>),
    Buffered(BufferedFile),
    Dma(DmaFile),
    /// `none` and `thread-sleep`: no I/O, only the gap.
    Nothing,
}

impl Log {
    async fn open(mode: &str, path: &Path) -> Log {
        let options = || {
            let mut options = glommio::io::OpenOptions::new();
            options.write(true);
            options
        };
        match mode {
            "inline" => Log::Inline(OpenOptions::new().write(true).open(path).unwrap()),
            "blocking" => Log::Blocking(std::sync::Arc::new(
                OpenOptions::new().write(true).open(path).unwrap(),
            )),
            "uring-buffered" => Log::Buffered(options().buffered_open(path).await.unwrap()),
            "uring-dma" => Log::Dma(options().dma_open(path).await.unwrap()),
            _ => Log::Nothing,
        }
    }

    /// One group commit's log I/O: write `record` at `at`, then fdatasync.
    async fn commit(&self, record: &[u8], at: u64) {
        match self {
            Log::Inline(file) => {
                file.write_all_at(record, at).unwrap();
                file.sync_data().unwrap();
            }
            Log::Blocking(file) => {
                let (file, record) = (file.clone(), record.to_vec());
                glommio::executor()
                    .spawn_blocking(move || {
                        file.write_all_at(&record, at).unwrap();
                        file.sync_data().unwrap();
                    })
                    .await;
            }
            Log::Buffered(file) => {
                let written = file.write_at(record.to_vec(), at).await.unwrap();
                assert_eq!(written, record.len());
                file.fdatasync().await.unwrap();
            }
            Log::Dma(file) => {
                let mut buffer = file.alloc_dma_buffer(record.len());
                buffer.as_bytes_mut().copy_from_slice(record);
                let written = file.write_at(buffer, at).await.unwrap();
                assert_eq!(written, record.len());
                file.fdatasync().await.unwrap();
            }
            Log::Nothing => {}
        }
    }

    async fn close(self) {
        match self {
            Log::Buffered(file) => file.close().await.unwrap(),
            Log::Dma(file) => file.close().await.unwrap(),
            Log::Inline(_) | Log::Blocking(_) | Log::Nothing => {}
        }
    }
}

async fn run_mode(mode: &str, path: &Path, args: &Args) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(args.commits);
    let record = vec![0x5au8; args.bytes];
    let log = Log::open(mode, path).await;
    for i in 0..args.commits {
        let start = Instant::now();
        // Inside the zero-filled file, so no write extends it (fdatasync writes no metadata).
        let records_in_file = FILE_BYTES / args.bytes as u64;
        log.commit(&record, (i as u64 % records_in_file) * args.bytes as u64)
            .await;
        latencies.push(start.elapsed());
        if args.gap.is_zero() {
            continue;
        }
        if mode == "thread-sleep" {
            // The gap slept by the thread itself (`nanosleep`, the executor blocked): the
            // kernel's own cost of a sleep and a wake-up, for comparison with `none` (the
            // executor sleeps and wakes).
            std::thread::sleep(args.gap);
        } else {
            glommio::timer::sleep(args.gap).await;
        }
    }
    log.close().await;
    latencies
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("log_sync: {message}");
            std::process::exit(2);
        }
    };
    let path = args
        .dir
        .join(format!("log_sync-{}.bin", std::process::id()));
    if let Err(err) = zero_filled(&path) {
        eprintln!("log_sync: cannot create {}: {err}", path.display());
        std::process::exit(1);
    }
    println!(
        "{} commits of {} bytes, gap {:?}, file {}",
        args.commits,
        args.bytes,
        args.gap,
        path.display()
    );
    println!("mode            p50 µs   p99 µs   CPU µs/commit   switches/commit");
    let path_in = path.clone();
    LocalExecutorBuilder::new(Placement::Fixed(0))
        .io_memory(1 << 20)
        .spawn(move || async move {
            for _ in 0..args.rounds {
                for mode in &args.modes {
                    let (cpu_before, switches_before) = usage();
                    let mut latencies = run_mode(mode, &path_in, &args).await;
                    let (cpu_after, switches_after) = usage();
                    latencies.sort();
                    let per_commit = |d: Duration| d.as_secs_f64() * 1e6 / args.commits as f64;
                    // With `--gap-us`, the sleep and wake-up per gap are in these figures (see
                    // the `none` mode).
                    println!(
                        "{mode:<15} {:>7.1} {:>8.1} {:>15.1} {:>17.2}",
                        percentile(&latencies, 0.5).as_secs_f64() * 1e6,
                        percentile(&latencies, 0.99).as_secs_f64() * 1e6,
                        per_commit(cpu_after - cpu_before),
                        (switches_after - switches_before) as f64 / args.commits as f64,
                    );
                }
            }
        })
        .expect("spawn the executor")
        .join()
        .expect("the executor ran");
    let _ = std::fs::remove_file(&path);
}
