//! A data directory written by an earlier spore opens with this one: its
//! images, layers, disks (with writes nobody committed) and VM records are
//! all there, read back byte for byte, and work on.
//!
//! The fixture (`fixtures/datadir-e3ce29e.tar.gz`, 20 KiB) was written by
//! `fixtures/make-old-datadir.sh` with the spore of commit e3ce29e, the
//! last one before the agent was split into services: an image `base`, a
//! layer `layer1` committed over it, a disk `kept` with an uncommitted
//! write, and a VM `vm1` that ran and was stopped. When an on-disk format
//! changes, add a fixture written by the version before the change.

mod common;

use std::process::Command;

use common::{nbd_copy, sh, TestAgent};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/datadir-e3ce29e.tar.gz"
);
const BLOCK: usize = 4096;

/// What `make-old-datadir.sh` imported as `base`: each 4 KiB block holds
/// its own number as text, repeated.
fn base() -> Vec<u8> {
    let mut out = Vec::with_capacity(512 * BLOCK);
    for b in 0..512 {
        let line = format!("spore upgrade fixture block {b:06}\n");
        let block: Vec<u8> = line.bytes().cycle().take(BLOCK).collect();
        out.extend(block);
    }
    out
}

fn fill(bytes: &mut [u8], block: usize, value: u8) {
    bytes[block * BLOCK..(block + 1) * BLOCK].fill(value);
}

fn unpacked() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    sh(Command::new("tar")
        .arg("-C")
        .arg(dir.path())
        .arg("-xzf")
        .arg(FIXTURE));
    assert!(dir.path().join("data/meta.redb").is_file());
    dir
}

#[test]
fn a_data_directory_written_by_the_version_before_the_services_opens_and_works_on() {
    let mut t = TestAgent::start_in(unpacked(), &[]);
    // Stopped cleanly by the earlier version: nothing to settle.
    let status = t.json(&["status", "--json"]);
    assert_eq!(status["recovered"], serde_json::json!([]), "{status}");

    // Names point where they pointed.
    let images = t.json(&["image", "ls", "--json"]);
    let manifest = |name: &str| {
        images
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["name"] == name)
            .unwrap_or_else(|| panic!("image {name} is listed: {images}"))["manifest"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(manifest("base").starts_with("1f14c8392b03"), "{images}");
    assert!(manifest("layer1").starts_with("b7e672604fa4"), "{images}");
    for image in ["base", "layer1"] {
        t.ok(&["image", "inspect", image]);
    }

    // Every export holds the bytes the earlier version was given.
    let base = base();
    let mut layer1 = base.clone();
    fill(&mut layer1, 3, 0x41);
    fill(&mut layer1, 300, 0x42);
    let mut kept = layer1.clone();
    fill(&mut kept, 7, 0x43);
    assert!(nbd_copy(&t, "image/base") == base, "image base differs");
    assert!(
        nbd_copy(&t, "image/layer1") == layer1,
        "image layer1 differs"
    );
    assert!(
        nbd_copy(&t, "disk/layered") == layer1,
        "disk layered differs"
    );
    assert!(nbd_copy(&t, "disk/kept") == kept, "disk kept differs");

    // The VM is as it was left, and can be removed with its disk.
    let vms = t.json(&["vm", "ls", "--json"]);
    let vm = &vms.as_array().unwrap()[0];
    assert_eq!(vm["name"], "vm1", "{vms}");
    assert_eq!(vm["state"], "stopped", "{vms}");
    assert_eq!(vm["image"], "layer1", "{vms}");
    t.ok(&["vm", "rm", "vm1"]);
    assert!(!t.ok(&["disk", "ls"]).contains("vm1"));

    // The old disk takes new writes, and keeps them across a restart.
    sh(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x44 40960 4096", "-c", "flush"])
        .arg(t.uri("disk/kept")));
    fill(&mut kept, 10, 0x44);
    t.restart();
    assert!(nbd_copy(&t, "disk/kept") == kept, "disk kept lost a write");
    // And commits into a new layer over the old ones.
    t.ok(&["disk", "commit", "kept", "--name", "layer2"]);
    assert!(nbd_copy(&t, "image/layer2") == kept, "image layer2 differs");
    let status = t.json(&["status", "--json"]);
    assert_eq!(status["images"], 3, "{status}");
    assert_eq!(status["disks"], 2, "{status}");
    assert_eq!(status["vms"], 0, "{status}");
}
