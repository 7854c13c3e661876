//! Many hosts on one machine.
//!
//! Tests, benchmarks and the demo need tens of "hosts" with their own
//! addresses and links of a given bandwidth, each running an agent. This
//! crate makes them out of network namespaces: one per host plus the
//! origin, joined by veth pairs to a bridge in a switch namespace, each
//! link shaped with `tc` both ways ([`up`]); and it removes every
//! namespace, link, process and guest RAM file it made, whatever state a
//! crash left behind ([`down`]). docs/cluster.md has the picture and the
//! figures.
//!
//! Nothing is created in the caller's own namespace: all addresses exist
//! only inside the cluster's namespaces.

mod agent;
mod error;
mod net;
mod node;
mod probe;
mod procs;
mod ram;
mod rate;
mod spec;
mod state;
mod subnet;
pub mod tree;

pub use agent::AgentHandle;
pub use error::ClusterError;
pub use node::Node;
pub use probe::measure_goodput;
pub use rate::{ParseRateError, Rate};
pub use spec::{ClusterSpec, BRIDGE, HOST_IFACE, MAX_NAME_LEN, MAX_NODES};
pub use subnet::{ParseSubnetError, Subnet};

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use spec::{cluster_dir, is_cluster_object, ram_root, ram_root_candidates, switch_netns, HostId};
use state::{State, Status};

/// How long `down` gives agents after SIGTERM to stop their VMs (QEMU)
/// and flush their disks, before it signals anything else.
const AGENT_GRACE: Duration = Duration::from_secs(30);

/// How long `down` then gives every other process of the cluster (QEMU
/// left by an agent that died or did not finish) between SIGTERM and
/// SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Rounds of "find what is left in the namespaces and kill it" (a process
/// may fork while it is being killed).
const KILL_ROUNDS: usize = 3;

/// A cluster that is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub spec: ClusterSpec,
    /// The namespace holding the bridge, `<name>-sw`.
    pub switch_netns: String,
    pub origin: Node,
    pub nodes: Vec<Node>,
    /// Where agents started by [`Cluster::spawn_agent`] keep guest RAM:
    /// `<ram_root>/<host>` each, on a tmpfs (`/dev/shm/spore-cluster-<name>`,
    /// mode 0700). [`down`] removes it.
    pub ram_root: PathBuf,
}

impl Cluster {
    /// `<state_dir>/<name>`: the state file, the lock, the data dirs.
    pub fn dir(&self) -> PathBuf {
        self.spec.dir()
    }

    /// The origin, then the nodes in order.
    pub fn hosts(&self) -> impl Iterator<Item = &Node> {
        std::iter::once(&self.origin).chain(&self.nodes)
    }

    /// A host by name (`origin`, `node1`, …).
    pub fn host(&self, name: &str) -> Option<&Node> {
        self.hosts().find(|h| h.name == name)
    }

    /// The `--ram-dir` that [`Cluster::spawn_agent`] gives `node`'s agent:
    /// `<ram_root>/<host>`.
    pub fn ram_dir(&self, node: &Node) -> PathBuf {
        self.ram_root.join(&node.name)
    }
}

/// What [`down`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DownReport {
    /// Namespaces deleted.
    pub namespaces: Vec<String>,
    /// Links deleted from the caller's namespace (only ever leftovers of
    /// some other tool following the naming convention: `up` creates none).
    pub links: Vec<String>,
    /// Processes of the cluster that were running and are gone now:
    /// agents (asked to stop their VMs first), the VMs, and whatever else
    /// ran in the namespaces.
    pub processes: Vec<u32>,
    /// Guest RAM directories removed (the cluster's RAM root).
    pub ram_dirs: Vec<PathBuf>,
    /// Whether there was a state file (it is gone now).
    pub had_state_file: bool,
    /// Why the state file could not be read, if it could not; the cluster
    /// was then cleaned by naming convention alone.
    pub unreadable_state: Option<String>,
}

