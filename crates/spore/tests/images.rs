//! Images through the CLI, the agent and real NBD clients.

mod common;

use std::process::Command;

use common::{sh, sparse_random_file, TestAgent};

const MIB: u64 = 1 << 20;

#[test]
fn raw_import_serves_identical_bytes_with_holes_and_exports_back() {
    let t = TestAgent::start();
    let src = t.path("src.raw");
    sparse_random_file(&src, 8 * MIB + 12345, 1);
    let out = t.ok(&["image", "import", src.to_str().unwrap(), "--name", "a"]);
    assert!(out.contains("imported a (raw"), "{out}");

    // nbdcopy of the export equals the file byte for byte.
    let copy = t.path("copy.raw");
    sh(Command::new("nbdcopy").arg(t.uri("image/a")).arg(&copy));
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&src).unwrap());

    // nbdinfo --map shows holes where the image has no data.
    let map = sh(Command::new("nbdinfo").arg("--map").arg(t.uri("image/a")));
    assert!(map.contains("hole,zero"), "{map}");
    assert!(map.contains("data"), "{map}");

    // Export as raw and qcow2: both equal the source.
    let raw = t.path("out.raw");
    let qcow = t.path("out.qcow2");
    t.ok(&["image", "export", "a", raw.to_str().unwrap()]);
    t.ok(&[
        "image",
        "export",
        "a",
        qcow.to_str().unwrap(),
        "--format",
        "qcow2",
    ]);
    assert_eq!(std::fs::read(&raw).unwrap(), std::fs::read(&src).unwrap());
    sh(Command::new("qemu-img").arg("check").arg(&qcow));
    sh(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&qcow)
        .arg(&src));

    // The export is read-only.
    let w = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k"])
        .arg(t.uri("image/a"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&w.stdout),
        String::from_utf8_lossy(&w.stderr)
    );
    assert!(
        !w.status.success() || text.contains("failed") || text.contains("ermission"),
        "write to image succeeded: {text}"
    );
}

#[test]
fn qcow2_import_is_detected_and_reads_like_the_raw_data() {
    let t = TestAgent::start();
    let src = t.path("src.raw");
    sparse_random_file(&src, 6 * MIB, 2);
    for (name, extra) in [("plain", vec![]), ("compressed", vec!["-c"])] {
        let q = t.path(&format!("{name}.qcow2"));
        sh(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .args(&extra)
            .arg(&src)
            .arg(&q));
        let out = t.ok(&[
            "image",
            "import",
            q.to_str().unwrap(),
            "--name",
            name,
            "--block-size",
            "16K",
        ]);
        assert!(out.contains("(qcow2"), "{out}");
        let copy = t.path(&format!("{name}.copy"));
        sh(Command::new("nbdcopy")
            .arg(t.uri(&format!("image/{name}")))
            .arg(&copy));
        assert_eq!(
            std::fs::read(&copy).unwrap(),
            std::fs::read(&src).unwrap(),
            "{name}"
        );
    }
    // Identical data dedupes: the second import wrote no new data chunks.
    let info = t.json(&["image", "inspect", "compressed", "--json"]);
    assert!(info["shared_bytes"].as_u64().unwrap() > 0, "{info}");
}

#[test]
fn parent_import_stores_only_changed_blocks_and_depth_is_visible() {
    let t = TestAgent::start();
    let base = t.path("base.raw");
    sparse_random_file(&base, 4 * MIB, 3);
    t.ok(&["image", "import", base.to_str().unwrap(), "--name", "base"]);
    // Change two 64 KiB blocks, zero a third that had data.
    let mut data = std::fs::read(&base).unwrap();
    data[100] ^= 0xff;
    data[3 * 65536 + 7] ^= 0xff;
    data[65536..2 * 65536].fill(0);
    let child = t.path("child.raw");
    std::fs::write(&child, &data).unwrap();
    let out = t.ok(&[
        "image",
        "import",
        child.to_str().unwrap(),
        "--name",
        "child",
        "--parent",
        "base",
    ]);
    assert!(out.contains("3 blocks changed"), "{out}");
    let info = t.json(&["image", "inspect", "child", "--json"]);
    assert_eq!(info["layers"], 2);
    assert_eq!(info["layer_list"][1]["blocks"], 3);
    let copy = t.path("copy");
    sh(Command::new("nbdcopy").arg(t.uri("image/child")).arg(&copy));
    assert_eq!(std::fs::read(&copy).unwrap(), data);
    // The parent's name can go; the child still needs and keeps its layers.
    t.ok(&["image", "rm", "base"]);
    sh(Command::new("nbdcopy").arg(t.uri("image/child")).arg(&copy));
    assert_eq!(std::fs::read(&copy).unwrap(), data);
    // A parent with another block size is refused.
    let err = t.fails(&[
        "image",
        "import",
        child.to_str().unwrap(),
        "--name",
        "x",
        "--parent",
        "child",
        "--block-size",
        "4K",
    ]);
    assert!(err.contains("block size"), "{err}");
}

