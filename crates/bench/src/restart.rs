//! `spore bench restart`: what a guest sees of an agent restart.
//!
//! An agent boots the demo guest running `spore.ioloop` (direct reads and
//! writes of its disk without pause, every block checked, the longest
//! single read or write of each second printed as `SPORE-IO ... max_ms=`).
//! The agent is then restarted `--rounds` times with SIGTERM and as many
//! with SIGKILL, started again at once on the same data directory each
//! time. Per restart: the longest guest I/O operation in the seconds
//! around it (the stall the guest saw), the time from the signal until
//! the new agent holds its lock and answers (the restart itself), and
//! whether the VM kept its QEMU and the guest saw an I/O error or a block
//! that read back wrong. All of it twice in the same run: with the socket
//! holder (the default: QEMU's reconnect waits in the listening socket's
//! backlog) and with `--no-socket-holder` (QEMU reconnects with its own
//! back-off: 1, 2, 4 ... s between attempts).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use crate::procs::AgentProcess;
use crate::tls::spore_cmd;
use crate::{median, percentile};

#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Restarts of each kind (SIGTERM, SIGKILL) per mode
    #[arg(long, default_value_t = 10)]
    pub rounds: u32,
    /// Demo guest (vmlinuz, initrd.img, rootfs.img from guest/build.sh)
    #[arg(long, default_value = ".cache/guest")]
    pub guest: PathBuf,
    /// Only the default mode (with the socket holder)
    #[arg(long)]
    pub holder_only: bool,
    /// Where the agent keeps its data (default: a temporary directory)
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    #[arg(long, default_value = "bench-results/restart.json")]
    pub out: PathBuf,
}

#[derive(Debug, Serialize)]
struct Series {
    mode: &'static str,
    signal: &'static str,
    /// Longest guest read or write around each restart, ms.
    stall_ms: Vec<u64>,
    /// Signal to the new agent answering, ms.
    restart_ms: Vec<f64>,
    stall_p50_ms: f64,
    stall_max_ms: u64,
    restart_p50_ms: f64,
    /// Reads or writes that failed in the guest.
    io_errors: u64,
    /// Blocks that read back other than last written.
    bad_blocks: u64,
    /// Restarts after which the VM did not run in the same QEMU.
    vms_lost: u32,
}

#[derive(Debug, Serialize)]
struct Report {
    rounds: u32,
    series: Vec<Series>,
}

/// The `SPORE-IO` lines of a guest's console log (`spore.ioloop`): (ops,
/// max_ms, errors, bad) each. The restart tests read them too.
pub fn spore_io_lines(serial_log: &Path) -> Vec<(u64, u64, u64, u64)> {
    let log = std::fs::read_to_string(serial_log).unwrap_or_default();
    log.lines()
        .filter_map(|l| l.find("SPORE-IO ops=").map(|i| &l[i..]))
        .filter_map(|l| {
            let f = |k: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(k))?
                    .parse::<u64>()
                    .ok()
            };
            Some((f("ops=")?, f("max_ms=")?, f("errors=")?, f("bad=")?))
        })
        .collect()
}

/// The bench guest's `SPORE-IO` lines so far: (max_ms, errors, bad).
fn io_lines(data: &Path) -> Vec<(u64, u64, u64)> {
    spore_io_lines(&data.join("vms/io/serial.log"))
        .into_iter()
        .map(|(_, max_ms, errors, bad)| (max_ms, errors, bad))
        .collect()
}

