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
