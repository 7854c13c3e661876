//! Live migration of a running VM to another agent.
//!
//! The source agent drives it ([`source`]): it asks the destination to get
//! ready ([`destination`]: a disk on the same image, fetched from the
//! destination's own sources, and a QEMU waiting for the stream), copies the
//! blocks the VM wrote (its overlay, with dirty tracking), starts QEMU's
//! migration and watches every pass ([`policy`]), sends the last dirty
//! blocks while the guest is paused before the switch, and commits. Until
//! the switch the source VM is the VM: any failure or a cancel leaves it
//! running and removes what the destination made.
//!
//! Owns: the migrations in flight both ways ([`jobs::Jobs`]), kept in
//! memory only; the VMs and disks it moves belong to the VM and disk
//! services, which it calls.
//!
//! Between agents, on the destination's peer listener (only with
//! `--accept-migrations`):
//!
//! ```text
//! POST /v1/migrations                  IncomingRequest -> IncomingReady
//! GET  /v1/migrations/{vm}             -> IncomingStatus (the guest runs here?)
//! PUT  /v1/migrations/{vm}/blocks      a block batch (spore_blockdev::batch)
//! POST /v1/migrations/{vm}/recover     -> IncomingReady (post-copy recovery)
//! POST /v1/migrations/{vm}/commit      -> IncomingCommitted
//! POST /v1/migrations/{vm}/abort
//! ```

mod connections;
pub mod destination;
mod jobs;
pub mod policy;
pub mod relay;
pub mod source;
mod takeover;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::de::DeserializeOwned;
use spore_api::ErrorBody;

use crate::disks::Disks;
use crate::error::{AgentError, Result};
use crate::exports::Registry;
use crate::meta::Meta;
use crate::vms::Vms;
pub use jobs::{Incoming, Job, Jobs};

/// The migration service: migrations this agent runs or ran (as source)
/// and receives (as destination). It owns the migrations in flight
/// ([`Jobs`]); the VMs it moves belong to the VM service, which it calls
/// to start the arriving QEMU and to stop or take back the leaving one,
/// and their disks to the disk service.
#[derive(Debug)]
pub struct Migration {
    vms: Arc<Vms>,
    disks: Arc<Disks>,
    exports: Arc<Registry>,
    meta: Arc<Meta>,
    /// The peer listener as configured (`--listen`): QEMU's incoming
    /// streams listen on its host.
    listen: Option<String>,
    /// The peer listener as bound, once it listens: destinations are told
    /// this address.
    peer_addr: Arc<OnceLock<String>>,
    /// How destinations are reached.
    links: spore_transfer::Links,
    /// spore's TLS for the memory stream.
    stream_tls: StreamTls,
    /// Incoming migrations at once (`--max-incoming-migrations`).
    max_incoming: usize,
    /// Connections the stream's relay refused.
    refused: Arc<std::sync::atomic::AtomicU64>,
    jobs: Jobs,
}

/// How the migration service reaches and is reached by other hosts.
#[derive(Debug, Clone)]
pub struct Reach {
    /// The peer listener as configured (`--listen`).
    pub listen: Option<String>,
    /// The peer listener as bound, once it listens.
    pub peer_addr: Arc<OnceLock<String>>,
    pub links: spore_transfer::Links,
    pub stream_tls: StreamTls,
    /// `--max-incoming-migrations`.
    pub max_incoming: usize,
    /// Counts connections the stream's relay refused (the peer listener's
    /// TLS failures counter).
    pub refused: Arc<std::sync::atomic::AtomicU64>,
}

/// QEMU moves a migration's memory itself, host to host; between hosts of a
/// TLS fleet it travels inside spore's TLS, carried by a relay at each end
/// ([`relay`]: measured against QEMU's own TLS, and cheaper). The
/// destination says in its `IncomingReady` whether the stream must be TLS.
#[derive(Debug, Clone, Default)]
pub struct StreamTls {
    /// This host's certificate as a client: the source's relay presents it.
    pub client: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    /// The peer listener's TLS, when it has one: incoming streams must come
    /// through the destination's relay in it.
    pub server: Option<Arc<spore_pki::ServerTls>>,
}

