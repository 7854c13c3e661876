//! The per-host agent.
//!
//! One agent owns a data directory. It keeps the chunk store and the
//! metadata of images, disks and VMs, serves images and disks over NBD, runs
//! VMs in QEMU, and answers the CLI over a REST API on a unix socket. The
//! library crates know nothing of each other's wiring; this crate is where
//! they meet.

pub mod agent;
pub mod api;
pub mod api_socket;
#[cfg(test)]
mod crash_tests;
mod disks;
pub mod error;
pub mod exports;
pub mod failpoint;
pub mod holder;
mod images;
pub mod listener;
pub mod meta;
mod metrics;
pub mod migration;
pub mod peer;
pub mod records;
mod templates;
pub mod vms;

use std::os::unix::net::UnixListener as StdUnixListener;
use std::sync::Arc;

pub use agent::{Agent, AgentConfig};
pub use error::AgentError;

use error::Result;

/// Runs an agent until SIGINT, SIGTERM or `POST /v1/agent/stop`, then
/// flushes its disks and removes its sockets. Its VMs keep running (the
/// next agent on the data directory takes them over) unless the stop
/// request asked for them too.
pub fn run(config: AgentConfig) -> Result<()> {
    let agent = Agent::open(config)?;
    let dir = agent.data_dir().to_owned();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(AgentError::io("starting the async runtime"))?;
    // A store that cannot be reached (endpoint, credentials, bucket) stops
    // the agent now rather than failing the first push.
    if let Some(store) = &agent.origin_store {
        runtime.block_on(store.check())?;
        tracing::info!(
            store = store.spec(),
            accept_push = agent.config.accept_push,
            "origin store ready"
        );
    }

    let nbd_path = agent.nbd_socket();
    let api_path = dir.join(spore_api::API_SOCKET);
    let listeners = listeners(&dir, &nbd_path, &api_path, agent.config.socket_holder)?;
    if listeners.held {
        eprintln!("took the NBD and API sockets over from the previous agent (socket holder)");
    }
    let exports: Arc<dyn spore_nbd::Exports> = agent.exports.clone();
    let nbd = spore_nbd::serve_unix(
        listeners.nbd,
        exports.clone(),
        spore_nbd::ServerConfig::default(),
    )
    .map_err(AgentError::io("starting the NBD server"))?;
    let nbd_tcp = match &agent.config.nbd_tcp {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .map_err(AgentError::io(format!("binding NBD TCP {addr}")))?;
            let tls = agent
                .server_tls
                .clone()
                .map(|t| Arc::new(listener::NbdTls(t)) as Arc<dyn spore_nbd::TlsPolicy>);
            match &tls {
                Some(_) => {
                    tracing::info!(%addr, "serving NBD over TCP, TLS required (NBD_OPT_STARTTLS)")
                }
                None => {
                    tracing::warn!(%addr, "serving NBD over TCP in PLAINTEXT (--insecure-listen)");
                    eprintln!("WARNING: --insecure-listen: disks are served over NBD in plaintext on {addr}, without authentication");
                }
            }
            let config = spore_nbd::ServerConfig {
                tls,
                ..Default::default()
            };
            Some(
                spore_nbd::serve_tcp(l, exports, config)
                    .map_err(AgentError::io("starting NBD over TCP"))?,
            )
        }
        None => None,
    };
    agent.templates.fill_all_standbys();

    let api_std = listeners.api;
    let served = runtime.block_on(async {
        let listener = api_socket::ApiListener::from_std(api_std, agent.api_refused.clone())?;
        if let Some(addr) = &agent.config.listen {
            let l = tokio::net::TcpListener::bind(addr).await.map_err(AgentError::io(format!("binding peer listener {addr}")))?;
            // The address as bound (port 0 picks a free one): other hosts
            // are told this one, and DATA/listen.addr says it to scripts.
            let bound = l.local_addr().map_err(AgentError::io("reading the peer listener's address"))?;
            let _ = agent.peer_addr.set(bound.to_string());
            let addr_file = dir.join("listen.addr");
            let tmp = dir.join("listen.addr.tmp");
            std::fs::write(&tmp, format!("{bound}\n"))
                .and_then(|()| std::fs::rename(&tmp, &addr_file))
                .map_err(AgentError::io(format!("writing {}", addr_file.display())))?;
            let addr = &bound.to_string();
            let router = peer::router(agent.clone());
            let bounds = agent.config.peer_bounds;
            match &agent.server_tls {
                Some(tls) => tracing::info!(%addr, identity = %tls.own(), tls_dir = %tls.dir().display(), accept_push = agent.config.accept_push, ?bounds, "serving peers over mutual TLS"),
                None => {
                    tracing::warn!(%addr, "serving peers in PLAINTEXT (--insecure-listen): anyone who reaches this port may use every peer route the flags open");
                    eprintln!("WARNING: --insecure-listen: peers are served in plaintext on {addr}, without authentication");
                }
            }
            tokio::spawn(listener::serve(l, router, agent.tls_failures.clone(), agent.server_tls.clone(), bounds));
        }
        tracing::info!(data_dir = %dir.display(), api = %api_path.display(), nbd = %nbd_path.display(), accel = %agent.vms.accel(), "spore agent ready");
        eprintln!("spore agent ready: data dir {}, API {}, NBD {}", dir.display(), api_path.display(), nbd_path.display());
        axum::serve(listener, api::router(agent.clone()))
            .with_graceful_shutdown(shutdown_signal(agent.clone()))
            .await
            .map_err(AgentError::io("serving the API"))
    });
    let stop_vms = agent.stop.with_vms();
    tracing::info!(stop_vms, "shutting down");
    // Outside the runtime now: plain blocking calls.
    agent.shut_down(stop_vms);
    nbd.shutdown();
    if let Some(t) = nbd_tcp {
        t.shutdown();
    }
    agent.flush_all();
    agent.mark_clean_exit();
    // The socket holder keeps the sockets for the VMs left running and for
    // the next agent; with the VMs stopped nothing needs them.
    if stop_vms || !held_by_holder(&dir) {
        holder::stop(&dir);
        let _ = std::fs::remove_file(&api_path);
        let _ = std::fs::remove_file(&nbd_path);
    }
    served
}

