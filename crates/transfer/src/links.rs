//! How this host reaches other hosts: mutual TLS with the fleet's
//! certificate (`https://` peer URLs), or plaintext (`http://`) only where
//! the operator asked for it (`spore agent --insecure-listen`).

use std::sync::Arc;
use std::time::Duration;

/// The client side of every connection to another host.
#[derive(Clone, Default)]
pub struct Links {
    tls: Option<Arc<rustls::ClientConfig>>,
    plaintext: bool,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("tls", &self.tls.is_some())
            .field("plaintext", &self.plaintext)
            .finish()
    }
}

impl Links {
    /// `https://` with this client configuration (the fleet CA as the only
    /// root, this host's certificate presented).
    pub fn tls(config: Arc<rustls::ClientConfig>) -> Self {
        Links {
            tls: Some(config),
            plaintext: false,
        }
    }

    /// `http://` allowed too (the agent runs with `--insecure-listen`).
    pub fn allow_plaintext(mut self) -> Self {
        self.plaintext = true;
        self
    }

    /// Whether `url` may be used, and why not.
    pub fn check(&self, url: &str) -> Result<(), String> {
        if url.starts_with("https://") {
            if self.tls.is_none() {
                return Err(format!(
                    "{url}: this host has no fleet certificate to connect with \
                     (make one with `spore ca issue NAME --role host`, or name another --tls-dir)"
                ));
            }
            return Ok(());
        }
        if url.starts_with("http://") {
            if !self.plaintext {
                return Err(format!(
                    "{url} is plaintext: hosts talk over mutual TLS (https://); \
                     plaintext is only for agents run with --insecure-listen"
                ));
            }
            return Ok(());
        }
        Err(format!(
            "{url} is not a peer URL (https://HOST:PORT, or http:// with --insecure-listen)"
        ))
    }

    /// The peer URL of an agent at `host_port`: `https://` when this host
    /// has a fleet certificate, else `http://` (plaintext links).
    pub fn peer_url(&self, host_port: &str) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{host_port}")
    }

    /// An HTTP client for these links. Connections are kept and reused, so
    /// a boot pays one handshake per peer, not one per chunk.
    pub fn http(&self, connect: Duration, timeout: Duration) -> ureq::Agent {
        let mut b = ureq::AgentBuilder::new()
            .timeout_connect(connect)
            .timeout(timeout);
        if let Some(tls) = &self.tls {
            b = b.tls_config(tls.clone());
        }
        b.build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_against_what_the_host_may_use() {
        let none = Links::default();
        assert!(none
            .check("https://h:1")
            .unwrap_err()
            .contains("no fleet certificate"));
        assert!(none
            .check("http://h:1")
            .unwrap_err()
            .contains("--insecure-listen"));
        assert!(none
            .check("ftp://h")
            .unwrap_err()
            .contains("not a peer URL"));
        let plain = Links::default().allow_plaintext();
        plain.check("http://h:1").unwrap();
    }
}
