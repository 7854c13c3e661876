//! Moving chunks between hosts.
//!
//! A host that lacks a chunk asks other agents for it: its peers first,
//! then the origin. Requests are batched (several chunks per round trip),
//! and every chunk that arrives is decoded and hashed against its id before
//! it is stored or used, so a lying or broken remote costs a retry
//! elsewhere, never a wrong byte. See docs/distribution.md.

#[cfg(any(test, feature = "fake-peers"))]
pub mod fake_peer;
pub mod fetcher;
pub mod links;
pub mod popularity;
pub mod remote;
pub mod wire;

pub use fetcher::{FetchError, Fetcher, OnArrival, DEMAND_DEADLINE};
pub use links::Links;
pub use popularity::Popularity;
pub use remote::{Class, Remote, RemoteError, Resolved, Standing, DEADLINE_HEADER, MAX_POPULAR};
