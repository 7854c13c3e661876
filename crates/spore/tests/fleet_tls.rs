//! The peer listener serves the fleet only: mutual TLS against the fleet
//! CA, roles from the caller's certificate, revocation within a second, and
//! plaintext only when the operator says so, loudly. Probed as a stranger
//! would, with curl and raw sockets against a real agent.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{curl_tls, TestAgent, SPORE};
use spore_bench::procs::local_ca;
use spore_pki::Role;

/// curl `url` with `args`: (curl's exit code, HTTP status, body).
fn curl(args: &[String], extra: &[&str], url: &str) -> (i32, u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "20"])
        .args(args)
        .args(extra)
        .arg(url)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        out.status.code().unwrap_or(-1),
        code.trim().parse().unwrap_or(0),
        body.to_owned(),
    )
}

/// A certificate of the local CA (the one the test agents trust).
fn issue(dir: &Path, name: &str, roles: &[Role]) -> PathBuf {
    let out = dir.join(name);
    local_ca()
        .lock()
        .issue(&format!("{name}-{}", std::process::id()), roles, &[], &out)
        .unwrap();
    out
}

/// An agent that takes pushes and migrations, with a small image `img`.
fn origin() -> TestAgent {
    let (t, _) = TestAgent::start_listening(&["--accept-push", "--accept-migrations"]);
    let raw = t.path("img.raw");
    std::fs::write(&raw, vec![7u8; 1 << 20]).unwrap();
    t.ok(&["image", "import", raw.to_str().unwrap(), "--name", "img"]);
    t
}

fn metric(t: &TestAgent, name: &str) -> u64 {
    let out = Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(t.data_dir().join("api.sock"))
        .arg("http://agent/metrics")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name}"))
}

#[test]
fn strangers_get_nothing_and_roles_decide_the_rest() {
    let t = origin();
    let url = |p: &str| format!("{}{p}", t.peer_url());
    let tmp = tempfile::tempdir().unwrap();
    let trust = vec![
        "--cacert".to_string(),
        t.tls_dir().join("ca.pem").display().to_string(),
    ];

    // A fleet host: answered.
    let (_, code, body) = curl(&curl_tls(&t.tls_dir()), &[], &url("/v1/images/img"));
    assert_eq!(code, 200, "{body}");

    // No client certificate: the handshake fails, no route is reached.
    let (exit, code, _) = curl(&trust, &[], &url("/v1/images/img"));
    assert_eq!(
        code, 0,
        "answered without a client certificate (curl exit {exit})"
    );

    // A certificate of another CA: refused the same way.
    let mut other = spore_pki::Ca::init(&tmp.path().join("other-ca"), "other").unwrap();
    other
        .issue(
            "intruder",
            &[Role::Host, Role::Publisher],
            &[],
            &tmp.path().join("intruder"),
        )
        .unwrap();
    let mut args = curl_tls(&tmp.path().join("intruder"));
    args[1] = trust[1].clone();
    let (exit, code, _) = curl(&args, &[], &url("/v1/images/img"));
    assert_eq!(
        code, 0,
        "answered a certificate of another CA (curl exit {exit})"
    );

    // Plaintext to the TLS port, and bytes that are not TLS at all.
    let (_, code, _) = curl(&[], &[], &url("/v1/images/img").replace("https", "http"));
    assert_eq!(code, 0, "answered plaintext");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", t.listen_port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3])
        .unwrap();
    s.write_all(&[0xde; 4096]).unwrap_or(());
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        !String::from_utf8_lossy(&buf).contains("manifest"),
        "garbage got an answer"
    );

    // Roles: an operator is no host; a host is no publisher.
    let operator = issue(tmp.path(), "operator", &[Role::Operator]);
    let (_, code, body) = curl(&curl_tls(&operator), &[], &url("/v1/images/img"));
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("needs the host role"), "{body}");
    let host = issue(tmp.path(), "host", &[Role::Host]);
    let (_, code, body) = curl(&curl_tls(&host), &[], &url("/v1/images/img"));
    assert_eq!(code, 200, "{body}");
    let (_, code, body) = curl(
        &curl_tls(&host),
        &[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data-binary",
            "[]",
        ],
        &url("/v1/chunks/missing"),
    );
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("needs the publisher role"), "{body}");
    let (_, code, body) = curl(
        &curl_tls(&host),
        &[
            "-X",
            "PUT",
            "-H",
            "content-type: application/json",
            "--data-binary",
            "{}",
        ],
        &url("/v1/images/rebound"),
    );
    assert_eq!(code, 403, "{body}");

    // Still serving the fleet, and every refusal counted.
    let (_, code, _) = curl(&curl_tls(&t.tls_dir()), &[], &url("/v1/images/img"));
    assert_eq!(code, 200);
    assert!(metric(&t, "spore_peer_refused_total") >= 3);
    assert!(metric(&t, "spore_peer_tls_failures_total") >= 3);
}

