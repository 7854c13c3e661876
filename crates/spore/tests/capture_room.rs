//! A capture that would not fit in the data directory is refused before
//! the VM is paused: the guest never stops, nothing is made, and the same
//! capture succeeds once there is room.

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
