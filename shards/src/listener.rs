//! Listening sockets built by hand, one per shard, all on the same address.
//!
//! glommio's `TcpListener::bind` hard-codes a backlog of 1024, which is too small
//! for a ramp of thousands of connections per second; here the socket is built
//! with socket2 so the backlog comes from configuration. Every socket sets
//! `SO_REUSEPORT` so the kernel load-balances incoming connections across shards.
//!
//! Invariant: when the configured port is 0, the first socket picks a port and
//! every later socket binds that same port, so all shards serve one address.

use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// Failure to create or bind a listening socket.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("cannot create a socket for {addr}: {source}")]
    Create {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} with backlog {backlog}: {source}")]
    Listen {
        addr: SocketAddr,
        backlog: i32,
        source: std::io::Error,
    },
}

/// Creates `count` listening sockets bound to `addr` with `SO_REUSEPORT`.
///
/// Returns the sockets and the address they are bound to (with the real port
/// when `addr` had port 0).
pub fn bind_reuseport(
    addr: SocketAddr,
    count: usize,
    backlog: i32,
) -> Result<(Vec<TcpListener>, SocketAddr), ListenerError> {
    let mut bound_addr = addr;
    let mut listeners = Vec::with_capacity(count);
    for _ in 0..count {
        let listener = bind_one(bound_addr, backlog)?;
        if bound_addr.port() == 0 {
            bound_addr = listener
                .local_addr()
                .map_err(|source| ListenerError::Bind {
                    addr: bound_addr,
                    source,
                })?;
        }
        listeners.push(listener);
    }
    Ok((listeners, bound_addr))
}

fn bind_one(addr: SocketAddr, backlog: i32) -> Result<TcpListener, ListenerError> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|source| ListenerError::Create { addr, source })?;
    let setup = |socket: &Socket| -> std::io::Result<()> {
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nodelay(true)?;
        socket.set_nonblocking(true)
    };
    setup(&socket).map_err(|source| ListenerError::Create { addr, source })?;
    socket
        .bind(&addr.into())
        .map_err(|source| ListenerError::Bind { addr, source })?;
    socket
        .listen(backlog)
        .map_err(|source| ListenerError::Listen {
            addr,
            backlog,
            source,
        })?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_zero_resolves_to_one_shared_port() {
        let (listeners, addr) = bind_reuseport("127.0.0.1:0".parse().unwrap(), 3, 128).unwrap();
        assert_ne!(addr.port(), 0);
        for listener in &listeners {
            assert_eq!(listener.local_addr().unwrap(), addr);
        }
    }

    #[test]
    fn bind_error_names_the_address() {
        // Port 1 needs privileges we may have as root, so use an address that is
        // not local to this machine instead.
        let err = bind_reuseport("192.0.2.1:8080".parse().unwrap(), 1, 128).unwrap_err();
        assert!(err.to_string().contains("192.0.2.1:8080"), "{err}");
    }
}
