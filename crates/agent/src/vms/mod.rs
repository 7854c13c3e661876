//! VMs: QEMU processes whose disk is one of the agent's NBD exports.
//!
//! Owns: the `Vms` table of the metadata store, `DATA/vms/NAME/` (console
//! log, QMP socket, QEMU's log) and each booted VM's RAM file
//! `vm-NAME.ram` in the RAM directory; the processes themselves are in
//! [`processes::VmManager`].
//!
//! Lifecycle (an explicit state machine; other transitions are errors):
//!
//! ```text
//!   run ─► starting ──QMP up──► running ──stop──► stopping ──exit──► stopped
//!              │                   │                                   ▲
//!              └──QEMU exits───────┴──guest powers off / QEMU exits────┘
//!                  (failed when QEMU's exit status is not 0)
//! ```
//!
//! QEMU runs in a session of its own and outlives the agent: a restart
//! (SIGTERM, `spore agent stop`, a crash, kill -9, a new binary) leaves the
//! VMs running, and the next agent re-adopts them ([`Vms::recover`]): it
//! checks each recorded pid is still that VM's QEMU (command line and
//! working directory), that QMP answers, then watches its exit through a
//! pidfd and reconnects its guest channel. QEMU's NBD client holds the
//! guest's requests meanwhile and reconnects (the socket holder keeps the
//! listening socket open, so it does at once); writes acknowledged before
//! the restart read back after it, flushed or not (the overlay's pending
//! file). A VM caught half-way (starting, stopping, receiving a
//! migration's pre-copy) is stopped and its operation rolled back; a VM
//! paused by an interrupted operation is resumed. `spore agent stop --vms`
//! stops the VMs with the agent, recording why.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use spore_api::{StartTimes, VmCreate, VmInfo, VmLog, VmState};
use spore_qemu::{Accel, GuestChannel, Identity, Message, Qmp, RamFile, VmSpec, QEMU_BINARY};

use crate::disks::Disks;
use crate::error::{check_name, AgentError, Result};
use crate::exports::{Registry, DISK_PREFIX};
use crate::images::Images;
use crate::meta::{Meta, Table};
use crate::records::now;

pub mod processes;

use processes::Exit;
pub(crate) use processes::{check_growth, check_ram_room, free_bytes};
pub use processes::{
    hotplug_bounds, new_identity, Start, VmManager, VmRecord, WarmGate, MEMORY_STEP_MIB,
};

/// How often `vm stop` presses the power button of a guest that has not
/// powered off yet.
const POWERDOWN_AGAIN: Duration = Duration::from_secs(3);

/// How often the agent looks for disks whose requests failed.
const IO_ERROR_POLL: Duration = Duration::from_secs(1);
/// Free space a full disk's file system needs before its VM is resumed:
/// room for the writes QEMU retries and some to go on with, so that the
/// VM does not pause again at once.
const RESUME_FREE: u64 = 64 << 20;
/// In a VM's directory while a template capture has it paused.
pub(crate) const CAPTURE_MARK: &str = "capturing";
/// In a VM's directory while it migrates away (the migration service
/// writes it, with where to, and settles the migration after a restart).
pub(crate) const OUTGOING_MARK: &str = "migrating-out";
/// In a VM's directory while it arrives by migration (with where from).
pub(crate) const INCOMING_MARK: &str = "migrating-in";
/// How long an adopted incoming QEMU may take to answer in band: one
/// whose guest waits for a post-copy page may not answer at all.
const INCOMING_ANSWER: Duration = Duration::from_secs(2);

/// What `vm ls` says of a VM paused for want of space.
const DISK_FULL: &str = "disk full";

/// What became of a QEMU a previous agent left.
enum Adopted {
    /// It runs on under this agent.
    Kept(String),
    /// It was stopped and what it was for undone.
    Discarded(String),
}

/// SIGKILL to a QEMU that is not this agent's child, and a wait (bounded)
/// until it is gone.
fn kill_and_reap(pid: u32) {
    let pidfd = processes::pidfd_open(pid).ok();
    // SAFETY: kill sends a signal; no memory is involved.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    if let Some(fd) = pidfd {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes the one pollfd we pass.
        unsafe { libc::poll(&mut pfd, 1, 10_000) };
    }
}

fn tail(path: &Path, max: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(max).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown status".into(),
    }
}

/// The VM service: starts, watches, resizes, stops and removes VMs. It
/// calls the image service (a VM's image is resolved before its disk is
/// made) and the disk service (each VM's disk); templates and migration
/// call it to start and stop the VMs they make.
#[derive(Debug)]
pub struct Vms {
    meta: Arc<Meta>,
    images: Arc<Images>,
    disks: Arc<Disks>,
    exports: Arc<Registry>,
    accel: Accel,
    nbd_socket: PathBuf,
    /// The QEMU processes, their guest channels and directories.
    pub(crate) procs: VmManager,
}

impl Vms {
    pub(crate) fn new(
        meta: Arc<Meta>,
        images: Arc<Images>,
        disks: Arc<Disks>,
        exports: Arc<Registry>,
        accel: Accel,
        nbd_socket: PathBuf,
        procs: VmManager,
    ) -> Self {
        Vms {
            meta,
            images,
            disks,
            exports,
            accel,
            nbd_socket,
            procs,
        }
    }

    /// The accelerator VMs get unless they ask for another.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// Sends a message to a running VM over its guest channel.
    pub fn send(&self, name: &str, msg: &Message) -> Result<()> {
        self.procs.send(name, msg)
    }

