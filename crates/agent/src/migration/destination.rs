//! The destination side of a live migration.
//!
//! `prepare` makes a disk on the VM's image (its chunks come from this
//! host's cache, its peers or the origin, never from the source) and starts
//! QEMU waiting for the stream with the source's memory layout. The source
//! then sends the blocks its VM wrote (`blocks`), QEMU's stream, and at last
//! `commit`. Until the commit, everything made here is removed when the
//! source aborts, when this QEMU exits (a failed incoming migration), or
//! when the commit does not come in time.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use spore_api::{
    IncomingCommit, IncomingCommitted, IncomingReady, IncomingRequest, IncomingStatus, VmState,
};
use spore_blockdev::batch::decode_batch;
use spore_nbd::Export;
use spore_qemu::{epoch_us, Accel, Identity, MemoryLayout, Qmp};

use super::relay;
use super::takeover::{read_mark, write_mark, IncomingMark};
use super::Incoming;
use super::Migration;
use crate::error::{check_guid, check_hostname, check_mac, check_name, AgentError, Result};
use crate::meta::Table;
use crate::records::now;
use crate::vms::{Start, VmRecord, INCOMING_MARK};

const POLL: Duration = Duration::from_millis(5);
/// How long the destination waits for an in-band QMP answer.
const INCOMING_QMP_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a post-copy taken over after a restart waits for its source
/// before the watcher adopts it once every page is here (it never removes
/// a guest that runs here).
const TAKEN_OVER_WAIT: Duration = Duration::from_secs(60);
/// How often QEMU's accepted migration connections are looked for.
const TUNE_EVERY: Duration = Duration::from_millis(50);

/// Where an incoming QEMU listens for the stream.
enum Listen {
    /// Behind the relay (a TLS fleet): a unix socket in the VM's
    /// directory, `path` for the agent and `uri` for QEMU (relative to its
    /// working directory, the VM's).
    Relay {
        uri: String,
        path: std::path::PathBuf,
    },
    /// Straight on the peer listener's host (`--insecure-listen`).
    Tcp { uri: String, port: u16 },
}

impl Listen {
    fn uri(&self) -> &str {
        match self {
            Listen::Relay { uri, .. } | Listen::Tcp { uri, .. } => uri,
        }
    }
}

impl Migration {
    /// The peer listener's host: the relay, or QEMU in plaintext, listens
    /// there for the stream.
    fn listen_host(&self) -> Result<String> {
        let listen = self
            .listen
            .as_deref()
            .ok_or_else(|| AgentError::State("receiving migrations needs --listen".into()))?;
        Ok(listen
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(listen)
            .trim_matches(|c| c == '[' || c == ']')
            .to_owned())
    }

    /// Where QEMU listens for stream number `n` of `vm` (a recovery
    /// listens anew).
    fn stream_listen(&self, vm: &str, n: u32) -> Result<Listen> {
        if self.stream_tls.required() {
            let name = format!("migrate-in-{n}.sock");
            return Ok(Listen::Relay {
                uri: format!("unix:{name}"),
                path: self.vms.procs.dir(vm).join(name),
            });
        }
        let host = self.listen_host()?;
        // Bind and release: QEMU binds the same port a moment later.
        let port = TcpListener::bind((host.as_str(), 0))
            .and_then(|l| l.local_addr())
            .map_err(AgentError::io(format!("finding a free port on {host}")))?
            .port();
        Ok(Listen::Tcp {
            uri: format!("tcp:{host}:{port}"),
            port,
        })
    }

    /// The relay in front of an incoming QEMU's socket at `path`.
    fn start_relay(&self, vm: &str, path: std::path::PathBuf) -> Result<relay::Inbound> {
        let tls = self.stream_tls.server.clone().ok_or_else(|| {
            AgentError::State("the peer listener is TLS but its configuration is gone".into())
        })?;
        let host = self.listen_host()?;
        relay::Inbound::start(&host, tls, path, vm, self.refused.clone()).map_err(AgentError::io(
            format!("starting the migration stream's relay on {host}"),
        ))
    }

