//! The peer wire messages (spore-transfer's chunk request and response) on
//! arbitrary bytes, as an agent reads them from another host. Nothing may
//! panic; what decodes re-encodes to the same bytes, and a response only
//! ever answers the ids that were asked, in order.

#![no_main]

use libfuzzer_sys::fuzz_target;
use spore_chunks::ChunkId;
use spore_transfer::wire;

fuzz_target!(|data: &[u8]| {
    // As a request (what a peer asks of this host).
    if let Ok(ids) = wire::decode_request(data) {
        let again = wire::encode_request(&ids);
        assert_eq!(wire::decode_request(&again).unwrap(), ids);
    }

    // As a response to the ids the first byte says were asked, taken from
    // the bytes after it (so that matching ids are easy to find).
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let asked: Vec<ChunkId> = rest
        .chunks_exact(32)
        .take(usize::from(n % 8))
        .map(|c| ChunkId(c.try_into().unwrap()))
        .collect();
    let response = &rest[asked.len() * 32..];
    if let Ok(records) = wire::decode_response(&asked, response) {
        assert_eq!(records.len(), asked.len());
        let again = wire::encode_response(asked.iter().copied().zip(records.iter().map(|r| r.as_deref())));
        assert_eq!(wire::decode_response(&asked, &again).unwrap(), records);
    }
});
