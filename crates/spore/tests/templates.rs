//! Templates and clones with the real demo guest: clones resume the
//! template's running workload without booting, each with its own
//! identity, disk and size.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{guest, vm_run_args, TestAgent};

/// Waits until the VM's console log contains `pattern`; returns the log.
fn wait_log(t: &TestAgent, vm: &str, pattern: &str, secs: u64) -> String {
    t.wait_console(vm, pattern, secs)
}

/// `key=value` fields of the last console line containing `marker`.
fn fields(log: &str, marker: &str) -> std::collections::HashMap<String, String> {
    let line = log
        .lines()
        .rev()
        .find_map(|l| l.find(marker).map(|i| &l[i + marker.len()..]))
        .unwrap_or_else(|| panic!("no {marker} line in:\n{log}"));
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Counter values (`SPORE-COUNTER n=N`) in order.
fn counts(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.split("SPORE-COUNTER n=").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn clones_continue_the_template_with_their_own_identity_disk_and_size() {
    let g = guest();
    let t = TestAgent::start();
    t.import_guest("base");
    let args = vm_run_args(g, "src", "base", "quiet spore.counter");
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    t.ok(&args);
    let log = wait_log(&t, "src", "SPORE-COUNTER n=3 ", 120);
    let src_id = fields(
        &wait_log(&t, "src", "SPORE-IDENTITY", 30),
        "SPORE-IDENTITY ",
    );
    assert_eq!(src_id["hostname"], "src");
    let before = *counts(&log).last().unwrap();

    // Capture: the source pauses, then runs on from the template.
    let info = t.json(&["vm", "template", "src", "--name", "t1", "--json"]);
    assert_eq!(info["ram_image"], "t1.ram");
    assert_eq!(info["disk_image"], "t1.disk");
    // Zero pages are not stored: a freshly booted 512 MiB guest is mostly zero.
    let stored = info["ram_stored_bytes"].as_u64().unwrap();
    assert!(stored > 0 && stored < 256 << 20, "{info}");
    assert!(info["state_bytes"].as_u64().unwrap() < 4 << 20, "{info}");
    assert!(
        info["source_after"]
            .as_str()
            .unwrap()
            .starts_with("resumed"),
        "{info}"
    );
    assert!(t
        .fails(&["vm", "template", "src", "--name", "t1"])
        .contains("already exists"));

    // Three clones at once, as one group.
    let r = t.json(&[
        "vm", "clone", "t1", "--count", "3", "--name", "web", "--json",
    ]);
    let names: Vec<&str> = r["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web-1", "web-2", "web-3"], "{r}");
    assert!(r["failed"].as_array().unwrap().is_empty(), "{r}");
    let vms = t.json(&["vm", "ls", "--json"]);
    for v in vms.as_array().unwrap() {
        assert_eq!(v["template"], "t1", "{v}");
        assert_eq!(v["state"], "running", "{v}");
    }

    let mut ids = vec![src_id.clone()];
    for vm in ["web-1", "web-2", "web-3"] {
        // Keeps counting from where the template was, without a boot.
        wait_log(&t, vm, "SPORE-COUNTER", 60);
        let log = wait_log(&t, vm, &format!("host={vm}"), 30);
        assert!(!log.contains("SPORE-READY"), "{vm} booted:\n{log}");
        let c = counts(&log);
        assert!(
            c[0] >= before && c[0] <= before + 5,
            "{vm} counts {c:?}, the template was at {before}"
        );
        assert!(c.windows(2).all(|w| w[1] == w[0] + 1), "{vm}: {c:?}");
        let id = fields(&wait_log(&t, vm, "SPORE-IDENTITY", 30), "SPORE-IDENTITY ");
        assert_eq!(id["hostname"], vm);
        // The disk it started from is the template's: the template's
        // instance id, not a sibling's.
        assert_eq!(id["previous"], src_id["instance"], "{vm}");
        ids.push(id);
    }
    // No two alike: hostname, instance id, MAC, and what the RNG returns
    // right after resuming (the same RNG state without the reseed).
    for key in ["hostname", "instance", "mac", "random"] {
        let values: HashSet<&String> = ids.iter().map(|i| &i[key]).collect();
        assert_eq!(values.len(), ids.len(), "{key} repeats: {ids:?}");
    }
    let web1 = t
        .json(&["vm", "ls", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "web-1")
        .cloned()
        .unwrap();
    assert_eq!(web1["mac"].as_str(), ids[1].get("mac").map(|s| s.as_str()));

    // Writes stay in their clone: web-1..3 each wrote their instance id
    // to disk; new clones still find the template's.
    let r = t.json(&["vm", "clone", "t1", "--name", "late", "--json"]);
    assert_eq!(r["vms"][0]["name"], "late-1");
    let id = fields(
        &wait_log(&t, "late-1", "SPORE-IDENTITY", 60),
        "SPORE-IDENTITY ",
    );
    assert_eq!(id["previous"], src_id["instance"]);

    // More memory and CPUs than the template, seen from inside.
    t.ok(&[
        "vm", "clone", "t1", "--name", "big", "--memory", "768M", "--cpus", "2",
    ]);
    let res = fields(
        &wait_log(&t, "big-1", "SPORE-RESOURCES", 60),
        "SPORE-RESOURCES ",
    );
    assert_eq!(res["cpus"], "2");
    let base_kib: u64 = {
        t.ok(&["vm", "resize", "web-2", "--cpus", "1"]);
        let r = fields(
            &wait_log(&t, "web-2", "SPORE-RESOURCES", 60),
            "SPORE-RESOURCES ",
        );
        assert_eq!(r["cpus"], "1");
        r["mem_kib"].parse().unwrap()
    };
    let big_kib: u64 = res["mem_kib"].parse().unwrap();
    assert!(big_kib >= base_kib + 250 * 1024, "{big_kib} vs {base_kib}");
    // A running clone grows.
    t.ok(&["vm", "resize", "web-3", "--memory", "640M", "--cpus", "3"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = t.ok(&["vm", "log", "web-3"]);
        let grown = log
            .lines()
            .filter(|l| l.contains("SPORE-RESOURCES"))
            .any(|l| {
                let f = fields(l, "SPORE-RESOURCES ");
                f["cpus"] == "3" && f["mem_kib"].parse::<u64>().unwrap() >= base_kib + 120 * 1024
            });
        if grown {
            break;
        }
        assert!(Instant::now() < deadline, "web-3 did not grow:\n{log}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(t
        .fails(&["vm", "resize", "web-3", "--memory", "512M"])
        .contains("only grow"));
    assert!(t
        .fails(&["vm", "resize", "web-3", "--memory", "700M"])
        .contains("steps of 128 MiB"));

    // A store with a template, its clones and their disks checks clean.
    let out = t.ok(&["fsck"]);
    assert!(out.contains("clean"), "{out}");

    // The template stays while VMs run from it; groups go at once.
    assert!(t.fails(&["template", "rm", "t1"]).contains("in use"));
    assert!(t.fails(&["image", "rm", "t1.ram"]).contains("template t1"));
    let out = t.ok(&["vm", "rm", "--group", "web"]);
    assert!(out.contains("3 VMs"), "{out}");
    for group in ["late", "big"] {
        t.ok(&["vm", "rm", "--group", group]);
    }
    t.ok(&["vm", "rm", "--force", "src"]);
    assert_eq!(t.json(&["vm", "ls", "--json"]).as_array().unwrap().len(), 0);
    let ls = t.json(&["template", "ls", "--json"]);
    assert_eq!(ls[0]["clones"].as_array().unwrap().len(), 0, "{ls}");
    t.ok(&["template", "rm", "t1"]);
    assert!(t
        .fails(&["image", "inspect", "t1.ram"])
        .contains("does not exist"));
    assert!(t.fails(&["vm", "clone", "t1"]).contains("does not exist"));
}

#[test]
fn a_stopped_source_and_a_lost_ram_file_are_handled() {
    let g = guest();
    let t = TestAgent::start();
    t.import_guest("base");
    let args = vm_run_args(g, "src", "base", "quiet spore.counter");
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    t.ok(&args);
    wait_log(&t, "src", "SPORE-COUNTER n=2 ", 120);
    let info = t.json(&["vm", "template", "src", "--name", "t", "--stop", "--json"]);
    assert!(info["source_after"]
        .as_str()
        .unwrap()
        .starts_with("stopped"));
    let src = t.json(&["vm", "ls", "--json"])[0].clone();
    assert_eq!(src["state"], "stopped", "{src}");
    assert_eq!(src["reason"], "captured as template t", "{src}");

    // The RAM file lives in tmpfs; after a host reboot it is rebuilt from
    // the template's RAM image.
    let ram_files: Vec<_> = std::fs::read_dir(t.ram.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with("tmpl-t.ram"))
        .collect();
    assert_eq!(ram_files.len(), 1);
    std::fs::remove_file(&ram_files[0]).unwrap();
    t.ok(&["vm", "clone", "t"]);
    let log = wait_log(&t, "t-1", "host=t-1", 60);
    assert!(!log.contains("SPORE-READY"), "{log}");
    t.ok(&["vm", "rm", "--group", "t"]);

    // Lost again, and two clones race to rebuild it (one rebuild at a
    // time: they used to truncate each other's file): both resume the
    // template's workload.
    std::fs::remove_file(&ram_files[0]).unwrap();
    let racers: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|n| {
            let mut c = std::process::Command::new(common::SPORE);
            c.env("SPORE_HOME", t.data_dir())
                .args(["vm", "clone", "t", "--name", n]);
            c.spawn().expect("spore runs")
        })
        .collect();
    for mut r in racers {
        assert!(r.wait().unwrap().success(), "a racing clone failed");
    }
    for vm in ["a-1", "b-1"] {
        let log = wait_log(&t, vm, &format!("host={vm}"), 60);
        assert!(!log.contains("SPORE-READY"), "{log}");
        let before = wait_log(&t, vm, "SPORE-COUNTER", 60)
            .matches("SPORE-COUNTER")
            .count();
        let deadline = Instant::now() + Duration::from_secs(60);
        while t.ok(&["vm", "log", vm]).matches("SPORE-COUNTER").count() <= before {
            assert!(Instant::now() < deadline, "{vm}'s workload stopped");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let left: Vec<_> = std::fs::read_dir(t.ram.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    t.ok(&["vm", "rm", "--group", "a"]);
    t.ok(&["vm", "rm", "--group", "b"]);
    t.ok(&["vm", "rm", "src"]);
    t.ok(&["template", "rm", "t"]);
}

#[test]
fn a_clone_on_a_cold_host_pages_its_template_in_from_the_origin() {
    let g = guest();
    // Host A captures the template and serves it to peers; host B has
    // nothing and names A as its origin.
    let (a, port) = TestAgent::start_listening(&[]);
    let b = TestAgent::start_with(&["--origin", &format!("https://127.0.0.1:{port}")]);
    a.import_guest("base");
    let args = vm_run_args(g, "src", "base", "quiet spore.counter");
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    a.ok(&args);
    let before = *counts(&wait_log(&a, "src", "SPORE-COUNTER n=3 ", 120))
        .last()
        .unwrap();
    let info = a.json(&["vm", "template", "src", "--name", "t1", "--json"]);
    let stored = info["ram_stored_bytes"].as_u64().unwrap();
    // The working set (pages the resumed source touched) becomes the RAM
    // image's profile.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ram = a.json(&["image", "inspect", "t1.ram", "--json"]);
        if ram["profile_blocks"].as_u64().unwrap_or(0) > 0 {
            assert!(ram["profile_bytes"].as_u64().unwrap() < stored, "{ram}");
            break;
        }
        assert!(Instant::now() < deadline, "no working set recorded: {ram}");
        std::thread::sleep(Duration::from_millis(500));
    }

    assert!(b.fails(&["vm", "clone", "nope"]).contains("does not exist"));
    let r = b.json(&["vm", "clone", "t1", "--count", "2", "--json"]);
    assert_eq!(r["vms"].as_array().unwrap().len(), 2, "{r}");
    let t = b.json(&["template", "inspect", "t1", "--json"]);
    assert_eq!(t["source_after"], "captured on another host", "{t}");
    let mut randoms = HashSet::new();
    for vm in ["t1-1", "t1-2"] {
        let log = wait_log(&b, vm, &format!("host={vm}"), 60);
        assert!(!log.contains("SPORE-READY"), "{vm} booted:\n{log}");
        let c = counts(&log);
        assert!(
            c[0] >= before && c[0] <= before + 8,
            "{vm}: {c:?} vs {before}"
        );
        let id = fields(&wait_log(&b, vm, "SPORE-IDENTITY", 30), "SPORE-IDENTITY ");
        randoms.insert(id["random"].clone());
    }
    assert_eq!(randoms.len(), 2);
    // The RAM is a FUSE file on B, and B fetched far less than the template.
    assert!(b.ram.path().join("mem-t1/ram").exists());
    let status = b.json(&["status", "--json"]);
    let fetched = status["sources"][0]["bytes"].as_u64().unwrap();
    assert!(fetched < 512 << 20, "{status}");
    assert!(fetched > 0, "{status}");

    // A cold host's store checks clean: what it has not fetched is not
    // a fault.
    let f = b.json(&["fsck", "--json"]);
    assert!(f["not_fetched"].as_u64().unwrap() > 0, "{f}");

    b.ok(&["vm", "rm", "--group", "t1"]);
    b.ok(&["template", "rm", "t1"]);
    assert!(!b.ram.path().join("mem-t1").exists());
    a.ok(&["vm", "rm", "--force", "src"]);
}

/// Waits until `vm ls` shows a VM in state `standby`; returns its name.
fn wait_standby(t: &TestAgent) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let vms = t.json(&["vm", "ls", "--json"]);
        if let Some(v) = vms
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["state"] == "standby")
        {
            return v["name"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "no standby clone: {vms}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn standby_clones_are_handed_out_with_their_own_identity() {
    let g = guest();
    let t = TestAgent::start_with(&["--clone-standby", "1"]);
    t.import_guest("base");
    let args = vm_run_args(g, "src", "base", "quiet spore.counter");
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    t.ok(&args);
    let before = *counts(&wait_log(&t, "src", "SPORE-COUNTER n=2 ", 120))
        .last()
        .unwrap();
    t.ok(&["vm", "template", "src", "--name", "t", "--stop"]);

    let mut macs = HashSet::new();
    let mut randoms = HashSet::new();
    for i in 1..=2 {
        // The pool fills after the capture, and again after each clone.
        let standby = wait_standby(&t);
        let r = t.json(&["vm", "clone", "t", "--name", "s", "--json"]);
        let vm = format!("s-{i}");
        assert_eq!(r["vms"][0]["name"], vm.as_str(), "{r}");
        assert_eq!(r["vms"][0]["start_ms"]["standby"], true, "{r}");
        assert_eq!(r["vms"][0]["state"], "running", "{r}");
        // The standby is gone under its own name.
        assert!(t.fails(&["vm", "log", &standby]).contains("does not exist"));
        let log = wait_log(&t, &vm, &format!("host={vm}"), 60);
        assert!(!log.contains("SPORE-READY"), "{log}");
        assert!(counts(&log)[0] >= before, "{log}");
        let id = fields(&wait_log(&t, &vm, "SPORE-IDENTITY", 30), "SPORE-IDENTITY ");
        assert_eq!(id["hostname"], vm);
        macs.insert(id["mac"].clone());
        randoms.insert(id["random"].clone());
        let info = t.json(&["template", "inspect", "t", "--json"]);
        assert!(
            !info["clones"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c.as_str().unwrap().starts_with("standby-")),
            "{info}"
        );
    }
    assert_eq!(macs.len(), 2);
    assert_eq!(randoms.len(), 2);
    t.ok(&["vm", "rm", "--group", "s"]);
    // Standbys go with their template.
    wait_standby(&t);
    t.ok(&["template", "rm", "t"]);
    let vms = t.json(&["vm", "ls", "--json"]);
    assert_eq!(vms.as_array().unwrap().len(), 1, "{vms}");
    assert_eq!(
        t.json(&["disk", "ls", "--json"]).as_array().unwrap().len(),
        1
    );
}

/// A standby whose QEMU died never blocks a clone (a fresh one starts and
/// the pool refills) nor a removal; `template rm` while the pool is being
/// filled removes the template, its images, RAM file and every standby.
#[test]
fn dead_standbys_are_replaced_and_template_rm_takes_everything() {
    let g = guest();
    let t = TestAgent::start_with(&["--clone-standby", "1"]);
    t.import_guest("base");
    let args = vm_run_args(g, "src", "base", "quiet");
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    t.ok(&args);
    t.ok(&["vm", "template", "src", "--name", "t", "--stop"]);
    let dead = wait_standby(&t);
    let vms = t.json(&["vm", "ls", "--json"]);
    let pid = vms
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == dead.as_str())
        .and_then(|v| v["pid"].as_i64())
        .expect("standby pid");
    // SAFETY: a signal to the standby's QEMU, a child of the test's agent.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(500));
    let r = t.json(&["vm", "clone", "t", "--name", "c", "--json"]);
    assert_eq!(r["vms"][0]["state"], "running", "{r}");
    assert_eq!(r["vms"][0]["start_ms"]["standby"], false, "{r}");
    // The dead one is gone, disk and all, and the pool refills.
    let fresh = wait_standby(&t);
    assert_ne!(fresh, dead);
    let disks = t.json(&["disk", "ls", "--json"]).to_string();
    assert!(!disks.contains(&dead), "{disks}");
    t.ok(&["vm", "rm", "--group", "c"]);

    // Captured, then removed at once, while its pool is being filled.
    t.ok(&["vm", "rm", "src", "--force"]);
    let args = vm_run_args(g, "src2", "base", "quiet");
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    t.ok(&args);
    t.ok(&["vm", "template", "src2", "--name", "t2", "--stop"]);
    t.ok(&["template", "rm", "t2"]);
    t.ok(&["template", "rm", "t"]);
    let vms = t.json(&["vm", "ls", "--json"]);
    let names: Vec<&str> = vms
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["src2"], "{vms}");
    let images = t.json(&["image", "ls", "--json"]).to_string();
    assert!(
        !images.contains("\"t.") && !images.contains("\"t2."),
        "{images}"
    );
    for tmpl in ["t", "t2"] {
        let ram = t.ram.path().join(format!("tmpl-{tmpl}.ram"));
        assert!(!ram.exists(), "{} left", ram.display());
    }
    // No standby QEMU outlives its template.
    std::thread::sleep(Duration::from_millis(500));
    let left = std::process::Command::new("pgrep")
        .args(["-f", &format!("{}.*standby-", t.data_dir().display())])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "standby QEMU left: {}",
        String::from_utf8_lossy(&left.stdout)
    );
}

/// The QEMU processes `vm ls` shows on `t`, by VM name.
fn qemus_of(t: &TestAgent) -> Vec<(String, u32)> {
    t.json(&["vm", "ls", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| Some((v["name"].as_str()?.to_owned(), v["pid"].as_u64()? as u32)))
        .collect()
}

/// FUSE mounts (template RAM paged in from elsewhere) under `dir`.
fn fuse_mounts_under(dir: &std::path::Path) -> Vec<String> {
    let dir = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(1).is_some_and(|m| m.starts_with(&dir)))
        .map(str::to_owned)
        .collect()
}

/// Agents restarted under everything templates make: host A (graceful
/// restart) has a template, a standby and a clone; host B (killed with
/// SIGKILL) has a clone whose RAM is a FUSE file paging the template in
/// from A. A's VMs run on in the same QEMU processes, its standby back in
/// the pool; B's clone, whose RAM its own agent served (spore-memfs),
/// cannot outlive it and is listed as stopped, with why, its FUSE mount
/// detached. Both hosts clone the template again (A from the kept
/// standby); then everything can be removed.
#[test]
fn agents_restart_under_templates_standbys_and_a_fuse_clone() {
    let g = guest();
    let (mut a, port) = TestAgent::start_listening(&["--clone-standby", "1"]);
    let mut b = TestAgent::start_with(&["--origin", &format!("https://127.0.0.1:{port}")]);
    a.import_guest("base");
    let args = vm_run_args(g, "src", "base", "quiet spore.counter");
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    a.ok(&args);
    wait_log(&a, "src", "SPORE-COUNTER n=2 ", 120);
    a.ok(&["vm", "template", "src", "--name", "t1"]);
    let taken = wait_standby(&a);
    a.ok(&["vm", "clone", "t1", "--name", "c"]);
    wait_log(&a, "c-1", "host=c-1", 60);
    b.ok(&["vm", "clone", "t1", "--name", "far"]);
    wait_log(&b, "far-1", "host=far-1", 60);
    assert!(
        !fuse_mounts_under(b.ram.path()).is_empty(),
        "far-1's RAM is not a FUSE file on B"
    );
    // The clone took the standby (keeping its disk); the pool refills.
    let standby = wait_standby(&a);
    assert_ne!(standby, taken);
    let on_a = qemus_of(&a);
    let on_b = qemus_of(&b);
    assert!(on_a.len() >= 3, "src, c-1 and a standby: {on_a:?}");
    let far_pid = on_b
        .iter()
        .find(|(n, _)| n == "far-1")
        .map(|(_, p)| *p)
        .expect("far-1 runs");

    a.restart();
    b.crash_and_restart();

    // A: every VM runs on in its QEMU, the standby back in its pool.
    let after = qemus_of(&a);
    for vm in &on_a {
        assert!(
            after.contains(vm),
            "{vm:?} did not survive the restart: {after:?}"
        );
    }
    let recovered = a.json(&["status", "--json"])["recovered"].to_string();
    for what in [
        "vm src: kept running".to_owned(),
        "vm c-1: kept running".to_owned(),
        format!("standby clone {standby}: kept in the pool of template t1"),
    ] {
        assert!(
            recovered.contains(&what),
            "{what} not reported: {recovered}"
        );
    }
    // B: far-1's RAM came through its agent; it is gone, with the mount.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::path::Path::new(&format!("/proc/{far_pid}")).exists() {
        assert!(
            Instant::now() < deadline,
            "far-1's QEMU {far_pid} outlived its RAM's server"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        fuse_mounts_under(b.ram.path()).is_empty(),
        "FUSE mounts left on B: {:?}",
        fuse_mounts_under(b.ram.path())
    );
    let list = b.json(&["vm", "ls", "--json"]);
    let far = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "far-1")
        .unwrap_or_else(|| panic!("far-1 is not listed: {list}"));
    assert_ne!(far["state"], "running", "{far}");
    assert!(far["pid"].is_null(), "{far}");
    assert!(
        !far["reason"].as_str().unwrap_or_default().is_empty(),
        "{far}"
    );
    let recovered = b.json(&["status", "--json"])["recovered"].to_string();
    for what in ["vm far-1: ", "FUSE mount"] {
        assert!(recovered.contains(what), "{what} not reported: {recovered}");
    }
    // Both hosts clone the template again; A's clone is the kept standby.
    for (t, name, vm) in [(&a, "c2", "c2-1"), (&b, "far2", "far2-1")] {
        let r = t.json(&["vm", "clone", "t1", "--name", name, "--json"]);
        assert_eq!(r["vms"][0]["state"], "running", "{r}");
        wait_log(t, vm, &format!("host={vm}"), 60);
    }
    let c2 = qemus_of(&a);
    let standby_pid = on_a.iter().find(|(n, _)| *n == standby).unwrap().1;
    assert!(
        c2.iter().any(|(n, p)| n == "c2-1" && *p == standby_pid),
        "c2-1 is not the kept standby ({standby}, pid {standby_pid}): {c2:?}"
    );
    assert!(!fuse_mounts_under(b.ram.path()).is_empty());

    // Everything goes.
    for vm in ["far-1", "far2-1"] {
        b.ok(&["vm", "rm", "--force", vm]);
    }
    b.ok(&["template", "rm", "t1"]);
    assert!(fuse_mounts_under(b.ram.path()).is_empty());
    for vm in ["src", "c-1", "c2-1"] {
        a.ok(&["vm", "rm", "--force", vm]);
    }
    a.ok(&["template", "rm", "t1"]);
    for t in [&a, &b] {
        let vms = t.json(&["vm", "ls", "--json"]);
        assert_eq!(vms.as_array().unwrap().len(), 0, "{vms}");
        let disks = t.json(&["disk", "ls", "--json"]);
        assert_eq!(disks.as_array().unwrap().len(), 0, "{disks}");
    }
}