    fn incoming(&self, vm: &str) -> Result<Arc<Incoming>> {
        self.jobs
            .incoming
            .lock()
            .get(vm)
            .cloned()
            .ok_or_else(|| AgentError::NotFound {
                kind: "incoming migration",
                name: vm.into(),
            })
    }

    /// Prepares an incoming migration (the peer gate, `peer::admit`, has
    /// checked that this agent accepts migrations).
    pub fn incoming_prepare(self: &Arc<Self>, req: IncomingRequest) -> Result<IncomingReady> {
        check_name("vm", &req.vm)?;
        check_name("image", &req.image)?;
        // Everything below may reach QEMU's command line: only well-formed
        // values pass (a comma in a MAC would add device options).
        if let Some(mac) = &req.mac {
            check_mac(mac)?;
        }
        if let Some(guid) = &req.vmgenid {
            check_guid(guid)?;
        }
        if let Some(h) = &req.hostname {
            check_hostname(h)?;
        }
        if let Some(id) = &req.instance_id {
            check_name("instance id", id)?;
        }
        if let Some(group) = &req.group {
            check_name("group", group)?;
        }
        for (id, _) in &req.dimms {
            check_name("DIMM id", id)?;
        }
        let manifest: Option<spore_chunks::ChunkId> = req
            .manifest
            .as_deref()
            .map(|hex| {
                hex.parse()
                    .map_err(|_| AgentError::Invalid(format!("manifest {hex:?} is not a chunk id")))
            })
            .transpose()?;
        let accel: Accel = req.accel.parse().map_err(AgentError::Invalid)?;
        if accel != self.vms.accel() {
            return Err(AgentError::Invalid(format!(
                "the VM runs with {accel}, this host with {}; a migration needs the same accelerator",
                self.vms.accel()
            )));
        }
        let listen = self.stream_listen(&req.vm, 0)?;
        let identity = req.mac.as_ref().map(|mac| Identity {
            hostname: req.hostname.clone().unwrap_or_else(|| req.vm.clone()),
            instance_id: req.instance_id.clone().unwrap_or_default(),
            mac: mac.clone(),
            vmgenid: req.vmgenid.clone().unwrap_or_default(),
            // Fresh entropy for the next time the guest is given its
            // identity here (a capture's resume): seeds do not travel.
            seed: crate::vms::processes::new_identity(&req.vm).seed,
        });
        let rec = VmRecord {
            image: req.image.clone(),
            disk: req.vm.clone(),
            state: VmState::Starting,
            pid: None,
            accel: accel.to_string(),
            memory_mib: req.memory_mib,
            cpus: req.cpus,
            kernel: None,
            initrd: None,
            append: None,
            created: now(),
            reason: Some(format!("arriving from {}", req.from)),
            max_memory_mib: req.max_memory_mib,
            max_cpus: req.max_cpus,
            template: None,
            group: req.group.clone(),
            identity,
            dimms: req.dimms.len() as u32,
            standby: false,
        };
        if self.disks.disk_record(&req.vm).is_ok() {
            return Err(AgentError::Exists {
                kind: "disk",
                name: req.vm.clone(),
            });
        }
        {
            let mut incoming = self.jobs.incoming.lock();
            if incoming.contains_key(&req.vm) {
                return Err(AgentError::Exists {
                    kind: "incoming migration",
                    name: req.vm.clone(),
                });
            }
            if incoming.len() >= self.max_incoming {
                tracing::warn!(vm = %req.vm, from = %req.from, limit = self.max_incoming, "incoming migration refused: too many at once");
                return Err(AgentError::Busy(format!(
                    "this host takes at most {} incoming migrations at once (--max-incoming-migrations); try again when one has ended",
                    self.max_incoming
                )));
            }
            if !self.meta.insert_new(Table::Vms, &req.vm, &rec)? {
                return Err(AgentError::Exists {
                    kind: "vm",
                    name: req.vm.clone(),
                });
            }
            incoming.insert(
                req.vm.clone(),
                Arc::new(Incoming {
                    vm: req.vm.clone(),
                    from: req.from.clone(),
                    qmp: Mutex::new(None),
                    disk_size: 0,
                    probe: Mutex::new(None),
                    running_at: Mutex::new(None),
                    ports: Mutex::new(Vec::new()),
                    relay: Mutex::new(None),
                    listens: AtomicU32::new(1),
                    done: AtomicBool::new(false),
                    deadline: Instant::now(),
                }),
            );
        }
        let started = (|| -> Result<IncomingReady> {
            let disk = match manifest {
                Some(manifest) => {
                    let source = (req.from.contains(':') && !req.from.contains('/'))
                        .then(|| self.links.peer_url(&req.from));
                    self.disks.create_disk_pinned(
                        &req.vm,
                        &req.image,
                        manifest,
                        source.as_deref(),
                        Some(&req.vm),
                    )?
                }
                // An older source sends only the name.
                None => self.disks.create_disk(&req.vm, &req.image, Some(&req.vm))?,
            };
            let start = Start::Incoming {
                layout: MemoryLayout {
                    base_mib: req.base_mib,
                    // An older source: its TCG boot RAM was 8 KiB short.
                    base_kib: req.base_kib.unwrap_or_else(|| {
                        let accel = req.accel.parse().unwrap_or(spore_qemu::Accel::Tcg);
                        spore_qemu::cmdline::ram_kib_for(req.base_mib, accel, None)
                    }),
                    dimms: req.dimms.clone(),
                    boot_cpus: req.boot_cpus,
                    cpus: req.cpus,
                },
                postcopy: req.postcopy,
                preempt: req.postcopy && req.postcopy_preempt,
                listen: listen.uri().to_owned(),
            };
            self.vms.start_vm(&req.vm, rec, start, Instant::now())?;
            write_mark(
                &self.vms.procs.dir(&req.vm),
                INCOMING_MARK,
                &IncomingMark {
                    from: req.from.clone(),
                },
            )
            .map_err(AgentError::io("marking the incoming migration"))?;
            // Out of band, so that a post-copy recovery can reach QEMU
            // while its main thread waits for a page (incoming_recover);
            // and a short wait for in-band answers, so that the watcher's
            // status poll, blocked the same way, lets go of the monitor.
            let mut qmp = Qmp::connect_oob(
                &self.vms.procs.dir(&req.vm).join("qmp.sock"),
                Duration::from_secs(5),
            )?;
            qmp.set_timeout(INCOMING_QMP_TIMEOUT)?;
            let (port, ports, relay) = match listen {
                Listen::Relay { path, .. } => {
                    let relay = self.start_relay(&req.vm, path)?;
                    (relay.port(), Vec::new(), Some(relay))
                }
                Listen::Tcp { port, .. } => (port, vec![port], None),
            };
            let entry = Arc::new(Incoming {
                vm: req.vm.clone(),
                from: req.from.clone(),
                qmp: Mutex::new(Some(qmp)),
                disk_size: disk.virtual_size,
                probe: Mutex::new(None),
                running_at: Mutex::new(None),
                ports: Mutex::new(ports),
                relay: Mutex::new(relay),
                listens: AtomicU32::new(1),
                done: AtomicBool::new(false),
                deadline: Instant::now() + Duration::from_secs(req.timeout_s + 30),
            });
            self.jobs
                .incoming
                .lock()
                .insert(req.vm.clone(), entry.clone());
            let migration = self.clone();
            std::thread::Builder::new()
                .name(format!("incoming-{}", req.vm))
                .spawn(move || migration.watch_incoming(entry))
                .map_err(AgentError::io("starting the incoming migration watcher"))?;
            Ok(IncomingReady {
                port,
                disk_size: disk.virtual_size,
                tls: self.stream_tls.required(),
            })
        })();
        match started {
            Ok(ready) => {
                tracing::info!(vm = %req.vm, from = %req.from, port = ready.port, postcopy = req.postcopy, "migration incoming");
                Ok(ready)
            }
            Err(e) => {
                self.discard_incoming(&req.vm, &format!("preparing failed: {}", e.chain()));
                Err(e)
            }
        }
    }

