//! The server under a soak's control (`soak --server-cmd`), and the chaos that kills it (`--chaos`).
//!
//! The bench starts the server itself with `sh -c 'exec CMD'` (so the process it holds is the server,
//! not a shell), waits until `GET /readyz` on the target answers 200, and stops it with SIGTERM at the end.
//! With `--chaos` a controller thread sends SIGKILL at random intervals (`--kill-every MIN..MAX`, drawn
//! from `--seed`), waits for the process to exit, starts the same command again (same data directory,
//! same port) and waits until it is ready again; no kill falls in the last `--settle` of the run, so the
//! final drain and the ledger run against a stable server. A server that exits by itself is counted
//! and restarted too.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// `MIN..MAX` between two kills, e.g. `2s..5s` (one duration alone means exactly that).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KillRange {
    pub min: Duration,
    pub max: Duration,
}

pub fn parse_kill_range(s: &str) -> Result<KillRange, String> {
    let (a, b) = s.split_once("..").unwrap_or((s, s));
    let min = crate::cli::parse_duration(a.trim())?;
    let max = crate::cli::parse_duration(b.trim())?;
    if min > max || max.is_zero() {
        return Err(format!(
            "{s:?}: write MIN..MAX with 0 < MAX and MIN <= MAX, e.g. 2s..5s"
        ));
    }
    Ok(KillRange { min, max })
}

/// The server process the bench owns.
pub struct ServerProc {
    cmd: String,
    log: Option<PathBuf>,
    addr: SocketAddr,
    ready_timeout: Duration,
    child: Option<Child>,
    /// The current process id (0 while none runs), for RSS samples.
    pub pid: Arc<AtomicU32>,
}

impl ServerProc {
    /// Starts `cmd` and waits until it is ready.
    pub fn start(
        cmd: &str,
        log: Option<PathBuf>,
        addr: SocketAddr,
        ready_timeout: Duration,
    ) -> Result<ServerProc, String> {
        let mut s = ServerProc {
            cmd: cmd.to_string(),
            log,
            addr,
            ready_timeout,
            child: None,
            pid: Arc::new(AtomicU32::new(0)),
        };
        s.spawn()?;
        Ok(s)
    }

