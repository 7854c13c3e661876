//! Test fixtures: an in-memory export with allocation tracking, a registry,
//! a server on a unix socket in a tempdir, and a minimal raw NBD client for
//! feeding the server exactly the bytes a test wants.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use spore_nbd::{serve_unix, Export, Exports, Extent, ServerConfig, ServerHandle};

/// Allocation granularity of [`MemExport`].
pub const BLOCK: u64 = 4096;

/// A `Vec<u8>` disk. Blocks start unallocated (holes); writes allocate,
/// trims and zero-writes with `may_trim` deallocate.
pub struct MemExport {
    data: RwLock<Vec<u8>>,
    allocated: RwLock<Vec<bool>>,
    read_only: bool,
    /// Reads starting at this offset sleep first (to force reordering).
    slow_offset: Mutex<Option<(u64, Duration)>>,
    /// Reads starting at this offset fail with this errno.
    failing_offset: Mutex<Option<(u64, i32)>>,
    pub flushes: Mutex<u64>,
}

impl MemExport {
    pub fn new(size: u64) -> Arc<MemExport> {
        Self::build(vec![0; size as usize], false)
    }

    pub fn read_only(data: Vec<u8>) -> Arc<MemExport> {
        Self::build(data, true)
    }

    /// An export whose blocks are allocated wherever `data` is non-zero.
    pub fn with_data(data: Vec<u8>) -> Arc<MemExport> {
        Self::build(data, false)
    }

    fn build(data: Vec<u8>, read_only: bool) -> Arc<MemExport> {
        let allocated = data
            .chunks(BLOCK as usize)
            .map(|c| c.iter().any(|&b| b != 0))
            .collect();
        Arc::new(MemExport {
            data: RwLock::new(data),
            allocated: RwLock::new(allocated),
            read_only,
            slow_offset: Mutex::new(None),
            failing_offset: Mutex::new(None),
            flushes: Mutex::new(0),
        })
    }

    pub fn contents(&self) -> Vec<u8> {
        self.data.read().clone()
    }

    pub fn set_slow_read(&self, offset: u64, delay: Duration) {
        *self.slow_offset.lock() = Some((offset, delay));
    }

    pub fn set_failing_read(&self, offset: u64, errno: i32) {
        *self.failing_offset.lock() = Some((offset, errno));
    }

    fn blocks(offset: u64, length: u64) -> std::ops::Range<usize> {
        (offset / BLOCK) as usize..offset.saturating_add(length).div_ceil(BLOCK) as usize
    }

    fn zero(&self, offset: u64, length: u64, deallocate: bool) {
        let mut data = self.data.write();
        data[offset as usize..(offset + length) as usize].fill(0);
        let mut alloc = self.allocated.write();
        for b in Self::blocks(offset, length) {
            let start = b as u64 * BLOCK;
            let end = (start + BLOCK).min(data.len() as u64);
            let whole = start >= offset && end <= offset + length;
            if whole {
                alloc[b] = !deallocate;
            } else {
                alloc[b] = true;
            }
        }
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.data.read().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let slow = *self.slow_offset.lock();
        if let Some((o, delay)) = slow {
            if o == offset {
                std::thread::sleep(delay);
            }
        }
        let failing = *self.failing_offset.lock();
        if let Some((o, errno)) = failing {
            if o == offset {
                return Err(io::Error::from_raw_os_error(errno));
            }
        }
        let data = self.data.read();
        buf.copy_from_slice(&data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        self.data.write()[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        let mut alloc = self.allocated.write();
        for b in Self::blocks(offset, data.len() as u64) {
            alloc[b] = true;
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, length: u64, may_trim: bool, _fua: bool) -> io::Result<()> {
        self.zero(offset, length, may_trim);
        Ok(())
    }
    fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        self.zero(offset, length, true);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        *self.flushes.lock() += 1;
        Ok(())
    }
    fn cache(&self, _offset: u64, _length: u64) -> io::Result<()> {
        Ok(())
    }
    fn can_fast_zero(&self) -> bool {
        true
    }
    fn block_status(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        let alloc = self.allocated.read();
        let end = offset + length;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let b = (pos / BLOCK) as usize;
            let next = ((b as u64 + 1) * BLOCK).min(end);
            let hole = !alloc[b];
            match out.last_mut() {
                Some(last) if last.hole == hole => last.length += next - pos,
                _ => out.push(Extent {
                    length: next - pos,
                    hole,
                    zero: hole,
                }),
            }
            pos = next;
        }
        Ok(out)
    }
}

/// A fixed set of named exports.
#[derive(Default)]
pub struct MemExports {
    /// name -> (export, description)
    exports: Mutex<HashMap<String, (Arc<MemExport>, String)>>,
}

impl MemExports {
    pub fn add(&self, name: &str, description: &str, export: Arc<MemExport>) {
        self.exports
            .lock()
            .insert(name.to_owned(), (export, description.to_owned()));
    }

