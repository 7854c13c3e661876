//! Writes a compact qcow2 version 3 image from a stream of guest clusters.
//!
//! Layout, in host clusters:
//!
//! ```text
//! [header] [data clusters, in the order written] [L2 tables] [L1 table]
//! [refcount table] [refcount blocks]
//! ```
//!
//! Data goes to disk as it arrives; only the L2 tables (one entry per
//! written cluster) stay in memory. All metadata is written by `finish`,
//! the header last, so a file whose writer never finished has no qcow2
//! magic and cannot be mistaken for a complete image. Every cluster in the
//! file is referenced exactly once, so the refcount blocks are all ones.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::header::{NewHeader, MAX_CLUSTER_BITS, MAX_L1_ENTRIES, MIN_CLUSTER_BITS};
use crate::Error;

/// The cluster size `qemu-img` uses by default.
pub const DEFAULT_CLUSTER_SIZE: u64 = 64 * 1024;

/// "Refcount is exactly one" flag of L1 and L2 entries.
const COPIED: u64 = 1 << 63;
/// 16-bit refcounts, QEMU's default.
const REFCOUNT_ORDER: u32 = 4;
const REFCOUNT_BYTES: u64 = 2;

/// Writes a qcow2 v3 image; see the module docs for the layout.
///
/// Clusters that are all zeros are not stored (they read as zeros because
/// the image has no backing file). Call [`finish`](Self::finish) to make
/// the file a valid image.
pub struct Qcow2Writer {
    file: File,
    path: PathBuf,
    /// The size asked for; `virtual_size` is this rounded up to a sector.
    requested_size: u64,
    virtual_size: u64,
    cluster_bits: u32,
    l1_size: u64,
    /// Next free host cluster.
    next_cluster: u64,
    /// L2 tables by L1 index, only for tables that map some data.
    l2: BTreeMap<u64, Box<[u64]>>,
    /// A partly filled cluster from `write_at`: (index, bytes).
    pending: Option<(u64, Vec<u8>)>,
    /// End of the last `write_at`, which must not go backwards.
    write_end: u64,
}

impl std::fmt::Debug for Qcow2Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Writer")
            .field("path", &self.path)
            .field("virtual_size", &self.virtual_size)
            .field("cluster_size", &self.cluster_size())
            .field("data_clusters", &self.next_cluster.saturating_sub(1))
            .finish()
    }
}

