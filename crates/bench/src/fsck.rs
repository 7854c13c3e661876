//! `spore bench fsck`: how fast `spore fsck` checks a chunk store, beside
//! `b3sum` hashing the same chunk files in the same run.
//!
//! An agent imports an image of random data (incompressible: the chunk
//! files are as large as the data). Each round times `spore fsck` (every
//! chunk file read, decoded and hashed, every reference followed) and
//! `b3sum` over the same files, single-threaded and with its default
//! threads. The page cache is warm for both (one untimed pass first): the
//! figures are the CPU's, not the disk's. fsck hashes what a chunk decodes
//! to, b3sum the files as they are; for incompressible data the two are
//! the same size.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use serde_json::Value;

use crate::median;
use crate::procs::{require, AgentProcess};
use crate::tls::spore_cmd;

#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Size of the image the store holds, MiB
    #[arg(long, default_value_t = 1024)]
    pub mib: u64,
    /// Timed rounds
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Where the agent keeps its data (default: a temporary directory)
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    #[arg(long, default_value = "bench-results/fsck.json")]
    pub out: PathBuf,
}

#[derive(Debug, Serialize)]
struct Report {
    mib: u64,
    chunk_files: usize,
    /// Bytes of the chunk files on disk.
    stored_bytes: u64,
    /// Bytes fsck decoded and hashed.
    checked_bytes: u64,
    fsck_s: Vec<f64>,
    b3sum_1_thread_s: Vec<f64>,
    b3sum_s: Vec<f64>,
    /// Median GiB/s of the stored bytes.
    fsck_gib_s: f64,
    b3sum_1_thread_gib_s: f64,
    b3sum_gib_s: f64,
}

fn chunk_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for sub in std::fs::read_dir(dir)? {
        let sub = sub?.path();
        // Two hex digits: the store's fan-out (not `corrupt/`).
        if !sub.is_dir() || sub.file_name().is_none_or(|n| n.len() != 2) {
            continue;
        }
        for f in std::fs::read_dir(&sub)? {
            out.push(f?.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Seconds for `b3sum` over `files` (`threads`: None for its default).
fn b3sum(files: &[PathBuf], threads: Option<u32>) -> Result<f64> {
    let mut cmd = Command::new("b3sum");
    if let Some(n) = threads {
        cmd.args(["--num-threads", &n.to_string()]);
    }
    cmd.arg("--no-names").args(files);
    let t = Instant::now();
    let out = cmd.output().context("running b3sum")?;
    let s = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("b3sum failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(s)
}

pub fn run(o: &Options) -> Result<()> {
    require(&["b3sum"])?;
    let spore = std::env::current_exe()?;
    let tmp = tempfile::tempdir()?;
    let work = o.work_dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&work)?;
    let image = work.join("fsck.raw");
    crate::random_file(&image, o.mib)?;
    let data = work.join("agent");
    let _agent = AgentProcess::start(&spore, &data, &[])?;
    spore_cmd(
        &spore,
        &data,
        &["image", "import", image.to_str().unwrap(), "--name", "big"],
    )?;
    std::fs::remove_file(&image)?;
    let files = chunk_files(&data.join("chunks"))?;
    let stored: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let fsck = || -> Result<(f64, Value)> {
        let t = Instant::now();
        let out = spore_cmd(&spore, &data, &["fsck", "--json"])?;
        let s = t.elapsed().as_secs_f64();
        let r: Value = serde_json::from_str(&out)?;
        if r["clean"] != true {
            bail!("the store is not clean: {r}");
        }
        Ok((s, r))
    };
    // Warm the page cache for both.
    let (_, first) = fsck()?;
    b3sum(&files, None)?;
    let mut report = Report {
        mib: o.mib,
        chunk_files: files.len(),
        stored_bytes: stored,
        checked_bytes: first["bytes_checked"].as_u64().unwrap_or(0),
        fsck_s: Vec::new(),
        b3sum_1_thread_s: Vec::new(),
        b3sum_s: Vec::new(),
        fsck_gib_s: 0.0,
        b3sum_1_thread_gib_s: 0.0,
        b3sum_gib_s: 0.0,
    };
    for r in 0..o.rounds {
        let (f, _) = fsck()?;
        let b1 = b3sum(&files, Some(1))?;
        let bn = b3sum(&files, None)?;
        eprintln!(
            "round {}: fsck {f:.2} s, b3sum 1 thread {b1:.2} s, b3sum {bn:.2} s",
            r + 1
        );
        report.fsck_s.push(f);
        report.b3sum_1_thread_s.push(b1);
        report.b3sum_s.push(bn);
    }
    let gib = stored as f64 / (1u64 << 30) as f64;
    report.fsck_gib_s = gib / median(&report.fsck_s);
    report.b3sum_1_thread_gib_s = gib / median(&report.b3sum_1_thread_s);
    report.b3sum_gib_s = gib / median(&report.b3sum_s);
    println!(
        "store: {} chunk files, {:.2} GiB stored, {:.2} GiB checked by fsck",
        report.chunk_files,
        gib,
        report.checked_bytes as f64 / (1u64 << 30) as f64
    );
    println!("{:<22} {:>8} {:>8}", "", "s (p50)", "GiB/s");
    for (what, s, rate) in [
        ("spore fsck", &report.fsck_s, report.fsck_gib_s),
        (
            "b3sum, 1 thread",
            &report.b3sum_1_thread_s,
            report.b3sum_1_thread_gib_s,
        ),
        (
            "b3sum, default threads",
            &report.b3sum_s,
            report.b3sum_gib_s,
        ),
    ] {
        println!("{what:<22} {:>8.2} {rate:>8.2}", median(s));
    }
    println!(
        "fsck / b3sum (1 thread) time: {:.2}",
        median(&report.fsck_s) / median(&report.b3sum_1_thread_s)
    );
    if let Some(dir) = o.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&o.out, serde_json::to_vec_pretty(&report)?)?;
    println!("wrote {}", o.out.display());
    Ok(())
}