    /// Polls the destination QEMU: tunes its migration connections, starts
    /// the stall probe when the guest runs here, and removes everything
    /// when QEMU exits or the commit does not come in time.
    fn watch_incoming(self: Arc<Self>, inc: Arc<Incoming>) {
        let mut return_path = ReturnPath::default();
        let mut next_tune = Instant::now();
        while !inc.done.load(Ordering::Acquire) {
            std::thread::sleep(POLL);
            let Some((pid, _)) = self.vms.running_vm(&inc.vm) else {
                if inc.done.load(Ordering::Acquire) {
                    return;
                }
                let why = self
                    .vms
                    .vm_record(&inc.vm)
                    .ok()
                    .and_then(|r| r.reason)
                    .unwrap_or_else(|| "QEMU exited".into());
                self.discard_incoming(&inc.vm, &format!("the incoming QEMU ended: {why}"));
                return;
            };
            if Instant::now() >= next_tune {
                next_tune = Instant::now() + TUNE_EVERY;
                let ports = inc.ports.lock().clone();
                return_path.tune(&inc.vm, pid, &ports);
            }
            if inc.running_at.lock().is_none() {
                if let Some(Ok(status)) = inc.qmp.lock().as_mut().map(|q| q.status()) {
                    if status == "running" {
                        *inc.running_at.lock() = Some(epoch_us());
                        // Under the lock the commit takes the probe with:
                        // a probe started after the commit would ping the
                        // guest for ever.
                        let mut probe = inc.probe.lock();
                        if !inc.done.load(Ordering::Acquire) {
                            *probe = self.vms.procs.probe(&inc.vm);
                        }
                        tracing::info!(vm = %inc.vm, "migrated guest runs here");
                    }
                }
            }
            if Instant::now() <= inc.deadline {
                continue;
            }
            if inc.running_at.lock().is_none() {
                // The guest never ran here: the source still has it.
                self.discard_incoming(&inc.vm, "the source did not commit in time");
                return;
            }
            // The guest has run here: its writes since the switch exist
            // only here, and the source must not resume. A late or lost
            // commit never removes it; once QEMU has every page (the
            // post-copy is over) the VM is adopted as if committed.
            if self.incoming_stream_done(&inc) && self.adopt_uncommitted(&inc) {
                return;
            }
        }
    }

