//! `spore bench tls`: what the fleet's mutual TLS costs a chunk transfer
//! between two hosts, against the same transfer in plaintext
//! (`--insecure-listen`) in the same run.
//!
//! An origin agent holds one image of random data (incompressible, so the
//! wire carries every byte). Each round starts a fresh agent with that
//! origin and nothing else, and times `spore image pull` of the whole image
//! (every chunk fetched in batches over one kept connection), once over
//! TLS and once in plaintext, in alternating order. The figure is the
//! median over rounds of each round's time ratio (TLS / plaintext): pairs
//! run next to each other, so the machine's other load disturbs a ratio
//! less than it disturbs either time.
//!
//! The second part ([`crate::tls_stream`]) does the same for QEMU's
//! migration stream, with QEMU's own TLS and with spore's relay carrying it;
//! the third ([`crate::tls_vm`]) for a cold-host boot, a cold-host clone
//! and a migration of the demo guest.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use crate::median;
use crate::procs::{AgentProcess, Mode};

#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Size of the image pulled (MiB of random data)
    #[arg(long, default_value_t = 256)]
    pub mib: u64,
    /// Rounds (each pulls the image once over TLS and once in plaintext)
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// RAM of the QEMU migrated in the stream part (MiB of random data;
    /// 0 skips the part)
    #[arg(long, default_value_t = 512)]
    pub stream_mib: u64,
    /// Rounds of the stream part (each migrates once per mode and cap)
    #[arg(long, default_value_t = 3)]
    pub stream_rounds: u32,
    /// The stream part's rate cap besides unlimited (MB/s; a fleet's
    /// link is slower than loopback)
    #[arg(long, default_value_t = 125)]
    pub stream_cap_mb_s: u64,
    /// Rounds of the VM part: a cold-host boot, a cold-host clone and a
    /// migration per mode (0 skips the part)
    #[arg(long, default_value_t = 3)]
    pub vm_rounds: usize,
    /// Guest memory of the VM part (MiB)
    #[arg(long, default_value_t = 256)]
    pub vm_memory_mib: u64,
    /// Demo guest (vmlinuz, initrd.img, rootfs.img from guest/build.sh)
    #[arg(long, default_value = ".cache/guest")]
    pub guest: PathBuf,
    /// Where to write the JSON results
    #[arg(long, default_value = "bench-results/tls.json")]
    pub out: PathBuf,
    /// Working directory (default: a temporary directory, removed after)
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Round {
    tls_s: f64,
    plaintext_s: f64,
    ratio: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    mib: u64,
    rounds: Vec<Round>,
    tls_mb_s: f64,
    plaintext_mb_s: f64,
    /// Median over rounds of (TLS time / plaintext time).
    tls_cost_ratio: f64,
    goal_ratio: f64,
    met: bool,
    /// QEMU's migration stream: plaintext, QEMU's TLS, spore's TLS relay.
    stream: Vec<crate::tls_stream::StreamCase>,
    /// A cold-host boot, a cold-host clone and a migration.
    vm: Option<crate::tls_vm::VmReport>,
}

