//! Many hosts on one machine.
//!
//! Tests, benchmarks and the demo need tens of "hosts" with their own
//! addresses and links of a given bandwidth, each running an agent. This
//! crate makes them out of network namespaces: one per host plus the
//! origin, joined by veth pairs to a bridge in a switch namespace, each
//! link shaped with `tc` both ways ([`up`]); and it removes every
//! namespace, link and process it made, whatever state a crash left
//! behind ([`down`]). docs/cluster.md has the picture and the figures.
//!
//! Nothing is created in the caller's own namespace: all addresses exist
//! only inside the cluster's namespaces.

mod agent;
mod error;
mod net;
mod node;
mod probe;
mod procs;
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

use spec::{cluster_dir, is_cluster_object, switch_netns, HostId};
use state::{State, Status};

/// How long `down` gives processes between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A cluster that is up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub spec: ClusterSpec,
    /// The namespace holding the bridge, `<name>-sw`.
    pub switch_netns: String,
    pub origin: Node,
    pub nodes: Vec<Node>,
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
}

/// What [`down`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DownReport {
    /// Namespaces deleted.
    pub namespaces: Vec<String>,
    /// Links deleted from the caller's namespace (only ever leftovers of
    /// some other tool following the naming convention: `up` creates none).
    pub links: Vec<String>,
    /// Processes stopped.
    pub processes: Vec<u32>,
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
    };
    for h in cluster.hosts() {
        fresh_dir(&h.data_dir)?;
        remove_if_exists(&h.log_file())?;
    }

    let mut st = State {
        format: state::STATE_FORMAT.into(),
        version: state::STATE_VERSION,
        status: Status::Creating,
        spec: spec.clone(),
        switch_netns: cluster.switch_netns.clone(),
        origin: cluster.origin.clone(),
        nodes: cluster.nodes.clone(),
        agents: Default::default(),
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
        spec: st.spec,
        switch_netns: st.switch_netns,
        origin: st.origin,
        nodes: st.nodes,
    })
}

/// Removes every namespace, link and process of cluster `name`, and its
/// state file; data dirs and logs stay for a post-mortem.
///
/// Works from the state file if there is a readable one, and in any case
/// from the naming convention (`<name>-sw`, `<name>-o`, `<name>-<n>`) and
/// the processes' namespaces and command lines, so it cleans up after a
/// crash at any point of [`up`] or of whoever started agents. Running it
/// again finds nothing to do and succeeds.
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

/// Stops processes, deletes namespaces and stray links; checks that
/// nothing is left. The state file is the caller's business.
fn teardown(dir: &Path, name: &str, st: Option<&State>) -> Result<DownReport, ClusterError> {
    let mut namespaces = existing_namespaces(name)?;
    if let Some(st) = st {
        for ns in st.namespaces() {
            if !namespaces.contains(&ns) && Path::new(node::NETNS_DIR).join(&ns).exists() {
                namespaces.push(ns);
            }
        }
    }

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
    let ns_ids: BTreeSet<procs::NsId> = namespaces
        .iter()
        .filter_map(|n| procs::netns_id(&Path::new(node::NETNS_DIR).join(n)))
        .collect();
    pids.extend(procs::in_namespaces(&ns_ids));
    pids.extend(procs::with_data_dir_under(dir));
    pids.retain(|&p| procs::is_alive(p));
    let stuck = procs::terminate(&pids, STOP_GRACE);

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
    left.extend(stuck.iter().map(|p| format!("process {p}")));
    if !left.is_empty() {
        return Err(ClusterError::NotGone {
            what: left.into_iter().collect::<Vec<_>>().join(", "),
        });
    }
    Ok(DownReport {
        namespaces,
        links,
        processes: pids.into_iter().collect(),
        had_state_file: false,
        unreadable_state: None,
    })
}