#[test]
fn rm_refuses_while_used_and_frees_chunks_after() {
    let t = TestAgent::start();
    let src = t.path("src.raw");
    sparse_random_file(&src, 4 * MIB, 4);
    t.ok(&["image", "import", src.to_str().unwrap(), "--name", "a"]);
    t.ok(&["disk", "create", "d", "--image", "a"]);
    let err = t.fails(&["image", "rm", "a"]);
    assert!(err.contains("in use by disk d"), "{err}");
    t.ok(&["disk", "rm", "d"]);
    let chunks = |t: &TestAgent| walk_files(&t.data_dir().join("chunks"));
    assert!(chunks(&t) > 40);
    let out = t.ok(&["image", "rm", "a"]);
    assert!(out.contains("freed"), "{out}");
    assert_eq!(chunks(&t), 0, "every chunk freed");
    let err = t.fails(&["image", "inspect", "a"]);
    assert!(err.contains("does not exist"), "{err}");
}

fn walk_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        walk_files(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn bad_input_gets_clear_errors() {
    let t = TestAgent::start();
    let src = t.path("src.raw");
    sparse_random_file(&src, MIB, 5);
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "image".into(),
                "import".into(),
                t.path("missing").display().to_string(),
                "--name".into(),
                "x".into(),
            ],
            "does not exist",
        ),
        (
            vec![
                "image".into(),
                "import".into(),
                t.dir.path().display().to_string(),
                "--name".into(),
                "x".into(),
            ],
            "not a regular file",
        ),
        (
            vec![
                "image".into(),
                "import".into(),
                src.display().to_string(),
                "--name".into(),
                "a/b".into(),
            ],
            "invalid",
        ),
        (
            vec![
                "image".into(),
                "import".into(),
                src.display().to_string(),
                "--name".into(),
                "x".into(),
                "--block-size".into(),
                "3000".into(),
            ],
            "block size",
        ),
        (
            vec!["image".into(), "inspect".into(), "nope".into()],
            "does not exist",
        ),
        (
            vec![
                "disk".into(),
                "create".into(),
                "d".into(),
                "--image".into(),
                "nope".into(),
            ],
            "does not exist",
        ),
        (
            vec![
                "image".into(),
                "export".into(),
                "nope".into(),
                "/tmp/x".into(),
            ],
            "does not exist",
        ),
    ];
    for (args, want) in cases {
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let err = t.fails(&args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // A corrupt qcow2: the magic is right, the rest is garbage.
    let bad = t.path("bad.qcow2");
    let mut bytes = b"QFI\xfb".to_vec();
    bytes.extend_from_slice(&[0xff; 200]);
    std::fs::write(&bad, bytes).unwrap();
    let err = t.fails(&["image", "import", bad.to_str().unwrap(), "--name", "bad"]);
    assert!(err.contains("qcow2"), "{err}");
    // Duplicate names are refused and the first image is intact.
    t.ok(&["image", "import", src.to_str().unwrap(), "--name", "a"]);
    let err = t.fails(&["image", "import", src.to_str().unwrap(), "--name", "a"]);
    assert!(err.contains("already exists"), "{err}");
    // Nothing half-made is left behind.
    let list = t.json(&["image", "ls", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
}

#[test]
fn cli_without_agent_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(common::SPORE)
        .env("SPORE_HOME", dir.path())
        .args(["image", "ls"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no spore agent is running"), "{err}");
}

#[test]
fn second_agent_on_the_same_directory_is_refused() {
    let t = TestAgent::start();
    let out = Command::new(common::SPORE)
        .arg("--data-dir")
        .arg(t.data_dir())
        .arg("agent")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another agent is already running"));
    // The first one still answers.
    t.ok(&["status"]);
}
