//! Every spore on-disk format decoder on arbitrary bytes: none may panic,
//! and whatever decodes must re-encode to something that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spore_chunks::{decode_chunk_file, ChunkId};
use spore_image::{Bundle, Layer, Manifest, Profile};

fuzz_target!(|data: &[u8]| {
    if let Ok(layer) = Layer::decode(data) {
        assert_eq!(Layer::decode(&layer.encode()).as_ref(), Ok(&layer));
    }
    if let Ok(m) = Manifest::decode(data) {
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }
    if let Ok(p) = Profile::decode(data) {
        assert_eq!(Profile::decode(&p.encode()).as_ref(), Ok(&p));
    }
    if let Ok(b) = Bundle::decode(data) {
        assert_eq!(Bundle::decode(&b.encode()).as_ref(), Ok(&b));
    }
    let _ = spore_blockdev::overlay::decode_meta(data);
    let _ = spore_blockdev::overlay::decode_log_header(data);
    let _ = spore_blockdev::overlay::decode_records(1, data, 1 << 20);
    let _ = spore_blockdev::overlay::decode_pending_header(data);
    if data.len() > 16 {
        let boot: [u8; 16] = data[..16].try_into().expect("16 bytes");
        for (first, n) in spore_blockdev::overlay::decode_pending_records(&boot, 1, &data[16..], 1 << 20) {
            assert!(n > 0 && first + n <= 1 << 20);
        }
    }
    // Chunk files: checked against the id of their own payload and a fixed one.
    let _ = decode_chunk_file(&ChunkId::of(data), data);
    if data.len() > 16 {
        let _ = decode_chunk_file(&ChunkId::of(&data[16..]), data);
    }
});
