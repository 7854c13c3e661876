//! Virtual block devices.
//!
//! - [`ImageDevice`]: an image, read-only. A read looks its block up in the
//!   image's flat map (one array index at any layer depth) and copies from
//!   the chunk, which the shared [`ChunkCache`] holds verified.
//! - [`Disk`]: an image plus a 4 KiB [`Overlay`] of the VM's own writes,
//!   with durable flush.
//!
//! Both implement [`spore_nbd::Export`], so the agent can serve them.
//! A [`batch`] carries a disk's written blocks to another host (live
//! migration), using the overlay's dirty tracking.

pub mod batch;
pub mod cache;
#[cfg(test)]
mod crash_tests;
pub mod disk;
pub mod image;
pub mod overlay;

use std::io;
use std::sync::atomic::AtomicU64;

pub use cache::ChunkCache;
pub use disk::Disk;
pub use image::ImageDevice;
pub use overlay::{Overlay, OverlayError};

/// I/O counters of a device.
#[derive(Debug, Default)]
pub struct IoStats {
    pub reads: AtomicU64,
    pub bytes_read: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_written: AtomicU64,
    pub flushes: AtomicU64,
}

impl IoStats {
    pub(crate) fn record_read(&self, bytes: usize) {
        self.reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.bytes_read
            .fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn record_write(&self, bytes: usize) {
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.bytes_written
            .fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

pub(crate) fn read_only() -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, "read-only device")
}
