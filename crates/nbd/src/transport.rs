//! The byte streams the server speaks NBD over.
//!
//! A connection is read by one thread and written by several (every worker
//! sends its own replies), so a [`Transport`] is shared by reference rather
//! than split into halves. Writes go through `sendmsg(MSG_NOSIGNAL)`: a
//! client that vanishes must cost the server an `EPIPE`, never a `SIGPIPE`
//! in a host process that did not ignore it.

use std::io::{self, IoSlice};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// A connected, bidirectional byte stream that can be used from several
/// threads at once.
pub trait Transport: Send + Sync {
    /// Read some bytes; `Ok(0)` is the end of the stream.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Write some of `bufs`, returning how many bytes went out.
    fn send_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Shut down one or both directions; a thread blocked in
    /// [`Transport::recv`] sees the end of the stream.
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
    /// Bound how long [`Transport::recv`] may block (`None`: forever).
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let _ = timeout;
        Ok(())
    }
}

/// Write all of `bufs`, retrying on short writes and interrupts.
pub(crate) fn send_all<T: Transport + ?Sized>(
    transport: &T,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    // Skip empty slices so that an all-empty tail does not look like EOF.
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match transport.send_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `sendmsg` with `MSG_NOSIGNAL` on a socket.
fn sendmsg_nosignal(fd: RawFd, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is guaranteed to be ABI-compatible with iovec on Unix; the
    // kernel only reads through the pointer. Cap the count at IOV_MAX.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len().min(1024) as _;
    // SAFETY: `msg` points at `bufs`, which outlives the call.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl Transport for UnixStream {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(&mut &*self, buf)
    }
    fn send_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        sendmsg_nosignal(self.as_raw_fd(), bufs)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        UnixStream::shutdown(self, how)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
}

impl Transport for TcpStream {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(&mut &*self, buf)
    }
    fn send_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        sendmsg_nosignal(self.as_raw_fd(), bufs)
    }
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        TcpStream::shutdown(self, how)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
}

/// [`io::Read`] over a shared transport, for buffering the reading side.
/// With a deadline, every read is bounded by the time left, so a client
/// cannot stretch the handshake by trickling bytes.
pub(crate) struct Recv<'a, T: ?Sized> {
    transport: &'a T,
    deadline: Option<Instant>,
}

impl<'a, T: Transport + ?Sized> Recv<'a, T> {
    pub fn new(transport: &'a T) -> Self {
        Recv {
            transport,
            deadline: None,
        }
    }

    /// Bound all further reads by `deadline` (`None`: no bound).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) -> io::Result<()> {
        self.deadline = deadline;
        if deadline.is_none() {
            self.transport.set_read_timeout(None)?;
        }
        Ok(())
    }
}

impl<T: Transport + ?Sized> io::Read for Recv<'_, T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.transport.set_read_timeout(Some(left))?;
        }
        self.transport.recv(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_all_writes_every_slice() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut bufs = [IoSlice::new(b"he"), IoSlice::new(b""), IoSlice::new(b"llo")];
        send_all(&a, &mut bufs).unwrap();
        drop(a);
        let mut out = Vec::new();
        io::Read::read_to_end(&mut &b, &mut out).unwrap();
        assert_eq!(out, b"hello");
    }

    #[test]
    fn sending_to_a_closed_peer_is_an_error_not_a_signal() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let mut bufs = [IoSlice::new(b"x")];
        let err = send_all(&a, &mut bufs).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
