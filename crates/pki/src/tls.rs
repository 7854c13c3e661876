//! rustls configurations from a TLS directory: the server side an agent's
//! peer listener uses (client certificates required, checked against the
//! fleet CA and its revocation list, which is reloaded when it changes) and
//! the client side every connection to another host uses. TLS 1.3 only,
//! aws-lc-rs.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::pki_types::{ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::{PeerIdentity, PkiError, Result};

/// How often the revocation list's file is looked at (a stat).
const CRL_CHECK_EVERY: Duration = Duration::from_millis(200);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn missing(dir: &Path, file: &str) -> PkiError {
    PkiError::Missing(format!(
        "no {file} in {}: this host has no fleet certificate yet. Make one with \
         `spore ca init` (once per fleet) and `spore ca issue NAME --role host --san ADDRESS --out {}`; \
         or run without TLS with --insecure-listen (anyone who can reach the port is then trusted)",
        dir.display(),
        dir.display()
    ))
}

fn read_pem<T>(dir: &Path, file: &str, parse: impl FnOnce(&Path) -> Option<T>) -> Result<T> {
    let path = dir.join(file);
    if !path.exists() {
        return Err(missing(dir, file));
    }
    parse(&path).ok_or_else(|| PkiError::Invalid(format!("{} holds no valid PEM", path.display())))
}

fn certs(dir: &Path, file: &str) -> Result<Vec<CertificateDer<'static>>> {
    read_pem(dir, file, |p| {
        let certs: Vec<_> = CertificateDer::pem_file_iter(p)
            .ok()?
            .collect::<Result<_, _>>()
            .ok()?;
        (!certs.is_empty()).then_some(certs)
    })
}

fn key(dir: &Path) -> Result<PrivateKeyDer<'static>> {
    read_pem(dir, "key.pem", |p| PrivateKeyDer::from_pem_file(p).ok())
}

fn roots(dir: &Path) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for c in certs(dir, "ca.pem")? {
        roots.add(c).map_err(|source| PkiError::Tls {
            context: format!("{}/ca.pem", dir.display()),
            source,
        })?;
    }
    Ok(Arc::new(roots))
}

fn tls_err(context: &str) -> impl FnOnce(rustls::Error) -> PkiError + '_ {
    move |source| PkiError::Tls {
        context: context.to_owned(),
        source,
    }
}

/// The client side: the fleet CA as the only root, this host's certificate
/// presented to every server, and the server's certificate checked against
/// the revocation list in `dir` (reloaded when it changes, as the server
/// side's is).
pub fn client_config(dir: &Path) -> Result<Arc<ClientConfig>> {
    let verifier = Arc::new(FleetServerVerifier::load(dir)?);
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("TLS 1.3"))?
        .dangerous()
        // webpki's own verifier, with the fleet's revocation list kept
        // current (what `with_root_certificates` would give, plus that).
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(certs(dir, "cert.pem")?, key(dir)?)
        .map_err(tls_err("this host's certificate and key"))?;
    Ok(Arc::new(config))
}

/// The revocation lists in `dir/crl.pem`, if there is one.
fn crls(dir: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>> {
    let path = dir.join("crl.pem");
    if !path.exists() {
        return Ok(Vec::new());
    }
    CertificateRevocationListDer::pem_file_iter(&path)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| PkiError::Invalid(format!("{}: {e}", path.display())))
}

fn build_server_verifier(dir: &Path) -> Result<Arc<WebPkiServerVerifier>> {
    WebPkiServerVerifier::builder_with_provider(roots(dir)?, provider())
        .with_crls(crls(dir)?)
        .only_check_end_entity_revocation()
        .build()
        .map_err(|e| PkiError::Invalid(format!("{}: {e}", dir.display())))
}

/// Checks a server's certificate with webpki against the fleet CA and the
/// revocation list as it is now.
struct FleetServerVerifier {
    dir: PathBuf,
    loaded: Mutex<OnCrl<Arc<WebPkiServerVerifier>>>,
}

impl std::fmt::Debug for FleetServerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetServerVerifier")
            .field("dir", &self.dir)
            .finish()
    }
}

impl FleetServerVerifier {
    fn load(dir: &Path) -> Result<Self> {
        Ok(FleetServerVerifier {
            dir: dir.to_owned(),
            loaded: Mutex::new(OnCrl::new(dir, build_server_verifier(dir)?)),
        })
    }

    fn current(&self) -> Arc<WebPkiServerVerifier> {
        self.loaded
            .lock()
            .current(&self.dir, build_server_verifier)
            .0
    }
}

impl ServerCertVerifier for FleetServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.current()
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// The revocation list's file as last seen: changed when either differs.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    fs::metadata(path)
        .ok()
        .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
}

/// What is built from a TLS directory and its revocation list (`crl.pem`),
/// rebuilt when the list's file changes: looked at (a stat) at most every
/// [`CRL_CHECK_EVERY`]. A list that does not load (half copied, damaged)
/// leaves the previous value in force and is tried again at the next look.
struct OnCrl<T> {
    checked: Instant,
    crl: Stamp,
    value: T,
}

