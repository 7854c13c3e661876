//! `spore fsck`: the chunk store checked against the metadata, and
//! repaired from the origin or peers.
//!
//! 1. Every chunk file is read and hashed ([`ChunkStore::get`]); one whose
//!    bytes do not hash to its id is moved aside (`chunks/corrupt/`), so
//!    that it counts as missing from then on and a fetch can replace it.
//! 2. Every reference is followed: templates to their image names (RAM,
//!    disk, bundle), image names and disks to their manifests, manifests
//!    to layers, layers to data chunks, images to their boot profiles. A needed chunk that is not here is a problem, except
//!    data chunks of an image read on demand (an origin or peers are
//!    configured and the image was not pulled whole): those are counted as
//!    not fetched yet.
//! 3. With `--repair`, the problems are fetched from the peers and the
//!    origin (the fetcher verifies each chunk's hash), and the walk runs
//!    again, since a manifest or layer that came back names chunks not seen
//!    before.
//! 4. Chunks nothing refers to are counted under the garbage collector's
//!    lock (so that an import in flight is not taken for a leak), and with
//!    `--repair` dropped, but only when every reference could be followed:
//!    a chunk behind a missing manifest must not be taken for garbage.
//!
//! The disks' overlays are not checked here: an overlay checks its own log
//! and bitmap each time it is opened (docs/formats.md).

use std::collections::{BTreeMap, HashSet};

use spore_api::{FsckProblem, FsckReport};
use spore_chunks::ChunkId;

use super::{Images, Progress};
use crate::error::Result;
use crate::meta::Table;
use crate::records::{DiskRecord, ImageRecord, TemplateRecord};

/// Walks after a repair, at most: manifests, then layers, then data.
const ROUNDS: usize = 4;
/// Progress is reported every this many chunks.
const REPORT_EVERY: usize = 256;

/// A chunk needed and not here.
#[derive(Debug, Default)]
struct Need {
    kind: &'static str,
    by: Vec<String>,
}

/// What one walk of the references found.
#[derive(Debug, Default)]
struct Walk {
    /// Every chunk something refers to (here or not).
    referenced: HashSet<ChunkId>,
    needs: BTreeMap<ChunkId, Need>,
    not_fetched: u64,
    /// A manifest or layer was missing: its chunks are not all known.
    incomplete: bool,
}

impl Walk {
    fn need(&mut self, id: ChunkId, kind: &'static str, by: &str) {
        let n = self.needs.entry(id).or_default();
        n.kind = kind;
        if !n.by.iter().any(|b| b == by) {
            n.by.push(by.to_owned());
        }
    }
}

impl Images {
    /// Checks (and with `repair`, repairs) the chunk store against the
    /// metadata; `progress` hears of each phase.
    pub fn fsck(&self, repair: bool, progress: Progress<'_>) -> Result<FsckReport> {
        let mut report = FsckReport::default();
        let corrupt = self.check_chunks(&mut report, progress)?;
        let mut walk = self.walk(progress)?;
        let mut outcome: BTreeMap<ChunkId, String> = BTreeMap::new();
        let mut found: BTreeMap<ChunkId, FsckProblem> = BTreeMap::new();
        for round in 0..ROUNDS {
            for (id, n) in &walk.needs {
                found.entry(*id).or_insert_with(|| FsckProblem {
                    chunk: id.to_hex(),
                    kind: n.kind.into(),
                    problem: if corrupt.contains(id) {
                        "corrupt"
                    } else {
                        "missing"
                    }
                    .into(),
                    needed_by: n.by.clone(),
                    repair: None,
                });
            }
            if !repair || walk.needs.is_empty() || round + 1 == ROUNDS {
                break;
            }
            let ids: Vec<ChunkId> = walk.needs.keys().copied().collect();
            let fetched = self.fetch_each(&ids, progress, &mut outcome);
            report.fetched += fetched;
            if fetched == 0 {
                break;
            }
            walk = self.walk(progress)?;
        }
        report.not_fetched = walk.not_fetched;
        report.dangling = self.dangling_names()?;
        report.missing = found.len() as u64;
        report.unrepaired = walk.needs.len() as u64;
        report.problems = found
            .into_iter()
            .map(|(id, mut p)| {
                if repair {
                    p.repair = Some(outcome.remove(&id).unwrap_or_else(|| {
                        "not attempted (found in the last round): run the repair again".into()
                    }));
                }
                p
            })
            .collect();
        self.leaks(&walk, repair, &mut report)?;
        report.clean = report.unrepaired == 0
            && report.dangling.is_empty()
            && report.leaked_chunks == report.dropped
            && (repair || report.corrupt == 0);
        tracing::info!(
            chunks = report.chunks_checked,
            corrupt = report.corrupt,
            missing = report.missing,
            unrepaired = report.unrepaired,
            leaked = report.leaked_chunks,
            fetched = report.fetched,
            dropped = report.dropped,
            "fsck"
        );
        Ok(report)
    }

    /// Template images that are not here (a template found at the origin
    /// is resolved when used, and not checked).
    fn dangling_names(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for (name, t) in self.meta.list::<TemplateRecord>(Table::Templates)? {
            if t.remote || t.removing {
                continue;
            }
            for (what, image) in [
                ("RAM image", &t.ram_image),
                ("disk image", &t.disk_image),
                ("bundle image", &t.boot_image),
            ] {
                if !image.is_empty()
                    && self
                        .meta
                        .get::<ImageRecord>(Table::Images, image)?
                        .is_none()
                {
                    out.push(format!("template {name}: its {what} {image} is not here"));
                }
            }
        }
        Ok(out)
    }

