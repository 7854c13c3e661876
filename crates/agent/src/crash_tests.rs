//! Power cuts through the chunk store and the metadata together, on files
//! that forget, at each cut, whatever was not durable
//! ([`spore_files::fault`]): random imports, removals and collections, in
//! the order the image service does them (an import's chunks are synced,
//! by publishing its layer, before its name is recorded in `meta.redb`; a
//! removal records the name's end before the collection removes chunks no
//! name reaches), with the power cut at a random step. After every cut the
//! store and the database open; every image whose name was acknowledged
//! (and not removed since) is there and reads back exactly, an image whose
//! recording was cut off is there whole or not at all, and no other name
//! exists. Images share blocks, so a collection that removes a shared
//! chunk is caught.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use spore_chunks::{ChunkStore, Compression};
use spore_files::fault::FaultFiles;
use spore_image::source::{Format, Source};

use crate::meta::{Meta, Table};
use crate::records::ImageRecord;

const BLOCK: usize = 16 << 10;

/// An image in memory.
struct Bytes(Vec<u8>);

impl Source for Bytes {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        buf.fill(0);
        let from = (offset as usize).min(self.0.len());
        let n = (self.0.len() - from).min(buf.len());
        buf[..n].copy_from_slice(&self.0[from..from + n]);
        Ok(())
    }

    fn may_have_data(&self, _offset: u64, _len: u64) -> std::io::Result<bool> {
        Ok(true)
    }
}

/// Up to 12 blocks, each zero or one of 6 random kinds (so images share
/// chunks),
/// sometimes with a short last block.
fn image_bytes(rng: &mut StdRng) -> Vec<u8> {
    let blocks = rng.random_range(1..=12);
    let mut data = Vec::with_capacity(blocks * BLOCK);
    for _ in 0..blocks {
        // Incompressible: a chunk file spans pages, so a cut can leave one
        // of the right length with some of its pages lost.
        let kind: u64 = rng.random_range(0..7);
        if kind == 0 {
            data.extend(std::iter::repeat_n(0u8, BLOCK));
        } else {
            let mut block = vec![0u8; BLOCK];
            StdRng::seed_from_u64(kind).fill(&mut block[..]);
            data.extend(block);
        }
    }
    if rng.random_bool(0.3) {
        data.truncate(data.len() - rng.random_range(1..BLOCK));
    }
    data
}

fn open(files: &FaultFiles) -> std::io::Result<(ChunkStore, Meta)> {
    let store = ChunkStore::open_on(Arc::new(files.clone()), "/crash/chunks", Compression::Zstd)
        .map_err(std::io::Error::other)?;
    let meta = Meta::open_on(files, Path::new("/crash/meta.redb"))
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok((store, meta))
}

/// Imports `data` and records it under `name`, as the image service does.
fn import(store: &ChunkStore, meta: &Meta, name: &str, data: &[u8]) -> Result<(), String> {
    let p = spore_image::import(
        store,
        &Bytes(data.to_vec()),
        name,
        BLOCK as u32,
        None,
        &|_, _| {},
    )
    .map_err(|e| e.to_string())?;
    // No sync here: publishing the layer synced the store (the image
    // service relies on that too).
    let rec = ImageRecord {
        manifest: p.id,
        created: 0,
        complete: false,
        profile: None,
        resolved_at: None,
        newer: None,
    };
    meta.put(Table::Images, name, &rec)
        .map_err(|e| e.to_string())
}

