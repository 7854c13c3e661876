//! `spore bench clone`: clones of a running VM against a cold boot of the
//! same guest, in the same run.
//!
//! Two agents on loopback: host A boots the demo guest and captures it as
//! templates; host B holds nothing and names A as its origin.
//!
//! Measured:
//! - cold boot: `spore vm run` to the guest's SPORE-READY (A's cache warm,
//!   so this is the guest's own boot, not the network);
//! - clone latency for bursts of 1 (repeated 10 × rounds), 8 and 32 clones of an idle template
//!   (the `spore.counter` workload): per clone, request to QEMU running
//!   (the agent's own timing) and to the guest answering with its new
//!   identity (SPORE-IDENTITY on the console, polled);
//! - host memory of the largest burst: the sum of the clones' PSS (and the
//!   template's RAM file in tmpfs) against N × the guest's RAM;
//! - a clone on the cold host B of a template running a memory workload
//!   (`spore.memload`): time to running, and the guest's progress (memload
//!   passes) over its first 5 s, against a local clone on A. Each round
//!   wipes B.
//!
//! Results: a table, JSON (`--out`) and an SVG plot of progress over the
//! first seconds (`--plot`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use serde_json::Value;

use crate::procs::{require, AgentProcess};
use crate::{median, percentile};

#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Burst sizes, one clone request each
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub counts: Vec<u32>,
    /// Guest memory (MiB) of the templates and the cold boot
    #[arg(long, default_value_t = 512)]
    pub memory_mib: u64,
    /// Rounds of cold boots, and of cold-host and local clones
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// MiB the memory workload keeps rewriting in the busy template
    #[arg(long, default_value_t = 64)]
    pub memload_mib: u64,
    /// Seconds of guest progress compared between cold-host and local clones
    #[arg(long, default_value_t = 5.0)]
    pub progress_seconds: f64,
    /// Standby clones host A keeps per template (`spore agent --clone-standby`)
    #[arg(long, default_value_t = 1)]
    pub standby: u32,
    /// Demo guest (vmlinuz, initrd.img, rootfs.img from guest/build.sh)
    #[arg(long, default_value = ".cache/guest")]
    pub guest: PathBuf,
    /// Working directory (wiped)
    #[arg(long, default_value = "/var/tmp/spore-bench-clone")]
    pub workdir: PathBuf,
    #[arg(long, default_value = "bench-results/clone.json")]
    pub out: PathBuf,
    #[arg(long, default_value = "bench-results/clone.svg")]
    pub plot: PathBuf,
}

const APPEND: &str = "console=ttyS0 root=/dev/vda quiet";

