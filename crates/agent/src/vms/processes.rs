//! The VM service's state: QEMU processes and their records. It owns the
//! running processes (pid, exit, name), the spawner thread they come from,
//! each VM's guest channel and start times, and the VM directory and RAM
//! directory layout; it knows nothing of images, templates or migration.
//! What VMs run on (disks, templates' RAM) is chosen above it, in
//! `vms/mod.rs` and the other services, and handed to it as a [`Start`].

use std::collections::HashMap;
use std::fs::{self};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use rand::Rng;
use serde::{Deserialize, Serialize};
use spore_api::{StartTimes, VmState};
use spore_qemu::{GuestChannel, Identity, Message, MEMORY_SLOTS};

use crate::error::{AgentError, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmRecord {
    pub image: String,
    pub disk: String,
    pub state: VmState,
    pub pid: Option<u32>,
    pub accel: String,
    pub memory_mib: u64,
    pub cpus: u32,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub append: Option<String>,
    pub created: u64,
    pub reason: Option<String>,
    /// Hot-plug bounds, fixed when the VM (or its template) booted.
    #[serde(default)]
    pub max_memory_mib: u64,
    #[serde(default)]
    pub max_cpus: u32,
    /// Set for clones (and for a source VM resumed from its template).
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub identity: Option<Identity>,
    /// Memory DIMMs hot-plugged so far (their ids are dimm1, dimm2, ...).
    #[serde(default)]
    pub dimms: u32,
    /// A standby clone (pool member, not yet handed out).
    #[serde(default)]
    pub standby: bool,
}

/// The largest hot-plug bounds a VM gets: memory up to 4× its size (at
/// least 4 GiB, at most 64 GiB), CPUs up to 8 (or its count if higher).
pub fn hotplug_bounds(memory_mib: u64, cpus: u32) -> (u64, u32) {
    (
        (memory_mib * 4).clamp(4096, 65536).max(memory_mib),
        cpus.max(8),
    )
}

/// Hot-plugged memory comes in multiples of the guest's memory block size.
pub const MEMORY_STEP_MIB: u64 = 128;

/// A new, random identity. MACs are locally administered (52:54:00 is
/// QEMU's prefix); the agent checks them against its other VMs.
pub fn new_identity(hostname: &str) -> Identity {
    let mut rng = rand::rng();
    let b: [u8; 16] = rng.random();
    let seed: [u8; 32] = rng.random();
    let hex = |bytes: &[u8]| bytes.iter().map(|x| format!("{x:02x}")).collect::<String>();
    // RFC 4122 version 4 variant 1
    let mut g = b;
    g[6] = (g[6] & 0x0f) | 0x40;
    g[8] = (g[8] & 0x3f) | 0x80;
    let guid = hex(&g);
    Identity {
        hostname: hostname.to_owned(),
        instance_id: format!("i-{}", hex(&b[..8])),
        mac: format!("52:54:00:{:02x}:{:02x}:{:02x}", b[9], b[10], b[11]),
        vmgenid: format!(
            "{}-{}-{}-{}-{}",
            &guid[..8],
            &guid[8..12],
            &guid[12..16],
            &guid[16..20],
            &guid[20..]
        ),
        seed: hex(&seed),
    }
}

/// How a VM's QEMU starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// Boot from the kernel/disk, with its own shared RAM file.
    Boot,
    /// Resume a template: map its RAM file private, load its device state,
    /// then grow to the record's memory and CPUs.
    Resume {
        template: String,
        ram: PathBuf,
        /// The RAM file is a FUSE file whose working set is being read in:
        /// wait at this gate before `cont`.
        warm: Option<Arc<WarmGate>>,
        /// Stop after loading the state (a standby): no hot-plug, no
        /// `cont`, no identity.
        hold: bool,
        state: PathBuf,
        memory_mib: u64,
        /// The template's boot RAM exactly.
        ram_kib: u64,
        cpus: u32,
    },
    /// The destination of a live migration: its own shared RAM file, the
    /// source's memory layout recreated, QEMU listening on `listen` and
    /// running the guest as soon as the stream has arrived.
    Incoming {
        layout: spore_qemu::MemoryLayout,
        postcopy: bool,
        /// `postcopy-preempt` as well (both sides must agree).
        preempt: bool,
        /// QEMU's listen address (`unix:PATH` relative to the VM's
        /// directory behind the stream's relay, or `tcp:HOST:PORT`).
        listen: String,
    },
}

