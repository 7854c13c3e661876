use std::io;
use std::path::PathBuf;

/// Everything that can go wrong reading or writing a qcow2 image.
///
/// Messages are short; the underlying cause, when there is one, is in
/// [`std::error::Error::source`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("i/o error")]
    Io(#[from] io::Error),
    #[error("not a qcow2 image (bad magic)")]
    NotQcow2,
    #[error("unsupported qcow2 version {0}")]
    UnsupportedVersion(u32),
    #[error("header truncated: need {needed} bytes, file has {available}")]
    Truncated { needed: u64, available: u64 },
    #[error("image is encrypted (crypt method {0}); decrypt it with qemu-img convert first")]
    Encrypted(u32),
    #[error("image uses an external data file, which is not supported")]
    ExternalDataFile,
    #[error("image uses extended L2 entries (subclusters), which are not supported")]
    ExtendedL2,
    #[error("image has unknown incompatible features: {0}")]
    UnknownIncompatibleFeatures(String),
    #[error("image is dirty (not closed cleanly); repair it with `qemu-img check -r all`")]
    Dirty,
    #[error("image is marked corrupt; repair it with `qemu-img check -r all`")]
    MarkedCorrupt,
    #[error("unsupported compression type {0}")]
    UnsupportedCompression(u8),
    #[error("corrupt image: {0}")]
    Corrupt(String),
    #[error("cannot decompress cluster at host offset {host_offset:#x}")]
    Decompress {
        host_offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("backing file {}", path.display())]
    Backing {
        path: PathBuf,
        #[source]
        source: Box<Error>,
    },
    #[error("unsupported backing file format {0:?}")]
    UnsupportedBackingFormat(String),
    #[error("backing chain loops back to {}", .0.display())]
    BackingLoop(PathBuf),
    #[error("backing chain deeper than {0} images")]
    BackingChainTooDeep(usize),
    #[error("range {offset:#x}+{len:#x} is beyond the virtual size {size:#x}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("invalid cluster size {0} (must be a power of two from 512 to 2 MiB)")]
    InvalidClusterSize(u64),
    #[error("virtual size {0} is too large for this cluster size")]
    VirtualSizeTooLarge(u64),
    #[error("cluster {index} written twice")]
    ClusterWrittenTwice { index: u64 },
    #[error("cluster data has length {len}, expected {min}..={max}")]
    BadClusterLength { len: usize, min: usize, max: usize },
    #[error("write at {offset:#x} goes backwards (previous write ended at {previous_end:#x})")]
    WriteNotSequential { offset: u64, previous_end: u64 },
}

impl Error {
    pub(crate) fn corrupt(msg: impl Into<String>) -> Self {
        Error::Corrupt(msg.into())
    }
}
