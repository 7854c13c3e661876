//! `spore cluster`: several hosts on one machine, each a network namespace
//! with its own shaped link and its own agent (crates/cluster builds the
//! namespaces; this wires the agents).
//!
//! Agents form a re-export tree, as in VirtMan: every node fetches from its
//! parent relay first (a `--peer`) and relays for its children, so a storm
//! spreads over the tree instead of queueing at the origin, and the origin
//! (whose only child is node1) sends each chunk once. The origin stays every
//! node's fallback: a dead relay costs its subtree a retry, not its images.
//! `--fanout 0` makes every node fetch from the origin directly.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use spore_cluster::tree::{self, parent, peer_url};
use spore_cluster::{Cluster, ClusterSpec, Rate};

use crate::format::table;

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Create an origin and N hosts (network namespaces) with an agent each
    Up(UpArgs),
    /// Remove every namespace, link and process of the cluster (also after a crash)
    Down(NameArgs),
    /// The cluster's hosts and their agents
    Ls(NameArgs),
}

#[derive(Args, Debug)]
pub struct NameArgs {
    /// Cluster name (1-10 lower-case letters and digits)
    #[arg(long, default_value = "spore")]
    pub name: String,
    /// Where clusters keep their state and agents' data directories
    #[arg(
        long,
        env = "SPORE_CLUSTER_DIR",
        default_value = "/var/tmp/spore-clusters"
    )]
    pub state_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    pub id: NameArgs,
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Per-host link speed, both ways (e.g. 100mbit, 1gbit)
    #[arg(long)]
    pub bandwidth: Option<Rate>,
    /// Children per relay in the re-export tree; 0: all nodes fetch from the origin
    #[arg(long, default_value_t = 4)]
    pub fanout: usize,
    /// Chunk cache of each agent
    #[arg(long, default_value = "256M")]
    pub cache_size: String,
    /// More arguments for every node's agent, split at spaces (e.g. --complete-images or "--clone-standby 1")
    #[arg(long, allow_hyphen_values = true)]
    pub agent_args: Vec<String>,
    /// More arguments for the origin's agent, split at spaces (e.g. "--profile-seconds 20")
    #[arg(long, allow_hyphen_values = true)]
    pub origin_args: Vec<String>,
}

/// `--agent-args "--clone-standby 1"` is two arguments for the agent.
fn words(values: &[String]) -> impl Iterator<Item = String> + '_ {
    values
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_owned))
}

pub fn up(a: &UpArgs) -> Result<Cluster> {
    let mut spec = ClusterSpec::new(&a.id.name, a.nodes, &a.id.state_dir);
    spec.bandwidth = a.bandwidth;
    let cluster = spore_cluster::up(&spec).context("creating the cluster")?;
    let spore = std::env::current_exe()?;
    let started = (|| -> Result<()> {
        let cache = ["--cache-size".to_string(), a.cache_size.clone()];
        let mut args: Vec<String> = cache.to_vec();
        args.extend(tree::origin_args(&cluster));
        args.extend(words(&a.origin_args));
        let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let mut handles = vec![cluster.spawn_agent(&cluster.origin, &spore, &refs)?];
        for (i, node) in cluster.nodes.iter().enumerate() {
            let mut args: Vec<String> = cache.to_vec();
            args.extend(tree::node_args(&cluster, i + 1, a.fanout));
            args.extend(words(&a.agent_args));
            let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
            handles.push(cluster.spawn_agent(node, &spore, &refs)?);
        }
        for h in &mut handles {
            h.wait_ready(Duration::from_secs(60))?;
        }
        Ok(())
    })();
    if let Err(e) = started {
        let _ = spore_cluster::down(&a.id.state_dir, &a.id.name);
        return Err(e.context("starting the agents (the cluster was removed again)"));
    }
    Ok(cluster)
}

pub fn print(cluster: &Cluster, fanout: Option<usize>) {
    let rows = cluster
        .hosts()
        .enumerate()
        .map(|(i, h)| {
            let upstream = match (i, fanout) {
                (0, _) => "-".to_string(),
                (_, Some(f)) => match parent(i, f) {
                    0 => "origin".into(),
                    p => format!("node{p}"),
                },
                (_, None) => "?".into(),
            };
            let alive = std::os::unix::net::UnixStream::connect(h.api_socket()).is_ok();
            vec![
                h.name.clone(),
                h.ip.to_string(),
                h.netns.clone(),
                upstream,
                if alive { "up" } else { "down" }.into(),
                h.data_dir.display().to_string(),
            ]
        })
        .collect();
    table(
        &[
            "HOST",
            "ADDRESS",
            "NETNS",
            "FETCHES FROM",
            "AGENT",
            "DATA DIR (SPORE_HOME)",
        ],
        rows,
    );
}

pub fn run(cmd: ClusterCmd) -> Result<()> {
    match cmd {
        ClusterCmd::Up(a) => {
            let c = up(&a)?;
            println!(
                "cluster {} up: origin + {} nodes{}",
                a.id.name,
                c.nodes.len(),
                a.bandwidth
                    .map(|b| format!(", {b} per host"))
                    .unwrap_or_default()
            );
            print(&c, Some(a.fanout));
            println!("use a host: SPORE_HOME=<its data dir> spore ...; push images with: spore image push NAME --to {}", peer_url(&c.origin));
        }
        ClusterCmd::Down(n) => {
            let r = spore_cluster::down(&n.state_dir, &n.name)?;
            println!(
                "cluster {} down: {} namespaces, {} links, {} processes removed",
                n.name,
                r.namespaces.len(),
                r.links.len(),
                r.processes.len()
            );
        }
        ClusterCmd::Ls(n) => {
            let c = spore_cluster::load(&n.state_dir, &n.name)?;
            print(&c, None);
        }
    }
    Ok(())
}
