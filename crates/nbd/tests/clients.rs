//! The server against real NBD clients: qemu-io, qemu-img, nbdcopy and
//! nbdinfo, over a unix socket. A test whose tool is missing fails under
//! `CI=true`; elsewhere it prints "SKIP: ..." on stdout, is counted by
//! scripts/test.sh, and returns (spore-testkit).

mod common;

use std::process::Command;

use common::*;

const SIZE: u64 = 4 << 20;

/// A disk with data in the first and third MiB and holes elsewhere.
fn sparse_data() -> Vec<u8> {
    let mut data = vec![0u8; SIZE as usize];
    data[..1 << 20].copy_from_slice(&pattern(1 << 20, 1));
    data[2 << 20..3 << 20].copy_from_slice(&pattern(1 << 20, 2));
    data
}

fn fixture() -> Fixture {
    let exports = MemExports::default();
    exports.add("disk", "scratch disk", MemExport::new(SIZE));
    exports.add(
        "sparse",
        "half data, half holes",
        MemExport::with_data(sparse_data()),
    );
    exports.add(
        "ro",
        "read-only disk",
        MemExport::read_only(pattern(SIZE as usize, 7)),
    );
    Fixture::start(exports)
}

#[test]
fn qemu_io_writes_and_reads_back_patterns() {
    if !have("qemu-io") {
        return;
    }
    let f = fixture();
    let (ok, out, err) = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 0 64k",
        "-c",
        "write -P 0xcd 1M 8k",
        "-c",
        "write -z 8k 4k",
        "-c",
        "read -P 0xab 0 8k",
        "-c",
        "read -P 0 8k 4k",
        "-c",
        "read -P 0xab 12k 52k",
        "-c",
        "read -P 0xcd 1M 8k",
        "-c",
        "aio_write -P 0x11 2M 4k",
        "-c",
        "aio_write -P 0x22 3M 4k",
        "-c",
        "aio_flush",
        "-c",
        "read -P 0x11 2M 4k",
        "-c",
        "read -P 0x22 3M 4k",
        "-c",
        "flush",
        &f.uri("disk"),
    ]));
    assert!(ok, "qemu-io failed:\n{out}\n{err}");
    assert!(
        !out.contains("fail") && !err.contains("fail"),
        "{out}\n{err}"
    );
    // Check the server side too.
    let disk = f.exports.get_mem("disk");
    let c = disk.contents();
    assert!(c[..8192].iter().all(|&b| b == 0xab));
    assert!(c[8192..12288].iter().all(|&b| b == 0));
    assert!(c[1 << 20..(1 << 20) + 8192].iter().all(|&b| b == 0xcd));
    assert!(c[2 << 20..(2 << 20) + 4096].iter().all(|&b| b == 0x11));

    // A wrong pattern is noticed (the check above can fail).
    let (_, out, err) =
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0xee 0 4k", &f.uri("disk")]));
    assert!(
        out.contains("Pattern verification failed") || err.contains("Pattern verification failed"),
        "{out}\n{err}"
    );
}

#[test]
fn read_only_export_refuses_qemu_io_writes() {
    if !have("qemu-io") {
        return;
    }
    let f = fixture();
    // qemu sees NBD_FLAG_READ_ONLY and refuses a writable open.
    for target in [
        vec!["-f".to_owned(), "raw".to_owned(), f.uri("ro")],
        vec![
            "--image-opts".to_owned(),
            format!("driver=nbd,path={},export=ro", f.socket.display()),
        ],
    ] {
        let (ok, out, err) = run(Command::new("qemu-io")
            .args(["-c", "write -P 0x1 0 4k"])
            .args(&target));
        assert!(!ok, "write to a read-only export succeeded:\n{out}\n{err}");
        assert!(err.contains("Permission denied"), "{out}\n{err}");
        assert!(!out.contains("wrote"), "{out}");
    }
    // Opened read-only, it reads the right bytes and still cannot write.
    let first = pattern(SIZE as usize, 7)[0];
    let (_, out, err) = run(Command::new("qemu-io").args([
        "-r",
        "-f",
        "raw",
        "-c",
        &format!("read -P {first} 0 1"),
        "-c",
        "write -P 0x1 0 4k",
        &f.uri("ro"),
    ]));
    assert!(out.contains("read 1/1 bytes"), "{out}\n{err}");
    assert!(!out.contains("wrote"), "{out}\n{err}");
    assert_eq!(
        f.exports.get_mem("ro").contents(),
        pattern(SIZE as usize, 7)
    );
}

#[test]
fn qemu_img_convert_and_compare_match_the_source() {
    if !have("qemu-img") {
        return;
    }
    let f = fixture();
    let out = f.dir.path().join("out.raw");
    let (ok, so, se) = run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(f.uri("sparse"))
        .arg(&out));
    assert!(ok, "{so}\n{se}");
    assert_eq!(std::fs::read(&out).unwrap(), sparse_data());
    let (ok, so, se) = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(f.uri("sparse"))
        .arg(&out));
    assert!(ok, "{so}\n{se}");
    assert!(so.contains("identical"), "{so}");

    // And into the server: file -> scratch export.
    let src = f.dir.path().join("src.raw");
    let data = pattern(SIZE as usize, 99);
    std::fs::write(&src, &data).unwrap();
    let (ok, so, se) = run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(f.uri("disk")));
    assert!(ok, "{so}\n{se}");
    assert_eq!(f.exports.get_mem("disk").contents(), data);
    // compare notices a difference.
    let (ok, _, _) = run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(f.uri("sparse"))
        .arg(&src));
    assert!(!ok);
}

