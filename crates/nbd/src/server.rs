//! Listening sockets, connection threads and clean shutdown.
//!
//! Each accepted connection gets a thread of its own (the reader) plus
//! [`ServerConfig::workers_per_connection`] workers. The accept loop waits in
//! `poll(2)` on the listener and on a wake-up pipe, so that
//! [`ServerHandle::shutdown`] can stop it without a connection attempt or a
//! timeout.

use std::collections::HashMap;
use std::io::{self, BufReader};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::handshake::{self, HandshakeEnd};
use crate::proto::ProtocolError;
use crate::tls::TlsTransport;
use crate::transport::{Recv, Transport};
use crate::TlsPolicy;
use crate::{transmission, Exports};

/// Tunables of the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Threads running requests for each connection. With 0 the
    /// connection's own thread runs each request before reading the next
    /// (no concurrency, but deterministic: the fuzz targets use it).
    pub workers_per_connection: usize,
    /// Workers a connection may grow to when every worker is busy (a read
    /// that waits on the network must not hold up the requests behind it
    /// that the export can answer at once). QEMU's NBD client has at most
    /// 16 requests in flight.
    pub max_workers_per_connection: usize,
    /// READ/WRITE payload bytes one connection may have in flight; the
    /// reader stops reading requests beyond that.
    pub max_inflight_bytes: usize,
    /// How long a client may take from connecting to choosing an export
    /// (`None`: forever). Transmission has no timeout: idle clients are
    /// normal.
    pub handshake_timeout: Option<Duration>,
    /// On [`ServerHandle::shutdown`], how long connections get to answer
    /// the requests they have already read before their sockets are closed
    /// outright (a client that stops reading replies cannot stall shutdown
    /// beyond this).
    pub shutdown_grace: Duration,
    /// Connections served at once; more are closed on accept.
    pub max_connections: usize,
    /// TLS required: a client must upgrade with `NBD_OPT_STARTTLS` and
    /// present a certificate the policy admits before anything else
    /// (`None`: plaintext, STARTTLS unsupported).
    pub tls: Option<Arc<dyn TlsPolicy>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            workers_per_connection: 4,
            max_workers_per_connection: 16,
            max_inflight_bytes: 64 << 20,
            handshake_timeout: Some(Duration::from_secs(30)),
            max_connections: 256,
            shutdown_grace: Duration::from_secs(5),
            tls: None,
        }
    }
}

/// How a connection ended, when it ended within the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The client sent `NBD_OPT_ABORT` during option haggling.
    Aborted,
    /// The client sent `NBD_CMD_DISC`.
    Disconnected,
    /// The client closed the connection between two messages.
    Closed,
}

