//! Migrations that an agent restart cut short.
//!
//! QEMU outlives the agent, and so does a migration between two QEMUs:
//! once the guest runs at the destination (post-copy), part of its memory
//! exists only at the source, and neither side may be dropped. Each side
//! therefore leaves a mark in the VM's directory while a migration is in
//! flight ([`OutgoingMark`], [`IncomingMark`]), and the next agent takes
//! the migration over from it:
//!
//! - at the source, a migration past the switch is resumed (a post-copy
//!   broken with the old agent's relay is recovered over a new one) and
//!   finished: the destination commits, this copy goes; one not yet past
//!   the switch is taken back, the VM running on here;
//! - at the destination, a guest that runs here while its memory is still
//!   arriving stays an incoming migration, so that the source's recovery
//!   and commit find it.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use spore_api::{MigrateRequest, VmState};

use super::Migration;
use crate::meta::Table;
use crate::vms::{VmRecord, INCOMING_MARK, OUTGOING_MARK};

/// The source's mark: the request, and whether the stream goes through
/// spore's TLS (the destination said so when it got ready).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OutgoingMark {
    pub req: MigrateRequest,
    pub tls: bool,
}

/// The destination's mark: where the VM comes from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct IncomingMark {
    pub from: String,
}

/// Writes a mark beside the VM (replaced whole: a restart never reads half
/// of one).
pub(crate) fn write_mark(dir: &Path, file: &str, mark: &impl Serialize) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    fs::write(&tmp, serde_json::to_vec(mark).expect("marks serialise"))?;
    fs::rename(&tmp, dir.join(file))
}

/// The mark `file` beside the VM, if there is one that reads.
pub(crate) fn read_mark<T: for<'de> Deserialize<'de>>(dir: &Path, file: &str) -> Option<T> {
    let bytes = fs::read(dir.join(file)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

impl Migration {
    /// Takes over the migrations a previous agent left in flight, after
    /// the VM service took over their QEMUs; returns what it did, one line
    /// each.
    pub(crate) fn recover(self: &Arc<Self>) -> Vec<String> {
        let records = match self.meta.list::<VmRecord>(Table::Vms) {
            Ok(r) => r,
            Err(e) => {
                return vec![format!(
                    "migrations in flight could not be looked for: {e}"
                )]
            }
        };
        let mut report = Vec::new();
        for (name, rec) in records {
            let dir = self.vms.procs.dir(&name);
            let running = self.vms.running_vm(&name).is_some();
            let line = match rec.state {
                VmState::Incoming if running => Some(self.take_over_incoming(&name, &rec)),
                VmState::Running if running => read_mark::<OutgoingMark>(&dir, OUTGOING_MARK)
                    .map(|mark| self.take_over_outgoing(&name, mark)),
                _ => None,
            };
            if let Some(line) = line {
                tracing::warn!(vm = %name, "{line}");
                report.push(line);
            } else if rec.state != VmState::Incoming {
                // A mark of a migration that ended with its agent.
                let _ = fs::remove_file(dir.join(OUTGOING_MARK));
                let _ = fs::remove_file(dir.join(INCOMING_MARK));
            }
        }
        report
    }
}
