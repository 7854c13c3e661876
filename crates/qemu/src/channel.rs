//! The spore guest channel: one-line messages from the agent to the guest
//! over a virtio-serial port (`org.spore.channel`), read by the demo
//! guest's `ready.d/20-channel` hook. Replies appear on the serial console.
//!
//! The channel is how a clone learns that it is a clone: the guest sits
//! blocked reading the port when its template is captured, and each clone
//! is sent its own identity right after it resumes.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::QmpError;

/// What makes one VM distinct from its template and its siblings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub hostname: String,
    /// Unique per VM instance (clones included), e.g. `i-3f2a…`.
    pub instance_id: String,
    /// Locally administered unicast MAC, `52:54:00:xx:xx:xx`.
    pub mac: String,
    /// VM generation ID (GUID) given to QEMU's vmgenid device.
    pub vmgenid: String,
    /// Fresh entropy for the guest's RNG, 32 bytes as hex. Each clone gets
    /// its own; without it clones would share their template's RNG state.
    pub seed: String,
}

/// A message to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Identity(Identity),
    /// Online hot-added CPUs and memory; wait for `cpus` CPUs.
    Resources {
        cpus: u32,
    },
    /// Print a file (`SPORE-FILE path content`).
    Cat(String),
    /// Write a line to a file and sync.
    Write {
        path: String,
        content: String,
    },
    /// Answer `pong N` on the channel itself (the stall probe).
    Ping(u64),
    /// Any other line (`spore vm send`): printable, at most 1 KiB.
    Line(String),
}

fn word(what: &str, s: &str) -> Result<(), QmpError> {
    if s.is_empty()
        || s.bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(QmpError::Invalid(format!(
            "{what} {s:?} cannot be sent to the guest: it must be one word without blanks"
        )));
    }
    Ok(())
}

impl Message {
    /// The line sent, with its newline.
    pub fn encode(&self) -> Result<String, QmpError> {
        Ok(match self {
            Message::Identity(id) => {
                word("hostname", &id.hostname)?;
                word("instance id", &id.instance_id)?;
                word("mac", &id.mac)?;
                // No seed (a record from before seeds travelled with a
                // migrated VM): the guest keeps its RNG as it is.
                if id.seed.is_empty() {
                    format!(
                        "identity hostname={} instance={} mac={}\n",
                        id.hostname, id.instance_id, id.mac
                    )
                } else {
                    word("seed", &id.seed)?;
                    format!(
                        "identity hostname={} instance={} mac={} seed={}\n",
                        id.hostname, id.instance_id, id.mac, id.seed
                    )
                }
            }
            Message::Resources { cpus } => format!("resources cpus={cpus}\n"),
            Message::Cat(path) => {
                word("path", path)?;
                format!("cat {path}\n")
            }
            Message::Write { path, content } => {
                word("path", path)?;
                word("content", content)?;
                if path.contains('=') {
                    return Err(QmpError::Invalid(format!("path {path:?} contains '='")));
                }
                format!("write {path}={content}\n")
            }
            Message::Ping(n) => format!("ping {n}\n"),
            Message::Line(line) => {
                if line.trim().is_empty()
                    || line.len() > 1024
                    || line.bytes().any(|b| b.is_ascii_control())
                {
                    return Err(QmpError::Invalid(
                        "a line for the guest must be 1 to 1024 printable characters".into(),
                    ));
                }
                format!("{line}\n")
            }
        })
    }
}

/// The agent's end of one VM's channel.
#[derive(Debug)]
pub struct GuestChannel {
    stream: UnixStream,
}

impl GuestChannel {
    /// Connects to the socket QEMU listens on, retrying until `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            match crate::sockets::connect_unix(path) {
                Ok(stream) => {
                    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
                    return Ok(GuestChannel { stream });
                }
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => return Err(QmpError::Timeout(path.display().to_string())),
            }
        }
    }

    /// Queues a message; the guest reads it when its hook runs.
    pub fn send(&mut self, msg: &Message) -> Result<(), QmpError> {
        let line = msg.encode()?;
        self.stream.write_all(line.as_bytes())?;
        Ok(())
    }

    /// Starts a stall probe: pings on this channel, answers read from the
    /// VM's console log.
    pub fn probe(&self, console_log: &Path, interval: Duration) -> Result<StallProbe, QmpError> {
        Ok(StallProbe::start(
            self.stream.try_clone()?,
            console_log,
            interval,
        )?)
    }
}

