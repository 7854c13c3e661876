//! The topology, as `ip` and `tc` batch scripts.
//!
//! ```text
//!  <name>-o          <name>-1                <name>-N        host namespaces
//!  eth0 (tbf)        eth0 (tbf)              eth0 (tbf)      egress shaping
//!    │ veth            │ veth                  │ veth
//!  <name>-o (tbf)    <name>-1 (tbf)    …     <name>-N (tbf)  ingress shaping
//!    └────────────────┴─── br0 ───────────────┘              <name>-sw
//! ```
//!
//! Every veth pair is created with one end already in the switch namespace
//! and the other already in its host's, so nothing ever appears in the root
//! namespace, and deleting the namespaces deletes every link. Each step is
//! one `ip -batch` or `tc -batch` process; the per-host steps (address,
//! `lo`, egress qdisc) need one process per namespace and run in parallel.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::spec::{BRIDGE, HOST_IFACE};
use crate::{ClusterError, Node, Rate};

/// Worker threads for per-namespace steps. The work is mostly waiting on
/// fork/exec and netlink, so a few more than the cores pays.
const PARALLEL: usize = 8;

/// How long a shaper may queue, bounding buffering at the bottleneck the
/// way a switch's buffer would.
const SHAPER_LATENCY_MS: u64 = 50;

/// A token bucket as `tc` arguments. The bucket holds 10 ms of traffic,
/// but at least 16 KiB, so that several full frames pass back to back at
/// low rates (the kernel splits GSO packets larger than the bucket).
pub(crate) fn tbf_args(rate: Rate) -> String {
    let burst = (rate.bytes_per_sec() / 100).max(16 << 10);
    format!(
        "tbf rate {} burst {burst} latency {SHAPER_LATENCY_MS}ms",
        rate.tc_arg()
    )
}

pub(crate) fn netns_add_script(namespaces: &[String]) -> String {
    namespaces
        .iter()
        .map(|n| format!("netns add {n}\n"))
        .collect()
}

pub(crate) fn netns_del_script(namespaces: &[String]) -> String {
    namespaces
        .iter()
        .map(|n| format!("netns del {n}\n"))
        .collect()
}

pub(crate) fn link_del_script(links: &[String]) -> String {
    links.iter().map(|l| format!("link del {l}\n")).collect()
}

/// The bridge and one veth pair per host, run inside the switch namespace.
/// The switch port is named like the host's namespace.
pub(crate) fn switch_script(hosts: &[&Node]) -> String {
    // No STP: there are no loops, and STP would hold each port in
    // "learning" for seconds. No IPv6 link-local addresses anywhere
    // (`addrgenmode none`): the plan is IPv4, and their chatter (DAD,
    // router solicitations, MLD) would show up in traffic counters.
    let mut s = format!(
        "link add name {BRIDGE} type bridge stp_state 0\n\
         link set {BRIDGE} addrgenmode none\n\
         link set {BRIDGE} up\n"
    );
    for host in hosts {
        let port = &host.netns;
        s.push_str(&format!(
            "link add name {port} type veth peer name {HOST_IFACE} netns {port}\n\
             link set {port} addrgenmode none\n\
             link set {port} master {BRIDGE} up\n"
        ));
    }
    s
}

/// Shaping toward the hosts: the egress of each switch port.
pub(crate) fn switch_tc_script(hosts: &[&Node], rate: Rate) -> String {
    hosts
        .iter()
        .map(|h| format!("qdisc add dev {} root {}\n", h.netns, tbf_args(rate)))
        .collect()
}

/// Addresses and links inside one host namespace.
pub(crate) fn host_script(host: &Node, prefix_len: u8) -> String {
    format!(
        "link set lo up\n\
         link set {HOST_IFACE} addrgenmode none\n\
         addr add {}/{prefix_len} dev {HOST_IFACE}\n\
         link set {HOST_IFACE} up\n",
        host.ip
    )
}

/// Shaping away from a host: the egress of its interface.
pub(crate) fn host_tc_script(rate: Rate) -> String {
    format!("qdisc add dev {HOST_IFACE} root {}\n", tbf_args(rate))
}

