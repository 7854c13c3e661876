//! `spore bench blockdev`: NBD read performance as the layer count grows.
//!
//! Both sides are built from the same writes: a base image of random data,
//! then one layer per step, each made by the same `qemu-io` writes — into a
//! spore disk that is then committed as a new image, and into a new qcow2
//! file on top of the previous one. At each depth, fio's nbd engine reads
//! the top of the stack through spore's NBD server and through qemu-nbd
//! (4 KiB random reads and 1 MiB sequential reads, warm caches), and
//! qemu-nbd over the raw base file gives the no-layers reference. Before
//! measuring, `qemu-img compare` proves both stacks hold the same bytes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use spore_api::{CommitRequest, DiskCreate, ImportRequest, ImportResult};

use crate::procs::{self, fio_nbd, require, AgentProcess, FioResult, QemuNbd};

#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Layer depths to measure
    #[arg(long, value_delimiter = ',', default_value = "1,16,128,1000")]
    pub depths: Vec<u32>,
    /// Size of the image (MiB)
    #[arg(long, default_value_t = 256)]
    pub size_mib: u64,
    /// spore block size (bytes)
    #[arg(long, default_value_t = 65536)]
    pub block_size: u32,
    /// Also measure spore at depth 1 with these block sizes (bytes), to choose the default
    #[arg(long, value_delimiter = ',')]
    pub block_sizes: Vec<u32>,
    /// Seconds per fio job
    #[arg(long, default_value_t = 8)]
    pub seconds: u32,
    #[arg(long, default_value_t = 16)]
    pub iodepth: u32,
    /// Skip the qcow2/qemu-nbd baseline
    #[arg(long)]
    pub no_baseline: bool,
    /// Where to write the JSON results
    #[arg(long, default_value = "bench-results/blockdev.json")]
    pub out: PathBuf,
    /// Working directory (default: a temporary directory, removed after)
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Row {
    system: String,
    depth: u32,
    block_size: u32,
    randread_4k: FioResult,
    seqread_1m: FioResult,
}

#[derive(Debug, Serialize)]
struct Report {
    size_bytes: u64,
    seconds_per_job: u32,
    iodepth: u32,
    build_seconds_spore: f64,
    build_seconds_qcow2: f64,
    rows: Vec<Row>,
    block_size_sweep: Vec<SweepRow>,
}

#[derive(Debug, Serialize)]
struct SweepRow {
    block_size: u32,
    import_seconds: f64,
    stored_bytes: u64,
    randread_4k: FioResult,
    seqread_1m: FioResult,
}

/// Deterministic, incompressible data (xorshift64*).
fn write_random_file(path: &Path, size: u64, seed: u64) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for word in buf.chunks_exact_mut(8) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            word.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// The qemu-io commands that make layer `k`: two 64 KiB writes at
/// pseudo-random aligned offsets with a per-layer pattern.
fn layer_writes(k: u32, size: u64) -> Vec<String> {
    let slots = size / 65536;
    let mut x = (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..2)
        .map(|_| format!("write -P {} {} 64k", k % 251 + 1, (next() % slots) * 65536))
        .collect()
}

