//! Where image bytes come from.
//!
//! The reader only ever needs positional reads and the total length, so it
//! works the same over a file on disk (the normal case) and over bytes in
//! memory (tests and the fuzzer), without seeking or shared cursor state,
//! which is what lets several threads read one image at once.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// A byte source that can be read at any offset from several threads.
pub trait ReadAt: Send + Sync {
    /// Fills `buf` with the bytes at `offset`. Reading past the end is an
    /// `UnexpectedEof` error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Total length in bytes.
    fn len(&self) -> io::Result<u64>;

    /// Whether the source is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

fn read_from_slice(data: &[u8], buf: &mut [u8], offset: u64) -> io::Result<()> {
    let start = usize::try_from(offset).ok();
    let end = start.and_then(|s| s.checked_add(buf.len()));
    match (start, end) {
        (Some(start), Some(end)) if end <= data.len() => {
            buf.copy_from_slice(&data[start..end]);
            Ok(())
        }
        _ => Err(io::ErrorKind::UnexpectedEof.into()),
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        read_from_slice(self, buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.as_slice().len() as u64)
    }
}

impl ReadAt for Arc<[u8]> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        read_from_slice(self, buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(<[u8]>::len(self) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_reads_are_bounded() {
        let data = vec![1u8, 2, 3, 4];
        let mut buf = [0u8; 2];
        data.read_exact_at(&mut buf, 2).unwrap();
        assert_eq!(buf, [3, 4]);
        assert!(data.read_exact_at(&mut buf, 3).is_err());
        assert!(data.read_exact_at(&mut buf, u64::MAX).is_err());
        assert_eq!(ReadAt::len(&data).unwrap(), 4);
    }
}
