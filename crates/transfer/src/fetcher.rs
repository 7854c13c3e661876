//! Fetching missing chunks from remotes into the local store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use spore_chunks::{ChunkId, ChunkStore};

use crate::remote::{Class, Remote};
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

/// Called with every chunk that arrived, verified and stored, and its
/// decoded bytes (the agent hands them to its chunk cache, so that the
/// first read does not decode and hash them again).
pub type OnArrival = Arc<dyn Fn(&ChunkId, Vec<u8>, Class) + Send + Sync>;

#[derive(Default)]
struct Arrivals(Option<OnArrival>);

impl std::fmt::Debug for Arrivals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Some(..)" } else { "None" })
    }
}

/// Remotes in the order they are asked: peers, then the origin.
#[derive(Debug, Default)]
pub struct Fetcher {
    remotes: Vec<Remote>,
    arrivals: Arrivals,
    pub stats: FetchStats,
    /// Demand fetches (a guest is waiting) in flight; background work
    /// waits while there are any.
    demand: AtomicUsize,
    /// Chunks being fetched right now, for single flight across callers.
    inflight: Mutex<HashMap<ChunkId, Arc<Flight>>>,
    /// The chunk the latest demand fetch was for (a reader is there now),
    /// and how many demand fetches there have been: background fetches
    /// move on to what follows it.
    last_demand: Mutex<(u64, Option<ChunkId>)>,
}

#[derive(Debug, Default)]
struct Flight {
    done: Mutex<bool>,
    cv: Condvar,
}

