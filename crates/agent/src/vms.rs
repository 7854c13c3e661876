//! VMs: QEMU processes whose disk is one of the agent's NBD exports.
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
//! QEMU is started from one long-lived thread with PR_SET_PDEATHSIG, so if
//! the agent dies, its VMs get SIGKILL instead of running on without their
//! disk server (SIGTERM would leave QEMU waiting out its NBD reconnect
//! delay first). Their disks lose nothing that was flushed. On a clean shutdown the agent stops its VMs and records why;
//! on start it marks VMs a previous agent left as stopped, with the reason.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use spore_api::{VmCreate, VmInfo, VmLog, VmState};
use spore_qemu::{Accel, Qmp, VmSpec, QEMU_BINARY};

use crate::agent::{now, Agent};
use crate::error::{check_name, AgentError, Result};
use crate::exports::DISK_PREFIX;
use crate::meta::{Meta, Table};

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
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Exit of one QEMU process, signalled by its monitor thread.
#[derive(Debug, Default)]
struct Exit {
    status: Mutex<Option<ExitStatus>>,
    done: Condvar,
}

impl Exit {
    fn wait(&self, timeout: Duration) -> bool {
        let mut s = self.status.lock();
        if s.is_none() {
            self.done.wait_for(&mut s, timeout);
        }
        s.is_some()
    }
}

#[derive(Debug)]
pub struct VmManager {
    root: PathBuf,
    spawner: Mutex<mpsc::Sender<SpawnRequest>>,
    running: Mutex<HashMap<String, (u32, Arc<Exit>)>>,
    /// Serialises state changes of VM records.
    transitions: Mutex<()>,
}

impl VmManager {
    pub fn new(root: PathBuf) -> Self {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        // PR_SET_PDEATHSIG fires when the thread that forked the child
        // exits, so children must come from a thread that lives as long as
        // the agent.
        std::thread::Builder::new()
            .name("qemu-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawning the QEMU spawner thread");
        VmManager {
            root,
            spawner: Mutex::new(tx),
            running: Mutex::default(),
            transitions: Mutex::new(()),
        }
    }

    fn spawn(&self, cmd: Command) -> std::io::Result<Child> {
        let (tx, rx) = mpsc::channel();
        self.spawner
            .lock()
            .send((cmd, tx))
            .map_err(|_| std::io::Error::other("spawner thread is gone"))?;
        rx.recv()
            .map_err(|_| std::io::Error::other("spawner thread is gone"))?
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Settles VMs that a previous agent left in a live state.
    pub fn recover(&self, meta: &Meta) -> Result<()> {
        for (name, mut rec) in meta.list::<VmRecord>(Table::Vms)? {
            if matches!(rec.state, VmState::Stopped | VmState::Failed) {
                continue;
            }
            let mut reason = "the agent exited while the VM ran".to_owned();
            if let Some(pid) = rec.pid {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmdline).contains(&format!("spore-{name},")) {
                    // Its disk connection and monitor belonged to the old
                    // agent; stop it rather than leave it unmanaged.
                    // SAFETY: kill sends a signal; no memory is involved.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    reason =
                        "the agent restarted; its QEMU process was still running and was stopped"
                            .into();
                }
            }
            tracing::warn!(vm = %name, %reason, "settling VM left by a previous agent");
            rec.state = VmState::Stopped;
            rec.pid = None;
            rec.reason = Some(reason);
            meta.put(Table::Vms, &name, &rec)?;
        }
        Ok(())
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

impl Agent {
    pub fn vm_record(&self, name: &str) -> Result<VmRecord> {
        self.meta
            .get(Table::Vms, name)?
            .ok_or_else(|| AgentError::NotFound {
                kind: "vm",
                name: name.into(),
            })
    }

    fn vm_info(&self, name: &str, rec: &VmRecord) -> VmInfo {
        let dir = self.vms.dir(name);
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
        }
    }

    fn set_vm_state(&self, name: &str, f: impl FnOnce(&mut VmRecord)) -> Result<VmRecord> {
        let _serial = self.vms.transitions.lock();
        let mut rec = self.vm_record(name)?;
        f(&mut rec);
        self.meta.put(Table::Vms, name, &rec)?;
        Ok(rec)
    }

    pub fn run_vm(self: &Arc<Self>, req: &VmCreate) -> Result<VmInfo> {
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
        self.resolve_image(&req.image)?;
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
        };
        if !self.meta.insert_new(Table::Vms, &req.name, &rec)? {
            return Err(AgentError::Exists {
                kind: "vm",
                name: req.name.clone(),
            });
        }
        let result = self
            .create_disk(&req.name, &req.image, Some(&req.name))
            .and_then(|_| self.start_vm(&req.name, rec));
        if let Err(e) = &result {
            tracing::error!(vm = %req.name, error = %e.chain(), "VM failed to start");
            if self.exports.disk(&req.name).is_none() {
                // The disk was never made: nothing of the VM remains.
                let _ = self.meta.remove(Table::Vms, &req.name);
            } else if !self.vms.running.lock().contains_key(&req.name) {
                // QEMU never ran (or is gone): record why, keep the disk.
                let reason = e.chain();
                let _ = self.set_vm_state(&req.name, |r| {
                    if matches!(r.state, VmState::Starting | VmState::Running) {
                        r.state = VmState::Failed;
                        r.pid = None;
                        r.reason = Some(reason);
                    }
                });
            }
        }
        result
    }

