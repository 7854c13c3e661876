//! What a cluster should look like, and the naming convention that lets
//! `down` recognise everything a cluster made without any other record.

use std::path::{Path, PathBuf};

use crate::{ClusterError, Rate, Subnet};

/// The most nodes a cluster may have: a Linux bridge takes at most 1024
/// ports, and one is the origin's.
pub const MAX_NODES: usize = 1000;

/// The longest cluster name. A switch port is named `<name>-<host>`, at
/// most `<name>-1000`, and interface names have 15 bytes.
pub const MAX_NAME_LEN: usize = 10;

/// Name of the host-side interface in every host namespace.
pub const HOST_IFACE: &str = "eth0";

/// Name of the bridge in the switch namespace.
pub const BRIDGE: &str = "br0";

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClusterSpec {
    /// Short prefix of every namespace: `<name>-sw` (the switch),
    /// `<name>-o` (the origin), `<name>-1` … `<name>-N` (the nodes).
    /// Lowercase letters and digits, starting with a letter, at most
    /// [`MAX_NAME_LEN`] bytes.
    pub name: String,
    /// Number of nodes besides the origin, 0..=[`MAX_NODES`].
    pub nodes: usize,
    /// Rate of every host's link (origin included), each way; `None` leaves
    /// links unshaped.
    pub bandwidth: Option<Rate>,
    /// Directory holding `<name>/cluster.json` and the hosts' data dirs.
    pub state_dir: PathBuf,
    /// Addresses of the hosts (see [`Subnet`] for the plan).
    pub subnet: Subnet,
}

impl ClusterSpec {
    /// A spec with unshaped links and the default subnet.
    pub fn new(name: impl Into<String>, nodes: usize, state_dir: impl Into<PathBuf>) -> Self {
        ClusterSpec {
            name: name.into(),
            nodes,
            bandwidth: None,
            state_dir: state_dir.into(),
            subnet: Subnet::DEFAULT,
        }
    }

    /// Checks name, node count and address room.
    pub fn validate(&self) -> Result<(), ClusterError> {
        check_name(&self.name)?;
        if self.nodes > MAX_NODES {
            return Err(ClusterError::TooManyNodes {
                nodes: self.nodes,
                max: MAX_NODES,
            });
        }
        if self.nodes > self.subnet.max_nodes() {
            return Err(ClusterError::SubnetTooSmall {
                subnet: self.subnet,
                nodes: self.nodes,
            });
        }
        Ok(())
    }

    /// The cluster's own directory, `<state_dir>/<name>`, made absolute.
    pub fn dir(&self) -> PathBuf {
        cluster_dir(&self.state_dir, &self.name)
    }
}

/// Absolute, because agents get their data dir on the command line and
/// `down` recognises them by it, maybe from another working directory.
pub(crate) fn cluster_dir(state_dir: &Path, name: &str) -> PathBuf {
    let dir = state_dir.join(name);
    std::path::absolute(&dir).unwrap_or(dir)
}

/// Where guest RAM lives on most machines: a tmpfs.
const SHM: &str = "/dev/shm";

/// The directory under which `spawn_agent` puts each agent's guest RAM
/// (`<root>/<host>`): `/dev/shm/spore-cluster-<name>`, or
/// `<cluster dir>/ram` on a machine without `/dev/shm`. `down` removes it.
pub(crate) fn ram_root(name: &str, cluster_dir: &Path) -> PathBuf {
    if Path::new(SHM).is_dir() {
        Path::new(SHM).join(format!("spore-cluster-{name}"))
    } else {
        cluster_dir.join("ram")
    }
}

/// Every place [`ram_root`] may have chosen (it depends on whether
/// `/dev/shm` existed when the cluster came up).
pub(crate) fn ram_root_candidates(name: &str, cluster_dir: &Path) -> [PathBuf; 2] {
    [
        Path::new(SHM).join(format!("spore-cluster-{name}")),
        cluster_dir.join("ram"),
    ]
}

