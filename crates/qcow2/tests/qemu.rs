//! Checks the reader and writer against the real thing: images made by
//! `qemu-img`/`qemu-io` must read exactly as `qemu-img convert -O raw`
//! reads them, with allocation matching `qemu-img map`; images made by the
//! writer must pass `qemu-img check` and compare equal to their raw source.
//!
//! Needs `qemu-img` and `qemu-io` (Debian package qemu-utils) on PATH.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use spore_qcow2::{Allocation, Compression, Error, Qcow2Reader, Qcow2Writer};

const MIB: u64 = 1024 * 1024;

fn run(program: &str, args: &[&str], cwd: Option<&Path>) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (install qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args, None)
}

/// Runs qemu-io commands on a qcow2 image.
fn qemu_io(image: &Path, commands: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    let path = image.to_str().unwrap();
    args.push(path);
    run("qemu-io", &args, None);
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Deterministic bytes; `alphabet` below 256 makes them compressible.
fn pseudo_random(len: usize, seed: u64, alphabet: u8) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if alphabet == 0 {
                x as u8
            } else {
                b'a' + (x % u64::from(alphabet)) as u8
            }
        })
        .collect()
}

/// A raw image with random and compressible regions and holes.
fn make_raw(path: &Path, size: u64) -> Vec<u8> {
    let mut data = vec![0u8; size as usize];
    let regions = [
        (0u64, 200_000usize, 0u8),
        (300_000, 70_000, 16),
        (1 << 20, 1 << 20, 4),
        (3 << 20, 5_000, 0),
        (size - 100_000, 100_000, 8),
    ];
    for (i, (at, len, alphabet)) in regions.into_iter().enumerate() {
        if at + len as u64 <= size {
            let bytes = pseudo_random(len, i as u64 + 1, alphabet);
            data[at as usize..at as usize + len].copy_from_slice(&bytes);
        }
    }
    fs::write(path, &data).unwrap();
    data
}

fn raw_of(image: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join(format!(
        "{}.converted.raw",
        image.file_name().unwrap().to_str().unwrap()
    ));
    qemu_img(&["convert", "-O", "raw", s(image), s(&raw)]);
    let data = fs::read(&raw).unwrap();
    fs::remove_file(&raw).unwrap();
    data
}

/// Reads the whole image through the reader in uneven pieces and compares
/// with what qemu-img sees.
fn assert_reads_like_qemu(reader: &Qcow2Reader, image: &Path, dir: &Path) {
    let expected = raw_of(image, dir);
    assert_eq!(reader.virtual_size(), expected.len() as u64);
    let mut got = vec![0u8; expected.len()];
    let mut at = 0usize;
    let mut step = 1usize;
    while at < got.len() {
        // Piece sizes vary from 1 byte to over a megabyte to cross every
        // kind of boundary.
        let n = step.min(got.len() - at);
        reader.read_at(at as u64, &mut got[at..at + n]).unwrap();
        at += n;
        step = (step * 7 + 4093) % (1_300_000);
    }
    if got != expected {
        let first = got.iter().zip(&expected).position(|(a, b)| a != b);
        panic!(
            "{} differs from qemu-img at byte {first:?}",
            image.display()
        );
    }
    let mut whole = vec![0u8; expected.len()];
    reader.read_at(0, &mut whole).unwrap();
    assert!(whole == expected, "single read differs");
}

#[derive(Debug)]
struct MapEntry {
    start: u64,
    length: u64,
    data: bool,
}

