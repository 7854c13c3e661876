//! `spore bench slow-peers`: what a wedged and a slow peer cost a guest's
//! reads, against the same storm with every peer healthy, in one run.
//!
//! An origin agent holds an image of random data (a fresh origin for each
//! storm, so that no storm prefetches by what an earlier one read). A
//! storm of `--hosts`
//! cold agents reads it at once: each host makes a disk of the image and
//! reads `--reads` blocks of 4 KiB at random places through its own NBD
//! export (one reader per host, as a guest's synchronous reads are),
//! timing each read. Every host names two peers before the origin:
//! - healthy storm: both peers are pass-through TCP proxies to the origin
//!   (healthy sources with the origin's content and certificate);
//! - faulty storm: the first peer accepts connections and never answers
//!   (not even the TLS handshake), the second is the same proxy with 1 s
//!   added to everything it sends back.
//!
//! The storms alternate for `--rounds`, each with fresh host agents. Goal
//! (docs/benchmarks.md): the faulty storm's p99 within 2x the healthy
//! one's, and no read over 1 s.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use crate::percentile;
use crate::procs::AgentProcess;
use crate::tls::spore_cmd;

#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Cold hosts reading at once
    #[arg(long, default_value_t = 8)]
    pub hosts: usize,
    /// 4 KiB reads per host and storm
    #[arg(long, default_value_t = 40)]
    pub reads: usize,
    /// Size of the image, MiB
    #[arg(long, default_value_t = 64)]
    pub mib: u64,
    /// Storms of each kind, alternating
    #[arg(long, default_value_t = 2)]
    pub rounds: u32,
    /// Where the agents keep their data (default: a temporary directory)
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    #[arg(long, default_value = "bench-results/slow-peers.json")]
    pub out: PathBuf,
}

/// How a fake peer behaves.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Peer {
    /// Forwards to the origin as it is.
    Healthy,
    /// Accepts and never sends a byte.
    Wedged,
    /// Forwards to the origin, everything sent back 1 s late.
    Slow,
}

/// A fake peer on a loopback port, until dropped.
struct FakePeer {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Drop for FakePeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

impl FakePeer {
    fn start(kind: Peer, origin_port: u16) -> Result<Self> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for c in l.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(c) = c else { continue };
                match kind {
                    Peer::Wedged => held.push(c),
                    Peer::Healthy | Peer::Slow => {
                        let delay = if kind == Peer::Slow {
                            Duration::from_secs(1)
                        } else {
                            Duration::ZERO
                        };
                        let stopping = stopping.clone();
                        std::thread::spawn(move || {
                            if let Ok(up) = TcpStream::connect(("127.0.0.1", origin_port)) {
                                proxy(c, up, delay, &stopping);
                            }
                        });
                    }
                }
            }
        });
        Ok(FakePeer { port, stop })
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

/// Copies bytes both ways until either side closes; what comes back from
/// `up` is held `delay` before it is passed on.
fn proxy(down: TcpStream, up: TcpStream, delay: Duration, stop: &AtomicBool) {
    let (Ok(mut down_r), Ok(mut up_w)) = (down.try_clone(), up.try_clone()) else {
        return;
    };
    let forward = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = down_r.read(&mut buf) {
            if n == 0 || up_w.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = up_w.shutdown(Shutdown::Write);
    });
    let (mut up_r, mut down_w) = (up, down);
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = up_r.read(&mut buf) {
        if n == 0 || stop.load(Ordering::SeqCst) {
            break;
        }
        std::thread::sleep(delay);
        if down_w.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = down_w.shutdown(Shutdown::Both);
    let _ = forward.join();
}

#[derive(Debug, Serialize)]
struct Storm {
    round: u32,
    peers: [Peer; 2],
    reads: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Reads that failed (none expected: the origin is healthy).
    errors: usize,
}

#[derive(Debug, Serialize)]
struct Report {
    hosts: usize,
    reads_per_host: usize,
    mib: u64,
    storms: Vec<Storm>,
    healthy_p99_ms: f64,
    faulty_p99_ms: f64,
    faulty_max_ms: f64,
    /// Faulty p99 / healthy p99 (goal: at most 2).
    p99_ratio: f64,
    goal_met: bool,
}

/// Starts an origin agent on `dir` holding `image` as `img`: it and its
/// peer port.
fn origin(spore: &Path, dir: &Path, image: &Path) -> Result<(AgentProcess, u16)> {
    let agent = AgentProcess::start(spore, dir, &["--listen", "127.0.0.1:0"])?;
    spore_cmd(
        spore,
        dir,
        &["image", "import", image.to_str().unwrap(), "--name", "img"],
    )?;
    let addr = std::fs::read_to_string(dir.join("listen.addr"))
        .context("reading the origin's listen.addr")?;
    let port = addr
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("the origin's listen address has no port")?;
    Ok((agent, port))
}

