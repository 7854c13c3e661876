//! The peer listener's transport: mutual TLS against the fleet CA, and the
//! bounds every connection from another host is held to.
//!
//! Each accepted connection gets a TLS 1.3 handshake (rustls) within
//! [`Bounds::handshake`]; one without a client certificate of the fleet CA,
//! or with a revoked one, never reaches a route. The certificate's identity
//! (name, roles, serial) goes with every request on the connection as a
//! [`Peer`] extension, which the peer routes' gate (`peer::admit`) checks.
//! Connections are bounded in number ([`Bounds::connections`]); a client
//! that sends a request's head too slowly is dropped
//! ([`Bounds::header`]).

use std::net::SocketAddr;
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

/// Limits on what another host may hold of this one.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Connections open at once; more are closed at accept.
    pub connections: usize,
    /// Time to finish the TLS handshake.
    pub handshake: Duration,
    /// Time to send a request's head (and between requests on a kept
    /// connection).
    pub header: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            connections: 512,
            handshake: Duration::from_secs(10),
            header: Duration::from_secs(30),
        }
    }
}

/// Serves `router` over mutual TLS on `listener` until the runtime stops;
/// counts connections closed before a request in `failures`.
pub async fn serve_tls(
    listener: TcpListener,
    router: Router,
    failures: Arc<AtomicU64>,
    tls: Arc<ServerTls>,
    bounds: Bounds,
) {
    let slots = Arc::new(Semaphore::new(bounds.connections));
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
        let _ = tcp.set_nodelay(true);
        let (router, failures, tls) = (router.clone(), failures.clone(), tls.clone());
        tokio::spawn(async move {
            let _slot = slot;
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
            let service =
                TowerToHyperService::new(router.layer(axum::Extension(Peer { identity, addr })));
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(bounds.header)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(peer = %addr, error = %e, "peer connection ended");
            }
        });
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