/// Pauses before asking unreachable sources again, one per extra round.
const RETRY_PAUSES: [std::time::Duration; 2] = [
    std::time::Duration::from_millis(200),
    std::time::Duration::from_secs(1),
];

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
            arrivals: Arrivals::default(),
            stats: FetchStats::default(),
            demand: AtomicUsize::new(0),
            inflight: Mutex::default(),
            last_demand: Mutex::default(),
        }
    }

    /// Calls `f` with every chunk that arrives (see [`OnArrival`]).
    pub fn on_arrival(mut self, f: OnArrival) -> Self {
        self.arrivals = Arrivals(Some(f));
        self
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
        if let Some(first) = ids.first() {
            let mut last = self.last_demand.lock();
            *last = (last.0 + 1, Some(*first));
        }
        self.fetch_from_remotes(store, ids, Class::Demand)
    }

    /// [`Fetcher::fetch`] for a demand; for background work, fetches `ids`
    /// at once but without pausing other background work (a relay passing
    /// on a peer's prefetch).
    pub fn fetch_as(
        &self,
        store: &ChunkStore,
        ids: &[ChunkId],
        class: Class,
    ) -> Result<(), FetchError> {
        match class {
            Class::Demand => self.fetch(store, ids),
            Class::Background => self.fetch_from_remotes(store, ids, class),
        }
    }

    /// Fetches `ids` at low priority, in order of priority: each batch
    /// only when no demand fetch is in flight, and batches sized to the
    /// measured speed (grown while a batch takes under 50 ms, shrunk over
    /// 200 ms), so that round trips are amortised and a demand read never
    /// waits long. Reports (done, total) after each batch.
    ///
    /// The priority is dynamic: `ids` gives the expected order (a boot
    /// profile), but when a reader demands a chunk that is further down
    /// the list, the reader is evidently there now, so the fetch jumps to
    /// the chunks after it and comes back for the skipped ones last.
    pub fn fetch_background(
        &self,
        store: &ChunkStore,
        ids: &[ChunkId],
        progress: &dyn Fn(u64, u64),
    ) -> Result<(), FetchError> {
        let position: HashMap<ChunkId, usize> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, i))
            .rev()
            .collect();
        let mut queue = PriorityQueue::new(ids.len());
        let mut seen_demand = self.last_demand.lock().0;
        let mut batch = BACKGROUND_BATCH;
        while !queue.is_empty() {
            // Bounded wait: a steady stream of demand must not stall the
            // background forever, only slow it down.
            for _ in 0..200 {
                if self.demand.load(Ordering::Acquire) == 0 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let (epoch, demanded) = *self.last_demand.lock();
            if epoch != seen_demand {
                seen_demand = epoch;
                if let Some(at) = demanded.and_then(|id| position.get(&id)) {
                    queue.reader_at(*at);
                }
            }
            let picked: Vec<ChunkId> = queue.take(batch).into_iter().map(|i| ids[i]).collect();
            let started = std::time::Instant::now();
            self.fetch_from_remotes(store, &picked, Class::Background)?;
            let took = started.elapsed();
            if took < std::time::Duration::from_millis(50) {
                batch = (batch * 2).min(MAX_BATCH);
            } else if took > std::time::Duration::from_millis(200) {
                batch = (batch / 2).max(4);
            }
            self.stats
                .background
                .fetch_add(picked.len() as u64, Ordering::Relaxed);
            progress(queue.done() as u64, ids.len() as u64);
        }
        Ok(())
    }

    /// Fetches what is missing of `ids`, coalescing with fetches already
    /// in flight: a chunk another caller is fetching is waited for, not
    /// requested twice (so a relay asks its upstream once per chunk however
    /// many peers ask it at the same time).
    fn fetch_from_remotes(
        &self,
        store: &ChunkStore,
        ids: &[ChunkId],
        class: Class,
    ) -> Result<(), FetchError> {
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
        let result = self.fetch_uncoalesced(store, &mine, class);
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
        self.fetch_uncoalesced(store, &left, class)
    }

    fn fetch_uncoalesced(
        &self,
        store: &ChunkStore,
        ids: &[ChunkId],
        class: Class,
    ) -> Result<(), FetchError> {
        let mut missing: Vec<ChunkId> = ids
            .iter()
            .filter(|id| !store.contains(id))
            .copied()
            .collect();
        let mut tried: Vec<String> = Vec::new();
        // A source that could not be reached (a dropped SYN on a saturated
        // link, an origin too busy to accept) is asked again, past its
        // backoff, before a reader is told that no source has the chunk.
        for round in 0..=RETRY_PAUSES.len() {
            if round > 0 {
                std::thread::sleep(RETRY_PAUSES[round - 1]);
                tracing::info!(
                    chunks = missing.len(),
                    round,
                    "sources unreachable; asking again"
                );
            }
            let unreachable;
            (missing, unreachable) =
                self.one_round(store, missing, class, round > 0, &mut tried)?;
            if missing.is_empty() || !unreachable {
                break;
            }
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

    /// Asks every remote in turn for what is still missing; returns what
    /// none delivered, and whether a remote could not be reached. `again`:
    /// a retry, which ignores the remotes' backoff.
    fn one_round(
        &self,
        store: &ChunkStore,
        mut missing: Vec<ChunkId>,
        class: Class,
        again: bool,
        tried: &mut Vec<String>,
    ) -> Result<(Vec<ChunkId>, bool), FetchError> {
        let mut unreachable = false;
        for remote in &self.remotes {
            if missing.is_empty() {
                break;
            }
            if again {
                remote.forget_failure();
            }
            let mut still = Vec::new();
            for batch in missing.chunks(MAX_BATCH) {
                self.stats.batches.fetch_add(1, Ordering::Relaxed);
                let records = match remote.batch(batch, class) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(remote = remote.url(), error = %e, "chunk fetch failed; trying the next source");
                        unreachable = true;
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
                    match store.put_verified_file(*id, &raw) {
                        Ok((_, data)) => {
                            if let Some(f) = &self.arrivals.0 {
                                f(id, data, class);
                            }
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
                        Err(e @ spore_chunks::Error::Corrupt { .. }) => {
                            // A lying or broken remote: never use its bytes.
                            tracing::warn!(remote = remote.url(), error = %e, "remote sent a bad chunk; trying the next source");
                            self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                            remote.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                            tried.push(format!("{}: {e}", remote.url()));
                            still.push(*id);
                        }
                        // Our own store failed: not the remote's fault.
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            if !still.is_empty() && !tried.iter().any(|t| t.starts_with(remote.url())) {
                tried.push(format!("{}: lacks {} chunks", remote.url(), still.len()));
            }
            missing = still;
        }
        Ok((missing, unreachable))
    }
}

/// The order of a background fetch: positions 0..len, taken from a cursor
/// that a reader's position can move forward; what the cursor skipped is
/// taken after the end is reached.
#[derive(Debug)]
struct PriorityQueue {
    taken: Vec<bool>,
    left: usize,
    cursor: usize,
}

impl PriorityQueue {
    fn new(len: usize) -> Self {
        PriorityQueue {
            taken: vec![false; len],
            left: len,
            cursor: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.left == 0
    }

    fn done(&self) -> usize {
        self.taken.len() - self.left
    }

    /// A reader is at position `at` (being fetched on demand): go on after it.
    fn reader_at(&mut self, at: usize) {
        if at < self.taken.len() {
            if !self.taken[at] {
                self.taken[at] = true;
                self.left -= 1;
            }
            self.cursor = at + 1;
        }
    }

    /// Up to `n` positions not taken yet, from the cursor on, wrapping round.
    fn take(&mut self, n: usize) -> Vec<usize> {
        let len = self.taken.len();
        let mut out = Vec::with_capacity(n.min(self.left));
        let mut scanned = 0;
        while out.len() < n && self.left > 0 && scanned < len {
            if self.cursor >= len {
                self.cursor = 0;
            }
            if !self.taken[self.cursor] {
                self.taken[self.cursor] = true;
                self.left -= 1;
                out.push(self.cursor);
            }
            self.cursor += 1;
            scanned += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::time::Duration;

    /// A one-shot HTTP peer: drops the first `drop_first` connections
    /// unanswered (an origin too busy to answer), then answers one batch
    /// request with `raw` for `id`.
    fn flaky_peer(
        drop_first: usize,
        id: ChunkId,
        raw: Vec<u8>,
    ) -> (String, std::thread::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let t = std::thread::spawn(move || {
            for _ in 0..drop_first {
                drop(l.accept().unwrap());
            }
            let (mut c, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            // Headers, then the body (one id: 8 + 32 bytes).
            while !req.windows(4).any(|w| w == b"\r\n\r\n")
                || req.len() < req.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4 + 40
            {
                let n = c.read(&mut buf).unwrap();
                assert!(n > 0, "the client hung up");
                req.extend_from_slice(&buf[..n]);
            }
            let body = wire::encode_response(std::iter::once((id, Some(&raw[..]))));
            write!(
                c,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            )
            .unwrap();
            c.write_all(&body).unwrap();
        });
        (url, t)
    }

    #[test]
    fn an_unreachable_last_source_is_asked_again_before_a_read_fails() {
        let dir = tempfile::tempdir().unwrap();
        let sender = ChunkStore::open(dir.path().join("a"), Default::default()).unwrap();
        let store = ChunkStore::open(dir.path().join("b"), Default::default()).unwrap();
        let put = sender.put(b"a chunk the only source has").unwrap();
        let raw = sender.get_raw(&put.id).unwrap().unwrap();
        let (url, peer) = flaky_peer(1, put.id, raw);
        let plain = crate::Links::default().allow_plaintext();
        let f = Fetcher::new(vec![
            Remote::new(&url, Duration::from_secs(5), &plain).unwrap()
        ]);
        f.fetch(&store, &[put.id]).unwrap();
        assert_eq!(store.get(&put.id).unwrap(), b"a chunk the only source has");
        peer.join().unwrap();
    }

    #[test]
    fn a_source_that_stays_unreachable_fails_the_read_in_bounded_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path().join("b"), Default::default()).unwrap();
        // Nothing listens there.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let plain = crate::Links::default().allow_plaintext();
        let f = Fetcher::new(vec![Remote::new(
            &format!("http://127.0.0.1:{port}"),
            Duration::from_secs(5),
            &plain,
        )
        .unwrap()]);
        let started = std::time::Instant::now();
        let e = f.fetch(&store, &[ChunkId::of(b"x")]).unwrap_err();
        assert!(matches!(e, FetchError::Unavailable { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn the_queue_follows_the_reader_and_comes_back_for_what_it_skipped() {
        let mut q = PriorityQueue::new(10);
        assert_eq!(q.take(3), vec![0, 1, 2]);
        // A reader demanded position 6: it is fetched by the reader, and
        // the background goes on after it.
        q.reader_at(6);
        assert_eq!(q.take(2), vec![7, 8]);
        assert_eq!(q.take(10), vec![9, 3, 4, 5]);
        assert!(q.is_empty());
        assert_eq!(q.done(), 10);
        assert!(q.take(5).is_empty());
    }

    #[test]
    fn a_reader_behind_the_cursor_or_out_of_range_changes_little() {
        let mut q = PriorityQueue::new(5);
        assert_eq!(q.take(4), vec![0, 1, 2, 3]);
        q.reader_at(1); // already taken: the cursor still follows the reader
        assert_eq!(q.take(5), vec![4]);
        assert!(q.is_empty());
        let mut q = PriorityQueue::new(3);
        q.reader_at(99);
        assert_eq!(q.take(5), vec![0, 1, 2]);
    }
}
