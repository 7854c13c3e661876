//! The read-only block device of an image: flat map + chunk cache + store.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use spore_chunks::ChunkStore;
use spore_image::Image;
use spore_nbd::{Export, Extent};
use spore_transfer::Fetcher;

use crate::cache::ChunkCache;
use crate::{read_only, IoStats};

#[derive(Debug)]
pub struct ImageDevice {
    image: Image,
    store: Arc<ChunkStore>,
    cache: Arc<ChunkCache>,
    /// Where chunks missing from the store come from (peers, origin).
    fetcher: Option<Arc<Fetcher>>,
    /// Set while the image's boot profile is being recorded.
    profiler: OnceLock<Arc<Profiler>>,
    /// The boot profile's blocks and each one's position in it: a miss on
    /// a profiled block reads ahead in profile order.
    profile: OnceLock<(Vec<u32>, HashMap<u32, usize>)>,
    stats: IoStats,
}

/// Records the order in which an image's data blocks are first read.
///
/// The read path checks one atomic bit per block; only a block's first
/// read takes the lock to append it.
#[derive(Debug)]
pub struct Profiler {
    seen: Vec<AtomicU64>,
    order: Mutex<Vec<u32>>,
    active: AtomicBool,
}

impl Profiler {
    fn new(blocks: u64) -> Self {
        Profiler {
            seen: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            order: Mutex::new(Vec::new()),
            active: AtomicBool::new(true),
        }
    }

    #[inline]
    fn touch(&self, block: u64) {
        if !self.active.load(Ordering::Relaxed) {
            return;
        }
        let Some(word) = self.seen.get((block / 64) as usize) else {
            return;
        };
        let bit = 1u64 << (block % 64);
        if word.load(Ordering::Relaxed) & bit == 0
            && word.fetch_or(bit, Ordering::AcqRel) & bit == 0
        {
            self.order.lock().push(block as u32);
        }
    }

    /// Stops recording and returns the blocks in first-read order.
    pub fn finish(&self) -> Vec<u32> {
        self.active.store(false, Ordering::Release);
        std::mem::take(&mut *self.order.lock())
    }
}

/// On a miss, this many following blocks that are missing too are fetched
/// in the same round trip.
const READAHEAD_BLOCKS: u64 = 15;

impl ImageDevice {
    pub fn new(
        image: Image,
        store: Arc<ChunkStore>,
        cache: Arc<ChunkCache>,
        fetcher: Option<Arc<Fetcher>>,
    ) -> Self {
        ImageDevice {
            image,
            store,
            cache,
            fetcher,
            profiler: OnceLock::new(),
            profile: OnceLock::new(),
            stats: IoStats::default(),
        }
    }

    /// Starts recording the boot profile; None when one was started before.
    pub fn start_profile(&self) -> Option<Arc<Profiler>> {
        let p = Arc::new(Profiler::new(self.image.flat.block_count()));
        self.profiler.set(p.clone()).ok().map(|()| p)
    }

    /// Reads ahead along the image's boot profile (`blocks` in first-read
    /// order) from now on: a miss on one of its blocks fetches the next
    /// missing ones of the profile with it, not its neighbours on disk,
    /// which the boot may never read. Only the first call counts.
    pub fn follow_profile(&self, blocks: Vec<u32>) {
        let _ = self.profile.get_or_init(|| {
            let pos = blocks.iter().enumerate().map(|(i, b)| (*b, i)).collect();
            (blocks, pos)
        });
    }

    /// The blocks fetched together with a missing `block`.
    fn readahead(&self, block: u64) -> Vec<u64> {
        let flat = &self.image.flat;
        let profiled = self
            .profile
            .get()
            .and_then(|(blocks, pos)| Some((blocks, *pos.get(&u32::try_from(block).ok()?)?)));
        match profiled {
            Some((blocks, at)) => blocks[at + 1..]
                .iter()
                .map(|b| *b as u64)
                .take(READAHEAD_BLOCKS as usize * 4)
                .collect(),
            None => (block + 1..(block + 1 + READAHEAD_BLOCKS).min(flat.block_count())).collect(),
        }
    }

    pub fn image(&self) -> &Image {
        &self.image
    }

    pub fn stats(&self) -> &IoStats {
        &self.stats
    }