fn qemu_map(image: &Path) -> Vec<MapEntry> {
    let out = qemu_img(&["map", "--output=json", s(image)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| MapEntry {
            start: e["start"].as_u64().unwrap(),
            length: e["length"].as_u64().unwrap(),
            data: e["data"].as_bool().unwrap(),
        })
        .collect()
}

/// Our extents must agree with qemu-img map on data versus zeros.
fn assert_map_like_qemu(reader: &Qcow2Reader, image: &Path) {
    let ours = reader.allocation(0, reader.virtual_size()).unwrap();
    let total: u64 = ours.iter().map(|e| e.len).sum();
    assert_eq!(total, reader.virtual_size());
    for pair in ours.windows(2) {
        assert_eq!(pair[0].offset + pair[0].len, pair[1].offset);
        assert_ne!(pair[0].allocation, pair[1].allocation, "runs not merged");
    }
    for entry in qemu_map(image) {
        for e in &ours {
            let start = e.offset.max(entry.start);
            let end = (e.offset + e.len).min(entry.start + entry.length);
            if start < end {
                assert_eq!(
                    e.allocation == Allocation::Data,
                    entry.data,
                    "{}: at {start:#x}..{end:#x} we say {:?}, qemu-img map says {entry:?}",
                    image.display(),
                    e.allocation
                );
            }
        }
    }
}

fn check_image(image: &Path, dir: &Path) -> Qcow2Reader {
    let reader = Qcow2Reader::open(image).unwrap();
    assert_reads_like_qemu(&reader, image, dir);
    assert_map_like_qemu(&reader, image);
    reader
}

#[test]
fn qemu_io_patterns_and_zero_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "64M"]);
    qemu_io(
        &img,
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 100000 3000",
            "write -P 0x33 1M 1M",
            "write -z 1536k 128k",
            "write -P 0x44 8M 64k",
            "write -z 8M 64k",
            "write -z 20M 4M",
            "write -P 0x55 67043328 65536",
        ],
    );
    let reader = check_image(&img, dir.path());
    assert_eq!(reader.version(), 3);
    assert_eq!(reader.cluster_size(), 65536);
    // The zeroed cluster at 8M was data; it must now be a zero cluster.
    let ext = reader.allocation(8 * MIB, 65536).unwrap();
    assert_eq!(ext.len(), 1);
    assert!(ext[0].allocation.reads_as_zero());
}

#[test]
fn converted_random_data_default_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let data = make_raw(&raw, 5 * MIB + 12345);
    let img = dir.path().join("b.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&img)]);
    let reader = check_image(&img, dir.path());
    // qemu-img rounds a raw size up to whole sectors.
    assert_eq!(
        reader.virtual_size(),
        (data.len() as u64).next_multiple_of(512)
    );
}

#[test]
fn compressed_deflate() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let data = make_raw(&raw, 6 * MIB);
    let img = dir.path().join("c.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&raw),
        s(&img),
    ]);
    assert!(fs::metadata(&img).unwrap().len() < data.len() as u64 / 2);
    let reader = check_image(&img, dir.path());
    assert_eq!(reader.compression(), Compression::Deflate);
}

#[test]
fn compressed_zstd() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    make_raw(&raw, 6 * MIB);
    let img = dir.path().join("z.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "compression_type=zstd",
        s(&raw),
        s(&img),
    ]);
    let reader = check_image(&img, dir.path());
    assert_eq!(reader.compression(), Compression::Zstd);
}

#[test]
fn compressed_with_small_and_large_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    make_raw(&raw, 5 * MIB);
    for (cluster, ctype) in [
        ("512", "zlib"),
        ("4k", "zstd"),
        ("2M", "zlib"),
        ("2M", "zstd"),
    ] {
        let img = dir.path().join(format!("c-{cluster}-{ctype}.qcow2"));
        let opts = format!("cluster_size={cluster},compression_type={ctype}");
        qemu_img(&[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &opts,
            s(&raw),
            s(&img),
        ]);
        check_image(&img, dir.path());
    }
}

#[test]
fn version_2_images() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("v2.qcow2");
    qemu_img(&["create", "-f", "qcow2", "-o", "compat=0.10", s(&img), "16M"]);
    qemu_io(
        &img,
        &[
            "write -P 0x61 0 100k",
            "write -P 0x62 5M 1M",
            "write -z 5M 64k",
        ],
    );
    let reader = check_image(&img, dir.path());
    assert_eq!(reader.version(), 2);

    let raw = dir.path().join("src.raw");
    make_raw(&raw, 4 * MIB);
    let compressed = dir.path().join("v2c.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "compat=0.10",
        s(&raw),
        s(&compressed),
    ]);
    assert_eq!(check_image(&compressed, dir.path()).version(), 2);
}