impl DownReport {
    /// Nothing was there to remove.
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.links.is_empty()
            && self.processes.is_empty()
            && self.ram_dirs.is_empty()
            && !self.had_state_file
    }
}

fn require_root() -> Result<(), ClusterError> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        Ok(())
    } else {
        Err(ClusterError::NotRoot { euid })
    }
}

/// Named namespaces of cluster `name` that exist now.
fn existing_namespaces(name: &str) -> Result<Vec<String>, ClusterError> {
    let entries = match fs::read_dir(node::NETNS_DIR) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ClusterError::io(node::NETNS_DIR, e)),
    };
    let mut found: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| is_cluster_object(name, n))
        .collect();
    found.sort();
    Ok(found)
}

fn leftover_links(name: &str) -> Result<Vec<String>, ClusterError> {
    Ok(net::root_links()?
        .into_iter()
        .filter(|l| is_cluster_object(name, l))
        .collect())
}

/// RAM roots of cluster `name` that exist now.
fn existing_ram_roots(name: &str, dir: &Path) -> Vec<PathBuf> {
    ram_root_candidates(name, dir)
        .into_iter()
        .filter(|r| fs::symlink_metadata(r).is_ok())
        .collect()
}

/// Builds the cluster `spec` describes.
///
/// The state file is written (status `creating`) before anything is
/// created, so that [`down`] can clean up if this process dies midway; if
/// a step fails, `up` removes what it made and returns the error. Refuses
/// to start while a state file or leftovers of a cluster of the same name
/// exist. Data dirs of an earlier cluster of the same name are emptied: a
/// cluster starts cold.
pub fn up(spec: &ClusterSpec) -> Result<Cluster, ClusterError> {
    spec.validate()?;
    require_root()?;
    let started = Instant::now();
    let dir = spec.dir();
    let _lock = state::Lock::acquire(&dir)?;

    let state_file = state::state_file(&dir);
    if state_file.exists() {
        return Err(ClusterError::AlreadyExists {
            name: spec.name.clone(),
            state_file,
        });
    }
    let mut leftovers = existing_namespaces(&spec.name)?;
    leftovers.extend(leftover_links(&spec.name)?);
    leftovers.extend(
        existing_ram_roots(&spec.name, &dir)
            .iter()
            .map(|r| format!("RAM dir {}", r.display())),
    );
    if !leftovers.is_empty() {
        return Err(ClusterError::Leftovers {
            name: spec.name.clone(),
            leftovers: leftovers.join(", "),
        });
    }

    let host = |id: HostId, ip| Node {
        name: id.name(),
        netns: id.netns(&spec.name),
        ip,
        data_dir: dir.join(id.name()),
    };
    let origin = host(HostId::Origin, spec.subnet.origin_addr());
    let nodes: Vec<Node> = (1..=spec.nodes)
        .map(|i| {
            // validate() checked that the subnet has room for every node.
            let ip = spec.subnet.node_addr(i).unwrap_or(spec.subnet.network());
            host(HostId::Node(i), ip)
        })
        .collect();
    let cluster = Cluster {
        spec: spec.clone(),
        switch_netns: switch_netns(&spec.name),
        origin,
        nodes,
        ram_root: ram_root(&spec.name, &dir),
    };
    for h in cluster.hosts() {
        fresh_dir(&h.data_dir)?;
        remove_if_exists(&h.log_file())?;
    }
    issue_certificates(&cluster, &dir)?;

    let mut st = State {
        format: state::STATE_FORMAT.into(),
        version: state::STATE_VERSION,
        status: Status::Creating,
        spec: spec.clone(),
        switch_netns: cluster.switch_netns.clone(),
        origin: cluster.origin.clone(),
        nodes: cluster.nodes.clone(),
        agents: Default::default(),
        ram_root: Some(cluster.ram_root.clone()),
    };
    state::write(&dir, &st)?;

    if let Err(e) = build(&cluster) {
        tracing::warn!(error = %e, "up failed; removing what it made");
        match teardown(&dir, &spec.name, Some(&st)) {
            Ok(_) => {
                let _ = state::remove(&dir);
            }
            // Keep the state file: it helps the `down` that must follow.
            Err(cleanup) => tracing::error!(error = %cleanup, "cleanup after failed up failed too"),
        }
        return Err(e);
    }
    st.status = Status::Up;
    state::write(&dir, &st)?;
    tracing::info!(
        name = %spec.name,
        nodes = spec.nodes,
        bandwidth = ?spec.bandwidth.map(|r| r.to_string()),
        elapsed = ?started.elapsed(),
        "cluster up"
    );
    Ok(cluster)
}