    /// Takes over the VMs a previous agent left: a QEMU that still runs
    /// its VM (running, or a standby) is adopted, so the VM goes on; one
    /// caught half-way (starting, stopping, receiving a migration's
    /// pre-copy) is stopped and its operation rolled back; a VM whose QEMU
    /// is gone is recorded as stopped. Returns what it did, one line each.
    pub(crate) fn recover(self: &Arc<Self>) -> Result<Vec<String>> {
        let mut report = Vec::new();
        let mut running = std::collections::HashSet::new();
        for (name, rec) in self.meta.list::<VmRecord>(Table::Vms)? {
            if matches!(rec.state, VmState::Stopped | VmState::Failed) {
                continue;
            }
            let pid = self.procs.left_running(&name, rec.pid);
            let line = match (pid, rec.state) {
                (None, _) => self.settle_left(
                    &name,
                    VmState::Stopped,
                    "its QEMU exited while no agent ran",
                )?,
                (Some(pid), VmState::Running | VmState::Standby | VmState::Incoming) => {
                    match self.adopt(&name, pid, &rec) {
                        Ok(Adopted::Kept(line)) => {
                            running.insert(name.clone());
                            line
                        }
                        Ok(Adopted::Discarded(line)) => line,
                        Err(e) => {
                            kill_and_reap(pid);
                            self.settle_left(
                                &name,
                                VmState::Failed,
                                &format!(
                                    "the agent restarted and could not take its QEMU over: {}",
                                    e.chain()
                                ),
                            )?
                        }
                    }
                }
                (Some(pid), VmState::Stopping) => {
                    kill_and_reap(pid);
                    self.settle_left(
                        &name,
                        VmState::Stopped,
                        "stopped on request (the stop was finished by the next agent)",
                    )?
                }
                (Some(pid), _) => {
                    kill_and_reap(pid);
                    self.settle_left(
                        &name,
                        VmState::Failed,
                        "the agent stopped while the VM was starting; the start was rolled back",
                    )?
                }
            };
            tracing::warn!(vm = %name, "{line}");
            report.push(line);
        }
        report.extend(self.procs.sweep_ram_dir(&running));
        Ok(report)
    }

    /// Records how a VM a previous agent left ended; returns the line for
    /// the start's report.
    fn settle_left(&self, name: &str, state: VmState, reason: &str) -> Result<String> {
        self.set_vm_state(name, |r| {
            r.state = state;
            r.pid = None;
            r.reason = Some(reason.to_owned());
        })?;
        Ok(format!("vm {name}: {state} ({reason})"))
    }

    /// Takes over one QEMU a previous agent left: checks it answers QMP,
    /// watches its exit through a pidfd and reconnects its guest channel.
    fn adopt(self: &Arc<Self>, name: &str, pid: u32, rec: &VmRecord) -> Result<Adopted> {
        if rec.state == VmState::Incoming {
            return self.adopt_incoming(name, pid);
        }
        let dir = self.procs.dir(name);
        let qmp_err = |e: spore_qemu::QmpError| AgentError::State(format!("QMP: {e}"));
        let mut qmp =
            Qmp::connect(&dir.join("qmp.sock"), Duration::from_secs(5)).map_err(qmp_err)?;
        let mut status = qmp.status().map_err(qmp_err)?;
        self.no_memfs(pid)?;
        let mut note = String::new();
        let capture_cut = dir.join(CAPTURE_MARK).exists();
        let migrating = dir.join(OUTGOING_MARK).exists();
        if capture_cut {
            // The capture is rolled back: its device-state-only setting
            // goes with it, so the VM migrates like any other.
            qmp.set_ignore_shared(false).map_err(qmp_err)?;
        }
        match (rec.state, status.as_str()) {
            // Paused or stopped by its migration, which the migration
            // service settles next: resumed here only if the guest does
            // not run at the destination.
            (VmState::Running, _) if migrating => {
                note = "; it was migrating away: the migration is settled next".into();
            }
            // Paused by an operation of the previous agent (a capture, a
            // commit) that the restart cut short: that operation is rolled
            // back, so the guest runs again.
            (VmState::Running, "paused") => {
                qmp.execute("cont", None).map_err(qmp_err)?;
                status = "running".into();
                note = "; it was paused by an operation the restart interrupted, and was resumed"
                    .into();
            }
            // Its state saved to a file by a capture the restart cut short
            // (the capture is rolled back): it runs on.
            (VmState::Running, "postmigrate") if capture_cut => {
                qmp.execute("cont", None).map_err(qmp_err)?;
                status = "running".into();
                note = "; it was paused by a template capture the restart interrupted, and was \
                        resumed"
                    .into();
            }
            (VmState::Running, "postmigrate") => {
                note = "; QEMU says its migration completed: the VM runs on the destination, \
                        and this paused copy is kept for you to check and remove"
                    .into();
            }
            _ => {}
        }
        drop(qmp);
        let _ = fs::remove_file(dir.join(CAPTURE_MARK));
        self.take_over(name, pid)?;
        Ok(Adopted::Kept(format!(
            "vm {name}: kept {} across the agent restart (QEMU pid {pid}, {status}){note}",
            if rec.state == VmState::Standby {
                "as a standby"
            } else {
                "running"
            }
        )))
    }

