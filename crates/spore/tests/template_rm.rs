//! `template rm` is atomic or finished later, never half-done: a removal
//! that stops half-way (fail-points `template-rm-standbys` and
//! `template-rm-images`, each failing once, set in the agent's environment:
//! hence a binary of its own) leaves a template marked as being removed,
//! from which nothing starts, and the next `template rm` or the agent's next
//! start finishes it, saying so in `spore status`. A blocker (a clone)
//! refuses the removal before anything is touched.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{guest, vm_run_args, TestAgent};

/// Standby clones `vm ls` shows.
fn standbys(t: &TestAgent) -> usize {
    t.json(&["vm", "ls", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["state"] == "standby")
        .count()
}

/// Waits until `vm ls` shows a VM in state `standby`.
fn wait_standby(t: &TestAgent) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while standbys(t) == 0 {
        assert!(Instant::now() < deadline, "no standby clone");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The names in `image ls` that belong to template `name`.
fn images_of(t: &TestAgent, name: &str) -> Vec<String> {
    t.json(&["image", "ls", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["name"].as_str())
        .filter(|n| n.starts_with(&format!("{name}.")))
        .map(str::to_owned)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Nothing of template `name` left: no record, image, RAM file, directory
/// or standby QEMU.
fn all_gone(t: &TestAgent, ram: &Path, name: &str) {
    let templates = t.json(&["template", "ls", "--json"]);
    assert!(
        !templates.to_string().contains(&format!("\"{name}\"")),
        "{templates}"
    );
    assert_eq!(images_of(t, name), Vec::<String>::new());
    assert!(!ram.join(format!("tmpl-{name}.ram")).exists());
    assert!(!t.data_dir().join("templates").join(name).exists());
    assert_eq!(standbys(t), 0);
    assert_eq!(t.qemu_count(), 0, "a QEMU is left");
}

#[test]
fn a_template_rm_stopped_half_way_is_finished_by_the_next_rm_or_the_next_start() {
    // SAFETY: this binary's only test sets it, with no other thread
    // reading the environment (here and below).
    unsafe { std::env::set_var("SPORE_FAILPOINTS", "template-rm-standbys=1") };
    let mut t = TestAgent::start_with(&["--clone-standby", "1"]);
    let ram = t.ram.path().to_owned();
    t.import_guest("base");
    let args = vm_run_args(guest(), "src", "base", "quiet");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    t.ok(&refs);
    t.ok(&["vm", "template", "src", "--name", "t", "--stop"]);
    wait_standby(&t);

    // A clone blocks the removal before anything is touched: the standby
    // stays, the template stays usable.
    t.ok(&["vm", "clone", "t", "--name", "c"]);
    wait_standby(&t);
    let err = t.fails(&["template", "rm", "t"]);
    assert!(err.contains("in use by vm c"), "{err}");
    let info = t.json(&["template", "inspect", "t", "--json"]);
    assert_eq!(info["removing"], false, "{info}");
    t.ok(&["vm", "rm", "--group", "c"]);

    // Stopped once the standbys are gone: marked, nothing starts from it,
    // every image still there; the next `template rm` finishes.
    let err = t.fails(&["template", "rm", "t"]);
    assert!(
        err.contains("stopped half-way") && err.contains("template-rm-standbys"),
        "{err}"
    );
    let info = t.json(&["template", "inspect", "t", "--json"]);
    assert_eq!(info["removing"], true, "{info}");
    assert_eq!(images_of(&t, "t").len(), 3);
    let err = t.fails(&["vm", "clone", "t", "--name", "d"]);
    assert!(err.contains("being removed"), "{err}");
    assert_eq!(t.qemu_count(), 0, "the standby's QEMU is left");
    // No standby comes back for a template being removed.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(standbys(&t), 0);
    t.ok(&["template", "rm", "t"]);
    all_gone(&t, &ram, "t");

    // Stopped after its RAM image went: the agent's next start finishes
    // it and says so.
    unsafe { std::env::set_var("SPORE_FAILPOINTS", "template-rm-images=1") };
    t.restart();
    let args = vm_run_args(guest(), "src2", "base", "quiet");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    t.ok(&refs);
    t.ok(&["vm", "template", "src2", "--name", "t2", "--stop"]);
    wait_standby(&t);
    let err = t.fails(&["template", "rm", "t2"]);
    assert!(err.contains("template-rm-images"), "{err}");
    assert_eq!(images_of(&t, "t2"), ["t2.boot", "t2.disk"]);
    unsafe { std::env::remove_var("SPORE_FAILPOINTS") };
    t.crash_and_restart();
    let status = t.json(&["status", "--json"]);
    let recovered = status["recovered"].to_string();
    assert!(
        recovered.contains("template t2: finished its removal"),
        "{status}"
    );
    assert!(
        t.ok(&["status"]).contains("left by the previous run"),
        "the report is shown"
    );
    all_gone(&t, &ram, "t2");
    // The source VMs were stopped by their capture; the base is whole.
    t.ok(&["vm", "rm", "src", "--force"]);
    t.ok(&["vm", "rm", "src2", "--force"]);
    t.ok(&["image", "rm", "base"]);
}
