//! `spore bench blockdev`: NBD read performance as the layer count grows.
//!
//! Both sides are built from the same writes: a base image of random data,
//! then one layer per step, each made by the same `qemu-io` writes — into a
//! spore disk that is then committed as a new image, and into a new qcow2
//! file on top of the previous one. At each depth, fio's nbd engine reads
//! the top of the stack through spore's NBD server and through qemu-nbd
//! (4 KiB random reads and 1 MiB sequential reads, warm caches), and
//! qemu-nbd over the raw base file gives the no-layers reference.
//!
//! Before measuring a depth, both exports are read whole through NBD and
//! compared with the bytes that depth must hold (the base file with every
//! layer's writes applied, computed here). QEMU's own tools cannot be the
//! judge: on QEMU 10, `qemu-img compare`, `qemu-img convert` and `qemu-nbd`
//! die of SIGSEGV on the first read that reaches past about 870 backing
//! files (`bdrv_co_is_inserted` recurses once per layer on a coroutine
//! stack). When qemu-nbd dies, that depth's qcow2 figure is reported as
//! QEMU's failure and the run goes on.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use spore_api::{CommitRequest, DiskCreate, ImportRequest, ImportResult};

use crate::procs::{self, fio_nbd, require, AgentProcess, FioResult, QemuNbd};

/// Bytes per NBD read when checking an export against the expected bytes.
const CHECK_READ: usize = 1 << 20;

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
    /// Reading every measured export whole and comparing it with the
    /// expected bytes.
    check_seconds: f64,
    rows: Vec<Row>,
    /// Measurements that could not be made because a QEMU tool failed.
    qemu_failures: Vec<QemuFailure>,
    block_size_sweep: Vec<SweepRow>,
}

#[derive(Debug, Serialize)]
struct QemuFailure {
    system: String,
    depth: u32,
    error: String,
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

/// One 64 KiB write of a layer: the byte it repeats, and where.
#[derive(Debug, Clone, Copy)]
struct LayerWrite {
    pattern: u8,
    offset: u64,
}

const LAYER_WRITE_LEN: usize = 65536;

/// The writes that make layer `k`: two 64 KiB writes at pseudo-random
/// aligned offsets with a per-layer pattern.
fn layer_writes(k: u32, size: u64) -> Vec<LayerWrite> {
    let slots = size / 65536;
    let mut x = (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..2)
        .map(|_| LayerWrite {
            pattern: (k % 251 + 1) as u8,
            offset: (next() % slots) * 65536,
        })
        .collect()
}

/// The same writes as qemu-io commands.
fn qemu_io_writes(k: u32, size: u64) -> Vec<String> {
    layer_writes(k, size)
        .iter()
        .map(|w| format!("write -P {} {} 64k", w.pattern, w.offset))
        .collect()
}

/// Applies layers `from..=to` to `bytes`, the expected content below them.
fn apply_layers(bytes: &mut [u8], from: u32, to: u32) {
    for k in from..=to {
        for w in layer_writes(k, bytes.len() as u64) {
            let at = w.offset as usize;
            bytes[at..at + LAYER_WRITE_LEN].fill(w.pattern);
        }
    }
}

/// Why an export does not hold what it should.
#[derive(Debug)]
enum CheckError {
    /// The export could not be read (the server may have died).
    Read(std::io::Error),
    /// Its size is not the expected one.
    Size { export: u64, expected: u64 },
    /// It was read and differs.
    Differs { offset: u64 },
}

impl std::fmt::Display for CheckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckError::Read(e) => write!(f, "reading it through NBD failed: {e}"),
            CheckError::Size { export, expected } => {
                write!(f, "it has {export} bytes, not {expected}")
            }
            CheckError::Differs { offset } => {
                write!(
                    f,
                    "its bytes differ from the expected ones at offset {offset}"
                )
            }
        }
    }
}

