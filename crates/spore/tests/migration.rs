//! Live migration between two `spore cluster` hosts, with the real demo
//! guest: each policy moves the VM with its memory and disk intact (checked
//! from inside the guest), and until the switch the source stays the VM.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{guest, sh, vm_run_args, SPORE};
use serde_json::Value;

struct Cluster {
    dir: tempfile::TempDir,
    name: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // `cluster down` waits for the agents to stop their VMs and fails
        // when anything is left: that fails the test (unless it is failing
        // already).
        let out = spore_testkit::output(
            Command::new(SPORE)
                .env("SPORE_CLUSTER_DIR", self.dir.path())
                .args(["cluster", "down", "--name", &self.name]),
        );
        if !out.status.success() {
            let msg = format!(
                "cluster down {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
            if std::thread::panicking() {
                eprintln!("{msg}");
            } else {
                panic!("{msg}");
            }
        }
    }
}

impl Cluster {
    fn home(&self, host: &str) -> PathBuf {
        self.dir.path().join(&self.name).join(host)
    }

    fn cmd(&self, host: &str, args: &[&str]) -> Command {
        let mut c = Command::new(SPORE);
        c.env("SPORE_CLUSTER_DIR", self.dir.path())
            .env("SPORE_HOME", self.home(host))
            .args(args);
        c
    }

    fn ok(&self, host: &str, args: &[&str]) -> String {
        sh(&mut self.cmd(host, args))
    }

