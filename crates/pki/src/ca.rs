//! The fleet CA: `spore ca init`, `issue` and `revoke`.
//!
//! `state.json` (format 1) lists what the CA issued: name, serial, roles,
//! expiry, where the files were written and whether the certificate is
//! revoked. The revocation list is rewritten from it on every revocation,
//! into the CA directory and into every TLS directory this CA wrote on this
//! machine, so local agents see it at once; other hosts get it copied
//! (docs/security.md).

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::{check_name, io_err, PkiError, Result, Role};

const STATE_FORMAT: u32 = 1;
/// How long an issued certificate is valid.
pub const CERT_DAYS: i64 = 397;
/// Issued certificates are valid from an hour back (clocks differ).
const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);
const CA_DAYS: i64 = 3650;

/// One certificate the CA issued.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Issued {
    pub name: String,
    /// Hex, as [`crate::PeerIdentity::serial`] reads it.
    pub serial: String,
    pub roles: Vec<String>,
    /// Unix seconds.
    pub not_after: i64,
    /// The TLS directory the files went to.
    pub out: PathBuf,
    #[serde(default)]
    pub revoked: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct State {
    format: u32,
    crl_number: u64,
    issued: Vec<Issued>,
}

/// An opened CA directory.
pub struct Ca {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    state: State,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("dir", &self.dir).finish()
    }
}

fn rc(context: &str) -> impl FnOnce(rcgen::Error) -> PkiError + '_ {
    move |source| PkiError::Rcgen {
        context: context.to_owned(),
        source,
    }
}