/// Runs `program [-n netns] [-force] -batch -` with `script` on stdin.
/// With `force`, every line runs even if some fail (used to tear down).
pub(crate) fn run_batch(
    program: &str,
    netns: Option<&str>,
    script: &str,
    force: bool,
) -> Result<(), ClusterError> {
    let mut cmd = Command::new(program);
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    if force {
        cmd.arg("-force");
    }
    cmd.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    let what = match netns {
        Some(ns) => format!("{program} -n {ns} -batch"),
        None => format!("{program} -batch"),
    };
    tracing::debug!(%what, script, "running");
    let mut child = cmd.spawn().map_err(|source| ClusterError::Spawn {
        program: program.to_owned(),
        source,
    })?;
    // A failed write means the program died early; its status says why.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(script.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|source| ClusterError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    Err(ClusterError::Command {
        what,
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

/// If `up` is killed, the `ip` it started must not go on creating
/// namespaces behind the back of the `down` that cleans up after it.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec and calls only
    // async-signal-safe functions (prctl, getppid, _exit).
    unsafe {
        let parent = libc::getpid();
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Runs `job` for every item on a few threads; the first error wins (the
/// remaining items are skipped).
pub(crate) fn for_each_parallel<T: Sync>(
    items: &[T],
    job: impl Fn(&T) -> Result<(), ClusterError> + Sync,
) -> Result<(), ClusterError> {
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<ClusterError>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..PARALLEL.min(items.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { return };
                if let Err(e) = job(item) {
                    failed.lock().unwrap().get_or_insert(e);
                    next.store(items.len(), Ordering::Relaxed);
                    return;
                }
            });
        }
    });
    match failed.into_inner().unwrap() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Names of the links in the caller's network namespace.
pub(crate) fn root_links() -> Result<Vec<String>, ClusterError> {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| ClusterError::Spawn {
            program: "ip".into(),
            source,
        })?;
    if !out.status.success() {
        return Err(ClusterError::Command {
            what: "ip -o link show".into(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(parse_link_names(&String::from_utf8_lossy(&out.stdout)))
}

/// Link names from `ip -o link show`: lines like `7: sp-1@if2: <...> ...`.
pub(crate) fn parse_link_names(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|line| {
            let name = line.split(": ").nth(1)?;
            let name = name.split('@').next()?;
            (!name.is_empty()).then(|| name.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(ns: &str, ip: &str) -> Node {
        Node {
            name: "node1".into(),
            netns: ns.into(),
            ip: ip.parse().unwrap(),
            data_dir: "/tmp/x".into(),
        }
    }

    #[test]
    fn scripts() {
        let a = node("sp-o", "10.77.255.254");
        let b = node("sp-1", "10.77.0.1");
        let sw = switch_script(&[&a, &b]);
        assert!(sw.starts_with("link add name br0 type bridge"));
        assert!(sw.contains("link add name sp-1 type veth peer name eth0 netns sp-1\n"));
        assert!(sw.contains("link set sp-o master br0 up\n"));
        assert_eq!(
            host_script(&b, 16),
            "link set lo up\nlink set eth0 addrgenmode none\n\
             addr add 10.77.0.1/16 dev eth0\nlink set eth0 up\n"
        );
        let rate: Rate = "40mbit".parse().unwrap();
        assert_eq!(
            host_tc_script(rate),
            "qdisc add dev eth0 root tbf rate 40000000bit burst 50000 latency 50ms\n"
        );
        assert_eq!(
            switch_tc_script(&[&b], "1mbit".parse().unwrap()),
            "qdisc add dev sp-1 root tbf rate 1000000bit burst 16384 latency 50ms\n"
        );
        assert_eq!(
            netns_add_script(&["a-o".into(), "a-1".into()]),
            "netns add a-o\nnetns add a-1\n"
        );
    }

    #[test]
    fn link_names() {
        let out = "1: lo: <LOOPBACK,UP> mtu 65536 qdisc noqueue\n\
                   4: eth0: <BROADCAST> mtu 1400\n\
                   7: sp-1@if2: <BROADCAST> mtu 1500\n\
                   garbage\n";
        assert_eq!(parse_link_names(out), ["lo", "eth0", "sp-1"]);
    }

    #[test]
    fn parallel_reports_first_error() {
        let items: Vec<u32> = (0..50).collect();
        let seen = AtomicUsize::new(0);
        for_each_parallel(&items, |_| {
            seen.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.load(Ordering::Relaxed), 50);
        let err = for_each_parallel(&items, |&i| {
            if i == 7 {
                Err(ClusterError::NotGone { what: "7".into() })
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert!(matches!(err, ClusterError::NotGone { what } if what == "7"));
        for_each_parallel(&[] as &[u32], |_| unreachable!()).unwrap();
    }
}
