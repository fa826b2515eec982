//! TLS for `wss://` targets (`--tls-ca FILE`): a rustls client stream over a glommio socket, so the
//! density scenario can measure switchboard's TLS listener. The client side uses rustls's buffered
//! `ClientConnection` (its memory is the harness's, not the server's).

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection};

/// A client configuration trusting the PEM certificates in `ca` (e.g. the server's self-signed
/// certificate), offering ALPN `http/1.1`.
pub fn client_config(ca: &std::path::Path) -> Result<Arc<ClientConfig>, String> {
    let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("{}: {e}", ca.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no PEM certificate", ca.display()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A plain or TLS client socket.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<TlsClient>),
}

/// A TLS client session over a glommio socket.
pub struct TlsClient {
    tcp: TcpStream,
    conn: ClientConnection,
    out: Vec<u8>,
    sent: usize,
    in_flight: Option<usize>,
    buf: Vec<u8>,
}

/// Runs the TLS handshake as a client for `server_name`.
pub async fn connect(
    tcp: TcpStream,
    config: Arc<ClientConfig>,
    server_name: &str,
) -> io::Result<ClientStream> {
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let conn = ClientConnection::new(config, name).map_err(io::Error::other)?;
    let mut client = TlsClient {
        tcp,
        conn,
        out: Vec::new(),
        sent: 0,
        in_flight: None,
        buf: vec![0; 4096],
    };
    while client.conn.is_handshaking() {
        while client.conn.wants_write() {
            client.conn.write_tls(&mut client.out)?;
        }
        if !client.out.is_empty() {
            client.tcp.write_all(&client.out).await?;
            client.out.clear();
        }
        if client.conn.is_handshaking() && client.conn.wants_read() {
            let n = client.tcp.read(&mut client.buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            client.absorb(n)?;
        }
    }
    Ok(ClientStream::Tls(Box::new(client)))
}

impl TlsClient {
    fn absorb(&mut self, n: usize) -> io::Result<()> {
        let mut rd = &self.buf[..n];
        while !rd.is_empty() {
            self.conn.read_tls(&mut rd)?;
            self.conn
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
        Ok(())
    }

    fn poll_flush_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.conn.wants_write() {
            self.conn.write_tls(&mut self.out)?;
        }
        while self.sent < self.out.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.out[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.out.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let tls = match self.get_mut() {
            ClientStream::Plain(tcp) => return Pin::new(tcp).poll_read(cx, out),
            ClientStream::Tls(tls) => tls,
        };
        loop {
            match tls.conn.reader().read(out) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Poll::Ready(Ok(0)),
                Err(e) => return Poll::Ready(Err(e)),
            }
            if let Poll::Ready(Err(e)) = tls.poll_flush_out(cx) {
                return Poll::Ready(Err(e));
            }
            let TlsClient { tcp, buf, .. } = &mut **tls;
            let n = ready!(Pin::new(tcp).poll_read(cx, buf))?;
            if n == 0 {
                return Poll::Ready(Ok(0));
            }
            tls.absorb(n)?;
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let tls = match self.get_mut() {
            ClientStream::Plain(tcp) => return Pin::new(tcp).poll_write(cx, data),
            ClientStream::Tls(tls) => tls,
        };
        if let Some(n) = tls.in_flight {
            ready!(tls.poll_flush_out(cx))?;
            tls.in_flight = None;
            return Poll::Ready(Ok(n));
        }
        ready!(tls.poll_flush_out(cx))?;
        let n = tls.conn.writer().write(data)?;
        tls.in_flight = Some(n);
        ready!(tls.poll_flush_out(cx))?;
        tls.in_flight = None;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            ClientStream::Tls(tls) => tls.poll_flush_out(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(tcp) => Pin::new(tcp).poll_close(cx),
            ClientStream::Tls(tls) => {
                if tls.in_flight.is_none() {
                    tls.conn.send_close_notify();
                    tls.in_flight = Some(0);
                }
                ready!(tls.poll_flush_out(cx))?;
                Pin::new(&mut tls.tcp).poll_close(cx)
            }
        }
    }
}
