//! Fault-injecting files for the crash tests: everything an overlay writes
//! is kept in memory twice, as the running system sees it and as a power
//! cut would leave it.
//!
//! A write, trim or resize changes only the volatile copy; `sync_data`
//! makes a file's volatile copy durable; a created file or directory is
//! durable only once its parent directory was synced. At [`FaultFiles::crash`]
//! every page that changed since its file's last sync independently keeps
//! its new or its old contents (a disk may write back any subset of dirty
//! pages, in any order), and every name whose directory was not synced
//! survives or not likewise. [`FaultFiles::cut_power_after`] makes the
//! n-th mutating operation from now, and everything after it, fail, so a
//! crash can land between any two steps of a flush.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::files::{Files, OverlayFile};

const PAGE: u64 = 4096;

#[derive(Debug, Clone, Default, PartialEq)]
struct Content {
    len: u64,
    pages: BTreeMap<u64, Vec<u8>>,
}

impl Content {
    fn read(&self, buf: &mut [u8], offset: u64) {
        buf.fill(0);
        let end = (offset + buf.len() as u64).min(self.len);
        let mut at = offset;
        while at < end {
            let page = at / PAGE;
            let within = (at % PAGE) as usize;
            let n = ((PAGE - at % PAGE).min(end - at)) as usize;
            if let Some(p) = self.pages.get(&page) {
                let o = (at - offset) as usize;
                buf[o..o + n].copy_from_slice(&p[within..within + n]);
            }
            at += n as u64;
        }
    }

    fn write(&mut self, data: &[u8], offset: u64) {
        let mut at = offset;
        let end = offset + data.len() as u64;
        while at < end {
            let page = at / PAGE;
            let within = (at % PAGE) as usize;
            let n = ((PAGE - at % PAGE).min(end - at)) as usize;
            let p = self
                .pages
                .entry(page)
                .or_insert_with(|| vec![0u8; PAGE as usize]);
            let o = (at - offset) as usize;
            p[within..within + n].copy_from_slice(&data[o..o + n]);
            at += n as u64;
        }
        self.len = self.len.max(end);
    }

    /// Zeroes `[offset, offset+len)`; whole pages become holes if `punch`.
    fn zero(&mut self, offset: u64, len: u64, punch: bool) {
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let page = at / PAGE;
            let n = (PAGE - at % PAGE).min(end - at);
            if punch && n == PAGE {
                self.pages.remove(&page);
            } else if let Some(p) = self.pages.get_mut(&page) {
                let w = (at % PAGE) as usize;
                p[w..w + n as usize].fill(0);
            } else if !punch {
                self.pages.insert(page, vec![0u8; PAGE as usize]);
            }
            at += n;
        }
    }

    fn set_len(&mut self, len: u64) {
        self.len = len;
        let last = len.div_ceil(PAGE);
        self.pages.retain(|p, _| *p < last);
        if !len.is_multiple_of(PAGE) {
            if let Some(p) = self.pages.get_mut(&(len / PAGE)) {
                p[(len % PAGE) as usize..].fill(0);
            }
        }
    }
}

#[derive(Debug, Default)]
struct Node {
    volatile: Content,
    durable: Content,
}

#[derive(Debug)]
struct State {
    /// Files by path; directories are names with no node.
    nodes: HashMap<PathBuf, Arc<Mutex<Node>>>,
    /// Every name (files and directories) that exists now.
    names: std::collections::HashSet<PathBuf>,
    /// The names a crash keeps for sure.
    durable_names: std::collections::HashSet<PathBuf>,
    /// Mutating operations left before the power goes; `None`: no cut.
    ops_left: Option<u64>,
    rng: StdRng,
    /// Power cuts so far: each is a reboot (a new boot id).
    boots: u64,
}

/// In-memory files with a power switch (see the module doc).
#[derive(Debug, Clone)]
pub struct FaultFiles(Arc<Mutex<State>>);

fn power_off() -> io::Error {
    io::Error::other("simulated power cut")
}

impl FaultFiles {
    pub fn new(seed: u64) -> Self {
        FaultFiles(Arc::new(Mutex::new(State {
            nodes: HashMap::new(),
            names: Default::default(),
            durable_names: Default::default(),
            ops_left: None,
            rng: StdRng::seed_from_u64(seed),
            boots: 0,
        })))
    }

    /// The `n`-th mutating operation from now fails, and every operation
    /// after it.
    pub fn cut_power_after(&self, n: u64) {
        self.0.lock().ops_left = Some(n);
    }

    pub fn powered(&self) -> bool {
        self.0.lock().ops_left != Some(0)
    }

