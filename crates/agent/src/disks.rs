//! The disk service: create, list, commit, remove.
//!
//! Owns: the `Disks` table of the metadata store (name -> image, manifest,
//! VM), each disk's overlay in `DATA/disks/NAME/`, its export `disk/NAME`
//! in the registry (exports.rs), and which disks could not be opened. It
//! is given narrow handles (the metadata store, the chunk store, the
//! export registry, the fetcher, the GC lock and the image service), never
//! the agent; committing a running VM's disk, which pauses the VM, is the
//! VM service's (vms/mod.rs).

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use spore_chunks::ChunkStore;
use spore_transfer::Fetcher;

use spore_api::{DiskInfo, ImageSummary, RemoveResult};
use spore_blockdev::Disk;
use spore_chunks::ChunkId;

use crate::error::{check_name, AgentError, Result};
use crate::exports::{Registry, DISK_PREFIX};
use crate::images::Images;
use crate::meta::{Meta, Table};
use crate::records::{now, DiskRecord, ImageRecord};
use crate::vms::processes::VmRecord;

/// The disk service and the handles it works with.
#[derive(Debug)]
pub struct Disks {
    root: PathBuf,
    meta: Arc<Meta>,
    store: Arc<ChunkStore>,
    exports: Arc<Registry>,
    fetcher: Option<Arc<Fetcher>>,
    gc_lock: Arc<RwLock<()>>,
    images: Arc<Images>,
    /// How a migration's source is reached for the manifest of its disk.
    links: spore_transfer::Links,
    /// Serialises creating and removing disks, so that two requests for
    /// one name cannot clean up each other's directory.
    names: Mutex<()>,
    /// Disks whose overlay could not be opened at start, and why.
    broken: Mutex<HashMap<String, String>>,
}

impl Disks {
    /// The disk service over `root` (`DATA/disks`).
    pub fn new(
        root: PathBuf,
        meta: Arc<Meta>,
        store: Arc<ChunkStore>,
        exports: Arc<Registry>,
        fetcher: Option<Arc<Fetcher>>,
        gc_lock: Arc<RwLock<()>>,
        images: Arc<Images>,
    ) -> Self {
        Disks {
            links: spore_transfer::Links::default(),
            root,
            meta,
            store,
            exports,
            fetcher,
            gc_lock,
            images,
            names: Mutex::new(()),
            broken: Mutex::default(),
        }
    }

    /// Reaches other hosts (a migration's source) over `links`.
    pub fn with_links(mut self, links: spore_transfer::Links) -> Self {
        self.links = links;
        self
    }

    /// The directory of disk `name`'s overlay.
    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Opens every recorded disk and serves it; one that cannot be opened
    /// is reported and left as it is on disk for repair, and every other
    /// disk still starts. Removes disk directories that no record owns (a
    /// crash between creating one and recording it); returns what it
    /// removed, one line each.
    pub fn recover(&self) -> Result<Vec<String>> {
        let mut report = Vec::new();
        let disks = self.meta.list::<DiskRecord>(Table::Disks)?;
        let known: std::collections::HashSet<&str> =
            disks.iter().map(|(n, _)| n.as_str()).collect();
        for entry in fs::read_dir(&self.root).map_err(AgentError::io("listing disks"))? {
            let entry = entry.map_err(AgentError::io("listing disks"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !known.contains(name.as_str()) {
                tracing::warn!(disk = %name, "removing a disk directory without a record (left by a crash)");
                let _ = fs::remove_dir_all(entry.path());
                report.push(format!(
                    "disk directory {}: no record owns it; removed",
                    entry.path().display()
                ));
            }
        }
        for (name, rec) in disks {
            let opened = (|| -> Result<Disk> {
                let base = self.exports.open_image(&rec.manifest)?;
                Ok(Disk::open(&self.dir(&name), base)?)
            })();
            match opened {
                Ok(disk) => self.exports.add_disk(&name, Arc::new(disk)),
                Err(e) => {
                    tracing::error!(disk = %name, error = %e.chain(), "disk cannot be opened; not served (its files are kept for repair)");
                    self.broken.lock().insert(name, e.chain());
                }
            }
        }
        Ok(report)
    }

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
            broken: self.broken.lock().get(name).cloned(),
        }
    }

    pub fn create_disk(&self, name: &str, image: &str, vm: Option<&str>) -> Result<DiskInfo> {
        self.create_disk_on(name, image, None, vm)
    }

    /// A disk on exactly the image `manifest` (what a migrating VM ran
    /// on), recorded as image `image`. The manifest and its layers are
    /// fetched by content where this host lacks them, from its peers and
    /// origin or else from `source` (the sending host's peer URL); what
    /// `image` names here does not matter.
    pub fn create_disk_pinned(
        &self,
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
        let from_source = source
            .map(|url| {
                spore_transfer::Remote::new(url, crate::records::REMOTE_TIMEOUT, &self.links)
                    .map(|r| spore_transfer::Fetcher::new(vec![r]))
                    .map_err(|e| AgentError::Invalid(e.to_string()))
            })
            .transpose()?;
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
        &self,
        name: &str,
        image: &str,
        pinned: Option<ChunkId>,
        vm: Option<&str>,
    ) -> Result<DiskInfo> {
        check_name("disk", name)?;
        let _names = self.names.lock();
        let image_rec = match pinned {
            Some(manifest) => ImageRecord {
                manifest,
                created: now(),
                complete: false,
                profile: None,
                resolved_at: None,
                newer: None,
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
        let dir = self.dir(name);
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
        crate::failpoint::stall("commit-layer");
        let rec = ImageRecord {
            manifest: published.id,
            created: now(),
            complete: false,
            profile: None,
            resolved_at: None,
            newer: None,
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
        let _names = self.names.lock();
        let rec = self.disk_record(name)?;
        // A disk whose VM record is gone (a standby that died, a crash
        // between two records) belongs to nobody: it can go.
        let owner = rec.vm.as_ref().filter(|vm| {
            self.meta
                .get::<VmRecord>(Table::Vms, vm)
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
        let dir = self.dir(name);
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
