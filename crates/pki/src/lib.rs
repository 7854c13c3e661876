//! The fleet's PKI: who may talk to an agent, and as what.
//!
//! A fleet has one CA (`spore ca init`). Every host, publisher and operator
//! gets a key and a certificate signed by it (`spore ca issue NAME --role
//! ROLE[,ROLE]`), with NAME in the subject and the SAN and its roles in the
//! subject's `OU` (`host,publisher`). Connections between hosts are mutual TLS 1.3
//! against that CA only; what a caller may do follows from the roles in its
//! certificate ([`Role`]). `spore ca revoke NAME` adds NAME's certificates
//! to the CA's revocation list (`crl.pem`); agents notice a new list within
//! a second and refuse the certificate from then on, on new connections and
//! on open ones.
//!
//! ```text
//! CA dir ($SPORE_HOME/pki/ca)        TLS dir ($SPORE_HOME/pki, --tls-dir)
//!   ca.pem    the CA certificate       ca.pem    the CA certificate
//!   ca.key    its key (0600)           cert.pem  this host's certificate
//!   crl.pem   revocation list          key.pem   its key (0600)
//!   state.json issued certificates     crl.pem   revocation list (a copy)
//! ```
//!
//! Issuing, keys and revocation lists are rcgen's; the TLS is rustls with
//! aws-lc-rs. What is written here by hand is only the fleet's layout: the
//! files above, the roles in the subject and the reload of the list.

mod ca;
mod tls;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use ca::{Ca, Issued, CERT_DAYS};
pub use tls::{client_config, ServerTls};

/// What a certificate allows its holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Fetch chunks, resolve images, page template RAM, take part in
    /// migrations and relays: what one host of the fleet asks another.
    Host,
    /// Push images and templates, bind names.
    Publisher,
    /// Drive an agent's API from another machine.
    Operator,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Host, Role::Publisher, Role::Operator];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::Publisher => "publisher",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Self> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                PkiError::Invalid(format!(
                    "unknown role {s:?} (roles: host, publisher, operator)"
                ))
            })
    }
}

/// Parses `host,publisher`: at least one role, each known.
pub fn parse_roles(s: &str) -> Result<Vec<Role>> {
    let mut roles = s
        .split(',')
        .map(|r| r.trim().parse())
        .collect::<Result<Vec<Role>>>()?;
    roles.sort();
    roles.dedup();
    Ok(roles)
}

/// Who is on the other end of a connection, as its certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The subject's common name (the NAME it was issued to).
    pub name: String,
    pub roles: Vec<Role>,
    /// The certificate's serial number, hex.
    pub serial: String,
}

impl PeerIdentity {
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Reads the name, roles and serial of a DER certificate.
    pub fn of(der: &[u8]) -> Result<PeerIdentity> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| PkiError::Invalid(format!("not an X.509 certificate: {e}")))?;
        let subject = cert.subject();
        let name = subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or("")
            .to_owned();
        // Roles this build does not know (a newer CA) give nothing.
        let mut roles: Vec<Role> = subject
            .iter_organizational_unit()
            .filter_map(|ou| ou.as_str().ok())
            .flat_map(|ou| ou.split(','))
            .filter_map(|r| r.trim().parse().ok())
            .collect();
        roles.sort();
        roles.dedup();
        Ok(PeerIdentity {
            name,
            roles,
            serial: hex(cert.raw_serial()),
        })
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let roles: Vec<&str> = self.roles.iter().map(|r| r.as_str()).collect();
        write!(
            f,
            "{} (roles: {})",
            self.name,
            if roles.is_empty() {
                "none".into()
            } else {
                roles.join(",")
            }
        )
    }
}

/// The serial numbers (hex) a DER revocation list names. Only the list's
/// structure is read here; its signature is checked by rustls when the list
/// is put in force.
pub fn revoked_serials_der(der: &[u8]) -> Result<Vec<String>> {
    let (_, crl) = x509_parser::parse_x509_crl(der)
        .map_err(|e| PkiError::Invalid(format!("not a revocation list: {e}")))?;
    Ok(crl
        .iter_revoked_certificates()
        .map(|r| hex(r.raw_serial()))
        .collect())
}

/// Lowercase hex of a serial number's bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The same rule as every other name in spore ([`spore_api::NAME_RULE`]).
pub fn check_name(name: &str) -> Result<()> {
    spore_api::check_name("certificate", name).map_err(PkiError::Invalid)
}

/// The RFC 7919 `ffdhe2048` group, PKCS#3 PEM. QEMU's server end makes
/// fresh Diffie-Hellman parameters for every `tls-creds-x509` object that
/// has no `dh-params.pem` (0.2 to 1 s of CPU on each incoming migration,
/// measured), though TLS 1.3 with ECDHE never uses them: the standard group
/// spares that.
const FFDHE2048_PEM: &str = "-----BEGIN DH PARAMETERS-----\nMIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz\n+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a\n87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7\nYdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi\n7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD\nssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==\n-----END DH PARAMETERS-----\n";

