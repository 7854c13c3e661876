//! Manifests: what an image is made of.
//!
//! A manifest names the layers of an image, bottom first, with the image's
//! virtual size and block size. It is stored as a chunk (JSON inside the
//! envelope, magic `SPMANIF\0`, version 1), so its id is its hash: an image
//! name is only a pointer to a manifest id, kept in the agent's metadata
//! store, and a manifest never changes once written.

use serde::{Deserialize, Serialize};
use spore_chunks::ChunkId;

use crate::envelope::{self, EnvelopeError};
use crate::layer::{check_block_size, LayerError};

pub const MANIFEST_MAGIC: &[u8; 8] = b"SPMANIF\0";
pub const MANIFEST_VERSION: u16 = 1;
/// Deepest stack spore accepts; far above what real chains reach.
pub const MAX_LAYERS: usize = 65_536;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub virtual_size: u64,
    pub block_size: u32,
    /// Layer ids, bottom first.
    pub layers: Vec<ChunkId>,
    /// The manifest this one was built on, if any.
    #[serde(default)]
    pub parent: Option<ChunkId>,
    /// Seconds since the Unix epoch.
    #[serde(default)]
    pub created: u64,
    /// Where the top layer came from (a file name, a disk commit).
    #[serde(default)]
    pub source: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest envelope")]
    Envelope(#[from] EnvelopeError),
    #[error("manifest is not valid JSON")]
    Json(#[source] serde_json::Error),
    #[error("manifest block size")]
    BlockSize(#[source] LayerError),
    #[error("manifest has {0} layers (limit {MAX_LAYERS})")]
    TooManyLayers(usize),
}

impl Manifest {
    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("manifest serialises");
        envelope::seal(MANIFEST_MAGIC, MANIFEST_VERSION, &json)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        let (_, payload) = envelope::open(MANIFEST_MAGIC, MANIFEST_VERSION, bytes)?;
        let m: Manifest = serde_json::from_slice(payload).map_err(ManifestError::Json)?;
        check_block_size(m.block_size).map_err(ManifestError::BlockSize)?;
        if m.layers.len() > MAX_LAYERS {
            return Err(ManifestError::TooManyLayers(m.layers.len()));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_rejects() {
        let m = Manifest {
            virtual_size: 1 << 20,
            block_size: 65536,
            layers: vec![ChunkId::of(b"l1")],
            parent: None,
            created: 1,
            source: "x.raw".into(),
        };
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        let bad = envelope::seal(MANIFEST_MAGIC, 1, b"{not json");
        assert!(matches!(
            Manifest::decode(&bad),
            Err(ManifestError::Json(_))
        ));
        let bad_bs = Manifest {
            block_size: 3,
            ..m.clone()
        };
        assert!(matches!(
            Manifest::decode(&bad_bs.encode()),
            Err(ManifestError::BlockSize(_))
        ));
        assert!(matches!(
            Manifest::decode(b"short"),
            Err(ManifestError::Envelope(_))
        ));
    }
}
