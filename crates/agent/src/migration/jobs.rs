//! The migration service's state: the migrations in flight, away from
//! this host ([`Job`], one per VM, kept after it ends for `vm migration`)
//! and to it ([`Incoming`]). The source and destination sides
//! (`source.rs`, `destination.rs`) run them; nothing else changes them.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use spore_api::{MigrationDecision, MigrationInfo, MigrationPhase, MigrationSample};
use spore_qemu::{Progress, Qmp, StallProbe};

/// Most samples a migration's timeline keeps (10 minutes at one sample
/// every 100 ms).
const TIMELINE_MAX: usize = 6000;

/// Live migrations away from and to this host, by VM.
#[derive(Debug, Default)]
pub struct Jobs {
    pub(crate) outgoing: Mutex<HashMap<String, Arc<Job>>>,
    pub(crate) incoming: Mutex<HashMap<String, Arc<Incoming>>>,
}

impl Jobs {
    /// The migration of `vm` in progress here, either way, if any.
    pub fn busy(&self, vm: &str) -> Option<&'static str> {
        if self
            .outgoing
            .lock()
            .get(vm)
            .is_some_and(|j| !j.info.lock().phase.finished())
        {
            return Some("migrating away");
        }
        if self.incoming.lock().contains_key(vm) {
            return Some("arriving by migration");
        }
        None
    }

    pub fn info(&self, vm: &str) -> Option<MigrationInfo> {
        self.outgoing.lock().get(vm).map(|j| j.info.lock().clone())
    }
}

/// A migration of a VM away from this host, as its source runs it.
#[derive(Debug)]
pub struct Job {
    pub info: Mutex<MigrationInfo>,
    pub(crate) cancel: AtomicBool,
    /// QEMU was told to finish the switch (`migrate-continue`): from here
    /// the destination may run the guest, so this side never resumes it
    /// and nothing cancels (docs/migration.md, "One running copy").
    pub(crate) continued: AtomicBool,
    pub(crate) t0: Instant,
    /// `t0` on the clock of the pong timestamps.
    pub(crate) t0_us: u64,
}

impl Job {
    pub(crate) fn ms(&self) -> f64 {
        self.t0.elapsed().as_secs_f64() * 1e3
    }

    pub(crate) fn set_phase(&self, phase: MigrationPhase) {
        let mut i = self.info.lock();
        i.phase = phase;
        i.elapsed_ms = self.ms();
    }

    pub(crate) fn decide(&self, pass: u64, text: String) {
        tracing::info!(vm = %self.info.lock().vm, pass, %text, "migration");
        let at_ms = self.ms();
        self.info
            .lock()
            .decisions
            .push(MigrationDecision { at_ms, pass, text });
    }

    pub(crate) fn update(&self, p: &Progress, sample: bool) {
        let mut i = self.info.lock();
        i.elapsed_ms = self.ms();
        i.ram_total = p.ram_total.max(i.ram_total);
        i.ram_transferred = p.ram_transferred.max(i.ram_transferred);
        i.ram_remaining = p.ram_remaining;
        i.passes = p.passes.max(i.passes);
        if p.dirty_rate > 0 {
            i.dirty_rate = p.dirty_rate;
        }
        if p.throughput > 0 {
            i.throughput = p.throughput;
        }
        i.postcopy_requests = p.postcopy_requests;
        i.throttle_percent = p.throttle_percent;
        if let Some(d) = p.downtime_ms {
            i.downtime_ms = Some(d as f64);
        }
        if sample && i.timeline.len() < TIMELINE_MAX {
            let s = MigrationSample {
                at_ms: i.elapsed_ms,
                status: p.status.clone(),
                ram_transferred: p.ram_transferred,
                ram_remaining: p.ram_remaining,
                dirty_rate: p.dirty_rate,
                throughput: p.throughput,
            };
            i.timeline.push(s);
        }
    }
}

/// A migration arriving here.
#[derive(Debug)]
pub struct Incoming {
    pub vm: String,
    pub from: String,
    pub(crate) qmp: Mutex<Option<Qmp>>,
    pub(crate) disk_size: u64,
    pub(crate) probe: Mutex<Option<StallProbe>>,
    pub(crate) running_at: Mutex<Option<u64>>,
    /// The ports QEMU listens on for a plaintext stream (a recovery adds
    /// one).
    pub(crate) ports: Mutex<Vec<u16>>,
    /// The relay in front of QEMU for a stream in TLS.
    pub(crate) relay: Mutex<Option<super::relay::Inbound>>,
    /// Sockets QEMU listened on so far (a recovery listens on a new one).
    pub(crate) listens: std::sync::atomic::AtomicU32,
    /// Committed or aborted: the watcher stops.
    pub(crate) done: AtomicBool,
    pub(crate) deadline: Instant,
}
