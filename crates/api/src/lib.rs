//! The agent's REST API: the JSON types both sides use, and a client.
//!
//! The agent serves HTTP/1.1 + JSON on a unix socket in its data directory
//! (`api.sock`). Long operations (import, export) answer with a stream of
//! newline-delimited JSON [`Event`]s: progress, then one `done` or `error`.
//! docs/api.yaml describes every route; a test checks that it matches the
//! router.

pub mod client;
pub mod names;
pub mod types;

pub use client::{Client, ClientError};
pub use names::{check_name, is_valid_name, NAME_RULE};
pub use types::*;

/// Name of the API socket inside the data directory.
pub const API_SOCKET: &str = "api.sock";
/// Name of the NBD socket inside the data directory.
pub const NBD_SOCKET: &str = "nbd.sock";
/// The file a running agent holds locked (`flock`) inside the data
/// directory.
pub const AGENT_LOCK: &str = "agent.lock";
/// The socket holder's socket inside the data directory (it keeps the API
/// and NBD sockets open while the agent restarts).
pub const HOLDER_SOCKET: &str = "holder.sock";

/// Whether an agent runs on `data_dir`: it holds [`AGENT_LOCK`] locked
/// (read from `/proc/locks`, without touching the lock, which a starting
/// agent takes without waiting). `None` when there is no lock file.
pub fn agent_running(data_dir: &std::path::Path) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(data_dir.join(AGENT_LOCK)).ok()?;
    let (major, minor) = (libc::major(m.dev()), libc::minor(m.dev()));
    let want = format!("{major:02x}:{minor:02x}:{}", m.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    Some(locks.lines().any(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        // "N: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE START END"; a waiter
        // has "->" after the number.
        words.get(1) == Some(&"FLOCK") && words.get(5) == Some(&want.as_str())
    }))
}