    /// Starts the command and waits for `/readyz`; returns how long that took.
    fn spawn(&mut self) -> Result<Duration, String> {
        let t0 = Instant::now();
        let (out, err) = match &self.log {
            Some(path) => {
                let f = File::options()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                let f2 = f.try_clone().map_err(|e| e.to_string())?;
                (Stdio::from(f), Stdio::from(f2))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("exec {}", self.cmd))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start the server ({}): {e}", self.cmd))?;
        self.pid.store(child.id(), Ordering::Relaxed);
        self.child = Some(child);
        let deadline = t0 + self.ready_timeout;
        loop {
            if ready(self.addr) {
                return Ok(t0.elapsed());
            }
            if let Some(status) = self.try_exit() {
                return Err(format!(
                    "the server exited before it was ready ({status}); command: {}",
                    self.cmd
                ));
            }
            if Instant::now() > deadline {
                let pid = self.pid.load(Ordering::Relaxed);
                return Err(format!(
                    "the server (pid {pid}) was not ready (GET /readyz on {}) within {:?}; its threads: {}",
                    self.addr,
                    self.ready_timeout,
                    thread_states(pid)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `Some(status)` once the process has exited.
    fn try_exit(&mut self) -> Option<String> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        self.pid.store(0, Ordering::Relaxed);
        Some(status.to_string())
    }

    /// SIGKILL, and wait for the exit.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.pid.store(0, Ordering::Relaxed);
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling a child process we own and have not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    self.pid.store(0, Ordering::Relaxed);
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.pid.store(0, Ordering::Relaxed);
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Each thread of `pid` as `name (state, wchan)`, for a server that does not get ready.
fn thread_states(pid: u32) -> String {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "gone".into();
    };
    let mut out = Vec::new();
    for t in dir.flatten() {
        let p = t.path();
        let read = |f: &str| {
            std::fs::read_to_string(p.join(f))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let state = read("status")
            .lines()
            .find_map(|l| l.strip_prefix("State:").map(|s| s.trim().to_string()))
            .unwrap_or_default();
        out.push(format!("{} ({state}, {})", read("comm"), read("wchan")));
    }
    out.join("; ")
}

/// `GET /readyz` answers 200.
pub fn ready(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(1000)));
    let _ = s.set_write_timeout(Some(Duration::from_millis(1000)));
    if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 32];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut head[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    head[..n].starts_with(b"HTTP/1.1 200")
}

/// What the chaos did.
#[derive(Debug, Default, Clone)]
pub struct ChaosLog {
    pub kills: u64,
    pub restarts: u64,
    /// Exits the controller did not cause (a crash of the server).
    pub unexpected_exits: Vec<String>,
    pub restart_failures: Vec<String>,
    /// From SIGKILL to ready again, per kill.
    pub outages: Vec<Duration>,
}

/// The chaos controller: kills and restarts `server` from `start` until `stop_kills_at`, then hands the
/// server back when `finished` is set (or keeps restarting a server that exits by itself meanwhile).
pub struct Chaos {
    pub log: Arc<Mutex<ChaosLog>>,
    pub finished: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<ServerProc>>,
}

impl Chaos {
    pub fn spawn(
        mut server: ServerProc,
        kill_every: Option<KillRange>,
        seed: u64,
        start: Arc<Mutex<Option<Instant>>>,
        run_for: Duration,
        settle: Duration,
    ) -> Chaos {
        let log = Arc::new(Mutex::new(ChaosLog::default()));
        let finished = Arc::new(AtomicBool::new(false));
        let (l, f) = (log.clone(), finished.clone());
        let handle = std::thread::Builder::new()
            .name("chaos".into())
            .spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed);
                // Wait for the common start instant of the load.
                let start = loop {
                    if let Some(at) = *start.lock().unwrap() {
                        break at;
                    }
                    if f.load(Ordering::Acquire) {
                        return server;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                };
                let stop_kills_at = start + run_for.saturating_sub(settle);
                let mut next_kill = kill_every.map(|r| start + draw(&mut rng, r));
                while !f.load(Ordering::Acquire) {
                    let now = Instant::now();
                    if let Some(status) = server.try_exit() {
                        l.lock().unwrap().unexpected_exits.push(status);
                        restart(&mut server, &l);
                    }
                    if let (Some(at), Some(range)) = (next_kill, kill_every) {
                        if at >= stop_kills_at {
                            next_kill = None;
                        } else if now >= at {
                            let t0 = Instant::now();
                            server.kill9();
                            l.lock().unwrap().kills += 1;
                            if restart(&mut server, &l) {
                                l.lock().unwrap().outages.push(t0.elapsed());
                            }
                            next_kill = Some(Instant::now() + draw(&mut rng, range));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                server
            })
            .expect("start the chaos thread");
        Chaos {
            log,
            finished,
            handle: Some(handle),
        }
    }

    /// Ends the chaos and stops the server.
    pub fn finish(mut self) -> ChaosLog {
        self.finished.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            if let Ok(mut server) = h.join() {
                server.stop();
            }
        }
        let log = self.log.lock().unwrap().clone();
        log
    }
}

fn draw(rng: &mut StdRng, r: KillRange) -> Duration {
    if r.max <= r.min {
        return r.min;
    }
    Duration::from_secs_f64(rng.gen_range(r.min.as_secs_f64()..r.max.as_secs_f64()))
}

/// Starts the server again, retrying (a port still held, a slow start) for up to a minute.
fn restart(server: &mut ServerProc, log: &Mutex<ChaosLog>) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match server.spawn() {
            Ok(_) => {
                log.lock().unwrap().restarts += 1;
                return true;
            }
            Err(e) => {
                server.kill9();
                log.lock().unwrap().restart_failures.push(e);
                if Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_ranges() {
        let r = parse_kill_range("2s..5s").unwrap();
        assert_eq!(r.min, Duration::from_secs(2));
        assert_eq!(r.max, Duration::from_secs(5));
        let one = parse_kill_range("3s").unwrap();
        assert_eq!(one.min, one.max);
        assert!(parse_kill_range("5s..2s").is_err());
        assert!(parse_kill_range("0s").is_err());
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..100 {
            let d = draw(&mut rng, r);
            assert!(d >= r.min && d < r.max);
        }
    }
}
