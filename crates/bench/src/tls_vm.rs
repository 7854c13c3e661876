//! `spore bench tls`, third part: what the fleet's TLS costs the things a
//! user waits for, against `--insecure-listen` in the same run: a cold-host
//! boot, a cold-host clone and a live migration.
//!
//! Per mode (TLS, plaintext) one origin agent on loopback holds the demo
//! guest's image and a template of it (captured there), and takes
//! migrations. Each round, per mode in alternating order, a fresh agent
//! with nothing but that origin:
//! - boots the guest (`vm run` to SPORE-READY; every block it reads comes
//!   from the origin),
//! - clones the template (request to running, and to the guest printing
//!   its new identity; its RAM is paged in from the origin),
//! - migrates the booted VM to the origin (QEMU's stream in spore's TLS relay or
//!   in plaintext; total time and downtime as QEMU measured it), unlimited
//!   on loopback and, with a second VM, at a 1 Gbit/s cap.
//!
//! The figures are medians over rounds of each round's TLS / plaintext
//! ratio. TCG boots are CPU-bound here: the ratios say what TLS adds, the
//! absolute times only give scale.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::clone::Host;
use crate::median;
use crate::procs::Mode;

/// One round in one mode.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    mode: Mode,
    round: usize,
    boot_s: f64,
    clone_running_ms: f64,
    clone_identity_ms: f64,
    migration_total_ms: f64,
    migration_downtime_ms: f64,
    /// The same migration back, at a 1 Gbit/s rate cap (a fleet's link).
    capped_total_ms: f64,
    capped_downtime_ms: f64,
    stream_tls: bool,
}

/// TLS / plaintext, median over rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    pub boot: f64,
    pub clone_running: f64,
    pub clone_identity: f64,
    pub migration_total: f64,
    pub migration_downtime: f64,
    pub capped_total: f64,
    pub capped_downtime: f64,
}

#[derive(Debug, Serialize)]
pub struct VmReport {
    pub memory_mib: u64,
    pub samples: Vec<Sample>,
    pub ratios: Ratios,
}

struct Origin {
    host: Host,
    url: String,
}

fn vm_run(h: &Host, guest: &Path, mib: u64, name: &str, append: &str, wait: &str) -> Result<()> {
    crate::clone::run_guest(h, guest, mib, name, append, wait)
}

fn start_origin(spore: &Path, work: &Path, guest: &Path, mib: u64, mode: Mode) -> Result<Origin> {
    let name = format!("origin-{mode:?}");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["--listen", &listen, "--accept-migrations"];
    args.extend(mode.flags());
    let host = Host::start(
        spore,
        &work.join(&name),
        &Path::new("/dev/shm").join(format!("spore-bench-tls-{name}")),
        &args,
    )?;
    host.import_guest(guest)?;
    vm_run(
        &host,
        guest,
        mib,
        "src",
        "spore.counter",
        "SPORE-COUNTER n=2 ",
    )?;
    host.json(&[
        "vm", "template", "src", "--name", "idle", "--stop", "--json",
    ])?;
    Ok(Origin {
        host,
        url: format!("{}://{listen}", mode.scheme()),
    })
}