    /// Reads and hashes every chunk file; returns those found corrupt
    /// (moved aside by the store).
    fn check_chunks(
        &self,
        report: &mut FsckReport,
        progress: Progress<'_>,
    ) -> Result<HashSet<ChunkId>> {
        let ids = self.store.list()?;
        let total = ids.len() as u64;
        let mut corrupt = HashSet::new();
        for (i, id) in ids.iter().enumerate() {
            match self.store.get(id) {
                Ok(data) => report.bytes_checked += data.len() as u64,
                Err(spore_chunks::Error::Corrupt { why, .. }) => {
                    tracing::warn!(chunk = %id, why, "fsck: corrupt chunk");
                    corrupt.insert(*id);
                }
                // Collected meanwhile.
                Err(spore_chunks::Error::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            }
            report.chunks_checked += 1;
            if i % REPORT_EVERY == 0 {
                progress("check", i as u64, total);
            }
        }
        progress("check", total, total);
        report.corrupt = corrupt.len() as u64;
        Ok(corrupt)
    }

    /// Follows every reference from the names and disks.
    fn walk(&self, progress: Progress<'_>) -> Result<Walk> {
        let images = self.meta.list::<ImageRecord>(Table::Images)?;
        let disks = self.meta.list::<DiskRecord>(Table::Disks)?;
        // Without a source, or pulled whole, an image's every chunk must
        // be here; otherwise its data comes on demand.
        let complete: HashSet<ChunkId> = images
            .iter()
            .filter(|(_, r)| r.complete || self.fetcher.is_none())
            .map(|(_, r)| r.manifest)
            .collect();
        let roots = images
            .iter()
            .map(|(n, r)| (format!("image {n}"), r.manifest, r.profile))
            .chain(
                disks
                    .iter()
                    .map(|(n, r)| (format!("disk {n}"), r.manifest, None)),
            );
        let mut walk = Walk::default();
        let total = (images.len() + disks.len()) as u64;
        let mut seen_layers = HashSet::new();
        for (i, (by, manifest, profile)) in roots.enumerate() {
            progress("references", i as u64, total);
            if let Some(p) = profile {
                walk.referenced.insert(p);
                if !self.store.present(&p) {
                    walk.need(p, "profile", &by);
                }
            }
            walk.referenced.insert(manifest);
            let m = match spore_image::image::load_manifest(&self.store, &manifest) {
                Ok(m) => m,
                Err(_) => {
                    walk.need(manifest, "manifest", &by);
                    walk.incomplete = true;
                    continue;
                }
            };
            let strict = complete.contains(&manifest);
            for layer in m.layers {
                walk.referenced.insert(layer);
                let l = match spore_image::image::load_layer(&self.store, &layer) {
                    Ok(l) => l,
                    Err(_) => {
                        walk.need(layer, "layer", &by);
                        walk.incomplete = true;
                        continue;
                    }
                };
                let first = seen_layers.insert((layer, strict));
                for c in l.chunks() {
                    walk.referenced.insert(*c);
                    if self.store.present(c) {
                        continue;
                    }
                    if strict {
                        walk.need(*c, "data", &by);
                    } else if first {
                        walk.not_fetched += 1;
                    }
                }
            }
        }
        progress("references", total, total);
        Ok(walk)
    }

    /// Fetches `ids` from the peers and the origin, noting each outcome;
    /// returns how many came.
    fn fetch_each(
        &self,
        ids: &[ChunkId],
        progress: Progress<'_>,
        outcome: &mut BTreeMap<ChunkId, String>,
    ) -> u64 {
        let Some(fetcher) = &self.fetcher else {
            for id in ids {
                outcome.insert(
                    *id,
                    "not fetched: no origin or peers are configured (--origin, --peer)".into(),
                );
            }
            return 0;
        };
        let _shared = self.gc_lock.read();
        // One batch first; chunk by chunk if it fails, to tell which.
        let batch = fetcher
            .fetch_background(&self.store, ids, &|d, t| progress("repair", d, t))
            .is_ok();
        let mut fetched = 0;
        for (i, id) in ids.iter().enumerate() {
            let result = if batch {
                Ok(())
            } else {
                progress("repair", i as u64, ids.len() as u64);
                fetcher
                    .fetch(&self.store, &[*id])
                    .map_err(|e| e.to_string())
            };
            match result.and_then(|()| {
                self.store
                    .present(id)
                    .then_some(())
                    .ok_or_else(|| "the fetch brought nothing".to_owned())
            }) {
                Ok(()) => {
                    fetched += 1;
                    outcome.insert(*id, "fetched".into());
                }
                Err(e) => {
                    outcome.insert(*id, format!("not fetched: {e}"));
                }
            }
        }
        if let Err(e) = self.store.sync() {
            tracing::warn!(error = %e, "fsck: syncing the repaired chunks");
        }
        fetched
    }

    /// Counts the chunks nothing refers to, under the collector's lock, and
    /// with `repair` drops them when every reference could be followed.
    fn leaks(&self, walk: &Walk, repair: bool, report: &mut FsckReport) -> Result<()> {
        let _exclusive = self.gc_lock.write();
        // What names and disks refer to now (an import may have finished
        // since the walk): only chunks unknown to both walks are leaks.
        let now = self.walk(&|_, _, _| {})?;
        for id in self.store.list()? {
            if walk.referenced.contains(&id) || now.referenced.contains(&id) {
                continue;
            }
            report.leaked_chunks += 1;
            let bytes = self.store.stored_len(&id).unwrap_or(0);
            report.leaked_bytes += bytes;
            if repair && !walk.incomplete && !now.incomplete {
                self.store.remove(&id)?;
                report.dropped += 1;
            }
        }
        if report.dropped > 0 {
            tracing::info!(chunks = report.dropped, "fsck: leaked chunks dropped");
        }
        Ok(())
    }
}
