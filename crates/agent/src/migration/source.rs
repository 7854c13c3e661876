//! The source side of a live migration: the job that moves one VM.
//!
//! 1. Ask the destination to get ready (disk on the same image, QEMU
//!    listening with the same memory layout).
//! 2. Copy every block the VM wrote, and from then on track writes.
//! 3. Start QEMU's migration with `pause-before-switchover`, watch every
//!    pass, let the policy decide; send newly written blocks each second.
//! 4. When QEMU stops the guest for the switch: send the last written
//!    blocks, then let QEMU go on (`migrate-continue`).
//! 5. Completed: the destination commits, this host removes its copy.
//!
//! Until the switch, any failure or a cancel leaves the VM running here and
//! asks the destination to remove what it made.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::json;
use spore_api::{
    IncomingCommit, IncomingCommitted, IncomingReady, IncomingRequest, IncomingStatus,
    MigrateRequest, MigrationInfo, MigrationPhase, MigrationPolicy, VmState,
};
use spore_blockdev::batch::{granule_runs, BatchWriter};
use spore_blockdev::overlay::GRANULE;
use spore_blockdev::Disk;
use spore_qemu::cmdline::has_tcg_bitmap_fix;
use spore_qemu::{epoch_us, longest_gap, Progress, Qmp};

use super::connections::{Connections, DemandMeter};
use super::policy::{Action, Policy};
use super::relay;
use super::takeover::{write_mark, OutgoingMark};
use super::Migration;
use super::{Job, PeerClient};
use crate::error::{AgentError, Result};
use crate::records::now;
use crate::vms::OUTGOING_MARK;

/// The loop polls QEMU this often at most; a MIGRATION event (the guest
/// paused at `pre-switchover`) wakes it at once.
const POLL: Duration = Duration::from_millis(5);
/// Written blocks are sent this often while memory is copied.
const DISK_PASS_EVERY: Duration = Duration::from_secs(1);
/// Before the switch: no byte moved for this long means the link is gone.
const LINK_STALL: Duration = Duration::from_secs(10);
/// In post-copy: no byte moved for this long pauses the migration so that
/// it can be recovered over a new connection.
const POSTCOPY_STALL: Duration = Duration::from_secs(3);
/// How long a broken post-copy migration is retried before giving up.
const RECOVERY_BUDGET: Duration = Duration::from_secs(60);
/// Data per block batch.
const BATCH_BYTES: usize = 4 << 20;
/// How often the timeline records QEMU's progress.
const TIMELINE_EVERY: Duration = Duration::from_millis(100);
/// QEMU's dirty-rate sample for `auto`: one second, 1024 pages per GiB
/// (hashed twice; cheap next to the migration).
const SAMPLE_SECS: u64 = 1;
const SAMPLE_PAGES_PER_GIB: u64 = 1024;
/// No limit, as QEMU takes it (its default is 32 MiB/s).
const UNLIMITED: u64 = 1 << 40;

/// Sends a disk's written blocks to the destination in batches, within
/// the migration's `--bandwidth`.
struct DiskSender<'a> {
    disk: &'a Disk,
    peer: &'a PeerClient,
    path: String,
    /// The cap, bytes per second.
    cap: Option<u64>,
    /// Granules a pass held back to stay within its share of the cap
    /// (sorted); the next pass sends them first.
    held: Mutex<Vec<u64>>,
}

/// When a pass sends blocks, how the disk's bytes fit in the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DiskPass {
    /// Before the memory copy starts: the whole cap, paced.
    First,
    /// While QEMU copies memory: at most a quarter of the cap per pass
    /// (QEMU's stream is slowed by what was sent); the rest waits.
    During,
    /// The guest is paused for the switch: everything, unpaced (QEMU lifts
    /// its own limit for this phase too).
    Last,
}

impl DiskSender<'_> {
    /// Sends this pass's share of `granules` and of what earlier passes
    /// held back; returns the bytes sent.
    fn send(&self, granules: Vec<u64>, pass: DiskPass) -> Result<u64> {
        if pass == DiskPass::First && crate::failpoint::hit("migration-disk-first-pass") {
            return Err(AgentError::State(
                "fail-point migration-disk-first-pass".into(),
            ));
        }
        let budget = match (pass, self.cap) {
            (DiskPass::During, Some(cap)) => Some(cap / 4 * DISK_PASS_EVERY.as_secs().max(1)),
            _ => None,
        };
        let now = {
            let mut held = self.held.lock();
            share_of_pass(&mut held, granules, budget)
        };
        let rate = match pass {
            DiskPass::First => self.cap,
            DiskPass::During | DiskPass::Last => None,
        };
        self.send_now(&now, rate)
    }

    /// Sends the given granules (sorted), paced at `rate` bytes per second
    /// if given; returns the bytes sent.
    fn send_now(&self, granules: &[u64], rate: Option<u64>) -> Result<u64> {
        let size = self.disk.overlay().size();
        let start = Instant::now();
        let mut batch = BatchWriter::new(size);
        let mut sent = 0u64;
        let flush = |batch: BatchWriter, sent: u64| -> Result<u64> {
            let n = batch.data_bytes() as u64;
            let _: u64 = self.peer.put_bytes(&self.path, &batch.finish())?;
            if let Some(rate) = rate {
                std::thread::sleep(pace_wait(sent + n, rate, start.elapsed()));
            }
            Ok(n)
        };
        for (first, n) in granule_runs(granules, 256) {
            let offset = first * GRANULE;
            let len = (n * GRANULE).min(size - offset) as usize;
            let mut buf = vec![0u8; len];
            self.disk
                .overlay()
                .read_data(offset, &mut buf)
                .map_err(AgentError::io("reading the disk's written blocks"))?;
            batch.push(offset, &buf);
            if batch.data_bytes() >= BATCH_BYTES {
                sent += flush(std::mem::replace(&mut batch, BatchWriter::new(size)), sent)?;
            }
        }
        if !batch.is_empty() {
            sent += flush(batch, sent)?;
        }
        Ok(sent)
    }
}

/// RAM that QEMU of `version` cannot track exactly under TCG, if any: its
/// dirty-bitmap bug before 9.0 loses writes to a RAM block sized in whole
/// 256 KiB (spore_qemu::cmdline::ram_kib_for sizes boot RAM around it). A
/// DIMM cannot be sized so, nor a VM that came from a newer QEMU.
/// Why a VM must not be moved by post-copy, if it must not: under TCG a
/// post-copy of a VM with hot-plugged memory or CPUs corrupted the guest's
/// memory at the destination (QEMU 10.0; measured with the demo guest: a
/// kernel oops or a process's heap found broken after the move, in most
/// trials; pre-copy moved the same VMs intact every time).
fn no_postcopy_for(accel: &str, layout: &spore_qemu::MemoryLayout) -> Option<String> {
    if accel != "tcg" {
        return None;
    }
    let dimms = layout.dimms.len();
    let cpus = layout.cpus.saturating_sub(layout.boot_cpus);
    (dimms > 0 || cpus > 0).then(|| {
        format!(
            "under TCG, post-copy corrupts a VM with hot-plugged memory or CPUs (this one has \
             {dimms} DIMMs and {cpus} CPUs added)"
        )
    })
}

