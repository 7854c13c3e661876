//! Clones: a template's RAM placed (its file, rebuilt once from its image,
//! or a FUSE file paged in from elsewhere), clones started from it (from
//! the standby pool when one is ready) with their own identity, and clone
//! groups removed together.

use super::*;

/// How long the first clone of a template paged in from elsewhere waits
/// for the working set to reach the page cache before it resumes: enough
/// for a working set of tens of MiB on a fast link, short enough that the
/// clone still runs within half a second of the request.
const WARM_BUDGET: Duration = Duration::from_millis(300);

/// Clones started at once (QEMU start-up is CPU-bound).
const CLONE_WORKERS: usize = 2;

impl Templates {
    /// Makes sure clones can map the template's RAM: the local file (a
    /// template captured here); the file rebuilt from the RAM image when
    /// every chunk is here (tmpfs lost it in a reboot); or else a FUSE file
    /// that pages the image in on demand. Returns the path, and when a
    /// warm-up of the working set just started, the gate the first clone
    /// waits at before it resumes.
    pub(super) fn ensure_template_ram(
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
            let dir = self.vms.procs.ram_dir().join(format!("mem-{name}"));
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
        fs::create_dir_all(self.vms.procs.ram_dir())
            .map_err(AgentError::io("creating the RAM directory"))?;
        let tmp = path.with_extension("tmp");
        // A half-written file of a rebuild that failed is replaced.
        let _ = fs::remove_file(&tmp);
        crate::vms::check_ram_room(self.vms.procs.ram_dir(), size >> 10, &tmp)?;
        // Nothing half-written stays (a full RAM directory, a chunk that
        // cannot be read): the next clone starts over.
        let written = (|| -> Result<()> {
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
            Ok(())
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
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
            rec.identity = Some(self.vms.unique_identity(&vm)?);
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
                                    self.vms.start_vm(&vm, rec, start, Instant::now())
                                })
                        }
                    };
                    if let Err(e) = &r {
                        self.vms.settle_failed_start(&vm, e);
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
            self.vms.remove_vm(&vm, true)?;
            removed.push(vm);
        }
        Ok(GroupRemoved {
            group: group.to_owned(),
            removed,
        })
    }
}

/// A template's RAM image as the bytes of a memfs file.
struct DeviceBacking(Arc<ImageDevice>, u64);

/// How long a clone's page fault waits for its template's RAM when no
/// source delivers it: a failed read is an EIO on the FUSE file, which
/// kills the guest (SIGBUS), so a page is asked for again and again (each
/// try bounded by the read deadline) while the vCPU waits, as a paused
/// VM would.
const RAM_READ_PATIENCE: std::time::Duration = std::time::Duration::from_secs(600);

impl spore_memfs::Backing for DeviceBacking {
    fn size(&self) -> u64 {
        self.1
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let started = std::time::Instant::now();
        let mut tries = 0u32;
        loop {
            match self.0.read_at(offset, buf) {
                Ok(()) => {
                    if tries > 0 {
                        tracing::info!(offset, tries, "template RAM page arrived after a wait");
                    }
                    return Ok(());
                }
                Err(e) if started.elapsed() < RAM_READ_PATIENCE => {
                    if tries.is_multiple_of(10) {
                        tracing::warn!(offset, error = %e, waited = ?started.elapsed(), "template RAM page unavailable; the clone waits and it is asked for again");
                    }
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The record a clone of `t` starts from (name, disk, identity and group
/// are the caller's).
pub(super) fn clone_record(name: &str, t: &TemplateRecord) -> VmRecord {
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
}
