//! Device state to and from a file, and hot-plug: what templates and clones
//! need from QEMU.
//!
//! A template's RAM lives in a file the VM maps shared, so the migration
//! stream written here carries only device state (`x-ignore-shared`): about
//! 0.3 MB for the demo guest. A clone maps the same file private
//! (copy-on-write), loads that stream and continues where the template was.
//! The state file travels as a descriptor (QMP `getfd`, then `fd:`): no
//! shell, no helper process.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{Qmp, QmpError};

/// The name under which the state file is passed to QEMU (`getfd`).
const STATE_FD: &str = "spore-state";

impl Qmp {
    /// Device state only, for a capture or a clone: `x-ignore-shared` on,
    /// and post-copy off (QEMU refuses the two together, and a VM that
    /// arrived by a live migration kept `postcopy-ram`, and perhaps
    /// `postcopy-preempt`, from it).
    fn ignore_shared(&mut self) -> Result<(), QmpError> {
        let known = self.migration_capabilities()?;
        let mut caps = Vec::new();
        for off in ["postcopy-preempt", "postcopy-ram"] {
            if known.iter().any(|c| c == off) {
                caps.push(json!({ "capability": off, "state": false }));
            }
        }
        caps.push(json!({ "capability": "x-ignore-shared", "state": true }));
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": caps })),
        )?;
        Ok(())
    }

    /// Sets `x-ignore-shared`. Capabilities outlive the migration that set
    /// them: a VM whose capture was undone must have it cleared again, or
    /// QEMU refuses post-copy for it and a pre-copy leaves its RAM behind.
    pub fn set_ignore_shared(&mut self, on: bool) -> Result<(), QmpError> {
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [
                { "capability": "x-ignore-shared", "state": on }
            ]})),
        )?;
        Ok(())
    }

    fn wait_migration(&mut self, what: &str, timeout: Duration) -> Result<Value, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.execute("query-migrate", None)?;
            match info["status"].as_str().unwrap_or("") {
                "completed" => return Ok(info),
                "failed" | "cancelled" => {
                    return Err(QmpError::Migration(format!(
                        "{what} {}: {}",
                        info["status"].as_str().unwrap_or("?"),
                        info["error-desc"].as_str().unwrap_or("no reason given")
                    )))
                }
                _ if Instant::now() > deadline => {
                    return Err(QmpError::Migration(format!(
                        "{what} did not finish within {timeout:?}"
                    )))
                }
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// Pauses the VM and writes its device state (everything but the shared
    /// RAM) to `path`, made durable. The VM stays paused.
    pub fn save_state(&mut self, path: &Path, timeout: Duration) -> Result<(), QmpError> {
        let file = std::fs::File::create(path)?;
        self.send_fd(STATE_FD, file.as_fd())?;
        self.execute("stop", None)?;
        self.ignore_shared()?;
        self.execute("migrate", Some(json!({ "uri": format!("fd:{STATE_FD}") })))?;
        self.wait_migration("saving device state", timeout)?;
        file.sync_all()?;
        Ok(())
    }

    /// Loads device state written by [`Qmp::save_state`] into a QEMU started
    /// with `-S -incoming defer` on the same RAM file. The VM stays paused
    /// until `cont`.
    pub fn load_state(&mut self, path: &Path, timeout: Duration) -> Result<(), QmpError> {
        let file = std::fs::File::open(path)?;
        self.send_fd(STATE_FD, file.as_fd())?;
        self.ignore_shared()?;
        self.execute(
            "migrate-incoming",
            Some(json!({ "uri": format!("fd:{STATE_FD}") })),
        )?;
        let deadline = Instant::now() + timeout;
        loop {
            match self.status()?.as_str() {
                "inmigrate" if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                "inmigrate" => {
                    return Err(QmpError::Migration(format!(
                        "loading device state did not finish within {timeout:?}"
                    )))
                }
                _ => break,
            }
        }
        self.wait_migration("loading device state", timeout)?;
        Ok(())
    }

    /// Hot-plugs `mib` MiB of RAM as a pc-dimm named `id`.
    pub fn add_memory(&mut self, id: &str, mib: u64) -> Result<(), QmpError> {
        let backend = format!("{id}-mem");
        self.execute(
            "object-add",
            Some(json!({ "qom-type": "memory-backend-ram", "id": backend, "size": mib << 20 })),
        )?;
        if let Err(e) = self.execute(
            "device_add",
            Some(json!({ "driver": "pc-dimm", "id": id, "memdev": backend })),
        ) {
            let _ = self.execute("object-del", Some(json!({ "id": backend })));
            return Err(e);
        }
        Ok(())
    }

    /// Hot-plugs CPUs until the VM has `total`; returns how many it has.
    pub fn add_cpus(&mut self, total: u32) -> Result<u32, QmpError> {
        let slots = self.execute("query-hotpluggable-cpus", None)?;
        let slots = slots.as_array().cloned().unwrap_or_default();
        let mut present = slots.iter().filter(|s| s.get("qom-path").is_some()).count() as u32;
        // Free slots come last-first from QEMU; fill the lowest ids first.
        let mut free: Vec<&Value> = slots
            .iter()
            .filter(|s| s.get("qom-path").is_none())
            .collect();
        free.reverse();
        for slot in free {
            if present >= total {
                break;
            }
            let mut args = slot["props"].clone();
            let core = args["core-id"].as_u64().unwrap_or(present as u64);
            let socket = args["socket-id"].as_u64().unwrap_or(0);
            args["driver"] = slot["type"].clone();
            args["id"] = json!(format!("cpu-s{socket}-c{core}"));
            self.execute("device_add", Some(args))?;
            present += 1;
        }
        if present < total {
            return Err(QmpError::Invalid(format!(
                "only {present} CPUs fit this VM (its maximum was fixed when its template booted)"
            )));
        }
        Ok(present)
    }
}
