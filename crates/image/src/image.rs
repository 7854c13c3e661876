//! Opening images from the store and publishing new ones.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use spore_chunks::{is_zero, ChunkId, ChunkStore};

use crate::flatmap::{FlatMap, FlatMapError};
use crate::layer::{Entry, Layer, LayerBuilder, LayerError};
use crate::manifest::{Manifest, ManifestError};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("chunk store")]
    Store(#[from] spore_chunks::Error),
    #[error("manifest {id}")]
    Manifest {
        id: ChunkId,
        #[source]
        source: ManifestError,
    },
    #[error("layer {id}")]
    Layer {
        id: ChunkId,
        #[source]
        source: LayerError,
    },
    #[error("building the block map")]
    FlatMap(#[from] FlatMapError),
    #[error("block size {found} differs from the parent image's {parent}")]
    ParentBlockSize { found: u32, parent: u32 },
    #[error("invalid layer parameters")]
    Params(#[source] LayerError),
}

/// An image opened for reading: its manifest and flat block map.
#[derive(Debug, Clone)]
pub struct Image {
    pub id: ChunkId,
    pub manifest: Manifest,
    pub flat: FlatMap,
}

pub fn load_manifest(store: &ChunkStore, id: &ChunkId) -> Result<Manifest, ImageError> {
    decode_manifest(id, &store.get(id)?)
}

pub fn load_layer(store: &ChunkStore, id: &ChunkId) -> Result<Layer, ImageError> {
    decode_layer(id, &store.get(id)?)
}

/// Parses the verified contents of manifest chunk `id`, wherever they were
/// read from (the chunk store, or an origin's object store).
pub fn decode_manifest(id: &ChunkId, bytes: &[u8]) -> Result<Manifest, ImageError> {
    Manifest::decode(bytes).map_err(|source| ImageError::Manifest { id: *id, source })
}

/// Parses the verified contents of layer chunk `id`.
pub fn decode_layer(id: &ChunkId, bytes: &[u8]) -> Result<Layer, ImageError> {
    Layer::decode(bytes).map_err(|source| ImageError::Layer { id: *id, source })
}

impl Image {
    /// Loads the manifest and every layer, and folds them into a flat map.
    pub fn open(store: &ChunkStore, id: &ChunkId) -> Result<Self, ImageError> {
        let manifest = load_manifest(store, id)?;
        let layers = manifest
            .layers
            .iter()
            .map(|l| load_layer(store, l))
            .collect::<Result<Vec<_>, _>>()?;
        let flat = FlatMap::build(&manifest, &layers)?;
        Ok(Image {
            id: *id,
            manifest,
            flat,
        })
    }

    /// Opens `id`, reusing `parent`'s folded map when the manifest is the
    /// parent's layers plus some more (the usual case after a commit or a
    /// `--parent` import): only the new layers are loaded.
    pub fn open_on(store: &ChunkStore, id: &ChunkId, parent: &Image) -> Result<Self, ImageError> {
        let manifest = load_manifest(store, id)?;
        let base = &parent.manifest.layers;
        if manifest.block_size != parent.manifest.block_size || !manifest.layers.starts_with(base) {
            return Self::open(store, id);
        }
        let extra = manifest.layers[base.len()..]
            .iter()
            .map(|l| load_layer(store, l))
            .collect::<Result<Vec<_>, _>>()?;
        let flat = parent.flat.extend(&manifest, &extra)?;
        Ok(Image {
            id: *id,
            manifest,
            flat,
        })
    }
}

/// Every chunk reachable from `manifests`: the manifests, their layers and
/// the data the layers name. Each layer is read once however many images
/// share it.
pub fn reachable_chunks<'a>(
    store: &ChunkStore,
    manifests: impl IntoIterator<Item = &'a ChunkId>,
) -> Result<HashSet<ChunkId>, ImageError> {
    let mut out = HashSet::new();
    for m in manifests {
        if !out.insert(*m) {
            continue;
        }
        for l in load_manifest(store, m)?.layers {
            if out.insert(l) {
                out.extend(load_layer(store, &l)?.chunks().iter().copied());
            }
        }
    }
    Ok(out)
}

/// What building a layer did.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct LayerStats {
    /// Blocks looked at.
    pub blocks: u64,
    /// Blocks the new layer records (they differ from the parent).
    pub changed_blocks: u64,
    /// Chunks written to the store (not already present).
    pub new_chunks: u64,
    /// Bytes those chunks take on disk.
    pub new_bytes: u64,
}

