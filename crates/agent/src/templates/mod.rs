//! Templates and clones: a running VM captured in memory, and VMs that
//! resume from it without booting.
//!
//! Owns: the `Templates` table of the metadata store, each template's
//! images (`T.ram`, `T.disk`, `T.boot`), its directory `DATA/templates/T/`
//! (device state), its RAM file `tmpl-T.ram` or FUSE mount `mem-T` in the
//! RAM directory, and its standby pool ([`standbys::Standbys`]).
//!
//! ```text
//!  VM (RAM file, share=on) ──stop, device state──► template T
//!                                                   ├─ RAM file   tmpfs, read-only from now on
//!                                                   ├─ T.ram      image: RAM chunks (zero pages skipped, deduped)
//!                                                   ├─ T.disk     image: the VM's disk at the capture
//!                                                   └─ state      device state (x-ignore-shared: no RAM)
//!  clone: new disk over T.disk, QEMU maps the RAM file private (copy-on-write),
//!         loads the state, grows, resumes, and gets its own identity over the
//!         guest channel
//! ```
//!
//! The source VM is paused for the capture. By default it then resumes from
//! the template like a clone that keeps its name, disk and identity, so it
//! shares the template's memory copy-on-write too; with `stop` it is left
//! stopped.
//!
//! A template travels as three images: `T.ram`, `T.disk` and `T.boot` (a
//! bundle of its description and device state). A host that lacks it finds
//! `T.boot` at its origin and starts clones at once: their RAM is a FUSE
//! file (spore-memfs) over `T.ram`, paged in on demand, with the working set
//! recorded after the capture prefetched first. Clones need no kernel or
//! initrd: the guest's kernel is in its RAM already.
//!
//! Here: records, listing, resolving a template from the origin, push and
//! pull. `capture.rs` makes templates, `clone.rs` starts clones,
//! `pool.rs` keeps the standby pool (its state: `standbys.rs`),
//! `remove.rs` removes templates and collects their debris at start.

mod capture;
mod clone;
mod pool;
mod remove;
pub mod standbys;

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use spore_api::{CloneRequest, CloneResult, GroupRemoved, TemplateCreate, TemplateInfo, VmState};
use spore_blockdev::ImageDevice;
use spore_chunks::ChunkId;
use spore_image::Bundle;
use spore_qemu::Qmp;

use crate::disks::Disks;
use crate::error::{check_name, AgentError, Result};
use crate::exports::Registry;
use crate::images::Images;
use crate::meta::{Meta, Table};
use crate::records::{now, ImageRecord, TemplateRecord};
use crate::vms::{check_growth, Start, VmRecord, Vms, WarmGate};

/// Block size of RAM images: 64 KiB, like disk images.
const RAM_BLOCK_SIZE: u32 = 64 * 1024;

/// At most this many clones per request.
pub const MAX_CLONES: u32 = 256;

/// Version of the description in a template's bundle (2 added `ram_kib`;
/// 1 is still read).
const TEMPLATE_FORMAT: u32 = 2;
/// Bound on a bundle image read whole.
const MAX_BUNDLE: u64 = 64 << 20;

/// What a template's bundle says about it (`meta`), next to its `state`
/// section. Manifests pin the RAM and disk images: a host that resolves the
/// template by name gets exactly the images it was made with.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TemplateMeta {
    format: u32,
    name: String,
    source_vm: String,
    source_image: String,
    memory_mib: u64,
    cpus: u32,
    max_memory_mib: u64,
    max_cpus: u32,
    accel: String,
    ram_image: String,
    ram_manifest: String,
    disk_image: String,
    disk_manifest: String,
    ram_stored_bytes: u64,
    ram_chunks: u64,
    state_bytes: u64,
    created: u64,
    /// Boot RAM, KiB (format 2).
    #[serde(default)]
    ram_kib: Option<u64>,
}

impl TemplateMeta {
    /// A bundle's description, checked: a known format, and what that
    /// format must have.
    fn read(v: &serde_json::Value) -> std::result::Result<TemplateMeta, String> {
        let meta: TemplateMeta = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        if !(1..=TEMPLATE_FORMAT).contains(&meta.format) {
            return Err(format!(
                "description format {} (this build reads 1 to {TEMPLATE_FORMAT})",
                meta.format
            ));
        }
        if meta.format >= 2 && meta.ram_kib.is_none() {
            return Err("a format 2 description without ram_kib".into());
        }
        Ok(meta)
    }
}

