//! `spore bench migrate`: live migration of the demo guest between two
//! `spore cluster` hosts, per workload and policy, in one run.
//!
//! One cluster of two hosts with shaped links (`--bandwidth`, both ways).
//! For each workload a VM boots on node1 and writes a data set (memory and
//! disk); then, for each policy, `--runs` migrations go back and forth
//! between the hosts (a failed one leaves the VM where it was). The
//! workloads are the guest's `spore.memload`: idle (none), moderate (a few
//! MiB/s, well below the link) and memory-intensive (as fast as the guest
//! can, faster than the link). The policies are spore's `precopy` (QEMU's
//! default pre-copy, the baseline), `postcopy`, `auto`, and QEMU's
//! `auto-converge`. Where pre-copy fails, "pre-copy relaxed" raises the
//! downtime limit step by step until one migration succeeds and then runs
//! `--runs` times at that limit: the baseline the goals compare against.
//! At the end of each workload the guest checks its data set.
//!
//! Per migration: success, total time, downtime (QEMU), guest stall (the
//! agent's ping over the guest channel), bytes moved (RAM + disk), passes.
//! Results: a table, JSON (`--out`) and an SVG timeline of the
//! memory-intensive workload's remaining memory per policy (`--plot`).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use serde_json::Value;

use crate::median;
use crate::procs::require;

#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Migrations per workload and policy
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Link speed of each host, both ways (tc)
    #[arg(long, default_value = "200mbit")]
    pub bandwidth: String,
    /// The migrations' own cap (`spore vm migrate --bandwidth`), the same for
    /// every policy: a little under the link, so that data queued in the
    /// kernel does not delay the switch
    #[arg(long, default_value = "180mbit")]
    pub migration_bandwidth: String,
    /// Guest memory, MiB
    #[arg(long, default_value_t = 512)]
    pub memory_mib: u64,
    /// Workloads: name=MEMLOAD (spore.memload=MIB,RATE; empty for none)
    #[arg(
        long,
        value_delimiter = ';',
        default_value = "idle=;moderate=32,2;intensive=64,0"
    )]
    pub workloads: Vec<String>,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "precopy,postcopy,auto,auto-converge"
    )]
    pub policies: Vec<String>,
    /// Downtime limit of the policies, ms
    #[arg(long, default_value_t = 300)]
    pub max_downtime: u64,
    /// A migration that has not switched hosts after this long fails
    #[arg(long, default_value_t = 20)]
    pub timeout: u64,
    /// Downtime limits tried, in order, for pre-copy relaxed
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,2000,4000,8000,16000"
    )]
    pub relax: Vec<u64>,
    /// Demo guest (vmlinuz, initrd.img, rootfs.img from guest/build.sh)
    #[arg(long, default_value = ".cache/guest")]
    pub guest: PathBuf,
    /// Where the cluster keeps its state (wiped)
    #[arg(long, default_value = "/var/tmp/spore-bench-migrate")]
    pub workdir: PathBuf,
    #[arg(long, default_value = "bench-results/migrate.json")]
    pub out: PathBuf,
    #[arg(long, default_value = "bench-results/migrate.svg")]
    pub plot: PathBuf,
    /// Keep the guest's console after every migration in this directory
    /// (NNN-WORKLOAD-POLICY.log), to see what the guest did in a stall
    #[arg(long)]
    pub logs: Option<PathBuf>,
}

const CLUSTER: &str = "mbench";
const VM: &str = "mig";

#[derive(Debug, Clone, Serialize)]
struct Run {
    workload: String,
    policy: String,
    max_downtime_ms: u64,
    from: String,
    to: String,
    success: bool,
    total_ms: f64,
    downtime_ms: Option<f64>,
    stall_ms: Option<f64>,
    /// When the longest stall began and when the guest stopped at the
    /// source (ms after the start).
    stall_at_ms: Option<f64>,
    switched_at_ms: Option<f64>,
    /// Pages the guest faulted on at the destination (post-copy).
    postcopy_requests: u64,
    ram_bytes: u64,
    disk_bytes: u64,
    passes: u64,
    decisions: Vec<String>,
    error: Option<String>,
    /// (ms, remaining RAM bytes)
    timeline: Vec<(f64, u64)>,
}

