//! Command-line interface: one subcommand per scenario, sharing the `Common` options (target, server pid,
//! protocol, shards, outputs). Durations accept humantime syntax (`10s`, `500ms`, `2m`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::protocol::Protocol;

#[derive(Debug, Parser)]
#[command(
    name = "switchboard-bench",
    version,
    about = "Load-test harness for switchboard and its peers"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Open N idle visitor sessions, hold them, report server RSS growth per session and handshake figures.
    Density(DensityArgs),
    /// Open-loop relay: visitors send at a fixed total rate, agents reply, latency from the schedule.
    Relay(RelayArgs),
    /// Raise the relay rate step by step until p99 passes a bound; report the highest sustained rate.
    Sweep(SweepArgs),
    /// Visitor questions answered by the bot; cache hits and misses reported apart.
    Bot(BotArgs),
    /// Mixed load (connects, disconnects, resumes, relay and bot) with server RSS sampled over time, and a
    /// ledger of every acked message read back at the end; with --server-cmd --chaos the server is killed
    /// (SIGKILL) and restarted at random meanwhile, and one client floods.
    Soak(SoakArgs),
    /// Tabulate and plot several JSON reports side by side, with ratios to the first.
    Compare(CompareArgs),
    /// Print one figure of a JSON report (for scripts); exits 1 if the report lacks it.
    Get(GetArgs),
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<f64>() {
        if secs >= 0.0 && secs.is_finite() {
            return Ok(Duration::from_secs_f64(secs));
        }
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (write e.g. 10s, 500ms, 2m)"))
}

/// A parsed `--cores` list: distinct core ids, ascending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreList(pub Vec<usize>);

