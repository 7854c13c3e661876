//! The socket holder: a small process that keeps the agent's listening
//! sockets (`nbd.sock`, `api.sock`) open while the agent restarts.
//!
//! VMs outlive their agent; their disks are the agent's NBD exports. When
//! the agent goes (an upgrade, a crash, kill -9), QEMU reconnects. Were the
//! socket closed in between, a connect would fail and QEMU would back off
//! (1, 2, 4 ... 16 s between tries), stalling the guest's I/O for seconds
//! after the new agent is up. The holder keeps the very same listening
//! socket open instead: a connect during the restart waits in its backlog,
//! and the new agent, which takes the sockets from the holder, accepts it
//! as soon as it serves. The guest's I/O then stalls for the restart
//! itself, and CLI calls made meanwhile wait instead of failing.
//!
//! The first agent on a data directory binds the sockets and starts the
//! holder (`spore __hold-sockets`, the same binary) with the listeners
//! inherited. Every later agent asks the holder for them on
//! `DATA_DIR/holder.sock`, whose protocol is one request line and one
//! answer, with the descriptors as `SCM_RIGHTS`:
//!
//! ```text
//! -> fds\n     <- spore-holder 1 nbd api\n  + [nbd listener, api listener]
//! -> exit\n    <- bye\n                      (the holder exits)
//! ```
//!
//! The data directory is 0700, so only root reaches `holder.sock`. A
//! request is at most 64 bytes and gets 2 s; the holder exits when its
//! `holder.sock` is removed or replaced (its data directory is gone) or
//! when asked (`spore agent stop --vms`: no VM needs the sockets then).
//! Written here rather than with systemd's file descriptor store because
//! the agent runs without systemd too (tests, `spore cluster`, the demo);
//! under systemd it works the same.

