//! Fault-injecting files for the crash tests: everything written
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

use crate::{FileHandle, Files};

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

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn FileHandle>> {
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

    /// Atomic: `to` names the file now; until the directory is synced, a
    /// crash may lose the new name (the file then has neither: a model
    /// slightly harsher than a journaling file system, which keeps one).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.tick()?;
        let mut s = self.0.lock();
        let node = s.nodes.remove(from).ok_or(io::ErrorKind::NotFound)?;
        s.names.remove(from);
        s.durable_names.remove(from);
        s.durable_names.remove(to);
        s.names.insert(to.to_owned());
        s.nodes.insert(to.to_owned(), node);
        Ok(())
    }

    /// Durable at once (a removal a crash undid would bring back a file
    /// its owner had given up, which is only a leak).
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.tick()?;
        let mut s = self.0.lock();
        s.nodes.remove(path).ok_or(io::ErrorKind::NotFound)?;
        s.names.remove(path);
        s.durable_names.remove(path);
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.check_on()?;
        let s = self.0.lock();
        if !s.names.contains(dir) {
            return Err(io::ErrorKind::NotFound.into());
        }
        Ok(s.names
            .iter()
            .filter(|n| n.parent() == Some(dir))
            .filter_map(|n| n.file_name()?.to_str().map(str::to_owned))
            .collect())
    }

    fn size(&self, path: &Path) -> io::Result<u64> {
        self.check_on()?;
        let s = self.0.lock();
        match s.nodes.get(path) {
            Some(node) => Ok(node.lock().volatile.len),
            None if s.names.contains(path) => Ok(0),
            None => Err(io::ErrorKind::NotFound.into()),
        }
    }

    fn sync_tree(&self, dir: &Path) -> io::Result<()> {
        self.tick()?;
        let mut s = self.0.lock();
        let under: Vec<PathBuf> = s
            .names
            .iter()
            .filter(|n| n.starts_with(dir))
            .cloned()
            .collect();
        for name in &under {
            if let Some(node) = s.nodes.get(name) {
                let mut n = node.lock();
                n.durable = n.volatile.clone();
            }
        }
        s.durable_names.extend(under);
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

impl FileHandle for FaultFile {
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
