//! A qcow2 image and its backing chain, read as one sequence of guest bytes.
//!
//! The chain is held as a flat list of layers (this image first, then each
//! backing file) rather than as nested readers, so that neither opening nor
//! reading recurses: a deep chain cannot overflow the stack.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::header::{is_qcow2, BackingFile, Compression};
use crate::image::{Image, Mapping};
use crate::source::ReadAt;
use crate::Error;

/// The longest backing chain we follow (this image included).
pub const MAX_CHAIN_DEPTH: usize = 4096;

/// How a run of guest bytes is stored, looking through the backing chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Allocation {
    /// Some image in the chain stores data for it (possibly compressed;
    /// possibly zeros that were written as data).
    Data,
    /// An image in the chain marks it as zeros.
    Zero,
    /// No image in the chain allocates it; it reads as zeros.
    Unallocated,
}

impl Allocation {
    /// Whether the bytes are known to read as zeros without reading them.
    pub fn reads_as_zero(self) -> bool {
        !matches!(self, Allocation::Data)
    }
}

/// A run of guest bytes with one [`Allocation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub allocation: Allocation,
}

enum Layer {
    Qcow2(Box<Image>),
    Raw { source: Box<dyn ReadAt>, len: u64 },
}

impl Layer {
    fn virtual_size(&self) -> u64 {
        match self {
            Layer::Qcow2(image) => image.virtual_size(),
            Layer::Raw { len, .. } => *len,
        }
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<(Resolved<'_>, u64), Error> {
        match self {
            Layer::Qcow2(image) => map_image(image, offset, max_len),
            Layer::Raw { source, .. } => Ok((
                Resolved::Raw {
                    source: &**source,
                    offset,
                },
                max_len,
            )),
        }
    }
}

/// How one run of guest bytes resolves.
enum Resolved<'a> {
    Data { image: &'a Image, host: u64 },
    Compressed { image: &'a Image, entry: u64 },
    Raw { source: &'a dyn ReadAt, offset: u64 },
    Zero,
    Unallocated,
}

fn map_image(image: &Image, offset: u64, max_len: u64) -> Result<(Resolved<'_>, u64), Error> {
    let (mapping, n) = image.map(offset, max_len)?;
    let resolved = match mapping {
        Mapping::Data { host } => Resolved::Data { image, host },
        Mapping::Compressed { entry } => Resolved::Compressed { image, entry },
        Mapping::Zero => Resolved::Zero,
        Mapping::Unallocated => Resolved::Unallocated,
    };
    Ok((resolved, n))
}

/// Reads a qcow2 image (version 2 or 3) and its backing chain.
///
/// `read_at` and `extents` take `&self` and the reader is `Sync`, so one
/// reader can serve several threads.
pub struct Qcow2Reader {
    top: Image,
    /// The backing chain, nearest first.
    backing: Vec<Layer>,
}

impl std::fmt::Debug for Qcow2Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Reader")
            .field("virtual_size", &self.virtual_size())
            .field("cluster_size", &self.cluster_size())
            .field("chain_len", &self.chain_len())
            .finish()
    }
}

fn open_file(path: &Path) -> Result<File, Error> {
    File::open(path).map_err(|source| Error::Open {
        path: path.to_owned(),
        source,
    })
}

impl Qcow2Reader {
    /// Opens the qcow2 image at `path` and its whole backing chain. Relative
    /// backing file names are resolved against the directory of the image
    /// that names them; a backing file without a format header extension
    /// is probed (qcow2 if it has the magic, raw otherwise).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let top = Image::open(Box::new(open_file(path)?))?;
        let mut seen = HashSet::new();
        seen.insert(canonical(path)?);
        let mut backing = Vec::new();
        let mut next = top.header().backing.clone();
        let mut current = path.to_owned();
        while let Some(file) = next.take() {
            let backing_path = resolve(&current, &file.path);
            if backing.len() + 1 >= MAX_CHAIN_DEPTH {
                return Err(Error::BackingChainTooDeep(MAX_CHAIN_DEPTH));
            }
            if !seen.insert(canonical(&backing_path)?) {
                return Err(Error::BackingLoop(backing_path));
            }
            let layer = open_backing(&backing_path, file.format.as_deref()).map_err(|e| {
                Error::Backing {
                    path: backing_path.clone(),
                    source: Box::new(e),
                }
            })?;
            tracing::debug!(path = %backing_path.display(), depth = backing.len() + 1, "opened backing file");
            if let Layer::Qcow2(image) = &layer {
                next = image.header().backing.clone();
            }
            backing.push(layer);
            current = backing_path;
        }
        Ok(Qcow2Reader { top, backing })
    }

