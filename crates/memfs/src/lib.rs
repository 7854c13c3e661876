//! One read-only file, served over FUSE, whose bytes come from a reader.
//!
//! A clone on a host that does not hold its template's RAM maps this file
//! (QEMU `memory-backend-file,share=off`, i.e. MAP_PRIVATE): every page the guest
//! touches for the first time becomes a FUSE read, which the reader answers
//! from the chunk store, fetching from peers or the origin when needed. The
//! kernel's page cache keeps what was read, so a page is fetched once per
//! host however many clones map it; writes stay private to each clone.
//!
//! Reads run on several threads so that one clone waiting for a remote
//! chunk does not stall the others.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, INodeNo, LockOwner, MountOption,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, Request,
};

/// Where the file's bytes come from.
pub trait Backing: Send + Sync + 'static {
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; `offset + buf.len()` never passes `size`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

/// What the file system served.
#[derive(Debug, Default)]
pub struct Stats {
    pub reads: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
}

const FILE: INodeNo = INodeNo(2);
/// Attributes never change while mounted.
const TTL: Duration = Duration::from_secs(3600);
/// Concurrent FUSE reads.
const THREADS: usize = 4;

struct MemFs {
    name: String,
    backing: Arc<dyn Backing>,
    stats: Arc<Stats>,
    uid: u32,
    gid: u32,
}

impl MemFs {
    fn attr(&self, ino: INodeNo) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == FILE {
            (FileType::RegularFile, 0o444, self.backing.size(), 1)
        } else {
            (FileType::Directory, 0o555, 0, 2)
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        }
    }
}

/// Kernel read-ahead per fault: a guest touching one page of a region
/// usually touches its neighbours.
const READAHEAD: u32 = 512 << 10;

