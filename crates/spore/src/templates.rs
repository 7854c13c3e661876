//! `spore template ...` and the template side of `spore vm ...`: capture,
//! clone, resize, groups.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use clap::Subcommand;
use spore_api::{
    Client, CloneRequest, CloneResult, GroupRemoved, RemoveResult, ResizeRequest, TemplateCreate,
    TemplateInfo, VmInfo,
};

use crate::format::{human, table};
use crate::output::print_json;

#[derive(Subcommand, Debug)]
pub enum TemplateCmd {
    /// List templates
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Show one template: its RAM and disk images, dedupe, clones
    Inspect {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a template (no clone may run from it), with its RAM and disk images
    Rm { name: String },
    /// Push a template to an origin: its images NAME.disk, NAME.ram, NAME.boot
    Push {
        name: String,
        /// The origin's peer URL, e.g. https://10.77.0.1:7070
        #[arg(long)]
        to: String,
        /// Rebind the names if the origin has them bound to other content
        #[arg(long)]
        force: bool,
    },
    /// Fetch all of a template from the origin (clones do not need this:
    /// they page a template in on demand)
    Pull { name: String },
}

pub async fn template_command(cmd: TemplateCmd, c: &Client) -> Result<()> {
    match cmd {
        TemplateCmd::Ls { json } => {
            let list: Vec<TemplateInfo> = c.get("/v1/templates").await?;
            if json {
                return print_json(&list);
            }
            table(
                &[
                    "NAME",
                    "FROM VM",
                    "IMAGE",
                    "MEMORY",
                    "CPUS",
                    "RAM STORED",
                    "CLONES",
                ],
                list.into_iter()
                    .map(|t| {
                        vec![
                            if t.removing {
                                format!("{} (removing)", t.name)
                            } else {
                                t.name
                            },
                            t.source_vm,
                            t.source_image,
                            format!("{}M", t.memory_mib),
                            t.cpus.to_string(),
                            human(t.ram_stored_bytes),
                            t.clones.len().to_string(),
                        ]
                    })
                    .collect(),
            );
        }
        TemplateCmd::Inspect { name, json } => {
            let t: TemplateInfo = c.get(&format!("/v1/templates/{name}")).await?;
            if json {
                return print_json(&t);
            }
            print_template(&t);
        }
        TemplateCmd::Push { name, to, force } => {
            let r: spore_api::PushResult = crate::output::with_progress(
                c,
                &format!("/v1/templates/{name}/push"),
                &spore_api::PushRequest { to, force },
            )
            .await?;
            println!(
                "pushed template {} to {}: {} chunks, {} sent ({})",
                r.image,
                r.to,
                r.chunks,
                r.sent_chunks,
                human(r.sent_bytes)
            );
        }
        TemplateCmd::Pull { name } => {
            let t: TemplateInfo = c
                .call(
                    hyper::Method::POST,
                    &format!("/v1/templates/{name}/pull"),
                    None::<&()>,
                )
                .await?;
            print_template(&t);
        }
        TemplateCmd::Rm { name } => {
            let r: RemoveResult = c
                .call(
                    hyper::Method::DELETE,
                    &format!("/v1/templates/{name}"),
                    None::<&()>,
                )
                .await?;
            println!(
                "removed template {}: freed {} chunks ({})",
                r.removed,
                r.freed_chunks,
                human(r.freed_bytes)
            );
        }
    }
    Ok(())
}

fn print_template(t: &TemplateInfo) {
    println!("template   {}", t.name);
    println!("from       vm {} (image {})", t.source_vm, t.source_image);
    println!(
        "size       {} MiB, {} CPU (clones can grow to {} MiB, {} CPUs)",
        t.memory_mib, t.cpus, t.max_memory_mib, t.max_cpus
    );
    println!(
        "ram        image {}: {} in {} chunks ({} already in the store), of {} MiB",
        t.ram_image,
        human(t.ram_stored_bytes),
        t.ram_chunks,
        t.ram_chunks_deduped,
        t.memory_mib
    );
    println!("disk       image {}", t.disk_image);
    println!("state      {}", human(t.state_bytes));
    println!("capture    source paused {:.0} ms", t.pause_ms);
    println!("source     {}", t.source_after);
    if t.removing {
        println!(
            "removing   a removal stopped half-way; `spore template rm {}` finishes it",
            t.name
        );
    }
    if t.clones.is_empty() {
        println!("clones     none");
    } else {
        println!("clones     {} ({})", t.clones.len(), t.clones.join(", "));
    }
}

pub async fn template_vm(c: &Client, vm: &str, name: &str, stop: bool, json: bool) -> Result<()> {
    let req = TemplateCreate {
        name: name.to_owned(),
        stop,
    };
    let started = Instant::now();
    let t: TemplateInfo = c
        .call(
            hyper::Method::POST,
            &format!("/v1/vms/{vm}/template"),
            Some(&req),
        )
        .await?;
    if json {
        return print_json(&t);
    }
    eprintln!(
        "vm {vm} captured as template {} in {:.2}s",
        t.name,
        started.elapsed().as_secs_f64()
    );
    print_template(&t);
    Ok(())
}

pub async fn clone(c: &Client, template: &str, req: &CloneRequest, json: bool) -> Result<ExitCode> {
    let r: CloneResult = c
        .call(
            hyper::Method::POST,
            &format!("/v1/templates/{template}/clone"),
            Some(req),
        )
        .await?;
    if json {
        print_json(&r)?;
    } else {
        table(
            &[
                "NAME",
                "STATE",
                "HOSTNAME",
                "MAC",
                "MEMORY",
                "CPUS",
                "RUNNING AFTER",
            ],
            r.vms
                .iter()
                .map(|v| {
                    vec![
                        v.name.clone(),
                        v.state.to_string(),
                        v.hostname.clone().unwrap_or_default(),
                        v.mac.clone().unwrap_or_default(),
                        format!("{}M", v.memory_mib),
                        v.cpus.to_string(),
                        v.start_ms
                            .as_ref()
                            .map(|s| format!("{:.0} ms", s.total))
                            .unwrap_or_default(),
                    ]
                })
                .collect(),
        );
        eprintln!(
            "{} clone(s) of {} in group {} in {:.0} ms",
            r.vms.len(),
            r.template,
            r.group,
            r.total_ms
        );
    }
    for (vm, why) in &r.failed {
        eprintln!("clone {vm} failed: {why}");
    }
    Ok(if r.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub async fn resize(
    c: &Client,
    name: &str,
    memory_mib: Option<u64>,
    cpus: Option<u32>,
) -> Result<()> {
    if memory_mib.is_none() && cpus.is_none() {
        anyhow::bail!("give --memory, --cpus or both");
    }
    let v: VmInfo = c
        .call(
            hyper::Method::POST,
            &format!("/v1/vms/{name}/resize"),
            Some(&ResizeRequest { memory_mib, cpus }),
        )
        .await?;
    println!(
        "vm {} now has {} MiB and {} CPUs (the guest prints SPORE-RESOURCES once they are online)",
        v.name, v.memory_mib, v.cpus
    );
    Ok(())
}

pub async fn remove_group(c: &Client, group: &str) -> Result<()> {
    let r: GroupRemoved = c
        .call(
            hyper::Method::DELETE,
            &format!("/v1/groups/{group}"),
            None::<&()>,
        )
        .await?;
    println!(
        "removed group {}: {} VMs ({})",
        r.group,
        r.removed.len(),
        r.removed.join(", ")
    );
    Ok(())
}
