//! Disks: writes through real NBD clients, durability across restarts and
//! crashes, and commit into a new layer.

mod common;

use std::process::Command;

use common::{sh, sparse_random_file, TestAgent};

const MIB: u64 = 1 << 20;

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = sh(c.arg(uri));
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification"),
        "qemu-io {cmds:?}: {out}"
    );
    out
}

fn nbd_bytes(t: &TestAgent, export: &str) -> Vec<u8> {
    let copy = t.path("nbdcopy.out");
    let _ = std::fs::remove_file(&copy);
    sh(Command::new("nbdcopy").arg(t.uri(export)).arg(&copy));
    std::fs::read(&copy).unwrap()
}

#[test]
fn writes_survive_restart_and_kill_9_after_flush_and_commit_makes_a_layer() {
    let mut t = TestAgent::start();
    let base = t.path("base.raw");
    sparse_random_file(&base, 8 * MIB, 9);
    t.ok(&["image", "import", base.to_str().unwrap(), "--name", "base"]);
    t.ok(&["disk", "create", "d", "--image", "base"]);
    let mut expect = std::fs::read(&base).unwrap();
    let uri = t.uri("disk/d");

    // Aligned, unaligned (read-modify-write of base data), zeroes, trim.
    qemu_io(
        &uri,
        &[
            "write -P 0xab 1048576 65536",
            "write -P 0xcd 12345 100",
            "write -P 0xee 4095 2",
            "write -z 2097152 131072",
            "discard 3145728 65536",
            "write -P 0x77 3211264 8192",
            "discard 3211264 4096",
            "flush",
        ],
    );
    expect[1048576..1048576 + 65536].fill(0xab);
    expect[12345..12445].fill(0xcd);
    expect[4095..4097].fill(0xee);
    expect[2097152..2097152 + 131072].fill(0);
    // A trim of space the VM never wrote forgets nothing: the image shows
    // through (docs/nbd.md; NBD leaves trimmed contents unspecified); what
    // it wrote and then trimmed reads as zero.
    expect[3211264..3211264 + 8192].fill(0x77);
    expect[3211264..3211264 + 4096].fill(0);
    assert_eq!(nbd_bytes(&t, "disk/d"), expect, "reads after writes");

    t.restart();
    qemu_io(
        &uri,
        &["read -P 0xab 1048576 65536", "read -P 0xcd 12345 100"],
    );
    assert_eq!(nbd_bytes(&t, "disk/d"), expect, "after a graceful restart");

    // FUA write and an explicit flush, then SIGKILL: both must survive.
    qemu_io(
        &uri,
        &[
            "write -f -P 0x11 5242880 8192",
            "write -P 0x22 6291456 4096",
            "flush",
        ],
    );
    expect[5242880..5242880 + 8192].fill(0x11);
    expect[6291456..6291456 + 4096].fill(0x22);
    t.crash_and_restart();
    assert_eq!(
        nbd_bytes(&t, "disk/d"),
        expect,
        "after kill -9 of the agent"
    );

    // Commit: a new image with one more layer and exactly the disk's bytes.
    t.ok(&["disk", "commit", "d", "--name", "next"]);
    let info = t.json(&["image", "inspect", "next", "--json"]);
    assert_eq!(info["layers"], 2, "{info}");
    assert!(
        info["layer_list"][1]["blocks"].as_u64().unwrap() <= 8,
        "{info}"
    );
    assert_eq!(nbd_bytes(&t, "image/next"), expect, "committed image");
    // The base image is unchanged by all of it.
    assert_eq!(nbd_bytes(&t, "image/base"), std::fs::read(&base).unwrap());
    let disks = t.json(&["disk", "ls", "--json"]);
    assert!(disks[0]["written_bytes"].as_u64().unwrap() >= 65536);
    assert!(disks[0]["read_bytes"].as_u64().unwrap() >= expect.len() as u64);
    // The table has a value under every heading (sizes print as "N unit").
    let table = t.ok(&["disk", "ls"]);
    let mut lines = table.lines();
    let heads = lines.next().unwrap().split_whitespace().count();
    let row = lines
        .next()
        .unwrap()
        .replace(" KiB", "KiB")
        .replace(" MiB", "MiB")
        .replace(" B", "B");
    assert_eq!(row.split_whitespace().count(), heads, "{table}");
}

#[test]
fn several_connections_write_different_regions_at_once() {
    let t = TestAgent::start();
    let base = t.path("base.raw");
    sparse_random_file(&base, 4 * MIB, 10);
    t.ok(&[
        "image",
        "import",
        base.to_str().unwrap(),
        "--name",
        "base",
        "--block-size",
        "4K",
    ]);
    t.ok(&["disk", "create", "d", "--image", "base"]);
    let uri = t.uri("disk/d");
    std::thread::scope(|s| {
        for i in 0..4u64 {
            let uri = uri.clone();
            s.spawn(move || {
                let off = i * MIB;
                let cmds = [
                    format!("aio_write -P {} {off} 512k", i + 1),
                    "aio_flush".into(),
                    format!("read -P {} {off} 512k", i + 1),
                ];
                let cmds: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
                qemu_io(&uri, &cmds);
            });
        }
    });
    for i in 0..4u64 {
        qemu_io(&uri, &[&format!("read -P {} {} 512k", i + 1, i * MIB)]);
    }
}

/// One disk whose overlay metadata is damaged does not take the host down:
/// the agent starts, serves the other disk, and lists the damaged one as
/// broken, its files left for repair.
#[test]
fn a_damaged_disk_is_reported_and_the_rest_of_the_host_starts() {
    let mut t = TestAgent::start();
    let base = t.path("base.raw");
    sparse_random_file(&base, 4 * MIB, 3);
    t.ok(&["image", "import", base.to_str().unwrap(), "--name", "base"]);
    t.ok(&["disk", "create", "bad", "--image", "base"]);
    t.ok(&["disk", "create", "good", "--image", "base"]);
    qemu_io(&t.uri("disk/good"), &["write -P 0x5a 0 65536", "flush"]);
    t.agent.take().unwrap().stop().unwrap();
    let meta = t.data_dir().join("disks/bad/meta");
    std::fs::File::options()
        .write(true)
        .open(&meta)
        .unwrap()
        .set_len(10)
        .unwrap();
    t.restart_stopped();
    qemu_io(&t.uri("disk/good"), &["read -P 0x5a 0 65536"]);
    let disks = t.json(&["disk", "ls", "--json"]);
    let bad = disks
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "bad")
        .unwrap_or_else(|| panic!("{disks}"));
    assert!(
        bad["broken"].as_str().is_some_and(|b| b.contains("slot")),
        "{bad}"
    );
    assert!(meta.exists(), "the damaged files were removed");
}
