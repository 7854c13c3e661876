//! NBD over TLS in TLS-required mode, with a hostile client's view: before
//! `NBD_OPT_STARTTLS` nothing is served; after it, a client certificate of
//! the fleet CA that the policy admits is needed; haggling starts anew
//! inside TLS.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use rustls::pki_types::{CertificateDer, ServerName};
use spore_nbd::{ServerConfig, TlsPolicy};
use spore_pki::{Ca, PeerIdentity, Role, ServerTls};

/// Admits certificates of the CA with the `host` role, until `closed`.
#[derive(Debug)]
struct Hosts(ServerTls, Arc<AtomicBool>);

impl TlsPolicy for Hosts {
    fn config(&self) -> Arc<rustls::ServerConfig> {
        self.0.config()
    }
    fn admit(&self, chain: &[CertificateDer<'static>]) -> Result<String, String> {
        let id = PeerIdentity::of(chain.first().ok_or("no certificate")?.as_ref())
            .map_err(|e| e.to_string())?;
        if self.1.load(Ordering::SeqCst) {
            Err(format!("{id}: no longer admitted"))
        } else if id.has(Role::Host) {
            Ok(id.to_string())
        } else {
            Err(format!("{id}: not a host"))
        }
    }
}

/// A CA with a server, a host client and a publisher client; and a
/// stranger from another CA. Returns the fixture serving `disk` with TLS
/// required.
fn fleet(dir: &Path) -> Fixture {
    fleet_closing(dir, Arc::default())
}

/// [`fleet`], whose policy stops admitting anyone once `closed` is set.
fn fleet_closing(dir: &Path, closed: Arc<AtomicBool>) -> Fixture {
    let mut ca = Ca::init(&dir.join("ca"), "test").unwrap();
    ca.issue(
        "server",
        &[Role::Host],
        &["localhost".into()],
        &dir.join("server"),
    )
    .unwrap();
    ca.issue("client", &[Role::Host], &[], &dir.join("client"))
        .unwrap();
    ca.issue("publisher", &[Role::Publisher], &[], &dir.join("publisher"))
        .unwrap();
    let mut other = Ca::init(&dir.join("other"), "other").unwrap();
    other
        .issue("stranger", &[Role::Host], &[], &dir.join("stranger"))
        .unwrap();
    // The stranger trusts this fleet's CA (so that only the server's check
    // of the stranger's certificate can fail).
    std::fs::copy(dir.join("ca/ca.pem"), dir.join("stranger/ca.pem")).unwrap();
    let exports = MemExports::default();
    exports.add("disk", "a disk", MemExport::new(1 << 20));
    let config = ServerConfig {
        tls: Some(Arc::new(Hosts(
            ServerTls::load(&dir.join("server")).unwrap(),
            closed,
        ))),
        ..ServerConfig::default()
    };
    Fixture::start_with(exports, config)
}

/// One option inside TLS: its replies' types and data, up to the ACK or
/// the first error.
fn tls_option(
    s: &mut impl ReadWrite,
    option: u32,
    data: &[u8],
) -> std::io::Result<Vec<(u32, Vec<u8>)>> {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)?;
    s.flush()?;
    let mut replies = Vec::new();
    loop {
        let mut head = [0u8; 20];
        s.read_exact(&mut head)?;
        let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
        let mut body = vec![0; len as usize];
        s.read_exact(&mut body)?;
        let last = kind != REP_SERVER && kind != REP_INFO && kind != REP_META_CONTEXT;
        replies.push((kind, body));
        if last {
            return Ok(replies);
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Greets, upgrades with STARTTLS and shakes hands as `client`.
fn upgrade(
    f: &Fixture,
    client: &Path,
) -> rustls::StreamOwned<rustls::ClientConnection, std::os::unix::net::UnixStream> {
    let mut c = f.connect();
    c.greet();
    let r = c.option(OPT_STARTTLS, &[]);
    assert_eq!(r[0].0, REP_ACK, "STARTTLS acknowledged");
    let config = spore_pki::client_config(client).unwrap();
    let conn =
        rustls::ClientConnection::new(config, ServerName::try_from("localhost").unwrap()).unwrap();
    rustls::StreamOwned::new(conn, c.stream.try_clone().unwrap())
}

#[test]
fn before_tls_only_starttls_and_abort_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let f = fleet(dir.path());
    let mut c = f.connect();
    c.greet();
    for (option, data) in [
        (OPT_LIST, vec![]),
        (OPT_GO, go_data("disk", &[])),
        (OPT_INFO, go_data("disk", &[])),
        (OPT_STRUCTURED_REPLY, vec![]),
    ] {
        let r = c.option(option, &data);
        assert_eq!(r.len(), 1, "option {option}: {r:?}");
        assert_eq!(r[0].0, REP_ERR_TLS_REQD, "option {option}");
        assert!(!String::from_utf8_lossy(&r[0].1).contains("disk"));
    }
    // STARTTLS takes no data.
    assert_eq!(c.option(OPT_STARTTLS, &[1])[0].0, REP_ERR_INVALID);
    // EXPORT_NAME has no error reply: the connection closes.
    c.send_option(OPT_EXPORT_NAME, b"disk");
    assert!(c.is_closed());
    // ABORT is answered.
    let mut c = f.connect();
    c.greet();
    assert_eq!(c.option(OPT_ABORT, &[])[0].0, REP_ACK);
}

#[test]
fn inside_tls_haggling_starts_anew_and_reads_work() {
    let dir = tempfile::tempdir().unwrap();
    let f = fleet(dir.path());
    let mut s = upgrade(&f, &dir.path().join("client"));
    let r = tls_option(&mut s, OPT_LIST, &[]).unwrap();
    assert_eq!(r.last().unwrap().0, REP_ACK);
    assert!(String::from_utf8_lossy(&r[0].1).contains("disk"), "{r:?}");
    // A second STARTTLS is invalid, and haggling goes on.
    let r = tls_option(&mut s, OPT_STARTTLS, &[]).unwrap();
    assert_eq!(r[0].0, REP_ERR_INVALID);
    let r = tls_option(&mut s, OPT_GO, &go_data("disk", &[])).unwrap();
    assert_eq!(r.last().unwrap().0, REP_ACK, "{r:?}");
    // A read inside TLS (simple reply: no structured replies asked).
    let mut req = REQUEST_MAGIC.to_be_bytes().to_vec();
    req.extend_from_slice(&0u16.to_be_bytes());
    req.extend_from_slice(&CMD_READ.to_be_bytes());
    req.extend_from_slice(&7u64.to_be_bytes());
    req.extend_from_slice(&0u64.to_be_bytes());
    req.extend_from_slice(&4096u32.to_be_bytes());
    s.write_all(&req).unwrap();
    let mut reply = vec![0u8; 16 + 4096];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
    assert_eq!(&reply[4..8], &0u32.to_be_bytes(), "no error");
    assert_eq!(&reply[8..16], &7u64.to_be_bytes());
    assert!(reply[16..].iter().all(|b| *b == 0));
}

#[test]
fn a_stranger_or_a_refused_role_gets_nothing_and_the_server_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let f = fleet(dir.path());
    for who in ["stranger", "publisher"] {
        let mut s = upgrade(&f, &dir.path().join(who));
        let r = tls_option(&mut s, OPT_LIST, &[]);
        assert!(r.is_err(), "{who} was answered: {r:?}");
    }
    // Garbage instead of a TLS hello.
    let mut c = f.connect();
    c.greet();
    assert_eq!(c.option(OPT_STARTTLS, &[])[0].0, REP_ACK);
    c.stream
        .write_all(&[0x16, 3, 1, 0xff, 0xff, 0, 1, 2])
        .unwrap();
    // At most a TLS alert (0x15) comes back, then the end.
    c.stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    c.stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty() || rest[0] == 0x15, "{rest:?}");
    // A fleet host is still served.
    let mut s = upgrade(&f, &dir.path().join("client"));
    let r = tls_option(&mut s, OPT_LIST, &[]).unwrap();
    assert_eq!(r.last().unwrap().0, REP_ACK);
}

/// A client no longer admitted (its certificate revoked) loses the session
/// it has open within a second.
#[test]
fn an_open_session_ends_when_its_client_is_no_longer_admitted() {
    let dir = tempfile::tempdir().unwrap();
    let closed = Arc::new(AtomicBool::new(false));
    let f = fleet_closing(dir.path(), closed.clone());
    let mut s = upgrade(&f, &dir.path().join("client"));
    let r = tls_option(&mut s, OPT_GO, &go_data("disk", &[])).unwrap();
    assert_eq!(r.last().unwrap().0, REP_ACK, "{r:?}");
    closed.store(true, Ordering::SeqCst);
    let started = std::time::Instant::now();
    s.sock
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 64];
    let read = s.read(&mut buf);
    assert!(
        matches!(read, Ok(0) | Err(_)) && started.elapsed() < std::time::Duration::from_secs(3),
        "the session went on: {read:?} after {:?}",
        started.elapsed()
    );
}
