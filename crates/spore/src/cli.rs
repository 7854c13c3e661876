//! Command-line definitions and their handlers.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use spore_api::{
    AgentStatus, Client, CommitRequest, DiskCreate, DiskInfo, ExportRequest, ImageInfo,
    ImageSummary, ImportRequest, ImportResult, RemoveResult, VmCreate, VmInfo, VmLog, VmState,
};

use crate::format::{human, parse_size, table};
use crate::output::{print_json, with_progress};

#[derive(Parser, Debug)]
#[command(
    name = "spore",
    version,
    about = "VMs where they are needed, in seconds"
)]
pub struct Cli {
    /// The agent's data directory [default: $SPORE_HOME or ~/.local/share/spore]
    #[arg(long, global = true, env = "SPORE_HOME")]
    pub data_dir: Option<PathBuf>,
    /// Drive another host's agent over its peer listener, e.g.
    /// https://10.77.0.2:7070, with the operator certificate in
    /// $SPORE_HOME/pki (`spore ca issue NAME --role operator`)
    #[arg(long, global = true, env = "SPORE_REMOTE", value_name = "URL")]
    pub remote: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the per-host agent (foreground), or stop it (`spore agent stop`)
    #[command(after_long_help = AGENT_HELP)]
    Agent(AgentArgs),
    /// Show the agent's status
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Images: layered, content-addressed, read-only
    #[command(subcommand)]
    Image(ImageCmd),
    /// Disks: writable overlays on images
    #[command(subcommand)]
    Disk(DiskCmd),
    /// Virtual machines
    #[command(subcommand)]
    Vm(VmCmd),
    /// Templates: VMs captured in memory, for clones that start without booting
    #[command(subcommand)]
    Template(crate::templates::TemplateCmd),
    /// Check every chunk's hash and every reference (image names, manifests,
    /// layers, disks, boot profiles); exits 1 unless clean
    Fsck {
        /// Refetch what is missing or corrupt from the origin or peers, and
        /// drop chunks nothing refers to
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        json: bool,
    },
    /// The fleet's CA: certificates that let hosts, publishers and operators talk to agents
    #[command(subcommand)]
    Ca(crate::ca::CaCmd),
    /// Several hosts on this machine (network namespaces), each with an agent
    #[command(subcommand)]
    Cluster(crate::cluster::ClusterCmd),
    /// Benchmarks (print a table, write JSON)
    #[command(subcommand)]
    Bench(BenchCmd),
    /// The socket holder an agent starts (spore_agent::holder); not for users
    #[command(name = "__hold-sockets", hide = true)]
    HoldSockets {
        dir: PathBuf,
        nbd_fd: i32,
        api_fd: i32,
    },
}

/// How restarts and upgrades go, for `spore agent --help`.
const AGENT_HELP: &str = "\
Restarts and upgrades keep VMs running. QEMU does not die with the agent: \
Ctrl-C, SIGTERM, `spore agent stop`, a crash or kill -9 stop the agent only. \
The next `spore agent` on the same data directory takes the VMs over (their \
monitors, guest channels, standby clones), and their disks reconnect to it: \
guest I/O waits during the restart, then goes on with no error and no lost \
write (writes acknowledged and not yet flushed are kept too). What was half-way \
at a kill (a VM starting, an incoming migration before its guest ran here, a \
capture or a commit) is rolled back by that start, and `spore status` lists \
what it did.

