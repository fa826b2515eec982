//! The IP blocklist: a file of CIDR networks, one per line.
//!
//! Format: one IPv4 or IPv6 network per line (`203.0.113.0/24`, `2001:db8::/32`), or a single
//! address (a /32 or /128); `#` starts a comment; blank lines are ignored. A line that is not
//! a network is an error naming `file:line`, and the whole file is refused (at start-up the
//! server does not start; at a reload the previous list stays in force).
//!
//! Pure: [`Blocklist::parse`] takes the text; reading and change polling (by modification
//! time) are the shard driver's. Lookups scan the aggregated networks (overlapping and
//! adjacent ones are merged at parse time).

use std::net::IpAddr;
use std::path::Path;
use std::time::SystemTime;

use ipnet::IpNet;

/// Why a blocklist file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlocklistError {
    #[error("{file}:{line}: `{text}` is not an IP network (expected e.g. 203.0.113.0/24, 2001:db8::/32 or 192.0.2.7)")]
    BadLine {
        file: String,
        line: usize,
        text: String,
    },
    #[error("cannot read the blocklist {file}: {message}")]
    Read { file: String, message: String },
}

/// A parsed blocklist.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Blocklist {
    networks: Vec<IpNet>,
}

impl Blocklist {
    /// Parses the file's text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Blocklist, BlocklistError> {
        let mut networks = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let network = line
                .parse::<IpNet>()
                .or_else(|_| line.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| BlocklistError::BadLine {
                    file: file.to_owned(),
                    line: index + 1,
                    text: line.chars().take(80).collect(),
                })?;
            networks.push(network.trunc());
        }
        Ok(Blocklist {
            networks: IpNet::aggregate(&networks),
        })
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Blocklist, BlocklistError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|err| BlocklistError::Read {
            file: file.clone(),
            message: err.to_string(),
        })?;
        Blocklist::parse(&text, &file)
    }

    /// Whether `ip` is in a listed network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = super::canonical(ip);
        self.networks.iter().any(|network| network.contains(&ip))
    }

    /// Number of networks after merging.
    pub fn len(&self) -> usize {
        self.networks.len()
    }

    /// Whether nothing is listed.
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }

    /// What a reload to `next` changes: the networks it adds and those it drops (after
    /// merging, as text), for the audit record of a reload.
    pub fn changes(&self, next: &Blocklist) -> (Vec<String>, Vec<String>) {
        let added = next
            .networks
            .iter()
            .filter(|n| !self.networks.contains(n))
            .map(|n| n.to_string())
            .collect();
        let removed = self
            .networks
            .iter()
            .filter(|n| !next.networks.contains(n))
            .map(|n| n.to_string())
            .collect();
        (added, removed)
    }
}

/// The modification time of `path` (for change polling); `None` if it cannot be read.
pub fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_name_added_and_dropped_networks() {
        let old = Blocklist::parse("203.0.113.0/24\n192.0.2.7\n", "f").unwrap();
        let new = Blocklist::parse("203.0.113.0/24\n2001:db8::/32\n", "f").unwrap();
        assert_eq!(
            old.changes(&new),
            (
                vec!["2001:db8::/32".to_owned()],
                vec!["192.0.2.7/32".to_owned()]
            )
        );
        assert_eq!(new.changes(&new.clone()), (vec![], vec![]));
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn parses_networks_addresses_comments_and_blank_lines() {
        let list = Blocklist::parse(
            "# abusers\n\n203.0.113.0/24  # a whole range\n192.0.2.7\n2001:db8::/32\n  ::1 \n",
            "block.txt",
        )
        .unwrap();
        assert_eq!(list.len(), 4);
        assert!(list.contains(ip("203.0.113.200")));
        assert!(!list.contains(ip("203.0.114.1")));
        assert!(list.contains(ip("192.0.2.7")));
        assert!(!list.contains(ip("192.0.2.8")));
        assert!(list.contains(ip("2001:db8:1::5")));
        assert!(list.contains(ip("::1")));
        assert!(!list.contains(ip("2001:db9::1")));
        assert!(list.contains(ip("::ffff:203.0.113.9")));
    }

    #[test]
    fn host_bits_are_ignored_and_overlaps_merged() {
        let list = Blocklist::parse("10.1.2.3/8\n10.0.0.0/16\n", "f").unwrap();
        assert_eq!(list.len(), 1);
        assert!(list.contains(ip("10.200.0.1")));
    }

    #[test]
    fn a_bad_line_is_named_with_file_and_line() {
        let err =
            Blocklist::parse("10.0.0.0/8\n# fine\n10.0.0.0/33\n", "/etc/block.txt").unwrap_err();
        assert_eq!(
            err,
            BlocklistError::BadLine {
                file: "/etc/block.txt".into(),
                line: 3,
                text: "10.0.0.0/33".into(),
            }
        );
        assert!(err
            .to_string()
            .starts_with("/etc/block.txt:3: `10.0.0.0/33` is not an IP network"));
        for bad in [
            "example.com",
            "1.2.3",
            "fe80::1%eth0",
            "1.2.3.4/",
            "1.2.3.4 5.6.7.8",
        ] {
            assert!(Blocklist::parse(bad, "f").is_err(), "{bad}");
        }
    }

    #[test]
    fn an_empty_file_blocks_nothing() {
        let list = Blocklist::parse("# nothing yet\n", "f").unwrap();
        assert!(list.is_empty());
        assert!(!list.contains(ip("127.0.0.1")));
    }
}
