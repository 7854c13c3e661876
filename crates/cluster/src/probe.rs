//! Measuring a path between two hosts with a bounded TCP transfer.
//!
//! Tests use it to prove the shapers work, and benchmarks to report the
//! links they actually ran on. No helper process: the sockets are created
//! inside the hosts' namespaces ([`Node::run_in_netns`]) and used from
//! ordinary threads.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::{ClusterError, Node};

/// Sends `bytes` from `from` to `to` over one TCP connection and returns
/// the goodput in bits per second: payload bits over the time from the
/// first write until the receiver has read the last byte (it answers with
/// one byte, so the sender's socket buffer does not flatter the figure).
/// Every wait is bounded by `timeout`.
pub fn measure_goodput(
    from: &Node,
    to: &Node,
    bytes: u64,
    timeout: Duration,
) -> Result<f64, ClusterError> {
    let failed = |source: io::Error| ClusterError::Probe {
        from: from.name.clone(),
        to: to.name.clone(),
        source,
    };
    let listener = to
        .run_in_netns(|| TcpListener::bind((to.ip, 0)))?
        .map_err(failed)?;
    let addr = listener.local_addr().map_err(failed)?;
    std::thread::scope(|s| {
        let receiver = s.spawn(move || receive(listener, timeout));
        let sent = from
            .run_in_netns(|| TcpStream::connect_timeout(&addr, timeout))?
            .and_then(|stream| send(stream, bytes, timeout))
            .map_err(failed);
        // The receiver gives up by itself within `timeout` if the sender
        // failed before connecting.
        let received = receiver
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("receiver panicked")))
            .map_err(failed)?;
        let elapsed = sent?;
        if received != bytes {
            return Err(failed(io::Error::other(format!(
                "received {received} of {bytes} bytes"
            ))));
        }
        Ok(bytes as f64 * 8.0 / elapsed.as_secs_f64().max(1e-9))
    })
}

fn send(mut stream: TcpStream, bytes: u64, timeout: Duration) -> io::Result<Duration> {
    stream.set_write_timeout(Some(timeout))?;
    stream.set_read_timeout(Some(timeout))?;
    let chunk = vec![0x5au8; 64 << 10];
    let started = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = chunk.len().min(left as usize);
        stream.write_all(&chunk[..n])?;
        left -= n as u64;
        if started.elapsed() > timeout {
            return Err(io::ErrorKind::TimedOut.into());
        }
    }
    stream.shutdown(Shutdown::Write)?;
    let mut ack = [0u8; 1];
    stream.read_exact(&mut ack)?;
    Ok(started.elapsed())
}

fn receive(listener: TcpListener, timeout: Duration) -> io::Result<u64> {
    let deadline = Instant::now() + timeout;
    listener.set_nonblocking(true)?;
    let mut stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf)? {
            0 => break,
            n => total += n as u64,
        }
        if Instant::now() > deadline {
            return Err(io::ErrorKind::TimedOut.into());
        }
    }
    stream.write_all(b"k")?;
    Ok(total)
}
