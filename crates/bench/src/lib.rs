//! Benchmarks: programs that measure spore against a baseline in the same
//! run, print a table and write JSON. They are not tests.

pub mod blockdev;
pub mod clone;
pub mod flush;
pub mod fsck;
pub mod migrate;
pub mod procs;
pub mod restart;
pub mod slow_peers;
pub mod storm;
pub mod tls;
pub mod tls_stream;
pub mod tls_vm;

/// Writes `mib` MiB of random (incompressible) data to `path`.
pub fn random_file(path: &std::path::Path, mib: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        block.iter_mut().for_each(|b| *b = rand::random());
        f.write_all(&block)?;
    }
    f.flush()
}

pub fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

/// Nearest-rank percentile.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}