#[test]
fn cluster_sizes_from_512_bytes_to_2_mib() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    make_raw(&raw, 4 * MIB + 777);
    for cluster in ["512", "1k", "16k", "256k", "2M"] {
        let img = dir.path().join(format!("cs-{cluster}.qcow2"));
        let opts = format!("cluster_size={cluster}");
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            &opts,
            s(&raw),
            s(&img),
        ]);
        qemu_io(&img, &["write -z 1M 4k", "write -P 0x7f 2M 3"]);
        let reader = check_image(&img, dir.path());
        assert_eq!(
            reader.cluster_size(),
            qemu_img_cluster_size(&img),
            "cluster size of {cluster}"
        );
    }
}

fn qemu_img_cluster_size(img: &Path) -> u64 {
    let out = qemu_img(&["info", "--output=json", s(img)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["cluster-size"].as_u64().unwrap()
}

#[test]
fn backing_chain_of_qcow2_images() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&base), "32M"]);
    qemu_io(&base, &["write -P 0x01 0 8M", "write -P 0x02 16M 4M"]);
    let mid = dir.path().join("mid.qcow2");
    // Relative backing names resolve against the image's directory, not the
    // current directory: create them from inside the directory.
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "mid.qcow2",
        ],
        Some(dir.path()),
    );
    qemu_io(&mid, &["write -P 0x03 1M 1M", "write -z 17M 1M"]);
    let top = dir.path().join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "40M",
        ],
        Some(dir.path()),
    );
    qemu_io(
        &top,
        &[
            "write -P 0x04 1536k 8k",
            "write -z 0 4k",
            "write -P 0x05 35M 100k",
        ],
    );
    let reader = check_image(&top, dir.path());
    assert_eq!(reader.chain_len(), 3);
    assert_eq!(
        reader.backing_file().unwrap().path,
        PathBuf::from("mid.qcow2")
    );
    // The top is larger than its backing chain: the tail reads as zeros.
    let tail = reader.allocation(34 * MIB, MIB).unwrap();
    assert!(tail.iter().all(|e| e.allocation.reads_as_zero()));

    // Opened from memory the backing file is not followed.
    let alone = Qcow2Reader::from_source(fs::read(&top).unwrap()).unwrap();
    assert_eq!(alone.chain_len(), 1);
    let mut buf = [0xffu8; 16];
    alone.read_at(2 * MIB + 4096, &mut buf).unwrap();
    assert_eq!(buf, [0u8; 16]);
}

#[test]
fn raw_backing_file_shorter_than_image() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    // Fully written (no holes) so that qemu-img map reports it as data.
    fs::write(&base, pseudo_random(3 * MIB as usize + 100, 9, 0)).unwrap();
    let top = dir.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "raw",
        s(&top),
        "8M",
    ]);
    qemu_io(&top, &["write -P 0x0a 64k 64k", "write -z 1M 64k"]);
    let reader = check_image(&top, dir.path());
    assert_eq!(reader.chain_len(), 2);
}

#[test]
fn backing_file_without_format_is_probed() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&base), "4M"]);
    qemu_io(&base, &["write -P 0x99 0 4M"]);
    let top = dir.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&top),
    ]);
    qemu_io(&top, &["write -P 0x98 1M 64k"]);
    // Turn the backing format extension into an unknown one, as if the
    // image were too old to have it (qemu-img 7 refuses to write that).
    let mut bytes = fs::read(&top).unwrap();
    let at = bytes[..4096]
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .expect("backing format extension");
    bytes[at..at + 4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    fs::write(&top, &bytes).unwrap();
    let reader = check_image(&top, dir.path());
    assert_eq!(reader.chain_len(), 2);
}

