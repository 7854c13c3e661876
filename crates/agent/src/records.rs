//! What the metadata store records about images and disks, and the small
//! definitions every service shares (the clock, the timeout of a request
//! to another host). Imports nothing of the agent: every service may use it.

use serde::{Deserialize, Serialize};
use spore_chunks::ChunkId;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    pub manifest: ChunkId,
    pub created: u64,
    /// Policy: fetch every chunk of the image in the background (after
    /// it is first used), so that a later outage of the origin does no harm.
    #[serde(default)]
    pub complete: bool,
    /// The boot profile (a chunk), recorded on the image's first use here
    /// or received with the image.
    #[serde(default)]
    pub profile: Option<ChunkId>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskRecord {
    pub image: String,
    /// The manifest the disk was made from: renaming or removing the image
    /// name later does not change what the disk sees.
    pub manifest: ChunkId,
    pub created: u64,
    pub vm: Option<String>,
}

/// What this agent served to peers.
#[derive(Debug, Default)]
pub struct PeerStats {
    pub chunks: std::sync::atomic::AtomicU64,
    pub bytes: std::sync::atomic::AtomicU64,
}

impl PeerStats {
    pub fn record(&self, raws: &[Option<bytes::Bytes>]) {
        use std::sync::atomic::Ordering::Relaxed;
        for r in raws.iter().flatten() {
            self.chunks.fetch_add(1, Relaxed);
            self.bytes.fetch_add(r.len() as u64, Relaxed);
        }
    }
}

/// How long one request to a peer or the origin may take.
pub const REMOTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Seconds since the Unix epoch (record timestamps).
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
