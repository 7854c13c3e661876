//! A template capture either completes or leaves the VM as it was: refused
//! up front when a name it needs is taken or the VM has hot-plugged memory,
//! and undone when it fails after the pause, at each of its steps
//! (fail-points `capture-save-state`, `capture-commit`, `capture-place-ram`
//! and `capture-store`, each failing once, which is why this test has a
//! binary of its own: the fail-points are in the agent's environment).

mod common;

use common::{guest, vm_run_args, TestAgent};

/// Waits for `marker` to appear in the VM's console log after `before`
/// occurrences.
fn wait_marker(t: &TestAgent, vm: &str, marker: &str, before: usize) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let log = t.ok(&["vm", "log", vm]);
        if log.matches(marker).count() > before {
            return log;
        }
        assert!(std::time::Instant::now() < deadline, "no {marker}: {log}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn vm(t: &TestAgent, name: &str) -> serde_json::Value {
    let vms = t.json(&["vm", "ls", "--json"]);
    vms.as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no vm {name}: {vms}"))
}

/// The VM answers on its channel: it runs.
fn answers(t: &TestAgent, vm: &str) {
    let before = t.ok(&["vm", "log", vm]).matches("SPORE-PONG 7").count();
    t.ok(&["vm", "send", vm, "ping", "7"]);
    wait_marker(t, vm, "SPORE-PONG 7", before);
}

fn nothing_left_of(t: &TestAgent, template: &str) {
    let templates = t.json(&["template", "ls", "--json"]);
    assert_eq!(templates.as_array().map(Vec::len), Some(0), "{templates}");
    let images = t.json(&["image", "ls", "--json"]);
    for i in images.as_array().unwrap() {
        let n = i["name"].as_str().unwrap();
        assert!(
            !n.starts_with(&format!("{template}.")),
            "image {n} left: {images}"
        );
    }
    let ram = t.ram.path().join(format!("tmpl-{template}.ram"));
    assert!(!ram.exists(), "{} left", ram.display());
    let dir = t.data_dir().join("templates").join(template);
    assert!(!dir.exists(), "{} left", dir.display());
}

#[test]
fn a_capture_completes_or_leaves_the_vm_as_it_was() {
    // SAFETY: this binary's only test sets it before any agent starts.
    unsafe {
        std::env::set_var(
            "SPORE_FAILPOINTS",
            "capture-save-state=1,capture-commit=1,capture-place-ram=1,capture-store=1",
        )
    };
    let t = TestAgent::start();
    t.import_guest("base");
    let args = vm_run_args(guest(), "src", "base", "");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    t.ok(&refs);

    // A name the capture needs is taken: refused before the pause.
    let raw = t.path("small.raw");
    std::fs::write(&raw, vec![1u8; 65536]).unwrap();
    t.ok(&[
        "image",
        "import",
        raw.to_str().unwrap(),
        "--name",
        "t3.boot",
    ]);
    let err = t.fails(&["vm", "template", "src", "--name", "t3"]);
    assert!(err.contains("t3.boot"), "{err}");
    assert_eq!(vm(&t, "src")["state"], "running");
    assert!(t
        .json(&["image", "ls", "--json"])
        .to_string()
        .contains("t3.boot"));
    for image in ["t3.ram", "t3.disk"] {
        let images = t.json(&["image", "ls", "--json"]).to_string();
        assert!(!images.contains(image), "{image} made: {images}");
    }
    answers(&t, "src");

    // Failing after the pause, at each step in turn (each point fails
    // once, so each capture gets one step further): undone, and the source
    // runs on, at the last step as a VM of its own.
    for step in [
        "capture-save-state",
        "capture-commit",
        "capture-place-ram",
        "capture-store",
    ] {
        let err = t.fails(&["vm", "template", "src", "--name", "t1"]);
        assert!(err.contains(step), "{step}: {err}");
        nothing_left_of(&t, "t1");
        let v = vm(&t, "src");
        assert_eq!(v["state"], "running", "{step}: {v}");
        assert!(v["template"].is_null(), "{step}: {v}");
        answers(&t, "src");
    }
    let disks = t.json(&["disk", "ls", "--json"]);
    assert_eq!(disks.as_array().map(Vec::len), Some(1), "{disks}");

    // Hot-plugged memory cannot be captured: refused, VM untouched.
    t.ok(&["vm", "resize", "src", "--memory", "640M"]);
    let err = t.fails(&["vm", "template", "src", "--name", "t2"]);
    assert!(err.contains("hot-plugged"), "{err}");
    nothing_left_of(&t, "t2");
    answers(&t, "src");
    t.ok(&["vm", "rm", "src", "--force"]);
}
