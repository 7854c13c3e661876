//! The agent's state and its start-up: data directory layout, stores,
//! exports, and recovery of what a previous run left behind.
//!
//! ```text
//! DATA_DIR/
//!   agent.lock      flock'd while an agent runs on this directory
//!   meta.redb       names of images, disks, VMs (see meta.rs)
//!   chunks/         content-addressed chunks (images, layers, manifests);
//!                   chunks/corrupt/ holds damaged files moved aside
//!   origin/         what hosts pushed, when this agent is an origin with the
//!                   default origin store (spore-origin, docs/formats.md)
//!   disks/NAME/     overlay of each disk (data + meta + log)
//!   vms/NAME/       serial.log, qmp.sock, qemu.log of each VM
//!   api.sock        REST API
//!   nbd.sock        NBD server
//!   holder.sock     the socket holder, which keeps api.sock and nbd.sock
//!                   open across agent restarts (holder.rs)
//!   agent.clean     written by an orderly exit, removed at start
//!   listen.addr     the peer listener's address as bound (with --listen)
//! ```
//!
//! The directory is 0700: it holds guest data.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use parking_lot::RwLock;
use spore_blockdev::ChunkCache;
use spore_chunks::{ChunkStore, Compression};
use spore_origin::OriginStore;
use spore_qemu::Accel;
use spore_transfer::{Fetcher, Links, Remote};

use crate::disks::Disks;
use crate::error::{AgentError, Result};
use crate::exports::Registry;
use crate::images::{Images, ImagesConfig};
use crate::meta::Meta;
use crate::migration::{Migration, Reach, StreamTls};
use crate::records::{PeerStats, REMOTE_TIMEOUT};
use crate::templates::{TemplateDeps, Templates};
use crate::vms::processes::VmManager;
use crate::vms::Vms;

/// Written by an orderly exit, removed by the next start.
const CLEAN_EXIT: &str = "agent.clean";

/// How an agent is run.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    /// Bytes of chunk data kept in memory.
    pub cache_bytes: usize,
    pub compression: Compression,
    /// Also serve NBD on this TCP address (e.g. 127.0.0.1:10809).
    pub nbd_tcp: Option<String>,
    /// Accelerator override; detected when None.
    pub accel: Option<Accel>,
    /// Serve peers (chunks, image names) over HTTP on this address.
    pub listen: Option<String>,
    /// Other agents to fetch missing chunks from, asked first.
    pub peers: Vec<String>,
    /// The origin (registry) of images: names not known here are looked up
    /// there, and chunks no peer has come from there.
    pub origin: Option<String>,
    /// Accept pushed chunks and image names on the peer listener.
    pub accept_push: bool,
    /// Where pushed chunks and names are kept, and served from: a
    /// directory, `file:///DIR` or `s3://BUCKET[/PREFIX]` (spore-origin).
    /// None: `DATA_DIR/origin` when pushes are accepted, else no store.
    pub origin_store: Option<String>,
    /// Complete every image found at the origin in the background (the
    /// per-image policy `spore image pull --background` sets, as a default).
    pub complete_images: bool,
    /// How long after an image's first use its boot profile is recorded.
    pub profile_seconds: u64,
    /// How long a name found at the origin is used before a new disk or
    /// VM made from it looks it up again (seconds).
    pub name_max_age: u64,
    /// Re-export: answer peers' requests for names and chunks this host
    /// lacks by fetching them from its own sources first (a VirtMan-style
    /// hierarchy: hosts name a relay as their origin).
    pub relay: bool,
    /// Where guest RAM files live (VMs' own, and templates'). A tmpfs, so
    /// that file-backed guest RAM costs no disk I/O. None: a directory per
    /// data directory under /dev/shm (DATA_DIR/ram without /dev/shm).
    pub ram_dir: Option<PathBuf>,
    /// Back guest RAM with transparent huge pages: the RAM directory
    /// becomes a tmpfs of its own mounted with `huge=within_size`.
    pub huge_pages: bool,
    /// Clones kept started and paused per template (the standby pool).
    pub clone_standby: u32,
    /// Accept live migrations from other agents on the peer listener (they
    /// start QEMU here; only for hosts that trust each other).
    pub accept_migrations: bool,
    /// This host's fleet certificate, key, the CA and its revocation list
    /// (spore-pki). None: `DATA_DIR/pki`.
    pub tls_dir: Option<PathBuf>,
    /// Serve peers in plaintext, and reach `http://` peers: anyone who can
    /// reach the port is trusted with every route the flags open.
    pub insecure_listen: bool,
    /// What other hosts may hold of the peer listener.
    pub peer_bounds: crate::listener::Bounds,
    /// Incoming migrations prepared or running at once; more are answered
    /// 503 (each starts a QEMU and a disk here).
    pub max_incoming_migrations: usize,
    /// Keep the NBD and API sockets open across restarts in a socket
    /// holder process (holder.rs). Without, QEMU reconnects to a restarted
    /// agent with its own back-off (for comparison).
    pub socket_holder: bool,
}

