//! What a guest writes on its console, as the stall probe reads it
//! (spore-qemu's channel): arbitrary bytes, fed in arbitrary pieces.
//! Nothing may panic; the count does not depend on how the bytes were cut,
//! and only the unfinished last line is kept.

#![no_main]

use libfuzzer_sys::fuzz_target;
use spore_qemu::channel::count_pongs;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    let mut whole = bytes.to_vec();
    let at_once = count_pongs(&mut whole);

    let mut buf = Vec::new();
    let mut pieces = 0;
    for piece in bytes.chunks(usize::from(cut).max(1)) {
        buf.extend_from_slice(piece);
        pieces += count_pongs(&mut buf);
    }
    assert_eq!(pieces, at_once);
    assert_eq!(buf, whole);
    assert!(!whole.contains(&b'\n'));
});