/// Milliseconds until `marker` shows in the console log at `log`.
fn wait_console(log: &Path, marker: &str, since: Instant) -> Result<f64> {
    while since.elapsed() < Duration::from_secs(120) {
        let text = std::fs::read(log).unwrap_or_default();
        if String::from_utf8_lossy(&text).contains(marker) {
            return Ok(since.elapsed().as_secs_f64() * 1e3);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    bail!("no {marker} in {} within 120 s", log.display())
}

fn round(
    spore: &Path,
    work: &Path,
    guest: &Path,
    mib: u64,
    origin: &Origin,
    mode: Mode,
    round: usize,
) -> Result<Sample> {
    let mut args = vec!["--origin", origin.url.as_str()];
    args.extend(mode.flags());
    let b = Host::start(
        spore,
        &work.join("cold"),
        Path::new("/dev/shm/spore-bench-tls-cold"),
        &args,
    )?;
    let t = Instant::now();
    vm_run(&b, guest, mib, "boot", "", "SPORE-READY")?;
    let boot_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let r = b.json(&["vm", "clone", "idle", "--name", "c", "--json"])?;
    let clone_running_ms = t.elapsed().as_secs_f64() * 1e3;
    let log = PathBuf::from(
        r["vms"][0]["serial_log"]
            .as_str()
            .context("a clone without a serial log")?,
    );
    let clone_identity_ms = wait_console(&log, "SPORE-IDENTITY", t)?;
    b.cli(&["vm", "rm", "--group", "c"])?;

    let m = b.json(&["vm", "migrate", "boot", "--to", &origin.url, "--json"])?;
    if m["phase"] != "completed" {
        bail!("the {mode:?} migration did not complete: {m}");
    }
    origin.host.cli(&["vm", "rm", "--force", "boot"])?;
    // Again at a fleet link's rate: a second VM on the cold host.
    vm_run(&b, guest, mib, "capped", "", "SPORE-READY")?;
    let c = b.json(&[
        "vm",
        "migrate",
        "capped",
        "--to",
        &origin.url,
        "--bandwidth",
        "1gbit",
        "--json",
    ])?;
    if c["phase"] != "completed" {
        bail!("the capped {mode:?} migration did not complete: {c}");
    }
    origin.host.cli(&["vm", "rm", "--force", "capped"])?;
    b.remove();
    Ok(Sample {
        mode,
        round,
        boot_s,
        clone_running_ms,
        clone_identity_ms,
        migration_total_ms: m["elapsed_ms"].as_f64().unwrap_or(f64::NAN),
        migration_downtime_ms: m["downtime_ms"].as_f64().unwrap_or(f64::NAN),
        capped_total_ms: c["elapsed_ms"].as_f64().unwrap_or(f64::NAN),
        capped_downtime_ms: c["downtime_ms"].as_f64().unwrap_or(f64::NAN),
        stream_tls: m["stream_tls"].as_bool().unwrap_or(false),
    })
}

/// Runs `rounds` rounds per mode with guests of `mib` MiB.
pub fn run(spore: &Path, work: &Path, guest: &Path, mib: u64, rounds: usize) -> Result<VmReport> {
    let guest = std::fs::canonicalize(guest)
        .with_context(|| format!("guest {} (run guest/build.sh)", guest.display()))?;
    let work = work.join("vm");
    std::fs::create_dir_all(&work)?;
    eprintln!("[tls] origins: image and template, per mode");
    let origins = [
        (
            Mode::Tls,
            start_origin(spore, &work, &guest, mib, Mode::Tls)?,
        ),
        (
            Mode::Plaintext,
            start_origin(spore, &work, &guest, mib, Mode::Plaintext)?,
        ),
    ];
    let mut samples = Vec::new();
    for r in 0..rounds {
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (mode, origin) = &origins[i];
            let s = round(spore, &work, &guest, mib, origin, *mode, r)?;
            eprintln!(
                "[tls] round {} {:?}: boot {:.2} s, clone running {:.0} ms / identity {:.0} ms, migration {:.0} ms (downtime {:.0} ms), at 1 Gbit/s {:.0} ms (downtime {:.0} ms), stream TLS {}",
                r + 1,
                mode,
                s.boot_s,
                s.clone_running_ms,
                s.clone_identity_ms,
                s.migration_total_ms,
                s.migration_downtime_ms,
                s.capped_total_ms,
                s.capped_downtime_ms,
                s.stream_tls
            );
            samples.push(s);
        }
    }
    for (_, o) in origins {
        o.host.remove();
    }
    let ratio = |f: fn(&Sample) -> f64| {
        let per_round: Vec<f64> = (0..rounds)
            .filter_map(|r| {
                let of = |m: Mode| samples.iter().find(|s| s.round == r && s.mode == m).map(f);
                Some(of(Mode::Tls)? / of(Mode::Plaintext)?)
            })
            .collect();
        median(&per_round)
    };
    let ratios = Ratios {
        boot: ratio(|s| s.boot_s),
        clone_running: ratio(|s| s.clone_running_ms),
        clone_identity: ratio(|s| s.clone_identity_ms),
        migration_total: ratio(|s| s.migration_total_ms),
        migration_downtime: ratio(|s| s.migration_downtime_ms),
        capped_total: ratio(|s| s.capped_total_ms),
        capped_downtime: ratio(|s| s.capped_downtime_ms),
    };
    Ok(VmReport {
        memory_mib: mib,
        samples,
        ratios,
    })
}