impl AgentConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        AgentConfig {
            data_dir: data_dir.into(),
            cache_bytes: 512 << 20,
            compression: Compression::Zstd,
            nbd_tcp: None,
            accel: None,
            listen: None,
            peers: Vec::new(),
            origin: None,
            accept_push: false,
            origin_store: None,
            complete_images: false,
            profile_seconds: 60,
            name_max_age: 300,
            relay: false,
            ram_dir: None,
            huge_pages: false,
            clone_standby: 0,
            accept_migrations: false,
            tls_dir: None,
            insecure_listen: false,
            peer_bounds: crate::listener::Bounds::default(),
            max_incoming_migrations: 2,
            socket_holder: true,
        }
    }

    /// The TLS directory to use.
    pub fn tls_dir(&self) -> PathBuf {
        self.tls_dir
            .clone()
            .unwrap_or_else(|| spore_pki::default_tls_dir(&self.data_dir))
    }

    /// The RAM directory to use: the configured one, or one under /dev/shm
    /// named after the data directory (agents on one host never share it).
    pub fn ram_dir(&self) -> PathBuf {
        if let Some(d) = &self.ram_dir {
            return d.clone();
        }
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            return self.data_dir.join("ram");
        }
        let key = fs::canonicalize(&self.data_dir).unwrap_or_else(|_| self.data_dir.clone());
        let hash = blake3::hash(key.as_os_str().as_encoded_bytes()).to_hex();
        shm.join(format!("spore-{}", &hash.as_str()[..12]))
    }
}

/// Makes `dir` a tmpfs of its own with transparent huge pages
/// (`huge=within_size`: a RAM file gets 2 MiB pages wherever it is large
/// enough), unless it already is one. Guest RAM then takes fewer TLB
/// entries and page faults. The mount stays across agent restarts (VMs'
/// RAM files live in it); `umount DIR` when no VM runs removes it.
fn mount_huge_ram_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(AgentError::io(format!("creating {}", dir.display())))?;
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let canonical = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    let target = canonical.to_string_lossy().into_owned();
    if let Some(line) = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(target.as_str()))
    {
        if line.starts_with("spore-ram ") && line.contains("huge=") {
            return Ok(());
        }
        return Err(AgentError::State(format!(
            "--huge-pages: {} is already a mount point ({line}); give the agent another --ram-dir",
            dir.display()
        )));
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (source, fstype, opts) = (c("spore-ram"), c("tmpfs"), c("huge=within_size,mode=0700"));
    let target_c = c(&target);
    // SAFETY: every pointer is a valid NUL-terminated string that outlives
    // the call; mount(2) reads them only.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            opts.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(AgentError::Io {
            context: format!(
                "--huge-pages: mounting a tmpfs with huge=within_size at {} (needs root and a kernel with transparent huge pages for tmpfs)",
                dir.display()
            ),
            source: std::io::Error::last_os_error(),
        });
    }
    tracing::info!(dir = %dir.display(), "guest RAM on a tmpfs with transparent huge pages");
    Ok(())
}

/// How the agent talks to other hosts, from its configuration: the client
/// side (the fleet certificate when there is one; `http://` only with
/// `--insecure-listen`) and the peer listener's TLS (required with
/// `--listen` unless `--insecure-listen`).
fn tls_of(config: &AgentConfig) -> Result<(Links, Option<Arc<spore_pki::ServerTls>>, StreamTls)> {
    let dir = config.tls_dir();
    let pki = |e: spore_pki::PkiError| AgentError::Invalid(e.to_string());
    let mut stream = StreamTls::default();
    let mut links = if dir.join("cert.pem").exists() {
        let client = spore_pki::client_config(&dir).map_err(pki)?;
        stream.client = Some(client.clone());
        Links::tls(client)
    } else {
        Links::default()
    };
    if config.insecure_listen {
        links = links.allow_plaintext();
    }
    // The peer listener and NBD over TCP both serve other hosts: TLS with
    // the host's certificate unless --insecure-listen.
    let serves_hosts = config.listen.is_some() || config.nbd_tcp.is_some();
    let server = if serves_hosts && !config.insecure_listen {
        Some(Arc::new(spore_pki::ServerTls::load(&dir).map_err(pki)?))
    } else {
        None
    };
    if config.listen.is_some() {
        stream.server = server.clone();
    }
    Ok((links, server, stream))
}