#[derive(Debug, Clone, Serialize)]
struct Row {
    workload: String,
    policy: String,
    max_downtime_ms: u64,
    runs: usize,
    success_rate: f64,
    total_p50_ms: Option<f64>,
    downtime_p50_ms: Option<f64>,
    downtime_max_ms: Option<f64>,
    stall_p50_ms: Option<f64>,
    stall_max_ms: Option<f64>,
    bytes_p50: Option<f64>,
    passes_p50: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Goal {
    goal: String,
    result: String,
    met: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    bandwidth: String,
    migration_bandwidth: String,
    memory_mib: u64,
    runs_per_policy: usize,
    /// Per series: the guest's data set checksums after it (None: the
    /// guest did not answer the check).
    data_intact: Vec<(String, Option<bool>)>,
    rows: Vec<Row>,
    goals: Vec<Goal>,
    migrations: Vec<Run>,
}

struct Bench<'a> {
    spore: PathBuf,
    o: &'a Options,
}

impl Bench<'_> {
    fn home(&self, host: &str) -> PathBuf {
        self.o.workdir.join(CLUSTER).join(host)
    }

    fn cli(&self, host: Option<&str>, args: &[&str]) -> Result<String> {
        let mut c = Command::new(&self.spore);
        c.env("SPORE_CLUSTER_DIR", &self.o.workdir).args(args);
        if let Some(h) = host {
            c.env("SPORE_HOME", self.home(h));
        }
        let out = c.output()?;
        if !out.status.success() && !args.contains(&"migrate") {
            bail!(
                "spore {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn log_count(&self, host: &str, marker: &str) -> Result<usize> {
        Ok(self
            .cli(Some(host), &["vm", "log", VM])?
            .matches(marker)
            .count())
    }

    /// Sends `dataset VERB` and waits for the guest's answer line.
    fn dataset(&self, host: &str, verb: &str) -> Result<String> {
        let marker = if verb == "check" {
            "SPORE-DATASET-CHECK "
        } else {
            "SPORE-DATASET "
        };
        let before = self.log_count(host, marker)?;
        let mut args = vec!["vm", "send", VM, "dataset", verb];
        if verb == "write" {
            args.push("8");
        }
        self.cli(Some(host), &args)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let log = self.cli(Some(host), &["vm", "log", VM])?;
            if log.matches(marker).count() > before {
                let line = log.rsplit(marker).next().unwrap_or("");
                return Ok(line.lines().next().unwrap_or("").trim().to_owned());
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        bail!("the guest on {host} did not answer `dataset {verb}`")
    }

    fn migrate(&self, workload: &str, policy: &str, limit: u64, from: &str) -> Result<Run> {
        let to = if from == "node1" { "node2" } else { "node1" };
        let (policy_arg, label) = match policy {
            "precopy-relaxed" => ("precopy", "precopy-relaxed".to_owned()),
            p => (p, p.to_owned()),
        };
        let limit_s = limit.to_string();
        let timeout = self.o.timeout.to_string();
        let out = self.cli(
            Some(from),
            &[
                "vm",
                "migrate",
                VM,
                "--to",
                to,
                "--cluster",
                CLUSTER,
                "--policy",
                policy_arg,
                "--max-downtime",
                &limit_s,
                "--timeout",
                &timeout,
                "--bandwidth",
                &self.o.migration_bandwidth,
                "--json",
            ],
        )?;
        let m: Value = serde_json::from_str(&out)
            .with_context(|| format!("migration result of {policy}: {out}"))?;
        let success = m["phase"] == "completed";
        let run = Run {
            workload: workload.to_owned(),
            policy: label,
            max_downtime_ms: limit,
            from: from.to_owned(),
            to: to.to_owned(),
            success,
            total_ms: m["elapsed_ms"].as_f64().unwrap_or(0.0),
            downtime_ms: m["downtime_ms"].as_f64(),
            stall_ms: m["guest_stall_ms"].as_f64(),
            stall_at_ms: m["guest_stall_at_ms"].as_f64(),
            switched_at_ms: m["switched_at_ms"].as_f64(),
            postcopy_requests: m["postcopy_requests"].as_u64().unwrap_or(0),
            ram_bytes: m["ram_transferred"].as_u64().unwrap_or(0),
            disk_bytes: m["disk_bytes"].as_u64().unwrap_or(0),
            passes: m["passes"].as_u64().unwrap_or(0),
            decisions: m["decisions"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|d| d["text"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            error: m["error"].as_str().map(str::to_owned),
            timeline: m["timeline"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|s| {
                            (
                                s["at_ms"].as_f64().unwrap_or(0.0),
                                s["ram_remaining"].as_u64().unwrap_or(0),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
        };
        eprintln!(
            "  {workload:<10} {:<16} {:>6} ms  {}  total {:>6.1} s  downtime {:>6}  stall {:>6} (from {:>5}; switch {:>5})  {:>6.1} MB  passes {}",
            run.policy,
            limit,
            if success { "ok  " } else { "FAIL" },
            run.total_ms / 1e3,
            run.downtime_ms.map(|d| format!("{d:.0}")).unwrap_or("-".into()),
            run.stall_ms.map(|d| format!("{d:.0}")).unwrap_or("-".into()),
            run.stall_at_ms.map(|d| format!("{d:.0}")).unwrap_or("-".into()),
            run.switched_at_ms.map(|d| format!("{d:.0}")).unwrap_or("-".into()),
            (run.ram_bytes + run.disk_bytes) as f64 / 1e6,
            run.passes
        );
        if let Some(dir) = &self.o.logs {
            let host = if success { to } else { from };
            let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
            let path = dir.join(format!("{n:03}-{workload}-{}.log", run.policy));
            let console = self.cli(Some(host), &["vm", "log", VM]).unwrap_or_default();
            std::fs::create_dir_all(dir)
                .and_then(|()| std::fs::write(&path, console))
                .with_context(|| format!("keeping the console in {}", path.display()))?;
        }
        // A failed migration leaves the VM running at the source; wait
        // until the destination has removed what it made.
        if !success {
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline
                && self.cli(Some(to), &["vm", "ls", "--json"])?.contains(VM)
            {
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        Ok(run)
    }
}

fn row(workload: &str, policy: &str, runs: &[&Run]) -> Row {
    let ok: Vec<&&Run> = runs.iter().filter(|r| r.success).collect();
    let med = |f: &dyn Fn(&Run) -> Option<f64>| -> Option<f64> {
        let v: Vec<f64> = ok.iter().filter_map(|r| f(r)).collect();
        (!v.is_empty()).then(|| median(&v))
    };
    let max = |f: &dyn Fn(&Run) -> Option<f64>| -> Option<f64> {
        ok.iter().filter_map(|r| f(r)).reduce(f64::max)
    };
    Row {
        workload: workload.to_owned(),
        policy: policy.to_owned(),
        max_downtime_ms: runs.first().map(|r| r.max_downtime_ms).unwrap_or(0),
        runs: runs.len(),
        success_rate: ok.len() as f64 / runs.len().max(1) as f64,
        total_p50_ms: med(&|r| Some(r.total_ms)),
        downtime_p50_ms: med(&|r| r.downtime_ms),
        downtime_max_ms: max(&|r| r.downtime_ms),
        stall_p50_ms: med(&|r| r.stall_ms),
        stall_max_ms: max(&|r| r.stall_ms),
        bytes_p50: med(&|r| Some((r.ram_bytes + r.disk_bytes) as f64)),
        passes_p50: med(&|r| Some(r.passes as f64)),
    }
}

pub fn run(o: &Options) -> Result<()> {
    require(&["qemu-system-x86_64", "ip", "tc"])?;
    let spore = std::env::current_exe()?;
    let b = Bench { spore, o };
    let kernel = std::fs::canonicalize(o.guest.join("vmlinuz"))
        .context("the demo guest (run guest/build.sh)")?;
    let initrd = std::fs::canonicalize(o.guest.join("initrd.img"))?;
    let rootfs = std::fs::canonicalize(o.guest.join("rootfs.img"))?;
    let _ = b.cli(None, &["cluster", "down", "--name", CLUSTER]);
    let _ = std::fs::remove_dir_all(&o.workdir);
    std::fs::create_dir_all(&o.workdir)?;
    b.cli(
        None,
        &[
            "cluster",
            "up",
            "--name",
            CLUSTER,
            "--nodes",
            "2",
            "--bandwidth",
            &o.bandwidth,
        ],
    )?;
    let result = (|| -> Result<Report> {
        b.cli(
            Some("origin"),
            &[
                "image",
                "import",
                rootfs.to_str().context("path")?,
                "--name",
                "guest",
            ],
        )?;
        let mut migrations: Vec<Run> = Vec::new();
        let mut data_intact = Vec::new();
        for w in &o.workloads {
            let (name, load) = w.split_once('=').unwrap_or((w, ""));
            let mut append = "console=ttyS0 root=/dev/vda quiet".to_owned();
            if !load.is_empty() {
                append += &format!(" spore.memload={load}");
            }
            let mem = format!("{}M", o.memory_mib);
            // A fresh VM per series: each starts from the same state.
            let boot = || -> Result<String> {
                b.cli(
                    Some("node1"),
                    &[
                        "vm",
                        "run",
                        VM,
                        "--image",
                        "guest",
                        "--memory",
                        &mem,
                        "--kernel",
                        kernel.to_str().context("path")?,
                        "--initrd",
                        initrd.to_str().context("path")?,
                        "--append",
                        &append,
                        "--wait-for",
                        if load.is_empty() {
                            "SPORE-READY"
                        } else {
                            "SPORE-MEMLOAD started"
                        },
                        "--timeout",
                        "300",
                    ],
                )?;
                b.dataset("node1", "write")
            };
            let finish = |at: &str,
                          written: &str,
                          series: &str,
                          intact: &mut Vec<(String, Option<bool>)>|
             -> Result<()> {
                let check = b.dataset(at, "check").ok();
                let ok = check.map(|c| c.replace("CHECK ", "") == written.replace("CHECK ", ""));
                eprintln!(
                    "  data set after the {series} series: {}",
                    match ok {
                        Some(true) => "intact",
                        Some(false) => "CHANGED",
                        None => "not checked (the guest did not answer)",
                    }
                );
                intact.push((format!("{name}/{series}"), ok));
                b.cli(Some(at), &["vm", "rm", VM, "--force"])?;
                Ok(())
            };
            eprintln!(
                "workload {name} ({}):",
                if load.is_empty() { "none" } else { load }
            );
            let mut precopy_failed = false;
            for policy in &o.policies {
                let written = boot()?;
                let mut at = "node1".to_owned();
                for _ in 0..o.runs {
                    let r = b.migrate(name, policy, o.max_downtime, &at)?;
                    if r.success {
                        at = r.to.clone();
                    } else if policy == "precopy" {
                        precopy_failed = true;
                    }
                    migrations.push(r);
                }
                finish(&at, &written, policy, &mut data_intact)?;
            }
            if precopy_failed {
                // Raise the limit until pre-copy succeeds once, then run
                // the series at that limit.
                let written = boot()?;
                let mut at = "node1".to_owned();
                let mut found = None;
                for &limit in &o.relax {
                    let r = b.migrate(name, "precopy-relaxed", limit, &at)?;
                    let ok = r.success;
                    if ok {
                        at = r.to.clone();
                    }
                    migrations.push(r);
                    if ok {
                        found = Some(limit);
                        break;
                    }
                }
                if let Some(limit) = found {
                    for _ in 1..o.runs {
                        let r = b.migrate(name, "precopy-relaxed", limit, &at)?;
                        if r.success {
                            at = r.to.clone();
                        }
                        migrations.push(r);
                    }
                }
                finish(&at, &written, "precopy-relaxed", &mut data_intact)?;
            }
        }
        let mut rows = Vec::new();
        for w in &o.workloads {
            let name = w.split_once('=').map(|x| x.0).unwrap_or(w);
            let mut policies: Vec<String> = o.policies.clone();
            policies.push("precopy-relaxed".into());
            for p in policies {
                // Relaxed: only the series at the limit that worked.
                let limit = migrations
                    .iter()
                    .filter(|r| r.workload == name && r.policy == p && r.success)
                    .map(|r| r.max_downtime_ms)
                    .next_back();
                let runs: Vec<&Run> = migrations
                    .iter()
                    .filter(|r| r.workload == name && r.policy == p)
                    .filter(|r| p != "precopy-relaxed" || Some(r.max_downtime_ms) == limit)
                    .collect();
                if !runs.is_empty() {
                    rows.push(row(name, &p, &runs));
                }
            }
        }
        let goals = goals(&rows);
        Ok(Report {
            bandwidth: o.bandwidth.clone(),
            migration_bandwidth: o.migration_bandwidth.clone(),
            memory_mib: o.memory_mib,
            runs_per_policy: o.runs,
            data_intact,
            rows,
            goals,
            migrations,
        })
    })();
    let _ = b.cli(None, &["cluster", "down", "--name", CLUSTER]);
    let report = result?;
    print_table(&report);
    if let Some(dir) = o.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&o.out, serde_json::to_string_pretty(&report)?)?;
    std::fs::write(&o.plot, plot(&report))?;
    println!("wrote {} and {}", o.out.display(), o.plot.display());
    Ok(())
}

fn goals(rows: &[Row]) -> Vec<Goal> {
    let find = |w: &str, p: &str| rows.iter().find(|r| r.workload == w && r.policy == p);
    let mut goals = Vec::new();
    let autos: Vec<&Row> = rows.iter().filter(|r| r.policy == "auto").collect();
    goals.push(Goal {
        goal: "auto succeeds in every workload (100 %)".into(),
        result: autos
            .iter()
            .map(|r| format!("{} {:.0} %", r.workload, r.success_rate * 100.0))
            .collect::<Vec<_>>()
            .join(", "),
        met: !autos.is_empty() && autos.iter().all(|r| r.success_rate == 1.0),
    });
    if let Some(a) = find("intensive", "auto") {
        let d = a.downtime_max_ms.unwrap_or(f64::INFINITY);
        goals.push(Goal {
            goal: "memory-intensive: downtime ≤ 300 ms (worst run)".into(),
            result: format!("{d:.0} ms"),
            met: d <= 300.0,
        });
        let s = a.stall_max_ms.unwrap_or(f64::INFINITY);
        goals.push(Goal {
            goal: "memory-intensive: guest-observed stall ≤ 1 s (worst run)".into(),
            result: format!("{s:.0} ms"),
            met: s <= 1000.0,
        });
        if let Some(rel) = find("intensive", "precopy-relaxed") {
            let t = a.total_p50_ms.unwrap_or(f64::INFINITY) / rel.total_p50_ms.unwrap_or(f64::NAN);
            let by = a.bytes_p50.unwrap_or(f64::INFINITY) / rel.bytes_p50.unwrap_or(f64::NAN);
            goals.push(Goal {
                goal: format!(
                    "memory-intensive: total time and bytes ≤ 0.85× pre-copy relaxed to {} ms",
                    rel.max_downtime_ms
                ),
                result: format!("time {t:.2}×, bytes {by:.2}×"),
                met: t <= 0.85 && by <= 0.85,
            });
        } else {
            goals.push(Goal {
                goal: "memory-intensive: ≤ 0.85× pre-copy relaxed".into(),
                result: "pre-copy never failed or never succeeded: no relaxed series".into(),
                met: false,
            });
        }
    }
    if let Some(a) = find("idle", "auto") {
        let d = a.downtime_max_ms.unwrap_or(f64::INFINITY);
        goals.push(Goal {
            goal: "idle: downtime ≤ 50 ms (worst run)".into(),
            result: format!("{d:.0} ms"),
            met: d <= 50.0,
        });
    }
    goals
}

fn print_table(r: &Report) {
    let f = |v: Option<f64>, scale: f64, unit: &str| {
        v.map(|v| format!("{:.1}{unit}", v / scale))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "live migration, {} MiB guest, links {} (both ways), migrations capped at {}, {} runs per policy",
        r.memory_mib, r.bandwidth, r.migration_bandwidth, r.runs_per_policy
    );
    println!(
        "{:<10} {:<16} {:>7} {:>8} {:>9} {:>12} {:>12} {:>12} {:>12} {:>10} {:>6}",
        "WORKLOAD",
        "POLICY",
        "LIMIT",
        "SUCCESS",
        "TOTAL",
        "DOWNTIME p50",
        "DOWNTIME max",
        "STALL p50",
        "STALL max",
        "MOVED",
        "PASSES"
    );
    for row in &r.rows {
        println!(
            "{:<10} {:<16} {:>5}ms {:>7.0}% {:>9} {:>12} {:>12} {:>12} {:>12} {:>10} {:>6}",
            row.workload,
            row.policy,
            row.max_downtime_ms,
            row.success_rate * 100.0,
            f(row.total_p50_ms, 1e3, " s"),
            f(row.downtime_p50_ms, 1.0, " ms"),
            f(row.downtime_max_ms, 1.0, " ms"),
            f(row.stall_p50_ms, 1.0, " ms"),
            f(row.stall_max_ms, 1.0, " ms"),
            f(row.bytes_p50, 1e6, " MB"),
            f(row.passes_p50, 1.0, ""),
        );
    }
    for (w, ok) in &r.data_intact {
        println!(
            "data set after the series {w}: {}",
            match ok {
                Some(true) => "intact",
                Some(false) => "CHANGED",
                None => "not checked (the guest did not answer)",
            }
        );
    }
    println!("goals:");
    for g in &r.goals {
        println!(
            "  [{}] {}: {}",
            if g.met { "met" } else { "MISSED" },
            g.goal,
            g.result
        );
    }
}

/// Remaining memory over time in the memory-intensive workload: the first
/// successful (else the first) migration of each policy.
fn plot(r: &Report) -> String {
    let (w, h, l, t, pw, ph) = (760.0, 440.0, 70.0, 30.0, 640.0, 340.0);
    let workload = if r.migrations.iter().any(|m| m.workload == "intensive") {
        "intensive"
    } else {
        r.migrations
            .first()
            .map(|m| m.workload.as_str())
            .unwrap_or("")
    };
    let mut series: Vec<&Run> = Vec::new();
    for m in r.migrations.iter().filter(|m| m.workload == workload) {
        match series.iter().position(|s| s.policy == m.policy) {
            None => series.push(m),
            Some(i) if !series[i].success && m.success => series[i] = m,
            _ => {}
        }
    }
    let max_t = series
        .iter()
        .flat_map(|s| s.timeline.last().map(|p| p.0))
        .fold(1.0, f64::max);
    let max_r = series
        .iter()
        .flat_map(|s| s.timeline.iter().map(|p| p.1))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let x = |ms: f64| l + ms / max_t * pw;
    let y = |b: f64| t + ph - b / max_r * ph;
    let colors = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e"];
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="{w}" height="{h}" fill="white"/>"#
    );
    let _ = write!(
        svg,
        r#"<text x="{l}" y="18">{workload} workload: guest memory not yet sent, over time, per policy</text>"#
    );
    let _ = write!(
        svg,
        r#"<line x1="{l}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><line x1="{l}" y1="{t}" x2="{l}" y2="{b}" stroke="black"/>"#,
        b = t + ph,
        r = l + pw
    );
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="end">{:.0} MB</text><text x="{}" y="{}" text-anchor="end">0</text><text x="{}" y="{}" text-anchor="end">{:.0} s</text>"#,
        l - 6.0,
        t + 4.0,
        max_r / 1e6,
        l - 6.0,
        t + ph,
        l + pw,
        t + ph + 16.0,
        max_t / 1e3
    );
    for (i, s) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        let pts: String = s
            .timeline
            .iter()
            .map(|(ms, rem)| format!("{:.1},{:.1} ", x(*ms), y(*rem as f64)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}"/><text x="{}" y="{}" fill="{color}">{} ({} ms limit){}</text>"#,
            l + pw - 250.0,
            t + 16.0 * (i as f64 + 1.0),
            s.policy,
            s.max_downtime_ms,
            if s.success { "" } else { ", failed" }
        );
    }
    svg.push_str("</svg>");
    svg
}
