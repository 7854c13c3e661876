//! Room checked before it is needed: a capture that would not fit in the
//! data directory is refused before the VM is paused (the guest never
//! stops, nothing is made, and the same capture succeeds once there is
//! room); a VM whose RAM the RAM directory (tmpfs) cannot promise is
//! refused whole.

mod common;

use common::{fill_leaving, guest, vm_run_args, TestAgent};

#[test]
fn a_capture_without_room_is_refused_before_the_pause() {
    let t = TestAgent::start_on_tmpfs(1536, &[]);
    t.import_guest("base");
    let args = vm_run_args(guest(), "src", "base", "");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    t.ok(&refs);

    // Leave 16 MiB free: less than the guest's touched RAM alone.
    let filler = fill_leaving(&t.data_dir(), 16 << 20);
    let before = t.ok(&["vm", "log", "src"]).len();
    let err = t.fails(&["vm", "template", "src", "--name", "t"]);
    assert!(
        err.contains("not enough room") && err.contains("nothing was paused"),
        "{err}"
    );
    let vms = t.json(&["vm", "ls", "--json"]);
    assert_eq!(vms[0]["state"], "running", "{vms}");
    assert!(vms[0]["template"].is_null(), "{vms}");
    let images = t.json(&["image", "ls", "--json"]).to_string();
    assert!(!images.contains("\"t."), "{images}");
    assert_eq!(
        t.json(&["template", "ls", "--json"])
            .as_array()
            .map(Vec::len),
        Some(0)
    );
    // The guest ran on: it answers.
    t.ok(&["vm", "send", "src", "ping", "5"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !t.ok(&["vm", "log", "src"])[before..].contains("SPORE-PONG 5") {
        assert!(std::time::Instant::now() < deadline, "no answer");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // With room, the same capture succeeds.
    std::fs::remove_file(&filler).unwrap();
    t.ok(&["vm", "template", "src", "--name", "t", "--stop"]);
    assert_eq!(t.json(&["template", "inspect", "t", "--json"])["name"], "t");
    t.ok(&["vm", "rm", "src", "--force"]);
    t.ok(&["template", "rm", "t"]);
}

/// A tmpfs mounted for a test, detached when dropped (lazily: QEMU may
/// still hold a file on it while its agent stops it).
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// RAM files are sparse, so VMs admitted one by one could together
/// promise a tmpfs more than it holds (and a guest touching the page that
/// does not fit dies of SIGBUS): the pages a running VM has not touched yet
/// count as taken, a VM that would not fit is refused with a clear error,
/// and nothing of it is left behind.
#[test]
fn a_vm_whose_ram_the_ram_directory_cannot_promise_is_refused_whole() {
    let t = TestAgent::start();
    let ram = t.ram.path().to_owned();
    common::sh(
        std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=900m,mode=0700", "spore-test-ram"])
            .arg(&ram),
    );
    let _mount = Mount(ram.clone());
    t.import_guest("base");
    // 512 MiB of guest RAM (the default), of which the boot touches far
    // less: without counting the rest as promised, 384 MiB more would fit.
    let args = vm_run_args(guest(), "a", "base", "");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    t.ok(&refs);
    let run_b = |memory: &str| {
        let mut args = vm_run_args(guest(), "b", "base", "");
        args.truncate(11);
        args.extend(["--memory".into(), memory.into()]);
        t.run(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let out = run_b("384M");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a VM the RAM directory cannot hold ran"
    );
    assert!(
        err.contains("not enough room for the VM's RAM") && err.contains("promised"),
        "{err}"
    );
    // Nothing of it is left: no record, no disk, no RAM file.
    let vms = t.json(&["vm", "ls", "--json"]);
    assert_eq!(vms.as_array().unwrap().len(), 1, "{vms:#}");
    let disks = t.json(&["disk", "ls", "--json"]).to_string();
    assert!(!disks.contains("\"b\""), "{disks}");
    let left: Vec<_> = std::fs::read_dir(&ram)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f.contains("-b."))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // What fits within the promise runs.
    let out = run_b("256M");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.ok(&["vm", "rm", "--force", "b"]);
    t.ok(&["vm", "rm", "--force", "a"]);
}