#[derive(Debug, Clone, Serialize)]
struct Burst {
    count: u32,
    /// Clone requests made (their samples pooled).
    requests: usize,
    /// Request to QEMU running, per clone (the agent's measurement), ms.
    running_p50_ms: f64,
    running_p99_ms: f64,
    /// Of which: QEMU start, device state load (0 for standby clones).
    qemu_p50_ms: f64,
    load_p50_ms: f64,
    /// Clones handed out from the standby pool.
    from_standby: usize,
    /// The whole request (all clones running), median, ms.
    request_ms: f64,
    /// Request to the guest printing its new identity, per clone, ms
    /// (console log files polled every 5 ms).
    identity_p50_ms: f64,
    identity_p99_ms: f64,
    /// Sum of the clones' PSS, and the template RAM file in tmpfs.
    pss_sum_bytes: u64,
    template_file_bytes: u64,
    /// (PSS sum + template file) / (count × guest RAM).
    memory_ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Progress {
    host: &'static str,
    round: usize,
    /// CLI request to QEMU running (B: includes finding the template at
    /// the origin and mounting its RAM), ms.
    running_ms: f64,
    /// Memory-workload passes in the first `progress_seconds`: whole passes
    /// plus the share of the pass in progress (interpolated between the
    /// pass lines either side of the window's end).
    passes: f64,
    /// (seconds since running, passes) as the console showed them.
    timeline: Vec<(f64, u64)>,
    fetched_bytes: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    memory_mib: u64,
    cold_boot_s: Vec<f64>,
    cold_boot_median_s: f64,
    standby: u32,
    template_capture_pause_ms: f64,
    template_ram_stored_bytes: u64,
    template_state_bytes: u64,
    bursts: Vec<Burst>,
    progress: Vec<Progress>,
    progress_seconds: f64,
    cold_running_p99_ms: f64,
    cold_over_local_progress: f64,
    clone_speedup_over_cold_boot: f64,
}

/// An agent of this binary with its own RAM directory, driven by its CLI.
pub(crate) struct Host {
    spore: PathBuf,
    pub(crate) agent: AgentProcess,
    ram: PathBuf,
}

impl Host {
    pub(crate) fn start(spore: &Path, dir: &Path, ram: &Path, extra: &[&str]) -> Result<Host> {
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(ram);
        let mut args = vec!["--ram-dir", ram.to_str().context("RAM dir path")?];
        args.extend_from_slice(extra);
        Ok(Host {
            spore: spore.to_owned(),
            agent: AgentProcess::start(spore, dir, &args)?,
            ram: ram.to_owned(),
        })
    }

    pub(crate) fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.spore)
            .arg("--data-dir")
            .arg(&self.agent.data_dir)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "spore {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Imports the demo guest's root file system in `guest` as image `base`.
    pub(crate) fn import_guest(&self, guest: &Path) -> Result<()> {
        let rootfs = guest.join("rootfs.img");
        self.cli(&[
            "image",
            "import",
            rootfs.to_str().context("path")?,
            "--name",
            "base",
        ])?;
        Ok(())
    }

    pub(crate) fn json(&self, args: &[&str]) -> Result<Value> {
        serde_json::from_str(&self.cli(args)?).context("JSON output")
    }

    fn fetched(&self) -> Result<u64> {
        let s = self.json(&["status", "--json"])?;
        Ok(s["sources"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x["bytes"].as_u64()).sum())
            .unwrap_or(0))
    }

    pub(crate) fn remove(mut self) {
        let _ = self.agent.stop_all();
        let _ = std::fs::remove_dir_all(&self.ram);
    }
}

fn vm_run(h: &Host, o: &Options, name: &str, append: &str, wait: &str) -> Result<f64> {
    let g = std::fs::canonicalize(&o.guest)
        .with_context(|| format!("guest {} (run guest/build.sh)", o.guest.display()))?;
    let t0 = Instant::now();
    run_guest(h, &g, o.memory_mib, name, append, wait)?;
    Ok(t0.elapsed().as_secs_f64())
}

/// `spore vm run NAME` of the demo guest in `guest` (image `base`) with
/// `mib` MiB, until `wait` shows on its console.
pub(crate) fn run_guest(
    h: &Host,
    guest: &Path,
    mib: u64,
    name: &str,
    append: &str,
    wait: &str,
) -> Result<()> {
    h.cli(&[
        "vm",
        "run",
        name,
        "--image",
        "base",
        "--memory",
        &format!("{mib}M"),
        "--kernel",
        guest.join("vmlinuz").to_str().context("path")?,
        "--initrd",
        guest.join("initrd.img").to_str().context("path")?,
        "--append",
        &format!("{APPEND} {append}"),
        "--wait-for",
        wait,
        "--timeout",
        "300",
    ])?;
    Ok(())
}

