//! What the NBD server serves: the [`Export`] trait and the [`Exports`]
//! registry through which a client's export name is resolved.
//!
//! The server knows nothing about images, layers or overlays; the block
//! device crate implements [`Export`] and the agent registers exports by name.

use std::io;
use std::sync::Arc;

/// One extent of a block-status reply for the `base:allocation` context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// The range holds no data (reading it returns zeroes and costs nothing).
    pub hole: bool,
    /// The range reads as zeroes.
    pub zero: bool,
}

/// A block device that can be exported over NBD.
///
/// Methods take `&self`: the server calls them from several worker threads at
/// once (pipelined requests, several connections per export), so an
/// implementation does its own locking. Offsets and lengths are already
/// checked against [`Export::size`] by the server before any call.
pub trait Export: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// True for exports that refuse writes (the server rejects them with EPERM
    /// before calling in).
    fn read_only(&self) -> bool;
    /// Preferred I/O granularity in bytes (a power of two, at least 512).
    fn preferred_block_size(&self) -> u32 {
        4096
    }
    /// Fill `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Write `data` at `offset`; with `fua` the data is durable on return.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()>;
    /// Make the range read as zeroes. `may_trim`: the range may be deallocated.
    fn write_zeroes(&self, offset: u64, length: u64, may_trim: bool, fua: bool) -> io::Result<()>;
    /// The client no longer needs the range (a hint; contents afterwards are
    /// unspecified by the protocol, but spore makes them read as zeroes).
    fn trim(&self, offset: u64, length: u64) -> io::Result<()>;
    /// Make every write acknowledged so far durable.
    fn flush(&self) -> io::Result<()>;
    /// Bring the range into local caches (NBD_CMD_CACHE).
    fn cache(&self, offset: u64, length: u64) -> io::Result<()>;
    /// Whether [`Export::write_zeroes`] is much cheaper than writing zero
    /// bytes (a metadata update rather than data I/O). Only then does the
    /// server advertise `NBD_FLAG_SEND_FAST_ZERO`, so that clients such as
    /// `qemu-img convert` can pre-zero a target with it.
    fn can_fast_zero(&self) -> bool {
        false
    }
    /// True when a write of `length` bytes at `offset` completes from local
    /// state alone (nothing to fetch, nothing to wait for but local I/O).
    /// The server then runs it on the connection's own thread when nothing
    /// else is in flight, saving the hand-off to a worker (most of a small
    /// write's latency at queue depth 1). The default says no.
    fn is_quick_write(&self, offset: u64, length: u64) -> bool {
        let _ = (offset, length);
        false
    }
    /// Allocation status of `[offset, offset+length)`, as a run of extents
    /// starting at `offset`. The extents may cover less than `length` (but at
    /// least one byte) and must not cover more.
    fn block_status(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>>;
}

/// Resolves export names for the handshake (OPT_GO, OPT_INFO, OPT_LIST,
/// OPT_EXPORT_NAME). Exports can come and go while the server runs.
pub trait Exports: Send + Sync {
    /// The export called `name`, if any.
    fn get(&self, name: &str) -> Option<Arc<dyn Export>>;
    /// Every export, as (name, description).
    fn list(&self) -> Vec<(String, String)>;
}
