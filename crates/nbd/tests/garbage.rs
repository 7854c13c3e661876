//! Whole sessions made of random bytes, and valid sessions with random
//! damage, played to the server over an in-memory transport: every session
//! must end, nothing may panic, and the export must never see a request
//! outside its bounds or a write when it is read-only. (The fuzz targets in
//! `fuzz/` do the same at scale; this keeps a deterministic slice in CI.)

mod common;

use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use spore_nbd::{Export, Exports, Extent, ServerConfig, Transport};

/// Counts requests the server should never have let through.
struct Checked {
    inner: Arc<MemExport>,
    violations: AtomicUsize,
    calls: AtomicUsize,
}

impl Checked {
    fn ok(&self, offset: u64, length: u64, writes: bool) -> bool {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let fits = offset
            .checked_add(length)
            .is_some_and(|end| end <= self.inner.size());
        let fine = fits && !(writes && self.inner.read_only());
        if !fine {
            self.violations.fetch_add(1, Ordering::Relaxed);
        }
        fine
    }
}

fn refused() -> io::Error {
    io::Error::other("request should have been refused")
}

impl Export for Checked {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if !self.ok(offset, buf.len() as u64, false) {
            return Err(refused());
        }
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        if !self.ok(offset, data.len() as u64, true) {
            return Err(refused());
        }
        self.inner.write(offset, data, fua)
    }
    fn write_zeroes(&self, offset: u64, length: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        if !self.ok(offset, length, true) {
            return Err(refused());
        }
        self.inner.write_zeroes(offset, length, may_trim, fua)
    }
    fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        if !self.ok(offset, length, true) {
            return Err(refused());
        }
        self.inner.trim(offset, length)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        if !self.ok(offset, length, false) {
            return Err(refused());
        }
        Ok(())
    }
    fn can_fast_zero(&self) -> bool {
        true
    }
    fn block_status(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        if !self.ok(offset, length, false) {
            return Err(refused());
        }
        self.inner.block_status(offset, length)
    }
}

struct Registry {
    disk: Arc<Checked>,
    ro: Arc<Checked>,
}

impl Exports for Registry {
    fn get(&self, name: &str) -> Option<Arc<dyn Export>> {
        match name {
            "disk" => Some(self.disk.clone()),
            "ro" => Some(self.ro.clone()),
            _ => None,
        }
    }
    fn list(&self) -> Vec<(String, String)> {
        vec![("disk".into(), "d".into()), ("ro".into(), String::new())]
    }
}

/// Plays `input` to the server in small pieces and collects its output.
struct Replay {
    input: Mutex<(Vec<u8>, usize)>,
    output: AtomicUsize,
}

impl Transport for Replay {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut guard = self.input.lock().unwrap();
        let (data, pos) = &mut *guard;
        let n = buf.len().min(data.len() - *pos).min(97);
        buf[..n].copy_from_slice(&data[*pos..*pos + n]);
        *pos += n;
        Ok(n)
    }
    fn send_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let n = bufs.iter().map(|b| b.len()).sum();
        self.output.fetch_add(n, Ordering::Relaxed);
        Ok(n)
    }
    fn shutdown(&self, _how: Shutdown) -> io::Result<()> {
        Ok(())
    }
}

fn option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// A valid session on `export`, exercising most options and commands.
fn valid_session(export: &str, seed: u64) -> Vec<u8> {
    let mut s = 3u32.to_be_bytes().to_vec();
    option(&mut s, OPT_LIST, &[]);
    option(&mut s, OPT_INFO, &go_data(export, &[1, 2, 3]));
    option(&mut s, OPT_STRUCTURED_REPLY, &[]);
    option(&mut s, OPT_LIST_META_CONTEXT, &meta_data(export, &[]));
    option(
        &mut s,
        OPT_SET_META_CONTEXT,
        &meta_data(export, &["base:allocation"]),
    );
    option(&mut s, OPT_GO, &go_data(export, &[]));
    let r = pattern(64, seed);
    for (i, cmd) in [
        CMD_WRITE,
        CMD_READ,
        5,
        CMD_WRITE_ZEROES,
        CMD_BLOCK_STATUS,
        CMD_TRIM,
        CMD_FLUSH,
    ]
    .into_iter()
    .enumerate()
    {
        let offset = u64::from(r[i]) * 512;
        let length = 512 * (1 + u32::from(r[i + 8] % 16));
        s.extend_from_slice(&request_header(0, cmd, i as u64, offset, length));
        if cmd == CMD_WRITE {
            s.extend_from_slice(&pattern(length as usize, seed));
        }
    }
    s.extend_from_slice(&request_header(0, CMD_DISC, 99, 0, 0));
    s
}