#[derive(Debug)]
pub struct Agent {
    pub config: AgentConfig,
    pub meta: Arc<Meta>,
    pub store: Arc<ChunkStore>,
    pub exports: Arc<Registry>,
    /// Peers then origin, when any is configured.
    pub fetcher: Option<Arc<Fetcher>>,
    /// Pushed images (an origin's store), when pushes are accepted or a
    /// store was named.
    pub origin_store: Option<Arc<OriginStore>>,
    pub peer_stats: PeerStats,
    /// How often peers demanded each chunk here (access frequency); hosts
    /// that resolve an image here prefetch the most demanded.
    pub popularity: spore_transfer::Popularity,
    /// The chunks of images resolves were answered for, by manifest (for
    /// ranking only an image's own chunks by popularity).
    pub image_chunks: parking_lot::Mutex<
        std::collections::HashMap<spore_chunks::ChunkId, Arc<Vec<spore_chunks::ChunkId>>>,
    >,
    /// Held shared by operations that write chunks not yet referenced by
    /// any name (import, commit), exclusively by garbage collection.
    pub gc_lock: Arc<RwLock<()>>,
    /// The image service (names, chunks, profiles, garbage collection).
    pub images: Arc<Images>,
    /// The disk service (overlays, their exports, commits).
    pub disks: Arc<Disks>,
    /// The VM service (QEMU processes and their records).
    pub vms: Arc<Vms>,
    /// The template service (captures, clones, standby pools).
    pub templates: Arc<Templates>,
    /// The migration service (live migrations away from and to this host).
    pub migration: Arc<Migration>,
    /// The peer listener's address as bound (`--listen` with port 0 picks
    /// one), once it listens.
    pub peer_addr: Arc<OnceLock<String>>,
    /// What the start found left by a previous run and settled or removed.
    pub recovered: parking_lot::Mutex<Vec<String>>,
    /// The peer listener's TLS (with `--listen`, unless
    /// `--insecure-listen`): the fleet CA, this host's certificate, the
    /// revocation list in force.
    pub server_tls: Option<Arc<spore_pki::ServerTls>>,
    /// How this host reaches others.
    pub links: Links,
    /// Peer requests refused (no role, revoked) and TLS handshakes that
    /// failed, for the metrics.
    pub peer_refused: std::sync::atomic::AtomicU64,
    /// Privileged peer requests admitted (pushes, binds, migrations in,
    /// remote API calls).
    pub peer_privileged: std::sync::atomic::AtomicU64,
    pub tls_failures: Arc<std::sync::atomic::AtomicU64>,
    /// API connections refused for the caller's credentials.
    pub api_refused: Arc<std::sync::atomic::AtomicU64>,
    /// `spore agent stop` asked for, and whether with the VMs.
    pub stop: StopRequest,
    _lock: File,
}

/// A request to stop the agent (`POST /v1/agent/stop`), which its API
/// server waits for beside SIGINT and SIGTERM.
#[derive(Debug, Default)]
pub struct StopRequest {
    vms: parking_lot::Mutex<Option<bool>>,
    notify: tokio::sync::Notify,
}

impl StopRequest {
    /// Asks the agent to stop; `vms` stops its VMs too (a later request
    /// may add that, never take it back).
    pub fn request(&self, vms: bool) {
        let mut v = self.vms.lock();
        *v = Some(v.unwrap_or(false) || vms);
        self.notify.notify_one();
    }

    /// Returns once a stop is requested.
    pub async fn requested(&self) {
        self.notify.notified().await
    }

    /// Whether the VMs go with the agent.
    pub fn with_vms(&self) -> bool {
        self.vms.lock().unwrap_or(false)
    }
}