/// The template service: captures, clones, the standby pool, push, pull
/// and removal of templates. It calls the VM service to pause, start and
/// stop VMs, the image service for the template's images and the disk
/// service for clones' disks; nothing below it calls it.
#[derive(Debug)]
pub struct Templates {
    meta: Arc<Meta>,
    store: Arc<spore_chunks::ChunkStore>,
    images: Arc<Images>,
    disks: Arc<Disks>,
    exports: Arc<Registry>,
    vms: Arc<Vms>,
    /// The agent's data directory (templates live in `templates/` of it;
    /// a capture checks its free space).
    data_dir: PathBuf,
    /// The origin templates not known here are resolved from.
    origin: Option<String>,
    /// Clones kept started and paused per template.
    clone_standby: u32,
    /// Held shared while chunks no name references yet are written.
    gc_lock: Arc<parking_lot::RwLock<()>>,
    /// Serialises template captures and removals.
    template_names: parking_lot::Mutex<()>,
    /// Standby clones by template (VM names), and templates being refilled.
    standbys: parking_lot::Mutex<standbys::Standbys>,
    /// FUSE files paging in templates captured elsewhere, by template.
    memfs: parking_lot::Mutex<HashMap<String, spore_memfs::MemFile>>,
    /// Held while a template's RAM file is rebuilt from its image.
    template_ram_rebuild: parking_lot::Mutex<()>,
}

/// What the template service is built from.
pub(crate) struct TemplateDeps {
    pub meta: Arc<Meta>,
    pub store: Arc<spore_chunks::ChunkStore>,
    pub images: Arc<Images>,
    pub disks: Arc<Disks>,
    pub exports: Arc<Registry>,
    pub vms: Arc<Vms>,
    pub gc_lock: Arc<parking_lot::RwLock<()>>,
}

impl Templates {
    pub(crate) fn new(
        deps: TemplateDeps,
        data_dir: PathBuf,
        origin: Option<String>,
        clone_standby: u32,
    ) -> Self {
        let TemplateDeps {
            meta,
            store,
            images,
            disks,
            exports,
            vms,
            gc_lock,
        } = deps;
        Templates {
            meta,
            store,
            images,
            disks,
            exports,
            vms,
            data_dir,
            origin,
            clone_standby,
            gc_lock,
            template_names: Default::default(),
            standbys: Default::default(),
            memfs: Default::default(),
            template_ram_rebuild: Default::default(),
        }
    }

    /// At the agent's shutdown, once every VM is stopped: the standby pool
    /// emptied and the FUSE files of remote templates unmounted.
    pub(crate) fn shut_down(&self, stop_vms: bool) {
        if stop_vms {
            let _ = self.drop_standbys();
        }
        self.memfs.lock().clear();
    }

    fn template_dir(&self, name: &str) -> PathBuf {
        self.data_dir.as_path().join("templates").join(name)
    }

    /// The template's RAM file, which clones map copy-on-write.
    pub fn template_ram(&self, name: &str) -> PathBuf {
        self.vms.procs.ram_dir().join(format!("tmpl-{name}.ram"))
    }

    pub fn template_record(&self, name: &str) -> Result<TemplateRecord> {
        self.meta
            .get(Table::Templates, name)?
            .ok_or_else(|| AgentError::NotFound {
                kind: "template",
                name: name.into(),
            })
    }