fn is_zero(data: &[u8]) -> bool {
    // OR-folding fixed chunks vectorizes well and still stops early on data.
    data.chunks(64)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

impl Qcow2Writer {
    /// Creates (or truncates) `path` for an image of `virtual_size` bytes
    /// with clusters of `cluster_size` bytes (a power of two, 512 B to 2 MiB).
    ///
    /// The size is rounded up to whole 512-byte sectors: QEMU ignores a
    /// partial last sector, which would hide the end of the data.
    pub fn create(
        path: impl AsRef<Path>,
        virtual_size: u64,
        cluster_size: u64,
    ) -> Result<Self, Error> {
        let path = path.as_ref().to_owned();
        if !cluster_size.is_power_of_two()
            || !((1 << MIN_CLUSTER_BITS)..=(1 << MAX_CLUSTER_BITS)).contains(&cluster_size)
        {
            return Err(Error::InvalidClusterSize(cluster_size));
        }
        let requested_size = virtual_size;
        let virtual_size = virtual_size
            .checked_next_multiple_of(512)
            .ok_or(Error::VirtualSizeTooLarge(virtual_size))?;
        let cluster_bits = cluster_size.trailing_zeros();
        let l2_entries = cluster_size / 8;
        let l1_size = virtual_size.div_ceil(cluster_size).div_ceil(l2_entries);
        if l1_size > MAX_L1_ENTRIES {
            return Err(Error::VirtualSizeTooLarge(virtual_size));
        }
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|source| Error::Open {
                path: path.clone(),
                source,
            })?;
        Ok(Qcow2Writer {
            file,
            path,
            requested_size,
            virtual_size,
            cluster_bits,
            l1_size,
            next_cluster: 1,
            l2: BTreeMap::new(),
            pending: None,
            write_end: 0,
        })
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Number of guest clusters (the last one may be partial).
    pub fn cluster_count(&self) -> u64 {
        self.virtual_size.div_ceil(self.cluster_size())
    }

    /// Guest bytes in cluster `index`: a full cluster except perhaps the last.
    fn cluster_len(&self, index: u64) -> u64 {
        let start = index << self.cluster_bits;
        (self.virtual_size - start).min(self.cluster_size())
    }

    /// Stores guest cluster `index`. `data` is a whole cluster, or for the
    /// last cluster of an image whose size is not a multiple of the cluster
    /// size, anything from the bytes inside the image to a whole cluster
    /// (the rest reads as zeros). All-zero data is not stored. Each cluster
    /// may be written once.
    pub fn write_cluster(&mut self, index: u64, data: &[u8]) -> Result<(), Error> {
        let cluster_size = self.cluster_size();
        if index >= self.cluster_count() {
            return Err(Error::OutOfRange {
                offset: index << self.cluster_bits,
                len: data.len() as u64,
                size: self.virtual_size,
            });
        }
        let len = data.len() as u64;
        let last = index + 1 == self.cluster_count();
        let min_len = if last {
            self.requested_size - (index << self.cluster_bits)
        } else {
            cluster_size
        };
        if len < min_len || len > cluster_size {
            return Err(Error::BadClusterLength {
                len: data.len(),
                min: min_len as usize,
                max: cluster_size as usize,
            });
        }
        if is_zero(data) {
            return Ok(());
        }
        let l2_entries = cluster_size / 8;
        let table = self
            .l2
            .entry(index / l2_entries)
            .or_insert_with(|| vec![0u64; l2_entries as usize].into_boxed_slice());
        let slot = &mut table[(index % l2_entries) as usize];
        if *slot != 0 {
            return Err(Error::ClusterWrittenTwice { index });
        }
        let host = self.next_cluster << self.cluster_bits;
        self.file.write_all_at(data, host)?;
        if len < cluster_size {
            // Keep the file made of whole clusters.
            let pad = vec![0u8; (cluster_size - len) as usize];
            self.file.write_all_at(&pad, host + len)?;
        }
        *slot = host | COPIED;
        self.next_cluster += 1;
        Ok(())
    }

    /// Stores guest bytes at `offset`, for writers whose pieces do not line
    /// up with clusters. Calls must go forwards: each `offset` at or after
    /// the end of the previous `write_at`. Gaps read as zeros.
    pub fn write_at(&mut self, offset: u64, mut data: &[u8]) -> Result<(), Error> {
        let len = data.len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= self.virtual_size => {}
            _ => {
                return Err(Error::OutOfRange {
                    offset,
                    len,
                    size: self.virtual_size,
                })
            }
        }
        if offset < self.write_end {
            return Err(Error::WriteNotSequential {
                offset,
                previous_end: self.write_end,
            });
        }
        let mut pos = offset;
        while !data.is_empty() {
            let index = pos >> self.cluster_bits;
            let within = pos & (self.cluster_size() - 1);
            let guest_len = self.cluster_len(index);
            if matches!(&self.pending, Some((i, _)) if *i != index) {
                self.flush_pending()?;
            }
            let take = (guest_len - within).min(data.len() as u64) as usize;
            if within == 0 && take as u64 == guest_len && self.pending.is_none() {
                self.write_cluster(index, &data[..take])?;
            } else {
                let (_, buf) = self
                    .pending
                    .get_or_insert_with(|| (index, vec![0u8; guest_len as usize]));
                buf[within as usize..within as usize + take].copy_from_slice(&data[..take]);
                if within + take as u64 == guest_len {
                    self.flush_pending()?;
                }
            }
            pos += take as u64;
            data = &data[take..];
        }
        self.write_end = offset + len;
        Ok(())
    }

    fn flush_pending(&mut self) -> Result<(), Error> {
        if let Some((index, buf)) = self.pending.take() {
            self.write_cluster(index, &buf)?;
        }
        Ok(())
    }

    /// Writes the metadata and the header, and syncs the file to disk.
    pub fn finish(mut self) -> Result<(), Error> {
        self.flush_pending()?;
        let cluster_size = self.cluster_size();

        // L2 tables, in guest order.
        let mut l1 = vec![0u64; self.l1_size as usize];
        let tables = std::mem::take(&mut self.l2);
        for (l1_index, table) in &tables {
            let host = self.next_cluster << self.cluster_bits;
            let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.file.write_all_at(&bytes, host)?;
            l1[*l1_index as usize] = host | COPIED;
            self.next_cluster += 1;
        }
        drop(tables);

        // L1 table (none for an empty disk: an unreferenced cluster would
        // count as leaked).
        let l1_clusters = (self.l1_size * 8).div_ceil(cluster_size);
        let l1_offset = if l1_clusters == 0 {
            0
        } else {
            self.next_cluster << self.cluster_bits
        };
        let mut l1_bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        l1_bytes.resize((l1_clusters * cluster_size) as usize, 0);
        self.file.write_all_at(&l1_bytes, l1_offset)?;
        drop(l1_bytes);
        self.next_cluster += l1_clusters;

        // Refcount table and blocks must count themselves: grow both until
        // they cover every cluster of the file.
        let base = self.next_cluster;
        let per_block = cluster_size / REFCOUNT_BYTES;
        let (mut table_clusters, mut blocks) = (1u64, 1u64);
        loop {
            let total = base + table_clusters + blocks;
            let need_blocks = total.div_ceil(per_block);
            let need_table = (need_blocks * 8).div_ceil(cluster_size);
            if need_blocks <= blocks && need_table <= table_clusters {
                break;
            }
            blocks = need_blocks.max(blocks);
            table_clusters = need_table.max(table_clusters);
        }
        let total = base + table_clusters + blocks;
        let table_offset = base << self.cluster_bits;
        let first_block = base + table_clusters;
        let mut table = vec![0u8; (table_clusters * cluster_size) as usize];
        for (i, slot) in table.chunks_exact_mut(8).take(blocks as usize).enumerate() {
            let block_offset = (first_block + i as u64) << self.cluster_bits;
            slot.copy_from_slice(&block_offset.to_be_bytes());
        }
        self.file.write_all_at(&table, table_offset)?;
        drop(table);
        let mut block = vec![0u8; cluster_size as usize];
        for i in 0..blocks {
            let first = i * per_block;
            let counted = total.saturating_sub(first).min(per_block) as usize;
            block.fill(0);
            for entry in block
                .chunks_exact_mut(REFCOUNT_BYTES as usize)
                .take(counted)
            {
                entry.copy_from_slice(&1u16.to_be_bytes());
            }
            self.file
                .write_all_at(&block, (first_block + i) << self.cluster_bits)?;
        }
        self.file.set_len(total << self.cluster_bits)?;
        self.file.sync_data()?;

        let header = NewHeader {
            cluster_bits: self.cluster_bits,
            size: self.virtual_size,
            l1_size: self.l1_size as u32,
            l1_table_offset: l1_offset,
            refcount_table_offset: table_offset,
            refcount_table_clusters: table_clusters as u32,
            refcount_order: REFCOUNT_ORDER,
        }
        .encode();
        self.file.write_all_at(&header, 0)?;
        self.file.sync_all()?;
        tracing::debug!(
            path = %self.path.display(),
            clusters = total,
            "wrote qcow2 image"
        );
        Ok(())
    }
}