    /// Export `name` as the concrete fixture type.
    pub fn get_mem(&self, name: &str) -> Arc<MemExport> {
        let exports = self.exports.lock();
        let (export, _) = exports.get(name).expect("no such export");
        Arc::clone(export)
    }
}

impl Exports for MemExports {
    fn get(&self, name: &str) -> Option<Arc<dyn Export>> {
        let exports = self.exports.lock();
        let (export, _) = exports.get(name)?;
        Some(Arc::clone(export) as Arc<dyn Export>)
    }
    fn list(&self) -> Vec<(String, String)> {
        let mut v: Vec<_> = self
            .exports
            .lock()
            .iter()
            .map(|(n, (_, d))| (n.clone(), d.clone()))
            .collect();
        v.sort();
        v
    }
}

/// A server on a unix socket in its own tempdir.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub exports: Arc<MemExports>,
    pub handle: Option<ServerHandle>,
}

impl Fixture {
    pub fn start(exports: MemExports) -> Fixture {
        Self::start_with(exports, ServerConfig::default())
    }

    pub fn start_with(exports: MemExports, config: ServerConfig) -> Fixture {
        init_logging();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let exports = Arc::new(exports);
        let handle = serve_unix(listener, exports.clone(), config).unwrap();
        Fixture {
            dir,
            socket,
            exports,
            handle: Some(handle),
        }
    }

    /// The NBD URI of export `name`.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }

    pub fn connect(&self) -> RawClient {
        RawClient::connect(&self.socket)
    }
}

/// Whether `tool` can be run. When it cannot, the test fails under
/// `CI=true` (naming the Debian package) and is a reported, counted skip
/// elsewhere (spore-testkit).
pub fn have(tool: &str) -> bool {
    let package = match tool {
        "qemu-io" | "qemu-img" | "qemu-nbd" => "qemu-utils",
        "nbdcopy" | "nbdinfo" | "nbdsh" => "libnbd-bin",
        other => panic!("which Debian package has {other}?"),
    };
    spore_testkit::tool(tool, package)
}

/// Run a command, returning (success, stdout, stderr).
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("spawn");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const OPT_STARTTLS: u32 = 5;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// One reply chunk as the raw client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawReply {
    Simple {
        error: u32,
        handle: u64,
    },
    Chunk {
        flags: u16,
        kind: u16,
        handle: u64,
        payload: Vec<u8>,
    },
}

impl RawReply {
    pub fn handle(&self) -> u64 {
        match self {
            RawReply::Simple { handle, .. } | RawReply::Chunk { handle, .. } => *handle,
        }
    }
}

/// A hand-driven NBD client.
pub struct RawClient {
    pub stream: UnixStream,
}

impl RawClient {
    pub fn connect(path: &std::path::Path) -> RawClient {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        RawClient { stream }
    }

    /// Read the greeting and answer with FIXED_NEWSTYLE | NO_ZEROES.
    pub fn greet(&mut self) {
        let mut g = [0u8; 18];
        self.stream.read_exact(&mut g).unwrap();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
        self.stream.write_all(&3u32.to_be_bytes()).unwrap();
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.stream.write_all(&m).unwrap();
    }

