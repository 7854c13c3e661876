//! Fetching missing chunks from remotes into the local store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use spore_chunks::{ChunkId, ChunkStore};

use std::time::{Duration, Instant};

use crate::remote::{Class, Remote, RemoteError, Standing};
use crate::wire::MAX_BATCH;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no source has chunk {first} ({missing} chunks missing); tried: {tried}")]
    Unavailable {
        first: ChunkId,
        missing: usize,
        tried: String,
    },
    #[error(
        "chunk {first} did not arrive within {waited:?} ({missing} chunks missing); tried: {tried}"
    )]
    Deadline {
        first: ChunkId,
        missing: usize,
        waited: Duration,
        tried: String,
    },
    /// The fetch another reader of the same chunk ran failed: its error,
    /// shared with every reader that waited for it.
    #[error("{0}")]
    Shared(Arc<str>),
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
    /// Requests sent to a further source because the first had not
    /// answered within a few times its usual latency.
    pub hedged: AtomicU64,
    /// Demand fetches that ran out of time.
    pub deadlines: AtomicU64,
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
#[derive(Debug)]
pub struct Fetcher {
    remotes: Vec<Arc<Remote>>,
    arrivals: Arrivals,
    pub stats: FetchStats,
    /// How long a reader that is waiting (a guest's read) waits at most.
    demand_deadline: Duration,
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

impl Default for Fetcher {
    fn default() -> Self {
        Fetcher::new(Vec::new())
    }
}

/// One chunk being fetched: its outcome, shared with every reader that
/// waits for it (a failed fetch is not run again by each of them).
#[derive(Debug, Default)]
struct Flight {
    outcome: Mutex<Option<Result<(), Arc<str>>>>,
    cv: Condvar,
}

impl Flight {
    fn finish(&self, outcome: Result<(), Arc<str>>) {
        let mut o = self.outcome.lock();
        if o.is_none() {
            *o = Some(outcome);
            self.cv.notify_all();
        }
    }

    /// The outcome, or None if there is none by `deadline`.
    fn wait_until(&self, deadline: Instant) -> Option<Result<(), Arc<str>>> {
        let mut o = self.outcome.lock();
        while o.is_none() {
            if self.cv.wait_until(&mut o, deadline).timed_out() {
                break;
            }
        }
        o.clone()
    }
}

/// Pauses before asking unreachable sources again, one per extra round.
const RETRY_PAUSES: [Duration; 2] = [Duration::from_millis(200), Duration::from_secs(1)];

/// How long a guest's read waits for its chunk at most, by default: then
/// the read fails (and QEMU pauses the VM until the agent resumes it).
pub const DEMAND_DEADLINE: Duration = Duration::from_secs(5);

/// A source is slow (asked after those that are not) only past this
/// expected latency, and four times the best source's.
const SLOW: Duration = Duration::from_millis(500);

/// How long one background batch may take.
const BACKGROUND_DEADLINE: Duration = Duration::from_secs(60);

/// A relay answers this much before its asker's deadline, so that the
/// answer (with what it could not get as missing) arrives in time.
const RELAY_MARGIN: Duration = Duration::from_millis(100);

/// First batch size of a background fetch; it then adapts.
const BACKGROUND_BATCH: usize = 8;

struct DemandGuard<'a>(&'a AtomicUsize);

impl Drop for DemandGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a request to one remote reports back to the fetch that sent it.
enum Event {
    Record(ChunkId, Option<Vec<u8>>),
    Done(Result<(), RemoteError>),
}

/// What a fetch learnt of its sources, for its error message.
#[derive(Default)]
struct Tried {
    notes: Vec<String>,
    unreachable: bool,
}

impl Tried {
    fn note(&mut self, remote: &Remote, what: impl std::fmt::Display) {
        let line = format!("{}: {what}", remote.url());
        if !self.notes.contains(&line) {
            self.notes.push(line);
        }
    }

