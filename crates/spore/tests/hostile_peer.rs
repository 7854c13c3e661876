//! A host that accepts migrations, fed what a hostile or broken peer would
//! send: every value that could reach QEMU's command line is refused with
//! 400 before anything starts, and no QEMU process is left behind.

mod common;

use std::process::Command;

use common::TestAgent;

/// POSTs `body` to `path` on the agent's peer listener: (status, body).
fn post(t: &TestAgent, port: u16, path: &str, body: &serde_json::Value) -> (u16, String) {
    let out = Command::new("curl")
        .args(common::curl_tls(&t.tls_dir()))
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", "POST"])
        .args(["-H", "content-type: application/json", "--data-binary"])
        .arg(body.to_string())
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn incoming(vm: &str) -> serde_json::Value {
    serde_json::json!({
        "vm": vm, "from": "127.0.0.1:1", "image": "img", "accel": "tcg",
        "memory_mib": 256, "cpus": 1, "max_memory_mib": 1024, "max_cpus": 2,
        "base_mib": 256, "dimms": [], "boot_cpus": 1,
        "mac": "52:54:00:12:34:56", "vmgenid": "a32f7f28-983f-4f6c-af96-7bc52f2d4293",
        "hostname": "web", "instance_id": "i-1", "postcopy": false, "timeout_s": 30
    })
}

#[test]
fn values_that_would_reach_the_qemu_command_line_are_refused() {
    let (t, port) = TestAgent::start_listening(&["--accept-migrations"]);
    let cases: &[(&str, serde_json::Value)] = &[
        (
            "mac",
            serde_json::json!("52:54:00:12:34:56,romfile=/etc/shadow"),
        ),
        ("mac", serde_json::json!("not a mac")),
        (
            "vmgenid",
            serde_json::json!("a32f7f28-983f-4f6c-af96-7bc52f2d4293,romfile=/etc/shadow"),
        ),
        ("hostname", serde_json::json!("web,x=y")),
        ("instance_id", serde_json::json!("i-1,romfile=/etc/shadow")),
        ("image", serde_json::json!("../../etc")),
        ("vm", serde_json::json!("a/b")),
        (
            "dimms",
            serde_json::json!([["dimm0,romfile=/etc/shadow", 128]]),
        ),
        ("manifest", serde_json::json!("not-a-chunk-id")),
    ];
    for (field, value) in cases {
        let mut body = incoming("victim");
        body[*field] = value.clone();
        let (code, text) = post(&t, port, "/v1/migrations", &body);
        assert_eq!(code, 400, "{field}={value}: {code} {text}");
        assert!(!text.is_empty(), "{field}: no message");
        // Nothing was started or recorded for it.
        let vms = t.json(&["vm", "ls", "--json"]);
        assert_eq!(vms.as_array().map(Vec::len), Some(0), "{field}: {vms}");
    }
    let qemus = Command::new("pgrep")
        .args(["-f", &format!("{}.*victim", t.data_dir().display())])
        .output()
        .unwrap();
    assert!(qemus.stdout.is_empty(), "a QEMU was started");
}

/// POSTs to `path` and says the status.
fn post_status(t: &TestAgent, port: u16, path: &str) -> u16 {
    post(t, port, path, &serde_json::json!({})).0
}

/// No QEMU of `t` runs any more (each incoming migration started one).
fn no_qemu_left(t: &TestAgent) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let out = Command::new("pgrep")
            .args(["-f", &format!("qemu-system.*{}", t.data_dir().display())])
            .output()
            .unwrap();
        if out.stdout.is_empty() {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "a QEMU was left");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// `--max-incoming-migrations 1`: a second incoming migration while one is
/// prepared is answered 503 with the flag's name, and taken once the first
/// is gone.
#[test]
fn incoming_migrations_beyond_the_bound_are_answered_busy() {
    let (t, port) =
        TestAgent::start_listening(&["--accept-migrations", "--max-incoming-migrations", "1"]);
    let raw = t.path("img.raw");
    std::fs::write(&raw, vec![0u8; 4 << 20]).unwrap();
    t.ok(&["image", "import", raw.to_str().unwrap(), "--name", "img"]);
    let (code, text) = post(&t, port, "/v1/migrations", &incoming("first"));
    assert_eq!(code, 200, "{text}");
    let (code, text) = post(&t, port, "/v1/migrations", &incoming("second"));
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("--max-incoming-migrations"), "{text}");
    assert!((200..300).contains(&post_status(&t, port, "/v1/migrations/first/abort")));
    let (code, text) = post(&t, port, "/v1/migrations", &incoming("second"));
    assert_eq!(code, 200, "after the first ended: {text}");
    assert!((200..300).contains(&post_status(&t, port, "/v1/migrations/second/abort")));
    no_qemu_left(&t);
    // A bound of 0 is refused at start, with the way to take none.
    let e = t.fails(&["agent", "--max-incoming-migrations", "0"]);
    assert!(e.contains("--accept-migrations"), "{e}");
}