    /// The verified contents of the chunk that `block` maps to (`slot`).
    fn chunk(&self, block: u64, slot: u32) -> io::Result<Arc<[u8]>> {
        let id = self.image.flat.chunk(slot);
        self.cache.get_or_load(id, || match self.store.get(id) {
            // Missing, or found damaged (the store moved it aside): fetch
            // a good copy where there is a source.
            Err(spore_chunks::Error::NotFound(_) | spore_chunks::Error::Corrupt { .. })
                if self.fetcher.is_some() =>
            {
                let fetcher = self.fetcher.as_ref().expect("checked");
                // The missing chunk and the next few missing ones, in one batch.
                let flat = &self.image.flat;
                let mut ids = vec![*id];
                for b in self.readahead(block) {
                    if ids.len() > READAHEAD_BLOCKS as usize {
                        break;
                    }
                    if let Some(next) = flat.get(b) {
                        if !ids.contains(next) && !self.store.contains(next) {
                            ids.push(*next);
                        }
                    }
                }
                if let Err(e) = fetcher.fetch(&self.store, &ids) {
                    // The guest sees EIO; the agent's log says why.
                    tracing::error!(chunk = %id, error = %e, "read failed: chunk unavailable");
                    return Err(e.into());
                }
                // Verified on arrival and offered to the cache (the agent
                // wires the fetcher so); from the store otherwise.
                match self.cache.loaded(id) {
                    Some(d) => Ok(d),
                    None => Ok(self.store.get(id)?.into()),
                }
            }
            other => Ok(other?.into()),
        })
    }

    /// Reads `buf.len()` bytes at `offset`; bytes past the end read as zero.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let flat = &self.image.flat;
        let shift = flat.block_shift();
        let bs = flat.block_size() as u64;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = pos >> shift;
            let within = (pos & (bs - 1)) as usize;
            let n = (bs as usize - within).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match flat.slot(block) {
                0 => out.fill(0),
                slot => {
                    if let Some(p) = self.profiler.get() {
                        p.touch(block);
                    }
                    let data = self.chunk(block, slot)?;
                    // The last block of an image may be short.
                    let avail = data.len().saturating_sub(within).min(n);
                    out[..avail].copy_from_slice(&data[within..within + avail]);
                    out[avail..].fill(0);
                }
            }
            done += n;
        }
        self.stats.record_read(buf.len());
        Ok(())
    }

    /// Allocation of the image from `offset`: runs of data and of holes.
    pub fn extents(&self, offset: u64, length: u64) -> Vec<Extent> {
        let flat = &self.image.flat;
        let shift = flat.block_shift();
        let bs = flat.block_size() as u64;
        let end = (offset + length).min(flat.virtual_size());
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let block = pos >> shift;
            let next = ((block + 1) * bs).min(end);
            let hole = flat.slot(block) == 0;
            match out.last_mut() {
                Some(e) if e.hole == hole => e.length += next - pos,
                _ => out.push(Extent {
                    length: next - pos,
                    hole,
                    zero: hole,
                }),
            }
            pos = next;
        }
        out
    }

    /// Loads the chunks of a range into the cache.
    pub fn prefetch(&self, offset: u64, length: u64) -> io::Result<()> {
        let flat = &self.image.flat;
        let shift = flat.block_shift();
        if length == 0 {
            return Ok(());
        }
        let last = (offset + length - 1) >> shift;
        for block in (offset >> shift)..=last.min(flat.block_count().saturating_sub(1)) {
            if let s @ 1.. = flat.slot(block) {
                self.chunk(block, s)?;
            }
        }
        Ok(())
    }
}

impl Export for ImageDevice {
    fn size(&self) -> u64 {
        self.image.manifest.virtual_size
    }

    fn read_only(&self) -> bool {
        true
    }

    fn preferred_block_size(&self) -> u32 {
        4096
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_at(offset, buf)
    }

    fn write(&self, _: u64, _: &[u8], _: bool) -> io::Result<()> {
        Err(read_only())
    }

    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> io::Result<()> {
        Err(read_only())
    }

    fn trim(&self, _: u64, _: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.prefetch(offset, length)
    }

    fn block_status(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        Ok(self.extents(offset, length))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spore_chunks::Compression;

    #[test]
    fn a_miss_reads_ahead_on_disk_or_along_the_profile() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(ChunkStore::open(dir.path().join("chunks"), Compression::None).unwrap());
        let raw = dir.path().join("img.raw");
        let data: Vec<u8> = (0..64u32 * 4096).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&raw, &data).unwrap();
        let src = spore_image::source::open(&raw).unwrap();
        let p = spore_image::import(&store, &*src, "img", 4096, None, &|_, _| {}).unwrap();
        let dev = ImageDevice::new(
            Image::open(&store, &p.id).unwrap(),
            store,
            Arc::new(ChunkCache::new(1 << 20)),
            None,
        );
        // Without a profile: the blocks after the missing one on disk.
        assert_eq!(
            dev.readahead(3),
            (4..4 + READAHEAD_BLOCKS).collect::<Vec<_>>()
        );
        assert_eq!(dev.readahead(62), vec![63]);
        dev.follow_profile(vec![40, 2, 9, 33, 7]);
        // A profiled block: the ones the boot reads after it.
        assert_eq!(dev.readahead(2), vec![9, 33, 7]);
        assert_eq!(dev.readahead(7), Vec::<u64>::new());
        // A block the profile does not list: its neighbours again.
        assert_eq!(dev.readahead(60), vec![61, 62, 63]);
        // Only the first profile counts.
        dev.follow_profile(vec![1, 2, 3]);
        assert_eq!(dev.readahead(40), vec![2, 9, 33, 7]);
    }
}