    /// True when the destination QEMU has received the whole migration.
    fn incoming_stream_done(&self, inc: &Incoming) -> bool {
        let progress = inc.qmp.lock().as_mut().map(|q| q.migration_progress());
        matches!(progress, Some(Ok(p)) if p.finished())
    }

    /// Keeps a VM that runs here although the source never committed it.
    fn adopt_uncommitted(&self, inc: &Incoming) -> bool {
        let Some(inc) = self.jobs.incoming.lock().remove(&inc.vm) else {
            return true;
        };
        inc.done.store(true, Ordering::Release);
        inc.probe.lock().take();
        inc.qmp.lock().take();
        let _ = std::fs::remove_file(self.vms.procs.dir(&inc.vm).join(INCOMING_MARK));
        if let Some(disk) = self.exports.disk(&inc.vm) {
            if let Err(e) = disk.flush() {
                tracing::error!(vm = %inc.vm, error = %e, "flushing the disk of an adopted VM failed");
            }
        }
        let adopted = self.vms.set_vm_state(&inc.vm, |r| {
            if r.state == VmState::Incoming {
                r.state = VmState::Running;
            }
            r.reason = Some(format!(
                "migrated from {}; the source never committed, kept running here",
                inc.from
            ));
        });
        if let Err(e) = adopted {
            tracing::error!(vm = %inc.vm, error = %e.chain(), "recording an adopted VM failed");
        }
        tracing::warn!(vm = %inc.vm, from = %inc.from, "the source did not commit in time; the guest already runs here and is kept");
        true
    }