#[test]
fn a_revoked_certificate_is_refused_within_a_second_without_a_restart() {
    let t = origin();
    let tmp = tempfile::tempdir().unwrap();
    let name = format!("leaving-{}", std::process::id());
    let dir = tmp.path().join("leaving");
    local_ca()
        .lock()
        .issue(&name, &[Role::Host], &[], &dir)
        .unwrap();
    let links = spore_transfer::Links::tls(spore_pki::client_config(&dir).unwrap());
    let remote =
        spore_transfer::Remote::new(&t.peer_url(), Duration::from_secs(10), &links).unwrap();
    assert!(remote.resolve_image("img").unwrap().is_some());

    // The revocation list reaches the agent's TLS directory (this CA wrote
    // it); no restart.
    local_ca().lock().revoke(&name).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    // On the connection opened before: refused per request.
    let e = remote.resolve_image("img").unwrap_err().to_string();
    assert!(e.contains("403") && e.contains("revoked"), "{e}");
    // A new connection: refused at the handshake.
    let (exit, code, _) = curl(
        &curl_tls(&dir),
        &[],
        &format!("{}/v1/images/img", t.peer_url()),
    );
    assert_eq!(
        code, 0,
        "a revoked certificate was answered (curl exit {exit})"
    );
    // Others are served on.
    let (_, code, _) = curl(
        &curl_tls(&t.tls_dir()),
        &[],
        &format!("{}/v1/images/img", t.peer_url()),
    );
    assert_eq!(code, 200);
}