/// Writes `bytes` to `path` whole or not at all (temporary file, fsync,
/// rename), readable by root only when `secret`.
pub(crate) fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mode = if secret { 0o600 } else { 0o644 };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(format!("writing {}", tmp.display())))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_err(format!("writing {}", tmp.display())))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("restricting {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(io_err(format!("writing {}", path.display())))
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and 16 bytes long as DER has it: no leading zero to trim.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

impl Ca {
    /// Creates a CA in `dir`: a P-256 key (0600), a self-signed certificate
    /// valid ten years and an empty revocation list.
    pub fn init(dir: &Path, fleet: &str) -> Result<Ca> {
        if dir.join("ca.pem").exists() {
            return Err(PkiError::Invalid(format!(
                "{} already holds a CA; remove it first to make a new one (every certificate it issued stops working)",
                dir.display()
            )));
        }
        fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err(format!("restricting {}", dir.display())))?;
        let key = KeyPair::generate().map_err(rc("making the CA key"))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc("CA"))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("spore fleet CA {fleet}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(CA_DAYS);
        let cert = params.self_signed(&key).map_err(rc("signing the CA"))?;
        write_file(&dir.join("ca.key"), key.serialize_pem().as_bytes(), true)?;
        write_file(&dir.join("ca.pem"), cert.pem().as_bytes(), false)?;
        let mut ca = Ca {
            dir: dir.to_owned(),
            issuer: Issuer::new(params, key),
            ca_pem: cert.pem(),
            state: State {
                format: STATE_FORMAT,
                crl_number: 0,
                issued: Vec::new(),
            },
        };
        ca.publish_crl()?;
        Ok(ca)
    }

    /// Opens the CA in `dir`.
    pub fn open(dir: &Path) -> Result<Ca> {
        let read = |name: &str| {
            fs::read_to_string(dir.join(name)).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => PkiError::Missing(format!(
                    "no CA in {} (no {name}): make one with `spore ca init --dir {}`",
                    dir.display(),
                    dir.display()
                )),
                _ => PkiError::Io {
                    context: format!("reading {}", dir.join(name).display()),
                    source: e,
                },
            })
        };
        let ca_pem = read("ca.pem")?;
        let key = KeyPair::from_pem(&read("ca.key")?).map_err(rc("reading ca.key"))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).map_err(rc("reading ca.pem"))?;
        let state: State = serde_json::from_str(&read("state.json")?).map_err(|e| {
            PkiError::Invalid(format!("{}/state.json is damaged: {e}", dir.display()))
        })?;
        if state.format != STATE_FORMAT {
            return Err(PkiError::Invalid(format!(
                "{}/state.json is format {} (this build reads {STATE_FORMAT})",
                dir.display(),
                state.format
            )));
        }
        Ok(Ca {
            dir: dir.to_owned(),
            issuer,
            ca_pem,
            state,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn issued(&self) -> &[Issued] {
        &self.state.issued
    }

    /// Issues a key and certificate for `name` with `roles`, valid for
    /// server and client use, with `name` and each of `sans` (IP addresses
    /// or DNS names) in the SAN; writes `out/{ca.pem,cert.pem,key.pem,crl.pem}`.
    pub fn issue(
        &mut self,
        name: &str,
        roles: &[Role],
        sans: &[String],
        out: &Path,
    ) -> Result<Issued> {
        let now = SystemTime::now();
        let days = std::time::Duration::from_secs(CERT_DAYS as u64 * 86_400);
        self.issue_valid(name, roles, sans, out, now - HOUR..now + days)
    }

    /// [`Ca::issue`] for a certificate valid over `valid` (short-lived
    /// certificates, `spore ca issue --days`; tests of expired ones).
    pub fn issue_valid(
        &mut self,
        name: &str,
        roles: &[Role],
        sans: &[String],
        out: &Path,
        valid: std::ops::Range<SystemTime>,
    ) -> Result<Issued> {
        check_name(name)?;
        if valid.end <= valid.start {
            return Err(PkiError::Invalid(
                "a certificate's validity must end after it begins".into(),
            ));
        }
        if roles.is_empty() {
            return Err(PkiError::Invalid(
                "a certificate needs at least one role (host, publisher, operator)".into(),
            ));
        }
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(rc("certificate"))?;
        for san in std::iter::once(name).chain(sans.iter().map(String::as_str)) {
            let entry = match san.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) if is_dns_name(san) => SanType::DnsName(
                    san.try_into()
                        .map_err(|_| PkiError::Invalid(format!("{san:?} is not a DNS name")))?,
                ),
                Err(_) => {
                    return Err(PkiError::Invalid(format!(
                        "{san:?} is neither an IP address nor a DNS name"
                    )))
                }
            };
            if !params.subject_alt_names.contains(&entry) {
                params.subject_alt_names.push(entry);
            }
        }
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        // One OU with every role (a distinguished name here holds one
        // value per attribute type).
        let roles_ou: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        dn.push(DnType::OrganizationalUnitName, roles_ou.join(","));
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        // No key usage extension: rcgen writes it critical, and QEMU's
        // GnuTLS sanity check refuses a critical one without
        // keyEncipherment (migration streams use these certificates too).
        params.key_usages = Vec::new();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        params.not_before = OffsetDateTime::from(valid.start);
        params.not_after = OffsetDateTime::from(valid.end);
        let key = KeyPair::generate().map_err(rc("making a key"))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rc("signing the certificate"))?;
        fs::create_dir_all(out).map_err(io_err(format!("creating {}", out.display())))?;
        write_file(&out.join("key.pem"), key.serialize_pem().as_bytes(), true)?;
        write_file(&out.join("cert.pem"), cert.pem().as_bytes(), false)?;
        write_file(&out.join("ca.pem"), self.ca_pem.as_bytes(), false)?;
        if let Ok(crl) = fs::read(self.dir.join("crl.pem")) {
            write_file(&out.join("crl.pem"), &crl, false)?;
        }
        let issued = Issued {
            name: name.to_owned(),
            serial: crate::hex(serial.as_ref()),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            not_after: params.not_after.unix_timestamp(),
            out: fs::canonicalize(out).unwrap_or_else(|_| out.to_owned()),
            revoked: false,
        };
        self.state.issued.push(issued.clone());
        self.save()?;
        Ok(issued)
    }

    /// Revokes every certificate issued to `name`; returns them. The new
    /// list goes to the CA directory and every TLS directory this CA wrote
    /// that still holds its certificate.
    pub fn revoke(&mut self, name: &str) -> Result<Vec<Issued>> {
        let mut revoked = Vec::new();
        for i in &mut self.state.issued {
            if i.name == name && !i.revoked {
                i.revoked = true;
                revoked.push(i.clone());
            }
        }
        if revoked.is_empty() {
            let known = self.state.issued.iter().any(|i| i.name == name);
            return Err(PkiError::Invalid(if known {
                format!("every certificate of {name} is revoked already")
            } else {
                format!("this CA issued no certificate to {name}")
            }));
        }
        self.save()?;
        self.publish_crl()?;
        Ok(revoked)
    }

    fn save(&self) -> Result<()> {
        let json = serde_json::to_vec_pretty(&self.state).expect("state serialises");
        write_file(&self.dir.join("state.json"), &json, false)
    }

    /// Signs the revocation list of everything revoked so far and writes
    /// it where agents read it.
    fn publish_crl(&mut self) -> Result<()> {
        self.state.crl_number += 1;
        self.save()?;
        let now = OffsetDateTime::now_utc();
        let revoked_certs = self
            .state
            .issued
            .iter()
            .filter(|i| i.revoked)
            .map(|i| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&unhex(&i.serial)),
                revocation_time: now,
                reason_code: Some(RevocationReason::Unspecified),
                invalidity_date: None,
            })
            .collect();
        let crl = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(CA_DAYS),
            crl_number: SerialNumber::from(self.state.crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer)
        .map_err(rc("signing the revocation list"))?;
        let pem = crl.pem().map_err(rc("encoding the revocation list"))?;
        write_file(&self.dir.join("crl.pem"), pem.as_bytes(), false)?;
        let mut outs: Vec<&PathBuf> = self.state.issued.iter().map(|i| &i.out).collect();
        outs.sort();
        outs.dedup();
        for out in outs {
            // Only where this CA's certificate still is (not a directory
            // since given to another CA).
            let same_ca = fs::read_to_string(out.join("ca.pem")).is_ok_and(|p| p == self.ca_pem);
            if same_ca {
                write_file(&out.join("crl.pem"), pem.as_bytes(), false)?;
            }
        }
        Ok(())
    }
}