/// Reads `export` whole over NBD and compares it with `expected`.
fn check_export(socket: &Path, export: &str, expected: &[u8]) -> Result<(), CheckError> {
    let mut c =
        spore_nbd::client::Client::connect_unix(socket, export).map_err(CheckError::Read)?;
    if c.size() != expected.len() as u64 {
        return Err(CheckError::Size {
            export: c.size(),
            expected: expected.len() as u64,
        });
    }
    let mut buf = vec![0u8; CHECK_READ];
    for (i, want) in expected.chunks(CHECK_READ).enumerate() {
        let offset = (i * CHECK_READ) as u64;
        let got = &mut buf[..want.len()];
        c.read(offset, got).map_err(CheckError::Read)?;
        if got != want {
            let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            return Err(CheckError::Differs {
                offset: offset + first as u64,
            });
        }
    }
    let _ = c.disconnect();
    Ok(())
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

/// The first line of `tool --version`, for reports.
fn qemu_version(tool: &str) -> String {
    procs::run(Command::new(tool).arg("--version"))
        .ok()
        .and_then(|v| v.lines().next().map(str::to_owned))
        .unwrap_or_else(|| tool.to_owned())
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
        qemu_io("raw", &agent.nbd_uri("disk/tmp"), &qemu_io_writes(k, size))?;
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
            qemu_io_opts(&format!("json:{top}"), &qemu_io_writes(k, size))?;
            if k % 100 == 0 {
                eprintln!("  qcow2: {k} layers ({:.0}s)", t.elapsed().as_secs_f64());
            }
        }
    }
    let build_qcow2 = t.elapsed().as_secs_f64();

    // Same bytes on both sides, or the comparison means nothing: every
    // export measured is first read whole and checked against `expected`.
    let mut expected = std::fs::read(&base)?;
    let mut expected_depth = 1;
    let mut check_seconds = 0.0;
    let spore_socket = agent.data_dir.join(spore_api::NBD_SOCKET);
    let mut rows = Vec::new();
    let mut qemu_failures = Vec::new();
    for &d in &depths {
        apply_layers(&mut expected, expected_depth + 1, d);
        expected_depth = d;
        let t = Instant::now();
        check_export(&spore_socket, &format!("image/d{d}"), &expected)
            .map_err(|e| anyhow::anyhow!("spore's image d{d} is wrong: {e}"))?;
        check_seconds += t.elapsed().as_secs_f64();
        eprintln!("  measuring depth {d} (spore's export holds the expected bytes)");
        let (r, s) = measure(&agent.nbd_uri(&format!("image/d{d}")), o, size)?;
        rows.push(Row {
            system: "spore".into(),
            depth: d,
            block_size: o.block_size,
            randread_4k: r,
            seqread_1m: s,
        });
        if !o.no_baseline {
            let mut nbd = QemuNbd::start(&qcow(d), "qcow2", &work.join("qemu-nbd.sock"))?;
            let t = Instant::now();
            let checked = check_export(&nbd.socket, "x", &expected);
            check_seconds += t.elapsed().as_secs_f64();
            let result = match checked {
                Ok(()) => measure(&nbd.uri(), o, size),
                Err(e @ CheckError::Read(_)) => Err(anyhow::anyhow!("qemu-nbd: {e}")),
                Err(e) => bail!("the qcow2 chain of {d} is wrong: {e}"),
            };
            match result {
                Ok((r, s)) => rows.push(Row {
                    system: "qemu-nbd qcow2".into(),
                    depth: d,
                    block_size: 65536,
                    randread_4k: r,
                    seqread_1m: s,
                }),
                // qemu-nbd died under the reads: QEMU's failure, not a
                // difference; the other depths are still worth measuring.
                Err(e) => match nbd.exit_status() {
                    Some(status) => {
                        let error = format!(
                            "{} exited ({status}) serving the qcow2 chain of {d}",
                            qemu_version("qemu-nbd")
                        );
                        eprintln!("  QEMU failure, not spore's: {error}");
                        qemu_failures.push(QemuFailure {
                            system: "qemu-nbd qcow2".into(),
                            depth: d,
                            error,
                        });
                    }
                    None => return Err(e.context(format!("measuring the qcow2 chain of {d}"))),
                },
            }
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
    for f in &qemu_failures {
        println!(
            "{} at depth {}: not measured: {}",
            f.system, f.depth, f.error
        );
    }
    let report = Report {
        size_bytes: size,
        seconds_per_job: o.seconds,
        iodepth: o.iodepth,
        build_seconds_spore: build_spore,
        build_seconds_qcow2: build_qcow2,
        check_seconds,
        rows,
        qemu_failures,
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
