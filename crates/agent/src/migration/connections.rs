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
    bulk: Option<(RawFd, SocketAddr)>,
    others: HashSet<RawFd>,
    paced: bool,
    /// The bulk connection's pacing now (bytes/s), when paced.
    bulk_rate: Option<u64>,
    /// The bulk stream has given way to demand pages once.
    shared: bool,
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
            bulk_rate: None,
            shared: false,
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
                Ok(s) => found.extend(s.into_iter().map(|s| (s, *peer))),
                Err(e) => {
                    self.failed = true;
                    return Some(format!(
                        "the migration connections cannot be tuned ({e}): post-copy page \
                         requests may wait behind the bulk stream"
                    ));
                }
            }
        }
        found.sort_by_key(|(s, _)| std::cmp::Reverse(s.bytes_acked));
        let mut note = None;
        if self.bulk.is_none() {
            let (bulk, peer) = found
                .first()
                .filter(|(s, _)| s.bytes_acked >= BULK_MIN_BYTES)?;
            let pacing = self.cap.is_some();
            let lowat = notsent_lowat(self.cap);
            let result = bulk
                .set_notsent_lowat(lowat)
                .and_then(|()| self.cap.map_or(Ok(()), |rate| bulk.set_pacing(rate)));
            self.bulk = Some((bulk.fd, *peer));
            note = Some(match result {
                Ok(()) => {
                    self.paced = pacing;
                    self.bulk_rate = self.cap;
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
        for (s, _) in found
            .iter()
            .filter(|(s, _)| Some(s.fd) != self.bulk.map(|b| b.0))
        {
            if self.others.insert(s.fd) {
                if let Err(e) = s.set_nodelay() {
                    tracing::warn!(fd = s.fd, error = %e, "TCP_NODELAY on a migration connection");
                }
            }
        }
        note
    }

    /// While the guest is paused for the switch nothing competes with the
    /// bulk connection, and every millisecond of it is downtime: it sends
    /// at the link's speed, unpaced, its buffer unlimited (QEMU lifts its
    /// own rate limit for the same phase). Paced, saving each virtio
    /// device's state waited for the next paced burst: 2.7 ms a device.
    /// [`Connections::share_with_demand`] or [`Connections::repace`] puts
    /// the pacing back.
    pub(crate) fn unpace_for_switch(&mut self) -> Option<String> {
        let (fd, peer) = self.bulk?;
        if !self.paced {
            return None;
        }
        let s = spore_qemu::sockets::peer_socket(self.pid, fd, peer).ok()??;
        let result = s
            .set_pacing(u64::MAX)
            .and_then(|()| s.set_notsent_lowat(u32::MAX));
        match result {
            Ok(()) => {
                self.bulk_rate = Some(u64::MAX);
                None
            }
            Err(e) => Some(format!(
                "the connection could not be unpaced for the switch: {e}"
            )),
        }
    }

    /// After the switch: the bulk connection paced at `rate` (at most the
    /// cap) with its small unsent limit again.
    pub(crate) fn repace(&mut self, rate: u64) {
        let (Some((fd, peer)), Some(cap)) = (self.bulk, self.cap) else {
            return;
        };
        if !self.paced || self.bulk_rate == Some(rate.min(cap)) {
            return;
        }
        let Ok(Some(s)) = spore_qemu::sockets::peer_socket(self.pid, fd, peer) else {
            return;
        };
        let rate = rate.min(cap);
        match s
            .set_pacing(rate)
            .and_then(|()| s.set_notsent_lowat(notsent_lowat(self.cap)))
        {
            Ok(()) => self.bulk_rate = Some(rate),
            Err(e) => tracing::warn!(error = %e, "re-pacing the migration connection"),
        }
    }

    /// In post-copy the pages the guest faults on travel beside the bulk
    /// stream, on their own connection: both share the cap, demand first.
    /// Paced at the whole cap, the bulk stream left no room for them, the
    /// bottleneck queued the excess (one 64 KiB segment, 2.7 ms at 200
    /// mbit/s), and every demand page waited in that queue. `demand` is
    /// the rate of the guest's page requests (bytes/s); the bulk stream
    /// gets the rest of the cap, at least a quarter of it. Returns a line
    /// for the decision log the first time it gives way.
    pub(crate) fn share_with_demand(&mut self, demand: u64) -> Option<String> {
        let (cap, current) = match (self.cap, self.bulk_rate) {
            (Some(c), Some(r)) if self.paced && self.bulk.is_some() => (c, r),
            _ => return None,
        };
        let rate = cap.saturating_sub(demand).max(cap / 4);
        // Small changes are not worth a system call each.
        if rate.abs_diff(current) * 20 < cap {
            return None;
        }
        self.repace(rate);
        if self.bulk_rate != Some(rate) || rate == cap || self.shared {
            return None;
        }
        self.shared = true;
        Some(format!(
            "post-copy: the bulk stream gives way to the guest's page requests \
             ({:.1} MB/s of demand; bulk paced at {:.1} MB/s, the cap shared)",
            demand as f64 / 1e6,
            rate as f64 / 1e6
        ))
    }
}

/// Bytes one post-copy page request costs on the wire: the guest's page
/// (4 KiB on x86) and its record header, with a margin for TCP/IP.
const REQUEST_BYTES: u64 = 4096 + 256;
/// How long the request count is watched for one estimate.
const DEMAND_WINDOW: Duration = Duration::from_millis(100);

/// The rate of the guest's post-copy page requests, from QEMU's count:
/// follows a rise at once, decays by a third per window.
#[derive(Debug, Default)]
pub(crate) struct DemandMeter {
    last: Option<(u64, Instant)>,
    estimate: u64,
}

impl DemandMeter {
    /// Feeds QEMU's request count; an estimate (bytes/s) once per window.
    pub(crate) fn observe(&mut self, requests: u64, now: Instant) -> Option<u64> {
        let Some((count, at)) = self.last else {
            self.last = Some((requests, now));
            return None;
        };
        let dt = now.saturating_duration_since(at);
        if dt < DEMAND_WINDOW {
            return None;
        }
        let rate = requests.saturating_sub(count) * REQUEST_BYTES * 1_000_000
            / dt.as_micros().max(1) as u64;
        self.estimate = rate.max(self.estimate * 2 / 3);
        self.last = Some((requests, now));
        Some(self.estimate)
    }
}

/// The addresses of `host:port` (brackets around an IPv6 host allowed);
/// none when it does not resolve.
pub(super) fn resolve(host: &str, port: u16) -> Vec<SocketAddr> {
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
    fn demand_follows_a_rise_at_once_and_decays_slowly() {
        let t0 = Instant::now();
        let mut m = DemandMeter::default();
        assert_eq!(m.observe(0, t0), None);
        // Not a whole window yet.
        assert_eq!(m.observe(10, t0 + Duration::from_millis(50)), None);
        // 100 requests in 100 ms: 1000 pages/s.
        let r = m.observe(100, t0 + Duration::from_millis(100)).unwrap();
        assert_eq!(r, 1000 * REQUEST_BYTES);
        // None in the next window: two thirds of the last estimate.
        let r2 = m.observe(100, t0 + Duration::from_millis(200)).unwrap();
        assert_eq!(r2, r * 2 / 3);
        // A higher rate takes over at once.
        let r3 = m.observe(400, t0 + Duration::from_millis(300)).unwrap();
        assert_eq!(r3, 3000 * REQUEST_BYTES);
    }

    #[test]
    fn without_a_paced_bulk_connection_nothing_is_shared() {
        let mut c = Connections::new(std::process::id(), "127.0.0.1", 9, Some(1 << 20));
        assert_eq!(c.share_with_demand(1 << 19), None);
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
