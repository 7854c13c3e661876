//! Another agent (a peer or the origin), reached over HTTP.

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Since when the name has pointed at this manifest there (unix
    /// seconds), if the remote says.
    pub bound_at: Option<u64>,
}

/// Most popular chunks a resolve answer may carry.
pub const MAX_POPULAR: usize = 4096;

/// Largest resolve answer read: the manifest, the profile and
/// [`MAX_POPULAR`] ids in hex, with room for JSON's punctuation.
const MAX_RESOLVE_ANSWER: usize = 4096 + MAX_POPULAR * 72;

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
    timeout: Duration,
    health: Mutex<Health>,
    /// A background probe of a source on probation is under way.
    probing: AtomicBool,
    pub stats: RemoteStats,
}

/// What the fetcher knows of how a remote behaves.
#[derive(Debug, Default)]
struct Health {
    /// Skipped until then after a failure.
    down_until: Option<Instant>,
    /// Failures since the last success: each doubles the next backoff.
    failures_in_row: u32,
    /// Failed and not yet answered since: asked only after every healthy
    /// source (and probed in the background) until it answers again.
    probation: bool,
    /// Smoothed time from request to the answer's headers.
    latency: Option<Duration>,
    /// Smoothed deviation from it (as TCP smooths round trips).
    jitter: Duration,
    /// Requests in flight, by ticket, and when each started: a request
    /// that has waited longer than the usual latency says more about the
    /// remote now than the average does.
    inflight: Vec<(u64, Instant)>,
    next_ticket: u64,
}

/// How a remote looks when choosing whom to ask (see [`Remote::standing`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Standing {
    /// Failed and not answered since: asked after healthy sources.
    pub probation: bool,
    /// The latency to expect now: the smoothed latency, or how long the
    /// oldest request in flight has waited, whichever is longer.
    pub latency: Duration,
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

/// After a failure a remote is skipped for at least this long (and for
/// at least twice its timeout), doubled on each failure in a row up to
/// [`MAX_BACKOFF`], so a dead or wedged peer costs one timeout, not one
/// per read, and is not asked again the moment its backoff ends.
const BACKOFF: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Latency assumed of a remote not measured yet.
const UNMEASURED: Duration = Duration::from_millis(100);

/// The header in which a batch request says how long its asker will wait:
/// a relay answers within it (what it could not get upstream by then as
/// missing), so that it is never blamed for a slow upstream.
pub const DEADLINE_HEADER: &str = "x-spore-deadline-ms";

