//! A batch of disk blocks in flight between two hosts: how a live
//! migration carries the blocks a VM wrote (its overlay) from the source's
//! disk to the destination's.
//!
//! ```text
//! header   magic "SPBLOCKS" | version u16 | flags u16 (0) | count u32 | disk size u64
//! count ×  offset u64 | length u32 | data[length]
//! trailer  BLAKE3 of everything before it (32 bytes)
//! ```
//!
//! Little-endian. Offsets and lengths are whole 4 KiB granules (a length may
//! end at the disk's end instead), extents lie inside the disk, and a batch
//! carries at most [`MAX_BATCH_BYTES`] of data. The receiver checks all of
//! it, and the disk size against its own disk, before writing anything.

use crate::overlay::GRANULE;

pub const BATCH_MAGIC: &[u8; 8] = b"SPBLOCKS";
pub const BATCH_VERSION: u16 = 1;
pub const MAX_BATCH_BYTES: usize = 16 << 20;
const MAX_EXTENTS: u32 = 1 << 16;
const HEADER: usize = 24;
const FRAME: usize = 12;
const TRAILER: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error("block batch is truncated")]
    Truncated,
    #[error("not a block batch (bad magic)")]
    Magic,
    #[error("block batch version {0} is not supported (this build reads {BATCH_VERSION})")]
    Version(u16),
    #[error("block batch is malformed: {0}")]
    Malformed(String),
    #[error("block batch checksum does not match (corrupted in transit)")]
    Checksum,
    #[error("block batch is for a disk of {got} bytes, this disk has {want}")]
    DiskSize { got: u64, want: u64 },
}

/// Builds one batch.
#[derive(Debug)]
pub struct BatchWriter {
    buf: Vec<u8>,
    count: u32,
    disk_size: u64,
}

