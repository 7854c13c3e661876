//! Agent restarts keep VMs: a guest writing and verifying its disk runs on
//! through restarts (SIGTERM and SIGKILL), and an agent killed in the
//! middle of an operation has it finished or rolled back by its next start.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{assert_fsck_clean, recovered, run_vm, vm_pid, TestAgent};

/// The `SPORE-IO` lines of the guest's console: (ops, max_ms, errors, bad).
fn io_lines(t: &TestAgent, vm: &str) -> Vec<(u64, u64, u64, u64)> {
    spore_bench::restart::spore_io_lines(&t.data_dir().join("vms").join(vm).join("serial.log"))
}

/// Waits until the guest has reported `n` more `SPORE-IO-VERIFIED` passes
/// than `before` (a full read-back of every block it wrote).
fn verified_passes(t: &TestAgent, vm: &str) -> usize {
    std::fs::read_to_string(t.data_dir().join("vms").join(vm).join("serial.log"))
        .unwrap_or_default()
        .matches("SPORE-IO-VERIFIED")
        .count()
}

fn wait_verified(t: &TestAgent, vm: &str, before: usize, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while verified_passes(t, vm) < before + n {
        assert!(
            Instant::now() < deadline,
            "the guest's I/O loop verified no new pass in 120 s: {:?}",
            io_lines(t, vm).last()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A guest reading and writing its disk without pause (direct I/O, never
/// flushed, every byte checked) through five agent restarts, SIGTERM and
/// SIGKILL alternating: the VM keeps its QEMU, every write acknowledged
/// before a restart reads back after it, the guest sees no I/O error, and
/// `spore fsck` is clean after each restart.
///
/// The VM is booted by an agent built from an earlier commit
/// (scripts/previous-spore.sh), and the first restart is onto this tree's
/// binary: an upgrade. The QEMU, its command line, the VM's records and the
/// socket holder are the old version's, and the new agent takes them over.
#[test]
fn a_guest_writing_and_verifying_runs_on_through_five_agent_restarts() {
    let old = common::previous_spore();
    let mut t = TestAgent::start_binary(&old);
    let agent_exe = |t: &TestAgent| {
        std::fs::read_link(format!("/proc/{}/exe", t.agent.as_ref().unwrap().pid())).unwrap()
    };
    assert_eq!(agent_exe(&t), old.canonicalize().unwrap());
    t.import_guest("base");
    let pid = run_vm(&t, "io", "quiet spore.ioloop=512");
    wait_verified(&t, "io", 0, 1);
    for round in 1..=5 {
        let kill = round % 2 == 0;
        let before = verified_passes(&t, "io");
        if kill {
            t.crash_and_restart();
        } else {
            t.restart();
        }
        assert_eq!(
            agent_exe(&t),
            Path::new(common::SPORE).canonicalize().unwrap(),
            "round {round}: not this tree's agent"
        );
        assert_eq!(vm_pid(&t, "io"), pid, "round {round}: not the same QEMU");
        let r = recovered(&t);
        assert!(r.contains("vm io: kept running"), "round {round}: {r}");
        // Two full passes: every block written before the restart, and
        // after it, read back as written.
        wait_verified(&t, "io", before, 2);
        assert_fsck_clean(&t, &format!("after restart {round}"));
    }
    let lines = io_lines(&t, "io");
    let (ops, _, errors, bad) = *lines.last().expect("SPORE-IO lines");
    assert!(ops > 1000, "{lines:?}");
    assert_eq!(
        (errors, bad),
        (0, 0),
        "the guest saw I/O errors or bad data"
    );
    let log = std::fs::read_to_string(t.data_dir().join("vms/io/serial.log")).unwrap();
    assert!(!log.contains("SPORE-IO-BAD") && !log.contains("SPORE-IO-ERROR"));
    assert!(!log.contains("VERIFIED") || !log.contains("bad=1"));
    // The stalls the guest saw: the longest in any second (for the record;
    // the benchmark measures them).
    let worst = lines.iter().map(|l| l.1).max().unwrap();
    println!("longest guest I/O stall across 5 restarts: {worst} ms");
}

/// The log of the agent `t` runs (it says when a stall-point is reached).
fn agent_log(t: &TestAgent) -> String {
    std::fs::read_to_string(t.data_dir().with_extension("agent.log")).unwrap_or_default()
}

/// Runs `spore ARGS` against the agent of `on` in the background until
/// agent `t` stalls at `point`, then kills `t` (SIGKILL) and starts it
/// again. The command must fail (an agent died under it).
fn kill_at(t: &mut TestAgent, point: &str, on: &Path, args: &[&str]) {
    let marker = format!("stall-point {point} reached");
    let seen = agent_log(t).matches(&marker).count();
    let dir = on.to_owned();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let cmd = std::thread::spawn(move || {
        std::process::Command::new(common::SPORE)
            .arg("--data-dir")
            .arg(&dir)
            .args(&args)
            .output()
            .unwrap()
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    while agent_log(t).matches(&marker).count() == seen {
        assert!(
            Instant::now() < deadline,
            "{point} not reached: {}",
            agent_log(t)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    t.crash_and_restart();
    let out = cmd.join().unwrap();
    assert!(
        !out.status.success(),
        "the command finished although its agent was killed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn ping(t: &TestAgent, vm: &str, n: u32) {
    t.ok(&["vm", "send", vm, "ping", &n.to_string()]);
    t.wait_console(vm, &format!("SPORE-PONG {n}"), 60);
}

/// kill -9 of an agent during a disk commit, a template capture, an image
/// pull, a migration (the destination killed, then the source), a push and
/// a garbage collection, each
/// followed by a start: the commit and the capture are rolled back (no
/// image, no template, the paused VM runs again, the chunks they wrote
/// collected), the pull finishes, the interrupted migration leaves the VM
/// running on its source, the push is reported and runs again, the
/// collection is finished; no VM is lost and `spore fsck` is clean on both
/// hosts after each.
#[test]
fn kill_9_during_commit_capture_pull_migration_both_ways_push_and_gc() {
    // Read by the agents this test starts (each point holds once per
    // agent process).
    // SAFETY: this test binary's other test starts its agents without
    // operations that reach these points.
    unsafe {
        std::env::set_var(
            "SPORE_STALLPOINTS",
            "commit-layer,capture-paused,pull-fetching,migration-incoming-blocks,migration-outgoing-active",
        )
    };
    let (mut a, port_a) = TestAgent::start_listening(&[]);
    let url_a = format!("https://127.0.0.1:{port_a}");
    let (mut b, port_b) =
        TestAgent::start_listening(&["--origin", &url_a, "--accept-migrations", "--accept-push"]);
    a.import_guest("base");
    let pid = run_vm(&a, "v", "quiet spore.ioloop=128");
    wait_verified(&a, "v", 0, 1);

    // A commit: its layer written, its name not yet recorded.
    let dir_a = a.data_dir();
    kill_at(
        &mut a,
        "commit-layer",
        &dir_a,
        &["disk", "commit", "v", "--name", "snap"],
    );
    assert_eq!(vm_pid(&a, "v"), pid);
    let r = recovered(&a);
    assert!(r.contains("vm v: kept running"), "{r}");
    assert!(
        r.contains("left by operations the previous agent did not finish"),
        "{r}"
    );
    assert!(a.fails(&["image", "inspect", "snap"]).contains("snap"));
    ping(&a, "v", 1);
    assert_fsck_clean(&a, "after a commit was killed");

    // A capture: the source paused, its state saved.
    kill_at(
        &mut a,
        "capture-paused",
        &dir_a,
        &["vm", "template", "v", "--name", "t1"],
    );
    assert_eq!(vm_pid(&a, "v"), pid);
    let r = recovered(&a);
    assert!(r.contains("was resumed"), "{r}");
    assert!(a.fails(&["template", "inspect", "t1"]).contains("t1"));
    ping(&a, "v", 2);
    let before = verified_passes(&a, "v");
    wait_verified(&a, "v", before, 1);
    assert_fsck_clean(&a, "after a capture was killed");

    // A pull on B: some chunks fetched.
    let dir_b = b.data_dir();
    kill_at(&mut b, "pull-fetching", &dir_b, &["image", "pull", "base"]);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = b.run(&["fsck", "--json"]);
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if r["clean"] == true && r["not_fetched"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the pull did not finish: {r}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // A migration from A to B: B killed at the first blocks.
    let migrate_to = |port: u16| -> Vec<String> {
        ["vm", "migrate", "v", "--to"]
            .map(String::from)
            .into_iter()
            .chain([format!("https://127.0.0.1:{port}")])
            .collect()
    };
    let args = migrate_to(port_b);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    kill_at(&mut b, "migration-incoming-blocks", &dir_a, &refs);
    let r = recovered(&b);
    assert!(r.contains("an incoming migration was interrupted"), "{r}");
    let on_b = b.json(&["vm", "ls", "--json"]);
    assert_eq!(on_b.as_array().unwrap().len(), 0, "{on_b}");
    assert_eq!(vm_pid(&a, "v"), pid, "the source lost its VM");
    ping(&a, "v", 3);
    assert_fsck_clean(&a, "on the source after the destination was killed");
    assert_fsck_clean(&b, "on the destination after it was killed");

    // A migration from A to B again: now A, the source, is killed while its
    // QEMU streams the guest's RAM. The VM stays on A, in the same QEMU,
    // running (QEMU's migration fails with the relay gone); B drops the
    // half-arrived VM by itself. B restarts first without its stall-point
    // (each holds once per agent process).
    // SAFETY: as above.
    unsafe { std::env::set_var("SPORE_STALLPOINTS", "migration-outgoing-active") };
    b.restart();
    // (its peer listener took another free port)
    let port_b = b.listen_port();
    let args = migrate_to(port_b);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    kill_at(&mut a, "migration-outgoing-active", &dir_a, &refs);
    assert_eq!(vm_pid(&a, "v"), pid, "the source lost its VM");
    let r = recovered(&a);
    assert!(r.contains("vm v: kept running"), "{r}");
    ping(&a, "v", 4);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !b
        .json(&["vm", "ls", "--json"])
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the destination kept the half-arrived VM: {}",
            b.json(&["vm", "ls", "--json"])
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let before = verified_passes(&a, "v");
    wait_verified(&a, "v", before, 1);
    assert_fsck_clean(&a, "on the source after it was killed");
    assert_fsck_clean(&b, "on the destination after its source was killed");

    // A push from A to B, killed after its first batch: the next start says
    // so, and the push run again completes.
    a.ok(&["disk", "commit", "v", "--name", "snap2"]);
    // SAFETY: as above.
    unsafe { std::env::set_var("SPORE_STALLPOINTS", "push-sending") };
    a.restart();
    // SAFETY: as above; the next agent must not hold the push run again.
    unsafe { std::env::set_var("SPORE_STALLPOINTS", "") };
    let to_b = format!("https://127.0.0.1:{port_b}");
    kill_at(
        &mut a,
        "push-sending",
        &dir_a,
        &["image", "push", "snap2", "--to", &to_b],
    );
    let r = recovered(&a);
    assert!(
        r.contains(&format!("image push snap2 to {to_b} was cut short")),
        "{r}"
    );
    a.ok(&["image", "push", "snap2", "--to", &to_b]);
    assert_fsck_clean(&a, "after a push was killed");

    // A garbage collection killed after its first chunk: the next start
    // (after an unclean exit) finishes it.
    // SAFETY: as above.
    unsafe { std::env::set_var("SPORE_STALLPOINTS", "gc-sweeping") };
    a.restart();
    // SAFETY: as above; the next agent must not hold its own collection.
    unsafe { std::env::set_var("SPORE_STALLPOINTS", "") };
    kill_at(&mut a, "gc-sweeping", &dir_a, &["image", "rm", "snap2"]);
    let r = recovered(&a);
    assert!(
        r.contains("left by operations the previous agent did not finish"),
        "{r}"
    );
    assert!(a.fails(&["image", "inspect", "snap2"]).contains("snap2"));
    assert_eq!(vm_pid(&a, "v"), pid, "the VM was lost");
    assert_fsck_clean(&a, "after a collection was killed");
    ping(&a, "v", 5);

    let lines = io_lines(&a, "v");
    let (_, _, errors, bad) = *lines.last().unwrap();
    assert_eq!((errors, bad), (0, 0), "{lines:?}");
}
