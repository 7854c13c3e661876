//! Finding and stopping a cluster's processes.
//!
//! Three nets, so that a crash of whoever started them loses nothing:
//! the agent pids in the state file (trusted only while their command line
//! still names the agent's data dir, in case the pid was reused), every
//! process whose network namespace is one of the cluster's, and every
//! process started with `--data-dir` inside the cluster's directory.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Identity of a namespace: the (device, inode) of its nsfs file.
pub(crate) type NsId = (u64, u64);

pub(crate) fn netns_id(path: &Path) -> Option<NsId> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn all_pids() -> Vec<u32> {
    let me = std::process::id();
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&pid| pid != me && pid > 1)
        .collect()
}

/// A process's arguments; `None` if it is gone (or a kernel thread).
pub(crate) fn cmdline(pid: u32) -> Option<Vec<OsString>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        return None;
    }
    let raw = raw.strip_suffix(&[0]).unwrap_or(&raw);
    Some(
        raw.split(|&b| b == 0)
            .map(|a| OsString::from_vec(a.to_vec()))
            .collect(),
    )
}

/// The directory given to `--data-dir` (as `--data-dir D` or
/// `--data-dir=D`), if any.
pub(crate) fn data_dir_arg(args: &[OsString]) -> Option<&Path> {
    for (i, arg) in args.iter().enumerate() {
        if arg == "--data-dir" {
            return args.get(i + 1).map(Path::new);
        }
        if let Some(dir) = arg.as_bytes().strip_prefix(b"--data-dir=") {
            return Some(Path::new(std::ffi::OsStr::from_bytes(dir)));
        }
    }
    None
}

/// Whether a live process still is the agent of `data_dir`.
pub(crate) fn is_agent_of(pid: u32, data_dir: &Path) -> bool {
    cmdline(pid).is_some_and(|args| data_dir_arg(&args) == Some(data_dir))
}

/// Processes whose network namespace is one of `namespaces`.
pub(crate) fn in_namespaces(namespaces: &BTreeSet<NsId>) -> Vec<u32> {
    if namespaces.is_empty() {
        return Vec::new();
    }
    all_pids()
        .into_iter()
        .filter(|pid| {
            netns_id(Path::new(&format!("/proc/{pid}/ns/net")))
                .is_some_and(|id| namespaces.contains(&id))
        })
        .collect()
}

/// Processes started with `--data-dir` somewhere under `dir`.
pub(crate) fn with_data_dir_under(dir: &Path) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&pid| {
            cmdline(pid)
                .as_deref()
                .and_then(data_dir_arg)
                .is_some_and(|d| d.starts_with(dir) && d != dir)
        })
        .collect()
}

/// The data directory agent `pid` was started with.
pub(crate) fn data_dir_of(pid: u32) -> Option<std::path::PathBuf> {
    cmdline(pid)
        .as_deref()
        .and_then(data_dir_arg)
        .map(Path::to_owned)
}

/// Asks the agent of `data_dir` to stop with its VMs (`POST
/// /v1/agent/stop {"vms":true}` on its API socket): an agent's VMs
/// outlive a SIGTERM by design. One fixed HTTP/1.1 request, written here
/// rather than pulling the API client and an async runtime into this
/// crate for it. True when the agent accepted.
pub(crate) fn ask_to_stop_with_vms(data_dir: &Path) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(data_dir.join("api.sock")) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let body = r#"{"vms":true}"#;
    let req = format!(
        "POST /v1/agent/stop HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 16];
    let n = s.read(&mut head).unwrap_or(0);
    head[..n].starts_with(b"HTTP/1.1 200")
}

/// Alive, and not a zombie waiting for its parent to reap it.
pub(crate) fn is_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may
    // itself hold spaces and parentheses.
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

/// The process's command name (`/proc/PID/comm`), for messages.
pub(crate) fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim_end().to_owned())
        .unwrap_or_else(|_| "?".to_owned())
}

fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) takes plain integers; a process that is already gone
    // makes it fail with ESRCH, which is fine.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Sends `sig` to every pid in `pids` that is still alive.
pub(crate) fn signal_all(pids: &BTreeSet<u32>, sig: libc::c_int) {
    for &pid in pids {
        if is_alive(pid) {
            signal(pid, sig);
        }
    }
}

