//! A writable disk: an image underneath, an overlay on top.
//!
//! Reads take each 4 KiB granule from the overlay when the VM has written
//! it, else from the image. A write of whole granules goes straight to the
//! overlay without reading the image; only a write that covers part of a
//! granule the overlay does not have yet reads that one granule of the
//! image first (read-modify-write, serialised per granule so that two
//! partial writes into one granule cannot lose each other, and a whole
//! write over a granule being merged waits for the merge).
//!
//! Zeroes and trims of space the VM never wrote, where the image reads as
//! zero anyway, allocate nothing: a weekly fstrim must not turn free space
//! into overlay data that a migration or commit then moves.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use spore_chunks::ChunkStore;
use spore_image::{LayerWriter, Published, TransferError};
use spore_nbd::{Export, Extent};

use crate::image::ImageDevice;
use crate::overlay::{Overlay, OverlayError, GRANULE, GRANULE_SHIFT};
use crate::IoStats;
use spore_files::Files;

const RMW_STRIPES: usize = 64;

/// What a zeroing request asks for.
#[derive(Debug, Clone, Copy)]
enum Zeroing {
    /// Read as zero afterwards; `provision`: keep the space allocated
    /// (NBD_CMD_FLAG_NO_HOLE), never punch it.
    Zero { provision: bool },
    /// NBD_CMD_TRIM: the client no longer needs the range.
    Trim,
}

#[derive(Debug)]
pub struct Disk {
    base: Arc<ImageDevice>,
    overlay: Overlay,
    rmw: Vec<Mutex<()>>,
    stats: IoStats,
    /// Ranges of the image that a request needed and could not read (a
    /// block no source answered for): the VM using the disk is paused by
    /// QEMU (`werror=stop`), and the agent resumes it once they arrive.
    failed: Mutex<Vec<(u64, u64)>>,
    /// A write or flush found no space for the overlay (ENOSPC, EDQUOT):
    /// the client got NBD_ENOSPC, QEMU pauses the VM (`werror`), and the
    /// agent resumes it once there is space.
    full: AtomicBool,
}

