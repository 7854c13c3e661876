//! `spore bench tls`, second part: what TLS costs QEMU's migration stream,
//! and which TLS: QEMU's own (`tls-creds-x509`) or the plaintext stream
//! carried inside spore's TLS (rustls, the agent's relay at each end: what
//! spore uses), against plaintext in the same run.
//!
//! Two QEMU processes on loopback, no guest: the source's RAM is a file of
//! random data (every page is sent whole), paused, so each migration moves
//! exactly the same bytes. Each round migrates once per mode, in rotating
//! order, unlimited and at a rate cap (a fleet's links are slower than
//! loopback: the cap shows what TLS costs where the wire, not the CPU, is
//! the limit). The figure per mode is the median over rounds of its time
//! over plaintext's time in the same round.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::json;
use spore_agent::migration::relay::{Inbound, Outbound};
use spore_qemu::{MigrationTls, Qmp};

use crate::median;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StreamMode {
    Plaintext,
    /// QEMU's own TLS (GnuTLS), the host certificates laid out for QEMU.
    QemuTls,
    /// Plaintext QEMU streams through a rustls relay at each end.
    SporeRelay,
}

const MODES: [StreamMode; 3] = [
    StreamMode::Plaintext,
    StreamMode::QemuTls,
    StreamMode::SporeRelay,
];

