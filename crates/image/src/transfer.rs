//! Import of raw/qcow2 files into the store and export back out.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use spore_chunks::{ChunkId, ChunkStore};

use crate::image::{Image, ImageError, LayerStats, LayerWriter};
use crate::manifest::Manifest;
use crate::source::{Format, Source};

/// Default block size, chosen by `spore bench blockdev --block-sizes`
/// (see docs/benchmarks.md).
pub const DEFAULT_BLOCK_SIZE: u32 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("reading the source at offset {offset}")]
    Read {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("writing qcow2 {path}")]
    Qcow2 {
        path: String,
        #[source]
        source: spore_qcow2::Error,
    },
    #[error("the parent image is {parent} bytes; the new layer must not be smaller ({found})")]
    Shrink { parent: u64, found: u64 },
}

/// Reports progress as (bytes done, bytes total).
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// Result of an import or a commit.
#[derive(Debug, Clone)]
pub struct Published {
    pub id: ChunkId,
    pub manifest: Manifest,
    pub stats: LayerStats,
}

/// Imports `source` as a new layer on `parent` (or as a base image).
pub fn import(
    store: &ChunkStore,
    source: &dyn Source,
    source_name: &str,
    block_size: u32,
    parent: Option<&Image>,
    progress: Progress<'_>,
) -> Result<Published, TransferError> {
    let size = source.size();
    if let Some(p) = parent {
        if size < p.manifest.virtual_size {
            return Err(TransferError::Shrink {
                parent: p.manifest.virtual_size,
                found: size,
            });
        }
    }
    let writer = LayerWriter::new(store, parent, block_size, size)?;
    let bs = block_size as u64;
    let blocks = size.div_ceil(bs);
    let next = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    // Hashing and compression are CPU-bound: one worker per core.
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .min(8);
    const BATCH: u64 = 16;
    std::thread::scope(|scope| -> Result<(), TransferError> {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> Result<(), TransferError> {
                    let mut buf = vec![0u8; block_size as usize];
                    loop {
                        let first = next.fetch_add(BATCH, Ordering::Relaxed);
                        if first >= blocks {
                            return Ok(());
                        }
                        for block in first..(first + BATCH).min(blocks) {
                            let offset = block * bs;
                            let len = bs.min(size - offset) as usize;
                            let has = source
                                .may_have_data(offset, len as u64)
                                .map_err(|source| TransferError::Read { offset, source })?;
                            if has {
                                source
                                    .read_at(offset, &mut buf[..len])
                                    .map_err(|source| TransferError::Read { offset, source })?;
                                writer.add(block, &buf[..len])?;
                            } else {
                                writer.add_zero(block);
                            }
                            let d = done.fetch_add(len as u64, Ordering::Relaxed) + len as u64;
                            progress(d, size);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("import worker panicked")?;
        }
        Ok(())
    })?;
    let (id, manifest, stats) = writer.publish(source_name)?;
    Ok(Published {
        id,
        manifest,
        stats,
    })
}

/// Reads the contents of `block` of an image (zero-filled when it has none).
pub fn read_block(
    store: &ChunkStore,
    image: &Image,
    block: u64,
    buf: &mut [u8],
) -> Result<(), ImageError> {
    match image.flat.get(block) {
        None => buf.fill(0),
        Some(id) => {
            let data = store.get(id)?;
            let n = data.len().min(buf.len());
            buf[..n].copy_from_slice(&data[..n]);
            buf[n..].fill(0);
        }
    }
    Ok(())
}

/// Writes the image to `path` as raw (sparse) or qcow2.
pub fn export(
    store: &ChunkStore,
    image: &Image,
    path: &Path,
    format: Format,
    progress: Progress<'_>,
) -> Result<(), TransferError> {
    let shown = path.display().to_string();
    let wr = |source| TransferError::Write {
        path: shown.clone(),
        source,
    };
    let size = image.manifest.virtual_size;
    let bs = image.manifest.block_size as u64;
    let mut buf = vec![0u8; bs as usize];
    match format {
        Format::Raw => {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .map_err(wr)?;
            file.set_len(size).map_err(wr)?;
            for block in 0..image.flat.block_count() {
                let offset = block * bs;
                if image.flat.get(block).is_some() {
                    read_block(store, image, block, &mut buf)?;
                    let len = bs.min(size - offset) as usize;
                    file.write_all_at(&buf[..len], offset).map_err(wr)?;
                }
                progress((offset + bs).min(size), size);
            }
            file.sync_all().map_err(wr)?;
        }
        Format::Qcow2 => {
            let q = |source| TransferError::Qcow2 {
                path: shown.clone(),
                source,
            };
            // Clusters of at least 64 KiB (qcow2's default) and at most 2 MiB
            // (qcow2's limit); blocks are split or gathered to fit.
            let cluster = bs.clamp(64 * 1024, 2 << 20);
            let unit = bs.max(cluster);
            let mut writer = spore_qcow2::Qcow2Writer::create(path, size, cluster).map_err(q)?;
            let mut unit_buf = vec![0u8; unit as usize];
            let mut offset = 0;
            while offset < size {
                let first = offset / bs;
                let last = ((offset + unit).min(size)).div_ceil(bs);
                if (first..last).any(|b| image.flat.get(b).is_some()) {
                    for b in first..last {
                        let at = ((b - first) * bs) as usize;
                        read_block(store, image, b, &mut buf)?;
                        unit_buf[at..at + bs as usize].copy_from_slice(&buf);
                    }
                    for (i, c) in unit_buf.chunks(cluster as usize).enumerate() {
                        let coff = offset + i as u64 * cluster;
                        if coff < size && !spore_chunks::is_zero(c) {
                            writer.write_cluster(coff / cluster, c).map_err(q)?;
                        }
                    }
                }
                offset += unit;
                progress(offset.min(size), size);
            }
            writer.finish().map_err(q)?;
        }
    }
    Ok(())
}

/// Opens `path` for a quick size check without importing (used by callers
/// that want to report the size before starting).
pub fn source_size(path: &Path) -> io::Result<u64> {
    File::open(path)?.metadata().map(|m| m.len())
}