/// Whether `e` says the file system has no room.
fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
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

    /// [`Disk::create`] with the overlay's files in `files`.
    pub fn create_in(
        files: Arc<dyn Files>,
        dir: &Path,
        base: Arc<ImageDevice>,
    ) -> Result<Self, OverlayError> {
        let overlay = Overlay::create_in(files, dir, base.image().manifest.virtual_size)?;
        Ok(Self::with_overlay(base, overlay))
    }

    /// [`Disk::open`] with the overlay's files in `files`.
    pub fn open_in(
        files: Arc<dyn Files>,
        dir: &Path,
        base: Arc<ImageDevice>,
    ) -> Result<Self, OverlayError> {
        Ok(Self::with_overlay(base, Overlay::open_in(files, dir)?))
    }

    fn with_overlay(base: Arc<ImageDevice>, overlay: Overlay) -> Self {
        Disk {
            base,
            overlay,
            rmw: (0..RMW_STRIPES).map(|_| Mutex::new(())).collect(),
            stats: IoStats::default(),
            failed: Mutex::new(Vec::new()),
            full: AtomicBool::new(false),
        }
    }

    /// True when a write found no space since the last [`Disk::clear_full`].
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Acquire)
    }

    /// Space was freed: the next write may try again.
    pub fn clear_full(&self) {
        self.full.store(false, Ordering::Release);
    }

    /// Passes `r` on, noting a full file system.
    fn noting_space<T>(&self, r: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &r {
            if is_no_space(e) && !self.full.swap(true, Ordering::AcqRel) {
                tracing::warn!(error = %e, "no space for the disk's overlay: its VM pauses until space is freed");
            }
        }
        r
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

    /// Reads `buf` from the image, remembering the range if it fails.
    fn read_base(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.base.read_at(offset, buf).inspect_err(|_| {
            self.failed.lock().push((offset, buf.len() as u64));
        })
    }

    /// True when a request failed for want of image data since the last
    /// [`Disk::retry_failed`] that succeeded.
    pub fn has_failed(&self) -> bool {
        !self.failed.lock().is_empty()
    }

    /// Fetches the image ranges requests failed on; Ok once every one is
    /// here (the requests can be retried), else they stay pending.
    pub fn retry_failed(&self) -> io::Result<()> {
        let ranges = std::mem::take(&mut *self.failed.lock());
        for (i, (offset, len)) in ranges.iter().enumerate() {
            if let Err(e) = self.base.prefetch(*offset, *len) {
                self.failed.lock().extend_from_slice(&ranges[i..]);
                return Err(e);
            }
        }
        Ok(())
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
                self.read_base(pos, out)?;
            }
            done += n;
        }
        self.stats.record_read(buf.len());
        Ok(())
    }

    /// Takes the read-modify-write locks of granules `[first, last]`, in
    /// stripe order (a partial write holds one at a time: no deadlock).
    fn lock_granules(&self, first: u64, last: u64) -> Vec<parking_lot::MutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> = if last - first + 1 >= RMW_STRIPES as u64 {
            (0..RMW_STRIPES).collect()
        } else {
            (first..=last).map(|g| g as usize % RMW_STRIPES).collect()
        };
        stripes.sort_unstable();
        stripes.dedup();
        stripes.into_iter().map(|i| self.rmw[i].lock()).collect()
    }

    /// Writes `data` into part of one granule.
    fn write_partial(&self, granule: u64, within: usize, data: &[u8]) -> io::Result<()> {
        let _serial = self.rmw[granule as usize % RMW_STRIPES].lock();
        let start = granule << GRANULE_SHIFT;
        if self.overlay.is_allocated(granule) {
            self.overlay.write_data(start + within as u64, data)?;
        } else {
            let len = GRANULE.min(self.size() - start) as usize;
            let mut block = vec![0u8; len];
            self.read_base(start, &mut block)?;
            block[within..within + data.len()].copy_from_slice(data);
            self.overlay.write_data(start, &block)?;
        }
        // Dirty for the next flush and tracked for a migration, whether
        // the granule was new or not.
        self.overlay.mark(granule, granule)?;
        Ok(())
    }

    /// True when the image reads as zero over the granules `[first, last]`.
    fn base_is_zero(&self, first: u64, last: u64) -> bool {
        let start = first << GRANULE_SHIFT;
        let end = ((last + 1) << GRANULE_SHIFT).min(self.size());
        self.base
            .extents(start, end - start)
            .iter()
            .all(|e| e.hole || e.zero)
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
                let (first, last) = (start >> GRANULE_SHIFT, (end - 1) >> GRANULE_SHIFT);
                // A granule not yet allocated may be in the middle of a
                // read-modify-write, which would put image bytes back over
                // these: wait for it.
                let _serial = (!self.overlay.all_allocated(first, last))
                    .then(|| self.lock_granules(first, last));
                let slice = &data[(start - offset) as usize..(end - offset) as usize];
                self.overlay.write_data(start, slice)?;
                self.overlay.mark(first, last)?;
                Ok(())
            },
        )?;
        self.stats.record_write(data.len());
        Ok(())
    }

    /// Makes `[offset, offset+len)` read as zero (`Zero`), or lets the VM
    /// say it no longer needs it (`Trim`).
    fn zero_at(&self, offset: u64, len: u64, how: Zeroing) -> io::Result<()> {
        let zeros = vec![0u8; GRANULE as usize];
        self.by_granule(
            offset,
            len,
            |g, within, range| {
                let needed = self.overlay.is_allocated(g)
                    || match how {
                        Zeroing::Trim => false,
                        Zeroing::Zero { provision } => provision || !self.base_is_zero(g, g),
                    };
                if needed {
                    self.write_partial(g, within, &zeros[..range.len()])?;
                }
                Ok(())
            },
            |start, end| {
                let (first, last) = (start >> GRANULE_SHIFT, (end - 1) >> GRANULE_SHIFT);
                let _serial = self.lock_granules(first, last);
                let mut g = first;
                while g <= last {
                    let allocated = self.overlay.is_allocated(g);
                    let mut run_end = g + 1;
                    while run_end <= last && self.overlay.is_allocated(run_end) == allocated {
                        run_end += 1;
                    }
                    let (a, b) = (g << GRANULE_SHIFT, (run_end << GRANULE_SHIFT).min(end));
                    let act = match how {
                        // After a trim the contents are the client's to
                        // forget: what it wrote reads as zero, the image
                        // shows through where it wrote nothing.
                        Zeroing::Trim if !allocated => None,
                        Zeroing::Trim => Some(false),
                        Zeroing::Zero { provision: true } => Some(true),
                        Zeroing::Zero { provision: false } => {
                            (allocated || !self.base_is_zero(g, run_end - 1)).then_some(false)
                        }
                    };
                    match act {
                        Some(true) => self.overlay.zero_provisioned(a, b - a)?,
                        Some(false) => self.overlay.punch(a, b - a)?,
                        None => {}
                    }
                    if act.is_some() {
                        self.overlay.mark(g, run_end - 1)?;
                    }
                    g = run_end;
                }
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
        self.noting_space(self.write_at(offset, data))?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, length: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        // NBD_CMD_FLAG_NO_HOLE (may_trim false): the range must stay
        // provisioned, so it is zeroed in place, never punched.
        self.noting_space(self.zero_at(
            offset,
            length,
            Zeroing::Zero {
                provision: !may_trim,
            },
        ))?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        self.zero_at(offset, length, Zeroing::Trim)
    }

    fn flush(&self) -> io::Result<()> {
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        self.noting_space(self.overlay.flush())
    }

    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.base.prefetch(offset, length)
    }

    /// Quick unless a partial granule at either end must first be read
    /// from the image (which may mean a fetch from another host).
    fn is_quick_write(&self, offset: u64, length: u64) -> bool {
        let end = offset + length;
        let head_ok =
            offset.is_multiple_of(GRANULE) || self.overlay.is_allocated(offset >> GRANULE_SHIFT);
        let tail_ok = end.is_multiple_of(GRANULE)
            || end >= self.size()
            || self.overlay.is_allocated((end - 1) >> GRANULE_SHIFT);
        head_ok && tail_ok
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
                // Holes punched in written granules read as zero.
                let mut at = pos;
                while at < run_end {
                    let (data_start, data_end) = match self.overlay.data_run(at)? {
                        Some((s, e)) if e > s => (s.clamp(at, run_end), e.min(run_end)),
                        Some(_) => (at, run_end),
                        None => (run_end, run_end),
                    };
                    if data_start > at {
                        push(Extent {
                            length: data_start - at,
                            hole: true,
                            zero: true,
                        });
                    }
                    if data_end > data_start {
                        push(Extent {
                            length: data_end - data_start,
                            hole: false,
                            zero: false,
                        });
                    }
                    at = data_end.max(data_start).max(at + 1);
                }
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
        f.disk.write_zeroes(5, 10, true, false).unwrap();
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

    #[test]
    fn zeroes_and_trims_of_unwritten_space_allocate_nothing() {
        let mut f = fixture();
        // The image's hole (64 KiB..192 KiB): zeroes and trims need no
        // overlay at all.
        f.disk.write_zeroes(65536, 65536, true, false).unwrap();
        f.disk.write_zeroes(65536 + 100, 5000, true, false).unwrap();
        f.disk.trim(65536, 2 * 65536).unwrap();
        assert_eq!(f.disk.overlay().allocated_granules(), 0);
        // A trim of image data the VM never wrote: nothing to forget.
        f.disk.trim(0, 65536).unwrap();
        assert_eq!(f.disk.overlay().allocated_granules(), 0);
        assert_eq!(read_all(&f.disk), f.expect);
        // Zeroes over image data must mask it: allocated, read as zero,
        // reported as zero.
        f.disk.write_zeroes(4096, 8192, true, false).unwrap();
        f.expect[4096..12288].fill(0);
        assert_eq!(f.disk.overlay().allocated_granules(), 2);
        assert_eq!(read_all(&f.disk), f.expect);
        let ext = f.disk.block_status(4096, 8192).unwrap();
        assert!(ext.iter().all(|e| e.zero), "{ext:?}");
        // A trim of what the VM wrote reads as zero afterwards.
        f.disk.write(200_000, &[5u8; 8192], false).unwrap();
        f.disk.trim(200_704, 4096).unwrap();
        f.expect[200_000..208_192].fill(5);
        f.expect[200_704..204_800].fill(0);
        assert_eq!(read_all(&f.disk), f.expect);
    }

    #[test]
    fn no_hole_zeroes_stay_provisioned() {
        let f = fixture();
        let data = f.disk.overlay().dir().join("data");
        f.disk.write(8192, &[3u8; 16384], true).unwrap();
        let blocks = |p: &Path| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(p).unwrap().blocks()
        };
        let before = blocks(&data);
        // NO_HOLE (may_trim false): zeroed in place, not punched.
        f.disk.write_zeroes(8192, 16384, false, true).unwrap();
        assert_eq!(blocks(&data), before, "NO_HOLE punched a hole");
        let mut buf = vec![1u8; 16384];
        f.disk.read(8192, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        // Without it the space is given back.
        f.disk.write_zeroes(8192, 16384, true, true).unwrap();
        assert!(
            blocks(&data) < before,
            "a trim-allowed zero kept the blocks"
        );
    }

    #[test]
    fn sub_granule_writes_are_dirty_and_tracked() {
        let f = fixture();
        f.disk.write(0, &[1u8; 4096], true).unwrap();
        f.disk.overlay().start_tracking();
        // 512 bytes into a granule the overlay already has.
        f.disk.write(512, &[2u8; 512], false).unwrap();
        assert_eq!(f.disk.overlay().take_tracked(), vec![0]);
        f.disk.flush().unwrap();
        // Reopened from what the flush made durable.
        let dir = f.disk.overlay().dir().to_owned();
        let disk = Disk::open(&dir, f.disk.base().clone()).unwrap();
        let mut buf = vec![0u8; 1024];
        disk.read(0, &mut buf).unwrap();
        assert_eq!(&buf[..512], &[1u8; 512][..]);
        assert_eq!(&buf[512..], &[2u8; 512][..]);
    }

    /// Several threads write, zero and trim overlapping ranges of one disk
    /// while a migration tracks it: no written byte ever shows the image
    /// again (a whole-granule write racing a read-modify-write used to
    /// revert), every byte holds a value some request put there, block
    /// status calls nothing zero that reads otherwise, and the tracked set
    /// covers every granule a request changed.
    #[test]
    fn concurrent_requests_agree_with_a_model() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        use std::collections::BTreeSet;
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(ChunkStore::open(dir.path().join("chunks"), Compression::Zstd).unwrap());
        let size = 128 * 1024 + 512;
        let base_byte = 0xee;
        let raw = dir.path().join("img.raw");
        std::fs::write(&raw, vec![base_byte; size]).unwrap();
        let src = spore_image::source::open(&raw).unwrap();
        let p = spore_image::import(&store, &*src, "img.raw", 65536, None, &|_, _| {}).unwrap();
        let dev = Arc::new(ImageDevice::new(
            Image::open(&store, &p.id).unwrap(),
            store.clone(),
            Arc::new(crate::ChunkCache::new(1 << 20)),
            None,
        ));
        for round in 0..20u64 {
            let disk =
                Arc::new(Disk::create(&dir.path().join(format!("d{round}")), dev.clone()).unwrap());
            disk.overlay().start_tracking();
            let threads: Vec<_> = (0..4u64)
                .map(|t| {
                    let disk = disk.clone();
                    std::thread::spawn(move || {
                        let mut rng = StdRng::seed_from_u64(round * 16 + t);
                        // (offset, len, value: None for a trim)
                        let mut done = Vec::new();
                        for i in 0..150u64 {
                            let offset = rng.random_range(0..size as u64 - 1);
                            let len = rng.random_range(1..=12_000u64).min(size as u64 - offset);
                            match rng.random_range(0..10) {
                                0 => {
                                    disk.write_zeroes(offset, len, rng.random_bool(0.5), false)
                                        .unwrap();
                                    done.push((offset, len, Some(0u8)));
                                }
                                1 => {
                                    disk.trim(offset, len).unwrap();
                                    done.push((offset, len, None));
                                }
                                2 => disk.flush().unwrap(),
                                _ => {
                                    let v = ((t * 60 + i) % 200 + 1) as u8;
                                    disk.write(offset, &vec![v; len as usize], false).unwrap();
                                    done.push((offset, len, Some(v)));
                                }
                            }
                        }
                        done
                    })
                })
                .collect();
            let done: Vec<_> = threads
                .into_iter()
                .flat_map(|t| t.join().unwrap())
                .collect();
            let mut all = vec![0u8; size];
            disk.read(0, &mut all).unwrap();
            let mut allowed: Vec<BTreeSet<u8>> = vec![BTreeSet::new(); size];
            let mut trimmed = vec![false; size];
            let mut changed = BTreeSet::new();
            for (offset, len, v) in &done {
                for b in *offset as usize..(*offset + *len) as usize {
                    match v {
                        Some(v) => {
                            allowed[b].insert(*v);
                        }
                        None => trimmed[b] = true,
                    }
                }
                if v.is_some_and(|v| v != 0) {
                    changed.extend(offset >> GRANULE_SHIFT..=(offset + len - 1) >> GRANULE_SHIFT);
                }
            }
            for b in 0..size {
                if trimmed[b] {
                    continue;
                }
                if allowed[b].is_empty() {
                    assert_eq!(all[b], base_byte, "round {round}: byte {b} changed unasked");
                } else {
                    assert!(
                        allowed[b].contains(&all[b]),
                        "round {round}: byte {b} is {:#x}, which no request wrote there",
                        all[b]
                    );
                }
            }
            // Block status agrees with the reads: its extents cover the
            // disk exactly, and a range it calls zero reads as zero.
            let extents = disk.block_status(0, size as u64).unwrap();
            let mut at = 0usize;
            for e in &extents {
                let end = at + e.length as usize;
                if e.zero {
                    if let Some(b) = (at..end).find(|b| all[*b] != 0) {
                        panic!(
                            "round {round}: byte {b} reads {:#x} inside a zero extent",
                            all[b]
                        );
                    }
                }
                at = end;
            }
            assert_eq!(
                at, size,
                "round {round}: block status covers {at} of {size} bytes"
            );
            let tracked: BTreeSet<u64> = disk.overlay().take_tracked().into_iter().collect();
            let missing: Vec<_> = changed.difference(&tracked).collect();
            assert!(
                missing.is_empty(),
                "round {round}: written but not tracked: {missing:?}"
            );
        }
    }

    /// A whole-granule write and a partial write racing for one granule
    /// the overlay does not have yet, thousands of times: the whole
    /// write's bytes never revert to the image's (the merge of the partial
    /// write used to put them back).
    #[test]
    fn a_whole_write_never_loses_to_a_merge() {
        use std::sync::Barrier;
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(ChunkStore::open(dir.path().join("chunks"), Compression::Zstd).unwrap());
        let size = 1usize << 20;
        let raw = dir.path().join("img.raw");
        std::fs::write(&raw, vec![0xeeu8; size]).unwrap();
        let src = spore_image::source::open(&raw).unwrap();
        let p = spore_image::import(&store, &*src, "img.raw", 65536, None, &|_, _| {}).unwrap();
        let dev = Arc::new(ImageDevice::new(
            Image::open(&store, &p.id).unwrap(),
            store.clone(),
            Arc::new(crate::ChunkCache::new(4 << 20)),
            None,
        ));
        let granules = (size as u64) >> GRANULE_SHIFT;
        for round in 0..40 {
            let disk =
                Arc::new(Disk::create(&dir.path().join(format!("d{round}")), dev.clone()).unwrap());
            let barrier = Arc::new(Barrier::new(2));
            let (d1, b1) = (disk.clone(), barrier.clone());
            let merger = std::thread::spawn(move || {
                for g in 0..granules {
                    b1.wait();
                    d1.write((g << GRANULE_SHIFT) + 100, &[0x11; 10], false)
                        .unwrap();
                }
            });
            for g in 0..granules {
                barrier.wait();
                disk.write(g << GRANULE_SHIFT, &[0x22; GRANULE as usize], false)
                    .unwrap();
            }
            merger.join().unwrap();
            let mut all = vec![0u8; size];
            disk.read(0, &mut all).unwrap();
            for g in 0..granules as usize {
                let at = g << GRANULE_SHIFT;
                assert_eq!(
                    all[at], 0x22,
                    "round {round}: granule {g} reverted to the image"
                );
                assert_eq!(
                    all[at + 4095],
                    0x22,
                    "round {round}: granule {g} reverted to the image"
                );
            }
        }
    }

    /// A small tmpfs, unmounted when dropped (then its directory goes).
    struct SmallFs(std::path::PathBuf, #[allow(dead_code)] tempfile::TempDir);

    impl SmallFs {
        /// None where this process may not mount (not root).
        fn mount(size: &str) -> Option<SmallFs> {
            let dir = tempfile::tempdir().unwrap();
            let mnt = dir.path().join("fs");
            std::fs::create_dir(&mnt).unwrap();
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "spore-test"])
                .arg(&mnt)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            ok.then_some(SmallFs(mnt, dir))
        }
    }

    impl Drop for SmallFs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }

    /// A write that finds the overlay's file system full fails with ENOSPC
    /// (which NBD carries to QEMU as NBD_ENOSPC, and QEMU turns into a
    /// pause), marks the disk full, and loses nothing acknowledged before;
    /// once space is freed the same write succeeds.
    #[test]
    fn a_full_file_system_is_enospc_and_keeps_what_was_acknowledged() {
        let mut f = fixture();
        let Some(fs) = SmallFs::mount("1m") else {
            eprintln!("SKIP: mounting a tmpfs needs root");
            return;
        };
        let ballast = fs.0.join("ballast");
        std::fs::write(&ballast, vec![1u8; 256 << 10]).unwrap();
        let disk = Disk::create(&fs.0.join("disk"), f.disk.base().clone()).unwrap();
        let mut failed = None;
        for (i, off) in (0..f.disk.size() - (64 << 10))
            .step_by(64 << 10)
            .enumerate()
        {
            let data = vec![i as u8 + 1; 64 << 10];
            let written = disk.write(off, &data, false);
            if written.is_ok() {
                // Written (if not yet durable): reads see it.
                f.expect[off as usize..off as usize + data.len()].copy_from_slice(&data);
            }
            if let Err(e) = written.and_then(|()| disk.flush()) {
                failed = Some((off, data, e));
                break;
            }
        }
        let (off, data, e) = failed.expect("a 1 MiB file system filled up");
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        assert!(disk.is_full());
        assert!(off > 0, "some writes fitted");
        assert_eq!(
            read_all(&disk),
            f.expect,
            "acknowledged writes are all there"
        );

        std::fs::remove_file(&ballast).unwrap();
        disk.clear_full();
        disk.write(off, &data, false).unwrap();
        disk.flush().unwrap();
        f.expect[off as usize..off as usize + data.len()].copy_from_slice(&data);
        assert!(!disk.is_full());
        assert_eq!(read_all(&disk), f.expect);
        drop(disk);
        drop(fs);
    }
}
