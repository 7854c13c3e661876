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

pub mod standbys;

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

use crate::agent::Agent;
use crate::error::{check_name, AgentError, Result};
use crate::meta::Table;
use crate::records::{now, ImageRecord, TemplateRecord};
use crate::vms::{check_growth, Start, VmRecord, WarmGate};

/// Block size of RAM images: 64 KiB, like disk images.
const RAM_BLOCK_SIZE: u32 = 64 * 1024;

/// At most this many clones per request.
pub const MAX_CLONES: u32 = 256;

/// Clones started at once (QEMU start-up is CPU-bound).
const CLONE_WORKERS: usize = 2;

/// How long the first clone of a template paged in from elsewhere waits
/// for the working set to reach the page cache before it resumes: enough
/// for a working set of tens of MiB on a fast link, short enough that the
/// clone still runs within half a second of the request.
const WARM_BUDGET: Duration = Duration::from_millis(300);

/// Room a capture needs in the data directory besides the guest's RAM and
/// its disk's written blocks (each copied into chunks): the device state
/// and the store's own files.
const CAPTURE_HEADROOM: u64 = 64 << 20;

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

/// A template's RAM image as the bytes of a memfs file.
struct DeviceBacking(Arc<ImageDevice>, u64);

impl spore_memfs::Backing for DeviceBacking {
    fn size(&self) -> u64 {
        self.1
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_at(offset, buf)
    }
}

impl Agent {
    fn template_dir(&self, name: &str) -> PathBuf {
        self.data_dir().join("templates").join(name)
    }

