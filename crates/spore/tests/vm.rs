//! VMs: the demo guest booting from spore over NBD.

mod common;

use common::{guest, vm_run_args, TestAgent};

fn run_vm(t: &TestAgent, name: &str, image: &str, append: &str) -> String {
    let args = vm_run_args(guest(), name, image, append);
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    t.ok(&args)
}

#[test]
fn the_uncompressed_kernel_boots_directly_with_the_fast_options_under_the_longest_name() {
    // guest/build.sh extracts vmlinux (PVH entry) from vmlinuz; QEMU boots
    // it without decompression, and the crypto self-tests are skipped.
    let g = guest();
    assert!(g.vmlinux.exists(), "guest/build.sh made no vmlinux");
    let t = TestAgent::start();
    t.import_guest("base");
    // The longest name a VM may have: its sockets' paths are longer than a
    // socket address holds (QEMU is given them relative to the VM's
    // directory, the agent connects through the directory's descriptor).
    let name = format!("fast-{}", "x".repeat(123));
    assert!(
        t.data_dir()
            .join("vms")
            .join(&name)
            .join("channel.sock")
            .as_os_str()
            .len()
            > 108
    );
    let mut args = vm_run_args(g, &name, "base", "quiet cryptomgr.notests");
    let kernel = args.iter().position(|a| a == "--kernel").unwrap() + 1;
    args[kernel] = g.vmlinux.display().to_string();
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let out = t.ok(&args);
    assert!(out.contains("SPORE-READY uptime="), "{out}");
    t.ok(&["vm", "send", &name, "ping", "3"]);
    t.ok(&["vm", "rm", &name, "--force"]);
}

#[test]
fn extracting_vmlinux_refuses_what_is_not_a_kernel() {
    let g = guest();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("vmlinux");
    let truncated = dir.path().join("cut");
    let image = std::fs::read(&g.kernel).unwrap();
    std::fs::write(&truncated, &image[..image.len() / 2]).unwrap();
    for input in [&g.initrd, &truncated] {
        let st = std::process::Command::new("python3")
            .arg(root.join("guest/tools/extract-vmlinux.py"))
            .arg(input)
            .arg(&out)
            .output()
            .unwrap();
        assert_eq!(st.status.code(), Some(2), "{input:?}: {st:?}");
        assert!(!out.exists());
    }
}

