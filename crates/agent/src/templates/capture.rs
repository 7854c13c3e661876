//! Capturing a running VM as a template: checks that can fail run before
//! the VM is paused; a failure after the pause resumes it and removes
//! what was made (fail-points at every step); the RAM becomes an image and
//! the template's bundle, and the working set is recorded after.

use super::*;

/// Room a capture needs in the data directory besides the guest's RAM and
/// its disk's written blocks (each copied into chunks): the device state
/// and the store's own files.
const CAPTURE_HEADROOM: u64 = 64 << 20;

impl Templates {
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
        // Its parts travel as images NAME.ram, NAME.disk, NAME.boot.
        if name.len() > 128 - ".disk".len() {
            return Err(AgentError::Invalid(format!(
                "template name {name:?} is too long: a template's RAM, disk and boot state are images NAME.ram, NAME.disk and NAME.boot, and names are {}; a template name has at most 123 characters",
                spore_api::NAME_RULE
            )));
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
        let rec = self.vms.vm_record(vm)?;
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
        let Some((_, exit)) = self.vms.running_vm(vm) else {
            return Err(AgentError::State(format!("vm {vm} has no QEMU process")));
        };
        let vm_ram = self.vms.procs.ram_file(vm);
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
        let free = crate::vms::free_bytes(self.data_dir.as_path())?;
        if free < need {
            return Err(AgentError::State(format!(
                "not enough room to capture vm {vm} in {}: {} MiB free, {} MiB needed (the \
                 {} MiB of RAM the guest touched, the {} MiB it wrote to its disk, and {} MiB \
                 for the state); nothing was paused",
                self.data_dir.as_path().display(),
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

        // While it lasts, a mark in the VM's directory says a capture has
        // the VM paused: should the agent die meanwhile, the next one
        // resumes it (a saved state alone looks like a finished migration).
        let mark = self.vms.procs.dir(vm).join(crate::vms::CAPTURE_MARK);
        fs::write(&mark, name).map_err(AgentError::io(format!("writing {}", mark.display())))?;
        struct Unmark(std::path::PathBuf);
        impl Drop for Unmark {
            fn drop(&mut self) {
                let _ = fs::remove_file(&self.0);
            }
        }
        let _unmark = Unmark(mark);

        // 1. Pause and save device state. From here until the source runs
        //    again, its guest is frozen.
        let paused = Instant::now();
        let mut qmp = Qmp::connect(
            &self.vms.procs.dir(vm).join("qmp.sock"),
            Duration::from_secs(5),
        )
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
            let _ = qmp.set_ignore_shared(false);
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
        crate::failpoint::stall("capture-paused");
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
        self.vms.set_vm_state(vm, |r| r.state = VmState::Stopping)?;
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
            self.vms.set_vm_state(vm, |r| {
                r.reason = Some(format!("captured as template {name}"));
            })?;
            t.source_after = "stopped (its memory became the template)".into();
            None
        } else {
            let mut again = self.vms.vm_record(vm)?;
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
            Some(self.vms.start_vm(vm, again, start, Instant::now()))
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
                self.vms.settle_failed_start(vm, e);
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
    pub(super) fn undo_capture(
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
        let _ = self.vms.set_vm_state(vm, |r| {
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
    pub(super) fn store_bundle(
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
    pub(super) fn import_raw_image(
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
            resolved_at: None,
            newer: None,
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

    /// After a capture: once a VM runs from the template (the resumed
    /// source, or a clone) for a few seconds, the pages it has touched are
    /// the template's working set. They become the RAM image's profile, so
    /// hosts that page the template in prefetch them first.
    pub(super) fn record_ram_working_set(self: &Arc<Self>, name: &str) {
        let templates = self.clone();
        let name = name.to_owned();
        let spawned = std::thread::Builder::new()
            .name(format!("working-set-{name}"))
            .spawn(move || {
                let path = templates.template_ram(&name);
                let deadline = Instant::now() + Duration::from_secs(120);
                while Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(500));
                    let Ok(t) = templates.template_record(&name) else { return };
                    let runner = templates.vms.list_vms().ok().and_then(|vms| {
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
                            let result = templates.set_profile(&t.ram_image, RAM_BLOCK_SIZE, blocks);
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
    pub(super) fn set_profile(&self, image: &str, block_size: u32, blocks: Vec<u32>) -> Result<()> {
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