/// Refuses names that would not make valid, unambiguous namespace and
/// interface names. No `-`: it separates the name from the host, and a
/// cluster `a` must never claim the namespaces of a cluster `a-1`.
pub(crate) fn check_name(name: &str) -> Result<(), ClusterError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("it is longer than 10 bytes")
    } else if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        Some("it must start with a lowercase letter")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        Some("it may hold only lowercase letters and digits")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ClusterError::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// One host of a cluster: the origin or a numbered node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HostId {
    Origin,
    Node(usize),
}

impl HostId {
    fn suffix(self) -> String {
        match self {
            HostId::Origin => "o".to_owned(),
            HostId::Node(i) => i.to_string(),
        }
    }

    /// The host's name in node lists, logs and data dirs.
    pub(crate) fn name(self) -> String {
        match self {
            HostId::Origin => "origin".to_owned(),
            HostId::Node(i) => format!("node{i}"),
        }
    }

    /// Name of the host's namespace; also the name of its port on the
    /// switch, which keeps `tc -n <name>-sw qdisc show` readable.
    pub(crate) fn netns(self, cluster: &str) -> String {
        format!("{cluster}-{}", self.suffix())
    }
}

pub(crate) fn switch_netns(cluster: &str) -> String {
    format!("{cluster}-sw")
}

/// Whether `candidate` (a namespace or interface name) follows the naming
/// convention of cluster `cluster`: `<cluster>-sw`, `<cluster>-o` or
/// `<cluster>-<n>` with `n` a number without leading zero.
pub(crate) fn is_cluster_object(cluster: &str, candidate: &str) -> bool {
    let Some(suffix) = candidate
        .strip_prefix(cluster)
        .and_then(|s| s.strip_prefix('-'))
    else {
        return false;
    };
    suffix == "sw"
        || suffix == "o"
        || (!suffix.is_empty()
            && !suffix.starts_with('0')
            && suffix.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["sp", "a", "t1", "abcdefghij"] {
            check_name(good).unwrap();
        }
        for bad in ["", "Sp", "1a", "a-b", "a_b", "abcdefghijk", "a b", "ü"] {
            assert!(
                matches!(check_name(bad), Err(ClusterError::InvalidName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn longest_names_fit_an_interface() {
        let port = HostId::Node(MAX_NODES).netns("abcdefghij");
        assert!(port.len() <= 15, "{port}");
    }

    #[test]
    fn convention() {
        assert_eq!(HostId::Origin.netns("sp"), "sp-o");
        assert_eq!(HostId::Node(7).netns("sp"), "sp-7");
        assert_eq!(switch_netns("sp"), "sp-sw");
        for ours in ["sp-sw", "sp-o", "sp-1", "sp-100"] {
            assert!(is_cluster_object("sp", ours), "{ours}");
        }
        for theirs in [
            "sp", "sp-", "sp-01", "sp-x", "sp-1a", "sp2-1", "spx-o", "sp-1-2", "xsp-1", "sp-sw0",
        ] {
            assert!(!is_cluster_object("sp", theirs), "{theirs}");
        }
    }

    #[test]
    fn ram_roots() {
        let dir = Path::new("/var/tmp/c/sp");
        let root = ram_root("sp", dir);
        assert!(ram_root_candidates("sp", dir).contains(&root), "{root:?}");
        assert_eq!(
            ram_root_candidates("sp", dir),
            [
                PathBuf::from("/dev/shm/spore-cluster-sp"),
                PathBuf::from("/var/tmp/c/sp/ram")
            ]
        );
    }

    #[test]
    fn validate() {
        let mut spec = ClusterSpec::new("sp", 3, "/tmp/x");
        spec.validate().unwrap();
        spec.nodes = MAX_NODES + 1;
        assert!(matches!(
            spec.validate(),
            Err(ClusterError::TooManyNodes { .. })
        ));
        spec.nodes = 6;
        spec.subnet = "10.0.0.0/29".parse().unwrap();
        assert!(matches!(
            spec.validate(),
            Err(ClusterError::SubnetTooSmall { .. })
        ));
        spec.nodes = 5;
        spec.validate().unwrap();
        spec.name = "no-dash".into();
        assert!(matches!(
            spec.validate(),
            Err(ClusterError::InvalidName { .. })
        ));
    }
}
