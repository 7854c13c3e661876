//! A post-copy migration goes on through a kill -9 of either agent: once
//! the guest runs at the destination, part of its memory exists only at the
//! source, and an agent restart on either side must neither lose the guest
//! nor leave it frozen. (Its own test binary: the restart tests set
//! stall-points in the environment, which these agents must not see.)

mod common;

use std::time::{Duration, Instant};

use common::{assert_fsck_clean, dataset, recovered, run_vm, vm_pid, TestAgent};
use serde_json::Value;

/// Starts a post-copy migration of `vm` from `t` to the agent on `port`,
/// slow enough (40 Mbit/s) to kill an agent in it, and waits until the
/// guest runs at the destination with memory still to come.
fn start_postcopy(t: &TestAgent, vm: &str, port: u16) {
    let to = format!("https://127.0.0.1:{port}");
    t.ok(&[
        "vm",
        "migrate",
        vm,
        "--to",
        &to,
        "--policy",
        "postcopy",
        "--bandwidth",
        "40mbit",
        "--detach",
    ]);
    let m = wait_migration(
        t,
        vm,
        |m| m["phase"] == "postcopy" && m["destination_runs_at_ms"].is_number(),
        "post-copy with the guest running at the destination",
    );
    assert!(
        m["ram_remaining"].as_u64().unwrap_or(0) > 0,
        "nothing left to move: {m}"
    );
}

fn wait_migration(t: &TestAgent, vm: &str, done: impl Fn(&Value) -> bool, what: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let m = t.json(&["vm", "migration", vm, "--json"]);
        if done(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "{what}: {m}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The migration of `vm` from `t` ended; it must have completed.
fn completed(t: &TestAgent, vm: &str) -> Value {
    let m = wait_migration(
        t,
        vm,
        |m| !matches!(m["phase"].as_str(), Some("postcopy" | "switching")),
        "the migration ends",
    );
    assert_eq!(m["phase"], "completed", "{m}");
    m
}

fn vm_names(t: &TestAgent) -> Vec<String> {
    t.json(&["vm", "ls", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect()
}

/// A to B with B (the destination) killed during post-copy: A recovers the
/// stream into B's next agent, which took the arriving VM over. Then B to
/// A with B (now the source) killed during post-copy: B's next agent
/// resumes the migration and finishes it. After each, the guest runs at
/// the destination with its memory and disk data set intact, the source
/// has nothing left of it, and fsck is clean on both hosts.
#[test]
fn post_copy_goes_on_through_a_kill_9_of_either_agent() {
    let (a, port_a) = TestAgent::start_listening(&["--accept-migrations"]);
    let url_a = format!("https://127.0.0.1:{port_a}");
    let (mut b, port_b) = TestAgent::start_listening(&["--origin", &url_a, "--accept-migrations"]);
    a.import_guest("base");
    run_vm(&a, "v", "quiet spore.memload=48,0");
    let written = dataset(|args| a.ok(args), "v", "write");

    // The destination killed.
    start_postcopy(&a, "v", port_b);
    b.crash_and_restart();
    let r = recovered(&b);
    assert!(r.contains("vm v: runs here while its post-copy"), "{r}");
    let m = completed(&a, "v");
    assert!(m["decisions"].to_string().contains("recovered"), "{m}");
    assert!(
        vm_names(&a).is_empty(),
        "the source kept {:?}",
        vm_names(&a)
    );
    vm_pid(&b, "v");
    assert_eq!(dataset(|args| b.ok(args), "v", "check"), written);
    assert_fsck_clean(&a, "on the source after the destination was killed");
    assert_fsck_clean(&b, "on the destination after it was killed");

    // The source killed.
    start_postcopy(&b, "v", port_a);
    b.crash_and_restart();
    let r = recovered(&b);
    assert!(
        r.contains("its migration to") && r.contains("resumed"),
        "{r}"
    );
    let m = completed(&b, "v");
    assert!(m["decisions"].to_string().contains("taken over"), "{m}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !vm_names(&b).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the source kept {:?}",
            vm_names(&b)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    vm_pid(&a, "v");
    assert_eq!(dataset(|args| a.ok(args), "v", "check"), written);
    assert_fsck_clean(&a, "on the destination after the source was killed");
    assert_fsck_clean(&b, "on the source after it was killed");
    a.ok(&["vm", "rm", "v", "--force"]);
}