    fn template_info(&self, name: &str, t: &TemplateRecord) -> Result<TemplateInfo> {
        let clones = self
            .meta
            .list::<VmRecord>(Table::Vms)?
            .into_iter()
            .filter(|(_, v)| v.template.as_deref() == Some(name) && !v.standby)
            .map(|(n, _)| n)
            .collect();
        Ok(TemplateInfo {
            name: name.to_owned(),
            source_vm: t.source_vm.clone(),
            source_image: t.source_image.clone(),
            memory_mib: t.memory_mib,
            cpus: t.cpus,
            max_memory_mib: t.max_memory_mib,
            max_cpus: t.max_cpus,
            accel: t.accel.clone(),
            ram_image: t.ram_image.clone(),
            disk_image: t.disk_image.clone(),
            ram_stored_bytes: t.ram_stored_bytes,
            ram_chunks: t.ram_chunks,
            ram_chunks_deduped: t.ram_chunks_deduped,
            state_bytes: t.state_bytes,
            pause_ms: t.pause_ms,
            clones,
            created: t.created,
            source_after: t.source_after.clone(),
            removing: t.removing,
        })
    }

    pub fn list_templates(&self) -> Result<Vec<TemplateInfo>> {
        self.meta
            .list::<TemplateRecord>(Table::Templates)?
            .iter()
            .map(|(n, t)| self.template_info(n, t))
            .collect()
    }

    pub fn get_template(&self, name: &str) -> Result<TemplateInfo> {
        let t = self.template_record(name)?;
        self.template_info(name, &t)
    }