fn untrackable_ram(
    accel: &str,
    version: (u64, u64, u64),
    layout: &spore_qemu::MemoryLayout,
) -> Option<String> {
    if accel != "tcg" || has_tcg_bitmap_fix(Some(version)) {
        return None;
    }
    if !layout.dimms.is_empty() {
        Some(format!("hot-plugged memory ({} DIMMs)", layout.dimms.len()))
    } else if layout.base_kib.is_multiple_of(256) {
        Some(format!(
            "boot RAM in whole 256 KiB ({} KiB)",
            layout.base_kib
        ))
    } else {
        None
    }
}

/// The granules a pass sends: what earlier passes held back and the newly
/// written ones (sorted, each once), at most `budget` bytes of them (at
/// least one granule); the rest is held back for the next pass.
fn share_of_pass(held: &mut Vec<u64>, new: Vec<u64>, budget: Option<u64>) -> Vec<u64> {
    let mut all = std::mem::take(held);
    all.extend(new);
    all.sort_unstable();
    all.dedup();
    if let Some(budget) = budget {
        let n = (budget / GRANULE).max(1) as usize;
        if all.len() > n {
            *held = all.split_off(n);
        }
    }
    all
}

/// How long to wait after `sent` bytes, `elapsed` into a send paced at
/// `rate` bytes per second.
fn pace_wait(sent: u64, rate: u64, elapsed: Duration) -> Duration {
    Duration::from_secs_f64(sent as f64 / rate.max(1) as f64).saturating_sub(elapsed)
}

/// What the destination says of a guest whose switch broke off.
enum Destination {
    Runs,
    Gone,
    Unknown(String),
}

/// Asks the destination to remove what it made, unless disarmed.
struct AbortGuard<'a> {
    peer: &'a PeerClient,
    vm: String,
    armed: bool,
}

impl Drop for AbortGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let path = format!("/v1/migrations/{}/abort", self.vm);
        // The link may be down for a while: retry in the background.
        let (peer, vm) = (self.peer.clone(), self.vm.clone());
        let _ = std::thread::Builder::new()
            .name(format!("abort-{vm}"))
            .spawn(move || {
                for attempt in 0..12 {
                    match peer.post::<serde_json::Value>(&path, &json!({})) {
                        Ok(_) => return,
                        Err(e) if e.chain().contains(": 404") => return,
                        Err(e) => {
                            tracing::warn!(%vm, attempt, error = %e.chain(), "aborting at the destination failed; retrying")
                        }
                    }
                    std::thread::sleep(Duration::from_secs(5));
                }
            });
    }
}

impl Migration {
    /// Starts moving a running VM to another agent; returns at once (poll
    /// [`Agent::migration`]).
    pub fn migrate_vm(self: &Arc<Self>, name: &str, req: MigrateRequest) -> Result<MigrationInfo> {
        let rec = self.vms.vm_record(name)?;
        if rec.state != VmState::Running || self.vms.running_vm(name).is_none() {
            return Err(AgentError::State(format!(
                "vm {name} is {}, not running",
                rec.state
            )));
        }
        if req.max_downtime_ms == 0 || req.timeout_s == 0 {
            return Err(AgentError::Invalid(
                "the downtime limit and the timeout must be above zero".into(),
            ));
        }
        PeerClient::new(&req.to, Duration::from_secs(1), &self.links)?.host()?;
        let job = new_job(name, &req);
        {
            let mut jobs = self.jobs.outgoing.lock();
            if jobs
                .get(name)
                .is_some_and(|j| !j.info.lock().phase.finished())
            {
                return Err(AgentError::State(format!("vm {name} is migrating away")));
            }
            jobs.insert(name.to_owned(), job.clone());
        }
        let info = job.info.lock().clone();
        let (migration, vm) = (self.clone(), name.to_owned());
        std::thread::Builder::new()
            .name(format!("migrate-{name}"))
            .spawn(move || migration.run_migration(&vm, &req, &job))
            .map_err(AgentError::io("starting the migration"))?;
        Ok(info)
    }

    pub fn migration(&self, name: &str) -> Result<MigrationInfo> {
        self.jobs.info(name).ok_or_else(|| AgentError::NotFound {
            kind: "migration of vm",
            name: name.into(),
        })
    }

    /// Cancels a migration before the switch; the VM keeps running here.
    pub fn cancel_migration(&self, name: &str) -> Result<MigrationInfo> {
        let job = self
            .jobs
            .outgoing
            .lock()
            .get(name)
            .cloned()
            .ok_or_else(|| AgentError::NotFound {
                kind: "migration of vm",
                name: name.into(),
            })?;
        let phase = job.info.lock().phase;
        match phase {
            p if p.finished() => {
                return Err(AgentError::State(format!(
                    "the migration of {name} already ended ({p})"
                )))
            }
            MigrationPhase::Postcopy => {
                return Err(AgentError::State(format!(
                    "vm {name} already runs at the destination (post-copy); \
                     cancelling now would lose it"
                )))
            }
            _ if job.continued.load(Ordering::Acquire) => {
                return Err(AgentError::State(format!(
                    "vm {name} is switching hosts (its state is on the way); \
                     it cannot be taken back now"
                )))
            }
            _ => job.cancel.store(true, Ordering::Release),
        }
        let info = job.info.lock().clone();
        Ok(info)
    }

    fn run_migration(self: Arc<Self>, name: &str, req: &MigrateRequest, job: &Arc<Job>) {
        let result = self.migrate_inner(name, req, job);
        self.end_job(name, req, job, result);
    }

    /// Records how a migration ended; its mark goes with it.
    fn end_job(&self, name: &str, req: &MigrateRequest, job: &Job, result: Result<()>) {
        let _ = std::fs::remove_file(self.vms.procs.dir(name).join(OUTGOING_MARK));
        let mut i = job.info.lock();
        i.elapsed_ms = job.ms();
        match result {
            Ok(()) => {
                i.phase = MigrationPhase::Completed;
                tracing::info!(vm = name, to = %req.to, ms = i.elapsed_ms, downtime_ms = ?i.downtime_ms, stall_ms = ?i.guest_stall_ms, "migration completed");
            }
            Err(e) => {
                i.phase = if job.cancel.load(Ordering::Acquire) {
                    MigrationPhase::Cancelled
                } else {
                    MigrationPhase::Failed
                };
                i.error = Some(e.chain());
                tracing::warn!(vm = name, to = %req.to, phase = %i.phase, error = %e.chain(), "migration ended without moving the VM");
            }
        }
    }

