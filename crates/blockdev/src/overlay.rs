//! A writable overlay with 4 KiB granularity: the part of a disk that the
//! VM wrote.
//!
//! Two files in the disk's directory:
//!
//! - `data`: a sparse file as large as the disk; a written 4 KiB block lives
//!   at its own offset, so reads and writes need no translation table.
//! - `meta`: the allocation bitmap (one bit per 4 KiB block), kept in two
//!   slots that flushes write alternately. Each slot is an envelope (magic
//!   `SPOVRLAY`, version, BLAKE3 checksum) with a generation number; opening
//!   takes the valid slot with the highest generation, so a crash in the
//!   middle of writing one slot leaves the other intact.
//!
//! Flush ordering makes an acknowledged flush survive a crash: the bitmap is
//! copied first, then the data file is synced, then the copy is written and
//! synced. Every bit in the copy belongs to a write that finished before the
//! copy, hence before the data sync, so the durable bitmap never points at
//! data that is not durable. Writes that were not flushed may be lost, as
//! on any disk.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use spore_image::envelope;

pub const GRANULE: u64 = 4096;
pub const GRANULE_SHIFT: u32 = 12;
pub const OVERLAY_MAGIC: &[u8; 8] = b"SPOVRLAY";
pub const OVERLAY_VERSION: u16 = 1;
const META_HEADER: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("overlay I/O at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("overlay metadata at {path} has no valid slot (both corrupt or missing)")]
    NoValidSlot { path: PathBuf },
    #[error("overlay metadata is malformed: {0}")]
    Malformed(&'static str),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> OverlayError + '_ {
    move |source| OverlayError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug)]
pub struct Overlay {
    dir: PathBuf,
    data: File,
    meta: File,
    size: u64,
    bits: Vec<AtomicU64>,
    /// Serialises flushes; holds the generation of the last durable slot.
    generation: Mutex<u64>,
    /// Set by every change, cleared by a flush that captured it.
    dirty: AtomicBool,
    /// Granules written since tracking started or since the last
    /// [`Overlay::take_tracked`] (a live migration's dirty bitmap).
    tracked: Vec<AtomicU64>,
    tracking: AtomicBool,
}

/// The meta payload: generation, size, granule, bitmap.
fn encode_meta(generation: u64, size: u64, words: &[u64]) -> Vec<u8> {
    let mut p = Vec::with_capacity(META_HEADER + words.len() * 8);
    p.extend_from_slice(&generation.to_le_bytes());
    p.extend_from_slice(&size.to_le_bytes());
    p.extend_from_slice(&(GRANULE as u32).to_le_bytes());
    p.extend_from_slice(&0u32.to_le_bytes());
    for w in words {
        p.extend_from_slice(&w.to_le_bytes());
    }
    envelope::seal(OVERLAY_MAGIC, OVERLAY_VERSION, &p)
}

/// Parses one meta slot: (generation, size, bitmap words).
pub fn decode_meta(bytes: &[u8]) -> Result<(u64, u64, Vec<u64>), OverlayError> {
    let (_, p) = envelope::open(OVERLAY_MAGIC, OVERLAY_VERSION, bytes)
        .map_err(|_| OverlayError::Malformed("bad envelope"))?;
    if p.len() < META_HEADER {
        return Err(OverlayError::Malformed("short header"));
    }
    let generation = u64::from_le_bytes(p[0..8].try_into().expect("8 bytes"));
    let size = u64::from_le_bytes(p[8..16].try_into().expect("8 bytes"));
    let granule = u32::from_le_bytes(p[16..20].try_into().expect("4 bytes"));
    if granule as u64 != GRANULE {
        return Err(OverlayError::Malformed("unsupported granule"));
    }
    let words = word_count(size);
    if (p.len() - META_HEADER) as u64 != words * 8 {
        return Err(OverlayError::Malformed("bitmap length does not match size"));
    }
    let bits = p[META_HEADER..]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    Ok((generation, size, bits))
}

fn word_count(size: u64) -> u64 {
    size.div_ceil(GRANULE).div_ceil(64)
}

/// Size of one meta slot on disk for a disk of `size` bytes.
fn slot_len(size: u64) -> u64 {
    (envelope::HEADER_LEN + META_HEADER + envelope::CHECKSUM_LEN) as u64 + word_count(size) * 8
}

/// Opens a file for reading and writing; `create` insists on a new one.
fn open_rw(path: &Path, create: bool) -> Result<File, OverlayError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(create)
        .open(path)
        .map_err(io_at(path))
}