    fn failed(&mut self, e: &RemoteError) {
        let line = e.to_string();
        if !self.notes.contains(&line) {
            self.notes.push(line);
        }
    }

    fn describe(&self) -> String {
        if self.notes.is_empty() {
            "no source answered in time".into()
        } else {
            self.notes.join("; ")
        }
    }
}

impl Fetcher {
    pub fn new(remotes: Vec<Remote>) -> Self {
        Fetcher {
            remotes: remotes.into_iter().map(Arc::new).collect(),
            arrivals: Arrivals::default(),
            stats: FetchStats::default(),
            demand_deadline: DEMAND_DEADLINE,
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

    /// How long a waiting reader waits at most ([`DEMAND_DEADLINE`] unless
    /// set).
    pub fn demand_deadline(mut self, d: Duration) -> Self {
        self.demand_deadline = d;
        self
    }

    pub fn remotes(&self) -> &[Arc<Remote>] {
        &self.remotes
    }

    pub fn is_empty(&self) -> bool {
        self.remotes.is_empty()
    }

    /// Makes every chunk of `ids` present (and verified) in `store`, for a
    /// reader that is waiting: background fetches pause meanwhile. Fails
    /// once the demand deadline has passed.
    pub fn fetch(&self, store: &ChunkStore, ids: &[ChunkId]) -> Result<(), FetchError> {
        self.fetch_within(store, ids, Class::Demand, self.demand_deadline)
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
        self.fetch_within(store, ids, class, self.budget(class))
    }

    /// How long a fetch of `class` may take here.
    fn budget(&self, class: Class) -> Duration {
        match class {
            Class::Demand => self.demand_deadline,
            Class::Background => BACKGROUND_DEADLINE,
        }
    }

    /// [`Fetcher::fetch_as`] within `budget`: a relay answering a peer
    /// that said how long it waits (less a margin for the answer's way
    /// back).
    pub fn fetch_within(
        &self,
        store: &ChunkStore,
        ids: &[ChunkId],
        class: Class,
        budget: Duration,
    ) -> Result<(), FetchError> {
        self.fetch_within_each(store, ids, class, budget, &mut |_| {})
    }

    /// [`Fetcher::fetch_within`], calling `each` with every chunk of `ids`
    /// as it is here: at once for those the store holds, then as each
    /// arrives (a relay streams its answer so, record by record, instead
    /// of after the whole batch).
    pub fn fetch_within_each(
        &self,
        store: &ChunkStore,
        ids: &[ChunkId],
        class: Class,
        budget: Duration,
        each: &mut dyn FnMut(&ChunkId),
    ) -> Result<(), FetchError> {
        let deadline = Instant::now() + budget;
        match class {
            Class::Demand => {
                self.demand.fetch_add(1, Ordering::AcqRel);
                let _done = DemandGuard(&self.demand);
                if let Some(first) = ids.first() {
                    let mut last = self.last_demand.lock();
                    *last = (last.0 + 1, Some(*first));
                }
                self.fetch_from_remotes_each(store, ids, class, deadline, each)
            }
            Class::Background => self.fetch_from_remotes_each(store, ids, class, deadline, each),
        }
    }

    /// The budget a relay has for a peer that waits `asked` (the header
    /// [`crate::remote::DEADLINE_HEADER`]): that less a margin, within
    /// what this host would give the same class of fetch itself.
    pub fn relay_budget(&self, class: Class, asked: Option<Duration>) -> Duration {
        let own = self.budget(class);
        match asked {
            Some(a) => a.saturating_sub(RELAY_MARGIN).min(own),
            None => own,
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
                std::thread::sleep(Duration::from_millis(5));
            }
            let (epoch, demanded) = *self.last_demand.lock();
            if epoch != seen_demand {
                seen_demand = epoch;
                if let Some(at) = demanded.and_then(|id| position.get(&id)) {
                    queue.reader_at(*at);
                }
            }
            let picked: Vec<ChunkId> = queue.take(batch).into_iter().map(|i| ids[i]).collect();
            let started = Instant::now();
            self.fetch_from_remotes(
                store,
                &picked,
                Class::Background,
                started + BACKGROUND_DEADLINE,
            )?;
            let took = started.elapsed();
            if took < Duration::from_millis(50) {
                batch = (batch * 2).min(MAX_BATCH);
            } else if took > Duration::from_millis(200) {
                batch = (batch / 2).max(4);
            }
            self.stats
                .background
                .fetch_add(picked.len() as u64, Ordering::Relaxed);
            progress(queue.done() as u64, ids.len() as u64);
        }
        Ok(())
    }

    /// Fetches what is missing of `ids` by `deadline`, coalescing with
    /// fetches already in flight: a chunk another caller is fetching is
    /// waited for, not requested twice (so a relay asks its upstream once
    /// per chunk however many peers ask it at the same time), and if that
    /// fetch fails, its error is this one's too.
    fn fetch_from_remotes(
        &self,
        store: &ChunkStore,
        ids: &[ChunkId],
        class: Class,
        deadline: Instant,
    ) -> Result<(), FetchError> {
        self.fetch_from_remotes_each(store, ids, class, deadline, &mut |_| {})
    }

    /// [`Fetcher::fetch_from_remotes`], calling `each` with every chunk as
    /// it is here.
    fn fetch_from_remotes_each(
        &self,
        store: &ChunkStore,
        ids: &[ChunkId],
        class: Class,
        deadline: Instant,
        each: &mut dyn FnMut(&ChunkId),
    ) -> Result<(), FetchError> {
        let started = Instant::now();
        let mut mine: HashMap<ChunkId, Arc<Flight>> = HashMap::new();
        let mut order = Vec::new();
        let mut theirs = Vec::new();
        {
            let mut inflight = self.inflight.lock();
            for id in ids {
                if mine.contains_key(id) {
                    continue;
                }
                if store.contains(id) {
                    each(id);
                    continue;
                }
                match inflight.get(id) {
                    Some(flight) => theirs.push((*id, flight.clone())),
                    None => {
                        let flight = Arc::new(Flight::default());
                        inflight.insert(*id, flight.clone());
                        mine.insert(*id, flight);
                        order.push(*id);
                    }
                }
            }
        }
        let result = self.fetch_uncoalesced(store, &order, &mine, class, deadline, each);
        {
            let failure: Arc<str> = match &result {
                Ok(()) => "chunk missing after its fetch".into(),
                Err(e) => e.to_string().into(),
            };
            let mut inflight = self.inflight.lock();
            for (id, flight) in &mine {
                if store.contains(id) {
                    flight.finish(Ok(()));
                } else {
                    flight.finish(Err(failure.clone()));
                }
                if inflight.get(id).is_some_and(|f| Arc::ptr_eq(f, flight)) {
                    inflight.remove(id);
                }
            }
        }
        result?;
        for (id, flight) in theirs {
            match flight.wait_until(deadline) {
                Some(Ok(())) => each(&id),
                Some(Err(e)) => return Err(FetchError::Shared(e)),
                None => {
                    if class == Class::Demand {
                        self.stats.deadlines.fetch_add(1, Ordering::Relaxed);
                    }
                    let left: Vec<&ChunkId> = ids.iter().filter(|id| !store.contains(id)).collect();
                    return Err(FetchError::Deadline {
                        first: left.first().map_or(ids[0], |id| **id),
                        missing: left.len(),
                        waited: started.elapsed(),
                        tried: "another reader's fetch of the same chunk".into(),
                    });
                }
            }
        }
        Ok(())
    }

    fn fetch_uncoalesced(
        &self,
        store: &ChunkStore,
        ids: &[ChunkId],
        flights: &HashMap<ChunkId, Arc<Flight>>,
        class: Class,
        deadline: Instant,
        each: &mut dyn FnMut(&ChunkId),
    ) -> Result<(), FetchError> {
        let started = Instant::now();
        let mut missing: Vec<ChunkId> = ids
            .iter()
            .filter(|id| !store.contains(id))
            .copied()
            .collect();
        let mut tried = Tried::default();
        // A source that could not be reached (a dropped SYN on a saturated
        // link, an origin too busy to accept) is asked again, past its
        // backoff, before a reader is told that no source has the chunk:
        // as long as the deadline leaves time for it.
        for round in 0..=RETRY_PAUSES.len() {
            if round > 0 {
                let pause = RETRY_PAUSES[round - 1];
                if Instant::now() + pause >= deadline {
                    break;
                }
                std::thread::sleep(pause);
                tracing::info!(
                    chunks = missing.len(),
                    round,
                    "sources unreachable; asking again"
                );
            }
            tried.unreachable = false;
            let mut still = Vec::new();
            for batch in missing.chunks(MAX_BATCH) {
                still.extend(self.gather(
                    store,
                    batch,
                    flights,
                    class,
                    deadline,
                    round > 0,
                    &mut tried,
                    each,
                )?);
            }
            missing = still;
            if missing.is_empty() || !tried.unreachable || Instant::now() >= deadline {
                break;
            }
        }
        let Some(first) = missing.first() else {
            return Ok(());
        };
        if Instant::now() >= deadline {
            if class == Class::Demand {
                self.stats.deadlines.fetch_add(1, Ordering::Relaxed);
            }
            return Err(FetchError::Deadline {
                first: *first,
                missing: missing.len(),
                waited: started.elapsed(),
                tried: tried.describe(),
            });
        }
        Err(FetchError::Unavailable {
            first: *first,
            missing: missing.len(),
            tried: if self.remotes.is_empty() {
                "no sources configured".into()
            } else {
                tried.describe()
            },
        })
    }

    /// The remotes to ask, best first: healthy before those on probation
    /// (failed, not answered since), and among those, sources that answer
    /// as usual in the configured order (peers before the origin, which
    /// keeps the re-export tree's load where it was put) before slow ones.
    /// Slow: an expected latency (the smoothed one for what readers wait
    /// for, or how long the oldest such request has waited, if longer)
    /// over four times the best source's and over [`SLOW`], so a relay a
    /// little slower than the origin (it fetches upstream first) keeps its
    /// subtree, while a source that stopped answering or takes a second
    /// per answer is passed over. Then, as a last resort, the sources
    /// backed off after a failure (all of them count as available when
    /// `again`), so that a chunk no other source has is still asked for.
    /// Sources on probation are probed in the background. Returns the
    /// order and how many of it are available.
    fn order(&self, again: bool) -> (Vec<usize>, usize) {
        let standing: Vec<Option<Standing>> = self
            .remotes
            .iter()
            .map(|r| {
                if again {
                    // Asked again right now: no probe beside that.
                    r.forget_failure();
                } else if r.wants_probe() {
                    let r = r.clone();
                    let spawned = std::thread::Builder::new().name("probe".into()).spawn(
                        move || match r.probe() {
                            Ok(()) => tracing::info!(remote = r.url(), "source answers again"),
                            Err(e) => {
                                tracing::info!(remote = r.url(), error = %e, "source still failing")
                            }
                        },
                    );
                    if spawned.is_err() {
                        tracing::warn!("cannot start a probe thread");
                    }
                }
                r.standing()
            })
            .collect();
        let best = standing
            .iter()
            .flatten()
            .map(|s| s.latency)
            .min()
            .unwrap_or_default();
        let slow = (best * 4).max(SLOW);
        let mut order: Vec<usize> = (0..self.remotes.len()).collect();
        order.sort_by_key(|i| match standing[*i] {
            Some(s) => (false, s.probation, s.latency > slow, *i),
            None => (true, true, true, *i),
        });
        let available = standing.iter().flatten().count();
        (order, available)
    }

    /// Asks for `batch` (at most [`MAX_BATCH`]) until every chunk is here
    /// or no source is left or the deadline passes: the best source first,
    /// the next one when it answered without some chunks or failed, and,
    /// for a waiting reader, the next one too when the first has not
    /// answered within a few times its usual latency (a hedged request:
    /// whichever delivers a chunk first wins). Each chunk is stored, and
    /// its readers released, as soon as it arrives. Returns what did not
    /// arrive.
    #[allow(clippy::too_many_arguments)]
    fn gather(
        &self,
        store: &ChunkStore,
        batch: &[ChunkId],
        flights: &HashMap<ChunkId, Arc<Flight>>,
        class: Class,
        deadline: Instant,
        again: bool,
        tried: &mut Tried,
        each: &mut dyn FnMut(&ChunkId),
    ) -> Result<Vec<ChunkId>, FetchError> {
        let (order, available) = self.order(again);
        let mut want: Vec<ChunkId> = batch
            .iter()
            .filter(|id| !store.contains(id))
            .copied()
            .collect();
        let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Event)>(4);
        let mut next = 0; // the next source in `order` to ask
        let mut running = 0;
        let mut last_start = Instant::now();
        let start = |at: usize, want: &[ChunkId], running: &mut usize| {
            let idx = order[at];
            let remote = self.remotes[idx].clone();
            if at >= available {
                // A last resort: asked in spite of its backoff.
                remote.forget_failure();
            }
            let ids = want.to_vec();
            let tx = tx.clone();
            let budget = deadline.saturating_duration_since(Instant::now());
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            let spawned = std::thread::Builder::new()
                .name("fetch".into())
                .spawn(move || {
                    let result = remote.batch_stream(&ids, class, budget, &mut |id, raw| {
                        let _ = tx.send((idx, Event::Record(id, raw)));
                    });
                    let _ = tx.send((idx, Event::Done(result)));
                });
            match spawned {
                Ok(_) => *running += 1,
                Err(e) => tracing::warn!(error = %e, "cannot start a fetch thread"),
            }
        };
        while !want.is_empty() {
            if running == 0 {
                if next == order.len() {
                    break;
                }
                start(next, &want, &mut running);
                next += 1;
                last_start = Instant::now();
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            // A waiting reader asks the next available source too once the
            // last one asked is late.
            let hedge_at = (class == Class::Demand && next < available)
                .then(|| last_start + self.remotes[order[next - 1]].hedge_after());
            let wake = hedge_at.map_or(deadline, |h| h.min(deadline));
            let (idx, event) = match rx.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(e) => e,
                Err(_) => {
                    if hedge_at.is_some_and(|h| Instant::now() >= h) {
                        tracing::debug!(
                            remote = self.remotes[order[next - 1]].url(),
                            "source late; asking the next one too"
                        );
                        self.stats.hedged.fetch_add(1, Ordering::Relaxed);
                        start(next, &want, &mut running);
                        next += 1;
                        last_start = Instant::now();
                    }
                    continue;
                }
            };
            let remote = &self.remotes[idx];
            match event {
                Event::Record(id, Some(raw)) => {
                    if !want.contains(&id) {
                        continue; // another source delivered it first
                    }
                    match store.put_verified_file(id, &raw) {
                        Ok((_, data)) => {
                            want.retain(|w| *w != id);
                            if let Some(f) = &self.arrivals.0 {
                                f(&id, data, class);
                            }
                            if let Some(flight) = flights.get(&id) {
                                flight.finish(Ok(()));
                            }
                            each(&id);
                            let len = raw.len() as u64;
                            self.stats.chunks.fetch_add(1, Ordering::Relaxed);
                            self.stats.bytes.fetch_add(len, Ordering::Relaxed);
                            remote.stats.chunks.fetch_add(1, Ordering::Relaxed);
                            remote.stats.bytes.fetch_add(len, Ordering::Relaxed);
                        }
                        Err(e @ spore_chunks::Error::Corrupt { .. }) => {
                            // A lying or broken remote: never use its bytes.
                            tracing::warn!(remote = remote.url(), error = %e, "remote sent a bad chunk; trying the next source");
                            self.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                            remote.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                            tried.note(remote, e);
                        }
                        // Our own store failed: not the remote's fault.
                        Err(e) => return Err(e.into()),
                    }
                }
                Event::Record(_, None) => tried.note(remote, "lacks chunks"),
                Event::Done(result) => {
                    running -= 1;
                    if let Err(e) = result {
                        tracing::warn!(remote = remote.url(), error = %e, "chunk fetch failed; trying the next source");
                        tried.unreachable = true;
                        tried.failed(&e);
                    }
                }
            }
        }
        Ok(want)
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
    use crate::fake_peer::Acts;
    use crate::wire;
    use std::io::{Read, Write};
    use std::net::TcpListener;

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

    /// A fake source on a real socket serving `chunks` as `acts` says:
    /// its URL and how many requests it has read.
    fn source(acts: Acts, chunks: HashMap<ChunkId, Vec<u8>>) -> (String, Arc<AtomicUsize>) {
        let peer = crate::fake_peer::serve(acts, Arc::new(move |id| chunks.get(id).cloned()));
        (peer.url(), peer.asked)
    }

    /// `n` chunks in a sender's store: their ids and chunk files.
    fn chunks(n: usize) -> (Vec<ChunkId>, HashMap<ChunkId, Vec<u8>>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let sender = ChunkStore::open(dir.path().join("sender"), Default::default()).unwrap();
        let mut ids = Vec::new();
        let mut files = HashMap::new();
        for i in 0..n {
            let put = sender.put(format!("chunk number {i}").as_bytes()).unwrap();
            files.insert(put.id, sender.get_raw(&put.id).unwrap().unwrap());
            ids.push(put.id);
        }
        (ids, files, dir)
    }

    fn fetcher(urls: &[&str]) -> Fetcher {
        let plain = crate::Links::default().allow_plaintext();
        Fetcher::new(
            urls.iter()
                .map(|u| Remote::new(u, Duration::from_secs(10), &plain).unwrap())
                .collect(),
        )
    }

    /// Reads 6 chunks one at a time, `pause` apart, from a first source
    /// acting as `first` and a good origin: the slowest read, and how many
    /// requests each source was sent.
    fn reads_past(first: Acts, pause: Duration) -> (Duration, usize, usize, Fetcher) {
        let (ids, files, dir) = chunks(6);
        let (first, first_asked) = source(first, files.clone());
        let (origin, origin_asked) = source(Acts::Good, files);
        let store = ChunkStore::open(dir.path().join("b"), Default::default()).unwrap();
        let f = fetcher(&[&first, &origin]);
        let mut slowest = Duration::ZERO;
        for id in &ids {
            let started = std::time::Instant::now();
            f.fetch(&store, &[*id]).unwrap();
            slowest = slowest.max(started.elapsed());
            std::thread::sleep(pause);
        }
        let asked = (
            first_asked.load(Ordering::SeqCst),
            origin_asked.load(Ordering::SeqCst),
        );
        (slowest, asked.0, asked.1, f)
    }

    /// A source that accepts and never answers costs a reader a hedge
    /// (a few times the usual latency), not the 10 s timeout; it is then
    /// passed over while its request hangs, and backed off once it fails.
    #[test]
    fn a_wedged_first_source_costs_a_hedge_not_a_timeout() {
        let (slowest, wedged, _, f) = reads_past(Acts::Wedged, Duration::from_millis(300));
        assert!(slowest < Duration::from_secs(3), "a read took {slowest:?}");
        assert!(wedged <= 2, "the wedged source was asked {wedged} times");
        assert!(f.stats.hedged.load(Ordering::Relaxed) >= 1);
    }

    /// A source that answers, but a second late every time, is asked after
    /// the faster one once it has been measured.
    #[test]
    fn a_slow_source_is_passed_over_for_a_faster_one() {
        let (slowest, slow, origin, _) =
            reads_past(Acts::Slow(Duration::from_secs(1)), Duration::ZERO);
        assert!(slowest < Duration::from_secs(3), "a read took {slowest:?}");
        assert!(origin >= 5, "the origin was asked {origin} times");
        assert!(slow <= 2, "the slow source was asked {slow} times");
    }

    /// A source a little slower than the next (a relay fetching upstream
    /// first, say) keeps being asked first: only a source much slower
    /// than the best, and over 500 ms, is passed over, so a re-export
    /// tree's subtree does not move onto the origin.
    #[test]
    fn a_source_a_little_slower_than_the_origin_keeps_its_place() {
        let (_, relay, origin, _) =
            reads_past(Acts::Slow(Duration::from_millis(120)), Duration::ZERO);
        // The first read may be hedged (nothing is measured yet, and a
        // loaded machine may be slow to connect); none after it.
        assert_eq!(relay, 6);
        assert!(origin <= 1, "the origin was asked {origin} times");
    }

    /// Three readers of one chunk whose only source is wedged all fail at
    /// the deadline, together: the retry chain runs once, not once each.
    #[test]
    fn readers_of_one_chunk_share_one_deadline_and_one_failure() {
        let (ids, files, dir) = chunks(1);
        let (wedged, wedged_asked) = source(Acts::Wedged, files);
        let store = ChunkStore::open(dir.path().join("b"), Default::default()).unwrap();
        let f = Arc::new(fetcher(&[&wedged]).demand_deadline(Duration::from_secs(2)));
        let store = Arc::new(store);
        let started = std::time::Instant::now();
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (f, store, id) = (f.clone(), store.clone(), ids[0]);
                std::thread::spawn(move || {
                    let e = f.fetch(&store, &[id]).unwrap_err();
                    (e.to_string(), started.elapsed())
                })
            })
            .collect();
        for r in readers {
            let (e, took) = r.join().unwrap();
            assert!(
                took < Duration::from_secs(5),
                "a reader failed after {took:?}: {e}"
            );
            assert!(e.contains("did not arrive within"), "{e}");
        }
        assert_eq!(
            wedged_asked.load(Ordering::SeqCst),
            1,
            "asked once for all three"
        );
    }

    /// Garbage, a response that never ends and one cut short are failures
    /// of their source: the chunk comes from the next one, and the broken
    /// source is backed off (not asked again by the next read).
    #[test]
    fn broken_answers_are_failures_of_their_source() {
        for acts in [Acts::Garbage, Acts::Endless, Acts::Vanishes] {
            let (ids, files, dir) = chunks(2);
            let (bad, bad_asked) = source(acts, files.clone());
            let (origin, _) = source(Acts::Good, files);
            let store = ChunkStore::open(dir.path().join("b"), Default::default()).unwrap();
            let f = fetcher(&[&bad, &origin]);
            let started = std::time::Instant::now();
            f.fetch(&store, &[ids[0]]).unwrap();
            assert!(started.elapsed() < Duration::from_secs(3));
            assert_eq!(store.get(&ids[0]).unwrap(), b"chunk number 0");
            if acts != Acts::Endless {
                // The endless one fails only when its time is up.
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while f.remotes()[0].stats.failures.load(Ordering::Relaxed) == 0 {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "not counted as a failure"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                f.fetch(&store, &[ids[1]]).unwrap();
                assert_eq!(
                    bad_asked.load(Ordering::SeqCst),
                    1,
                    "asked again while backed off"
                );
            }
        }
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