/// Microseconds since the Unix epoch: the probe's clock, comparable between
/// the hosts of one machine (and between hosts whose clocks are synced).
pub fn epoch_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Measures how long the guest stops answering: pings the guest over its
/// channel every `interval`, and records when each answer (`SPORE-PONG N`,
/// printed by the guest on its serial console) appears in the console log.
/// A guest that is paused, or running but stuck on memory that has not
/// arrived, answers late; the longest gap between answers is the stall the
/// guest's own processes saw. Answers go to the console rather than back
/// over the channel because a write to a virtio-serial port blocks while
/// the guest thinks no host is connected, which a migration can make it
/// think; the console always drains.
#[derive(Debug)]
pub struct StallProbe {
    stop: Arc<AtomicBool>,
    pongs: Arc<Mutex<Vec<u64>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Pings sent and not yet answered, at most.
const MAX_OUTSTANDING: u64 = 2;

/// The console line a guest prints to answer a ping.
pub const PONG: &str = "SPORE-PONG ";

impl StallProbe {
    pub fn start(
        mut writer: UnixStream,
        console_log: &Path,
        interval: Duration,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let pongs = Arc::new(Mutex::new(Vec::new()));
        let mut log = std::fs::File::open(console_log)?;
        // Only answers from now on.
        log.seek(SeekFrom::End(0))?;
        let (s1, s2, p, answered) = (stop.clone(), stop.clone(), pongs.clone(), pongs.clone());
        let ping = std::thread::Builder::new()
            .name("stall-ping".into())
            .spawn(move || {
                // At most MAX_OUTSTANDING unanswered pings: a busy or
                // stopped guest is not flooded (its channel would back up
                // into the agent's socket).
                let mut n = 0u64;
                while !s1.load(Ordering::Relaxed) {
                    let got = answered.lock().unwrap_or_else(|e| e.into_inner()).len() as u64;
                    if n < got + MAX_OUTSTANDING {
                        n += 1;
                        if writer.write_all(format!("ping {n}\n").as_bytes()).is_err() {
                            break;
                        }
                    }
                    std::thread::sleep(interval);
                }
            })?;
        let pong = std::thread::Builder::new()
            .name("stall-pong".into())
            .spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                while !s2.load(Ordering::Relaxed) {
                    match log.read(&mut chunk) {
                        Ok(0) => std::thread::sleep(Duration::from_millis(1)),
                        Ok(n) => {
                            let now = epoch_us();
                            buf.extend_from_slice(&chunk[..n]);
                            let answers = count_pongs(&mut buf);
                            let mut v = p.lock().unwrap_or_else(|e| e.into_inner());
                            v.extend(std::iter::repeat_n(now, answers));
                        }
                        Err(_) => break,
                    }
                }
            })?;
        Ok(StallProbe {
            stop,
            pongs,
            threads: vec![ping, pong],
        })
    }

    /// Answer times so far (µs since the epoch).
    pub fn pongs(&self) -> Vec<u64> {
        self.pongs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops pinging and returns every answer time.
    pub fn stop(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.pongs()
    }
}

impl Drop for StallProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Counts the answers among the complete lines of `buf` and keeps only the
/// unfinished last line. Answers may follow other output on a line (a shell
/// prompt), so they are looked for anywhere in it.
pub fn count_pongs(buf: &mut Vec<u8>) -> usize {
    let Some(last_nl) = buf.iter().rposition(|&b| b == b'\n') else {
        return 0;
    };
    let n = buf[..last_nl]
        .split(|&b| b == b'\n')
        .filter(|l| l.windows(PONG.len()).any(|w| w == PONG.as_bytes()))
        .count();
    buf.drain(..=last_nl);
    n
}

