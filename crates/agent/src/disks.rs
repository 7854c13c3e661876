//! Disk operations: create, list, commit, remove.
//!
//! Owns: the `Disks` table of the metadata store (name -> image, manifest,
//! VM), each disk's overlay in `DATA/disks/NAME/`, and its export
//! `disk/NAME` in the registry (exports.rs).

use std::fs;
use std::sync::Arc;

use spore_api::{DiskInfo, ImageSummary, RemoveResult};
use spore_blockdev::Disk;
use spore_chunks::ChunkId;

use crate::agent::Agent;
use crate::error::{check_name, AgentError, Result};
use crate::exports::DISK_PREFIX;
use crate::meta::Table;
use crate::records::{now, DiskRecord, ImageRecord};

impl Agent {
    pub fn disk_record(&self, name: &str) -> Result<DiskRecord> {
        self.meta
            .get(Table::Disks, name)?
            .ok_or_else(|| AgentError::NotFound {
                kind: "disk",
                name: name.into(),
            })
    }

    fn disk_info(&self, name: &str, rec: &DiskRecord) -> DiskInfo {
        let disk = self.exports.disk(name);
        DiskInfo {
            name: name.to_owned(),
            image: rec.image.clone(),
            manifest: rec.manifest.to_hex(),
            virtual_size: disk.as_ref().map(|d| d.overlay().size()).unwrap_or(0),
            written_bytes: disk
                .as_ref()
                .map(|d| d.overlay().allocated_granules() * 4096)
                .unwrap_or(0),
            read_bytes: disk
                .as_ref()
                .map(|d| {
                    d.stats()
                        .bytes_read
                        .load(std::sync::atomic::Ordering::Relaxed)
                })
                .unwrap_or(0),
            export: format!("{DISK_PREFIX}{name}"),
            vm: rec.vm.clone(),
            created: rec.created,
            broken: self.broken_disks.lock().get(name).cloned(),
        }
    }

    pub fn create_disk(
        self: &Arc<Self>,
        name: &str,
        image: &str,
        vm: Option<&str>,
    ) -> Result<DiskInfo> {
        self.create_disk_on(name, image, None, vm)
    }

    /// A disk on exactly the image `manifest` (what a migrating VM ran
    /// on), recorded as image `image`. The manifest and its layers are
    /// fetched by content where this host lacks them, from its peers and
    /// origin or else from `source` (the sending host's peer URL); what
    /// `image` names here does not matter.
    pub fn create_disk_pinned(
        self: &Arc<Self>,
        name: &str,
        image: &str,
        manifest: ChunkId,
        source: Option<&str>,
        vm: Option<&str>,
    ) -> Result<DiskInfo> {
        check_name("disk", name)?;
        // Pinned from the first fetched chunk until the disk's record
        // holds the manifest.
        let pin = self.gc_lock.read();
        self.fetch_manifest(&manifest, source).map_err(|e| {
            AgentError::State(format!(
                "the VM's disk is on image manifest {manifest} ({image} at the source), \
                 which neither this host nor its sources can provide: {}",
                e.chain()
            ))
        })?;
        let info = self.create_disk_on(name, image, Some(manifest), vm);
        drop(pin);
        info
    }

    /// Makes the manifest `id` and its layers local, fetched by content.
    fn fetch_manifest(&self, id: &ChunkId, source: Option<&str>) -> Result<()> {
        let from_source = source.map(|url| {
            spore_transfer::Fetcher::new(vec![spore_transfer::Remote::new(
                url,
                crate::records::REMOTE_TIMEOUT,
            )])
        });
        let fetch = |ids: &[ChunkId]| -> Result<()> {
            let missing: Vec<ChunkId> = ids
                .iter()
                .filter(|id| !self.store.present(id))
                .copied()
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            let mut why = String::from("no peer, origin or source is configured");
            for fetcher in self
                .fetcher
                .as_deref()
                .into_iter()
                .chain(from_source.as_ref())
            {
                match fetcher.fetch(&self.store, &missing) {
                    Ok(()) => return Ok(()),
                    Err(e) => why = e.to_string(),
                }
            }
            Err(AgentError::State(why))
        };
        fetch(&[*id])?;
        let layers = spore_image::image::load_manifest(&self.store, id)?.layers;
        fetch(&layers)?;
        self.store.sync()?;
        Ok(())
    }

    fn create_disk_on(
        self: &Arc<Self>,
        name: &str,
        image: &str,
        pinned: Option<ChunkId>,
        vm: Option<&str>,
    ) -> Result<DiskInfo> {
        check_name("disk", name)?;
        let _names = self.disk_names.lock();
        let image_rec = match pinned {
            Some(manifest) => ImageRecord {
                manifest,
                created: now(),
                complete: false,
                profile: None,
            },
            None => self.images.resolve_image(image)?,
        };
        if self.meta.get::<DiskRecord>(Table::Disks, name)?.is_some() {
            return Err(AgentError::Exists {
                kind: "disk",
                name: name.into(),
            });
        }
        let base = self.exports.open_image(&image_rec.manifest)?;
        let dir = self.disk_dir(name);
        // A directory without a record is debris from a crash.
        if dir.exists() {
            fs::remove_dir_all(&dir)
                .map_err(AgentError::io(format!("removing stale {}", dir.display())))?;
        }
        let disk = Disk::create(&dir, base)?;
        let rec = DiskRecord {
            image: image.to_owned(),
            manifest: image_rec.manifest,
            created: now(),
            vm: vm.map(str::to_owned),
        };
        if !self.meta.insert_new(Table::Disks, name, &rec)? {
            let _ = fs::remove_dir_all(&dir);
            return Err(AgentError::Exists {
                kind: "disk",
                name: name.into(),
            });
        }
        self.exports.add_disk(name, Arc::new(disk));
        if pinned.is_none() {
            let base = self.exports.open_image(&image_rec.manifest)?;
            self.images.record_profile(image, &image_rec, &base);
        }
        Ok(self.disk_info(name, &rec))
    }