/// Lays out a TLS directory the way QEMU's `tls-creds-x509` object reads
/// one (`ca-cert.pem`, `ca-crl.pem`, `server-cert.pem`, `server-key.pem`,
/// `client-cert.pem`, `client-key.pem`, and `dh-params.pem`, the standard
/// RFC 7919 group), as symbolic links into `tls_dir`:
/// QEMU moves a migration's bytes itself, encrypted with the host's own
/// certificate, and reads the files each time such an object is made, so a
/// new revocation list or a renewed certificate is used from the next
/// migration on. A link to a list not written yet is skipped by QEMU.
pub fn qemu_creds_dir(tls_dir: &Path, out: &Path) -> Result<()> {
    let io = |what: String| {
        move |source| PkiError::Io {
            context: what,
            source,
        }
    };
    let tls_dir =
        std::path::absolute(tls_dir).map_err(io(format!("resolving {}", tls_dir.display())))?;
    std::fs::create_dir_all(out).map_err(io(format!("creating {}", out.display())))?;
    for (link, target) in [
        ("ca-cert.pem", "ca.pem"),
        ("ca-crl.pem", "crl.pem"),
        ("server-cert.pem", "cert.pem"),
        ("server-key.pem", "key.pem"),
        ("client-cert.pem", "cert.pem"),
        ("client-key.pem", "key.pem"),
    ] {
        let link = out.join(link);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(tls_dir.join(target), &link)
            .map_err(io(format!("linking {}", link.display())))?;
    }
    let dh = out.join("dh-params.pem");
    std::fs::write(&dh, FFDHE2048_PEM).map_err(io(format!("writing {}", dh.display())))?;
    Ok(())
}

/// The TLS directory an agent or CLI uses when none is given:
/// `DATA_DIR/pki`.
pub fn default_tls_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("pki")
}

/// The CA directory when none is given: `DATA_DIR/pki/ca`.
pub fn default_ca_dir(data_dir: &Path) -> PathBuf {
    default_tls_dir(data_dir).join("ca")
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Missing(String),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Rcgen {
        context: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("{context}: {source}")]
    Tls {
        context: String,
        #[source]
        source: rustls::Error,
    },
}

pub type Result<T, E = PkiError> = std::result::Result<T, E>;

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> PkiError {
    let context = context.into();
    move |source| PkiError::Io { context, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_and_refuse_unknown_ones() {
        assert_eq!(
            parse_roles("publisher,host,host").unwrap(),
            vec![Role::Host, Role::Publisher]
        );
        let e = parse_roles("host,admin").unwrap_err().to_string();
        assert!(e.contains("unknown role \"admin\""), "{e}");
        assert!(parse_roles("").is_err());
    }

    #[test]
    fn malformed_certificates_and_lists_are_errors() {
        for bad in [&b""[..], b"\x30", b"\x30\x82\xff\xff", &[0u8; 64]] {
            assert!(PeerIdentity::of(bad).is_err(), "{bad:?}");
            assert!(revoked_serials_der(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_follow_the_one_rule() {
        for ok in ["a", "host-1", "h_2.example", &"x".repeat(128)] {
            check_name(ok).unwrap();
        }
        for bad in ["", ".a", "-a", "a/b", "a b", "ä", &"x".repeat(129)] {
            let e = check_name(bad).unwrap_err().to_string();
            assert!(e.contains("1 to 128"), "{bad}: {e}");
        }
    }

    #[test]
    fn qemu_reads_the_host_certificate_through_its_own_names() {
        let tmp = tempfile::tempdir().unwrap();
        let mut ca = Ca::init(&tmp.path().join("ca"), "test").unwrap();
        let tls = tmp.path().join("tls");
        ca.issue("h", &[Role::Host], &[], &tls).unwrap();
        let q = tmp.path().join("qemu");
        qemu_creds_dir(&tls, &q).unwrap();
        // Twice: a restarted agent lays it out again over the old one.
        qemu_creds_dir(&tls, &q).unwrap();
        for (link, target) in [
            ("ca-cert.pem", "ca.pem"),
            ("ca-crl.pem", "crl.pem"),
            ("server-cert.pem", "cert.pem"),
            ("client-key.pem", "key.pem"),
        ] {
            assert_eq!(
                std::fs::read(q.join(link)).unwrap(),
                std::fs::read(tls.join(target)).unwrap(),
                "{link}"
            );
        }
        let dh = std::fs::read_to_string(q.join("dh-params.pem")).unwrap();
        assert!(dh.starts_with("-----BEGIN DH PARAMETERS-----\n"));
        assert!(dh.ends_with("-----END DH PARAMETERS-----\n"));
    }
}
