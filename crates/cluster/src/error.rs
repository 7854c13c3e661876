use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use crate::Subnet;

/// Everything that can go wrong building, using or removing a cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster name {name:?} is not valid: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("{nodes} nodes is more than the limit of {max}")]
    TooManyNodes { nodes: usize, max: usize },
    #[error("subnet {subnet} has no room for {nodes} nodes and an origin")]
    SubnetTooSmall { subnet: Subnet, nodes: usize },
    #[error("namespaces and tc need root (effective uid is {euid})")]
    NotRoot { euid: u32 },
    #[error("cluster {name:?} already exists ({state_file}); run down first")]
    AlreadyExists { name: String, state_file: PathBuf },
    #[error("cluster {name:?} has leftovers from an earlier run ({leftovers}); run down first")]
    Leftovers { name: String, leftovers: String },
    #[error("cluster {name:?} does not exist (no {state_file})")]
    NotFound { name: String, state_file: PathBuf },
    #[error("cluster {name:?} is incomplete: up did not finish; run down")]
    Incomplete { name: String },
    #[error("{path} is not a spore cluster state file: {reason}")]
    StateFormat { path: PathBuf, reason: String },
    #[error("cannot parse cluster state {path}")]
    StateParse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the cluster's certificates: {0}")]
    Pki(String),
    #[error("I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} failed ({status}): {stderr}")]
    Command {
        what: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("cannot enter network namespace {netns}")]
    Netns {
        netns: String,
        #[source]
        source: io::Error,
    },
    #[error("{node} is not a host of cluster {cluster:?}")]
    UnknownNode { cluster: String, node: String },
    #[error("agent of {node} exited ({status}) before its API came up; log tail:\n{log_tail}")]
    AgentExited {
        node: String,
        status: ExitStatus,
        log_tail: String,
    },
    #[error("agent of {node} did not open its API within {waited:?}; log tail:\n{log_tail}")]
    AgentTimeout {
        node: String,
        waited: Duration,
        log_tail: String,
    },
    #[error("transfer from {from} to {to} failed")]
    Probe {
        from: String,
        to: String,
        #[source]
        source: io::Error,
    },
    #[error("down left {what} behind")]
    NotGone { what: String },
}

impl ClusterError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        ClusterError::Io {
            path: path.into(),
            source,
        }
    }
}
