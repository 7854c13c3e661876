//! Power cuts at random points of random operation sequences through a
//! disk (overlay on an image): after every crash the disk opens, and
//! every acknowledged FUA write and every write before an acknowledged
//! flush reads back exactly.

use std::path::Path;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use spore_files::fault::FaultFiles;

use crate::{ChunkCache, Disk, ImageDevice};
use spore_chunks::{ChunkStore, Compression};
use spore_nbd::Export;

/// An image of `size` bytes with data, a zero hole and a short tail.
fn image(size: usize) -> (tempfile::TempDir, Arc<ImageDevice>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(ChunkStore::open(dir.path().join("chunks"), Compression::Zstd).unwrap());
    let mut data: Vec<u8> = (0..size as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 | 1)
        .collect();
    data[65536..2 * 65536].fill(0);
    let raw = dir.path().join("img.raw");
    std::fs::write(&raw, &data).unwrap();
    let src = spore_image::source::open(&raw).unwrap();
    let p = spore_image::import(&store, &*src, "img.raw", 65536, None, &|_, _| {}).unwrap();
    let img = spore_image::Image::open(&store, &p.id).unwrap();
    let dev = Arc::new(ImageDevice::new(
        img,
        store,
        Arc::new(ChunkCache::new(1 << 20)),
        None,
    ));
    (dir, dev, data)
}

/// A random range: mostly small and unaligned, sometimes large.
fn range(rng: &mut StdRng, size: u64) -> (u64, u64) {
    let offset = match rng.random_range(0..4) {
        0 => rng.random_range(0..size / 4096) * 4096,
        1 => rng.random_range(0..size / 512) * 512,
        _ => rng.random_range(0..size),
    };
    let max = match rng.random_range(0..5) {
        0 => 70_000,
        1 => 4096,
        _ => 9000,
    };
    let len = rng.random_range(1..=max).min(size - offset);
    (offset, len)
}

fn run_one(seed: u64, base: &Arc<ImageDevice>, image: &[u8]) {
    let files = FaultFiles::new(seed);
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let root = Path::new("/crash/disk");
    let disk = Disk::create_in(Arc::new(files.clone()), root, base.clone()).unwrap();
    let size = disk.size();
    // What a read returns now, and what a crash must keep (None:
    // unspecified, after a trim or an unacknowledged write).
    let mut now: Vec<Option<u8>> = image.iter().map(|b| Some(*b)).collect();
    let mut kept = now.clone();
    files.cut_power_after(rng.random_range(1..400));
    let mut log = Vec::new();
    for _ in 0..80 {
        let op = rng.random_range(0..100);
        let (offset, len) = range(&mut rng, size);
        let r = offset as usize..(offset + len) as usize;
        let result = match op {
            0..=49 => {
                let fua = rng.random_bool(0.2);
                let fill: u8 = rng.random_range(1..=255);
                let data: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i as u8)).collect();
                log.push(format!("write {offset}+{len} fua={fua}"));
                let res = disk.write(offset, &data, fua);
                for (i, b) in r.clone().enumerate() {
                    now[b] = res.is_ok().then_some(data[i]);
                    kept[b] = (res.is_ok() && fua).then_some(data[i]);
                }
                res
            }
            50..=64 => {
                let (may_trim, fua) = (rng.random_bool(0.5), rng.random_bool(0.2));
                log.push(format!(
                    "zeroes {offset}+{len} may_trim={may_trim} fua={fua}"
                ));
                let res = disk.write_zeroes(offset, len, may_trim, fua);
                for b in r.clone() {
                    now[b] = res.is_ok().then_some(0);
                    kept[b] = (res.is_ok() && fua).then_some(0);
                }
                res
            }
            65..=74 => {
                log.push(format!("trim {offset}+{len}"));
                let res = disk.trim(offset, len);
                for b in r.clone() {
                    now[b] = None;
                    kept[b] = None;
                }
                res
            }
            75..=89 => {
                log.push("flush".into());
                let res = disk.flush();
                if res.is_ok() {
                    kept.clone_from(&now);
                }
                res
            }
            _ => {
                let mut buf = vec![0u8; len as usize];
                let res = disk.read(offset, &mut buf);
                if res.is_ok() {
                    for (i, b) in r.clone().enumerate() {
                        if let Some(v) = now[b] {
                            assert_eq!(
                                buf[i], v,
                                "seed {seed}: read at {b} before the cut; {log:?}"
                            );
                        }
                    }
                }
                res
            }
        };
        if result.is_err() {
            assert!(
                !files.powered(),
                "seed {seed}: an error with the power on: {result:?}"
            );
            break;
        }
    }
    drop(disk);
    files.crash();
    let disk = Disk::open_in(Arc::new(files.clone()), root, base.clone()).unwrap_or_else(|e| {
        panic!("seed {seed}: the disk does not open after a crash: {e}; {log:?}")
    });
    let mut all = vec![0u8; size as usize];
    disk.read(0, &mut all).unwrap();
    for (b, want) in kept.iter().enumerate() {
        if let Some(v) = want {
            assert_eq!(
                all[b],
                *v,
                "seed {seed}: byte {b} lost after the crash (granule {}); {log:?}",
                b / 4096
            );
        }
    }
    // Block status agrees with what reads return.
    let mut at = 0usize;
    for e in disk.block_status(0, size).unwrap() {
        if e.zero {
            assert!(
                all[at..at + e.length as usize].iter().all(|&x| x == 0),
                "seed {seed}: a zero extent at {at} holds data"
            );
        }
        at += e.length as usize;
    }
    assert_eq!(at as u64, size);
    // And the reopened disk keeps working.
    disk.write(1, &[7], true).unwrap();
}

#[test]
fn every_acknowledged_write_survives_a_power_cut() {
    let (_dir, base, image) = image(256 * 1024 + 1000);
    let rounds: u64 = std::env::var("SPORE_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    for seed in 0..rounds {
        run_one(seed, &base, &image);
    }
}

#[test]
fn a_crash_while_the_disk_is_created_leaves_it_unopenable_or_empty() {
    let (_dir, base, image) = image(160 * 1024);
    for seed in 0..200 {
        let files = FaultFiles::new(seed);
        files.cut_power_after(seed % 12 + 1);
        let root = Path::new("/crash/disk");
        let created = Disk::create_in(Arc::new(files.clone()), root, base.clone()).is_ok();
        files.crash();
        match Disk::open_in(Arc::new(files.clone()), root, base.clone()) {
            Ok(disk) => {
                let mut all = vec![0u8; image.len()];
                disk.read(0, &mut all).unwrap();
                assert_eq!(all, image, "seed {seed}");
            }
            Err(e) => assert!(!created, "seed {seed}: created, then lost: {e}"),
        }
    }
}