/// Runs `spore --data-dir DATA ARGS`; its stdout, or its stderr as the error.
pub(crate) fn spore_cmd(spore: &Path, data_dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(spore)
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .output()
        .with_context(|| format!("running spore {args:?}"))?;
    if !out.status.success() {
        bail!(
            "spore {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn listen_url(data_dir: &Path, mode: Mode) -> Result<String> {
    let addr = std::fs::read_to_string(data_dir.join("listen.addr"))
        .context("reading the origin's listen.addr")?;
    Ok(format!("{}://{}", mode.scheme(), addr.trim()))
}

/// Seconds to pull the whole image from `origin` into a fresh agent.
fn pull(spore: &Path, work: &Path, origin: &str, mode: Mode, round: u32) -> Result<f64> {
    let dir = work.join(format!("host-{round}-{mode:?}"));
    let mut args = vec!["--origin", origin];
    args.extend(mode.flags());
    let agent = AgentProcess::start(spore, &dir, &args)?;
    let t = Instant::now();
    spore_cmd(spore, &dir, &["image", "pull", "big"])?;
    let s = t.elapsed().as_secs_f64();
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(s)
}

pub fn run(o: &Options) -> Result<()> {
    let spore = std::env::current_exe()?;
    let tmp = tempfile::tempdir()?;
    let work = o.work_dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&work)?;
    let image = work.join("big.raw");
    crate::random_file(&image, o.mib)?;
    // One origin per mode, holding the same image.
    let mut origins = Vec::new();
    for mode in [Mode::Tls, Mode::Plaintext] {
        let dir = work.join(format!("origin-{mode:?}"));
        let mut args = vec!["--listen", "127.0.0.1:0"];
        args.extend(mode.flags());
        let agent = AgentProcess::start(&spore, &dir, &args)?;
        spore_cmd(
            &spore,
            &dir,
            &["image", "import", image.to_str().unwrap(), "--name", "big"],
        )?;
        origins.push((mode, listen_url(&dir, mode)?, agent));
    }
    let mut rounds = Vec::new();
    for r in 0..o.rounds {
        let mut order = [Mode::Tls, Mode::Plaintext];
        if r % 2 == 1 {
            order.reverse();
        }
        let (mut tls_s, mut plaintext_s) = (0.0, 0.0);
        for mode in order {
            let url = &origins.iter().find(|(m, _, _)| *m == mode).unwrap().1;
            let s = pull(&spore, &work, url, mode, r)?;
            match mode {
                Mode::Tls => tls_s = s,
                Mode::Plaintext => plaintext_s = s,
            }
        }
        eprintln!(
            "round {}: TLS {tls_s:.2} s, plaintext {plaintext_s:.2} s",
            r + 1
        );
        rounds.push(Round {
            tls_s,
            plaintext_s,
            ratio: tls_s / plaintext_s,
        });
    }
    let mb = (o.mib << 20) as f64 / 1e6;
    let tls_mb_s = mb / median(&rounds.iter().map(|r| r.tls_s).collect::<Vec<_>>());
    let plaintext_mb_s = mb / median(&rounds.iter().map(|r| r.plaintext_s).collect::<Vec<_>>());
    let ratio = median(&rounds.iter().map(|r| r.ratio).collect::<Vec<_>>());
    let goal = 1.05;
    println!(
        "chunk transfer between two agents on loopback, {} MiB of random data, {} rounds",
        o.mib, o.rounds
    );
    println!("{:<12} {:>10}", "mode", "MB/s");
    println!("{:<12} {:>10.1}", "mutual TLS", tls_mb_s);
    println!("{:<12} {:>10.1}", "plaintext", plaintext_mb_s);
    println!(
        "TLS / plaintext time, median of paired rounds: {ratio:.3} (goal <= {goal}: {})",
        if ratio <= goal { "met" } else { "not met" }
    );
    let stream = if o.stream_mib > 0 {
        crate::tls_stream::run(
            &work,
            o.stream_mib,
            o.stream_rounds,
            &[None, Some(o.stream_cap_mb_s * 1_000_000)],
        )?
    } else {
        Vec::new()
    };
    if !stream.is_empty() {
        println!(
            "\nQEMU's migration stream, {} MiB of RAM on loopback, {} rounds",
            o.stream_mib, o.stream_rounds
        );
        println!(
            "{:<14} {:<12} {:>8} {:>18}",
            "cap", "mode", "MB/s", "time / plaintext"
        );
        for case in &stream {
            let cap = case
                .cap
                .map_or("none".into(), |c| format!("{} MB/s", c / 1_000_000));
            for ((mode, mb_s), (_, ratio)) in case.mb_s.iter().zip(&case.ratio) {
                let mode = serde_json::to_value(mode)?;
                println!(
                    "{:<14} {:<12} {:>8.1} {:>18.3}",
                    cap,
                    mode.as_str().unwrap_or_default(),
                    mb_s,
                    ratio
                );
            }
        }
    }
    let vm = if o.vm_rounds > 0 {
        Some(crate::tls_vm::run(
            &spore,
            &work,
            &o.guest,
            o.vm_memory_mib,
            o.vm_rounds,
        )?)
    } else {
        None
    };
    if let Some(v) = &vm {
        println!(
            "\nVMs over TLS against --insecure-listen, {} MiB guests, {} rounds (TLS / plaintext, median of paired rounds)",
            v.memory_mib, o.vm_rounds
        );
        let r = &v.ratios;
        for (what, ratio) in [
            ("cold-host boot (to SPORE-READY)", r.boot),
            ("cold-host clone (to running)", r.clone_running),
            ("cold-host clone (to new identity)", r.clone_identity),
            ("migration total time (loopback)", r.migration_total),
            ("migration downtime (loopback)", r.migration_downtime),
            ("migration total time (1 Gbit/s)", r.capped_total),
            ("migration downtime (1 Gbit/s)", r.capped_downtime),
        ] {
            println!(
                "{what:<36} {ratio:>7.3} {}",
                if ratio <= goal { "" } else { "(over 1.05)" }
            );
        }
    }
    let report = Report {
        mib: o.mib,
        rounds,
        tls_mb_s,
        plaintext_mb_s,
        tls_cost_ratio: ratio,
        goal_ratio: goal,
        met: ratio <= goal,
        stream,
        vm,
    };
    if let Some(dir) = o.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&o.out, serde_json::to_vec_pretty(&report)?)?;
    eprintln!("wrote {}", o.out.display());
    Ok(())
}