/// One storm: a fresh origin (no popularity counts from an earlier storm
/// to prefetch by) and fresh hosts with `peers` before it, reading at once.
fn storm(
    spore: &Path,
    work: &Path,
    image: &Path,
    peers: [Peer; 2],
    o: &Options,
    round: u32,
) -> Result<(Vec<f64>, usize)> {
    let origin_dir = work.join(format!("origin-{round}-{:?}", peers[0]));
    let (origin_agent, origin_port) = origin(spore, &origin_dir, image)?;
    let fakes: Vec<FakePeer> = peers
        .iter()
        .map(|k| FakePeer::start(*k, origin_port))
        .collect::<Result<_>>()?;
    let origin = format!("https://127.0.0.1:{origin_port}");
    let mut agents = Vec::new();
    for h in 0..o.hosts {
        let dir = work.join(format!("host-{round}-{:?}-{h}", peers[0]));
        let agent = AgentProcess::start(
            spore,
            &dir,
            &[
                "--peer",
                &fakes[0].url(),
                "--peer",
                &fakes[1].url(),
                "--origin",
                &origin,
            ],
        )?;
        spore_cmd(spore, &dir, &["disk", "create", "d", "--image", "img"])?;
        agents.push((dir, agent));
    }
    let size = o.mib << 20;
    let readers: Vec<_> = agents
        .iter()
        .enumerate()
        .map(|(h, (dir, _))| {
            let socket = dir.join("nbd.sock");
            let reads = o.reads;
            std::thread::spawn(move || -> Result<(Vec<f64>, usize)> {
                let mut c = spore_nbd::client::Client::connect_unix(&socket, "disk/d")
                    .context("connecting to a host's NBD export")?;
                let mut x = (h as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                let mut times = Vec::with_capacity(reads);
                let mut errors = 0;
                let mut buf = [0u8; 4096];
                for _ in 0..reads {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let offset = (x % (size / 4096)) * 4096;
                    let t = Instant::now();
                    if c.read(offset, &mut buf).is_err() {
                        errors += 1;
                        // The export may have closed on the error.
                        c = spore_nbd::client::Client::connect_unix(&socket, "disk/d")?;
                    }
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
                Ok((times, errors))
            })
        })
        .collect();
    let mut times = Vec::new();
    let mut errors = 0;
    for r in readers {
        let (t, e) = r.join().expect("reader thread")?;
        times.extend(t);
        errors += e;
    }
    for (dir, agent) in agents {
        drop(agent);
        let _ = std::fs::remove_dir_all(&dir);
    }
    drop(fakes);
    drop(origin_agent);
    let _ = std::fs::remove_dir_all(&origin_dir);
    Ok((times, errors))
}

pub fn run(o: &Options) -> Result<()> {
    let spore = std::env::current_exe()?;
    let tmp = tempfile::tempdir()?;
    let work = o.work_dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&work)?;
    let image = work.join("img.raw");
    crate::random_file(&image, o.mib)?;

    let mut storms = Vec::new();
    let (mut healthy, mut faulty) = (Vec::new(), Vec::new());
    for round in 0..o.rounds {
        let mut kinds = [[Peer::Healthy, Peer::Healthy], [Peer::Wedged, Peer::Slow]];
        if round % 2 == 1 {
            kinds.reverse();
        }
        for peers in kinds {
            let (times, errors) = storm(&spore, &work, &image, peers, o, round)?;
            let s = Storm {
                round,
                peers,
                reads: times.len(),
                p50_ms: percentile(&times, 50.0),
                p99_ms: percentile(&times, 99.0),
                max_ms: times.iter().copied().fold(0.0, f64::max),
                errors,
            };
            eprintln!(
                "round {} {:?}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {} errors",
                round + 1,
                peers,
                s.p50_ms,
                s.p99_ms,
                s.max_ms,
                s.errors
            );
            if peers[0] == Peer::Healthy {
                healthy.extend(times);
            } else {
                faulty.extend(times);
            }
            storms.push(s);
        }
    }
    let healthy_p99 = percentile(&healthy, 99.0);
    let faulty_p99 = percentile(&faulty, 99.0);
    let faulty_max = faulty.iter().copied().fold(0.0, f64::max);
    let errors: usize = storms.iter().map(|s| s.errors).sum();
    let report = Report {
        hosts: o.hosts,
        reads_per_host: o.reads,
        mib: o.mib,
        healthy_p99_ms: healthy_p99,
        faulty_p99_ms: faulty_p99,
        faulty_max_ms: faulty_max,
        p99_ratio: faulty_p99 / healthy_p99,
        goal_met: faulty_p99 <= 2.0 * healthy_p99 && faulty_max < 1000.0 && errors == 0,
        storms,
    };
    println!(
        "\n{:<8} {:<16} {:>6} {:>9} {:>9} {:>9} {:>7}",
        "round", "peers", "reads", "p50 ms", "p99 ms", "max ms", "errors"
    );
    for s in &report.storms {
        println!(
            "{:<8} {:<16} {:>6} {:>9.1} {:>9.1} {:>9.1} {:>7}",
            s.round + 1,
            format!("{:?}+{:?}", s.peers[0], s.peers[1]).to_lowercase(),
            s.reads,
            s.p50_ms,
            s.p99_ms,
            s.max_ms,
            s.errors
        );
    }
    println!(
        "\nall storms: healthy p99 {:.1} ms, wedged+slow p99 {:.1} ms ({:.2}x; goal <= 2x), \
         max {:.1} ms (goal < 1000 ms): goal {}",
        report.healthy_p99_ms,
        report.faulty_p99_ms,
        report.p99_ratio,
        report.faulty_max_ms,
        if report.goal_met { "met" } else { "missed" }
    );
    if let Some(dir) = o.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&o.out, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", o.out.display());
    if errors > 0 {
        bail!("{errors} reads failed although the origin was healthy");
    }
    Ok(())
}