/// Is `s` closed by the other end within `within`? (Bytes sent before the
/// close, a TLS alert say, are read past.)
fn closed_within(s: &mut std::net::TcpStream, within: std::time::Duration) -> bool {
    use std::io::Read;
    let deadline = std::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// A TCP connection to `port` from the loopback address `from`.
fn connect_from(from: [u8; 4], port: u16) -> std::net::TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&std::net::SocketAddr::from((from, 0)).into())
        .unwrap();
    sock.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())
        .unwrap();
    sock.into()
}

/// `--peer-connections 8 --peer-connections-per-host 3
/// --peer-handshake-timeout 2`: a fourth connection from one address is
/// closed at once, as is a ninth in all (from addresses under their own
/// bound); idle ones are closed when the
/// handshake time is up; a fleet host is served all along.
#[test]
fn connection_bounds_hold_per_address_and_in_all() {
    let (t, port) = TestAgent::start_listening(&[
        "--peer-connections",
        "8",
        "--peer-connections-per-host",
        "3",
        "--peer-handshake-timeout",
        "2",
    ]);
    let short = std::time::Duration::from_millis(700);
    let mut held: Vec<std::net::TcpStream> =
        (0..3).map(|_| connect_from([127, 0, 0, 1], port)).collect();
    let mut fourth = connect_from([127, 0, 0, 1], port);
    assert!(
        closed_within(&mut fourth, short),
        "a fourth connection from one address was kept"
    );
    for host in [2, 2, 2, 3, 3] {
        held.push(connect_from([127, 0, 0, host], port));
    }
    let mut ninth = connect_from([127, 0, 0, 4], port);
    assert!(
        closed_within(&mut ninth, short),
        "a ninth connection was kept"
    );
    // The ones held are open still, until the handshake time is up.
    assert!(!closed_within(
        &mut held[0],
        std::time::Duration::from_millis(300)
    ));
    for s in &mut held {
        assert!(
            closed_within(s, std::time::Duration::from_secs(5)),
            "an idle connection outlived the handshake bound"
        );
    }
    // Answered (409: this agent takes no pushes), so served.
    let (code, text) = post(
        &t,
        port,
        "/v1/chunks/missing",
        &serde_json::json!({"ids": []}),
    );
    assert_eq!(code, 409, "the agent stopped serving: {code} {text}");
}

/// A TLS connection of a fleet host (the agent's own certificate).
fn tls_client(
    t: &TestAgent,
    port: u16,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let config = spore_pki::client_config(&t.tls_dir()).unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let conn = rustls::ClientConnection::new(config, name).unwrap();
    rustls::StreamOwned::new(
        conn,
        std::net::TcpStream::connect(("127.0.0.1", port)).unwrap(),
    )
}

