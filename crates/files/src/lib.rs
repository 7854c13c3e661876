//! The files spore keeps its state in, behind a small trait.
//!
//! spore's promises are about what survives a crash, and that depends on
//! exactly which writes, syncs and directory entries reached the disk. The
//! overlays of disks (spore-blockdev), the chunk store (spore-chunks) and the
//! agent's metadata database (through redb's storage backend) therefore do
//! their file I/O through [`Files`] and [`FileHandle`]: [`RealFiles`] is the
//! operating system, and [`fault`] (feature `fault`, for the crash tests)
//! records every write and sync and, at a simulated power cut, forgets
//! whatever was not yet durable (the technique of RocksDB's
//! FaultInjectionTestFS and SQLite's crash-test VFS). Two implementations,
//! one contract: the durability rules below, which are POSIX's.
//!
//! - `write_at`, `punch_hole`, `zero_range`, `set_len` change a file, but
//!   the change may be lost at a crash until `sync_data` returns.
//! - A newly created file (or directory), a rename and a removal may be
//!   undone at a crash until their directory is synced with
//!   [`Files::sync_dir`].
//! - [`Files::sync_tree`] makes everything under a directory durable, data
//!   and names (`syncfs`).
//!
//! Written by hand: the crates that simulate file systems (in-memory VFS
//! crates) model the namespace, not what a power cut keeps of unsynced
//! data, which is the point here.

#[cfg(feature = "fault")]
pub mod fault;

use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;

/// One open file.
#[allow(clippy::len_without_is_empty)]
pub trait FileHandle: Send + Sync + Debug {
    /// Fills `buf` from `offset`; bytes past the end read as zero.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every change so far durable (data and the size).
    fn sync_data(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Deallocates a range: it reads as zero and holds no blocks.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes a range read as zero and keeps it allocated (no hole).
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()>;
    /// The first offset at or after `offset` that holds data, if any
    /// (`SEEK_DATA`); an implementation that cannot tell says `offset`.
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>>;
    /// The first hole at or after `offset` (`SEEK_HOLE`; the end of the
    /// file counts as one).
    fn next_hole(&self, offset: u64) -> io::Result<u64>;
}

/// Where an overlay's files are.
pub trait Files: Send + Sync + Debug {
    /// Creates `dir` and every missing parent, each made durable in its
    /// own parent.
    fn create_dir(&self, dir: &Path) -> io::Result<()>;
    /// Opens a file for reading and writing; `create` insists on a new one.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn FileHandle>>;
    fn exists(&self, path: &Path) -> bool;
    /// Makes the entries of `dir` (created, renamed, removed) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Renames a file (replacing `to` if it exists).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// The names in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// The size of the file at `path` (without opening it).
    fn size(&self, path: &Path) -> io::Result<u64>;
    /// Makes everything under `dir` durable: every file's data and every
    /// name (`syncfs` of its file system).
    fn sync_tree(&self, dir: &Path) -> io::Result<()>;
    /// Names this boot of the machine: what was written and not synced is
    /// in the files for as long as it stays the same (a process that dies
    /// loses nothing the kernel took), and may be lost when it changes.
    fn boot_id(&self) -> io::Result<[u8; 16]>;
}

/// The kernel's boot id (`/proc/sys/kernel/random/boot_id`), as bytes.
pub fn kernel_boot_id() -> io::Result<[u8; 16]> {
    let text = fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    let hex: String = text.trim().chars().filter(|c| *c != '-').collect();
    let mut id = [0u8; 16];
    if hex.len() != 32 {
        return Err(io::Error::other(format!("unexpected boot id {text:?}")));
    }
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| io::Error::other(format!("unexpected boot id {text:?}")))?;
    }
    Ok(id)
}

/// The operating system's files.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFiles;

impl Files for RealFiles {
    fn create_dir(&self, dir: &Path) -> io::Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            self.create_dir(parent)?;
        }
        match fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(e),
        }
        match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(parent) => self.sync_dir(parent),
            None => Ok(()),
        }
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn FileHandle>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(create)
            .open(path)?;
        Ok(Arc::new(RealFile(file)))
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            if let Some(name) = entry?.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    fn size(&self, path: &Path) -> io::Result<u64> {
        Ok(fs::metadata(path)?.len())
    }

    fn sync_tree(&self, dir: &Path) -> io::Result<()> {
        let dir = File::open(dir)?;
        // SAFETY: syncfs only reads the descriptor, which `dir` keeps open.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn boot_id(&self) -> io::Result<[u8; 16]> {
        kernel_boot_id()
    }
}

#[derive(Debug)]
struct RealFile(File);

impl RealFile {
    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<bool> {
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.0.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            return Ok(false);
        }
        Err(err)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeros.len() as u64) as usize;
            self.0.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor we own. The file is shared by
        // threads that only use positioned I/O, so moving the offset is
        // harmless.
        let rc = unsafe { libc::lseek(self.0.as_raw_fd(), offset as libc::off_t, whence) };
        if rc >= 0 {
            return Ok(Some(rc as u64));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err),
        }
    }
}

impl FileHandle for RealFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.0.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if !self.fallocate(mode, offset, len)? {
            // No hole punching on this file system: the zeroes are written.
            self.write_zeroes(offset, len)?;
        }
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if !self.fallocate(mode, offset, len)? {
            self.write_zeroes(offset, len)?;
        }
        Ok(())
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        match self.seek(offset, libc::SEEK_DATA) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Some(offset)),
            other => other,
        }
    }

    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        match self.seek(offset, libc::SEEK_HOLE) {
            Ok(Some(at)) => Ok(at),
            Ok(None) => self.len(),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.len(),
            Err(e) => Err(e),
        }
    }
}