/// Sum of Pss over processes (smaps_rollup), in bytes.
fn pss_sum(pids: &[u32]) -> Result<u64> {
    let mut kib = 0;
    for pid in pids {
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .with_context(|| format!("reading smaps_rollup of {pid}"))?;
        kib += text
            .lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(kib * 1024)
}

/// Bytes a file occupies (a tmpfs file: RAM).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Memory-workload passes on a VM's console and when they appeared.
fn passes(log: &str) -> u64 {
    log.matches("SPORE-MEMLOAD pass=").count() as u64
}

/// `repeats` requests for `count` clones each; memory is measured on the
/// last one before its clones are removed.
fn burst(a: &Host, o: &Options, count: u32, repeats: usize) -> Result<Burst> {
    let group = format!("b{count}");
    let (mut running, mut qemu, mut load, mut identity, mut requests) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut pss, mut template_file, mut from_standby) = (0, 0, 0);
    for rep in 0..repeats {
        let t0 = Instant::now();
        let r = a.json(&[
            "vm",
            "clone",
            "idle",
            "--count",
            &count.to_string(),
            "--name",
            &group,
            "--json",
        ])?;
        requests.push(t0.elapsed().as_secs_f64() * 1e3);
        let vms = r["vms"].as_array().cloned().unwrap_or_default();
        if vms.len() != count as usize {
            bail!(
                "asked for {count} clones, got {}: {}",
                vms.len(),
                r["failed"]
            );
        }
        for v in &vms {
            let ms = |key: &str| v["start_ms"][key].as_f64();
            running.extend(ms("total"));
            qemu.extend(ms("qemu"));
            load.extend(ms("load"));
            if v["start_ms"]["standby"] == true {
                from_standby += 1;
            }
        }
        // Identity: the guest answering on its console (read from the log
        // files directly: polling 32 consoles through the CLI would itself
        // take longer than what it measures).
        let mut pending: Vec<PathBuf> = vms
            .iter()
            .filter_map(|v| v["serial_log"].as_str().map(PathBuf::from))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !pending.is_empty() {
            if Instant::now() > deadline {
                bail!("no SPORE-IDENTITY in {pending:?}");
            }
            pending.retain(|log| {
                let text = std::fs::read(log).unwrap_or_default();
                if String::from_utf8_lossy(&text).contains("SPORE-IDENTITY") {
                    identity.push(t0.elapsed().as_secs_f64() * 1e3);
                    false
                } else {
                    true
                }
            });
            std::thread::sleep(Duration::from_millis(5));
        }
        if rep + 1 == repeats {
            // Let the clones run a little, then measure memory.
            std::thread::sleep(Duration::from_secs(3));
            let pids: Vec<u32> = a
                .json(&["vm", "ls", "--json"])?
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter(|v| v["group"] == group.as_str())
                .filter_map(|v| v["pid"].as_u64().map(|p| p as u32))
                .collect();
            pss = pss_sum(&pids)?;
            template_file = allocated(&a.ram.join("tmpl-idle.ram"));
        }
        a.cli(&["vm", "rm", "--group", &group])?;
        if o.standby > 0 {
            wait_standby(a, "idle", o.standby as usize)?;
        }
    }
    Ok(Burst {
        count,
        requests: repeats,
        running_p50_ms: percentile(&running, 50.0),
        running_p99_ms: percentile(&running, 99.0),
        qemu_p50_ms: percentile(&qemu, 50.0),
        load_p50_ms: percentile(&load, 50.0),
        from_standby,
        request_ms: median(&requests),
        identity_p50_ms: percentile(&identity, 50.0),
        identity_p99_ms: percentile(&identity, 99.0),
        pss_sum_bytes: pss,
        template_file_bytes: template_file,
        memory_ratio: (pss + template_file) as f64 / (count as u64 * (o.memory_mib << 20)) as f64,
    })
}

