//! Live migration between two QEMU processes: capabilities, parameters,
//! progress, and the VM's memory layout (which the destination must
//! recreate before the stream arrives).
//!
//! The agent owns the decisions (when to switch to post-copy, when to
//! throttle); this module only speaks QMP and turns `query-migrate` into a
//! typed [`Progress`].

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{Qmp, QmpError};

/// QEMU's own TLS for a migration stream ([`Qmp::set_migration_tls`]).
#[derive(Debug, Clone, Copy)]
pub struct MigrationTls<'a> {
    /// QEMU's credential directory.
    pub dir: &'a std::path::Path,
    /// The source's view: the destination's host, which its certificate
    /// must name. `None` on the destination (the server end).
    pub hostname: Option<&'a str>,
}

/// One `query-migrate` answer, the parts the agent uses. Sizes in bytes,
/// rates in bytes per second, times in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// QEMU's migration status: `setup`, `active`, `pre-switchover`,
    /// `device`, `postcopy-active`, `postcopy-paused`, `postcopy-recover`,
    /// `completed`, `failed`, `cancelling`, `cancelled`, or `none`.
    pub status: String,
    pub total_ms: u64,
    /// Downtime QEMU measured (only once completed).
    pub downtime_ms: Option<u64>,
    /// Downtime QEMU expects if it stopped now.
    pub expected_downtime_ms: Option<u64>,
    pub ram_total: u64,
    pub ram_transferred: u64,
    pub ram_remaining: u64,
    /// Passes over memory so far: QEMU's dirty-sync-count (1 while the
    /// first pass runs).
    pub passes: u64,
    /// Bytes dirtied per second in the last pass (0 until measured).
    pub dirty_rate: u64,
    /// The link's measured throughput in the last period.
    pub throughput: u64,
    pub postcopy_requests: u64,
    /// Percentage the guest's CPUs are throttled (auto-converge).
    pub throttle_percent: u64,
    pub error: Option<String>,
}

impl Progress {
    /// Parses a `query-migrate` return value. Absent fields read as zero:
    /// QEMU leaves out what it has not measured yet.
    pub fn parse(v: &Value) -> Self {
        let ram = &v["ram"];
        let n = |x: &Value| x.as_u64().unwrap_or(0);
        let page_size = ram["page-size"].as_u64().filter(|p| *p > 0).unwrap_or(4096);
        Progress {
            status: v["status"].as_str().unwrap_or("none").to_owned(),
            total_ms: n(&v["total-time"]),
            downtime_ms: v["downtime"].as_u64(),
            expected_downtime_ms: v["expected-downtime"].as_u64(),
            ram_total: n(&ram["total"]),
            ram_transferred: n(&ram["transferred"]),
            ram_remaining: n(&ram["remaining"]),
            passes: n(&ram["dirty-sync-count"]),
            dirty_rate: n(&ram["dirty-pages-rate"]).saturating_mul(page_size),
            // QEMU reports megabits per second as a float.
            throughput: (ram["mbps"].as_f64().unwrap_or(0.0).max(0.0) * 1e6 / 8.0) as u64,
            postcopy_requests: n(&ram["postcopy-requests"]),
            throttle_percent: n(&v["cpu-throttle-percentage"]),
            error: v["error-desc"].as_str().map(str::to_owned),
        }
    }

    /// The migration ended, one way or the other.
    pub fn finished(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
    }

    /// The guest already runs at the destination: the source can no longer
    /// take the VM back.
    pub fn switched(&self) -> bool {
        matches!(
            self.status.as_str(),
            "postcopy-active" | "postcopy-paused" | "postcopy-recover" | "completed"
        )
    }
}

/// What a destination QEMU needs besides the command line: memory and CPUs
/// hot-plugged on the source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    /// RAM given at start (`-m`), MiB (rounded up).
    pub base_mib: u64,
    /// The same exactly, KiB: what a destination must give its QEMU.
    #[serde(default)]
    pub base_kib: u64,
    /// Hot-plugged DIMMs in order: (device id, MiB).
    pub dimms: Vec<(String, u64)>,
    /// CPUs present at start (`-smp`).
    pub boot_cpus: u32,
    /// CPUs present now.
    pub cpus: u32,
}

