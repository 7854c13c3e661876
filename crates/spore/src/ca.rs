//! `spore ca ...`: the fleet's CA, on the operator's machine.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Subcommand;
use spore_pki::{default_ca_dir, default_tls_dir, parse_roles, Ca};

use crate::format::table;
use crate::output::print_json;

#[derive(Subcommand, Debug)]
pub enum CaCmd {
    /// Create the fleet's CA (once per fleet; keep its directory safe)
    Init {
        /// The CA's directory [default: $SPORE_HOME/pki/ca]
        #[arg(long)]
        dir: Option<PathBuf>,
        /// A name for the fleet, in the CA's certificate
        #[arg(long, default_value = "spore")]
        fleet: String,
    },
    /// Issue a key and certificate: NAME in the subject and SAN, the roles in the certificate
    Issue {
        name: String,
        /// host (fetch, resolve, page RAM, migrate, relay), publisher (push, bind names),
        /// operator (the remote API); several comma-separated
        #[arg(long)]
        role: String,
        /// Another address or DNS name this host is reached at (repeatable), e.g. 10.77.0.2
        #[arg(long)]
        san: Vec<String>,
        /// The CA's directory [default: $SPORE_HOME/pki/ca]
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Where ca.pem, cert.pem, key.pem and crl.pem go [default: $SPORE_HOME/pki, where the agent looks]
        #[arg(long)]
        out: Option<PathBuf>,
        /// Days the certificate is valid (short-lived certificates are
        /// renewed by issuing again)
        #[arg(long, default_value_t = spore_pki::CERT_DAYS as u64)]
        days: u64,
    },
    /// Revoke every certificate issued to NAME; agents refuse it within a second
    Revoke {
        name: String,
        /// The CA's directory [default: $SPORE_HOME/pki/ca]
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// List the certificates the CA issued
    Ls {
        /// The CA's directory [default: $SPORE_HOME/pki/ca]
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: CaCmd, data_dir: &Path) -> Result<()> {
    let ca_dir = |dir: Option<PathBuf>| dir.unwrap_or_else(|| default_ca_dir(data_dir));
    match cmd {
        CaCmd::Init { dir, fleet } => {
            let dir = ca_dir(dir);
            Ca::init(&dir, &fleet)?;
            println!("created the fleet CA in {}", dir.display());
            println!(
                "next: `spore ca issue NAME --role host --san ADDRESS` for each host (its files go to --out, default {})",
                default_tls_dir(data_dir).display()
            );
        }
        CaCmd::Issue {
            name,
            role,
            san,
            dir,
            out,
            days,
        } => {
            let mut ca = Ca::open(&ca_dir(dir))?;
            let roles = parse_roles(&role)?;
            let out = out.unwrap_or_else(|| default_tls_dir(data_dir));
            let now = std::time::SystemTime::now();
            let valid = now - std::time::Duration::from_secs(3600)
                ..now + std::time::Duration::from_secs(days * 86_400);
            let issued = ca.issue_valid(&name, &roles, &san, &out, valid)?;
            println!(
                "issued {name} (roles {}, serial {}) into {}: ca.pem cert.pem key.pem crl.pem",
                issued.roles.join(","),
                issued.serial,
                out.display()
            );
        }
        CaCmd::Revoke { name, dir } => {
            let mut ca = Ca::open(&ca_dir(dir))?;
            for r in ca.revoke(&name)? {
                println!("revoked {} (serial {})", r.name, r.serial);
            }
            println!(
                "the revocation list is {}/crl.pem (also written to this CA's TLS directories here); copy it to other hosts' TLS directories: agents reload it within a second",
                ca.dir().display()
            );
        }
        CaCmd::Ls { dir, json } => {
            let ca = Ca::open(&ca_dir(dir))?;
            if json {
                print_json(&ca.issued())?;
                return Ok(());
            }
            let rows: Vec<Vec<String>> = ca
                .issued()
                .iter()
                .map(|i| {
                    vec![
                        i.name.clone(),
                        i.roles.join(","),
                        i.serial.clone(),
                        if i.revoked { "revoked" } else { "valid" }.into(),
                        i.out.display().to_string(),
                    ]
                })
                .collect();
            table(&["NAME", "ROLES", "SERIAL", "STATUS", "FILES"], rows);
        }
    }
    Ok(())
}
