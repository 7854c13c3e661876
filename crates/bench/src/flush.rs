//! `spore bench flush`: what a database's commit costs through NBD as the
//! disk grows, against qemu-nbd over qcow2 in the same run.
//!
//! The pattern is one 4 KiB write at a random offset followed by a flush,
//! one at a time (fio's nbd engine with `--rw=randwrite --bs=4k --fsync=1
//! --iodepth=1`: each write is followed by NBD_CMD_FLUSH). fio's nbd engine
//! never sets NBD_CMD_FLAG_FUA, so the FUA variant is not measured here.
//!
//! Each size gets a spore disk over an empty (sparse) image of that size,
//! and a fresh qcow2 file of that size served by `qemu-nbd` with its
//! defaults (writeback cache: a flush is qcow2's metadata written back,
//! then fdatasync, as spore's is the data file's fdatasync, then the
//! overlay's metadata). The cases run interleaved, `rounds` times, each
//! round with its own random offsets (the same for every case); each
//! case's figures are its medians over rounds, and each ratio is the median
//! of the rounds' ratios (a round runs every case once, close in time, so
//! its ratio is less disturbed by whatever else the machine does). `--before-agent` runs a second agent
//! from another spore binary (an older build) beside the first, so that a
//! change is measured against its predecessor under the same noise.
//!
//! fio reports a write's and a flush's latency separately; the time of one
//! write + flush is not logged per pair. Its mean is exact: with one
//! request at a time, 1 / IOPS.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use serde_json::Value;
use spore_api::{DiskCreate, ImportRequest, ImportResult};

use crate::median;
use crate::procs::{self, require, AgentProcess, QemuNbd};

#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Disk sizes (GiB)
    #[arg(long, value_delimiter = ',', default_value = "1,1024")]
    pub sizes_gib: Vec<u64>,
    /// Seconds per fio job
    #[arg(long, default_value_t = 4)]
    pub seconds: u32,
    /// Rounds over every case (interleaved); figures are medians over rounds
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Skip the qcow2/qemu-nbd baseline
    #[arg(long)]
    pub no_baseline: bool,
    /// The spore binary to run as the agent (default: this one)
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// Also measure an agent of this spore binary (an older build, say) in
    /// the same run, as "spore before"
    #[arg(long)]
    pub before_agent: Option<PathBuf>,
    /// Where to write the JSON results
    #[arg(long, default_value = "bench-results/flush.json")]
    pub out: PathBuf,
    /// Working directory (default: a temporary directory, removed after)
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

/// One fio run of the write + flush pattern.
#[derive(Debug, Clone, Copy, Serialize)]
struct Sample {
    /// Writes per second, each followed by its flush.
    iops: f64,
    write_p50_us: f64,
    write_p99_us: f64,
    flush_p50_us: f64,
    flush_p99_us: f64,
    /// Mean time of one write + flush (1 / IOPS).
    cycle_mean_us: f64,
}

#[derive(Debug, Serialize)]
struct Case {
    system: String,
    size_bytes: u64,
    rounds: Vec<Sample>,
    /// Each figure's median over the rounds.
    median: Sample,
}

#[derive(Debug, Serialize)]
struct Report {
    seconds_per_job: u32,
    rounds: u32,
    agent: String,
    before_agent: Option<String>,
    qemu_nbd_version: String,
    cases: Vec<Case>,
    ratios: Vec<Ratio>,
}

const SPORE: &str = "spore";
const BEFORE: &str = "spore before";
const QCOW2: &str = "qemu-nbd qcow2";

fn fio_write_flush(uri: &str, seconds: u32, seed: u64) -> Result<Sample> {
    let out = procs::run(
        Command::new("fio")
            .args([
                "--name=flush",
                "--ioengine=nbd",
                "--output-format=json",
                "--rw=randwrite",
                "--bs=4k",
                "--fsync=1",
                "--iodepth=1",
                "--time_based",
                // fio's map of written blocks is 32 MiB at 1 TiB; offsets
                // stay random and reproducible without it.
                "--norandommap",
            ])
            .arg(format!("--uri={uri}"))
            .arg(format!("--runtime={seconds}"))
            .arg(format!("--randseed={seed}")),
    )?;
    let start = out.find('{').context("fio printed no JSON")?;
    let v: Value = serde_json::from_str(&out[start..]).context("parsing fio JSON")?;
    let job = &v["jobs"][0];
    if job["error"].as_i64().unwrap_or(0) != 0 {
        bail!("fio reported error {}", job["error"]);
    }
    let us = |stats: &Value, p: &str| stats["percentile"][p].as_f64().unwrap_or(f64::NAN) / 1e3;
    let write = &job["write"]["clat_ns"];
    let sync = &job["sync"]["lat_ns"];
    let iops = job["write"]["iops"].as_f64().unwrap_or(0.0);
    if iops <= 0.0 || job["sync"]["total_ios"].as_u64().unwrap_or(0) == 0 {
        bail!("fio completed no write + flush");
    }
    Ok(Sample {
        iops,
        write_p50_us: us(write, "50.000000"),
        write_p99_us: us(write, "99.000000"),
        flush_p50_us: us(sync, "50.000000"),
        flush_p99_us: us(sync, "99.000000"),
        cycle_mean_us: 1e6 / iops,
    })
}

