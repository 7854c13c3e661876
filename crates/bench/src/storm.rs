//! `spore bench storm`: N hosts booting one image at once from cold.
//!
//! One `spore cluster` (network namespaces, every link shaped to the same
//! bandwidth) is made for the largest N; each storm uses its first N nodes
//! with freshly wiped agents. A few hosts boot real QEMU guests to their
//! marker; the others replay the image's recorded boot profile through their
//! own NBD export (a disk created from the image, read block by block in
//! first-read order). Everything the hosts fetch crosses the shaped links.
//!
//! Measured in the same run:
//! - the image's boot profile (W), recorded by a first boot on the origin;
//! - a single host's cold boot and the same host's warm boot (three
//!   alternating rounds, medians);
//! - full copy before boot, from the origin alone, on 1..=k hosts at once
//!   (and, for larger N, the model N·pull(1) + warm boot that those runs
//!   check);
//! - for each N: the storm through the re-export tree, and the same storm
//!   with every host fetching from the origin alone (`--fanout 0`);
//! - after each storm, the QEMU hosts boot again from their warm caches at
//!   once: what the same number of concurrent TCG boots costs on this
//!   machine's cores with no network in the way.
//!
//! Results: a table, JSON (`--out`) and an SVG plot of ready time against N
//! (`--plot`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use serde_json::Value;
use spore_cluster::tree::{self, peer_url};
use spore_cluster::{AgentHandle, Cluster, ClusterSpec, Rate};

use crate::procs::require;
use crate::{median, percentile};

#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Numbers of hosts, one storm each
    #[arg(long, value_delimiter = ',', default_value = "8,32,64,100")]
    pub nodes: Vec<usize>,
    /// Link speed of every host and of the origin, both ways
    #[arg(long, default_value = "100mbit")]
    pub bandwidth: Rate,
    /// Children per relay in the re-export tree
    #[arg(long, default_value_t = 4)]
    pub fanout: usize,
    /// Hosts per storm that boot a real QEMU guest (the rest replay the profile)
    #[arg(long, default_value_t = 4)]
    pub qemu: usize,
    /// Measure full copy before boot on 1..=K hosts at once (0: skip)
    #[arg(long, default_value_t = 2)]
    pub full_copy_hosts: usize,
    /// Measure full copy before boot through the same re-export tree, as a
    /// storm of these N (every host pulls the whole image, then boots or
    /// replays; 0: skip)
    #[arg(long, value_delimiter = ',', default_value = "8")]
    pub full_copy_tree: Vec<usize>,
    /// Rounds of single-host cold and warm boots
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Skip the origin-only storms
    #[arg(long)]
    pub no_baseline: bool,
    /// Demo guest (vmlinuz, initrd.img, rootfs.img from guest/build.sh)
    #[arg(long, default_value = ".cache/guest")]
    pub guest: PathBuf,
    /// Boot the compressed kernel (vmlinuz) with the plain command line,
    /// instead of the uncompressed one (vmlinux, PVH entry) with the
    /// crypto self-tests off: about 0.6 s more CPU per TCG boot
    #[arg(long)]
    pub plain_boot: bool,
    /// Chunk cache of each agent
    #[arg(long, default_value = "64M")]
    pub cache_size: String,
    /// Seconds a host may take to become ready
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Name of the benchmark's cluster
    #[arg(long, default_value = "storm")]
    pub cluster: String,
    #[arg(
        long,
        env = "SPORE_CLUSTER_DIR",
        default_value = "/var/tmp/spore-clusters"
    )]
    pub state_dir: PathBuf,
    /// Where to write the JSON results
    #[arg(long, default_value = "bench-results/storm.json")]
    pub out: PathBuf,
    /// Where to write the plot of ready time against N
    #[arg(long, default_value = "bench-results/storm.svg")]
    pub plot: PathBuf,
}

const IMAGE: &str = "base";
const APPEND: &str = "console=ttyS0 root=/dev/vda quiet";
/// Kernel options for a shorter boot under TCG (docs/guest.md).
const FAST_APPEND: &str = "cryptomgr.notests";
/// How long the origin records the profile of the image's first boot.
const PROFILE_SECONDS: u64 = 20;