/// The longest time without an answer within `[from, to]` and when it
/// began, given answer times from one or more probes (sorted here). The
/// window's edges count as answers, so a guest that never answered stalled
/// for the whole window.
pub fn longest_gap(times: &[u64], from: u64, to: u64) -> (u64, u64) {
    let mut t: Vec<u64> = times
        .iter()
        .copied()
        .filter(|x| (from..=to).contains(x))
        .collect();
    t.sort_unstable();
    let mut prev = from;
    let mut gap = (0, from);
    for x in t.into_iter().chain(std::iter::once(to)) {
        if x.saturating_sub(prev) > gap.0 {
            gap = (x - prev, prev);
        }
        prev = x;
    }
    gap
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity {
            hostname: "web-1".into(),
            instance_id: "i-00ff".into(),
            mac: "52:54:00:12:34:56".into(),
            vmgenid: "00000000-0000-4000-8000-000000000001".into(),
            seed: "ab".repeat(32),
        }
    }

    #[test]
    fn an_identity_without_a_seed_leaves_the_seed_out() {
        let mut no_seed = id();
        no_seed.seed.clear();
        assert_eq!(
            Message::Identity(no_seed).encode().unwrap(),
            "identity hostname=web-1 instance=i-00ff mac=52:54:00:12:34:56\n"
        );
        let mut blank = id();
        blank.seed = "a b".into();
        assert!(Message::Identity(blank).encode().is_err());
    }

    #[test]
    fn messages_are_single_lines() {
        let line = Message::Identity(id()).encode().unwrap();
        assert_eq!(
            line,
            format!(
                "identity hostname=web-1 instance=i-00ff mac=52:54:00:12:34:56 seed={}\n",
                "ab".repeat(32)
            )
        );
        assert_eq!(
            Message::Resources { cpus: 3 }.encode().unwrap(),
            "resources cpus=3\n"
        );
        assert_eq!(
            Message::Write {
                path: "/data/x".into(),
                content: "hello".into()
            }
            .encode()
            .unwrap(),
            "write /data/x=hello\n"
        );
    }

    #[test]
    fn longest_gap_counts_the_window_edges() {
        assert_eq!(longest_gap(&[], 100, 400), (300, 100));
        assert_eq!(longest_gap(&[300, 150, 200], 100, 400), (100, 200));
        assert_eq!(longest_gap(&[110, 120, 390], 100, 400), (270, 120));
        // answers outside the window do not shorten it
        assert_eq!(longest_gap(&[50, 500], 100, 400), (300, 100));
        assert_eq!(Message::Ping(7).encode().unwrap(), "ping 7\n");
    }

    #[test]
    fn the_probe_records_answers_from_the_console_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        std::fs::write(&log, "SPORE-PONG 0 (before the probe)\n").unwrap();
        let (host, guest) = UnixStream::pair().unwrap();
        let console = log.clone();
        let echo = std::thread::spawn(move || {
            use std::io::BufRead;
            let mut r = std::io::BufReader::new(guest);
            let mut out = std::fs::OpenOptions::new()
                .append(true)
                .open(console)
                .unwrap();
            let mut line = String::new();
            for i in 0..5 {
                line.clear();
                r.read_line(&mut line).unwrap();
                let n = line.trim().strip_prefix("ping ").unwrap().to_owned();
                // split across writes, after other output on the line
                let text = if i == 2 {
                    format!("web:/# SPORE-PONG {n}\n")
                } else {
                    format!("SPORE-PONG {n}\n")
                };
                let (a, b) = text.split_at(5);
                out.write_all(a.as_bytes()).unwrap();
                out.write_all(b.as_bytes()).unwrap();
            }
        });
        let probe = StallProbe::start(host, &log, Duration::from_millis(2)).unwrap();
        echo.join().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while probe.pongs().len() < 5 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let pongs = probe.stop();
        assert_eq!(pongs.len(), 5);
        assert!(pongs.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn pong_lines_are_counted_once_complete() {
        let mut b = b"SPORE-PONG 1\nnoise\nx SPORE-PONG 2\nSPORE-PO".to_vec();
        assert_eq!(count_pongs(&mut b), 2);
        assert_eq!(b, b"SPORE-PO");
        b.extend_from_slice(b"NG 3\n");
        assert_eq!(count_pongs(&mut b), 1);
        assert!(b.is_empty());
    }

    #[test]
    fn blanks_and_newlines_are_refused() {
        let mut bad = id();
        bad.hostname = "a b".into();
        assert!(Message::Identity(bad).encode().is_err());
        let mut bad = id();
        bad.hostname = "a\nresources".into();
        assert!(Message::Identity(bad).encode().is_err());
        assert!(Message::Cat(String::new()).encode().is_err());
        assert!(Message::Line("a\nb".into()).encode().is_err());
        assert!(Message::Line(" ".into()).encode().is_err());
        assert!(Message::Line("x".repeat(1025)).encode().is_err());
        assert_eq!(
            Message::Line("dataset check".into()).encode().unwrap(),
            "dataset check\n"
        );
        assert!(Message::Write {
            path: "/a=b".into(),
            content: "x".into()
        }
        .encode()
        .is_err());
    }
}
