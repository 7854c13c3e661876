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
use rustls::pki_types::pem::PemObject;
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
    assert!(metric(&t, "spore_peer_crl_reloads_total") >= 1);
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
    // NBD over TCP serves other hosts too: the same certificate.
    let e = agent_refuses(&["--nbd-tcp", "127.0.0.1:0", "--tls-dir", "/nonexistent"]);
    assert!(
        e.contains("spore ca issue") && e.contains("--insecure-listen"),
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

/// 100 connections from another address that never start a handshake do
/// not hold up a fleet host's requests, and are closed once the handshake
/// time (10 s) is up.
#[test]
fn idle_strangers_hold_nothing_and_are_closed() {
    let t = origin();
    let idle: Vec<std::net::TcpStream> = (0..100)
        .map(|_| {
            let sock =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            sock.bind(&std::net::SocketAddr::from(([127, 0, 0, 9], 0)).into())
                .unwrap();
            sock.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], t.listen_port())).into())
                .unwrap();
            sock.into()
        })
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
    assert!(fails(&["ca", "issue", "../x", "--role", "host"]).contains(spore_api::NAME_RULE));
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

/// A client directory the way GnuTLS (QEMU, libnbd) reads one: the CA
/// `ca` trusts, and the certificate and key of `client`.
fn gnutls_dir(out: &Path, ca: &Path, client: &Path) -> PathBuf {
    std::fs::create_dir_all(out).unwrap();
    std::fs::copy(ca.join("ca.pem"), out.join("ca-cert.pem")).unwrap();
    std::fs::copy(client.join("cert.pem"), out.join("client-cert.pem")).unwrap();
    std::fs::copy(client.join("key.pem"), out.join("client-key.pem")).unwrap();
    out.to_owned()
}

/// `nbdinfo URI`: (succeeded, stdout and stderr).
fn nbdinfo(uri: &str) -> (bool, String) {
    let out = Command::new("nbdinfo").arg(uri).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// NBD over TCP requires TLS (NBD_OPT_STARTTLS) with a fleet certificate:
/// QEMU's NBD client (`tls-creds`) writes and reads a disk, `nbdinfo` and
/// `nbdcopy` read it over `nbds://`; a plaintext client, a certificate of
/// another CA and a publisher-only certificate get nothing, and the agent
/// keeps serving.
#[test]
fn nbd_over_tcp_requires_tls_and_a_fleet_host() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let t = TestAgent::start_with(&["--nbd-tcp", &addr]);
    let raw = t.path("img.raw");
    std::fs::write(&raw, vec![7u8; 1 << 20]).unwrap();
    t.ok(&["image", "import", raw.to_str().unwrap(), "--name", "img"]);
    t.ok(&["disk", "create", "d", "--image", "img"]);
    let dir = t.path("clients");
    let host = issue(&dir, "nbd-host", &[Role::Host]);
    let good = gnutls_dir(&dir.join("good"), &host, &host);

    let out = Command::new("qemu-io")
        .args(["--object"])
        .arg(format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            good.display()
        ))
        .args(["--image-opts"])
        .arg(format!(
            "driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={port},file.export=disk/d,file.tls-creds=tls0"
        ))
        .args(["-c", "write -P 0x5a 0 64k", "-c", "read -P 0x5a 0 64k"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("verification"),
        "QEMU over TLS: {text}"
    );

    let nbds = |certs: &Path| {
        format!(
            "nbds://127.0.0.1:{port}/disk/d?tls-certificates={}",
            certs.display()
        )
    };
    let (ok, info) = nbdinfo(&nbds(&good));
    assert!(ok && info.contains("1048576"), "nbdinfo over TLS: {info}");
    let copy = t.path("copy.raw");
    common::sh(Command::new("nbdcopy").arg(nbds(&good)).arg(&copy));
    let bytes = std::fs::read(&copy).unwrap();
    assert!(bytes[..65536].iter().all(|b| *b == 0x5a), "QEMU's write");
    assert!(bytes[65536..].iter().all(|b| *b == 7), "the image below");

    // Plaintext: every option but STARTTLS is refused (TLS required).
    let (ok, e) = nbdinfo(&format!("nbd://127.0.0.1:{port}/disk/d"));
    assert!(!ok, "plaintext NBD answered: {e}");
    assert!(e.to_lowercase().contains("tls"), "{e}");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4k"])
        .arg(format!("nbd://127.0.0.1:{port}/disk/d"))
        .output()
        .unwrap();
    assert!(
        !out.status.success() || String::from_utf8_lossy(&out.stdout).contains("failed"),
        "QEMU read in plaintext"
    );
    // A certificate of another CA; a certificate without the host role.
    let mut other = spore_pki::Ca::init(&dir.join("other-ca"), "other").unwrap();
    other
        .issue("stranger", &[Role::Host], &[], &dir.join("stranger"))
        .unwrap();
    let stranger = gnutls_dir(&dir.join("stranger-gnutls"), &host, &dir.join("stranger"));
    let (ok, e) = nbdinfo(&nbds(&stranger));
    assert!(!ok, "another CA's certificate was served: {e}");
    let publisher = issue(&dir, "nbd-publisher", &[Role::Publisher]);
    let publisher = gnutls_dir(&dir.join("publisher-gnutls"), &host, &publisher);
    let (ok, e) = nbdinfo(&nbds(&publisher));
    assert!(!ok, "a publisher-only certificate was served: {e}");
    let log = std::fs::read_to_string(t.data_dir().with_extension("agent.log")).unwrap();
    assert!(
        log.contains("NBD needs the host or operator role"),
        "the refusal is logged"
    );
    // Garbage instead of a TLS hello after STARTTLS costs the agent nothing.
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(&0x4948_4156_454f_5054u64.to_be_bytes())
        .unwrap();
    s.write_all(&5u32.to_be_bytes()).unwrap();
    s.write_all(&0u32.to_be_bytes()).unwrap();
    let mut ack = [0u8; 20];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(&ack[12..16], &1u32.to_be_bytes(), "STARTTLS acknowledged");
    s.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3])
        .unwrap();
    drop(s);
    let (ok, info) = nbdinfo(&nbds(&good));
    assert!(ok, "the agent stopped serving: {info}");
}