    /// Takes over a QEMU that was receiving a migration. Its stream had not
    /// all arrived (`inmigrate`): the source still runs the VM, and its
    /// migration failed with the previous agent's relay, so this copy is
    /// removed. The guest runs here: this copy is the VM, and if part of
    /// its memory is still at the source (a post-copy), the VM stays
    /// incoming and the migration service takes the migration over, so the
    /// source can resume it. Only short in-band waits: a post-copy
    /// destination whose guest touched a page that did not come answers
    /// nothing in band until the migration resumes.
    fn adopt_incoming(self: &Arc<Self>, name: &str, pid: u32) -> Result<Adopted> {
        let dir = self.procs.dir(name);
        let qmp_err = |e: spore_qemu::QmpError| AgentError::State(format!("QMP: {e}"));
        let mut qmp =
            Qmp::connect_oob(&dir.join("qmp.sock"), Duration::from_secs(5)).map_err(qmp_err)?;
        qmp.set_timeout(INCOMING_ANSWER).map_err(qmp_err)?;
        // No answer: blocked on a page, so the guest runs here.
        let status = qmp.status().ok();
        if status.as_deref() == Some("inmigrate") {
            kill_and_reap(pid);
            self.remove_vm(name, true)?;
            return Ok(Adopted::Discarded(format!(
                "vm {name}: an incoming migration was interrupted by the agent restart before \
                 the guest ran here; what it made here was removed (the source keeps the VM)"
            )));
        }
        self.no_memfs(pid)?;
        let arrived = status.is_some()
            && qmp
                .migration_progress()
                .is_ok_and(|p| p.status == "completed");
        drop(qmp);
        self.take_over(name, pid)?;
        let status = status.unwrap_or_else(|| "not answering: waiting for a page".into());
        if !arrived {
            return Ok(Adopted::Kept(format!(
                "vm {name}: kept running across the agent restart (QEMU pid {pid}, {status}); \
                 it was arriving by a post-copy migration, which goes on when its source \
                 resumes it"
            )));
        }
        self.set_vm_state(name, |r| {
            r.state = VmState::Running;
            r.reason = Some(
                "arrived by a live migration that an agent restart interrupted after the \
                 guest started here"
                    .into(),
            );
        })?;
        let _ = fs::remove_file(dir.join(INCOMING_MARK));
        Ok(Adopted::Kept(format!(
            "vm {name}: kept running across the agent restart (QEMU pid {pid}, {status}); it \
             arrived by a migration the restart interrupted"
        )))
    }

