//! Fetching missing chunks from remotes into the local store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use spore_chunks::{decode_chunk_file, ChunkId, ChunkStore};

use crate::remote::Remote;
use crate::wire::MAX_BATCH;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no source has chunk {first} ({missing} chunks missing); tried: {tried}")]
    Unavailable {
        first: ChunkId,
        missing: usize,
        tried: String,
    },
    #[error("storing a fetched chunk")]
    Store(#[from] spore_chunks::Error),
}

impl From<FetchError> for std::io::Error {
    fn from(e: FetchError) -> Self {
        std::io::Error::other(e)
    }
}

#[derive(Debug, Default)]
pub struct FetchStats {
    pub chunks: AtomicU64,
    pub bytes: AtomicU64,
    pub corrupt: AtomicU64,
    pub batches: AtomicU64,
    /// Chunks handled by background (prefetch, completion) fetches.
    pub background: AtomicU64,
}

/// Remotes in the order they are asked: peers, then the origin.
#[derive(Debug, Default)]
pub struct Fetcher {
    remotes: Vec<Remote>,
    pub stats: FetchStats,
    /// Demand fetches (a guest is waiting) in flight; background work
    /// waits while there are any.
    demand: AtomicUsize,
    /// Chunks being fetched right now, for single flight across callers.
    inflight: Mutex<HashMap<ChunkId, Arc<Flight>>>,
}

#[derive(Debug, Default)]
struct Flight {
    done: Mutex<bool>,
    cv: Condvar,
}

/// First batch size of a background fetch; it then adapts.
const BACKGROUND_BATCH: usize = 8;

struct DemandGuard<'a>(&'a AtomicUsize);

impl Drop for DemandGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Fetcher {
    pub fn new(remotes: Vec<Remote>) -> Self {
        Fetcher {
            remotes,
            stats: FetchStats::default(),
            demand: AtomicUsize::new(0),
            inflight: Mutex::default(),
        }
    }

    pub fn remotes(&self) -> &[Remote] {
        &self.remotes
    }

    pub fn is_empty(&self) -> bool {
        self.remotes.is_empty()
    }

    /// Makes every chunk of `ids` present (and verified) in `store`, for a
    /// reader that is waiting: background fetches pause meanwhile.
    pub fn fetch(&self, store: &ChunkStore, ids: &[ChunkId]) -> Result<(), FetchError> {
        self.demand.fetch_add(1, Ordering::AcqRel);
        let _done = DemandGuard(&self.demand);
        self.fetch_from_remotes(store, ids)
    }

    /// Fetches `ids` at low priority, in order: each batch only when no
    /// demand fetch is in flight, and batches sized to the measured speed
    /// (grown while a batch takes under 50 ms, shrunk over 200 ms), so
    /// that round trips are amortised and a demand read never waits long.
    /// Reports (done, total) after each batch.
    pub fn fetch_background(
        &self,
        store: &ChunkStore,
        ids: &[ChunkId],
        progress: &dyn Fn(u64, u64),
    ) -> Result<(), FetchError> {
        let mut batch = BACKGROUND_BATCH;
        let mut at = 0;
        while at < ids.len() {
            // Bounded wait: a steady stream of demand must not stall the
            // background forever, only slow it down.
            for _ in 0..200 {
                if self.demand.load(Ordering::Acquire) == 0 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let n = batch.min(ids.len() - at);
            let started = std::time::Instant::now();
            self.fetch_from_remotes(store, &ids[at..at + n])?;
            let took = started.elapsed();
            if took < std::time::Duration::from_millis(50) {
                batch = (batch * 2).min(MAX_BATCH);
            } else if took > std::time::Duration::from_millis(200) {
                batch = (batch / 2).max(4);
            }
            at += n;
            self.stats.background.fetch_add(n as u64, Ordering::Relaxed);
            progress(at as u64, ids.len() as u64);
        }
        Ok(())
    }

    /// Fetches what is missing of `ids`, coalescing with fetches already
    /// in flight: a chunk another caller is fetching is waited for, not
    /// requested twice (so a relay asks its upstream once per chunk however
    /// many peers ask it at the same time).
    fn fetch_from_remotes(&self, store: &ChunkStore, ids: &[ChunkId]) -> Result<(), FetchError> {
        let mut mine = Vec::new();
        let mut theirs = Vec::new();
        {
            let mut inflight = self.inflight.lock();
            for id in ids {
                if store.contains(id) {
                    continue;
                }
                match inflight.get(id) {
                    Some(flight) => theirs.push(flight.clone()),
                    None => {
                        inflight.insert(*id, Arc::new(Flight::default()));
                        mine.push(*id);
                    }
                }
            }
        }
        let result = self.fetch_uncoalesced(store, &mine);
        {
            let mut inflight = self.inflight.lock();
            for id in &mine {
                if let Some(flight) = inflight.remove(id) {
                    *flight.done.lock() = true;
                    flight.cv.notify_all();
                }
            }
        }
        result?;
        for flight in theirs {
            let mut done = flight.done.lock();
            while !*done {
                flight.cv.wait(&mut done);
            }
        }
        // Whatever another caller failed to get, try once ourselves.
        let left: Vec<ChunkId> = ids
            .iter()
            .filter(|id| !store.contains(id))
            .copied()
            .collect();
        self.fetch_uncoalesced(store, &left)
    }

    fn fetch_uncoalesced(&self, store: &ChunkStore, ids: &[ChunkId]) -> Result<(), FetchError> {
        let mut missing: Vec<ChunkId> = ids
            .iter()
            .filter(|id| !store.contains(id))
            .copied()
            .collect();
        let mut tried: Vec<String> = Vec::new();
        for remote in &self.remotes {
            if missing.is_empty() {
                break;
            }
            let mut still = Vec::new();
            for batch in missing.chunks(MAX_BATCH) {
                self.stats.batches.fetch_add(1, Ordering::Relaxed);
                let records = match remote.batch(batch) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(remote = remote.url(), error = %e, "chunk fetch failed; trying the next source");
                        tried.push(e.to_string());
                        still.extend_from_slice(batch);
                        continue;
                    }
                };
                for (id, raw) in batch.iter().zip(records) {
                    let Some(raw) = raw else {
                        still.push(*id);
                        continue;
                    };
                    match decode_chunk_file(id, &raw) {
                        Ok(data) => {
                            store.put_with_id(*id, &data)?;
                            self.stats.chunks.fetch_add(1, Ordering::Relaxed);
                            self.stats
                                .bytes
                                .fetch_add(raw.len() as u64, Ordering::Relaxed);
                            remote.stats.chunks.fetch_add(1, Ordering::Relaxed);
                            remote
                                .stats
                                .bytes
                                .fetch_add(raw.len() as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            // A lying or broken remote: never use its bytes.
                            tracing::warn!(remote = remote.url(), error = %e, "remote sent a bad chunk; trying the next source");
                            self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                            remote.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                            tried.push(format!("{}: {e}", remote.url()));
                            still.push(*id);
                        }
                    }
                }
            }
            if !still.is_empty() && !tried.iter().any(|t| t.starts_with(remote.url())) {
                tried.push(format!("{}: lacks {} chunks", remote.url(), still.len()));
            }
            missing = still;
        }
        match missing.first() {
            None => Ok(()),
            Some(first) => Err(FetchError::Unavailable {
                first: *first,
                missing: missing.len(),
                tried: if tried.is_empty() {
                    "no sources configured".into()
                } else {
                    tried.join("; ")
                },
            }),
        }
    }
}