fn median_sample(s: &[Sample]) -> Sample {
    let m = |f: fn(&Sample) -> f64| median(&s.iter().map(f).collect::<Vec<_>>());
    Sample {
        iops: m(|s| s.iops),
        write_p50_us: m(|s| s.write_p50_us),
        write_p99_us: m(|s| s.write_p99_us),
        flush_p50_us: m(|s| s.flush_p50_us),
        flush_p99_us: m(|s| s.flush_p99_us),
        cycle_mean_us: m(|s| s.cycle_mean_us),
    }
}

/// One export under test.
struct Target {
    system: String,
    size: u64,
    uri: String,
}

pub fn run(o: &Options) -> Result<()> {
    require(&["fio", "qemu-img", "qemu-nbd"])?;
    if o.sizes_gib.is_empty() || o.sizes_gib.contains(&0) || o.rounds == 0 {
        bail!("need sizes of at least 1 GiB and at least one round");
    }
    let tmp;
    let work = match &o.work_dir {
        Some(w) => w.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_owned()
        }
    };
    std::fs::create_dir_all(&work)?;
    let spore = match &o.agent {
        Some(p) => std::path::absolute(p)?,
        None => std::env::current_exe()?,
    };
    let qemu_nbd_version = procs::run(Command::new("qemu-nbd").arg("--version"))?
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    eprintln!(
        "bench flush: sizes {:?} GiB, {} rounds of {} s per case, agent {}, work dir {}",
        o.sizes_gib,
        o.rounds,
        o.seconds,
        spore.display(),
        work.display()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let before = match &o.before_agent {
        Some(p) => Some(std::path::absolute(p)?),
        None => None,
    };
    let mut agents = vec![(
        SPORE,
        AgentProcess::start(&spore, &work.join("agent"), &[])?,
    )];
    if let Some(b) = &before {
        agents.push((
            BEFORE,
            AgentProcess::start(b, &work.join("agent-before"), &[])?,
        ));
    }

    let mut targets = Vec::new();
    let mut servers = Vec::new();
    for &gib in &o.sizes_gib {
        let size = gib << 30;
        // An empty image of this size: a sparse raw file imports as holes.
        let raw = work.join(format!("empty-{gib}g.raw"));
        std::fs::File::create(&raw)?.set_len(size)?;
        for (system, agent) in &agents {
            let client = agent.client();
            let req = ImportRequest {
                path: raw.clone(),
                name: format!("empty-{gib}g"),
                parent: None,
                block_size: None,
            };
            let _: ImportResult =
                rt.block_on(client.stream(hyper::Method::POST, "/v1/images", &req, |_, _, _| {}))?;
            let disk = format!("flush-{gib}g");
            let _: Value = rt.block_on(client.call(
                hyper::Method::POST,
                "/v1/disks",
                Some(&DiskCreate {
                    name: disk.clone(),
                    image: format!("empty-{gib}g"),
                }),
            ))?;
            targets.push(Target {
                system: (*system).into(),
                size,
                uri: agent.nbd_uri(&format!("disk/{disk}")),
            });
        }
        std::fs::remove_file(&raw)?;
        if !o.no_baseline {
            let qcow = work.join(format!("flush-{gib}g.qcow2"));
            procs::run(
                Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2"])
                    .arg(&qcow)
                    .arg(size.to_string()),
            )?;
            let nbd =
                QemuNbd::start_writable(&qcow, "qcow2", &work.join(format!("qemu-{gib}g.sock")))?;
            targets.push(Target {
                system: QCOW2.into(),
                size,
                uri: nbd.uri(),
            });
            servers.push(nbd);
        }
    }

    // The pairs compared run next to each other (one server's sizes, then
    // the next server), and every other round runs backwards, so that a
    // drift in the machine's load does not favour one side of a ratio.
    let rank = |system: &str| [SPORE, QCOW2, BEFORE].iter().position(|s| *s == system);
    targets.sort_by_key(|t| (rank(&t.system), t.size));
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); targets.len()];
    for round in 0..o.rounds {
        let seed = 1000 + u64::from(round);
        let mut order: Vec<usize> = (0..targets.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let t = &targets[i];
            let s = fio_write_flush(&t.uri, o.seconds, seed)
                .with_context(|| format!("fio against {} at {} GiB", t.system, t.size >> 30))?;
            eprintln!(
                "  round {} {:>15} {:>5} GiB: {:>7.0} IOPS, flush p50 {:.0} us",
                round + 1,
                t.system,
                t.size >> 30,
                s.iops,
                s.flush_p50_us
            );
            samples[i].push(s);
        }
    }
    drop(servers);

    let cases: Vec<Case> = targets
        .iter()
        .zip(samples)
        .map(|(t, rounds)| Case {
            system: t.system.clone(),
            size_bytes: t.size,
            median: median_sample(&rounds),
            rounds,
        })
        .collect();
    let ratios = ratios(&cases, o);
    print_report(&cases, &ratios, o);
    let report = Report {
        seconds_per_job: o.seconds,
        rounds: o.rounds,
        agent: spore.display().to_string(),
        before_agent: before.map(|b| b.display().to_string()),
        qemu_nbd_version,
        cases,
        ratios,
    };
    write_json(&o.out, &report)
}

