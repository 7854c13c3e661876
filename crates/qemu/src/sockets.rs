//! Tuning the TCP connections of a migrating QEMU from outside it.
//!
//! QEMU opens its migration connections itself and sets nothing on them
//! that keeps a post-copy page request from waiting. Two waits matter:
//!
//! - **Behind the bulk stream's buffer.** The migration thread blocks
//!   writing the main connection until the kernel has freed room in its
//!   send buffer (megabytes, autotuned), and serves the guest's page
//!   requests only between writes. A low `TCP_NOTSENT_LOWAT` keeps the
//!   unsent part small, so the thread comes back every few hundred
//!   kilobytes. Data in flight is not limited, so throughput is not.
//! - **Behind the bulk stream at the bottleneck.** Paced at a rate below
//!   the link's (`SO_MAX_PACING_RATE`, which the kernel's TCP enforces
//!   itself when the queueing discipline does not), the main connection
//!   leaves no standing queue at the bottleneck for a demand page on the
//!   other connection to wait in.
//!
//! spore takes a duplicate of QEMU's socket with `pidfd_getfd(2)` (Linux
//! 5.6, and the right to trace QEMU, which its parent has), sets the
//! options on it, which apply to the socket both descriptors share, and
//! closes the duplicate.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// One TCP connection of a QEMU process to the migration peer.
#[derive(Debug)]
pub struct PeerSocket {
    /// The descriptor's number in QEMU.
    pub fd: RawFd,
    /// Bytes the peer acknowledged: the bulk connection has by far the most.
    pub bytes_acked: u64,
    stream: TcpStream,
}

impl PeerSocket {
    /// Caps the connection's sending rate (bytes/s), smoothing bursts.
    pub fn set_pacing(&self, bytes_per_sec: u64) -> io::Result<()> {
        setsockopt(
            &self.stream,
            libc::SOL_SOCKET,
            libc::SO_MAX_PACING_RATE,
            &bytes_per_sec,
        )
    }

    /// Makes a blocked writer return once less than `bytes` are unsent.
    pub fn set_notsent_lowat(&self, bytes: u32) -> io::Result<()> {
        setsockopt(
            &self.stream,
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            &bytes,
        )
    }

    /// Sends small writes at once instead of waiting for acknowledgements.
    pub fn set_nodelay(&self) -> io::Result<()> {
        self.stream.set_nodelay(true)
    }
}

/// The TCP connections that process `pid` holds to `peer`, most
/// acknowledged bytes first. Empty when there are none (yet).
pub fn peer_sockets(pid: u32, peer: SocketAddr) -> io::Result<Vec<PeerSocket>> {
    connections(pid, |s| s.peer_addr().ok() == Some(peer))
}

/// The TCP connections that process `pid` accepted on its local port
/// `port` (an incoming migration's), most acknowledged bytes first.
pub fn accepted_sockets(pid: u32, port: u16) -> io::Result<Vec<PeerSocket>> {
    connections(pid, |s| {
        s.peer_addr().is_ok() && s.local_addr().map(|a| a.port()).ok() == Some(port)
    })
}

/// Descriptor `fd` of process `pid`, if it is still a TCP connection to
/// `peer` (QEMU may have closed it and reused the number).
pub fn peer_socket(pid: u32, fd: RawFd, peer: SocketAddr) -> io::Result<Option<PeerSocket>> {
    let pidfd = pidfd_open(pid)?;
    let Ok(dup) = pidfd_getfd(&pidfd, fd) else {
        return Ok(None);
    };
    if !is_tcp_stream(&dup) {
        return Ok(None);
    }
    let stream = TcpStream::from(dup);
    if stream.peer_addr().ok() != Some(peer) {
        return Ok(None);
    }
    let bytes_acked = bytes_acked(&stream)?;
    Ok(Some(PeerSocket {
        fd,
        bytes_acked,
        stream,
    }))
}

/// The connected TCP sockets of process `pid` that `wanted` accepts.
fn connections(pid: u32, wanted: impl Fn(&TcpStream) -> bool) -> io::Result<Vec<PeerSocket>> {
    let pidfd = pidfd_open(pid)?;
    let mut found = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // One socket may sit behind several descriptors: count it once.
        let Ok(link) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let link = link.to_string_lossy().into_owned();
        if !link.starts_with("socket:") || !seen.insert(link) {
            continue;
        }
        // The descriptor may be gone already: QEMU does not wait for us.
        let Ok(dup) = pidfd_getfd(&pidfd, fd) else {
            continue;
        };
        if !is_tcp_stream(&dup) {
            continue;
        }
        let stream = TcpStream::from(dup);
        if !wanted(&stream) {
            continue;
        }
        let bytes_acked = bytes_acked(&stream)?;
        found.push(PeerSocket {
            fd,
            bytes_acked,
            stream,
        });
    }
    found.sort_by_key(|s| std::cmp::Reverse(s.bytes_acked));
    Ok(found)
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; nothing is borrowed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn pidfd_getfd(pidfd: &OwnedFd, target: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd duplicates descriptor `target` of the process
    // behind `pidfd` into this one, returning the new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the duplicate is new and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn is_tcp_stream(fd: &OwnedFd) -> bool {
    let domain: libc::c_int =
        getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_DOMAIN).unwrap_or(-1);
    let kind: libc::c_int =
        getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_TYPE).unwrap_or(-1);
    let proto: libc::c_int =
        getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PROTOCOL).unwrap_or(-1);
    matches!(domain, libc::AF_INET | libc::AF_INET6)
        && kind == libc::SOCK_STREAM
        && proto == libc::IPPROTO_TCP
}