    /// A power cut and a reboot: what was not durable is lost, page by
    /// page and name by name at random; the power is back on.
    pub fn crash(&self) {
        let mut s = self.0.lock();
        let State {
            nodes,
            names,
            durable_names,
            rng,
            ..
        } = &mut *s;
        let kept: Vec<PathBuf> = names
            .iter()
            .filter(|n| durable_names.contains(*n) || rng.random_bool(0.5))
            .cloned()
            .collect();
        names.clear();
        names.extend(kept.iter().cloned());
        durable_names.clear();
        durable_names.extend(kept);
        nodes.retain(|path, _| names.contains(path));
        for node in nodes.values() {
            let mut n = node.lock();
            let Node { volatile, durable } = &mut *n;
            let mut after = durable.clone();
            if rng.random_bool(0.5) {
                after.set_len(volatile.len);
            }
            let touched: std::collections::BTreeSet<u64> = volatile
                .pages
                .keys()
                .chain(durable.pages.keys())
                .copied()
                .collect();
            for page in touched {
                let (new, old) = (volatile.pages.get(&page), durable.pages.get(&page));
                if new != old && rng.random_bool(0.5) && page * PAGE < after.len {
                    match new {
                        Some(p) => {
                            after.pages.insert(page, p.clone());
                        }
                        None => {
                            after.pages.remove(&page);
                        }
                    }
                }
            }
            after.set_len(after.len);
            n.durable = after.clone();
            n.volatile = after;
        }
        s.ops_left = None;
        s.boots += 1;
    }

    /// Counts one mutating operation; fails once the power is off.
    fn tick(&self) -> io::Result<()> {
        let mut s = self.0.lock();
        match s.ops_left {
            Some(0) => Err(power_off()),
            Some(n) => {
                s.ops_left = Some(n - 1);
                if n == 1 {
                    Err(power_off())
                } else {
                    Ok(())
                }
            }
            None => Ok(()),
        }
    }

    fn check_on(&self) -> io::Result<()> {
        if self.powered() {
            Ok(())
        } else {
            Err(power_off())
        }
    }
}

impl Files for FaultFiles {
    fn create_dir(&self, dir: &Path) -> io::Result<()> {
        let mut missing = Vec::new();
        let mut d = Some(dir);
        {
            let s = self.0.lock();
            while let Some(p) = d.filter(|p| !p.as_os_str().is_empty()) {
                if s.names.contains(p) || p.parent().is_none() {
                    break;
                }
                missing.push(p.to_owned());
                d = p.parent();
            }
        }
        for p in missing.into_iter().rev() {
            self.tick()?;
            self.0.lock().names.insert(p.clone());
            if let Some(parent) = p.parent() {
                self.sync_dir(parent)?;
            }
        }
        Ok(())
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn OverlayFile>> {
        if create {
            self.tick()?;
        } else {
            self.check_on()?;
        }
        let mut s = self.0.lock();
        let exists = s.names.contains(path);
        match (exists, create) {
            (true, true) => return Err(io::ErrorKind::AlreadyExists.into()),
            (false, false) => return Err(io::ErrorKind::NotFound.into()),
            _ => {}
        }
        if create {
            s.names.insert(path.to_owned());
            s.nodes.insert(path.to_owned(), Arc::default());
        }
        let node = s.nodes.get(path).cloned().ok_or(io::ErrorKind::NotFound)?;
        Ok(Arc::new(FaultFile {
            files: self.clone(),
            node,
        }))
    }

    fn exists(&self, path: &Path) -> bool {
        self.0.lock().names.contains(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.tick()?;
        let mut s = self.0.lock();
        let in_dir: Vec<PathBuf> = s
            .names
            .iter()
            .filter(|n| n.parent() == Some(dir))
            .cloned()
            .collect();
        s.durable_names.extend(in_dir);
        Ok(())
    }

    fn boot_id(&self) -> io::Result<[u8; 16]> {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.0.lock().boots.to_le_bytes());
        Ok(id)
    }
}

#[derive(Debug)]
struct FaultFile {
    files: FaultFiles,
    node: Arc<Mutex<Node>>,
}

impl OverlayFile for FaultFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.files.check_on()?;
        self.node.lock().volatile.read(buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.files.tick()?;
        self.node.lock().volatile.write(buf, offset);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.files.tick()?;
        let mut n = self.node.lock();
        n.durable = n.volatile.clone();
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        self.files.check_on()?;
        Ok(self.node.lock().volatile.len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.files.tick()?;
        self.node.lock().volatile.set_len(len);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.files.tick()?;
        self.node.lock().volatile.zero(offset, len, true);
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.files.tick()?;
        self.node.lock().volatile.zero(offset, len, false);
        Ok(())
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.files.check_on()?;
        let n = self.node.lock();
        if offset >= n.volatile.len {
            return Ok(None);
        }
        Ok(n.volatile
            .pages
            .range(offset / PAGE..)
            .next()
            .map(|(p, _)| (p * PAGE).max(offset))
            .filter(|at| *at < n.volatile.len))
    }

    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        self.files.check_on()?;
        let n = self.node.lock();
        let mut page = offset / PAGE;
        while n.volatile.pages.contains_key(&page) {
            page += 1;
        }
        Ok((page * PAGE).max(offset).min(n.volatile.len))
    }
}

#[cfg(test)]
mod tests {
    //! Power cuts at random points of random operation sequences through a
    //! disk (overlay on an image): after every crash the disk opens, and
    //! every acknowledged FUA write and every write before an acknowledged
    //! flush reads back exactly.

    use super::*;
    use crate::{ChunkCache, Disk, ImageDevice};
    use spore_chunks::{ChunkStore, Compression};
    use spore_nbd::Export;

    /// An image of `size` bytes with data, a zero hole and a short tail.
    fn image(size: usize) -> (tempfile::TempDir, Arc<ImageDevice>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(ChunkStore::open(dir.path().join("chunks"), Compression::Zstd).unwrap());
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
}
