//! The transmission phase: requests in, replies out, several at a time.
//!
//! ```text
//!             +--------+  Job (op, handle, write payload)   +----------+
//!  socket --> | reader | ---------- bounded channel -------> | worker 1 | --+
//!             +--------+                                     | worker N | --+--> socket
//!                 |  error replies (bad request, EPERM, ...)  +----------+   | (one mutex,
//!                 +---------------------------------------------------------+  one sendmsg
//!                                                                              per reply)
//! ```
//!
//! The connection's own thread reads and checks requests and reads WRITE
//! payloads, so a request is only dispatched once it is complete: a client
//! that vanishes mid-payload never gets a partial write applied. A pool of
//! workers runs the requests against the export and sends each reply as soon
//! as it is ready, in whatever order they finish; handles tell the client
//! which is which. A byte budget bounds the READ/WRITE payloads in flight, so
//! a client cannot make the server buffer more than
//! [`crate::ServerConfig::max_inflight_bytes`] per connection.

use std::io::{self, BufRead, IoSlice, Read};
use std::net::Shutdown;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};
use tracing::{debug, warn};

use crate::handshake::{read_message, Negotiated};
use crate::proto::{
    self, Command, ErrorCode, Op, ProtocolError, Reply, Session, BASE_ALLOCATION_ID, MAX_PAYLOAD,
};
use crate::transport::{send_all, Transport};
use crate::{ConnectionError, Export, ServerConfig, SessionEnd};

/// Buffers at most this large are kept for reuse.
const KEEP_BUFFER: usize = 4 << 20;

/// A complete, checked request waiting for a worker.
struct Job {
    handle: u64,
    op: Op,
    /// The data of a WRITE.
    payload: Vec<u8>,
    /// Bytes reserved from the in-flight budget.
    reserved: usize,
}

/// Counts payload bytes in flight and blocks the reader when over the limit.
struct Budget {
    used: Mutex<usize>,
    freed: Condvar,
    limit: usize,
}

impl Budget {
    fn acquire(&self, n: usize) {
        if n == 0 {
            return;
        }
        let mut used = self.used.lock();
        // A request larger than the whole budget still goes through once
        // nothing else is in flight.
        while *used > 0 && *used + n > self.limit {
            self.freed.wait(&mut used);
        }
        *used += n;
    }

    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        *self.used.lock() -= n;
        self.freed.notify_one();
    }
}

/// What the reader and the workers of one connection share.
struct Conn<'a, T: ?Sized> {
    transport: &'a T,
    send_lock: Mutex<()>,
    export: &'a dyn Export,
    session: Session,
    budget: Budget,
    /// WRITE payload buffers for reuse.
    buffers: Mutex<Vec<Vec<u8>>>,
    max_buffers: usize,
    /// Set once a send failed: the client is gone.
    broken: AtomicBool,
    /// Requests handed to workers and not finished.
    busy: std::sync::atomic::AtomicUsize,
}