impl Agent {
    /// Opens the data directory (creating it), takes its lock, and recovers.
    pub fn open(config: AgentConfig) -> Result<Arc<Self>> {
        config.peer_bounds.check().map_err(AgentError::Invalid)?;
        if config.max_incoming_migrations == 0 {
            return Err(AgentError::Invalid(
                "--max-incoming-migrations must be at least 1 (leave out --accept-migrations to take none)".into(),
            ));
        }
        let dir = &config.data_dir;
        fs::create_dir_all(dir).map_err(AgentError::io(format!("creating {}", dir.display())))?;
        // Disks, chunks (template RAM among them) and sockets: for root's
        // eyes only, whatever the umask.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(AgentError::io(format!("restricting {}", dir.display())))?;
        let lock_path = dir.join(spore_api::AGENT_LOCK);
        let lock = File::create(&lock_path)
            .map_err(AgentError::io(format!("creating {}", lock_path.display())))?;
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(AgentError::State(format!(
                "another agent is already running on {}",
                dir.display()
            )));
        }
        for sub in ["disks", "vms", "templates"] {
            fs::create_dir_all(dir.join(sub)).map_err(AgentError::io(format!("creating {sub}")))?;
        }
        // Written by an orderly exit: without it the previous agent was
        // killed or crashed, and what it was writing may be garbage.
        let clean_path = dir.join(CLEAN_EXIT);
        let previous_exit_clean = !dir.join("meta.redb").exists() || clean_path.exists();
        let _ = fs::remove_file(&clean_path);
        let (links, server_tls, stream_tls) = tls_of(&config)?;
        let meta = Arc::new(Meta::open(&dir.join("meta.redb"))?);
        let store = Arc::new(ChunkStore::open(dir.join("chunks"), config.compression)?);
        let cache = Arc::new(ChunkCache::new(config.cache_bytes));
        let remotes: Vec<Remote> = config
            .peers
            .iter()
            .chain(config.origin.iter())
            .map(|url| {
                Remote::new(url, REMOTE_TIMEOUT, &links)
                    .map_err(|e| AgentError::Invalid(format!("--peer/--origin {e}")))
            })
            .collect::<Result<_>>()?;
        let fetcher = (!remotes.is_empty()).then(|| {
            // A fetched chunk is decoded and hashed on arrival: the cache
            // takes those bytes, so its first read is a hit.
            let cache = cache.clone();
            Arc::new(
                Fetcher::new(remotes).on_arrival(Arc::new(move |id, data, class| {
                    cache.offer(*id, data, class == spore_transfer::Class::Demand)
                })),
            )
        });
        let origin_spec = match (&config.origin_store, config.accept_push) {
            (Some(spec), _) => Some(spec.clone()),
            (None, true) => Some(dir.join("origin").to_string_lossy().into_owned()),
            (None, false) => None,
        };
        let origin_store = origin_spec
            .map(|spec| OriginStore::open(&spec).map(Arc::new))
            .transpose()?;
        let exports = Arc::new(Registry::new(store.clone(), cache, fetcher.clone()));
        let accel = config.accel.unwrap_or_else(Accel::detect);
        if config.huge_pages {
            mount_huge_ram_dir(&config.ram_dir())?;
        }
        let gc_lock = Arc::new(RwLock::new(()));
        let images = Arc::new(Images::new(
            meta.clone(),
            store.clone(),
            exports.clone(),
            fetcher.clone(),
            gc_lock.clone(),
            ImagesConfig {
                origin: config.origin.clone(),
                links: links.clone(),
                complete_images: config.complete_images,
                profile_seconds: config.profile_seconds,
                name_max_age: std::time::Duration::from_secs(config.name_max_age),
                pushes_dir: dir.join("pushing"),
            },
        ));
        let disks = Arc::new(
            Disks::new(
                dir.join("disks"),
                meta.clone(),
                store.clone(),
                exports.clone(),
                fetcher.clone(),
                gc_lock.clone(),
                images.clone(),
            )
            .with_links(links.clone()),
        );
        let vms = Arc::new(Vms::new(
            meta.clone(),
            images.clone(),
            disks.clone(),
            exports.clone(),
            accel,
            dir.join(spore_api::NBD_SOCKET),
            VmManager::new(dir.join("vms"), config.ram_dir())?,
        ));
        let templates = Arc::new(Templates::new(
            TemplateDeps {
                meta: meta.clone(),
                store: store.clone(),
                images: images.clone(),
                disks: disks.clone(),
                exports: exports.clone(),
                vms: vms.clone(),
                gc_lock: gc_lock.clone(),
            },
            dir.clone(),
            config.origin.clone(),
            config.clone_standby,
        ));
        let peer_addr = Arc::new(OnceLock::new());
        let tls_failures: Arc<std::sync::atomic::AtomicU64> = Default::default();
        let migration = Arc::new(Migration::new(
            vms.clone(),
            disks.clone(),
            exports.clone(),
            meta.clone(),
            Reach {
                listen: config.listen.clone(),
                peer_addr: peer_addr.clone(),
                links: links.clone(),
                stream_tls,
                max_incoming: config.max_incoming_migrations,
                refused: tls_failures.clone(),
            },
        ));
        let agent = Arc::new(Agent {
            images,
            disks,
            vms,
            templates,
            migration,
            config,
            meta,
            store,
            exports,
            fetcher,
            origin_store,
            peer_stats: PeerStats::default(),
            popularity: Default::default(),
            image_chunks: Default::default(),
            gc_lock,
            recovered: Default::default(),
            peer_addr,
            server_tls,
            links,
            peer_refused: Default::default(),
            peer_privileged: Default::default(),
            tls_failures,
            api_refused: Default::default(),
            stop: StopRequest::default(),
            _lock: lock,
        });
        agent.recover(previous_exit_clean)?;
        agent.vms.watch_io_errors();
        agent.images.watch_names();
        Ok(agent)
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    pub fn nbd_socket(&self) -> PathBuf {
        self.data_dir().join(spore_api::NBD_SOCKET)
    }