/// A running QEMU: pid, exit signal, and the VM's current name (a standby
/// is renamed when it is handed out; its monitor thread follows the name).
pub(crate) type Running = (u32, Arc<Exit>, Arc<Mutex<String>>);

/// How the end of a QEMU process is awaited.
#[derive(Debug)]
pub(crate) enum Waiter {
    /// This agent started it: its exit status comes to us.
    Child(Child),
    /// A previous agent started it (adopted after a restart): a pidfd says
    /// when it exits; the status goes to whoever reaps it.
    Adopted {
        pidfd: std::os::fd::OwnedFd,
        /// Where QEMU's log ended when it was adopted.
        log_from: u64,
    },
}

/// How a QEMU process ended.
#[derive(Debug)]
pub(crate) enum Ended {
    Status(std::io::Result<ExitStatus>),
    /// An adopted QEMU: what it logged after `log_from` is all we know.
    Unknown {
        log_from: u64,
    },
}

impl Waiter {
    pub(crate) fn wait(self) -> Ended {
        match self {
            Waiter::Child(mut child) => Ended::Status(child.wait()),
            Waiter::Adopted { pidfd, log_from } => {
                use std::os::fd::AsRawFd;
                let mut pfd = libc::pollfd {
                    fd: pidfd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // A pidfd polls readable once its process has exited.
                // SAFETY: poll reads and writes the one pollfd we pass.
                while unsafe { libc::poll(&mut pfd, 1, -1) } < 0
                    && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                {
                }
                Ended::Unknown { log_from }
            }
        }
    }
}

/// A pidfd for `pid` (Linux 5.3): a handle that cannot outlive the
/// process it names into another one that reuses its number.
pub(crate) fn pidfd_open(pid: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes two integers and returns a new descriptor,
    // which we own from here.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// What QEMU wrote to its log after `from` (its last lines, joined).
pub(crate) fn log_since(path: &Path, from: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut text = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        if f.seek(SeekFrom::Start(from)).is_ok() {
            let _ = f.take(64 << 10).read_to_string(&mut text);
        }
    }
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

/// Exit of one QEMU process, signalled by its monitor thread.
#[derive(Debug, Default)]
pub(crate) struct Exit {
    pub(crate) status: Mutex<Option<ExitStatus>>,
    pub(crate) done: Condvar,
}

impl Exit {
    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        let mut s = self.status.lock();
        if s.is_none() {
            self.done.wait_for(&mut s, timeout);
        }
        s.is_some()
    }
}

#[derive(Debug)]
pub struct VmManager {
    pub(crate) root: PathBuf,
    pub(crate) ram_dir: PathBuf,
    /// The agent's end of each running VM's guest channel.
    pub(crate) channels: Mutex<HashMap<String, GuestChannel>>,
    /// How the last start of each VM went (not persisted).
    pub(crate) start_times: Mutex<HashMap<String, StartTimes>>,
    pub(crate) running: Mutex<HashMap<String, Running>>,
    /// Serialises state changes of VM records.
    pub(crate) transitions: Mutex<()>,
}

impl VmManager {
    /// The RAM directory is made when a VM first needs it, so that agents
    /// that never run one leave nothing in /dev/shm.
    pub fn new(root: PathBuf, ram_dir: PathBuf) -> Result<Self> {
        Ok(VmManager {
            root,
            ram_dir,
            channels: Mutex::default(),
            start_times: Mutex::default(),
            running: Mutex::default(),
            transitions: Mutex::new(()),
        })
    }

    pub fn ram_dir(&self) -> &Path {
        &self.ram_dir
    }

    /// The shared RAM file of a booted VM.
    pub fn ram_file(&self, name: &str) -> PathBuf {
        self.ram_dir.join(format!("vm-{name}.ram"))
    }

