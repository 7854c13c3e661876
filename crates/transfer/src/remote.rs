//! Another agent (a peer or the origin), reached over HTTP.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use spore_chunks::ChunkId;

use crate::wire::{self, WireError};

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{url}: {message}")]
    Http { url: String, message: String },
    #[error("{url}: bad batch response")]
    Wire {
        url: String,
        #[source]
        source: WireError,
    },
    #[error("{url}: answer is not the expected JSON")]
    Json { url: String },
    #[error("{url} is marked down for a few seconds after a failure")]
    Down { url: String },
}

/// Why chunks are fetched. A demand batch's first chunk is one a reader
/// is waiting for, the rest its read-ahead; the remote counts them towards
/// the chunks' popularity. Background batches (prefetch, completion) do
/// not count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Demand,
    Background,
}

/// An image name as another agent resolves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub manifest: ChunkId,
    /// The boot profile, if the image has one.
    pub profile: Option<ChunkId>,
    /// The image's chunks that the remote's guests and peers asked for
    /// most, most asked for first.
    pub popular: Vec<ChunkId>,
}

/// Most popular chunks a resolve answer may carry.
pub const MAX_POPULAR: usize = 4096;

/// Counters of what a remote delivered.
#[derive(Debug, Default)]
pub struct RemoteStats {
    pub chunks: AtomicU64,
    pub bytes: AtomicU64,
    pub failures: AtomicU64,
    pub corrupt: AtomicU64,
}

#[derive(Debug)]
pub struct Remote {
    url: String,
    agent: ureq::Agent,
    down_until: Mutex<Option<Instant>>,
    pub stats: RemoteStats,
}

/// A request error in one line: for an HTTP error status, the remote
/// agent's own message (its error bodies are `{"code", "message"}`).
fn describe(e: ureq::Error) -> String {
    match e {
        ureq::Error::Status(code, resp) => {
            let body = resp.into_string().unwrap_or_default();
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_owned))
                .unwrap_or(body);
            format!("HTTP {code}: {message}")
        }
        ureq::Error::Transport(t) => t.to_string(),
    }
}

/// After a failure a remote is skipped for this long, so a dead peer costs
/// one timeout rather than one per read.
const BACKOFF: Duration = Duration::from_secs(5);

impl Remote {
    /// `url` is the remote agent's peer address, e.g.
    /// `https://10.77.0.2:7070`, reached over `links`.
    pub fn new(url: &str, timeout: Duration, links: &crate::Links) -> Result<Self, RemoteError> {
        links.check(url).map_err(|message| RemoteError::Http {
            url: url.to_owned(),
            message,
        })?;
        Ok(Remote {
            url: url.trim_end_matches('/').to_owned(),
            agent: links.http(Duration::from_secs(1).min(timeout), timeout),
            down_until: Mutex::new(None),
            stats: RemoteStats::default(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn check_up(&self) -> Result<(), RemoteError> {
        let mut d = self.down_until.lock();
        match *d {
            Some(t) if Instant::now() < t => Err(RemoteError::Down {
                url: self.url.clone(),
            }),
            _ => {
                *d = None;
                Ok(())
            }
        }
    }

    /// Forgets the backoff of an earlier failure (a retry of the last
    /// sources left).
    pub fn forget_failure(&self) {
        *self.down_until.lock() = None;
    }

    fn failed(&self, message: String) -> RemoteError {
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        *self.down_until.lock() = Some(Instant::now() + BACKOFF);
        RemoteError::Http {
            url: self.url.clone(),
            message,
        }
    }

    fn read_body(&self, resp: ureq::Response) -> Result<Vec<u8>, RemoteError> {
        let mut body = Vec::new();
        resp.into_reader()
            .take((wire::MAX_BATCH * (spore_chunks::MAX_CHUNK_SIZE + 64)) as u64)
            .read_to_end(&mut body)
            .map_err(|e| self.failed(format!("reading the answer: {e}")))?;
        Ok(body)
    }

    /// Asks for `ids` in one round trip: the raw chunk file bytes
    /// (unverified) of each, or None where the remote lacks it.
    pub fn batch(
        &self,
        ids: &[ChunkId],
        class: Class,
    ) -> Result<Vec<Option<Vec<u8>>>, RemoteError> {
        self.check_up()?;
        let query = match class {
            Class::Demand => "?demand=1",
            Class::Background => "",
        };
        let resp = self
            .agent
            .post(&format!("{}/v1/chunks/batch{query}", self.url))
            .send_bytes(&wire::encode_request(ids))
            .map_err(|e| self.failed(describe(e)))?;
        let body = self.read_body(resp)?;
        let records = wire::decode_response(ids, &body).map_err(|source| {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            RemoteError::Wire {
                url: self.url.clone(),
                source,
            }
        })?;
        Ok(records.into_iter().map(|r| r.map(<[u8]>::to_vec)).collect())
    }

    /// What the remote binds to an image name, if anything: the manifest
    /// id and the image's boot profile, when it has one.
    pub fn resolve_image(&self, name: &str) -> Result<Option<Resolved>, RemoteError> {
        self.check_up()?;
        let resp = match self
            .agent
            .get(&format!("{}/v1/images/{name}", self.url))
            .call()
        {
            Ok(r) => r,
            Err(ureq::Error::Status(404, _)) => return Ok(None),
            Err(e) => return Err(self.failed(describe(e))),
        };
        let body = self.read_body(resp)?;
        let json_err = || RemoteError::Json {
            url: self.url.clone(),
        };
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|_| json_err())?;
        let id = v["manifest"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(json_err)?;
        let profile = v["profile"].as_str().and_then(|s| s.parse().ok());
        // Older agents send no popular list; a malformed entry is dropped.
        let popular = v["popular"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str()?.parse().ok())
            .take(MAX_POPULAR)
            .collect();
        Ok(Some(Resolved {
            manifest: id,
            profile,
            popular,
        }))
    }

    /// Which of `ids` the remote lacks (at most [`wire::MAX_BATCH`] at once).
    pub fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, RemoteError> {
        let resp = self
            .agent
            .post(&format!("{}/v1/chunks/missing", self.url))
            .send_bytes(&wire::encode_request(ids))
            .map_err(|e| self.failed(describe(e)))?;
        let body = self.read_body(resp)?;
        wire::decode_request(&body).map_err(|source| RemoteError::Wire {
            url: self.url.clone(),
            source,
        })
    }

    /// Uploads one chunk file (the origin verifies it).
    pub fn put_chunk(&self, id: &ChunkId, raw: &[u8]) -> Result<(), RemoteError> {
        self.agent
            .put(&format!("{}/v1/chunks/{id}", self.url))
            .send_bytes(raw)
            .map_err(|e| self.failed(describe(e)))?;
        Ok(())
    }

    /// Binds `name` to `manifest` (and its boot profile) on the remote (an origin).
    /// Binds `name` to `manifest` (and its boot profile) at the remote.
    /// A name bound there to other content is rebound only with `force`
    /// (the remote answers 409 otherwise).
    pub fn put_image(
        &self,
        name: &str,
        manifest: &ChunkId,
        profile: Option<&ChunkId>,
        force: bool,
    ) -> Result<(), RemoteError> {
        let mut body = serde_json::json!({ "manifest": manifest.to_hex() });
        if let Some(p) = profile {
            body["profile"] = p.to_hex().into();
        }
        if force {
            body["force"] = true.into();
        }
        self.agent
            .put(&format!("{}/v1/images/{name}", self.url))
            .send_string(&body.to_string())
            .map_err(|e| self.failed(describe(e)))?;
        Ok(())
    }
}