/// Letters, digits and hyphens in dot-separated labels of 1 to 63.
fn is_dns_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PeerIdentity;

    fn cert_der(dir: &Path) -> Vec<u8> {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        CertificateDer::from_pem_file(dir.join("cert.pem"))
            .unwrap()
            .to_vec()
    }

    #[test]
    fn a_ca_issues_certificates_whose_roles_and_serial_read_back() {
        let tmp = tempfile::tempdir().unwrap();
        let ca_dir = tmp.path().join("ca");
        let mut ca = Ca::init(&ca_dir, "test").unwrap();
        let mode = fs::metadata(ca_dir.join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let out = tmp.path().join("host-a");
        let issued = ca
            .issue(
                "host-a",
                &[Role::Host, Role::Publisher],
                &["10.0.0.2".into()],
                &out,
            )
            .unwrap();
        for f in ["ca.pem", "cert.pem", "key.pem", "crl.pem"] {
            assert!(out.join(f).is_file(), "{f}");
        }
        let mode = fs::metadata(out.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let id = PeerIdentity::of(&cert_der(&out)).unwrap();
        assert_eq!(id.name, "host-a");
        assert_eq!(id.roles, vec![Role::Host, Role::Publisher]);
        assert_eq!(id.serial, issued.serial);

        // Reopened, it issues on; a second CA in the same place is refused.
        let mut ca = Ca::open(&ca_dir).unwrap();
        let other = ca
            .issue("ops", &[Role::Operator], &[], &tmp.path().join("ops"))
            .unwrap();
        assert_ne!(other.serial, issued.serial);
        assert_eq!(ca.issued().len(), 2);
        let e = Ca::init(&ca_dir, "again").unwrap_err().to_string();
        assert!(e.contains("already holds a CA"), "{e}");
    }

    #[test]
    fn bad_requests_are_refused_with_the_rule() {
        let tmp = tempfile::tempdir().unwrap();
        let mut ca = Ca::init(&tmp.path().join("ca"), "test").unwrap();
        let out = tmp.path().join("o");
        let e = ca.issue("../x", &[Role::Host], &[], &out).unwrap_err();
        assert!(e.to_string().contains(spore_api::NAME_RULE), "{e}");
        let e = ca.issue("x", &[], &[], &out).unwrap_err();
        assert!(e.to_string().contains("at least one role"), "{e}");
        let e = ca
            .issue("x", &[Role::Host], &["not a name!".into()], &out)
            .unwrap_err();
        assert!(e.to_string().contains("neither an IP"), "{e}");
        let e = ca.revoke("nobody").unwrap_err();
        assert!(e.to_string().contains("issued no certificate"), "{e}");
        let e = Ca::open(&tmp.path().join("none")).unwrap_err();
        assert!(e.to_string().contains("spore ca init"), "{e}");
    }

    #[test]
    fn a_revocation_rewrites_the_list_everywhere_this_ca_wrote() {
        let tmp = tempfile::tempdir().unwrap();
        let mut ca = Ca::init(&tmp.path().join("ca"), "test").unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        ca.issue("a", &[Role::Host], &[], &a).unwrap();
        ca.issue("b", &[Role::Host], &[], &b).unwrap();
        let before = fs::read(b.join("crl.pem")).unwrap();
        let revoked = ca.revoke("a").unwrap();
        assert_eq!(revoked.len(), 1);
        let after = fs::read(b.join("crl.pem")).unwrap();
        assert_ne!(before, after);
        assert_eq!(after, fs::read(a.join("crl.pem")).unwrap());
        assert_eq!(after, fs::read(tmp.path().join("ca/crl.pem")).unwrap());
        let e = ca.revoke("a").unwrap_err();
        assert!(e.to_string().contains("revoked already"), "{e}");
    }
}