    /// Read one option reply: (option, type, data).
    pub fn option_reply(&mut self) -> io::Result<(u32, u32, Vec<u8>)> {
        let mut h = [0u8; 20];
        self.stream.read_exact(&mut h)?;
        assert_eq!(&h[0..8], &0x0003_e889_0455_65a9u64.to_be_bytes());
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0; len as usize];
        self.stream.read_exact(&mut data)?;
        Ok((option, kind, data))
    }

    /// Send an option and collect replies up to the final one.
    pub fn option(&mut self, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        self.send_option(option, data);
        let mut out = Vec::new();
        loop {
            let (o, kind, data) = self.option_reply().unwrap();
            assert_eq!(o, option);
            let last = kind == REP_ACK || kind & (1 << 31) != 0;
            out.push((kind, data));
            if last {
                return out;
            }
        }
    }

    pub fn structured(&mut self) {
        let r = self.option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(r[0].0, REP_ACK);
    }

    /// `NBD_OPT_SET_META_CONTEXT` for base:allocation.
    pub fn set_base_allocation(&mut self, export: &str) {
        let r = self.option(
            OPT_SET_META_CONTEXT,
            &meta_data(export, &["base:allocation"]),
        );
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(r[0].0, REP_META_CONTEXT);
        assert_eq!(&r[0].1[4..], b"base:allocation");
    }

    /// GO to `name`, returning (size, transmission flags).
    pub fn go(&mut self, name: &str) -> (u64, u16) {
        let r = self.option(OPT_GO, &go_data(name, &[]));
        let (kind, _) = r.last().unwrap();
        assert_eq!(*kind, REP_ACK, "{r:?}");
        let export = r
            .iter()
            .find(|(k, d)| *k == REP_INFO && d[0..2] == [0, 0])
            .expect("NBD_INFO_EXPORT");
        let d = &export.1;
        (
            u64::from_be_bytes(d[2..10].try_into().unwrap()),
            u16::from_be_bytes([d[10], d[11]]),
        )
    }

    /// Handshake straight to transmission on `name`.
    pub fn open(path: &std::path::Path, name: &str, structured: bool) -> RawClient {
        let mut c = RawClient::connect(path);
        c.greet();
        if structured {
            c.structured();
            c.set_base_allocation(name);
        }
        c.go(name);
        c
    }

    pub fn request(&mut self, flags: u16, cmd: u16, handle: u64, offset: u64, length: u32) {
        self.stream
            .write_all(&request_header(flags, cmd, handle, offset, length))
            .unwrap();
    }

    /// Read one reply; for a simple reply to a successful READ pass the
    /// expected length in `read_len` to get the data.
    pub fn reply(&mut self, read_len: usize) -> io::Result<(RawReply, Vec<u8>)> {
        let mut magic = [0u8; 4];
        self.stream.read_exact(&mut magic)?;
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                self.stream.read_exact(&mut h)?;
                let error = u32::from_be_bytes(h[0..4].try_into().unwrap());
                let handle = u64::from_be_bytes(h[4..12].try_into().unwrap());
                let mut data = Vec::new();
                if error == 0 && read_len > 0 {
                    data.resize(read_len, 0);
                    self.stream.read_exact(&mut data)?;
                }
                Ok((RawReply::Simple { error, handle }, data))
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut h = [0u8; 16];
                self.stream.read_exact(&mut h)?;
                let flags = u16::from_be_bytes([h[0], h[1]]);
                let kind = u16::from_be_bytes([h[2], h[3]]);
                let handle = u64::from_be_bytes(h[4..12].try_into().unwrap());
                let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
                let mut payload = vec![0; len as usize];
                self.stream.read_exact(&mut payload)?;
                Ok((
                    RawReply::Chunk {
                        flags,
                        kind,
                        handle,
                        payload,
                    },
                    Vec::new(),
                ))
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// Whether the server closed the connection: a read hits EOF or the
    /// connection was reset. A read that times out means the server kept
    /// the connection open, and bytes mean it is still talking: both are
    /// "not closed", so a check built on this fails when the server keeps a
    /// bad connection open instead of passing on the timeout.
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.stream.read(&mut b) {
            Ok(0) => true,
            Ok(_) => {
                eprintln!(
                    "is_closed: the server sent a byte ({:#04x}) instead of closing",
                    b[0]
                );
                false
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset) => true,
            Err(e) => {
                eprintln!("is_closed: the connection is still open ({e})");
                false
            }
        }
    }
}

pub fn request_header(flags: u16, cmd: u16, handle: u64, offset: u64, length: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&cmd.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&length.to_be_bytes());
    b
}

pub fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

pub fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Server logs on stderr, filtered by `RUST_LOG` (shown for failing tests).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}
