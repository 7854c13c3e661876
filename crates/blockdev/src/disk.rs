//! A writable disk: an image underneath, an overlay on top.
//!
//! Reads take each 4 KiB granule from the overlay when the VM has written
//! it, else from the image. A write of whole granules goes straight to the
//! overlay without reading the image; only a write that covers part of a
//! granule the overlay does not have yet reads that one granule of the
//! image first (read-modify-write, serialised per granule so that two
//! partial writes into one granule cannot lose each other).

use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::Mutex;
use spore_chunks::ChunkStore;
use spore_image::{LayerWriter, Published, TransferError};
use spore_nbd::{Export, Extent};

use crate::image::ImageDevice;
use crate::overlay::{Overlay, OverlayError, GRANULE, GRANULE_SHIFT};
use crate::IoStats;

const RMW_STRIPES: usize = 64;

#[derive(Debug)]
pub struct Disk {
    base: Arc<ImageDevice>,
    overlay: Overlay,
    rmw: Vec<Mutex<()>>,
    stats: IoStats,
}

impl Disk {
    /// Creates a new, empty overlay in `dir` on top of `base`.
    pub fn create(dir: &Path, base: Arc<ImageDevice>) -> Result<Self, OverlayError> {
        let overlay = Overlay::create(dir, base.image().manifest.virtual_size)?;
        Ok(Self::with_overlay(base, overlay))
    }

    /// Opens the overlay in `dir` on top of `base`.
    pub fn open(dir: &Path, base: Arc<ImageDevice>) -> Result<Self, OverlayError> {
        Ok(Self::with_overlay(base, Overlay::open(dir)?))
    }

    fn with_overlay(base: Arc<ImageDevice>, overlay: Overlay) -> Self {
        Disk {
            base,
            overlay,
            rmw: (0..RMW_STRIPES).map(|_| Mutex::new(())).collect(),
            stats: IoStats::default(),
        }
    }

    pub fn base(&self) -> &Arc<ImageDevice> {
        &self.base
    }

    pub fn overlay(&self) -> &Overlay {
        &self.overlay
    }

    pub fn stats(&self) -> &IoStats {
        &self.stats
    }