/// The set bits of `words` as granule numbers, clearing them if `take`.
fn granules_of(words: &[AtomicU64], take: bool) -> Vec<u64> {
    let mut out = Vec::new();
    for (i, w) in words.iter().enumerate() {
        let mut v = if take {
            w.swap(0, Ordering::AcqRel)
        } else {
            w.load(Ordering::Acquire)
        };
        while v != 0 {
            let bit = v.trailing_zeros() as u64;
            out.push(i as u64 * 64 + bit);
            v &= v - 1;
        }
    }
    out
}

impl Overlay {
    /// Creates an empty overlay for a disk of `size` bytes in `dir`.
    pub fn create(dir: &Path, size: u64) -> Result<Self, OverlayError> {
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        let data_path = dir.join("data");
        let data = open_rw(&data_path, true)?;
        data.set_len(size).map_err(io_at(&data_path))?;
        data.sync_all().map_err(io_at(&data_path))?;
        let meta_path = dir.join("meta");
        let meta = open_rw(&meta_path, true)?;
        let words = vec![0u64; word_count(size) as usize];
        meta.write_all_at(&encode_meta(1, size, &words), 0)
            .map_err(io_at(&meta_path))?;
        meta.sync_all().map_err(io_at(&meta_path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_at(dir))?;
        Ok(Overlay {
            dir: dir.to_owned(),
            data,
            meta,
            size,
            bits: words.into_iter().map(AtomicU64::new).collect(),
            generation: Mutex::new(1),
            dirty: AtomicBool::new(false),
            tracked: (0..word_count(size)).map(|_| AtomicU64::new(0)).collect(),
            tracking: AtomicBool::new(false),
        })
    }

    /// Opens an existing overlay, taking the newest valid metadata slot.
    pub fn open(dir: &Path) -> Result<Self, OverlayError> {
        let data_path = dir.join("data");
        let data = open_rw(&data_path, false)?;
        let meta_path = dir.join("meta");
        let meta = open_rw(&meta_path, false)?;
        let meta_len = meta.metadata().map_err(io_at(&meta_path))?.len();
        // Slot A is at 0; its length tells where slot B starts.
        let read_slot = |offset: u64| -> Option<(u64, u64, Vec<u64>)> {
            let mut head = [0u8; envelope::HEADER_LEN];
            meta.read_exact_at(&mut head, offset).ok()?;
            let payload = u64::from_le_bytes(head[16..24].try_into().ok()?);
            let total = (envelope::HEADER_LEN + envelope::CHECKSUM_LEN) as u64 + payload;
            if offset + total > meta_len || payload > envelope::MAX_PAYLOAD {
                return None;
            }
            let mut buf = vec![0u8; total as usize];
            meta.read_exact_at(&mut buf, offset).ok()?;
            decode_meta(&buf).ok()
        };
        let a = read_slot(0);
        let b = a
            .as_ref()
            .and_then(|(_, size, _)| read_slot(slot_len(*size)));
        let best = match (a, b) {
            (Some(a), Some(b)) => {
                if b.0 > a.0 {
                    b
                } else {
                    a
                }
            }
            (Some(a), None) => a,
            // Slot A is torn: slot B starts where A would end for the size
            // the data file has.
            (None, _) => {
                let size = data.metadata().map_err(io_at(&data_path))?.len();
                read_slot(slot_len(size)).ok_or(OverlayError::NoValidSlot {
                    path: meta_path.clone(),
                })?
            }
        };
        let (generation, size, words) = best;
        let tracked = (0..words.len()).map(|_| AtomicU64::new(0)).collect();
        Ok(Overlay {
            dir: dir.to_owned(),
            data,
            meta,
            size,
            bits: words.into_iter().map(AtomicU64::new).collect(),
            generation: Mutex::new(generation),
            dirty: AtomicBool::new(false),
            tracked,
            tracking: AtomicBool::new(false),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    #[inline]
    pub fn is_allocated(&self, granule: u64) -> bool {
        match self.bits.get((granule / 64) as usize) {
            Some(w) => w.load(Ordering::Acquire) & (1 << (granule % 64)) != 0,
            None => false,
        }
    }

    /// Marks granules `[first, last]` as holding overlay data. Call only
    /// after their data is in the data file.
    pub fn mark(&self, first: u64, last: u64) {
        let tracking = self.tracking.load(Ordering::Acquire);
        for g in first..=last {
            if let Some(w) = self.bits.get((g / 64) as usize) {
                w.fetch_or(1 << (g % 64), Ordering::Release);
            }
            if tracking {
                if let Some(w) = self.tracked.get((g / 64) as usize) {
                    w.fetch_or(1 << (g % 64), Ordering::Release);
                }
            }
        }
        self.dirty.store(true, Ordering::Release);
    }

    /// Starts recording which granules are written from now on, and
    /// returns the granules that hold data now (the first pass of a copy).
    /// A write racing with this call shows up in one or both.
    pub fn start_tracking(&self) -> Vec<u64> {
        for w in &self.tracked {
            w.store(0, Ordering::Release);
        }
        self.tracking.store(true, Ordering::Release);
        granules_of(&self.bits, false)
    }

    /// Granules written since tracking started or since the last call, in
    /// order; their bits are cleared. A granule written while its data is
    /// being copied is reported again by the next call, because a write
    /// marks its granule after its data is in place.
    pub fn take_tracked(&self) -> Vec<u64> {
        granules_of(&self.tracked, true)
    }

    pub fn stop_tracking(&self) {
        self.tracking.store(false, Ordering::Release);
    }

    /// Granules that hold overlay data.
    pub fn allocated_granules(&self) -> u64 {
        self.bits
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }

    pub fn read_data(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.data.read_exact_at(buf, offset)
    }

    pub fn write_data(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.data.write_all_at(buf, offset)
    }

    /// Deallocates `[offset, offset+len)` in the data file (reads as zero).
    pub fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.data.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            // No hole punching here: write the zeroes.
            let zeros = vec![0u8; len.min(1 << 20) as usize];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(zeros.len() as u64) as usize;
                self.data.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            return Ok(());
        }
        Err(err)
    }

    /// Makes every change so far durable (see the module doc for the order).
    pub fn flush(&self) -> io::Result<()> {
        let mut generation = self.generation.lock();
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let words: Vec<u64> = self
            .bits
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect();
        let result = (|| {
            self.data.sync_data()?;
            let next = *generation + 1;
            let slot = if next % 2 == 1 {
                0
            } else {
                slot_len(self.size)
            };
            self.meta
                .write_all_at(&encode_meta(next, self.size, &words), slot)?;
            self.meta.sync_data()?;
            *generation = next;
            Ok(())
        })();
        if result.is_err() {
            self.dirty.store(true, Ordering::Release);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracking_reports_writes_since_the_last_take() {
        let dir = tempfile::tempdir().unwrap();
        let o = Overlay::create(&dir.path().join("d"), 1 << 20).unwrap();
        o.mark(1, 1);
        assert!(o.take_tracked().is_empty(), "not tracking yet");
        assert_eq!(o.start_tracking(), vec![1]);
        o.mark(3, 4);
        o.mark(70, 70);
        assert_eq!(o.take_tracked(), vec![3, 4, 70]);
        assert!(o.take_tracked().is_empty());
        o.mark(1, 1);
        assert_eq!(o.take_tracked(), vec![1]);
        o.stop_tracking();
        o.mark(2, 2);
        assert!(o.take_tracked().is_empty());
        assert_eq!(o.start_tracking(), vec![1, 2, 3, 4, 70]);
    }

    #[test]
    fn flush_and_reopen_keeps_bits() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        let size = 1 << 20;
        {
            let o = Overlay::create(&p, size).unwrap();
            o.write_data(8192, &[1u8; 4096]).unwrap();
            o.mark(2, 2);
            o.flush().unwrap();
            o.write_data(4096 * 5, &[2u8; 4096]).unwrap();
            o.mark(5, 5);
            o.flush().unwrap();
            // Not flushed: lost on reopen.
            o.mark(7, 7);
        }
        let o = Overlay::open(&p).unwrap();
        assert!(o.is_allocated(2) && o.is_allocated(5) && !o.is_allocated(7));
        assert_eq!(o.allocated_granules(), 2);
        assert_eq!(o.size(), size);
    }

    #[test]
    fn torn_slot_falls_back_to_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        let size = 1 << 20;
        {
            let o = Overlay::create(&p, size).unwrap();
            o.mark(1, 1);
            o.flush().unwrap(); // generation 2 -> slot B
            o.mark(3, 3);
            o.flush().unwrap(); // generation 3 -> slot A
        }
        // Tear slot A (the newest): open must fall back to slot B.
        let meta = OpenOptions::new().write(true).open(p.join("meta")).unwrap();
        meta.write_all_at(&[0xff; 64], 30).unwrap();
        let o = Overlay::open(&p).unwrap();
        assert!(o.is_allocated(1));
        assert!(!o.is_allocated(3));
        // Tear both: a clear error.
        meta.write_all_at(&[0xff; 64], slot_len(size) + 30).unwrap();
        assert!(matches!(
            Overlay::open(&p),
            Err(OverlayError::NoValidSlot { .. })
        ));
    }

    #[test]
    fn malformed_meta_is_rejected() {
        let good = encode_meta(1, 1 << 20, &vec![0; word_count(1 << 20) as usize]);
        assert!(decode_meta(&good).is_ok());
        assert!(decode_meta(&good[..40]).is_err());
        let wrong_size = encode_meta(1, 1 << 30, &[0; 2]);
        assert!(matches!(
            decode_meta(&wrong_size),
            Err(OverlayError::Malformed("bitmap length does not match size"))
        ));
    }
}