/// Polls `/proc` until every pid of `pids` is gone (or a zombie: it holds
/// no memory, file or mount any more) or `within` has passed. Returns
/// those still alive.
pub(crate) fn wait_gone(pids: &BTreeSet<u32>, within: Duration) -> Vec<u32> {
    let deadline = Instant::now() + within;
    let mut left: Vec<u32> = pids.iter().copied().collect();
    loop {
        left.retain(|&p| is_alive(p));
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long a process may take to disappear after SIGKILL (a QEMU with
/// gigabytes of guest RAM takes a moment to free it).
pub(crate) const KILL_WAIT: Duration = Duration::from_secs(10);

/// SIGTERM, up to `grace` to exit, then SIGKILL and up to [`KILL_WAIT`]
/// to be gone. Returns the pids that are still alive after that
/// (normally none).
pub(crate) fn terminate(pids: &BTreeSet<u32>, grace: Duration) -> Vec<u32> {
    let alive: BTreeSet<u32> = pids.iter().copied().filter(|&p| is_alive(p)).collect();
    signal_all(&alive, libc::SIGTERM);
    let left: BTreeSet<u32> = wait_gone(&alive, grace).into_iter().collect();
    for &pid in &left {
        tracing::warn!(pid, comm = %comm(pid), "did not exit on SIGTERM; killing");
    }
    signal_all(&left, libc::SIGKILL);
    wait_gone(&left, KILL_WAIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn finds_data_dir() {
        assert_eq!(
            data_dir_arg(&args(&["spore", "--data-dir", "/s/sp/node1", "agent"])),
            Some(Path::new("/s/sp/node1"))
        );
        assert_eq!(
            data_dir_arg(&args(&["spore", "--data-dir=/s/sp/node1", "agent"])),
            Some(Path::new("/s/sp/node1"))
        );
        assert_eq!(data_dir_arg(&args(&["spore", "--data-dir"])), None);
        assert_eq!(
            data_dir_arg(&args(&["tail", "-f", "/s/sp/node1.log"])),
            None
        );
    }

    #[test]
    fn sees_own_child_and_its_end() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("node1");
        let mut child = std::process::Command::new("sh")
            // Not a bare `sleep`: sh would exec it and lose the arguments.
            .args([
                "-c",
                "trap 'kill $!; exit' TERM; sleep 30 & wait",
                "sh",
                "--data-dir",
            ])
            .arg(&dir)
            .spawn()
            .unwrap();
        let pid = child.id();
        // cmdline is set at exec; give the child a moment to get there.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !is_agent_of(pid, &dir) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(is_agent_of(pid, &dir));
        assert!(!is_agent_of(pid, &tmp.path().join("node2")));
        assert!(with_data_dir_under(tmp.path()).contains(&pid));
        assert!(is_alive(pid));
        let left = terminate(&BTreeSet::from([pid]), Duration::from_secs(5));
        assert!(left.is_empty());
        // A zombie until reaped, and counted as gone.
        assert!(!is_alive(pid));
        child.wait().unwrap();
    }

    #[test]
    fn finds_processes_by_namespace() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let ours = netns_id(Path::new("/proc/self/ns/net")).unwrap();
        let pids = in_namespaces(&BTreeSet::from([ours]));
        assert!(pids.contains(&child.id()));
        // Never ourselves: down must not kill its caller.
        assert!(!pids.contains(&std::process::id()));
        assert!(in_namespaces(&BTreeSet::new()).is_empty());
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn kills_what_ignores_sigterm() {
        use std::os::unix::process::ExitStatusExt;
        // An ignored signal stays ignored across exec.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "trap '' TERM; exec sleep 300"])
            .spawn()
            .unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(5);
        while comm(pid) != "sleep" && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(comm(pid), "sleep");
        let t = Instant::now();
        let left = terminate(&BTreeSet::from([pid]), Duration::from_millis(500));
        assert!(left.is_empty(), "{left:?}");
        assert!(
            t.elapsed() >= Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        assert!(!is_alive(pid));
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        // wait_gone returns what is alive at the deadline.
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let still = wait_gone(&BTreeSet::from([sleeper.id()]), Duration::from_millis(100));
        assert_eq!(still, [sleeper.id()]);
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
    }
}