    pub fn list_disks(&self) -> Result<Vec<DiskInfo>> {
        Ok(self
            .meta
            .list::<DiskRecord>(Table::Disks)?
            .iter()
            .map(|(n, r)| self.disk_info(n, r))
            .collect())
    }

    pub fn get_disk(&self, name: &str) -> Result<DiskInfo> {
        let rec = self.disk_record(name)?;
        Ok(self.disk_info(name, &rec))
    }

    /// `disk commit` as users call it: a disk whose VM is running is
    /// committed with the VM paused (QEMU drains and flushes its requests
    /// when it stops), so the layer is the crash-consistent state of one
    /// moment, and resumed afterwards.
    pub fn commit_disk_of_vm(&self, name: &str, new_image: &str) -> Result<ImageSummary> {
        let rec = self.disk_record(name)?;
        let Some(vm) = rec.vm.filter(|vm| self.running_vm(vm).is_some()) else {
            return self.commit_disk(name, new_image);
        };
        let qmp_err = |e: spore_qemu::QmpError| AgentError::State(format!("vm {vm}: {e}"));
        let mut qmp = spore_qemu::Qmp::connect(
            &self.vms.dir(&vm).join("qmp.sock"),
            std::time::Duration::from_secs(5),
        )
        .map_err(qmp_err)?;
        let was_running = qmp.status().map_err(qmp_err)? == "running";
        if was_running {
            qmp.execute("stop", None).map_err(qmp_err)?;
            tracing::info!(disk = name, vm = %vm, "vm paused for the commit of its disk");
        }
        let result = self.commit_disk(name, new_image);
        if was_running {
            if let Err(e) = qmp.execute("cont", None) {
                tracing::error!(vm = %vm, error = %e, "resuming the vm after committing its disk failed");
                return Err(qmp_err(e));
            }
        }
        result
    }

    /// Makes the disk's writes a new layer on its image, named `new_image`.
    /// The caller makes sure nothing writes the disk meanwhile.
    pub fn commit_disk(&self, name: &str, new_image: &str) -> Result<ImageSummary> {
        check_name("image", new_image)?;
        self.disk_record(name)?;
        if self
            .meta
            .get::<ImageRecord>(Table::Images, new_image)?
            .is_some()
        {
            return Err(AgentError::Exists {
                kind: "image",
                name: new_image.into(),
            });
        }
        let disk = self
            .exports
            .disk(name)
            .ok_or_else(|| AgentError::NotFound {
                kind: "disk",
                name: name.into(),
            })?;
        // Pinned until the name is in the metadata store: until then the
        // new chunks are reachable from nothing, and a garbage collection
        // would take them.
        let pin = self.gc_lock.read();
        let published = disk.commit(&self.store, &format!("disk {name}"))?;
        let rec = ImageRecord {
            manifest: published.id,
            created: now(),
            complete: false,
            profile: None,
        };
        if !self.meta.insert_new(Table::Images, new_image, &rec)? {
            return Err(AgentError::Exists {
                kind: "image",
                name: new_image.into(),
            });
        }
        self.exports.bind_image(new_image, published.id);
        drop(pin);
        tracing::info!(
            disk = name,
            image = new_image,
            blocks = published.stats.changed_blocks,
            "committed"
        );
        self.images.image_summary(new_image, &rec)
    }

    pub fn remove_disk(&self, name: &str, allow_vm: bool) -> Result<RemoveResult> {
        let _names = self.disk_names.lock();
        let rec = self.disk_record(name)?;
        // A disk whose VM record is gone (a standby that died, a crash
        // between two records) belongs to nobody: it can go.
        let owner = rec.vm.as_ref().filter(|vm| {
            self.meta
                .get::<crate::vms::VmRecord>(Table::Vms, vm)
                .ok()
                .flatten()
                .is_some()
        });
        if let (Some(vm), false) = (owner, allow_vm) {
            return Err(AgentError::InUse {
                kind: "disk",
                name: name.into(),
                by: format!("vm {vm} (remove the VM instead)"),
            });
        }
        self.exports.remove_disk(name);
        self.meta.remove(Table::Disks, name)?;
        let dir = self.disk_dir(name);
        fs::remove_dir_all(&dir).map_err(AgentError::io(format!("removing {}", dir.display())))?;
        drop(_names);
        let (freed_chunks, freed_bytes) = self.images.release_manifest(&rec.manifest)?;
        Ok(RemoveResult {
            removed: name.into(),
            freed_chunks,
            freed_bytes,
        })
    }
}
