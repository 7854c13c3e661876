//! A whole server session on arbitrary client bytes: handshake, option
//! haggling and transmission, against a small in-memory export, over an
//! in-memory transport that replays the input and discards the replies.
//! The session must end (the input is finite) without panicking.
//!
//! Requests run on the session's own thread (`workers_per_connection: 0`).
//!
//! If the first byte is odd, a well-formed handshake (structured replies,
//! `base:allocation`, GO "disk") is put before the rest of the input, so
//! that the fuzzer spends its time on transmission requests. If its second
//! bit is set, the server requires TLS (`NBD_OPT_STARTTLS`, a fleet
//! certificate): options before TLS are refused, and the bytes after
//! STARTTLS go to the TLS handshake.

#![no_main]

use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::sync::{Arc, Mutex, RwLock};

use libfuzzer_sys::fuzz_target;
use spore_nbd::{Export, Exports, Extent, ServerConfig, TlsPolicy, Transport};

const SIZE: usize = 64 * 1024;

struct Disk {
    data: RwLock<Vec<u8>>,
    read_only: bool,
}

impl Disk {
    fn range(&self, offset: u64, length: u64) -> std::ops::Range<usize> {
        // The server checks bounds before calling in; a failure here would
        // be a server bug, which the fuzzer should find.
        let end = offset.checked_add(length).expect("request overflows");
        assert!(end <= SIZE as u64, "request beyond the export");
        offset as usize..end as usize
    }
}

impl Export for Disk {
    fn size(&self) -> u64 {
        SIZE as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = self.range(offset, buf.len() as u64);
        if offset == 4096 {
            return Err(io::Error::from_raw_os_error(5));
        }
        buf.copy_from_slice(&self.data.read().unwrap()[r]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        assert!(!self.read_only, "write reached a read-only export");
        let r = self.range(offset, data.len() as u64);
        self.data.write().unwrap()[r].copy_from_slice(data);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, length: u64, _: bool, _: bool) -> io::Result<()> {
        assert!(!self.read_only, "write_zeroes reached a read-only export");
        let r = self.range(offset, length);
        self.data.write().unwrap()[r].fill(0);
        Ok(())
    }
    fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        self.write_zeroes(offset, length, true, false)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.range(offset, length);
        Ok(())
    }
    fn can_fast_zero(&self) -> bool {
        !self.read_only
    }
    fn block_status(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        self.range(offset, length);
        let half = length / 2;
        Ok(vec![
            Extent { length: half, hole: false, zero: false },
            Extent { length: length - half, hole: true, zero: true },
        ])
    }
}

struct Registry {
    disk: Arc<Disk>,
    ro: Arc<Disk>,
}

impl Exports for Registry {
    fn get(&self, name: &str) -> Option<Arc<dyn Export>> {
        match name {
            "disk" | "" => Some(self.disk.clone()),
            "ro" => Some(self.ro.clone()),
            _ => None,
        }
    }
    fn list(&self) -> Vec<(String, String)> {
        vec![("disk".into(), "fuzz disk".into()), ("ro".into(), String::new())]
    }
}

/// Replays `input` to the server and swallows what it sends.
struct Replay {
    input: Mutex<(Vec<u8>, usize)>,
}

impl Transport for Replay {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut guard = self.input.lock().unwrap();
        let (data, pos) = &mut *guard;
        // Small reads exercise the reassembly of split messages.
        let n = buf.len().min(data.len() - *pos).min(4096);
        buf[..n].copy_from_slice(&data[*pos..*pos + n]);
        *pos += n;
        Ok(n)
    }
    fn send_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        Ok(bufs.iter().map(|b| b.len()).sum())
    }
    fn shutdown(&self, _how: Shutdown) -> io::Result<()> {
        Ok(())
    }
}

fn option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.extend_from_slice(b"IHAVEOPT");
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn handshake() -> Vec<u8> {
    let mut out = 3u32.to_be_bytes().to_vec();
    option(&mut out, 8, &[]);
    let mut meta = 4u32.to_be_bytes().to_vec();
    meta.extend_from_slice(b"disk");
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    option(&mut out, 10, &meta);
    let mut go = 4u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"disk");
    go.extend_from_slice(&0u16.to_be_bytes());
    option(&mut out, 7, &go);
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut input = if mode & 1 == 1 { handshake() } else { Vec::new() };
    input.extend_from_slice(rest);
    let exports = Registry {
        disk: Arc::new(Disk { data: RwLock::new(vec![0; SIZE]), read_only: false }),
        ro: Arc::new(Disk { data: RwLock::new(vec![7; SIZE]), read_only: true }),
    };
    let tls = (mode & 2 == 2).then(|| fleet_tls() as Arc<dyn TlsPolicy>);
    let config = ServerConfig {
        tls,
        // Requests run on the session's thread: deterministic, and free of
        // the thread-exit races that LeakSanitizer reports as leaks. The
        // threaded path is covered by crates/nbd/tests/garbage.rs.
        workers_per_connection: 0,
        max_inflight_bytes: 1 << 20,
        handshake_timeout: None,
        ..ServerConfig::default()
    };
    let transport = Replay { input: Mutex::new((input, 0)) };
    let _ = spore_nbd::serve_connection(&transport, &exports, &config);
});

/// Admits any certificate of the fleet (a CA made once per run).
#[derive(Debug)]
struct Fleet(spore_pki::ServerTls);

impl TlsPolicy for Fleet {
    fn config(&self) -> Arc<rustls::ServerConfig> {
        self.0.config()
    }
    fn admit(
        &self,
        chain: &[rustls::pki_types::CertificateDer<'static>],
    ) -> Result<String, String> {
        let cert = chain.first().ok_or("no certificate")?;
        spore_pki::PeerIdentity::of(cert.as_ref())
            .map(|id| id.to_string())
            .map_err(|e| e.to_string())
    }
}

fn fleet_tls() -> Arc<Fleet> {
    static FLEET: std::sync::OnceLock<Arc<Fleet>> = std::sync::OnceLock::new();
    FLEET
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("spore-fuzz-nbd-tls-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let mut ca = spore_pki::Ca::init(&dir.join("ca"), "fuzz").expect("a CA");
            ca.issue("server", &[spore_pki::Role::Host], &[], &dir.join("server"))
                .expect("a certificate");
            Arc::new(Fleet(
                spore_pki::ServerTls::load(&dir.join("server")).expect("the server's TLS"),
            ))
        })
        .clone()
}
