//! What the metadata store records about images and disks, and the small
//! definitions every service shares (the clock, the timeout of a request
//! to another host). Imports nothing of the agent: every service may use it.

use serde::{Deserialize, Serialize};
use spore_chunks::ChunkId;

use crate::error::{AgentError, Result};

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
    /// When the name was last looked up at the origin (unix seconds), for
    /// a name found there; None for images made here. A new disk or VM
    /// made from a name older than `--name-max-age` looks it up again.
    #[serde(default)]
    pub resolved_at: Option<u64>,
    /// A different manifest the origin binds the name to now, seen by the
    /// background check and not taken yet (`image pull` takes it).
    #[serde(default)]
    pub newer: Option<ChunkId>,
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
        for r in raws.iter().flatten() {
            self.record_one(r.len());
        }
    }

    /// One chunk file of `len` bytes served.
    pub fn record_one(&self, len: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.chunks.fetch_add(1, Relaxed);
        self.bytes.fetch_add(len as u64, Relaxed);
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

/// A template, as the `Templates` table holds it (templates/mod.rs makes
/// and removes them).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TemplateRecord {
    pub source_vm: String,
    pub source_image: String,
    pub memory_mib: u64,
    pub cpus: u32,
    pub max_memory_mib: u64,
    pub max_cpus: u32,
    pub accel: String,
    pub ram_image: String,
    pub disk_image: String,
    pub ram_stored_bytes: u64,
    pub ram_chunks: u64,
    pub ram_chunks_deduped: u64,
    pub state_bytes: u64,
    pub pause_ms: f64,
    pub created: u64,
    pub source_after: String,
    /// The image holding the template's bundle (description and state).
    #[serde(default)]
    pub boot_image: String,
    /// Found at the origin (not captured here).
    #[serde(default)]
    pub remote: bool,
    /// Boot RAM exactly as the template's QEMU had it (KiB); absent from
    /// templates made before it was recorded (see [`TemplateRecord::boot_ram_kib`]).
    #[serde(default)]
    pub ram_kib: Option<u64>,
    /// Set (durably) before a removal starts: from then on nothing starts
    /// from the template, and a removal that stopped half-way (an error, a
    /// crash) is finished by the next `template rm` or agent start.
    #[serde(default)]
    pub removing: bool,
}

impl TemplateRecord {
    /// Fails for a template being removed: nothing may start from it.
    pub fn usable(&self, name: &str) -> Result<()> {
        if self.removing {
            return Err(AgentError::State(format!(
                "template {name} is being removed (a removal stopped half-way; \
                 `spore template rm {name}` finishes it)"
            )));
        }
        Ok(())
    }

    /// The boot RAM a clone's QEMU must have to load the template's state.
    /// Templates that did not record it were made when TCG boot RAM was
    /// always 8 KiB short (`spore_qemu::cmdline::ram_kib_for`).
    pub fn boot_ram_kib(&self) -> u64 {
        self.ram_kib.unwrap_or_else(|| {
            let accel = self.accel.parse().unwrap_or(spore_qemu::Accel::Tcg);
            spore_qemu::cmdline::ram_kib_for(self.memory_mib, accel, None)
        })
    }
}
