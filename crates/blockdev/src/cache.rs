//! A shared, bounded cache of verified chunk contents.
//!
//! Chunks are checked against their hash when they are loaded from the
//! store, and served from here afterwards, so the hash is paid once per
//! chunk rather than once per read. One cache serves every device of the
//! agent: images that share chunks share cache entries too.
//!
//! Concurrent misses on the same chunk are coalesced: one thread loads it,
//! the others wait for its result (single flight).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use lru::LruCache;
use parking_lot::Mutex;
use spore_chunks::ChunkId;

const SHARDS: usize = 16;

#[derive(Default)]
struct Slot {
    data: OnceLock<Arc<[u8]>>,
    loading: Mutex<()>,
}

struct Shard {
    map: LruCache<ChunkId, Arc<Slot>>,
    bytes: usize,
}

/// Cache counters.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
}

pub struct ChunkCache {
    shards: Vec<Mutex<Shard>>,
    budget_per_shard: usize,
    stats: CacheStats,
}

impl std::fmt::Debug for ChunkCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkCache")
            .field("budget", &(self.budget_per_shard * SHARDS))
            .finish()
    }
}

impl ChunkCache {
    /// A cache holding up to `budget` bytes of chunk data.
    pub fn new(budget: usize) -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    map: LruCache::unbounded(),
                    bytes: 0,
                })
            })
            .collect();
        ChunkCache {
            shards,
            budget_per_shard: (budget / SHARDS).max(1),
            stats: CacheStats::default(),
        }
    }

    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Bytes currently cached.
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.lock().bytes).sum()
    }

    fn shard(&self, id: &ChunkId) -> &Mutex<Shard> {
        &self.shards[id.0[0] as usize % SHARDS]
    }

    /// True when the chunk is cached.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.shard(id)
            .lock()
            .map
            .peek(id)
            .is_some_and(|s| s.data.get().is_some())
    }

    /// The cached contents of a chunk, if loaded (not counted as a hit).
    pub fn loaded(&self, id: &ChunkId) -> Option<Arc<[u8]>> {
        self.shard(id).lock().map.peek(id)?.data.get().cloned()
    }

    /// Puts verified contents in the cache unless they are there already:
    /// a chunk that just arrived from another host, decoded and hashed, so
    /// that its first read need not load and hash it again. `hot` places it
    /// as the most recently used (a reader waits for it); otherwise as the
    /// least recently used (prefetch), so that a long background fetch
    /// evicts its own chunks before anything a reader used.
    pub fn offer(&self, id: ChunkId, data: Vec<u8>, hot: bool) {
        let mut s = self.shard(&id).lock();
        let slot = match s.map.peek(&id) {
            Some(slot) => slot.clone(),
            None => {
                let slot = Arc::new(Slot::default());
                s.map.put(id, slot.clone());
                if !hot {
                    s.map.demote(&id);
                }
                slot
            }
        };
        let len = data.len();
        if slot.data.set(data.into()).is_ok() {
            s.bytes += len;
            self.evict(&mut s);
        }
    }

    /// The chunk's contents, loading them with `load` on a miss. `load`
    /// must return verified data.
    pub fn get_or_load(
        &self,
        id: &ChunkId,
        load: impl FnOnce() -> io::Result<Arc<[u8]>>,
    ) -> io::Result<Arc<[u8]>> {
        let shard = self.shard(id);
        let slot = {
            let mut s = shard.lock();
            match s.map.get(id) {
                Some(slot) => slot.clone(),
                None => {
                    let slot = Arc::new(Slot::default());
                    s.map.put(*id, slot.clone());
                    slot
                }
            }
        };
        if let Some(d) = slot.data.get() {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(d.clone());
        }
        let _one_loader = slot.loading.lock();
        if let Some(d) = slot.data.get() {
            // Another thread loaded it while we waited.
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(d.clone());
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        match load() {
            Ok(d) => {
                // `offer` may have filled the slot while `load` ran (the
                // chunk arrived from a peer): then it is counted already.
                if slot.data.set(d.clone()).is_ok() {
                    let mut s = shard.lock();
                    if s.map.peek(id).is_some_and(|cur| Arc::ptr_eq(cur, &slot)) {
                        s.bytes += d.len();
                        self.evict(&mut s);
                    }
                }
                Ok(slot.data.get().cloned().unwrap_or(d))
            }
            Err(e) => {
                let mut s = shard.lock();
                if s.map.peek(id).is_some_and(|cur| Arc::ptr_eq(cur, &slot)) {
                    s.map.pop(id);
                }
                Err(e)
            }
        }
    }

    fn evict(&self, s: &mut Shard) {
        while s.bytes > self.budget_per_shard && s.map.len() > 1 {
            match s.map.pop_lru() {
                Some((_, slot)) => {
                    if let Some(d) = slot.data.get() {
                        s.bytes -= d.len();
                    }
                    self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn hit_miss_and_budget() {
        let cache = ChunkCache::new(SHARDS * 10_000);
        let loads = AtomicUsize::new(0);
        for round in 0..2 {
            for i in 0..100u32 {
                let id = ChunkId::of(&i.to_le_bytes());
                let d = cache
                    .get_or_load(&id, || {
                        loads.fetch_add(1, Ordering::SeqCst);
                        Ok(vec![i as u8; 4096].into())
                    })
                    .unwrap();
                assert_eq!(d[0], i as u8);
            }
            if round == 0 {
                assert_eq!(loads.load(Ordering::SeqCst), 100);
            }
        }
        assert!(cache.bytes() <= SHARDS * 10_000 + SHARDS * 4096);
        assert!(cache.stats().evictions.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn concurrent_misses_load_once_and_errors_are_not_cached() {
        let cache = ChunkCache::new(1 << 20);
        let id = ChunkId::of(b"x");
        assert!(cache
            .get_or_load(&id, || Err(io::Error::other("down")))
            .is_err());
        let loads = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    cache
                        .get_or_load(&id, || {
                            loads.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            Ok(vec![7; 10].into())
                        })
                        .unwrap()
                });
            }
        });
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert!(cache.contains(&id));
    }

    #[test]
    fn an_offered_chunk_is_a_hit_and_a_cold_offer_is_evicted_first() {
        // One shard's worth of budget: two 600-byte chunks do not fit.
        let cache = ChunkCache::new(SHARDS * 1000);
        // Ids in one shard (the shard is the id's first byte).
        let ids: Vec<ChunkId> = (0u32..)
            .map(|i| ChunkId::of(&i.to_le_bytes()))
            .filter(|id| (id.0[0] as usize).is_multiple_of(SHARDS))
            .take(3)
            .collect();
        cache.offer(ids[0], vec![1; 600], true);
        let d = cache
            .get_or_load(&ids[0], || panic!("offered: no load"))
            .unwrap();
        assert_eq!(d[0], 1);
        assert_eq!(cache.bytes(), 600);
        // A second offer of a cached chunk changes nothing.
        cache.offer(ids[0], vec![9; 600], true);
        assert_eq!(cache.loaded(&ids[0]).unwrap()[0], 1);
        assert_eq!(cache.bytes(), 600);
        // A cold offer goes to the eviction end: the budget drops it, not
        // the chunk a reader used.
        cache.offer(ids[1], vec![2; 600], false);
        assert!(cache.contains(&ids[0]));
        assert!(!cache.contains(&ids[1]));
        // A hot one evicts the least recently used.
        cache.offer(ids[2], vec![3; 600], true);
        assert!(cache.contains(&ids[2]));
        assert!(!cache.contains(&ids[0]));
        assert_eq!(cache.bytes(), 600);
    }

    #[test]
    fn an_offer_during_a_load_is_counted_once() {
        let cache = ChunkCache::new(1 << 20);
        let id = ChunkId::of(b"y");
        let d = cache
            .get_or_load(&id, || {
                cache.offer(id, vec![5; 100], true);
                Ok(vec![5; 100].into())
            })
            .unwrap();
        assert_eq!(d.len(), 100);
        assert_eq!(cache.bytes(), 100);
    }
}