    /// Whether the guest of an incoming migration runs here yet (as the
    /// watcher last saw QEMU; no monitor command, so that a QEMU blocked
    /// on a missing page still answers).
    pub fn incoming_status(&self, vm: &str) -> Result<IncomingStatus> {
        let inc = self.incoming(vm)?;
        let guest_runs = inc.running_at.lock().is_some()
            && !crate::failpoint::hit("migration-destination-silent");
        Ok(IncomingStatus { guest_runs })
    }

    /// Applies a batch of the source disk's written blocks.
    pub fn incoming_blocks(&self, vm: &str, body: &[u8]) -> Result<u64> {
        let inc = self.incoming(vm)?;
        crate::failpoint::stall("migration-incoming-blocks");
        if inc.running_at.lock().is_some() {
            return Err(AgentError::State(format!(
                "vm {vm} already runs here; its disk takes no more blocks from the source"
            )));
        }
        let disk = self.exports.disk(vm).ok_or_else(|| AgentError::NotFound {
            kind: "disk",
            name: vm.into(),
        })?;
        let extents = decode_batch(body, inc.disk_size)
            .map_err(|e| AgentError::Invalid(format!("block batch for {vm}: {e}")))?;
        let mut bytes = 0;
        for (offset, data) in extents {
            disk.write(offset, data, false)
                .map_err(AgentError::io(format!("writing blocks of {vm}")))?;
            bytes += data.len() as u64;
        }
        Ok(bytes)
    }

