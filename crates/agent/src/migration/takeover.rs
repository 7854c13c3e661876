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

/// The version of the marks' format (docs/formats.md).
const MARK_VERSION: u32 = 1;

/// A mark as stored: its version, then its fields.
#[derive(Serialize, Deserialize)]
struct Stored<T> {
    version: u32,
    #[serde(flatten)]
    mark: T,
}

/// Writes a mark beside the VM (replaced whole: a restart never reads half
/// of one).
pub(crate) fn write_mark<T: Serialize>(dir: &Path, file: &str, mark: &T) -> std::io::Result<()> {
    let stored = Stored {
        version: MARK_VERSION,
        mark,
    };
    let tmp = dir.join(format!(".{file}.tmp"));
    fs::write(&tmp, serde_json::to_vec(&stored).expect("marks serialise"))?;
    fs::rename(&tmp, dir.join(file))
}

/// The mark `file` beside the VM, if there is one of this version that
/// reads (another is reported and passed over).
pub(crate) fn read_mark<T: for<'de> Deserialize<'de>>(dir: &Path, file: &str) -> Option<T> {
    let bytes = fs::read(dir.join(file)).ok()?;
    match serde_json::from_slice::<Stored<T>>(&bytes) {
        Ok(s) if s.version == MARK_VERSION => Some(s.mark),
        Ok(s) => {
            tracing::warn!(mark = %dir.join(file).display(), version = s.version, "a migration mark of another version is passed over");
            None
        }
        Err(e) => {
            tracing::warn!(mark = %dir.join(file).display(), error = %e, "a migration mark that does not read is passed over");
            None
        }
    }
}

impl Migration {
    /// Takes over the migrations a previous agent left in flight, after
    /// the VM service took over their QEMUs; returns what it did, one line
    /// each.
    pub(crate) fn recover(self: &Arc<Self>) -> Vec<String> {
        let records = match self.meta.list::<VmRecord>(Table::Vms) {
            Ok(r) => r,
            Err(e) => return vec![format!("migrations in flight could not be looked for: {e}")],
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_read_back_and_others_are_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let mark = IncomingMark {
            from: "10.0.0.1:7070".into(),
        };
        write_mark(dir.path(), "m", &mark).unwrap();
        let back: IncomingMark = read_mark(dir.path(), "m").unwrap();
        assert_eq!(back.from, mark.from);
        for bad in [
            &br#"{"version":2,"from":"x"}"#[..],
            br#"{"from":"x"}"#,
            b"{\"version\":1,",
            b"",
        ] {
            fs::write(dir.path().join("m"), bad).unwrap();
            assert!(read_mark::<IncomingMark>(dir.path(), "m").is_none());
        }
        assert!(read_mark::<IncomingMark>(dir.path(), "none").is_none());
    }
}