impl Qmp {
    pub fn set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), QmpError> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, on)| json!({ "capability": c, "state": on }))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": list })),
        )?;
        Ok(())
    }

    /// `migrate-set-parameters` with the given object (allowed while a
    /// migration runs, e.g. to change the downtime limit).
    pub fn set_parameters(&mut self, params: Value) -> Result<(), QmpError> {
        self.execute("migrate-set-parameters", Some(params))?;
        Ok(())
    }

    pub fn migration_progress(&mut self) -> Result<Progress, QmpError> {
        Ok(Progress::parse(&self.execute("query-migrate", None)?))
    }

    /// The migration capabilities this QEMU knows (`query-migrate-capabilities`).
    pub fn migration_capabilities(&mut self) -> Result<Vec<String>, QmpError> {
        let v = self.execute("query-migrate-capabilities", None)?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c["capability"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Starts QEMU's own dirty-rate measurement by page sampling
    /// (`calc-dirty-rate`): it hashes `pages_per_gib` sample pages per GiB
    /// of RAM, waits `secs` seconds and hashes them again. It does not use
    /// the migration's dirty log, so it can run during the first pass.
    pub fn start_dirty_rate(&mut self, secs: u64, pages_per_gib: u64) -> Result<(), QmpError> {
        self.execute(
            "calc-dirty-rate",
            Some(json!({ "calc-time": secs, "sample-pages": pages_per_gib, "mode": "page-sampling" })),
        )?;
        Ok(())
    }

    /// The result of [`Qmp::start_dirty_rate`]: bytes of distinct memory
    /// written per second, or `None` while it is still measuring.
    pub fn dirty_rate(&mut self) -> Result<Option<u64>, QmpError> {
        parse_dirty_rate(&self.execute("query-dirty-rate", None)?)
    }

    /// Encrypts this QEMU's migration streams with its own TLS (x509,
    /// both sides verify the other against the CA), or sends them in the
    /// clear with `None`. `dir` holds QEMU's credential files
    /// (`spore_pki::qemu_creds_dir` lays them out); a source checks that the
    /// destination's certificate names `hostname`. Called before
    /// `migrate` or `migrate-incoming`; a post-copy recovery reuses it.
    pub fn set_migration_tls(&mut self, tls: Option<MigrationTls<'_>>) -> Result<(), QmpError> {
        const ID: &str = "spore-migration-tls";
        let Some(tls) = tls else {
            return self.set_parameters(json!({ "tls-creds": "" }));
        };
        // A fresh object each time: QEMU reads the files when it is made
        // (a new revocation list, a renewed certificate).
        let _ = self.execute("object-del", Some(json!({ "id": ID })));
        let endpoint = if tls.hostname.is_some() {
            "client"
        } else {
            "server"
        };
        self.execute(
            "object-add",
            Some(json!({
                "qom-type": "tls-creds-x509",
                "id": ID,
                "dir": tls.dir,
                "endpoint": endpoint,
                "verify-peer": true,
            })),
        )?;
        let mut params = json!({ "tls-creds": ID });
        if let Some(host) = tls.hostname {
            params["tls-hostname"] = json!(host);
        }
        self.set_parameters(params)
    }

    /// Starts an outgoing migration to `uri` (e.g. `tcp:10.0.0.2:4444`).
    pub fn migrate(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate", Some(json!({ "uri": uri })))?;
        Ok(())
    }

    /// Resumes a paused post-copy migration over a new connection.
    pub fn migrate_resume(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate", Some(json!({ "uri": uri, "resume": true })))?;
        Ok(())
    }

    /// Lets a migration stopped at `pre-switchover` go on.
    pub fn migrate_continue(&mut self) -> Result<(), QmpError> {
        self.execute(
            "migrate-continue",
            Some(json!({ "state": "pre-switchover" })),
        )?;
        Ok(())
    }

    pub fn start_postcopy(&mut self) -> Result<(), QmpError> {
        self.execute("migrate-start-postcopy", None)?;
        Ok(())
    }

    pub fn migrate_cancel(&mut self) -> Result<(), QmpError> {
        self.execute("migrate_cancel", None)?;
        Ok(())
    }

    /// Forces a post-copy migration whose link is stuck into
    /// `postcopy-paused`, from where it can be recovered.
    pub fn migrate_pause(&mut self) -> Result<(), QmpError> {
        self.execute_oob("migrate-pause", None)?;
        Ok(())
    }

    /// Destination: listen for the migration stream on `uri`
    /// (`tcp:IP:0` picks a port; see [`Qmp::incoming_port`]).
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))?;
        Ok(())
    }

    /// Destination of a paused post-copy migration: listen again.
    /// Out of band where the connection allows it ([`Qmp::connect_oob`]):
    /// the destination's main thread may be blocked on a missing page.
    pub fn migrate_recover(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute_oob("migrate-recover", Some(json!({ "uri": uri })))?;
        Ok(())
    }

    /// The TCP port an incoming migration listens on.
    pub fn incoming_port(&mut self) -> Result<u16, QmpError> {
        let v = self.execute("query-migrate", None)?;
        v["socket-address"]
            .as_array()
            .and_then(|a| a.iter().find_map(|s| s["port"].as_str()?.parse().ok()))
            .ok_or_else(|| {
                QmpError::Migration(format!("QEMU did not say which port it listens on: {v}"))
            })
    }

    /// The VM's memory and CPUs as they are now (base RAM, DIMMs, CPUs).
    pub fn memory_layout(&mut self) -> Result<MemoryLayout, QmpError> {
        let summary = self.execute("query-memory-size-summary", None)?;
        let devices = self.execute("query-memory-devices", None)?;
        let cpus = self.execute("query-hotpluggable-cpus", None)?;
        Ok(parse_layout(&summary, &devices, &cpus))
    }
}