/// Why a connection was dropped.
#[derive(Debug, Error)]
pub enum ConnectionError {
    #[error("connection i/o failed")]
    Io(#[source] io::Error),
    #[error("client broke the protocol")]
    Protocol(#[from] ProtocolError),
    #[error("client asked for unknown export {0:?}")]
    UnknownExport(String),
    #[error("connection closed in the middle of a message")]
    Truncated,
    #[error("TLS handshake failed")]
    Tls(#[source] io::Error),
    #[error("client refused: {0}")]
    Refused(String),
}

/// Serve one already-accepted connection on the calling thread, from the
/// greeting until the client leaves, and close it.
pub fn serve_connection<T: Transport + ?Sized>(
    transport: &T,
    exports: &dyn Exports,
    config: &ServerConfig,
) -> Result<SessionEnd, ConnectionError> {
    let result = serve_connection_inner(transport, exports, config);
    let _ = transport.shutdown(Shutdown::Both);
    result
}

fn serve_connection_inner<T: Transport + ?Sized>(
    transport: &T,
    exports: &dyn Exports,
    config: &ServerConfig,
) -> Result<SessionEnd, ConnectionError> {
    // Buffered so that pipelined request headers cost one read between them;
    // large WRITE payloads bypass the buffer.
    let mut reader = BufReader::with_capacity(64 * 1024, Recv::new(transport));
    let deadline = config.handshake_timeout.map(|t| Instant::now() + t);
    reader
        .get_mut()
        .set_deadline(deadline)
        .map_err(ConnectionError::Io)?;
    let tls = config.tls.as_deref();
    let negotiated = match handshake::negotiate(transport, &mut reader, exports, tls)? {
        HandshakeEnd::Transmission(n) => n,
        HandshakeEnd::Aborted => return Ok(SessionEnd::Aborted),
        HandshakeEnd::Closed => return Ok(SessionEnd::Closed),
        HandshakeEnd::StartTls { no_zeroes } => {
            let policy = tls.expect("STARTTLS is accepted only when TLS is offered");
            if !reader.buffer().is_empty() {
                // The client must wait for the ACK before its TLS hello.
                return Err(ProtocolError::BytesAfterStartTls.into());
            }
            return serve_in_tls(transport, exports, config, policy, no_zeroes, deadline);
        }
    };
    reader
        .get_mut()
        .set_deadline(None)
        .map_err(ConnectionError::Io)?;
    transmission::run(transport, &mut reader, negotiated, config)
}

/// The rest of a connection upgraded by `NBD_OPT_STARTTLS`: the handshake,
/// the client's certificate checked, option haggling anew (nothing agreed
/// before TLS counts), then transmission, all inside TLS.
fn serve_in_tls<T: Transport + ?Sized>(
    transport: &T,
    exports: &dyn Exports,
    config: &ServerConfig,
    policy: &dyn TlsPolicy,
    no_zeroes: bool,
    deadline: Option<Instant>,
) -> Result<SessionEnd, ConnectionError> {
    let tls = TlsTransport::accept(transport, policy.config(), deadline).map_err(|e| {
        warn!(error = %e, "NBD client's TLS handshake failed");
        ConnectionError::Tls(e)
    })?;
    let client = policy.admit(&tls.peer_certificates()).map_err(|why| {
        warn!(%why, "NBD client refused");
        ConnectionError::Refused(why)
    })?;
    info!(%client, "NBD client over TLS");
    let mut reader = BufReader::with_capacity(64 * 1024, Recv::new(&tls));
    reader
        .get_mut()
        .set_deadline(deadline)
        .map_err(ConnectionError::Io)?;
    let negotiated = match handshake::negotiate_in_tls(&tls, &mut reader, exports, no_zeroes)? {
        HandshakeEnd::Transmission(n) => n,
        HandshakeEnd::Aborted => return Ok(SessionEnd::Aborted),
        HandshakeEnd::Closed | HandshakeEnd::StartTls { .. } => return Ok(SessionEnd::Closed),
    };
    reader
        .get_mut()
        .set_deadline(None)
        .map_err(ConnectionError::Io)?;
    let chain = tls.peer_certificates();
    let (session_over, over) = std::sync::mpsc::channel::<()>();
    let end = thread::scope(|s| {
        // A certificate revoked (or a role withdrawn) while the session is
        // open ends it: the policy is asked again every RECHECK.
        s.spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = over.recv_timeout(RECHECK) {
                if let Err(why) = policy.admit(&chain) {
                    warn!(%client, %why, "NBD session ended: its client is no longer admitted");
                    let _ = transport.shutdown(Shutdown::Both);
                    break;
                }
            }
        });
        let end = transmission::run(&tls, &mut reader, negotiated, config);
        drop(session_over);
        end
    });
    let _ = tls.shutdown(Shutdown::Write);
    end
}

/// How often an open TLS session's client is checked against the policy
/// again (a revocation takes effect within this).
const RECHECK: Duration = Duration::from_millis(500);

/// A listening socket the server can accept NBD clients on.
pub trait Listener: AsRawFd + Send + 'static {
    type Stream: Transport + 'static;
    /// Accept one connection, ready for blocking I/O.
    fn accept_stream(&self) -> io::Result<Self::Stream>;
    fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()>;
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    fn accept_stream(&self) -> io::Result<UnixStream> {
        let (stream, _) = self.accept()?;
        stream.set_nonblocking(false)?;
        Ok(stream)
    }
    fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        UnixListener::set_nonblocking(self, nonblocking)
    }
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    fn accept_stream(&self) -> io::Result<TcpStream> {
        let (stream, _) = self.accept()?;
        stream.set_nonblocking(false)?;
        // Replies are small and latency-bound; never wait to coalesce them.
        stream.set_nodelay(true)?;
        Ok(stream)
    }
    fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        TcpListener::set_nonblocking(self, nonblocking)
    }
}

/// An NBD server: a set of exports and how to serve them.
pub struct Server {
    exports: Arc<dyn Exports>,
    config: ServerConfig,
}

/// Serve `exports` on a unix socket until the handle is shut down.
pub fn serve_unix(
    listener: UnixListener,
    exports: Arc<dyn Exports>,
    config: ServerConfig,
) -> io::Result<ServerHandle> {
    Server::new(exports, config).serve(listener)
}

/// Serve `exports` on a TCP socket until the handle is shut down.
pub fn serve_tcp(
    listener: TcpListener,
    exports: Arc<dyn Exports>,
    config: ServerConfig,
) -> io::Result<ServerHandle> {
    Server::new(exports, config).serve(listener)
}

impl Server {
    pub fn new(exports: Arc<dyn Exports>, config: ServerConfig) -> Server {
        Server { exports, config }
    }

