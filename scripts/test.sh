#!/usr/bin/env bash
# Runs spore's whole test suite from a fresh clone: installs system
# packages, builds the demo guest, then runs every Rust test (unit tests,
# and integration tests that drive real agents, qemu-io, qemu-img, nbdcopy,
# nbdinfo and real QEMU guests).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
bash guest/build.sh
export CARGO_TERM_COLOR=never
cargo build --workspace --all-targets --locked
# The fuzz targets must keep building (running them: docs/nbd.md, `cargo fuzz`).
cargo check --manifest-path fuzz/Cargo.toml --bins
# Two tests at a time at most: VM tests run TCG guests on 2 cores.
cargo test --workspace --locked -- --test-threads=2
