//! NBD over TLS: the `NBD_OPT_STARTTLS` upgrade of a connection, in
//! TLS-required mode (the NBD spec's "FORCEDTLS"): before TLS, every option
//! but STARTTLS and ABORT is answered `NBD_REP_ERR_TLS_REQD`, and
//! `NBD_OPT_EXPORT_NAME`, which has no error reply, closes the connection.
//!
//! The TLS itself is rustls; what is written here is only the bridge to the
//! server's [`Transport`]: one reader thread and several writer threads
//! share a connection, so the rustls state sits behind a lock that no
//! thread holds while it waits for the socket to have bytes. A writer holds
//! it while it sends, which keeps the records in order.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustls::pki_types::CertificateDer;
use rustls::ServerConnection;

use crate::transport::Transport;

/// Who may upgrade a connection, and how: the server's side of the TLS
/// (its certificate, the CA client certificates must chain to) and the
/// check of a client that completed the handshake.
pub trait TlsPolicy: Send + Sync + std::fmt::Debug {
    /// The configuration for the next handshake; it must require client
    /// certificates.
    fn config(&self) -> Arc<rustls::ServerConfig>;
    /// Whether the client with this certificate chain (end entity first)
    /// may use the exports: `Ok` with a name for the logs, or why not.
    /// Asked again twice a second while a session is open: a client no
    /// longer admitted (its certificate revoked, say) is cut off.
    fn admit(&self, chain: &[CertificateDer<'static>]) -> Result<String, String>;
}

/// Ciphertext read from the socket and not yet given to rustls.
struct Incoming {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

/// A [`Transport`] inside TLS, over another one.
pub(crate) struct TlsTransport<'a, T: ?Sized> {
    raw: &'a T,
    conn: Mutex<ServerConnection>,
    incoming: Mutex<Incoming>,
}

/// `io::Write` onto a transport, for rustls's `write_tls`.
struct RawWriter<'a, T: ?Sized>(&'a T);

impl<T: Transport + ?Sized> Write for RawWriter<'_, T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.send_vectored(&[IoSlice::new(buf)])
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<'a, T: Transport + ?Sized> TlsTransport<'a, T> {
    /// Runs the server side of the handshake on `raw` (the client has sent
    /// `NBD_OPT_STARTTLS` and read its ACK), done by `deadline`.
    pub(crate) fn accept(
        raw: &'a T,
        config: Arc<rustls::ServerConfig>,
        deadline: Option<Instant>,
    ) -> io::Result<Self> {
        let tls = TlsTransport {
            raw,
            conn: Mutex::new(ServerConnection::new(config).map_err(tls_error)?),
            incoming: Mutex::new(Incoming {
                buf: vec![0; 32 << 10].into_boxed_slice(),
                start: 0,
                end: 0,
            }),
        };
        loop {
            let mut conn = tls.conn.lock();
            tls.flush(&mut conn)?;
            if !conn.is_handshaking() {
                break;
            }
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                raw.set_read_timeout(Some(left))?;
            }
            // No other thread uses the connection yet: holding the lock
            // while reading is fine here.
            if !tls.feed(&mut conn, true)? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(tls)
    }

    /// The client's certificate chain, end entity first.
    pub(crate) fn peer_certificates(&self) -> Vec<CertificateDer<'static>> {
        self.conn
            .lock()
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default()
    }

    /// Sends whatever rustls has to send.
    fn flush(&self, conn: &mut ServerConnection) -> io::Result<()> {
        while conn.wants_write() {
            conn.write_tls(&mut RawWriter(self.raw))?;
        }
        Ok(())
    }

    /// Gives rustls the next ciphertext, reading the socket first when none
    /// is left (`Ok(false)`: the socket ended).
    fn feed(&self, conn: &mut ServerConnection, read_now: bool) -> io::Result<bool> {
        let mut inc = self.incoming.lock();
        if inc.start == inc.end {
            if !read_now {
                return Ok(true);
            }
            let n = self.raw.recv(&mut inc.buf)?;
            if n == 0 {
                return Ok(false);
            }
            (inc.start, inc.end) = (0, n);
        }
        let (start, end) = (inc.start, inc.end);
        let used = conn.read_tls(&mut &inc.buf[start..end])?;
        inc.start += used;
        let processed = conn.process_new_packets();
        // An alert goes out before the error comes back.
        self.flush(conn)?;
        processed.map_err(tls_error)?;
        Ok(true)
    }
}

impl<T: Transport + ?Sized> Transport for TlsTransport<'_, T> {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut conn = self.conn.lock();
                match conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                // Ciphertext read earlier goes in before the socket is read.
                let pending = {
                    let inc = self.incoming.lock();
                    inc.start < inc.end
                };
                if pending {
                    self.feed(&mut conn, false)?;
                    continue;
                }
            }
            // Wait for the socket without the lock: writers go on.
            let mut inc = self.incoming.lock();
            let n = self.raw.recv(&mut inc.buf)?;
            if n == 0 {
                // Closed without close_notify: the end of the stream all
                // the same (a truncation shows as a half message).
                return Ok(0);
            }
            (inc.start, inc.end) = (0, n);
        }
    }

    fn send_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut conn = self.conn.lock();
        let n = conn.writer().write_vectored(bufs)?;
        self.flush(&mut conn)?;
        Ok(n)
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if how != Shutdown::Read {
            if let Some(mut conn) = self.conn.try_lock() {
                conn.send_close_notify();
                let _ = self.flush(&mut conn);
            }
        }
        self.raw.shutdown(how)
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.raw.set_read_timeout(timeout)
    }
}
