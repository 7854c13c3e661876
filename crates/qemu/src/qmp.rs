//! A small blocking QMP client.
//!
//! QMP is line-delimited JSON over a unix socket: a greeting, then
//! `qmp_capabilities`, then commands each answered by `return` or `error`,
//! with asynchronous `event` messages interleaved (kept for the caller).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket I/O")]
    Io(#[from] io::Error),
    #[error("QMP sent something that is not JSON")]
    Json(#[from] serde_json::Error),
    #[error("QMP connection closed")]
    Closed,
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP socket {0} did not come up in time")]
    Timeout(String),
    #[error("{0}")]
    Migration(String),
    #[error("{0}")]
    Invalid(String),
}

/// Whether `stream` has bytes to read within `timeout`.
fn readable(stream: &UnixStream, timeout: Duration) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let mut fds = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd, for the duration of the call.
    let rc = unsafe { libc::poll(&mut fds, 1, ms) };
    match rc {
        -1 => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}

#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received while waiting for command replies.
    pub events: Vec<Value>,
    /// Out-of-band execution was negotiated ([`Qmp::connect_oob`]).
    oob: bool,
    next_id: u64,
}

impl Qmp {
    /// Connects, retrying until `timeout` (QEMU creates the socket shortly
    /// after it starts), and negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        Self::open(path, timeout, false)
    }

    /// [`Qmp::connect`], with out-of-band execution enabled where QEMU
    /// offers it: [`Qmp::execute_oob`] then runs commands that QEMU allows
    /// out of band (`migrate-recover`, `migrate-pause`) even while its main
    /// thread is blocked, as a post-copy destination's is on a page that
    /// will not come until the migration is recovered.
    pub fn connect_oob(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        Self::open(path, timeout, true)
    }

    fn open(path: &Path, timeout: Duration, oob: bool) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match crate::sockets::connect_unix(path) {
                Ok(s) => break s,
                // Cheap to retry; a clone waits for this, so retry often.
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
                Err(_) => return Err(QmpError::Timeout(path.display().to_string())),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            events: Vec::new(),
            oob: false,
            next_id: 0,
        };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Closed);
        }
        let offered = greeting["QMP"]["capabilities"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c == "oob"));
        if oob && offered {
            qmp.execute("qmp_capabilities", Some(json!({ "enable": ["oob"] })))?;
            qmp.oob = true;
        } else {
            qmp.execute("qmp_capabilities", None)?;
        }
        Ok(qmp)
    }

    /// Runs a command out of band when that was negotiated, else as usual.
    /// Its answer is told by its id: one to an earlier command that timed
    /// out (QEMU answers it once its main thread is free) is passed over.
    pub fn execute_oob(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        if !self.oob {
            return self.execute(command, arguments);
        }
        let id = self.new_id();
        let mut msg = json!({ "exec-oob": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&msg)?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        self.reply(command, Some(&id))
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QmpError::Closed);
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs a command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        // With out-of-band execution on, answers are told by id: one to a
        // command that timed out earlier may come in first.
        let id = self.oob.then(|| self.new_id());
        if let Some(id) = &id {
            msg["id"] = json!(id);
        }
        let mut line = serde_json::to_vec(&msg)?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        self.reply(command, id.as_deref())
    }

    fn new_id(&mut self) -> String {
        self.next_id += 1;
        format!("spore-{}", self.next_id)
    }

    /// How long a command may wait for its answer (30 s unless set): a
    /// command that times out fails, and with out-of-band execution on the
    /// connection stays usable (its late answer is passed over).
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), QmpError> {
        self.writer.set_read_timeout(Some(timeout))?;
        Ok(())
    }

    /// Reads until the reply to `command` (the one with `id`, if given),
    /// keeping events.
    fn reply(&mut self, command: &str, id: Option<&str>) -> Result<Value, QmpError> {
        loop {
            let reply = self.read_message()?;
            if reply.get("event").is_some() {
                self.events.push(reply);
                continue;
            }
            if id.is_some_and(|id| reply["id"] != id) {
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: err["class"].as_str().unwrap_or("?").to_owned(),
                    desc: err["desc"].as_str().unwrap_or("?").to_owned(),
                });
            }
        }
    }

    /// Passes an open file to QEMU under `name` (QMP `getfd`, the
    /// descriptor travelling as SCM_RIGHTS with the command).
    pub fn send_fd(&mut self, name: &str, fd: std::os::fd::BorrowedFd<'_>) -> Result<(), QmpError> {
        use std::os::fd::AsRawFd;
        let mut line = serde_json::to_vec(&json!({
            "execute": "getfd", "arguments": { "fdname": name }
        }))?;
        line.push(b'\n');
        let raw = fd.as_raw_fd();
        // SAFETY: the buffers outlive the call; the control buffer is sized
        // with CMSG_SPACE for one descriptor and filled through the CMSG
        // accessors, as sendmsg(2) describes.
        let sent = unsafe {
            let mut iov = libc::iovec {
                iov_base: line.as_ptr() as *mut libc::c_void,
                iov_len: line.len(),
            };
            let space = libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) as usize;
            let mut control = vec![0u8; space];
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = space;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as usize;
            std::ptr::copy_nonoverlapping(
                &raw as *const i32 as *const u8,
                libc::CMSG_DATA(cmsg),
                std::mem::size_of::<i32>(),
            );
            libc::sendmsg(self.writer.as_raw_fd(), &msg, 0)
        };
        if sent < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        if (sent as usize) < line.len() {
            return Err(QmpError::Invalid("getfd command was cut short".into()));
        }
        self.reply("getfd", None).map(|_| ())
    }

    /// Waits up to `timeout` for an asynchronous event (one that arrived
    /// while a command ran comes first); `None` when none came. Lets a
    /// caller that polls QEMU react to a state change (a `MIGRATION`
    /// event, say) at once instead of at its next poll.
    pub fn wait_event(&mut self, timeout: Duration) -> Result<Option<Value>, QmpError> {
        if !self.events.is_empty() {
            return Ok(Some(self.events.remove(0)));
        }
        if self.reader.buffer().is_empty() && !readable(&self.writer, timeout)? {
            return Ok(None);
        }
        // QEMU writes whole lines: a readable socket has one coming.
        let msg = self.read_message()?;
        Ok(msg.get("event").is_some().then_some(msg))
    }

    /// `query-version`: QEMU's (major, minor, micro).
    pub fn version(&mut self) -> Result<(u64, u64, u64), QmpError> {
        let v = self.execute("query-version", None)?;
        let n = |k: &str| v["qemu"][k].as_u64();
        match (n("major"), n("minor"), n("micro")) {
            (Some(a), Some(b), Some(c)) => Ok((a, b, c)),
            _ => Err(QmpError::Invalid(format!("query-version answered {v}"))),
        }
    }

    /// `query-status`: the run state ("running", "paused", ...).
    pub fn status(&mut self) -> Result<String, QmpError> {
        let v = self.execute("query-status", None)?;
        Ok(v["status"].as_str().unwrap_or("unknown").to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake QMP server: greeting, capabilities, then `script` lines.
    fn server(dir: &Path, script: Vec<&'static str>) -> std::thread::JoinHandle<()> {
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            s.write_all(b"{\"QMP\": {\"version\": {}}}\n").unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            s.write_all(b"{\"return\": {}}\n").unwrap();
            for l in script {
                if let Some(ms) = l.strip_prefix("sleep ") {
                    std::thread::sleep(Duration::from_millis(ms.parse().unwrap()));
                } else if l == "reply" {
                    line.clear();
                    r.read_line(&mut line).unwrap();
                    s.write_all(b"{\"event\": \"STOP\"}\n{\"return\": {\"status\": \"paused\"}}\n")
                        .unwrap();
                } else {
                    s.write_all(l.as_bytes()).unwrap();
                    s.write_all(b"\n").unwrap();
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        })
    }

    #[test]
    fn an_event_ends_the_wait_early_and_none_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let t = server(
            dir.path(),
            vec![
                "sleep 50",
                r#"{"event": "MIGRATION", "data": {"status": "pre-switchover"}}"#,
            ],
        );
        let mut q = Qmp::connect(&dir.path().join("qmp.sock"), Duration::from_secs(5)).unwrap();
        let start = Instant::now();
        let e = q.wait_event(Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(e["data"]["status"], "pre-switchover");
        assert!(start.elapsed() < Duration::from_secs(2));
        let start = Instant::now();
        assert!(q.wait_event(Duration::from_millis(30)).unwrap().is_none());
        assert!(start.elapsed() >= Duration::from_millis(25));
        t.join().unwrap();
    }

    #[test]
    fn the_version_is_read_and_a_bad_answer_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let t = server(
            dir.path(),
            vec![
                r#"{"return": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": ""}}"#,
                r#"{"return": {"qemu": {}}}"#,
            ],
        );
        let mut q = Qmp::connect(&dir.path().join("qmp.sock"), Duration::from_secs(5)).unwrap();
        assert_eq!(q.version().unwrap(), (10, 0, 2));
        assert!(q.version().is_err());
        t.join().unwrap();
    }

    #[test]
    fn out_of_band_answers_are_told_by_their_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": [\"oob\"]}}\n")
                .unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("\"enable\":[\"oob\"]"), "{line}");
            s.write_all(b"{\"return\": {}}\n").unwrap();
            line.clear();
            r.read_line(&mut line).unwrap();
            let cmd: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(cmd["exec-oob"], "migrate-recover");
            let id = cmd["id"].as_str().unwrap().to_owned();
            // A late answer to an earlier in-band command, an event, then ours.
            s.write_all(b"{\"return\": {\"status\": \"running\"}}\n")
                .unwrap();
            s.write_all(b"{\"event\": \"RESUME\"}\n").unwrap();
            s.write_all(
                format!("{{\"id\": \"{id}\", \"error\": {{\"class\": \"GenericError\", \"desc\": \"not paused\"}}}}\n")
                    .as_bytes(),
            )
            .unwrap();
            std::thread::sleep(Duration::from_millis(100));
        });
        let mut q = Qmp::connect_oob(&path, Duration::from_secs(5)).unwrap();
        let e = q
            .execute_oob("migrate-recover", Some(json!({ "uri": "tcp:127.0.0.1:1" })))
            .unwrap_err();
        assert!(e.to_string().contains("not paused"), "{e}");
        assert_eq!(q.events.len(), 1);
        t.join().unwrap();
    }

    #[test]
    fn an_event_read_with_a_reply_is_handed_out_first() {
        let dir = tempfile::tempdir().unwrap();
        let t = server(dir.path(), vec!["reply"]);
        let mut q = Qmp::connect(&dir.path().join("qmp.sock"), Duration::from_secs(5)).unwrap();
        assert_eq!(q.status().unwrap(), "paused");
        let e = q.wait_event(Duration::from_millis(0)).unwrap().unwrap();
        assert_eq!(e["event"], "STOP");
        assert!(q.wait_event(Duration::from_millis(0)).unwrap().is_none());
        t.join().unwrap();
    }
}