/// Removes the chunks no name reaches, as the image service's collection.
fn collect(store: &ChunkStore, meta: &Meta) -> Result<(), String> {
    let manifests: Vec<_> = meta
        .list::<ImageRecord>(Table::Images)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(_, r)| r.manifest)
        .collect();
    let live =
        spore_image::image::reachable_chunks(store, &manifests).map_err(|e| e.to_string())?;
    for id in store.list().map_err(|e| e.to_string())? {
        if !live.contains(&id) {
            store.remove(&id).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// The image recorded under `name`, read back whole.
fn read_back(store: &ChunkStore, meta: &Meta, name: &str) -> Option<Result<Vec<u8>, String>> {
    let rec: ImageRecord = meta.get(Table::Images, name).ok()??;
    let read = || -> Result<Vec<u8>, String> {
        let image = spore_image::Image::open(store, &rec.manifest).map_err(|e| e.to_string())?;
        let size = image.manifest.virtual_size as usize;
        let mut out = vec![0u8; size.div_ceil(BLOCK) * BLOCK];
        for (b, buf) in out.chunks_mut(BLOCK).enumerate() {
            spore_image::transfer::read_block(store, &image, b as u64, buf)
                .map_err(|e| format!("block {b}: {e}"))?;
        }
        out.truncate(size);
        Ok(out)
    };
    Some(read())
}

#[test]
fn power_cuts_through_imports_removals_and_collections_keep_every_acknowledged_image() {
    let sequences = 300;
    let mut cuts = 0;
    for seed in 0..sequences {
        let mut rng = StdRng::seed_from_u64(seed);
        let files = FaultFiles::new(seed);
        // Acknowledged images, and one whose recording a cut interrupted.
        let mut acked: HashMap<String, Vec<u8>> = HashMap::new();
        let mut next = 0;
        for round in 0..3 {
            let (store, meta) = open(&files)
                .unwrap_or_else(|e| panic!("seed {seed} round {round}: does not open: {e}"));
            for (name, data) in &acked {
                match read_back(&store, &meta, name) {
                    Some(Ok(got)) => assert!(
                        got == *data,
                        "seed {seed} round {round}: {name} reads back different bytes"
                    ),
                    Some(Err(e)) => panic!("seed {seed} round {round}: {name} is damaged: {e}"),
                    None => panic!("seed {seed} round {round}: acknowledged {name} is gone"),
                }
            }
            let names: Vec<String> = meta
                .list::<ImageRecord>(Table::Images)
                .unwrap()
                .into_iter()
                .map(|(n, _)| n)
                .collect();
            if let Some(name) = names.iter().find(|n| !acked.contains_key(*n)) {
                panic!("seed {seed} round {round}: {name} exists but was never acknowledged");
            }
            files.cut_power_after(rng.random_range(1..600));
            let mut in_flight: Option<(String, Vec<u8>)> = None;
            loop {
                let step = if acked.is_empty() {
                    0
                } else {
                    rng.random_range(0..10)
                };
                let done = match step {
                    0..=5 => {
                        next += 1;
                        let name = format!("img{next}");
                        let data = image_bytes(&mut rng);
                        in_flight = Some((name.clone(), data.clone()));
                        import(&store, &meta, &name, &data).map(|()| {
                            acked.insert(name, data);
                            in_flight = None;
                        })
                    }
                    6..=8 => {
                        let mut all: Vec<&String> = acked.keys().collect();
                        all.sort();
                        let name = all[rng.random_range(0..all.len())].clone();
                        in_flight = acked.get(&name).map(|d| (name.clone(), d.clone()));
                        meta.remove(Table::Images, &name)
                            .map_err(|e| e.to_string())
                            .and_then(|_| {
                                acked.remove(&name);
                                in_flight = None;
                                collect(&store, &meta)
                            })
                    }
                    _ => collect(&store, &meta),
                };
                if done.is_err() {
                    assert!(
                        !files.powered(),
                        "seed {seed}: failed with power on: {done:?}"
                    );
                    break;
                }
            }
            drop((store, meta));
            files.crash();
            cuts += 1;
            // What was in flight is there whole, or not at all.
            if let Some((name, data)) = in_flight {
                let (store, meta) = open(&files).unwrap();
                match read_back(&store, &meta, &name) {
                    Some(Ok(got)) => {
                        assert!(
                            got == data,
                            "seed {seed}: {name} (in flight) reads differently"
                        );
                        acked.insert(name, data);
                    }
                    Some(Err(e)) => panic!("seed {seed}: {name} (in flight) is damaged: {e}"),
                    None => {
                        acked.remove(&name);
                    }
                }
            }
        }
    }
    assert_eq!(cuts, 3 * sequences);
}