    /// From `pos`, the run of granules up to `end` that all come from the
    /// same side: (true for the overlay, where the run ends).
    fn run(&self, pos: u64, end: u64) -> (bool, u64) {
        let from_overlay = self.overlay.is_allocated(pos >> GRANULE_SHIFT);
        let mut run_end = (((pos >> GRANULE_SHIFT) + 1) << GRANULE_SHIFT).min(end);
        while run_end < end && self.overlay.is_allocated(run_end >> GRANULE_SHIFT) == from_overlay {
            run_end = (run_end + GRANULE).min(end);
        }
        (from_overlay, run_end)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (from_overlay, end) = self.run(pos, offset + buf.len() as u64);
            let n = (end - pos) as usize;
            let out = &mut buf[done..done + n];
            if from_overlay {
                self.overlay.read_data(pos, out)?;
            } else {
                self.base.read_at(pos, out)?;
            }
            done += n;
        }
        self.stats.record_read(buf.len());
        Ok(())
    }

    /// Writes `data` into part of one granule.
    fn write_partial(&self, granule: u64, within: usize, data: &[u8]) -> io::Result<()> {
        let _serial = self.rmw[granule as usize % RMW_STRIPES].lock();
        let start = granule << GRANULE_SHIFT;
        if self.overlay.is_allocated(granule) {
            return self.overlay.write_data(start + within as u64, data);
        }
        let len = GRANULE.min(self.size() - start) as usize;
        let mut block = vec![0u8; len];
        self.base.read_at(start, &mut block)?;
        block[within..within + data.len()].copy_from_slice(data);
        self.overlay.write_data(start, &block)?;
        self.overlay.mark(granule, granule);
        Ok(())
    }

    /// Splits `[offset, offset+len)` into a partial head, whole granules and
    /// a partial tail, and applies `whole` to the middle and `partial` to
    /// the edges.
    fn by_granule(
        &self,
        offset: u64,
        len: u64,
        mut partial: impl FnMut(u64, usize, std::ops::Range<usize>) -> io::Result<()>,
        whole: impl FnOnce(u64, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let end = offset + len;
        let size = self.size();
        // A granule is whole when the range covers it up to its end or up
        // to the end of the disk.
        let head_g = offset >> GRANULE_SHIFT;
        let first_whole = if offset.is_multiple_of(GRANULE) {
            head_g
        } else {
            head_g + 1
        };
        let last_end = if end == size {
            end.div_ceil(GRANULE)
        } else {
            end >> GRANULE_SHIFT
        };
        if first_whole >= last_end {
            // Everything is inside one or two partial granules.
            let mut pos = offset;
            while pos < end {
                let g = pos >> GRANULE_SHIFT;
                let g_end = ((g + 1) << GRANULE_SHIFT).min(end);
                partial(
                    g,
                    (pos - (g << GRANULE_SHIFT)) as usize,
                    (pos - offset) as usize..(g_end - offset) as usize,
                )?;
                pos = g_end;
            }
            return Ok(());
        }
        if !offset.is_multiple_of(GRANULE) {
            let head_end = first_whole << GRANULE_SHIFT;
            partial(
                head_g,
                (offset % GRANULE) as usize,
                0..(head_end - offset) as usize,
            )?;
        }
        let mid_start = first_whole << GRANULE_SHIFT;
        let mid_end = (last_end << GRANULE_SHIFT).min(end);
        whole(mid_start, mid_end)?;
        if mid_end < end {
            partial(last_end, 0, (mid_end - offset) as usize..len as usize)?;
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.by_granule(
            offset,
            data.len() as u64,
            |g, within, range| self.write_partial(g, within, &data[range]),
            |start, end| {
                let slice = &data[(start - offset) as usize..(end - offset) as usize];
                self.overlay.write_data(start, slice)?;
                self.overlay
                    .mark(start >> GRANULE_SHIFT, (end - 1) >> GRANULE_SHIFT);
                Ok(())
            },
        )?;
        self.stats.record_write(data.len());
        Ok(())
    }

    fn zero_at(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; GRANULE as usize];
        self.by_granule(
            offset,
            len,
            |g, within, range| self.write_partial(g, within, &zeros[..range.len()]),
            |start, end| {
                self.overlay.punch(start, end - start)?;
                self.overlay
                    .mark(start >> GRANULE_SHIFT, (end - 1) >> GRANULE_SHIFT);
                Ok(())
            },
        )
    }

    /// Turns the disk's writes into a new layer on its image and publishes
    /// a manifest for image + layer. The disk itself is unchanged.
    pub fn commit(&self, store: &ChunkStore, source: &str) -> Result<Published, TransferError> {
        self.flush()
            .map_err(|source| TransferError::Read { offset: 0, source })?;
        let image = self.base.image();
        let bs = image.manifest.block_size as u64;
        let writer = LayerWriter::new(store, Some(image), image.manifest.block_size, self.size())?;
        let granules_per_block = bs / GRANULE;
        let mut buf = vec![0u8; bs as usize];
        for block in 0..self.size().div_ceil(bs) {
            let g0 = block * granules_per_block;
            if (g0..g0 + granules_per_block).any(|g| self.overlay.is_allocated(g)) {
                let offset = block * bs;
                let len = bs.min(self.size() - offset) as usize;
                self.read_at(offset, &mut buf[..len])
                    .map_err(|source| TransferError::Read { offset, source })?;
                writer.add(block, &buf[..len])?;
            }
        }
        let (id, manifest, stats) = writer.publish(source)?;
        Ok(Published {
            id,
            manifest,
            stats,
        })
    }
}

impl Export for Disk {
    fn size(&self) -> u64 {
        self.overlay.size()
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_at(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.write_at(offset, data)?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, length: u64, _may_trim: bool, fua: bool) -> io::Result<()> {
        self.zero_at(offset, length)?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        self.zero_at(offset, length)
    }

    fn flush(&self) -> io::Result<()> {
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        self.overlay.flush()
    }

    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.base.prefetch(offset, length)
    }