#[test]
fn nbdcopy_export_to_file_is_identical() {
    if !have("nbdcopy") {
        return;
    }
    let f = fixture();
    let out = f.dir.path().join("copy.raw");
    std::fs::File::create(&out).unwrap();
    let (ok, so, se) = run(Command::new("nbdcopy").arg(f.uri("sparse")).arg(&out));
    assert!(ok, "{so}\n{se}");
    assert_eq!(std::fs::read(&out).unwrap(), sparse_data());
    // And multi-connection copy into the server.
    let (ok, so, se) = run(Command::new("nbdcopy")
        .args(["--connections=4"])
        .arg(&out)
        .arg(f.uri("disk")));
    assert!(ok, "{so}\n{se}");
    assert_eq!(f.exports.get_mem("disk").contents(), sparse_data());
}

#[test]
fn nbdinfo_lists_exports_maps_holes_and_reports_flags() {
    if !have("nbdinfo") {
        return;
    }
    let f = fixture();
    let (ok, so, se) = run(Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd+unix://?socket={}", f.socket.display())));
    assert!(ok, "{so}\n{se}");
    for name in [
        "export=\"disk\"",
        "export=\"sparse\"",
        "export=\"ro\"",
        "half data, half holes",
    ] {
        assert!(so.contains(name), "{name} missing from:\n{so}");
    }

    let (ok, so, se) = run(Command::new("nbdinfo").arg("--map").arg(f.uri("sparse")));
    assert!(ok, "{so}\n{se}");
    let rows: Vec<(u64, u64, u32)> = so
        .lines()
        .map(|l| {
            let mut w = l.split_whitespace();
            let mut n = || w.next().unwrap().parse::<u64>().unwrap();
            (n(), n(), n() as u32)
        })
        .collect();
    let mib = 1u64 << 20;
    assert_eq!(
        rows,
        [
            (0, mib, 0),
            (mib, mib, 3),
            (2 * mib, mib, 0),
            (3 * mib, mib, 3)
        ],
        "{so}"
    );

    let (ok, so, se) = run(Command::new("nbdinfo").arg("--json").arg(f.uri("ro")));
    assert!(ok, "{so}\n{se}");
    let compact: String = so.split_whitespace().collect();
    for field in [
        "\"is_read_only\":true",
        "\"block_size_minimum\":1",
        "\"block_size_preferred\":4096",
        "\"block_size_maximum\":33554432",
        "\"export-size\":4194304",
        "\"can_multi_conn\":true",
    ] {
        assert!(compact.contains(field), "{field} missing from:\n{so}");
    }
    let (ok, so, _) = run(Command::new("nbdinfo").arg("--json").arg(f.uri("disk")));
    assert!(ok);
    let compact: String = so.split_whitespace().collect();
    assert!(compact.contains("\"is_read_only\":false"), "{so}");
    assert!(compact.contains("\"can_fast_zero\":true"), "{so}");
}

#[test]
fn serves_over_tcp_too() {
    if !have("qemu-io") {
        return;
    }
    let exports = MemExports::default();
    exports.add("disk", "", MemExport::new(SIZE));
    let exports = std::sync::Arc::new(exports);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = spore_nbd::serve_tcp(
        listener,
        exports.clone(),
        spore_nbd::ServerConfig::default(),
    )
    .unwrap();
    let (ok, out, err) = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 4k 8k",
        "-c",
        "read -P 0x5a 4k 8k",
        &format!("nbd://127.0.0.1:{port}/disk"),
    ]));
    assert!(ok && !out.contains("fail"), "{out}\n{err}");
    handle.shutdown();
    let c = exports.get_mem("disk").contents();
    assert!(c[4096..12288].iter().all(|&b| b == 0x5a));
    assert!(c[..4096].iter().all(|&b| b == 0));
}

#[test]
fn the_small_client_reads_exports_and_reports_errors() {
    let f = fixture();
    let mut c = spore_nbd::client::Client::connect_unix(&f.socket, "sparse").unwrap();
    assert_eq!(c.size(), SIZE);
    let data = sparse_data();
    for (off, len) in [
        (0u64, 4096usize),
        (1 << 20, 65536),
        (2 << 20, 1 << 20),
        (SIZE - 512, 512),
    ] {
        let mut buf = vec![0xffu8; len];
        c.read(off, &mut buf).unwrap();
        assert_eq!(buf, data[off as usize..off as usize + len], "at {off}");
    }
    // Past the end: the server's error comes back as an errno; the
    // connection stays usable.
    let mut buf = vec![0u8; 4096];
    let err = c.read(SIZE, &mut buf).unwrap_err();
    assert!(err.raw_os_error().is_some(), "{err}");
    c.read(0, &mut buf).unwrap();
    c.disconnect().unwrap();
    let err = spore_nbd::client::Client::connect_unix(&f.socket, "nope").unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
}
