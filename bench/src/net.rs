//! TCP connections for the load generator. Client sockets are spread over many source addresses in
//! 127.0.0.0/8 so that tens of thousands of sessions (and the TIME_WAIT left by repeated runs) do not
//! exhaust the ephemeral ports of one address pair.
//!
//! A socket is created with socket2, bound to its source address with IP_BIND_ADDRESS_NO_PORT (the port is
//! picked at connect time, by the full 4-tuple), connected without blocking, and handed to glommio. glommio
//! has no public "wait until connected" call for a foreign socket; the first write does it: a send on a
//! socket still in SYN_SENT returns EAGAIN, glommio then waits for POLLOUT, which fires when the connection
//! completes or fails, and the retried send reports the outcome (ECONNREFUSED, ETIMEDOUT ...).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{FromRawFd, IntoRawFd};

use socket2::{Domain, Protocol, Socket, Type};

/// Hands out source addresses round-robin. Only used when the target is IPv4 loopback.
#[derive(Debug, Clone)]
pub struct SourceAddrs {
    addrs: Vec<Ipv4Addr>,
    next: usize,
}

impl SourceAddrs {
    /// `count` addresses 127.0.0.2, 127.0.0.3, ... skipping .0 and .255 in the last octet; `offset` rotates
    /// the start so that shards do not all begin on the same address. Empty (no binding) when the target is
    /// not IPv4 loopback or `count` is 0.
    pub fn new(target: SocketAddr, count: u32, offset: usize) -> SourceAddrs {
        let loopback_v4 = matches!(target.ip(), IpAddr::V4(ip) if ip.is_loopback());
        let mut addrs = Vec::new();
        if loopback_v4 {
            let mut raw: u32 = u32::from(Ipv4Addr::new(127, 0, 0, 2));
            while (addrs.len() as u32) < count && raw < u32::from(Ipv4Addr::new(127, 255, 255, 255))
            {
                let last = raw & 0xff;
                if last != 0 && last != 255 {
                    addrs.push(Ipv4Addr::from(raw));
                }
                raw += 1;
            }
        }
        let next = if addrs.is_empty() {
            0
        } else {
            offset % addrs.len()
        };
        SourceAddrs { addrs, next }
    }

    pub fn next(&mut self) -> Option<Ipv4Addr> {
        if self.addrs.is_empty() {
            return None;
        }
        let a = self.addrs[self.next];
        self.next = (self.next + 1) % self.addrs.len();
        Some(a)
    }

    pub fn len(&self) -> usize {
        self.addrs.len()
    }
}

/// Starts a non-blocking connect from `source` (if any) to `target` and returns the glommio stream. The
/// connection completes (or fails) during the first write; see the module comment.
pub fn start_connect(
    target: SocketAddr,
    source: Option<Ipv4Addr>,
) -> std::io::Result<glommio::net::TcpStream> {
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    if let Some(ip) = source {
        set_bind_address_no_port(&socket)?;
        socket.bind(&SocketAddr::new(IpAddr::V4(ip), 0).into())?;
    }
    socket.set_nodelay(true)?;
    match socket.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let fd = socket.into_raw_fd();
    // SAFETY: `fd` is a connected-or-connecting TCP socket we own; ownership passes to glommio.
    Ok(unsafe { glommio::net::TcpStream::from_raw_fd(fd) })
}

fn set_bind_address_no_port(socket: &Socket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads an int-sized option value from a valid pointer.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A short, stable name for an I/O error, used as a failure reason in reports.
pub fn io_reason(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "connection refused".into(),
        Some(libc::ECONNRESET) => "connection reset".into(),
        Some(libc::ETIMEDOUT) => "tcp timeout".into(),
        Some(libc::EADDRNOTAVAIL) => "no local address/port (EADDRNOTAVAIL)".into(),
        Some(libc::EMFILE) | Some(libc::ENFILE) => "out of file descriptors".into(),
        Some(libc::EPIPE) => "broken pipe".into(),
        Some(code) => format!("os error {code}"),
        None => format!("{:?}", e.kind()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_over_loopback_skipping_edge_octets() {
        let mut s = SourceAddrs::new("127.0.0.1:80".parse().unwrap(), 300, 0);
        assert_eq!(s.len(), 300);
        let all: Vec<_> = (0..300).map(|_| s.next().unwrap()).collect();
        assert_eq!(all[0], Ipv4Addr::new(127, 0, 0, 2));
        assert!(all
            .iter()
            .all(|a| a.octets()[3] != 0 && a.octets()[3] != 255));
        assert!(all.contains(&Ipv4Addr::new(127, 0, 1, 1)));
        assert_eq!(s.next().unwrap(), all[0], "wraps around");
    }

    #[test]
    fn no_spreading_for_non_loopback_or_v6() {
        assert_eq!(
            SourceAddrs::new("[::1]:80".parse().unwrap(), 10, 0).len(),
            0
        );
        assert_eq!(
            SourceAddrs::new("10.0.0.1:80".parse().unwrap(), 10, 0).len(),
            0
        );
    }
}