    /// A post-copy migration whose link broke: pause this side too (a
    /// connection that silently stopped is not noticed by QEMU), then
    /// listen again for the source's resumed stream. Only out-of-band
    /// commands: the main thread of a destination QEMU whose guest touched
    /// a page that did not come is blocked until recovery, and in-band
    /// commands wait for it (they timed out, and recovery never happened).
    pub fn incoming_recover(&self, vm: &str) -> Result<IncomingReady> {
        let inc = self.incoming(vm)?;
        let listen = self.stream_listen(vm, inc.listens.fetch_add(1, Ordering::AcqRel))?;
        let mut guard = inc.qmp.lock();
        let qmp = guard
            .as_mut()
            .ok_or_else(|| AgentError::State(format!("migration of {vm} is ending")))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        tracing::warn!(vm, "post-copy recovery requested");
        loop {
            match qmp.migrate_recover(listen.uri()) {
                Ok(()) => break,
                // Not paused yet (QEMU has not noticed the link): pause it.
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(vm, error = %e, "post-copy recovery: pausing the destination first");
                    let _ = qmp.migrate_pause();
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(AgentError::State(format!(
                        "the incoming migration of {vm} could not listen again: {e}"
                    )))
                }
            }
        }
        tracing::warn!(
            vm,
            listen = listen.uri(),
            "post-copy recovery: listening again"
        );
        let port = match listen {
            Listen::Relay { path, .. } => {
                let relay = inc.relay.lock();
                let relay = relay.as_ref().ok_or_else(|| {
                    AgentError::State(format!("the stream's relay for {vm} is gone"))
                })?;
                relay.retarget(path);
                relay.port()
            }
            Listen::Tcp { port, .. } => {
                inc.ports.lock().push(port);
                port
            }
        };
        Ok(IncomingReady {
            port,
            disk_size: inc.disk_size,
            tls: self.stream_tls.required(),
        })
    }

    /// The source saw the migration complete: the VM is this host's now.
    pub fn incoming_commit(&self, vm: &str, req: &IncomingCommit) -> Result<IncomingCommitted> {
        let inc = match self.incoming(vm) {
            Ok(inc) => inc,
            // A commit that comes after this host adopted the VM (or a
            // repeated one): it is here and running, which is what the
            // source asks.
            Err(e) => {
                return match self.vms.vm_record(vm) {
                    Ok(r) if r.state == VmState::Running => Ok(IncomingCommitted {
                        pongs: Vec::new(),
                        running_at: None,
                    }),
                    _ => Err(e),
                }
            }
        };
        let status = inc
            .qmp
            .lock()
            .as_mut()
            .map(|q| q.status())
            .transpose()?
            .unwrap_or_default();
        if status != "running" {
            return Err(AgentError::State(format!(
                "vm {vm} is {status} here, not running; not committing"
            )));
        }
        if let Some(disk) = self.exports.disk(vm) {
            disk.flush()
                .map_err(AgentError::io(format!("flushing the disk of {vm}")))?;
        }
        inc.done.store(true, Ordering::Release);
        // The watcher may not have seen the guest run yet.
        let probe = inc.probe.lock().take().or_else(|| self.vms.procs.probe(vm));
        // The guest's first answer here ends the stall being measured; it
        // may come a moment after the migration completed. A guest that
        // never answered the source is not waited for.
        let until = Instant::now() + Duration::from_secs(if req.guest_answers { 5 } else { 0 });
        while probe.as_ref().is_some_and(|p| p.pongs().is_empty()) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        let pongs = probe.map(|p| p.stop()).unwrap_or_default();
        if req.guest_answers && pongs.is_empty() {
            tracing::warn!(vm, "the guest did not answer on spore's channel within 5 s of the commit; its stall is not measured");
        }
        let running_at = *inc.running_at.lock();
        // The monitor is free again for the agent's other uses. The relay
        // is let go: it carries what is still in flight (a post-copy's last
        // pages) and ends with the stream.
        inc.qmp.lock().take();
        inc.relay.lock().take();
        self.jobs.incoming.lock().remove(vm);
        let _ = std::fs::remove_file(self.vms.procs.dir(vm).join(INCOMING_MARK));
        self.vms.set_vm_state(vm, |r| {
            if r.state == VmState::Incoming {
                r.state = VmState::Running;
            }
            r.reason = None;
        })?;
        tracing::info!(vm, from = %inc.from, "migration committed: the VM is here");
        Ok(IncomingCommitted { pongs, running_at })
    }

    /// Takes over a migration arriving here whose guest runs here while
    /// its memory still comes (a post-copy that the agent restart cut off
    /// from the source): it listens again as an incoming migration, so
    /// that the source's recovery (`recover`) and its commit find it.
    /// Returns the line for the start's report.
    pub(super) fn take_over_incoming(self: &Arc<Self>, vm: &str, rec: &VmRecord) -> String {
        let dir = self.vms.procs.dir(vm);
        let from = read_mark::<IncomingMark>(&dir, INCOMING_MARK)
            .map_or_else(|| "its source".to_owned(), |m| m.from);
        let taken = (|| -> Result<()> {
            let mut qmp = Qmp::connect_oob(&dir.join("qmp.sock"), Duration::from_secs(5))?;
            qmp.set_timeout(INCOMING_QMP_TIMEOUT)?;
            let disk_size = self
                .exports
                .disk(&rec.disk)
                .map(|d| d.overlay().size())
                .ok_or_else(|| AgentError::NotFound {
                    kind: "disk",
                    name: rec.disk.clone(),
                })?;
            // The next stream listens on a socket no earlier one used.
            let n = (1..)
                .find(|n| !dir.join(format!("migrate-in-{n}.sock")).exists())
                .expect("a free stream number");
            let relay = match self.stream_listen(vm, n)? {
                Listen::Relay { path, .. } => Some(self.start_relay(vm, path)?),
                Listen::Tcp { .. } => None,
            };
            let entry = Arc::new(Incoming {
                vm: vm.to_owned(),
                from: from.clone(),
                qmp: Mutex::new(Some(qmp)),
                disk_size,
                probe: Mutex::new(None),
                running_at: Mutex::new(Some(epoch_us())),
                ports: Mutex::new(Vec::new()),
                relay: Mutex::new(relay),
                listens: AtomicU32::new(n),
                done: AtomicBool::new(false),
                deadline: Instant::now() + TAKEN_OVER_WAIT,
            });
            self.jobs
                .incoming
                .lock()
                .insert(vm.to_owned(), entry.clone());
            let migration = self.clone();
            std::thread::Builder::new()
                .name(format!("incoming-{vm}"))
                .spawn(move || migration.watch_incoming(entry))
                .map_err(AgentError::io("starting the incoming migration watcher"))?;
            Ok(())
        })();
        match taken {
            Ok(()) => format!(
                "vm {vm}: runs here while its post-copy migration from {from} is under way; \
                 taken over, waiting for the source to resume it"
            ),
            Err(e) => {
                let why = format!(
                    "arrived by a post-copy migration from {from} that an agent restart cut \
                     off, and the new agent could not take it over ({}): memory still at the \
                     source cannot come",
                    e.chain()
                );
                let _ = self.vms.set_vm_state(vm, |r| {
                    r.state = VmState::Running;
                    r.reason = Some(why.clone());
                });
                format!("vm {vm}: {why}")
            }
        }
    }

    pub fn incoming_abort(&self, vm: &str) -> Result<()> {
        self.incoming(vm)?;
        self.discard_incoming(vm, "aborted by the source");
        Ok(())
    }

    /// Removes everything an incoming migration made here.
    fn discard_incoming(&self, vm: &str, why: &str) {
        // The source's abort and this host's watcher (QEMU exited) can
        // both get here: the one that takes the entry removes the VM.
        let Some(inc) = self.jobs.incoming.lock().remove(vm) else {
            return;
        };
        inc.done.store(true, Ordering::Release);
        inc.probe.lock().take();
        inc.qmp.lock().take();
        if let Some(relay) = inc.relay.lock().take() {
            relay.abort();
        }
        tracing::warn!(vm, why, "incoming migration discarded");
        if self
            .meta
            .get::<VmRecord>(Table::Vms, vm)
            .ok()
            .flatten()
            .is_some()
        {
            if let Err(e) = self.vms.remove_vm(vm, true) {
                tracing::error!(vm, error = %e.chain(), "removing an incoming VM failed");
            }
        }
    }
}

