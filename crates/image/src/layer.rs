//! Layers: sparse maps from block index to chunk.
//!
//! A layer records, for the blocks it changes, either the chunk that now
//! holds the block or that the block is now zero (which masks whatever a
//! lower layer had there). Blocks it does not mention show through from
//! below. A layer is stored as a chunk in the chunk store, so layers are
//! content-addressed and deduplicated like data.
//!
//! Payload (inside the envelope, magic `SPLAYER\0`, version 1, all little
//! endian):
//!
//! ```text
//! u32 block_size | u32 reserved (0) | u64 virtual_size
//! u32 chunk_count | u32 reserved (0) | u64 entry_count
//! chunk_count × [u8; 32]      distinct chunk ids
//! entry_count × (u64 block, u32 ref)   strictly increasing blocks;
//!                                      ref 0 = zero, ref i = chunk i-1
//! ```

use std::collections::HashMap;

use spore_chunks::ChunkId;

use crate::envelope::{self, EnvelopeError};

pub const LAYER_MAGIC: &[u8; 8] = b"SPLAYER\0";
pub const LAYER_VERSION: u16 = 1;
pub const MIN_BLOCK_SIZE: u32 = 4096;
pub const MAX_BLOCK_SIZE: u32 = 4 << 20;

/// What a layer says about one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Zero,
    Chunk(ChunkId),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayerError {
    #[error("layer envelope")]
    Envelope(#[from] EnvelopeError),
    #[error("malformed layer: {0}")]
    Malformed(&'static str),
    #[error("block size {0} is not a power of two between 4 KiB and 4 MiB")]
    BlockSize(u32),
}

/// Checks that a block size is one spore supports.
pub fn check_block_size(block_size: u32) -> Result<(), LayerError> {
    if block_size.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        Ok(())
    } else {
        Err(LayerError::BlockSize(block_size))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    block_size: u32,
    virtual_size: u64,
    chunks: Vec<ChunkId>,
    /// (block, ref) sorted by block; ref 0 = zero.
    entries: Vec<(u64, u32)>,
}

impl Layer {
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    pub fn block_count(&self) -> u64 {
        self.virtual_size.div_ceil(self.block_size as u64)
    }

    /// Number of blocks the layer mentions.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Distinct chunks the layer refers to.
    pub fn chunks(&self) -> &[ChunkId] {
        &self.chunks
    }

    /// The layer's entries in block order.
    pub fn entries(&self) -> impl Iterator<Item = (u64, Entry)> + '_ {
        self.entries.iter().map(|&(block, r)| {
            let entry = if r == 0 {
                Entry::Zero
            } else {
                Entry::Chunk(self.chunks[r as usize - 1])
            };
            (block, entry)
        })
    }

    /// Entries as (block, index into `chunks()` + 1, or 0 for zero).
    pub(crate) fn raw_entries(&self) -> &[(u64, u32)] {
        &self.entries
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(32 + self.chunks.len() * 32 + self.entries.len() * 12);
        p.extend_from_slice(&self.block_size.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&self.virtual_size.to_le_bytes());
        p.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for c in &self.chunks {
            p.extend_from_slice(c.as_bytes());
        }
        for &(block, r) in &self.entries {
            p.extend_from_slice(&block.to_le_bytes());
            p.extend_from_slice(&r.to_le_bytes());
        }
        envelope::seal(LAYER_MAGIC, LAYER_VERSION, &p)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, LayerError> {
        let (_, p) = envelope::open(LAYER_MAGIC, LAYER_VERSION, bytes)?;
        let mal = LayerError::Malformed;
        if p.len() < 32 {
            return Err(mal("short header"));
        }
        let u32_at = |o: usize| u32::from_le_bytes(p[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(p[o..o + 8].try_into().expect("8 bytes"));
        let block_size = u32_at(0);
        check_block_size(block_size)?;
        let virtual_size = u64_at(8);
        let chunk_count = u32_at(16) as u64;
        let entry_count = u64_at(24);
        let expected = 32u64
            .checked_add(chunk_count * 32)
            .and_then(|n| entry_count.checked_mul(12).and_then(|e| n.checked_add(e)))
            .ok_or(mal("counts overflow"))?;
        if expected != p.len() as u64 {
            return Err(mal("counts do not match length"));
        }
        let block_count = virtual_size.div_ceil(block_size as u64);
        let mut chunks = Vec::with_capacity(chunk_count as usize);
        let mut off = 32;
        for _ in 0..chunk_count {
            chunks.push(ChunkId(p[off..off + 32].try_into().expect("32 bytes")));
            off += 32;
        }
        let mut entries = Vec::with_capacity(entry_count as usize);
        let mut prev: Option<u64> = None;
        for _ in 0..entry_count {
            let block = u64_at(off);
            let r = u32_at(off + 8);
            off += 12;
            if block >= block_count {
                return Err(mal("block beyond virtual size"));
            }
            if prev.is_some_and(|p| p >= block) {
                return Err(mal("blocks not strictly increasing"));
            }
            if r as u64 > chunk_count {
                return Err(mal("chunk reference out of range"));
            }
            prev = Some(block);
            entries.push((block, r));
        }
        Ok(Layer {
            block_size,
            virtual_size,
            chunks,
            entries,
        })
    }
}

/// Collects entries (in any order) into a [`Layer`].
#[derive(Debug)]
pub struct LayerBuilder {
    block_size: u32,
    virtual_size: u64,
    chunks: Vec<ChunkId>,
    index: HashMap<ChunkId, u32>,
    entries: Vec<(u64, u32)>,
}

impl LayerBuilder {
    pub fn new(block_size: u32, virtual_size: u64) -> Result<Self, LayerError> {
        check_block_size(block_size)?;
        Ok(LayerBuilder {
            block_size,
            virtual_size,
            chunks: Vec::new(),
            index: HashMap::new(),
            entries: Vec::new(),
        })
    }

    /// Records `entry` for `block`; a later call for the same block wins.
    pub fn set(&mut self, block: u64, entry: Entry) {
        let r = match entry {
            Entry::Zero => 0,
            Entry::Chunk(id) => *self.index.entry(id).or_insert_with(|| {
                self.chunks.push(id);
                self.chunks.len() as u32
            }),
        };
        self.entries.push((block, r));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn finish(mut self) -> Layer {
        // Stable sort keeps insertion order among equal blocks; keep the last.
        self.entries.sort_by_key(|&(b, _)| b);
        let mut entries: Vec<(u64, u32)> = Vec::with_capacity(self.entries.len());
        for e in self.entries {
            match entries.last_mut() {
                Some(last) if last.0 == e.0 => *last = e,
                _ => entries.push(e),
            }
        }
        let block_count = self.virtual_size.div_ceil(self.block_size as u64);
        entries.retain(|&(b, _)| b < block_count);
        Layer {
            block_size: self.block_size,
            virtual_size: self.virtual_size,
            chunks: self.chunks,
            entries,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Layer {
        let mut b = LayerBuilder::new(65536, 10 * 65536 + 100).unwrap();
        let a = ChunkId::of(b"a");
        b.set(3, Entry::Chunk(a));
        b.set(1, Entry::Zero);
        b.set(10, Entry::Chunk(a));
        b.set(3, Entry::Chunk(ChunkId::of(b"b")));
        b.finish()
    }

    #[test]
    fn builder_sorts_and_last_wins() {
        let l = sample();
        let e: Vec<_> = l.entries().collect();
        assert_eq!(
            e,
            vec![
                (1, Entry::Zero),
                (3, Entry::Chunk(ChunkId::of(b"b"))),
                (10, Entry::Chunk(ChunkId::of(b"a")))
            ]
        );
        assert_eq!(l.block_count(), 11);
    }

    #[test]
    fn roundtrip() {
        let l = sample();
        assert_eq!(Layer::decode(&l.encode()).unwrap(), l);
    }

    #[test]
    fn rejects_malformed() {
        let l = sample();
        let reseal = |f: &dyn Fn(&mut Vec<u8>)| {
            let enc = l.encode();
            let mut p = enc[envelope::HEADER_LEN..enc.len() - envelope::CHECKSUM_LEN].to_vec();
            f(&mut p);
            Layer::decode(&envelope::seal(LAYER_MAGIC, LAYER_VERSION, &p))
        };
        assert_eq!(
            reseal(&|p| p[0..4].copy_from_slice(&1000u32.to_le_bytes())),
            Err(LayerError::BlockSize(1000))
        );
        assert_eq!(
            reseal(&|p| p.truncate(20)),
            Err(LayerError::Malformed("short header"))
        );
        assert_eq!(
            reseal(&|p| {
                p.pop();
            }),
            Err(LayerError::Malformed("counts do not match length"))
        );
        assert_eq!(
            reseal(&|p| p[24..32].copy_from_slice(&u64::MAX.to_le_bytes())),
            Err(LayerError::Malformed("counts overflow"))
        );
        // Entries start after 32 + 2 chunks × 32 = 96 bytes; each is 12 bytes.
        assert_eq!(
            reseal(&|p| p[96..104].copy_from_slice(&5u64.to_le_bytes())),
            Err(LayerError::Malformed("blocks not strictly increasing"))
        );
        assert_eq!(
            reseal(&|p| p[104..108].copy_from_slice(&9u32.to_le_bytes())),
            Err(LayerError::Malformed("chunk reference out of range"))
        );
        assert_eq!(
            reseal(&|p| p[120..128].copy_from_slice(&11u64.to_le_bytes())),
            Err(LayerError::Malformed("block beyond virtual size"))
        );
    }
}