/// The NBD and API listening sockets: the previous agent's, from the
/// socket holder, or bound anew (and a holder started for them).
fn listeners(
    dir: &std::path::Path,
    nbd_path: &std::path::Path,
    api_path: &std::path::Path,
    use_holder: bool,
) -> Result<holder::Listeners> {
    if !use_holder {
        holder::stop(dir);
    } else if let Some(l) = holder::take(dir, nbd_path, api_path) {
        tracing::info!("took the NBD and API sockets over from the socket holder");
        return Ok(l);
    }
    let _ = std::fs::remove_file(nbd_path);
    let nbd = StdUnixListener::bind(nbd_path)
        .map_err(AgentError::io(format!("binding {}", nbd_path.display())))?;
    let api = api_socket::ApiListener::bind_std(api_path)?;
    let l = holder::Listeners {
        nbd,
        api,
        held: false,
    };
    if !use_holder {
        tracing::warn!("--no-socket-holder: VMs' disks reconnect after an agent restart with QEMU's back-off (seconds)");
    } else if let Err(e) = holder::spawn(dir, &l) {
        tracing::warn!(error = %e.chain(), "no socket holder: VMs' disks reconnect after an agent restart with QEMU's back-off (seconds) instead of at once");
    }
    Ok(l)
}

/// True when a socket holder answers for `dir`.
fn held_by_holder(dir: &std::path::Path) -> bool {
    std::os::unix::net::UnixStream::connect(dir.join(holder::HOLDER_SOCKET)).is_ok()
}

async fn shutdown_signal(agent: Arc<Agent>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = agent.stop.requested() => {}
    }
}