    fn migrate_inner(&self, name: &str, req: &MigrateRequest, job: &Arc<Job>) -> Result<()> {
        let peer = PeerClient::new(&req.to, Duration::from_secs(60), &self.links)?;
        let host = peer.host()?;
        let rec = self.vms.vm_record(name)?;
        let disk = self
            .exports
            .disk(&rec.disk)
            .ok_or_else(|| AgentError::NotFound {
                kind: "disk",
                name: rec.disk.clone(),
            })?;
        let mut qmp = Qmp::connect(
            &self.vms.procs.dir(name).join("qmp.sock"),
            Duration::from_secs(5),
        )?;
        let layout = qmp.memory_layout()?;
        let version = qmp.version()?;
        if let Some(what) = untrackable_ram(&rec.accel, version, &layout) {
            return Err(AgentError::State(format!(
                "vm {name} has {what}: under TCG, QEMU before 9.0 (this is {}.{}.{}) \
                 loses the guest's writes to it during a live migration; not migrating",
                version.0, version.1, version.2
            )));
        }
        let adjusted;
        let req = match no_postcopy_for(&rec.accel, &layout) {
            Some(why) if req.policy == MigrationPolicy::Postcopy || req.allow_postcopy => {
                let mut r = req.clone();
                if r.policy == MigrationPolicy::Postcopy {
                    r.policy = MigrationPolicy::Precopy;
                }
                r.allow_postcopy = false;
                job.decide(
                    0,
                    format!(
                        "no post-copy for this VM: {why}; {}",
                        if req.policy == MigrationPolicy::Postcopy {
                            "pre-copy instead"
                        } else {
                            "auto throttles the guest instead"
                        }
                    ),
                );
                adjusted = r;
                &adjusted
            }
            _ => req,
        };
        let mut policy = Policy::new(
            req.policy,
            req.allow_postcopy,
            req.max_downtime_ms,
            req.bandwidth,
        );
        let postcopy = policy.may_postcopy();
        // Faulted pages overtake the background stream on their own
        // connection: the guest waits for one page, not for the queue.
        let has_preempt = qmp
            .migration_capabilities()?
            .iter()
            .any(|c| c == "postcopy-preempt");
        let preempt = postcopy && has_preempt;
        job.info.lock().postcopy_preempt = preempt;
        let id = rec.identity.clone();
        let ready: IncomingReady = peer.post(
            "/v1/migrations",
            &IncomingRequest {
                vm: name.to_owned(),
                from: self
                    .peer_addr
                    .get()
                    .cloned()
                    .or_else(|| self.listen.clone())
                    .unwrap_or_else(|| "a host".into()),
                image: rec.image.clone(),
                manifest: Some(self.disks.disk_record(&rec.disk)?.manifest.to_hex()),
                accel: rec.accel.clone(),
                memory_mib: rec.memory_mib,
                cpus: rec.cpus,
                max_memory_mib: rec.max_memory_mib,
                max_cpus: rec.max_cpus,
                base_mib: layout.base_mib,
                base_kib: Some(layout.base_kib),
                dimms: layout.dimms.clone(),
                boot_cpus: layout.boot_cpus,
                mac: id.as_ref().map(|i| i.mac.clone()),
                vmgenid: id.as_ref().map(|i| i.vmgenid.clone()),
                hostname: id.as_ref().map(|i| i.hostname.clone()),
                instance_id: id.as_ref().map(|i| i.instance_id.clone()),
                group: rec.group.clone(),
                postcopy,
                postcopy_preempt: preempt,
                timeout_s: req.timeout_s,
            },
        )?;
        let mut guard = AbortGuard {
            peer: &peer,
            vm: name.to_owned(),
            armed: true,
        };
        // A restart of this agent from here on finds the migration by it
        // (takeover.rs).
        write_mark(
            &self.vms.procs.dir(name),
            OUTGOING_MARK,
            &OutgoingMark {
                req: req.clone(),
                tls: ready.tls,
            },
        )
        .map_err(AgentError::io("marking the migration"))?;
        job.decide(
            0,
            format!(
                "destination ready: {} on {host}:{}, disk on image {}",
                if ready.tls {
                    "its stream relay listening"
                } else {
                    "QEMU listening"
                },
                ready.port,
                rec.image
            ),
        );
        if ready.disk_size != disk.overlay().size() {
            return Err(AgentError::State(format!(
                "the destination's disk has {} bytes, this one {}",
                ready.disk_size,
                disk.overlay().size()
            )));
        }

        job.set_phase(MigrationPhase::Disk);
        let sender = DiskSender {
            disk: &disk,
            peer: &peer,
            path: format!("/v1/migrations/{name}/blocks"),
            cap: req.bandwidth,
            held: Mutex::new(Vec::new()),
        };
        let send_pass = |granules: Vec<u64>, pass: DiskPass| -> Result<u64> {
            let last = pass == DiskPass::Last;
            // Nothing written: no request (while paused, a round trip is
            // downtime).
            if granules.is_empty() && sender.held.lock().is_empty() {
                if last {
                    job.info.lock().disk_final_bytes = 0;
                }
                return Ok(0);
            }
            let bytes = sender.send(granules, pass)?;
            let mut i = job.info.lock();
            i.disk_bytes += bytes;
            i.disk_passes += 1;
            if last {
                i.disk_final_bytes = bytes;
            }
            Ok(bytes)
        };
        let written = disk.overlay().start_tracking();
        let result = (|| -> Result<Route> {
            let route = self.route(&ready, &host, name, job)?;
            send_pass(written, DiskPass::First)?;
            self.start_qemu_migration(
                &mut qmp,
                req,
                &policy,
                has_preempt.then_some(preempt),
                &route.uri,
            )?;
            Ok(route)
        })();
        let route = match result {
            Ok(route) => route,
            Err(e) => {
                disk.overlay().stop_tracking();
                return Err(e);
            }
        };
        job.set_phase(MigrationPhase::Memory);
        let sampling = policy.wants_sample()
            && match qmp.start_dirty_rate(SAMPLE_SECS, SAMPLE_PAGES_PER_GIB) {
                Ok(()) => true,
                Err(e) => {
                    job.decide(
                        1,
                        format!("no dirty-rate sample ({e}): deciding at pass ends"),
                    );
                    false
                }
            };
        // Pings while the guest is paused for the switch wait in its queue
        // and travel with its state; the probe stops once QEMU is done
        // (stopping it at `pre-switchover` cost up to its 10 ms interval of
        // downtime).
        let probe = self.vms.procs.probe(name);
        let start_us = epoch_us();
        // The connections that meet the link: the relay's (this agent's)
        // in TLS, QEMU's own in plaintext.
        let mut conns = self.vms.running_vm(name).map(|(pid, _)| {
            let pid = if route.relay.is_some() {
                std::process::id()
            } else {
                pid
            };
            Connections::new(pid, &host, ready.port, req.bandwidth)
        });

        let outcome = self.follow_migration(
            &mut qmp,
            req,
            job,
            &mut policy,
            &peer,
            &route,
            name,
            sampling,
            &mut conns,
            || send_pass(disk.overlay().take_tracked(), DiskPass::During),
            || {
                let r = send_pass(disk.overlay().take_tracked(), DiskPass::Last);
                disk.overlay().stop_tracking();
                r
            },
        );
        let src_pongs = probe.map(|p| p.stop()).unwrap_or_default();
        match outcome {
            Ok(()) => {}
            Err(e) => {
                disk.overlay().stop_tracking();
                if job.info.lock().phase == MigrationPhase::Postcopy {
                    // The guest runs at the destination: neither side may
                    // be removed or resumed (recover_postcopy said so).
                    guard.armed = false;
                } else if job.continued.load(Ordering::Acquire) {
                    // The destination may run the guest by now: ask it,
                    // never resume here on a guess.
                    guard.armed = false;
                    match self.ask_destination(&peer, name) {
                        Destination::Runs => {
                            job.decide(
                                0,
                                format!(
                                    "{}; but the guest runs at the destination: the move completed",
                                    e.chain()
                                ),
                            );
                        }
                        Destination::Gone => {
                            self.take_back(name, &mut qmp);
                            return Err(e);
                        }
                        Destination::Unknown(why) => {
                            let to = req.to.clone();
                            let _ = self.vms.set_vm_state(name, |r| {
                                r.state = VmState::Failed;
                                r.reason = Some(format!(
                                    "the switch to {to} broke off and {to} could not say whether \
                                     it runs the guest ({why}); this copy stays paused and must \
                                     not be resumed until {to} is checked"
                                ));
                            });
                            return Err(e);
                        }
                    }
                } else {
                    self.take_back(name, &mut qmp);
                    return Err(e);
                }
                if job.info.lock().phase == MigrationPhase::Postcopy {
                    return Err(e);
                }
            }
        }
        // Completed: the VM is at the destination.
        guard.armed = false;
        let committed = self.commit_at(&peer, name, &req.to, !src_pongs.is_empty())?;
        {
            let mut i = job.info.lock();
            let mut all = src_pongs;
            let end = committed.pongs.last().copied();
            all.extend(committed.pongs.iter().copied());
            i.guest_stall_ms = match end {
                Some(end) => {
                    let (gap, at) = longest_gap(&all, start_us, end);
                    i.guest_stall_at_ms = Some(at.saturating_sub(job.t0_us) as f64 / 1e3);
                    Some(gap as f64 / 1e3)
                }
                None => {
                    drop(i);
                    job.decide(
                        0,
                        "the guest does not answer spore's channel (a guest without it, such as \
                         a stock distribution): its stall is unknown, QEMU's downtime stands for it"
                            .into(),
                    );
                    i = job.info.lock();
                    None
                }
            };
            i.elapsed_ms = job.ms();
        }
        // This host's copy goes: QEMU (paused after the switch), its disk,
        // its record. The monitor must be free for the quit.
        drop(qmp);
        if let Err(e) = self.vms.remove_vm(name, true) {
            job.decide(0, format!("removing the source copy failed: {}", e.chain()));
        }
        Ok(())
    }