    /// Opens a single qcow2 image from any byte source (bytes in memory, an
    /// already open file).
    ///
    /// A backing file named by the image is not opened, since there is no
    /// directory to find it in: unallocated clusters then read as zeros, as
    /// if the image had no backing file. [`backing_file`](Self::backing_file)
    /// tells whether that matters.
    pub fn from_source(source: impl ReadAt + 'static) -> Result<Self, Error> {
        Ok(Qcow2Reader {
            top: Image::open(Box::new(source))?,
            backing: Vec::new(),
        })
    }

    /// Size of the guest disk in bytes. Like QEMU, this ignores a partial
    /// last 512-byte sector (`qemu-img` never creates one).
    pub fn virtual_size(&self) -> u64 {
        self.top.virtual_size()
    }

    /// Cluster size of this image (not of its backing files).
    pub fn cluster_size(&self) -> u64 {
        self.top.header().cluster_size()
    }

    /// qcow2 version of this image: 2 or 3.
    pub fn version(&self) -> u32 {
        self.top.header().version
    }

    /// Compression method of this image's compressed clusters.
    pub fn compression(&self) -> Compression {
        self.top.header().compression
    }

    /// The backing file this image names, if any.
    pub fn backing_file(&self) -> Option<&BackingFile> {
        self.top.header().backing.as_ref()
    }

    /// Number of images read through: 1 without a (opened) backing file.
    pub fn chain_len(&self) -> usize {
        1 + self.backing.len()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), Error> {
        let size = self.virtual_size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len, size }),
        }
    }

    /// Follows the chain for guest bytes `offset..offset + max_len` and
    /// returns how the first byte resolves and how many bytes resolve alike.
    fn resolve(&self, offset: u64, max_len: u64) -> Result<(Resolved<'_>, u64), Error> {
        let (resolved, mut len) = map_image(&self.top, offset, max_len)?;
        if !matches!(resolved, Resolved::Unallocated) {
            return Ok((resolved, len));
        }
        for layer in &self.backing {
            let size = layer.virtual_size();
            if offset >= size {
                // A backing file shorter than the image reads as zeros.
                break;
            }
            let (resolved, n) = layer.map(offset, len.min(size - offset))?;
            len = n;
            if !matches!(resolved, Resolved::Unallocated) {
                return Ok((resolved, len));
            }
        }
        Ok((Resolved::Unallocated, len))
    }

    /// Fills `buf` with the guest bytes at `offset`. The range must lie
    /// within the virtual size.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (resolved, n) = self.resolve(pos, (buf.len() - done) as u64)?;
            let part = &mut buf[done..done + n as usize];
            match resolved {
                Resolved::Data { image, host } => image.read_data(host, part)?,
                Resolved::Raw { source, offset } => source.read_exact_at(part, offset)?,
                Resolved::Compressed { image, entry } => {
                    let within = pos % image.header().cluster_size();
                    image.read_compressed(entry, within, part)?
                }
                Resolved::Zero | Resolved::Unallocated => part.fill(0),
            }
            done += n as usize;
        }
        Ok(())
    }

    /// The allocation of guest bytes `offset..offset + len`, as maximal runs.
    pub fn extents(&self, offset: u64, len: u64) -> Result<Extents<'_>, Error> {
        self.check_range(offset, len)?;
        Ok(Extents {
            reader: self,
            pos: offset,
            end: offset + len,
            pending: None,
            error: None,
        })
    }

    /// [`extents`](Self::extents), collected.
    pub fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>, Error> {
        self.extents(offset, len)?.collect()
    }

    fn next_run(&self, pos: u64, end: u64) -> Result<Extent, Error> {
        let (resolved, n) = self.resolve(pos, end - pos)?;
        let allocation = match resolved {
            Resolved::Data { .. } | Resolved::Compressed { .. } | Resolved::Raw { .. } => {
                Allocation::Data
            }
            Resolved::Zero => Allocation::Zero,
            Resolved::Unallocated => Allocation::Unallocated,
        };
        Ok(Extent {
            offset: pos,
            len: n,
            allocation,
        })
    }
}

