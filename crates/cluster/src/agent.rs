//! Agents: one `spore agent` per host, inside the host's namespace.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::{state, Cluster, ClusterError, Node};

/// A running agent.
///
/// Dropping the handle leaves the agent running (a `spore cluster up` that
/// starts agents and exits must not take them along); `down` stops it, or
/// [`AgentHandle::stop`] does.
#[derive(Debug)]
pub struct AgentHandle {
    node: Node,
    child: Child,
}

impl AgentHandle {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Waits until the agent's API socket accepts connections. If the agent
    /// exits first or `timeout` passes, the error carries the log's tail.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), ClusterError> {
        let started = Instant::now();
        let socket = self.node.api_socket();
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .map_err(|e| ClusterError::io(&socket, e))?
            {
                return Err(ClusterError::AgentExited {
                    node: self.node.name.clone(),
                    status,
                    log_tail: log_tail(&self.node.log_file()),
                });
            }
            // A stale socket file from an earlier agent refuses connections,
            // so only a live listener passes.
            if UnixStream::connect(&socket).is_ok() {
                return Ok(());
            }
            if started.elapsed() >= timeout {
                return Err(ClusterError::AgentTimeout {
                    node: self.node.name.clone(),
                    waited: timeout,
                    log_tail: log_tail(&self.node.log_file()),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Exited already? (`None` while it runs.)
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, ClusterError> {
        self.child
            .try_wait()
            .map_err(|e| ClusterError::io(self.node.log_file(), e))
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; reaps the process.
    pub fn stop(mut self, grace: Duration) -> Result<ExitStatus, ClusterError> {
        let pid = self.pid();
        crate::procs::terminate(&[pid].into(), grace);
        self.child
            .wait()
            .map_err(|e| ClusterError::io(self.node.log_file(), e))
    }
}

impl Cluster {
    /// Starts `ip netns exec <netns> <spore_bin> --data-dir <data_dir> agent
    /// --ram-dir <ram_dir> <extra_args>` for `node`, output to
    /// `<data_dir>.log` (truncated), in its own process group so a Ctrl-C
    /// at the caller's terminal does not reach it. Its pid goes into the
    /// state file before this returns. Call [`AgentHandle::wait_ready`] to
    /// wait for its API.
    ///
    /// The RAM dir is [`Cluster::ram_dir`] (created mode 0700), which
    /// [`crate::down`] removes; if `extra_args` has a `--ram-dir` of its
    /// own, that one is used instead and left to the caller.
    pub fn spawn_agent(
        &self,
        node: &Node,
        spore_bin: &Path,
        extra_args: &[&str],
    ) -> Result<AgentHandle, ClusterError> {
        if !self.hosts().any(|h| h == node) {
            return Err(ClusterError::UnknownNode {
                cluster: self.spec.name.clone(),
                node: node.name.clone(),
            });
        }
        std::fs::create_dir_all(&node.data_dir).map_err(|e| ClusterError::io(&node.data_dir, e))?;
        let ram_dir = if has_ram_dir(extra_args) {
            None
        } else {
            let dir = self.ram_dir(node);
            crate::ram::private_dir(&self.ram_root)?;
            crate::ram::private_dir(&dir)?;
            Some(dir)
        };
        let log_path = node.log_file();
        let log = File::create(&log_path).map_err(|e| ClusterError::io(&log_path, e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| ClusterError::io(&log_path, e))?;
        let mut cmd = node.command(spore_bin);
        cmd.arg("--data-dir").arg(&node.data_dir).arg("agent");
        if let Some(dir) = &ram_dir {
            cmd.arg("--ram-dir").arg(dir);
        }
        let mut child = cmd
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .map_err(|source| ClusterError::Spawn {
                program: format!("ip netns exec {} {}", node.netns, spore_bin.display()),
                source,
            })?;
        let pid = child.id();
        if let Err(e) = self.record_agent(node, pid) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        tracing::info!(node = %node.name, pid, "agent started");
        Ok(AgentHandle {
            node: node.clone(),
            child,
        })
    }

    fn record_agent(&self, node: &Node, pid: u32) -> Result<(), ClusterError> {
        let dir = self.dir();
        let _lock = state::Lock::acquire(&dir)?;
        let mut st = state::read(&dir)?.ok_or_else(|| ClusterError::NotFound {
            name: self.spec.name.clone(),
            state_file: state::state_file(&dir),
        })?;
        st.agents.insert(node.name.clone(), pid);
        state::write(&dir, &st)
    }
}

/// Whether the caller chose the agent's RAM dir (`--ram-dir D` or
/// `--ram-dir=D`).
fn has_ram_dir(args: &[&str]) -> bool {
    args.iter()
        .any(|a| *a == "--ram-dir" || a.starts_with("--ram-dir="))
}

/// The last lines of a log, for error messages.
pub(crate) fn log_tail(path: &Path) -> String {
    const MAX: u64 = 4096;
    let Ok(mut file) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(MAX)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    if tail.is_empty() {
        "(log is empty)".to_owned()
    } else {
        tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_ram_dir() {
        assert!(has_ram_dir(&["--cache-size", "1M", "--ram-dir", "/x"]));
        assert!(has_ram_dir(&["--ram-dir=/x"]));
        assert!(!has_ram_dir(&["--cache-size", "1M"]));
        assert!(!has_ram_dir(&["--ram-dirs", "/x"]));
    }
}