/// The connections QEMU accepted for the stream, tuned so far.
#[derive(Default)]
struct ReturnPath {
    /// (listen port, descriptor) of each connection set already.
    tuned: HashSet<(u16, i32)>,
    warned: bool,
}

impl ReturnPath {
    /// Sets `TCP_NODELAY` on the connections QEMU accepted on `ports` that
    /// are new. The guest's post-copy page requests travel back to the
    /// source on the main connection; without it, Nagle holds each request
    /// until the source has acknowledged the previous one, and that
    /// acknowledgement rides on the source's next paced burst of the bulk
    /// stream (2.7 ms at 22.5 MB/s, most of a fault's time under QEMU 10).
    fn tune(&mut self, vm: &str, pid: u32, ports: &[u16]) {
        for &port in ports {
            let sockets = match spore_qemu::sockets::accepted_sockets(pid, port) {
                Ok(s) => s,
                Err(e) => {
                    if !std::mem::replace(&mut self.warned, true) {
                        tracing::warn!(vm, error = %e, "the incoming migration connections cannot be tuned");
                    }
                    continue;
                }
            };
            for s in sockets.iter().filter(|s| self.tuned.insert((port, s.fd))) {
                match s.set_nodelay() {
                    Ok(()) => {
                        tracing::debug!(vm, fd = s.fd, "incoming migration connection: TCP_NODELAY")
                    }
                    Err(e) => {
                        tracing::warn!(vm, fd = s.fd, error = %e, "TCP_NODELAY on an incoming migration connection")
                    }
                }
            }
        }
    }
}