/// The cluster's own fleet CA (`DIR/ca`, made anew by each `up`) and a
/// certificate for every host, with its address in the SAN, in the TLS
/// directory its agent reads by default (`DATA_DIR/pki`). Every host may
/// fetch, migrate and push (roles host and publisher).
fn issue_certificates(cluster: &Cluster, dir: &Path) -> Result<(), ClusterError> {
    let pki = |e: spore_pki::PkiError| ClusterError::Pki(e.to_string());
    let ca_dir = dir.join("ca");
    fresh_dir(&ca_dir)?;
    let mut ca = spore_pki::Ca::init(&ca_dir, &cluster.spec.name).map_err(pki)?;
    for h in cluster.hosts() {
        ca.issue(
            &h.name,
            &[spore_pki::Role::Host, spore_pki::Role::Publisher],
            &[h.ip.to_string()],
            &spore_pki::default_tls_dir(&h.data_dir),
        )
        .map_err(pki)?;
    }
    Ok(())
}

fn fresh_dir(path: &Path) -> Result<(), ClusterError> {
    match fs::remove_dir_all(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(ClusterError::io(path, e)),
    }
    fs::create_dir_all(path).map_err(|e| ClusterError::io(path, e))
}

fn remove_if_exists(path: &Path) -> Result<(), ClusterError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ClusterError::io(path, e)),
    }
}

fn build(cluster: &Cluster) -> Result<(), ClusterError> {
    ram::private_dir(&cluster.ram_root)?;
    let hosts: Vec<&Node> = cluster.hosts().collect();
    let mut namespaces = vec![cluster.switch_netns.clone()];
    namespaces.extend(hosts.iter().map(|h| h.netns.clone()));
    net::run_batch("ip", None, &net::netns_add_script(&namespaces), false)?;
    let sw = Some(cluster.switch_netns.as_str());
    net::run_batch("ip", sw, &net::switch_script(&hosts), false)?;
    if let Some(rate) = cluster.spec.bandwidth {
        net::run_batch("tc", sw, &net::switch_tc_script(&hosts, rate), false)?;
    }
    let prefix_len = cluster.spec.subnet.prefix_len();
    net::for_each_parallel(&hosts, |h| {
        net::run_batch(
            "ip",
            Some(&h.netns),
            &net::host_script(h, prefix_len),
            false,
        )?;
        match cluster.spec.bandwidth {
            Some(rate) => net::run_batch("tc", Some(&h.netns), &net::host_tc_script(rate), false),
            None => Ok(()),
        }
    })
}

/// Reads the state of cluster `name` under `state_dir`. Fails if there is
/// none, or if `up` never finished.
pub fn load(state_dir: &Path, name: &str) -> Result<Cluster, ClusterError> {
    spec::check_name(name)?;
    let dir = cluster_dir(state_dir, name);
    let st = state::read(&dir)?.ok_or_else(|| ClusterError::NotFound {
        name: name.to_owned(),
        state_file: state::state_file(&dir),
    })?;
    if st.spec.name != name {
        return Err(ClusterError::StateFormat {
            path: state::state_file(&dir),
            reason: format!("it describes cluster {:?}", st.spec.name),
        });
    }
    if st.status != Status::Up {
        return Err(ClusterError::Incomplete {
            name: name.to_owned(),
        });
    }
    Ok(Cluster {
        ram_root: st.ram_root.unwrap_or_else(|| ram_root(name, &dir)),
        spec: st.spec,
        switch_netns: st.switch_netns,
        origin: st.origin,
        nodes: st.nodes,
    })
}

