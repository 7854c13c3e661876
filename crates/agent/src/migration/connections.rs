//! The source QEMU's migration connections, tuned so that a post-copy page
//! request never waits behind the bulk stream (`spore_qemu::sockets` says
//! how). Without it, under QEMU 7.2 on a 200 mbit/s link, a demand page
//! took 25–100 ms; with it, 2–3 ms.

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use spore_qemu::sockets::peer_sockets;

/// The bulk connection is the one that has carried this much.
const BULK_MIN_BYTES: u64 = 256 << 10;
/// Unsent bytes the bulk connection may hold before QEMU's migration
/// thread blocks: the thread serves page requests only between writes, and
/// a blocked write returns once half of this has gone. 1.5 ms at the cap
/// (34 KiB at 22.5 MB/s), and 128 KiB without one.
fn notsent_lowat(cap: Option<u64>) -> u32 {
    cap.map_or(128 << 10, |rate| {
        (rate * 3 / 2000).clamp(16 << 10, 1 << 20) as u32
    })
}
/// How often the connections are looked for until the bulk one is tuned,
/// and after that for new ones (the post-copy connection).
const LOOK_EVERY: Duration = Duration::from_millis(50);
const RELOOK_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub(crate) struct Connections {
    pid: u32,
    peers: Vec<SocketAddr>,
    /// The migration's rate cap (bytes/s), applied as pacing.
    cap: Option<u64>,
    bulk: Option<RawFd>,
    others: HashSet<RawFd>,
    paced: bool,
    next_look: Instant,
    failed: bool,
}

impl Connections {
    pub(crate) fn new(pid: u32, host: &str, port: u16, cap: Option<u64>) -> Self {
        Connections {
            pid,
            peers: resolve(host, port),
            cap,
            bulk: None,
            others: HashSet::new(),
            paced: false,
            next_look: Instant::now(),
            failed: false,
        }
    }

    /// The stream moved to a new port (post-copy recovery): new
    /// connections, tuned again.
    pub(crate) fn retarget(&mut self, host: &str, port: u16) {
        *self = Connections::new(self.pid, host, port, self.cap);
    }

    /// Whether the bulk connection is paced at the cap, so that QEMU's own
    /// rate limit can be lifted for post-copy (QEMU 7.2 holds page
    /// requests until its 100 ms rate window ends).
    pub(crate) fn paced(&self) -> bool {
        self.paced
    }

    /// Looks for the connections now and then and tunes new ones. Returns
    /// a line for the decision log when the bulk connection got tuned or
    /// tuning failed.
    pub(crate) fn poll(&mut self) -> Option<String> {
        if self.failed || Instant::now() < self.next_look {
            return None;
        }
        self.next_look = Instant::now()
            + if self.bulk.is_some() {
                RELOOK_EVERY
            } else {
                LOOK_EVERY
            };
        let mut found = Vec::new();
        for peer in &self.peers {
            match peer_sockets(self.pid, *peer) {
                Ok(s) => found.extend(s),
                Err(e) => {
                    self.failed = true;
                    return Some(format!(
                        "the migration connections cannot be tuned ({e}): post-copy page \
                         requests may wait behind the bulk stream"
                    ));
                }
            }
        }
        found.sort_by_key(|s| std::cmp::Reverse(s.bytes_acked));
        let mut note = None;
        if self.bulk.is_none() {
            let bulk = found.first().filter(|s| s.bytes_acked >= BULK_MIN_BYTES)?;
            let pacing = self.cap.is_some();
            let lowat = notsent_lowat(self.cap);
            let result = bulk
                .set_notsent_lowat(lowat)
                .and_then(|()| self.cap.map_or(Ok(()), |rate| bulk.set_pacing(rate)));
            self.bulk = Some(bulk.fd);
            note = Some(match result {
                Ok(()) => {
                    self.paced = pacing;
                    match self.cap {
                        Some(rate) => format!(
                            "migration connection paced at {:.1} MB/s with at most {} KiB \
                             unsent, so that page requests do not queue behind it",
                            rate as f64 / 1e6,
                            lowat >> 10
                        ),
                        None => format!(
                            "migration connection tuned: at most {} KiB unsent, so that \
                             page requests do not queue behind it",
                            lowat >> 10
                        ),
                    }
                }
                Err(e) => format!("tuning the migration connection failed: {e}"),
            });
        }
        for s in found.iter().filter(|s| Some(s.fd) != self.bulk) {
            if self.others.insert(s.fd) {
                if let Err(e) = s.set_nodelay() {
                    tracing::warn!(fd = s.fd, error = %e, "TCP_NODELAY on a migration connection");
                }
            }
        }
        note
    }
}

fn resolve(host: &str, port: u16) -> Vec<SocketAddr> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, port)
        .to_socket_addrs()
        .map(|a| a.collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unsent_limit_follows_the_cap() {
        assert_eq!(notsent_lowat(None), 128 << 10);
        assert_eq!(notsent_lowat(Some(22_500_000)), 33_750);
        assert_eq!(notsent_lowat(Some(1_000_000)), 16 << 10);
        assert_eq!(notsent_lowat(Some(10_000_000_000)), 1 << 20);
    }

    #[test]
    fn resolves_literal_addresses() {
        assert_eq!(
            resolve("10.77.0.2", 4000),
            vec!["10.77.0.2:4000".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            resolve("[::1]", 4000),
            vec!["[::1]:4000".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn a_process_without_connections_tunes_nothing() {
        let mut c = Connections::new(std::process::id(), "127.0.0.1", 9, Some(1 << 20));
        assert_eq!(c.poll(), None);
        assert!(!c.paced());
    }
}
