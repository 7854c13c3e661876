//! Content-addressed chunk store.
//!
//! Everything spore keeps — image blocks, layer tables, manifests, later
//! template memory — is a chunk named by the BLAKE3 hash of its contents.
//! Identical data is therefore stored once, whichever image or layer it
//! belongs to, and a chunk that comes from anywhere (disk, peer, origin) is
//! checked against its name before it is used.
//!
//! On disk, each chunk is one file `chunks/<2 hex>/<64 hex>` holding a
//! 16-byte header (magic, version, codec, lengths) and the payload, raw or
//! zstd-compressed. The format is described in docs/formats.md.
//!
//! Writes are not synced one by one: a writer stores a batch of chunks and
//! then calls [`ChunkStore::sync`] before it publishes anything that refers
//! to them (a layer, a name). That keeps imports fast and still guarantees
//! that no durable metadata ever points at a chunk a crash could lose.
//!
//! All file I/O goes through [`spore_files::Files`], so that the crash
//! tests can run the store on files that forget, at a simulated power cut,
//! whatever was not synced: a chunk renamed into place before its bytes
//! reached the disk is then found short or wrong, moved aside and fetched
//! or written again, never trusted.

mod id;

pub use id::{ChunkId, ParseChunkIdError};

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use spore_files::{Files, RealFiles};

/// Magic at the start of every chunk file.
pub const CHUNK_MAGIC: [u8; 4] = *b"SPCK";
/// Current chunk file version.
pub const CHUNK_VERSION: u8 = 1;
/// Largest chunk the store accepts (also bounds what a reader allocates).
pub const MAX_CHUNK_SIZE: usize = 64 << 20;
const HEADER_LEN: usize = 16;

const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;

