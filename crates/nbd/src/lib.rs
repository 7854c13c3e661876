//! NBD server.
pub mod export;
pub use export::{Export, Exports, Extent};