    /// The template's RAM file, which clones map copy-on-write.
    pub fn template_ram(&self, name: &str) -> PathBuf {
        self.vms.ram_dir().join(format!("tmpl-{name}.ram"))
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

    /// Captures a running VM as template `req.name`.
    pub fn template_vm(self: &Arc<Self>, vm: &str, req: &TemplateCreate) -> Result<TemplateInfo> {
        let name = &req.name;
        check_name("template", name)?;
        let _serial = self.template_names.lock();
        if self
            .meta
            .get::<TemplateRecord>(Table::Templates, name)?
            .is_some()
        {
            return Err(AgentError::Exists {
                kind: "template",
                name: name.clone(),
            });
        }
        let ram_image = format!("{name}.ram");
        let disk_image = format!("{name}.disk");
        let boot_image = format!("{name}.boot");
        // Everything that can be checked is checked before the VM pauses,
        // so that a refusal leaves it exactly as it was.
        for image in [&ram_image, &disk_image, &boot_image] {
            check_name("image", image)?;
            if self
                .meta
                .get::<ImageRecord>(Table::Images, image)?
                .is_some()
            {
                return Err(AgentError::Exists {
                    kind: "image",
                    name: image.clone(),
                });
            }
        }
        let rec = self.vm_record(vm)?;
        if rec.state != VmState::Running {
            return Err(AgentError::State(format!(
                "vm {vm} is {}; only a running VM can become a template",
                rec.state
            )));
        }
        if let Some(t) = &rec.template {
            return Err(AgentError::State(format!(
                "vm {vm} runs from template {t}: its memory is a private copy-on-write \
                 mapping, not a file that can be captured; make templates from booted VMs"
            )));
        }
        if rec.dimms > 0 {
            return Err(AgentError::State(format!(
                "vm {vm} was given memory while it ran ({} hot-plugged DIMMs): that memory is \
                 not in its RAM file, so its state cannot be captured; capture VMs before \
                 resizing their memory (clones can still be made bigger: vm clone --memory)",
                rec.dimms
            )));
        }
        let Some((_, exit)) = self.running_vm(vm) else {
            return Err(AgentError::State(format!("vm {vm} has no QEMU process")));
        };
        let vm_ram = self.vms.ram_file(vm);
        if !vm_ram.is_file() {
            return Err(AgentError::State(format!(
                "vm {vm} has no RAM file at {} (was it started by an older agent?)",
                vm_ram.display()
            )));
        }
        // The RAM image (at most what the guest touched, before
        // compression), the disk's layer and the device state go to the
        // data directory: room for them is checked now, not found missing
        // while the guest is frozen.
        use std::os::unix::fs::MetadataExt;
        let allocated =
            |p: &std::path::Path| fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0);
        let touched = allocated(&vm_ram);
        let written: u64 = fs::read_dir(self.disks.dir(&rec.disk))
            .map(|d| d.flatten().map(|e| allocated(&e.path())).sum())
            .unwrap_or(0);
        let need = touched + written + CAPTURE_HEADROOM;
        let free = crate::vms::free_bytes(self.data_dir())?;
        if free < need {
            return Err(AgentError::State(format!(
                "not enough room to capture vm {vm} in {}: {} MiB free, {} MiB needed (the \
                 {} MiB of RAM the guest touched, the {} MiB it wrote to its disk, and {} MiB \
                 for the state); nothing was paused",
                self.data_dir().display(),
                free >> 20,
                need >> 20,
                touched >> 20,
                written >> 20,
                CAPTURE_HEADROOM >> 20
            )));
        }
        let dir = self.template_dir(name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(AgentError::io(format!("creating {}", dir.display())))?;
        let state = dir.join("state");
        let qmp_err = |e: spore_qemu::QmpError| AgentError::State(format!("vm {vm}: {e}"));

        // 1. Pause and save device state. From here until the source runs
        //    again, its guest is frozen.
        let paused = Instant::now();
        let mut qmp = Qmp::connect(&self.vms.dir(vm).join("qmp.sock"), Duration::from_secs(5))
            .map_err(qmp_err)?;
        // Clones must have exactly this boot RAM to load the state.
        let layout = qmp.memory_layout().map_err(qmp_err)?;
        if !layout.dimms.is_empty() {
            return Err(AgentError::State(format!(
                "vm {vm} has hot-plugged memory ({} DIMMs), which a capture cannot hold; \
                 not captured",
                layout.dimms.len()
            )));
        }
        let ram_kib = layout.base_kib;
        // Until the RAM file is the template's, a failure resumes the
        // source as it was and removes what was made: the state file and
        // the disk's layer.
        let give_back = |qmp: &mut Qmp, e: AgentError| {
            let _ = qmp.execute("cont", None);
            if let Err(e) = self.images.remove_image(&disk_image) {
                if !matches!(e, AgentError::NotFound { .. }) {
                    tracing::error!(image = %disk_image, error = %e.chain(), "undoing a capture: removing the disk layer failed");
                }
            }
            let _ = fs::remove_dir_all(&dir);
            tracing::warn!(template = %name, vm, error = %e.chain(), "capture failed while the VM was paused; it runs on as it was");
            e
        };
        let saved = if crate::failpoint::hit("capture-save-state") {
            Err(AgentError::State("fail-point capture-save-state".into()))
        } else {
            qmp.save_state(&state, Duration::from_secs(60))
                .map_err(qmp_err)
        };
        if let Err(e) = saved {
            return Err(give_back(&mut qmp, e));
        }
        // 2. The disk as the guest left it (QEMU flushed it on stop).
        let committed = if crate::failpoint::hit("capture-commit") {
            Err(AgentError::State("fail-point capture-commit".into()))
        } else {
            self.disks.commit_disk(&rec.disk, &disk_image)
        };
        let disk = match committed {
            Ok(d) => d,
            Err(e) => return Err(give_back(&mut qmp, e)),
        };
        // 3. The RAM file becomes the template's; the source QEMU goes.
        let tram = self.template_ram(name);
        let placed = if crate::failpoint::hit("capture-place-ram") {
            Err(AgentError::State("fail-point capture-place-ram".into()))
        } else {
            fs::rename(&vm_ram, &tram).map_err(|e| AgentError::Io {
                context: format!("moving {} to {}", vm_ram.display(), tram.display()),
                source: e,
            })
        };
        if let Err(e) = placed {
            return Err(give_back(&mut qmp, e));
        }
        let _ = fs::set_permissions(&tram, std::os::unix::fs::PermissionsExt::from_mode(0o400));
        self.set_vm_state(vm, |r| r.state = VmState::Stopping)?;
        let _ = qmp.execute("quit", None);
        drop(qmp);
        exit.wait(Duration::from_secs(15));

        let state_bytes = fs::metadata(&state).map(|m| m.len()).unwrap_or(0);
        let mut t = TemplateRecord {
            source_vm: vm.to_owned(),
            source_image: rec.image.clone(),
            memory_mib: rec.memory_mib,
            cpus: rec.cpus,
            max_memory_mib: rec.max_memory_mib,
            max_cpus: rec.max_cpus,
            accel: rec.accel.clone(),
            ram_image: ram_image.clone(),
            disk_image: disk_image.clone(),
            ram_stored_bytes: 0,
            ram_chunks: 0,
            ram_chunks_deduped: 0,
            state_bytes,
            pause_ms: 0.0,
            created: now(),
            source_after: String::new(),
            boot_image: format!("{name}.boot"),
            remote: false,
            ram_kib: Some(ram_kib),
            removing: false,
        };

        // 5. The source: resumed from the template (same name, disk and
        //    identity), or left stopped.
        let resumed = if req.stop {
            self.set_vm_state(vm, |r| {
                r.reason = Some(format!("captured as template {name}"));
            })?;
            t.source_after = "stopped (its memory became the template)".into();
            None
        } else {
            let mut again = self.vm_record(vm)?;
            again.template = Some(name.clone());
            self.meta.put(Table::Vms, vm, &again)?;
            let start = Start::Resume {
                template: name.clone(),
                ram: tram.clone(),
                warm: None,
                hold: false,
                state: state.clone(),
                memory_mib: t.memory_mib,
                ram_kib: t.boot_ram_kib(),
                cpus: t.cpus,
            };
            Some(self.start_vm(vm, again, start, Instant::now()))
        };
        t.pause_ms = paused.elapsed().as_secs_f64() * 1e3;
        match &resumed {
            Some(Ok(_)) => {
                t.source_after = format!(
                    "resumed from the template after a {:.0} ms pause, sharing its memory",
                    t.pause_ms
                )
            }
            Some(Err(e)) => {
                self.settle_failed_start(vm, e);
                t.source_after = format!("failed to resume: {}", e.chain());
            }
            None => {}
        }

        // 6-7 can still fail (a full disk): then the capture is undone,
        // and the source keeps running as it was (its memory stays the
        // private mapping it resumed with; the file goes).
        let stored = (|| -> Result<()> {
            if crate::failpoint::hit("capture-store") {
                return Err(AgentError::State("fail-point capture-store".into()));
            }
            // 6. RAM into the chunk store, so the template can be pushed,
            //    pulled and inspected like an image.
            let published = self.import_raw_image(&tram, "ram", &ram_image)?;
            t.ram_stored_bytes = published.stats.changed_blocks * RAM_BLOCK_SIZE as u64;
            t.ram_chunks = published.stats.changed_blocks;
            t.ram_chunks_deduped = published
                .stats
                .changed_blocks
                .saturating_sub(published.stats.new_chunks);

            // 7. The bundle: what a host that lacks the template needs besides
            //    the RAM and disk images.
            let disk_manifest = self.images.image_record(&disk_image)?.manifest;
            let meta = TemplateMeta {
                format: TEMPLATE_FORMAT,
                name: name.clone(),
                source_vm: t.source_vm.clone(),
                source_image: t.source_image.clone(),
                memory_mib: t.memory_mib,
                cpus: t.cpus,
                max_memory_mib: t.max_memory_mib,
                max_cpus: t.max_cpus,
                accel: t.accel.clone(),
                ram_image: ram_image.clone(),
                ram_manifest: published.id.to_hex(),
                disk_image: disk_image.clone(),
                disk_manifest: disk_manifest.to_hex(),
                ram_stored_bytes: t.ram_stored_bytes,
                ram_chunks: t.ram_chunks,
                state_bytes: t.state_bytes,
                created: t.created,
                ram_kib: Some(t.boot_ram_kib()),
            };
            self.store_bundle(&t.boot_image, &dir, &meta, &state)?;
            self.meta.put(Table::Templates, name, &t)?;
            Ok(())
        })();
        if let Err(e) = stored {
            self.undo_capture(name, vm, &t, resumed.is_some_and(|r| r.is_ok()), &e);
            return Err(e);
        }
        self.record_ram_working_set(name);
        self.fill_standbys(name);
        tracing::info!(
            template = %name,
            vm,
            pause_ms = t.pause_ms,
            ram_chunks = t.ram_chunks,
            deduped = t.ram_chunks_deduped,
            disk_blocks = disk.layers,
            "template captured"
        );
        self.template_info(name, &t)
    }

    /// Undoes a capture that failed after the source was paused: the
    /// images and files it made go, and the source, if it resumed from the
    /// template's RAM, runs on as a VM of its own.
    fn undo_capture(
        &self,
        name: &str,
        vm: &str,
        t: &TemplateRecord,
        resumed: bool,
        why: &AgentError,
    ) {
        tracing::error!(template = name, vm, error = %why.chain(), "capture failed after the pause; undoing it");
        let _ = self.meta.remove(Table::Templates, name);
        for image in [&t.ram_image, &t.disk_image, &t.boot_image] {
            match self.images.remove_image(image) {
                Ok(_) | Err(AgentError::NotFound { .. }) => {}
                Err(e) => {
                    tracing::error!(image = %image, error = %e.chain(), "undoing a capture: removing an image failed")
                }
            }
        }
        // A running source maps the file privately: unlinking it keeps
        // its memory, which is already its own.
        let _ = fs::remove_file(self.template_ram(name));
        let _ = fs::remove_dir_all(self.template_dir(name));
        let _ = self.set_vm_state(vm, |r| {
            r.template = None;
            r.reason = Some(format!(
                "capture as template {name} failed and was undone: {}",
                why.chain()
            ));
        });
        if !resumed {
            tracing::warn!(vm, "the captured VM did not resume; it stays stopped");
        }
    }

    /// Writes the bundle (meta + state) and imports it as image `image`.
    fn store_bundle(
        &self,
        image: &str,
        dir: &std::path::Path,
        meta: &TemplateMeta,
        state: &std::path::Path,
    ) -> Result<()> {
        let state_bytes = fs::read(state).map_err(AgentError::io("reading the device state"))?;
        let mut bytes = Bundle {
            meta: serde_json::to_value(meta).expect("plain values"),
            sections: vec![("state".into(), state_bytes)],
        }
        .encode();
        bytes.resize(bytes.len().next_multiple_of(RAM_BLOCK_SIZE as usize), 0);
        let tmp = dir.join("bundle.tmp");
        fs::write(&tmp, &bytes).map_err(AgentError::io("writing the template bundle"))?;
        let imported = self.import_raw_image(&tmp, "bundle", image);
        let _ = fs::remove_file(&tmp);
        imported.map(|_| ())
    }

    /// Imports the raw file `path` (in RAM_BLOCK_SIZE blocks) as image
    /// `image`, which must be free. Pinned against garbage collection from
    /// the first chunk until the name is in the metadata store: until then
    /// the new chunks are reachable from nothing.
    fn import_raw_image(
        &self,
        path: &std::path::Path,
        source_name: &str,
        image: &str,
    ) -> Result<spore_image::Published> {
        let pin = self.gc_lock.read();
        let source = spore_image::source::open_raw(path)?;
        let published = spore_image::import(
            &self.store,
            &*source,
            source_name,
            RAM_BLOCK_SIZE,
            None,
            &|_, _| {},
        )?;
        let rec = ImageRecord {
            manifest: published.id,
            created: now(),
            complete: false,
            profile: None,
        };
        if !self.meta.insert_new(Table::Images, image, &rec)? {
            return Err(AgentError::Exists {
                kind: "image",
                name: image.into(),
            });
        }
        self.exports.bind_image(image, published.id);
        drop(pin);
        Ok(published)
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
        if self.config.origin.is_none() {
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
            let r = self.images.push_image(image, to, progress)?;
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

    /// After a capture: once a VM runs from the template (the resumed
    /// source, or a clone) for a few seconds, the pages it has touched are
    /// the template's working set. They become the RAM image's profile, so
    /// hosts that page the template in prefetch them first.
    fn record_ram_working_set(self: &Arc<Self>, name: &str) {
        let agent = self.clone();
        let name = name.to_owned();
        let spawned = std::thread::Builder::new()
            .name(format!("working-set-{name}"))
            .spawn(move || {
                let path = agent.template_ram(&name);
                let deadline = Instant::now() + Duration::from_secs(120);
                while Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(500));
                    let Ok(t) = agent.template_record(&name) else { return };
                    let runner = agent.list_vms().ok().and_then(|vms| {
                        vms.into_iter().find(|v| {
                            v.template.as_deref() == Some(name.as_str())
                                && v.state == VmState::Running
                                && v.pid.is_some()
                        })
                    });
                    let Some(vm) = runner else { continue };
                    // Let it run a little from the template first.
                    std::thread::sleep(Duration::from_secs(3));
                    let Some(pid) = vm.pid else { continue };
                    match touched_blocks(pid, &path, RAM_BLOCK_SIZE as u64) {
                        Ok(blocks) if !blocks.is_empty() => {
                            let n = blocks.len();
                            let result = agent.set_profile(&t.ram_image, RAM_BLOCK_SIZE, blocks);
                            match result {
                                Ok(()) => tracing::info!(template = %name, vm = %vm.name, blocks = n, "RAM working set recorded"),
                                Err(e) => tracing::warn!(template = %name, error = %e.chain(), "saving the RAM working set failed"),
                            }
                            return;
                        }
                        Ok(_) => continue,
                        Err(e) => {
                            tracing::debug!(template = %name, error = %e, "reading the working set");
                            continue;
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start working-set recording");
        }
    }

    /// Binds a profile to an image that has none.
    fn set_profile(&self, image: &str, block_size: u32, blocks: Vec<u32>) -> Result<()> {
        let _shared = self.gc_lock.read();
        let put = self
            .store
            .put(&spore_image::Profile { block_size, blocks }.encode())?;
        self.store.sync()?;
        let mut rec = self.images.image_record(image)?;
        if rec.profile.is_none() {
            rec.profile = Some(put.id);
            self.meta.put(Table::Images, image, &rec)?;
        }
        Ok(())
    }

    /// Makes sure clones can map the template's RAM: the local file (a
    /// template captured here); the file rebuilt from the RAM image when
    /// every chunk is here (tmpfs lost it in a reboot); or else a FUSE file
    /// that pages the image in on demand. Returns the path, and when a
    /// warm-up of the working set just started, the gate the first clone
    /// waits at before it resumes.
    fn ensure_template_ram(
        &self,
        name: &str,
        t: &TemplateRecord,
    ) -> Result<(PathBuf, Option<Arc<WarmGate>>)> {
        let path = self.template_ram(name);
        if path.is_file() {
            return Ok((path, None));
        }
        let rec = self.images.image_record(&t.ram_image)?;
        let img = self.exports.open_image(&rec.manifest)?;
        let size = t.memory_mib << 20;
        let complete = img
            .image()
            .flat
            .chunks()
            .iter()
            .all(|id: &ChunkId| self.store.contains(id));
        if !complete {
            let mut mounts = self.memfs.lock();
            if let Some(m) = mounts.get(name) {
                return Ok((m.path(), None));
            }
            let dir = self.vms.ram_dir().join(format!("mem-{name}"));
            let block = img.image().manifest.block_size as u64;
            let m = spore_memfs::MemFile::mount(&dir, "ram", Arc::new(DeviceBacking(img, size)))
                .map_err(AgentError::io(format!("paging in template {name}")))?;
            // The working set into the page cache, in the recorded order,
            // while the first clone starts: its first touches then cost
            // neither a fetch nor a FUSE round trip.
            let mut gate = None;
            if let Some(p) = rec.profile {
                match self.images.profile_blocks(&p) {
                    Ok(blocks) => {
                        let warmed = m.warm(
                            blocks
                                .into_iter()
                                .map(|b| (b as u64 * block, block))
                                .filter(|(o, _)| *o < size)
                                .collect(),
                        );
                        gate = Some(Arc::new(WarmGate::new(
                            warmed,
                            Instant::now() + WARM_BUDGET,
                        )));
                    }
                    Err(e) => {
                        tracing::warn!(template = name, error = %e.chain(), "working set unreadable")
                    }
                }
            }
            let p = m.path();
            tracing::info!(template = name, path = %p.display(), "template RAM paged in on demand (FUSE)");
            mounts.insert(name.to_owned(), m);
            return Ok((p, gate));
        }
        // One rebuild at a time: two clones racing to rebuild one file
        // truncated each other's (and a clone could map zero pages). The
        // one that waited finds the file made.
        let _rebuilding = self.template_ram_rebuild.lock();
        if path.is_file() {
            return Ok((path, None));
        }
        fs::create_dir_all(self.vms.ram_dir())
            .map_err(AgentError::io("creating the RAM directory"))?;
        crate::vms::check_ram_room(self.vms.ram_dir(), size >> 10)?;
        let tmp = path.with_extension("tmp");
        let file = fs::File::create(&tmp).map_err(AgentError::io("creating template RAM"))?;
        file.set_len(size)
            .map_err(AgentError::io("sizing template RAM"))?;
        let mut buf = vec![0u8; RAM_BLOCK_SIZE as usize];
        let mut off = 0;
        while off < size {
            img.read_at(off, &mut buf)
                .map_err(|e| AgentError::State(format!("reading {}: {e}", t.ram_image)))?;
            if buf.iter().any(|&b| b != 0) {
                std::os::unix::fs::FileExt::write_all_at(&file, &buf, off)
                    .map_err(AgentError::io("writing template RAM"))?;
            }
            off += RAM_BLOCK_SIZE as u64;
        }
        drop(file);
        fs::rename(&tmp, &path).map_err(AgentError::io("placing template RAM"))?;
        let _ = fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o400));
        tracing::info!(template = name, "template RAM file rebuilt from its image");
        Ok((path, None))
    }

    /// Starts `req.count` clones of a template.
    pub fn clone_template(self: &Arc<Self>, name: &str, req: &CloneRequest) -> Result<CloneResult> {
        let t0 = Instant::now();
        let t = self.resolve_template(name)?;
        if req.count == 0 || req.count > MAX_CLONES {
            return Err(AgentError::Invalid(format!(
                "count must be between 1 and {MAX_CLONES}"
            )));
        }
        let prefix = req.prefix.clone().unwrap_or_else(|| name.to_owned());
        check_name("clone prefix", &prefix)?;
        let memory_mib = req.memory_mib.unwrap_or(t.memory_mib);
        let cpus = req.cpus.unwrap_or(t.cpus);
        let mut base = clone_record(name, &t);
        base.group = Some(prefix.clone());
        check_growth(&base, memory_mib, cpus)?;
        base.memory_mib = memory_mib;
        base.cpus = cpus;
        let (ram, warm) = self.ensure_template_ram(name, &t)?;
        let state = self.template_dir(name).join("state");

        // Claim names PREFIX-1, PREFIX-2, ... skipping those in use.
        let mut names = Vec::new();
        let mut i = 0;
        while names.len() < req.count as usize {
            i += 1;
            let vm = format!("{prefix}-{i}");
            check_name("vm", &vm)?;
            let mut rec = base.clone();
            rec.disk = vm.clone();
            rec.identity = Some(self.unique_identity(&vm)?);
            if self.meta.insert_new(Table::Vms, &vm, &rec)? {
                names.push((vm, rec));
            }
        }
        let queue = parking_lot::Mutex::new(names.into_iter());
        let results = parking_lot::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..CLONE_WORKERS.min(req.count as usize) {
                s.spawn(|| loop {
                    let Some((vm, rec)) = queue.lock().next() else {
                        break;
                    };
                    let r = match self.take_standby(name) {
                        Some(sb) => self.activate_standby(&sb, &vm, rec, &t),
                        None => {
                            let start = Start::Resume {
                                template: name.to_owned(),
                                ram: ram.clone(),
                                warm: warm.clone(),
                                hold: false,
                                state: state.clone(),
                                memory_mib: t.memory_mib,
                                ram_kib: t.boot_ram_kib(),
                                cpus: t.cpus,
                            };
                            self.disks
                                .create_disk(&vm, &t.disk_image, Some(&vm))
                                .and_then(|_| {
                                    if crate::failpoint::hit("clone-start") {
                                        return Err(AgentError::State(
                                            "fail-point clone-start".into(),
                                        ));
                                    }
                                    self.start_vm(&vm, rec, start, Instant::now())
                                })
                        }
                    };
                    if let Err(e) = &r {
                        self.settle_failed_start(&vm, e);
                    }
                    results.lock().push((vm, r));
                });
            }
        });
        let mut vms = Vec::new();
        let mut failed = Vec::new();
        for (vm, r) in results.into_inner() {
            match r {
                Ok(info) => vms.push(info),
                Err(e) => failed.push((vm, e.chain())),
            }
        }
        vms.sort_by_key(|v| natural(&v.name));
        let total_ms = t0.elapsed().as_secs_f64() * 1e3;
        self.fill_standbys(name);
        tracing::info!(template = name, group = %prefix, started = vms.len(), failed = failed.len(), total_ms, "cloned");
        if vms.is_empty() {
            if let Some((vm, why)) = failed.first() {
                return Err(AgentError::State(format!("no clone started; {vm}: {why}")));
            }
        }
        Ok(CloneResult {
            template: name.to_owned(),
            group: prefix,
            vms,
            failed,
            total_ms,
        })
    }

    /// Removes every VM of a clone group.
    pub fn remove_group(&self, group: &str) -> Result<GroupRemoved> {
        let members: Vec<String> = self
            .meta
            .list::<VmRecord>(Table::Vms)?
            .into_iter()
            .filter(|(_, v)| v.group.as_deref() == Some(group))
            .map(|(n, _)| n)
            .collect();
        if members.is_empty() {
            return Err(AgentError::NotFound {
                kind: "group",
                name: group.into(),
            });
        }
        let mut removed = Vec::new();
        for vm in members {
            self.remove_vm(&vm, true)?;
            removed.push(vm);
        }
        Ok(GroupRemoved {
            group: group.to_owned(),
            removed,
        })
    }

    /// Removes a template that no VM runs from: its RAM file, state, and its
    /// RAM and disk images.
    /// Removes a template with its images, RAM file and standbys: every
    /// blocker is checked before anything is removed, and the standby pool
    /// is stopped from refilling while it goes.
    /// Removes a template with its standbys, images, RAM file and
    /// directory. Every blocker (clones, disks on its images) is checked
    /// first; then the record is marked `removing` (durably) and the rest
    /// goes, the record last. A removal that stops half-way (an error, a
    /// crash) leaves a template nothing starts from, which the next
    /// `template rm` or agent start finishes: never a record without its
    /// images, nor images or a RAM file nothing owns.
    pub fn remove_template(&self, name: &str) -> Result<spore_api::RemoveResult> {
        let _serial = self.template_names.lock();
        let mut t = self.template_record(name)?;
        if !t.removing {
            self.template_blockers(name, &t)?;
            t.removing = true;
            self.meta.put(Table::Templates, name, &t)?;
        }
        // No new standby from here on; wait for one being made.
        self.standbys.lock().removing.insert(name.to_owned());
        let result = self.remove_template_now(name, &t);
        self.standbys.lock().removing.remove(name);
        result.map_err(|e| {
            AgentError::State(format!(
                "removing template {name} stopped half-way: {}; nothing starts from it \
                 any more, and `spore template rm {name}` (or the agent's next start) \
                 finishes the removal",
                e.chain()
            ))
        })
    }

    /// Fails if anything but the template's own standbys uses it.
    fn template_blockers(&self, name: &str, t: &TemplateRecord) -> Result<()> {
        let info = self.template_info(name, t)?;
        if !info.clones.is_empty() {
            return Err(AgentError::InUse {
                kind: "template",
                name: name.into(),
                by: format!(
                    "vm {} (remove them first, e.g. spore vm rm --group)",
                    info.clones.join(", vm ")
                ),
            });
        }
        let vms = self.meta.list::<VmRecord>(Table::Vms)?;
        let standbys: Vec<String> = vms
            .iter()
            .filter(|(_, v)| v.standby && v.template.as_deref() == Some(name))
            .map(|(n, _)| n.clone())
            .collect();
        // Disks on the template's images that are not its standbys'.
        for (disk, d) in self.meta.list::<crate::records::DiskRecord>(Table::Disks)? {
            let ours = d.vm.as_ref().is_some_and(|vm| standbys.contains(vm));
            if !ours && [&t.ram_image, &t.disk_image, &t.boot_image].contains(&&d.image) {
                return Err(AgentError::InUse {
                    kind: "template",
                    name: name.into(),
                    by: format!("disk {disk} (on image {})", d.image),
                });
            }
        }
        Ok(())
    }

    /// The removal proper, of a template marked `removing`: standbys,
    /// images (each at most once: one already gone is skipped), RAM file,
    /// directory, then the record.
    fn remove_template_now(
        &self,
        name: &str,
        t: &TemplateRecord,
    ) -> Result<spore_api::RemoveResult> {
        let until = Instant::now() + Duration::from_secs(120);
        while self.standbys.lock().filling.contains(name) {
            if Instant::now() > until {
                return Err(AgentError::State(format!(
                    "template {name}: a standby clone is still being made; try again"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.standbys.lock().ready.remove(name);
        for (sb, v) in self.meta.list::<VmRecord>(Table::Vms)? {
            if v.standby && v.template.as_deref() == Some(name) {
                self.remove_vm(&sb, true)?;
            }
        }
        if crate::failpoint::hit("template-rm-standbys") {
            return Err(AgentError::State("fail-point template-rm-standbys".into()));
        }
        self.memfs.lock().remove(name);
        let mut freed_chunks = 0;
        let mut freed_bytes = 0;
        for (i, image) in [&t.ram_image, &t.disk_image, &t.boot_image]
            .into_iter()
            .enumerate()
        {
            if i == 1 && crate::failpoint::hit("template-rm-images") {
                return Err(AgentError::State("fail-point template-rm-images".into()));
            }
            match self.images.remove_image(image) {
                Ok(r) => {
                    freed_chunks += r.freed_chunks;
                    freed_bytes += r.freed_bytes;
                }
                Err(AgentError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        for path in [self.template_ram(name), self.template_dir(name)] {
            let gone = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match gone {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(AgentError::Io {
                        context: format!("removing {}", path.display()),
                        source: e,
                    })
                }
                _ => {}
            }
        }
        self.meta.remove(Table::Templates, name)?;
        Ok(spore_api::RemoveResult {
            removed: name.into(),
            freed_chunks,
            freed_bytes,
        })
    }

    /// Finishes removals a previous run left half-way (templates marked
    /// `removing`); returns what it did, for the start-up report.
    pub(crate) fn finish_template_removals(&self) -> Vec<String> {
        let Ok(list) = self.meta.list::<TemplateRecord>(Table::Templates) else {
            return Vec::new();
        };
        let mut done = Vec::new();
        for (name, t) in list.into_iter().filter(|(_, t)| t.removing) {
            match self.remove_template_now(&name, &t) {
                Ok(_) => {
                    tracing::warn!(template = %name, "finished a removal a previous run left half-way");
                    done.push(format!(
                        "template {name}: finished its removal, left half-way"
                    ));
                }
                Err(e) => {
                    tracing::error!(template = %name, error = %e.chain(), "finishing a template's removal failed");
                    done.push(format!(
                        "template {name}: finishing its removal failed: {}",
                        e.chain()
                    ));
                }
            }
        }
        done
    }
}

/// The record a clone of `t` starts from (name, disk, identity and group
/// are the caller's).
fn clone_record(name: &str, t: &TemplateRecord) -> VmRecord {
    VmRecord {
        image: t.disk_image.clone(),
        disk: String::new(),
        state: VmState::Starting,
        pid: None,
        accel: t.accel.clone(),
        memory_mib: t.memory_mib,
        cpus: t.cpus,
        // The kernel is in the template's RAM; the clone never boots.
        kernel: None,
        initrd: None,
        append: None,
        created: now(),
        reason: None,
        max_memory_mib: t.max_memory_mib,
        max_cpus: t.max_cpus,
        template: Some(name.to_owned()),
        group: None,
        identity: None,
        dimms: 0,
        standby: false,
    }
}

impl Agent {
    /// A live standby of the template, if any; dead ones (their QEMU gone,
    /// or not paused in standby) are removed on the way, so that a clone
    /// falls back to a fresh start and the pool is refilled.
    fn take_standby(&self, template: &str) -> Option<String> {
        loop {
            let sb = self.standbys.lock().ready.get_mut(template)?.pop()?;
            let alive = self.running_vm(&sb).is_some()
                && self
                    .vm_record(&sb)
                    .is_ok_and(|r| r.state == VmState::Standby);
            if alive {
                return Some(sb);
            }
            tracing::warn!(vm = %sb, template, "standby clone is gone; removing it");
            if let Err(e) = self.remove_vm(&sb, true) {
                tracing::warn!(vm = %sb, error = %e.chain(), "removing a dead standby clone");
            }
        }
    }

    /// Fills every template's standby pool, in the background: standbys
    /// do not outlive the agent that started them, so a starting agent
    /// (once it serves NBD, which their disks need) makes new ones.
    pub fn fill_all_standbys(self: &Arc<Self>) {
        if self.config.clone_standby == 0 {
            return;
        }
        match self.meta.list::<TemplateRecord>(Table::Templates) {
            Ok(list) => {
                for (name, _) in list {
                    self.fill_standbys(&name);
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing templates for the standby pool"),
        }
    }

    /// Tops the template's standby pool up to `--clone-standby`, in the
    /// background.
    fn fill_standbys(self: &Arc<Self>, template: &str) {
        let want = self.config.clone_standby as usize;
        {
            let mut s = self.standbys.lock();
            if want == 0 || s.removing.contains(template) || !s.filling.insert(template.to_owned())
            {
                return;
            }
        }
        let agent = self.clone();
        let name = template.to_owned();
        let template = template.to_owned();
        let spawned = std::thread::Builder::new()
            .name(format!("standby-{name}"))
            .spawn(move || {
                loop {
                    let (have, removing) = {
                        let s = agent.standbys.lock();
                        (
                            s.ready.get(&template).map_or(0, Vec::len),
                            s.removing.contains(&template),
                        )
                    };
                    if have >= want || removing {
                        break;
                    }
                    match agent.make_standby(&template) {
                        Ok(vm) => agent
                            .standbys
                            .lock()
                            .ready
                            .entry(template.clone())
                            .or_default()
                            .push(vm),
                        Err(e) => {
                            tracing::warn!(template = %template, error = %e.chain(), "standby clone failed");
                            break;
                        }
                    }
                }
                agent.standbys.lock().filling.remove(&template);
            });
        if let Err(e) = spawned {
            self.standbys.lock().filling.remove(&name);
            tracing::warn!(error = %e, "cannot start the standby pool");
        }
    }

    /// One standby: a clone with its disk, QEMU started and the state
    /// loaded, paused before `cont`, under an internal name.
    fn make_standby(self: &Arc<Self>, template: &str) -> Result<String> {
        let t = self.template_record(template)?;
        t.usable(template)?;
        let (ram, warm) = self.ensure_template_ram(template, &t)?;
        let mut rec = clone_record(template, &t);
        rec.standby = true;
        let vm = loop {
            let b: [u8; 4] = rand::random();
            let vm = format!("standby-{:02x}{:02x}{:02x}{:02x}", b[0], b[1], b[2], b[3]);
            rec.disk = vm.clone();
            rec.identity = Some(self.unique_identity(&vm)?);
            if self.meta.insert_new(Table::Vms, &vm, &rec)? {
                break vm;
            }
        };
        let start = Start::Resume {
            template: template.to_owned(),
            ram,
            warm,
            hold: true,
            state: self.template_dir(template).join("state"),
            memory_mib: t.memory_mib,
            ram_kib: t.boot_ram_kib(),
            cpus: t.cpus,
        };
        let r = self
            .disks
            .create_disk(&vm, &t.disk_image, Some(&vm))
            .and_then(|_| {
                if crate::failpoint::hit("standby-refill") {
                    return Err(AgentError::State("fail-point standby-refill".into()));
                }
                self.start_vm(&vm, rec, start, Instant::now())
            });
        if let Err(e) = r {
            self.settle_failed_start(&vm, &e);
            let _ = self.remove_vm(&vm, true);
            return Err(e);
        }
        Ok(vm)
    }

    /// Hands standby `sb` out as clone `vm`, whose record (name claimed,
    /// group, size) is `rec`: it keeps the standby's disk, MAC and
    /// generation ID, and gets `vm` as its hostname.
    fn activate_standby(
        &self,
        sb: &str,
        vm: &str,
        mut rec: VmRecord,
        t: &TemplateRecord,
    ) -> Result<spore_api::VmInfo> {
        let t0 = Instant::now();
        let result = (|| -> Result<spore_api::VmInfo> {
            let standby = self.vm_record(sb)?;
            if standby.state != VmState::Standby {
                return Err(AgentError::State(format!(
                    "standby {sb} is {}",
                    standby.state
                )));
            }
            let mut id = standby
                .identity
                .clone()
                .ok_or_else(|| AgentError::State(format!("standby {sb} has no identity")))?;
            id.hostname = vm.to_owned();
            rec.disk = standby.disk.clone();
            rec.pid = standby.pid;
            rec.identity = Some(id);
            self.meta.put(Table::Vms, vm, &rec)?;
            self.meta.remove(Table::Vms, sb)?;
            self.rename_running(sb, vm)?;
            let mut disk = self.disks.disk_record(&rec.disk)?;
            disk.vm = Some(vm.to_owned());
            self.meta.put(Table::Disks, &rec.disk, &disk)?;
            let mut qmp = Qmp::connect(&self.vms.dir(vm).join("qmp.sock"), Duration::from_secs(5))
                .map_err(|e| AgentError::State(e.to_string()))?;
            let mut times = spore_api::StartTimes {
                standby: true,
                ..Default::default()
            };
            self.finish_resume(vm, &rec, &mut qmp, t.memory_mib, t.cpus, &mut times)?;
            times.total = t0.elapsed().as_secs_f64() * 1e3;
            self.set_start_times(vm, times);
            self.set_vm_state(vm, |r| r.state = VmState::Running)?;
            tracing::info!(
                vm,
                standby = sb,
                ms = t0.elapsed().as_secs_f64() * 1e3,
                "standby clone handed out"
            );
            self.get_vm(vm)
        })();
        if let Err(e) = &result {
            for name in [sb, vm] {
                if let Some((pid, _)) = self.running_vm(name) {
                    // SAFETY: kill sends a signal; no memory is involved.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
            let _ = self.meta.remove(Table::Vms, sb);
            self.settle_failed_start(vm, e);
        }
        result
    }

    /// Removes template RAM files and template directories that no
    /// template record owns (left by a capture that failed half-way or a
    /// crash), and says so.
    pub(crate) fn collect_template_debris(&self) -> Vec<String> {
        let mut report = Vec::new();
        let known: std::collections::HashSet<String> = self
            .meta
            .list::<TemplateRecord>(Table::Templates)
            .map(|l| l.into_iter().map(|(n, _)| n).collect())
            .unwrap_or_default();
        if let Ok(entries) = fs::read_dir(self.vms.ram_dir()) {
            for e in entries.flatten() {
                let file = e.file_name().to_string_lossy().into_owned();
                let Some(name) = file
                    .strip_prefix("tmpl-")
                    .and_then(|f| f.strip_suffix(".ram").or_else(|| f.strip_suffix(".tmp")))
                else {
                    continue;
                };
                if !known.contains(name) || file.ends_with(".tmp") {
                    tracing::warn!(file = %e.path().display(), "removing a template RAM file no template owns");
                    let _ = fs::remove_file(e.path());
                    report.push(format!(
                        "template RAM file {}: no template owns it; removed",
                        e.path().display()
                    ));
                }
            }
        }
        if let Ok(entries) = fs::read_dir(self.data_dir().join("templates")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !known.contains(&name) {
                    tracing::warn!(dir = %e.path().display(), "removing a template directory no template owns");
                    let _ = fs::remove_dir_all(e.path());
                    report.push(format!(
                        "template directory {}: no template owns it; removed",
                        e.path().display()
                    ));
                }
            }
        }
        report
    }

    /// Removes standby clones a previous run left (they never outlive
    /// their agent: QEMU dies with it).
    pub(crate) fn drop_standbys(&self) -> Vec<String> {
        let Ok(list) = self.meta.list::<VmRecord>(Table::Vms) else {
            return Vec::new();
        };
        let mut report = Vec::new();
        for (name, r) in list {
            if r.standby {
                match self.remove_vm(&name, true) {
                    Ok(()) => report.push(format!("standby clone {name}: removed")),
                    Err(e) => {
                        tracing::warn!(vm = %name, error = %e.chain(), "removing a standby clone");
                        report.push(format!(
                            "standby clone {name}: removing it failed: {}",
                            e.chain()
                        ));
                    }
                }
            }
        }
        report
    }
}

/// The `block`-sized blocks of `file` that process `pid` has mapped in
/// memory (pages it touched), in address order.
fn touched_blocks(pid: u32, file: &std::path::Path, block: u64) -> std::io::Result<Vec<u32>> {
    use std::os::unix::fs::FileExt;
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let want = file.to_string_lossy();
    let page = 4096u64;
    let pagemap = fs::File::open(format!("/proc/{pid}/pagemap"))?;
    let mut blocks = std::collections::BTreeSet::new();
    for line in maps.lines().filter(|l| l.ends_with(want.as_ref())) {
        let mut f = line.split_whitespace();
        let (Some(range), Some(_perms), Some(offset)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end), Ok(file_off)) = (
            u64::from_str_radix(a, 16),
            u64::from_str_radix(b, 16),
            u64::from_str_radix(offset, 16),
        ) else {
            continue;
        };
        let pages = (end - start) / page;
        let mut entries = vec![0u8; (pages * 8) as usize];
        pagemap.read_exact_at(&mut entries, start / page * 8)?;
        for (i, e) in entries.chunks_exact(8).enumerate() {
            let v = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            // bit 63: present; bit 62: swapped
            if v >> 62 != 0 {
                blocks.insert(((file_off + i as u64 * page) / block) as u32);
            }
        }
    }
    Ok(blocks.into_iter().collect())
}

/// Sort key that puts `web-2` before `web-10`.
fn natural(name: &str) -> (String, u64) {
    match name.rsplit_once('-') {
        Some((p, n)) if n.bytes().all(|b| b.is_ascii_digit()) && !n.is_empty() => {
            (p.to_owned(), n.parse().unwrap_or(0))
        }
        _ => (name.to_owned(), 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clone_names_sort_naturally() {
        let mut v = vec!["web-10", "web-2", "web-1", "api"];
        v.sort_by_key(|n| natural(n));
        assert_eq!(v, ["api", "web-1", "web-2", "web-10"]);
    }

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