    /// A template known here, or else found at the origin by its bundle
    /// image `NAME.boot` (RAM and disk images stay lazy: their chunks come
    /// when read).
    pub fn resolve_template(self: &Arc<Self>, name: &str) -> Result<TemplateRecord> {
        if let Some(t) = self.meta.get::<TemplateRecord>(Table::Templates, name)? {
            t.usable(name)?;
            return Ok(t);
        }
        check_name("template", name)?;
        let not_found = || AgentError::NotFound {
            kind: "template",
            name: name.into(),
        };
        if self.origin.is_none() {
            return Err(not_found());
        }
        let _serial = self.template_names.lock();
        if let Some(t) = self.meta.get::<TemplateRecord>(Table::Templates, name)? {
            t.usable(name)?;
            return Ok(t);
        }
        let boot_image = format!("{name}.boot");
        let boot = match self.images.resolve_image(&boot_image) {
            Err(AgentError::NotFound { .. }) => return Err(not_found()),
            r => r?,
        };
        let dev = self.exports.open_image(&boot.manifest)?;
        let size = dev.image().manifest.virtual_size;
        if size > MAX_BUNDLE {
            return Err(AgentError::State(format!(
                "{boot_image} is {size} bytes; a template bundle is at most {MAX_BUNDLE}"
            )));
        }
        let mut bytes = vec![0u8; size as usize];
        dev.read_at(0, &mut bytes)
            .map_err(|e| AgentError::State(format!("reading {boot_image}: {e}")))?;
        let bad = |why: String| AgentError::State(format!("template {name} at the origin: {why}"));
        let bundle = Bundle::decode(&bytes).map_err(|e| bad(e.to_string()))?;
        let meta = TemplateMeta::read(&bundle.meta).map_err(bad)?;
        if meta.name != name {
            return Err(bad(format!(
                "its bundle describes template {:?}",
                meta.name
            )));
        }
        let state = bundle
            .section("state")
            .ok_or_else(|| bad("no device state in its bundle".into()))?;
        for (image, manifest) in [
            (&meta.ram_image, &meta.ram_manifest),
            (&meta.disk_image, &meta.disk_manifest),
        ] {
            check_name("image", image)?;
            let rec = self.images.resolve_image(image)?;
            if rec.manifest.to_hex() != *manifest {
                return Err(bad(format!(
                    "image {image} is {} here, the template was made with {manifest}",
                    rec.manifest
                )));
            }
        }
        let dir = self.template_dir(name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(AgentError::io(format!("creating {}", dir.display())))?;
        fs::write(dir.join("state"), state).map_err(AgentError::io("writing the device state"))?;
        let t = TemplateRecord {
            source_vm: meta.source_vm,
            source_image: meta.source_image,
            memory_mib: meta.memory_mib,
            cpus: meta.cpus,
            max_memory_mib: meta.max_memory_mib,
            max_cpus: meta.max_cpus,
            accel: meta.accel,
            ram_image: meta.ram_image,
            disk_image: meta.disk_image,
            ram_stored_bytes: meta.ram_stored_bytes,
            ram_chunks: meta.ram_chunks,
            ram_chunks_deduped: 0,
            state_bytes: state.len() as u64,
            pause_ms: 0.0,
            created: meta.created,
            source_after: "captured on another host".into(),
            boot_image,
            remote: true,
            ram_kib: meta.ram_kib,
            removing: false,
        };
        self.meta.put(Table::Templates, name, &t)?;
        tracing::info!(template = name, "template found at the origin");
        Ok(t)
    }

    /// Pushes the template's disk, RAM and bundle images (the bundle last,
    /// so that a host finding it finds the rest).
    pub fn push_template(
        &self,
        name: &str,
        to: &str,
        force: bool,
        progress: crate::images::Progress<'_>,
    ) -> Result<spore_api::PushResult> {
        let t = self.template_record(name)?;
        t.usable(name)?;
        let mut total = spore_api::PushResult {
            image: name.into(),
            to: to.into(),
            chunks: 0,
            sent_chunks: 0,
            sent_bytes: 0,
        };
        for image in [&t.disk_image, &t.ram_image, &t.boot_image] {
            let r = self.images.push_image(image, to, force, progress)?;
            total.chunks += r.chunks;
            total.sent_chunks += r.sent_chunks;
            total.sent_bytes += r.sent_bytes;
        }
        Ok(total)
    }

    /// Resolves a template and makes all of it local (foreground).
    pub fn pull_template(self: &Arc<Self>, name: &str) -> Result<TemplateInfo> {
        let t = self.resolve_template(name)?;
        for image in [&t.disk_image, &t.ram_image] {
            self.images.pull_image(image, false, &|_, _, _| {})?;
        }
        self.template_info(name, &t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta_json(format: u32, ram_kib: Option<u64>) -> serde_json::Value {
        let mut v = serde_json::json!({
            "format": format, "name": "t1", "source_vm": "src", "source_image": "base",
            "memory_mib": 512, "cpus": 1, "max_memory_mib": 4096, "max_cpus": 8,
            "accel": "tcg", "ram_image": "t1.ram", "ram_manifest": "00",
            "disk_image": "t1.disk", "disk_manifest": "00", "ram_stored_bytes": 1,
            "ram_chunks": 1, "state_bytes": 1, "created": 1
        });
        if let Some(k) = ram_kib {
            v["ram_kib"] = k.into();
        }
        v
    }

    #[test]
    fn descriptions_of_both_formats_are_read_and_others_refused() {
        // Format 1 (no ram_kib): clones get the 8 KiB short TCG RAM that
        // every VM had when it was written.
        let m = TemplateMeta::read(&meta_json(1, None)).unwrap();
        assert_eq!(m.ram_kib, None);
        let t = TemplateRecord {
            source_vm: m.source_vm,
            source_image: m.source_image,
            memory_mib: m.memory_mib,
            cpus: m.cpus,
            max_memory_mib: m.max_memory_mib,
            max_cpus: m.max_cpus,
            accel: m.accel,
            ram_image: m.ram_image,
            disk_image: m.disk_image,
            ram_stored_bytes: 0,
            ram_chunks: 0,
            ram_chunks_deduped: 0,
            state_bytes: 0,
            pause_ms: 0.0,
            created: 0,
            source_after: String::new(),
            boot_image: String::new(),
            remote: true,
            ram_kib: m.ram_kib,
            removing: false,
        };
        assert_eq!(t.boot_ram_kib(), 512 * 1024 - 8);
        let kvm = TemplateRecord {
            accel: "kvm".into(),
            ..t.clone()
        };
        assert_eq!(kvm.boot_ram_kib(), 512 * 1024);
        // Format 2 says it exactly.
        let m = TemplateMeta::read(&meta_json(2, Some(512 * 1024))).unwrap();
        let t = TemplateRecord {
            ram_kib: m.ram_kib,
            removing: false,
            ..t
        };
        assert_eq!(t.boot_ram_kib(), 512 * 1024);
        for (v, why) in [
            (meta_json(2, None), "without ram_kib"),
            (meta_json(3, Some(1)), "format 3"),
            (meta_json(0, None), "format 0"),
            (serde_json::json!({"format": 2}), "missing field"),
        ] {
            let e = TemplateMeta::read(&v).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }
}