/// The API socket is 0600 whatever the umask, and a caller that reaches it
/// anyway (its mode opened by hand) is refused by its credentials
/// (SO_PEERCRED) unless it is root or the agent's user.
#[test]
fn the_api_socket_is_for_root_and_the_agents_user_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let mut agent = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 000; exec {SPORE} --data-dir {} agent --cache-size 16M",
            data.display()
        ))
        .stderr(log)
        .spawn()
        .unwrap();
    let sock = data.join("api.sock");
    let api = |prefix: &[&str]| {
        let mut c = Command::new(prefix.first().copied().unwrap_or("curl"));
        c.args(prefix.iter().skip(1))
            .args(["-s", "--max-time", "10", "--unix-socket"])
            .arg(&sock)
            .arg("http://agent/metrics");
        c.output().unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !api(&[]).status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not start"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    let spore_group = Command::new("getent")
        .args(["group", "spore"])
        .status()
        .unwrap()
        .success();
    assert_eq!(mode, if spore_group { 0o660 } else { 0o600 }, "{mode:o}");
    // Opened to everyone by hand: the kernel's word on the caller decides.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let nobody = api(&[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "curl",
    ]);
    assert!(
        !nobody.status.success() && nobody.stdout.is_empty(),
        "nobody used the API: {}",
        String::from_utf8_lossy(&nobody.stdout)
    );
    let root = api(&[]);
    assert!(root.status.success());
    let metrics = String::from_utf8_lossy(&root.stdout).into_owned();
    assert!(
        metrics.contains("spore_api_refused_total 1"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("api_refused"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // SAFETY: kill with a pid this test spawned.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    agent.wait().unwrap();
    let text = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    assert!(text.contains("API connection refused"), "{text}");
}

/// A certificate of the fleet CA whose validity has ended is refused at the
/// handshake like a stranger's; one valid now is served.
#[test]
fn an_expired_certificate_is_refused() {
    let t = origin();
    let tmp = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now();
    let day = Duration::from_secs(86_400);
    let expired = tmp.path().join("expired");
    local_ca()
        .lock()
        .issue_valid(
            &format!("expired-{}", std::process::id()),
            &[Role::Host],
            &[],
            &expired,
            now - 3 * day..now - day,
        )
        .unwrap();
    let url = format!("{}/v1/images/img", t.peer_url());
    let (exit, code, _) = curl(&curl_tls(&expired), &[], &url);
    assert_eq!(
        code, 0,
        "an expired certificate was answered (curl exit {exit})"
    );
    let links = spore_transfer::Links::tls(spore_pki::client_config(&expired).unwrap());
    let e = spore_transfer::Remote::new(&t.peer_url(), Duration::from_secs(10), &links)
        .unwrap()
        .resolve_image("img")
        .unwrap_err()
        .to_string();
    // Refused at the handshake, saying why (not an HTTP answer; the port
    // in the message may contain any digits).
    assert!(e.contains("CertificateExpired"), "{e}");
    let (_, code, _) = curl(&curl_tls(&t.tls_dir()), &[], &url);
    assert_eq!(code, 200, "a valid certificate is served");
}

/// Clients check servers against the revocation list too: once a host's
/// certificate is revoked, the fleet's clients refuse to talk to it (within
/// a second, no restart), and a clear error says why.
#[test]
fn a_revoked_server_is_refused_by_its_clients() {
    let t = origin();
    let tmp = tempfile::tempdir().unwrap();
    let client = issue(tmp.path(), "client", &[Role::Host]);
    let links = spore_transfer::Links::tls(spore_pki::client_config(&client).unwrap());
    let remote =
        spore_transfer::Remote::new(&t.peer_url(), Duration::from_secs(10), &links).unwrap();
    assert!(remote.resolve_image("img").unwrap().is_some());
    let own = std::fs::read(t.tls_dir().join("cert.pem")).unwrap();
    let der = rustls::pki_types::CertificateDer::from_pem_slice(&own).unwrap();
    let server = spore_pki::PeerIdentity::of(der.as_ref()).unwrap();
    local_ca().lock().revoke(&server.name).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    // A new connection (the old one may be kept: close it by a new client).
    let remote =
        spore_transfer::Remote::new(&t.peer_url(), Duration::from_secs(10), &links).unwrap();
    let e = format!("{:#}", remote.resolve_image("img").unwrap_err());
    assert!(e.to_lowercase().contains("revoked"), "{e}");
}

/// An operator drives another host's agent through its peer listener
/// (`spore --remote URL`, the API under /api); a host or publisher
/// certificate is refused with 403 naming the operator role; an agent in
/// plaintext serves no remote API at all.
#[test]
fn operators_drive_a_remote_agent_and_hosts_do_not() {
    let t = origin();
    let tmp = tempfile::tempdir().unwrap();
    let home = |name: &str, roles: &[Role]| {
        let home = tmp.path().join(name);
        local_ca()
            .lock()
            .issue(
                &format!("{name}-{}", std::process::id()),
                roles,
                &[],
                &home.join("pki"),
            )
            .unwrap();
        home
    };
    let remote = |home: &Path, args: &[&str]| {
        let out = Command::new(SPORE)
            .arg("--data-dir")
            .arg(home)
            .args(["--remote", &t.peer_url()])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let ops = home("ops", &[Role::Operator]);
    let (ok, out) = remote(&ops, &["image", "ls", "--json"]);
    assert!(ok && out.contains("\"img\""), "{out}");
    let (ok, out) = remote(&ops, &["disk", "create", "from-afar", "--image", "img"]);
    assert!(ok, "{out}");
    assert!(t.ok(&["disk", "ls"]).contains("from-afar"));
    let log = std::fs::read_to_string(t.data_dir().with_extension("agent.log")).unwrap();
    assert!(
        log.contains("privileged peer request") && log.contains("/api/v1/disks"),
        "no line for the operator's request"
    );
    assert!(metric(&t, "spore_peer_privileged_total") >= 2);

    let host = home("host", &[Role::Host, Role::Publisher]);
    let (ok, out) = remote(&host, &["image", "ls"]);
    assert!(!ok && out.contains("needs the operator role"), "{out}");
    let (ok, out) = remote(&host, &["vm", "rm", "anything", "--force"]);
    assert!(!ok && out.contains("needs the operator role"), "{out}");
    // http:// is refused by the client itself.
    let out = Command::new(SPORE)
        .arg("--data-dir")
        .arg(&ops)
        .args(["--remote", &format!("http://127.0.0.1:{}", t.listen_port())])
        .args(["image", "ls"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("https://"));

    let (plain, port) = TestAgent::start_listening(&["--insecure-listen"]);
    let (_, code, body) = curl(&[], &[], &format!("http://127.0.0.1:{port}/api/v1/images"));
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("TLS only"), "{body}");
    drop(plain);
}
