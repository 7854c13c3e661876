//! The flat block map: an image's layers collapsed into one table.
//!
//! qcow2 backing chains resolve a read by walking down the chain until some
//! file has the cluster, so a read costs up to one lookup per layer. spore
//! instead folds the layers once, when the image is opened, into one array
//! with a small integer per block pointing into a table of distinct chunks.
//! A lookup is one array index whatever the depth, and the memory is
//! 4 bytes per block plus 32 bytes per distinct chunk in use — a function of
//! the image size, not of the number of layers.

use std::collections::HashMap;

use spore_chunks::ChunkId;

use crate::layer::Layer;
use crate::manifest::Manifest;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FlatMapError {
    #[error("layer {index} has block size {found}, the image has {expected}")]
    BlockSizeMismatch {
        index: usize,
        found: u32,
        expected: u32,
    },
    #[error("image of {0} bytes has too many blocks to map")]
    TooLarge(u64),
}

#[derive(Debug, Clone)]
pub struct FlatMap {
    block_size: u32,
    shift: u32,
    virtual_size: u64,
    /// Per block: 0 = zero, i = `chunks[i - 1]`.
    map: Vec<u32>,
    chunks: Vec<ChunkId>,
}

impl FlatMap {
    /// Folds `layers` (bottom first) into one map of the manifest's size.
    pub fn build(manifest: &Manifest, layers: &[Layer]) -> Result<Self, FlatMapError> {
        let empty = FlatMap {
            block_size: manifest.block_size,
            shift: manifest.block_size.trailing_zeros(),
            virtual_size: 0,
            map: Vec::new(),
            chunks: Vec::new(),
        };
        empty.extend(manifest, layers)
    }