use std::io::{BufRead, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::error::{AgentError, Result};

/// The holder's socket in the data directory.
pub const HOLDER_SOCKET: &str = spore_api::HOLDER_SOCKET;
/// The hidden command that runs a holder.
pub const HOLD_COMMAND: &str = "__hold-sockets";
const GREETING: &str = "spore-holder 1 nbd api\n";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_REQUEST: u64 = 64;
/// How often the holder checks that its socket is still its own.
const WATCH: Duration = Duration::from_secs(2);

/// The agent's listening sockets.
#[derive(Debug)]
pub struct Listeners {
    pub nbd: UnixListener,
    pub api: UnixListener,
    /// Taken from a holder (a previous agent's sockets), not bound anew.
    pub held: bool,
}

fn holder_path(data_dir: &Path) -> PathBuf {
    data_dir.join(HOLDER_SOCKET)
}

/// Takes the listening sockets from the data directory's holder, when one
/// runs and holds sockets still bound to `nbd_path` and `api_path`.
pub fn take(data_dir: &Path, nbd_path: &Path, api_path: &Path) -> Option<Listeners> {
    let mut s = UnixStream::connect(holder_path(data_dir)).ok()?;
    s.set_read_timeout(Some(REQUEST_TIMEOUT)).ok()?;
    s.write_all(b"fds\n").ok()?;
    let mut buf = [0u8; 64];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 2]);
    let msg = recvmsg::<()>(
        s.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .ok()?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().ok()? {
        if let ControlMessageOwned::ScmRights(r) = c {
            // SAFETY: the kernel installed these descriptors in this
            // process for us; nothing else owns them.
            fds.extend(r.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    let n = msg.bytes;
    if &buf[..n] != GREETING.as_bytes() || fds.len() != 2 {
        tracing::warn!("the socket holder answered something else; binding new sockets");
        return None;
    }
    let api = UnixListener::from(fds.pop()?);
    let nbd = UnixListener::from(fds.pop()?);
    let bound_to = |l: &UnixListener, p: &Path| {
        l.local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_owned))
            == Some(p.to_owned())
            && p.exists()
    };
    if !bound_to(&nbd, nbd_path) || !bound_to(&api, api_path) {
        tracing::warn!(
            "the socket holder's sockets are not this data directory's any more; binding new ones"
        );
        stop(data_dir);
        return None;
    }
    Some(Listeners {
        nbd,
        api,
        held: true,
    })
}

/// Starts a holder for `listeners` and waits (up to 5 s) until it answers.
pub fn spawn(data_dir: &Path, listeners: &Listeners) -> Result<()> {
    let exe = std::env::current_exe().map_err(AgentError::io("finding the agent's binary"))?;
    let (nbd, api) = (listeners.nbd.as_raw_fd(), listeners.api.as_raw_fd());
    let mut cmd = std::process::Command::new(&exe);
    cmd.arg(HOLD_COMMAND)
        .arg(data_dir)
        .arg(nbd.to_string())
        .arg(api.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid and fcntl are async-signal-safe and touch no memory
    // of ours; the two descriptors stay open in the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            for fd in [nbd, api] {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(AgentError::io(format!(
        "starting the socket holder {}",
        exe.display()
    )))?;
    let until = Instant::now() + Duration::from_secs(5);
    while UnixStream::connect(holder_path(data_dir)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(AgentError::State(format!(
                "the socket holder exited: {status}"
            )));
        }
        if Instant::now() > until {
            let _ = child.kill();
            return Err(AgentError::State(
                "the socket holder did not come up in 5 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // It lives on after this agent; a thread reaps it should it end first.
    std::thread::spawn(move || child.wait());
    tracing::info!("socket holder started: NBD and API sockets stay open across agent restarts");
    Ok(())
}

/// Tells the data directory's holder to exit (if one runs).
pub fn stop(data_dir: &Path) {
    if let Ok(mut s) = UnixStream::connect(holder_path(data_dir)) {
        let _ = s.set_read_timeout(Some(REQUEST_TIMEOUT));
        let _ = s.write_all(b"exit\n");
        let _ = s.read(&mut [0u8; 8]);
    }
}

/// The holder itself (`spore __hold-sockets DATA_DIR NBD_FD API_FD`):
/// serves the two inherited listeners to agents until told to exit or
/// until its socket is gone.
pub fn hold(data_dir: &Path, nbd: RawFd, api: RawFd) -> Result<()> {
    // SAFETY: the agent that started this process passed these two
    // descriptors, open, for this process to own.
    let held = unsafe { [OwnedFd::from_raw_fd(nbd), OwnedFd::from_raw_fd(api)] };
    let path = holder_path(data_dir);
    let listener = spore_qemu::sockets::bind_unix(&path)
        .map_err(AgentError::io(format!("binding {}", path.display())))?;
    let ino = std::fs::metadata(&path)
        .map_err(AgentError::io("holder socket"))?
        .ino();
    listener
        .set_nonblocking(true)
        .map_err(AgentError::io("holder socket"))?;
    loop {
        let still_ours = std::fs::metadata(&path).is_ok_and(|m| m.ino() == ino);
        if !still_ours {
            return Ok(());
        }
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes the one pollfd we pass.
        unsafe { libc::poll(&mut pfd, 1, WATCH.as_millis() as i32) };
        let Ok((mut s, _)) = listener.accept() else {
            continue;
        };
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(Some(REQUEST_TIMEOUT));
        let _ = s.set_write_timeout(Some(REQUEST_TIMEOUT));
        let mut line = String::new();
        if std::io::BufReader::new((&s).take(MAX_REQUEST))
            .read_line(&mut line)
            .is_err()
        {
            continue;
        }
        match line.trim_end() {
            "fds" => {
                let fds = [held[0].as_fd().as_raw_fd(), held[1].as_fd().as_raw_fd()];
                let iov = [std::io::IoSlice::new(GREETING.as_bytes())];
                let _ = sendmsg::<()>(
                    s.as_raw_fd(),
                    &iov,
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::empty(),
                    None,
                );
            }
            "exit" => {
                let _ = s.write_all(b"bye\n");
                let _ = std::fs::remove_file(&path);
                return Ok(());
            }
            _ => {}
        }
    }
}