    /// Serve one already-accepted connection on the calling thread.
    pub fn serve_connection<T: Transport + ?Sized>(
        &self,
        transport: &T,
    ) -> Result<SessionEnd, ConnectionError> {
        serve_connection(transport, &*self.exports, &self.config)
    }

    /// Accept connections on `listener` in a background thread.
    pub fn serve<L: Listener>(self, listener: L) -> io::Result<ServerHandle> {
        listener.set_nonblocking(true)?;
        let (wake_rx, wake_tx) = pipe()?;
        let shared = Arc::new(Shared {
            stopping: AtomicBool::new(false),
            connections: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        });
        let accept_shared = Arc::clone(&shared);
        let grace = self.config.shutdown_grace;
        let accept = thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(listener, wake_rx, self, accept_shared))?;
        Ok(ServerHandle {
            shared,
            grace,
            wake: Some(wake_tx),
            accept: Some(accept),
        })
    }
}

/// A live connection, as the server sees it from outside.
struct Live {
    transport: Arc<dyn Transport>,
    thread: Option<JoinHandle<()>>,
}

impl Live {
    fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

struct Shared {
    stopping: AtomicBool,
    connections: Mutex<HashMap<u64, Live>>,
    next_id: AtomicU64,
}

/// Controls a running server; dropping it shuts the server down.
pub struct ServerHandle {
    shared: Arc<Shared>,
    grace: Duration,
    wake: Option<OwnedFd>,
    accept: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// Connections being served right now.
    pub fn connection_count(&self) -> usize {
        self.shared.connections.lock().len()
    }

    /// Stop accepting, end every connection and wait for their threads.
    /// Requests already read are completed and answered first.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Closing the write end makes the pipe readable for the accept loop.
        drop(self.wake.take());
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        let live: Vec<Live> = self
            .shared
            .connections
            .lock()
            .drain()
            .map(|(_, l)| l)
            .collect();
        // Ending the read side lets each reader finish the requests it has
        // queued and exit; the connection then closes itself.
        for l in &live {
            let _ = l.transport.shutdown(Shutdown::Read);
        }
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline && live.iter().any(Live::running) {
            thread::sleep(Duration::from_millis(5));
        }
        // Whoever is still there (say, blocked sending to a client that does
        // not read) is cut off.
        for l in live.iter().filter(|l| l.running()) {
            let _ = l.transport.shutdown(Shutdown::Both);
        }
        for mut l in live {
            if let Some(t) = l.thread.take() {
                let _ = t.join();
            }
        }
        info!("NBD server stopped");
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if self.accept.is_some() {
            self.stop();
        }
    }
}

fn accept_loop<L: Listener>(listener: L, wake: OwnedFd, server: Server, shared: Arc<Shared>) {
    let server = Arc::new(server);
    loop {
        match wait_readable(listener.as_raw_fd(), wake.as_raw_fd()) {
            Ok(Ready::Wake) => break,
            Ok(Ready::Listener) => {}
            Err(e) => {
                warn!(error = %e, "poll on the NBD listener failed");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let stream = match listener.accept_stream() {
            Ok(stream) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                // Typically EMFILE: back off instead of spinning.
                warn!(error = %e, "accepting an NBD connection failed");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        spawn_connection(stream, &server, &shared);
    }
    debug!("NBD accept loop stopped");
}

fn spawn_connection<T: Transport + 'static>(stream: T, server: &Arc<Server>, shared: &Arc<Shared>) {
    let mut connections = shared.connections.lock();
    if connections.len() >= server.config.max_connections {
        warn!(
            limit = server.config.max_connections,
            "too many NBD connections, refusing one"
        );
        return;
    }
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let transport = Arc::new(stream);
    let (thread_transport, thread_server, thread_shared) = (
        Arc::clone(&transport),
        Arc::clone(server),
        Arc::clone(shared),
    );
    let spawned = thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .spawn(move || {
            debug!(id, "NBD connection");
            match thread_server.serve_connection(&*thread_transport) {
                Ok(end) => debug!(id, ?end, "NBD connection ended"),
                Err(e) => debug!(id, error = %e, cause = ?std::error::Error::source(&e), "NBD connection dropped"),
            }
            thread_shared.connections.lock().remove(&id);
        });
    match spawned {
        Ok(thread) => {
            connections.insert(
                id,
                Live {
                    transport,
                    thread: Some(thread),
                },
            );
        }
        Err(e) => warn!(error = %e, "could not start an NBD connection thread"),
    }
}

enum Ready {
    Listener,
    Wake,
}

fn wait_readable(listener: RawFd, wake: RawFd) -> io::Result<Ready> {
    let mut fds = [
        libc::pollfd {
            fd: listener,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd for the whole call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(Ready::Wake);
        }
        return Ok(Ready::Listener);
    }
}

/// A close-on-exec pipe, as (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and ours alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}