/// Iterator over maximal runs of one [`Allocation`]; see
/// [`Qcow2Reader::extents`].
pub struct Extents<'a> {
    reader: &'a Qcow2Reader,
    pos: u64,
    end: u64,
    pending: Option<Extent>,
    error: Option<Error>,
}

impl Iterator for Extents<'_> {
    type Item = Result<Extent, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.error.take() {
            return Some(Err(e));
        }
        let mut current = match self.pending.take() {
            Some(extent) => extent,
            None if self.pos < self.end => match self.reader.next_run(self.pos, self.end) {
                Ok(extent) => {
                    self.pos += extent.len;
                    extent
                }
                Err(e) => {
                    self.pos = self.end;
                    return Some(Err(e));
                }
            },
            None => return None,
        };
        while self.pos < self.end {
            match self.reader.next_run(self.pos, self.end) {
                Ok(next) => {
                    self.pos += next.len;
                    if next.allocation == current.allocation {
                        current.len += next.len;
                    } else {
                        self.pending = Some(next);
                        break;
                    }
                }
                Err(e) => {
                    // Report what we have; the error comes next.
                    self.pos = self.end;
                    self.error = Some(e);
                    break;
                }
            }
        }
        Some(Ok(current))
    }
}

fn canonical(path: &Path) -> Result<PathBuf, Error> {
    std::fs::canonicalize(path).map_err(|source| Error::Open {
        path: path.to_owned(),
        source,
    })
}

/// Where a backing file name points, seen from the image at `image`.
fn resolve(image: &Path, name: &Path) -> PathBuf {
    if name.is_absolute() {
        return name.to_owned();
    }
    match image.parent() {
        Some(dir) => dir.join(name),
        None => name.to_owned(),
    }
}