impl Filesystem for MemFs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> io::Result<()> {
        if let Err(max) = config.set_max_readahead(READAHEAD) {
            let _ = config.set_max_readahead(max);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name.to_str() == Some(self.name.as_str()) {
            reply.entry(&TTL, &self.attr(FILE), fuser::Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == FILE || ino == INodeNo::ROOT {
            reply.attr(&TTL, &self.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE {
            return reply.error(Errno::ENOENT);
        }
        if flags.0 & (libc::O_TRUNC | libc::O_APPEND) != 0 {
            return reply.error(Errno::EROFS);
        }
        // Read-write opens are allowed because QEMU opens its RAM file
        // O_RDWR to map it private and writable (QEMU 7.2's readonly=on
        // would make the guest's RAM read-only); write() itself fails.
        // KEEP_CACHE: pages read once stay cached across opens (clones).
        reply.opened(FileHandle(0), fuser::FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: fuser::ReplyEmpty,
    ) {
        reply.ok();
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: fuser::ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE {
            return reply.error(Errno::ENOENT);
        }
        let total = self.backing.size();
        let len = (size as u64).min(total.saturating_sub(offset)) as usize;
        let mut buf = vec![0u8; len];
        match self.backing.read_at(offset, &mut buf) {
            Ok(()) => {
                self.stats.reads.fetch_add(1, Relaxed);
                self.stats.bytes.fetch_add(len as u64, Relaxed);
                reply.data(&buf);
            }
            Err(e) => {
                self.stats.errors.fetch_add(1, Relaxed);
                tracing::error!(file = %self.name, offset, len, error = %e, "memfs read failed");
                reply.error(Errno::EIO);
            }
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (FILE, FileType::RegularFile, self.name.as_str()),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// A mounted file system; unmounted when dropped.
pub struct MemFile {
    session: Option<fuser::BackgroundSession>,
    dir: PathBuf,
    name: String,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for MemFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemFile")
            .field("path", &self.path())
            .finish()
    }
}

impl MemFile {
    /// Mounts a file system on `dir` (created if missing; a stale mount
    /// left there by a crashed process is detached first) holding one file
    /// `name` with `backing`'s bytes.
    pub fn mount(dir: &Path, name: &str, backing: Arc<dyn Backing>) -> io::Result<MemFile> {
        detach_stale(dir);
        std::fs::create_dir_all(dir)?;
        let stats = Arc::new(Stats::default());
        let fs = MemFs {
            name: name.to_owned(),
            backing,
            stats: stats.clone(),
            // SAFETY: getuid/getgid cannot fail and touch no memory.
            uid: unsafe { libc::getuid() },
            // SAFETY: as above.
            gid: unsafe { libc::getgid() },
        };
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("spore-memfs".into()),
            MountOption::Subtype("spore".into()),
        ];
        config.n_threads = Some(THREADS);
        let session = fuser::spawn_mount(fs, dir, &config).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "mounting FUSE on {} (is /dev/fuse there, and are we root?): {e}",
                    dir.display()
                ),
            )
        })?;
        Ok(MemFile {
            session: Some(session),
            dir: dir.to_owned(),
            name: name.to_owned(),
            stats,
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Reads `ranges` (offset, length) through the mount in the background,
    /// in order, so that they sit in the page cache before anyone maps
    /// them: a prefetch that saves the mapping processes the page faults
    /// into user space, not only the network.
    ///
    /// The receiver gets one message when the warm-up ends (or fails).
    pub fn warm(&self, ranges: Vec<(u64, u64)>) -> std::sync::mpsc::Receiver<()> {
        let path = self.path();
        let (done, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("memfs-warm".into())
            .spawn(move || {
                use std::os::unix::fs::FileExt;
                if let Ok(f) = std::fs::File::open(&path) {
                    let mut buf = Vec::new();
                    for (off, len) in ranges {
                        buf.resize(len as usize, 0);
                        if f.read_exact_at(&mut buf, off).is_err() {
                            break;
                        }
                    }
                }
                let _ = done.send(());
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start memfs warm-up");
        }
        rx
    }
}

impl Drop for MemFile {
    fn drop(&mut self) {
        // Detach, so that a process still mapping the file does not keep
        // the unmount (and this drop) waiting.
        detach_stale(&self.dir);
        drop(self.session.take());
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Lazily unmounts whatever is mounted on `dir` (nothing if nothing is).
pub fn detach_stale(dir: &Path) {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: umount2 with a valid C string; failure (nothing mounted) is fine.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    struct Pattern(u64, AtomicU64);

    impl Backing for Pattern {
        fn size(&self) -> u64 {
            self.0
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.1.fetch_add(1, Relaxed);
            if offset >= 3 << 20 {
                return Err(io::Error::other("no source has this chunk"));
            }
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((offset + i as u64) % 251) as u8;
            }
            Ok(())
        }
    }

    /// Fails under `CI=true` without FUSE, else is a counted skip.
    fn fuse_available() -> bool {
        spore_testkit::fuse()
    }

    #[test]
    fn reads_come_from_the_backing_and_errors_are_eio() {
        if !fuse_available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let backing = Arc::new(Pattern(4 << 20, AtomicU64::new(0)));
        let m = MemFile::mount(&dir.path().join("mnt"), "ram", backing.clone()).unwrap();
        let f = std::fs::File::open(m.path()).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 4 << 20);
        let mut buf = vec![0u8; 10000];
        f.read_exact_at(&mut buf, 123_456).unwrap();
        assert!(buf
            .iter()
            .enumerate()
            .all(|(i, &b)| b == ((123_456 + i as u64) % 251) as u8));
        // Cached: reading it again does not ask the backing.
        let asked = backing.1.load(Relaxed);
        f.read_exact_at(&mut buf, 123_456).unwrap();
        assert_eq!(backing.1.load(Relaxed), asked);
        // A chunk nobody has: the reader gets an I/O error, not a hang.
        let err = f.read_exact_at(&mut buf, (3 << 20) + 4096).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
        assert!(m.stats().errors.load(Relaxed) > 0);
        // Writes fail.
        let w = std::fs::OpenOptions::new()
            .write(true)
            .open(m.path())
            .unwrap();
        assert!(w.write_all_at(b"x", 0).is_err());
        assert!(std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(m.path())
            .is_err());
        let names: Vec<_> = std::fs::read_dir(dir.path().join("mnt"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["ram"]);
        drop(f);
        drop(m);
        assert!(!dir.path().join("mnt/ram").exists());
    }

    #[test]
    fn private_mappings_see_the_bytes_and_keep_writes_to_themselves() {
        if !fuse_available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let m = MemFile::mount(
            &dir.path().join("mnt"),
            "ram",
            Arc::new(Pattern(1 << 20, AtomicU64::new(0))),
        )
        .unwrap();
        let f = std::fs::File::open(m.path()).unwrap();
        let map = |_: ()| unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                1 << 20,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            std::slice::from_raw_parts_mut(p as *mut u8, 1 << 20)
        };
        let a = map(());
        let b = map(());
        assert_eq!(a[5000], (5000 % 251) as u8);
        a[5000] = 0xee;
        assert_eq!(b[5000], (5000 % 251) as u8);
        assert_eq!(a[5000], 0xee);
        // SAFETY: both mappings were made above with this length.
        unsafe {
            libc::munmap(a.as_mut_ptr() as *mut _, 1 << 20);
            libc::munmap(b.as_mut_ptr() as *mut _, 1 << 20);
        }
    }
}
