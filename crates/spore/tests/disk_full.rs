//! A full disk costs a pause, never data: a guest writing more than its
//! host's data directory holds is paused by QEMU (the agent answers the
//! write with NBD_ENOSPC, and QEMU's `werror` stops the VM), the agent says
//! so in `vm ls` and keeps serving (another VM on the host runs on and
//! answers), and once space is freed it resumes the VM by itself; the
//! guest's write then completes and reads back intact.

mod common;

use std::time::{Duration, Instant};

use common::{fill_leaving, guest, sh, vm_run_args, TestAgent};

/// The (mem, disk) checksums on the last whole `marker` line of `log`.
fn sums(log: &str, marker: &str) -> (String, String) {
    let line = log.rsplit(marker).next().unwrap().lines().next().unwrap();
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_default()
            .to_owned()
    };
    (field("mem="), field("disk="))
}

#[test]
fn a_full_disk_pauses_the_vm_and_freed_space_resumes_it_with_its_data() {
    let t = TestAgent::start_on_tmpfs(1024, &[]);
    t.import_guest("base");
    for vm in ["full", "other"] {
        let args = vm_run_args(guest(), vm, "base", "");
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        t.ok(&refs);
    }
    let vm = |name: &str| {
        let vms = t.json(&["vm", "ls", "--json"]);
        vms.as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no vm {name}: {vms}"))
            .clone()
    };

    // 16 MiB left; the guest writes 48.
    let filler = fill_leaving(&t.data_dir(), 16 << 20);
    t.ok(&["vm", "send", "full", "dataset", "write", "48"]);

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let vms = vm("full");
        if vms["paused"] == "disk full" {
            assert_eq!(vms["state"], "running", "{vms}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the VM was not reported paused for a full disk: {vms}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(t.ok(&["vm", "ls"]).contains("paused (disk full)"));
    // The agent goes on serving (the other VM, its API, the image's
    // export), and the guest is held mid-write.
    t.ok(&["vm", "send", "other", "ping", "1"]);
    t.wait_console("other", "SPORE-PONG 1", 60);
    let other = vm("other");
    assert!(
        other["state"] == "running" && other["paused"].is_null(),
        "{other}"
    );
    t.ok(&["image", "inspect", "base"]);
    sh(std::process::Command::new("nbdinfo").arg(t.uri("image/base")));
    std::thread::sleep(Duration::from_secs(2));
    let log = t.ok(&["vm", "log", "full"]);
    assert!(
        !log.contains("SPORE-DATASET "),
        "the write finished on a full disk: {log}"
    );

    // Space is freed: the VM resumes by itself and its write completes.
    std::fs::remove_file(&filler).unwrap();
    let log = t.wait_console("full", "SPORE-DATASET ", 180);
    let (mem, disk) = sums(&log, "SPORE-DATASET ");
    assert!(
        !mem.is_empty() && mem == disk,
        "the disk copy differs: {log}"
    );
    let full = vm("full");
    assert!(full["paused"].is_null(), "{full}");

    // From the disk itself, caches dropped: the same bytes.
    t.ok(&["vm", "send", "full", "dataset", "check"]);
    let log = t.wait_console("full", "SPORE-DATASET-CHECK ", 120);
    assert_eq!(sums(&log, "SPORE-DATASET-CHECK ").1, disk, "{log}");
    // The stores stayed consistent through the failed writes.
    let out = t.ok(&["fsck"]);
    assert!(out.contains("clean"), "{out}");
    t.ok(&["vm", "rm", "full", "--force"]);
    t.ok(&["vm", "rm", "other", "--force"]);
}