fn open_backing(path: &Path, format: Option<&str>) -> Result<Layer, Error> {
    let file = open_file(path)?;
    let qcow2 = match format {
        Some("qcow2") => true,
        Some("raw") | Some("file") => false,
        Some(other) => return Err(Error::UnsupportedBackingFormat(other.to_owned())),
        None => {
            let mut magic = [0u8; 4];
            let len = ReadAt::len(&file)?;
            len >= 4 && {
                ReadAt::read_exact_at(&file, &mut magic, 0)?;
                is_qcow2(&magic)
            }
        }
    };
    if qcow2 {
        Ok(Layer::Qcow2(Box::new(Image::open(Box::new(file))?)))
    } else {
        let len = ReadAt::len(&file)?;
        Ok(Layer::Raw {
            source: Box::new(file),
            len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Qcow2Writer;

    const CS: u64 = 65536;

    /// A 1 MiB image with clusters 0 and 2 holding data. Layout: header,
    /// data at clusters 1 and 2, L2 table at 3, L1 table at 4, refcount
    /// table at 5, refcount block at 6.
    fn image(dir: &Path, name: &str) -> (PathBuf, Vec<u8>) {
        let path = dir.join(name);
        let mut w = Qcow2Writer::create(&path, 1 << 20, CS).unwrap();
        w.write_cluster(0, &vec![0xaa; CS as usize]).unwrap();
        w.write_cluster(2, &vec![0xbb; CS as usize]).unwrap();
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, 7 * CS);
        (path, bytes)
    }

    fn put64(b: &mut [u8], at: u64, v: u64) {
        b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
    }

    const L1_ENTRY: u64 = 4 * CS;
    const L2_ENTRY_0: u64 = 3 * CS;

    fn read_all(reader: &Qcow2Reader) -> Result<Vec<u8>, Error> {
        let mut buf = vec![0u8; reader.virtual_size() as usize];
        reader.read_at(0, &mut buf)?;
        Ok(buf)
    }

    #[test]
    fn writer_image_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let (_, bytes) = image(dir.path(), "a.qcow2");
        let reader = Qcow2Reader::from_source(bytes).unwrap();
        let data = read_all(&reader).unwrap();
        assert!(data[..CS as usize].iter().all(|&b| b == 0xaa));
        assert!(data[CS as usize..2 * CS as usize].iter().all(|&b| b == 0));
        assert!(data[2 * CS as usize..3 * CS as usize]
            .iter()
            .all(|&b| b == 0xbb));
        let ext = reader.allocation(0, 1 << 20).unwrap();
        let kinds: Vec<_> = ext.iter().map(|e| (e.offset, e.allocation)).collect();
        assert_eq!(
            kinds,
            [
                (0, Allocation::Data),
                (CS, Allocation::Unallocated),
                (2 * CS, Allocation::Data),
                (3 * CS, Allocation::Unallocated)
            ]
        );
    }

    #[test]
    fn ranges_beyond_the_disk_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, bytes) = image(dir.path(), "a.qcow2");
        let reader = Qcow2Reader::from_source(bytes).unwrap();
        let mut buf = [0u8; 2];
        for offset in [(1 << 20) - 1, 1 << 20, u64::MAX, u64::MAX - 1] {
            assert!(matches!(
                reader.read_at(offset, &mut buf),
                Err(Error::OutOfRange { .. })
            ));
        }
        assert!(reader.extents(1, u64::MAX).is_err());
        reader.read_at(1 << 20, &mut []).unwrap();
    }

    fn corrupt_with(bytes: &[u8], at: u64, value: u64) -> Result<Vec<u8>, Error> {
        let mut b = bytes.to_vec();
        put64(&mut b, at, value);
        let reader = Qcow2Reader::from_source(b)?;
        read_all(&reader)
    }

    fn expect_corrupt(result: Result<Vec<u8>, Error>, what: &str) {
        match result {
            Err(Error::Corrupt(msg)) => assert!(msg.contains(what), "{msg}"),
            other => panic!("expected corrupt ({what}), got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn bad_l2_table_offsets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, bytes) = image(dir.path(), "a.qcow2");
        expect_corrupt(corrupt_with(&bytes, L1_ENTRY, 3 * CS + 512), "aligned");
        expect_corrupt(corrupt_with(&bytes, L1_ENTRY, 7 * CS), "beyond end of file");
        expect_corrupt(
            corrupt_with(&bytes, L1_ENTRY, 1 << 55),
            "beyond end of file",
        );
        expect_corrupt(
            corrupt_with(&bytes, L1_ENTRY, 4 * CS),
            "overlaps the L1 table",
        );
        expect_corrupt(
            corrupt_with(&bytes, L1_ENTRY, 5 * CS),
            "overlaps the refcount table",
        );
        // Reserved bits are ignored, as QEMU does.
        let data = corrupt_with(&bytes, L1_ENTRY, (3 * CS) | 0x7f00_0000_0000_0000).unwrap();
        assert_eq!(data[0], 0xaa);
    }

    #[test]
    fn bad_data_cluster_offsets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_, bytes) = image(dir.path(), "a.qcow2");
        expect_corrupt(corrupt_with(&bytes, L2_ENTRY_0, CS + 4096), "aligned");
        expect_corrupt(
            corrupt_with(&bytes, L2_ENTRY_0, 7 * CS),
            "beyond end of file",
        );
        expect_corrupt(
            corrupt_with(&bytes, L2_ENTRY_0, (1 << 62) | (100 * CS)),
            "compressed cluster",
        );
    }

    #[test]
    fn zero_flag_reads_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let (_, mut bytes) = image(dir.path(), "a.qcow2");
        put64(&mut bytes, L2_ENTRY_0, (1 << 63) | CS | 1);
        let reader = Qcow2Reader::from_source(bytes).unwrap();
        assert!(read_all(&reader).unwrap()[..CS as usize]
            .iter()
            .all(|&b| b == 0));
        assert_eq!(
            reader.allocation(0, CS).unwrap()[0].allocation,
            Allocation::Zero
        );
    }

    #[test]
    fn garbage_compressed_data_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (_, bytes) = image(dir.path(), "a.qcow2");
        // Points at the 0xaa cluster, which is not a deflate stream.
        let entry = (1 << 62) | (3 << (62 - 8)) | CS;
        match corrupt_with(&bytes, L2_ENTRY_0, entry) {
            Err(Error::Decompress { host_offset, .. }) => assert_eq!(host_offset, CS),
            other => panic!("{:?}", other.map(|_| ())),
        }
    }

    /// Gives the image at `path` a backing file `name`, stored right after
    /// the writer's header and end-of-extensions marker.
    fn set_backing(path: &Path, name: &str) {
        let mut b = std::fs::read(path).unwrap();
        let at = 120u64;
        put64(&mut b, 8, at);
        b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        b[at as usize..at as usize + name.len()].copy_from_slice(name.as_bytes());
        std::fs::write(path, b).unwrap();
    }

    #[test]
    fn backing_loops_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (me, _) = image(dir.path(), "me.qcow2");
        set_backing(&me, "me.qcow2");
        assert!(matches!(
            Qcow2Reader::open(&me),
            Err(Error::BackingLoop(p)) if p == me
        ));

        let (a, _) = image(dir.path(), "a.qcow2");
        let (b, _) = image(dir.path(), "b.qcow2");
        set_backing(&a, "b.qcow2");
        set_backing(&b, "./sub/../a.qcow2");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        match Qcow2Reader::open(&a) {
            Err(Error::BackingLoop(p)) => assert!(p.ends_with("a.qcow2")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backing_chain_reads_through() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0x11u8; 3 * CS as usize / 2]).unwrap();
        let (top, _) = image(dir.path(), "top.qcow2");
        set_backing(&top, "base.raw");
        let reader = Qcow2Reader::open(&top).unwrap();
        assert_eq!(reader.chain_len(), 2);
        let data = read_all(&reader).unwrap();
        let cs = CS as usize;
        assert!(data[..cs].iter().all(|&b| b == 0xaa));
        assert!(data[cs..cs + cs / 2].iter().all(|&b| b == 0x11));
        assert!(data[cs + cs / 2..2 * cs].iter().all(|&b| b == 0));
        let ext = reader.allocation(0, 4 * CS).unwrap();
        let kinds: Vec<_> = ext.iter().map(|e| (e.offset, e.allocation)).collect();
        assert_eq!(
            kinds,
            [
                (0, Allocation::Data),
                (3 * CS / 2, Allocation::Unallocated),
                (2 * CS, Allocation::Data),
                (3 * CS, Allocation::Unallocated)
            ]
        );
    }

    #[test]
    fn unsupported_backing_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (top, _) = image(dir.path(), "top.qcow2");
        std::fs::write(dir.path().join("base.vmdk"), b"KDMV").unwrap();
        // Backing format extension "vmdk" in place of the end marker, name
        // after it.
        let mut b = std::fs::read(&top).unwrap();
        b[112..116].copy_from_slice(&0xe279_2acau32.to_be_bytes());
        b[116..120].copy_from_slice(&4u32.to_be_bytes());
        b[120..124].copy_from_slice(b"vmdk");
        put64(&mut b, 8, 136);
        b[16..20].copy_from_slice(&9u32.to_be_bytes());
        b[136..145].copy_from_slice(b"base.vmdk");
        std::fs::write(&top, b).unwrap();
        match Qcow2Reader::open(&top) {
            Err(Error::Backing { source, .. }) => {
                assert!(matches!(*source, Error::UnsupportedBackingFormat(ref f) if f == "vmdk"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_name_their_cause() {
        let err = Qcow2Reader::open("/nonexistent/x.qcow2").unwrap_err();
        assert_eq!(err.to_string(), "cannot open /nonexistent/x.qcow2");
        assert!(std::error::Error::source(&err).is_some());
    }

    /// Random byte flips in a small image: opening and reading must fail
    /// cleanly or succeed, never panic or allocate wildly.
    #[test]
    fn mutated_images_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.qcow2");
        let mut w = Qcow2Writer::create(&path, 300_000, 512).unwrap();
        for i in (0..586).step_by(3) {
            w.write_cluster(i, &[i as u8 | 1; 512]).unwrap();
        }
        w.finish().unwrap();
        let original = std::fs::read(&path).unwrap();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut opened = 0;
        for _ in 0..2000 {
            let mut b = original.clone();
            for _ in 0..1 + next() % 6 {
                // Favour the header and the metadata at the end.
                let at = match next() % 3 {
                    0 => next() % 128,
                    1 => b.len() as u64 - 1 - next() % 8192,
                    _ => next() % b.len() as u64,
                } as usize;
                b[at] = next() as u8;
            }
            if let Ok(reader) = Qcow2Reader::from_source(b) {
                opened += 1;
                let size = reader.virtual_size().min(1 << 20);
                let mut buf = vec![0u8; size as usize];
                let _ = reader.read_at(0, &mut buf);
                if let Ok(extents) = reader.extents(0, reader.virtual_size()) {
                    for extent in extents.take(1000) {
                        if extent.is_err() {
                            break;
                        }
                    }
                }
            }
        }
        assert!(opened > 100, "only {opened} mutants opened");
    }
}
