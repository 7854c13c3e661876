//! Clones and standbys that fail half-way (fail-points `clone-start` and
//! `standby-refill`, set in the agent's environment, hence a binary of its
//! own) leave nothing behind but what `vm ls` shows: no QEMU, no stray
//! disk, no standby; the template and its source are untouched.

mod common;

use common::{guest, vm_run_args, TestAgent};

#[test]
fn failed_clones_and_standbys_leave_nothing_behind() {
    // SAFETY: this binary's only test sets it before any agent starts.
    unsafe { std::env::set_var("SPORE_FAILPOINTS", "clone-start,standby-refill") };
    let t = TestAgent::start_with(&["--clone-standby", "1"]);
    t.import_guest("base");
    let args = vm_run_args(guest(), "src", "base", "quiet");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    t.ok(&refs);
    t.ok(&["vm", "template", "src", "--name", "t"]);
    let err = t.fails(&["vm", "clone", "t", "--name", "c", "--count", "2"]);
    assert!(err.contains("clone-start"), "{err}");
    // Give the standby refill its (failing) try.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let vms = t.json(&["vm", "ls", "--json"]);
    let vms = vms.as_array().unwrap();
    // The source runs; the failed clones are listed as failed, each with
    // its own disk and nothing running; no standby exists.
    let src = vms
        .iter()
        .find(|v| v["name"] == "src")
        .expect("source listed");
    assert_eq!(src["state"], "running", "{src}");
    for v in vms.iter().filter(|v| v["name"] != "src") {
        assert_eq!(v["state"], "failed", "{v}");
        assert!(v["pid"].is_null(), "{v}");
        assert!(!v["name"].as_str().unwrap().starts_with("standby-"), "{v}");
    }
    let disks = t.json(&["disk", "ls", "--json"]);
    let disk_names: Vec<&str> = disks
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    let vm_disks: Vec<&str> = vms.iter().map(|v| v["disk"].as_str().unwrap()).collect();
    for d in &disk_names {
        assert!(vm_disks.contains(d), "disk {d} belongs to no VM: {disks}");
    }
    // Only the source's QEMU runs.
    assert_eq!(t.qemu_count(), 1);
    // Failed clones go with vm rm; the template is whole.
    t.ok(&["vm", "rm", "--group", "c"]);
    assert_eq!(t.json(&["template", "inspect", "t", "--json"])["name"], "t");
    t.ok(&["vm", "rm", "src", "--force"]);
    t.ok(&["template", "rm", "t"]);
    assert_eq!(
        t.json(&["disk", "ls", "--json"]).as_array().unwrap().len(),
        0
    );
}
