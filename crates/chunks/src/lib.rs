//! Content-addressed chunk store: BLAKE3 ids, zstd, verified reads