/// Removes a request from its remote's in-flight list when it ends.
struct Ticket<'a> {
    remote: &'a Remote,
    id: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.remote
            .health
            .lock()
            .inflight
            .retain(|(t, _)| *t != self.id);
    }
}

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
            timeout,
            health: Mutex::default(),
            probing: AtomicBool::new(false),
            stats: RemoteStats::default(),
        })
    }

    /// How this remote stands now, or None while it is backed off.
    pub fn standing(&self) -> Option<Standing> {
        let h = self.health.lock();
        let now = Instant::now();
        if h.down_until.is_some_and(|t| now < t) {
            return None;
        }
        let waited = h
            .inflight
            .iter()
            .map(|(_, at)| now.saturating_duration_since(*at))
            .max()
            .unwrap_or_default();
        Some(Standing {
            probation: h.probation,
            latency: h.latency.unwrap_or(UNMEASURED).max(waited),
        })
    }

    /// How long to wait for this remote's answer before asking the next
    /// source too (a hedged request): past its usual latency by four times
    /// its usual deviation (as TCP's retransmission timeout), so that a
    /// relay that sometimes fetches upstream first is not hedged on every
    /// such fetch; at least 150 ms, at most 1 s.
    pub fn hedge_after(&self) -> Duration {
        let h = self.health.lock();
        let after = match h.latency {
            Some(l) => l + h.jitter * 4,
            None => Duration::from_millis(250),
        };
        after.clamp(Duration::from_millis(150), Duration::from_secs(1))
    }

    /// The remote's request timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Claims the right to probe this remote in the background, when it
    /// is on probation, past its backoff and nobody probes it already.
    pub fn wants_probe(&self) -> bool {
        {
            let h = self.health.lock();
            if !h.probation || h.down_until.is_some_and(|t| Instant::now() < t) {
                return false;
            }
        }
        !self.probing.swap(true, Ordering::AcqRel)
    }

    /// Asks the remote an empty batch: an answer ends its probation.
    pub fn probe(&self) -> Result<(), RemoteError> {
        let result = self.batch_stream(&[], Class::Background, self.timeout, &mut |_, _| {});
        self.probing.store(false, Ordering::Release);
        result
    }

    fn ticket(&self) -> Ticket<'_> {
        let mut h = self.health.lock();
        h.next_ticket += 1;
        let id = h.next_ticket;
        h.inflight.push((id, Instant::now()));
        Ticket { remote: self, id }
    }

    /// The remote answered (in `took`, for a demand request): its failures
    /// are forgiven and its latency learnt.
    fn answered(&self, took: Option<Duration>) {
        let mut h = self.health.lock();
        h.failures_in_row = 0;
        h.probation = false;
        let Some(took) = took else { return };
        match h.latency {
            None => {
                h.latency = Some(took);
                h.jitter = took / 2;
            }
            Some(l) => {
                let off = took.abs_diff(l);
                h.jitter = (h.jitter * 3 + off) / 4;
                h.latency = Some((l * 7 + took) / 8);
            }
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn check_up(&self) -> Result<(), RemoteError> {
        let mut h = self.health.lock();
        match h.down_until {
            Some(t) if Instant::now() < t => Err(RemoteError::Down {
                url: self.url.clone(),
            }),
            _ => {
                h.down_until = None;
                Ok(())
            }
        }
    }

    /// Forgets the backoff of an earlier failure (a retry of the last
    /// sources left); the remote stays on probation until it answers.
    pub fn forget_failure(&self) {
        self.health.lock().down_until = None;
    }

    /// Counts a failure: the remote is skipped for a backoff that grows
    /// with each failure in a row, and is on probation afterwards.
    fn failed(&self, message: String) -> RemoteError {
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        let mut h = self.health.lock();
        let base = BACKOFF.max(self.timeout * 2);
        let backoff = (base * 2u32.pow(h.failures_in_row.min(6))).min(MAX_BACKOFF);
        h.failures_in_row += 1;
        h.probation = true;
        h.down_until = Some(Instant::now() + backoff);
        RemoteError::Http {
            url: self.url.clone(),
            message,
        }
    }

    /// A malformed answer: a failure of this remote like any other.
    fn malformed(&self, source: WireError) -> RemoteError {
        let url = self.url.clone();
        match source {
            WireError::Io(e) => self.failed(format!("reading the answer: {e}")),
            source => {
                let _ = self.failed(source.to_string());
                RemoteError::Wire { url, source }
            }
        }
    }

    /// Reads a JSON or id-list answer whole, refusing one over `limit`
    /// bytes (counted as a failure of the remote).
    fn read_body(&self, resp: ureq::Response, limit: usize) -> Result<Vec<u8>, RemoteError> {
        let mut body = Vec::new();
        resp.into_reader()
            .take(limit as u64 + 1)
            .read_to_end(&mut body)
            .map_err(|e| self.failed(format!("reading the answer: {e}")))?;
        if body.len() > limit {
            return Err(self.failed(format!("answer over {limit} bytes")));
        }
        Ok(body)
    }

    /// Asks for `ids` in one round trip: the raw chunk file bytes
    /// (unverified) of each, or None where the remote lacks it.
    pub fn batch(
        &self,
        ids: &[ChunkId],
        class: Class,
    ) -> Result<Vec<Option<Vec<u8>>>, RemoteError> {
        let mut out = Vec::with_capacity(ids.len());
        self.batch_stream(ids, class, self.timeout, &mut |_, raw| out.push(raw))?;
        Ok(out)
    }

    /// Asks for `ids` in one round trip and hands each record to `record`
    /// as it arrives (the raw chunk file bytes, unverified, or None where
    /// the remote lacks it), in request order. The whole request is given
    /// at most `budget` (and the remote's timeout), which the remote is
    /// told too. A malformed answer is a failure of the remote; records
    /// handed on before it stay valid (each is verified by its id).
    pub fn batch_stream(
        &self,
        ids: &[ChunkId],
        class: Class,
        budget: Duration,
        record: &mut dyn FnMut(ChunkId, Option<Vec<u8>>),
    ) -> Result<(), RemoteError> {
        self.check_up()?;
        let query = match class {
            Class::Demand => "?demand=1",
            Class::Background => "",
        };
        let budget = budget.min(self.timeout).max(Duration::from_millis(1));
        // Only what a reader waits for counts towards the latency to
        // expect: a background batch through a relay legitimately takes
        // as long as the relay's own fetch of it upstream.
        let _ticket = (class == Class::Demand).then(|| self.ticket());
        let started = Instant::now();
        let resp = self
            .agent
            .post(&format!("{}/v1/chunks/batch{query}", self.url))
            .timeout(budget)
            .set(DEADLINE_HEADER, &budget.as_millis().to_string())
            .send_bytes(&wire::encode_request(ids))
            .map_err(|e| self.failed(describe(e)))?;
        let took = started.elapsed();
        let mut reader =
            wire::ResponseReader::new(ids, resp.into_reader()).map_err(|e| self.malformed(e))?;
        while let Some((id, raw)) = reader.next_record().map_err(|e| self.malformed(e))? {
            record(id, raw);
        }
        self.answered((class == Class::Demand).then_some(took));
        Ok(())
    }

    /// What the remote binds to an image name, if anything: the manifest
    /// id and the image's boot profile, when it has one.
    pub fn resolve_image(&self, name: &str) -> Result<Option<Resolved>, RemoteError> {
        self.resolve_image_with(name, true)
    }

    /// [`Remote::resolve_image`]; without `popular`, the remote leaves the
    /// popular chunks out (a check for a newer version).
    pub fn resolve_image_with(
        &self,
        name: &str,
        popular: bool,
    ) -> Result<Option<Resolved>, RemoteError> {
        self.check_up()?;
        let query = if popular { "" } else { "?popular=0" };
        let resp = match self
            .agent
            .get(&format!("{}/v1/images/{name}{query}", self.url))
            .call()
        {
            Ok(r) => r,
            Err(ureq::Error::Status(404, _)) => return Ok(None),
            Err(e) => return Err(self.failed(describe(e))),
        };
        let body = self.read_body(resp, MAX_RESOLVE_ANSWER)?;
        let json_err = || {
            let _ = self.failed("answer is not the expected JSON".into());
            RemoteError::Json {
                url: self.url.clone(),
            }
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
            bound_at: v["bound_at"].as_u64(),
        }))
    }

    /// Which of `ids` the remote lacks (at most [`wire::MAX_BATCH`] at once).
    pub fn missing(&self, ids: &[ChunkId]) -> Result<Vec<ChunkId>, RemoteError> {
        let resp = self
            .agent
            .post(&format!("{}/v1/chunks/missing", self.url))
            .send_bytes(&wire::encode_request(ids))
            .map_err(|e| self.failed(describe(e)))?;
        let body = self.read_body(resp, 8 + ids.len() * 32)?;
        wire::decode_request(&body).map_err(|e| self.malformed(e))
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