    /// Starts a stall probe on a running VM's guest channel.
    pub fn probe(&self, name: &str) -> Option<spore_qemu::StallProbe> {
        let channels = self.channels.lock();
        let ch = channels.get(name)?;
        ch.probe(
            &self.dir(name).join("serial.log"),
            Duration::from_millis(10),
        )
        .map_err(|e| tracing::warn!(vm = name, error = %e, "no stall probe"))
        .ok()
    }

    /// Sends a message on a running VM's guest channel.
    pub fn send(&self, name: &str, msg: &Message) -> Result<()> {
        let mut channels = self.channels.lock();
        let ch = channels.get_mut(name).ok_or_else(|| {
            AgentError::State(format!("vm {name} has no guest channel (is it running?)"))
        })?;
        ch.send(msg)
            .map_err(|e| AgentError::State(format!("guest channel of {name}: {e}")))
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The pid of a VM's QEMU that a previous agent left running, if the
    /// process `pid` is still that QEMU: a spore VM's QEMU (its `-name`)
    /// running in the VM's directory (a reused pid is neither). The name
    /// in its command line may be another: a standby handed out as a
    /// clone keeps the QEMU it was started with, under its old name.
    pub(crate) fn left_running(&self, name: &str, pid: Option<u32>) -> Option<u32> {
        let pid = pid?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cwd = fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
        let dir = fs::canonicalize(self.dir(name)).unwrap_or_else(|_| self.dir(name));
        let spore_vm = cmdline
            .split(|b| *b == 0)
            .any(|arg| arg.starts_with(b"spore-") && arg.ends_with(b",debug-threads=on"));
        (spore_vm && cwd == dir).then_some(pid)
    }

    /// True when QEMU `pid` maps a file of a spore-memfs mount (a
    /// template's RAM paged in from another host, served by the agent).
    pub(crate) fn maps_memfs(&self, pid: u32) -> bool {
        let mounts = fs::canonicalize(&self.ram_dir)
            .unwrap_or_else(|_| self.ram_dir.clone())
            .join("mem-");
        let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        maps.contains(&*mounts.to_string_lossy())
    }

    /// Removes the RAM files of VMs that do not run (`running` names those
    /// that do) and detaches spore-memfs mounts, whose server (a previous
    /// agent) is gone; returns what it did, one line each.
    pub(crate) fn sweep_ram_dir(&self, running: &std::collections::HashSet<String>) -> Vec<String> {
        let mut report = Vec::new();
        let Ok(entries) = fs::read_dir(&self.ram_dir) else {
            return report;
        };
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            if let Some(vm) = file
                .strip_prefix("vm-")
                .and_then(|f| f.strip_suffix(".ram"))
            {
                if !running.contains(vm) {
                    let _ = fs::remove_file(e.path());
                    report.push(format!(
                        "RAM file {}: its VM is not running; removed",
                        e.path().display()
                    ));
                }
            } else if file.starts_with("mem-") {
                spore_memfs::detach_stale(&e.path());
                let _ = fs::remove_dir(e.path());
                report.push(format!(
                    "FUSE mount {}: its server (the previous agent) is gone; detached",
                    e.path().display()
                ));
            }
        }
        report
    }
}

/// Headroom left in the RAM file system besides a new VM's RAM.
const RAM_HEADROOM: u64 = 64 << 20;

/// Fails unless the file system of `dir` has room for `ram_kib` of guest
/// RAM (plus headroom), for the file `file` (which may exist already: a VM
/// started again). RAM files are sparse: the pages the other RAM files in
/// `dir` have not touched yet are promised to them, and count as taken, so
/// that VMs admitted one by one never overcommit the file system together
/// (a guest touching a page the tmpfs has no room for dies of SIGBUS).
pub(crate) fn check_ram_room(dir: &Path, ram_kib: u64, file: &Path) -> Result<()> {
    let free = free_bytes(dir)?;
    let promised = promised_ram(dir, file);
    let need = ram_kib * 1024 + RAM_HEADROOM;
    if free.saturating_sub(promised) < need {
        return Err(AgentError::State(format!(
            "not enough room for the VM's RAM in {}: {} MiB free, of which {} MiB are \
             promised to the RAM other VMs and templates have not touched yet; {} MiB \
             needed (guest RAM plus {} MiB headroom); stop other VMs or give the agent a \
             larger --ram-dir",
            dir.display(),
            free >> 20,
            promised >> 20,
            need >> 20,
            RAM_HEADROOM >> 20
        )));
    }
    Ok(())
}

/// Bytes the RAM files in `dir` (all but `except`) may still allocate: their
/// size less what they hold. Read-only files are templates' RAM, which
/// clones map private: their holes are never filled in the file system.
fn promised_ram(dir: &Path, except: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.path() != except && e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.metadata().ok())
        .filter(|m| !m.permissions().readonly())
        .map(|m| m.len().saturating_sub(m.blocks() * 512))
        .sum()
}

