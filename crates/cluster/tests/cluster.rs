//! Real clusters: namespaces, veth, bridge, tc, processes. Needs root.
//!
//! Every test uses its own cluster name, unique to this run: a prefix of
//! its own (tests run in parallel) and a suffix from the process id (two
//! runs of the suite on one machine must not tear down each other's
//! namespaces); and a guard that runs `down` even when the test fails.

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use spore_cluster::{
    down, load, measure_goodput, up, Cluster, ClusterError, ClusterSpec, Node, Rate, MAX_NAME_LEN,
};

/// Characters of the per-run suffix: 36^5 is more than any pid
/// (`pid_max` is at most 2^22), so two live runs never share a suffix.
const SUFFIX_LEN: usize = 5;

/// `prefix` and a suffix unique to this process: the cluster name of one
/// test in this run. Child processes of a test get the name passed down.
fn unique(prefix: &str) -> String {
    assert!(
        prefix.len() + SUFFIX_LEN <= MAX_NAME_LEN,
        "prefix {prefix:?} is too long"
    );
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut pid = std::process::id();
    let mut suffix = [b'0'; SUFFIX_LEN];
    for d in suffix.iter_mut().rev() {
        *d = DIGITS[(pid % 36) as usize];
        pid /= 36;
    }
    format!("{prefix}{}", std::str::from_utf8(&suffix).unwrap())
}

struct Guard {
    state_dir: tempfile::TempDir,
    name: String,
}

impl Guard {
    /// A cluster name `unique(prefix)`, free of leftovers, and a state dir.
    fn new(prefix: &str) -> Guard {
        let g = Guard {
            state_dir: tempfile::tempdir().unwrap(),
            name: unique(prefix),
        };
        // A run killed before its guard ran leaves namespaces behind (a
        // run of an earlier process with the same pid).
        down(g.state_dir.path(), &g.name).unwrap();
        g
    }

    /// A namespace (or switch port) name of this cluster: `<name>-<host>`.
    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.name)
    }

    fn down(&self) -> Result<spore_cluster::DownReport, ClusterError> {
        down(self.path(), &self.name)
    }

    fn load(&self) -> Result<Cluster, ClusterError> {
        load(self.path(), &self.name)
    }

    fn traces(&self) -> Vec<String> {
        traces(&self.name)
    }

    fn spec(&self, nodes: usize, bandwidth: Option<&str>) -> ClusterSpec {
        let mut spec = ClusterSpec::new(&self.name, nodes, self.state_dir.path());
        spec.bandwidth = bandwidth.map(|b| b.parse().unwrap());
        spec
    }

    fn path(&self) -> &Path {
        self.state_dir.path()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = down(self.state_dir.path(), &self.name) {
            eprintln!("cleanup of {} failed: {e}", self.name);
        }
    }
}

/// Everything of cluster `name` visible from outside: namespaces and
/// links in our namespace.
fn traces(name: &str) -> Vec<String> {
    let prefix = format!("{name}-");
    let mut found: Vec<String> = fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    for line in String::from_utf8_lossy(&links.stdout).lines() {
        if let Some(link) = line.split(": ").nth(1) {
            if link.starts_with(&prefix) {
                found.push(format!("link {link}"));
            }
        }
    }
    found
}

fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat[stat.rfind(')').unwrap() + 1..]
                .split_whitespace()
                .next();
            state != Some("Z")
        }
        Err(_) => false,
    }
}

fn goodput(from: &Node, to: &Node, bytes: usize, limit: Duration) -> f64 {
    measure_goodput(from, to, bytes as u64, limit).unwrap()
}

