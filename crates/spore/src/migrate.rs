//! `spore vm migrate`: move a running VM to another agent, with progress,
//! and a summary of what moved and what the policy decided.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use spore_api::{Client, MigrateRequest, MigrationInfo, MigrationPhase, MigrationPolicy};
use spore_cluster::Rate;

use crate::format::{human, table};
use crate::output::print_json;

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The VM to move
    pub name: String,
    /// Destination: an agent's peer URL (https://10.77.0.3:7070), HOST:PORT,
    /// or the name of a host of a `spore cluster` (node2)
    #[arg(long, required_unless_present = "cancel")]
    pub to: Option<String>,
    /// auto (switch to post-copy when pre-copy will not converge), precopy,
    /// postcopy (switch after the first pass) or auto-converge (QEMU's throttling)
    #[arg(long, default_value = "auto")]
    pub policy: MigrationPolicy,
    /// Longest pause of the guest pre-copy may plan for, in milliseconds
    #[arg(long, default_value_t = 300)]
    pub max_downtime: u64,
    /// Cap on the migration's use of the link, e.g. 200mbit, 1gbit (QEMU's limit,
    /// pacing of its connection, and the disk's block batches)
    #[arg(long)]
    pub bandwidth: Option<Rate>,
    /// Give up if the VM has not switched hosts after this many seconds (it keeps running here)
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Never use post-copy: `auto` throttles the guest instead
    #[arg(long)]
    pub no_postcopy: bool,
    /// Cancel the VM's migration in progress (before the switch)
    #[arg(long)]
    pub cancel: bool,
    /// Return once the migration has started (follow it with `spore vm migration NAME`)
    #[arg(long)]
    pub detach: bool,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
    /// Cluster whose host names `--to` may use
    #[arg(long, default_value = "spore")]
    pub cluster: String,
    #[arg(
        long,
        env = "SPORE_CLUSTER_DIR",
        default_value = "/var/tmp/spore-clusters"
    )]
    pub cluster_dir: PathBuf,
}

/// A destination as the agent needs it: a peer URL.
fn destination(to: &str, cluster_dir: &std::path::Path, cluster: &str) -> Result<String> {
    // The agent checks the scheme against how it reaches other hosts
    // (http:// only with --insecure-listen).
    if to.starts_with("https://") || to.starts_with("http://") {
        return Ok(to.to_owned());
    }
    if to.contains(':') {
        return Ok(format!("https://{to}"));
    }
    let c = spore_cluster::load(cluster_dir, cluster).with_context(|| {
        format!("{to:?} is not a URL or HOST:PORT, and no cluster {cluster} names hosts")
    })?;
    match c.host(to) {
        Some(node) => Ok(spore_cluster::tree::peer_url(node)),
        None => bail!(
            "cluster {cluster} has no host {to:?} (its hosts: {})",
            c.hosts()
                .map(|h| h.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

pub async fn run(c: &Client, a: MigrateArgs) -> Result<bool> {
    if a.cancel {
        let info: MigrationInfo = c
            .call(
                hyper::Method::POST,
                &format!("/v1/vms/{}/migrate/cancel", a.name),
                None::<&()>,
            )
            .await?;
        println!(
            "cancelling the migration of {} (phase {}); the VM keeps running here",
            info.vm, info.phase
        );
        return Ok(true);
    }
    let to = destination(
        a.to.as_deref().expect("clap requires --to"),
        &a.cluster_dir,
        &a.cluster,
    )?;
    let req = MigrateRequest {
        to,
        policy: a.policy,
        max_downtime_ms: a.max_downtime,
        bandwidth: a.bandwidth.map(|r| r.bytes_per_sec()),
        timeout_s: a.timeout,
        allow_postcopy: !a.no_postcopy,
    };
    let info: MigrationInfo = c
        .call(
            hyper::Method::POST,
            &format!("/v1/vms/{}/migrate", a.name),
            Some(&req),
        )
        .await?;
    if a.detach && a.json {
        print_json(&info)?;
        return Ok(true);
    }
    if a.detach {
        println!(
            "migrating {} to {} (policy {}); follow with: spore vm migration {}",
            info.vm, info.to, info.policy, info.vm
        );
        return Ok(true);
    }
    let info = follow(c, &a.name, a.json).await?;
    if a.json {
        print_json(&info)?;
    } else {
        print_summary(&info);
    }
    Ok(info.phase == MigrationPhase::Completed)
}

/// Polls the migration until it ends, with a progress bar on a terminal.
pub async fn follow(c: &Client, name: &str, quiet: bool) -> Result<MigrationInfo> {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(1);
        b.set_style(
            ProgressStyle::with_template("{spinner} {elapsed:>4} [{bar:30}] {msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
        b
    };
    loop {
        let info: MigrationInfo = c.get(&format!("/v1/vms/{name}/migration")).await?;
        if info.phase.finished() {
            bar.finish_and_clear();
            return Ok(info);
        }
        let total = info.ram_total.max(1);
        bar.set_length(total);
        bar.set_position(total.saturating_sub(info.ram_remaining));
        bar.set_message(format!(
            "{} · pass {} · {} left · dirty {}/s · link {}/s · disk {}",
            info.phase,
            info.passes.max(1),
            human(info.ram_remaining),
            human(info.dirty_rate),
            human(info.throughput),
            human(info.disk_bytes)
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn print_summary(i: &MigrationInfo) {
    let ms = |v: Option<f64>| {
        v.map(|v| format!("{v:.0} ms"))
            .unwrap_or_else(|| "-".into())
    };
    println!("vm {} → {}: {} (policy {})", i.vm, i.to, i.phase, i.policy);
    table(
        &[
            "TOTAL",
            "DOWNTIME (QEMU)",
            "GUEST STALL",
            "RAM MOVED",
            "DISK MOVED",
            "PASSES",
        ],
        vec![vec![
            format!("{:.2} s", i.elapsed_ms / 1e3),
            ms(i.downtime_ms),
            ms(i.guest_stall_ms),
            format!("{} of {}", human(i.ram_transferred), human(i.ram_total)),
            format!(
                "{} ({} passes, {} while paused)",
                human(i.disk_bytes),
                i.disk_passes,
                human(i.disk_final_bytes)
            ),
            i.passes.to_string(),
        ]],
    );
    if let (Some(stall), Some(at)) = (i.guest_stall_ms, i.guest_stall_at_ms) {
        let switch = i
            .switched_at_ms
            .map(|s| format!("; the guest stopped at the source at {s:.0} ms"))
            .unwrap_or_default();
        println!("longest guest stall: {stall:.0} ms from {at:.0} ms{switch}");
    }
    if i.postcopy_requests > 0 {
        println!(
            "post-copy: {} pages demanded by the guest{}",
            i.postcopy_requests,
            if i.postcopy_preempt {
                " (on their own connection: postcopy-preempt)"
            } else {
                ""
            }
        );
    }
    for d in &i.decisions {
        println!("  {:>7.0} ms  pass {:>2}  {}", d.at_ms, d.pass, d.text);
    }
    if let Some(e) = &i.error {
        println!("error: {e}");
    }
}
