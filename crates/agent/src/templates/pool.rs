//! The standby pool's operations: clones started and paused ahead of
//! demand, handed out by `vm clone`, refilled in the background, dropped
//! at an agent's stop with its VMs (`spore agent stop --vms`), taken over by
//! the next agent otherwise. Its state is
//! [`super::standbys::Standbys`].

use super::clone::clone_record;
use super::*;

impl Templates {
    /// A live standby of the template, if any; dead ones (their QEMU gone,
    /// or not paused in standby) are removed on the way, so that a clone
    /// falls back to a fresh start and the pool is refilled.
    pub(super) fn take_standby(&self, template: &str) -> Option<String> {
        loop {
            let sb = self.standbys.lock().ready.get_mut(template)?.pop()?;
            let alive = self.vms.running_vm(&sb).is_some()
                && self
                    .vms
                    .vm_record(&sb)
                    .is_ok_and(|r| r.state == VmState::Standby);
            if alive {
                return Some(sb);
            }
            tracing::warn!(vm = %sb, template, "standby clone is gone; removing it");
            if let Err(e) = self.vms.remove_vm(&sb, true) {
                tracing::warn!(vm = %sb, error = %e.chain(), "removing a dead standby clone");
            }
        }
    }

    /// Fills every template's standby pool, in the background, once the
    /// agent serves NBD (which their disks need): a starting agent tops up
    /// what it took over from the previous one.
    pub fn fill_all_standbys(self: &Arc<Self>) {
        if self.clone_standby == 0 {
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
    pub(super) fn fill_standbys(self: &Arc<Self>, template: &str) {
        let want = self.clone_standby as usize;
        {
            let mut s = self.standbys.lock();
            if want == 0 || s.removing.contains(template) || !s.filling.insert(template.to_owned())
            {
                return;
            }
        }
        let templates = self.clone();
        let name = template.to_owned();
        let template = template.to_owned();
        let spawned = std::thread::Builder::new()
            .name(format!("standby-{name}"))
            .spawn(move || {
                loop {
                    let (have, removing) = {
                        let s = templates.standbys.lock();
                        (
                            s.ready.get(&template).map_or(0, Vec::len),
                            s.removing.contains(&template),
                        )
                    };
                    if have >= want || removing {
                        break;
                    }
                    match templates.make_standby(&template) {
                        Ok(vm) => templates
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
                templates.standbys.lock().filling.remove(&template);
            });
        if let Err(e) = spawned {
            self.standbys.lock().filling.remove(&name);
            tracing::warn!(error = %e, "cannot start the standby pool");
        }
    }

    /// One standby: a clone with its disk, QEMU started and the state
    /// loaded, paused before `cont`, under an internal name.
    pub(super) fn make_standby(self: &Arc<Self>, template: &str) -> Result<String> {
        let t = self.template_record(template)?;
        t.usable(template)?;
        let (ram, warm) = self.ensure_template_ram(template, &t)?;
        let mut rec = clone_record(template, &t);
        rec.standby = true;
        let vm = loop {
            let b: [u8; 4] = rand::random();
            let vm = format!("standby-{:02x}{:02x}{:02x}{:02x}", b[0], b[1], b[2], b[3]);
            rec.disk = vm.clone();
            rec.identity = Some(self.vms.unique_identity(&vm)?);
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
                self.vms.start_vm(&vm, rec, start, Instant::now())
            });
        if let Err(e) = r {
            self.vms.settle_failed_start(&vm, &e);
            let _ = self.vms.remove_vm(&vm, true);
            return Err(e);
        }
        Ok(vm)
    }

    /// Hands standby `sb` out as clone `vm`, whose record (name claimed,
    /// group, size) is `rec`: it keeps the standby's disk, MAC and
    /// generation ID, and gets `vm` as its hostname.
    pub(super) fn activate_standby(
        &self,
        sb: &str,
        vm: &str,
        mut rec: VmRecord,
        t: &TemplateRecord,
    ) -> Result<spore_api::VmInfo> {
        let t0 = Instant::now();
        let result = (|| -> Result<spore_api::VmInfo> {
            let standby = self.vms.vm_record(sb)?;
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
            self.vms.rename_running(sb, vm)?;
            let mut disk = self.disks.disk_record(&rec.disk)?;
            disk.vm = Some(vm.to_owned());
            self.meta.put(Table::Disks, &rec.disk, &disk)?;
            let mut qmp = Qmp::connect(
                &self.vms.procs.dir(vm).join("qmp.sock"),
                Duration::from_secs(5),
            )
            .map_err(|e| AgentError::State(e.to_string()))?;
            let mut times = spore_api::StartTimes {
                standby: true,
                ..Default::default()
            };
            self.vms
                .finish_resume(vm, &rec, &mut qmp, t.memory_mib, t.cpus, &mut times)?;
            times.total = t0.elapsed().as_secs_f64() * 1e3;
            self.vms.set_start_times(vm, times);
            self.vms.set_vm_state(vm, |r| r.state = VmState::Running)?;
            tracing::info!(
                vm,
                standby = sb,
                ms = t0.elapsed().as_secs_f64() * 1e3,
                "standby clone handed out"
            );
            self.vms.get_vm(vm)
        })();
        if let Err(e) = &result {
            for name in [sb, vm] {
                if let Some((pid, _)) = self.vms.running_vm(name) {
                    // SAFETY: kill sends a signal; no memory is involved.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
            let _ = self.meta.remove(Table::Vms, sb);
            self.vms.settle_failed_start(vm, e);
        }
        result
    }

    /// Removes standby clones a previous run left (they never outlive
    /// their agent: QEMU dies with it).
    /// At start: standby clones whose QEMU the VM service took over go
    /// back into their template's pool (up to `--clone-standby`); the rest
    /// (QEMU gone, template gone, no pool wanted) are removed.
    pub(crate) fn adopt_standbys(&self) -> Vec<String> {
        let Ok(list) = self.meta.list::<VmRecord>(Table::Vms) else {
            return Vec::new();
        };
        let mut report = Vec::new();
        for (name, r) in list.into_iter().filter(|(_, r)| r.standby) {
            let template = r.template.clone().unwrap_or_default();
            let alive = r.state == VmState::Standby && self.vms.running_vm(&name).is_some();
            let exists = self.template_record(&template).is_ok();
            let kept = alive && exists && {
                let mut s = self.standbys.lock();
                let ready = s.ready.entry(template.clone()).or_default();
                (ready.len() < self.clone_standby as usize)
                    .then(|| ready.push(name.clone()))
                    .is_some()
            };
            if kept {
                report.push(format!(
                    "standby clone {name}: kept in the pool of template {template}"
                ));
                continue;
            }
            match self.vms.remove_vm(&name, true) {
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
        report
    }

    pub(crate) fn drop_standbys(&self) -> Vec<String> {
        let Ok(list) = self.meta.list::<VmRecord>(Table::Vms) else {
            return Vec::new();
        };
        let mut report = Vec::new();
        for (name, r) in list {
            if r.standby {
                match self.vms.remove_vm(&name, true) {
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
