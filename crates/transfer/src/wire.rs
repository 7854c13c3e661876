//! The batch wire format between agents.
//!
//! A batch request asks a remote for several chunks in one round trip, so
//! that small chunks do not pay one round trip each:
//!
//! ```text
//! request  (POST /v1/chunks/batch):  magic "SPBQ" | u32 count | count × [u8; 32] id
//! response:                           magic "SPBR" | u32 count | count × record
//! record:                             [u8; 32] id | u8 status | u32 len | len bytes
//!     status 0: present, the bytes are the chunk file (docs/formats.md)
//!     status 1: the remote does not have it (len 0)
//! ```
//!
//! Records come in request order, one per requested id. The bytes of a
//! present chunk are untrusted: the receiver decodes and hashes them
//! ([`spore_chunks::decode_chunk_file`]) before use.

use spore_chunks::{ChunkId, MAX_CHUNK_SIZE};

pub const REQUEST_MAGIC: [u8; 4] = *b"SPBQ";
pub const RESPONSE_MAGIC: [u8; 4] = *b"SPBR";
/// Most ids one batch may name.
pub const MAX_BATCH: usize = 256;
/// Chunk file header + largest payload.
const MAX_RECORD: usize = MAX_CHUNK_SIZE + 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("truncated batch message")]
    Truncated,
    #[error("wrong magic in batch message")]
    BadMagic,
    #[error("batch of {0} chunks (limit {MAX_BATCH})")]
    TooMany(usize),
    #[error("batch message has trailing bytes")]
    Trailing,
    #[error("record for {found} where {expected} was asked for")]
    OutOfOrder { expected: ChunkId, found: ChunkId },
    #[error("record of {0} bytes is over the limit")]
    RecordTooLarge(usize),
    #[error("unknown record status {0}")]
    BadStatus(u8),
}

pub fn encode_request(ids: &[ChunkId]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + ids.len() * 32);
    out.extend_from_slice(&REQUEST_MAGIC);
    out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
    for id in ids {
        out.extend_from_slice(id.as_bytes());
    }
    out
}

pub fn decode_request(bytes: &[u8]) -> Result<Vec<ChunkId>, WireError> {
    if bytes.len() < 8 {
        return Err(WireError::Truncated);
    }
    if bytes[..4] != REQUEST_MAGIC {
        return Err(WireError::BadMagic);
    }
    let count = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")) as usize;
    if count > MAX_BATCH {
        return Err(WireError::TooMany(count));
    }
    let body = &bytes[8..];
    match body.len().cmp(&(count * 32)) {
        std::cmp::Ordering::Less => return Err(WireError::Truncated),
        std::cmp::Ordering::Greater => return Err(WireError::Trailing),
        std::cmp::Ordering::Equal => {}
    }
    Ok(body
        .chunks_exact(32)
        .map(|c| ChunkId(c.try_into().expect("32 bytes")))
        .collect())
}

/// Builds a response; `records` are (id, chunk file bytes if present).
pub fn encode_response<'a>(
    records: impl ExactSizeIterator<Item = (ChunkId, Option<&'a [u8]>)>,
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&RESPONSE_MAGIC);
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    for (id, data) in records {
        out.extend_from_slice(id.as_bytes());
        match data {
            Some(d) => {
                out.push(0);
                out.extend_from_slice(&(d.len() as u32).to_le_bytes());
                out.extend_from_slice(d);
            }
            None => {
                out.push(1);
                out.extend_from_slice(&0u32.to_le_bytes());
            }
        }
    }
    out
}

/// Parses a response to a request for `asked`: for each id, the raw chunk
/// file bytes (unverified) or None when the remote lacks it.
pub fn decode_response<'a>(
    asked: &[ChunkId],
    bytes: &'a [u8],
) -> Result<Vec<Option<&'a [u8]>>, WireError> {
    let take = |at: usize, n: usize| bytes.get(at..at + n).ok_or(WireError::Truncated);
    if take(0, 4)? != RESPONSE_MAGIC {
        return Err(WireError::BadMagic);
    }
    let count = u32::from_le_bytes(take(4, 4)?.try_into().expect("4 bytes")) as usize;
    if count != asked.len() {
        return Err(WireError::TooMany(count));
    }
    let mut at = 8;
    let mut out = Vec::with_capacity(count);
    for expected in asked {
        let found = ChunkId(take(at, 32)?.try_into().expect("32 bytes"));
        if found != *expected {
            return Err(WireError::OutOfOrder {
                expected: *expected,
                found,
            });
        }
        let status = take(at + 32, 1)?[0];
        let len = u32::from_le_bytes(take(at + 33, 4)?.try_into().expect("4 bytes")) as usize;
        at += 37;
        if len > MAX_RECORD {
            return Err(WireError::RecordTooLarge(len));
        }
        match status {
            0 => {
                out.push(Some(take(at, len)?));
                at += len;
            }
            1 if len == 0 => out.push(None),
            s => return Err(WireError::BadStatus(s)),
        }
    }
    if at != bytes.len() {
        return Err(WireError::Trailing);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> Vec<ChunkId> {
        (0..3u8).map(|i| ChunkId::of(&[i])).collect()
    }

    #[test]
    fn request_roundtrip_and_malformed() {
        let ids = ids();
        let enc = encode_request(&ids);
        assert_eq!(decode_request(&enc).unwrap(), ids);
        assert_eq!(decode_request(&enc[..5]), Err(WireError::Truncated));
        assert_eq!(decode_request(&enc[..40]), Err(WireError::Truncated));
        let mut long = enc.clone();
        long.push(0);
        assert_eq!(decode_request(&long), Err(WireError::Trailing));
        let mut magic = enc.clone();
        magic[0] = b'X';
        assert_eq!(decode_request(&magic), Err(WireError::BadMagic));
        let mut many = enc.clone();
        many[4..8].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(decode_request(&many), Err(WireError::TooMany(1000)));
    }

    #[test]
    fn response_roundtrip_and_malformed() {
        let ids = ids();
        let recs = vec![
            (ids[0], Some(&b"abc"[..])),
            (ids[1], None),
            (ids[2], Some(&b""[..])),
        ];
        let enc = encode_response(recs.clone().into_iter());
        let dec = decode_response(&ids, &enc).unwrap();
        assert_eq!(dec, vec![Some(&b"abc"[..]), None, Some(&b""[..])]);
        for cut in [0, 3, 8, 20, 40, 42, enc.len() - 1] {
            assert_eq!(
                decode_response(&ids, &enc[..cut]),
                Err(WireError::Truncated),
                "cut {cut}"
            );
        }
        let mut trailing = enc.clone();
        trailing.push(9);
        assert_eq!(decode_response(&ids, &trailing), Err(WireError::Trailing));
        let swapped = [ids[1], ids[0], ids[2]];
        assert!(matches!(
            decode_response(&swapped, &enc),
            Err(WireError::OutOfOrder { .. })
        ));
        let mut status = enc.clone();
        status[8 + 32] = 7;
        assert_eq!(decode_response(&ids, &status), Err(WireError::BadStatus(7)));
        let mut huge = enc.clone();
        huge[8 + 33..8 + 37].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_response(&ids, &huge),
            Err(WireError::RecordTooLarge(_))
        ));
        assert!(matches!(
            decode_response(&ids[..2], &enc),
            Err(WireError::TooMany(3))
        ));
    }
}