    /// Commits a migration QEMU completed at the destination. If the
    /// destination does not confirm, this copy (paused after the switch)
    /// is marked failed: the guest may run there, so it must never run
    /// here again.
    fn commit_at(
        &self,
        peer: &PeerClient,
        name: &str,
        to: &str,
        guest_answers: bool,
    ) -> Result<IncomingCommitted> {
        let path = format!("/v1/migrations/{name}/commit");
        let mut last = None;
        for _ in 0..5 {
            if crate::failpoint::hit("migration-commit-lost") {
                last = Some(AgentError::State("fail-point migration-commit-lost".into()));
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            match peer.post(&path, &IncomingCommit { guest_answers }) {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let _ = self.vms.set_vm_state(name, |r| {
            r.state = VmState::Failed;
            r.reason = Some(format!(
                "migrated to {to}, which did not confirm; the guest may run \
                 there: this copy stays paused and must not be resumed"
            ));
        });
        Err(AgentError::State(format!(
            "QEMU completed the migration but the destination did not commit ({}); \
             the guest is at {to}, this host keeps its stopped copy",
            last.map(|e| e.chain()).unwrap_or_default(),
        )))
    }

    /// How QEMU's stream goes to the destination: through spore's TLS (a
    /// relay at each end) when the destination requires TLS, else straight
    /// to its QEMU.
    fn route(&self, ready: &IncomingReady, host: &str, name: &str, job: &Job) -> Result<Route> {
        job.info.lock().stream_tls = ready.tls;
        if !ready.tls {
            job.decide(
                0,
                "memory stream in plaintext: the destination listens with --insecure-listen".into(),
            );
            return Ok(Route {
                uri: format!("tcp:{host}:{}", ready.port),
                host: host.to_owned(),
                relay: None,
            });
        }
        let client = self.stream_tls.client.clone().ok_or_else(|| {
            AgentError::State(
                "the destination requires TLS for the memory stream and this host has no certificate (spore ca issue HOST --role host)".into(),
            )
        })?;
        let socket = self.vms.procs.dir(name).join(OUT_SOCKET);
        let relay = relay::Outbound::start(&socket, resolve(host, ready.port)?, host, client)
            .map_err(AgentError::io("starting the migration stream's relay"))?;
        job.decide(
            0,
            format!(
                "memory stream in spore's TLS (a relay at each end), the destination's \
                 certificate must name {host}"
            ),
        );
        Ok(Route {
            uri: format!("unix:{OUT_SOCKET}"),
            host: host.to_owned(),
            relay: Some(relay),
        })
    }

    fn start_qemu_migration(
        &self,
        qmp: &mut Qmp,
        req: &MigrateRequest,
        policy: &Policy,
        preempt: Option<bool>,
        uri: &str,
    ) -> Result<()> {
        let throttle_fallback = req.policy == MigrationPolicy::Auto && !req.allow_postcopy;
        let mut caps = vec![
            // A VM captured as a template (and resumed from it) or a clone
            // kept it on from loading its device state, and QEMU refuses
            // post-copy with it and sends a stream the destination does
            // not expect: the whole RAM moves.
            ("x-ignore-shared", false),
            ("postcopy-ram", policy.may_postcopy()),
            ("pause-before-switchover", true),
            // MIGRATION events wake the loop that waits for the pause.
            ("events", true),
            (
                "auto-converge",
                req.policy == MigrationPolicy::AutoConverge || throttle_fallback,
            ),
        ];
        // Set either way where QEMU knows it: capabilities outlive a
        // migration that failed or was cancelled.
        if let Some(on) = preempt {
            caps.push(("postcopy-preempt", on));
        }
        qmp.set_capabilities(&caps)?;
        let mut params = json!({
            "downtime-limit": policy.downtime_target_ms(),
            "max-bandwidth": req.bandwidth.unwrap_or(UNLIMITED),
            "max-postcopy-bandwidth": req.bandwidth.unwrap_or(0),
        });
        if throttle_fallback {
            // Throttling only when the policy asks for it (Action::Throttle).
            params["throttle-trigger-threshold"] = json!(100);
            params["cpu-throttle-initial"] = json!(1);
            params["cpu-throttle-increment"] = json!(1);
        }
        qmp.set_parameters(params)?;
        // An older agent may have left QEMU's own TLS set.
        qmp.set_migration_tls(None)?;
        qmp.migrate(uri)?;
        Ok(())
    }

    /// Follows QEMU's migration to its end. `disk_pass` sends blocks
    /// written since the last call; `final_pass` does it once more while the
    /// guest is paused before the switch.
    #[allow(clippy::too_many_arguments)]
    fn follow_migration(
        &self,
        qmp: &mut Qmp,
        req: &MigrateRequest,
        job: &Arc<Job>,
        policy: &mut Policy,
        peer: &PeerClient,
        route: &Route,
        name: &str,
        sampling: bool,
        conns: &mut Option<Connections>,
        disk_pass: impl Fn() -> Result<u64>,
        final_pass: impl Fn() -> Result<u64>,
    ) -> Result<()> {
        let deadline = job.t0 + Duration::from_secs(req.timeout_s);
        let mut last_disk = Instant::now();
        // QEMU's limit, the cap less the disk's last pass.
        let mut ram_cap = req.bandwidth.unwrap_or(UNLIMITED);
        let mut last_sample = Instant::now() - TIMELINE_EVERY;
        let mut last_status = String::new();
        let mut moved = (0u64, Instant::now());
        let mut cancelling: Option<String> = None;
        // A post-copy stall before the destination ran the guest was noted.
        let mut stall_noted = false;
        // QEMU's dirty-rate sample, read once it is ready.
        let mut sample_at = sampling.then(|| Instant::now() + Duration::from_secs(SAMPLE_SECS));
        // The guest's page requests in post-copy, to share the cap with.
        let mut demand = DemandMeter::default();
        let switch_to_postcopy = |qmp: &mut Qmp, p: &Progress, paced: bool| -> Result<()> {
            // Paced, the connection keeps the cap; QEMU's own limit would
            // hold page requests until its 100 ms window ends.
            if req.bandwidth.is_some() && paced {
                qmp.set_parameters(json!({ "max-postcopy-bandwidth": 0 }))?;
            }
            if let Err(e) = qmp.start_postcopy() {
                job.decide(p.passes, format!("post-copy refused by QEMU: {e}"));
            }
            Ok(())
        };
        loop {
            let p = qmp.migration_progress()?;
            let changed = p.status != last_status;
            job.update(&p, changed || last_sample.elapsed() >= TIMELINE_EVERY);
            if changed || last_sample.elapsed() >= TIMELINE_EVERY {
                last_sample = Instant::now();
            }
            if p.ram_transferred != moved.0 {
                moved = (p.ram_transferred, Instant::now());
            }
            if changed && p.status == "active" {
                crate::failpoint::stall("migration-outgoing-active");
            }
            match p.status.as_str() {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    let why = cancelling.clone().unwrap_or_else(|| {
                        format!(
                            "QEMU's migration {}: {}",
                            p.status,
                            p.error.clone().unwrap_or_else(|| "no reason given".into())
                        )
                    });
                    return Err(AgentError::State(format!(
                        "{why}; the VM keeps running here"
                    )));
                }
                "pre-switchover" if changed => {
                    job.info.lock().switched_at_ms = Some(job.ms());
                    job.set_phase(MigrationPhase::Switching);
                    if let Some(note) = conns.as_mut().and_then(Connections::unpace_for_switch) {
                        job.decide(p.passes, note);
                    }
                    final_pass()?;
                    if crate::failpoint::hit("migration-before-continue") {
                        return Err(AgentError::State(
                            "fail-point migration-before-continue".into(),
                        ));
                    }
                    // Set before the command: it may reach QEMU even if
                    // its answer does not reach us.
                    job.continued.store(true, Ordering::Release);
                    if crate::failpoint::hit("migration-continue-withheld") {
                        return Err(AgentError::State(
                            "fail-point migration-continue-withheld".into(),
                        ));
                    }
                    qmp.migrate_continue()?;
                    if crate::failpoint::hit("migration-after-continue") {
                        return Err(AgentError::State(
                            "fail-point migration-after-continue".into(),
                        ));
                    }
                }
                "postcopy-active" => {
                    if changed {
                        job.set_phase(MigrationPhase::Postcopy);
                        watch_destination_runs(job.clone(), peer.clone(), name.to_owned());
                        // Paced again at once, with room for the first
                        // page requests (the meter needs a window).
                        if let Some(c) = conns.as_mut() {
                            c.repace(req.bandwidth.unwrap_or(0) * 3 / 4);
                        }
                    }
                    if let Some(rate) = demand.observe(p.postcopy_requests, Instant::now()) {
                        // With a margin: the estimate lags a rising demand.
                        let note = conns
                            .as_mut()
                            .and_then(|c| c.share_with_demand(rate.saturating_mul(5) / 4));
                        if let Some(note) = note {
                            job.decide(p.passes, note);
                        }
                    }
                    if p.ram_remaining > 0 && moved.1.elapsed() > POSTCOPY_STALL {
                        // Paused before the destination runs the guest (it
                        // still loads the device state), QEMU fails the
                        // destination and the source can neither resume nor
                        // cancel: the guest would be lost. Until the
                        // destination says it runs, wait for the link.
                        if job.info.lock().destination_runs_at_ms.is_some() {
                            pause_stalled_postcopy(qmp, job, p.passes);
                        } else if !stall_noted {
                            stall_noted = true;
                            job.decide(
                                p.passes,
                                format!(
                                    "post-copy: nothing moved for {} s, but the destination has \
                                     not said its guest runs: not pausing (a post-copy broken \
                                     off before then is lost); waiting for the link",
                                    POSTCOPY_STALL.as_secs()
                                ),
                            );
                        }
                        moved.1 = Instant::now();
                    }
                }
                "postcopy-paused" => {
                    let port = self.recover_postcopy(qmp, job, peer, route, name, &p)?;
                    if let Some(c) = conns.as_mut() {
                        c.retarget(&route.host, port);
                    }
                    moved.1 = Instant::now();
                }
                _ => {}
            }
            if !p.switched()
                && p.status != "pre-switchover"
                && !job.continued.load(Ordering::Acquire)
                && cancelling.is_none()
            {
                let reason = if job.cancel.load(Ordering::Acquire) {
                    Some("cancelled on request".to_owned())
                } else if Instant::now() > deadline {
                    Some(format!(
                        "the VM did not switch hosts within the {} s timeout",
                        req.timeout_s
                    ))
                } else if moved.1.elapsed() > LINK_STALL {
                    Some(format!(
                        "nothing reached the destination for {} s (link down?)",
                        LINK_STALL.as_secs()
                    ))
                } else {
                    None
                };
                if let Some(r) = reason {
                    job.decide(p.passes, format!("{r}: cancelling"));
                    qmp.migrate_cancel()?;
                    cancelling = Some(r);
                }
            }
            if matches!(p.status.as_str(), "active" | "postcopy-active") {
                if let Some(note) = conns.as_mut().and_then(Connections::poll) {
                    job.decide(p.passes, note);
                }
            }
            if cancelling.is_none() {
                let mut decision = policy.observe(&p);
                if decision.is_none() && sample_at.is_some_and(|t| Instant::now() >= t) {
                    match qmp.dirty_rate() {
                        Ok(Some(rate)) => {
                            sample_at = None;
                            {
                                let mut i = job.info.lock();
                                i.sampled_dirty_rate = i.sampled_dirty_rate.max(Some(rate));
                            }
                            decision = policy.observe_sampled(rate, &p);
                            // One second is a short look at a guest: while
                            // the first pass lasts, look again.
                            let acted = decision.as_ref().is_some_and(|d| d.action.is_some());
                            if !acted && p.passes <= 1 && p.status == "active" {
                                match qmp.start_dirty_rate(SAMPLE_SECS, SAMPLE_PAGES_PER_GIB) {
                                    Ok(()) => {
                                        sample_at =
                                            Some(Instant::now() + Duration::from_secs(SAMPLE_SECS))
                                    }
                                    Err(e) => job.decide(
                                        p.passes,
                                        format!("no further dirty-rate sample ({e})"),
                                    ),
                                }
                            }
                        }
                        Ok(None) => sample_at = Some(Instant::now() + Duration::from_millis(50)),
                        Err(e) => {
                            sample_at = None;
                            job.decide(p.passes, format!("no dirty-rate sample ({e})"));
                        }
                    }
                }
                if let Some(d) = decision {
                    job.decide(p.passes, d.why.clone());
                    match d.action {
                        Some(Action::Postcopy) => switch_to_postcopy(
                            qmp,
                            &p,
                            conns.as_ref().is_some_and(Connections::paced),
                        )?,
                        Some(Action::Throttle(pct)) => qmp.set_parameters(json!({
                            "throttle-trigger-threshold": 10,
                            "cpu-throttle-initial": pct,
                            "cpu-throttle-increment": 10,
                        }))?,
                        Some(Action::RelaxDowntime(ms)) => {
                            qmp.set_parameters(json!({ "downtime-limit": ms }))?
                        }
                        None => {}
                    }
                }
                if p.status == "active" && last_disk.elapsed() >= DISK_PASS_EVERY {
                    let sent = disk_pass()?;
                    last_disk = Instant::now();
                    // The disk's bytes of this pass come out of QEMU's
                    // share of the cap until the next pass.
                    if let Some(cap) = req.bandwidth {
                        let ram = cap.saturating_sub(sent / DISK_PASS_EVERY.as_secs().max(1));
                        if ram != ram_cap {
                            qmp.set_parameters(json!({ "max-bandwidth": ram }))?;
                            ram_cap = ram;
                        }
                    }
                }
            }
            last_status = p.status;
            // A MIGRATION event (QEMU pausing the guest for the switch,
            // say) ends the wait at once: that pause is downtime until this
            // loop sees it.
            qmp.events.clear();
            qmp.wait_event(POLL)?;
        }
    }

    /// Post-copy broke off: the guest runs at the destination and part of
    /// its memory is still here. Reconnect until it works or the budget is
    /// spent; then fail loudly, leaving both sides as they are.
    fn recover_postcopy(
        &self,
        qmp: &mut Qmp,
        job: &Job,
        peer: &PeerClient,
        route: &Route,
        name: &str,
        p: &Progress,
    ) -> Result<u16> {
        let start = Instant::now();
        job.decide(
            p.passes,
            format!(
                "post-copy link broken with {:.1} MB not yet sent: recovering",
                p.ram_remaining as f64 / 1e6
            ),
        );
        let path = format!("/v1/migrations/{name}/recover");
        // Short attempts: a request sent while the link was down must not
        // use up the budget.
        let peer = &peer.with_timeout(Duration::from_secs(10));
        let mut attempt = 0;
        let mut last_error = String::new();
        while start.elapsed() < RECOVERY_BUDGET {
            attempt += 1;
            match peer.post::<IncomingReady>(&path, &json!({})) {
                Ok(r) => match route
                    .resume(r.port)
                    .and_then(|uri| Ok(qmp.migrate_resume(&uri)?))
                {
                    Ok(()) => {
                        // Wait for the resumed stream to take.
                        let until = Instant::now() + Duration::from_secs(5);
                        while Instant::now() < until {
                            let s = qmp.migration_progress()?.status;
                            if s == "postcopy-active" || s == "completed" {
                                job.decide(
                                    p.passes,
                                    format!("post-copy recovered (attempt {attempt})"),
                                );
                                return Ok(r.port);
                            }
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        last_error = "the resumed stream did not take".into();
                    }
                    Err(e) => last_error = e.to_string(),
                },
                Err(e) => last_error = e.chain(),
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        let here = qmp
            .migration_progress()
            .map(|p| {
                format!(
                    "{}, {:.1} MB of guest memory not yet sent",
                    p.status,
                    p.ram_remaining as f64 / 1e6
                )
            })
            .unwrap_or_else(|e| format!("unknown ({e})"));
        // What the destination last said of itself.
        let there = if last_error.contains(": 404") {
            "it no longer has the incoming migration (its QEMU ended, or it removed the VM: \
             see its log), so the guest is lost"
        } else {
            "not reached or refused, so its state is unknown: its QEMU, if it still runs, holds \
             the guest paused, waiting for the rest of its memory"
        };
        let msg = format!(
            "post-copy could not be recovered in {} s ({attempt} attempts, last: {last_error}). \
             Source (this host): QEMU kept with migration state {here}; it holds the only copy \
             of that memory, and was not removed. Destination {}: {there}.",
            RECOVERY_BUDGET.as_secs(),
            peer_url(peer)
        );
        let _ = self.vms.set_vm_state(name, |r| {
            r.state = VmState::Failed;
            r.reason = Some(msg.clone());
        });
        Err(AgentError::State(msg))
    }

    /// Before the switch, after an error of ours: stop QEMU's migration (if
    /// it still runs) and make sure the guest runs here.
    /// Whether the destination runs the guest, asked by committing there
    /// (the commit succeeds exactly when the guest runs there, and a late
    /// one is answered for a VM it adopted).
    fn ask_destination(&self, peer: &PeerClient, name: &str) -> Destination {
        let path = format!("/v1/migrations/{name}/commit");
        let mut why = String::new();
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            match peer.post::<IncomingCommitted>(&path, &json!({})) {
                Ok(_) => return Destination::Runs,
                // It discarded the migration: no copy runs there.
                Err(e) if e.chain().contains(": 404") => return Destination::Gone,
                Err(e) => why = e.chain(),
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Destination::Unknown(why)
    }

    fn take_back(&self, name: &str, qmp: &mut Qmp) {
        if let Ok(p) = qmp.migration_progress() {
            if !p.finished() {
                let _ = qmp.migrate_cancel();
                let until = Instant::now() + Duration::from_secs(10);
                while Instant::now() < until {
                    match qmp.migration_progress() {
                        Ok(p) if !p.finished() => std::thread::sleep(Duration::from_millis(20)),
                        _ => break,
                    }
                }
            }
        }
        if let Ok(s) = qmp.status() {
            if matches!(s.as_str(), "paused" | "postmigrate" | "finish-migrate") {
                tracing::warn!(vm = name, status = %s, "resuming the source VM after a failed migration");
                let _ = qmp.execute("cont", None);
            }
        }
    }
}

/// How the migration of a VM whose agent restarted is settled.
impl Migration {
    /// Takes over a migration away from this host that the previous agent
    /// left in flight (its mark says where to). Past the switch (QEMU is in
    /// post-copy or has completed), the migration is resumed and finished
    /// in the background, as `spore vm migration` shows; before it, the
    /// migration is cancelled and the VM runs on here, and the destination
    /// is asked to remove what it made. Returns the line for the start's
    /// report.
    pub(super) fn take_over_outgoing(self: &Arc<Self>, name: &str, mark: OutgoingMark) -> String {
        let to = mark.req.to.clone();
        let taken = (|| -> Result<String> {
            let mut qmp = Qmp::connect(
                &self.vms.procs.dir(name).join("qmp.sock"),
                Duration::from_secs(5),
            )?;
            let p = qmp.migration_progress()?;
            if p.status == "completed" || p.status.starts_with("postcopy") {
                let job = new_job(name, &mark.req);
                job.info.lock().stream_tls = mark.tls;
                job.set_phase(MigrationPhase::Postcopy);
                job.decide(
                    p.passes,
                    format!(
                        "taken over by a new agent: the previous one stopped with the migration \
                         past the switch (QEMU: {}), the guest running at the destination",
                        p.status
                    ),
                );
                self.jobs
                    .outgoing
                    .lock()
                    .insert(name.to_owned(), job.clone());
                let (migration, vm) = (self.clone(), name.to_owned());
                std::thread::Builder::new()
                    .name(format!("migrate-{name}"))
                    .spawn(move || {
                        let result = migration.finish_taken_over(&vm, &mark, &job, qmp);
                        migration.end_job(&vm, &mark.req, &job, result);
                    })
                    .map_err(AgentError::io("resuming the migration"))?;
                return Ok(format!(
                    "vm {name}: its migration to {to} was past the switch ({}) when the agent \
                     stopped; resumed, to finish in the background (spore vm migration {name})",
                    p.status
                ));
            }
            // Not past the switch: QEMU's migration failed with the old
            // relay, or (in plaintext) goes on without anyone to let it
            // switch. Before the switch the VM is this copy.
            self.take_back(name, &mut qmp);
            let peer = PeerClient::new(&to, Duration::from_secs(5), &self.links)?;
            let abort =
                peer.post::<serde_json::Value>(&format!("/v1/migrations/{name}/abort"), &json!({}));
            let there = match abort {
                Ok(_) => "removed what it made".to_owned(),
                Err(e) => format!("removes what it made by itself ({})", e.chain()),
            };
            let _ = std::fs::remove_file(self.vms.procs.dir(name).join(OUTGOING_MARK));
            Ok(format!(
                "vm {name}: its migration to {to} was cut short by the agent restart before the \
                 switch (QEMU: {}); the VM runs on here, and the destination {there}",
                p.status
            ))
        })();
        taken.unwrap_or_else(|e| {
            format!(
                "vm {name}: its migration to {to} was in flight when the agent stopped, and the \
                 new agent could not take it over: {}",
                e.chain()
            )
        })
    }

    /// Drives a post-copy taken over after a restart to its end: the
    /// stream, broken with the old agent's relay, is recovered over a new
    /// one (as many times as it breaks, each within the recovery budget);
    /// once QEMU has sent every page, the destination commits and this
    /// copy goes.
    fn finish_taken_over(
        &self,
        name: &str,
        mark: &OutgoingMark,
        job: &Arc<Job>,
        mut qmp: Qmp,
    ) -> Result<()> {
        let peer = PeerClient::new(&mark.req.to, Duration::from_secs(60), &self.links)?;
        let host = peer.host()?;
        let route = if mark.tls {
            let client = self.stream_tls.client.clone().ok_or_else(|| {
                AgentError::State("the stream is in TLS and this host has no certificate".into())
            })?;
            // Aimed at the destination's relay once a recovery says where
            // it listens (QEMU connects only then).
            let relay = relay::Outbound::start(
                &self.vms.procs.dir(name).join(OUT_SOCKET),
                resolve(&host, 0)?,
                &host,
                client,
            )
            .map_err(AgentError::io("starting the migration stream's relay"))?;
            Route {
                uri: format!("unix:{OUT_SOCKET}"),
                host: host.clone(),
                relay: Some(relay),
            }
        } else {
            Route {
                uri: String::new(),
                host: host.clone(),
                relay: None,
            }
        };
        let mut moved = (0u64, Instant::now());
        loop {
            let p = qmp.migration_progress()?;
            job.update(&p, true);
            if p.ram_transferred != moved.0 {
                moved = (p.ram_transferred, Instant::now());
            }
            match p.status.as_str() {
                "completed" => break,
                "postcopy-paused" => {
                    self.recover_postcopy(&mut qmp, job, &peer, &route, name, &p)?;
                    moved.1 = Instant::now();
                }
                "failed" | "cancelled" => {
                    let why = format!(
                        "QEMU's migration {} after the switch: {}",
                        p.status,
                        p.error.clone().unwrap_or_else(|| "no reason given".into())
                    );
                    let _ = self.vms.set_vm_state(name, |r| {
                        r.state = VmState::Failed;
                        r.reason = Some(format!(
                            "{why}; the guest ran at {}: this copy must not be resumed",
                            mark.req.to
                        ));
                    });
                    return Err(AgentError::State(why));
                }
                // A link that stopped without QEMU noticing: paused, so
                // that it recovers.
                "postcopy-active" if p.ram_remaining > 0 && moved.1.elapsed() > POSTCOPY_STALL => {
                    pause_stalled_postcopy(&mut qmp, job, p.passes);
                    moved.1 = Instant::now();
                }
                _ => {}
            }
            std::thread::sleep(TIMELINE_EVERY);
        }
        self.commit_at(&peer, name, &mark.req.to, false)?;
        job.decide(
            0,
            "the guest's stall was not measured: the agent restarted during the migration".into(),
        );
        drop(qmp);
        if let Err(e) = self.vms.remove_vm(name, true) {
            job.decide(0, format!("removing the source copy failed: {}", e.chain()));
        }
        Ok(())
    }
}

impl Migration {
    /// Refuses to touch a VM that is moving (stop, remove, resize,
    /// template): cancel the migration first, or wait for it.
    pub fn not_migrating(&self, vm: &str) -> Result<()> {
        match self.jobs.busy(vm) {
            Some(what) => Err(AgentError::State(format!(
                "vm {vm} is {what}; wait for it or cancel it (spore vm migrate --cancel {vm})"
            ))),
            None => Ok(()),
        }
    }
}

/// A post-copy in which nothing moved for [`POSTCOPY_STALL`] is paused, so
/// that it recovers over a new connection (a link that stopped without
/// QEMU noticing).
fn pause_stalled_postcopy(qmp: &mut Qmp, job: &Job, passes: u64) {
    job.decide(
        passes,
        format!(
            "post-copy: nothing moved for {} s; pausing to recover",
            POSTCOPY_STALL.as_secs()
        ),
    );
    let _ = qmp.migrate_pause();
}

/// A migration of `name` as `req` asks, not started yet.
fn new_job(name: &str, req: &MigrateRequest) -> Arc<Job> {
    Arc::new(Job {
        info: Mutex::new(MigrationInfo {
            vm: name.to_owned(),
            to: req.to.clone(),
            policy: req.policy,
            phase: MigrationPhase::Preparing,
            started: now(),
            elapsed_ms: 0.0,
            switched_at_ms: None,
            ram_total: 0,
            ram_transferred: 0,
            ram_remaining: 0,
            passes: 0,
            dirty_rate: 0,
            sampled_dirty_rate: None,
            postcopy_preempt: false,
            stream_tls: false,
            throughput: 0,
            postcopy_requests: 0,
            throttle_percent: 0,
            disk_bytes: 0,
            disk_passes: 0,
            disk_final_bytes: 0,
            downtime_ms: None,
            guest_stall_ms: None,
            guest_stall_at_ms: None,
            destination_runs_at_ms: None,
            decisions: Vec::new(),
            timeline: Vec::new(),
            error: None,
        }),
        cancel: AtomicBool::new(false),
        continued: AtomicBool::new(false),
        t0: Instant::now(),
        t0_us: epoch_us(),
    })
}

fn peer_url(p: &PeerClient) -> String {
    p.host().unwrap_or_default()
}

/// Asks the destination, until it says so or the migration ends, whether
/// its QEMU runs the guest, and records when it does: only from then may a
/// stalled post-copy be paused and recovered.
fn watch_destination_runs(job: Arc<Job>, peer: PeerClient, vm: String) {
    let peer = peer.with_timeout(Duration::from_secs(2));
    let path = format!("/v1/migrations/{vm}");
    let spawned = std::thread::Builder::new()
        .name(format!("runs-{vm}"))
        .spawn(move || {
            let until = Instant::now() + Duration::from_secs(3600);
            while Instant::now() < until && job.info.lock().phase == MigrationPhase::Postcopy {
                match peer.get::<IncomingStatus>(&path) {
                    Ok(s) if s.guest_runs => {
                        let at = job.ms();
                        let passes = {
                            let mut i = job.info.lock();
                            i.destination_runs_at_ms = Some(at);
                            i.passes
                        };
                        job.decide(passes, "the guest runs at the destination".into());
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(%vm, error = %e.chain(), "asking the destination whether the guest runs"),
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no thread to ask the destination whether the guest runs");
    }
}

/// QEMU's socket for the stream to the relay, in the VM's directory.
const OUT_SOCKET: &str = "migrate-out.sock";

/// How QEMU's stream reaches the destination.
struct Route {
    /// What QEMU migrates to.
    uri: String,
    /// The destination's host.
    host: String,
    /// The relay that carries the stream in spore's TLS, when the
    /// destination requires TLS.
    relay: Option<relay::Outbound>,
}

impl Route {
    /// What QEMU resumes a broken post-copy on, the destination listening
    /// again at `port`.
    fn resume(&self, port: u16) -> Result<String> {
        match &self.relay {
            Some(relay) => {
                relay.retarget(resolve(&self.host, port)?);
                Ok(self.uri.clone())
            }
            None => Ok(format!("tcp:{}:{port}", self.host)),
        }
    }
}

/// The first address of `host:port`.
fn resolve(host: &str, port: u16) -> Result<std::net::SocketAddr> {
    super::connections::resolve(host, port)
        .first()
        .copied()
        .ok_or_else(|| AgentError::State(format!("{host} does not resolve to an address")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_within_its_budget_holds_the_rest_back_for_the_next() {
        let mut held = Vec::new();
        // Two granules' worth of budget: the lowest two go, three wait.
        let now = share_of_pass(&mut held, vec![9, 3, 5, 1, 7], Some(2 * GRANULE));
        assert_eq!(now, [1, 3]);
        assert_eq!(held, [5, 7, 9]);
        // Held ones and new ones, each once, in disk order.
        let now = share_of_pass(&mut held, vec![7, 2], Some(3 * GRANULE));
        assert_eq!(now, [2, 5, 7]);
        assert_eq!(held, [9]);
        // Unbounded (the last pass, at the switch): everything.
        let now = share_of_pass(&mut held, vec![4, 8, 6], None);
        assert_eq!(now, [4, 6, 8, 9]);
        assert!(held.is_empty());
    }

    #[test]
    fn a_budget_below_one_granule_still_moves_one() {
        let mut held = Vec::new();
        assert_eq!(share_of_pass(&mut held, vec![2, 1], Some(10)), [1]);
        assert_eq!(held, [2]);
        assert!(share_of_pass(&mut Vec::new(), Vec::new(), Some(10)).is_empty());
    }

    #[test]
    fn post_copy_is_kept_from_grown_vms_under_tcg_only() {
        let layout = |dimms: usize, boot_cpus: u32, cpus: u32| spore_qemu::MemoryLayout {
            base_mib: 512,
            base_kib: 512 * 1024 - 8,
            dimms: (0..dimms).map(|i| (format!("dimm{i}"), 128)).collect(),
            boot_cpus,
            cpus,
        };
        assert_eq!(no_postcopy_for("tcg", &layout(0, 1, 1)), None);
        assert!(no_postcopy_for("tcg", &layout(1, 1, 1)).is_some_and(|w| w.contains("1 DIMMs")));
        assert!(no_postcopy_for("tcg", &layout(0, 1, 3)).is_some_and(|w| w.contains("2 CPUs")));
        assert_eq!(no_postcopy_for("kvm", &layout(2, 1, 2)), None);
    }

    #[test]
    fn only_ram_an_old_qemu_cannot_track_under_tcg_is_refused() {
        let layout = |base_kib, dimms: usize| spore_qemu::MemoryLayout {
            base_mib: base_kib / 1024,
            base_kib,
            dimms: (0..dimms).map(|i| (format!("dimm{i}"), 128)).collect(),
            boot_cpus: 1,
            cpus: 1,
        };
        let old = (7, 2, 15);
        let short = layout(512 * 1024 - 8, 0);
        assert_eq!(untrackable_ram("tcg", old, &short), None);
        let exact = layout(512 * 1024, 0);
        assert!(untrackable_ram("tcg", old, &exact)
            .unwrap()
            .contains("whole 256 KiB"));
        assert!(untrackable_ram("tcg", old, &layout(512 * 1024 - 8, 2))
            .unwrap()
            .contains("2 DIMMs"));
        // Fixed QEMUs and KVM track any size.
        for v in [(9, 0, 0), (10, 0, 2)] {
            assert_eq!(untrackable_ram("tcg", v, &exact), None);
            assert_eq!(untrackable_ram("tcg", v, &layout(524_288, 3)), None);
        }
        assert_eq!(untrackable_ram("kvm", old, &layout(524_288, 3)), None);
    }

    #[test]
    fn pacing_waits_until_the_bytes_fit_the_rate() {
        let rate = 1_000_000;
        // 4 MB sent at 1 MB/s, 1 s in: 3 s more.
        assert_eq!(
            pace_wait(4_000_000, rate, Duration::from_secs(1)),
            Duration::from_secs(3)
        );
        // Already slower than the rate: no wait.
        assert_eq!(
            pace_wait(1_000_000, rate, Duration::from_secs(2)),
            Duration::ZERO
        );
        // A zero rate does not divide by zero.
        assert!(pace_wait(10, 0, Duration::ZERO) > Duration::ZERO);
    }
}