fn play(input: Vec<u8>, workers: usize) -> (usize, usize) {
    let registry = Registry {
        disk: Arc::new(Checked {
            inner: MemExport::new(256 * 1024),
            violations: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
        }),
        ro: Arc::new(Checked {
            inner: MemExport::read_only(vec![1; 128 * 1024]),
            violations: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
        }),
    };
    let transport = Replay {
        input: Mutex::new((input, 0)),
        output: AtomicUsize::new(0),
    };
    let config = ServerConfig {
        workers_per_connection: workers,
        max_inflight_bytes: 1 << 20,
        handshake_timeout: None,
        ..ServerConfig::default()
    };
    let _ = spore_nbd::serve_connection(&transport, &registry, &config);
    let violations = registry.disk.violations.load(Ordering::Relaxed)
        + registry.ro.violations.load(Ordering::Relaxed);
    let calls =
        registry.disk.calls.load(Ordering::Relaxed) + registry.ro.calls.load(Ordering::Relaxed);
    (violations, calls)
}

#[test]
fn valid_sessions_reach_the_export() {
    for export in ["disk", "ro"] {
        for workers in [0, 2] {
            let (violations, calls) = play(valid_session(export, 1), workers);
            assert_eq!(violations, 0);
            assert!(calls >= 3, "{export}: only {calls} export calls");
        }
    }
}

#[test]
fn random_bytes_never_panic() {
    for seed in 0..300u64 {
        let len = (seed as usize * 37) % 2000;
        let mut input = pattern(len, seed);
        // Half of them start with a real greeting answer and option magic.
        if seed % 2 == 0 {
            let mut head = 3u32.to_be_bytes().to_vec();
            head.extend_from_slice(&IHAVEOPT.to_be_bytes());
            head.append(&mut input);
            input = head;
        }
        let (violations, _) = play(input, seed as usize % 3);
        assert_eq!(violations, 0, "seed {seed}");
    }
}

#[test]
fn damaged_valid_sessions_never_panic_or_overstep() {
    let mut total_calls = 0;
    for seed in 0..400u64 {
        let export = if seed % 3 == 0 { "ro" } else { "disk" };
        let mut input = valid_session(export, seed);
        let noise = pattern(16, seed ^ 0xdead);
        match seed % 4 {
            // Flip bytes.
            0 | 1 => {
                for k in 0..1 + (noise[0] % 4) as usize {
                    let at = u64::from_be_bytes(noise[k * 2..k * 2 + 8].try_into().unwrap())
                        as usize
                        % input.len();
                    input[at] ^= noise[8 + k].max(1);
                }
            }
            // Cut short.
            2 => input.truncate(
                u64::from_be_bytes(noise[..8].try_into().unwrap()) as usize % input.len(),
            ),
            // Splice a region elsewhere.
            _ => {
                let a = noise[0] as usize % input.len();
                let b = (a + noise[1] as usize).min(input.len());
                let piece = input[a..b].to_vec();
                let at = noise[2] as usize * 3 % input.len();
                input.splice(at..at, piece);
            }
        }
        let (violations, calls) = play(input, seed as usize % 4);
        assert_eq!(violations, 0, "seed {seed}");
        total_calls += calls;
    }
    // The damage is light enough that most sessions get to transmission.
    assert!(total_calls > 400, "only {total_calls} export calls");
}