fn bytes_acked(stream: &TcpStream) -> io::Result<u64> {
    let info: libc::tcp_info = getsockopt(stream.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO)?;
    Ok(info.tcpi_bytes_acked)
}

fn getsockopt<T: Copy>(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` has room for `len` bytes; the kernel writes at most
    // that many, and a zeroed T is valid for the plain C types used here.
    let rc = unsafe { libc::getsockopt(fd, level, name, value.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised and then (partly) written by the kernel.
    Ok(unsafe { value.assume_init() })
}

fn setsockopt<T>(
    stream: &TcpStream,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` points at size_of::<T>() readable bytes.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Connects to a unix socket by path, also when the path is longer than a
/// socket address holds (108 bytes, a long data directory or VM name):
/// through a descriptor of its directory (`/proc/self/fd/N/NAME`).
pub fn connect_unix(path: &std::path::Path) -> io::Result<std::os::unix::net::UnixStream> {
    by_short_path(path, |p| std::os::unix::net::UnixStream::connect(p))
}

/// Binds a unix socket listener at `path`, long or not (as
/// [`connect_unix`]); a socket left there before is replaced.
pub fn bind_unix(path: &std::path::Path) -> io::Result<std::os::unix::net::UnixListener> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    by_short_path(path, |p| std::os::unix::net::UnixListener::bind(p))
}

/// Calls `f` with `path`, or with a path through a descriptor of its
/// directory when `path` is too long for a socket address.
fn by_short_path<T>(
    path: &std::path::Path,
    f: impl FnOnce(&std::path::Path) -> io::Result<T>,
) -> io::Result<T> {
    use std::os::unix::fs::OpenOptionsExt;
    const SUN_PATH: usize = 108;
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return f(path);
    };
    if path.as_os_str().len() < SUN_PATH {
        return f(path);
    }
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)?;
    f(&std::path::Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    /// A child process holding two connections to a local listener: the
    /// test finds both, tells the busy one by its bytes and sets every
    /// option.
    #[test]
    fn finds_and_tunes_another_process_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // bash opens the connections with its /dev/tcp redirection, sends
        // 64 KiB through the first, then waits on it.
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "exec 3<>/dev/tcp/127.0.0.1/{}; head -c 65536 /dev/zero >&3; exec 4<>/dev/tcp/127.0.0.1/{}; read -t 20 _ <&3",
                addr.port(),
                addr.port()
            ))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let (mut busy, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 65536];
        busy.read_exact(&mut buf).unwrap();
        let (_idle, _) = listener.accept().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let sockets = loop {
            let s = peer_sockets(child.id(), addr).unwrap();
            if s.len() == 2 && s[0].bytes_acked >= 65536 || Instant::now() > deadline {
                break s;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(sockets.len(), 2, "{sockets:?}");
        assert!(
            sockets[0].bytes_acked >= 65536,
            "the busy connection comes first"
        );
        assert!(sockets[1].bytes_acked < 65536);
        sockets[0].set_pacing(1 << 20).unwrap();
        sockets[0].set_notsent_lowat(128 << 10).unwrap();
        sockets[1].set_nodelay().unwrap();
        // The options are on the shared socket, not only on the duplicate.
        let again = peer_sockets(child.id(), addr).unwrap();
        let lowat: u32 = getsockopt(
            again[0].stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
        )
        .unwrap();
        assert_eq!(lowat, 128 << 10);
        busy.write_all(b"done\n").unwrap();
        child.wait().unwrap();
    }

    /// A child process listening on a port and holding the connection it
    /// accepted: the test finds it by the local port and sets TCP_NODELAY.
    #[test]
    fn finds_and_tunes_a_connection_another_process_accepted() {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(
                "import socket,sys\n\
                 l=socket.socket(); l.bind(('127.0.0.1',0)); l.listen(1)\n\
                 print(l.getsockname()[1], flush=True)\n\
                 c,_=l.accept(); c.recv(1)",
            )
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut port = String::new();
        let mut out = child.stdout.take().unwrap();
        let mut byte = [0u8; 1];
        while out.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
            port.push(byte[0] as char);
        }
        let port: u16 = port.trim().parse().unwrap();
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let found = loop {
            let s = accepted_sockets(child.id(), port).unwrap();
            if !s.is_empty() || Instant::now() > deadline {
                break s;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(
            found.len(),
            1,
            "only the accepted connection, not the listener"
        );
        assert!(!found[0].stream.nodelay().unwrap());
        found[0].set_nodelay().unwrap();
        let again = accepted_sockets(child.id(), port).unwrap();
        assert!(
            again[0].stream.nodelay().unwrap(),
            "set on the shared socket"
        );
        assert!(accepted_sockets(child.id(), port.wrapping_add(1))
            .unwrap()
            .is_empty());
        conn.write_all(b"x").unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_process_without_connections_to_the_peer_has_none() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert!(peer_sockets(std::process::id(), addr).unwrap().is_empty());
    }

    #[test]
    fn a_missing_process_is_an_error() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert!(peer_sockets(u32::MAX >> 2, addr).is_err());
    }

    /// A listener at a path longer than a socket address holds, bound over
    /// one left behind, and reached by [`connect_unix`].
    #[test]
    fn binds_and_connects_at_long_paths() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("d".repeat(120));
        std::fs::create_dir(&deep).unwrap();
        let path = deep.join("s.sock");
        assert!(path.as_os_str().len() > 108);
        drop(bind_unix(&path).unwrap());
        let listener = bind_unix(&path).unwrap();
        let mut c = connect_unix(&path).unwrap();
        let (mut a, _) = listener.accept().unwrap();
        c.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        a.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
    }
}