    /// A QEMU whose template RAM the previous agent served cannot be kept.
    fn no_memfs(&self, pid: u32) -> Result<()> {
        if self.procs.maps_memfs(pid) {
            return Err(AgentError::State(
                "its template's RAM was being paged in from another host by the previous agent \
                 (spore-memfs), which no other agent can serve"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Watches a QEMU a previous agent left (its exit, through a pidfd)
    /// and reconnects its guest channel.
    fn take_over(self: &Arc<Self>, name: &str, pid: u32) -> Result<()> {
        let dir = self.procs.dir(name);
        let log_from = fs::metadata(dir.join("qemu.log")).map_or(0, |m| m.len());
        let pidfd = processes::pidfd_open(pid).map_err(AgentError::io("opening a pidfd"))?;
        let own_ram = Some(self.procs.ram_file(name)).filter(|f| f.exists());
        self.watch(
            name,
            pid,
            Arc::new(Exit::default()),
            processes::Waiter::Adopted { pidfd, log_from },
            own_ram,
        )?;
        match GuestChannel::connect(&dir.join("channel.sock"), Duration::from_secs(5)) {
            Ok(ch) => {
                self.procs.channels.lock().insert(name.to_owned(), ch);
            }
            Err(e) => {
                tracing::warn!(vm = name, error = %e, "reconnecting the guest channel failed")
            }
        }
        Ok(())
    }

    /// `disk commit` as users call it: a disk whose VM is running is
    /// committed with the VM paused (QEMU drains and flushes its requests
    /// when it stops), so the layer is the crash-consistent state of one
    /// moment, and resumed afterwards.
    pub fn commit_disk_of_vm(
        &self,
        name: &str,
        new_image: &str,
    ) -> Result<spore_api::ImageSummary> {
        let rec = self.disks.disk_record(name)?;
        let Some(vm) = rec.vm.filter(|vm| self.running_vm(vm).is_some()) else {
            return self.disks.commit_disk(name, new_image);
        };
        let qmp_err = |e: spore_qemu::QmpError| AgentError::State(format!("vm {vm}: {e}"));
        let mut qmp = spore_qemu::Qmp::connect(
            &self.procs.dir(&vm).join("qmp.sock"),
            std::time::Duration::from_secs(5),
        )
        .map_err(qmp_err)?;
        let was_running = qmp.status().map_err(qmp_err)? == "running";
        if was_running {
            qmp.execute("stop", None).map_err(qmp_err)?;
            tracing::info!(disk = name, vm = %vm, "vm paused for the commit of its disk");
        }
        let result = self.disks.commit_disk(name, new_image);
        if was_running {
            if let Err(e) = qmp.execute("cont", None) {
                tracing::error!(vm = %vm, error = %e, "resuming the vm after committing its disk failed");
                return Err(qmp_err(e));
            }
        }
        result
    }

    pub fn vm_record(&self, name: &str) -> Result<VmRecord> {
        self.meta
            .get(Table::Vms, name)?
            .ok_or_else(|| AgentError::NotFound {
                kind: "vm",
                name: name.into(),
            })
    }

    pub(crate) fn vm_info(&self, name: &str, rec: &VmRecord) -> VmInfo {
        let dir = self.procs.dir(name);
        VmInfo {
            name: name.to_owned(),
            image: rec.image.clone(),
            disk: rec.disk.clone(),
            state: rec.state,
            pid: rec.pid,
            accel: rec.accel.clone(),
            memory_mib: rec.memory_mib,
            cpus: rec.cpus,
            created: rec.created,
            reason: rec.reason.clone(),
            qmp_socket: dir.join("qmp.sock"),
            serial_log: dir.join("serial.log"),
            template: rec.template.clone(),
            group: rec.group.clone(),
            hostname: rec.identity.as_ref().map(|i| i.hostname.clone()),
            instance_id: rec.identity.as_ref().map(|i| i.instance_id.clone()),
            mac: rec.identity.as_ref().map(|i| i.mac.clone()),
            vmgenid: rec.identity.as_ref().map(|i| i.vmgenid.clone()),
            start_ms: self.procs.start_times.lock().get(name).cloned(),
            paused: (rec.state == VmState::Running
                && self.exports.disk(&rec.disk).is_some_and(|d| d.is_full()))
            .then(|| DISK_FULL.into()),
        }
    }

    /// A fresh identity whose MAC no other VM of this agent has.
    pub(crate) fn unique_identity(&self, hostname: &str) -> Result<Identity> {
        let macs: std::collections::HashSet<String> = self
            .meta
            .list::<VmRecord>(Table::Vms)?
            .into_iter()
            .filter_map(|(_, r)| r.identity.map(|i| i.mac))
            .collect();
        loop {
            let id = new_identity(hostname);
            if !macs.contains(&id.mac) {
                return Ok(id);
            }
        }
    }

    pub(crate) fn set_vm_state(
        &self,
        name: &str,
        f: impl FnOnce(&mut VmRecord),
    ) -> Result<VmRecord> {
        let _serial = self.procs.transitions.lock();
        let mut rec = self.vm_record(name)?;
        f(&mut rec);
        self.meta.put(Table::Vms, name, &rec)?;
        Ok(rec)
    }

    pub fn run_vm(self: &Arc<Self>, req: &VmCreate) -> Result<VmInfo> {
        let t0 = Instant::now();
        check_name("vm", &req.name)?;
        let accel = match &req.accel {
            Some(a) => a.parse::<Accel>().map_err(AgentError::Invalid)?,
            None => self.accel,
        };
        if req.memory_mib < 16 || req.cpus == 0 || req.cpus > 64 {
            return Err(AgentError::Invalid(
                "memory must be at least 16 MiB and cpus between 1 and 64".into(),
            ));
        }
        for (what, path) in [("kernel", &req.kernel), ("initrd", &req.initrd)] {
            if let Some(p) = path {
                if !p.is_absolute() || !p.is_file() {
                    return Err(AgentError::Invalid(format!(
                        "{what} {} is not an absolute path to a file",
                        p.display()
                    )));
                }
            }
        }
        self.images.resolve_image(&req.image)?;
        // Refused before anything of the VM is made (checked again at the
        // start, which other VMs may have raced).
        self.admit_ram(&req.name, req.memory_mib * 1024)?;
        let (max_memory_mib, max_cpus) = hotplug_bounds(req.memory_mib, req.cpus);
        let rec = VmRecord {
            image: req.image.clone(),
            disk: req.name.clone(),
            state: VmState::Starting,
            pid: None,
            accel: accel.to_string(),
            memory_mib: req.memory_mib,
            cpus: req.cpus,
            kernel: req.kernel.clone(),
            initrd: req.initrd.clone(),
            append: req.append.clone(),
            created: now(),
            reason: None,
            max_memory_mib,
            max_cpus,
            template: None,
            group: None,
            identity: Some(self.unique_identity(&req.name)?),
            dimms: 0,
            standby: false,
        };
        if !self.meta.insert_new(Table::Vms, &req.name, &rec)? {
            return Err(AgentError::Exists {
                kind: "vm",
                name: req.name.clone(),
            });
        }
        let result = self
            .disks
            .create_disk(&req.name, &req.image, Some(&req.name))
            .and_then(|_| self.start_vm(&req.name, rec, Start::Boot, t0));
        if let Err(e) = &result {
            self.settle_failed_start(&req.name, e);
        }
        result
    }

    /// The RAM directory, made on first use, for root's eyes only (it holds
    /// guest memory).
    fn make_ram_dir(&self) -> Result<()> {
        fs::create_dir_all(self.procs.ram_dir()).map_err(AgentError::io(format!(
            "creating RAM directory {}",
            self.procs.ram_dir().display()
        )))?;
        let _ = fs::set_permissions(
            self.procs.ram_dir(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        );
        Ok(())
    }

    /// Fails unless the RAM directory can promise VM `name` its `ram_kib`:
    /// a RAM file in a tmpfs that cannot hold it is a SIGBUS in the guest
    /// the first time it touches the missing page.
    fn admit_ram(&self, name: &str, ram_kib: u64) -> Result<()> {
        self.make_ram_dir()?;
        check_ram_room(self.procs.ram_dir(), ram_kib, &self.procs.ram_file(name))
    }

    /// After a failed start: without a disk nothing of the VM remains;
    /// with one, the record says why it failed and the disk is kept.
    pub(crate) fn settle_failed_start(&self, name: &str, e: &AgentError) {
        tracing::error!(vm = %name, error = %e.chain(), "VM failed to start");
        if self.exports.disk(name).is_none() {
            let _ = self.meta.remove(Table::Vms, name);
        } else if !self.procs.running.lock().contains_key(name) {
            let reason = e.chain();
            let _ = self.set_vm_state(name, |r| {
                if matches!(r.state, VmState::Starting | VmState::Running) {
                    r.state = VmState::Failed;
                    r.pid = None;
                    r.reason = Some(reason);
                }
            });
        }
    }

    /// The QEMU process and exit signal of a running VM.
    pub(crate) fn running_vm(&self, name: &str) -> Option<(u32, Arc<Exit>)> {
        self.procs
            .running
            .lock()
            .get(name)
            .map(|(p, e, _)| (*p, e.clone()))
    }

    /// Moves a running VM's runtime state (process, channel, directory) to
    /// a new name. The records are the caller's business.
    pub(crate) fn rename_running(&self, from: &str, to: &str) -> Result<()> {
        let dir = self.procs.dir(to);
        if dir.exists() {
            let _ = fs::remove_dir_all(&dir);
        }
        fs::rename(self.procs.dir(from), &dir).map_err(AgentError::io(format!(
            "renaming the directory of vm {from}"
        )))?;
        let mut running = self.procs.running.lock();
        let entry = running
            .remove(from)
            .ok_or_else(|| AgentError::State(format!("vm {from} is not running")))?;
        *entry.2.lock() = to.to_owned();
        running.insert(to.to_owned(), entry);
        drop(running);
        let mut channels = self.procs.channels.lock();
        if let Some(ch) = channels.remove(from) {
            channels.insert(to.to_owned(), ch);
        }
        Ok(())
    }

    /// Starts QEMU for a VM whose record and disk exist: boots it, or
    /// resumes it from a template. Returns once the guest runs.
    pub(crate) fn start_vm(
        self: &Arc<Self>,
        name: &str,
        rec: VmRecord,
        start: Start,
        t0: Instant,
    ) -> Result<VmInfo> {
        let mut times = StartTimes {
            disk: t0.elapsed().as_secs_f64() * 1e3,
            ..Default::default()
        };
        let dir = self.procs.dir(name);
        match &start {
            // A fresh VM: whatever is there is debris.
            Start::Boot | Start::Incoming { .. } => {
                let _ = fs::remove_dir_all(&dir);
            }
            // The same VM again (a source resumed from its template): its
            // console log goes on, the old sockets go.
            Start::Resume { .. } => {
                let _ = fs::remove_file(dir.join("qmp.sock"));
                let _ = fs::remove_file(dir.join("channel.sock"));
            }
        }
        fs::create_dir_all(&dir).map_err(AgentError::io(format!("creating {}", dir.display())))?;
        let accel: spore_qemu::Accel = rec.accel.parse().map_err(AgentError::Invalid)?;
        let (ram, memory_mib, ram_kib, cpus) = match &start {
            Start::Boot => (
                RamFile {
                    path: self.procs.ram_file(name),
                    shared: true,
                    readonly: false,
                },
                rec.memory_mib,
                spore_qemu::cmdline::ram_kib(rec.memory_mib, accel),
                rec.cpus,
            ),
            Start::Incoming { layout, .. } => (
                RamFile {
                    path: self.procs.ram_file(name),
                    shared: true,
                    readonly: false,
                },
                layout.base_mib,
                layout.base_kib,
                layout.boot_cpus,
            ),
            Start::Resume {
                ram,
                memory_mib,
                ram_kib,
                cpus,
                ..
            } => {
                (
                    RamFile {
                        path: ram.clone(),
                        shared: false,
                        // QEMU 7.2's readonly=on would make the guest's RAM
                        // read-only; the FUSE file takes O_RDWR opens instead.
                        readonly: false,
                    },
                    *memory_mib,
                    *ram_kib,
                    *cpus,
                )
            }
        };
        let identity = rec.identity.clone();
        let spec = VmSpec {
            name: name.to_owned(),
            accel,
            memory_mib,
            ram_kib: Some(ram_kib),
            max_memory_mib: rec.max_memory_mib,
            cpus,
            max_cpus: rec.max_cpus,
            ram: Some(ram),
            mac: identity.as_ref().map(|i| i.mac.clone()),
            vmgenid: identity.as_ref().map(|i| i.vmgenid.clone()),
            channel_socket: Some(dir.join("channel.sock")),
            incoming: match start {
                Start::Boot => None,
                Start::Resume { .. } => Some(spore_qemu::Incoming::Paused),
                Start::Incoming { .. } => Some(spore_qemu::Incoming::Running),
            },
            kernel: rec.kernel.clone(),
            initrd: rec.initrd.clone(),
            append: rec.append.clone(),
            nbd_socket: self.nbd_socket.clone(),
            export: format!("{DISK_PREFIX}{}", rec.disk),
            qmp_socket: dir.join("qmp.sock"),
            run_dir: Some(dir.clone()),
            serial_log: dir.join("serial.log"),
        };
        if matches!(start, Start::Boot | Start::Incoming { .. }) {
            self.admit_ram(name, ram_kib)?;
        } else {
            self.make_ram_dir()?;
        }
        let qemu_log = dir.join("qemu.log");
        let log = File::create(&qemu_log).map_err(AgentError::io("creating qemu.log"))?;
        let mut cmd = Command::new(QEMU_BINARY);
        cmd.args(spec.args())
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(AgentError::io("qemu.log"))?)
            .stderr(log);
        // Its own session: QEMU outlives the agent (a restart re-adopts
        // it), and neither a Ctrl-C meant for the agent nor the end of its
        // terminal reaches the VM behind the agent's back.
        // SAFETY: setsid is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => AgentError::State(format!(
                "{QEMU_BINARY} is not installed (apt-get install qemu-system-x86 qemu-utils)"
            )),
            _ => AgentError::Io {
                context: format!("starting {QEMU_BINARY}"),
                source: e,
            },
        })?;
        let pid = child.id();
        let exit = Arc::new(Exit::default());
        let own_ram = matches!(start, Start::Boot | Start::Incoming { .. })
            .then(|| self.procs.ram_file(name));
        self.set_vm_state(name, |r| {
            r.pid = Some(pid);
            r.state = VmState::Starting;
            r.reason = None;
        })?;
        self.watch(
            name,
            pid,
            exit.clone(),
            processes::Waiter::Child(child),
            own_ram,
        )?;
        let started = self.bring_up(name, &rec, &spec, &start, &mut times, t0);
        match started {
            Ok(()) => {
                let hold = matches!(start, Start::Resume { hold: true, .. });
                times.total = t0.elapsed().as_secs_f64() * 1e3;
                tracing::info!(
                    vm = name,
                    pid,
                    total_ms = times.total,
                    standby = hold,
                    "VM running"
                );
                self.procs.start_times.lock().insert(name.to_owned(), times);
                let incoming = matches!(start, Start::Incoming { .. });
                let rec = self.set_vm_state(name, |r| {
                    if r.state == VmState::Starting {
                        r.state = if hold {
                            VmState::Standby
                        } else if incoming {
                            VmState::Incoming
                        } else {
                            VmState::Running
                        };
                    }
                })?;
                Ok(self.vm_info(name, &rec))
            }
            Err(e) => {
                // SAFETY: kill sends a signal; no memory is involved.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                exit.wait(Duration::from_secs(10));
                Err(AgentError::State(format!(
                    "QEMU did not come up ({}): {}",
                    e.chain(),
                    tail(&qemu_log, 5)
                )))
            }
        }
    }

