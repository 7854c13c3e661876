//! Benchmarks that compare spore with its baselines in the same run