fn write_json(out: &Path, report: &Report) -> Result<()> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, serde_json::to_vec_pretty(report)?)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// `a / b`, paired by round: each round ran every case once, close in
/// time, so a round's ratio is less disturbed by the machine's other load
/// than a ratio of medians.
#[derive(Debug, Serialize)]
struct Ratio {
    what: String,
    /// Median over rounds of the round's ratio of mean write + flush time.
    cycle_mean: f64,
    cycle_mean_min: f64,
    cycle_mean_max: f64,
    flush_p50: f64,
    flush_p99: f64,
    /// The most `cycle_mean` may be.
    goal: Option<f64>,
}

fn ratio(what: String, a: &Case, b: &Case, goal: Option<f64>) -> Ratio {
    let per_round = |f: fn(&Sample) -> f64| -> Vec<f64> {
        a.rounds
            .iter()
            .zip(&b.rounds)
            .map(|(x, y)| f(x) / f(y))
            .collect()
    };
    let cycle = per_round(|s| s.cycle_mean_us);
    Ratio {
        what,
        cycle_mean: median(&cycle),
        cycle_mean_min: cycle.iter().copied().fold(f64::INFINITY, f64::min),
        cycle_mean_max: cycle.iter().copied().fold(0.0, f64::max),
        flush_p50: median(&per_round(|s| s.flush_p50_us)),
        flush_p99: median(&per_round(|s| s.flush_p99_us)),
        goal,
    }
}

/// The comparisons the goals are about: each spore at the largest size
/// against the smallest, each spore against qcow2 at every size, and spore
/// against the build before it.
fn ratios(cases: &[Case], o: &Options) -> Vec<Ratio> {
    let find = |sys: &str, size: u64| {
        cases
            .iter()
            .find(|c| c.system == sys && c.size_bytes == size)
    };
    let mut sizes: Vec<u64> = o.sizes_gib.iter().map(|g| g << 30).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let (small, large) = (sizes[0], sizes[sizes.len() - 1]);
    let mut out = Vec::new();
    for sys in [SPORE, BEFORE] {
        if let (Some(a), Some(b), true) = (find(sys, large), find(sys, small), large > small) {
            let what = format!("{sys} {} GiB / {} GiB", large >> 30, small >> 30);
            out.push(ratio(what, a, b, Some(1.1)));
        }
    }
    for sys in [SPORE, BEFORE] {
        for &size in &sizes {
            if let (Some(a), Some(q)) = (find(sys, size), find(QCOW2, size)) {
                let what = format!("{sys} / {QCOW2} at {} GiB", size >> 30);
                out.push(ratio(what, a, q, Some(1.0)));
            }
        }
    }
    for &size in &sizes {
        if let (Some(a), Some(b)) = (find(SPORE, size), find(BEFORE, size)) {
            let what = format!("{SPORE} / {BEFORE} at {} GiB", size >> 30);
            out.push(ratio(what, a, b, None));
        }
    }
    out
}

fn print_report(cases: &[Case], ratios: &[Ratio], o: &Options) {
    let ms = |us: f64| us / 1e3;
    println!();
    println!(
        "4 KiB random write + flush, one at a time; medians over {} rounds of {} s",
        o.rounds, o.seconds
    );
    println!(
        "{:>15} {:>7}  {:>8}  {:>10} {:>10}  {:>10} {:>10}  {:>10}",
        "server", "size", "IOPS", "write p50", "write p99", "flush p50", "flush p99", "w+f mean"
    );
    for c in cases {
        let m = &c.median;
        println!(
            "{:>15} {:>5} G  {:>8.0}  {:>7.3} ms {:>7.3} ms  {:>7.3} ms {:>7.3} ms  {:>7.3} ms",
            c.system,
            c.size_bytes >> 30,
            m.iops,
            ms(m.write_p50_us),
            ms(m.write_p99_us),
            ms(m.flush_p50_us),
            ms(m.flush_p99_us),
            ms(m.cycle_mean_us)
        );
    }
    println!();
    println!("ratios: median over rounds of each round's ratio (range in brackets)");
    for r in ratios {
        let goal = match r.goal {
            Some(g) if r.cycle_mean <= g => format!("  goal <= {g:.2}x: met"),
            Some(g) => format!("  goal <= {g:.2}x: not met"),
            None => String::new(),
        };
        println!(
            "{}: write+flush mean {:.2}x [{:.2}-{:.2}], flush p50 {:.2}x, flush p99 {:.2}x{goal}",
            r.what, r.cycle_mean, r.cycle_mean_min, r.cycle_mean_max, r.flush_p50, r.flush_p99
        );
    }
    if o.no_baseline {
        println!("(no qcow2 baseline: --no-baseline)");
    }
}