    /// Keeps a VM's QEMU in the running set and, on a thread of its own,
    /// waits for it to exit: then the VM leaves the running set, its own
    /// RAM file goes, and its record says how it ended.
    pub(crate) fn watch(
        self: &Arc<Self>,
        name: &str,
        pid: u32,
        exit: Arc<Exit>,
        waiter: processes::Waiter,
        own_ram: Option<PathBuf>,
    ) -> Result<()> {
        let cell = Arc::new(Mutex::new(name.to_owned()));
        self.procs
            .running
            .lock()
            .insert(name.to_owned(), (pid, exit.clone(), cell.clone()));
        let vms = self.clone();
        std::thread::Builder::new()
            .name(format!("vm-{name}"))
            .spawn(move || {
                let ended = waiter.wait();
                let vm = cell.lock().clone();
                vms.procs.running.lock().remove(&vm);
                vms.procs.channels.lock().remove(&vm);
                // A booted VM's RAM dies with it (unless a template took
                // the file over, in which case it is gone from here).
                if let Some(ram) = own_ram {
                    let _ = fs::remove_file(ram);
                }
                let qemu_log = vms.procs.dir(&vm).join("qemu.log");
                let outcome = vms.set_vm_state(&vm, |r| {
                    r.pid = None;
                    let (state, reason) = match (&ended, r.state) {
                        (_, VmState::Stopping) => {
                            (VmState::Stopped, "stopped on request".to_owned())
                        }
                        (processes::Ended::Status(Ok(s)), _) if s.success() => {
                            (VmState::Stopped, "the guest shut down".to_owned())
                        }
                        (processes::Ended::Status(Ok(s)), _) => (
                            VmState::Failed,
                            format!(
                                "QEMU exited with {}: {}",
                                describe_exit(*s),
                                tail(&qemu_log, 3)
                            ),
                        ),
                        (processes::Ended::Status(Err(e)), _) => {
                            (VmState::Failed, format!("waiting for QEMU failed: {e}"))
                        }
                        // Not this agent's child: its status went to whoever
                        // reaps it. QEMU says why it stopped in its log when
                        // it was not a guest power-off.
                        (processes::Ended::Unknown { log_from }, _) => {
                            let said = processes::log_since(&qemu_log, *log_from);
                            if said.is_empty() {
                                (
                                    VmState::Stopped,
                                    "the guest shut down (QEMU exited without an error; \
                                     it was adopted after an agent restart)"
                                        .to_owned(),
                                )
                            } else {
                                (VmState::Failed, format!("QEMU exited: {said}"))
                            }
                        }
                    };
                    r.state = state;
                    r.reason = Some(reason);
                });
                if let Ok(rec) = outcome {
                    tracing::info!(vm = %vm, state = %rec.state, reason = ?rec.reason, "VM ended");
                }
                *exit.status.lock() = Some(match ended {
                    processes::Ended::Status(Ok(s)) => s,
                    _ => ExitStatus::from_raw(0),
                });
                exit.done.notify_all();
            })
            .map_err(AgentError::io("starting the VM monitor thread"))?;
        Ok(())
    }