#[derive(Debug, Serialize)]
pub struct StreamRound {
    /// Seconds per mode, in [`MODES`] order.
    pub seconds: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct StreamCase {
    /// The source's rate cap, bytes/s (`None`: unlimited).
    pub cap: Option<u64>,
    pub rounds: Vec<StreamRound>,
    /// Median MB/s per mode.
    pub mb_s: Vec<(StreamMode, f64)>,
    /// Median over rounds of (mode's time / plaintext's time).
    pub ratio: Vec<(StreamMode, f64)>,
}

/// One QEMU, killed when dropped.
struct Qemu {
    child: Child,
    qmp: Qmp,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu(work: &Path, name: &str, mib: u64, ram: &str, incoming: bool) -> Result<Qemu> {
    let sock = work.join(format!("{name}.qmp"));
    let _ = std::fs::remove_file(&sock);
    let mut cmd = Command::new(spore_qemu::QEMU_BINARY);
    cmd.args([
        "-M",
        "pc",
        "-accel",
        "tcg",
        "-nodefaults",
        "-display",
        "none",
    ])
    .args(["-m", &format!("{mib}M"), "-object", ram])
    .args(["-machine", "memory-backend=ram", "-S"])
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", sock.display()))
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    if incoming {
        cmd.args(["-incoming", "defer"]);
    }
    let child = cmd.spawn().context("starting QEMU")?;
    let qmp = Qmp::connect(&sock, Duration::from_secs(20))?;
    Ok(Qemu { child, qmp })
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The two hosts' QEMU credential directories and TLS directories.
pub struct Hosts {
    pub src_tls: PathBuf,
    pub dst_tls: PathBuf,
    pub src_qemu: PathBuf,
    pub dst_qemu: PathBuf,
}

impl Hosts {
    pub fn make(work: &Path) -> Result<Hosts> {
        let mut dirs = Vec::new();
        for host in ["stream-src", "stream-dst"] {
            let data = work.join(host);
            crate::procs::ensure_certificate(&data)?;
            let tls = spore_pki::default_tls_dir(&data);
            let qemu = data.join("qemu-tls");
            spore_pki::qemu_creds_dir(&tls, &qemu)?;
            dirs.push((tls, qemu));
        }
        let (dst_tls, dst_qemu) = dirs.pop().unwrap();
        let (src_tls, src_qemu) = dirs.pop().unwrap();
        Ok(Hosts {
            src_tls,
            dst_tls,
            src_qemu,
            dst_qemu,
        })
    }
}

/// Seconds QEMU took to migrate the whole RAM in `mode`.
fn migrate_once(
    work: &Path,
    hosts: &Hosts,
    ram_file: &Path,
    mib: u64,
    mode: StreamMode,
    cap: Option<u64>,
) -> Result<f64> {
    let src_ram = format!(
        "memory-backend-file,id=ram,size={mib}M,mem-path={},share=on",
        ram_file.display()
    );
    let dst_ram = format!("memory-backend-ram,id=ram,size={mib}M");
    let mut dst = qemu(work, "dst", mib, &dst_ram, true)?;
    let mut src = qemu(work, "src", mib, &src_ram, false)?;
    let port = free_port()?;
    let dst_tls = (mode == StreamMode::QemuTls).then(|| MigrationTls {
        dir: &hosts.dst_qemu,
        hostname: None,
    });
    dst.qmp.set_migration_tls(dst_tls)?;
    let src_tls = (mode == StreamMode::QemuTls).then(|| MigrationTls {
        dir: &hosts.src_qemu,
        hostname: Some("127.0.0.1"),
    });
    src.qmp.set_migration_tls(src_tls)?;
    src.qmp
        .set_parameters(json!({ "max-bandwidth": cap.unwrap_or(u64::MAX >> 2) }))?;
    // spore's relay (what the agent runs) at each end, for this migration:
    // QEMU at each end on a unix socket, TLS between the relays.
    let mut relays = None;
    let target = if mode == StreamMode::SporeRelay {
        let dst_sock = work.join("dst-in.sock");
        let src_sock = work.join("src-out.sock");
        dst.qmp
            .migrate_incoming(&format!("unix:{}", dst_sock.display()))?;
        let inbound = Inbound::start(
            "127.0.0.1",
            Arc::new(spore_pki::ServerTls::load(&hosts.dst_tls)?),
            dst_sock,
            "bench",
            Default::default(),
        )?;
        let outbound = Outbound::start(
            &src_sock,
            ([127, 0, 0, 1], inbound.port()).into(),
            "127.0.0.1",
            spore_pki::client_config(&hosts.src_tls)?,
        )?;
        relays = Some((outbound, inbound));
        format!("unix:{}", src_sock.display())
    } else {
        dst.qmp.migrate_incoming(&format!("tcp:127.0.0.1:{port}"))?;
        format!("tcp:127.0.0.1:{port}")
    };
    let t = Instant::now();
    src.qmp.migrate(&target)?;
    loop {
        let p = src.qmp.migration_progress()?;
        match p.status.as_str() {
            "completed" => break,
            "failed" | "cancelled" => bail!("{mode:?} migration {}: {p:?}", p.status),
            _ => {}
        }
        if t.elapsed() > Duration::from_secs(300) {
            bail!("{mode:?} migration did not finish in 300 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = t.elapsed().as_secs_f64();
    // The destination finishes loading before it is stopped (a kill in the
    // middle makes QEMU print a load error).
    let until = Instant::now() + Duration::from_secs(30);
    while dst.qmp.migration_progress()?.status != "completed" && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(relays);
    Ok(s)
}

/// Runs `rounds` rounds of each mode at each cap.
pub fn run(work: &Path, mib: u64, rounds: u32, caps: &[Option<u64>]) -> Result<Vec<StreamCase>> {
    let hosts = Hosts::make(work)?;
    // RAM on a tmpfs, so that reading it costs the source nothing.
    let ram_dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir())?;
    let ram_file = ram_dir.path().join("ram");
    crate::random_file(&ram_file, mib)?;
    let mut cases = Vec::new();
    for &cap in caps {
        let mut rounds_out = Vec::new();
        for r in 0..rounds {
            let mut seconds = vec![0.0; MODES.len()];
            for k in 0..MODES.len() {
                let i = (k + r as usize) % MODES.len();
                seconds[i] = migrate_once(work, &hosts, &ram_file, mib, MODES[i], cap)?;
            }
            eprintln!(
                "stream, cap {}: round {}: plaintext {:.2} s, QEMU TLS {:.2} s, spore relay {:.2} s",
                cap.map_or("none".into(), |c| format!("{} MB/s", c / 1_000_000)),
                r + 1,
                seconds[0],
                seconds[1],
                seconds[2]
            );
            rounds_out.push(StreamRound { seconds });
        }
        let mb = (mib << 20) as f64 / 1e6;
        let mb_s = MODES
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let t: Vec<f64> = rounds_out.iter().map(|r| r.seconds[i]).collect();
                (*m, mb / median(&t))
            })
            .collect();
        let ratio = MODES
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let t: Vec<f64> = rounds_out
                    .iter()
                    .map(|r| r.seconds[i] / r.seconds[0])
                    .collect();
                (*m, median(&t))
            })
            .collect();
        cases.push(StreamCase {
            cap,
            rounds: rounds_out,
            mb_s,
            ratio,
        });
    }
    Ok(cases)
}
