//! One host of a cluster, and two ways into its namespace.

use std::ffi::OsStr;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::process::Command;

use crate::ClusterError;

/// Where `ip netns` keeps named namespaces.
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// One host: a network namespace with one interface on the cluster's
/// bridge, and a data dir for its agent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Node {
    /// `origin` or `node<i>`.
    pub name: String,
    /// The namespace, `<cluster>-o` or `<cluster>-<i>`.
    pub netns: String,
    /// Address of the host's `eth0`.
    pub ip: Ipv4Addr,
    /// The agent's data dir, `<state_dir>/<cluster>/<name>`.
    pub data_dir: PathBuf,
}

impl Node {
    /// `ip netns exec <netns> <program>`: add arguments and run it.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec"]).arg(&self.netns).arg(program);
        cmd
    }

    /// Runs `f` on a thread inside the host's network namespace and returns
    /// what it returns. Sockets created there stay in that namespace when
    /// used from any other thread afterwards, so this is how a test or a
    /// benchmark listens or connects "from" a host without a helper
    /// process. A panic in `f` is passed on to the caller.
    pub fn run_in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, ClusterError> {
        let path = PathBuf::from(NETNS_DIR).join(&self.netns);
        let ns = File::open(&path).map_err(|source| ClusterError::Netns {
            netns: self.netns.clone(),
            source,
        })?;
        let joined = std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a descriptor we own. A network namespace
                // switch affects only this thread, which ends when `f`
                // returns, so no other code ever runs in the namespace by
                // accident.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(ClusterError::Netns {
                        netns: self.netns.clone(),
                        source: std::io::Error::last_os_error(),
                    });
                }
                Ok(f())
            })
            .join()
        });
        match joined {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Where the agent's stdout and stderr go: `<data_dir>.log`.
    pub fn log_file(&self) -> PathBuf {
        let mut log = self.data_dir.clone().into_os_string();
        log.push(".log");
        log.into()
    }

    /// The agent's API socket, `<data_dir>/api.sock`.
    pub fn api_socket(&self) -> PathBuf {
        self.data_dir.join("api.sock")
    }
}
