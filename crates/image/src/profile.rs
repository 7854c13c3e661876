//! Boot profiles: the order in which a boot first read an image's blocks.
//!
//! Recorded on an image's first boot and stored as a chunk, a profile
//! travels with the image (push, resolve) so that later deploys can fetch
//! the boot's working set ahead of the guest, in the order it will be read.
//!
//! Payload (envelope magic `SPPROFIL`, version 1, little endian):
//!
//! ```text
//! u32 block_size | u32 reserved (0) | u64 count | count × u32 block
//! ```
//!
//! Blocks are distinct and in first-read order.

use std::collections::HashSet;

use crate::envelope::{self, EnvelopeError};
use crate::layer::{check_block_size, LayerError};

pub const PROFILE_MAGIC: &[u8; 8] = b"SPPROFIL";
pub const PROFILE_VERSION: u16 = 1;
/// Most blocks a profile may list (a 4 TiB image at 4 KiB blocks).
pub const MAX_PROFILE_BLOCKS: u64 = 1 << 30;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProfileError {
    #[error("profile envelope")]
    Envelope(#[from] EnvelopeError),
    #[error("malformed profile: {0}")]
    Malformed(&'static str),
    #[error("profile block size")]
    BlockSize(#[source] LayerError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub block_size: u32,
    /// Distinct blocks in first-read order.
    pub blocks: Vec<u32>,
}

impl Profile {
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(16 + self.blocks.len() * 4);
        p.extend_from_slice(&self.block_size.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&(self.blocks.len() as u64).to_le_bytes());
        for b in &self.blocks {
            p.extend_from_slice(&b.to_le_bytes());
        }
        envelope::seal(PROFILE_MAGIC, PROFILE_VERSION, &p)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ProfileError> {
        let (_, p) = envelope::open(PROFILE_MAGIC, PROFILE_VERSION, bytes)?;
        if p.len() < 16 {
            return Err(ProfileError::Malformed("short header"));
        }
        let block_size = u32::from_le_bytes(p[0..4].try_into().expect("4 bytes"));
        check_block_size(block_size).map_err(ProfileError::BlockSize)?;
        let count = u64::from_le_bytes(p[8..16].try_into().expect("8 bytes"));
        if count > MAX_PROFILE_BLOCKS || (p.len() - 16) as u64 != count * 4 {
            return Err(ProfileError::Malformed("count does not match length"));
        }
        let blocks: Vec<u32> = p[16..]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let mut seen = HashSet::with_capacity(blocks.len());
        if !blocks.iter().all(|b| seen.insert(*b)) {
            return Err(ProfileError::Malformed("a block is listed twice"));
        }
        Ok(Profile { block_size, blocks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_malformed() {
        let p = Profile {
            block_size: 65536,
            blocks: vec![3, 1, 900, 2],
        };
        assert_eq!(Profile::decode(&p.encode()).unwrap(), p);
        let reseal = |f: &dyn Fn(&mut Vec<u8>)| {
            let enc = p.encode();
            let mut body = enc[envelope::HEADER_LEN..enc.len() - envelope::CHECKSUM_LEN].to_vec();
            f(&mut body);
            Profile::decode(&envelope::seal(PROFILE_MAGIC, PROFILE_VERSION, &body))
        };
        assert_eq!(
            reseal(&|b| b.truncate(10)),
            Err(ProfileError::Malformed("short header"))
        );
        assert_eq!(
            reseal(&|b| {
                b.pop();
            }),
            Err(ProfileError::Malformed("count does not match length"))
        );
        assert_eq!(
            reseal(&|b| b[8..16].copy_from_slice(&u64::MAX.to_le_bytes())),
            Err(ProfileError::Malformed("count does not match length"))
        );
        assert_eq!(
            reseal(&|b| b[20..24].copy_from_slice(&3u32.to_le_bytes())),
            Err(ProfileError::Malformed("a block is listed twice"))
        );
        assert!(matches!(
            reseal(&|b| b[0..4].copy_from_slice(&5u32.to_le_bytes())),
            Err(ProfileError::BlockSize(_))
        ));
        assert!(matches!(
            Profile::decode(b"garbage"),
            Err(ProfileError::Envelope(_))
        ));
    }
}
