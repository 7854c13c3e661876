//! The agent's NBD exports: images (read-only) as `image/NAME`, disks
//! (read-write) as `disk/NAME`.
//!
//! Image devices are opened on first use and shared by manifest id, so
//! every disk over one image, and every connection to it, reads through one
//! flat map and one cache.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use spore_blockdev::{ChunkCache, Disk, ImageDevice};
use spore_chunks::{ChunkId, ChunkStore};
use spore_image::Image;
use spore_nbd::{Export, Exports};
use spore_transfer::Fetcher;

pub const IMAGE_PREFIX: &str = "image/";
pub const DISK_PREFIX: &str = "disk/";

#[derive(Debug)]
pub struct Registry {
    store: Arc<ChunkStore>,
    cache: Arc<ChunkCache>,
    fetcher: Option<Arc<Fetcher>>,
    /// Image name → manifest, mirrored from the metadata store.
    image_names: RwLock<HashMap<String, ChunkId>>,
    images: Mutex<HashMap<ChunkId, Arc<ImageDevice>>>,
    disks: RwLock<HashMap<String, Arc<Disk>>>,
}

impl Registry {
    pub fn new(
        store: Arc<ChunkStore>,
        cache: Arc<ChunkCache>,
        fetcher: Option<Arc<Fetcher>>,
    ) -> Self {
        Registry {
            store,
            cache,
            fetcher,
            image_names: RwLock::default(),
            images: Mutex::default(),
            disks: RwLock::default(),
        }
    }

    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    /// The device of a manifest, opening it if needed.
    pub fn open_image(
        &self,
        manifest: &ChunkId,
    ) -> Result<Arc<ImageDevice>, spore_image::ImageError> {
        if let Some(dev) = self.images.lock().get(manifest) {
            return Ok(dev.clone());
        }
        // Open outside the lock. When the parent image is open already,
        // fold only the new layers onto its map.
        let parent_id = spore_image::image::load_manifest(&self.store, manifest)?.parent;
        let parent = parent_id.and_then(|p| self.images.lock().get(&p).cloned());
        let image = match parent {
            Some(p) => Image::open_on(&self.store, manifest, p.image())?,
            None => Image::open(&self.store, manifest)?,
        };
        let dev = Arc::new(ImageDevice::new(
            image,
            self.store.clone(),
            self.cache.clone(),
            self.fetcher.clone(),
        ));
        Ok(self.images.lock().entry(*manifest).or_insert(dev).clone())
    }

    pub fn bind_image(&self, name: &str, manifest: ChunkId) {
        self.image_names.write().insert(name.to_owned(), manifest);
    }

    pub fn unbind_image(&self, name: &str) {
        self.image_names.write().remove(name);
    }

    /// Forgets opened devices whose manifest is not in `keep`.
    pub fn retain_images(&self, keep: &std::collections::HashSet<ChunkId>) {
        self.images.lock().retain(|id, _| keep.contains(id));
    }

    pub fn add_disk(&self, name: &str, disk: Arc<Disk>) {
        self.disks.write().insert(name.to_owned(), disk);
    }

    pub fn remove_disk(&self, name: &str) -> Option<Arc<Disk>> {
        self.disks.write().remove(name)
    }

    pub fn disk(&self, name: &str) -> Option<Arc<Disk>> {
        self.disks.read().get(name).cloned()
    }

    pub fn disks(&self) -> Vec<(String, Arc<Disk>)> {
        self.disks
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl Exports for Registry {
    fn get(&self, name: &str) -> Option<Arc<dyn Export>> {
        if let Some(image) = name.strip_prefix(IMAGE_PREFIX) {
            let manifest = *self.image_names.read().get(image)?;
            match self.open_image(&manifest) {
                Ok(dev) => Some(dev as Arc<dyn Export>),
                Err(e) => {
                    tracing::warn!(export = name, error = %e, "cannot open image for export");
                    None
                }
            }
        } else if let Some(disk) = name.strip_prefix(DISK_PREFIX) {
            self.disk(disk).map(|d| d as Arc<dyn Export>)
        } else {
            None
        }
    }

    fn list(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .image_names
            .read()
            .keys()
            .map(|n| {
                (
                    format!("{IMAGE_PREFIX}{n}"),
                    format!("image {n} (read-only)"),
                )
            })
            .collect();
        out.extend(
            self.disks
                .read()
                .keys()
                .map(|n| (format!("{DISK_PREFIX}{n}"), format!("disk {n}"))),
        );
        out.sort();
        out
    }
}
