//! The peer listener's transport: mutual TLS against the fleet CA, and the
//! bounds every connection from another host is held to.
//!
//! Each accepted connection gets a TLS 1.3 handshake (rustls) within
//! [`Bounds::handshake`]; one without a client certificate of the fleet CA,
//! or with a revoked one, never reaches a route. The certificate's identity
//! (name, roles, serial) goes with every request on the connection as a
//! [`Peer`] extension, which the peer routes' gate (`peer::admit`) checks.
//! Connections are bounded in number, in all and per address
//! ([`Bounds`]); a client that sends a request's head too slowly is
//! dropped ([`Bounds::header`]); bodies are bounded in size. With
//! `--insecure-listen` the same bounds hold, without the TLS.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use spore_pki::{PeerIdentity, Role, ServerTls};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Who sent a peer request: the identity its connection's certificate
/// proved, and where it came from.
#[derive(Debug, Clone)]
pub struct Peer {
    pub identity: PeerIdentity,
    pub addr: SocketAddr,
}

/// Limits on what another host may hold of this one (`spore agent
/// --peer-*` flags).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Connections open at once; more are closed at accept.
    pub connections: usize,
    /// Connections open at once from one address.
    pub per_host: usize,
    /// Time to finish the TLS handshake.
    pub handshake: Duration,
    /// Time to send a request's head, and the idle time allowed between
    /// requests on a kept connection.
    pub header: Duration,
    /// Bytes of a request's body (a chunk, a batch of a migrating disk's
    /// blocks); more is answered 413.
    pub max_body: usize,
}

/// The smallest body bound that still lets every peer route work: the
/// largest chunk or batch of blocks, and room for framing.
pub const MIN_BODY: usize = max_usize(
    spore_chunks::MAX_CHUNK_SIZE,
    spore_blockdev::batch::MAX_BATCH_BYTES,
) + (1 << 20);

const fn max_usize(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            connections: 512,
            per_host: 128,
            handshake: Duration::from_secs(10),
            header: Duration::from_secs(30),
            max_body: MIN_BODY,
        }
    }
}

impl Bounds {
    /// Refuses bounds no fleet could work with.
    pub fn check(&self) -> Result<(), String> {
        if self.connections == 0 || self.per_host == 0 {
            return Err(
                "--peer-connections and --peer-connections-per-host must be at least 1".into(),
            );
        }
        if self.handshake.is_zero() || self.header.is_zero() {
            return Err(
                "--peer-handshake-timeout and --peer-header-timeout must be at least 1 s".into(),
            );
        }
        if self.max_body < MIN_BODY {
            return Err(format!(
                "--peer-max-body must be at least {} MiB: a chunk or a batch of a migrating disk's blocks is that large",
                MIN_BODY >> 20
            ));
        }
        Ok(())
    }
}

/// Connections open per address; a [`HostSlot`] gives its place back when
/// the connection ends.
#[derive(Debug, Default)]
struct PerHost(parking_lot::Mutex<HashMap<IpAddr, usize>>);

struct HostSlot {
    hosts: Arc<PerHost>,
    ip: IpAddr,
}

impl PerHost {
    fn take(self: &Arc<Self>, ip: IpAddr, limit: usize) -> Option<HostSlot> {
        let mut m = self.0.lock();
        let n = m.entry(ip).or_default();
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(HostSlot {
            hosts: self.clone(),
            ip,
        })
    }
}

impl Drop for HostSlot {
    fn drop(&mut self) {
        let mut m = self.hosts.0.lock();
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Serves `router` on `listener` until the runtime stops: over mutual TLS
/// with `tls`, in plaintext without (`--insecure-listen`), under `bounds`
/// either way. Counts connections closed before a request in `failures`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    failures: Arc<AtomicU64>,
    tls: Option<Arc<ServerTls>>,
    bounds: Bounds,
) {
    let slots = Arc::new(Semaphore::new(bounds.connections));
    let hosts = Arc::new(PerHost::default());
    let router = router.layer(axum::extract::DefaultBodyLimit::max(bounds.max_body));
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                tracing::warn!(error = %e, "accepting a peer connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %addr, limit = bounds.connections, "too many peer connections; closed");
            continue;
        };
        let Some(host_slot) = hosts.take(addr.ip(), bounds.per_host) else {
            failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %addr, limit = bounds.per_host, "too many connections from one host; closed");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (router, failures, tls) = (router.clone(), failures.clone(), tls.clone());
        tokio::spawn(async move {
            let _slots = (slot, host_slot);
            let Some(tls) = tls else {
                return serve_http(tcp, router, addr, bounds).await;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let stream = match tokio::time::timeout(bounds.handshake, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer = %addr, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer = %addr, seconds = bounds.handshake.as_secs(), "TLS handshake not finished in time; closed");
                    return;
                }
            };
            let identity = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| PeerIdentity::of(c.as_ref()));
            let identity = match identity {
                Some(Ok(id)) => id,
                // rustls required a verified certificate: not reached.
                _ => return,
            };
            tracing::debug!(peer = %addr, identity = %identity, "peer connected");
            let router = router.layer(axum::Extension(Peer { identity, addr }));
            serve_http(stream, router, addr, bounds).await;
        });
    }
}

/// HTTP/1.1 on one connection, a request's head due within
/// [`Bounds::header`].
async fn serve_http<S>(stream: S, router: Router, addr: SocketAddr, bounds: Bounds)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(bounds.header)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(router))
        .await;
    if let Err(e) = served {
        tracing::debug!(peer = %addr, error = %e, "peer connection ended");
    }
}

/// NBD over TCP (`--nbd-tcp`): TLS with the host's certificate, required
/// before any export is named (`NBD_OPT_STARTTLS`), and only for clients
/// of the fleet CA with the `host` or `operator` role whose certificate is
/// not revoked.
#[derive(Debug)]
pub struct NbdTls(pub Arc<ServerTls>);

impl spore_nbd::TlsPolicy for NbdTls {
    fn config(&self) -> Arc<tokio_rustls::rustls::ServerConfig> {
        self.0.config()
    }

    fn admit(
        &self,
        chain: &[tokio_rustls::rustls::pki_types::CertificateDer<'static>],
    ) -> Result<String, String> {
        let cert = chain.first().ok_or("no client certificate")?;
        let id = PeerIdentity::of(cert.as_ref()).map_err(|e| e.to_string())?;
        if self.0.is_revoked(&id.serial) {
            return Err(format!("{id}: its certificate is revoked"));
        }
        if !(id.has(Role::Host) || id.has(Role::Operator)) {
            return Err(format!("{id}: NBD needs the host or operator role"));
        }
        Ok(id.to_string())
    }
}
