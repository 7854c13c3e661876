//! The spore guest channel: one-line messages from the agent to the guest
//! over a virtio-serial port (`org.spore.channel`), read by the demo
//! guest's `ready.d/20-channel` hook. Replies appear on the serial console.
//!
//! The channel is how a clone learns that it is a clone: the guest sits
//! blocked reading the port when its template is captured, and each clone
//! is sent its own identity right after it resumes.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
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
                word("seed", &id.seed)?;
                format!(
                    "identity hostname={} instance={} mac={} seed={}\n",
                    id.hostname, id.instance_id, id.mac, id.seed
                )
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
            match UnixStream::connect(path) {
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
    fn blanks_and_newlines_are_refused() {
        let mut bad = id();
        bad.hostname = "a b".into();
        assert!(Message::Identity(bad).encode().is_err());
        let mut bad = id();
        bad.hostname = "a\nresources".into();
        assert!(Message::Identity(bad).encode().is_err());
        assert!(Message::Cat(String::new()).encode().is_err());
        assert!(Message::Write {
            path: "/a=b".into(),
            content: "x".into()
        }
        .encode()
        .is_err());
    }
}