/// Removes every namespace, link and process of cluster `name`, its guest
/// RAM directory and its state file; data dirs and logs stay for a
/// post-mortem.
///
/// Agents are asked first (`POST /v1/agent/stop` with the VMs, SIGTERM
/// when their API does not answer) and given [`AGENT_GRACE`] to stop
/// their VMs and flush their disks; then whatever is left in the
/// namespaces (QEMU) gets SIGTERM, [`STOP_GRACE`], SIGKILL, and `down`
/// waits until each process is gone. Only then are the namespaces, links
/// and the RAM dir removed. Anything that is still there at the end is an
/// error ([`ClusterError::NotGone`]) naming it, and the state file stays
/// for the next attempt.
///
/// Works from the state file if there is a readable one, and in any case
/// from the naming convention (`<name>-sw`, `<name>-o`, `<name>-<n>`,
/// `/dev/shm/spore-cluster-<name>`) and the processes' namespaces and
/// command lines, so it cleans up after a crash at any point of [`up`] or
/// of whoever started agents. Running it again finds nothing to do and
/// succeeds.
pub fn down(state_dir: &Path, name: &str) -> Result<DownReport, ClusterError> {
    spec::check_name(name)?;
    require_root()?;
    let started = Instant::now();
    let dir = cluster_dir(state_dir, name);
    // No directory, no lock to take (and none created just to be removed).
    let _lock = if dir.exists() {
        Some(state::Lock::acquire(&dir)?)
    } else {
        None
    };
    let (st, unreadable_state) = match state::read(&dir) {
        Ok(st) => (st, None),
        Err(e) => {
            tracing::warn!(error = %e, "state file unreadable; cleaning by naming convention");
            (None, Some(error_chain(&e)))
        }
    };
    let mut report = teardown(&dir, name, st.as_ref())?;
    report.had_state_file = state::remove(&dir)? || unreadable_state.is_some();
    report.unreadable_state = unreadable_state;
    tracing::info!(
        name,
        namespaces = report.namespaces.len(),
        processes = report.processes.len(),
        ram_dirs = report.ram_dirs.len(),
        elapsed = ?started.elapsed(),
        "cluster down"
    );
    Ok(report)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Stops processes (agents first), deletes namespaces, stray links and
/// the RAM root; checks that nothing is left. The state file is the
/// caller's business.
fn teardown(dir: &Path, name: &str, st: Option<&State>) -> Result<DownReport, ClusterError> {
    let mut namespaces = existing_namespaces(name)?;
    if let Some(st) = st {
        for ns in st.namespaces() {
            if !namespaces.contains(&ns) && Path::new(node::NETNS_DIR).join(&ns).exists() {
                namespaces.push(ns);
            }
        }
    }
    let ns_ids: BTreeSet<procs::NsId> = namespaces
        .iter()
        .filter_map(|n| procs::netns_id(&Path::new(node::NETNS_DIR).join(n)))
        .collect();

    // Agents: the recorded pids that still are agents of their host, and
    // whatever runs with a data dir of the cluster.
    let agents = || {
        let mut pids = BTreeSet::new();
        if let Some(st) = st {
            for (host, &pid) in &st.agents {
                let data_dir = std::iter::once(&st.origin)
                    .chain(&st.nodes)
                    .find(|n| &n.name == host)
                    .map(|n| n.data_dir.as_path());
                if data_dir.is_some_and(|d| procs::is_agent_of(pid, d)) {
                    pids.insert(pid);
                }
            }
        }
        pids.extend(procs::with_data_dir_under(dir));
        pids.retain(|&p| procs::is_alive(p));
        pids
    };
    let everything = || {
        let mut pids = agents();
        pids.extend(procs::in_namespaces(&ns_ids));
        pids.retain(|&p| procs::is_alive(p));
        pids
    };

    // Everything running now is reported, also what its agent stops.
    let mut seen = everything();
    // 1. Only the agents: each stops its VMs and flushes its disks (asked
    // over its API: a SIGTERM'd agent leaves its VMs for the next one).
    let first = agents();
    if !first.is_empty() {
        let asked: BTreeSet<u32> = first
            .iter()
            .copied()
            .filter(|&pid| procs::data_dir_of(pid).is_some_and(|d| procs::ask_to_stop_with_vms(&d)))
            .collect();
        let rest: BTreeSet<u32> = first.difference(&asked).copied().collect();
        procs::signal_all(&rest, libc::SIGTERM);
        for pid in procs::wait_gone(&first, AGENT_GRACE) {
            tracing::warn!(
                pid,
                comm = %procs::comm(pid),
                "agent did not stop within {AGENT_GRACE:?} of SIGTERM"
            );
        }
    }
    // 2. Everything else (and agents that did not stop): a QEMU whose agent
    // died gets SIGTERM, then SIGKILL; wait until each is gone.
    let mut stuck = Vec::new();
    for round in 0..KILL_ROUNDS {
        let rest = everything();
        if rest.is_empty() {
            break;
        }
        seen.extend(&rest);
        let grace = if round == 0 {
            STOP_GRACE
        } else {
            Duration::ZERO
        };
        stuck = procs::terminate(&rest, grace);
        if !stuck.is_empty() {
            break;
        }
    }
    if stuck.is_empty() {
        // Still something after every round: it forks faster than we kill.
        stuck = everything().into_iter().collect();
    }

    if !namespaces.is_empty() {
        // -force: one namespace that is already gone must not stop the
        // rest; what remains is checked below.
        if let Err(e) = net::run_batch("ip", None, &net::netns_del_script(&namespaces), true) {
            tracing::warn!(error = %e, "some namespaces did not delete");
        }
    }
    let links = leftover_links(name)?;
    if !links.is_empty() {
        if let Err(e) = net::run_batch("ip", None, &net::link_del_script(&links), true) {
            tracing::warn!(error = %e, "some links did not delete");
        }
    }

    let mut left: BTreeSet<String> = namespaces
        .iter()
        .filter(|ns| Path::new(node::NETNS_DIR).join(ns).exists())
        .cloned()
        .collect();
    left.extend(existing_namespaces(name)?);
    left.extend(leftover_links(name)?);
    left.extend(
        stuck
            .iter()
            .map(|&p| format!("process {p} ({})", procs::comm(p))),
    );

    // 3. Guest RAM, now that no process maps it. Only a root that follows
    // the convention is removed, whatever the state file says.
    let roots = ram_root_candidates(name, dir);
    if let Some(recorded) = st.and_then(|s| s.ram_root.as_ref()) {
        if !roots.contains(recorded) {
            tracing::warn!(
                ram_root = %recorded.display(),
                "the state file names a RAM dir outside the convention; left alone"
            );
        }
    }
    let mut ram_dirs = Vec::new();
    for root in roots {
        match ram::remove_root(&root) {
            Ok(true) => ram_dirs.push(root),
            Ok(false) => {}
            Err(e) => {
                left.insert(format!("RAM dir {} ({})", root.display(), error_chain(&e)));
            }
        }
    }

    if !left.is_empty() {
        return Err(ClusterError::NotGone {
            what: left.into_iter().collect::<Vec<_>>().join(", "),
        });
    }
    Ok(DownReport {
        namespaces,
        links,
        processes: seen.into_iter().collect(),
        ram_dirs,
        had_state_file: false,
        unreadable_state: None,
    })
}