Upgrade: install the new binary, then `spore agent stop` (or `systemctl \
restart spore-agent` with packaging/spore-agent.service) and start the new one. \
`spore agent stop --vms` stops every VM with the agent (what a host going down \
wants). Clones whose template RAM is paged in from another host (spore-memfs) \
are served by the agent itself and do not survive its restart.";

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AgentArgs {
    #[command(subcommand)]
    pub action: Option<AgentAction>,
    /// Memory for cached chunk data
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    cache_size: u64,
    /// Also serve NBD on this TCP address, e.g. 127.0.0.1:10809
    #[arg(long)]
    nbd_tcp: Option<String>,
    /// Accelerator for VMs (kvm or tcg) [default: detected]
    #[arg(long)]
    accel: Option<spore_qemu::Accel>,
    /// Compression of new chunks (zstd or none)
    #[arg(long, default_value = "zstd")]
    compression: spore_chunks::Compression,
    /// Serve peers (chunks, image names, pushes, migrations) here over mutual TLS, e.g. 10.77.0.2:7070
    #[arg(long)]
    listen: Option<String>,
    /// Another agent to fetch missing chunks from (repeatable; asked before the origin)
    #[arg(long = "peer")]
    peers: Vec<String>,
    /// The origin of images, e.g. https://10.77.0.1:7070: unknown image names are looked up there
    #[arg(long)]
    origin: Option<String>,
    /// Accept pushed images on the peer listener (run as an origin)
    #[arg(long)]
    accept_push: bool,
    /// Where pushed images are kept and served from: a directory, file:///DIR, or
    /// s3://BUCKET[/PREFIX] set up from AWS_* variables [default with --accept-push: DATA_DIR/origin]
    #[arg(long, value_name = "SPEC")]
    origin_store: Option<String>,
    /// Complete images found at the origin in the background after first use
    #[arg(long)]
    complete_images: bool,
    /// Seconds after an image's first use during which its boot profile is recorded
    #[arg(long, default_value_t = 60)]
    profile_seconds: u64,
    /// Seconds a name found at the origin is used before a new disk or VM
    /// made from it looks it up again (a new version there is taken then;
    /// `image pull` always looks it up; running VMs keep their version)
    #[arg(long, default_value_t = 300)]
    name_max_age: u64,
    /// Serve peers' requests for images and chunks this host lacks by fetching them upstream first
    #[arg(long)]
    relay: bool,
    /// Where guest RAM files live (a tmpfs) [default: /dev/shm/spore-<hash of DATA_DIR>]
    #[arg(long)]
    ram_dir: Option<PathBuf>,
    /// Back guest RAM with transparent huge pages: the RAM directory is
    /// mounted as a tmpfs of its own with huge=within_size (root)
    #[arg(long)]
    huge_pages: bool,
    /// Clones kept started and paused per template, so that a clone request
    /// skips QEMU's start-up (each costs a QEMU process and a disk)
    #[arg(long, default_value_t = 0)]
    clone_standby: u32,
    /// Accept live migrations from other agents on the peer listener (they
    /// start VMs here: only between hosts that trust each other)
    #[arg(long)]
    accept_migrations: bool,
    /// Where this host's fleet certificate is (ca.pem, cert.pem, key.pem, crl.pem;
    /// made by `spore ca issue`) [default: $SPORE_HOME/pki]
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Serve peers (and NBD over TCP) in PLAINTEXT without authentication, and
    /// reach http:// peers: only on a network where every host is trusted
    #[arg(long)]
    insecure_listen: bool,
    /// Peer connections open at once; more are closed at accept
    #[arg(long, default_value_t = 512)]
    peer_connections: usize,
    /// Peer connections open at once from one address
    #[arg(long, default_value_t = 128)]
    peer_connections_per_host: usize,
    /// Seconds a peer has to finish the TLS handshake
    #[arg(long, default_value_t = 10)]
    peer_handshake_timeout: u64,
    /// Seconds a peer has to send a request's head, and may stay idle
    /// between requests on a kept connection
    #[arg(long, default_value_t = 30)]
    peer_header_timeout: u64,
    /// Largest body of a peer request (at least the largest chunk or batch
    /// of blocks, 65 MiB) [default: 65M]
    #[arg(long, value_parser = parse_size)]
    peer_max_body: Option<u64>,
    /// Incoming migrations prepared or running at once; more are answered
    /// 503 (each starts a QEMU and a disk here)
    #[arg(long, default_value_t = 2)]
    max_incoming_migrations: usize,
    /// Do not keep the NBD and API sockets open across restarts (a socket
    /// holder process does by default): VMs' disks then reconnect to a
    /// restarted agent with QEMU's back-off, seconds later (for comparison)
    #[arg(long)]
    no_socket_holder: bool,
}

