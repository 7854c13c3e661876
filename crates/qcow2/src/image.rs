//! One qcow2 file, without its backing chain: guest offset to host offset
//! translation through the L1 and L2 tables, and reading of standard and
//! compressed clusters.
//!
//! Every offset that comes from the file is checked before use: L2 tables
//! must be cluster aligned, inside the file and clear of the header, L1 and
//! refcount tables; data clusters must start inside the file. Memory is
//! bounded by the header checks (L1 table) and a small L2 table cache.

use std::io::{self, Read};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::header::{Compression, Extent, Header};
use crate::source::ReadAt;
use crate::Error;

/// Bits 9..=55 of an L1 or standard L2 entry: the host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;
/// Memory we are willing to spend on cached L2 tables per image.
const L2_CACHE_BYTES: u64 = 8 * 1024 * 1024;
const L2_CACHE_MAX_TABLES: usize = 64;
/// Largest zstd window we accept: a cluster is at most 2 MiB, so QEMU's
/// frames never need more; a larger window in a frame is an attempt to make
/// us allocate.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// What backs a run of guest bytes in one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// Stored uncompressed at this host offset (for the first byte of the run).
    Data { host: u64 },
    /// Inside a compressed cluster described by this L2 entry.
    Compressed { entry: u64 },
    /// Reads as zeros; the backing file is not consulted.
    Zero,
    /// Not allocated here: read the backing file, or zeros.
    Unallocated,
}

struct L2Cache {
    capacity: usize,
    clock: u64,
    tables: Vec<(u64, u64, Arc<[u64]>)>,
}

