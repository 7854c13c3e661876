//! A writable overlay with 4 KiB granularity: the part of a disk that the
//! VM wrote.
//!
//! Three files in the disk's directory (docs/formats.md):
//!
//! - `data`: a sparse file as large as the disk; a written 4 KiB granule
//!   lives at its own offset, so reads and writes need no translation table.
//! - `meta`: checkpoints of the allocation bitmap (one bit per granule), in
//!   two slots written alternately. Each slot is an envelope (magic
//!   `SPOVRLAY`, version, BLAKE3 checksum) with a generation number; opening
//!   takes the valid slot with the highest generation, so a crash in the
//!   middle of writing one slot leaves the other intact.
//! - `log`: the granules allocated since that checkpoint, one checksummed
//!   record per flush that allocated any.
//! - `pending`: the granules allocated since the last flush, one record
//!   per allocating write, written but never synced, under the kernel's
//!   boot id. A process that dies (the agent killed, crashed, restarted)
//!   loses nothing the page cache holds, so the next open in the same boot
//!   takes these records too: a write acknowledged to a guest that keeps
//!   running across an agent restart reads back after it, flushed or not.
//!   After a reboot (a power cut) the boot id differs and the records are
//!   ignored: only flushed writes count, as the log's rules say.
//!
//! A flush costs what changed since the last one, not the disk's size: it
//! syncs the data file and, when new granules were allocated, appends one
//! record naming them and syncs the log. Only when the log has grown past
//! the bitmap's own size is a checkpoint written (and the log started
//! again), so the bitmap is rewritten at most once per bitmap's worth of
//! log.
//!
//! Ordering makes an acknowledged flush survive a crash: the granules a
//! record names (and the bitmap a checkpoint copies) are taken *before* the
//! data file is synced, and every bit is set only after its data was
//! written, so durable metadata never points at data that is not durable.
//! Allocation only grows (a trim punches a hole in an allocated granule, it
//! does not unallocate it), so replaying a record that a later checkpoint
//! already holds is harmless. Writes that were not flushed may be lost, as
//! on any disk.
//!
//! Every write marks its granules (allocated, dirty for the next flush, and
//! tracked while a live migration copies the disk), whether it allocated
//! them or overwrote part of one.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use spore_image::envelope;

use spore_files::{FileHandle, Files, RealFiles};

pub const GRANULE: u64 = 4096;
pub const GRANULE_SHIFT: u32 = 12;
pub const OVERLAY_MAGIC: &[u8; 8] = b"SPOVRLAY";
/// Version 2 added the allocation log; version 1 overlays (no log) open and
/// are upgraded in place.
pub const OVERLAY_VERSION: u16 = 2;
pub const LOG_MAGIC: &[u8; 8] = b"SPOVLOG\0";
const LOG_VERSION: u16 = 1;
const META_HEADER: usize = 24;
const LOG_HEADER_PAYLOAD: usize = 16;
const LOG_HEADER_LEN: u64 =
    (envelope::HEADER_LEN + LOG_HEADER_PAYLOAD + envelope::CHECKSUM_LEN) as u64;
/// A record: u32 run count, u32 reserved, u64 sequence, runs, checksum.
const RECORD_HEADER: usize = 16;
const RUN_LEN: usize = 16;
/// Most runs in one record (bounds what a reader allocates).
const MAX_RUNS: u32 = 1 << 20;
/// The log file grows by this much at a time (written zeroes).
const LOG_PREALLOC: u64 = 256 << 10;
/// The log may grow to this before a checkpoint, at least.
const MIN_LOG_BEFORE_CHECKPOINT: u64 = 1 << 20;
pub const PENDING_MAGIC: &[u8; 8] = b"SPOVPEND";
const PENDING_VERSION: u16 = 1;
/// Pending header payload: boot id (16 bytes), nonce (8 bytes).
const PENDING_HEADER_PAYLOAD: usize = 24;
const PENDING_HEADER_LEN: u64 =
    (envelope::HEADER_LEN + PENDING_HEADER_PAYLOAD + envelope::CHECKSUM_LEN) as u64;
/// A pending record: u32 run count, u32 reserved, runs, checksum.
const PENDING_RECORD_HEADER: usize = 8;
/// The pending file is started again (by a flush) past this length.
const PENDING_LIMIT: u64 = 1 << 20;

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

/// What the durable files say, as the flusher keeps it.
#[derive(Debug)]
struct Durable {
    /// Generation of the newest checkpoint.
    generation: u64,
    /// Where the next record goes.
    log_len: u64,
    /// How far the log file is written (with zeroes past `log_len`):
    /// records go into blocks that already exist, so syncing one changes
    /// no file system metadata (no journal commit), except once per
    /// [`LOG_PREALLOC`] when the file grows.
    log_alloc: u64,
    /// Sequence number of the last record.
    seq: u64,
    /// The log must be started again before a record can follow (its
    /// header is stale or a reset failed): the next flush checkpoints.
    log_stale: bool,
}

/// The pending file and where its next record goes.
#[derive(Debug)]
struct Pending {
    file: Arc<dyn FileHandle>,
    /// The kernel's boot id and this file's nonce: what every record's
    /// checksum covers, so records of another boot or from before the
    /// file was started again never pass.
    boot: [u8; 16],
    nonce: u64,
    len: u64,
    /// A record could not be written (a full disk): the next allocating
    /// or overwriting write must write every run since the last flush
    /// before it is acknowledged.
    unprotected: bool,
}

impl Pending {
    fn header(&self, nonce: u64) -> Vec<u8> {
        let mut p = Vec::with_capacity(PENDING_HEADER_PAYLOAD);
        p.extend_from_slice(&self.boot);
        p.extend_from_slice(&nonce.to_le_bytes());
        envelope::seal(PENDING_MAGIC, PENDING_VERSION, &p)
    }