/// Serve requests until the client disconnects; the handshake is done.
pub(crate) fn run<T: Transport + ?Sized, R: BufRead>(
    transport: &T,
    reader: &mut R,
    negotiated: Negotiated,
    config: &ServerConfig,
) -> Result<SessionEnd, ConnectionError> {
    let workers = config.workers_per_connection;
    let conn = Conn {
        transport,
        send_lock: Mutex::new(()),
        export: &*negotiated.export,
        session: negotiated.session,
        budget: Budget {
            used: Mutex::new(0),
            freed: Condvar::new(),
            limit: config.max_inflight_bytes.max(1),
        },
        buffers: Mutex::new(Vec::new()),
        max_buffers: workers.max(1) * 2,
        broken: AtomicBool::new(false),
        busy: std::sync::atomic::AtomicUsize::new(0),
    };
    debug!(export = %negotiated.name, workers, "transmission");
    let (tx, rx) = crossbeam_channel::bounded::<Job>(workers.max(1) * 4);
    let most = config.max_workers_per_connection.max(workers);
    let started = std::sync::atomic::AtomicUsize::new(0);
    thread::scope(|s| {
        let conn = &conn;
        let spawn = |rx: &Receiver<Job>| {
            let rx = rx.clone();
            let i = started.load(Ordering::Relaxed);
            let spawned = thread::Builder::new()
                .name(format!("nbd-worker-{i}"))
                .spawn_scoped(s, move || conn.work(rx));
            match spawned {
                Ok(_) => {
                    started.fetch_add(1, Ordering::Relaxed);
                }
                // The reader below still has the workers that did start, or
                // runs the jobs itself if none did.
                Err(e) => warn!(error = %e, "could not start an NBD worker thread"),
            }
        };
        for _ in 0..workers {
            spawn(&rx);
        }
        // Kept for growing only while there are workers: with none, the
        // channel must refuse jobs, so that the reader runs them itself.
        let rx = (started.load(Ordering::Relaxed) > 0).then_some(rx);
        // One more worker whenever every one is busy, up to `most`: a
        // request that waits on the network (a chunk fetched from a peer,
        // for up to the read deadline) never holds up one behind it.
        let grow = || {
            let n = started.load(Ordering::Relaxed);
            if let Some(rx) = &rx {
                if n < most && conn.busy.load(Ordering::Acquire) > n {
                    debug!(workers = n + 1, "every NBD worker is busy; one more");
                    spawn(rx);
                }
            }
        };
        let end = conn.read_requests(reader, &tx, &grow);
        if end.is_err() {
            // A broken or vanished client: a hard disconnect, so that workers
            // blocked sending to a client that no longer reads give up.
            conn.broken.store(true, Ordering::Relaxed);
            let _ = transport.shutdown(Shutdown::Both);
        }
        drop(tx);
        end
    })
}

