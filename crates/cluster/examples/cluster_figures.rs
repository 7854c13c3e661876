//! The figures in docs/cluster.md: how long `up` and `down` take, and how
//! close the shaped links come to their configured rate.
//!
//! ```text
//! sudo cargo run --release -p spore-cluster --example cluster_figures [-- OUT.json]
//! ```
//!
//! Prints tables and writes the numbers as JSON (default
//! `target/cluster-figures.json`). Uses a cluster named `scfig` in a
//! temporary directory and removes it whatever happens.

use std::time::{Duration, Instant};

use spore_cluster::{down, measure_goodput, up, ClusterSpec, Rate};

const NAME: &str = "scfig";
const REPEATS: usize = 3;

struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Err(e) = down(&self.0, NAME) {
            eprintln!("cleanup failed: {e}");
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/cluster-figures.json".into());
    let tmp = tempfile::tempdir()?;
    let _cleanup = Cleanup(tmp.path().to_owned());
    down(tmp.path(), NAME)?;
    let spec =
        |nodes: usize, rate: Option<&str>| -> Result<ClusterSpec, Box<dyn std::error::Error>> {
            let mut s = ClusterSpec::new(NAME, nodes, tmp.path());
            s.bandwidth = rate.map(str::parse).transpose()?;
            Ok(s)
        };

    println!("up and down, median of {REPEATS} runs");
    println!(
        "{:>5} {:>10} {:>10} {:>10}",
        "N", "shaped", "up ms", "down ms"
    );
    let mut timings = Vec::new();
    for nodes in [10, 100] {
        for rate in [None, Some("100mbit")] {
            let (mut ups, mut downs) = (Vec::new(), Vec::new());
            for _ in 0..REPEATS {
                let s = spec(nodes, rate)?;
                let t = Instant::now();
                up(&s)?;
                ups.push(ms(t.elapsed()));
                let t = Instant::now();
                down(tmp.path(), NAME)?;
                downs.push(ms(t.elapsed()));
            }
            let (u, d) = (median(ups), median(downs));
            println!(
                "{nodes:>5} {:>10} {u:>10.0} {d:>10.0}",
                rate.unwrap_or("no")
            );
            timings.push(serde_json::json!({
                "nodes": nodes, "bandwidth": rate, "up_ms": u, "down_ms": d,
            }));
        }
    }

    println!("\none TCP stream between two hosts, ~2 s of traffic, median of {REPEATS}");
    println!("{:>10} {:>12} {:>8}", "rate", "Mbit/s", "ratio");
    let mut accuracy = Vec::new();
    for rate in ["1mbit", "10mbit", "40mbit", "100mbit", "500mbit", "1gbit"] {
        let cluster = up(&spec(2, Some(rate))?)?;
        let r: Rate = rate.parse()?;
        let bytes = r.bytes_per_sec() * 2;
        let runs = (0..REPEATS)
            .map(|_| {
                measure_goodput(
                    &cluster.nodes[0],
                    &cluster.nodes[1],
                    bytes,
                    Duration::from_secs(20),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let got = median(runs);
        let ratio = got / r.bits_per_sec() as f64;
        println!("{rate:>10} {:>12.1} {ratio:>8.3}", got / 1e6);
        accuracy.push(serde_json::json!({ "rate": rate, "goodput_bps": got, "ratio": ratio }));
        down(tmp.path(), NAME)?;
    }

    println!("\n8 streams at once at 40mbit per host (aggregate over the slowest stream's time)");
    let cluster = up(&spec(8, Some("40mbit"))?)?;
    let per_stream = 40_000_000 / 8 * 2 / 8;
    let mut fan = Vec::new();
    for (label, inward) in [("8 nodes -> origin", true), ("origin -> 8 nodes", false)] {
        let t = Instant::now();
        std::thread::scope(|s| -> Result<(), spore_cluster::ClusterError> {
            let jobs: Vec<_> = cluster
                .nodes
                .iter()
                .map(|n| {
                    let (from, to) = if inward {
                        (n, &cluster.origin)
                    } else {
                        (&cluster.origin, n)
                    };
                    s.spawn(move || measure_goodput(from, to, per_stream, Duration::from_secs(20)))
                })
                .collect();
            for j in jobs {
                j.join().expect("probe thread")?;
            }
            Ok(())
        })?;
        let aggregate = (per_stream * 8 * 8) as f64 / t.elapsed().as_secs_f64();
        println!(
            "{label:>20}: {:.1} Mbit/s aggregate ({:.3} of one link)",
            aggregate / 1e6,
            aggregate / 40e6
        );
        fan.push(serde_json::json!({ "case": label, "aggregate_bps": aggregate }));
    }
    down(tmp.path(), NAME)?;

    let json = serde_json::json!({ "up_down": timings, "accuracy": accuracy, "fan": fan });
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)?;
    println!("\nwrote {out}");
    Ok(())
}