    /// Starts the file again under a new nonce (not synced: the records
    /// only ever matter within this boot).
    fn restart(&mut self) -> io::Result<()> {
        let nonce = self.nonce.wrapping_add(1);
        self.file.write_at(&self.header(nonce), 0)?;
        self.nonce = nonce;
        self.len = PENDING_HEADER_LEN;
        self.unprotected = false;
        Ok(())
    }

    fn append(&mut self, runs: &[(u64, u64)]) -> io::Result<()> {
        if runs.is_empty() {
            return Ok(());
        }
        let mut r = Vec::with_capacity(PENDING_RECORD_HEADER + runs.len() * RUN_LEN + 32);
        r.extend_from_slice(&(runs.len() as u32).to_le_bytes());
        r.extend_from_slice(&0u32.to_le_bytes());
        for (first, count) in runs {
            r.extend_from_slice(&first.to_le_bytes());
            r.extend_from_slice(&count.to_le_bytes());
        }
        let sum = pending_sum(&self.boot, self.nonce, &r);
        r.extend_from_slice(&sum);
        self.file.write_at(&r, self.len)?;
        self.len += r.len() as u64;
        Ok(())
    }
}

fn pending_sum(boot: &[u8; 16], nonce: u64, body: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(boot);
    h.update(&nonce.to_le_bytes());
    h.update(body);
    *h.finalize().as_bytes()
}

/// Parses a pending file's header: (boot id, nonce).
pub fn decode_pending_header(bytes: &[u8]) -> Result<([u8; 16], u64), OverlayError> {
    let (_, p) = envelope::open(PENDING_MAGIC, PENDING_VERSION, bytes)
        .map_err(|_| OverlayError::Malformed("bad pending header"))?;
    if p.len() != PENDING_HEADER_PAYLOAD {
        return Err(OverlayError::Malformed("pending header length"));
    }
    Ok((
        p[0..16].try_into().expect("16 bytes"),
        u64::from_le_bytes(p[16..24].try_into().expect("8 bytes")),
    ))
}

/// Reads the records of a pending file (after its header) written under
/// `boot` and `nonce`, stopping at the first that is torn or does not
/// pass; returns their runs.
pub fn decode_pending_records(
    boot: &[u8; 16],
    nonce: u64,
    body: &[u8],
    granules: u64,
) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    let mut at = 0usize;
    while let Some(head) = body.get(at..at + PENDING_RECORD_HEADER) {
        let count = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
        if count == 0 || count > MAX_RUNS {
            break;
        }
        let body_len = PENDING_RECORD_HEADER + count as usize * RUN_LEN;
        let Some(rec) = body.get(at..at + body_len + 32) else {
            break;
        };
        if pending_sum(boot, nonce, &rec[..body_len]) != rec[body_len..] {
            break;
        }
        let these: Option<Vec<(u64, u64)>> = rec[PENDING_RECORD_HEADER..body_len]
            .chunks_exact(RUN_LEN)
            .map(|run| {
                let first = u64::from_le_bytes(run[0..8].try_into().expect("8 bytes"));
                let n = u64::from_le_bytes(run[8..16].try_into().expect("8 bytes"));
                (n > 0 && first.checked_add(n).is_some_and(|end| end <= granules))
                    .then_some((first, n))
            })
            .collect();
        let Some(these) = these else { break };
        runs.extend(these);
        at += body_len + 32;
    }
    runs
}

#[derive(Debug)]
pub struct Overlay {
    dir: PathBuf,
    data: Arc<dyn FileHandle>,
    meta: Arc<dyn FileHandle>,
    log: Arc<dyn FileHandle>,
    size: u64,
    bits: Vec<AtomicU64>,
    /// Serialises flushes.
    durable: Mutex<Durable>,
    /// Set by every change, cleared by a flush that captured it.
    dirty: AtomicBool,
    /// Runs of granules allocated since the last flush took them.
    fresh: Mutex<Vec<(u64, u64)>>,
    /// Granules written since tracking started or since the last
    /// [`Overlay::take_tracked`] (a live migration's dirty bitmap).
    tracked: Vec<AtomicU64>,
    tracking: AtomicBool,
    /// Taken before `fresh` by writes that allocate.
    pending: Mutex<Pending>,
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

/// One decoded meta slot.
#[derive(Debug)]
pub struct Slot {
    pub version: u16,
    pub generation: u64,
    pub size: u64,
    pub words: Vec<u64>,
}

/// Parses one meta slot.
pub fn decode_meta(bytes: &[u8]) -> Result<Slot, OverlayError> {
    let (version, p) = envelope::open(OVERLAY_MAGIC, OVERLAY_VERSION, bytes)
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
    let words = p[META_HEADER..]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    Ok(Slot {
        version,
        generation,
        size,
        words,
    })
}

fn encode_log_header(base_generation: u64, size: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(LOG_HEADER_PAYLOAD);
    p.extend_from_slice(&base_generation.to_le_bytes());
    p.extend_from_slice(&size.to_le_bytes());
    envelope::seal(LOG_MAGIC, LOG_VERSION, &p)
}

/// Parses the log's header: (base generation, size).
pub fn decode_log_header(bytes: &[u8]) -> Result<(u64, u64), OverlayError> {
    let (_, p) = envelope::open(LOG_MAGIC, LOG_VERSION, bytes)
        .map_err(|_| OverlayError::Malformed("bad log header"))?;
    if p.len() != LOG_HEADER_PAYLOAD {
        return Err(OverlayError::Malformed("log header length"));
    }
    Ok((
        u64::from_le_bytes(p[0..8].try_into().expect("8 bytes")),
        u64::from_le_bytes(p[8..16].try_into().expect("8 bytes")),
    ))
}

/// One log record. The checksum covers the log's base generation too, so
/// a record left over from before the log was started again never passes.
fn encode_record(base_generation: u64, seq: u64, runs: &[(u64, u64)]) -> Vec<u8> {
    let mut r = Vec::with_capacity(RECORD_HEADER + runs.len() * RUN_LEN + 32);
    r.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    r.extend_from_slice(&0u32.to_le_bytes());
    r.extend_from_slice(&seq.to_le_bytes());
    for (first, count) in runs {
        r.extend_from_slice(&first.to_le_bytes());
        r.extend_from_slice(&count.to_le_bytes());
    }
    let sum = record_sum(base_generation, &r);
    r.extend_from_slice(&sum);
    r
}

fn record_sum(base_generation: u64, body: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&base_generation.to_le_bytes());
    h.update(body);
    *h.finalize().as_bytes()
}

