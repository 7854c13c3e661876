//! Real clusters: namespaces, veth, bridge, tc, processes. Needs root.
//!
//! Every test uses its own cluster name (tests run in parallel) and a
//! guard that runs `down` even when the test fails.

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use spore_cluster::{
    down, load, measure_goodput, up, Cluster, ClusterError, ClusterSpec, Node, Rate,
};

struct Guard {
    state_dir: tempfile::TempDir,
    name: String,
}

impl Guard {
    fn new(name: &str) -> Guard {
        let g = Guard {
            state_dir: tempfile::tempdir().unwrap(),
            name: name.to_owned(),
        };
        // A run killed before its guard ran leaves namespaces behind.
        down(g.state_dir.path(), name).unwrap();
        g
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

#[test]
fn every_host_reaches_every_other() {
    let g = Guard::new("scping");
    let cluster = up(&g.spec(3, Some("40mbit"))).unwrap();
    assert_eq!(cluster.nodes.len(), 3);
    assert_eq!(cluster.origin.netns, "scping-o");
    assert_eq!(cluster.nodes[2].netns, "scping-3");
    assert_eq!(cluster.nodes[0].ip.to_string(), "10.77.0.1");
    assert_eq!(cluster.origin.ip.to_string(), "10.77.255.254");
    assert_eq!(load(g.path(), "scping").unwrap(), cluster);

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
    let ours = traces("scping");
    assert!(ours.iter().all(|t| !t.starts_with("link")), "{ours:?}");
}

#[test]
fn shaping_limits_each_direction() {
    const RATE: f64 = 40e6;
    const BYTES: usize = 4 << 20;
    let limit = Duration::from_secs(10);
    let g = Guard::new("scshape");
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
    let g = Guard::new("scfast");
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
    let g = Guard::new("scdown");
    let cluster = up(&g.spec(3, Some("100mbit"))).unwrap();
    assert_eq!(traces("scdown").len(), 5);

    let fake = stand_in(g.path());
    let agent = cluster
        .spawn_agent(&cluster.nodes[0], &fake, &["--extra"])
        .unwrap();
    let agent_pid = agent.pid();
    let child_pid = read_pid(&cluster.nodes[0].data_dir.join("child.pid"));
    let log = fs::read_to_string(cluster.nodes[0].log_file()).unwrap();
    assert!(log.contains("--data-dir"), "{log}");
    assert!(log.contains("agent --extra"), "{log}");
    // A plain process inside a namespace, not an agent.
    let mut loose = cluster.nodes[2]
        .command("sleep")
        .arg("300")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(alive(agent_pid) && alive(child_pid) && alive(loose.id()));

    let report = down(g.path(), "scdown").unwrap();
    assert_eq!(
        report.namespaces,
        ["scdown-1", "scdown-2", "scdown-3", "scdown-o", "scdown-sw"]
    );
    assert!(report.had_state_file);
    assert!(report.processes.contains(&agent_pid));
    assert!(report.processes.contains(&child_pid));
    assert!(report.processes.contains(&loose.id()));
    assert!(!alive(agent_pid) && !alive(child_pid) && !alive(loose.id()));
    loose.wait().unwrap();
    assert_eq!(traces("scdown"), Vec::<String>::new());
    // Data dirs and logs stay for a post-mortem.
    assert!(cluster.nodes[0].log_file().exists());

    let again = down(g.path(), "scdown").unwrap();
    assert!(again.is_empty(), "{again:?}");
    assert!(matches!(
        load(g.path(), "scdown"),
        Err(ClusterError::NotFound { .. })
    ));
    // And the name is free again.
    let cluster = up(&g.spec(1, None)).unwrap();
    all_pairs_talk(&cluster);
}

#[test]
fn up_refuses_to_build_twice_or_over_leftovers() {
    let g = Guard::new("scleft");
    up(&g.spec(1, None)).unwrap();
    assert!(matches!(
        up(&g.spec(1, None)),
        Err(ClusterError::AlreadyExists { .. })
    ));
    down(g.path(), "scleft").unwrap();

    // A namespace of the name's convention, with no state file.
    let status = Command::new("ip")
        .args(["netns", "add", "scleft-7"])
        .status()
        .unwrap();
    assert!(status.success());
    match up(&g.spec(1, None)) {
        Err(ClusterError::Leftovers { leftovers, .. }) => assert_eq!(leftovers, "scleft-7"),
        other => panic!("{other:?}"),
    }
    let report = down(g.path(), "scleft").unwrap();
    assert_eq!(report.namespaces, ["scleft-7"]);
    assert!(!report.had_state_file);
    up(&g.spec(1, None)).unwrap();
}

#[test]
fn down_after_a_crash_with_state_lost_or_half_made() {
    let g = Guard::new("sccrash");
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
    assert!(matches!(
        load(g.path(), "sccrash"),
        Err(ClusterError::Incomplete { .. })
    ));
    Command::new("ip")
        .args(["netns", "del", "sccrash-2"])
        .status()
        .unwrap();
    let report = down(g.path(), "sccrash").unwrap();
    assert_eq!(report.namespaces.len(), 4);
    assert!(report.processes.contains(&agent) && report.processes.contains(&child));
    assert_eq!(traces("sccrash"), Vec::<String>::new());

    // The state file is gone, and a garbage one is in its place: the
    // convention, namespaces and command lines still find everything.
    let cluster = up(&g.spec(2, None)).unwrap();
    let agent = cluster
        .spawn_agent(&cluster.nodes[1], &fake, &[])
        .unwrap()
        .pid();
    let child = read_pid(&cluster.nodes[1].data_dir.join("child.pid"));
    fs::write(&state_file, "{ torn").unwrap();
    let report = down(g.path(), "sccrash").unwrap();
    assert!(report.unreadable_state.is_some());
    assert_eq!(report.namespaces.len(), 4);
    assert!(report.processes.contains(&agent) && report.processes.contains(&child));
    assert!(!alive(agent) && !alive(child));
    assert!(!state_file.exists());
    assert_eq!(traces("sccrash"), Vec::<String>::new());
}

const CRASH_DIR_ENV: &str = "SPORE_CLUSTER_TEST_CRASH_DIR";

/// Not a test: the body of the child process that `up_killed_midway`
/// kills. Does nothing unless started by it.
#[test]
#[ignore]
fn crash_child() {
    let Some(dir) = std::env::var_os(CRASH_DIR_ENV) else {
        return;
    };
    let mut spec = ClusterSpec::new("sckill", 300, PathBuf::from(dir));
    spec.bandwidth = Some("10mbit".parse().unwrap());
    let _ = up(&spec);
}

#[test]
fn up_killed_midway() {
    let g = Guard::new("sckill");
    let state_file = g.path().join("sckill").join("cluster.json");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--ignored", "--nocapture"])
        .env(CRASH_DIR_ENV, g.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it as soon as it has made something.
    let deadline = Instant::now() + Duration::from_secs(20);
    while traces("sckill").is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let state = fs::read_to_string(&state_file).unwrap();
    let made = traces("sckill").len();
    eprintln!(
        "killed with {made} namespaces made, state {}",
        if state.contains("\"creating\"") {
            "creating"
        } else {
            "up"
        }
    );
    assert!(made > 0);

    let report = down(g.path(), "sckill").unwrap();
    assert_eq!(report.namespaces.len(), made);
    assert_eq!(traces("sckill"), Vec::<String>::new());
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
    let mut spec = ClusterSpec::new("scroll", 3, PathBuf::from(&dir));
    spec.bandwidth = Some("10mbit".parse().unwrap());
    match up(&spec) {
        Err(ClusterError::Command { what, stderr, .. }) => {
            assert!(what.starts_with("tc -n scroll-sw"), "{what}");
            assert!(stderr.contains("fake tc refuses"), "{stderr}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(traces("scroll"), Vec::<String>::new());
    assert!(!Path::new(&dir).join("scroll/cluster.json").exists());
    // Unshaped, the same spec needs no tc and works.
    spec.bandwidth = None;
    up(&spec).unwrap();
    down(&spec.state_dir, "scroll").unwrap();
}

#[test]
fn failed_up_rolls_back() {
    let g = Guard::new("scroll");
    let bin = g.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let tc = bin.join("tc");
    fs::write(&tc, "#!/bin/sh\necho 'fake tc refuses' >&2\nexit 2\n").unwrap();
    fs::set_permissions(&tc, fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "rollback_child", "--ignored", "--nocapture"])
        .env(ROLLBACK_DIR_ENV, g.path())
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
    let g = Guard::new("scagent");
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
    let g = Guard::new("sc100");
    let t = Instant::now();
    let cluster = up(&g.spec(100, Some("100mbit"))).unwrap();
    let up_time = t.elapsed();
    assert_eq!(traces("sc100").len(), 102);
    // The far ends of the address plan talk, through their shapers.
    let last = cluster.nodes.last().unwrap();
    assert_eq!(last.ip.to_string(), "10.77.0.100");
    let at_origin = echo_server(&cluster.origin, 1);
    let at_last = echo_server(last, 1);
    assert_eq!(echo(last, at_origin, "hi").unwrap(), "hi");
    assert_eq!(echo(&cluster.nodes[0], at_last, "hi").unwrap(), "hi");
    let t = Instant::now();
    down(g.path(), "sc100").unwrap();
    let down_time = t.elapsed();
    eprintln!("N=100: up {up_time:?}, down {down_time:?}");
    assert_eq!(traces("sc100"), Vec::<String>::new());
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
    let mut spec = ClusterSpec::new("scbad", 5, tmp.path());
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
    let g = Guard::new("scprobe");
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
    ghost.netns = "scprobe-99".into();
    assert!(matches!(
        measure_goodput(&ghost, &cluster.origin, 1, Duration::from_secs(1)),
        Err(ClusterError::Netns { .. })
    ));
}