    /// Starts QEMU for a VM whose record and disk exist.
    fn start_vm(self: &Arc<Self>, name: &str, rec: VmRecord) -> Result<VmInfo> {
        let dir = self.vms.dir(name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(AgentError::io(format!("creating {}", dir.display())))?;
        let spec = VmSpec {
            name: name.to_owned(),
            accel: rec.accel.parse().map_err(AgentError::Invalid)?,
            memory_mib: rec.memory_mib,
            cpus: rec.cpus,
            kernel: rec.kernel.clone(),
            initrd: rec.initrd.clone(),
            append: rec.append.clone(),
            nbd_socket: self.nbd_socket(),
            export: format!("{DISK_PREFIX}{}", rec.disk),
            qmp_socket: dir.join("qmp.sock"),
            serial_log: dir.join("serial.log"),
        };
        let qemu_log = dir.join("qemu.log");
        let log = File::create(&qemu_log).map_err(AgentError::io("creating qemu.log"))?;
        let mut cmd = Command::new(QEMU_BINARY);
        cmd.args(spec.args())
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(AgentError::io("qemu.log"))?)
            .stderr(log)
            // Its own process group: a Ctrl-C meant for the agent does not
            // kill the VM behind the agent's back; the agent stops it.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = self.vms.spawn(cmd).map_err(|e| match e.kind() {
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
        self.vms
            .running
            .lock()
            .insert(name.to_owned(), (pid, exit.clone()));
        self.set_vm_state(name, |r| {
            r.pid = Some(pid);
            r.state = VmState::Starting;
            r.reason = None;
        })?;
        let agent = self.clone();
        let vm = name.to_owned();
        let monitor_exit = exit.clone();
        std::thread::Builder::new()
            .name(format!("vm-{name}"))
            .spawn(move || {
                let status = child.wait();
                agent.vms.running.lock().remove(&vm);
                let qemu_log = agent.vms.dir(&vm).join("qemu.log");
                let outcome = agent.set_vm_state(&vm, |r| {
                    r.pid = None;
                    let (state, reason) = match (&status, r.state) {
                        (_, VmState::Stopping) => {
                            (VmState::Stopped, "stopped on request".to_owned())
                        }
                        (Ok(s), _) if s.success() => {
                            (VmState::Stopped, "the guest shut down".to_owned())
                        }
                        (Ok(s), _) => (
                            VmState::Failed,
                            format!(
                                "QEMU exited with {}: {}",
                                describe_exit(*s),
                                tail(&qemu_log, 3)
                            ),
                        ),
                        (Err(e), _) => (VmState::Failed, format!("waiting for QEMU failed: {e}")),
                    };
                    r.state = state;
                    r.reason = Some(reason);
                });
                if let Ok(rec) = outcome {
                    tracing::info!(vm = %vm, state = %rec.state, reason = ?rec.reason, "VM ended");
                }
                *monitor_exit.status.lock() =
                    Some(status.unwrap_or_else(|_| ExitStatus::from_raw(-1)));
                monitor_exit.done.notify_all();
            })
            .map_err(AgentError::io("starting the VM monitor thread"))?;
        match Qmp::connect(&spec.qmp_socket, Duration::from_secs(20)).and_then(|mut q| q.status()) {
            Ok(status) => {
                tracing::info!(vm = name, pid, %status, "VM started");
                let rec = self.set_vm_state(name, |r| {
                    if r.state == VmState::Starting {
                        r.state = VmState::Running;
                    }
                })?;
                Ok(self.vm_info(name, &rec))
            }
            Err(e) => {
                // SAFETY: kill sends a signal; no memory is involved.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                exit.wait(Duration::from_secs(10));
                Err(AgentError::State(format!(
                    "QEMU did not come up ({e}): {}",
                    tail(&qemu_log, 5)
                )))
            }
        }
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

    /// Stops a VM: QMP `quit`, then SIGKILL if QEMU has not gone in time.
    pub fn stop_vm(&self, name: &str) -> Result<VmInfo> {
        let rec = self.vm_record(name)?;
        let Some((pid, exit)) = self.vms.running.lock().get(name).cloned() else {
            return match rec.state {
                VmState::Stopped | VmState::Failed => Ok(self.vm_info(name, &rec)),
                _ => Err(AgentError::State(format!(
                    "vm {name} is {} but has no QEMU process",
                    rec.state
                ))),
            };
        };
        self.set_vm_state(name, |r| r.state = VmState::Stopping)?;
        let qmp = self.vms.dir(name).join("qmp.sock");
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
        if self.vms.running.lock().contains_key(name) {
            if !force {
                return Err(AgentError::State(format!(
                    "vm {name} is {}; stop it first or use --force",
                    rec.state
                )));
            }
            self.stop_vm(name)?;
        }
        if self
            .meta
            .get::<crate::agent::DiskRecord>(Table::Disks, &rec.disk)?
            .is_some()
        {
            self.remove_disk(&rec.disk, true)?;
        }
        self.meta.remove(Table::Vms, name)?;
        let _ = fs::remove_dir_all(self.vms.dir(name));
        Ok(())
    }

    /// Serial console output from `offset` (at most 1 MiB per call).
    pub fn vm_log(&self, name: &str, offset: u64) -> Result<VmLog> {
        let rec = self.vm_record(name)?;
        let path = self.vms.dir(name).join("serial.log");
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

    /// Stops every running VM (agent shutdown).
    pub fn stop_all_vms(&self) {
        let names: Vec<String> = self.vms.running.lock().keys().cloned().collect();
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