/// Reads the records of a log whose header says `base_generation`, from
/// `log[LOG_HEADER_LEN..]`, stopping at the first that is torn, corrupt or
/// out of sequence. Returns the runs, the end of the last good record and
/// its sequence number.
pub fn decode_records(
    base_generation: u64,
    body: &[u8],
    granules: u64,
) -> (Vec<(u64, u64)>, usize, u64) {
    let mut runs = Vec::new();
    let (mut at, mut seq) = (0usize, 0u64);
    while let Some(head) = body.get(at..at + RECORD_HEADER) {
        let count = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
        let rseq = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
        if count == 0 || count > MAX_RUNS || rseq != seq + 1 {
            break;
        }
        let body_len = RECORD_HEADER + count as usize * RUN_LEN;
        let Some(rec) = body.get(at..at + body_len + 32) else {
            break;
        };
        if record_sum(base_generation, &rec[..body_len]) != rec[body_len..] {
            break;
        }
        let mut ok = true;
        let mut these = Vec::with_capacity(count as usize);
        for run in rec[RECORD_HEADER..body_len].chunks_exact(RUN_LEN) {
            let first = u64::from_le_bytes(run[0..8].try_into().expect("8 bytes"));
            let n = u64::from_le_bytes(run[8..16].try_into().expect("8 bytes"));
            if n == 0 || first.checked_add(n).is_none_or(|end| end > granules) {
                ok = false;
                break;
            }
            these.push((first, n));
        }
        if !ok {
            break;
        }
        runs.extend(these);
        at += body_len + 32;
        seq = rseq;
    }
    (runs, at, seq)
}

fn word_count(size: u64) -> u64 {
    size.div_ceil(GRANULE).div_ceil(64)
}

