//! qcow2 image reader and writer, for importing VM disk images into the
//! store and exporting them again.
//!
//! [`Qcow2Reader`] presents a qcow2 file (version 2 or 3, with its backing
//! chain) as guest bytes plus allocation information, so an importer can
//! skip what reads as zeros. It treats the file as untrusted input: every
//! offset is checked, memory is bounded whatever the header says, and
//! anything it does not understand is refused with an [`Error`] rather
//! than read wrongly. [`Qcow2Writer`] streams guest clusters into a compact
//! qcow2 v3 file. The supported subset is described in `docs/qcow2.md`.

mod error;
mod header;
mod image;
mod reader;
mod source;
mod writer;

pub use error::Error;
pub use header::{is_qcow2, BackingFile, Compression};
pub use reader::{Allocation, Extent, Extents, Qcow2Reader, MAX_CHAIN_DEPTH};
pub use source::ReadAt;
pub use writer::{Qcow2Writer, DEFAULT_CLUSTER_SIZE};