    /// The map of this image with `layers` folded on top, sized for
    /// `manifest`: how a child image is opened when its parent already is,
    /// at a cost independent of the parent's depth.
    pub fn extend(&self, manifest: &Manifest, layers: &[Layer]) -> Result<Self, FlatMapError> {
        let block_size = manifest.block_size;
        if block_size != self.block_size {
            return Err(FlatMapError::BlockSizeMismatch {
                index: 0,
                found: self.block_size,
                expected: block_size,
            });
        }
        let block_count = manifest.virtual_size.div_ceil(block_size as u64);
        if block_count >= u32::MAX as u64 {
            return Err(FlatMapError::TooLarge(manifest.virtual_size));
        }
        let mut map = self.map.clone();
        map.resize(block_count as usize, 0);
        let mut chunks = self.chunks.clone();
        let mut slots: HashMap<ChunkId, u32> = chunks
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, i as u32 + 1))
            .collect();
        for (index, layer) in layers.iter().enumerate() {
            if layer.block_size() != block_size {
                return Err(FlatMapError::BlockSizeMismatch {
                    index,
                    found: layer.block_size(),
                    expected: block_size,
                });
            }
            // Translate the layer's chunk table into global slots once.
            let translate: Vec<u32> = layer
                .chunks()
                .iter()
                .map(|id| {
                    *slots.entry(*id).or_insert_with(|| {
                        chunks.push(*id);
                        chunks.len() as u32
                    })
                })
                .collect();
            for &(block, r) in layer.raw_entries() {
                if let Some(slot) = map.get_mut(block as usize) {
                    *slot = if r == 0 { 0 } else { translate[r as usize - 1] };
                }
            }
        }
        let mut flat = FlatMap {
            block_size,
            shift: block_size.trailing_zeros(),
            virtual_size: manifest.virtual_size,
            map,
            chunks,
        };
        flat.compact();
        Ok(flat)
    }

    /// Drops chunks that upper layers hid, so the table never outgrows the
    /// number of blocks.
    fn compact(&mut self) {
        let mut renumber = vec![0u32; self.chunks.len() + 1];
        let mut kept = Vec::new();
        for slot in self.map.iter_mut() {
            if *slot == 0 {
                continue;
            }
            let new = &mut renumber[*slot as usize];
            if *new == 0 {
                kept.push(self.chunks[*slot as usize - 1]);
                *new = kept.len() as u32;
            }
            *slot = *new;
        }
        self.chunks = kept;
        self.chunks.shrink_to_fit();
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// log2 of the block size.
    pub fn block_shift(&self) -> u32 {
        self.shift
    }

    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    pub fn block_count(&self) -> u64 {
        self.map.len() as u64
    }

    /// The chunk slot of `block`: 0 when the block is zero, else a 1-based
    /// index for [`FlatMap::chunk`]. Out-of-range blocks read as zero.
    #[inline]
    pub fn slot(&self, block: u64) -> u32 {
        self.map.get(block as usize).copied().unwrap_or(0)
    }

    #[inline]
    pub fn chunk(&self, slot: u32) -> &ChunkId {
        &self.chunks[slot as usize - 1]
    }

    /// The chunk holding `block`, or None when the block is zero.
    #[inline]
    pub fn get(&self, block: u64) -> Option<&ChunkId> {
        match self.slot(block) {
            0 => None,
            s => Some(self.chunk(s)),
        }
    }

    /// Distinct chunks the image uses.
    pub fn chunks(&self) -> &[ChunkId] {
        &self.chunks
    }

    /// Blocks that hold data (not zero).
    pub fn data_blocks(&self) -> u64 {
        self.map.iter().filter(|&&s| s != 0).count() as u64
    }

    /// Bytes of memory the map itself uses.
    pub fn memory_bytes(&self) -> usize {
        self.map.capacity() * 4 + self.chunks.capacity() * 32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{Entry, LayerBuilder};

    fn id(n: u32) -> ChunkId {
        ChunkId::of(&n.to_le_bytes())
    }

    #[test]
    fn upper_layers_win_and_zero_masks() {
        let bs = 4096;
        let size = 8 * bs as u64;
        let mut l0 = LayerBuilder::new(bs, size).unwrap();
        for b in 0..8 {
            l0.set(b, Entry::Chunk(id(b as u32)));
        }
        let mut l1 = LayerBuilder::new(bs, size).unwrap();
        l1.set(2, Entry::Zero);
        l1.set(3, Entry::Chunk(id(100)));
        let layers = vec![l0.finish(), l1.finish()];
        let m = Manifest {
            virtual_size: size,
            block_size: bs,
            layers: vec![],
            parent: None,
            created: 0,
            source: String::new(),
        };
        let f = FlatMap::build(&m, &layers).unwrap();
        assert_eq!(f.get(0), Some(&id(0)));
        assert_eq!(f.get(2), None);
        assert_eq!(f.get(3), Some(&id(100)));
        assert_eq!(f.get(99), None);
        assert_eq!(f.data_blocks(), 7);
        // id(2) and id(3) are hidden: compaction dropped them.
        assert_eq!(f.chunks().len(), 7);
    }

    #[test]
    fn memory_does_not_grow_with_depth() {
        let bs = 4096;
        let size = 1024 * bs as u64;
        let m = Manifest {
            virtual_size: size,
            block_size: bs,
            layers: vec![],
            parent: None,
            created: 0,
            source: String::new(),
        };
        let mut layers = Vec::new();
        for depth in 0..1000u32 {
            let mut l = LayerBuilder::new(bs, size).unwrap();
            l.set((depth % 1024) as u64, Entry::Chunk(id(depth)));
            layers.push(l.finish());
        }
        let shallow = FlatMap::build(&m, &layers[..1]).unwrap();
        let deep = FlatMap::build(&m, &layers).unwrap();
        assert_eq!(deep.get(5), Some(&id(5)));
        assert!(deep.memory_bytes() <= 1024 * 4 + 1024 * 32);
        assert!(shallow.memory_bytes() <= deep.memory_bytes());
    }

    #[test]
    fn extending_equals_building_from_scratch() {
        let bs = 4096;
        let m = |blocks: u64| Manifest {
            virtual_size: blocks * bs as u64,
            block_size: bs,
            layers: vec![],
            parent: None,
            created: 0,
            source: String::new(),
        };
        let mut layers = Vec::new();
        for depth in 0..20u32 {
            let mut l = LayerBuilder::new(bs, (10 + depth as u64) * bs as u64).unwrap();
            l.set(
                (depth * 7 % (10 + depth)) as u64,
                Entry::Chunk(id(depth % 5)),
            );
            if depth % 3 == 0 {
                l.set(0, Entry::Zero);
            }
            layers.push(l.finish());
        }
        let full = FlatMap::build(&m(29), &layers).unwrap();
        let base = FlatMap::build(&m(20), &layers[..11]).unwrap();
        let extended = base.extend(&m(29), &layers[11..]).unwrap();
        for b in 0..30 {
            assert_eq!(full.get(b), extended.get(b), "block {b}");
        }
        assert_eq!(full.block_count(), extended.block_count());
    }

    #[test]
    fn mismatched_block_size_is_an_error() {
        let l = LayerBuilder::new(8192, 8192).unwrap().finish();
        let m = Manifest {
            virtual_size: 8192,
            block_size: 4096,
            layers: vec![],
            parent: None,
            created: 0,
            source: String::new(),
        };
        assert!(matches!(
            FlatMap::build(&m, &[l]),
            Err(FlatMapError::BlockSizeMismatch { .. })
        ));
    }
}