    /// QMP up; for a clone: state loaded, memory and CPUs added, resumed;
    /// then the guest channel connected and the identity sent.
    fn bring_up(
        &self,
        name: &str,
        rec: &VmRecord,
        spec: &VmSpec,
        start: &Start,
        times: &mut StartTimes,
        t0: Instant,
    ) -> Result<()> {
        let qmp_err = |e: spore_qemu::QmpError| AgentError::State(e.to_string());
        let mut qmp = Qmp::connect(&spec.qmp_socket, Duration::from_secs(20)).map_err(qmp_err)?;
        times.qemu = t0.elapsed().as_secs_f64() * 1e3 - times.disk;
        let sock = spec
            .channel_socket
            .as_ref()
            .expect("every VM has a channel");
        if let Start::Incoming {
            layout,
            postcopy,
            preempt,
            listen,
        } = start
        {
            for (id, mib) in &layout.dimms {
                qmp.add_memory(id, *mib).map_err(qmp_err)?;
            }
            if layout.cpus > layout.boot_cpus {
                qmp.add_cpus(layout.cpus).map_err(qmp_err)?;
            }
            let mut caps = vec![("postcopy-ram", *postcopy)];
            if *preempt {
                caps.push(("postcopy-preempt", true));
            }
            qmp.set_capabilities(&caps).map_err(qmp_err)?;
            qmp.migrate_incoming(listen).map_err(qmp_err)?;
            let channel = GuestChannel::connect(sock, Duration::from_secs(5)).map_err(qmp_err)?;
            self.procs.channels.lock().insert(name.to_owned(), channel);
            return Ok(());
        }
        if let Start::Resume {
            state,
            memory_mib,
            cpus,
            hold,
            warm,
            ..
        } = start
        {
            let t = Instant::now();
            qmp.load_state(state, Duration::from_secs(30))
                .map_err(qmp_err)?;
            times.load = t.elapsed().as_secs_f64() * 1e3;
            let channel = GuestChannel::connect(sock, Duration::from_secs(5)).map_err(qmp_err)?;
            self.procs.channels.lock().insert(name.to_owned(), channel);
            if *hold {
                return Ok(());
            }
            if let Some(gate) = warm {
                gate.wait();
            }
            self.finish_resume(name, rec, &mut qmp, *memory_mib, *cpus, times)
        } else {
            qmp.status().map_err(qmp_err)?;
            let mut channel =
                GuestChannel::connect(sock, Duration::from_secs(5)).map_err(qmp_err)?;
            if let Some(id) = &rec.identity {
                channel
                    .send(&Message::Identity(id.clone()))
                    .map_err(qmp_err)?;
            }
            self.procs.channels.lock().insert(name.to_owned(), channel);
            Ok(())
        }
    }