/// Waits until `n` standby clones are ready (the pool refills in the
/// background after each request).
fn wait_standby(a: &Host, template: &str, n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = a.json(&["vm", "ls", "--json"])?.as_array().map_or(0, |v| {
            v.iter()
                .filter(|v| v["state"] == "standby" && v["template"] == template)
                .count()
        });
        if ready >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the standby pool did not refill");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One clone of the busy template on `h`; its progress over the first
/// seconds.
fn progress(
    h: &Host,
    o: &Options,
    which: &'static str,
    round: usize,
    name: &str,
) -> Result<Progress> {
    let before = h.fetched()?;
    let t0 = Instant::now();
    let r = h.json(&["vm", "clone", "busy", "--name", name, "--json"])?;
    let running = Instant::now();
    let running_ms = (running - t0).as_secs_f64() * 1e3;
    let log = PathBuf::from(
        r["vms"][0]["serial_log"]
            .as_str()
            .context("clone without a serial log")?,
    );
    // The console file is read directly (a CLI call per poll would take
    // CPU from the guest being measured). Polling goes on until the first
    // pass after the window, to interpolate within the pass in progress.
    let window = o.progress_seconds;
    let mut timeline: Vec<(f64, u64)> = vec![(0.0, 0)];
    let mut after = None;
    while running.elapsed().as_secs_f64() < window + 5.0 {
        let n = passes(&String::from_utf8_lossy(
            &std::fs::read(&log).unwrap_or_default(),
        ));
        let t = running.elapsed().as_secs_f64();
        if n > timeline.last().map_or(0, |p| p.1) {
            timeline.push((t, n));
            if t > window {
                after = Some((t, n));
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (t_before, n_before) = timeline
        .iter()
        .rev()
        .find(|(t, _)| *t <= window)
        .copied()
        .unwrap_or((0.0, 0));
    let passes_in_window = match after {
        Some((t_after, n_after)) if n_after > n_before => {
            n_before as f64
                + (window - t_before) / (t_after - t_before) * (n_after - n_before) as f64
        }
        _ => n_before as f64,
    };
    timeline.retain(|(t, _)| *t <= window);
    timeline.push((window, n_before));
    let fetched_bytes = h.fetched()? - before;
    h.cli(&["vm", "rm", "--group", name])?;
    Ok(Progress {
        host: which,
        round,
        running_ms,
        passes: passes_in_window,
        timeline,
        fetched_bytes,
    })
}

pub fn run(o: &Options) -> Result<()> {
    require(&["qemu-system-x86_64"])?;
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing: cold-host clones page RAM in through FUSE");
    }
    let spore = std::env::current_exe()?;
    let guest = std::fs::canonicalize(&o.guest)
        .with_context(|| format!("guest {} (run guest/build.sh)", o.guest.display()))?;
    let _ = std::fs::remove_dir_all(&o.workdir);
    std::fs::create_dir_all(&o.workdir)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let shm = Path::new("/dev/shm");
    let standby = o.standby.to_string();
    let a = Host::start(
        &spore,
        &o.workdir.join("a"),
        &shm.join("spore-bench-clone-a"),
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--clone-standby",
            &standby,
        ],
    )?;
    a.import_guest(&guest)?;

    eprintln!("[clone] cold boots");
    let mut cold_boot = Vec::new();
    for i in 0..o.rounds {
        let name = format!("boot{i}");
        cold_boot.push(vm_run(&a, o, &name, "", "SPORE-READY")?);
        a.cli(&["vm", "rm", "--force", &name])?;
    }

    eprintln!("[clone] templates: idle (counter) and busy (memload)");
    vm_run(&a, o, "idle-src", "spore.counter", "SPORE-COUNTER n=2 ")?;
    let idle = a.json(&[
        "vm", "template", "idle-src", "--name", "idle", "--stop", "--json",
    ])?;
    vm_run(
        &a,
        o,
        "busy-src",
        &format!("spore.memload={},0 spore.memload.verbose", o.memload_mib),
        "SPORE-MEMLOAD pass=2 ",
    )?;
    a.json(&[
        "vm", "template", "busy-src", "--name", "busy", "--stop", "--json",
    ])?;

    let mut bursts = Vec::new();
    if o.standby > 0 {
        wait_standby(&a, "idle", o.standby as usize)?;
    }
    for &count in &o.counts {
        eprintln!("[clone] burst of {count}");
        // Single clones are repeated so that p99 means something.
        let repeats = if count == 1 { 10 * o.rounds } else { 1 };
        bursts.push(burst(&a, o, count, repeats)?);
    }

    eprintln!("[clone] local and cold-host clones of the busy template");
    let mut prog = Vec::new();
    // The first local clone also lets A record the busy template's working set.
    prog.push(progress(&a, o, "local", 0, "warmup")?);
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.json(&["image", "inspect", "busy.ram", "--json"])?["profile_blocks"]
        .as_u64()
        .unwrap_or(0)
        == 0
    {
        if Instant::now() > deadline {
            bail!("the busy template's working set was not recorded");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    prog.clear();
    for round in 0..o.rounds {
        prog.push(progress(&a, o, "local", round, &format!("local{round}"))?);
        let b = Host::start(
            &spore,
            &o.workdir.join("b"),
            &shm.join("spore-bench-clone-b"),
            &["--origin", &format!("https://127.0.0.1:{port}")],
        )?;
        let p = progress(&b, o, "cold", round, "cold");
        b.remove();
        prog.push(p?);
    }
    a.remove();

    let local: Vec<f64> = prog
        .iter()
        .filter(|p| p.host == "local")
        .map(|p| p.passes)
        .collect();
    let cold: Vec<f64> = prog
        .iter()
        .filter(|p| p.host == "cold")
        .map(|p| p.passes)
        .collect();
    let cold_running: Vec<f64> = prog
        .iter()
        .filter(|p| p.host == "cold")
        .map(|p| p.running_ms)
        .collect();
    let first = bursts.first().map(|b| b.running_p99_ms).unwrap_or(f64::NAN);
    let report = Report {
        memory_mib: o.memory_mib,
        standby: o.standby,
        cold_boot_median_s: median(&cold_boot),
        cold_boot_s: cold_boot,
        template_capture_pause_ms: idle["pause_ms"].as_f64().unwrap_or(f64::NAN),
        template_ram_stored_bytes: idle["ram_stored_bytes"].as_u64().unwrap_or(0),
        template_state_bytes: idle["state_bytes"].as_u64().unwrap_or(0),
        bursts,
        progress_seconds: o.progress_seconds,
        cold_running_p99_ms: percentile(&cold_running, 99.0),
        cold_over_local_progress: median(&cold) / median(&local),
        clone_speedup_over_cold_boot: f64::NAN,
        progress: prog,
    };
    let report = Report {
        clone_speedup_over_cold_boot: report.cold_boot_median_s * 1e3 / first,
        ..report
    };
    print_report(&report, o);
    if let Some(dir) = o.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&o.out, serde_json::to_string_pretty(&report)?)?;
    std::fs::write(&o.plot, plot(&report))?;
    eprintln!("[clone] wrote {} and {}", o.out.display(), o.plot.display());
    let _ = std::fs::remove_dir_all(&o.workdir);
    Ok(())
}

fn print_report(r: &Report, o: &Options) {
    println!(
        "cold boot (vm run -> SPORE-READY), {} MiB guest: median {:.2} s of {:?}",
        r.memory_mib,
        r.cold_boot_median_s,
        r.cold_boot_s
            .iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
    );
    println!(
        "template: source paused {:.0} ms, RAM stored {:.1} MiB of {} MiB, device state {:.0} KiB",
        r.template_capture_pause_ms,
        r.template_ram_stored_bytes as f64 / 1048576.0,
        r.memory_mib,
        r.template_state_bytes as f64 / 1024.0
    );
    println!();
    println!("standby pool on host A: {} per template", r.standby);
    println!(
        "{:>6} {:>8} {:>12} {:>12} {:>9} {:>9} {:>11} {:>13} {:>13} {:>10} {:>8}",
        "clones",
        "standby",
        "run p50 ms",
        "run p99 ms",
        "qemu ms",
        "load ms",
        "request ms",
        "ident p50 ms",
        "ident p99 ms",
        "mem MiB",
        "mem/NxRAM"
    );
    for b in &r.bursts {
        println!(
            "{:>6} {:>8} {:>12.1} {:>12.1} {:>9.1} {:>9.1} {:>11.0} {:>13.0} {:>13.0} {:>10.0} {:>8.3}",
            b.count,
            b.from_standby,
            b.running_p50_ms,
            b.running_p99_ms,
            b.qemu_p50_ms,
            b.load_p50_ms,
            b.request_ms,
            b.identity_p50_ms,
            b.identity_p99_ms,
            (b.pss_sum_bytes + b.template_file_bytes) as f64 / 1048576.0,
            b.memory_ratio
        );
    }
    println!();
    println!(
        "{:>6} {:>6} {:>12} {:>16} {:>12}",
        "host",
        "round",
        "running ms",
        format!("passes in {}s", o.progress_seconds),
        "fetched MiB"
    );
    for p in &r.progress {
        println!(
            "{:>6} {:>6} {:>12.0} {:>16.2} {:>12.1}",
            p.host,
            p.round,
            p.running_ms,
            p.passes,
            p.fetched_bytes as f64 / 1048576.0
        );
    }
    println!();
    println!(
        "clone (1, p99) vs cold boot: {:.0}x faster; cold-host clone running p99 {:.0} ms; \
         cold-host progress / local progress = {:.2}",
        r.clone_speedup_over_cold_boot, r.cold_running_p99_ms, r.cold_over_local_progress
    );
}

/// Progress (memload passes) against seconds since running, every round.
fn plot(r: &Report) -> String {
    let (w, h, l, t, pw, ph) = (720.0, 420.0, 60.0, 30.0, 620.0, 330.0);
    let max_p = r
        .progress
        .iter()
        .map(|p| p.passes.ceil() as u64)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let x = |s: f64| l + s / r.progress_seconds * pw;
    let y = |p: f64| t + ph - p / max_p * ph;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        svg,
        r#"<rect width="{w}" height="{h}" fill="white"/><text x="{l}" y="18">guest progress after the clone runs: memory-workload passes (local vs cold host)</text>"#
    );
    let _ = write!(
        svg,
        r#"<line x1="{l}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{l}" y1="{t}" x2="{l}" y2="{}" stroke="black"/>"#,
        t + ph,
        l + pw,
        t + ph,
        t + ph
    );
    for s in 0..=(r.progress_seconds as usize) {
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{s} s</text>"#,
            x(s as f64),
            t + ph + 16.0
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="end">{max_p}</text><text x="{}" y="{}" text-anchor="end">0</text>"#,
        l - 6.0,
        t + 4.0,
        l - 6.0,
        t + ph
    );
    for p in &r.progress {
        let color = if p.host == "cold" {
            "#d95f02"
        } else {
            "#1b7837"
        };
        let mut pts = String::new();
        let mut prev = 0;
        for &(s, n) in &p.timeline {
            let _ = write!(
                pts,
                "{:.1},{:.1} {:.1},{:.1} ",
                x(s),
                y(prev as f64),
                x(s),
                y(n as f64)
            );
            prev = n;
        }
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}"/>"#
        );
    }
    let _ = write!(
        svg,
        r##"<text x="{}" y="{}" fill="#1b7837">local clone</text><text x="{}" y="{}" fill="#d95f02">cold-host clone (RAM paged in from the origin)</text></svg>"##,
        l + 10.0,
        t + 16.0,
        l + 10.0,
        t + 32.0
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_count_memload_lines() {
        let log = "SPORE-MEMLOAD started mib=64 rate=0\r\nSPORE-MEMLOAD pass=1 uptime=9.1\r\n\
                   x SPORE-MEMLOAD pass=2 uptime=9.5\r\n";
        assert_eq!(passes(log), 2);
    }
}