/// A TCP echo of one line from `from` to `to`'s listener at `addr`.
fn echo(from: &Node, addr: SocketAddr, token: &str) -> Result<String, String> {
    let mut s = from
        .run_in_netns(|| TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{} -> {addr}: {e}", from.name))?;
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(token.as_bytes()).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = String::new();
    s.read_to_string(&mut back).map_err(|e| e.to_string())?;
    Ok(back)
}

/// An echo listener on `host` for `connections` connections, so that its
/// thread ends (and its socket does not keep the namespace alive).
fn echo_server(host: &Node, connections: usize) -> SocketAddr {
    let l = host
        .run_in_netns(|| TcpListener::bind((host.ip, 0)))
        .unwrap()
        .unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().take(connections).flatten() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            let _ = s.write_all(&buf);
        }
    });
    addr
}

fn all_pairs_talk(cluster: &Cluster) {
    let hosts: Vec<&Node> = cluster.hosts().collect();
    let addrs: Vec<SocketAddr> = hosts
        .iter()
        .map(|h| echo_server(h, hosts.len() - 1))
        .collect();
    for (i, a) in hosts.iter().enumerate() {
        for (j, b) in hosts.iter().enumerate() {
            if i != j {
                let token = format!("{}->{}", a.name, b.name);
                assert_eq!(echo(a, addrs[j], &token).unwrap(), token);
            }
        }
    }
}

/// A stand-in for `spore`: prints its arguments, starts a child that
/// writes its pid to `<data_dir>/child.pid`, and waits.
fn stand_in(dir: &Path) -> PathBuf {
    let path = dir.join("fake-spore");
    fs::write(
        &path,
        "#!/bin/sh\n\
         echo \"stand-in agent: $*\"\n\
         sleep 300 &\n\
         echo $! > \"$2/child.pid\"\n\
         wait\n",
    )
    .unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn read_pid(path: &Path) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(s) = fs::read_to_string(path) {
            if let Ok(pid) = s.trim().parse() {
                return pid;
            }
        }
        assert!(Instant::now() < deadline, "no pid in {}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Live processes with an argument under `dir` (agents of a cluster have
/// their data dir on the command line).
fn processes_with_arg(dir: &Path) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let ours = cmdline
            .split(|&b| b == 0)
            .any(|a| Path::new(std::str::from_utf8(a).unwrap_or("")).starts_with(dir));
        if ours && pid != std::process::id() && alive(pid) {
            found.push(pid);
        }
    }
    found
}