/// One open qcow2 image file.
pub(crate) struct Image {
    source: Box<dyn ReadAt>,
    file_len: u64,
    header: Header,
    /// The L1 entries that cover the virtual disk, masked to their offsets.
    l1: Vec<u64>,
    l2_cache: Mutex<L2Cache>,
    /// The last decompressed cluster, keyed by its L2 entry: readers that
    /// read a compressed cluster in several pieces decompress it once.
    last_compressed: Mutex<Option<(u64, Arc<[u8]>)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data is a cache that is always left consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Image {
    pub fn open(source: Box<dyn ReadAt>) -> Result<Image, Error> {
        let file_len = source.len()?;
        let mut first = vec![0u8; file_len.min(1 << crate::header::MAX_CLUSTER_BITS) as usize];
        source.read_exact_at(&mut first, 0)?;
        let header = Header::parse(&first, file_len)?;
        // Only the part of the header cluster that exists matters.
        first.truncate(header.cluster_size().min(file_len) as usize);
        drop(first);

        let l1 = Self::load_l1(&*source, &header, file_len)?;
        let cluster_size = header.cluster_size();
        let capacity =
            (L2_CACHE_BYTES / cluster_size).clamp(2, L2_CACHE_MAX_TABLES as u64) as usize;
        Ok(Image {
            source,
            file_len,
            header,
            l1,
            l2_cache: Mutex::new(L2Cache {
                capacity,
                clock: 0,
                tables: Vec::with_capacity(capacity),
            }),
            last_compressed: Mutex::new(None),
        })
    }

    fn load_l1(source: &dyn ReadAt, header: &Header, file_len: u64) -> Result<Vec<u64>, Error> {
        // The header check bounds this by MAX_L1_ENTRIES and the file length.
        let needed = header.l1_entries_needed() as usize;
        let mut raw = vec![0u8; needed * 8];
        source.read_exact_at(&mut raw, header.l1_table_offset)?;
        let cluster_size = header.cluster_size();
        let forbidden = [
            (
                "header",
                Extent {
                    start: 0,
                    len: cluster_size,
                },
            ),
            ("L1 table", header.l1_extent()),
            ("refcount table", header.refcount_table_extent()),
        ];
        let mut l1 = Vec::with_capacity(needed);
        for (i, chunk) in raw.chunks_exact(8).enumerate() {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            let offset = u64::from_be_bytes(word) & OFFSET_MASK;
            if offset != 0 {
                if offset & (cluster_size - 1) != 0 {
                    return Err(Error::corrupt(format!(
                        "L2 table {i} at {offset:#x} not cluster aligned"
                    )));
                }
                let table = Extent {
                    start: offset,
                    len: cluster_size,
                };
                if table.end() > file_len {
                    return Err(Error::corrupt(format!(
                        "L2 table {i} at {offset:#x} beyond end of file"
                    )));
                }
                if let Some((what, _)) = forbidden.iter().find(|(_, e)| e.overlaps(&table)) {
                    return Err(Error::corrupt(format!(
                        "L2 table {i} at {offset:#x} overlaps the {what}"
                    )));
                }
            }
            l1.push(offset);
        }
        Ok(l1)
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Guest size; like QEMU, a partial last 512-byte sector is ignored.
    pub fn virtual_size(&self) -> u64 {
        self.header.size & !511
    }

    fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// Granularity of allocation: a subcluster with extended L2 entries, a
    /// cluster otherwise.
    fn unit_bits(&self) -> u32 {
        if self.header.extended_l2() {
            self.header.cluster_bits - 5
        } else {
            self.header.cluster_bits
        }
    }

    fn l2_table(&self, offset: u64) -> Result<Arc<[u64]>, Error> {
        {
            let mut cache = lock(&self.l2_cache);
            cache.clock += 1;
            let now = cache.clock;
            if let Some(entry) = cache.tables.iter_mut().find(|(o, _, _)| *o == offset) {
                entry.1 = now;
                return Ok(entry.2.clone());
            }
        }
        // Read outside the lock so other threads are not held up by I/O.
        let mut raw = vec![0u8; self.cluster_size() as usize];
        self.source.read_exact_at(&mut raw, offset)?;
        let table: Arc<[u64]> = raw
            .chunks_exact(8)
            .map(|c| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                u64::from_be_bytes(w)
            })
            .collect();
        let mut cache = lock(&self.l2_cache);
        cache.clock += 1;
        let now = cache.clock;
        if cache.tables.len() >= cache.capacity {
            if let Some(oldest) = cache
                .tables
                .iter()
                .enumerate()
                .min_by_key(|(_, (_, used, _))| *used)
                .map(|(i, _)| i)
            {
                cache.tables.swap_remove(oldest);
            }
        }
        cache.tables.push((offset, now, table.clone()));
        Ok(table)
    }

    /// Classifies one allocation unit (cluster or subcluster) from its L2
    /// entry, giving the host offset of the unit's first byte for data.
    fn classify(&self, table: &[u64], l2_index: usize, sub: u64) -> Result<Mapping, Error> {
        let ext = self.header.extended_l2();
        let entry = if ext {
            table[2 * l2_index]
        } else {
            table[l2_index]
        };
        if entry & L2_COMPRESSED != 0 {
            self.check_compressed(entry)?;
            return Ok(Mapping::Compressed { entry });
        }
        let host = entry & OFFSET_MASK;
        let check_host = |host: u64| -> Result<(), Error> {
            if host & (self.cluster_size() - 1) != 0 {
                return Err(Error::corrupt(format!(
                    "data cluster at {host:#x} not cluster aligned"
                )));
            }
            if host >= self.file_len {
                return Err(Error::corrupt(format!(
                    "data cluster at {host:#x} beyond end of file"
                )));
            }
            Ok(())
        };
        if ext {
            let bitmap = table[2 * l2_index + 1];
            let alloc = bitmap & (1 << sub) != 0;
            let zero = bitmap & (1 << (32 + sub)) != 0;
            match (alloc, zero) {
                (true, true) => Err(Error::corrupt(
                    "subcluster both allocated and zero".to_string(),
                )),
                (true, false) => {
                    if host == 0 {
                        return Err(Error::corrupt("allocated subcluster without host cluster"));
                    }
                    check_host(host)?;
                    Ok(Mapping::Data {
                        host: host + (sub << self.unit_bits()),
                    })
                }
                (false, true) => Ok(Mapping::Zero),
                (false, false) => Ok(Mapping::Unallocated),
            }
        } else if entry & L2_ZERO != 0 {
            Ok(Mapping::Zero)
        } else if host == 0 {
            Ok(Mapping::Unallocated)
        } else {
            check_host(host)?;
            Ok(Mapping::Data { host })
        }
    }

    /// Maps guest bytes `offset..offset + max_len` (inside the virtual
    /// size, `max_len > 0`): returns how the first byte is backed and how
    /// many bytes from `offset` (at most `max_len`) are backed the same way
    /// (for data: contiguously on the host).
    pub fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64), Error> {
        let cluster_bits = self.header.cluster_bits;
        let unit_bits = self.unit_bits();
        let units_per_cluster = 1u64 << (cluster_bits - unit_bits);
        let l2_entries = self.header.l2_entries();
        let cluster = offset >> cluster_bits;
        let l1_index = (cluster / l2_entries) as usize;
        let Some(&l2_offset) = self.l1.get(l1_index) else {
            return Err(Error::corrupt("guest offset beyond the L1 table"));
        };
        // Guest bytes covered by this L2 table end here.
        let table_end = ((l1_index as u64 + 1) * l2_entries)
            .checked_shl(cluster_bits)
            .unwrap_or(u64::MAX);
        let limit = offset.saturating_add(max_len).min(table_end);
        if l2_offset == 0 {
            return Ok((Mapping::Unallocated, limit - offset));
        }
        let table = self.l2_table(l2_offset)?;

        let unit_of = |guest: u64| {
            let cluster = guest >> cluster_bits;
            let l2_index = (cluster % l2_entries) as usize;
            let sub = (guest >> unit_bits) & (units_per_cluster - 1);
            (l2_index, sub)
        };
        let (l2_index, sub) = unit_of(offset);
        let first = self.classify(&table, l2_index, sub)?;
        let unit_size = 1u64 << unit_bits;
        let within = offset & (unit_size - 1);
        let first = match first {
            Mapping::Data { host } => Mapping::Data {
                host: host + within,
            },
            other => other,
        };
        let mut end = (offset - within + unit_size).min(limit);
        if let Mapping::Compressed { .. } = first {
            // A compressed cluster is one unit of a full cluster.
            let cluster_end = ((cluster + 1) << cluster_bits).min(limit);
            return Ok((first, cluster_end - offset));
        }
        while end < limit {
            let (l2_index, sub) = unit_of(end);
            let next = self.classify(&table, l2_index, sub)?;
            let same = match (first, next) {
                (Mapping::Data { host }, Mapping::Data { host: next_host }) => {
                    next_host == host + (end - offset)
                }
                (Mapping::Zero, Mapping::Zero) | (Mapping::Unallocated, Mapping::Unallocated) => {
                    true
                }
                _ => false,
            };
            if !same {
                break;
            }
            end = (end + unit_size).min(limit);
        }
        Ok((first, end - offset))
    }