#[test]
fn backing_chain_loop_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&a), "1M"]);
    qemu_img(&["create", "-f", "qcow2", "-b", s(&a), "-F", "qcow2", s(&b)]);
    // Point a back at b without qemu-img checking the chain.
    qemu_img(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        s(&b),
        "-F",
        "qcow2",
        s(&a),
    ]);
    match Qcow2Reader::open(&b) {
        Err(Error::BackingLoop(path)) => assert_eq!(path, b),
        other => panic!("expected a backing loop, got {other:?}"),
    }
}

#[test]
fn missing_backing_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&base), "1M"]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&top),
    ]);
    fs::remove_file(&base).unwrap();
    let err = Qcow2Reader::open(&top).unwrap_err();
    assert!(matches!(err, Error::Open { .. }), "{err:?}");
}

#[test]
fn extended_l2_subclusters() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&base), "8M"]);
    qemu_io(&base, &["write -P 0x10 0 8M"]);
    let top = dir.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=64k",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&top),
    ]);
    // Subclusters are 2 KiB: write, zero and leave some of them alone.
    qemu_io(
        &top,
        &[
            "write -P 0x20 0 2k",
            "write -P 0x21 6k 2k",
            "write -z 10k 4k",
            "write -P 0x22 1M 100k",
            "write -z 2M 2k",
        ],
    );
    check_image(&top, dir.path());

    let raw = dir.path().join("src.raw");
    make_raw(&raw, 4 * MIB);
    let compressed = dir.path().join("extc.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "extended_l2=on",
        s(&raw),
        s(&compressed),
    ]);
    check_image(&compressed, dir.path());
}

#[test]
fn lazy_refcounts_image_closed_cleanly_opens() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("lazy.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        s(&img),
        "4M",
    ]);
    qemu_io(&img, &["write -P 0x42 0 1M"]);
    check_image(&img, dir.path());
}

#[test]
fn reads_from_several_threads() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let data = make_raw(&raw, 6 * MIB);
    let img = dir.path().join("t.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4k",
        s(&raw),
        s(&img),
    ]);
    let reader = Qcow2Reader::open(&img).unwrap();
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let reader = &reader;
            let data = &data;
            scope.spawn(move || {
                let mut buf = vec![0u8; 10_007];
                let mut at = t * 1_234_567 % data.len() as u64;
                for _ in 0..300 {
                    let n = buf.len().min(data.len() - at as usize);
                    reader.read_at(at, &mut buf[..n]).unwrap();
                    assert!(buf[..n] == data[at as usize..at as usize + n]);
                    at = (at + 777_777) % data.len() as u64;
                }
            });
        }
    });
}

fn qemu_img_check(img: &Path) {
    let out = qemu_img(&["check", s(img)]);
    assert!(
        out.contains("No errors were found"),
        "qemu-img check: {out}"
    );
}

fn qemu_img_compare(img: &Path, raw: &Path) {
    let out = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(img), s(raw)]);
    assert!(
        out.contains("Images are identical"),
        "qemu-img compare: {out}"
    );
}

#[test]
fn writer_output_passes_qemu_img_check() {
    let dir = tempfile::tempdir().unwrap();
    for (cluster, size) in [
        (65536u64, 10 * MIB + 4321),
        (512, 3 * MIB),
        (4096, 9 * MIB + 1),
        (2 * MIB, 9 * MIB),
    ] {
        let raw = dir.path().join(format!("w-{cluster}.raw"));
        let data = make_raw(&raw, size);
        let img = dir.path().join(format!("w-{cluster}.qcow2"));
        let mut w = Qcow2Writer::create(&img, size, cluster).unwrap();
        // Out of order, to show the writer does not depend on it.
        let count = size.div_ceil(cluster);
        let evens_backwards = (0..count).filter(|i| i % 2 == 0).rev();
        let odds = (0..count).filter(|i| i % 2 == 1);
        for index in evens_backwards.chain(odds) {
            let start = (index * cluster) as usize;
            let end = (start + cluster as usize).min(data.len());
            w.write_cluster(index, &data[start..end]).unwrap();
        }
        w.finish().unwrap();
        qemu_img_check(&img);
        qemu_img_compare(&img, &raw);
        let reader = check_image(&img, dir.path());
        // Compact: zero clusters take no space.
        let data_clusters = data
            .chunks(cluster as usize)
            .filter(|c| c.iter().any(|&b| b != 0))
            .count() as u64;
        let file_clusters = fs::metadata(&img).unwrap().len() / cluster;
        assert!(
            file_clusters <= data_clusters + 8 + count / (cluster / 8),
            "{file_clusters} clusters in the file for {data_clusters} of data"
        );
        assert_eq!(reader.cluster_size(), cluster);
    }
}