/// Builds a layer on top of an optional parent from blocks offered in any
/// order and from several threads. Blocks equal to the parent's are left
/// out; zero blocks become zero entries only where the parent has data.
#[derive(Debug)]
pub struct LayerWriter<'a> {
    store: &'a ChunkStore,
    parent: Option<&'a Image>,
    builder: Mutex<LayerBuilder>,
    blocks: AtomicU64,
    new_chunks: AtomicU64,
    new_bytes: AtomicU64,
}

impl<'a> LayerWriter<'a> {
    pub fn new(
        store: &'a ChunkStore,
        parent: Option<&'a Image>,
        block_size: u32,
        virtual_size: u64,
    ) -> Result<Self, ImageError> {
        if let Some(p) = parent {
            if p.manifest.block_size != block_size {
                return Err(ImageError::ParentBlockSize {
                    found: block_size,
                    parent: p.manifest.block_size,
                });
            }
        }
        Ok(LayerWriter {
            store,
            parent,
            builder: Mutex::new(
                LayerBuilder::new(block_size, virtual_size).map_err(ImageError::Params)?,
            ),
            blocks: AtomicU64::new(0),
            new_chunks: AtomicU64::new(0),
            new_bytes: AtomicU64::new(0),
        })
    }

    /// Offers the full contents of `block` (short only for the image's last block).
    pub fn add(&self, block: u64, data: &[u8]) -> Result<(), ImageError> {
        self.blocks.fetch_add(1, Ordering::Relaxed);
        let below = self.parent.and_then(|p| p.flat.get(block));
        let entry = if is_zero(data) {
            match below {
                None => return Ok(()),
                Some(_) => Entry::Zero,
            }
        } else {
            let id = ChunkId::of(data);
            if below == Some(&id) {
                return Ok(());
            }
            let put = self.store.put_with_id(id, data)?;
            if put.new {
                self.new_chunks.fetch_add(1, Ordering::Relaxed);
                self.new_bytes.fetch_add(put.stored_len, Ordering::Relaxed);
            }
            Entry::Chunk(id)
        };
        self.builder.lock().set(block, entry);
        Ok(())
    }

    /// Records that `block` is zero without offering data (for ranges the
    /// source knows to be holes).
    pub fn add_zero(&self, block: u64) {
        self.blocks.fetch_add(1, Ordering::Relaxed);
        if self.parent.and_then(|p| p.flat.get(block)).is_some() {
            self.builder.lock().set(block, Entry::Zero);
        }
    }

    /// Stores the layer and a manifest for parent + layer, makes them
    /// durable, and returns the new manifest's id.
    pub fn publish(self, source: &str) -> Result<(ChunkId, Manifest, LayerStats), ImageError> {
        let layer = self.builder.into_inner().finish();
        let mut stats = LayerStats {
            blocks: self.blocks.into_inner(),
            changed_blocks: layer.len() as u64,
            new_chunks: self.new_chunks.into_inner(),
            new_bytes: self.new_bytes.into_inner(),
        };
        let layer_put = self.store.put(&layer.encode())?;
        stats.new_bytes += layer_put.stored_len;
        let mut layers = self
            .parent
            .map(|p| p.manifest.layers.clone())
            .unwrap_or_default();
        layers.push(layer_put.id);
        let manifest = Manifest {
            virtual_size: layer.virtual_size(),
            block_size: layer.block_size(),
            layers,
            parent: self.parent.map(|p| p.id),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            source: source.to_owned(),
        };
        let put = self.store.put(&manifest.encode())?;
        // Everything the manifest refers to must be on disk before the
        // caller binds a name to it.
        self.store.sync()?;
        Ok((put.id, manifest, stats))
    }
}