pub(crate) fn check_growth(rec: &VmRecord, memory_mib: u64, cpus: u32) -> Result<()> {
    if memory_mib < rec.memory_mib || cpus < rec.cpus {
        return Err(AgentError::Invalid(format!(
            "memory and CPUs can only grow (now {} MiB, {} CPUs)",
            rec.memory_mib, rec.cpus
        )));
    }
    if !(memory_mib - rec.memory_mib).is_multiple_of(MEMORY_STEP_MIB) {
        return Err(AgentError::Invalid(format!(
            "memory can grow in steps of {MEMORY_STEP_MIB} MiB (the guest's memory block size); \
             {memory_mib} MiB is {} MiB more than {} MiB",
            memory_mib - rec.memory_mib,
            rec.memory_mib
        )));
    }
    if memory_mib > rec.max_memory_mib || cpus > rec.max_cpus {
        return Err(AgentError::Invalid(format!(
            "at most {} MiB and {} CPUs: the bounds are fixed when the VM (or its template) boots",
            rec.max_memory_mib, rec.max_cpus
        )));
    }
    if memory_mib > rec.memory_mib && rec.dimms >= MEMORY_SLOTS {
        return Err(AgentError::Invalid(format!(
            "all {MEMORY_SLOTS} memory slots are used"
        )));
    }
    Ok(())
}

/// Bytes an unprivileged writer may still write to the file system of
/// `dir`.
pub(crate) fn free_bytes(dir: &Path) -> Result<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| AgentError::Invalid(format!("directory {}", dir.display())))?;
    // SAFETY: statvfs writes into the struct we pass; the path is a valid
    // C string that outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(AgentError::Io {
            context: format!("checking free space in {}", dir.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Where the first clone of a template paged in from elsewhere waits for
/// the working set's warm-up (which runs while its QEMU starts), until the
/// warm-up ends or the budget from the mount runs out.
#[derive(Debug)]
pub struct WarmGate {
    done: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    deadline: std::time::Instant,
}

impl WarmGate {
    /// A gate that opens when `done` says so or at `deadline`.
    pub fn new(done: std::sync::mpsc::Receiver<()>, deadline: std::time::Instant) -> Self {
        WarmGate {
            done: Mutex::new(Some(done)),
            deadline,
        }
    }

    pub fn wait(&self) {
        let Some(rx) = self.done.lock().take() else {
            return;
        };
        let left = self
            .deadline
            .saturating_duration_since(std::time::Instant::now());
        let done = rx.recv_timeout(left).is_ok();
        tracing::debug!(done, "working set warm-up gate");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn promised_ram_counts_the_holes_of_writable_ram_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let vm = dir.path().join("vm-a.ram");
        let f = fs::File::create(&vm).unwrap();
        f.set_len(64 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[1u8; 1 << 20], 0).unwrap();
        f.sync_all().unwrap();
        let template = dir.path().join("tmpl-t.ram");
        fs::File::create(&template)
            .unwrap()
            .set_len(256 << 20)
            .unwrap();
        fs::set_permissions(&template, fs::Permissions::from_mode(0o400)).unwrap();
        let me = dir.path().join("vm-b.ram");
        fs::File::create(&me).unwrap().set_len(512 << 20).unwrap();

        let promised = promised_ram(dir.path(), &me);
        // vm-a's 63 unwritten MiB (give or take a file system block); not
        // the template's holes, not the VM being admitted.
        assert!((62 << 20..=63 << 20).contains(&promised), "{promised}");
    }
}