impl StreamTls {
    /// Incoming streams must be TLS: the peer listener is.
    pub fn required(&self) -> bool {
        self.server.is_some()
    }
}

impl Migration {
    pub(crate) fn new(
        vms: Arc<Vms>,
        disks: Arc<Disks>,
        exports: Arc<Registry>,
        meta: Arc<Meta>,
        reach: Reach,
    ) -> Self {
        Migration {
            links: reach.links,
            stream_tls: reach.stream_tls,
            max_incoming: reach.max_incoming,
            refused: reach.refused,
            listen: reach.listen,
            peer_addr: reach.peer_addr,
            vms,
            disks,
            exports,
            meta,
            jobs: Jobs::default(),
        }
    }
}

/// The destination agent's peer listener, as the source talks to it.
#[derive(Debug, Clone)]
pub struct PeerClient {
    pub(crate) base: String,
    links: spore_transfer::Links,
    http: ureq::Agent,
}

impl PeerClient {
    /// The destination at `base`, reached over `links`.
    pub fn new(base: &str, timeout: Duration, links: &spore_transfer::Links) -> Result<Self> {
        links.check(base).map_err(AgentError::Invalid)?;
        Ok(PeerClient {
            base: base.trim_end_matches('/').to_owned(),
            links: links.clone(),
            http: links.http(Duration::from_secs(5), timeout),
        })
    }

    /// The same destination with another timeout per request.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        PeerClient {
            base: self.base.clone(),
            links: self.links.clone(),
            http: self.links.http(Duration::from_secs(5), timeout),
        }
    }

    /// The host part of the URL (where QEMU's stream goes).
    pub fn host(&self) -> Result<String> {
        let rest = self
            .base
            .strip_prefix("https://")
            .or_else(|| self.base.strip_prefix("http://"))
            .ok_or_else(|| AgentError::Invalid(format!("{} is not a peer URL", self.base)))?;
        let hostport = rest.split('/').next().unwrap_or("");
        let host = match hostport.rsplit_once(':') {
            Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
            _ => hostport,
        };
        if host.is_empty() {
            return Err(AgentError::Invalid(format!("{} names no host", self.base)));
        }
        Ok(host.trim_matches(|c| c == '[' || c == ']').to_owned())
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<T> {
        let url = format!("{}{path}", self.base);
        let req = self.http.request(method, &url);
        let resp = match body {
            Some(b) => req
                .set("content-type", "application/octet-stream")
                .send_bytes(b),
            None => req.call(),
        };
        let what = format!("destination {}: {method} {path}", self.base);
        match resp {
            Ok(r) => r
                .into_string()
                .map_err(|e| e.to_string())
                .and_then(|s| serde_json::from_str::<T>(&s).map_err(|e| e.to_string()))
                .map_err(|e| AgentError::State(format!("{what}: bad answer: {e}"))),
            Err(ureq::Error::Status(code, r)) => {
                let msg = r
                    .into_string()
                    .ok()
                    .and_then(|s| serde_json::from_str::<ErrorBody>(&s).ok())
                    .map(|b| b.message)
                    .unwrap_or_else(|| "no reason given".into());
                Err(AgentError::State(format!("{what}: {code}: {msg}")))
            }
            Err(ureq::Error::Transport(t)) => Err(AgentError::State(format!("{what}: {t}"))),
        }
    }

    pub fn post<T: DeserializeOwned>(&self, path: &str, body: &impl serde::Serialize) -> Result<T> {
        let bytes = serde_json::to_vec(body).expect("request bodies serialise");
        self.call("POST", path, Some(&bytes))
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call("GET", path, None)
    }

    pub fn put_bytes<T: DeserializeOwned>(&self, path: &str, body: &[u8]) -> Result<T> {
        self.call("PUT", path, Some(body))
    }
}
