//! Cores and CPU time: the cores the load generator is pinned to (`--cores`), the cores the server may
//! run on (read from /proc, so every report says who had which core), and the CPU time a server spends
//! (utime + stime of /proc/PID/stat, every thread of the process), for CPU per round trip, and the time
//! the hypervisor took from this machine's cores (steal, /proc/stat), which on a shared virtual machine
//! stretches every latency of a run without being the server's doing.

use std::collections::BTreeSet;
use std::fmt::Write;

/// Why a core list or a process's CPU figures could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuError {
    #[error("core list {list:?}: {part:?} is not a core number or a range like 0-3")]
    BadCore { list: String, part: String },
    #[error("core list {0:?} names no core")]
    Empty(String),
    #[error("core {core} is not available to this process (available: {available})")]
    Unavailable { core: usize, available: String },
    #[error("/proc/{pid}/stat: process gone or unreadable")]
    NoProcess { pid: u32 },
    #[error("/proc/{pid}/stat: unexpected format")]
    BadStat { pid: u32 },
}

/// Parses a Linux CPU list (`1`, `0,2`, `0-3,6`) into sorted distinct core ids.
pub fn parse_core_list(list: &str) -> Result<Vec<usize>, CpuError> {
    let bad = |part: &str| CpuError::BadCore {
        list: list.to_string(),
        part: part.to_string(),
    };
    let mut cores = BTreeSet::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: usize = a.trim().parse().map_err(|_| bad(part))?;
                let b: usize = b.trim().parse().map_err(|_| bad(part))?;
                if a > b {
                    return Err(bad(part));
                }
                cores.extend(a..=b);
            }
            None => {
                cores.insert(part.parse().map_err(|_| bad(part))?);
            }
        }
    }
    if cores.is_empty() {
        return Err(CpuError::Empty(list.to_string()));
    }
    Ok(cores.into_iter().collect())
}

/// Writes cores as a compact Linux CPU list (`0-2,5`).
pub fn format_core_list(cores: &[usize]) -> String {
    let mut sorted: Vec<usize> = cores.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
            j += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        if j == i {
            let _ = write!(out, "{}", sorted[i]);
        } else {
            let _ = write!(out, "{}-{}", sorted[i], sorted[j]);
        }
        i = j + 1;
    }
    out
}

/// Checks that every core of `wanted` is one this process may run on.
pub fn check_available(wanted: &[usize], available: &[usize]) -> Result<(), CpuError> {
    match wanted.iter().find(|c| !available.contains(c)) {
        Some(&core) => Err(CpuError::Unavailable {
            core,
            available: format_core_list(available),
        }),
        None => Ok(()),
    }
}

/// The cores the threads of process `pid` may run on: the union of `Cpus_allowed_list` over its threads
/// (a thread-per-core server pins each thread to one core). `None` if the process is gone.
pub fn process_cores(pid: u32) -> Option<Vec<usize>> {
    let mut cores = BTreeSet::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        if let Some(list) = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        {
            if let Ok(c) = parse_core_list(list.trim()) {
                cores.extend(c);
            }
        }
    }
    if cores.is_empty() {
        None
    } else {
        Some(cores.into_iter().collect())
    }
}

/// CPU time (user + system) process `pid` has used so far, all threads, in seconds.
pub fn process_cpu_seconds(pid: u32) -> Result<f64, CpuError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|_| CpuError::NoProcess { pid })?;
    let ticks = parse_stat_cpu_ticks(&text).ok_or(CpuError::BadStat { pid })?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Ok(ticks as f64 / hz)
}

/// utime + stime (fields 14 and 15, in clock ticks) of a /proc/PID/stat line. The command name (field 2)
/// is in parentheses and may hold spaces, so fields are counted after its closing parenthesis.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: state is field 3, so utime (14) is the 12th field of `rest`.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU seconds used so far by all of `pids` together; `None` if any of them cannot be read.
pub fn total_cpu_seconds(pids: &[u32]) -> Option<f64> {
    pids.iter()
        .map(|&p| process_cpu_seconds(p).ok())
        .sum::<Option<f64>>()
}

/// Seconds of steal so far, summed over the machine's cores (time a virtual CPU was ready to run but the
/// hypervisor ran something else), and how many cores /proc/stat covers. `None` where /proc/stat has no
/// such field (not Linux, or no hypervisor accounting).
pub fn machine_steal_seconds() -> Option<(f64, usize)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let (ticks, cores) = parse_proc_stat_steal(&text)?;
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Some((ticks as f64 / hz, cores))
}

/// The steal field (the 8th number) of /proc/stat's aggregate `cpu` line, in clock ticks, and the
/// number of per-core `cpuN` lines that aggregate covers (every online core, whatever this process's
/// affinity or quota).
pub fn parse_proc_stat_steal(stat: &str) -> Option<(u64, usize)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks = line.split_whitespace().nth(8)?.parse().ok()?;
    let cores = stat
        .lines()
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count();
    Some((ticks, cores.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_core_lists() {
        assert_eq!(parse_core_list("1").unwrap(), vec![1]);
        assert_eq!(parse_core_list("0-2,5, 3").unwrap(), vec![0, 1, 2, 3, 5]);
        assert_eq!(format_core_list(&[5, 0, 1, 2, 3]), "0-3,5");
        assert_eq!(format_core_list(&[1]), "1");
        assert!(matches!(
            parse_core_list("0,x"),
            Err(CpuError::BadCore { .. })
        ));
        assert!(matches!(
            parse_core_list("3-1"),
            Err(CpuError::BadCore { .. })
        ));
        assert_eq!(parse_core_list(" , "), Err(CpuError::Empty(" , ".into())));
    }

    #[test]
    fn unavailable_core_is_refused() {
        assert!(check_available(&[0, 1], &[0, 1]).is_ok());
        let e = check_available(&[4], &[0, 1]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "core 4 is not available to this process (available: 0-1)"
        );
    }

    #[test]
    fn stat_fields_after_a_name_with_spaces() {
        let stat = "42 (my (odd) name) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 1000 \
                    1000000 200 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(325));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn steal_is_the_eighth_number_of_the_cpu_line() {
        let stat =
            "cpu  4705 150 1120 16250 520 0 40 312 0 0\ncpu0 2000 75 560 8000 260 0 20 156 0 0\n";
        assert_eq!(parse_proc_stat_steal(stat), Some((312, 1)));
        let two = format!("{stat}cpu1 2000 75 560 8000 260 0 20 156 0 0\nintr 1 2 3\n");
        assert_eq!(
            parse_proc_stat_steal(&two),
            Some((312, 2)),
            "the cores are the cpuN lines"
        );
        assert_eq!(
            parse_proc_stat_steal("cpu  1 2 3 4 5 6 7\n"),
            None,
            "no steal field"
        );
        assert_eq!(
            parse_proc_stat_steal("cpu0 1 2 3 4 5 6 7 8\n"),
            None,
            "no aggregate line"
        );
        if std::path::Path::new("/proc/stat").exists() {
            assert!(machine_steal_seconds().is_some_and(|(s, cores)| s >= 0.0 && cores >= 1));
        }
    }

    #[test]
    fn reads_own_cores_and_cpu() {
        let me = std::process::id();
        assert!(!process_cores(me).unwrap().is_empty());
        assert!(process_cpu_seconds(me).unwrap() >= 0.0);
        assert!(process_cpu_seconds(u32::MAX).is_err());
    }
}
