//! The `--target ws://HOST:PORT` the scenarios load. `wss://HOST:PORT` connects over TLS (with
//! `--tls-ca FILE`, the certificate to trust): used to measure the memory of idle TLS sessions with
//! `density`; for latency figures prefer `ws://`, TLS would measure the crypto too.

use std::net::{SocketAddr, ToSocketAddrs};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TargetError {
    #[error("target {0:?} must start with ws:// or wss://")]
    Scheme(String),
    #[error("target {0:?} has no port (write ws://HOST:PORT)")]
    NoPort(String),
    #[error("target {0:?} does not resolve: {1}")]
    Resolve(String, String),
}

/// A resolved target: the socket address to connect to and the `Host` header to send.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
    pub host_header: String,
    /// `wss://`: sessions run over TLS.
    pub secure: bool,
    /// For `wss://`: the client configuration (trusting `--tls-ca`) and the name to verify.
    pub tls: Option<(std::sync::Arc<rustls::ClientConfig>, String)>,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, TargetError> {
        let (secure, rest) = match (url.strip_prefix("ws://"), url.strip_prefix("wss://")) {
            (Some(rest), _) => (false, rest),
            (_, Some(rest)) => (true, rest),
            _ => return Err(TargetError::Scheme(url.to_string())),
        };
        let authority = rest.split('/').next().unwrap_or("");
        let has_port = authority
            .rsplit_once(':')
            .map(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
            .unwrap_or(false);
        if !has_port {
            return Err(TargetError::NoPort(url.to_string()));
        }
        let addr = authority
            .to_socket_addrs()
            .map_err(|e| TargetError::Resolve(url.to_string(), e.to_string()))?
            .next()
            .ok_or_else(|| TargetError::Resolve(url.to_string(), "no address".into()))?;
        Ok(Target {
            url: format!("{}://{authority}", if secure { "wss" } else { "ws" }),
            addr,
            host_header: authority.to_string(),
            secure,
            tls: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_loopback_target() {
        let t = Target::parse("ws://127.0.0.1:9100/").unwrap();
        assert_eq!(
            t.addr,
            "127.0.0.1:9100".parse::<std::net::SocketAddr>().unwrap()
        );
        assert_eq!(t.host_header, "127.0.0.1:9100");
    }

    #[test]
    fn wss_targets_are_secure() {
        let t = Target::parse("wss://127.0.0.1:9443").unwrap();
        assert!(t.secure);
        assert_eq!(t.url, "wss://127.0.0.1:9443");
        assert!(!Target::parse("ws://127.0.0.1:9443").unwrap().secure);
    }

    #[test]
    fn rejects_other_schemes_and_missing_port() {
        assert!(matches!(
            Target::parse("http://127.0.0.1:1"),
            Err(TargetError::Scheme(_))
        ));
        assert!(matches!(
            Target::parse("ws://127.0.0.1"),
            Err(TargetError::NoPort(_))
        ));
    }
}
