//! The block batch decoder (live migration's disk blocks) on arbitrary
//! bytes: it must not panic, and whatever decodes must re-encode to the same
//! bytes. The checksum is appended here so that the structural checks behind
//! it are reached, not only the checksum comparison.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spore_blockdev::batch::{decode_batch, BatchWriter};

fuzz_target!(|data: &[u8]| {
    let _ = decode_batch(data, 1 << 30);
    let mut summed = data.to_vec();
    summed.extend_from_slice(blake3::hash(data).as_bytes());
    let size = data
        .get(16..24)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        .unwrap_or(0);
    if let Ok(extents) = decode_batch(&summed, size) {
        let mut w = BatchWriter::new(size);
        for (offset, bytes) in &extents {
            w.push(*offset, bytes);
        }
        assert_eq!(w.finish(), summed);
    }
});