#[derive(Subcommand, Debug)]
pub enum AgentAction {
    /// Stop the agent of this data directory (or --remote); its VMs keep
    /// running for the next agent unless --vms
    Stop {
        /// Stop every VM and standby clone too
        #[arg(long)]
        vms: bool,
        /// Seconds to wait for the agent to exit
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Import a raw or qcow2 file (format detected)
    Import {
        file: PathBuf,
        #[arg(long)]
        name: String,
        /// Store only the blocks that differ from this image
        #[arg(long)]
        parent: Option<String>,
        /// Block size, 4K to 4M [default: 64K, or the parent's]
        #[arg(long, value_parser = parse_size)]
        block_size: Option<u64>,
    },
    /// List images
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Layers, sizes, chunks and sharing of an image
    Inspect {
        name: String,
        #[arg(long)]
        json: bool,
        /// Also list the boot profile's blocks in first-read order
        #[arg(long)]
        profile: bool,
    },
    /// Write an image to a file
    Export {
        name: String,
        file: PathBuf,
        #[arg(long, default_value = "raw")]
        format: String,
    },
    /// Remove an image and free the chunks nothing else uses
    Rm { name: String },
    /// Fetch every chunk of an image not here yet, and keep it complete
    Pull {
        name: String,
        /// Return at once; the agent completes the image in the background
        #[arg(long)]
        background: bool,
    },
    /// Send an image to an origin (only the chunks it lacks)
    Push {
        name: String,
        /// The origin's peer URL, e.g. https://10.77.0.1:7070
        #[arg(long)]
        to: String,
        /// Rebind the name if the origin has it bound to other content
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum DiskCmd {
    /// Create a writable disk over an image
    Create {
        name: String,
        #[arg(long)]
        image: String,
    },
    /// Turn a disk's writes into a new image (a layer on the disk's image)
    Commit {
        disk: String,
        #[arg(long)]
        name: String,
    },
    /// List disks
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove a disk
    Rm { name: String },
}

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// Start a VM on a new disk over an image
    Run {
        name: String,
        #[arg(long)]
        image: String,
        #[arg(long, default_value = "512M", value_parser = parse_size)]
        memory: u64,
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        #[arg(long)]
        kernel: Option<PathBuf>,
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Kernel command line
        #[arg(long, allow_hyphen_values = true)]
        append: Option<String>,
        /// kvm or tcg [default: detected by the agent]
        #[arg(long)]
        accel: Option<String>,
        /// Wait until the serial console prints this text
        #[arg(long)]
        wait_for: Option<String>,
        /// Seconds to wait for --wait-for
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// List VMs
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Stop a VM: the guest is asked to power off (ACPI, like `virsh
    /// shutdown`) and QEMU is stopped if it has not within --timeout; the
    /// disk stays
    Stop {
        name: String,
        /// Stop QEMU at once, without asking the guest (a power cut, like
        /// `virsh destroy`)
        #[arg(long)]
        force: bool,
        /// Seconds the guest has to power off
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Remove a stopped VM and its disk (or a whole clone group)
    Rm {
        #[arg(required_unless_present = "group")]
        name: Option<String>,
        /// Stop it first if it runs
        #[arg(long)]
        force: bool,
        /// Remove every VM of this clone group (stopping them)
        #[arg(long, conflicts_with = "name")]
        group: Option<String>,
    },
    /// Turn a running VM into a template (paused for the capture, then
    /// resumed from the template unless --stop)
    Template {
        vm: String,
        /// Name of the template
        #[arg(long)]
        name: String,
        /// Leave the VM stopped afterwards
        #[arg(long)]
        stop: bool,
        #[arg(long)]
        json: bool,
    },
    /// Start clones of a template: resumed, not booted
    Clone {
        template: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Clones are PREFIX-1..N and form the group PREFIX [default: the template's name]
        #[arg(long = "name")]
        prefix: Option<String>,
        /// More memory than the template (hot-plugged; steps of 128M)
        #[arg(long, value_parser = parse_size)]
        memory: Option<u64>,
        /// More CPUs than the template (hot-plugged)
        #[arg(long)]
        cpus: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// Send one line to the guest on its channel (the demo guest answers
    /// e.g. `dataset write 8`, `dataset check`, `cat /etc/hostname` on its console)
    Send {
        name: String,
        #[arg(required = true, num_args = 1.., allow_hyphen_values = true)]
        words: Vec<String>,
    },
    /// Move a running VM to another host while it runs (live migration)
    Migrate(crate::migrate::MigrateArgs),
    /// Show a VM's migration (in progress or the last one), --follow until it ends
    Migration {
        name: String,
        #[arg(long, short)]
        follow: bool,
        #[arg(long)]
        json: bool,
    },
    /// Grow a running VM: memory (steps of 128M) and CPUs, seen by the guest at once
    Resize {
        name: String,
        #[arg(long, value_parser = parse_size)]
        memory: Option<u64>,
        #[arg(long)]
        cpus: Option<u32>,
    },
    /// Show the VM's serial console
    Log {
        name: String,
        /// Keep printing new output
        #[arg(long, short)]
        follow: bool,
        /// Follow until this text appears (exit 0), the VM stops or the timeout passes (exit 1)
        #[arg(long)]
        until: Option<String>,
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// NBD read throughput at layer depths 1..1000, against qemu-nbd over qcow2 chains
    Blockdev(spore_bench::blockdev::Options),
    /// N hosts booting one image at once from cold: tree, origin only, full copy
    Storm(spore_bench::storm::Options),
    /// Clones of a running VM: latency for bursts of clones, host memory,
    /// a clone on a cold host, against a cold boot of the same guest
    Clone(spore_bench::clone::Options),
    /// Live migration between two cluster hosts: workloads × policies,
    /// success, time, downtime, guest stall, bytes moved
    Migrate(spore_bench::migrate::Options),
    /// 4 KiB random write + flush latency on a small and a huge disk,
    /// against qemu-nbd over qcow2
    Flush(spore_bench::flush::Options),
    /// Chunk transfer between two agents over mutual TLS vs plaintext, same run
    Tls(spore_bench::tls::Options),
    /// `spore fsck` throughput over a store, beside b3sum over the same files
    Fsck(spore_bench::fsck::Options),
    /// Guest-visible I/O stall per agent restart (SIGTERM, SIGKILL), with and
    /// without the socket holder
    Restart(spore_bench::restart::Options),
    /// 4 KiB read latency of a storm of cold hosts with a wedged and a slow
    /// peer before the origin, against the same storm with healthy peers
    SlowPeers(spore_bench::slow_peers::Options),
}

fn abs(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}

pub fn run(cli: Cli, data_dir: PathBuf) -> Result<ExitCode> {
    match cli.command {
        Command::Agent(a) if a.action.is_none() => {
            let mut config = spore_agent::AgentConfig::new(abs(&data_dir)?);
            config.cache_bytes = a.cache_size as usize;
            config.nbd_tcp = a.nbd_tcp;
            config.accel = a.accel;
            config.compression = a.compression;
            config.listen = a.listen;
            config.peers = a.peers;
            config.origin = a.origin;
            config.accept_push = a.accept_push;
            config.origin_store = a.origin_store;
            config.complete_images = a.complete_images;
            config.profile_seconds = a.profile_seconds;
            config.name_max_age = a.name_max_age;
            config.relay = a.relay;
            config.ram_dir = a.ram_dir.as_deref().map(abs).transpose()?;
            config.huge_pages = a.huge_pages;
            config.clone_standby = a.clone_standby;
            config.accept_migrations = a.accept_migrations;
            config.tls_dir = a.tls_dir.as_deref().map(abs).transpose()?;
            config.insecure_listen = a.insecure_listen;
            config.peer_bounds = spore_agent::listener::Bounds {
                connections: a.peer_connections,
                per_host: a.peer_connections_per_host,
                handshake: std::time::Duration::from_secs(a.peer_handshake_timeout),
                header: std::time::Duration::from_secs(a.peer_header_timeout),
                max_body: a
                    .peer_max_body
                    .map_or(spore_agent::listener::MIN_BODY, |b| b as usize),
            };
            config.max_incoming_migrations = a.max_incoming_migrations;
            config.socket_holder = !a.no_socket_holder;
            if a.insecure_listen {
                eprintln!("WARNING: --insecure-listen: this agent serves and reaches other hosts in plaintext, without authentication");
            }
            spore_agent::run(config)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::HoldSockets {
            dir,
            nbd_fd,
            api_fd,
        } => {
            spore_agent::holder::hold(&dir, nbd_fd, api_fd)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(cmd) => {
            crate::ca::run(cmd, &data_dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cluster(cmd) => {
            crate::cluster::run(cmd)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCmd::Blockdev(opts)) => {
            spore_bench::blockdev::run(&opts)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCmd::Clone(opts)) => {
            spore_bench::clone::run(&opts)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCmd::Storm(opts)) => {
            spore_bench::storm::run(&opts)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCmd::Migrate(opts)) => {
            spore_bench::migrate::run(&opts)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCmd::Tls(opts)) => {
            spore_bench::tls::run(&opts)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCmd::Flush(opts)) => {
            spore_bench::flush::run(&opts)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCmd::Fsck(opts)) => {
            spore_bench::fsck::run(&opts)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCmd::Restart(opts)) => {
            spore_bench::restart::run(&opts)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCmd::SlowPeers(opts)) => {
            spore_bench::slow_peers::run(&opts)?;
            Ok(ExitCode::SUCCESS)
        }
        other => {
            let client = match &cli.remote {
                None => Client::for_data_dir(&data_dir),
                Some(url) => {
                    let tls = spore_pki::client_config(&spore_pki::default_tls_dir(&data_dir))
                        .with_context(|| {
                            format!("--remote {url} needs this machine's operator certificate")
                        })?;
                    Client::remote(url, tls)?
                }
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(client_command(other, client))
        }
    }
}

async fn client_command(cmd: Command, c: Client) -> Result<ExitCode> {
    match cmd {
        Command::Status { json } => {
            let s: AgentStatus = c.get("/v1/status").await?;
            if json {
                print_json(&s)?;
                return Ok(ExitCode::SUCCESS);
            }
            println!("agent {} at {}", s.version, s.data_dir.display());
            println!(
                "  NBD        {}{}",
                s.nbd_socket.display(),
                s.nbd_tcp
                    .map(|t| format!(" and tcp {t}"))
                    .unwrap_or_default()
            );
            println!("  accel      {}", s.accel);
            println!("  images {}  disks {}  vms {}", s.images, s.disks, s.vms);
            for src in &s.sources {
                println!(
                    "  source     {}: {} chunks ({}) fetched, {} failed verification, {} failed requests",
                    src.url,
                    src.chunks,
                    human(src.bytes),
                    src.corrupt,
                    src.failures
                );
            }
            if s.served_chunks > 0 {
                println!(
                    "  served     {} chunks ({}) to other hosts",
                    s.served_chunks,
                    human(s.served_bytes)
                );
            }
            println!(
                "  cache      {} of {}",
                human(s.cache_bytes),
                human(s.cache_budget)
            );
            if !s.recovered.is_empty() {
                println!("  at start, left by the previous run:");
                for line in &s.recovered {
                    println!("    {line}");
                }
            }
        }
        Command::Fsck { repair, json } => {
            let r: spore_api::FsckReport =
                with_progress(&c, "/v1/fsck", &spore_api::FsckRequest { repair }).await?;
            if json {
                print_json(&r)?;
            } else {
                print_fsck(&r, repair);
            }
            return Ok(if r.clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        Command::Agent(AgentArgs {
            action: Some(AgentAction::Stop { vms, timeout }),
            ..
        }) => stop_agent(&c, vms, timeout).await?,
        Command::Image(cmd) => image_command(cmd, &c).await?,
        Command::Disk(cmd) => disk_command(cmd, &c).await?,
        Command::Vm(cmd) => return vm_command(cmd, &c).await,
        Command::Template(cmd) => crate::templates::template_command(cmd, &c).await?,
        Command::Agent(_)
        | Command::Bench(_)
        | Command::Cluster(_)
        | Command::Ca(_)
        | Command::HoldSockets { .. } => {
            unreachable!("handled without a client")
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `spore agent stop`: asks the agent to stop, then waits until it is
/// gone (its API stops answering and, on this host, its process exits).
async fn stop_agent(c: &Client, vms: bool, timeout: u64) -> Result<()> {
    let r: spore_api::AgentStopping = c
        .call(
            hyper::Method::POST,
            "/v1/agent/stop",
            Some(&spore_api::AgentStop { vms }),
        )
        .await?;
    match (r.vms, r.running) {
        (_, 0) => eprintln!("stopping the agent (no VM runs)"),
        (true, n) => eprintln!("stopping the agent and its {n} VM(s)"),
        (false, n) => eprintln!(
            "stopping the agent; its {n} VM(s) keep running for the next agent on this data directory"
        ),
    }
    let until = std::time::Instant::now() + std::time::Duration::from_secs(timeout);
    // Gone, or a zombie its parent has not reaped yet.
    let exited = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
        })
    };
    loop {
        let api_gone = c.get::<AgentStatus>("/v1/status").await.is_err();
        let process_gone = c.is_remote() || exited(r.pid);
        if api_gone && process_gone {
            eprintln!("agent stopped");
            return Ok(());
        }
        if std::time::Instant::now() >= until {
            anyhow::bail!("the agent (pid {}) did not exit within {timeout} s", r.pid);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// `spore fsck`'s report for a terminal.
fn print_fsck(r: &spore_api::FsckReport, repair: bool) {
    println!(
        "checked {} chunks ({}): {} corrupt; {} needed and missing{}",
        r.chunks_checked,
        human(r.bytes_checked),
        r.corrupt,
        r.missing,
        if r.not_fetched > 0 {
            format!(
                "; {} data chunks of on-demand images not fetched yet (not a fault)",
                r.not_fetched
            )
        } else {
            String::new()
        }
    );
    for p in &r.problems {
        println!(
            "  {} {} {} (needed by {}){}",
            p.problem,
            p.kind,
            p.chunk,
            p.needed_by.join(", "),
            p.repair
                .as_ref()
                .map(|w| format!(": {w}"))
                .unwrap_or_default()
        );
    }
    for d in &r.dangling {
        println!("  {d}");
    }
    println!(
        "leaked: {} chunks ({}){}",
        r.leaked_chunks,
        human(r.leaked_bytes),
        if repair {
            format!(", {} dropped", r.dropped)
        } else {
            String::new()
        }
    );
    if repair {
        println!("repaired: {} chunks fetched", r.fetched);
    }
    match (r.clean, repair) {
        (true, _) => println!("clean"),
        (false, false) => println!(
            "NOT CLEAN: {} problems; `spore fsck --repair` refetches what the origin or peers have",
            r.unrepaired.max(r.corrupt) + r.dangling.len() as u64
        ),
        (false, true) => println!(
            "NOT CLEAN: {} problems could not be repaired (above)",
            r.unrepaired + r.dangling.len() as u64
        ),
    }
}

async fn image_command(cmd: ImageCmd, c: &Client) -> Result<()> {
    match cmd {
        ImageCmd::Import {
            file,
            name,
            parent,
            block_size,
        } => {
            let path = abs(&file)?;
            if !path.exists() {
                bail!("{} does not exist", path.display());
            }
            let block_size = block_size
                .map(|b| u32::try_from(b).context("block size too large"))
                .transpose()?;
            let req = ImportRequest {
                path,
                name,
                parent,
                block_size,
            };
            let r: ImportResult = with_progress(c, "/v1/images", &req).await?;
            println!(
                "imported {} ({}, {} virtual, {} blocks) in {:.1}s: {} blocks changed, {} new chunks, {} stored",
                r.image.name,
                r.format,
                human(r.image.virtual_size),
                human(r.image.block_size as u64),
                r.seconds,
                r.changed_blocks,
                r.new_chunks,
                human(r.new_bytes)
            );
        }
        ImageCmd::Ls { json } => {
            let list: Vec<ImageSummary> = c.get("/v1/images").await?;
            if json {
                return print_json(&list);
            }
            table(
                &["NAME", "SIZE", "BLOCK", "LAYERS", "MANIFEST", "SOURCE"],
                list.into_iter()
                    .map(|i| {
                        vec![
                            i.name,
                            human(i.virtual_size),
                            human(i.block_size as u64),
                            i.layers.to_string(),
                            match &i.newer_at_origin {
                                // `image pull NAME` takes the newer one.
                                Some(n) => format!(
                                    "{} (origin: {}, newer)",
                                    &i.manifest[..12],
                                    &n[..12.min(n.len())]
                                ),
                                None => i.manifest[..12].to_owned(),
                            },
                            i.source,
                        ]
                    })
                    .collect(),
            );
        }
        ImageCmd::Inspect {
            name,
            json,
            profile,
        } => {
            let i: ImageInfo = c
                .get(&format!("/v1/images/{name}?profile={profile}"))
                .await?;
            if json {
                return print_json(&i);
            }
            let s = &i.summary;
            println!("image      {}", s.name);
            println!("manifest   {}", s.manifest);
            println!("export     {}", i.export);
            println!(
                "size       {} virtual, block size {}",
                human(s.virtual_size),
                human(s.block_size as u64)
            );
            println!(
                "data       {} blocks ({}), {} distinct chunks",
                i.data_blocks,
                human(i.data_blocks * s.block_size as u64),
                i.chunks
            );
            println!(
                "stored     {} ({} shared with other images)",
                human(i.stored_bytes),
                human(i.shared_bytes)
            );
            println!("block map  {} in memory", human(i.map_bytes));
            println!("local      {} of {} chunks ({}); the rest comes from peers or the origin when read", i.local_chunks, i.chunks, human(i.local_bytes));
            if let Some(c) = &i.completing {
                match (&c.waiting_for, c.retry_in_s) {
                    (Some(why), Some(s)) => println!(
                        "completing {} chunks left; waiting {s:.0} s to try again after: {why}",
                        c.chunks_left
                    ),
                    (Some(why), None) => println!(
                        "completing {} chunks left; trying again after: {why}",
                        c.chunks_left
                    ),
                    _ => println!(
                        "completing {} chunks left, in the background",
                        c.chunks_left
                    ),
                }
            }
            if let (Some(p), Some(b)) = (i.profile_blocks, i.profile_bytes) {
                println!(
                    "profile    boot reads {p} chunks ({}); cold hosts prefetch them in that order",
                    human(b)
                );
            }
            if !i.profile_order.is_empty() {
                let order: Vec<String> = i.profile_order.iter().map(u64::to_string).collect();
                println!("boot order {}", order.join(" "));
            }
            println!(
                "used by    {}",
                if i.used_by.is_empty() {
                    "-".into()
                } else {
                    i.used_by.join(", ")
                }
            );
            println!("layers     {} (bottom first)", i.layer_list.len());
            let shown = i.layer_list.len().min(20);
            for (n, l) in i.layer_list.iter().enumerate().take(shown) {
                println!(
                    "  {n:>4}  {}  {} blocks, {} chunks",
                    &l.id[..16],
                    l.blocks,
                    l.chunks
                );
            }
            if shown < i.layer_list.len() {
                println!("  ... {} more (use --json)", i.layer_list.len() - shown);
            }
        }
        ImageCmd::Export { name, file, format } => {
            let req = ExportRequest {
                path: abs(&file)?,
                format,
            };
            let s: ImageSummary =
                with_progress(c, &format!("/v1/images/{name}/export"), &req).await?;
            println!(
                "exported {} ({}) to {} as {}",
                s.name,
                human(s.virtual_size),
                req.path.display(),
                req.format
            );
        }
        ImageCmd::Pull { name, background } => {
            let r: spore_api::PullResult = with_progress(
                c,
                &format!("/v1/images/{name}/pull"),
                &spore_api::PullRequest { background },
            )
            .await?;
            let how = if r.background {
                "being fetched in the background"
            } else {
                "fetched"
            };
            println!(
                "{}: {} chunks, {} were missing and are {how}",
                r.image, r.chunks, r.missing
            );
        }
        ImageCmd::Push { name, to, force } => {
            let r: spore_api::PushResult = with_progress(
                c,
                &format!("/v1/images/{name}/push"),
                &spore_api::PushRequest { to, force },
            )
            .await?;
            println!(
                "pushed {} to {}: {} chunks, {} sent ({})",
                r.image,
                r.to,
                r.chunks,
                r.sent_chunks,
                human(r.sent_bytes)
            );
        }
        ImageCmd::Rm { name } => {
            remove(c, "image", &name).await?;
        }
    }
    Ok(())
}

async fn disk_command(cmd: DiskCmd, c: &Client) -> Result<()> {
    match cmd {
        DiskCmd::Create { name, image } => {
            let d: DiskInfo = c
                .call(
                    hyper::Method::POST,
                    "/v1/disks",
                    Some(&DiskCreate { name, image }),
                )
                .await?;
            println!(
                "created disk {} on {} ({}); NBD export {}",
                d.name,
                d.image,
                human(d.virtual_size),
                d.export
            );
        }
        DiskCmd::Commit { disk, name } => {
            let s: ImageSummary = c
                .call(
                    hyper::Method::POST,
                    &format!("/v1/disks/{disk}/commit"),
                    Some(&CommitRequest { name }),
                )
                .await?;
            println!(
                "committed disk {disk} as image {} ({} layers)",
                s.name, s.layers
            );
        }
        DiskCmd::Ls { json } => {
            let list: Vec<DiskInfo> = c.get("/v1/disks").await?;
            if json {
                return print_json(&list);
            }
            table(
                &["NAME", "IMAGE", "SIZE", "READ", "WRITTEN", "VM", "EXPORT"],
                list.into_iter()
                    .map(|d| {
                        vec![
                            d.name,
                            d.image,
                            human(d.virtual_size),
                            human(d.read_bytes),
                            human(d.written_bytes),
                            d.vm.unwrap_or_else(|| "-".into()),
                            d.export,
                        ]
                    })
                    .collect(),
            );
        }
        DiskCmd::Rm { name } => {
            remove(c, "disk", &name).await?;
        }
    }
    Ok(())
}

/// Prints the serial log from `offset`, following it if asked; returns
/// whether `until` was seen.
async fn follow_log(
    c: &Client,
    name: &str,
    follow: bool,
    until: Option<&str>,
    timeout: Duration,
) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    let mut offset = 0;
    let mut seen = String::new();
    loop {
        let log: VmLog = c
            .get(&format!("/v1/vms/{name}/log?offset={offset}"))
            .await?;
        print!("{}", log.text);
        use std::io::Write;
        std::io::stdout().flush()?;
        offset = log.next_offset;
        if let Some(pattern) = until {
            seen.push_str(&log.text);
            if seen.contains(pattern) {
                return Ok(true);
            }
            // Keep only a tail long enough to match a pattern split across reads.
            if seen.len() > 4 * pattern.len() + 4096 {
                let cut = seen.len() - 2 * pattern.len();
                let cut = (cut..seen.len())
                    .find(|&i| seen.is_char_boundary(i))
                    .unwrap_or(seen.len());
                seen.drain(..cut);
            }
        }
        let live = matches!(
            log.state,
            VmState::Starting
                | VmState::Standby
                | VmState::Running
                | VmState::Incoming
                | VmState::Stopping
        );
        if !(follow || until.is_some()) || (!live && log.text.is_empty()) {
            return Ok(false);
        }
        if Instant::now() >= deadline && until.is_some() {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn vm_command(cmd: VmCmd, c: &Client) -> Result<ExitCode> {
    match cmd {
        VmCmd::Run {
            name,
            image,
            memory,
            cpus,
            kernel,
            initrd,
            append,
            accel,
            wait_for,
            timeout,
        } => {
            let req = VmCreate {
                name: name.clone(),
                image,
                memory_mib: memory / (1 << 20),
                cpus,
                kernel: kernel.as_deref().map(abs).transpose()?,
                initrd: initrd.as_deref().map(abs).transpose()?,
                append,
                accel,
            };
            let started = Instant::now();
            let vm: VmInfo = c.call(hyper::Method::POST, "/v1/vms", Some(&req)).await?;
            eprintln!(
                "vm {} {} (pid {}, {}, {} MiB, {} cpu) in {:.2}s",
                vm.name,
                vm.state,
                vm.pid.unwrap_or(0),
                vm.accel,
                vm.memory_mib,
                vm.cpus,
                started.elapsed().as_secs_f64()
            );
            if let Some(pattern) = wait_for {
                if !follow_log(c, &name, true, Some(&pattern), Duration::from_secs(timeout)).await?
                {
                    let vm: VmInfo = c.get(&format!("/v1/vms/{name}")).await?;
                    bail!("{pattern:?} did not appear on vm {name}'s console within {timeout}s (vm is {}{})", vm.state, vm.reason.map(|r| format!(": {r}")).unwrap_or_default());
                }
                println!();
                eprintln!(
                    "vm {name}: {pattern:?} seen {:.2}s after the request",
                    started.elapsed().as_secs_f64()
                );
            }
        }
        VmCmd::Ls { json } => {
            let list: Vec<VmInfo> = c.get("/v1/vms").await?;
            if json {
                print_json(&list)?;
                return Ok(ExitCode::SUCCESS);
            }
            table(
                &[
                    "NAME", "STATE", "IMAGE", "TEMPLATE", "PID", "ACCEL", "MEMORY", "CPUS",
                    "REASON",
                ],
                list.into_iter()
                    .map(|v| {
                        vec![
                            v.name,
                            match &v.paused {
                                Some(why) => format!("paused ({why})"),
                                None => v.state.to_string(),
                            },
                            v.image,
                            v.template.unwrap_or_else(|| "-".into()),
                            v.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                            v.accel,
                            format!("{}M", v.memory_mib),
                            v.cpus.to_string(),
                            v.reason.unwrap_or_default(),
                        ]
                    })
                    .collect(),
            );
        }
        VmCmd::Stop {
            name,
            force,
            timeout,
        } => {
            let v: VmInfo = c
                .call(
                    hyper::Method::POST,
                    &format!("/v1/vms/{name}/stop?force={force}&timeout_s={timeout}"),
                    None::<&()>,
                )
                .await?;
            match &v.reason {
                Some(reason) if reason.starts_with("stopped hard") => {
                    println!("vm {} {} ({reason})", v.name, v.state)
                }
                _ => println!("vm {} {}", v.name, v.state),
            }
        }
        VmCmd::Rm {
            group: Some(group), ..
        } => crate::templates::remove_group(c, &group).await?,
        VmCmd::Rm {
            name: Some(name),
            force,
            ..
        } => {
            let _: serde_json::Value = c
                .call(
                    hyper::Method::DELETE,
                    &format!("/v1/vms/{name}?force={force}"),
                    None::<&()>,
                )
                .await?;
            println!("removed vm {name} and its disk");
        }
        VmCmd::Log {
            name,
            follow,
            until,
            timeout,
        } => {
            let found = follow_log(
                c,
                &name,
                follow,
                until.as_deref(),
                Duration::from_secs(timeout),
            )
            .await?;
            if until.is_some() && !found {
                return Ok(ExitCode::from(1));
            }
        }
        VmCmd::Rm { .. } => bail!("name a VM or a --group"),
        VmCmd::Template {
            vm,
            name,
            stop,
            json,
        } => crate::templates::template_vm(c, &vm, &name, stop, json).await?,
        VmCmd::Clone {
            template,
            count,
            prefix,
            memory,
            cpus,
            json,
        } => {
            let req = spore_api::CloneRequest {
                count,
                prefix,
                memory_mib: memory.map(|m| m >> 20),
                cpus,
            };
            return crate::templates::clone(c, &template, &req, json).await;
        }
        VmCmd::Resize { name, memory, cpus } => {
            crate::templates::resize(c, &name, memory.map(|m| m >> 20), cpus).await?
        }
        VmCmd::Send { name, words } => {
            let _: serde_json::Value = c
                .call(
                    hyper::Method::POST,
                    &format!("/v1/vms/{name}/send"),
                    Some(&spore_api::SendRequest {
                        line: words.join(" "),
                    }),
                )
                .await?;
        }
        VmCmd::Migrate(a) => {
            if !crate::migrate::run(c, a).await? {
                return Ok(ExitCode::from(1));
            }
        }
        VmCmd::Migration { name, follow, json } => {
            let info: spore_api::MigrationInfo = if follow {
                crate::migrate::follow(c, &name, json).await?
            } else {
                c.get(&format!("/v1/vms/{name}/migration")).await?
            };
            if json {
                print_json(&info)?;
            } else {
                crate::migrate::print_summary(&info);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Removes an image or disk and says what it freed.
async fn remove(c: &Client, kind: &str, name: &str) -> Result<()> {
    let r: RemoveResult = c
        .call(
            hyper::Method::DELETE,
            &format!("/v1/{kind}s/{name}"),
            None::<&()>,
        )
        .await?;
    println!(
        "removed {kind} {}: freed {} chunks ({})",
        r.removed,
        r.freed_chunks,
        human(r.freed_bytes)
    );
    Ok(())
}
