//! `spore cluster`: hosts in network namespaces with shaped links, agents in
//! a re-export tree, an image read on a leaf through a relay.

mod common;

use std::process::Command;

use common::{sh, sparse_random_file, SPORE};

const MIB: u64 = 1 << 20;

struct Down<'a>(&'a std::path::Path, &'a str);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = Command::new(SPORE)
            .env("SPORE_CLUSTER_DIR", self.0)
            .args(["cluster", "down", "--name", self.1])
            .output();
    }
}

fn spore(dir: &std::path::Path, home: Option<&std::path::Path>, args: &[&str]) -> String {
    let mut c = Command::new(SPORE);
    c.env("SPORE_CLUSTER_DIR", dir).args(args);
    if let Some(h) = home {
        c.env("SPORE_HOME", h);
    }
    sh(&mut c)
}

#[test]
fn a_leaf_reads_an_image_through_its_relay_and_down_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let name = spore_testkit::unique_name("t");
    let _guard = Down(dir.path(), &name);
    let out = spore(
        dir.path(),
        None,
        &[
            "cluster",
            "up",
            "--name",
            &name,
            "--nodes",
            "3",
            "--fanout",
            "2",
            "--bandwidth",
            "400mbit",
        ],
    );
    assert!(out.contains("origin + 3 nodes"), "{out}");
    assert!(out.contains("node3") && out.contains("node1"), "{out}");
    let home = |h: &str| dir.path().join(&name).join(h);

    let src = dir.path().join("img.raw");
    sparse_random_file(&src, 8 * MIB, 31);
    spore(
        dir.path(),
        Some(&home("origin")),
        &["image", "import", src.to_str().unwrap(), "--name", "img"],
    );
    // node3 fetches from node1, which relays from the origin.
    spore(
        dir.path(),
        Some(&home("node3")),
        &["disk", "create", "d", "--image", "img"],
    );
    let copy = dir.path().join("copy.raw");
    let uri = format!(
        "nbd+unix:///disk/d?socket={}",
        home("node3").join("nbd.sock").display()
    );
    sh(Command::new("nbdcopy").arg(&uri).arg(&copy));
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&src).unwrap());
    let status = |h: &str| -> serde_json::Value {
        serde_json::from_str(&spore(dir.path(), Some(&home(h)), &["status", "--json"])).unwrap()
    };
    let node1 = status("node1");
    assert!(
        node1["served_chunks"].as_u64().unwrap() > 0,
        "node1 relayed: {node1}"
    );
    assert!(
        node1["sources"][0]["url"]
            .as_str()
            .unwrap()
            .contains("10.77.255.254"),
        "{node1}"
    );
    let node2 = status("node2");
    assert_eq!(
        node2["sources"][0]["chunks"], 0,
        "node2 was not involved: {node2}"
    );

    // A second host reads everything too: the origin still sent each chunk
    // at most once (its only child is node1, which relays for the tree).
    spore(
        dir.path(),
        Some(&home("node2")),
        &["disk", "create", "d", "--image", "img"],
    );
    let uri2 = format!(
        "nbd+unix:///disk/d?socket={}",
        home("node2").join("nbd.sock").display()
    );
    let copy2 = dir.path().join("copy2.raw");
    sh(Command::new("nbdcopy").arg(&uri2).arg(&copy2));
    assert_eq!(std::fs::read(&copy2).unwrap(), std::fs::read(&src).unwrap());
    let inspect = spore(
        dir.path(),
        Some(&home("origin")),
        &["image", "inspect", "img", "--json"],
    );
    let chunks = serde_json::from_str::<serde_json::Value>(&inspect).unwrap()["chunks"]
        .as_u64()
        .unwrap();
    let served = status("origin")["served_chunks"].as_u64().unwrap();
    assert!(
        served <= chunks + 2,
        "origin served {served} chunks for an image of {chunks}"
    );

    // node1, the relay everyone's chunks pass through, dies: node3 still
    // gets a new image, from the origin.
    let relay = home("node1");
    let pids = sh(Command::new("pgrep")
        .arg("-f")
        .arg(format!("data-dir {} agent", relay.display())));
    for pid in pids.split_whitespace() {
        sh(Command::new("kill").arg("-9").arg(pid));
    }
    let src2 = dir.path().join("img2.raw");
    sparse_random_file(&src2, 4 * MIB, 32);
    spore(
        dir.path(),
        Some(&home("origin")),
        &["image", "import", src2.to_str().unwrap(), "--name", "img2"],
    );
    spore(
        dir.path(),
        Some(&home("node3")),
        &["disk", "create", "d2", "--image", "img2"],
    );
    let uri3 = format!(
        "nbd+unix:///disk/d2?socket={}",
        home("node3").join("nbd.sock").display()
    );
    let copy3 = dir.path().join("copy3.raw");
    sh(Command::new("nbdcopy").arg(&uri3).arg(&copy3));
    assert_eq!(
        std::fs::read(&copy3).unwrap(),
        std::fs::read(&src2).unwrap()
    );

    let out = spore(dir.path(), None, &["cluster", "down", "--name", &name]);
    assert!(
        out.contains("4 namespaces") || out.contains("5 namespaces"),
        "{out}"
    );
    let left = sh(Command::new("ip").args(["netns", "list"]));
    assert!(
        !left.lines().any(|l| l.starts_with(&format!("{name}-"))),
        "left behind: {left}"
    );
}