/// A stand-in for an agent that stops its VM itself: on SIGTERM it logs
/// `agent-term` to `<data_dir>/events`, takes a second, logs
/// `agent-stops-vm` and stops its "VM", a child that logs `vm-term` and
/// writes a RAM file into the agent's `--ram-dir` when it gets SIGTERM.
/// Expects `--data-dir D agent --ram-dir R`, as `spawn_agent` passes them.
fn polite_agent(dir: &Path) -> PathBuf {
    let path = dir.join("polite-spore");
    fs::write(
        &path,
        "#!/bin/sh
         echo \"polite agent: $*\"
         D=\"$2\"
         \"$0.vm\" \"$D\" \"$5\" &
         VM=$!
         echo $VM > \"$D/vm.pid\"
         trap 'echo agent-term >> \"$D/events\"; sleep 1; echo agent-stops-vm >> \"$D/events\"; kill $VM; wait $VM; exit 0' TERM
         wait
",
    )
    .unwrap();
    let vm = dir.join("polite-spore.vm");
    fs::write(
        &vm,
        "#!/bin/sh
         trap 'echo vm-term >> \"$1/events\"; echo ram > \"$2/vm-t.ram\"; exit 0' TERM
         while :; do sleep 0.1; done
",
    )
    .unwrap();
    for p in [&path, &vm] {
        fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    path
}

/// A child that is killed and reaped when the test ends, even by a panic.
struct Reaper(std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn every_host_reaches_every_other() {
    let g = Guard::new("ping");
    let cluster = up(&g.spec(3, Some("40mbit"))).unwrap();
    assert_eq!(cluster.nodes.len(), 3);
    assert_eq!(cluster.origin.netns, g.ns("o"));
    assert_eq!(cluster.nodes[2].netns, g.ns("3"));
    assert_eq!(cluster.nodes[0].ip.to_string(), "10.77.0.1");
    assert_eq!(cluster.origin.ip.to_string(), "10.77.255.254");
    assert_eq!(g.load().unwrap(), cluster);

    all_pairs_talk(&cluster);

    // `command` runs inside the namespace: it sees the host's address.
    let node = &cluster.nodes[1];
    let out = node
        .command("ip")
        .args(["-o", "-4", "addr", "show", "dev", "eth0"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("inet {}/16", node.ip)), "{text}");

    // IPv4 only: no link-local chatter in the traffic counters.
    let out = node
        .command("ip")
        .args(["-6", "addr", "show", "dev", "eth0"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");

    // Loopback is up in every namespace.
    for h in cluster.hosts() {
        let l = h
            .run_in_netns(|| TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .unwrap();
        let addr = l.local_addr().unwrap();
        h.run_in_netns(|| TcpStream::connect_timeout(&addr, Duration::from_secs(1)))
            .unwrap()
            .unwrap();
    }

    // Nothing of the cluster lives in our own namespace.
    let ours = g.traces();
    assert!(ours.iter().all(|t| !t.starts_with("link")), "{ours:?}");
}

#[test]
fn shaping_limits_each_direction() {
    const RATE: f64 = 40e6;
    const BYTES: usize = 4 << 20;
    let limit = Duration::from_secs(10);
    let g = Guard::new("shape");
    let cluster = up(&g.spec(2, Some("40mbit"))).unwrap();
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let tc = |netns: &str, args: &str| {
        let status = Command::new("tc")
            .args(["-n", netns])
            .args(args.split(' '))
            .status()
            .unwrap();
        assert!(status.success(), "tc -n {netns} {args}");
    };
    let in_range = |what: &str, bps: f64| {
        eprintln!("{what}: {:.1} Mbit/s ({:.2}x)", bps / 1e6, bps / RATE);
        assert!(
            (0.6 * RATE..=1.2 * RATE).contains(&bps),
            "{what}: {bps} bit/s against {RATE}"
        );
    };

    in_range("both shapers", goodput(a, b, BYTES, limit));
    in_range("b to a", goodput(b, a, BYTES, limit));

    // Only b's ingress shaper (the switch port toward b) on the path.
    tc(&a.netns, "qdisc del dev eth0 root");
    in_range("ingress shaper only", goodput(a, b, BYTES, limit));

    // Only a's egress shaper.
    let shaper = cluster.spec.bandwidth.map(|r| r.bits_per_sec()).unwrap();
    tc(
        &a.netns,
        &format!("qdisc add dev eth0 root tbf rate {shaper}bit burst 50000 latency 50ms"),
    );
    tc(
        &cluster.switch_netns,
        &format!("qdisc del dev {} root", b.netns),
    );
    in_range("egress shaper only", goodput(a, b, BYTES, limit));

    // Neither: the same path is far faster.
    tc(&a.netns, "qdisc del dev eth0 root");
    let free = goodput(a, b, BYTES, limit);
    eprintln!("unshaped: {:.0} Mbit/s", free / 1e6);
    assert!(free > 3.0 * RATE, "unshaped {free} bit/s");
}

#[test]
fn unshaped_cluster_is_fast() {
    let g = Guard::new("fast");
    let cluster = up(&g.spec(2, None)).unwrap();
    let bps = goodput(
        &cluster.nodes[0],
        &cluster.origin,
        16 << 20,
        Duration::from_secs(10),
    );
    eprintln!("unshaped: {:.0} Mbit/s", bps / 1e6);
    assert!(bps > 200e6, "{bps} bit/s");
    let out = Command::new("tc")
        .args([
            "-n",
            &cluster.nodes[0].netns,
            "qdisc",
            "show",
            "dev",
            "eth0",
        ])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("tbf"));
}

#[test]
fn down_removes_everything_and_is_idempotent() {
    let g = Guard::new("down");
    let cluster = up(&g.spec(3, Some("100mbit"))).unwrap();
    assert_eq!(g.traces().len(), 5);
    // The cluster's RAM root: private, on a tmpfs, named after it.
    assert_eq!(
        cluster.ram_root,
        Path::new("/dev/shm").join(format!("spore-cluster-{}", g.name))
    );
    assert_eq!(mode(&cluster.ram_root), 0o700);

    let fake = stand_in(g.path());
    let agent = cluster
        .spawn_agent(&cluster.nodes[0], &fake, &["--extra"])
        .unwrap();
    let agent_pid = agent.pid();
    let child_pid = read_pid(&cluster.nodes[0].data_dir.join("child.pid"));
    let log = fs::read_to_string(cluster.nodes[0].log_file()).unwrap();
    assert!(log.contains("--data-dir"), "{log}");
    // Each agent gets a RAM dir of its own under the cluster's root.
    let ram_dir = cluster.ram_dir(&cluster.nodes[0]);
    assert_eq!(ram_dir, cluster.ram_root.join("node1"));
    assert!(
        log.contains(&format!("agent --ram-dir {} --extra", ram_dir.display())),
        "{log}"
    );
    assert_eq!(mode(&ram_dir), 0o700);
    // Guest RAM an agent left (killed before it stopped its VMs).
    fs::write(ram_dir.join("vm-web.ram"), vec![7u8; 1 << 20]).unwrap();
    // A plain process inside a namespace, not an agent.
    let mut loose = cluster.nodes[2]
        .command("sleep")
        .arg("300")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(alive(agent_pid) && alive(child_pid) && alive(loose.id()));

    let report = g.down().unwrap();
    assert_eq!(
        report.namespaces,
        ["1", "2", "3", "o", "sw"].map(|h| g.ns(h))
    );
    assert!(report.had_state_file);
    assert!(report.processes.contains(&agent_pid));
    assert!(report.processes.contains(&child_pid));
    assert!(report.processes.contains(&loose.id()));
    assert!(!alive(agent_pid) && !alive(child_pid) && !alive(loose.id()));
    loose.wait().unwrap();
    assert_eq!(g.traces(), Vec::<String>::new());
    // No process of the cluster is left anywhere.
    assert_eq!(processes_with_arg(&cluster.dir()), Vec::<u32>::new());
    // No guest RAM is left in /dev/shm.
    assert_eq!(report.ram_dirs, std::slice::from_ref(&cluster.ram_root));
    assert!(!cluster.ram_root.exists());
    // Data dirs and logs stay for a post-mortem.
    assert!(cluster.nodes[0].log_file().exists());

    let again = g.down().unwrap();
    assert!(again.is_empty(), "{again:?}");
    assert!(matches!(g.load(), Err(ClusterError::NotFound { .. })));
    // And the name is free again.
    let cluster = up(&g.spec(1, None)).unwrap();
    all_pairs_talk(&cluster);
}

#[test]
fn up_refuses_to_build_twice_or_over_leftovers() {
    let g = Guard::new("left");
    let ram_root = up(&g.spec(1, None)).unwrap().ram_root;
    assert!(matches!(
        up(&g.spec(1, None)),
        Err(ClusterError::AlreadyExists { .. })
    ));
    g.down().unwrap();

    // A namespace of the name's convention, with no state file.
    let status = Command::new("ip")
        .args(["netns", "add", &g.ns("7")])
        .status()
        .unwrap();
    assert!(status.success());
    match up(&g.spec(1, None)) {
        Err(ClusterError::Leftovers { leftovers, .. }) => assert_eq!(leftovers, g.ns("7")),
        other => panic!("{other:?}"),
    }
    let report = g.down().unwrap();
    assert_eq!(report.namespaces, [g.ns("7")]);
    assert!(!report.had_state_file);

    // A RAM dir of the name's convention: a `down` that did not finish.
    fs::create_dir(&ram_root).unwrap();
    match up(&g.spec(1, None)) {
        Err(ClusterError::Leftovers { leftovers, .. }) => {
            assert_eq!(leftovers, format!("RAM dir {}", ram_root.display()))
        }
        other => panic!("{other:?}"),
    }
    let report = g.down().unwrap();
    assert_eq!(report.ram_dirs, std::slice::from_ref(&ram_root));
    assert!(!report.is_empty());
    up(&g.spec(1, None)).unwrap();
}

#[test]
fn down_lets_agents_stop_their_vms_then_kills_the_rest() {
    let g = Guard::new("order");
    let cluster = up(&g.spec(2, None)).unwrap();
    let polite = polite_agent(g.path());
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let agent = cluster.spawn_agent(n1, &polite, &[]).unwrap().pid();
    let vm = read_pid(&n1.data_dir.join("vm.pid"));
    // An agent given a RAM dir of the caller's: used, and left alone.
    let own = tempfile::tempdir().unwrap();
    let own_ram = own.path().join("ram");
    fs::create_dir(&own_ram).unwrap();
    let own_arg = own_ram.to_str().unwrap();
    let agent2 = cluster
        .spawn_agent(n2, &polite, &["--ram-dir", own_arg])
        .unwrap()
        .pid();
    let vm2 = read_pid(&n2.data_dir.join("vm.pid"));
    let log2 = fs::read_to_string(n2.log_file()).unwrap();
    assert!(
        log2.contains(&format!("agent --ram-dir {own_arg}")),
        "{log2}"
    );
    assert_eq!(log2.matches("--ram-dir").count(), 1, "{log2}");
    assert!(!cluster.ram_dir(n2).exists());
    // And a process that ignores SIGTERM, as a hung QEMU would.
    let stubborn = cluster
        .origin
        .command("sh")
        .args(["-c", "trap '' TERM; exec sleep 300"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stubborn_pid = stubborn.id();
    let mut stubborn = Reaper(stubborn);
    std::thread::sleep(Duration::from_millis(300));

    let t = Instant::now();
    let report = g.down().unwrap();
    let took = t.elapsed();
    eprintln!("down took {took:?}");
    // The agents got SIGTERM alone, and stopped their VMs themselves.
    for n in [n1, n2] {
        let events = fs::read_to_string(n.data_dir.join("events")).unwrap();
        assert_eq!(
            events, "agent-term\nagent-stops-vm\nvm-term\n",
            "{}",
            n.name
        );
    }
    // The stubborn one: SIGTERM, 5 s, SIGKILL, reported.
    assert!(took >= Duration::from_secs(5), "{took:?}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(stubborn.0.wait().unwrap().signal(), Some(9)); // SIGKILL
    for pid in [agent, vm, agent2, vm2, stubborn_pid] {
        assert!(report.processes.contains(&pid), "{pid} {report:?}");
        assert!(!alive(pid), "{pid}");
    }
    // The VM wrote its RAM file on the way out; down removed it after.
    assert_eq!(report.ram_dirs, std::slice::from_ref(&cluster.ram_root));
    assert!(!cluster.ram_root.exists());
    assert!(own_ram.join("vm-t.ram").exists());
    assert_eq!(g.traces(), Vec::<String>::new());
}

#[test]
fn down_fails_loudly_when_it_cannot_clean_up() {
    let g = Guard::new("busy");
    let cluster = up(&g.spec(1, None)).unwrap();
    let node = &cluster.nodes[0];
    let fake = stand_in(g.path());
    let agent = cluster.spawn_agent(node, &fake, &[]).unwrap().pid();
    // A tmpfs mounted in the agent's RAM dir (as --huge-pages does), held
    // by a process outside the cluster: it cannot be unmounted.
    let mnt = cluster.ram_dir(node).join("huge");
    fs::create_dir(&mnt).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "spore-test", mnt.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    fs::write(mnt.join("vm-a.ram"), b"ram").unwrap();
    let holder = Reaper(
        Command::new("sleep")
            .arg("300")
            .current_dir(&mnt)
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(100));

    let err = g.down().unwrap_err();
    let ClusterError::NotGone { what } = &err else {
        panic!("{err:?}");
    };
    let root = cluster.ram_root.display().to_string();
    assert!(what.contains(&format!("RAM dir {root}")), "{what}");
    assert!(what.contains("cannot unmount"), "{what}");
    assert!(err.to_string().starts_with("down left RAM dir"), "{err}");
    // Everything else is gone; the state file stays for the next attempt.
    assert!(!alive(agent));
    assert_eq!(g.traces(), Vec::<String>::new());
    assert!(cluster.dir().join("cluster.json").exists());
    assert!(mnt.join("vm-a.ram").exists());

    // Once the mount is free, down unmounts it and removes everything.
    drop(holder);
    let report = g.down().unwrap();
    assert_eq!(report.ram_dirs, std::slice::from_ref(&cluster.ram_root));
    assert!(report.had_state_file);
    assert!(!cluster.ram_root.exists());
    assert!(!cluster.dir().join("cluster.json").exists());
}

#[test]
fn down_after_a_crash_with_state_lost_or_half_made() {
    let g = Guard::new("crash");
    let cluster = up(&g.spec(3, None)).unwrap();
    let fake = stand_in(g.path());
    let agent = cluster
        .spawn_agent(&cluster.origin, &fake, &[])
        .unwrap()
        .pid();
    let child = read_pid(&cluster.origin.data_dir.join("child.pid"));
    let state_file = cluster.dir().join("cluster.json");

    // Up "crashed" halfway: status still creating, one namespace missing.
    let text = fs::read_to_string(&state_file).unwrap();
    fs::write(&state_file, text.replace("\"up\"", "\"creating\"")).unwrap();
    assert!(matches!(g.load(), Err(ClusterError::Incomplete { .. })));
    Command::new("ip")
        .args(["netns", "del", &g.ns("2")])
        .status()
        .unwrap();
    let report = g.down().unwrap();
    assert_eq!(report.namespaces.len(), 4);
    assert!(report.processes.contains(&agent) && report.processes.contains(&child));
    assert_eq!(g.traces(), Vec::<String>::new());

    // The state file is gone, and a garbage one is in its place: the
    // convention, namespaces and command lines still find everything.
    let cluster = up(&g.spec(2, None)).unwrap();
    let agent = cluster
        .spawn_agent(&cluster.nodes[1], &fake, &[])
        .unwrap()
        .pid();
    let child = read_pid(&cluster.nodes[1].data_dir.join("child.pid"));
    fs::write(&state_file, "{ torn").unwrap();
    let report = g.down().unwrap();
    assert!(report.unreadable_state.is_some());
    assert_eq!(report.namespaces.len(), 4);
    assert!(report.processes.contains(&agent) && report.processes.contains(&child));
    assert!(!alive(agent) && !alive(child));
    assert!(!state_file.exists());
    assert_eq!(g.traces(), Vec::<String>::new());
    // The RAM dir is found by convention too.
    assert!(report.ram_dirs.contains(&cluster.ram_root), "{report:?}");
    assert!(!cluster.ram_root.exists());
}

const CRASH_DIR_ENV: &str = "SPORE_CLUSTER_TEST_CRASH_DIR";
/// The child's cluster name: the parent's, unique to the parent's run.
const CHILD_NAME_ENV: &str = "SPORE_CLUSTER_TEST_NAME";

/// Not a test: the body of the child process that `up_killed_midway`
/// kills. Does nothing unless started by it.
#[test]
#[ignore]
fn crash_child() {
    let Some(dir) = std::env::var_os(CRASH_DIR_ENV) else {
        return;
    };
    let name = std::env::var(CHILD_NAME_ENV).unwrap();
    let mut spec = ClusterSpec::new(name, 300, PathBuf::from(dir));
    spec.bandwidth = Some("10mbit".parse().unwrap());
    let _ = up(&spec);
}

#[test]
fn up_killed_midway() {
    let g = Guard::new("kill");
    let state_file = g.path().join(&g.name).join("cluster.json");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--ignored", "--nocapture"])
        .env(CRASH_DIR_ENV, g.path())
        .env(CHILD_NAME_ENV, &g.name)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it as soon as it has made something.
    let deadline = Instant::now() + Duration::from_secs(20);
    while g.traces().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let state = fs::read_to_string(&state_file).unwrap();
    let made = g.traces().len();
    eprintln!(
        "killed with {made} namespaces made, state {}",
        if state.contains("\"creating\"") {
            "creating"
        } else {
            "up"
        }
    );
    assert!(made > 0);

    let report = g.down().unwrap();
    assert_eq!(report.namespaces.len(), made);
    assert_eq!(g.traces(), Vec::<String>::new());
    assert!(!state_file.exists());
}

const ROLLBACK_DIR_ENV: &str = "SPORE_CLUSTER_TEST_ROLLBACK_DIR";

/// Not a test: the body of the child process of `failed_up_rolls_back`,
/// run with a `tc` that always fails first on its PATH.
#[test]
#[ignore]
fn rollback_child() {
    let Some(dir) = std::env::var_os(ROLLBACK_DIR_ENV) else {
        return;
    };
    let name = std::env::var(CHILD_NAME_ENV).unwrap();
    let mut spec = ClusterSpec::new(&name, 3, PathBuf::from(&dir));
    spec.bandwidth = Some("10mbit".parse().unwrap());
    match up(&spec) {
        Err(ClusterError::Command { what, stderr, .. }) => {
            assert!(what.starts_with(&format!("tc -n {name}-sw")), "{what}");
            assert!(stderr.contains("fake tc refuses"), "{stderr}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(traces(&name), Vec::<String>::new());
    assert!(!Path::new(&dir).join(&name).join("cluster.json").exists());
    // Unshaped, the same spec needs no tc and works.
    spec.bandwidth = None;
    let cluster = up(&spec).unwrap();
    // The rollback removed the RAM dir too, or this up would have refused.
    assert!(cluster.ram_root.is_dir());
    down(&spec.state_dir, &name).unwrap();
    assert!(!cluster.ram_root.exists());
}

#[test]
fn failed_up_rolls_back() {
    let g = Guard::new("roll");
    let bin = g.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let tc = bin.join("tc");
    fs::write(&tc, "#!/bin/sh\necho 'fake tc refuses' >&2\nexit 2\n").unwrap();
    fs::set_permissions(&tc, fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "rollback_child", "--ignored", "--nocapture"])
        .env(ROLLBACK_DIR_ENV, g.path())
        .env(CHILD_NAME_ENV, &g.name)
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
}

#[test]
fn agent_readiness() {
    let g = Guard::new("agent");
    let cluster = up(&g.spec(1, None)).unwrap();
    let node = &cluster.nodes[0];

    // An agent that dies: the error says so and shows its log.
    let dying = g.path().join("dying");
    fs::write(
        &dying,
        "#!/bin/sh\necho 'no such image: oops' >&2\nexit 3\n",
    )
    .unwrap();
    fs::set_permissions(&dying, fs::Permissions::from_mode(0o755)).unwrap();
    let mut h = cluster.spawn_agent(node, &dying, &[]).unwrap();
    match h.wait_ready(Duration::from_secs(10)) {
        Err(ClusterError::AgentExited {
            status, log_tail, ..
        }) => {
            assert_eq!(status.code(), Some(3));
            assert!(log_tail.contains("no such image: oops"), "{log_tail}");
        }
        other => panic!("{other:?}"),
    }

    // An agent that never listens: a timeout, not a hang.
    let fake = stand_in(g.path());
    let mut h = cluster.spawn_agent(node, &fake, &[]).unwrap();
    match h.wait_ready(Duration::from_millis(300)) {
        Err(ClusterError::AgentTimeout { log_tail, .. }) => {
            assert!(log_tail.contains("stand-in agent"), "{log_tail}")
        }
        other => panic!("{other:?}"),
    }
    // Once something listens on api.sock, it is ready.
    let _listener = std::os::unix::net::UnixListener::bind(node.api_socket()).unwrap();
    h.wait_ready(Duration::from_secs(5)).unwrap();
    let pid = h.pid();
    h.stop(Duration::from_secs(5)).unwrap();
    assert!(!alive(pid));

    // Only the cluster's own hosts.
    let mut stranger = node.clone();
    stranger.name = "node9".into();
    assert!(matches!(
        cluster.spawn_agent(&stranger, &fake, &[]),
        Err(ClusterError::UnknownNode { .. })
    ));
}

#[test]
fn hundred_nodes() {
    let g = Guard::new("big");
    let t = Instant::now();
    let cluster = up(&g.spec(100, Some("100mbit"))).unwrap();
    let up_time = t.elapsed();
    assert_eq!(g.traces().len(), 102);
    // The far ends of the address plan talk, through their shapers.
    let last = cluster.nodes.last().unwrap();
    assert_eq!(last.ip.to_string(), "10.77.0.100");
    let at_origin = echo_server(&cluster.origin, 1);
    let at_last = echo_server(last, 1);
    assert_eq!(echo(last, at_origin, "hi").unwrap(), "hi");
    assert_eq!(echo(&cluster.nodes[0], at_last, "hi").unwrap(), "hi");
    let t = Instant::now();
    g.down().unwrap();
    let down_time = t.elapsed();
    eprintln!("N=100: up {up_time:?}, down {down_time:?}");
    assert_eq!(g.traces(), Vec::<String>::new());
    assert!(up_time + down_time < Duration::from_secs(60));
}

#[test]
fn bad_input_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["", "Bad", "a-b", "waytoolongname"] {
        assert!(matches!(
            up(&ClusterSpec::new(name, 1, tmp.path())),
            Err(ClusterError::InvalidName { .. })
        ));
        assert!(matches!(
            down(tmp.path(), name),
            Err(ClusterError::InvalidName { .. })
        ));
    }
    let mut spec = ClusterSpec::new(unique("bad"), 5, tmp.path());
    spec.subnet = "10.1.2.0/30".parse().unwrap();
    assert!(matches!(
        up(&spec),
        Err(ClusterError::SubnetTooSmall { .. })
    ));
    assert!("fast".parse::<Rate>().is_err());
    assert!(fs::read_dir(tmp.path()).unwrap().next().is_none());
}

#[test]
fn probe_gives_up_in_time() {
    let g = Guard::new("probe");
    let cluster = up(&g.spec(1, Some("1mbit"))).unwrap();
    // 64 MB at 1 Mbit/s would take minutes.
    let t = Instant::now();
    let err = measure_goodput(
        &cluster.nodes[0],
        &cluster.origin,
        64 << 20,
        Duration::from_secs(1),
    )
    .unwrap_err();
    assert!(matches!(err, ClusterError::Probe { .. }), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // A host that is not there.
    let mut ghost = cluster.nodes[0].clone();
    ghost.netns = g.ns("99");
    assert!(matches!(
        measure_goodput(&ghost, &cluster.origin, 1, Duration::from_secs(1)),
        Err(ClusterError::Netns { .. })
    ));
}
