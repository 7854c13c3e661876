//! The image service: import, list, inspect, export, remove, push, pull,
//! resolve from the origin, boot profiles, background completion, garbage
//! collection.
//!
//! Owns: the `Images` table of the metadata store (name -> manifest,
//! policy, boot profile) and the chunks in `DATA/chunks/` that names and
//! disks reach. It is given narrow handles (the metadata store, the chunk
//! store, the export registry, the fetcher, the GC lock), never the
//! agent; the services above it (disks, VMs, templates, the surfaces) call
//! it.

mod fsck;

use std::collections::HashMap;
use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use spore_api::{
    ImageInfo, ImageSummary, ImportRequest, ImportResult, LayerInfo, PullResult, RemoveResult,
};
use spore_chunks::ChunkId;
use spore_image::image::reachable_chunks;
use spore_image::{Format, DEFAULT_BLOCK_SIZE};

use std::sync::Arc;

use parking_lot::RwLock;
use spore_chunks::ChunkStore;
use spore_transfer::Fetcher;

use crate::error::{check_name, AgentError, Result};
use crate::exports::{Registry, IMAGE_PREFIX};
use crate::meta::{Meta, Table};
use crate::records::{now, DiskRecord, ImageRecord, TemplateRecord};

/// Reports (phase, done, total) of a long operation.
pub type Progress<'a> = &'a (dyn Fn(&str, u64, u64) + Sync);

/// The longest pause between background completion's tries.
const COMPLETE_MAX_PAUSE: Duration = Duration::from_secs(60);

/// Background completions running, by image name.
type Completions = Arc<parking_lot::Mutex<HashMap<String, Completion>>>;

/// Where one image's background completion stands.
#[derive(Debug, Clone, Default)]
struct Completion {
    left: u64,
    waiting_for: Option<String>,
    retry_at: Option<std::time::Instant>,
    failures: u64,
}

/// The image service and the handles it works with.
#[derive(Debug)]
pub struct Images {
    meta: Arc<Meta>,
    store: Arc<ChunkStore>,
    exports: Arc<Registry>,
    /// Peers then origin, when any is configured.
    fetcher: Option<Arc<Fetcher>>,
    /// Held shared by operations that write chunks not yet referenced by
    /// any name (import, commit, capture, resolve), exclusively by garbage
    /// collection.
    gc_lock: Arc<RwLock<()>>,
    /// The origin's URL, where names not known here are looked up.
    origin: Option<String>,
    /// Complete every image found at the origin in the background.
    complete_images: bool,
    /// How long after an image's first use its boot profile is recorded.
    profile_seconds: u64,
    /// How other hosts are reached.
    links: spore_transfer::Links,
    /// How long a name found at the origin is used before it is looked up
    /// again.
    name_max_age: Duration,
    /// One mark per push in flight (see [`Images::push_image`]).
    pushes_dir: PathBuf,
    /// Background completions running.
    completing: Completions,
}

/// What the image service is configured with.
#[derive(Debug, Clone)]
pub struct ImagesConfig {
    pub origin: Option<String>,
    /// How other hosts (the origin, a push's destination) are reached.
    pub links: spore_transfer::Links,
    pub complete_images: bool,
    pub profile_seconds: u64,
    /// How long a name found at the origin is used before it is looked up
    /// again (`--name-max-age`).
    pub name_max_age: Duration,
    /// Where pushes in flight are marked (`DATA_DIR/pushing`).
    pub pushes_dir: PathBuf,
}

impl Images {
    pub fn new(
        meta: Arc<Meta>,
        store: Arc<ChunkStore>,
        exports: Arc<Registry>,
        fetcher: Option<Arc<Fetcher>>,
        gc_lock: Arc<RwLock<()>>,
        config: ImagesConfig,
    ) -> Self {
        Images {
            meta,
            store,
            exports,
            fetcher,
            gc_lock,
            origin: config.origin,
            complete_images: config.complete_images,
            profile_seconds: config.profile_seconds,
            links: config.links,
            name_max_age: config.name_max_age,
            pushes_dir: config.pushes_dir,
            completing: Completions::default(),
        }
    }

    /// Reports the pushes a killed agent left unfinished (their marks) and
    /// removes the marks. Nothing is undone here: the destination binds the
    /// name last, so it never got it; the chunks it did receive stay there
    /// and are not sent again by the next push.
    pub fn recover_pushes(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(&self.pushes_dir) else {
            return Vec::new();
        };
        let mut report = Vec::new();
        for e in entries.flatten() {
            let text = fs::read_to_string(e.path()).unwrap_or_default();
            let (name, to) = text.split_once('\n').unwrap_or((&text, "?"));
            report.push(format!(
                "image push {name} to {to} was cut short by the restart: the destination did \
                 not get the name (the chunks it received stay there); run `spore image push \
                 {name} --to {to}` again"
            ));
            let _ = fs::remove_file(e.path());
        }
        report.sort();
        report
    }

