//! What tests share across crates: how a test that needs something the
//! machine lacks (a tool such as qemu-io or nbdcopy, or /dev/fuse) stops,
//! and how a command that hangs fails its test ([`output_within`]) instead
//! of holding the suite until CI's limit.
//!
//! A skip must never pass for a run. Under `CI=true` a missing requirement
//! fails the test with the Debian package to install. Elsewhere the test
//! returns early after writing `SKIP: <test>: <why>` straight to the
//! process's stdout (past libtest's capture, so it shows beside the test's
//! result line without `--nocapture`) and appending the same line to the
//! file named by `SPORE_SKIP_LOG`, which scripts/test.sh sets and counts
//! in its summary.
//!
//! ```no_run
//! #[test]
//! fn qemu_io_reads_back() {
//!     if !spore_testkit::tool("qemu-io", "qemu-utils") {
//!         return;
//!     }
//!     // ...
//! }
//! ```

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a test command may run before [`output`] calls it hung.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(600);

/// [`output_within`] with [`COMMAND_LIMIT`].
pub fn output(cmd: &mut Command) -> Output {
    output_within(cmd, COMMAND_LIMIT)
}

/// Runs `cmd` to completion like [`Command::output`], but kills it and
/// panics (with what it printed so far) if it runs longer than `limit`: a
/// deadlocked agent then fails the test that met it, with its name.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                let out = stdout.join().unwrap_or_default();
                let err = stderr.join().unwrap_or_default();
                panic!(
                    "{cmd:?} did not finish in {} s (hung?); it printed: {}{}",
                    limit.as_secs(),
                    String::from_utf8_lossy(&err),
                    String::from_utf8_lossy(&out)
                );
            }
            Err(e) => panic!("{cmd:?}: {e}"),
        }
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// Environment variable naming the file skips are appended to.
pub const SKIP_LOG: &str = "SPORE_SKIP_LOG";

/// Whether `tool` is on PATH. When it is not: panics under `CI=true`
/// naming `package`, else reports a skip and returns false.
pub fn tool(tool: &str, package: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    found || skip(&format!("{tool} is missing (apt-get install {package})"))
}

/// Whether FUSE file systems can be mounted here: /dev/fuse exists and we
/// are root. When not: panics under `CI=true`, else reports a skip and
/// returns false.
pub fn fuse() -> bool {
    if !Path::new("/dev/fuse").exists() {
        return skip("/dev/fuse is missing (modprobe fuse; apt-get install fuse3)");
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return skip("mounting FUSE needs root");
    }
    true
}

/// Whether this run is CI's (`CI=true`), where nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// The test cannot run because of `why`: fails it under `CI=true`, else
/// reports the skip (see the crate doc). Always returns false, so a caller
/// can write `if !ok { return skip(...) }` or use it as a condition.
pub fn skip(why: &str) -> bool {
    let test = current_test();
    if in_ci() {
        panic!("{test}: {why} (CI=true: a test may not be skipped)");
    }
    let line = format!("SKIP: {test}: {why}\n");
    // io::stdout() is not captured by libtest (print! is).
    let _ = std::io::stdout().lock().write_all(line.as_bytes());
    if let Some(log) = std::env::var_os(SKIP_LOG) {
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = appended {
            panic!("{test}: {why}, and the skip could not be recorded in {log:?}: {e}");
        }
    }
    false
}

/// The running test's name: libtest names each test's thread after it.
fn current_test() -> String {
    std::thread::current()
        .name()
        .unwrap_or("(unnamed test)")
        .to_owned()
}

/// A cluster or namespace name no other test of this run and no other run
/// on the machine uses at the same time: `prefix`, this process's id and a
/// per-process counter, in at most 10 bytes (`spore cluster` names' limit)
/// for a one-letter prefix. Tests of one binary run in parallel threads,
/// so the process id alone is not enough.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}z{n}", std::process::id() % 100_000)
}

/// A loopback TCP port that refuses connections for as long as the
/// returned socket lives: bound (so no other process of the machine can
/// take the port) but never listening, so a connection to it is reset at
/// once. What a test needs for "a dead peer", without the race of a port
/// that was free a moment ago.
pub fn refused_port() -> (std::os::fd::OwnedFd, u16) {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor this function owns; the
    // structures passed are sized as the kernel expects.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        use std::os::fd::AsRawFd;
        let rc = libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len);
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let mut got: libc::sockaddr_in = std::mem::zeroed();
        let mut got_len = len;
        let rc = libc::getsockname(fd.as_raw_fd(), (&raw mut got).cast(), &mut got_len);
        assert_eq!(rc, 0, "getsockname: {}", std::io::Error::last_os_error());
        (fd, u16::from_be(got.sin_port))
    }
}

/// Reads one HTTP/1.1 request from `c` (a fake server in a test): its body,
/// as long as its `content-length` says. None if the client goes away
/// first.
pub fn read_http_body(c: &mut impl Read) -> Option<Vec<u8>> {
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = req.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&req[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if req.len() >= end + 4 + len {
                return Some(req[end + 4..end + 4 + len].to_vec());
            }
        }
        let n = c.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        req.extend_from_slice(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_port_refuses_and_stays_taken() {
        let (_guard, port) = refused_port();
        let e = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_err());
    }

    #[test]
    fn a_tool_that_is_there_is_no_skip() {
        assert!(tool("sh", "dash"));
    }

    /// Outside CI a missing tool is a skip, recorded in the log; in CI it
    /// fails. Both in child processes of this test binary, so the
    /// environment of the other tests is left alone.
    #[test]
    fn a_missing_tool_is_a_counted_skip_outside_ci_and_a_failure_in_it() {
        if std::env::var_os("SPORE_TESTKIT_CHILD").is_some() {
            tool("no-such-tool-spore", "no-such-package");
            return;
        }
        let dir = std::env::temp_dir().join(format!("spore-testkit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("skips");
        let me = std::env::current_exe().unwrap();
        let run = |ci: &str| {
            Command::new(&me)
                .args([
                    "--exact",
                    "tests::a_missing_tool_is_a_counted_skip_outside_ci_and_a_failure_in_it",
                    "--test-threads=1",
                ])
                .env("SPORE_TESTKIT_CHILD", "1")
                .env("CI", ci)
                .env(SKIP_LOG, &log)
                .output()
                .unwrap()
        };
        let outside = run("false");
        let stdout = String::from_utf8_lossy(&outside.stdout);
        assert!(outside.status.success(), "{stdout}");
        let line = "SKIP: tests::a_missing_tool_is_a_counted_skip_outside_ci_and_a_failure_in_it: \
                    no-such-tool-spore is missing (apt-get install no-such-package)";
        assert!(stdout.contains(line), "not on stdout: {stdout}");
        assert_eq!(std::fs::read_to_string(&log).unwrap().trim(), line);

        let inside = run("true");
        let stdout = String::from_utf8_lossy(&inside.stdout);
        assert!(!inside.status.success(), "passed in CI: {stdout}");
        assert!(
            stdout.contains("apt-get install no-such-package"),
            "{stdout}"
        );
        assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