fn parse_dirty_rate(v: &Value) -> Result<Option<u64>, QmpError> {
    match v["status"].as_str() {
        Some("measured") => v["dirty-rate"]
            .as_i64()
            .filter(|r| *r >= 0)
            // QEMU reports MiB per second.
            .map(|r| Some((r as u64) << 20))
            .ok_or_else(|| QmpError::Migration(format!("query-dirty-rate without a rate: {v}"))),
        Some("measuring") | Some("unstarted") => Ok(None),
        _ => Err(QmpError::Migration(format!(
            "unexpected query-dirty-rate answer: {v}"
        ))),
    }
}

fn parse_layout(summary: &Value, devices: &Value, cpus: &Value) -> MemoryLayout {
    let dimms = devices
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| {
                    let data = &d["data"];
                    Some((
                        data["id"].as_str()?.to_owned(),
                        data["size"].as_u64()? >> 20,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let present: Vec<&str> = cpus
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["qom-path"].as_str()).collect())
        .unwrap_or_default();
    MemoryLayout {
        // Rounded up: under TCG boot RAM is a few KiB short of whole MiB
        // (cmdline::ram_kib).
        base_mib: summary["base-memory"]
            .as_u64()
            .unwrap_or(0)
            .div_ceil(1 << 20),
        base_kib: summary["base-memory"].as_u64().unwrap_or(0) >> 10,
        dimms,
        // Hot-plugged CPUs have ids, so they live under /machine/peripheral.
        boot_cpus: present
            .iter()
            .filter(|p| !p.starts_with("/machine/peripheral/"))
            .count() as u32,
        cpus: present.len() as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reads_ram_counters_and_rates() {
        let v = json!({
            "status": "active", "total-time": 1500, "expected-downtime": 420,
            "ram": { "total": 536_870_912u64, "transferred": 100_000_000u64,
                     "remaining": 40_000_000u64, "dirty-sync-count": 3,
                     "dirty-pages-rate": 1000, "page-size": 4096, "mbps": 800.0,
                     "postcopy-requests": 7 },
            "cpu-throttle-percentage": 20
        });
        let p = Progress::parse(&v);
        assert_eq!(p.status, "active");
        assert_eq!(p.passes, 3);
        assert_eq!(p.dirty_rate, 4_096_000);
        assert_eq!(p.throughput, 100_000_000);
        assert_eq!(p.expected_downtime_ms, Some(420));
        assert_eq!(p.downtime_ms, None);
        assert_eq!(p.throttle_percent, 20);
        assert!(!p.finished() && !p.switched());
    }

    #[test]
    fn progress_tolerates_missing_and_odd_fields() {
        let p = Progress::parse(&json!({}));
        assert_eq!(p.status, "none");
        assert_eq!(p.ram_total, 0);
        let p = Progress::parse(&json!({ "status": 3, "ram": { "mbps": -5.0, "page-size": 0,
            "dirty-pages-rate": 2 } }));
        assert_eq!(p.status, "none");
        assert_eq!(p.throughput, 0);
        assert_eq!(p.dirty_rate, 8192);
        let p = Progress::parse(&json!({ "status": "postcopy-active" }));
        assert!(p.switched() && !p.finished());
        let p = Progress::parse(&json!({ "status": "failed", "error-desc": "boom" }));
        assert!(p.finished());
        assert_eq!(p.error.as_deref(), Some("boom"));
    }

    #[test]
    fn dirty_rate_is_read_once_measured() {
        let measured = json!({ "status": "measured", "dirty-rate": 64, "calc-time": 1,
            "sample-pages": 1024, "mode": "page-sampling", "start-time": 100 });
        assert_eq!(parse_dirty_rate(&measured).unwrap(), Some(64 << 20));
        let measuring = json!({ "status": "measuring", "calc-time": 1 });
        assert_eq!(parse_dirty_rate(&measuring).unwrap(), None);
        assert!(parse_dirty_rate(&json!({ "status": "measured" })).is_err());
        assert!(parse_dirty_rate(&json!({ "status": "measured", "dirty-rate": -1 })).is_err());
        assert!(parse_dirty_rate(&json!(null)).is_err());
    }

    #[test]
    fn layout_separates_boot_and_hotplugged_cpus_and_lists_dimms() {
        let summary = json!({ "base-memory": 536_870_912u64, "plugged-memory": 268_435_456u64 });
        let devices = json!([
            { "type": "dimm", "data": { "id": "dimm1", "size": 134_217_728u64, "slot": 0 } },
            { "type": "dimm", "data": { "id": "dimm2", "size": 134_217_728u64, "slot": 1 } }
        ]);
        let cpus = json!([
            { "type": "qemu64-x86_64-cpu", "props": { "core-id": 3 } },
            { "type": "qemu64-x86_64-cpu", "props": { "core-id": 2 },
              "qom-path": "/machine/peripheral/cpu-s0-c2" },
            { "type": "qemu64-x86_64-cpu", "props": { "core-id": 1 },
              "qom-path": "/machine/unattached/device[1]" },
            { "type": "qemu64-x86_64-cpu", "props": { "core-id": 0 },
              "qom-path": "/machine/unattached/device[0]" }
        ]);
        let l = parse_layout(&summary, &devices, &cpus);
        assert_eq!(l.base_mib, 512);
        assert_eq!(l.base_kib, 512 * 1024);
        assert_eq!(l.dimms, vec![("dimm1".into(), 128), ("dimm2".into(), 128)]);
        assert_eq!(l.boot_cpus, 2);
        assert_eq!(l.cpus, 3);
        assert_eq!(
            parse_layout(&json!(null), &json!(null), &json!(null)),
            MemoryLayout::default()
        );
        // boot RAM 8 KiB short of 512 MiB (TCG) is still 512 MiB
        let short = json!({ "base-memory": 536_862_720u64 });
        let l = parse_layout(&short, &json!([]), &json!([]));
        assert_eq!((l.base_mib, l.base_kib), (512, 512 * 1024 - 8));
    }
}