    /// Serves every recorded image name as an export (at start).
    pub fn bind_all(&self) -> Result<()> {
        for (name, rec) in self.meta.list::<ImageRecord>(Table::Images)? {
            self.exports.bind_image(&name, rec.manifest);
        }
        Ok(())
    }

    /// Resumes completing the images whose policy says so (at start).
    pub fn resume_completion(&self) -> Result<()> {
        for (name, rec) in self.meta.list::<ImageRecord>(Table::Images)? {
            if rec.complete {
                match self.exports.open_image(&rec.manifest) {
                    Ok(dev) => self.complete_in_background(&name, dev.image().flat.chunks()),
                    Err(e) => {
                        tracing::error!(image = %name, error = %AgentError::from(e).chain(), "image cannot be opened; not completed")
                    }
                }
            }
        }
        Ok(())
    }

    pub fn image_record(&self, name: &str) -> Result<ImageRecord> {
        self.meta
            .get(Table::Images, name)?
            .ok_or_else(|| AgentError::NotFound {
                kind: "image",
                name: name.into(),
            })
    }

    /// The image called `name`: known here, or else looked up at the
    /// origin, whose manifest and layers are fetched (data chunks come later,
    /// when they are read) and the name recorded here. A name found at the
    /// origin longer than `--name-max-age` ago is looked up again first
    /// (see [`Images::refresh_name`]).
    pub fn resolve_image(&self, name: &str) -> Result<ImageRecord> {
        if let Some(rec) = self.meta.get::<ImageRecord>(Table::Images, name)? {
            let stale = rec
                .resolved_at
                .is_some_and(|t| now().saturating_sub(t) >= self.name_max_age.as_secs());
            if stale {
                return self.refresh_name(name, rec);
            }
            return Ok(rec);
        }
        let (Some(origin), Some(_)) = (&self.origin, &self.fetcher) else {
            return Err(AgentError::NotFound {
                kind: "image",
                name: name.into(),
            });
        };
        check_name("image", name)?;
        let resolved = self
            .lookup_at_origin(name, true)
            .map_err(|e| {
                AgentError::State(format!("looking up image {name:?} at the origin: {e}"))
            })?
            .ok_or_else(|| AgentError::NotFound {
                kind: "image (here or at the origin)",
                name: name.into(),
            })?;
        let rec = self.adopt(name, resolved, None)?;
        tracing::info!(image = name, manifest = %rec.manifest, origin, "image found at the origin");
        Ok(rec)
    }

    /// Looks `name` up at the origin again: a different manifest there is
    /// fetched (manifest, layers, profile) and bound to the name here, for
    /// new disks and VMs; disks and VMs made before keep the manifest they
    /// were made from. When the origin cannot be asked, or no longer has
    /// the name, the version known here is kept (with a warning).
    pub fn refresh_name(&self, name: &str, rec: ImageRecord) -> Result<ImageRecord> {
        let looked_up = self.lookup_at_origin(name, true);
        let resolved = match looked_up {
            Ok(Some(r)) => r,
            Ok(None) => {
                tracing::warn!(
                    image = name,
                    "the origin no longer has this name; keeping the version known here"
                );
                return Ok(rec);
            }
            Err(e) => {
                tracing::warn!(image = name, error = %e, "cannot look the name up at the origin; keeping the version known here");
                return Ok(rec);
            }
        };
        if resolved.manifest == rec.manifest {
            let mut rec = rec;
            rec.resolved_at = Some(now());
            rec.newer = None;
            self.meta.put(Table::Images, name, &rec)?;
            return Ok(rec);
        }
        let old = rec.manifest;
        let bound_at = resolved.bound_at;
        let rec = self.adopt(name, resolved, Some(rec))?;
        tracing::info!(image = name, from = %old, to = %rec.manifest, bound_at, "the origin binds the name to a new version; new disks and VMs use it");
        Ok(rec)
    }

