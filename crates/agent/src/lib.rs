//! The per-host agent: metadata store, REST API, NBD exports, VM manager
