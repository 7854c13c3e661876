//! An NBD (network block device) server, so that QEMU, `qemu-img`, `nbdcopy`
//! or the kernel's `nbd` driver can use a spore block device as a disk.
//!
//! It speaks the fixed-newstyle protocol with `NBD_OPT_GO`, structured
//! replies and the `base:allocation` metadata context, serves several
//! exports (named through [`Exports`]) to several clients at once, and runs
//! each connection's requests on a small pool of threads, replying out of
//! order. It uses blocking std threads: NBD traffic is a few busy, long-lived
//! connections, which threads serve well without an async runtime.
//!
//! # Connection states
//!
//! ```text
//!   accept
//!     |  S: NBDMAGIC IHAVEOPT flags
//!     v
//! +-----------+  C: client flags (unknown bits: close)
//! | Handshake |---------------------------------------------+
//! +-----------+                                             |
//!     |                                                     |
//!     v                                                     |
//! +----------------+  LIST, INFO, STRUCTURED_REPLY,         |
//! | Option haggling|  LIST/SET_META_CONTEXT, unknown (UNSUP),|
//! |                |<-+ malformed (INVALID): reply, stay     |
//! +----------------+--+                                     |
//!     |        |  ABORT: ACK, close; bad magic, option      |
//!     |        +-- > 64 KiB, EXPORT_NAME of unknown export ->+
//!     |  GO (known export): INFO..., ACK                    |
//!     |  EXPORT_NAME (known export): size, flags            |
//!     v                                                     |
//! +--------------+  READ WRITE FLUSH TRIM CACHE              |
//! | Transmission |  WRITE_ZEROES BLOCK_STATUS: reply, stay  |
//! |              |<-+ invalid request: error reply, stay    |
//! +--------------+--+                                       |
//!     |  DISC (after in-flight requests are answered),      |
//!     |  end of stream, bad magic, oversized WRITE,         |
//!     |  server shutdown                                    |
//!     v                                                     |
//! +--------+                                                |
//! | Closed |<-----------------------------------------------+
//! +--------+
//! ```
//!
//! The wire format and its parsers live in [`proto`], apart from any I/O, so
//! that they can be fuzzed; `docs/nbd.md` lists what is supported, the limits
//! and how errors are mapped.

pub mod client;
pub mod export;
mod handshake;
pub mod proto;
mod server;
mod tls;
mod transmission;
mod transport;

pub use export::{Export, Exports, Extent};
pub use proto::{parse_request_header, ProtocolError, Request};
pub use server::{
    serve_connection, serve_tcp, serve_unix, ConnectionError, Listener, Server, ServerConfig,
    ServerHandle, SessionEnd,
};
pub use tls::TlsPolicy;
pub use transport::Transport;
