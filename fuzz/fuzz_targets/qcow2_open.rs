//! Opens arbitrary bytes as a qcow2 image and reads what it can: parsing
//! untrusted images must end in an error or in data, never in a panic,
//! a hang or a huge allocation.

#![no_main]

use libfuzzer_sys::fuzz_target;
use spore_qcow2::{is_qcow2, Qcow2Reader};

/// Guest bytes read per input, spread over the disk: enough to touch every
/// table of a small image without letting a huge virtual size stall a run.
const MAX_READ: u64 = 4 << 20;
const MAX_EXTENTS: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let _ = is_qcow2(data);
    let Ok(reader) = Qcow2Reader::from_source(data.to_vec()) else {
        return;
    };
    let size = reader.virtual_size();
    let mut buf = vec![0u8; 64 * 1024];
    // Read the start, then pieces at strides across the rest.
    let stride = (size / (MAX_READ / buf.len() as u64)).max(buf.len() as u64);
    let mut offset = 0u64;
    while offset < size {
        let n = (size - offset).min(buf.len() as u64) as usize;
        let _ = reader.read_at(offset, &mut buf[..n]);
        // Unaligned small reads too.
        let _ = reader.read_at(offset + 1, &mut buf[..n.saturating_sub(1).min(777)]);
        offset = offset.saturating_add(stride);
    }
    if let Ok(extents) = reader.extents(0, size) {
        for extent in extents.take(MAX_EXTENTS) {
            if extent.is_err() {
                break;
            }
        }
    }
});