/// Runs `spore agent` with `args` on a fresh data directory, expecting it
/// to refuse to start: its stderr.
fn agent_refuses(args: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(SPORE)
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .arg("agent")
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the agent started with {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn without_a_certificate_or_with_plaintext_urls_an_agent_says_what_to_do() {
    let e = agent_refuses(&["--listen", "127.0.0.1:0"]);
    assert!(
        e.contains("spore ca init") && e.contains("spore ca issue"),
        "{e}"
    );
    assert!(e.contains("--insecure-listen"), "{e}");
    let e = agent_refuses(&["--origin", "https://127.0.0.1:1"]);
    assert!(e.contains("no fleet certificate"), "{e}");
    // With a certificate, a plaintext origin is refused with the reason.
    let t = TestAgent::start();
    let out = Command::new(SPORE)
        .arg("--data-dir")
        .arg(t.path("second"))
        .arg("agent")
        .arg("--tls-dir")
        .arg(t.tls_dir())
        .args(["--origin", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("is plaintext") && e.contains("--insecure-listen"),
        "{e}"
    );
    let e = agent_refuses(&["--nbd-tcp", "127.0.0.1:0", "--tls-dir", "/nonexistent"]);
    assert!(
        e.contains("--nbd-tcp") && e.contains("--insecure-listen"),
        "{e}"
    );
}

#[test]
fn insecure_listen_serves_plaintext_and_says_so_at_every_start() {
    let (mut t, _) = TestAgent::start_listening(&["--insecure-listen"]);
    let raw = t.path("img.raw");
    std::fs::write(&raw, vec![1u8; 65536]).unwrap();
    t.ok(&["image", "import", raw.to_str().unwrap(), "--name", "img"]);
    let url = format!("http://127.0.0.1:{}/v1/images/img", t.listen_port());
    let (_, code, body) = curl(&[], &[], &url);
    assert_eq!(code, 200, "{body}");
    let log = t.data_dir().with_extension("agent.log");
    let warned = |log: &Path| {
        std::fs::read_to_string(log)
            .unwrap()
            .matches("WARNING: --insecure-listen")
            .count()
    };
    let before = warned(&log);
    assert!(before >= 1, "no warning in {}", log.display());
    t.restart();
    assert!(warned(&log) >= 1, "no warning after the restart");
}

/// 100 connections that never start a handshake do not hold up a fleet
/// host's requests, and are closed once the handshake time (10 s) is up.
#[test]
fn idle_strangers_hold_nothing_and_are_closed() {
    let t = origin();
    let idle: Vec<std::net::TcpStream> = (0..100)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", t.listen_port())).unwrap())
        .collect();
    let url = format!("{}/v1/images/img", t.peer_url());
    for _ in 0..10 {
        let started = std::time::Instant::now();
        let (_, code, body) = curl(&curl_tls(&t.tls_dir()), &[], &url);
        assert_eq!(code, 200, "{body}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a request waited behind idle connections"
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for mut s in idle {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("an idle connection was not closed in time: {other:?}"),
        }
    }
}

/// `spore ca` as an operator runs it: init, issue, ls, revoke, and the
/// mistakes they refuse with the reason.
#[test]
fn the_ca_commands_issue_list_and_revoke() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let spore = |args: &[&str]| {
        Command::new(SPORE)
            .arg("--data-dir")
            .arg(&home)
            .args(args)
            .output()
            .unwrap()
    };
    let ok = |args: &[&str]| {
        let out = spore(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let fails = |args: &[&str]| {
        let out = spore(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(fails(&["ca", "issue", "h", "--role", "host"]).contains("spore ca init"));
    ok(&["ca", "init"]);
    assert!(fails(&["ca", "init"]).contains("already holds a CA"));
    let out = ok(&[
        "ca",
        "issue",
        "host-a",
        "--role",
        "host,publisher",
        "--san",
        "10.0.0.2",
    ]);
    assert!(out.contains("issued host-a"), "{out}");
    // Default: where the agent looks.
    for f in ["ca.pem", "cert.pem", "key.pem", "crl.pem"] {
        assert!(home.join("pki").join(f).is_file(), "{f}");
    }
    let id = spore_pki::PeerIdentity::of(
        &std::fs::read_to_string(home.join("pki/cert.pem"))
            .map(|pem| {
                use rustls::pki_types::{pem::PemObject, CertificateDer};
                CertificateDer::from_pem_slice(pem.as_bytes())
                    .unwrap()
                    .to_vec()
            })
            .unwrap(),
    )
    .unwrap();
    assert_eq!(id.roles, vec![Role::Host, Role::Publisher]);
    assert!(fails(&["ca", "issue", "x", "--role", "admin"]).contains("unknown role"));
    assert!(fails(&["ca", "issue", "../x", "--role", "host"]).contains("is not valid"));
    let ops = tmp.path().join("ops");
    ok(&[
        "ca",
        "issue",
        "ops",
        "--role",
        "operator",
        "--out",
        ops.to_str().unwrap(),
    ]);
    let crl_before = std::fs::read(ops.join("crl.pem")).unwrap();
    assert!(ok(&["ca", "revoke", "ops"]).contains("revoked ops"));
    assert_ne!(std::fs::read(ops.join("crl.pem")).unwrap(), crl_before);
    let list: serde_json::Value = serde_json::from_str(&ok(&["ca", "ls", "--json"])).unwrap();
    let revoked: Vec<(String, bool)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap().to_owned(),
                i["revoked"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        revoked,
        vec![("host-a".into(), false), ("ops".into(), true)]
    );
    assert!(fails(&["ca", "revoke", "nobody"]).contains("issued no certificate"));
}
