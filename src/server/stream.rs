//! The byte stream a connection runs over: plain TCP or TLS ([`crate::tls::TlsStream`]).
//!
//! The connection driver ([`super::connection`]) is generic over [`SessionStream`], so both
//! listeners serve the same endpoints through the same code. Either stream reads into the buffer
//! the driver lends it and keeps nothing of it while idle.

use std::time::Duration;

use futures_lite::io::{AsyncRead, AsyncWrite};

/// A stream a session can run over.
pub trait SessionStream: AsyncRead + AsyncWrite + Unpin + 'static {
    /// A socket write that waits longer than `timeout` fails.
    fn set_write_timeout(&self, timeout: Option<Duration>);
}

impl SessionStream for glommio::net::TcpStream {
    fn set_write_timeout(&self, timeout: Option<Duration>) {
        let _ = glommio::net::TcpStream::set_write_timeout(self, timeout);
    }
}

impl SessionStream for crate::tls::TlsStream {
    fn set_write_timeout(&self, timeout: Option<Duration>) {
        crate::tls::TlsStream::set_write_timeout(self, timeout);
    }
}