#[test]
fn writer_write_at_with_uneven_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let size = 7 * MIB + 300;
    let raw = dir.path().join("pieces.raw");
    let data = make_raw(&raw, size);
    let img = dir.path().join("pieces.qcow2");
    let mut w = Qcow2Writer::create(&img, size, 65536).unwrap();
    let mut at = 0usize;
    let mut piece = 1usize;
    while at < data.len() {
        let n = piece.min(data.len() - at);
        // Leave gaps where the data is zero, as a sparse exporter would.
        if data[at..at + n].iter().any(|&b| b != 0) {
            w.write_at(at as u64, &data[at..at + n]).unwrap();
        }
        at += n;
        piece = (piece * 5 + 999) % 200_000 + 1;
    }
    assert!(matches!(
        w.write_at(0, &[1]),
        Err(Error::WriteNotSequential { .. })
    ));
    w.finish().unwrap();
    qemu_img_check(&img);
    qemu_img_compare(&img, &raw);
}

#[test]
fn writer_empty_and_all_zero_images() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("empty.qcow2");
    Qcow2Writer::create(&img, 0, 65536)
        .unwrap()
        .finish()
        .unwrap();
    qemu_img_check(&img);
    assert_eq!(Qcow2Reader::open(&img).unwrap().virtual_size(), 0);

    let img = dir.path().join("zeros.qcow2");
    let mut w = Qcow2Writer::create(&img, 100 * MIB, 65536).unwrap();
    let zeros = vec![0u8; 65536];
    for i in 0..1600 {
        w.write_cluster(i, &zeros).unwrap();
    }
    w.finish().unwrap();
    qemu_img_check(&img);
    // Header, L1 table, refcount table and block: nothing else.
    assert_eq!(fs::metadata(&img).unwrap().len(), 4 * 65536);
    let reader = Qcow2Reader::open(&img).unwrap();
    let ext = reader.allocation(0, 100 * MIB).unwrap();
    assert_eq!(ext.len(), 1);
    assert_eq!(ext[0].allocation, Allocation::Unallocated);
}

#[test]
fn writer_large_sparse_image() {
    // 64 GiB of guest disk with a little data scattered over it: several
    // L2 tables, and only the data stored.
    let dir = tempfile::tempdir().unwrap();
    let size = 64 << 30;
    let cluster = 65536u64;
    let img = dir.path().join("big.qcow2");
    let raw = dir.path().join("big.raw");
    let raw_file = fs::File::create(&raw).unwrap();
    raw_file.set_len(size).unwrap();
    let mut w = Qcow2Writer::create(&img, size, cluster).unwrap();
    let mut index = 3u64;
    let mut written = 0;
    while index < size / cluster {
        let data = pseudo_random(cluster as usize, index, 0);
        w.write_cluster(index, &data).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&raw_file, &data, index * cluster).unwrap();
        written += 1;
        index = index * 3 + 7;
    }
    w.finish().unwrap();
    drop(raw_file);
    qemu_img_check(&img);
    qemu_img_compare(&img, &raw);
    let reader = Qcow2Reader::open(&img).unwrap();
    assert_map_like_qemu(&reader, &img);
    let data_extents = reader
        .allocation(0, size)
        .unwrap()
        .into_iter()
        .filter(|e| e.allocation == Allocation::Data)
        .count();
    assert_eq!(data_extents, written);
    assert!(fs::metadata(&img).unwrap().len() < (written as u64 + 40) * cluster);
}
