//! `spore fsck`: finds a chunk deleted from the store, a chunk with
//! flipped bits, a manifest pointing at nothing and chunks nothing refers
//! to; repairs the first two from an origin, drops leaks only when every
//! reference can be followed, and says what it could not repair.

mod common;

use std::path::{Path, PathBuf};

use common::{chunk_files, sparse_random_file, TestAgent};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn url(port: u16) -> String {
    format!("https://127.0.0.1:{port}")
}

/// `spore fsck ARGS --json`: (exit status, report).
fn fsck(t: &TestAgent, args: &[&str]) -> (bool, Value) {
    let mut all = vec!["fsck", "--json"];
    all.extend_from_slice(args);
    let out = t.run(&all);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "fsck {args:?}: {e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(
        out.status.success(),
        report["clean"] == true,
        "the exit status follows `clean`: {report}"
    );
    (out.status.success(), report)
}

/// The chunk file of `hex` in `t`'s store.
fn chunk_path(t: &TestAgent, hex: &str) -> PathBuf {
    t.data_dir().join("chunks").join(&hex[..2]).join(hex)
}

/// The image's data chunk files (not its manifest or layers, not the
/// chunks moved aside), largest first.
fn data_chunks(t: &TestAgent, image: &str) -> Vec<PathBuf> {
    let info = t.json(&["image", "inspect", image, "--json"]);
    let mut skip = vec![info["manifest"].as_str().unwrap().to_owned()];
    for l in info["layer_list"].as_array().unwrap() {
        skip.push(l["id"].as_str().unwrap().to_owned());
    }
    let mut files: Vec<PathBuf> = chunk_files(t)
        .into_iter()
        .filter(|p| !p.components().any(|c| c.as_os_str() == "corrupt"))
        .filter(|p| !skip.iter().any(|s| p.ends_with(s)))
        .collect();
    files.sort_by_key(|p| std::cmp::Reverse(std::fs::metadata(p).unwrap().len()));
    files
}

fn flip_last_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    *bytes.last_mut().unwrap() ^= 0x5a;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn fsck_finds_a_deleted_and_a_corrupt_chunk_and_repairs_both_from_the_origin() {
    let (origin, port) = TestAgent::start_listening(&["--accept-push"]);
    let src = origin.path("img.raw");
    sparse_random_file(&src, 8 * MIB, 7);
    origin.ok(&["image", "import", src.to_str().unwrap(), "--name", "img"]);
    let host = TestAgent::start_with(&["--origin", &url(port)]);
    host.ok(&["image", "pull", "img"]);
    let (ok, r) = fsck(&host, &[]);
    assert!(ok, "a pulled image is clean: {r}");
    assert!(r["chunks_checked"].as_u64().unwrap() > 2, "{r}");

    let data = data_chunks(&host, "img");
    std::fs::remove_file(&data[0]).unwrap();
    flip_last_byte(&data[1]);

    let (ok, r) = fsck(&host, &[]);
    assert!(!ok, "{r}");
    assert_eq!(r["corrupt"], 1, "{r}");
    assert_eq!(r["missing"], 2, "{r}");
    let problems: Vec<(String, String, String)> = r["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert_eq!(p["needed_by"], serde_json::json!(["image img"]), "{r}");
            (
                p["chunk"].as_str().unwrap().to_owned(),
                p["problem"].as_str().unwrap().to_owned(),
                p["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let name = |p: &Path| p.file_name().unwrap().to_str().unwrap().to_owned();
    assert!(
        problems.contains(&(name(&data[0]), "missing".into(), "data".into())),
        "{r}"
    );
    assert!(
        problems.contains(&(name(&data[1]), "corrupt".into(), "data".into())),
        "{r}"
    );
    let text = String::from_utf8_lossy(&host.run(&["fsck"]).stdout).into_owned();
    assert!(
        text.contains("NOT CLEAN") && text.contains("--repair"),
        "{text}"
    );

    let (ok, r) = fsck(&host, &["--repair"]);
    assert!(ok, "{r}");
    assert_eq!(r["fetched"], 2, "{r}");
    assert!(r["problems"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["repair"] == "fetched"));
    let (ok, r) = fsck(&host, &[]);
    assert!(ok, "clean after the repair: {r}");
    // The image reads whole, without the origin.
    let expect = std::fs::read(&src).unwrap();
    drop(origin);
    assert_eq!(common::nbd_copy(&host, "image/img"), expect);
}

#[test]
fn fsck_reports_a_manifest_pointing_at_nothing_and_keeps_what_it_cannot_follow() {
    let t = TestAgent::start();
    let src = t.path("img.raw");
    sparse_random_file(&src, 4 * MIB, 9);
    t.ok(&["image", "import", src.to_str().unwrap(), "--name", "img"]);
    // A chunk of another store: valid, and nothing here refers to it.
    let other = TestAgent::start();
    let osrc = other.path("o.raw");
    sparse_random_file(&osrc, MIB, 10);
    other.ok(&["image", "import", osrc.to_str().unwrap(), "--name", "o"]);
    let stray = data_chunks(&other, "o").remove(0);
    let hex = stray.file_name().unwrap().to_str().unwrap().to_owned();
    let to = chunk_path(&t, &hex);
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(&stray, &to).unwrap();

    let manifest = t.json(&["image", "inspect", "img", "--json"])["manifest"]
        .as_str()
        .unwrap()
        .to_owned();
    let kept = t.path("manifest.kept");
    std::fs::rename(chunk_path(&t, &manifest), &kept).unwrap();

    let (ok, r) = fsck(&t, &["--repair"]);
    assert!(!ok, "{r}");
    let p = &r["problems"][0];
    assert_eq!(p["chunk"], manifest.as_str(), "{r}");
    assert_eq!(p["kind"], "manifest", "{r}");
    assert_eq!(p["needed_by"], serde_json::json!(["image img"]), "{r}");
    assert!(
        p["repair"].as_str().unwrap().contains("no origin or peers"),
        "{r}"
    );
    // Behind the missing manifest, the image's chunks look unreferenced:
    // counted, never dropped.
    assert!(r["leaked_chunks"].as_u64().unwrap() > 1, "{r}");
    assert_eq!(r["dropped"], 0, "{r}");
    assert!(to.exists());

    // The manifest back: only the stray chunk is a leak, and the repair
    // drops it.
    std::fs::rename(&kept, chunk_path(&t, &manifest)).unwrap();
    let (ok, r) = fsck(&t, &[]);
    assert!(!ok, "{r}");
    assert_eq!(r["leaked_chunks"], 1, "{r}");
    assert_eq!(r["missing"], 0, "{r}");
    let (ok, r) = fsck(&t, &["--repair"]);
    assert!(ok, "{r}");
    assert_eq!(r["dropped"], 1, "{r}");
    assert!(!to.exists());
    assert!(fsck(&t, &[]).0);
    assert_eq!(
        common::nbd_copy(&t, "image/img"),
        std::fs::read(&src).unwrap()
    );
}