    /// What the origin binds `name` to (None: nothing), asked a few times
    /// before giving up; `popular`: with the chunks most asked for.
    fn lookup_at_origin(
        &self,
        name: &str,
        popular: bool,
    ) -> std::result::Result<Option<spore_transfer::Resolved>, String> {
        let Some(origin) = &self.origin else {
            return Err("no origin is configured".into());
        };
        let remote =
            spore_transfer::Remote::new(origin, crate::records::REMOTE_TIMEOUT, &self.links)
                .map_err(|e| e.to_string())?;
        // An origin that a storm of hosts asks at once may not accept in
        // time (or its answer is lost on a saturated link): ask again
        // before failing the VM or disk that needs the name.
        let mut looked_up = remote.resolve_image_with(name, popular);
        for pause in [Duration::from_millis(200), Duration::from_secs(1)] {
            let Err(e) = &looked_up else { break };
            tracing::info!(image = name, error = %e, "looking up the image at the origin failed; asking again");
            std::thread::sleep(pause);
            remote.forget_failure();
            looked_up = remote.resolve_image_with(name, popular);
        }
        looked_up.map_err(|e| e.to_string())
    }

    /// Fetches what the origin resolved `name` to (manifest and layers; the
    /// profile when it can be had), records the name here (replacing
    /// `replacing`, or new), binds its export and starts the prefetch.
    fn adopt(
        &self,
        name: &str,
        resolved: spore_transfer::Resolved,
        replacing: Option<ImageRecord>,
    ) -> Result<ImageRecord> {
        let fetcher = self
            .fetcher
            .as_ref()
            .ok_or_else(|| AgentError::State("no origin or peers are configured".into()))?;
        let spore_transfer::Resolved {
            manifest,
            profile,
            popular,
            ..
        } = resolved;
        let fetch = |ids: &[spore_chunks::ChunkId]| {
            fetcher
                .fetch(&self.store, ids)
                .map_err(|e| AgentError::State(format!("fetching image {name:?}: {e}")))
        };
        // Pinned until the name is in the metadata store: until then the
        // new chunks are reachable from nothing, and a garbage collection
        // would take them.
        let pin = self.gc_lock.read();
        fetch(&[manifest])?;
        let layers = spore_image::image::load_manifest(&self.store, &manifest)?.layers;
        fetch(&layers)?;
        // A profile that cannot be had is no reason to fail: the image
        // still works, only without prefetch.
        let profile = profile.filter(|p| match fetcher.fetch(&self.store, &[*p]) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(image = name, error = %e, "boot profile unavailable; no prefetch");
                false
            }
        });
        self.store.sync()?;
        let rec = ImageRecord {
            manifest,
            created: now(),
            complete: replacing
                .as_ref()
                .map_or(self.complete_images, |r| r.complete),
            profile,
            resolved_at: Some(now()),
            newer: None,
        };
        match &replacing {
            None => {
                if !self.meta.insert_new(Table::Images, name, &rec)? {
                    return self.image_record(name);
                }
            }
            Some(_) => self.meta.put(Table::Images, name, &rec)?,
        }
        self.exports.bind_image(name, manifest);
        drop(pin);
        // Prefetch the boot's working set in the order the boot will read
        // it, then what the origin's other readers read most (access
        // frequency), then (with the complete policy) the rest.
        let dev = self.exports.open_image(&manifest)?;
        let mut ordered = match profile {
            Some(p) => {
                dev.follow_profile(self.profile_blocks(&p)?);
                self.profile_chunks(&p, &dev)?
            }
            None => Vec::new(),
        };
        let in_image: HashSet<&ChunkId> = dev.image().flat.chunks().iter().collect();
        let mut queued: HashSet<ChunkId> = ordered.iter().copied().collect();
        ordered.extend(
            popular
                .into_iter()
                .filter(|id| in_image.contains(id) && queued.insert(*id)),
        );
        if rec.complete {
            ordered.extend_from_slice(dev.image().flat.chunks());
        }
        if !ordered.is_empty() {
            self.complete_in_background(name, &ordered);
        }
        Ok(rec)
    }

    /// Checks every name found at the origin, every `--name-max-age`, for
    /// a newer version there (recorded as `newer`, shown by `image ls`;
    /// taken by `image pull` or the next disk or VM made from the name).
    /// Runs for the agent's life.
    pub fn watch_names(self: &Arc<Self>) {
        if self.origin.is_none() {
            return;
        }
        let weak = Arc::downgrade(self);
        let every = self.name_max_age.max(Duration::from_secs(10));
        let spawned = std::thread::Builder::new()
            .name("names".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                let Some(images) = weak.upgrade() else { return };
                images.check_names();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the name check");
        }
    }

    fn check_names(&self) {
        let Ok(records) = self.meta.list::<ImageRecord>(Table::Images) else {
            return;
        };
        for (name, rec) in records.into_iter().filter(|(_, r)| r.resolved_at.is_some()) {
            let newer = match self.lookup_at_origin(&name, false) {
                Ok(Some(r)) if r.manifest != rec.manifest => Some(r.manifest),
                Ok(_) => None,
                Err(e) => {
                    tracing::debug!(image = %name, error = %e, "name check failed");
                    continue;
                }
            };
            if newer != rec.newer {
                // Written only if the record is still the one looked at.
                if let Ok(Some(mut now_rec)) = self.meta.get::<ImageRecord>(Table::Images, &name) {
                    if now_rec.manifest == rec.manifest {
                        now_rec.newer = newer;
                        let _ = self.meta.put(Table::Images, &name, &now_rec);
                    }
                }
                if let Some(m) = newer {
                    tracing::info!(image = %name, newer = %m, "the origin has a newer version of this image (`spore image pull` takes it)");
                }
            }
        }
    }

    /// The blocks a profile lists, in first-read order.
    pub(crate) fn profile_blocks(&self, profile: &ChunkId) -> Result<Vec<u32>> {
        let bytes = self.store.get(profile)?;
        let p = spore_image::Profile::decode(&bytes)
            .map_err(|e| AgentError::State(format!("boot profile {profile}: {e}")))?;
        Ok(p.blocks)
    }

    /// The chunks a profile names, in profile order, without repeats.
    fn profile_chunks(
        &self,
        profile: &ChunkId,
        dev: &spore_blockdev::ImageDevice,
    ) -> Result<Vec<ChunkId>> {
        let mut seen = std::collections::HashSet::new();
        Ok(self
            .profile_blocks(profile)?
            .into_iter()
            .filter_map(|b| dev.image().flat.get(b as u64))
            .filter(|id| seen.insert(**id))
            .copied()
            .collect())
    }

    /// Fetches every chunk of the image that is not here yet and records
    /// the policy to keep it complete. `background`: return at once.
    pub fn pull_image(
        &self,
        name: &str,
        background: bool,
        progress: Progress<'_>,
    ) -> Result<PullResult> {
        // A pull takes the version the origin binds the name to now.
        let mut rec = match self.meta.get::<ImageRecord>(Table::Images, name)? {
            Some(rec) if rec.resolved_at.is_some() => self.refresh_name(name, rec)?,
            _ => self.resolve_image(name)?,
        };
        let dev = self.exports.open_image(&rec.manifest)?;
        let chunks = dev.image().flat.chunks();
        let missing: Vec<ChunkId> = chunks
            .iter()
            .filter(|id| !self.store.present(id))
            .copied()
            .collect();
        let result = PullResult {
            image: name.into(),
            chunks: chunks.len() as u64,
            missing: missing.len() as u64,
            background,
        };
        if missing.is_empty() {
            return Ok(result);
        }
        let fetcher = self.fetcher.as_ref().ok_or_else(|| {
            AgentError::State(format!(
                "{} chunks of {name} are missing and no origin or peers are configured",
                missing.len()
            ))
        })?;
        if !rec.complete {
            rec.complete = true;
            self.meta.put(Table::Images, name, &rec)?;
        }
        if background {
            self.complete_in_background(name, chunks);
            return Ok(result);
        }
        self.fetch_missing(name, fetcher, &missing, "pull", progress)?;
        Ok(result)
    }

    /// Fetches `missing` chunks of image `name` in the foreground, durably.
    fn fetch_missing(
        &self,
        name: &str,
        fetcher: &spore_transfer::Fetcher,
        missing: &[ChunkId],
        phase: &str,
        progress: Progress<'_>,
    ) -> Result<()> {
        fetcher
            .fetch_background(&self.store, missing, &|d, t| {
                if d > 0 && phase == "pull" {
                    crate::failpoint::stall("pull-fetching");
                }
                progress(phase, d, t)
            })
            .map_err(|e| AgentError::State(format!("fetching the rest of image {name}: {e}")))?;
        self.store.sync()?;
        Ok(())
    }

    /// Makes every chunk of an image local before it is read whole (export,
    /// push), fetching what a host that ran it on demand does not have.
    fn make_local(
        &self,
        name: &str,
        dev: &spore_blockdev::ImageDevice,
        progress: Progress<'_>,
    ) -> Result<()> {
        let missing: Vec<ChunkId> = dev
            .image()
            .flat
            .chunks()
            .iter()
            .filter(|id| !self.store.contains(id))
            .copied()
            .collect();
        match (&self.fetcher, missing.is_empty()) {
            (_, true) => Ok(()),
            (Some(f), false) => self.fetch_missing(name, f, &missing, "fetch", progress),
            (None, false) => Err(AgentError::State(format!(
                "{} chunks of {name} are missing and no origin or peers are configured",
                missing.len()
            ))),
        }
    }

    /// Sends an image's chunks that the remote lacks, then binds the name
    /// there (over a name bound to other content only with `force`).
    pub fn push_image(
        &self,
        name: &str,
        to: &str,
        force: bool,
        progress: Progress<'_>,
    ) -> Result<spore_api::PushResult> {
        let rec = self.image_record(name)?;
        let dev = self.exports.open_image(&rec.manifest)?;
        self.make_local(name, &dev, progress)?;
        // A mark while the push lasts, so that the next agent can say that
        // a kill cut it short.
        static PUSHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = PUSHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mark = self.pushes_dir.join(format!("{name}.{n}"));
        fs::create_dir_all(&self.pushes_dir)
            .and_then(|()| fs::write(&mark, format!("{name}\n{to}")))
            .map_err(AgentError::io(format!("writing {}", mark.display())))?;
        struct Unmark(PathBuf);
        impl Drop for Unmark {
            fn drop(&mut self) {
                let _ = fs::remove_file(&self.0);
            }
        }
        let _unmark = Unmark(mark);
        let remote =
            spore_transfer::Remote::new(to, std::time::Duration::from_secs(60), &self.links)
                .map_err(|e| AgentError::Invalid(e.to_string()))?;
        let push_err = |e: spore_transfer::RemoteError| AgentError::State(format!("pushing: {e}"));
        let mut ids: Vec<spore_chunks::ChunkId> = reachable_chunks(&self.store, [&rec.manifest])?
            .into_iter()
            .collect();
        ids.extend(rec.profile);
        ids.sort();
        let total = ids.len() as u64;
        let (mut sent, mut bytes) = (0u64, 0u64);
        for (n, batch) in ids.chunks(spore_transfer::wire::MAX_BATCH).enumerate() {
            for id in remote.missing(batch).map_err(push_err)? {
                let raw = self
                    .store
                    .get_raw(&id)?
                    .ok_or(spore_chunks::Error::NotFound(id))?;
                remote.put_chunk(&id, &raw).map_err(push_err)?;
                sent += 1;
                bytes += raw.len() as u64;
            }
            crate::failpoint::stall("push-sending");
            progress(
                "push",
                ((n + 1) * spore_transfer::wire::MAX_BATCH).min(ids.len()) as u64,
                total,
            );
        }
        remote
            .put_image(name, &rec.manifest, rec.profile.as_ref(), force)
            .map_err(push_err)?;
        Ok(spore_api::PushResult {
            image: name.into(),
            to: to.into(),
            chunks: total,
            sent_chunks: sent,
            sent_bytes: bytes,
        })
    }

    pub fn image_summary(&self, name: &str, rec: &ImageRecord) -> Result<ImageSummary> {
        let m = spore_image::image::load_manifest(&self.store, &rec.manifest)?;
        Ok(ImageSummary {
            name: name.to_owned(),
            manifest: rec.manifest.to_hex(),
            virtual_size: m.virtual_size,
            block_size: m.block_size,
            layers: m.layers.len(),
            created: rec.created,
            source: m.source,
            newer_at_origin: rec.newer.map(|m| m.to_hex()),
        })
    }

    pub fn import_image(
        &self,
        req: &ImportRequest,
        progress: Progress<'_>,
    ) -> Result<ImportResult> {
        check_name("image", &req.name)?;
        if !req.path.is_absolute() {
            return Err(AgentError::Invalid(format!(
                "import path {} must be absolute",
                req.path.display()
            )));
        }
        if self
            .meta
            .get::<ImageRecord>(Table::Images, &req.name)?
            .is_some()
        {
            return Err(AgentError::Exists {
                kind: "image",
                name: req.name.clone(),
            });
        }
        let parent = match &req.parent {
            Some(p) => Some(self.exports.open_image(&self.image_record(p)?.manifest)?),
            None => None,
        };
        let block_size = req
            .block_size
            .or(parent.as_ref().map(|p| p.image().manifest.block_size))
            .unwrap_or(DEFAULT_BLOCK_SIZE);
        let source = spore_image::source::open(&req.path)?;
        let started = Instant::now();
        // Pinned until the name is in the metadata store: until then the
        // new chunks are reachable from nothing, and a garbage collection
        // would take them.
        let pin = self.gc_lock.read();
        let published = {
            let name = req
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            spore_image::import(
                &self.store,
                &*source,
                &name,
                block_size,
                parent.as_ref().map(|p| p.image()),
                &|done, total| progress("import", done, total),
            )?
        };
        let rec = ImageRecord {
            manifest: published.id,
            created: now(),
            complete: false,
            profile: None,
            resolved_at: None,
            newer: None,
        };
        if !self.meta.insert_new(Table::Images, &req.name, &rec)? {
            return Err(AgentError::Exists {
                kind: "image",
                name: req.name.clone(),
            });
        }
        self.exports.bind_image(&req.name, published.id);
        drop(pin);
        tracing::info!(image = %req.name, manifest = %published.id, "imported");
        Ok(ImportResult {
            image: self.image_summary(&req.name, &rec)?,
            format: source.format().to_string(),
            changed_blocks: published.stats.changed_blocks,
            new_chunks: published.stats.new_chunks,
            new_bytes: published.stats.new_bytes,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    pub fn list_images(&self) -> Result<Vec<ImageSummary>> {
        self.meta
            .list::<ImageRecord>(Table::Images)?
            .iter()
            .map(|(name, rec)| self.image_summary(name, rec))
            .collect()
    }

    pub fn inspect_image(&self, name: &str, with_profile: bool) -> Result<ImageInfo> {
        let rec = self.image_record(name)?;
        let summary = self.image_summary(name, &rec)?;
        let dev = self.exports.open_image(&rec.manifest)?;
        let image = dev.image();
        let mut layer_list = Vec::new();
        for id in &image.manifest.layers {
            let layer = spore_image::image::load_layer(&self.store, id)?;
            layer_list.push(LayerInfo {
                id: id.to_hex(),
                blocks: layer.len() as u64,
                chunks: layer.chunks().len() as u64,
            });
        }
        let mine = reachable_chunks(&self.store, [&rec.manifest])?;
        // Chunks of every other image and disk, to tell what is shared.
        let mut other_manifests = self.live_manifests()?;
        other_manifests.remove(&rec.manifest);
        let others = reachable_chunks(&self.store, &other_manifests)?;
        let (mut stored, mut shared) = (0, 0);
        for id in &mine {
            let len = self.store.stored_len(id).unwrap_or(0);
            stored += len;
            if others.contains(id) {
                shared += len;
            }
        }
        let (mut local_chunks, mut local_bytes) = (0, 0);
        for id in image.flat.chunks() {
            if let Some(len) = self.store.stored_len(id) {
                local_chunks += 1;
                local_bytes += len;
            }
        }
        let used_by = self
            .meta
            .list::<DiskRecord>(Table::Disks)?
            .into_iter()
            .filter(|(_, d)| d.image == name)
            .map(|(n, _)| n)
            .collect();
        let profile = match &rec.profile {
            Some(p) => Some((
                self.profile_chunks(p, &dev)?,
                self.profile_blocks(p)?.into_iter().map(u64::from).collect(),
            )),
            None => None,
        };
        Ok(ImageInfo {
            summary,
            layer_list,
            chunks: image.flat.chunks().len() as u64,
            data_blocks: image.flat.data_blocks(),
            stored_bytes: stored,
            shared_bytes: shared,
            map_bytes: image.flat.memory_bytes() as u64,
            local_chunks,
            local_bytes,
            profile_blocks: profile.as_ref().map(|(ids, _)| ids.len() as u64),
            profile_bytes: profile
                .as_ref()
                .map(|(ids, _)| ids.iter().filter_map(|id| self.store.stored_len(id)).sum()),
            profile_order: match (with_profile, profile) {
                (true, Some((_, blocks))) => blocks,
                _ => Vec::new(),
            },
            used_by,
            export: format!("{IMAGE_PREFIX}{name}"),
            completing: self
                .completions()
                .into_iter()
                .find(|(n, _)| n == name)
                .map(|(_, c)| c),
        })
    }

    pub fn export_image(
        &self,
        name: &str,
        path: &Path,
        format: &str,
        progress: Progress<'_>,
    ) -> Result<ImageSummary> {
        let format: Format = format.parse().map_err(AgentError::Invalid)?;
        if !path.is_absolute() {
            return Err(AgentError::Invalid(format!(
                "export path {} must be absolute",
                path.display()
            )));
        }
        let rec = self.image_record(name)?;
        let dev = self.exports.open_image(&rec.manifest)?;
        self.make_local(name, &dev, progress)?;
        spore_image::export(&self.store, dev.image(), path, format, &|d, t| {
            progress("export", d, t)
        })?;
        self.image_summary(name, &rec)
    }

    pub fn remove_image(&self, name: &str) -> Result<RemoveResult> {
        let rec = self.image_record(name)?;
        if let Some(t) = self.template_owning(name)? {
            return Err(AgentError::InUse {
                kind: "image",
                name: name.into(),
                by: format!("template {t} (spore template rm {t})"),
            });
        }
        let users: Vec<String> = self
            .meta
            .list::<DiskRecord>(Table::Disks)?
            .into_iter()
            .filter(|(_, d)| d.image == name)
            .map(|(n, d)| match d.vm {
                Some(vm) => format!("vm {vm}"),
                None => format!("disk {n}"),
            })
            .collect();
        if !users.is_empty() {
            return Err(AgentError::InUse {
                kind: "image",
                name: name.into(),
                by: users.join(", "),
            });
        }
        self.meta.remove(Table::Images, name)?;
        self.exports.unbind_image(name);
        let (freed_chunks, freed_bytes) = self.release_manifest(&rec.manifest)?;
        Ok(RemoveResult {
            removed: name.into(),
            freed_chunks,
            freed_bytes,
        })
    }

    /// Names bound to each manifest (for listings that show relations).
    pub fn image_names_by_manifest(&self) -> Result<HashMap<ChunkId, Vec<String>>> {
        let mut out: HashMap<ChunkId, Vec<String>> = HashMap::new();
        for (name, rec) in self.meta.list::<ImageRecord>(Table::Images)? {
            out.entry(rec.manifest).or_default().push(name);
        }
        Ok(out)
    }

    /// The template that owns an image (its RAM, disk or bundle), unless
    /// that template is being removed.
    fn template_owning(&self, image: &str) -> Result<Option<String>> {
        Ok(self
            .meta
            .list::<TemplateRecord>(Table::Templates)?
            .into_iter()
            .find(|(_, t)| {
                !t.removing
                    && (t.ram_image == image || t.disk_image == image || t.boot_image == image)
            })
            .map(|(n, _)| n))
    }

    /// Fetches the chunks of `chunks` that are not here, at low priority,
    /// on a thread of its own, until every one is here: a failed round is
    /// tried again after a pause that grows to [`COMPLETE_MAX_PAUSE`], for
    /// as long as the image exists. `image inspect` and the metrics show
    /// how far it is and what it waits for.
    pub fn complete_in_background(&self, name: &str, chunks: &[ChunkId]) {
        let missing: Vec<ChunkId> = chunks
            .iter()
            .filter(|id| !self.store.contains(id))
            .copied()
            .collect();
        let Some(fetcher) = self.fetcher.clone() else {
            return;
        };
        if missing.is_empty() {
            return;
        }
        {
            let mut running = self.completing.lock();
            if running.contains_key(name) {
                return; // already under way
            }
            running.insert(
                name.to_owned(),
                Completion {
                    left: missing.len() as u64,
                    ..Completion::default()
                },
            );
        }
        let store = self.store.clone();
        let meta = self.meta.clone();
        let completing = self.completing.clone();
        let name = name.to_owned();
        tracing::info!(image = %name, chunks = missing.len(), "completing image in the background");
        let thread_name = name.clone();
        let spawned = std::thread::Builder::new().name(format!("complete-{name}")).spawn(move || {
            let mut pause = Duration::from_secs(1);
            let mut missing = missing;
            let update = |f: &mut dyn FnMut(&mut Completion)| {
                if let Some(c) = completing.lock().get_mut(&thread_name) {
                    f(c);
                }
            };
            loop {
                let result = fetcher
                    .fetch_background(&store, &missing, &|done, total| {
                        update(&mut |c| c.left = total - done);
                    })
                    .and_then(|()| Ok(store.sync()?));
                let e = match result {
                    Ok(()) => {
                        tracing::info!(image = %thread_name, "image complete: every chunk is local");
                        break;
                    }
                    Err(e) => e,
                };
                missing.retain(|id| !store.contains(id));
                // Removed meanwhile: nothing left to complete.
                if !matches!(meta.get::<ImageRecord>(Table::Images, &thread_name), Ok(Some(_))) {
                    tracing::info!(image = %thread_name, "image removed; its completion stops");
                    break;
                }
                tracing::warn!(image = %thread_name, error = %e, left = missing.len(), retry_in = ?pause, "completing image: a fetch failed; trying again");
                let why = e.to_string();
                update(&mut |c| {
                    c.left = missing.len() as u64;
                    c.waiting_for = Some(why.clone());
                    c.retry_at = Some(std::time::Instant::now() + pause);
                    c.failures += 1;
                });
                std::thread::sleep(pause);
                update(&mut |c| c.retry_at = None);
                pause = (pause * 2).min(COMPLETE_MAX_PAUSE);
            }
            completing.lock().remove(&thread_name);
        });
        if let Err(e) = spawned {
            self.completing.lock().remove(&name);
            tracing::warn!(error = %e, "cannot start background completion");
        }
    }

    /// Background completions under way: image, chunks left, and what
    /// each waits for (for the metrics).
    pub fn completions(&self) -> Vec<(String, spore_api::CompletionInfo)> {
        let now = std::time::Instant::now();
        self.completing
            .lock()
            .iter()
            .map(|(name, c)| {
                (
                    name.clone(),
                    spore_api::CompletionInfo {
                        chunks_left: c.left,
                        waiting_for: c.waiting_for.clone(),
                        retry_in_s: c
                            .retry_at
                            .map(|t| t.saturating_duration_since(now).as_secs_f64()),
                        failures: c.failures,
                    },
                )
            })
            .collect()
    }

    /// On an image's first use here, records which blocks the boot reads,
    /// in order, for `profile_seconds`, then stores the profile and binds
    /// it to the image (unless it has one by then). An image that has a
    /// profile already reads ahead along it instead.
    pub fn record_profile(
        self: &Arc<Self>,
        name: &str,
        rec: &ImageRecord,
        dev: &Arc<spore_blockdev::ImageDevice>,
    ) {
        if let Some(p) = &rec.profile {
            match self.profile_blocks(p) {
                Ok(blocks) => dev.follow_profile(blocks),
                Err(e) => tracing::warn!(image = name, error = %e, "boot profile unreadable"),
            }
            return;
        }
        let Some(profiler) = dev.start_profile() else {
            return;
        };
        let agent = self.clone();
        let (name, manifest) = (name.to_owned(), rec.manifest);
        let block_size = dev.image().manifest.block_size;
        tracing::info!(image = %name, seconds = self.profile_seconds, "recording the boot profile");
        let spawned = std::thread::Builder::new().name(format!("profile-{name}")).spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(agent.profile_seconds));
            let blocks = profiler.finish();
            if blocks.is_empty() {
                return;
            }
            let result = (|| -> Result<()> {
                let _shared = agent.gc_lock.read();
                let count = blocks.len();
                let put = agent.store.put(&spore_image::Profile { block_size, blocks }.encode())?;
                agent.store.sync()?;
                let mut rec: ImageRecord = match agent.meta.get(Table::Images, &name)? {
                    Some(r) => r,
                    None => return Ok(()),
                };
                if rec.manifest == manifest && rec.profile.is_none() {
                    rec.profile = Some(put.id);
                    agent.meta.put(Table::Images, &name, &rec)?;
                    tracing::info!(image = %name, blocks = count, "boot profile recorded");
                }
                Ok(())
            })();
            if let Err(e) = result {
                tracing::warn!(image = %name, error = %e.chain(), "saving the boot profile failed");
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start profile recording");
        }
    }

    /// Every manifest some name or disk still needs.
    pub fn live_manifests(&self) -> Result<HashSet<ChunkId>> {
        let mut keep: HashSet<ChunkId> = self
            .meta
            .list::<ImageRecord>(Table::Images)?
            .into_iter()
            .map(|(_, r)| r.manifest)
            .collect();
        keep.extend(
            self.meta
                .list::<DiskRecord>(Table::Disks)?
                .into_iter()
                .map(|(_, r)| r.manifest),
        );
        Ok(keep)
    }

    /// Collects garbage after `manifest` lost a reference, unless another
    /// name or disk still holds it (then nothing can have become garbage).
    pub fn release_manifest(&self, manifest: &ChunkId) -> Result<(u64, u64)> {
        if self.live_manifests()?.contains(manifest) {
            return Ok((0, 0));
        }
        self.collect_garbage()
    }

    /// Deletes chunks that no image or disk refers to; returns (chunks, bytes).
    pub fn collect_garbage(&self) -> Result<(u64, u64)> {
        let _exclusive = self.gc_lock.write();
        let manifests = self.live_manifests()?;
        let mut live = spore_image::image::reachable_chunks(&self.store, &manifests)?;
        live.extend(
            self.meta
                .list::<ImageRecord>(Table::Images)?
                .into_iter()
                .filter_map(|(_, r)| r.profile),
        );
        let (mut chunks, mut bytes) = (0, 0);
        for id in self.store.list()? {
            if !live.contains(&id) {
                bytes += self.store.stored_len(&id).unwrap_or(0);
                self.store.remove(&id)?;
                chunks += 1;
                if chunks == 1 {
                    crate::failpoint::stall("gc-sweeping");
                }
            }
        }
        self.exports.retain_images(&manifests);
        if chunks > 0 {
            tracing::info!(chunks, bytes, "garbage collected");
        }
        Ok((chunks, bytes))
    }
}