/// Waits until the guest has printed `n` lines past `from`.
fn wait_lines(data: &Path, from: usize, n: usize) -> Result<Vec<(u64, u64, u64)>> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let lines = io_lines(data);
        if lines.len() >= from + n {
            return Ok(lines);
        }
        if Instant::now() > deadline {
            bail!("the guest's I/O loop printed nothing for 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn vm_pid(spore: &Path, data: &Path) -> Result<Option<u64>> {
    let vms: serde_json::Value =
        serde_json::from_str(&spore_cmd(spore, data, &["vm", "ls", "--json"])?)?;
    Ok(vms[0]["pid"]
        .as_u64()
        .filter(|_| vms[0]["state"] == "running"))
}

fn series(
    spore: &Path,
    o: &Options,
    work: &Path,
    mode: &'static str,
    extra: &[&str],
) -> Result<Vec<Series>> {
    let data = work.join(mode);
    let _ = std::fs::remove_dir_all(&data);
    let mut agent = AgentProcess::start(spore, &data, extra)?;
    let g = std::fs::canonicalize(&o.guest)
        .with_context(|| format!("guest {} (run guest/build.sh)", o.guest.display()))?;
    let path = |f: &str| g.join(f).display().to_string();
    spore_cmd(
        spore,
        &data,
        &["image", "import", &path("rootfs.img"), "--name", "base"],
    )?;
    spore_cmd(
        spore,
        &data,
        &[
            "vm",
            "run",
            "io",
            "--image",
            "base",
            "--kernel",
            &path("vmlinuz"),
            "--initrd",
            &path("initrd.img"),
            "--append",
            "console=ttyS0 root=/dev/vda quiet spore.ioloop=1024",
            "--wait-for",
            "SPORE-READY",
            "--timeout",
            "180",
        ],
    )?;
    let pid = vm_pid(spore, &data)?.context("the VM does not run")?;
    wait_lines(&data, 0, 3)?;
    let mut out = Vec::new();
    for (signal, kill) in [("SIGTERM", false), ("SIGKILL", true)] {
        let mut s = Series {
            mode,
            signal,
            stall_ms: Vec::new(),
            restart_ms: Vec::new(),
            stall_p50_ms: 0.0,
            stall_max_ms: 0,
            restart_p50_ms: 0.0,
            io_errors: 0,
            bad_blocks: 0,
            vms_lost: 0,
        };
        for round in 0..o.rounds {
            let before = io_lines(&data).len();
            let t = Instant::now();
            if kill {
                agent.kill();
            } else {
                agent.stop()?;
            }
            agent = AgentProcess::start(spore, &data, extra)?;
            let restart = t.elapsed().as_secs_f64() * 1e3;
            // The stall ends in the second after it; a few more lines
            // cover QEMU's back-off without the holder.
            let lines = wait_lines(&data, before, 4)?;
            let stall = lines[before..].iter().map(|l| l.0).max().unwrap_or(0);
            let &(_, errors, bad) = lines.last().unwrap();
            s.io_errors = errors;
            s.bad_blocks = bad;
            if vm_pid(spore, &data)? != Some(pid) {
                s.vms_lost += 1;
            }
            eprintln!(
                "{mode} {signal} {}: guest stall {stall} ms, agent back in {restart:.0} ms",
                round + 1
            );
            s.stall_ms.push(stall);
            s.restart_ms.push(restart);
        }
        let stalls: Vec<f64> = s.stall_ms.iter().map(|&v| v as f64).collect();
        s.stall_p50_ms = percentile(&stalls, 50.0);
        s.stall_max_ms = s.stall_ms.iter().copied().max().unwrap_or(0);
        s.restart_p50_ms = median(&s.restart_ms);
        out.push(s);
    }
    agent.stop_all()?;
    Ok(out)
}

pub fn run(o: &Options) -> Result<()> {
    let spore = std::env::current_exe()?;
    let tmp = tempfile::tempdir()?;
    let work = o.work_dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&work)?;
    let mut report = Report {
        rounds: o.rounds,
        series: series(&spore, o, &work, "holder", &[])?,
    };
    if !o.holder_only {
        report.series.extend(series(
            &spore,
            o,
            &work,
            "no-holder",
            &["--no-socket-holder"],
        )?);
    }
    println!(
        "{:<10} {:<8} {:>14} {:>14} {:>16} {:>7} {:>5} {:>8}",
        "mode",
        "signal",
        "stall p50 ms",
        "stall max ms",
        "restart p50 ms",
        "errors",
        "bad",
        "VMs lost"
    );
    for s in &report.series {
        println!(
            "{:<10} {:<8} {:>14.0} {:>14} {:>16.0} {:>7} {:>5} {:>8}",
            s.mode,
            s.signal,
            s.stall_p50_ms,
            s.stall_max_ms,
            s.restart_p50_ms,
            s.io_errors,
            s.bad_blocks,
            s.vms_lost
        );
    }
    if let Some(dir) = o.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&o.out, serde_json::to_vec_pretty(&report)?)?;
    println!("wrote {}", o.out.display());
    Ok(())
}