fn qemu_io(format: &str, target: &str, cmds: &[String]) -> Result<()> {
    let mut c = Command::new("qemu-io");
    c.args(["-f", format]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(target);
    procs::run(&mut c)?;
    Ok(())
}

/// qemu-io on a `json:` image description (format given inside).
fn qemu_io_opts(target: &str, cmds: &[String]) -> Result<()> {
    let mut c = Command::new("qemu-io");
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(target);
    procs::run(&mut c)?;
    Ok(())
}

fn measure(uri: &str, o: &Options, size: u64) -> Result<(FioResult, FioResult)> {
    // One sequential pass first, so both systems are measured warm.
    fio_nbd(uri, "read", "1m", 4, 1, size)?;
    let rand = fio_nbd(uri, "randread", "4k", o.iodepth, o.seconds, size)?;
    let seq = fio_nbd(uri, "read", "1m", o.iodepth.min(8), o.seconds, size)?;
    Ok((rand, seq))
}

pub fn run(o: &Options) -> Result<()> {
    require(&["fio", "qemu-io", "qemu-img", "qemu-nbd"])?;
    let mut depths = o.depths.clone();
    depths.sort_unstable();
    depths.dedup();
    let max_depth = *depths.last().context("no depths")?;
    if depths[0] == 0 {
        bail!("depths start at 1");
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
    let size = o.size_mib << 20;
    let spore = std::env::current_exe()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    eprintln!(
        "bench blockdev: {} MiB image, depths {:?}, work dir {}",
        o.size_mib,
        depths,
        work.display()
    );
    let base = work.join("base.raw");
    write_random_file(&base, size, 7)?;

    let agent = AgentProcess::start(
        &spore,
        &work.join("agent"),
        &["--cache-size", &format!("{}M", o.size_mib * 3)],
    )?;
    let client = agent.client();

    // spore: base image, then one committed layer per step.
    let t = Instant::now();
    let import_file = |path: &Path, name: &str, block_size: u32| -> Result<ImportResult> {
        let req = ImportRequest {
            path: path.to_owned(),
            name: name.into(),
            parent: None,
            block_size: Some(block_size),
        };
        Ok(rt.block_on(client.stream(hyper::Method::POST, "/v1/images", &req, |_, _, _| {}))?)
    };
    import_file(&base, "d1", o.block_size)?;
    for k in 2..=max_depth {
        let _: serde_json::Value = rt.block_on(client.call(
            hyper::Method::POST,
            "/v1/disks",
            Some(&DiskCreate {
                name: "tmp".into(),
                image: format!("d{}", k - 1),
            }),
        ))?;
        qemu_io("raw", &agent.nbd_uri("disk/tmp"), &layer_writes(k, size))?;
        let _: serde_json::Value = rt.block_on(client.call(
            hyper::Method::POST,
            "/v1/disks/tmp/commit",
            Some(&CommitRequest {
                name: format!("d{k}"),
            }),
        ))?;
        let _: serde_json::Value =
            rt.block_on(client.call(hyper::Method::DELETE, "/v1/disks/tmp", None::<&()>))?;
        if k % 100 == 0 {
            eprintln!("  spore: {k} layers ({:.0}s)", t.elapsed().as_secs_f64());
        }
    }
    let build_spore = t.elapsed().as_secs_f64();

    // qcow2: the same writes, one file per layer, each backed by the last.
    let t = Instant::now();
    let qcow = |k: u32| work.join(format!("l{k}.qcow2"));
    if !o.no_baseline {
        procs::run(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(&base)
                .arg(qcow(1)),
        )?;
        for k in 2..=max_depth {
            // -u and "backing": null keep each step from opening the whole
            // chain (which makes building it quadratic); the writes cover
            // whole clusters, so the new top never needs its backing file.
            procs::run(
                Command::new("qemu-img")
                    .args(["create", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
                    .arg(qcow(k - 1))
                    .arg(qcow(k))
                    .arg(size.to_string()),
            )?;
            let top = serde_json::json!({
                "driver": "qcow2",
                "file": { "driver": "file", "filename": qcow(k).display().to_string() },
                "backing": null,
            });
            qemu_io_opts(&format!("json:{top}"), &layer_writes(k, size))?;
            if k % 100 == 0 {
                eprintln!("  qcow2: {k} layers ({:.0}s)", t.elapsed().as_secs_f64());
            }
        }
        // Same bytes on both sides, or the comparison means nothing.
        procs::run(
            Command::new("qemu-img")
                .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
                .arg(agent.nbd_uri(&format!("image/d{max_depth}")))
                .arg(qcow(max_depth)),
        )
        .context("spore and qcow2 stacks differ")?;
        eprintln!("  qemu-img compare: spore d{max_depth} == qcow2 chain of {max_depth}");
    }
    let build_qcow2 = t.elapsed().as_secs_f64();

    let mut rows = Vec::new();
    for &d in &depths {
        eprintln!("  measuring depth {d}");
        let (r, s) = measure(&agent.nbd_uri(&format!("image/d{d}")), o, size)?;
        rows.push(Row {
            system: "spore".into(),
            depth: d,
            block_size: o.block_size,
            randread_4k: r,
            seqread_1m: s,
        });
        if !o.no_baseline {
            let nbd = QemuNbd::start(&qcow(d), "qcow2", &work.join("qemu-nbd.sock"))?;
            let (r, s) = measure(&nbd.uri(), o, size)?;
            rows.push(Row {
                system: "qemu-nbd qcow2".into(),
                depth: d,
                block_size: 65536,
                randread_4k: r,
                seqread_1m: s,
            });
        }
    }
    if !o.no_baseline {
        let nbd = QemuNbd::start(&base, "raw", &work.join("qemu-nbd.sock"))?;
        let (r, s) = measure(&nbd.uri(), o, size)?;
        rows.push(Row {
            system: "qemu-nbd raw".into(),
            depth: 0,
            block_size: 0,
            randread_4k: r,
            seqread_1m: s,
        });
    }

    // The sweep imports data of its own, so that no block size
    // deduplicates against the images above and import costs compare.
    let sweep_file = work.join("sweep.raw");
    if !o.block_sizes.is_empty() {
        write_random_file(&sweep_file, size, 11)?;
    }
    let mut sweep = Vec::new();
    for &bs in &o.block_sizes {
        eprintln!("  block size {bs}");
        let t = Instant::now();
        let r = import_file(&sweep_file, &format!("bs{bs}"), bs)?;
        let import_seconds = t.elapsed().as_secs_f64();
        let (rand, seq) = measure(&agent.nbd_uri(&format!("image/bs{bs}")), o, size)?;
        sweep.push(SweepRow {
            block_size: bs,
            import_seconds,
            stored_bytes: r.new_bytes,
            randread_4k: rand,
            seqread_1m: seq,
        });
    }

    print_report(&rows, &sweep, &depths, o.no_baseline);
    let report = Report {
        size_bytes: size,
        seconds_per_job: o.seconds,
        iodepth: o.iodepth,
        build_seconds_spore: build_spore,
        build_seconds_qcow2: build_qcow2,
        rows,
        block_size_sweep: sweep,
    };
    if let Some(dir) = o.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&o.out, serde_json::to_vec_pretty(&report)?)?;
    eprintln!("wrote {}", o.out.display());
    Ok(())
}

fn print_report(rows: &[Row], sweep: &[SweepRow], depths: &[u32], no_baseline: bool) {
    let find = |sys: &str, d: u32| rows.iter().find(|r| r.system == sys && r.depth == d);
    println!();
    println!(
        "{:>6}  {:>12} {:>12} {:>7}   {:>10} {:>10} {:>7}",
        "depth", "spore IOPS", "qcow2 IOPS", "ratio", "spore MB/s", "qcow2 MB/s", "ratio"
    );
    for &d in depths {
        let Some(s) = find("spore", d) else { continue };
        let q = find("qemu-nbd qcow2", d);
        let ratio = |a: f64, b: Option<f64>| {
            b.filter(|b| *b > 0.0)
                .map(|b| format!("{:.2}x", a / b))
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "{:>6}  {:>12.0} {:>12} {:>7}   {:>10.0} {:>10} {:>7}",
            d,
            s.randread_4k.iops,
            q.map(|q| format!("{:.0}", q.randread_4k.iops))
                .unwrap_or_else(|| "-".into()),
            ratio(s.randread_4k.iops, q.map(|q| q.randread_4k.iops)),
            s.seqread_1m.bytes_per_sec / 1e6,
            q.map(|q| format!("{:.0}", q.seqread_1m.bytes_per_sec / 1e6))
                .unwrap_or_else(|| "-".into()),
            ratio(
                s.seqread_1m.bytes_per_sec,
                q.map(|q| q.seqread_1m.bytes_per_sec)
            ),
        );
    }
    if let Some(raw) = rows.iter().find(|r| r.system == "qemu-nbd raw") {
        println!(
            "qemu-nbd over the raw base file: {:.0} IOPS, {:.0} MB/s",
            raw.randread_4k.iops,
            raw.seqread_1m.bytes_per_sec / 1e6
        );
    }
    if let (Some(first), Some(last)) = (
        find("spore", depths[0]),
        find("spore", *depths.last().unwrap_or(&1)),
    ) {
        println!(
            "spore depth {} / depth {}: {:.3} (random 4K), {:.3} (sequential 1M)",
            last.depth,
            first.depth,
            last.randread_4k.iops / first.randread_4k.iops,
            last.seqread_1m.bytes_per_sec / first.seqread_1m.bytes_per_sec
        );
    }
    if no_baseline {
        println!("(no qcow2 baseline: --no-baseline)");
    }
    if !sweep.is_empty() {
        println!();
        println!(
            "{:>10}  {:>10} {:>12} {:>10} {:>10}",
            "block", "import s", "stored MiB", "IOPS 4K", "MB/s 1M"
        );
        for s in sweep {
            println!(
                "{:>10}  {:>10.2} {:>12.1} {:>10.0} {:>10.0}",
                s.block_size,
                s.import_seconds,
                s.stored_bytes as f64 / (1 << 20) as f64,
                s.randread_4k.iops,
                s.seqread_1m.bytes_per_sec / 1e6
            );
        }
    }
}