#[test]
fn guest_boots_from_an_image_and_from_a_committed_layer() {
    let t = TestAgent::start();
    t.import_guest("base");

    // First VM: boots, writes a file from inside the guest, powers off.
    let out = run_vm(
        &t,
        "builder",
        "base",
        "spore.write=/etc/layer.txt=made-by-a-vm spore.poweroff",
    );
    assert!(out.contains("SPORE-READY uptime="), "{out}");
    // Wait for the power-off to land.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let vms = t.json(&["vm", "ls", "--json"]);
        if vms[0]["state"] == "stopped" {
            assert_eq!(vms[0]["reason"], "the guest shut down");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "guest did not power off: {vms}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // The VM's disk cannot be removed on its own; its image is in use.
    assert!(t
        .fails(&["disk", "rm", "builder"])
        .contains("in use by vm builder"));
    assert!(t
        .fails(&["image", "rm", "base"])
        .contains("in use by vm builder"));

    // Its writes become a layer; a second VM boots from base + layer.
    t.ok(&["disk", "commit", "builder", "--name", "app"]);
    let info = t.json(&["image", "inspect", "app", "--json"]);
    assert_eq!(info["layers"], 2);
    let out = run_vm(&t, "user", "app", "spore.cat=/etc/layer.txt");
    assert!(
        out.contains("SPORE-FILE /etc/layer.txt made-by-a-vm"),
        "{out}"
    );
    let log = t.ok(&["vm", "log", "user"]);
    assert!(log.contains("SPORE-READY"), "{log}");

    // A running VM can't be removed without --force; stop asks the guest
    // over ACPI and the guest powers off cleanly (not a hard stop).
    assert!(t.fails(&["vm", "rm", "user"]).contains("stop it first"));
    let out = t.ok(&["vm", "stop", "user", "--timeout", "60"]);
    assert!(
        out.contains("stopped") && !out.contains("stopped hard"),
        "{out}"
    );
    let log = t.ok(&["vm", "log", "user"]);
    assert!(
        log.contains("spore-init: poweroff"),
        "no clean power-off: {log}"
    );
    t.ok(&["vm", "rm", "user"]);
    t.ok(&["vm", "rm", "builder"]);
    t.ok(&["image", "rm", "base"]);
    assert_eq!(t.json(&["vm", "ls", "--json"]).as_array().unwrap().len(), 0);
    assert_eq!(
        t.json(&["disk", "ls", "--json"]).as_array().unwrap().len(),
        0
    );
}

/// The agent's VMs outlive it: a graceful restart and a crash (SIGKILL)
/// leave the VM running in the same QEMU, which the next agent takes over
/// (its guest channel answers) and says so; a VM whose QEMU died while no
/// agent ran is recorded as stopped and its RAM file collected; and
/// `spore agent stop --vms` stops the VMs with the agent, saying why.
#[test]
fn restarts_keep_vms_and_agent_stop_vms_stops_them() {
    let mut t = TestAgent::start();
    t.import_guest("base");
    run_vm(&t, "v", "base", "");
    let pid = t.json(&["vm", "ls", "--json"])[0]["pid"].as_u64().unwrap();
    for (n, crash) in [(1, false), (2, true)] {
        if crash {
            t.crash_and_restart();
        } else {
            t.restart();
        }
        assert!(alive(pid), "QEMU {pid} did not outlive the agent");
        let vms = t.json(&["vm", "ls", "--json"]);
        assert_eq!(vms[0]["state"], "running", "{vms}");
        assert_eq!(vms[0]["pid"].as_u64(), Some(pid), "{vms}");
        let recovered = t.json(&["status", "--json"])["recovered"].to_string();
        assert!(recovered.contains("vm v: kept running"), "{recovered}");
        // The new agent has the guest channel.
        t.ok(&["vm", "send", "v", "ping", &format!("{n}0")]);
        t.wait_console("v", &format!("SPORE-PONG {n}0"), 60);
    }

    // QEMU dies while no agent runs: the next start records it.
    t.agent.take().unwrap().kill();
    // SAFETY: kill sends a signal; no memory is involved.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while alive(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "QEMU {pid} did not die"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    t.restart_stopped();
    let vms = t.json(&["vm", "ls", "--json"]);
    assert_eq!(vms[0]["state"], "stopped", "{vms}");
    assert_eq!(
        vms[0]["reason"], "its QEMU exited while no agent ran",
        "{vms}"
    );
    assert!(!t.ram.path().join("vm-v.ram").exists());
    let recovered = t.json(&["status", "--json"])["recovered"].to_string();
    assert!(
        recovered.contains("vm v: stopped") && recovered.contains("vm-v.ram"),
        "{recovered}"
    );

    // `spore agent stop --vms`: the agent and its VM go, and the VM says
    // why; the socket holder goes too.
    run_vm_again(&t);
    let pid = t.json(&["vm", "ls", "--json"])[0]["pid"].as_u64().unwrap();
    let out = t.ok(&["agent", "stop", "--vms"]);
    assert!(out.is_empty(), "{out}");
    let status = t.agent.as_mut().unwrap().wait().unwrap();
    assert!(status.success(), "agent exited with {status}");
    t.agent = None;
    assert!(!alive(pid), "QEMU {pid} outlived `agent stop --vms`");
    assert!(!t.data_dir().join("holder.sock").exists());
    t.restart_stopped();
    let vms = t.json(&["vm", "ls", "--json"]);
    assert_eq!(vms[0]["state"], "stopped", "{vms}");
    assert_eq!(
        vms[0]["reason"], "stopped because the agent shut down",
        "{vms}"
    );
}

fn alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn run_vm_again(t: &TestAgent) {
    t.ok(&["vm", "rm", "v"]);
    run_vm(t, "v", "base", "");
}

#[test]
fn bad_vm_requests_get_clear_errors() {
    let t = TestAgent::start();
    let src = t.path("src.raw");
    common::sparse_random_file(&src, 1 << 20, 1);
    t.ok(&["image", "import", src.to_str().unwrap(), "--name", "img"]);
    let err = t.fails(&[
        "vm",
        "run",
        "v",
        "--image",
        "img",
        "--kernel",
        "/nonexistent/vmlinuz",
    ]);
    assert!(err.contains("not an absolute path to a file"), "{err}");
    let err = t.fails(&["vm", "run", "v", "--image", "nope"]);
    assert!(err.contains("does not exist"), "{err}");
    let err = t.fails(&["vm", "run", "v", "--image", "img", "--accel", "hvf"]);
    assert!(err.contains("unknown accelerator"), "{err}");
    assert_eq!(
        t.json(&["vm", "ls", "--json"]).as_array().unwrap().len(),
        0,
        "no half-made VM left"
    );
    assert_eq!(
        t.json(&["disk", "ls", "--json"]).as_array().unwrap().len(),
        0,
        "no half-made disk left"
    );
}

/// Guest data (disks, chunks, RAM files, sockets) is root's only: another
/// user can read none of it, whatever the umask the agent ran with.
#[test]
fn guest_data_is_readable_by_root_only() {
    use std::os::unix::fs::PermissionsExt;
    let t = TestAgent::start();
    // The test's own directories are private; open them up, so that only
    // what the agent itself restricts stands in the way.
    for dir in [t.dir.path(), t.ram.path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    t.import_guest("base");
    let out = run_vm(&t, "secret", "base", "");
    assert!(out.contains("SPORE-READY"), "{out}");
    let ram = t.ram.path().join("vm-secret.ram");
    assert!(ram.exists(), "no RAM file at {}", ram.display());
    let chunk = common::chunk_files(&t).into_iter().next().expect("a chunk");
    let data = t.data_dir();
    for path in [
        ram.as_path(),
        chunk.as_path(),
        &data.join("disks/secret/data"),
        &data.join("meta.redb"),
    ] {
        let out = std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "head",
                "-c",
                "1",
            ])
            .arg(path)
            .output()
            .expect("setpriv runs");
        assert!(!out.status.success(), "user 65534 read {}", path.display());
    }
    t.ok(&["vm", "rm", "secret", "--force"]);
}