pub fn parse_cores(s: &str) -> Result<CoreList, String> {
    crate::cpu::parse_core_list(s)
        .map(CoreList)
        .map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Server to load, ws://HOST:PORT, or wss://HOST:PORT over TLS (needs --tls-ca).
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    pub target: String,
    /// For a wss:// target: PEM certificate(s) to trust, e.g. the server's self-signed certificate.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// For a wss:// target: the name to verify the certificate against (default: the target's host).
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Server process id, for RSS figures read from /proc/PID/status.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Wire protocol: switchboard's own, the peers' plain relay, or switchboard's /ws/echo diagnostic.
    #[arg(long, value_enum, default_value = "switchboard")]
    pub protocol: Protocol,
    /// Load-generator shards (pinned glommio executors); default: one per core of --cores, else one per
    /// available core.
    #[arg(long)]
    pub shards: Option<usize>,
    /// Cores the load generator runs on, as a CPU list (`1`, `0,1`, `0-3`): shard i is pinned to the
    /// i-th of them (round-robin when --shards is larger). Leave the server the others. Default: every
    /// available core, one shard each (unpinned when --shards is larger). Every report says which
    /// cores the generator and the server (--pid) had.
    #[arg(long, value_name = "LIST", value_parser = parse_cores)]
    pub cores: Option<CoreList>,
    /// A further process whose CPU time counts as the server's (e.g. mariadbd behind a database-backed
    /// peer) in `server_cpu_us_per_round_trip`; repeat for several. The server itself is --pid.
    #[arg(long = "cpu-pid", value_name = "PID")]
    pub cpu_pids: Vec<u32>,
    /// Write every figure and the whole HDR histograms to this JSON file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a plot (.svg or .png).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Name of the system under test in tables and plots.
    #[arg(long)]
    pub label: Option<String>,
    /// Site id for switchboard visitor sessions.
    #[arg(long, default_value = "bench")]
    pub site: String,
    /// Agent token for switchboard agent sessions (repeat for several agent accounts; agent session i uses
    /// token i modulo their number). The server needs a matching `[agents.accounts.ID] token`.
    #[arg(long = "agent-token", default_value = "switchboard-bench-agent-0")]
    pub agent_tokens: Vec<String>,
    /// Number of client source addresses spread over 127.0.0.0/8 (loopback targets only).
    #[arg(long, default_value_t = 64)]
    pub sources: u32,
    /// Time allowed for TCP connect + WebSocket handshake (+ hello with switchboard).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// Switchboard visitors connect without a visitor id, as the widget's first visit does, and use
    /// the one the server issues (its conversations live on the shard the connection landed on).
    /// This run's agents answer the visitors whose issued ids set-up recorded. Switchboard protocol
    /// only; the soak, which reconnects visitors by their own ids, refuses it.
    #[arg(long)]
    pub issued_visitor_ids: bool,
    /// Ask /ws/echo to delay each echo by this many milliseconds (harness validation).
    #[arg(long)]
    pub echo_delay_ms: Option<u64>,
    /// Hide progress bars.
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Debug, Clone, Args)]
pub struct DensityArgs {
    #[command(flatten)]
    pub common: Common,
    /// Idle sessions to open.
    #[arg(long, default_value_t = 1000)]
    pub sessions: u64,
    /// Sessions opened per second (open loop).
    #[arg(long, default_value_t = 2000.0)]
    pub ramp: f64,
    /// How long to hold the sessions idle once all are open, before reading the server's RSS.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub hold: Duration,
    /// Pause before the "before" RSS sample.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub settle: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct LoadShape {
    /// Conversations (visitor + agent pairs; visitors only with --protocol echo).
    #[arg(long, default_value_t = 100)]
    pub conversations: u64,
    /// Message text size in bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Warm-up at the full rate before measurement; its latencies are not recorded.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// How long to wait for outstanding replies after the last scheduled send.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Agent connections with --protocol switchboard (each serves the conversations assigned to it).
    #[arg(long, default_value_t = 4)]
    pub agents: u64,
    /// A shard's sender wakes at most once per TICK and sends every message due before its next wake
    /// (up to one TICK early). A late message is measured from its scheduled time, an early one from
    /// when the sender picked it up, so the wait for the tick does not count as the server's.
    #[arg(long, default_value = "200us", value_parser = parse_duration)]
    pub tick: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct RelayArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub shape: LoadShape,
    /// Total visitor messages per second (open loop).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Measured duration (after warm-up).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct SweepArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub shape: LoadShape,
    /// First rate tried (messages/s).
    #[arg(long, default_value_t = 2000.0)]
    pub start_rate: f64,
    /// Each passing step multiplies the rate by this factor.
    #[arg(long, default_value_t = 1.5)]
    pub factor: f64,
    /// Never try more than this rate.
    #[arg(long, default_value_t = 1_000_000.0)]
    pub max_rate: f64,
    /// Bisection steps between the last passing and the first failing rate.
    #[arg(long, default_value_t = 3)]
    pub refine: u32,
    /// p99 bound a step must meet (also: no loss, throughput within 3% of the offered rate).
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub p99_limit: Duration,
    /// Measured duration of each step.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub step_duration: Duration,
    /// Upper bound on the number of steps.
    #[arg(long, default_value_t = 20)]
    pub max_steps: u32,
    /// Before the sweep, run one step at this fixed rate (one that every system compared sustains) and
    /// report its figures as `fixed_*`, among them the server's CPU time per round trip (needs --pid).
    #[arg(long)]
    pub fixed_rate: Option<f64>,
    /// Measured duration of the fixed-rate step.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub fixed_duration: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct BotArgs {
    #[command(flatten)]
    pub common: Common,
    /// Questions, one per line; a CSV with a `text,...` header (e.g. BANKING77) uses its first column.
    #[arg(long)]
    pub queries: PathBuf,
    /// Total questions per second (open loop).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Measured duration (after warm-up).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Visitor sessions asking questions.
    #[arg(long, default_value_t = 50)]
    pub visitors: u64,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    #[command(flatten)]
    pub common: Common,
    /// Total run time.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Visitor sessions kept alive (each reconnects after it disconnects).
    #[arg(long, default_value_t = 200)]
    pub visitors: u64,
    /// Of those, how many talk to agents (relay); the rest talk to the bot.
    #[arg(long, default_value_t = 100)]
    pub relay_visitors: u64,
    /// Agent connections.
    #[arg(long, default_value_t = 4)]
    pub agents: u64,
    /// Visitor messages per second in total.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Mean lifetime of a visitor connection before it drops (half abruptly, half with a close frame) and
    /// reconnects with resume.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub mean_session: Duration,
    /// RSS sampling interval.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub sample_every: Duration,
    /// Bot questions (same format as `bot --queries`); without it, bot visitors send fixed questions.
    #[arg(long)]
    pub queries: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Start the server with this command line (run as `sh -c 'exec CMD'`, so quote it as one argument)
    /// and own it: wait until `GET /readyz` on --target answers 200 before the load, stop it (SIGTERM) at
    /// the end. The server must listen on --target's fixed port (restarts reuse it). ws:// only.
    #[arg(long, value_name = "CMD")]
    pub server_cmd: Option<String>,
    /// Chaos (needs --server-cmd): SIGKILL the server every --kill-every, restart it on the same data
    /// and wait until it is ready, while the visitors keep going and --flooders clients flood. The ledger
    /// at the end must show nothing acked lost and nothing duplicated.
    #[arg(long, requires = "server_cmd")]
    pub chaos: bool,
    /// Time between two kills with --chaos, drawn uniformly from MIN..MAX (seeded by --seed).
    #[arg(long, default_value = "2s..5s", value_parser = crate::chaos::parse_kill_range, value_name = "MIN..MAX")]
    pub kill_every: crate::chaos::KillRange,
    /// No kill falls in the last SETTLE of --duration: the final drain and the ledger run against a
    /// stable server.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub settle: Duration,
    /// Seed of the kill schedule (printed in the report; default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Visitors that send as fast as they can (at most --flood-window unacked), default 1 with --chaos,
    /// else 0. Their refusals (rate_limited, flood, overloaded, close 1008/1013) are counted by kind:
    /// they pause for retry_after and re-send with the same ids. Their acked messages are in the
    /// ledger like everyone's.
    #[arg(long)]
    pub flooders: Option<u64>,
    /// Most unacked messages a flooder holds (re-sends are recognised within a conversation's newest
    /// 1,024 messages, docs/protocol.md, so keep it well below). With the default limits (a burst of
    /// 20 messages, 10 per 10 s past the flood guard, the 10th refusal closes with 1008) a window of
    /// 32 is closed before any ack comes back; 8 gets some acked between the refusals.
    #[arg(long, default_value_t = 8)]
    pub flood_window: usize,
    /// Append the server's stdout and stderr (every start) to this file; default: discarded.
    #[arg(long, value_name = "FILE")]
    pub server_log: Option<PathBuf>,
    /// Time a (re)started server has to answer `GET /readyz` with 200.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub ready_timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct CompareArgs {
    /// Reports written with --json; the first is the baseline of the ratio columns.
    #[arg(required = true, num_args = 1..)]
    pub reports: Vec<PathBuf>,
    /// Plot the latency histograms together (.svg or .png).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Figures to show (default: all).
    #[arg(long = "figure")]
    pub figures: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct GetArgs {
    pub report: PathBuf,
    pub figure: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("50ms").unwrap(), Duration::from_millis(50));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn relay_arguments_parse() {
        let cli = Cli::try_parse_from([
            "switchboard-bench",
            "relay",
            "--target",
            "ws://127.0.0.1:9100",
            "--protocol",
            "relay",
            "--rate",
            "5000",
            "--duration",
            "3s",
            "--conversations",
            "20",
        ])
        .unwrap();
        match cli.command {
            Command::Relay(r) => {
                assert_eq!(r.rate, 5000.0);
                assert_eq!(r.shape.conversations, 20);
                assert_eq!(r.common.protocol, Protocol::Relay);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn chaos_soak_arguments_parse() {
        let cli = Cli::try_parse_from([
            "switchboard-bench",
            "soak",
            "--server-cmd",
            "switchboard serve --config x.toml",
            "--chaos",
            "--kill-every",
            "1s..3s",
            "--seed",
            "42",
        ])
        .unwrap();
        match cli.command {
            Command::Soak(s) => {
                assert!(s.chaos);
                assert_eq!(s.kill_every.min, Duration::from_secs(1));
                assert_eq!(s.kill_every.max, Duration::from_secs(3));
                assert_eq!(s.seed, Some(42));
                assert_eq!(s.flooders, None);
            }
            other => panic!("{other:?}"),
        }
        // --chaos needs a server the bench owns.
        assert!(Cli::try_parse_from(["switchboard-bench", "soak", "--chaos"]).is_err());
    }
}