    fn json(&self, host: &str, args: &[&str]) -> Value {
        let out = self.ok(host, args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    fn vms(&self, host: &str) -> Vec<Value> {
        self.json(host, &["vm", "ls", "--json"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn log(&self, host: &str, vm: &str) -> String {
        self.ok(host, &["vm", "log", vm])
    }

    /// Sends `dataset VERB` to the guest and returns the (memory, disk)
    /// checksums it printed.
    fn dataset(&self, host: &str, vm: &str, verb: &str) -> (String, String) {
        common::dataset(|args| self.ok(host, args), vm, verb)
    }

    fn migrate(&self, from: &str, to: &str, extra: &[&str]) -> Value {
        let mut args = vec![
            "vm",
            "migrate",
            "web",
            "--to",
            to,
            "--cluster",
            &self.name,
            "--json",
        ];
        args.extend_from_slice(extra);
        self.json(from, &args)
    }

    /// Runs `vm migrate web --to TO --cluster ... EXTRA` on `from`, which
    /// may fail: (succeeded, stdout and stderr).
    fn try_migrate(&self, from: &str, to: &str, extra: &[&str]) -> (bool, String) {
        self.try_migrate_vm("web", from, to, extra)
    }

    /// [`Cluster::try_migrate`] for the VM `vm`.
    fn try_migrate_vm(&self, vm: &str, from: &str, to: &str, extra: &[&str]) -> (bool, String) {
        let mut args = vec!["vm", "migrate", vm, "--to", to, "--cluster", &self.name];
        args.extend_from_slice(extra);
        let out = spore_testkit::output(&mut self.cmd(from, &args));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn migration(&self, host: &str) -> Value {
        self.json(host, &["vm", "migration", "web", "--json"])
    }

    fn wait_phase(&self, host: &str, done: impl Fn(&Value) -> bool, what: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let m = self.migration(host);
            if done(&m) {
                return m;
            }
            assert!(Instant::now() < deadline, "{what}: {m}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Nothing of `vm` left on `host`: no VM, no disk, no RAM file.
    fn wait_gone(&self, host: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let vms = self.vms(host);
            let disks = self.json(host, &["disk", "ls", "--json"]);
            if vms.is_empty() && disks.as_array().is_some_and(|d| d.is_empty()) {
                break;
            }
            assert!(Instant::now() < deadline, "{host} kept {vms:?} / {disks}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn running_on(c: &Cluster, host: &str) -> Value {
    let vms = c.vms(host);
    assert_eq!(vms.len(), 1, "{host}: {vms:?}");
    assert_eq!(vms[0]["state"], "running", "{host}: {vms:?}");
    vms[0].clone()
}

/// A cluster whose hosts share a 400 Mbit/s link, and on node1 the VM
/// `web`, whose guest rewrites 48 MiB of memory as fast as it can, with
/// an 8 MiB data set written to its memory and disk: (cluster, the
/// data set's checksums).
fn busy_web(prefix: &str) -> (Cluster, (String, String)) {
    let c = cluster_with(prefix, &[], &["--bandwidth", "400mbit"]);
    let args = vm_run_args(guest(), "web", "guest", "spore.memload=48,0");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    c.ok("node1", &refs);
    let written = c.dataset("node1", "web", "write");
    assert_eq!(written.0, written.1, "memory and disk copies differ");
    (c, written)
}

/// `web` moved from `from` to `to` under `policy` (and `extra`): the
/// migration completed, the data set and the workload are intact at `to`,
/// `from` kept nothing. Returns the migration's report.
fn moves_intact(
    c: &Cluster,
    written: &(String, String),
    from: &str,
    to: &str,
    policy: &str,
    extra: &[&str],
) -> Value {
    let mut args = vec!["--policy", policy];
    args.extend_from_slice(extra);
    let m = c.migrate(from, to, &args);
    assert_eq!(m["phase"], "completed", "{policy}: {m}");
    // The cluster's hosts hold fleet certificates: QEMU's own stream is
    // carried in spore's TLS too (the decision log names the host).
    assert_eq!(m["stream_tls"], true, "{policy}: {m}");
    assert!(
        m["decisions"]
            .to_string()
            .contains("memory stream in spore's TLS"),
        "{m}"
    );
    assert!(m["downtime_ms"].as_f64().is_some(), "{m}");
    assert!(m["guest_stall_ms"].as_f64().is_some(), "{m}");
    assert!(
        m["disk_bytes"].as_u64().unwrap() >= 8 << 20,
        "the written dataset travelled: {m}"
    );
    assert!(m["ram_transferred"].as_u64().unwrap() > 48 << 20, "{m}");
    assert!(c.vms(from).is_empty(), "{from} kept the VM");
    let vm = running_on(c, to);
    assert!(vm["pid"].as_u64().is_some());
    assert_eq!(&c.dataset(to, "web", "check"), written, "after {policy}");
    // The guest's workload goes on at the destination.
    assert!(c.log(to, "web").contains("SPORE-DATASET-CHECK"));
    m
}

/// Did QEMU's migration enter post-copy? From the sampled timeline and
/// the policy's decisions.
fn went_postcopy(m: &Value) -> bool {
    let sampled = m["timeline"]
        .as_array()
        .is_some_and(|t| t.iter().any(|s| s["status"] == "postcopy-active"));
    sampled || m["decisions"].to_string().contains("switch to post-copy")
}

/// Cancelled before the switch: the source keeps running, the destination
/// keeps nothing. The cap (1 MB/s) holds for the disk's first pass too:
/// the memory copy starts once its bytes fit the cap.
#[test]
fn a_cancelled_migration_leaves_the_vm_at_the_source_and_nothing_at_the_destination() {
    let (c, written) = busy_web("mc");
    c.migrate(
        "node1",
        "node2",
        &["--policy", "precopy", "--detach", "--bandwidth", "8mbit"],
    );
    let m = c.wait_phase(
        "node1",
        |m| m["phase"] == "memory" && m["ram_transferred"].as_u64() > Some(1 << 20),
        "migration under way",
    );
    let disk = m["disk_bytes"].as_f64().unwrap();
    assert!(disk >= (8 << 20) as f64, "{m}");
    let memory_from = m["timeline"][0]["at_ms"].as_f64().unwrap();
    assert!(
        memory_from >= disk / 1e6 * 1e3,
        "{disk} disk bytes before {memory_from} ms: {m}"
    );
    c.ok("node1", &["vm", "migrate", "web", "--cancel"]);
    let m = c.wait_phase("node1", |m| m["phase"] != "memory", "cancelled");
    assert_eq!(m["phase"], "cancelled", "{m}");
    running_on(&c, "node1");
    c.wait_gone("node2");
    assert_eq!(c.dataset("node1", "web", "check"), written);
}

/// The destination's QEMU is killed before the switch: the migration
/// fails, the source keeps running, the destination keeps nothing.
#[test]
fn a_destination_that_dies_before_the_switch_leaves_the_vm_at_the_source() {
    let (c, written) = busy_web("md");
    c.migrate(
        "node1",
        "node2",
        &["--policy", "precopy", "--detach", "--bandwidth", "80mbit"],
    );
    c.wait_phase(
        "node1",
        |m| m["phase"] == "memory" && m["ram_transferred"].as_u64() > Some(4 << 20),
        "migration under way",
    );
    let dest = c.vms("node2");
    assert_eq!(dest[0]["state"], "incoming", "{dest:?}");
    let pid = dest[0]["pid"].as_u64().unwrap().to_string();
    sh(Command::new("kill").args(["-9", &pid]));
    let m = c.wait_phase("node1", |m| m["phase"] != "memory", "failed");
    assert_eq!(m["phase"], "failed", "{m}");
    running_on(&c, "node1");
    c.wait_gone("node2");
    assert_eq!(c.dataset("node1", "web", "check"), written);
}

/// `auto` there, `postcopy` back: memory and disk intact both ways.
#[test]
fn auto_and_postcopy_move_the_vm_there_and_back_intact() {
    let (c, written) = busy_web("ma");
    moves_intact(&c, &written, "node1", "node2", "auto", &[]);
    let m = moves_intact(&c, &written, "node2", "node1", "postcopy", &[]);
    assert!(went_postcopy(&m), "postcopy: {m}");
}

/// QEMU's auto-converge there, `auto --no-postcopy` back: both complete
/// without ever entering post-copy (the guest is throttled instead, when
/// the copy does not converge), memory and disk intact.
#[test]
fn auto_converge_and_auto_without_postcopy_move_the_vm_intact_without_post_copy() {
    let (c, written) = busy_web("mv");
    for (from, to, policy, extra) in [
        ("node1", "node2", "auto-converge", &[][..]),
        ("node2", "node1", "auto", &["--no-postcopy"][..]),
    ] {
        let m = moves_intact(&c, &written, from, to, policy, extra);
        assert!(!went_postcopy(&m), "{policy} {extra:?} went post-copy: {m}");
        eprintln!(
            "{policy} {extra:?}: {} passes, throttled to {}%, decisions {}",
            m["passes"], m["throttle_percent"], m["decisions"]
        );
    }
}

/// Pre-copy, with a data set written while memory is copied: 8 MiB of
/// disk in a second, more than a pass's share of the cap (a quarter of 10
/// MB/s), so passes hold blocks back for later ones; every block arrives.
#[test]
fn precopy_moves_every_block_of_a_data_set_written_during_it() {
    let (c, _) = busy_web("mp");
    c.migrate(
        "node1",
        "node2",
        &[
            "--policy",
            "precopy",
            "--max-downtime",
            "20000",
            "--bandwidth",
            "80mbit",
            "--detach",
        ],
    );
    c.wait_phase("node1", |m| m["phase"] == "memory", "memory copy");
    let written = c.dataset("node1", "web", "write");
    assert_eq!(written.0, written.1, "memory and disk copies differ");
    let m = c.wait_phase(
        "node1",
        |m| m["phase"] != "memory" && m["phase"] != "switching",
        "pre-copy done",
    );
    assert_eq!(m["phase"], "completed", "{m}");
    assert!(
        m["disk_bytes"].as_u64().unwrap() >= 16 << 20,
        "both data sets travelled: {m}"
    );
    eprintln!(
        "pre-copy with a data set written during it: {} disk bytes in {} passes, {} in the last",
        m["disk_bytes"], m["disk_passes"], m["disk_final_bytes"]
    );
    assert!(m["disk_passes"].as_u64().unwrap() >= 4, "{m}");
    assert!(c.vms("node1").is_empty(), "node1 kept the VM");
    running_on(&c, "node2");
    assert_eq!(c.dataset("node2", "web", "check"), written, "after precopy");
}

/// Starts a cluster of an origin and 2 nodes (name prefix `prefix`), the
/// demo guest imported at the origin.
fn cluster(prefix: &str, env: &[(&str, &str)]) -> Cluster {
    cluster_with(prefix, env, &[])
}

/// [`cluster`] with more arguments for `cluster up`.
fn cluster_with(prefix: &str, env: &[(&str, &str)], up: &[&str]) -> Cluster {
    let c = Cluster {
        dir: tempfile::tempdir().unwrap(),
        name: spore_testkit::unique_name(prefix),
    };
    let mut cmd = Command::new(SPORE);
    cmd.env("SPORE_CLUSTER_DIR", c.dir.path());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = sh(cmd
        .args(["cluster", "up", "--name", &c.name, "--nodes", "2"])
        .args(up));
    assert!(out.contains("origin + 2 nodes"), "{out}");
    c.ok(
        "origin",
        &[
            "image",
            "import",
            guest().rootfs.to_str().unwrap(),
            "--name",
            "guest",
        ],
    );
    c
}

/// The link breaks during post-copy (the guest runs on node1, part of its
/// memory is still on node2): the migration pauses and recovers once the
/// link is back. A trial that is not recovered must fail loudly, with both
/// sides' state, the source keeping its QEMU (it holds the only copy of the
/// memory not yet sent). The link breaks once the destination said its guest
/// runs (before, QEMU loses a broken post-copy: docs/migration.md). A second
/// trial runs after a loud failure, and the test fails unless one of two
/// recovers; it prints which way each went.
#[test]
fn post_copy_recovers_after_a_link_break() {
    let c = cluster("r", &[]);
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(c.dir.path().join(&c.name).join("cluster.json")).unwrap(),
    )
    .unwrap();
    let netns = state["nodes"][0]["netns"].as_str().unwrap().to_owned();
    let mut failures = Vec::new();
    for trial in 1..=2 {
        let args = vm_run_args(guest(), "web", "guest", "spore.memload=48,0");
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        c.ok("node2", &refs);
        let written = c.dataset("node2", "web", "write");
        c.migrate(
            "node2",
            "node1",
            &["--policy", "postcopy", "--bandwidth", "40mbit", "--detach"],
        );
        // Broken off before the destination runs the guest, a post-copy
        // is lost whatever anyone does (QEMU fails the destination, and
        // the source can neither resume nor cancel): the source does not
        // pause until then, and this test breaks the link after.
        c.wait_phase(
            "node2",
            |m| m["phase"] == "postcopy" && m["destination_runs_at_ms"].is_number(),
            "post-copy, the guest running at the destination",
        );
        sh(Command::new("ip").args(["-n", &netns, "link", "set", "eth0", "down"]));
        std::thread::sleep(Duration::from_secs(6));
        sh(Command::new("ip").args(["-n", &netns, "link", "set", "eth0", "up"]));
        let m = c.wait_phase("node2", |m| m["phase"] != "postcopy", "recovered");
        if m["phase"] == "completed" {
            eprintln!(
                "post-copy recovery: recovered (trial {trial}; earlier failures: {failures:?})"
            );
            assert!(m["decisions"].to_string().contains("recovered"), "{m}");
            assert_eq!(m["stream_tls"], true, "resumed in spore's TLS: {m}");
            running_on(&c, "node1");
            assert_eq!(c.dataset("node1", "web", "check"), written);
            return;
        }
        assert_eq!(m["phase"], "failed", "{m}");
        let e = m["error"].as_str().unwrap_or_default().to_owned();
        let src = c.vms("node2");
        let log = std::fs::read_to_string(c.dir.path().join(&c.name).join("node1.log"))
            .unwrap_or_default();
        eprintln!("post-copy recovery: FAILED (trial {trial}): {e}\nnode1's warnings:");
        for line in log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        {
            eprintln!("  node1: {line}");
        }
        assert!(e.contains("Source") && e.contains("Destination"), "{e}");
        assert_eq!(src[0]["state"], "failed", "{src:?}");
        assert!(src[0]["pid"].as_u64().is_some(), "{src:?}");
        failures.push(e);
        // The guest is lost; clear both sides for the next trial (the
        // destination lists its failed copy, with the reason).
        c.ok("node2", &["vm", "rm", "web", "--force"]);
        if !c.vms("node1").is_empty() {
            c.ok("node1", &["vm", "rm", "web", "--force"]);
        }
        c.wait_gone("node1");
        c.wait_gone("node2");
    }
    panic!("post-copy was not recovered in 2 trials (each failed loudly): {failures:?}");
}

/// The link breaks in post-copy while the destination has not said that
/// its guest runs (fail-point `migration-destination-silent`): the source
/// does not pause the stalled stream (a post-copy broken off before the
/// destination runs the guest is lost), and once the link is back the same
/// connection carries on and the migration completes, data set intact.
#[test]
fn post_copy_is_not_paused_before_the_destination_runs_the_guest() {
    let c = cluster("s", &[("SPORE_FAILPOINTS", "migration-destination-silent")]);
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(c.dir.path().join(&c.name).join("cluster.json")).unwrap(),
    )
    .unwrap();
    let netns = state["nodes"][0]["netns"].as_str().unwrap().to_owned();
    let args = vm_run_args(guest(), "web", "guest", "spore.memload=48,0");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    c.ok("node2", &refs);
    let written = c.dataset("node2", "web", "write");
    c.migrate(
        "node2",
        "node1",
        &["--policy", "postcopy", "--bandwidth", "40mbit", "--detach"],
    );
    c.wait_phase("node2", |m| m["phase"] == "postcopy", "post-copy");
    sh(Command::new("ip").args(["-n", &netns, "link", "set", "eth0", "down"]));
    std::thread::sleep(Duration::from_secs(6));
    sh(Command::new("ip").args(["-n", &netns, "link", "set", "eth0", "up"]));
    let m = c.wait_phase("node2", |m| m["phase"] != "postcopy", "post-copy over");
    assert_eq!(m["phase"], "completed", "{m}");
    let decisions = m["decisions"].to_string();
    assert!(decisions.contains("not pausing"), "{decisions}");
    assert!(!decisions.contains("pausing to recover"), "{decisions}");
    assert!(m["destination_runs_at_ms"].is_null(), "{m}");
    running_on(&c, "node1");
    assert_eq!(c.dataset("node1", "web", "check"), written);
}

/// The source's commit never reaches the destination (fail-point
/// `migration-commit-lost`): the source keeps its stopped copy and never
/// resumes it, and the destination, whose guest already runs, keeps it past
/// its deadline and adopts it, data set intact (it used to remove it, disk
/// and all, at the deadline).
#[test]
fn a_lost_commit_leaves_the_guest_running_at_the_destination() {
    let g = guest();
    let c = cluster("c", &[("SPORE_FAILPOINTS", "migration-commit-lost")]);
    let args = vm_run_args(g, "web", "guest", "");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    c.ok("node1", &refs);
    let written = c.dataset("node1", "web", "write");

    let (ok, text) = c.try_migrate(
        "node1",
        "node2",
        &["--policy", "precopy", "--timeout", "15"],
    );
    assert!(!ok, "the migration reported success: {text}");
    assert!(text.contains("did not commit"), "{text}");
    // The source never runs its copy again.
    let src = c.vms("node1");
    assert!(src.iter().all(|v| v["state"] != "running"), "{src:?}");

    // Past the destination's deadline (15 + 30 s) the guest is adopted.
    let deadline = Instant::now() + Duration::from_secs(120);
    let vm = loop {
        let vms = c.vms("node2");
        if let Some(v) = vms.first().filter(|v| {
            v["state"] == "running"
                && v["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("never committed"))
        }) {
            break v.clone();
        }
        assert!(
            Instant::now() < deadline,
            "node2 did not adopt the VM: {vms:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    assert_eq!(vm["name"], "web", "{vm}");
    assert_eq!(c.dataset("node2", "web", "check"), written);
}

/// The switch's transitions at `migrate-continue`, each driven by a
/// fail-point (docs/migration.md, "One running copy"): a failure in the
/// disk's first pass or before continue takes the VM back; once the switch is marked continued (here
/// without QEMU being told) the source asks the destination and resumes
/// only on its 404 (its QEMU killed: it has nothing), while a destination
/// that cannot say (its guest not running) leaves the source's copy paused
/// and recorded as not to be resumed. Never two running copies.
#[test]
fn a_migration_broken_off_is_taken_back_only_when_the_destination_has_nothing() {
    let g = guest();
    let c = cluster(
        "s",
        &[(
            "SPORE_FAILPOINTS",
            "migration-disk-first-pass=1,migration-before-continue=1,\
             migration-continue-withheld=2",
        )],
    );
    let args = vm_run_args(g, "web", "guest", "");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    c.ok("node1", &refs);
    let written = c.dataset("node1", "web", "write");

    // The disk's first pass fails: nothing was paused, taken back.
    let (ok, text) = c.try_migrate("node1", "node2", &["--policy", "precopy"]);
    assert!(!ok, "the migration reported success: {text}");
    assert!(text.contains("migration-disk-first-pass"), "{text}");
    running_on(&c, "node1");
    c.wait_gone("node2");
    assert_eq!(c.dataset("node1", "web", "check"), written);

    // Before continue: taken back at once.
    let (ok, text) = c.try_migrate("node1", "node2", &["--policy", "precopy"]);
    assert!(!ok, "the migration reported success: {text}");
    assert!(text.contains("migration-before-continue"), "{text}");
    running_on(&c, "node1");
    c.wait_gone("node2");
    assert_eq!(c.dataset("node1", "web", "check"), written);

    // Marked continued, QEMU never told: the source asks the destination
    // (which answers "not running" for now); its QEMU dies, it discards
    // the VM and answers 404: taken back.
    c.migrate(
        "node1",
        "node2",
        &["--policy", "precopy", "--timeout", "60", "--detach"],
    );
    c.wait_phase("node1", |m| m["phase"] == "switching", "switching");
    std::thread::sleep(Duration::from_secs(2));
    let dest = c.vms("node2");
    assert_eq!(dest[0]["state"], "incoming", "{dest:?}");
    let pid = dest[0]["pid"].as_u64().unwrap().to_string();
    sh(Command::new("kill").args(["-9", &pid]));
    let m = c.wait_phase("node1", |m| m["phase"] != "switching", "taken back");
    assert_eq!(m["phase"], "failed", "{m}");
    assert!(
        m["error"]
            .to_string()
            .contains("migration-continue-withheld"),
        "another failure than the withheld continue: {m}"
    );
    running_on(&c, "node1");
    c.wait_gone("node2");
    assert_eq!(c.dataset("node1", "web", "check"), written);

    // The same, the destination alive but unable to say that its guest
    // runs (it does not): the source's copy stays paused, recorded as not
    // to be resumed; nothing runs the guest twice.
    let (ok, text) = c.try_migrate(
        "node1",
        "node2",
        &["--policy", "precopy", "--timeout", "60"],
    );
    assert!(!ok, "the migration reported success: {text}");
    let src = c.vms("node1");
    assert_eq!(src[0]["state"], "failed", "{src:?}");
    assert!(
        src[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("must not be resumed")),
        "{src:?}"
    );
    let dest = c.vms("node2");
    assert!(
        dest.iter().all(|v| v["state"] != "running"),
        "the destination runs it too: {dest:?}"
    );
}

/// The destination holds a different image under the VM's image name: the
/// VM's disk is built on exactly the manifest it ran on (fetched by content
/// from the origin), not on what the name means there, so the guest's data
/// set and file system arrive intact (only the VM's own blocks move).
#[test]
fn a_vm_moves_onto_its_own_image_whatever_the_name_means_at_the_destination() {
    let g = guest();
    let c = cluster("p", &[]);
    // node2's own "guest": the same size, other bytes.
    let other = c.dir.path().join("other.raw");
    common::sparse_random_file(&other, std::fs::metadata(&g.rootfs).unwrap().len(), 99);
    c.ok(
        "node2",
        &[
            "image",
            "import",
            other.to_str().unwrap(),
            "--name",
            "guest",
        ],
    );
    let args = vm_run_args(g, "web", "guest", "");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    c.ok("node1", &refs);
    let written = c.dataset("node1", "web", "write");
    let m = c.migrate("node1", "node2", &["--policy", "precopy"]);
    assert_eq!(m["phase"], "completed", "{m}");
    running_on(&c, "node2");
    assert_eq!(c.dataset("node2", "web", "check"), written);
    // The file system the guest reads is the one it booted from.
    c.ok("node2", &["vm", "send", "web", "cat", "/etc/hostname"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = c.log("node2", "web");
        if log.contains("SPORE-FILE /etc/hostname") {
            assert!(!log.contains("EXT4-fs error"), "{log}");
            break;
        }
        assert!(Instant::now() < deadline, "no answer: {log}");
        std::thread::sleep(Duration::from_millis(300));
    }
    // A file the guest never read before the move: its bytes come from
    // the image underneath, which must be the one it booted from.
    let expect_file = c.dir.path().join("filler-000");
    sh(Command::new("debugfs").args([
        "-R",
        &format!("dump /data/filler-000 {}", expect_file.display()),
        g.rootfs.to_str().unwrap(),
    ]));
    let expect = sh(Command::new("sha256sum").arg(&expect_file));
    let expect = expect.split_whitespace().next().unwrap().to_owned();
    c.ok("node2", &["vm", "send", "web", "sum", "/data/filler-000"]);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let log = c.log("node2", "web");
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("SPORE-SUM /data/filler-000"))
        {
            assert!(
                line.ends_with(&expect),
                "other bytes under the guest: {line}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no answer: {log}");
        std::thread::sleep(Duration::from_millis(300));
    }
    // node2's own image under that name is untouched.
    let disks = c.json("node2", &["disk", "ls", "--json"]);
    let theirs = c.json("node2", &["image", "inspect", "guest", "--json"]);
    assert_ne!(
        disks[0]["manifest"], theirs["manifest"],
        "{disks} / {theirs}"
    );
}

/// The source's job breaks right after it told QEMU to finish the switch
/// (fail-point `migration-after-continue`): the guest may already run at
/// the destination, so the source asks it instead of resuming its own copy
/// (it used to resume it: two running copies). Exactly one copy runs, at
/// the destination, with its data set.
#[test]
fn a_switch_that_breaks_off_leaves_exactly_one_running_copy() {
    let g = guest();
    let c = cluster("s", &[("SPORE_FAILPOINTS", "migration-after-continue")]);
    let args = vm_run_args(g, "web", "guest", "");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    c.ok("node1", &refs);
    let written = c.dataset("node1", "web", "write");
    let (ok, text) = c.try_migrate("node1", "node2", &["--policy", "precopy", "--json"]);
    assert!(ok, "{text}");
    assert!(text.contains("the move completed"), "{text}");
    c.wait_gone("node1");
    running_on(&c, "node2");
    assert_eq!(c.dataset("node2", "web", "check"), written);
}

/// Moves `vm` from `from` to `to` with `policy` (pre-copy, post-copy or
/// auto) and checks it there: completed, the guest running at `to` with
/// the data set `written` (memory and disk), nothing of it left at `from`,
/// and its identity (MAC, hostname) and clone group kept.
fn moves_with_its_identity(
    c: &Cluster,
    vm: &str,
    written: &(String, String),
    (from, to): (&str, &str),
    policy: &str,
    grown: bool,
) -> Value {
    let before = c
        .vms(from)
        .into_iter()
        .find(|v| v["name"] == vm)
        .unwrap_or_else(|| panic!("{vm} not on {from}"));
    let mut args = vec![
        "vm",
        "migrate",
        vm,
        "--to",
        to,
        "--cluster",
        &c.name,
        "--json",
        "--policy",
        policy,
    ];
    if policy == "postcopy" && !grown {
        // A downtime no pre-copy meets: the guest's light memory load
        // (spore.memload) keeps pages dirty, so the move switches to
        // post-copy after the first pass instead of completing in it.
        args.extend(["--max-downtime", "1"]);
    }
    let m = c.json(from, &args);
    assert_eq!(m["phase"], "completed", "{vm} ({policy}): {m}");
    if grown && policy != "precopy" {
        // Under TCG a grown VM never goes post-copy (it corrupted them).
        assert!(!went_postcopy(&m), "{vm}: {m}");
        assert!(
            m["decisions"]
                .to_string()
                .contains("no post-copy for this VM"),
            "{vm}: {m}"
        );
    } else if policy == "postcopy" {
        assert!(went_postcopy(&m), "{vm}: {m}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.vms(from).iter().any(|v| v["name"] == vm) {
        assert!(
            Instant::now() < deadline,
            "{from} kept {vm}: {:?}",
            c.vms(from)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = c
        .vms(to)
        .into_iter()
        .find(|v| v["name"] == vm)
        .unwrap_or_else(|| panic!("{vm} not on {to}"));
    assert_eq!(after["state"], "running", "{after}");
    for field in ["mac", "hostname", "instance_id", "vmgenid", "group"] {
        assert_eq!(after[field], before[field], "{vm}: {field}: {after}");
    }
    assert_eq!(&c.dataset(to, vm, "check"), written, "{vm} after {policy}");
    m
}

/// A guest that never answers spore's channel (`spore.nochannel`: like a
/// stock distribution) migrates without anyone waiting for it: the
/// destination's log has no channel timeout, the guest's stall is reported
/// unknown beside QEMU's downtime, and the guest runs on at the destination
/// (its counter goes on).
#[test]
fn a_guest_without_the_channel_migrates_without_waiting_for_it() {
    let c = cluster("n", &[]);
    let args = vm_run_args(guest(), "web", "guest", "spore.nochannel spore.counter");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    c.ok("node1", &refs);
    let counted = |host: &str| c.log(host, "web").matches("SPORE-COUNTER").count();
    let deadline = Instant::now() + Duration::from_secs(120);
    while counted("node1") < 2 {
        assert!(Instant::now() < deadline, "{}", c.log("node1", "web"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let m = c.migrate("node1", "node2", &["--policy", "precopy"]);
    assert_eq!(m["phase"], "completed", "{m}");
    assert!(m["guest_stall_ms"].is_null(), "{m}");
    assert!(m["downtime_ms"].as_f64().is_some(), "{m}");
    assert!(
        m["decisions"]
            .to_string()
            .contains("does not answer spore's channel"),
        "{m}"
    );
    let log =
        std::fs::read_to_string(c.dir.path().join(&c.name).join("node2.log")).unwrap_or_default();
    assert!(
        !log.contains("did not answer on spore's channel"),
        "the destination waited for the channel: {log}"
    );
    let at = counted("node2");
    let deadline = Instant::now() + Duration::from_secs(60);
    while counted("node2") < at + 2 {
        assert!(Instant::now() < deadline, "{}", c.log("node2", "web"));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A VM that arrived by a live migration can be captured (its QEMU kept
/// `postcopy-ram` from the migration, which QEMU refuses beside the
/// capture's `x-ignore-shared`), and a VM captured as a template and
/// resumed from it (the default of `vm template`) moves with every policy:
/// its QEMU kept `x-ignore-shared` on from loading its device state, which
/// QEMU refuses post-copy with and which made the destination fail a
/// pre-copy; its whole RAM now moves.
#[test]
fn a_captured_vm_migrates_with_every_policy() {
    let g = guest();
    let c = cluster("x", &[]);
    let args = vm_run_args(g, "web", "guest", "spore.memload=32,8");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    c.ok("node1", &refs);
    let written = c.dataset("node1", "web", "write");
    moves_with_its_identity(&c, "web", &written, ("node1", "node2"), "auto", false);
    c.ok("node2", &["vm", "template", "web", "--name", "t"]);
    running_on(&c, "node2");
    let written = c.dataset("node2", "web", "write");
    for (policy, hop) in [
        ("precopy", ("node2", "node1")),
        ("postcopy", ("node1", "node2")),
        ("auto", ("node2", "node1")),
    ] {
        moves_with_its_identity(&c, "web", &written, hop, policy, false);
    }
    c.ok("node1", &["vm", "rm", "web", "--force"]);
}

/// Clones move, each with every policy: one born as a standby, a fresh
/// one, and one started on a host that had none of its template (its RAM
/// paged in from the origin). Each keeps its identity and group, its data set checks out
/// after each move, and its source keeps nothing.
#[test]
fn clones_of_every_kind_migrate_with_every_policy() {
    let g = guest();
    let c = cluster_with("k", &[], &["--agent-args", "--clone-standby 1"]);
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(c.dir.path().join(&c.name).join("cluster.json")).unwrap(),
    )
    .unwrap();
    let origin = format!("https://{}:7070", state["origin"]["ip"].as_str().unwrap());
    // Clones inherit the light memory load: their pages stay dirty.
    let args = vm_run_args(g, "web", "guest", "spore.memload=32,8");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    c.ok("node1", &refs);
    c.ok("node1", &["vm", "template", "web", "--name", "t"]);
    c.ok("node1", &["template", "push", "t", "--to", &origin]);
    // The standby made for `t` on node1 is handed out to the first clone.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !c.vms("node1").iter().any(|v| v["state"] == "standby") {
        assert!(
            Instant::now() < deadline,
            "no standby: {:?}",
            c.vms("node1")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let standby_born = c.json("node1", &["vm", "clone", "t", "--name", "sb", "--json"]);
    assert_eq!(
        standby_born["vms"][0]["start_ms"]["standby"], true,
        "{standby_born}"
    );
    c.ok("node1", &["vm", "clone", "t", "--name", "fresh"]);
    // node2 has nothing of `t`: it pages the template in from the origin.
    c.ok("node2", &["vm", "clone", "t", "--name", "cold"]);
    // A grown clone (hot-plugged memory and CPUs) is not among them yet:
    // its moves passed in some trials and left the guest unresponsive in
    // others (docs/migration.md, Limits); the migrate-every-VM issue keeps
    // it open.
    let cases = [
        ("sb-1", "node1", "node2"),
        ("fresh-1", "node1", "node2"),
        ("cold-1", "node2", "node1"),
    ];
    for (vm, there, back) in cases {
        let written = c.dataset(there, vm, "write");
        for (policy, hop) in [
            ("precopy", (there, back)),
            ("postcopy", (back, there)),
            ("auto", (there, back)),
        ] {
            moves_with_its_identity(&c, vm, &written, hop, policy, false);
        }
    }
}
