//! Server-side memory figures read from /proc/PID/status (VmRSS, in kB), and the load average of the
//! machine so every report records the conditions it was measured under.

use std::path::PathBuf;

/// Resident set size of process `pid`, in bytes. `None` if the process or the field is gone.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let path = PathBuf::from(format!("/proc/{pid}/status"));
    let text = std::fs::read_to_string(path).ok()?;
    parse_vm_rss(&text)
}

/// Extracts `VmRSS:   1234 kB` from the text of a /proc status file, as bytes.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => Some(value * 1024),
        Some(_) => None,
    }
}

/// The 1, 5 and 15 minute load averages of the machine.
pub fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|s| s.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vm_rss_in_kb() {
        let status = "Name:\tx\nVmPeak:\t  999 kB\nVmRSS:\t   2048 kB\nThreads: 1\n";
        assert_eq!(parse_vm_rss(status), Some(2048 * 1024));
    }

    #[test]
    fn missing_vm_rss_is_none() {
        assert_eq!(parse_vm_rss("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn reads_own_rss() {
        let rss = rss_bytes(std::process::id()).expect("own /proc status");
        assert!(rss > 0);
    }
}