impl<T: Transport + ?Sized> Conn<'_, T> {
    fn read_requests<R: BufRead>(
        &self,
        reader: &mut R,
        jobs: &Sender<Job>,
        grow: &dyn Fn(),
    ) -> Result<SessionEnd, ConnectionError> {
        let mut header = [0u8; proto::REQUEST_HEADER_LEN];
        // For requests the reader runs itself (no workers).
        let (mut buf, mut scratch) = (Vec::new(), Vec::new());
        loop {
            if !read_message(reader, &mut header)? {
                debug!("client closed the connection");
                return Ok(SessionEnd::Closed);
            }
            let req = proto::parse_request_header(&header).inspect_err(|e| {
                warn!(error = %e, "bad request magic, closing");
            })?;
            let op = match proto::check_request(&req, &self.session) {
                Ok(op) => op,
                Err(code) => {
                    self.refuse(reader, &req, code)?;
                    continue;
                }
            };
            let reserved = match op {
                Op::Disconnect => {
                    debug!("client sent NBD_CMD_DISC");
                    return Ok(SessionEnd::Disconnected);
                }
                Op::Read { length, .. } | Op::Write { length, .. } => length as usize,
                _ => 0,
            };
            self.budget.acquire(reserved);
            let mut payload = Vec::new();
            if let Op::Write { length, .. } = op {
                payload = self.take_buffer(length as usize);
                if let Err(e) = reader.read_exact(&mut payload) {
                    self.budget.release(reserved);
                    debug!(error = %e, "connection ended inside a WRITE payload");
                    return Err(match e.kind() {
                        io::ErrorKind::UnexpectedEof => ConnectionError::Truncated,
                        _ => ConnectionError::Io(e),
                    });
                }
            }
            let job = Job {
                handle: req.handle,
                op,
                payload,
                reserved,
            };
            // Alone on the connection (nothing in flight), a flush or a
            // write the export can finish from local state runs here: a worker's hand-off would cost more
            // than the request (queue depth 1, the database pattern).
            // Anything that may wait on the network goes to a worker, so a
            // slow request never holds up reading the next.
            let quick = match op {
                Op::Flush => true,
                Op::Write { offset, length, .. } => {
                    self.export.is_quick_write(offset, length as u64)
                }
                _ => false,
            };
            if quick && self.busy.load(Ordering::Acquire) == 0 {
                self.execute(job, &mut buf, &mut scratch);
                continue;
            }
            self.busy.fetch_add(1, Ordering::AcqRel);
            grow();
            // Fails only if there are no workers (none configured, or none
            // could be started): then the reader runs the request itself.
            if let Err(crossbeam_channel::SendError(job)) = jobs.send(job) {
                self.busy.fetch_sub(1, Ordering::AcqRel);
                self.execute(job, &mut buf, &mut scratch);
            }
        }
    }

    /// Answer a request that failed its checks, consuming its payload.
    fn refuse<R: BufRead>(
        &self,
        reader: &mut R,
        req: &proto::Request,
        code: ErrorCode,
    ) -> Result<(), ConnectionError> {
        warn!(
            command = ?req.command,
            flags = req.flags,
            offset = req.offset,
            length = req.length,
            error = ?code,
            "request refused"
        );
        let payload = req.payload_len();
        if payload > MAX_PAYLOAD {
            // The client broke the advertised maximum block size; skipping
            // up to 4 GiB of junk is not worth it.
            self.reply_error(req.handle, code, "request too large");
            return Err(ProtocolError::PayloadTooLarge {
                length: payload,
                limit: MAX_PAYLOAD,
            }
            .into());
        }
        if payload > 0 {
            let skipped = io::copy(&mut reader.take(u64::from(payload)), &mut io::sink())
                .map_err(ConnectionError::Io)?;
            if skipped < u64::from(payload) {
                return Err(ConnectionError::Truncated);
            }
        }
        let message = match (req.command, code) {
            (Command::Unknown(_), _) => "unknown command",
            (_, ErrorCode::Perm) => "export is read-only",
            (_, ErrorCode::NoSpc) => "write beyond the end of the export",
            _ => "invalid request",
        };
        self.reply_error(req.handle, code, message);
        Ok(())
    }

    fn take_buffer(&self, len: usize) -> Vec<u8> {
        let mut buf = self.buffers.lock().pop().unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    fn return_buffer(&self, buf: Vec<u8>) {
        if buf.capacity() <= KEEP_BUFFER {
            let mut buffers = self.buffers.lock();
            if buffers.len() < self.max_buffers {
                buffers.push(buf);
            }
        }
    }

    fn work(&self, jobs: Receiver<Job>) {
        let mut buf = Vec::new();
        let mut scratch = Vec::new();
        for job in jobs.iter() {
            self.execute(job, &mut buf, &mut scratch);
            self.busy.fetch_sub(1, Ordering::AcqRel);
            if buf.len() > KEEP_BUFFER {
                buf = Vec::new();
            }
        }
    }

    fn execute(&self, job: Job, buf: &mut Vec<u8>, scratch: &mut Vec<u8>) {
        let Job {
            handle,
            op,
            payload,
            reserved,
        } = job;
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            self.perform(handle, op, &payload, buf, scratch)
        }));
        if outcome.is_err() {
            warn!(?op, "export panicked");
            self.reply_error(handle, ErrorCode::Io, "export failed");
        }
        if payload.capacity() > 0 {
            self.return_buffer(payload);
        }
        self.budget.release(reserved);
    }

    /// Run `op` against the export and send its reply.
    fn perform(
        &self,
        handle: u64,
        op: Op,
        payload: &[u8],
        buf: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
    ) {
        let e = self.export;
        let result = match op {
            Op::Read {
                offset,
                length,
                no_fragment,
            } => {
                let length = length as usize;
                if buf.len() < length {
                    buf.resize(length, 0);
                }
                let data = &mut buf[..length];
                match e.read(offset, data) {
                    Ok(()) => {
                        self.send_read(handle, offset, data, no_fragment);
                        return;
                    }
                    Err(err) => Err(err),
                }
            }
            Op::Write { offset, fua, .. } => e.write(offset, payload, fua),
            Op::Flush => e.flush(),
            Op::Trim {
                offset,
                length,
                fua,
            } => e
                .trim(offset, length.into())
                .and_then(|()| if fua { e.flush() } else { Ok(()) }),
            Op::Cache { offset, length } => e.cache(offset, length.into()),
            Op::WriteZeroes {
                offset,
                length,
                may_trim,
                fua,
                fast,
            } => {
                if fast && !e.can_fast_zero() {
                    self.reply_error(handle, ErrorCode::NotSup, "fast zero not supported");
                    return;
                }
                e.write_zeroes(offset, length.into(), may_trim, fua)
            }
            Op::BlockStatus {
                offset,
                length,
                req_one,
            } => match e.block_status(offset, length.into()) {
                Ok(extents) => {
                    proto::encode_extents(&extents, length, req_one, scratch);
                    self.send(
                        handle,
                        Reply::BlockStatus {
                            context_id: BASE_ALLOCATION_ID,
                            descriptors: scratch,
                            done: true,
                        },
                    );
                    return;
                }
                Err(err) => Err(err),
            },
            // Handled by the reader.
            Op::Disconnect => Ok(()),
        };
        match result {
            Ok(()) => self.send(
                handle,
                Reply::Simple {
                    error: 0,
                    data: &[],
                },
            ),
            Err(err) => {
                let code = match op {
                    Op::WriteZeroes { fast: true, .. } => ErrorCode::from_io_fast_zero(&err),
                    _ => ErrorCode::from_io(&err),
                };
                debug!(?op, error = %err, ?code, "export request failed");
                self.reply_error(handle, code, "export i/o error");
            }
        }
    }

    fn send_read(&self, handle: u64, offset: u64, data: &[u8], no_fragment: bool) {
        let reply = if !self.session.structured_replies {
            Reply::Simple { error: 0, data }
        } else if data.is_empty() {
            Reply::Done
        } else if !no_fragment && data.len() >= 4096 && is_zero(data) {
            // Saves the bandwidth of sparse regions.
            Reply::OffsetHole {
                offset,
                length: data.len() as u32,
                done: true,
            }
        } else {
            Reply::OffsetData {
                offset,
                data,
                done: true,
            }
        };
        self.send(handle, reply);
    }

    fn reply_error(&self, handle: u64, error: ErrorCode, message: &str) {
        let reply = if self.session.structured_replies {
            Reply::Error { error, message }
        } else {
            Reply::Simple {
                error: error.wire(),
                data: &[],
            }
        };
        self.send(handle, reply);
    }

    /// Send a reply as one `sendmsg`; a failure means the client is gone, so
    /// the connection is shut down, which also stops the reader.
    fn send(&self, handle: u64, reply: Reply<'_>) {
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
        let encoded = reply.encode(handle);
        let mut bufs = [IoSlice::new(encoded.header()), IoSlice::new(encoded.tail)];
        let result = {
            let _guard = self.send_lock.lock();
            send_all(self.transport, &mut bufs)
        };
        if let Err(e) = result {
            if !self.broken.swap(true, Ordering::Relaxed) {
                debug!(error = %e, "sending a reply failed, closing");
                let _ = self.transport.shutdown(Shutdown::Both);
            }
        }
    }
}

/// Whether every byte of `data` is zero.
fn is_zero(data: &[u8]) -> bool {
    let mut chunks = data.chunks_exact(16);
    let words_zero = chunks
        .by_ref()
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0);
    words_zero && chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 4097]));
        let mut v = vec![0u8; 4097];
        v[4096] = 1;
        assert!(!is_zero(&v));
        v[4096] = 0;
        v[17] = 1;
        assert!(!is_zero(&v));
    }
}