    /// The end of a clone's start (also of a standby handed out): grow to
    /// the record's memory and CPUs, `cont`, send the identity.
    pub(crate) fn finish_resume(
        &self,
        name: &str,
        rec: &VmRecord,
        qmp: &mut Qmp,
        memory_mib: u64,
        cpus: u32,
        times: &mut StartTimes,
    ) -> Result<()> {
        let qmp_err = |e: spore_qemu::QmpError| AgentError::State(e.to_string());
        let t = Instant::now();
        let mut dimm = 0;
        let mut have = memory_mib;
        while have < rec.memory_mib {
            dimm += 1;
            let add = rec.memory_mib - have;
            qmp.add_memory(&format!("dimm{dimm}"), add)
                .map_err(qmp_err)?;
            have += add;
        }
        if rec.cpus > cpus {
            qmp.add_cpus(rec.cpus).map_err(qmp_err)?;
        }
        times.resize = t.elapsed().as_secs_f64() * 1e3;
        qmp.execute("cont", None).map_err(qmp_err)?;
        if dimm > 0 {
            self.set_vm_state(name, |r| r.dimms = dimm)?;
        }
        if let Some(id) = &rec.identity {
            self.procs.send(name, &Message::Identity(id.clone()))?;
        }
        if rec.cpus > cpus {
            self.procs
                .send(name, &Message::Resources { cpus: rec.cpus })?;
        }
        Ok(())
    }

    /// Records how a VM's start went (for `vm ls --json`).
    pub(crate) fn set_start_times(&self, name: &str, times: StartTimes) {
        self.procs.start_times.lock().insert(name.to_owned(), times);
    }

    /// Grows a running VM: hot-plugs memory (a DIMM) and CPUs, then tells
    /// the guest to bring them online.
    pub fn resize_vm(
        &self,
        name: &str,
        memory_mib: Option<u64>,
        cpus: Option<u32>,
    ) -> Result<VmInfo> {
        let rec = self.vm_record(name)?;
        if rec.state != VmState::Running {
            return Err(AgentError::State(format!(
                "vm {name} is {}, not running",
                rec.state
            )));
        }
        let memory = memory_mib.unwrap_or(rec.memory_mib);
        let cpus = cpus.unwrap_or(rec.cpus);
        check_growth(&rec, memory, cpus)?;
        let qmp_err = |e: spore_qemu::QmpError| AgentError::State(e.to_string());
        let mut qmp = Qmp::connect(
            &self.procs.dir(name).join("qmp.sock"),
            Duration::from_secs(5),
        )
        .map_err(qmp_err)?;
        let mut dimms = rec.dimms;
        if memory > rec.memory_mib {
            dimms += 1;
            qmp.add_memory(&format!("dimm{dimms}"), memory - rec.memory_mib)
                .map_err(qmp_err)?;
        }
        if cpus > rec.cpus {
            qmp.add_cpus(cpus).map_err(qmp_err)?;
        }
        let rec = self.set_vm_state(name, |r| {
            r.memory_mib = memory;
            r.cpus = cpus;
            r.dimms = dimms;
        })?;
        self.procs.send(name, &Message::Resources { cpus })?;
        tracing::info!(vm = name, memory_mib = memory, cpus, "resized");
        Ok(self.vm_info(name, &rec))
    }

    pub fn list_vms(&self) -> Result<Vec<VmInfo>> {
        Ok(self
            .meta
            .list::<VmRecord>(Table::Vms)?
            .iter()
            .map(|(n, r)| self.vm_info(n, r))
            .collect())
    }

    pub fn get_vm(&self, name: &str) -> Result<VmInfo> {
        let rec = self.vm_record(name)?;
        Ok(self.vm_info(name, &rec))
    }