/// `--huge-pages`: the RAM directory becomes a tmpfs with transparent huge
/// pages, and the guest's memory is mapped in 2 MiB pages.
#[test]
fn guest_ram_can_live_on_huge_pages() {
    let mut t = TestAgent::start_with(&["--huge-pages"]);
    let ram = t.ram.path().to_owned();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(ram.to_str().unwrap()))
        .unwrap_or_else(|| panic!("{} is not a mount point: {mounts}", ram.display()));
    assert!(line.contains("huge=within_size"), "{line}");
    t.import_guest("base");
    let out = run_vm(&t, "big", "base", "");
    assert!(out.contains("SPORE-READY"), "{out}");
    let vms = t.json(&["vm", "ls", "--json"]);
    let pid = vms[0]["pid"].as_u64().expect("pid");
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let pmd = smaps
        .lines()
        .find(|l| l.starts_with("ShmemPmdMapped:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(pmd >= 2048, "no guest RAM in huge pages: {smaps}");
    t.ok(&["vm", "rm", "big", "--force"]);
    t.agent.take().unwrap().stop().unwrap();
    let status = std::process::Command::new("umount")
        .arg(&ram)
        .status()
        .unwrap();
    assert!(status.success(), "umount {}", ram.display());
}

/// Waits until the VM's console log holds `marker` more than `before`
/// times; returns the log.
fn wait_for(t: &TestAgent, vm: &str, marker: &str, before: usize) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let log = t.ok(&["vm", "log", vm]);
        // Only a whole line: the console may be read while the guest is
        // still writing it.
        let whole = log.rsplit(marker).next().is_some_and(|r| r.contains('\n'));
        if log.matches(marker).count() > before && whole {
            return log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {marker} on {vm}: {}",
            &log[log.len().saturating_sub(2000)..]
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The `disk=` checksum on the last console line with `marker`.
fn disk_sum(log: &str, marker: &str) -> String {
    let line = log.rsplit(marker).next().unwrap().lines().next().unwrap();
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("disk="))
        .unwrap_or_else(|| panic!("no disk= in {line:?}"))
        .to_owned()
}

/// `disk commit` of a running VM's disk pauses the VM for the copy (so
/// the layer is what the guest had synced, not blocks read while it
/// writes), then lets it run on: the guest's workload goes on, and a VM
/// booted from the layer reads the data set the first one wrote.
#[test]
fn a_running_vms_disk_is_committed_while_it_is_paused_and_it_runs_on() {
    let t = TestAgent::start();
    t.import_guest("base");
    run_vm(&t, "w", "base", "spore.counter");
    t.ok(&["vm", "send", "w", "dataset", "write", "8"]);
    let log = wait_for(&t, "w", "SPORE-DATASET ", 0);
    let written = disk_sum(&log, "SPORE-DATASET ");

    t.ok(&["disk", "commit", "w", "--name", "snap"]);
    let agent_log = std::fs::read_to_string(t.dir.path().join("data.agent.log")).unwrap();
    assert!(
        agent_log.contains("vm paused for the commit of its disk"),
        "the VM was not paused: {agent_log}"
    );
    let vms = t.json(&["vm", "ls", "--json"]);
    assert_eq!(vms[0]["state"], "running", "{vms}");
    // Its workload goes on after the commit.
    let counted = t.ok(&["vm", "log", "w"]).matches("SPORE-COUNTER").count();
    wait_for(&t, "w", "SPORE-COUNTER", counted);

    run_vm(&t, "r", "snap", "");
    t.ok(&["vm", "send", "r", "dataset", "check"]);
    let log = wait_for(&t, "r", "SPORE-DATASET-CHECK", 0);
    assert_eq!(disk_sum(&log, "SPORE-DATASET-CHECK"), written, "{log}");
    t.ok(&["vm", "rm", "r", "--force"]);
    t.ok(&["vm", "rm", "w", "--force"]);
}
