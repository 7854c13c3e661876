//! Access frequency: how often each chunk was asked for, by the guests on
//! this host and by the peers it serves.
//!
//! A host that resolves an image asks its source for the image's popular
//! chunks and prefetches those after the boot profile: blocks that many VMs
//! and peers read rank higher, even when the first boot (the profile) did
//! not read them. Counts age: when the table is full, every count is halved
//! and the chunks that fall to zero are forgotten, so what was popular long
//! ago gives way to what is read now.

use std::collections::HashMap;

use parking_lot::Mutex;
use spore_chunks::ChunkId;

/// Chunks counted at most (about 48 bytes each).
const DEFAULT_CAPACITY: usize = 1 << 20;

#[derive(Debug)]
pub struct Popularity {
    counts: Mutex<HashMap<ChunkId, u32>>,
    capacity: usize,
}

impl Default for Popularity {
    fn default() -> Self {
        Popularity::with_capacity(DEFAULT_CAPACITY)
    }
}

impl Popularity {
    pub fn with_capacity(capacity: usize) -> Self {
        Popularity {
            counts: Mutex::default(),
            capacity: capacity.max(1),
        }
    }

    /// Someone asked for each of `ids` once.
    pub fn hit(&self, ids: &[ChunkId]) {
        let mut counts = self.counts.lock();
        for id in ids {
            if counts.len() >= self.capacity && !counts.contains_key(id) {
                counts.retain(|_, c| {
                    *c /= 2;
                    *c > 0
                });
                if counts.len() >= self.capacity {
                    continue;
                }
            }
            let c = counts.entry(*id).or_insert(0);
            *c = c.saturating_add(1);
        }
    }

    pub fn count(&self, id: &ChunkId) -> u32 {
        self.counts.lock().get(id).copied().unwrap_or(0)
    }

    /// Up to `limit` chunks, most asked for first.
    pub fn top(&self, limit: usize) -> Vec<ChunkId> {
        let mut all: Vec<(u32, ChunkId)> =
            self.counts.lock().iter().map(|(id, c)| (*c, *id)).collect();
        all.sort_by(|a, b| b.0.cmp(&a.0).then(a.1 .0.cmp(&b.1 .0)));
        all.into_iter().take(limit).map(|(_, id)| id).collect()
    }

    /// Up to `limit` of `candidates` that were asked for at least
    /// `min_count` times, most asked for first (ties: candidate order).
    pub fn ranked<'a>(
        &self,
        candidates: impl IntoIterator<Item = &'a ChunkId>,
        min_count: u32,
        limit: usize,
    ) -> Vec<ChunkId> {
        let counts = self.counts.lock();
        let mut hot: Vec<(u32, usize, ChunkId)> = candidates
            .into_iter()
            .enumerate()
            .filter_map(|(i, id)| {
                let c = counts.get(id).copied().unwrap_or(0);
                (c >= min_count.max(1)).then_some((c, i, *id))
            })
            .collect();
        drop(counts);
        hot.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        hot.dedup_by(|a, b| a.2 == b.2);
        hot.into_iter().take(limit).map(|(_, _, id)| id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChunkId {
        ChunkId::of(&[n])
    }

    #[test]
    fn the_most_asked_for_come_first() {
        let p = Popularity::default();
        p.hit(&[id(1), id(2), id(3)]);
        p.hit(&[id(2), id(3)]);
        p.hit(&[id(3)]);
        let all = [id(0), id(1), id(2), id(3)];
        assert_eq!(p.ranked(&all, 1, 10), vec![id(3), id(2), id(1)]);
        assert_eq!(p.ranked(&all, 2, 10), vec![id(3), id(2)]);
        assert_eq!(p.ranked(&all, 1, 1), vec![id(3)]);
        assert_eq!(p.top(2), vec![id(3), id(2)]);
        // Only candidates are ranked; ties keep the candidates' order.
        p.hit(&[id(1)]);
        assert_eq!(p.ranked(&[id(1), id(2)], 1, 10), vec![id(1), id(2)]);
        assert_eq!(p.count(&id(9)), 0);
    }

    #[test]
    fn a_full_table_ages_its_counts() {
        let p = Popularity::with_capacity(3);
        p.hit(&[id(1), id(1), id(1), id(1), id(2), id(3)]);
        // Full: adding id(4) halves all counts and forgets 2 and 3.
        p.hit(&[id(4)]);
        assert_eq!(p.count(&id(1)), 2);
        assert_eq!(p.count(&id(2)), 0);
        assert_eq!(p.count(&id(4)), 1);
    }
}