#[derive(Debug, Clone, Serialize)]
struct Host {
    node: usize,
    /// "qemu" (a real guest booted to its marker) or "replay".
    kind: &'static str,
    ready_s: f64,
    fetched_bytes: u64,
    from_origin_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
struct Storm {
    n: usize,
    mode: &'static str,
    fanout: usize,
    ready_p50_s: f64,
    ready_p99_s: f64,
    ready_max_s: f64,
    qemu_max_s: f64,
    replay_max_s: f64,
    /// The QEMU hosts booting again at once from warm caches.
    warm_qemu_max_s: f64,
    /// Chunk payload bytes the origin agent counted as served.
    origin_egress_bytes: u64,
    /// Bytes the origin's network interface sent (headers, TLS and
    /// retransmissions included), from its counters.
    origin_wire_bytes: u64,
    mean_bytes_per_host: f64,
    hosts: Vec<Host>,
}

#[derive(Debug, Clone, Serialize)]
struct FullCopy {
    hosts: usize,
    /// Until every host had the whole image.
    pull_max_s: f64,
    /// Until every host's guest was ready.
    ready_max_s: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    bandwidth: String,
    /// The guest kernel file and command line every boot used.
    kernel: String,
    append: String,
    fanout: usize,
    qemu_hosts: usize,
    image_virtual_bytes: u64,
    /// S: the image's stored bytes (what a full copy moves).
    image_stored_bytes: u64,
    /// W: the stored bytes of the boot profile's chunks.
    working_set_bytes: u64,
    profile_chunks: u64,
    single_cold_boot_s: Vec<f64>,
    single_warm_boot_s: Vec<f64>,
    cold_over_warm: f64,
    full_copy: Vec<FullCopy>,
    /// Full copy at N, from the measured single pull: N × pull + warm boot.
    full_copy_model: Vec<(usize, f64)>,
    storms: Vec<Storm>,
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

/// The cluster and its agents; removed on drop, whatever happened.
struct Bench {
    spore: PathBuf,
    cluster: Cluster,
    state_dir: PathBuf,
    origin: Option<AgentHandle>,
    nodes: Vec<Option<AgentHandle>>,
    cache_size: String,
    guest: PathBuf,
    kernel: String,
    append: String,
    timeout: u64,
}

impl Drop for Bench {
    fn drop(&mut self) {
        eprintln!("removing cluster {}", self.cluster.spec.name);
        if let Err(e) = spore_cluster::down(&self.state_dir, &self.cluster.spec.name) {
            eprintln!("warning: removing the cluster: {e}");
        }
    }
}

impl Bench {
    /// `spore --data-dir DIR ARGS…`, its stdout; fails with its stderr.
    fn cli(&self, dir: &Path, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.spore)
            .arg("--data-dir")
            .arg(dir)
            .args(args)
            .output()
            .with_context(|| format!("running spore {}", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "spore {} on {} failed: {}",
                args.join(" "),
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn json(&self, dir: &Path, args: &[&str]) -> Result<Value> {
        let out = self.cli(dir, args)?;
        serde_json::from_str(&out).with_context(|| format!("spore {} printed no JSON", args[0]))
    }

    fn origin_dir(&self) -> PathBuf {
        self.cluster.origin.data_dir.clone()
    }

    fn node_dir(&self, node: usize) -> PathBuf {
        self.cluster.nodes[node - 1].data_dir.clone()
    }

    /// Boots a VM on the host with data dir `dir` and waits for its marker;
    /// the seconds from the request to the marker.
    fn boot(&self, dir: &Path, vm: &str) -> Result<f64> {
        let g = |f: &str| self.guest.join(f).display().to_string();
        let timeout = self.timeout.to_string();
        let started = Instant::now();
        self.cli(
            dir,
            &[
                "vm",
                "run",
                vm,
                "--image",
                IMAGE,
                "--kernel",
                &g(&self.kernel),
                "--initrd",
                &g("initrd.img"),
                "--append",
                &self.append,
                "--wait-for",
                "SPORE-READY",
                "--timeout",
                &timeout,
            ],
        )?;
        Ok(started.elapsed().as_secs_f64())
    }

    fn stop_vm(&self, dir: &Path, vm: &str) -> Result<()> {
        self.cli(dir, &["vm", "rm", vm, "--force"]).map(drop)
    }

    /// Stops every node agent, wipes the first `n` nodes' data and starts
    /// their agents afresh in a `fanout`-ary tree (0: origin only).
    fn fresh_nodes(&mut self, n: usize, fanout: usize) -> Result<()> {
        let running: Vec<AgentHandle> = self.nodes.iter_mut().filter_map(Option::take).collect();
        std::thread::scope(|s| {
            for h in running {
                s.spawn(move || h.stop(Duration::from_secs(10)));
            }
        });
        for node in 1..=n {
            // Everything but the host's certificate (the cluster issued
            // it once, at `up`).
            let dir = self.node_dir(node);
            let keep = spore_pki::default_tls_dir(&dir);
            if dir.exists() {
                for entry in std::fs::read_dir(&dir)? {
                    let path = entry?.path();
                    if path == keep {
                        continue;
                    }
                    let removed = if path.is_dir() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                    removed.with_context(|| format!("wiping {}", path.display()))?;
                }
            }
        }
        for node in 1..=n {
            let mut args = vec!["--cache-size".to_string(), self.cache_size.clone()];
            args.extend(tree::node_args(&self.cluster, node, fanout));
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let h = self
                .cluster
                .spawn_agent(&self.cluster.nodes[node - 1], &self.spore, &refs)?;
            self.nodes[node - 1] = Some(h);
        }
        for h in self.nodes.iter_mut().flatten() {
            h.wait_ready(Duration::from_secs(120))?;
        }
        Ok(())
    }

    /// Bytes a host fetched: in all, and from the origin.
    fn fetched(&self, dir: &Path) -> Result<(u64, u64)> {
        let s = self.json(dir, &["status", "--json"])?;
        let origin = peer_url(&self.cluster.origin);
        let (mut all, mut from_origin) = (0, 0);
        for src in s["sources"].as_array().into_iter().flatten() {
            let b = src["bytes"].as_u64().unwrap_or(0);
            all += b;
            if src["url"].as_str() == Some(origin.as_str()) {
                from_origin += b;
            }
        }
        Ok((all, from_origin))
    }

    /// Bytes the origin's interface has sent (`tx_bytes` in its namespace).
    fn origin_wire_tx(&self) -> Result<u64> {
        let out = self
            .cluster
            .origin
            .command("cat")
            .arg(format!(
                "/sys/class/net/{}/statistics/tx_bytes",
                spore_cluster::HOST_IFACE
            ))
            .output()
            .context("reading the origin's interface counters")?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("the origin's tx_bytes")
    }

    fn origin_served(&self) -> Result<u64> {
        let s = self.json(&self.origin_dir(), &["status", "--json"])?;
        Ok(s["served_bytes"].as_u64().unwrap_or(0))
    }

    /// Creates a disk from the image on the host and reads the profile's
    /// blocks through the host's NBD export, in order.
    fn replay(&self, dir: &Path, profile: &[u64], block_size: u64, size: u64) -> Result<()> {
        self.cli(dir, &["disk", "create", "replay", "--image", IMAGE])?;
        let mut c = spore_nbd::client::Client::connect_unix(
            &dir.join(spore_api::NBD_SOCKET),
            "disk/replay",
        )
        .context("opening the disk's NBD export")?;
        let mut buf = vec![0u8; block_size as usize];
        for b in profile {
            let off = b * block_size;
            let len = block_size.min(size.saturating_sub(off)) as usize;
            c.read(off, &mut buf[..len])
                .with_context(|| format!("reading block {b}"))?;
        }
        c.disconnect().ok();
        Ok(())
    }
}

/// Which of nodes 1..=n boot QEMU: `q` of them spread over the tree, the
/// first and the last (deepest) included.
fn qemu_nodes(n: usize, q: usize) -> Vec<usize> {
    if q >= n {
        return (1..=n).collect();
    }
    if q <= 1 {
        return vec![n];
    }
    let mut v: Vec<usize> = (0..q)
        .map(|i| 1 + (i * (n - 1) + (q - 1) / 2) / (q - 1))
        .collect();
    v.dedup();
    v
}

struct ImageFacts {
    virtual_size: u64,
    block_size: u64,
    stored: u64,
    working_set: u64,
    profile: Vec<u64>,
}

pub fn run(o: &Options) -> Result<()> {
    require(&["ip", "tc", "qemu-system-x86_64"])?;
    let max_n = *o.nodes.iter().max().context("--nodes is empty")?;
    for f in ["vmlinuz", "initrd.img", "rootfs.img"] {
        if !o.guest.join(f).exists() {
            bail!(
                "{} is missing: build the demo guest first (bash guest/build.sh)",
                o.guest.join(f).display()
            );
        }
    }
    let guest = std::fs::canonicalize(&o.guest)?;
    let (kernel, append) = if !o.plain_boot && guest.join("vmlinux").exists() {
        ("vmlinux", format!("{APPEND} {FAST_APPEND}"))
    } else {
        ("vmlinuz", APPEND.to_owned())
    };
    eprintln!("guest boots {kernel} with \"{append}\"");
    let spore = std::env::current_exe()?;

    // A cluster a crashed run left behind would be in the way.
    let _ = spore_cluster::down(&o.state_dir, &o.cluster);
    let mut spec = ClusterSpec::new(&o.cluster, max_n, &o.state_dir);
    spec.bandwidth = Some(o.bandwidth);
    eprintln!(
        "creating cluster {}: origin + {max_n} hosts at {} each",
        o.cluster, o.bandwidth
    );
    let cluster = spore_cluster::up(&spec).context("creating the cluster")?;
    let mut b = Bench {
        spore,
        nodes: Vec::new(),
        cluster,
        state_dir: o.state_dir.clone(),
        origin: None,
        cache_size: o.cache_size.clone(),
        guest,
        kernel: kernel.to_owned(),
        append: append.clone(),
        timeout: o.timeout,
    };
    b.nodes = (0..max_n).map(|_| None).collect();

    // The origin: holds the image, records its boot profile on first use.
    let mut args = vec!["--cache-size".to_string(), o.cache_size.clone()];
    args.extend(tree::origin_args(&b.cluster));
    args.extend(["--profile-seconds".into(), PROFILE_SECONDS.to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut origin = b.cluster.spawn_agent(&b.cluster.origin, &b.spore, &refs)?;
    origin.wait_ready(Duration::from_secs(60))?;
    b.origin = Some(origin);
    let od = b.origin_dir();
    let rootfs = b.guest.join("rootfs.img").display().to_string();
    eprintln!("importing {rootfs} on the origin");
    b.cli(&od, &["image", "import", &rootfs, "--name", IMAGE])?;
    eprintln!(
        "recording the boot profile: a first boot on the origin ({PROFILE_SECONDS} s window)"
    );
    b.boot(&od, "profile")?;
    let deadline = Instant::now() + Duration::from_secs(PROFILE_SECONDS + 30);
    let info = loop {
        let i = b.json(&od, &["image", "inspect", IMAGE, "--json", "--profile"])?;
        if i["profile_blocks"].is_u64() {
            break i;
        }
        if Instant::now() > deadline {
            bail!("the origin recorded no boot profile");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    b.stop_vm(&od, "profile")?;
    let facts = ImageFacts {
        virtual_size: info["virtual_size"].as_u64().unwrap_or(0),
        block_size: info["block_size"].as_u64().context("no block size")?,
        stored: info["stored_bytes"].as_u64().unwrap_or(0),
        working_set: info["profile_bytes"].as_u64().unwrap_or(0),
        profile: info["profile_order"]
            .as_array()
            .context("no profile order")?
            .iter()
            .filter_map(Value::as_u64)
            .collect(),
    };
    eprintln!(
        "image: {} MB stored, boot working set W = {} chunks, {:.2} MB (S/W = {:.0})",
        facts.stored / 1_000_000,
        facts.profile.len(),
        facts.working_set as f64 / 1e6,
        facts.stored as f64 / facts.working_set.max(1) as f64
    );

    // One host alone: cold (empty cache, profile prefetch) then warm.
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for round in 0..o.rounds {
        b.fresh_nodes(1, o.fanout)?;
        let d = b.node_dir(1);
        cold.push(b.boot(&d, "cold")?);
        b.stop_vm(&d, "cold")?;
        warm.push(b.boot(&d, "warm")?);
        b.stop_vm(&d, "warm")?;
        eprintln!(
            "single host, round {}: cold boot {:.2} s, warm boot {:.2} s",
            round + 1,
            cold[round],
            warm[round]
        );
    }

    // Full copy from the origin before boot.
    let mut full = Vec::new();
    for k in 1..=o.full_copy_hosts {
        b.fresh_nodes(k, 0)?;
        let t0 = Instant::now();
        let results: Vec<Result<(f64, f64)>> = std::thread::scope(|s| {
            let hs: Vec<_> = (1..=k)
                .map(|node| {
                    let b = &b;
                    s.spawn(move || {
                        let d = b.node_dir(node);
                        b.cli(&d, &["image", "pull", IMAGE])?;
                        let pulled = t0.elapsed().as_secs_f64();
                        b.boot(&d, "full")?;
                        Ok((pulled, t0.elapsed().as_secs_f64()))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("thread")).collect()
        });
        let results = results.into_iter().collect::<Result<Vec<_>>>()?;
        let fc = FullCopy {
            hosts: k,
            pull_max_s: max(&results.iter().map(|r| r.0).collect::<Vec<_>>()),
            ready_max_s: max(&results.iter().map(|r| r.1).collect::<Vec<_>>()),
        };
        eprintln!(
            "full copy on {k} host(s) at once: all pulled after {:.1} s, all ready after {:.1} s",
            fc.pull_max_s, fc.ready_max_s
        );
        full.push(fc);
    }
    let warm_boot = median(&warm);
    let pull_one = full.first().map(|f| f.pull_max_s).unwrap_or(f64::NAN);
    let model = |n: usize| -> f64 { n as f64 * pull_one + warm_boot };

    let mut storms = Vec::new();
    let mut modes = vec![("tree", o.fanout)];
    if !o.no_baseline {
        modes.push(("origin-only", 0));
    }
    for &n in &o.nodes {
        for &(mode, fanout) in &modes {
            let s = storm(&mut b, &facts, n, mode, fanout, o.qemu, false)?;
            eprintln!(
                "N={n:>3} {mode:<11}: ready p50 {:.2} s, p99 {:.2} s, max {:.2} s (qemu {:.2} s, warm qemu {:.2} s); origin sent {:.2} MB = {:.2} W",
                s.ready_p50_s,
                s.ready_p99_s,
                s.ready_max_s,
                s.qemu_max_s,
                s.warm_qemu_max_s,
                s.origin_egress_bytes as f64 / 1e6,
                s.origin_egress_bytes as f64 / facts.working_set.max(1) as f64
            );
            storms.push(s);
        }
    }

    for &n in o.full_copy_tree.iter().filter(|n| (1..=max_n).contains(*n)) {
        let s = storm(&mut b, &facts, n, "full-copy", o.fanout, o.qemu, true)?;
        eprintln!(
            "N={n:>3} full copy through the tree: all ready after {:.2} s; origin sent {:.2} MB",
            s.ready_max_s,
            s.origin_wire_bytes as f64 / 1e6
        );
        storms.push(s);
    }

    let report = Report {
        bandwidth: o.bandwidth.to_string(),
        kernel: kernel.to_owned(),
        append,
        fanout: o.fanout,
        qemu_hosts: o.qemu,
        image_virtual_bytes: facts.virtual_size,
        image_stored_bytes: facts.stored,
        working_set_bytes: facts.working_set,
        profile_chunks: facts.profile.len() as u64,
        cold_over_warm: median(&cold) / warm_boot,
        single_cold_boot_s: cold,
        single_warm_boot_s: warm,
        full_copy: full,
        full_copy_model: o.nodes.iter().map(|&n| (n, model(n))).collect(),
        storms,
    };
    print_report(&report);
    if let Some(dir) = o.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&o.out, serde_json::to_string_pretty(&report)?)?;
    std::fs::write(&o.plot, plot(&report))?;
    eprintln!("wrote {} and {}", o.out.display(), o.plot.display());
    Ok(())
}

/// One storm: nodes 1..=n start from empty caches at the same instant.
/// With `full_copy`, every host first pulls the whole image (through the
/// same tree), then boots or replays: full copy before boot, measured.
fn storm(
    b: &mut Bench,
    facts: &ImageFacts,
    n: usize,
    mode: &'static str,
    fanout: usize,
    q: usize,
    full_copy: bool,
) -> Result<Storm> {
    eprintln!("N={n} {mode}: starting {n} fresh agents");
    b.fresh_nodes(n, fanout)?;
    let qemu = qemu_nodes(n, q);
    let served_before = b.origin_served()?;
    let wire_before = b.origin_wire_tx()?;
    let t0 = Instant::now();
    let b = &*b;
    let ready: Vec<Result<f64>> = std::thread::scope(|s| {
        let hs: Vec<_> = (1..=n)
            .map(|node| {
                let is_qemu = qemu.contains(&node);
                s.spawn(move || -> Result<f64> {
                    let d = b.node_dir(node);
                    if full_copy {
                        b.cli(&d, &["image", "pull", IMAGE])?;
                    }
                    if is_qemu {
                        b.boot(&d, "storm")?;
                    } else {
                        b.replay(&d, &facts.profile, facts.block_size, facts.virtual_size)?;
                    }
                    Ok(t0.elapsed().as_secs_f64())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let mut hosts = Vec::new();
    for (i, r) in ready.into_iter().enumerate() {
        let node = i + 1;
        let ready_s = r.with_context(|| format!("host node{node} in the N={n} {mode} storm"))?;
        let (fetched_bytes, from_origin_bytes) = b.fetched(&b.node_dir(node))?;
        hosts.push(Host {
            node,
            kind: if qemu.contains(&node) {
                "qemu"
            } else {
                "replay"
            },
            ready_s,
            fetched_bytes,
            from_origin_bytes,
        });
    }
    let origin_egress_bytes = b.origin_served()? - served_before;
    let origin_wire_bytes = b.origin_wire_tx()?.saturating_sub(wire_before);

    // The same QEMU hosts again, all at once, now from warm caches.
    for &node in &qemu {
        b.stop_vm(&b.node_dir(node), "storm")?;
    }
    let t1 = Instant::now();
    let warm: Vec<Result<f64>> = std::thread::scope(|s| {
        let hs: Vec<_> = qemu
            .iter()
            .map(|&node| {
                s.spawn(move || {
                    b.boot(&b.node_dir(node), "warm")?;
                    Ok(t1.elapsed().as_secs_f64())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let warm = warm.into_iter().collect::<Result<Vec<_>>>()?;

    let times: Vec<f64> = hosts.iter().map(|h| h.ready_s).collect();
    let of_kind = |k: &str| -> Vec<f64> {
        hosts
            .iter()
            .filter(|h| h.kind == k)
            .map(|h| h.ready_s)
            .collect()
    };
    Ok(Storm {
        n,
        mode,
        fanout,
        ready_p50_s: percentile(&times, 50.0),
        ready_p99_s: percentile(&times, 99.0),
        ready_max_s: max(&times),
        qemu_max_s: max(&of_kind("qemu")),
        replay_max_s: max(&of_kind("replay")),
        warm_qemu_max_s: max(&warm),
        origin_egress_bytes,
        origin_wire_bytes,
        mean_bytes_per_host: hosts.iter().map(|h| h.fetched_bytes as f64).sum::<f64>() / n as f64,
        hosts,
    })
}

fn print_report(r: &Report) {
    let w = r.working_set_bytes.max(1) as f64;
    let cold = median(&r.single_cold_boot_s);
    println!(
        "\nimage: {:.0} MB virtual, S = {:.1} MB stored, W = {:.2} MB ({} chunks), S/W = {:.0}; links {}",
        r.image_virtual_bytes as f64 / 1e6,
        r.image_stored_bytes as f64 / 1e6,
        w / 1e6,
        r.profile_chunks,
        r.image_stored_bytes as f64 / w,
        r.bandwidth
    );
    println!(
        "single host: cold boot {:.2} s, warm boot {:.2} s (medians of {}): cold/warm = {:.2}",
        cold,
        median(&r.single_warm_boot_s),
        r.single_cold_boot_s.len(),
        r.cold_over_warm
    );
    for f in &r.full_copy {
        println!(
            "full copy, {} host(s): pulled {:.1} s, ready {:.1} s (model: {:.1} s)",
            f.hosts,
            f.pull_max_s,
            f.ready_max_s,
            r.full_copy
                .first()
                .map(|f1| f.hosts as f64 * f1.pull_max_s + median(&r.single_warm_boot_s))
                .unwrap_or(f64::NAN)
        );
    }
    println!(
        "\n{:>4} {:<11} {:>8} {:>8} {:>8} {:>9} {:>9} {:>10} {:>8} {:>8} {:>10} {:>11} {:>11}",
        "N",
        "mode",
        "p50 s",
        "p99 s",
        "max s",
        "max/cold",
        "qemu max",
        "warm qemu",
        "egress/W",
        "wire/W",
        "MB/host",
        "full copy",
        "full/storm"
    );
    for s in &r.storms {
        // The measured full copy through the tree at this N where there
        // is one, else the origin-only model (marked *).
        let measured = r
            .storms
            .iter()
            .find(|f| f.n == s.n && f.mode == "full-copy")
            .map(|f| (f.ready_max_s, ""));
        let fc = measured.or_else(|| {
            r.full_copy_model
                .iter()
                .find(|(n, _)| *n == s.n)
                .map(|m| (m.1, "*"))
        });
        let (fc, mark) = fc.unwrap_or((f64::NAN, ""));
        println!(
            "{:>4} {:<11} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>9.2} {:>10.2} {:>8.2} {:>8.2} {:>10.2} {:>10.0}{mark:1} {:>11.1}",
            s.n,
            s.mode,
            s.ready_p50_s,
            s.ready_p99_s,
            s.ready_max_s,
            s.ready_max_s / cold,
            s.qemu_max_s,
            s.warm_qemu_max_s,
            s.origin_egress_bytes as f64 / w,
            s.origin_wire_bytes as f64 / w,
            s.mean_bytes_per_host / 1e6,
            fc,
            fc / s.ready_max_s
        );
    }
    println!("full copy: measured through the same tree at that N, or * the model N x pull(1) + warm boot");
}

/// A plotted line: name, colour, (N, seconds) points.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// Ready time (max over hosts) against N, log scale: the tree, origin
/// only, full copy through the tree where measured, and full copy
/// modelled from the measured single pull.
fn plot(r: &Report) -> String {
    let (w, h, l, t, pw, ph) = (720.0, 440.0, 70.0, 30.0, 600.0, 350.0);
    let max_n = r.storms.iter().map(|s| s.n).max().unwrap_or(1) as f64;
    let mut series: Vec<Series> = Vec::new();
    for (mode, color) in [
        ("tree", "#1b7837"),
        ("origin-only", "#d95f02"),
        ("full-copy", "#e7298a"),
    ] {
        let pts: Vec<(f64, f64)> = r
            .storms
            .iter()
            .filter(|s| s.mode == mode)
            .map(|s| (s.n as f64, s.ready_max_s))
            .collect();
        if !pts.is_empty() {
            series.push((mode, color, pts));
        }
    }
    let fc: Vec<(f64, f64)> = r
        .full_copy_model
        .iter()
        .filter(|(_, t)| t.is_finite())
        .map(|&(n, t)| (n as f64, t))
        .collect();
    if !fc.is_empty() {
        series.push(("full copy (model)", "#7570b3", fc));
    }
    let all: Vec<f64> = series
        .iter()
        .flat_map(|s| s.2.iter().map(|p| p.1))
        .collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(0.1);
    let hi = all.iter().copied().fold(0.0, f64::max).max(lo * 10.0);
    let (lmin, lmax) = (lo.log10().floor(), hi.log10().ceil());
    let x = |n: f64| l + n / max_n * pw;
    let y = |v: f64| t + ph - (v.log10() - lmin) / (lmax - lmin) * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##
    );
    let mut e = lmin;
    while e <= lmax {
        let v = 10f64.powf(e);
        let _ = writeln!(
            s,
            r##"<line x1="{l}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{v} s</text>"##,
            l + pw,
            l - 6.0,
            y(v) + 4.0,
            y = y(v)
        );
        e += 1.0;
    }
    for st in &r.storms {
        if st.mode == "tree" {
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
                x(st.n as f64),
                t + ph + 16.0,
                st.n
            );
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">hosts booting at once (N), {} links</text>"#,
        l + pw / 2.0,
        h - 8.0,
        r.bandwidth
    );
    for (i, (name, color, pts)) in series.iter().enumerate() {
        let path: Vec<String> = pts
            .iter()
            .map(|&(n, v)| format!("{:.1},{:.1}", x(n), y(v)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            path.join(" ")
        );
        for &(n, v) in pts {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                x(n),
                y(v)
            );
        }
        let ly = t + 16.0 + 16.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{name}: all hosts ready</text>"#,
            l + 10.0,
            l + 30.0,
            l + 36.0,
            ly + 4.0
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_hosts_spread_over_the_tree() {
        assert_eq!(qemu_nodes(100, 4), vec![1, 34, 67, 100]);
        assert_eq!(qemu_nodes(8, 4), vec![1, 3, 6, 8]);
        assert_eq!(qemu_nodes(3, 4), vec![1, 2, 3]);
        assert_eq!(qemu_nodes(10, 1), vec![10]);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), 2.0);
        assert_eq!(max(&[1.0, 5.0, 2.0]), 5.0);
    }
}