/// How new chunks are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Store payloads as they are.
    None,
    /// zstd at a fast level; kept only where it saves at least 1/8.
    #[default]
    Zstd,
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "zstd" => Ok(Self::Zstd),
            other => Err(format!(
                "unknown compression {other:?} (expected none or zstd)"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("chunk {0} is not in the store")]
    NotFound(ChunkId),
    #[error("chunk {id} is corrupt: {why}")]
    Corrupt { id: ChunkId, why: &'static str },
    #[error("chunk of {0} bytes is larger than the limit of {MAX_CHUNK_SIZE}")]
    TooLarge(usize),
    #[error("chunk store I/O at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Error {
    fn io(path: &Path, source: io::Error) -> Self {
        Error::Io {
            path: path.to_owned(),
            source,
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match &e {
            Error::NotFound(_) => io::ErrorKind::NotFound,
            Error::Corrupt { .. } => io::ErrorKind::InvalidData,
            Error::TooLarge(_) => io::ErrorKind::InvalidInput,
            Error::Io { source, .. } => source.kind(),
        };
        io::Error::new(kind, e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// True when every byte of `data` is zero. Zero blocks are never stored.
pub fn is_zero(data: &[u8]) -> bool {
    let words = data.chunks_exact(16);
    let tail = words.remainder();
    words
        .into_iter()
        .all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
        && tail.iter().all(|&b| b == 0)
}

/// Counters of what the store did since it was opened.
#[derive(Debug, Default)]
pub struct Stats {
    pub chunks_written: AtomicU64,
    pub bytes_written: AtomicU64,
    pub chunks_deduplicated: AtomicU64,
    pub chunks_read: AtomicU64,
}

/// A directory of content-addressed chunks.
#[derive(Debug)]
pub struct ChunkStore {
    files: Arc<dyn Files>,
    root: PathBuf,
    compression: Compression,
    stats: Stats,
}

/// What [`ChunkStore::put`] did with a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Put {
    pub id: ChunkId,
    /// Bytes the chunk occupies on disk (header included).
    pub stored_len: u64,
    /// False when the store already held the chunk.
    pub new: bool,
}

impl ChunkStore {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: impl Into<PathBuf>, compression: Compression) -> Result<Self> {
        let store = Self::open_on(Arc::new(RealFiles), root, compression)?;
        // Chunks hold guest data (template RAM too): root only.
        std::fs::set_permissions(
            &store.root,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(|e| Error::io(&store.root, e))?;
        Ok(store)
    }

    /// Opens (creating if needed) the store at `root` on `files`.
    pub fn open_on(
        files: Arc<dyn Files>,
        root: impl Into<PathBuf>,
        compression: Compression,
    ) -> Result<Self> {
        let root = root.into();
        files.create_dir(&root).map_err(|e| Error::io(&root, e))?;
        Ok(ChunkStore {
            files,
            root,
            compression,
            stats: Stats::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    fn path_of(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.root.join(&hex[..2]).join(&hex)
    }

    /// True when a chunk file is present and not visibly truncated (not
    /// verified: a read hashes it). Cheap: one `stat`.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.files
            .size(&self.path_of(id))
            .is_ok_and(|len| len > HEADER_LEN as u64)
    }

    /// True when the chunk file is present and whole: its header is valid
    /// and its length is what the header says. A file that is not (a
    /// crash can leave a chunk renamed into place before its bytes reached
    /// the disk) is moved aside and reported missing, so that it is
    /// fetched or written again instead of trusted. Costs a 16-byte read.
    pub fn present(&self, id: &ChunkId) -> bool {
        self.existing_checked(id).is_some()
    }

    /// The chunk file under `id` if it is whole; a damaged one is moved
    /// aside.
    fn existing_checked(&self, id: &ChunkId) -> Option<u64> {
        let path = self.path_of(id);
        let file = self.files.open(&path, false).ok()?;
        let len = file.len().ok()?;
        let mut header = [0u8; HEADER_LEN];
        let whole = len >= HEADER_LEN as u64
            && file.read_at(&mut header, 0).is_ok()
            && header[..4] == CHUNK_MAGIC
            && header[4] == CHUNK_VERSION
            && len
                == HEADER_LEN as u64
                    + u32::from_le_bytes(header[12..16].try_into().expect("4 bytes")) as u64;
        if whole {
            return Some(len);
        }
        self.quarantine(id, "truncated or malformed chunk file");
        None
    }

    /// Moves a damaged chunk file to `corrupt/` (kept for inspection, out
    /// of every lookup), so the chunk counts as missing from now on.
    pub fn quarantine(&self, id: &ChunkId, why: &str) {
        let path = self.path_of(id);
        let dir = self.root.join("corrupt");
        let _ = self.files.create_dir(&dir);
        static N: AtomicU64 = AtomicU64::new(0);
        let to = dir.join(format!(
            "{}.{}.{}",
            id.to_hex(),
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        match self.files.rename(&path, &to) {
            Ok(()) => {
                tracing::warn!(chunk = %id, why, to = %to.display(), "damaged chunk file moved aside; it will be fetched or written again")
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(chunk = %id, why, error = %e, "cannot move a damaged chunk aside; removing it");
                let _ = self.files.remove(&path);
            }
        }
    }

    /// Stores `data` under its hash. Not durable until [`ChunkStore::sync`].
    pub fn put(&self, data: &[u8]) -> Result<Put> {
        let id = ChunkId::of(data);
        self.put_with_id(id, data)
    }

    /// Stores `data` whose hash the caller has already computed (and, for
    /// data from elsewhere, verified).
    pub fn put_with_id(&self, id: ChunkId, data: &[u8]) -> Result<Put> {
        if data.len() > MAX_CHUNK_SIZE {
            return Err(Error::TooLarge(data.len()));
        }
        if let Some(put) = self.existing(&id) {
            return Ok(put);
        }
        let compressed = match self.compression {
            Compression::Zstd => compress(data).filter(|c| c.len() <= data.len() - data.len() / 8),
            Compression::None => None,
        };
        let (codec, payload): (u8, &[u8]) = match &compressed {
            Some(c) => (CODEC_ZSTD, c),
            None => (CODEC_RAW, data),
        };
        let mut header = [0u8; HEADER_LEN];
        header[..4].copy_from_slice(&CHUNK_MAGIC);
        header[4] = CHUNK_VERSION;
        header[5] = codec;
        header[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
        header[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        self.write_file(id, &[&header, payload])
    }

    /// Stores a chunk file that came from another host (the same framing
    /// as on disk) as it is, once it has been decoded and its bytes hashed
    /// to `id`; returns the decoded bytes. Unlike decoding and then
    /// [`ChunkStore::put_with_id`], it does not compress again what the
    /// sender already compressed: in a boot storm that was most of each
    /// host's CPU for distribution.
    pub fn put_verified_file(&self, id: ChunkId, raw: &[u8]) -> Result<(Put, Vec<u8>)> {
        let data = decode_chunk_file(&id, raw)?;
        let put = match self.existing(&id) {
            Some(put) => put,
            None => self.write_file(id, &[raw])?,
        };
        Ok((put, data))
    }

    /// The chunk already stored under `id`, if it checks out against its
    /// id (counted as deduplicated). A damaged file is moved aside, so the
    /// caller writes the chunk again: importing or fetching data repairs
    /// the store. Verified whole, not only by its header: a power cut can
    /// leave a chunk file of the right length with some of its pages never
    /// written, and a new name must not come to rest on it (the crash
    /// tests found that).
    fn existing(&self, id: &ChunkId) -> Option<Put> {
        let raw = self.read_file(id).ok()??;
        if let Err(e) = decode_chunk_file(id, &raw) {
            let why = match &e {
                Error::Corrupt { why, .. } => why,
                _ => "unreadable chunk file",
            };
            self.quarantine(id, why);
            return None;
        }
        let stored_len = raw.len() as u64;
        self.stats
            .chunks_deduplicated
            .fetch_add(1, Ordering::Relaxed);
        Some(Put {
            id: *id,
            stored_len,
            new: false,
        })
    }

    /// Writes a chunk file made of `parts` under `id`'s name.
    fn write_file(&self, id: ChunkId, parts: &[&[u8]]) -> Result<Put> {
        let path = self.path_of(&id);
        let dir = path.parent().expect("chunk path has a parent");
        self.files.create_dir(dir).map_err(|e| Error::io(dir, e))?;
        // Write beside the final name and rename, so a reader never sees half
        // a chunk and a crash leaves at worst a stray temporary file.
        // Unique per write: two threads storing the same chunk at once
        // (overlapping fetches) must not share a temporary file.
        static NEXT_TMP: AtomicU64 = AtomicU64::new(0);
        let tmp = dir.join(format!(
            ".{}.tmp{}.{}",
            id.to_hex(),
            std::process::id(),
            NEXT_TMP.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> io::Result<()> {
            let f = self.files.open(&tmp, true)?;
            let mut at = 0;
            for part in parts {
                f.write_at(part, at)?;
                at += part.len() as u64;
            }
            self.files.rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = self.files.remove(&tmp);
            return Err(Error::io(&path, e));
        }
        let stored_len = parts.iter().map(|p| p.len() as u64).sum();
        self.stats.chunks_written.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_written
            .fetch_add(stored_len, Ordering::Relaxed);
        Ok(Put {
            id,
            stored_len,
            new: true,
        })
    }

    /// Reads a chunk and checks it against its id.
    pub fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let raw = self.read_file(id)?.ok_or(Error::NotFound(*id))?;
        let data = decode_chunk_file(id, &raw).inspect_err(|e| {
            // Never trusted again: moved aside, so the chunk is missing
            // and a fetch or an import brings a good copy.
            if let Error::Corrupt { why, .. } = e {
                self.quarantine(id, why);
            }
        })?;
        self.stats.chunks_read.fetch_add(1, Ordering::Relaxed);
        Ok(data)
    }

    /// The chunk file as stored (header and possibly compressed payload),
    /// unverified: for sending to another host, which verifies it.
    pub fn get_raw(&self, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        self.read_file(id)
    }

    /// The whole chunk file under `id`, if there is one. Bounded: a file
    /// longer than any chunk can be is corrupt, and is not read.
    fn read_file(&self, id: &ChunkId) -> Result<Option<Vec<u8>>> {
        let path = self.path_of(id);
        let read = || -> io::Result<Vec<u8>> {
            let file = self.files.open(&path, false)?;
            let len = file.len()?;
            let limit = (HEADER_LEN + MAX_CHUNK_SIZE) as u64;
            let mut raw = vec![0u8; len.min(limit + 1) as usize];
            file.read_at(&mut raw, 0)?;
            Ok(raw)
        };
        match read() {
            Ok(raw) => Ok(Some(raw)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Bytes the chunk occupies on disk, if present.
    pub fn stored_len(&self, id: &ChunkId) -> Option<u64> {
        self.files.size(&self.path_of(id)).ok()
    }

    /// Deletes a chunk. Missing chunks are not an error.
    pub fn remove(&self, id: &ChunkId) -> Result<()> {
        let path = self.path_of(id);
        match self.files.remove(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Every chunk id present in the store (stray temporary files skipped).
    pub fn list(&self) -> Result<Vec<ChunkId>> {
        let mut ids = Vec::new();
        let top = self
            .files
            .list(&self.root)
            .map_err(|e| Error::io(&self.root, e))?;
        // The fan-out directories: two hex digits.
        for name in top
            .iter()
            .filter(|n| n.len() == 2 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            let dir = self.root.join(name);
            for entry in self.files.list(&dir).map_err(|e| Error::io(&dir, e))? {
                if let Ok(id) = entry.parse() {
                    ids.push(id);
                }
            }
        }
        Ok(ids)
    }

    /// Makes every chunk written so far durable (one `syncfs` of the store's
    /// file system, then an fsync of each fan-out directory is unnecessary:
    /// syncfs covers directory entries too).
    pub fn sync(&self) -> Result<()> {
        self.files
            .sync_tree(&self.root)
            .map_err(|e| Error::io(&self.root, e))
    }
}

thread_local! {
    // zstd contexts are worth keeping: making one per chunk (hundreds of
    // KiB of tables) cost as much as the work on a 64 KiB chunk.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// `data` compressed at level 1 with this thread's context; `None` if zstd
/// failed (the chunk is then stored raw).
fn compress(data: &[u8]) -> Option<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(1).ok();
        }
        c.as_mut()?.compress(data).ok()
    })
}

/// `payload` decompressed into at most `capacity` bytes with this thread's
/// context.
fn decompress(payload: &[u8], capacity: usize) -> io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        d.as_mut()
            .expect("made above")
            .decompress(payload, capacity)
    })
}

/// Decodes the bytes of a chunk file and verifies them against `id`.
///
/// Public so that fuzzing and peers (whose bytes come in the same framing)
/// can use it.
pub fn decode_chunk_file(id: &ChunkId, raw: &[u8]) -> Result<Vec<u8>> {
    let corrupt = |why| Error::Corrupt { id: *id, why };
    if raw.len() < HEADER_LEN {
        return Err(corrupt("truncated header"));
    }
    if raw[..4] != CHUNK_MAGIC {
        return Err(corrupt("bad magic"));
    }
    if raw[4] != CHUNK_VERSION {
        return Err(corrupt("unsupported version"));
    }
    let raw_len = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes")) as usize;
    let stored_len = u32::from_le_bytes(raw[12..16].try_into().expect("4 bytes")) as usize;
    if raw_len > MAX_CHUNK_SIZE {
        return Err(corrupt("length over limit"));
    }
    let payload = &raw[HEADER_LEN..];
    if payload.len() != stored_len {
        return Err(corrupt("payload length mismatch"));
    }
    let data = match raw[5] {
        CODEC_RAW => payload.to_vec(),
        CODEC_ZSTD => {
            let data = decompress(payload, raw_len).map_err(|_| corrupt("bad zstd payload"))?;
            if data.len() != raw_len {
                return Err(corrupt("decompressed length mismatch"));
            }
            data
        }
        _ => return Err(corrupt("unknown codec")),
    };
    if data.len() != raw_len {
        return Err(corrupt("length mismatch"));
    }
    if ChunkId::of(&data) != *id {
        return Err(corrupt("hash mismatch"));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{self, File};

    fn store(c: Compression) -> (tempfile::TempDir, ChunkStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = ChunkStore::open(dir.path().join("chunks"), c).unwrap();
        (dir, s)
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4096]));
        assert!(is_zero(&[]));
        let mut v = vec![0u8; 4099];
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[7] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn a_file_from_elsewhere_is_stored_as_sent_once_verified() {
        let (_d1, sender) = store(Compression::Zstd);
        let (_d2, receiver) = store(Compression::Zstd);
        let data = b"compressible ".repeat(5000);
        let put = sender.put(&data).unwrap();
        let raw = sender.get_raw(&put.id).unwrap().unwrap();
        let (got, decoded) = receiver.put_verified_file(put.id, &raw).unwrap();
        assert!(got.new);
        assert_eq!(decoded, data);
        // Byte for byte what the sender had: not compressed a second time.
        assert_eq!(receiver.get_raw(&put.id).unwrap().unwrap(), raw);
        assert_eq!(receiver.get(&put.id).unwrap(), data);
        let (again, _) = receiver.put_verified_file(put.id, &raw).unwrap();
        assert!(!again.new);
    }

    #[test]
    fn a_file_that_does_not_match_its_id_is_not_stored() {
        let (_d1, sender) = store(Compression::Zstd);
        let (_d2, receiver) = store(Compression::Zstd);
        let a = sender.put(&[1u8; 9000]).unwrap();
        let b = sender.put(&[2u8; 9000]).unwrap();
        let raw_b = sender.get_raw(&b.id).unwrap().unwrap();
        let e = receiver.put_verified_file(a.id, &raw_b).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{e}");
        assert!(!receiver.contains(&a.id));
        let mut cut = raw_b.clone();
        cut.truncate(raw_b.len() - 1);
        assert!(matches!(
            receiver.put_verified_file(b.id, &cut),
            Err(Error::Corrupt { .. })
        ));
        assert!(!receiver.contains(&b.id));
    }

    #[test]
    fn put_get_roundtrip_and_dedup() {
        for c in [Compression::None, Compression::Zstd] {
            let (_d, s) = store(c);
            let data: Vec<u8> = (0..100_000u32).map(|i| (i % 7) as u8).collect();
            let p = s.put(&data).unwrap();
            assert!(p.new);
            assert_eq!(s.get(&p.id).unwrap(), data);
            let again = s.put(&data).unwrap();
            assert!(!again.new);
            assert_eq!(again.id, p.id);
            assert_eq!(s.list().unwrap(), vec![p.id]);
            if c == Compression::Zstd {
                assert!(
                    p.stored_len < data.len() as u64 / 4,
                    "compressible data compressed"
                );
            }
            s.sync().unwrap();
            s.remove(&p.id).unwrap();
            assert!(matches!(s.get(&p.id), Err(Error::NotFound(_))));
        }
    }

    #[test]
    fn concurrent_puts_of_one_chunk_all_succeed_and_store_it_whole() {
        let (_d, s) = store(Compression::Zstd);
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..20 {
                        s.put(&data).unwrap();
                    }
                });
            }
        });
        let id = ChunkId::of(&data);
        assert_eq!(s.get(&id).unwrap(), data);
        // No temporary files left behind.
        assert_eq!(s.list().unwrap(), vec![id]);
        let dir = s.path_of(&id).parent().unwrap().to_owned();
        assert_eq!(fs::read_dir(dir).unwrap().count(), 1);
    }

    #[test]
    fn corruption_is_detected() {
        let (_d, s) = store(Compression::None);
        let data = vec![42u8; 8192];
        let p = s.put(&data).unwrap();
        let path = s.path_of(&p.id);
        let mut raw = fs::read(&path).unwrap();
        raw[100] ^= 1;
        fs::write(&path, &raw).unwrap();
        assert!(matches!(
            s.get(&p.id),
            Err(Error::Corrupt {
                why: "hash mismatch",
                ..
            })
        ));
    }

    #[test]
    fn malformed_files_are_rejected() {
        let id = ChunkId::of(b"x");
        let mut good = Vec::from(CHUNK_MAGIC);
        good.extend_from_slice(&[CHUNK_VERSION, CODEC_RAW, 0, 0]);
        good.extend_from_slice(&1u32.to_le_bytes());
        good.extend_from_slice(&1u32.to_le_bytes());
        good.push(b'x');
        assert_eq!(decode_chunk_file(&id, &good).unwrap(), b"x");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (good[..10].to_vec(), "truncated header"),
            (
                {
                    let mut b = good.clone();
                    b[0] = b'X';
                    b
                },
                "bad magic",
            ),
            (
                {
                    let mut b = good.clone();
                    b[4] = 9;
                    b
                },
                "unsupported version",
            ),
            (
                {
                    let mut b = good.clone();
                    b[5] = 7;
                    b
                },
                "unknown codec",
            ),
            (
                {
                    let mut b = good.clone();
                    b.push(0);
                    b
                },
                "payload length mismatch",
            ),
            (
                {
                    let mut b = good.clone();
                    b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
                    b
                },
                "length over limit",
            ),
            (
                {
                    let mut b = good.clone();
                    b[5] = CODEC_ZSTD;
                    b
                },
                "bad zstd payload",
            ),
            (
                {
                    let mut b = good.clone();
                    b[16] = b'y';
                    b
                },
                "hash mismatch",
            ),
        ];
        for (bytes, want) in cases {
            match decode_chunk_file(&id, &bytes) {
                Err(Error::Corrupt { why, .. }) => assert_eq!(why, want),
                other => panic!("expected {want}, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_truncated_chunk_file_is_written_again_not_trusted() {
        let (_d, s) = store(Compression::Zstd);
        let data = b"some chunk data ".repeat(1000);
        let put = s.put(&data).unwrap();
        let path = s.path_of(&put.id);
        // What a power cut can leave: the name, without the bytes.
        for len in [0u64, 10, 20] {
            File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(len)
                .unwrap();
            assert!(!s.present(&put.id), "a {len}-byte file passed as present");
            let again = s.put(&data).unwrap();
            assert!(again.new, "a {len}-byte file was deduplicated against");
            assert_eq!(s.get(&put.id).unwrap(), data);
        }
    }

    #[test]
    fn a_corrupt_chunk_is_moved_aside_and_reported_missing() {
        let (_d, s) = store(Compression::None);
        let data = vec![7u8; 5000];
        let put = s.put(&data).unwrap();
        let path = s.path_of(&put.id);
        let mut raw = fs::read(&path).unwrap();
        raw[100] ^= 1;
        fs::write(&path, &raw).unwrap();
        assert!(matches!(s.get(&put.id), Err(Error::Corrupt { .. })));
        // Out of every lookup now, kept for inspection.
        assert!(matches!(s.get(&put.id), Err(Error::NotFound(_))));
        assert!(!s.contains(&put.id));
        assert_eq!(fs::read_dir(s.root().join("corrupt")).unwrap().count(), 1);
        assert!(!s.list().unwrap().contains(&put.id));
        // Writing it again repairs the store.
        assert!(s.put(&data).unwrap().new);
        assert_eq!(s.get(&put.id).unwrap(), data);
    }
}
