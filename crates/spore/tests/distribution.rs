//! Images moving between hosts: push to an origin, run on a host that lacks
//! the image (chunks fetched on demand, verified), peers before the origin,
//! and what happens when a source lies or dies. Agents talk over loopback.

mod common;

use std::process::Command;

use common::{chunk_files, nbd_copy, sh, sparse_random_file, TestAgent};
use spore_transfer::fake_peer;

const MIB: u64 = 1 << 20;

fn url(port: u16) -> String {
    format!("https://127.0.0.1:{port}")
}

/// An origin agent on a free loopback port.
fn start_origin() -> (TestAgent, u16) {
    let (agent, port) = TestAgent::start_listening(&["--accept-push"]);
    (agent, port)
}

/// An origin holding the demo guest's disk as image `guest`, its port,
/// and a cold host that names it as its origin.
fn origin_with_guest_and_cold_host() -> (TestAgent, u16, TestAgent) {
    let (origin, origin_port) = start_origin();
    origin.ok(&[
        "image",
        "import",
        common::guest().rootfs.to_str().unwrap(),
        "--name",
        "guest",
    ]);
    let cold = TestAgent::start_with(&["--origin", &url(origin_port)]);
    (origin, origin_port, cold)
}

#[test]
fn a_cold_host_reads_an_image_from_the_origin_on_demand_and_verifies_it() {
    let (origin, origin_port) = start_origin();
    let builder = TestAgent::start();
    let src = builder.path("img.raw");
    sparse_random_file(&src, 16 * MIB, 21);
    builder.ok(&["image", "import", src.to_str().unwrap(), "--name", "img"]);
    let out = builder.ok(&["image", "push", "img", "--to", &url(origin_port)]);
    assert!(out.contains("pushed img"), "{out}");
    // Binding a name to a manifest the origin does not have is refused
    // clearly, and so is pushing to an agent that does not accept pushes.
    let bogus = sh(Command::new("curl")
        .args(common::curl_tls(&origin.tls_dir()))
        .args([
            "-sS",
            "-X",
            "PUT",
            "-d",
            &format!("{{\"manifest\":\"{}\"}}", "ab".repeat(32)),
        ])
        .arg(format!("{}/v1/images/bogus", url(origin_port))));
    assert!(bogus.contains("is not here"), "{bogus}");
    let (_plain, plain_port) = TestAgent::start_listening(&[]);
    let err = builder.fails(&["image", "push", "img", "--to", &url(plain_port)]);
    assert!(err.contains("does not accept pushes"), "{err}");
    // A second push sends nothing new.
    let out = builder.ok(&["image", "push", "img", "--to", &url(origin_port)]);
    assert!(out.contains(", 0 sent"), "{out}");

    // A host with nothing: the name resolves at the origin, only manifest
    // and layers come at once, data chunks come as they are read.
    let cold = TestAgent::start_with(&["--origin", &url(origin_port)]);
    cold.ok(&["disk", "create", "d", "--image", "img"]);
    let before = chunk_files(&cold).len();
    assert!(
        before <= 3,
        "only manifest and layer fetched up front, found {before}"
    );
    sh(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4096"])
        .arg(cold.uri("disk/d")));
    let after_one_read = chunk_files(&cold).len();
    assert!(
        after_one_read > before && after_one_read <= before + 16,
        "one read fetched {} chunks",
        after_one_read - before
    );
    assert_eq!(nbd_copy(&cold, "image/img"), std::fs::read(&src).unwrap());
    // Export on a host that has only part of the image fetches the rest.
    let half = TestAgent::start_with(&["--origin", &url(origin_port)]);
    half.ok(&["disk", "create", "d", "--image", "img"]);
    let out = half.path("export.raw");
    half.ok(&["image", "export", "img", out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());

    // A corrupt chunk at a peer is detected and fetched from the origin.
    let (peer, peer_port) = TestAgent::start_listening(&["--origin", &url(origin_port)]);
    peer.ok(&["disk", "create", "warm", "--image", "img"]);
    let _ = nbd_copy(&peer, "image/img");
    let mut corrupted = 0;
    for f in chunk_files(&peer) {
        let mut b = std::fs::read(&f).unwrap();
        if b.len() > 1000 {
            let n = b.len();
            b[n - 10] ^= 0xff;
            std::fs::write(&f, &b).unwrap();
            corrupted += 1;
        }
    }
    assert!(corrupted > 10);
    // Bound by this test and never listening: connections are refused.
    let (_dead, dead_port) = spore_testkit::refused_port();
    let third = TestAgent::start_with(&[
        "--peer",
        &url(dead_port), // a dead peer
        "--peer",
        &url(peer_port),
        "--origin",
        &url(origin_port),
    ]);
    third.ok(&["disk", "create", "d", "--image", "img"]);
    assert_eq!(
        nbd_copy(&third, "disk/d"),
        std::fs::read(&src).unwrap(),
        "no wrong byte from a lying peer"
    );
    let log = std::fs::read_to_string(third.dir.path().join("data.agent.log")).unwrap();
    assert!(
        log.contains("remote sent a bad chunk"),
        "the lie was noticed: {log}"
    );
    let status = third.json(&["status", "--json"]);
    let sources = status["sources"].as_array().unwrap();
    assert_eq!(sources.len(), 3, "{status}");
    assert!(
        sources[0]["failures"].as_u64().unwrap() >= 1,
        "the dead peer failed: {status}"
    );
    assert!(
        sources[1]["corrupt"].as_u64().unwrap() >= 1,
        "the lying peer was caught: {status}"
    );
    assert!(
        sources[2]["chunks"].as_u64().unwrap() >= 1,
        "the origin filled in: {status}"
    );

    // The origin dies: what is local still reads; what is not fails with
    // an I/O error (no hang), and the agent says why.
    drop(origin);
    let fourth = TestAgent::start_with(&["--origin", &url(origin_port)]);
    let err = fourth.fails(&["disk", "create", "x", "--image", "img"]);
    assert!(err.contains("origin"), "{err}");
    let started = std::time::Instant::now();
    let out = Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read 8M 4096"])
        .arg(cold.uri("image/img"))
        .output()
        .unwrap();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "read hung"
    );
    // `cold` read everything already, so this still works.
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_read_no_source_can_serve_fails_with_an_io_error_and_a_reason() {
    let (origin, origin_port) = start_origin();
    let src = origin.path("img.raw");
    sparse_random_file(&src, 8 * MIB, 22);
    origin.ok(&["image", "import", src.to_str().unwrap(), "--name", "img"]);
    let cold = TestAgent::start_with(&["--origin", &url(origin_port)]);
    cold.ok(&["disk", "create", "d", "--image", "img"]);
    drop(origin);
    let started = std::time::Instant::now();
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4096"])
        .arg(cold.uri("disk/d"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("Input/output error") || text.contains("failed"),
        "{text}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "read hung"
    );
    let log = std::fs::read_to_string(cold.dir.path().join("data.agent.log")).unwrap();
    assert!(
        log.contains("no source has chunk"),
        "agent log says why: {log}"
    );
}

/// A guest writes 512 bytes (less than the host's 4 KiB granule) into a
/// block its host has not fetched while the origin is down: the host cannot
/// read the rest of the granule, so the VM pauses (QEMU's werror=stop)
/// instead of seeing an I/O error. Once the origin is back the agent
/// fetches the block and resumes the VM; the write lands exactly (the file
/// reads back as the image's bytes with that sector replaced) and the
/// guest's kernel never logged an I/O error.
#[test]
fn a_guest_write_needing_an_unfetched_block_pauses_the_vm_until_the_block_arrives() {
    let g = common::guest();
    let (mut origin, _, cold) = origin_with_guest_and_cold_host();
    let args = common::vm_run_args(g, "v", "guest", "");
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    cold.ok(&args);
    // What the file must read as: the image's bytes, one sector replaced:
    // 8 MiB into it, in a block nothing else shares (its first blocks
    // share a chunk with what the boot read).
    let sector = 16387;
    let expect_file = cold.path("filler-000");
    sh(Command::new("debugfs").args([
        "-R",
        &format!("dump /data/filler-000 {}", expect_file.display()),
        g.rootfs.to_str().unwrap(),
    ]));
    let mut expect = std::fs::read(&expect_file).unwrap();
    // The same sector on the guest's disk: written there, under ext4.
    let block = sh(Command::new("debugfs")
        .args(["-R", &format!("bmap /data/filler-000 {}", sector / 8)])
        .arg(&g.rootfs));
    let block: u64 = block.trim().parse().expect("a block number");
    let disk_sector = block * 8 + (sector as u64 % 8);
    let pattern: Vec<u8> = b"spore\n".iter().copied().cycle().take(512).collect();
    expect[sector * 512..(sector + 1) * 512].copy_from_slice(&pattern);
    std::fs::write(&expect_file, &expect).unwrap();
    let expect = sh(Command::new("sha256sum").arg(&expect_file));
    let expect = expect.split_whitespace().next().unwrap().to_owned();

    let log_of = |t: &TestAgent| t.ok(&["vm", "log", "v"]);
    // The guest's channel helper runs from the disk: once it has taken its
    // identity, everything it needs to poke is read, and the only block
    // left unfetched that matters is the one the write needs.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !log_of(&cold).contains("SPORE-IDENTITY") {
        assert!(
            std::time::Instant::now() < deadline,
            "no identity: {}",
            log_of(&cold)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // The poke helper itself is paged in from the disk when it first runs:
    // read it whole now, while the origin serves, so that its pages are in
    // the guest's cache and the write is the only thing left waiting.
    cold.ok(&["vm", "send", "v", "sum", "/sbin/spore-poke"]);
    while !log_of(&cold).contains("SPORE-SUM /sbin/spore-poke") {
        assert!(
            std::time::Instant::now() < deadline,
            "no sum of the poke helper: {}",
            log_of(&cold)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    origin.agent.as_mut().unwrap().stop().expect("origin stops");
    origin.agent = None;
    cold.ok(&[
        "vm",
        "send",
        "v",
        "poke",
        "/dev/vda",
        &disk_sector.to_string(),
    ]);
    // Every fetch is refused at once: the write has failed on the host by
    // now, many times over (the agent retries each second).
    std::thread::sleep(std::time::Duration::from_secs(10));
    let log = log_of(&cold);
    assert!(
        !log.contains("SPORE-POKE"),
        "the write finished while no source could serve its block: {log}"
    );

    origin.restart_stopped();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while !log_of(&cold).contains("SPORE-POKE") {
        assert!(
            std::time::Instant::now() < deadline,
            "the write never finished: {}",
            log_of(&cold)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    cold.ok(&["vm", "send", "v", "sum", "/data/filler-000"]);
    while !log_of(&cold).contains("SPORE-SUM /data/filler-000") {
        assert!(std::time::Instant::now() < deadline, "no sum");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let log = log_of(&cold);
    assert!(
        log.contains(&format!("SPORE-POKED /dev/vda {disk_sector}")),
        "the write failed: {log}"
    );
    assert!(
        log.contains(&format!("SPORE-SUM /data/filler-000 {expect}")),
        "the file is not the image's bytes with the sector written: {log}"
    );
    assert!(
        !log.contains("I/O error"),
        "the guest saw an I/O error: {log}"
    );
    let agent_log = std::fs::read_to_string(cold.dir.path().join("data.agent.log")).unwrap();
    assert!(
        agent_log.contains("VM resumed after its I/O pause"),
        "the VM was never paused and resumed: {agent_log}"
    );
    cold.ok(&["vm", "rm", "v", "--force"]);
}

#[test]
fn a_guest_boots_on_a_host_without_the_image_fetching_only_what_it_reads() {
    let g = common::guest();
    let (_origin, _, cold) = origin_with_guest_and_cold_host();
    let args = common::vm_run_args(g, "v", "guest", "spore.poweroff");
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let out = cold.ok(&args);
    assert!(out.contains("SPORE-READY"), "{out}");
    let info = cold.json(&["image", "inspect", "guest", "--json"]);
    let fetched = info["local_bytes"].as_u64().unwrap();
    let size = info["stored_bytes"]
        .as_u64()
        .unwrap()
        .max(info["data_blocks"].as_u64().unwrap() * 65536);
    assert!(fetched > 0);
    assert!(
        fetched * 10 < size,
        "a boot fetched {fetched} of {size} bytes"
    );
    eprintln!("cold boot fetched {fetched} bytes of a {size}-byte image");
}

#[test]
fn completed_images_survive_an_origin_outage() {
    let (origin, origin_port) = start_origin();
    let src = origin.path("img.raw");
    sparse_random_file(&src, 12 * MIB, 23);
    origin.ok(&["image", "import", src.to_str().unwrap(), "--name", "img"]);

    // Foreground pull.
    let pulled = TestAgent::start_with(&["--origin", &url(origin_port)]);
    let out = pulled.ok(&["image", "pull", "img"]);
    assert!(out.contains("were missing and are fetched"), "{out}");
    // Background completion as the agent's policy: the first use starts it.
    let lazy = TestAgent::start_with(&["--origin", &url(origin_port), "--complete-images"]);
    lazy.ok(&["disk", "create", "d", "--image", "img"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let info = lazy.json(&["image", "inspect", "img", "--json"]);
        if info["local_chunks"] == info["chunks"] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "background completion stalled: {info}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    let expect = std::fs::read(&src).unwrap();
    drop(origin);
    for t in [&pulled, &lazy] {
        t.ok(&["disk", "create", "after", "--image", "img"]);
        assert_eq!(nbd_copy(t, "disk/after"), expect);
    }
}

/// Polls `image inspect` until `ready` holds for it, for at most 60 s.
fn wait_inspect(
    t: &TestAgent,
    image: &str,
    what: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let info = t.json(&["image", "inspect", image, "--json"]);
        if ready(&info) {
            return info;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {info}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn the_first_boot_records_a_profile_that_travels_and_drives_prefetch() {
    let g = common::guest();
    let (origin, origin_port) = start_origin();
    origin.ok(&[
        "image",
        "import",
        g.rootfs.to_str().unwrap(),
        "--name",
        "guest",
    ]);

    // Host A boots first and records which blocks the boot reads.
    let a = TestAgent::start_with(&["--origin", &url(origin_port), "--profile-seconds", "10"]);
    let args = common::vm_run_args(g, "v", "guest", "");
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    assert!(a.ok(&args).contains("SPORE-READY"));
    let info = wait_inspect(&a, "guest", "profile recorded", |i| {
        !i["profile_blocks"].is_null()
    });
    let profile = info["profile_blocks"].as_u64().unwrap();
    let chunks = info["chunks"].as_u64().unwrap();
    assert!(
        profile > 0 && profile * 10 < chunks,
        "profile of {profile} of {chunks} chunks"
    );

    // The profile travels with the image.
    let out = a.ok(&["image", "push", "guest", "--to", &url(origin_port)]);
    assert!(
        out.contains("1 sent"),
        "only the profile is new at the origin: {out}"
    );
    assert_eq!(
        origin.json(&["image", "inspect", "guest", "--json"])["profile_blocks"],
        profile
    );

    // Host B prefetches the working set as soon as it learns of the image,
    // before any guest reads, then boots.
    let b = TestAgent::start_with(&["--origin", &url(origin_port)]);
    b.ok(&["disk", "create", "warmup", "--image", "guest"]);
    let info = wait_inspect(&b, "guest", "prefetch", |i| {
        i["local_chunks"].as_u64().unwrap() >= profile
    });
    assert!(
        info["local_chunks"].as_u64().unwrap() < chunks / 5,
        "prefetch took only the working set: {info}"
    );
    let args = common::vm_run_args(g, "w", "guest", "");
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    assert!(b.ok(&args).contains("SPORE-READY"));
}

#[test]
fn a_relay_fetches_each_chunk_from_the_origin_once_however_many_hosts_ask() {
    let (origin, origin_port) = start_origin();
    let src = origin.path("img.raw");
    sparse_random_file(&src, 16 * MIB, 24);
    origin.ok(&["image", "import", src.to_str().unwrap(), "--name", "img"]);
    let expect = std::fs::read(&src).unwrap();
    let chunks = origin.json(&["image", "inspect", "img", "--json"])["chunks"]
        .as_u64()
        .unwrap();

    // origin ← relay ← leaves: the leaves name the relay as their origin.
    let (relay, relay_port) =
        TestAgent::start_listening(&["--origin", &url(origin_port), "--relay"]);
    let leaves: Vec<TestAgent> = (0..3)
        .map(|_| TestAgent::start_with(&["--origin", &url(relay_port)]))
        .collect();
    for leaf in &leaves {
        leaf.ok(&["disk", "create", "d", "--image", "img"]);
    }
    std::thread::scope(|s| {
        for leaf in &leaves {
            let expect = &expect;
            s.spawn(move || assert_eq!(&nbd_copy(leaf, "disk/d"), expect));
        }
    });
    let served = origin.json(&["status", "--json"])["served_chunks"]
        .as_u64()
        .unwrap();
    // Data chunks, plus the manifest and the layer: each at most once.
    assert!(
        served <= chunks + 2,
        "origin served {served} chunks for an image of {chunks}"
    );
    let relayed = relay.json(&["status", "--json"])["served_chunks"]
        .as_u64()
        .unwrap();
    assert!(
        relayed >= 3 * chunks,
        "the relay served the leaves: {relayed}"
    );
}

#[test]
fn pushes_land_in_the_origin_store_and_a_conflicting_push_is_refused() {
    let (mut origin, origin_port) = start_origin();
    let builder = TestAgent::start();
    let src = builder.path("img.raw");
    sparse_random_file(&src, 8 * MIB, 25);
    builder.ok(&["image", "import", src.to_str().unwrap(), "--name", "img"]);
    builder.ok(&["image", "push", "img", "--to", &url(origin_port)]);

    // By default the origin store is DATA_DIR/origin: every chunk the
    // builder holds, and the name as a versioned record. The agent's own
    // store and names are untouched.
    let store = origin.data_dir().join("origin");
    let pushed = common::files_under(&store.join("chunks"));
    assert_eq!(pushed.len(), chunk_files(&builder).len());
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("images/img")).unwrap()).unwrap();
    let manifest = builder.json(&["image", "inspect", "img", "--json"])["manifest"].clone();
    assert_eq!(rec["version"], 1, "{rec}");
    assert_eq!(rec["manifest"], manifest, "{rec}");
    assert!(chunk_files(&origin).is_empty());
    assert_eq!(
        origin.json(&["image", "ls", "--json"]),
        serde_json::json!([])
    );

    // It outlives the agent: after a crash the name still resolves.
    origin.crash_and_restart();
    let cold = TestAgent::start_with(&["--origin", &url(origin_port)]);
    cold.ok(&["disk", "create", "d", "--image", "img"]);
    assert_eq!(nbd_copy(&cold, "disk/d"), std::fs::read(&src).unwrap());

    // An image the origin imported itself answers first under its name,
    // so a push of other contents under that name is refused, not hidden.
    let own = origin.path("own.raw");
    sparse_random_file(&own, 4 * MIB, 26);
    origin.ok(&["image", "import", own.to_str().unwrap(), "--name", "own"]);
    let other = builder.path("other.raw");
    sparse_random_file(&other, 4 * MIB, 27);
    builder.ok(&["image", "import", other.to_str().unwrap(), "--name", "own"]);
    let err = builder.fails(&["image", "push", "own", "--to", &url(origin_port)]);
    assert!(err.contains("in this agent's own store"), "{err}");
    assert!(!store.join("images/own").exists());

    // A pushed name moves to other content only with --force: a second
    // builder's `img` is refused, the name keeps meaning the first image,
    // and with --force it is rebound (one warning line names the pusher).
    let second = TestAgent::start();
    let src2 = second.path("img2.raw");
    sparse_random_file(&src2, 4 * MIB, 28);
    second.ok(&["image", "import", src2.to_str().unwrap(), "--name", "img"]);
    let err = second.fails(&["image", "push", "img", "--to", &url(origin_port)]);
    assert!(
        err.contains("bound here to other content") && err.contains("--force"),
        "{err}"
    );
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("images/img")).unwrap()).unwrap();
    assert_eq!(rec["manifest"], manifest, "the refused push left the name");
    // Pushing the same content again is no rebinding.
    builder.ok(&["image", "push", "img", "--to", &url(origin_port)]);
    second.ok(&["image", "push", "img", "--to", &url(origin_port), "--force"]);
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("images/img")).unwrap()).unwrap();
    let manifest2 = second.json(&["image", "inspect", "img", "--json"])["manifest"].clone();
    assert_eq!(rec["manifest"], manifest2, "rebound with --force");
    let log = std::fs::read_to_string(origin.data_dir().with_extension("agent.log")).unwrap();
    assert!(
        log.contains("name rebound (--force)"),
        "no rebinding line in the origin's log"
    );
    let cold = TestAgent::start_with(&["--origin", &url(origin_port)]);
    cold.ok(&["disk", "create", "d2", "--image", "img"]);
    assert_eq!(nbd_copy(&cold, "disk/d2"), std::fs::read(&src2).unwrap());
}

#[test]
fn chunks_other_hosts_read_are_prefetched_by_the_next_host() {
    let (origin, origin_port) = start_origin();
    let builder = TestAgent::start();
    let src = builder.path("img.raw");
    sparse_random_file(&src, 32 * MIB, 33);
    builder.ok(&["image", "import", src.to_str().unwrap(), "--name", "img"]);
    builder.ok(&["image", "push", "img", "--to", &url(origin_port)]);
    let total = builder.json(&["image", "inspect", "img", "--json"])["chunks"]
        .as_u64()
        .unwrap();

    // Host A reads one MiB at 8 MiB (its guest's working set, say). The
    // image has no boot profile, so that is all A fetches.
    let a = TestAgent::start_with(&["--origin", &url(origin_port)]);
    a.ok(&["disk", "create", "d", "--image", "img"]);
    sh(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 8M 1M"])
        .arg(a.uri("disk/d")));
    let read_by_a = a.json(&["image", "inspect", "img", "--json"])["local_chunks"]
        .as_u64()
        .unwrap();
    assert!(read_by_a >= 10, "A holds {read_by_a} chunks");

    // Host B reads nothing, yet fetches what A demanded, in the
    // background: the origin ranks chunks by how often they were demanded.
    let b = TestAgent::start_with(&["--origin", &url(origin_port)]);
    b.ok(&["disk", "create", "d", "--image", "img"]);
    let info = wait_inspect(&b, "img", "B prefetches A's chunks", |i| {
        i["local_chunks"].as_u64() >= Some(read_by_a)
    });
    let held = info["local_chunks"].as_u64().unwrap();
    assert!(
        held < total / 2,
        "B fetched {held} of {total}: more than the popular ones"
    );
    // Those are exactly A's: B now reads A's range without fetching more.
    let fetched = |t: &TestAgent| {
        t.json(&["status", "--json"])["sources"][0]["chunks"]
            .as_u64()
            .unwrap()
    };
    let before = fetched(&b);
    sh(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 8M 1M"])
        .arg(b.uri("disk/d")));
    assert_eq!(fetched(&b), before, "A's range was already local on B");

    // The origin answers each name with that image's popular chunks only:
    // another image (other data) gets none of img's.
    let other = builder.path("other.raw");
    sparse_random_file(&other, 4 * MIB, 34);
    builder.ok(&[
        "image",
        "import",
        other.to_str().unwrap(),
        "--name",
        "other",
    ]);
    builder.ok(&["image", "push", "other", "--to", &url(origin_port)]);
    let resolve = |name: &str| -> serde_json::Value {
        let out = sh(Command::new("curl")
            .args(common::curl_tls(&origin.tls_dir()))
            .args(["-sS", &format!("{}/v1/images/{name}", url(origin_port))]));
        serde_json::from_str(&out).unwrap()
    };
    let img = resolve("img");
    assert!(
        img["popular"]
            .as_array()
            .is_some_and(|p| p.len() as u64 >= read_by_a),
        "{img}"
    );
    let other = resolve("other");
    assert!(other["popular"].is_null(), "other image's answer: {other}");
    drop(origin);
}

/// A chunk file a crash left empty on a host that has an origin: `image
/// pull` counts it missing and fetches it again, and reads are right.
#[test]
fn a_truncated_chunk_is_fetched_again_by_a_pull() {
    let (origin, origin_port) = start_origin();
    let src = origin.path("img.raw");
    sparse_random_file(&src, 8 * MIB, 23);
    origin.ok(&["image", "import", src.to_str().unwrap(), "--name", "img"]);
    let host = TestAgent::start_with(&["--origin", &url(origin_port)]);
    let out = host.ok(&["image", "pull", "img"]);
    assert!(out.contains("img"), "{out}");
    // What a power cut can leave: the name without the bytes.
    let damaged: Vec<_> = chunk_files(&host).into_iter().take(3).collect();
    for f in &damaged {
        std::fs::File::options()
            .write(true)
            .open(f)
            .unwrap()
            .set_len(0)
            .unwrap();
    }
    let pulled = host.ok(&["image", "pull", "img"]);
    assert!(
        pulled.contains(&format!("{} were missing", damaged.len())),
        "{pulled}"
    );
    assert_eq!(nbd_copy(&host, "image/img"), std::fs::read(&src).unwrap());
}

/// A fake peer that accepts connections and holds them open without a
/// byte (not even the TLS handshake): its port and how many connections
/// it has taken.
fn wedged_peer() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let wedged = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = wedged.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in wedged.incoming().flatten() {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(c); // open, silent
        }
    });
    (port, accepted)
}

/// The agent's metrics (Prometheus text).
fn metrics(t: &TestAgent) -> String {
    sh(Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(t.data_dir().join("api.sock"))
        .arg("http://agent/metrics"))
}

/// A peer that accepts connections and never answers (not even the TLS
/// handshake) sits before a healthy origin: reads spaced out over a
/// quarter of a minute each cost a hedge at most, never the 10 s request
/// timeout, and the wedged peer is not asked again while it is backed off.
#[test]
fn a_wedged_peer_costs_reads_a_hedge_not_a_timeout() {
    let (origin, origin_port) = start_origin();
    let src = origin.path("img.raw");
    sparse_random_file(&src, 16 * MIB, 23);
    origin.ok(&["image", "import", src.to_str().unwrap(), "--name", "img"]);
    let (wedged_port, accepted) = wedged_peer();
    let host = TestAgent::start_with(&["--peer", &url(wedged_port), "--origin", &url(origin_port)]);
    host.ok(&["disk", "create", "d", "--image", "img"]);
    let mut slowest = std::time::Duration::ZERO;
    for i in 0..12u64 {
        let started = std::time::Instant::now();
        sh(Command::new("qemu-io")
            .args(["-f", "raw", "-c", &format!("read {}M 4096", i + 1)])
            .arg(host.uri("disk/d")));
        slowest = slowest.max(started.elapsed());
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    assert!(
        slowest < std::time::Duration::from_secs(4),
        "a read took {slowest:?} with a wedged peer before a healthy origin"
    );
    // Asked by the first read; then passed over while that request hung,
    // and backed off once it failed (a background probe may add one).
    let asked = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(asked <= 3, "the wedged peer was connected to {asked} times");
    let metrics = sh(Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(host.data_dir().join("api.sock"))
        .arg("http://agent/metrics"));
    assert!(metrics.contains("spore_fetch_hedged_total"), "{metrics}");
    drop(origin);
}

/// The origin goes away while an image completes in the background: the
/// completion says what it waits for (`image inspect`, metrics), keeps
/// trying, and finishes once the origin is back; the image then reads
/// back whole.
#[test]
fn background_completion_waits_out_an_origin_outage_and_says_so() {
    let (mut origin, origin_port) = start_origin();
    let src = origin.path("img.raw");
    sparse_random_file(&src, 24 * MIB, 24);
    origin.ok(&["image", "import", src.to_str().unwrap(), "--name", "img"]);
    let host = TestAgent::start_with(&["--origin", &url(origin_port)]);
    host.ok(&["disk", "create", "d", "--image", "img"]);

    let status = origin.agent.as_mut().unwrap().stop().unwrap();
    assert!(status.success(), "origin exited with {status}");
    origin.agent = None;
    host.ok(&["image", "pull", "img", "--background"]);
    let info = wait_inspect(&host, "img", "completion says what it waits for", |i| {
        i["completing"]["waiting_for"].is_string()
    });
    assert!(
        info["completing"]["chunks_left"].as_u64().unwrap() > 0,
        "{info}"
    );
    let text = host.ok(&["image", "inspect", "img"]);
    assert!(text.contains("completing"), "{text}");
    let metrics = metrics(&host);
    assert!(
        metrics.contains("spore_image_completion_waiting{image=\"img\"} 1"),
        "{metrics}"
    );

    origin.restart_stopped();
    let info = wait_inspect(&host, "img", "completion finished after the outage", |i| {
        i["local_chunks"] == i["chunks"] && i["completing"].is_null()
    });
    assert!(info["chunks"].as_u64().unwrap() > 0);
    let expect = std::fs::read(&src).unwrap();
    drop(origin);
    assert_eq!(nbd_copy(&host, "disk/d"), expect);
}

/// A name rebound at the origin reaches a host that knew the old version:
/// the background check shows it in `image ls`, a disk made from the name
/// after `--name-max-age` gets the new version, and a disk made before
/// keeps the version it was made from.
#[test]
fn a_name_rebound_at_the_origin_reaches_hosts_that_knew_the_old_one() {
    let (origin, origin_port) = start_origin();
    let builder = TestAgent::start();
    let (v1, v2) = (builder.path("v1.raw"), builder.path("v2.raw"));
    sparse_random_file(&v1, 4 * MIB, 31);
    sparse_random_file(&v2, 4 * MIB, 32);
    builder.ok(&["image", "import", v1.to_str().unwrap(), "--name", "img"]);
    builder.ok(&["image", "push", "img", "--to", &url(origin_port)]);

    let host = TestAgent::start_with(&["--origin", &url(origin_port), "--name-max-age", "2"]);
    host.ok(&["disk", "create", "old", "--image", "img"]);
    let first = host.json(&["image", "inspect", "img", "--json"])["manifest"].clone();

    builder.ok(&["image", "rm", "img"]);
    builder.ok(&["image", "import", v2.to_str().unwrap(), "--name", "img"]);
    builder.ok(&["image", "push", "img", "--to", &url(origin_port), "--force"]);
    let second = builder.json(&["image", "inspect", "img", "--json"])["manifest"].clone();
    assert_ne!(first, second);
    // The origin's answer names the version and since when it is bound.
    let answer: serde_json::Value = serde_json::from_str(&sh(Command::new("curl")
        .args(common::curl_tls(&origin.tls_dir()))
        .args(["-sS", &format!("{}/v1/images/img", url(origin_port))])))
    .unwrap();
    assert_eq!(answer["manifest"], second, "{answer}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let bound_at = answer["bound_at"].as_u64().expect("bound_at");
    assert!(bound_at + 120 >= now && bound_at <= now + 5, "{answer}");

    // The background check (every --name-max-age, at least 10 s) sees it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    loop {
        let list = host.json(&["image", "ls", "--json"]);
        if list[0]["newer_at_origin"] == second {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "image ls never showed the newer version: {list}"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let text = host.ok(&["image", "ls"]);
    assert!(text.contains("newer"), "{text}");

    // A new disk takes the new version; the old disk keeps its own.
    host.ok(&["disk", "create", "new", "--image", "img"]);
    assert_eq!(
        host.json(&["image", "inspect", "img", "--json"])["manifest"],
        second
    );
    assert_eq!(nbd_copy(&host, "disk/new"), std::fs::read(&v2).unwrap());
    assert_eq!(nbd_copy(&host, "disk/old"), std::fs::read(&v1).unwrap());
    let list = host.json(&["image", "ls", "--json"]);
    assert!(list[0]["newer_at_origin"].is_null(), "{list}");
    drop(origin);
}

/// A relay whose own upstream peer is wedged still serves its leaf: the
/// relay hedges to the origin and answers in time, the leaf's reads never
/// wait out a timeout, and the leaf never counts the relay as failed (the
/// subtree stays on its relay instead of moving onto the origin).
#[test]
fn a_relay_whose_upstream_is_wedged_still_serves_its_leaf_in_time() {
    let (origin, origin_port) = start_origin();
    let src = origin.path("img.raw");
    sparse_random_file(&src, 16 * MIB, 25);
    origin.ok(&["image", "import", src.to_str().unwrap(), "--name", "img"]);
    let (wedged_port, _) = wedged_peer();
    let (relay, relay_port) = TestAgent::start_listening(&[
        "--relay",
        "--peer",
        &url(wedged_port),
        "--origin",
        &url(origin_port),
    ]);
    let leaf = TestAgent::start_with(&["--peer", &url(relay_port), "--origin", &url(origin_port)]);
    let started = std::time::Instant::now();
    leaf.ok(&["disk", "create", "d", "--image", "img"]);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "disk create took {:?}",
        started.elapsed()
    );
    let mut slowest = std::time::Duration::ZERO;
    for i in 0..8u64 {
        let started = std::time::Instant::now();
        sh(Command::new("qemu-io")
            .args(["-f", "raw", "-c", &format!("read {}M 4096", i * 2 + 1)])
            .arg(leaf.uri("disk/d")));
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        slowest < std::time::Duration::from_secs(4),
        "a leaf read took {slowest:?} through a relay with a wedged upstream"
    );
    let m = metrics(&leaf);
    let relay_failures = m
        .lines()
        .find(|l| {
            l.starts_with("spore_fetch_failures_total") && l.contains(&relay_port.to_string())
        })
        .unwrap_or_default()
        .to_owned();
    assert!(
        relay_failures.ends_with(" 0"),
        "the leaf blamed the relay: {relay_failures}"
    );
    let relay_chunks = m
        .lines()
        .find(|l| l.starts_with("spore_fetch_chunks_total") && l.contains(&relay_port.to_string()))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(
        relay_chunks > 0,
        "the leaf's chunks did not come through its relay: {m}"
    );
    assert_eq!(
        nbd_copy(&leaf, "disk/d"),
        std::fs::read(&src).unwrap(),
        "the leaf reads the image whole"
    );
    drop(relay);
    drop(origin);
}

/// A relay answers a batch it fetches upstream record by record: when its
/// upstream sends the first chunk at once and the rest 3 s later, a reader
/// below gets the first chunk at once too, not after the whole batch.
#[test]
fn a_relay_streams_a_batch_as_its_chunks_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let sender =
        spore_chunks::ChunkStore::open(dir.path().join("sender"), Default::default()).unwrap();
    let files: Vec<(spore_chunks::ChunkId, Vec<u8>)> = (0..3)
        .map(|i| {
            let put = sender
                .put(format!("chunk {i} of the batch").as_bytes())
                .unwrap();
            (put.id, sender.get_raw(&put.id).unwrap().unwrap())
        })
        .collect();
    // The upstream: the answer's head and first record at once, the rest
    // 3 s later.
    let served = files.clone();
    let upstream_port = fake_peer::serve(
        fake_peer::Acts::FirstThenPause(std::time::Duration::from_secs(3)),
        std::sync::Arc::new(move |id| served.iter().find(|(f, _)| f == id).map(|(_, r)| r.clone())),
    )
    .port;
    let (relay, relay_port) = TestAgent::start_listening(&[
        "--insecure-listen",
        "--relay",
        "--peer",
        &format!("http://127.0.0.1:{upstream_port}"),
    ]);
    let links = spore_transfer::Links::default().allow_plaintext();
    let remote = spore_transfer::Remote::new(
        &format!("http://127.0.0.1:{relay_port}"),
        std::time::Duration::from_secs(10),
        &links,
    )
    .unwrap();
    let ids: Vec<_> = files.iter().map(|(id, _)| *id).collect();
    let started = std::time::Instant::now();
    let mut arrivals = Vec::new();
    remote
        .batch_stream(
            &ids,
            spore_transfer::Class::Background,
            std::time::Duration::from_secs(10),
            &mut |id, raw| arrivals.push((id, raw.is_some(), started.elapsed())),
        )
        .unwrap();
    assert_eq!(arrivals.len(), 3);
    assert!(arrivals.iter().all(|(_, here, _)| *here), "{arrivals:?}");
    assert!(
        arrivals[0].2 < std::time::Duration::from_millis(2000),
        "the first chunk came after {:?}, with the rest",
        arrivals[0].2
    );
    assert!(
        arrivals[2].2 >= std::time::Duration::from_millis(2500),
        "{arrivals:?}"
    );
    drop(relay);
}

/// Peers that answer badly sit before a healthy origin: one that answers a
/// second late (and lacks the chunks), one that sends garbage, one that
/// streams endless bytes, one that closes half-way. For each, a guest's
/// reads through a real NBD client finish well within the read deadline
/// with the image's bytes, and the agent's memory stays bounded (the
/// endless peer would otherwise have it buffer until the timeout).
#[test]
fn reads_stay_quick_and_memory_bounded_whatever_a_peer_sends() {
    let (origin, origin_port) = TestAgent::start_listening(&["--insecure-listen"]);
    let src = origin.path("img.raw");
    sparse_random_file(&src, 16 * MIB, 26);
    origin.ok(&["image", "import", src.to_str().unwrap(), "--name", "img"]);
    let expect = std::fs::read(&src).unwrap();
    for acts in [
        fake_peer::Acts::Slow(std::time::Duration::from_secs(1)),
        fake_peer::Acts::Garbage,
        fake_peer::Acts::Endless,
        fake_peer::Acts::Vanishes,
    ] {
        let peer = fake_peer::serve(acts, std::sync::Arc::new(|_| None)).port;
        let host = TestAgent::start_with(&[
            "--insecure-listen",
            "--peer",
            &format!("http://127.0.0.1:{peer}"),
            "--origin",
            &format!("http://127.0.0.1:{origin_port}"),
        ]);
        host.ok(&["disk", "create", "d", "--image", "img"]);
        let mut slowest = std::time::Duration::ZERO;
        for i in 0..6u64 {
            let at = (i * 2 + 1) * MIB;
            let started = std::time::Instant::now();
            let out = Command::new("qemu-io")
                .args(["-f", "raw", "-c", &format!("read -v {at} 16")])
                .arg(host.uri("disk/d"))
                .output()
                .unwrap();
            slowest = slowest.max(started.elapsed());
            let text = String::from_utf8_lossy(&out.stdout);
            let want: String = expect[at as usize..at as usize + 16]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ");
            assert!(text.contains(&want), "{acts:?}: read at {at}: {text}");
        }
        assert!(
            slowest < std::time::Duration::from_secs(4),
            "{acts:?}: a read took {slowest:?}"
        );
        let pid = host.agent.as_ref().unwrap().pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let peak_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap();
        assert!(
            peak_kib < 400 << 10,
            "{acts:?}: the agent's peak memory was {peak_kib} KiB"
        );
    }
    drop(origin);
}