/// Size of one meta slot on disk for a disk of `size` bytes.
fn slot_len(size: u64) -> u64 {
    (envelope::HEADER_LEN + META_HEADER + envelope::CHECKSUM_LEN) as u64 + word_count(size) * 8
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

/// The bits of word `w` that lie in granules `[first, last]`.
fn word_mask(w: u64, first: u64, last: u64) -> u64 {
    let lo = first.saturating_sub(w * 64);
    let hi = if last < w * 64 + 63 {
        last - w * 64
    } else {
        63
    };
    let upto = if hi == 63 {
        u64::MAX
    } else {
        (1u64 << (hi + 1)) - 1
    };
    upto & !((1u64 << lo) - 1)
}

/// Appends the set bits of `newly` (bits of word `w`) to `runs`, merging
/// with the last run where they continue it.
fn push_runs(runs: &mut Vec<(u64, u64)>, w: u64, mut newly: u64) {
    while newly != 0 {
        let lo = newly.trailing_zeros() as u64;
        let len = (newly >> lo).trailing_ones() as u64;
        let first = w * 64 + lo;
        match runs.last_mut() {
            Some((f, n)) if *f + *n == first => *n += len,
            _ => runs.push((first, len)),
        }
        newly &= if lo + len >= 64 {
            0
        } else {
            !((1u64 << (lo + len)) - 1)
        };
    }
}

impl Overlay {
    /// Creates an empty overlay for a disk of `size` bytes in `dir`.
    pub fn create(dir: &Path, size: u64) -> Result<Self, OverlayError> {
        Self::create_in(Arc::new(RealFiles), dir, size)
    }

    /// Opens an existing overlay.
    pub fn open(dir: &Path) -> Result<Self, OverlayError> {
        Self::open_in(Arc::new(RealFiles), dir)
    }

    /// [`Overlay::create`] on the given files. Every file and directory
    /// entry is durable when it returns.
    pub fn create_in(files: Arc<dyn Files>, dir: &Path, size: u64) -> Result<Self, OverlayError> {
        files.create_dir(dir).map_err(io_at(dir))?;
        let data_path = dir.join("data");
        let data = files.open(&data_path, true).map_err(io_at(&data_path))?;
        data.set_len(size).map_err(io_at(&data_path))?;
        data.sync_data().map_err(io_at(&data_path))?;
        let meta_path = dir.join("meta");
        let meta = files.open(&meta_path, true).map_err(io_at(&meta_path))?;
        let words = vec![0u64; word_count(size) as usize];
        meta.write_at(&encode_meta(1, size, &words), 0)
            .map_err(io_at(&meta_path))?;
        meta.sync_data().map_err(io_at(&meta_path))?;
        let log_path = dir.join("log");
        let log = files.open(&log_path, true).map_err(io_at(&log_path))?;
        log.write_at(&encode_log_header(1, size), 0)
            .map_err(io_at(&log_path))?;
        log.sync_data().map_err(io_at(&log_path))?;
        let pending = Self::start_pending(&*files, dir, true, true)?;
        files.sync_dir(dir).map_err(io_at(dir))?;
        Ok(Self::assemble(
            dir,
            data,
            meta,
            log,
            pending,
            size,
            words,
            1,
            LOG_HEADER_LEN,
            0,
            false,
        ))
    }

    /// Opens (or creates) the pending file and, with `restart`, starts it
    /// again under this boot's id and a fresh nonce.
    fn start_pending(
        files: &dyn Files,
        dir: &Path,
        create: bool,
        restart: bool,
    ) -> Result<Pending, OverlayError> {
        let path = dir.join("pending");
        let file = files.open(&path, create).map_err(io_at(&path))?;
        let boot = files.boot_id().map_err(io_at(&path))?;
        let mut pending = Pending {
            file,
            boot,
            // Differs from any nonce this file had in this boot.
            nonce: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            len: 0,
            unprotected: false,
        };
        if restart {
            pending.restart().map_err(io_at(&path))?;
        }
        Ok(pending)
    }

    /// The runs a pending file holds that this boot wrote (nothing when the
    /// file is missing, torn, or of another boot).
    fn read_pending(files: &dyn Files, dir: &Path, granules: u64) -> Vec<(u64, u64)> {
        let path = dir.join("pending");
        if !files.exists(&path) {
            return Vec::new();
        }
        let Ok(file) = files.open(&path, false) else {
            return Vec::new();
        };
        let (Ok(len), Ok(boot)) = (file.len(), files.boot_id()) else {
            return Vec::new();
        };
        let mut header = vec![0u8; PENDING_HEADER_LEN as usize];
        if len < PENDING_HEADER_LEN || file.read_at(&mut header, 0).is_err() {
            return Vec::new();
        }
        let Ok((their_boot, nonce)) = decode_pending_header(&header) else {
            return Vec::new();
        };
        if their_boot != boot {
            return Vec::new();
        }
        // Bounded: the file is started again past PENDING_LIMIT, and a
        // record holds at most MAX_RUNS runs.
        let body_len = (len - PENDING_HEADER_LEN).min(PENDING_LIMIT + (MAX_RUNS as u64) * 16 + 64);
        let mut body = vec![0u8; body_len as usize];
        if file.read_at(&mut body, PENDING_HEADER_LEN).is_err() {
            return Vec::new();
        }
        decode_pending_records(&boot, nonce, &body, granules)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        dir: &Path,
        data: Arc<dyn FileHandle>,
        meta: Arc<dyn FileHandle>,
        log: Arc<dyn FileHandle>,
        pending: Pending,
        size: u64,
        words: Vec<u64>,
        generation: u64,
        log_len: u64,
        seq: u64,
        log_stale: bool,
    ) -> Self {
        let tracked = (0..words.len()).map(|_| AtomicU64::new(0)).collect();
        Overlay {
            dir: dir.to_owned(),
            data,
            meta,
            log,
            size,
            bits: words.into_iter().map(AtomicU64::new).collect(),
            durable: Mutex::new(Durable {
                generation,
                log_len,
                log_alloc: log_len,
                seq,
                log_stale,
            }),
            dirty: AtomicBool::new(false),
            fresh: Mutex::new(Vec::new()),
            tracked,
            tracking: AtomicBool::new(false),
            pending: Mutex::new(pending),
        }
    }

    /// [`Overlay::open`] on the given files: the newest valid checkpoint,
    /// then every intact record of the log on top of it.
    pub fn open_in(files: Arc<dyn Files>, dir: &Path) -> Result<Self, OverlayError> {
        let data_path = dir.join("data");
        let data = files.open(&data_path, false).map_err(io_at(&data_path))?;
        let meta_path = dir.join("meta");
        let meta = files.open(&meta_path, false).map_err(io_at(&meta_path))?;
        let meta_len = meta.len().map_err(io_at(&meta_path))?;
        let read_slot = |offset: u64| -> Option<Slot> {
            let mut head = [0u8; envelope::HEADER_LEN];
            meta.read_at(&mut head, offset).ok()?;
            let payload = u64::from_le_bytes(head[16..24].try_into().ok()?);
            let total = (envelope::HEADER_LEN + envelope::CHECKSUM_LEN) as u64 + payload;
            if offset + total > meta_len || payload > envelope::MAX_PAYLOAD {
                return None;
            }
            let mut buf = vec![0u8; total as usize];
            meta.read_at(&mut buf, offset).ok()?;
            decode_meta(&buf).ok()
        };
        // Slot A is at 0; its length tells where slot B starts. When A is
        // torn, B starts where A would end for the size the data file has.
        let a = read_slot(0);
        let size_hint = match &a {
            Some(s) => s.size,
            None => data.len().map_err(io_at(&data_path))?,
        };
        let b = read_slot(slot_len(size_hint));
        let any_v1 = a.iter().chain(b.iter()).any(|s| s.version < 2);
        let best = match (a, b) {
            (Some(a), Some(b)) => {
                if b.generation > a.generation {
                    b
                } else {
                    a
                }
            }
            (Some(s), None) | (None, Some(s)) => s,
            (None, None) => {
                return Err(OverlayError::NoValidSlot {
                    path: meta_path.clone(),
                })
            }
        };
        let Slot {
            generation,
            size,
            mut words,
            ..
        } = best;
        let granules = size.div_ceil(GRANULE);

        let log_path = dir.join("log");
        let log_exists = files.exists(&log_path);
        let log = files
            .open(&log_path, !log_exists)
            .map_err(io_at(&log_path))?;
        if !log_exists {
            files.sync_dir(dir).map_err(io_at(dir))?;
        }
        let log_len = log.len().map_err(io_at(&log_path))?;
        let mut header = vec![0u8; LOG_HEADER_LEN as usize];
        let header_ok = log_len >= LOG_HEADER_LEN
            && log.read_at(&mut header, 0).is_ok()
            && decode_log_header(&header).is_ok_and(|(_, s)| s == size);
        let (mut end, mut seq, mut stale) = (LOG_HEADER_LEN, 0, true);
        if header_ok {
            let (base, _) = decode_log_header(&header)?;
            if base > generation {
                // Records on a checkpoint that no slot holds any more: the
                // bits that checkpoint had are lost. Never guess.
                return Err(OverlayError::Malformed(
                    "the allocation log is newer than every metadata slot",
                ));
            }
            if base == generation {
                let mut body = vec![0u8; (log_len - LOG_HEADER_LEN) as usize];
                log.read_at(&mut body, LOG_HEADER_LEN)
                    .map_err(io_at(&log_path))?;
                let (runs, good, last_seq) = decode_records(base, &body, granules);
                for (first, n) in runs {
                    let last = first + n - 1;
                    for w in first / 64..=last / 64 {
                        words[w as usize] |= word_mask(w, first, last);
                    }
                }
                // What follows the good records (zeroes written ahead, a
                // torn record of a flush never acknowledged, records of an
                // older base) is overwritten by the next record: none of
                // it passes as a record (sequence and checksum, which
                // covers the base generation).
                end = LOG_HEADER_LEN + good as u64;
                seq = last_seq;
                stale = false;
            }
            // base < generation: a checkpoint was written but the log not
            // yet started again; the checkpoint holds all it says.
        }
        // What a process that died (not the machine) wrote and never
        // flushed: in the page cache, so in the files. Taken, then made
        // durable at once, before the pending file is started again.
        let unflushed = Self::read_pending(&*files, dir, granules);
        let pending_exists = files.exists(&dir.join("pending"));
        let pending = Self::start_pending(&*files, dir, !pending_exists, unflushed.is_empty())?;
        let overlay = Self::assemble(
            dir, data, meta, log, pending, size, words, generation, end, seq, stale,
        );
        overlay.durable.lock().log_alloc = log_len.max(end);
        if !unflushed.is_empty() {
            for &(first, n) in &unflushed {
                overlay.mark_bits(first, first + n - 1);
            }
            overlay.flush().map_err(io_at(&dir.join("log")))?;
            overlay
                .pending
                .lock()
                .restart()
                .map_err(io_at(&dir.join("pending")))?;
        }
        if stale || any_v1 || end > overlay.log_limit() {
            // Start the log again on a fresh checkpoint (twice for a
            // version 1 overlay, so no slot an older reader would take
            // stays behind).
            overlay.checkpoint_now()?;
            if any_v1 {
                overlay.checkpoint_now()?;
            }
        }
        Ok(overlay)
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

    /// True when every granule in `[first, last]` is allocated.
    pub fn all_allocated(&self, first: u64, last: u64) -> bool {
        (first / 64..=last / 64).all(|w| {
            let mask = word_mask(w, first, last);
            self.bits
                .get(w as usize)
                .is_some_and(|b| b.load(Ordering::Acquire) & mask == mask)
        })
    }

    /// Records a change to granules `[first, last]`: allocated from now on,
    /// dirty for the next flush, tracked while tracking. Call only after
    /// their data is in the data file.
    ///
    /// Granules it allocates are written to the pending file first, so
    /// that they survive the process (see the module doc); an error there
    /// (a full disk) fails the write, and the next one tries again.
    pub fn mark(&self, first: u64, last: u64) -> io::Result<()> {
        let mut pending = self.pending.lock();
        let fresh = self.mark_bits(first, last);
        if pending.unprotected {
            let all = self.fresh.lock().clone();
            pending.append(&all)?;
            pending.unprotected = false;
        } else if let Err(e) = pending.append(&fresh) {
            pending.unprotected = true;
            return Err(e);
        }
        Ok(())
    }

    /// Sets the bits of `[first, last]` (and the tracked ones), queues the
    /// newly allocated runs for the next flush and returns them.
    fn mark_bits(&self, first: u64, last: u64) -> Vec<(u64, u64)> {
        let mut fresh = Vec::new();
        for w in first / 64..=last / 64 {
            let Some(word) = self.bits.get(w as usize) else {
                break;
            };
            let mask = word_mask(w, first, last);
            // SeqCst with `start_tracking`: either this write sees tracking
            // on, or the bits `start_tracking` reads include this one.
            let old = word.fetch_or(mask, Ordering::SeqCst);
            push_runs(&mut fresh, w, mask & !old);
        }
        if !fresh.is_empty() {
            let mut all = self.fresh.lock();
            for &(f, n) in &fresh {
                match all.last_mut() {
                    Some((lf, ln)) if *lf + *ln == f => *ln += n,
                    _ => all.push((f, n)),
                }
            }
        }
        if self.tracking.load(Ordering::SeqCst) {
            for w in first / 64..=last / 64 {
                if let Some(t) = self.tracked.get(w as usize) {
                    t.fetch_or(word_mask(w, first, last), Ordering::SeqCst);
                }
            }
        }
        self.dirty.store(true, Ordering::SeqCst);
        fresh
    }

    /// Starts recording which granules are written from now on, and
    /// returns the granules that hold data now (the first pass of a copy).
    /// A write racing with this call shows up in one or both.
    pub fn start_tracking(&self) -> Vec<u64> {
        for w in &self.tracked {
            w.store(0, Ordering::SeqCst);
        }
        self.tracking.store(true, Ordering::SeqCst);
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
        self.tracking.store(false, Ordering::SeqCst);
    }

    /// Granules that hold overlay data.
    pub fn allocated_granules(&self) -> u64 {
        self.bits
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }

    pub fn read_data(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.data.read_at(buf, offset)
    }

    pub fn write_data(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.data.write_at(buf, offset)
    }

    /// Deallocates `[offset, offset+len)` in the data file (reads as zero).
    pub fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.data.punch_hole(offset, len)
    }

    /// Makes `[offset, offset+len)` of the data file read as zero while
    /// keeping it provisioned (NBD's NO_HOLE).
    pub fn zero_provisioned(&self, offset: u64, len: u64) -> io::Result<()> {
        self.data.zero_range(offset, len)
    }

    /// Where data (not a hole) starts in the data file at or after
    /// `offset`, and where it ends: for block status.
    pub fn data_run(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        match self.data.next_data(offset)? {
            Some(start) => Ok(Some((start, self.data.next_hole(start)?))),
            None => Ok(None),
        }
    }

    /// How long the log may grow before a checkpoint.
    fn log_limit(&self) -> u64 {
        slot_len(self.size).max(MIN_LOG_BEFORE_CHECKPOINT)
    }

    fn snapshot(&self) -> Vec<u64> {
        self.bits.iter().map(|w| w.load(Ordering::SeqCst)).collect()
    }

    /// Writes a checkpoint of the current bits and starts the log again,
    /// syncing the data file first.
    fn checkpoint_now(&self) -> Result<(), OverlayError> {
        let mut d = self.durable.lock();
        let words = self.snapshot();
        let path = self.dir.join("data");
        self.data.sync_data().map_err(io_at(&path))?;
        self.checkpoint(&mut d, &words)
            .map_err(io_at(&self.dir.join("meta")))
    }

    /// Writes `words` as the next checkpoint, then starts the log again
    /// on it. The data the words point at must be durable already.
    fn checkpoint(&self, d: &mut Durable, words: &[u64]) -> io::Result<()> {
        let next = d.generation + 1;
        let slot = if next % 2 == 1 {
            0
        } else {
            slot_len(self.size)
        };
        self.meta
            .write_at(&encode_meta(next, self.size, words), slot)?;
        self.meta.sync_data()?;
        d.generation = next;
        d.log_stale = true;
        // The old records stay in the file and fail their checksums under
        // the new base, so the log need not shrink (its blocks are reused).
        self.log.write_at(&encode_log_header(next, self.size), 0)?;
        self.log.sync_data()?;
        d.log_len = LOG_HEADER_LEN;
        d.seq = 0;
        d.log_stale = false;
        Ok(())
    }

    /// Makes every change so far durable (see the module doc for the order).
    pub fn flush(&self) -> io::Result<()> {
        let mut d = self.durable.lock();
        if !self.dirty.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        // A long pending file is started again by this flush: allocating
        // writes wait until it is done, so that none of them lands in the
        // file being dropped without being in the runs this flush logs.
        let restart = {
            let p = self.pending.lock();
            (p.len > PENDING_LIMIT).then_some(p)
        };
        let fresh = std::mem::take(&mut *self.fresh.lock());
        let record_len = (RECORD_HEADER + fresh.len() * RUN_LEN + 32) as u64;
        let checkpoint = !fresh.is_empty()
            && (d.log_stale
                || d.log_len + record_len > self.log_limit()
                || fresh.len() > MAX_RUNS as usize);
        // Taken before the data sync: every bit in it belongs to a write
        // whose data is in the file by then.
        let words = checkpoint.then(|| self.snapshot());
        let result = (|| {
            self.data.sync_data()?;
            if let Some(words) = &words {
                return self.checkpoint(&mut d, words);
            }
            if fresh.is_empty() {
                return Ok(());
            }
            let record = encode_record(d.generation, d.seq + 1, &fresh);
            if d.log_len + record.len() as u64 > d.log_alloc {
                let grow = LOG_PREALLOC.max(record.len() as u64);
                self.log.write_at(&vec![0u8; grow as usize], d.log_alloc)?;
                d.log_alloc += grow;
            }
            self.log.write_at(&record, d.log_len)?;
            self.log.sync_data()?;
            d.log_len += record.len() as u64;
            d.seq += 1;
            Ok(())
        })();
        if let (Ok(()), Some(mut p)) = (&result, restart) {
            // Not fatal: the records stay valid, the file only grows.
            if let Err(e) = p.restart() {
                tracing::debug!(error = %e, "starting the pending file again failed");
            }
        }
        if result.is_err() {
            // Try again at the next flush, with these runs first.
            let mut all = self.fresh.lock();
            let later = std::mem::replace(&mut *all, fresh);
            all.extend(later);
            self.dirty.store(true, Ordering::SeqCst);
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
        o.mark(1, 1).unwrap();
        assert!(o.take_tracked().is_empty(), "not tracking yet");
        assert_eq!(o.start_tracking(), vec![1]);
        o.mark(3, 4).unwrap();
        o.mark(70, 70).unwrap();
        assert_eq!(o.take_tracked(), vec![3, 4, 70]);
        assert!(o.take_tracked().is_empty());
        o.mark(1, 1).unwrap();
        assert_eq!(o.take_tracked(), vec![1]);
        o.stop_tracking();
        o.mark(2, 2).unwrap();
        assert!(o.take_tracked().is_empty());
        assert_eq!(o.start_tracking(), vec![1, 2, 3, 4, 70]);
    }

    #[test]
    fn masks_and_runs() {
        assert_eq!(word_mask(0, 0, 63), u64::MAX);
        assert_eq!(word_mask(0, 3, 4), 0b11000);
        assert_eq!(word_mask(1, 60, 130), u64::MAX);
        assert_eq!(word_mask(1, 70, 200), !0b11_1111);
        assert_eq!(word_mask(2, 0, 129), 0b11);
        let mut runs = Vec::new();
        push_runs(&mut runs, 0, 0b1110_0110 | (1 << 63));
        push_runs(&mut runs, 1, 0b1);
        assert_eq!(runs, vec![(1, 2), (5, 3), (63, 2)]);
    }

    #[test]
    fn flush_and_reopen_keeps_bits() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        let size = 1 << 20;
        {
            let o = Overlay::create(&p, size).unwrap();
            o.write_data(8192, &[1u8; 4096]).unwrap();
            o.mark(2, 2).unwrap();
            o.flush().unwrap();
            o.write_data(4096 * 5, &[2u8; 4096]).unwrap();
            o.mark(5, 5).unwrap();
            o.flush().unwrap();
        }
        let o = Overlay::open(&p).unwrap();
        assert!(o.is_allocated(2) && o.is_allocated(5) && !o.is_allocated(7));
        assert_eq!(o.allocated_granules(), 2);
        assert_eq!(o.size(), size);
    }

    #[test]
    fn a_process_that_dies_keeps_what_it_wrote_unflushed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        {
            let o = Overlay::create(&p, 1 << 20).unwrap();
            o.write_data(8192, &[1u8; 4096]).unwrap();
            o.mark(2, 2).unwrap();
            o.flush().unwrap();
            // Acknowledged, never flushed: the process dies here.
            o.write_data(4096 * 7, &[7u8; 4096]).unwrap();
            o.mark(7, 9).unwrap();
        }
        let o = Overlay::open(&p).unwrap();
        assert!(o.is_allocated(2) && o.all_allocated(7, 9));
        assert_eq!(o.allocated_granules(), 4);
        drop(o);
        // Taken into the log at that open: the pending file was started
        // again, and the bits stay.
        let o = Overlay::open(&p).unwrap();
        assert_eq!(o.allocated_granules(), 4);
    }

    #[test]
    fn pending_records_of_another_boot_or_torn_are_ignored() {
        use spore_files::fault::FaultFiles;
        let files = FaultFiles::new(7);
        let p = Path::new("/d");
        {
            let o = Overlay::create_in(Arc::new(files.clone()), p, 1 << 20).unwrap();
            o.mark(3, 3).unwrap();
        }
        // The same boot: taken.
        let o = Overlay::open_in(Arc::new(files.clone()), p).unwrap();
        assert!(o.is_allocated(3));
        o.mark(5, 5).unwrap();
        drop(o);
        // A power cut: the machine rebooted, an unflushed write may be
        // lost (granule 3 was made durable by the open above).
        files.crash();
        let o = Overlay::open_in(Arc::new(files.clone()), p).unwrap();
        assert!(o.is_allocated(3) && !o.is_allocated(5));
        o.mark(6, 6).unwrap();
        o.mark(8, 8).unwrap();
        drop(o);

        // Torn or flipped records: everything from the first bad one on
        // is ignored.
        let bytes = |files: &FaultFiles| {
            let f = files.open(&p.join("pending"), false).unwrap();
            let mut b = vec![0u8; f.len().unwrap() as usize];
            f.read_at(&mut b, 0).unwrap();
            (f, b)
        };
        let (f, mut b) = bytes(&files);
        let record = PENDING_RECORD_HEADER + RUN_LEN + 32;
        let second = PENDING_HEADER_LEN as usize + record;
        b[second + 9] ^= 0x40;
        f.write_at(&b, 0).unwrap();
        let o = Overlay::open_in(Arc::new(files.clone()), p).unwrap();
        assert!(o.is_allocated(6) && !o.is_allocated(8));
        // Malformed inputs decode to nothing rather than panic.
        let boot = files.boot_id().unwrap();
        for body in [
            &[][..],
            &[0xff; 7][..],
            &[1, 0, 0, 0, 0, 0, 0, 0][..],
            &[0xff; 100][..],
        ] {
            assert!(decode_pending_records(&boot, 1, body, 256).is_empty());
        }
        assert!(decode_pending_header(&[0u8; 10]).is_err());
    }

    #[test]
    fn a_long_pending_file_is_started_again_by_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        let o = Overlay::create(&p, 1 << 30).unwrap();
        let per = (PENDING_RECORD_HEADER + RUN_LEN + 32) as u64;
        let n = PENDING_LIMIT / per + 10;
        for i in 0..n {
            o.mark(i * 2, i * 2).unwrap();
        }
        assert!(o.pending.lock().len > PENDING_LIMIT);
        o.flush().unwrap();
        assert_eq!(o.pending.lock().len, PENDING_HEADER_LEN);
        o.mark(2 * n, 2 * n).unwrap();
        drop(o);
        let o = Overlay::open(&p).unwrap();
        assert_eq!(o.allocated_granules(), n + 1);
    }

    #[test]
    fn a_flush_writes_only_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        // 64 GiB: a 2 MiB bitmap that a flush must not rewrite.
        let size = 64 << 30;
        let o = Overlay::create(&p, size).unwrap();
        let meta_before = std::fs::read(p.join("meta")).unwrap();
        for g in [5u64, 6, 1 << 20, (size >> GRANULE_SHIFT) - 1] {
            o.write_data(g << GRANULE_SHIFT, &[9u8; 4096]).unwrap();
            o.mark(g, g).unwrap();
            o.flush().unwrap();
        }
        // Overwriting an allocated granule syncs data and logs nothing.
        let log_len = o.durable.lock().log_len;
        o.write_data(5 << GRANULE_SHIFT, &[8u8; 100]).unwrap();
        o.mark(5, 5).unwrap();
        o.flush().unwrap();
        assert_eq!(o.durable.lock().log_len, log_len);
        assert_eq!(std::fs::read(p.join("meta")).unwrap(), meta_before);
        assert!(log_len < 4 * 100, "{log_len} bytes of log for 4 records");
        drop(o);
        let o = Overlay::open(&p).unwrap();
        assert_eq!(o.allocated_granules(), 4);
        assert!(o.is_allocated((size >> GRANULE_SHIFT) - 1));
    }

    #[test]
    fn the_log_checkpoints_when_it_outgrows_the_bitmap() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        let size = 1 << 30;
        let o = Overlay::create(&p, size).unwrap();
        // Every other granule: one run per granule, 48 bytes a record.
        let n = 2 * MIN_LOG_BEFORE_CHECKPOINT / 48;
        for i in 0..n {
            o.mark(i * 2, i * 2).unwrap();
            o.flush().unwrap();
        }
        let log_len = o.durable.lock().log_len;
        assert!(log_len <= MIN_LOG_BEFORE_CHECKPOINT, "{log_len}");
        // The file itself grows by whole preallocations, never past the
        // limit by more than one.
        let file = std::fs::metadata(p.join("log")).unwrap().len();
        assert!(
            file <= MIN_LOG_BEFORE_CHECKPOINT + LOG_PREALLOC + 4096,
            "{file}"
        );
        assert!(o.durable.lock().generation > 1);
        drop(o);
        let o = Overlay::open(&p).unwrap();
        assert_eq!(o.allocated_granules(), n);
    }

    #[test]
    fn a_torn_record_is_cut_and_later_ones_follow_the_good() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        {
            let o = Overlay::create(&p, 1 << 20).unwrap();
            o.mark(1, 1).unwrap();
            o.flush().unwrap();
            o.mark(3, 3).unwrap();
            o.flush().unwrap();
        }
        // Tear the second record (one run: 64 bytes, after the first).
        {
            use std::os::unix::fs::FileExt;
            let log = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p.join("log"))
                .unwrap();
            let at = LOG_HEADER_LEN + 64 + 60;
            let mut b = [0u8; 1];
            log.read_exact_at(&mut b, at).unwrap();
            log.write_all_at(&[b[0] ^ 0xff], at).unwrap();
        }
        // A torn record is a power cut's: a reboot, so nothing pending
        // counts (granule 3 is in the pending file of this boot).
        std::fs::remove_file(p.join("pending")).unwrap();
        {
            let o = Overlay::open(&p).unwrap();
            assert!(o.is_allocated(1) && !o.is_allocated(3));
            o.mark(9, 9).unwrap();
            o.flush().unwrap();
        }
        let o = Overlay::open(&p).unwrap();
        assert!(o.is_allocated(1) && o.is_allocated(9) && !o.is_allocated(3));
    }

    #[test]
    fn a_version_1_overlay_opens_and_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        std::fs::create_dir_all(&p).unwrap();
        let size = 1u64 << 20;
        std::fs::write(p.join("data"), []).unwrap();
        std::fs::File::options()
            .write(true)
            .open(p.join("data"))
            .unwrap()
            .set_len(size)
            .unwrap();
        // A version 1 meta as the previous release wrote it: slot A only.
        let mut words = vec![0u64; word_count(size) as usize];
        words[0] = 0b1010;
        let mut payload = Vec::new();
        payload.extend_from_slice(&3u64.to_le_bytes());
        payload.extend_from_slice(&size.to_le_bytes());
        payload.extend_from_slice(&4096u32.to_le_bytes());
        payload.extend_from_slice(&0u32.to_le_bytes());
        for w in &words {
            payload.extend_from_slice(&w.to_le_bytes());
        }
        std::fs::write(p.join("meta"), envelope::seal(OVERLAY_MAGIC, 1, &payload)).unwrap();
        let o = Overlay::open(&p).unwrap();
        assert!(o.is_allocated(1) && o.is_allocated(3) && !o.is_allocated(2));
        o.mark(20, 20).unwrap();
        o.flush().unwrap();
        drop(o);
        // Both slots are version 2 now.
        let meta = std::fs::read(p.join("meta")).unwrap();
        let l = slot_len(size) as usize;
        assert_eq!(decode_meta(&meta[..l]).unwrap().version, 2);
        assert_eq!(decode_meta(&meta[l..2 * l]).unwrap().version, 2);
        let o = Overlay::open(&p).unwrap();
        assert_eq!(o.allocated_granules(), 3);
    }

    #[test]
    fn a_slot_torn_while_written_falls_back_to_the_other() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        let size = 1 << 20;
        {
            let o = Overlay::create(&p, size).unwrap();
            o.mark(1, 1).unwrap();
            o.checkpoint_now().unwrap(); // generation 2 -> slot B, log on 2
            o.mark(5, 5).unwrap();
            o.flush().unwrap(); // a record on generation 2
        }
        // A crash while generation 3 was being written to slot A.
        let meta = std::fs::OpenOptions::new()
            .write(true)
            .open(p.join("meta"))
            .unwrap();
        meta.write_all_at(&[0xff; 64], 30).unwrap();
        let o = Overlay::open(&p).unwrap();
        assert!(o.is_allocated(1) && o.is_allocated(5));
        assert_eq!(o.allocated_granules(), 2);
        o.checkpoint_now().unwrap(); // 3 -> A
        o.checkpoint_now().unwrap(); // 4 -> B, log on 4
        drop(o);
        // Tear a slot that was already durable (bit rot): the log is on a
        // generation no slot holds, so opening refuses rather than guess.
        meta.write_all_at(&[0xff; 64], slot_len(size) + 30).unwrap();
        assert!(matches!(Overlay::open(&p), Err(OverlayError::Malformed(_))));
        // Tear both: a clear error.
        meta.write_all_at(&[0xff; 64], 30).unwrap();
        meta.write_all_at(&[0xff; 64], slot_len(size) + 30).unwrap();
        assert!(matches!(
            Overlay::open(&p),
            Err(OverlayError::NoValidSlot { .. })
        ));
    }

    #[test]
    fn malformed_meta_and_log_are_rejected() {
        let good = encode_meta(1, 1 << 20, &vec![0; word_count(1 << 20) as usize]);
        assert!(decode_meta(&good).is_ok());
        assert!(decode_meta(&good[..40]).is_err());
        let wrong_size = encode_meta(1, 1 << 30, &[0; 2]);
        assert!(matches!(
            decode_meta(&wrong_size),
            Err(OverlayError::Malformed("bitmap length does not match size"))
        ));
        let header = encode_log_header(4, 1 << 20);
        assert_eq!(decode_log_header(&header).unwrap(), (4, 1 << 20));
        assert!(decode_log_header(&header[..30]).is_err());
        // Records: a run past the end, a wrong base, a wrong sequence.
        let granules = 256;
        let r = encode_record(4, 1, &[(10, 2)]);
        assert_eq!(decode_records(4, &r, granules).0, vec![(10, 2)]);
        assert!(decode_records(5, &r, granules).0.is_empty());
        assert!(
            decode_records(4, &encode_record(4, 2, &[(10, 2)]), granules)
                .0
                .is_empty()
        );
        assert!(
            decode_records(4, &encode_record(4, 1, &[(255, 2)]), granules)
                .0
                .is_empty()
        );
        assert!(
            decode_records(4, &encode_record(4, 1, &[(u64::MAX, 2)]), granules)
                .0
                .is_empty()
        );
        let mut two = r.clone();
        two.extend(encode_record(4, 2, &[(0, 1)]));
        assert_eq!(decode_records(4, &two, granules).0, vec![(10, 2), (0, 1)]);
        two.truncate(two.len() - 1);
        let (runs, good, seq) = decode_records(4, &two, granules);
        assert_eq!((runs, good, seq), (vec![(10, 2)], r.len(), 1));
    }
}
