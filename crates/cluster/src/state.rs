//! The state file, `<state_dir>/<name>/cluster.json`.
//!
//! `up` writes it before it creates anything, with status `creating`, and
//! rewrites it with status `up` when done; `spawn_agent` adds agent pids.
//! It also records where the agents' guest RAM goes, for `down` to remove.
//! Every write goes to a temporary file that is synced and renamed over the
//! old one, so a reader sees the old or the new file, never a torn one.
//! Writers (and `up`/`down` as a whole) hold an exclusive `flock` on
//! `<state_dir>/<name>/lock`, which the kernel drops if the holder dies.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::{ClusterError, ClusterSpec, Node};

/// `format` field of every state file.
pub(crate) const STATE_FORMAT: &str = "spore-cluster-state";
/// Current `version` field; files of other versions are refused.
pub(crate) const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Status {
    /// `up` is (or was, if it crashed) creating the cluster.
    Creating,
    /// Everything in the file exists.
    Up,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct State {
    pub format: String,
    pub version: u32,
    pub status: Status,
    pub spec: ClusterSpec,
    pub switch_netns: String,
    pub origin: Node,
    pub nodes: Vec<Node>,
    /// Agent pids by host name, as recorded by `spawn_agent`.
    #[serde(default)]
    pub agents: BTreeMap<String, u32>,
    /// Where `spawn_agent` puts the agents' guest RAM (see
    /// `spec::ram_root`); absent in files written before it was recorded.
    #[serde(default)]
    pub ram_root: Option<PathBuf>,
}

impl State {
    /// Every namespace the cluster has (or was about to create).
    pub fn namespaces(&self) -> Vec<String> {
        let mut all = vec![self.switch_netns.clone(), self.origin.netns.clone()];
        all.extend(self.nodes.iter().map(|n| n.netns.clone()));
        all
    }
}

pub(crate) fn state_file(dir: &Path) -> PathBuf {
    dir.join("cluster.json")
}

/// Reads a state file; `Ok(None)` if there is none.
pub(crate) fn read(dir: &Path) -> Result<Option<State>, ClusterError> {
    let path = state_file(dir);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ClusterError::io(path, e)),
    };
    // Check the header first, so a file of another kind or version gets
    // that error rather than a complaint about some field.
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|source| ClusterError::StateParse {
            path: path.clone(),
            source,
        })?;
    let format = value.get("format").and_then(|f| f.as_str());
    if format != Some(STATE_FORMAT) {
        return Err(ClusterError::StateFormat {
            path,
            reason: format!("format is {format:?}, expected {STATE_FORMAT:?}"),
        });
    }
    let version = value.get("version").and_then(|v| v.as_u64());
    if version != Some(STATE_VERSION.into()) {
        return Err(ClusterError::StateFormat {
            path,
            reason: format!(
                "version {version:?} is not supported (this build reads {STATE_VERSION})"
            ),
        });
    }
    let state: State =
        serde_json::from_value(value).map_err(|source| ClusterError::StateParse {
            path: path.clone(),
            source,
        })?;
    if let Err(e) = state.spec.validate() {
        return Err(ClusterError::StateFormat {
            path,
            reason: e.to_string(),
        });
    }
    Ok(Some(state))
}

/// Replaces the state file atomically and durably.
pub(crate) fn write(dir: &Path, state: &State) -> Result<(), ClusterError> {
    let path = state_file(dir);
    let tmp = dir.join("cluster.json.tmp");
    let json = serde_json::to_vec_pretty(state).map_err(|source| ClusterError::StateParse {
        path: path.clone(),
        source,
    })?;
    let mut file = File::create(&tmp).map_err(|e| ClusterError::io(&tmp, e))?;
    file.write_all(&json)
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .map_err(|e| ClusterError::io(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| ClusterError::io(&path, e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ClusterError::io(dir, e))
}

pub(crate) fn remove(dir: &Path) -> Result<bool, ClusterError> {
    let path = state_file(dir);
    match fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(ClusterError::io(path, e)),
    }
}

/// An exclusive lock on a cluster's directory, released on drop (or when
/// the process dies).
#[derive(Debug)]
pub(crate) struct Lock(#[allow(dead_code)] File);

impl Lock {
    /// Creates `dir` if needed and waits for its lock.
    pub fn acquire(dir: &Path) -> Result<Lock, ClusterError> {
        fs::create_dir_all(dir).map_err(|e| ClusterError::io(dir, e))?;
        let path = dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| ClusterError::io(&path, e))?;
        loop {
            // SAFETY: flock on a descriptor we own; no memory is involved.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Lock(file));
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(ClusterError::io(path, err));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::HostId;

    fn sample(dir: &Path) -> State {
        let spec = ClusterSpec::new("sp", 2, dir);
        let node = |h: HostId| Node {
            name: h.name(),
            netns: h.netns("sp"),
            ip: "10.77.0.1".parse().unwrap(),
            data_dir: dir.join(h.name()),
        };
        State {
            format: STATE_FORMAT.into(),
            version: STATE_VERSION,
            status: Status::Creating,
            spec,
            switch_netns: "sp-sw".into(),
            origin: node(HostId::Origin),
            nodes: vec![node(HostId::Node(1)), node(HostId::Node(2))],
            agents: BTreeMap::new(),
            ram_root: Some(dir.join("ram")),
        }
    }

    #[test]
    fn round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(read(tmp.path()).unwrap().is_none());
        let mut state = sample(tmp.path());
        state.agents.insert("node1".into(), 42);
        write(tmp.path(), &state).unwrap();
        let back = read(tmp.path()).unwrap().unwrap();
        assert_eq!(back.status, Status::Creating);
        assert_eq!(back.spec, state.spec);
        assert_eq!(back.nodes, state.nodes);
        assert_eq!(back.agents.get("node1"), Some(&42));
        assert_eq!(back.namespaces(), ["sp-sw", "sp-o", "sp-1", "sp-2"]);
        assert_eq!(back.ram_root, Some(tmp.path().join("ram")));
        assert!(remove(tmp.path()).unwrap());
        assert!(!remove(tmp.path()).unwrap());
    }

    #[test]
    fn reads_files_without_ram_root() {
        let tmp = tempfile::tempdir().unwrap();
        let mut state = serde_json::to_value(sample(tmp.path())).unwrap();
        state.as_object_mut().unwrap().remove("ram_root");
        fs::write(state_file(tmp.path()), state.to_string()).unwrap();
        let back = read(tmp.path()).unwrap().unwrap();
        assert_eq!(back.ram_root, None);
        assert_eq!(back.nodes.len(), 2);
    }

    #[test]
    fn refuses_other_files() {
        let tmp = tempfile::tempdir().unwrap();
        let path = state_file(tmp.path());
        let err = |content: &str| {
            fs::write(&path, content).unwrap();
            read(tmp.path()).unwrap_err()
        };
        assert!(matches!(err("not json"), ClusterError::StateParse { .. }));
        assert!(matches!(err("{}"), ClusterError::StateFormat { .. }));
        assert!(matches!(
            err(r#"{"format":"spore-cluster-state","version":2}"#),
            ClusterError::StateFormat { .. }
        ));
        assert!(matches!(
            err(r#"{"format":"spore-cluster-state","version":1}"#),
            ClusterError::StateParse { .. }
        ));
        let mut state = serde_json::to_value(sample(tmp.path())).unwrap();
        state["spec"]["name"] = "Bad-Name".into();
        assert!(matches!(
            err(&state.to_string()),
            ClusterError::StateFormat { .. }
        ));
    }
}