    /// Resumes VMs that QEMU paused because a disk request failed
    /// (`werror=stop`/`rerror=stop`): for want of image data, once the data
    /// is here; for want of space for the overlay (a full disk), once its
    /// file system has [`RESUME_FREE`] bytes free. QEMU then retries the
    /// requests. Runs for the agent's life.
    pub fn watch_io_errors(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("io-errors".into())
            .spawn(move || loop {
                std::thread::sleep(IO_ERROR_POLL);
                let Some(vms) = weak.upgrade() else { return };
                vms.resume_after_io_errors();
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the I/O error watcher");
        }
    }

    fn resume_after_io_errors(&self) {
        for (disk_name, disk) in self.exports.disks() {
            let why = if disk.is_full() {
                let dir = self.disks.dir(&disk_name);
                match free_bytes(&dir) {
                    Ok(free) if free >= RESUME_FREE => {}
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::debug!(disk = %disk_name, error = %e.chain(), "free space unknown");
                        continue;
                    }
                }
                disk.clear_full();
                "space was freed"
            } else if disk.has_failed() {
                if let Err(e) = disk.retry_failed() {
                    tracing::debug!(disk = %disk_name, error = %e, "image data a request needs is still unavailable");
                    continue;
                }
                "the image data arrived"
            } else {
                continue;
            };
            let Some(vm) = self.disks.disk_record(&disk_name).ok().and_then(|r| r.vm) else {
                continue;
            };
            if self.running_vm(&vm).is_none() {
                continue;
            }
            let qmp = self.procs.dir(&vm).join("qmp.sock");
            let resumed = Qmp::connect(&qmp, Duration::from_secs(2)).and_then(|mut q| {
                // QEMU pauses as the failure reaches it, which is before
                // the data could have come; look a few times all the same.
                for _ in 0..5 {
                    if q.status()? == "io-error" {
                        q.execute("cont", None)?;
                        return Ok(true);
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Ok(false)
            });
            match resumed {
                Ok(true) => {
                    tracing::info!(vm = %vm, disk = %disk_name, "{why}; VM resumed after its I/O pause")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(vm = %vm, error = %e, "resuming a VM paused on an I/O error failed")
                }
            }
        }
    }

    /// Stops a VM the way `virsh shutdown` does: the guest is asked over
    /// ACPI (the power button, which every distribution guest handles) and
    /// given `timeout` to power off, so its file systems are clean; only
    /// then, or at once with `force` (`virsh destroy`), QEMU is stopped.
    pub fn shutdown_vm(&self, name: &str, force: bool, timeout: Duration) -> Result<VmInfo> {
        if force {
            return self.stop_vm(name);
        }
        self.vm_record(name)?;
        let Some((_, exit)) = self.running_vm(name) else {
            return self.stop_vm(name);
        };
        let qmp = self.procs.dir(name).join("qmp.sock");
        let press = || {
            Qmp::connect(&qmp, Duration::from_secs(2))
                .and_then(|mut q| q.execute("system_powerdown", None))
        };
        match press() {
            Ok(_) => {
                self.set_vm_state(name, |r| r.state = VmState::Stopping)?;
                // A guest that is still booting may not listen to the
                // button yet (and a press nobody hears is lost): press it
                // again now and then, as a person would.
                let until = Instant::now() + timeout;
                loop {
                    let left = until.saturating_duration_since(Instant::now());
                    if exit.wait(left.min(POWERDOWN_AGAIN)) {
                        tracing::info!(vm = name, "the guest powered off");
                        return self.get_vm(name);
                    }
                    if left <= POWERDOWN_AGAIN {
                        break;
                    }
                    let _ = press();
                }
                tracing::warn!(
                    vm = name,
                    seconds = timeout.as_secs_f64(),
                    "the guest did not power off in time; stopping QEMU"
                );
            }
            Err(e) => {
                tracing::warn!(vm = name, error = %e, "asking the guest to power off failed; stopping QEMU")
            }
        }
        let info = self.stop_vm(name)?;
        let _ = self.set_vm_state(name, |r| {
            r.reason = Some(format!(
                "stopped hard: the guest did not power off within {} s of the ACPI request",
                timeout.as_secs()
            ))
        });
        self.get_vm(name).or(Ok(info))
    }

    /// Stops QEMU at once (a power cut for the guest).
    pub fn stop_vm(&self, name: &str) -> Result<VmInfo> {
        let rec = self.vm_record(name)?;
        let Some((pid, exit)) = self.running_vm(name) else {
            return match rec.state {
                VmState::Stopped | VmState::Failed => Ok(self.vm_info(name, &rec)),
                _ => Err(AgentError::State(format!(
                    "vm {name} is {} but has no QEMU process",
                    rec.state
                ))),
            };
        };
        self.set_vm_state(name, |r| r.state = VmState::Stopping)?;
        let qmp = self.procs.dir(name).join("qmp.sock");
        if let Err(e) =
            Qmp::connect(&qmp, Duration::from_secs(2)).and_then(|mut q| q.execute("quit", None))
        {
            tracing::debug!(vm = name, error = %e, "QMP quit failed; killing");
        }
        if !exit.wait(Duration::from_secs(15)) {
            tracing::warn!(vm = name, pid, "QEMU did not quit in 15 s; killing it");
            // SAFETY: kill sends a signal; no memory is involved.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            exit.wait(Duration::from_secs(10));
        }
        self.get_vm(name)
    }

    pub fn remove_vm(&self, name: &str, force: bool) -> Result<()> {
        let rec = self.vm_record(name)?;
        if self.procs.running.lock().contains_key(name) {
            if !force {
                return Err(AgentError::State(format!(
                    "vm {name} is {}; stop it first or use --force",
                    rec.state
                )));
            }
            if let Err(e) = self.stop_vm(name) {
                // QEMU may have exited on its own between the two looks
                // (an incoming migration that failed): nothing to stop.
                if self.running_vm(name).is_some() {
                    return Err(e);
                }
            }
        }
        if self
            .meta
            .get::<crate::records::DiskRecord>(Table::Disks, &rec.disk)?
            .is_some()
        {
            self.disks.remove_disk(&rec.disk, true)?;
        }
        self.meta.remove(Table::Vms, name)?;
        let _ = fs::remove_dir_all(self.procs.dir(name));
        Ok(())
    }

    /// Serial console output from `offset` (at most 1 MiB per call).
    pub fn vm_log(&self, name: &str, offset: u64) -> Result<VmLog> {
        let rec = self.vm_record(name)?;
        let path = self.procs.dir(name).join("serial.log");
        let mut text = Vec::new();
        let mut next = offset;
        if let Ok(mut f) = File::open(&path) {
            f.seek(SeekFrom::Start(offset))
                .map_err(AgentError::io("reading serial log"))?;
            f.take(1 << 20)
                .read_to_end(&mut text)
                .map_err(AgentError::io("reading serial log"))?;
            next = offset + text.len() as u64;
        }
        Ok(VmLog {
            text: String::from_utf8_lossy(&text).into_owned(),
            next_offset: next,
            state: rec.state,
        })
    }

    /// VMs with a running QEMU (standbys included).
    pub fn running_count(&self) -> usize {
        self.procs.running.lock().len()
    }

    /// Stops every running VM (agent shutdown).
    pub fn stop_all_vms(&self) {
        let names: Vec<String> = self.procs.running.lock().keys().cloned().collect();
        for name in names {
            tracing::info!(vm = %name, "stopping VM because the agent is shutting down");
            if let Err(e) = self.stop_vm(&name) {
                tracing::error!(vm = %name, error = %e.chain(), "stopping VM failed");
            }
            let _ = self.set_vm_state(&name, |r| {
                r.reason = Some("stopped because the agent shut down".into())
            });
        }
    }
}