impl<T: Clone> OnCrl<T> {
    fn new(dir: &Path, value: T) -> Self {
        OnCrl {
            checked: Instant::now(),
            crl: stamp(&dir.join("crl.pem")),
            value,
        }
    }

    /// The value, rebuilt by `build` first when the list changed; and
    /// whether it was.
    fn current(&mut self, dir: &Path, build: impl FnOnce(&Path) -> Result<T>) -> (T, bool) {
        let mut rebuilt = false;
        if self.checked.elapsed() >= CRL_CHECK_EVERY {
            self.checked = Instant::now();
            let now = stamp(&dir.join("crl.pem"));
            if now != self.crl {
                match build(dir) {
                    Ok(value) => {
                        self.value = value;
                        self.crl = now;
                        rebuilt = true;
                    }
                    Err(e) => {
                        tracing::error!(dir = %dir.display(), error = %e, "the new revocation list does not load; the previous one stays in force")
                    }
                }
            }
        }
        (self.value.clone(), rebuilt)
    }
}

/// The server's configuration and the serials its revocation list names.
type ServerState = (Arc<ServerConfig>, Arc<HashSet<String>>);

/// The server side, kept current: a new revocation list in the TLS
/// directory (`crl.pem`) is in force within [`CRL_CHECK_EVERY`] for new
/// handshakes, and [`ServerTls::is_revoked`] lets the listener refuse
/// requests on connections opened before it.
pub struct ServerTls {
    dir: PathBuf,
    own: PeerIdentity,
    loaded: Mutex<OnCrl<ServerState>>,
    reloads: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("dir", &self.dir)
            .field("own", &self.own)
            .finish()
    }
}

fn revoked_serials(crls: &[CertificateRevocationListDer<'_>]) -> Result<HashSet<String>> {
    let mut out = HashSet::new();
    for crl in crls {
        out.extend(crate::revoked_serials_der(crl.as_ref())?);
    }
    Ok(out)
}

fn build_server(dir: &Path) -> Result<ServerState> {
    let crls = crls(dir)?;
    let revoked = revoked_serials(&crls)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(dir)?, provider())
        .with_crls(crls)
        .only_check_end_entity_revocation()
        .build()
        .map_err(|e| PkiError::Invalid(format!("{}: {e}", dir.display())))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err("TLS 1.3"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(dir, "cert.pem")?, key(dir)?)
        .map_err(tls_err("this host's certificate and key"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((Arc::new(config), Arc::new(revoked)))
}

impl ServerTls {
    /// Loads `dir` (ca.pem, cert.pem, key.pem, and crl.pem when present).
    pub fn load(dir: &Path) -> Result<ServerTls> {
        let own_cert = certs(dir, "cert.pem")?;
        let own = PeerIdentity::of(own_cert[0].as_ref())?;
        Ok(ServerTls {
            dir: dir.to_owned(),
            own,
            loaded: Mutex::new(OnCrl::new(dir, build_server(dir)?)),
            reloads: Default::default(),
        })
    }

    /// Whom this host's own certificate names.
    pub fn own(&self) -> &PeerIdentity {
        &self.own
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The configuration for the next handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.refresh().0
    }

    /// Revocation lists put in force since the start.
    pub fn crl_reloads(&self) -> u64 {
        self.reloads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the revocation list now in force names `serial`.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.refresh().1.contains(serial)
    }

    /// The configuration and revoked serials in force, reloaded when the
    /// revocation list's file changed.
    fn refresh(&self) -> ServerState {
        let (state, reloaded) = self.loaded.lock().current(&self.dir, build_server);
        if reloaded {
            tracing::info!(
                dir = %self.dir.display(),
                revoked = state.1.len(),
                "revocation list reloaded"
            );
            self.reloads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Ca, Role};

    #[test]
    fn configs_load_and_a_revocation_is_in_force_without_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let mut ca = Ca::init(&tmp.path().join("ca"), "test").unwrap();
        let server = tmp.path().join("server");
        let client = tmp.path().join("client");
        ca.issue("server", &[Role::Host], &["127.0.0.1".into()], &server)
            .unwrap();
        let c = ca.issue("client", &[Role::Host], &[], &client).unwrap();
        client_config(&client).unwrap();
        let tls = ServerTls::load(&server).unwrap();
        assert_eq!(tls.own().name, "server");
        assert!(!tls.is_revoked(&c.serial));
        let before = tls.config();
        ca.revoke("client").unwrap();
        std::thread::sleep(CRL_CHECK_EVERY + Duration::from_millis(50));
        assert!(tls.is_revoked(&c.serial));
        assert!(!Arc::ptr_eq(&before, &tls.config()));
    }

    #[test]
    fn a_directory_without_a_certificate_says_how_to_make_one() {
        let tmp = tempfile::tempdir().unwrap();
        let e = ServerTls::load(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("spore ca issue"), "{e}");
        assert!(e.contains("--insecure-listen"), "{e}");
        fs::write(tmp.path().join("cert.pem"), "not pem").unwrap();
        let e = ServerTls::load(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("no valid PEM"), "{e}");
    }
}
