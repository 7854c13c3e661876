//! Benchmarks: programs that measure spore against a baseline in the same
//! run, print a table and write JSON. They are not tests.

pub mod blockdev;
pub mod procs;
pub mod storm;