    /// Rebuilds the export registry from the metadata store, removes disk
    /// directories that no record owns (a crash between creating one and
    /// recording it), settles VMs that a previous agent left running and
    /// collects what they left; what it did is kept for `spore status`.
    fn recover(self: &Arc<Self>, previous_exit_clean: bool) -> Result<()> {
        let mut report = Vec::new();
        self.images.bind_all()?;
        report.extend(self.disks.recover()?);
        report.extend(self.vms.recover()?);
        report.extend(self.migration.recover());
        report.extend(self.templates.adopt_standbys());
        report.extend(self.templates.finish_template_removals());
        report.extend(self.templates.collect_template_debris());
        report.extend(self.images.recover_pushes());
        if !previous_exit_clean {
            // A commit, capture or import the kill cut short wrote chunks
            // that no name refers to yet: the operation is rolled back. A
            // collection cut short is finished.
            match self.images.collect_garbage() {
                Ok((0, _)) => {}
                Ok((chunks, bytes)) => report.push(format!(
                    "{chunks} chunks ({bytes} bytes) that no name refers to, left by operations the \
                     previous agent did not finish (it was killed: an import, commit or capture cut \
                     short, or a collection half done): removed"
                )),
                Err(e) => tracing::warn!(error = %e.chain(), "collecting what an interrupted operation left failed"),
            }
        }
        *self.recovered.lock() = report;
        self.images.resume_completion()?;
        Ok(())
    }

    /// The agent's shutdown, past its listeners. With `stop_vms`: every VM
    /// stopped (and why recorded), the standby pools emptied, the RAM
    /// directory removed when nothing is left in it. Without, the VMs and
    /// standbys run on for the next agent to take over (their disks wait
    /// for it: QEMU reconnects). Remote templates' RAM (spore-memfs) is
    /// served by this process and goes with it either way. The disks are
    /// flushed once the NBD server has stopped ([`Agent::flush_all`]).
    pub fn shut_down(&self, stop_vms: bool) {
        if stop_vms {
            self.vms.stop_all_vms();
        } else {
            let running = self.vms.running_count();
            if running > 0 {
                tracing::info!(
                    running,
                    "VMs keep running; the next agent on this data directory takes them over"
                );
                eprintln!(
                    "{running} VM(s) keep running: the next `spore agent` on {} takes them over \
                     (`spore agent stop --vms` stops them with the agent)",
                    self.data_dir().display()
                );
            }
        }
        self.templates.shut_down(stop_vms);
        let _ = fs::remove_dir(self.vms.procs.ram_dir());
    }

    /// Flushes every disk; called on shutdown.
    pub fn flush_all(&self) {
        for (name, disk) in self.exports.disks() {
            if let Err(e) = spore_nbd::Export::flush(&*disk) {
                tracing::error!(disk = %name, error = %e, "flush on shutdown failed");
            }
        }
    }

    /// Records that this agent exits in order (the next start need not
    /// look for what a killed one left).
    pub fn mark_clean_exit(&self) {
        let _ = fs::write(self.data_dir().join(CLEAN_EXIT), b"");
    }
}