    fn block_status(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        let end = (offset + length).min(self.size());
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |e: Extent| match out.last_mut() {
            Some(last) if last.hole == e.hole && last.zero == e.zero => last.length += e.length,
            _ => out.push(e),
        };
        let mut pos = offset;
        while pos < end {
            let (allocated, run_end) = self.run(pos, end);
            if allocated {
                push(Extent {
                    length: run_end - pos,
                    hole: false,
                    zero: false,
                });
            } else {
                for e in self.base.extents(pos, run_end - pos) {
                    push(e);
                }
            }
            pos = run_end;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spore_chunks::Compression;
    use spore_image::Image;

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Arc<ChunkStore>,
        disk: Disk,
        expect: Vec<u8>,
    }

    /// A 1 MiB + 1000 byte image (short last block) of pseudo-random data
    /// with a zero hole, 64 KiB blocks, and a disk over it.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(ChunkStore::open(dir.path().join("chunks"), Compression::Zstd).unwrap());
        let size = (1 << 20) + 1000;
        let mut data: Vec<u8> = (0..size as u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        data[65536..3 * 65536].fill(0);
        let raw = dir.path().join("img.raw");
        std::fs::write(&raw, &data).unwrap();
        let src = spore_image::source::open(&raw).unwrap();
        let p = spore_image::import(&store, &*src, "img.raw", 65536, None, &|_, _| {}).unwrap();
        let image = Image::open(&store, &p.id).unwrap();
        let dev = Arc::new(ImageDevice::new(
            image,
            store.clone(),
            Arc::new(crate::ChunkCache::new(1 << 20)),
            None,
        ));
        let disk = Disk::create(&dir.path().join("disk"), dev).unwrap();
        Fixture {
            _dir: dir,
            store,
            disk,
            expect: data,
        }
    }

    fn read_all(d: &Disk) -> Vec<u8> {
        let mut buf = vec![0u8; d.size() as usize];
        d.read(0, &mut buf).unwrap();
        buf
    }

    #[test]
    fn reads_see_the_image_until_written() {
        let f = fixture();
        assert_eq!(read_all(&f.disk), f.expect);
        assert_eq!(f.disk.overlay().allocated_granules(), 0);
    }

    #[test]
    fn partial_aligned_and_tail_writes_merge_with_the_image() {
        let mut f = fixture();
        let cases: [(u64, usize, u8); 5] = [
            (10, 3, 0xa1),               // inside one granule: read-modify-write
            (4090, 20, 0xa2),            // across two partial granules
            (8192, 8192, 0xa3),          // whole granules only
            (20000, 70000, 0xa4),        // head, middle, tail
            ((1 << 20) + 990, 10, 0xa5), // the short last granule
        ];
        for (off, len, byte) in cases {
            f.disk.write(off, &vec![byte; len], false).unwrap();
            f.expect[off as usize..off as usize + len].fill(byte);
            assert_eq!(read_all(&f.disk), f.expect, "after write at {off}+{len}");
        }
        // Only touched granules are in the overlay; whole-granule writes
        // read nothing from the image (covered by the counts).
        assert!(f.disk.overlay().allocated_granules() <= 2 + 2 + 18 + 1 + 1);
    }

    #[test]
    fn zeroes_and_trim_read_as_zero_and_status_reports_it() {
        let mut f = fixture();
        f.disk
            .write_zeroes(4096 * 40, 4096 * 3 + 100, true, false)
            .unwrap();
        f.expect[4096 * 40..4096 * 43 + 100].fill(0);
        f.disk.trim(5, 10).unwrap();
        f.expect[5..15].fill(0);
        assert_eq!(read_all(&f.disk), f.expect);
        let ext = f.disk.block_status(0, f.disk.size()).unwrap();
        assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), f.disk.size());
        // The image's hole at 64 KiB..192 KiB is reported as a hole.
        let mut pos = 0;
        let mut saw_hole = false;
        for e in &ext {
            if e.hole && pos >= 65536 && pos + e.length <= 3 * 65536 {
                saw_hole = true;
            }
            pos += e.length;
        }
        assert!(saw_hole, "{ext:?}");
    }

    #[test]
    fn commit_makes_a_layer_with_only_the_changed_blocks() {
        let mut f = fixture();
        f.disk.write(100_000, &[7u8; 5000], true).unwrap();
        f.expect[100_000..105_000].fill(7);
        let p = f.disk.commit(&f.store, "test").unwrap();
        assert_eq!(p.manifest.layers.len(), 2);
        assert_eq!(p.stats.changed_blocks, 1);
        let image = Image::open(&f.store, &p.id).unwrap();
        let dev = ImageDevice::new(
            image,
            f.store.clone(),
            Arc::new(crate::ChunkCache::new(1 << 20)),
            None,
        );
        let mut buf = vec![0u8; f.expect.len()];
        dev.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, f.expect);
    }
}