    /// Reads uncompressed data at `host`; bytes past the end of the file
    /// read as zeros (QEMU may leave the tail of the last cluster unwritten).
    pub fn read_data(&self, host: u64, buf: &mut [u8]) -> Result<(), Error> {
        let available = self.file_len.saturating_sub(host);
        let in_file = (buf.len() as u64).min(available) as usize;
        let (head, tail) = buf.split_at_mut(in_file);
        self.source.read_exact_at(head, host)?;
        tail.fill(0);
        Ok(())
    }

    fn compressed_location(&self, entry: u64) -> (u64, u64) {
        let cluster_bits = self.header.cluster_bits;
        let shift = 62 - (cluster_bits - 8);
        let host = entry & ((1u64 << shift) - 1);
        let sectors = ((entry >> shift) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
        let len = sectors * 512 - (host & 511);
        (host, len)
    }

    fn check_compressed(&self, entry: u64) -> Result<(), Error> {
        let (host, _) = self.compressed_location(entry);
        if host >= self.file_len || host < self.cluster_size() {
            return Err(Error::corrupt(format!(
                "compressed cluster at {host:#x} outside the file data"
            )));
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes starting `within` bytes into the compressed
    /// cluster described by `entry`.
    pub fn read_compressed(&self, entry: u64, within: u64, buf: &mut [u8]) -> Result<(), Error> {
        let cluster = self.decompress(entry)?;
        let start = within as usize;
        let Some(part) = cluster.get(start..start + buf.len()) else {
            return Err(Error::corrupt("read beyond a compressed cluster"));
        };
        buf.copy_from_slice(part);
        Ok(())
    }

    fn decompress(&self, entry: u64) -> Result<Arc<[u8]>, Error> {
        if let Some((cached, data)) = &*lock(&self.last_compressed) {
            if *cached == entry {
                return Ok(data.clone());
            }
        }
        let (host, len) = self.compressed_location(entry);
        // The last sectors of the last compressed cluster may be cut off by
        // the end of the file; decompression stops once it has a cluster.
        let len = len.min(self.file_len.saturating_sub(host));
        let mut input = vec![0u8; len as usize];
        self.source.read_exact_at(&mut input, host)?;
        let mut out = vec![0u8; self.cluster_size() as usize];
        let result = match self.header.compression {
            Compression::Deflate => inflate(&input, &mut out),
            Compression::Zstd => unzstd(&input, &mut out),
        };
        result.map_err(|source| Error::Decompress {
            host_offset: host,
            source,
        })?;
        let data: Arc<[u8]> = out.into();
        *lock(&self.last_compressed) = Some((entry, data.clone()));
        Ok(data)
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> io::Result<()> {
    let mut d = flate2::Decompress::new(false);
    d.decompress(input, out, flate2::FlushDecompress::Finish)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if d.total_out() != out.len() as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "deflate stream shorter than a cluster",
        ));
    }
    Ok(())
}

fn unzstd(input: &[u8], out: &mut [u8]) -> io::Result<()> {
    let mut d = zstd::stream::read::Decoder::with_buffer(input)?;
    d.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
    d.read_exact(out)
}