impl BatchWriter {
    pub fn new(disk_size: u64) -> Self {
        let mut buf = Vec::with_capacity(1 << 20);
        buf.extend_from_slice(BATCH_MAGIC);
        buf.extend_from_slice(&BATCH_VERSION.to_le_bytes());
        buf.extend_from_slice(&0u16.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        buf.extend_from_slice(&disk_size.to_le_bytes());
        BatchWriter {
            buf,
            count: 0,
            disk_size,
        }
    }

    pub fn push(&mut self, offset: u64, data: &[u8]) {
        self.buf.extend_from_slice(&offset.to_le_bytes());
        self.buf
            .extend_from_slice(&(data.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(data);
        self.count += 1;
    }

    /// Bytes of block data so far.
    pub fn data_bytes(&self) -> usize {
        self.buf.len() - HEADER - self.count as usize * FRAME
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.buf[12..16].copy_from_slice(&self.count.to_le_bytes());
        let sum = blake3::hash(&self.buf);
        self.buf.extend_from_slice(sum.as_bytes());
        self.buf
    }
}

/// Checks a batch for a disk of `disk_size` bytes and returns its extents.
pub fn decode_batch(bytes: &[u8], disk_size: u64) -> Result<Vec<(u64, &[u8])>, BatchError> {
    if bytes.len() < HEADER + TRAILER {
        return Err(BatchError::Truncated);
    }
    if &bytes[..8] != BATCH_MAGIC {
        return Err(BatchError::Magic);
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
    let version = u16_at(8);
    if version != BATCH_VERSION {
        return Err(BatchError::Version(version));
    }
    if u16_at(10) != 0 {
        return Err(BatchError::Malformed("unknown flags".into()));
    }
    let count = u32_at(12);
    let size = u64_at(16);
    let body_end = bytes.len() - TRAILER;
    if blake3::hash(&bytes[..body_end]).as_bytes() != &bytes[body_end..] {
        return Err(BatchError::Checksum);
    }
    if size != disk_size {
        return Err(BatchError::DiskSize {
            got: size,
            want: disk_size,
        });
    }
    if count > MAX_EXTENTS {
        return Err(BatchError::Malformed(format!("{count} extents")));
    }
    let mut out = Vec::with_capacity(count as usize);
    let mut at = HEADER;
    let mut data = 0usize;
    for i in 0..count {
        if at + FRAME > body_end {
            return Err(BatchError::Truncated);
        }
        let offset = u64_at(at);
        let len = u32_at(at + 8) as usize;
        at += FRAME;
        if len == 0 || len > body_end - at {
            return Err(BatchError::Malformed(format!(
                "extent {i}: length {len} does not fit the batch"
            )));
        }
        data += len;
        if data > MAX_BATCH_BYTES {
            return Err(BatchError::Malformed(format!(
                "more than {MAX_BATCH_BYTES} bytes of data"
            )));
        }
        let end = offset.checked_add(len as u64);
        let aligned = offset.is_multiple_of(GRANULE)
            && ((len as u64).is_multiple_of(GRANULE) || end == Some(disk_size));
        if !aligned || end.is_none_or(|e| e > disk_size) {
            return Err(BatchError::Malformed(format!(
                "extent {i} at {offset}+{len} is not whole granules inside the disk"
            )));
        }
        out.push((offset, &bytes[at..at + len]));
        at += len;
    }
    if at != body_end {
        return Err(BatchError::Malformed(format!(
            "{} bytes after the last extent",
            body_end - at
        )));
    }
    Ok(out)
}

/// Groups sorted granule numbers into runs of adjacent granules, each at
/// most `max_granules` long: (first granule, count).
pub fn granule_runs(granules: &[u64], max_granules: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &g in granules {
        match runs.last_mut() {
            Some((first, n)) if *first + *n == g && *n < max_granules => *n += 1,
            _ => runs.push((g, 1)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 20;

    fn sample() -> Vec<u8> {
        let mut w = BatchWriter::new(SIZE);
        w.push(0, &[1u8; 4096]);
        w.push(8192, &[2u8; 8192]);
        assert_eq!(w.data_bytes(), 12288);
        w.finish()
    }

    #[test]
    fn round_trip() {
        let b = sample();
        let ext = decode_batch(&b, SIZE).unwrap();
        assert_eq!(ext.len(), 2);
        assert_eq!(ext[0].0, 0);
        assert_eq!(ext[1], (8192, &[2u8; 8192][..]));
        let empty = BatchWriter::new(SIZE).finish();
        assert!(decode_batch(&empty, SIZE).unwrap().is_empty());
    }

    #[test]
    fn malformed_batches_are_refused() {
        let good = sample();
        assert_eq!(decode_batch(&good[..20], SIZE), Err(BatchError::Truncated));
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(decode_batch(&b, SIZE), Err(BatchError::Magic));
        let mut b = good.clone();
        b[8] = 9;
        assert_eq!(decode_batch(&b, SIZE), Err(BatchError::Version(9)));
        let mut b = good.clone();
        b[HEADER + FRAME + 10] ^= 1;
        assert_eq!(decode_batch(&b, SIZE), Err(BatchError::Checksum));
        assert!(matches!(
            decode_batch(&good, SIZE * 2),
            Err(BatchError::DiskSize { .. })
        ));
        // Structurally bad but correctly summed: the checks behind the sum.
        let resum = |mut b: Vec<u8>| {
            b.truncate(b.len() - TRAILER);
            let s = blake3::hash(&b);
            b.extend_from_slice(s.as_bytes());
            b
        };
        let mut w = BatchWriter::new(SIZE);
        w.push(100, &[0u8; 4096]);
        assert!(matches!(
            decode_batch(&w.finish(), SIZE),
            Err(BatchError::Malformed(_))
        ));
        let mut w = BatchWriter::new(SIZE);
        w.push(SIZE - 4096, &[0u8; 8192]);
        assert!(matches!(
            decode_batch(&w.finish(), SIZE),
            Err(BatchError::Malformed(_))
        ));
        let mut w = BatchWriter::new(SIZE);
        w.push(u64::MAX - 4095, &[0u8; 4096]);
        assert!(matches!(
            decode_batch(&w.finish(), SIZE),
            Err(BatchError::Malformed(_))
        ));
        // count larger than the frames present
        let mut b = good.clone();
        b[12] = 3;
        assert_eq!(decode_batch(&resum(b), SIZE), Err(BatchError::Truncated));
        // count smaller: bytes left over
        let mut b = good.clone();
        b[12] = 1;
        assert!(matches!(
            decode_batch(&resum(b), SIZE),
            Err(BatchError::Malformed(_))
        ));
        // a length that runs past the end
        let mut b = good.clone();
        b[HEADER + 8..HEADER + 12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_batch(&resum(b), SIZE),
            Err(BatchError::Malformed(_))
        ));
        let mut b = good;
        b[10] = 1;
        assert!(matches!(
            decode_batch(&resum(b), SIZE),
            Err(BatchError::Malformed(_))
        ));
    }

    #[test]
    fn a_short_last_granule_may_end_at_the_disk_end() {
        let size = 4096 * 3 + 512;
        let mut w = BatchWriter::new(size);
        w.push(4096 * 3, &[7u8; 512]);
        assert_eq!(decode_batch(&w.finish(), size).unwrap()[0].1.len(), 512);
    }

    #[test]
    fn runs_join_adjacent_granules_up_to_a_cap() {
        assert_eq!(
            granule_runs(&[1, 2, 3, 7, 8, 20], 2),
            vec![(1, 2), (3, 1), (7, 2), (20, 1)]
        );
        assert!(granule_runs(&[], 4).is_empty());
    }
}
