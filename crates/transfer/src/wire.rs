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

use std::io::Read;

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
    #[error("reading the answer: {0}")]
    Io(String),
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
    let mut out = encode_response_head(records.len());
    for (id, data) in records {
        put_record(&mut out, &id, data);
    }
    out
}

/// The start of a response of `count` records (for a response sent
/// record by record, with [`encode_record`]).
pub fn encode_response_head(count: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(8);
    out.extend_from_slice(&RESPONSE_MAGIC);
    out.extend_from_slice(&(count as u32).to_le_bytes());
    out
}

/// One record of a response: `id` and its chunk file, or "missing".
pub fn encode_record(id: &ChunkId, data: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(37 + data.map_or(0, <[u8]>::len));
    put_record(&mut out, id, data);
    out
}

fn put_record(out: &mut Vec<u8>, id: &ChunkId, data: Option<&[u8]>) {
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

/// Parses a whole response to a request for `asked`: for each id, the raw
/// chunk file bytes (unverified) or None when the remote lacks it.
pub fn decode_response(asked: &[ChunkId], bytes: &[u8]) -> Result<Vec<Option<Vec<u8>>>, WireError> {
    let mut reader = ResponseReader::new(asked, bytes)?;
    let mut out = Vec::with_capacity(asked.len());
    while let Some((_, record)) = reader.next_record()? {
        out.push(record);
    }
    Ok(out)
}

/// Reads a response to a request for `asked` from a stream, one record at
/// a time: whatever a remote sends, reading it costs at most one record of
/// memory (a record's buffer grows only as its bytes arrive, so a lying
/// length allocates nothing), and each chunk can be used as soon as it has
/// arrived, before the rest of the batch.
pub struct ResponseReader<'a, R> {
    r: R,
    asked: &'a [ChunkId],
    next: usize,
}

fn io_error(e: std::io::Error) -> WireError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => WireError::Truncated,
        _ => WireError::Io(e.to_string()),
    }
}

impl<'a, R: Read> ResponseReader<'a, R> {
    /// Reads the response's header.
    pub fn new(asked: &'a [ChunkId], mut r: R) -> Result<Self, WireError> {
        let mut head = [0u8; 8];
        r.read_exact(&mut head).map_err(io_error)?;
        if head[..4] != RESPONSE_MAGIC {
            return Err(WireError::BadMagic);
        }
        let count = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes")) as usize;
        if count != asked.len() {
            return Err(WireError::TooMany(count));
        }
        Ok(ResponseReader { r, asked, next: 0 })
    }

    /// The next record: the id asked for and its chunk file bytes, or None
    /// where the remote lacks it. `Ok(None)` once every asked id has been
    /// answered and the response ended there.
    #[allow(clippy::type_complexity)]
    pub fn next_record(&mut self) -> Result<Option<(ChunkId, Option<Vec<u8>>)>, WireError> {
        let Some(expected) = self.asked.get(self.next) else {
            // Every record read: the response must end here.
            let mut one = [0u8; 1];
            return match self.r.read(&mut one) {
                Ok(0) => Ok(None),
                Ok(_) => Err(WireError::Trailing),
                Err(e) => Err(io_error(e)),
            };
        };
        let mut head = [0u8; 37];
        self.r.read_exact(&mut head).map_err(io_error)?;
        let found = ChunkId(head[..32].try_into().expect("32 bytes"));
        if found != *expected {
            return Err(WireError::OutOfOrder {
                expected: *expected,
                found,
            });
        }
        let status = head[32];
        let len = u32::from_le_bytes(head[33..37].try_into().expect("4 bytes")) as usize;
        if len > MAX_RECORD {
            return Err(WireError::RecordTooLarge(len));
        }
        self.next += 1;
        match status {
            0 => {
                let mut data = Vec::new();
                (&mut self.r)
                    .take(len as u64)
                    .read_to_end(&mut data)
                    .map_err(io_error)?;
                if data.len() < len {
                    return Err(WireError::Truncated);
                }
                Ok(Some((found, Some(data))))
            }
            1 if len == 0 => Ok(Some((found, None))),
            s => Err(WireError::BadStatus(s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> Vec<ChunkId> {
        (0..3u8).map(|i| ChunkId::of(&[i])).collect()
    }

    /// A reader of a stream hands on each record as it arrives: a
    /// response cut (or broken) after its first record still delivered
    /// that record.
    #[test]
    fn a_streamed_response_delivers_records_before_it_breaks() {
        let ids = ids();
        let enc = encode_response(
            [
                (ids[0], Some(&b"first"[..])),
                (ids[1], Some(&b"second"[..])),
                (ids[2], None),
            ]
            .into_iter(),
        );
        let first_end = 8 + 37 + 5;
        let mut r = ResponseReader::new(&ids, &enc[..first_end + 10]).unwrap();
        assert_eq!(
            r.next_record().unwrap(),
            Some((ids[0], Some(b"first".to_vec())))
        );
        assert_eq!(r.next_record(), Err(WireError::Truncated));
        // A record that says it is long but is not: no room is taken for
        // the length it claims, and it is refused as truncated.
        let mut liar = enc[..8 + 33].to_vec();
        liar.extend_from_slice(&((MAX_RECORD as u32) - 1).to_le_bytes());
        liar.extend_from_slice(b"short");
        let mut r = ResponseReader::new(&ids, &liar[..]).unwrap();
        assert_eq!(r.next_record(), Err(WireError::Truncated));
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
        assert_eq!(dec, vec![Some(b"abc".to_vec()), None, Some(Vec::new())]);
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
