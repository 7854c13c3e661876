//! Files that can be imported: raw and qcow2, told apart by their first bytes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// A readable disk image of some format.
pub trait Source: Send + Sync {
    fn format(&self) -> Format;
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the guest-visible bytes at `offset` (zeroes past the end).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// False when the range certainly reads as zeroes, so it need not be read.
    fn may_have_data(&self, offset: u64, len: u64) -> io::Result<bool>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Raw,
    Qcow2,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        })
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(format!("unknown format {other:?} (expected raw or qcow2)")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot open {path}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a regular file or block device")]
    NotAFile { path: String },
    #[error("reading qcow2 image {path}")]
    Qcow2 {
        path: String,
        #[source]
        source: spore_qcow2::Error,
    },
}

/// Opens `path`, detecting raw or qcow2.
pub fn open(path: &Path) -> Result<Box<dyn Source>, SourceError> {
    let shown = path.display().to_string();
    let file = File::open(path).map_err(|source| SourceError::Open {
        path: shown.clone(),
        source,
    })?;
    let meta = file.metadata().map_err(|source| SourceError::Open {
        path: shown.clone(),
        source,
    })?;
    if meta.is_dir() {
        return Err(SourceError::NotAFile { path: shown });
    }
    let mut head = [0u8; 8];
    let n = file
        .read_at(&mut head, 0)
        .map_err(|source| SourceError::Open {
            path: shown.clone(),
            source,
        })?;
    if spore_qcow2::is_qcow2(&head[..n]) {
        let reader = spore_qcow2::Qcow2Reader::open(path).map_err(|source| SourceError::Qcow2 {
            path: shown,
            source,
        })?;
        return Ok(Box::new(Qcow2Source(reader)));
    }
    let size = file_size(&file).map_err(|source| SourceError::Open {
        path: shown,
        source,
    })?;
    Ok(Box::new(RawSource { file, size }))
}

/// Opens `path` as raw bytes, whatever they look like (guest RAM may start
/// with anything, including a qcow2 magic).
pub fn open_raw(path: &Path) -> Result<Box<dyn Source>, SourceError> {
    let shown = path.display().to_string();
    let open = || -> io::Result<RawSource> {
        let file = File::open(path)?;
        let size = file_size(&file)?;
        Ok(RawSource { file, size })
    };
    open()
        .map(|r| Box::new(r) as Box<dyn Source>)
        .map_err(|source| SourceError::Open {
            path: shown,
            source,
        })
}

fn file_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    // Block devices report 0 in metadata; seek to the end instead.
    // SAFETY: lseek on a descriptor we own; no memory is passed.
    let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(end as u64)
}

/// A raw image file. Holes are found with SEEK_DATA so sparse files import
/// without reading their empty parts.
#[derive(Debug)]
pub struct RawSource {
    file: File,
    size: u64,
}

impl Source for RawSource {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.file.read_at(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                buf[done..].fill(0);
                break;
            }
            done += n;
        }
        Ok(())
    }

    fn may_have_data(&self, offset: u64, len: u64) -> io::Result<bool> {
        // SAFETY: lseek on a descriptor we own; no memory is passed.
        let next = unsafe {
            libc::lseek(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                libc::SEEK_DATA,
            )
        };
        if next < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENXIO) => Ok(false),
                // File systems without SEEK_DATA: assume data.
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(true),
                _ => Err(err),
            };
        }
        Ok((next as u64) < offset + len)
    }
}

struct Qcow2Source(spore_qcow2::Qcow2Reader);

impl Source for Qcow2Source {
    fn format(&self) -> Format {
        Format::Qcow2
    }

    fn size(&self) -> u64 {
        self.0.virtual_size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_at(offset, buf).map_err(io::Error::other)
    }

    fn may_have_data(&self, offset: u64, len: u64) -> io::Result<bool> {
        let extents = self.0.allocation(offset, len).map_err(io::Error::other)?;
        Ok(extents.iter().any(|e| !e.allocation.reads_as_zero()))
    }
}
