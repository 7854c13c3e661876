//! Removing templates, atomic or finished later: every blocker is checked
//! first, the record is marked `removing`, then standbys, images, RAM file
//! and directory go and the record last; a removal that stopped is
//! finished by the next `template rm` or agent start. Also the start-up
//! collection of template files nothing owns.

use super::*;

impl Templates {
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
    pub(super) fn template_blockers(&self, name: &str, t: &TemplateRecord) -> Result<()> {
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
    pub(super) fn remove_template_now(
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
                self.vms.remove_vm(&sb, true)?;
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
        if let Ok(entries) = fs::read_dir(self.vms.procs.ram_dir()) {
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
        if let Ok(entries) = fs::read_dir(self.data_dir.as_path().join("templates")) {
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
}