/// `--peer-header-timeout 2`: a fleet host that sends half a request's head
/// is cut off; `--peer-max-body 70M`: a bigger body is answered 413; a
/// bound below what a chunk needs is refused at start.
#[test]
fn slow_heads_and_big_bodies_are_cut_off() {
    use std::io::{Read, Write};
    let (t, port) = TestAgent::start_listening(&[
        "--accept-push",
        "--peer-header-timeout",
        "2",
        "--peer-max-body",
        "70M",
    ]);
    let mut s = tls_client(&t, port);
    s.write_all(b"GET /v1/images/img HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    s.flush().unwrap();
    let started = std::time::Instant::now();
    s.sock
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let waited = started.elapsed();
    assert!(
        waited < std::time::Duration::from_secs(6),
        "half a head was kept {waited:?}"
    );
    assert!(
        !String::from_utf8_lossy(&buf).contains("200 OK"),
        "answered"
    );

    let big = t.path("big");
    std::fs::write(&big, vec![1u8; 72 << 20]).unwrap();
    let out = Command::new("curl")
        .args(common::curl_tls(&t.tls_dir()))
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "PUT",
            "--data-binary",
        ])
        .arg(format!("@{}", big.display()))
        .arg(format!(
            "https://127.0.0.1:{port}/v1/chunks/{}",
            "0".repeat(64)
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "413");
    let e = t.fails(&["agent", "--peer-max-body", "1M"]);
    assert!(e.contains("--peer-max-body must be at least"), "{e}");
}

/// 200 connections trickling a byte every half second for 20 s (from four
/// loopback addresses, 50 each, under the per-address bound) while a fleet
/// host fetches: its p99 latency stays within twice the idle p99 (and a
/// few milliseconds, the scheduler's noise on two cores).
#[test]
fn two_hundred_slow_connections_do_not_slow_a_fleet_host() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    let (t, port) = TestAgent::start_listening(&[]);
    let raw = t.path("img.raw");
    std::fs::write(&raw, vec![3u8; 1 << 20]).unwrap();
    t.ok(&["image", "import", raw.to_str().unwrap(), "--name", "img"]);
    let links = spore_transfer::Links::tls(spore_pki::client_config(&t.tls_dir()).unwrap());
    let http = links.http(
        std::time::Duration::from_secs(5),
        std::time::Duration::from_secs(10),
    );
    let url = format!("{}/v1/images/img", t.peer_url());
    let fetch = || {
        let t0 = std::time::Instant::now();
        let r = http.get(&url).call().expect("a fleet host is served");
        assert_eq!(r.status(), 200);
        let _ = r.into_string();
        t0.elapsed().as_secs_f64() * 1e3
    };
    let p99 = |mut ms: Vec<f64>| {
        ms.sort_by(f64::total_cmp);
        ms[(ms.len() * 99 / 100).min(ms.len() - 1)]
    };
    // The connection's handshake and the first requests are no measure.
    (0..20).for_each(|_| {
        fetch();
    });
    let idle = p99((0..300).map(|_| fetch()).collect());
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let held = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let trickle: Vec<_> = (2..6u8)
        .map(|host| {
            let (stop, held) = (stop.clone(), held.clone());
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(120 * host as u64));
                let mut socks: Vec<_> = (0..50)
                    .map(|_| connect_from([127, 0, 0, host], port))
                    .collect();
                held.fetch_add(socks.len(), Ordering::Relaxed);
                while !stop.load(Ordering::Relaxed) {
                    for s in &mut socks {
                        if s.write_all(&[0x16]).is_err() {
                            // Closed at the handshake bound: come back.
                            *s = connect_from([127, 0, 0, host], port);
                        }
                    }
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
            })
        })
        .collect();
    let started = std::time::Instant::now();
    while held.load(Ordering::Relaxed) < 200 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut during = Vec::new();
    while started.elapsed() < std::time::Duration::from_secs(20) {
        during.push(fetch());
    }
    let loaded = p99(during);
    stop.store(true, Ordering::Relaxed);
    for th in trickle {
        th.join().unwrap();
    }
    eprintln!("fleet host's p99: idle {idle:.2} ms, beside 200 slow connections {loaded:.2} ms");
    assert!(
        loaded <= 2.0 * idle.max(2.5),
        "p99 {loaded:.2} ms beside 200 slow connections, {idle:.2} ms idle"
    );
}
