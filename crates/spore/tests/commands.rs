//! Commands no other test drives, each used as a user would: template
//! push and pull between hosts, `image pull --background`, `vm log
//! --follow` and `--until`, `cluster ls`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{guest, sh, sparse_random_file, vm_run_args, TestAgent, SPORE};

const MIB: u64 = 1 << 20;

fn url(port: u16) -> String {
    format!("https://127.0.0.1:{port}")
}

/// Waits until a whole line with `marker` shows in the VM's console log.
fn wait_log(t: &TestAgent, vm: &str, marker: &str) -> String {
    t.wait_console(vm, marker, 90)
}

#[test]
fn a_template_pushed_to_an_origin_is_pulled_and_cloned_on_another_host() {
    let (origin, port) = TestAgent::start_listening(&["--accept-push"]);
    let a = TestAgent::start_with(&["--origin", &url(port)]);
    a.import_guest("base");
    a.ok(&["image", "push", "base", "--to", &url(port)]);
    let args = vm_run_args(guest(), "src", "base", "quiet");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    a.ok(&refs);
    a.ok(&["vm", "template", "src", "--name", "t", "--stop"]);
    let out = a.ok(&["template", "push", "t", "--to", &url(port)]);
    assert!(out.contains("t"), "{out}");
    // Pushes land in the origin's store, not among its own images.
    assert!(origin
        .json(&["template", "ls", "--json"])
        .as_array()
        .unwrap()
        .is_empty());

    let b = TestAgent::start_with(&["--origin", &url(port)]);
    b.ok(&["template", "pull", "t"]);
    let info = b.json(&["template", "inspect", "t", "--json"]);
    assert_eq!(info["name"], "t", "{info}");
    // Pulled whole: every chunk of its RAM image is here.
    let ram = b.json(&["image", "inspect", "t.ram", "--json"]);
    assert_eq!(ram["local_chunks"], ram["chunks"], "{ram}");
    let r = b.json(&["vm", "clone", "t", "--name", "c", "--json"]);
    let vm = r["vms"][0]["name"].as_str().unwrap().to_owned();
    assert_eq!(r["vms"][0]["state"], "running", "{r}");
    b.ok(&["vm", "send", &vm, "ping", "5"]);
    wait_log(&b, &vm, "SPORE-PONG 5");
    b.ok(&["vm", "rm", "--group", "c"]);
}

#[test]
fn pull_in_the_background_returns_at_once_and_completes_the_image() {
    let (origin, port) = TestAgent::start_listening(&["--accept-push"]);
    let src = origin.path("img.raw");
    sparse_random_file(&src, 32 * MIB, 31);
    origin.ok(&["image", "import", src.to_str().unwrap(), "--name", "img"]);
    let host = TestAgent::start_with(&["--origin", &url(port)]);
    let out = host.ok(&["image", "pull", "img", "--background"]);
    assert!(out.contains("background"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let i = host.json(&["image", "inspect", "img", "--json"]);
        if i["local_chunks"] == i["chunks"] {
            break;
        }
        assert!(Instant::now() < deadline, "not completed: {i}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Complete: it reads without the origin.
    let expect = std::fs::read(&src).unwrap();
    drop(origin);
    assert_eq!(common::nbd_copy(&host, "image/img"), expect);
}

#[test]
fn vm_log_follows_the_console_and_until_stops_at_a_marker() {
    let t = TestAgent::start();
    t.import_guest("base");
    let args = vm_run_args(guest(), "v", "base", "quiet");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    t.ok(&refs);
    let mut follow = Command::new(SPORE)
        .env("SPORE_HOME", t.data_dir())
        .args(["vm", "log", "v", "--follow"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    t.ok(&["vm", "send", "v", "ping", "4242"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = false;
    while Instant::now() < deadline && !seen {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
            seen = line.contains("SPORE-PONG 4242");
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(seen, "--follow did not print the new line");
    // --until: exit 0 at the marker, 1 when it does not come in time.
    t.ok(&["vm", "send", "v", "ping", "77"]);
    let ok = t.run(&[
        "vm",
        "log",
        "v",
        "--until",
        "SPORE-PONG 77",
        "--timeout",
        "30",
    ]);
    assert!(ok.status.success(), "{ok:?}");
    let late = t.run(&[
        "vm",
        "log",
        "v",
        "--until",
        "NEVER-PRINTED",
        "--timeout",
        "2",
    ]);
    assert_eq!(late.status.code(), Some(1), "{late:?}");
    t.ok(&["vm", "rm", "v", "--force"]);
}

#[test]
fn cluster_ls_lists_the_hosts_and_their_agents() {
    let dir = tempfile::tempdir().unwrap();
    let name = spore_testkit::unique_name("l");
    let cmd = |args: &[&str]| {
        let mut c = Command::new(SPORE);
        c.env("SPORE_CLUSTER_DIR", dir.path()).args(args);
        c
    };
    sh(&mut cmd(&[
        "cluster", "up", "--name", &name, "--nodes", "1",
    ]));
    let out = sh(&mut cmd(&["cluster", "ls", "--name", &name]));
    let down = cmd(&["cluster", "down", "--name", &name]).output();
    assert!(out.contains("origin") && out.contains("node1"), "{out}");
    assert!(down.unwrap().status.success());
}

/// The origin goes away for a few seconds while an image completes in the
/// background: completion tries again and finishes once it is back (it
/// used to stop for good until the agent restarted).
#[test]
fn background_completion_survives_an_origin_outage() {
    let (mut origin, port) = TestAgent::start_listening(&["--accept-push"]);
    let src = origin.path("img.raw");
    sparse_random_file(&src, 48 * MIB, 32);
    origin.ok(&["image", "import", src.to_str().unwrap(), "--name", "img"]);
    let expect = std::fs::read(&src).unwrap();
    let host = TestAgent::start_with(&["--origin", &url(port)]);
    // The name resolved (manifest and layers here), the data not yet.
    host.ok(&["disk", "create", "d", "--image", "img"]);
    origin.agent.take().unwrap().kill();
    host.ok(&["image", "pull", "img", "--background"]);
    std::thread::sleep(Duration::from_secs(3));
    let during = host.json(&["image", "inspect", "img", "--json"]);
    assert_ne!(
        during["local_chunks"], during["chunks"],
        "complete without the origin: {during}"
    );
    origin.restart_stopped();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let i = host.json(&["image", "inspect", "img", "--json"]);
        if i["local_chunks"] == i["chunks"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never completed after the outage: {i}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(origin);
    assert_eq!(common::nbd_copy(&host, "image/img"), expect);
}
